//! The honest instruments: a counting `metrics` recorder (taquba's `metrics`
//! feature forwards its own counters and SlateDB's storage counters to it),
//! a counting allocator, and the process's peak RSS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{
    Counter, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Label, Metadata, Recorder,
    SharedString, Unit,
};

/// SlateDB: every write batch handed to the writer. A transaction commit is
/// one write batch, awaited or not.
pub const WRITE_BATCHES: &str = "slatedb.db.write_batch_count";
/// SlateDB: WAL buffers written to the object store (one object each).
pub const WAL_FLUSHES: &str = "slatedb.wal.wal_buffer_flushes";
/// SlateDB: read requests, labelled `op` = get / scan / flush.
pub const REQUESTS: &str = "slatedb.db.request_count";
/// SlateDB: object-store requests, labelled `component` (db, compactor, gc,
/// ...) and `op` (get / put).
pub const STORE_REQUESTS: &str = "slatedb.object_store.request_count";
/// SlateDB: block-cache lookups, labelled `entry_kind` and `result`.
pub const CACHE_ACCESS: &str = "slatedb.db_cache.access_count";
/// SlateDB: writes held back because L0 was full.
pub const L0_STALLS: &str = "slatedb.db.l0_stall_count";
/// taquba: a claim batch's transaction (committed without awaiting the WAL).
pub const CLAIM_SECONDS: &str = "taquba_claim_duration_seconds";
/// taquba: an ack's transaction, from the call to the durable commit.
pub const ACK_SECONDS: &str = "taquba_ack_duration_seconds";
/// taquba: acks, by queue.
pub const COMPLETED: &str = "taquba_jobs_completed_total";
/// SlateDB: L0 SSTs in the manifest now (a gauge).
pub const L0_SSTS: &str = "slatedb.db.l0_sst_count";
/// SlateDB: sorted runs below L0 now (a gauge).
pub const SORTED_RUNS: &str = "slatedb.db.sorted_run_count";

/// A histogram that counts and sums its samples and, for the ack latency,
/// keeps them.
struct Samples {
    count: AtomicU64,
    /// The samples' sum, in microseconds (the histograms here are seconds).
    sum_us: AtomicU64,
    values: Option<Mutex<Vec<f64>>>,
}

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        if let Some(values) = &self.values {
            values.lock().unwrap().push(value);
        }
    }
}

/// A gauge's value and the highest value it took since the last
/// [`Counting::reset_gauge_maxima`] (both as `f64` bits).
#[derive(Default)]
struct Level {
    now: AtomicU64,
    max: AtomicU64,
}

impl Level {
    fn update(&self, f: impl Fn(f64) -> f64) {
        let mut value = 0.0;
        let _ = self
            .now
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                value = f(f64::from_bits(bits));
                Some(value.to_bits())
            });
        let _ = self
            .max
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                (value > f64::from_bits(bits)).then_some(value.to_bits())
            });
    }
}

impl GaugeFn for Level {
    fn increment(&self, value: f64) {
        self.update(|now| now + value);
    }
    fn decrement(&self, value: f64) {
        self.update(|now| now - value);
    }
    fn set(&self, value: f64) {
        self.update(|_| value);
    }
}

#[derive(Default)]
struct Maps {
    counters: HashMap<Key, Arc<AtomicU64>>,
    histograms: HashMap<Key, Arc<Samples>>,
    gauges: HashMap<Key, Arc<Level>>,
}

/// Counts every counter and histogram the process emits, by name and labels.
#[derive(Clone, Default)]
pub struct Counting {
    maps: Arc<Mutex<Maps>>,
}

impl Counting {
    fn counter_cell(&self, key: &Key) -> Arc<AtomicU64> {
        let mut maps = self.maps.lock().unwrap();
        if let Some(cell) = maps.counters.get(key) {
            return cell.clone();
        }
        let cell = Arc::new(AtomicU64::new(0));
        maps.counters.insert(key.clone(), cell.clone());
        cell
    }

    fn histogram_cell(&self, key: &Key) -> Arc<Samples> {
        let mut maps = self.maps.lock().unwrap();
        if let Some(cell) = maps.histograms.get(key) {
            return cell.clone();
        }
        let keep = key.name() == ACK_SECONDS;
        let cell = Arc::new(Samples {
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            values: keep.then(|| Mutex::new(Vec::new())),
        });
        maps.histograms.insert(key.clone(), cell.clone());
        cell
    }

