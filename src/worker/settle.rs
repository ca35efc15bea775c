//! Committing a step's settlement.
//!
//! The settlement is one value: a [`Settlement`] holds how the step's job
//! ends, every effect that commits with it, and the work that follows the
//! commit. Contributors add to it — the verdict (the next step, a wait for a
//! signal, a retry, a new segment, or the run's terminal effects, which
//! record a child's ending into its parent), the children a step spawns
//! (`children::spawn_effects`), the effects the runner
//! staged (when the settlement commits the outcome it returned), the next
//! step's kept input (for a re-run), the step's history entry
//! ([`crate::history`]) and the workflow's health — and
//! [`settle`] commits it in one transaction and runs its aftermath. A
//! feature that must
//! commit with a step adds a contributor, not a branch in the commit.

use std::sync::Arc;
use std::time::Duration;

use taquba::{
    EnqueueOptions, EnqueueRequest, EnqueueResult, Error as QueueError, JobStatus,
    SettlementEffects,
};
use tracing::Instrument;

use super::metrics;
use super::step::{Health, StepJob, Verdict};
use crate::breaker::{Parking, Staged, ms_to_time};
use crate::effects::{self, RESERVED_KEY_PREFIX};
use crate::error::Error;
use crate::history::{self, AttemptOutcome, HEADER_HISTORY, StepAttempt};
use crate::hook::{RunOutcome, TerminalHook};
use crate::pending::app_key;
use crate::policy::saturating_ms;
use crate::record::{
    self, HEADER_ATTEMPTS_BEFORE, HEADER_JOIN, HEADER_PARKED, HEADER_SIGNAL, HEADER_STEP,
    RunRecord, SignalledPayload, encode,
};
use crate::runner::StepRunner;
use crate::runtime::{Inner, KvEntry, Terminal, TerminalHold};

/// One step's settlement, built by contributors and committed by [`settle`].
struct Settlement<'a> {
    /// How the step's job ends.
    end: JobEnd,
    /// Everything that commits with it.
    effects: SettlementEffects,
    /// Other runs the commit creates or moves (children it spawns): it is
    /// a commit in flight for them too.
    runs: Vec<String>,
    /// What to do once it has committed.
    after: Aftermath<'a>,
}

/// How a settlement ends the step's job.
enum JobEnd {
    Ack,
    DeadLetter(String),
}

/// The work after a settlement's commit, run in this order.
#[derive(Default)]
struct Aftermath<'a> {
    /// Remember the step jobs the commit enqueued (admitted without a read).
    remember_enqueued: bool,
    /// The committed health change: cache, breaker events, parked steps.
    health: Option<Staged>,
    /// A parking's hold on the breaker (no reset can slip between its
    /// re-check and its commit); released after the commit.
    parking: Option<Parking>,
    /// The run ended: wake its `wait` callers.
    ended: Option<RunOutcome>,
    /// The run's tally (folds wait for it), its join locks and its
    /// parent's pending commit, held until the commit has returned.
    terminal: Option<TerminalHold<'a>>,
    /// The ids of the runs the commit creates (children), locked against
    /// any other creation until the commit has returned.
    creating: Vec<crate::sync::KeyedGuard<'a>>,
}

impl<'a> Settlement<'a> {
    /// This settlement with a KV put added to its effects.
    fn with(mut self, put: Option<KvEntry>) -> Self {
        if let Some((key, value)) = put {
            self.effects = self.effects.kv_put(key, value);
        }
        self
    }

    /// A settlement that moves the run to a new step job.
    fn moving(effects: SettlementEffects) -> Self {
        Self {
            end: JobEnd::Ack,
            effects,
            runs: Vec::new(),
            after: Aftermath {
                remember_enqueued: true,
                ..Aftermath::default()
            },
        }
    }

    /// A settlement that ends the run with `outcome`.
    async fn ending<R, H>(
        inner: &'a Inner<R, H>,
        job: &StepJob,
        end: JobEnd,
        outcome: RunOutcome,
    ) -> Result<Self, Error> {
        let Some(Terminal { effects, hold }) = inner
            .terminal_effects(&outcome, &job.claim.headers, None)
            .await?
        else {
            return Err(Error::RunNotFound(job.run_id.clone()));
        };
        Ok(Self {
            end,
            effects,
            runs: Vec::new(),
            after: Aftermath {
                ended: Some(outcome),
                terminal: Some(hold),
                ..Aftermath::default()
            },
        })
    }
}

