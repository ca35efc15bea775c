//! Committing a step's verdict in the one transaction that settles its job.

use std::sync::Arc;
use std::time::Duration;

use taquba::{
    EnqueueOptions, EnqueueRequest, EnqueueResult, Error as QueueError, JobStatus,
    SettlementEffects,
};

use super::step::{Health, StepJob, Verdict};
use crate::breaker::ms_to_time;
use crate::error::Error;
use crate::hook::TerminalHook;
use crate::record::{self, HEADER_ATTEMPTS_BEFORE, HEADER_PARKED, HEADER_STEP, RunRecord, encode};
use crate::runner::StepRunner;
use crate::runtime::Inner;

/// Commit a verdict, and the workflow health change it causes, with the
/// step's settlement.
pub(super) async fn settle<R: StepRunner, H: TerminalHook>(
    inner: &Arc<Inner<R, H>>,
    job: &StepJob,
    verdict: Verdict,
    health: Health,
) {
    let claim = &job.claim;
    let queue = &inner.queue;
    let now = inner.now_ms();
    let failure = match &health {
        Health::Failure(e) => Some(e.as_str()),
        _ => None,
    };
    let staged = match health {
        Health::Neutral => None,
        _ => inner
            .breakers
            .stage(queue, &job.workflow, failure, now)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!("reading the workflow's health failed; not updating it: {e}");
                None
            }),
    };
    let (effects, ended, dead) = match verdict {
        Verdict::Next { payload, delay } => {
            (next_step_effects(inner, job, payload, delay), None, None)
        }
        Verdict::Again { at, spent, parked } => {
            (again_effects(inner, job, at, spent, parked), None, None)
        }
        Verdict::End(outcome) => (inner.terminal_effects(&outcome), Some(outcome), None),
        Verdict::DeadLetter(why, outcome) => {
            (inner.terminal_effects(&outcome), Some(outcome), Some(why))
        }
    };
    let effects = match (effects, &staged) {
        (Ok(effects), Some(staged)) => inner.breakers.apply(staged, effects),
        (effects, _) => effects,
    };
    let effects = match effects {
        Ok(effects) => effects,
        Err(e) => return give_up(inner, job, &e.to_string()).await,
    };
    let settled = {
        let _pending = inner.pending.begin(&job.run_id);
        match &dead {
            Some(why) => queue.dead_letter_with(claim, why, effects).await,
            None => queue.ack_with(claim, effects).await,
        }
    };
    match settled {
        Ok(enqueued) => {
            if ended.is_none() {
                inner
                    .pending
                    .enqueued(enqueued.iter().filter_map(|e| match e {
                        EnqueueResult::New(id) => Some(id.as_str()),
                        EnqueueResult::AlreadyEnqueued(_) => None,
                    }));
            }
            if let Some(staged) = staged {
                let release = staged.releases_parked();
                inner.breakers.committed(staged);
                if release {
                    let inner = inner.clone();
                    let workflow = job.workflow.clone();
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
            }
            if let Some(outcome) = ended {
                tracing::info!(status = ?outcome.status, "run ended");
                inner.notify_terminal(outcome);
            }
        }
        Err(QueueError::ClaimLost) => {
            // The lease ran out and the reaper took the job back: a redelivery
            // settles it, or, if that was its last attempt, it is dead and
            // the run is reconciled here.
            tracing::warn!("the step's claim was lost before it settled");
            if let Ok(Some(dead)) = queue.view().job_record(&claim.id).await
                && dead.status == JobStatus::Dead
                && let Err(e) = inner.reconcile_dead(&dead).await
            {
                tracing::warn!("reconciling the dead step failed: {e}");
            }
        }
        Err(e) if e.is_permanent() => give_up(inner, job, &e.to_string()).await,
        Err(e) => {
            // The store failed. Nothing committed: the claim stays until its
            // lease ends (or the next open) and the step runs again.
            tracing::warn!("settling the step failed; it will be retried: {e}");
        }
    }
}

/// The queue refused the settlement for good (its effects cannot be encoded
/// or stored): fail the run with the reason rather than leave it stuck.
async fn give_up<R, H>(inner: &Inner<R, H>, job: &StepJob, why: &str) {
    tracing::error!("cannot commit the step's settlement: {why}");
    let outcome = job.failed(&format!(
        "the runtime could not record the step's result: {why}"
    ));
    let effects = match inner.terminal_effects(&outcome) {
        Ok(effects) => effects,
        Err(e) => {
            tracing::error!("cannot encode the run's outcome either; the step stays claimed: {e}");
            return;
        }
    };
    let _pending = inner.pending.begin(&job.run_id);
    match inner.queue.dead_letter_with(&job.claim, why, effects).await {
        Ok(_) => inner.notify_terminal(outcome),
        Err(e) => tracing::error!(
            "failing the run failed too; the step stays claimed until its lease ends: {e}"
        ),
    }
}

/// The effects that move a run to its next step.
fn next_step_effects<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    payload: Vec<u8>,
    delay: Option<Duration>,
) -> Result<SettlementEffects, Error> {
    let mut headers = job.claim.headers.clone();
    headers.remove(HEADER_ATTEMPTS_BEFORE);
    headers.remove(HEADER_PARKED);
    let run_at = delay.map(|d| inner.now_ms().saturating_add(d.as_millis() as u64));
    step_job_effects(
        inner,
        job,
        job.step + 1,
        payload,
        headers,
        job.max_attempts(),
        run_at,
        None,
    )
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
    if parked {
        headers.insert(HEADER_PARKED.to_string(), "1".to_string());
    } else {
        headers.remove(HEADER_PARKED);
    }
    let payload = job.claim.payload.clone();
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
    headers.insert(HEADER_STEP.to_string(), step.to_string());
    let options = EnqueueOptions::default()
        .dedup_key(record::dedup_key(&job.run_id, step))
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
    let run = RunRecord { step, job_id };
    Ok(effects.kv_put(run_key.clone(), encode(&run_key, &run)?))
}
