//! Child runs (`StepOutcome::SpawnChildren`): spawn in the parent's
//! settlement, join in spawn order, each child's ending recorded into its
//! parent once, in the child's terminal transaction; the terminal guard,
//! fail-fast, and the cancel cascade (across a restart too). In-memory store,
//! taquba's `MockClock`, gates: no sleep decides anything.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use waymark::*;

const MINUTE: Duration = Duration::from_secs(60);

/// What each run's joining step saw, by run id.
type Seen = Arc<Mutex<HashMap<String, Vec<ChildOutcome>>>>;

/// How the children behave.
#[derive(Clone, Default)]
struct Plan {
    /// Children per parent.
    n: usize,
    /// Children (by index) that fail.
    failing: Vec<usize>,
    /// Children (by index) that wait on `gate` or their cancel token.
    blocked: Vec<usize>,
    /// The parent's children spawn a grandchild each (which blocks).
    grand: bool,
    fail_fast: bool,
    /// The children's deadline.
    deadline: Option<Deadline>,
}

fn index_of(run_id: &str) -> usize {
    run_id.rsplit('.').next().unwrap().parse().unwrap()
}

/// A `parent` run's step 0 spawns `plan.n` children (workflow `child`),
/// step 1 records their outcomes and succeeds with their results joined. A
/// child succeeds with `c{i}` (after `gate`, or its cancel, when blocked),
/// or fails when listed; with `grand`, it first spawns one blocked
/// grandchild and joins it.
fn family(plan: Plan, gate: Gate, seen: Seen) -> FnRunner {
    FnRunner::new(move |s: Step| {
        let (plan, gate, seen) = (plan.clone(), gate.clone(), seen.clone());
        async move {
            let join = |s: &Step| {
                seen.lock()
                    .unwrap()
                    .insert(s.run_id.clone(), s.children.clone());
                let results: Vec<String> = s
                    .children
                    .iter()
                    .map(|c| match &c.result {
                        Some(r) => String::from_utf8_lossy(r).into_owned(),
                        None => c.error.clone().unwrap_or_default(),
                    })
                    .collect();
                Ok(StepOutcome::Succeed {
                    result: results.join(",").into_bytes(),
                })
            };
            match (s.workflow.as_str(), s.step_number) {
                ("parent", 0) => Ok(StepOutcome::SpawnChildren {
                    children: (0..plan.n)
                        .map(|i| ChildSpec {
                            workflow: Some("child".into()),
                            input: format!("c{i}").into_bytes(),
                            deadline: plan.deadline,
                            ..Default::default()
                        })
                        .collect(),
                    payload: b"joined".to_vec(),
                    fail_fast: plan.fail_fast,
                }),
                ("parent", _) => {
                    assert_eq!(s.payload, b"joined");
                    join(&s)
                }
                ("child", 0) if plan.grand => Ok(StepOutcome::SpawnChildren {
                    children: vec![ChildSpec {
                        workflow: Some("grand".into()),
                        ..Default::default()
                    }],
                    payload: vec![],
                    fail_fast: false,
                }),
                ("child", 0) => {
                    let i = index_of(&s.run_id);
                    if plan.blocked.contains(&i) {
                        tokio::select! {
                            _ = gate.wait() => {}
                            _ = s.cancel_token.cancelled() => {}
                        }
                    }
                    if plan.failing.contains(&i) {
                        return Ok(StepOutcome::Fail {
                            reason: format!("child {i} failed"),
                        });
                    }
                    Ok(StepOutcome::Succeed { result: s.payload })
                }
                ("grand", _) => {
                    s.cancel_token.cancelled().await;
                    Ok(StepOutcome::Succeed { result: vec![] })
                }
                _ => join(&s),
            }
        }
    })
}

async fn env_for(runner: FnRunner) -> Env<RecordingHook> {
    Env::configured(runner, RecordingHook::default(), |b| {
        b.poll_interval(Duration::from_millis(5))
    })
    .await
}

