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
use crate::effects::merge;
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
/// The most runs one tick fires: a catch-up after a long downtime
/// (`Downtime::FireAll`, up to its `max`) goes on in further ticks, each
/// armed at once, so no commit carries an unbounded number of runs.
const FIRES_PER_TICK: usize = 64;
/// The input bytes past which a tick fires no more runs (the rest of a
/// catch-up goes on in the next tick): at least one run a tick, however
/// large its input.
const TICK_INPUT_BYTES: usize = 8 * 1024 * 1024;
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

/// The bytes a fire's submit adds to its tick's commit: its jobs'
/// payloads and its KV values (the kept input among them).
fn submit_bytes(effects: &SettlementEffects) -> usize {
    let payloads = effects.enqueues.iter().map(|e| e.payload.len());
    let values = effects.kv_writes.values().map(Vec::len);
    payloads.chain(values).fold(0, usize::saturating_add)
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
    // A catch-up's tick after a manual trigger fires older times: the last
    // fire (and its run) stays the latest, and a trigger fires after it.
    if rec.last_fire_ms.is_none_or(|last| at >= last) {
        rec.last_fire_ms = Some(at);
        rec.last_run_id = Some(run_id.clone());
    }
    rec.run_count = rec.run_count.saturating_add(1);
    Ok(Some((run_id, effects)))
}

/// Decide what a tick for a due record does at `now`: the fire times to
/// submit, at most [`FIRES_PER_TICK`] (counters, the buffered fire and the
/// next fire time are updated in `rec`; a catch-up with more fires than
/// that is cut, see [`defer`]). `live` says whether the last run is live.
pub(crate) fn plan(
    def: &Checked,
    rec: &mut ScheduleRecord,
    now: u64,
    live: bool,
    gate: Gate,
) -> Vec<u64> {
    let until = rec.catch_up_until.unwrap_or(now);
    let mut fires = plan_all(def, rec, now, live, gate);
    if let Some(&rest) = fires.get(FIRES_PER_TICK) {
        defer(rec, rest, until);
        fires.truncate(FIRES_PER_TICK);
    }
    fires
}

/// Leave the fires from `at` on (a time of the schedule's, due) up to
/// `until` (the catch-up's first tick's time) to the next tick: it walks
/// from there again, and the runs fired before it do not count as
/// overlapping them.
pub(crate) fn defer(rec: &mut ScheduleRecord, at: u64, until: u64) {
    rec.next_fire_ms = Some(at);
    rec.catch_up_until = Some(until);
}

/// Give up a catch-up under way (the schedule is paused): the times it has
/// not fired, due by `now`, count as missed.
pub(crate) fn drop_catch_up(def: &Checked, rec: &mut ScheduleRecord, now: u64) {
    let Some(until) = rec.catch_up_until.take() else {
        return;
    };
    let end = until.min(now);
    let mut left: u64 = 0;
    let mut t = rec.next_fire_ms;
    while let Some(at) = t.filter(|at| *at <= end) {
        left = left.saturating_add(1);
        if left >= (2 * MAX_DUE_WALK) as u64 {
            break;
        }
        t = def.times.next_after(at, rec.anchor_ms);
    }
    rec.missed = rec.missed.saturating_add(left);
}

