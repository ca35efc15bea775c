//! The runtime: its builder, and the calls a service makes on it (submit,
//! status, outcome, wait, cancel). The worker pool is in [`crate::worker`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use taquba::{
    CancelOutcome, EnqueueOptions, EnqueueRequest, EnqueueResult, ExpiryIndex, JobRecord,
    JobStatus, Queue, QueueName, SettlementEffects, SignalOutcome,
};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::breaker::{BreakerEvent, Breakers, Observer, TallyGuard, WorkflowHealth};
use crate::error::Error;
use crate::history::RunHistory;
use crate::hook::{RunOutcome, TerminalHook, TerminalStatus, hook_enabled, hook_queue_name};
use crate::pending::PendingCommits;
use crate::policy::{BackoffPolicy, RetryPolicy};
use crate::read::{self, RunFilter, RunPage};
use crate::record::{
    self, DEFAULT_WORKFLOW, HEADER_RUN_ID, HEADER_STEP, HEADER_WORKFLOW, Keys, MAX_PAYLOAD_BYTES,
    MAX_SIGNAL_BYTES, OutcomeRecord, RunRecord, SentSignal, SubmitRecord, decode, encode,
    user_headers, validate_headers, validate_name,
};
use crate::runner::StepRunner;
use crate::schedule::{Schedule, Schedules};
use crate::sync::lock;

/// What to run: the input of a new run and how its steps are queued.
///
/// Construct with `RunSpec { input, ..Default::default() }`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSpec {
    /// The run's id. `None` generates a ULID. A caller id makes submit
    /// idempotent: the same id with the same input is the same run.
    pub run_id: Option<String>,
    /// Step 0's payload.
    pub input: Vec<u8>,
    /// Metadata handed to every step and to the terminal hook. Keys may not
    /// start with `workflow.`.
    pub headers: HashMap<String, String>,
    /// Queue priority of every step (lower runs first); `None` uses the
    /// queue's default.
    ///
    /// Beside a large backlog a better priority is not free: each step that
    /// sorts ahead of the backlog sends taquba's next claim back over the
    /// deleted entries of every job claimed before it that the store still
    /// holds. Measured (BENCHMARKS.md, issue 11): two such runs beside 100k
    /// pending runs cut the pool from ~5,750 to ~1,000 steps/s. Runs that
    /// must overtake a backlog do better on a runtime of their own, with
    /// another [`WorkflowRuntimeBuilder::queue_name`] on the same store:
    /// each queue keeps its own claim position, and there the backlog held
    /// its rate (1.00x of the rate at 1k pending).
    pub priority: Option<u32>,
    /// Attempts each step gets; `None` uses the workflow's
    /// [`RetryPolicy::max_attempts`].
    pub max_attempts_per_step: Option<u32>,
    /// The workflow the run belongs to (default `"default"`): its retry
    /// policy, breaker and health. Same form as run ids.
    pub workflow: Option<String>,
    /// When the run gives up: a run not ended by then ends
    /// [`TerminalStatus::TimedOut`] (a waiting step is removed, a running
    /// step's `cancel_token` fires and its result is discarded). `None`: no
    /// deadline. A re-run has none.
    pub deadline: Option<Deadline>,
}

/// A run's deadline ([`RunSpec::deadline`]), kept durably from submit: an
/// index entry the worker pool's maintenance pass reads (so it is checked
/// every `poll_interval`, across restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Deadline {
    /// This long after the submit (on the queue's clock).
    After(Duration),
    /// At this instant on the queue's clock.
    At(SystemTime),
}

impl Deadline {
    /// The deadline in ms since the Unix epoch, for a submit at `now_ms`.
    pub(crate) fn at_ms(&self, now_ms: u64) -> u64 {
        match self {
            Deadline::After(d) => now_ms.saturating_add(crate::policy::saturating_ms(*d)),
            Deadline::At(t) => t
                .duration_since(UNIX_EPOCH)
                .map(crate::policy::saturating_ms)
                .unwrap_or(0),
        }
    }
}

