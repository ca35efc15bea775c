//! Retry backoff with jitter and the per-workflow circuit breaker, driven by
//! taquba's `MockClock`: time only moves when a test moves it.

mod common;
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;
use waymark::*;

const WF: &str = "payments";

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A runner that fails (transiently) while `failing` is set.
fn switchable(failing: Arc<AtomicBool>) -> FnRunner {
    FnRunner::new(move |s: Step| {
        let failing = failing.clone();
        async move {
            if failing.load(Ordering::SeqCst) {
                Err(StepError::transient(format!("{} is down", s.workflow)))
            } else {
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        }
    })
}

fn spec(id: &str, workflow: &str) -> RunSpec {
    RunSpec {
        run_id: Some(id.into()),
        workflow: Some(workflow.into()),
        max_attempts_per_step: Some(50),
        ..Default::default()
    }
}

/// Let scheduled work fall due: move the clock and promote at once.
async fn advance<H: TerminalHook + Clone>(env: &Env<H>, by: Duration) {
    env.clock.advance(by);
    env.queue().promote_scheduled_now().await.unwrap();
}

async fn health<H: TerminalHook + Clone>(env: &Env<H>, wf: &str) -> WorkflowHealth {
    env.rt.workflow_health(wf).await.unwrap().unwrap()
}

#[tokio::test]
async fn retry_delays_grow_within_jitter_bounds_and_show_in_status() {
    let failing = Arc::new(AtomicBool::new(true));
    let runner = switchable(failing.clone());
    let policy = RetryPolicy {
        initial: Duration::from_secs(10),
        multiplier: 2.0,
        max_delay: Duration::from_secs(25),
        jitter: 0.5,
        max_attempts: 5,
    };
    let mut env = Env::configured(runner.clone(), NoopTerminalHook, move |b| {
        b.retry_policy(WF, policy.clone())
    })
    .await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("r".into()),
            workflow: Some(WF.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    // Attempt n waits min(10 s × 2^(n-1), 25 s), less up to half of it.
    for (attempt, full_ms) in [(1u32, 10_000u64), (2, 20_000), (3, 25_000)] {
        // The retry of this attempt (a due one is not it).
        let now = env.clock_now();
        env.until_status("r", |s| {
            s.is_some_and(|s| {
                s.state == RunState::Scheduled && s.scheduled_for.is_some_and(|t| ms(t) > now)
            })
        })
        .await;
        assert_eq!(runner.calls("r", 0), attempt);
        let status = env.rt.status("r").await.unwrap().unwrap();
        let now = env.clock_now();
        let wait = ms(status.scheduled_for.unwrap()) - now;
        assert!(
            (full_ms / 2..=full_ms).contains(&wait),
            "attempt {attempt}: waits {wait} ms, expected {}..={full_ms}",
            full_ms / 2
        );
        // Not a moment early.
        advance(&env, Duration::from_millis(wait - 1)).await;
        assert_eq!(runner.calls("r", 0), attempt);
        advance(&env, Duration::from_millis(1)).await;
        if attempt == 3 {
            failing.store(false, Ordering::SeqCst);
        }
    }
    let out = env.rt.wait("r").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(out.workflow, WF);
    assert_eq!(runner.calls("r", 0), 4);
    env.stop().await;
}

#[tokio::test]
async fn backoff_window_defers_steps_without_spending_attempts() {
    let seen_attempts = Arc::new(Mutex::new(Vec::new()));
    let runner = {
        let seen = seen_attempts.clone();
        FnRunner::new(move |s: Step| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push((s.run_id.clone(), s.attempts));
                if s.run_id == "bad" {
                    Ok(StepOutcome::Fail {
                        reason: "card declined".into(),
                    })
                } else {
                    Ok(StepOutcome::Succeed { result: vec![] })
                }
            }
        })
    };
    let mut env = Env::configured(runner.clone(), NoopTerminalHook, |b| {
        b.breaker(
            WF,
            BackoffPolicy {
                initial: Duration::from_secs(60),
                jitter: 0.0,
                streak_limit: None,
                ..Default::default()
            },
        )
    })
    .await;
    env.start();
    env.rt.submit(spec("bad", WF)).await.unwrap();
    env.rt.wait("bad").await.unwrap();
    let h = health(&env, WF).await;
    assert_eq!(h.failure_streak, 1);
    let BreakerStatus::Backoff {
        until, streak: 1, ..
    } = h.status
    else {
        panic!("expected backoff, got {:?}", h.status)
    };
    assert_eq!(ms(until), T0 + 60_000);
    // A step claimed in the window is deferred to its end, not run.
    env.rt.submit(spec("next", WF)).await.unwrap();
    env.until_status("next", |s| {
        s.is_some_and(|s| s.state == RunState::Scheduled)
    })
    .await;
    let status = env.rt.status("next").await.unwrap().unwrap();
    assert_eq!(status.scheduled_for, Some(until));
    assert_eq!(runner.calls("next", 0), 0);
    advance(&env, Duration::from_secs(60)).await;
    env.rt.wait("next").await.unwrap();
    assert!(
        seen_attempts.lock().unwrap().contains(&("next".into(), 1)),
        "the deferral spent no attempt"
    );
    // The success closed the breaker and reset the streak.
    let h = health(&env, WF).await;
    assert_eq!((h.status, h.failure_streak), (BreakerStatus::Closed, 0));
    env.stop().await;
}

