//! Re-running a failed or cancelled run from a step: the new segment starts
//! at the step with its recorded input, earlier steps do not run again,
//! memo entries are reused, status and outcome count the re-run, the hook
//! fires for the new ending; refusals are typed. In-memory store,
//! `MockClock`, gates.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use support::*;
use waymark::*;

/// The input payload each step was handed, in order.
type Inputs = Arc<Mutex<Vec<(u32, Vec<u8>)>>>;

/// Five steps; each memoizes a "charge" (counted per step) and appends its
/// number to the payload. Step 3 fails while `broken` is set; step 4 waits
/// on `hold`.
struct Five {
    runner: FnRunner,
    broken: Arc<AtomicBool>,
    charges: Arc<Mutex<Vec<u32>>>,
    inputs: Inputs,
}

fn five(hold: Gate) -> Five {
    let broken = Arc::new(AtomicBool::new(true));
    let charges: Arc<Mutex<Vec<u32>>> = Arc::default();
    let inputs: Inputs = Arc::default();
    let runner = FnRunner::new({
        let (broken, charges, inputs) = (broken.clone(), charges.clone(), inputs.clone());
        move |s: Step| {
            let (broken, charges, inputs, hold) = (
                broken.clone(),
                charges.clone(),
                inputs.clone(),
                hold.clone(),
            );
            async move {
                let n = s.step_number;
                inputs.lock().unwrap().push((n, s.payload.clone()));
                let _: u32 = s
                    .memo
                    .memoized("charge", || async {
                        charges.lock().unwrap().push(n);
                        Ok::<_, StepError>(n)
                    })
                    .await?;
                if n == 3 && broken.load(Ordering::SeqCst) {
                    return Ok(StepOutcome::Fail {
                        reason: "the card was declined".into(),
                    });
                }
                let mut payload = s.payload.clone();
                payload.push(n as u8);
                if n == 4 {
                    hold.wait().await;
                    return Ok(StepOutcome::Succeed { result: payload });
                }
                Ok(StepOutcome::Continue { payload })
            }
        }
    });
    Five {
        runner,
        broken,
        charges,
        inputs,
    }
}

