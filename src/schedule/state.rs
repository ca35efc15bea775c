//! A schedule's durable record (`wm/{queue}/sched/{id}`) and the reads of
//! it, over a [`QueueView`] so a reader of the store (a client, the CLI)
//! sees what the worker pool sees.

use std::ops::Bound;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use taquba::{KvOrder, QueueView};

use super::def::ScheduleKind;
use crate::error::Error;
use crate::hook::TerminalStatus;
use crate::record::{Keys, OutcomeRecord, decode};

/// The durable state of one schedule. Times are ms on the queue clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ScheduleRecord {
    pub kind: ScheduleKind,
    pub workflow: String,
    /// Defined in the code of the last pool that started.
    pub active: bool,
    pub paused: bool,
    /// Where an `every` schedule counts its intervals from.
    pub anchor_ms: u64,
    /// The next fire time (`None`: manual, paused or inactive).
    pub next_fire_ms: Option<u64>,
    /// The time of the tick job that is armed (the next fire time, or an
    /// earlier check of a buffered fire). A tick for another time is stale.
    pub armed_ms: Option<u64>,
    /// A fire held back by `Overlap::BufferOne`.
    pub buffered_ms: Option<u64>,
    pub last_fire_ms: Option<u64>,
    pub last_run_id: Option<String>,
    pub run_count: u64,
    pub skipped_overlap: u64,
    pub suppressed_backoff: u64,
    pub suppressed_tripped: u64,
    pub missed: u64,
    pub last_error: Option<String>,
}

impl ScheduleRecord {
    pub(crate) fn new(kind: ScheduleKind, workflow: String, now: u64) -> Self {
        Self {
            kind,
            workflow,
            active: true,
            paused: false,
            anchor_ms: now,
            next_fire_ms: None,
            armed_ms: None,
            buffered_ms: None,
            last_fire_ms: None,
            last_run_id: None,
            run_count: 0,
            skipped_overlap: 0,
            suppressed_backoff: 0,
            suppressed_tripped: 0,
            missed: 0,
            last_error: None,
        }
    }
}

/// The KV prefix of a runtime's schedule records.
pub(crate) fn prefix(queue_name: &str) -> Vec<u8> {
    format!("wm/{queue_name}/sched/").into_bytes()
}

/// The KV key of a schedule's record.
pub(crate) fn key(queue_name: &str, id: &str) -> Vec<u8> {
    let mut key = prefix(queue_name);
    key.extend_from_slice(id.as_bytes());
    key
}

/// How the last run a schedule submitted is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LastRun {
    /// It is live (waiting, running or parked).
    Live,
    /// It ended so.
    Ended(TerminalStatus),
    /// Its outcome has passed the retention window.
    Forgotten,
}

/// A schedule's state, from durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleInfo {
    /// The schedule.
    pub id: String,
    /// When it fires.
    pub kind: ScheduleKind,
    /// The workflow of the runs it submits.
    pub workflow: String,
    /// Defined in the code of the last worker pool that started; an inactive
    /// schedule no longer fires, its history is kept.
    pub active: bool,
    /// Paused by [`WorkflowRuntime::pause_schedule`](crate::WorkflowRuntime::pause_schedule).
    pub paused: bool,
    /// The time of its last fire (timer or trigger).
    pub last_fire: Option<SystemTime>,
    /// The run its last fire submitted.
    pub last_run_id: Option<String>,
    /// How that run is doing.
    pub last_outcome: Option<LastRun>,
    /// Runs it has submitted.
    pub run_count: u64,
    /// Its next fire time (`None` when manual, paused or inactive).
    pub next_fire: Option<SystemTime>,
    /// Whether a fire is held back until the live run ends (`BufferOne`).
    pub buffered: bool,
    /// Due fires skipped because the previous run was live.
    pub skipped_overlap: u64,
    /// Due fires suppressed inside the workflow's backoff window.
    pub suppressed_backoff: u64,
    /// Due fires suppressed while the workflow was tripped.
    pub suppressed_tripped: u64,
    /// Fire times missed while no worker ran and not caught up.
    pub missed: u64,
    /// Why the last fire that could not submit did not.
    pub last_error: Option<String>,
}

