//! The pool's background work, done in bounded slices on ticks (every
//! `poll_interval`, or at once while a backlog remains) by three loops that
//! never wait for each other: retention; the breakers' upkeep and the
//! reconcile; and the runs ended by a deadline or a parent's cascade.
//!
//! - **retention**: outcome and submit records past `terminal_retention`
//!   are deleted in batches, many runs' records in one commit, scanning the
//!   expiry index from an in-memory cursor; each run's data (under
//!   `wm/Q/data/{run_id}/`) is deleted in the same commit: by name when the
//!   run's expiry entry names it (its kept inputs and history, a
//!   [`DataSummary`]) and its extent key says that is all of it, else found
//!   by a scan of its prefix (see [`RunData`]);
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
//! - **placeholders**: a joined parent's placeholder job is removed right
//!   after the join commits; the marker that commit wrote
//!   (`wm/Q/replaced/{job id}`) lets this pass remove one a crash left
//!   behind;
//! - **reconcile**: step jobs the queue dead-lettered by itself (a crash or
//!   an expired lease during a last attempt, at open or while the pool runs)
//!   end their runs `Failed` (`TimedOut` or `Cancelled` when a stop was
//!   asked). The claims this process let go of are watched and read once
//!   their lease can have run out (see [`crate::lapsed`]); the dead-letter
//!   listing is read in full, a page a tick, when the pool starts (what a
//!   dead process left) and otherwise rarely ([`RECONCILE_CYCLE`]); a dead
//!   job a cycle found settled (reconciled, or not its run's current step)
//!   is not read again by the next. Every 10 s (`BACKLOG_SAMPLE`) it also
//!   samples the step queue's job counts for the `waymark_backlog` gauges.
//!   Nothing of it holds up the first claim; a record that cannot be read
//!   is logged and skipped.
//!
//! Every store call here counts for the store watchdog (see
//! [`watched`](super::watched)), and a tick is abandoned as soon as the pool
//! stops: shutdown never waits for a pass, and a stuck store is reported.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use taquba::{Expired, ExpiryIndex, JobStatus, KvOrder, SettlementEffects};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::watched;
use crate::error::Error;
use crate::policy::saturating_ms;
use crate::record::{DataSummary, EXTENT_NAMED, Keys, data_extent, decode};
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
/// How many expired runs' data a retention batch reads at once.
const DATA_SCANS_AT_ONCE: usize = 32;
/// The shortest time between two full reconcile cycles over the dead jobs,
/// after the first (see [`Upkeep::reconcile_page`]).
const RECONCILE_CYCLE: Duration = Duration::from_secs(300);
/// A full reconcile cycle is followed by a rest of this many times the time
/// it spent reading, at least: the listing reads every dead job, and they
/// stay listed for the queue's dead retention.
const CYCLE_SHARE: u32 = 100;
/// Watched step claims read per tick (see [`crate::lapsed`]).
const LAPSED_PER_TICK: usize = 256;
/// The shortest time between two samples of the step queue's job counts
/// (the `waymark_backlog` gauges). A sample reads taquba's five count keys,
/// whose reads merge every count change written since the last compaction:
/// at thousands of steps a second that is milliseconds of CPU, so it is
/// taken at a scrape's pace, not every reconcile cycle.
const BACKLOG_SAMPLE: Duration = Duration::from_secs(10);
/// Unreadable dead jobs warned about once per process, at most this many.
const MAX_SKIPPED: usize = 4096;
/// At most this many dead jobs found settled are remembered, so a cycle
/// skips their run-record reads (~5 MiB of ids at most).
const MAX_SETTLED: usize = 1 << 16;

/// The most cascade markers one tick works on.
const CASCADES_PER_TICK: usize = 64;

/// The most replaced-placeholder markers one tick works on.
const PLACEHOLDERS_PER_TICK: usize = 256;

/// The most run tallies one tick folds into health records; a tick that
/// folds this many is followed by the next one at once.
const TALLIES_PER_TICK: usize = 10_000;

/// The pool's periodic work, until `stop` fires.
pub(super) async fn maintain<R, H>(
    inner: &Inner<R, H>,
    stop: &CancellationToken,
) -> Result<(), Error> {
    // Three loops: a fold that waits for a busy breaker workflow's lock, or
    // a slow reconcile page, never holds up retention (a soak saw a 15 s
    // fold leave outcomes 90 s past their expiry when they shared a tick).
    tokio::join!(
        ticking(inner, stop, Retention::new(inner.now_ms())),
        ticking(inner, stop, Upkeep::new()),
        ticking(inner, stop, Endings),
    );
    Ok(())
}

/// One kind of maintenance work, done a bounded slice per tick.
trait Pass {
    /// One slice. Returns whether a backlog is left (the next tick then
    /// follows at once).
    async fn tick<R, H>(&mut self, inner: &Inner<R, H>) -> bool;
}

/// Run `pass` every `poll_interval` (at once while it has a backlog) until
/// `stop` fires.
async fn ticking<R, H>(inner: &Inner<R, H>, stop: &CancellationToken, mut pass: impl Pass) {
    let mut tick = tokio::time::interval(inner.cfg.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A tick is abandoned at shutdown: its work is bounded and every
        // piece of it is safe to stop at an await (the next tick, or the
        // next process, picks up where it stopped).
        let backlog = tokio::select! {
            _ = stop.cancelled() => return,
            backlog = pass.tick(inner) => backlog,
        };
        if backlog {
            tick.reset_immediately();
        }
    }
}

/// At a clean shutdown, once the steps have drained: one more tally fold, so
/// the attempt results noted behind their settlements (workflows without a
/// breaker) are written rather than lost with the process. Bounded like a
/// tick, and by `store_timeout`; a failure is logged (those results only
/// inform, and the tallies stay for the next pool).
pub(super) async fn last_fold<R, H>(inner: &Inner<R, H>) {
    let fold = inner.breakers.fold_tallies(&inner.queue, TALLIES_PER_TICK);
    match tokio::time::timeout(inner.cfg.store_timeout, fold).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("the last tally fold at shutdown failed: {e}"),
        Err(_) => tracing::warn!("the last tally fold at shutdown timed out"),
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
    /// How far (ms) retention is behind after the last pass: the newest
    /// entry it deleted, past its retention, when it left a backlog (the
    /// oldest entry left is at most that far), and 0 when it left none due.
    pub(super) lag_ms: u64,
    /// Entries deleted by this `Expiring`, all its passes together.
    pub(super) deleted: u64,
    /// Runs whose data it found by a scan of their prefix, all its passes
    /// together (the rest were named by their entries).
    pub(super) data_scans: u64,
    /// Test hook: awaited once by a batch between its scan and its commit.
    #[cfg(test)]
    before_commit: Option<futures_util::future::BoxFuture<'static, ()>>,
}

