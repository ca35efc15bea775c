//! Logs and metrics of the long-running commands (`worker`, `serve`).
//!
//! - Logs go to stderr through `tracing-subscriber`, filtered by `RUST_LOG`
//!   (default `warn`): `RUST_LOG=waymark=debug` shows each step's and
//!   settlement's span (run id, workflow, step, attempt).
//! - Metrics: [`install_prometheus`] installs the Prometheus recorder for
//!   the library's `metrics` calls; its [`PrometheusHandle`] renders the
//!   text format, served at `/metrics` by [`serve_metrics`] (the worker) or
//!   by `serve`'s router.

use std::io::IsTerminal;
use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::plumbing::exit::{CliError, CliResult};

/// Log through `tracing-subscriber` to stderr, filtered by `RUST_LOG`
/// (`warn` when it is unset or does not parse). Called once per process.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    // Fails only when a subscriber is already set: keep that one.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Install the Prometheus recorder for this process's metrics.
pub fn install_prometheus() -> CliResult<PrometheusHandle> {
    PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| CliError::failure(format!("cannot install the metrics recorder: {e}")))
}

/// The route serving the Prometheus text format at `/metrics`.
pub fn metrics_route(handle: PrometheusHandle) -> Router {
    Router::new().route("/metrics", get(move || async move { handle.render() }))
}

/// Bind `addr` and serve `/metrics` until `stop` fires. Returns the bound
/// address (port 0 picks a free one) once it listens.
pub async fn serve_metrics(
    addr: SocketAddr,
    handle: PrometheusHandle,
    stop: CancellationToken,
) -> CliResult<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::failure(format!("cannot listen on {addr} for metrics: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::failure(format!("cannot read the metrics address: {e}")))?;
    let app = metrics_route(handle);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}
