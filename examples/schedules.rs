//! Durable schedules with a circuit breaker: an `every` schedule that syncs
//! a feed whose source fails for a while (its fires are suppressed in the
//! backoff window, then it trips and fires nothing until a reset), a cron
//! schedule that keeps firing beside it, and a manual one fired by hand.
//!
//! Shows: `Schedule::every_seconds`, `Schedule::cron` with a time zone,
//! `Schedule::manual`, `WorkflowRuntimeBuilder::schedule` and `breaker`,
//! `schedules`, `trigger`, `pause_schedule`/`resume_schedule` and
//! `reset_workflow`. Runs on an in-memory store in real time (about 12 s).
//!
//! ```text
//! cargo run --example schedules
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use waymark::taquba::Queue;
use waymark::taquba::object_store::memory::InMemory;
use waymark::{
    BackoffPolicy, NoopTerminalHook, Schedule, ScheduleInfo, Step, StepError, StepOutcome,
    StepRunner, WorkflowRuntime,
};

/// One-step runs; the `feed` workflow fails while its source is down.
struct Runner {
    source_up: Arc<AtomicBool>,
}

impl StepRunner for Runner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        if step.workflow == "feed" && !self.source_up.load(Ordering::SeqCst) {
            return Err(StepError::permanent("feed source: 503"));
        }
        Ok(StepOutcome::Succeed { result: vec![] })
    }
}

fn show(all: &[ScheduleInfo]) {
    for s in all {
        println!(
            "  {:<8} runs {:>2}  last {:<28} outcome {:<22} backoff-suppressed {:>2}  trip-suppressed {:>2}",
            s.id,
            s.run_count,
            s.last_run_id.as_deref().unwrap_or("-"),
            format!("{:?}", s.last_outcome),
            s.suppressed_backoff,
            s.suppressed_tripped,
        );
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let queue = Arc::new(Queue::open(Arc::new(InMemory::new()), "schedules-example").await?);
    let source_up = Arc::new(AtomicBool::new(false));
    let runtime = WorkflowRuntime::builder(
        queue,
        Runner {
            source_up: source_up.clone(),
        },
        NoopTerminalHook,
    )
    .poll_interval(Duration::from_millis(50))
    .schedule(Schedule::every_seconds("feed", 1).workflow("feed"))
    .schedule(
        Schedule::cron("report", "*/2 * * * * *")
            .time_zone("Europe/Paris")
            .workflow("report")
            .input_fn(|at| format!("report for {at:?}").into_bytes()),
    )
    .schedule(Schedule::manual("rebuild").workflow("rebuild"))
    // Two failures in a row trip `feed`; the first one backs it off 2 s.
    .breaker(
        "feed",
        BackoffPolicy {
            initial: Duration::from_secs(2),
            jitter: 0.0,
            streak_limit: Some(2),
            ..BackoffPolicy::default()
        },
    )
    .build()?;
    let worker = tokio::spawn({
        let runtime = runtime.clone();
        async move { runtime.run(std::future::pending()).await }
    });

    let run = runtime.trigger("rebuild").await?;
    println!("triggered `rebuild` by hand: run {run}");

    println!("the feed source is down; after 6 s:");
    tokio::time::sleep(Duration::from_secs(6)).await;
    show(&runtime.schedules().await?);

    println!("the source is back and an operator resets `feed`; after 4 s:");
    source_up.store(true, Ordering::SeqCst);
    runtime.reset_workflow("feed").await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    show(&runtime.schedules().await?);

    runtime.pause_schedule("report").await?;
    println!("`report` paused (durably); after 2 s it has not fired:");
    tokio::time::sleep(Duration::from_secs(2)).await;
    show(&runtime.schedules().await?);
    runtime.resume_schedule("report").await?;

    worker.abort();
    Ok(())
}
