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
//!   last error, run counts folded so far. Written in the transaction of the
//!   step settlement that changed it; one writer at a time per workflow (an
//!   async lock held across that commit), so it never disagrees with the
//!   settled steps and concurrent runs of other workflows never contend.
//! - `wm/Q/tally/{workflow}/{run_id}`: one entry per ended run, written with
//!   its terminal commit (a key of its own, so runs never contend), folded
//!   into the health record's counts by the pool's maintenance tick.
//! - `wm/Q/park/{workflow}/{job_id}`: the parked step jobs of a tripped
//!   workflow, written with the settlement that parks each.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use taquba::{KvOrder, Queue, SettlementEffects};

use crate::error::Error;
use crate::policy::BackoffPolicy;
use crate::record::{decode, encode};

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

/// The durable form of a workflow's health.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HealthRecord {
    pub state: Stored,
    pub streak: u32,
    pub last_error: Option<String>,
    pub runs_succeeded: u64,
    pub runs_failed: u64,
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
    /// Park it.
    Park,
}

/// One workflow's in-memory state. The cached record is the durable one
/// (this process is the store's only writer) once loaded.
#[derive(Default)]
struct WorkflowState {
    /// Held from computing a new health record until its commit lands.
    writer: Arc<tokio::sync::Mutex<()>>,
    cached: Mutex<Option<HealthRecord>>,
    /// A step is running as the half-open probe.
    probing: AtomicBool,
    /// A parked step was woken to become the probe.
    probe_woken: AtomicBool,
}

/// The breakers of one runtime.
pub(crate) struct Breakers {
    policies: HashMap<String, BackoffPolicy>,
    states: Mutex<HashMap<String, Arc<WorkflowState>>>,
    observer: Option<Observer>,
    health_prefix: Vec<u8>,
    tally_prefix: Vec<u8>,
    park_prefix: Vec<u8>,
}

/// A health update staged for a settlement: hold it across the commit, then
/// call [`Breakers::committed`].
pub(crate) struct Staged {
    state: Arc<WorkflowState>,
    _writer: tokio::sync::OwnedMutexGuard<()>,
    workflow: String,
    record: HealthRecord,
    event: Option<BreakerEvent>,
    release_parked: bool,
}

impl Staged {
    /// Whether this update closes the breaker (parked steps are released
    /// once it commits).
    pub(crate) fn releases_parked(&self) -> bool {
        self.release_parked
    }
}

