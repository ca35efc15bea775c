//! The two sides of every comparison, each on a fresh store of its own:
//! Waymark (`WorkflowRuntime` with an echo runner) and the minimal
//! equivalent written directly against taquba.

use std::sync::Arc;
use std::time::Duration;

use taquba::object_store::local::LocalFileSystem;
use taquba::object_store::memory::InMemory;
use taquba::{
    Claim, EnqueueOptions, EnqueueRequest, EnqueueResult, OpenOptions, Queue, SettlementEffects,
};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use waymark::{
    NoopTerminalHook, RunSpec, RunState, Step, StepError, StepOutcome, StepRunner, TerminalStatus,
    WorkflowRuntime,
};

use crate::plan::{Next, Plan, UNTIL_FINISH, input};

/// The object store under a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// `taquba::object_store::memory::InMemory`.
    Memory,
    /// `taquba::object_store::local::LocalFileSystem` in a fresh tempdir.
    Local,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Local => "local",
        }
    }
}

/// Store type and WAL flush interval: the same for both sides of a
/// comparison.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub store: StoreKind,
    pub flush: Duration,
}

impl Setup {
    pub fn label(&self) -> String {
        format!("{} {}ms", self.store.name(), self.flush.as_millis())
    }
}

/// Which side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Waymark,
    Raw,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Waymark => "waymark",
            Side::Raw => "raw taquba",
        }
    }
}

/// Both sides poll an idle queue this often (Waymark's default).
const POLL: Duration = Duration::from_millis(250);
const RAW_QUEUE: &str = "raw-steps";
const WAYMARK_QUEUE: &str = "workflow-steps";
/// The probe runs' own queue, when they have one ([`Engine::probe_queue`]).
const RAW_PROBE_QUEUE: &str = "raw-probes";
const WAYMARK_PROBE_QUEUE: &str = "workflow-probes";
/// Worker slots for the probe runs' own queue.
const PROBE_CONCURRENCY: usize = 4;
const PRIORITY_PROBE: u32 = 0;

async fn open_queue(setup: Setup) -> (Arc<Queue>, Option<tempfile::TempDir>) {
    let (store, dir): (Arc<dyn taquba::object_store::ObjectStore>, _) = match setup.store {
        StoreKind::Memory => (Arc::new(InMemory::new()), None),
        StoreKind::Local => {
            let dir = tempfile::tempdir().expect("tempdir");
            let fs = LocalFileSystem::new_with_prefix(dir.path()).expect("local store");
            (Arc::new(fs), Some(dir))
        }
    };
    let opts = OpenOptions {
        flush_interval: Some(setup.flush),
        ..Default::default()
    };
    let queue = Queue::open_with_options(store, "bench", opts)
        .await
        .expect("open queue");
    (Arc::new(queue), dir)
}

/// Waymark's runner: the shared plan.
pub struct Echo(Arc<Plan>);

impl StepRunner for Echo {
    async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
        Ok(
            match self
                .0
                .on_step(&step.run_id, step.step_number, &step.payload)
            {
                Next::Continue(payload) => StepOutcome::Continue { payload },
                Next::Finish => StepOutcome::Succeed {
                    result: b"ok".to_vec(),
                },
            },
        )
    }
}

type Runtime = WorkflowRuntime<Echo, NoopTerminalHook>;

fn waymark_runtime(queue: &Arc<Queue>, plan: &Arc<Plan>, name: &str, slots: usize) -> Runtime {
    WorkflowRuntime::builder(queue.clone(), Echo(plan.clone()), NoopTerminalHook)
        .queue_name(name)
        .max_concurrent_steps(slots)
        .poll_interval(POLL)
        .step_history(step_history())
        .keep_step_inputs(keep_step_inputs())
        .build()
        .expect("build runtime")
}

/// One side on its own fresh queue and store.
pub struct Engine {
    pub side: Side,
    pub plan: Arc<Plan>,
    queue: Arc<Queue>,
    runtime: Option<Runtime>,
    /// Set by [`Self::probe_queue`]: the probe runs have a queue and a
    /// worker pool of their own (Waymark: a runtime of their own).
    probes_apart: bool,
    probe_runtime: Option<Runtime>,
    concurrency: usize,
    _dir: Option<tempfile::TempDir>,
}

/// A running worker pool (two, when the probes have their own queue).
pub struct Pool {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Pool {
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("worker pool task");
        }
    }
}