impl RunSpec {
    /// Everything [`WorkflowRuntime::submit`] checks before it writes: the
    /// run id, headers, workflow name, input size and attempts.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if let Some(id) = &self.run_id {
            validate_name("run id", id)?;
        }
        validate_headers(&self.headers)?;
        if let Some(workflow) = &self.workflow {
            validate_name("workflow name", workflow)?;
        }
        if self.input.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::PayloadTooLarge {
                what: "input",
                size: self.input.len(),
                max: MAX_PAYLOAD_BYTES,
            });
        }
        if self.max_attempts_per_step == Some(0) {
            return Err(Error::InvalidConfig(
                "max_attempts_per_step must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// What [`WorkflowRuntime::submit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitOutcome {
    /// The run's id (generated when the spec had none).
    pub run_id: String,
    /// `false` when a run with this id and input already existed.
    pub newly_submitted: bool,
}

use crate::read::RunStatus;

/// Settings fixed at build.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub queue_name: String,
    pub hook_queue: String,
    pub max_concurrent_steps: usize,
    pub poll_interval: Duration,
    pub terminal_retention: Duration,
    pub store_timeout: Duration,
    pub hook_max_attempts: u32,
    pub retry: HashMap<String, RetryPolicy>,
    pub default_retry: RetryPolicy,
    pub keep_step_inputs: bool,
    pub history_entries: u32,
}

impl Config {
    /// The retry policy of `workflow`.
    pub(crate) fn retry_policy(&self, workflow: &str) -> &RetryPolicy {
        self.retry.get(workflow).unwrap_or(&self.default_retry)
    }
}

/// Configures a [`WorkflowRuntime`]; from [`WorkflowRuntime::builder`].
pub struct WorkflowRuntimeBuilder<R, H> {
    queue: Arc<Queue>,
    runner: R,
    hook: H,
    queue_name: String,
    max_concurrent_steps: usize,
    poll_interval: Duration,
    terminal_retention: Duration,
    store_timeout: Duration,
    hook_max_attempts: u32,
    retry: HashMap<String, RetryPolicy>,
    default_retry: RetryPolicy,
    breakers: HashMap<String, BackoffPolicy>,
    observer: Option<Observer>,
    schedules: Vec<Schedule>,
    keep_step_inputs: bool,
    retention_backpressure: bool,
    #[cfg(feature = "testkit")]
    probe: Option<Arc<dyn crate::probe::Probe>>,
    history_entries: u32,
}

impl<R: StepRunner, H: TerminalHook> WorkflowRuntimeBuilder<R, H> {
    /// The queue the step jobs go on (default `"workflow-steps"`). Runtimes
    /// sharing one [`Queue`] need distinct names. Hook notifications go on
    /// `"{name}-hooks"`.
    pub fn queue_name(mut self, name: impl Into<String>) -> Self {
        self.queue_name = name.into();
        self
    }

    /// How many steps run at once (default 16).
    pub fn max_concurrent_steps(mut self, n: usize) -> Self {
        self.max_concurrent_steps = n;
        self
    }

    /// The longest an idle worker waits before looking again for work that
    /// arrived without a wake-up, such as a delayed step falling due (default
    /// 250 ms, at least 1 ms). New work wakes workers at once.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// How long a terminated run's outcome (and its submit record, which
    /// keeps submit idempotent) is kept (default 7 days).
    ///
    /// Retention runs in the pool beside the steps. When it is behind by
    /// over a tenth of this retention (and over a minute), and more runs
    /// end than it deletes (the process short of CPU), the pool runs fewer
    /// steps at once: every 10 s while that goes on, half as many as it
    /// ran at most in those 10 s (at least one step); a quarter of
    /// `max_concurrent_steps` more every 10 s in which retention deletes a
    /// tenth more than end; all of them once it is back within half that
    /// bound.
    /// A backlog that retention is working off (a store reopened after a
    /// long stop, a shorter retention) slows nothing. The gauge
    /// `waymark_retention_lag_seconds` shows the lag;
    /// [`Self::retention_backpressure`] turns the slowing off.
    pub fn terminal_retention(mut self, d: Duration) -> Self {
        self.terminal_retention = d;
        self
    }

    /// How long a commit may wait for the object store before the worker
    /// pool gives up and [`run`](WorkflowRuntime::run) returns
    /// [`Error::StoreUnavailable`] (default 60 s). SlateDB retries a failing
    /// store without end; this bounds how long an outage goes unreported.
    pub fn store_timeout(mut self, d: Duration) -> Self {
        self.store_timeout = d;
        self
    }

    /// How many times a hook notification is delivered before it is
    /// dead-lettered when the hook keeps failing transiently (default 10).
    pub fn hook_max_attempts(mut self, n: u32) -> Self {
        self.hook_max_attempts = n;
        self
    }

    /// The retry policy of one workflow's steps (others use
    /// [`Self::default_retry_policy`]).
    pub fn retry_policy(mut self, workflow: impl Into<String>, policy: RetryPolicy) -> Self {
        self.retry.insert(workflow.into(), policy);
        self
    }

    /// The retry policy of every workflow without its own
    /// (default [`RetryPolicy::default`]).
    pub fn default_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.default_retry = policy;
        self
    }

    /// Give a workflow a circuit breaker (workflows without one never back
    /// off or trip, though their health is still tracked).
    pub fn breaker(mut self, workflow: impl Into<String>, policy: BackoffPolicy) -> Self {
        self.breakers.insert(workflow.into(), policy);
        self
    }

    /// Call `observer` once when a workflow's breaker trips and once when it
    /// closes (after the change has committed and its other effects are
    /// done; a panic in it is caught and logged). Default: none (the changes
    /// are still logged through `tracing`).
    pub fn on_breaker_change(
        mut self,
        observer: impl Fn(&BreakerEvent) + Send + Sync + 'static,
    ) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Add a durable schedule (see [`Schedule`]). A duplicate id, a zero
    /// interval or an invalid cron expression fails [`Self::build`].
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// Whether each step's input payload is kept while the run is retained,
    /// so a run that failed or was cancelled can be re-run from a step
    /// ([`WorkflowRuntime::rerun`]) (default `true`). Keeping it adds one KV
    /// put of the payload to each step's settlement (and to a submit): no
    /// commit, but the payload's bytes are written twice. Payloads over
    /// [`MAX_KEPT_INPUT_BYTES`](crate::MAX_KEPT_INPUT_BYTES) are never kept.
    pub fn keep_step_inputs(mut self, keep: bool) -> Self {
        self.keep_step_inputs = keep;
        self
    }

    /// Whether the pool runs fewer steps at once while retention falls
    /// behind (default `true`; see [`Self::terminal_retention`]). Turned
    /// off, a process short of CPU keeps its step rate and lets the
    /// outcomes past their retention, and the store, grow until it has
    /// CPU to spare.
    pub fn retention_backpressure(mut self, on: bool) -> Self {
        self.retention_backpressure = on;
        self
    }

    /// The test kit's probe (see [`crate::probe`]).
    #[cfg(feature = "testkit")]
    pub(crate) fn probe(mut self, probe: Arc<dyn crate::probe::Probe>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// How many entries each run's step history keeps (default
    /// [`DEFAULT_HISTORY_ENTRIES`](crate::DEFAULT_HISTORY_ENTRIES)); the
    /// oldest are dropped, and [`RunHistory::dropped`] counts them. 0 keeps
    /// no history. An entry is one more KV put in the settlement that
    /// commits anyway (no commit of its own, about 100 bytes plus the error,
    /// at most [`MAX_HISTORY_ERROR_BYTES`](crate::MAX_HISTORY_ERROR_BYTES)).
    pub fn step_history(mut self, entries: u32) -> Self {
        self.history_entries = entries;
        self
    }

    /// Check the settings and build the runtime.
    pub fn build(self) -> Result<WorkflowRuntime<R, H>, Error> {
        let invalid = |m: String| Err(Error::InvalidConfig(m));
        if self.max_concurrent_steps == 0 {
            return invalid("max_concurrent_steps must be at least 1".into());
        }
        // Times are kept in whole milliseconds: a shorter interval rounds
        // to zero, and a schedule waiting on a live run would re-arm at
        // the time it was armed at, again and again.
        if self.poll_interval < Duration::from_millis(1) {
            return invalid(format!(
                "poll_interval must be at least 1 ms, not {:?}",
                self.poll_interval
            ));
        }
        if self.store_timeout.is_zero() {
            return invalid("store_timeout must be above zero".into());
        }
        if self.terminal_retention.is_zero() {
            return invalid("terminal_retention must be above zero".into());
        }
        if self.hook_max_attempts == 0 {
            return invalid("hook_max_attempts must be at least 1".into());
        }
        self.default_retry.validate("(default)")?;
        for (workflow, policy) in &self.retry {
            validate_name("workflow name", workflow)?;
            policy.validate(workflow)?;
        }
        for (workflow, policy) in &self.breakers {
            validate_name("workflow name", workflow)?;
            policy.validate(workflow)?;
        }
        let hook_queue = hook_queue_name(&self.queue_name);
        for name in [&self.queue_name, &hook_queue] {
            if let Err(e) = QueueName::new(name.as_str()) {
                return invalid(format!(
                    "queue name `{}` is not usable ({e}); use 1-{} bytes of [A-Za-z0-9._-], leaving room for the `-hooks` suffix",
                    self.queue_name,
                    taquba::MAX_QUEUE_NAME_LEN - 6
                ));
            }
        }
        let schedules = Schedules::new(&self.queue_name, self.schedules)?;
        let keys = Keys::new(&self.queue_name);
        let breakers = Breakers::new(&self.queue_name, self.breakers, self.observer);
        let expiry = ExpiryIndex::new(keys.expiry_prefix().to_vec());
        let deadlines = ExpiryIndex::new(keys.deadline_prefix().to_vec());
        let app_keys = crate::pending::app_keys_of(&self.queue);
        Ok(WorkflowRuntime {
            inner: Arc::new(Inner {
                queue: self.queue,
                runner: self.runner,
                hook: self.hook,
                hooks_enabled: hook_enabled::<H>(),
                cfg: Config {
                    queue_name: self.queue_name,
                    hook_queue,
                    max_concurrent_steps: self.max_concurrent_steps,
                    poll_interval: self.poll_interval,
                    terminal_retention: self.terminal_retention,
                    store_timeout: self.store_timeout,
                    hook_max_attempts: self.hook_max_attempts,
                    retry: self.retry,
                    default_retry: self.default_retry,
                    keep_step_inputs: self.keep_step_inputs,
                    history_entries: self.history_entries,
                },
                breakers,
                schedules,
                keys,
                expiry,
                deadlines,
                joins: Default::default(),
                inflight: InFlightSteps::default(),
                lapsed: Default::default(),
                waiters: Waiters::default(),
                pending: PendingCommits::default(),
                app_keys,
                backpressure: crate::backpressure::Backpressure::new(
                    self.max_concurrent_steps,
                    self.terminal_retention,
                    self.retention_backpressure,
                ),
                endings: Default::default(),
                creating: Default::default(),
                #[cfg(feature = "testkit")]
                probe: self.probe,
            }),
        })
    }
}

/// The durable workflow runtime. Cheap to clone: clones share one state.
///
/// ```no_run
/// use std::sync::Arc;
/// use waymark::{NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner, WorkflowRuntime};
///
/// struct Greeter;
/// impl StepRunner for Greeter {
///     async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
///         Ok(match step.step_number {
///             0 => StepOutcome::Continue { payload: b"hello".to_vec() },
///             _ => StepOutcome::Succeed { result: step.payload.clone() },
///         })
///     }
/// }
///
/// # async fn demo() -> Result<(), waymark::Error> {
/// let store = Arc::new(taquba::object_store::memory::InMemory::new());
/// let queue = Arc::new(taquba::Queue::open(store, "demo").await?);
/// let rt = WorkflowRuntime::builder(queue, Greeter, NoopTerminalHook).build()?;
/// let worker = tokio::spawn({
///     let rt = rt.clone();
///     async move { rt.run(std::future::pending()).await }
/// });
/// let run = rt.submit(RunSpec { input: b"hi".to_vec(), ..Default::default() }).await?;
/// let outcome = rt.wait(&run.run_id).await?;
/// assert_eq!(outcome.result.as_deref(), Some(&b"hello"[..]));
/// # worker.abort();
/// # Ok(()) }
/// ```
pub struct WorkflowRuntime<R, H> {
    pub(crate) inner: Arc<Inner<R, H>>,
}

impl<R, H> Clone for WorkflowRuntime<R, H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// The state every clone of a runtime shares.
pub(crate) struct Inner<R, H> {
    pub queue: Arc<Queue>,
    pub runner: R,
    pub hook: H,
    pub hooks_enabled: bool,
    pub cfg: Config,
    pub keys: Keys,
    pub breakers: Breakers,
    pub schedules: Schedules,
    pub expiry: ExpiryIndex,
    /// The deadline index (entries at each run's deadline).
    pub deadlines: ExpiryIndex,
    /// The join locks (see [`crate::children`]).
    pub joins: crate::children::JoinLocks,
    /// Steps this process is running, per claim.
    pub inflight: InFlightSteps,
    /// Step claims let go of without a settlement, which the reconcile
    /// reads (see [`crate::lapsed`]).
    pub lapsed: crate::lapsed::LapsedClaims,
    /// Callers of `wait`, by run id.
    pub waiters: Waiters,
    /// Commits in flight per run, which claims wait for (see `pending`).
    pub pending: PendingCommits,
    /// Commits in flight per application KV key, which
    /// [`StagedEffects::get`](crate::StagedEffects::get) waits for: shared
    /// by the runtimes on this store (see `pending`).
    pub app_keys: Arc<PendingCommits>,
    /// What retention's progress allows the step claims (see
    /// [`crate::backpressure`]).
    pub backpressure: crate::backpressure::Backpressure,
    /// One `end_run` at a time per run.
    pub endings: crate::sync::KeyedLocks,
    /// Run ids being created: every commit that creates a run holds its
    /// id's lock from its check that the id is free to its commit's return
    /// (see [`Inner::lock_new_runs`]).
    pub creating: crate::sync::KeyedLocks,
    /// The test kit's probe (see [`crate::probe`]).
    #[cfg(feature = "testkit")]
    pub probe: Option<Arc<dyn crate::probe::Probe>>,
}

/// The steps this process is running: per job id, one entry per claim. A
/// step that outlived its lease runs again under a second claim while the
/// first attempt still runs; each attempt registers and removes only its own
/// entry, and a cancel reaches all of them.
#[derive(Default)]
pub(crate) struct InFlightSteps {
    jobs: Mutex<HashMap<String, Vec<Arc<InFlight>>>>,
    /// Test hook: awaited once by a cancel between the queue's answer
    /// `Requested` and its look at the entries.
    #[cfg(test)]
    before_look: Mutex<Option<futures_util::future::BoxFuture<'static, ()>>>,
    /// Test hook: awaited once by a cancel between its read of the run and
    /// its request to the queue.
    #[cfg(test)]
    before_request: Mutex<Option<futures_util::future::BoxFuture<'static, ()>>>,
}

/// A step this process is running, as `cancel` and the worker share it.
pub(crate) struct InFlight {
    pub phase: Mutex<Phase>,
    /// The token the runner sees.
    pub token: CancellationToken,
    /// Set once the step's settlement has finished, with how it ended.
    pub settled: watch::Sender<Option<Settled>>,
}

/// How an in-flight step's settlement ended, as a waiting `cancel` reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// It committed; `cancelled` when it ended the run on a cancel request.
    Committed { cancelled: bool },
    /// Nothing committed (the claim was lost, the store failed, or the
    /// worker stopped): the step job is where it was.
    NotCommitted,
}

