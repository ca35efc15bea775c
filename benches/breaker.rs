//! What the circuit breaker costs on the step path, and what a failing step
//! costs in commits.
//!
//! ```text
//! cargo bench --bench breaker             # full (about a minute)
//! cargo bench --bench breaker -- --quick  # smoke run: checks completion
//! ```
//!
//! - `steps`: runs of 5 echo steps at concurrency 64 on the memory store,
//!   with no breaker policy and with one (`BackoffPolicy::default()`), at a
//!   1 ms and a 10 ms flush; steps/s and awaited commits per step. Both
//!   sides run in this process, each on a fresh store, alternating twice.
//! - `failing`: one-step runs whose step fails transiently once and then
//!   succeeds, against one-step runs that succeed at once; the difference in
//!   awaited commits per run is what one failing attempt costs (with and
//!   without a breaker policy; the policy's backoff is zero so no step is
//!   deferred).
//!
//! Commits are counted through taquba's `metrics` feature (SlateDB write
//! batches minus claim batches), as in the `steps` benchmark.

// Shared with the `steps` benchmark, which uses all of it.
#[allow(dead_code)]
#[path = "steps/counters.rs"]
mod counters;

use std::sync::Arc;

use futures_util::StreamExt;
use std::time::{Duration, Instant};

use taquba::object_store::memory::InMemory;
use taquba::{OpenOptions, Queue};
use waymark::{
    BackoffPolicy, NoopTerminalHook, RetryPolicy, RunSpec, Step, StepError, StepOutcome,
    StepRunner, TerminalStatus, WorkflowRuntime,
};

/// Steps `0..steps` continue, the last succeeds; with `fail_first`, every
/// step's first attempt fails transiently.
struct Runner {
    steps: u32,
    fail_first: bool,
}

impl StepRunner for Runner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        if self.fail_first && step.attempts == 1 {
            return Err(StepError::transient("first attempt fails"));
        }
        Ok(if step.step_number + 1 < self.steps {
            StepOutcome::Continue {
                payload: step.payload.clone(),
            }
        } else {
            StepOutcome::Succeed {
                result: b"ok".to_vec(),
            }
        })
    }
}

struct Case {
    flush: Duration,
    runs: usize,
    steps: u32,
    fail_first: bool,
    breaker: bool,
}

struct Measured {
    steps_per_sec: f64,
    commits_per_run: f64,
    commits_per_step: f64,
}

