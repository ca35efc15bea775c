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
//!   submit record), under the run id `{schedule id}:{fire time in ms}`
//!   (on a fleet, perhaps with a suffix `-{k}`: see below). A fire whose
//!   run id names a run already (one submitted by hand under that id) is
//!   skipped, counted as missed and named in `last_error`: the tick holds
//!   the ids' creation locks from that check to its commit;
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
//!   the live run has ended, checked a `poll_interval` after it was held,
//!   then every tenth of its wait, at most every minute).
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
//! ## On a fleet
//!
//! Each shard of a fleet is its own store with its own runtime, and every
//! shard's runtime may be built with the same schedules. The fleet worker
//! assigns each runtime its shard before it runs; from then on the runtime
//! records, arms, fires and triggers only the schedules whose home is that
//! shard ([`shard_of_schedule`]), so each fires once for the fleet. A run
//! lives on the shard its id routes to, so a fire whose `{id}:{ms}` would
//! route elsewhere gets the shortest suffix `-{k}` that routes it home
//! (the same for the same fire: a tick redelivered after a crash submits
//! the same run). A record on a shard that is not the schedule's home (left
//! by a fleet worker from before schedules had homes) is deleted when that
//! shard's runtime starts.
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
use std::sync::{Arc, Mutex, OnceLock};

pub use def::{Downtime, Overlap, Schedule, ScheduleKind};
pub(crate) use fire::{arm_all, handle_tick};
pub use state::{LastRun, ScheduleInfo};
pub(crate) use state::{read_schedule, read_schedules};

