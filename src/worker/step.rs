//! One step's path from claim to verdict: admit, register, gate, run, decide.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use taquba::{Claim, LeaseHandle, Queue};
use tracing::Instrument;

use super::metrics;
use super::settle::settle;
use crate::breaker::Gate;
use crate::history::{self, AttemptOutcome, StepAttempt};
use crate::hook::{RunOutcome, TerminalHook, TerminalStatus};
use crate::memo::Memo;
use crate::policy::saturating_ms;
use taquba::SettlementEffects;

use crate::effects::StagedEffects;
use crate::hook::ChildOutcome;
use crate::record::{
    self, HEADER_SIGNAL, MAX_PAYLOAD_BYTES, MAX_RESULT_BYTES, RunRecord, SentSignal,
    SignalledPayload, decode, parse_step_extras, parse_step_headers, user_headers,
};
use crate::runner::{ChildSpec, Step, StepError, StepOutcome, StepRunner};
use crate::runtime::{InFlight, Inner, Phase, Settled};
use crate::sync::lock;

/// How long a parked step waits if nothing releases it (a reset or a
/// successful probe wakes it at once).
const PARK_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// What a step's settlement does.
pub(super) enum Verdict {
    /// Enqueue the next step (after a delay, or waiting for a signal until
    /// the delay passes) and move the run record.
    Next {
        payload: Vec<u8>,
        delay: Option<Duration>,
        signal_wait: bool,
    },
    /// Start child runs and leave the run waiting for them at the next
    /// step, with this payload.
    Spawn {
        children: Vec<ChildSpec>,
        payload: Vec<u8>,
        fail_fast: bool,
    },
    /// Start a new segment of the run at step 0 with this input.
    NewSegment { input: Vec<u8> },
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
pub(super) enum Health {
    Success,
    Failure(String),
    Neutral,
}

/// Everything about one claimed step job, once its headers checked out.
pub(super) struct StepJob {
    pub claim: Claim,
    pub run_id: String,
    pub step: u32,
    /// Shared: the metrics label it on every call.
    pub workflow: Arc<str>,
    /// Attempts this step spent on earlier jobs.
    pub before: u32,
    /// The signal that ended the wait before this step (from the job's
    /// record, or carried in its payload by [`HEADER_SIGNAL`]).
    pub signal: Option<Vec<u8>>,
    /// The step's payload when the job's payload is a [`SignalledPayload`]
    /// (otherwise it is the claim's payload).
    pub unwrapped: Option<Vec<u8>>,
    /// For a step that joins children: their outcomes in spawn order.
    pub children: Vec<ChildOutcome>,
    /// When this process took the claim (ms, queue clock).
    pub started_ms: u64,
    /// The number of the run's next history entry (header
    /// `workflow.history`).
    pub history: u64,
}

impl StepJob {
    /// Which attempt of the step this is (1-based).
    pub(super) fn attempts(&self) -> u32 {
        self.before.saturating_add(self.claim.attempts)
    }

    /// The step's payload.
    pub(super) fn payload(&self) -> &[u8] {
        self.unwrapped.as_deref().unwrap_or(&self.claim.payload)
    }

    /// How many attempts the step gets in all.
    pub(super) fn max_attempts(&self) -> u32 {
        self.before.saturating_add(self.claim.max_attempts)
    }

    pub(super) fn outcome(
        &self,
        status: TerminalStatus,
        result: Option<Vec<u8>>,
        error: Option<String>,
    ) -> RunOutcome {
        RunOutcome {
            run_id: self.run_id.clone(),
            workflow: self.workflow.to_string(),
            status,
            result,
            error: error.map(record::bounded_reason),
            headers: user_headers(&self.claim.headers),
            final_step: self.step,
            reruns: record::rerun_of(&self.claim.headers),
        }
    }

    /// The outcome of a step stopped from outside: `TimedOut` once the
    /// run's deadline has passed at `now` (ms), `Cancelled` otherwise.
    pub(super) fn stopped(&self, now: u64) -> RunOutcome {
        match record::deadline_of(&self.claim.headers) {
            Some(at) if at <= now => self.outcome(
                TerminalStatus::TimedOut,
                None,
                Some(record::timed_out_reason(at)),
            ),
            _ => self.outcome(TerminalStatus::Cancelled, None, None),
        }
    }