impl Expiring {
    pub(super) fn new(now: u64) -> Self {
        Self {
            cursor: 0,
            rescanned_at: now,
            lag_ms: 0,
            deleted: 0,
            data_scans: 0,
            #[cfg(test)]
            before_commit: None,
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
        self.pass_with_data(inner, index, prefix, retention, records, |_, _| None)
            .await
    }

    /// [`Self::pass`], also deleting the data `data` finds for an entry
    /// (its suffix and its value): a run's data.
    pub(super) async fn pass_with_data<R, H, K: IntoIterator<Item = Vec<u8>>>(
        &mut self,
        inner: &Inner<R, H>,
        index: &ExpiryIndex,
        prefix: &[u8],
        retention: Duration,
        records: impl Fn(&str) -> K,
        data: impl Fn(&str, &[u8]) -> Option<RunData>,
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
                .batch(inner, index, prefix, now, retention, &records, &data)
                .await?
            {
                self.lag_ms = 0;
                return Ok(false);
            }
        }
        // The oldest entry left is at or after the cursor (unknown while
        // the cursor is at the front: the lag stays as it was).
        if self.cursor > 0 {
            self.lag_ms = inner
                .now_ms()
                .saturating_sub(self.cursor.saturating_add(retention));
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
        data_of: &impl Fn(&str, &[u8]) -> Option<RunData>,
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
        let mut data = Vec::new();
        // The batch commits only if every entry it deletes is still there:
        // a re-run takes its run's entry out of the index in its commit, and
        // its run (live again) must keep its records and data.
        let mut taken = Vec::new();
        for (key, value) in &page.entries {
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
                data.extend(data_of(id, value));
            }
            effects = effects.kv_delete(key.clone());
            taken.push((key.as_slice(), Some(value.as_ref())));
            last = Some(at);
        }
        let found = scan_each(data, |data| data.keys(inner)).await?;
        for (keys, scanned) in found {
            self.data_scans = self.data_scans.saturating_add(u64::from(scanned));
            for key in keys {
                effects = effects.kv_delete(key);
            }
        }
        if effects.kv_deletes.is_empty() {
            return Ok(false);
        }
        #[cfg(test)]
        if let Some(hook) = self.before_commit.take() {
            hook.await;
        }
        if inner
            .queue
            .kv_compare_commit(&taken, effects)
            .await?
            .is_none()
        {
            // An entry went meanwhile: read the batch again.
            return Ok(true);
        }
        if let Some(at) = last {
            self.cursor = at;
        }
        self.deleted = self.deleted.saturating_add(taken.len() as u64);
        Ok(all_due && page.more)
    }
}

/// Where retention finds an expired run's data (see [`DataSummary`]).
pub(super) enum RunData {
    /// Every key under this prefix, found by a scan: the run's entry names
    /// nothing (it was written before entries named the data, or the run
    /// was long).
    Scan(Vec<u8>),
    /// The keys the run's entry names, if the run's extent key says they
    /// are all of its data; else every key under the prefix, found by a
    /// scan.
    Named {
        prefix: Vec<u8>,
        extent: Vec<u8>,
        keys: Vec<Vec<u8>>,
    },
}

impl RunData {
    /// Run `run_id`'s data, as the value of its expiry entry describes it.
    /// A value this build cannot read sends retention to a scan.
    pub(super) fn of_run(keys: &Keys, run_id: &str, entry: &[u8]) -> Self {
        let prefix = keys.data(run_id);
        if entry.is_empty() {
            return Self::Scan(prefix);
        }
        let named = decode::<DataSummary>(keys.expiry_prefix(), entry)
            .ok()
            .and_then(|summary| summary.keys(keys, run_id));
        match named {
            Some(keys) => Self::Named {
                extent: data_extent(&prefix),
                prefix,
                keys,
            },
            None => Self::Scan(prefix),
        }
    }

    /// The keys to delete, and whether a scan found them.
    async fn keys<R, H>(self, inner: &Inner<R, H>) -> Result<(Vec<Vec<u8>>, bool), Error> {
        let prefix = match self {
            Self::Scan(prefix) => prefix,
            Self::Named {
                prefix,
                extent,
                keys,
            } => {
                let found = inner.queue.view().kv_get(&extent).await?;
                if found.as_deref() == Some(EXTENT_NAMED) {
                    return Ok((keys, false));
                }
                prefix
            }
        };
        Ok((scan_all(inner, &prefix).await?, true))
    }
}

/// What `find` returns for each of `data`, up to [`DATA_SCANS_AT_ONCE`]
/// at a time.
///
/// One after the other, each scan waited for its turn on a runtime busy
/// with steps, and a retention batch took seconds while runs kept ending (a
/// soak's retention fell behind with the process's CPU not all used).
async fn scan_each<D, F, Fut, T>(data: Vec<D>, find: F) -> Result<Vec<T>, Error>
where
    F: Fn(D) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    futures_util::stream::iter(data)
        .map(find)
        .buffered(DATA_SCANS_AT_ONCE)
        .try_collect()
        .await
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

/// A tick slower than this is reported, with the time of each part.
const SLOW_TICK: Duration = Duration::from_secs(2);

/// How long each part of one upkeep tick took.
#[derive(Default)]
struct Took {
    fold: Duration,
    tend: Duration,
    reconcile: Duration,
}

impl Took {
    /// Warn of a slow tick: retention and the breakers wait for it, so an
    /// operator should see which part held it up.
    fn report(&self) {
        let total = self.fold + self.tend + self.reconcile;
        if total >= SLOW_TICK {
            tracing::warn!(
                ?total,
                fold = ?self.fold,
                tend = ?self.tend,
                reconcile = ?self.reconcile,
                "a breaker upkeep tick was slow (the store is slow, or a backlog is being worked off)"
            );
        }
    }
}

/// Retention of run outcomes: what its ticks remember.
struct Retention {
    /// Where retention is in the outcome expiry index.
    outcomes: Expiring,
}

impl Retention {
    fn new(now: u64) -> Self {
        Self {
            outcomes: Expiring::new(now),
        }
    }
}

impl Pass for Retention {
    /// Delete the outcome and submit records (and the run's data) past
    /// their retention, up to [`EXPIRE_BATCHES_PER_TICK`] commits.
    async fn tick<R, H>(&mut self, inner: &Inner<R, H>) -> bool {
        let started = Instant::now();
        let keys = &inner.keys;
        let scans_before = self.outcomes.data_scans;
        let expired = self
            .outcomes
            .pass_with_data(
                inner,
                &inner.expiry,
                keys.expiry_prefix(),
                inner.cfg.terminal_retention,
                |run_id| [keys.sub(run_id), keys.out(run_id)],
                |run_id, entry| Some(RunData::of_run(keys, run_id, entry)),
            )
            .await;
        super::metrics::retention_data_scans(self.outcomes.data_scans.saturating_sub(scans_before));
        let took = started.elapsed();
        if took >= SLOW_TICK {
            tracing::warn!(
                ?took,
                "a retention pass was slow (the store is slow, or a backlog is being worked off)"
            );
        }
        // A failed pass leaves the lag as the last pass found it.
        if expired.is_ok() {
            super::metrics::retention_lag(self.outcomes.lag_ms);
            inner
                .backpressure
                .report(self.outcomes.lag_ms, self.outcomes.deleted, inner.now_ms());
        }
        expired.unwrap_or_else(|e| {
            tracing::warn!("retention pass failed (retried next tick): {e}");
            false
        })
    }
}

/// Runs ended by the clock or by their parent, and what joins leave:
/// deadlines, cancel cascades, replaced placeholders. Remembers nothing
/// between ticks.
struct Endings;

impl Pass for Endings {
    /// End the runs past their deadline, work one page of cascades and one
    /// of replaced placeholders. Returns whether a full page of either was
    /// read.
    async fn tick<R, H>(&mut self, inner: &Inner<R, H>) -> bool {
        if let Err(e) = deadlines(inner).await {
            tracing::warn!("ending runs past their deadline failed (retried next tick): {e}");
        }
        let cascaded = cascades(inner).await.unwrap_or_else(|e| {
            tracing::warn!("cancelling ended parents' children failed (retried next tick): {e}");
            false
        });
        let replaced = placeholders(inner).await.unwrap_or_else(|e| {
            tracing::warn!("removing joined parents' placeholders failed (retried next tick): {e}");
            false
        });
        cascaded || replaced
    }
}

