//! Reading runs from durable state: the one implementation of `status`,
//! `outcome`, run listings and workflow health, over a [`QueueView`].
//!
//! The worker's own runtime reads through its `Queue`'s view, and a
//! [`Client`](crate::Client) in another process through a `QueueReader`'s:
//! both call these functions, so they give the same answers (the reader's
//! up to its lag).

use std::ops::Bound;
use std::time::SystemTime;

use futures_util::StreamExt;
use taquba::{JobRecord, JobStatus, KvOrder, QueueView};

use crate::breaker::{Breakers, ms_to_time};
use crate::error::Error;
use crate::history::RunHistory;
use crate::hook::{RunOutcome, TerminalStatus};
use crate::record::{
    DEFAULT_WORKFLOW, HEADER_JOIN, HEADER_PARKED, JoinRecord, Keys, OutcomeRecord, RunRecord,
    SubmitRecord, bounded_reason, deadline_of, decode, parse_step_extras, rerun_of,
    timed_out_reason, user_headers, validate_name,
};

/// Where a live run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RunState {
    /// Its current step waits for a worker.
    Pending,
    /// Its current step waits for its time (`ContinueAfter`, or a retry).
    Scheduled,
    /// A worker is running its current step.
    Running,
    /// A cancel was accepted; the run ends `Cancelled` once its running step
    /// returns.
    Cancelling,
    /// Its workflow's breaker tripped: the step is parked (holding no worker
    /// or lease) until the breaker closes.
    Parked,
    /// Its last step returned `WaitForSignal`: the next step waits (holding
    /// no worker) for a signal, or until [`RunStatus::scheduled_for`], when
    /// it runs without one.
    WaitingForSignal,
    /// Its last step returned `SpawnChildren`: the next step waits (holding
    /// no worker) until every child has ended ([`RunStatus::children_live`]
    /// are still running).
    WaitingForChildren,
}

/// A live run's status, read from durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStatus {
    /// The run.
    pub run_id: String,
    /// Where it is.
    pub state: RunState,
    /// The step it is at.
    pub current_step: u32,
    /// How many times the run was re-run from a step (0: its first
    /// segment).
    pub reruns: u32,
    /// The workflow it belongs to.
    pub workflow: String,
    /// When a `Scheduled` step runs: after `ContinueAfter`, a retry's backoff
    /// or a breaker's backoff window; for `WaitingForSignal`, when the wait
    /// times out.
    pub scheduled_for: Option<SystemTime>,
    /// For `WaitingForChildren`: how many of its children have not ended.
    pub children_live: Option<u32>,
}

/// Where a listed run is: live in a [`RunState`], or ended with a
/// [`TerminalStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunPhase {
    /// The run lives.
    Live(RunState),
    /// The run ended (its outcome is kept for the retention window).
    Ended(TerminalStatus),
}

/// Which runs a listing returns, by where they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateFilter {
    /// Every live run.
    Live,
    /// Every ended run (within the retention window).
    Ended,
    /// Runs in exactly this phase.
    Is(RunPhase),
}

impl StateFilter {
    fn matches(&self, phase: &RunPhase) -> bool {
        match self {
            StateFilter::Live => matches!(phase, RunPhase::Live(_)),
            StateFilter::Ended => matches!(phase, RunPhase::Ended(_)),
            StateFilter::Is(want) => want == phase,
        }
    }
}

/// The runs a listing asks for: a filter and a page. The submit-time and
/// header filters read each candidate's submit record (one more read per
/// run). Construct with
/// `RunFilter { workflow: Some(..), ..Default::default() }`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only runs in this state (`None`: live and ended runs).
    pub state: Option<StateFilter>,
    /// Only runs of this workflow.
    pub workflow: Option<String>,
    /// Only the children of this run, and theirs (their ids start with
    /// `{id}.`, see [`ChildSpec`](crate::ChildSpec)).
    pub children_of: Option<String>,
    /// Only runs submitted at or after this time (queue clock).
    pub submitted_since: Option<SystemTime>,
    /// Only runs submitted before this time (queue clock).
    pub submitted_until: Option<SystemTime>,
    /// Only runs submitted with this header: (name, value).
    pub header: Option<(String, String)>,
    /// Start after this run id: the [`RunPage::next`] of the previous page.
    pub after: Option<String>,
    /// The most runs in the page; 0 means [`DEFAULT_RUN_PAGE`].
    pub limit: usize,
}

