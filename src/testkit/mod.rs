//! # Testing your workflows for crashes
//!
//! `waymark::testkit` (cargo feature `testkit`, for `[dev-dependencies]`)
//! runs your own runner and hook on the real runtime, over an in-memory
//! store, with taquba's [`MockClock`]: time moves only when the test moves
//! it, and the kit can kill the simulated process at a point the test
//! names, then restart it on the same store. It is what Waymark's own crash
//! tests use.
//!
//! ```toml
//! [dev-dependencies]
//! waymark = { version = "0.1", features = ["testkit"] }
//! ```
//!
//! ## Driving
//!
//! [`TestKitBuilder::start`] builds the runtime with your runner, hook and any
//! builder option ([`TestKitBuilder::runtime`] is handed the real
//! [`WorkflowRuntimeBuilder`]) and starts its worker pool.
//! [`TestKit::run_until_idle`] returns once nothing is runnable: no step,
//! hook or schedule tick is pending or claimed, no run's deadline is due,
//! no cascade is left, and the kit saw no call, return or commit across
//! three consecutive looks. It never sleeps to decide: it reads the store's
//! state. [`TestKit::advance`] moves the clock and runs until idle again:
//! delayed steps, retries, deadlines, schedules and signal timeouts follow
//! it. [`TestKit::wait`] runs until idle and returns the run's outcome.
//!
//! The kit wraps your runner and hook ([`KitRunner`], [`KitHook`]); a
//! wrapped [`NoopTerminalHook`](crate::NoopTerminalHook) is a hook like any
//! other, so the kit's runtime queues hook notifications (delivered to
//! nothing) where the real one would queue none.
//!
//! Retries wait for their [`RetryPolicy`](crate::RetryPolicy) delay on the
//! mock clock: advance it (or give the workflow a zero initial delay). The
//! kit's defaults: one step at a time (`max_concurrent_steps(1)`, so seeded
//! crashes replay), a 20 ms `poll_interval`, a 30 s lease.
//!
//! ## Crashes
//!
//! A crash is planned at a [`CrashPoint`] of one step
//! ([`TestKit::crash_at`]) or drawn from a seed at every point reached
//! ([`TestKit::crash_randomly`]), or struck at once
//! ([`TestKit::crash_now`]). When it strikes, the process's store handle is
//! severed at that instant: nothing the process does afterwards reaches the
//! store, so what it had committed durably stays and what it had not (a
//! settlement in SlateDB's WAL not yet flushed) is lost — exactly what a
//! SIGKILL loses, nothing more. The worker is dropped; [`TestKit::restart`]
//! opens a new process on the same store, clock and runner (your runner's
//! own state — a counter of charges — survives, as the outside world does).
//!
//! | point | the step after the restart |
//! |---|---|
//! | [`CrashPoint::BeforeRunner`] | runs (its first call never started) |
//! | [`CrashPoint::WhileRunning`] | runs again; memo entries it committed are found |
//! | [`CrashPoint::AfterRunner`] | runs again: its side effects outside the memo repeat |
//! | [`CrashPoint::AfterSettlement`] | does not run again; the run moves on |
//!
//! ## Assertions
//!
//! [`TestKit::calls`] lists every call of a step's runner (its attempt, its
//! process, how it ended, whether its settlement committed);
//! [`TestKit::runner_calls`], [`TestKit::committed_attempt`] and
//! [`TestKit::hook_calls`] count them; [`TestKit::ran_to_commit_once`] is
//! the ready check: every step ran to its commit once, every other call of
//! it having failed or been cut by a crash.
//!
//! ## Faults
//!
//! The store is a [`FaultStore`]: [`TestKitBuilder::faults`] sets seeded
//! failure rates, latency spikes and a constant latency (a slow store);
//! [`TestKit::faults`] opens an outage window ([`Faults::fail_everything`]),
//! holds or fails chosen operations. [`TestKit::lapse_lease`] lets a step's
//! lease lapse while it runs: the job is claimed again and the first
//! attempt's settlement is refused, a duplicate the ready check reports.
//!
//! ## Real processes
//!
//! [`process`] re-executes your test binary as a worker process on a temp
//! directory and SIGKILLs it at seeded moments, printing the seed and
//! replaying it from an environment variable.
//!
//! ## Example: a charge outside the memo is caught
//!
//! A runner that charges a card on its step 0 and records the charge
//! outside the memo charges twice when the process dies after the runner
//! returned and before its result was durable; the same runner with the
//! charge in [`Step::memo`](crate::Step::memo) charges once.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use waymark::testkit::{CrashPoint, TestKit};
//! use waymark::{NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner, TerminalStatus};
//!
//! struct Checkout { charges: Arc<AtomicU32>, memoized: bool }
//!
//! impl StepRunner for Checkout {
//!     async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
//!         let charge = || async {
//!             self.charges.fetch_add(1, Ordering::SeqCst);
//!             Ok::<_, StepError>("receipt-1".to_string())
//!         };
//!         let receipt = if self.memoized {
//!             step.memo.memoized("charge", charge).await?
//!         } else {
//!             charge().await?
//!         };
//!         Ok(StepOutcome::Succeed { result: receipt.into_bytes() })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! for memoized in [false, true] {
//!     let charges = Arc::new(AtomicU32::new(0));
//!     let runner = Checkout { charges: charges.clone(), memoized };
//!     let mut kit = TestKit::builder(runner, NoopTerminalHook).start().await?;
//!     kit.crash_at(CrashPoint::AfterRunner, "order-1", 0);
//!     kit.submit(RunSpec { run_id: Some("order-1".into()), ..Default::default() }).await?;
//!     kit.run_until_idle().await?; // the crash strikes
//!     kit.restart().await?;
//!     let outcome = kit.wait("order-1").await?;
//!     assert_eq!(outcome.status, TerminalStatus::Succeeded);
//!     assert_eq!(kit.runner_calls("order-1", 0), 2, "the step ran again");
//!     let expected = if memoized { 1 } else { 2 };
//!     assert_eq!(charges.load(Ordering::SeqCst), expected, "memoized: {memoized}");
//!     kit.ran_to_commit_once().map_err(|e| e.to_string())?;
//!     kit.shutdown().await?;
//! }
//! # Ok(()) }
//! ```

