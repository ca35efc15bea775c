//! Durable schedules: workflows submitted every N seconds, on a cron
//! expression, or only when triggered by hand — each due time fired exactly
//! once, across crashes and restarts.
//!
//! ## How a schedule fires
//!
//! Every active schedule has one **tick job** armed on the queue
//! `{queue_name}-sched`, scheduled (`run_at`) for its next fire time, with
//! the dedup key `sched:{id}:{time}`. A claim loop of the worker pool claims
//! due ticks; the tick's `ack_with` commits, in **one transaction**:
//!
//! - the submit of each run it fires (step 0's job, the run record, the
//!   submit record), under the run id `{schedule id}:{fire time in ms}`;
//! - the schedule's durable record (`wm/{queue}/sched/{id}`): last fire time
//!   and run id, run count, counters, next fire time;
//! - the next tick job.
//!
//! So a crash before that commit leaves the tick claimed (it is delivered
//! again and fires the same time under the same run id), and a crash after
//! it leaves the next tick armed: each due time fires once, a restart
//! neither forgets nor repeats, and nothing waits in memory. A firing costs
//! one awaited commit. A tick whose time is not the record's `armed` time is
//! stale (left by a pause, a definition change or a restart) and is acked
//! without effect.
//!
//! ## Policies
//!
//! - [`Overlap`]: what a due fire does while the schedule's previous run is
//!   still live (`Skip`, counted; `Allow`; `BufferOne`: fire once more when
//!   the live run has ended, checked every `poll_interval`).
//! - [`Downtime`]: what happens to fire times missed while no worker ran. A
//!   time is *missed* when it is more than the schedule's `misfire_grace`
//!   (default 60 s) behind the clock when its tick is handled.
//! - The workflow's breaker ([`BackoffPolicy`](crate::BackoffPolicy)): a
//!   fire time before the end of a backoff window is suppressed (counted),
//!   so the interval widens with the failure streak; while the workflow is
//!   tripped no fire submits anything (counted), and after
//!   [`reset_workflow`](crate::WorkflowRuntime::reset_workflow) the schedule
//!   fires again at its next time. A manual
//!   [`trigger`](crate::WorkflowRuntime::trigger) overrides a backoff window
//!   but never a trip.
//!
//! ## Definitions across deployments
//!
//! Schedules are defined in code, on the runtime builder. When the worker
//! pool starts it records each definition: a new schedule is armed for its
//! first time after now; a changed one keeps its armed time and fires under
//! the new definition from then on; one no longer defined is marked inactive
//! (its history is kept, it stops firing).
//!
//! ## Cron
//!
//! Cron expressions are parsed by the `croner` crate with a **required
//! seconds field** (`sec min hour day-of-month month day-of-week [year]`),
//! evaluated in UTC or in a named IANA time zone (`chrono-tz`). `croner` was
//! chosen over `cron` because it follows the Open Cron Pattern
//! Specification on DST: a fixed time that falls in a spring-forward gap
//! fires at the next valid instant, and one in a fall-back overlap fires
//! once, where `cron` silently skips a time in a gap. Both are maintained
//! and build here; `croner` also validates day-of-month/day-of-week ranges
//! and supports `L`, `#` and `W`.

mod api;
mod def;
mod fire;
mod state;
mod times;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use def::{Downtime, Overlap, Schedule, ScheduleKind};
pub(crate) use fire::{arm_all, handle_tick};
pub use state::{LastRun, ScheduleInfo};
pub(crate) use state::{read_schedule, read_schedules};

use crate::error::Error;
use crate::sync::lock;

/// The suffix of the tick queue's name (`{queue_name}-sched`).
pub(crate) const SCHEDULE_QUEUE_SUFFIX: &str = "-sched";

/// How many ticks the pool handles at once. Each awaits one commit, so the
/// fires per second of a busy store follow this over the flush interval.
pub(crate) const TICK_CONCURRENCY: usize = 256;

/// The tick queue of a runtime whose step queue is `queue_name`.
pub(crate) fn schedule_queue_name(queue_name: &str) -> String {
    format!("{queue_name}{SCHEDULE_QUEUE_SUFFIX}")
}

/// The schedules of one runtime: their checked definitions, a writer lock
/// per schedule, and whether the pool is shutting down.
pub(crate) struct Schedules {
    pub defs: BTreeMap<String, def::Checked>,
    pub queue: String,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    shutting_down: AtomicBool,
}

impl Schedules {
    /// Check the definitions: a duplicate id, a zero interval, a bad cron
    /// expression or time zone is an error naming the schedule.
    pub(crate) fn new(queue_name: &str, defs: Vec<Schedule>) -> Result<Self, Error> {
        let mut checked = BTreeMap::new();
        for schedule in defs {
            let id = schedule.id.clone();
            let c = schedule.check()?;
            if checked.insert(id.clone(), c).is_some() {
                return Err(Error::InvalidConfig(format!(
                    "schedule `{id}` is defined twice; give each schedule its own id"
                )));
            }
        }
        Ok(Self {
            defs: checked,
            queue: schedule_queue_name(queue_name),
            locks: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// The writer lock of one schedule: held from reading its record until
    /// the commit that rewrites it returns.
    pub(crate) async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = lock(&self.locks).entry(id.to_string()).or_default().clone();
        m.lock_owned().await
    }

    /// The pool is stopping: manual triggers are refused from now on.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub(crate) fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}