    /// The history entry of this attempt, ended at `now` (ms).
    pub(super) fn attempt_entry(
        &self,
        now: u64,
        outcome: AttemptOutcome,
        error: Option<String>,
    ) -> StepAttempt {
        StepAttempt {
            step: self.step,
            attempt: self.attempts(),
            job_id: self.claim.id.clone(),
            started_ms: self.started_ms,
            ended_ms: now,
            signalled: self.signal.is_some(),
            outcome,
            error,
        }
    }

    pub(super) fn failed(&self, why: &str) -> RunOutcome {
        self.outcome(
            TerminalStatus::Failed,
            None,
            Some(format!("step {}: {why}", self.step)),
        )
    }
}

/// Run one claimed step job to its settlement, its lease renewed from the
/// claim to the end of the settlement.
///
/// A claim this task lets go of without a settlement that committed (or
/// whose lease it could not renew, or whose task was aborted with its pool)
/// is watched (see [`crate::lapsed`]): the queue may dead-letter its job by
/// itself, and the run is then reconciled.
pub(super) async fn run_step_job<R: StepRunner, H: TerminalHook>(
    inner: Arc<Inner<R, H>>,
    claim: Claim,
) {
    let lease = Lease::of(&inner.queue, &claim);
    let mut unsettled = Unsettled {
        inner: &inner,
        job_id: claim.id.clone(),
        attempts: claim.attempts,
        lease_ms: saturating_ms(lease.duration),
        settled: false,
    };
    let work = std::pin::pin!(step_job(&inner, claim));
    let settled = lease.keep(work, |e| unsettled.renewal_failed(e)).await;
    unsettled.settled = settled;
}

/// A step claim that is watched when it is dropped unsettled: the task
/// ended without a settlement that committed, or was aborted.
struct Unsettled<'a, R, H> {
    inner: &'a Inner<R, H>,
    job_id: String,
    attempts: u32,
    lease_ms: u64,
    settled: bool,
}

impl<R, H> Unsettled<'_, R, H> {
    fn watch(&self, after_ms: u64) {
        let due = self.inner.now_ms().saturating_add(after_ms);
        self.inner.lapsed.watch(&self.job_id, self.attempts, due);
    }

    /// A lost claim may be dead-lettered already; after a cancel the
    /// renewals stop, and the lease runs out.
    fn renewal_failed(&self, e: &taquba::Error) {
        self.watch(match e {
            taquba::Error::ClaimLost => 0,
            _ => self.until_reaped(),
        });
    }

    /// From the last renewal until the reaper can have taken the lease.
    fn until_reaped(&self) -> u64 {
        self.lease_ms
            .saturating_add(saturating_ms(crate::lapsed::SLACK))
    }
}

impl<R, H> Drop for Unsettled<'_, R, H> {
    fn drop(&mut self) {
        if !self.settled {
            self.watch(self.until_reaped());
        }
    }
}

