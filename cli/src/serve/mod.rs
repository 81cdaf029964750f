//! `sluice serve --local`: the OpenAI Batch API (Files and Batches) over axum, running each
//! batch as a local-mode job (`sluice run`) on this machine. Files and batches are JSON records
//! and plain files under `--data-dir`, so they survive a restart; this module owns that state.

mod assemble;
mod batches;
pub mod config;
pub mod error;
mod files;
pub mod objects;
mod runner;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};

use config::{Auth, ServerConfig, Tenant};
use error::ApiError;
use objects::{BatchRecord, FileRecord};

/// Options of `sluice serve --local`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub config: ServerConfig,
    pub auth: Auth,
    /// The `sluice` program whose `run` subcommand executes a batch (this binary).
    pub sluice_program: PathBuf,
}

/// Shared state of the server.
pub struct AppState {
    pub(crate) dir: PathBuf,
    pub(crate) config: ServerConfig,
    pub(crate) auth: Auth,
    pub(crate) sluice_program: PathBuf,
    inner: Mutex<Inner>,
    /// Wakes a batch's runner to cancel it.
    cancels: Mutex<HashMap<String, Arc<Notify>>>,
    /// `true` once the server is stopping: runners stop their jobs (kept resumable) and return.
    pub(crate) shutdown: watch::Receiver<bool>,
    running: AtomicUsize,
}

#[derive(Default)]
pub(crate) struct Inner {
    pub files: HashMap<String, FileRecord>,
    pub batches: HashMap<String, BatchRecord>,
    pub seq: u64,
}

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| format!("cannot serialise {}: {e}", path.display()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
}

fn load_records<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        out.push(serde_json::from_slice(&text).map_err(|e| format!("{}: not a record of this server: {e}", path.display()))?);
    }
    Ok(out)
}

impl AppState {
    /// Open (or create) the data directory and load its records.
    pub fn open(opts: &ServeOptions, shutdown: watch::Receiver<bool>) -> Result<Self, String> {
        let dir = opts.data_dir.clone();
        for sub in ["files", "batches", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("cannot create {}: {e}", dir.join(sub).display()))?;
        }
        let mut inner = Inner::default();
        for f in load_records::<FileRecord>(&dir.join("files"))? {
            inner.seq = inner.seq.max(f.seq);
            inner.files.insert(f.file.id.clone(), f);
        }
        for b in load_records::<BatchRecord>(&dir.join("batches"))? {
            inner.seq = inner.seq.max(b.seq);
            inner.batches.insert(b.batch.id.clone(), b);
        }
        Ok(Self {
            dir,
            config: opts.config.clone(),
            auth: opts.auth.clone(),
            sluice_program: opts.sluice_program.clone(),
            inner: Mutex::new(inner),
            cancels: Mutex::new(HashMap::new()),
            shutdown,
            running: AtomicUsize::new(0),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn file_data(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(format!("{id}.jsonl"))
    }
    pub(crate) fn tmp_path(&self, name: &str) -> PathBuf {
        self.dir.join("tmp").join(name)
    }
    /// The working directory of a batch's local job (manifest, output prefix, logs).
    pub(crate) fn batch_dir(&self, id: &str) -> PathBuf {
        self.dir.join("batches").join(id)
    }

    /// Store a file record (the caller holds the lock).
    pub(crate) fn save_file(&self, inner: &mut Inner, rec: FileRecord) -> Result<(), ApiError> {
        write_json_atomic(&self.dir.join("files").join(format!("{}.json", rec.file.id)), &rec).map_err(ApiError::internal)?;
        inner.files.insert(rec.file.id.clone(), rec);
        Ok(())
    }

    /// Store a batch record (the caller holds the lock).
    pub(crate) fn save_batch(&self, inner: &mut Inner, rec: BatchRecord) -> Result<(), ApiError> {
        write_json_atomic(&self.dir.join("batches").join(format!("{}.json", rec.batch.id)), &rec).map_err(ApiError::internal)?;
        inner.batches.insert(rec.batch.id.clone(), rec);
        Ok(())
    }

    /// Change a batch under the lock and store it; returns the stored record.
    pub(crate) fn update_batch(&self, id: &str, f: impl FnOnce(&mut BatchRecord)) -> Result<BatchRecord, ApiError> {
        let mut inner = self.lock();
        let mut rec = inner.batches.get(id).cloned().ok_or_else(|| ApiError::internal(format!("batch {id} vanished")))?;
        f(&mut rec);
        self.save_batch(&mut inner, rec.clone())?;
        Ok(rec)
    }

    pub(crate) fn cancel_handle(&self, id: &str) -> Arc<Notify> {
        let mut c = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        c.entry(id.to_string()).or_default().clone()
    }

    /// Run a batch's job in a task.
    pub(crate) fn start_runner(self: &Arc<Self>, id: String) {
        let state = self.clone();
        state.running.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            runner::drive(state.clone(), id.clone()).await;
            state.cancels.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            state.running.fetch_sub(1, Ordering::SeqCst);
        });
    }
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

/// Run the server until Ctrl-C or SIGTERM. Batches left unfinished resume at the next start.
pub async fn serve(opts: ServeOptions) -> Result<(), String> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = Arc::new(AppState::open(&opts, stop_rx)?);
    if matches!(state.auth, Auth::Open) {
        tracing::warn!("no --keys file: any bearer key is accepted and every caller is the one tenant \"default\"");
        eprintln!("sluice serve: WARNING: no --keys file configured: accepting any bearer key (one tenant, \"default\")");
    }
    let listener = tokio::net::TcpListener::bind(opts.listen).await.map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    let addr = listener.local_addr().map_err(|e| format!("cannot read the listening address: {e}"))?;
    // Unfinished batches of an earlier run resume (local mode resumes from committed chunks).
    let unfinished: Vec<String> =
        state.lock().batches.values().filter(|b| b.batch.status.in_flight()).map(|b| b.batch.id.clone()).collect();
    for id in unfinished {
        tracing::info!(batch = %id, "resuming an unfinished batch");
        state.start_runner(id);
    }
    println!("sluice serve: listening on http://{addr} (data dir {}, models: {})", opts.data_dir.display(), state.config.model_names());
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
    eprintln!("sluice serve: stopping; running batches keep their committed work and resume at the next start");
    let _ = stop_tx.send(true);
    for _ in 0..600 {
        if state.running.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
