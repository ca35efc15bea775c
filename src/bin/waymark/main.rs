//! `waymark`: the command-line face of the Waymark workflow runtime.
//!
//! - `waymark demo` runs example order pipelines on a local directory and
//!   shows each step once it is durable (module [`demo`]);
//! - `waymark worker` runs a worker pool for a store (the demo's pipeline);
//!   with `--shards N` it joins (or creates) a fleet of N shards at the
//!   location instead, and `waymark fleet` shows the fleet's shards, owners,
//!   leases and backlogs. On a fleet, `submit | cancel | signal | rerun |
//!   status | outcome | history` go to the run's shard and `runs` lists every
//!   shard; the other commands refuse a fleet (not supported yet);
//! - `waymark submit | cancel | signal | rerun` send requests through the store's
//!   inbox, and `status | outcome | history | runs | workflows | schedules` read
//!   through a reader (and `dead` lists dead jobs); `reset` resets a
//!   workflow's breaker, `requeue` requeues dead jobs, and
//!   `trigger | pause | resume` drive the worker's
//!   schedules through the inbox: none of them opens the store as its
//!   writer, so they work while a worker or the demo runs (module
//!   [`commands`]);
//! - `waymark serve` serves a dashboard, a JSON API and metrics over HTTP,
//!   as a reader and through the inbox (module [`serve`]).
//!
//! The CLI is a folder: [`plumbing`] (store location and checks, timeouts,
//! errors and exit codes, output, signals) is shared by every command; each
//! command group has its module; the demo's domain is apart from its
//! terminal UI.

mod commands;
mod demo;
mod describe;
mod plumbing;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use plumbing::exit::{CliError, EXIT_CODES_HELP, Exit, shown_path};
use plumbing::output::say_err;

/// Waymark: durable workflows on object storage.
///
/// Start with `waymark demo`: it runs example order pipelines on a local
/// directory and shows each step live. Kill it half-way and run it again: the
/// unfinished runs resume where they stopped.
#[derive(Debug, Parser)]
#[command(name = "waymark", version, after_help = EXIT_CODES_HELP)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run eight example orders through a five-step pipeline, live.
    ///
    /// The runs have fixed ids (demo-order-01 .. demo-order-08) and their
    /// state lives in the data directory. Stop the demo at any moment
    /// (Ctrl-C, SIGTERM, even kill -9) and run the same command again:
    /// finished runs print their stored outcome and unfinished runs resume
    /// at the step where they stopped. Each step gets 20 attempts, so
    /// repeated kills do not fail a run. Refuses to start while another
    /// process writes the store (--force takes it over), and --reset refuses
    /// to delete a store in use even with --force.
    #[command(after_help = EXIT_CODES_HELP)]
    Demo(demo::DemoArgs),
    /// Run a worker pool for a store: the demo's order pipeline, applying
    /// the requests `submit` and `cancel` send, until Ctrl-C or SIGTERM.
    ///
    /// With --shards N, join the fleet of N shards at the location
    /// (creating it if there is none) and run the shards this worker holds;
    /// Ctrl-C or SIGTERM hands them back.
    #[command(after_help = EXIT_CODES_HELP)]
    Worker(commands::worker::WorkerArgs),
    /// Show a fleet: its shards, each one's owner, lease (epoch, age,
    /// released) and backlog. Never writes.
    #[command(after_help = EXIT_CODES_HELP)]
    Fleet(commands::fleet::FleetArgs),
    /// Submit a run (through the store's inbox; a worker applies it).
    #[command(after_help = EXIT_CODES_HELP)]
    Submit(commands::control::SubmitArgs),
    /// Cancel a run (through the store's inbox; a worker applies it).
    #[command(after_help = EXIT_CODES_HELP)]
    Cancel(commands::control::CancelArgs),
    /// Signal a run waiting for one (through the store's inbox; a worker
    /// applies it): its next step runs now and sees PAYLOAD.
    #[command(after_help = EXIT_CODES_HELP)]
    Signal(commands::signal::SignalArgs),
    /// Re-run a run that ended Failed or Cancelled from one of its steps
    /// (through the store's inbox; a worker applies it).
    #[command(after_help = EXIT_CODES_HELP)]
    Rerun(commands::rerun::RerunArgs),
    /// Print where a live run is, or how it ended. Never writes to the
    /// store; safe while a worker or the demo runs.
    #[command(after_help = EXIT_CODES_HELP)]
    Status(commands::read::RunArgs),
    /// Print how a run ended; exit 4 while it has not. Never writes.
    #[command(after_help = EXIT_CODES_HELP)]
    Outcome(commands::read::RunArgs),
    /// Print a run's step history: each step's attempts, when, how long,
    /// how each ended and its error. Never writes.
    #[command(after_help = EXIT_CODES_HELP)]
    History(commands::history::HistoryArgs),
    /// List runs, live and ended. Never writes.
    #[command(after_help = EXIT_CODES_HELP)]
    Runs(commands::read::RunsArgs),
    /// Show each workflow's health (circuit breaker, run tallies). Never
    /// writes.
    #[command(after_help = EXIT_CODES_HELP)]
    Workflows(commands::read::WorkflowsArgs),
    /// List dead-lettered step jobs and hook notifications, with the reason
    /// each died. Never writes.
    #[command(after_help = EXIT_CODES_HELP)]
    Dead(commands::dead::DeadArgs),
    /// Requeue dead jobs (through the store's inbox; a worker applies it):
    /// a hook notification is delivered again, a step job's run re-runs
    /// from that step.
    #[command(after_help = EXIT_CODES_HELP)]
    Requeue(commands::dead::RequeueArgs),
    /// Reset a workflow's circuit breaker: close it, zero its failure
    /// streak and release its parked steps (through the store's inbox; a
    /// worker applies it).
    #[command(after_help = EXIT_CODES_HELP)]
    Reset(commands::reset::ResetArgs),
    /// List the store's schedules: when each fires, paused or not, its next
    /// fire and last run. Never writes.
    #[command(after_help = EXIT_CODES_HELP)]
    Schedules(commands::schedules::SchedulesArgs),
    /// Fire a schedule now (through the store's inbox; the worker that
    /// defines it applies it). Overrides its workflow's backoff, never a
    /// trip.
    #[command(after_help = EXIT_CODES_HELP)]
    Trigger(commands::schedules::ScheduleArgs),
    /// Pause a schedule, durably (through the store's inbox).
    #[command(after_help = EXIT_CODES_HELP)]
    Pause(commands::schedules::ScheduleArgs),
    /// Resume a paused schedule at its next time (through the store's
    /// inbox).
    #[command(after_help = EXIT_CODES_HELP)]
    Resume(commands::schedules::ScheduleArgs),
    /// Serve the operator's view over HTTP: a dashboard, a JSON API and
    /// Prometheus metrics. Reads through a reader and changes through the
    /// inbox: never fences a worker. Listens on 127.0.0.1:8080 by default.
    #[command(after_help = EXIT_CODES_HELP)]
    Serve(serve::ServeArgs),
}

