//! `waymark worker`: a worker pool for a store, running the demo's order
//! pipeline (the built-in runner) on the step queue `demo-orders`. It
//! applies the requests that `waymark submit` / `cancel` send from other
//! processes, and prints one line per fact once it is durable (the same
//! confirmation rules as the demo). It refuses to start while another
//! process writes the store, unless `--force`. With `--schedule` it also
//! fires durable schedules (each fire submits the demo's first order),
//! which `waymark schedules | trigger | pause | resume` read and drive.
//! `--trip-after N` gives the default workflow a circuit breaker;
//! `--metrics ADDR` serves Prometheus metrics; logs go to stderr, filtered
//! by `RUST_LOG`. With `--shards N` it is a fleet worker instead
//! ([`super::fleet`]); without, a fleet's prefix is refused.
//! Ctrl-C or SIGTERM stops
//! claiming and lets the steps in flight commit; a second one skips the rest
//! of their simulated work; a third quits at once. A stop request while it
//! reads the store to confirm steps stops those reads at once; after the
//! pool has stopped, the runs it did not confirm are named on stderr. Closing
//! the store comes last, bounded by `--timeout`; a stop request then quits at
//! once (exit 4), saying the store was not closed cleanly.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use waymark::Schedule;

use crate::commands::schedules::parse_schedule;
use crate::demo::domain::OrderPipeline;
use crate::demo::progress::Tracker;
use crate::demo::ui::Ui;
use crate::demo::{OutcomeHook, Reads, build_runtime, confirm_waiting};
use crate::plumbing::exit::{CliError, CliResult, Exit};
use crate::plumbing::output::{say, say_err};
use crate::plumbing::signals::Signals;
use crate::plumbing::store::{DEFAULT_STEP_QUEUE, Store, StoreArgs, Use};
use crate::plumbing::telemetry::{init_logging, install_prometheus, serve_metrics};
use crate::plumbing::writer::{close_writer, open_writer, refuse_if_live};

/// `waymark worker`'s arguments.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Take the store over even if another process is writing it (that
    /// process is fenced and stops).
    #[arg(long)]
    pub force: bool,
    /// A durable schedule this worker fires, submitting the demo's first
    /// order: ID=manual (only `waymark trigger ID`), ID=every:N[ms|s|m|h]
    /// or ID=cron:EXPR (six fields, with seconds; UTC). Repeatable.
    #[arg(long = "schedule", value_name = "SPEC", value_parser = parse_schedule)]
    pub schedules: Vec<Schedule>,
    /// Serve Prometheus metrics (steps by outcome, retries, parks, trips,
    /// hook deliveries, latencies, steps in flight, backlog) at
    /// http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Give the default workflow a circuit breaker that trips after N
    /// failed attempts in a row (backoff 50 ms; it stays tripped until
    /// `waymark reset` or the dashboard's reset).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub trip_after: Option<u32>,
    /// Join the fleet of N shards at the store's location (creating it if
    /// there is none; a fleet of another N is refused) and run the shards
    /// this worker holds. A location holding a single store is refused.
    #[arg(long, value_name = "N", conflicts_with = "force")]
    pub shards: Option<u32>,
    /// With --shards: how long a lease renewal keeps a shard, in ms
    /// (default 10000; renewed every third of it).
    #[arg(long, value_name = "MS", requires = "shards")]
    pub lease_ms: Option<u64>,
    /// With --shards: the guard time in ms an owner stops before its lease
    /// ends and a taker waits past it (default 2000; under half the lease).
    #[arg(long, value_name = "MS", requires = "shards")]
    pub guard_ms: Option<u64>,
}