/// Build the step's settlement from its verdict, the runner's staged
/// effects (empty unless the verdict commits the outcome the runner
/// returned) and its health change, commit it, and run its aftermath.
/// Returns whether it committed.
pub(super) async fn settle<R: StepRunner, H: TerminalHook>(
    inner: &Arc<Inner<R, H>>,
    job: &StepJob,
    verdict: Verdict,
    health: Health,
    staged: SettlementEffects,
) -> bool {
    let (verdict, parking) = recheck_parking(inner, job, verdict).await;
    let outcome = metrics::outcome_label(&verdict);
    let kept = kept_input(inner, job, &verdict);
    let entry = history_entry(inner, job, &verdict, &health);
    let built = match from_verdict(inner, job, verdict).await {
        Ok(mut settlement) => {
            settlement.after.parking = parking;
            // The runner's staged effects: keys and queues apart from ours.
            settlement.effects = effects::merge(settlement.effects, staged);
            match kept.and_then(|kept| with_history(inner, job, entry, settlement.with(kept))) {
                Ok(settlement) => with_health(inner, job, health, settlement).await,
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let settlement = match built {
        Ok(settlement) => settlement,
        Err(e) => return give_up(inner, job, &e.to_string()).await,
    };
    match counted(inner, job, settlement, outcome).await {
        Ok(()) => true,
        Err(QueueError::ClaimLost) => {
            claim_lost(inner, job).await;
            false
        }
        Err(e) if e.is_permanent() => give_up(inner, job, &e.to_string()).await,
        Err(e) => {
            // The store failed. Nothing committed: the claim stays until its
            // lease ends (or the next open) and the step runs again.
            tracing::warn!("settling the step failed; it will be retried: {e}");
            false
        }
    }
}

/// A parking re-checks the breaker under its lock, held across the commit:
/// if a close came first, the step runs now instead of parking.
async fn recheck_parking<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    verdict: Verdict,
) -> (Verdict, Option<Parking>) {
    let Verdict::Again {
        at,
        spent,
        parked: true,
    } = verdict
    else {
        return (verdict, None);
    };
    match inner.breakers.stage_park(&inner.queue, &job.workflow).await {
        Ok(None) => (
            Verdict::Again {
                at: inner.now_ms(),
                spent,
                parked: false,
            },
            None,
        ),
        parking => {
            if let Err(e) = &parking {
                tracing::warn!("reading the workflow's health failed; parking the step: {e}");
            }
            let verdict = Verdict::Again {
                at,
                spent,
                parked: true,
            };
            (verdict, parking.ok().flatten())
        }
    }
}

/// The verdict's contribution: the step's next job (with the children it
/// spawns), or the run's end.
async fn from_verdict<'a, R, H>(
    inner: &'a Inner<R, H>,
    job: &StepJob,
    verdict: Verdict,
) -> Result<Settlement<'a>, Error> {
    match verdict {
        Verdict::Next {
            payload,
            delay,
            signal_wait,
        } => Ok(Settlement::moving(next_step_effects(
            inner,
            job,
            payload,
            delay,
            signal_wait,
        )?)),
        Verdict::Again { at, spent, parked } => Ok(Settlement::moving(again_effects(
            inner, job, at, spent, parked,
        )?)),
        Verdict::Spawn {
            children,
            payload,
            fail_fast,
        } => {
            let (effects, runs) =
                super::children::spawn_effects(inner, job, children, payload, fail_fast)?;
            // Children are created without a compare: no run may hold
            // their ids, now or until the commit has returned.
            let (creating, taken) = inner.lock_new_runs(&runs).await?;
            if let Some(id) = taken.into_iter().next() {
                return Err(Error::ChildIdTaken(id));
            }
            let mut settlement = Settlement::moving(effects);
            settlement.runs = runs;
            settlement.after.creating = creating;
            Ok(settlement)
        }
        Verdict::NewSegment { input } => Ok(Settlement::moving(
            new_segment_effects(inner, job, input).await?,
        )),
        Verdict::End(outcome) => Settlement::ending(inner, job, JobEnd::Ack, outcome).await,
        Verdict::DeadLetter(why, outcome) => {
            Settlement::ending(inner, job, JobEnd::DeadLetter(why), outcome).await
        }
    }
}

