//! The JSON API under `/api`: reads through the [`Client`]'s reader,
//! changes through its inbox requests (each answered once the worker's
//! reply is visible, within the store timeout).
//!
//! | method and path | answer |
//! |-----------------|--------|
//! | `GET /api/runs?state=&workflow=&children_of=&since_ms=&until_ms=&header=NAME=VALUE&after=&limit=` | `{runs: [...], next}`: a page in run id order; `next` is the `after` of the next page |
//! | `GET /api/runs/{id}` | `{run_id, workflow, live, outcome, children, history}`; 404 for an unknown run |
//! | `POST /api/runs/{id}/cancel` | `{run_id, cancelled}` (the worker's answer: `false` for a run that had already ended); 404 for an unknown run |
//! | `GET /api/workflows` | every workflow's health and breaker (on a fleet, one per shard that knows the workflow, with its `shard`) |
//! | `POST /api/workflows/{name}/reset` | `{workflow, was_open}`: the breaker closed, its parked steps released (on a fleet on every shard, with `shards_open`: where it was open) |
//! | `GET /api/dead?kind=step\|hook&after=&limit=&shard=` | `{jobs: [...], next}`: dead-lettered step jobs (default) or hook notifications, with reasons (on a fleet shard by shard, each job with its `shard`, and `next_shard` with `next`) |
//! | `POST /api/dead/{job}/requeue` | `{job_id, requeued}`: a hook is delivered again (`hook`), a step job's run re-runs from that step (`rerun`, with `run_id` and `rerun`) |
//! | `GET /api/schedules` | every schedule's state |
//! | `POST /api/schedules/{id}/trigger` | `{run_id}` of the run the fire submitted |
//! | `GET /api/worker` | the worker's last heartbeat (on a fleet the newest, and each shard's under `shards`) |
//!
//! On a fleet, everything about one run goes to its shard, the schedules
//! to their home shards, and the run listing is merged across shards (see
//! [`super::source`]).
//!
//! Errors are `{error}` with a status: 400 for a malformed id or filter,
//! 401 for a missing or wrong bearer token, 421 for a request naming
//! another host than a loopback one on a loopback address (see
//! [`super`]), 404 for an unknown run,
//! schedule or dead job, 409 for a refusal of the worker (a tripped workflow, an
//! overlapping fire), 504 when the store or the worker did not answer in
//! time, 500 otherwise.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::time::Instant;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use waymark::taquba::WriterHeartbeat;
use waymark::{
    DeadJob, DeadKind, Error, Reply, RunFilter, RunHistory, UnreadableRun, validate_name,
};

use super::App;
use super::json::{LiveJson, OutcomeJson, RunRow, ScheduleJson, WorkflowJson, parse_state};

/// The most runs one page may ask for.
pub const MAX_PAGE: usize = 1000;

/// An API error: a status and what went wrong.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with this status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// A malformed request (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// Something unknown (404).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidRunId { .. } | Error::InvalidConfig(_) | Error::ReservedName { .. } => {
                StatusCode::BAD_REQUEST
            }
            Error::RunNotFound(_) | Error::ScheduleNotFound(_) | Error::JobNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Error::WorkflowTripped { .. }
            | Error::ScheduleOverlap { .. }
            | Error::ShuttingDown
            | Error::RequestRefused { .. }
            | Error::RunLive(_)
            | Error::RunSucceeded(_)
            | Error::StepNotReached { .. }
            | Error::StepInputNotKept { .. } => StatusCode::CONFLICT,
            // Only a request already stored times out waiting for its
            // answer here (a store that does not answer is `bounded`'s).
            Error::TimedOut { .. } => {
                return Self::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "{e}; the request waits in the store's inbox and is applied when a worker \
                         runs: do not send it again"
                    ),
                );
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// What a handler returns.
pub type ApiResult<T> = Result<Json<T>, ApiError>;

impl App {
    /// `operation`, failing with 504 when it takes longer than the store
    /// timeout.
    pub async fn bounded<T>(
        &self,
        what: &str,
        operation: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, ApiError> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(done) => Ok(done?),
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("{what}: the store did not answer within {:?}", self.timeout),
            )),
        }
    }
}