/// Run one claimed step; returns whether a settlement of its claim
/// committed.
async fn step_job<R: StepRunner, H: TerminalHook>(inner: &Arc<Inner<R, H>>, claim: Claim) -> bool {
    let Some(mut job) = admit(inner, claim).await else {
        return false;
    };
    // A step that joins children sees their outcomes; under `fail_fast` a
    // failed child ends the run instead.
    let mut child_failed = None;
    if job.claim.headers.contains_key(record::HEADER_JOIN) {
        match inner.joined(&job.run_id, job.step).await {
            Ok((outcomes, failed)) => {
                job.children = outcomes;
                child_failed = failed;
            }
            // A record that does not decode fails the run, with the
            // reason: claiming it again would read the same record.
            Err(e) if e.is_permanent() => {
                let why = format!("its children's outcomes cannot be read: {e}");
                reject(inner, &job.claim, &why).await;
                return false;
            }
            Err(e) => {
                // Left claimed: its lease runs out and it is claimed again.
                tracing::warn!(run_id = %job.run_id, "reading the children's outcomes failed: {e}");
                return false;
            }
        }
    }
    let span = tracing::info_span!(
        "step",
        run_id = %job.run_id,
        step = job.step,
        attempt = job.attempts(),
        workflow = %job.workflow,
    );
    async {
        // This claim's own entry, removed however this task ends.
        let registered = inner.inflight.register(&job.claim.id);
        let _gauge = metrics::StepInFlight::start();
        let record = job.claim.job();
        let runnable = record.run_at.unwrap_or(0).max(record.enqueued_at);
        let waited = inner.now_ms().saturating_sub(runnable);
        metrics::step_claimed(&job.workflow, Duration::from_millis(waited));
        let entry = &registered.entry;
        let mut probe = false;
        // Whether the run ends `Cancelled` because a cancel was requested.
        let mut by_request = false;
        // What the runner staged: committed only with the outcome it returned.
        let mut staged = SettlementEffects::default();
        let (verdict, health) = if job.claim.cancel_token().is_cancelled() {
            // A token that fired before we registered is a cancel accepted
            // earlier (stored on the job, or requested between claim and
            // now): the step is not run.
            *lock(&entry.phase) = Phase::Settling;
            by_request = true;
            (Verdict::End(job.stopped(inner.now_ms())), Health::Neutral)
        } else if let Some(why) = child_failed {
            *lock(&entry.phase) = Phase::Settling;
            (
                Verdict::End(job.outcome(TerminalStatus::Failed, None, Some(why))),
                Health::Neutral,
            )
        } else {
            let now = inner.now_ms();
            let gate = inner
                .breakers
                .gate(&inner.queue, &job.workflow, &job.claim.id, now)
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
                None => Ok(run_runner(inner, &job, entry).await),
                Some(held) => Err(held),
            };
            // A cancel counts if it reached this entry or fired the claim's
            // token (the queue fires the live claim's token on a cancel).
            let cancelled = {
                let mut phase = lock(&entry.phase);
                let cancelled = matches!(
                    *phase,
                    Phase::Running {
                        cancel_requested: true
                    }
                ) || job.claim.cancel_token().is_cancelled();
                *phase = Phase::Settling;
                cancelled
            };
            match ran {
                Ok((ran, effects)) => {
                    let (verdict, health, as_returned) = decide(inner, &job, ran, cancelled);
                    by_request = cancelled
                        && matches!(&verdict, Verdict::End(o) if o.status == TerminalStatus::TimedOut
                            || (o.status == TerminalStatus::Cancelled && o.error.is_none()));
                    if as_returned {
                        staged = effects;
                    }
                    (verdict, health)
                }
                Err(_) if cancelled => {
                    by_request = true;
                    (Verdict::End(job.stopped(inner.now_ms())), Health::Neutral)
                }
                Err(held) => (held, Health::Neutral),
            }
        };
        let committed = settle(inner, &job, verdict, health, staged).await;
        if probe {
            inner.breakers.probe_done(&job.workflow, &job.claim.id);
        }
        entry.settled.send_replace(Some(if committed {
            Settled::Committed {
                cancelled: by_request,
            }
        } else {
            Settled::NotCommitted
        }));
        committed
    }
    .instrument(span)
    .await
}

/// A claim's lease, renewed while the work on the claim goes on: for a step
/// from its claim through admit, the runner and the settlement (waits for
/// pending commits, the workflow's writer lock, payload offload included);
/// for a hook notification from its claim to its settlement.
pub(super) struct Lease {
    handle: LeaseHandle,
    duration: Duration,
}

impl Lease {
    pub(super) fn of(queue: &Queue, claim: &Claim) -> Self {
        Self {
            handle: queue.lease_handle(claim),
            duration: queue.queue_config(&claim.queue).lease_duration,
        }
    }

