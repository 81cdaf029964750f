//! `sluice serve`: the OpenAI Batch API (Files and Batches) over axum. Files live in object
//! storage in both modes ([`store`]); a batch is a local-mode job on this machine (`--local`,
//! [`local_batches`]) or a BatchInferenceJob in the tenant's namespace (`--cluster`, [`cluster`]).
//! This module owns the shared state, the routes and start-up.

mod assemble;
mod batches;
pub mod cluster;
pub mod config;
pub mod error;
mod files;
pub mod job;
pub mod local_batches;
pub mod objects;
mod runner;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::routing::{get, post};
use tokio::sync::watch;

use cluster::ClusterBatches;
use config::{Auth, ServerConfig, Tenant};
use error::ApiError;
use local_batches::LocalBatches;
use objects::BatchObject;
use store::FileStore;

/// Where batches run.
#[derive(Debug, Clone)]
pub enum Mode {
    /// On this machine: files, batches and their jobs under `data_dir`; `sluice_program`'s `run`
    /// subcommand executes a batch (this binary).
    Local { data_dir: PathBuf, sluice_program: PathBuf },
    /// As BatchInferenceJobs, through the kubeconfig or in-cluster credentials of the process;
    /// files under the config's `cluster.storageUri`.
    Cluster,
}

/// Options of `sluice serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub config: ServerConfig,
    pub auth: Auth,
    pub mode: Mode,
}

/// Where a server's batches are.
pub enum Backend {
    Local(Arc<LocalBatches>),
    Cluster(Box<ClusterBatches>),
}

impl Backend {
    /// Tenant `tenant`'s batch `id`; another tenant's is not found.
    pub(crate) async fn get(&self, st: &AppState, tenant: &Tenant, id: &str) -> Result<BatchObject, ApiError> {
        if !objects::is_id(id, "batch_") {
            return Err(ApiError::not_found("Batch", id));
        }
        match self {
            Backend::Local(l) => l.get(&tenant.name, id),
            Backend::Cluster(c) => c.get(&st.files, &tenant.name, id).await,
        }
    }

    /// Every batch of the tenant, newest first.
    pub(crate) async fn list(&self, st: &AppState, tenant: &Tenant) -> Result<Vec<BatchObject>, ApiError> {
        let mut all = match self {
            Backend::Local(l) => l.list(&tenant.name),
            Backend::Cluster(c) => c.list(&st.files, &tenant.name).await?,
        };
        all.sort_by(|a, b| b.id.cmp(&a.id));
        Ok(all)
    }

    /// Accept a checked batch and start it.
    pub(crate) async fn create(&self, st: &AppState, tenant: &Tenant, batch: BatchObject) -> Result<BatchObject, ApiError> {
        match self {
            Backend::Local(l) => l.create(&tenant.name, batch),
            Backend::Cluster(c) => c.create(st, &tenant.name, batch).await,
        }
    }

    /// Ask a running batch to stop (the status check is the caller's).
    pub(crate) async fn cancel(&self, tenant: &Tenant, batch: &BatchObject) -> Result<BatchObject, ApiError> {
        match self {
            Backend::Local(l) => l.cancel(&batch.id),
            Backend::Cluster(c) => c.cancel(&tenant.name, batch).await,
        }
    }
}

/// Shared state of the server.
pub struct AppState {
    pub config: ServerConfig,
    pub auth: Auth,
    pub files: FileStore,
    pub backend: Backend,
}

/// The caller's tenant, from `Authorization: Bearer <key>`.
pub(crate) struct Caller(pub Tenant);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        state.auth.tenant(header).map(Caller)
    }
}

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/files", post(files::upload).get(files::list))
        .route("/v1/files/{id}", get(files::get_one).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        // A batch request is a small JSON object; only uploads are unbounded (and streamed).
        .route("/v1/batches", post(batches::create).layer(DefaultBodyLimit::max(1 << 20)).get(batches::list))
        .route("/v1/batches/{id}", get(batches::get_one))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|method: axum::http::Method, uri: axum::http::Uri| async move { ApiError::no_route(method.as_str(), uri.path()) })
        // Uploads are streamed to disk and capped per tenant, not by a body limit.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Run the server until Ctrl-C or SIGTERM. Local batches left unfinished resume at the next
/// start; cluster batches run on without the server.
pub async fn serve(opts: ServeOptions) -> Result<(), String> {
    let (stop_tx, stop_rx) = watch::channel(false);
    if matches!(opts.auth, Auth::Open) {
        tracing::warn!("no --keys file: any bearer key is accepted and every caller is the one tenant \"default\"");
        eprintln!("sluice serve: WARNING: no --keys file configured: accepting any bearer key (one tenant, \"default\")");
    }
    let (files, backend, place) = match &opts.mode {
        Mode::Local { data_dir, sluice_program } => {
            let files = FileStore::new(local_batches::file_root(data_dir)?);
            let local = Arc::new(LocalBatches::open(data_dir, &opts.config, sluice_program, files.clone(), stop_rx)?);
            (files, Backend::Local(local), format!("data dir {}", data_dir.display()))
        }
        Mode::Cluster => {
            let client = kube::Client::try_default().await.map_err(|e| format!("cannot reach the Kubernetes API server: {e}"))?;
            let batches = ClusterBatches::new(client, &opts.config)?;
            let files = FileStore::new(batches.storage_root()?);
            let place = format!("cluster, storage {}", batches.storage_uri());
            (files, Backend::Cluster(Box::new(batches)), place)
        }
    };
    let state = Arc::new(AppState { config: opts.config.clone(), auth: opts.auth.clone(), files, backend });
    let listener = tokio::net::TcpListener::bind(opts.listen).await.map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    let addr = listener.local_addr().map_err(|e| format!("cannot read the listening address: {e}"))?;
    if let Backend::Local(l) = &state.backend {
        l.resume_unfinished();
    }
    println!("sluice serve: listening on http://{addr} ({place}, models: {})", state.config.model_names());
    let app = router(state.clone());
    let shutdown = async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(|e| format!("server error: {e}"))?;
    let _ = stop_tx.send(true);
    if let Backend::Local(l) = &state.backend {
        eprintln!("sluice serve: stopping; running batches keep their committed work and resume at the next start");
        for _ in 0..600 {
            if l.running() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
