//! `sluice-operator`: the cluster control plane. Parses flags, serves `/metrics`, `/healthz` and
//! `/readyz`, waits for the CRD, takes part in leader election, and runs the reconciler until
//! SIGTERM, then stops gracefully and releases the Lease.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use clap::{Parser, ValueEnum};
use futures::FutureExt;
use k8s_openapi::api::core::v1::Toleration;
use sluice_api::contract::env;
use sluice_operator::context::{Config, Context};
use sluice_operator::job_builder::WorkerDefaults;
use sluice_operator::lease::LeaseSettings;
use sluice_operator::metrics::Metrics;
use sluice_operator::storage_io::UriOpener;
use sluice_operator::{controller, lease, reports};
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

/// The Sluice operator: runs BatchInferenceJobs as Indexed Jobs and scales them to meet their deadlines.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Take a Lease before reconciling (needed with more than one replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the Lease.
    #[arg(long, default_value = "sluice-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long, env = env::POD_NAMESPACE, default_value = "default")]
    lease_namespace: String,
    /// Only watch this namespace (empty: all namespaces).
    #[arg(long, default_value = "")]
    watch_namespace: String,
    /// Worker image for jobs that do not set spec.workers.image.
    #[arg(long, default_value = concat!("ghcr.io/sluice-dev/sluice-worker:", env!("CARGO_PKG_VERSION")))]
    worker_image: String,
    /// Extended resource requested per worker GPU.
    #[arg(long, default_value = "nvidia.com/gpu")]
    gpu_resource_name: String,
    /// Default node selector of worker pods, as a JSON object.
    #[arg(long)]
    worker_node_selector: Option<String>,
    /// Default tolerations of worker pods, as a JSON list.
    #[arg(long)]
    worker_tolerations: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "json")]
    log_format: LogFormat,
    /// Seconds to wait for the CRD to be established at start-up.
    #[arg(long, default_value_t = 120)]
    crd_wait_secs: u64,
    /// URL at which the pods of jobs whose storage only they can reach (file:// or PVC paths)
    /// reach this operator's HTTP server (the --metrics-addr port), e.g. the chart's Service
    /// http://sluice-operator.sluice-system.svc:8080. Default out of cluster:
    /// http://127.0.0.1:<port>; in cluster: none (such jobs are then refused with a message).
    #[arg(long, env = env::OPERATOR_REPORT_URL)]
    report_url: Option<String>,
    /// This replica's name in Events and the Lease [default: $POD_NAME, else $HOSTNAME].
    #[arg(long, env = env::POD_NAME)]
    pod_name: Option<String>,
    /// The host name (the Lease identity without a pod name).
    #[arg(long, env = env::HOSTNAME, hide = true)]
    hostname: Option<String>,
    /// Set in every pod: the operator runs in a cluster.
    #[arg(long, env = env::KUBERNETES_SERVICE_HOST, hide = true)]
    kubernetes_service_host: Option<String>,
}