    /// Run `work`, renewing the lease every third of its duration.
    ///
    /// The work is polled at once: the first renewal is a period away (the
    /// claim has just set the lease), not an immediate interval tick, which
    /// tokio's timer delivers at its next millisecond tick and which made
    /// every step wait ~1 ms before it started.
    ///
    /// The caller pins the work where it stands (`std::pin::pin!`): taken by
    /// value, the work would be held twice in this future's state, as the
    /// argument and as the pinned local, and a step's future is kilobytes.
    ///
    /// A renewal is in memory; it fails once the claim is gone or a cancel
    /// was requested, and then the lease runs out. `failed` is told each
    /// failure.
    pub(super) async fn keep<F: Future>(
        &self,
        mut work: Pin<&mut F>,
        failed: impl Fn(&taquba::Error),
    ) -> F::Output {
        let mut renew = crate::sync::ticks_after(self.duration / 3);
        loop {
            tokio::select! {
                biased;
                done = &mut work => return done,
                _ = renew.tick() => {
                    if let Err(e) = self.handle.ensure_at_least(self.duration) {
                        failed(&e);
                    }
                }
            }
        }
    }
}

/// Check a claimed job is a live step of a run; dead-letter it otherwise.
async fn admit<R, H>(inner: &Inner<R, H>, claim: Claim) -> Option<StepJob> {
    let started_ms = inner.now_ms();
    let history = history::seq_of(&claim.headers);
    let parsed = parse_step_headers(&claim.headers)
        .map(|(run_id, step)| (run_id.to_string(), step))
        .and_then(|(run_id, step)| {
            parse_step_extras(&claim.headers)
                .map(|(wf, before)| (run_id, step, Arc::<str>::from(wf), before))
        });
    let (run_id, step, workflow, before) = match parsed {
        Ok(parsed) => parsed,
        Err(why) => {
            reject(inner, &claim, &why).await;
            return None;
        }
    };
    let (signal, unwrapped, sender) = if claim.headers.contains_key(HEADER_SIGNAL) {
        match decode::<SignalledPayload>(claim.id.as_bytes(), &claim.payload) {
            Ok(p) => (Some(p.signal), Some(p.payload), None),
            Err(e) => {
                reject(inner, &claim, &e.to_string()).await;
                return None;
            }
        }
    } else if let Some(signal) = &claim.signal {
        match SentSignal::of(&claim.id, &claim.headers, signal) {
            Ok(sent) => (Some(sent.payload), None, sent.sender),
            // A bare payload on a wait that takes a `SentSignal`: an older
            // Waymark's signal (a rolling deploy, a rollback), taken as the
            // payload it is.
            Err(_) => (Some(signal.clone()), None, None),
        }
    } else {
        (None, None, None)
    };
    // The commit that enqueued this job (or the signal that woke it) may
    // still wait for its flush.
    inner.pending.settled(&run_id).await;
    // A client request's signal: its reply commits before the step can
    // settle, which takes the job (the request's evidence of delivery) off
    // the queue. A failure does not hold the step up (nor spend one of its
    // attempts): only the answer to that request applied again after a
    // crash can then be wrong (`NotWaiting`).
    if let Some(request) = sender
        && let Err(e) = signalled(inner, &run_id, &request).await
    {
        tracing::warn!(job_id = %claim.id, request, "storing the reply of the request that signalled the step failed; the step runs: {e}");
    }
    if inner.pending.take_own(&claim.id) {
        // This process's own commit enqueued it and pointed the run at it.
        return Some(StepJob {
            claim,
            run_id,
            step,
            workflow,
            before,
            signal,
            unwrapped,
            children: Vec::new(),
            started_ms,
            history,
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
        signal,
        unwrapped,
        children: Vec::new(),
        started_ms,
        history,
    })
}

/// Store the reply `Signalled` of client request `request`, whose signal
/// woke a step of run `run_id`, unless one is stored (see
/// `WorkflowRuntime::signal_once`).
async fn signalled<R, H>(
    inner: &Inner<R, H>,
    run_id: &str,
    request: &str,
) -> Result<(), crate::Error> {
    let Some(reply) = inner.signalled_reply(run_id, request).await? else {
        return Ok(());
    };
    let key = crate::control::ControlKeys::new(&inner.cfg.queue_name).reply(request);
    // A reply the request stored meanwhile stands: it says the same.
    inner
        .queue
        .kv_compare_commit(&[(&key, None)], reply)
        .await?;
    Ok(())
}

/// Dead-letter a job that is not a valid step, with the reason as its error.
/// A run whose record still points at the job is then reconciled (ended
/// `Failed` with the reason), at once: the job is watched as due now.
async fn reject<R, H>(inner: &Inner<R, H>, claim: &Claim, why: &str) {
    tracing::warn!(job_id = %claim.id, queue = %inner.cfg.queue_name, "dead-lettering invalid step job: {why}");
    match inner.queue.dead_letter(claim, why).await {
        Ok(_) => inner
            .lapsed
            .watch(&claim.id, claim.attempts, inner.now_ms()),
        Err(e) => tracing::warn!(job_id = %claim.id, "dead-lettering failed: {e}"),
    }
}

/// Call the runner. A panic is a transient error. Returns what it staged
/// beside what it returned (the handle is closed from then on).
async fn run_runner<R: StepRunner, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    entry: &InFlight,
) -> (Result<StepOutcome, StepError>, SettlementEffects) {
    let claim = &job.claim;
    let (memo, run_memo) = Memo::scopes(
        inner.queue.clone(),
        &job.run_id,
        inner.keys.data(&job.run_id),
        inner.keys.run(&job.run_id),
        &claim.id,
        job.step,
        inner.queue.lease_handle(claim),
    );
    let step = Step {
        run_id: job.run_id.clone(),
        workflow: job.workflow.to_string(),
        step_number: job.step,
        payload: job.payload().to_vec(),
        headers: user_headers(&claim.headers),
        job_id: claim.id.clone(),
        attempts: job.attempts(),
        max_attempts: job.max_attempts(),
        cancel_token: entry.token.clone(),
        memo,
        run_memo,
        signal: job.signal.clone(),
        children: job.children.clone(),
        effects: StagedEffects::new(
            inner.queue.clone(),
            inner.app_keys.clone(),
            &inner.cfg.queue_name,
        ),
    };
    let started = std::time::Instant::now();
    // The call itself inside the guard too: a runner may panic before
    // returning its future.
    let ran = AssertUnwindSafe(async { inner.runner.run_step(&step).await })
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic".into());
            Err(StepError::transient(format!("step panicked: {what}")))
        });
    metrics::step_ran(&job.workflow, started.elapsed());
    (ran, step.effects.take())
}

