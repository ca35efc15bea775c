//! The pool's metrics, through the [`metrics`] facade: nothing is recorded
//! unless the application installs a recorder (for example
//! `metrics-exporter-prometheus`, as `waymark worker --metrics ADDR` does);
//! without one each call is a few label copies and a no-op.
//!
//! | name | kind | labels | what |
//! |------|------|--------|------|
//! | `waymark_steps_total` | counter | `workflow`, `outcome` | settled step attempts, by what they became: `continued`, `waiting`, `spawned`, `new_segment`, `succeeded`, `failed`, `cancelled`, `timed_out`, `retried`, `deferred`, `parked`, `dead_lettered` |
//! | `waymark_step_retries_total` | counter | `workflow` | attempts that failed and will be retried |
//! | `waymark_step_parks_total` | counter | `workflow` | steps parked by a tripped breaker |
//! | `waymark_breaker_trips_total` | counter | `workflow` | breakers that tripped (counted where the breaker announces it, `breaker.rs`) |
//! | `waymark_hook_deliveries_total` | counter | `outcome` | hook notifications: `delivered`, `retried`, `dead_lettered` |
//! | `waymark_settle_seconds` | histogram | `workflow` | a settlement's commit, from its start to the store's answer |
//! | `waymark_step_duration_seconds` | histogram | `workflow` | the runner's time for one attempt |
//! | `waymark_step_to_step_seconds` | histogram | `workflow` | from the time a step job could run (enqueued, or its `run_at`) to its claim |
//! | `waymark_steps_in_flight` | gauge | | step jobs claimed by this pool and not yet settled |
//! | `waymark_backlog` | gauge | `state` | step jobs on the queue: `pending`, `scheduled`, `claimed`, `dead` (sampled by the maintenance loop every 10 s) |
//! | `waymark_retention_lag_seconds` | gauge | | how far the oldest outcome retention has not yet deleted is past its expiry, after each retention pass (0 when none is due); past a tenth of `terminal_retention` (at least 60 s), while more runs end than retention deletes, it holds step claims back (`backpressure.rs`). On a fleet worker, the shards' passes share the one gauge |
//! | `waymark_retention_data_scans_total` | counter | | expired runs whose data retention found by a scan of the run's prefix (memo entries, children, a re-run, a new segment, more than 512 kept inputs and history entries, or an outcome written before Waymark named its run's data); the others' data is deleted by name |

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use taquba::QueueStats;

use super::step::Verdict;
use crate::hook::TerminalStatus;

/// The `outcome` label of a settled step.
pub(super) fn outcome_label(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Next {
            signal_wait: true, ..
        } => "waiting",
        Verdict::Next { .. } => "continued",
        Verdict::Spawn { .. } => "spawned",
        Verdict::NewSegment { .. } => "new_segment",
        Verdict::End(outcome) => match outcome.status {
            TerminalStatus::Succeeded => "succeeded",
            TerminalStatus::Failed => "failed",
            TerminalStatus::Cancelled => "cancelled",
            TerminalStatus::TimedOut => "timed_out",
        },
        Verdict::Again { spent: true, .. } => "retried",
        Verdict::Again { parked: true, .. } => "parked",
        Verdict::Again { .. } => "deferred",
        Verdict::DeadLetter(..) => "dead_lettered",
    }
}

// The workflow label is shared (`Arc<str>`): a step labels four samples
// with it, and copying it for each was a few allocations a step.

/// A step settled (committed) as `outcome` after a commit of `settle`.
pub(super) fn step_settled(workflow: &Arc<str>, outcome: &'static str, settle: Duration) {
    counter!("waymark_steps_total", "workflow" => workflow.clone(), "outcome" => outcome)
        .increment(1);
    match outcome {
        "retried" => {
            counter!("waymark_step_retries_total", "workflow" => workflow.clone()).increment(1)
        }
        "parked" => {
            counter!("waymark_step_parks_total", "workflow" => workflow.clone()).increment(1)
        }
        _ => {}
    }
    histogram!("waymark_settle_seconds", "workflow" => workflow.clone())
        .record(settle.as_secs_f64());
}

/// The runner took `took` for one attempt.
pub(super) fn step_ran(workflow: &Arc<str>, took: Duration) {
    histogram!("waymark_step_duration_seconds", "workflow" => workflow.clone())
        .record(took.as_secs_f64());
}

/// A step job was claimed `waited` after it could run.
pub(super) fn step_claimed(workflow: &Arc<str>, waited: Duration) {
    histogram!("waymark_step_to_step_seconds", "workflow" => workflow.clone())
        .record(waited.as_secs_f64());
}

/// A hook notification was settled as `outcome`.
pub(super) fn hook_settled(outcome: &'static str) {
    counter!("waymark_hook_deliveries_total", "outcome" => outcome).increment(1);
}

/// One step claimed by this pool and not yet settled, while it lives.
pub(super) struct StepInFlight(());

impl StepInFlight {
    /// Count one more step in flight until the value is dropped.
    pub(super) fn start() -> Self {
        gauge!("waymark_steps_in_flight").increment(1.0);
        Self(())
    }
}

impl Drop for StepInFlight {
    fn drop(&mut self) {
        gauge!("waymark_steps_in_flight").decrement(1.0);
    }
}

/// The step queue's job counts.
pub(super) fn backlog(stats: &QueueStats) {
    for (state, count) in [
        ("pending", stats.pending),
        ("scheduled", stats.scheduled),
        ("claimed", stats.claimed),
        ("dead", stats.dead),
    ] {
        gauge!("waymark_backlog", "state" => state).set(count as f64);
    }
}

/// Retention's lag after a pass.
pub(super) fn retention_lag(lag_ms: u64) {
    gauge!("waymark_retention_lag_seconds").set(lag_ms as f64 / 1000.0);
}

/// Expired runs whose data a retention pass found by a scan.
pub(super) fn retention_data_scans(runs: u64) {
    counter!("waymark_retention_data_scans_total").increment(runs);
}
