//! Runs in words, shared by the demo's output and the read commands.
//!
//! Step numbers are 1-based (`3/5 charge card`). The library's error texts
//! name the 0-based step (`step 2: ...`, `step 2 gave up after ...`); the
//! line around them already names the step, so that prefix is dropped here
//! and no 0-based number reaches the user.

use std::time::{Duration, SystemTime};

use waymark::{RunOutcome, RunState, RunStatus, TerminalStatus};

use crate::demo::domain::step_label;
use crate::plumbing::exit::one_line;

/// A live run's state in words.
pub fn state(status: &RunStatus) -> String {
    match status.state {
        RunState::Pending => "waiting for a worker".into(),
        RunState::Running => "running".into(),
        RunState::Scheduled => match status.scheduled_for {
            Some(at) => match at.duration_since(SystemTime::now()) {
                Ok(left) if left >= Duration::from_millis(100) => {
                    format!("scheduled, due in {:.1}s", left.as_secs_f64())
                }
                _ => "scheduled, due now".into(),
            },
            None => "scheduled".into(),
        },
        RunState::Cancelling => "cancelling".into(),
        RunState::Parked => "parked by its workflow's circuit breaker".into(),
        RunState::WaitingForSignal => match status.scheduled_for {
            Some(at) => match at.duration_since(SystemTime::now()) {
                Ok(left) => format!(
                    "waiting for a signal (`waymark signal`), timing out in {:.1}s",
                    left.as_secs_f64()
                ),
                Err(_) => "waiting for a signal; its timeout has passed".into(),
            },
            None => "waiting for a signal (`waymark signal`)".into(),
        },
        RunState::WaitingForChildren => match status.children_live {
            Some(1) => "waiting for 1 child run".into(),
            Some(n) => format!("waiting for {n} child runs"),
            None => "waiting for its child runs".into(),
        },
        _ => format!("{:?}", status.state),
    }
}

/// A terminal status in words.
pub fn status_word(status: TerminalStatus) -> &'static str {
    match status {
        TerminalStatus::Succeeded => "Succeeded",
        TerminalStatus::Failed => "Failed",
        TerminalStatus::Cancelled => "Cancelled",
        TerminalStatus::TimedOut => "TimedOut",
        _ => "Ended",
    }
}

/// The result of a succeeded run, or the error of another, without the
/// library's 0-based step prefix.
pub fn detail(outcome: &RunOutcome) -> String {
    match (&outcome.result, &outcome.error) {
        (Some(result), _) => one_line(&String::from_utf8_lossy(result)),
        (None, Some(error)) => one_line(strip_step(error, outcome.final_step)),
        (None, None) if outcome.status == TerminalStatus::Cancelled => {
            "cancelled by request".into()
        }
        (None, None) => "-".into(),
    }
}

/// A terminal outcome in one line: `Failed at step 3/5 charge card: ...`.
pub fn outcome_line(outcome: &RunOutcome) -> String {
    format!(
        "{} at step {}: {}",
        status_word(outcome.status),
        step_label(outcome.final_step),
        detail(outcome)
    )
}

/// `error` without a leading `step N: ` or `step N ` naming `step`.
fn strip_step(error: &str, step: u32) -> &str {
    let prefix = format!("step {step}");
    match error.strip_prefix(&prefix) {
        Some(rest) => rest
            .strip_prefix(": ")
            .or_else(|| rest.strip_prefix(' '))
            .unwrap_or(error),
        None => error,
    }
}

/// A queue-clock time (ms since the Unix epoch) as `2026-11-26 02:41:07.250Z`.
pub fn utc_ms(ms: u64) -> String {
    match chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX)) {
        Some(at) => at.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string(),
        None => format!("{ms} ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::strip_step;

    #[test]
    fn the_zero_based_step_prefix_is_dropped() {
        assert_eq!(strip_step("step 3: carrier refuses", 3), "carrier refuses");
        assert_eq!(
            strip_step("step 0 gave up after 4 attempts: boom", 0),
            "gave up after 4 attempts: boom"
        );
        assert_eq!(strip_step("step 30: x", 3), "step 30: x");
        assert_eq!(strip_step("card declined", 2), "card declined");
    }
}