/// Turn what the runner returned into a settlement and a health change, and
/// say whether the settlement commits the outcome the runner returned (and
/// so the effects it staged): not on an error, an external cancel, or an
/// outcome the runtime refuses (an oversize result or payload).
fn decide<R, H>(
    inner: &Inner<R, H>,
    job: &StepJob,
    ran: Result<StepOutcome, StepError>,
    cancelled: bool,
) -> (Verdict, Health, bool) {
    use TerminalStatus::*;
    let returned = |(verdict, health)| (verdict, health, true);
    let refused = |(verdict, health)| (verdict, health, false);
    match ran {
        // A runner's own cancel wins over an external one: it has a reason.
        Ok(StepOutcome::Cancel { reason }) => returned((
            Verdict::End(job.outcome(Cancelled, None, Some(reason))),
            Health::Neutral,
        )),
        _ if cancelled => refused((Verdict::End(job.stopped(inner.now_ms())), Health::Neutral)),
        Ok(StepOutcome::Continue { payload }) => next(job, payload, None, false),
        Ok(StepOutcome::ContinueAfter { payload, delay }) => next(job, payload, Some(delay), false),
        Ok(StepOutcome::WaitForSignal { payload, timeout }) => {
            next(job, payload, Some(timeout), true)
        }
        Ok(StepOutcome::ContinueAsNew { input }) => {
            let (verdict, health, returned) = next(job, input, None, false);
            match verdict {
                Verdict::Next { payload, .. } => {
                    (Verdict::NewSegment { input: payload }, health, returned)
                }
                verdict => (verdict, health, returned),
            }
        }
        Ok(StepOutcome::SpawnChildren {
            children,
            payload,
            fail_fast,
        }) => {
            let (verdict, health, returned) = next(job, payload, None, false);
            match verdict {
                Verdict::Next { payload, .. } if !children.is_empty() => {
                    let spawn = Verdict::Spawn {
                        children,
                        payload,
                        fail_fast,
                    };
                    (spawn, health, returned)
                }
                verdict => (verdict, health, returned),
            }
        }
        Ok(StepOutcome::Succeed { result }) if result.len() > MAX_RESULT_BYTES => {
            let why = format!(
                "returned a result of {} bytes, over the limit of {MAX_RESULT_BYTES}; store it elsewhere and return a reference",
                result.len()
            );
            refused((Verdict::End(job.failed(&why)), Health::Failure(why)))
        }
        Ok(StepOutcome::Succeed { result }) => returned((
            Verdict::End(job.outcome(Succeeded, Some(result), None)),
            Health::Success,
        )),
        Ok(StepOutcome::Fail { reason }) => returned((
            Verdict::End(job.outcome(Failed, None, Some(reason.clone()))),
            Health::Failure(reason),
        )),
        Err(e) if e.is_permanent() => refused((
            Verdict::DeadLetter(e.message.clone(), job.failed(&e.message)),
            Health::Failure(e.message),
        )),
        Err(e) if job.attempts() >= job.max_attempts() => {
            let why = format!("gave up after {} attempts: {}", job.attempts(), e.message);
            refused((
                Verdict::DeadLetter(e.message.clone(), job.failed(&why)),
                Health::Failure(e.message),
            ))
        }
        Err(e) => {
            let policy = inner.cfg.retry_policy(&job.workflow);
            let delay = policy.delay(job.attempts(), crate::policy::draw());
            tracing::info!(error = %e.message, retry_in = ?delay, "step failed; retrying");
            refused((
                Verdict::Again {
                    at: inner.now_ms().saturating_add(saturating_ms(delay)),
                    spent: true,
                    parked: false,
                },
                Health::Failure(e.message),
            ))
        }
    }
}

