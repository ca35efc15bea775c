//! Waymark benchmarks, side by side with raw taquba.
//!
//! ```text
//! cargo bench --bench steps                 # full run (minutes; see BENCHMARKS.md)
//! cargo bench --bench steps -- --quick      # smoke run, < 60 s: checks completion, not speed
//! cargo bench --bench steps -- --only steps,latency
//! ```
//!
//! Scenarios (`--only` takes a comma-separated subset):
//!
//! - `steps`: runs of K = 1, 5, 20 steps at concurrency 1, 16, 64 (memory
//!   store, 10 ms flush); steps/s and ack (settlement commit) latency.
//! - `submit`: distinct run ids, one submitter and 64 concurrent submitters;
//!   runs/s and submit-call latency.
//! - `latency`: two runs at concurrency 16 (low load) on each store and flush
//!   interval; step-to-step latency, from step n's runner returning to step
//!   n+1's runner being called.
//! - `scaling`: 1k, 10k (and, in full mode, 100k) pending runs of unbounded
//!   length at concurrency 64 (local store, 10 ms flush); step rate over a
//!   window, RSS, and the step-to-step latency of two priority probe runs
//!   (`--no-probes`: none; `--probe-queue`: on a queue and pool of their
//!   own, so their steps do not send the backlog's claims back over the
//!   claimed jobs; the window counts the backlog queue's steps only).
//! - `stores`: runs of 5 steps at concurrency 64 on each store and flush
//!   interval (at a 1 ms flush, where both sides are CPU-bound, full mode
//!   measures each side three times and reports the median).
//! - `peers`: the two rows issue 11 measured taquba-workflow 0.15 on (local
//!   disk, 1 ms flush: 50 runs x 20 steps at concurrency 16, 200 x 5 at 64),
//!   each measured three times a side in full mode.
//!
//! Every case runs twice in the same process, once on Waymark and once on
//! the minimal raw-taquba equivalent (claim batches sized to the free slots,
//! then `ack_with` one follow-up enqueue with a dedup key and one KV write),
//! each on a fresh store of the same type and settings. Every case prints a
//! Markdown table row and a `BENCH {json}` line; the run ends with the
//! targets and whether each is met. A run that does not complete, a payload
//! that arrives mangled, or a run that ends wrong fails the process.
//!
//! Switches take the sides apart: `WAYMARK_BENCH_STEP_HISTORY=0` runs
//! Waymark without its step history, `WAYMARK_BENCH_KEPT_INPUTS=0` without
//! its kept step inputs, and `WAYMARK_BENCH_RAW_WRITES=waymark` makes the
//! raw side write what a Waymark step writes (its headers, a caller-chosen
//! job id, its run record, and the kept input and history entry unless
//! switched off), so the gap left is Waymark's own code.

#[path = "steps/counters.rs"]
mod counters;
#[path = "steps/engines.rs"]
mod engines;
#[path = "steps/plan.rs"]
mod plan;

#[global_allocator]
static ALLOC: counters::CountingAlloc = counters::CountingAlloc;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use counters::{Counting, Snapshot};
use engines::{Engine, Setup, Side, StoreKind};
use plan::{Plan, UNTIL_FINISH, percentiles};

const SCENARIOS: [&str; 6] = ["steps", "submit", "latency", "scaling", "stores", "peers"];
/// How many times a CPU-bound case (1 ms flush, full mode) is measured.
const CPU_BOUND_REPS: usize = 3;
/// No single wait in a benchmark may take longer than this; a hang fails.
const WAIT_LIMIT: Duration = Duration::from_secs(900);

/// Counts and durations of one mode.
struct Sizes {
    quick: bool,
    /// Target length of one throughput measurement.
    secs: f64,
    seq_submits: usize,
    conc_submits: usize,
    /// Target length of one latency measurement, and its step bounds.
    lat_secs: f64,
    lat_steps: (u32, u32),
    backlogs: Vec<usize>,
    /// Priority probe runs beside the backlog (`--no-probes`: none).
    probes: usize,
    /// The probes on a queue of their own, with its own worker pool
    /// (`--probe-queue`), instead of first in line on the backlog's queue.
    probe_queue: bool,
    scale_warmup: u64,
    scale_window: u64,
    flushes: Vec<Duration>,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        let ms = Duration::from_millis;
        if quick {
            Self {
                quick,
                secs: 0.3,
                seq_submits: 30,
                conc_submits: 1_000,
                lat_secs: 0.4,
                lat_steps: (20, 150),
                backlogs: vec![1_000, 10_000],
                probes: 2,
                probe_queue: false,
                scale_warmup: 200,
                scale_window: 1_000,
                flushes: vec![ms(1), ms(10)],
            }
        } else {
            Self {
                quick,
                secs: 3.0,
                seq_submits: 300,
                conc_submits: 10_000,
                lat_secs: 2.5,
                lat_steps: (50, 400),
                backlogs: vec![1_000, 10_000, 100_000],
                probes: 2,
                probe_queue: false,
                scale_warmup: 1_000,
                scale_window: 20_000,
                flushes: vec![ms(1), ms(10), ms(100)],
            }
        }
    }

    /// Steps to run for about `secs` at `concurrency` (a rough guess of the
    /// rate: each slot settles about once per flush interval, and the CPU
    /// caps the total).
    fn steps_for(&self, concurrency: usize, flush: Duration) -> u64 {
        let per_slot = 1.0 / (flush.as_secs_f64() + 0.001);
        let rate = (concurrency as f64 * per_slot).min(6_000.0);
        (rate * self.secs).max(20.0) as u64
    }
}

