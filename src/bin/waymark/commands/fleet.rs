//! A fleet on one location: `waymark worker --shards N` ([`work`]) joins
//! the fleet of N shards there (creating it if there is none) and runs the
//! demo's order pipeline on every shard it holds; `waymark fleet`
//! ([`status`]) shows each shard's owner, lease and backlog.
//!
//! A fleet worker prints one line per fact once it is durable, as
//! `waymark worker` does, and one line each time it takes, hands back or
//! drops a shard. Ctrl-C or SIGTERM hands every shard back gracefully (its
//! steps in flight commit, its store closes, its lease is released, so
//! another worker takes it at once); a second one skips the rest of the
//! steps' simulated work; a third quits at once (the leases then lapse and
//! are taken over after lease + guard). A stop request while it opens or
//! reads the shards to confirm steps stops that at once (and counts); once
//! the worker has stopped, the runs it did not confirm are named on stderr.
//! A worker that dropped a shard
//! instead of handing it back (its runtime failed, its lease was taken or
//! lapsed) exits 1, naming each such shard and why. A location holding a
//! single store is refused, and a fleet of another shard count too:
//! nothing is ever reinterpreted. Every shard's runtime is given the `--schedule`s, and each
//! schedule fires on its home shard only (`shard_of_schedule`), under run
//! ids that route there; `--trip-after` gives each shard its own breaker
//! (a schedule is gated by its home shard's).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use waymark::fleet::{
    FleetClient, FleetManifest, FleetStatus, FleetWorker, LeaseTiming, MAX_SHARDS, ShardEvent,
};

use super::read::{print_json, table};
use super::worker::WorkerArgs;
use crate::demo::domain::OrderPipeline;
use crate::demo::progress::Tracker;
use crate::demo::ui::Ui;
use crate::demo::{OutcomeHook, Reads, confirm_waiting, try_build_runtime};
use crate::plumbing::exit::{CliError, CliResult, Exit, one_line, shown};
use crate::plumbing::output::{say, say_err, suggest};
use crate::plumbing::signals::{Signals, unless_stopped};
use crate::plumbing::store::{DEFAULT_STEP_QUEUE, Store, StoreArgs, Use};
use crate::plumbing::telemetry::{init_logging, install_prometheus, serve_metrics};
use crate::plumbing::writer::worker_store_options;

/// `waymark fleet`'s arguments.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Print JSON instead of text, for scripts.
    #[arg(long)]
    pub json: bool,
    /// Where the fleet lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark fleet`: the fleet's shards, owners, leases and backlogs.
