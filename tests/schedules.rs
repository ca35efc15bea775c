//! Durable schedules, driven by taquba's `MockClock`: time only moves when a
//! test moves it, and a due tick is promoted at once.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::*;
use waymark::*;

const WF: &str = "reports";

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A runner that fails while `failing` is set, and holds runs while `hold`
/// is closed (when one is given).
fn runner(failing: Arc<AtomicBool>, hold: Option<Gate>) -> FnRunner {
    FnRunner::new(move |_s: Step| {
        let failing = failing.clone();
        let hold = hold.clone();
        async move {
            if let Some(hold) = hold {
                hold.wait().await;
            }
            if failing.load(Ordering::SeqCst) {
                Err(StepError::permanent("the report service is down"))
            } else {
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        }
    })
}

fn ok_runner() -> FnRunner {
    runner(Arc::new(AtomicBool::new(false)), None)
}

/// The schedules a test's runtimes are built with; a test may change them
/// between restarts.
type Defs = Arc<Mutex<Vec<Schedule>>>;

async fn env_with(
    runner: FnRunner,
    defs: Defs,
    breaker: Option<BackoffPolicy>,
) -> Env<RecordingHook> {
    let mut env = Env::configured(runner, RecordingHook::default(), move |mut b| {
        for s in defs.lock().unwrap().iter() {
            b = b.schedule(s.clone());
        }
        if let Some(policy) = &breaker {
            b = b.breaker(WF, policy.clone());
        }
        b
    })
    .await;
    env.start();
    env
}

async fn env_of(schedules: Vec<Schedule>) -> Env<RecordingHook> {
    env_with(ok_runner(), Arc::new(Mutex::new(schedules)), None).await
}

/// Move the clock and let due ticks fall due at once.
async fn advance(env: &Env<RecordingHook>, by: Duration) {
    env.clock.advance(by);
    env.queue().promote_scheduled_now().await.unwrap();
}

async fn info(env: &Env<RecordingHook>, id: &str) -> ScheduleInfo {
    env.rt.schedule(id).await.unwrap().unwrap()
}

/// Wait (bounded) until the schedule's state satisfies `pred`.
async fn until(env: &Env<RecordingHook>, id: &str, pred: impl Fn(&ScheduleInfo) -> bool) {
    for _ in 0..5_000 {
        if let Some(i) = env.rt.schedule(id).await.unwrap()
            && pred(&i)
        {
            return;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!(
        "schedule {id} never matched: {:?}",
        env.rt.schedule(id).await.unwrap()
    );
}

/// Let the pool handle whatever is due, then check nothing more happens.
async fn settle(env: &Env<RecordingHook>) {
    for _ in 0..50 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    env.queue().kv_put(b"test/barrier", b"").await.unwrap();
}

fn ended(i: &ScheduleInfo, status: TerminalStatus) -> bool {
    i.last_outcome == Some(LastRun::Ended(status))
}

#[tokio::test]
async fn every_fires_at_its_instants() {
    let env = env_of(vec![
        Schedule::every_seconds("a-every", 10).input(b"in".to_vec()),
        Schedule::every_minutes("b-minutes", 2),
        Schedule::every_hours("c-hours", 1),
        Schedule::every("d-millis", Duration::from_millis(1500)),
    ])
    .await;
    until(&env, "a-every", |i| i.next_fire.is_some()).await;
    let all = env.rt.schedules().await.unwrap();
    let ids: Vec<_> = all.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["a-every", "b-minutes", "c-hours", "d-millis"]);
    let next: Vec<_> = all.iter().map(|i| i.next_fire.unwrap()).collect();
    assert_eq!(
        next,
        [
            at(T0 + 10_000),
            at(T0 + 120_000),
            at(T0 + 3_600_000),
            at(T0 + 1_500)
        ]
    );
    assert!(
        all.iter()
            .all(|i| i.run_count == 0 && i.active && !i.paused)
    );

    advance(&env, Duration::from_secs(10)).await;
    until(&env, "a-every", |i| {
        i.run_count == 1 && ended(i, TerminalStatus::Succeeded)
    })
    .await;
    let i = info(&env, "a-every").await;
    let first = format!("a-every:{}", T0 + 10_000);
    assert_eq!(i.last_run_id.as_deref(), Some(first.as_str()));
    assert_eq!(i.last_fire, Some(at(T0 + 10_000)));
    assert_eq!(i.next_fire, Some(at(T0 + 20_000)));
    assert_eq!(
        i.kind,
        ScheduleKind::Every {
            interval: Duration::from_secs(10)
        }
    );
    // Halfway to the next: nothing.
    advance(&env, Duration::from_secs(5)).await;
    settle(&env).await;
    assert_eq!(info(&env, "a-every").await.run_count, 1);
    advance(&env, Duration::from_secs(5)).await;
    until(&env, "a-every", |i| i.run_count == 2).await;
    assert_eq!(
        info(&env, "a-every").await.last_run_id,
        Some(format!("a-every:{}", T0 + 20_000))
    );
    // The run got the schedule's input.
    let out = env.rt.outcome(&first).await.unwrap().unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
}

#[tokio::test]
async fn cron_fires_at_its_instants_in_utc_and_in_a_zone() {
    let env = env_of(vec![
        Schedule::cron("quarter", "*/15 * * * * *").input_fn(|t| {
            format!("{}", t.duration_since(UNIX_EPOCH).unwrap().as_millis()).into_bytes()
        }),
        // T0 is 08:00 UTC on a January day: 09:30 in Paris is 08:30 UTC.
        Schedule::cron("paris", "0 30 9 * * *").time_zone("Europe/Paris"),
    ])
    .await;
    until(&env, "quarter", |i| i.next_fire.is_some()).await;
    assert_eq!(info(&env, "quarter").await.next_fire, Some(at(T0 + 15_000)));
    assert_eq!(
        info(&env, "paris").await.next_fire,
        Some(at(T0 + 1_800_000))
    );
    advance(&env, Duration::from_secs(15)).await;
    until(&env, "quarter", |i| {
        i.run_count == 1 && ended(i, TerminalStatus::Succeeded)
    })
    .await;
    assert_eq!(info(&env, "quarter").await.next_fire, Some(at(T0 + 30_000)));
    advance(&env, Duration::from_secs(30 * 60 - 15)).await;
    until(&env, "paris", |i| i.run_count == 1).await;
    assert_eq!(
        info(&env, "paris").await.last_run_id,
        Some(format!("paris:{}", T0 + 1_800_000))
    );
    assert_eq!(
        info(&env, "paris").await.next_fire,
        Some(at(T0 + 1_800_000 + 24 * 3_600_000))
    );
}

#[tokio::test]
async fn manual_never_fires_by_itself() {
    let env = env_of(vec![Schedule::manual("by-hand").workflow(WF)]).await;
    until(&env, "by-hand", |_| true).await;
    advance(&env, Duration::from_secs(48 * 3600)).await;
    settle(&env).await;
    let i = info(&env, "by-hand").await;
    assert_eq!((i.run_count, i.next_fire), (0, None));
    assert_eq!(i.kind, ScheduleKind::Manual);
    let run = env.rt.trigger("by-hand").await.unwrap();
    assert_eq!(run, format!("by-hand:t{}", env.clock_now()));
    until(&env, "by-hand", |i| {
        i.run_count == 1 && ended(i, TerminalStatus::Succeeded)
    })
    .await;
    assert_eq!(info(&env, "by-hand").await.workflow, WF);
}

#[tokio::test]
async fn bad_definitions_fail_build_naming_the_schedule() {
    let queue = open_queue(
        Arc::new(taquba::object_store::memory::InMemory::new()),
        &taquba::MockClock::new(T0),
    )
    .await;
    let build = |schedules: Vec<Schedule>| {
        let mut b = builder(queue.clone(), ok_runner(), NoopTerminalHook);
        for s in schedules {
            b = b.schedule(s);
        }
        match b.build() {
            Ok(_) => panic!("built"),
            Err(e) => e.to_string(),
        }
    };
    let e = build(vec![
        Schedule::every_seconds("twice", 1),
        Schedule::manual("twice"),
    ]);
    assert!(e.contains("`twice`") && e.contains("defined twice"), "{e}");
    let e = build(vec![Schedule::every("zero", Duration::ZERO)]);
    assert!(
        e.contains("`zero`") && e.contains("interval is zero"),
        "{e}"
    );
    let e = build(vec![Schedule::cron("five-fields", "*/5 * * * *")]);
    assert!(e.contains("`five-fields`") && e.contains("invalid"), "{e}");
    let e = build(vec![Schedule::cron("bad", "0 61 * * * *")]);
    assert!(e.contains("`bad`") && e.contains("cron expression"), "{e}");
    let e = build(vec![
        Schedule::cron("zone", "0 0 * * * *").time_zone("Mars/Base"),
    ]);
    assert!(e.contains("`zone`") && e.contains("Mars/Base"), "{e}");
    let e = build(vec![Schedule::every_seconds("tz", 1).time_zone("UTC")]);
    assert!(e.contains("`tz`") && e.contains("only to a cron"), "{e}");
    let e = build(vec![Schedule::manual("bad id")]);
    assert!(e.contains("bad id"), "{e}");
    // A good set builds.
    let mut b = builder(queue.clone(), ok_runner(), NoopTerminalHook);
    b = b.schedule(Schedule::cron("ok", "0 0 12 * * MON-FRI").time_zone("America/New_York"));
    assert!(b.build().is_ok());
}

#[tokio::test]
async fn each_fire_time_fires_once_across_crashes() {
    let defs: Defs = Arc::new(Mutex::new(vec![Schedule::every_seconds("beat", 10)]));
    let mut env = env_with(ok_runner(), defs, None).await;
    until(&env, "beat", |i| i.next_fire.is_some()).await;
    advance(&env, Duration::from_secs(10)).await;
    // Wait for the run to end too: a run still live at the next fire would
    // make that fire an overlap (skipped), which is not what this tests.
    until(&env, "beat", |i| {
        i.run_count == 1 && ended(i, TerminalStatus::Succeeded)
    })
    .await;

    // A crash between two fires: the restart neither forgets nor repeats.
    env.crash_and_reopen(ok_runner(), RecordingHook::default())
        .await;
    env.start();
    settle(&env).await;
    assert_eq!(info(&env, "beat").await.run_count, 1);
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "beat", |i| {
        i.run_count == 2
            && i.last_run_id == Some(format!("beat:{}", T0 + 20_000))
            && ended(i, TerminalStatus::Succeeded)
    })
    .await;

    // A crash while a tick is claimed but not committed: stop the pool,
    // claim the due tick as a dying process would, crash, reopen.
    env.stop().await;
    advance(&env, Duration::from_secs(10)).await;
    let claim = env
        .queue()
        .claim("workflow-steps-sched", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the tick is due");
    assert_eq!(claim.headers["workflow.schedule"], "beat");
    // The open requeues the dead process's claim; its tick is delivered
    // again and fires the same time.
    env.crash_and_reopen(ok_runner(), RecordingHook::default())
        .await;
    env.start();
    until(&env, "beat", |i| i.run_count == 3).await;
    settle(&env).await;
    let i = info(&env, "beat").await;
    assert_eq!(i.run_count, 3);
    assert_eq!(i.last_run_id, Some(format!("beat:{}", T0 + 30_000)));
    for n in 1..=3u64 {
        let run = format!("beat:{}", T0 + n * 10_000);
        assert!(
            env.rt.outcome(&run).await.unwrap().is_some()
                || env.rt.status(&run).await.unwrap().is_some(),
            "{run}"
        );
    }
    assert_eq!((i.missed, i.next_fire), (0, Some(at(T0 + 40_000))));
}

/// Stop the pool, advance an hour and a half-minute, reopen, and let the
/// overdue tick run under `downtime`.
async fn after_an_hour_down(downtime: Downtime) -> ScheduleInfo {
    let defs: Defs = Arc::new(Mutex::new(vec![
        Schedule::every_minutes("hourly-ish", 1)
            .downtime(downtime)
            .misfire_grace(Duration::from_secs(1)),
    ]));
    let mut env = env_with(ok_runner(), defs, None).await;
    until(&env, "hourly-ish", |i| i.next_fire.is_some()).await;
    env.stop().await;
    env.clock.advance(Duration::from_secs(3600 + 30));
    env.crash_and_reopen(ok_runner(), RecordingHook::default())
        .await;
    env.queue().promote_scheduled_now().await.unwrap();
    env.start();
    until(&env, "hourly-ish", |i| {
        i.next_fire == Some(at(T0 + 3_660_000))
    })
    .await;
    settle(&env).await;
    info(&env, "hourly-ish").await
}

#[tokio::test]
async fn downtime_skip_resumes_at_the_next_time() {
    let i = after_an_hour_down(Downtime::Skip).await;
    assert_eq!((i.run_count, i.missed), (0, 60));
}

#[tokio::test]
async fn downtime_fire_once_catches_up_once() {
    let i = after_an_hour_down(Downtime::FireOnce).await;
    assert_eq!((i.run_count, i.missed), (1, 59));
    assert_eq!(
        i.last_run_id,
        Some(format!("hourly-ish:{}", T0 + 3_600_000))
    );
}

#[tokio::test]
async fn downtime_fire_all_catches_up_to_max() {
    let i = after_an_hour_down(Downtime::FireAll { max: 5 }).await;
    assert_eq!((i.run_count, i.missed), (5, 55));
    assert_eq!(i.last_fire, Some(at(T0 + 3_600_000)));
}

/// Fire once with the run held, fire again: what does `overlap` do?
async fn overlapping(overlap: Overlap) -> (Env<RecordingHook>, Gate) {
    let hold = Gate::default();
    let defs: Defs = Arc::new(Mutex::new(vec![
        Schedule::every_seconds("slow", 10).overlap(overlap),
    ]));
    let env = env_with(
        runner(Arc::new(AtomicBool::new(false)), Some(hold.clone())),
        defs,
        None,
    )
    .await;
    until(&env, "slow", |i| i.next_fire.is_some()).await;
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "slow", |i| {
        i.run_count == 1 && i.last_outcome == Some(LastRun::Live)
    })
    .await;
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "slow", |i| i.next_fire == Some(at(T0 + 30_000))).await;
    (env, hold)
}

