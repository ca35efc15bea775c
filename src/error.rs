//! The runtime's error type.

/// Everything a Waymark call can fail with.
///
/// Each variant names what went wrong and what to do about it. Input errors
/// (`InvalidRunId`, `ReservedHeaderInSubmit`, `PayloadTooLarge`, ...) are
/// raised before anything is written, so a rejected call leaves the store as
/// it was. [`Error::is_permanent`] tells a caller whether retrying the same
/// call can succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A run id (or another name with the same form) is empty, longer than
    /// 128 bytes, or has a byte outside `[A-Za-z0-9._:-]`. Choose an id of
    /// that form, or leave `RunSpec::run_id` empty to get a generated ULID.
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidRunId {
        /// Which kind of name was rejected ("run id", "workflow name", ...).
        what: &'static str,
        /// The rejected value (truncated to 160 characters).
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },

    /// A submitted header starts with the reserved prefix `workflow.`. Those
    /// keys are set by the runtime; rename the header.
    #[error(
        "header `{0}` uses the reserved prefix `workflow.`; rename it (the runtime sets those keys)"
    )]
    ReservedHeaderInSubmit(String),

    /// A run with this id already exists (running, or terminated within the
    /// retention window) with a different input. Submit with another run id,
    /// or with the original input to attach to the existing run.
    #[error(
        "run `{0}` already exists with a different input; use another run id or the original input"
    )]
    InputMismatch(String),

    /// A step spawned a child whose run id names a run that exists already
    /// (submitted by hand, or a child of an earlier run with the parent's
    /// id, live or ended within its retention window). The parent fails;
    /// spawning would overwrite that run. Give the child another
    /// `ChildSpec::id_suffix`.
    #[error(
        "child run id `{0}` is taken by another run (live, or ended within the retention window); give the child another id_suffix"
    )]
    ChildIdTaken(String),

    /// A payload, result or header set is larger than the runtime accepts.
    #[error(
        "{what} is {size} bytes, over the limit of {max} bytes; store large data elsewhere and pass a reference"
    )]
    PayloadTooLarge {
        /// What was too large ("input", "headers", ...).
        what: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        max: usize,
    },

    /// A builder setting is invalid (zero concurrency, a bad queue name...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// No run with this id is known (never submitted, or its terminal record
    /// has passed the retention window).
    #[error("no run `{0}` is known (never submitted, or its outcome passed the retention window)")]
    RunNotFound(String),

    /// No dead-lettered job has this id (never dead, already requeued, or
    /// removed by the queue's retention). `Client::dead_jobs` lists them.
    #[error(
        "no dead job `{0}` (never dead-lettered, already requeued, or past the queue's retention)"
    )]
    JobNotFound(String),

    /// The queue or its store failed. Transient store failures
    /// ([`Error::is_permanent`] is false) can be retried.
    #[error("queue error: {0}")]
    Queue(#[from] taquba::Error),

    /// A durable record could not be encoded or decoded. The record is
    /// corrupt or was written by something other than Waymark.
    #[error("record `{key}` does not decode: {reason}")]
    CorruptRecord {
        /// The KV key (or job id) of the record.
        key: String,
        /// What the decoder reported.
        reason: String,
    },

    /// A durable record carries a format version this build does not know.
    /// It was written by a newer Waymark: upgrade this process.
    #[error(
        "record `{key}` has format version {found}, this build reads version {supported}; upgrade Waymark"
    )]
    UnsupportedRecordVersion {
        /// The KV key (or job id) of the record.
        key: String,
        /// The version found.
        found: u8,
        /// The version this build reads and writes.
        supported: u8,
    },

    /// The worker pool's claim loop stopped because the store failed or
    /// closed (for example, another process opened the same store and fenced
    /// this one).
    #[error("worker pool stopped: {0}")]
    WorkerStopped(String),

    /// A commit has waited longer than the runtime's `store_timeout` for the
    /// object store (which is unreachable, refusing writes, or gone), so the
    /// worker pool stopped rather than hang. Nothing committed is lost: fix
    /// the store (endpoint, credentials, bucket) and start the pool again.
    #[error(
        "the object store has not confirmed a commit ({what}) for {waited:?} (store_timeout); check the store's availability and credentials, then restart the worker"
    )]
    StoreUnavailable {
        /// How long the oldest commit had waited.
        waited: std::time::Duration,
        /// What waited: a run's commit (`run <id>`) or a background call by
        /// name (`maintenance`, `release <workflow>`, ...).
        what: String,
    },

    /// The location holds no Waymark store: nothing was written there, or
    /// what is there was not written by Waymark. Check the URL (and the
    /// prefix in it); a worker opening an empty location creates the store.
    #[error("no Waymark store at {location}: {reason}")]
    NotAWaymarkStore {
        /// The store's URL or path.
        location: String,
        /// What was found instead.
        reason: String,
    },

    /// The store was written by a Waymark whose store format this build does
    /// not read. Run the same Waymark version as the store's worker.
    #[error(
        "the Waymark store at {location} has store format {found}, this build reads format {supported}; run a matching Waymark version"
    )]
    IncompatibleStore {
        /// The store's URL or path.
        location: String,
        /// The format found in the store's marker.
        found: u32,
        /// The format this build reads and writes.
        supported: u32,
    },

    /// The worker refused a client's request (it does not decode, or its
    /// inbox entry was rejected, or applying it failed permanently). The
    /// reason says which; the request had no effect.
    #[error("request `{request_id}` was refused: {reason}")]
    RequestRefused {
        /// The request.
        request_id: String,
        /// Why.
        reason: String,
    },

    /// A client's wait ended at the caller's timeout before its answer was
    /// visible. The request or run is not affected: wait again, or check
    /// that a worker runs on the store.
    #[error("gave up waiting for {what} after {waited:?}; is a worker running on the store?")]
    TimedOut {
        /// What was awaited.
        what: String,
        /// How long the caller waited.
        waited: std::time::Duration,
    },

    /// No schedule with this id is defined on this runtime's builder. Check
    /// the id against [`WorkflowRuntime::schedules`](crate::WorkflowRuntime::schedules).
    #[error(
        "no schedule `{0}` is defined on this runtime; add it with WorkflowRuntimeBuilder::schedule"
    )]
    ScheduleNotFound(String),

    /// A manual trigger was refused because the schedule's workflow is
    /// tripped. Fix the cause, then call `reset_workflow`.
    #[error(
        "schedule `{schedule}` not triggered: workflow `{workflow}` is tripped; fix it and call reset_workflow first"
    )]
    WorkflowTripped {
        /// The schedule.
        schedule: String,
        /// Its workflow.
        workflow: String,
    },

    /// A manual trigger was refused because the schedule's last run is still
    /// live and its overlap policy is `Skip`. Wait for the run (or cancel it).
    #[error(
        "schedule `{schedule}` not triggered: its run `{run_id}` is still live and its overlap policy is Skip"
    )]
    ScheduleOverlap {
        /// The schedule.
        schedule: String,
        /// The live run.
        run_id: String,
    },

    /// The worker pool is shutting down and accepts no manual trigger.
    #[error("the runtime is shutting down; trigger on a running runtime")]
    ShuttingDown,

    /// Another process changed the schedule's record during the call.
    /// Call again.
    #[error("schedule `{0}` was changed by another process during the call; call again")]
    ScheduleConflict(String),

    /// A manual trigger's run id (`{schedule}:t{ms}`) was taken by a run
    /// submitted under that id. Nothing was fired. Trigger again (the next
    /// millisecond's id is another).
    #[error(
        "schedule `{schedule}`: the trigger's run id `{run_id}` is taken by another run; nothing was fired: trigger again"
    )]
    TriggerRunIdTaken {
        /// The schedule.
        schedule: String,
        /// The run id the trigger would have used.
        run_id: String,
    },

    /// A signal was sent to a run that is not waiting for one: unknown to
    /// the wait (its step has not committed a `WaitForSignal` yet, or the
    /// wait already ended by an earlier signal, its timeout or a cancel), or
    /// the run has ended. Signals are never buffered: start the work that
    /// leads to a signal from the step that waits (stage it with
    /// `Step::effects`), so no signal can come before its wait.
    #[error(
        "run `{0}` is not waiting for a signal (not yet, no longer, or it has ended); signals are not buffered"
    )]
    NotWaiting(String),

    /// A step staged a KV key or an enqueue to a queue that Waymark
    /// reserves. Use a key outside `wm/` and a queue outside the runtime's.
    #[error("the {what} `{name}` is reserved ({reserved}); use another")]
    ReservedName {
        /// What was refused ("KV key", "queue").
        what: &'static str,
        /// The name (cut to 160 characters).
        name: String,
        /// Which names are reserved.
        reserved: String,
    },

    /// A step staged both a put and a delete of one KV key: which one
    /// commits would be a guess. Stage one of them.
    #[error("KV key `{0}` is staged for both a put and a delete; stage one of them")]
    ConflictingEffect(String),

    /// A step staged an effect after `run_step` returned (from a task that
    /// outlived it): its settlement was already built. Stage effects before
    /// returning.
    #[error("the step has returned; stage effects before run_step returns")]
    EffectsClosed,
    /// A re-run was refused because the run is still live. Wait for it to
    /// end (or cancel it), then re-run it.
    #[error("run `{0}` is still live; only a run that ended Failed or Cancelled can be re-run")]
    RunLive(String),

    /// A re-run was refused because the run succeeded. Submit a new run.
    #[error("run `{0}` succeeded; only a run that ended Failed or Cancelled can be re-run")]
    RunSucceeded(String),

    /// A re-run was refused because the run never reached the step.
    #[error(
        "run `{run_id}` never reached step {step} (it ended at step {final_step}); re-run from a step at or before it"
    )]
    StepNotReached {
        /// The run.
        run_id: String,
        /// The step asked for.
        step: u32,
        /// The step the run ended at.
        final_step: u32,
    },

    /// A re-run was refused because the step's input payload was not kept
    /// (the runtime was built with `keep_step_inputs(false)`, or the payload
    /// was over `MAX_KEPT_INPUT_BYTES`). Re-run from another step, or submit
    /// a new run.
    #[error(
        "step {step} of run `{run_id}` cannot be re-run: its input was not kept (keep_step_inputs off, or over MAX_KEPT_INPUT_BYTES)"
    )]
    StepInputNotKept {
        /// The run.
        run_id: String,
        /// The step asked for.
        step: u32,
    },

    /// A memo key is empty or longer than
    /// [`MAX_MEMO_KEY_LEN`](crate::memo::MAX_MEMO_KEY_LEN) bytes. Use a
    /// shorter key (a hash of a long one).
    #[error("invalid memo key `{key}`: {reason}")]
    InvalidMemoKey {
        /// The rejected key (truncated to 160 characters).
        key: String,
        /// The rule it breaks.
        reason: &'static str,
    },

    /// A memo write was refused because the step that made it is no longer
    /// the run's current step: its claim was lost (another attempt runs it)
    /// or the run ended. Nothing was written; whatever this attempt returns
    /// is discarded.
    #[error(
        "memo write refused: run `{run_id}` is no longer at step job `{job_id}` (the attempt lost its claim or the run ended)"
    )]
    MemoStale {
        /// The run.
        run_id: String,
        /// The step job of the attempt that tried to write.
        job_id: String,
    },

    /// The fleet at this location was created with another shard count. A
    /// fleet's shard count is fixed (every run's shard derives from it):
    /// start the worker with the fleet's count, or use another prefix.
    #[error(
        "the fleet at {location} has {found} shards, not {asked}; use --shards {found} (resharding is not supported)"
    )]
    FleetMismatch {
        /// The fleet's URL or path.
        location: String,
        /// The shard count in its manifest.
        found: u32,
        /// The shard count asked for.
        asked: u32,
    },

    /// An object store call of the fleet (its manifest, leases or probe)
    /// failed. Check the store's availability and credentials.
    #[error("the fleet at {location} could not {doing}: {reason}")]
    FleetStore {
        /// The fleet's URL or path.
        location: String,
        /// What was being done.
        doing: String,
        /// What the store reported.
        reason: String,
    },

    /// The store accepts conditional writes but does not enforce them, so
    /// two writers could interleave and lose acknowledged commits (SlateDB's
    /// fencing and the fleet's leases rely on them). Use a store that
    /// enforces `If-None-Match` / `If-Match` (AWS S3, MinIO, a local
    /// directory, ...).
    #[error(
        "the store at {location} does not enforce conditional writes ({what}); a fleet cannot run on it safely"
    )]
    ConditionalWritesIgnored {
        /// The store's URL or path.
        location: String,
        /// What the probe saw.
        what: String,
    },

    /// Another worker took this worker's lease of a shard: it must not
    /// write to the shard again.
    #[error("the lease of shard {shard} (epoch {epoch}) was taken by another worker")]
    LeaseLost {
        /// The shard.
        shard: u32,
        /// The epoch this worker last held.
        epoch: u64,
    },
}