mod faults;
mod ledger;
pub mod process;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use taquba::object_store::ObjectStore;
use taquba::object_store::memory::InMemory;
use taquba::{Clock, KvOrder, MockClock, OpenOptions, Queue, QueueConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use faults::{
    Decision, FaultCounts, FaultPlan, FaultStore, Faults, MAX_TRACE, Outage, Rng, StoreOp,
    seed_from_env,
};
pub use ledger::{Call, CallEnd, CrashPoint, CrashReport, KitHook, KitRunner};

use crate::error::Error;
use crate::hook::{RunOutcome, TerminalHook};
use crate::runner::StepRunner;
use crate::runtime::{RunSpec, SubmitOutcome, WorkflowRuntime, WorkflowRuntimeBuilder};
use crate::sync::lock;
use ledger::{Armed, KitProbe, RandomCrash, Shared};

/// The clock's start: 2027-01-15T08:00:00Z.
pub const DEFAULT_START_MS: u64 = 1_800_000_000_000;

/// How often the kit looks at the store while it runs until idle.
const LOOK: Duration = Duration::from_millis(2);

/// Consecutive idle looks, with no activity between them, that make idle.
const QUIET_LOOKS: u32 = 3;

/// What the kit hands [`TestKitBuilder::runtime`]: the real builder.
pub type KitBuilder<R, H> = WorkflowRuntimeBuilder<KitRunner<R>, KitHook<H>>;

/// The runtime a [`TestKit`] runs: the real one, over the kit's wrappers.
pub type KitRuntime<R, H> = WorkflowRuntime<KitRunner<R>, KitHook<H>>;

type Configure<R, H> = dyn Fn(KitBuilder<R, H>) -> KitBuilder<R, H> + Send + Sync;

/// What went wrong in the kit.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The runtime returned an error.
    #[error(transparent)]
    Runtime(#[from] Error),
    /// A crash struck the process: [`TestKit::restart`] starts a new one.
    #[error("the process crashed ({0:?}); call `restart` to start a new one")]
    Crashed(CrashReport),
    /// The process is down (crashed); [`TestKit::restart`] starts one.
    #[error("no process runs (it crashed); call `restart` to start a new one")]
    Down,
    /// The work did not become idle within the kit's limit: a step that
    /// never returns (a runner waiting for the test), or a store that keeps
    /// failing.
    #[error("the runtime was still busy after {0:?}: {1}")]
    NotIdle(Duration, String),
    /// Nothing is runnable and the run has not ended: it waits for the
    /// clock (a delay, a retry, a signal's timeout) or for a signal.
    #[error("run `{0}` has not ended and nothing is runnable: advance the clock or signal it")]
    NotEnded(String),
    /// The worker pool stopped by itself.
    #[error("the worker pool stopped: {0}")]
    WorkerStopped(String),
    /// [`TestKit::ran_to_commit_once`] failed: these steps broke it.
    #[error("not every step ran to its commit once:\n  {}", .0.join("\n  "))]
    NotOnce(Vec<String>),
}

/// What driving the runtime ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drive {
    /// Nothing is runnable.
    Idle,
    /// A planned crash struck; the process is down until
    /// [`TestKit::restart`].
    Crashed(CrashReport),
}