/// One side's numbers for one case.
struct Measured {
    /// Steps (or submits) in the measured phase.
    units: u64,
    elapsed: f64,
    /// The case's latency samples, in seconds.
    latency: Option<(f64, f64)>,
    gap: Option<(f64, f64)>,
    ack: Option<(f64, f64)>,
    peak_rss: f64,
    counts: Snapshot,
    /// Awaited commits per non-terminal step, where it can be told apart.
    nonterminal_commits: Option<f64>,
    setup_secs: f64,
    problems: Vec<String>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.units as f64 / self.elapsed
    }

    fn per_unit(&self, n: u64) -> f64 {
        n as f64 / self.units.max(1) as f64
    }

    fn json(&self) -> Value {
        let ms = |p: Option<(f64, f64)>| p.map(|(a, b)| json!([a * 1e3, b * 1e3]));
        json!({
            "rate": self.rate(),
            "units": self.units,
            "elapsed_s": self.elapsed,
            "p50_ms": self.latency.map(|p| p.0 * 1e3),
            "p99_ms": self.latency.map(|p| p.1 * 1e3),
            "gap_p50_p99_ms": ms(self.gap),
            "ack_p50_p99_ms": ms(self.ack),
            "peak_rss_mib": self.peak_rss,
            "awaited_commits_per_unit": self.per_unit(self.counts.awaited_commits()),
            "awaited_commits_per_nonterminal_step": self.nonterminal_commits,
            "claim_batches_per_unit": self.per_unit(self.counts.claim_batches),
            "wal_flushes_per_unit": self.per_unit(self.counts.wal_flushes),
            "gets_per_unit": self.per_unit(self.counts.gets),
            "scans_per_unit": self.per_unit(self.counts.scans),
            "store_reads_per_unit": self.per_unit(self.counts.store_reads),
            "block_misses_per_unit": self.per_unit(self.counts.block_misses),
            "l0_stalls": self.counts.l0_stalls,
            "cpu_ms_per_unit": self.per_unit(self.counts.cpu_ms),
            "allocs_per_unit": self.per_unit(self.counts.allocs),
            "setup_s": self.setup_secs,
            "ok": self.problems.is_empty(),
            "problems": self.problems,
        })
    }
}

/// One case: both sides.
struct Row {
    scenario: &'static str,
    case: String,
    setup: Setup,
    unit: &'static str,
    latency_kind: &'static str,
    /// Backlog size, for the scaling targets.
    backlog: Option<usize>,
    waymark: Measured,
    raw: Measured,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.waymark.rate() / self.raw.rate()
    }

    fn json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "case": self.case,
            "store": self.setup.store.name(),
            "flush_ms": self.setup.flush.as_secs_f64() * 1e3,
            "unit": self.unit,
            "latency": self.latency_kind,
            "backlog": self.backlog,
            "ratio": self.ratio(),
            "waymark": self.waymark.json(),
            "raw": self.raw.json(),
        })
    }
}

struct Bench {
    sizes: Sizes,
    counting: &'static Counting,
    rows: Vec<Row>,
    /// Alternates which side of a case runs first.
    flip: std::cell::Cell<bool>,
    /// Lines printed under the current table (repeated measurements).
    notes: Vec<String>,
}

/// The measurement with the median rate (the upper one of an even count),
/// carrying every measurement's problems.
fn median(mut all: Vec<Measured>) -> Measured {
    all.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let problems: Vec<String> = all.iter().flat_map(|m| m.problems.clone()).collect();
    let mut mid = all.swap_remove(all.len() / 2);
    mid.problems = problems;
    mid
}

