//! `waymark status | outcome | runs | workflows`: read a store through a
//! [`waymark::Client`], whose reader never writes to the store and never
//! fences its worker, so they work while the demo or a worker runs. Ids are
//! checked before anything is opened. Each read is bounded by `--timeout`.
//! On a fleet, `status` and `outcome` read the run's shard and `runs` lists
//! every shard; `workflows` lists each shard's breaker and tallies per
//! workflow (a breaker is per shard).

use std::time::{Duration, SystemTime};

use clap::{Args, ValueEnum};
use waymark::{Client, RunFilter, RunOutcome, RunPage, RunPhase, StateFilter, TerminalStatus};

use super::check_run_id;
use crate::demo::domain::step_label;
use crate::describe;
use crate::plumbing::exit::{CliError, CliResult, Exit, one_line, shown};
use crate::plumbing::output::{say, say_err, suggest};
use crate::plumbing::store::{Store, StoreArgs};
use crate::plumbing::telemetry::init_logging;

/// `status` and `outcome`'s arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The run, e.g. demo-order-03.
    pub run_id: String,
    /// Print JSON instead of text, for scripts.
    #[arg(long)]
    pub json: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark status`: where a live run is, or how it ended.
pub async fn status(args: RunArgs) -> CliResult<Exit> {
    check_run_id(&args.run_id)?;
    let store = Store::locate(&args.store)?;
    let client = store.open_run_client(&args.run_id).await?;
    let run_id = args.run_id.as_str();
    let live = store
        .bounded("reading the run's status", client.status(run_id))
        .await?;
    if args.json {
        let value = match &live {
            Some(status) => super::json::status(status),
            None => match read_outcome(&store, &client, run_id).await? {
                Some(outcome) => super::json::outcome(&outcome),
                None => return Err(not_found(run_id, &store)),
            },
        };
        store.close_reader(client.close()).await;
        print_json(&value)?;
        return Ok(Exit::Ok);
    }
    let code = match live {
        Some(status) => {
            say!("{run_id}: live");
            say!("  step:     {}", step_label(status.current_step));
            say!("  state:    {}", describe::state(&status));
            say!("  workflow: {}", status.workflow);
            Exit::Ok
        }
        None => match read_outcome(&store, &client, run_id).await? {
            Some(outcome) => {
                say!("{run_id}: ended");
                print_outcome(&outcome);
                Exit::Ok
            }
            None => return Err(not_found(run_id, &store)),
        },
    };
    print_children(&store, &client, run_id).await?;
    store.close_reader(client.close()).await;
    Ok(code)
}

/// Print the run's children (and theirs) as a tree, if it has any: the
/// first page of them.
async fn print_children(store: &Store, client: &Client, run_id: &str) -> CliResult<()> {
    let filter = RunFilter {
        children_of: Some(run_id.to_string()),
        limit: 100,
        ..Default::default()
    };
    let page = store
        .bounded("listing the run's children", client.runs(&filter))
        .await?;
    if page.runs.is_empty() && page.unreadable.is_empty() {
        return Ok(());
    }
    say!("  children:");
    for child in &page.runs {
        // `{parent}.{step}.{suffix}` per level.
        let rest = &child.run_id[run_id.len()..];
        let depth = rest.matches('.').count() / 2;
        let phase = match child.phase {
            RunPhase::Live(state) => format!("live, {state:?}"),
            RunPhase::Ended(status) => describe::status_word(status).to_string(),
        };
        say!(
            "    {}{}  {}  step {}",
            "  ".repeat(depth.saturating_sub(1)),
            child.run_id,
            phase,
            step_label(child.step)
        );
    }
    for child in &page.unreadable {
        say!(
            "    {}  unreadable: {}",
            child.run_id,
            one_line(&child.error)
        );
    }
    if page.next.is_some() {
        say!("    … (more: `waymark runs --children-of {}`)", run_id);
    }
    Ok(())
}

/// `waymark outcome`: how a run ended; exit 4 while it has not.
pub async fn outcome(args: RunArgs) -> CliResult<Exit> {
    check_run_id(&args.run_id)?;
    let store = Store::locate(&args.store)?;
    let client = store.open_run_client(&args.run_id).await?;
    let run_id = args.run_id.as_str();
    let code = match read_outcome(&store, &client, run_id).await? {
        Some(outcome) => show_ended(run_id, &outcome, args.json)?,
        None => match store
            .bounded("reading the run's status", client.status(run_id))
            .await?
        {
            // Not ended: its status, and exit 4.
            Some(status) if args.json => {
                print_json(&super::json::status(&status))?;
                Exit::Unfinished
            }
            Some(status) => {
                say!(
                    "{run_id} has not ended yet: it is at step {} ({}). A worker on the store \
                     finishes it: {}",
                    step_label(status.current_step),
                    describe::state(&status),
                    suggest(&finisher(&store, run_id))
                );
                Exit::Unfinished
            }
            // Neither ended at the first read nor live at the second: it may
            // have ended in between (the reader refreshes between reads), so
            // its outcome is read once more before the run is called unknown.
            None => match read_outcome(&store, &client, run_id).await? {
                Some(outcome) => show_ended(run_id, &outcome, args.json)?,
                None => return Err(not_found(run_id, &store)),
            },
        },
    };
    store.close_reader(client.close()).await;
    Ok(code)
}

/// Print how a run ended (as JSON with `json`); exit 0.
fn show_ended(run_id: &str, outcome: &RunOutcome, json: bool) -> CliResult<Exit> {
    if json {
        print_json(&super::json::outcome(outcome))?;
    } else {
        say!("{run_id}: ended");
        print_outcome(outcome);
    }
    Ok(Exit::Ok)
}

/// The command that works the runs of `store` (the demo for its own runs).
fn finisher<'a>(store: &'a Store, run_id: &str) -> Vec<&'a str> {
    let command = if run_id.starts_with("demo-order-") && store.dir.is_some() {
        "demo"
    } else {
        "worker"
    };
    let mut args = vec![command];
    args.extend(store_args(store));
    args
}

/// The arguments naming `store` on a command line.
fn store_args(store: &Store) -> Vec<&str> {
    match &store.dir {
        Some(dir) => vec!["--dir", dir.to_str().unwrap_or("waymark-data")],
        None => vec!["--store", store.url.as_str()],
    }
}

/// A run's outcome, bounded.
async fn read_outcome(
    store: &Store,
    client: &Client,
    run_id: &str,
) -> CliResult<Option<RunOutcome>> {
    store
        .bounded("reading the run's outcome", client.outcome(run_id))
        .await
}

/// Print a terminal outcome, one field a line.
fn print_outcome(outcome: &RunOutcome) {
    say!("  status:     {}", describe::status_word(outcome.status));
    say!("  final step: {}", step_label(outcome.final_step));
    match outcome.status {
        TerminalStatus::Succeeded => say!("  result:     {}", describe::detail(outcome)),
        _ => say!("  reason:     {}", describe::detail(outcome)),
    }
    say!("  workflow:   {}", outcome.workflow);
}

/// The error for a run the store does not know (exit 3).
pub fn not_found(run_id: &str, store: &Store) -> CliError {
    CliError::not_found(format!(
        "no run `{}` in {} (never submitted there, or its outcome passed the retention window)",
        shown(run_id),
        store.shown()
    ))
}

/// Which runs `waymark runs` lists.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateArg {
    /// Runs that have not ended.
    Live,
    /// Runs that ended (within the retention window).
    Ended,
    /// Runs that succeeded.
    Succeeded,
    /// Runs that failed.
    Failed,
    /// Runs that were cancelled.
    Cancelled,
    /// Runs whose deadline passed.
    TimedOut,
}

/// `waymark runs`' arguments.
#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Only runs in this state.
    #[arg(long, value_enum)]
    pub state: Option<StateArg>,
    /// Only runs of this workflow.
    #[arg(long)]
    pub workflow: Option<String>,
    /// At most this many runs.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Start after this run id (the next page).
    #[arg(long, value_name = "RUN_ID")]
    pub after: Option<String>,
    /// Only the children of this run (and theirs).
    #[arg(long, value_name = "RUN_ID")]
    pub children_of: Option<String>,
    /// Only runs submitted at or after this time: RFC 3339
    /// (2026-11-26T08:00:00Z) or an age (90s, 15m, 2h, 3d ago).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<SystemTime>,
    /// Only runs submitted before this time (as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<SystemTime>,
    /// Only runs submitted with this header.
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_header)]
    pub header: Option<(String, String)>,
    /// Print JSON instead of text, for scripts.
    #[arg(long)]
    pub json: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark runs`: a page of runs, live and ended.
