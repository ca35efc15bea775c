//! Client requests and the worker's replies: their durable form and keys.
//!
//! A [`Client`](crate::Client) sends a request as one taquba inbox entry
//! whose entry id is the request id: an `enqueue` of a job on the control
//! queue `{Q}-control` whose id is `{order}-{request_id}` ([`control_job_id`]:
//! `order` is a ULID of the send, so the queue, which orders the jobs of one
//! moment by id, claims them in send order whatever the request ids), whose
//! header `workflow.request_id` is the request id, whose header
//! `workflow.run_id` names the run (or, for a schedule request,
//! `schedule/{id}`), and whose payload is a [`Request`]. The worker claims
//! the job, applies it through its
//! runtime's `submit` / `cancel` / `signal` / `rerun` / `trigger` /
//! `pause_schedule` / `resume_schedule`, and writes a
//! [`ReplyRecord`] at `wm/Q/reply/{request_id}` (with an expiry entry at
//! `wm/Q/rexp/{t}{request_id}`), which the client reads.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::runtime::{Deadline, RunSpec, SubmitOutcome};

/// Longest request id, in bytes (taquba's inbox id limit).
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// The header carrying a control job's request id (its job id is
/// [`control_job_id`]). A control job without it (one a raw inbox sender
/// enqueued) is the request of its job id.
pub(crate) const HEADER_REQUEST_ID: &str = "workflow.request_id";

/// The id of the control job of request `request_id`, sent at `order` (a
/// ULID from [`new_send_order`]): `{order}-{request_id}`, at most 91 bytes of
/// `[A-Za-z0-9_-]` (taquba takes 128). The control queue orders the jobs
/// one inbox pass enqueues (one clock reading) by id, so this id has them
/// claimed in send order; the request id alone would order them by the
/// caller's ids.
pub(crate) fn control_job_id(order: &str, request_id: &str) -> String {
    format!("{order}-{request_id}")
}

/// The request id of a claimed control job: its `workflow.request_id`
/// header, or its job id when it has none.
pub(crate) fn request_id_of(claim: &taquba::Claim) -> &str {
    claim
        .headers
        .get(HEADER_REQUEST_ID)
        .map_or(claim.id.as_str(), String::as_str)
}

/// A client's request, as the payload of its control job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Submit a run (`WorkflowRuntime::submit`).
    Submit {
        /// Always set: the client generates an id when the spec has none.
        run_id: String,
        #[serde(with = "serde_bytes")]
        input: Vec<u8>,
        headers: HashMap<String, String>,
        priority: Option<u32>,
        max_attempts_per_step: Option<u32>,
        workflow: Option<String>,
        /// A `Deadline::After` counts from when the worker applies it.
        #[serde(default)]
        deadline: Option<Deadline>,
    },
    /// Cancel a run (`WorkflowRuntime::cancel`).
    Cancel { run_id: String },
    /// Signal a run waiting for one (`WorkflowRuntime::signal`).
    Signal {
        run_id: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Re-run an ended run from a step (`WorkflowRuntime::rerun`).
    Rerun { run_id: String, from_step: u32 },
    /// Fire a schedule now (`WorkflowRuntime::trigger`).
    Trigger { schedule: String },
    /// Pause a schedule (`WorkflowRuntime::pause_schedule`).
    Pause { schedule: String },
    /// Resume a schedule (`WorkflowRuntime::resume_schedule`).
    Resume { schedule: String },
    /// Reset a workflow's breaker (`WorkflowRuntime::reset_workflow`).
    Reset { workflow: String },
    /// Requeue a dead-lettered job: a hook notification is delivered
    /// again; a step job's run is re-run from that step.
    Requeue { job_id: String },
}

/// The ordering key (header `workflow.run_id`) of a request about workflow
/// `name`'s breaker (no run id has a `/`).
pub(crate) fn workflow_order_key(name: &str) -> String {
    format!("workflow/{name}")
}

/// The ordering key (header `workflow.run_id`) of a request about schedule
/// `id`: its requests apply in send order, apart from any run's (no run id
/// has a `/`).
pub(crate) fn schedule_order_key(id: &str) -> String {
    format!("schedule/{id}")
}

impl Request {
    /// The submit request of `spec`, whose run id is set.
    pub(crate) fn submit(run_id: String, spec: RunSpec) -> Self {
        Request::Submit {
            run_id,
            input: spec.input,
            headers: spec.headers,
            priority: spec.priority,
            max_attempts_per_step: spec.max_attempts_per_step,
            workflow: spec.workflow,
            deadline: spec.deadline,
        }
    }
}

/// The waiting job a signal request chose, noted before its signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SignalNote {
    pub job_id: String,
}