/// The breakers' upkeep and the reconcile of dead steps: what their ticks
/// remember.
struct Upkeep {
    /// The reconcile cycle's position: the last dead job id read, `None`
    /// between cycles.
    dead_after: Option<String>,
    /// When the current (or last) reconcile cycle started.
    cycle_started: Option<Instant>,
    /// How long the current (or last) cycle spent reading: the rest after
    /// it is a multiple of this.
    cycle_busy: Duration,
    /// A full cycle starts at the next tick whatever the time.
    cycle_due: bool,
    /// Whether the next tick is this pass's first.
    starting: bool,
    /// When (ms, the queue's clock) another full cycle is due: a lease and
    /// the reaper's slack after the pool started or watched claims
    /// overflowed, when every claim let go of before then can have been
    /// dead-lettered.
    again_at_ms: Option<u64>,
    /// When the backlog gauges were last sampled.
    backlog_sampled: Option<Instant>,
    /// Dead jobs already reported as unreadable.
    skipped: HashSet<String>,
    /// Dead jobs the last full cycle found settled: reconciled, or not
    /// their run's current step (for good: only the commit that creates a
    /// job points a run record at it). The next cycle skips their read.
    settled: HashSet<String>,
    /// Those the current cycle found settled (listed again, or new); they
    /// replace `settled` when it ends, so the jobs the queue's retention
    /// removed are forgotten.
    settled_now: HashSet<String>,
}

impl Pass for Upkeep {
    /// Fold tallies, tend the breakers, reconcile the watched claims and a
    /// page of dead jobs. Returns whether the fold has a backlog left.
    async fn tick<R, H>(&mut self, inner: &Inner<R, H>) -> bool {
        let mut took = Took::default();
        let mut part = Instant::now();
        let mut lap = |at: &mut Duration| {
            *at = part.elapsed();
            part = Instant::now();
        };
        let mut backlog = false;
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
        lap(&mut took.fold);
        let tended = {
            let _watch = watched(inner, WATCH);
            inner.breakers.tend(&inner.queue, inner.now_ms()).await
        };
        if let Err(e) = tended {
            tracing::warn!("breaker upkeep failed (retried next tick): {e}");
        }
        lap(&mut took.tend);
        if let Err(e) = self.sample_backlog(inner).await {
            tracing::warn!("sampling the step queue's backlog failed (retried next tick): {e}");
        }
        self.reconcile(inner).await;
        lap(&mut took.reconcile);
        took.report();
        backlog
    }
}

impl Upkeep {
    fn new() -> Self {
        Self {
            dead_after: None,
            cycle_started: None,
            cycle_busy: Duration::ZERO,
            cycle_due: false,
            starting: true,
            again_at_ms: None,
            backlog_sampled: None,
            skipped: HashSet::new(),
            settled: HashSet::new(),
            settled_now: HashSet::new(),
        }
    }

    /// Sample the step queue's job counts for the `waymark_backlog` gauges,
    /// at most every [`BACKLOG_SAMPLE`].
    async fn sample_backlog<R, H>(&mut self, inner: &Inner<R, H>) -> Result<(), Error> {
        if self
            .backlog_sampled
            .is_some_and(|at| at.elapsed() < BACKLOG_SAMPLE)
        {
            return Ok(());
        }
        self.backlog_sampled = Some(Instant::now());
        // Five reads.
        let stats = {
            let _watch = watched(inner, WATCH);
            inner.queue.view().stats(&inner.cfg.queue_name).await?
        };
        super::metrics::backlog(&stats);
        Ok(())
    }

    /// The reconcile's part of a tick: the watched claims, then a page of
    /// the dead-letter listing when a full cycle is on.
    async fn reconcile<R, H>(&mut self, inner: &Inner<R, H>) {
        let now = inner.now_ms();
        if std::mem::take(&mut self.starting) || inner.lapsed.take_overflow() {
            // At start, a dead process's claims are dead already (at open);
            // a claim not watched (an overflow), or let go of by an earlier
            // pool on this runtime, is dead once its lease is reaped.
            self.cycle_due = true;
            let lease = inner
                .queue
                .queue_config(&inner.cfg.queue_name)
                .lease_duration;
            let after = lease.saturating_add(crate::lapsed::SLACK);
            self.again_at_ms = Some(now.saturating_add(saturating_ms(after)));
        }
        if self.again_at_ms.is_some_and(|at| at <= now) {
            self.cycle_due = true;
            self.again_at_ms = None;
        }
        if let Err(e) = self.reconcile_lapsed(inner).await {
            tracing::warn!("reconciling lapsed step claims failed (retried next tick): {e}");
        }
        if let Err(e) = self.reconcile_page(inner).await {
            tracing::warn!("reconciling dead-lettered steps failed (retried next tick): {e}");
        }
    }

    /// Read the watched step claims that are due (see [`crate::lapsed`]):
    /// a job the queue dead-lettered has its run reconciled; a job still
    /// under the same claim (its lease has not run out, or the reaper has
    /// not come to it) is read again a [`RECHECK`](crate::lapsed::RECHECK)
    /// later; any other state means the claim ended otherwise, and it is
    /// forgotten. A claim whose read fails stays due.
    async fn reconcile_lapsed<R, H>(&mut self, inner: &Inner<R, H>) -> Result<(), Error> {
        for (job_id, seen) in inner.lapsed.due(inner.now_ms(), LAPSED_PER_TICK) {
            let job = {
                let _watch = watched(inner, WATCH);
                inner.queue.view().job_record(&job_id).await?
            };
            let again = match job {
                Some(job) if job.status == JobStatus::Dead => {
                    let reconciled = {
                        let _watch = watched(inner, WATCH);
                        inner.reconcile_dead(&job).await
                    };
                    match reconciled {
                        Ok(_) => None,
                        Err(e) if !e.is_permanent() => return Err(e),
                        Err(e) => {
                            self.skip(&job_id, &e);
                            None
                        }
                    }
                }
                Some(job) if job.status == JobStatus::Claimed && job.attempts <= seen.attempts => {
                    let recheck = saturating_ms(crate::lapsed::RECHECK);
                    Some(inner.now_ms().saturating_add(recheck))
                }
                _ => None,
            };
            inner.lapsed.looked(&job_id, seen, again);
        }
        Ok(())
    }

    /// Reconcile one page of the step queue's dead jobs. A full cycle
    /// through the listing runs when the pool starts (the claims of a
    /// process that died are dead-lettered when the store opens) and after
    /// watched claims overflowed, each time twice (see [`Self::reconcile`]);
    /// otherwise at most every [`RECONCILE_CYCLE`], resting at least
    /// [`CYCLE_SHARE`] times what the last cycle spent reading, to find
    /// what no watch saw (a step whose thread never returns).
    async fn reconcile_page<R, H>(&mut self, inner: &Inner<R, H>) -> Result<(), Error> {
        if self.dead_after.is_none() {
            let rest = RECONCILE_CYCLE
                .max(inner.cfg.poll_interval)
                .max(self.cycle_busy.saturating_mul(CYCLE_SHARE));
            if !self.cycle_due && self.cycle_started.is_some_and(|at| at.elapsed() < rest) {
                return Ok(());
            }
            self.cycle_due = false;
            self.cycle_started = Some(Instant::now());
            self.cycle_busy = Duration::ZERO;
        }
        let reading = Instant::now();
        let read = self.reconcile_listed(inner).await;
        self.cycle_busy = self.cycle_busy.saturating_add(reading.elapsed());
        read
    }

