//! `waymark schedules | trigger | pause | resume`: a store's durable
//! schedules, read through a [`waymark::Client`] (never writing), and the
//! requests that drive them, sent through the store's inbox like `submit`
//! and `cancel` (see [`super::control`]). On a fleet each schedule lives on
//! its home shard (`shard_of_schedule`): the listing merges the shards, and
//! a request goes to the schedule's home. The worker applies a request
//! through its runtime's own `trigger` / `pause_schedule` /
//! `resume_schedule`, so only the schedules the worker defines (for
//! `waymark worker`, its `--schedule` options) can be driven: another id
//! exits 3. A refused trigger (the workflow is tripped, the last run is live
//! under the overlap policy `Skip`, the worker is stopping) exits 5; no
//! worker answering within `--timeout` exits 4, the request waiting in the
//! inbox.

use std::time::{Duration, SystemTime};

use clap::Args;
use waymark::{LastRun, Reply, Schedule, ScheduleInfo, ScheduleKind};

use super::control::{await_reply_to, send};
use super::read::table;
use crate::demo::domain::ORDERS;
use crate::describe;
use crate::plumbing::exit::{CliError, CliResult, Exit, shown};
use crate::plumbing::output::{say, suggest};
use crate::plumbing::store::{Store, StoreArgs};
use crate::plumbing::telemetry::init_logging;

/// `waymark schedules`' arguments.
#[derive(Debug, Args)]
pub struct SchedulesArgs {
    /// Print JSON instead of text, for scripts.
    #[arg(long)]
    pub json: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `waymark trigger | pause | resume`'s arguments.
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// The schedule's id (as `waymark schedules` lists it).
    pub id: String,
    /// Return once the request is stored, without waiting for the worker.
    #[arg(long)]
    pub no_wait: bool,
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Check a schedule id before anything is opened.
fn check_schedule_id(id: &str) -> CliResult<()> {
    waymark::validate_name("schedule id", id).map_err(|e| match e {
        waymark::Error::InvalidRunId { reason, .. } => {
            CliError::usage(format!("invalid schedule id `{}`: {reason}", shown(id)))
        }
        e => CliError::usage(e.to_string()),
    })
}

/// `waymark schedules`: every recorded schedule, sorted by id.
pub async fn list(args: SchedulesArgs) -> CliResult<Exit> {
    // A schedule whose record does not decode is left out with a logged
    // error: show it.
    init_logging();
    let store = Store::locate(&args.store)?;
    // On a fleet each schedule is recorded on its home shard: every
    // shard's, merged.
    let source = store.open_source().await?;
    let all = store
        .bounded("reading the schedules", source.schedules())
        .await;
    store.close_reader(source.close()).await;
    let all = all?;
    if args.json {
        super::read::print_json(&super::json::schedules(&all))?;
        return Ok(Exit::Ok);
    }
    if all.is_empty() {
        say!(
            "no schedules in {} (a worker records its schedules when it starts)",
            store.shown()
        );
        return Ok(Exit::Ok);
    }
    let rows: Vec<[String; 7]> = all.iter().map(row).collect();
    table(
        &[
            "SCHEDULE",
            "WHEN",
            "WORKFLOW",
            "STATE",
            "NEXT FIRE",
            "LAST RUN",
            "RUNS",
        ],
        &rows,
    );
    Ok(Exit::Ok)
}

/// One schedule as a table row.
fn row(info: &ScheduleInfo) -> [String; 7] {
    let state = if !info.active {
        "inactive".to_string()
    } else if info.paused {
        "paused".to_string()
    } else if info.buffered {
        "active, one fire buffered".to_string()
    } else {
        "active".to_string()
    };
    let last = match (&info.last_run_id, info.last_outcome) {
        (Some(run), Some(outcome)) => format!("{run} ({})", outcome_word(outcome)),
        (Some(run), None) => run.clone(),
        _ => "-".to_string(),
    };
    let mut runs = info.run_count.to_string();
    let notes: Vec<String> = [
        (info.skipped_overlap, "skipped (overlap)"),
        (info.suppressed_backoff, "suppressed (backoff)"),
        (info.suppressed_tripped, "suppressed (tripped)"),
        (info.missed, "missed"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .chain(
        info.last_error
            .iter()
            .map(|e| format!("last error: {}", crate::plumbing::exit::one_line(e))),
    )
    .collect();
    if !notes.is_empty() {
        runs.push_str(&format!("; {}", notes.join(", ")));
    }
    [
        info.id.clone(),
        when(&info.kind),
        info.workflow.clone(),
        state,
        info.next_fire.map_or_else(|| "-".to_string(), utc),
        last,
        runs,
    ]
}

/// How a schedule's last run is doing, in a word.
fn outcome_word(outcome: LastRun) -> &'static str {
    match outcome {
        LastRun::Live => "live",
        LastRun::Ended(status) => describe::status_word(status),
        LastRun::Forgotten => "outcome expired",
        _ => "-",
    }
}

/// When a schedule fires, in words.
fn when(kind: &ScheduleKind) -> String {
    match kind {
        ScheduleKind::Every { interval } => format!("every {}", interval_words(*interval)),
        ScheduleKind::Cron {
            expr,
            time_zone: Some(zone),
        } => format!("cron {expr} ({zone})"),
        ScheduleKind::Cron { expr, .. } => format!("cron {expr} (UTC)"),
        ScheduleKind::Manual => "manual".to_string(),
        other => format!("{other:?}"),
    }
}

/// `2h`, `5m`, `30s` or `1500ms`.
fn interval_words(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms > 0 && ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms > 0 && ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms > 0 && ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    }
}

/// A time as `2026-11-26 02:41:07.250Z`.
fn utc(t: SystemTime) -> String {
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(at) => at.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string(),
        None => format!("{ms} ms"),
    }
}

