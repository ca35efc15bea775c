//! Regression tests for issue 9's core defects: per-claim in-flight entries,
//! answers that rest only on durable commits, hook lease renewal, huge
//! delays, and runs whose last attempt died before a restart.

mod common;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{FaultPlan, FaultStore, StoreOp, wait_until};
use support::*;
use taquba::object_store::ObjectStore;
use taquba::object_store::memory::InMemory;
use taquba::{JobStatus, MockClock, OpenOptions, Queue, QueueConfig};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use waymark::*;

/// Long enough for an answer that does not wait to arrive; a correct answer
/// waits for the store and never arrives within it, so the grace only gives
/// the defect its chance to show and cannot fail a correct runtime.
const GRACE: Duration = Duration::from_millis(300);

/// Generous bound for a condition that holds within milliseconds.
const BOUND: Duration = Duration::from_secs(10);

fn spec(id: &str, input: &[u8]) -> RunSpec {
    RunSpec {
        run_id: Some(id.into()),
        input: input.to_vec(),
        ..Default::default()
    }
}

fn key(kind: &str, id: &str) -> Vec<u8> {
    format!("wm/workflow-steps/{kind}/{id}").into_bytes()
}

/// A runtime over a [`FaultStore`] (no faults planned: used to hold WAL
/// writes), with its pool not started.
async fn held_runtime(
    runner: FnRunner,
) -> (
    WorkflowRuntime<FnRunner, NoopTerminalHook>,
    Arc<common::Faults>,
) {
    let store = FaultStore::new(Arc::new(InMemory::new()), 0, FaultPlan::default());
    let faults = store.faults();
    let clock = MockClock::new(T0);
    let queue = open_queue(store as Arc<dyn ObjectStore>, &clock).await;
    let rt = builder(queue, runner, NoopTerminalHook).build().unwrap();
    (rt, faults)
}

fn start<H: TerminalHook + Clone>(
    rt: &WorkflowRuntime<FnRunner, H>,
    stop: &Arc<Notify>,
) -> JoinHandle<Result<(), Error>> {
    let (rt, stop) = (rt.clone(), stop.clone());
    tokio::spawn(async move { rt.run(async move { stop.notified().await }).await })
}

/// Defect 2: a step that outlives its lease runs again under a second claim;
/// the stale attempt's settlement must not unregister the second, so a
/// cancel still reaches the attempt that runs.
#[tokio::test]
async fn a_cancel_after_a_lease_lapse_reaches_the_running_attempt() {
    let (first, second) = (Gate::default(), Gate::default());
    let (started1, started2) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let runner = {
        let (first, second) = (first.clone(), second.clone());
        let (started1, started2) = (started1.clone(), started2.clone());
        FnRunner::new(move |s: Step| {
            let (first, second) = (first.clone(), second.clone());
            let (started1, started2) = (started1.clone(), started2.clone());
            async move {
                if s.step_number > 0 {
                    return Ok(StepOutcome::Succeed { result: vec![] });
                }
                if s.attempts == 1 {
                    started1.notify_one();
                    first.wait().await;
                } else {
                    started2.notify_one();
                    second.wait().await;
                }
                Ok(StepOutcome::Continue { payload: vec![] })
            }
        })
    };
    let hook = RecordingHook::default();
    let mut env = Env::new(runner.clone(), hook.clone()).await;
    env.start();
    env.submit("lapse", b"").await;
    started1.notified().await;
    // The process stalls past the lease: the reaper takes the job back and
    // the pool runs the step again under a second claim.
    env.clock.advance(Duration::from_secs(31));
    env.queue().reap_now().await.unwrap();
    started2.notified().await;
    // The stale first attempt returns and fails to settle (claim lost).
    first.open();
    tokio::time::sleep(GRACE).await;
    assert!(env.rt.cancel("lapse").await.unwrap());
    second.open();
    let out = env.rt.wait("lapse").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Cancelled, "{out:?}");
    assert_eq!(
        runner.calls("lapse", 1),
        0,
        "the step's Continue was discarded"
    );
    hook.wait_for("lapse").await;
    env.stop().await;
    assert_eq!(hook.count("lapse"), 1);
}