#[tokio::test]
async fn overlap_skip_skips_and_counts() {
    let (env, hold) = overlapping(Overlap::Skip).await;
    let i = info(&env, "slow").await;
    assert_eq!((i.run_count, i.skipped_overlap), (1, 1));
    hold.open();
    until(&env, "slow", |i| ended(i, TerminalStatus::Succeeded)).await;
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "slow", |i| i.run_count == 2).await;
}

#[tokio::test]
async fn overlap_allow_fires_anyway() {
    let (env, hold) = overlapping(Overlap::Allow).await;
    let i = info(&env, "slow").await;
    assert_eq!((i.run_count, i.skipped_overlap), (2, 0));
    hold.open();
}

#[tokio::test]
async fn overlap_buffer_one_fires_after_the_live_run() {
    let (env, hold) = overlapping(Overlap::BufferOne).await;
    let i = info(&env, "slow").await;
    assert_eq!((i.run_count, i.skipped_overlap, i.buffered), (1, 0, true));
    // A third due time while one is buffered is skipped.
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "slow", |i| i.skipped_overlap == 1).await;
    hold.open();
    until(&env, "slow", |i| ended(i, TerminalStatus::Succeeded)).await;
    // The buffered fire is checked again a tenth of its wait later (it
    // waited 10 s at the last check).
    advance(&env, Duration::from_millis(1_100)).await;
    until(&env, "slow", |i| i.run_count == 2 && !i.buffered).await;
    assert_eq!(
        info(&env, "slow").await.last_run_id,
        Some(format!("slow:{}", T0 + 20_000))
    );
}

