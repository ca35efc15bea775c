//! Store faults: the runtime on an object store that fails and stalls.
//!
//! - Seeded failed puts, gets, lists and deletes and latency spikes: every
//!   run still ends once, with its hook, and the faults are counted so the
//!   test shows they fired (`WAYMARK_FAULT_SEED` replays a seed).
//! - A store that fails every request: `run` returns
//!   `Error::StoreUnavailable` after `store_timeout` instead of hanging, and
//!   nothing committed is lost.
//! - A second process opening the store fences the first: the fenced worker
//!   stops with an error and the newcomer finishes every run.
//! - A failed read while claiming is retried; the pool goes on.
//! - Maintenance on a stalled store: `run` reports it after `store_timeout`,
//!   shutdown does not wait for it, and one retention commit expires many
//!   runs.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{FaultPlan, FaultStore, Outage, StoreOp};
use tokio::sync::Notify;
use waymark::taquba::object_store::ObjectStore;
use waymark::taquba::object_store::memory::InMemory;
use waymark::taquba::{JobStatus, KvOrder, MockClock, OpenOptions, Queue, QueueConfig};
use waymark::*;

/// Steps per run.
const STEPS: u32 = 4;
/// A bound on waits that only a hang would exceed; never a speed check.
const HANG: Duration = Duration::from_secs(120);

async fn open(store: Arc<dyn ObjectStore>) -> Arc<Queue> {
    open_with(store, |opts| opts).await
}

/// [`open`] with extra options.
async fn open_with(
    store: Arc<dyn ObjectStore>,
    extra: impl FnOnce(OpenOptions) -> OpenOptions,
) -> Arc<Queue> {
    let config = QueueConfig::default()
        .lease_duration(Duration::from_secs(2))
        .retry_backoff_base(Duration::from_millis(5))
        .retry_backoff_max(Duration::from_millis(20));
    let opts = OpenOptions {
        flush_interval: Some(Duration::from_millis(3)),
        default_queue_config: config,
        ..OpenOptions::default()
    };
    Arc::new(
        Queue::open_with_options(store, "wm", extra(opts))
            .await
            .expect("open the queue"),
    )
}

/// A chain of `STEPS` steps. Runs whose id ends in an even digit fail step 1
/// transiently once. Steps of runs in `blocked` wait for `release` (in this
/// process). Counts the calls per (run, step).
#[derive(Clone, Default)]
struct Chain {
    calls: Arc<Mutex<HashMap<(String, u32), u32>>>,
    blocked: Arc<Mutex<Vec<String>>>,
    release: Arc<Notify>,
}

impl Chain {
    fn calls(&self, run: &str, step: u32) -> u32 {
        let calls = self.calls.lock().unwrap();
        calls.get(&(run.to_string(), step)).copied().unwrap_or(0)
    }
}

impl StepRunner for Chain {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls
                .entry((step.run_id.clone(), step.step_number))
                .or_default();
            *n += 1;
            *n
        };
        if self.blocked.lock().unwrap().contains(&step.run_id) {
            self.release.notified().await;
        }
        let even = step
            .run_id
            .chars()
            .last()
            .and_then(|c| c.to_digit(10))
            .is_some_and(|d| d % 2 == 0);
        if step.step_number == 1 && even && n == 1 {
            return Err(StepError::transient("downstream hiccup"));
        }
        Ok(if step.step_number + 1 < STEPS {
            StepOutcome::Continue {
                payload: step.payload.clone(),
            }
        } else {
            StepOutcome::Succeed {
                result: format!("done:{}", step.run_id).into_bytes(),
            }
        })
    }
}

/// Counts hook calls per run.
#[derive(Clone, Default)]
struct CountingHook(Arc<Mutex<HashMap<String, u32>>>);

impl TerminalHook for CountingHook {
    async fn on_termination(&self, outcome: &RunOutcome) -> Result<(), StepError> {
        *self
            .0
            .lock()
            .unwrap()
            .entry(outcome.run_id.clone())
            .or_default() += 1;
        Ok(())
    }
}

/// How long the runtimes of the outage and fence tests let a commit wait.
const OUTAGE_TIMEOUT: Duration = Duration::from_secs(2);

fn runtime<H: TerminalHook>(
    queue: Arc<Queue>,
    runner: Chain,
    hook: H,
    store_timeout: Duration,
) -> WorkflowRuntime<Chain, H> {
    WorkflowRuntime::builder(queue, runner, hook)
        .poll_interval(Duration::from_millis(20))
        .default_retry_policy(RetryPolicy {
            initial: Duration::from_millis(5),
            multiplier: 2.0,
            max_delay: Duration::from_millis(50),
            jitter: 0.5,
            max_attempts: 20,
        })
        .store_timeout(store_timeout)
        .build()
        .expect("valid settings")
}