/// Configures a [`TestKit`].
pub struct TestKitBuilder<R: StepRunner, H: TerminalHook> {
    runner: Arc<R>,
    hook: Arc<H>,
    configure: Arc<Configure<R, H>>,
    start_ms: u64,
    seed: u64,
    plan: FaultPlan,
    lease: Duration,
    idle_limit: Duration,
}

impl<R: StepRunner, H: TerminalHook> TestKitBuilder<R, H> {
    /// Apply builder options of the real runtime (retry policies,
    /// breakers, schedules, `max_concurrent_steps`, ...) to every process
    /// the kit starts.
    pub fn runtime(
        mut self,
        configure: impl Fn(KitBuilder<R, H>) -> KitBuilder<R, H> + Send + Sync + 'static,
    ) -> Self {
        self.configure = Arc::new(configure);
        self
    }

    /// The mock clock's start, in ms since the Unix epoch (default
    /// [`DEFAULT_START_MS`]).
    pub fn start_ms(mut self, ms: u64) -> Self {
        self.start_ms = ms;
        self
    }

    /// Store faults: `plan`'s rates, with decisions drawn from `seed`
    /// (default: none).
    pub fn faults(mut self, seed: u64, plan: FaultPlan) -> Self {
        self.seed = seed;
        self.plan = plan;
        self
    }

    /// The lease of a claimed step (default 30 s, taquba's): how far
    /// [`TestKit::lapse_lease`] moves the clock.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long (wall clock) [`TestKit::run_until_idle`] waits for idle
    /// before it fails with [`KitError::NotIdle`] (default 60 s). A bound
    /// on a hang, never a decision.
    pub fn idle_limit(mut self, limit: Duration) -> Self {
        self.idle_limit = limit;
        self
    }

    /// Start the first process.
    pub async fn start(self) -> Result<TestKit<R, H>, KitError> {
        let clock = MockClock::new(self.start_ms);
        let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let mut kit = TestKit {
            shared: Arc::new(Shared::new(clock.clone(), self.lease)),
            runner: self.runner,
            hook: self.hook,
            configure: self.configure,
            store: FaultStore::new(memory, self.seed, self.plan),
            clock,
            idle_limit: self.idle_limit,
            live: None,
            started: false,
        };
        kit.boot().await?;
        Ok(kit)
    }
}

/// The process the kit runs now.
struct Live<R: StepRunner, H: TerminalHook> {
    rt: KitRuntime<R, H>,
    worker: JoinHandle<Result<(), Error>>,
    store: Arc<FaultStore>,
    /// Stops the pool cleanly.
    stop: CancellationToken,
}

/// A test runtime: the real runtime over an in-memory store and a mock
/// clock, with crashes, faults and a record of every step's calls. See the
/// [module docs](self).
pub struct TestKit<R: StepRunner, H: TerminalHook> {
    shared: Arc<Shared>,
    runner: Arc<R>,
    hook: Arc<H>,
    configure: Arc<Configure<R, H>>,
    /// The store every process opens (through its own handle).
    store: Arc<FaultStore>,
    clock: MockClock,
    idle_limit: Duration,
    live: Option<Live<R, H>>,
    started: bool,
}

impl<R: StepRunner, H: TerminalHook> TestKit<R, H> {
    /// Configure a kit running `runner` and `hook`.
    pub fn builder(runner: R, hook: H) -> TestKitBuilder<R, H> {
        TestKitBuilder {
            runner: Arc::new(runner),
            hook: Arc::new(hook),
            configure: Arc::new(|b| b),
            start_ms: DEFAULT_START_MS,
            seed: 0,
            plan: FaultPlan::default(),
            lease: Duration::from_secs(30),
            idle_limit: Duration::from_secs(60),
        }
    }

