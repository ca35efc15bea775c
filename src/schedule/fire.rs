//! Firing: handling a claimed tick in the one transaction that submits its
//! runs, rewrites the schedule's record and arms the next tick; and arming
//! every schedule when the pool starts.

use crate::policy::saturating_ms;
use std::collections::HashMap;
use std::sync::Arc;

use taquba::{Claim, EnqueueOptions, EnqueueRequest, EnqueueResult, SettlementEffects};

use super::def::{Checked, Downtime, Overlap, ScheduleKind};
use super::state::{self, ScheduleRecord};
use crate::breaker::{HealthRecord, Stored, ms_to_time};
use crate::error::Error;
use crate::record::{RESERVED_HEADER_PREFIX, decode, encode};
use crate::runtime::{Inner, RunSpec};

/// The tick job header naming its schedule.
const HEADER_SCHEDULE: &str = "workflow.schedule";
/// The tick job header carrying the time it was armed for (ms).
const HEADER_TICK_AT: &str = "workflow.tick_at";
/// Attempts of a tick job: a tick is retried while the store fails, never
/// given up on for a transient reason.
const TICK_MAX_ATTEMPTS: u32 = 1_000_000;
/// The most due times one tick walks through before it jumps ahead (a long
/// downtime of a sub-second schedule): an `every` schedule to its latest
/// half of that many, counting the ones jumped over as missed; a cron
/// expression to the times within its misfire grace, which it cannot count
/// (`missed` then counts fewer than were missed). A walk stops at twice
/// this many in all (a cron expression with more times than that in its
/// grace).
const MAX_DUE_WALK: usize = 100_000;
/// Schedules armed per commit when the pool starts.
const ARM_BATCH: usize = 256;

const _: () = assert!(HEADER_SCHEDULE.len() > RESERVED_HEADER_PREFIX.len());

/// The breaker's word on a fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Open,
    /// In backoff until this time (ms).
    Backoff(u64),
    Tripped,
}

/// The tick job that fires schedule `id` at `at` (ms).
pub(crate) fn tick(queue: &str, id: &str, at: u64) -> EnqueueRequest {
    let options = EnqueueOptions::default()
        .dedup_key(format!("sched:{id}:{at}"))
        .header(HEADER_SCHEDULE, id.to_string())
        .header(HEADER_TICK_AT, at.to_string())
        .max_attempts(TICK_MAX_ATTEMPTS)
        .run_at(Some(ms_to_time(at)));
    EnqueueRequest {
        queue: queue.to_string(),
        payload: Vec::new(),
        options,
    }
}

/// Append `b`'s effects to `a`'s.
pub(crate) fn merge(mut a: SettlementEffects, b: SettlementEffects) -> SettlementEffects {
    a.enqueues.extend(b.enqueues);
    a.kv_writes.extend(b.kv_writes);
    a.kv_deletes.extend(b.kv_deletes);
    a.expiry_entries.extend(b.expiry_entries);
    a
}

/// What the workflow's breaker says, from its durable record. A record
/// that does not decode is not applied (as for the workflow's steps): the
/// gate is open.
pub(crate) async fn gate<R, H>(inner: &Inner<R, H>, workflow: &str) -> Result<Gate, Error> {
    let key = inner.breakers.health_key(workflow);
    let Some(bytes) = inner.queue.view().kv_get(&key).await? else {
        return Ok(Gate::Open);
    };
    let gate = match decode::<HealthRecord>(&key, &bytes) {
        Ok(rec) => match rec.state {
            Stored::Closed => Gate::Open,
            Stored::Backoff { until } => Gate::Backoff(until),
            Stored::Tripped { .. } => Gate::Tripped,
        },
        Err(e) if e.is_unreadable_record() => {
            tracing::warn!(workflow, "firing as if its breaker were closed: {e}");
            Gate::Open
        }
        Err(e) => return Err(e),
    };
    // A trip or backoff a crash could still undo must not hold a fire
    // back or refuse a trigger. (An open gate read from a close in flight
    // is safe: a fire commits after the close.)
    if gate != Gate::Open {
        inner.breakers.settled(workflow).await;
    }
    Ok(gate)
}

