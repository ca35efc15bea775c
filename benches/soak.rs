//! Soak: sustained load on a local-disk store, to show that memory, disk,
//! the retention backlog and throughput level off.
//!
//! ```text
//! cargo bench --bench soak              # full run: 10 minutes, a row every 30 s
//! cargo bench --bench soak -- --quick   # smoke run, < 1 minute: checks completion
//! cargo bench --bench soak -- --secs 1500 # a longer full run
//! ```
//!
//! Load: a closed loop keeps `IN_FLIGHT` runs of three steps in flight (a new
//! run is submitted as the terminal hook reports one ended), so the rate is
//! the highest the machine gives. A local-disk store opened as a worker opens
//! it (`open_worker_store`: inbox, heartbeat, and Waymark's garbage
//! collector, a pass a minute), 10 ms WAL flush, a short
//! `terminal_retention` and dead-letter retention, a terminal hook. Two
//! workflows: `plain` (1 run in 20 fails for good at step 1, 1 in 20 fails
//! once and retries) and `guarded`, with a circuit breaker, whose step
//! attempts fail transiently 1 time in 30.
//!
//! Each row: elapsed time, runs ended per second over the interval, RSS
//! (`VmRSS`), the heap in use (glibc's `mallinfo2`: bytes allocated and not
//! freed, which can grow inside memory the allocator already holds while
//! RSS stays flat), the store's size on disk and its WAL's share, the live data
//! (every key-value record, its count and bytes; the jobs not done, dead
//! ones included), the outcome records retained and how far the oldest is
//! past its expiry (the retention backlog), and the tally entries not yet
//! folded into the health records. At the end: how long `run` took to
//! return after its shutdown future resolved.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use taquba::object_store::local::LocalFileSystem;
use taquba::{KvOrder, Queue};
use tokio::sync::{Notify, Semaphore};
use waymark::{
    BackoffPolicy, RetryPolicy, RunOutcome, RunSpec, Step, StepError, StepOutcome, StepRunner,
    StoreLocation, StoreOptions, TerminalHook, WorkflowRuntime, open_worker_store,
};

const QUEUE: &str = "soak";
const STEPS: u32 = 3;
const IN_FLIGHT: usize = 1024;
const SUBMITTERS: usize = 8;
/// The live key-value data is counted on every this many rows.
const LIVE_EVERY: usize = 10;
/// How long the dead-lettered step jobs of failed runs are kept. With the
/// queue's default (7 days) they pile up for the whole soak: ~30 a second
/// here, and taquba's retention sweep reads them all every 5 s.
const DEAD_RETENTION: Duration = Duration::from_secs(60);

struct Mode {
    duration: Duration,
    every: Duration,
    retention: Duration,
}

/// Three steps; failures decided by the run's sequence number.
struct Runner;

impl StepRunner for Runner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let n: u64 = step
            .headers
            .get("n")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if step.workflow == "guarded" {
            if (n + u64::from(step.step_number) * 7 + u64::from(step.attempts)).is_multiple_of(30) {
                return Err(StepError::transient("guarded dependency hiccup"));
            }
        } else if step.step_number == 1 {
            if n % 20 == 3 {
                return Err(StepError::permanent("bad input"));
            }
            if n % 20 == 7 && step.attempts == 1 {
                return Err(StepError::transient("retry me"));
            }
        }
        Ok(if step.step_number + 1 < STEPS {
            StepOutcome::Continue {
                payload: step.payload.clone(),
            }
        } else {
            StepOutcome::Succeed {
                result: step.payload.clone(),
            }
        })
    }
}

/// Counts ended runs and frees a slot of the load loop for each.
#[derive(Clone)]
struct Hook {
    ended: Arc<AtomicU64>,
    slots: Arc<Semaphore>,
}