pub async fn status(args: FleetArgs) -> CliResult<Exit> {
    let store = Store::locate(&args.store)?;
    let location = store.location()?;
    let read = FleetStatus::read(&location, DEFAULT_STEP_QUEUE);
    let fleet = match tokio::time::timeout(store.timeout, read).await {
        Ok(Ok(fleet)) => fleet,
        Ok(Err(waymark::Error::NotAWaymarkStore { .. })) => {
            let held = if store.has_single_store().await? {
                " (it holds a single store: use the other commands on it)"
            } else {
                ""
            };
            let mut worker = vec!["worker"];
            let store_args = store.args();
            worker.extend(store_args.iter().map(String::as_str));
            worker.extend(["--shards", "N"]);
            return Err(CliError::not_found(format!(
                "no fleet at {}{held}; a fleet worker creates one: {}",
                store.shown(),
                suggest(&worker)
            )));
        }
        Ok(Err(e)) => {
            return Err(CliError::failure(format!(
                "cannot read the fleet at {}: {e}",
                store.shown()
            )));
        }
        Err(_) => return Err(store.timed_out("reading the fleet")),
    };
    let now = SystemTime::now();
    if args.json {
        print_json(&fleet_json(&fleet, now))?;
        return partly_read(&fleet);
    }
    let held = fleet.shards.iter().filter(|s| s.owner().is_some()).count();
    let mut owners: Vec<&str> = fleet.shards.iter().filter_map(|s| s.owner()).collect();
    owners.sort_unstable();
    owners.dedup();
    say!(
        "fleet at {}: {} shards, {held} held by {} worker(s)",
        store.shown(),
        fleet.manifest.shards,
        owners.len()
    );
    let dash = || "-".to_string();
    let rows: Vec<[String; 8]> = fleet
        .shards
        .iter()
        .map(|s| {
            let (owner, epoch, lease) = match &s.lease {
                None => (dash(), dash(), "never taken".to_string()),
                Some(l) if l.released => (l.owner.clone(), l.epoch.to_string(), "released".into()),
                Some(l) => (l.owner.clone(), l.epoch.to_string(), "held".into()),
            };
            let age = s
                .lease_age(now)
                .map_or_else(dash, |age| format!("{:.1}s", age.as_secs_f64()));
            let (ready, claimed, scheduled) = match s.backlog {
                Some(b) => (
                    b.ready.to_string(),
                    b.claimed.to_string(),
                    b.scheduled.to_string(),
                ),
                None => (dash(), dash(), dash()),
            };
            [
                s.shard.to_string(),
                owner,
                lease,
                epoch,
                age,
                ready,
                claimed,
                scheduled,
            ]
        })
        .collect();
    table(
        &[
            "SHARD",
            "OWNER",
            "LEASE",
            "EPOCH",
            "AGE",
            "READY",
            "CLAIMED",
            "SCHEDULED",
        ],
        &rows,
    );
    for s in &fleet.shards {
        for problem in &s.problems {
            say_err!("shard {}: cannot read {}", s.shard, one_line(problem));
        }
    }
    partly_read(&fleet)
}

/// Exit 0 when every shard was read in full; otherwise exit 1 saying so
/// (the problems are on stderr, or in the JSON's `problems`).
fn partly_read(fleet: &FleetStatus) -> CliResult<Exit> {
    match fleet
        .shards
        .iter()
        .filter(|s| !s.problems.is_empty())
        .count()
    {
        0 => Ok(Exit::Ok),
        n => Err(CliError::failure(format!(
            "{n} shard(s) could not be read in full; the others are shown"
        ))),
    }
}

/// `waymark fleet --json`.
fn fleet_json(fleet: &FleetStatus, now: SystemTime) -> Value {
    let shards: Vec<Value> = fleet
        .shards
        .iter()
        .map(|s| {
            let lease = s.lease.as_ref().map(|l| {
                json!({
                    "owner": l.owner,
                    "epoch": l.epoch,
                    "released": l.released,
                    "age_ms": s.lease_age(now).map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
                })
            });
            let backlog = s.backlog.map(|b| {
                json!({ "ready": b.ready, "claimed": b.claimed, "scheduled": b.scheduled })
            });
            json!({
                "shard": s.shard,
                "owner": s.owner(),
                "lease": lease,
                "backlog": backlog,
                "problems": s.problems,
            })
        })
        .collect();
    json!({ "shard_count": fleet.manifest.shards, "shards": shards })
}

/// The lease timing from the flags (the library's defaults otherwise).
fn timing(args: &WorkerArgs) -> CliResult<LeaseTiming> {
    let default = LeaseTiming::default();
    let timing = LeaseTiming {
        duration: args
            .lease_ms
            .map_or(default.duration, Duration::from_millis),
        guard: args.guard_ms.map_or(default.guard, Duration::from_millis),
    };
    timing
        .validate()
        .map_err(|e| CliError::usage(format!("--lease-ms/--guard-ms: {e}")))?;
    Ok(timing)
}