impl Engine {
    pub async fn open(side: Side, setup: Setup, plan: Arc<Plan>, concurrency: usize) -> Self {
        let (queue, dir) = open_queue(setup).await;
        let runtime = match side {
            Side::Waymark => Some(waymark_runtime(&queue, &plan, WAYMARK_QUEUE, concurrency)),
            Side::Raw => None,
        };
        Self {
            side,
            plan,
            queue,
            runtime,
            probes_apart: false,
            probe_runtime: None,
            concurrency,
            _dir: dir,
        }
    }

    /// The probe runs' own queue, if they have one.
    pub fn probe_queue_name(&self) -> Option<&'static str> {
        self.probes_apart.then_some(match self.side {
            Side::Waymark => WAYMARK_PROBE_QUEUE,
            Side::Raw => RAW_PROBE_QUEUE,
        })
    }

    /// Give the probe runs a queue of their own, served by a pool of
    /// [`PROBE_CONCURRENCY`] slots beside the main one (Waymark: a second
    /// runtime on the same store, with its own `queue_name`).
    pub fn probe_queue(mut self) -> Self {
        self.probes_apart = true;
        if self.side == Side::Waymark {
            self.probe_runtime = Some(waymark_runtime(
                &self.queue,
                &self.plan,
                WAYMARK_PROBE_QUEUE,
                PROBE_CONCURRENCY,
            ));
        }
        self
    }

    /// The runtime that holds `probe` runs (Waymark).
    fn runtime_for(&self, probe: bool) -> Option<&Runtime> {
        match &self.probe_runtime {
            Some(rt) if probe => Some(rt),
            _ => self.runtime.as_ref(),
        }
    }

    /// The step queue's name (the label of its ack counter).
    pub fn queue_name(&self) -> &'static str {
        match self.side {
            Side::Waymark => WAYMARK_QUEUE,
            Side::Raw => RAW_QUEUE,
        }
    }

    /// Submit a run; `true` when it is new. `probe` runs go first in line.
    pub async fn submit(&self, run_id: &str, probe: bool) -> bool {
        match self.runtime_for(probe) {
            Some(rt) => {
                rt.submit(RunSpec {
                    run_id: Some(run_id.to_string()),
                    input: input(),
                    priority: probe.then_some(PRIORITY_PROBE),
                    ..Default::default()
                })
                .await
                .expect("submit")
                .newly_submitted
            }
            None => {
                let options = step_options(run_id, 0, probe.then_some(PRIORITY_PROBE));
                let effects =
                    SettlementEffects::default().kv_put(run_key(run_id), 0u32.to_le_bytes());
                let queue = if probe && self.probes_apart {
                    RAW_PROBE_QUEUE
                } else {
                    RAW_QUEUE
                };
                let (result, _) = self
                    .queue
                    .enqueue_with_effects(queue, input(), options, effects)
                    .await
                    .expect("enqueue");
                matches!(result, EnqueueResult::New(_))
            }
        }
    }

    /// Start the worker pool.
    pub fn start(&self) -> Pool {
        let stop = CancellationToken::new();
        let waymark = |rt: &Runtime| {
            let rt = rt.clone();
            let stopped = stop.clone();
            tokio::spawn(async move {
                rt.run(async move { stopped.cancelled().await })
                    .await
                    .expect("waymark pool");
            })
        };
        let raw = |queue: &'static str, slots: usize| {
            tokio::spawn(raw_pool(
                self.queue.clone(),
                queue,
                slots,
                self.plan.clone(),
                stop.clone(),
            ))
        };
        let mut tasks = Vec::new();
        match &self.runtime {
            Some(rt) => {
                tasks.push(waymark(rt));
                tasks.extend(self.probe_runtime.as_ref().map(waymark));
            }
            None => {
                tasks.push(raw(RAW_QUEUE, self.concurrency));
                if self.probes_apart {
                    tasks.push(raw(RAW_PROBE_QUEUE, PROBE_CONCURRENCY));
                }
            }
        }
        Pool { stop, tasks }
    }

    /// Whether the run ended as the plan says (`Succeeded`, at its last
    /// step when the plan has a fixed length).
    pub async fn completed(&self, run_id: &str, steps_per_run: u32) -> bool {
        match &self.runtime {
            Some(rt) => {
                match rt
                    .outcome(run_id)
                    .await
                    .expect("outcome")
                    .or(match &self.probe_runtime {
                        Some(probes) => probes.outcome(run_id).await.expect("outcome"),
                        None => None,
                    }) {
                    Some(o) => {
                        o.status == TerminalStatus::Succeeded
                            && (steps_per_run == UNTIL_FINISH || o.final_step + 1 == steps_per_run)
                    }
                    None => false,
                }
            }
            None => match self
                .queue
                .view()
                .kv_get(&out_key(run_id))
                .await
                .expect("kv")
            {
                Some(v) => {
                    let last = u32::from_le_bytes(v[..4].try_into().unwrap());
                    steps_per_run == UNTIL_FINISH || last + 1 == steps_per_run
                }
                None => false,
            },
        }
    }

    /// Whether the run was submitted and waits at step 0.
    pub async fn pending(&self, run_id: &str) -> bool {
        match &self.runtime {
            Some(rt) => matches!(
                rt.status(run_id).await.expect("status"),
                Some(s) if s.state == RunState::Pending && s.current_step == 0
            ),
            None => self
                .queue
                .view()
                .kv_get(&run_key(run_id))
                .await
                .expect("kv")
                .is_some(),
        }
    }

    /// Close the queue (drop the runtime first, so the queue is ours alone).
    pub async fn close(mut self) {
        self.runtime.take();
        self.probe_runtime.take();
        match Arc::try_unwrap(self.queue) {
            Ok(queue) => queue.close().await.expect("close"),
            Err(_) => eprintln!("warning: queue still shared at close; dropped instead"),
        }
    }
}

