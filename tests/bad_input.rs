//! Bad input gets a clear error and loses nothing: oversize headers and
//! step results, records in a format this build does not know, corrupt
//! records. In each case the other runs are untouched. (Malformed and
//! foreign step jobs, bad ids, reserved headers and oversize inputs are in
//! `tests/runtime.rs`; arbitrary bytes and strings are property-tested in
//! `src/record/proptests.rs`.)

mod support;

use std::collections::HashMap;

use support::*;
use taquba::JobStatus;
use waymark::*;

/// Step 0 continues with the input; step 1 succeeds with it.
fn echo() -> FnRunner {
    FnRunner::new(|step: Step| async move {
        Ok(match step.step_number {
            0 => StepOutcome::Continue {
                payload: step.payload,
            },
            _ => StepOutcome::Succeed {
                result: step.payload,
            },
        })
    })
}

/// A run record in the layout and encoding the runtime uses, with another
/// format version.
fn run_record_of_version(version: u8, job_id: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Run<'a> {
        step: u32,
        job_id: &'a str,
    }
    rmp_serde::to_vec_named(&(version, Run { step: 0, job_id })).unwrap()
}

async fn dead_error(env: &Env<NoopTerminalHook>, job_id: &str) -> String {
    let job = env.queue().view().get_job(job_id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Dead, "{job:?}");
    job.last_error.unwrap_or_default()
}

#[tokio::test]
async fn oversize_headers_are_refused_before_anything_is_written() {
    let env = Env::new(echo(), NoopTerminalHook).await;
    let mut headers = HashMap::new();
    headers.insert("trace".to_string(), "x".repeat(MAX_HEADERS_BYTES));
    let refused = env
        .rt
        .submit(RunSpec {
            run_id: Some("heavy".into()),
            headers,
            ..Default::default()
        })
        .await;
    assert!(
        matches!(refused, Err(Error::PayloadTooLarge { what: "headers", size, max }) if size > max),
        "{refused:?}"
    );
    assert!(refused.unwrap_err().to_string().contains("headers"));
    // Nothing was written: the id is still free for any input.
    assert!(env.rt.status("heavy").await.unwrap().is_none());
    assert!(env.submit("heavy", b"other").await.newly_submitted);
}

#[tokio::test]
async fn oversize_step_results_fail_only_their_run() {
    let runner = FnRunner::new(|step: Step| async move {
        let big = vec![7; MAX_PAYLOAD_BYTES + 1];
        Ok(match (step.run_id.as_str(), step.step_number) {
            ("big-payload", _) => StepOutcome::Continue { payload: big },
            ("big-result", _) => StepOutcome::Succeed {
                result: vec![7; MAX_RESULT_BYTES + 1],
            },
            (_, 0) => StepOutcome::Continue {
                payload: step.payload,
            },
            _ => StepOutcome::Succeed {
                result: step.payload,
            },
        })
    });
    let mut env = Env::new(runner, NoopTerminalHook).await;
    env.start();
    for id in ["big-payload", "big-result", "fine"] {
        env.submit(id, id.as_bytes()).await;
    }
    for (id, needle) in [
        ("big-payload", "returned a payload of"),
        ("big-result", "returned a result of"),
    ] {
        let out = env.rt.wait(id).await.unwrap();
        assert_eq!(out.status, TerminalStatus::Failed, "{id}");
        let error = out.error.unwrap_or_default();
        assert!(
            error.contains(needle) && error.contains("over the limit"),
            "{error}"
        );
        assert_eq!(out.final_step, 0);
    }
    let fine = env.rt.wait("fine").await.unwrap();
    assert_eq!(fine.result.as_deref(), Some(&b"fine"[..]));
    env.stop().await;
}

