//! A memoized charge that survives a crash between the charge and the
//! step's commit: the card is charged once.
//!
//! Shows: `Step::memo` and `Memo::memoized`. The program re-executes itself
//! as a child worker process. The first child charges the card (a stand-in
//! payment provider appends the charge to a ledger file), and its memo
//! records the receipt; before the step can commit, the parent kills the
//! child with SIGKILL. A second child opens the same store: the step runs
//! again, finds the receipt in its memo, does not call the provider, and
//! the run goes on to ship the order. The parent then counts the charges in
//! the ledger: one. The store lives in a fresh temporary directory.
//!
//! ```text
//! cargo run --example payments
//! ```

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use waymark::taquba::object_store::local::LocalFileSystem;
use waymark::taquba::{OpenOptions, Queue};
use waymark::{
    NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner, WorkflowRuntime,
};

/// Set in a child: the store directory.
const CHILD_DIR: &str = "PAYMENTS_CHILD_DIR";
/// Set in a child: `crash` stops after the charge (and waits to be killed).
const CHILD_MODE: &str = "PAYMENTS_CHILD_MODE";

/// The stand-in payment provider: every charge is a line in a ledger file,
/// made durable before the provider answers.
fn charge(ledger: &Path, order: &str, cents: u64) -> std::io::Result<String> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ledger)?;
    let id = format!("ch_{order}_{}", std::process::id());
    writeln!(file, "{id} {order} {cents}")?;
    file.sync_all()?;
    Ok(id)
}

/// Step 0 charges the card (memoized); step 1 ships.
struct Payments {
    ledger: PathBuf,
    crash_after_charge: bool,
}

impl StepRunner for Payments {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let order = step.run_id.clone();
        match step.step_number {
            0 => {
                let receipt: String = step
                    .memo
                    .memoized("charge", || async {
                        println!("child {}: charging the card", std::process::id());
                        charge(&self.ledger, &order, 4200)
                            .map_err(|e| StepError::transient(format!("provider: {e}")))
                    })
                    .await?;
                println!("child {}: receipt {receipt}", std::process::id());
                if self.crash_after_charge {
                    // The charge and its memo are durable; the step's commit
                    // is not. The parent kills this process now.
                    println!("CHARGED");
                    std::future::pending::<()>().await;
                }
                Ok(StepOutcome::Continue {
                    payload: receipt.into_bytes(),
                })
            }
            _ => Ok(StepOutcome::Succeed {
                result: format!(
                    "shipped, paid by {}",
                    String::from_utf8_lossy(&step.payload)
                )
                .into_bytes(),
            }),
        }
    }
}

async fn child(dir: PathBuf, crash: bool) -> Result<(), Box<dyn std::error::Error>> {
    let store = Arc::new(LocalFileSystem::new_with_prefix(dir.join("store"))?);
    let options = OpenOptions {
        flush_interval: Some(Duration::from_millis(10)),
        ..OpenOptions::default()
    };
    let queue = Arc::new(Queue::open_with_options(store, "payments", options).await?);
    let runner = Payments {
        ledger: dir.join("ledger"),
        crash_after_charge: crash,
    };
    let runtime = WorkflowRuntime::builder(queue.clone(), runner, NoopTerminalHook).build()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let runtime = runtime.clone();
        let stop = stop.clone();
        async move { runtime.run(stop.cancelled_owned()).await }
    });
    // Idempotent: the second child attaches to the first child's run.
    let run = runtime
        .submit(RunSpec {
            run_id: Some("order-42".into()),
            input: b"2 books".to_vec(),
            ..Default::default()
        })
        .await?;
    let outcome = runtime.wait(&run.run_id).await?;
    println!(
        "child {}: {:?}: {}",
        std::process::id(),
        outcome.status,
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

fn spawn(dir: &Path, mode: &str) -> std::io::Result<std::process::Child> {
    Command::new(std::env::current_exe()?)
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode)
        .stdout(Stdio::piped())
        .spawn()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let crash = std::env::var(CHILD_MODE).is_ok_and(|m| m == "crash");
        return tokio::runtime::Runtime::new()?.block_on(child(dir.into(), crash));
    }
    let dir = std::env::temp_dir().join(format!("waymark-payments-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("store"))?;

    // The first worker charges, then is killed before the step commits.
    let mut first = spawn(&dir, "crash")?;
    let stdout = first.stdout.take().ok_or("no child stdout")?;
    let mut charged = false;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if line == "CHARGED" {
            charged = true;
            break;
        }
    }
    first.kill()?;
    if !charged {
        return Err("the first worker ended before it charged".into());
    }
    first.wait()?;
    println!("parent: killed the first worker (SIGKILL) between the charge and the commit");

    // The second worker runs the step again: the memo has the receipt.
    let mut second = spawn(&dir, "finish")?;
    let stdout = second.stdout.take().ok_or("no child stdout")?;
    for line in BufReader::new(stdout).lines() {
        println!("{}", line?);
    }
    if !second.wait()?.success() {
        return Err("the second worker failed".into());
    }

    let charges = std::fs::read_to_string(dir.join("ledger"))?.lines().count();
    println!("parent: the provider's ledger has {charges} charge(s)");
    std::fs::remove_dir_all(&dir)?;
    if charges != 1 {
        return Err(format!("charged {charges} times").into());
    }
    Ok(())
}