fn run_key(run_id: &str) -> Vec<u8> {
    format!("run/{run_id}").into_bytes()
}

/// Where a raw run's last step records its number: Waymark's outcome key
/// when the raw side writes like Waymark.
fn out_key(run_id: &str) -> Vec<u8> {
    if raw_writes_like_waymark() {
        format!("wm/workflow-steps/out/{run_id}").into_bytes()
    } else {
        format!("out/{run_id}").into_bytes()
    }
}

fn step_options(run_id: &str, step: u32, priority: Option<u32>) -> EnqueueOptions {
    step_options_unkeyed(run_id, step, priority).dedup_key(format!("{run_id}/{step}"))
}

fn step_options_unkeyed(run_id: &str, step: u32, priority: Option<u32>) -> EnqueueOptions {
    EnqueueOptions::default()
        .header("run", run_id)
        .header("step", step.to_string())
        .priority(priority)
}

/// The raw pool: claim batches sized to the free slots, one task per job,
/// wait for new jobs when the queue is empty (Waymark's pool, minus the
/// workflow layer).
async fn raw_pool(
    queue: Arc<Queue>,
    name: &'static str,
    concurrency: usize,
    plan: Arc<Plan>,
    stop: CancellationToken,
) {
    let lease = queue.queue_config(name).lease_duration;
    let mut set = JoinSet::new();
    loop {
        while set.try_join_next().is_some() {}
        if stop.is_cancelled() {
            break;
        }
        if set.len() >= concurrency {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = set.join_next() => {}
            }
            continue;
        }
        let claims = queue
            .claim_batch(name, concurrency - set.len(), lease)
            .await
            .expect("claim");
        if claims.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = queue.wait_for_jobs_on(name, POLL) => {}
            }
            continue;
        }
        for claim in claims {
            set.spawn(raw_step(queue.clone(), plan.clone(), claim));
        }
    }
    while set.join_next().await.is_some() {}
}

/// One raw step: run the plan, then `ack_with` the follow-up enqueue (with
/// its dedup key) and one KV write; a last step writes one KV record.
async fn raw_step(queue: Arc<Queue>, plan: Arc<Plan>, claim: Claim) {
    let run_id = claim.headers.get("run").cloned().unwrap_or_default();
    let step: u32 = claim
        .headers
        .get("step")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let next = plan.on_step(&run_id, step, &claim.payload);
    if raw_writes_like_waymark() {
        let effects = like_waymark(&queue, &claim, &run_id, step, next);
        queue.ack_with(&claim, effects).await.expect("ack");
        return;
    }
    let effects = match next {
        Next::Continue(payload) => SettlementEffects::default()
            .enqueue(EnqueueRequest {
                queue: claim.queue.to_string(),
                payload,
                options: step_options(&run_id, step + 1, Some(claim.priority)),
            })
            .kv_put(run_key(&run_id), (step + 1).to_le_bytes()),
        Next::Finish => SettlementEffects::default().kv_put(out_key(&run_id), step.to_le_bytes()),
    };
    queue.ack_with(&claim, effects).await.expect("ack");
}

