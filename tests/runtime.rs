//! Integration tests for the foundation: submit, transitions, termination,
//! hooks, cancel, status and restart, on an in-memory store driven by
//! taquba's `MockClock` and gates (no sleeps).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use support::*;
use taquba::object_store::ObjectStore;
use taquba::object_store::memory::InMemory;
use taquba::{EnqueueOptions, JobStatus, MockClock};
use tokio::sync::Notify;
use waymark::*;

fn echo_chain(steps: u32) -> FnRunner {
    FnRunner::new(move |s: Step| async move {
        if s.step_number + 1 < steps {
            let mut p = s.payload.clone();
            p.push(s.step_number as u8);
            Ok(StepOutcome::Continue { payload: p })
        } else {
            Ok(StepOutcome::Succeed { result: s.payload })
        }
    })
}

#[tokio::test]
async fn single_step_success() {
    let mut env = Env::new(echo_chain(1), NoopTerminalHook).await;
    env.start();
    env.submit("one", b"in").await;
    let out = env.rt.wait("one").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(out.result.as_deref(), Some(&b"in"[..]));
    assert_eq!(out.final_step, 0);
    assert_eq!(env.rt.outcome("one").await.unwrap(), Some(out));
    assert_eq!(env.rt.status("one").await.unwrap(), None);
    // The noop hook adds no notification job.
    let hooks = env
        .queue()
        .view()
        .stats("workflow-steps-hooks")
        .await
        .unwrap();
    assert_eq!(hooks.pending + hooks.done, 0);
    env.stop().await;
}

#[tokio::test]
async fn multi_step_chain_passes_payloads() {
    let runner = echo_chain(5);
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    env.start();
    env.submit("chain", b">").await;
    let out = env.rt.wait("chain").await.unwrap();
    assert_eq!(out.result.as_deref(), Some(&b">\x00\x01\x02\x03"[..]));
    assert_eq!(out.final_step, 4);
    for step in 0..5 {
        assert_eq!(runner.calls("chain", step), 1);
    }
    env.stop().await;
}

/// Step 0 continues after an hour; step 1 succeeds.
fn an_hour_then_done() -> FnRunner {
    FnRunner::new(|s: Step| async move {
        Ok(match s.step_number {
            0 => StepOutcome::ContinueAfter {
                payload: vec![],
                delay: Duration::from_secs(3600),
            },
            _ => StepOutcome::Succeed { result: vec![] },
        })
    })
}

#[tokio::test]
async fn continue_after_waits_for_the_queue_clock() {
    let runner = an_hour_then_done();
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    env.start();
    env.submit("later", b"").await;
    env.until_status("later", |s| {
        s.is_some_and(|s| s.state == RunState::Scheduled)
    })
    .await;
    assert_eq!(
        env.rt.status("later").await.unwrap().unwrap().current_step,
        1
    );
    env.clock.advance(Duration::from_secs(3599));
    env.queue().promote_scheduled_now().await.unwrap();
    assert_eq!(
        env.rt.status("later").await.unwrap().unwrap().state,
        RunState::Scheduled
    );
    assert_eq!(runner.calls("later", 1), 0);
    env.clock.advance(Duration::from_secs(1));
    env.queue().promote_scheduled_now().await.unwrap();
    let out = env.rt.wait("later").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(runner.calls("later", 1), 1);
    env.stop().await;
}

/// No step job has a dedup key: a settlement's next job commits under the
/// claim of the job before it, so only once, a submit's step 0 under the
/// compare on its submit record; the run record names each by id, and a
/// key would cost a read and two writes per step.
#[tokio::test]
async fn a_next_step_job_carries_no_dedup_key() {
    let runner = an_hour_then_done();
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.submit("next", b"").await;
    let pending = env
        .queue()
        .view()
        .list_jobs("workflow-steps", JobStatus::Pending, None, 10)
        .await
        .unwrap();
    assert_eq!(pending.jobs.len(), 1);
    assert_eq!(pending.jobs[0].dedup_key, None);
    env.start();
    env.until_status("next", |s| {
        s.is_some_and(|s| s.state == RunState::Scheduled)
    })
    .await;
    let scheduled = env
        .queue()
        .view()
        .list_jobs("workflow-steps", JobStatus::Scheduled, None, 10)
        .await
        .unwrap();
    assert_eq!(scheduled.jobs.len(), 1);
    assert_eq!(scheduled.jobs[0].headers["workflow.step"], "1");
    assert_eq!(scheduled.jobs[0].dedup_key, None);
    env.stop().await;
}