/// Where an in-flight step is. The worker moves it to `Settling` under the
/// lock after reading `cancel_requested` (and its claim's token), so a cancel
/// either lands before the worker decides (and the run ends `Cancelled`) or
/// waits for the settlement and acts on what it committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running { cancel_requested: bool },
    Settling,
}

/// One claim's entry in [`InFlightSteps`]; dropping it (on every exit path
/// of the step's task, a dropped task included) removes the entry and wakes
/// a waiting `cancel`.
pub(crate) struct Registered<'a> {
    steps: &'a InFlightSteps,
    job_id: &'a str,
    pub entry: Arc<InFlight>,
}

impl InFlightSteps {
    /// Register a claim of `job_id` as running.
    pub(crate) fn register<'a>(&'a self, job_id: &'a str) -> Registered<'a> {
        let entry = Arc::new(InFlight {
            phase: Mutex::new(Phase::Running {
                cancel_requested: false,
            }),
            token: CancellationToken::new(),
            settled: watch::Sender::new(None),
        });
        lock(&self.jobs)
            .entry(job_id.to_string())
            .or_default()
            .push(entry.clone());
        Registered {
            steps: self,
            job_id,
            entry,
        }
    }

    /// The entries of every claim of `job_id` this process runs.
    fn of(&self, job_id: &str) -> Vec<Arc<InFlight>> {
        lock(&self.jobs).get(job_id).cloned().unwrap_or_default()
    }

    /// Whether a cancel of `job_id` was accepted by a running claim.
    fn cancel_requested(&self, job_id: &str) -> bool {
        self.of(job_id).iter().any(|e| {
            matches!(
                *lock(&e.phase),
                Phase::Running {
                    cancel_requested: true
                }
            )
        })
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut jobs = lock(&self.steps.jobs);
        if let Some(entries) = jobs.get_mut(self.job_id) {
            entries.retain(|e| !Arc::ptr_eq(e, &self.entry));
            if entries.is_empty() {
                jobs.remove(self.job_id);
            }
        }
        drop(jobs);
        self.entry.settled.send_if_modified(|settled| {
            let unset = settled.is_none();
            if unset {
                *settled = Some(Settled::NotCommitted);
            }
            unset
        });
    }
}

/// The callers of `wait`, by run id.
#[derive(Default)]
pub(crate) struct Waiters {
    runs: Mutex<HashMap<String, HashMap<u64, oneshot::Sender<RunOutcome>>>>,
    next: AtomicU64,
}

/// One `wait` call's registration; dropping it (however the call ends)
/// removes it.
struct Waiter<'a> {
    waiters: &'a Waiters,
    run_id: String,
    id: u64,
}

impl Waiters {
    fn register(&self, run_id: &str) -> (Waiter<'_>, oneshot::Receiver<RunOutcome>) {
        let (tx, rx) = oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.runs)
            .entry(run_id.to_string())
            .or_default()
            .insert(id, tx);
        let waiter = Waiter {
            waiters: self,
            run_id: run_id.to_string(),
            id,
        };
        (waiter, rx)
    }

    /// Take the callers waiting on `run_id`.
    fn take(&self, run_id: &str) -> Vec<oneshot::Sender<RunOutcome>> {
        lock(&self.runs)
            .remove(run_id)
            .map(|w| w.into_values().collect())
            .unwrap_or_default()
    }

    /// How many runs have callers waiting.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.runs).len()
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut runs = lock(&self.waiters.runs);
        if let Some(waiting) = runs.get_mut(&self.run_id) {
            waiting.remove(&self.id);
            if waiting.is_empty() {
                runs.remove(&self.run_id);
            }
        }
    }
}

impl<R: StepRunner, H: TerminalHook> WorkflowRuntime<R, H> {
    /// Start configuring a runtime over `queue`, running steps with `runner`
    /// and reporting terminations to `hook`.
    pub fn builder(queue: Arc<Queue>, runner: R, hook: H) -> WorkflowRuntimeBuilder<R, H> {
        WorkflowRuntimeBuilder {
            queue,
            runner,
            hook,
            queue_name: "workflow-steps".to_string(),
            max_concurrent_steps: 16,
            poll_interval: Duration::from_millis(250),
            terminal_retention: Duration::from_secs(7 * 24 * 3600),
            store_timeout: Duration::from_secs(60),
            hook_max_attempts: 10,
            retry: HashMap::new(),
            default_retry: RetryPolicy::default(),
            breakers: HashMap::new(),
            observer: None,
            schedules: Vec::new(),
            keep_step_inputs: true,
            retention_backpressure: true,
            #[cfg(feature = "testkit")]
            probe: None,
            history_entries: crate::history::DEFAULT_HISTORY_ENTRIES,
        }
    }

    /// The queue this runtime works on.
    pub fn queue(&self) -> &Arc<Queue> {
        &self.inner.queue
    }

    /// Submit a run. Step 0 and the run's durable records commit in one
    /// transaction, so a submit that returned `Ok` survives any crash.
    ///
    /// Idempotent on `(run_id, input)`: the same pair again returns
    /// `newly_submitted: false` (while the run lives and for
    /// `terminal_retention` after it ends, across restarts); the same id with
    /// another input is [`Error::InputMismatch`].
    pub async fn submit(&self, spec: RunSpec) -> Result<SubmitOutcome, Error> {
        self.submit_with(spec, Ok).await
    }

    /// [`Self::submit`], with `extra` applied to the effects of the commit
    /// that creates the run (not called when the run exists already).
    pub(crate) async fn submit_with(
        &self,
        spec: RunSpec,
        extra: impl Fn(SettlementEffects) -> Result<SettlementEffects, Error>,
    ) -> Result<SubmitOutcome, Error> {
        let inner = &self.inner;
        let prepared = inner.prepare_submit(spec)?;
        let PreparedSubmit {
            run_id,
            sub_key,
            sha,
            ..
        } = &prepared;
        let (run_id, sha) = (run_id.clone(), *sha);
        loop {
            let effects = extra(inner.submit_effects(&prepared)?)?;
            let committed = {
                let _creating = inner.creating.lock(&run_id).await;
                let _pending = inner.pending.begin(&run_id);
                inner
                    .queue
                    .kv_compare_commit(&[(sub_key, None)], effects)
                    .await?
            };
            if let Some(results) = committed {
                if let Some(EnqueueResult::New(job_id)) = results.first() {
                    inner.pending.enqueued([job_id.as_str()]);
                }
                return Ok(SubmitOutcome {
                    run_id,
                    newly_submitted: true,
                });
            }
            // A run with this id exists: same input or not? (Its submit may
            // still wait for its flush: the answer waits with it.)
            let read = inner
                .durable(&run_id, async {
                    Ok(inner.queue.view().kv_get(sub_key).await?)
                })
                .await?;
            let Some(bytes) = read else {
                // It expired between the compare and this read: try again.
                continue;
            };
            let record: SubmitRecord = decode(sub_key, &bytes)?;
            if record.input_sha256 != sha {
                return Err(Error::InputMismatch(run_id));
            }
            return Ok(SubmitOutcome {
                run_id,
                newly_submitted: false,
            });
        }
    }

    /// The status of a live run, from durable state (right after a restart,
    /// and from a runtime that runs no worker). `None` for unknown and
    /// terminated runs (a run whose last attempt the queue gave up on has
    /// terminated); see [`Self::outcome`] for those.
    pub async fn status(&self, run_id: &str) -> Result<Option<RunStatus>, Error> {
        let inner = &self.inner;
        inner
            .durable(
                run_id,
                read::status(
                    inner.queue.view(),
                    &inner.keys,
                    &inner.breakers,
                    run_id,
                    |job_id| inner.inflight.cancel_requested(job_id),
                ),
            )
            .await
    }

    /// A page of runs, live and ended (within the retention window), in run
    /// id order, filtered by state and workflow. Each live run's state is
    /// [`Self::status`]'s.
    pub async fn runs(&self, filter: &RunFilter) -> Result<RunPage, Error> {
        let inner = &self.inner;
        let page = read::runs(
            inner.queue.view(),
            &inner.keys,
            &inner.breakers,
            filter,
            |job_id| inner.inflight.cancel_requested(job_id),
        )
        .await?;
        // Each answer waits for its run's commits in flight, as `status`.
        for run in &page.runs {
            inner.pending.settled(&run.run_id).await;
        }
        Ok(page)
    }

