//! The pool's background work: records it cannot read do not stop it, and
//! steps the queue dead-letters while it runs are reconciled into their
//! runs. In-memory store, `MockClock`.

mod support;

use std::time::Duration;

use support::*;
use taquba::{EnqueueOptions, JobStatus};
use waymark::*;

/// A bound on waits that only a hang would exceed; never a speed check.
const HANG: Duration = Duration::from_secs(60);

fn one_step() -> FnRunner {
    FnRunner::new(|s: Step| async move { Ok(StepOutcome::Succeed { result: s.payload }) })
}

#[tokio::test]
async fn unreadable_records_do_not_stop_the_pool() {
    let mut env = Env::new(one_step(), NoopTerminalHook).await;
    let q = env.queue().clone();
    // A step job the queue dead-lettered, whose run record was written by a
    // newer Waymark (format version 2: MessagePack `[2, {}]`).
    let job = q
        .enqueue_with(
            "workflow-steps",
            vec![],
            EnqueueOptions::default()
                .header(HEADER_RUN_ID, "from-the-future")
                .header(HEADER_STEP, "0"),
        )
        .await
        .unwrap();
    q.kv_put(
        b"wm/workflow-steps/run/from-the-future",
        &[0x92, 0x02, 0x80],
    )
    .await
    .unwrap();
    let claim = q
        .claim("workflow-steps", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.id, job);
    q.dead_letter(&claim, "lease expired").await.unwrap();
    // And a workflow health record that does not decode.
    q.kv_put(b"wm/workflow-steps/wf/broken", b"not a record")
        .await
        .unwrap();

    env.start();
    env.submit("fine", b"ok").await;
    let worker = env.worker.as_mut().unwrap();
    let out = tokio::select! {
        out = env.rt.wait("fine") => out.unwrap(),
        stopped = worker => panic!("the pool stopped: {stopped:?}"),
    };
    assert_eq!(out.status, TerminalStatus::Succeeded);
    env.stop().await;
    // The unreadable run is left as it was.
    let dead = q.view().job_record(&job).await.unwrap().unwrap();
    assert_eq!(dead.status, JobStatus::Dead);
}

#[tokio::test]
async fn a_step_dead_lettered_while_the_pool_runs_fails_its_run() {
    let gate = Gate::default();
    let runner = FnRunner::new({
        let gate = gate.clone();
        move |_: Step| {
            let gate = gate.clone();
            async move {
                // Stalls past its lease, ignoring the cancel token.
                gate.wait().await;
                Ok(StepOutcome::Succeed { result: vec![] })
            }
        }
    });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    let job = env
        .rt
        .submit(RunSpec {
            run_id: Some("stalled".into()),
            max_attempts_per_step: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    env.until_status(&job.run_id, |s| {
        s.is_some_and(|s| s.state == RunState::Running)
    })
    .await;
    // The lease runs out on the only attempt: the reaper dead-letters the
    // step while the pool runs, and no settlement of it ever comes.
    let out = tokio::time::timeout(HANG, async {
        loop {
            env.clock.advance(Duration::from_secs(600));
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Some(out) = env.rt.outcome("stalled").await.unwrap() {
                return out;
            }
        }
    })
    .await
    .expect("the dead-lettered step's run ends");
    assert_eq!(out.status, TerminalStatus::Failed);
    assert!(out.error.unwrap().contains("gave up"), "names the cause");
    gate.open();
    env.stop().await;
}

/// Every key under the runs' data prefixes, with its value.
async fn data(q: &taquba::Queue) -> Vec<(String, Vec<u8>)> {
    let page = q
        .view()
        .kv_scan(
            b"wm/workflow-steps/data/",
            ..,
            taquba::KvOrder::Ascending,
            1000,
        )
        .await
        .unwrap();
    page.entries
        .iter()
        .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.to_vec()))
        .collect()
}