/// A step-0 job for a run id that was not written by its submit (another
/// writer's, in the queue before the submit) is not the run's step: the
/// submit writes its own, in its one commit, and the other is refused at
/// admit. (It was adopted, in a second commit after the run's, running the
/// other job's payload as the run's input.)
#[tokio::test]
async fn a_submit_ignores_a_foreign_step_0_job_for_its_run_id() {
    let runner = FnRunner::new(|s: Step| async move {
        Ok(StepOutcome::Succeed {
            result: s.payload.clone(),
        })
    });
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    let headers = HashMap::from([
        ("workflow.run_id".to_string(), "mine".to_string()),
        ("workflow.step".to_string(), "0".to_string()),
    ]);
    env.queue()
        .enqueue_with(
            "workflow-steps",
            b"foreign".to_vec(),
            EnqueueOptions::default()
                .dedup_key("run:mine:0".to_string())
                .headers(headers),
        )
        .await
        .unwrap();
    env.submit("mine", b"own input").await;
    env.start();
    let out = env.rt.wait("mine").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(out.result.as_deref(), Some(&b"own input"[..]));
    assert_eq!(runner.calls("mine", 0), 1, "the foreign job never ran");
    env.stop().await;
}

#[tokio::test]
async fn permanent_error_dead_letters_but_verdicts_do_not() {
    let runner = FnRunner::new(|s: Step| async move {
        match s.run_id.as_str() {
            "perm" => Err(StepError::permanent("bad input")),
            "fail" => Ok(StepOutcome::Fail {
                reason: "declined".into(),
            }),
            _ => Ok(StepOutcome::Cancel {
                reason: "not needed".into(),
            }),
        }
    });
    let hook = RecordingHook::default();
    let mut env = Env::new(runner.clone(), hook.clone()).await;
    env.start();
    for id in ["perm", "fail", "self-cancel"] {
        env.submit(id, b"").await;
    }
    let perm = env.rt.wait("perm").await.unwrap();
    assert_eq!(perm.status, TerminalStatus::Failed);
    assert!(perm.error.unwrap().contains("bad input"));
    let fail = env.rt.wait("fail").await.unwrap();
    assert_eq!(
        (fail.status, fail.error.as_deref()),
        (TerminalStatus::Failed, Some("declined"))
    );
    let cancel = env.rt.wait("self-cancel").await.unwrap();
    assert_eq!(
        (cancel.status, cancel.error.as_deref()),
        (TerminalStatus::Cancelled, Some("not needed"))
    );
    let stats = env.queue().view().stats("workflow-steps").await.unwrap();
    assert_eq!(stats.dead, 1, "only the permanent error dead-letters");
    assert_eq!(
        runner.calls("perm", 0),
        1,
        "a permanent error is not retried"
    );
    for id in ["perm", "fail", "self-cancel"] {
        hook.wait_for(id).await;
    }
    env.stop().await;
}

#[tokio::test]
async fn transient_errors_retry_exactly_max_attempts_and_hook_fires_once() {
    let runner = FnRunner::new(|_s: Step| async move { Err(StepError::transient("flaky")) });
    let hook = RecordingHook::default();
    let mut env = Env::new(runner.clone(), hook.clone()).await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("flaky".into()),
            max_attempts_per_step: Some(4),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = env.rt.wait("flaky").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Failed);
    assert!(out.error.as_deref().unwrap().contains("flaky"));
    assert_eq!(runner.calls("flaky", 0), 4);
    hook.wait_for("flaky").await;
    env.stop().await;
    assert_eq!(hook.count("flaky"), 1);
    assert_eq!(
        env.queue()
            .view()
            .stats("workflow-steps")
            .await
            .unwrap()
            .dead,
        1
    );
}

#[tokio::test]
async fn a_transient_error_then_success_completes() {
    let runner = FnRunner::new(|s: Step| async move {
        if s.attempts < 3 {
            Err(StepError::transient("not yet"))
        } else {
            Ok(StepOutcome::Succeed {
                result: vec![s.attempts as u8],
            })
        }
    });
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    env.start();
    env.submit("eventually", b"").await;
    let out = env.rt.wait("eventually").await.unwrap();
    assert_eq!(out.result, Some(vec![3]));
    env.stop().await;
}