impl App {
    /// A request sent and its answer awaited (`operation`, which gives up
    /// waiting for a worker at the timeout), failing with 504 when the
    /// store itself stops answering: bounded at twice the timeout and a
    /// little more.
    pub async fn answered<T>(
        &self,
        what: &str,
        operation: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, ApiError> {
        let bound = self
            .timeout
            .saturating_mul(2)
            .saturating_add(Duration::from_secs(2));
        match tokio::time::timeout(bound, operation).await {
            Ok(done) => Ok(done?),
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "{what}: the store did not answer within {bound:?}; the request may be \
                     stored (a worker applies it): check before sending it again"
                ),
            )),
        }
    }
}

/// Check an id from a path: 400 when it is not a valid name.
pub fn check_id(what: &'static str, id: &str) -> Result<(), ApiError> {
    validate_name(what, id).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// The query of `GET /api/runs`.
#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    /// `live`, `ended`, a live state or a terminal status.
    state: Option<String>,
    /// A workflow name.
    workflow: Option<String>,
    /// A run whose children (and theirs) to list.
    children_of: Option<String>,
    /// Only runs submitted at or after this time (ms since the epoch).
    since_ms: Option<u64>,
    /// Only runs submitted before this time (ms since the epoch).
    until_ms: Option<u64>,
    /// Only runs submitted with this header: `NAME=VALUE`.
    header: Option<String>,
    /// The `next` of the previous page.
    after: Option<String>,
    /// The page size (1..=1000; default 100).
    limit: Option<usize>,
}

/// A page of runs.
#[derive(Debug, Serialize)]
pub struct RunsPage {
    /// The runs.
    runs: Vec<RunRow>,
    /// The `after` of the next page; `null` on the last.
    next: Option<String>,
    /// The runs in this page's range left out because their records do
    /// not decode, each with the error naming the record.
    unreadable: Vec<UnreadableRow>,
}

/// The rows of the runs a listing left out.
fn unreadable_rows(runs: Vec<UnreadableRun>) -> Vec<UnreadableRow> {
    runs.into_iter()
        .map(|run| UnreadableRow {
            run_id: run.run_id,
            error: run.error,
        })
        .collect()
}

/// A run a listing left out.
#[derive(Debug, Serialize)]
pub struct UnreadableRow {
    /// The run.
    run_id: String,
    /// What was wrong with its record.
    error: String,
}

/// The filter a query asks for, or 400.
fn filter_of(query: RunsQuery) -> Result<RunFilter, ApiError> {
    let state = match query.state.as_deref() {
        None | Some("") => None,
        Some(text) => Some(parse_state(text).map_err(ApiError::bad_request)?),
    };
    for (what, value) in [
        ("workflow name", &query.workflow),
        ("run id", &query.children_of),
        ("run id", &query.after),
    ] {
        if let Some(value) = value {
            check_id(what, value)?;
        }
    }
    let limit = match query.limit {
        None => 0,
        Some(n @ 1..=MAX_PAGE) => n,
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "limit {n} is out of range; use 1 to {MAX_PAGE}"
            )));
        }
    };
    let header = match query.header.as_deref() {
        None | Some("") => None,
        Some(pair) => match pair.split_once('=') {
            Some((name, value)) if !name.is_empty() => Some((name.to_string(), value.to_string())),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "header filter `{}` is not NAME=VALUE",
                    pair.escape_debug()
                )));
            }
        },
    };
    // Past what a `SystemTime` holds (not on 64-bit Unix): the latest.
    let time = |ms: u64| {
        UNIX_EPOCH
            .checked_add(Duration::from_millis(ms))
            .unwrap_or(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX)))
    };
    Ok(RunFilter {
        state,
        workflow: query.workflow,
        children_of: query.children_of,
        submitted_since: query.since_ms.map(time),
        submitted_until: query.until_ms.map(time),
        header,
        after: query.after,
        limit,
    })
}

/// `GET /api/runs`.
pub async fn runs(
    State(app): State<Arc<App>>,
    Query(query): Query<RunsQuery>,
) -> ApiResult<RunsPage> {
    let filter = filter_of(query)?;
    let page = app
        .bounded("listing runs", app.source.runs(&filter))
        .await?;
    Ok(Json(RunsPage {
        runs: page.runs.iter().map(RunRow::from).collect(),
        next: page.next,
        unreadable: unreadable_rows(page.unreadable),
    }))
}