/// The page size of a listing whose [`RunFilter::limit`] is 0.
pub const DEFAULT_RUN_PAGE: usize = 100;

/// One run in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// The run.
    pub run_id: String,
    /// Its workflow.
    pub workflow: String,
    /// Where it is.
    pub phase: RunPhase,
    /// The step it is at (live), or its last step (ended).
    pub step: u32,
}

/// A page of runs, in run id order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunPage {
    /// The runs.
    pub runs: Vec<RunSummary>,
    /// Pass as [`RunFilter::after`] for the next page; `None` when this page
    /// is the last.
    pub next: Option<String>,
    /// The runs in this page's range whose records could not be read
    /// (corrupt, or written by a newer Waymark), in run id order. They are
    /// left out of [`runs`](Self::runs) whatever the filter, and the
    /// listing goes on past them: one bad record does not hide the rest.
    pub unreadable: Vec<UnreadableRun>,
}

/// A run a listing skipped because one of its records does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableRun {
    /// The run.
    pub run_id: String,
    /// What was wrong, naming the record's key: the
    /// [`Error::CorruptRecord`] or [`Error::UnsupportedRecordVersion`] that
    /// reading it gave. `status` and `outcome` on the run give the same
    /// error.
    pub error: String,
}

/// Which queue a dead-lettered job was on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadKind {
    /// A run's step job (its run ended `Failed`, or will when the worker
    /// reconciles it).
    Step,
    /// A hook notification the hook refused for good or ran out of attempts
    /// on.
    Hook,
}

/// A dead-lettered job, as [`Client::dead_jobs`](crate::Client::dead_jobs)
/// lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct DeadJob {
    /// The job (pass it to `Client::requeue`).
    pub job_id: String,
    /// Its queue.
    pub kind: DeadKind,
    /// Its run, from its headers.
    pub run_id: Option<String>,
    /// For a step job: the step.
    pub step: Option<u32>,
    /// For a step job: its workflow.
    pub workflow: Option<String>,
    /// The attempts it had.
    pub attempts: u32,
    /// Why it was dead-lettered (its last error).
    pub reason: Option<String>,
}

/// The most dead jobs one page holds: a larger `limit` is cut to it.
pub const MAX_DEAD_JOB_PAGE: usize = 1000;

