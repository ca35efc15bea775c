//! Schedule definitions, as the caller writes them and as the runtime keeps
//! them once checked.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::times::Times;
use crate::error::Error;
use crate::record::{DEFAULT_WORKFLOW, MAX_PAYLOAD_BYTES, validate_name};

/// The longest schedule id, in bytes: the run ids derived from it
/// (`{id}:{ms}`, `{id}:t{ms}`) must fit in 128 bytes.
pub const MAX_SCHEDULE_ID_LEN: usize = 100;

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ScheduleKind {
    /// Every `interval`, counted from when the schedule was first recorded.
    Every {
        /// The interval.
        interval: Duration,
    },
    /// On a cron expression (with a seconds field).
    Cron {
        /// The expression.
        expr: String,
        /// The IANA time zone it is evaluated in (`None`: UTC).
        time_zone: Option<String>,
    },
    /// Only when triggered by hand.
    Manual,
}

/// What a due fire does while the schedule's previous run is still live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Overlap {
    /// Skip the fire (counted in [`ScheduleInfo::skipped_overlap`](crate::ScheduleInfo)).
    #[default]
    Skip,
    /// Fire anyway: runs of the schedule may overlap.
    Allow,
    /// Remember one skipped fire and submit it once the live run has ended
    /// (further fires while one is buffered are skipped).
    BufferOne,
}

/// What happens to fire times missed while no worker ran (more than the
/// schedule's misfire grace behind the clock when handled).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Downtime {
    /// Fire none of them: resume at the next future time.
    #[default]
    Skip,
    /// Fire one catch-up run (for the latest missed time).
    FireOnce,
    /// Fire a run for each missed time, at most `max` (the latest ones).
    FireAll {
        /// The most catch-up runs one tick submits.
        max: u32,
    },
}

/// The input of the runs a schedule submits: computed from the fire time.
pub(crate) type InputFn = Arc<dyn Fn(SystemTime) -> Vec<u8> + Send + Sync>;

/// A schedule: when to submit a run of which workflow with which input.
/// Added with [`WorkflowRuntimeBuilder::schedule`](crate::WorkflowRuntimeBuilder::schedule).
///
/// ```
/// use std::time::Duration;
/// use waymark::{Downtime, Overlap, Schedule};
///
/// let report = Schedule::cron("nightly-report", "0 30 2 * * *")
///     .time_zone("Europe/Paris")
///     .workflow("reports")
///     .input(b"full".to_vec());
/// let sync = Schedule::every_minutes("sync", 5)
///     .workflow("sync")
///     .input_fn(|at| format!("{at:?}").into_bytes())
///     .overlap(Overlap::BufferOne)
///     .downtime(Downtime::FireOnce);
/// let reindex = Schedule::manual("reindex").workflow("search");
/// # let _ = (report, sync, reindex, Duration::ZERO);
/// ```
#[derive(Clone)]
pub struct Schedule {
    pub(crate) id: String,
    kind: ScheduleKind,
    workflow: String,
    input: Input,
    overlap: Overlap,
    downtime: Downtime,
    misfire_grace: Duration,
    /// A time zone given to a schedule that is not a cron one.
    stray_zone: Option<String>,
}

#[derive(Clone)]
enum Input {
    Fixed(Vec<u8>),
    Fn(InputFn),
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schedule")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("workflow", &self.workflow)
            .field("overlap", &self.overlap)
            .field("downtime", &self.downtime)
            .field("misfire_grace", &self.misfire_grace)
            .finish_non_exhaustive()
    }
}

impl Schedule {
    fn new(id: impl Into<String>, kind: ScheduleKind) -> Self {
        Self {
            id: id.into(),
            kind,
            workflow: DEFAULT_WORKFLOW.to_string(),
            input: Input::Fixed(Vec::new()),
            overlap: Overlap::default(),
            downtime: Downtime::default(),
            misfire_grace: Duration::from_secs(60),
            stray_zone: None,
        }
    }

    /// Fire every `interval`, the first time one interval after the
    /// schedule is first recorded (when a worker pool first starts with it).
    pub fn every(id: impl Into<String>, interval: Duration) -> Self {
        Self::new(id, ScheduleKind::Every { interval })
    }

    /// Fire every `n` seconds.
    pub fn every_seconds(id: impl Into<String>, n: u64) -> Self {
        Self::every(id, Duration::from_secs(n))
    }

    /// Fire every `n` minutes.
    pub fn every_minutes(id: impl Into<String>, n: u64) -> Self {
        Self::every(id, Duration::from_secs(n.saturating_mul(60)))
    }

    /// Fire every `n` hours.
    pub fn every_hours(id: impl Into<String>, n: u64) -> Self {
        Self::every(id, Duration::from_secs(n.saturating_mul(3600)))
    }