fn fmt_pair(p: Option<(f64, f64)>) -> String {
    match p {
        Some((a, b)) => format!("{:.2} / {:.2}", a * 1e3, b * 1e3),
        None => "n/a".into(),
    }
}

fn table_header(scenario: &str, unit: &str, latency: &str) {
    println!();
    println!("### {scenario}  (rate in {unit}; latency p50 / p99 in ms: {latency})");
    println!();
    println!(
        "| case | store, flush | waymark {unit} | raw {unit} | ratio | waymark p50 / p99 | raw p50 / p99 | peak RSS MiB wm / raw | awaited commits per unit wm / raw | WAL flushes per unit wm / raw | gets per unit wm / raw | allocations per unit wm / raw |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
}

fn print_row(row: &Row) {
    let (w, r) = (&row.waymark, &row.raw);
    println!(
        "| {} | {} | {:.0} | {:.0} | {:.2} | {} | {} | {:.0} / {:.0} | {:.2} / {:.2} | {:.3} / {:.3} | {:.2} / {:.2} | {:.0} / {:.0} |",
        row.case,
        row.setup.label(),
        w.rate(),
        r.rate(),
        row.ratio(),
        fmt_pair(w.latency),
        fmt_pair(r.latency),
        w.peak_rss,
        r.peak_rss,
        w.per_unit(w.counts.awaited_commits()),
        r.per_unit(r.counts.awaited_commits()),
        w.per_unit(w.counts.wal_flushes),
        r.per_unit(r.counts.wal_flushes),
        w.per_unit(w.counts.gets),
        r.per_unit(r.counts.gets),
        w.per_unit(w.counts.allocs),
        r.per_unit(r.counts.allocs),
    );
    println!("BENCH {}", row.json());
}

/// Poll `cond` every millisecond; panics after [`WAIT_LIMIT`].
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > WAIT_LIMIT {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Submit `ids` from `submitters` concurrent tasks; returns each call's
/// latency (seconds) and the number of ids that were new.
async fn submit_all(
    engine: &Arc<Engine>,
    ids: Arc<Vec<String>>,
    submitters: usize,
) -> (Vec<f64>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..submitters.min(ids.len()).max(1) {
        let (engine, ids, next) = (engine.clone(), ids.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut new = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                let t = Instant::now();
                if engine.submit(id, false).await {
                    new += 1;
                }
                lat.push(t.elapsed().as_secs_f64());
            }
            (lat, new)
        }));
    }
    let mut all = Vec::with_capacity(ids.len());
    let mut new = 0;
    for t in tasks {
        let (lat, n) = t.await.expect("submitter");
        all.extend(lat);
        new += n;
    }
    (all, new)
}

/// Count the runs in `ids` for which `check` fails, 64 at a time.
async fn count_failing<'a, F, Fut>(ids: &'a [String], check: F) -> usize
where
    F: Fn(&'a str) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    futures_util::stream::iter(ids.iter().map(|id| check(id)))
        .buffer_unordered(64)
        .filter(|ok| std::future::ready(!ok))
        .count()
        .await
}

fn run_ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:07}")).collect()
}

fn into_engine(engine: Arc<Engine>) -> Engine {
    Arc::try_unwrap(engine)
        .ok()
        .expect("no submitter holds the engine")
}

impl Bench {
    fn sides(&self) -> [Side; 2] {
        self.flip.set(!self.flip.get());
        if self.flip.get() {
            [Side::Waymark, Side::Raw]
        } else {
            [Side::Raw, Side::Waymark]
        }
    }

    /// Both sides of a case, with `measure` run for each.
    async fn both<F, Fut>(&self, measure: F) -> (Measured, Measured)
    where
        F: Fn(Side) -> Fut,
        Fut: std::future::Future<Output = Measured>,
    {
        let mut waymark = None;
        let mut raw = None;
        for side in self.sides() {
            let m = measure(side).await;
            for p in &m.problems {
                eprintln!("PROBLEM ({}): {p}", side.name());
            }
            match side {
                Side::Waymark => waymark = Some(m),
                Side::Raw => raw = Some(m),
            }
        }
        (waymark.unwrap(), raw.unwrap())
    }

    fn push(&mut self, row: Row) {
        print_row(&row);
        self.rows.push(row);
    }

