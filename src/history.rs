//! Step history: a durable, bounded record per run of each step's
//! attempts — when each started and ended (queue clock), how it ended (the
//! next step, a delay, a wait for a signal, a retry, a breaker deferral or
//! parking, children, a new segment, the run's end) and its error.
//!
//! One entry per settlement, written in that settlement's transaction as
//! one more KV put: `wm/Q/data/{id}/hist/{seq:020}`; a run that ends
//! outside a settlement (a cancel or deadline removing its waiting step,
//! the reconcile of a dead step job) gets its ending as an entry in that
//! terminal transaction. The entry's number
//! travels on the run's step jobs (header `workflow.history`, the next
//! number), so writing an entry reads nothing. A run keeps at most
//! `WorkflowRuntimeBuilder::step_history` entries: entry `seq` deletes entry
//! `seq - limit` in the same commit, and a reader counts the dropped ones.
//! Error texts are cut to [`MAX_HISTORY_ERROR_BYTES`]. The entries live under
//! the run's data, so they are deleted with its outcome at retention, and a
//! new segment (`ContinueAsNew`) starts a fresh history whose first entry
//! is the step that continued as new.

use std::collections::HashMap;
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use taquba::{JobRecord, KvOrder, QueueView, SettlementEffects};

use crate::error::Error;
use crate::hook::{RunOutcome, TerminalStatus};
use crate::record::{Keys, bounded, decode, encode, parse_step_extras, validate_name};

/// The header carrying the number of the run's next history entry.
pub const HEADER_HISTORY: &str = "workflow.history";

/// The entries a run's history keeps by default (the oldest are dropped).
pub const DEFAULT_HISTORY_ENTRIES: u32 = 256;

/// The longest error text a history entry keeps, in bytes (cut on a char
/// boundary, marked).
pub const MAX_HISTORY_ERROR_BYTES: usize = 1024;

/// How one attempt of a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AttemptOutcome {
    /// The run went on to the next step at once.
    Continued,
    /// The run went on to the next step, due at `until_ms` (`ContinueAfter`).
    Delayed {
        /// When the next step is due (ms since the Unix epoch, queue clock).
        until_ms: u64,
    },
    /// The next step waits for a signal until `until_ms` (`WaitForSignal`).
    WaitingForSignal {
        /// When the wait times out (ms, queue clock).
        until_ms: u64,
    },
    /// The step spawned children; the next step waits for them.
    SpawnedChildren {
        /// How many.
        children: u32,
    },
    /// The run continued as new: this is the first entry of `segment`.
    ContinuedAsNew {
        /// The new segment's number.
        segment: u32,
    },
    /// The attempt failed with a transient error; the step runs again at
    /// `at_ms`.
    Retrying {
        /// When the next attempt is due (ms, queue clock).
        at_ms: u64,
    },
    /// The workflow's breaker was in backoff: the step did not run and waits
    /// until `until_ms` (no attempt spent).
    Deferred {
        /// When the step runs (ms, queue clock).
        until_ms: u64,
    },
    /// The workflow's breaker was tripped: the step did not run and is
    /// parked until the breaker closes (no attempt spent).
    Parked,
    /// The run ended.
    Ended {
        /// How.
        status: TerminalStatus,
    },
}

/// One settled attempt of a step (or a settlement that did not run it: a
/// deferral, a parking, a cancel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StepAttempt {
    /// The step.
    pub step: u32,
    /// Which attempt of the step (1-based; a deferral or parking does not
    /// spend one, so the next entry repeats its number).
    pub attempt: u32,
    /// The step job that was claimed.
    pub job_id: String,
    /// When the worker took the claim (ms since the Unix epoch, queue
    /// clock).
    pub started_ms: u64,
    /// When the settlement was built (ms, queue clock).
    pub ended_ms: u64,
    /// Whether a signal woke the step (it waited after `WaitForSignal`).
    pub signalled: bool,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The error, for a failed attempt or run (at most
    /// [`MAX_HISTORY_ERROR_BYTES`]).
    pub error: Option<String>,
}