/// The kept input's contribution: the next step's input payload, kept for
/// a re-run (see `WorkflowRuntimeBuilder::keep_step_inputs`).
fn kept_input<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    verdict: &Verdict,
) -> Result<Option<KvEntry>, Error> {
    match verdict {
        Verdict::Next { payload, .. } | Verdict::Spawn { payload, .. } => {
            inner.kept_input(&job.run_id, job.step.saturating_add(1), payload)
        }
        Verdict::NewSegment { input } => inner.kept_input(&job.run_id, 0, input),
        _ => Ok(None),
    }
}

/// The step's history entry for this settlement (`None` when the runtime
/// keeps no history): how the attempt ended, read off the verdict.
fn history_entry<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    verdict: &Verdict,
    health: &Health,
) -> Option<StepAttempt> {
    if inner.cfg.history_entries == 0 {
        return None;
    }
    let now = inner.now_ms();
    let after = |d: &Option<Duration>| now.saturating_add(d.map_or(0, saturating_ms));
    let failure = match health {
        Health::Failure(e) => Some(e.clone()),
        _ => None,
    };
    let (outcome, error) = match verdict {
        Verdict::Next {
            signal_wait: true,
            delay,
            ..
        } => (
            AttemptOutcome::WaitingForSignal {
                until_ms: after(delay),
            },
            None,
        ),
        Verdict::Next { delay: None, .. } => (AttemptOutcome::Continued, None),
        Verdict::Next { delay, .. } => (
            AttemptOutcome::Delayed {
                until_ms: after(delay),
            },
            None,
        ),
        Verdict::Spawn { children, .. } => (
            AttemptOutcome::SpawnedChildren {
                children: u32::try_from(children.len()).unwrap_or(u32::MAX),
            },
            None,
        ),
        Verdict::NewSegment { .. } => (
            AttemptOutcome::ContinuedAsNew {
                segment: record::segment_of(&job.claim.headers).saturating_add(1),
            },
            None,
        ),
        Verdict::Again {
            at, spent: true, ..
        } => (AttemptOutcome::Retrying { at_ms: *at }, failure),
        Verdict::Again { parked: true, .. } => (AttemptOutcome::Parked, None),
        Verdict::Again { at, .. } => (AttemptOutcome::Deferred { until_ms: *at }, None),
        Verdict::End(outcome) | Verdict::DeadLetter(_, outcome) => (
            AttemptOutcome::Ended {
                status: outcome.status,
            },
            outcome.error.clone(),
        ),
    };
    Some(job.attempt_entry(now, outcome, error))
}

/// The history's contribution: the step's entry (a new segment's first),
/// and the drop of the entry that falls out of the run's bounded history.
fn with_history<'a, R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    entry: Option<StepAttempt>,
    mut settlement: Settlement<'a>,
) -> Result<Settlement<'a>, Error> {
    let Some(entry) = entry else {
        return Ok(settlement);
    };
    // A new segment's history starts afresh (its data is deleted).
    let seq = match entry.outcome {
        AttemptOutcome::ContinuedAsNew { .. } => 0,
        _ => job.history,
    };
    settlement.effects = history::record(
        settlement.effects,
        &inner.keys,
        &job.run_id,
        seq,
        inner.cfg.history_entries,
        entry,
    )?;
    Ok(settlement)
}

/// Carry the number of the run's next history entry on its next step job:
/// one past this settlement's entry (`first` for a new segment's).
fn carry_history<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    headers: &mut std::collections::HashMap<String, String>,
    new_segment: bool,
) {
    if inner.cfg.history_entries == 0 {
        return;
    }
    let next = if new_segment {
        1
    } else {
        job.history.saturating_add(1)
    };
    record::set_header(headers, HEADER_HISTORY, next.to_string());
}