#[derive(Clone)]
struct Http {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

async fn metrics_handler(State(s): State<Http>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}

async fn readyz(State(s): State<Http>) -> impl IntoResponse {
    if s.ready.load(Ordering::SeqCst) { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "waiting for the CRD") }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn terminate_signal() {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sluice_api::tls::install_crypto_provider();
    let args = Args::parse();
    init_logging(args.log_format);

    let node_selector: BTreeMap<String, String> = match &args.worker_node_selector {
        Some(s) if !s.trim().is_empty() => serde_json::from_str(s).context("--worker-node-selector must be a JSON object of strings")?,
        _ => BTreeMap::new(),
    };
    let tolerations: Vec<Toleration> = match &args.worker_tolerations {
        Some(s) if !s.trim().is_empty() => serde_json::from_str(s).context("--worker-tolerations must be a JSON list of tolerations")?,
        _ => Vec::new(),
    };
    let listener =
        tokio::net::TcpListener::bind(args.metrics_addr).await.with_context(|| format!("binding --metrics-addr {}", args.metrics_addr))?;
    let bound = listener.local_addr().context("the address --metrics-addr bound")?;
    let in_cluster = args.kubernetes_service_host.as_deref().is_some_and(|h| !h.is_empty());
    let report_url = match args.report_url.clone().filter(|u| !u.trim().is_empty()) {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u),
        Some(u) => anyhow::bail!("--report-url {u:?} must be an http:// or https:// URL"),
        None if !in_cluster && (bound.ip().is_loopback() || bound.ip().is_unspecified()) => {
            Some(format!("http://127.0.0.1:{}", bound.port()))
        }
        None => None,
    };
    match &report_url {
        Some(u) => tracing::info!(url = %u, "pods of jobs with storage only they can reach report to this URL"),
        None => tracing::warn!("no --report-url: jobs whose storage only their pods can reach (file:// or PVC paths) will be refused"),
    }
    let config = Config {
        pod_name: args.pod_name.clone(),
        operator_namespace: args.lease_namespace.clone(),
        worker: WorkerDefaults {
            image: args.worker_image.clone(),
            gpu_resource_name: args.gpu_resource_name.clone(),
            node_selector,
            tolerations,
            report_url,
        },
        ..Config::default()
    };

    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let leader = Arc::new(AtomicBool::new(!args.leader_election));
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        config,
        Arc::new(UriOpener),
        Arc::new(jiff::Timestamp::now),
        leader.clone(),
    ));

    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Http { metrics: metrics.clone(), ready: ready.clone() })
        .merge(reports::router(ctx.reports.clone()));
    tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz and pod reports");
    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let http = tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(http_stop_rx.map(|_| ())).await });

    controller::wait_for_crd(client.clone(), Duration::from_secs(args.crd_wait_secs)).await?;
    ready.store(true, Ordering::SeqCst);
    tracing::info!("BatchInferenceJob CRD established");

    let (ctrl_stop_tx, ctrl_stop_rx) = oneshot::channel::<()>();
    let (lease_stop_tx, lease_stop_rx) = oneshot::channel::<()>();
    let (gained_tx, mut gained_rx) = mpsc::unbounded_channel::<()>();
    metrics.leader.set(i64::from(!args.leader_election));
    let lease_task = if args.leader_election {
        let identity = args.pod_name.clone().or_else(|| args.hostname.clone()).unwrap_or_else(|| "sluice-operator".into());
        let identity = format!("{identity}-{:08x}", rand::random::<u32>());
        let settings = LeaseSettings { name: args.lease_name.clone(), namespace: args.lease_namespace.clone(), identity };
        tracing::info!(lease = %settings.name, namespace = %settings.namespace, identity = %settings.identity, "leader election on");
        Some(tokio::spawn(lease::run(client.clone(), settings, leader.clone(), metrics.clone(), gained_tx, lease_stop_rx.map(|_| ()))))
    } else {
        drop(gained_tx);
        drop(lease_stop_rx);
        None
    };
    let gained = futures::stream::poll_fn(move |cx| gained_rx.poll_recv(cx));

    tokio::spawn(async move {
        terminate_signal().await;
        tracing::info!("SIGTERM: finishing in-flight reconciles and releasing the Lease");
        let _ = ctrl_stop_tx.send(());
    });

    let ns = (!args.watch_namespace.is_empty()).then(|| args.watch_namespace.clone());
    controller::run(ctx, ns, gained, ctrl_stop_rx.map(|_| ())).await;

    let _ = lease_stop_tx.send(());
    if let Some(task) = lease_task {
        match task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the Lease failed"),
            Err(e) => tracing::warn!(error = %e, "lease task panicked"),
            Ok(Ok(())) => tracing::info!("Lease released"),
        }
    }
    let _ = http_stop_tx.send(());
    let _ = http.await;
    Ok(())
}