impl TerminalHook for Hook {
    async fn on_termination(&self, _outcome: &RunOutcome) -> Result<(), StepError> {
        self.ended.fetch_add(1, Ordering::Relaxed);
        self.slots.add_permits(1);
        Ok(())
    }
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The bytes allocated and not yet freed, by glibc's count (main arena,
/// the other arenas and mmapped blocks); `None` on another C library.
fn heap_in_use_mib() -> Option<f64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallinfo2` only reads the allocator's counters.
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks + info.hblkhd) as f64 / (1024.0 * 1024.0))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Call `each` with every KV entry whose key starts with `prefix`, reading
/// pages of 4,096.
async fn for_each_kv(queue: &Queue, prefix: &[u8], mut each: impl FnMut(&[u8], &[u8])) {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let start = after
            .take()
            .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let range = (start, std::ops::Bound::<Vec<u8>>::Unbounded);
        let page = queue
            .view()
            .kv_scan(prefix, range, KvOrder::Ascending, 4096)
            .await
            .expect("scan");
        for (key, value) in &page.entries {
            each(key, value);
        }
        if !page.more {
            return;
        }
        after = page.entries.last().map(|(key, _)| key.clone());
    }
}

/// How many KV keys start with `prefix`, and the first one.
async fn count_keys(queue: &Queue, prefix: &[u8]) -> (u64, Option<Vec<u8>>) {
    let (mut n, mut first) = (0, None);
    for_each_kv(queue, prefix, |key, _| {
        n += 1;
        first.get_or_insert_with(|| key.to_vec());
    })
    .await;
    (n, first)
}

struct Row {
    elapsed: f64,
    rate: f64,
    rss: f64,
    heap: Option<f64>,
    disk: f64,
}

#[tokio::main]
async fn main() {
    // The runtime's warnings (a slow maintenance tick, a slow store) go to
    // stderr, beside the table.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let secs = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .map(|s| {
            s.parse::<u64>()
                .expect("--secs takes a whole number of seconds")
        });
    let mode = if quick {
        Mode {
            duration: Duration::from_secs(40),
            every: Duration::from_secs(10),
            retention: Duration::from_secs(10),
        }
    } else {
        Mode {
            duration: Duration::from_secs(secs.unwrap_or(600)),
            every: Duration::from_secs(30),
            retention: Duration::from_secs(30),
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(LocalFileSystem::new_with_prefix(dir.path()).expect("local store"));
    // A worker's store as a service opens it: inbox, heartbeat, and
    // Waymark's garbage collector (a pass a minute).
    let location = StoreLocation::new(store, "soak");
    let options = StoreOptions::default()
        .queue_name(QUEUE)
        .flush_interval(Duration::from_millis(10))
        .dead_retention(DEAD_RETENTION);
    let queue = open_worker_store(&location, options)
        .await
        .expect("open the store");
    let ended = Arc::new(AtomicU64::new(0));
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let hook = Hook {
        ended: ended.clone(),
        slots: slots.clone(),
    };
    let rt = WorkflowRuntime::builder(queue.clone(), Runner, hook)
        .queue_name(QUEUE)
        .max_concurrent_steps(64)
        .terminal_retention(mode.retention)
        .default_retry_policy(RetryPolicy {
            initial: Duration::from_millis(50),
            ..RetryPolicy::default()
        })
        .breaker(
            "guarded",
            BackoffPolicy {
                initial: Duration::from_millis(10),
                multiplier: 2.0,
                max_delay: Duration::from_millis(200),
                jitter: 0.2,
                streak_limit: Some(8),
                probe_after: Some(Duration::from_secs(1)),
            },
        )
        .build()
        .expect("runtime");
    let shutdown = Arc::new(Notify::new());
    let worker = tokio::spawn({
        let (rt, shutdown) = (rt.clone(), shutdown.clone());
        async move { rt.run(shutdown.notified()).await }
    });

    let next = Arc::new(AtomicU64::new(0));
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|_| {
            let (rt, slots, next) = (rt.clone(), slots.clone(), next.clone());
            tokio::spawn(async move {
                while let Ok(permit) = slots.acquire().await {
                    permit.forget();
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let workflow = if n % 4 == 0 { "guarded" } else { "plain" };
                    let spec = RunSpec {
                        input: n.to_le_bytes().to_vec(),
                        headers: [("n".to_string(), n.to_string())].into(),
                        workflow: Some(workflow.to_string()),
                        ..Default::default()
                    };
                    rt.submit(spec).await.expect("submit");
                }
            })
        })
        .collect();

    println!(
        "soak ({}): local-disk store, 10 ms flush, terminal_retention {:?}, dead_retention {DEAD_RETENTION:?}, {IN_FLIGHT} runs in flight, concurrency 64, {STEPS} steps per run, {:?}",
        if quick { "quick" } else { "full" },
        mode.retention,
        mode.duration,
    );
    println!();
    println!(
        "| elapsed s | runs ended/s | RSS MiB | heap in use MiB | store on disk MiB | of it WAL MiB | live KV keys | live KV MiB | jobs not done | outcomes retained | oldest past expiry s | unfolded tallies |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let start = Instant::now();
    let retention_ms = mode.retention.as_millis() as u64;
    let out_prefix = format!("wm/{QUEUE}/out/").into_bytes();
    let exp_prefix = format!("wm/{QUEUE}/exp/").into_bytes();
    let tally_prefix = format!("wm/{QUEUE}/tally/").into_bytes();
    let mut rows = Vec::new();
    let mut last_ended = 0;
    let mut last_at = start;
    while start.elapsed() < mode.duration {
        tokio::time::sleep_until((last_at + mode.every).into()).await;
        let now = Instant::now();
        let total = ended.load(Ordering::Relaxed);
        let rate = (total - last_ended) as f64 / (now - last_at).as_secs_f64();
        (last_ended, last_at) = (total, now);
        let (outcomes, _) = count_keys(&queue, &out_prefix).await;
        let (_, oldest) = count_keys_first(&queue, &exp_prefix).await;
        let (tallies, _) = count_keys(&queue, &tally_prefix).await;
        // Reading every record is itself load (seconds of CPU at a few
        // hundred thousand keys): every tenth row only.
        let live = if rows.len() % LIVE_EVERY == 0 {
            let (keys, bytes) = live_kv(&queue).await;
            (
                keys.to_string(),
                format!("{:.1}", bytes as f64 / (1024.0 * 1024.0)),
            )
        } else {
            ("".to_string(), "".to_string())
        };
        let jobs = jobs_not_done(&queue).await;
        let clock_now = taquba::Clock::now_ms(&*queue.clock());
        let past = oldest
            .and_then(|k| {
                k.get(exp_prefix.len()..exp_prefix.len() + 8)
                    .map(<[u8]>::to_vec)
            })
            .and_then(|t| t.try_into().ok())
            .map(u64::from_be_bytes)
            .map_or(0.0, |at| {
                clock_now.saturating_sub(at.saturating_add(retention_ms)) as f64 / 1000.0
            });
        let row = Row {
            elapsed: start.elapsed().as_secs_f64(),
            rate,
            rss: rss_mib(),
            heap: heap_in_use_mib(),
            disk: dir_bytes(dir.path()) as f64 / (1024.0 * 1024.0),
        };
        println!(
            "| {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {} | {} | {jobs} | {outcomes} | {past:.1} | {tallies} |",
            row.elapsed,
            row.rate,
            row.rss,
            row.heap.map_or_else(|| "-".into(), |h| format!("{h:.0}")),
            row.disk,
            dir_bytes(&dir.path().join("soak").join("wal")) as f64 / (1024.0 * 1024.0),
            live.0,
            live.1,
        );
        rows.push(row);
        if worker.is_finished() {
            println!("\nthe worker pool stopped before the soak's end:");
            break;
        }
    }

    // Stop the load, then the pool; time the pool's shutdown.
    slots.close();
    for s in submitters {
        let _ = s.await;
    }
    let asked = Instant::now();
    shutdown.notify_one();
    let stopped = tokio::time::timeout(Duration::from_secs(600), worker)
        .await
        .expect("run() returns after shutdown")
        .expect("worker task");
    let shutdown_s = asked.elapsed().as_secs_f64();
    stopped.expect("run() ends cleanly");
    let total = ended.load(Ordering::Relaxed);
    println!();
    println!(
        "{total} runs ended in {:.0} s ({:.0}/s); shutdown took {shutdown_s:.2} s",
        start.elapsed().as_secs_f64(),
        total as f64 / start.elapsed().as_secs_f64()
    );
    assert!(total > 0, "no run ended");

    // Level-off checks over the rows after the first retention window (and
    // a row of warm-up): informative, not a pass/fail on a shared machine.
    let settled: Vec<&Row> = rows
        .iter()
        .filter(|r| r.elapsed > mode.retention.as_secs_f64() + mode.every.as_secs_f64())
        .collect();
    if let (Some(first), Some(last)) = (settled.first(), settled.last()) {
        let max = settled.iter().map(|r| r.rate).fold(f64::MIN, f64::max);
        let min = settled.iter().map(|r| r.rate).fold(f64::MAX, f64::min);
        let mean = settled.iter().map(|r| r.rate).sum::<f64>() / settled.len() as f64;
        println!(
            "after warm-up ({} rows): throughput {min:.0}..{max:.0} runs/s (mean {mean:.0}, spread {:+.1}% / {:+.1}%); RSS {:.0} -> {:.0} MiB; heap in use {} -> {} MiB; store {:.0} -> {:.0} MiB",
            settled.len(),
            (min / mean - 1.0) * 100.0,
            (max / mean - 1.0) * 100.0,
            first.rss,
            last.rss,
            first.heap.map_or_else(|| "-".into(), |h| format!("{h:.0}")),
            last.heap.map_or_else(|| "-".into(), |h| format!("{h:.0}")),
            first.disk,
            last.disk
        );
    }
}

/// Every key of the store's key-value space (Waymark's records: runs,
/// outcomes, history, tallies, health, ...) and the bytes of their keys and
/// values: the live data, against which the size on disk is SlateDB's
/// overhead (WAL, compaction inputs still referenced).
async fn live_kv(queue: &Queue) -> (u64, u64) {
    let (mut n, mut bytes) = (0, 0);
    for_each_kv(queue, b"", |key, value| {
        n += 1;
        bytes += (key.len() + value.len()) as u64;
    })
    .await;
    (n, bytes)
}

/// Jobs of the step and hook queues that are not done: pending, claimed,
/// scheduled (retry backoff, parked) and dead-lettered.
async fn jobs_not_done(queue: &Queue) -> i64 {
    let mut n = 0;
    for name in [QUEUE.to_string(), format!("{QUEUE}-hooks")] {
        let s = queue.view().stats(&name).await.expect("stats");
        n += s.pending + s.claimed + s.scheduled + s.dead;
    }
    n
}

/// The first key with `prefix` (and a count of at most one page).
async fn count_keys_first(queue: &Queue, prefix: &[u8]) -> (u64, Option<Vec<u8>>) {
    let page = queue
        .view()
        .kv_scan(prefix, .., KvOrder::Ascending, 1)
        .await
        .expect("scan");
    (
        page.entries.len() as u64,
        page.entries.first().map(|(k, _)| k.clone()),
    )
}