/// Run the worker pool until Ctrl-C or SIGTERM.
pub async fn run(args: WorkerArgs) -> CliResult<Exit> {
    if let Some(shards) = args.shards {
        return super::fleet::work(args, shards).await;
    }
    let store = Store::locate(&args.store)?;
    store.preflight(Use::Write)?;
    refuse_if_live(&store, args.force, "starting a worker").await?;
    init_logging();
    let stop = CancellationToken::new();
    if let Some(addr) = args.metrics {
        let handle = install_prometheus()?;
        let bound = serve_metrics(addr, handle, stop.clone()).await?;
        say!("metrics at http://{bound}/metrics");
    }
    let queue = open_writer(&store).await?;
    let (work_tx, mut work_rx) = mpsc::unbounded_channel();
    let (end_tx, mut end_rx) = mpsc::unbounded_channel();
    let hurry = CancellationToken::new();
    let runtime = build_runtime(
        queue.clone(),
        &store,
        OrderPipeline::new(work_tx, hurry.clone()),
        OutcomeHook::new(end_tx),
        args.schedules.clone(),
        args.trip_after,
    )?;
    let client = store.open_single_client().await?;
    let mut signals = Signals::listen()?;
    let mut worker = tokio::spawn({
        let runtime = runtime.clone();
        let stop = stop.clone();
        async move { runtime.run(stop.cancelled_owned()).await }
    });
    say!(
        "worker on {}: running the demo's order pipeline on queue {DEFAULT_STEP_QUEUE}; \
         Ctrl-C or SIGTERM stops it once the steps in flight commit.",
        store.shown()
    );
    let ui = Ui::Lines;
    let started = Instant::now();
    let mut tracker = Tracker::default();
    let mut tick = tokio::time::interval(Duration::from_millis(150));
    let mut presses = 0;
    let mut stopping = false;
    let joined = loop {
        let press = tokio::select! {
            Some(work) = work_rx.recv() => {
                for fact in tracker.work(work) {
                    ui.show(&fact, started.elapsed());
                }
                None
            }
            Some(outcome) = end_rx.recv() => {
                ui.show(&tracker.ended(outcome), started.elapsed());
                None
            }
            _ = tick.tick() => {
                // A stop request during the reads stops them and counts
                // (the runs left are read again later).
                let confirmed = confirm_waiting(
                    &mut tracker,
                    Reads::Client(&client),
                    &store,
                    signals.next(),
                )
                .await;
                for fact in confirmed.facts {
                    ui.show(&fact, started.elapsed());
                }
                confirmed.interrupted.map(|cut| cut.by)
            }
            signal = signals.next() => Some(signal),
            joined = &mut worker => break joined,
        };
        let Some(signal) = press else { continue };
        presses += 1;
        match presses {
            1 => {
                stopping = true;
                stop.cancel();
                say!("{signal}: stopping; the steps in flight finish and commit first.");
            }
            2 => {
                hurry.cancel();
                say!("{signal} again: skipping the rest of the steps' simulated work.");
            }
            _ => {
                say_err!("Quitting at once; the steps in flight run again next time.");
                std::process::exit(4);
            }
        }
    };
    while let Ok(work) = work_rx.try_recv() {
        for fact in tracker.work(work) {
            ui.show(&fact, started.elapsed());
        }
    }
    while let Ok(outcome) = end_rx.try_recv() {
        ui.show(&tracker.ended(outcome), started.elapsed());
    }
    store.close_reader(client.close()).await;
    let result = match joined {
        Ok(Ok(())) if stopping => Ok(Exit::Ok),
        Ok(Ok(())) => Err(CliError::failure("the worker pool stopped unexpectedly")),
        Ok(Err(e)) => Err(CliError::failure(format!(
            "the worker pool stopped: {e} (if another process opened the store, it fenced this one)"
        ))),
        Err(e) => Err(CliError::failure(format!(
            "the worker pool's task failed: {e}"
        ))),
    };
    // The pool has stopped: a stop request now stops these reads.
    let confirmed = confirm_waiting(
        &mut tracker,
        Reads::Runtime(&runtime),
        &store,
        signals.next(),
    )
    .await;
    for fact in confirmed.facts {
        ui.show(&fact, started.elapsed());
    }
    if let Some(cut) = confirmed.interrupted {
        say_err!("{}", cut.message(&store));
    }
    drop(runtime);
    let closed = close_writer(&store, queue, signals.next()).await;
    let code = result?;
    closed?;
    say!("worker stopped; everything it ran is committed.");
    Ok(code)
}
