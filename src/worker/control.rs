//! Applying client requests: the jobs of the control queue `{Q}-control`,
//! which taquba's inbox enqueues from the objects clients write.
//!
//! Each request is applied through the runtime's own `submit` / `cancel` /
//! `signal` / `trigger` / `pause_schedule` / `resume_schedule`, and answered
//! with a reply record (see [`crate::control`]):
//!
//! | request                  | commits                                                        |
//! |--------------------------|----------------------------------------------------------------|
//! | submit, new run          | the reply, **in submit's own transaction**; then the job's ack |
//! | submit, run exists       | `ack_with` { reply `newly_submitted: false` or `InputMismatch` } |
//! | cancel, step removed     | the reply, **in the run's ending transaction**; then the job's ack |
//! | cancel, step running, or nothing to cancel | the request on the step job (or nothing); then `ack_with` { reply } |
//! | signal                   | a note of the waiting job; `signal`'s commit, naming the request on the job's record; the reply if none is stored (the job's claim or removal stores it); then the job's ack |
//! | rerun, requeue of a step job | the reply, **in the re-run's own transaction**; then the job's ack |
//! | reset                    | the reply, **in the reset's own transaction**; then the job's ack |
//! | trigger, pause, resume   | the reply, **in the change's own transaction**; then the job's ack |
//! | trigger, pause, resume, rerun, reset refused, or no change | `ack_with` { reply: the typed refusal, or `changed: false` / `was_open: false` } |
//! | requeue of a hook        | taquba's `requeue_dead_job`; then `ack_with` { reply }         |
//! | does not decode          | `dead_letter_with` { reply `Refused` with the reason }         |
//! | transient failure        | `nack_with` (retried; on the last attempt the reply `Refused`) |
//!
//! A job whose reply exists was applied before a crash and is only acked,
//! so a request whose reply commits with its effect is applied once even
//! when the worker dies between its effect and its ack.
//!
//! A signal's commit is taquba's and takes no extra effects, so its reply
//! cannot join it. Instead the signal names its request on the waiting
//! job's record (a `SentSignal`), and every commit that takes such a job
//! off the queue first stores the request's reply `Signalled` if none is
//! stored: its claim's admission, before the step runs (a failure to store
//! it is logged and the step runs anyway), and a cancel that removes it.
//! A signal request that failed but whose reply is stored (its signal
//! landed, its answer was lost) is acked. Applied again, the request signals only the job its note
//! names, never a later wait: `Signalled` if that job's record names this
//! request, the signal if it still waits, else `NotWaiting` (its wait
//! ended otherwise, or another caller's signal took it). Its own reply
//! commits only if none is stored. (A wait from an earlier Waymark takes
//! the bare payload, which names no sender: there an equal payload counts
//! as this request's, as before.)
//!
//! Two others commit effect and reply apart, and a crash between them
//! leaves an answer that may be wrong:
//! - a cancel whose request reached a running step (taquba stores it on
//!   the job as a flag, with no extra effects, and the step's settlement
//!   ends the run), applied again, answers by what it finds: `true` when it
//!   ends the run itself or its request newly reaches a running attempt,
//!   else `false` (the run has ended, or the stored flag reads as an
//!   earlier cancel's: nothing on the job says whose it was);
//! - a hook's requeue applied again answers `JobNotFound`. taquba's
//!   `requeue_dead_job` takes no extra effects and leaves no trace that
//!   names its caller (the job's state, and a `Requeued` entry in its
//!   attempt history, both gone once the hook is acked), and a note
//!   committed before it cannot tell its own requeue from another caller's
//!   (a second request, an operator), nor, once the hook job is gone, from
//!   the retention sweep that deleted the dead job before any requeue.
//!   Answering `RequeuedHook` from a note would report requeues that did
//!   not happen; it would take a `requeue_dead_job` with effects for the
//!   reply to join it.
//!
//! Requests about one run (header `workflow.run_id`) apply one at a time in
//! the order they were claimed; others run concurrently. That is send order:
//! the queue claims by enqueue time, then by job id; the inbox enqueues in
//! send order, and stamps one time on what one pass enqueues, and a control
//! job's id begins with the ULID of its send
//! ([`control_job_id`](crate::control::control_job_id)), whatever the
//! request id. One process's sends, each awaited before the next, apply in
//! that order; sends of several processes apply in the order of their
//! clocks within a pass (as the inbox orders them), and a request retried
//! after a transient failure applies after those claimed meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use taquba::{Claim, ExpiryIndex, SettlementEffects};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::control::{ControlKeys, ReplyBody, Request, RerunRefusal, SignalNote};
use crate::error::Error;
use crate::hook::TerminalHook;
use crate::record::{HEADER_RUN_ID, decode, encode};
use crate::runner::StepRunner;
use crate::runtime::{RunSpec, WorkflowRuntime, holds_signal};
use crate::store::control_queue_name;
use crate::sync::lock;

/// The control side of one `run`: its keys, the replies' expiry index and
/// the per-run order of requests.
struct Control {
    keys: ControlKeys,
    expiry: ExpiryIndex,
    /// The last request claimed for each run: it closes when it is done.
    last: Mutex<HashMap<String, watch::Receiver<bool>>>,
    /// Test hook: the next request returns before it settles its claim, as
    /// a worker that crashed there (its effects committed, its job still
    /// claimed).
    #[cfg(test)]
    crash_before_settle: std::sync::atomic::AtomicBool,
}

