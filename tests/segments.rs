//! Continue-as-new (`StepOutcome::ContinueAsNew`): a run that starts fresh
//! segments of itself is followed by `wait` and by a waiting parent, its
//! data stays bounded, and a new segment is never a child's ending. In-memory
//! store, taquba's `MockClock`.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use waymark::*;

/// A `looper` run's step 0 memoizes its input `n` and continues as new with
/// `n + 1` until 3, then step 1 succeeds with `done-{n}`. A `parent` spawns
/// one looper and succeeds with what its join saw.
fn looper(joined: Arc<Mutex<Vec<ChildOutcome>>>) -> FnRunner {
    FnRunner::new(move |s: Step| {
        let joined = joined.clone();
        async move {
            match (s.workflow.as_str(), s.step_number) {
                ("parent", 0) => Ok(StepOutcome::SpawnChildren {
                    children: vec![ChildSpec {
                        workflow: Some("looper".into()),
                        input: b"0".to_vec(),
                        ..Default::default()
                    }],
                    payload: vec![],
                    fail_fast: false,
                }),
                ("parent", _) => {
                    *joined.lock().unwrap() = s.children.clone();
                    Ok(StepOutcome::Succeed { result: vec![] })
                }
                (_, 0) => {
                    let n: u32 = String::from_utf8_lossy(&s.payload).parse().unwrap();
                    s.run_memo.put(&format!("seen{n}"), &n).await?;
                    if n < 3 {
                        Ok(StepOutcome::ContinueAsNew {
                            input: (n + 1).to_string().into_bytes(),
                        })
                    } else {
                        Ok(StepOutcome::Continue { payload: s.payload })
                    }
                }
                _ => Ok(StepOutcome::Succeed {
                    result: format!("done-{}", String::from_utf8_lossy(&s.payload)).into_bytes(),
                }),
            }
        }
    })
}

#[tokio::test]
async fn wait_follows_a_chain_of_segments_and_their_data_stays_bounded() {
    let runner = looper(Arc::default());
    let hook = RecordingHook::default();
    let mut env = Env::configured(runner.clone(), hook.clone(), |b| {
        b.poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("x".into()),
            input: b"0".to_vec(),
            workflow: Some("looper".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = env.rt.wait("x").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    assert_eq!(out.result.as_deref(), Some(&b"done-3"[..]));
    assert_eq!(out.final_step, 1, "the last segment's step counter");
    assert_eq!(runner.calls("x", 0), 4, "four segments ran step 0");
    assert_eq!(env.rt.outcome("x").await.unwrap().unwrap(), out);
    hook.wait_for("x").await;
    assert_eq!(hook.count("x"), 1, "one ending for the whole chain");
    // Only the last segment's data is left.
    let data = env
        .queue()
        .view()
        .kv_scan(
            b"wm/workflow-steps/data/x/",
            ..,
            taquba::KvOrder::Ascending,
            100,
        )
        .await
        .unwrap();
    let keys: Vec<String> = data
        .entries
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert!(
        keys.iter().any(|k| k.ends_with("memo/run/seen3")),
        "{keys:?}"
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.contains("seen0") || k.contains("seen2")),
        "{keys:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_waiting_parent_follows_its_childs_chain() {
    let joined = Arc::new(Mutex::new(Vec::new()));
    let mut env = Env::configured(looper(joined.clone()), RecordingHook::default(), |b| {
        b.poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("p".into()),
            workflow: Some("parent".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = env.rt.wait("p").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded);
    let seen = joined.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "the new segments were not endings");
    assert_eq!(seen[0].run_id, "p.0.0");
    assert_eq!(seen[0].status, TerminalStatus::Succeeded);
    assert_eq!(seen[0].result.as_deref(), Some(&b"done-3"[..]));
    env.stop().await;
}

/// A parent that spawns at the same step in each of its segments gets new
/// children each time: their ids carry the segment. (They were
/// `{parent}.{step}.{i}` in every segment, so the second segment's child
/// reused the first's id: its old outcome answered `wait`, and the old
/// child's retention later deleted the new one's data.)
#[tokio::test]
async fn each_segment_spawns_children_of_its_own() {
    let runner = FnRunner::new(|s: Step| async move {
        match (s.workflow.as_str(), s.step_number) {
            ("loop", 0) => Ok(StepOutcome::SpawnChildren {
                children: vec![ChildSpec {
                    workflow: Some("kid".into()),
                    input: s.payload.clone(),
                    ..Default::default()
                }],
                payload: s.payload,
                fail_fast: false,
            }),
            ("loop", _) => {
                let seen =
                    String::from_utf8_lossy(s.children[0].result.as_deref().unwrap_or_default())
                        .into_owned();
                if seen == "a" {
                    Ok(StepOutcome::ContinueAsNew {
                        input: b"b".to_vec(),
                    })
                } else {
                    Ok(StepOutcome::Succeed {
                        result: seen.into_bytes(),
                    })
                }
            }
            _ => Ok(StepOutcome::Succeed { result: s.payload }),
        }
    });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("p".into()),
            input: b"a".to_vec(),
            workflow: Some("loop".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = env.rt.wait("p").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
    assert_eq!(
        out.result.as_deref(),
        Some(&b"b"[..]),
        "the second segment's join saw its own child"
    );
    let kids: Vec<String> = env
        .rt
        .runs(&RunFilter {
            children_of: Some("p".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .runs
        .into_iter()
        .map(|r| r.run_id)
        .collect();
    assert_eq!(kids, ["p.0.0", "p.0s1.0"]);
    env.stop().await;
}

/// A run submitted with one attempt per step keeps that in its later
/// segments: a new segment's steps got the workflow's retry policy's
/// attempts instead, and a transient failure the submit forbade a retry of
/// was retried.
#[tokio::test]
async fn a_new_segment_keeps_the_submits_attempts_per_step() {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let runner = FnRunner::new({
        let calls = calls.clone();
        move |s: Step| {
            let calls = calls.clone();
            async move {
                calls.lock().unwrap().push(s.payload.clone());
                if s.payload == b"1" {
                    Ok(StepOutcome::ContinueAsNew {
                        input: b"2".to_vec(),
                    })
                } else {
                    Err(StepError::transient("flaky"))
                }
            }
        }
    });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    env.rt
        .submit(RunSpec {
            run_id: Some("once".into()),
            input: b"1".to_vec(),
            max_attempts_per_step: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), env.rt.wait("once"))
        .await
        .expect("the run ended at its first failure (a hang: it waits for a retry)")
        .unwrap();
    assert_eq!(out.status, TerminalStatus::Failed, "{out:?}");
    assert_eq!(*calls.lock().unwrap(), vec![b"1".to_vec(), b"2".to_vec()]);
    env.stop().await;
}
