//! Step history (`WorkflowRuntime::history`, `Client::history`): each
//! settlement's entry in order with its attempt number, across a restart;
//! bounded; a fresh one per segment; gone with the outcome at retention. An
//! in-memory store with taquba's `MockClock` (no sleeps decide anything).

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use taquba::KvOrder;
use waymark::*;

const HOUR: Duration = Duration::from_secs(3600);
const WF: &str = "orders";

/// The run's entries as (step, attempt, outcome, signalled, has error).
fn flat(history: &RunHistory) -> Vec<(u32, u32, AttemptOutcome, bool, bool)> {
    history
        .steps
        .iter()
        .flat_map(|s| s.attempts.iter())
        .map(|a| {
            (
                a.step,
                a.attempt,
                a.outcome.clone(),
                a.signalled,
                a.error.is_some(),
            )
        })
        .collect()
}

/// Step 0 fails its first attempt, then continues after an hour; step 1
/// waits an hour for a signal; step 2 succeeds.
fn journey() -> FnRunner {
    FnRunner::new(|s: Step| async move {
        match (s.step_number, s.attempts) {
            (0, 1) => Err(StepError::transient("card declined")),
            (0, _) => Ok(StepOutcome::ContinueAfter {
                payload: vec![],
                delay: HOUR,
            }),
            (1, _) => Ok(StepOutcome::WaitForSignal {
                payload: vec![],
                timeout: HOUR,
            }),
            _ => Ok(StepOutcome::Succeed { result: vec![] }),
        }
    })
}

