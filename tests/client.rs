//! A worker and a client on one in-memory store: requests travel through
//! the inbox, answers through a `QueueReader`. Every wait is bounded by a
//! hang guard (`GUARD`), never a timing threshold: the assertions are on
//! what happened, not when.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use support::{FnRunner, Gate};
use taquba::object_store::memory::InMemory;
use taquba::object_store::{ObjectStore, path::Path};
use taquba::{EnqueueEntry, EnqueueOptions, InboxSender, OpenOptions, Queue};
use tokio::task::JoinHandle;
use waymark::*;

/// Only a hang guard: a healthy run answers in milliseconds.
const GUARD: Duration = Duration::from_secs(60);

type Rt = WorkflowRuntime<FnRunner, NoopTerminalHook>;

struct Env {
    location: StoreLocation,
    rt: Rt,
    client: Client,
    worker: JoinHandle<Result<(), Error>>,
}

fn fast_store() -> StoreOptions {
    StoreOptions::default()
        .flush_interval(Duration::from_millis(2))
        .inbox_touch_poll(Duration::from_millis(5))
}

fn fast_client() -> ClientOptions {
    ClientOptions::default().refresh_interval(Duration::from_millis(5))
}

impl Env {
    async fn new(runner: FnRunner, concurrency: usize) -> Env {
        Env::configured(runner, concurrency, |b| b).await
    }

    /// A worker whose builder `configure` completes (schedules, breakers).
    async fn configured(
        runner: FnRunner,
        concurrency: usize,
        configure: impl FnOnce(
            WorkflowRuntimeBuilder<FnRunner, NoopTerminalHook>,
        ) -> WorkflowRuntimeBuilder<FnRunner, NoopTerminalHook>,
    ) -> Env {
        let location = StoreLocation::new(Arc::new(InMemory::new()), "wm");
        let queue = open_worker_store(&location, fast_store()).await.unwrap();
        let builder = WorkflowRuntime::builder(queue, runner, NoopTerminalHook)
            .max_concurrent_steps(concurrency)
            .poll_interval(Duration::from_millis(10));
        let rt = configure(builder).build().unwrap();
        let worker = tokio::spawn({
            let rt = rt.clone();
            async move { rt.run(std::future::pending()).await }
        });
        let client = Client::open(&location, fast_client()).await.unwrap();
        Env {
            location,
            rt,
            client,
            worker,
        }
    }

    fn queue(&self) -> &Arc<Queue> {
        self.rt.queue()
    }