    /// Close `workflow`'s breaker, zero its failure streak and release its
    /// parked steps at once. Returns whether the breaker was open (in
    /// backoff or tripped). A workflow with nothing to reset (unknown, or
    /// closed with no streak) is not written. A health record that does not
    /// decode (corrupt, or a newer Waymark's) is replaced by a closed one,
    /// with an error logged: this is how an operator repairs it.
    pub async fn reset_workflow(&self, workflow: &str) -> Result<bool, Error> {
        Ok(self.reset_workflow_with(workflow, |e, _| Ok(e)).await?.0)
    }

    /// [`Self::reset_workflow`], with `extra` applied to the effects of the
    /// reset's commit (called with whether the breaker was open; not called
    /// when nothing is written). Returns whether it was open, and whether
    /// the reset committed (with `extra`).
    pub(crate) async fn reset_workflow_with(
        &self,
        workflow: &str,
        extra: impl FnOnce(SettlementEffects, bool) -> Result<SettlementEffects, Error>,
    ) -> Result<(bool, bool), Error> {
        validate_name("workflow name", workflow)?;
        let inner = &self.inner;
        inner.breakers.reset(&inner.queue, workflow, extra).await
    }

    /// One workflow's health, from durable state (right after a restart, and
    /// from a runtime that runs no worker). `None` for a workflow that has
    /// had no failed attempt and no ended run.
    pub async fn workflow_health(&self, workflow: &str) -> Result<Option<WorkflowHealth>, Error> {
        validate_name("workflow name", workflow)?;
        let inner = &self.inner;
        inner.breakers.health_of(inner.queue.view(), workflow).await
    }

    /// The health of every workflow that has had a failed attempt or an
    /// ended run, by name. A workflow whose health record this build cannot
    /// read is logged and left out.
    pub async fn workflows(&self) -> Result<Vec<WorkflowHealth>, Error> {
        let inner = &self.inner;
        inner.breakers.health_all(inner.queue.view()).await
    }

    /// The terminal record of a run that has ended, kept for
    /// `terminal_retention`. `None` while the run lives, and for unknown runs.
    ///
    /// A run whose current step the queue dead-lettered by itself (its
    /// process died during the last attempt) has ended `Failed`: that outcome
    /// is reported before a worker pool records it.
    pub async fn outcome(&self, run_id: &str) -> Result<Option<RunOutcome>, Error> {
        validate_name("run id", run_id)?;
        self.inner.outcome(run_id).await
    }

    /// A run's step history (of its current segment), from durable state:
    /// each step's settled attempts, oldest first, kept with the outcome for
    /// `terminal_retention`. `None` for an unknown run (or one whose outcome
    /// retention deleted). See [`Self::builder`]'s `step_history`.
    pub async fn history(&self, run_id: &str) -> Result<Option<RunHistory>, Error> {
        validate_name("run id", run_id)?;
        let inner = &self.inner;
        inner
            .durable(
                run_id,
                read::history(inner.queue.view(), &inner.keys, run_id),
            )
            .await
    }

    /// Wait until the run terminates and return its outcome (at once if it
    /// already has). The run must be worked by this process's pool
    /// ([`Self::run`]); [`Error::RunNotFound`] for an unknown run.
    pub async fn wait(&self, run_id: &str) -> Result<RunOutcome, Error> {
        validate_name("run id", run_id)?;
        let inner = &self.inner;
        // Unregistered on every way out, a dropped call included.
        let (_waiter, rx) = inner.waiters.register(run_id);
        if let Some(outcome) = inner.outcome(run_id).await? {
            return Ok(outcome);
        }
        if inner.read_run(run_id).await?.is_none() {
            // It may have terminated between the two reads.
            if let Some(outcome) = inner.outcome(run_id).await? {
                return Ok(outcome);
            }
            return Err(Error::RunNotFound(run_id.to_string()));
        }
        rx.await
            .map_err(|_| Error::WorkerStopped("the runtime was dropped while waiting".into()))
    }

    /// Cancel a run. `Ok(false)` for an unknown or terminated run, and for a
    /// run whose cancel was already accepted.
    ///
    /// A pending or scheduled step is removed and the run ends `Cancelled`
    /// before this returns. A running step's `cancel_token` fires and the
    /// request is stored durably on its job; the runner's outcome is then
    /// discarded and the run ends `Cancelled` when the step returns (or, after
    /// a crash, when the step is next claimed — it is not run again).
    pub async fn cancel(&self, run_id: &str) -> Result<bool, Error> {
        Ok(self.cancel_with(run_id, Ok).await?.0)
    }

    /// [`Self::cancel`], with `extra` applied to the effects of the commit
    /// that ends the run (a waiting or pending step removed; not called
    /// when the cancel is a request to a running step, or when nothing is
    /// cancelled). Returns whether the cancel was accepted, and whether the
    /// run ended by this call's commit (with `extra`).
    pub(crate) async fn cancel_with(
        &self,
        run_id: &str,
        extra: impl Fn(SettlementEffects) -> Result<SettlementEffects, Error>,
    ) -> Result<(bool, bool), Error> {
        validate_name("run id", run_id)?;
        self.inner.end_run(run_id, Ending::Cancel, extra).await
    }
}

impl<R: StepRunner, H: TerminalHook> WorkflowRuntime<R, H> {
    /// Send a signal to a run whose last step returned
    /// [`StepOutcome::WaitForSignal`](crate::StepOutcome::WaitForSignal): its
    /// next step becomes due at once and sees `payload` as
    /// [`Step::signal`](crate::Step::signal). The signal commits (durably)
    /// before this returns; the step then runs on a worker of the store.
    ///
    /// [`Error::NotWaiting`] when the run is not waiting for a signal: its
    /// wait has not committed yet, it already ended (a signal, its timeout,
    /// a cancel), or the run has ended. A signal is never kept for a later
    /// wait: a buffered signal could be taken by a wait it was not meant for
    /// (a later step's, or a re-run's), and would outlive its run unseen. So
    /// a caller whose signal answers work the run started should have the
    /// waiting step start that work: stage the request (an enqueue, a KV
    /// write) with [`Step::effects`](crate::Step::effects); it commits in the
    /// same transaction as the wait, so no answer can come before the wait
    /// exists. [`Error::RunNotFound`] for an unknown run;
    /// [`Error::PayloadTooLarge`] for a payload over [`MAX_SIGNAL_BYTES`].
    pub async fn signal(&self, run_id: &str, payload: Vec<u8>) -> Result<(), Error> {
        self.signal_once(run_id, payload, None, None, async |_| Ok(()))
            .await
    }

    /// [`Self::signal`] for client request `request` (`None`: a direct
    /// call), which a crash can have applied before. The signal names its
    /// sender on the waiting job's record (a `SentSignal`, for a wait with
    /// header `workflow.signal_sender`), in the signal's own commit. The
    /// first time (`earlier` is `None`), `note` is called with the waiting
    /// job's id once the run is found waiting, and must make it durable
    /// before it returns: the signal commits after it. Applied again,
    /// `earlier` is that job, and only it is signalled, never the run's
    /// later wait: `Ok` when its record holds this request's signal (the
    /// earlier application delivered it), the signal when it still waits
    /// (the earlier one stopped before its signal), else
    /// [`Error::NotWaiting`]. A job that took a request's signal leaves the
    /// queue only by commits that store the request's reply `Signalled`
    /// (its claim, see `worker::step`, and `end_run`), so a request whose
    /// job is gone and whose reply is not stored did not deliver it. (A
    /// wait from an earlier Waymark takes the bare payload: its record's
    /// signal counts as this request's if the payload is equal.)
    pub(crate) async fn signal_once(
        &self,
        run_id: &str,
        payload: Vec<u8>,
        request: Option<&str>,
        earlier: Option<String>,
        note: impl AsyncFnOnce(&str) -> Result<(), Error>,
    ) -> Result<(), Error> {
        validate_name("run id", run_id)?;
        if payload.len() > MAX_SIGNAL_BYTES {
            return Err(Error::PayloadTooLarge {
                what: "signal",
                size: payload.len(),
                max: MAX_SIGNAL_BYTES,
            });
        }
        let inner = &self.inner;
        let job = match earlier {
            Some(job_id) => {
                let job = inner
                    .durable(run_id, async {
                        Ok(inner.queue.view().job_record(&job_id).await?)
                    })
                    .await?;
                let Some(job) = job else {
                    return Err(Error::NotWaiting(run_id.to_string()));
                };
                match holds_signal(&job, request, &payload)? {
                    Some(true) => return Ok(()),
                    Some(false) => return Err(Error::NotWaiting(run_id.to_string())),
                    None => job,
                }
            }
            None => {
                let Some((_, job)) = inner.current_step(run_id).await? else {
                    return match inner.outcome(run_id).await? {
                        Some(_) => Err(Error::NotWaiting(run_id.to_string())),
                        None => Err(Error::RunNotFound(run_id.to_string())),
                    };
                };
                if !job.signal_wait {
                    return Err(Error::NotWaiting(run_id.to_string()));
                }
                note(&job.id).await?;
                job
            }
        };
        let signal = if job.headers.contains_key(record::HEADER_SIGNAL_SENDER) {
            let sent = SentSignal {
                sender: request.map(str::to_string),
                payload,
            };
            encode(job.id.as_bytes(), &sent)?
        } else {
            payload
        };
        // The signal makes the step claimable before its flush returns: it
        // is a commit in flight for the run, which admit waits for. It
        // takes its turn with the run's endings: a cancel that removes the
        // job reads the signal it took (and stores its request's reply)
        // before its commit, never in between.
        let outcome = {
            let _ending = inner.endings.lock(run_id).await;
            let _pending = inner.pending.begin(run_id);
            inner.queue.signal(&job.id, signal).await?
        };
        match outcome {
            SignalOutcome::Delivered => {
                tracing::info!(run_id, job_id = job.id, "signal delivered");
                Ok(())
            }
            // The wait ended (its timeout, a cancel) since the read.
            SignalOutcome::NotWaiting => Err(Error::NotWaiting(run_id.to_string())),
        }
    }

