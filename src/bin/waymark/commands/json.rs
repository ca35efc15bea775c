//! The `--json` forms of the read commands: one JSON document on stdout,
//! for scripts. Times are milliseconds since the Unix epoch; a run's result
//! is its bytes as UTF-8 (lossy), as the human form shows it.

use std::time::SystemTime;

use serde_json::{Value, json};
use waymark::{
    BreakerStatus, LastRun, RunOutcome, RunPage, RunPhase, RunStatus, ScheduleInfo, ScheduleKind,
    WorkflowHealth,
};

/// A time as ms since the Unix epoch.
fn ms(t: SystemTime) -> Value {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(Value::Null, |d| {
            json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        })
}

fn opt_ms(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, ms)
}

/// A live run's status.
pub fn status(status: &RunStatus) -> Value {
    json!({
        "run_id": status.run_id,
        "live": true,
        "state": format!("{:?}", status.state),
        "step": status.current_step,
        "workflow": status.workflow,
        "reruns": status.reruns,
        "scheduled_for_ms": opt_ms(status.scheduled_for),
        "children_live": status.children_live,
    })
}

/// An ended run.
pub fn outcome(outcome: &RunOutcome) -> Value {
    json!({
        "run_id": outcome.run_id,
        "live": false,
        "status": format!("{:?}", outcome.status),
        "final_step": outcome.final_step,
        "workflow": outcome.workflow,
        "result": outcome.result.as_deref().map(String::from_utf8_lossy),
        "error": outcome.error,
        "headers": outcome.headers,
        "reruns": outcome.reruns,
    })
}

/// A page of runs.
pub fn runs(page: &RunPage) -> Value {
    let runs: Vec<Value> = page
        .runs
        .iter()
        .map(|run| {
            let (live, state) = match run.phase {
                RunPhase::Live(state) => (true, format!("{state:?}")),
                RunPhase::Ended(status) => (false, format!("{status:?}")),
            };
            json!({
                "run_id": run.run_id,
                "workflow": run.workflow,
                "live": live,
                "state": state,
                "step": run.step,
            })
        })
        .collect();
    let unreadable: Vec<Value> = page
        .unreadable
        .iter()
        .map(|run| json!({ "run_id": run.run_id, "error": run.error }))
        .collect();
    json!({ "runs": runs, "next": page.next, "unreadable": unreadable })
}

/// Every workflow's health.
/// `items` (a JSON array) with each element's fleet shard as a `shard`
/// field; an element whose shard is `None` (a single store) is unchanged.
pub fn with_shards(mut items: Value, shards: impl IntoIterator<Item = Option<u32>>) -> Value {
    if let Some(items) = items.as_array_mut() {
        for (item, shard) in items.iter_mut().zip(shards) {
            if let (Some(shard), Some(fields)) = (shard, item.as_object_mut()) {
                fields.insert("shard".into(), shard.into());
            }
        }
    }
    items
}

pub fn workflows(all: &[WorkflowHealth]) -> Value {
    let all: Vec<Value> = all
        .iter()
        .map(|h| {
            let breaker = match &h.status {
                BreakerStatus::Closed => json!({ "state": "closed" }),
                BreakerStatus::Backoff {
                    until,
                    streak,
                    last_error,
                } => json!({
                    "state": "backoff",
                    "until_ms": ms(*until),
                    "streak": streak,
                    "last_error": last_error,
                }),
                BreakerStatus::Tripped {
                    streak,
                    last_error,
                    since,
                } => json!({
                    "state": "tripped",
                    "since_ms": ms(*since),
                    "streak": streak,
                    "last_error": last_error,
                }),
                other => json!({ "state": format!("{other:?}") }),
            };
            json!({
                "workflow": h.name,
                "breaker": breaker,
                "failure_streak": h.failure_streak,
                "runs_succeeded": h.runs_succeeded,
                "runs_failed": h.runs_failed,
                "last_error": h.last_error,
            })
        })
        .collect();
    Value::Array(all)
}

/// Every schedule.
pub fn schedules(all: &[ScheduleInfo]) -> Value {
    let all: Vec<Value> = all
        .iter()
        .map(|s| {
            let kind = match &s.kind {
                ScheduleKind::Every { interval } => json!({
                    "kind": "every",
                    "interval_ms": u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
                }),
                ScheduleKind::Cron { expr, time_zone } => json!({
                    "kind": "cron",
                    "expr": expr,
                    "time_zone": time_zone,
                }),
                other => json!({ "kind": format!("{other:?}").to_lowercase() }),
            };
            let last = match &s.last_outcome {
                None => Value::Null,
                Some(LastRun::Live) => json!("live"),
                Some(LastRun::Ended(status)) => json!(format!("{status:?}")),
                Some(other) => json!(format!("{other:?}").to_lowercase()),
            };
            json!({
                "schedule": s.id,
                "when": kind,
                "workflow": s.workflow,
                "active": s.active,
                "paused": s.paused,
                "next_fire_ms": opt_ms(s.next_fire),
                "last_fire_ms": opt_ms(s.last_fire),
                "last_run_id": s.last_run_id,
                "last_run": last,
                "run_count": s.run_count,
                "buffered": s.buffered,
                "skipped_overlap": s.skipped_overlap,
                "suppressed_backoff": s.suppressed_backoff,
                "suppressed_tripped": s.suppressed_tripped,
                "missed": s.missed,
                "last_error": s.last_error,
            })
        })
        .collect();
    Value::Array(all)
}
