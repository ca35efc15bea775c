//! The test kit's own tests: each crash point loses exactly what it should,
//! the clock drives delays, retries, deadlines, signal timeouts and
//! schedules, faults replay from a seed, a lapsed lease shows in the ready
//! check, and seeded crashes and kill schedules replay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use waymark::taquba::object_store::memory::InMemory;
use waymark::taquba::object_store::path::Path;
use waymark::taquba::object_store::{ObjectStoreExt, PutPayload};
use waymark::testkit::process::KillSchedule;
use waymark::testkit::{
    CallEnd, CrashPoint, Drive, FaultPlan, FaultStore, KitError, Outage, TestKit,
};
use waymark::*;

/// A runner of `steps` steps that counts, per step, how often its body
/// started (`started`) and how often it got past its first `.await`
/// (`finished`); step `fail_first` fails transiently on its first attempt.
#[derive(Clone, Default)]
struct Counting {
    steps: u32,
    fail_first: Option<u32>,
    delay: Option<Duration>,
    started: Arc<Mutex<HashMap<u32, u32>>>,
    finished: Arc<Mutex<HashMap<u32, u32>>>,
}

impl Counting {
    fn new(steps: u32) -> Self {
        Self {
            steps,
            ..Self::default()
        }
    }
    fn started(&self, step: u32) -> u32 {
        *self.started.lock().unwrap().get(&step).unwrap_or(&0)
    }
    fn finished(&self, step: u32) -> u32 {
        *self.finished.lock().unwrap().get(&step).unwrap_or(&0)
    }
}

impl StepRunner for Counting {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let n = step.step_number;
        *self.started.lock().unwrap().entry(n).or_default() += 1;
        tokio::task::yield_now().await;
        *self.finished.lock().unwrap().entry(n).or_default() += 1;
        if self.fail_first == Some(n) && step.attempts == 1 {
            return Err(StepError::transient("the network blinked"));
        }
        Ok(if n + 1 >= self.steps {
            StepOutcome::Succeed {
                result: b"done".to_vec(),
            }
        } else if let Some(delay) = self.delay {
            StepOutcome::ContinueAfter {
                payload: vec![],
                delay,
            }
        } else {
            StepOutcome::Continue { payload: vec![] }
        })
    }
}

fn spec(id: &str) -> RunSpec {
    RunSpec {
        run_id: Some(id.into()),
        ..Default::default()
    }
}

async fn kit(runner: Counting) -> TestKit<Counting, NoopTerminalHook> {
    TestKit::builder(runner, NoopTerminalHook)
        .start()
        .await
        .unwrap()
}

/// Crash at `point` of step 1 of a 3-step run, restart, finish; returns
/// the kit and the runner.
async fn crash_step_1_at(point: CrashPoint) -> (TestKit<Counting, NoopTerminalHook>, Counting) {
    let runner = Counting::new(3);
    let mut kit = kit(runner.clone()).await;
    kit.crash_at(point, "r", 1);
    kit.submit(spec("r")).await.unwrap();
    match kit.run_until_idle().await.unwrap() {
        Drive::Crashed(report) => {
            assert_eq!((report.point, report.step, report.attempt), (point, 1, 1));
        }
        Drive::Idle => panic!("the crash at {point:?} did not strike"),
    }
    assert!(matches!(kit.runtime(), Err(KitError::Down)));
    kit.restart().await.unwrap();
    let out = kit.wait("r").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    (kit, runner)
}

/// An idle limit longer than an `Instant` can hold is no limit: the kit
/// runs to idle instead of panicking on the deadline's arithmetic.
#[tokio::test]
async fn an_idle_limit_of_duration_max_is_no_limit() {
    let mut kit = TestKit::builder(Counting::new(2), NoopTerminalHook)
        .idle_limit(Duration::MAX)
        .start()
        .await
        .unwrap();
    kit.submit(spec("r")).await.unwrap();
    assert!(matches!(kit.run_until_idle().await.unwrap(), Drive::Idle));
    assert_eq!(
        kit.wait("r").await.unwrap().status,
        TerminalStatus::Succeeded
    );
    kit.shutdown().await.unwrap();
}