impl Error {
    /// A copy of a re-run refusal (the errors `rerun` refuses with), to
    /// carry it to a client; `None` for every other error.
    pub(crate) fn clone_rerun(&self) -> Option<Error> {
        Some(match self {
            Error::RunNotFound(r) => Error::RunNotFound(r.clone()),
            Error::RunLive(r) => Error::RunLive(r.clone()),
            Error::RunSucceeded(r) => Error::RunSucceeded(r.clone()),
            Error::StepNotReached {
                run_id,
                step,
                final_step,
            } => Error::StepNotReached {
                run_id: run_id.clone(),
                step: *step,
                final_step: *final_step,
            },
            Error::StepInputNotKept { run_id, step } => Error::StepInputNotKept {
                run_id: run_id.clone(),
                step: *step,
            },
            _ => return None,
        })
    }

    /// Whether this is a durable record that does not decode: corrupt
    /// ([`Error::CorruptRecord`], or a queue job record the queue cannot
    /// decode) or written by a newer Waymark
    /// ([`Error::UnsupportedRecordVersion`]). Listings skip such a run and
    /// name it in [`RunPage::unreadable`](crate::RunPage::unreadable)
    /// instead of failing.
    pub fn is_unreadable_record(&self) -> bool {
        matches!(
            self,
            Error::CorruptRecord { .. }
                | Error::UnsupportedRecordVersion { .. }
                | Error::Queue(taquba::Error::Deserialization(_))
        )
    }

    /// Whether retrying the same call cannot succeed. Input, configuration
    /// and record errors are permanent; store failures are not.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Queue(e) => e.is_permanent(),
            Error::WorkerStopped(_)
            | Error::StoreUnavailable { .. }
            | Error::TimedOut { .. }
            | Error::WorkflowTripped { .. }
            | Error::ScheduleOverlap { .. }
            | Error::ScheduleConflict(_)
            | Error::TriggerRunIdTaken { .. } => false,
            _ => true,
        }
    }
}
