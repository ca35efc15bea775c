//! Crash tests with a real worker process on a local-disk store.
//!
//! The worker is this test binary re-executed as a child (`crash_child`, an
//! ignored test that acts only when the test kit's worker variable is set),
//! through `waymark::testkit::process`. The driver SIGKILLs it at moments of
//! the kit's seeded `KillSchedule` and starts a new one on the same
//! directory.
//! Only one process opens the store at a time (taquba is single-writer): the
//! driver opens it itself only between children, to check the durable state.
//!
//! The runner appends (and fsyncs) a line to a log before it starts work
//! (`S`) and before it returns its outcome (`D`); the hook, the submitter and
//! the canceller log too. Since a line is on disk before the commit it
//! precedes, the log is a faithful history to check the store against.
//! Every step also makes a memoized call (`M` when its closure runs, `V`
//! with the value it returns): once a step's memo committed, its closure
//! never runs again, and every attempt gets the same value.
//!
//! - `restart_resumes_every_run_after_sigkill`: the foundation's restart test.
//! - `crash_torture`: a mixed workload killed at seeded random moments.
//!   `WAYMARK_TORTURE_KILLS` sets the number of kills (default 30) and
//!   `WAYMARK_TORTURE_SEED` replays a seed's workload and kill schedule.
//!   Its workers also fire a durable schedule (`every` 100 ms on the queue's
//!   clock, overlap `Allow`, downtime `FireAll`): between processes and at
//!   the end, the fire times of the runs it submitted (their run ids carry
//!   them) have no gap and no duplicate, across every kill and downtime.
//!   A share of its runs spawn children at step 0 and join them at step 1
//!   (`J` logs what the join step saw): every parent sees each child's
//!   outcome once, in spawn order; each child ends once; no extra children.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions as FileOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Rng;
use tokio::sync::mpsc as amsc;
use waymark::taquba::object_store::local::LocalFileSystem;
use waymark::taquba::{JobRecord, JobStatus, KvOrder, OpenOptions, Queue, QueueConfig};
use waymark::testkit::process::{
    self, KillSchedule, READY, TestDir, WorkerProcess, fail_with_seed,
};
use waymark::*;

const STEP_QUEUE: &str = "crash";
const HOOK_QUEUE: &str = "crash-hooks";
const MARKER_PREFIX: &str = "test/hook/";
/// Steps a worker runs at once.
const CONCURRENCY: usize = 8;
/// Attempts per step of an ordinary run: room for its planned transient
/// failures plus several kills during the same step.
const ATTEMPTS: u32 = 8;
/// Attempts per step of a run that always fails transiently.
const EXHAUST_ATTEMPTS: u32 = 3;
/// The torture's schedule, its workflow and interval.
const SCHEDULE_ID: &str = "tick";
const SCHEDULE_WORKFLOW: &str = "scheduled";
const SCHEDULE_EVERY: Duration = Duration::from_millis(100);

/// The torture's schedule: every fire time submits a run — none skipped for
/// overlap, every time missed while no worker ran caught up — so its runs'
/// fire times must be every multiple of the interval from the first to the
/// last, each once.
fn torture_schedule() -> Schedule {
    Schedule::every(SCHEDULE_ID, SCHEDULE_EVERY)
        .workflow(SCHEDULE_WORKFLOW)
        .input(b"tick".to_vec())
        .overlap(Overlap::Allow)
        .downtime(Downtime::FireAll { max: u32::MAX })
}

/// Whether a run id is one the schedule submitted.
fn is_schedule_run(run: &str) -> bool {
    run.starts_with("tick:")
}

/// The workflow of the children a parent spawns.
const CHILD_WORKFLOW: &str = "child";

/// Whether a run id is a child's (`{parent}.{step}.{index}`).
fn is_child_run(run: &str) -> bool {
    run.contains('.')
}

/// The run ids of the children `parent` spawns at step 0, in spawn order.
fn child_ids(parent: &str, children: u32) -> Vec<String> {
    (0..children).map(|i| format!("{parent}.0.{i}")).collect()
}

/// Whether a child fails (permanently) rather than succeeds: a function of
/// its id.
fn child_fails(seed: u64, child: &str) -> bool {
    let (parent, index) = child.split_once(".0.").expect("a child run id");
    let index: u64 = index.parse().expect("a child index");
    Rng::derive(seed, &[6, run_index(parent) as u64, index]).chance(300)
}

/// The tag a join step logs for a child's outcome as the parent saw it.
fn seen_tag(seen: &ChildOutcome) -> &'static str {
    let error = seen.error.as_deref().unwrap_or_default();
    match seen.status {
        TerminalStatus::Succeeded
            if seen.result.as_deref() == Some(&result_of(&seen.run_id)[..]) =>
        {
            "ok"
        }
        TerminalStatus::Failed if error.contains(&permanent_reason(&seen.run_id)) => "perm",
        TerminalStatus::Failed if error.starts_with("cancelled:") => "cancelled",
        TerminalStatus::Failed if error.contains("gave up after") => "gaveup",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------
// The workload: a pure function of (scenario, seed, run, step, attempt), so
// the driver knows what every run must end with.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Restart,
    Torture,
}

/// How a run ends if nothing (no external cancel, no kill) interferes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Succeed,
    Fail,
    /// The runner returns `Cancel`.
    SelfCancel,
    /// The last step fails with a permanent error.
    Permanent,
    /// The last step fails transiently on every attempt.
    Exhaust,
}

#[derive(Debug, Clone)]
struct Plan {
    steps: u32,
    end: End,
    /// Transient failures of each step before it succeeds.
    transient: Vec<u32>,
    /// Delay before each next step (`ContinueAfter`), in ms; 0 is `Continue`.
    delay_ms: Vec<u64>,
    /// The step at which the worker issues an external cancel.
    cancel_at: Option<u32>,
    /// Whether the hook fails its first delivery in each process.
    flaky_hook: bool,
    /// Children spawned at step 0 and joined at step 1 (0: none).
    children: u32,
}

impl Plan {
    fn max_attempts(&self) -> u32 {
        if self.end == End::Exhaust {
            EXHAUST_ATTEMPTS
        } else {
            ATTEMPTS
        }
    }
}

fn run_id(i: u32) -> String {
    format!("r{i:05}")
}

fn run_index(id: &str) -> u32 {
    id.strip_prefix('r')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a test run id: {id}"))
}

fn plan(scenario: Scenario, seed: u64, run: u32) -> Plan {
    if scenario == Scenario::Restart {
        return Plan {
            steps: 6,
            end: End::Succeed,
            transient: vec![0; 6],
            delay_ms: vec![0; 6],
            cancel_at: None,
            flaky_hook: false,
            children: 0,
        };
    }
    let mut rng = Rng::derive(seed, &[1, run as u64]);
    let steps = rng.range(1..6) as u32;
    let roll = rng.range(0..100);
    let cancel_at = (roll < 15).then(|| rng.range(0..steps as u64) as u32);
    let end = if cancel_at.is_some() {
        // An external cancel competes with a natural end that is not a
        // cancel, so the two can be told apart.
        if rng.chance(700) {
            End::Succeed
        } else {
            End::Fail
        }
    } else {
        match rng.range(0..100) {
            0..=59 => End::Succeed,
            60..=71 => End::Fail,
            72..=81 => End::SelfCancel,
            82..=90 => End::Permanent,
            _ => End::Exhaust,
        }
    };
    let transient = (0..steps)
        .map(|_| match rng.range(0..100) {
            0..=69 => 0,
            70..=89 => 1,
            _ => 2,
        })
        .collect();
    let delay_ms = (0..steps)
        .map(|_| if rng.chance(300) { rng.range(1..40) } else { 0 })
        .collect();
    let flaky_hook = rng.chance(200);
    // A run of two steps or more spawns children in a quarter of cases (a
    // draw of its own, so the other choices stay what they were).
    let mut family = Rng::derive(seed, &[5, run as u64]);
    let children = if steps >= 2 && family.chance(250) {
        2 + family.range(0..2) as u32
    } else {
        0
    };
    // Many parents are cancelled while they wait for their children (their
    // first child asks for it): the cancel cascades to the children still
    // running, and a child ending after its parent records nothing.
    let (cancel_at, end) = if children > 0 && cancel_at.is_none() && family.chance(400) {
        let end = if end == End::SelfCancel {
            End::Succeed
        } else {
            end
        };
        (Some(1), end)
    } else {
        (cancel_at, end)
    };
    Plan {
        steps,
        end,
        transient,
        delay_ms,
        cancel_at,
        flaky_hook,
        children,
    }
}

fn input(run: &str) -> Vec<u8> {
    format!("input:{run}").into_bytes()
}

/// The payload step `step` of `run` must be handed.
fn payload(seed: u64, run: &str, step: u32) -> Vec<u8> {
    if step == 0 {
        return input(run);
    }
    let tag = Rng::derive(seed, &[2, run_index(run) as u64, step as u64]).next_u64();
    format!("p:{run}:{step}:{tag:x}").into_bytes()
}

fn result_of(run: &str) -> Vec<u8> {
    format!("result:{run}").into_bytes()
}

fn fail_reason(run: &str) -> String {
    format!("business failure of {run}")
}

