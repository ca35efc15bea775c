//! `waymark serve`: the operator's view of a store over HTTP — a JSON API
//! ([`api`]), a dashboard page ([`page`], its assets embedded in the
//! binary) and Prometheus metrics (`/metrics`).
//!
//! It reads through a [`Client`] (a reader: it never opens the store as its
//! writer, so it never fences a worker) and changes things only through the
//! client's inbox requests, which the worker applies. Mutating endpoints
//! (`POST`) need `Authorization: Bearer TOKEN` with the token given by
//! `--token` or `WAYMARK_TOKEN`; without a token they answer 401. Reads are
//! open on a loopback address, to requests that name a loopback host
//! (`localhost`, `127.0.0.1`, `[::1]`, any port; others answer 421, so a
//! page of another site rebound to 127.0.0.1 cannot read them); on any
//! other address `serve` refuses to start without a token, and reads need
//! it too.

pub mod api;
pub mod json;
pub mod page;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Args;
use metrics_exporter_prometheus::PrometheusHandle;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use waymark::BreakerStatus;

use crate::plumbing::exit::{CliError, CliResult, Exit};
use crate::plumbing::output::say;
use crate::plumbing::signals::{Signals, unless_stopped};
use crate::plumbing::source::Source;
use crate::plumbing::store::{Store, StoreArgs};
use crate::plumbing::telemetry::{init_logging, install_prometheus};
use api::ApiError;

/// `waymark serve`'s arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where the store lives.
    #[command(flatten)]
    pub store: StoreArgs,
    /// The address to listen on (port 0 picks a free port; the address is
    /// printed once it listens).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The bearer token mutating requests must carry (cancel, trigger,
    /// reset, requeue). Without one, they are refused.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "WAYMARK_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

/// What every handler shares.
pub struct App {
    /// The store's client, or on a fleet every shard's.
    pub source: Source,
    /// How long a read or a request's reply may take.
    pub timeout: Duration,
    /// The SHA-256 of the bearer token, if one was given.
    token: Option<[u8; 32]>,
    /// Whether reads need the token too (a non-loopback address).
    guard_reads: bool,
    /// Whether a request must name a loopback host (on a loopback address:
    /// against DNS rebinding).
    loopback_hosts_only: bool,
    /// Renders this process's metrics.
    metrics: PrometheusHandle,
}

impl App {
    /// Whether `request` carries the token.
    fn authorized(&self, request: &Request) -> bool {
        let Some(want) = &self.token else {
            return false;
        };
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compared as digests: the time taken says nothing about the token.
        given.is_some_and(|given| digest(given) == *want)
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Refuse a request that needs the token and lacks it: every `POST`, and
/// every request when reads are guarded.
async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let needs = request.method() != Method::GET || app.guard_reads;
    if needs && !app.authorized(&request) {
        let why = if app.token.is_none() {
            "changes are disabled: start `waymark serve` with --token or WAYMARK_TOKEN"
        } else {
            "missing or wrong bearer token (Authorization: Bearer TOKEN)"
        };
        let mut response = ApiError::new(StatusCode::UNAUTHORIZED, why).into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    next.run(request).await
}

/// Whether `host`, a `Host` header's value (a name or an address, with an
/// optional port), names this machine's loopback: `localhost`, or a
/// loopback address (`127.0.0.1`, `[::1]`).
fn loopback_host(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        // An IPv6 address is in brackets.
        Some(rest) => match rest.split_once(']') {
            Some(split) => split,
            None => return false,
        },
        None => match host.rfind(':') {
            Some(at) => host.split_at(at),
            None => (host, ""),
        },
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.parse::<u16>().is_ok());
    port_ok
        && (name.eq_ignore_ascii_case("localhost")
            || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()))
}

/// On a loopback address, refuse (421) a request for another host: a page
/// of another site whose name was rebound to 127.0.0.1 (DNS rebinding)
/// reaches the server with its own name in `Host`, and must not read it.
/// A request without a `Host` is not a browser's, and is served.
async fn host_guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if !app.loopback_hosts_only {
        return next.run(request).await;
    }
    let header = request.headers().get(header::HOST).map(|v| v.to_str());
    let authority = request.uri().authority().map(|a| a.as_str());
    let refused = match (header, authority) {
        (Some(Err(_)), _) => Some("(not text)".to_string()),
        (Some(Ok(host)), _) if !loopback_host(host) => Some(format!("`{}`", host.escape_debug())),
        (_, Some(host)) if !loopback_host(host) => Some(format!("`{}`", host.escape_debug())),
        _ => None,
    };
    match refused {
        None => next.run(request).await,
        Some(host) => ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this server listens on a loopback address and answers only requests for \
                 localhost, 127.0.0.1 or [::1], not for host {host} (a page of another site may \
                 be trying to reach it through DNS rebinding)"
            ),
        )
        .into_response(),
    }
}

