//! A per-workflow circuit breaker: a workflow whose downstream is down trips
//! and parks its steps, while another workflow on the same queue keeps
//! running; a reset releases the parked steps at once.
//!
//! Shows: `RunSpec::workflow`, `BackoffPolicy` with a streak limit,
//! `on_breaker_change`, `workflow_health` and `reset_workflow`. Runs on an
//! in-memory store, so it starts fresh every time.
//!
//! ```text
//! cargo run --example breaker
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use waymark::taquba::Queue;
use waymark::taquba::object_store::memory::InMemory;
use waymark::{
    BackoffPolicy, BreakerEvent, BreakerStatus, NoopTerminalHook, RetryPolicy, RunSpec, Step,
    StepError, StepOutcome, StepRunner, WorkflowRuntime,
};

/// One-step runs. Steps of the `payments` workflow fail while the payment
/// provider is down; `emails` always works.
struct Runner {
    provider_up: Arc<AtomicBool>,
}

impl StepRunner for Runner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        if step.workflow == "payments" && !self.provider_up.load(Ordering::SeqCst) {
            return Err(StepError::transient("payment provider: 503"));
        }
        Ok(StepOutcome::Succeed {
            result: format!("{} done", step.run_id).into_bytes(),
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let queue = Arc::new(Queue::open(Arc::new(InMemory::new()), "breaker-example").await?);
    let provider_up = Arc::new(AtomicBool::new(false));
    let runtime = WorkflowRuntime::builder(
        queue,
        Runner {
            provider_up: provider_up.clone(),
        },
        NoopTerminalHook,
    )
    .poll_interval(Duration::from_millis(20))
    // Quick retries, so the example runs in a second.
    .default_retry_policy(RetryPolicy {
        initial: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        max_attempts: 20,
        ..RetryPolicy::default()
    })
    // Three failures in a row trip `payments`; until then each failure
    // backs it off briefly.
    .breaker(
        "payments",
        BackoffPolicy {
            initial: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            streak_limit: Some(3),
            ..BackoffPolicy::default()
        },
    )
    .on_breaker_change(|event| match event {
        BreakerEvent::Tripped {
            workflow,
            streak,
            last_error,
        } => println!("breaker: {workflow} tripped after {streak} failures ({last_error})"),
        BreakerEvent::Closed { workflow, .. } => println!("breaker: {workflow} closed"),
        _ => {}
    })
    .build()?;

    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let runtime = runtime.clone();
        let stop = stop.clone();
        async move { runtime.run(stop.cancelled_owned()).await }
    });

    for (id, workflow) in [
        ("pay-1", "payments"),
        ("pay-2", "payments"),
        ("mail-1", "emails"),
        ("mail-2", "emails"),
    ] {
        runtime
            .submit(RunSpec {
                run_id: Some(id.into()),
                workflow: Some(workflow.into()),
                ..Default::default()
            })
            .await?;
    }

    // The emails finish while payments fail and trip.
    for id in ["mail-1", "mail-2"] {
        let out = runtime.wait(id).await?;
        println!("{id}: {:?}", out.status);
    }
    loop {
        let health = runtime.workflow_health("payments").await?;
        if let Some(h) = health
            && let BreakerStatus::Tripped { streak, .. } = h.status
        {
            let parked = runtime.status("pay-1").await?.map(|s| s.state);
            println!("payments tripped (streak {streak}); pay-1 is {parked:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The provider is back: an operator resets the breaker.
    provider_up.store(true, Ordering::SeqCst);
    runtime.reset_workflow("payments").await?;
    for id in ["pay-1", "pay-2"] {
        let out = runtime.wait(id).await?;
        println!("{id}: {:?}", out.status);
    }
    for h in runtime.workflows().await? {
        println!(
            "{}: {} succeeded, {} failed, streak {}",
            h.name, h.runs_succeeded, h.runs_failed, h.failure_streak
        );
    }

    stop.cancel();
    worker.await??;
    Ok(())
}
