//! The worker's Prometheus metrics (names exactly as in `docs/metrics.md`) and the axum server
//! for `/metrics` and `/healthz`. Labels are bounded enums; never a custom_id or prompt.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::EngineStats;

/// Outcome label of `sluice_worker_requests_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    succeeded,
    failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

/// The worker's metrics.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    batch_occupancy: Gauge,
    kv_blocks_used: Gauge,
    kv_blocks_total: Gauge,
    time_per_output_token: Histogram,
    chunks_committed: Counter,
    prefix_cache_hit_tokens: Counter,
    /// The engine's cumulative hit count at the last `engine_stats` (the counter moves by the
    /// difference).
    prefix_hits_seen: std::sync::atomic::AtomicU64,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice_worker");
        let requests = Family::<OutcomeLabels, Counter>::default();
        let prompt_tokens = Counter::default();
        let completion_tokens = Counter::default();
        let batch_occupancy = Gauge::default();
        let kv_blocks_used = Gauge::default();
        let kv_blocks_total = Gauge::default();
        let time_per_output_token = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let chunks_committed = Counter::default();
        let prefix_cache_hit_tokens = Counter::default();
        registry.register("requests", "Requests finished", requests.clone());
        registry.register("prompt_tokens", "Prompt tokens processed", prompt_tokens.clone());
        registry.register("completion_tokens", "Tokens generated", completion_tokens.clone());
        registry.register("batch_occupancy", "Sequences in the running batch", batch_occupancy.clone());
        registry.register("kv_blocks_used", "KV cache blocks in use", kv_blocks_used.clone());
        registry.register("kv_blocks_total", "KV cache blocks available", kv_blocks_total.clone());
        registry.register("time_per_output_token_seconds", "Decode step time per generated token", time_per_output_token.clone());
        registry.register("chunks_committed", "Output chunks committed", chunks_committed.clone());
        registry.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens whose KV came from the prefix cache instead of being computed",
            prefix_cache_hit_tokens.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            completion_tokens,
            batch_occupancy,
            kv_blocks_used,
            kv_blocks_total,
            time_per_output_token,
            chunks_committed,
            prefix_cache_hit_tokens,
            prefix_hits_seen: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A request finished; `tpot` is its decode time per output token, when it has one.
    pub fn request_done(&self, outcome: Outcome, prompt_tokens: u64, completion_tokens: u64, tpot: Option<f64>) {
        self.requests.get_or_create(&OutcomeLabels { outcome }).inc();
        self.prompt_tokens.inc_by(prompt_tokens);
        self.completion_tokens.inc_by(completion_tokens);
        if let Some(t) = tpot {
            self.time_per_output_token.observe(t);
        }
    }

    /// A chunk was committed.
    pub fn chunk_committed(&self) {
        self.chunks_committed.inc();
    }

    /// Copy the engine's load gauges.
    pub fn engine_stats(&self, s: &EngineStats) {
        self.batch_occupancy.set(s.running as i64);
        self.kv_blocks_used.set(s.kv_blocks_used as i64);
        self.kv_blocks_total.set(s.kv_blocks_total as i64);
        let seen = self.prefix_hits_seen.swap(s.prefix_cache_hit_tokens, std::sync::atomic::Ordering::Relaxed);
        self.prefix_cache_hit_tokens.inc_by(s.prefix_cache_hit_tokens.saturating_sub(seen));
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

async fn metrics_handler(State(m): State<Arc<WorkerMetrics>>) -> impl IntoResponse {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], m.encode())
}

/// The `/metrics` + `/healthz` router.
pub fn router(metrics: Arc<WorkerMetrics>) -> Router {
    Router::new().route("/metrics", get(metrics_handler)).route("/healthz", get(|| async { "ok" })).with_state(metrics)
}

/// Bind `addr` and serve in the background; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Arc<WorkerMetrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(metrics)).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker rows of docs/metrics.md.
    fn documented_names() -> Vec<String> {
        let doc = include_str!("../../docs/metrics.md");
        let worker = doc.split("## Worker").nth(1).unwrap_or_default();
        worker.lines().filter_map(|l| l.strip_prefix("| `")).filter_map(|l| l.split('`').next()).map(str::to_string).collect()
    }

    #[test]
    fn names_match_the_metrics_contract() {
        let m = WorkerMetrics::new();
        m.request_done(Outcome::succeeded, 3, 2, Some(0.01));
        m.request_done(Outcome::failed, 0, 0, None);
        m.chunk_committed();
        m.engine_stats(&EngineStats {
            running: 2,
            kv_blocks_used: 5,
            kv_blocks_total: 9,
            prefix_cache_hit_tokens: 30,
            ..Default::default()
        });
        m.engine_stats(&EngineStats { prefix_cache_hit_tokens: 42, ..Default::default() });
        let text = m.encode();
        let documented = documented_names();
        assert_eq!(documented.len(), 9, "{documented:?}");
        for name in &documented {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))
                    || l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name}_bucket"))),
                "{name} missing in:\n{text}"
            );
        }
        let exported: std::collections::BTreeSet<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
        for name in exported {
            assert!(documented.iter().any(|d| d == name || d.strip_suffix("_total") == Some(name)), "{name} is not documented");
        }
        assert!(text.contains("sluice_worker_requests_total{outcome=\"succeeded\"} 1"), "{text}");
        assert!(text.contains("sluice_worker_kv_blocks_used 0"));
        assert!(text.contains("sluice_worker_prefix_cache_hit_tokens_total 42"), "the counter follows the engine's total: {text}");
    }

    #[tokio::test]
    async fn serves_metrics_and_healthz() {
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(WorkerMetrics::new())).await.unwrap();
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        let m = get("/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200") && m.contains("sluice_worker_chunks_committed_total"), "{m}");
    }
}