fn backoff(streak_limit: Option<u32>) -> BackoffPolicy {
    BackoffPolicy {
        initial: Duration::from_secs(5),
        multiplier: 2.0,
        max_delay: Duration::from_secs(60),
        jitter: 0.0,
        streak_limit,
        probe_after: None,
    }
}

/// Fires of a failing schedule are suppressed inside the backoff window,
/// which widens with the streak; a success resets it.
async fn backoff_widens(schedule: Schedule) {
    let failing = Arc::new(AtomicBool::new(true));
    let defs: Defs = Arc::new(Mutex::new(vec![schedule]));
    let env = env_with(runner(failing.clone(), None), defs, Some(backoff(None))).await;
    until(&env, "flaky", |i| i.next_fire.is_some()).await;
    // Fire 1 at +1 s fails: backoff until +6 s.
    advance(&env, Duration::from_secs(1)).await;
    until(&env, "flaky", |i| ended(i, TerminalStatus::Failed)).await;
    let mut fired_at = Vec::new();
    for s in 2..=38u64 {
        if s == 21 {
            // Fire 3 at +16 s failed: backoff until +36 s. The service is
            // back: the fire at +36 succeeds.
            failing.store(false, Ordering::SeqCst);
        }
        advance(&env, Duration::from_secs(1)).await;
        until(&env, "flaky", |i| {
            i.next_fire == Some(at(T0 + (s + 1) * 1000))
        })
        .await;
        let i = info(&env, "flaky").await;
        if i.last_fire == Some(at(T0 + s * 1000)) {
            fired_at.push(s);
            until(&env, "flaky", |i| {
                matches!(i.last_outcome, Some(LastRun::Ended(_)))
            })
            .await;
        }
    }
    // Windows of 5, 10 and 20 s after fires at +1, +6 and +16 s; the
    // success at +36 s resets the streak: every second again.
    assert_eq!(fired_at, [6, 16, 36, 37, 38]);
    let i = info(&env, "flaky").await;
    assert_eq!(i.suppressed_backoff, 4 + 9 + 19);
    assert!(ended(&i, TerminalStatus::Succeeded));
    assert_eq!(
        env.rt
            .workflow_health(WF)
            .await
            .unwrap()
            .unwrap()
            .failure_streak,
        0
    );
}