fn cancel_reason(run: &str) -> String {
    format!("{run} cancels itself")
}

fn permanent_reason(run: &str) -> String {
    format!("permanent error of {run}")
}

/// What the runner does at `(run, step, attempt)`, as a log tag and an
/// outcome.
fn decide(
    plan: &Plan,
    seed: u64,
    run: &str,
    step: u32,
    attempt: u32,
) -> (&'static str, Result<StepOutcome, StepError>) {
    let s = step as usize;
    let last = step + 1 == plan.steps;
    if last && plan.end == End::Exhaust {
        return ("T", Err(StepError::transient("always failing")));
    }
    if attempt <= plan.transient[s] {
        return ("T", Err(StepError::transient("planned transient failure")));
    }
    if !last {
        let payload = payload(seed, run, step + 1);
        if step == 0 && plan.children > 0 {
            let children = child_ids(run, plan.children)
                .iter()
                .map(|id| ChildSpec {
                    workflow: Some(CHILD_WORKFLOW.into()),
                    input: input(id),
                    ..Default::default()
                })
                .collect();
            return (
                "SP",
                Ok(StepOutcome::SpawnChildren {
                    children,
                    payload,
                    fail_fast: false,
                }),
            );
        }
        return match plan.delay_ms[s] {
            0 => ("N", Ok(StepOutcome::Continue { payload })),
            ms => (
                "A",
                Ok(StepOutcome::ContinueAfter {
                    payload,
                    delay: Duration::from_millis(ms),
                }),
            ),
        };
    }
    match plan.end {
        End::Succeed => (
            "OK",
            Ok(StepOutcome::Succeed {
                result: result_of(run),
            }),
        ),
        End::Fail => (
            "F",
            Ok(StepOutcome::Fail {
                reason: fail_reason(run),
            }),
        ),
        End::SelfCancel => (
            "X",
            Ok(StepOutcome::Cancel {
                reason: cancel_reason(run),
            }),
        ),
        End::Permanent => ("P", Err(StepError::permanent(permanent_reason(run)))),
        End::Exhaust => unreachable!(),
    }
}

/// Runs of the first wave, and runs each later wave adds.
fn wave_sizes(scenario: Scenario) -> (u32, u32) {
    match scenario {
        Scenario::Restart => (12, 0),
        Scenario::Torture => (24, 3),
    }
}

/// The runs a worker of incarnation `waves` submits: waves `0..=waves`.
fn planned_runs(scenario: Scenario, waves: u32) -> u32 {
    let (first, more) = wave_sizes(scenario);
    first + more * waves
}

fn status_tag(s: TerminalStatus) -> &'static str {
    match s {
        TerminalStatus::Succeeded => "succeeded",
        TerminalStatus::Failed => "failed",
        TerminalStatus::Cancelled => "cancelled",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------
// The store, shared by the child and the driver's checks.
// ---------------------------------------------------------------------------

/// Open the store in `dir`. `quiet` parks the queue's background passes
/// (scheduler, reaper), so the driver reads a state nothing else changes.
async fn open_queue(dir: &Path, quiet: bool) -> Arc<Queue> {
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let store = LocalFileSystem::new_with_prefix(&store_dir).unwrap();
    let (scheduler, reaper) = if quiet {
        (Duration::from_secs(3600), Duration::from_secs(3600))
    } else {
        (Duration::from_millis(10), Duration::from_millis(200))
    };
    let opts = OpenOptions {
        flush_interval: Some(Duration::from_millis(3)),
        scheduler_interval: scheduler,
        reaper_interval: reaper,
        default_queue_config: QueueConfig::default()
            .retry_backoff_base(Duration::from_millis(5))
            .retry_backoff_max(Duration::from_millis(40)),
        ..OpenOptions::default()
    };
    Arc::new(
        Queue::open_with_options(Arc::new(store), "wm", opts)
            .await
            .expect("open the store"),
    )
}

fn builder<R: StepRunner, H: TerminalHook>(
    queue: Arc<Queue>,
    runner: R,
    hook: H,
) -> WorkflowRuntimeBuilder<R, H> {
    WorkflowRuntime::builder(queue, runner, hook)
        .queue_name(STEP_QUEUE)
        .max_concurrent_steps(CONCURRENCY)
        .poll_interval(Duration::from_millis(20))
        .hook_max_attempts(100)
}

// ---------------------------------------------------------------------------
// The child: a worker process.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct ChildConfig {
    scenario: Scenario,
    dir: PathBuf,
    seed: u64,
    incarnation: u32,
    /// Submit waves `0..=waves`.
    waves: u32,
    /// Run until every planned run ended and its hook ran, then exit.
    finish: bool,
}

impl ChildConfig {
    fn encode(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}",
            match self.scenario {
                Scenario::Restart => "restart",
                Scenario::Torture => "torture",
            },
            self.seed,
            self.incarnation,
            self.waves,
            self.finish,
            self.dir.display()
        )
    }

    fn decode(s: &str) -> Self {
        let mut parts = s.splitn(6, '|');
        let mut next = || parts.next().expect("a complete child config");
        let scenario = match next() {
            "restart" => Scenario::Restart,
            "torture" => Scenario::Torture,
            other => panic!("unknown scenario {other}"),
        };
        Self {
            scenario,
            seed: next().parse().unwrap(),
            incarnation: next().parse().unwrap(),
            waves: next().parse().unwrap(),
            finish: next().parse().unwrap(),
            dir: PathBuf::from(next()),
        }
    }
}

/// An append-only, fsynced line log.
struct Log {
    file: Mutex<File>,
    incarnation: u32,
}

impl Log {
    fn open(dir: &Path, incarnation: u32) -> Self {
        let file = FileOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))
            .unwrap();
        Self {
            file: Mutex::new(file),
            incarnation,
        }
    }

    /// Append `kind inc rest` and make it durable before returning.
    fn line(&self, kind: &str, rest: std::fmt::Arguments<'_>) {
        let line = format!("{kind} {} {rest}\n", self.incarnation);
        let mut f = self.file.lock().unwrap();
        f.write_all(line.as_bytes()).unwrap();
        f.sync_data().unwrap();
    }
}

struct TestRunner {
    cfg: ChildConfig,
    log: Arc<Log>,
    queue: Arc<Queue>,
    cancels: amsc::UnboundedSender<String>,
}

impl StepRunner for TestRunner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        if step.workflow == SCHEDULE_WORKFLOW {
            // The schedule's runs: one step, checked through the store.
            return Ok(StepOutcome::Succeed { result: vec![] });
        }
        if step.workflow == CHILD_WORKFLOW {
            return self.child_step(step).await;
        }
        let (run, n, attempt) = (&step.run_id, step.step_number, step.attempts);
        self.log.line("S", format_args!("{run} {n} {attempt}"));
        let plan = plan(self.cfg.scenario, self.cfg.seed, run_index(run));
        if step.payload != payload(self.cfg.seed, run, n) {
            self.log
                .line("BAD", format_args!("{run} {n} {attempt} payload"));
            return Ok(StepOutcome::Fail {
                reason: "unexpected payload".into(),
            });
        }
        // The join step logs the children's outcomes it was handed.
        if n == 1 && plan.children > 0 {
            let seen: Vec<String> = step
                .children
                .iter()
                .map(|c| format!("{}:{}", c.run_id, seen_tag(c)))
                .collect();
            let seen = if seen.is_empty() {
                "-".to_string()
            } else {
                seen.join(",")
            };
            self.log.line("J", format_args!("{run} {attempt} {seen}"));
        }
        // A memoized call (a "charge"): its closure logs `M` with the value
        // it makes; the value memoized is logged `V` once known. Once a `V`
        // is on disk the memo committed, so no later `M` of the step may
        // follow, in this process or after a kill.
        let made = format!("{}.{attempt}", self.cfg.incarnation);
        let log = &self.log;
        let value: String = step
            .memo
            .memoized("charge", || async {
                log.line("M", format_args!("{run} {n} {made}"));
                Ok::<_, StepError>(made.clone())
            })
            .await?;
        self.log.line("V", format_args!("{run} {n} {value}"));
        // The restart test's in-flight step: never returns in the first
        // process, so a kill is certain to interrupt it (after its memo).
        if self.cfg.scenario == Scenario::Restart
            && self.cfg.incarnation == 0
            && run_index(run) == 0
            && n == 3
        {
            // A durable write makes everything committed before it durable
            // (the WAL is ordered), so the kill finds this step's claim and
            // the run's earlier steps on disk.
            self.queue.kv_put(b"test/barrier", b"").await.unwrap();
            self.log.line("B", format_args!("{run} {n}"));
            std::future::pending::<()>().await;
        }
        let mut work = Rng::derive(self.cfg.seed, &[3, run_index(run) as u64, n as u64]);
        let mut pause = Duration::from_millis(work.range(0..6));
        if plan.cancel_at == Some(n) {
            let _ = self.cancels.send(run.clone());
            pause += Duration::from_millis(25);
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = step.cancel_token.cancelled() => {}
        }
        let (tag, outcome) = decide(&plan, self.cfg.seed, run, n, attempt);
        self.log
            .line("D", format_args!("{run} {n} {attempt} {tag}"));
        outcome
    }
}

