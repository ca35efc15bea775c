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
//! | cancel                   | `cancel`'s commits; then `ack_with` { reply }                  |
//! | signal                   | `signal`'s commit; then `ack_with` { reply }                   |
//! | trigger, pause, resume   | the reply, **in the change's own transaction**; then the job's ack |
//! | trigger, pause, resume refused, or no change | `ack_with` { reply: the typed refusal, or `changed: false` } |
//! | does not decode          | `dead_letter_with` { reply `Refused` with the reason }         |
//! | transient failure        | `nack_with` (retried; on the last attempt the reply `Refused`) |
//!
//! A job whose reply exists was applied before a crash and is only acked,
//! so a request is applied once even when the worker dies between its
//! effect and its ack.
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

use crate::control::{ControlKeys, ReplyBody, ReplyRecord, Request, RerunRefusal};
use crate::error::Error;
use crate::hook::TerminalHook;
use crate::record::{HEADER_RUN_ID, decode, encode};
use crate::runner::StepRunner;
use crate::runtime::{RunSpec, WorkflowRuntime};
use crate::store::control_queue_name;
use crate::sync::lock;

/// The control side of one `run`: its keys, the replies' expiry index and
/// the per-run order of requests.
struct Control {
    keys: ControlKeys,
    expiry: ExpiryIndex,
    /// The last request claimed for each run: it closes when it is done.
    last: Mutex<HashMap<String, watch::Receiver<bool>>>,
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
    let control = Arc::new(Control {
        expiry: ExpiryIndex::new(keys.expiry_prefix().to_vec()),
        keys,
        last: Mutex::new(HashMap::new()),
    });
    let claims = super::claim_loop(
        inner.queue.clone(),
        queue_name,
        inner.cfg.max_concurrent_steps,
        inner.cfg.poll_interval,
        inner.cfg.store_timeout,
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
                    |id| [control.keys.reply(id)],
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
    lease.keep(work).await;
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
        let now = inner.now_ms();
        let record = ReplyRecord {
            at_ms: now,
            reply: body,
        };
        Ok::<_, Error>(
            effects
                .kv_put(reply_key.clone(), encode(&reply_key, &record)?)
                .expiry_entry(&control.expiry, now, request_id.as_bytes()),
        )
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
                Ok(outcome) if outcome.newly_submitted => return Ok(queue.ack(claim).await?),
                Ok(outcome) => Ok(ReplyBody::Submitted {
                    run_id: outcome.run_id,
                    newly_submitted: false,
                }),
                Err(Error::InputMismatch(run_id)) => Ok(ReplyBody::InputMismatch { run_id }),
                Err(e) => Err(e),
            }
        }
        Request::Cancel { run_id } => rt
            .cancel(&run_id)
            .await
            .map(|cancelled| ReplyBody::Cancelled { run_id, cancelled }),
        // A crash between the signal's commit and the reply's re-applies
        // it, which then answers `NotWaiting` (as a cancel answers `false`).
        Request::Signal { run_id, payload } => match rt.signal(&run_id, payload).await {
            Ok(()) => Ok(ReplyBody::Signalled { run_id }),
            Err(Error::NotWaiting(run_id)) => Ok(ReplyBody::NotWaiting { run_id }),
            Err(Error::RunNotFound(run_id)) => Ok(ReplyBody::RunNotFound { run_id }),
            Err(e) => Err(e),
        },
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
                Ok((_, true)) => return Ok(queue.ack(claim).await?),
                Ok((run_id, false)) => Ok(body(&run_id)),
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
                Ok(true) => return Ok(queue.ack(claim).await?),
                Ok(false) => Ok(body(false)),
                Err(e) => schedule_refusal(e),
            }
        }
        // A crash between the reset's commit and the reply's re-applies it,
        // which then answers `false` (as a cancel does).
        Request::Reset { workflow } => rt
            .reset_workflow(&workflow)
            .await
            .map(|was_open| ReplyBody::Reset { workflow, was_open }),
        Request::Requeue { job_id } => requeue(rt, job_id).await,
        Request::Rerun { run_id, from_step } => match rt.rerun(&run_id, from_step).await {
            Ok(rerun) => Ok(ReplyBody::Rerun { run_id, rerun }),
            Err(e) => RerunRefusal::of(&e).map(ReplyBody::RerunRefused).ok_or(e),
        },
    };
    match applied {
        Ok(body) => {
            queue.ack_with(claim, reply(body)?).await?;
        }
        Err(e) if e.is_permanent() => {
            tracing::warn!(request_id, "refusing a client request: {e}");
            let body = ReplyBody::Refused {
                reason: e.to_string(),
            };
            queue.ack_with(claim, reply(body)?).await?;
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

/// Requeue dead job `job_id`: a hook notification goes back to pending
/// (taquba's `requeue_dead_job`); a step job's run is re-run from the
/// job's step (its run ended with it; a re-run is how a step runs again).
/// A step job is requeued once (its job stays dead, listed, but a second
/// requeue finds its run re-run since and answers `JobNotFound`). A crash
/// between the requeue and the reply re-applies it, which then answers
/// `JobNotFound`.
async fn requeue<R: StepRunner, H: TerminalHook>(
    rt: &WorkflowRuntime<R, H>,
    job_id: String,
) -> Result<ReplyBody, Error> {
    let queue = &rt.inner.queue;
    let job = match queue.view().job_record(&job_id).await? {
        Some(job) if job.status == taquba::JobStatus::Dead => job,
        _ => return Ok(ReplyBody::JobNotFound { job_id }),
    };
    if job.queue.as_str() == rt.inner.cfg.hook_queue {
        return match queue.requeue_dead_job(&job_id).await {
            Ok(()) => Ok(ReplyBody::RequeuedHook { job_id }),
            Err(taquba::Error::JobNotFound(_) | taquba::Error::InvalidState) => {
                Ok(ReplyBody::JobNotFound { job_id })
            }
            Err(e) => Err(e.into()),
        };
    }
    if job.queue.as_str() != rt.inner.cfg.queue_name {
        return Ok(ReplyBody::Refused {
            reason: format!(
                "job `{job_id}` is on queue `{}`, not this worker's step or hook queue",
                job.queue.as_str()
            ),
        });
    }
    let (run_id, step) = match crate::record::parse_step_headers(&job.headers) {
        Ok((run_id, step)) => (run_id.to_string(), step),
        Err(why) => {
            return Ok(ReplyBody::Refused {
                reason: format!("dead job `{job_id}` is not a run's step: {why}"),
            });
        }
    };
    // A dead step job is requeued once: after its run was re-run (by this
    // request or another) it is no longer the run's last ending.
    if let Some(ended) = rt.outcome(&run_id).await?
        && ended.reruns != crate::record::rerun_of(&job.headers)
    {
        return Ok(ReplyBody::JobNotFound { job_id });
    }
    match rt.rerun(&run_id, step).await {
        Ok(rerun) => Ok(ReplyBody::Rerun { run_id, rerun }),
        Err(e) => RerunRefusal::of(&e).map(ReplyBody::RerunRefused).ok_or(e),
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
