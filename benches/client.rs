//! What a request from another process costs: a `Client` and a worker on
//! one local-disk store (a temporary directory), in one process but
//! through the same paths as two processes (the client's requests go
//! through inbox objects, its reads through a `QueueReader`).
//!
//! ```text
//! cargo bench --bench client             # full (a few minutes)
//! cargo bench --bench client -- --quick  # smoke run: checks completion
//! ```
//!
//! - `submit → visible`: from `Client::submit` to the run being visible to
//!   the same client (`status` answers), one request at a time;
//! - `cancel → Cancelled`: from `Client::cancel` of a live (scheduled) run
//!   to the client reading its `Cancelled` outcome;
//! - `16 clients`: 16 clients each send a batch of submits back to back,
//!   then wait for every reply; runs/s from the first send to the last reply.
//!
//! Each at the default settings and at the tightest settings recommended
//! (see `BENCHMARKS.md` for what bounds them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use waymark::{
    Client, ClientOptions, NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner,
    StoreLocation, StoreOptions, TerminalStatus, WorkflowRuntime, open_worker_store,
};

/// Every run waits an hour after step 0: it stays live (to be cancelled).
struct Sleeper;

impl StepRunner for Sleeper {
    async fn run_step(&self, _step: &Step) -> Result<StepOutcome, StepError> {
        Ok(StepOutcome::ContinueAfter {
            payload: Vec::new(),
            delay: Duration::from_secs(3600),
        })
    }
}

struct Setting {
    name: &'static str,
    flush: Duration,
    touch_poll: Duration,
    refresh: Duration,
}

const SETTINGS: [Setting; 2] = [
    Setting {
        name: "default",
        flush: Duration::from_millis(10),
        touch_poll: Duration::from_millis(250),
        refresh: Duration::from_millis(500),
    },
    Setting {
        name: "tight",
        flush: Duration::from_millis(10),
        touch_poll: Duration::from_millis(50),
        refresh: Duration::from_millis(50),
    },
];

const GUARD: Duration = Duration::from_secs(120);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Poll `f` every millisecond until it holds.
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + GUARD;
    while !f().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn bench(setting: &Setting, samples: usize, per_client: usize) -> [String; 3] {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("file://{}/store", dir.path().display());
    let location = StoreLocation::from_url(&url).expect("the store URL");
    let options = StoreOptions::default()
        .flush_interval(setting.flush)
        .inbox_touch_poll(setting.touch_poll);
    let queue = open_worker_store(&location, options)
        .await
        .expect("open the store");
    let runtime = WorkflowRuntime::builder(queue, Sleeper, NoopTerminalHook)
        .max_concurrent_steps(64)
        .build()
        .expect("build the runtime");
    let worker = tokio::spawn({
        let runtime = runtime.clone();
        async move { runtime.run(std::future::pending()).await }
    });
    let client_options = || ClientOptions::default().refresh_interval(setting.refresh);
    let client = Client::open(&location, client_options())
        .await
        .expect("open the client");

    let mut visible = Vec::new();
    let mut cancelled = Vec::new();
    for i in 0..samples {
        let run_id = format!("{}-{i}", setting.name);
        let start = Instant::now();
        client
            .submit(RunSpec {
                run_id: Some(run_id.clone()),
                ..Default::default()
            })
            .await
            .expect("submit");
        until("the run is visible", || async {
            client.status(&run_id).await.expect("status").is_some()
        })
        .await;
        visible.push(ms(start.elapsed()));

        let start = Instant::now();
        client.cancel(&run_id).await.expect("cancel");
        until("the run is cancelled", || async {
            client
                .outcome(&run_id)
                .await
                .expect("outcome")
                .is_some_and(|o| o.status == TerminalStatus::Cancelled)
        })
        .await;
        cancelled.push(ms(start.elapsed()));
    }

    // 16 clients, each sending a batch back to back, then waiting for all.
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(Arc::new(
            Client::open(&location, client_options())
                .await
                .expect("open a client"),
        ));
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, client) in clients.iter().enumerate() {
        let client = client.clone();
        let name = setting.name;
        tasks.spawn(async move {
            let mut sent = Vec::new();
            for i in 0..per_client {
                sent.push(
                    client
                        .submit(RunSpec {
                            run_id: Some(format!("{name}-c{c}-{i}")),
                            ..Default::default()
                        })
                        .await
                        .expect("submit"),
                );
            }
            let sent_at = start.elapsed();
            for s in &sent {
                client
                    .wait_reply(&s.request_id, GUARD)
                    .await
                    .expect("a reply");
            }
            sent_at
        });
    }
    let mut send_time = Duration::ZERO;
    while let Some(t) = tasks.join_next().await {
        send_time = send_time.max(t.expect("a client task"));
    }
    let elapsed = start.elapsed();
    let total = 16 * per_client;
    worker.abort();

    visible.sort_by(f64::total_cmp);
    cancelled.sort_by(f64::total_cmp);
    let knobs = format!(
        "flush {:?}, touch poll {:?}, refresh {:?}",
        setting.flush, setting.touch_poll, setting.refresh
    );
    [
        format!(
            "| submit → visible | {} ({knobs}) | {samples} | {:.0} / {:.0} |",
            setting.name,
            percentile(&visible, 0.5),
            percentile(&visible, 0.99)
        ),
        format!(
            "| cancel → Cancelled | {} ({knobs}) | {samples} | {:.0} / {:.0} |",
            setting.name,
            percentile(&cancelled, 0.5),
            percentile(&cancelled, 0.99)
        ),
        format!(
            "| 16 clients × {per_client} submits | {} ({knobs}) | {total} | {:.0} runs/s to the last reply ({:.0} sends/s) |",
            setting.name,
            total as f64 / elapsed.as_secs_f64(),
            total as f64 / send_time.as_secs_f64().max(1e-9),
        ),
    ]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (samples, per_client) = if quick { (5, 10) } else { (100, 100) };
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let started = Instant::now();
    let mut rows = Vec::new();
    for setting in &SETTINGS {
        rows.extend(rt.block_on(bench(setting, samples, per_client)));
    }
    println!(
        "\n#### client: requests from another process ({} mode, {:.0} s; local disk; latency p50 / p99 in ms)\n",
        if quick { "quick" } else { "full" },
        started.elapsed().as_secs_f64()
    );
    println!("| measurement | setting | samples | p50 / p99 ms, or rate |");
    println!("|---|---|---:|---|");
    for row in rows {
        println!("{row}");
    }
}
