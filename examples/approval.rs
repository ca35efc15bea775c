//! An approval that waits for a person: a run waits for a signal sent from a
//! second process with `waymark signal`, and escalates when its timeout
//! passes first.
//!
//! Shows: `StepOutcome::WaitForSignal`, `Step::signal`, `Step::effects`
//! (the approval request and the escalation are staged enqueues, committed
//! with the wait, so no answer can come before the wait exists), the run's
//! `WaitingForSignal` status, and the worker applying a signal another
//! process sent through the store's inbox.
//!
//! ```text
//! cargo run --example approval [DIR]          # terminal 1: the worker
//! cargo run --bin waymark -- signal approval-1 approve --store file://DIR   # terminal 2
//! ```
//!
//! The run asks for approval and waits 30 s. Signal `approve` (or anything
//! else, to reject) from the second terminal. With no answer in 30 s it
//! escalates and waits 60 s more; with none then either, it fails. The store
//! is `DIR` (default `./approval-data`); run the example again to see a
//! finished run's outcome, or delete the directory to start over.

use std::sync::Arc;
use std::time::Duration;

use waymark::taquba::EnqueueOptions;
use waymark::{
    NoopTerminalHook, RunSpec, RunState, Step, StepError, StepOutcome, StepRunner, StoreLocation,
    StoreOptions, WorkflowRuntime, open_worker_store,
};

/// The step queue the `waymark` CLI's commands talk to.
const QUEUE: &str = "demo-orders";
const FIRST_WAIT: Duration = Duration::from_secs(30);
const ESCALATED_WAIT: Duration = Duration::from_secs(60);

/// Step 0 asks; step 1 reads the answer or escalates; step 2 reads the
/// answer to the escalation.
struct Approval;

fn staging(e: waymark::Error) -> StepError {
    StepError::permanent(e.to_string())
}

impl StepRunner for Approval {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let decide = |signal: &[u8]| {
            if signal == b"approve" {
                StepOutcome::Succeed {
                    result: b"approved".to_vec(),
                }
            } else {
                StepOutcome::Fail {
                    reason: format!("rejected: {}", String::from_utf8_lossy(signal)),
                }
            }
        };
        match (step.step_number, &step.signal) {
            (0, _) => {
                // Committed with the wait: the approvers hear of it only
                // once a signal can reach the run.
                step.effects()
                    .enqueue(
                        "approval-requests",
                        step.run_id.clone(),
                        EnqueueOptions::default(),
                    )
                    .map_err(staging)?;
                println!(
                    "{}: waiting {}s for approval",
                    step.run_id,
                    FIRST_WAIT.as_secs()
                );
                Ok(StepOutcome::WaitForSignal {
                    payload: step.payload.clone(),
                    timeout: FIRST_WAIT,
                })
            }
            (_, Some(signal)) => Ok(decide(signal)),
            (1, None) => {
                step.effects()
                    .enqueue(
                        "approval-escalations",
                        step.run_id.clone(),
                        EnqueueOptions::default(),
                    )
                    .map_err(staging)?;
                println!(
                    "{}: no answer in {}s; escalated, waiting {}s more",
                    step.run_id,
                    FIRST_WAIT.as_secs(),
                    ESCALATED_WAIT.as_secs()
                );
                Ok(StepOutcome::WaitForSignal {
                    payload: step.payload.clone(),
                    timeout: ESCALATED_WAIT,
                })
            }
            (_, None) => Ok(StepOutcome::Fail {
                reason: "no answer, even after escalation".into(),
            }),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), waymark::Error> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./approval-data".into());
    std::fs::create_dir_all(&dir).map_err(|e| waymark::Error::InvalidConfig(e.to_string()))?;
    let dir =
        std::fs::canonicalize(&dir).map_err(|e| waymark::Error::InvalidConfig(e.to_string()))?;
    let url = format!("file://{}", dir.display());
    let location = StoreLocation::from_url(&url)?;
    let queue = open_worker_store(&location, StoreOptions::default().queue_name(QUEUE)).await?;
    let rt = WorkflowRuntime::builder(Arc::clone(&queue), Approval, NoopTerminalHook)
        .queue_name(QUEUE)
        .poll_interval(Duration::from_millis(100))
        .build()?;
    let worker = tokio::spawn({
        let rt = rt.clone();
        async move { rt.run(std::future::pending()).await }
    });
    let run = rt
        .submit(RunSpec {
            run_id: Some("approval-1".into()),
            input: b"purchase order 42: 3 laptops".to_vec(),
            ..Default::default()
        })
        .await?;
    loop {
        match rt.status(&run.run_id).await? {
            Some(s) if s.state == RunState::WaitingForSignal => break,
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            None => break,
        }
    }
    if rt.status(&run.run_id).await?.is_some() {
        println!("in another terminal:");
        println!(
            "  cargo run --bin waymark -- signal {} approve --store {url}",
            run.run_id
        );
        println!(
            "  cargo run --bin waymark -- status {} --store {url}",
            run.run_id
        );
    }
    let outcome = rt.wait(&run.run_id).await?;
    println!(
        "{}: {:?} {}",
        outcome.run_id,
        outcome.status,
        match (&outcome.result, &outcome.error) {
            (Some(r), _) => String::from_utf8_lossy(r).into_owned(),
            (None, Some(e)) => e.clone(),
            _ => String::new(),
        }
    );
    worker.abort();
    Ok(())
}