/// One run: where it is or how it ended, and its children.
#[derive(Debug, Serialize)]
pub struct RunJson {
    /// The run.
    run_id: String,
    /// Its workflow.
    workflow: String,
    /// Its status while it lives.
    live: Option<LiveJson>,
    /// Its outcome once it ended.
    outcome: Option<OutcomeJson>,
    /// Its children (the first page of them).
    children: Vec<RunRow>,
    /// Children in that page whose records do not decode.
    children_unreadable: Vec<UnreadableRow>,
    /// Its step history (of its current segment), oldest first.
    history: Option<RunHistory>,
}

/// `GET /api/runs/{id}`.
pub async fn run(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<RunJson> {
    check_id("run id", &id)?;
    let client = app.source.run_client(&id);
    let (status, outcome) = app
        .bounded("reading the run", async {
            let status = client.status(&id).await?;
            // It may have ended between the two reads: read the outcome
            // after the status.
            let outcome = match status {
                Some(_) => None,
                None => client.outcome(&id).await?,
            };
            Ok((status, outcome))
        })
        .await?;
    let workflow = match (&status, &outcome) {
        (Some(status), _) => status.workflow.clone(),
        (None, Some(outcome)) => outcome.workflow.clone(),
        (None, None) => return Err(ApiError::not_found(format!("no run `{id}` is known"))),
    };
    // A run's children live on its shard (they route by their root).
    let children = app
        .bounded(
            "listing the run's children",
            client.runs(&RunFilter {
                children_of: Some(id.clone()),
                ..Default::default()
            }),
        )
        .await?;
    let history = app
        .bounded("reading the run's history", client.history(&id))
        .await?;
    Ok(Json(RunJson {
        history,
        run_id: id,
        workflow,
        live: status.as_ref().map(LiveJson::from),
        outcome: outcome.as_ref().map(OutcomeJson::from),
        children: children.runs.iter().map(RunRow::from).collect(),
        children_unreadable: unreadable_rows(children.unreadable),
    }))
}

/// `POST /api/runs/{id}/cancel`: the worker's answer.
pub async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    check_id("run id", &id)?;
    let client = app.source.run_client(&id);
    let cancelled = app
        .answered("cancelling", client.cancel_and_wait(&id, app.timeout))
        .await?;
    // The worker answers "not cancelled" both for a run that had already
    // ended and for one it does not know: tell them apart, as `waymark
    // cancel` does (the reply is visible, so the reads see the run if the
    // worker did).
    if !cancelled {
        let known = app
            .bounded("reading the run", async {
                if client.outcome(&id).await?.is_some() || client.status(&id).await?.is_some() {
                    return Ok(true);
                }
                // It may have ended between the two reads.
                Ok(client.outcome(&id).await?.is_some())
            })
            .await?;
        if !known {
            return Err(ApiError::not_found(format!(
                "no run `{id}` is known (never submitted, or its outcome passed the retention \
                 window)"
            )));
        }
    }
    Ok(Json(json!({ "run_id": id, "cancelled": cancelled })))
}

/// `GET /api/workflows`: each shard's rows in turn on a fleet (all of
/// them read within one store timeout).
pub async fn workflows(State(app): State<Arc<App>>) -> ApiResult<Vec<WorkflowJson>> {
    let rows = app
        .bounded("reading the workflows", async {
            let mut rows = Vec::new();
            for (shard, client) in app.source.shards() {
                let all = client.workflows().await?;
                rows.extend(all.iter().map(|health| WorkflowJson::new(health, shard)));
            }
            Ok(rows)
        })
        .await?;
    Ok(Json(rows))
}

/// `GET /api/schedules`.
pub async fn schedules(State(app): State<Arc<App>>) -> ApiResult<Vec<ScheduleJson>> {
    let all = app
        .bounded("reading the schedules", app.source.schedules())
        .await?;
    Ok(Json(all.iter().map(ScheduleJson::from).collect()))
}

