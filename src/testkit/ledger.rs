//! What the kit records and where it crashes: the wrappers of the user's
//! runner and hook ([`KitRunner`], [`KitHook`]), the worker's probe, the
//! calls of every step, and the crash plans.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_util::future::BoxFuture;
use taquba::{MockClock, Queue};
use tokio::sync::watch;

use super::faults::{FaultStore, Rng};
use crate::hook::{RunOutcome, TerminalHook};
use crate::probe::Probe;
use crate::runner::{Step, StepError, StepOutcome, StepRunner};
use crate::sync::lock;

/// A point in a step's path where a crash can strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CrashPoint {
    /// The step was claimed; its runner is about to be called. The crash
    /// loses the claim only: the step runs again after the restart.
    BeforeRunner,
    /// The runner was called and is suspended at its first `.await` (a
    /// runner that never suspends is crashed right after it returns). What
    /// it committed durably before (a memo entry whose write returned)
    /// stays; what it had not, and everything after, is lost.
    WhileRunning,
    /// The runner returned; the settlement that commits what it returned is
    /// not durable. The step runs again after the restart: a side effect
    /// outside the memo happens twice.
    AfterRunner,
    /// The settlement committed durably; nothing after it ran (the run's
    /// `wait` callers were not woken, the hook was not called). The step
    /// does not run again.
    AfterSettlement,
}

impl CrashPoint {
    /// Every point, in the order a step reaches them.
    pub const ALL: [CrashPoint; 4] = [
        CrashPoint::BeforeRunner,
        CrashPoint::WhileRunning,
        CrashPoint::AfterRunner,
        CrashPoint::AfterSettlement,
    ];
}

/// A crash that struck: where, and in which step's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashReport {
    /// The point.
    pub point: CrashPoint,
    /// The run whose step reached it.
    pub run_id: String,
    /// The step.
    pub step: u32,
    /// The step's attempt (1-based).
    pub attempt: u32,
    /// The process (0 for the first) that crashed.
    pub incarnation: u32,
}

/// How one call of the runner ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEnd {
    /// It has not returned: it runs, or it panicked (the worker counts a
    /// panic as a transient error).
    Running,
    /// It returned an outcome.
    Returned,
    /// It returned an error (its message).
    Errored(String),
    /// A crash struck at this point of the call's path, or struck elsewhere
    /// in its process before the call's settlement was durable
    /// ([`CrashPoint::WhileRunning`] for a call cut while it ran).
    Crashed(CrashPoint),
}

/// One call of the runner for a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The step's attempt this call was (1-based, across retries).
    pub attempt: u32,
    /// The step job's id.
    pub job_id: String,
    /// The process (0 for the first) that made the call.
    pub incarnation: u32,
    /// How it ended.
    pub end: CallEnd,
    /// Whether its settlement committed (a retry's settlement commits too).
    pub committed: bool,
}

/// The calls of every step, by run and step.
pub(super) type Calls = BTreeMap<(String, u32), Vec<Call>>;

/// A planned crash at a point of one step's path.
#[derive(Debug, Clone)]
pub(super) struct Armed {
    pub point: CrashPoint,
    pub run_id: String,
    pub step: u32,
    /// Only this attempt; `None`: the first to reach the point.
    pub attempt: Option<u32>,
}

/// A planned crash at a seeded random point: every point reached draws.
pub(super) struct RandomCrash {
    pub rng: Rng,
    pub per_mille: u64,
}

/// The kit's state, shared by the runner and hook wrappers, the probe and
/// the kit.
pub(super) struct Shared {
    pub calls: Mutex<Calls>,
    pub hooks: Mutex<BTreeMap<String, u32>>,
    pub armed: Mutex<Vec<Armed>>,
    pub random: Mutex<Option<RandomCrash>>,
    /// Steps whose lease lapses while their runner runs (once each).
    pub lapses: Mutex<Vec<(String, u32)>>,
    /// Set when a crash struck the current process.
    pub crashed: watch::Sender<Option<CrashReport>>,
    /// The current process's store handle and queue.
    pub store: Mutex<Option<Arc<FaultStore>>>,
    pub queue: Mutex<Option<Arc<Queue>>>,
    pub incarnation: AtomicU32,
    /// Bumped by every call, return, settlement and hook call.
    pub activity: AtomicU64,
    pub clock: MockClock,
    pub lease: Duration,
}

