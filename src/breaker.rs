//! The per-workflow circuit breaker and workflow health.
//!
//! Every run belongs to a workflow. A workflow's **failure streak** counts
//! consecutive failed step attempts across all its runs; a successful step
//! resets it. With a [`BackoffPolicy`], a failure puts the workflow in
//! `Backoff` (its steps are deferred, not run, until the window ends), and
//! the streak reaching `streak_limit` trips it (its steps are parked, off
//! the worker pool, until a reset or a successful probe).
//!
//! Durable state, in the runtime's KV space:
//! - `wm/Q/wf/{workflow}`: the [`HealthRecord`] — breaker status, streak,
//!   last error (bounded to [`MAX_HEALTH_ERROR_BYTES`]), run counts folded
//!   so far. For a workflow **with a breaker** it is written in the
//!   transaction of the step settlement that changed it, by a reset, or by
//!   a tally fold; each holds the workflow's lock exclusively across its
//!   commit, so the record never disagrees with the settled steps (its
//!   state decides which steps run) and runs of other workflows never
//!   contend. For a workflow **without a breaker** the streak and last
//!   error only inform, and serializing every failure's settlement on the
//!   lock cost a busy workflow most of its throughput (a soak measured 35–45
//!   ms of lock wait in a 50 ms step): its attempt results are noted in
//!   memory once their settlements commit, shown at once by this process's
//!   health reads, and written by the next tally fold (every maintenance
//!   tick, and at a clean shutdown). A crash can lose the last tick's worth
//!   of such a streak; nothing else.
//! - `wm/Q/tally/{workflow}/{time}{seq}.{run_id}`: one entry per ended run,
//!   written with its terminal commit (a key of its own, so runs never
//!   contend), folded into the health record's counts in bounded batches
//!   ([`Breakers::fold_tallies`]). Keys sort in the order this process built
//!   them (time and sequence, 16 hex digits each), and the record keeps the
//!   last key folded: folds and health reads start after it, so they never
//!   walk the deleted entries (tombstones that a busy store keeps until
//!   compaction, and that made every fold and read slower as runs ended). A
//!   fold takes only entries built before the oldest tally still in flight
//!   in this process ([`TallyGuard`]), so no commit lands behind the
//!   cursor; the first fold of each workflow after a pool starts sweeps from
//!   the front, for entries a crashed process left behind it.
//! - `wm/Q/park/{workflow}/{job_id}`: the parked step jobs of a tripped
//!   workflow, written with the settlement that parks each. A parking
//!   settlement holds the workflow's lock *shared* across its commit and
//!   parks only if the record under the lock is still tripped
//!   ([`Breakers::stage_park`]); whatever closes the breaker holds it
//!   exclusively and scans this index after its commit, so no park slips
//!   past a close. A close whose release was cut short (a crash, a dropped
//!   future) is finished by [`Breakers::tend`] on the next maintenance tick
//!   and by [`Breakers::start`] when a pool starts: no parked step of a
//!   workflow that is not tripped survives either.
//!
//! The half-open probe is tied to a job: the job woken to be the probe, then
//! the job running as it. The slot is freed when that job settles, runs as
//! an ordinary step, parks again, or is gone (cancelled, dead), so a probe
//! is always woken again while the workflow stays tripped.
//!
//! Health reads ([`Breakers::health_of`]) read the record and the
//! workflow's own unfolded tallies (never the whole tally index) and retry,
//! under the lock, if a fold committed in between: counts never go
//! backwards while runs end. A record this build cannot read is logged and
//! skipped at start and in the list of all workflows.
//!
//! The observer ([`BreakerEvent`]) is user code: it is called last, after
//! the lock is released, and a panic in it is caught and logged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use taquba::{JobStatus, KvOrder, KvPage, Queue, QueueView, SettlementEffects};

use crate::error::Error;
use crate::policy::{BackoffPolicy, saturating_ms};
use crate::record::{bounded, decode, encode};
use crate::sync::lock;

/// A workflow's breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerStatus {
    /// Steps run normally.
    Closed,
    /// After a failure: steps claimed before `until` are deferred to it.
    Backoff {
        /// When steps run again.
        until: SystemTime,
        /// The failure streak.
        streak: u32,
        /// The last failure.
        last_error: String,
    },
    /// Tripped: steps are parked until a reset or a successful probe.
    Tripped {
        /// The failure streak that tripped it.
        streak: u32,
        /// The last failure.
        last_error: String,
        /// When it tripped.
        since: SystemTime,
    },
}

/// A workflow's health, from durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowHealth {
    /// The workflow.
    pub name: String,
    /// Its breaker.
    pub status: BreakerStatus,
    /// Consecutive failed step attempts across its runs.
    pub failure_streak: u32,
    /// Runs that ended `Succeeded`.
    pub runs_succeeded: u64,
    /// Runs that ended `Failed`.
    pub runs_failed: u64,
    /// The last failed attempt's error.
    pub last_error: Option<String>,
}

/// A breaker change, as the observer given to
/// [`WorkflowRuntimeBuilder::on_breaker_change`](crate::WorkflowRuntimeBuilder::on_breaker_change) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerEvent {
    /// The workflow's breaker tripped.
    Tripped {
        /// The workflow.
        workflow: String,
        /// The streak that tripped it.
        streak: u32,
        /// The last failure.
        last_error: String,
    },
    /// The workflow's breaker closed (reset, or a probe succeeded).
    Closed {
        /// The workflow.
        workflow: String,
    },
}

/// The observer callback type.
pub(crate) type Observer = Arc<dyn Fn(&BreakerEvent) + Send + Sync>;

/// The longest last error a health record keeps, in bytes (the terminal
/// record keeps up to [`crate::record::MAX_RESULT_BYTES`] of it).
pub(crate) const MAX_HEALTH_ERROR_BYTES: usize = 4 * 1024;

/// Unfolded tallies folded in one commit.
const FOLD_BATCH: usize = 512;

/// Parked steps woken at once by a release.
const WAKE_CONCURRENCY: usize = 32;

/// The durable form of a workflow's health.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HealthRecord {
    pub state: Stored,
    pub streak: u32,
    pub last_error: Option<String>,
    pub runs_succeeded: u64,
    pub runs_failed: u64,
    /// The tally key (after the workflow's prefix) folded last; empty before
    /// the first fold. Folds and health reads start after it.
    #[serde(default, with = "serde_bytes")]
    pub folded_through: Vec<u8>,
    /// The id of the last batch of results noted behind the record that a
    /// write applied (0: none), so a batch whose write landed unannounced
    /// (its writer dropped mid-commit) is not applied again.
    #[serde(default)]
    pub notes_applied: u64,
}

/// The tally entries this process built: the order of their keys, the ones
/// whose commit has not returned, and the workflows a fold should visit.
#[derive(Default)]
struct TallyFlight {
    /// The (time, sequence) of the last key built.
    last: (u64, u64),
    /// (time, sequence) → workflow, of the entries whose commit is in flight.
    in_flight: BTreeMap<(u64, u64), String>,
    /// Workflows that may have unfolded tallies, with a count of the tallies
    /// built for each (a fold drops a workflow only if none was built while
    /// it looked).
    tallied: HashMap<String, u64>,
}

/// Held from building a tally entry until its commit has returned or been
/// abandoned: a fold takes only entries older than every held one, so a
/// commit in flight never lands behind a fold's cursor.
pub(crate) struct TallyGuard {
    flight: Arc<Mutex<TallyFlight>>,
    at: (u64, u64),
}

impl Drop for TallyGuard {
    fn drop(&mut self) {
        lock(&self.flight).in_flight.remove(&self.at);
    }
}

/// The (time, sequence) order of a tally key's suffix; a key of another
/// layout (an older build's) sorts first and is always due.
fn tally_order(suffix: &[u8]) -> (u64, u64) {
    let hex = |b: Option<&[u8]>| {
        b.and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|h| u64::from_str_radix(h, 16).ok())
    };
    match (hex(suffix.get(..16)), hex(suffix.get(16..32))) {
        (Some(t), Some(seq)) if suffix.get(32) == Some(&b'.') => (t, seq),
        _ => (0, 0),
    }
}

/// The breaker's state, times in ms on the queue clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Stored {
    #[default]
    Closed,
    Backoff {
        until: u64,
    },
    Tripped {
        since: u64,
        probe_at: Option<u64>,
    },
}

/// What the breaker says about a claimed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Run it.
    Run,
    /// Run it as the half-open probe.
    Probe,
    /// Do not run it before this time (ms).
    Defer(u64),
    /// Park it (the settlement re-checks with [`Breakers::stage_park`]).
    Park,
}

/// The half-open probe of a tripped workflow, by job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Probe {
    #[default]
    Idle,
    /// A parked step is being woken to become the probe.
    Waking,
    /// This job was woken to become the probe.
    Woken(String),
    /// This job runs as the probe.
    Running(String),
}

impl Probe {
    fn job(&self) -> Option<&str> {
        match self {
            Probe::Woken(id) | Probe::Running(id) => Some(id),
            Probe::Idle | Probe::Waking => None,
        }
    }
}

