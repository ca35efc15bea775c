//! The dashboard: one HTML page, its script and its style sheet, embedded
//! in the binary (`include_str!`; no separate frontend build). The script
//! polls the JSON API every second and draws five views, chosen by the
//! URL's fragment: runs (`#/runs`), one run (`#/run/ID`), workflows with
//! their breakers and a reset button (`#/workflows`), schedules with a
//! trigger button (`#/schedules`) and dead letters with requeue
//! (`#/dead`). The bearer token for changes is typed into the page and
//! kept in the browser's local storage.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::App;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// The dashboard's routes: `/`, `/app.js`, `/style.css`.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

fn asset(kind: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
