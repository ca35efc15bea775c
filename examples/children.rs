//! Fan-out/fan-in with child runs and a deadline: an order run starts one
//! shipment run per parcel and continues when all are done; each shipment
//! has a deadline, and one parcel's carrier never answers, so that child
//! times out and reaches the order as a `timed_out:` failure.
//!
//! Shows: `StepOutcome::SpawnChildren`, `Step::children` (the outcomes in
//! spawn order), `ChildSpec::deadline`, a parent's status while it waits,
//! on an in-memory store.
//!
//! ```text
//! cargo run --example children
//! ```

use std::sync::Arc;
use std::time::Duration;

use waymark::taquba::Queue;
use waymark::taquba::object_store::memory::InMemory;
use waymark::{
    ChildSpec, Deadline, NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner,
    TerminalStatus, WorkflowRuntime,
};

const PARCELS: [&str; 4] = ["books", "lamp", "stuck-at-customs", "socks"];

struct Shop;

impl StepRunner for Shop {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        match (step.workflow.as_str(), step.step_number) {
            // The order: one shipment per parcel, each with a 1 s deadline.
            ("order", 0) => Ok(StepOutcome::SpawnChildren {
                children: PARCELS
                    .iter()
                    .map(|parcel| ChildSpec {
                        workflow: Some("shipment".into()),
                        input: parcel.as_bytes().to_vec(),
                        id_suffix: Some(parcel.to_string()),
                        deadline: Some(Deadline::After(Duration::from_secs(1))),
                        ..Default::default()
                    })
                    .collect(),
                payload: b"all parcels handled".to_vec(),
                fail_fast: false,
            }),
            // The join: every shipment's outcome, in spawn order.
            ("order", _) => {
                let mut shipped = 0;
                for child in &step.children {
                    match child.status {
                        TerminalStatus::Succeeded => {
                            shipped += 1;
                            println!("  {}: shipped", child.run_id);
                        }
                        _ => println!(
                            "  {}: {}",
                            child.run_id,
                            child.error.as_deref().unwrap_or("failed")
                        ),
                    }
                }
                Ok(StepOutcome::Succeed {
                    result: format!("{shipped} of {} shipped", step.children.len()).into_bytes(),
                })
            }
            // A shipment: hand the parcel to the carrier. One never answers;
            // its deadline stops it (the cancel token fires).
            _ => {
                if step.payload == b"stuck-at-customs" {
                    step.cancel_token.cancelled().await;
                }
                Ok(StepOutcome::Succeed {
                    result: b"tracking-123".to_vec(),
                })
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), waymark::Error> {
    let queue = Arc::new(Queue::open(Arc::new(InMemory::new()), "shop").await?);
    let rt = WorkflowRuntime::builder(queue, Shop, NoopTerminalHook)
        .poll_interval(Duration::from_millis(50))
        .build()?;
    let worker = tokio::spawn({
        let rt = rt.clone();
        async move { rt.run(std::future::pending()).await }
    });
    rt.submit(RunSpec {
        run_id: Some("order-7".into()),
        workflow: Some("order".into()),
        ..Default::default()
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    if let Some(status) = rt.status("order-7").await? {
        println!(
            "order-7 is at step {}: {:?}, {} shipment(s) still running",
            status.current_step,
            status.state,
            status.children_live.unwrap_or(0)
        );
    }
    let outcome = rt.wait("order-7").await?;
    println!(
        "order-7 {:?}: {}",
        outcome.status,
        String::from_utf8_lossy(outcome.result.as_deref().unwrap_or_default())
    );
    worker.abort();
    Ok(())
}