/// Advancing by `Duration::MAX` moves the clock to its last millisecond
/// instead of wrapping it around to the past.
#[tokio::test]
async fn an_advance_of_duration_max_stops_at_the_clocks_end() {
    let mut kit = TestKit::builder(Counting::new(2), NoopTerminalHook)
        .start()
        .await
        .unwrap();
    let before = kit.now_ms();
    kit.advance(Duration::MAX).await.unwrap();
    assert!(kit.now_ms() >= before, "the clock went back");
    assert_eq!(kit.now_ms(), u64::MAX);
    kit.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crash_after_the_runner_returned_reruns_the_step_once() {
    let (kit, runner) = crash_step_1_at(CrashPoint::AfterRunner).await;
    let calls = kit.calls("r", 1);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].end, CallEnd::Crashed(CrashPoint::AfterRunner));
    assert!(!calls[0].committed, "its settlement was never durable");
    assert_eq!(
        (calls[1].end.clone(), calls[1].committed),
        (CallEnd::Returned, true)
    );
    assert_eq!((calls[0].incarnation, calls[1].incarnation), (0, 1));
    assert_eq!(runner.finished(1), 2, "the body ran to its end twice");
    assert_eq!(kit.runner_calls("r", 0), 1, "step 0 committed before");
    assert_eq!(kit.runner_calls("r", 2), 1);
    kit.ran_to_commit_once().unwrap();
    kit.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crash_after_the_settlement_does_not_rerun_the_step() {
    let (kit, runner) = crash_step_1_at(CrashPoint::AfterSettlement).await;
    let calls = kit.calls("r", 1);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        (calls[0].end.clone(), calls[0].committed),
        (CallEnd::Returned, true)
    );
    assert_eq!(kit.committed_attempt("r", 1), Some(1));
    assert_eq!(runner.finished(1), 1);
    // The step after it ran in the new process.
    assert_eq!(kit.calls("r", 2)[0].incarnation, 1);
    kit.ran_to_commit_once().unwrap();
    kit.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crash_before_the_runner_loses_only_the_claim() {
    let (kit, runner) = crash_step_1_at(CrashPoint::BeforeRunner).await;
    let calls = kit.calls("r", 1);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].end, CallEnd::Crashed(CrashPoint::BeforeRunner));
    assert_eq!(
        runner.started(1),
        1,
        "the user's runner never saw the first call"
    );
    kit.ran_to_commit_once().unwrap();
    kit.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_crash_while_the_runner_runs_cuts_it_at_its_first_await() {
    let (kit, runner) = crash_step_1_at(CrashPoint::WhileRunning).await;
    assert_eq!(runner.started(1), 2, "the body started in both processes");
    assert_eq!(runner.finished(1), 1, "the first never got past its await");
    let calls = kit.calls("r", 1);
    assert_eq!(calls[0].end, CallEnd::Crashed(CrashPoint::WhileRunning));
    kit.ran_to_commit_once().unwrap();
    kit.shutdown().await.unwrap();
}

/// A memo entry committed before a crash is found after it; a charge
/// outside the memo repeats.
#[tokio::test]
async fn a_memoized_charge_survives_a_crash_after_the_runner_returned() {
    struct Pay(Arc<AtomicU32>, Arc<AtomicU32>);
    impl StepRunner for Pay {
        async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
            let memoized = step
                .memo
                .memoized("charge", || async {
                    Ok::<_, StepError>(self.0.fetch_add(1, Ordering::SeqCst))
                })
                .await?;
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(StepOutcome::Succeed {
                result: memoized.to_string().into_bytes(),
            })
        }
    }
    let (memo, bare) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let mut kit = TestKit::builder(Pay(memo.clone(), bare.clone()), NoopTerminalHook)
        .start()
        .await
        .unwrap();
    kit.crash_at(CrashPoint::AfterRunner, "p", 0);
    kit.submit(spec("p")).await.unwrap();
    assert!(matches!(
        kit.run_until_idle().await.unwrap(),
        Drive::Crashed(_)
    ));
    kit.restart().await.unwrap();
    let out = kit.wait("p").await.unwrap();
    assert_eq!(out.result.as_deref(), Some(&b"0"[..]));
    assert_eq!(
        memo.load(Ordering::SeqCst),
        1,
        "the memoized charge ran once"
    );
    assert_eq!(bare.load(Ordering::SeqCst), 2, "the bare charge ran twice");
    kit.shutdown().await.unwrap();
}