    /// Re-run a run that ended `Failed`, `Cancelled` or `TimedOut` (and whose outcome is
    /// still retained) from step `from_step`: a new segment of the same run
    /// starts at that step with the input payload it had, and the run is
    /// live again until it ends anew (its terminal hook fires again, its
    /// [`RunOutcome::reruns`] and [`RunStatus::reruns`] count the re-runs).
    /// Steps before `from_step` are not run again; memo entries of every
    /// step are kept, so memoized calls are not repeated. Returns the re-run's
    /// number (1 for the first). A step that followed a
    /// [`StepOutcome::WaitForSignal`](crate::StepOutcome::WaitForSignal)
    /// re-runs at once with its own payload and
    /// [`Step::signal`](crate::Step::signal) `None`, as after its wait's
    /// timeout: neither the wait nor the signal it got is kept.
    ///
    /// The new segment's steps get the workflow's retry policy's attempts
    /// and the queue's default priority (a submit's own settings are not
    /// kept). A step that joins children is handed their outcomes again
    /// (they are not spawned again: re-run from the step that spawned them
    /// for that); a run that ended while such a step waited for its
    /// children never ran it, and a re-run from it is refused as
    /// [`Error::StepNotReached`]. Refused, with nothing written, for an unknown run
    /// ([`Error::RunNotFound`]), a live one ([`Error::RunLive`]), a
    /// succeeded one ([`Error::RunSucceeded`]), a step the run never reached
    /// ([`Error::StepNotReached`]) and a step whose input was not kept
    /// ([`Error::StepInputNotKept`]).
    pub async fn rerun(&self, run_id: &str, from_step: u32) -> Result<u32, Error> {
        self.rerun_with(run_id, from_step, |e, _| Ok(e)).await
    }

    /// [`Self::rerun`], with `extra` applied to the effects of the commit
    /// that starts the re-run (called with its number).
    pub(crate) async fn rerun_with(
        &self,
        run_id: &str,
        from_step: u32,
        extra: impl Fn(SettlementEffects, u32) -> Result<SettlementEffects, Error>,
    ) -> Result<u32, Error> {
        validate_name("run id", run_id)?;
        let inner = &self.inner;
        let out_key = inner.keys.out(run_id);
        let input_key = inner.keys.input(run_id, from_step);
        let join_key = inner.keys.join_record(run_id, from_step);
        loop {
            let (ended, input, join, history) = inner
                .durable(run_id, async {
                    let view = inner.queue.view();
                    Ok((
                        view.kv_get(&out_key).await?,
                        view.kv_get(&input_key).await?,
                        view.kv_get(&join_key).await?,
                        crate::history::next_seq(view, &inner.keys, run_id).await?,
                    ))
                })
                .await?;
            let Some(ended) = ended else {
                return Err(match inner.read_run(run_id).await? {
                    Some(_) => Error::RunLive(run_id.to_string()),
                    None => Error::RunNotFound(run_id.to_string()),
                });
            };
            let record: OutcomeRecord = decode(&out_key, &ended)?;
            let retained_until = record
                .finished_at_ms
                .saturating_add(crate::policy::saturating_ms(inner.cfg.terminal_retention));
            if inner.now_ms() >= retained_until {
                // Due for retention: the pass may be deleting its data now.
                return Err(Error::RunNotFound(run_id.to_string()));
            }
            match record.status {
                TerminalStatus::Failed | TerminalStatus::Cancelled | TerminalStatus::TimedOut => {}
                _ => return Err(Error::RunSucceeded(run_id.to_string())),
            }
            if from_step > record.final_step {
                return Err(Error::StepNotReached {
                    run_id: run_id.to_string(),
                    step: from_step,
                    final_step: record.final_step,
                });
            }
            let Some(input) = input else {
                return Err(Error::StepInputNotKept {
                    run_id: run_id.to_string(),
                    step: from_step,
                });
            };
            let payload: serde_bytes::ByteBuf = decode(&input_key, &input)?;
            // A join step: its children spawned as the step before it
            // settled, with the payload it was handed (a join record left
            // by an earlier pass through the step, which did not spawn,
            // holds another).
            let join = match join {
                Some(bytes) => {
                    let join: record::JoinRecord = decode(&join_key, &bytes)?;
                    (join.payload == payload.as_slice()).then_some(join)
                }
                None => None,
            };
            if join.as_ref().is_some_and(|j| j.live() > 0 && !j.failed) {
                // The run ended while the step waited for its children: the
                // step never ran. Re-running the step before spawns them
                // again.
                return Err(Error::StepNotReached {
                    run_id: run_id.to_string(),
                    step: from_step,
                    final_step: from_step.saturating_sub(1),
                });
            }
            let rerun = record.reruns.saturating_add(1);
            let rerun_job = inner.rerun_effects(
                run_id,
                from_step,
                &record,
                RerunOf {
                    rerun,
                    history,
                    joins: join.is_some(),
                },
                payload,
            )?;
            let effects = extra(rerun_job, rerun)?;
            let committed = {
                let _pending = inner.pending.begin(run_id);
                inner
                    .queue
                    .kv_compare_commit(&[(&out_key, Some(&ended))], effects)
                    .await?
            };
            // Another call re-ran or the record expired meanwhile: look again.
            let Some(results) = committed else { continue };
            if let Some(EnqueueResult::New(job_id)) = results.first() {
                inner.pending.enqueued([job_id.as_str()]);
            }
            tracing::info!(run_id, from_step, rerun, "run re-run from a step");
            return Ok(rerun);
        }
    }
}

pub(crate) use crate::read::job_workflow;

/// What a re-run's first job carries besides its step and input.
struct RerunOf {
    /// The re-run's number.
    rerun: u32,
    /// The run's next history entry.
    history: u64,
    /// Whether the step joins children (their outcomes are read again).
    joins: bool,
}

/// Why [`WorkflowRuntime::end_run`] ends a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// A cancel request: the run ends `Cancelled`.
    Cancel,
    /// The deadline (ms, queue clock) passed: the run ends `TimedOut`.
    Deadline(u64),
}

/// The headers of step `step`'s job: the submitter's plus the reserved ones.
pub(crate) fn step_headers(
    user: &HashMap<String, String>,
    run_id: &str,
    step: u32,
) -> HashMap<String, String> {
    let mut headers = user.clone();
    headers.insert(HEADER_RUN_ID.to_string(), run_id.to_string());
    headers.insert(HEADER_STEP.to_string(), step.to_string());
    headers
}

/// A run's terminal effects and what must be held until they commit.
pub(crate) struct Terminal<'a> {
    pub effects: SettlementEffects,
    pub hold: TerminalHold<'a>,
}

/// Held from building a run's terminal effects until their commit has
/// returned: the run's tally, the join locks, the parent's pending commit.
pub(crate) struct TerminalHold<'a> {
    tally: Option<TallyGuard>,
    locks: Vec<tokio::sync::MutexGuard<'a, ()>>,
    pending: Option<crate::pending::PendingCommit<'a>>,
    /// A parent's placeholder the commit replaced.
    replaced: Option<crate::children::Replaced>,
}

impl TerminalHold<'_> {
    /// After the commit: release everything, then remove the parent's
    /// placeholder job (one left behind by a failure here or a crash is
    /// removed by the maintenance pass: its marker committed with the
    /// join).
    pub(crate) async fn done(self, queue: &Queue, committed: bool) {
        let Self {
            tally,
            locks,
            pending,
            replaced,
        } = self;
        drop(pending);
        drop(tally);
        drop(locks);
        if committed
            && let Some(replaced) = replaced
            && let Err(e) = replaced.remove(queue).await
        {
            tracing::warn!(
                job = replaced.job,
                "removing a joined parent's placeholder failed (the maintenance pass retries): {e}"
            );
        }
    }
}

/// A KV key and its value.
pub(crate) type KvEntry = (Vec<u8>, Vec<u8>);

/// A checked submit: what [`Inner::submit_effects`] turns into the effects
/// that create the run (by `submit`, and by a schedule's firing).
pub(crate) struct PreparedSubmit {
    pub run_id: String,
    pub sub_key: Vec<u8>,
    pub run_key: Vec<u8>,
    pub sha: [u8; 32],
    sub_value: Vec<u8>,
    headers: HashMap<String, String>,
    input: Vec<u8>,
    priority: Option<u32>,
    max_attempts: u32,
    deadline: Option<u64>,
}

impl PreparedSubmit {
    /// Link the run, as child `index`, to the parent waiting at `step`.
    pub(crate) fn link_parent(&mut self, parent: &str, step: u32, index: usize) {
        self.headers.insert(
            record::HEADER_PARENT.to_string(),
            format!("{parent}/{step}/{index}"),
        );
    }
}