    /// Poll the client until `f` holds (the client lags the worker).
    async fn until<F, Fut>(&self, what: &str, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + GUARD;
        while !f().await {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

fn spec(id: &str, input: &[u8]) -> RunSpec {
    RunSpec {
        run_id: Some(id.into()),
        input: input.to_vec(),
        ..Default::default()
    }
}

fn echo() -> FnRunner {
    FnRunner::new(|s: Step| async move { Ok(StepOutcome::Succeed { result: s.payload }) })
}

/// A timeout longer than an `Instant` can hold (`Duration::MAX`) waits:
/// an answer that comes is returned, and one that never comes is waited
/// for without end, never a panic on the deadline's arithmetic.
#[tokio::test]
async fn a_timeout_past_what_an_instant_holds_waits_without_panicking() {
    let env = Env::new(echo(), 4).await;
    let c = &env.client;
    let sent = c
        .submit_and_wait(spec("forever", b"x"), Duration::MAX)
        .await
        .unwrap();
    assert!(sent.newly_submitted);
    let out = c.wait("forever", Duration::MAX).await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    let never = tokio::time::timeout(
        Duration::from_millis(200),
        c.wait_reply("no-such-request", Duration::MAX),
    )
    .await;
    assert!(never.is_err(), "still waiting, not {never:?}");
    // A refresh interval of `Duration::MAX` ("never refresh") and a page
    // limit of `usize::MAX` are taken, not a panic.
    let options = fast_client().refresh_interval(Duration::MAX);
    let still = Client::open(&env.location, options).await.unwrap();
    still.close().await.unwrap();
    let dead = c.dead_jobs(DeadKind::Step, None, usize::MAX).await.unwrap();
    assert!(dead.is_empty(), "{dead:?}");
}

#[tokio::test]
async fn submit_applies_once_with_the_runtimes_idempotency() {
    let env = Env::new(echo(), 4).await;
    let c = &env.client;
    let first = c.submit_and_wait(spec("r1", b"a"), GUARD).await.unwrap();
    assert_eq!(
        first,
        SubmitOutcome {
            run_id: "r1".into(),
            newly_submitted: true
        }
    );
    let again = c.submit_and_wait(spec("r1", b"a"), GUARD).await.unwrap();
    assert!(!again.newly_submitted);
    let other = c.submit_and_wait(spec("r1", b"b"), GUARD).await;
    assert!(
        matches!(&other, Err(Error::InputMismatch(id)) if id == "r1"),
        "{other:?}"
    );
    let out = c.wait("r1", GUARD).await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(out.result.as_deref(), Some(&b"a"[..]));
    assert_eq!(env.rt.outcome("r1").await.unwrap(), Some(out));
    // A generated run id comes back in the reply.
    let generated = c
        .submit_and_wait(
            RunSpec {
                input: b"g".to_vec(),
                ..Default::default()
            },
            GUARD,
        )
        .await
        .unwrap();
    assert!(generated.newly_submitted);
    assert_eq!(
        c.wait(&generated.run_id, GUARD).await.unwrap().result,
        Some(b"g".to_vec())
    );
}

#[tokio::test]
async fn a_request_sent_twice_with_one_id_is_applied_once() {
    let env = Env::new(echo(), 4).await;
    let c = &env.client;
    c.submit_with_id("req-1", spec("once", b"x")).await.unwrap();
    // The same id again, even with another run: deleted without effect.
    c.submit_with_id("req-1", spec("twice", b"y"))
        .await
        .unwrap();
    let reply = c.wait_reply("req-1", GUARD).await.unwrap();
    assert_eq!(
        reply,
        Reply::Submitted(SubmitOutcome {
            run_id: "once".into(),
            newly_submitted: true
        })
    );
    c.wait("once", GUARD).await.unwrap();
    // A later request shows that the worker went past the duplicate.
    c.submit_and_wait(spec("after", b"z"), GUARD).await.unwrap();
    assert_eq!(env.rt.outcome("twice").await.unwrap(), None);
    assert_eq!(env.rt.status("twice").await.unwrap(), None);
}

/// Every object under `prefix`.
async fn objects(store: &Arc<dyn ObjectStore>, prefix: &str) -> usize {
    use futures_util::StreamExt;
    store
        .list(Some(&Path::from(prefix)))
        .filter(|m| std::future::ready(m.is_ok()))
        .count()
        .await
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_is_written() {
    let env = Env::new(echo(), 4).await;
    let store = env.location.object_store().clone();
    let inbox = env.location.inbox_path();
    let before = objects(&store, &inbox).await;
    let mut reserved = HashMap::new();
    reserved.insert("workflow.step".to_string(), "1".to_string());
    let cases = [
        spec("bad id", b"x"),
        RunSpec {
            headers: reserved,
            ..spec("ok", b"x")
        },
        spec("big", &vec![0; MAX_PAYLOAD_BYTES + 1]),
        RunSpec {
            workflow: Some("bad/wf".into()),
            ..spec("ok", b"x")
        },
        RunSpec {
            max_attempts_per_step: Some(0),
            ..spec("ok", b"x")
        },
    ];
    for case in cases {
        let from_client = env.client.submit(case.clone()).await.unwrap_err();
        let from_runtime = env.rt.submit(case).await.unwrap_err();
        // The same typed error as the runtime's own submit.
        assert_eq!(format!("{from_client:?}"), format!("{from_runtime:?}"));
        assert!(from_client.is_permanent());
    }
    assert!(matches!(
        env.client.cancel("no such id").await,
        Err(Error::InvalidRunId { .. })
    ));
    assert!(matches!(
        env.client.submit_with_id("no.dots", spec("ok", b"x")).await,
        Err(Error::InvalidRunId {
            what: "request id",
            ..
        })
    ));
    assert_eq!(objects(&store, &inbox).await, before, "nothing was sent");
}

#[tokio::test]
async fn cancel_removes_a_pending_step_and_stops_a_running_one() {
    let gate = Gate::default();
    let runner = FnRunner::new({
        let gate = gate.clone();
        move |s: Step| {
            let gate = gate.clone();
            async move {
                gate.wait().await;
                Ok(StepOutcome::Succeed { result: s.payload })
            }
        }
    });
    // One slot: the first run holds it, the second waits pending.
    let env = Env::new(runner, 1).await;
    let c = &env.client;
    c.submit_and_wait(spec("running", b"1"), GUARD)
        .await
        .unwrap();
    env.until("the first run runs", || async {
        matches!(c.status("running").await.unwrap(), Some(s) if s.state == RunState::Running)
    })
    .await;
    c.submit_and_wait(spec("waiting", b"2"), GUARD)
        .await
        .unwrap();
    let pending = env.rt.status("waiting").await.unwrap().unwrap();
    assert_eq!(pending.state, RunState::Pending);

    assert!(c.cancel_and_wait("waiting", GUARD).await.unwrap());
    // A pending step is removed: the run ended in the cancel's commit.
    let out = env.rt.outcome("waiting").await.unwrap().unwrap();
    assert_eq!(out.status, TerminalStatus::Cancelled);

    assert!(c.cancel_and_wait("running", GUARD).await.unwrap());
    assert_eq!(
        env.rt.status("running").await.unwrap().unwrap().state,
        RunState::Cancelling
    );
    // A second cancel is not accepted again.
    assert!(!c.cancel_and_wait("running", GUARD).await.unwrap());
    gate.open();
    let out = c.wait("running", GUARD).await.unwrap();
    assert_eq!(out.status, TerminalStatus::Cancelled);
    assert!(!c.cancel_and_wait("unknown", GUARD).await.unwrap());
}

#[tokio::test]
async fn reads_agree_with_the_runtime() {
    let gate = Gate::default();
    let runner = FnRunner::new({
        let gate = gate.clone();
        move |s: Step| {
            let gate = gate.clone();
            async move {
                match &s.payload[..] {
                    b"ok" => Ok(StepOutcome::Succeed { result: vec![] }),
                    b"fail" => Err(StepError::permanent("no")),
                    b"later" => Ok(StepOutcome::ContinueAfter {
                        payload: b"ok".to_vec(),
                        delay: Duration::from_secs(3600),
                    }),
                    _ => {
                        gate.wait().await;
                        Ok(StepOutcome::Succeed { result: vec![] })
                    }
                }
            }
        }
    });
    let env = Env::new(runner, 4).await;
    let c = &env.client;
    for (id, input, workflow) in [
        ("a-ok", "ok", "alpha"),
        ("b-fail", "fail", "alpha"),
        ("c-later", "later", "beta"),
        ("d-block", "block", "beta"),
        ("e-ok", "ok", "beta"),
    ] {
        let spec = RunSpec {
            workflow: Some(workflow.into()),
            ..spec(id, input.as_bytes())
        };
        c.submit_and_wait(spec, GUARD).await.unwrap();
    }
    for id in ["a-ok", "b-fail", "e-ok"] {
        c.wait(id, GUARD).await.unwrap();
    }
    // b-fail's step job died with it (in its ending's transaction), and is
    // found by its id; an id no job has is not.
    let dead = c.dead_jobs(DeadKind::Step, None, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].run_id.as_deref(), Some("b-fail"));
    assert_eq!(
        c.dead_job(&dead[0].job_id).await.unwrap().as_ref(),
        Some(&dead[0])
    );
    assert_eq!(c.dead_job("01NOSUCHJOB").await.unwrap(), None);
    env.until("the blocked step runs", || async {
        matches!(c.status("d-block").await.unwrap(), Some(s) if s.state == RunState::Running)
    })
    .await;
    env.until("c-later is scheduled", || async {
        matches!(c.status("c-later").await.unwrap(), Some(s) if s.state == RunState::Scheduled)
    })
    .await;
    // Nothing changes now: the client's view catches up and then agrees.
    let filters = [
        RunFilter::default(),
        RunFilter {
            state: Some(StateFilter::Live),
            ..Default::default()
        },
        RunFilter {
            state: Some(StateFilter::Ended),
            ..Default::default()
        },
        RunFilter {
            state: Some(StateFilter::Is(RunPhase::Ended(TerminalStatus::Failed))),
            ..Default::default()
        },
        RunFilter {
            workflow: Some("beta".into()),
            ..Default::default()
        },
        RunFilter {
            limit: 2,
            after: Some("b-fail".into()),
            ..Default::default()
        },
    ];
    env.until("the client's view agrees", || async {
        let health = env.rt.workflows().await.unwrap();
        let mut same = c.workflows().await.unwrap() == health;
        for f in &filters {
            same &= c.runs(f).await.unwrap() == env.rt.runs(f).await.unwrap();
        }
        same
    })
    .await;
    for id in ["a-ok", "b-fail", "c-later", "d-block", "e-ok", "nope"] {
        assert_eq!(
            c.status(id).await.unwrap(),
            env.rt.status(id).await.unwrap()
        );
        assert_eq!(
            c.outcome(id).await.unwrap(),
            env.rt.outcome(id).await.unwrap()
        );
    }
    assert_eq!(
        c.workflow_health("alpha").await.unwrap(),
        env.rt.workflow_health("alpha").await.unwrap()
    );
    // The listings say what the runs are.
    let all = c.runs(&RunFilter::default()).await.unwrap();
    let phases: Vec<_> = all
        .runs
        .iter()
        .map(|r| (r.run_id.as_str(), r.phase))
        .collect();
    assert_eq!(
        phases,
        [
            ("a-ok", RunPhase::Ended(TerminalStatus::Succeeded)),
            ("b-fail", RunPhase::Ended(TerminalStatus::Failed)),
            ("c-later", RunPhase::Live(RunState::Scheduled)),
            ("d-block", RunPhase::Live(RunState::Running)),
            ("e-ok", RunPhase::Ended(TerminalStatus::Succeeded)),
        ]
    );
    assert_eq!(all.next, None);
    let page = c
        .runs(&RunFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.runs.len(), 2);
    assert_eq!(page.next.as_deref(), Some("b-fail"));
    let beta = c
        .runs(&RunFilter {
            workflow: Some("beta".into()),
            state: Some(StateFilter::Live),
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<_> = beta.runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, ["c-later", "d-block"]);
    let alpha = c.workflow_health("alpha").await.unwrap().unwrap();
    assert_eq!((alpha.runs_succeeded, alpha.runs_failed), (1, 1));
    gate.open();
}

#[tokio::test]
async fn a_malformed_request_is_refused_and_the_worker_goes_on() {
    let env = Env::new(echo(), 4).await;
    let sender = InboxSender::new(
        env.location.object_store().clone(),
        env.location.inbox_path(),
    );
    let control = control_queue_name(DEFAULT_QUEUE_NAME);
    let garbage = EnqueueEntry {
        payload: b"\xc1 not a request".to_vec(),
        options: EnqueueOptions::default().id_override("bad-1".to_string()),
    };
    sender
        .send_with_id(&control, "bad-1", garbage)
        .await
        .unwrap();
    let refused = env.client.wait_reply("bad-1", GUARD).await;
    assert!(
        matches!(&refused, Err(Error::RequestRefused { request_id, reason })
            if request_id == "bad-1" && reason.contains("does not decode")),
        "{refused:?}"
    );
    let dead = env
        .queue()
        .view()
        .dead_jobs(&control, None, 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, "bad-1");
    // A dead request is not a dead step or hook job.
    assert_eq!(env.client.dead_job("bad-1").await.unwrap(), None);
    // The worker goes on.
    let ok = env
        .client
        .submit_and_wait(spec("fine", b"x"), GUARD)
        .await
        .unwrap();
    assert!(ok.newly_submitted);
    env.client.wait("fine", GUARD).await.unwrap();
}

#[tokio::test]
async fn only_waymark_stores_are_opened() {
    // Nothing there.
    let empty = StoreLocation::new(Arc::new(InMemory::new()), "wm");
    assert!(matches!(
        Client::open(&empty, fast_client()).await,
        Err(Error::NotAWaymarkStore { .. })
    ));
    // Another program's queue.
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let foreign = Queue::open_with_options(store.clone(), "wm", OpenOptions::default())
        .await
        .unwrap();
    foreign.enqueue("emails", b"hi".to_vec()).await.unwrap();
    foreign.close().await.unwrap();
    let location = StoreLocation::new(store, "wm");
    let client = Client::open(&location, fast_client()).await;
    assert!(
        matches!(&client, Err(Error::NotAWaymarkStore { .. })),
        "{:?}",
        client.err()
    );
    let worker = open_worker_store(&location, fast_store()).await;
    assert!(
        matches!(&worker, Err(Error::NotAWaymarkStore { reason, .. }) if reason.contains("did not write")),
        "{:?}",
        worker.err()
    );
    // A Waymark store of another format.
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let queue = Queue::open(store.clone(), "wm").await.unwrap();
    queue
        .kv_put(
            b"wm/store",
            &rmp_serde::to_vec_named(&serde_json::json!({"format": 99, "written_by": "9.9"}))
                .unwrap(),
        )
        .await
        .unwrap();
    queue.close().await.unwrap();
    let location = StoreLocation::new(store, "wm");
    assert!(matches!(
        Client::open(&location, fast_client()).await,
        Err(Error::IncompatibleStore {
            found: 99,
            supported: STORE_FORMAT,
            ..
        })
    ));
    assert!(matches!(
        open_worker_store(&location, fast_store()).await,
        Err(Error::IncompatibleStore { found: 99, .. })
    ));
}

#[tokio::test]
async fn a_client_never_fences_the_worker() {
    let env = Env::new(echo(), 4).await;
    for i in 0..3 {
        // A new client each time: opening one must not take the store.
        let client = Client::open(&env.location, fast_client()).await.unwrap();
        let id = format!("run-{i}");
        client
            .submit_and_wait(spec(&id, b"x"), GUARD)
            .await
            .unwrap();
        client.wait(&id, GUARD).await.unwrap();
        client.close().await.unwrap();
    }
    // The worker still commits.
    env.rt.submit(spec("direct", b"y")).await.unwrap();
    assert!(!env.worker.is_finished());
    let beat = env.client.worker_heartbeat().await.unwrap();
    assert!(beat.is_some_and(|b| !b.closed));
}

#[tokio::test]
async fn a_request_delivered_again_after_its_effect_is_not_applied_twice() {
    // The state a crash between a submit's commit (which carries the
    // reply) and the ack of its control job leaves: the job is claimable
    // again. Rebuilt here by enqueueing the same job a second time.
    let location = StoreLocation::new(Arc::new(InMemory::new()), "wm");
    let hour = Duration::from_secs(3600);
    // The inbox is applied only when the test says so.
    let options = fast_store().inbox_touch_poll(hour).inbox_interval(hour);
    let queue = open_worker_store(&location, options).await.unwrap();
    let client = Client::open(&location, fast_client()).await.unwrap();
    let sent = client.submit(spec("x", b"in")).await.unwrap();
    let control = control_queue_name(DEFAULT_QUEUE_NAME);
    let sender = InboxSender::new(location.object_store().clone(), location.inbox_path());
    let pending = sender.pending(&control).await.unwrap();
    assert_eq!(pending.len(), 1);
    let taquba::EntryRead::Entry(taquba::InboxEntry::Enqueue(entry)) =
        sender.read(&pending[0]).await.unwrap()
    else {
        panic!("the request is an enqueue entry");
    };
    queue.apply_inbox_now().await.unwrap();

    let rt = WorkflowRuntime::builder(queue.clone(), echo(), NoopTerminalHook)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let worker = tokio::spawn({
        let rt = rt.clone();
        async move { rt.run(std::future::pending()).await }
    });
    let first = client.wait_reply(&sent.request_id, GUARD).await.unwrap();
    let created = Reply::Submitted(SubmitOutcome {
        run_id: "x".into(),
        newly_submitted: true,
    });
    assert_eq!(first, created);
    client.wait("x", GUARD).await.unwrap();
    let done_before = queue.view().stats(&control).await.unwrap().done;

    queue
        .enqueue_with(&control, entry.payload, entry.options)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + GUARD;
    while queue.view().stats(&control).await.unwrap().done == done_before {
        assert!(tokio::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Settled without applying it again: the answer is still "created".
    assert_eq!(
        queue.view().stats(&control).await.unwrap().dead,
        0,
        "acked, not refused"
    );
    // A later commit, once visible, shows the client's view is past the ack.
    rt.submit(spec("later", b"y")).await.unwrap();
    let deadline = tokio::time::Instant::now() + GUARD;
    while client.outcome("later").await.unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never visible");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(client.reply(&sent.request_id).await.unwrap(), Some(created));
    worker.abort();
}

#[tokio::test]
async fn requests_about_one_run_apply_in_send_order() {
    let location = StoreLocation::new(Arc::new(InMemory::new()), "wm");
    let hour = Duration::from_secs(3600);
    let options = fast_store().inbox_touch_poll(hour).inbox_interval(hour);
    let queue = open_worker_store(&location, options).await.unwrap();
    let client = Client::open(&location, fast_client()).await.unwrap();
    // A submit and a cancel per run, sent back to back: one inbox pass
    // enqueues all of them, and the worker claims them in batches.
    let mut cancels = Vec::new();
    for i in 0..24 {
        let id = format!("run-{i}");
        client.submit(spec(&id, b"x")).await.unwrap();
        cancels.push(client.cancel(&id).await.unwrap());
    }
    queue.apply_inbox_now().await.unwrap();
    let sleepy = FnRunner::new(|_| async {
        Ok(StepOutcome::ContinueAfter {
            payload: vec![],
            delay: Duration::from_secs(3600),
        })
    });
    let rt = WorkflowRuntime::builder(queue.clone(), sleepy, NoopTerminalHook)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let worker = tokio::spawn({
        let rt = rt.clone();
        async move { rt.run(std::future::pending()).await }
    });
    for sent in &cancels {
        let reply = client.wait_reply(&sent.request_id, GUARD).await.unwrap();
        assert_eq!(
            reply,
            Reply::Cancelled {
                run_id: sent.run_id.clone(),
                cancelled: true
            },
            "the cancel came after its submit"
        );
        let out = client.wait(&sent.run_id, GUARD).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Cancelled);
    }
    worker.abort();
}

/// Requests about one run apply in send order even when their ids sort the
/// other way: the inbox applies a pass's entries at one clock reading (a
/// `MockClock` that never moves here), and the control queue orders jobs of
/// one moment by id, so ids alone would claim each `…-cancel` before its
/// `…-submit`.
#[tokio::test]
async fn requests_about_one_run_apply_in_send_order_whatever_their_ids() {
    let location = StoreLocation::new(Arc::new(InMemory::new()), "wm");
    let hour = Duration::from_secs(3600);
    let clock = taquba::MockClock::new(support::T0);
    let base = OpenOptions {
        clock: Arc::new(clock.clone()),
        ..OpenOptions::default()
    };
    let options = fast_store()
        .inbox_touch_poll(hour)
        .inbox_interval(hour)
        .taquba_options(base);
    let queue = open_worker_store(&location, options).await.unwrap();
    let client = Client::open(&location, fast_client()).await.unwrap();
    let mut cancels = Vec::new();
    for i in 0..8 {
        let id = format!("run-{i}");
        client
            .submit_with_id(&format!("{id}-submit"), spec(&id, b"x"))
            .await
            .unwrap();
        cancels.push(
            client
                .cancel_with_id(&format!("{id}-cancel"), &id)
                .await
                .unwrap(),
        );
    }
    queue.apply_inbox_now().await.unwrap();
    let sleepy = FnRunner::new(|_| async {
        Ok(StepOutcome::ContinueAfter {
            payload: vec![],
            delay: Duration::from_secs(3600),
        })
    });
    let rt = WorkflowRuntime::builder(queue.clone(), sleepy, NoopTerminalHook)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let worker = tokio::spawn({
        let rt = rt.clone();
        async move { rt.run(std::future::pending()).await }
    });
    for sent in &cancels {
        let reply = client.wait_reply(&sent.request_id, GUARD).await.unwrap();
        assert_eq!(
            reply,
            Reply::Cancelled {
                run_id: sent.run_id.clone(),
                cancelled: true
            },
            "the cancel came after its submit"
        );
        let out = client.wait(&sent.run_id, GUARD).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Cancelled);
    }
    worker.abort();
}

#[tokio::test]
async fn schedules_are_read_and_driven_through_the_client() {
    // `held` runs wait for the gate; `bad` runs fail, and one failure trips
    // their workflow.
    let hold = Gate::default();
    let runner = FnRunner::new({
        let hold = hold.clone();
        move |s: Step| {
            let hold = hold.clone();
            async move {
                match s.workflow.as_str() {
                    "slow" => hold.wait().await,
                    "bad" => return Err(StepError::permanent("down")),
                    _ => {}
                }
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        }
    });
    let trip_at_once = BackoffPolicy {
        streak_limit: Some(1),
        jitter: 0.0,
        ..BackoffPolicy::default()
    };
    let env = Env::configured(runner, 4, |b| {
        b.schedule(Schedule::manual("held").workflow("slow"))
            .schedule(Schedule::manual("tripper").workflow("bad"))
            .schedule(Schedule::every_hours("hourly", 1))
            .breaker("bad", trip_at_once)
    })
    .await;
    let c = &env.client;

    // Reads: the runtime's answers, sorted by id; None for an unknown id.
    env.until("the schedules are listed", || async {
        c.schedules().await.unwrap() == env.rt.schedules().await.unwrap()
            && c.schedules().await.unwrap().len() == 3
    })
    .await;
    let ids: Vec<String> = c
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids, ["held", "hourly", "tripper"]);
    assert_eq!(
        c.schedule("hourly").await.unwrap(),
        env.rt.schedule("hourly").await.unwrap()
    );
    assert_eq!(c.schedule("nope").await.unwrap(), None);
    assert!(matches!(
        c.schedule("bad/id").await,
        Err(Error::InvalidRunId { .. })
    ));

    // Trigger: the run id, or the runtime's typed refusals.
    let unknown = c.trigger_and_wait("nope", GUARD).await;
    assert!(
        matches!(&unknown, Err(Error::ScheduleNotFound(id)) if id == "nope"),
        "{unknown:?}"
    );
    let live = c.trigger_and_wait("held", GUARD).await.unwrap();
    assert!(live.starts_with("held:t"), "{live}");
    assert_eq!(
        env.rt.schedule("held").await.unwrap().unwrap().last_run_id,
        Some(live.clone())
    );
    let overlap = c.trigger_and_wait("held", GUARD).await;
    assert!(
        matches!(&overlap, Err(Error::ScheduleOverlap { schedule, run_id }) if schedule == "held" && *run_id == live),
        "{overlap:?}"
    );
    hold.open();
    assert_eq!(
        c.wait(&live, GUARD).await.unwrap().status,
        TerminalStatus::Succeeded
    );
    let failed = c.trigger_and_wait("tripper", GUARD).await.unwrap();
    assert_eq!(
        c.wait(&failed, GUARD).await.unwrap().status,
        TerminalStatus::Failed
    );
    env.until("the workflow trips", || async {
        matches!(
            env.rt
                .workflow_health("bad")
                .await
                .unwrap()
                .map(|h| h.status),
            Some(BreakerStatus::Tripped { .. })
        )
    })
    .await;
    let tripped = c.trigger_and_wait("tripper", GUARD).await;
    assert!(
        matches!(&tripped, Err(Error::WorkflowTripped { schedule, workflow }) if schedule == "tripper" && workflow == "bad"),
        "{tripped:?}"
    );
    assert_eq!(
        env.rt.schedule("tripper").await.unwrap().unwrap().run_count,
        1
    );

    // Pause and resume: durable, and answered as the runtime answers.
    assert!(c.pause_and_wait("hourly", GUARD).await.unwrap());
    assert!(!c.pause_and_wait("hourly", GUARD).await.unwrap());
    let paused = env.rt.schedule("hourly").await.unwrap().unwrap();
    assert!(paused.paused && paused.next_fire.is_none(), "{paused:?}");
    env.until("the pause is visible", || async {
        c.schedule("hourly")
            .await
            .unwrap()
            .is_some_and(|i| i.paused)
    })
    .await;
    assert!(c.resume_and_wait("hourly", GUARD).await.unwrap());
    assert!(!c.resume_and_wait("hourly", GUARD).await.unwrap());
    let resumed = env.rt.schedule("hourly").await.unwrap().unwrap();
    assert!(
        !resumed.paused && resumed.next_fire.is_some(),
        "{resumed:?}"
    );
    let unknown = c.pause_and_wait("nope", GUARD).await;
    assert!(
        matches!(unknown, Err(Error::ScheduleNotFound(_))),
        "{unknown:?}"
    );
}
