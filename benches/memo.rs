//! What a memoized call costs a step, against a plain step in the same kind
//! of run.
//!
//! ```text
//! cargo bench --bench memo             # full (about half a minute)
//! cargo bench --bench memo -- --quick  # smoke run: checks completion
//! ```
//!
//! Runs of two steps, one at a time, on a memory store behind a counting
//! object store, at a 10 ms flush:
//!
//! - `plain`: both steps return at once;
//! - `first`: step 0 makes a memoized call (the closure runs and the value
//!   is memoized), step 1 is plain;
//! - `replayed`: as `first`, and step 1 makes the same run-scoped memoized
//!   call again, which finds the value (the closure does not run).
//!
//! - `objects`: as `first`, but the runner keeps the value the other way
//!   memo could live, as an object beside the store (a GET for a replay, a
//!   PUT), and retention removes it (a LIST of the run's prefix and a
//!   DELETE). It is not fenced: the object store has no transaction with
//!   the run record, so this is a lower bound of that design's cost.
//!
//! A memoized call's cost is the difference to the workload before it, per
//! run: awaited commits (SlateDB write batches that are not claims),
//! object-store PUTs (WAL objects), and KV reads (SlateDB gets). Commits are
//! counted through taquba's `metrics` feature, as in the `steps` benchmark;
//! object-store operations by a wrapper around the memory store. Each
//! workload runs one run at a time and then 16 at a time, where commits
//! share WAL flushes and object PUTs do not.
//!
//! A second table measures what keeping every step's input for a re-run
//! (`keep_step_inputs`, on by default) costs: runs of five steps with 1 KiB
//! payloads, 64 at a time, with and without it.

// Shared with the `steps` benchmark, which uses all of it.
#[allow(dead_code)]
#[path = "steps/counters.rs"]
mod counters;
// Shared with the `effects` benchmark.
#[allow(dead_code)]
#[path = "support/counted.rs"]
mod counted;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use counted::{Counted, Ops};
use taquba::object_store::memory::InMemory;
use taquba::object_store::path::Path;
use taquba::object_store::{self, ObjectStore, ObjectStoreExt, PutPayload};
use taquba::{OpenOptions, Queue};
use waymark::{
    NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner, WorkflowRuntime,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Plain,
    First,
    Replayed,
    Objects,
}

/// A "charge": a value the size of a typical receipt.
fn receipt() -> String {
    "ch_3PqR7sLkT2xYz9AbCdEfGhIj:succeeded:4200:EUR".to_string()
}

struct Runner {
    workload: Workload,
    /// Where the `objects` workload keeps its values.
    store: Arc<Counted>,
    /// Step payloads (the kept-inputs table).
    payload: usize,
}

/// The object a value memoized under `key` would be, for `run`.
fn memo_object(run: &str, key: &str) -> Path {
    Path::from(format!("memo/{run}/run/{key}"))
}

impl Runner {
    /// The `objects` placement: a GET (a replay finds the value), else the
    /// call and a PUT.
    async fn memoized_object(&self, run: &str) -> Result<String, StepError> {
        let at = memo_object(run, "charge");
        match self.store.get(&at).await {
            Ok(found) => {
                let bytes = found
                    .bytes()
                    .await
                    .map_err(|e| StepError::transient(e.to_string()))?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Err(object_store::Error::NotFound { .. }) => {
                let value = receipt();
                self.store
                    .put(&at, PutPayload::from(value.clone().into_bytes()))
                    .await
                    .map_err(|e| StepError::transient(e.to_string()))?;
                Ok(value)
            }
            Err(e) => Err(StepError::transient(e.to_string())),
        }
    }
}

impl StepRunner for Runner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        if self.workload == Workload::Objects && step.step_number == 0 {
            let value = self.memoized_object(&step.run_id).await?;
            debug_assert_eq!(value, receipt());
        }
        let memoize = match step.step_number {
            0 => matches!(self.workload, Workload::First | Workload::Replayed),
            _ => self.workload == Workload::Replayed,
        };
        if memoize {
            let value: String = step
                .run_memo
                .memoized("charge", || async { Ok::<_, StepError>(receipt()) })
                .await?;
            debug_assert_eq!(value, receipt());
        }
        Ok(if step.step_number + 1 < self.steps() {
            StepOutcome::Continue {
                payload: vec![7; self.payload],
            }
        } else {
            StepOutcome::Succeed { result: vec![] }
        })
    }
}

impl Runner {
    fn steps(&self) -> u32 {
        if self.payload > 0 { 5 } else { 2 }
    }
}