/// One step's consecutive entries in a run's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StepHistory {
    /// The step.
    pub step: u32,
    /// Its settled attempts, in order.
    pub attempts: Vec<StepAttempt>,
}

/// A run's step history (of its current segment), oldest first. A step
/// appears once per visit: a re-run from an earlier step starts a new
/// [`StepHistory`] for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RunHistory {
    /// The run.
    pub run_id: String,
    /// The steps, in the order they settled.
    pub steps: Vec<StepHistory>,
    /// How many of the oldest entries were dropped to keep the history
    /// within its limit.
    pub dropped: u64,
}

/// The number of the run's next history entry, from a step job's headers.
pub(crate) fn seq_of(headers: &HashMap<String, String>) -> u64 {
    headers
        .get(HEADER_HISTORY)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Add entry `seq` of the run's history to `effects`, and drop the entry
/// that falls out of a history of `limit` entries.
pub(crate) fn record(
    effects: SettlementEffects,
    keys: &Keys,
    run_id: &str,
    seq: u64,
    limit: u32,
    mut entry: StepAttempt,
) -> Result<SettlementEffects, Error> {
    entry.error = entry.error.map(|e| bounded(e, MAX_HISTORY_ERROR_BYTES));
    let key = keys.history_entry(run_id, seq);
    let value = encode(&key, &entry)?;
    let mut effects = effects.kv_put(key, value);
    if let Some(old) = seq.checked_sub(u64::from(limit)) {
        effects = effects.kv_delete(keys.history_entry(run_id, old));
    }
    Ok(effects)
}

/// Add the entry of a run that ends outside a settlement (a cancel or a
/// deadline removing its waiting step, the reconcile of a step job the
/// queue dead-lettered) to `effects`: its final step's job `job`, marked
/// with how the run ended. Its attempt is the step's attempts so far (0
/// when the step never ran); it started when the job was last claimed
/// (`now` when never).
pub(crate) fn record_ending(
    effects: SettlementEffects,
    keys: &Keys,
    limit: u32,
    outcome: &RunOutcome,
    job: &JobRecord,
    now: u64,
) -> Result<SettlementEffects, Error> {
    if limit == 0 {
        return Ok(effects);
    }
    let before = parse_step_extras(&job.headers).map_or(0, |(_, before)| before);
    let entry = StepAttempt {
        step: outcome.final_step,
        attempt: before.saturating_add(job.attempts),
        job_id: job.id.clone(),
        started_ms: job.claimed_at.unwrap_or(now),
        ended_ms: now,
        signalled: job.signal.is_some(),
        outcome: AttemptOutcome::Ended {
            status: outcome.status,
        },
        error: outcome.error.clone(),
    };
    let seq = seq_of(&job.headers);
    record(effects, keys, &outcome.run_id, seq, limit, entry)
}

/// The number after the run's last history entry (0 for none).
pub(crate) async fn next_seq(view: &QueueView, keys: &Keys, run_id: &str) -> Result<u64, Error> {
    let prefix = keys.history_prefix(run_id);
    let page = view.kv_scan(&prefix, .., KvOrder::Descending, 1).await?;
    Ok(page
        .entries
        .first()
        .and_then(|(key, _)| seq_in(&prefix, key))
        .map_or(0, |seq| seq.saturating_add(1)))
}

/// The entry number in a history key.
fn seq_in(prefix: &[u8], key: &[u8]) -> Option<u64> {
    std::str::from_utf8(key.get(prefix.len()..)?)
        .ok()?
        .parse()
        .ok()
}

/// The entries read at once.
const PAGE: usize = 256;

/// A run's history entries, oldest first, and the number after the last.
pub(crate) async fn entries(
    view: &QueueView,
    keys: &Keys,
    run_id: &str,
) -> Result<(Vec<StepAttempt>, u64), Error> {
    validate_name("run id", run_id)?;
    let prefix = keys.history_prefix(run_id);
    let mut out = Vec::new();
    let mut next = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let range = match &after {
            Some(last) => (Bound::Excluded(last.clone()), Bound::Unbounded),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        let page = view
            .kv_scan(&prefix, range, KvOrder::Ascending, PAGE)
            .await?;
        for (key, value) in &page.entries {
            out.push(decode::<StepAttempt>(key, value)?);
            if let Some(seq) = seq_in(&prefix, key) {
                next = seq.saturating_add(1);
            }
        }
        match page.entries.last() {
            Some((key, _)) if page.more => after = Some(key.to_vec()),
            _ => return Ok((out, next)),
        }
    }
}

/// Group a run's entries into its history.
pub(crate) fn assemble(run_id: &str, entries: Vec<StepAttempt>, next: u64) -> RunHistory {
    let dropped = next.saturating_sub(entries.len() as u64);
    let mut steps: Vec<StepHistory> = Vec::new();
    for entry in entries {
        match steps.last_mut() {
            Some(last) if last.step == entry.step => last.attempts.push(entry),
            _ => steps.push(StepHistory {
                step: entry.step,
                attempts: vec![entry],
            }),
        }
    }
    RunHistory {
        run_id: run_id.to_string(),
        steps,
        dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(step: u32, attempt: u32, outcome: AttemptOutcome) -> StepAttempt {
        StepAttempt {
            step,
            attempt,
            job_id: "j".into(),
            started_ms: 1,
            ended_ms: 2,
            signalled: false,
            outcome,
            error: None,
        }
    }

    #[test]
    fn entries_round_trip_through_the_record_encoding() {
        for outcome in [
            AttemptOutcome::Continued,
            AttemptOutcome::Delayed { until_ms: 5 },
            AttemptOutcome::WaitingForSignal { until_ms: 6 },
            AttemptOutcome::SpawnedChildren { children: 3 },
            AttemptOutcome::ContinuedAsNew { segment: 2 },
            AttemptOutcome::Retrying { at_ms: 7 },
            AttemptOutcome::Deferred { until_ms: 8 },
            AttemptOutcome::Parked,
            AttemptOutcome::Ended {
                status: TerminalStatus::Failed,
            },
        ] {
            let mut entry = attempt(1, 2, outcome);
            entry.error = Some("boom".into());
            let bytes = encode(b"k", &entry).unwrap();
            assert_eq!(decode::<StepAttempt>(b"k", &bytes).unwrap(), entry);
        }
    }

    #[test]
    fn recording_bounds_the_error_and_drops_the_entry_past_the_limit() {
        let keys = Keys::new("q");
        let mut entry = attempt(0, 1, AttemptOutcome::Continued);
        entry.error = Some("x".repeat(MAX_HISTORY_ERROR_BYTES * 2));
        let effects = record(SettlementEffects::default(), &keys, "r", 10, 4, entry).unwrap();
        let (key, value) = effects.kv_writes.iter().next().unwrap();
        assert_eq!(key.as_slice(), keys.history_entry("r", 10).as_slice());
        let stored: StepAttempt = decode(key, value).unwrap();
        assert!(stored.error.unwrap().len() < MAX_HISTORY_ERROR_BYTES + 32);
        assert_eq!(effects.kv_deletes, vec![keys.history_entry("r", 6)]);
        let entry = attempt(0, 1, AttemptOutcome::Continued);
        let effects = record(SettlementEffects::default(), &keys, "r", 3, 4, entry).unwrap();
        assert!(effects.kv_deletes.is_empty());
    }

    #[test]
    fn assembling_groups_consecutive_entries_of_a_step_and_counts_the_dropped() {
        let entries = vec![
            attempt(0, 1, AttemptOutcome::Continued),
            attempt(1, 1, AttemptOutcome::Retrying { at_ms: 9 }),
            attempt(1, 2, AttemptOutcome::Continued),
            attempt(0, 1, AttemptOutcome::Continued),
        ];
        let history = assemble("r", entries, 6);
        assert_eq!(history.dropped, 2);
        let steps: Vec<(u32, usize)> = history
            .steps
            .iter()
            .map(|s| (s.step, s.attempts.len()))
            .collect();
        assert_eq!(steps, vec![(0, 1), (1, 2), (0, 1)]);
    }
}
