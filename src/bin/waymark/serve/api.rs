//! The JSON API under `/api`: reads through the [`Client`]'s reader,
//! changes through its inbox requests (each answered once the worker's
//! reply is visible, within the store timeout).
//!
//! | method and path | answer |
//! |-----------------|--------|
//! | `GET /api/runs?state=&workflow=&children_of=&since_ms=&until_ms=&header=NAME=VALUE&after=&limit=` | `{runs: [...], next}`: a page in run id order; `next` is the `after` of the next page |
//! | `GET /api/runs/{id}` | `{run_id, workflow, live, outcome, children, history}`; 404 for an unknown run |
//! | `POST /api/runs/{id}/cancel` | `{cancelled}` (the worker's answer) |
//! | `GET /api/workflows` | every workflow's health and breaker |
//! | `POST /api/workflows/{name}/reset` | `{workflow, was_open}`: the breaker closed, its parked steps released |
//! | `GET /api/dead?kind=step\|hook&after=&limit=` | `{jobs: [...], next}`: dead-lettered step jobs (default) or hook notifications, with reasons |
//! | `POST /api/dead/{job}/requeue` | `{job_id, requeued}`: a hook is delivered again (`hook`), a step job's run re-runs from that step (`rerun`, with `run_id` and `rerun`) |
//! | `GET /api/schedules` | every schedule's state |
//! | `POST /api/schedules/{id}/trigger` | `{run_id}` of the run the fire submitted |
//! | `GET /api/worker` | the worker's last heartbeat |
//!
//! Errors are `{error}` with a status: 400 for a malformed id or filter,
//! 401 for a missing or wrong bearer token, 404 for an unknown run,
//! schedule or dead job, 409 for a refusal of the worker (a tripped workflow, an
//! overlapping fire), 504 when the store or the worker did not answer in
//! time, 500 otherwise.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use waymark::{DeadJob, DeadKind, Error, Reply, RunFilter, RunHistory, validate_name};

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
            Error::TimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
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
    let time = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
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
        .bounded("listing runs", app.client.runs(&filter))
        .await?;
    Ok(Json(RunsPage {
        runs: page.runs.iter().map(RunRow::from).collect(),
        next: page.next,
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
    /// Its step history (of its current segment), oldest first.
    history: Option<RunHistory>,
}

/// `GET /api/runs/{id}`.
pub async fn run(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<RunJson> {
    check_id("run id", &id)?;
    let (status, outcome) = app
        .bounded("reading the run", async {
            let status = app.client.status(&id).await?;
            // It may have ended between the two reads: read the outcome
            // after the status.
            let outcome = match status {
                Some(_) => None,
                None => app.client.outcome(&id).await?,
            };
            Ok((status, outcome))
        })
        .await?;
    let workflow = match (&status, &outcome) {
        (Some(status), _) => status.workflow.clone(),
        (None, Some(outcome)) => outcome.workflow.clone(),
        (None, None) => return Err(ApiError::not_found(format!("no run `{id}` is known"))),
    };
    let children = app
        .bounded(
            "listing the run's children",
            app.client.runs(&RunFilter {
                children_of: Some(id.clone()),
                ..Default::default()
            }),
        )
        .await?;
    let history = app
        .bounded("reading the run's history", app.client.history(&id))
        .await?;
    Ok(Json(RunJson {
        history,
        run_id: id,
        workflow,
        live: status.as_ref().map(LiveJson::from),
        outcome: outcome.as_ref().map(OutcomeJson::from),
        children: children.runs.iter().map(RunRow::from).collect(),
    }))
}

/// `POST /api/runs/{id}/cancel`: the worker's answer.
pub async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    check_id("run id", &id)?;
    let cancelled = app.client.cancel_and_wait(&id, app.timeout).await?;
    Ok(Json(json!({ "run_id": id, "cancelled": cancelled })))
}

/// `GET /api/workflows`.
pub async fn workflows(State(app): State<Arc<App>>) -> ApiResult<Vec<WorkflowJson>> {
    let all = app
        .bounded("reading the workflows", app.client.workflows())
        .await?;
    Ok(Json(all.iter().map(WorkflowJson::from).collect()))
}

/// `GET /api/schedules`.
pub async fn schedules(State(app): State<Arc<App>>) -> ApiResult<Vec<ScheduleJson>> {
    let all = app
        .bounded("reading the schedules", app.client.schedules())
        .await?;
    Ok(Json(all.iter().map(ScheduleJson::from).collect()))
}

/// `POST /api/schedules/{id}/trigger`: the run the fire submitted.
pub async fn trigger(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    check_id("schedule id", &id)?;
    let run_id = app.client.trigger_and_wait(&id, app.timeout).await?;
    Ok(Json(json!({ "schedule": id, "run_id": run_id })))
}

/// `GET /api/worker`: the worker's last heartbeat (`null` fields when no
/// worker ever beat).
pub async fn worker(State(app): State<Arc<App>>) -> ApiResult<serde_json::Value> {
    let beat = app
        .bounded(
            "reading the worker's heartbeat",
            app.client.worker_heartbeat(),
        )
        .await?;
    Ok(Json(match beat {
        Some(beat) => json!({
            "last_beat_ms": beat.at_ms,
            "interval_ms": u64::try_from(beat.interval.as_millis()).unwrap_or(u64::MAX),
            "closed": beat.closed,
        }),
        None => json!({ "last_beat_ms": null, "interval_ms": null, "closed": null }),
    }))
}

/// `POST /api/workflows/{name}/reset`: whether the breaker was open.
pub async fn reset(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    check_id("workflow name", &name)?;
    let was_open = app.client.reset_and_wait(&name, app.timeout).await?;
    Ok(Json(json!({ "workflow": name, "was_open": was_open })))
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
}

/// A page of dead jobs.
#[derive(Debug, Serialize)]
pub struct DeadPage {
    /// The jobs.
    jobs: Vec<DeadJob>,
    /// The `after` of the next page; `null` on the last.
    next: Option<String>,
}

/// `GET /api/dead`.
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
    let jobs = app
        .bounded(
            "listing dead jobs",
            app.client.dead_jobs(kind, query.after.as_deref(), limit),
        )
        .await?;
    // A full page may have a next one.
    let next = (jobs.len() == limit)
        .then(|| jobs.last().map(|j| j.job_id.clone()))
        .flatten();
    Ok(Json(DeadPage { jobs, next }))
}

/// `POST /api/dead/{job}/requeue`: what the worker did.
pub async fn requeue(
    State(app): State<Arc<App>>,
    Path(job): Path<String>,
) -> ApiResult<serde_json::Value> {
    check_id("job id", &job)?;
    let request_id = app.client.requeue(&job).await?;
    Ok(Json(
        match app.client.wait_reply(&request_id, app.timeout).await? {
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
        },
    ))
}