async fn measure(counting: &counters::Counting, case: &Case) -> Measured {
    let opts = OpenOptions {
        flush_interval: Some(case.flush),
        // Retries are scheduled jobs; promote them promptly.
        scheduler_interval: Duration::from_millis(5),
        ..Default::default()
    };
    let queue = Arc::new(
        Queue::open_with_options(Arc::new(InMemory::new()), "bench", opts)
            .await
            .expect("open queue"),
    );
    let runner = Runner {
        steps: case.steps,
        fail_first: case.fail_first,
    };
    let mut builder = WorkflowRuntime::builder(queue.clone(), runner, NoopTerminalHook)
        .max_concurrent_steps(64)
        .default_retry_policy(RetryPolicy {
            initial: Duration::ZERO,
            ..RetryPolicy::default()
        });
    if case.breaker {
        builder = builder.breaker(
            "default",
            BackoffPolicy {
                initial: if case.fail_first {
                    Duration::ZERO
                } else {
                    BackoffPolicy::default().initial
                },
                streak_limit: None,
                ..BackoffPolicy::default()
            },
        );
    }
    let rt = builder.build().expect("valid settings");
    let ids: Vec<String> = (0..case.runs).map(|i| format!("run-{i:06}")).collect();
    // 64 submitters, so setting up does not take a flush per run.
    futures_util::stream::iter(ids.iter())
        .for_each_concurrent(64, |id| {
            let rt = rt.clone();
            async move {
                rt.submit(RunSpec {
                    run_id: Some(id.clone()),
                    input: vec![7; 64],
                    ..Default::default()
                })
                .await
                .expect("submit");
            }
        })
        .await;
    let before = counting.snapshot();
    let started = Instant::now();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let rt = rt.clone();
        let stop = stop.clone();
        async move { rt.run(stop.cancelled_owned()).await }
    });
    for id in &ids {
        let out = rt.wait(id).await.expect("wait");
        assert_eq!(out.status, TerminalStatus::Succeeded, "{id}: {out:?}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let counts = counting.snapshot() - before;
    stop.cancel();
    worker.await.expect("worker task").expect("worker");
    drop(rt);
    if let Ok(queue) = Arc::try_unwrap(queue) {
        queue.close().await.expect("close");
    }
    let steps = (case.runs as u64 * case.steps as u64) as f64;
    Measured {
        steps_per_sec: steps / elapsed,
        commits_per_run: counts.awaited_commits() as f64 / case.runs as f64,
        commits_per_step: counts.awaited_commits() as f64 / steps,
    }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let counting = counters::install();
    let started = Instant::now();
    let runs = if quick { 400 } else { 4_000 };

    println!("### breaker: runs of 5 steps at concurrency 64, memory store");
    println!();
    println!(
        "| flush | no policy steps/s | breaker policy steps/s | ratio | awaited commits per step (no policy / policy) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for flush in [Duration::from_millis(1), Duration::from_millis(10)] {
        let (mut off, mut on) = (Vec::new(), Vec::new());
        // Alternate, so drift on a shared machine hits both sides.
        for _ in 0..2 {
            for breaker in [false, true] {
                let case = Case {
                    flush,
                    runs,
                    steps: 5,
                    fail_first: false,
                    breaker,
                };
                let m = measure(counting, &case).await;
                if breaker { &mut on } else { &mut off }.push(m);
            }
        }
        let mean =
            |v: &[Measured], f: fn(&Measured) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
        let (off_rate, on_rate) = (
            mean(&off, |m| m.steps_per_sec),
            mean(&on, |m| m.steps_per_sec),
        );
        println!(
            "| {} ms | {off_rate:.0} | {on_rate:.0} | {:.2} | {:.2} / {:.2} |",
            flush.as_millis(),
            on_rate / off_rate,
            mean(&off, |m| m.commits_per_step),
            mean(&on, |m| m.commits_per_step),
        );
        println!(
            "BENCH {{\"scenario\":\"breaker\",\"flush_ms\":{},\"no_policy\":{off_rate:.1},\"policy\":{on_rate:.1}}}",
            flush.as_millis()
        );
    }

    println!();
    println!("### failing: awaited commits per one-step run, 10 ms flush");
    println!();
    println!(
        "| breaker policy | succeeds at once | fails once, then succeeds | commits per failing attempt |"
    );
    println!("|---|---:|---:|---:|");
    for breaker in [false, true] {
        let mut per_run = [0.0; 2];
        for (i, fail_first) in [false, true].into_iter().enumerate() {
            let case = Case {
                flush: Duration::from_millis(10),
                runs: runs / 4,
                steps: 1,
                fail_first,
                breaker,
            };
            per_run[i] = measure(counting, &case).await.commits_per_run;
        }
        println!(
            "| {} | {:.2} | {:.2} | {:.2} |",
            if breaker { "yes" } else { "no" },
            per_run[0],
            per_run[1],
            per_run[1] - per_run[0]
        );
        println!(
            "BENCH {{\"scenario\":\"failing\",\"breaker\":{breaker},\"commits_per_run_ok\":{:.3},\"commits_per_run_fail_once\":{:.3}}}",
            per_run[0], per_run[1]
        );
    }
    println!();
    println!(
        "Finished in {:.1} s ({} mode).",
        started.elapsed().as_secs_f64(),
        if quick { "quick" } else { "full" }
    );
}