pub(crate) fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
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

    pub(crate) fn health_key(&self, workflow: &str) -> Vec<u8> {
        Self::key(&self.health_prefix, workflow, None)
    }

    /// The tally entry a terminal commit writes for a run that ended
    /// `Succeeded` (`true`) or `Failed` (`false`).
    pub(crate) fn tally(
        &self,
        workflow: &str,
        run_id: &str,
        succeeded: bool,
    ) -> (Vec<u8>, Vec<u8>) {
        (
            Self::key(&self.tally_prefix, workflow, Some(run_id)),
            vec![succeeded as u8],
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

    fn state(&self, workflow: &str) -> Arc<WorkflowState> {
        lock(&self.states)
            .entry(workflow.to_string())
            .or_default()
            .clone()
    }

    /// The workflow's health record, loaded into the cache on first use.
    async fn cached(
        &self,
        queue: &Queue,
        workflow: &str,
        state: &WorkflowState,
    ) -> Result<HealthRecord, Error> {
        if let Some(rec) = lock(&state.cached).clone() {
            return Ok(rec);
        }
        let key = self.health_key(workflow);
        let rec = match queue.view().kv_get(&key).await? {
            Some(bytes) => decode(&key, &bytes)?,
            None => HealthRecord::default(),
        };
        let mut cached = lock(&state.cached);
        Ok(cached.get_or_insert(rec).clone())
    }

    /// Decide whether a claimed step of `workflow` runs now.
    pub(crate) async fn gate(
        &self,
        queue: &Queue,
        workflow: &str,
        now: u64,
    ) -> Result<Gate, Error> {
        let state = self.state(workflow);
        let rec = self.cached(queue, workflow, &state).await?;
        Ok(match rec.state {
            Stored::Closed => Gate::Run,
            Stored::Backoff { until } if now < until => Gate::Defer(until),
            Stored::Backoff { .. } => Gate::Run,
            Stored::Tripped {
                probe_at: Some(at), ..
            } if now >= at && !state.probing.swap(true, Ordering::SeqCst) => Gate::Probe,
            Stored::Tripped { .. } => Gate::Park,
        })
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
        if failure.is_none() {
            let rec = self.cached(queue, workflow, &state).await?;
            if rec.streak == 0 && rec.state == Stored::Closed {
                return Ok(None);
            }
        }
        let writer = state.writer.clone().lock_owned().await;
        let mut rec = self.cached(queue, workflow, &state).await?;
        let was = rec.state.clone();
        let policy = self.policies.get(workflow);
        let mut event = None;
        match failure {
            None => {
                if rec.streak == 0 && rec.state == Stored::Closed {
                    return Ok(None);
                }
                rec.streak = 0;
                rec.state = Stored::Closed;
                if matches!(was, Stored::Tripped { .. }) {
                    event = Some(BreakerEvent::Closed {
                        workflow: workflow.to_string(),
                    });
                }
            }
            Some(error) => {
                rec.streak = rec.streak.saturating_add(1);
                rec.last_error = Some(error.to_string());
                if let Some(policy) = policy {
                    let trips = policy.streak_limit.is_some_and(|limit| rec.streak >= limit);
                    if trips {
                        let probe_at = policy
                            .probe_after
                            .map(|d| now.saturating_add(d.as_millis() as u64));
                        rec.state = Stored::Tripped {
                            since: now,
                            probe_at,
                        };
                        if !matches!(was, Stored::Tripped { .. }) {
                            event = Some(BreakerEvent::Tripped {
                                workflow: workflow.to_string(),
                                streak: rec.streak,
                                last_error: error.to_string(),
                            });
                        }
                    } else if !matches!(was, Stored::Tripped { .. }) {
                        let delay = policy.delay(rec.streak, crate::policy::draw());
                        rec.state = Stored::Backoff {
                            until: now.saturating_add(delay.as_millis() as u64),
                        };
                    }
                }
            }
        }
        let release_parked = matches!(was, Stored::Tripped { .. }) && rec.state == Stored::Closed;
        Ok(Some(Staged {
            state,
            _writer: writer,
            workflow: workflow.to_string(),
            record: rec,
            event,
            release_parked,
        }))
    }

    /// Add a staged update to a settlement's effects.
    pub(crate) fn apply(
        &self,
        staged: &Staged,
        effects: SettlementEffects,
    ) -> Result<SettlementEffects, Error> {
        let key = self.health_key(&staged.workflow);
        Ok(effects.kv_put(key.clone(), encode(&key, &staged.record)?))
    }

    /// The settlement carrying `staged` committed: update the cache and tell
    /// the observer. Dropping a `Staged` without this leaves the cache as the
    /// store has it.
    pub(crate) fn committed(&self, staged: Staged) {
        *lock(&staged.state.cached) = Some(staged.record.clone());
        if let Some(event) = &staged.event {
            match event {
                BreakerEvent::Tripped {
                    workflow,
                    streak,
                    last_error,
                } => {
                    tracing::warn!(workflow, streak, last_error, "breaker tripped");
                }
                BreakerEvent::Closed { workflow } => tracing::info!(workflow, "breaker closed"),
            }
            if let Some(observer) = &self.observer {
                observer(event);
            }
        }
    }

    /// The probe of a tripped workflow has settled (either way).
    pub(crate) fn probe_done(&self, workflow: &str) {
        let state = self.state(workflow);
        state.probing.store(false, Ordering::SeqCst);
        state.probe_woken.store(false, Ordering::SeqCst);
    }

    /// Wake one parked step of every tripped workflow whose probe is due, so
    /// the probe runs without waiting for new work.
    pub(crate) async fn wake_probes(&self, queue: &Queue, now: u64) -> Result<(), Error> {
        for workflow in self.due_probes(now) {
            let state = self.state(&workflow);
            if state.probe_woken.swap(true, Ordering::SeqCst) {
                continue;
            }
            if self.release_parked(queue, &workflow, true).await? == 0 {
                state.probe_woken.store(false, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Close a workflow's breaker and zero its streak. Returns whether it was
    /// not closed before.
    pub(crate) async fn reset(&self, queue: &Queue, workflow: &str) -> Result<bool, Error> {
        let state = self.state(workflow);
        let writer = state.writer.clone().lock_owned().await;
        let mut rec = self.cached(queue, workflow, &state).await?;
        let was_open = rec.state != Stored::Closed;
        rec.streak = 0;
        rec.state = Stored::Closed;
        let staged = Staged {
            state,
            _writer: writer,
            workflow: workflow.to_string(),
            event: was_open.then(|| BreakerEvent::Closed {
                workflow: workflow.to_string(),
            }),
            release_parked: was_open,
            record: rec,
        };
        queue
            .commit_effects(self.apply(&staged, SettlementEffects::default())?)
            .await?;
        self.committed(staged);
        Ok(was_open)
    }

    /// Wake the parked steps of `workflow` (all of them, or the first one for
    /// a probe). Returns how many were woken.
    pub(crate) async fn release_parked(
        &self,
        queue: &Queue,
        workflow: &str,
        only_one: bool,
    ) -> Result<usize, Error> {
        let prefix = Self::key(&self.park_prefix, workflow, Some(""));
        let mut woken = 0;
        loop {
            let page = queue
                .view()
                .kv_scan(&prefix, .., KvOrder::Ascending, 256)
                .await?;
            if page.entries.is_empty() {
                return Ok(woken);
            }
            for (key, _) in &page.entries {
                let job_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                let outcome = queue.wake_scheduled(&job_id).await?;
                queue.kv_delete(key).await?;
                if outcome == taquba::WakeOutcome::Woken {
                    woken += 1;
                    if only_one {
                        return Ok(woken);
                    }
                }
            }
        }
    }

    /// Tripped workflows (in this process's cache) whose probe is due and
    /// not yet under way.
    fn due_probes(&self, now: u64) -> Vec<String> {
        lock(&self.states)
            .iter()
            .filter(|(_, s)| !s.probing.load(Ordering::SeqCst))
            .filter(|(_, s)| {
                matches!(
                    lock(&s.cached).as_ref().map(|r| &r.state),
                    Some(Stored::Tripped { probe_at: Some(at), .. }) if now >= *at
                )
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Load the health of every workflow that has a record, so tripped ones
    /// are probed after a restart.
    /// A record that does not decode is logged and skipped (its workflow's
    /// steps run as if closed, as `gate` does); only a store failure is an
    /// error.
    pub(crate) async fn load_all(&self, queue: &Queue) -> Result<(), Error> {
        let mut names = Vec::new();
        self.scan(queue, &self.health_prefix, |key, _| {
            names.push(String::from_utf8_lossy(key).into_owned());
            Ok(())
        })
        .await?;
        for name in names {
            let state = self.state(&name);
            match self.cached(queue, &name, &state).await {
                Ok(_) => {}
                Err(e) if !e.is_permanent() => return Err(e),
                Err(e) => {
                    tracing::warn!(workflow = %name, "skipping an unreadable workflow health record: {e}")
                }
            }
        }
        Ok(())
    }

    async fn read_records(&self, queue: &Queue) -> Result<BTreeMap<String, HealthRecord>, Error> {
        let mut out = BTreeMap::new();
        self.scan(queue, &self.health_prefix, |key, value| {
            let name = String::from_utf8_lossy(key).into_owned();
            let rec: HealthRecord = decode(key, value)?;
            out.insert(name, rec);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Unfolded tallies by workflow: (succeeded, failed, keys).
    async fn read_tallies(
        &self,
        queue: &Queue,
    ) -> Result<BTreeMap<String, (u64, u64, Vec<Vec<u8>>)>, Error> {
        let mut out: BTreeMap<String, (u64, u64, Vec<Vec<u8>>)> = BTreeMap::new();
        let prefix = self.tally_prefix.clone();
        self.scan(queue, &prefix, |rest, value| {
            let rest = String::from_utf8_lossy(rest);
            let Some((workflow, _run)) = rest.split_once('/') else {
                return Ok(());
            };
            let entry = out.entry(workflow.to_string()).or_default();
            if value.first() == Some(&1) {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
            let mut full = prefix.clone();
            full.extend_from_slice(rest.as_bytes());
            entry.2.push(full);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// Call `f(key without prefix, value)` for every entry under `prefix`.
    async fn scan(
        &self,
        queue: &Queue,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = match &after {
                None => {
                    queue
                        .view()
                        .kv_scan(prefix, .., KvOrder::Ascending, 256)
                        .await?
                }
                Some(last) => {
                    let range = (
                        std::ops::Bound::Excluded(last.clone()),
                        std::ops::Bound::Unbounded,
                    );
                    queue
                        .view()
                        .kv_scan(prefix, range, KvOrder::Ascending, 256)
                        .await?
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

    /// Fold tally entries into the health records' counts (one commit per
    /// workflow that has any).
    pub(crate) async fn fold_tallies(&self, queue: &Queue) -> Result<(), Error> {
        for (workflow, (ok, failed, keys)) in self.read_tallies(queue).await? {
            let state = self.state(&workflow);
            let _writer = state.writer.lock().await;
            let mut rec = self.cached(queue, &workflow, &state).await?;
            rec.runs_succeeded += ok;
            rec.runs_failed += failed;
            let key = self.health_key(&workflow);
            let effects = SettlementEffects::default()
                .kv_put(key.clone(), encode(&key, &rec)?)
                .kv_deletes(keys);
            // Until the commit returns the cache is unknown: a fold dropped
            // mid-commit (maintenance stops at shutdown) or failed reloads
            // the record from the store rather than write stale counts.
            *lock(&state.cached) = None;
            queue.commit_effects(effects).await?;
            *lock(&state.cached) = Some(rec);
        }
        Ok(())
    }

    /// Whether `workflow`'s breaker is tripped, from its durable record.
    pub(crate) async fn is_tripped(&self, queue: &Queue, workflow: &str) -> Result<bool, Error> {
        let key = self.health_key(workflow);
        Ok(match queue.view().kv_get(&key).await? {
            Some(bytes) => matches!(
                decode::<HealthRecord>(&key, &bytes)?.state,
                Stored::Tripped { .. }
            ),
            None => false,
        })
    }

    /// Every workflow's health, from durable state.
    pub(crate) async fn health(
        &self,
        queue: &Queue,
        only: Option<&str>,
    ) -> Result<Vec<WorkflowHealth>, Error> {
        let mut records = self.read_records(queue).await?;
        let tallies = self.read_tallies(queue).await?;
        for name in tallies.keys() {
            records.entry(name.clone()).or_default();
        }
        Ok(records
            .into_iter()
            .filter(|(name, _)| only.is_none_or(|o| o == name))
            .map(|(name, rec)| {
                let (ok, failed) = tallies.get(&name).map_or((0, 0), |t| (t.0, t.1));
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
                WorkflowHealth {
                    name,
                    status,
                    failure_streak: rec.streak,
                    runs_succeeded: rec.runs_succeeded + ok,
                    runs_failed: rec.runs_failed + failed,
                    last_error: rec.last_error,
                }
            })
            .collect())
    }
}