#[derive(Debug, Clone, Copy)]
struct Cost {
    commits: f64,
    wal_objects: f64,
    object_puts: f64,
    object_gets: f64,
    object_lists: f64,
    object_deletes: f64,
    kv_gets: f64,
    /// Bytes of objects written (WAL and SSTs).
    put_kib: f64,
    ms: f64,
    /// Steps per second (the kept-inputs table).
    steps_per_s: f64,
}

/// How a measurement runs.
#[derive(Clone, Copy)]
struct Shape {
    runs: usize,
    /// Runs in flight at once.
    at_once: usize,
    /// Step payload bytes (0: the two-step memo runs).
    payload: usize,
    keep_inputs: bool,
}

async fn measure(counting: &counters::Counting, workload: Workload, shape: Shape) -> Cost {
    let Shape {
        runs,
        at_once,
        payload,
        keep_inputs,
    } = shape;
    let ops = Arc::new(Ops::default());
    let store = Arc::new(Counted {
        inner: Arc::new(InMemory::new()),
        ops: ops.clone(),
    });
    let runner = Runner {
        workload,
        store: store.clone(),
        payload,
    };
    let steps = runner.steps();
    let opts = OpenOptions {
        flush_interval: Some(Duration::from_millis(10)),
        ..Default::default()
    };
    let queue = Arc::new(
        Queue::open_with_options(store.clone(), "bench", opts)
            .await
            .expect("open queue"),
    );
    let rt = WorkflowRuntime::builder(queue.clone(), runner, NoopTerminalHook)
        .poll_interval(Duration::from_millis(50))
        .max_concurrent_steps(64)
        .keep_step_inputs(keep_inputs)
        .build()
        .expect("valid settings");
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let rt = rt.clone();
        let stop = stop.clone();
        async move { rt.run(stop.cancelled_owned()).await }
    });
    // One warm-up run, then count.
    run_batch(&rt, "warm", 1, 1, payload).await;
    let snap = counting.snapshot();
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let before = [
        load(&ops.puts),
        load(&ops.gets),
        load(&ops.lists),
        load(&ops.deletes),
        load(&ops.put_bytes),
    ];
    let started = Instant::now();
    run_batch(&rt, "run", runs, at_once, payload).await;
    let elapsed = started.elapsed();
    if workload == Workload::Objects {
        // Retention of the objects placement: list each run's prefix and
        // delete what is there.
        for i in 0..runs {
            let prefix = Path::from(format!("memo/run-{i}"));
            let found: Vec<object_store::Result<Path>> = {
                use futures_util::StreamExt;
                store
                    .list(Some(&prefix))
                    .map(|m| m.map(|m| m.location))
                    .collect()
                    .await
            };
            let gone = {
                use futures_util::StreamExt;
                let found = futures_util::stream::iter(found).boxed();
                store.delete_stream(found).collect::<Vec<_>>().await
            };
            assert!(
                gone.iter().all(|g| g.is_ok()),
                "delete the run's memo objects"
            );
        }
    }
    let counts = counting.snapshot() - snap;
    let n = runs as f64;
    let per = |c: &AtomicU64, i: usize| (load(c) - before[i]) as f64 / n;
    let cost = Cost {
        commits: counts.awaited_commits() as f64 / n,
        wal_objects: counts.wal_flushes as f64 / n,
        object_puts: per(&ops.puts, 0),
        object_gets: per(&ops.gets, 1),
        object_lists: per(&ops.lists, 2),
        object_deletes: per(&ops.deletes, 3),
        kv_gets: counts.gets as f64 / n,
        put_kib: per(&ops.put_bytes, 4) / 1024.0,
        ms: elapsed.as_secs_f64() * 1000.0 / n * at_once as f64,
        steps_per_s: (runs as f64 * f64::from(steps)) / elapsed.as_secs_f64(),
    };
    stop.cancel();
    worker.await.expect("worker task").expect("worker");
    drop(rt);
    if let Ok(queue) = Arc::try_unwrap(queue) {
        queue.close().await.expect("close");
    }
    cost
}

/// Submit `runs` runs named `{prefix}-{i}`, `at_once` in flight, and wait
/// for each to succeed.
async fn run_batch<R: StepRunner>(
    rt: &WorkflowRuntime<R, NoopTerminalHook>,
    prefix: &str,
    runs: usize,
    at_once: usize,
    payload: usize,
) {
    use futures_util::StreamExt;
    futures_util::stream::iter(0..runs)
        .for_each_concurrent(at_once, |i| async move {
            let run = rt
                .submit(RunSpec {
                    run_id: Some(format!("{prefix}-{i}")),
                    input: vec![7; payload],
                    ..Default::default()
                })
                .await
                .expect("submit");
            let out = rt.wait(&run.run_id).await.expect("wait");
            assert_eq!(out.status, waymark::TerminalStatus::Succeeded, "{out:?}");
        })
        .await;
}