#[tokio::test]
async fn trip_parks_steps_until_reset_and_other_workflows_run_on() {
    let failing = Arc::new(AtomicBool::new(true));
    let runner = switchable(failing.clone());
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut env = Env::configured(runner.clone(), NoopTerminalHook, {
        let events = events.clone();
        move |b| {
            let events = events.clone();
            b.breaker(
                WF,
                BackoffPolicy {
                    initial: Duration::ZERO,
                    streak_limit: Some(3),
                    ..Default::default()
                },
            )
            .on_breaker_change(move |e| events.lock().unwrap().push(e.clone()))
        }
    })
    .await;
    env.start();
    // One run's attempts fail one after another until the breaker trips.
    env.rt.submit(spec("p0", WF)).await.unwrap();
    env.until_status("p0", |s| s.is_some_and(|s| s.state == RunState::Parked))
        .await;
    // Runs submitted while tripped are parked without running.
    for i in 1..3 {
        env.rt.submit(spec(&format!("p{i}"), WF)).await.unwrap();
    }
    for i in 0..3 {
        env.until_status(&format!("p{i}"), |s| {
            s.is_some_and(|s| s.state == RunState::Parked)
        })
        .await;
    }
    let h = health(&env, WF).await;
    assert!(
        matches!(h.status, BreakerStatus::Tripped { streak: 3, .. }),
        "{h:?}"
    );
    assert_eq!(h.last_error.as_deref(), Some("payments is down"));
    assert_eq!(
        runner.calls("p0", 0),
        3,
        "exactly streak_limit attempts ran"
    );
    assert_eq!(runner.calls("p1", 0) + runner.calls("p2", 0), 0);
    // Time passes: nothing runs, no attempt is spent, no slot is held.
    advance(&env, Duration::from_secs(24 * 3600)).await;
    let calls_later: u32 = (0..3).map(|i| runner.calls(&format!("p{i}"), 0)).sum();
    assert_eq!(calls_later, 3);
    assert_eq!(
        env.queue()
            .view()
            .stats("workflow-steps")
            .await
            .unwrap()
            .claimed,
        0
    );
    // Another workflow on the same queue is not held back.
    for i in 0..5 {
        env.rt
            .submit(spec(&format!("ok{i}"), "reports"))
            .await
            .unwrap();
    }
    failing.store(false, Ordering::SeqCst);
    for i in 0..5 {
        assert_eq!(
            env.rt.wait(&format!("ok{i}")).await.unwrap().status,
            TerminalStatus::Succeeded
        );
    }
    for i in 0..3 {
        assert_eq!(
            env.rt
                .status(&format!("p{i}"))
                .await
                .unwrap()
                .unwrap()
                .state,
            RunState::Parked
        );
    }
    // A reset closes the breaker and releases the parked steps at once,
    // without any clock move.
    assert!(env.rt.reset_workflow(WF).await.unwrap());
    for i in 0..3 {
        assert_eq!(
            env.rt.wait(&format!("p{i}")).await.unwrap().status,
            TerminalStatus::Succeeded
        );
    }
    let h = health(&env, WF).await;
    assert_eq!((h.status, h.failure_streak), (BreakerStatus::Closed, 0));
    env.stop().await;
    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        matches!(&events[0], BreakerEvent::Tripped { workflow, streak: 3, .. } if workflow == WF)
    );
    assert!(matches!(&events[1], BreakerEvent::Closed { workflow } if workflow == WF));
}

