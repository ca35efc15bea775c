//! Signal waits: `StepOutcome::WaitForSignal`, `WorkflowRuntime::signal`
//! and `Client::signal`, on an in-memory store with taquba's `MockClock`
//! and gates (no sleeps decide anything).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use taquba::object_store::memory::InMemory;
use waymark::*;

const HOUR: Duration = Duration::from_secs(3600);

type Seen = Arc<Mutex<Vec<Option<Vec<u8>>>>>;

/// Step 0 (after `gate` opens) waits an hour for a signal; step 1 records
/// what it saw and succeeds with it (`timeout` when none came).
fn approval(gate: Gate, seen: Seen) -> FnRunner {
    FnRunner::new(move |s: Step| {
        let (gate, seen) = (gate.clone(), seen.clone());
        async move {
            match s.step_number {
                0 => {
                    gate.wait().await;
                    Ok(StepOutcome::WaitForSignal {
                        payload: b"order".to_vec(),
                        timeout: HOUR,
                    })
                }
                _ => {
                    assert_eq!(s.payload, b"order");
                    seen.lock().unwrap().push(s.signal.clone());
                    let result = s.signal.clone().unwrap_or_else(|| b"timeout".to_vec());
                    Ok(StepOutcome::Succeed { result })
                }
            }
        }
    })
}

fn open_gate() -> Gate {
    let gate = Gate::default();
    gate.open();
    gate
}

async fn waiting(env: &Env<NoopTerminalHook>, id: &str) {
    env.until_status(id, |s| {
        s.is_some_and(|s| s.state == RunState::WaitingForSignal)
    })
    .await;
}

