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