pub async fn runs(args: RunsArgs) -> CliResult<Exit> {
    if let Some(after) = &args.after {
        check_run_id(after)?;
    }
    if let Some(parent) = &args.children_of {
        check_run_id(parent)?;
    }
    if let Some(workflow) = &args.workflow {
        waymark::validate_name("workflow name", workflow)
            .map_err(|_| CliError::usage(format!("invalid workflow name `{}`", shown(workflow))))?;
    }
    let store = Store::locate(&args.store)?;
    let filter = RunFilter {
        state: args.state.map(|s| match s {
            StateArg::Live => StateFilter::Live,
            StateArg::Ended => StateFilter::Ended,
            StateArg::Succeeded => StateFilter::Is(RunPhase::Ended(TerminalStatus::Succeeded)),
            StateArg::Failed => StateFilter::Is(RunPhase::Ended(TerminalStatus::Failed)),
            StateArg::Cancelled => StateFilter::Is(RunPhase::Ended(TerminalStatus::Cancelled)),
            StateArg::TimedOut => StateFilter::Is(RunPhase::Ended(TerminalStatus::TimedOut)),
        }),
        workflow: args.workflow.clone(),
        submitted_since: args.since,
        submitted_until: args.until,
        header: args.header.clone(),
        after: args.after.clone(),
        children_of: args.children_of.clone(),
        limit: args.limit.max(1),
    };
    // On a fleet, every shard's page, merged.
    let source = store.open_source().await?;
    let page = store.bounded("listing runs", source.runs(&filter)).await;
    store.close_reader(source.close()).await;
    let page = page?;
    if args.json {
        print_json(&super::json::runs(&page))?;
        return left_out(&page);
    }
    let rows: Vec<[String; 4]> = page
        .runs
        .iter()
        .map(|run| {
            let phase = match run.phase {
                RunPhase::Live(state) => format!("live ({state:?})").to_lowercase(),
                RunPhase::Ended(status) => describe::status_word(status).to_string(),
            };
            [
                run.run_id.clone(),
                phase,
                step_label(run.step),
                run.workflow.clone(),
            ]
        })
        .collect();
    table(&["RUN", "STATE", "STEP", "WORKFLOW"], &rows);
    if let Some(next) = &page.next {
        let mut more = vec!["runs"];
        more.extend(store_args(&store));
        more.extend(["--after", next.as_str()]);
        say!("more: {}", suggest(&more));
    }
    for run in &page.unreadable {
        say_err!(
            "left out: run `{}`: {}",
            shown(&run.run_id),
            one_line(&run.error)
        );
    }
    left_out(&page)
}

