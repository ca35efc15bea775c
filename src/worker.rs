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
    Claim, EnqueueOptions, EnqueueRequest, EnqueueResult, Error as QueueError, Expired, JobStatus,
    Queue, SettlementEffects,
};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::breaker::{Gate, ms_to_time};
use crate::error::Error;
use crate::hook::{RunOutcome, TerminalHook, TerminalStatus};
use crate::record::{
    self, HEADER_ATTEMPTS_BEFORE, HEADER_PARKED, HEADER_STEP, MAX_PAYLOAD_BYTES, MAX_RESULT_BYTES,
    RunRecord, decode, encode, parse_step_extras, parse_step_headers, user_headers,
};
use crate::runner::{Step, StepError, StepOutcome, StepRunner};
use crate::runtime::{InFlight, Inner, Phase, WorkflowRuntime, lock};

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
        inner.breakers.load_all(&inner.queue).await?;
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
                if let Err(e) = inner.breakers.fold_tallies(&inner.queue).await {
                    tracing::warn!("folding run tallies failed (retried next tick): {e}");
                }
                if let Err(e) = inner
                    .breakers
                    .wake_probes(&inner.queue, inner.now_ms())
                    .await
                {
                    tracing::warn!("waking a breaker probe failed (retried next tick): {e}");
                }
            }
        };
        let work = async {
            let result = tokio::try_join!(steps, hooks, maintenance);
            stop.cancel();
            result
        };
        let watchdog = store_watchdog(inner);
        tokio::pin!(work);
        tokio::pin!(shutdown);
        tokio::pin!(watchdog);
        // The watchdog also guards the drain: a step cannot settle while the
        // store is down. Returning drops the pool's tasks, which is no worse
        // than a crash.
        let result = tokio::select! {
            r = &mut work => r,
            e = &mut watchdog => Err(e),
            _ = &mut shutdown => {
                stop.cancel();
                tokio::select! {
                    r = &mut work => r,
                    e = &mut watchdog => Err(e),
                }
            }
        };
        result.map(|_| ())
    }
}