/// What the worker did with a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReplyRecord {
    /// When it was applied, ms since the Unix epoch (the worker's clock).
    pub at_ms: u64,
    pub reply: ReplyBody,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ReplyBody {
    /// The submit was applied: the run exists.
    Submitted {
        run_id: String,
        newly_submitted: bool,
    },
    /// The cancel was applied: whether it was accepted.
    Cancelled { run_id: String, cancelled: bool },
    /// The re-run was applied: its number.
    Rerun { run_id: String, rerun: u32 },
    /// The re-run was refused, for a reason with a typed error.
    RerunRefused(RerunRefusal),
    /// The run exists with another input (`Error::InputMismatch`).
    InputMismatch { run_id: String },
    /// The signal was delivered: the run's next step is due.
    Signalled { run_id: String },
    /// The run was not waiting for a signal (`Error::NotWaiting`).
    NotWaiting { run_id: String },
    /// No such run (`Error::RunNotFound`).
    RunNotFound { run_id: String },
    /// Refused, with the reason.
    Refused { reason: String },
    /// The trigger fired the schedule: the run it submitted.
    Triggered { schedule: String, run_id: String },
    /// The pause or resume was applied: whether it changed the schedule.
    Paused {
        schedule: String,
        paused: bool,
        changed: bool,
    },
    /// The schedule is not defined on the worker (`Error::ScheduleNotFound`).
    ScheduleNotFound { schedule: String },
    /// The schedule's workflow is tripped (`Error::WorkflowTripped`).
    WorkflowTripped { schedule: String, workflow: String },
    /// The schedule's last run is live under `Overlap::Skip`
    /// (`Error::ScheduleOverlap`).
    ScheduleOverlap { schedule: String, run_id: String },
    /// The worker pool was stopping (`Error::ShuttingDown`).
    ShuttingDown,
    /// The reset was applied: whether the breaker was open.
    Reset { workflow: String, was_open: bool },
    /// A dead hook notification is pending again.
    RequeuedHook { job_id: String },
    /// No dead job has this id (`Error::JobNotFound`).
    JobNotFound { job_id: String },
}

/// Why a re-run was refused: each is one of `Error`'s variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RerunRefusal {
    NotFound {
        run_id: String,
    },
    Live {
        run_id: String,
    },
    Succeeded {
        run_id: String,
    },
    NotReached {
        run_id: String,
        step: u32,
        final_step: u32,
    },
    InputNotKept {
        run_id: String,
        step: u32,
    },
}

impl RerunRefusal {
    /// The refusal of a re-run error, `None` for other errors.
    pub(crate) fn of(e: &Error) -> Option<Self> {
        Some(match e.clone_rerun()? {
            Error::RunNotFound(run_id) => Self::NotFound { run_id },
            Error::RunLive(run_id) => Self::Live { run_id },
            Error::RunSucceeded(run_id) => Self::Succeeded { run_id },
            Error::StepNotReached {
                run_id,
                step,
                final_step,
            } => Self::NotReached {
                run_id,
                step,
                final_step,
            },
            Error::StepInputNotKept { run_id, step } => Self::InputNotKept { run_id, step },
            _ => return None,
        })
    }

    fn into_error(self) -> Error {
        match self {
            Self::NotFound { run_id } => Error::RunNotFound(run_id),
            Self::Live { run_id } => Error::RunLive(run_id),
            Self::Succeeded { run_id } => Error::RunSucceeded(run_id),
            Self::NotReached {
                run_id,
                step,
                final_step,
            } => Error::StepNotReached {
                run_id,
                step,
                final_step,
            },
            Self::InputNotKept { run_id, step } => Error::StepInputNotKept { run_id, step },
        }
    }
}