    /// `runs` runs of `steps_per_run` steps, submitted before the pool starts;
    /// the measured phase is the pool draining them.
    async fn measure_runs(
        &self,
        side: Side,
        setup: Setup,
        concurrency: usize,
        steps_per_run: u32,
        runs: usize,
    ) -> Measured {
        let counting = self.counting;
        counters::reset_peak_rss();
        let plan = Arc::new(Plan::new(steps_per_run, ""));
        let engine = Arc::new(Engine::open(side, setup, plan.clone(), concurrency).await);
        let ids = Arc::new(run_ids("r", runs));
        let setup_start = Instant::now();
        let (_, new) = submit_all(&engine, ids.clone(), 64).await;
        let setup_secs = setup_start.elapsed().as_secs_f64();
        let mut problems = Vec::new();
        if new != runs {
            problems.push(format!("{} of {runs} submits were new", new));
        }

        let done = counting.completed(engine.queue_name());
        let base = done.load(Ordering::Relaxed);
        let total = runs as u64 * steps_per_run as u64;
        counting.take_ack_latencies();
        plan.take_gaps();
        let before = counting.snapshot();
        let start = Instant::now();
        let pool = engine.start();
        wait_until("all steps to settle", || {
            done.load(Ordering::Relaxed) - base >= total
        })
        .await;
        let elapsed = start.elapsed().as_secs_f64();
        let counts = counting.snapshot() - before;
        pool.stop().await;
        let ack = percentiles(counting.take_ack_latencies());
        let gap = percentiles(plan.take_gaps());

        let failing = count_failing(&ids, |id| engine.completed(id, steps_per_run)).await;
        if failing > 0 {
            problems.push(format!(
                "{failing} of {runs} runs did not complete as planned"
            ));
        }
        if plan.bad_payloads() > 0 {
            problems.push(format!(
                "{} steps saw a mangled payload",
                plan.bad_payloads()
            ));
        }
        if plan.started() != total {
            problems.push(format!("{} step calls for {total} steps", plan.started()));
        }
        let peak_rss = counters::peak_rss_mib();
        into_engine(engine).close().await;
        let nonterminal_commits = (steps_per_run > 1).then(|| {
            // Every run's last step is terminal and costs at least one
            // commit; the rest are the non-terminal steps'.
            (counts.awaited_commits() as f64 - runs as f64)
                / (runs as f64 * (steps_per_run - 1) as f64)
        });
        Measured {
            units: total,
            elapsed,
            latency: None,
            gap,
            ack,
            peak_rss,
            counts,
            nonterminal_commits,
            setup_secs,
            problems,
        }
    }

    async fn scenario_steps(&mut self) {
        let setup = Setup {
            store: StoreKind::Memory,
            flush: Duration::from_millis(10),
        };
        table_header("steps: step throughput", "steps/s", "ack commit latency");
        for k in [1u32, 5, 20] {
            for c in [1usize, 16, 64] {
                self.throughput("steps", setup, c, k).await;
            }
        }
    }

    async fn measure_submits(
        &self,
        side: Side,
        setup: Setup,
        n: usize,
        submitters: usize,
    ) -> Measured {
        let counting = self.counting;
        counters::reset_peak_rss();
        let plan = Arc::new(Plan::new(1, ""));
        let engine = Arc::new(Engine::open(side, setup, plan, 16).await);
        let ids = Arc::new(run_ids("s", n));
        let before = counting.snapshot();
        let start = Instant::now();
        let (lat, new) = submit_all(&engine, ids.clone(), submitters).await;
        let elapsed = start.elapsed().as_secs_f64();
        let counts = counting.snapshot() - before;
        let mut problems = Vec::new();
        if new != n {
            problems.push(format!("{new} of {n} submits were new"));
        }
        let failing = count_failing(&ids, |id| engine.pending(id)).await;
        if failing > 0 {
            problems.push(format!("{failing} of {n} submitted runs are not pending"));
        }
        let peak_rss = counters::peak_rss_mib();
        into_engine(engine).close().await;
        Measured {
            units: n as u64,
            elapsed,
            latency: percentiles(lat),
            gap: None,
            ack: None,
            peak_rss,
            counts,
            nonterminal_commits: None,
            setup_secs: 0.0,
            problems,
        }
    }

    async fn scenario_submit(&mut self) {
        let setup = Setup {
            store: StoreKind::Memory,
            flush: Duration::from_millis(10),
        };
        table_header("submit: submit throughput", "runs/s", "submit call");
        let cases = [
            ("sequential", self.sizes.seq_submits, 1),
            ("64 submitters", self.sizes.conc_submits, 64),
        ];
        for (name, n, submitters) in cases {
            let (waymark, raw) = self
                .both(|side| self.measure_submits(side, setup, n, submitters))
                .await;
            self.push(Row {
                scenario: "submit",
                case: format!("{name} ({n} runs)"),
                setup,
                unit: "runs/s",
                latency_kind: "submit",
                backlog: None,
                waymark,
                raw,
            });
        }
    }