/// Whether the schedule's last run is live. A run record that does not
/// decode is that run's problem (its step is dead-lettered when claimed),
/// not the schedule's: it counts as ended.
pub(crate) async fn last_live<R, H>(
    inner: &Inner<R, H>,
    rec: &ScheduleRecord,
) -> Result<bool, Error> {
    let Some(run) = &rec.last_run_id else {
        return Ok(false);
    };
    match inner.read_run(run).await {
        Ok(live) => Ok(live.is_some()),
        Err(e) if e.is_unreadable_record() => {
            tracing::warn!(run_id = %run, "taking the schedule's last run as ended: {e}");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The submit effects of a run fired at `at`, and its run id. Records the
/// fire in `rec`. An input function that fails is recorded, and `None`.
pub(crate) fn fire<R, H>(
    inner: &Inner<R, H>,
    id: &str,
    def: &Checked,
    rec: &mut ScheduleRecord,
    at: u64,
    manual: bool,
) -> Result<Option<(String, SettlementEffects)>, Error> {
    let input = match def.input_at(ms_to_time(at)) {
        Ok(input) => input,
        Err(why) => {
            tracing::error!(schedule = id, at, "fire skipped: {why}");
            rec.last_error = Some(why);
            return Ok(None);
        }
    };
    let run_id = inner.schedules.run_id(id, at, manual);
    let prepared = inner.prepare_submit(RunSpec {
        run_id: Some(run_id.clone()),
        input,
        workflow: Some(def.workflow.clone()),
        ..RunSpec::default()
    })?;
    let effects = inner.submit_effects(&prepared)?;
    rec.last_fire_ms = Some(at);
    rec.last_run_id = Some(run_id.clone());
    rec.run_count = rec.run_count.saturating_add(1);
    Ok(Some((run_id, effects)))
}

/// Decide what a tick for a due record does at `now`: the fire times to
/// submit (counters, the buffered fire and the next fire time are updated
/// in `rec`). `live` says whether the last run is live.
pub(crate) fn plan(
    def: &Checked,
    rec: &mut ScheduleRecord,
    now: u64,
    live: bool,
    gate: Gate,
) -> Vec<u64> {
    let mut fires = Vec::new();
    // Catch-up fires of one tick do not overlap each other: only the run
    // live before the tick (or the buffered one it submits) counts.
    let mut blocked = live;
    if let Some(buffered) = rec.buffered_ms
        && !live
        && gate != Gate::Tripped
    {
        fires.push(buffered);
        rec.buffered_ms = None;
        blocked = true;
    }
    let Some(next) = rec.next_fire_ms.filter(|next| *next <= now) else {
        return fires;
    };
    // Every due time, oldest first: keep the latest ones and a count.
    let mut due = std::collections::VecDeque::new();
    let mut count: u64 = 0;
    let mut t = Some(next);
    let mut walked = 0;
    while let Some(at) = t.filter(|at| *at <= now) {
        count = count.saturating_add(1);
        walked += 1;
        due.push_back(at);
        if due.len() > MAX_DUE_WALK {
            due.pop_front();
        }
        t = def.times.next_after(at, rec.anchor_ms);
        if walked == MAX_DUE_WALK {
            // Jump over the rest of a very long downtime, once.
            let keep = (MAX_DUE_WALK / 2) as u64;
            let jump = def
                .times
                .skip_to(at, now, keep, def.misfire_grace_ms, rec.anchor_ms)
                .filter(|(to, _)| t.is_some_and(|t| *to > t));
            if let Some((to, skipped)) = jump {
                count = count.saturating_add(skipped.unwrap_or(0));
                t = Some(to);
            }
        } else if walked >= 2 * MAX_DUE_WALK {
            break;
        }
    }
    rec.next_fire_ms = def.times.next_after(now, rec.anchor_ms);
    let on_time = |at: u64| now.saturating_sub(at) <= def.misfire_grace_ms;
    let latest = due.back().copied();
    let chosen: Vec<u64> = match def.downtime {
        Downtime::Skip => latest.filter(|at| on_time(*at)).into_iter().collect(),
        Downtime::FireOnce => latest.into_iter().collect(),
        Downtime::FireAll { max } => {
            let skip = due.len().saturating_sub(max as usize);
            due.iter().skip(skip).copied().collect()
        }
    };
    rec.missed = rec
        .missed
        .saturating_add(count.saturating_sub(chosen.len() as u64));
    for at in chosen {
        match gate {
            Gate::Tripped => {
                rec.suppressed_tripped = rec.suppressed_tripped.saturating_add(1);
                continue;
            }
            Gate::Backoff(until) if at < until => {
                rec.suppressed_backoff = rec.suppressed_backoff.saturating_add(1);
                continue;
            }
            _ => {}
        }
        if blocked {
            match def.overlap {
                Overlap::Allow => {}
                Overlap::Skip => {
                    rec.skipped_overlap = rec.skipped_overlap.saturating_add(1);
                    continue;
                }
                Overlap::BufferOne => {
                    if rec.buffered_ms.is_none() {
                        rec.buffered_ms = Some(at);
                    } else {
                        rec.skipped_overlap = rec.skipped_overlap.saturating_add(1);
                    }
                    continue;
                }
            }
        }
        fires.push(at);
    }
    fires
}

/// Handle a claimed tick: fire what is due in the transaction that acks it.
pub(crate) async fn handle_tick<R, H>(inner: Arc<Inner<R, H>>, claim: Claim) {
    let parsed = (|| {
        let id = claim.headers.get(HEADER_SCHEDULE)?;
        let at = claim.headers.get(HEADER_TICK_AT)?.parse::<u64>().ok()?;
        Some((id.clone(), at))
    })();
    let Some((id, at)) = parsed else {
        let why = format!(
            "not a schedule tick: it needs the headers `{HEADER_SCHEDULE}` and `{HEADER_TICK_AT}` (ms)"
        );
        if let Err(e) = inner.queue.dead_letter(&claim, &why).await {
            tracing::warn!("dead-lettering a malformed tick failed: {e}");
        }
        return;
    };
    if let Err(e) = tick_once(&inner, &claim, &id, at).await {
        if e.is_permanent() {
            tracing::error!(schedule = id, "the schedule's tick cannot be handled: {e}");
            if let Err(e) = inner.queue.dead_letter(&claim, &e.to_string()).await {
                tracing::warn!("dead-lettering the tick failed: {e}");
            }
        } else {
            // The claim stays; its lease ends (or the next open requeues it)
            // and the same time is fired then.
            tracing::warn!(
                schedule = id,
                "handling the tick failed; it is retried: {e}"
            );
        }
    }
}

async fn tick_once<R, H>(
    inner: &Arc<Inner<R, H>>,
    claim: &Claim,
    id: &str,
    at: u64,
) -> Result<(), Error> {
    let schedules = &inner.schedules;
    let _writer = schedules.lock(id).await;
    let qname = &inner.cfg.queue_name;
    let Some((mut rec, _)) = state::read_record(inner.queue.view(), qname, id).await? else {
        inner.queue.ack(claim).await?;
        return Ok(());
    };
    if rec.armed_ms != Some(at) {
        tracing::debug!(schedule = id, at, "stale tick");
        inner.queue.ack(claim).await?;
        return Ok(());
    }
    let now = inner.now_ms();
    let key = state::key(qname, id);
    let Some(def) = schedules.get(id).filter(|_| rec.active && !rec.paused) else {
        rec.armed_ms = None;
        rec.next_fire_ms = None;
        let effects = SettlementEffects::default().kv_put(key.clone(), encode(&key, &rec)?);
        let _record = inner.pending.begin(state::pending_name(id));
        inner.queue.ack_with(claim, effects).await?;
        return Ok(());
    };
    let live = last_live(inner, &rec).await?;
    let gate = gate(inner, &def.workflow).await?;
    let times = plan(def, &mut rec, now, live, gate);
    // A fire's run is created without a compare: a run that holds its id
    // already (submitted by hand under that id) is not overwritten, and
    // the fire is skipped.
    let planned: Vec<String> = times
        .iter()
        .map(|t| inner.schedules.run_id(id, *t, false))
        .collect();
    let (_creating, taken) = inner.lock_new_runs(&planned).await?;
    let mut effects = SettlementEffects::default();
    let mut run_ids = Vec::new();
    let mut step_zero = Vec::new();
    for (t, run_id) in times.into_iter().zip(&planned) {
        if taken.contains(run_id) {
            let why = format!(
                "the fire at {t} was skipped: its run id `{run_id}` is taken by another run"
            );
            tracing::error!(schedule = id, "{why}");
            rec.missed = rec.missed.saturating_add(1);
            rec.last_error = Some(why);
            continue;
        }
        if let Some((run_id, submit)) = fire(inner, id, def, &mut rec, t, false)? {
            step_zero.push(effects.enqueues.len());
            effects = merge(effects, submit);
            run_ids.push(run_id);
        }
    }
    rec.armed_ms = match (rec.next_fire_ms, rec.buffered_ms) {
        (next, Some(buffered)) => {
            let check = buffered_check(now, buffered, saturating_ms(inner.cfg.poll_interval));
            Some(next.map_or(check, |n| n.min(check)))
        }
        (next, None) => next,
    };
    if let Some(armed) = rec.armed_ms {
        effects = effects.enqueue(tick(&schedules.queue, id, armed));
    }
    effects = effects.kv_put(key.clone(), encode(&key, &rec)?);
    let results = {
        let _pending: Vec<_> = run_ids.iter().map(|r| inner.pending.begin(r)).collect();
        let _record = inner.pending.begin(state::pending_name(id));
        inner.queue.ack_with(claim, effects).await?
    };
    inner
        .pending
        .enqueued(step_zero.iter().filter_map(|i| match results.get(*i) {
            Some(EnqueueResult::New(job)) => Some(job.as_str()),
            _ => None,
        }));
    for run_id in &run_ids {
        tracing::info!(schedule = id, run_id, "schedule fired");
    }
    Ok(())
}

/// The longest time between two checks of a buffered fire.
const BUFFERED_CHECK_MAX_MS: u64 = 60_000;

/// When to look again whether a fire buffered at `buffered` can go (its
/// schedule's last run has ended): a poll interval after it was buffered,
/// then a tenth of its wait so far, at most a minute. Each look commits the
/// schedule's record and its next tick, so a run that holds the fire for
/// days costs a commit a minute, not one every poll; the fire goes at most
/// a tenth of its wait (and a minute) after the run ends.
fn buffered_check(now: u64, buffered: u64, poll_ms: u64) -> u64 {
    let every = (now.saturating_sub(buffered) / 10)
        .min(BUFFERED_CHECK_MAX_MS)
        .max(poll_ms);
    now.saturating_add(every)
}

/// When the pool starts: record every definition (new ones armed for their
/// first time after now; changed ones keep their armed time; removed ones
/// marked inactive) and arm the tick of every active schedule, so a tick
/// lost with a dead-lettered job is armed again (a live one is a dedup hit).
///
/// A record this build cannot read is logged and left as it is.
///
/// On a fleet shard, a record of a schedule homed on another shard is
/// deleted: a fleet worker before schedules had homes recorded every
/// schedule on every shard, and the home shard keeps the schedule's own
/// record. Its armed tick, if any, is then acked as stale.
pub(crate) async fn arm_all<R, H>(inner: &Inner<R, H>) -> Result<(), Error> {
    let qname = &inner.cfg.queue_name;
    let schedules = &inner.schedules;
    let now = inner.now_ms();
    let mut ids: Vec<String> = schedules.ids().cloned().collect();
    for info in state::read_schedules(inner.queue.view(), qname).await? {
        if schedules.get(&info.id).is_none() {
            ids.push(info.id);
        }
    }
    for chunk in ids.chunks(ARM_BATCH) {
        let mut guards = Vec::with_capacity(chunk.len());
        let mut effects = SettlementEffects::default();
        let mut writes: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut strays = Vec::new();
        let mut written = Vec::new();
        for id in chunk {
            guards.push(schedules.lock(id).await);
            let old = match state::read_record(inner.queue.view(), qname, id).await {
                Ok(old) => old,
                // Left as it is, for the build that wrote it; its tick, if
                // one is armed, is dead-lettered with the reason.
                Err(e) if e.is_unreadable_record() => {
                    tracing::error!(schedule = id, "not arming an unreadable schedule: {e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let key = state::key(qname, id);
            let (current, changed) = match (schedules.get(id), old) {
                (Some(def), None) => {
                    let mut rec = ScheduleRecord::new(def.kind.clone(), def.workflow.clone(), now);
                    rec.next_fire_ms = def.times.next_after(now, now);
                    rec.armed_ms = rec.next_fire_ms;
                    (Some(rec), true)
                }
                (Some(def), Some((old, _))) => {
                    let mut rec = old.clone();
                    rec.active = true;
                    rec.workflow = def.workflow.clone();
                    if rec.kind != def.kind {
                        rec.kind = def.kind.clone();
                        if def.kind == ScheduleKind::Manual {
                            rec.next_fire_ms = None;
                            rec.armed_ms = None;
                        }
                    }
                    if !rec.paused && rec.next_fire_ms.is_none() && rec.armed_ms.is_none() {
                        // Inactive before, or manual before: arm it now.
                        rec.next_fire_ms = def.times.next_after(now, rec.anchor_ms);
                        rec.armed_ms = rec.next_fire_ms;
                    }
                    let changed = rec != old;
                    (Some(rec), changed)
                }
                (None, Some(_)) if !schedules.is_home(id) => {
                    strays.push(key.clone());
                    (None, false)
                }
                (None, Some((mut rec, _))) => {
                    let changed = rec.active || rec.armed_ms.is_some();
                    rec.active = false;
                    rec.next_fire_ms = None;
                    rec.armed_ms = None;
                    rec.buffered_ms = None;
                    (Some(rec), changed)
                }
                (None, None) => (None, false),
            };
            let Some(rec) = current else { continue };
            if changed {
                writes.insert(key.clone(), encode(&key, &rec)?);
                written.push(id);
            }
            if let Some(armed) = rec.armed_ms.filter(|_| rec.active && !rec.paused) {
                effects = effects.enqueue(tick(&schedules.queue, id, armed));
            }
        }
        if !strays.is_empty() {
            tracing::info!(
                count = strays.len(),
                "deleting schedule records homed on other shards"
            );
        }
        effects = effects.kv_writes(writes).kv_deletes(strays);
        if !effects.enqueues.is_empty()
            || !effects.kv_writes.is_empty()
            || !effects.kv_deletes.is_empty()
        {
            let _records: Vec<_> = written
                .iter()
                .map(|id| inner.pending.begin(state::pending_name(id)))
                .collect();
            inner.queue.commit_effects(effects).await?;
        }
        drop(guards);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::schedule::Schedule;

    /// After a downtime of 200,000 due times (a 1 s schedule, 55 hours),
    /// the walk jumped once, then again at every time it walked: it fired
    /// times from 28 hours before, dropped the ones within the grace, and
    /// counted half the missed ones.
    #[test]
    fn a_long_downtime_fires_the_latest_times_and_counts_every_missed_one() {
        let def = Schedule::every("s", Duration::from_secs(1))
            .downtime(Downtime::FireAll { max: 3 })
            .check()
            .unwrap();
        let mut rec = ScheduleRecord::new(def.kind.clone(), "w".into(), 0);
        rec.next_fire_ms = Some(1_000);
        let now = 200_000_000;
        let fires = plan(&def, &mut rec, now, false, Gate::Open);
        assert_eq!(fires, vec![199_998_000, 199_999_000, 200_000_000]);
        assert_eq!(rec.missed, 199_997);
        assert_eq!(rec.next_fire_ms, Some(200_001_000));
    }

    /// A fire buffered behind a live run was checked every poll interval,
    /// each check a commit, for as long as the run lived (days, for a run
    /// waiting on a signal). The checks now space out with the wait.
    #[test]
    fn a_buffered_fire_is_checked_less_often_the_longer_it_waits() {
        let poll = 250;
        assert_eq!(
            buffered_check(1_000, 1_000, poll),
            1_250,
            "one poll at first"
        );
        assert_eq!(
            buffered_check(21_000, 1_000, poll),
            23_000,
            "a tenth of the wait"
        );
        let day = 86_400_000;
        assert_eq!(
            buffered_check(day, 0, poll),
            day + 60_000,
            "at most a minute"
        );
        assert_eq!(
            buffered_check(day, 0, 120_000),
            day + 120_000,
            "never under a poll"
        );
        assert_eq!(buffered_check(0, 5_000, poll), 250, "a clock stepped back");
        assert_eq!(buffered_check(u64::MAX, 0, poll), u64::MAX);
    }
}
