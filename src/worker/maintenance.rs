//! The pool's background work, done in bounded slices on maintenance ticks
//! (every `poll_interval`, or at once while a backlog remains):
//!
//! - **retention**: outcome and submit records past `terminal_retention`
//!   are deleted in batches, many runs' records in one commit, scanning the
//!   expiry index from an in-memory cursor; each run's data (its memo
//!   entries, under `wm/Q/data/{run_id}/`) is found by a scan of its prefix
//!   and deleted in the same commit;
//! - **tallies** are folded into the workflow health records in bounded
//!   batches, and the breakers are tended (parked steps of workflows that
//!   are not tripped released, due probes woken, idle state dropped);
//! - **deadlines**: runs whose deadline has passed (entries of the deadline
//!   index `wm/Q/dl/`, due at their time) are ended `TimedOut` through
//!   `end_run`; an entry is deleted once its run has ended (or is another
//!   segment), and kept while the run's running step is asked to stop (its
//!   settlement, or its next claim after a crash, ends the run and deletes
//!   the entry);
//! - **cascades**: an ended parent's cascade marker (`wm/Q/cascade/{id}`,
//!   written in its terminal transaction while it had live children) has
//!   each listed child cancelled through `end_run` (whose own ending leaves
//!   a marker for its children, and so on down), then is deleted; up to
//!   [`CASCADES_PER_TICK`] markers a tick, so a restart completes a cascade;
//! - **reconcile**: step jobs the queue dead-lettered by itself (a crash or
//!   an expired lease during a last attempt, at open or while the pool runs)
//!   are ended as `Failed` runs, one page of dead jobs per tick, cycling
//!   through the dead-letter listing. Nothing of it holds up the first claim;
//!   a record that cannot be read is logged and skipped.
//!
//! Every store call here counts for the store watchdog (see
//! [`watched`](super::watched)), and a tick is abandoned as soon as the pool
//! stops: shutdown never waits for a pass, and a stuck store is reported.

use std::collections::HashSet;
use std::time::Duration;

use taquba::{Expired, ExpiryIndex, JobStatus, KvOrder, SettlementEffects};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::watched;
use crate::error::Error;
use crate::policy::saturating_ms;
use crate::runtime::{Ending, Inner};

/// The name maintenance store calls are watched under.
const WATCH: &str = "maintenance";
/// Dead-lettered jobs read per tick by the reconcile pass.
const DEAD_PAGE: usize = 256;
/// Runs whose outcome expires in one commit.
const EXPIRE_BATCH: usize = 512;
/// Expiry commits per tick; a tick that uses them all is followed by the
/// next one at once.
const EXPIRE_BATCHES_PER_TICK: usize = 8;
/// The shortest time between two reconcile cycles over the dead jobs.
const RECONCILE_CYCLE: Duration = Duration::from_secs(1);
/// Unreadable dead jobs warned about once per process, at most this many.
const MAX_SKIPPED: usize = 4096;

/// The most cascade markers one tick works on.
const CASCADES_PER_TICK: usize = 64;

/// The most run tallies one tick folds into health records; a tick that
/// folds this many is followed by the next one at once.
const TALLIES_PER_TICK: usize = 10_000;

/// The pool's periodic work, until `stop` fires.
pub(super) async fn maintain<R, H>(
    inner: &Inner<R, H>,
    stop: &CancellationToken,
) -> Result<(), Error> {
    let mut state = Maintenance::new(inner.now_ms());
    let mut tick = tokio::time::interval(inner.cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        // A tick is abandoned at shutdown: its work is bounded and every
        // piece of it is safe to stop at an await (the next tick, or the
        // next process, picks up where it stopped).
        let backlog = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            backlog = state.tick(inner) => backlog,
        };
        if backlog {
            tick.reset_immediately();
        }
    }
}

