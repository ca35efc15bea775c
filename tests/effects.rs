//! Staged effects (`Step::effects`): committed with the outcome the runner
//! returned, discarded on an error or an external cancel; reserved names,
//! oversize values and conflicts refused at staging. In-memory store,
//! `MockClock`, gates.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use taquba::EnqueueOptions;
use waymark::*;

const MAIL: &str = "mail";

fn key(run: &str) -> Vec<u8> {
    format!("app/{run}").into_bytes()
}

/// Step 0 stages a put of `app/{run}`, a delete of `app/stale` and an
/// enqueue on `mail`, checks that its own put is not visible yet, and
/// returns the outcome its run id names. Step 1 succeeds.
fn staging(gate: Gate) -> FnRunner {
    FnRunner::new(move |s: Step| {
        let gate = gate.clone();
        async move {
            if s.step_number > 0 {
                return Ok(StepOutcome::Succeed { result: vec![] });
            }
            let fx = s.effects();
            fx.put(key(&s.run_id), format!("{}", s.attempts)).unwrap();
            fx.delete(b"app/stale".to_vec()).unwrap();
            fx.enqueue(MAIL, s.run_id.clone(), EnqueueOptions::default())
                .unwrap();
            assert_eq!(
                fx.get(key(&s.run_id)).await.unwrap(),
                None,
                "staged, not committed"
            );
            let kind = s.run_id.split('-').next().unwrap_or_default().to_string();
            match kind.as_str() {
                "continue" => Ok(StepOutcome::Continue { payload: vec![] }),
                "after" => Ok(StepOutcome::ContinueAfter {
                    payload: vec![],
                    delay: Duration::from_secs(3600),
                }),
                "wait" => Ok(StepOutcome::WaitForSignal {
                    payload: vec![],
                    timeout: Duration::from_secs(3600),
                }),
                "succeed" => Ok(StepOutcome::Succeed { result: vec![] }),
                "fail" => Ok(StepOutcome::Fail {
                    reason: "no".into(),
                }),
                "cancel" => Ok(StepOutcome::Cancel {
                    reason: "no".into(),
                }),
                "transient" if s.attempts == 1 => Err(StepError::transient("again")),
                "transient" => Ok(StepOutcome::Fail {
                    reason: "second attempt".into(),
                }),
                "permanent" => Err(StepError::permanent("bad")),
                "panic" => panic!("runner panicked"),
                "external" => {
                    gate.wait().await;
                    Ok(StepOutcome::Continue { payload: vec![] })
                }
                "answer" => {
                    s.cancel_token.cancelled().await;
                    Ok(StepOutcome::Cancel {
                        reason: "asked to".into(),
                    })
                }
                "oversize" => Ok(StepOutcome::Succeed {
                    result: vec![0; MAX_RESULT_BYTES + 1],
                }),
                _ => unreachable!("{}", s.run_id),
            }
        }
    })
}

async fn kv(env: &Env<NoopTerminalHook>, key: &[u8]) -> Option<Vec<u8>> {
    env.queue()
        .view()
        .kv_get(key)
        .await
        .unwrap()
        .map(|v| v.to_vec())
}

async fn mail(env: &Env<NoopTerminalHook>) -> i64 {
    env.queue().view().stats(MAIL).await.unwrap().pending
}

#[tokio::test]
async fn effects_commit_with_every_outcome_the_runner_returns() {
    let mut env = Env::new(staging(Gate::default()), NoopTerminalHook).await;
    env.queue().kv_put(b"app/stale", b"old").await.unwrap();
    env.start();
    for run in ["continue-1", "succeed-1", "fail-1", "cancel-1"] {
        env.submit(run, b"").await;
        env.rt.wait(run).await.unwrap();
        assert_eq!(kv(&env, &key(run)).await, Some(b"1".to_vec()), "{run}");
    }
    for (run, state) in [
        ("after-1", RunState::Scheduled),
        ("wait-1", RunState::WaitingForSignal),
    ] {
        env.submit(run, b"").await;
        env.until_status(run, |s| s.is_some_and(|s| s.state == state))
            .await;
        assert_eq!(kv(&env, &key(run)).await, Some(b"1".to_vec()), "{run}");
    }
    assert_eq!(kv(&env, b"app/stale").await, None);
    assert_eq!(mail(&env).await, 6, "one enqueue per outcome");
    env.stop().await;
}