/// Resolve with [`Error::StoreUnavailable`] once a commit has waited longer
/// than `store_timeout` for the store.
async fn store_watchdog<R, H>(inner: &Inner<R, H>) -> Error {
    let timeout = inner.cfg.store_timeout;
    let period = (timeout / 4)
        .min(inner.cfg.poll_interval)
        .max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(waited) = inner.pending.longest_wait()
            && waited > timeout
        {
            tracing::error!(
                ?waited,
                "the store has not confirmed a commit; stopping the worker pool"
            );
            return Error::StoreUnavailable { waited };
        }
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

/// How long a parked step waits if nothing releases it (a reset or a
/// successful probe wakes it at once).
const PARK_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// What a step's settlement does.
enum Verdict {
    /// Enqueue the next step (after a delay) and move the run record.
    Next {
        payload: Vec<u8>,
        delay: Option<Duration>,
    },
    /// End the run through `ack_with`.
    End(RunOutcome),
    /// Move the step to a new job that runs at `at` (ms, queue clock): a
    /// retry (the attempt is spent), a breaker deferral or a parking (not
    /// spent).
    Again { at: u64, spent: bool, parked: bool },
    /// Dead-letter the step with this error and end the run.
    DeadLetter(String, RunOutcome),
}

/// How a settled attempt counts for its workflow's health.
enum Health {
    Success,
    Failure(String),
    Neutral,
}

/// Everything about one claimed step job, once its headers checked out.
struct StepJob {
    claim: Claim,
    run_id: String,
    step: u32,
    workflow: String,
    /// Attempts this step spent on earlier jobs.
    before: u32,
}

impl StepJob {
    /// Which attempt of the step this is (1-based).
    fn attempts(&self) -> u32 {
        self.before.saturating_add(self.claim.attempts)
    }

    /// How many attempts the step gets in all.
    fn max_attempts(&self) -> u32 {
        self.before.saturating_add(self.claim.max_attempts)
    }

    fn outcome(
        &self,
        status: TerminalStatus,
        result: Option<Vec<u8>>,
        error: Option<String>,
    ) -> RunOutcome {
        RunOutcome {
            run_id: self.run_id.clone(),
            workflow: self.workflow.clone(),
            status,
            result,
            error: error.map(record::bounded_reason),
            headers: user_headers(&self.claim.headers),
            final_step: self.step,
        }
    }

    fn failed(&self, why: &str) -> RunOutcome {
        self.outcome(
            TerminalStatus::Failed,
            None,
            Some(format!("step {}: {why}", self.step)),
        )
    }
}

/// Run one claimed step job to its settlement.
async fn run_step_job<R: StepRunner, H: TerminalHook>(inner: Arc<Inner<R, H>>, claim: Claim) {
    let Some(job) = admit(&inner, claim).await else {
        return;
    };
    let span = tracing::info_span!(
        "step",
        run_id = %job.run_id,
        step = job.step,
        attempt = job.attempts(),
        workflow = %job.workflow,
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
        let mut probe = false;
        let (verdict, health) = if job.claim.cancel_token().is_cancelled() {
            // A token that fired before we registered is a cancel accepted
            // earlier (stored on the job, or requested between claim and
            // now): the step is not run.
            *lock(&entry.phase) = Phase::Settling;
            (
                Verdict::End(job.outcome(TerminalStatus::Cancelled, None, None)),
                Health::Neutral,
            )
        } else {
            let now = inner.now_ms();
            let gate = inner
                .breakers
                .gate(&inner.queue, &job.workflow, now)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!("reading the workflow's health failed, running the step: {e}");
                    Gate::Run
                });
            let held = match gate {
                Gate::Run => None,
                Gate::Probe => {
                    probe = true;
                    tracing::info!("running the step as the breaker's probe");
                    None
                }
                Gate::Defer(until) => Some(Verdict::Again {
                    at: until,
                    spent: false,
                    parked: false,
                }),
                Gate::Park => Some(Verdict::Again {
                    at: now.saturating_add(PARK_MS),
                    spent: false,
                    parked: true,
                }),
            };
            // The runner's result, or the settlement the breaker chose
            // instead of running the step.
            let ran = match held {
                None => Ok(run_with_lease(&inner, &job, &entry).await),
                Some(held) => Err(held),
            };
            let cancelled = {
                let mut phase = lock(&entry.phase);
                let cancelled = matches!(
                    *phase,
                    Phase::Running {
                        cancel_requested: true
                    }
                );
                *phase = Phase::Settling;
                cancelled
            };
            match ran {
                Ok(ran) => decide(&inner, &job, ran, cancelled),
                Err(_) if cancelled => (
                    Verdict::End(job.outcome(TerminalStatus::Cancelled, None, None)),
                    Health::Neutral,
                ),
                Err(held) => (held, Health::Neutral),
            }
        };
        settle(&inner, &job, verdict, health).await;
        if probe {
            inner.breakers.probe_done(&job.workflow);
        }
        lock(&inner.inflight).remove(&job.claim.id);
        entry.settled.send_replace(true);
    }
    .instrument(span)
    .await
}