/// Which request a command sends.
#[derive(Debug, Clone, Copy)]
enum Action {
    Trigger,
    Pause,
    Resume,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Trigger => "trigger",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }
}

/// `waymark trigger`: fire a schedule now.
pub async fn trigger(args: ScheduleArgs) -> CliResult<Exit> {
    request(args, Action::Trigger).await
}

/// `waymark pause`: stop a schedule firing until it is resumed.
pub async fn pause(args: ScheduleArgs) -> CliResult<Exit> {
    request(args, Action::Pause).await
}

/// `waymark resume`: a paused schedule fires again from its next time.
pub async fn resume(args: ScheduleArgs) -> CliResult<Exit> {
    request(args, Action::Resume).await
}

/// Send one schedule request and, unless `--no-wait`, say the answer.
async fn request(args: ScheduleArgs, action: Action) -> CliResult<Exit> {
    check_schedule_id(&args.id)?;
    let store = Store::locate(&args.store)?;
    // On a fleet, the schedule's home shard records and applies it.
    let client = store.open_schedule_client(&args.id).await?;
    let id = args.id.as_str();
    let request_id = match action {
        Action::Trigger => send(&store, client.trigger(id)).await?,
        Action::Pause => send(&store, client.pause(id)).await?,
        Action::Resume => send(&store, client.resume(id)).await?,
    };
    if args.no_wait {
        say!(
            "sent: {} {id} (request {request_id}); a worker on the store applies it",
            action.name()
        );
        return Ok(Exit::Ok);
    }
    let code = match await_reply_to(&store, &client, &request_id).await? {
        Some(Reply::Triggered { run_id, .. }) => {
            let mut status = vec!["status", run_id.as_str()];
            let store_args = store.args();
            status.extend(store_args.iter().map(String::as_str));
            say!("triggered {id}: run {run_id} ({})", suggest(&status));
            Exit::Ok
        }
        Some(Reply::Paused {
            was_running: true, ..
        }) => {
            say!("paused {id}: it fires nothing until it is resumed (a trigger still fires it)");
            Exit::Ok
        }
        Some(Reply::Paused { .. }) => {
            say!("{id} was already paused; nothing changed");
            Exit::Ok
        }
        Some(Reply::Resumed {
            was_paused: true, ..
        }) => {
            say!("resumed {id}: it fires from its next time on (missed times are not caught up)");
            Exit::Ok
        }
        Some(Reply::Resumed { .. }) => {
            say!("{id} was not paused; nothing changed");
            Exit::Ok
        }
        Some(other) => return Err(CliError::failure(format!("unexpected reply: {other:?}"))),
        None => Exit::Unfinished,
    };
    store.close_reader(client.close()).await;
    Ok(code)
}

/// Parse a `waymark worker --schedule` option: `ID=manual`,
/// `ID=every:N[ms|s|m|h]` or `ID=cron:EXPR` (with a seconds field, UTC).
/// Each fire submits the demo's first order.
pub fn parse_schedule(spec: &str) -> Result<Schedule, String> {
    let (id, what) = spec
        .split_once('=')
        .ok_or_else(|| "expected ID=manual, ID=every:30s or ID=cron:EXPR".to_string())?;
    // The library's error echoes the id as it is.
    waymark::validate_name("schedule id", id).map_err(|_| {
        format!(
            "invalid schedule id `{}`: only 1-128 ASCII letters, digits and `.` `_` `:` `-`",
            shown(id)
        )
    })?;
    let schedule = if what == "manual" {
        Schedule::manual(id)
    } else if let Some(every) = what.strip_prefix("every:") {
        Schedule::every(id, parse_interval(every)?)
    } else if let Some(expr) = what.strip_prefix("cron:") {
        Schedule::cron(id, expr)
    } else {
        return Err(format!(
            "`{}`: expected manual, every:N[ms|s|m|h] or cron:EXPR",
            shown(what)
        ));
    };
    Ok(schedule.input(ORDERS[0].input()))
}

/// `250ms`, `30s`, `5m`, `2h` or a bare number of seconds.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{}`: expected a whole number and a unit", shown(text)))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("`{}`: the unit is ms, s, m or h", shown(text))),
    };
    match ms {
        Some(0) => Err("the interval must be above zero".to_string()),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Err(format!("`{}` is too long", shown(text))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_and_print() {
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_interval("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_interval("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_interval("5d").is_err());
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("m").is_err());
        assert!(parse_interval("99999999999999999h").is_err());
        assert_eq!(interval_words(Duration::from_secs(7200)), "2h");
        assert_eq!(interval_words(Duration::from_secs(90)), "90s");
        assert_eq!(interval_words(Duration::from_millis(1500)), "1500ms");
        assert!(parse_schedule("a=manual").is_ok());
        assert!(parse_schedule("a=every:1s").is_ok());
        assert!(parse_schedule("a=cron:0 * * * * *").is_ok());
        assert!(parse_schedule("a").is_err());
        assert!(parse_schedule("a=sometimes").is_err());
        assert!(parse_schedule("a/b=manual").is_err());
    }
}