/// The workflow health's contribution: the health record, when the attempt
/// changes it (its writer lock is held until the aftermath).
async fn with_health<'a, R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    health: Health,
    mut settlement: Settlement<'a>,
) -> Result<Settlement<'a>, Error> {
    let failure = match &health {
        Health::Neutral => return Ok(settlement),
        Health::Success => None,
        Health::Failure(e) => Some(e.as_str()),
    };
    let staged = inner
        .breakers
        .stage(&inner.queue, &job.workflow, failure, inner.now_ms())
        .await
        .unwrap_or_else(|e| {
            tracing::warn!("reading the workflow's health failed; not updating it: {e}");
            None
        });
    if let Some(staged) = staged {
        settlement.effects = inner.breakers.apply(&staged, settlement.effects)?;
        settlement.after.health = Some(staged);
    }
    Ok(settlement)
}

/// [`commit`] in a `settle` span (run id, workflow, step, attempt and what
/// the step became), counted and timed in the metrics once it committed.
async fn counted<R: StepRunner, H: TerminalHook>(
    inner: &Arc<Inner<R, H>>,
    job: &StepJob,
    settlement: Settlement<'_>,
    outcome: &'static str,
) -> Result<(), QueueError> {
    let span = tracing::info_span!(
        "settle",
        run_id = %job.run_id,
        workflow = %job.workflow,
        step = job.step,
        attempt = job.attempts(),
        outcome,
    );
    let started = std::time::Instant::now();
    commit(inner, job, settlement).instrument(span).await?;
    metrics::step_settled(&job.workflow, outcome, started.elapsed());
    Ok(())
}

/// Commit a settlement in one transaction, then run its aftermath.
async fn commit<R: StepRunner, H: TerminalHook>(
    inner: &Arc<Inner<R, H>>,
    job: &StepJob,
    settlement: Settlement<'_>,
) -> Result<(), QueueError> {
    let Settlement {
        end,
        mut effects,
        runs,
        after,
    } = settlement;
    // A key both deleted and written (a new segment's kept input) is
    // written: the delete clears the old segment's value.
    if !effects.kv_writes.is_empty() {
        let writes = &effects.kv_writes;
        effects.kv_deletes.retain(|key| !writes.contains_key(key));
    }
    let queue = &inner.queue;
    // Which enqueues are step jobs to remember (the runner's staged ones
    // go elsewhere; a join's placeholder is never claimed, so it is not
    // remembered: it would stay in the set for good).
    let steps: Vec<bool> = effects
        .enqueues
        .iter()
        .map(|e| e.queue == inner.cfg.queue_name && !e.options.headers.contains_key(HEADER_JOIN))
        .collect();
    {
        let _pending = inner.pending.begin(&job.run_id);
        let _others: Vec<_> = runs.iter().map(|r| inner.pending.begin(r)).collect();
        // The application keys the runner staged (every key outside
        // Waymark's own `wm/`), which `StagedEffects::get` waits for.
        let _app_keys: Vec<_> = effects
            .kv_writes
            .keys()
            .chain(&effects.kv_deletes)
            .filter(|key| !key.starts_with(RESERVED_KEY_PREFIX))
            .map(|key| inner.app_keys.begin(app_key(key)))
            .collect();
        let enqueued = match &end {
            JobEnd::Ack => queue.ack_with(&job.claim, effects).await?,
            JobEnd::DeadLetter(why) => queue.dead_letter_with(&job.claim, why, effects).await?,
        };
        // Remembered while the commit still counts as pending: a claim of
        // the next step that waits for this commit must find its job
        // remembered when it wakes, or it reads the run record for nothing.
        if after.remember_enqueued {
            inner
                .pending
                .enqueued(enqueued.iter().zip(steps).filter_map(|(e, step)| match e {
                    EnqueueResult::New(id) if step => Some(id.as_str()),
                    _ => None,
                }));
        }
    }
    drop(after.creating);
    #[cfg(feature = "testkit")]
    if let Some(probe) = &inner.probe {
        let attempt = job.attempts();
        probe
            .settled(&job.claim.id, &job.run_id, job.step, attempt)
            .await;
    }
    drop(after.parking);
    if let Some(hold) = after.terminal {
        hold.done(queue, true).await;
    }
    if let Some(staged) = &after.health
        && staged.releases_parked()
    {
        let inner = inner.clone();
        let workflow = job.workflow.to_string();
        tokio::spawn(async move {
            let _watch = super::watched(&inner, &format!("release {workflow}"));
            if let Err(e) = inner
                .breakers
                .release_parked(&inner.queue, &workflow, false)
                .await
            {
                tracing::warn!(workflow, "releasing parked steps failed: {e}");
            }
        });
    }
    if let Some(outcome) = after.ended {
        tracing::info!(status = ?outcome.status, "run ended");
        inner.notify_terminal(outcome);
    }
    // Last: it calls the user's breaker observer.
    if let Some(staged) = after.health {
        inner.breakers.committed(staged);
    }
    Ok(())
}