impl<R, H> Inner<R, H> {
    /// End a live run on a cancel or at its deadline (see [`WorkflowRuntime::cancel`]):
    /// a waiting step is removed and the run ends in that transaction; a
    /// running one is asked to stop, and its settlement ends the run.
    /// `false` when the run is not live, its request was accepted before,
    /// or (for a deadline) the run's current step does not carry that
    /// deadline. `extra` is applied to the effects of the commit that ends
    /// the run here (a removed step); the second `bool` says it committed.
    pub(crate) async fn end_run(
        &self,
        run_id: &str,
        ending: Ending,
        extra: impl Fn(SettlementEffects) -> Result<SettlementEffects, Error>,
    ) -> Result<(bool, bool), Error> {
        let inner = self;
        // One ending of a run at a time in this process: a second cancel
        // would otherwise find the first's request stored but not yet
        // durable (taquba answers it without a commit) and answer from it,
        // and both would say they were the one accepted. Every request for
        // a run is applied by the process that owns its store.
        let _ending = inner.endings.lock(run_id).await;
        // This call's request was accepted by the queue (stored on a job
        // that had none): it stays ours across the retries below.
        let mut accepted = false;
        loop {
            let Some((run, job)) = inner.current_step(run_id).await? else {
                return Ok((false, false));
            };
            if job.status == JobStatus::Dead {
                // The queue gave up on the step: the run has ended `Failed`
                // (see `outcome`); the pool records it.
                return Ok((false, false));
            }
            let (status, error) = match ending {
                Ending::Cancel => (TerminalStatus::Cancelled, None),
                Ending::Deadline(at) if record::deadline_of(&job.headers) == Some(at) => {
                    (TerminalStatus::TimedOut, Some(record::timed_out_reason(at)))
                }
                // A stale entry: the run is another segment now.
                Ending::Deadline(_) => return Ok((false, false)),
            };
            let outcome = RunOutcome {
                run_id: run_id.to_string(),
                workflow: job_workflow(&job),
                status,
                result: None,
                error,
                headers: user_headers(&job.headers),
                final_step: run.step,
                reruns: record::rerun_of(&job.headers),
            };
            let Some(Terminal { effects, hold }) = inner
                .terminal_effects(&outcome, &job.headers, Some(&run.job_id))
                .await?
            else {
                // The run moved on since the read.
                continue;
            };
            // Its history's last entry, for a waiting step removed (a running
            // step's settlement writes its own).
            let effects = extra(crate::history::record_ending(
                effects,
                &inner.keys,
                inner.cfg.history_entries,
                &outcome,
                &job,
                inner.now_ms(),
            )?)?;
            // A signal the step took and never ran with: its request's reply
            // commits with the step's removal (see `signal_once`).
            let sender = match job.signal.as_deref() {
                Some(signal) => match SentSignal::of(&job.id, &job.headers, signal) {
                    Ok(sent) => sent.sender,
                    Err(e) => {
                        tracing::warn!(
                            run_id,
                            job_id = job.id,
                            "the signal a removed step took does not decode: {e}"
                        );
                        None
                    }
                },
                None => None,
            };
            let effects = match sender {
                Some(request) => match inner.signalled_reply(run_id, &request).await? {
                    Some(reply) => crate::effects::merge(effects, reply),
                    None => effects,
                },
                None => effects,
            };
            #[cfg(test)]
            {
                let hook = lock(&inner.inflight.before_request).take();
                if let Some(hook) = hook {
                    hook.await;
                }
            }
            let cancelled = {
                let _pending = inner.pending.begin(run_id);
                inner.queue.cancel_with(&run.job_id, effects).await
            };
            let removed = matches!(cancelled, Ok((CancelOutcome::Removed, _)));
            hold.done(&inner.queue, removed).await;
            let (cancelled, _) = cancelled?;
            match cancelled {
                CancelOutcome::Removed => {
                    inner.pending.take_own(&run.job_id);
                    tracing::info!(run_id, step = run.step, status = ?outcome.status, "run ended");
                    inner.notify_terminal(outcome);
                    return Ok((true, true));
                }
                // The step settled between our read and the cancel.
                CancelOutcome::NotFound => continue,
                CancelOutcome::Requested => {
                    accepted |= !job.cancel_requested;
                    #[cfg(test)]
                    {
                        let hook = lock(&inner.inflight.before_look).take();
                        if let Some(hook) = hook {
                            hook.await;
                        }
                    }
                    // Every claim of the job this process runs hears of it
                    // (a stale attempt's settlement fails; the live one's
                    // counts); the queue fired the live claim's token.
                    let mut settling = Vec::new();
                    let mut newly = false;
                    let mut running = false;
                    for entry in inner.inflight.of(&run.job_id) {
                        let mut phase = lock(&entry.phase);
                        match *phase {
                            Phase::Running {
                                cancel_requested: false,
                            } => {
                                *phase = Phase::Running {
                                    cancel_requested: true,
                                };
                                entry.token.cancel();
                                newly = true;
                                running = true;
                            }
                            Phase::Running { .. } => running = true,
                            Phase::Settling => settling.push(entry.settled.subscribe()),
                        }
                    }
                    if settling.is_empty() && running {
                        // The running attempt decides with the cancel.
                        if newly {
                            tracing::info!(run_id, step = run.step, "cancel requested");
                        }
                        return Ok((accepted || newly, false));
                    }
                    if settling.is_empty() {
                        // No entry: the claim is not registered yet (its
                        // worker checks the token the queue fired before it
                        // runs the step), its process died (its next claim
                        // starts with the token fired), or its worker
                        // decided before the cancel reached it and has
                        // settled since (the flag then lands on a finished
                        // job, and the run went on). Only a job still
                        // claimed carries the cancel; else read again.
                        let still = inner.current_step(run_id).await?;
                        if still.is_some_and(|(now, job)| {
                            now.job_id == run.job_id && job.status == JobStatus::Claimed
                        }) {
                            return Ok((accepted, false));
                        }
                        continue;
                    }
                    // A worker had decided already: see what it committed.
                    let mut cancelled_by_request = false;
                    for mut settled in settling {
                        if let Ok(done) = settled.wait_for(Option::is_some).await
                            && *done == Some(Settled::Committed { cancelled: true })
                        {
                            cancelled_by_request = true;
                        }
                    }
                    if cancelled_by_request {
                        return Ok((accepted || newly, false));
                    }
                }
            }
        }
    }

    /// The reply `Signalled` of client request `request`, whose signal a
    /// step job of run `run_id` took (`None` when its reply is stored): for
    /// the commits that take such a job off the queue (its claim's
    /// admission, its removal by `end_run`), after which the request can no
    /// longer read its delivery on the job's record (see `signal_once`).
    pub(crate) async fn signalled_reply(
        &self,
        run_id: &str,
        request: &str,
    ) -> Result<Option<SettlementEffects>, Error> {
        crate::control::ControlKeys::new(&self.cfg.queue_name)
            .signalled(self.queue.view(), request, run_id, self.now_ms())
            .await
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.queue.clock().now_ms()
    }

    /// Read state that answers a caller about `run_id`. taquba makes a
    /// commit visible before its WAL flush returns, so what `read` sees may
    /// rest on a commit of this process that a crash could still undo; every
    /// such commit holds an entry in `pending` from before it becomes
    /// visible, so waiting for the run's commits in flight after the read
    /// makes the answer durable. (A commit returns once durable: SlateDB
    /// retries a failing flush until it lands or the store closes.) Every
    /// read behind `submit`, `status`, `outcome`, `wait` and `cancel` goes
    /// through here; the step path does not (admit waits before it reads).
    pub(crate) async fn durable<T>(
        &self,
        run_id: &str,
        read: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let value = read.await?;
        self.pending.settled(run_id).await;
        Ok(value)
    }

    /// Check a run spec (nothing is written) and fix its run id.
    pub(crate) fn prepare_submit(&self, spec: RunSpec) -> Result<PreparedSubmit, Error> {
        spec.validate()?;
        let run_id = spec
            .run_id
            .unwrap_or_else(|| ulid::Ulid::generate().to_string());
        let workflow = spec
            .workflow
            .unwrap_or_else(|| DEFAULT_WORKFLOW.to_string());
        let max_attempts = spec
            .max_attempts_per_step
            .unwrap_or(self.cfg.retry_policy(&workflow).max_attempts);
        let mut headers = step_headers(&spec.headers, &run_id, 0);
        headers.insert(HEADER_WORKFLOW.to_string(), workflow);
        let deadline = spec.deadline.map(|d| d.at_ms(self.now_ms()));
        if let Some(at) = deadline {
            headers.insert(record::HEADER_DEADLINE.to_string(), at.to_string());
        }
        let sha: [u8; 32] = Sha256::digest(&spec.input).into();
        let sub_key = self.keys.sub(&run_id);
        let run_key = self.keys.run(&run_id);
        let submit = SubmitRecord {
            input_sha256: sha,
            submitted_at_ms: self.now_ms(),
            headers: spec.headers,
        };
        let sub_value = encode(&sub_key, &submit)?;
        Ok(PreparedSubmit {
            run_id,
            sub_key,
            run_key,
            sha,
            sub_value,
            headers,
            input: spec.input,
            priority: spec.priority,
            max_attempts,
            deadline,
        })
    }