#[tokio::test]
async fn clock_advance_drives_delays() {
    let runner = Counting {
        delay: Some(Duration::from_secs(600)),
        ..Counting::new(2)
    };
    let mut kit = kit(runner.clone()).await;
    kit.submit(spec("d")).await.unwrap();
    assert_eq!(kit.run_until_idle().await.unwrap(), Drive::Idle);
    assert_eq!(runner.started(1), 0, "step 1 waits for its delay");
    assert!(matches!(kit.wait("d").await, Err(KitError::NotEnded(_))));
    kit.advance(Duration::from_secs(599)).await.unwrap();
    assert_eq!(runner.started(1), 0, "one second early");
    kit.advance(Duration::from_secs(1)).await.unwrap();
    assert_eq!(runner.started(1), 1);
    assert_eq!(
        kit.wait("d").await.unwrap().status,
        TerminalStatus::Succeeded
    );
    kit.shutdown().await.unwrap();
}

#[tokio::test]
async fn clock_advance_drives_retries() {
    let runner = Counting {
        fail_first: Some(0),
        ..Counting::new(1)
    };
    let mut kit = TestKit::builder(runner.clone(), NoopTerminalHook)
        .runtime(|b| {
            b.default_retry_policy(RetryPolicy {
                initial: Duration::from_secs(60),
                jitter: 0.0,
                ..RetryPolicy::default()
            })
        })
        .start()
        .await
        .unwrap();
    kit.submit(spec("t")).await.unwrap();
    kit.run_until_idle().await.unwrap();
    assert_eq!(kit.runner_calls("t", 0), 1, "the retry waits a minute");
    kit.advance(Duration::from_secs(59)).await.unwrap();
    assert_eq!(kit.runner_calls("t", 0), 1);
    kit.advance(Duration::from_secs(1)).await.unwrap();
    assert_eq!(kit.runner_calls("t", 0), 2);
    assert_eq!(kit.committed_attempt("t", 0), Some(2));
    let calls = kit.calls("t", 0);
    assert!(matches!(calls[0].end, CallEnd::Errored(_)) && calls[0].committed);
    assert_eq!(
        kit.wait("t").await.unwrap().status,
        TerminalStatus::Succeeded
    );
    kit.ran_to_commit_once().unwrap();
    kit.shutdown().await.unwrap();
}

#[tokio::test]
async fn clock_advance_drives_deadlines_and_signal_timeouts() {
    struct Waits;
    impl StepRunner for Waits {
        async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
            Ok(match step.step_number {
                0 => StepOutcome::WaitForSignal {
                    payload: vec![],
                    timeout: Duration::from_secs(300),
                },
                _ if step.signal.is_none() => StepOutcome::ContinueAfter {
                    payload: vec![],
                    delay: Duration::from_secs(3600),
                },
                _ => StepOutcome::Succeed { result: vec![] },
            })
        }
    }
    let mut kit = TestKit::builder(Waits, NoopTerminalHook)
        .start()
        .await
        .unwrap();
    kit.submit(RunSpec {
        deadline: Some(Deadline::After(Duration::from_secs(1800))),
        ..spec("w")
    })
    .await
    .unwrap();
    kit.run_until_idle().await.unwrap();
    assert_eq!(kit.runner_calls("w", 1), 0, "step 1 waits for a signal");
    kit.advance(Duration::from_secs(300)).await.unwrap();
    assert_eq!(kit.runner_calls("w", 1), 1, "the signal's timeout passed");
    assert_eq!(kit.outcome("w").await.unwrap(), None);
    kit.advance(Duration::from_secs(1499)).await.unwrap();
    assert_eq!(kit.outcome("w").await.unwrap(), None, "a second early");
    kit.advance(Duration::from_secs(1)).await.unwrap();
    let out = kit.wait("w").await.unwrap();
    assert_eq!(out.status, TerminalStatus::TimedOut);
    assert_eq!(kit.runner_calls("w", 2), 0);
    kit.shutdown().await.unwrap();
}

#[tokio::test]
async fn clock_advance_fires_schedules() {
    let runner = Counting::new(1);
    let mut kit = TestKit::builder(runner.clone(), NoopTerminalHook)
        .runtime(|b| b.schedule(Schedule::every("tick", Duration::from_secs(60))))
        .start()
        .await
        .unwrap();
    kit.run_until_idle().await.unwrap();
    let before = runner.started(0);
    kit.advance(Duration::from_secs(60)).await.unwrap();
    assert_eq!(runner.started(0), before + 1, "one fire a minute");
    kit.advance(Duration::from_secs(60)).await.unwrap();
    kit.advance(Duration::from_secs(60)).await.unwrap();
    assert_eq!(runner.started(0), before + 3);
    kit.shutdown().await.unwrap();
}