#[tokio::test]
async fn a_signal_before_the_wait_commits_is_refused_and_one_during_it_is_seen() {
    let (gate, seen) = (Gate::default(), Seen::default());
    let runner = approval(gate.clone(), seen.clone());
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    env.start();
    env.submit("a", b"").await;
    env.until_status("a", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    // Step 0 runs: its wait is not committed, so nothing waits.
    let early = env.rt.signal("a", b"too soon".to_vec()).await;
    assert!(
        matches!(&early, Err(Error::NotWaiting(id)) if id == "a"),
        "{early:?}"
    );
    gate.open();
    waiting(&env, "a").await;
    let status = env.rt.status("a").await.unwrap().unwrap();
    assert_eq!(status.current_step, 1);
    assert_eq!(
        status.scheduled_for,
        Some(std::time::UNIX_EPOCH + Duration::from_millis(T0) + HOUR)
    );
    assert_eq!(runner.calls("a", 1), 0, "the wait runs nothing");
    env.rt.signal("a", b"approved".to_vec()).await.unwrap();
    let out = env.rt.wait("a").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(out.result.as_deref(), Some(&b"approved"[..]));
    assert_eq!(*seen.lock().unwrap(), vec![Some(b"approved".to_vec())]);
    assert_eq!(runner.calls("a", 0), 1);
    env.stop().await;
}

#[tokio::test]
async fn the_timeout_runs_the_next_step_without_a_signal() {
    let seen = Seen::default();
    let mut env = Env::new(approval(open_gate(), seen.clone()), NoopTerminalHook).await;
    env.start();
    env.submit("t", b"").await;
    waiting(&env, "t").await;
    env.clock.advance(HOUR - Duration::from_millis(1));
    env.queue().promote_scheduled_now().await.unwrap();
    assert_eq!(
        env.rt.status("t").await.unwrap().unwrap().state,
        RunState::WaitingForSignal
    );
    env.clock.advance(Duration::from_millis(1));
    env.queue().promote_scheduled_now().await.unwrap();
    let out = env.rt.wait("t").await.unwrap();
    assert_eq!(out.result.as_deref(), Some(&b"timeout"[..]));
    assert_eq!(*seen.lock().unwrap(), vec![None]);
    // The wait is over: a late signal is refused.
    let late = env.rt.signal("t", b"late".to_vec()).await;
    assert!(matches!(late, Err(Error::NotWaiting(_))), "{late:?}");
    env.stop().await;
}

#[tokio::test]
async fn a_second_signal_is_refused() {
    let seen = Seen::default();
    let step1 = Gate::default();
    let runner = {
        let inner = approval(open_gate(), seen);
        let step1 = step1.clone();
        FnRunner::new(move |s: Step| {
            let (inner, step1) = (inner.clone(), step1.clone());
            async move {
                if s.step_number == 1 {
                    step1.wait().await;
                }
                inner.run_step(&s).await
            }
        })
    };
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.submit("twice", b"").await;
    waiting(&env, "twice").await;
    env.rt.signal("twice", b"first".to_vec()).await.unwrap();
    // Delivered: the step is due (or running), no longer waiting.
    let second = env.rt.signal("twice", b"second".to_vec()).await;
    assert!(matches!(second, Err(Error::NotWaiting(_))), "{second:?}");
    step1.open();
    let out = env.rt.wait("twice").await.unwrap();
    assert_eq!(out.result.as_deref(), Some(&b"first"[..]));
    let ended = env.rt.signal("twice", b"third".to_vec()).await;
    assert!(matches!(ended, Err(Error::NotWaiting(_))), "{ended:?}");
    let unknown = env.rt.signal("nobody", b"x".to_vec()).await;
    assert!(matches!(unknown, Err(Error::RunNotFound(_))), "{unknown:?}");
    let big = env.rt.signal("twice", vec![0; MAX_SIGNAL_BYTES + 1]).await;
    assert!(
        matches!(big, Err(Error::PayloadTooLarge { what: "signal", .. })),
        "{big:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn the_wait_holds_no_worker_and_spends_no_attempt() {
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let runner = {
        let attempts = attempts.clone();
        FnRunner::new(move |s: Step| {
            let attempts = attempts.clone();
            async move {
                if s.run_id == "other" {
                    return Ok(StepOutcome::Succeed { result: vec![] });
                }
                attempts.lock().unwrap().push((s.step_number, s.attempts));
                match s.step_number {
                    0 => Ok(StepOutcome::WaitForSignal {
                        payload: vec![],
                        timeout: HOUR,
                    }),
                    // The woken step fails once: its retry keeps the signal.
                    1 if s.attempts == 1 => Err(StepError::transient("flaky")),
                    _ => Ok(StepOutcome::Succeed {
                        result: s.signal.clone().unwrap_or_default(),
                    }),
                }
            }
        })
    };
    let mut env = Env::configured(runner, NoopTerminalHook, |b| b.max_concurrent_steps(1)).await;
    env.start();
    env.submit("w", b"").await;
    waiting(&env, "w").await;
    // One worker slot, and the waiting run does not hold it.
    env.submit("other", b"").await;
    assert_eq!(
        env.rt.wait("other").await.unwrap().status,
        TerminalStatus::Succeeded
    );
    env.rt.signal("w", b"go".to_vec()).await.unwrap();
    let out = env.rt.wait("w").await.unwrap();
    assert_eq!(out.result.as_deref(), Some(&b"go"[..]));
    assert_eq!(*attempts.lock().unwrap(), vec![(0, 1), (1, 1), (1, 2)]);
    env.stop().await;
}

#[tokio::test]
async fn a_wait_survives_a_restart() {
    let seen = Seen::default();
    let runner = approval(open_gate(), seen.clone());
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    env.start();
    env.submit("r", b"").await;
    waiting(&env, "r").await;
    env.crash_and_reopen(runner.clone(), NoopTerminalHook).await;
    // The new process sees the wait before its pool runs, and takes the
    // signal.
    assert_eq!(
        env.rt.status("r").await.unwrap().unwrap().state,
        RunState::WaitingForSignal
    );
    env.rt.signal("r", b"after restart".to_vec()).await.unwrap();
    env.start();
    let out = env.rt.wait("r").await.unwrap();
    assert_eq!(out.result.as_deref(), Some(&b"after restart"[..]));
    assert_eq!(runner.calls("r", 0), 1, "step 0 did not run again");
    env.stop().await;
}

#[tokio::test]
async fn cancel_ends_a_wait() {
    let seen = Seen::default();
    let hook = RecordingHook::default();
    let runner = approval(open_gate(), seen);
    let mut env = Env::new(runner.clone(), hook.clone()).await;
    env.start();
    env.submit("c", b"").await;
    env.until_status("c", |s| {
        s.is_some_and(|s| s.state == RunState::WaitingForSignal)
    })
    .await;
    assert!(env.rt.cancel("c").await.unwrap());
    let out = env.rt.wait("c").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Cancelled);
    assert_eq!(out.final_step, 1);
    assert_eq!(hook.wait_for("c").await.status, TerminalStatus::Cancelled);
    let after = env.rt.signal("c", b"x".to_vec()).await;
    assert!(matches!(after, Err(Error::NotWaiting(_))), "{after:?}");
    env.clock.advance(HOUR);
    env.queue().promote_scheduled_now().await.unwrap();
    assert_eq!(runner.calls("c", 1), 0, "the step after the wait never ran");
    env.stop().await;
}

#[tokio::test]
async fn a_client_signals_through_the_inbox() {
    let seen = Seen::default();
    let location = StoreLocation::new(Arc::new(InMemory::new()), "wm");
    let queue = open_worker_store(
        &location,
        StoreOptions::default()
            .flush_interval(Duration::from_millis(2))
            .inbox_touch_poll(Duration::from_millis(5)),
    )
    .await
    .unwrap();
    let rt = WorkflowRuntime::builder(queue, approval(open_gate(), seen), NoopTerminalHook)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let worker = tokio::spawn({
        let rt = rt.clone();
        async move { rt.run(std::future::pending()).await }
    });
    let client = Client::open(
        &location,
        ClientOptions::default().refresh_interval(Duration::from_millis(5)),
    )
    .await
    .unwrap();
    // Only a hang guard.
    let guard = Duration::from_secs(60);
    let early = client.signal_and_wait("cl", b"x".to_vec(), guard).await;
    assert!(matches!(early, Err(Error::RunNotFound(_))), "{early:?}");
    client
        .submit_and_wait(
            RunSpec {
                run_id: Some("cl".into()),
                ..Default::default()
            },
            guard,
        )
        .await
        .unwrap();
    loop {
        let status = client.status("cl").await.unwrap();
        if status.is_some_and(|s| s.state == RunState::WaitingForSignal) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    client
        .signal_and_wait("cl", b"from afar".to_vec(), guard)
        .await
        .unwrap();
    let again = client.signal_and_wait("cl", b"again".to_vec(), guard).await;
    assert!(
        matches!(&again, Err(Error::NotWaiting(id)) if id == "cl"),
        "{again:?}"
    );
    let out = client.wait("cl", guard).await.unwrap();
    assert_eq!(out.result.as_deref(), Some(&b"from afar"[..]));
    let big = client.signal("cl", vec![0; MAX_SIGNAL_BYTES + 1]).await;
    assert!(matches!(big, Err(Error::PayloadTooLarge { .. })), "{big:?}");
    worker.abort();
}

/// A signal an older Waymark delivered (a rolling deploy, a rollback) is
/// the bare payload, also on a wait this build created, which takes a
/// signal naming its sender: the step runs with that payload. (It used to
/// be dead-lettered as a record that does not decode, failing the run.)
#[tokio::test]
async fn a_bare_signal_from_an_older_build_is_taken_as_its_payload() {
    let seen = Seen::default();
    let mut env = Env::new(approval(open_gate(), seen.clone()), NoopTerminalHook).await;
    env.start();
    env.submit("old", b"").await;
    waiting(&env, "old").await;
    let page = env
        .queue()
        .view()
        .list_jobs("workflow-steps", taquba::JobStatus::Scheduled, None, 10)
        .await
        .unwrap();
    let [job] = page.jobs.as_slice() else {
        panic!("one waiting job: {:?}", page.jobs);
    };
    assert!(job.headers.contains_key("workflow.signal_sender"));
    env.queue()
        .signal(&job.id, b"approved".to_vec())
        .await
        .unwrap();
    let out = env.rt.wait("old").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
    assert_eq!(out.result.as_deref(), Some(&b"approved"[..]));
    assert_eq!(*seen.lock().unwrap(), vec![Some(b"approved".to_vec())]);
    env.stop().await;
}