/// Whether the raw side writes what a Waymark step writes
/// (`WAYMARK_BENCH_RAW_WRITES=waymark`): to tell the cost of those writes
/// from the cost of Waymark's own code.
pub fn raw_writes_like_waymark() -> bool {
    // Read once: every raw step asks, and the environment is behind a lock.
    static LIKE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LIKE.get_or_init(|| std::env::var("WAYMARK_BENCH_RAW_WRITES").is_ok_and(|v| v == "waymark"))
}

/// A raw step's settlement with the writes of a Waymark step of this
/// benchmark, by key and value size (as measured at `eb281a6`): a next step
/// job with Waymark's `workflow.*` headers and a caller-chosen id (taquba
/// reads its job index to check it), no dedup key, and its KV records (the
/// run record, the kept input, the history entry); a last step writes the
/// outcome, its retention entry, the history entry and the workflow's
/// tally, and deletes the run record. The two switches that turn a Waymark
/// record off (`WAYMARK_BENCH_STEP_HISTORY=0`, `WAYMARK_BENCH_KEPT_INPUTS=0`)
/// drop it here too, with the history's header.
fn like_waymark(
    queue: &Queue,
    claim: &Claim,
    run_id: &str,
    step: u32,
    next: Next,
) -> SettlementEffects {
    let data = |what: String| format!("wm/workflow-steps/data/{run_id}/{what}").into_bytes();
    let run = format!("wm/workflow-steps/run/{run_id}").into_bytes();
    let history = (step_history() > 0).then(|| data(format!("hist/{step:020}")));
    let mut effects = SettlementEffects::default();
    match next {
        Next::Continue(payload) => {
            let n = (step + 1).to_string();
            let mut options = step_options_unkeyed(run_id, step + 1, Some(claim.priority))
                .header("workflow.name", "default")
                .header("workflow.run_id", run_id)
                .header("workflow.step", n.clone())
                .id_override(queue.next_job_id());
            if let Some(history) = history {
                options = options.header("workflow.history", n);
                effects = effects.kv_put(history, vec![7u8; 132]);
            }
            if keep_step_inputs() {
                effects = effects.kv_put(data(format!("input/{}", step + 1)), vec![7u8; 36]);
            }
            effects
                .enqueue(EnqueueRequest {
                    queue: claim.queue.to_string(),
                    payload,
                    options,
                })
                .kv_put(run, vec![7u8; 43])
        }
        Next::Finish => {
            if let Some(history) = history {
                effects = effects.kv_put(history, vec![7u8; 145]);
            }
            effects
                .kv_put(out_key(run_id), {
                    // The last step's number first, as the check reads it.
                    let mut outcome = vec![7u8; 108];
                    outcome[..4].copy_from_slice(&step.to_le_bytes());
                    outcome
                })
                .kv_put(
                    format!("wm/workflow-steps/exp/00000000{run_id}").into_bytes(),
                    vec![],
                )
                .kv_put(
                    format!("wm/workflow-steps/tally/default/{:032}.{run_id}", 1).into_bytes(),
                    vec![1u8],
                )
                .kv_delete(run)
        }
    }
}

/// The step history's bound for the benchmark's runtimes: the runtime's
/// default, or `WAYMARK_BENCH_STEP_HISTORY` (0 keeps no history), to
/// measure what the history costs.
pub fn step_history() -> u32 {
    // Read once: every raw step writing like Waymark asks.
    static ENTRIES: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ENTRIES.get_or_init(|| {
        std::env::var("WAYMARK_BENCH_STEP_HISTORY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(waymark::DEFAULT_HISTORY_ENTRIES)
    })
}

/// Whether the benchmark's runtimes keep each step's input for a re-run:
/// the runtime's default (yes), or not with `WAYMARK_BENCH_KEPT_INPUTS=0`,
/// to measure what keeping them costs.
pub fn keep_step_inputs() -> bool {
    static KEEP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KEEP.get_or_init(|| std::env::var("WAYMARK_BENCH_KEPT_INPUTS").map_or(true, |v| v != "0"))
}