/// The same seed and the same operations give the same faults; another
/// seed other faults.
#[tokio::test]
async fn fault_rates_replay_identically_from_a_seed() {
    let plan = FaultPlan {
        put_fail: 200,
        get_fail: 200,
        ..FaultPlan::default()
    };
    async fn trace(seed: u64, plan: FaultPlan) -> Vec<waymark::testkit::Decision> {
        let store = FaultStore::new(Arc::new(InMemory::new()), seed, plan);
        for i in 0..200 {
            let path = Path::from(format!("k/{i}"));
            let _ = store.put(&path, PutPayload::from_static(b"x")).await;
            let _ = store.get(&path).await;
        }
        store.faults().trace()
    }
    let (a, b, c) = (
        trace(7, plan).await,
        trace(7, plan).await,
        trace(8, plan).await,
    );
    assert_eq!(a.len(), 400);
    assert!(a.iter().filter(|d| d.failed).count() > 40, "the rate shows");
    assert_eq!(a, b, "a seed replays its faults");
    assert_ne!(a, c, "another seed gives other faults");
}

/// Runs finish under seeded store faults, each step committing once.
#[tokio::test]
async fn runs_finish_once_under_store_faults() {
    let runner = Counting::new(3);
    let plan = FaultPlan {
        put_fail: 100,
        get_fail: 50,
        ..FaultPlan::default()
    };
    let mut kit = TestKit::builder(runner, NoopTerminalHook)
        .faults(3, plan)
        .start()
        .await
        .unwrap();
    for i in 0..3 {
        kit.submit(spec(&format!("f{i}"))).await.unwrap();
    }
    for i in 0..3 {
        let out = kit.wait(&format!("f{i}")).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Succeeded);
    }
    assert!(kit.faults().counts.failures() > 0, "faults fired");
    kit.ran_to_commit_once().unwrap();
    kit.shutdown().await.unwrap();
}

/// A lease that lapses while the step runs: the step runs again under a new
/// claim, the first call's settlement is refused, and the ready check
/// reports the step.
#[tokio::test]
async fn a_lapsed_lease_runs_the_step_twice_and_the_ready_check_says_so() {
    let runner = Counting::new(2);
    let mut kit = kit(runner.clone()).await;
    kit.lapse_lease("l", 0);
    kit.submit(spec("l")).await.unwrap();
    assert_eq!(
        kit.wait("l").await.unwrap().status,
        TerminalStatus::Succeeded
    );
    let calls = kit.calls("l", 0);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        (calls[0].end.clone(), calls[0].committed),
        (CallEnd::Returned, false)
    );
    assert!(calls[1].committed);
    match kit.ran_to_commit_once() {
        Err(KitError::NotOnce(steps)) => assert!(steps[0].contains("run `l` step 0"), "{steps:?}"),
        other => panic!("the ready check missed the lapse: {other:?}"),
    }
    kit.shutdown().await.unwrap();
}

/// A seeded random crash strikes at the same point of the same step for the
/// same seed, and restarts until the run ends keep every step's commit
/// once. (The attempt numbers may differ: whether a crashed claim was
/// durable is a race, as in a real crash.)
#[tokio::test]
async fn seeded_random_crashes_replay() {
    async fn crashes(seed: u64) -> Vec<(CrashPoint, u32)> {
        let mut kit = kit(Counting::new(5)).await;
        kit.submit(spec("s")).await.unwrap();
        let mut seen = Vec::new();
        for round in 0..20u64 {
            kit.crash_randomly(seed.wrapping_add(round), 150);
            match kit.run_until_idle().await.unwrap() {
                Drive::Crashed(r) => {
                    seen.push((r.point, r.step));
                    kit.restart().await.unwrap();
                }
                Drive::Idle => break,
            }
        }
        kit.disarm();
        assert_eq!(
            kit.wait("s").await.unwrap().status,
            TerminalStatus::Succeeded
        );
        kit.ran_to_commit_once().unwrap();
        kit.shutdown().await.unwrap();
        seen
    }
    let a = crashes(11).await;
    assert!(!a.is_empty(), "the seed struck");
    assert_eq!(a, crashes(11).await, "the seed replays its crashes");
    assert_ne!(a, crashes(12).await, "another seed crashes elsewhere");
}