/// `POST /api/schedules/{id}/trigger`: the run the fire submitted.
pub async fn trigger(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    check_id("schedule id", &id)?;
    let client = app.source.schedule_client(&id);
    let run_id = app
        .answered("triggering", client.trigger_and_wait(&id, app.timeout))
        .await?;
    Ok(Json(json!({ "schedule": id, "run_id": run_id })))
}

/// A heartbeat as JSON (`null` fields when no worker ever beat).
fn beat_json(beat: Option<&WriterHeartbeat>) -> serde_json::Value {
    match beat {
        Some(beat) => json!({
            "last_beat_ms": beat.at_ms,
            "interval_ms": u64::try_from(beat.interval.as_millis()).unwrap_or(u64::MAX),
            "closed": beat.closed,
        }),
        None => json!({ "last_beat_ms": null, "interval_ms": null, "closed": null }),
    }
}

/// `GET /api/worker`: the worker's last heartbeat. On a fleet, the newest
/// of the shards' (`closed` when every shard's last beat was a clean
/// stop), and each shard's under `shards`.
pub async fn worker(State(app): State<Arc<App>>) -> ApiResult<serde_json::Value> {
    let beats = app
        .bounded("reading the workers' heartbeats", async {
            let mut beats = Vec::new();
            for (shard, client) in app.source.shards() {
                beats.push((shard, client.worker_heartbeat().await?));
            }
            Ok(beats)
        })
        .await?;
    if !app.source.is_fleet() {
        return Ok(Json(beat_json(
            beats.first().and_then(|(_, beat)| beat.as_ref()),
        )));
    }
    let newest = beats
        .iter()
        .filter_map(|(_, beat)| beat.as_ref())
        .max_by_key(|beat| beat.at_ms);
    let mut answer = beat_json(newest);
    if newest.is_some() {
        let all_closed = beats
            .iter()
            .all(|(_, beat)| beat.as_ref().is_some_and(|b| b.closed));
        answer["closed"] = all_closed.into();
    }
    answer["shards"] = beats
        .iter()
        .map(|(shard, beat)| {
            let mut one = beat_json(beat.as_ref());
            one["shard"] = (*shard).into();
            one
        })
        .collect();
    Ok(Json(answer))
}

/// `POST /api/workflows/{name}/reset`: whether the breaker was open. On a
/// fleet each shard has its own breaker: the request goes to every shard,
/// and `shards_open` lists those where it was open.
pub async fn reset(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    check_id("workflow name", &name)?;
    // Every request is stored before any answer is awaited, so the shards'
    // workers apply theirs together, within one timeout.
    let sent = app
        .source
        .send_to_every_shard(|client| app.bounded("sending the reset", client.reset(&name)))
        .await
        .map_err(|cut| match cut.partly_sent("reset") {
            Some(partly) => {
                ApiError::new(cut.error.status, format!("{}; {partly}", cut.error.message))
            }
            None => cut.error,
        })?;
    // A timeout past what an `Instant` can hold waits without end.
    let deadline = Instant::now().checked_add(app.timeout);
    let mut shards_open = Vec::new();
    for (shard, client, request_id) in sent {
        let left = deadline.map_or(app.timeout, |d| d.saturating_duration_since(Instant::now()));
        let grace = left.saturating_add(Duration::from_secs(2));
        let Ok(waited) = tokio::time::timeout(grace, client.wait_reply(&request_id, left)).await
        else {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "waiting for the reset: the store did not answer within {grace:?}; the \
                     request is stored (a worker applies it)"
                ),
            ));
        };
        match waited {
            Ok(Reply::Reset { was_open, .. }) => {
                if was_open {
                    shards_open.push(shard);
                }
            }
            Ok(other) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the worker answered the reset with {other:?}"),
                ));
            }
            Err(e @ Error::TimedOut { .. }) if shard.is_some() => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "shard {} did not answer the reset ({e}); the request waits in its inbox",
                        shard.unwrap_or_default()
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let mut answer = json!({ "workflow": name, "was_open": !shards_open.is_empty() });
    if app.source.is_fleet() {
        answer["shards_open"] = shards_open
            .into_iter()
            .flatten()
            .collect::<Vec<u32>>()
            .into();
    }
    Ok(Json(answer))
}