fn next(
    job: &StepJob,
    payload: Vec<u8>,
    delay: Option<Duration>,
    signal_wait: bool,
) -> (Verdict, Health, bool) {
    if payload.len() > MAX_PAYLOAD_BYTES {
        let why = format!(
            "returned a payload of {} bytes, over the limit of {MAX_PAYLOAD_BYTES}",
            payload.len()
        );
        return (Verdict::End(job.failed(&why)), Health::Failure(why), false);
    }
    let verdict = Verdict::Next {
        payload,
        delay,
        signal_wait,
    };
    (verdict, Health::Success, true)
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use taquba::object_store::memory::InMemory;

    use super::*;

    /// A step starts on the first poll of its task. The lease's renewal
    /// interval used to be awaited for its first (immediate) tick before the
    /// work was polled; tokio's timer delivers that tick at its next
    /// millisecond, so every step waited ~1 ms before it began (1.2 ms of
    /// the 2.5 ms step-to-step gap at a 1 ms flush). The first renewal is
    /// now a period away and the work is polled first.
    #[tokio::test]
    async fn the_work_under_a_lease_runs_on_the_first_poll() {
        let queue = Queue::open(Arc::new(InMemory::new()), "t").await.unwrap();
        queue.enqueue("q", b"x".to_vec()).await.unwrap();
        let claim = queue
            .claim("q", Duration::from_secs(30))
            .await
            .unwrap()
            .expect("a job");
        let lease = Lease::of(&queue, &claim);
        let work = std::pin::pin!(async { 7 });
        let keep = std::pin::pin!(lease.keep(work, |_| {}));
        assert_eq!(
            futures_util::poll!(keep),
            Poll::Ready(7),
            "the work waited for a timer before it was polled"
        );
    }

    /// The size of the future a function of two arguments returns.
    fn future_size<A, B, F: Future>(_: fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The pool spawns a task per claimed step, and tokio copies the task's
    /// future into place, first into a box of its own when it is over 16 KiB
    /// (in a release build). It was 26 KiB, because the lease held the
    /// step's future twice; it is about half that now, under the bound.
    #[test]
    fn a_step_task_is_not_boxed_by_tokio() {
        let size = future_size(run_step_job::<crate::runner::Done, crate::hook::NoopTerminalHook>);
        assert!(size <= 16 * 1024, "a step task's future is {size} bytes");
    }
}