    /// Read and reconcile the next page of the listing.
    async fn reconcile_listed<R, H>(&mut self, inner: &Inner<R, H>) -> Result<(), Error> {
        let page = {
            let _watch = watched(inner, WATCH);
            inner
                .queue
                .view()
                .dead_jobs(&inner.cfg.queue_name, self.dead_after.as_deref(), DEAD_PAGE)
                .await?
        };
        for job in &page {
            if self.settled.contains(&job.id) {
                self.note_settled(&job.id);
                continue;
            }
            let reconciled = {
                let _watch = watched(inner, WATCH);
                inner.reconcile_dead(job).await
            };
            match reconciled {
                Ok(_) => self.note_settled(&job.id),
                // The store failed: this page is read again next tick.
                Err(e) if !e.is_permanent() => return Err(e),
                Err(e) => self.skip(&job.id, &e),
            }
        }
        self.dead_after = match page.last() {
            Some(last) if page.len() == DEAD_PAGE => Some(last.id.clone()),
            _ => None,
        };
        if self.dead_after.is_none() {
            self.settled = std::mem::take(&mut self.settled_now);
        }
        Ok(())
    }

    /// Warn once of a dead job whose run cannot be read.
    fn skip(&mut self, job_id: &str, e: &Error) {
        if self.skipped.len() < MAX_SKIPPED && self.skipped.insert(job_id.to_string()) {
            tracing::warn!(
                job_id,
                "skipping a dead-lettered step whose run cannot be read: {e}"
            );
        }
    }

    /// Remember a dead job found settled, up to [`MAX_SETTLED`] a cycle
    /// (past that, the rest are read again each cycle).
    fn note_settled(&mut self, job_id: &str) {
        if self.settled_now.len() < MAX_SETTLED {
            self.settled_now.insert(job_id.to_string());
        }
    }
}

