//! The worker pool: claims step jobs, runs them, and commits each step's
//! result in the transaction that settles its job.
//!
//! | runner says             | settlement (one transaction)                                  |
//! |-------------------------|---------------------------------------------------------------|
//! | `Continue`/`ContinueAfter` | `ack_with`: enqueue step n+1, rewrite the run record       |
//! | `Succeed`/`Fail`/`Cancel`  | `ack_with`: terminal effects (outcome, hook job)           |
//! | transient error         | `nack_with`: retry, or on the last attempt terminal effects  |
//! | permanent error         | `dead_letter_with`: terminal effects                          |
//!
//! "Terminal effects" delete the run record and write the outcome record,
//! its retention entry and the hook notification job.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use taquba::{
    Claim, EnqueueOptions, EnqueueRequest, Error as QueueError, Expired, JobStatus, Queue,
    SettlementEffects,
};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::Error;
use crate::hook::{RunOutcome, TerminalHook, TerminalStatus};
use crate::record::{
    self, MAX_PAYLOAD_BYTES, MAX_RESULT_BYTES, RunRecord, decode, encode, parse_step_headers,
    user_headers,
};
use crate::runner::{Step, StepError, StepOutcome, StepRunner};
use crate::runtime::{InFlight, Inner, Phase, WorkflowRuntime, lock, step_headers};

/// Dead-lettered jobs read per page when reconciling at start.
const DEAD_PAGE: usize = 256;

impl<R: StepRunner, H: TerminalHook> WorkflowRuntime<R, H> {
    /// Run the worker pool until `shutdown` resolves, then stop claiming and
    /// wait for the steps in flight to settle.
    ///
    /// At start it reconciles steps the queue dead-lettered by itself while
    /// no pool ran (a crash during a last attempt) into `Failed` runs. While
    /// running it also delivers hook notifications and drops outcomes past
    /// their retention. Returns an error when the store fails or closes (for
    /// example when another process opens it and fences this one).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let inner = &self.inner;
        reconcile_all_dead(inner).await?;
        let stop = CancellationToken::new();
        let steps = claim_loop(
            inner.queue.clone(),
            inner.cfg.queue_name.clone(),
            inner.cfg.max_concurrent_steps,
            inner.cfg.poll_interval,
            stop.clone(),
            {
                let inner = inner.clone();
                move |claim| run_step_job(inner.clone(), claim)
            },
        );
        let hooks = async {
            if !inner.hooks_enabled {
                stop.cancelled().await;
                return Ok(());
            }
            claim_loop(
                inner.queue.clone(),
                inner.cfg.hook_queue.clone(),
                inner.cfg.max_concurrent_steps,
                inner.cfg.poll_interval,
                stop.clone(),
                {
                    let inner = inner.clone();
                    move |claim| deliver_hook(inner.clone(), claim)
                },
            )
            .await
        };
        let maintenance = async {
            let mut tick = tokio::time::interval(inner.cfg.poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok::<(), Error>(()),
                    _ = tick.tick() => {}
                }
                if let Err(e) = expire_outcomes(inner).await {
                    tracing::warn!("retention pass failed (retried next tick): {e}");
                }
            }
        };
        let work = async {
            let result = tokio::try_join!(steps, hooks, maintenance);
            stop.cancel();
            result
        };
        tokio::pin!(work);
        tokio::pin!(shutdown);
        let result = tokio::select! {
            r = &mut work => r,
            _ = &mut shutdown => {
                stop.cancel();
                work.await
            }
        };
        result.map(|_| ())
    }
}

/// Claim jobs from `queue_name` in batches sized to the free slots, run each
/// on its own task, and drain in-flight work once `stop` fires. Ends with an
/// error when claiming fails (the store failed or closed).
async fn claim_loop<F, Fut>(
    queue: Arc<Queue>,
    queue_name: String,
    concurrency: usize,
    poll: Duration,
    stop: CancellationToken,
    handle: F,
) -> Result<(), Error>
where
    F: Fn(Claim) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let lease = queue.queue_config(&queue_name).lease_duration;
    let mut set = JoinSet::new();
    let result = loop {
        while let Some(done) = set.try_join_next() {
            note_panic(&queue_name, done);
        }
        if stop.is_cancelled() {
            break Ok(());
        }
        if set.len() >= concurrency {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                Some(done) = set.join_next() => note_panic(&queue_name, done),
            }
            continue;
        }
        let claims = match queue
            .claim_batch(&queue_name, concurrency - set.len(), lease)
            .await
        {
            Ok(claims) => claims,
            Err(e) => {
                break Err(Error::WorkerStopped(format!(
                    "claiming from `{queue_name}` failed: {e}"
                )));
            }
        };
        if claims.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = queue.wait_for_jobs_on(&queue_name, poll) => {}
            }
            continue;
        }
        for claim in claims {
            set.spawn(handle(claim));
        }
    };
    while let Some(done) = set.join_next().await {
        note_panic(&queue_name, done);
    }
    result
}