fn row(name: &str, c: Cost) {
    println!(
        "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} ms |",
        c.commits,
        c.wal_objects,
        c.object_puts,
        c.object_gets,
        c.object_lists,
        c.object_deletes,
        c.kv_gets,
        c.ms
    );
}

fn minus(a: Cost, b: Cost) -> Cost {
    Cost {
        commits: a.commits - b.commits,
        wal_objects: a.wal_objects - b.wal_objects,
        object_puts: a.object_puts - b.object_puts,
        object_gets: a.object_gets - b.object_gets,
        object_lists: a.object_lists - b.object_lists,
        object_deletes: a.object_deletes - b.object_deletes,
        kv_gets: a.kv_gets - b.kv_gets,
        put_kib: a.put_kib - b.put_kib,
        ms: a.ms - b.ms,
        steps_per_s: a.steps_per_s - b.steps_per_s,
    }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let counting = counters::install();
    let started = Instant::now();
    let runs = if quick { 20 } else { 300 };

    let mut json = Vec::new();
    for at_once in [1, 16] {
        let shape = Shape {
            runs,
            at_once,
            payload: 0,
            keep_inputs: true,
        };
        let plain = measure(counting, Workload::Plain, shape).await;
        let first = measure(counting, Workload::First, shape).await;
        let replayed = measure(counting, Workload::Replayed, shape).await;
        let objects = measure(counting, Workload::Objects, shape).await;

        println!("### memo: memory store, 10 ms flush, {runs} two-step runs, {at_once} at a time");
        println!();
        println!(
            "| per run / per call | awaited commits | WAL objects | object PUTs | object GETs | object LISTs | object DELETEs | KV reads | time per run |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        row("plain run (2 steps, submit included)", plain);
        row("run with a first memoized call", first);
        row("run with a first and a replayed call", replayed);
        row("run with the value kept as an object", objects);
        let call = minus(first, plain);
        let again = minus(replayed, first);
        let object = minus(objects, plain);
        row("memoized call, first (difference)", call);
        row("memoized call, replayed (difference)", again);
        row(
            "object placement, first call and retention (difference)",
            object,
        );
        println!();
        json.push(format!(
            "\"c{at_once}\":{{\"first_commits\":{:.3},\"first_puts\":{:.3},\"replayed_commits\":{:.3},\"replayed_puts\":{:.3},\"first_ms\":{:.2},\"object_puts\":{:.3},\"object_requests\":{:.3}}}",
            call.commits,
            call.object_puts,
            again.commits,
            again.object_puts,
            call.ms,
            object.object_puts,
            object.object_puts + object.object_gets + object.object_lists + object.object_deletes
        ));
    }

    let kept_runs = if quick { 64 } else { 2000 };
    println!(
        "### kept step inputs: memory store, 10 ms flush, {kept_runs} five-step runs with 1 KiB payloads, 64 at a time"
    );
    println!();
    println!(
        "| keep_step_inputs | steps/s | awaited commits per run | object PUTs per run | KiB written per run |"
    );
    println!("|---|---:|---:|---:|---:|");
    let mut kept = Vec::new();
    for keep_inputs in [false, true] {
        let shape = Shape {
            runs: kept_runs,
            at_once: 64,
            payload: 1024,
            keep_inputs,
        };
        let c = measure(counting, Workload::Plain, shape).await;
        println!(
            "| {keep_inputs} | {:.0} | {:.2} | {:.2} | {:.1} |",
            c.steps_per_s, c.commits, c.object_puts, c.put_kib
        );
        kept.push(c);
    }
    println!();
    json.push(format!(
        "\"kept_inputs\":{{\"steps_per_s_ratio\":{:.3},\"kib_ratio\":{:.3}}}",
        kept[1].steps_per_s / kept[0].steps_per_s,
        kept[1].put_kib / kept[0].put_kib
    ));
    println!("BENCH {{\"scenario\":\"memo\",{}}}", json.join(","));
    println!();
    println!(
        "Finished in {:.1} s ({} mode).",
        started.elapsed().as_secs_f64(),
        if quick { "quick" } else { "full" }
    );
}