#[tokio::test]
async fn backoff_widens_the_interval_and_success_resets_it() {
    backoff_widens(Schedule::every_seconds("flaky", 1).workflow(WF)).await;
}

#[tokio::test]
async fn cron_ticks_are_suppressed_inside_a_backoff_window() {
    backoff_widens(Schedule::cron("flaky", "* * * * * *").workflow(WF)).await;
}

#[tokio::test]
async fn without_a_policy_a_failing_schedule_keeps_firing() {
    let failing = Arc::new(AtomicBool::new(true));
    let defs: Defs = Arc::new(Mutex::new(vec![
        Schedule::every_seconds("flaky", 1).workflow(WF),
    ]));
    let env = env_with(runner(failing, None), defs, None).await;
    until(&env, "flaky", |i| i.next_fire.is_some()).await;
    for n in 1..=3 {
        advance(&env, Duration::from_secs(1)).await;
        until(&env, "flaky", |i| {
            i.run_count == n && ended(i, TerminalStatus::Failed)
        })
        .await;
    }
    assert_eq!(info(&env, "flaky").await.suppressed_backoff, 0);
}

#[tokio::test]
async fn a_trip_stops_firing_and_a_reset_resumes_it() {
    let failing = Arc::new(AtomicBool::new(true));
    let defs: Defs = Arc::new(Mutex::new(vec![
        Schedule::every_seconds("flaky", 1).workflow(WF),
    ]));
    let env = env_with(runner(failing.clone(), None), defs, Some(backoff(Some(1)))).await;
    until(&env, "flaky", |i| i.next_fire.is_some()).await;
    for round in 1..=2u64 {
        // The fire fails and trips the workflow.
        advance(&env, Duration::from_secs(1)).await;
        until(&env, "flaky", |i| {
            i.run_count == round && ended(i, TerminalStatus::Failed)
        })
        .await;
        for k in 1..=3u64 {
            advance(&env, Duration::from_secs(1)).await;
            until(&env, "flaky", |i| {
                i.suppressed_tripped == (round - 1) * 3 + k
            })
            .await;
        }
        assert!(matches!(
            env.rt.trigger("flaky").await,
            Err(Error::WorkflowTripped { .. })
        ));
        assert_eq!(info(&env, "flaky").await.run_count, round);
        assert!(env.rt.reset_workflow(WF).await.unwrap());
    }
    // After the second reset, a success keeps it firing.
    failing.store(false, Ordering::SeqCst);
    advance(&env, Duration::from_secs(1)).await;
    until(&env, "flaky", |i| {
        i.run_count == 3 && ended(i, TerminalStatus::Succeeded)
    })
    .await;
}