use crate::error::Error;
use crate::route::{shard_of_run, shard_of_schedule};
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
/// per schedule, whether the pool is shutting down, and, on a fleet, the
/// shard the runtime works.
pub(crate) struct Schedules {
    defs: BTreeMap<String, def::Checked>,
    pub queue: String,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    shutting_down: AtomicBool,
    /// `(shard, shards)` once a fleet worker assigned the runtime a shard:
    /// only the schedules homed there are this runtime's.
    shard: OnceLock<(u32, u32)>,
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
            shard: OnceLock::new(),
        })
    }

    /// Make this runtime shard `shard` of a fleet of `shards`: from then on
    /// it defines (records, arms, fires, triggers) only the schedules whose
    /// home is that shard ([`shard_of_schedule`]), and names their runs so they
    /// route there. Set once, before the pool starts; a second, different
    /// assignment is refused.
    pub(crate) fn assign_shard(&self, shard: u32, shards: u32) -> Result<(), Error> {
        if shards == 0 || shard >= shards {
            return Err(Error::InvalidConfig(format!(
                "shard {shard} of a fleet of {shards} shards does not exist"
            )));
        }
        let set = *self.shard.get_or_init(|| (shard, shards));
        if set != (shard, shards) {
            return Err(Error::InvalidConfig(format!(
                "this runtime already works shard {} of {}; build a runtime for each shard",
                set.0, set.1
            )));
        }
        Ok(())
    }

    /// Whether schedule `id` is this runtime's: always on a single store,
    /// on a fleet when its home is this runtime's shard.
    pub(crate) fn is_home(&self, id: &str) -> bool {
        self.shard
            .get()
            .is_none_or(|&(shard, shards)| shard_of_schedule(id, shards) == shard)
    }

    /// The definition of schedule `id`, if it is this runtime's.
    pub(crate) fn get(&self, id: &str) -> Option<&def::Checked> {
        self.defs.get(id).filter(|_| self.is_home(id))
    }

    /// The ids of this runtime's schedules, sorted.
    pub(crate) fn ids(&self) -> impl Iterator<Item = &String> {
        self.defs.keys().filter(|id| self.is_home(id))
    }

    /// Whether this runtime has no schedules.
    pub(crate) fn is_empty(&self) -> bool {
        self.ids().next().is_none()
    }

    /// The run id of schedule `id`'s fire at `at` (ms): `{id}:{at}` for a
    /// timer fire, `{id}:t{at}` for a manual trigger. On a fleet a run lives
    /// on the shard its id routes to, so a fire whose id would route
    /// elsewhere gets the shortest suffix `-{k}` that routes it to the
    /// schedule's home: the same for the same fire, so a fire retried after
    /// a crash is the same run.
    pub(crate) fn run_id(&self, id: &str, at: u64, manual: bool) -> String {
        let base = if manual {
            format!("{id}:t{at}")
        } else {
            format!("{id}:{at}")
        };
        let Some(&(shard, shards)) = self.shard.get() else {
            return base;
        };
        if shard_of_run(&base, shards) == shard {
            return base;
        }
        // Each try lands home with odds 1/shards (at most 1/1024), so
        // 100,000 tries fail with odds below e^-97. Five digits keep the id
        // within the 128-byte limit (a 100-byte schedule id, `:t`, 20 digits
        // of time, `-` and the suffix).
        (1..100_000u32)
            .map(|k| format!("{base}-{k}"))
            .find(|candidate| shard_of_run(candidate, shards) == shard)
            .unwrap_or(base)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{MAX_RUN_ID_LEN, validate_name};

    fn schedules(ids: &[&str]) -> Schedules {
        let defs = ids.iter().map(|id| Schedule::manual(*id)).collect();
        Schedules::new("q", defs).expect("valid definitions")
    }

    /// On a single store a fire's run id is `{id}:{at}` (`{id}:t{at}` by
    /// hand), as it always was.
    #[test]
    fn without_a_shard_run_ids_are_unchanged() {
        let s = schedules(&["daily"]);
        assert_eq!(s.run_id("daily", 1_000, false), "daily:1000");
        assert_eq!(s.run_id("daily", 1_000, true), "daily:t1000");
        assert!(s.get("daily").is_some());
    }

    /// On a fleet every fire's run id routes to the schedule's home shard,
    /// the same id for the same fire, valid and within the length limit,
    /// for the longest schedule id and time, and for a schedule id with a
    /// `.` (whose fires share its root).
    #[test]
    fn on_a_fleet_fired_runs_route_home() {
        let long = "x".repeat(def::MAX_SCHEDULE_ID_LEN);
        let ids = ["daily", "a.b", "report-7", long.as_str()];
        for shards in [1, 2, 3, 7, 64, 1024] {
            for shard in [0, shards / 2, shards - 1] {
                let s = schedules(&ids);
                s.assign_shard(shard, shards).expect("assigned");
                for id in ids {
                    let home = shard_of_schedule(id, shards) == shard;
                    assert_eq!(s.get(id).is_some(), home, "{id} on {shard}/{shards}");
                    if !home {
                        continue;
                    }
                    for at in [0, 1_795_776_625_766, u64::MAX] {
                        for manual in [false, true] {
                            let run = s.run_id(id, at, manual);
                            assert_eq!(shard_of_run(&run, shards), shard, "{run}");
                            assert!(run.len() <= MAX_RUN_ID_LEN, "{run}");
                            validate_name("run id", &run).expect("a valid run id");
                            assert_eq!(run, s.run_id(id, at, manual), "not deterministic");
                        }
                    }
                }
            }
        }
    }

    /// Only the schedules homed on the runtime's shard are its own, and the
    /// other shards of the fleet hold the rest: each id is on one shard.
    #[test]
    fn each_schedule_belongs_to_one_shard() {
        let ids: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut seen = 0;
        for shard in 0..4 {
            let s = schedules(&refs);
            s.assign_shard(shard, 4).expect("assigned");
            seen += s.ids().count();
            assert_eq!(s.is_empty(), s.ids().next().is_none());
        }
        assert_eq!(seen, ids.len());
    }

    #[test]
    fn a_shard_outside_the_fleet_or_a_second_shard_is_refused() {
        let s = schedules(&["daily"]);
        assert!(matches!(s.assign_shard(4, 4), Err(Error::InvalidConfig(_))));
        assert!(matches!(s.assign_shard(0, 0), Err(Error::InvalidConfig(_))));
        s.assign_shard(1, 4).expect("assigned");
        s.assign_shard(1, 4).expect("the same shard again is fine");
        let e = s.assign_shard(2, 4).unwrap_err();
        assert!(e.to_string().contains("already works shard 1 of 4"), "{e}");
    }
}