    /// Lock run ids for a commit that creates those runs without comparing
    /// (a spawn's children, a schedule's fires), and name those a run
    /// holds already (in `ids`' order): their submit record exists, live or
    /// kept for `terminal_retention`. A commit that created them would
    /// overwrite that run's records, so its caller must leave them out.
    ///
    /// The guards are held until the creating commit has returned: every
    /// creation of a run (a submit too) holds its id's lock across its
    /// commit, so no other creation of these ids commits between this
    /// check and that commit. Ids are locked in order, so two callers never
    /// wait on each other in a cycle.
    pub(crate) async fn lock_new_runs<'a>(
        &'a self,
        ids: &[String],
    ) -> Result<(Vec<crate::sync::KeyedGuard<'a>>, Vec<String>), Error> {
        let mut sorted: Vec<&String> = ids.iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut guards = Vec::with_capacity(sorted.len());
        for id in sorted {
            guards.push(self.creating.lock(id).await);
        }
        let view = self.queue.view();
        let reads = ids.iter().map(|id| {
            let key = self.keys.sub(id);
            let view = &view;
            async move { view.kv_get(&key).await.map(|found| (id, found)) }
        });
        let found = futures_util::future::try_join_all(reads).await?;
        let taken = found
            .into_iter()
            .filter_map(|(id, found)| found.is_some().then(|| id.clone()))
            .collect();
        Ok((guards, taken))
    }

    /// The effects that create a prepared run: step 0's job (under a fresh
    /// job id) and the run's live and submit records. The first enqueue is
    /// step 0.
    pub(crate) fn submit_effects(&self, p: &PreparedSubmit) -> Result<SettlementEffects, Error> {
        let job_id = self.queue.next_job_id();
        let run = RunRecord {
            step: 0,
            job_id: job_id.clone(),
        };
        let options = EnqueueOptions::default()
            .id_override(job_id)
            .headers(p.headers.clone())
            .priority(p.priority)
            .max_attempts(p.max_attempts);
        let mut effects = SettlementEffects::default()
            .enqueue(EnqueueRequest {
                queue: self.cfg.queue_name.clone(),
                payload: p.input.clone(),
                options,
            })
            .kv_put(p.run_key.clone(), encode(&p.run_key, &run)?)
            .kv_put(p.sub_key.clone(), p.sub_value.clone())
            .kv_put(self.keys.data_extent(&p.run_id), record::EXTENT_NAMED);
        if let Some((key, value)) = self.kept_input(&p.run_id, 0, &p.input)? {
            effects = effects.kv_put(key, value);
        }
        if let Some(at) = p.deadline {
            effects = effects.expiry_entry(&self.deadlines, at, p.run_id.as_bytes());
        }
        Ok(effects)
    }

    /// The KV entry that keeps step `step`'s input payload for a re-run, if
    /// inputs are kept and this one is small enough.
    pub(crate) fn kept_input(
        &self,
        run_id: &str,
        step: u32,
        payload: &[u8],
    ) -> Result<Option<KvEntry>, Error> {
        if !self.cfg.keep_step_inputs || payload.len() > record::MAX_KEPT_INPUT_BYTES {
            return Ok(None);
        }
        let key = self.keys.input(run_id, step);
        let value = encode(&key, &serde_bytes::Bytes::new(payload))?;
        Ok(Some((key, value)))
    }

    /// The effects that start re-run `rerun` of an ended run at `step`: the
    /// step's job with its kept input, the live record; the terminal record
    /// and its retention entry go (the new ending writes new ones).
    fn rerun_effects(
        &self,
        run_id: &str,
        step: u32,
        ended: &OutcomeRecord,
        of: RerunOf,
        payload: serde_bytes::ByteBuf,
    ) -> Result<SettlementEffects, Error> {
        let RerunOf {
            rerun,
            history,
            joins,
        } = of;
        let job_id = self.queue.next_job_id();
        let mut headers = step_headers(&ended.headers, run_id, step);
        headers.insert(HEADER_WORKFLOW.to_string(), ended.workflow.clone());
        headers.insert(record::HEADER_RERUN.to_string(), rerun.to_string());
        if joins {
            // The step is handed its children's outcomes again.
            headers.insert(record::HEADER_JOIN.to_string(), "1".to_string());
        }
        // The re-run's entries follow the run's history.
        if history > 0 {
            headers.insert(
                crate::history::HEADER_HISTORY.to_string(),
                history.to_string(),
            );
        }
        let options = EnqueueOptions::default()
            .id_override(job_id.clone())
            .headers(headers)
            .max_attempts(self.cfg.retry_policy(&ended.workflow).max_attempts);
        let run_key = self.keys.run(run_id);
        let run = RunRecord { step, job_id };
        Ok(SettlementEffects::default()
            .enqueue(EnqueueRequest {
                queue: self.cfg.queue_name.clone(),
                payload: payload.into_vec(),
                options,
            })
            .kv_put(run_key.clone(), encode(&run_key, &run)?)
            // The run's inputs past the re-run's final step, if it ends
            // sooner, are named by no summary.
            .kv_put(self.keys.data_extent(run_id), record::EXTENT_SCAN)
            .kv_delete(self.keys.out(run_id))
            .kv_delete(
                self.expiry
                    .entry_key(ended.finished_at_ms, run_id.as_bytes()),
            ))
    }

    pub(crate) async fn read_run(&self, run_id: &str) -> Result<Option<RunRecord>, Error> {
        self.durable(
            run_id,
            read::read_run(self.queue.view(), &self.keys, run_id),
        )
        .await
    }

    /// The run's outcome: its terminal record, or, for a run whose current
    /// step the queue dead-lettered by itself, the outcome reconciling it
    /// will record (read only: the pool writes it).
    pub(crate) async fn outcome(&self, run_id: &str) -> Result<Option<RunOutcome>, Error> {
        self.durable(run_id, read::outcome(self.queue.view(), &self.keys, run_id))
            .await
    }

    /// The live run record and its current step's job, read consistently.
    pub(crate) async fn current_step(
        &self,
        run_id: &str,
    ) -> Result<Option<(RunRecord, JobRecord)>, Error> {
        self.durable(
            run_id,
            read::current_step(self.queue.view(), &self.keys, run_id),
        )
        .await
    }

    /// The effects that end a run: remove its live record, write its outcome
    /// and retention entry, its workflow tally, and queue its hook
    /// notification; drop its deadline entry (`headers`: its step job's);
    /// record it into its parent if it is a child (see [`crate::children`]);
    /// leave a cascade marker if it has live children. Takes the join locks
    /// of the run (at a join) and of its parent (for a child), and, with
    /// `current`, checks under them
    /// that the run is still at that job (`None` when it moved: read
    /// again). Hold the returned [`Terminal`] until the commit has
    /// returned, then call [`TerminalHold::done`].
    pub(crate) async fn terminal_effects(
        &self,
        outcome: &RunOutcome,
        headers: &HashMap<String, String>,
        current: Option<&str>,
    ) -> Result<Option<Terminal<'_>>, Error> {
        let run_id = &outcome.run_id;
        // A parent at its join (placeholder or join step) is locked against
        // its children's arrivals; a child locks its parent. A run that is
        // neither takes no lock.
        let mut runs = Vec::new();
        if headers.contains_key(record::HEADER_JOIN) {
            runs.push(run_id.as_str());
        }
        if let Some((parent, _, _)) = record::parent_of(headers) {
            runs.push(parent);
        }
        let joined = !runs.is_empty();
        let locks = self.joins.lock(&runs).await;
        // Only a run at a join, or a child, can be moved by another run's
        // commit (a child's arrival, a cascade) between the caller's read and
        // this lock: any other run is checked by the commit itself.
        if let Some(job_id) = current.filter(|_| joined) {
            let at = read::read_run(self.queue.view(), &self.keys, run_id).await?;
            if at.is_none_or(|run| run.job_id != job_id) {
                return Ok(None);
            }
        }
        let now = self.now_ms();
        let out_key = self.keys.out(run_id);
        let record = OutcomeRecord {
            workflow: outcome.workflow.clone(),
            status: outcome.status,
            result: outcome.result.clone(),
            error: outcome.error.clone(),
            headers: outcome.headers.clone(),
            final_step: outcome.final_step,
            finished_at_ms: now,
            reruns: outcome.reruns,
        };
        let mut effects = SettlementEffects::default()
            .kv_delete(self.keys.run(run_id))
            .kv_put(out_key.clone(), encode(&out_key, &record)?)
            .expiry_entry(&self.expiry, now, run_id.as_bytes());
        // The entry names the run's inputs and history for retention (an
        // empty entry, for a long run, sends it to a scan).
        let history = crate::history::seq_of(headers);
        if let Some(summary) = record::DataSummary::of(outcome.final_step, history) {
            let entry = self.expiry.entry_key(now, run_id.as_bytes());
            let value = encode(&entry, &summary)?;
            effects = effects.kv_put(entry, value);
        }
        if let Some(at) = record::deadline_of(headers) {
            effects = effects.kv_delete(self.deadlines.entry_key(at, run_id.as_bytes()));
        }
        let tally = match outcome.status {
            TerminalStatus::Succeeded => Some(true),
            TerminalStatus::Failed => Some(false),
            _ => None,
        };
        let mut guard = None;
        if let Some(succeeded) = tally {
            let (key, value, held) = self
                .breakers
                .tally(&outcome.workflow, run_id, now, succeeded);
            effects = effects.kv_put(key, value);
            guard = Some(held);
        }
        if self.hooks_enabled {
            let payload = encode(run_id.as_bytes(), outcome)?;
            let options = EnqueueOptions::default()
                .header(HEADER_RUN_ID, run_id.clone())
                .max_attempts(self.cfg.hook_max_attempts);
            effects = effects.enqueue(EnqueueRequest {
                queue: self.cfg.hook_queue.clone(),
                payload,
                options,
            });
        }
        // Only a run at a join can have live children.
        if headers.contains_key(record::HEADER_JOIN)
            && let Some((key, value)) = self.cascade_entry(run_id, outcome.final_step).await?
        {
            effects = effects.kv_put(key, value);
        }
        let mut hold = TerminalHold {
            tally: guard,
            locks,
            pending: None,
            replaced: None,
        };
        if let Some(arrival) = self.child_arrival(outcome, headers).await? {
            effects = crate::effects::merge(effects, arrival.effects);
            hold.pending = arrival.pending;
            hold.replaced = arrival.replaced;
        }
        Ok(Some(Terminal { effects, hold }))
    }

    /// Wake the callers of `wait` on this run, and count its ending for the
    /// back-pressure.
    pub(crate) fn notify_terminal(&self, outcome: RunOutcome) {
        self.backpressure.run_ended();
        for tx in self.waiters.take(&outcome.run_id) {
            let _ = tx.send(outcome.clone());
        }
    }

    /// End the run of a step job the queue dead-lettered by itself (lease
    /// expired on its last attempt, or a crash during its last attempt), if
    /// the run is still at that job. Keyed on the job id, so a later run with
    /// the same id is never touched by an old job.
    pub(crate) async fn reconcile_dead(&self, job: &JobRecord) -> Result<bool, Error> {
        let Ok((run_id, _)) = record::parse_step_headers(&job.headers) else {
            return Ok(false);
        };
        let run_key = self.keys.run(run_id);
        let Some(bytes) = self.queue.view().kv_get(&run_key).await? else {
            return Ok(false);
        };
        let run: RunRecord = decode(&run_key, &bytes)?;
        if run.job_id != job.id {
            return Ok(false);
        }
        let outcome = read::dead_outcome(run_id, &run, job);
        let Some(Terminal { effects, hold }) =
            self.terminal_effects(&outcome, &job.headers, None).await?
        else {
            return Ok(false);
        };
        let effects = crate::history::record_ending(
            effects,
            &self.keys,
            self.cfg.history_entries,
            &outcome,
            job,
            self.now_ms(),
        )?;
        let applied = {
            let _pending = self.pending.begin(run_id);
            self.queue
                .kv_compare_commit(&[(&run_key, Some(&bytes))], effects)
                .await
        };
        hold.done(&self.queue, matches!(applied, Ok(Some(_)))).await;
        let applied = applied?;
        if applied.is_some() {
            tracing::warn!(run_id, step = run.step, job_id = %job.id, "run failed: its step was dead-lettered by the queue");
            self.notify_terminal(outcome);
        }
        Ok(applied.is_some())
    }
}