#[tokio::test]
async fn trigger_errors_and_backoff_override() {
    let failing = Arc::new(AtomicBool::new(true));
    let hold = Gate::default();
    let defs: Defs = Arc::new(Mutex::new(vec![
        Schedule::manual("flaky")
            .workflow(WF)
            .overlap(Overlap::Allow),
        Schedule::manual("held"),
    ]));
    let mut env = env_with(
        runner(failing.clone(), None),
        defs.clone(),
        Some(backoff(None)),
    )
    .await;
    assert!(
        matches!(env.rt.trigger("nope").await, Err(Error::ScheduleNotFound(id)) if id == "nope")
    );
    // A failure puts the workflow in backoff; a trigger overrides it.
    env.rt.trigger("flaky").await.unwrap();
    until(&env, "flaky", |i| ended(i, TerminalStatus::Failed)).await;
    assert!(matches!(
        env.rt.workflow_health(WF).await.unwrap().unwrap().status,
        BreakerStatus::Backoff { .. }
    ));
    advance(&env, Duration::from_millis(1)).await;
    let second = env.rt.trigger("flaky").await.unwrap();
    assert_eq!(info(&env, "flaky").await.last_run_id, Some(second.clone()));
    assert_eq!(info(&env, "flaky").await.run_count, 2);
    // A trigger in the same millisecond names a run of its own, a
    // millisecond after the last fire.
    let third = env.rt.trigger("flaky").await.unwrap();
    assert_eq!(third, format!("flaky:t{}", env.clock_now() + 1));
    assert_eq!(info(&env, "flaky").await.run_count, 3);
    // A run submitted by hand under the next trigger's id: that trigger
    // fires nothing and says so, rather than answer with that run.
    let taken = format!("flaky:t{}", env.clock_now() + 2);
    env.rt
        .submit(RunSpec {
            run_id: Some(taken.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(matches!(
        env.rt.trigger("flaky").await,
        Err(Error::TriggerRunIdTaken { run_id, .. }) if run_id == taken
    ));
    assert_eq!(info(&env, "flaky").await.run_count, 3);

    // Overlap under Skip while a run is live.
    env.crash_and_reopen(
        runner(Arc::new(AtomicBool::new(false)), Some(hold.clone())),
        RecordingHook::default(),
    )
    .await;
    env.start();
    let live = env.rt.trigger("held").await.unwrap();
    until(&env, "held", |i| i.last_outcome == Some(LastRun::Live)).await;
    assert!(matches!(
        env.rt.trigger("held").await,
        Err(Error::ScheduleOverlap { run_id, .. }) if run_id == live
    ));
    hold.open();
    until(&env, "held", |i| ended(i, TerminalStatus::Succeeded)).await;
    advance(&env, Duration::from_millis(1)).await;
    env.rt.trigger("held").await.unwrap();
    until(&env, "held", |i| {
        ended(i, TerminalStatus::Succeeded) && i.run_count == 2
    })
    .await;

    // Shutting down.
    env.stop().await;
    assert!(matches!(
        env.rt.trigger("held").await,
        Err(Error::ShuttingDown)
    ));
}

#[tokio::test]
async fn pause_and_resume_survive_a_restart() {
    let defs: Defs = Arc::new(Mutex::new(vec![Schedule::every_seconds("p", 10)]));
    let mut env = env_with(ok_runner(), defs, None).await;
    until(&env, "p", |i| i.next_fire.is_some()).await;
    assert!(env.rt.pause_schedule("p").await.unwrap());
    assert!(!env.rt.pause_schedule("p").await.unwrap());
    env.crash_and_reopen(ok_runner(), RecordingHook::default())
        .await;
    env.start();
    settle(&env).await;
    for _ in 0..3 {
        advance(&env, Duration::from_secs(10)).await;
    }
    settle(&env).await;
    let i = info(&env, "p").await;
    assert!(i.paused);
    assert_eq!((i.run_count, i.next_fire), (0, None));
    assert!(env.rt.resume_schedule("p").await.unwrap());
    assert_eq!(info(&env, "p").await.next_fire, Some(at(T0 + 40_000)));
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "p", |i| i.run_count == 1).await;
    assert_eq!(info(&env, "p").await.missed, 0);
}

#[tokio::test]
async fn an_unknown_schedule_is_none() {
    let env = env_of(vec![Schedule::manual("known")]).await;
    until(&env, "known", |_| true).await;
    assert!(env.rt.schedule("unknown").await.unwrap().is_none());
    assert!(matches!(
        env.rt.pause_schedule("unknown").await,
        Err(Error::ScheduleNotFound(_))
    ));
}

#[tokio::test]
async fn a_changed_definition_applies_at_its_next_fire_and_a_removed_one_stops() {
    let defs: Defs = Arc::new(Mutex::new(vec![
        Schedule::every_seconds("evolving", 10),
        Schedule::every_seconds("doomed", 10),
    ]));
    let mut env = env_with(ok_runner(), defs.clone(), None).await;
    until(&env, "doomed", |i| i.next_fire.is_some()).await;
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "doomed", |i| i.run_count == 1).await;
    // The run must end before the next fire, or that fire is an overlap.
    until(&env, "evolving", |i| {
        i.run_count == 1 && ended(i, TerminalStatus::Succeeded)
    })
    .await;

    // A new deployment: `evolving` every 30 s in another workflow,
    // `doomed` gone.
    *defs.lock().unwrap() = vec![Schedule::every_seconds("evolving", 30).workflow(WF)];
    env.crash_and_reopen(ok_runner(), RecordingHook::default())
        .await;
    env.start();
    until(&env, "doomed", |i| !i.active).await;
    let i = info(&env, "evolving").await;
    assert_eq!(
        i.kind,
        ScheduleKind::Every {
            interval: Duration::from_secs(30)
        }
    );
    assert_eq!(i.workflow, WF);
    // The armed time (+20 s) fires under the new definition; then +30 s.
    assert_eq!(i.next_fire, Some(at(T0 + 20_000)));
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "evolving", |i| i.run_count == 2).await;
    let run = format!("evolving:{}", T0 + 20_000);
    until(&env, "evolving", |i| ended(i, TerminalStatus::Succeeded)).await;
    assert_eq!(env.rt.outcome(&run).await.unwrap().unwrap().workflow, WF);
    assert_eq!(
        info(&env, "evolving").await.next_fire,
        Some(at(T0 + 30_000))
    );

    // The removed one keeps its history and fires no more.
    advance(&env, Duration::from_secs(60)).await;
    settle(&env).await;
    let d = info(&env, "doomed").await;
    assert_eq!((d.active, d.run_count, d.next_fire), (false, 1, None));
    let ids: Vec<_> = env
        .rt
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids, ["doomed", "evolving"]);
}

