//! The runner contract: what a step is, what a step returns, how it fails.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::effects::StagedEffects;
use crate::error::Error;
use crate::hook::ChildOutcome;
use crate::memo::Memo;
use crate::runtime::Deadline;

/// One step of a run, handed to [`StepRunner::run_step`].
#[derive(Debug, Clone)]
pub struct Step {
    /// The run this step belongs to.
    pub run_id: String,
    /// The workflow the run belongs to.
    pub workflow: String,
    /// 0 for the first step, then 1, 2, ...
    pub step_number: u32,
    /// The run's input for step 0; afterwards the payload the previous step
    /// returned in [`StepOutcome::Continue`], [`StepOutcome::ContinueAfter`]
    /// or [`StepOutcome::WaitForSignal`].
    pub payload: Vec<u8>,
    /// The headers given at submit (never the reserved `workflow.*` keys).
    pub headers: HashMap<String, String>,
    /// The queue job carrying this step.
    pub job_id: String,
    /// Which attempt this is, starting at 1. A process crash during a step
    /// also spends an attempt.
    pub attempts: u32,
    /// The most attempts this step gets before the run fails.
    pub max_attempts: u32,
    /// Fired when the run is cancelled while this step runs. A runner that
    /// watches it can stop early; whatever it returns afterwards is discarded
    /// and the run ends `Cancelled`, except its own
    /// [`StepOutcome::Cancel`], which wins with its reason and its staged
    /// effects.
    pub cancel_token: CancellationToken,
    /// The durable memo of this step of this run: what an earlier attempt
    /// memoized here is found by the next (see [`Memo`]).
    pub memo: Memo,
    /// The durable memo of the run, shared by all its steps.
    pub run_memo: Memo,
    /// For the step after a [`StepOutcome::WaitForSignal`]: the payload of
    /// the signal that ended the wait, or `None` when its timeout passed
    /// first. `None` for every other step. It stays with the step across
    /// its retries.
    pub signal: Option<Vec<u8>>,
    /// For the step after a [`StepOutcome::SpawnChildren`]: every child's
    /// outcome, in spawn order (see [`ChildOutcome`]). Empty for every other
    /// step.
    pub children: Vec<ChildOutcome>,
    /// The application KV writes and enqueues this step stages.
    pub(crate) effects: StagedEffects,
}

impl Step {
    /// Stage application KV puts and deletes and enqueues to other queues,
    /// committed in the settlement of the outcome this step returns, and
    /// discarded on a [`StepError`] or an external cancel, unless the step
    /// answers that cancel with its own `Cancel` (see [`StagedEffects`]).
    pub fn effects(&self) -> &StagedEffects {
        &self.effects
    }
}

/// What a step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// Run the next step now, with this payload.
    Continue {
        /// The next step's payload.
        payload: Vec<u8>,
    },
    /// Run the next step after `delay` (measured on the queue's clock).
    ContinueAfter {
        /// The next step's payload.
        payload: Vec<u8>,
        /// How long to wait before the next step.
        delay: Duration,
    },
    /// Wait for a signal ([`WorkflowRuntime::signal`](crate::WorkflowRuntime::signal),
    /// [`Client::signal`](crate::Client::signal), `waymark signal`), then run
    /// the next step with this payload and [`Step::signal`] set to the
    /// signal's payload; when `timeout` (on the queue's clock) passes first,
    /// the next step runs with [`Step::signal`] `None`. The wait is a
    /// scheduled job: it holds no worker slot, spends no attempt and
    /// survives restarts; a cancel ends it and the run. A signal sent before
    /// this step's settlement commits is refused ([`Error::NotWaiting`](crate::Error::NotWaiting)),
    /// so stage the request that leads to the signal in this settlement
    /// ([`Step::effects`]).
    WaitForSignal {
        /// The next step's payload.
        payload: Vec<u8>,
        /// How long to wait for the signal.
        timeout: Duration,
    },
    /// Start these child runs, and run the next step with `payload` once
    /// every child has ended: it sees their outcomes in spawn order in
    /// [`Step::children`]. The children's first steps and records commit
    /// in this step's settlement; meanwhile the next step waits durably,
    /// holding no worker slot and spending no attempt. Each child's ending
    /// is recorded into this run once, in the child's terminal transaction.
    /// With `fail_fast`, the first child that fails ends this run `Failed`
    /// (its next step does not run) and cancels the others. Cancelling this
    /// run (or its deadline) cancels its live children, durably.
    SpawnChildren {
        /// The children, in spawn order (at most
        /// [`MAX_CHILDREN`](crate::MAX_CHILDREN)).
        children: Vec<ChildSpec>,
        /// The next step's payload.
        payload: Vec<u8>,
        /// End this run at the first failed child.
        fail_fast: bool,
    },
    /// End this segment of the run and start a fresh one of the same run
    /// (same run id) at step 0 with `input`: the step counter, attempt
    /// counts and the run's data (memo entries, kept step inputs, joined
    /// children's outcomes) start empty, so an endless loop stays bounded.
    /// Nothing ends: no outcome, no hook; `status`, `outcome` and `wait`
    /// see the live segment, and a parent waiting on this run as a child
    /// gets the ending of its last segment. Its headers, workflow, deadline,
    /// parent link and attempts per step carry over.
    ContinueAsNew {
        /// The new segment's step 0 payload.
        input: Vec<u8>,
    },
    /// The run succeeded with this result.
    Succeed {
        /// The run's result, kept in its terminal record.
        result: Vec<u8>,
    },
    /// The run failed for this reason (a business failure: not retried).
    Fail {
        /// Why the run failed.
        reason: String,
    },
    /// The run cancels itself for this reason.
    Cancel {
        /// Why the run was cancelled.
        reason: String,
    },
}

