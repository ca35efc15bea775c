//! Run deadlines (`RunSpec::deadline`): a run not ended by its deadline ends
//! `TimedOut`, whatever its step is doing, once; on an in-memory store with
//! taquba's `MockClock` and gates (the clock, never a sleep, decides).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::*;
use waymark::*;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

async fn env_with(runner: FnRunner, hook: RecordingHook, slots: usize) -> Env<RecordingHook> {
    Env::configured(runner, hook, move |b| {
        b.poll_interval(Duration::from_millis(5))
            .max_concurrent_steps(slots)
    })
    .await
}

async fn submit_with_deadline(env: &Env<RecordingHook>, id: &str, deadline: Deadline) {
    env.rt
        .submit(RunSpec {
            run_id: Some(id.into()),
            deadline: Some(deadline),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Let a few maintenance ticks pass (they would fire a second hook, or a
/// second ending, if there were one).
async fn some_ticks() {
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn assert_timed_out(out: &RunOutcome, step: u32) {
    assert_eq!(out.status, TerminalStatus::TimedOut, "{out:?}");
    assert_eq!(out.final_step, step);
    assert_eq!(out.result, None);
    assert!(
        out.error.as_deref().is_some_and(|e| e.contains("deadline")),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_pending_step_is_removed_at_the_deadline() {
    // One slot, held by `busy`: the deadline run's step stays pending.
    let gate = Gate::default();
    let runner = {
        let gate = gate.clone();
        FnRunner::new(move |s: Step| {
            let gate = gate.clone();
            async move {
                if s.run_id == "busy" {
                    gate.wait().await;
                }
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let hook = RecordingHook::default();
    let mut env = env_with(runner.clone(), hook.clone(), 1).await;
    env.start();
    env.submit("busy", b"").await;
    env.until_status("busy", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    submit_with_deadline(&env, "p", Deadline::After(MINUTE)).await;
    some_ticks().await;
    assert_eq!(
        env.rt.status("p").await.unwrap().unwrap().state,
        RunState::Pending,
        "not due yet"
    );
    env.clock.advance(MINUTE);
    let out = env.rt.wait("p").await.unwrap();
    assert_timed_out(&out, 0);
    assert_eq!(runner.calls("p", 0), 0, "the step never ran");
    gate.open();
    env.rt.wait("busy").await.unwrap();
    hook.wait_for("p").await;
    some_ticks().await;
    assert_eq!(hook.count("p"), 1, "the hook fires once");
    env.stop().await;
}

#[tokio::test]
async fn a_scheduled_step_is_removed_at_the_deadline() {
    let runner = FnRunner::new(|s: Step| async move {
        Ok(match s.step_number {
            0 => StepOutcome::ContinueAfter {
                payload: vec![],
                delay: HOUR,
            },
            _ => StepOutcome::Succeed { result: vec![] },
        })
    });
    let hook = RecordingHook::default();
    let mut env = env_with(runner.clone(), hook.clone(), 4).await;
    env.start();
    // An instant on the queue clock.
    let at = std::time::UNIX_EPOCH + Duration::from_millis(T0) + 10 * MINUTE;
    submit_with_deadline(&env, "s", Deadline::At(at)).await;
    env.until_status("s", |s| {
        s.is_some_and(|s| s.state == RunState::Scheduled && s.current_step == 1)
    })
    .await;
    env.clock.advance(10 * MINUTE - Duration::from_millis(1));
    some_ticks().await;
    assert!(env.rt.status("s").await.unwrap().is_some(), "not due yet");
    env.clock.advance(Duration::from_millis(1));
    let out = env.rt.wait("s").await.unwrap();
    assert_timed_out(&out, 1);
    assert_eq!(runner.calls("s", 1), 0);
    hook.wait_for("s").await;
    some_ticks().await;
    assert_eq!(hook.count("s"), 1, "the hook fires once");
    env.stop().await;
}

#[tokio::test]
async fn a_running_step_is_stopped_and_its_result_discarded() {
    let fired = Arc::new(AtomicBool::new(false));
    let started = Gate::default();
    let runner = {
        let (fired, started) = (fired.clone(), started.clone());
        FnRunner::new(move |s: Step| {
            let (fired, started) = (fired.clone(), started.clone());
            async move {
                started.open();
                s.cancel_token.cancelled().await;
                fired.store(true, Ordering::SeqCst);
                // Discarded: the deadline has passed.
                Ok(StepOutcome::Succeed {
                    result: b"late".to_vec(),
                })
            }
        })
    };
    let hook = RecordingHook::default();
    let mut env = env_with(runner.clone(), hook.clone(), 4).await;
    env.start();
    submit_with_deadline(&env, "r", Deadline::After(MINUTE)).await;
    // The runner is running (not only claimed).
    started.wait().await;
    env.clock.advance(MINUTE);
    let out = env.rt.wait("r").await.unwrap();
    assert_timed_out(&out, 0);
    assert!(
        fired.load(Ordering::SeqCst),
        "the step's cancel_token fired"
    );
    hook.wait_for("r").await;
    some_ticks().await;
    assert_eq!(hook.count("r"), 1, "the hook fires once");
    assert_eq!(runner.calls("r", 0), 1);
    env.stop().await;
}

/// A runner whose step ignores its cancel token: it opens `started` and
/// returns only once `gate` opens. Returns the runner, `gate`, `started`.
fn ignoring_its_token() -> (FnRunner, Gate, Gate) {
    let (gate, started) = (Gate::default(), Gate::default());
    let runner = {
        let (gate, started) = (gate.clone(), started.clone());
        FnRunner::new(move |_s: Step| {
            let (gate, started) = (gate.clone(), started.clone());
            async move {
                started.open();
                gate.wait().await;
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    (runner, gate, started)
}

#[tokio::test]
async fn a_deadline_survives_a_restart() {
    // A step that ignores its token: the crash strikes while it runs.
    let (runner, gate, started) = ignoring_its_token();
    let hook = RecordingHook::default();
    let mut env = env_with(runner.clone(), hook.clone(), 4).await;
    env.start();
    submit_with_deadline(&env, "c", Deadline::After(MINUTE)).await;
    started.wait().await;
    env.clock.advance(MINUTE);
    env.until_status("c", |s| s.is_some_and(|s| s.state == RunState::Cancelling))
        .await;
    env.crash_and_reopen(runner.clone(), hook.clone()).await;
    env.start();
    // The step is claimed again with its stop request: it does not run.
    let out = env.rt.wait("c").await.unwrap();
    assert_timed_out(&out, 0);
    assert_eq!(runner.calls("c", 0), 1);
    gate.open();
    env.stop().await;
}

/// A step asked to stop at the deadline, on its last attempt, whose process
/// dies: the queue dead-letters the job when its lease runs out, and the
/// reconcile ended the run `Cancelled` (the job only says a stop was
/// asked). It ends `TimedOut`, as the step's own settlement would have.
#[tokio::test]
async fn a_stopped_step_the_queue_dead_letters_still_times_out() {
    let (runner, gate, started) = ignoring_its_token();
    let hook = RecordingHook::default();
    let mut env = env_with(runner.clone(), hook.clone(), 4).await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("d".into()),
            deadline: Some(Deadline::After(MINUTE)),
            max_attempts_per_step: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    started.wait().await;
    env.clock.advance(MINUTE);
    env.until_status("d", |s| s.is_some_and(|s| s.state == RunState::Cancelling))
        .await;
    env.crash_and_reopen(runner.clone(), hook.clone()).await;
    env.start();
    // The dead process's lease runs out on the only attempt.
    let out = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            env.clock.advance(Duration::from_secs(600));
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Some(out) = env.rt.outcome("d").await.unwrap() {
                return out;
            }
        }
    })
    .await
    .expect("the dead-lettered step's run ends");
    assert_timed_out(&out, 0);
    assert_timed_out(&env.rt.wait("d").await.unwrap(), 0);
    hook.wait_for("d").await;
    assert_eq!(runner.calls("d", 0), 1);
    gate.open();
    env.stop().await;
}

#[tokio::test]
async fn a_run_that_ends_in_time_leaves_no_deadline_behind() {
    let runner = FnRunner::new(|_s: Step| async move {
        Ok(StepOutcome::Succeed {
            result: b"ok".to_vec(),
        })
    });
    let hook = RecordingHook::default();
    let mut env = env_with(runner, hook.clone(), 4).await;
    env.start();
    submit_with_deadline(&env, "ok", Deadline::After(MINUTE)).await;
    let out = env.rt.wait("ok").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    let index = env
        .queue()
        .view()
        .kv_scan(b"wm/", .., taquba::KvOrder::Ascending, 100)
        .await
        .unwrap();
    assert!(
        !index
            .entries
            .iter()
            .any(|(k, _)| k.starts_with(b"wm/workflow-steps/dl/")),
        "the deadline entry went with the run"
    );
    env.clock.advance(HOUR);
    some_ticks().await;
    assert_eq!(env.rt.outcome("ok").await.unwrap().unwrap(), out);
    hook.wait_for("ok").await;
    assert_eq!(hook.count("ok"), 1);
    env.stop().await;
}