fn note_panic(queue: &str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(queue, "worker task failed: {e}");
    }
}

/// What a step's settlement does.
enum Verdict {
    /// Enqueue the next step (after a delay) and move the run record.
    Next {
        payload: Vec<u8>,
        delay: Option<Duration>,
    },
    /// End the run through `ack_with`.
    End(RunOutcome),
    /// Retry the step if attempts remain, otherwise end the run `Failed`.
    Retry(String),
    /// Dead-letter the step and end the run `Failed`.
    DeadLetter(String),
}

/// Everything about one claimed step job, once its headers checked out.
struct StepJob {
    claim: Claim,
    run_id: String,
    step: u32,
}

impl StepJob {
    fn outcome(
        &self,
        status: TerminalStatus,
        result: Option<Vec<u8>>,
        error: Option<String>,
    ) -> RunOutcome {
        RunOutcome {
            run_id: self.run_id.clone(),
            status,
            result,
            error: error.map(record::bounded_reason),
            headers: user_headers(&self.claim.headers),
            final_step: self.step,
        }
    }
}

/// Run one claimed step job to its settlement.
async fn run_step_job<R: StepRunner, H: TerminalHook>(inner: Arc<Inner<R, H>>, claim: Claim) {
    let job = match admit(&inner, claim).await {
        Some(job) => job,
        None => return,
    };
    let span = tracing::info_span!(
        "step",
        run_id = %job.run_id,
        step = job.step,
        attempt = job.claim.attempts
    );
    async {
        let entry = Arc::new(InFlight {
            phase: std::sync::Mutex::new(Phase::Running {
                cancel_requested: false,
            }),
            token: CancellationToken::new(),
            settled: watch::Sender::new(false),
        });
        lock(&inner.inflight).insert(job.claim.id.clone(), entry.clone());
        // A token that fired before we registered is a cancel accepted
        // earlier (stored on the job, or requested between claim and now):
        // the step is not run.
        let verdict = if job.claim.cancel_token().is_cancelled() {
            *lock(&entry.phase) = Phase::Settling;
            Verdict::End(job.outcome(TerminalStatus::Cancelled, None, None))
        } else {
            let ran = run_with_lease(&inner, &job, &entry).await;
            let mut phase = lock(&entry.phase);
            let cancelled = matches!(
                *phase,
                Phase::Running {
                    cancel_requested: true
                }
            );
            *phase = Phase::Settling;
            decide(&job, ran, cancelled)
        };
        settle(&inner, &job, verdict).await;
        lock(&inner.inflight).remove(&job.claim.id);
        entry.settled.send_replace(true);
    }
    .instrument(span)
    .await
}

/// Check a claimed job is a live step of a run; dead-letter it otherwise.
async fn admit<R, H>(inner: &Inner<R, H>, claim: Claim) -> Option<StepJob> {
    let (run_id, step) = match parse_step_headers(&claim.headers) {
        Ok((run_id, step)) => (run_id.to_string(), step),
        Err(why) => {
            reject(inner, &claim, &why).await;
            return None;
        }
    };
    let run_key = inner.keys.run(&run_id);
    let run = match inner.queue.view().kv_get(&run_key).await {
        Ok(Some(bytes)) => match decode::<RunRecord>(&run_key, &bytes) {
            Ok(run) => run,
            Err(e) => {
                reject(inner, &claim, &e.to_string()).await;
                return None;
            }
        },
        Ok(None) => {
            reject(
                inner,
                &claim,
                &format!("run `{run_id}` has no live record (the job is stale or foreign)"),
            )
            .await;
            return None;
        }
        Err(e) => {
            // The store failed: leave the claim; its lease expiry retries it.
            tracing::warn!(job_id = %claim.id, "reading run `{run_id}` failed: {e}");
            return None;
        }
    };
    if run.job_id != claim.id || run.step != step {
        let why = format!(
            "stale step job: run `{run_id}` is at step {} (job {}), this job says step {step}",
            run.step, run.job_id
        );
        reject(inner, &claim, &why).await;
        return None;
    }
    Some(StepJob {
        claim,
        run_id,
        step,
    })
}

/// Dead-letter a job that is not a valid step, with the reason as its error.
async fn reject<R, H>(inner: &Inner<R, H>, claim: &Claim, why: &str) {
    tracing::warn!(job_id = %claim.id, queue = %inner.cfg.queue_name, "dead-lettering invalid step job: {why}");
    if let Err(e) = inner.queue.dead_letter(claim, why).await {
        tracing::warn!(job_id = %claim.id, "dead-lettering failed: {e}");
    }
}