/// The process helper's kill schedule is a function of its seed.
#[test]
fn the_kill_schedule_replays_from_its_seed() {
    let a: Vec<_> = KillSchedule::new(5).take(50).collect();
    let b: Vec<_> = KillSchedule::new(5).take(50).collect();
    let c: Vec<_> = KillSchedule::new(6).take(50).collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().any(|k| k.from_spawn) && a.iter().any(|k| !k.from_spawn));
}

/// A severed handle (a dead process) never writes again, nor completes an
/// operation; a new handle on the same store (the next process) sees what
/// was written before.
#[test]
fn a_severed_handle_writes_nothing() {
    use futures_util::FutureExt;
    let store = FaultStore::new(Arc::new(InMemory::new()), 0, FaultPlan::default());
    let (before, after) = (Path::from("before"), Path::from("after"));
    let dead = store.incarnation();
    let put = dead
        .put(&before, PutPayload::from_static(b"x"))
        .now_or_never();
    assert!(
        matches!(put, Some(Ok(_))),
        "an in-memory put completes at once"
    );
    dead.sever();
    let mut put = Box::pin(dead.put(&after, PutPayload::from_static(b"x")));
    for _ in 0..3 {
        assert!(
            (&mut put).now_or_never().is_none(),
            "the dead process's put never completes"
        );
    }
    drop(put);
    let next = store.incarnation();
    assert!(next.get(&before).now_or_never().is_some_and(|r| r.is_ok()));
    let lost = next.get(&after).now_or_never();
    assert!(
        matches!(
            lost,
            Some(Err(waymark::taquba::object_store::Error::NotFound { .. }))
        ),
        "nothing the dead process did after the crash reached the store"
    );
}

/// The README's "Testing your workflows" test, run here.
mod readme {
    include!("readme/testing.rs");
}

/// The README shows `tests/readme/testing.rs` verbatim (after its first
/// line).
#[test]
fn the_readme_shows_the_test_it_runs() {
    let test = include_str!("readme/testing.rs");
    let body = test.split_once('\n').map(|(_, b)| b).unwrap_or(test);
    assert!(
        include_str!("../README.md").contains(body.trim_end()),
        "README.md's test differs from tests/readme_testing.rs"
    );
}

/// A slow store, and an outage window during a submit: the submit waits
/// out the window, and the run ends once.
#[tokio::test]
async fn an_outage_window_and_a_slow_store_delay_but_lose_nothing() {
    let runner = Counting::new(2);
    let plan = FaultPlan {
        latency_ms: 2,
        ..FaultPlan::default()
    };
    let mut kit = TestKit::builder(runner, NoopTerminalHook)
        .faults(1, plan)
        .start()
        .await
        .unwrap();
    let faults = kit.faults();
    faults.fail_everything(Outage::Unavailable);
    let rt = kit.runtime().unwrap().clone();
    let submit = tokio::spawn(async move { rt.submit(spec("o")).await });
    for _ in 0..10_000 {
        if faults.outage_refusals.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        faults.outage_refusals.load(Ordering::SeqCst) > 0,
        "the outage refused"
    );
    assert!(!submit.is_finished(), "the submit waits for its commit");
    faults.fail_everything(Outage::None);
    assert!(submit.await.unwrap().unwrap().newly_submitted);
    let out = kit.wait("o").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    kit.ran_to_commit_once().unwrap();
    kit.shutdown().await.unwrap();
}

/// A run that continues as new runs its step 0 once a segment, each its own
/// step job: the ready check counted them as one step computed twice.
#[tokio::test]
async fn the_ready_check_tells_segments_apart() {
    struct Loops;
    impl StepRunner for Loops {
        async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
            Ok(if step.payload == b"1" {
                StepOutcome::ContinueAsNew {
                    input: b"2".to_vec(),
                }
            } else {
                StepOutcome::Succeed { result: vec![] }
            })
        }
    }
    let mut kit = TestKit::builder(Loops, NoopTerminalHook)
        .start()
        .await
        .unwrap();
    kit.submit(RunSpec {
        input: b"1".to_vec(),
        ..spec("seg")
    })
    .await
    .unwrap();
    let out = kit.wait("seg").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(kit.runner_calls("seg", 0), 2, "one call a segment");
    kit.ran_to_commit_once().unwrap();
    kit.shutdown().await.unwrap();
}
