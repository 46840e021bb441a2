//! The operations endpoints every long-running process serves:
//! `/metrics` (Prometheus text format), `/healthz` (the process is alive)
//! and `/readyz` (it can do its work: false while the broker is unreachable).
//!
//! `/metrics` serves the process's own registry and, beside it, what every
//! process has: Prometheus' standard `process_*` metrics (CPU seconds,
//! resident memory, open and maximum file descriptors, threads, start time;
//! Linux only, read from /proc at each scrape) and `flotilla_build_info`.

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};
use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};
use tokio::net::TcpListener;

/// Whether the process can do its work now.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The version every Flotilla binary of this build reports.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The source revision, when the build was given one
/// (`FLOTILLA_REVISION=$(git rev-parse --short HEAD) cargo build`, or the
/// Dockerfile's build argument of that name).
const REVISION: &str = match option_env!("FLOTILLA_REVISION") {
    Some(revision) => revision,
    None => "unknown",
};

#[derive(Clone)]
struct Ops {
    registry: Registry,
    /// Process metrics and build info, kept apart so that no caller's
    /// registry can already hold them.
    standard: Registry,
    readiness: Arc<Readiness>,
}

/// A registry with the metrics every process serves besides its own.
fn standard_registry() -> prometheus::Result<Registry> {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let build_info = IntGaugeVec::new(
        Opts::new(
            "flotilla_build_info",
            "Always 1; its labels say which build of Flotilla this process runs.",
        ),
        &["version", "revision"],
    )?;
    build_info.with_label_values(&[VERSION, REVISION]).set(1);
    registry.register(Box::new(build_info))?;
    Ok(registry)
}

/// Serves the endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let standard = standard_registry().map_err(std::io::Error::other)?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Ops {
            registry,
            standard,
            readiness,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    let mut body = Vec::new();
    let mut families = ops.registry.gather();
    families.extend(ops.standard.gather());
    match TextEncoder::new().encode(&families, &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            body,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.readiness.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no broker connection\n",
        )
    }
}