#[tokio::test]
async fn records_of_an_unknown_version_or_corrupt_are_named_errors() {
    let mut env = Env::new(echo(), NoopTerminalHook).await;
    let q = env.queue().clone();
    for id in ["newer", "garbled", "fine"] {
        env.submit(id, id.as_bytes()).await;
    }
    // Another build (a newer format) and a broken write left these records.
    let newer_key = b"wm/workflow-steps/run/newer";
    let newer = q.view().kv_get(newer_key).await.unwrap().unwrap();
    #[derive(serde::Deserialize)]
    struct JobOf {
        job_id: String,
    }
    let (_, JobOf { job_id: newer_job }): (u8, JobOf) = rmp_serde::from_slice(&newer).unwrap();
    q.kv_put(newer_key, &run_record_of_version(9, &newer_job))
        .await
        .unwrap();
    q.kv_put(b"wm/workflow-steps/run/garbled", b"\xc1 not msgpack")
        .await
        .unwrap();
    // This build starts on the store those writers left.
    env.crash_and_reopen(echo(), NoopTerminalHook).await;
    let q = env.queue().clone();

    match env.rt.status("newer").await {
        Err(Error::UnsupportedRecordVersion {
            key,
            found,
            supported,
        }) => {
            assert_eq!(key, "wm/workflow-steps/run/newer");
            assert_eq!((found, supported), (9, 1));
        }
        other => panic!("expected an unsupported version, got {other:?}"),
    }
    let garbled = env.rt.status("garbled").await;
    assert!(
        matches!(&garbled, Err(Error::CorruptRecord { key, .. }) if key.ends_with("run/garbled")),
        "{garbled:?}"
    );
    assert!(garbled.unwrap_err().is_permanent());

    // The worker dead-letters their step jobs with the reason and goes on.
    env.start();
    assert_eq!(
        env.rt.wait("fine").await.unwrap().result.as_deref(),
        Some(&b"fine"[..])
    );
    env.stop().await;
    let err = dead_error(&env, &newer_job).await;
    assert!(err.contains("version 9"), "{err}");
    // The records are left as they were, for the build that wrote them.
    assert_eq!(
        q.view().kv_get(newer_key).await.unwrap().unwrap().as_ref(),
        run_record_of_version(9, &newer_job).as_slice()
    );
}

#[tokio::test]
async fn an_outcome_or_health_record_of_an_unknown_version_is_a_named_error() {
    let mut env = Env::new(echo(), NoopTerminalHook).await;
    env.start();
    env.submit("done", b"x").await;
    env.rt.wait("done").await.unwrap();
    env.stop().await;
    let q = env.queue().clone();
    q.kv_put(
        b"wm/workflow-steps/out/done",
        &rmp_serde::to_vec_named(&(2u8, "from the future")).unwrap(),
    )
    .await
    .unwrap();
    q.kv_put(
        b"wm/workflow-steps/wf/default",
        &rmp_serde::to_vec_named(&(3u8, "from the future")).unwrap(),
    )
    .await
    .unwrap();
    let outcome = env.rt.outcome("done").await;
    assert!(
        matches!(
            outcome,
            Err(Error::UnsupportedRecordVersion { found: 2, .. })
        ),
        "{outcome:?}"
    );
    let health = env.rt.workflow_health("default").await;
    assert!(
        matches!(
            health,
            Err(Error::UnsupportedRecordVersion { found: 3, .. })
        ),
        "{health:?}"
    );
    // The same run id with the same input is still recognised.
    assert!(!env.submit("done", b"x").await.newly_submitted);
}

#[tokio::test]
async fn a_step_at_the_last_step_number_fails_its_run_instead_of_wrapping() {
    // Step 0 and the last step number continue; the others succeed.
    fn runner() -> FnRunner {
        FnRunner::new(|step: Step| async move {
            Ok(match step.step_number {
                0 | u32::MAX => StepOutcome::Continue {
                    payload: step.payload,
                },
                _ => StepOutcome::Succeed {
                    result: step.payload,
                },
            })
        })
    }
    let mut env = Env::new(runner(), NoopTerminalHook).await;
    let q = env.queue().clone();
    env.submit("edge", b"x").await;
    env.submit("fine", b"fine").await;
    // A crafted job claims to be the run's step u32::MAX, and the run record
    // points at it: a `Continue` from it has no next step number.
    let crafted = q
        .enqueue_with(
            "workflow-steps",
            b"x".to_vec(),
            taquba::EnqueueOptions::default()
                .header(HEADER_RUN_ID, "edge")
                .header(HEADER_STEP, u32::MAX.to_string())
                .header(HEADER_WORKFLOW, DEFAULT_WORKFLOW),
        )
        .await
        .unwrap();
    #[derive(serde::Serialize)]
    struct Run<'a> {
        step: u32,
        job_id: &'a str,
    }
    let record = rmp_serde::to_vec_named(&(
        1u8,
        Run {
            step: u32::MAX,
            job_id: &crafted,
        },
    ))
    .unwrap();
    q.kv_put(b"wm/workflow-steps/run/edge", &record)
        .await
        .unwrap();
    // A new process, which did not enqueue the jobs itself, admits them
    // by the run record.
    env.crash_and_reopen(runner(), NoopTerminalHook).await;

    env.start();
    let out = env.rt.wait("edge").await.unwrap();
    assert_eq!(out.status, TerminalStatus::Failed, "{out:?}");
    assert!(
        out.error
            .as_deref()
            .unwrap_or_default()
            .contains("no next step number"),
        "{out:?}"
    );
    assert_eq!(
        env.rt.wait("fine").await.unwrap().result.as_deref(),
        Some(&b"fine"[..])
    );
    env.stop().await;
}