/// End the runs whose deadline has passed. A running step is asked to stop
/// (its `cancel_token` fires) and its entry is kept until the step's
/// settlement ends the run; every other live run ends `TimedOut` in the
/// transaction that removes its waiting step.
async fn deadlines<R, H>(inner: &Inner<R, H>) -> Result<(), Error> {
    let now = inner.now_ms();
    inner
        .deadlines
        .pass(&inner.queue, now, Duration::ZERO, |at, suffix| async move {
            let Ok(run_id) = String::from_utf8(suffix) else {
                return Expired::Delete(SettlementEffects::default());
            };
            // Watched one run at a time (each ending is a durable commit):
            // a backlog of thousands is not a stuck store.
            let timed_out = {
                let _watch = watched(inner, WATCH);
                time_out(inner, &run_id, at).await
            };
            match timed_out {
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
    inner.end_run(run_id, Ending::Deadline(at), Ok).await?;
    Ok(inner.current_step(run_id).await?.is_some())
}

/// The first `limit` markers under `prefix` (cascades, replaced
/// placeholders): each is deleted once its work is done, so the front of
/// the prefix is always what is left to do.
async fn markers<R, H>(
    inner: &Inner<R, H>,
    prefix: &[u8],
    limit: usize,
) -> Result<taquba::KvPage, Error> {
    let _watch = watched(inner, WATCH);
    Ok(inner
        .queue
        .view()
        .kv_scan(prefix, .., KvOrder::Ascending, limit)
        .await?)
}

/// Cancel the live children of ended parents (their cascade markers).
/// Returns whether a full page of markers was read (more may wait).
async fn cascades<R, H>(inner: &Inner<R, H>) -> Result<bool, Error> {
    let page = markers(inner, inner.keys.cascade_prefix(), CASCADES_PER_TICK).await?;
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
            if let Err(e) = inner.end_run(child, Ending::Cancel, Ok).await {
                tracing::warn!(child, "cancelling a child of an ended parent failed: {e}");
                done = false;
            }
        }
        if done {
            // Only the marker as read: one an ending rewrote meanwhile (a
            // re-run parent that ended again) lists more, for the next tick.
            let _watch = watched(inner, WATCH);
            let gone = SettlementEffects::default().kv_delete(key.clone());
            inner
                .queue
                .kv_compare_commit(&[(&key[..], Some(&value[..]))], gone)
                .await?;
        }
    }
    Ok(page.more)
}

/// Remove the placeholder jobs that joins replaced and that are still in
/// the queue (a crash, or a failed removal, right after the join's commit).
/// Returns whether a full page of markers was read (more may wait).
async fn placeholders<R, H>(inner: &Inner<R, H>) -> Result<bool, Error> {
    let page = markers(inner, inner.keys.replaced_prefix(), PLACEHOLDERS_PER_TICK).await?;
    let prefix = inner.keys.replaced_prefix().len();
    for (key, _) in &page.entries {
        let replaced = crate::children::Replaced {
            job: String::from_utf8_lossy(key.get(prefix..).unwrap_or_default()).into_owned(),
            marker: key.clone(),
        };
        let _watch = watched(inner, WATCH);
        replaced.remove(&inner.queue).await?;
    }
    Ok(page.more)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use taquba::{EnqueueOptions, JobStatus, KvOrder, MockClock, OpenOptions, Queue};

    use crate::hook::{NoopTerminalHook, RunOutcome, TerminalStatus};
    use crate::record::HEADER_JOIN;
    use crate::runner::{ChildSpec, Done, Step, StepError, StepOutcome, StepRunner};
    use crate::runtime::{Inner, RunSpec, Terminal, WorkflowRuntime};

    /// A retention batch's data scans run [`super::DATA_SCANS_AT_ONCE`] at
    /// a time, and their keys come back in the order of the prefixes. Each
    /// scan here waits until a whole group of them has started, which scans
    /// run one after the other never reach: the paused clock then runs out
    /// the timeout.
    #[tokio::test(start_paused = true)]
    async fn a_batch_scans_its_runs_data_concurrently() {
        let at_once = super::DATA_SCANS_AT_ONCE;
        let group = Arc::new(tokio::sync::Barrier::new(at_once));
        let prefixes: Vec<Vec<u8>> = (0..at_once * 2)
            .map(|i| format!("run-{i:03}/").into_bytes())
            .collect();
        let scans = super::scan_each(prefixes.clone(), |prefix| {
            let group = Arc::clone(&group);
            async move {
                group.wait().await;
                Ok([prefix.as_slice(), b"memo"].concat())
            }
        });
        let found: Vec<Vec<u8>> = tokio::time::timeout(Duration::from_secs(60), scans)
            .await
            .expect("the scans ran one after the other")
            .unwrap();
        let expected: Vec<Vec<u8>> = prefixes
            .iter()
            .map(|prefix| [prefix.as_slice(), b"memo"].concat())
            .collect();
        assert_eq!(found, expected);
    }

    /// A runtime of `runner` on a fresh in-memory store (1 ms flush), with
    /// maintenance ticks every `poll`, its pool running until `stop` fires.
    async fn running<R: StepRunner>(
        runner: R,
        poll: Duration,
    ) -> (
        WorkflowRuntime<R, NoopTerminalHook>,
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<Result<(), crate::Error>>,
    ) {
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let opts = OpenOptions {
            flush_interval: Some(Duration::from_millis(1)),
            ..Default::default()
        };
        let queue = Arc::new(Queue::open_with_options(store, "t", opts).await.unwrap());
        let rt = WorkflowRuntime::builder(queue, runner, NoopTerminalHook)
            .poll_interval(poll)
            .build()
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let pool = tokio::spawn({
            let rt = rt.clone();
            let stop = stop.clone();
            async move { rt.run(stop.cancelled_owned()).await }
        });
        (rt, stop, pool)
    }

    /// A parent spawns one child, whose step 0 waits an hour; every other
    /// step succeeds.
    struct OneChild;

    impl StepRunner for OneChild {
        async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
            Ok(match (step.run_id.as_str(), step.step_number) {
                ("p", 0) => StepOutcome::SpawnChildren {
                    children: vec![ChildSpec::default()],
                    payload: vec![],
                    fail_fast: false,
                },
                ("p", _) => StepOutcome::Succeed { result: vec![] },
                (_, 0) => StepOutcome::ContinueAfter {
                    payload: vec![],
                    delay: Duration::from_secs(3600),
                },
                _ => StepOutcome::Succeed { result: vec![] },
            })
        }
    }

    /// A parent spawns two children, which succeed; it then succeeds.
    struct TwoChildren;

    impl StepRunner for TwoChildren {
        async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
            Ok(match (step.run_id.as_str(), step.step_number) {
                ("p", 0) => StepOutcome::SpawnChildren {
                    children: vec![ChildSpec::default(), ChildSpec::default()],
                    payload: vec![],
                    fail_fast: false,
                },
                _ => StepOutcome::Succeed { result: vec![] },
            })
        }
    }

    /// The step jobs this process enqueued are remembered until claimed (a
    /// claim of one needs no read of its run record). A join's placeholder
    /// is never claimed: remembered, it stayed in the set for good, one
    /// entry a spawn, until the set was full and nothing more was
    /// remembered.
    #[tokio::test]
    async fn a_joined_family_leaves_no_job_remembered() {
        let (rt, stop, pool) = running(TwoChildren, Duration::from_millis(5)).await;
        rt.submit(RunSpec {
            run_id: Some("p".into()),
            ..Default::default()
        })
        .await
        .unwrap();
        let out = rt.wait("p").await.unwrap();
        assert_eq!(out.status, TerminalStatus::Succeeded, "{out:?}");
        assert_eq!(rt.inner.pending.own_len(), 0);
        stop.cancel();
        pool.await.unwrap().unwrap();
    }

    /// A kill between a join's commit and the removal of the parent's
    /// placeholder job left that job in the queue for good (scheduled 100
    /// years ahead). The join's commit now lists it for removal, and the
    /// maintenance pass removes it.
    #[tokio::test]
    async fn a_placeholder_left_by_a_crash_after_the_join_is_removed() {
        let (rt, stop, pool) = running(OneChild, Duration::from_millis(5)).await;
        rt.submit(RunSpec {
            run_id: Some("p".into()),
            ..Default::default()
        })
        .await
        .unwrap();
        let inner = &rt.inner;
        // The child waits at its scheduled step 1; the parent on its
        // placeholder.
        let (child, placeholder) = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let (Some((_, child)), Some((_, parent))) = (
                    inner.current_step("p.0.0").await.unwrap(),
                    inner.current_step("p").await.unwrap(),
                ) && child.status == JobStatus::Scheduled
                {
                    return (child, parent.id);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the child reached its scheduled step");
        // End the child as `cancel` does, and crash before the aftermath:
        // the join commits, the placeholder's removal never runs.
        let outcome = RunOutcome {
            run_id: "p.0.0".into(),
            workflow: "default".into(),
            status: TerminalStatus::Cancelled,
            result: None,
            error: None,
            headers: Default::default(),
            final_step: 1,
            reruns: 0,
        };
        let Terminal { effects, hold } = inner
            .terminal_effects(&outcome, &child.headers, Some(&child.id))
            .await
            .unwrap()
            .expect("the child is at that job");
        let (ended, _) = inner.queue.cancel_with(&child.id, effects).await.unwrap();
        assert_eq!(ended, taquba::CancelOutcome::Removed);
        drop(hold);
        // The parent's join step runs on the real job; the placeholder goes.
        assert_eq!(
            rt.wait("p").await.unwrap().status,
            TerminalStatus::Succeeded
        );
        tokio::time::timeout(Duration::from_secs(60), async {
            while inner
                .queue
                .view()
                .get_job(&placeholder)
                .await
                .unwrap()
                .is_some_and(|job| job.status == JobStatus::Scheduled)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the placeholder was removed");
        let markers = inner
            .queue
            .view()
            .kv_scan(inner.keys.replaced_prefix(), .., KvOrder::Ascending, 10)
            .await
            .unwrap();
        assert!(markers.entries.is_empty(), "its marker went with it");
        stop.cancel();
        pool.await.unwrap().unwrap();
    }

    /// A placeholder a crash left behind (above) can outlive its segment: a
    /// run that continued as new and spawned at the same step before the
    /// pass removed it gave its new placeholder the old one's dedup key
    /// (`run:{id}:{n}:join`, no segment), so the new one was a dedup hit,
    /// never written, and the run record named a job that did not exist
    /// until the children ended. Placeholders now carry no dedup key, as
    /// no step job does. Shown by the old placeholder written first.
    #[tokio::test]
    async fn a_placeholder_left_from_an_earlier_segment_does_not_hide_the_next() {
        let (rt, stop, pool) = running(OneChild, Duration::from_millis(5)).await;
        let inner = &rt.inner;
        inner
            .queue
            .enqueue_with(
                &inner.cfg.queue_name,
                Vec::new(),
                EnqueueOptions::default()
                    .dedup_key("run:p:1:join".to_string())
                    .run_at(std::time::SystemTime::now() + Duration::from_secs(3600)),
            )
            .await
            .unwrap();
        rt.submit(RunSpec {
            run_id: Some("p".into()),
            ..Default::default()
        })
        .await
        .unwrap();
        let waiting = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Some((run, job)) = inner.current_step("p").await.unwrap()
                    && run.step == 1
                {
                    return job;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the parent waits on a placeholder job that exists");
        assert!(waiting.headers.contains_key(HEADER_JOIN), "{waiting:?}");
        stop.cancel();
        pool.await.unwrap().unwrap();
    }

    /// The cascade pass deletes a marker only if it still holds what the
    /// pass read: a re-run parent that ends again while the pass cancels
    /// the first ending's children rewrites the marker with its own
    /// children too, and a plain delete dropped them uncancelled.
    #[tokio::test]
    async fn a_cascade_marker_rewritten_during_its_pass_is_kept() {
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let queue = Arc::new(Queue::open(store, "t").await.unwrap());
        let rt = WorkflowRuntime::builder(queue, Done, NoopTerminalHook)
            .build()
            .unwrap();
        let inner = &rt.inner;
        let key = inner.keys.cascade("p");
        let first = crate::record::encode(&key, &vec!["p.0.a".to_string()]).unwrap();
        inner.queue.kv_put(&key, &first).await.unwrap();
        // The pass reads the marker, then waits to cancel its child.
        let held = inner.endings.lock("p.0.a").await;
        let pass = super::cascades(inner);
        tokio::pin!(pass);
        let mut polls = 0;
        while inner.endings.users("p.0.a") <= 2 {
            assert!(futures_util::poll!(pass.as_mut()).is_pending());
            polls += 1;
            assert!(polls < 10_000, "the pass never reached the child");
            tokio::task::yield_now().await;
        }
        // The parent ends again, with a child of its re-run.
        let second =
            crate::record::encode(&key, &vec!["p.0.a".to_string(), "p.0r1.a".to_string()]).unwrap();
        inner.queue.kv_put(&key, &second).await.unwrap();
        drop(held);
        pass.await.unwrap();
        let kept = inner.queue.view().kv_get(&key).await.unwrap();
        assert_eq!(
            kept.as_deref(),
            Some(&second[..]),
            "the rewritten marker is left for the next pass"
        );
        // The next pass finishes it.
        super::cascades(inner).await.unwrap();
        assert_eq!(inner.queue.view().kv_get(&key).await.unwrap(), None);
    }

    /// A reconcile cycle reads the run record of every dead step job, and
    /// the dead jobs stay listed for the queue's retention (7 days by
    /// default): with many of them, each cycle repeated every read of the
    /// last. A dead job found settled is now skipped by the next cycle.
    /// Shown by a state no commit makes: after the first cycle, the run
    /// record is pointed at the dead job, which a read would reconcile.
    #[tokio::test]
    async fn a_dead_job_found_settled_is_not_read_again() {
        let (_clock, queue) = mock_clock_queue().await;
        let rt = WorkflowRuntime::builder(queue.clone(), Done, NoopTerminalHook)
            .build()
            .unwrap();
        let inner = &rt.inner;
        rt.submit(RunSpec {
            run_id: Some("r".into()),
            ..Default::default()
        })
        .await
        .unwrap();
        let claim = queue
            .claim(&inner.cfg.queue_name, Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        queue.dead_letter(&claim, "lease expired").await.unwrap();
        let run_key = inner.keys.run("r");
        let original = queue.view().kv_get(&run_key).await.unwrap().unwrap();
        let elsewhere = crate::record::RunRecord {
            step: 0,
            job_id: "another-job".into(),
        };
        let value = crate::record::encode(&run_key, &elsewhere).unwrap();
        queue.kv_put(&run_key, &value).await.unwrap();
        let mut upkeep = super::Upkeep::new();
        upkeep.reconcile_page(inner).await.unwrap();
        assert!(upkeep.dead_after.is_none(), "one page: the cycle ended");
        queue.kv_put(&run_key, &original).await.unwrap();
        upkeep.cycle_due = true;
        upkeep.reconcile_page(inner).await.unwrap();
        assert!(
            queue.view().kv_get(&run_key).await.unwrap().is_some(),
            "the second cycle read the run record again and ended the run"
        );
        assert!(upkeep.settled.contains(&claim.id), "still listed: kept");
    }

    /// Runs `ids` submitted on a runtime without a pool, and each run's
    /// step 0 claimed (by hand, as the pool would), in `ids` order.
    async fn claimed(
        queue: &Arc<Queue>,
        ids: &[&str],
    ) -> (WorkflowRuntime<Done, NoopTerminalHook>, Vec<taquba::Claim>) {
        let rt = WorkflowRuntime::builder(queue.clone(), Done, NoopTerminalHook)
            .build()
            .unwrap();
        let mut claims = Vec::new();
        for id in ids {
            rt.submit(RunSpec {
                run_id: Some(id.to_string()),
                max_attempts_per_step: Some(1),
                ..Default::default()
            })
            .await
            .unwrap();
            let claim = queue
                .claim(&rt.inner.cfg.queue_name, Duration::from_secs(30))
                .await
                .unwrap()
                .unwrap();
            claims.push(claim);
        }
        (rt, claims)
    }

    /// Whether run `id` still has its live record (the reconcile deletes
    /// it; the reads report a dead step's outcome without it).
    async fn live<R, H>(inner: &Inner<R, H>, id: &str) -> bool {
        let key = inner.keys.run(id);
        inner.queue.view().kv_get(&key).await.unwrap().is_some()
    }

    /// An upkeep past its first tick's full cycle, the next one not due.
    async fn upkeep_past_its_first_cycle<R, H>(inner: &Inner<R, H>) -> super::Upkeep {
        let mut upkeep = super::Upkeep::new();
        upkeep.reconcile(inner).await;
        assert!(upkeep.dead_after.is_none() && !upkeep.cycle_due);
        upkeep
    }

    /// The reconcile no longer lists the dead letters every second: a claim
    /// this process let go of is watched, and read once it is due. A job the
    /// queue dead-lettered ends its run; a job still under the same claim is
    /// read again later; a job claimed again is forgotten (its new claim is
    /// watched on its own).
    #[tokio::test]
    async fn a_watched_claim_the_queue_dead_lettered_ends_its_run_without_a_listing() {
        let (clock, queue) = mock_clock_queue().await;
        let (rt, claims) = claimed(&queue, &["dead", "held"]).await;
        let inner = &rt.inner;
        let mut upkeep = upkeep_past_its_first_cycle(inner).await;
        let (dead, held) = (&claims[0], &claims[1]);
        // The reaper's doing, which nothing in this process sees.
        queue.dead_letter(dead, "lease expired").await.unwrap();
        upkeep.reconcile(inner).await;
        assert!(live(inner, "dead").await, "no listing");

        let now = inner.now_ms();
        inner.lapsed.watch(&dead.id, dead.attempts, now);
        inner.lapsed.watch(&held.id, held.attempts, now);
        upkeep.reconcile(inner).await;
        assert!(!live(inner, "dead").await, "reconciled");
        let out = rt.outcome("dead").await.unwrap().unwrap();
        assert_eq!(out.status, TerminalStatus::Failed);
        assert!(live(inner, "held").await);
        assert_eq!(inner.lapsed.len(), 1, "the held claim is watched again");
        assert!(inner.lapsed.due(now, 10).is_empty(), "later");
        clock.advance(crate::lapsed::RECHECK);
        let again = inner.lapsed.due(inner.now_ms(), 10);
        assert_eq!(again.len(), 1, "a recheck later");

        inner.lapsed.looked(&held.id, again[0].1, None);
        inner
            .lapsed
            .watch(&held.id, held.attempts - 1, inner.now_ms());
        upkeep.reconcile(inner).await;
        assert_eq!(inner.lapsed.len(), 0, "claimed again since: forgotten");
        assert!(live(inner, "held").await);
    }

    /// After its first cycle the listing rests [`super::RECONCILE_CYCLE`];
    /// watched claims that overflowed bring a full cycle at once, since a
    /// claim that went unwatched can only be found by the listing.
    #[tokio::test(start_paused = true)]
    async fn the_dead_letters_are_listed_at_start_after_an_overflow_and_rarely_else() {
        let (_clock, queue) = mock_clock_queue().await;
        let (rt, claims) = claimed(&queue, &["first", "overflowed", "late"]).await;
        let inner = &rt.inner;
        queue
            .dead_letter(&claims[0], "lease expired")
            .await
            .unwrap();
        let mut upkeep = upkeep_past_its_first_cycle(inner).await;
        assert!(!live(inner, "first").await, "at start");

        queue
            .dead_letter(&claims[1], "lease expired")
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        upkeep.reconcile(inner).await;
        assert!(live(inner, "overflowed").await);
        for i in 0..=crate::lapsed::MAX_WATCHED {
            inner.lapsed.watch(&format!("j{i}"), 1, u64::MAX);
        }
        upkeep.reconcile(inner).await;
        assert!(!live(inner, "overflowed").await);

        queue
            .dead_letter(&claims[2], "lease expired")
            .await
            .unwrap();
        tokio::time::advance(super::RECONCILE_CYCLE - Duration::from_secs(1)).await;
        upkeep.reconcile(inner).await;
        assert!(live(inner, "late").await);
        tokio::time::advance(Duration::from_secs(1)).await;
        upkeep.reconcile(inner).await;
        assert!(!live(inner, "late").await, "the rest is over");
    }

    /// A claim still held when the pool starts (let go of by an earlier pool
    /// of this runtime, aborted with it) is dead-lettered by the reaper only
    /// once its lease runs out, after the first listing: a second listing
    /// then finds it.
    #[tokio::test]
    async fn a_claim_reaped_after_the_first_listing_is_found_by_the_second() {
        let (clock, queue) = mock_clock_queue().await;
        let (rt, claims) = claimed(&queue, &["early"]).await;
        let inner = &rt.inner;
        let mut upkeep = upkeep_past_its_first_cycle(inner).await;
        assert!(live(inner, "early").await, "claimed, not dead yet");
        queue
            .dead_letter(&claims[0], "lease expired")
            .await
            .unwrap();
        let lease = queue.queue_config(&inner.cfg.queue_name).lease_duration;
        let wait = lease + crate::lapsed::SLACK;
        clock.advance(wait - Duration::from_millis(1));
        upkeep.reconcile(inner).await;
        assert!(live(inner, "early").await);
        clock.advance(Duration::from_millis(1));
        upkeep.reconcile(inner).await;
        assert!(!live(inner, "early").await, "the second listing");
    }

    /// Step 0 waits an hour; then the run succeeds.
    struct Later;

    impl StepRunner for Later {
        async fn run_step(&self, step: &Step) -> Result<StepOutcome, StepError> {
            Ok(match step.step_number {
                0 => StepOutcome::ContinueAfter {
                    payload: vec![],
                    delay: Duration::from_secs(3600),
                },
                _ => StepOutcome::Succeed { result: vec![] },
            })
        }
    }

    /// The deadline pass held one store-watchdog guard for all its endings,
    /// each a durable commit: 20 due deadlines at a 100 ms flush kept it
    /// over a 1 s `store_timeout`, and the pool stopped, reporting a stuck
    /// store (and after a restart did it again). Each ending is now
    /// watched on its own.
    #[tokio::test]
    async fn a_backlog_of_deadlines_is_not_a_stuck_store() {
        let clock = MockClock::new(1_000_000);
        let opts = OpenOptions {
            clock: Arc::new(clock.clone()),
            flush_interval: Some(Duration::from_millis(100)),
            ..Default::default()
        };
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let queue = Arc::new(Queue::open_with_options(store, "t", opts).await.unwrap());
        let rt = WorkflowRuntime::builder(queue, Later, NoopTerminalHook)
            .store_timeout(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(10))
            .build()
            .unwrap();
        let ids: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
        for id in &ids {
            rt.submit(RunSpec {
                run_id: Some(id.clone()),
                deadline: Some(crate::runtime::Deadline::After(Duration::from_secs(60))),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let mut pool = tokio::spawn({
            let rt = rt.clone();
            let stop = stop.clone();
            async move { rt.run(stop.cancelled_owned()).await }
        });
        for id in &ids {
            while rt.status(id).await.unwrap().unwrap().current_step == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        clock.advance(Duration::from_secs(120));
        for id in &ids {
            let out = tokio::select! {
                out = rt.wait(id) => out.unwrap(),
                stopped = &mut pool => panic!("the pool stopped: {stopped:?}"),
            };
            assert_eq!(out.status, TerminalStatus::TimedOut);
        }
        stop.cancel();
        pool.await.unwrap().unwrap();
    }

    /// A fresh in-memory queue (1 ms flush) on a mock clock.
    async fn mock_clock_queue() -> (MockClock, Arc<Queue>) {
        let clock = MockClock::new(1_000_000);
        let opts = OpenOptions {
            clock: Arc::new(clock.clone()),
            flush_interval: Some(Duration::from_millis(1)),
            ..Default::default()
        };
        let store = Arc::new(taquba::object_store::memory::InMemory::new());
        let queue = Arc::new(Queue::open_with_options(store, "t", opts).await.unwrap());
        (clock, queue)
    }

    /// Soak regression: retention and the tally fold shared one tick, so a
    /// fold waiting on a busy breaker workflow's lock (15 s in the soak)
    /// held retention up with it, and outcomes stayed 90 s past their
    /// expiry. With the fold stuck for good, retention still runs.
    #[tokio::test]
    async fn retention_goes_on_while_a_fold_is_held_up() {
        let (clock, queue) = mock_clock_queue().await;
        let rt = WorkflowRuntime::builder(queue, Done, NoopTerminalHook)
            .poll_interval(Duration::from_millis(5))
            .terminal_retention(Duration::from_secs(60))
            .build()
            .unwrap();
        // Every fold that commits never returns (it holds its workflow's
        // writer lock and the upkeep loop with it).
        let (folded, mut fold_stuck) = tokio::sync::mpsc::unbounded_channel::<()>();
        rt.inner.breakers.set_after_fold(Box::new(move || {
            let _ = folded.send(());
            Box::pin(std::future::pending())
        }));
        let stop = tokio_util::sync::CancellationToken::new();
        let pool = tokio::spawn({
            let rt = rt.clone();
            let stop = stop.clone();
            async move { rt.run(stop.cancelled_owned()).await }
        });
        for id in ["a", "b"] {
            rt.submit(RunSpec {
                run_id: Some(id.into()),
                ..Default::default()
            })
            .await
            .unwrap();
            rt.wait(id).await.unwrap();
        }
        fold_stuck
            .recv()
            .await
            .expect("a fold committed and is stuck");
        clock.advance(Duration::from_secs(61));
        // Retention deletes both outcomes while the fold stays stuck (the
        // bound only turns a hang into a failure).
        let expired = async {
            for id in ["a", "b"] {
                while rt.outcome(id).await.unwrap().is_some() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), expired)
            .await
            .expect("retention went on while the fold was stuck");
        stop.cancel();
        pool.abort();
    }

    /// `n` retention entries from now on, a millisecond apart, for runs
    /// `r0`, `r1`, ….
    async fn seed_expiry(
        inner: &crate::runtime::Inner<Done, NoopTerminalHook>,
        queue: &Queue,
        n: u64,
    ) {
        let t0 = inner.now_ms();
        let mut entries = taquba::SettlementEffects::default();
        for i in 0..n {
            let key = inner.expiry.entry_key(t0 + i, format!("r{i}").as_bytes());
            entries = entries.kv_put(key, Vec::new());
        }
        queue.commit_effects(entries).await.unwrap();
    }

    /// One retention pass over run outcomes kept 60 s, as the pool runs it.
    async fn outcome_pass(
        inner: &crate::runtime::Inner<Done, NoopTerminalHook>,
        pass: &mut super::Expiring,
    ) -> bool {
        let keys = &inner.keys;
        pass.pass_with_data(
            inner,
            &inner.expiry,
            keys.expiry_prefix(),
            Duration::from_secs(60),
            |id| [keys.sub(id), keys.out(id)],
            |id, entry| Some(super::RunData::of_run(keys, id, entry)),
        )
        .await
        .unwrap()
    }

    /// Outcome entries one retention pass deletes at most.
    const PER_PASS: u64 = (super::EXPIRE_BATCH * super::EXPIRE_BATCHES_PER_TICK) as u64;

    /// Retention reports its lag to the back-pressure: a pass that leaves
    /// due entries behind says how far the oldest of them is past its
    /// expiry, and one that leaves none says 0.
    #[tokio::test]
    async fn a_pass_that_leaves_due_entries_reports_how_far_behind_it_is() {
        let (clock, queue) = mock_clock_queue().await;
        let rt = WorkflowRuntime::builder(queue.clone(), Done, NoopTerminalHook)
            .terminal_retention(Duration::from_secs(60))
            .build()
            .unwrap();
        let inner = &rt.inner;
        // More due entries than one pass deletes.
        seed_expiry(inner, &queue, PER_PASS + 100).await;
        clock.advance(Duration::from_secs(180));
        let mut pass = super::Expiring::new(inner.now_ms());
        assert!(outcome_pass(inner, &mut pass).await, "a backlog is left");
        assert_eq!(pass.deleted, PER_PASS);
        // The last entry deleted was PER_PASS - 1 ms after the first; now
        // is 180 s after it.
        assert_eq!(pass.lag_ms, 180_000 - 60_000 - (PER_PASS - 1));
        assert!(!outcome_pass(inner, &mut pass).await, "the rest went");
        assert_eq!(pass.lag_ms, 0);
    }

    /// The retention loop's passes drive the back-pressure: a pass past the
    /// bound, after a window in which more runs ended than it deleted,
    /// halves the pool's claim limit, and a pass that leaves nothing due
    /// restores it.
    #[tokio::test]
    async fn retention_passes_that_fall_behind_lower_the_claim_limit() {
        use super::Pass;
        let (clock, queue) = mock_clock_queue().await;
        let rt = WorkflowRuntime::builder(queue.clone(), Done, NoopTerminalHook)
            .terminal_retention(Duration::from_secs(60))
            .max_concurrent_steps(16)
            .build()
            .unwrap();
        let inner = &rt.inner;
        inner.backpressure.note_in_flight(16);
        seed_expiry(inner, &queue, 2 * PER_PASS + 100).await;
        let mut retention = super::Retention::new(inner.now_ms());
        clock.advance(Duration::from_secs(180));
        assert!(retention.tick(inner).await, "a backlog: ~116 s behind");
        assert_eq!(inner.backpressure.claim_limit(), 16, "a window starts");
        // Twenty seconds on, more runs have ended than it deleted.
        for _ in 0..PER_PASS + 1 {
            inner.backpressure.run_ended();
        }
        clock.advance(Duration::from_secs(20));
        assert!(
            retention.tick(inner).await,
            "still a backlog: ~132 s behind"
        );
        assert_eq!(inner.backpressure.claim_limit(), 8);
        clock.advance(Duration::from_secs(10));
        assert!(!retention.tick(inner).await, "caught up");
        assert_eq!(inner.backpressure.claim_limit(), 16);
    }

    /// Retention deletes a run's data by the names its expiry entry gives
    /// when the run's extent key says they are all of it, and scans the
    /// run's prefix otherwise: the extent says there is more, it is absent
    /// (a run from before), or the entry is empty or unreadable. A key the
    /// named run's summary does not name is left: proof that it was not
    /// scanned.
    #[tokio::test]
    async fn retention_scans_only_the_runs_whose_data_it_cannot_name() {
        use crate::record::{DataSummary, EXTENT_NAMED, EXTENT_SCAN, encode};
        let (clock, queue) = mock_clock_queue().await;
        let rt = WorkflowRuntime::builder(queue.clone(), Done, NoopTerminalHook)
            .terminal_retention(Duration::from_secs(60))
            .build()
            .unwrap();
        let (inner, keys) = (&rt.inner, &rt.inner.keys);
        let at = inner.now_ms();
        let summary = DataSummary::of(1, 1).unwrap();
        let named = |id: &str| {
            let entry = inner.expiry.entry_key(at, id.as_bytes());
            let value = encode(&entry, &summary).unwrap();
            (entry, value)
        };
        let mut seed = taquba::SettlementEffects::default();
        let mut put = |key: Vec<u8>, value: &[u8]| {
            seed = std::mem::take(&mut seed).kv_put(key, value.to_vec());
        };
        // "named": its summary names inputs 0–1 and history 0–1.
        let (entry, value) = named("named");
        put(entry, &value);
        put(keys.data_extent("named"), EXTENT_NAMED);
        for step in 0..2 {
            put(keys.input("named", step), b"in");
            put(keys.history_entry("named", u64::from(step)), b"h");
        }
        put([keys.data("named"), b"stray".to_vec()].concat(), b"x");
        // The rest have a memo entry, which only a scan finds.
        for (id, extent, value) in [
            ("more", Some(EXTENT_SCAN), Some(value.clone())),
            ("before", None, Some(value.clone())),
            ("empty", None, Some(Vec::new())),
            ("garbled", Some(EXTENT_NAMED), Some(b"zz".to_vec())),
        ] {
            put(inner.expiry.entry_key(at, id.as_bytes()), &value.unwrap());
            if let Some(extent) = extent {
                put(keys.data_extent(id), extent);
            }
            put(keys.input(id, 0), b"in");
            put([keys.data(id), b"memo/0/k".to_vec()].concat(), b"m");
        }
        queue.commit_effects(seed).await.unwrap();
        clock.advance(Duration::from_secs(61));
        let mut pass = super::Expiring::new(inner.now_ms());
        assert!(!outcome_pass(inner, &mut pass).await, "nothing left due");
        assert_eq!((pass.deleted, pass.data_scans), (5, 4));
        let left = queue
            .view()
            .kv_scan(b"wm/", .., KvOrder::Ascending, 100)
            .await
            .unwrap();
        let left: Vec<String> = left
            .entries
            .iter()
            .map(|(key, _)| String::from_utf8_lossy(key).into_owned())
            .filter(|key| key.contains("/data/") || key.contains("/exp/"))
            .collect();
        assert_eq!(left, ["wm/workflow-steps/data/named/stray"]);
    }

    /// A re-run that commits between a retention batch's scan and its
    /// commit (it read the clock just before the outcome fell due) takes its
    /// run's entry out of the index. The batch deleted the live run's submit
    /// record and data all the same; it now commits only if its entries are
    /// all still there. (The re-run is played by its deletion of the entry.)
    #[tokio::test]
    async fn retention_leaves_a_run_re_run_after_its_scan() {
        let (clock, queue) = mock_clock_queue().await;
        let rt = WorkflowRuntime::builder(queue.clone(), Done, NoopTerminalHook)
            .terminal_retention(Duration::from_secs(60))
            .build()
            .unwrap();
        rt.submit(RunSpec {
            run_id: Some("r".into()),
            input: b"in".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(rt.cancel("r").await.unwrap(), "ended while pending");
        let (inner, keys) = (&rt.inner, &rt.inner.keys);
        let index = queue
            .view()
            .kv_scan(keys.expiry_prefix(), .., KvOrder::Ascending, 10)
            .await
            .unwrap();
        assert_eq!(index.entries.len(), 1, "the run's retention entry");
        let entry = index.entries[0].0.to_vec();
        clock.advance(Duration::from_secs(61));
        let mut pass = super::Expiring::new(inner.now_ms());
        pass.before_commit = Some(Box::pin({
            let queue = queue.clone();
            async move {
                let rerun = taquba::SettlementEffects::default().kv_delete(entry);
                queue.commit_effects(rerun).await.unwrap();
            }
        }));
        outcome_pass(inner, &mut pass).await;
        let view = queue.view();
        assert!(
            view.kv_get(&keys.sub("r")).await.unwrap().is_some(),
            "the re-run run's submit record was deleted"
        );
        assert!(
            view.kv_get(&keys.input("r", 0)).await.unwrap().is_some(),
            "the re-run run's kept input was deleted"
        );
    }

    /// Counts the samples of the `waymark_backlog{state="pending"}` gauge.
    #[derive(Default, Clone)]
    struct BacklogSamples(Arc<std::sync::atomic::AtomicUsize>);

    struct CountSets(Arc<std::sync::atomic::AtomicUsize>);

    impl metrics::GaugeFn for CountSets {
        fn increment(&self, _: f64) {}
        fn decrement(&self, _: f64) {}
        fn set(&self, _: f64) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl metrics::Recorder for BacklogSamples {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            metrics::Counter::noop()
        }
        fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            let pending = key.name() == "waymark_backlog"
                && key
                    .labels()
                    .any(|l| l.key() == "state" && l.value() == "pending");
            if pending {
                metrics::Gauge::from_arc(Arc::new(CountSets(self.0.clone())))
            } else {
                metrics::Gauge::noop()
            }
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    /// The backlog gauges read taquba's count keys, whose reads merge every
    /// count change since the last compaction (2.6% of the CPU at 10,000
    /// steps/s when they were read every reconcile cycle, once a second).
    /// Over 25 s of maintenance ticks every 250 ms they are sampled at 0,
    /// 10 and 20 s: three times, not once a tick or once a second.
    #[tokio::test(start_paused = true)]
    async fn the_backlog_gauges_are_sampled_every_ten_seconds() {
        let samples = BacklogSamples::default();
        let _recorder = metrics::set_default_local_recorder(&samples);
        let (_rt, stop, pool) = running(Done, Duration::from_millis(250)).await;
        tokio::time::sleep(Duration::from_secs(25)).await;
        stop.cancel();
        pool.await.unwrap().unwrap();
        let taken = samples.0.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(taken, 3, "backlog samples in 25 s");
    }
}
