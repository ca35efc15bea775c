//! The smallest complete Waymark program: a run that counts down, one step
//! per number, on a local directory (`./countdown-data`).
//!
//! Shows: a `StepRunner`, the worker pool (`run`), an idempotent submit with a
//! fixed run id, and `wait`. Run it twice: the second time the submit attaches
//! to the finished run and prints its stored outcome at once.
//!
//! ```text
//! cargo run --example countdown
//! ```

use std::sync::Arc;
use std::time::Duration;

use waymark::taquba::object_store::local::LocalFileSystem;
use waymark::taquba::{OpenOptions, Queue};
use waymark::{
    NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner, WorkflowRuntime,
};

/// Counts down from the number in the payload.
struct Countdown;

impl StepRunner for Countdown {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let n: u32 = std::str::from_utf8(&step.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StepError::permanent("the payload is not a number"))?;
        println!("step {}: {n}", step.step_number);
        Ok(if n == 0 {
            StepOutcome::Succeed {
                result: b"liftoff".to_vec(),
            }
        } else {
            StepOutcome::Continue {
                payload: (n - 1).to_string().into_bytes(),
            }
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all("./countdown-data")?;
    let store = Arc::new(LocalFileSystem::new_with_prefix("./countdown-data")?);
    // A short WAL flush interval: each step waits for one flush.
    let options = OpenOptions {
        flush_interval: Some(Duration::from_millis(10)),
        ..OpenOptions::default()
    };
    let queue = Arc::new(Queue::open_with_options(store, "countdown", options).await?);
    let runtime = WorkflowRuntime::builder(queue.clone(), Countdown, NoopTerminalHook).build()?;

    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let runtime = runtime.clone();
        let stop = stop.clone();
        async move { runtime.run(stop.cancelled_owned()).await }
    });

    let run = runtime
        .submit(RunSpec {
            run_id: Some("countdown-1".into()),
            input: b"5".to_vec(),
            ..Default::default()
        })
        .await?;
    println!(
        "run {} ({})",
        run.run_id,
        if run.newly_submitted {
            "new"
        } else {
            "already submitted"
        }
    );
    let outcome = runtime.wait(&run.run_id).await?;
    println!(
        "{:?} at step {}: {}",
        outcome.status,
        outcome.final_step,
        String::from_utf8_lossy(outcome.result.as_deref().unwrap_or_default())
    );

    stop.cancel();
    worker.await??;
    drop(runtime);
    if let Ok(queue) = Arc::try_unwrap(queue) {
        queue.close().await?;
    }
    Ok(())
}