impl Shared {
    pub(super) fn new(clock: MockClock, lease: Duration) -> Self {
        Self {
            calls: Mutex::default(),
            hooks: Mutex::default(),
            armed: Mutex::default(),
            random: Mutex::default(),
            lapses: Mutex::default(),
            crashed: watch::Sender::new(None),
            store: Mutex::default(),
            queue: Mutex::default(),
            incarnation: AtomicU32::new(0),
            activity: AtomicU64::new(0),
            clock,
            lease,
        }
    }

    fn bump(&self) {
        self.activity.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the current process is dead (a crash struck it).
    fn dead(&self) -> bool {
        self.crashed.borrow().is_some()
    }

    /// A step reached `point`: whether its process crashes here. A crash
    /// severs the process's store at once, so nothing it does later
    /// reaches the store; the caller then never returns.
    fn reach(&self, point: CrashPoint, run_id: &str, step: u32, attempt: u32) -> bool {
        if self.dead() {
            return true;
        }
        let targeted = {
            let mut armed = lock(&self.armed);
            let hit = armed.iter().position(|a| {
                a.point == point
                    && a.run_id == run_id
                    && a.step == step
                    && a.attempt.is_none_or(|n| n == attempt)
            });
            hit.map(|i| armed.remove(i)).is_some()
        };
        let strikes = targeted || {
            let mut random = lock(&self.random);
            let drawn = random.as_mut().is_some_and(|r| r.rng.chance(r.per_mille));
            if drawn {
                *random = None;
            }
            drawn
        };
        if !strikes {
            return false;
        }
        if let Some(store) = &*lock(&self.store) {
            store.sever();
        }
        let incarnation = self.incarnation.load(Ordering::SeqCst);
        self.cut_calls(incarnation, point, run_id, step, attempt);
        self.crashed.send_replace(Some(CrashReport {
            point,
            run_id: run_id.to_string(),
            step,
            attempt,
            incarnation,
        }));
        self.bump();
        true
    }

    /// Mark the calls of a crashed process whose settlement was not
    /// durable: the one at the crash point with the point, the others as
    /// cut while they ran (or after they returned).
    fn cut_calls(
        &self,
        incarnation: u32,
        point: CrashPoint,
        run_id: &str,
        step: u32,
        attempt: u32,
    ) {
        let mut calls = lock(&self.calls);
        for ((run, n), list) in calls.iter_mut() {
            for call in list.iter_mut().filter(|c| c.incarnation == incarnation) {
                let here = run == run_id && *n == step && call.attempt == attempt;
                if here && !call.committed {
                    call.end = CallEnd::Crashed(point);
                } else if !call.committed {
                    call.end = match call.end {
                        CallEnd::Running => CallEnd::Crashed(CrashPoint::WhileRunning),
                        CallEnd::Returned => CallEnd::Crashed(CrashPoint::AfterRunner),
                        ref other => other.clone(),
                    };
                }
            }
        }
    }

    fn record_call(&self, step: &Step) {
        let call = Call {
            attempt: step.attempts,
            job_id: step.job_id.clone(),
            incarnation: self.incarnation.load(Ordering::SeqCst),
            end: CallEnd::Running,
            committed: false,
        };
        lock(&self.calls)
            .entry((step.run_id.clone(), step.step_number))
            .or_default()
            .push(call);
    }

    /// Update the call of `step` (this process's, this claim's).
    fn update_call(
        &self,
        run_id: &str,
        n: u32,
        job_id: &str,
        attempt: u32,
        f: impl FnOnce(&mut Call),
    ) {
        let incarnation = self.incarnation.load(Ordering::SeqCst);
        let mut calls = lock(&self.calls);
        if let Some(call) = calls.get_mut(&(run_id.to_string(), n)).and_then(|list| {
            list.iter_mut().rev().find(|c| {
                c.job_id == job_id && c.attempt == attempt && c.incarnation == incarnation
            })
        }) {
            f(call);
        }
    }

    /// Lapse the lease of this step's claim if a lapse is planned for it:
    /// the clock moves past the lease and the reaper takes the job back,
    /// while the runner has not started yet.
    async fn maybe_lapse(&self, run_id: &str, step: u32) {
        let planned = {
            let mut lapses = lock(&self.lapses);
            let hit = lapses.iter().position(|(r, s)| r == run_id && *s == step);
            hit.map(|i| lapses.remove(i)).is_some()
        };
        if !planned {
            return;
        }
        let queue = lock(&self.queue).clone();
        self.clock
            .advance(self.lease.saturating_add(Duration::from_millis(1)));
        if let Some(queue) = queue
            && let Err(e) = queue.reap_now().await
        {
            tracing::warn!("the test kit's reap (a lapsed lease) failed: {e}");
        }
    }
}

/// The user's runner as the kit runs it: every call recorded, and crashes
/// struck at the points planned. The kit builds the runtime with it.
pub struct KitRunner<R> {
    pub(super) inner: Arc<R>,
    pub(super) shared: Arc<Shared>,
}

impl<R> Clone for KitRunner<R> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<R: StepRunner> StepRunner for KitRunner<R> {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        let shared = &self.shared;
        let (run_id, n, attempt) = (step.run_id.as_str(), step.step_number, step.attempts);
        shared.record_call(step);
        shared.bump();
        if shared.reach(CrashPoint::BeforeRunner, run_id, n, attempt) {
            return std::future::pending().await;
        }
        shared.maybe_lapse(run_id, n).await;
        // Poll the runner; at its first suspension, the "while it runs"
        // point.
        let mut ran = pin!(self.inner.run_step(step));
        let mut suspended = false;
        let result = std::future::poll_fn(|cx| match ran.as_mut().poll(cx) {
            Poll::Ready(result) => Poll::Ready(Some(result)),
            Poll::Pending if !suspended => {
                suspended = true;
                if shared.reach(CrashPoint::WhileRunning, run_id, n, attempt) {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                }
            }
            Poll::Pending => Poll::Pending,
        })
        .await;
        let Some(result) = result else {
            return std::future::pending().await;
        };
        if !suspended && shared.reach(CrashPoint::WhileRunning, run_id, n, attempt) {
            return std::future::pending().await;
        }
        let end = match &result {
            Ok(_) => CallEnd::Returned,
            Err(e) => CallEnd::Errored(e.message.clone()),
        };
        if !shared.dead() {
            shared.update_call(run_id, n, &step.job_id, attempt, |c| c.end = end);
        }
        shared.bump();
        if shared.reach(CrashPoint::AfterRunner, run_id, n, attempt) {
            return std::future::pending().await;
        }
        result
    }
}