/// Defect 4: a second submit racing the first must not acknowledge the run
/// from the first's commit before that commit is durable.
#[tokio::test]
async fn a_racing_submit_answers_only_once_the_first_is_durable() {
    let (rt, faults) = held_runtime(FnRunner::new(|_s: Step| async {
        Ok(StepOutcome::Succeed { result: vec![] })
    }))
    .await;
    faults.hold(StoreOp::Put, "wal");
    let first = tokio::spawn({
        let rt = rt.clone();
        async move { rt.submit(spec("race", b"x")).await }
    });
    let queue = rt.queue().clone();
    wait_until(BOUND, "the first submit is visible, not durable", || {
        let queue = queue.clone();
        let held = faults.held();
        async move {
            held > 0
                && queue
                    .view()
                    .kv_get(&key("sub", "race"))
                    .await
                    .unwrap()
                    .is_some()
        }
    })
    .await;
    let mut second = tokio::spawn({
        let rt = rt.clone();
        async move { rt.submit(spec("race", b"x")).await }
    });
    if let Ok(answer) = tokio::time::timeout(GRACE, &mut second).await {
        panic!(
            "the second submit answered {answer:?} while the first's commit was not durable ({} writes held)",
            faults.held()
        );
    }
    faults.release();
    assert!(first.await.unwrap().unwrap().newly_submitted);
    assert!(!second.await.unwrap().unwrap().newly_submitted);
}