    fn grid(&self) -> Vec<Setup> {
        let mut grid = Vec::new();
        for store in [StoreKind::Memory, StoreKind::Local] {
            for &flush in &self.sizes.flushes {
                grid.push(Setup { store, flush });
            }
        }
        grid
    }

    async fn scenario_latency(&mut self) {
        table_header(
            "latency: step-to-step latency at low load (2 runs, concurrency 16)",
            "steps/s",
            "runner return of step n to runner call of step n+1",
        );
        for setup in self.grid() {
            let (lo, hi) = self.sizes.lat_steps;
            let steps = ((self.sizes.lat_secs / setup.flush.as_secs_f64()) as u32).clamp(lo, hi);
            let (mut waymark, mut raw) = self
                .both(|side| self.measure_runs(side, setup, 16, steps, 2))
                .await;
            waymark.latency = waymark.gap;
            raw.latency = raw.gap;
            self.push(Row {
                scenario: "latency",
                case: format!("2 runs x {steps} steps"),
                setup,
                unit: "steps/s",
                latency_kind: "gap",
                backlog: None,
                waymark,
                raw,
            });
        }
    }

    async fn measure_backlog(&self, side: Side, setup: Setup, backlog: usize) -> Measured {
        let counting = self.counting;
        let concurrency = 64;
        counters::reset_peak_rss();
        let plan = Arc::new(Plan::new(UNTIL_FINISH, "p"));
        let mut engine = Engine::open(side, setup, plan.clone(), concurrency).await;
        if self.sizes.probe_queue {
            engine = engine.probe_queue();
        }
        let engine = Arc::new(engine);
        let ids = Arc::new(run_ids("b", backlog));
        let setup_start = Instant::now();
        let (_, new) = submit_all(&engine, ids.clone(), 64).await;
        let setup_secs = setup_start.elapsed().as_secs_f64();
        let mut problems = Vec::new();
        if new != backlog {
            problems.push(format!("{new} of {backlog} submits were new"));
        }
        let probes = run_ids("p", self.sizes.probes);
        for p in &probes {
            assert!(engine.submit(p, true).await, "probe run is new");
        }

        let done = counting.completed(engine.queue_name());
        let base = done.load(Ordering::Relaxed);
        let acked = || done.load(Ordering::Relaxed) - base;
        // The probes' own queue, when they have one (its steps are not in
        // the window's count).
        let probe_done = engine
            .probe_queue_name()
            .map(|name| counting.completed(name));
        let probe_base = probe_done.as_ref().map_or(0, |d| d.load(Ordering::Relaxed));
        let probes_acked = || {
            probe_done
                .as_ref()
                .map_or(0, |d| d.load(Ordering::Relaxed) - probe_base)
        };
        let pool = engine.start();
        let warmup = self.sizes.scale_warmup;
        wait_until("the warm-up steps", || acked() >= warmup).await;
        counting.take_ack_latencies();
        plan.take_gaps();
        counting.reset_gauge_maxima();
        let before = counting.snapshot();
        let (from, start) = (acked(), Instant::now());
        wait_until("the window's steps", || {
            acked() >= warmup + self.sizes.scale_window
        })
        .await;
        let (to, elapsed) = (acked(), start.elapsed().as_secs_f64());
        let counts = counting.snapshot() - before;
        let gap = percentiles(plan.take_gaps());
        let ack = percentiles(counting.take_ack_latencies());

        // Finish every run (one more step each) and check they all ended.
        plan.finish_all();
        let runs = backlog as u64 + probes.len() as u64;
        wait_until("every run to finish", || {
            plan.finished_runs() >= runs && acked() + probes_acked() >= plan.started()
        })
        .await;
        pool.stop().await;
        let mut all: Vec<String> = ids.iter().cloned().collect();
        all.extend(probes);
        let failing = count_failing(&all, |id| engine.completed(id, UNTIL_FINISH)).await;
        if failing > 0 {
            problems.push(format!("{failing} of {runs} runs did not complete"));
        }
        if plan.bad_payloads() > 0 {
            problems.push(format!(
                "{} steps saw a mangled payload",
                plan.bad_payloads()
            ));
        }
        let peak_rss = counters::peak_rss_mib();
        into_engine(engine).close().await;
        Measured {
            units: to - from,
            elapsed,
            latency: gap,
            gap,
            ack,
            peak_rss,
            counts,
            // No run ends inside the window: every step in it is
            // non-terminal.
            nonterminal_commits: Some(counts.awaited_commits() as f64 / (to - from) as f64),
            setup_secs,
            problems,
        }
    }