/// Exit 0 for a complete listing; for one that left out runs whose records
/// do not decode (named on stderr, or in the JSON's `unreadable`), exit 1
/// saying so: a script must not take it for the whole list.
fn left_out(page: &RunPage) -> CliResult<Exit> {
    match page.unreadable.len() {
        0 => Ok(Exit::Ok),
        n => Err(CliError::failure(format!(
            "{n} run(s) in this page were left out: their records do not decode (corrupt, or \
             written by a newer Waymark; upgrade if so). The other runs are listed."
        ))),
    }
}

/// Parse `--since`/`--until`: RFC 3339, or an age before now (`90s`, `15m`,
/// `2h`, `3d`).
fn parse_time(text: &str) -> Result<SystemTime, String> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(text) {
        let ms = u64::try_from(at.timestamp_millis())
            .map_err(|_| format!("`{}` is before 1970", shown(text)))?;
        return Ok(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
    }
    let bad = || {
        format!(
            "`{}` is neither an RFC 3339 time (2026-11-26T08:00:00Z) nor an age (90s, 15m, 2h, 3d)",
            shown(text)
        )
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(bad()),
    };
    Ok(SystemTime::now()
        .checked_sub(Duration::from_secs(secs))
        .unwrap_or(SystemTime::UNIX_EPOCH))
}