impl TestRunner {
    /// A child's one step: it succeeds or fails permanently, as its id
    /// decides. The first child of a parent that plans a cancel at its join
    /// step asks for that cancel, mostly while its siblings (and itself)
    /// still run, so the cancel cascades.
    async fn child_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let (run, attempt) = (&step.run_id, step.attempts);
        self.log.line("S", format_args!("{run} 0 {attempt}"));
        if step.payload != input(run) {
            self.log
                .line("BAD", format_args!("{run} 0 {attempt} payload"));
            return Ok(StepOutcome::Fail {
                reason: "unexpected payload".into(),
            });
        }
        let (parent, index) = run.split_once(".0.").expect("a child run id");
        let i = run_index(parent) as u64;
        let index: u64 = index.parse().expect("a child index");
        let mut pause =
            Duration::from_millis(Rng::derive(self.cfg.seed, &[7, i, index]).range(0..6));
        if index == 0 && plan(self.cfg.scenario, self.cfg.seed, i as u32).cancel_at == Some(1) {
            let _ = self.cancels.send(parent.to_string());
            pause += Duration::from_millis(60);
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = step.cancel_token.cancelled() => {}
        }
        let (tag, outcome) = if child_fails(self.cfg.seed, run) {
            ("P", Err(StepError::permanent(permanent_reason(run))))
        } else {
            (
                "OK",
                Ok(StepOutcome::Succeed {
                    result: result_of(run),
                }),
            )
        };
        self.log.line("D", format_args!("{run} 0 {attempt} {tag}"));
        outcome
    }
}

struct MarkerHook {
    cfg: ChildConfig,
    log: Arc<Log>,
    queue: Arc<Queue>,
    failed_once: Mutex<HashSet<String>>,
}

impl TerminalHook for MarkerHook {
    async fn on_termination(&self, outcome: &RunOutcome) -> Result<(), StepError> {
        if outcome.workflow == SCHEDULE_WORKFLOW {
            return Ok(());
        }
        let run = &outcome.run_id;
        let status = status_tag(outcome.status);
        self.log.line("H", format_args!("{run} {status}"));
        let plan = if outcome.workflow == CHILD_WORKFLOW {
            None
        } else {
            Some(plan(self.cfg.scenario, self.cfg.seed, run_index(run)))
        };
        if plan.is_some_and(|plan| plan.flaky_hook)
            && self.failed_once.lock().unwrap().insert(run.clone())
        {
            return Err(StepError::transient("hook endpoint unavailable"));
        }
        let key = format!("{MARKER_PREFIX}{run}");
        self.queue
            .kv_put(key.as_bytes(), status.as_bytes())
            .await
            .map_err(|e| StepError::transient(e.to_string()))
    }
}

/// Runs already logged as submitted.
fn logged_submits(dir: &Path) -> HashSet<String> {
    let Ok(text) = std::fs::read_to_string(dir.join("log")) else {
        return HashSet::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() == 4 && f[0] == "U").then(|| f[2].to_string())
        })
        .collect()
}

fn child_main(cfg: ChildConfig) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(child_async(cfg));
}