#[tokio::test]
async fn a_listing_names_the_runs_it_cannot_read_and_lists_the_rest() {
    let mut env = Env::new(echo(), NoopTerminalHook).await;
    env.start();
    for id in ["e-ended", "f-ended"] {
        env.submit(id, b"x").await;
        env.rt.wait(id).await.unwrap();
    }
    env.stop().await;
    for id in ["a", "b-garbled", "c", "d-newer"] {
        env.submit(id, b"x").await;
    }
    let q = env.queue().clone();
    let put = |key: String, value: Vec<u8>| {
        let q = q.clone();
        async move { q.kv_put(key.as_bytes(), &value).await.unwrap() }
    };
    // A broken write, a newer build's live and terminal records, and a
    // submit record the header filter must read.
    put(
        "wm/workflow-steps/run/b-garbled".into(),
        b"\xc1 not msgpack".to_vec(),
    )
    .await;
    put(
        "wm/workflow-steps/run/d-newer".into(),
        run_record_of_version(9, "some-job"),
    )
    .await;
    put(
        "wm/workflow-steps/out/e-ended".into(),
        rmp_serde::to_vec_named(&(2u8, "from the future")).unwrap(),
    )
    .await;
    put("wm/workflow-steps/sub/c".into(), b"\xc1".to_vec()).await;

    let ids = |page: &RunPage| -> (Vec<String>, Vec<String>) {
        (
            page.runs.iter().map(|r| r.run_id.clone()).collect(),
            page.unreadable.iter().map(|r| r.run_id.clone()).collect(),
        )
    };
    let all = env.rt.runs(&RunFilter::default()).await.unwrap();
    assert_eq!(
        ids(&all),
        (
            vec!["a".into(), "c".into(), "f-ended".into()],
            vec!["b-garbled".into(), "d-newer".into(), "e-ended".into()]
        )
    );
    assert_eq!(all.next, None);
    let newer = &all.unreadable[1];
    assert!(
        newer.error.contains("run/d-newer") && newer.error.contains("version 9"),
        "{newer:?}"
    );
    assert!(
        all.unreadable[0].error.contains("does not decode"),
        "{all:?}"
    );

    // Pages cut between them: each names the ones in its own range.
    let first = env
        .rt
        .runs(&RunFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        ids(&first),
        (vec!["a".into(), "c".into()], vec!["b-garbled".into()])
    );
    let second = env
        .rt
        .runs(&RunFilter {
            limit: 2,
            after: first.next.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        ids(&second),
        (
            vec!["f-ended".into()],
            vec!["d-newer".into(), "e-ended".into()]
        )
    );

    // A filter cannot be applied to what cannot be read: named whatever
    // the filter. The header filter reads each run's submit record, and
    // `c`'s is garbled.
    let headed = env
        .rt
        .runs(&RunFilter {
            header: Some(("tenant".into(), "acme".into())),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        ids(&headed),
        (
            vec![],
            vec![
                "b-garbled".into(),
                "c".into(),
                "d-newer".into(),
                "e-ended".into()
            ]
        )
    );
    // The records are left as they were.
    assert_eq!(
        q.view()
            .kv_get(b"wm/workflow-steps/run/b-garbled")
            .await
            .unwrap()
            .unwrap()
            .as_ref(),
        b"\xc1 not msgpack"
    );
}

/// A workflow's health record that does not decode is not applied (its
/// steps run as if its breaker were closed) and reading it names the
/// error; `reset_workflow`, the operator's repair, replaces it with a
/// closed record, after which its tallies fold again.
#[tokio::test]
async fn a_reset_replaces_a_health_record_that_does_not_decode() {
    let mut env = Env::new(echo(), NoopTerminalHook).await;
    env.start();
    env.submit("before", b"x").await;
    env.rt.wait("before").await.unwrap();
    env.stop().await;
    env.queue()
        .kv_put(b"wm/workflow-steps/wf/default", b"\xc1")
        .await
        .unwrap();
    env.crash_and_reopen(echo(), NoopTerminalHook).await;
    env.start();
    let health = env.rt.workflow_health("default").await;
    assert!(
        matches!(&health, Err(Error::CorruptRecord { key, .. }) if key.ends_with("wf/default")),
        "{health:?}"
    );
    env.submit("during", b"x").await;
    assert_eq!(
        env.rt.wait("during").await.unwrap().status,
        TerminalStatus::Succeeded
    );

    assert!(env.rt.reset_workflow("default").await.unwrap());
    let health = env.rt.workflow_health("default").await.unwrap().unwrap();
    assert_eq!(health.status, BreakerStatus::Closed, "{health:?}");
    assert_eq!(health.failure_streak, 0);
    // Nothing left to reset.
    assert!(!env.rt.reset_workflow("default").await.unwrap());
    env.submit("after", b"x").await;
    env.rt.wait("after").await.unwrap();
    env.stop().await;
}