/// clap's error with the user's text it echoes (a value, an unknown
/// argument or subcommand, a tip that repeats it) made safe to print:
/// control characters (a newline, a terminal escape) escaped and a long
/// value cut, as every other error of the CLI echoes input. Only the usage
/// is clap's own text throughout, and left as it is.
fn echoed_safely(mut e: clap::Error) -> clap::Error {
    use clap::builder::StyledStr;
    use clap::error::{ContextKind, ContextValue};
    // A tip's styling is dropped with the escaping (its text is kept).
    let styled = |text: &StyledStr| StyledStr::from(shown_path(&text.to_string()));
    let escaped: Vec<_> = e
        .context()
        .filter(|(kind, _)| *kind != ContextKind::Usage)
        .filter_map(|(kind, value)| match value {
            ContextValue::String(text) => Some((kind, ContextValue::String(shown_path(text)))),
            ContextValue::Strings(all) => Some((
                kind,
                ContextValue::Strings(all.iter().map(|text| shown_path(text)).collect()),
            )),
            ContextValue::StyledStr(text) => Some((kind, ContextValue::StyledStr(styled(text)))),
            ContextValue::StyledStrs(all) => Some((
                kind,
                ContextValue::StyledStrs(all.iter().map(styled).collect()),
            )),
            _ => None,
        })
        .collect();
    for (kind, value) in escaped {
        e.insert(kind, value);
    }
    e
}

fn main() -> ExitCode {
    // `--help` and `--version` are "errors" too: printed as they are.
    let cli = Cli::try_parse().unwrap_or_else(|e| echoed_safely(e).exit());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say_err!("waymark: error: cannot start the async runtime: {e}");
            return Exit::Failure.into();
        }
    };
    let result: Result<Exit, CliError> = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Worker(args) => commands::worker::run(args).await,
            Command::Fleet(args) => commands::fleet::status(args).await,
            Command::Submit(args) => commands::control::submit(args).await,
            Command::Cancel(args) => commands::control::cancel(args).await,
            Command::Signal(args) => commands::signal::signal(args).await,
            Command::Rerun(args) => commands::rerun::rerun(args).await,
            Command::Status(args) => commands::read::status(args).await,
            Command::Outcome(args) => commands::read::outcome(args).await,
            Command::History(args) => commands::history::history(args).await,
            Command::Runs(args) => commands::read::runs(args).await,
            Command::Workflows(args) => commands::read::workflows(args).await,
            Command::Dead(args) => commands::dead::dead(args).await,
            Command::Requeue(args) => commands::dead::requeue(args).await,
            Command::Reset(args) => commands::reset::reset(args).await,
            Command::Schedules(args) => commands::schedules::list(args).await,
            Command::Trigger(args) => commands::schedules::trigger(args).await,
            Command::Pause(args) => commands::schedules::pause(args).await,
            Command::Resume(args) => commands::schedules::resume(args).await,
            Command::Serve(args) => serve::run(args).await,
        }
    });
    // Background tasks of the storage layer may still retry a dead store:
    // do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(exit) => exit.into(),
        Err(e) => {
            say_err!("waymark: error: {e}");
            e.exit.into()
        }
    }
}