impl Control {
    fn new(keys: ControlKeys) -> Self {
        Self {
            expiry: ExpiryIndex::new(keys.expiry_prefix().to_vec()),
            keys,
            last: Mutex::new(HashMap::new()),
            #[cfg(test)]
            crash_before_settle: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the test hook stops this request before it settles.
    #[cfg(test)]
    fn crashed(&self) -> bool {
        self.crash_before_settle
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    #[cfg(not(test))]
    fn crashed(&self) -> bool {
        false
    }
}

/// Claim and apply client requests until `stop` fires, and drop replies past
/// the runtime's `terminal_retention`. Returns at once (when `stop` fires)
/// if the queue's inbox does not accept this runtime's control queue — the
/// store was not opened with [`open_worker_store`](crate::open_worker_store).
pub(super) async fn serve<R: StepRunner, H: TerminalHook>(
    rt: &WorkflowRuntime<R, H>,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let inner = &rt.inner;
    let queue_name = control_queue_name(&inner.cfg.queue_name);
    if !inner.queue.inbox_accepts(&queue_name) {
        tracing::debug!(
            queue = %queue_name,
            "the store's inbox does not accept client requests for this runtime"
        );
        stop.cancelled().await;
        return Ok(());
    }
    let keys = ControlKeys::new(&inner.cfg.queue_name);
    let control = Arc::new(Control::new(keys));
    let claims = super::claim_loop(
        super::Claiming::of(inner, &queue_name, inner.cfg.max_concurrent_steps),
        stop.clone(),
        {
            let rt = rt.clone();
            let control = control.clone();
            move |claim| {
                // Chained here, in claim order, before the task runs.
                let (after, done) = control.enqueue(&claim);
                apply(rt.clone(), control.clone(), claim, after, done)
            }
        },
    );
    let retention = async {
        let mut replies = super::maintenance::Expiring::new(inner.now_ms());
        let mut tick = tokio::time::interval(inner.cfg.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            // Bounded and abandoned at shutdown, like the pool's own
            // retention (see `maintenance`).
            let pass = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                pass = replies.pass(
                    inner,
                    &control.expiry,
                    control.keys.expiry_prefix(),
                    inner.cfg.terminal_retention,
                    |id| [control.keys.reply(id), control.keys.signalling(id)],
                ) => pass,
            };
            match pass {
                Ok(true) => tick.reset_immediately(),
                Ok(false) => {}
                Err(e) => tracing::warn!("reply retention pass failed (retried next tick): {e}"),
            }
        }
    };
    tokio::try_join!(claims, retention).map(|_| ())
}

impl Control {
    /// Register a claimed request behind the last one of its run: returns
    /// what to wait for first, and the sender that marks this one done.
    fn enqueue(&self, claim: &Claim) -> (Option<watch::Receiver<bool>>, Done) {
        let run_id = claim
            .headers
            .get(HEADER_RUN_ID)
            .cloned()
            .unwrap_or_default();
        let (tx, rx) = watch::channel(false);
        let before = lock(&self.last).insert(run_id.clone(), rx.clone());
        (before, Done { tx, rx, run_id })
    }
}

/// Marks one request done and forgets it if it is still its run's last.
struct Done {
    tx: watch::Sender<bool>,
    rx: watch::Receiver<bool>,
    run_id: String,
}

impl Done {
    fn finish(self, control: &Control) {
        let _ = self.tx.send(true);
        let mut last = lock(&control.last);
        if last
            .get(&self.run_id)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            last.remove(&self.run_id);
        }
    }
}

/// Apply one request job, after the run's previous request.
///
/// The claim's lease is renewed all the while, the wait for the previous
/// request included: most requests commit their effect before the reply
/// that settles the claim, and a lease that lapsed between the two would
/// have the request applied a second time.
async fn apply<R: StepRunner, H: TerminalHook>(
    rt: WorkflowRuntime<R, H>,
    control: Arc<Control>,
    claim: Claim,
    after: Option<watch::Receiver<bool>>,
    done: Done,
) {
    let lease = super::step::Lease::of(&rt.inner.queue, &claim);
    let work = std::pin::pin!(async {
        if let Some(mut before) = after {
            // An error means the previous task is gone: nothing to wait for.
            let _ = before.wait_for(|finished| *finished).await;
        }
        if let Err(e) = apply_now(&rt, &control, &claim).await {
            tracing::warn!(
                request_id = crate::control::request_id_of(&claim),
                "settling a client request failed (it is retried): {e}"
            );
        }
    });
    lease.keep(work, |_| {}).await;
    done.finish(&control);
}

async fn apply_now<R: StepRunner, H: TerminalHook>(
    rt: &WorkflowRuntime<R, H>,
    control: &Control,
    claim: &Claim,
) -> Result<(), Error> {
    let inner = &rt.inner;
    let queue = &inner.queue;
    let request_id = crate::control::request_id_of(claim);
    let reply_key = control.keys.reply(request_id);
    if queue.view().kv_get(&reply_key).await?.is_some() {
        // Applied before a crash that came before the ack.
        queue.ack(claim).await?;
        return Ok(());
    }
    // The reply record and its expiry entry, added to `effects`.
    let reply_onto = |effects: SettlementEffects, body: ReplyBody| {
        control
            .keys
            .reply_onto(effects, &control.expiry, request_id, body, inner.now_ms())
    };
    let reply = |body: ReplyBody| reply_onto(SettlementEffects::default(), body);
    let request: Request = match decode(request_id.as_bytes(), &claim.payload) {
        Ok(request) => request,
        Err(e) => {
            let reason = format!("the request does not decode: {e}");
            tracing::warn!(request_id, "refusing a client request: {reason}");
            let effects = reply(ReplyBody::Refused {
                reason: reason.clone(),
            })?;
            queue.dead_letter_with(claim, &reason, effects).await?;
            return Ok(());
        }
    };
    // Pause and resume share their arm below.
    let paused = matches!(request, Request::Pause { .. });
    // A signal's reply may be stored by the commit that took its job off
    // the queue (see the arm below).
    let signal = matches!(request, Request::Signal { .. });
    let applied = match request {
        Request::Submit {
            run_id,
            input,
            headers,
            priority,
            max_attempts_per_step,
            workflow,
            deadline,
        } => {
            let spec = RunSpec {
                run_id: Some(run_id.clone()),
                input,
                headers,
                priority,
                max_attempts_per_step,
                workflow,
                deadline,
            };
            let created = ReplyBody::Submitted {
                run_id: run_id.clone(),
                newly_submitted: true,
            };
            match rt
                .submit_with(spec, |effects| reply_onto(effects, created.clone()))
                .await
            {
                // The reply committed with the run.
                Ok(outcome) if outcome.newly_submitted => return ack(queue, control, claim).await,
                Ok(outcome) => Ok(ReplyBody::Submitted {
                    run_id: outcome.run_id,
                    newly_submitted: false,
                }),
                Err(Error::InputMismatch(run_id)) => Ok(ReplyBody::InputMismatch { run_id }),
                Err(e) => Err(e),
            }
        }
        // The reply commits with the run's ending when the cancel removes
        // its step (a crash before the ack finds it, so the cancel answers
        // `true` once). A request to a running step, or nothing to cancel,
        // is answered by `ack_with`.
        Request::Cancel { run_id } => {
            let ended = ReplyBody::Cancelled {
                run_id: run_id.clone(),
                cancelled: true,
            };
            match rt
                .cancel_with(&run_id, |effects| reply_onto(effects, ended.clone()))
                .await
            {
                Ok((_, true)) => return ack(queue, control, claim).await,
                Ok((cancelled, false)) => Ok(ReplyBody::Cancelled { run_id, cancelled }),
                Err(e) => Err(e),
            }
        }
        // The waiting job is noted (durably) before the signal, so a crash
        // between the signal's commit and the reply's re-applies it to that
        // job only, never to a later wait; the signal names this request on
        // the job's record, and the commits that take the job off the queue
        // store this reply (see `signal_once`). So the reply commits only if
        // none is stored.
        Request::Signal { run_id, payload } => {
            let note_key = control.keys.signalling(request_id);
            // A note that cannot be read (the store failed, or it does not
            // decode) is this request's failure, answered below like any
            // other: retried, or refused with the reason.
            let earlier = match queue.view().kv_get(&note_key).await {
                Ok(Some(bytes)) => decode::<SignalNote>(&note_key, &bytes).map(|n| Some(n.job_id)),
                Ok(None) => Ok(None),
                Err(e) => Err(e.into()),
            };
            let note = async |job_id: &str| {
                let note = SignalNote {
                    job_id: job_id.to_string(),
                };
                let effects = SettlementEffects::default()
                    .kv_put(note_key.clone(), encode(&note_key, &note)?)
                    .expiry_entry(&control.expiry, inner.now_ms(), request_id.as_bytes());
                queue.commit_effects(effects).await?;
                Ok(())
            };
            let signalled = match earlier {
                Ok(earlier) => {
                    rt.signal_once(&run_id, payload, Some(request_id), earlier, note)
                        .await
                }
                // Which wait an earlier attempt noted is unknown, so the
                // signal is not delivered again (it could reach a later
                // wait). Delivered and still waiting to run: answered
                // `Signalled`. Delivered and taken off the queue: the
                // commit that took it stored the reply, found above or
                // kept by the compare below. Otherwise refused.
                Err(e) if e.is_unreadable_record() => match inner.current_step(&run_id).await {
                    Ok(Some((_, job)))
                        if matches!(
                            holds_signal(&job, Some(request_id), &payload),
                            Ok(Some(true))
                        ) =>
                    {
                        Ok(())
                    }
                    Ok(_) => Err(e),
                    Err(read) => Err(read),
                },
                Err(e) => Err(e),
            };
            match signalled {
                Ok(()) => Ok(ReplyBody::Signalled { run_id }),
                Err(Error::NotWaiting(run_id)) => Ok(ReplyBody::NotWaiting { run_id }),
                Err(Error::RunNotFound(run_id)) => Ok(ReplyBody::RunNotFound { run_id }),
                Err(e) => Err(e),
            }
        }
        Request::Trigger { schedule } => {
            let body = |run_id: &str| ReplyBody::Triggered {
                schedule: schedule.clone(),
                run_id: run_id.to_string(),
            };
            match rt
                .trigger_with(&schedule, |run_id| reply(body(run_id)))
                .await
            {
                // The reply committed with the run.
                Ok(_) => return ack(queue, control, claim).await,
                Err(e) => schedule_refusal(e),
            }
        }
        Request::Pause { schedule } | Request::Resume { schedule } => {
            let body = |changed: bool| ReplyBody::Paused {
                schedule: schedule.clone(),
                paused,
                changed,
            };
            match rt
                .set_paused_with(&schedule, paused, || reply(body(true)))
                .await
            {
                // The reply committed with the change.
                Ok(true) => return ack(queue, control, claim).await,
                Ok(false) => Ok(body(false)),
                Err(e) => schedule_refusal(e),
            }
        }
        // The reply commits with the reset (a crash before the ack finds
        // it, so the reset is applied once); nothing to reset is answered
        // by `ack_with`.
        Request::Reset { workflow } => {
            let body = |was_open: bool| ReplyBody::Reset {
                workflow: workflow.clone(),
                was_open,
            };
            match rt
                .reset_workflow_with(&workflow, |effects, was_open| {
                    reply_onto(effects, body(was_open))
                })
                .await
            {
                Ok((_, true)) => return ack(queue, control, claim).await,
                Ok((was_open, false)) => Ok(body(was_open)),
                Err(e) => Err(e),
            }
        }
        // A re-run's reply commits with it; a refusal is answered by
        // `ack_with`.
        Request::Requeue { job_id } => match requeue(rt, job_id, &reply_onto).await {
            Ok(None) => return ack(queue, control, claim).await,
            Ok(Some(body)) => Ok(body),
            Err(e) => Err(e),
        },
        Request::Rerun { run_id, from_step } => {
            let rerun = rt.rerun_with(&run_id, from_step, |effects, rerun| {
                let run_id = run_id.clone();
                reply_onto(effects, ReplyBody::Rerun { run_id, rerun })
            });
            match rerun.await {
                Ok(_) => return ack(queue, control, claim).await,
                Err(e) => RerunRefusal::of(&e).map(ReplyBody::RerunRefused).ok_or(e),
            }
        }
    };
    if control.crashed() {
        return Ok(());
    }
    // A signal that failed here may still have been delivered (its commit
    // landed, its answer was lost): the step that took it stored the
    // reply `Signalled`, which a refusal must not overwrite.
    if signal && applied.is_err() && queue.view().kv_get(&reply_key).await?.is_some() {
        queue.ack(claim).await?;
        return Ok(());
    }
    match applied {
        Ok(body) if signal => {
            queue
                .kv_compare_commit(&[(&reply_key, None)], reply(body)?)
                .await?;
            queue.ack(claim).await?;
        }
        Ok(body) => {
            queue.ack_with(claim, reply(body)?).await?;
        }
        // A signal's refusal, like its answer, is stored only if no
        // commit that took its job off the queue stored `Signalled` first.
        Err(e) if e.is_permanent() && signal => {
            tracing::warn!(request_id, "refusing a client request: {e}");
            let body = ReplyBody::Refused {
                reason: e.to_string(),
            };
            queue
                .kv_compare_commit(&[(&reply_key, None)], reply(body)?)
                .await?;
            queue.ack(claim).await?;
        }
        Err(e) if e.is_permanent() => {
            tracing::warn!(request_id, "refusing a client request: {e}");
            let body = ReplyBody::Refused {
                reason: e.to_string(),
            };
            queue.ack_with(claim, reply(body)?).await?;
        }
        // A signal's last attempt: its refusal, like a permanent one, is
        // stored only if no commit that took its job stored `Signalled`
        // (the signal may have landed before the error).
        Err(e) if signal && claim.attempts >= claim.max_attempts => {
            let reason = format!(
                "applying the request failed after {} attempts: {e}",
                claim.attempts
            );
            let body = ReplyBody::Refused {
                reason: reason.clone(),
            };
            let stored = queue
                .kv_compare_commit(&[(&reply_key, None)], reply(body)?)
                .await?;
            match stored {
                Some(_) => queue.dead_letter(claim, &reason).await?,
                // Delivered after all: not a failed request.
                None => queue.ack(claim).await?,
            }
        }
        Err(e) => {
            // Retried after the queue's backoff; the reply is written only
            // if this was the last attempt.
            let reason = format!(
                "applying the request failed after {} attempts: {e}",
                claim.attempts
            );
            let body = ReplyBody::Refused { reason };
            queue.nack_with(claim, &e.to_string(), reply(body)?).await?;
        }
    }
    Ok(())
}

/// Ack a request whose reply committed with its effect.
async fn ack(queue: &taquba::Queue, control: &Control, claim: &Claim) -> Result<(), Error> {
    if control.crashed() {
        return Ok(());
    }
    Ok(queue.ack(claim).await?)
}

/// Requeue dead job `job_id`: a hook notification goes back to pending
/// (taquba's `requeue_dead_job`); a step job's run is re-run from the
/// job's step (its run ended with it; a re-run is how a step runs again).
/// A step job is requeued once (its job stays dead, listed, but a second
/// requeue finds its run re-run since and answers `JobNotFound`). The
/// re-run's reply commits with it, through `reply_onto` (`None` returned);
/// a crash between a hook's requeue and its reply re-applies it, which then
/// answers `JobNotFound` (see the module doc for why no note can fix it).
async fn requeue<R: StepRunner, H: TerminalHook>(
    rt: &WorkflowRuntime<R, H>,
    job_id: String,
    reply_onto: &impl Fn(SettlementEffects, ReplyBody) -> Result<SettlementEffects, Error>,
) -> Result<Option<ReplyBody>, Error> {
    let queue = &rt.inner.queue;
    let job = match queue.view().job_record(&job_id).await? {
        Some(job) if job.status == taquba::JobStatus::Dead => job,
        _ => return Ok(Some(ReplyBody::JobNotFound { job_id })),
    };
    if job.queue.as_str() == rt.inner.cfg.hook_queue {
        return match queue.requeue_dead_job(&job_id).await {
            Ok(()) => Ok(Some(ReplyBody::RequeuedHook { job_id })),
            Err(taquba::Error::JobNotFound(_) | taquba::Error::InvalidState) => {
                Ok(Some(ReplyBody::JobNotFound { job_id }))
            }
            Err(e) => Err(e.into()),
        };
    }
    if job.queue.as_str() != rt.inner.cfg.queue_name {
        return Ok(Some(ReplyBody::Refused {
            reason: format!(
                "job `{job_id}` is on queue `{}`, not this worker's step or hook queue",
                job.queue.as_str()
            ),
        }));
    }
    let (run_id, step) = match crate::record::parse_step_headers(&job.headers) {
        Ok((run_id, step)) => (run_id.to_string(), step),
        Err(why) => {
            return Ok(Some(ReplyBody::Refused {
                reason: format!("dead job `{job_id}` is not a run's step: {why}"),
            }));
        }
    };
    // A dead step job is requeued once: after its run was re-run (by this
    // request or another) it is no longer the run's last ending.
    if let Some(ended) = rt.outcome(&run_id).await?
        && ended.reruns != crate::record::rerun_of(&job.headers)
    {
        return Ok(Some(ReplyBody::JobNotFound { job_id }));
    }
    let rerun = rt.rerun_with(&run_id, step, |effects, rerun| {
        let run_id = run_id.clone();
        reply_onto(effects, ReplyBody::Rerun { run_id, rerun })
    });
    match rerun.await {
        Ok(_) => Ok(None),
        Err(e) => RerunRefusal::of(&e)
            .map(|refusal| Some(ReplyBody::RerunRefused(refusal)))
            .ok_or(e),
    }
}

/// The answer to a schedule request the runtime refused: its typed refusal
/// (unknown schedule, tripped workflow, overlap, shutting down) as a reply,
/// or the error to handle like any other.
fn schedule_refusal(e: Error) -> Result<ReplyBody, Error> {
    match e {
        Error::ScheduleNotFound(schedule) => Ok(ReplyBody::ScheduleNotFound { schedule }),
        Error::WorkflowTripped { schedule, workflow } => {
            Ok(ReplyBody::WorkflowTripped { schedule, workflow })
        }
        Error::ScheduleOverlap { schedule, run_id } => {
            Ok(ReplyBody::ScheduleOverlap { schedule, run_id })
        }
        Error::ShuttingDown => Ok(ReplyBody::ShuttingDown),
        e => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerStatus;
    use crate::control::ReplyRecord;
    use crate::hook::NoopTerminalHook;
    use crate::read::RunState;
    use crate::runner::{Step, StepError, StepOutcome};
    use crate::store::DEFAULT_QUEUE_NAME;
    use std::time::Duration;
    use taquba::{EnqueueOptions, MockClock, OpenOptions, Queue};

    const HOUR: Duration = Duration::from_secs(3600);
    /// The workflow with a breaker (an hour's backoff after a failure).
    const GUARDED: &str = "guarded";
    /// Only a hang guard: every wait here ends in milliseconds.
    const GUARD: Duration = Duration::from_secs(60);

    /// Run `sig` waits for a signal at steps 1 and 2 (recording what each
    /// saw), then succeeds; every other run fails at once.
    #[derive(Clone, Default)]
    struct Script(Arc<Mutex<Vec<Seen>>>);

    /// A step number and the signal its step saw.
    type Seen = (u32, Option<Vec<u8>>);

    impl crate::runner::StepRunner for Script {
        async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
            if step.run_id != "sig" {
                return Ok(StepOutcome::Fail {
                    reason: "no".into(),
                });
            }
            if step.step_number > 0 {
                lock(&self.0).push((step.step_number, step.signal.clone()));
            }
            Ok(if step.step_number < 2 {
                StepOutcome::WaitForSignal {
                    payload: vec![],
                    timeout: HOUR,
                }
            } else {
                StepOutcome::Succeed { result: vec![] }
            })
        }
    }

    /// A runtime whose pool runs steps on a store with no inbox (so it
    /// applies no request itself) and a clock that never moves, and the
    /// control side the test applies requests through.
    struct Harness {
        rt: WorkflowRuntime<Script, NoopTerminalHook>,
        control: Control,
        script: Script,
        worker: tokio::task::JoinHandle<Result<(), Error>>,
    }

    impl Harness {
        async fn new() -> Self {
            let store = Arc::new(taquba::object_store::memory::InMemory::new());
            let options = OpenOptions {
                clock: Arc::new(MockClock::new(1_800_000_000_000)),
                flush_interval: Some(Duration::from_millis(1)),
                ..Default::default()
            };
            let queue = Arc::new(Queue::open_with_options(store, "t", options).await.unwrap());
            let script = Script::default();
            let rt = WorkflowRuntime::builder(queue, script.clone(), NoopTerminalHook)
                .poll_interval(Duration::from_millis(5))
                .breaker(
                    GUARDED,
                    crate::BackoffPolicy {
                        initial: HOUR,
                        jitter: 0.0,
                        streak_limit: None,
                        ..Default::default()
                    },
                )
                .build()
                .unwrap();
            let worker = tokio::spawn({
                let rt = rt.clone();
                async move { rt.run(std::future::pending()).await }
            });
            Harness {
                rt,
                control: Control::new(ControlKeys::new(DEFAULT_QUEUE_NAME)),
                script,
                worker,
            }
        }

        /// Enqueue `request` as control job `id` and claim it.
        async fn claim(&self, id: &str, request: &Request) -> Claim {
            let queue = &self.rt.inner.queue;
            let control = control_queue_name(DEFAULT_QUEUE_NAME);
            let options = EnqueueOptions::default().id_override(id.to_string());
            queue
                .enqueue_with(&control, encode(id.as_bytes(), request).unwrap(), options)
                .await
                .unwrap();
            queue.claim(&control, HOUR).await.unwrap().unwrap()
        }

        /// Apply `claim` as a worker that crashes after the request's
        /// effects, before it settles the claim: its reply, if it is not
        /// committed with the effects, is lost, and the job is delivered
        /// again.
        async fn apply_and_crash(&self, claim: &Claim) {
            self.control
                .crash_before_settle
                .store(true, std::sync::atomic::Ordering::SeqCst);
            apply_now(&self.rt, &self.control, claim).await.unwrap();
            assert!(!self.control.crashed(), "the request reached its settle");
        }

        /// Run `sig` to its wait, stop the pool, and apply request
        /// `req-signal` (the signal `one`) as a worker that crashes before
        /// it settles: the signal is delivered, its reply lost, its step
        /// not run. The request's claim, to apply again.
        async fn signalled_and_crashed(&mut self) -> Claim {
            self.submit_sig().await;
            self.stop_pool().await;
            let request = Request::Signal {
                run_id: "sig".into(),
                payload: b"one".to_vec(),
            };
            let claim = self.claim("req-signal", &request).await;
            self.apply_and_crash(&claim).await;
            claim
        }

        /// Apply `claim` (delivered again) to the end; its reply.
        async fn apply_again(&self, claim: &Claim) -> ReplyBody {
            apply_now(&self.rt, &self.control, claim).await.unwrap();
            let key = self.control.keys.reply(&claim.id);
            let bytes = self.rt.inner.queue.view().kv_get(&key).await.unwrap();
            decode::<ReplyRecord>(&key, &bytes.expect("a reply"))
                .unwrap()
                .reply
        }

        /// Stop the pool: no step runs until [`Self::start_pool`].
        async fn stop_pool(&mut self) {
            self.worker.abort();
            let _ = (&mut self.worker).await;
        }

        fn start_pool(&mut self) {
            self.worker = tokio::spawn({
                let rt = self.rt.clone();
                async move { rt.run(std::future::pending()).await }
            });
        }

        /// The job run `sig` waits on.
        async fn waiting_job(&self) -> String {
            let (run, _) = self.rt.inner.current_step("sig").await.unwrap().unwrap();
            run.job_id
        }

        /// The state of a signal request that crashed after its note,
        /// before its signal: the note of the job `sig` waits on.
        async fn note_only(&self, request_id: &str) {
            let key = self.control.keys.signalling(request_id);
            let note = SignalNote {
                job_id: self.waiting_job().await,
            };
            let effects = SettlementEffects::default()
                .kv_put(key.clone(), encode(&key, &note).unwrap())
                .expiry_entry(&self.control.expiry, 1, request_id.as_bytes());
            self.rt.inner.queue.commit_effects(effects).await.unwrap();
        }

        async fn submit_sig(&self) {
            self.rt
                .submit(RunSpec {
                    run_id: Some("sig".into()),
                    ..Default::default()
                })
                .await
                .unwrap();
            self.waiting_at(1).await;
        }

        async fn until(&self, what: &str, mut check: impl AsyncFnMut() -> bool) {
            let deadline = tokio::time::Instant::now() + GUARD;
            while !check().await {
                assert!(tokio::time::Instant::now() < deadline, "never: {what}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }

        async fn waiting_at(&self, step: u32) {
            self.until("the run waits", async || {
                self.rt.status("sig").await.unwrap().is_some_and(|s| {
                    s.state == RunState::WaitingForSignal && s.current_step == step
                })
            })
            .await;
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.worker.abort();
        }
    }

    /// A signal request applied again after a crash between its signal and
    /// its reply (the run took the signal and waits again) answers that it
    /// signalled, and is not delivered to the new wait: one signal never
    /// satisfies two waits.
    #[tokio::test]
    async fn a_signal_applied_again_after_a_crash_is_not_delivered_to_a_later_wait() {
        let h = Harness::new().await;
        h.submit_sig().await;
        let request = Request::Signal {
            run_id: "sig".into(),
            payload: b"one".to_vec(),
        };
        let claim = h.claim("req-signal", &request).await;
        h.apply_and_crash(&claim).await;
        h.waiting_at(2).await;
        assert_eq!(
            h.apply_again(&claim).await,
            ReplyBody::Signalled {
                run_id: "sig".into()
            }
        );
        let status = h.rt.status("sig").await.unwrap().unwrap();
        assert_eq!(
            (status.state, status.current_step),
            (RunState::WaitingForSignal, 2),
            "the second wait got no signal"
        );
        assert_eq!(*lock(&h.script.0), [(1, Some(b"one".to_vec()))]);
    }

    /// A signal request applied again after a crash between its signal and
    /// its reply, before its step ran, answers that it signalled and is
    /// delivered once.
    #[tokio::test]
    async fn a_signal_applied_again_before_its_step_runs_is_delivered_once() {
        let mut h = Harness::new().await;
        let claim = h.signalled_and_crashed().await;
        assert_eq!(
            h.apply_again(&claim).await,
            ReplyBody::Signalled {
                run_id: "sig".into()
            }
        );
        h.start_pool();
        h.waiting_at(2).await;
        assert_eq!(*lock(&h.script.0), [(1, Some(b"one".to_vec()))]);
    }

    /// A signal request whose note (left by an earlier attempt) does not
    /// decode left `apply_now` with the error before any reply: the
    /// request was retried until taquba dead-lettered it, and the client
    /// waited out its timeout. It is now refused with the reason, and the
    /// run's wait is left as it is.
    #[tokio::test]
    async fn a_signal_whose_note_does_not_decode_is_refused_with_the_reason() {
        let h = Harness::new().await;
        h.submit_sig().await;
        let key = h.control.keys.signalling("req-signal");
        h.rt.inner.queue.kv_put(&key, b"not a note").await.unwrap();
        let request = Request::Signal {
            run_id: "sig".into(),
            payload: b"one".to_vec(),
        };
        let claim = h.claim("req-signal", &request).await;
        match h.apply_again(&claim).await {
            ReplyBody::Refused { reason } => {
                assert!(reason.contains("does not decode"), "{reason}")
            }
            other => panic!("not refused: {other:?}"),
        }
        h.waiting_at(1).await;
        assert!(lock(&h.script.0).is_empty());
    }

    /// The same, after the earlier attempt delivered the signal and crashed
    /// before its reply, the step not yet run: the run's current job holds
    /// this request's signal, so the answer is `Signalled`, and nothing is
    /// delivered twice.
    #[tokio::test]
    async fn a_delivered_signal_whose_note_does_not_decode_answers_signalled() {
        let mut h = Harness::new().await;
        let claim = h.signalled_and_crashed().await;
        let key = h.control.keys.signalling("req-signal");
        h.rt.inner.queue.kv_put(&key, b"not a note").await.unwrap();
        assert_eq!(
            h.apply_again(&claim).await,
            ReplyBody::Signalled {
                run_id: "sig".into()
            }
        );
        h.start_pool();
        h.waiting_at(2).await;
        assert_eq!(*lock(&h.script.0), [(1, Some(b"one".to_vec()))]);
    }

    /// A signal request applied again after a crash between its note and
    /// its signal delivers it once, to the noted wait.
    #[tokio::test]
    async fn a_signal_applied_again_after_a_crash_before_its_signal_delivers_it_once() {
        let h = Harness::new().await;
        h.submit_sig().await;
        h.note_only("req-signal").await;
        let request = Request::Signal {
            run_id: "sig".into(),
            payload: b"one".to_vec(),
        };
        let claim = h.claim("req-signal", &request).await;
        assert_eq!(
            h.apply_again(&claim).await,
            ReplyBody::Signalled {
                run_id: "sig".into()
            }
        );
        h.waiting_at(2).await;
        assert_eq!(*lock(&h.script.0), [(1, Some(b"one".to_vec()))]);
    }

    /// A signal request that crashed between its note and its signal, whose
    /// wait another caller then signalled with the same payload, does not
    /// claim that delivery when applied again.
    #[tokio::test]
    async fn a_signal_applied_again_does_not_answer_for_another_callers_delivery() {
        let mut h = Harness::new().await;
        h.submit_sig().await;
        h.stop_pool().await;
        h.note_only("req-signal").await;
        h.rt.signal("sig", b"one".to_vec()).await.unwrap();
        let request = Request::Signal {
            run_id: "sig".into(),
            payload: b"one".to_vec(),
        };
        let claim = h.claim("req-signal", &request).await;
        assert_eq!(
            h.apply_again(&claim).await,
            ReplyBody::NotWaiting {
                run_id: "sig".into()
            }
        );
        h.start_pool();
        h.waiting_at(2).await;
        assert_eq!(*lock(&h.script.0), [(1, Some(b"one".to_vec()))]);
    }

    /// A signal request applied again after a crash between its signal and
    /// its reply, whose step a cancel removed before it ran, answers that
    /// it signalled.
    #[tokio::test]
    async fn a_signal_applied_again_after_its_step_was_cancelled_answers_signalled() {
        let mut h = Harness::new().await;
        let claim = h.signalled_and_crashed().await;
        assert!(h.rt.cancel("sig").await.unwrap());
        assert_eq!(
            h.apply_again(&claim).await,
            ReplyBody::Signalled {
                run_id: "sig".into()
            }
        );
        assert!(lock(&h.script.0).is_empty(), "the step never ran");
    }

    /// A cancel request applied again after a crash between the cancel
    /// (which removed the waiting step and ended the run) and its ack
    /// answers that it cancelled the run.
    #[tokio::test]
    async fn a_cancel_applied_again_after_a_crash_answers_that_it_cancelled() {
        let h = Harness::new().await;
        h.submit_sig().await;
        let request = Request::Cancel {
            run_id: "sig".into(),
        };
        let claim = h.claim("req-cancel", &request).await;
        h.apply_and_crash(&claim).await;
        let out = h.rt.outcome("sig").await.unwrap().expect("ended");
        assert_eq!(out.status, crate::TerminalStatus::Cancelled);
        assert_eq!(
            h.apply_again(&claim).await,
            ReplyBody::Cancelled {
                run_id: "sig".into(),
                cancelled: true
            }
        );
    }

    /// A re-run request applied again after a crash between the re-run and
    /// its reply (the re-run ended since) does not start a second re-run.
    #[tokio::test]
    async fn a_rerun_applied_again_after_a_crash_is_not_rerun_twice() {
        let h = Harness::new().await;
        h.rt.submit(RunSpec {
            run_id: Some("r".into()),
            ..Default::default()
        })
        .await
        .unwrap();
        h.rt.wait("r").await.unwrap();
        let request = Request::Rerun {
            run_id: "r".into(),
            from_step: 0,
        };
        let claim = h.claim("req-rerun", &request).await;
        h.apply_and_crash(&claim).await;
        let out = h.rt.wait("r").await.unwrap();
        assert_eq!(out.reruns, 1);
        assert_eq!(
            h.apply_again(&claim).await,
            ReplyBody::Rerun {
                run_id: "r".into(),
                rerun: 1
            }
        );
        let out = h.rt.outcome("r").await.unwrap().expect("still ended");
        assert_eq!(out.reruns, 1, "no second re-run");
    }

    /// A reset request applied again after a crash between the reset and
    /// its reply (the breaker opened again since) does not close it again.
    #[tokio::test]
    async fn a_reset_applied_again_after_a_crash_does_not_close_the_breaker_again() {
        let h = Harness::new().await;
        let wf = GUARDED;
        let fail = async |id: &str| {
            h.rt.submit(RunSpec {
                run_id: Some(id.into()),
                workflow: Some(wf.into()),
                ..Default::default()
            })
            .await
            .unwrap();
            h.rt.wait(id).await.unwrap();
        };
        fail("a").await;
        let open = async || {
            let health = h.rt.workflow_health(wf).await.unwrap().unwrap();
            matches!(health.status, BreakerStatus::Backoff { .. })
        };
        assert!(open().await, "one failure opens the breaker");
        let request = Request::Reset {
            workflow: wf.into(),
        };
        let claim = h.claim("req-reset", &request).await;
        h.apply_and_crash(&claim).await;
        assert!(!open().await, "the reset closed it");
        fail("b").await;
        assert!(open().await, "a new failure opens it again");
        assert_eq!(
            h.apply_again(&claim).await,
            ReplyBody::Reset {
                workflow: wf.into(),
                was_open: true
            }
        );
        assert!(open().await, "the request did not close it a second time");
    }

    /// Each refusal of a schedule request reaches the client as the error
    /// the runtime returned, through the stored reply.
    #[test]
    fn schedule_refusals_reach_the_client_typed() {
        let errors = [
            Error::ScheduleNotFound("s".into()),
            Error::WorkflowTripped {
                schedule: "s".into(),
                workflow: "w".into(),
            },
            Error::ScheduleOverlap {
                schedule: "s".into(),
                run_id: "s:1".into(),
            },
            Error::ShuttingDown,
        ];
        for error in errors {
            let before = error.to_string();
            let body = schedule_refusal(error).unwrap();
            let record = ReplyRecord {
                at_ms: 1,
                reply: body,
            };
            let bytes = encode(b"k", &record).unwrap();
            let stored: ReplyRecord = decode(b"k", &bytes).unwrap();
            let after = stored.reply.into_result("req").unwrap_err();
            assert_eq!(after.to_string(), before);
            assert!(!matches!(after, Error::RequestRefused { .. }), "{after:?}");
        }
        assert!(matches!(
            schedule_refusal(Error::ScheduleConflict("s".into())),
            Err(Error::ScheduleConflict(_))
        ));
    }
}
