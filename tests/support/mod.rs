//! Shared test harness: a closure runner that counts calls, a recording
//! hook, a gate, and an environment over an in-memory store with a
//! `MockClock`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taquba::object_store::ObjectStore;
use taquba::object_store::memory::InMemory;
use taquba::{MockClock, OpenOptions, Queue, QueueConfig};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use waymark::*;

pub type StepFn = dyn Fn(Step) -> Pin<Box<dyn Future<Output = Result<StepOutcome, StepError>> + Send>>
    + Send
    + Sync;

/// A runner defined by a closure, counting calls per (run, step).
#[derive(Clone)]
pub struct FnRunner {
    f: Arc<StepFn>,
    calls: Arc<Mutex<HashMap<(String, u32), u32>>>,
}

impl FnRunner {
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(Step) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<StepOutcome, StepError>> + Send + 'static,
    {
        Self {
            f: Arc::new(move |s| Box::pin(f(s))),
            calls: Arc::default(),
        }
    }

    pub fn calls(&self, run: &str, step: u32) -> u32 {
        *self
            .calls
            .lock()
            .unwrap()
            .get(&(run.to_string(), step))
            .unwrap_or(&0)
    }
}

impl StepRunner for FnRunner {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        *self
            .calls
            .lock()
            .unwrap()
            .entry((step.run_id.clone(), step.step_number))
            .or_default() += 1;
        (self.f)(step.clone()).await
    }
}

/// A hook that records every outcome it is given.
#[derive(Clone, Default)]
pub struct RecordingHook {
    seen: Arc<Mutex<Vec<RunOutcome>>>,
    notify: Arc<Notify>,
}

impl RecordingHook {
    pub fn count(&self, run: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.run_id == run)
            .count()
    }

    pub async fn wait_for(&self, run: &str) -> RunOutcome {
        loop {
            let notified = self.notify.notified();
            if let Some(o) = self
                .seen
                .lock()
                .unwrap()
                .iter()
                .find(|o| o.run_id == run)
                .cloned()
            {
                return o;
            }
            notified.await;
        }
    }
}

impl TerminalHook for RecordingHook {
    async fn on_termination(&self, outcome: &RunOutcome) -> Result<(), StepError> {
        self.seen.lock().unwrap().push(outcome.clone());
        self.notify.notify_waiters();
        Ok(())
    }
}

/// A one-shot gate a runner waits on and the test opens.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Notify, std::sync::atomic::AtomicBool)>);

impl Gate {
    pub fn open(&self) {
        self.0.1.store(true, Ordering::SeqCst);
        self.0.0.notify_waiters();
    }
    pub async fn wait(&self) {
        loop {
            let n = self.0.0.notified();
            if self.0.1.load(Ordering::SeqCst) {
                return;
            }
            n.await;
        }
    }
}

pub const T0: u64 = 1_800_000_000_000;

pub async fn open_queue(store: Arc<dyn ObjectStore>, clock: &MockClock) -> Arc<Queue> {
    let opts = OpenOptions {
        clock: Arc::new(clock.clone()),
        flush_interval: Some(Duration::from_millis(1)),
        // Retries requeue at once, so attempt counts need no clock moves.
        default_queue_config: QueueConfig::default().retry_backoff_base(Duration::ZERO),
        ..OpenOptions::default()
    };
    Arc::new(
        Queue::open_with_options(store, "wm-test", opts)
            .await
            .unwrap(),
    )
}

/// A runtime builder whose retries run at once (attempt counts need no
/// clock moves).
pub fn builder<H: TerminalHook>(
    queue: Arc<Queue>,
    runner: FnRunner,
    hook: H,
) -> WorkflowRuntimeBuilder<FnRunner, H> {
    WorkflowRuntime::builder(queue, runner, hook).default_retry_policy(RetryPolicy {
        initial: Duration::ZERO,
        ..RetryPolicy::default()
    })
}

pub struct Env<H: TerminalHook + Clone> {
    pub store: Arc<dyn ObjectStore>,
    pub clock: MockClock,
    pub rt: WorkflowRuntime<FnRunner, H>,
    pub worker: Option<JoinHandle<Result<(), Error>>>,
    pub stop: Arc<Notify>,
    configure: Arc<Configure<H>>,
}

/// Extra builder settings an `Env` applies to every runtime it builds.
pub type Configure<H> = dyn Fn(WorkflowRuntimeBuilder<FnRunner, H>) -> WorkflowRuntimeBuilder<FnRunner, H>
    + Send
    + Sync;

impl<H: TerminalHook + Clone> Env<H> {
    pub async fn new(runner: FnRunner, hook: H) -> Self {
        Self::configured(runner, hook, |b| b).await
    }

    /// An environment whose runtimes get `configure`'s extra settings.
    pub async fn configured(
        runner: FnRunner,
        hook: H,
        configure: impl Fn(WorkflowRuntimeBuilder<FnRunner, H>) -> WorkflowRuntimeBuilder<FnRunner, H>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let clock = MockClock::new(T0);
        let queue = open_queue(store.clone(), &clock).await;
        let rt = configure(builder(queue, runner, hook)).build().unwrap();
        Self {
            store,
            clock,
            rt,
            worker: None,
            stop: Arc::new(Notify::new()),
            configure: Arc::new(configure),
        }
    }

    pub fn start(&mut self) {
        let rt = self.rt.clone();
        let stop = self.stop.clone();
        self.worker = Some(tokio::spawn(async move {
            rt.run(async move { stop.notified().await }).await
        }));
    }

    /// Stop the worker gracefully (drains in-flight steps).
    pub async fn stop(&mut self) {
        self.stop.notify_one();
        if let Some(w) = self.worker.take() {
            w.await.unwrap().unwrap();
        }
    }

    /// Simulate a crash: drop the worker mid-step, then open a fresh queue
    /// and runtime on the same store (which fences the old one).
    pub async fn crash_and_reopen(&mut self, runner: FnRunner, hook: H) {
        // Claims commit without awaiting the WAL flush. An awaited write
        // flushes everything before it, so the crash strikes at a
        // deterministic point: after all the old process's commits.
        self.rt
            .queue()
            .kv_put(b"test/flush-barrier", b"")
            .await
            .unwrap();
        if let Some(w) = self.worker.take() {
            w.abort();
            let _ = w.await;
        }
        let queue = open_queue(self.store.clone(), &self.clock).await;
        self.rt = (self.configure)(builder(queue, runner, hook))
            .build()
            .unwrap();
    }

    /// The queue clock's now, in ms.
    pub fn clock_now(&self) -> u64 {
        use taquba::Clock;
        self.clock.now_ms()
    }

    pub fn queue(&self) -> &Arc<Queue> {
        self.rt.queue()
    }

    pub async fn submit(&self, id: &str, input: &[u8]) -> SubmitOutcome {
        self.rt
            .submit(RunSpec {
                run_id: Some(id.into()),
                input: input.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
    }

    /// Wait (bounded) until the run's status satisfies `pred`.
    pub async fn until_status(&self, id: &str, pred: impl Fn(Option<&RunStatus>) -> bool) {
        for _ in 0..10_000 {
            if pred(self.rt.status(id).await.unwrap().as_ref()) {
                return;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("status of {id} never matched");
    }
}