/// The lease ran out and the reaper took the job back: a redelivery settles
/// it, or, if that was its last attempt, it is dead and the run is
/// reconciled here.
async fn claim_lost<R, H>(inner: &Inner<R, H>, job: &StepJob) {
    tracing::warn!("the step's claim was lost before it settled");
    if let Ok(Some(dead)) = inner.queue.view().job_record(&job.claim.id).await
        && dead.status == JobStatus::Dead
        && let Err(e) = inner.reconcile_dead(&dead).await
    {
        tracing::warn!("reconciling the dead step failed: {e}");
    }
}

/// The queue refused the settlement for good (its effects cannot be encoded
/// or stored): fail the run with the reason rather than leave it stuck.
/// Returns whether that committed.
async fn give_up<R: StepRunner, H: TerminalHook>(
    inner: &Arc<Inner<R, H>>,
    job: &StepJob,
    why: &str,
) -> bool {
    tracing::error!("cannot commit the step's settlement: {why}");
    let outcome = job.failed(&format!(
        "the runtime could not record the step's result: {why}"
    ));
    let entry = (inner.cfg.history_entries > 0).then(|| {
        let ended = AttemptOutcome::Ended {
            status: outcome.status,
        };
        job.attempt_entry(inner.now_ms(), ended, outcome.error.clone())
    });
    let ending = Settlement::ending(inner, job, JobEnd::DeadLetter(why.to_string()), outcome).await;
    let settlement = match ending.and_then(|settlement| with_history(inner, job, entry, settlement))
    {
        Ok(settlement) => settlement,
        Err(e) => {
            tracing::error!("cannot encode the run's outcome either; the step stays claimed: {e}");
            return false;
        }
    };
    match counted(inner, job, settlement, "dead_lettered").await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(
                "failing the run failed too; the step stays claimed until its lease ends: {e}"
            );
            false
        }
    }
}

/// The effects that move a run to its next step; with `signal_wait`, the
/// next step's job waits for a signal until `delay` passes.
pub(super) fn next_step_effects<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    payload: Vec<u8>,
    delay: Option<Duration>,
    signal_wait: bool,
) -> Result<SettlementEffects, Error> {
    let mut headers = job.claim.headers.clone();
    headers.remove(HEADER_ATTEMPTS_BEFORE);
    headers.remove(HEADER_PARKED);
    headers.remove(HEADER_SIGNAL);
    headers.remove(record::HEADER_JOIN);
    if signal_wait {
        headers.insert(record::HEADER_SIGNAL_SENDER.to_string(), "1".to_string());
    } else {
        headers.remove(record::HEADER_SIGNAL_SENDER);
    }
    carry_history(inner, job, &mut headers, false);
    let run_at = delay.map(|d| inner.now_ms().saturating_add(saturating_ms(d)));
    let next = job
        .step
        .checked_add(1)
        .ok_or_else(|| Error::CorruptRecord {
            key: job.claim.id.clone(),
            reason: format!("step {} has no next step number", job.step),
        })?;
    let mut effects = step_job_effects(
        inner,
        job,
        next,
        payload,
        headers,
        job.max_attempts(),
        run_at,
        None,
    )?;
    if signal_wait && let Some(next) = effects.enqueues.first_mut() {
        next.options.signal_wait = true;
    }
    Ok(effects)
}