#[tokio::test]
async fn submit_is_idempotent_in_process_and_across_restart() {
    let gate = Gate::default();
    let runner = {
        let gate = gate.clone();
        FnRunner::new(move |s: Step| {
            let gate = gate.clone();
            async move {
                gate.wait().await;
                Ok(StepOutcome::Succeed { result: s.payload })
            }
        })
    };
    let mut env = Env::new(runner.clone(), NoopTerminalHook).await;
    assert!(env.submit("idem", b"a").await.newly_submitted);
    assert!(!env.submit("idem", b"a").await.newly_submitted);
    let mismatch = env
        .rt
        .submit(RunSpec {
            run_id: Some("idem".into()),
            input: b"b".to_vec(),
            ..Default::default()
        })
        .await;
    assert!(matches!(mismatch, Err(Error::InputMismatch(id)) if id == "idem"));

    // After step 0 is claimed (its dedup key is released).
    env.start();
    env.until_status("idem", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    assert!(!env.submit("idem", b"a").await.newly_submitted);

    // Across a restart, with a fresh runtime on the same store.
    env.crash_and_reopen(runner.clone(), NoopTerminalHook).await;
    assert!(!env.submit("idem", b"a").await.newly_submitted);
    assert!(matches!(
        env.rt
            .submit(RunSpec {
                run_id: Some("idem".into()),
                input: b"b".to_vec(),
                ..Default::default()
            })
            .await,
        Err(Error::InputMismatch(_))
    ));

    // After the run terminated.
    gate.open();
    env.start();
    env.rt.wait("idem").await.unwrap();
    assert!(!env.submit("idem", b"a").await.newly_submitted);
    env.stop().await;
    let stats = env.queue().view().stats("workflow-steps").await.unwrap();
    assert_eq!(stats.pending + stats.scheduled + stats.claimed, 0);
}

#[tokio::test]
async fn concurrent_submits_of_one_id_make_one_run() {
    let env = Env::new(echo_chain(1), NoopTerminalHook).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let rt = env.rt.clone();
        tasks.push(tokio::spawn(async move {
            rt.submit(RunSpec {
                run_id: Some("race".into()),
                input: b"same".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .newly_submitted
        }));
    }
    let mut new = 0;
    for t in tasks {
        new += t.await.unwrap() as u32;
    }
    assert_eq!(new, 1);
    let stats = env.queue().view().stats("workflow-steps").await.unwrap();
    assert_eq!(stats.pending, 1);
}

#[tokio::test]
async fn submit_rejects_bad_input_before_writing() {
    let env = Env::new(echo_chain(1), NoopTerminalHook).await;
    let mut headers = HashMap::new();
    headers.insert("workflow.step".to_string(), "9".to_string());
    let reserved = env
        .rt
        .submit(RunSpec {
            headers,
            ..Default::default()
        })
        .await;
    assert!(matches!(reserved, Err(Error::ReservedHeaderInSubmit(k)) if k == "workflow.step"));
    for bad in ["", "a b", "x/y", &"z".repeat(129)] {
        let r = env
            .rt
            .submit(RunSpec {
                run_id: Some(bad.to_string()),
                ..Default::default()
            })
            .await;
        assert!(matches!(r, Err(Error::InvalidRunId { .. })), "{bad:?}");
    }
    let big = env
        .rt
        .submit(RunSpec {
            input: vec![0; MAX_PAYLOAD_BYTES + 1],
            ..Default::default()
        })
        .await;
    assert!(matches!(
        big,
        Err(Error::PayloadTooLarge { what: "input", .. })
    ));
    let stats = env.queue().view().stats("workflow-steps").await.unwrap();
    assert_eq!(stats.pending, 0);
    assert!(matches!(
        env.rt.status("bad id").await,
        Err(Error::InvalidRunId { .. })
    ));
    assert!(matches!(
        env.rt.wait("nobody").await,
        Err(Error::RunNotFound(_))
    ));
}

#[tokio::test]
async fn hook_gets_the_submitters_headers_without_reserved_keys() {
    let hook = RecordingHook::default();
    let runner = FnRunner::new(|s: Step| async move {
        assert!(s.headers.keys().all(|k| !k.starts_with("workflow.")));
        assert_eq!(s.headers.get("tenant").map(String::as_str), Some("acme"));
        if s.step_number == 0 {
            Ok(StepOutcome::Continue { payload: vec![] })
        } else {
            Ok(StepOutcome::Succeed { result: vec![] })
        }
    });
    let mut env = Env::new(runner, hook.clone()).await;
    env.start();
    let mut headers = HashMap::new();
    headers.insert("tenant".to_string(), "acme".to_string());
    env.rt
        .submit(RunSpec {
            run_id: Some("h".into()),
            headers: headers.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = hook.wait_for("h").await;
    assert_eq!(seen.headers, headers);
    assert_eq!(seen.status, TerminalStatus::Succeeded);
    env.stop().await;
    assert_eq!(hook.count("h"), 1);
}

#[tokio::test]
async fn cancel_pending_and_scheduled_runs() {
    let hook = RecordingHook::default();
    let runner = FnRunner::new(|_s: Step| async move {
        Ok(StepOutcome::ContinueAfter {
            payload: vec![],
            delay: Duration::from_secs(60),
        })
    });
    let mut env = Env::new(runner.clone(), hook.clone()).await;
    // Pending: no worker yet.
    env.submit("pending", b"").await;
    assert_eq!(
        env.rt.status("pending").await.unwrap().unwrap().state,
        RunState::Pending
    );
    assert!(env.rt.cancel("pending").await.unwrap());
    let out = env.rt.outcome("pending").await.unwrap().unwrap();
    assert_eq!((out.status, out.error), (TerminalStatus::Cancelled, None));
    assert_eq!(env.rt.status("pending").await.unwrap(), None);
    // Scheduled.
    env.start();
    env.submit("sched", b"").await;
    env.until_status("sched", |s| {
        s.is_some_and(|s| s.state == RunState::Scheduled)
    })
    .await;
    assert!(env.rt.cancel("sched").await.unwrap());
    assert_eq!(
        env.rt.outcome("sched").await.unwrap().unwrap().status,
        TerminalStatus::Cancelled
    );
    // Twice, after termination, unknown.
    assert!(!env.rt.cancel("sched").await.unwrap());
    assert!(!env.rt.cancel("nobody").await.unwrap());
    hook.wait_for("pending").await;
    hook.wait_for("sched").await;
    env.clock.advance(Duration::from_secs(120));
    env.queue().promote_scheduled_now().await.unwrap();
    env.stop().await;
    assert_eq!(runner.calls("pending", 0), 0);
    assert_eq!(runner.calls("sched", 1), 0);
    assert_eq!((hook.count("pending"), hook.count("sched")), (1, 1));
    let stats = env.queue().view().stats("workflow-steps").await.unwrap();
    assert_eq!(
        stats.pending + stats.scheduled + stats.claimed + stats.dead,
        0
    );
}

/// A runner whose step 0 signals that it started, then waits for a gate
/// and returns `result`; with `cooperative`, it returns early with an
/// error when the cancel token fires.
fn blocking_runner(
    started: Arc<Notify>,
    gate: Gate,
    cooperative: bool,
    result: StepOutcome,
) -> FnRunner {
    FnRunner::new(move |s: Step| {
        let (started, gate, result) = (started.clone(), gate.clone(), result.clone());
        async move {
            if s.step_number > 0 {
                return Ok(StepOutcome::Succeed { result: vec![] });
            }
            started.notify_one();
            if cooperative {
                tokio::select! {
                    _ = s.cancel_token.cancelled() => return Err(StepError::transient("interrupted")),
                    _ = gate.wait() => {}
                }
            } else {
                gate.wait().await;
            }
            Ok(result)
        }
    })
}

/// A fresh environment whose run `id` is inside its step 0 (a
/// [`blocking_runner`]) when this returns; its gate lets the step go on.
async fn with_running_step<H: TerminalHook + Clone>(
    hook: H,
    id: &str,
    cooperative: bool,
    result: StepOutcome,
) -> (Env<H>, FnRunner, Gate) {
    let (started, gate) = (Arc::new(Notify::new()), Gate::default());
    let runner = blocking_runner(started.clone(), gate.clone(), cooperative, result);
    let mut env = Env::new(runner.clone(), hook).await;
    env.start();
    env.submit(id, b"").await;
    started.notified().await;
    (env, runner, gate)
}

#[tokio::test]
async fn cancel_running_step_discards_its_outcome() {
    let hook = RecordingHook::default();
    let (mut env, runner, gate) = with_running_step(
        hook.clone(),
        "running",
        false,
        StepOutcome::Continue { payload: vec![] },
    )
    .await;
    assert_eq!(
        env.rt.status("running").await.unwrap().unwrap().state,
        RunState::Running
    );
    assert!(env.rt.cancel("running").await.unwrap());
    assert_eq!(
        env.rt.status("running").await.unwrap().unwrap().state,
        RunState::Cancelling
    );
    assert!(!env.rt.cancel("running").await.unwrap(), "second cancel");
    gate.open();
    let out = env.rt.wait("running").await.unwrap();
    assert_eq!((out.status, out.error), (TerminalStatus::Cancelled, None));
    assert_eq!(runner.calls("running", 1), 0, "the Continue was discarded");
    hook.wait_for("running").await;
    env.stop().await;
    assert_eq!(hook.count("running"), 1);
    let stats = env.queue().view().stats("workflow-steps").await.unwrap();
    assert_eq!(stats.dead, 0);
}

#[tokio::test]
async fn cooperative_cancel_error_is_not_retried() {
    let (mut env, runner, _gate) = with_running_step(
        NoopTerminalHook,
        "coop",
        true,
        StepOutcome::Succeed { result: vec![] },
    )
    .await;
    assert!(env.rt.cancel("coop").await.unwrap());
    let out = env.rt.wait("coop").await.unwrap();
    assert_eq!((out.status, out.error), (TerminalStatus::Cancelled, None));
    assert_eq!(runner.calls("coop", 0), 1, "no retry after the cancel");
    env.stop().await;
    let stats = env.queue().view().stats("workflow-steps").await.unwrap();
    assert_eq!(stats.dead + stats.pending, 0, "no dead letter, no retry");
}

#[tokio::test]
async fn runner_cancel_reason_wins_over_external_cancel() {
    let (mut env, _runner, gate) = with_running_step(
        NoopTerminalHook,
        "both",
        false,
        StepOutcome::Cancel {
            reason: "mine".into(),
        },
    )
    .await;
    assert!(env.rt.cancel("both").await.unwrap());
    gate.open();
    let out = env.rt.wait("both").await.unwrap();
    assert_eq!(
        (out.status, out.error.as_deref()),
        (TerminalStatus::Cancelled, Some("mine"))
    );
    env.stop().await;
}

#[tokio::test]
async fn cancel_survives_a_restart_and_the_step_is_not_run_again() {
    let hook = RecordingHook::default();
    let (mut env, _runner, gate) = with_running_step(
        hook.clone(),
        "durable-cancel",
        false,
        StepOutcome::Continue { payload: vec![] },
    )
    .await;
    assert!(env.rt.cancel("durable-cancel").await.unwrap());
    // Crash before the step returns.
    let fresh = blocking_runner(
        Arc::new(Notify::new()),
        Gate::default(),
        false,
        StepOutcome::Continue { payload: vec![] },
    );
    env.crash_and_reopen(fresh.clone(), hook.clone()).await;
    assert_eq!(
        env.rt
            .status("durable-cancel")
            .await
            .unwrap()
            .unwrap()
            .state,
        RunState::Cancelling,
        "the request is durable"
    );
    env.start();
    let out = env.rt.wait("durable-cancel").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Cancelled);
    assert_eq!(
        fresh.calls("durable-cancel", 0),
        0,
        "not run after the request"
    );
    hook.wait_for("durable-cancel").await;
    env.stop().await;
    gate.open();
}

#[tokio::test]
async fn restart_resumes_at_the_next_step_without_rerunning_committed_ones() {
    let gate = Gate::default();
    let make = |gate: Gate| {
        FnRunner::new(move |s: Step| {
            let gate = gate.clone();
            async move {
                match s.step_number {
                    0 => Ok(StepOutcome::Continue {
                        payload: b"zero".to_vec(),
                    }),
                    1 => {
                        gate.wait().await;
                        Ok(StepOutcome::Continue {
                            payload: b"one".to_vec(),
                        })
                    }
                    _ => Ok(StepOutcome::Succeed { result: s.payload }),
                }
            }
        })
    };
    let first = make(gate.clone());
    let mut env = Env::new(first.clone(), NoopTerminalHook).await;
    env.start();
    env.submit("resume", b"").await;
    env.until_status("resume", |s| {
        s.is_some_and(|s| s.current_step == 1 && s.state == RunState::Running)
    })
    .await;
    let open = Gate::default();
    open.open();
    let second = make(open);
    env.crash_and_reopen(second.clone(), NoopTerminalHook).await;
    // Status reads durable state in the fresh runtime.
    let status = env.rt.status("resume").await.unwrap().unwrap();
    assert_eq!((status.current_step, status.state), (1, RunState::Pending));
    env.start();
    let out = env.rt.wait("resume").await.unwrap();
    assert_eq!(out.result.as_deref(), Some(&b"one"[..]));
    assert_eq!(first.calls("resume", 0), 1);
    assert_eq!(second.calls("resume", 0), 0, "committed step 0 not re-run");
    assert_eq!(
        second.calls("resume", 1),
        1,
        "the interrupted step runs again"
    );
    env.stop().await;
    gate.open();
}

#[tokio::test]
async fn a_step_the_queue_dead_letters_fails_its_run() {
    let gate = Gate::default();
    let (started, hook) = (Arc::new(Notify::new()), RecordingHook::default());
    let runner = blocking_runner(
        started.clone(),
        gate.clone(),
        false,
        StepOutcome::Succeed { result: vec![] },
    );
    let mut env = Env::new(runner, hook.clone()).await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("last-try".into()),
            max_attempts_per_step: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    started.notified().await;
    // Crash during the last attempt: the open dead-letters the step.
    env.crash_and_reopen(echo_chain(1), hook.clone()).await;
    env.start();
    let out = env.rt.wait("last-try").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Failed);
    assert!(out.error.unwrap().contains("gave up"), "names the cause");
    hook.wait_for("last-try").await;
    env.stop().await;
    gate.open();
}

#[tokio::test]
async fn malformed_step_jobs_are_dead_lettered_and_the_pool_goes_on() {
    let mut env = Env::new(echo_chain(2), NoopTerminalHook).await;
    let q = env.queue().clone();
    let bare = q.enqueue("workflow-steps", b"junk".to_vec()).await.unwrap();
    let bad_step = q
        .enqueue_with(
            "workflow-steps",
            vec![],
            EnqueueOptions::default()
                .header(HEADER_RUN_ID, "x")
                .header(HEADER_STEP, "two"),
        )
        .await
        .unwrap();
    let unknown_run = q
        .enqueue_with(
            "workflow-steps",
            vec![],
            EnqueueOptions::default()
                .header(HEADER_RUN_ID, "ghost")
                .header(HEADER_STEP, "0"),
        )
        .await
        .unwrap();
    env.start();
    env.submit("fine", b"").await;
    assert_eq!(
        env.rt.wait("fine").await.unwrap().status,
        TerminalStatus::Succeeded
    );
    env.stop().await;
    for (id, needle) in [
        (bare, "no `workflow.run_id` header"),
        (bad_step, "not a step number"),
        (unknown_run, "no live record"),
    ] {
        let job = q.view().get_job(&id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Dead);
        let err = job.last_error.unwrap_or_default();
        assert!(err.contains(needle), "{err}");
    }
}

#[tokio::test]
async fn two_runtimes_share_one_queue_under_distinct_names() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let clock = MockClock::new(T0);
    let queue = open_queue(store, &clock).await;
    let a = WorkflowRuntime::builder(queue.clone(), echo_chain(2), NoopTerminalHook)
        .queue_name("alpha")
        .build()
        .unwrap();
    let b = WorkflowRuntime::builder(
        queue.clone(),
        FnRunner::new(|_s: Step| async { Ok(StepOutcome::Fail { reason: "b".into() }) }),
        NoopTerminalHook,
    )
    .queue_name("beta")
    .build()
    .unwrap();
    let wa = tokio::spawn({
        let a = a.clone();
        async move { a.run(std::future::pending()).await }
    });
    let wb = tokio::spawn({
        let b = b.clone();
        async move { b.run(std::future::pending()).await }
    });
    let spec = || RunSpec {
        run_id: Some("same-id".into()),
        ..Default::default()
    };
    assert!(a.submit(spec()).await.unwrap().newly_submitted);
    assert!(b.submit(spec()).await.unwrap().newly_submitted);
    assert_eq!(
        a.wait("same-id").await.unwrap().status,
        TerminalStatus::Succeeded
    );
    assert_eq!(
        b.wait("same-id").await.unwrap().status,
        TerminalStatus::Failed
    );
    wa.abort();
    wb.abort();
}

#[tokio::test]
async fn bad_settings_are_errors_from_build() {
    let queue = open_queue(Arc::new(InMemory::new()), &MockClock::new(T0)).await;
    let zero = WorkflowRuntime::builder(queue.clone(), echo_chain(1), NoopTerminalHook)
        .max_concurrent_steps(0)
        .build();
    assert!(matches!(zero, Err(Error::InvalidConfig(_))));
    let no_patience = WorkflowRuntime::builder(queue.clone(), echo_chain(1), NoopTerminalHook)
        .store_timeout(Duration::ZERO)
        .build();
    assert!(
        matches!(&no_patience, Err(Error::InvalidConfig(why)) if why.contains("store_timeout")),
        "{:?}",
        no_patience.err()
    );
    for name in ["", "has space", &"q".repeat(300)] {
        let bad = WorkflowRuntime::builder(queue.clone(), echo_chain(1), NoopTerminalHook)
            .queue_name(name)
            .build();
        assert!(matches!(bad, Err(Error::InvalidConfig(_))), "{name:?}");
    }
}

#[tokio::test]
async fn outcomes_expire_after_the_retention_window() {
    let mut env = Env::new(echo_chain(1), NoopTerminalHook).await;
    env.rt = WorkflowRuntime::builder(env.queue().clone(), echo_chain(1), NoopTerminalHook)
        .terminal_retention(Duration::from_secs(60))
        .poll_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    env.start();
    env.submit("short", b"x").await;
    env.rt.wait("short").await.unwrap();
    env.clock.advance(Duration::from_secs(61));
    for _ in 0..10_000 {
        if env.rt.outcome("short").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(env.rt.outcome("short").await.unwrap(), None);
    // The id is free again: a new run with other input is accepted.
    assert!(env.submit("short", b"y").await.newly_submitted);
    env.stop().await;
}

#[tokio::test]
async fn step_attempt_counts_are_reported_to_the_runner() {
    let seen = Arc::new(AtomicU32::new(0));
    let runner = {
        let seen = seen.clone();
        FnRunner::new(move |s: Step| {
            let seen = seen.clone();
            async move {
                seen.store(s.max_attempts, Ordering::SeqCst);
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("m".into()),
            max_attempts_per_step: Some(7),
            ..Default::default()
        })
        .await
        .unwrap();
    env.rt.wait("m").await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 7);
    env.stop().await;
}

#[tokio::test]
async fn runs_filter_by_submit_time_and_header() {
    let runner =
        FnRunner::new(|_s: Step| async move { Ok(StepOutcome::Succeed { result: vec![] }) });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    let spec = |id: &str, team: &str| RunSpec {
        run_id: Some(id.into()),
        headers: HashMap::from([("team".to_string(), team.to_string())]),
        ..Default::default()
    };
    env.rt.submit(spec("early", "red")).await.unwrap();
    env.clock.advance(Duration::from_secs(60));
    let between = std::time::UNIX_EPOCH + Duration::from_millis(env.clock_now());
    env.rt.submit(spec("late", "blue")).await.unwrap();
    env.start();
    env.rt.wait("early").await.unwrap();
    env.rt.wait("late").await.unwrap();
    let ids = |page: RunPage| -> Vec<String> { page.runs.into_iter().map(|r| r.run_id).collect() };
    let since = RunFilter {
        submitted_since: Some(between),
        ..Default::default()
    };
    assert_eq!(ids(env.rt.runs(&since).await.unwrap()), ["late"]);
    let until = RunFilter {
        submitted_until: Some(between),
        ..Default::default()
    };
    assert_eq!(ids(env.rt.runs(&until).await.unwrap()), ["early"]);
    let red = RunFilter {
        header: Some(("team".into(), "red".into())),
        ..Default::default()
    };
    assert_eq!(ids(env.rt.runs(&red).await.unwrap()), ["early"]);
    let none = RunFilter {
        header: Some(("team".into(), "green".into())),
        ..Default::default()
    };
    assert!(env.rt.runs(&none).await.unwrap().runs.is_empty());
    env.stop().await;
}
