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
//! A memoized call's cost is the difference to the workload before it, per
//! run: awaited commits (SlateDB write batches that are not claims),
//! object-store PUTs (WAL objects), and KV reads (SlateDB gets). Commits are
//! counted through taquba's `metrics` feature, as in the `steps` benchmark;
//! object-store operations by a wrapper around the memory store.

// Shared with the `steps` benchmark, which uses all of it.
#[allow(dead_code)]
#[path = "steps/counters.rs"]
mod counters;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::BoxStream;
use taquba::object_store::memory::InMemory;
use taquba::object_store::path::Path;
use taquba::object_store::{
    self, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use taquba::{OpenOptions, Queue};
use waymark::{
    NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner, WorkflowRuntime,
};

/// Counts the object-store operations that go through it.
#[derive(Debug, Default)]
struct Ops {
    puts: AtomicU64,
    gets: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
}

#[derive(Debug)]
struct CountingStore {
    inner: InMemory,
    ops: Arc<Ops>,
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CountingStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.ops.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.ops.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.ops.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.ops.deletes.fetch_add(1, Ordering::Relaxed);
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.ops.lists.fetch_add(1, Ordering::Relaxed);
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.ops.lists.fetch_add(1, Ordering::Relaxed);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.ops.puts.fetch_add(1, Ordering::Relaxed);
        self.inner.copy_opts(from, to, options).await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Plain,
    First,
    Replayed,
}

/// A "charge": a value the size of a typical receipt.
fn receipt() -> String {
    "ch_3PqR7sLkT2xYz9AbCdEfGhIj:succeeded:4200:EUR".to_string()
}

struct Runner(Workload);

impl StepRunner for Runner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let memoize = match step.step_number {
            0 => self.0 != Workload::Plain,
            _ => self.0 == Workload::Replayed,
        };
        if memoize {
            let value: String = step
                .run_memo
                .memoized("charge", || async { Ok::<_, StepError>(receipt()) })
                .await?;
            debug_assert_eq!(value, receipt());
        }
        Ok(match step.step_number {
            0 => StepOutcome::Continue { payload: vec![] },
            _ => StepOutcome::Succeed { result: vec![] },
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Cost {
    commits: f64,
    wal_objects: f64,
    object_puts: f64,
    object_gets: f64,
    kv_gets: f64,
    ms: f64,
}

async fn measure(counting: &counters::Counting, workload: Workload, runs: usize) -> Cost {
    let ops = Arc::new(Ops::default());
    let store = Arc::new(CountingStore {
        inner: InMemory::new(),
        ops: ops.clone(),
    });
    let opts = OpenOptions {
        flush_interval: Some(Duration::from_millis(10)),
        ..Default::default()
    };
    let queue = Arc::new(
        Queue::open_with_options(store, "bench", opts)
            .await
            .expect("open queue"),
    );
    let rt = WorkflowRuntime::builder(queue.clone(), Runner(workload), NoopTerminalHook)
        .poll_interval(Duration::from_millis(50))
        .build()
        .expect("valid settings");
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let rt = rt.clone();
        let stop = stop.clone();
        async move { rt.run(stop.cancelled_owned()).await }
    });
    // One warm-up run, then count.
    let mut total = Duration::ZERO;
    let mut before = None;
    for i in 0..=runs {
        if i == 1 {
            before = Some((
                counting.snapshot(),
                ops.puts.load(Ordering::Relaxed),
                ops.gets.load(Ordering::Relaxed),
            ));
        }
        let started = Instant::now();
        let run = rt
            .submit(RunSpec {
                run_id: Some(format!("run-{i}")),
                ..Default::default()
            })
            .await
            .expect("submit");
        let out = rt.wait(&run.run_id).await.expect("wait");
        assert_eq!(out.status, waymark::TerminalStatus::Succeeded, "{out:?}");
        if i > 0 {
            total += started.elapsed();
        }
    }
    let (snap, puts, gets) = before.expect("at least one counted run");
    let counts = counting.snapshot() - snap;
    let n = runs as f64;
    let cost = Cost {
        commits: counts.awaited_commits() as f64 / n,
        wal_objects: counts.wal_flushes as f64 / n,
        object_puts: (ops.puts.load(Ordering::Relaxed) - puts) as f64 / n,
        object_gets: (ops.gets.load(Ordering::Relaxed) - gets) as f64 / n,
        kv_gets: counts.gets as f64 / n,
        ms: total.as_secs_f64() * 1000.0 / n,
    };
    stop.cancel();
    worker.await.expect("worker task").expect("worker");
    drop(rt);
    if let Ok(queue) = Arc::try_unwrap(queue) {
        queue.close().await.expect("close");
    }
    cost
}

fn row(name: &str, c: Cost) {
    println!(
        "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} ms |",
        c.commits, c.wal_objects, c.object_puts, c.object_gets, c.kv_gets, c.ms
    );
}

fn minus(a: Cost, b: Cost) -> Cost {
    Cost {
        commits: a.commits - b.commits,
        wal_objects: a.wal_objects - b.wal_objects,
        object_puts: a.object_puts - b.object_puts,
        object_gets: a.object_gets - b.object_gets,
        kv_gets: a.kv_gets - b.kv_gets,
        ms: a.ms - b.ms,
    }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let counting = counters::install();
    let started = Instant::now();
    let runs = if quick { 20 } else { 300 };

    let plain = measure(counting, Workload::Plain, runs).await;
    let first = measure(counting, Workload::First, runs).await;
    let replayed = measure(counting, Workload::Replayed, runs).await;

    println!("### memo: memory store, 10 ms flush, {runs} two-step runs one at a time");
    println!();
    println!(
        "| per run / per call | awaited commits | WAL objects | object PUTs | object GETs | KV reads | time |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    row("plain run (2 steps, submit included)", plain);
    row("run with a first memoized call", first);
    row("run with a first and a replayed call", replayed);
    row("memoized call, first (difference)", minus(first, plain));
    row(
        "memoized call, replayed (difference)",
        minus(replayed, first),
    );
    let call = minus(first, plain);
    let again = minus(replayed, first);
    println!(
        "BENCH {{\"scenario\":\"memo\",\"first_commits\":{:.3},\"first_puts\":{:.3},\"replayed_commits\":{:.3},\"replayed_puts\":{:.3},\"first_ms\":{:.2}}}",
        call.commits, call.object_puts, again.commits, again.object_puts, call.ms
    );
    println!();
    println!(
        "Finished in {:.1} s ({} mode).",
        started.elapsed().as_secs_f64(),
        if quick { "quick" } else { "full" }
    );
}