#[tokio::test]
async fn a_retry_a_park_a_delay_and_a_signal_wait_show_in_order_across_a_restart() {
    let runner = journey();
    let mut env = Env::configured(runner.clone(), NoopTerminalHook, |b| {
        // The first failure trips the breaker: the retry is parked.
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
    env.rt
        .submit(RunSpec {
            run_id: Some("r".into()),
            workflow: Some(WF.into()),
            ..Default::default()
        })
        .await
        .unwrap();
    // The status says parked as soon as the breaker trips; the parking
    // settlement shows in the history.
    for _ in 0..10_000 {
        let history = env.rt.history("r").await.unwrap().unwrap();
        if flat(&history).iter().any(|e| e.2 == AttemptOutcome::Parked) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(env.rt.reset_workflow(WF).await.unwrap());
    env.until_status("r", |s| {
        s.is_some_and(|s| s.state == RunState::Scheduled && s.current_step == 1)
    })
    .await;
    let delayed_at = env.clock_now();
    env.clock.advance(HOUR);
    env.until_status("r", |s| {
        s.is_some_and(|s| s.state == RunState::WaitingForSignal)
    })
    .await;
    env.crash_and_reopen(runner.clone(), NoopTerminalHook).await;
    env.rt.signal("r", b"approved".to_vec()).await.unwrap();
    env.start();
    env.rt.wait("r").await.unwrap();

    let history = env.rt.history("r").await.unwrap().unwrap();
    assert_eq!(history.run_id, "r");
    assert_eq!(history.dropped, 0);
    let entries = flat(&history);
    let kinds: Vec<_> = entries
        .iter()
        .map(|(step, attempt, outcome, signalled, error)| {
            let kind = match outcome {
                AttemptOutcome::Retrying { .. } => "retrying",
                AttemptOutcome::Parked => "parked",
                AttemptOutcome::Delayed { .. } => "delayed",
                AttemptOutcome::WaitingForSignal { .. } => "waiting",
                AttemptOutcome::Ended {
                    status: TerminalStatus::Succeeded,
                } => "succeeded",
                other => panic!("unexpected entry {other:?} in {entries:#?}"),
            };
            (*step, *attempt, kind, *signalled, *error)
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, 1, "retrying", false, true),
            // Parking spends no attempt: the next attempt is still the 2nd.
            (0, 2, "parked", false, false),
            (0, 2, "delayed", false, false),
            (1, 1, "waiting", false, false),
            (2, 1, "succeeded", true, false),
        ]
    );
    let steps: Vec<(u32, usize)> = history
        .steps
        .iter()
        .map(|s| (s.step, s.attempts.len()))
        .collect();
    assert_eq!(steps, vec![(0, 3), (1, 1), (2, 1)]);
    let first = &history.steps[0].attempts[0];
    assert_eq!(first.error.as_deref(), Some("card declined"));
    let delayed = &history.steps[0].attempts[2];
    assert_eq!(
        delayed.outcome,
        AttemptOutcome::Delayed {
            until_ms: delayed.ended_ms + 3_600_000
        }
    );
    assert!(delayed.ended_ms <= delayed_at);
    // Step 1 ran after the delay; the times follow the queue clock.
    let waiting = &history.steps[1].attempts[0];
    assert!(waiting.started_ms >= delayed.ended_ms + 3_600_000);
    assert!(waiting.started_ms <= waiting.ended_ms);
    // Serializable for the JSON API.
    let json = serde_json::to_value(&history).unwrap();
    assert_eq!(
        json["steps"][0]["attempts"][0]["outcome"]["kind"],
        "retrying"
    );
    env.stop().await;
}

#[tokio::test]
async fn the_history_keeps_the_newest_entries_and_counts_the_dropped() {
    let runner = FnRunner::new(|s: Step| async move {
        Ok(if s.step_number < 5 {
            StepOutcome::Continue { payload: vec![] }
        } else {
            StepOutcome::Succeed { result: vec![] }
        })
    });
    let mut env = Env::configured(runner, NoopTerminalHook, |b| b.step_history(3)).await;
    env.start();
    env.submit("long", b"").await;
    env.rt.wait("long").await.unwrap();
    let history = env.rt.history("long").await.unwrap().unwrap();
    assert_eq!(history.dropped, 3);
    let steps: Vec<u32> = history.steps.iter().map(|s| s.step).collect();
    assert_eq!(steps, vec![3, 4, 5]);
    assert_eq!(
        hist_keys(&env, "long").await,
        3,
        "dropped entries are deleted"
    );
    env.stop().await;
}

/// A run that ends while its step waits (a cancel of a delayed step, a
/// deadline during a wait for a signal) ends its history with that ending,
/// though no settlement ran for it.
#[tokio::test]
async fn a_cancel_or_a_deadline_of_a_waiting_step_ends_the_history() {
    let runner = FnRunner::new(|s: Step| async move {
        Ok(match (s.run_id.as_str(), s.step_number) {
            ("late", _) => StepOutcome::WaitForSignal {
                payload: vec![],
                timeout: HOUR,
            },
            _ => StepOutcome::ContinueAfter {
                payload: vec![],
                delay: HOUR,
            },
        })
    });
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    env.submit("stopped", b"").await;
    env.rt
        .submit(RunSpec {
            run_id: Some("late".into()),
            deadline: Some(Deadline::After(Duration::from_secs(60))),
            ..Default::default()
        })
        .await
        .unwrap();
    for id in ["stopped", "late"] {
        env.until_status(id, |s| s.is_some_and(|s| s.current_step == 1))
            .await;
    }
    assert!(env.rt.cancel("stopped").await.unwrap());
    env.clock.advance(Duration::from_secs(60));
    assert_eq!(
        env.rt.wait("late").await.unwrap().status,
        TerminalStatus::TimedOut
    );
    for (id, first, status) in [
        (
            "stopped",
            AttemptOutcome::Delayed { until_ms: 0 },
            TerminalStatus::Cancelled,
        ),
        (
            "late",
            AttemptOutcome::WaitingForSignal { until_ms: 0 },
            TerminalStatus::TimedOut,
        ),
    ] {
        let history = env.rt.history(id).await.unwrap().unwrap();
        let entries = flat(&history);
        assert_eq!(entries.len(), 2, "{id}: {entries:?}");
        assert_eq!(
            std::mem::discriminant(&entries[0].2),
            std::mem::discriminant(&first),
            "{id}: {entries:?}"
        );
        // Step 1 never ran (attempt 0); the run's ending is its entry.
        assert_eq!(entries[1].0, 1);
        assert_eq!(entries[1].1, 0);
        assert_eq!(entries[1].2, AttemptOutcome::Ended { status }, "{id}");
        assert_eq!(
            entries[1].4,
            status == TerminalStatus::TimedOut,
            "{id}: the deadline's reason"
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn no_history_is_kept_when_turned_off() {
    let runner =
        FnRunner::new(|_s: Step| async move { Ok(StepOutcome::Succeed { result: vec![] }) });
    let mut env = Env::configured(runner, NoopTerminalHook, |b| b.step_history(0)).await;
    env.start();
    env.submit("quiet", b"").await;
    env.rt.wait("quiet").await.unwrap();
    let history = env.rt.history("quiet").await.unwrap().unwrap();
    assert!(history.steps.is_empty());
    assert_eq!(hist_keys(&env, "quiet").await, 0);
    env.stop().await;
}

#[tokio::test]
async fn a_new_segment_starts_a_fresh_history() {
    // Segment 0 settles four steps; segment 1 one: none of segment 0's
    // entries may remain.
    let runner = FnRunner::new(|s: Step| async move {
        let segment = s.payload.first().copied().unwrap_or(0);
        Ok(match (segment, s.step_number) {
            (0, 0..=2) => StepOutcome::Continue { payload: s.payload },
            (0, _) => StepOutcome::ContinueAsNew { input: vec![1] },
            _ => StepOutcome::Succeed { result: vec![] },
        })
    });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.submit("seg", &[0]).await;
    env.rt.wait("seg").await.unwrap();
    let history = env.rt.history("seg").await.unwrap().unwrap();
    let entries: Vec<(u32, AttemptOutcome)> = flat(&history)
        .into_iter()
        .map(|(step, _, outcome, _, _)| (step, outcome))
        .collect();
    assert_eq!(
        entries,
        vec![
            (3, AttemptOutcome::ContinuedAsNew { segment: 1 }),
            (
                0,
                AttemptOutcome::Ended {
                    status: TerminalStatus::Succeeded
                }
            ),
        ]
    );
    assert_eq!(history.dropped, 0);
    assert_eq!(hist_keys(&env, "seg").await, 2);
    env.stop().await;
}

#[tokio::test]
async fn the_history_goes_with_the_outcome_at_retention() {
    let runner =
        FnRunner::new(|_s: Step| async move { Ok(StepOutcome::Succeed { result: vec![] }) });
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.terminal_retention(Duration::from_secs(60))
            .poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    env.submit("old", b"").await;
    env.rt.wait("old").await.unwrap();
    assert_eq!(hist_keys(&env, "old").await, 1);
    assert!(env.rt.history("old").await.unwrap().is_some());
    env.clock.advance(Duration::from_secs(61));
    for _ in 0..10_000 {
        if env.rt.outcome("old").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(env.rt.outcome("old").await.unwrap(), None);
    assert_eq!(hist_keys(&env, "old").await, 0);
    assert_eq!(env.rt.history("old").await.unwrap(), None);
    env.stop().await;
}

#[tokio::test]
async fn unknown_and_malformed_runs() {
    let runner =
        FnRunner::new(|_s: Step| async move { Ok(StepOutcome::Succeed { result: vec![] }) });
    let env = Env::new(runner, NoopTerminalHook).await;
    assert_eq!(env.rt.history("nobody").await.unwrap(), None);
    assert!(matches!(
        env.rt.history("bad id").await,
        Err(Error::InvalidRunId { .. })
    ));
}

#[tokio::test]
async fn a_client_reads_the_history() {
    let location = StoreLocation::new(
        Arc::new(taquba::object_store::memory::InMemory::new()),
        "wm",
    );
    let options = StoreOptions::default().flush_interval(Duration::from_millis(2));
    let queue = open_worker_store(&location, options).await.unwrap();
    let runner = FnRunner::new(|s: Step| async move {
        Ok(if s.step_number == 0 {
            StepOutcome::Continue { payload: vec![] }
        } else {
            StepOutcome::Succeed { result: vec![] }
        })
    });
    let rt = builder(queue.clone(), runner, NoopTerminalHook)
        .build()
        .unwrap();
    let worker = {
        let rt = rt.clone();
        tokio::spawn(async move { rt.run(std::future::pending()).await })
    };
    rt.submit(RunSpec {
        run_id: Some("c".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    rt.wait("c").await.unwrap();
    let client = Client::open(
        &location,
        ClientOptions::default().refresh_interval(Duration::from_millis(10)),
    )
    .await
    .unwrap();
    let mut seen = None;
    for _ in 0..10_000 {
        seen = client.history("c").await.unwrap();
        if seen.as_ref().is_some_and(|h| h.steps.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seen = seen.unwrap();
    assert_eq!(seen.steps.len(), 2, "{seen:?}");
    assert_eq!(Some(seen), rt.history("c").await.unwrap());
    assert_eq!(client.history("nobody").await.unwrap(), None);
    worker.abort();
}

/// How many history keys the run has in the store.
async fn hist_keys(env: &Env<NoopTerminalHook>, run: &str) -> usize {
    let prefix = format!("wm/workflow-steps/data/{run}/hist/");
    env.queue()
        .view()
        .kv_scan(prefix.as_bytes(), .., KvOrder::Ascending, 1000)
        .await
        .unwrap()
        .entries
        .len()
}

#[tokio::test]
async fn a_rerun_continues_the_history() {
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let runner = FnRunner::new({
        let fail = fail.clone();
        move |s: Step| {
            let fail = fail.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                Ok(match s.step_number {
                    0 => StepOutcome::Continue { payload: vec![] },
                    _ if fail => StepOutcome::Fail {
                        reason: "out of stock".into(),
                    },
                    _ => StepOutcome::Succeed { result: vec![] },
                })
            }
        }
    });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.submit("again", b"").await;
    env.rt.wait("again").await.unwrap();
    fail.store(false, std::sync::atomic::Ordering::SeqCst);
    env.rt.rerun("again", 1).await.unwrap();
    let outcome = env.rt.wait("again").await.unwrap();
    assert_eq!(outcome.status, TerminalStatus::Succeeded);
    let history = env.rt.history("again").await.unwrap().unwrap();
    let entries: Vec<(u32, AttemptOutcome, bool)> = flat(&history)
        .into_iter()
        .map(|(step, _, outcome, _, error)| (step, outcome, error))
        .collect();
    let ended = |status| AttemptOutcome::Ended { status };
    assert_eq!(
        entries,
        vec![
            (0, AttemptOutcome::Continued, false),
            (1, ended(TerminalStatus::Failed), true),
            (1, ended(TerminalStatus::Succeeded), false),
        ]
    );
    env.stop().await;
}