/// Call the runner, keeping the job's lease alive meanwhile. A panic is a
/// transient error.
async fn run_with_lease<R: StepRunner, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    entry: &InFlight,
) -> Result<StepOutcome, StepError> {
    let claim = &job.claim;
    let step = Step {
        run_id: job.run_id.clone(),
        step_number: job.step,
        payload: claim.payload.clone(),
        headers: user_headers(&claim.headers),
        job_id: claim.id.clone(),
        attempts: claim.attempts,
        max_attempts: claim.max_attempts,
        cancel_token: entry.token.clone(),
    };
    let lease = inner.queue.queue_config(&claim.queue).lease_duration;
    let mut running = std::pin::pin!(AssertUnwindSafe(inner.runner.run_step(&step)).catch_unwind());
    let mut renew = tokio::time::interval(lease / 3);
    renew.tick().await;
    loop {
        tokio::select! {
            ran = &mut running => {
                return ran.unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a non-string panic".into());
                    Err(StepError::transient(format!("step panicked: {what}")))
                });
            }
            _ = renew.tick() => {
                // Renewal is in memory; it fails once the claim is gone or a
                // cancel was requested, and then the lease simply runs out.
                let _ = inner.queue.renew_lease(claim, lease);
            }
        }
    }
}

/// Turn what the runner returned into a settlement.
fn decide(job: &StepJob, ran: Result<StepOutcome, StepError>, cancelled: bool) -> Verdict {
    use TerminalStatus::*;
    match ran {
        // A runner's own cancel wins over an external one: it has a reason.
        Ok(StepOutcome::Cancel { reason }) => {
            Verdict::End(job.outcome(Cancelled, None, Some(reason)))
        }
        _ if cancelled => Verdict::End(job.outcome(Cancelled, None, None)),
        Ok(StepOutcome::Continue { payload }) => next(job, payload, None),
        Ok(StepOutcome::ContinueAfter { payload, delay }) => next(job, payload, Some(delay)),
        Ok(StepOutcome::Succeed { result }) if result.len() > MAX_RESULT_BYTES => {
            Verdict::End(job.outcome(
                Failed,
                None,
                Some(format!(
                    "step {} returned a result of {} bytes, over the limit of {MAX_RESULT_BYTES}; store it elsewhere and return a reference",
                    job.step,
                    result.len()
                )),
            ))
        }
        Ok(StepOutcome::Succeed { result }) => Verdict::End(job.outcome(Succeeded, Some(result), None)),
        Ok(StepOutcome::Fail { reason }) => Verdict::End(job.outcome(Failed, None, Some(reason))),
        Err(e) if e.is_permanent() => Verdict::DeadLetter(e.message),
        Err(e) => Verdict::Retry(e.message),
    }
}

fn next(job: &StepJob, payload: Vec<u8>, delay: Option<Duration>) -> Verdict {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Verdict::End(job.outcome(
            TerminalStatus::Failed,
            None,
            Some(format!(
                "step {} returned a payload of {} bytes, over the limit of {MAX_PAYLOAD_BYTES}",
                job.step,
                payload.len()
            )),
        ));
    }
    Verdict::Next { payload, delay }
}