/// One workflow's in-memory state. The cached record is the durable one
/// (this process is the store's only writer) once loaded.
#[derive(Default)]
struct WorkflowState {
    /// Held exclusively from computing a new health record until its commit
    /// lands (and the cache is updated); held shared by parking settlements.
    lock: Arc<tokio::sync::RwLock<()>>,
    cached: Mutex<Option<HealthRecord>>,
    probe: Mutex<Probe>,
    /// Attempt results of a workflow without a breaker, committed steps
    /// whose health change the next fold writes.
    behind: Mutex<Behind>,
}

/// What a run of attempt results does to a health record: whether one
/// succeeded (zeroing the streak before the failures after it), the
/// failures counted from there, and the last error. Results compose, so
/// any number of them is one of these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Noted {
    succeeded: bool,
    failures: u32,
    last_error: Option<String>,
}

impl Noted {
    fn is_empty(&self) -> bool {
        !self.succeeded && self.failures == 0
    }

    /// Append `later`'s results to these.
    fn then(&mut self, later: Noted) {
        if later.succeeded {
            self.succeeded = true;
            self.failures = later.failures;
        } else {
            self.failures = self.failures.saturating_add(later.failures);
        }
        if later.last_error.is_some() {
            self.last_error = later.last_error;
        }
    }

    /// Add one attempt's result (`Some(error)`: a failure).
    fn add(&mut self, failure: Option<String>) {
        match failure {
            None => {
                self.succeeded = true;
                self.failures = 0;
            }
            Some(error) => {
                self.failures = self.failures.saturating_add(1);
                self.last_error = Some(error);
            }
        }
    }
}

/// The results noted behind a workflow's record, bounded however long they
/// wait (a fold that cannot write, behind a record that does not decode,
/// once grew a list by an entry an attempt): those a write has taken
/// (`taken`: applied by the write, dropped once it lands, kept for the next
/// one if it fails) and those noted since (`open`). A write takes them under
/// the workflow's writer lock, so no other write holds them meanwhile.
#[derive(Debug, Clone, Default)]
struct Behind {
    taken: Noted,
    /// The id a write of `taken` records in the health record.
    taken_id: u64,
    open: Noted,
}

impl Behind {
    fn is_empty(&self) -> bool {
        self.taken.is_empty() && self.open.is_empty()
    }

    fn push(&mut self, failure: Option<String>) {
        self.open.add(failure);
    }

    /// Everything noted, in order, to apply to `rec` (read from the store):
    /// what it does not already include.
    fn all_over(&self, rec: Option<&HealthRecord>) -> [Noted; 2] {
        if self.landed_in(rec) {
            [Noted::default(), self.open.clone()]
        } else {
            [self.taken.clone(), self.open.clone()]
        }
    }

    /// Whether `rec` already includes the taken results: a write that took
    /// them landed, but was dropped before it could say so (a fold cut off
    /// at shutdown), and `rec` was read since.
    fn landed_in(&self, rec: Option<&HealthRecord>) -> bool {
        !self.taken.is_empty() && rec.is_some_and(|r| r.notes_applied == self.taken_id)
    }

    /// Take everything noted so far for a write to `rec` (read from the
    /// store, under the writer lock): what it applies, and the id the write
    /// records. Results noted meanwhile stay for the next.
    fn take(&mut self, rec: Option<&HealthRecord>) -> (Noted, u64) {
        if self.landed_in(rec) {
            self.drop_taken();
        }
        if self.taken.is_empty() {
            // Unique across processes, so an id a crashed process left in
            // the record is never taken for one of this process's.
            self.taken_id = (ulid::Ulid::generate().random() as u64).max(1);
        }
        let open = std::mem::take(&mut self.open);
        self.taken.then(open);
        (self.taken.clone(), self.taken_id)
    }

    /// The write that took them has landed.
    fn drop_taken(&mut self) {
        self.taken = Noted::default();
    }
}

impl WorkflowState {
    /// Whether nothing refers to this entry and it holds nothing a fresh
    /// one (reloaded from the store) would not: it can be dropped.
    fn idle(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) == 1
            && Arc::strong_count(&self.lock) == 1
            && *lock(&self.probe) == Probe::Idle
            && lock(&self.behind).is_empty()
            && lock(&self.cached)
                .as_ref()
                .is_none_or(|r| r.state == Stored::Closed)
    }
}

/// A test hook called after each fold commit.
#[cfg(test)]
pub(crate) type AfterFold = Box<dyn Fn() -> futures_util::future::BoxFuture<'static, ()> + Send>;

/// The breakers of one runtime.
pub(crate) struct Breakers {
    policies: HashMap<String, BackoffPolicy>,
    states: Mutex<HashMap<String, Arc<WorkflowState>>>,
    observer: Option<Observer>,
    health_prefix: Vec<u8>,
    tally_prefix: Vec<u8>,
    park_prefix: Vec<u8>,
    /// The tally entries this process built (see [`TallyGuard`]).
    flight: Arc<Mutex<TallyFlight>>,
    /// Workflows whose tallies were swept from the front since the pool
    /// started.
    swept: Mutex<HashSet<String>>,
    /// Test hook: awaited once between the two reads of a health read.
    #[cfg(test)]
    between_health_reads: Mutex<Option<futures_util::future::BoxFuture<'static, ()>>>,
    /// Test hook: called after each fold commit.
    #[cfg(test)]
    after_fold: Mutex<Option<AfterFold>>,
}

/// A health update staged for a settlement: hold it across the commit, then
/// call [`Breakers::committed`]. Dropped without that (the commit failed, or
/// the future carrying it was dropped, maybe after the commit landed), a
/// breaker's staged record clears the cached one, which is then reloaded
/// from the store.
pub(crate) struct Staged {
    state: Arc<WorkflowState>,
    workflow: String,
    write: Write,
    landed: bool,
}

/// Where a staged health update is written.
enum Write {
    /// A breaker's record, in the settlement's own transaction, under the
    /// workflow's lock (held until the commit has landed and the cache is
    /// updated): its state decides which steps run.
    InSettlement {
        _writer: tokio::sync::OwnedRwLockWriteGuard<()>,
        record: HealthRecord,
        event: Option<BreakerEvent>,
        release_parked: bool,
    },
    /// The attempt result of a workflow without a breaker (`Some(error)`
    /// for a failure): noted when the settlement has committed, written
    /// behind it by the next fold. Its streak and last error only inform,
    /// so no settlement waits for another's health write.
    Behind(Option<String>),
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.landed && matches!(self.write, Write::InSettlement { .. }) {
            *lock(&self.state.cached) = None;
        }
    }
}

impl Staged {
    /// Whether this update closes the breaker (parked steps are released
    /// once it commits).
    pub(crate) fn releases_parked(&self) -> bool {
        matches!(
            self.write,
            Write::InSettlement {
                release_parked: true,
                ..
            }
        )
    }
}

/// Apply one attempt's result to a record's streak and last error.
fn note_attempt(rec: &mut HealthRecord, failure: Option<&str>) {
    match failure {
        None => rec.streak = 0,
        Some(error) => {
            rec.streak = rec.streak.saturating_add(1);
            rec.last_error = Some(bounded(error.to_string(), MAX_HEALTH_ERROR_BYTES));
        }
    }
}

/// `rec` with the results noted behind it applied.
fn with_behind(mut rec: HealthRecord, behind: &[Noted]) -> HealthRecord {
    for noted in behind {
        if noted.succeeded {
            note_attempt(&mut rec, None);
        }
        rec.streak = rec.streak.saturating_add(noted.failures);
        if let Some(error) = &noted.last_error {
            rec.last_error = Some(bounded(error.clone(), MAX_HEALTH_ERROR_BYTES));
        }
    }
    rec
}

/// A parking staged for a settlement: the workflow was tripped under its
/// lock, which this holds (shared) until dropped after the commit, so no
/// close can commit and scan the park index in between.
pub(crate) struct Parking {
    _shared: tokio::sync::OwnedRwLockReadGuard<()>,
}

pub(crate) fn ms_to_time(ms: u64) -> SystemTime {
    // A saturated window (u64::MAX ms) fits a 64-bit `SystemTime`; on a
    // platform whose range is smaller, fall back to the latest time tried.
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .or_else(|| UNIX_EPOCH.checked_add(Duration::from_secs(u64::from(u32::MAX))))
        .unwrap_or(UNIX_EPOCH)
}

impl Breakers {
    pub(crate) fn new(
        queue_name: &str,
        policies: HashMap<String, BackoffPolicy>,
        observer: Option<Observer>,
    ) -> Self {
        let p = |kind: &str| format!("wm/{queue_name}/{kind}/").into_bytes();
        Self {
            policies,
            states: Mutex::new(HashMap::new()),
            observer,
            health_prefix: p("wf"),
            tally_prefix: p("tally"),
            park_prefix: p("park"),
            flight: Arc::default(),
            swept: Mutex::default(),
            #[cfg(test)]
            between_health_reads: Mutex::new(None),
            #[cfg(test)]
            after_fold: Mutex::new(None),
        }
    }