    /// Fire on a cron expression with a seconds field:
    /// `sec min hour day-of-month month day-of-week [year]`, in UTC unless
    /// [`Self::time_zone`] names another zone.
    pub fn cron(id: impl Into<String>, expr: impl Into<String>) -> Self {
        Self::new(
            id,
            ScheduleKind::Cron {
                expr: expr.into(),
                time_zone: None,
            },
        )
    }

    /// Fire only through [`WorkflowRuntime::trigger`](crate::WorkflowRuntime::trigger).
    pub fn manual(id: impl Into<String>) -> Self {
        Self::new(id, ScheduleKind::Manual)
    }

    /// Evaluate a cron schedule in this IANA time zone (`"Europe/Paris"`);
    /// daylight-saving changes are handled by the cron crate. An error from
    /// `build()` on another kind of schedule or an unknown zone.
    pub fn time_zone(mut self, zone: impl Into<String>) -> Self {
        let zone = zone.into();
        match &mut self.kind {
            ScheduleKind::Cron { time_zone, .. } => *time_zone = Some(zone),
            _ => self.stray_zone = Some(zone),
        }
        self
    }

    /// The workflow of the runs it submits (default `"default"`).
    pub fn workflow(mut self, workflow: impl Into<String>) -> Self {
        self.workflow = workflow.into();
        self
    }

    /// The input of every run it submits (default empty).
    pub fn input(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.input = Input::Fixed(input.into());
        self
    }

    /// Compute each run's input from its fire time (for a manual trigger,
    /// the time of the trigger). A panic in `f` skips that fire, recorded
    /// in the schedule's `last_error`.
    pub fn input_fn(mut self, f: impl Fn(SystemTime) -> Vec<u8> + Send + Sync + 'static) -> Self {
        self.input = Input::Fn(Arc::new(f));
        self
    }

    /// What a due fire does while the previous run is live (default
    /// [`Overlap::Skip`]).
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// What happens to fire times missed while no worker ran (default
    /// [`Downtime::Skip`]).
    pub fn downtime(mut self, downtime: Downtime) -> Self {
        self.downtime = downtime;
        self
    }

    /// How far behind the clock a fire time may be handled and still count
    /// as on time rather than missed (default 60 s).
    pub fn misfire_grace(mut self, grace: Duration) -> Self {
        self.misfire_grace = grace;
        self
    }

    /// Check the definition, naming the schedule in any error.
    pub(crate) fn check(self) -> Result<Checked, Error> {
        let bad = |what: String| {
            Err(Error::InvalidConfig(format!(
                "schedule `{}`: {what}",
                self.id
            )))
        };
        validate_name("schedule id", &self.id)?;
        if self.id.len() > MAX_SCHEDULE_ID_LEN {
            return bad(format!(
                "the id is {} bytes; schedule ids are at most {MAX_SCHEDULE_ID_LEN}",
                self.id.len()
            ));
        }
        if let Err(e) = validate_name("workflow name", &self.workflow) {
            return bad(e.to_string());
        }
        if let Input::Fixed(input) = &self.input
            && input.len() > MAX_PAYLOAD_BYTES
        {
            return bad(format!(
                "the input is {} bytes, over the limit of {MAX_PAYLOAD_BYTES}",
                input.len()
            ));
        }
        if let Some(zone) = &self.stray_zone {
            return bad(format!(
                "time zone `{zone}` given, but a time zone applies only to a cron schedule"
            ));
        }
        if let Downtime::FireAll { max: 0 } = self.downtime {
            return bad("Downtime::FireAll needs a max of at least 1".into());
        }
        let times = match Times::new(&self.kind) {
            Ok(times) => times,
            Err(why) => return bad(why),
        };
        Ok(Checked {
            kind: self.kind,
            workflow: self.workflow,
            input: self.input,
            overlap: self.overlap,
            downtime: self.downtime,
            misfire_grace_ms: self.misfire_grace.as_millis().min(u64::MAX as u128) as u64,
            times,
        })
    }
}

/// A checked definition.
pub(crate) struct Checked {
    pub kind: ScheduleKind,
    pub workflow: String,
    input: Input,
    pub overlap: Overlap,
    pub downtime: Downtime,
    pub misfire_grace_ms: u64,
    pub times: Times,
}

impl Checked {
    /// The input of the run fired at `at`; the user's function is isolated,
    /// a panic (or an oversized input) is an error message.
    pub(crate) fn input_at(&self, at: SystemTime) -> Result<Vec<u8>, String> {
        let input = match &self.input {
            Input::Fixed(bytes) => return Ok(bytes.clone()),
            Input::Fn(f) => catch_unwind(AssertUnwindSafe(|| f(at)))
                .map_err(|_| "the schedule's input function panicked".to_string())?,
        };
        if input.len() > MAX_PAYLOAD_BYTES {
            return Err(format!(
                "the input function returned {} bytes, over the limit of {MAX_PAYLOAD_BYTES}",
                input.len()
            ));
        }
        Ok(input)
    }
}