/// The answer to a client's request, once the worker has applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// A submit: the run exists (`newly_submitted: false` when it existed
    /// already with the same input).
    Submitted(SubmitOutcome),
    /// A cancel: `cancelled` as [`WorkflowRuntime::cancel`](crate::WorkflowRuntime::cancel)
    /// returned it.
    Cancelled {
        /// The run.
        run_id: String,
        /// Whether the cancel was accepted (false: unknown, ended, or
        /// already cancelling).
        cancelled: bool,
    },
    /// A signal: it was delivered to the run's wait (a run that was not
    /// waiting is [`Error::NotWaiting`]).
    Signalled {
        /// The run.
        run_id: String,
    },
    /// A re-run: the run is live again, in re-run number `rerun` (see
    /// [`WorkflowRuntime::rerun`](crate::WorkflowRuntime::rerun)).
    Rerun {
        /// The run.
        run_id: String,
        /// The re-run's number (1 for the first).
        rerun: u32,
    },
    /// A trigger: the run the schedule's fire submitted, as
    /// [`WorkflowRuntime::trigger`](crate::WorkflowRuntime::trigger)
    /// returned it.
    Triggered {
        /// The schedule.
        schedule: String,
        /// The run it submitted (`{schedule}:t{ms}`).
        run_id: String,
    },
    /// A pause: whether the schedule was running, as
    /// [`WorkflowRuntime::pause_schedule`](crate::WorkflowRuntime::pause_schedule)
    /// returned it.
    Paused {
        /// The schedule.
        schedule: String,
        /// False when it was paused already.
        was_running: bool,
    },
    /// A resume: whether the schedule was paused, as
    /// [`WorkflowRuntime::resume_schedule`](crate::WorkflowRuntime::resume_schedule)
    /// returned it.
    Resumed {
        /// The schedule.
        schedule: String,
        /// False when it was running already.
        was_paused: bool,
    },
    /// A workflow's breaker reset: whether it was open, as
    /// [`WorkflowRuntime::reset_workflow`](crate::WorkflowRuntime::reset_workflow)
    /// returned it.
    Reset {
        /// The workflow.
        workflow: String,
        /// False when it was closed with no failure streak.
        was_open: bool,
    },
    /// A dead hook notification requeued: it is pending again (a dead step
    /// job's requeue is a re-run of its run from its step, answered by
    /// [`Reply::Rerun`]).
    Requeued {
        /// The job.
        job_id: String,
    },
}

impl ReplyBody {
    /// The client's view: a reply, or the refusal as a typed error.
    pub(crate) fn into_result(self, request_id: &str) -> Result<Reply, Error> {
        match self {
            ReplyBody::Submitted {
                run_id,
                newly_submitted,
            } => Ok(Reply::Submitted(SubmitOutcome {
                run_id,
                newly_submitted,
            })),
            ReplyBody::Cancelled { run_id, cancelled } => {
                Ok(Reply::Cancelled { run_id, cancelled })
            }
            ReplyBody::Rerun { run_id, rerun } => Ok(Reply::Rerun { run_id, rerun }),
            ReplyBody::RerunRefused(refusal) => Err(refusal.into_error()),
            ReplyBody::InputMismatch { run_id } => Err(Error::InputMismatch(run_id)),
            ReplyBody::Signalled { run_id } => Ok(Reply::Signalled { run_id }),
            ReplyBody::NotWaiting { run_id } => Err(Error::NotWaiting(run_id)),
            ReplyBody::RunNotFound { run_id } => Err(Error::RunNotFound(run_id)),
            ReplyBody::Refused { reason } => Err(Error::RequestRefused {
                request_id: request_id.to_string(),
                reason,
            }),
            ReplyBody::Triggered { schedule, run_id } => Ok(Reply::Triggered { schedule, run_id }),
            ReplyBody::Paused {
                schedule,
                paused: true,
                changed,
            } => Ok(Reply::Paused {
                schedule,
                was_running: changed,
            }),
            ReplyBody::Paused {
                schedule,
                paused: false,
                changed,
            } => Ok(Reply::Resumed {
                schedule,
                was_paused: changed,
            }),
            ReplyBody::ScheduleNotFound { schedule } => Err(Error::ScheduleNotFound(schedule)),
            ReplyBody::WorkflowTripped { schedule, workflow } => {
                Err(Error::WorkflowTripped { schedule, workflow })
            }
            ReplyBody::ScheduleOverlap { schedule, run_id } => {
                Err(Error::ScheduleOverlap { schedule, run_id })
            }
            ReplyBody::ShuttingDown => Err(Error::ShuttingDown),
            ReplyBody::Reset { workflow, was_open } => Ok(Reply::Reset { workflow, was_open }),
            ReplyBody::RequeuedHook { job_id } => Ok(Reply::Requeued { job_id }),
            ReplyBody::JobNotFound { job_id } => Err(Error::JobNotFound(job_id)),
        }
    }
}

/// The keys of one runtime's replies.
#[derive(Debug, Clone)]
pub(crate) struct ControlKeys {
    reply: Vec<u8>,
    signalling: Vec<u8>,
    expiry: Vec<u8>,
}

impl ControlKeys {
    pub(crate) fn new(queue_name: &str) -> Self {
        Self {
            reply: format!("wm/{queue_name}/reply/").into_bytes(),
            signalling: format!("wm/{queue_name}/rsig/").into_bytes(),
            expiry: format!("wm/{queue_name}/rexp/").into_bytes(),
        }
    }

