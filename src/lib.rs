//! # Waymark: durable workflows on object storage
//!
//! Waymark runs multi-step workflows that survive crashes, with all state in
//! object storage (a local directory, or S3-compatible storage) through the
//! [`taquba`] queue. There is no server to run: the runtime is a library in
//! your service.
//!
//! ## The model
//!
//! - A **run** is a chain of **steps**. You write a [`StepRunner`]: given a
//!   [`Step`] (its number, payload and headers), it returns a
//!   [`StepOutcome`] — continue with a payload (now, after a delay, or when
//!   a signal arrives), succeed with a result, fail, or cancel.
//! - Each step is a queue job. The worker pool ([`WorkflowRuntime::run`])
//!   claims step jobs, calls your runner, and commits what it returned **in
//!   the same transaction that settles the step's job**: the next step, the
//!   run's record, or the run's terminal record and hook notification. One
//!   awaited commit per step.
//! - So a process killed at any instant loses nothing: on restart every run
//!   resumes at its last committed step. A step that committed never runs
//!   again; only a step that was in flight at the crash runs once more.
//! - When a run ends, your [`TerminalHook`] is called, at least once.
//!
//! ## A complete program
//!
//! ```no_run
//! use std::sync::Arc;
//! use waymark::{NoopTerminalHook, RunSpec, Step, StepError, StepOutcome, StepRunner, WorkflowRuntime};
//!
//! /// Counts down from the number in the input, one step per tick.
//! struct Countdown;
//!
//! impl StepRunner for Countdown {
//!     async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
//!         let n: u32 = std::str::from_utf8(&step.payload)
//!             .ok()
//!             .and_then(|s| s.parse().ok())
//!             .ok_or_else(|| StepError::permanent("input is not a number"))?;
//!         Ok(if n == 0 {
//!             StepOutcome::Succeed { result: b"liftoff".to_vec() }
//!         } else {
//!             StepOutcome::Continue { payload: (n - 1).to_string().into_bytes() }
//!         })
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), waymark::Error> {
//!     // A local directory; use taquba::open_url for s3://... in production.
//!     let store = Arc::new(taquba::object_store::local::LocalFileSystem::new_with_prefix("./data")
//!         .map_err(taquba::Error::from)?);
//!     let queue = Arc::new(taquba::Queue::open(store, "waymark").await?);
//!     let runtime = WorkflowRuntime::builder(queue, Countdown, NoopTerminalHook).build()?;
//!
//!     let worker = tokio::spawn({
//!         let runtime = runtime.clone();
//!         async move { runtime.run(async { let _ = tokio::signal::ctrl_c().await; }).await }
//!     });
//!
//!     // Idempotent: running this program twice attaches to the same run.
//!     let run = runtime
//!         .submit(RunSpec { run_id: Some("countdown-1".into()), input: b"3".to_vec(), ..Default::default() })
//!         .await?;
//!     let outcome = runtime.wait(&run.run_id).await?;
//!     println!("{:?}: {:?}", outcome.status, outcome.result);
//!     worker.abort();
//!     Ok(())
//! }
//! ```
//!
//! ## Guarantees, and what they cost
//!
//! - **Submit** commits step 0 and the run's records in one transaction and
//!   is idempotent on `(run_id, input)` — within a process, across restarts,
//!   and after the run ended (for the retention window).
//! - **Transitions**: a non-terminal step costs one awaited commit, shared
//!   with other steps that settle in the same WAL flush
//!   (`taquba::OpenOptions::flush_interval`), so latency follows the flush
//!   interval and throughput follows concurrency.
//! - **Failures**: a [`StepError::transient`] retries after a jittered,
//!   growing delay ([`RetryPolicy`], per workflow) until the step's attempts
//!   run out; a [`StepError::permanent`] dead-letters the step. Either way
//!   the run ends `Failed` with a hook. A failing attempt costs one commit.
//! - **Circuit breaker** ([`BackoffPolicy`], per workflow): consecutive
//!   failures back the workflow off, then trip it; its steps park without
//!   holding workers or spending attempts until
//!   [`WorkflowRuntime::reset_workflow`] or a successful probe. Health
//!   ([`WorkflowRuntime::workflow_health`]) commits with the settlements
//!   that change it.
//! - **Crashes**: a committed step never runs again, and no step or hook
//!   acts on a commit before it is durable. **Outages**: a commit that waits
//!   longer than `store_timeout` makes [`WorkflowRuntime::run`] return
//!   [`Error::StoreUnavailable`] rather than hang.
//! - **Cancel** ([`WorkflowRuntime::cancel`]) removes a waiting step at once;
//!   a running step sees its [`Step::cancel_token`] fire and its result is
//!   discarded. The request is durable: a restart still ends the run
//!   `Cancelled` without running the step again.
//! - **Signals** ([`StepOutcome::WaitForSignal`]): the next step waits,
//!   holding no worker and spending no attempt, until
//!   [`WorkflowRuntime::signal`] (or [`Client::signal`], `waymark signal`)
//!   wakes it with [`Step::signal`] set, or its timeout passes. A signal for
//!   a run that is not waiting is [`Error::NotWaiting`], never buffered.
//! - **Staged effects** ([`Step::effects`]): application KV writes and
//!   enqueues commit in the settlement of the outcome the runner returned,
//!   and are discarded on an error or an external cancel.
//! - **Schedules** ([`Schedule`]: every N seconds, cron, manual): each due
//!   time fires exactly once — the run is submitted in the transaction that
//!   records the fire and arms the next one — across crashes and restarts,
//!   gated by the workflow's breaker; see [`WorkflowRuntime::schedules`] and
//!   [`WorkflowRuntime::trigger`].
//! - **Bad input** is a typed [`Error`] before anything is written; a job on
//!   the step queue that is not a valid step is dead-lettered with a clear
//!   reason, and the pool keeps going.
//!
//! ## Other processes
//!
//! One process, the **worker**, owns a store: it opens it with
//! [`open_worker_store`] (from a [`StoreLocation`]: `file://`, `s3://` or
//! `memory://`, or any `ObjectStore`), which switches on what other
//! processes rely on — taquba's inbox for the control queue, a liveness
//! heartbeat, the flush interval — and marks the store as a Waymark store.
//! Its [`WorkflowRuntime::run`] applies their requests beside its steps.
//!
//! Any other process opens a [`Client`] on the same location. It holds no
//! writer, so it never fences the worker:
//!
//! - **Requests** ([`Client::submit`], [`Client::cancel`],
//!   [`Client::signal`]) are checked as
//!   the runtime checks them, then written as one inbox object each, named
//!   by a request id: sent again with the same id, a request is applied
//!   once. The worker applies each through its own
//!   [`WorkflowRuntime::submit`] / [`WorkflowRuntime::cancel`] — the same
//!   code path and guarantees as an in-process call — and writes a reply
//!   ([`Client::wait_reply`]): the run exists, or the typed refusal
//!   ([`Error::InputMismatch`], [`Error::RequestRefused`]). A new run's
//!   reply commits in the run's own transaction, so a worker killed at any
//!   moment applies each request exactly once. Schedules are driven the
//!   same way ([`Client::trigger`], [`Client::pause`], [`Client::resume`],
//!   applied through [`WorkflowRuntime::trigger`] and its pause/resume, the
//!   reply committing with the change; refusals come back as
//!   [`Error::ScheduleNotFound`], [`Error::WorkflowTripped`],
//!   [`Error::ScheduleOverlap`], [`Error::ShuttingDown`]).
//! - **Reads** ([`Client::status`], [`Client::outcome`], [`Client::wait`],
//!   [`Client::runs`], [`Client::workflows`], [`Client::schedule`],
//!   [`Client::schedules`]) go through a taquba
//!   `QueueReader` and share their code with the runtime's own: the same
//!   answers, lagging by the worker's flush interval plus the client's
//!   [`ClientOptions::refresh_interval`] (default 500 ms).
//!
//! A request's latency is bounded by the worker's inbox touch poll
//! ([`StoreOptions::inbox_touch_poll`], default 250 ms), its flush interval
//! and the client's refresh interval; `BENCHMARKS.md` has the numbers.
//!
//! ## A fleet of workers on one bucket
//!
//! One store has one writer, so several worker processes split the work:
//! a [`fleet`] is a prefix holding `N` stores (shards). A run lives on the
//! shard of its root id (FNV-1a, so every process agrees without asking;
//! children share their parent's shard). Each [`fleet::FleetWorker`] takes
//! a fair share of the shards through lease objects in the bucket (created
//! with conditional writes: a store that ignores them is refused), stops
//! writing to a shard before its lease can lapse, and takes over a dead
//! worker's shards after the lease and a guard time; SlateDB's fencing is
//! the last line. [`fleet::FleetClient`] routes each request to its run's
//! shard. Every shard's runtime may be given the same schedules: each
//! fires on its home shard only ([`fleet::shard_of_schedule`]).
//! `waymark worker --shards N` and `waymark fleet` are the CLI's face;
//! `ARCHITECTURE.md` has the protocol and its timing assumptions.
//!
//! ```no_run
//! use waymark::fleet::{FleetClient, FleetWorker};
//! use waymark::*;
//!
//! # struct MyRunner;
//! # impl StepRunner for MyRunner {
//! #     async fn run_step(&self, _: &Step) -> Result<StepOutcome, StepError> {
//! #         Ok(StepOutcome::Succeed { result: vec![] })
//! #     }
//! # }
//! # async fn demo() -> Result<(), Error> {
//! let bucket = StoreLocation::from_url("s3://my-bucket/orders")?;
//! // In each worker process: 8 shards (fixed when the fleet is created).
//! let worker = FleetWorker::new(bucket.clone(), 8, |_shard, queue| {
//!     WorkflowRuntime::builder(queue, MyRunner, NoopTerminalHook).build()
//! });
//! tokio::spawn(worker.run(async { tokio::signal::ctrl_c().await.ok(); }));
//! // In any process: submit and observe, routed by run id.
//! let client = FleetClient::open(&bucket, ClientOptions::default()).await?;
//! client.submit(RunSpec { run_id: Some("order-42".into()), ..Default::default() }).await?;
//! # Ok(()) }
//! ```
//!
//! ## Testing your workflows for crashes
//!
//! The `testkit` feature adds `waymark::testkit`: your runner and hook on
//! this runtime over an in-memory store with a mock clock, crashes at named
//! points of a step (losing exactly what a kill loses), seeded store faults,
//! a record of every step's calls, and a helper that SIGKILLs a real worker
//! process at seeded moments. Its module docs are the guide; Waymark's own
//! crash tests use it.
//!
//! ## Features
//!
//! - `cli` (default): the `waymark` binary, and the dependencies only it
//!   uses (HTTP server, argument parser, progress bars, the Prometheus
//!   exporter, log output). A service embedding the library turns it off:
//!   `waymark = { version = "0.1", default-features = false }`.
//! - `testkit`: the test kit above.
//!
//! See `ARCHITECTURE.md` for the modules, the path of one step, and the
//! path of a client's request.

#![deny(missing_docs)]

mod backpressure;
mod breaker;
mod children;
mod client;
mod control;
mod effects;
mod error;
pub mod fleet;
pub mod gc;
mod history;
mod hook;
mod lapsed;
pub mod memo;
mod pending;
mod policy;
#[cfg(feature = "testkit")]
mod probe;
mod read;
mod record;
mod route;
mod runner;
mod runtime;
mod schedule;
mod store;
mod sync;
#[cfg(feature = "testkit")]
pub mod testkit;
mod worker;

pub use breaker::{BreakerEvent, BreakerStatus, WorkflowHealth};
pub use client::{Client, ClientOptions, Sent};
pub use control::{MAX_REQUEST_ID_LEN, Reply, validate_request_id};
pub use effects::{MAX_EFFECT_KEY_BYTES, RESERVED_KEY_PREFIX, StagedEffects};
pub use error::Error;
pub use history::{
    AttemptOutcome, DEFAULT_HISTORY_ENTRIES, HEADER_HISTORY, MAX_HISTORY_ERROR_BYTES, RunHistory,
    StepAttempt, StepHistory,
};
pub use hook::{ChildOutcome, NoopTerminalHook, RunOutcome, TerminalHook, TerminalStatus};
pub use memo::Memo;
pub use policy::{BackoffPolicy, RetryPolicy};
pub use read::{
    DEFAULT_RUN_PAGE, DeadJob, DeadKind, MAX_DEAD_JOB_PAGE, RunFilter, RunPage, RunPhase, RunState,
    RunStatus, RunSummary, StateFilter, UnreadableRun,
};
pub use record::{
    DEFAULT_WORKFLOW, HEADER_ATTEMPTS_BEFORE, HEADER_DEADLINE, HEADER_JOIN, HEADER_PARENT,
    HEADER_PARKED, HEADER_RUN_ID, HEADER_SEGMENT, HEADER_SIGNAL, HEADER_SIGNAL_SENDER, HEADER_STEP,
    HEADER_WORKFLOW, MAX_CHILDREN, MAX_HEADERS_BYTES, MAX_KEPT_INPUT_BYTES, MAX_PAYLOAD_BYTES,
    MAX_RESULT_BYTES, MAX_RUN_ID_LEN, MAX_SIGNAL_BYTES, RESERVED_HEADER_PREFIX, validate_headers,
    validate_name,
};
pub use runner::{ChildSpec, Step, StepError, StepErrorKind, StepOutcome, StepRunner};
pub use runtime::{Deadline, RunSpec, SubmitOutcome, WorkflowRuntime, WorkflowRuntimeBuilder};
pub use schedule::{Downtime, LastRun, Overlap, Schedule, ScheduleInfo, ScheduleKind};
pub use store::{
    DEFAULT_QUEUE_NAME, STORE_FORMAT, StoreLocation, StoreOptions, control_queue_name,
    open_worker_store,
};

/// The queue crate Waymark stores its state in, re-exported so callers use
/// the same version (`waymark::taquba::Queue`, `waymark::taquba::object_store`).
pub use taquba;

/// The README's example, compiled as a doc test so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
