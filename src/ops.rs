//! Ops endpoints, served on `ops.listen` (loopback by default):
//!
//! - `GET /metrics`: Prometheus text format. `ponte_messages_total{sender,type,outcome,code}`,
//!   `ponte_latency_seconds` (receipt to settlement, histogram), `ponte_copies_in_flight
//!   {recipient}` (copies published and not yet confirmed), `ponte_retries_total{recipient}`,
//!   `ponte_dead_letters_total{recipient}`, `ponte_handed_back_total{sender}`,
//!   `ponte_broker_reconnects_total`, `ponte_flow_restarts_total{flow,partner}` (a flow
//!   started again alone: a partner's `inbound` flow, the `redelivery` flow, a `courier`, the
//!   `events` publisher), `ponte_lookups_total{partner,result}`, `ponte_ready`,
//!   `ponte_store_wait_seconds` (how long each use of the store waited, histogram: for its
//!   reading connection, and for a write it reads, made a moment before, to be committed),
//!   `ponte_log_lines_dropped_total` (log lines stderr's reader did not take in time),
//!   `ponte_broker_blocked{connection}` (1 while the broker blocks that connection: a memory or
//!   disk alarm).
//! - `GET /healthz`: 200 while the process runs (liveness).
//! - `GET /readyz`: 200 when connected to the broker with the topology declared and every flow
//!   consuming, the store writable and the configuration loaded; else 503 with the reasons
//!   (readiness).
//! - `/`, `/journey`, `POST /dlq/replay`: the console (see `console`).

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::gateway::Status;
use crate::pipeline::Pipeline;

/// Latency buckets, in seconds: a gateway's work is milliseconds; queues make it seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Store wait buckets, in seconds: nothing most of the time, a commit's length when it
/// coincides, tens of milliseconds when the disk is busy.
const STORE_WAIT_BUCKETS: &[f64] = &[
    0.000_01, 0.000_1, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide metrics recorder (once) and returns its handle.
pub fn metrics() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("ponte_latency_seconds".into()),
                LATENCY_BUCKETS,
            )
            .expect("the buckets are not empty")
            .set_buckets_for_metric(
                Matcher::Full("ponte_store_wait_seconds".into()),
                STORE_WAIT_BUCKETS,
            )
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder (a test harness) may already be installed; the handle still renders.
        let _ = metrics::set_global_recorder(recorder);
        // Histogram samples are kept raw until folded into buckets: fold them every few seconds
        // whether or not anyone scrapes, so memory stays flat.
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("ponte-metrics".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                    crate::telemetry::count_dropped();
                }
            });
        handle
    })
}

#[derive(Clone)]
struct Ops {
    pipeline: Arc<Pipeline>,
    status: Status,
}

/// The ops endpoints' router.
pub fn router(pipeline: Arc<Pipeline>, status: Status) -> Router {
    metrics();
    let console = Router::new()
        .route("/", get(crate::console::home))
        .route("/journey", get(crate::console::journey))
        .route("/dlq/replay", axum::routing::post(crate::console::replay))
        .with_state(pipeline.clone());
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Ops { pipeline, status })
        .merge(console)
}

/// Serves the ops endpoints on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    pipeline: Arc<Pipeline>,
    status: Status,
) -> std::io::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "ops endpoints listening: /metrics /healthz /readyz");
    axum::serve(listener, router(pipeline, status)).await
}

async fn render(State(ops): State<Ops>) -> String {
    metrics::gauge!("ponte_ready").set(if ops.status.is_ready() { 1.0 } else { 0.0 });
    crate::telemetry::count_dropped();
    metrics().render()
}

async fn ready(State(ops): State<Ops>) -> (StatusCode, String) {
    let mut problems = Vec::new();
    if !ops.status.is_ready() {
        problems.push("not connected to the broker with every flow consuming".to_string());
    }
    if let Err(error) = ops.pipeline.store.flush() {
        problems.push(format!("store not writable: {error}"));
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
    }
}