/// A page of the dead jobs on `queue`, in id (enqueue) order after `after`
/// (`limit` within 1 and [`MAX_DEAD_JOB_PAGE`]).
pub(crate) async fn dead_jobs(
    view: &QueueView,
    queue: &str,
    kind: DeadKind,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadJob>, Error> {
    let jobs = view
        .dead_jobs(queue, after, limit.clamp(1, MAX_DEAD_JOB_PAGE))
        .await?;
    Ok(jobs.into_iter().map(|job| dead_job_of(job, kind)).collect())
}

/// Dead job `job_id` of the step queue `step_queue` or its hook queue, if
/// there is one.
pub(crate) async fn dead_job(
    view: &QueueView,
    step_queue: &str,
    job_id: &str,
) -> Result<Option<DeadJob>, Error> {
    let Some(job) = view.get_job(job_id).await? else {
        return Ok(None);
    };
    if job.status != JobStatus::Dead {
        return Ok(None);
    }
    let kind = if job.queue == step_queue {
        DeadKind::Step
    } else if job.queue == crate::hook::hook_queue_name(step_queue) {
        DeadKind::Hook
    } else {
        return Ok(None);
    };
    Ok(Some(dead_job_of(job, kind)))
}

/// A dead job of `kind`, as the listings give it.
fn dead_job_of(job: JobRecord, kind: DeadKind) -> DeadJob {
    let step_job = kind == DeadKind::Step;
    DeadJob {
        run_id: job.headers.get(crate::record::HEADER_RUN_ID).cloned(),
        step: job
            .headers
            .get(crate::record::HEADER_STEP)
            .filter(|_| step_job)
            .and_then(|s| s.parse().ok()),
        workflow: step_job.then(|| job_workflow(&job)),
        attempts: job.attempts,
        reason: job.last_error.clone(),
        job_id: job.id,
        kind,
    }
}

/// The workflow a step job belongs to.
pub(crate) fn job_workflow(job: &JobRecord) -> String {
    parse_step_extras(&job.headers)
        .map_or(DEFAULT_WORKFLOW, |(w, _)| w)
        .to_string()
}

/// A run's live record.
pub(crate) async fn read_run(
    view: &QueueView,
    keys: &Keys,
    run_id: &str,
) -> Result<Option<RunRecord>, Error> {
    let key = keys.run(run_id);
    match view.kv_get(&key).await? {
        Some(bytes) => Ok(Some(decode(&key, &bytes)?)),
        None => Ok(None),
    }
}

/// A run's outcome: its terminal record, or, for a run whose current step
/// the queue dead-lettered by itself (its process died during the last
/// attempt), the outcome the worker pool records when it reconciles the job.
/// Read only: the pool writes it.
pub(crate) async fn outcome(
    view: &QueueView,
    keys: &Keys,
    run_id: &str,
) -> Result<Option<RunOutcome>, Error> {
    if let Some(outcome) = recorded_outcome(view, keys, run_id).await? {
        return Ok(Some(outcome));
    }
    match current_step(view, keys, run_id).await? {
        Some((run, job)) if job.status == JobStatus::Dead => {
            Ok(Some(dead_outcome(run_id, &run, &job)))
        }
        Some(_) => Ok(None),
        // It may have ended between the two reads.
        None => recorded_outcome(view, keys, run_id).await,
    }
}

/// The outcome of a run whose current step `job` the queue dead-lettered by
/// itself: a step asked to stop ends as a settlement would have ended it,
/// `TimedOut` when the run's deadline had passed by the time the queue gave
/// up on the job (a deadline stop, or a cancel overtaken by the deadline),
/// `Cancelled` otherwise; `Failed` when no stop was asked.
pub(crate) fn dead_outcome(run_id: &str, run: &RunRecord, job: &JobRecord) -> RunOutcome {
    let deadline =
        deadline_of(&job.headers).filter(|at| job.failed_at.is_some_and(|failed| failed >= *at));
    let (status, error) = if let (true, Some(at)) = (job.cancel_requested, deadline) {
        (TerminalStatus::TimedOut, Some(timed_out_reason(at)))
    } else if job.cancel_requested {
        (TerminalStatus::Cancelled, None)
    } else {
        let why = job
            .last_error
            .clone()
            .unwrap_or_else(|| "step dead-lettered by the queue".into());
        (
            TerminalStatus::Failed,
            Some(bounded_reason(format!(
                "step {} gave up after {} attempts: {why}",
                run.step, job.attempts
            ))),
        )
    };
    RunOutcome {
        run_id: run_id.to_string(),
        workflow: job_workflow(job),
        status,
        result: None,
        error,
        headers: user_headers(&job.headers),
        final_step: run.step,
        reruns: rerun_of(&job.headers),
    }
}

/// A run's terminal record.
async fn recorded_outcome(
    view: &QueueView,
    keys: &Keys,
    run_id: &str,
) -> Result<Option<RunOutcome>, Error> {
    let key = keys.out(run_id);
    match view.kv_get(&key).await? {
        Some(bytes) => Ok(Some(
            decode::<OutcomeRecord>(&key, &bytes)?.into_outcome(run_id),
        )),
        None => Ok(None),
    }
}

/// The live run record and its current step's job, read consistently: a
/// settlement between the two reads is retried.
pub(crate) async fn current_step(
    view: &QueueView,
    keys: &Keys,
    run_id: &str,
) -> Result<Option<(RunRecord, JobRecord)>, Error> {
    let mut last_missing: Option<RunRecord> = None;
    loop {
        let Some(run) = read_run(view, keys, run_id).await? else {
            return Ok(None);
        };
        match view.job_record(&run.job_id).await? {
            Some(job) if job.status != JobStatus::Done => return Ok(Some((run, job))),
            _ => {
                if last_missing.as_ref() == Some(&run) {
                    return Err(Error::CorruptRecord {
                        key: String::from_utf8_lossy(&keys.run(run_id)).into_owned(),
                        reason: format!(
                            "the run is at step {} but its job `{}` does not exist",
                            run.step, run.job_id
                        ),
                    });
                }
                last_missing = Some(run);
                tokio::task::yield_now().await;
            }
        }
    }
}

/// A live run's status. `cancel_here` says whether this process accepted a
/// cancel of the run's claimed step that is not yet durable on its job.
pub(crate) async fn status(
    view: &QueueView,
    keys: &Keys,
    breakers: &Breakers,
    run_id: &str,
    cancel_here: impl Fn(&str) -> bool,
) -> Result<Option<RunStatus>, Error> {
    validate_name("run id", run_id)?;
    let Some((run, job)) = current_step(view, keys, run_id).await? else {
        return Ok(None);
    };
    let cancel_here = cancel_here(&job.id);
    let trips = &mut Trips::default();
    status_of(
        view,
        keys,
        (breakers, trips),
        run_id,
        &run,
        &job,
        cancel_here,
    )
    .await
}

/// A read's answers from the workflows' breakers. A trip read waits for
/// the health commits in flight, so a listing asks once per workflow: a
/// page of a busy workflow's runs waits once, not once a run.
#[derive(Default)]
struct Trips(std::collections::HashMap<String, bool>);

impl Trips {
    async fn tripped(
        &mut self,
        breakers: &Breakers,
        view: &QueueView,
        workflow: &str,
    ) -> Result<bool, Error> {
        if let Some(tripped) = self.0.get(workflow) {
            return Ok(*tripped);
        }
        let tripped = breakers.is_tripped(view, workflow).await?;
        self.0.insert(workflow.to_string(), tripped);
        Ok(tripped)
    }
}

/// The status of a run at `run` whose current step is `job`.
async fn status_of(
    view: &QueueView,
    keys: &Keys,
    (breakers, trips): (&Breakers, &mut Trips),
    run_id: &str,
    run: &RunRecord,
    job: &JobRecord,
    cancel_here: bool,
) -> Result<Option<RunStatus>, Error> {
    let state = match job.status {
        JobStatus::Pending if job.cancel_requested => RunState::Cancelling,
        JobStatus::Pending => RunState::Pending,
        JobStatus::Scheduled if job.signal_wait => RunState::WaitingForSignal,
        JobStatus::Scheduled if job.headers.contains_key(HEADER_PARKED) => RunState::Parked,
        JobStatus::Scheduled if job.headers.contains_key(HEADER_JOIN) => {
            RunState::WaitingForChildren
        }
        JobStatus::Scheduled => RunState::Scheduled,
        JobStatus::Claimed if job.cancel_requested || cancel_here => RunState::Cancelling,
        JobStatus::Claimed => RunState::Running,
        // The queue gave up on the step: the run has ended, and `outcome`
        // reports it (the pool records it when it reconciles the job).
        JobStatus::Dead | JobStatus::Done => return Ok(None),
    };
    let workflow = job_workflow(job);
    // A waiting step of a tripped workflow is parked when it is claimed
    // (and runs only after a reset or as the probe): report it so now.
    let state = match state {
        RunState::Pending | RunState::Scheduled
            if trips.tripped(breakers, view, &workflow).await? =>
        {
            RunState::Parked
        }
        state => state,
    };
    let children_live = if state == RunState::WaitingForChildren {
        let key = keys.join_record(run_id, run.step);
        match view.kv_get(&key).await? {
            Some(bytes) => {
                let join: JoinRecord = decode(&key, &bytes)?;
                Some(u32::try_from(join.live()).unwrap_or(u32::MAX))
            }
            None => None,
        }
    } else {
        None
    };
    Ok(Some(RunStatus {
        run_id: run_id.to_string(),
        state,
        current_step: run.step,
        reruns: rerun_of(&job.headers),
        workflow,
        scheduled_for: matches!(state, RunState::Scheduled | RunState::WaitingForSignal)
            .then_some(job.run_at)
            .flatten()
            .map(ms_to_time),
        children_live,
    }))
}

/// A page of runs, live and ended, in run id order.
pub(crate) async fn runs(
    view: &QueueView,
    keys: &Keys,
    breakers: &Breakers,
    filter: &RunFilter,
    cancel_here: impl Fn(&str) -> bool,
) -> Result<RunPage, Error> {
    if let Some(after) = &filter.after {
        validate_name("run id", after)?;
    }
    if let Some(workflow) = &filter.workflow {
        validate_name("workflow name", workflow)?;
    }
    if let Some(parent) = &filter.children_of {
        validate_name("run id", parent)?;
    }
    let limit = if filter.limit == 0 {
        DEFAULT_RUN_PAGE
    } else {
        filter.limit
    };
    let want_live = !matches!(filter.state, Some(StateFilter::Ended))
        && !matches!(filter.state, Some(StateFilter::Is(RunPhase::Ended(_))));
    let want_ended = !matches!(filter.state, Some(StateFilter::Live))
        && !matches!(filter.state, Some(StateFilter::Is(RunPhase::Live(_))));
    let range = |prefix: &[u8]| match &filter.after {
        Some(after) => {
            let mut from = prefix.to_vec();
            from.extend_from_slice(after.as_bytes());
            (Bound::Excluded(from), Bound::Unbounded)
        }
        None => (Bound::Unbounded, Bound::Unbounded),
    };
    let (run_prefix, out_prefix) = (keys.run_prefix(), keys.out_prefix());
    // Children's ids extend their parent's with `.`: scan only those.
    let scanned = |prefix: &[u8]| {
        let mut scan = prefix.to_vec();
        if let Some(parent) = &filter.children_of {
            scan.extend_from_slice(parent.as_bytes());
            scan.push(b'.');
        }
        scan
    };
    let (run_scan, out_scan) = (scanned(run_prefix), scanned(out_prefix));
    let page = limit.clamp(16, 256);
    let mut live = view
        .kv_entries(&run_scan, range(run_prefix), KvOrder::Ascending, page)
        .boxed();
    let mut ended = view
        .kv_entries(&out_scan, range(out_prefix), KvOrder::Ascending, page)
        .boxed();
    let mut next_live = if want_live { live.next().await } else { None };
    let mut next_ended = if want_ended { ended.next().await } else { None };
    let mut out = RunPage::default();
    let mut trips = Trips::default();
    loop {
        // Take the smaller key of the two streams.
        let take_live = match (&next_live, &next_ended) {
            (None, None) => break,
            (Some(Err(_)), _) => true,
            (_, Some(Err(_))) => false,
            (Some(Ok((l, _))), Some(Ok((e, _)))) => l[run_prefix.len()..] <= e[out_prefix.len()..],
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        let item = if take_live {
            std::mem::replace(&mut next_live, live.next().await)
        } else {
            std::mem::replace(&mut next_ended, ended.next().await)
        };
        let Some(item) = item else { break };
        let (key, value) = item?;
        let prefix = if take_live { run_prefix } else { out_prefix };
        let run_id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        // The run's summary if the filter keeps it; an error for a record
        // that does not decode names the run instead of ending the listing.
        let listed = async {
            let summary = if take_live {
                let run = decode::<RunRecord>(&key, &value)?;
                live_summary(
                    view,
                    keys,
                    (breakers, &mut trips),
                    filter,
                    &cancel_here,
                    run_id.clone(),
                    run,
                )
                .await?
            } else {
                let record = decode::<OutcomeRecord>(&key, &value)?;
                Some(RunSummary {
                    run_id: run_id.clone(),
                    workflow: record.workflow,
                    phase: RunPhase::Ended(record.status),
                    step: record.final_step,
                })
            };
            let Some(summary) = summary else {
                return Ok(None);
            };
            let kept = filter
                .workflow
                .as_ref()
                .is_none_or(|w| *w == summary.workflow)
                && filter.state.is_none_or(|s| s.matches(&summary.phase))
                && submitted_as(view, keys, filter, &summary.run_id).await?;
            Ok::<_, Error>(kept.then_some(summary))
        };
        let summary = match listed.await {
            Ok(Some(summary)) => summary,
            Ok(None) => continue,
            Err(e) if e.is_unreadable_record() => {
                out.unreadable.push(UnreadableRun {
                    run_id,
                    error: e.to_string(),
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        out.runs.push(summary);
        if out.runs.len() == limit {
            out.next = out.runs.last().map(|r| r.run_id.clone());
            break;
        }
    }
    Ok(out)
}

/// The listing's summary of live run `run_id` at `run`; `None` when it is
/// not listed (settled between two reads, or of another workflow).
async fn live_summary(
    view: &QueueView,
    keys: &Keys,
    (breakers, trips): (&Breakers, &mut Trips),
    filter: &RunFilter,
    cancel_here: &impl Fn(&str) -> bool,
    run_id: String,
    run: RunRecord,
) -> Result<Option<RunSummary>, Error> {
    let Some(job) = view.job_record(&run.job_id).await? else {
        // Settled between the two reads: it is listed where it went.
        return Ok(None);
    };
    if filter
        .workflow
        .as_ref()
        .is_some_and(|w| *w != job_workflow(&job))
    {
        return Ok(None);
    }
    let cancel = cancel_here(&job.id);
    let Some(status) =
        status_of(view, keys, (breakers, trips), &run_id, &run, &job, cancel).await?
    else {
        return Ok(None);
    };
    Ok(Some(RunSummary {
        run_id,
        workflow: status.workflow,
        phase: RunPhase::Live(status.state),
        step: status.current_step,
    }))
}

/// Whether run `run_id`'s submit record matches the filter's submit time
/// and header (read only when the filter asks; a run without one, e.g.
/// past retention, does not match).
async fn submitted_as(
    view: &QueueView,
    keys: &Keys,
    filter: &RunFilter,
    run_id: &str,
) -> Result<bool, Error> {
    if filter.submitted_since.is_none()
        && filter.submitted_until.is_none()
        && filter.header.is_none()
    {
        return Ok(true);
    }
    let key = keys.sub(run_id);
    let Some(bytes) = view.kv_get(&key).await? else {
        return Ok(false);
    };
    let record: SubmitRecord = decode(&key, &bytes)?;
    let at = ms_to_time(record.submitted_at_ms);
    Ok(filter.submitted_since.is_none_or(|since| at >= since)
        && filter.submitted_until.is_none_or(|until| at < until)
        && filter
            .header
            .as_ref()
            .is_none_or(|(name, value)| record.headers.get(name) == Some(value)))
}

/// A run's step history; `None` for a run that has neither history entries
/// nor a live or terminal record.
pub(crate) async fn history(
    view: &QueueView,
    keys: &Keys,
    run_id: &str,
) -> Result<Option<RunHistory>, Error> {
    let (entries, next) = crate::history::entries(view, keys, run_id).await?;
    if entries.is_empty()
        && read_run(view, keys, run_id).await?.is_none()
        && outcome(view, keys, run_id).await?.is_none()
    {
        return Ok(None);
    }
    Ok(Some(crate::history::assemble(run_id, entries, next)))
}