/// The user's hook as the kit runs it: its calls counted per run.
pub struct KitHook<H> {
    pub(super) inner: Arc<H>,
    pub(super) shared: Arc<Shared>,
}

impl<H> Clone for KitHook<H> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<H: TerminalHook> TerminalHook for KitHook<H> {
    async fn on_termination(&self, outcome: &RunOutcome) -> Result<(), StepError> {
        if self.shared.dead() {
            return std::future::pending().await;
        }
        *lock(&self.shared.hooks)
            .entry(outcome.run_id.clone())
            .or_default() += 1;
        self.shared.bump();
        self.inner.on_termination(outcome).await
    }
}

/// The worker's probe: records committed settlements, and crashes after
/// one when planned.
pub(super) struct KitProbe(pub Arc<Shared>);

impl Probe for KitProbe {
    fn settled(
        &self,
        job_id: &str,
        run_id: &str,
        step: u32,
        attempt: u32,
    ) -> BoxFuture<'static, ()> {
        let shared = &self.0;
        if !shared.dead() {
            shared.update_call(run_id, step, job_id, attempt, |c| c.committed = true);
        }
        shared.bump();
        if shared.reach(CrashPoint::AfterSettlement, run_id, step, attempt) {
            return Box::pin(std::future::pending());
        }
        Box::pin(std::future::ready(()))
    }
}

/// The report a crash check gives: calls of a step, formatted.
pub(super) fn describe(calls: &[Call]) -> String {
    calls
        .iter()
        .map(|c| {
            format!(
                "attempt {} in process {}: {:?}{}",
                c.attempt,
                c.incarnation,
                c.end,
                if c.committed { ", committed" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