/// [`plan`], every fire at once.
fn plan_all(def: &Checked, rec: &mut ScheduleRecord, now: u64, live: bool, gate: Gate) -> Vec<u64> {
    let mut fires = Vec::new();
    // Catch-up fires do not overlap each other: only the run live before
    // the catch-up's first tick (or the buffered one it submits) counts.
    // A catch-up's later ticks walk only to its first tick's time (after a
    // restart too): what fell due since is planned afresh when it is done.
    let until = rec.catch_up_until.take();
    let continuing = until.is_some();
    let now_or_until = until.map_or(now, |until| until.min(now));
    // A clock behind the catch-up's end (it stepped back) leaves the rest
    // of the catch-up to a later tick, still as a catch-up.
    let unfinished = until.filter(|until| *until > now);
    let live = live && !continuing;
    let mut blocked = live;
    if let Some(buffered) = rec.buffered_ms
        && !live
        && gate != Gate::Tripped
    {
        fires.push(buffered);
        rec.buffered_ms = None;
        blocked = true;
    }
    let Some(next) = rec.next_fire_ms.filter(|next| *next <= now_or_until) else {
        rec.catch_up_until = unfinished;
        return fires;
    };
    let now = now_or_until;
    // A catch-up's later ticks walk only the times they fire (one more, to
    // know where the next tick starts): its first tick counted the rest,
    // and walking it all again each tick made a long catch-up quadratic.
    let limit = match def.downtime {
        Downtime::FireAll { .. } if continuing => FIRES_PER_TICK + 1,
        _ => usize::MAX,
    };
    let mut unwalked = None;
    let mut jumped = None;
    // Every due time, oldest first: keep the latest ones and a count.
    let mut due = std::collections::VecDeque::new();
    let mut count: u64 = 0;
    let mut t = Some(next);
    let mut walked = 0;
    while let Some(at) = t.filter(|at| *at <= now) {
        if walked >= limit {
            unwalked = Some(at);
            break;
        }
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
                jumped = Some(to);
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
        // Only times after a jump: the ones before it are as missed as
        // those jumped over (a catch-up cut into ticks walks its times one
        // by one, and would fire the jumped ones too).
        Downtime::FireAll { max } => {
            let skip = due.len().saturating_sub(max as usize);
            due.iter()
                .skip(skip)
                .copied()
                .filter(|at| jumped.is_none_or(|to| *at >= to))
                .collect()
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
    if let (Some(at), Some(until)) = (unwalked, until) {
        defer(rec, at, until);
    } else if unfinished.is_some() {
        rec.catch_up_until = unfinished;
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
        rec.catch_up_until = None;
        let effects = SettlementEffects::default().kv_put(key.clone(), encode(&key, &rec)?);
        let _record = inner.pending.begin(state::pending_name(id));
        inner.queue.ack_with(claim, effects).await?;
        return Ok(());
    };
    let live = last_live(inner, &rec).await?;
    let gate = gate(inner, &def.workflow).await?;
    let until = rec.catch_up_until.unwrap_or(now);
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
    let mut input_bytes = 0usize;
    for (t, run_id) in times.into_iter().zip(&planned) {
        // Past the bytes a tick carries, the rest goes on in the next tick
        // (never at this tick's own time: a tick armed for it is this one).
        if input_bytes >= TICK_INPUT_BYTES && !run_ids.is_empty() && t > at {
            defer(&mut rec, t, until);
            break;
        }
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
            input_bytes = input_bytes.saturating_add(submit_bytes(&submit));
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
                        // A catch-up of the old times ends with them.
                        rec.catch_up_until = None;
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
                    rec.catch_up_until = None;
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

    /// A `FireAll` catch-up fired every due time up to its `max` (at most
    /// 100,000) in one tick: one commit carrying every run and its input.
    /// A tick now fires at most [`FIRES_PER_TICK`]; the rest goes on in the
    /// next ticks, each fire once, none counted missed, and the runs fired
    /// earlier in the catch-up do not count as overlapping the rest.
    #[test]
    fn a_long_catch_up_is_fired_over_several_ticks() {
        let def = Schedule::every("s", Duration::from_secs(1))
            .downtime(Downtime::FireAll { max: 150 })
            .overlap(Overlap::Skip)
            .check()
            .unwrap();
        let mut rec = ScheduleRecord::new(def.kind.clone(), "w".into(), 0);
        rec.next_fire_ms = Some(1_000);
        let now = 200_000;
        let mut fired = Vec::new();
        let mut ticks = 0;
        loop {
            ticks += 1;
            // The last run fired (by the tick before) is live.
            let live = !fired.is_empty();
            let fires = plan(&def, &mut rec, now, live, Gate::Open);
            assert!(fires.len() <= FIRES_PER_TICK, "{} in one tick", fires.len());
            fired.extend(fires);
            if rec.catch_up_until.is_none() {
                break;
            }
            assert!(rec.next_fire_ms.is_some_and(|next| next <= now));
        }
        assert_eq!(ticks, 3);
        let expected: Vec<u64> = (51..=200).map(|s| s * 1_000).collect();
        assert_eq!(fired, expected);
        assert_eq!((rec.missed, rec.skipped_overlap), (50, 0));
        assert_eq!(rec.next_fire_ms, Some(201_000));
        // A catch-up ended, the live run blocks again.
        rec.next_fire_ms = Some(201_000);
        assert!(plan(&def, &mut rec, 201_000, true, Gate::Open).is_empty());
        assert_eq!(rec.skipped_overlap, 1);
    }

    /// A catch-up's later ticks walk only the times they fire (walking the
    /// whole rest again each tick made a long catch-up quadratic): the
    /// times that fall due while it runs are planned after it, not
    /// counted against its `max`.
    #[test]
    fn a_catch_up_fires_the_times_due_while_it_runs() {
        let def = Schedule::every("s", Duration::from_secs(1))
            .downtime(Downtime::FireAll { max: 150 })
            .check()
            .unwrap();
        let mut rec = ScheduleRecord::new(def.kind.clone(), "w".into(), 0);
        rec.next_fire_ms = Some(1_000);
        let mut fired = plan(&def, &mut rec, 200_000, false, Gate::Open);
        // The next ticks run 100 s later.
        let now = 300_000;
        while rec.next_fire_ms.is_some_and(|next| next <= now) {
            let fires = plan(&def, &mut rec, now, false, Gate::Open);
            assert!(fires.len() <= FIRES_PER_TICK);
            fired.extend(fires);
        }
        let expected: Vec<u64> = (51..=300).map(|s| s * 1_000).collect();
        assert_eq!(fired, expected);
        assert_eq!(rec.missed, 50);
        assert_eq!(rec.next_fire_ms, Some(301_000));
    }

    /// A catch-up cut short by a restart went on, after the restart, as if
    /// it were the same catch-up: every time missed while the pool was
    /// down was fired (the limit of `max` and the overlap rule ignored),
    /// none counted missed. It now finishes the times due by its first
    /// tick, and what fell due since is planned afresh.
    #[test]
    fn a_catch_up_resumed_after_a_restart_keeps_to_its_own_times() {
        let def = Schedule::every("s", Duration::from_secs(1))
            .downtime(Downtime::FireAll { max: 150 })
            .check()
            .unwrap();
        let mut rec = ScheduleRecord::new(def.kind.clone(), "w".into(), 0);
        rec.next_fire_ms = Some(1_000);
        let mut fired = plan(&def, &mut rec, 200_000, false, Gate::Open);
        assert_eq!(rec.catch_up_until, Some(200_000));
        // The pool is down for a day; then its ticks run.
        let now = 86_600_000;
        let mut ticks = 0;
        while rec.next_fire_ms.is_some_and(|next| next <= now) {
            ticks += 1;
            assert!(ticks < 100, "the catch-up never ends");
            let fires = plan(&def, &mut rec, now, false, Gate::Open);
            assert!(fires.len() <= FIRES_PER_TICK);
            fired.extend(fires);
        }
        let mut expected: Vec<u64> = (51..=200).map(|s| s * 1_000).collect();
        expected.extend((86_451..=86_600).map(|s| s * 1_000));
        assert_eq!(fired, expected);
        assert_eq!(rec.missed, 50 + (86_400 - 150));
        assert_eq!(rec.next_fire_ms, Some(86_601_000));
    }

    /// A first tick whose walk jumped over part of a very long downtime
    /// chose times on both sides of the jump; cut into ticks, the catch-up
    /// then walked the jumped-over times one by one and fired them too
    /// (more runs than `max`, some also counted missed). It now chooses
    /// only times after the jump.
    #[test]
    fn a_catch_up_after_a_jump_fires_nothing_it_jumped_over() {
        let def = Schedule::every("s", Duration::from_secs(1))
            .downtime(Downtime::FireAll { max: 86_400 })
            .check()
            .unwrap();
        let mut rec = ScheduleRecord::new(def.kind.clone(), "w".into(), 0);
        rec.next_fire_ms = Some(1_000);
        let now = 172_800_000;
        let mut fired = 0u64;
        let mut first = None;
        let mut ticks = 0;
        while rec.next_fire_ms.is_some_and(|next| next <= now) {
            ticks += 1;
            assert!(ticks < 2_000);
            let fires = plan(&def, &mut rec, now, false, Gate::Open);
            first = first.or(fires.first().copied());
            fired += fires.len() as u64;
        }
        assert_eq!(fired, 50_000);
        assert_eq!(first, Some(122_801_000));
        assert_eq!(
            fired + rec.missed,
            172_800,
            "each time fired or missed, once"
        );
    }

    /// A catch-up tick run with the clock behind the catch-up's end (it
    /// stepped back) ended the catch-up: its rest was then planned as new
    /// times, behind the catch-up's own live run. It stays a catch-up.
    #[test]
    fn a_catch_up_outlives_a_clock_that_steps_back() {
        let def = Schedule::every("s", Duration::from_secs(1))
            .downtime(Downtime::FireAll { max: 150 })
            .overlap(Overlap::Skip)
            .check()
            .unwrap();
        let mut rec = ScheduleRecord::new(def.kind.clone(), "w".into(), 0);
        rec.next_fire_ms = Some(1_000);
        let mut fired = plan(&def, &mut rec, 200_000, false, Gate::Open);
        // The clock is back before the first unfired time, then just past it.
        assert!(plan(&def, &mut rec, 100_000, true, Gate::Open).is_empty());
        assert_eq!(rec.catch_up_until, Some(200_000));
        fired.extend(plan(&def, &mut rec, 150_000, true, Gate::Open));
        assert_eq!(rec.catch_up_until, Some(200_000));
        while rec.next_fire_ms.is_some_and(|next| next <= 200_000) {
            fired.extend(plan(&def, &mut rec, 200_000, true, Gate::Open));
        }
        let expected: Vec<u64> = (51..=200).map(|s| s * 1_000).collect();
        assert_eq!(fired, expected);
        assert_eq!((rec.missed, rec.skipped_overlap), (50, 0));
    }

    /// A pause in the middle of a catch-up dropped the rest of it without a
    /// word; the times it had not fired now count as missed.
    #[test]
    fn a_catch_up_given_up_counts_the_rest_as_missed() {
        let def = Schedule::every("s", Duration::from_secs(1))
            .downtime(Downtime::FireAll { max: 150 })
            .check()
            .unwrap();
        let mut rec = ScheduleRecord::new(def.kind.clone(), "w".into(), 0);
        rec.next_fire_ms = Some(1_000);
        let fired = plan(&def, &mut rec, 200_000, false, Gate::Open);
        assert_eq!((fired.len(), rec.missed), (FIRES_PER_TICK, 50));
        drop_catch_up(&def, &mut rec, 200_000);
        assert_eq!(rec.missed, 50 + 150 - FIRES_PER_TICK as u64);
        assert!(rec.catch_up_until.is_none());
        drop_catch_up(&def, &mut rec, 200_000);
        assert_eq!(rec.missed, 50 + 150 - FIRES_PER_TICK as u64, "once");
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