/// `waymark worker --shards N`: join (or create) the fleet and run the
/// shards this worker holds until Ctrl-C or SIGTERM.
pub async fn work(args: WorkerArgs, shards: u32) -> CliResult<Exit> {
    if shards == 0 || shards > MAX_SHARDS {
        return Err(CliError::usage(format!(
            "--shards: a fleet has 1 to {MAX_SHARDS} shards, not {shards}"
        )));
    }
    let timing = timing(&args)?;
    let store = Store::locate(&args.store)?;
    store.preflight(Use::Write)?;
    store.create_local()?;
    let location = store.location()?;
    // Never reinterpret a single store as a fleet.
    if store.fleet().await?.is_none() && store.has_single_store().await? {
        let mut worker = vec!["worker"];
        let store_args = store.args();
        worker.extend(store_args.iter().map(String::as_str));
        return Err(CliError::refused(format!(
            "{} holds a single store, not a fleet; --shards would misread it. Run a single \
             worker on it ({}) or put the fleet at another location",
            store.shown(),
            suggest(&worker)
        )));
    }
    let opening = FleetManifest::open_or_create(&location, shards);
    let manifest = match tokio::time::timeout(store.timeout, opening).await {
        Ok(Ok(manifest)) => manifest,
        Ok(Err(e @ waymark::Error::FleetMismatch { .. })) => {
            return Err(CliError::refused(e.to_string()));
        }
        Ok(Err(e)) => {
            return Err(CliError::failure(format!(
                "cannot open the fleet at {}: {e}",
                store.shown()
            )));
        }
        Err(_) => return Err(store.timed_out("opening the fleet")),
    };
    init_logging();
    let stop = CancellationToken::new();
    if let Some(addr) = args.metrics {
        let handle = install_prometheus()?;
        let bound = serve_metrics(addr, handle, stop.clone()).await?;
        say!("metrics at http://{bound}/metrics");
    }
    let (work_tx, mut work_rx) = mpsc::unbounded_channel();
    let (end_tx, mut end_rx) = mpsc::unbounded_channel();
    let (event_tx, mut event_rx) = mpsc::unbounded_channel();
    let hurry = CancellationToken::new();
    let (store_timeout, trip_after) = (store.timeout, args.trip_after);
    // Every shard's runtime gets every schedule; the fleet worker keeps
    // only those homed on its shard, so each fires once for the fleet.
    let schedules = args.schedules.clone();
    let worker = FleetWorker::new(location.clone(), shards, {
        let hurry = hurry.clone();
        move |_shard, queue| {
            try_build_runtime(
                queue,
                store_timeout,
                OrderPipeline::new(work_tx.clone(), hurry.clone()),
                OutcomeHook::new(end_tx.clone()),
                schedules.clone(),
                trip_after,
            )
        }
    })
    .lease_timing(timing)
    .store_options(|_| worker_store_options())
    .events(event_tx);
    let id = worker.id().to_string();
    let mut signals = Signals::listen()?;
    let mut running = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
    say!(
        "fleet worker {id} on {} ({shards} shards): running the demo's order pipeline on the \
         shards it holds; Ctrl-C or SIGTERM hands them back once the steps in flight commit.",
        store.shown()
    );
    let ui = Ui::Lines;
    let started = Instant::now();
    // The shards it dropped instead of handing them back: how many times,
    // and the last reason.
    let mut dropped: BTreeMap<u32, (usize, String)> = BTreeMap::new();
    let mut shown = |event: &ShardEvent| {
        let stamp = format!("[{:>5.1}s]", started.elapsed().as_secs_f64());
        match event {
            ShardEvent::Took { shard, epoch } => {
                say!("{stamp} took shard {shard} (lease epoch {epoch})")
            }
            ShardEvent::HandedBack { shard } => say!("{stamp} handed shard {shard} back"),
            ShardEvent::Dropped { shard, reason } => {
                let reason = one_line(reason);
                say!("{stamp} dropped shard {shard}: {reason}");
                let entry = dropped.entry(*shard).or_default();
                entry.0 += 1;
                entry.1 = reason;
            }
            other => say!("{stamp} {other:?}"),
        }
    };
    let mut tracker = Tracker::default();
    // Opened once every shard exists (the readers for confirmations).
    let mut reads: Option<FleetClient> = None;
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
            Some(event) = event_rx.recv() => {
                shown(&event);
                None
            }
            _ = tick.tick() => 'tick: {
                if reads.is_none() && !tracker.awaiting().is_empty() {
                    // A stop request during the open stops it and counts
                    // (a failed open is tried again at the next tick).
                    match unless_stopped(store.open_fleet_client(&manifest), signals.next()).await
                    {
                        Ok(opened) => reads = opened.ok(),
                        Err(by) => break 'tick Some(by),
                    }
                }
                match &reads {
                    // A stop request during the reads stops them and
                    // counts (the runs left are read again later).
                    Some(fleet) => {
                        let confirmed = confirm_waiting(
                            &mut tracker,
                            Reads::Fleet(fleet),
                            &store,
                            signals.next(),
                        )
                        .await;
                        for fact in confirmed.facts {
                            ui.show(&fact, started.elapsed());
                        }
                        confirmed.interrupted.map(|cut| cut.by)
                    }
                    None => None,
                }
            },
            signal = signals.next() => Some(signal),
            joined = &mut running => break joined,
        };
        let Some(signal) = press else { continue };
        presses += 1;
        match presses {
            1 => {
                stopping = true;
                stop.cancel();
                say!(
                    "{signal}: stopping; the steps in flight finish and commit, then every \
                     shard is handed back."
                );
            }
            2 => {
                hurry.cancel();
                say!("{signal} again: skipping the rest of the steps' simulated work.");
            }
            _ => {
                say_err!(
                    "Quitting at once; the steps in flight run again once the shards' leases \
                     lapse and another worker takes them."
                );
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
    while let Ok(event) = event_rx.try_recv() {
        shown(&event);
    }
    // The fleet worker has stopped: a stop request now stops the open and
    // the reads, naming the runs left unconfirmed.
    if reads.is_none() && !tracker.awaiting().is_empty() {
        match unless_stopped(store.open_fleet_client(&manifest), signals.next()).await {
            Ok(Ok(fleet)) => reads = Some(fleet),
            Ok(Err(e)) => say_err!("{}", unconfirmed(&e.to_string(), &tracker.awaiting())),
            Err(by) => {
                let what = format!("{by}: stopped opening the fleet's shards for reading");
                say_err!("{}", unconfirmed(&what, &tracker.awaiting()));
            }
        }
    }
    if let Some(fleet) = &reads {
        let confirmed =
            confirm_waiting(&mut tracker, Reads::Fleet(fleet), &store, signals.next()).await;
        for fact in confirmed.facts {
            ui.show(&fact, started.elapsed());
        }
        if let Some(cut) = confirmed.interrupted {
            say_err!("{}", cut.message(&store));
        }
        store.close_reader(fleet.close()).await;
    }
    match joined {
        Ok(Ok(())) if stopping => {}
        Ok(Ok(())) => return Err(CliError::failure("the fleet worker stopped unexpectedly")),
        Ok(Err(e)) => {
            return Err(CliError::failure(format!("the fleet worker stopped: {e}")));
        }
        Err(e) => {
            return Err(CliError::failure(format!(
                "the fleet worker's task failed: {e}"
            )));
        }
    }
    if dropped.is_empty() {
        say!(
            "fleet worker stopped; its shards are handed back and everything it ran is committed."
        );
        return Ok(Exit::Ok);
    }
    say!("fleet worker stopped; the shards it dropped are taken over once their leases lapse.");
    Err(CliError::failure(dropped_shards(&dropped)))
}

/// What a fleet worker says of the runs whose last step it could not
/// confirm (`why`: the open of its readers failed or was stopped).
fn unconfirmed(why: &str, runs: &[String]) -> String {
    let ids: Vec<String> = runs.iter().map(|id| shown(id)).collect();
    format!(
        "{why}; not confirmed whether the last step of {} run(s) committed: {}",
        ids.len(),
        ids.join(", ")
    )
}

/// What a fleet worker that dropped shards (shard -> times, last reason)
/// says on its way out: each shard and why.
fn dropped_shards(dropped: &BTreeMap<u32, (usize, String)>) -> String {
    let each: Vec<String> = dropped
        .iter()
        .map(|(shard, (times, reason))| match times {
            1 => format!("shard {shard}: {reason}"),
            _ => format!("shard {shard} ({times} times; the last: {reason})"),
        })
        .collect();
    format!(
        "the fleet worker dropped {} shard(s) instead of handing them back: {}",
        dropped.len(),
        each.join("; ")
    )
}