    fn key(prefix: &[u8], a: &str, b: Option<&str>) -> Vec<u8> {
        let mut key = prefix.to_vec();
        key.extend_from_slice(a.as_bytes());
        if let Some(b) = b {
            key.push(b'/');
            key.extend_from_slice(b.as_bytes());
        }
        key
    }

    /// Test hook: call `f` after each fold commit (the fold awaits it).
    #[cfg(test)]
    pub(crate) fn set_after_fold(&self, f: AfterFold) {
        *lock(&self.after_fold) = Some(f);
    }

    pub(crate) fn health_key(&self, workflow: &str) -> Vec<u8> {
        Self::key(&self.health_prefix, workflow, None)
    }

    /// The tally entry a terminal commit writes for a run that ended
    /// `Succeeded` (`true`) or `Failed` (`false`) at `now`, and the guard to
    /// hold until that commit has returned (or will not happen).
    pub(crate) fn tally(
        &self,
        workflow: &str,
        run_id: &str,
        now: u64,
        succeeded: bool,
    ) -> (Vec<u8>, Vec<u8>, TallyGuard) {
        let at = {
            let mut flight = lock(&self.flight);
            let at = (now.max(flight.last.0), flight.last.1.saturating_add(1));
            flight.last = at;
            flight.in_flight.insert(at, workflow.to_string());
            let built = flight.tallied.entry(workflow.to_string()).or_default();
            *built = built.wrapping_add(1);
            at
        };
        let suffix = format!("{:016x}{:016x}.{run_id}", at.0, at.1);
        (
            Self::key(&self.tally_prefix, workflow, Some(&suffix)),
            vec![succeeded as u8],
            TallyGuard {
                flight: self.flight.clone(),
                at,
            },
        )
    }

    /// The park index entry of a parked step job.
    pub(crate) fn park_entry(
        &self,
        workflow: &str,
        job_id: &str,
        run_id: &str,
    ) -> (Vec<u8>, Vec<u8>) {
        (
            Self::key(&self.park_prefix, workflow, Some(job_id)),
            run_id.as_bytes().to_vec(),
        )
    }

    /// Wait until the commits of `workflow`'s health record in flight now
    /// have returned (durable, or failed). Each holds the workflow's lock
    /// exclusively across its commit, so taking it shared after a read of
    /// the record means the read rests on nothing a crash could undo. A
    /// workflow this process never touched has nothing in flight here (its
    /// entry is not created).
    pub(crate) async fn settled(&self, workflow: &str) {
        let state = lock(&self.states).get(workflow).cloned();
        if let Some(state) = state {
            drop(state.lock.read().await);
        }
    }