/// The effects that move a step to a new job of its own (a retry, a breaker
/// deferral, or a parking).
fn again_effects<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    at: u64,
    spent: bool,
    parked: bool,
) -> Result<SettlementEffects, Error> {
    let before = if spent {
        job.attempts()
    } else {
        job.attempts().saturating_sub(1)
    };
    let remaining = job.max_attempts().saturating_sub(before).max(1);
    let mut headers = job.claim.headers.clone();
    headers.insert(HEADER_ATTEMPTS_BEFORE.to_string(), before.to_string());
    carry_history(inner, job, &mut headers, false);
    if parked {
        headers.insert(HEADER_PARKED.to_string(), "1".to_string());
    } else {
        headers.remove(HEADER_PARKED);
    }
    // A woken step keeps its signal on its new job.
    let payload = match &job.signal {
        Some(signal) => {
            headers.insert(HEADER_SIGNAL.to_string(), "1".to_string());
            let carried = SignalledPayload {
                payload: job.payload().to_vec(),
                signal: signal.clone(),
            };
            encode(job.claim.id.as_bytes(), &carried)?
        }
        None => {
            headers.remove(HEADER_SIGNAL);
            job.payload().to_vec()
        }
    };
    step_job_effects(
        inner,
        job,
        job.step,
        payload,
        headers,
        remaining,
        Some(at),
        Some(parked),
    )
}

/// Enqueue step `step` of the job's run as a new job and point the run
/// record at it; `parked` adds (or not) the park index entry.
///
/// The job carries no dedup key (no step job does): it is enqueued only by
/// the settlement of the job before it, which commits under that job's
/// claim, so at most once; and the run record names it by id, so a second
/// job for the step would be refused at admit anyway. A dedup key would
/// cost a read and two writes per step, and a hit would point the record at
/// a job that was never written.
#[allow(clippy::too_many_arguments)]
fn step_job_effects<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    step: u32,
    payload: Vec<u8>,
    mut headers: std::collections::HashMap<String, String>,
    max_attempts: u32,
    run_at: Option<u64>,
    parked: Option<bool>,
) -> Result<SettlementEffects, Error> {
    let job_id = inner.queue.next_job_id();
    record::set_header(&mut headers, HEADER_STEP, step.to_string());
    let options = EnqueueOptions::default()
        .id_override(job_id.clone())
        .headers(headers)
        .priority(job.claim.priority)
        .max_attempts(max_attempts)
        .run_at(run_at.map(ms_to_time));
    let run_key = inner.keys.run(&job.run_id);
    let mut effects = SettlementEffects::default().enqueue(EnqueueRequest {
        queue: inner.cfg.queue_name.clone(),
        payload,
        options,
    });
    if parked == Some(true) {
        let (key, value) = inner
            .breakers
            .park_entry(&job.workflow, &job_id, &job.run_id);
        effects = effects.kv_put(key, value);
    }
    let run = encode(&run_key, &RunRecord { step, job_id })?;
    Ok(effects.kv_put(run_key, run))
}

/// The effects that start a new segment of the run (`ContinueAsNew`): step
/// 0 as a new job with `input` (the run's headers, deadline and parent link
/// kept, `workflow.segment` counted up), the run record pointing at it, and
/// every key of the run's data deleted (memo entries, kept inputs, joins).
async fn new_segment_effects<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    input: Vec<u8>,
) -> Result<SettlementEffects, Error> {
    let mut headers = job.claim.headers.clone();
    for reserved in [
        HEADER_ATTEMPTS_BEFORE,
        HEADER_PARKED,
        HEADER_SIGNAL,
        record::HEADER_JOIN,
    ] {
        headers.remove(reserved);
    }
    carry_history(inner, job, &mut headers, true);
    let segment = record::segment_of(&headers).saturating_add(1);
    headers.insert(record::HEADER_SEGMENT.to_string(), segment.to_string());
    // The attempts each step gets carry over (a submit's own, or the
    // policy's); the counts start again.
    let attempts = job.max_attempts();
    let mut effects = step_job_effects(inner, job, 0, input, headers, attempts, None, None)?;
    for key in super::maintenance::scan_all(inner, &inner.keys.data(&job.run_id)).await? {
        effects = effects.kv_delete(key);
    }
    // The scan took the run's extent key with the rest: the new segment's
    // data is found by a scan at retention. (Writing `named` here would
    // overwrite the `scan` of a memo put that lands between the scan and
    // this commit, from a `Memo` the step's runner left behind, and leak
    // its entry.)
    Ok(effects)
}