#[tokio::test]
async fn a_run_failed_at_step_3_of_5_reruns_from_step_3() {
    let hold = Gate::default();
    let w = five(hold.clone());
    let hook = RecordingHook::default();
    let mut env = Env::new(w.runner.clone(), hook.clone()).await;
    env.start();
    env.submit("order", b">").await;
    let first = hook.wait_for("order").await;
    assert_eq!(first.status, TerminalStatus::Failed);
    assert_eq!((first.final_step, first.reruns), (3, 0));

    w.broken.store(false, Ordering::SeqCst);
    assert_eq!(env.rt.rerun("order", 3).await.unwrap(), 1);
    env.until_status("order", |s| {
        s.is_some_and(|s| s.current_step == 4 && s.state == RunState::Running)
    })
    .await;
    let live = env.rt.status("order").await.unwrap().unwrap();
    assert_eq!(live.reruns, 1, "status shows the re-run");
    assert_eq!(env.rt.outcome("order").await.unwrap(), None, "live again");
    hold.open();
    let out = env.rt.wait("order").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(out.reruns, 1);
    assert_eq!(out.result.as_deref(), Some(&b">\x00\x01\x02\x03\x04"[..]));
    for step in 0..3 {
        assert_eq!(w.runner.calls("order", step), 1, "step {step} ran once");
    }
    assert_eq!(w.runner.calls("order", 3), 2);
    assert_eq!(w.runner.calls("order", 4), 1);
    // Step 3 got the same input both times; its charge was memoized once.
    let inputs = w.inputs.lock().unwrap().clone();
    let of_3: Vec<_> = inputs.iter().filter(|(n, _)| *n == 3).collect();
    assert_eq!(of_3.len(), 2);
    assert_eq!(of_3[0].1, of_3[1].1);
    assert_eq!(*w.charges.lock().unwrap(), [0, 1, 2, 3, 4]);
    // The hook fired for both endings.
    for _ in 0..10_000 {
        if hook.count("order") == 2 {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert_eq!(hook.count("order"), 2);
    // It succeeded now: no further re-run.
    assert!(matches!(
        env.rt.rerun("order", 0).await,
        Err(Error::RunSucceeded(_))
    ));
    env.stop().await;
}

#[tokio::test]
async fn reruns_are_refused_for_live_succeeded_unknown_and_unreached() {
    let hold = Gate::default();
    let w = five(hold.clone());
    let mut env = Env::new(w.runner.clone(), NoopTerminalHook).await;
    env.start();
    assert!(matches!(
        env.rt.rerun("nobody", 0).await,
        Err(Error::RunNotFound(_))
    ));
    env.submit("failed", b"").await;
    assert_eq!(
        env.rt.wait("failed").await.unwrap().status,
        TerminalStatus::Failed
    );
    assert!(matches!(
        env.rt.rerun("failed", 4).await,
        Err(Error::StepNotReached {
            step: 4,
            final_step: 3,
            ..
        })
    ));
    // A re-run makes it live: a second one is refused until it ends.
    w.broken.store(false, Ordering::SeqCst);
    assert_eq!(env.rt.rerun("failed", 2).await.unwrap(), 1);
    assert!(matches!(
        env.rt.rerun("failed", 2).await,
        Err(Error::RunLive(_))
    ));
    hold.open();
    assert_eq!(
        env.rt.wait("failed").await.unwrap().status,
        TerminalStatus::Succeeded
    );
    assert_eq!(w.runner.calls("failed", 1), 1);
    assert_eq!(w.runner.calls("failed", 2), 2);
    assert!(matches!(
        env.rt.rerun("failed", 2).await,
        Err(Error::RunSucceeded(_))
    ));
    env.stop().await;
}

#[tokio::test]
async fn a_cancelled_run_reruns_and_inputs_can_be_left_unkept() {
    let ran = Arc::new(AtomicU32::new(0));
    let runner = FnRunner::new({
        let ran = ran.clone();
        move |s: Step| {
            let ran = ran.clone();
            async move {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok(StepOutcome::Succeed { result: s.payload })
            }
        }
    });
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    // Cancelled while pending (no pool runs yet).
    env.submit("stopped", b"input").await;
    assert!(env.rt.cancel("stopped").await.unwrap());
    assert_eq!(env.rt.rerun("stopped", 0).await.unwrap(), 1);
    env.start();
    let out = env.rt.wait("stopped").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(out.result.as_deref(), Some(&b"input"[..]));
    assert_eq!(out.reruns, 1);
    env.stop().await;

    let mut env = Env::configured(runner, NoopTerminalHook, |b| b.keep_step_inputs(false)).await;
    env.submit("unkept", b"input").await;
    assert!(env.rt.cancel("unkept").await.unwrap());
    assert!(matches!(
        env.rt.rerun("unkept", 0).await,
        Err(Error::StepInputNotKept { step: 0, .. })
    ));
    env.stop().await;
}

#[tokio::test]
async fn a_client_reruns_through_the_inbox_and_gets_typed_refusals() {
    use std::time::Duration;
    const GUARD: Duration = Duration::from_secs(60);
    let fail_once = Arc::new(AtomicBool::new(true));
    let runner = FnRunner::new({
        let fail_once = fail_once.clone();
        move |s: Step| {
            let fail_once = fail_once.clone();
            async move {
                if s.step_number == 0 {
                    return Ok(StepOutcome::Continue { payload: s.payload });
                }
                if fail_once.swap(false, Ordering::SeqCst) {
                    return Ok(StepOutcome::Fail {
                        reason: "not yet".into(),
                    });
                }
                Ok(StepOutcome::Succeed { result: s.payload })
            }
        }
    });
    let location = StoreLocation::new(
        Arc::new(taquba::object_store::memory::InMemory::new()),
        "wm",
    );
    let store = StoreOptions::default()
        .flush_interval(Duration::from_millis(2))
        .inbox_touch_poll(Duration::from_millis(5));
    let queue = open_worker_store(&location, store).await.unwrap();
    let rt = WorkflowRuntime::builder(queue, runner.clone(), NoopTerminalHook)
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
    let spec = RunSpec {
        run_id: Some("remote".into()),
        input: b"in".to_vec(),
        ..Default::default()
    };
    client.submit_and_wait(spec, GUARD).await.unwrap();
    let out = client.wait("remote", GUARD).await.unwrap();
    assert_eq!((out.status, out.final_step), (TerminalStatus::Failed, 1));
    assert!(matches!(
        client.rerun_and_wait("remote", 2, GUARD).await,
        Err(Error::StepNotReached { step: 2, .. })
    ));
    assert!(matches!(
        client.rerun_and_wait("nobody", 0, GUARD).await,
        Err(Error::RunNotFound(_))
    ));
    assert_eq!(client.rerun_and_wait("remote", 1, GUARD).await.unwrap(), 1);
    let out = rt.wait("remote").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(out.result.as_deref(), Some(&b"in"[..]));
    assert_eq!(out.reruns, 1);
    assert_eq!(runner.calls("remote", 0), 1, "step 0 not re-run");
    assert!(matches!(
        client.rerun_and_wait("remote", 1, GUARD).await,
        Err(Error::RunSucceeded(_))
    ));
    worker.abort();
}

/// What step 1 of [`woken`] saw on each attempt: its payload and signal.
type Woken = Arc<Mutex<Vec<(Vec<u8>, Option<Vec<u8>>)>>>;

/// Step 0 stages a KV put and waits for a signal; step 1 (the woken step)
/// memoizes a charge, fails transiently on its first attempt (so its retry
/// is a new job whose payload carries the signal), then fails for good
/// while `broken` is set, and otherwise succeeds with its payload.
fn woken(broken: Arc<AtomicBool>, seen: Woken, charges: Arc<AtomicU32>) -> FnRunner {
    FnRunner::new(move |s: Step| {
        let (broken, seen, charges) = (broken.clone(), seen.clone(), charges.clone());
        async move {
            if s.step_number == 0 {
                s.effects()
                    .put(format!("orders/{}", s.run_id), "awaiting approval")
                    .unwrap();
                return Ok(StepOutcome::WaitForSignal {
                    payload: b"order-7".to_vec(),
                    timeout: std::time::Duration::from_secs(3600),
                });
            }
            seen.lock()
                .unwrap()
                .push((s.payload.clone(), s.signal.clone()));
            let _: u32 = s
                .memo
                .memoized("charge", || async {
                    Ok::<_, StepError>(charges.fetch_add(1, Ordering::SeqCst))
                })
                .await?;
            if s.attempts == 1 && s.signal.is_some() {
                return Err(StepError::transient("flaky"));
            }
            if broken.load(Ordering::SeqCst) {
                return Ok(StepOutcome::Fail {
                    reason: "declined".into(),
                });
            }
            Ok(StepOutcome::Succeed { result: s.payload })
        }
    })
}

#[tokio::test]
async fn a_signal_woken_step_reruns_with_its_own_input_not_the_carried_signal() {
    let broken = Arc::new(AtomicBool::new(true));
    let seen = Woken::default();
    let charges = Arc::new(AtomicU32::new(0));
    let runner = woken(broken.clone(), seen.clone(), charges.clone());
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    env.start();
    env.submit("w", b"in").await;
    env.until_status("w", |s| {
        s.is_some_and(|s| s.state == RunState::WaitingForSignal)
    })
    .await;
    // The wait's settlement committed the staged put and step 1's kept
    // input together; a re-run is refused while the run waits.
    let staged = env.queue().view().kv_get(b"orders/w").await.unwrap();
    assert_eq!(staged.as_deref(), Some(&b"awaiting approval"[..]));
    assert!(matches!(env.rt.rerun("w", 1).await, Err(Error::RunLive(_))));
    env.rt.signal("w", b"yes".to_vec()).await.unwrap();
    let failed = env.rt.wait("w").await.unwrap();
    assert_eq!(failed.status, TerminalStatus::Failed);
    assert_eq!(failed.final_step, 1);
    // The retry's job carried the signal in its payload; the step saw its
    // own payload both times.
    let yes = Some(b"yes".to_vec());
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (b"order-7".to_vec(), yes.clone()),
            (b"order-7".to_vec(), yes)
        ]
    );

    broken.store(false, Ordering::SeqCst);
    assert_eq!(env.rt.rerun("w", 1).await.unwrap(), 1);
    let out = env.rt.wait("w").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    // The kept input is the step's real input, not the carried payload,
    // and a re-run does not replay the signal: the step runs at once with
    // `signal: None`, as after its wait's timeout.
    assert_eq!(out.result.as_deref(), Some(&b"order-7"[..]));
    assert_eq!(
        seen.lock().unwrap().last().cloned(),
        Some((b"order-7".to_vec(), None))
    );
    assert_eq!(runner.calls("w", 0), 1, "step 0 did not run again");
    assert_eq!(charges.load(Ordering::SeqCst), 1, "the charge was memoized");
    env.stop().await;
}