/// Parse `--header NAME=VALUE`.
fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("`{}` is not NAME=VALUE", shown(text))),
    }
}

/// `waymark workflows`' arguments.
#[derive(Debug, Args)]
pub struct WorkflowsArgs {
    /// Print JSON instead of text, for scripts.
    #[arg(long)]
    pub json: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark workflows`: each workflow's health. On a fleet each shard
/// keeps its own breaker and tallies per workflow: one row per shard that
/// has seen the workflow, under a `SHARD` column (a `shard` field in JSON).
pub async fn workflows(args: WorkflowsArgs) -> CliResult<Exit> {
    // A workflow whose health record does not decode is left out with a
    // logged error: show it.
    init_logging();
    let store = Store::locate(&args.store)?;
    let source = store.open_source().await?;
    let mut all = Vec::new();
    for (shard, client) in source.shards() {
        let health = store
            .bounded("reading workflow health", client.workflows())
            .await?;
        all.extend(health.into_iter().map(|h| (shard, h)));
    }
    store.close_reader(source.close()).await;
    all.sort_by(|(sa, a), (sb, b)| a.name.cmp(&b.name).then(sa.cmp(sb)));
    if args.json {
        let (shards, health): (Vec<_>, Vec<_>) = all.into_iter().unzip();
        let values = super::json::workflows(&health);
        print_json(&super::json::with_shards(values, shards))?;
        return Ok(Exit::Ok);
    }
    let rows: Vec<_> = all
        .iter()
        .map(|(shard, h)| (*shard, health_row(h)))
        .collect();
    table_with_shards(
        source.is_fleet(),
        1,
        &["WORKFLOW", "BREAKER", "RUNS", "LAST ERROR"],
        &rows,
    );
    Ok(Exit::Ok)
}

/// One workflow's health as a table row.
fn health_row(h: &waymark::WorkflowHealth) -> [String; 4] {
    [
        h.name.clone(),
        breaker_word(&h.status),
        format!("{} succeeded, {} failed", h.runs_succeeded, h.runs_failed),
        h.last_error.as_deref().map_or_else(|| "-".into(), one_line),
    ]
}

/// A breaker's state in a word or two.
fn breaker_word(status: &waymark::BreakerStatus) -> String {
    match status {
        waymark::BreakerStatus::Closed => "closed".into(),
        waymark::BreakerStatus::Backoff { streak, .. } => {
            format!("backing off ({streak} failures)")
        }
        waymark::BreakerStatus::Tripped { streak, .. } => format!("tripped ({streak} failures)"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Print a table with a header; the last column is not padded.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    columns(header, &rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>());
}

/// [`table`] of rows that each come from a store, with a `SHARD` column
/// inserted at `at` when the store is a fleet (`fleet`).
pub fn table_with_shards<const N: usize>(
    fleet: bool,
    at: usize,
    header: &[&str; N],
    rows: &[(Option<u32>, [String; N])],
) {
    let mut head = header.to_vec();
    let mut body: Vec<Vec<String>> = rows.iter().map(|(_, r)| r.to_vec()).collect();
    if fleet {
        head.insert(at, "SHARD");
        for (row, (shard, _)) in body.iter_mut().zip(rows) {
            row.insert(at, shard.map_or_else(String::new, |s| s.to_string()));
        }
    }
    columns(&head, &body);
}

/// Print `rows` under `header` in aligned columns; the last is not padded.
fn columns(header: &[&str], rows: &[Vec<String>]) {
    let n = header.len();
    let widths: Vec<usize> = (0..n)
        .map(|col| {
            rows.iter()
                .filter_map(|r| r.get(col))
                .map(|cell| cell.chars().count())
                .chain([header[col].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == n {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        say!("{}", out.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Print `value` as pretty JSON, for scripts (`--json`).
pub fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> CliResult<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::failure(format!("cannot print JSON: {e}")))?;
    say!("{text}");
    Ok(())
}
