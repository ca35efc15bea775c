//! What staged effects cost: a step that stages 4 KV puts against a plain
//! step, in the same run.
//!
//! ```text
//! cargo bench --bench effects             # full: 400 steps
//! cargo bench --bench effects -- --quick  # smoke run: 40 steps
//! ```
//!
//! One run, one worker slot, on a memory store at a 1 ms flush: its steps
//! alternate between a plain step and a step that stages 4 KV puts of 100
//! bytes (both `Continue`). Each step, when it starts, snapshots the
//! counters: the difference between two starts is the cost of the step in
//! between (its settlement, and the claim of the next step), charged to that
//! step's kind. Awaited commits = SlateDB write batches − claim batches
//! (taquba's `metrics` feature, as in the `steps` benchmark); object-store
//! operations are counted by a wrapper around the store (puts, gets, lists,
//! deletes, and the bytes put). The maintenance tick is set to an hour so
//! it adds nothing.

// Shared with the `memo` benchmark.
#[path = "support/counted.rs"]
mod counted;
// Shared with the `steps` benchmark, which uses all of it.
#[allow(dead_code)]
#[path = "steps/counters.rs"]
mod counters;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use counted::{Counted, Ops, OpsSnapshot};
use taquba::object_store::memory::InMemory;
use taquba::{OpenOptions, Queue};
use waymark::{
    NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner, WorkflowRuntime,
};

/// Counters at one step's start.
#[derive(Clone, Copy)]
struct Mark {
    commits: u64,
    batches: u64,
    ops: OpsSnapshot,
}

/// Per kind (0 plain, 1 with 4 puts): steps and summed costs.
#[derive(Default, Clone, Copy)]
struct Cost {
    steps: u64,
    commits: u64,
    batches: u64,
    puts: u64,
    put_bytes: u64,
    gets: u64,
    lists: u64,
    deletes: u64,
}

struct Bench {
    counting: &'static counters::Counting,
    ops: Arc<Ops>,
    steps: u32,
    last: Mutex<Option<(u32, Mark)>>,
    costs: Mutex<[Cost; 2]>,
}

impl Bench {
    fn mark(&self) -> Mark {
        let c = self.counting.snapshot();
        Mark {
            commits: c.awaited_commits(),
            batches: c.write_batches,
            ops: self.ops.snapshot(),
        }
    }
}

#[derive(Clone)]
struct Runner(Arc<Bench>);

impl StepRunner for Runner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let b = &self.0;
        let now = b.mark();
        if let Some((prev, at)) = b.last.lock().unwrap().replace((step.step_number, now)) {
            let mut costs = b.costs.lock().unwrap();
            let c = &mut costs[(prev % 2) as usize];
            c.steps += 1;
            c.commits += now.commits - at.commits;
            c.batches += now.batches - at.batches;
            c.puts += now.ops.puts - at.ops.puts;
            c.put_bytes += now.ops.put_bytes - at.ops.put_bytes;
            c.gets += now.ops.gets - at.ops.gets;
            c.lists += now.ops.lists - at.ops.lists;
            c.deletes += now.ops.deletes - at.ops.deletes;
        }
        if step.step_number % 2 == 1 {
            for i in 0..4 {
                let key = format!("app/{}/{i}", step.step_number);
                step.effects()
                    .put(key, vec![b'v'; 100])
                    .map_err(|e| StepError::permanent(e.to_string()))?;
            }
        }
        Ok(if step.step_number + 1 < b.steps {
            StepOutcome::Continue {
                payload: step.payload.clone(),
            }
        } else {
            StepOutcome::Succeed { result: vec![] }
        })
    }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let counting = counters::install();
    let steps: u32 = if quick { 40 } else { 400 };
    let ops = Arc::new(Ops::default());
    let store = Arc::new(Counted {
        inner: Arc::new(InMemory::new()),
        ops: ops.clone(),
    });
    let opts = OpenOptions {
        flush_interval: Some(Duration::from_millis(1)),
        ..Default::default()
    };
    let queue = Arc::new(
        Queue::open_with_options(store, "bench", opts)
            .await
            .expect("open queue"),
    );
    let bench = Arc::new(Bench {
        counting,
        ops,
        steps,
        last: Mutex::new(None),
        costs: Mutex::new([Cost::default(); 2]),
    });
    let rt = WorkflowRuntime::builder(queue.clone(), Runner(bench.clone()), NoopTerminalHook)
        .max_concurrent_steps(1)
        .poll_interval(Duration::from_secs(3600))
        // `WAYMARK_BENCH_STEP_HISTORY=0` measures a step without its
        // history entry.
        .step_history(
            std::env::var("WAYMARK_BENCH_STEP_HISTORY")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(waymark::DEFAULT_HISTORY_ENTRIES),
        )
        .build()
        .expect("valid settings");
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let rt = rt.clone();
        let stop = stop.clone();
        async move { rt.run(stop.cancelled_owned()).await }
    });
    let started = Instant::now();
    let run = rt
        .submit(RunSpec {
            run_id: Some("effects".into()),
            input: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .expect("submit");
    let out = rt.wait(&run.run_id).await.expect("wait");
    assert_eq!(out.status, waymark::TerminalStatus::Succeeded, "{out:?}");
    let elapsed = started.elapsed();
    // Every staged put committed.
    for n in (1..steps).step_by(2) {
        let v = queue
            .view()
            .kv_get(format!("app/{n}/3").as_bytes())
            .await
            .expect("read");
        assert!(v.is_some(), "step {n}'s puts committed");
    }
    stop.cancel();
    worker.await.expect("worker task").expect("worker");
    let costs = *bench.costs.lock().unwrap();

    println!("### effects: one run of {steps} steps, memory store, 1 ms flush");
    println!();
    println!(
        "| step | steps | awaited commits | write batches | object puts | bytes put | object gets | lists | deletes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, c) in [("plain", costs[0]), ("4 staged KV puts", costs[1])] {
        let per = |v: u64| v as f64 / c.steps.max(1) as f64;
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} |",
            c.steps,
            per(c.commits),
            per(c.batches),
            per(c.puts),
            per(c.put_bytes),
            per(c.gets),
            per(c.lists),
            per(c.deletes)
        );
        println!(
            "BENCH {{\"step\":\"{name}\",\"commits_per_step\":{:.3},\"object_puts_per_step\":{:.3},\"bytes_put_per_step\":{:.0},\"object_gets_per_step\":{:.3}}}",
            per(c.commits),
            per(c.puts),
            per(c.put_bytes),
            per(c.gets)
        );
    }
    println!();
    println!("({:.2} s)", elapsed.as_secs_f64());
}