/// The query of `GET /api/dead`.
#[derive(Debug, Deserialize)]
pub struct DeadQuery {
    /// `step` (default) or `hook`.
    kind: Option<String>,
    /// The `next` of the previous page.
    after: Option<String>,
    /// The page size (1..=1000; default 100).
    limit: Option<usize>,
    /// On a fleet, the shard to start at (the `next_shard` of the previous
    /// page; default 0).
    shard: Option<u32>,
}

/// A dead job, with its shard on a fleet.
#[derive(Debug, Serialize)]
pub struct DeadRow {
    /// The job.
    #[serde(flatten)]
    job: DeadJob,
    /// The shard holding it (fleets only).
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<u32>,
}

/// A page of dead jobs.
#[derive(Debug, Serialize)]
pub struct DeadPage {
    /// The jobs.
    jobs: Vec<DeadRow>,
    /// The `after` of the next page; `null` on the last.
    next: Option<String>,
    /// On a fleet, the `shard` of the next page (absent on the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_shard: Option<u32>,
}

/// `GET /api/dead`. On a fleet, dead jobs are listed shard by shard (each
/// shard's in enqueue order): a page starts at `shard` after `after` and
/// runs on into the next shards until it is full.
pub async fn dead(
    State(app): State<Arc<App>>,
    Query(query): Query<DeadQuery>,
) -> ApiResult<DeadPage> {
    let kind = match query.kind.as_deref() {
        None | Some("") | Some("step") => DeadKind::Step,
        Some("hook") => DeadKind::Hook,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown kind `{}`; use step or hook",
                other.escape_debug()
            )));
        }
    };
    if let Some(after) = &query.after {
        check_id("job id", after)?;
    }
    let limit = match query.limit {
        None => 100,
        Some(n @ 1..=MAX_PAGE) => n,
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "limit {n} is out of range; use 1 to {MAX_PAGE}"
            )));
        }
    };
    let shards = app.source.shards();
    let first = match query.shard {
        None => 0,
        Some(_) if !app.source.is_fleet() => {
            return Err(ApiError::bad_request(
                "`shard` is for a fleet; this is a single store",
            ));
        }
        Some(shard) if (shard as usize) < shards.len() => shard as usize,
        Some(shard) => {
            return Err(ApiError::bad_request(format!(
                "shard {shard} is out of range: the fleet has {} shards",
                shards.len()
            )));
        }
    };
    let page = app
        .bounded("listing dead jobs", async {
            let mut page = DeadPage {
                jobs: Vec::new(),
                next: None,
                next_shard: None,
            };
            let mut after = query.after;
            for (shard, client) in shards.into_iter().skip(first) {
                let want = limit - page.jobs.len();
                let cursor = after.take();
                let jobs = client.dead_jobs(kind, cursor.as_deref(), want).await?;
                // A full page may have a next one.
                let full = jobs.len() == want;
                page.jobs
                    .extend(jobs.into_iter().map(|job| DeadRow { job, shard }));
                if full {
                    page.next = page.jobs.last().map(|row| row.job.job_id.clone());
                    page.next_shard = shard;
                    break;
                }
            }
            Ok(page)
        })
        .await?;
    Ok(Json(page))
}

/// `POST /api/dead/{job}/requeue`: what the worker did (on a fleet, the
/// worker of the shard holding the job).
pub async fn requeue(
    State(app): State<Arc<App>>,
    Path(job): Path<String>,
) -> ApiResult<serde_json::Value> {
    check_id("job id", &job)?;
    let client = app
        .bounded("finding the dead job", app.source.dead_job_client(&job))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no shard has a dead job `{job}`")))?;
    let reply = app
        .answered("requeueing", async {
            let request_id = client.requeue(&job).await?;
            client.wait_reply(&request_id, app.timeout).await
        })
        .await?;
    Ok(Json(match reply {
        Reply::Rerun { run_id, rerun } => {
            json!({ "job_id": job, "requeued": "rerun", "run_id": run_id, "rerun": rerun })
        }
        Reply::Requeued { .. } => json!({ "job_id": job, "requeued": "hook" }),
        other => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the worker answered the requeue with {other:?}"),
            ));
        }
    }))
}