/// Whether job `job` holds a signal (`None`: it does not), and whether it
/// is the one request `request` sent (a wait from an earlier Waymark holds
/// the bare payload: the signal counts as this request's if `payload` is
/// equal).
pub(crate) fn holds_signal(
    job: &JobRecord,
    request: Option<&str>,
    payload: &[u8],
) -> Result<Option<bool>, Error> {
    let Some(signal) = &job.signal else {
        return Ok(None);
    };
    let sent = SentSignal::of(&job.id, &job.headers, signal)?;
    Ok(Some(
        if job.headers.contains_key(record::HEADER_SIGNAL_SENDER) {
            sent.sender.as_deref() == request
        } else {
            sent.payload == payload
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook::NoopTerminalHook;
    use crate::runner::Done;
    use crate::store::DEFAULT_QUEUE_NAME;

    fn spec(id: &str) -> RunSpec {
        RunSpec {
            run_id: Some(id.into()),
            ..Default::default()
        }
    }

    /// A runtime (no pool) with run `r` submitted, and the claim of its
    /// step 0 by a worker of its own (not this runtime's pool).
    async fn submitted_and_claimed_elsewhere()
    -> (WorkflowRuntime<Done, NoopTerminalHook>, taquba::Claim) {
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let options = taquba::OpenOptions {
            flush_interval: Some(Duration::from_millis(1)),
            ..Default::default()
        };
        let queue = Arc::new(Queue::open_with_options(store, "t", options).await.unwrap());
        let rt = WorkflowRuntime::builder(queue.clone(), Done, NoopTerminalHook)
            .build()
            .unwrap();
        rt.submit(spec("r")).await.unwrap();
        let claim = queue
            .claim(DEFAULT_QUEUE_NAME, Duration::from_secs(60))
            .await
            .unwrap()
            .expect("step 0 is claimable");
        (rt, claim)
    }

    /// A cancel whose request lands on a claimed step that a worker had
    /// already decided to move on (it decided before the cancel reached it)
    /// and settles before the cancel looks for it: the flag lands on a
    /// finished job. The cancel answered `true` ("no entry: not registered
    /// yet") while the run went on and succeeded (the crash torture, seed
    /// 1795675520399358605). It now follows the run to its next step.
    #[tokio::test]
    async fn a_cancel_that_lands_on_a_step_settled_meanwhile_follows_the_run() {
        // A worker of its own claims step 0 (no entry in this process, as a
        // worker that decided before the cancel reached it has none left).
        let (rt, claim) = submitted_and_claimed_elsewhere().await;
        // It settles "next step" while the cancel's request commits: step
        // 1's job, the run record pointing at it.
        let inner = rt.inner.clone();
        *lock(&rt.inner.inflight.before_look) = Some(Box::pin(async move {
            let next = inner.queue.next_job_id();
            let mut headers = claim.headers.clone();
            headers.insert(HEADER_STEP.to_string(), "1".to_string());
            let run_key = inner.keys.run("r");
            let run = RunRecord {
                step: 1,
                job_id: next.clone(),
            };
            let effects = SettlementEffects::default()
                .enqueue(EnqueueRequest {
                    queue: DEFAULT_QUEUE_NAME.to_string(),
                    payload: vec![],
                    options: EnqueueOptions::default().id_override(next).headers(headers),
                })
                .kv_put(run_key.clone(), encode(&run_key, &run).unwrap());
            inner.queue.ack_with(&claim, effects).await.unwrap();
        }));
        assert!(rt.cancel("r").await.unwrap(), "the run is cancelled");
        let out = rt.outcome("r").await.unwrap().expect("the run ended");
        assert_eq!(out.status, TerminalStatus::Cancelled, "{out:?}");
        assert_eq!(out.final_step, 1);
    }

    /// A second cancel whose request follows the first's commit (visible,
    /// and maybe not yet durable) found the request stored: taquba answers
    /// that without a commit. It answered `true` from a read taken before
    /// the first's commit, so both said they were the one accepted, and the
    /// second answered before the first's commit was durable. Cancels of
    /// one run now take turns.
    #[tokio::test]
    async fn two_cancels_of_one_run_take_turns() {
        // A worker of its own runs step 0, so the cancel is a request.
        let (rt, claim) = submitted_and_claimed_elsewhere().await;
        let queue = rt.inner.queue.clone();
        // The second cancel has read the run; the first starts and gets its
        // request stored, if it can, before the second's request.
        let first = Arc::new(Mutex::new(None));
        *lock(&rt.inner.inflight.before_request) = Some(Box::pin({
            let (rt, queue, first) = (rt.clone(), queue.clone(), first.clone());
            let job = claim.id.clone();
            async move {
                let cancel = tokio::spawn(async move { rt.cancel("r").await });
                *lock(&first) = Some(cancel);
                for _ in 0..30 {
                    let stored = queue.view().get_job(&job).await.unwrap();
                    if stored.is_some_and(|j| j.cancel_requested) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
        let second = rt.cancel("r").await.unwrap();
        let first = lock(&first).take().expect("the hook ran");
        let first = first.await.unwrap().unwrap();
        assert!(
            first != second,
            "exactly one cancel is the one accepted: first {first}, second {second}"
        );
        assert_eq!(rt.inner.endings.len(), 0, "no lock is left behind");
    }

    /// Defect 9: `wait` unregisters itself on every way out.
    #[tokio::test]
    async fn wait_leaves_no_waiter_behind() {
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let queue = Arc::new(Queue::open(store, "t").await.unwrap());
        let rt = WorkflowRuntime::builder(queue, Done, NoopTerminalHook)
            .build()
            .unwrap();
        assert!(matches!(
            rt.wait("nobody").await,
            Err(Error::RunNotFound(_))
        ));
        assert_eq!(rt.inner.waiters.len(), 0, "after an unknown run");

        // A run that has ended (cancelled while pending: no pool needed).
        rt.submit(spec("ended")).await.unwrap();
        assert!(rt.cancel("ended").await.unwrap());
        let out = rt.wait("ended").await.unwrap();
        assert_eq!(out.status, TerminalStatus::Cancelled);
        assert_eq!(rt.inner.waiters.len(), 0, "after an ended run");

        // A live run's wait, dropped before it ends (no pool runs it).
        rt.submit(spec("live")).await.unwrap();
        {
            let wait = rt.wait("live");
            tokio::pin!(wait);
            assert!(
                tokio::time::timeout(Duration::from_millis(50), &mut wait)
                    .await
                    .is_err()
            );
            assert_eq!(rt.inner.waiters.len(), 1, "registered while it waits");
        }
        assert_eq!(rt.inner.waiters.len(), 0, "after a dropped wait");
    }
}