/// A parent that failed at its join step re-runs from it with its
/// children's outcomes, as its first run had them (the children are not
/// spawned again): the re-run's job used to carry no join, and the step
/// saw no children. A parent that ended while it waited for its children
/// never ran the join step: a re-run from it is refused, pointing at the
/// spawning step.
#[tokio::test]
async fn a_join_step_reruns_with_its_childrens_outcomes() {
    let broken = Arc::new(AtomicBool::new(true));
    let seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    let hold = Gate::default();
    let runner = FnRunner::new({
        let (broken, seen, hold) = (broken.clone(), seen.clone(), hold.clone());
        move |s: Step| {
            let (broken, seen, hold) = (broken.clone(), seen.clone(), hold.clone());
            async move {
                if s.run_id.contains('.') {
                    if s.run_id.starts_with("waits.") {
                        hold.wait().await;
                    }
                    return Ok(StepOutcome::Succeed { result: vec![] });
                }
                if s.step_number == 0 {
                    return Ok(StepOutcome::SpawnChildren {
                        children: vec![ChildSpec::default(), ChildSpec::default()],
                        payload: b"join".to_vec(),
                        fail_fast: false,
                    });
                }
                seen.lock().unwrap().push(s.children.len());
                if broken.load(Ordering::SeqCst) {
                    return Ok(StepOutcome::Fail {
                        reason: "not yet".into(),
                    });
                }
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        }
    });
    let hook = RecordingHook::default();
    let mut env = Env::new(runner.clone(), hook.clone()).await;
    env.start();
    env.submit("fails", b"").await;
    let first = hook.wait_for("fails").await;
    assert_eq!(
        (first.status, first.final_step),
        (TerminalStatus::Failed, 1)
    );
    broken.store(false, Ordering::SeqCst);
    env.rt.rerun("fails", 1).await.unwrap();
    let out = env.rt.wait("fails").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(*seen.lock().unwrap(), [2, 2], "both runs saw both children");
    for child in ["fails.0.0", "fails.0.1"] {
        assert_eq!(runner.calls(child, 0), 1, "{child} was not spawned again");
    }

    env.submit("waits", b"").await;
    env.until_status("waits", |s| {
        s.is_some_and(|s| s.state == RunState::WaitingForChildren)
    })
    .await;
    assert!(env.rt.cancel("waits").await.unwrap());
    let out = env.rt.wait("waits").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Cancelled);
    assert!(matches!(
        env.rt.rerun("waits", 1).await,
        Err(Error::StepNotReached {
            step: 1,
            final_step: 0,
            ..
        })
    ));
    assert_eq!(env.rt.rerun("waits", 0).await.unwrap(), 1, "from the spawn");
    hold.open();
    let out = env.rt.wait("waits").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    env.stop().await;
}