#[tokio::test]
async fn a_panicking_input_function_skips_the_fire_and_says_why() {
    let env = env_of(vec![
        Schedule::every_seconds("boom", 1).input_fn(|_| panic!("no input today")),
    ])
    .await;
    until(&env, "boom", |i| i.next_fire.is_some()).await;
    advance(&env, Duration::from_secs(1)).await;
    until(&env, "boom", |i| i.next_fire == Some(at(T0 + 2_000))).await;
    let i = info(&env, "boom").await;
    assert_eq!(i.run_count, 0);
    assert!(i.last_error.unwrap().contains("panicked"));
    assert!(matches!(
        env.rt.trigger("boom").await,
        Err(Error::InvalidConfig(_))
    ));
}

/// A schedule record this build cannot read (a broken write, a newer
/// build's format) does not stop the worker: it starts, fires the other
/// schedules, leaves the record as it is, and dead-letters that
/// schedule's tick with the reason. Listings leave it out; reading it
/// names the error.
#[tokio::test]
async fn an_unreadable_schedule_record_is_left_alone_and_the_others_fire() {
    let defs: Defs = Arc::new(Mutex::new(vec![
        Schedule::every_seconds("good", 10),
        Schedule::every_seconds("broken", 10),
    ]));
    let mut env = env_with(ok_runner(), defs, None).await;
    until(&env, "broken", |i| i.next_fire.is_some()).await;
    let q = env.queue().clone();
    let newer = rmp_serde::to_vec_named(&(9u8, "from the future")).unwrap();
    q.kv_put(b"wm/workflow-steps/sched/broken", b"\xc1")
        .await
        .unwrap();
    // A schedule this build does not define, recorded by a newer one.
    q.kv_put(b"wm/workflow-steps/sched/newer", &newer)
        .await
        .unwrap();
    env.crash_and_reopen(ok_runner(), RecordingHook::default())
        .await;
    env.start();
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "good", |i| i.run_count == 1).await;

    let listed: Vec<String> = env
        .rt
        .schedules()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, ["good"]);
    let broken = env.rt.schedule("broken").await;
    assert!(
        matches!(&broken, Err(Error::CorruptRecord { key, .. }) if key.ends_with("sched/broken")),
        "{broken:?}"
    );
    // Its armed tick fell due with the good one's: dead-lettered, naming
    // the record.
    let q = env.queue().clone();
    let mut dead = Vec::new();
    for _ in 0..5_000 {
        dead = q
            .view()
            .dead_jobs("workflow-steps-sched", None, 10)
            .await
            .unwrap();
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let reason = dead
        .first()
        .and_then(|j| j.last_error.clone())
        .unwrap_or_default();
    assert!(reason.contains("sched/broken"), "{dead:?}");
    env.stop().await;
    // Left as they were, for the build that wrote them.
    let view = q.view();
    assert_eq!(
        view.kv_get(b"wm/workflow-steps/sched/broken")
            .await
            .unwrap()
            .unwrap()
            .as_ref(),
        b"\xc1"
    );
    assert_eq!(
        view.kv_get(b"wm/workflow-steps/sched/newer")
            .await
            .unwrap()
            .unwrap()
            .as_ref(),
        newer.as_slice()
    );
}