async fn child_async(cfg: ChildConfig) {
    let queue = open_queue(&cfg.dir, false).await;
    process::announce_ready();
    let log = Arc::new(Log::open(&cfg.dir, cfg.incarnation));
    let (cancel_tx, mut cancel_rx) = amsc::unbounded_channel();
    let runner = TestRunner {
        cfg: cfg.clone(),
        log: log.clone(),
        queue: queue.clone(),
        cancels: cancel_tx,
    };
    let hook = MarkerHook {
        cfg: cfg.clone(),
        log: log.clone(),
        queue: queue.clone(),
        failed_once: Mutex::default(),
    };
    let mut b = builder(queue.clone(), runner, hook);
    if cfg.scenario == Scenario::Torture {
        b = b.schedule(torture_schedule());
    }
    let rt = b.build().unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let worker = tokio::spawn({
        let rt = rt.clone();
        let stop = stop.clone();
        async move { rt.run(async move { stop.notified().await }).await }
    });

    // External cancels, as the runner asks for them.
    tokio::spawn({
        let rt = rt.clone();
        let log = log.clone();
        async move {
            while let Some(run) = cancel_rx.recv().await {
                let rt = rt.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    log.line("C", format_args!("{run} try"));
                    let accepted = rt.cancel(&run).await.expect("cancel");
                    log.line(
                        "C",
                        format_args!("{run} {}", if accepted { "yes" } else { "no" }),
                    );
                });
            }
        }
    });

    // Submit every planned run not known to be submitted; a run submitted
    // by a killed process before it could log it is found idempotently.
    let done = logged_submits(&cfg.dir);
    let total = planned_runs(cfg.scenario, cfg.waves);
    for i in 0..total {
        let id = run_id(i);
        if done.contains(&id) {
            continue;
        }
        let plan = plan(cfg.scenario, cfg.seed, i);
        let spec = RunSpec {
            run_id: Some(id.clone()),
            input: input(&id),
            headers: HashMap::from([("origin".to_string(), "crash-test".to_string())]),
            max_attempts_per_step: Some(plan.max_attempts()),
            ..Default::default()
        };
        let outcome = rt.submit(spec).await.expect("submit");
        let how = if outcome.newly_submitted {
            "new"
        } else {
            "old"
        };
        log.line("U", format_args!("{id} {how}"));
    }

    if !cfg.finish {
        // Work until killed.
        let r = worker.await.unwrap();
        panic!("the worker stopped by itself: {r:?}");
    }
    let mut left: BTreeSet<String> = (0..total).map(run_id).collect();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !left.is_empty() {
        assert!(Instant::now() < deadline, "runs never finished: {left:?}");
        let mut finished = Vec::new();
        for id in &left {
            let marker = format!("{MARKER_PREFIX}{id}");
            if rt.outcome(id).await.unwrap().is_some()
                && queue
                    .view()
                    .kv_get(marker.as_bytes())
                    .await
                    .unwrap()
                    .is_some()
            {
                finished.push(id.clone());
            }
        }
        for id in finished {
            left.remove(&id);
        }
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    // Then the children of the ended parents: each one spawned ended and its
    // hook ran (a parent's cascade may still be cancelling some); one that
    // is neither live nor ended was never spawned.
    let mut left: BTreeSet<String> = (0..total)
        .flat_map(|i| child_ids(&run_id(i), plan(cfg.scenario, cfg.seed, i).children))
        .collect();
    while !left.is_empty() {
        assert!(
            Instant::now() < deadline,
            "children never finished: {left:?}"
        );
        let mut finished = Vec::new();
        for id in &left {
            let marker = format!("{MARKER_PREFIX}{id}");
            let done = match rt.outcome(id).await.unwrap() {
                Some(_) => queue
                    .view()
                    .kv_get(marker.as_bytes())
                    .await
                    .unwrap()
                    .is_some(),
                None => rt.status(id).await.unwrap().is_none(),
            };
            if done {
                finished.push(id.clone());
            }
        }
        for id in finished {
            left.remove(&id);
        }
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    if cfg.scenario == Scenario::Torture {
        // Stop the schedule and let its last runs end, so nothing is left
        // live at the end.
        rt.pause_schedule(SCHEDULE_ID).await.unwrap();
        let live = RunFilter {
            state: Some(StateFilter::Live),
            workflow: Some(SCHEDULE_WORKFLOW.into()),
            limit: 1,
            ..Default::default()
        };
        while !rt.runs(&live).await.unwrap().runs.is_empty() {
            assert!(Instant::now() < deadline, "the schedule's runs never ended");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    if cfg.scenario == Scenario::Torture {
        // Let the maintenance pass remove the placeholders kills left.
        let prefix = format!("wm/{STEP_QUEUE}/replaced/");
        while !kv_all(&queue, &prefix).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "replaced placeholders were never removed"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    stop.notify_one();
    worker
        .await
        .unwrap()
        .expect("the worker stops cleanly on shutdown");
    drop(rt);
    if let Ok(queue) = Arc::try_unwrap(queue) {
        queue.close().await.expect("close the store");
    }
    println!("WAYMARK-FINISHED");
}

#[test]
#[ignore = "the worker process of the crash tests; runs only when they spawn it"]
fn crash_child() {
    if let Some(cfg) = process::worker_arg() {
        child_main(ChildConfig::decode(&cfg));
    }
}

// ---------------------------------------------------------------------------
// The driver.
// ---------------------------------------------------------------------------

/// Start a worker process for `cfg` (its stderr in the test directory).
fn spawn(cfg: &ChildConfig) -> WorkerProcess {
    let stderr = cfg.dir.join(format!("stderr-{}", cfg.incarnation));
    WorkerProcess::spawn("crash_child", &cfg.encode(), &stderr).expect("spawn the worker process")
}

/// Run a worker to completion: it exits once every planned run ended.
fn finish(cfg: &ChildConfig) -> Result<(), String> {
    let mut w = spawn(cfg);
    w.wait_line("WAYMARK-FINISHED", Duration::from_secs(300))?;
    let tail = w.stderr_tail();
    let status = w.wait()?;
    if !status.success() {
        return Err(format!("the final worker failed: {status}\n{tail}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The log and its invariants.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Entry {
    /// A step started: (run, step, attempt).
    Start(String, u32, u32),
    /// A step returned: (run, step, attempt, tag).
    Done(String, u32, u32, String),
    /// The hook was called: (run, status).
    Hook(String, String),
    /// A cancel was tried / accepted / refused.
    Cancel(String, String),
    /// A submit returned: (run, "new" | "old").
    Submit(String, String),
    /// The runner saw a payload it did not expect.
    Bad(String),
    /// The restart test's step is blocked, with everything before it durable.
    Blocked(String),
    /// A memoized closure ran: (run, step, value made).
    MemoCall(String, u32, String),
    /// A memoized call returned: (run, step, value).
    MemoValue(String, u32, String),
    /// A join step saw its children's outcomes: (run, attempt, `id:tag,…`).
    Join(String, u32, String),
}

#[derive(Debug, Clone)]
struct Line {
    inc: u32,
    entry: Entry,
}

fn read_log(dir: &Path) -> Vec<Line> {
    let text = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    let n = text.lines().count();
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let f: Vec<&str> = l.split(' ').collect();
        let num = |k: usize| f.get(k).and_then(|s| s.parse::<u32>().ok());
        let s = |k: usize| f.get(k).map(|s| s.to_string());
        let entry = match (f.first().copied(), f.len()) {
            (Some("S"), 5) => num(3)
                .zip(num(4))
                .map(|(st, a)| Entry::Start(f[2].into(), st, a)),
            (Some("D"), 6) => num(3)
                .zip(num(4))
                .map(|(st, a)| Entry::Done(f[2].into(), st, a, f[5].into())),
            (Some("H"), 4) => Some(Entry::Hook(f[2].into(), f[3].into())),
            (Some("C"), 4) => Some(Entry::Cancel(f[2].into(), f[3].into())),
            (Some("U"), 4) => Some(Entry::Submit(f[2].into(), f[3].into())),
            (Some("BAD"), _) => s(2).map(Entry::Bad),
            (Some("B"), 4) => Some(Entry::Blocked(f[2].into())),
            (Some("M"), 5) => num(3).map(|st| Entry::MemoCall(f[2].into(), st, f[4].into())),
            (Some("V"), 5) => num(3).map(|st| Entry::MemoValue(f[2].into(), st, f[4].into())),
            (Some("J"), 5) => num(3).map(|a| Entry::Join(f[2].into(), a, f[4].into())),
            _ => None,
        };
        match (entry, num(1)) {
            (Some(entry), Some(inc)) => out.push(Line { inc, entry }),
            // A kill can only cut the very last line short.
            _ if i + 1 == n => {}
            _ => panic!("malformed log line {i}: {l:?}"),
        }
    }
    out
}

/// What the log says about each run.
#[derive(Debug, Default)]
struct RunHistory {
    /// (log position, incarnation, step, attempt) of each start.
    starts: Vec<(usize, u32, u32, u32)>,
    /// (log position, incarnation, step, attempt, tag) of each return.
    dones: Vec<(usize, u32, u32, u32, String)>,
    hooks: Vec<(usize, String)>,
    cancel_tries: u32,
    cancel_yes: Vec<usize>,
    cancel_no: u32,
    new_submits: u32,
    /// (log position, incarnation, step, value) of each memoized closure run.
    memo_calls: Vec<(usize, u32, u32, String)>,
    /// (log position, step, value) of each memoized call's return.
    memo_values: Vec<(usize, u32, String)>,
    /// (log position, attempt, what it saw) of each join step.
    joins: Vec<(usize, u32, String)>,
}

fn histories(log: &[Line]) -> BTreeMap<String, RunHistory> {
    let mut h: BTreeMap<String, RunHistory> = BTreeMap::new();
    for (pos, line) in log.iter().enumerate() {
        let inc = line.inc;
        match &line.entry {
            Entry::Start(r, s, a) => h
                .entry(r.clone())
                .or_default()
                .starts
                .push((pos, inc, *s, *a)),
            Entry::Done(r, s, a, t) => {
                h.entry(r.clone())
                    .or_default()
                    .dones
                    .push((pos, inc, *s, *a, t.clone()))
            }
            Entry::Hook(r, st) => h
                .entry(r.clone())
                .or_default()
                .hooks
                .push((pos, st.clone())),
            Entry::Cancel(r, what) => {
                let e = h.entry(r.clone()).or_default();
                match what.as_str() {
                    "try" => e.cancel_tries += 1,
                    "yes" => e.cancel_yes.push(pos),
                    _ => e.cancel_no += 1,
                }
            }
            Entry::Submit(r, how) => {
                if how == "new" {
                    h.entry(r.clone()).or_default().new_submits += 1;
                }
            }
            Entry::MemoCall(r, st, val) => {
                h.entry(r.clone())
                    .or_default()
                    .memo_calls
                    .push((pos, inc, *st, val.clone()))
            }
            Entry::MemoValue(r, st, val) => {
                h.entry(r.clone())
                    .or_default()
                    .memo_values
                    .push((pos, *st, val.clone()))
            }
            Entry::Join(r, a, seen) => {
                h.entry(r.clone())
                    .or_default()
                    .joins
                    .push((pos, *a, seen.clone()))
            }
            Entry::Bad(_) | Entry::Blocked(_) => {}
        }
    }
    h
}

/// Statistics of a checked history.
#[derive(Debug, Default)]
struct Tally {
    steps_run: usize,
    /// Steps that returned a committable outcome and ran again after a kill
    /// (in flight when it struck).
    repeated_in_flight: usize,
    cancels_accepted: usize,
    exhausted_by_kills: usize,
    /// Memoized closures that ran again because a kill struck between the
    /// closure and its memo's commit.
    memo_recomputed: usize,
    /// Runs that spawned children.
    parents: usize,
    /// Parents whose join step ran, each time seeing every child once.
    joins_checked: usize,
    /// Children that ended (once each).
    children_ended: usize,
    /// Children cancelled by their ended parent's cascade.
    children_cascaded: usize,
}

/// Check the log's own invariants: a committed step never starts again; a
/// step that returned a committable outcome is repeated only across a kill,
/// and each kill repeats at most the steps in flight when it struck.
fn check_log(log: &[Line], hist: &BTreeMap<String, RunHistory>, v: &mut Vec<String>) -> Tally {
    let mut tally = Tally::default();
    for line in log {
        if let Entry::Bad(r) = &line.entry {
            v.push(format!("{r}: a step was handed an unexpected payload"));
        }
    }
    // Per kill: the committable steps of that process that ran again later.
    let mut repeats_per_kill: BTreeMap<u32, BTreeSet<(String, u32)>> = BTreeMap::new();
    for (run, h) in hist {
        tally.steps_run += h.starts.len();
        if h.new_submits > 1 {
            v.push(format!(
                "{run}: submit reported a new run {} times",
                h.new_submits
            ));
        }
        // A start of step s+1 shows step s committed durably, and a hook
        // call shows the run terminated: no later start of s, or of any
        // step, in this process or after a kill. (The worker waits for a
        // commit's flush before it acts on a job the commit enqueued.)
        let mut highest: Option<(u32, usize, u32)> = None;
        for &(pos, inc, step, _) in &h.starts {
            if let Some((top, top_pos, top_inc)) = highest
                && step < top
            {
                v.push(format!(
                    "{run}: step {step} started again (log line {pos}, process {inc}) after step {top} had started (line {top_pos}, process {top_inc})"
                ));
            }
            if highest.is_none_or(|(top, _, _)| step > top) {
                highest = Some((step, pos, inc));
            }
        }
        let first_hook = h.hooks.first().map(|&(p, _)| (p, log[p].inc));
        let first_yes = h.cancel_yes.first().copied();
        for &(pos, inc, step, _) in &h.starts {
            if let Some((p, hook_inc)) = first_hook
                && pos > p
            {
                v.push(format!(
                    "{run}: step {step} started (line {pos}, process {inc}) after the run's hook ran (line {p}, process {hook_inc}): the hook saw a termination that did not commit"
                ));
            }
            // A cancel is accepted by a durable commit.
            if first_yes.is_some_and(|p| pos > p) {
                v.push(format!(
                    "{run}: step {step} started (line {pos}) after a cancel was accepted"
                ));
            }
        }
        // A committable return is followed by no start of the same step in
        // the same process; across processes only if the kill struck before
        // the commit (then the step was in flight).
        for (pos, inc, step, _, tag) in &h.dones {
            if tag == "T" {
                continue;
            }
            for &(spos, sinc, sstep, _) in &h.starts {
                if sstep != *step || spos < *pos {
                    continue;
                }
                if sinc == *inc {
                    v.push(format!(
                        "{run}: step {step} returned `{tag}` (line {pos}) and started again in the same process (line {spos})"
                    ));
                } else {
                    repeats_per_kill
                        .entry(*inc)
                        .or_default()
                        .insert((run.clone(), *step));
                }
            }
        }
        // Attempts grow within a process (a claim that was never flushed
        // may repeat its number after a kill).
        let mut last: HashMap<(u32, u32), u32> = HashMap::new();
        for &(pos, inc, step, attempt) in &h.starts {
            if let Some(prev) = last.insert((inc, step), attempt)
                && attempt <= prev
            {
                v.push(format!(
                    "{run}: step {step} attempt {attempt} (line {pos}) after attempt {prev} in the same process"
                ));
            }
        }
        if !h.cancel_yes.is_empty() {
            tally.cancels_accepted += 1;
        }
        check_memo(run, h, v, &mut tally);
    }
    for (inc, repeats) in &repeats_per_kill {
        tally.repeated_in_flight += repeats.len();
        if repeats.len() > CONCURRENCY {
            v.push(format!(
                "the kill of process {inc} repeated {} committable steps, more than the {CONCURRENCY} that can be in flight: {repeats:?}",
                repeats.len()
            ));
        }
    }
    tally
}

/// Check a run's memoized calls: once a step's memo committed (its first
/// `V`), its closure never runs again and every return gives that value; the
/// closure runs again only after a kill struck between it and the memo's
/// commit, never twice in one process.
fn check_memo(run: &str, h: &RunHistory, v: &mut Vec<String>, tally: &mut Tally) {
    let mut calls: BTreeMap<u32, Vec<(usize, u32, &str)>> = BTreeMap::new();
    for (pos, inc, step, val) in &h.memo_calls {
        calls.entry(*step).or_default().push((*pos, *inc, val));
    }
    let mut first_value: BTreeMap<u32, (usize, &str)> = BTreeMap::new();
    for (pos, step, val) in &h.memo_values {
        let (first_pos, first) = *first_value.entry(*step).or_insert((*pos, val));
        if val != first {
            v.push(format!(
                "{run}: step {step}'s memoized call returned `{val}` (line {pos}) after `{first}` (line {first_pos})"
            ));
        }
        if !calls
            .get(step)
            .is_some_and(|c| c.iter().any(|&(p, _, made)| p < *pos && made == val))
        {
            v.push(format!(
                "{run}: step {step}'s memoized call returned `{val}` (line {pos}), which no earlier closure made"
            ));
        }
    }
    for (step, calls) in &calls {
        if let Some(&(vpos, _)) = first_value.get(step)
            && let Some(&(pos, inc, _)) = calls.iter().find(|&&(p, _, _)| p > vpos)
        {
            v.push(format!(
                "{run}: step {step}'s memoized closure ran again (line {pos}, process {inc}) after its memo committed (line {vpos})"
            ));
        }
        for pair in calls.windows(2) {
            if pair[0].1 == pair[1].1 {
                v.push(format!(
                    "{run}: step {step}'s memoized closure ran twice in process {} (lines {} and {})",
                    pair[0].1, pair[0].0, pair[1].0
                ));
            }
        }
        tally.memo_recomputed += calls.len().saturating_sub(1);
    }
}

/// Check each run's terminal record against the plan and the log.
fn check_outcome(
    scenario: Scenario,
    seed: u64,
    run: &str,
    outcome: &RunOutcome,
    h: Option<&RunHistory>,
    tally: &mut Tally,
    v: &mut Vec<String>,
) {
    let plan = plan(scenario, seed, run_index(run));
    let last = plan.steps - 1;
    let empty = RunHistory::default();
    let h = h.unwrap_or(&empty);
    let mut bad =
        |what: String| v.push(format!("{run}: {what}; outcome {outcome:?}; plan {plan:?}"));
    if outcome.headers.get("origin").map(String::as_str) != Some("crash-test") {
        bad("the submitter's headers were lost".into());
    }
    // An external cancel ends the run `Cancelled` without a reason.
    let tried = h.cancel_tries > 0;
    let accepted = !h.cancel_yes.is_empty();
    if outcome.status == TerminalStatus::Cancelled && outcome.error.is_none() {
        if !tried {
            bad("cancelled without a cancel request".into());
        } else if plan.cancel_at.is_some_and(|c| outcome.final_step < c) {
            bad("cancelled before the step that requested it".into());
        }
        return;
    }
    if accepted {
        bad("a cancel was accepted but the run did not end cancelled".into());
        return;
    }
    // Kills spend attempts too: a step whose every attempt was cut short or
    // failed ends the run `Failed` early. Allowed when the queue gave up on
    // an interrupted attempt, or when the log shows the step failing on its
    // last attempt.
    if outcome.status == TerminalStatus::Failed
        && outcome
            .error
            .as_deref()
            .is_some_and(|e| e.contains("gave up after"))
        && !(plan.end == End::Exhaust && outcome.final_step == last)
    {
        let interrupted = outcome
            .error
            .as_deref()
            .is_some_and(|e| e.contains("interrupted by process exit"));
        let failed_last = h
            .dones
            .iter()
            .any(|d| d.2 == outcome.final_step && d.3 >= plan.max_attempts() && d.4 == "T");
        if interrupted || failed_last {
            tally.exhausted_by_kills += 1;
            if std::env::var("WAYMARK_TORTURE_DEBUG").is_ok() {
                eprintln!("{run} exhausted by kills: {outcome:?}\n{h:#?}");
            }
        } else {
            bad(
                "gave up on a step that neither failed its last attempt nor lost it to a kill"
                    .into(),
            );
        }
        return;
    }
    if outcome.final_step != last {
        bad(format!(
            "ended at step {}, planned {last}",
            outcome.final_step
        ));
        return;
    }
    let ok = match plan.end {
        End::Succeed => {
            outcome.status == TerminalStatus::Succeeded
                && outcome.result.as_deref() == Some(&result_of(run)[..])
                && outcome.error.is_none()
        }
        End::Fail => {
            outcome.status == TerminalStatus::Failed
                && outcome.error.as_deref() == Some(&fail_reason(run)[..])
        }
        End::SelfCancel => {
            outcome.status == TerminalStatus::Cancelled
                && outcome.error.as_deref() == Some(&cancel_reason(run)[..])
        }
        End::Permanent => {
            outcome.status == TerminalStatus::Failed
                && outcome
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains(&permanent_reason(run)))
        }
        End::Exhaust => {
            outcome.status == TerminalStatus::Failed
                && outcome
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("gave up after"))
        }
    };
    if !ok {
        bad(format!("does not match the planned end {:?}", plan.end));
    }
    // The terminal step's last return in the log is the outcome committed.
    let tag = h
        .dones
        .iter()
        .rev()
        .find(|d| d.2 == last)
        .map(|d| d.4.as_str());
    let want = match plan.end {
        End::Succeed => "OK",
        End::Fail => "F",
        End::SelfCancel => "X",
        End::Permanent => "P",
        End::Exhaust => "T",
    };
    // A kill on the last attempt of an exhausting step leaves no return.
    if tag != Some(want) && !(plan.end == End::Exhaust && tag.is_none()) {
        bad(format!(
            "the log's last return of step {last} is {tag:?}, not {want}"
        ));
    }
}

/// The durable state, read by the driver between worker processes.
struct Snapshot {
    outcomes: BTreeMap<String, RunOutcome>,
    statuses: BTreeMap<String, RunStatus>,
    /// Live run records: run -> (step, job id).
    live: BTreeMap<String, (u32, String)>,
    markers: BTreeMap<String, String>,
    /// The children's outcomes recorded into each parent (present in the
    /// store): parent -> index key -> outcome.
    joined: BTreeMap<String, BTreeMap<String, ChildOutcome>>,
    /// Placeholders a kill left behind (between a join's commit and their
    /// removal), each listed for the maintenance pass by its marker.
    orphan_placeholders: usize,
}

/// The body of a live run record (`wm/{queue}/run/{id}`), as this test
/// reads it.
#[derive(Debug, serde::Deserialize)]
struct LiveRecord {
    step: u32,
    job_id: String,
}

struct NeverRunner;

impl StepRunner for NeverRunner {
    async fn run_step(&self, _: &Step) -> Result<StepOutcome, StepError> {
        unreachable!("the driver runs no steps")
    }
}

async fn list_all(queue: &Queue, name: &str, status: JobStatus) -> Vec<JobRecord> {
    let mut out = Vec::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let page = queue
            .view()
            .list_jobs(name, status, cursor.as_deref(), 500)
            .await
            .unwrap();
        out.extend(page.jobs);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
}

async fn kv_all(queue: &Queue, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = match &after {
            None => queue
                .view()
                .kv_scan(prefix.as_bytes(), .., KvOrder::Ascending, 500)
                .await
                .unwrap(),
            Some(k) => queue
                .view()
                .kv_scan(
                    prefix.as_bytes(),
                    (
                        std::ops::Bound::Excluded(k.clone()),
                        std::ops::Bound::Unbounded,
                    ),
                    KvOrder::Ascending,
                    500,
                )
                .await
                .unwrap(),
        };
        for (k, val) in &page.entries {
            out.insert(String::from_utf8_lossy(k).into_owned(), val.to_vec());
        }
        match (page.more, page.entries.last()) {
            (true, Some((k, _))) => after = Some(k.clone()),
            _ => return out,
        }
    }
}

/// Open the store, check the invariants that hold at any instant between
/// processes, and return what it holds. `submitted` are runs whose submit
/// returned (per the log); `planned` all runs that may have been submitted.
async fn check_store(
    dir: &Path,
    planned: u32,
    submitted: &BTreeSet<String>,
    v: &mut Vec<String>,
) -> Snapshot {
    let queue = open_queue(dir, true).await;
    let rt = builder(queue.clone(), NeverRunner, NoopTerminalHook)
        .build()
        .unwrap();
    let live_prefix = format!("wm/{STEP_QUEUE}/run/");
    let live_raw = kv_all(&queue, &live_prefix).await;
    let mut snap = Snapshot {
        outcomes: BTreeMap::new(),
        statuses: BTreeMap::new(),
        live: BTreeMap::new(),
        markers: kv_all(&queue, MARKER_PREFIX)
            .await
            .into_iter()
            .map(|(k, val)| {
                (
                    k[MARKER_PREFIX.len()..].to_string(),
                    String::from_utf8(val).unwrap(),
                )
            })
            .collect(),
        joined: BTreeMap::new(),
        orphan_placeholders: 0,
    };
    let step_jobs: Vec<JobRecord> = {
        let mut all = Vec::new();
        for s in [
            JobStatus::Pending,
            JobStatus::Scheduled,
            JobStatus::Claimed,
            JobStatus::Dead,
        ] {
            all.extend(list_all(&queue, STEP_QUEUE, s).await);
        }
        all
    };
    let by_id: HashMap<&str, &JobRecord> = step_jobs.iter().map(|j| (j.id.as_str(), j)).collect();
    // Live runs whose current step the queue dead-lettered (a kill during
    // its last attempt): ended, reported by `outcome`, recorded by the next
    // worker's reconciliation.
    let dead_live: BTreeSet<String> = live_raw
        .iter()
        .filter_map(|(key, raw)| {
            let (_, rec) = rmp_serde::from_slice::<(u8, LiveRecord)>(raw).ok()?;
            let job = by_id.get(rec.job_id.as_str())?;
            (job.status == JobStatus::Dead).then(|| key[live_prefix.len()..].to_string())
        })
        .collect();
    // The schedule's runs and the children, live or ended: the same
    // invariants.
    let out_prefix = format!("wm/{STEP_QUEUE}/out/");
    let ended: Vec<String> = kv_all(&queue, &out_prefix)
        .await
        .into_keys()
        .map(|k| k[out_prefix.len()..].to_string())
        .collect();
    let other_runs: BTreeSet<String> = live_raw
        .keys()
        .map(|k| k[live_prefix.len()..].to_string())
        .chain(ended)
        .filter(|run| is_schedule_run(run) || is_child_run(run))
        .collect();
    check_schedule(&queue, &rt, v).await;
    let parents: BTreeSet<&str> = other_runs
        .iter()
        .filter_map(|run| run.split_once(".0.").map(|(parent, _)| parent))
        .collect();
    for parent in parents {
        let prefix = format!("wm/{STEP_QUEUE}/data/{parent}/child/1/");
        let mut recorded = BTreeMap::new();
        for (key, raw) in kv_all(&queue, &prefix).await {
            match rmp_serde::from_slice::<(u8, ChildOutcome)>(&raw) {
                Ok((1, seen)) => {
                    recorded.insert(key[prefix.len()..].to_string(), seen);
                }
                other => v.push(format!("{key}: child outcome does not decode: {other:?}")),
            }
        }
        snap.joined.insert(parent.to_string(), recorded);
    }
    for id in (0..planned).map(run_id).chain(other_runs) {
        let outcome = rt.outcome(&id).await.unwrap();
        let status = rt.status(&id).await.unwrap();
        let live = live_raw.contains_key(&format!("{live_prefix}{id}"));
        match (&outcome, live) {
            (Some(_), true) if !dead_live.contains(&id) => {
                v.push(format!("{id}: both a live record and an outcome"))
            }
            (None, false) if submitted.contains(&id) => {
                v.push(format!("{id}: submitted but neither live nor terminated"))
            }
            _ => {}
        }
        if outcome.is_some() && status.is_some() {
            v.push(format!("{id}: terminated but status says {status:?}"));
        }
        if let Some(o) = outcome {
            snap.outcomes.insert(id.clone(), o);
        }
        if let Some(s) = status {
            snap.statuses.insert(id.clone(), s);
        }
    }
    // Each live run sits on exactly one step job that exists and names it.
    for (key, raw) in &live_raw {
        let run = &key[live_prefix.len()..];
        let rec = match rmp_serde::from_slice::<(u8, LiveRecord)>(raw) {
            Ok((1, rec)) => rec,
            other => {
                v.push(format!("{run}: live record does not decode: {other:?}"));
                continue;
            }
        };
        let Some(job) = by_id.get(rec.job_id.as_str()) else {
            v.push(format!(
                "{run}: live at step {} on job {}, which does not exist (a stuck run)",
                rec.step, rec.job_id
            ));
            continue;
        };
        let names = (
            job.headers.get(HEADER_RUN_ID).map(String::as_str),
            job.headers.get(HEADER_STEP).map(String::as_str),
        );
        if names != (Some(run), Some(rec.step.to_string().as_str())) {
            v.push(format!(
                "{run}: live at step {}, but its job {} names {names:?}",
                rec.step, job.id
            ));
        }
        snap.live
            .insert(run.to_string(), (rec.step, job.id.clone()));
        let status = snap.statuses.get(run);
        let want = match job.status {
            JobStatus::Pending if job.cancel_requested => Some(RunState::Cancelling),
            JobStatus::Pending => Some(RunState::Pending),
            JobStatus::Scheduled if job.headers.contains_key(HEADER_JOIN) => {
                Some(RunState::WaitingForChildren)
            }
            JobStatus::Scheduled => Some(RunState::Scheduled),
            // The queue dead-lettered the step (a kill during its last
            // attempt); the next worker reconciles the run.
            JobStatus::Dead => None,
            other => {
                v.push(format!(
                    "{run}: its job {} is {other:?} with no worker running",
                    job.id
                ));
                continue;
            }
        };
        match (status, want) {
            (None, None) => {}
            (Some(s), Some(w)) if s.state == w && s.current_step == rec.step => {}
            _ => v.push(format!(
                "{run}: status {status:?} disagrees with its record (step {}) and job ({:?})",
                rec.step, job.status
            )),
        }
    }
    // No waiting step job belongs to anything but a live run's current step.
    let replaced_prefix = format!("wm/{STEP_QUEUE}/replaced/");
    let replaced: BTreeMap<String, Vec<u8>> = kv_all(&queue, &replaced_prefix)
        .await
        .into_iter()
        .map(|(k, val)| (k[replaced_prefix.len()..].to_string(), val))
        .collect();
    for job in &step_jobs {
        if job.status == JobStatus::Dead {
            continue;
        }
        let run = job.headers.get(HEADER_RUN_ID).cloned().unwrap_or_default();
        if snap.live.get(&run).map(|(_, j)| j) != Some(&job.id) {
            // A joined parent's placeholder is removed after the join's
            // commit: a kill in between leaves it scheduled far ahead,
            // listed for removal by the marker the join committed.
            if job.status == JobStatus::Scheduled && job.headers.contains_key(HEADER_JOIN) {
                snap.orphan_placeholders += 1;
                if !replaced.contains_key(&job.id) {
                    v.push(format!(
                        "placeholder {} (run {run}) was replaced with no marker: nothing removes it",
                        job.id
                    ));
                }
                continue;
            }
            v.push(format!(
                "step job {} ({:?}, run {run}, step {:?}) is not its run's current step",
                job.id,
                job.status,
                job.headers.get(HEADER_STEP)
            ));
        }
    }
    // Queue statistics agree with the listings.
    let stats = queue.view().stats(STEP_QUEUE).await.unwrap();
    let count = |s: JobStatus| step_jobs.iter().filter(|j| j.status == s).count() as i64;
    if (stats.pending, stats.scheduled, stats.claimed, stats.dead)
        != (
            count(JobStatus::Pending),
            count(JobStatus::Scheduled),
            count(JobStatus::Claimed),
            count(JobStatus::Dead),
        )
    {
        v.push(format!(
            "step queue stats {stats:?} disagree with its listings ({} pending, {} scheduled, {} claimed, {} dead)",
            count(JobStatus::Pending),
            count(JobStatus::Scheduled),
            count(JobStatus::Claimed),
            count(JobStatus::Dead)
        ));
    }
    // One hook notification per termination, each for a terminated run.
    let hooks = queue.view().stats(HOOK_QUEUE).await.unwrap();
    let notifications = hooks.pending + hooks.scheduled + hooks.claimed + hooks.done + hooks.dead;
    let recorded = snap.outcomes.len() - dead_live.len();
    if notifications != recorded as i64 {
        v.push(format!(
            "{recorded} recorded terminations but {notifications} hook notifications ({hooks:?})"
        ));
    }
    if hooks.dead != 0 {
        v.push(format!("{} hook notifications dead-lettered", hooks.dead));
    }
    for s in [JobStatus::Pending, JobStatus::Scheduled, JobStatus::Claimed] {
        for job in list_all(&queue, HOOK_QUEUE, s).await {
            let run = job.headers.get(HEADER_RUN_ID).cloned().unwrap_or_default();
            if !snap.outcomes.contains_key(&run) {
                v.push(format!(
                    "hook notification {} for a run without outcome: {run}",
                    job.id
                ));
            }
        }
    }
    for (run, status) in &snap.markers {
        match snap.outcomes.get(run) {
            Some(o) if status_tag(o.status) == status => {}
            other => v.push(format!(
                "{run}: hook marker `{status}` but outcome {other:?}"
            )),
        }
    }
    drop(rt);
    if let Ok(queue) = Arc::try_unwrap(queue) {
        queue.close().await.unwrap();
    }
    snap
}

/// The schedule's runs in the store (their submit records, kept as long as
/// their outcomes): fire times every `SCHEDULE_EVERY` from the first to the
/// last, none twice, and the schedule's record agreeing (its run count,
/// last fire, nothing missed or skipped).
async fn check_schedule<R: StepRunner, H: TerminalHook>(
    queue: &Queue,
    rt: &WorkflowRuntime<R, H>,
    v: &mut Vec<String>,
) {
    let sub_prefix = format!("wm/{STEP_QUEUE}/sub/{SCHEDULE_ID}:");
    let mut times: Vec<u64> = Vec::new();
    for key in kv_all(queue, &sub_prefix).await.into_keys() {
        match key[sub_prefix.len()..].parse::<u64>() {
            Ok(ms) => times.push(ms),
            Err(_) => v.push(format!("schedule run `{key}` is not a timer fire")),
        }
    }
    times.sort_unstable();
    let every = SCHEDULE_EVERY.as_millis() as u64;
    for pair in times.windows(2) {
        match pair[1] - pair[0] {
            d if d == every => {}
            0 => v.push(format!("schedule fire time {} twice", pair[0])),
            d => v.push(format!(
                "schedule fires {} and {} are {d} ms apart: {} fire time(s) missing",
                pair[0],
                pair[1],
                (d / every).saturating_sub(1)
            )),
        }
    }
    let Some(info) = rt.schedule(SCHEDULE_ID).await.unwrap() else {
        if !times.is_empty() {
            v.push("schedule runs without a schedule record".into());
        }
        return;
    };
    let last = times
        .last()
        .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(*ms));
    if info.run_count != times.len() as u64 || info.last_fire != last {
        v.push(format!(
            "schedule record: {} runs, last fire {:?}; the store holds {} runs, the last at {last:?}",
            info.run_count,
            info.last_fire,
            times.len()
        ));
    }
    if info.missed != 0 || info.skipped_overlap != 0 || info.last_error.is_some() {
        v.push(format!(
            "schedule record: fires missed or skipped: {info:?}"
        ));
    }
}

/// The final checks once every worker is gone and the last one finished.
fn check_final(
    scenario: Scenario,
    seed: u64,
    planned: u32,
    snap: &Snapshot,
    log: &[Line],
    v: &mut Vec<String>,
) -> Tally {
    let hist = histories(log);
    let mut tally = check_log(log, &hist, v);
    for i in 0..planned {
        let id = run_id(i);
        let Some(outcome) = snap.outcomes.get(&id) else {
            v.push(format!("{id}: no terminal record at the end"));
            continue;
        };
        if snap.statuses.contains_key(&id) || snap.live.contains_key(&id) {
            v.push(format!("{id}: still live at the end"));
        }
        match snap.markers.get(&id) {
            None => v.push(format!("{id}: its hook never ran to completion")),
            Some(m) if m != status_tag(outcome.status) => v.push(format!(
                "{id}: hook saw {m}, outcome is {:?}",
                outcome.status
            )),
            _ => {}
        }
        let h = hist.get(&id);
        if h.is_none_or(|h| h.hooks.is_empty()) {
            v.push(format!("{id}: the log shows no hook call"));
        }
        check_outcome(scenario, seed, &id, outcome, h, &mut tally, v);
    }
    check_children(scenario, seed, planned, snap, &hist, &mut tally, v);
    if !snap.live.is_empty() {
        v.push(format!("live runs left: {:?}", snap.live));
    }
    tally
}

/// How a join step tags a child that ended with `outcome` (see
/// [`seen_tag`]).
fn outcome_tag(outcome: &RunOutcome) -> &'static str {
    let error = outcome.error.as_deref().unwrap_or_default();
    match outcome.status {
        TerminalStatus::Succeeded
            if outcome.result.as_deref() == Some(&result_of(&outcome.run_id)[..]) =>
        {
            "ok"
        }
        TerminalStatus::Failed if error.contains(&permanent_reason(&outcome.run_id)) => "perm",
        TerminalStatus::Failed if error.contains("gave up after") => "gaveup",
        TerminalStatus::Cancelled => "cancelled",
        _ => "other",
    }
}

/// The children at the end: only planned ones exist, and a parent's set
/// all or nothing (a re-run of the spawning step makes no second set); each
/// ended once, as planned, or cancelled by the cascade of a parent that
/// ended cancelled, or given up after kills; its hook saw that ending. What
/// a parent recorded of a child is the child's ending, at its index, and
/// nothing once the parent had ended (the terminal guard); every join step
/// that ran saw every child once, in spawn order, as it ended; a parent
/// that succeeded ran its join step.
fn check_children(
    scenario: Scenario,
    seed: u64,
    planned: u32,
    snap: &Snapshot,
    hist: &BTreeMap<String, RunHistory>,
    tally: &mut Tally,
    v: &mut Vec<String>,
) {
    let mut expected = BTreeSet::new();
    for i in 0..planned {
        let parent = run_id(i);
        let plan = plan(scenario, seed, i);
        if plan.children == 0 {
            continue;
        }
        tally.parents += 1;
        let ids = child_ids(&parent, plan.children);
        expected.extend(ids.iter().cloned());
        let Some(ended) = snap.outcomes.get(&parent) else {
            continue;
        };
        let spawned: Vec<&String> = ids
            .iter()
            .filter(|c| snap.outcomes.contains_key(*c) || snap.live.contains_key(*c))
            .collect();
        let joins = hist.get(&parent).map_or(&[][..], |h| &h.joins[..]);
        if spawned.is_empty() {
            if ended.final_step >= 1 {
                v.push(format!(
                    "{parent}: went past its spawning step, but none of its children exist"
                ));
            }
            continue;
        }
        if spawned.len() != ids.len() {
            v.push(format!(
                "{parent}: only {spawned:?} of its children {ids:?} exist"
            ));
        }
        let recorded = snap.joined.get(&parent);
        let mut want = Vec::new();
        for (index, child) in ids.iter().enumerate() {
            let Some(o) = snap.outcomes.get(child) else {
                v.push(format!("{child}: no terminal record at the end"));
                continue;
            };
            tally.children_ended += 1;
            want.push(format!("{child}:{}", outcome_tag(o)));
            let hooks = hist.get(child).map_or(&[][..], |h| &h.hooks[..]);
            if hooks.is_empty() || hooks.iter().any(|(_, st)| st != status_tag(o.status)) {
                v.push(format!(
                    "{child}: its hook calls {hooks:?} do not all report its ending {:?}",
                    o.status
                ));
            }
            if snap.markers.get(child).map(String::as_str) != Some(status_tag(o.status)) {
                v.push(format!(
                    "{child}: its hook never completed for {:?}",
                    o.status
                ));
            }
            let as_planned = if child_fails(seed, child) {
                outcome_tag(o) == "perm"
            } else {
                outcome_tag(o) == "ok"
            };
            let cascaded = o.status == TerminalStatus::Cancelled
                && o.error.is_none()
                && ended.status == TerminalStatus::Cancelled;
            if cascaded {
                tally.children_cascaded += 1;
            } else if outcome_tag(o) == "gaveup" {
                tally.exhausted_by_kills += 1;
            } else if !as_planned {
                v.push(format!(
                    "{child}: ended {o:?}, planned to {} (parent {ended:?})",
                    if child_fails(seed, child) {
                        "fail"
                    } else {
                        "succeed"
                    }
                ));
            }
            match recorded.and_then(|r| r.get(&format!("{index:05}"))) {
                Some(seen) => {
                    let (status, error) = match o.status {
                        TerminalStatus::Succeeded => (TerminalStatus::Succeeded, None),
                        TerminalStatus::Cancelled => (
                            TerminalStatus::Failed,
                            Some(format!(
                                "cancelled:{}",
                                o.error.as_deref().unwrap_or_default()
                            )),
                        ),
                        _ => (TerminalStatus::Failed, o.error.clone()),
                    };
                    if seen.run_id != *child
                        || seen.status != status
                        || seen.error != error
                        || seen.result != o.result
                        || seen.final_step != o.final_step
                    {
                        v.push(format!(
                            "{parent}: recorded {seen:?} for child {index}, which ended {o:?}"
                        ));
                    }
                    if cascaded {
                        v.push(format!(
                            "{parent}: recorded {child}, which its cascade cancelled after the parent ended (the terminal guard)"
                        ));
                    }
                }
                None if !joins.is_empty() => v.push(format!(
                    "{parent}: ran its join step, but {child}'s outcome is not recorded"
                )),
                None => {}
            }
        }
        if let Some(extra) = recorded.and_then(|r| {
            r.keys()
                .find(|k| k.parse::<usize>().is_ok_and(|i| i >= ids.len()) || k.len() != 5)
        }) {
            v.push(format!("{parent}: a child outcome recorded at `{extra}`"));
        }
        let want = want.join(",");
        for (pos, attempt, seen) in joins {
            if *seen != want {
                v.push(format!(
                    "{parent}: its join step (attempt {attempt}, log line {pos}) saw `{seen}`, not `{want}`"
                ));
            }
        }
        if !joins.is_empty() {
            tally.joins_checked += 1;
        } else if ended.status == TerminalStatus::Succeeded {
            v.push(format!("{parent}: succeeded without running its join step"));
        }
    }
    for child in snap.outcomes.keys().chain(snap.live.keys()) {
        if is_child_run(child) && !expected.contains(child) {
            v.push(format!("{child}: a child run no parent spawns"));
        }
    }
}

fn submitted_in_log(log: &[Line]) -> BTreeSet<String> {
    log.iter()
        .filter_map(|l| match &l.entry {
            Entry::Submit(r, _) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn fail_with(seed: u64, what: &str, v: &[String]) -> ! {
    fail_with_seed("WAYMARK_TORTURE_SEED", seed, what, v)
}

fn driver_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

/// A worker process is SIGKILLed while a step is in flight; a new process on
/// the same directory finishes every run; each committed step ran to its
/// commit once, and every run has exactly one terminal record.
#[test]
fn restart_resumes_every_run_after_sigkill() {
    let tmp = TestDir::new("restart").unwrap();
    let dir = tmp.path();
    let seed = 7;
    let cfg = ChildConfig {
        scenario: Scenario::Restart,
        dir: dir.clone(),
        seed,
        incarnation: 0,
        waves: 0,
        finish: false,
    };
    let planned = planned_runs(Scenario::Restart, 0);

    // The first process runs until every run is submitted and r00000 is
    // inside its step 3 (which never returns in this process), then dies.
    let mut first = spawn(&cfg);
    first.wait_line(READY, Duration::from_secs(60)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = read_log(&dir);
        let blocked = log
            .iter()
            .any(|l| matches!(&l.entry, Entry::Blocked(r) if r == "r00000"));
        if blocked && submitted_in_log(&log).len() == planned as usize {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first worker never reached r00000's step 3\n{}",
            first.stderr_tail()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill().unwrap();
    let before = read_log(&dir);
    let done_before = before
        .iter()
        .filter(|l| matches!(l.entry, Entry::Done(..)))
        .count();

    let rt = driver_runtime();
    let mut v = Vec::new();
    let submitted = submitted_in_log(&before);
    assert_eq!(submitted.len(), planned as usize, "all runs were submitted");
    let mid = rt.block_on(check_store(&dir, planned, &submitted, &mut v));
    // Killed mid-run: r00000 is live at step 3, its job waiting again.
    assert_eq!(mid.live.get("r00000").map(|l| l.0), Some(3), "{v:?}");

    finish(&ChildConfig {
        incarnation: 1,
        finish: true,
        ..cfg
    })
    .unwrap();
    let snap = rt.block_on(check_store(&dir, planned, &submitted, &mut v));
    let log = read_log(&dir);
    let tally = check_final(Scenario::Restart, seed, planned, &snap, &log, &mut v);

    // Exactly once per committed step: one committable return per step of
    // each run, except a step in flight at the kill (returned, not yet
    // committed), which may return once in each process.
    let hist = histories(&log);
    for i in 0..planned {
        let id = run_id(i);
        let h = &hist[&id];
        for step in 0..6 {
            let returns: Vec<u32> = h
                .dones
                .iter()
                .filter(|d| d.2 == step)
                .map(|d| d.1)
                .collect();
            let in_flight_at_kill = h.starts.iter().any(|s| s.2 == step && s.1 == 0)
                && !h.starts.iter().any(|s| s.2 == step + 1 && s.1 == 0);
            let ok = match returns.as_slice() {
                [_] => true,
                [0, 1] => in_flight_at_kill,
                _ => false,
            };
            if !ok {
                v.push(format!(
                    "{id}: step {step} returned in processes {returns:?} (in flight at the kill: {in_flight_at_kill})"
                ));
            }
        }
    }
    // The blocked step ran in both processes and returned only in the second.
    let h = &hist["r00000"];
    let starts_of_3: Vec<u32> = h.starts.iter().filter(|s| s.2 == 3).map(|s| s.1).collect();
    assert_eq!(starts_of_3, vec![0, 1]);
    // It memoized before the kill: the second process found the memo and
    // did not run the closure again.
    let calls_of_3: Vec<u32> = h
        .memo_calls
        .iter()
        .filter(|c| c.2 == 3)
        .map(|c| c.1)
        .collect();
    assert_eq!(calls_of_3, vec![0], "step 3's memoized closure ran once");
    assert_eq!(
        h.memo_values
            .iter()
            .filter(|m| m.1 == 3)
            .map(|m| m.2.as_str())
            .collect::<Vec<_>>(),
        ["0.1", "0.1"],
        "both processes got the memoized value"
    );
    if !v.is_empty() {
        fail_with(seed, "restart", &v);
    }
    eprintln!(
        "restart: {planned} runs finished; {done_before} steps had returned before the kill; {} steps run in all, {} in-flight steps repeated",
        tally.steps_run, tally.repeated_in_flight
    );
}

/// Mixed workload, killed at seeded random moments and restarted on the same
/// directory, then run to the end; every invariant is checked between
/// processes and at the end.
#[test]
fn crash_torture() {
    let seed = common::seed_from_env("WAYMARK_TORTURE_SEED");
    let kills: u32 = std::env::var("WAYMARK_TORTURE_KILLS")
        .ok()
        .map(|s| s.parse().expect("WAYMARK_TORTURE_KILLS is a number"))
        .unwrap_or(30);
    let tmp = TestDir::new("torture").unwrap();
    let dir = tmp.path();
    let rt = driver_runtime();
    let mut v = Vec::new();
    // The kill schedule is a function of the seed alone.
    let mut schedule = KillSchedule::new(seed);
    let started = Instant::now();
    let mut timed_from_spawn = 0;
    let mut left_by_kills = 0;
    for inc in 0..kills {
        let cfg = ChildConfig {
            scenario: Scenario::Torture,
            dir: dir.clone(),
            seed,
            incarnation: inc,
            waves: inc,
            finish: false,
        };
        let kill = schedule.next().expect("a kill schedule never ends");
        // A kill timed from the spawn often strikes during open and recovery.
        timed_from_spawn += u32::from(kill.from_spawn);
        if let Err(e) = process::kill_at(spawn(&cfg), kill, Duration::from_secs(60)) {
            fail_with(seed, "torture", &[format!("process {inc}: {e}")]);
        }
        // Between processes: the durable state is consistent.
        let log = read_log(&dir);
        let submitted = submitted_in_log(&log);
        let between = rt.block_on(check_store(
            &dir,
            planned_runs(Scenario::Torture, inc),
            &submitted,
            &mut v,
        ));
        left_by_kills = left_by_kills.max(between.orphan_placeholders);
        let hist = histories(&log);
        check_log(&log, &hist, &mut v);
        if !v.is_empty() {
            fail_with(seed, &format!("torture, after kill {}", inc + 1), &v);
        }
    }
    let waves = kills;
    let planned = planned_runs(Scenario::Torture, waves);
    if let Err(e) = finish(&ChildConfig {
        scenario: Scenario::Torture,
        dir: dir.clone(),
        seed,
        incarnation: kills,
        waves,
        finish: true,
    }) {
        fail_with(seed, "torture, final worker", &[e]);
    }
    let log = read_log(&dir);
    let submitted = submitted_in_log(&log);
    let snap = rt.block_on(check_store(&dir, planned, &submitted, &mut v));
    let tally = check_final(Scenario::Torture, seed, planned, &snap, &log, &mut v);
    if snap.orphan_placeholders > 0 {
        v.push(format!(
            "{} placeholders left at the end: the maintenance pass did not remove them",
            snap.orphan_placeholders
        ));
    }
    if !v.is_empty() {
        fail_with(seed, "torture, at the end", &v);
    }
    let by_status = |s: TerminalStatus| {
        snap.outcomes
            .iter()
            .filter(|(id, o)| o.status == s && !is_schedule_run(id) && !is_child_run(id))
            .count()
    };
    let fired = snap
        .outcomes
        .keys()
        .filter(|id| is_schedule_run(id))
        .count();
    eprintln!(
        "torture (seed {seed}): {kills} kills survived ({timed_from_spawn} timed from spawn), {planned} runs ended ({} succeeded, {} failed, {} cancelled; {} external cancels accepted, {} exhausted by kills), {fired} schedule fires with no gap or duplicate, {} steps run, {} in-flight steps repeated, {} memoized closures re-run after a kill struck before their memo committed; {} parents spawned children ({} joins checked: each saw every child's outcome once, in spawn order), {} children ended once ({} cancelled by their parent's cascade), at most {} placeholders left behind by a kill at once (each listed for removal, none at the end); in {:?}",
        by_status(TerminalStatus::Succeeded),
        by_status(TerminalStatus::Failed),
        by_status(TerminalStatus::Cancelled),
        tally.cancels_accepted,
        tally.exhausted_by_kills,
        tally.steps_run,
        tally.repeated_in_flight,
        tally.memo_recomputed,
        tally.parents,
        tally.joins_checked,
        tally.children_ended,
        tally.children_cascaded,
        left_by_kills,
        started.elapsed(),
    );
}