#[tokio::test]
async fn effects_are_discarded_on_errors_and_refused_outcomes() {
    let mut env = Env::new(staging(Gate::default()), NoopTerminalHook).await;
    env.queue().kv_put(b"app/stale", b"old").await.unwrap();
    env.start();
    for run in ["permanent-1", "panic-1", "oversize-1"] {
        env.submit(run, b"").await;
        let out = env.rt.wait(run).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Failed, "{run}");
        assert_eq!(kv(&env, &key(run)).await, None, "{run}");
    }
    assert_eq!(kv(&env, b"app/stale").await, Some(b"old".to_vec()));
    assert_eq!(mail(&env).await, 0, "no enqueue committed");
    // The first attempt's effects are dropped; the second's commit.
    env.submit("transient-1", b"").await;
    env.rt.wait("transient-1").await.unwrap();
    assert_eq!(kv(&env, &key("transient-1")).await, Some(b"2".to_vec()));
    assert_eq!(kv(&env, b"app/stale").await, None);
    assert_eq!(mail(&env).await, 1);
    env.stop().await;
}

#[tokio::test]
async fn effects_are_discarded_on_an_external_cancel() {
    let gate = Gate::default();
    let mut env = Env::new(staging(gate.clone()), NoopTerminalHook).await;
    env.start();
    env.submit("external-1", b"").await;
    env.until_status("external-1", |s| {
        s.is_some_and(|s| s.state == RunState::Running)
    })
    .await;
    assert!(env.rt.cancel("external-1").await.unwrap());
    gate.open();
    let out = env.rt.wait("external-1").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Cancelled);
    assert_eq!(kv(&env, &key("external-1")).await, None);
    assert_eq!(mail(&env).await, 0);
    env.stop().await;
}

/// A runner that answers an external cancel with its own `Cancel` commits
/// what it staged with it (a compensation, say), as documented.
#[tokio::test]
async fn effects_commit_with_the_runners_own_answer_to_a_cancel() {
    let mut env = Env::new(staging(Gate::default()), NoopTerminalHook).await;
    env.start();
    env.submit("answer-1", b"").await;
    env.until_status("answer-1", |s| {
        s.is_some_and(|s| s.state == RunState::Running)
    })
    .await;
    assert!(env.rt.cancel("answer-1").await.unwrap());
    let out = env.rt.wait("answer-1").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Cancelled);
    assert_eq!(out.error.as_deref(), Some("asked to"));
    assert_eq!(kv(&env, &key("answer-1")).await, Some(b"1".to_vec()));
    assert_eq!(mail(&env).await, 1);
    env.stop().await;
}

#[tokio::test]
async fn staging_errors_reach_the_runner_and_later_staging_is_closed() {
    let kept: Arc<Mutex<Option<Step>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let runner = {
        let (kept, errors) = (kept.clone(), errors.clone());
        FnRunner::new(move |s: Step| {
            let (kept, errors) = (kept.clone(), errors.clone());
            async move {
                let fx = s.effects();
                let mut errs = Vec::new();
                for result in [
                    fx.put("wm/workflow-steps/run/x", "v"),
                    fx.put("big", vec![0; taquba::MAX_KV_VALUE_SIZE + 1]),
                    fx.enqueue("workflow-steps", "p", EnqueueOptions::default()),
                    fx.enqueue("workflow-steps-hooks", "p", EnqueueOptions::default()),
                    fx.put("both", "v").and_then(|()| fx.delete("both")),
                ] {
                    errs.push(format!("{:?}", result.unwrap_err()));
                }
                errors.lock().unwrap().extend(errs);
                assert!(matches!(
                    fx.get("wm/store").await,
                    Err(Error::ReservedName { .. })
                ));
                *kept.lock().unwrap() = Some(s.clone());
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.submit("r", b"").await;
    assert_eq!(
        env.rt.wait("r").await.unwrap().status,
        TerminalStatus::Succeeded
    );
    // The one valid staging (`both`'s put) committed with the outcome.
    assert_eq!(kv(&env, b"both").await, Some(b"v".to_vec()));
    let errs = errors.lock().unwrap().clone();
    assert!(errs[0].starts_with("ReservedName"), "{errs:?}");
    assert!(errs[1].starts_with("PayloadTooLarge"), "{errs:?}");
    assert!(errs[2].starts_with("ReservedName"), "{errs:?}");
    assert!(errs[3].starts_with("ReservedName"), "{errs:?}");
    assert!(errs[4].starts_with("ConflictingEffect"), "{errs:?}");
    // A clone of the step kept past its return can stage nothing.
    let step = kept.lock().unwrap().take().unwrap();
    assert!(matches!(
        step.effects().put("late", "v"),
        Err(Error::EffectsClosed)
    ));
    env.stop().await;
}