/// Commit a verdict with the step's settlement.
async fn settle<R, H>(inner: &Inner<R, H>, job: &StepJob, verdict: Verdict) {
    let claim = &job.claim;
    let queue = &inner.queue;
    let failed = |why: &str| {
        job.outcome(
            TerminalStatus::Failed,
            None,
            Some(format!("step {}: {why}", job.step)),
        )
    };
    let (settled, ended) = match verdict {
        Verdict::Next { payload, delay } => match next_step_effects(inner, job, payload, delay) {
            Ok(effects) => (queue.ack_with(claim, effects).await.map(|_| ()), None),
            Err(e) => (Ok(()), Some(Err(e))),
        },
        Verdict::End(outcome) => match inner.terminal_effects(&outcome) {
            Ok(effects) => (
                queue.ack_with(claim, effects).await.map(|_| ()),
                Some(Ok(outcome)),
            ),
            Err(e) => (Ok(()), Some(Err(e))),
        },
        Verdict::DeadLetter(why) => {
            let outcome = failed(&why);
            match inner.terminal_effects(&outcome) {
                Ok(effects) => (
                    queue
                        .dead_letter_with(claim, &why, effects)
                        .await
                        .map(|_| ()),
                    Some(Ok(outcome)),
                ),
                Err(e) => (Ok(()), Some(Err(e))),
            }
        }
        Verdict::Retry(why) => {
            let outcome = failed(&format!("gave up after {} attempts: {why}", claim.attempts));
            match inner.terminal_effects(&outcome) {
                Ok(effects) => match queue.nack_with(claim, &why, effects).await {
                    Ok(taquba::NackOutcome::DeadLettered(_)) => (Ok(()), Some(Ok(outcome))),
                    Ok(taquba::NackOutcome::Retried) => {
                        tracing::info!(error = %why, "step failed; retrying");
                        (Ok(()), None)
                    }
                    Err(e) => (Err(e), None),
                },
                Err(e) => (Ok(()), Some(Err(e))),
            }
        }
    };
    match (settled, ended) {
        (Ok(()), Some(Ok(outcome))) => {
            tracing::info!(status = ?outcome.status, "run ended");
            inner.notify_terminal(outcome);
        }
        (Ok(()), Some(Err(e))) => give_up(inner, job, &e.to_string()).await,
        (Ok(()), None) => {}
        (Err(QueueError::ClaimLost), _) => {
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
        (Err(e), _) if e.is_permanent() => give_up(inner, job, &e.to_string()).await,
        (Err(e), _) => {
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
    let outcome = job.outcome(
        TerminalStatus::Failed,
        None,
        Some(format!(
            "step {}: the runtime could not record the step's result: {why}",
            job.step
        )),
    );
    let effects = match inner.terminal_effects(&outcome) {
        Ok(effects) => effects,
        Err(e) => {
            tracing::error!("cannot encode the run's outcome either; the step stays claimed: {e}");
            return;
        }
    };
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
    let claim = &job.claim;
    let step = job.step + 1;
    let job_id = inner.queue.next_job_id();
    let mut headers = step_headers(&Default::default(), &job.run_id, step);
    for (k, v) in claim.headers.iter() {
        headers.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let options = EnqueueOptions::default()
        .dedup_key(record::dedup_key(&job.run_id, step))
        .id_override(job_id.clone())
        .headers(headers)
        .priority(claim.priority)
        .max_attempts(claim.max_attempts)
        .run_at(delay.map(|d| inner.at_after(d)));
    let run_key = inner.keys.run(&job.run_id);
    let run = RunRecord { step, job_id };
    Ok(SettlementEffects::default()
        .enqueue(EnqueueRequest {
            queue: inner.cfg.queue_name.clone(),
            payload,
            options,
        })
        .kv_put(run_key.clone(), encode(&run_key, &run)?))
}

/// Deliver one hook notification job.
async fn deliver_hook<R, H: TerminalHook>(inner: Arc<Inner<R, H>>, claim: Claim) {
    let queue = &inner.queue;
    let outcome: RunOutcome = match decode(claim.id.as_bytes(), &claim.payload) {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::warn!(job_id = %claim.id, "dead-lettering undecodable hook notification: {e}");
            let _ = queue.dead_letter(&claim, &e.to_string()).await;
            return;
        }
    };
    let span = tracing::info_span!("hook", run_id = %outcome.run_id, attempt = claim.attempts);
    async {
        let delivered = AssertUnwindSafe(inner.hook.on_termination(&outcome))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(StepError::transient("the hook panicked")));
        let settled = match delivered {
            Ok(()) => queue.ack(&claim).await,
            Err(e) if e.is_permanent() => {
                tracing::warn!("hook gave up: {}", e.message);
                queue.dead_letter(&claim, &e.message).await
            }
            Err(e) => {
                tracing::info!("hook failed, retrying: {}", e.message);
                queue.nack(&claim, &e.message).await
            }
        };
        if let Err(e) = settled {
            tracing::warn!("settling the hook notification failed: {e}");
        }
    }
    .instrument(span)
    .await
}

/// Reconcile every step the queue dead-lettered by itself into its run.
async fn reconcile_all_dead<R, H>(inner: &Inner<R, H>) -> Result<(), Error> {
    let mut after: Option<String> = None;
    loop {
        let page = inner
            .queue
            .view()
            .dead_jobs(&inner.cfg.queue_name, after.as_deref(), DEAD_PAGE)
            .await?;
        for job in &page {
            inner.reconcile_dead(job).await?;
        }
        match page.last() {
            Some(last) if page.len() == DEAD_PAGE => after = Some(last.id.clone()),
            _ => return Ok(()),
        }
    }
}

/// Drop outcome and submit records past their retention.
async fn expire_outcomes<R, H>(inner: &Inner<R, H>) -> Result<usize, Error> {
    let now = inner.now_ms();
    let removed = inner
        .expiry
        .pass(
            &inner.queue,
            now,
            inner.cfg.terminal_retention,
            |_, suffix| {
                let effects = match std::str::from_utf8(&suffix) {
                    Ok(run_id) => SettlementEffects::default()
                        .kv_delete(inner.keys.sub(run_id))
                        .kv_delete(inner.keys.out(run_id)),
                    Err(_) => SettlementEffects::default(),
                };
                std::future::ready(Expired::Delete(effects))
            },
        )
        .await?;
    Ok(removed)
}
