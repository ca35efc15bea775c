//! The JSON shapes of `serve`'s API: the library's values, made plain
//! (times as milliseconds since the Unix epoch, states as snake_case
//! names), and the parsing of the listing's filters.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use waymark::{
    BreakerStatus, LastRun, RunOutcome, RunPhase, RunState, RunStatus, RunSummary, ScheduleInfo,
    ScheduleKind, StateFilter, TerminalStatus, WorkflowHealth,
};

/// Milliseconds since the Unix epoch (0 before it).
pub fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A live run's state, as the API names it.
pub fn state_name(state: RunState) -> &'static str {
    match state {
        RunState::Pending => "pending",
        RunState::Scheduled => "scheduled",
        RunState::Running => "running",
        RunState::Cancelling => "cancelling",
        RunState::Parked => "parked",
        RunState::WaitingForSignal => "waiting_for_signal",
        RunState::WaitingForChildren => "waiting_for_children",
        _ => "live",
    }
}

/// An ended run's status, as the API names it.
pub fn status_name(status: TerminalStatus) -> &'static str {
    match status {
        TerminalStatus::Succeeded => "succeeded",
        TerminalStatus::Failed => "failed",
        TerminalStatus::Cancelled => "cancelled",
        TerminalStatus::TimedOut => "timed_out",
        _ => "ended",
    }
}

/// The live states and terminal statuses a `state` filter may name.
const LIVE_STATES: [RunState; 7] = [
    RunState::Pending,
    RunState::Scheduled,
    RunState::Running,
    RunState::Cancelling,
    RunState::Parked,
    RunState::WaitingForSignal,
    RunState::WaitingForChildren,
];
const ENDED: [TerminalStatus; 4] = [
    TerminalStatus::Succeeded,
    TerminalStatus::Failed,
    TerminalStatus::Cancelled,
    TerminalStatus::TimedOut,
];

/// Parse a `state` filter: `live`, `ended`, a live state or a terminal
/// status. The error lists what is accepted.
pub fn parse_state(text: &str) -> Result<StateFilter, String> {
    match text {
        "live" => return Ok(StateFilter::Live),
        "ended" => return Ok(StateFilter::Ended),
        _ => {}
    }
    if let Some(state) = LIVE_STATES.iter().find(|s| state_name(**s) == text) {
        return Ok(StateFilter::Is(RunPhase::Live(*state)));
    }
    if let Some(status) = ENDED.iter().find(|s| status_name(**s) == text) {
        return Ok(StateFilter::Is(RunPhase::Ended(*status)));
    }
    let known: Vec<&str> = ["live", "ended"]
        .into_iter()
        .chain(LIVE_STATES.iter().map(|s| state_name(*s)))
        .chain(ENDED.iter().map(|s| status_name(*s)))
        .collect();
    Err(format!(
        "unknown state `{}`; use one of {}",
        text.escape_debug(),
        known.join(", ")
    ))
}

/// One run in a listing.
#[derive(Debug, Serialize)]
pub struct RunRow {
    /// The run.
    pub run_id: String,
    /// Its workflow.
    pub workflow: String,
    /// Whether it lives.
    pub live: bool,
    /// Its live state or terminal status.
    pub state: &'static str,
    /// The step it is at (live) or ended at.
    pub step: u32,
}

impl From<&RunSummary> for RunRow {
    fn from(run: &RunSummary) -> Self {
        let (live, state) = match run.phase {
            RunPhase::Live(state) => (true, state_name(state)),
            RunPhase::Ended(status) => (false, status_name(status)),
        };
        Self {
            run_id: run.run_id.clone(),
            workflow: run.workflow.clone(),
            live,
            state,
            step: run.step,
        }
    }
}

/// A live run's status.
#[derive(Debug, Serialize)]
pub struct LiveJson {
    /// Where it is.
    pub state: &'static str,
    /// The step it is at.
    pub step: u32,
    /// Its re-runs.
    pub reruns: u32,
    /// When a scheduled or waiting step runs.
    pub scheduled_for_ms: Option<u64>,
    /// Children not yet ended, while it waits for them.
    pub children_live: Option<u32>,
}

impl From<&RunStatus> for LiveJson {
    fn from(status: &RunStatus) -> Self {
        Self {
            state: state_name(status.state),
            step: status.current_step,
            reruns: status.reruns,
            scheduled_for_ms: status.scheduled_for.map(ms),
            children_live: status.children_live,
        }
    }
}

/// An ended run's outcome.
#[derive(Debug, Serialize)]
pub struct OutcomeJson {
    /// How it ended.
    pub status: &'static str,
    /// The step it ended at.
    pub final_step: u32,
    /// Its error or reason, if any.
    pub error: Option<String>,
    /// Its result, as text when it is UTF-8.
    pub result: Option<String>,
    /// Its re-runs.
    pub reruns: u32,
    /// The submitter's headers.
    pub headers: std::collections::BTreeMap<String, String>,
}