    /// Hold `workflow`'s lock as a health commit does, in tests of readers
    /// that must wait for one.
    #[cfg(test)]
    pub(crate) async fn hold(&self, workflow: &str) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.state(workflow).lock.clone().write_owned().await
    }

    fn state(&self, workflow: &str) -> Arc<WorkflowState> {
        lock(&self.states)
            .entry(workflow.to_string())
            .or_default()
            .clone()
    }

    /// The workflow's health record, loaded into the cache on first use (a
    /// missing record reads as the default: closed, no streak).
    async fn cached(
        &self,
        queue: &Queue,
        workflow: &str,
        state: &WorkflowState,
    ) -> Result<HealthRecord, Error> {
        if let Some(rec) = lock(&state.cached).clone() {
            return Ok(rec);
        }
        let rec = self
            .read_record(queue.view(), workflow)
            .await?
            .unwrap_or_default();
        let mut cached = lock(&state.cached);
        Ok(cached.get_or_insert(rec).clone())
    }

    /// The workflow's durable health record.
    async fn read_record(
        &self,
        view: &QueueView,
        workflow: &str,
    ) -> Result<Option<HealthRecord>, Error> {
        let key = self.health_key(workflow);
        match view.kv_get(&key).await? {
            Some(bytes) => Ok(Some(decode(&key, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Decide whether claimed step job `job_id` of `workflow` runs now.
    pub(crate) async fn gate(
        &self,
        queue: &Queue,
        workflow: &str,
        job_id: &str,
        now: u64,
    ) -> Result<Gate, Error> {
        let state = self.state(workflow);
        let rec = self.cached(queue, workflow, &state).await?;
        let mut probe = lock(&state.probe);
        let mine = probe.job() == Some(job_id);
        let gate = match rec.state {
            Stored::Closed => Gate::Run,
            Stored::Backoff { until } if now < until => Gate::Defer(until),
            Stored::Backoff { .. } => Gate::Run,
            Stored::Tripped {
                probe_at: Some(at), ..
            } if now >= at => match &*probe {
                Probe::Running(id) if id != job_id => Gate::Park,
                // Free, being woken, or woken for this or another job: the
                // first due step to get here is the probe.
                _ => {
                    *probe = Probe::Running(job_id.to_string());
                    return Ok(Gate::Probe);
                }
            },
            Stored::Tripped { .. } => Gate::Park,
        };
        // The job the slot waits for runs as an ordinary step, or parks
        // again: the slot is free.
        if mine {
            *probe = Probe::Idle;
        }
        Ok(gate)
    }

    /// Stage the parking of a step the gate chose to park, for its
    /// settlement: `Some` (hold it across the commit) when the workflow is
    /// still tripped under its lock, `None` when it no longer is (a reset or
    /// a probe closed it since): then the step is not parked but runs.
    pub(crate) async fn stage_park(
        &self,
        queue: &Queue,
        workflow: &str,
    ) -> Result<Option<Parking>, Error> {
        let state = self.state(workflow);
        let shared = state.lock.clone().read_owned().await;
        let rec = self.cached(queue, workflow, &state).await?;
        Ok(matches!(rec.state, Stored::Tripped { .. }).then_some(Parking { _shared: shared }))
    }

    /// Stage the health change of a settled step attempt: `Some(error)` for
    /// a failure (transient or permanent error, `Fail` verdict), `None` for
    /// a success. `None` is returned when nothing changes (a success with a
    /// zero streak and a closed breaker: the common case costs no write).
    pub(crate) async fn stage(
        &self,
        queue: &Queue,
        workflow: &str,
        failure: Option<&str>,
        now: u64,
    ) -> Result<Option<Staged>, Error> {
        let state = self.state(workflow);
        let Some(policy) = self.policies.get(workflow) else {
            // No breaker: the result is written behind the settlement. A
            // success changes nothing on a clean record.
            if failure.is_none() && lock(&state.behind).is_empty() {
                let rec = self.cached(queue, workflow, &state).await?;
                if rec.streak == 0 && lock(&state.behind).is_empty() {
                    return Ok(None);
                }
            }
            return Ok(Some(Staged {
                state,
                workflow: workflow.to_string(),
                write: Write::Behind(failure.map(str::to_string)),
                landed: false,
            }));
        };
        if failure.is_none() {
            // A success changes nothing on a clean record. Only when no
            // update is in flight, though: a failure staged concurrently
            // must not commit a streak after this success skipped its reset.
            if let Ok(_free) = state.lock.try_write() {
                let rec = self.cached(queue, workflow, &state).await?;
                if rec.streak == 0 && rec.state == Stored::Closed {
                    return Ok(None);
                }
            }
        }
        let writer = state.lock.clone().write_owned().await;
        let mut rec = self.cached(queue, workflow, &state).await?;
        if failure.is_none() && rec.streak == 0 && rec.state == Stored::Closed {
            return Ok(None);
        }
        let was = rec.state.clone();
        let mut event = None;
        note_attempt(&mut rec, failure);
        match failure {
            None => {
                rec.state = Stored::Closed;
                if matches!(was, Stored::Tripped { .. }) {
                    event = Some(BreakerEvent::Closed {
                        workflow: workflow.to_string(),
                    });
                }
            }
            Some(_) => {
                let trips = policy.streak_limit.is_some_and(|limit| rec.streak >= limit);
                if trips {
                    let probe_at = policy
                        .probe_after
                        .map(|d| now.saturating_add(saturating_ms(d)));
                    rec.state = Stored::Tripped {
                        since: now,
                        probe_at,
                    };
                    if !matches!(was, Stored::Tripped { .. }) {
                        event = Some(BreakerEvent::Tripped {
                            workflow: workflow.to_string(),
                            streak: rec.streak,
                            last_error: rec.last_error.clone().unwrap_or_default(),
                        });
                    }
                } else if !matches!(was, Stored::Tripped { .. }) {
                    let delay = policy.delay(rec.streak, crate::policy::draw());
                    rec.state = Stored::Backoff {
                        until: now.saturating_add(saturating_ms(delay)),
                    };
                }
            }
        }
        let release_parked = matches!(was, Stored::Tripped { .. }) && rec.state == Stored::Closed;
        Ok(Some(Staged {
            state,
            workflow: workflow.to_string(),
            write: Write::InSettlement {
                _writer: writer,
                record: rec,
                event,
                release_parked,
            },
            landed: false,
        }))
    }

    /// Add a staged update to a settlement's effects.
    pub(crate) fn apply(
        &self,
        staged: &Staged,
        effects: SettlementEffects,
    ) -> Result<SettlementEffects, Error> {
        let Write::InSettlement { record, .. } = &staged.write else {
            return Ok(effects);
        };
        let key = self.health_key(&staged.workflow);
        Ok(effects.kv_put(key.clone(), encode(&key, record)?))
    }

    /// The settlement carrying `staged` committed: update the cache, release
    /// the lock, then tell the observer (a breaker's update), or note the
    /// result for the next fold to write (a workflow without a breaker).
    /// Call it after the rest of the post-commit work.
    pub(crate) fn committed(&self, staged: Staged) {
        let event = self.settle_cache(staged);
        self.announce(event);
    }

    /// Update the cache for a committed `staged` and release its lock, or
    /// note its result behind; returns the event to announce.
    fn settle_cache(&self, mut staged: Staged) -> Option<BreakerEvent> {
        staged.landed = true;
        match &mut staged.write {
            Write::InSettlement { record, event, .. } => {
                if !matches!(record.state, Stored::Tripped { .. }) {
                    // Closed: whatever the probe slot waited for is moot.
                    *lock(&staged.state.probe) = Probe::Idle;
                }
                *lock(&staged.state.cached) = Some(record.clone());
                event.take()
            }
            Write::Behind(failure) => {
                lock(&staged.state.behind).push(failure.take());
                // The next fold visits the workflow and writes it.
                let mut flight = lock(&self.flight);
                let built = flight.tallied.entry(staged.workflow.clone()).or_default();
                *built = built.wrapping_add(1);
                None
            }
        }
    }

    /// Log a breaker change and call the observer, isolated: a panic in it
    /// is caught and logged.
    fn announce(&self, event: Option<BreakerEvent>) {
        let Some(event) = event else {
            return;
        };
        match &event {
            BreakerEvent::Tripped {
                workflow,
                streak,
                last_error,
            } => {
                metrics::counter!("waymark_breaker_trips_total", "workflow" => workflow.clone())
                    .increment(1);
                tracing::warn!(workflow, streak, last_error, "breaker tripped")
            }
            BreakerEvent::Closed { workflow } => tracing::info!(workflow, "breaker closed"),
        }
        if let Some(observer) = &self.observer {
            let called = std::panic::catch_unwind(AssertUnwindSafe(|| observer(&event)));
            if called.is_err() {
                tracing::error!(?event, "the breaker observer panicked; ignoring it");
            }
        }
    }

    /// The probe (job `job_id`) of a tripped workflow has settled (either
    /// way): free the slot.
    pub(crate) fn probe_done(&self, workflow: &str, job_id: &str) {
        let state = self.state(workflow);
        let mut probe = lock(&state.probe);
        if probe.job() == Some(job_id) {
            *probe = Probe::Idle;
        }
    }

    /// Close a workflow's breaker, zero its streak and release its parked
    /// steps. Returns whether it was open (in backoff or tripped). A
    /// workflow with nothing to reset (a clean or unknown one) is not
    /// written. A health record that does not decode is replaced by a
    /// closed one (and counts as open). `extra` is applied to the effects of
    /// the reset's commit, called with whether the breaker was open (not
    /// called when nothing is written). Returns whether it was open and
    /// whether the reset committed.
    pub(crate) async fn reset(
        &self,
        queue: &Queue,
        workflow: &str,
        extra: impl FnOnce(SettlementEffects, bool) -> Result<SettlementEffects, Error>,
    ) -> Result<(bool, bool), Error> {
        let state = self.state(workflow);
        let writer = state.lock.clone().write_owned().await;
        // A record that does not decode is not applied anywhere (the steps
        // run as if closed, nothing folds into it): the reset is the
        // operator's way to replace it, releasing any parked steps.
        let (cached, replaced) = match self.cached(queue, workflow, &state).await {
            Ok(rec) => (rec, false),
            Err(e) if e.is_unreadable_record() => {
                tracing::error!(
                    workflow,
                    "the reset replaces an unreadable health record: {e}"
                );
                (HealthRecord::default(), true)
            }
            Err(e) => return Err(e),
        };
        // Results noted behind (no breaker) count; the reset supersedes
        // them once it has committed.
        let (noted, id) = lock(&state.behind).take((!replaced).then_some(&cached));
        let mut rec = with_behind(cached, &[noted]);
        rec.notes_applied = id;
        if !replaced && rec.streak == 0 && rec.state == Stored::Closed {
            return Ok((false, false));
        }
        let was_open = replaced || rec.state != Stored::Closed;
        let was_tripped = replaced || matches!(rec.state, Stored::Tripped { .. });
        rec.streak = 0;
        rec.state = Stored::Closed;
        let staged = Staged {
            state: state.clone(),
            workflow: workflow.to_string(),
            write: Write::InSettlement {
                _writer: writer,
                event: was_tripped.then(|| BreakerEvent::Closed {
                    workflow: workflow.to_string(),
                }),
                release_parked: was_tripped,
                record: rec,
            },
            landed: false,
        };
        queue
            .commit_effects(self.apply(&staged, extra(SettlementEffects::default(), was_open)?)?)
            .await?;
        // Only a fold or a reset (each under the writer lock, held here)
        // takes from the front: these are the ones read above.
        lock(&state.behind).drop_taken();
        let event = self.settle_cache(staged);
        if was_tripped {
            self.release_parked(queue, workflow, false).await?;
        }
        self.announce(event);
        Ok((was_open, true))
    }

    /// Wake the parked steps of `workflow` (all of them, or the first one for
    /// a probe), dropping their park entries. Returns the woken job ids.
    async fn wake_parked(
        &self,
        queue: &Queue,
        workflow: &str,
        only_one: bool,
    ) -> Result<Vec<String>, Error> {
        let prefix = Self::key(&self.park_prefix, workflow, Some(""));
        let mut woken = Vec::new();
        loop {
            let page = queue
                .view()
                .kv_scan(&prefix, .., KvOrder::Ascending, 256)
                .await?;
            if page.entries.is_empty() {
                return Ok(woken);
            }
            let wake = |key: Vec<u8>| {
                let job_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                async move {
                    let outcome = queue.wake_scheduled(&job_id).await?;
                    queue.kv_delete(&key).await?;
                    Ok::<_, Error>((outcome == taquba::WakeOutcome::Woken).then_some(job_id))
                }
            };
            if only_one {
                for (key, _) in page.entries {
                    if let Some(id) = wake(key).await? {
                        woken.push(id);
                        return Ok(woken);
                    }
                }
                continue;
            }
            let mut wakes =
                futures_util::stream::iter(page.entries.into_iter().map(|(k, _)| wake(k)))
                    .buffer_unordered(WAKE_CONCURRENCY);
            while let Some(done) = wakes.next().await {
                woken.extend(done?);
            }
        }
    }

    /// Wake all the parked steps of `workflow`. Returns how many were woken.
    pub(crate) async fn release_parked(
        &self,
        queue: &Queue,
        workflow: &str,
        only_one: bool,
    ) -> Result<usize, Error> {
        Ok(self.wake_parked(queue, workflow, only_one).await?.len())
    }

    /// A pool starts: drop what an earlier pool in this process left in the
    /// caches, load every readable health record (so tripped workflows are
    /// probed after a restart; an unreadable one is logged and skipped), and
    /// release the parked steps of workflows that are not tripped.
    pub(crate) async fn start(&self, queue: &Queue) -> Result<(), Error> {
        let states: Vec<_> = lock(&self.states).values().cloned().collect();
        for state in states {
            let _writer = state.lock.write().await;
            *lock(&state.cached) = None;
            *lock(&state.probe) = Probe::Idle;
        }
        let mut load = Vec::new();
        self.scan(queue.view(), &self.health_prefix, |name, value| {
            load.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
            Ok(())
        })
        .await?;
        // Tallies an earlier process left: every workflow is swept from the
        // front once, and new keys sort after every stored cursor.
        lock(&self.swept).clear();
        let left = self.names_under(queue.view(), &self.tally_prefix).await?;
        {
            let mut flight = lock(&self.flight);
            for name in left {
                flight.tallied.entry(name).or_default();
            }
        }
        for (name, bytes) in load {
            let key = self.health_key(&name);
            match decode::<HealthRecord>(&key, &bytes) {
                Ok(rec) => {
                    {
                        let mut flight = lock(&self.flight);
                        flight.last = flight.last.max(tally_order(&rec.folded_through));
                    }
                    let state = self.state(&name);
                    lock(&state.cached).get_or_insert(rec);
                }
                Err(e) => tracing::error!(
                    workflow = name,
                    "skipping the workflow's unreadable health record (its breaker is not applied): {e}"
                ),
            }
        }
        self.release_untripped(queue).await?;
        Ok(())
    }

    /// The maintenance tick's breaker work: release the parked steps of
    /// every workflow that is not tripped (finishing a close whose release
    /// was cut short), wake one parked step of every tripped workflow whose
    /// probe is due, and drop idle cache entries.
    pub(crate) async fn tend(&self, queue: &Queue, now: u64) -> Result<(), Error> {
        self.release_untripped(queue).await?;
        self.wake_probes(queue, now).await?;
        lock(&self.states).retain(|_, state| !state.idle());
        Ok(())
    }

    /// Release the parked steps of every workflow with park entries that is
    /// not tripped. Returns how many steps were woken.
    async fn release_untripped(&self, queue: &Queue) -> Result<usize, Error> {
        let mut released = 0;
        for workflow in self.names_under(queue.view(), &self.park_prefix).await? {
            let state = self.state(&workflow);
            let tripped = match self.cached(queue, &workflow, &state).await {
                Ok(rec) => matches!(rec.state, Stored::Tripped { .. }),
                // Its steps run as if it were closed.
                Err(e) if e.is_unreadable_record() => false,
                Err(e) => return Err(e),
            };
            if !tripped {
                let woken = self.release_parked(queue, &workflow, false).await?;
                if woken > 0 {
                    tracing::info!(workflow, woken, "released parked steps of a closed breaker");
                }
                released += woken;
            }
        }
        Ok(released)
    }

    /// Wake one parked step of every tripped workflow whose probe is due and
    /// not under way, so the probe runs without waiting for new work.
    async fn wake_probes(&self, queue: &Queue, now: u64) -> Result<(), Error> {
        for workflow in self.due_probes(now) {
            let state = self.state(&workflow);
            let slot = lock(&state.probe).clone();
            if let Some(job_id) = slot.job() {
                let alive =
                    queue.view().job_record(job_id).await?.is_some_and(|j| {
                        matches!(j.status, JobStatus::Pending | JobStatus::Claimed)
                    });
                if alive {
                    continue;
                }
                // The job is gone (cancelled, dead, settled): free the slot,
                // unless it moved on meanwhile.
                let mut probe = lock(&state.probe);
                if *probe != slot {
                    continue;
                }
                *probe = Probe::Idle;
            }
            {
                let mut probe = lock(&state.probe);
                if *probe != Probe::Idle {
                    continue;
                }
                *probe = Probe::Waking;
            }
            let woken = self.wake_parked(queue, &workflow, true).await;
            let mut probe = lock(&state.probe);
            if *probe == Probe::Waking {
                *probe = match woken.as_ref().ok().and_then(|w| w.first()) {
                    Some(id) => Probe::Woken(id.clone()),
                    None => Probe::Idle,
                };
            }
            drop(probe);
            woken?;
        }
        Ok(())
    }

    /// Tripped workflows (in this process's cache) whose probe is due.
    fn due_probes(&self, now: u64) -> Vec<String> {
        lock(&self.states)
            .iter()
            .filter(|(_, s)| {
                matches!(
                    lock(&s.cached).as_ref().map(|r| &r.state),
                    Some(Stored::Tripped { probe_at: Some(at), .. }) if now >= *at
                )
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The distinct workflow names of the keys `{prefix}{workflow}/…`, one
    /// one-key scan per name (not per key).
    async fn names_under(&self, view: &QueueView, prefix: &[u8]) -> Result<Vec<String>, Error> {
        let mut names = Vec::new();
        let mut from: Option<Vec<u8>> = None;
        loop {
            let page = match &from {
                None => view.kv_scan(prefix, .., KvOrder::Ascending, 1).await?,
                Some(from) => {
                    view.kv_scan(prefix, from.as_slice().., KvOrder::Ascending, 1)
                        .await?
                }
            };
            let Some((key, _)) = page.entries.into_iter().next() else {
                return Ok(names);
            };
            let rest = &key[prefix.len()..];
            let mut next = key.clone();
            match rest.iter().position(|b| *b == b'/') {
                Some(slash) => {
                    names.push(String::from_utf8_lossy(&rest[..slash]).into_owned());
                    // Past every key of this name: `/` + 1 is `0`.
                    next.truncate(prefix.len() + slash);
                    next.push(b'/' + 1);
                }
                // Not a key of this layout: step over it.
                None => next.push(0),
            }
            from = Some(next);
        }
    }

    /// Call `f(key without prefix, value)` for every entry under `prefix`.
    async fn scan(
        &self,
        view: &QueueView,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = match &after {
                None => view.kv_scan(prefix, .., KvOrder::Ascending, 256).await?,
                Some(last) => {
                    let range = (
                        std::ops::Bound::Excluded(last.clone()),
                        std::ops::Bound::Unbounded,
                    );
                    view.kv_scan(prefix, range, KvOrder::Ascending, 256).await?
                }
            };
            for (key, value) in &page.entries {
                f(&key[prefix.len()..], value)?;
            }
            if !page.more {
                return Ok(());
            }
            after = page.entries.last().map(|(k, _)| k.clone());
        }
    }

    /// Fold up to `max` unfolded tallies into the health records' counts, in
    /// batches of at most [`FOLD_BATCH`] (one commit each, under the
    /// workflow's lock), workflow by workflow in turn. Returns how many were
    /// folded. A workflow goes round again only while its batches are full,
    /// so a call ends although runs keep ending; those of workflows whose
    /// record is unreadable are logged and left. The
    /// workflows visited are the ones this process wrote tallies for, and at
    /// start those an earlier process left; each fold reads from the
    /// record's cursor, so its cost is the entries it folds.
    pub(crate) async fn fold_tallies(&self, queue: &Queue, max: usize) -> Result<usize, Error> {
        let mut folded = 0;
        let mut skip = HashSet::new();
        while folded < max {
            let mut progressed = false;
            let names: Vec<(String, u64)> = lock(&self.flight)
                .tallied
                .iter()
                .map(|(name, built)| (name.clone(), *built))
                .collect();
            for (workflow, built) in names {
                if folded >= max {
                    break;
                }
                if skip.contains(&workflow) {
                    continue;
                }
                let batch = (max - folded).min(FOLD_BATCH);
                match self.fold_batch(queue, &workflow, batch).await {
                    Ok(0) => {
                        // Nothing due: drop it from the visits unless a
                        // tally was built (or is in flight) meanwhile.
                        let mut flight = lock(&self.flight);
                        let busy = flight.tallied.get(&workflow) != Some(&built)
                            || flight.in_flight.values().any(|w| *w == workflow);
                        if !busy {
                            flight.tallied.remove(&workflow);
                        }
                    }
                    Ok(n) => {
                        folded += n;
                        // Only a full batch goes round again: tallies keep
                        // arriving, and chasing them would never end.
                        progressed |= n == batch;
                    }
                    Err(e) if e.is_unreadable_record() => {
                        tracing::error!(
                            workflow,
                            "not folding run tallies into an unreadable health record: {e}"
                        );
                        skip.insert(workflow);
                    }
                    Err(e) => return Err(e),
                }
            }
            if !progressed {
                break;
            }
        }
        Ok(folded)
    }

    /// Fold up to `limit` of `workflow`'s due tallies in one commit: from
    /// the record's cursor (from the front, the first time since the pool
    /// started), the entries built before every tally still in flight.
    async fn fold_batch(
        &self,
        queue: &Queue,
        workflow: &str,
        limit: usize,
    ) -> Result<usize, Error> {
        let state = self.state(workflow);
        let _writer = state.lock.write().await;
        let mut rec = self.cached(queue, workflow, &state).await?;
        let horizon = {
            let flight = lock(&self.flight);
            flight
                .in_flight
                .keys()
                .next()
                .copied()
                .unwrap_or((flight.last.0, flight.last.1.saturating_add(1)))
        };
        // Results of a workflow without a breaker noted since the last fold
        // (taken from the front; only a fold or a reset, under the writer
        // lock, takes them).
        let (noted, id) = lock(&state.behind).take(Some(&rec));
        let behind = [noted];
        rec = with_behind(rec, &behind);
        rec.notes_applied = id;
        let prefix = Self::key(&self.tally_prefix, workflow, Some(""));
        let sweep = !lock(&self.swept).contains(workflow);
        let cursor = if sweep {
            &[][..]
        } else {
            &rec.folded_through[..]
        };
        let page = self
            .tallies_after(queue.view(), &prefix, cursor, limit)
            .await?;
        let due: Vec<(Vec<u8>, _)> = page
            .entries
            .into_iter()
            .take_while(|(key, _)| tally_order(&key[prefix.len()..]) < horizon)
            .collect();
        // The sweep is over once it has folded everything before the
        // horizon, or reached the cursor: an earlier process's tallies lie
        // before the cursor, and everything after it is read from there.
        // (Waiting for a fold that finds nothing due, as before, never ended
        // the sweep under steady load, and each fold then walked the
        // tombstones of every tally folded since the pool started.)
        let swept = sweep
            && (due.len() < limit
                || due
                    .last()
                    .is_some_and(|(key, _)| key[prefix.len()..] >= rec.folded_through[..]));
        if due.is_empty() && swept {
            lock(&self.swept).insert(workflow.to_string());
        }
        if due.is_empty() && behind.iter().all(Noted::is_empty) {
            return Ok(0);
        }
        let (ok, failed) = count_tallies(&due);
        rec.runs_succeeded = rec.runs_succeeded.saturating_add(ok);
        rec.runs_failed = rec.runs_failed.saturating_add(failed);
        if let Some((last, _)) = due.last() {
            let last = last[prefix.len()..].to_vec();
            if last > rec.folded_through {
                rec.folded_through = last;
            }
        }
        let n = due.len();
        let key = self.health_key(workflow);
        let effects = SettlementEffects::default()
            .kv_put(key.clone(), encode(&key, &rec)?)
            .kv_deletes(due.into_iter().map(|(k, _)| k).collect());
        // Reloaded from the store if this future is dropped mid-commit.
        *lock(&state.cached) = None;
        queue.commit_effects(effects).await?;
        if swept {
            lock(&self.swept).insert(workflow.to_string());
        }
        lock(&state.behind).drop_taken();
        *lock(&state.cached) = Some(rec);
        #[cfg(test)]
        {
            let hook = lock(&self.after_fold).as_ref().map(|f| f());
            if let Some(hook) = hook {
                hook.await;
            }
        }
        Ok(n)
    }

    /// Up to `limit` tally entries under `prefix` after `cursor` (a key
    /// suffix; empty for the front).
    async fn tallies_after(
        &self,
        view: &QueueView,
        prefix: &[u8],
        cursor: &[u8],
        limit: usize,
    ) -> Result<KvPage, Error> {
        Ok(if cursor.is_empty() {
            view.kv_scan(prefix, .., KvOrder::Ascending, limit).await?
        } else {
            let mut from = prefix.to_vec();
            from.extend_from_slice(cursor);
            view.kv_scan(
                prefix,
                (Bound::Excluded(from), Bound::Unbounded),
                KvOrder::Ascending,
                limit,
            )
            .await?
        })
    }

    /// Whether `workflow`'s breaker is tripped, from its durable record (an
    /// unreadable record is not applied, so it is not): waits, after the
    /// read, for the record's commits in flight.
    pub(crate) async fn is_tripped(&self, view: &QueueView, workflow: &str) -> Result<bool, Error> {
        let tripped = match self.read_record(view, workflow).await {
            Ok(rec) => rec.is_some_and(|r| matches!(r.state, Stored::Tripped { .. })),
            Err(e) if e.is_unreadable_record() => false,
            Err(e) => return Err(e),
        };
        // Both answers can rest on a commit in flight (a trip, or a reset's
        // close). A listing asks once per workflow.
        self.settled(workflow).await;
        Ok(tripped)
    }

    /// `workflow`'s unfolded tallies after the record's cursor:
    /// (succeeded, failed).
    async fn unfolded(
        &self,
        view: &QueueView,
        workflow: &str,
        cursor: &[u8],
    ) -> Result<(u64, u64), Error> {
        let prefix = Self::key(&self.tally_prefix, workflow, Some(""));
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut after = cursor.to_vec();
        loop {
            let page = self.tallies_after(view, &prefix, &after, 256).await?;
            let (o, f) = count_tallies(&page.entries);
            (ok, failed) = (ok.saturating_add(o), failed.saturating_add(f));
            match page.entries.last() {
                Some((last, _)) if page.more => after = last[prefix.len()..].to_vec(),
                _ => return Ok((ok, failed)),
            }
        }
    }

    /// One workflow's health, from durable state: `None` when it has no
    /// record and no unfolded tally. Costs what the workflow has (its
    /// record and its own unfolded tallies). Waits, after the first read of
    /// the record, for its commits in flight in this process
    /// ([`Self::settled`]). A write that lands between that read and the
    /// second (a fold, a trip, a reset) is detected (the record changed)
    /// and the reads are repeated under the workflow's lock, which every
    /// writer holds exclusively across its commit: counts never go
    /// backwards while runs end, and results noted in memory are shown
    /// once, from the record or from the notes.
    pub(crate) async fn health_of(
        &self,
        view: &QueueView,
        workflow: &str,
    ) -> Result<Option<WorkflowHealth>, Error> {
        let first = self.read_record(view, workflow).await?;
        #[cfg(test)]
        {
            let hook = lock(&self.between_health_reads).take();
            if let Some(hook) = hook {
                hook.await;
            }
        }
        // What the first read saw is durable once the commits in flight
        // have returned; anything written later shows as a change below.
        self.settled(workflow).await;
        let cursor = |r: &Option<HealthRecord>| {
            r.as_ref()
                .map_or_else(Vec::new, |r| r.folded_through.clone())
        };
        let mut tallies = self.unfolded(view, workflow, &cursor(&first)).await?;
        // Results this process noted but has not written yet (a workflow
        // without a breaker; their steps' settlements are durable), taken
        // before the record they are applied to is read: a write that
        // takes them and lands in between shows in that record.
        let noted = |b: &Self| {
            lock(&b.states)
                .get(workflow)
                .map(|state| lock(&state.behind).clone())
                .unwrap_or_default()
        };
        let mut behind = noted(self);
        let mut rec = self.read_record(view, workflow).await?;
        if rec != first {
            // A write landed since the first read (a fold, a trip, a
            // reset): read again under the lock, which no writer holds
            // then, so what is read is durable and the tallies match it.
            let state = self.state(workflow);
            let _shared = state.lock.read().await;
            behind = noted(self);
            rec = self.read_record(view, workflow).await?;
            tallies = self.unfolded(view, workflow, &cursor(&rec)).await?;
        }
        let (ok, failed) = tallies;
        let behind = behind.all_over(rec.as_ref()).to_vec();
        if rec.is_none() && ok == 0 && failed == 0 && behind.iter().all(Noted::is_empty) {
            return Ok(None);
        }
        let rec = with_behind(rec.unwrap_or_default(), &behind);
        let last = rec.last_error.clone().unwrap_or_default();
        let status = match rec.state {
            Stored::Closed => BreakerStatus::Closed,
            Stored::Backoff { until } => BreakerStatus::Backoff {
                until: ms_to_time(until),
                streak: rec.streak,
                last_error: last,
            },
            Stored::Tripped { since, .. } => BreakerStatus::Tripped {
                streak: rec.streak,
                last_error: last,
                since: ms_to_time(since),
            },
        };
        Ok(Some(WorkflowHealth {
            name: workflow.to_string(),
            status,
            failure_streak: rec.streak,
            runs_succeeded: rec.runs_succeeded.saturating_add(ok),
            runs_failed: rec.runs_failed.saturating_add(failed),
            last_error: rec.last_error,
        }))
    }

    /// Every workflow's health (those with a record or an unfolded tally),
    /// by name. A workflow whose record is unreadable is logged and left
    /// out; the others are listed.
    pub(crate) async fn health_all(&self, view: &QueueView) -> Result<Vec<WorkflowHealth>, Error> {
        let mut names = std::collections::BTreeSet::new();
        self.scan(view, &self.health_prefix, |name, _| {
            names.insert(String::from_utf8_lossy(name).into_owned());
            Ok(())
        })
        .await?;
        names.extend(self.names_under(view, &self.tally_prefix).await?);
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            match self.health_of(view, &name).await {
                Ok(Some(health)) => out.push(health),
                Ok(None) => {}
                Err(e) if e.is_unreadable_record() => {
                    tracing::error!(
                        workflow = name,
                        "leaving out an unreadable health record: {e}"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// (succeeded, failed) of tally entries.
fn count_tallies<V: AsRef<[u8]>>(entries: &[(Vec<u8>, V)]) -> (u64, u64) {
    let ok = entries
        .iter()
        .filter(|(_, v)| v.as_ref().first() == Some(&1))
        .count() as u64;
    (ok, entries.len() as u64 - ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// Results noted behind, however they are taken and dropped, apply as
    /// the same results one by one would, in two entries of memory at most.
    #[test]
    fn noted_results_compose_like_the_results_one_by_one() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let start = HealthRecord {
                streak: (next() % 4) as u32,
                last_error: (next() % 2 == 0).then(|| "before".to_string()),
                ..HealthRecord::default()
            };
            let (mut one_by_one, mut written) = (start.clone(), start);
            let mut behind = Behind::default();
            for i in 0..(next() % 40) {
                let result = (next() % 3 != 0).then(|| format!("error {i}"));
                note_attempt(&mut one_by_one, result.as_deref());
                behind.push(result);
                match next() % 7 {
                    // A write lands what it took.
                    0 => {
                        let (noted, id) = behind.take(Some(&written));
                        written = with_behind(written, &[noted]);
                        written.notes_applied = id;
                        behind.drop_taken();
                    }
                    // A write fails: what it took is taken again.
                    1 => {
                        behind.take(Some(&written));
                    }
                    // A write lands, but is dropped before it says so: the
                    // next write (or read) finds its results in the record.
                    2 => {
                        let (noted, id) = behind.take(Some(&written));
                        written = with_behind(written, &[noted]);
                        written.notes_applied = id;
                    }
                    _ => {}
                }
            }
            let now = with_behind(written.clone(), &behind.all_over(Some(&written)));
            assert_eq!(
                (now.streak, now.last_error),
                (one_by_one.streak, one_by_one.last_error)
            );
        }
    }

    async fn test_queue() -> Arc<Queue> {
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let opts = taquba::OpenOptions {
            flush_interval: Some(Duration::from_millis(1)),
            ..Default::default()
        };
        Arc::new(Queue::open_with_options(store, "t", opts).await.unwrap())
    }

    fn policies(names: &[&str]) -> HashMap<String, BackoffPolicy> {
        names
            .iter()
            .map(|n| {
                let policy = BackoffPolicy {
                    streak_limit: Some(1),
                    ..Default::default()
                };
                (n.to_string(), policy)
            })
            .collect()
    }

    /// Write `n` tallies of `workflow` (`ok` of them successes) in one commit.
    async fn tallies(
        b: &Breakers,
        queue: &Queue,
        workflow: &str,
        from: usize,
        n: usize,
        ok: usize,
    ) {
        let mut effects = SettlementEffects::default();
        let mut guards = Vec::new();
        for i in from..from + n {
            let (k, v, guard) = b.tally(workflow, &format!("r{i:06}"), 0, i - from < ok);
            effects = effects.kv_put(k, v);
            guards.push(guard);
        }
        queue.commit_effects(effects).await.unwrap();
    }

    async fn counts(b: &Breakers, queue: &Queue, workflow: &str) -> (u64, u64) {
        let h = b.health_of(queue.view(), workflow).await.unwrap().unwrap();
        (h.runs_succeeded, h.runs_failed)
    }

    /// Defect 12: a fold that commits between the record read and the tally
    /// read of a health read does not make the counts drop.
    #[tokio::test]
    async fn counts_do_not_drop_when_a_fold_lands_between_the_reads() {
        let queue = test_queue().await;
        let b = Arc::new(Breakers::new("q", HashMap::new(), None));
        tallies(&b, &queue, "w", 0, 2, 2).await;
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 2);
        tallies(&b, &queue, "w", 2, 3, 3).await;
        assert_eq!(counts(&b, &queue, "w").await, (5, 0));
        let (reached, at_hook) = tokio::sync::oneshot::channel::<()>();
        let (go, wait_go) = tokio::sync::oneshot::channel::<()>();
        *lock(&b.between_health_reads) = Some(
            async move {
                let _ = reached.send(());
                let _ = wait_go.await;
            }
            .boxed(),
        );
        let read = tokio::spawn({
            let (b, queue) = (b.clone(), queue.clone());
            async move { counts(&b, &queue, "w").await }
        });
        at_hook.await.unwrap();
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 3);
        go.send(()).unwrap();
        assert_eq!(read.await.unwrap(), (5, 0));
    }

    /// Also-check: a success that settles while a failure's update is in
    /// flight waits for it and resets the streak it commits.
    #[tokio::test]
    async fn a_success_concurrent_with_a_failure_still_resets_the_streak() {
        let queue = test_queue().await;
        let policy = BackoffPolicy {
            streak_limit: None,
            ..Default::default()
        };
        let b = Breakers::new("q", HashMap::from([("w".to_string(), policy)]), None);
        let failure = b
            .stage(&queue, "w", Some("boom"), 0)
            .await
            .unwrap()
            .unwrap();
        let mut success = Box::pin(b.stage(&queue, "w", None, 0));
        assert!(
            (&mut success).now_or_never().is_none(),
            "the success must not decide on the record before the failure lands"
        );
        let effects = b.apply(&failure, SettlementEffects::default()).unwrap();
        queue.commit_effects(effects).await.unwrap();
        b.committed(failure);
        let success = success
            .await
            .unwrap()
            .expect("the success resets the streak");
        let Write::InSettlement { record, .. } = &success.write else {
            panic!("a breaker's update is written in its settlement");
        };
        assert_eq!(record.streak, 0);
    }

    /// A run's status read the breaker as closed from a reset's close still
    /// in flight, and reported a parked step `Pending`; a crash could bring
    /// the trip back. A trip read now waits for the commits in flight
    /// whatever it reads.
    #[tokio::test]
    async fn a_trip_read_waits_for_a_close_in_flight() {
        let queue = test_queue().await;
        let b = Breakers::new("q", HashMap::new(), None);
        let in_flight = b.hold("w").await;
        let key = b.health_key("w");
        queue
            .kv_put(&key, &encode(&key, &HealthRecord::default()).unwrap())
            .await
            .unwrap();
        let early =
            tokio::time::timeout(Duration::from_millis(100), b.is_tripped(queue.view(), "w")).await;
        assert!(early.is_err(), "answered from a close in flight: {early:?}");
        drop(in_flight);
        assert!(!b.is_tripped(queue.view(), "w").await.unwrap());
    }

    /// A health read applied the results noted in memory after waiting
    /// for a fold in flight: the fold took them and landed meanwhile, so
    /// the read applied none of them to the record from before the fold,
    /// and a streak of durable failures read as none. The notes are now
    /// taken before the record they are applied to is read, and a record
    /// that changed is read again under the lock.
    #[tokio::test]
    async fn a_health_read_across_a_fold_loses_no_noted_result() {
        let queue = test_queue().await;
        let b = Breakers::new("q", HashMap::new(), None);
        for error in ["one", "two", "three"] {
            let failure = b.stage(&queue, "w", Some(error), 0).await.unwrap().unwrap();
            b.committed(failure);
        }
        assert_eq!(
            b.health_of(queue.view(), "w")
                .await
                .unwrap()
                .unwrap()
                .failure_streak,
            3
        );
        // A fold takes the notes under the lock; its commit is in flight.
        let state = b.state("w");
        let held = state.lock.clone().write_owned().await;
        let (_, id) = lock(&state.behind).take(None);
        let (first_read, read) = tokio::sync::oneshot::channel();
        *lock(&b.between_health_reads) = Some(Box::pin(async move {
            let _ = first_read.send(());
        }));
        let fold = async {
            read.await.unwrap();
            let key = b.health_key("w");
            let folded = HealthRecord {
                streak: 3,
                last_error: Some("three".into()),
                notes_applied: id,
                ..Default::default()
            };
            queue
                .kv_put(&key, &encode(&key, &folded).unwrap())
                .await
                .unwrap();
            lock(&state.behind).drop_taken();
            drop(held);
        };
        let (health, ()) = tokio::join!(b.health_of(queue.view(), "w"), fold);
        let health = health.unwrap().unwrap();
        assert_eq!(health.failure_streak, 3, "{health:?}");
        assert_eq!(health.last_error.as_deref(), Some("three"));
    }

    /// Soak regression: every failure of a workflow without a breaker, and
    /// the success after it, held the workflow's lock across its settlement
    /// commit (as did each tally fold), so all the workflow's settlements
    /// queued behind one commit at a time: 35-45 ms of a 50 ms step in the
    /// soak, and throughput fell as commits slowed. Now such a result is
    /// staged without the lock, noted after its commit, shown at once by
    /// health reads, and written by the next fold.
    #[tokio::test]
    async fn results_without_a_breaker_never_wait_for_the_lock_and_are_written_behind() {
        let queue = test_queue().await;
        let b = Breakers::new("q", HashMap::new(), None);
        let state = b.state("w");
        // A fold (or any writer) holds the workflow's lock.
        let held = state.lock.clone().write_owned().await;
        let failure = b
            .stage(&queue, "w", Some("boom"), 0)
            .now_or_never()
            .expect("a failure is staged without waiting for the lock")
            .unwrap()
            .unwrap();
        assert!(
            b.apply(&failure, SettlementEffects::default())
                .unwrap()
                .kv_writes
                .is_empty(),
            "nothing is added to the settlement"
        );
        b.committed(failure);
        let success = b
            .stage(&queue, "w", None, 0)
            .now_or_never()
            .expect("the success after it is not held up either")
            .unwrap()
            .expect("it resets the streak noted before it");
        b.committed(success);
        let failure = b
            .stage(&queue, "w", Some("again"), 0)
            .await
            .unwrap()
            .unwrap();
        b.committed(failure);
        // A health read waits for the writer's commit (it answers from
        // durable state), then shows what is noted.
        drop(held);
        let health = b.health_of(queue.view(), "w").await.unwrap().unwrap();
        assert_eq!(health.failure_streak, 1, "health reads show what is noted");
        assert_eq!(health.last_error.as_deref(), Some("again"));
        assert!(b.read_record(queue.view(), "w").await.unwrap().is_none());
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 0);
        let rec = b.read_record(queue.view(), "w").await.unwrap().unwrap();
        assert_eq!((rec.streak, rec.last_error.as_deref()), (1, Some("again")));
        assert!(lock(&state.behind).is_empty(), "written once");
        // A fresh process reads what the fold wrote.
        let fresh = Breakers::new("q", HashMap::new(), None);
        let health = fresh.health_of(queue.view(), "w").await.unwrap().unwrap();
        assert_eq!(health.failure_streak, 1);
        // A reset supersedes what was noted before it.
        let failure = b
            .stage(&queue, "w", Some("third"), 0)
            .await
            .unwrap()
            .unwrap();
        b.committed(failure);
        assert!(
            !b.reset(&queue, "w", |e, _| Ok(e)).await.unwrap().0,
            "no breaker: it was not open"
        );
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 0);
        let rec = b.read_record(queue.view(), "w").await.unwrap().unwrap();
        assert_eq!((rec.streak, rec.last_error.as_deref()), (0, Some("third")));
    }

    /// Defect 17: folding is bounded per call and per commit, shares the
    /// calls among workflows, and health counts stay exact throughout.
    #[tokio::test]
    async fn tallies_fold_in_bounded_batches() {
        let queue = test_queue().await;
        let b = Breakers::new("q", HashMap::new(), None);
        tallies(&b, &queue, "a", 0, 1200, 1000).await;
        tallies(&b, &queue, "b", 0, 3, 3).await;
        assert_eq!(b.fold_tallies(&queue, 700).await.unwrap(), 700);
        assert_eq!(counts(&b, &queue, "a").await, (1000, 200));
        // `b` was not starved by `a`'s backlog: all of it is folded.
        let b_unfolded = b.unfolded(queue.view(), "b", &[]).await.unwrap();
        assert_eq!(b_unfolded, (0, 0));
        assert_eq!(counts(&b, &queue, "b").await, (3, 0));
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 503);
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 0);
        assert_eq!(counts(&b, &queue, "a").await, (1000, 200));
        let names = b.names_under(queue.view(), &b.tally_prefix).await.unwrap();
        assert!(names.is_empty());
    }

    /// Soak regression: folds and health reads scanned every tally key from
    /// the front, walking the tombstones of all the entries folded before
    /// (seconds per fold in a soak, until the watchdog stopped the pool).
    /// Now both start after the record's cursor, and a fold never moves the
    /// cursor past a tally whose commit is still in flight, so nothing lands
    /// behind it.
    #[tokio::test]
    async fn folds_start_after_their_cursor_and_never_pass_a_tally_in_flight() {
        let queue = test_queue().await;
        let b = Breakers::new("q", HashMap::new(), None);
        tallies(&b, &queue, "w", 0, 10, 10).await;
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 10);
        let rec = b.read_record(queue.view(), "w").await.unwrap().unwrap();
        assert!(!rec.folded_through.is_empty(), "the fold keeps its cursor");

        // A tally built but not committed yet, and one built after it that
        // has committed.
        let (slow_key, slow_value, slow_guard) = b.tally("w", "slow", 5, false);
        let (fast_key, fast_value, fast_guard) = b.tally("w", "fast", 5, true);
        assert!(
            fast_key > slow_key,
            "keys sort in the order they were built"
        );
        queue
            .commit_effects(SettlementEffects::default().kv_put(fast_key, fast_value))
            .await
            .unwrap();
        drop(fast_guard);
        assert_eq!(
            b.fold_tallies(&queue, usize::MAX).await.unwrap(),
            0,
            "the committed tally waits for the older one in flight"
        );
        assert_eq!(counts(&b, &queue, "w").await, (11, 0));
        queue
            .commit_effects(SettlementEffects::default().kv_put(slow_key, slow_value))
            .await
            .unwrap();
        drop(slow_guard);
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 2);
        assert_eq!(counts(&b, &queue, "w").await, (11, 1));
        assert_eq!(b.unfolded(queue.view(), "w", &[]).await.unwrap(), (0, 0));

        // A health read counts only what is after the cursor: an entry
        // planted behind it (as no fold leaves one) is not read.
        let rec = b.read_record(queue.view(), "w").await.unwrap().unwrap();
        let mut behind = Breakers::key(&b.tally_prefix, "w", Some(""));
        behind.extend_from_slice(&rec.folded_through[..rec.folded_through.len() - 1]);
        queue.kv_put(&behind, &[1]).await.unwrap();
        assert_eq!(counts(&b, &queue, "w").await, (11, 1));
    }

    /// Soak regression: the sweep from the front that a pool's first folds
    /// make ended only at a fold that found nothing due, which steady load
    /// never allows; every fold then scanned from the front, through the
    /// tombstones of all the tallies folded since start (20 s folds after 15
    /// minutes, and retention fell behind). It now ends once it reaches the
    /// cursor, and still folds what an earlier process left behind it.
    #[tokio::test]
    async fn a_sweep_ends_at_the_cursor_although_every_batch_is_full() {
        let queue = test_queue().await;
        let b = Breakers::new("q", HashMap::new(), None);
        tallies(&b, &queue, "w", 0, 10, 10).await;
        assert_eq!(b.fold_tallies(&queue, 4).await.unwrap(), 4);
        assert!(
            lock(&b.swept).contains("w"),
            "a full first batch from the front reaches the (empty) cursor"
        );

        // An earlier process's tally behind the cursor, found by the sweep
        // a new pool makes; full batches until the sweep passes the cursor.
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 6);
        let rec = b.read_record(queue.view(), "w").await.unwrap().unwrap();
        let mut behind = Breakers::key(&b.tally_prefix, "w", Some(""));
        behind.extend_from_slice(&rec.folded_through[..rec.folded_through.len() - 1]);
        queue.kv_put(&behind, &[1]).await.unwrap();
        tallies(&b, &queue, "w", 10, 3, 3).await;
        lock(&b.swept).clear();
        assert_eq!(b.fold_tallies(&queue, 1).await.unwrap(), 1);
        assert!(
            !lock(&b.swept).contains("w"),
            "the straggler alone does not reach the cursor"
        );
        assert_eq!(b.fold_tallies(&queue, 1).await.unwrap(), 1);
        assert!(lock(&b.swept).contains("w"), "past the cursor: swept");
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 2);
        assert_eq!(counts(&b, &queue, "w").await, (14, 0));
        assert_eq!(b.unfolded(queue.view(), "w", &[]).await.unwrap(), (0, 0));
    }

    /// Soak regression: a fold went round again whenever it had folded
    /// anything, so with runs ending all the time it chased the newest
    /// tallies for seconds (up to 28 s a call), holding up retention.
    #[tokio::test]
    async fn a_fold_ends_while_tallies_keep_arriving() {
        let queue = test_queue().await;
        let b = Breakers::new("q", HashMap::new(), None);
        tallies(&b, &queue, "w", 0, 1, 1).await;
        // A run ends after every fold commit (100 of them at most).
        let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        *lock(&b.after_fold) = Some(Box::new({
            let (queue, arrived) = (queue.clone(), arrived.clone());
            let prefix = Breakers::key(&b.tally_prefix, "w", Some(""));
            move || {
                let (queue, arrived, mut key) = (queue.clone(), arrived.clone(), prefix.clone());
                Box::pin(async move {
                    let n = arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if n < 100 {
                        key.extend_from_slice(format!("z{n:04}").as_bytes());
                        queue.kv_put(&key, &[1]).await.unwrap();
                    }
                })
            }
        }));
        let folded = b.fold_tallies(&queue, usize::MAX).await.unwrap();
        assert_eq!(folded, 1, "one round: the arrivals wait for the next tick");
        assert_eq!(b.fold_tallies(&queue, usize::MAX).await.unwrap(), 1);
    }

    /// Also-check: the per-workflow state map drops closed, idle, unlocked
    /// entries and keeps a tripped one (its probe is woken from it).
    #[tokio::test]
    async fn idle_workflow_states_are_pruned() {
        let queue = test_queue().await;
        let b = Breakers::new("q", policies(&["t"]), None);
        for i in 0..50 {
            let name = format!("w{i}");
            assert_eq!(b.gate(&queue, &name, "j", 0).await.unwrap(), Gate::Run);
            assert!(b.stage(&queue, &name, None, 0).await.unwrap().is_none());
        }
        let trip = b
            .stage(&queue, "t", Some("down"), 0)
            .await
            .unwrap()
            .unwrap();
        let effects = b.apply(&trip, SettlementEffects::default()).unwrap();
        queue.commit_effects(effects).await.unwrap();
        b.committed(trip);
        assert_eq!(lock(&b.states).len(), 51);
        b.tend(&queue, 0).await.unwrap();
        let left: Vec<String> = lock(&b.states).keys().cloned().collect();
        assert_eq!(left, ["t"]);
    }

    /// Defect 5: the health record keeps a bounded last error.
    #[tokio::test]
    async fn the_last_error_is_bounded() {
        let queue = test_queue().await;
        let b = Breakers::new("q", HashMap::new(), None);
        let huge = "x".repeat(taquba::MAX_KV_VALUE_SIZE + 1);
        let staged = b.stage(&queue, "w", Some(&huge), 0).await.unwrap().unwrap();
        let effects = b.apply(&staged, SettlementEffects::default()).unwrap();
        queue.commit_effects(effects).await.unwrap();
        b.committed(staged);
        let kept = b
            .health_of(queue.view(), "w")
            .await
            .unwrap()
            .unwrap()
            .last_error;
        assert!(kept.unwrap().len() <= MAX_HEALTH_ERROR_BYTES + 32);
    }
}