/// Retention leaves nothing of any run's data, whether the run's expiry
/// entry names it (a plain run) or retention must scan for it: a run
/// continued as new, a re-run that ended sooner than the run it re-ran
/// (whose later steps' inputs no summary names), and a run ended by an
/// earlier Waymark (its entry empty, no extent key).
#[tokio::test]
async fn retention_leaves_nothing_of_any_runs_data() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // The payload is [final step, fails]; run "again" ends at step 1 once
    // `short` is set; run "segment" continues as new at step 2.
    let short = Arc::new(AtomicBool::new(false));
    let runner = FnRunner::new({
        let short = short.clone();
        move |s: Step| {
            let short = short.clone();
            async move {
                let (last, fails) = (u32::from(s.payload[0]), s.payload[1] == 1);
                let n = s.step_number;
                if s.run_id == "segment" && n == 2 && s.payload[1] != 2 {
                    return Ok(StepOutcome::ContinueAsNew { input: vec![1, 2] });
                }
                let end =
                    n == last || (s.run_id == "again" && n == 1 && short.load(Ordering::SeqCst));
                Ok(match (end, fails && n == last) {
                    (false, _) => StepOutcome::Continue { payload: s.payload },
                    (true, true) => StepOutcome::Fail {
                        reason: "no".into(),
                    },
                    (true, false) => StepOutcome::Succeed { result: vec![] },
                })
            }
        }
    });
    let mut env = Env::configured(runner, NoopTerminalHook, |b| {
        b.terminal_retention(Duration::from_secs(60))
            .poll_interval(Duration::from_millis(5))
    })
    .await;
    env.start();
    for (id, input) in [
        ("plain", [3, 0]),
        ("again", [3, 1]),
        ("segment", [4, 0]),
        ("old", [1, 0]),
    ] {
        env.submit(id, &input).await;
    }
    for id in ["plain", "again", "segment", "old"] {
        tokio::time::timeout(HANG, env.rt.wait(id))
            .await
            .unwrap()
            .unwrap();
    }
    short.store(true, Ordering::SeqCst);
    env.rt.rerun("again", 1).await.unwrap();
    let again = tokio::time::timeout(HANG, async {
        loop {
            match env.rt.outcome("again").await.unwrap() {
                Some(out) if out.reruns == 1 => return out,
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(again.final_step, 1, "the re-run ended sooner");
    let q = env.queue().clone();
    let extent = |id: &str| format!("wm/workflow-steps/data/{id}/extent");
    let kept = data(&q).await;
    let value_of = |key: &str| kept.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    assert_eq!(value_of(&extent("plain")).as_deref(), Some(&b"named"[..]));
    // A new segment deletes the key with the rest of the run's data, so a
    // memo put that lands just before its commit is still found by a scan.
    assert_eq!(value_of(&extent("segment")), None);
    assert_eq!(value_of(&extent("again")).as_deref(), Some(&b"scan"[..]));
    assert!(
        value_of("wm/workflow-steps/data/again/input/3").is_some(),
        "the first ending's last input is kept past the re-run's end"
    );
    // "old" as an earlier Waymark left it: no extent key, an empty entry,
    // and a key of its data that nothing names.
    let entries = q
        .view()
        .kv_scan(
            b"wm/workflow-steps/exp/",
            ..,
            taquba::KvOrder::Ascending,
            100,
        )
        .await
        .unwrap();
    let old_entry = entries
        .entries
        .iter()
        .map(|(k, _)| k.to_vec())
        .find(|k| k.ends_with(b"old"))
        .unwrap();
    q.kv_put(&old_entry, b"").await.unwrap();
    q.kv_delete(extent("old").as_bytes()).await.unwrap();
    q.kv_put(b"wm/workflow-steps/data/old/memo/run/k", b"m")
        .await
        .unwrap();

    env.clock.advance(Duration::from_secs(61));
    tokio::time::timeout(HANG, async {
        for id in ["plain", "again", "segment", "old"] {
            while env.rt.outcome(id).await.unwrap().is_some() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    })
    .await
    .expect("retention deleted every outcome");
    assert_eq!(data(&q).await, Vec::<(String, Vec<u8>)>::new());
    env.stop().await;
}