/// `GET /metrics`: this process's metrics and, read at each scrape, every
/// workflow's breaker state and failure streak as gauges (on a fleet one
/// per shard, with a `shard` label: each shard has its own breaker).
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let read = app
        .bounded("reading the workflows", async {
            let mut all = Vec::new();
            for (shard, client) in app.source.shards() {
                all.extend(client.workflows().await?.into_iter().map(|h| (shard, h)));
            }
            Ok(all)
        })
        .await;
    match read {
        Ok(workflows) => {
            for (shard, health) in workflows {
                let tripped = matches!(health.status, BreakerStatus::Tripped { .. });
                let mut labels = vec![("workflow", health.name.clone())];
                if let Some(shard) = shard {
                    labels.push(("shard", shard.to_string()));
                }
                metrics::gauge!("waymark_workflow_tripped", &labels).set(if tripped {
                    1.0
                } else {
                    0.0
                });
                metrics::gauge!("waymark_workflow_failure_streak", &labels)
                    .set(f64::from(health.failure_streak));
            }
        }
        Err(e) => tracing::warn!("metrics: {e:?}"),
    }
    app.metrics.render().into_response()
}

/// The server's routes over `app`.
pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/api/runs", get(api::runs))
        .route("/api/runs/{id}", get(api::run))
        .route("/api/runs/{id}/cancel", post(api::cancel))
        .route("/api/workflows", get(api::workflows))
        .route("/api/workflows/{name}/reset", post(api::reset))
        .route("/api/dead", get(api::dead))
        .route("/api/dead/{job}/requeue", post(api::requeue))
        .route("/api/schedules", get(api::schedules))
        .route("/api/schedules/{id}/trigger", post(api::trigger))
        .route("/api/worker", get(api::worker))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), guard));
    api.merge(page::routes())
        .fallback(|| async { ApiError::not_found("no such page").into_response() })
        .layer(middleware::from_fn_with_state(app.clone(), host_guard))
        .layer(middleware::from_fn(not_framed))
        .layer(middleware::from_fn(count_requests))
        .with_state(app)
}

/// Forbid every page of another site to frame an answer of this server
/// (`X-Frame-Options` for older browsers, CSP `frame-ancestors` for the
/// rest), and to sniff an answer's type. A framed dashboard would take the
/// operator's clicks, with the token the page keeps, for a page that
/// disguised it (clickjacking): cancel a run, reset a breaker, requeue a
/// job, fire a schedule.
async fn not_framed(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Count each request by method and status.
async fn count_requests(request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let response = next.run(request).await;
    metrics::counter!(
        "waymark_http_requests_total",
        "method" => method,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}

/// Serve until Ctrl-C or SIGTERM (a second one quits at once, exit 130).
pub async fn run(args: ServeArgs) -> CliResult<Exit> {
    init_logging();
    let token = args.token.filter(|t| !t.is_empty());
    let loopback = args.listen.ip().is_loopback();
    if !loopback && token.is_none() {
        return Err(CliError::usage(format!(
            "refusing to listen on {} (not a loopback address) without a token: \
             give --token or WAYMARK_TOKEN",
            args.listen
        )));
    }
    let store = Store::locate(&args.store)?;
    let source = store.open_source().await?;
    let shown = match &source {
        Source::Fleet(fleet) => format!(
            "the fleet of {} shards at {}",
            fleet.manifest().shards,
            store.shown()
        ),
        Source::Store(_) => store.shown(),
    };
    let handle = install_prometheus()?;
    let app = Arc::new(App {
        source,
        timeout: store.timeout,
        token: token.as_deref().map(digest),
        guard_reads: !loopback,
        loopback_hosts_only: loopback,
        metrics: handle,
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::failure(format!("cannot listen on {}: {e}", args.listen)))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::failure(format!("cannot read the listening address: {e}")))?;
    say!(
        "serving {shown} at http://{bound}/ (API under /api, metrics at /metrics; changes {})",
        if token.is_some() {
            "need the bearer token"
        } else {
            "disabled: no token"
        }
    );
    let stop = CancellationToken::new();
    let mut signals = Signals::listen()?;
    let server = tokio::spawn(
        axum::serve(listener, router(app.clone()))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    let signal = signals.next().await;
    say!("{signal}: stopping once the requests in flight are answered; again to quit at once.");
    stop.cancel();
    // A request in flight may wait up to its timeout (a reply no worker
    // gives): a second stop request does not wait for it.
    let served = tokio::select! {
        served = server => served,
        again = signals.next() => {
            return Err(CliError::new(
                Exit::Interrupted,
                format!("{again} again: quitting at once; the requests in flight are cut off"),
            ));
        }
    };
    // Closing the reader loses nothing: a stop request now quits at once,
    // as promised.
    let closing = store.close_reader(app.source.close());
    if let Err(again) = unless_stopped(closing, signals.next()).await {
        return Err(CliError::new(
            Exit::Interrupted,
            format!(
                "{again} again: quitting at once before the store's reader was closed (nothing \
                 is lost: it only reads)"
            ),
        ));
    }
    match served {
        Ok(Ok(())) => Ok(Exit::Ok),
        Ok(Err(e)) => Err(CliError::failure(format!("the server failed: {e}"))),
        Err(e) => Err(CliError::failure(format!("the server's task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::loopback_host;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "LocalHost:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.3.4.5:1",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "0.0.0.0:8080",
            "[::]:8080",
            "::1",
            "[::1",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "localhost:80:80",
            "",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }
}