    /// Open a process on the store (a new handle) and start its pool.
    async fn boot(&mut self) -> Result<(), KitError> {
        let shared = &self.shared;
        if self.started {
            shared.incarnation.fetch_add(1, Ordering::SeqCst);
        }
        self.started = true;
        let store = self.store.incarnation();
        let options = OpenOptions {
            clock: Arc::new(self.clock.clone()),
            flush_interval: Some(Duration::from_millis(1)),
            scheduler_interval: Duration::from_millis(10),
            // Leases lapse only when the test says (`lapse_lease`) or a
            // restart reopens the store.
            reaper_interval: Duration::from_secs(3600),
            default_queue_config: QueueConfig::default().lease_duration(shared.lease),
            ..OpenOptions::default()
        };
        let queue = Queue::open_with_options(store.clone(), "waymark-testkit", options)
            .await
            .map_err(Error::from)?;
        let queue = Arc::new(queue);
        let runner = KitRunner {
            inner: self.runner.clone(),
            shared: shared.clone(),
        };
        let hook = KitHook {
            inner: self.hook.clone(),
            shared: shared.clone(),
        };
        let builder = WorkflowRuntime::builder(queue.clone(), runner, hook)
            .max_concurrent_steps(1)
            .poll_interval(Duration::from_millis(20));
        let rt = (self.configure)(builder)
            .probe(Arc::new(KitProbe(shared.clone())))
            .build()?;
        *lock(&shared.store) = Some(store.clone());
        *lock(&shared.queue) = Some(queue);
        shared.crashed.send_replace(None);
        let stop = CancellationToken::new();
        let worker = tokio::spawn({
            let (rt, stop) = (rt.clone(), stop.clone());
            async move { rt.run(stop.cancelled_owned()).await }
        });
        self.live = Some(Live {
            rt,
            worker,
            store,
            stop,
        });
        Ok(())
    }

    /// The runtime of the process running now (to submit, signal, cancel,
    /// read); [`KitError::Down`] after a crash, until a restart.
    pub fn runtime(&self) -> Result<&KitRuntime<R, H>, KitError> {
        self.live.as_ref().map(|l| &l.rt).ok_or(KitError::Down)
    }

    /// Submit a run (see [`WorkflowRuntime::submit`]).
    pub async fn submit(&self, spec: RunSpec) -> Result<SubmitOutcome, KitError> {
        Ok(self.runtime()?.submit(spec).await?)
    }

    /// The run's outcome, if it has ended (see [`WorkflowRuntime::outcome`]).
    pub async fn outcome(&self, run_id: &str) -> Result<Option<RunOutcome>, KitError> {
        Ok(self.runtime()?.outcome(run_id).await?)
    }

    /// The mock clock every process shares.
    pub fn clock(&self) -> &MockClock {
        &self.clock
    }

    /// The clock's now, in ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The store's fault controls and counters (shared by every process).
    pub fn faults(&self) -> Arc<Faults> {
        self.store.faults()
    }

    /// The in-memory store every process opens, under its faults. Open a
    /// [`taquba::QueueReader`] on it to inspect the durable state (the
    /// queue's path is `waymark-testkit`).
    pub fn store(&self) -> Arc<FaultStore> {
        self.store.clone()
    }

    /// Move the clock by `by` (at most to the last millisecond it holds:
    /// `Duration::MAX` does not wrap it around), then run until idle.
    pub async fn advance(&mut self, by: Duration) -> Result<Drive, KitError> {
        let room = u64::MAX.saturating_sub(self.clock.now_ms());
        self.clock.advance(by.min(Duration::from_millis(room)));
        self.run_until_idle().await
    }