fn spawn_worker<H: TerminalHook>(
    rt: &WorkflowRuntime<Chain, H>,
    stop: Arc<Notify>,
) -> tokio::task::JoinHandle<Result<(), Error>> {
    let rt = rt.clone();
    tokio::spawn(async move { rt.run(stop.notified()).await })
}

async fn submit_all<H: TerminalHook>(rt: &WorkflowRuntime<Chain, H>, ids: &[String]) {
    for id in ids {
        let spec = RunSpec {
            run_id: Some(id.clone()),
            input: id.as_bytes().to_vec(),
            ..Default::default()
        };
        rt.submit(spec).await.expect("submit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_finish_once_while_the_store_fails_and_stalls() {
    let seed = common::seed_from_env("WAYMARK_FAULT_SEED");
    let plan = FaultPlan {
        put_fail: 150,
        get_fail: 50,
        list_fail: 50,
        delete_fail: 100,
        spike: 100,
        spike_max_ms: 40,
        ..FaultPlan::default()
    };
    let store = FaultStore::new(Arc::new(InMemory::new()), seed, plan);
    let faults = store.faults();
    let queue = open(store.clone()).await;
    let (runner, hook) = (Chain::default(), CountingHook::default());
    // SlateDB retries a failed put after 100 ms, doubling up to 1 s, so a
    // streak of injected put failures stalls every commit for seconds: a
    // slow store, not an outage the watchdog should report.
    let rt = runtime(
        queue.clone(),
        runner.clone(),
        hook.clone(),
        Duration::from_secs(60),
    );
    let stop = Arc::new(Notify::new());
    let worker = spawn_worker(&rt, stop.clone());

    let ids: Vec<String> = (0..30).map(|i| format!("fault-{i:02}")).collect();
    submit_all(&rt, &ids).await;
    for id in &ids {
        let out = tokio::time::timeout(HANG, rt.wait(id))
            .await
            .unwrap_or_else(|_| panic!("{id} never ended (seed {seed}; {})", faults.counts))
            .expect("wait");
        assert_eq!(out.status, TerminalStatus::Succeeded, "{id}: {out:?}");
        assert_eq!(out.result, Some(format!("done:{id}").into_bytes()));
    }
    common::wait_until(HANG, "every hook ran", || {
        let hook = hook.clone();
        let n = ids.len();
        async move { hook.0.lock().unwrap().len() == n }
    })
    .await;
    faults.set_active(false);

    // Once each: the outcome record, the hook, and every committed step (a
    // step runs again only after its settlement failed).
    let mut reran = 0;
    for id in &ids {
        assert!(rt.status(id).await.unwrap().is_none(), "{id} not live");
        assert!(
            rt.outcome(id).await.unwrap().is_some(),
            "{id} has its outcome"
        );
        for step in 0..STEPS {
            let calls = runner.calls(id, step);
            let planned = if step == 1 && id.ends_with(['0', '2', '4', '6', '8']) {
                2
            } else {
                1
            };
            assert!(calls >= planned, "{id} step {step} ran {calls} times");
            reran += calls - planned;
        }
    }
    let hook_calls: u32 = hook.0.lock().unwrap().values().sum();
    let view = queue.view();
    for status in [JobStatus::Pending, JobStatus::Scheduled, JobStatus::Dead] {
        let left = view
            .list_jobs("workflow-steps", status, None, 100)
            .await
            .unwrap();
        assert!(
            left.jobs.is_empty(),
            "{status:?} step jobs left: {:?}",
            left.jobs
        );
    }
    assert!(!worker.is_finished(), "the worker keeps running");
    stop.notify_one();
    tokio::time::timeout(HANG, worker)
        .await
        .expect("the worker drains")
        .unwrap()
        .expect("run ends cleanly on shutdown");

    // The faults fired.
    let c = &faults.counts;
    eprintln!(
        "faults (seed {seed}): {}; {} runs ended, {hook_calls} hook calls, {reran} steps re-ran after a failed settlement",
        c,
        ids.len()
    );
    assert!(c.failed_puts.load(Ordering::SeqCst) > 0, "puts failed: {c}");
    assert!(c.spikes.load(Ordering::SeqCst) > 0, "latency spiked: {c}");
    assert!(
        c.failures() > c.failed_puts.load(Ordering::SeqCst),
        "not only puts failed: {c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_stops_run_with_an_error_and_loses_nothing() {
    for outage in [Outage::Unavailable, Outage::PermissionDenied, Outage::Gone] {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = FaultStore::new(inner.clone(), 1, FaultPlan::default());
        let faults = store.faults();
        let runner = Chain::default();
        let rt = runtime(
            open(store.clone()).await,
            runner.clone(),
            NoopTerminalHook,
            OUTAGE_TIMEOUT,
        );
        let worker = spawn_worker(&rt, Arc::new(Notify::new()));
        submit_all(&rt, &["before".to_string()]).await;
        rt.wait("before").await.unwrap();

        faults.fail_everything(outage);
        // A submit now waits on the dead store; the worker notices.
        let submitter = tokio::spawn({
            let rt = rt.clone();
            async move {
                let spec = RunSpec {
                    run_id: Some("during".into()),
                    ..Default::default()
                };
                // Hangs, or fails with the store's error.
                let _ = rt.submit(spec).await;
            }
        });
        let stopped = tokio::time::timeout(HANG, worker)
            .await
            .unwrap_or_else(|_| panic!("{outage:?}: run() hangs on a dead store"))
            .unwrap();
        let err = stopped.expect_err("run() reports the dead store");
        assert!(
            matches!(
                err,
                Error::StoreUnavailable { .. } | Error::WorkerStopped(_)
            ),
            "{outage:?}: {err}"
        );
        assert!(!err.is_permanent(), "{outage:?}: worth a restart");
        assert!(faults.outage_refusals.load(Ordering::SeqCst) > 0);
        eprintln!("{outage:?}: run() -> {err}");
        submitter.abort();

        // The store comes back; a new process finds everything committed.
        faults.fail_everything(Outage::None);
        let rt = runtime(
            open(inner).await,
            Chain::default(),
            NoopTerminalHook,
            OUTAGE_TIMEOUT,
        );
        let out = rt.outcome("before").await.unwrap().expect("kept");
        assert_eq!(out.status, TerminalStatus::Succeeded);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_worker_stops_and_the_newcomer_finishes_every_run() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let first = Chain::default();
    let ids: Vec<String> = (0..10).map(|i| format!("fence-{i}")).collect();
    // Odd runs hang in the first process, so it holds steps in flight.
    *first.blocked.lock().unwrap() = ids.iter().skip(1).step_by(2).cloned().collect();
    let hook = CountingHook::default();
    let rt1 = runtime(
        open(store.clone()).await,
        first.clone(),
        hook.clone(),
        OUTAGE_TIMEOUT,
    );
    let worker1 = spawn_worker(&rt1, Arc::new(Notify::new()));
    submit_all(&rt1, &ids).await;
    for id in ids.iter().step_by(2) {
        rt1.wait(id).await.unwrap();
    }

    // A second process opens the store: the first is fenced.
    let second = Chain::default();
    let rt2 = runtime(
        open(store.clone()).await,
        second.clone(),
        hook.clone(),
        OUTAGE_TIMEOUT,
    );
    let stopped = tokio::time::timeout(HANG, worker1)
        .await
        .expect("the fenced worker stops")
        .unwrap();
    let err = stopped.expect_err("a fenced worker reports it");
    eprintln!("fenced worker: {err}");
    first.release.notify_waiters();

    let stop = Arc::new(Notify::new());
    let worker2 = spawn_worker(&rt2, stop.clone());
    for id in &ids {
        let out = tokio::time::timeout(HANG, rt2.wait(id))
            .await
            .unwrap_or_else(|_| panic!("{id} never ended after the fence"))
            .unwrap();
        assert_eq!(out.status, TerminalStatus::Succeeded, "{id}");
    }
    for (i, id) in ids.iter().enumerate() {
        if i % 2 == 0 {
            // Finished before the fence: nothing ran again.
            assert_eq!(second.calls(id, 0), 0, "{id}");
        } else {
            // Its blocked step 0 runs again in the newcomer, once.
            assert_eq!(second.calls(id, 0), 1, "{id}");
        }
    }
    stop.notify_one();
    worker2.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_while_claiming_is_retried_and_the_pool_goes_on() {
    let store = FaultStore::new(Arc::new(InMemory::new()), 1, FaultPlan::default());
    let faults = store.faults();
    // Inputs over 16 bytes are offloaded: a claim reads them from the store.
    let queue = open_with(store.clone(), |o| o.payload_offload_threshold(16)).await;
    let rt = runtime(queue, Chain::default(), NoopTerminalHook, OUTAGE_TIMEOUT);
    let stop = Arc::new(Notify::new());
    let worker = spawn_worker(&rt, stop.clone());
    faults.fail_next(StoreOp::Get, "-payloads", 1);
    let spec = RunSpec {
        run_id: Some("offloaded-1".into()),
        input: vec![7; 1024],
        ..Default::default()
    };
    rt.submit(spec).await.unwrap();
    let out = tokio::select! {
        out = rt.wait("offloaded-1") => out.unwrap(),
        stopped = worker => panic!("the pool stopped: {stopped:?}"),
    };
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(faults.counts.failed_gets.load(Ordering::SeqCst), 1);
    stop.notify_one();
}

/// A runtime on a `MockClock` queue whose outcomes are kept for a minute, its
/// worker, and the fault controls, once `runs` runs have ended.
async fn ended_runs(
    runs: usize,
    store_timeout: Duration,
) -> (
    WorkflowRuntime<Chain, NoopTerminalHook>,
    MockClock,
    Arc<common::Faults>,
    Arc<Notify>,
    tokio::task::JoinHandle<Result<(), Error>>,
) {
    let store = FaultStore::new(Arc::new(InMemory::new()), 1, FaultPlan::default());
    let faults = store.faults();
    let clock = MockClock::new(1_800_000_000_000);
    let queue = open_with(store.clone(), |o| OpenOptions {
        clock: Arc::new(clock.clone()),
        ..o
    })
    .await;
    let rt = WorkflowRuntime::builder(queue, Chain::default(), NoopTerminalHook)
        .poll_interval(Duration::from_millis(20))
        .terminal_retention(Duration::from_secs(60))
        .store_timeout(store_timeout)
        .build()
        .unwrap();
    let stop = Arc::new(Notify::new());
    let worker = spawn_worker(&rt, stop.clone());
    // Ids not ending in a digit: no step fails (a retry would wait for the
    // mock clock).
    let ids: Vec<String> = (0..runs).map(|i| format!("r-{i:03}-ok")).collect();
    submit_all(&rt, &ids).await;
    for id in &ids {
        tokio::time::timeout(HANG, rt.wait(id))
            .await
            .expect("the run ends")
            .unwrap();
    }
    // Let the maintenance that follows the runs finish, so the store fault
    // a test sets next catches only what it means to: every run tally
    // folded (the fold's commit may still wait for its flush) ...
    common::wait_until(HANG, "every run tally folded", || {
        let queue = rt.queue().clone();
        async move {
            queue
                .view()
                .kv_scan(b"wm/workflow-steps/tally/", .., KvOrder::Ascending, 1)
                .await
                .unwrap()
                .entries
                .is_empty()
        }
    })
    .await;
    // ... and a commit of our own, flushed after it.
    rt.queue().kv_put(b"test/flushed", b"1").await.unwrap();
    (rt, clock, faults, stop, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_retention_commit_expires_many_runs() {
    let (rt, clock, faults, stop, worker) = ended_runs(300, Duration::from_secs(3600)).await;
    // Every commit now applies but never returns: a pass that awaits one
    // commit per run removes one outcome, a batched one all of them.
    faults.hold(StoreOp::Put, "");
    clock.advance(Duration::from_secs(61));
    common::wait_until(HANG, "every outcome expired", || {
        let rt = rt.clone();
        async move {
            for i in 0..300 {
                if rt.outcome(&format!("r-{i:03}-ok")).await.unwrap().is_some() {
                    return false;
                }
            }
            true
        }
    })
    .await;
    faults.release();
    stop.notify_one();
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_maintenance_commit_stops_run_with_store_unavailable() {
    let (_rt, clock, faults, _stop, worker) = ended_runs(3, Duration::from_secs(1)).await;
    // Nothing but the retention pass commits now, and its commit stalls.
    faults.hold(StoreOp::Put, "");
    clock.advance(Duration::from_secs(61));
    let stopped = tokio::time::timeout(HANG, worker)
        .await
        .expect("run() reports the stalled store")
        .unwrap();
    assert!(
        matches!(stopped, Err(Error::StoreUnavailable { .. })),
        "{stopped:?}"
    );
    faults.release();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_stalled_maintenance_pass() {
    let (_rt, clock, faults, stop, worker) = ended_runs(3, Duration::from_secs(3600)).await;
    faults.hold(StoreOp::Put, "");
    clock.advance(Duration::from_secs(61));
    common::wait_until(HANG, "the retention commit stalls", || {
        let held = faults.held();
        async move { held > 0 }
    })
    .await;
    stop.notify_one();
    let stopped = tokio::time::timeout(HANG, worker)
        .await
        .expect("shutdown completes while the store stalls")
        .unwrap();
    assert!(stopped.is_ok(), "{stopped:?}");
    faults.release();
}