    async fn scenario_scaling(&mut self) {
        let setup = Setup {
            store: StoreKind::Local,
            flush: Duration::from_millis(10),
        };
        table_header(
            "scaling: step rate with a backlog of pending runs (concurrency 64)",
            "steps/s",
            &format!(
                "step-to-step latency of {} priority probe runs{}",
                self.sizes.probes,
                if self.sizes.probe_queue {
                    " on their own queue"
                } else {
                    ""
                }
            ),
        );
        let mut costs = Vec::new();
        for backlog in self.sizes.backlogs.clone() {
            let (waymark, raw) = self
                .both(|side| self.measure_backlog(side, setup, backlog))
                .await;
            costs.push(format!(
                "| {}k | {:.3} / {:.3} | {:.3} / {:.3} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {} / {} | {:.0} / {:.0} |",
                backlog / 1000,
                waymark.per_unit(waymark.counts.cpu_ms),
                raw.per_unit(raw.counts.cpu_ms),
                waymark.per_unit(waymark.counts.claim_us) / 1e3,
                raw.per_unit(raw.counts.claim_us) / 1e3,
                waymark.counts.l0_ssts_max,
                raw.counts.l0_ssts_max,
                waymark.counts.sorted_runs_max,
                raw.counts.sorted_runs_max,
                waymark.per_unit(waymark.counts.store_reads),
                raw.per_unit(raw.counts.store_reads),
                waymark.per_unit(waymark.counts.block_misses),
                raw.per_unit(raw.counts.block_misses),
                waymark.counts.l0_stalls,
                raw.counts.l0_stalls,
                waymark.setup_secs,
                raw.setup_secs,
            ));
            self.push(Row {
                scenario: "scaling",
                case: format!("{}k pending, {} step window", backlog / 1000, waymark.units),
                setup,
                unit: "steps/s",
                latency_kind: "gap (probe)",
                backlog: Some(backlog),
                waymark,
                raw,
            });
        }
        println!();
        println!(
            "What a step costs in each window (waymark / raw): the process's CPU, time in claim transactions, the most L0 SSTs and sorted runs the store had, object-store reads by the database (cache misses for SST blocks, indexes, filters), block-cache misses; writes stalled on a full L0 in the window; the setup's submits."
        );
        println!();
        println!(
            "| pending | CPU ms per step | claim ms per step | L0 SSTs (max) | sorted runs (max) | store reads per step | block misses per step | L0 stalls | setup s |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for line in costs {
            println!("{line}");
        }
        println!();
    }

    async fn scenario_stores(&mut self) {
        table_header(
            "stores: runs of 5 steps at concurrency 64",
            "steps/s",
            "ack commit latency",
        );
        for setup in self.grid() {
            self.throughput("stores", setup, 64, 5).await;
        }
        self.print_notes();
    }

    /// The two rows issue 11 measured taquba-workflow 0.15 on, sized as
    /// there: local disk, 1 ms flush, 50 runs of 20 steps at concurrency 16
    /// and 200 runs of 5 at concurrency 64.
    async fn scenario_peers(&mut self) {
        table_header(
            "peers: issue 11's comparison rows (local disk, 1 ms flush)",
            "steps/s",
            "ack commit latency",
        );
        let setup = Setup {
            store: StoreKind::Local,
            flush: Duration::from_millis(1),
        };
        for (runs, k, c) in [(50, 20, 16), (200, 5, 64)] {
            self.throughput_of("peers", setup, c, k, runs).await;
        }
        self.notes.push(
            "issue 11 quotes taquba-workflow 0.15 on these rows, on this machine but not in this run: \
             ~6,230 steps/s (50 x 20, c=16) and 8,600-10,400 (200 x 5, c=64)"
                .to_string(),
        );
        self.print_notes();
    }

    /// Print the notes gathered under the table just printed.
    fn print_notes(&mut self) {
        if self.notes.is_empty() {
            return;
        }
        println!();
        for note in self.notes.drain(..) {
            println!("- {note}");
        }
        println!();
    }

    /// One throughput case: runs of `k` steps at concurrency `c`, sized to
    /// last about the mode's measurement time; latency is the ack commit's.
    ///
    /// At a 1 ms flush both engines are CPU-bound on a small machine and
    /// one measurement swings by ±10%: in full mode such a case is measured
    /// [`CPU_BOUND_REPS`] times, each side's median is the row, and every
    /// measurement is printed under it.
    async fn throughput(&mut self, scenario: &'static str, setup: Setup, c: usize, k: u32) {
        let steps = self.sizes.steps_for(c, setup.flush);
        let runs = (steps.div_ceil(k as u64) as usize).max(c);
        self.throughput_of(scenario, setup, c, k, runs).await;
    }