/// One child run a step spawns ([`StepOutcome::SpawnChildren`]).
///
/// Construct with `ChildSpec { input, ..Default::default() }`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildSpec {
    /// The child's workflow (default `"default"`).
    pub workflow: Option<String>,
    /// The child's step 0 payload.
    pub input: Vec<u8>,
    /// The last part of the child's run id (default: its index in the
    /// spawn). The id is `{parent}.{step}.{suffix}`, with `s{k}` after the
    /// step in the run's segment `k` (after `k` continue-as-new) and `r{n}`
    /// in re-run `n` (`{parent}.{step}s{k}r{n}.{suffix}`), so the same step
    /// never starts a second set. An id that names a run already (one
    /// submitted by hand under that id, or a child of an earlier run with
    /// the parent's id, within its retention) fails the parent with
    /// [`Error::ChildIdTaken`](crate::Error::ChildIdTaken): nothing is
    /// spawned, and that run is left alone.
    pub id_suffix: Option<String>,
    /// The child's headers (no `workflow.` keys).
    pub headers: HashMap<String, String>,
    /// The child's own deadline.
    pub deadline: Option<Deadline>,
}

/// Whether a [`StepError`] is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepErrorKind {
    /// Retry the step (until its attempts run out).
    Transient,
    /// Do not retry: the step's job is dead-lettered and the run fails.
    Permanent,
}

/// A step (or hook) that could not do its work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?} step error: {message}")]
pub struct StepError {
    /// What went wrong.
    pub message: String,
    /// Whether to retry.
    pub kind: StepErrorKind,
}

impl StepError {
    /// An error worth retrying (a timeout, a 503...).
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: StepErrorKind::Transient,
        }
    }

    /// An error no retry can fix (bad input, a 400...).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: StepErrorKind::Permanent,
        }
    }

    /// Whether this error is [`StepErrorKind::Permanent`].
    pub fn is_permanent(&self) -> bool {
        self.kind == StepErrorKind::Permanent
    }
}

impl From<Error> for StepError {
    /// A runtime error met by a step (a memo read or write): permanent when
    /// [`Error::is_permanent`] says retrying cannot help, transient
    /// otherwise.
    fn from(e: Error) -> Self {
        if e.is_permanent() {
            Self::permanent(e.to_string())
        } else {
            Self::transient(e.to_string())
        }
    }
}

/// The user's code: runs one step and says what comes next.
///
/// A step may run more than once (a crash before its result commits, a
/// transient error), so it should be idempotent or tolerate repeats. Its
/// result is committed atomically with the step's settlement, so a step that
/// committed never runs again.
pub trait StepRunner: Send + Sync + 'static {
    /// Run `step` and return what the run does next.
    fn run_step(&self, step: &Step) -> impl Future<Output = Result<StepOutcome, StepError>> + Send;
}

/// A runner for the crate's unit tests whose every step succeeds at once.
#[cfg(test)]
pub(crate) struct Done;

#[cfg(test)]
impl StepRunner for Done {
    async fn run_step(&self, _step: &Step) -> Result<StepOutcome, StepError> {
        Ok(StepOutcome::Succeed { result: vec![] })
    }
}