    /// The live cell of `taquba_jobs_completed_total{queue}`: acks on that
    /// queue. Read without a lock, so it can be polled.
    pub fn completed(&self, queue: &str) -> Arc<AtomicU64> {
        let key = Key::from_parts(COMPLETED, vec![Label::new("queue", queue.to_string())]);
        self.counter_cell(&key)
    }

    /// The sum of a counter over all its label sets that contain `label`.
    fn counter_sum(&self, name: &str, label: Option<(&str, &str)>) -> u64 {
        self.counter_sum_all(name, label.as_slice())
    }

    /// The sum of a counter over all its label sets that contain every one
    /// of `labels`.
    fn counter_sum_all(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let maps = self.maps.lock().unwrap();
        maps.counters
            .iter()
            .filter(|(k, _)| k.name() == name && labels.iter().all(|l| has_label(k, Some(*l))))
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }

    /// One total over every histogram named `name`: `of` picks what to add
    /// (its sample count, or its sum).
    fn histogram_total(&self, name: &str, of: impl Fn(&Samples) -> &AtomicU64) -> u64 {
        let maps = self.maps.lock().unwrap();
        maps.histograms
            .iter()
            .filter(|(k, _)| k.name() == name)
            .map(|(_, h)| of(h).load(Ordering::Relaxed))
            .sum()
    }

    fn gauge_cell(&self, key: &Key) -> Arc<Level> {
        let mut maps = self.maps.lock().unwrap();
        maps.gauges.entry(key.clone()).or_default().clone()
    }

    /// The highest value any gauge named `name` took since the last reset.
    fn gauge_max(&self, name: &str) -> f64 {
        let maps = self.maps.lock().unwrap();
        maps.gauges
            .iter()
            .filter(|(k, _)| k.name() == name)
            .map(|(_, g)| f64::from_bits(g.max.load(Ordering::Relaxed)))
            .fold(0.0, f64::max)
    }

    /// Start every gauge's maximum again from its present value.
    pub fn reset_gauge_maxima(&self) {
        let maps = self.maps.lock().unwrap();
        for level in maps.gauges.values() {
            level
                .max
                .store(level.now.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Take (and clear) the ack latencies recorded so far, in seconds.
    pub fn take_ack_latencies(&self) -> Vec<f64> {
        let maps = self.maps.lock().unwrap();
        let mut all = Vec::new();
        for (key, h) in &maps.histograms {
            if key.name() == ACK_SECONDS
                && let Some(values) = &h.values
            {
                all.append(&mut values.lock().unwrap());
            }
        }
        all
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            write_batches: self.counter_sum(WRITE_BATCHES, None),
            claim_batches: self.histogram_total(CLAIM_SECONDS, |h| &h.count),
            acks: self.counter_sum(COMPLETED, None),
            wal_flushes: self.counter_sum(WAL_FLUSHES, None),
            gets: self.counter_sum(REQUESTS, Some(("op", "get"))),
            scans: self.counter_sum(REQUESTS, Some(("op", "scan"))),
            store_reads: self
                .counter_sum_all(STORE_REQUESTS, &[("component", "db"), ("op", "get")]),
            block_misses: self.counter_sum_all(
                CACHE_ACCESS,
                &[("entry_kind", "data_block"), ("result", "miss")],
            ),
            l0_stalls: self.counter_sum(L0_STALLS, None),
            cpu_ms: cpu_ms(),
            allocs: allocations(),
            claim_us: self.histogram_total(CLAIM_SECONDS, |h| &h.sum_us),
            l0_ssts_max: self.gauge_max(L0_SSTS),
            sorted_runs_max: self.gauge_max(SORTED_RUNS),
        }
    }
}

fn has_label(key: &Key, label: Option<(&str, &str)>) -> bool {
    match label {
        None => true,
        Some((k, v)) => key.labels().any(|l| l.key() == k && l.value() == v),
    }
}

impl Recorder for Counting {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.counter_cell(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.gauge_cell(key))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.histogram_cell(key))
    }
}

static INSTALLED: OnceLock<Counting> = OnceLock::new();

