//! The terminal hook: how the world hears that a run ended.
//!
//! A termination commits, in the same transaction, a notification job on the
//! hook queue (`{queue_name}-hooks`). The worker pool delivers it by calling
//! [`TerminalHook::on_termination`]: at least once per run, once per run
//! when nothing crashes, and never for a termination that did not commit.

use std::any::TypeId;
use std::collections::HashMap;
use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::runner::StepError;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TerminalStatus {
    /// A step returned [`StepOutcome::Succeed`](crate::StepOutcome::Succeed).
    Succeeded,
    /// A step returned [`StepOutcome::Fail`](crate::StepOutcome::Fail), failed
    /// permanently, or ran out of attempts.
    Failed,
    /// The run was cancelled, by [`WorkflowRuntime::cancel`](crate::WorkflowRuntime::cancel)
    /// or by a step's [`StepOutcome::Cancel`](crate::StepOutcome::Cancel).
    Cancelled,
    /// The run's deadline ([`RunSpec::deadline`](crate::RunSpec::deadline))
    /// passed before it ended.
    TimedOut,
}

/// The terminal record of a run, as the hook and
/// [`WorkflowRuntime::outcome`](crate::WorkflowRuntime::outcome) see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOutcome {
    /// The run.
    pub run_id: String,
    /// The workflow the run belongs to.
    pub workflow: String,
    /// How it ended.
    pub status: TerminalStatus,
    /// The result of a succeeded run.
    #[serde(with = "serde_bytes")]
    pub result: Option<Vec<u8>>,
    /// Why a run failed, the reason a step gave for cancelling it (`None`
    /// for an external cancel), or the deadline a timed-out run passed.
    pub error: Option<String>,
    /// The submitter's headers (without reserved keys).
    pub headers: HashMap<String, String>,
    /// The step the run ended at.
    pub final_step: u32,
    /// How many times the run was re-run from a step before this ending
    /// (0: it ended in its first segment). See
    /// [`WorkflowRuntime::rerun`](crate::WorkflowRuntime::rerun).
    #[serde(default)]
    pub reruns: u32,
}

/// A child run's ending as its parent sees it (see
/// [`StepOutcome::SpawnChildren`](crate::StepOutcome::SpawnChildren)): a
/// child that ended `Cancelled` or `TimedOut` is `Failed` here, its error
/// `cancelled:{reason}` or `timed_out:{deadline ms}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildOutcome {
    /// The child run.
    pub run_id: String,
    /// `Succeeded` or `Failed`.
    pub status: TerminalStatus,
    /// The result of a succeeded child.
    #[serde(with = "serde_bytes")]
    pub result: Option<Vec<u8>>,
    /// Why a child failed (with the prefixes above).
    pub error: Option<String>,
    /// The step the child ended at.
    pub final_step: u32,
}

impl ChildOutcome {
    /// How a parent sees `outcome`; `deadline` is the child's (ms).
    pub(crate) fn of(outcome: &RunOutcome, deadline: Option<u64>) -> Self {
        let (status, error) = match outcome.status {
            TerminalStatus::Cancelled => (
                TerminalStatus::Failed,
                Some(format!(
                    "cancelled:{}",
                    outcome.error.as_deref().unwrap_or_default()
                )),
            ),
            TerminalStatus::TimedOut => (
                TerminalStatus::Failed,
                Some(format!("timed_out:{}", deadline.unwrap_or_default())),
            ),
            status => (status, outcome.error.clone()),
        };
        Self {
            run_id: outcome.run_id.clone(),
            status,
            result: outcome.result.clone(),
            error,
            final_step: outcome.final_step,
        }
    }
}

/// Called once a run has terminated (at least once; see the module docs).
///
/// Return [`StepError::transient`] to have the notification retried with
/// backoff, [`StepError::permanent`] to give up (the notification job is
/// dead-lettered, where an operator can inspect or requeue it).
pub trait TerminalHook: Send + Sync + 'static {
    /// React to the end of a run. Should be idempotent: a crash after the
    /// hook ran but before its delivery was acknowledged delivers it again.
    fn on_termination(
        &self,
        outcome: &RunOutcome,
    ) -> impl Future<Output = Result<(), StepError>> + Send;
}

/// A hook that does nothing. A runtime built with it enqueues no
/// notification jobs at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopTerminalHook;

impl TerminalHook for NoopTerminalHook {
    async fn on_termination(&self, _outcome: &RunOutcome) -> Result<(), StepError> {
        Ok(())
    }
}

/// Whether `H` needs notification jobs (everything but [`NoopTerminalHook`]).
pub(crate) fn hook_enabled<H: TerminalHook>() -> bool {
    TypeId::of::<H>() != TypeId::of::<NoopTerminalHook>()
}

/// The hook queue that goes with a step queue.
pub(crate) fn hook_queue_name(step_queue: &str) -> String {
    format!("{step_queue}-hooks")
}
