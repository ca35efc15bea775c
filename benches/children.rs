//! What child runs cost.
//!
//! ```text
//! cargo bench --bench children             # full: 5 rounds, fan-out 100
//! cargo bench --bench children -- --quick  # smoke run: 1 round
//! ```
//!
//! On a memory store at a 1 ms flush, one worker (16 slots), maintenance
//! tick an hour (it adds nothing):
//!
//! 1. **Awaited commits** (SlateDB write batches − claim batches, taquba's
//!    `metrics` feature, as in the `steps` benchmark) of a parent that
//!    spawns 10 one-step children and joins them, against a plain two-step
//!    run and ten independent one-step runs (each counted from its submit to
//!    its end). The target: spawning costs nothing beyond the parent's own
//!    settlement, each child what a run costs (less its submit, which is in
//!    the parent's settlement).
//! 2. **Steps/s** of a parent with 100 one-step children (102 steps) against
//!    100 independent one-step runs submitted at once, wall clock.

// Shared with the `steps` benchmark, which uses all of it.
#[allow(dead_code)]
#[path = "steps/counters.rs"]
mod counters;

use std::sync::Arc;
use std::time::{Duration, Instant};

use taquba::object_store::memory::InMemory;
use taquba::{OpenOptions, Queue};
use waymark::{
    ChildSpec, NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner, TerminalStatus,
    WorkflowRuntime,
};

/// `parent` step 0 spawns as many children as its input says; step 1
/// checks they all succeeded. `two` continues once; everything else
/// succeeds at once.
#[derive(Clone)]
struct Runner;

impl StepRunner for Runner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        Ok(match (step.workflow.as_str(), step.step_number) {
            ("parent", 0) => {
                let n: usize = String::from_utf8_lossy(&step.payload)
                    .parse()
                    .map_err(|_| StepError::permanent("input is a count"))?;
                StepOutcome::SpawnChildren {
                    children: (0..n)
                        .map(|i| ChildSpec {
                            input: i.to_string().into_bytes(),
                            ..Default::default()
                        })
                        .collect(),
                    payload: vec![],
                    fail_fast: false,
                }
            }
            ("parent", _) => {
                let ok = step
                    .children
                    .iter()
                    .all(|c| c.status == TerminalStatus::Succeeded);
                if !ok {
                    return Err(StepError::permanent("a child failed"));
                }
                StepOutcome::Succeed { result: vec![] }
            }
            ("two", 0) => StepOutcome::Continue { payload: vec![] },
            _ => StepOutcome::Succeed { result: vec![] },
        })
    }
}

type Rt = WorkflowRuntime<Runner, NoopTerminalHook>;

async fn runtime() -> (
    Rt,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let opts = OpenOptions {
        flush_interval: Some(Duration::from_millis(1)),
        ..Default::default()
    };
    let queue = Arc::new(
        Queue::open_with_options(Arc::new(InMemory::new()), "bench", opts)
            .await
            .expect("open queue"),
    );
    let rt = WorkflowRuntime::builder(queue, Runner, NoopTerminalHook)
        .max_concurrent_steps(16)
        .poll_interval(Duration::from_secs(3600))
        .build()
        .expect("valid settings");
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn({
        let (rt, stop) = (rt.clone(), stop.clone());
        async move {
            rt.run(stop.cancelled_owned()).await.expect("worker");
        }
    });
    (rt, stop, worker)
}

async fn run(rt: &Rt, id: &str, workflow: &str, input: &[u8]) {
    rt.submit(RunSpec {
        run_id: Some(id.into()),
        input: input.to_vec(),
        workflow: Some(workflow.into()),
        ..Default::default()
    })
    .await
    .expect("submit");
    let out = rt.wait(id).await.expect("wait");
    assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 1 } else { 5 };
    let counting = counters::install();
    let commits = || counting.snapshot().awaited_commits();

    let (rt, stop, worker) = runtime().await;
    let (mut fan, mut two, mut ten) = (0u64, 0u64, 0u64);
    for r in 0..rounds {
        let at = commits();
        run(&rt, &format!("fan{r}"), "parent", b"10").await;
        fan += commits() - at;
        let at = commits();
        run(&rt, &format!("two{r}"), "two", b"").await;
        two += commits() - at;
        let at = commits();
        for i in 0..10 {
            run(&rt, &format!("one{r}.{i}"), "one", b"").await;
        }
        ten += commits() - at;
    }
    let per = |v: u64| v as f64 / rounds as f64;
    println!("### children: awaited commits, memory store, 1 ms flush ({rounds} rounds)");
    println!();
    println!("| run | awaited commits |");
    println!("|---|---:|");
    println!(
        "| parent + 10 one-step children, fan-out/fan-in | {:.1} |",
        per(fan)
    );
    println!("| a plain two-step run | {:.1} |", per(two));
    println!(
        "| 10 independent one-step runs (submit included) | {:.1} |",
        per(ten)
    );
    println!(
        "| spawning and joining, beyond those (the children's submits are in the parent's settlement: −10) | {:.1} |",
        per(fan) - per(two) - per(ten) + 10.0
    );
    println!();

    let n = 100usize;
    let started = Instant::now();
    run(&rt, "wide", "parent", n.to_string().as_bytes()).await;
    let fanned = started.elapsed();
    let started = Instant::now();
    for i in 0..n {
        rt.submit(RunSpec {
            run_id: Some(format!("alone{i}")),
            workflow: Some("one".into()),
            ..Default::default()
        })
        .await
        .expect("submit");
    }
    for i in 0..n {
        let out = rt.wait(&format!("alone{i}")).await.expect("wait");
        assert_eq!(out.status, TerminalStatus::Succeeded);
    }
    let alone = started.elapsed();
    println!("### children: {n} children against {n} runs, 16 slots");
    println!();
    println!("| shape | steps | wall | steps/s |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, steps: usize, took: Duration| {
        println!(
            "| {name} | {steps} | {:.0} ms | {:.0} |",
            took.as_secs_f64() * 1000.0,
            steps as f64 / took.as_secs_f64()
        );
    };
    row("a parent with 100 children (2 + 100 steps)", n + 2, fanned);
    row("100 independent runs (submitted one by one)", n, alone);
    stop.cancel();
    worker.await.expect("worker task");
}