/// Check a claimed job is a live step of a run; dead-letter it otherwise.
async fn admit<R, H>(inner: &Inner<R, H>, claim: Claim) -> Option<StepJob> {
    let parsed = parse_step_headers(&claim.headers)
        .map(|(run_id, step)| (run_id.to_string(), step))
        .and_then(|(run_id, step)| {
            parse_step_extras(&claim.headers).map(|(wf, before)| (run_id, step, wf, before))
        });
    let (run_id, step, workflow, before) = match parsed {
        Ok(parsed) => parsed,
        Err(why) => {
            reject(inner, &claim, &why).await;
            return None;
        }
    };
    // The commit that enqueued this job may still wait for its flush.
    inner.pending.settled(&run_id).await;
    if inner.pending.take_own(&claim.id) {
        // This process's own commit enqueued it and pointed the run at it.
        return Some(StepJob {
            claim,
            run_id,
            step,
            workflow,
            before,
        });
    }
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
        workflow,
        before,
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
        workflow: job.workflow.clone(),
        step_number: job.step,
        payload: claim.payload.clone(),
        headers: user_headers(&claim.headers),
        job_id: claim.id.clone(),
        attempts: job.attempts(),
        max_attempts: job.max_attempts(),
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

/// Turn what the runner returned into a settlement and a health change.
fn decide<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    ran: Result<StepOutcome, StepError>,
    cancelled: bool,
) -> (Verdict, Health) {
    use TerminalStatus::*;
    match ran {
        // A runner's own cancel wins over an external one: it has a reason.
        Ok(StepOutcome::Cancel { reason }) => (
            Verdict::End(job.outcome(Cancelled, None, Some(reason))),
            Health::Neutral,
        ),
        _ if cancelled => (
            Verdict::End(job.outcome(Cancelled, None, None)),
            Health::Neutral,
        ),
        Ok(StepOutcome::Continue { payload }) => next(job, payload, None),
        Ok(StepOutcome::ContinueAfter { payload, delay }) => next(job, payload, Some(delay)),
        Ok(StepOutcome::Succeed { result }) if result.len() > MAX_RESULT_BYTES => {
            let why = format!(
                "returned a result of {} bytes, over the limit of {MAX_RESULT_BYTES}; store it elsewhere and return a reference",
                result.len()
            );
            (Verdict::End(job.failed(&why)), Health::Failure(why))
        }
        Ok(StepOutcome::Succeed { result }) => (
            Verdict::End(job.outcome(Succeeded, Some(result), None)),
            Health::Success,
        ),
        Ok(StepOutcome::Fail { reason }) => (
            Verdict::End(job.outcome(Failed, None, Some(reason.clone()))),
            Health::Failure(reason),
        ),
        Err(e) if e.is_permanent() => (
            Verdict::DeadLetter(e.message.clone(), job.failed(&e.message)),
            Health::Failure(e.message),
        ),
        Err(e) if job.attempts() >= job.max_attempts() => {
            let why = format!("gave up after {} attempts: {}", job.attempts(), e.message);
            (
                Verdict::DeadLetter(e.message.clone(), job.failed(&why)),
                Health::Failure(e.message),
            )
        }
        Err(e) => {
            let policy = inner.cfg.retry_policy(&job.workflow);
            let delay = policy.delay(job.attempts(), crate::policy::draw());
            tracing::info!(error = %e.message, retry_in = ?delay, "step failed; retrying");
            (
                Verdict::Again {
                    at: inner.now_ms().saturating_add(delay.as_millis() as u64),
                    spent: true,
                    parked: false,
                },
                Health::Failure(e.message),
            )
        }
    }
}

fn next(job: &StepJob, payload: Vec<u8>, delay: Option<Duration>) -> (Verdict, Health) {
    if payload.len() > MAX_PAYLOAD_BYTES {
        let why = format!(
            "returned a payload of {} bytes, over the limit of {MAX_PAYLOAD_BYTES}",
            payload.len()
        );
        return (Verdict::End(job.failed(&why)), Health::Failure(why));
    }
    (Verdict::Next { payload, delay }, Health::Success)
}

/// Commit a verdict, and the workflow health change it causes, with the
/// step's settlement.
async fn settle<R: StepRunner, H: TerminalHook>(
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
        // The terminal commit that enqueued this may still wait for its flush.
        inner.pending.settled(&outcome.run_id).await;
        let delivered = AssertUnwindSafe(inner.hook.on_termination(&outcome))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(StepError::transient("the hook panicked")));
        // Counted for the store watchdog.
        let _pending = inner.pending.begin(&outcome.run_id);
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