fn time(ms: u64) -> SystemTime {
    crate::breaker::ms_to_time(ms)
}

async fn info(
    view: &QueueView,
    keys: &Keys,
    id: &str,
    rec: ScheduleRecord,
) -> Result<ScheduleInfo, Error> {
    let last_outcome = match &rec.last_run_id {
        None => None,
        Some(run) => Some(if view.kv_get(&keys.run(run)).await?.is_some() {
            LastRun::Live
        } else {
            let out = keys.out(run);
            match view.kv_get(&out).await? {
                Some(bytes) => LastRun::Ended(decode::<OutcomeRecord>(&out, &bytes)?.status),
                // It may have ended between the two reads.
                None if view.kv_get(&keys.run(run)).await?.is_some() => LastRun::Live,
                None => LastRun::Forgotten,
            }
        }),
    };
    Ok(ScheduleInfo {
        id: id.to_string(),
        kind: rec.kind,
        workflow: rec.workflow,
        active: rec.active,
        paused: rec.paused,
        last_fire: rec.last_fire_ms.map(time),
        last_run_id: rec.last_run_id,
        last_outcome,
        run_count: rec.run_count,
        next_fire: rec.next_fire_ms.map(time),
        buffered: rec.buffered_ms.is_some(),
        skipped_overlap: rec.skipped_overlap,
        suppressed_backoff: rec.suppressed_backoff,
        suppressed_tripped: rec.suppressed_tripped,
        missed: rec.missed,
        last_error: rec.last_error,
    })
}

/// The raw record of one schedule.
pub(crate) async fn read_record(
    view: &QueueView,
    queue_name: &str,
    id: &str,
) -> Result<Option<(ScheduleRecord, Vec<u8>)>, Error> {
    let key = key(queue_name, id);
    Ok(match view.kv_get(&key).await? {
        Some(bytes) => Some((decode(&key, &bytes)?, bytes.to_vec())),
        None => None,
    })
}

/// One schedule's state (`None` for an id never recorded) of the runtime
/// whose step queue is `queue_name`.
/// The name a commit of schedule `id`'s record holds in the runtime's
/// pending commits, so a read of it waits for it to be durable (`/` never
/// appears in a run id).
pub(crate) fn pending_name(id: &str) -> String {
    format!("schedule/{id}")
}

pub(crate) async fn read_schedule(
    view: &QueueView,
    queue_name: &str,
    id: &str,
) -> Result<Option<ScheduleInfo>, Error> {
    let keys = Keys::new(queue_name);
    match read_record(view, queue_name, id).await? {
        Some((rec, _)) => Ok(Some(info(view, &keys, id, rec).await?)),
        None => Ok(None),
    }
}

/// Every recorded schedule's state, sorted by id. A schedule whose record
/// (or its last run's outcome) does not decode is logged and left out.
pub(crate) async fn read_schedules(
    view: &QueueView,
    queue_name: &str,
) -> Result<Vec<ScheduleInfo>, Error> {
    let keys = Keys::new(queue_name);
    let prefix = prefix(queue_name);
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = match after.take() {
            None => view.kv_scan(&prefix, .., KvOrder::Ascending, 256).await?,
            Some(last) => {
                let range = (Bound::Excluded(last), Bound::Unbounded);
                view.kv_scan(&prefix, range, KvOrder::Ascending, 256)
                    .await?
            }
        };
        for (key, value) in &page.entries {
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let read = match decode::<ScheduleRecord>(key, value) {
                Ok(rec) => info(view, &keys, &id, rec).await,
                Err(e) => Err(e),
            };
            match read {
                Ok(info) => out.push(info),
                // `schedule(id)` gives the error; the others are listed.
                Err(e) if e.is_unreadable_record() => {
                    tracing::error!(schedule = id, "leaving out an unreadable schedule: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        if !page.more {
            return Ok(out);
        }
        after = page.entries.last().map(|(k, _)| k.clone());
    }
}