    /// [`Self::throughput`] with `runs` runs.
    async fn throughput_of(
        &mut self,
        scenario: &'static str,
        setup: Setup,
        c: usize,
        k: u32,
        runs: usize,
    ) {
        let reps = if self.sizes.quick || setup.flush > Duration::from_millis(1) {
            1
        } else {
            CPU_BOUND_REPS
        };
        let mut waymarks = Vec::new();
        let mut raws = Vec::new();
        for _ in 0..reps {
            let (waymark, raw) = self
                .both(|side| self.measure_runs(side, setup, c, k, runs))
                .await;
            waymarks.push(waymark);
            raws.push(raw);
        }
        if reps > 1 {
            let list = |ms: &[Measured]| {
                ms.iter()
                    .map(|m| format!("{:.0}", m.rate()))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            self.notes.push(format!(
                "{scenario} K={k} c={c} {}: {reps} measurements, Waymark {} steps/s, raw {} steps/s; each side's median is the row",
                setup.label(),
                list(&waymarks),
                list(&raws)
            ));
        }
        let (mut waymark, mut raw) = (median(waymarks), median(raws));
        waymark.latency = waymark.ack;
        raw.latency = raw.ack;
        self.push(Row {
            scenario,
            case: format!("K={k} c={c} ({runs} runs)"),
            setup,
            unit: "steps/s",
            latency_kind: "ack",
            backlog: None,
            waymark,
            raw,
        });
    }

    /// Print the targets and whether each is met; returns the JSON summary.
    fn targets(&self) -> Value {
        println!();
        println!("### targets (reported, not asserted)");
        println!();
        let mut out = Vec::new();
        let mut verdict = |name: String, met: Option<bool>, detail: String| {
            let word = match met {
                Some(true) => "MET",
                Some(false) => "NOT MET",
                None => "not measured",
            };
            println!("- {name}: **{word}** ({detail})");
            out.push(json!({"target": name, "met": met, "detail": detail}));
        };
        for scenario in ["steps", "stores", "peers"] {
            let rows: Vec<&Row> = self
                .rows
                .iter()
                .filter(|r| r.scenario == scenario)
                .collect();
            if rows.is_empty() {
                verdict(
                    format!("steps/s >= 0.9x raw taquba on every row of `{scenario}`"),
                    None,
                    format!("{scenario} scenario not run"),
                );
            }
            for r in rows {
                verdict(
                    format!(
                        "steps/s >= 0.9x raw taquba, {scenario} {} {}",
                        r.case,
                        r.setup.label()
                    ),
                    Some(r.ratio() >= 0.9),
                    format!(
                        "{:.0} vs {:.0} steps/s = {:.2}x",
                        r.waymark.rate(),
                        r.raw.rate(),
                        r.ratio()
                    ),
                );
            }
        }
        let lat: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.scenario == "latency")
            .collect();
        if lat.is_empty() {
            verdict(
                "p50 step-to-step latency <= flush interval + 0.5 ms".into(),
                None,
                "latency scenario not run".into(),
            );
        }
        // Waymark runs step n+1 only once step n's settlement is durable, so
        // its floor is that commit: the settlement's own ack latency, which
        // raw taquba's identical `ack_with` shows too.
        for r in lat {
            let flush_ms = r.setup.flush.as_secs_f64() * 1e3;
            let p50 = r.waymark.gap.map(|p| p.0 * 1e3);
            let ack = |m: &Measured| m.ack.map_or(f64::NAN, |p| p.0 * 1e3);
            verdict(
                format!(
                    "p50 step-to-step latency <= flush interval + 0.5 ms, {}",
                    r.setup.label()
                ),
                p50.map(|p| p <= flush_ms + 0.5),
                match p50 {
                    Some(p) => format!(
                        "p50 {p:.2} ms vs limit {:.1} ms; its durable settlement commit p50 {:.2} ms \
                         (raw taquba's same commit: {:.2} ms), Waymark's own share {:.2} ms",
                        flush_ms + 0.5,
                        ack(&r.waymark),
                        ack(&r.raw),
                        p - ack(&r.waymark),
                    ),
                    None => "no samples".into(),
                },
            );
        }
        let scaling: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.scenario == "scaling")
            .collect();
        let at = |n: usize| scaling.iter().find(|r| r.backlog == Some(n));
        let name = "step rate at 100k pending within 20% of the rate at 1k".to_string();
        match (at(1_000), at(100_000)) {
            (Some(a), Some(b)) => {
                let rel = b.waymark.rate() / a.waymark.rate();
                verdict(
                    name,
                    Some(rel >= 0.8),
                    format!(
                        "{:.0} vs {:.0} steps/s = {:.2}x (raw taquba: {:.2}x)",
                        b.waymark.rate(),
                        a.waymark.rate(),
                        rel,
                        b.raw.rate() / a.raw.rate()
                    ),
                )
            }
            (Some(a), None) => {
                let info = at(10_000)
                    .map(|b| format!("; 10k vs 1k: {:.2}x", b.waymark.rate() / a.waymark.rate()))
                    .unwrap_or_default();
                verdict(name, None, format!("100k not run in this mode{info}"))
            }
            _ => verdict(name, None, "scaling scenario not run".into()),
        }
        let nonterminal: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.scenario == "scaling")
            .map(|r| {
                format!(
                    "{}: waymark {:.3}, raw {:.3}",
                    r.case,
                    r.waymark.nonterminal_commits.unwrap_or(f64::NAN),
                    r.raw.nonterminal_commits.unwrap_or(f64::NAN)
                )
            })
            .collect();
        if !nonterminal.is_empty() {
            println!();
            println!(
                "Awaited commits per non-terminal step (scaling windows, where no run ends): {}",
                nonterminal.join("; ")
            );
        }
        Value::Array(out)
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0);
    format!(
        "{cores} cores, {:.1} GiB memory",
        mem_kib as f64 / 1024.0 / 1024.0
    )
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench steps -- [--quick] [--only {}] [--backlogs N,N..] [--no-probes] [--probe-queue]",
        SCENARIOS.join(",")
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let mut quick = false;
    let mut backlogs: Option<Vec<usize>> = None;
    let mut probes = true;
    let mut probe_queue = false;
    let mut only: BTreeSet<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--only" => {
                let list = args.next().unwrap_or_else(|| usage());
                only = list.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
                    eprintln!("unknown scenario `{bad}`");
                    usage();
                }
            }
            "--backlogs" => {
                let list = args.next().unwrap_or_else(|| usage());
                let sizes: Result<Vec<usize>, _> =
                    list.split(',').map(|n| n.trim().parse()).collect();
                backlogs = Some(sizes.unwrap_or_else(|_| usage()));
            }
            "--no-probes" => probes = false,
            "--probe-queue" => probe_queue = true,
            // `cargo bench` passes `--bench` to harness-less targets.
            "--bench" => {}
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument `{other}`");
                usage();
            }
        }
    }
    let counting = counters::install();
    let started = Instant::now();
    let mode = if quick { "quick" } else { "full" };
    println!(
        "# waymark benchmarks ({mode} mode; {}; RSS at start {:.0} MiB)",
        machine(),
        counters::rss_mib()
    );
    if engines::raw_writes_like_waymark() {
        println!(
            "# the raw side writes what a Waymark step writes (WAYMARK_BENCH_RAW_WRITES=waymark)"
        );
    }
    println!(
        "# Waymark keeps {} history entries a run and {} step inputs",
        engines::step_history(),
        if engines::keep_step_inputs() {
            "keeps"
        } else {
            "does not keep"
        }
    );
    let mut sizes = Sizes::new(quick);
    if let Some(backlogs) = backlogs {
        sizes.backlogs = backlogs;
    }
    if !probes {
        sizes.probes = 0;
    }
    sizes.probe_queue = probe_queue;
    let mut bench = Bench {
        sizes,
        counting,
        rows: Vec::new(),
        flip: std::cell::Cell::new(false),
        notes: Vec::new(),
    };
    for scenario in SCENARIOS {
        if !only.contains(scenario) {
            continue;
        }
        let t = Instant::now();
        match scenario {
            "steps" => bench.scenario_steps().await,
            "submit" => bench.scenario_submit().await,
            "latency" => bench.scenario_latency().await,
            "scaling" => bench.scenario_scaling().await,
            "stores" => bench.scenario_stores().await,
            "peers" => bench.scenario_peers().await,
            _ => unreachable!(),
        }
        eprintln!("[{scenario} took {:.1} s]", t.elapsed().as_secs_f64());
    }
    let targets = bench.targets();
    let problems: usize = bench
        .rows
        .iter()
        .map(|r| r.waymark.problems.len() + r.raw.problems.len())
        .sum();
    let total = started.elapsed().as_secs_f64();
    println!();
    println!(
        "Finished in {total:.1} s ({mode} mode, {} cases, {problems} problems).",
        bench.rows.len()
    );
    println!(
        "BENCH_SUMMARY {}",
        json!({
            "mode": mode,
            "machine": machine(),
            "seconds": total,
            "cases": bench.rows.len(),
            "problems": problems,
            "sizes": {"quick": bench.sizes.quick},
            "targets": targets,
        })
    );
    if problems > 0 {
        eprintln!("FAILED: {problems} problems (see PROBLEM lines)");
        std::process::exit(1);
    }
}