/// Retention over one expiry index: entries are deleted with the records
/// their suffix names, up to [`EXPIRE_BATCH`] entries per commit and
/// [`EXPIRE_BATCHES_PER_TICK`] commits per pass, scanning from an in-memory
/// cursor. Used for run outcomes and for client replies.
pub(super) struct Expiring {
    /// Entries before this time (ms) have been deleted by this process.
    cursor: u64,
    /// When the scan last started from the front of the index.
    rescanned_at: u64,
}

impl Expiring {
    pub(super) fn new(now: u64) -> Self {
        Self {
            cursor: 0,
            rescanned_at: now,
        }
    }

    /// Delete what is past `retention`. Returns whether due entries remain
    /// (a backlog: the next pass should follow at once).
    pub(super) async fn pass<R, H, K: IntoIterator<Item = Vec<u8>>>(
        &mut self,
        inner: &Inner<R, H>,
        index: &ExpiryIndex,
        prefix: &[u8],
        retention: Duration,
        records: impl Fn(&str) -> K,
    ) -> Result<bool, Error> {
        self.pass_scanning(inner, index, prefix, retention, records, |_| None)
            .await
    }

    /// [`Self::pass`], also deleting every key under the prefix `scanned`
    /// names for an entry (a run's data), found by a scan.
    pub(super) async fn pass_scanning<R, H, K: IntoIterator<Item = Vec<u8>>>(
        &mut self,
        inner: &Inner<R, H>,
        index: &ExpiryIndex,
        prefix: &[u8],
        retention: Duration,
        records: impl Fn(&str) -> K,
        scanned: impl Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<bool, Error> {
        let now = inner.now_ms();
        let retention = saturating_ms(retention);
        // An entry is written with the time its effects were built; one
        // whose commit took longer than the retention lands behind the
        // cursor. Starting from the front once per retention window finds it.
        if now.saturating_sub(self.rescanned_at) >= retention {
            self.cursor = 0;
            self.rescanned_at = now;
        }
        for _ in 0..EXPIRE_BATCHES_PER_TICK {
            if !self
                .batch(inner, index, prefix, now, retention, &records, &scanned)
                .await?
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Delete one batch of due entries with their records in one commit.
    /// Returns whether more may be due.
    #[allow(clippy::too_many_arguments)]
    async fn batch<R, H, K: IntoIterator<Item = Vec<u8>>>(
        &mut self,
        inner: &Inner<R, H>,
        index: &ExpiryIndex,
        prefix: &[u8],
        now: u64,
        retention: u64,
        records: &impl Fn(&str) -> K,
        scanned: &impl Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<bool, Error> {
        let start = index.entry_key(self.cursor, &[]);
        let _watch = watched(inner, WATCH);
        let page = inner
            .queue
            .view()
            .kv_scan(prefix, start.., KvOrder::Ascending, EXPIRE_BATCH)
            .await?;
        let mut effects = SettlementEffects::default();
        let mut last = None;
        let mut all_due = true;
        for (key, _) in &page.entries {
            let Some((at, suffix)) = index.parse(key) else {
                tracing::warn!(key = %String::from_utf8_lossy(key), "expiry index key without a time; deleted");
                effects = effects.kv_delete(key.clone());
                continue;
            };
            if at.saturating_add(retention) > now {
                all_due = false;
                break;
            }
            if let Ok(id) = std::str::from_utf8(suffix) {
                for record in records(id) {
                    effects = effects.kv_delete(record);
                }
                if let Some(data) = scanned(id) {
                    for key in scan_all(inner, &data).await? {
                        effects = effects.kv_delete(key);
                    }
                }
            }
            effects = effects.kv_delete(key.clone());
            last = Some(at);
        }
        if effects.kv_deletes.is_empty() {
            return Ok(false);
        }
        inner.queue.commit_effects(effects).await?;
        if let Some(at) = last {
            self.cursor = at;
        }
        Ok(all_due && page.more)
    }
}

/// Every key under `prefix`, in pages of [`EXPIRE_BATCH`].
pub(super) async fn scan_all<R, H>(
    inner: &Inner<R, H>,
    prefix: &[u8],
) -> Result<Vec<Vec<u8>>, Error> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    loop {
        let view = inner.queue.view();
        let page = match keys.last() {
            None => {
                view.kv_scan(prefix, .., KvOrder::Ascending, EXPIRE_BATCH)
                    .await?
            }
            Some(last) => {
                let after = (
                    std::ops::Bound::Excluded(last.clone()),
                    std::ops::Bound::Unbounded,
                );
                view.kv_scan(prefix, after, KvOrder::Ascending, EXPIRE_BATCH)
                    .await?
            }
        };
        keys.extend(page.entries.into_iter().map(|(key, _)| key.to_vec()));
        if !page.more {
            return Ok(keys);
        }
    }
}

/// What the maintenance ticks remember between them.
struct Maintenance {
    /// Where retention is in the outcome expiry index.
    outcomes: Expiring,
    /// The reconcile cycle's position: the last dead job id read, `None` at
    /// the start of a cycle.
    dead_after: Option<String>,
    /// When the current (or last) reconcile cycle started.
    cycle_started: Option<Instant>,
    /// Dead jobs already reported as unreadable.
    skipped: HashSet<String>,
}

impl Maintenance {
    fn new(now: u64) -> Self {
        Self {
            outcomes: Expiring::new(now),
            dead_after: None,
            cycle_started: None,
            skipped: HashSet::new(),
        }
    }

    /// One tick of bounded work. Returns whether retention has a backlog
    /// left (the next tick then follows at once).
    async fn tick<R, H>(&mut self, inner: &Inner<R, H>) -> bool {
        let mut backlog = match self.expire(inner).await {
            Ok(backlog) => backlog,
            Err(e) => {
                tracing::warn!("retention pass failed (retried next tick): {e}");
                false
            }
        };
        let folded = {
            let _watch = watched(inner, WATCH);
            inner
                .breakers
                .fold_tallies(&inner.queue, TALLIES_PER_TICK)
                .await
        };
        match folded {
            Ok(n) => backlog |= n >= TALLIES_PER_TICK,
            Err(e) => tracing::warn!("folding run tallies failed (retried next tick): {e}"),
        }
        let tended = {
            let _watch = watched(inner, WATCH);
            inner.breakers.tend(&inner.queue, inner.now_ms()).await
        };
        if let Err(e) = tended {
            tracing::warn!("breaker upkeep failed (retried next tick): {e}");
        }
        if let Err(e) = deadlines(inner).await {
            tracing::warn!("ending runs past their deadline failed (retried next tick): {e}");
        }
        match cascades(inner).await {
            Ok(full) => backlog |= full,
            Err(e) => {
                tracing::warn!("cancelling ended parents' children failed (retried next tick): {e}")
            }
        }
        if let Err(e) = self.reconcile_page(inner).await {
            tracing::warn!("reconciling dead-lettered steps failed (retried next tick): {e}");
        }
        backlog
    }

    /// Delete the outcome and submit records past their retention, up to
    /// [`EXPIRE_BATCHES_PER_TICK`] commits. Returns whether due entries
    /// remain.
    async fn expire<R, H>(&mut self, inner: &Inner<R, H>) -> Result<bool, Error> {
        let keys = &inner.keys;
        self.outcomes
            .pass_scanning(
                inner,
                &inner.expiry,
                keys.expiry_prefix(),
                inner.cfg.terminal_retention,
                |run_id| [keys.sub(run_id), keys.out(run_id)],
                |run_id| Some(keys.data(run_id)),
            )
            .await
    }

    /// Reconcile one page of the step queue's dead jobs, starting a new
    /// cycle through the listing at most every [`RECONCILE_CYCLE`].
    async fn reconcile_page<R, H>(&mut self, inner: &Inner<R, H>) -> Result<(), Error> {
        if self.dead_after.is_none()
            && self
                .cycle_started
                .is_some_and(|at| at.elapsed() < RECONCILE_CYCLE.max(inner.cfg.poll_interval))
        {
            return Ok(());
        }
        if self.dead_after.is_none() {
            self.cycle_started = Some(Instant::now());
        }
        let page = {
            let _watch = watched(inner, WATCH);
            inner
                .queue
                .view()
                .dead_jobs(&inner.cfg.queue_name, self.dead_after.as_deref(), DEAD_PAGE)
                .await?
        };
        for job in &page {
            let reconciled = {
                let _watch = watched(inner, WATCH);
                inner.reconcile_dead(job).await
            };
            match reconciled {
                Ok(_) => {}
                // The store failed: this page is read again next tick.
                Err(e) if !e.is_permanent() => return Err(e),
                Err(e) => {
                    if self.skipped.len() < MAX_SKIPPED && self.skipped.insert(job.id.clone()) {
                        tracing::warn!(job_id = %job.id, "skipping a dead-lettered step whose run cannot be read: {e}");
                    }
                }
            }
        }
        self.dead_after = match page.last() {
            Some(last) if page.len() == DEAD_PAGE => Some(last.id.clone()),
            _ => None,
        };
        Ok(())
    }
}

/// End the runs whose deadline has passed. A running step is asked to stop
/// (its `cancel_token` fires) and its entry is kept until the step's
/// settlement ends the run; every other live run ends `TimedOut` in the
/// transaction that removes its waiting step.
async fn deadlines<R, H>(inner: &Inner<R, H>) -> Result<(), Error> {
    let _watch = watched(inner, WATCH);
    let now = inner.now_ms();
    inner
        .deadlines
        .pass(&inner.queue, now, Duration::ZERO, |at, suffix| async move {
            let Ok(run_id) = String::from_utf8(suffix) else {
                return Expired::Delete(SettlementEffects::default());
            };
            match time_out(inner, &run_id, at).await {
                Ok(true) => Expired::Keep,
                Ok(false) => Expired::Delete(SettlementEffects::default()),
                Err(e) => {
                    tracing::warn!(run_id, "ending a run at its deadline failed: {e}");
                    Expired::Keep
                }
            }
        })
        .await?;
    Ok(())
}

/// Time out `run_id` at its deadline `at`. Returns whether the run is still
/// live with its step asked to stop (the entry stays until it ends).
async fn time_out<R, H>(inner: &Inner<R, H>, run_id: &str, at: u64) -> Result<bool, Error> {
    let Some((_, job)) = inner.current_step(run_id).await? else {
        return Ok(false);
    };
    if job.status == JobStatus::Dead || crate::record::deadline_of(&job.headers) != Some(at) {
        // Reconciled as a failure, or another segment of the run.
        return Ok(false);
    }
    if job.status == JobStatus::Claimed && job.cancel_requested {
        return Ok(true);
    }
    inner.end_run(run_id, Ending::Deadline(at)).await?;
    Ok(inner.current_step(run_id).await?.is_some())
}

/// Cancel the live children of ended parents (their cascade markers).
/// Returns whether a full page of markers was read (more may wait).
async fn cascades<R, H>(inner: &Inner<R, H>) -> Result<bool, Error> {
    let page = {
        let _watch = watched(inner, WATCH);
        inner
            .queue
            .view()
            .kv_scan(
                inner.keys.cascade_prefix(),
                ..,
                KvOrder::Ascending,
                CASCADES_PER_TICK,
            )
            .await?
    };
    for (key, value) in &page.entries {
        let children: Vec<String> = match crate::record::decode(key, value) {
            Ok(children) => children,
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "dropping an unreadable cascade marker: {e}");
                Vec::new()
            }
        };
        let mut done = true;
        for child in &children {
            let _watch = watched(inner, WATCH);
            if let Err(e) = inner.end_run(child, Ending::Cancel).await {
                tracing::warn!(child, "cancelling a child of an ended parent failed: {e}");
                done = false;
            }
        }
        if done {
            let _watch = watched(inner, WATCH);
            inner.queue.kv_delete(key).await?;
        }
    }
    Ok(page.more)
}