/// Defect 4: `outcome`, `wait`, `status` and `cancel` must not answer from a
/// terminal commit that is visible but not durable.
#[tokio::test]
async fn reads_answer_only_from_durable_commits() {
    let (started, gate) = (Arc::new(Notify::new()), Gate::default());
    let runner = {
        let (started, gate) = (started.clone(), gate.clone());
        FnRunner::new(move |_s: Step| {
            let (started, gate) = (started.clone(), gate.clone());
            async move {
                started.notify_one();
                gate.wait().await;
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let (rt, faults) = held_runtime(runner).await;
    let stop = Arc::new(Notify::new());
    let worker = start(&rt, &stop);
    rt.submit(spec("end", b"")).await.unwrap();
    started.notified().await;
    faults.hold(StoreOp::Put, "wal");
    gate.open();
    let queue = rt.queue().clone();
    wait_until(BOUND, "the outcome is visible, not durable", || {
        let queue = queue.clone();
        let held = faults.held();
        async move {
            held > 0
                && queue
                    .view()
                    .kv_get(&key("out", "end"))
                    .await
                    .unwrap()
                    .is_some()
        }
    })
    .await;
    let (a, b, c, d) = (rt.clone(), rt.clone(), rt.clone(), rt.clone());
    let mut outcome = tokio::spawn(async move { format!("{:?}", a.outcome("end").await) });
    let mut wait = tokio::spawn(async move { format!("{:?}", b.wait("end").await) });
    let mut status = tokio::spawn(async move { format!("{:?}", c.status("end").await) });
    let mut cancel = tokio::spawn(async move { format!("{:?}", d.cancel("end").await) });
    tokio::time::sleep(GRACE).await;
    for (what, task) in [
        ("outcome", &mut outcome),
        ("wait", &mut wait),
        ("status", &mut status),
        ("cancel", &mut cancel),
    ] {
        assert!(
            !task.is_finished(),
            "{what} answered {} from a commit that was not durable",
            task.await.unwrap()
        );
    }
    faults.release();
    assert!(outcome.await.unwrap().contains("Succeeded"));
    assert!(wait.await.unwrap().contains("Succeeded"));
    assert_eq!(status.await.unwrap(), "Ok(None)");
    assert_eq!(cancel.await.unwrap(), "Ok(false)");
    stop.notify_one();
    worker.await.unwrap().unwrap();
}

/// A step's `effects().get` must not return another step's staged write
/// while the settlement that wrote it is visible but not durable: a crash
/// then would undo the write the reader acted on. Checked with the writer
/// and the reader in one runtime, and in two runtimes on one store (the
/// application namespace is the store's).
#[tokio::test]
async fn a_staged_write_is_read_only_once_durable() {
    staged_write_read_once_durable(false).await;
}

#[tokio::test]
async fn a_staged_write_of_another_runtime_on_the_store_is_read_only_once_durable() {
    staged_write_read_once_durable(true).await;
}

async fn staged_write_read_once_durable(two_runtimes: bool) {
    let (reader_started, reader_gate) = (Arc::new(Notify::new()), Gate::default());
    let (reading, writer_gate) = (Arc::new(Notify::new()), Gate::default());
    let (read_tx, read_rx) = tokio::sync::oneshot::channel();
    let read_tx = Arc::new(std::sync::Mutex::new(Some(read_tx)));
    let runner = {
        let (reader_started, reader_gate) = (reader_started.clone(), reader_gate.clone());
        let (reading, writer_gate) = (reading.clone(), writer_gate.clone());
        FnRunner::new(move |s: Step| {
            let (reader_started, reader_gate) = (reader_started.clone(), reader_gate.clone());
            let (reading, writer_gate) = (reading.clone(), writer_gate.clone());
            let read_tx = read_tx.clone();
            async move {
                if s.run_id == "writer" {
                    writer_gate.wait().await;
                    s.effects().put(b"app/k".to_vec(), b"v".to_vec()).unwrap();
                } else {
                    reader_started.notify_one();
                    reader_gate.wait().await;
                    reading.notify_one();
                    let read = s.effects().get(b"app/k").await;
                    if let Some(tx) = read_tx.lock().unwrap().take() {
                        let _ = tx.send(read);
                    }
                }
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let (rt, faults) = held_runtime(runner.clone()).await;
    let stop = Arc::new(Notify::new());
    let worker = start(&rt, &stop);
    // The reader runs in a second runtime on the same store, or in `rt`.
    let reader_rt = if two_runtimes {
        builder(rt.queue().clone(), runner, NoopTerminalHook)
            .queue_name("other-steps")
            .build()
            .unwrap()
    } else {
        rt.clone()
    };
    let reader_worker = two_runtimes.then(|| start(&reader_rt, &stop));
    reader_rt.submit(spec("reader", b"")).await.unwrap();
    reader_started.notified().await;
    rt.submit(spec("writer", b"")).await.unwrap();
    faults.hold(StoreOp::Put, "wal");
    writer_gate.open();
    let queue = rt.queue().clone();
    wait_until(BOUND, "the staged write is visible, not durable", || {
        let queue = queue.clone();
        let held = faults.held();
        async move { held > 0 && queue.view().kv_get(b"app/k").await.unwrap().is_some() }
    })
    .await;
    reader_gate.open();
    reading.notified().await;
    let mut read = read_rx;
    if let Ok(answer) = tokio::time::timeout(GRACE, &mut read).await {
        panic!(
            "get answered {answer:?} while the write was not durable ({} writes held)",
            faults.held()
        );
    }
    faults.release();
    let value = read.await.unwrap().unwrap();
    assert_eq!(value.as_deref(), Some(&b"v"[..]));
    assert_eq!(
        rt.wait("writer").await.unwrap().status,
        TerminalStatus::Succeeded
    );
    stop.notify_waiters();
    worker.await.unwrap().unwrap();
    if let Some(reader_worker) = reader_worker {
        reader_worker.await.unwrap().unwrap();
    }
}

/// A second cancel of a running step, racing the first, finds the request
/// already stored on the job (the first's commit, visible but not durable):
/// it must not answer before that commit is durable, nor say that it was the
/// one accepted.
#[tokio::test]
async fn a_racing_cancel_answers_only_once_the_first_is_durable() {
    let (started, gate) = (Arc::new(Notify::new()), Gate::default());
    let runner = {
        let (started, gate) = (started.clone(), gate.clone());
        FnRunner::new(move |_s: Step| {
            let (started, gate) = (started.clone(), gate.clone());
            async move {
                started.notify_one();
                gate.wait().await;
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let (rt, faults) = held_runtime(runner).await;
    let stop = Arc::new(Notify::new());
    let worker = start(&rt, &stop);
    rt.submit(spec("twice", b"")).await.unwrap();
    started.notified().await;
    faults.hold(StoreOp::Put, "wal");
    let first = tokio::spawn({
        let rt = rt.clone();
        async move { rt.cancel("twice").await }
    });
    let queue = rt.queue().clone();
    wait_until(BOUND, "the first cancel is visible, not durable", || {
        let queue = queue.clone();
        let held = faults.held();
        async move {
            let claimed = queue
                .view()
                .list_jobs("workflow-steps", JobStatus::Claimed, None, 10)
                .await
                .unwrap();
            held > 0 && claimed.jobs.iter().any(|job| job.cancel_requested)
        }
    })
    .await;
    let mut second = tokio::spawn({
        let rt = rt.clone();
        async move { rt.cancel("twice").await }
    });
    if let Ok(answer) = tokio::time::timeout(GRACE, &mut second).await {
        panic!(
            "the second cancel answered {answer:?} while the first's commit was not durable ({} writes held)",
            faults.held()
        );
    }
    faults.release();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(
        matches!(
            (&first, &second),
            (Ok(true), Ok(false)) | (Ok(false), Ok(true))
        ),
        "exactly one cancel is the one accepted: {first:?}, {second:?}"
    );
    gate.open();
    let out = rt.wait("twice").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Cancelled, "{out:?}");
    stop.notify_one();
    worker.await.unwrap().unwrap();
}

/// A schedule's state must not be answered from a tick's commit that is
/// visible but not durable: a crash could still undo the run it names.
#[tokio::test]
async fn a_schedule_is_read_only_from_durable_ticks() {
    let store = FaultStore::new(Arc::new(InMemory::new()), 0, FaultPlan::default());
    let faults = store.faults();
    let clock = MockClock::new(T0);
    let queue = open_queue(store as Arc<dyn ObjectStore>, &clock).await;
    let runner = FnRunner::new(|_s: Step| async { Ok(StepOutcome::Succeed { result: vec![] }) });
    let rt = builder(queue, runner, NoopTerminalHook)
        .poll_interval(Duration::from_millis(5))
        .schedule(Schedule::every("s", Duration::from_secs(60)))
        .build()
        .unwrap();
    let stop = Arc::new(Notify::new());
    let worker = start(&rt, &stop);
    wait_until(BOUND, "the schedule is armed", || {
        let rt = rt.clone();
        async move { rt.schedule("s").await.unwrap().is_some() }
    })
    .await;
    faults.hold(StoreOp::Put, "wal");
    clock.advance(Duration::from_secs(61));
    let queue = rt.queue().clone();
    wait_until(BOUND, "the tick's run is visible, not durable", || {
        let queue = queue.clone();
        let held = faults.held();
        async move {
            let subs = queue
                .view()
                .kv_scan(
                    b"wm/workflow-steps/sub/",
                    ..,
                    taquba::KvOrder::Ascending,
                    10,
                )
                .await
                .unwrap();
            held > 0 && !subs.entries.is_empty()
        }
    })
    .await;
    let mut read = tokio::spawn({
        let rt = rt.clone();
        async move { rt.schedule("s").await }
    });
    if let Ok(answer) = tokio::time::timeout(GRACE, &mut read).await {
        panic!("the schedule was read from a tick not yet durable: {answer:?}");
    }
    faults.release();
    let info = read.await.unwrap().unwrap().expect("recorded");
    assert_eq!(info.run_count, 1, "{info:?}");
    stop.notify_one();
    worker.await.unwrap().unwrap();
}

/// A hook that counts its calls and blocks on a gate.
#[derive(Clone, Default)]
struct SlowHook {
    calls: Arc<AtomicU32>,
    started: Arc<Notify>,
    gate: Gate,
}

impl TerminalHook for SlowHook {
    async fn on_termination(&self, _outcome: &RunOutcome) -> Result<(), StepError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.started.notify_one();
        self.gate.wait().await;
        Ok(())
    }
}

/// Defect 6: a hook slower than its lease is delivered once, its lease
/// renewed like a step's.
#[tokio::test]
async fn a_hook_slower_than_its_lease_is_delivered_once() {
    let clock = MockClock::new(T0);
    let lease = Duration::from_millis(90);
    let opts = OpenOptions {
        clock: Arc::new(clock.clone()),
        flush_interval: Some(Duration::from_millis(1)),
        default_queue_config: QueueConfig::default()
            .retry_backoff_base(Duration::ZERO)
            .lease_duration(lease),
        ..OpenOptions::default()
    };
    let queue = Arc::new(
        Queue::open_with_options(Arc::new(InMemory::new()), "wm-test", opts)
            .await
            .unwrap(),
    );
    let hook = SlowHook::default();
    let runner = FnRunner::new(|_s: Step| async { Ok(StepOutcome::Succeed { result: vec![] }) });
    let rt = builder(queue.clone(), runner, hook.clone())
        .build()
        .unwrap();
    let stop = Arc::new(Notify::new());
    let worker = start(&rt, &stop);
    rt.submit(spec("slow-hook", b"")).await.unwrap();
    hook.started.notified().await;
    let hooks = "workflow-steps-hooks";
    let claimed = queue
        .view()
        .list_jobs(hooks, JobStatus::Claimed, None, 10)
        .await
        .unwrap()
        .jobs;
    let id = claimed[0].id.clone();
    use taquba::Clock;
    for round in 0..5 {
        let now = clock.now_ms();
        wait_until(
            BOUND,
            &format!("the hook's lease renewed (round {round})"),
            || {
                let expiry = queue.lease_expiry(hooks, &id);
                async move { expiry.is_some_and(|e| e > now + 2_500) }
            },
        )
        .await;
        clock.advance(Duration::from_secs(2));
        queue.reap_now().await.unwrap();
    }
    hook.gate.open();
    wait_until(BOUND, "the notification settled", || {
        let queue = queue.clone();
        async move { queue.view().stats(hooks).await.unwrap().claimed == 0 }
    })
    .await;
    stop.notify_one();
    worker.await.unwrap().unwrap();
    assert_eq!(hook.calls.load(Ordering::SeqCst), 1, "delivered once");
}

/// Defect 10: a delay beyond u64 milliseconds saturates instead of wrapping.
#[tokio::test]
async fn a_huge_delay_does_not_wrap_around() {
    let runner = FnRunner::new(|s: Step| async move {
        Ok(match s.step_number {
            0 => StepOutcome::ContinueAfter {
                payload: vec![],
                delay: Duration::from_millis(u64::MAX) + Duration::from_millis(386),
            },
            _ => StepOutcome::Succeed { result: vec![] },
        })
    });
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    env.start();
    env.submit("forever", b"").await;
    env.until_status("forever", |s| s.is_some_and(|s| s.current_step == 1))
        .await;
    env.clock.advance(Duration::from_secs(3600));
    env.queue().promote_scheduled_now().await.unwrap();
    let status = env.rt.status("forever").await.unwrap().unwrap();
    assert_eq!(status.state, RunState::Scheduled, "{status:?}");
    assert_eq!(runner.calls("forever", 1), 0);
    env.stop().await;
}

/// Defect 13: a run whose last attempt died with its process reads as
/// failed (not unknown) before any pool runs, without the read writing.
#[tokio::test]
async fn a_run_whose_last_attempt_died_reads_as_failed_before_a_pool_runs() {
    let (started, gate) = (Arc::new(Notify::new()), Gate::default());
    let runner = {
        let (started, gate) = (started.clone(), gate.clone());
        FnRunner::new(move |_s: Step| {
            let (started, gate) = (started.clone(), gate.clone());
            async move {
                started.notify_one();
                gate.wait().await;
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("died".into()),
            max_attempts_per_step: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    started.notified().await;
    let fresh = FnRunner::new(|_s: Step| async { Ok(StepOutcome::Succeed { result: vec![] }) });
    env.crash_and_reopen(fresh, NoopTerminalHook).await;
    let out = env
        .rt
        .outcome("died")
        .await
        .unwrap()
        .expect("the run is reported, not unknown");
    assert_eq!(out.status, TerminalStatus::Failed);
    assert!(out.error.as_deref().unwrap().contains("gave up"), "{out:?}");
    assert_eq!(env.rt.status("died").await.unwrap(), None, "it has ended");
    assert_eq!(env.rt.wait("died").await.unwrap(), out);
    assert!(!env.rt.cancel("died").await.unwrap(), "it has ended");
    // Nothing was written by those calls.
    let view = env.queue().view();
    assert!(view.kv_get(&key("run", "died")).await.unwrap().is_some());
    assert!(view.kv_get(&key("out", "died")).await.unwrap().is_none());
    // The pool records the same outcome.
    env.start();
    let queue = env.queue().clone();
    wait_until(BOUND, "the pool recorded the outcome", || {
        let queue = queue.clone();
        async move {
            queue
                .view()
                .kv_get(&key("out", "died"))
                .await
                .unwrap()
                .is_some()
        }
    })
    .await;
    assert_eq!(env.rt.outcome("died").await.unwrap(), Some(out));
    env.stop().await;
    gate.open();
}

/// Also-check: a transient error fetching a claimed job's offloaded payload
/// is a retry of that job, not a stop of the pool.
#[tokio::test]
async fn a_failed_payload_fetch_retries_the_step_and_the_pool_goes_on() {
    let payloads = FaultStore::new(
        Arc::new(InMemory::new()),
        0,
        FaultPlan {
            get_fail: 1000,
            ..FaultPlan::default()
        },
    );
    let faults = payloads.faults();
    let clock = MockClock::new(T0);
    let opts = OpenOptions {
        clock: Arc::new(clock.clone()),
        flush_interval: Some(Duration::from_millis(1)),
        default_queue_config: QueueConfig::default().retry_backoff_base(Duration::ZERO),
        payload_offload_threshold: Some(8),
        payload_store: Some(payloads as Arc<dyn ObjectStore>),
        ..OpenOptions::default()
    };
    let queue = Arc::new(
        Queue::open_with_options(Arc::new(InMemory::new()), "wm-test", opts)
            .await
            .unwrap(),
    );
    let runner =
        FnRunner::new(|s: Step| async move { Ok(StepOutcome::Succeed { result: s.payload }) });
    let rt = builder(queue.clone(), runner, NoopTerminalHook)
        .build()
        .unwrap();
    let stop = Arc::new(Notify::new());
    let worker = start(&rt, &stop);
    let input = b"an input long enough to be offloaded".to_vec();
    rt.submit(spec("offloaded", &input)).await.unwrap();
    wait_until(BOUND, "a payload fetch failed", || {
        let failed = faults.counts.failed_gets.load(Ordering::SeqCst);
        async move { failed > 0 }
    })
    .await;
    faults.set_active(false);
    // The claim whose payload could not be read is redelivered once its
    // lease ends.
    clock.advance(Duration::from_secs(31));
    queue.reap_now().await.unwrap();
    let out = tokio::time::timeout(BOUND, rt.wait("offloaded"))
        .await
        .expect("the step ran again")
        .unwrap();
    assert_eq!(out.result, Some(input));
    stop.notify_one();
    worker.await.unwrap().unwrap();
}

/// Also-check: the lease is renewed for the whole life of a claim, not only
/// while the runner runs. Here run `b`'s failed step waits in its settlement
/// for the workflow's writer lock, which run `a`'s settlement holds while the
/// store holds its commit, for far longer than the lease.
#[tokio::test]
async fn a_step_waiting_to_settle_keeps_its_lease() {
    let store = FaultStore::new(Arc::new(InMemory::new()), 0, FaultPlan::default());
    let faults = store.faults();
    let clock = MockClock::new(T0);
    let lease = Duration::from_millis(90);
    let opts = OpenOptions {
        clock: Arc::new(clock.clone()),
        flush_interval: Some(Duration::from_millis(1)),
        default_queue_config: QueueConfig::default()
            .retry_backoff_base(Duration::ZERO)
            .lease_duration(lease),
        ..OpenOptions::default()
    };
    let queue = Arc::new(
        Queue::open_with_options(store as Arc<dyn ObjectStore>, "wm-test", opts)
            .await
            .unwrap(),
    );
    let gates = [Gate::default(), Gate::default()];
    let started = Arc::new(Notify::new());
    let runner = {
        let (gates, started) = (gates.clone(), started.clone());
        FnRunner::new(move |s: Step| {
            let (gates, started) = (gates.clone(), started.clone());
            async move {
                if s.attempts > 1 {
                    return Ok(StepOutcome::Succeed { result: vec![] });
                }
                started.notify_one();
                gates[usize::from(s.run_id == "b")].wait().await;
                Err(StepError::transient("boom"))
            }
        })
    };
    let rt = builder(queue.clone(), runner.clone(), NoopTerminalHook)
        .build()
        .unwrap();
    let stop = Arc::new(Notify::new());
    let worker = start(&rt, &stop);
    rt.submit(spec("a", b"")).await.unwrap();
    started.notified().await;
    rt.submit(spec("b", b"")).await.unwrap();
    started.notified().await;
    let steps = "workflow-steps";
    let claimed = queue
        .view()
        .list_jobs(steps, JobStatus::Claimed, None, 10)
        .await
        .unwrap()
        .jobs;
    let b = claimed
        .iter()
        .find(|j| j.headers.get(HEADER_RUN_ID).map(String::as_str) == Some("b"))
        .unwrap()
        .id
        .clone();
    // `a` fails and settles holding the writer lock; the store holds its
    // commit. Then `b` fails and waits for the lock.
    faults.hold(StoreOp::Put, "wal");
    gates[0].open();
    wait_until(BOUND, "a's settlement held by the store", || {
        let held = faults.held();
        async move { held > 0 }
    })
    .await;
    gates[1].open();
    use taquba::Clock;
    // Far past the lease (and any renewal margin), in steps shorter than it.
    for round in 0..120 {
        clock.advance(Duration::from_millis(60));
        let now = clock.now_ms();
        wait_until(BOUND, &format!("b's lease renewed (round {round})"), || {
            let expiry = queue.lease_expiry(steps, &b);
            async move { expiry.is_some_and(|e| e > now + 60) }
        })
        .await;
    }
    faults.release();
    for id in ["a", "b"] {
        assert_eq!(rt.wait(id).await.unwrap().status, TerminalStatus::Succeeded);
    }
    stop.notify_one();
    worker.await.unwrap().unwrap();
    assert_eq!(runner.calls("b", 0), 2, "one failed attempt, one retry");
}

/// A runner or a hook that panics in `run_step` or `on_termination` itself,
/// before returning its future (a plain `fn` with code ahead of its `async`
/// block), is contained like a panic inside the future: the attempt is a
/// transient failure and is retried, and the pool goes on.
#[tokio::test]
async fn a_runner_or_hook_panicking_before_returning_its_future_is_contained() {
    struct Eager;
    impl StepRunner for Eager {
        #[allow(clippy::manual_async_fn)]
        fn run_step(
            &self,
            step: &Step,
        ) -> impl Future<Output = Result<StepOutcome, StepError>> + Send {
            if step.attempts == 1 {
                panic!("eager runner");
            }
            async {
                Ok(StepOutcome::Succeed {
                    result: b"second".to_vec(),
                })
            }
        }
    }
    #[derive(Clone, Default)]
    struct EagerHook(Arc<AtomicU32>);
    impl TerminalHook for EagerHook {
        #[allow(clippy::manual_async_fn)]
        fn on_termination(
            &self,
            _outcome: &RunOutcome,
        ) -> impl Future<Output = Result<(), StepError>> + Send {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("eager hook");
            }
            async { Ok(()) }
        }
    }
    let queue = open_queue(Arc::new(InMemory::new()), &MockClock::new(T0)).await;
    let hook = EagerHook::default();
    let rt = WorkflowRuntime::builder(queue, Eager, hook.clone())
        .default_retry_policy(RetryPolicy {
            initial: Duration::ZERO,
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let stop = Arc::new(Notify::new());
    let worker = tokio::spawn({
        let (rt, stop) = (rt.clone(), stop.clone());
        async move { rt.run(async move { stop.notified().await }).await }
    });
    rt.submit(spec("eager", b"x")).await.unwrap();
    // Uncontained, the panic ends the step's task with its claim held, and
    // the run waits for a lease lapse the mock clock never brings.
    let out = tokio::time::timeout(BOUND, rt.wait("eager"))
        .await
        .expect("the run never ended: the panic was not contained")
        .unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
    assert_eq!(out.result.as_deref(), Some(&b"second"[..]));
    let history = rt.history("eager").await.unwrap().unwrap();
    let first = format!("{:?}", history.steps[0].attempts[0]);
    assert!(first.contains("step panicked: eager runner"), "{first}");
    wait_until(BOUND, "the hook's second delivery", || {
        let calls = hook.0.clone();
        async move { calls.load(Ordering::SeqCst) >= 2 }
    })
    .await;
    stop.notify_one();
    worker.await.unwrap().unwrap();
}

/// A job whose offloaded payload object was deleted from the bucket (by a
/// lifecycle rule, by hand) can never run. It used to stop the pool: its
/// claim failed as permanent, and after a restart it failed again. Now the
/// pool goes on: the jobs claimed with it run once their leases lapse, it
/// is claimed alone from then on, and its run fails once the queue gives
/// up on it.
#[tokio::test]
async fn a_deleted_payload_object_fails_its_run_and_the_pool_goes_on() {
    use futures_util::TryStreamExt;
    use taquba::object_store::ObjectStoreExt;
    let runner = FnRunner::new(|step: Step| async move {
        Ok(StepOutcome::Succeed {
            result: step.payload.len().to_string().into_bytes(),
        })
    });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    // Over taquba's offload threshold (256 KiB): kept in its own object.
    env.submit("big", &vec![7u8; 300 * 1024]).await;
    let small: Vec<String> = (0..5).map(|i| format!("small-{i}")).collect();
    for id in &small {
        env.submit(id, b"x").await;
    }
    let listed: Vec<_> = env.store.list(None).try_collect().await.unwrap();
    let payloads: Vec<_> = listed
        .into_iter()
        .filter(|meta| meta.location.as_ref().starts_with("wm-test-payloads/"))
        .collect();
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    env.store.delete(&payloads[0].location).await.unwrap();
    env.start();

    let ended = |id: &str| {
        let rt = env.rt.clone();
        let id = id.to_string();
        async move { rt.outcome(&id).await.unwrap() }
    };
    let q = env.queue().clone();
    let mut outcome = None;
    for _ in 0..20 {
        // Let the pool claim what it can, then lapse the leases it holds.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        env.clock.advance(Duration::from_secs(31));
        q.reap_now().await.unwrap();
        outcome = ended("big").await;
        let mut all_small = true;
        for id in &small {
            all_small &= ended(id).await.is_some();
        }
        if outcome.is_some() && all_small {
            break;
        }
        let worker = env.worker.as_ref().unwrap();
        assert!(!worker.is_finished(), "the pool stopped");
    }
    for id in &small {
        let out = ended(id).await.expect("every small run ended");
        assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
    }
    let big = outcome.expect("the run whose payload is gone ended");
    // The queue gave up on it lease by lease; the worker's log names the
    // missing object's job.
    assert_eq!(big.status, TerminalStatus::Failed, "{big:?}");
    assert!(
        big.error
            .as_deref()
            .unwrap_or_default()
            .contains("gave up after 3 attempts"),
        "{big:?}"
    );
    // Still claiming: a new run goes through.
    env.submit("after", b"y").await;
    let after = tokio::time::timeout(BOUND, env.rt.wait("after"))
        .await
        .expect("the pool still runs")
        .unwrap();
    assert_eq!(after.status, TerminalStatus::Succeeded);
    env.stop().await;
}

/// A client request's claim keeps its lease while the request is applied,
/// however long that takes. Here a cancel's durable commit is held by the
/// store far longer than the lease: without the renewal the lease lapsed
/// between the cancel's effect and its reply, and the request was
/// delivered, and applied, again.
#[tokio::test]
async fn a_request_held_by_the_store_keeps_its_lease() {
    use taquba::Clock;
    let store = FaultStore::new(Arc::new(InMemory::new()), 0, FaultPlan::default());
    let faults = store.faults();
    let clock = MockClock::new(T0);
    let location = StoreLocation::new(store as Arc<dyn ObjectStore>, "wm");
    let options = StoreOptions::default()
        .flush_interval(Duration::from_millis(1))
        .inbox_touch_poll(Duration::from_millis(5))
        .taquba_options(OpenOptions {
            clock: Arc::new(clock.clone()),
            default_queue_config: QueueConfig::default()
                .retry_backoff_base(Duration::ZERO)
                .lease_duration(Duration::from_millis(90)),
            ..OpenOptions::default()
        });
    let queue = open_worker_store(&location, options).await.unwrap();
    let gate = Gate::default();
    let runner = {
        let gate = gate.clone();
        FnRunner::new(move |_s: Step| {
            let gate = gate.clone();
            async move {
                gate.wait().await;
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let rt = builder(queue.clone(), runner, NoopTerminalHook)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let stop = Arc::new(Notify::new());
    let worker = start(&rt, &stop);
    rt.submit(spec("held", b"x")).await.unwrap();
    wait_until(BOUND, "the step to run", || {
        let rt = rt.clone();
        async move { rt.status("held").await.unwrap().map(|s| s.state) == Some(RunState::Running) }
    })
    .await;
    let client = Client::open(
        &location,
        ClientOptions::default().refresh_interval(Duration::from_millis(5)),
    )
    .await
    .unwrap();
    faults.hold(StoreOp::Put, "wal");
    let sent = client.cancel("held").await.unwrap();
    let control = control_queue_name(DEFAULT_QUEUE_NAME);
    // The control job's id, from the inbox's record of the request.
    let job = Arc::new(std::sync::Mutex::new(None));
    wait_until(BOUND, "the cancel to be enqueued", || {
        let (queue, control, job) = (queue.clone(), control.clone(), job.clone());
        let request_id = sent.request_id.clone();
        async move {
            let record = queue.view().inbox_record(&control, &request_id).await;
            match record.unwrap().map(|r| r.outcome) {
                Some(taquba::InboxOutcome::Enqueue(enqueued)) => {
                    *job.lock().unwrap() = Some(enqueued.id().to_string());
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    let request = job.lock().unwrap().clone().unwrap();
    wait_until(BOUND, "the cancel to be claimed", || {
        let claimed = queue.lease_expiry(&control, &request).is_some();
        async move { claimed }
    })
    .await;
    // Far past the lease, in steps shorter than it: renewed each time.
    for round in 0..40 {
        clock.advance(Duration::from_millis(60));
        let now = clock.now_ms();
        wait_until(
            BOUND,
            &format!("the request's lease renewed (round {round})"),
            || {
                let expiry = queue.lease_expiry(&control, &request);
                async move { expiry.is_some_and(|e| e > now + 60) }
            },
        )
        .await;
    }
    faults.release();
    gate.open();
    let reply = client.wait_reply(&sent.request_id, BOUND).await.unwrap();
    // Answered once (the step may have settled first: then `false`).
    assert!(
        matches!(&reply, Reply::Cancelled { run_id, .. } if run_id == "held"),
        "{reply:?}"
    );
    rt.wait("held").await.unwrap();
    stop.notify_one();
    worker.await.unwrap().unwrap();
}