/// Install the counting recorder as the process's `metrics` recorder (once;
/// before any queue opens, since SlateDB registers its counters at open).
pub fn install() -> &'static Counting {
    INSTALLED.get_or_init(|| {
        let counting = Counting::default();
        metrics::set_global_recorder(counting.clone())
            .expect("no other metrics recorder is installed");
        counting
    })
}

/// The system allocator, counting allocations (`alloc`, `alloc_zeroed`,
/// `realloc`) in per-thread shards: on a CPU-bound machine a count per step
/// is steadier than a rate, and allocation is a quarter of both sides'
/// profiles.
pub struct CountingAlloc;

const SHARDS: usize = 64;

#[repr(align(64))]
struct Shard(AtomicU64);

static ALLOCS: [Shard; SHARDS] = [const { Shard(AtomicU64::new(0)) }; SHARDS];
static NEXT_SHARD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    // No destructor and a constant start: using it allocates nothing.
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn count_alloc() {
    let shard = SHARD
        .try_with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS);
            }
            s.get()
        })
        .unwrap_or(0);
    ALLOCS[shard].0.fetch_add(1, Ordering::Relaxed);
}

/// Allocations so far, over every thread.
pub fn allocations() -> u64 {
    ALLOCS.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
}

// SAFETY: every call is passed to `System` unchanged; the count touches no
// memory the allocator hands out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Counter totals at one instant; subtract two to get a phase's counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Time in claim transactions, summed over every claim.
    pub claim_us: u64,
    /// The most L0 SSTs and sorted runs the store had since the maxima were
    /// last reset (gauges: a difference keeps the later snapshot's).
    pub l0_ssts_max: f64,
    pub sorted_runs_max: f64,
    pub write_batches: u64,
    pub claim_batches: u64,
    pub acks: u64,
    pub wal_flushes: u64,
    pub gets: u64,
    pub scans: u64,
    /// Object-store reads by the database (not the compactor or collector):
    /// SST blocks, indexes and filters missing from the cache.
    pub store_reads: u64,
    pub block_misses: u64,
    pub l0_stalls: u64,
    /// User and system CPU time of the whole process (the compactor too).
    pub cpu_ms: u64,
    /// Heap allocations by the whole process.
    pub allocs: u64,
}

impl std::ops::Sub for Snapshot {
    type Output = Snapshot;
    fn sub(self, o: Snapshot) -> Snapshot {
        Snapshot {
            write_batches: self.write_batches - o.write_batches,
            claim_batches: self.claim_batches - o.claim_batches,
            acks: self.acks - o.acks,
            wal_flushes: self.wal_flushes - o.wal_flushes,
            gets: self.gets - o.gets,
            scans: self.scans - o.scans,
            store_reads: self.store_reads - o.store_reads,
            block_misses: self.block_misses - o.block_misses,
            l0_stalls: self.l0_stalls - o.l0_stalls,
            cpu_ms: self.cpu_ms - o.cpu_ms,
            allocs: self.allocs - o.allocs,
            claim_us: self.claim_us - o.claim_us,
            l0_ssts_max: self.l0_ssts_max,
            sorted_runs_max: self.sorted_runs_max,
        }
    }
}

impl Snapshot {
    /// Commits that awaited the WAL: every write batch except the claims
    /// (the only deferred commits on these paths; the reaper and scheduler
    /// find nothing to do while a benchmark runs).
    pub fn awaited_commits(&self) -> u64 {
        self.write_batches.saturating_sub(self.claim_batches)
    }
}

/// User plus system CPU time of this process so far, in milliseconds
/// (`/proc/self/stat`, in clock ticks of 10 ms).
pub fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and
    // stime are the 12th and 13th of them.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    ticks * 10
}

/// `VmHWM` (peak resident set) of this process, in MiB.
pub fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:") as f64 / 1024.0
}

/// `VmRSS` (current resident set) of this process, in MiB.
pub fn rss_mib() -> f64 {
    status_kib("VmRSS:") as f64 / 1024.0
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    fn malloc_trim(pad: usize) -> i32;
}

/// Hand freed heap back to the OS, then reset the peak RSS to the current
/// RSS (`echo 5 > /proc/self/clear_refs`), so the next peak is the next
/// phase's own.
pub fn reset_peak_rss() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no
    // preconditions.
    unsafe {
        malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