async fn submit_parent(env: &Env<RecordingHook>, id: &str) {
    env.rt
        .submit(RunSpec {
            run_id: Some(id.into()),
            workflow: Some("parent".into()),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Every run id under `prefix`, live or ended.
async fn runs_under(env: &Env<RecordingHook>, prefix: &str) -> Vec<String> {
    let page = env
        .rt
        .runs(&RunFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    page.runs
        .into_iter()
        .map(|r| r.run_id)
        .filter(|id| id.starts_with(prefix))
        .collect()
}

#[tokio::test]
async fn children_are_joined_in_spawn_order() {
    let seen = Seen::default();
    let plan = Plan {
        n: 12,
        ..Plan::default()
    };
    let runner = family(plan, Gate::default(), seen.clone());
    let mut env = env_for(runner.clone()).await;
    env.start();
    submit_parent(&env, "p").await;
    let out = env.rt.wait("p").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
    let want: Vec<String> = (0..12).map(|i| format!("c{i}")).collect();
    assert_eq!(out.result.as_deref(), Some(want.join(",").as_bytes()));
    let outcomes = seen.lock().unwrap()["p"].clone();
    let ids: Vec<String> = outcomes.iter().map(|c| c.run_id.clone()).collect();
    let want_ids: Vec<String> = (0..12).map(|i| format!("p.0.{i}")).collect();
    assert_eq!(ids, want_ids, "spawn order");
    assert!(
        outcomes
            .iter()
            .all(|c| c.status == TerminalStatus::Succeeded && c.final_step == 0)
    );
    assert_eq!(runner.calls("p", 0), 1);
    assert_eq!(runner.calls("p", 1), 1, "the join step ran once");
    // Listing the children of `p` (and theirs): ids extend the parent's.
    env.submit("p2", b"").await;
    let listed = env
        .rt
        .runs(&RunFilter {
            children_of: Some("p".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut listed: Vec<String> = listed.runs.into_iter().map(|r| r.run_id).collect();
    listed.sort();
    let mut want_sorted = want_ids.clone();
    want_sorted.sort();
    assert_eq!(listed, want_sorted, "not `p` itself, not `p2`");
    env.stop().await;
}

#[tokio::test]
async fn the_parent_waits_without_a_slot_or_an_attempt() {
    let (gate, seen) = (Gate::default(), Seen::default());
    let plan = Plan {
        n: 2,
        blocked: vec![0, 1],
        ..Plan::default()
    };
    let runner = family(plan, gate.clone(), seen);
    // Two slots: the two children hold them; the waiting parent holds none.
    let mut env = Env::configured(runner.clone(), RecordingHook::default(), |b| {
        b.poll_interval(Duration::from_millis(5))
            .max_concurrent_steps(2)
    })
    .await;
    env.start();
    submit_parent(&env, "w").await;
    env.until_status("w.0.1", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    env.until_status("w.0.0", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    let status = env.rt.status("w").await.unwrap().unwrap();
    assert_eq!(status.current_step, 1);
    assert_eq!(status.state, RunState::WaitingForChildren);
    assert_eq!(status.children_live, Some(2));
    gate.open();
    let out = env.rt.wait("w").await.unwrap();
    assert_eq!(out.result.as_deref(), Some(&b"c0,c1"[..]));
    env.stop().await;
}

#[tokio::test]
async fn a_crash_before_the_spawn_commits_still_starts_one_set() {
    let (gate, seen) = (Gate::default(), Seen::default());
    let plan = Plan {
        n: 3,
        ..Plan::default()
    };
    let inner = family(plan, Gate::default(), seen.clone());
    // The first attempt of the parent's step 0 hangs until the crash.
    let first = {
        let (inner, gate) = (inner.clone(), gate.clone());
        FnRunner::new(move |s: Step| {
            let (inner, gate) = (inner.clone(), gate.clone());
            async move {
                if s.workflow == "parent" && s.step_number == 0 {
                    gate.wait().await;
                }
                inner.run_step(&s).await
            }
        })
    };
    let mut env = env_for(first.clone()).await;
    env.start();
    submit_parent(&env, "k").await;
    env.until_status("k", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    env.crash_and_reopen(inner.clone(), RecordingHook::default())
        .await;
    env.start();
    let out = env.rt.wait("k").await.unwrap();
    assert_eq!(out.result.as_deref(), Some(&b"c0,c1,c2"[..]));
    assert_eq!(inner.calls("k", 0), 1, "step 0 ran again after the crash");
    assert_eq!(runs_under(&env, "k.").await, ["k.0.0", "k.0.1", "k.0.2"]);
    gate.open();
    env.stop().await;
}

/// A hook that fails its first delivery of every child's ending (so it is
/// delivered again).
#[derive(Clone, Default)]
struct FlakyHook {
    inner: RecordingHook,
    failed: Arc<Mutex<Vec<String>>>,
}

impl TerminalHook for FlakyHook {
    async fn on_termination(&self, outcome: &RunOutcome) -> Result<(), StepError> {
        let mut failed = self.failed.lock().unwrap().clone();
        if outcome.workflow == "child" && !failed.contains(&outcome.run_id) {
            failed.push(outcome.run_id.clone());
            *self.failed.lock().unwrap() = failed;
            return Err(StepError::transient("flaky"));
        }
        self.inner.on_termination(outcome).await
    }
}

#[tokio::test]
async fn a_redelivered_hook_records_nothing_twice() {
    let seen = Seen::default();
    let plan = Plan {
        n: 4,
        ..Plan::default()
    };
    let hook = FlakyHook::default();
    let runner = family(plan, Gate::default(), seen.clone());
    let mut env = Env::configured(runner, hook.clone(), |b| {
        b.poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("h".into()),
            workflow: Some("parent".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = env.rt.wait("h").await.unwrap();
    for i in 0..4 {
        let child = format!("h.0.{i}");
        hook.inner.wait_for(&child).await;
        assert_eq!(hook.inner.count(&child), 1);
    }
    assert_eq!(out.result.as_deref(), Some(&b"c0,c1,c2,c3"[..]));
    assert_eq!(seen.lock().unwrap()["h"].len(), 4, "each child once");
    env.stop().await;
}

#[tokio::test]
async fn a_cancelled_child_reaches_the_parent_as_a_cancelled_failure() {
    let (gate, seen) = (Gate::default(), Seen::default());
    let plan = Plan {
        n: 2,
        blocked: vec![1],
        ..Plan::default()
    };
    let mut env = env_for(family(plan, gate.clone(), seen.clone())).await;
    env.start();
    submit_parent(&env, "c").await;
    env.until_status("c.0.1", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    assert!(env.rt.cancel("c.0.1").await.unwrap());
    let out = env.rt.wait("c").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    let outcomes = seen.lock().unwrap()["c"].clone();
    assert_eq!(outcomes[0].status, TerminalStatus::Succeeded);
    assert_eq!(outcomes[1].status, TerminalStatus::Failed);
    assert_eq!(outcomes[1].error.as_deref(), Some("cancelled:"));
    env.stop().await;
}

#[tokio::test]
async fn a_timed_out_child_reaches_the_parent_as_a_timed_out_failure() {
    let (gate, seen) = (Gate::default(), Seen::default());
    let plan = Plan {
        n: 1,
        blocked: vec![0],
        deadline: Some(Deadline::After(MINUTE)),
        ..Plan::default()
    };
    let mut env = env_for(family(plan, gate.clone(), seen.clone())).await;
    env.start();
    submit_parent(&env, "t").await;
    env.until_status("t.0.0", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    env.clock.advance(MINUTE);
    let out = env.rt.wait("t").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    let outcomes = seen.lock().unwrap()["t"].clone();
    let deadline = T0 + 60_000;
    assert_eq!(
        outcomes[0].error.as_deref(),
        Some(format!("timed_out:{deadline}").as_str())
    );
    assert_eq!(
        env.rt.outcome("t.0.0").await.unwrap().unwrap().status,
        TerminalStatus::TimedOut
    );
    env.stop().await;
}

#[tokio::test]
async fn a_child_ending_after_its_parent_records_nothing() {
    let (gate, seen) = (Gate::default(), Seen::default());
    let plan = Plan {
        n: 2,
        blocked: vec![0, 1],
        ..Plan::default()
    };
    let mut env = env_for(family(plan, gate.clone(), seen.clone())).await;
    env.start();
    submit_parent(&env, "e").await;
    env.until_status("e.0.1", |s| s.is_some_and(|s| s.state == RunState::Running))
        .await;
    // The parent ends first: its children are cancelled by the cascade and
    // end after it.
    assert!(env.rt.cancel("e").await.unwrap());
    let parent = env.rt.wait("e").await.unwrap();
    assert_eq!(parent.status, TerminalStatus::Cancelled);
    for child in ["e.0.0", "e.0.1"] {
        let out = env.rt.wait(child).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Cancelled, "{child}");
    }
    assert_eq!(env.rt.status("e").await.unwrap(), None, "not revived");
    assert_eq!(env.rt.outcome("e").await.unwrap().unwrap(), parent);
    assert!(seen.lock().unwrap().get("e").is_none(), "no join ran");
    env.stop().await;
}

#[tokio::test]
async fn fail_fast_fails_the_parent_and_cancels_the_siblings() {
    let (gate, seen) = (Gate::default(), Seen::default());
    let plan = Plan {
        n: 3,
        blocked: vec![1, 2],
        fail_fast: true,
        ..Plan::default()
    };
    let runner = family(plan, gate.clone(), seen.clone());
    // Child 0 fails at once; 1 and 2 wait.
    let runner = {
        let inner = runner.clone();
        FnRunner::new(move |s: Step| {
            let inner = inner.clone();
            async move {
                if s.run_id == "f.0.0" {
                    return Ok(StepOutcome::Fail {
                        reason: "bad parcel".into(),
                    });
                }
                inner.run_step(&s).await
            }
        })
    };
    let mut env = env_for(runner.clone()).await;
    env.start();
    submit_parent(&env, "f").await;
    let out = env.rt.wait("f").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Failed);
    assert!(
        out.error
            .as_deref()
            .is_some_and(|e| e.contains("f.0.0") && e.contains("bad parcel")),
        "{out:?}"
    );
    assert_eq!(runner.calls("f", 1), 0, "the join step did not run");
    for child in ["f.0.1", "f.0.2"] {
        let out = env.rt.wait(child).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Cancelled, "{child}");
    }
    env.stop().await;
}

async fn cascade_two_levels(restart: bool) {
    let (gate, seen) = (Gate::default(), Seen::default());
    let plan = Plan {
        n: 2,
        grand: true,
        ..Plan::default()
    };
    let runner = family(plan, gate.clone(), seen);
    let mut env = env_for(runner.clone()).await;
    env.start();
    submit_parent(&env, "g").await;
    for grand in ["g.0.0.0.0", "g.0.1.0.0"] {
        env.until_status(grand, |s| s.is_some_and(|s| s.state == RunState::Running))
            .await;
    }
    if restart {
        // Crash, cancel with no pool running (the parent's placeholder is
        // removed and its cascade marker written), then start again: the
        // new pool completes the cascade.
        env.crash_and_reopen(runner.clone(), RecordingHook::default())
            .await;
        assert!(env.rt.cancel("g").await.unwrap());
        env.start();
    } else {
        assert!(env.rt.cancel("g").await.unwrap());
    }
    for run in ["g", "g.0.0", "g.0.1", "g.0.0.0.0", "g.0.1.0.0"] {
        let out = env.rt.wait(run).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Cancelled, "{run}");
    }
    env.stop().await;
}

#[tokio::test]
async fn a_parent_cancel_cascades_through_two_levels() {
    cascade_two_levels(false).await;
}

#[tokio::test]
async fn a_cascade_completes_across_a_restart() {
    cascade_two_levels(true).await;
}

#[tokio::test]
async fn a_parent_past_its_deadline_times_out_and_cancels_its_children() {
    let (gate, seen) = (Gate::default(), Seen::default());
    let plan = Plan {
        n: 2,
        blocked: vec![0, 1],
        ..Plan::default()
    };
    let mut env = env_for(family(plan, gate.clone(), seen.clone())).await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("d".into()),
            workflow: Some("parent".into()),
            deadline: Some(Deadline::After(MINUTE)),
            ..Default::default()
        })
        .await
        .unwrap();
    env.until_status("d", |s| {
        s.is_some_and(|s| s.state == RunState::WaitingForChildren)
    })
    .await;
    env.clock.advance(MINUTE);
    let out = env.rt.wait("d").await.unwrap();
    assert_eq!(out.status, TerminalStatus::TimedOut, "{out:?}");
    assert_eq!(out.final_step, 1);
    for child in ["d.0.0", "d.0.1"] {
        let out = env.rt.wait(child).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Cancelled, "{child}");
    }
    assert!(seen.lock().unwrap().get("d").is_none(), "no join ran");
    env.stop().await;
}

/// A join step whose children's outcomes do not decode can never run: it
/// fails its run with the reason, instead of being left claimed to be
/// claimed again (a lease each) until the queue gives up with a reason
/// that says nothing. The join step is held parked behind a tripped
/// breaker while a child's outcome record is broken under it.
#[tokio::test]
async fn a_join_whose_child_outcome_does_not_decode_fails_its_run_with_the_reason() {
    let gate = Gate::default();
    let runner = {
        let gate = gate.clone();
        FnRunner::new(move |s: Step| {
            let gate = gate.clone();
            async move {
                match (s.workflow.as_str(), s.step_number) {
                    ("parent", _) if s.payload == b"fail" => Err(StepError::permanent("trip it")),
                    ("parent", 0) => Ok(StepOutcome::SpawnChildren {
                        children: vec![ChildSpec {
                            workflow: Some("child".into()),
                            ..Default::default()
                        }],
                        payload: vec![],
                        fail_fast: false,
                    }),
                    ("child", _) => {
                        gate.wait().await;
                        Ok(StepOutcome::Succeed {
                            result: b"c".to_vec(),
                        })
                    }
                    _ => Ok(StepOutcome::Succeed { result: vec![] }),
                }
            }
        })
    };
    let policy = BackoffPolicy {
        initial: Duration::from_secs(60),
        jitter: 0.0,
        streak_limit: Some(1),
        ..Default::default()
    };
    let mut env = Env::configured(runner, NoopTerminalHook, move |b| {
        b.breaker("parent", policy.clone())
    })
    .await;
    env.start();
    let submit = |id: &str, input: &[u8]| RunSpec {
        run_id: Some(id.into()),
        workflow: Some("parent".into()),
        input: input.to_vec(),
        ..Default::default()
    };
    env.rt.submit(submit("fam", b"ok")).await.unwrap();
    let children = RunFilter {
        children_of: Some("fam".into()),
        ..Default::default()
    };
    while env.rt.runs(&children).await.unwrap().runs.is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The parent's workflow trips; then the child ends, and the parent's
    // join step parks when it is claimed.
    env.rt.submit(submit("tripper", b"fail")).await.unwrap();
    env.rt.wait("tripper").await.unwrap();
    gate.open();
    loop {
        let state = env.rt.status("fam").await.unwrap().map(|s| s.state);
        if state == Some(RunState::Parked) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let q = env.queue().clone();
    let prefix = b"wm/workflow-steps/data/fam/child/";
    let page = q
        .view()
        .kv_scan(prefix, .., taquba::KvOrder::Ascending, 16)
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 1, "the child's outcome is recorded");
    for (key, _) in &page.entries {
        q.kv_put(key, b"\xc1").await.unwrap();
    }
    assert!(env.rt.reset_workflow("parent").await.unwrap());
    let out = tokio::time::timeout(Duration::from_secs(10), env.rt.wait("fam"))
        .await
        .expect("the run should fail, not wait on a lease")
        .unwrap();
    assert_eq!(out.status, TerminalStatus::Failed, "{out:?}");
    let error = out.error.unwrap_or_default();
    assert!(
        error.contains("its children's outcomes cannot be read")
            && error.contains("does not decode"),
        "{error}"
    );
    env.stop().await;
}

/// A child's run id (`{parent}.{step}.{index}`) that names a run submitted
/// by hand: the spawn used to overwrite that run's records. Now the parent
/// fails, saying which id is taken, and the other run keeps its input,
/// outcome and records; no child of the spawn is created.
#[tokio::test]
async fn a_child_id_taken_by_another_run_fails_the_parent_and_leaves_that_run_alone() {
    let plan = Plan {
        n: 2,
        ..Plan::default()
    };
    let runner = family(plan, Gate::default(), Seen::default());
    let mut env = env_for(runner.clone()).await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("p.0.1".into()),
            workflow: Some("child".into()),
            input: b"mine".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mine = env.rt.wait("p.0.1").await.unwrap();
    assert_eq!(mine.result.as_deref(), Some(&b"mine"[..]));
    submit_parent(&env, "p").await;
    let out = env.rt.wait("p").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Failed, "{out:?}");
    let error = out.error.unwrap_or_default();
    assert!(error.contains("child run id `p.0.1` is taken"), "{error}");
    assert_eq!(runner.calls("p.0.1", 0), 1, "that run did not run again");
    let after = env.rt.outcome("p.0.1").await.unwrap().unwrap();
    assert_eq!(after.result.as_deref(), Some(&b"mine"[..]));
    assert_eq!(runs_under(&env, "p.0.0").await, Vec::<String>::new());
    // A resubmit of the other run still attaches to it.
    let again = env
        .rt
        .submit(RunSpec {
            run_id: Some("p.0.1".into()),
            workflow: Some("child".into()),
            input: b"mine".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!again.newly_submitted);
    env.stop().await;
}
