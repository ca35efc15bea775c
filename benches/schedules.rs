//! What a schedule's firing costs, and how many `every` schedules one store
//! keeps on time.
//!
//! ```text
//! cargo bench --bench schedules             # full (about a minute)
//! cargo bench --bench schedules -- --quick  # smoke run: checks completion
//! ```
//!
//! - `cost`: 1,000 `every` schedules fire on a memory store at a 10 ms
//!   flush; each run is one step. Write batches per firing = (SlateDB write
//!   batches − claim batches − step acks) / tick acks; awaited commits per
//!   firing subtracts taquba's promotion of each due tick (one commit per
//!   scheduled job, not awaited). What remains is the tick's `ack_with` plus
//!   the pool's maintenance commits (tally folding), an upper bound on the
//!   one awaited commit a firing makes.
//! - `fleet`: 10,000 `every 10 s` schedules on one store (memory, 10 ms
//!   flush), all recorded at the same instant, so every round is a burst of
//!   10,000 due fires. Fires/s = fires of a round over the time from the
//!   due instant to the last run's start; lateness = when each run's step 0
//!   starts, behind its fire time (the fire's commit, plus the step's claim).
//!
//! Commits are counted through taquba's `metrics` feature, as in the
//! `steps` benchmark.

// Shared with the `steps` benchmark, which uses all of it.
#[allow(dead_code)]
#[path = "steps/counters.rs"]
mod counters;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use taquba::object_store::memory::InMemory;
use taquba::{OpenOptions, Queue};
use waymark::{
    NoopTerminalHook, Schedule, Step, StepError, StepOutcome, StepRunner, WorkflowRuntime,
};

/// Succeeds at once, noting how late each run started behind its fire time
/// (the run id is `{schedule}:{fire ms}`).
#[derive(Clone, Default)]
struct Late {
    late_ms: Arc<Mutex<Vec<f64>>>,
}

impl StepRunner for Late {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
            * 1000.0;
        if let Some(due) = step
            .run_id
            .rsplit_once(':')
            .and_then(|(_, ms)| ms.parse::<f64>().ok())
        {
            self.late_ms.lock().unwrap().push(now - due);
        }
        Ok(StepOutcome::Succeed { result: vec![] })
    }
}

struct Outcome {
    fires: usize,
    fires_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    commits_per_fire: f64,
    batches_per_fire: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// `n` schedules every `interval`, for `rounds` rounds.
async fn measure(
    counting: &counters::Counting,
    n: usize,
    interval: Duration,
    rounds: u32,
) -> Outcome {
    let opts = OpenOptions {
        flush_interval: Some(Duration::from_millis(10)),
        scheduler_interval: Duration::from_millis(5),
        ..Default::default()
    };
    let queue = Arc::new(
        Queue::open_with_options(Arc::new(InMemory::new()), "bench", opts)
            .await
            .expect("open queue"),
    );
    let runner = Late::default();
    let mut builder = WorkflowRuntime::builder(queue.clone(), runner.clone(), NoopTerminalHook)
        .max_concurrent_steps(256)
        .poll_interval(Duration::from_millis(50));
    for i in 0..n {
        builder = builder.schedule(Schedule::every(format!("s{i:05}"), interval));
    }
    let rt = builder.build().expect("valid settings");
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let rt = rt.clone();
        let stop = stop.clone();
        async move { rt.run(stop.cancelled_owned()).await }
    });
    // Wait until every schedule is recorded, then count from there.
    while rt.schedules().await.expect("schedules").len() < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = counting.snapshot();
    let ticks = counting.completed("workflow-steps-sched");
    let steps = counting.completed("workflow-steps");
    let (ticks0, steps0) = (
        ticks.load(std::sync::atomic::Ordering::Relaxed),
        steps.load(std::sync::atomic::Ordering::Relaxed),
    );
    let want = n * rounds as usize;
    let started = Instant::now();
    loop {
        let late = runner.late_ms.lock().unwrap().len();
        if late >= want {
            break;
        }
        if started.elapsed() > interval * (rounds + 1) * 4 {
            panic!("only {late} of {want} fires ran");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Wait for the last runs' commits too.
    while steps.load(std::sync::atomic::Ordering::Relaxed) - steps0 < want as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let counts = counting.snapshot() - before;
    let fired = ticks.load(std::sync::atomic::Ordering::Relaxed) - ticks0;
    let step_acks = steps.load(std::sync::atomic::Ordering::Relaxed) - steps0;
    stop.cancel();
    worker.await.expect("worker task").expect("worker");
    let mut late = std::mem::take(&mut *runner.late_ms.lock().unwrap());
    late.sort_by(f64::total_cmp);
    // Every round is a burst of `n` fires due at one instant: it takes
    // until its latest run started (the worst round counts).
    let span_ms = late.last().copied().unwrap_or(0.0).max(1.0);
    let fires_per_sec = n as f64 / (span_ms / 1000.0);
    drop(rt);
    if let Ok(queue) = Arc::try_unwrap(queue) {
        queue.close().await.expect("close");
    }
    Outcome {
        fires: late.len(),
        fires_per_sec,
        p50_ms: percentile(&late, 0.50),
        p99_ms: percentile(&late, 0.99),
        // taquba promotes each due tick with one commit nobody awaits.
        commits_per_fire: counts
            .awaited_commits()
            .saturating_sub(step_acks)
            .saturating_sub(fired) as f64
            / fired.max(1) as f64,
        batches_per_fire: counts.awaited_commits().saturating_sub(step_acks) as f64
            / fired.max(1) as f64,
    }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let counting = counters::install();
    let started = Instant::now();

    println!("### schedules: memory store, 10 ms flush");
    println!();
    println!(
        "| scenario | schedules | fires | fires/s (burst) | lateness p50 | lateness p99 | awaited commits per firing | write batches per firing |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let cases: &[(&str, usize, Duration, u32)] = if quick {
        &[
            ("cost", 200, Duration::from_secs(1), 2),
            ("fleet", 1_000, Duration::from_secs(2), 1),
        ]
    } else {
        &[
            ("cost", 1_000, Duration::from_secs(2), 3),
            ("fleet", 10_000, Duration::from_secs(10), 2),
        ]
    };
    for &(name, n, interval, rounds) in cases {
        let o = measure(counting, n, interval, rounds).await;
        println!(
            "| {name} | {n} | {} | {:.0} | {:.1} ms | {:.1} ms | {:.2} | {:.2} |",
            o.fires, o.fires_per_sec, o.p50_ms, o.p99_ms, o.commits_per_fire, o.batches_per_fire
        );
        println!(
            "BENCH {{\"scenario\":\"{name}\",\"schedules\":{n},\"fires_per_sec\":{:.1},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"commits_per_fire\":{:.3}}}",
            o.fires_per_sec, o.p50_ms, o.p99_ms, o.commits_per_fire
        );
    }
    println!();
    println!(
        "Finished in {:.1} s ({} mode).",
        started.elapsed().as_secs_f64(),
        if quick { "quick" } else { "full" }
    );
}