impl From<&RunOutcome> for OutcomeJson {
    fn from(outcome: &RunOutcome) -> Self {
        Self {
            status: status_name(outcome.status),
            final_step: outcome.final_step,
            error: outcome.error.clone(),
            result: outcome
                .result
                .as_ref()
                .map(|r| String::from_utf8_lossy(r).into_owned()),
            reruns: outcome.reruns,
            headers: outcome.headers.clone().into_iter().collect(),
        }
    }
}

/// A workflow's breaker.
#[derive(Debug, Serialize)]
pub struct BreakerJson {
    /// `closed`, `backoff` or `tripped`.
    pub state: &'static str,
    /// The end of a backoff window.
    pub until_ms: Option<u64>,
    /// When it tripped.
    pub since_ms: Option<u64>,
}

/// A workflow's health.
#[derive(Debug, Serialize)]
pub struct WorkflowJson {
    /// The workflow.
    pub name: String,
    /// Its breaker.
    pub breaker: BreakerJson,
    /// Consecutive failed attempts.
    pub failure_streak: u32,
    /// Runs that succeeded.
    pub runs_succeeded: u64,
    /// Runs that failed.
    pub runs_failed: u64,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
    /// The shard whose breaker this is (fleets only: each shard has its
    /// own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
}

impl WorkflowJson {
    /// `health` as JSON, read from `shard` on a fleet.
    pub fn new(health: &WorkflowHealth, shard: Option<u32>) -> Self {
        let breaker = match &health.status {
            BreakerStatus::Backoff { until, .. } => BreakerJson {
                state: "backoff",
                until_ms: Some(ms(*until)),
                since_ms: None,
            },
            BreakerStatus::Tripped { since, .. } => BreakerJson {
                state: "tripped",
                until_ms: None,
                since_ms: Some(ms(*since)),
            },
            _ => BreakerJson {
                state: "closed",
                until_ms: None,
                since_ms: None,
            },
        };
        Self {
            name: health.name.clone(),
            breaker,
            failure_streak: health.failure_streak,
            runs_succeeded: health.runs_succeeded,
            runs_failed: health.runs_failed,
            last_error: health.last_error.clone(),
            shard,
        }
    }
}

/// A schedule's state.
#[derive(Debug, Serialize)]
pub struct ScheduleJson {
    /// The schedule.
    pub id: String,
    /// When it fires, in words: `every 5s`, `cron 0 0 * * * * (UTC)`,
    /// `manual`.
    pub fires: String,
    /// The workflow of its runs.
    pub workflow: String,
    /// Defined by the last worker that started.
    pub active: bool,
    /// Paused.
    pub paused: bool,
    /// Its next fire.
    pub next_fire_ms: Option<u64>,
    /// Its last fire.
    pub last_fire_ms: Option<u64>,
    /// The run its last fire submitted.
    pub last_run_id: Option<String>,
    /// How that run is doing: `live`, a terminal status, or `forgotten`.
    pub last_outcome: Option<&'static str>,
    /// Runs it submitted.
    pub run_count: u64,
    /// Fires skipped, suppressed or missed, by why.
    pub skipped_overlap: u64,
    /// Fires suppressed in a backoff window.
    pub suppressed_backoff: u64,
    /// Fires suppressed while tripped.
    pub suppressed_tripped: u64,
    /// Fires missed while no worker ran.
    pub missed: u64,
    /// Why the last fire that could not submit did not.
    pub last_error: Option<String>,
}

impl From<&ScheduleInfo> for ScheduleJson {
    fn from(s: &ScheduleInfo) -> Self {
        let fires = match &s.kind {
            ScheduleKind::Every { interval } => format!("every {interval:?}"),
            ScheduleKind::Cron { expr, time_zone } => {
                format!("cron {expr} ({})", time_zone.as_deref().unwrap_or("UTC"))
            }
            _ => "manual".into(),
        };
        Self {
            id: s.id.clone(),
            fires,
            workflow: s.workflow.clone(),
            active: s.active,
            paused: s.paused,
            next_fire_ms: s.next_fire.map(ms),
            last_fire_ms: s.last_fire.map(ms),
            last_run_id: s.last_run_id.clone(),
            last_outcome: s.last_outcome.map(|o| match o {
                LastRun::Live => "live",
                LastRun::Ended(status) => status_name(status),
                _ => "forgotten",
            }),
            run_count: s.run_count,
            skipped_overlap: s.skipped_overlap,
            suppressed_backoff: s.suppressed_backoff,
            suppressed_tripped: s.suppressed_tripped,
            missed: s.missed,
            last_error: s.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_name_parses_back() {
        for state in LIVE_STATES {
            assert_eq!(
                parse_state(state_name(state)),
                Ok(StateFilter::Is(RunPhase::Live(state)))
            );
        }
        for status in ENDED {
            assert_eq!(
                parse_state(status_name(status)),
                Ok(StateFilter::Is(RunPhase::Ended(status)))
            );
        }
        assert_eq!(parse_state("live"), Ok(StateFilter::Live));
        let err = parse_state("bogus").unwrap_err();
        assert!(err.contains("parked") && err.contains("timed_out"), "{err}");
    }
}