    /// The reply record of `request_id`.
    pub(crate) fn reply(&self, request_id: &str) -> Vec<u8> {
        let mut key = self.reply.clone();
        key.extend_from_slice(request_id.as_bytes());
        key
    }

    /// The job a signal request `request_id` signals, committed before its
    /// signal (a [`SignalNote`]), so the request applied again after a crash
    /// signals that job or none (see `WorkflowRuntime::signal_once`). Kept,
    /// as the reply, for the runtime's `terminal_retention`.
    pub(crate) fn signalling(&self, request_id: &str) -> Vec<u8> {
        let mut key = self.signalling.clone();
        key.extend_from_slice(request_id.as_bytes());
        key
    }

    /// The prefix of the replies' expiry index.
    pub(crate) fn expiry_prefix(&self) -> &[u8] {
        &self.expiry
    }

    /// The replies' expiry index.
    pub(crate) fn expiry(&self) -> taquba::ExpiryIndex {
        taquba::ExpiryIndex::new(self.expiry.clone())
    }

    /// `effects` with the reply of `request_id`, applied at `now_ms`, and
    /// its entry in `expiry` (the replies' expiry index).
    pub(crate) fn reply_onto(
        &self,
        effects: taquba::SettlementEffects,
        expiry: &taquba::ExpiryIndex,
        request_id: &str,
        reply: ReplyBody,
        now_ms: u64,
    ) -> Result<taquba::SettlementEffects, Error> {
        let key = self.reply(request_id);
        let record = ReplyRecord {
            at_ms: now_ms,
            reply,
        };
        let value = crate::record::encode(&key, &record)?;
        Ok(effects
            .kv_put(key, value)
            .expiry_entry(expiry, now_ms, request_id.as_bytes()))
    }

    /// The reply `Signalled` of request `request_id`, whose signal a job of
    /// run `run_id` took, with its expiry entry; `None` when a reply of
    /// that request is stored already.
    pub(crate) async fn signalled(
        &self,
        view: &taquba::QueueView,
        request_id: &str,
        run_id: &str,
        now_ms: u64,
    ) -> Result<Option<taquba::SettlementEffects>, Error> {
        if view.kv_get(&self.reply(request_id)).await?.is_some() {
            return Ok(None);
        }
        let reply = ReplyBody::Signalled {
            run_id: run_id.to_string(),
        };
        let effects = taquba::SettlementEffects::default();
        self.reply_onto(effects, &self.expiry(), request_id, reply, now_ms)
            .map(Some)
    }
}

/// Check a request id: 1–64 bytes of `[A-Za-z0-9_-]`.
pub fn validate_request_id(id: &str) -> Result<(), Error> {
    let reason = if id.is_empty() {
        Some("it is empty")
    } else if id.len() > MAX_REQUEST_ID_LEN {
        Some("it is longer than 64 bytes")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        Some("only ASCII letters, digits, `_` and `-` are allowed")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidRunId {
            what: "request id",
            value: id.chars().take(160).collect(),
            reason,
        }),
    }
}

/// The request ids and send orders of this process, increasing with call
/// order.
static REQUEST_IDS: std::sync::Mutex<ulid::Generator> =
    std::sync::Mutex::new(ulid::Generator::new());

/// A fresh request id: a ULID, greater than every earlier one of this
/// process.
pub(crate) fn new_request_id() -> String {
    new_ulid()
}

/// The order of a send, the prefix of its control job's id
/// ([`control_job_id`]): a ULID greater than every earlier one of this
/// process, so one process's requests, each send awaited before the next,
/// are claimed in the order they were sent.
pub(crate) fn new_send_order() -> String {
    new_ulid()
}

fn new_ulid() -> String {
    let mut ids = crate::sync::lock(&REQUEST_IDS);
    match ids.generate() {
        Ok(id) => id,
        Err(overflow) => overflow.commit_overflow_increment(),
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{decode, encode};

    #[test]
    fn requests_round_trip_and_ids_are_checked() {
        let req = Request::submit(
            "r1".into(),
            RunSpec {
                input: b"x".to_vec(),
                deadline: Some(crate::runtime::Deadline::After(
                    std::time::Duration::from_secs(90),
                )),
                ..Default::default()
            },
        );
        let bytes = encode(b"k", &req).unwrap();
        assert_eq!(decode::<Request>(b"k", &bytes).unwrap(), req);
        assert!(decode::<Request>(b"k", b"garbage").is_err());
        assert!(validate_request_id(&new_request_id()).is_ok());
        let ids: Vec<String> = (0..1000).map(|_| new_request_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase");
        for bad in ["", "a.b", "a/b", &"x".repeat(65)] {
            assert!(validate_request_id(bad).is_err(), "{bad}");
        }
    }
}