/// A schedule's tick reads its workflow's breaker record and its last
/// run's record. Either one not decoding used to dead-letter every tick (the
/// schedule never fired again); now neither is applied, as for the
/// workflow's steps: the gate is open and the run counts as ended.
#[tokio::test]
async fn an_unreadable_breaker_or_last_run_record_does_not_stop_a_schedule() {
    let env = env_of(vec![Schedule::every_seconds("s", 10).workflow(WF)]).await;
    until(&env, "s", |i| i.next_fire.is_some()).await;
    let q = env.queue().clone();
    q.kv_put(format!("wm/workflow-steps/wf/{WF}").as_bytes(), b"\xc1")
        .await
        .unwrap();
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "s", |i| i.run_count == 1).await;
    until(&env, "s", |i| ended(i, TerminalStatus::Succeeded)).await;
    let last = info(&env, "s").await.last_run_id.unwrap();
    q.kv_put(format!("wm/workflow-steps/run/{last}").as_bytes(), b"\xc1")
        .await
        .unwrap();
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "s", |i| i.run_count == 2).await;
}

/// A run submitted by hand under the id a fire would give its run: the
/// fire used to overwrite that run's records. Now the fire is skipped,
/// counted as missed and named in `last_error`; the run keeps its input,
/// and the next fire fires.
#[tokio::test]
async fn a_fire_whose_run_id_is_taken_is_skipped_and_says_why() {
    let env = env_of(vec![Schedule::every_seconds("hand", 10)]).await;
    until(&env, "hand", |i| i.next_fire.is_some()).await;
    let taken = format!("hand:{}", T0 + 10_000);
    let mine = RunSpec {
        run_id: Some(taken.clone()),
        input: b"mine".to_vec(),
        ..Default::default()
    };
    env.rt.submit(mine.clone()).await.unwrap();
    env.rt.wait(&taken).await.unwrap();
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "hand", |i| i.next_fire == Some(at(T0 + 20_000))).await;
    let i = info(&env, "hand").await;
    assert_eq!((i.run_count, i.missed), (0, 1), "{i:?}");
    let why = i.last_error.unwrap_or_default();
    assert!(why.contains(&format!("`{taken}` is taken")), "{why}");
    let again = env.rt.submit(mine).await.unwrap();
    assert!(!again.newly_submitted, "the run kept its input");
    advance(&env, Duration::from_secs(10)).await;
    until(&env, "hand", |i| i.run_count == 1).await;
    let next = format!("hand:{}", T0 + 20_000);
    assert_eq!(info(&env, "hand").await.last_run_id, Some(next));
}