    /// Run until nothing is runnable (see the [module docs](self)), or a
    /// planned crash strikes ([`Drive::Crashed`]: the process is down).
    pub async fn run_until_idle(&mut self) -> Result<Drive, KitError> {
        // A limit past what an `Instant` can hold never runs out.
        let limit = tokio::time::Instant::now().checked_add(self.idle_limit);
        let mut crashed = self.shared.crashed.subscribe();
        let mut quiet = 0;
        let mut seen = self.shared.activity.load(Ordering::SeqCst);
        loop {
            if let Some(report) = crashed.borrow_and_update().clone() {
                self.kill().await;
                return Ok(Drive::Crashed(report));
            }
            let live = self.live.as_ref().ok_or(KitError::Down)?;
            if live.worker.is_finished() {
                let Some(live) = self.live.take() else {
                    return Err(KitError::Down);
                };
                let why = match live.worker.await {
                    Ok(Ok(())) => "it returned".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(KitError::WorkerStopped(why));
            }
            let busy = busy(&live.rt).await;
            let now = self.shared.activity.load(Ordering::SeqCst);
            if busy.is_none() && now == seen {
                quiet += 1;
                if quiet >= QUIET_LOOKS {
                    return Ok(Drive::Idle);
                }
            } else {
                quiet = 0;
            }
            seen = now;
            if limit.is_some_and(|limit| tokio::time::Instant::now() >= limit) {
                let why = busy.unwrap_or_else(|| "the kit kept seeing activity".into());
                return Err(KitError::NotIdle(self.idle_limit, why));
            }
            tokio::select! {
                _ = crashed.changed() => {}
                _ = tokio::time::sleep(LOOK) => {}
            }
        }
    }

    /// Run until idle and return the run's outcome: [`KitError::NotEnded`]
    /// when it has not ended and nothing is runnable,
    /// [`KitError::Crashed`] when a planned crash struck first.
    pub async fn wait(&mut self, run_id: &str) -> Result<RunOutcome, KitError> {
        if let Drive::Crashed(report) = self.run_until_idle().await? {
            return Err(KitError::Crashed(report));
        }
        self.outcome(run_id)
            .await?
            .ok_or_else(|| KitError::NotEnded(run_id.to_string()))
    }

    /// Crash the process when step `step` of `run_id` reaches `point` (its
    /// first attempt to reach it).
    pub fn crash_at(&self, point: CrashPoint, run_id: &str, step: u32) {
        self.arm(point, run_id, step, None);
    }

    /// Crash the process when attempt `attempt` (1-based) of step `step` of
    /// `run_id` reaches `point`.
    pub fn crash_at_attempt(&self, point: CrashPoint, run_id: &str, step: u32, attempt: u32) {
        self.arm(point, run_id, step, Some(attempt));
    }

    fn arm(&self, point: CrashPoint, run_id: &str, step: u32, attempt: Option<u32>) {
        lock(&self.shared.armed).push(Armed {
            point,
            run_id: run_id.to_string(),
            step,
            attempt,
        });
    }

    /// Crash the process at a seeded random point: each point any step
    /// reaches from now on strikes with probability `per_mille / 1000`
    /// (drawn from `seed`), the first that does crashes the process, and
    /// the plan is spent. With one step running at a time (the kit's
    /// default) the same seed strikes at the same point of the same step.
    /// (Its attempt number may differ: a claim commits without waiting for
    /// its WAL flush, so whether a crashed claim counted is a race, as in a
    /// real crash.)
    pub fn crash_randomly(&self, seed: u64, per_mille: u64) {
        *lock(&self.shared.random) = Some(RandomCrash {
            rng: Rng::new(seed),
            per_mille,
        });
    }

    /// Remove every planned crash that has not struck.
    pub fn disarm(&self) {
        lock(&self.shared.armed).clear();
        *lock(&self.shared.random) = None;
    }

    /// Let the lease of step `step` of `run_id` lapse while its runner runs
    /// (its next call): the clock moves past the lease and the reaper takes
    /// the job back before the runner starts, so another claim runs the step
    /// again and the first call's settlement is refused.
    pub fn lapse_lease(&self, run_id: &str, step: u32) {
        lock(&self.shared.lapses).push((run_id.to_string(), step));
    }

    /// Crash the process now, wherever its steps are.
    pub async fn crash_now(&mut self) {
        if let Some(live) = &self.live {
            live.store.sever();
        }
        self.kill().await;
    }

    /// Drop the dead process: its store handle is severed (by the crash),
    /// its pool is aborted.
    async fn kill(&mut self) {
        if let Some(live) = self.live.take() {
            live.store.sever();
            live.worker.abort();
            let _ = live.worker.await;
        }
        *lock(&self.shared.store) = None;
        *lock(&self.shared.queue) = None;
    }

    /// Start a new process on the same store, clock, runner and hook (a
    /// process still running is crashed first).
    pub async fn restart(&mut self) -> Result<(), KitError> {
        self.crash_now().await;
        self.boot().await
    }

    /// Stop the process cleanly: its pool stops claiming and its steps in
    /// flight settle.
    pub async fn shutdown(mut self) -> Result<(), KitError> {
        let Some(live) = self.live.take() else {
            return Ok(());
        };
        live.stop.cancel();
        let stopped = live.worker.await;
        *lock(&self.shared.queue) = None;
        match stopped {
            Ok(result) => Ok(result?),
            Err(e) => Err(KitError::WorkerStopped(e.to_string())),
        }
    }

    /// Every call of step `step` of `run_id`'s runner, in order.
    pub fn calls(&self, run_id: &str, step: u32) -> Vec<Call> {
        lock(&self.shared.calls)
            .get(&(run_id.to_string(), step))
            .cloned()
            .unwrap_or_default()
    }

    /// How many times step `step` of `run_id`'s runner was called.
    pub fn runner_calls(&self, run_id: &str, step: u32) -> usize {
        self.calls(run_id, step).len()
    }

    /// The attempt (1-based) of step `step` of `run_id` whose settlement
    /// committed last (a retry's settlement commits too, so this is the
    /// attempt the step ended with), if any did.
    pub fn committed_attempt(&self, run_id: &str, step: u32) -> Option<u32> {
        self.calls(run_id, step)
            .iter()
            .filter(|c| c.committed)
            .map(|c| c.attempt)
            .max()
    }

    /// How many times the hook was called for `run_id`.
    pub fn hook_calls(&self, run_id: &str) -> u32 {
        lock(&self.shared.hooks).get(run_id).copied().unwrap_or(0)
    }

    /// The ready check: every step ran to its commit once. For each step
    /// job (a step of one segment, or of one re-run: each has its own job),
    /// at most one call returned an outcome that no crash cut, and its
    /// settlement committed; every other call failed (a retried error) or
    /// was cut by a crash. `Err` lists the steps that broke it (a lapsed
    /// lease, a lost claim: the step's outcome was computed twice).
    pub fn ran_to_commit_once(&self) -> Result<(), KitError> {
        let calls = lock(&self.shared.calls);
        let mut broken = Vec::new();
        for ((run, step), list) in calls.iter() {
            let mut jobs: Vec<&str> = Vec::new();
            for call in list {
                if !jobs.contains(&call.job_id.as_str()) {
                    jobs.push(&call.job_id);
                }
            }
            for job in jobs {
                let calls: Vec<Call> = list.iter().filter(|c| c.job_id == job).cloned().collect();
                let returned: Vec<&Call> = calls
                    .iter()
                    .filter(|c| c.end == CallEnd::Returned)
                    .collect();
                let ok = match returned.as_slice() {
                    [] => true,
                    [one] => one.committed,
                    _ => false,
                };
                if !ok {
                    broken.push(format!(
                        "run `{run}` step {step} (job {job}): {}",
                        ledger::describe(&calls)
                    ));
                }
            }
        }
        if broken.is_empty() {
            Ok(())
        } else {
            Err(KitError::NotOnce(broken))
        }
    }
}

/// What keeps the runtime busy now, if anything: a pending or claimed job
/// on its step, hook or schedule queue, a due deadline, a cascade marker.
async fn busy<R, H>(rt: &WorkflowRuntime<R, H>) -> Option<String> {
    let inner = &rt.inner;
    let queue = &inner.queue;
    if let Err(e) = queue.promote_scheduled_now().await {
        return Some(format!("promoting scheduled jobs failed: {e}"));
    }
    let view = queue.view();
    for name in [
        &inner.cfg.queue_name,
        &inner.cfg.hook_queue,
        &inner.schedules.queue,
    ] {
        match view.stats(name).await {
            Ok(s) if s.pending > 0 || s.claimed > 0 => {
                return Some(format!(
                    "queue `{name}`: {} pending, {} claimed",
                    s.pending, s.claimed
                ));
            }
            Ok(_) => {}
            Err(e) => return Some(format!("reading queue `{name}` failed: {e}")),
        }
    }
    let now = inner.now_ms();
    match view
        .kv_scan(inner.keys.deadline_prefix(), .., KvOrder::Ascending, 1)
        .await
    {
        Ok(page) => {
            let due = page
                .entries
                .first()
                .and_then(|(key, _)| inner.deadlines.parse(key))
                .is_some_and(|(at, _)| at <= now);
            if due {
                return Some("a run's deadline is due".into());
            }
        }
        Err(e) => return Some(format!("reading deadlines failed: {e}")),
    }
    match view
        .kv_scan(inner.keys.cascade_prefix(), .., KvOrder::Ascending, 1)
        .await
    {
        Ok(page) if !page.entries.is_empty() => Some("a cascade is left".into()),
        Ok(_) => None,
        Err(e) => Some(format!("reading cascades failed: {e}")),
    }
}