#[tokio::test]
async fn a_success_resets_the_streak() {
    let failures_left = Arc::new(Mutex::new(2u32));
    let runner = {
        let left = failures_left.clone();
        FnRunner::new(move |_s: Step| {
            let left = left.clone();
            async move {
                let mut left = left.lock().unwrap();
                if *left > 0 {
                    *left -= 1;
                    return Err(StepError::transient("blip"));
                }
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.breaker(
            WF,
            BackoffPolicy {
                initial: Duration::ZERO,
                streak_limit: Some(5),
                ..Default::default()
            },
        )
    })
    .await;
    env.start();
    env.rt.submit(spec("blippy", WF)).await.unwrap();
    env.rt.wait("blippy").await.unwrap();
    let h = health(&env, WF).await;
    assert_eq!(h.failure_streak, 0);
    assert_eq!(h.status, BreakerStatus::Closed);
    assert_eq!(h.last_error.as_deref(), Some("blip"));
    env.stop().await;
}

/// A tripped workflow with a probe: trip it, then move past `probe_after`.
async fn tripped_with_probe(runner: FnRunner) -> Env<NoopTerminalHook> {
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.breaker(
            WF,
            BackoffPolicy {
                initial: Duration::ZERO,
                streak_limit: Some(2),
                probe_after: Some(Duration::from_secs(300)),
                ..Default::default()
            },
        )
        .poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    for i in 0..3 {
        env.rt.submit(spec(&format!("q{i}"), WF)).await.unwrap();
    }
    for i in 0..3 {
        env.until_status(&format!("q{i}"), |s| {
            s.is_some_and(|s| s.state == RunState::Parked)
        })
        .await;
    }
    env
}

#[tokio::test]
async fn half_open_probe_success_closes_and_releases_the_rest() {
    let failing = Arc::new(AtomicBool::new(true));
    let runner = switchable(failing.clone());
    let env = tripped_with_probe(runner.clone()).await;
    failing.store(false, Ordering::SeqCst);
    env.clock.advance(Duration::from_secs(301));
    // The maintenance tick wakes one parked step as the probe; its success
    // closes the breaker and releases the others.
    for i in 0..3 {
        assert_eq!(
            env.rt.wait(&format!("q{i}")).await.unwrap().status,
            TerminalStatus::Succeeded
        );
    }
    assert_eq!(health(&env, WF).await.status, BreakerStatus::Closed);
}

#[tokio::test]
async fn half_open_probe_failure_trips_again() {
    let failing = Arc::new(AtomicBool::new(true));
    let runner = switchable(failing.clone());
    let mut env = tripped_with_probe(runner.clone()).await;
    let BreakerStatus::Tripped { since: first, .. } = health(&env, WF).await.status else {
        panic!("not tripped")
    };
    let calls = |r: &FnRunner| -> u32 { (0..3).map(|i| r.calls(&format!("q{i}"), 0)).sum() };
    let before = calls(&runner);
    env.clock.advance(Duration::from_secs(301));
    // Exactly one probe runs, fails, and the breaker trips again later on.
    loop {
        if let BreakerStatus::Tripped { since, .. } = health(&env, WF).await.status
            && since > first
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(calls(&runner), before + 1);
    for i in 0..3 {
        env.until_status(&format!("q{i}"), |s| {
            s.is_some_and(|s| s.state == RunState::Parked)
        })
        .await;
    }
    env.stop().await;
}

#[tokio::test]
async fn trip_state_survives_a_restart() {
    let failing = Arc::new(AtomicBool::new(true));
    let runner = switchable(failing.clone());
    let mut env = Env::configured(runner.clone(), NoopTerminalHook, |b| {
        b.breaker(
            WF,
            BackoffPolicy {
                initial: Duration::ZERO,
                streak_limit: Some(2),
                ..Default::default()
            },
        )
    })
    .await;
    env.start();
    env.rt.submit(spec("s", WF)).await.unwrap();
    env.until_status("s", |s| s.is_some_and(|s| s.state == RunState::Parked))
        .await;
    env.stop().await;
    failing.store(false, Ordering::SeqCst);
    env.crash_and_reopen(runner.clone(), NoopTerminalHook).await;
    assert!(matches!(
        health(&env, WF).await.status,
        BreakerStatus::Tripped { streak: 2, .. }
    ));
    env.start();
    // Still parked after the restart, even as new work of it arrives.
    env.rt.submit(spec("s2", WF)).await.unwrap();
    env.until_status("s2", |s| s.is_some_and(|s| s.state == RunState::Parked))
        .await;
    assert_eq!(runner.calls("s2", 0), 0);
    assert!(env.rt.reset_workflow(WF).await.unwrap());
    env.rt.wait("s").await.unwrap();
    env.rt.wait("s2").await.unwrap();
    env.stop().await;
}

#[tokio::test]
async fn health_counts_runs_by_workflow() {
    let runner = FnRunner::new(|s: Step| async move {
        if s.run_id.starts_with("bad") {
            Err(StepError::permanent("nope"))
        } else {
            Ok(StepOutcome::Succeed { result: vec![] })
        }
    });
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    for (id, wf) in [
        ("bad1", "a"),
        ("good1", "a"),
        ("good2", "a"),
        ("good3", "b"),
    ] {
        env.rt.submit(spec(id, wf)).await.unwrap();
        env.rt.wait(id).await.unwrap();
    }
    let a = health(&env, "a").await;
    assert_eq!((a.runs_succeeded, a.runs_failed), (2, 1));
    assert_eq!(a.failure_streak, 0, "good runs after the bad one reset it");
    let all = env.rt.workflows().await.unwrap();
    let names: Vec<_> = all.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!((all[1].runs_succeeded, all[1].runs_failed), (1, 0));
    env.stop().await;
    // Counts are durable (and folded tallies give the same numbers).
    env.crash_and_reopen(
        FnRunner::new(|_s: Step| async { Ok(StepOutcome::Succeed { result: vec![] }) }),
        NoopTerminalHook,
    )
    .await;
    let a = health(&env, "a").await;
    assert_eq!((a.runs_succeeded, a.runs_failed), (2, 1));
    assert_eq!(env.rt.workflow_health("never").await.unwrap(), None);
}

#[tokio::test]
async fn invalid_policies_are_rejected_at_build() {
    let queue = open_queue(
        Arc::new(taquba::object_store::memory::InMemory::new()),
        &taquba::MockClock::new(T0),
    )
    .await;
    let runner = || FnRunner::new(|_s: Step| async { Ok(StepOutcome::Succeed { result: vec![] }) });
    let cases: Vec<WorkflowRuntimeBuilder<FnRunner, NoopTerminalHook>> = vec![
        WorkflowRuntime::builder(queue.clone(), runner(), NoopTerminalHook).breaker(
            WF,
            BackoffPolicy {
                multiplier: 0.9,
                ..Default::default()
            },
        ),
        WorkflowRuntime::builder(queue.clone(), runner(), NoopTerminalHook).breaker(
            WF,
            BackoffPolicy {
                jitter: -0.1,
                ..Default::default()
            },
        ),
        WorkflowRuntime::builder(queue.clone(), runner(), NoopTerminalHook).breaker(
            WF,
            BackoffPolicy {
                streak_limit: Some(0),
                ..Default::default()
            },
        ),
        WorkflowRuntime::builder(queue.clone(), runner(), NoopTerminalHook).retry_policy(
            WF,
            RetryPolicy {
                max_attempts: 0,
                ..Default::default()
            },
        ),
        WorkflowRuntime::builder(queue.clone(), runner(), NoopTerminalHook).default_retry_policy(
            RetryPolicy {
                jitter: 2.0,
                ..Default::default()
            },
        ),
        WorkflowRuntime::builder(queue.clone(), runner(), NoopTerminalHook)
            .breaker("bad name", BackoffPolicy::default()),
        // Under a millisecond rounds to zero in the records' times.
        WorkflowRuntime::builder(queue.clone(), runner(), NoopTerminalHook)
            .poll_interval(std::time::Duration::from_micros(500)),
    ];
    for builder in cases {
        assert!(builder.build().is_err());
    }
    let bad_wf = WorkflowRuntime::builder(queue, runner(), NoopTerminalHook)
        .build()
        .unwrap()
        .submit(RunSpec {
            workflow: Some("no spaces".into()),
            ..Default::default()
        })
        .await;
    assert!(matches!(bad_wf, Err(Error::InvalidRunId { .. })));
}

#[tokio::test]
async fn a_waiting_step_of_a_tripped_workflow_reports_parked() {
    let runner = switchable(Arc::new(AtomicBool::new(true)));
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.breaker(
            WF,
            BackoffPolicy {
                initial: Duration::ZERO,
                streak_limit: Some(1),
                ..Default::default()
            },
        )
    })
    .await;
    env.start();
    env.rt.submit(spec("first", WF)).await.unwrap();
    env.until_status("first", |s| s.is_some_and(|s| s.state == RunState::Parked))
        .await;
    env.stop().await;
    // Not claimed yet, so not parked on the queue: status still says where
    // it is headed.
    env.rt.submit(spec("waiting", WF)).await.unwrap();
    let job = env.rt.status("waiting").await.unwrap().unwrap();
    assert_eq!(job.state, RunState::Parked);
    env.rt.reset_workflow(WF).await.unwrap();
    let job = env.rt.status("waiting").await.unwrap().unwrap();
    assert_eq!(job.state, RunState::Pending);
}

// ---- Hardening (issue 9) ----

/// Wait (bounded) for a run's outcome without registering a waiter.
async fn until_outcome<H: TerminalHook + Clone>(env: &Env<H>, id: &str) -> RunOutcome {
    for _ in 0..5_000 {
        if let Some(out) = env.rt.outcome(id).await.unwrap() {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{id} never ended");
}

/// Wait (bounded) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..5_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never: {what}");
}

/// A breaker that trips at the first failure, never probes.
fn trips_at_once() -> BackoffPolicy {
    BackoffPolicy {
        initial: Duration::ZERO,
        streak_limit: Some(1),
        ..Default::default()
    }
}

/// Defect 3 (a): a reset that commits and scans the park index while a
/// parking settlement is on its way (here: stalled offloading the step's
/// large payload) must not miss it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_racing_a_parking_settlement_does_not_strand_the_step() {
    use common::{FaultPlan, FaultStore, StoreOp};
    let failing = Arc::new(AtomicBool::new(true));
    let runner = switchable(failing.clone());
    let faulty = FaultStore::new(
        Arc::new(taquba::object_store::memory::InMemory::new()),
        1,
        FaultPlan::default(),
    );
    let faults = faulty.faults();
    let clock = taquba::MockClock::new(T0);
    let queue = open_queue(faulty, &clock).await;
    let rt = builder(queue, runner, NoopTerminalHook)
        .breaker(WF, trips_at_once())
        // Maintenance ticks would release a stranded step: keep them away.
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let pool = |rt: &WorkflowRuntime<FnRunner, NoopTerminalHook>| {
        let rt = rt.clone();
        tokio::spawn(async move { rt.run(std::future::pending()).await })
    };
    let worker = pool(&rt);
    rt.submit(spec("trip", WF)).await.unwrap();
    for _ in 0..5_000 {
        if rt.status("trip").await.unwrap().map(|s| s.state) == Some(RunState::Parked) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    worker.abort();
    let _ = worker.await;
    // A step whose payload taquba offloads: its parking settlement writes
    // the payload object before its transaction, and stalls there.
    rt.submit(RunSpec {
        input: vec![7; 300 * 1024],
        ..spec("big", WF)
    })
    .await
    .unwrap();
    faults.hold(StoreOp::Put, "payloads");
    let worker = pool(&rt);
    until("the parking settlement stalls", || faults.held() >= 1).await;
    let reset = tokio::spawn({
        let rt = rt.clone();
        async move { rt.reset_workflow(WF).await }
    });
    // Give the reset every chance to finish before the parking commits.
    for _ in 0..200 {
        if reset.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    failing.store(false, Ordering::SeqCst);
    faults.release();
    assert!(reset.await.unwrap().unwrap());
    // Once the parking settlement has landed, the step is not parked.
    let mut state = None;
    for _ in 0..5_000 {
        state = rt.status("big").await.unwrap().map(|s| s.state);
        if state != Some(RunState::Running) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_ne!(
        state,
        Some(RunState::Parked),
        "stranded behind a closed breaker"
    );
    for _ in 0..5_000 {
        if rt.outcome("big").await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        rt.outcome("big").await.unwrap().map(|o| o.status),
        Some(TerminalStatus::Succeeded)
    );
    worker.abort();
}

/// Defect 3 (b): a reset cut short between closing the breaker and waking
/// the parked steps leaves them to the next maintenance tick, not forever.
#[tokio::test]
async fn a_reset_cut_short_after_its_commit_is_finished_by_maintenance() {
    use futures_util::FutureExt;
    let failing = Arc::new(AtomicBool::new(true));
    let runner = switchable(failing.clone());
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.breaker(WF, trips_at_once())
            .poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    for i in 0..3 {
        env.rt.submit(spec(&format!("c{i}"), WF)).await.unwrap();
    }
    for i in 0..3 {
        env.until_status(&format!("c{i}"), |s| {
            s.is_some_and(|s| s.state == RunState::Parked)
        })
        .await;
    }
    failing.store(false, Ordering::SeqCst);
    // Drive the reset until its close is committed, then drop it. The
    // record is read raw: a health read waits for the reset, which holds
    // the workflow's lock until it is dropped.
    let key = format!("wm/{DEFAULT_QUEUE_NAME}/wf/{WF}").into_bytes();
    let tripped = env.queue().view().kv_get(&key).await.unwrap();
    assert!(tripped.is_some(), "the trip is recorded under {key:?}");
    let mut reset = Box::pin(env.rt.reset_workflow(WF));
    loop {
        if env.queue().view().kv_get(&key).await.unwrap() != tripped {
            break;
        }
        assert!(
            (&mut reset).now_or_never().is_none(),
            "the reset finished before it could be cut short"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(reset);
    assert_eq!(health(&env, WF).await.status, BreakerStatus::Closed);
    for i in 0..3 {
        assert_eq!(
            until_outcome(&env, &format!("c{i}")).await.status,
            TerminalStatus::Succeeded
        );
    }
    env.stop().await;
}

/// Defect 3 (c): the step woken to become the probe is cancelled before it
/// runs; another parked step is woken instead.
#[tokio::test]
async fn a_cancelled_probe_candidate_does_not_stop_probing() {
    let failing = Arc::new(AtomicBool::new(true));
    let blocker = support::Gate::default();
    let runner = {
        let failing = failing.clone();
        let blocker = blocker.clone();
        FnRunner::new(move |s: Step| {
            let failing = failing.clone();
            let blocker = blocker.clone();
            async move {
                if s.workflow == "other" {
                    blocker.wait().await;
                } else if failing.load(Ordering::SeqCst) {
                    return Err(StepError::transient("down"));
                }
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.breaker(
            WF,
            BackoffPolicy {
                initial: Duration::ZERO,
                streak_limit: Some(1),
                probe_after: Some(Duration::from_secs(300)),
                ..Default::default()
            },
        )
        .max_concurrent_steps(1)
        .poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    for i in 0..3 {
        env.rt.submit(spec(&format!("w{i}"), WF)).await.unwrap();
    }
    for i in 0..3 {
        env.until_status(&format!("w{i}"), |s| {
            s.is_some_and(|s| s.state == RunState::Parked)
        })
        .await;
    }
    // The only worker slot is taken, so the woken probe candidate waits.
    env.rt.submit(spec("hold", "other")).await.unwrap();
    env.until_status("hold", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    failing.store(false, Ordering::SeqCst);
    env.clock.advance(Duration::from_secs(301));
    let mut woken = None;
    for _ in 0..5_000 {
        let page = env
            .queue()
            .view()
            .list_jobs("workflow-steps", taquba::JobStatus::Pending, None, 10)
            .await
            .unwrap();
        if let Some(job) = page.jobs.first() {
            woken = job.headers.get(HEADER_RUN_ID).cloned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let woken = woken.expect("a parked step is woken as the probe");
    assert!(env.rt.cancel(&woken).await.unwrap());
    blocker.open();
    for i in 0..3 {
        let id = format!("w{i}");
        let expected = if id == woken {
            TerminalStatus::Cancelled
        } else {
            TerminalStatus::Succeeded
        };
        assert_eq!(until_outcome(&env, &id).await.status, expected, "{id}");
    }
    env.stop().await;
}

/// Defect 5: a transient error whose message is over taquba's KV value cap
/// is retried; the health record keeps a bounded copy.
#[tokio::test]
async fn a_huge_transient_error_message_is_retried() {
    let runner = FnRunner::new(|s: Step| async move {
        if s.attempts == 1 {
            Err(StepError::transient("é".repeat(200 * 1024)))
        } else {
            Ok(StepOutcome::Succeed { result: vec![] })
        }
    });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.rt.submit(spec("loud", WF)).await.unwrap();
    let out = until_outcome(&env, "loud").await;
    assert_eq!(
        out.status,
        TerminalStatus::Succeeded,
        "{:?}",
        out.error.map(|e| e.len())
    );
    let kept = health(&env, WF).await.last_error.unwrap();
    assert!(kept.len() < 8 * 1024 && kept.ends_with("(truncated)"));
    env.stop().await;
}

/// Defect 8 (a): policies that `build()` accepts with a `Duration::MAX` cap
/// compute their windows and retries, saturating, instead of panicking.
#[tokio::test]
async fn extreme_policies_saturate() {
    let runner = FnRunner::new(|s: Step| async move {
        if s.run_id == "fails" {
            Ok(StepOutcome::Fail {
                reason: "no".into(),
            })
        } else {
            Err(StepError::transient("later"))
        }
    });
    let forever = Duration::from_secs(u64::MAX);
    let mut env = Env::configured(runner, NoopTerminalHook, move |b| {
        b.breaker(
            WF,
            BackoffPolicy {
                initial: forever,
                max_delay: Duration::MAX,
                jitter: 0.0,
                streak_limit: None,
                ..Default::default()
            },
        )
        .retry_policy(
            "retry",
            RetryPolicy {
                initial: forever,
                max_delay: Duration::MAX,
                jitter: 0.0,
                max_attempts: 3,
                multiplier: 2.0,
            },
        )
    })
    .await;
    env.start();
    env.rt.submit(spec("fails", WF)).await.unwrap();
    assert_eq!(
        until_outcome(&env, "fails").await.status,
        TerminalStatus::Failed
    );
    let BreakerStatus::Backoff { until, .. } = health(&env, WF).await.status else {
        panic!("not in backoff")
    };
    let century = 100 * 365 * 24 * 3600 * 1000;
    assert!(ms(until) > T0 + century, "the window wrapped around");
    env.rt
        .submit(RunSpec {
            max_attempts_per_step: None,
            ..spec("retries", "retry")
        })
        .await
        .unwrap();
    env.until_status("retries", |s| {
        s.is_some_and(|s| s.state == RunState::Scheduled)
    })
    .await;
    let at = env
        .rt
        .status("retries")
        .await
        .unwrap()
        .unwrap()
        .scheduled_for;
    assert!(ms(at.unwrap()) > T0 + century, "the retry wrapped around");
    env.stop().await;
}

/// Defect 8 (b): a panicking observer neither keeps `wait` callers waiting
/// nor stops a reset from releasing parked steps.
#[tokio::test]
async fn a_panicking_observer_is_contained() {
    let failing = Arc::new(AtomicBool::new(true));
    let runner = {
        let failing = failing.clone();
        FnRunner::new(move |_s: Step| {
            let failing = failing.clone();
            async move {
                if failing.load(Ordering::SeqCst) {
                    Ok(StepOutcome::Fail {
                        reason: "bad".into(),
                    })
                } else {
                    Ok(StepOutcome::Succeed { result: vec![] })
                }
            }
        })
    };
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.breaker(WF, trips_at_once())
            .on_breaker_change(|e| panic!("observer: {e:?}"))
    })
    .await;
    env.start();
    env.rt.submit(spec("trips", WF)).await.unwrap();
    let waiter = tokio::spawn({
        let rt = env.rt.clone();
        async move { rt.wait("trips").await }
    });
    until("the waiter is woken", || waiter.is_finished()).await;
    assert_eq!(
        waiter.await.unwrap().unwrap().status,
        TerminalStatus::Failed
    );
    env.rt.submit(spec("parked", WF)).await.unwrap();
    env.until_status("parked", |s| s.is_some_and(|s| s.state == RunState::Parked))
        .await;
    failing.store(false, Ordering::SeqCst);
    let reset = tokio::spawn({
        let rt = env.rt.clone();
        async move { rt.reset_workflow(WF).await }
    });
    assert!(reset.await.expect("reset panicked").unwrap());
    assert_eq!(
        until_outcome(&env, "parked").await.status,
        TerminalStatus::Succeeded
    );
    env.stop().await;
}

/// Defect 11: resetting a workflow that has no record writes none.
#[tokio::test]
async fn reset_of_an_unknown_workflow_creates_nothing() {
    let env = Env::new(switchable(Arc::default()), NoopTerminalHook).await;
    assert!(!env.rt.reset_workflow("nobody").await.unwrap());
    assert_eq!(env.rt.workflow_health("nobody").await.unwrap(), None);
    assert!(env.rt.workflows().await.unwrap().is_empty());
}

/// Item 1 (breaker half): an unreadable health record neither stops the
/// pool from starting nor hides the other workflows.
#[tokio::test]
async fn an_unreadable_health_record_is_skipped() {
    let runner = FnRunner::new(|_s: Step| async { Ok(StepOutcome::Succeed { result: vec![] }) });
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.poll_interval(Duration::from_millis(5))
    })
    .await;
    env.queue()
        .kv_put(b"wm/workflow-steps/wf/broken", b"\xc1 not a record")
        .await
        .unwrap();
    env.start();
    for (id, wf) in [("g", "good"), ("b", "broken")] {
        env.rt.submit(spec(id, wf)).await.unwrap();
        assert_eq!(
            until_outcome(&env, id).await.status,
            TerminalStatus::Succeeded
        );
    }
    let names: Vec<String> = env
        .rt
        .workflows()
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.name)
        .collect();
    assert_eq!(names, ["good"]);
    assert!(matches!(
        env.rt.workflow_health("broken").await,
        Err(Error::CorruptRecord { .. })
    ));
    assert!(!env.worker.as_ref().unwrap().is_finished());
    env.stop().await;
}

/// Also-check: a second `run()` of the same runtime, after the first was
/// dropped while a probe ran, starts with fresh breaker caches: the probe
/// is not taken for running forever.
#[tokio::test]
async fn a_second_pool_does_not_inherit_a_dead_probe() {
    let failing = Arc::new(AtomicBool::new(true));
    let block_next = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(AtomicBool::new(false));
    let runner = {
        let (failing, block_next, entered) = (failing.clone(), block_next.clone(), entered.clone());
        FnRunner::new(move |_s: Step| {
            let (failing, block_next, entered) =
                (failing.clone(), block_next.clone(), entered.clone());
            async move {
                if failing.load(Ordering::SeqCst) {
                    return Err(StepError::transient("down"));
                }
                if block_next.swap(false, Ordering::SeqCst) {
                    entered.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let mut env = tripped_with_probe(runner).await;
    failing.store(false, Ordering::SeqCst);
    block_next.store(true, Ordering::SeqCst);
    env.clock.advance(Duration::from_secs(301));
    until("the probe runs", || entered.load(Ordering::SeqCst)).await;
    // The pool goes away mid-probe (as when `run` returns on a store error).
    let worker = env.worker.take().unwrap();
    worker.abort();
    let _ = worker.await;
    // Its claim lapses and the queue re-delivers the probe's job.
    env.clock.advance(Duration::from_secs(600));
    env.queue().reap_now().await.unwrap();
    env.start();
    for i in 0..3 {
        assert_eq!(
            until_outcome(&env, &format!("q{i}")).await.status,
            TerminalStatus::Succeeded
        );
    }
    env.stop().await;
}

/// Defect 3 (c): the step woken to become the probe runs as an ordinary
/// step after a reset; when the breaker trips again, a probe is woken again.
#[tokio::test]
async fn a_probe_candidate_that_ran_after_a_reset_does_not_stop_probing() {
    let failing = Arc::new(AtomicBool::new(true));
    let blocker = support::Gate::default();
    let runner = {
        let failing = failing.clone();
        let blocker = blocker.clone();
        FnRunner::new(move |s: Step| {
            let failing = failing.clone();
            let blocker = blocker.clone();
            async move {
                if s.workflow == "other" {
                    blocker.wait().await;
                } else if failing.load(Ordering::SeqCst) {
                    return Err(StepError::transient("down"));
                }
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        })
    };
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.breaker(
            WF,
            BackoffPolicy {
                initial: Duration::ZERO,
                streak_limit: Some(1),
                probe_after: Some(Duration::from_secs(300)),
                ..Default::default()
            },
        )
        .max_concurrent_steps(1)
        .poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    for i in 0..3 {
        env.rt.submit(spec(&format!("n{i}"), WF)).await.unwrap();
    }
    for i in 0..3 {
        env.until_status(&format!("n{i}"), |s| {
            s.is_some_and(|s| s.state == RunState::Parked)
        })
        .await;
    }
    let BreakerStatus::Tripped { since: first, .. } = health(&env, WF).await.status else {
        panic!("not tripped")
    };
    env.rt.submit(spec("hold", "other")).await.unwrap();
    env.until_status("hold", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    env.clock.advance(Duration::from_secs(301));
    // One parked step is woken as the probe; it waits for the busy slot.
    let mut woken = false;
    for _ in 0..5_000 {
        let stats = env.queue().view().stats("workflow-steps").await.unwrap();
        if stats.pending > 0 {
            woken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(woken, "a parked step is woken as the probe");
    // A reset: the woken step runs as an ordinary step (and still fails),
    // and the breaker trips again.
    assert!(env.rt.reset_workflow(WF).await.unwrap());
    blocker.open();
    for _ in 0..5_000 {
        if let BreakerStatus::Tripped { since, .. } = health(&env, WF).await.status
            && since > first
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // All three are parked on the queue again (not merely waiting).
    let mut parked = false;
    for _ in 0..5_000 {
        let stats = env.queue().view().stats("workflow-steps").await.unwrap();
        if (stats.pending, stats.claimed, stats.scheduled) == (0, 0, 3) {
            parked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(parked, "the steps are parked again");
    failing.store(false, Ordering::SeqCst);
    env.clock.advance(Duration::from_secs(301));
    for i in 0..3 {
        assert_eq!(
            until_outcome(&env, &format!("n{i}")).await.status,
            TerminalStatus::Succeeded
        );
    }
    env.stop().await;
}
