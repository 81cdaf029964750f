//! `sluice serve --local`'s batches: a JSON record each under `<data-dir>/batches/` (so they
//! survive a restart), one runner task per unfinished batch driving its local-mode job, and the
//! cancel signal to it. Files are the shared [`FileStore`] on `<data-dir>/tenants/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use sluice_api::storage::{Location, StorageOptions};
use tokio::sync::{Notify, watch};

use super::config::ServerConfig;
use super::error::ApiError;
use super::objects::{BatchObject, BatchRecord, BatchStatus, now};
use super::store::FileStore;

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| format!("cannot serialise {}: {e}", path.display()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
}

/// The file store's root of a local server.
pub fn file_root(data_dir: &Path) -> Result<Location, String> {
    let dir = data_dir.join("tenants");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    sluice_api::storage::resolve(&format!("file://{}", dir.display()), &StorageOptions::default()).map_err(|e| e.to_string())
}

/// The batches of a local server.
pub struct LocalBatches {
    dir: PathBuf,
    pub(crate) config: ServerConfig,
    pub(crate) sluice_program: PathBuf,
    pub(crate) files: FileStore,
    records: Mutex<HashMap<String, BatchRecord>>,
    /// Wakes a batch's runner to cancel it.
    cancels: Mutex<HashMap<String, Arc<Notify>>>,
    /// `true` once the server is stopping: runners stop their jobs (kept resumable) and return.
    pub(crate) shutdown: watch::Receiver<bool>,
    running: AtomicUsize,
}

impl LocalBatches {
    /// Open (or create) `<data_dir>/batches` and load its records.
    pub fn open(
        data_dir: &Path,
        config: &ServerConfig,
        sluice_program: &Path,
        files: FileStore,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, String> {
        let dir = data_dir.join("batches");
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut records = HashMap::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let rec: BatchRecord =
                serde_json::from_slice(&text).map_err(|e| format!("{}: not a batch record of this server: {e}", path.display()))?;
            records.insert(rec.batch.id.clone(), rec);
        }
        Ok(Self {
            dir,
            config: config.clone(),
            sluice_program: sluice_program.to_path_buf(),
            files,
            records: Mutex::new(records),
            cancels: Mutex::new(HashMap::new()),
            shutdown,
            running: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, BatchRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The working directory of a batch's local job (manifest, output prefix, logs).
    pub(crate) fn batch_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    pub(crate) fn record(&self, id: &str) -> Option<BatchRecord> {
        self.lock().get(id).cloned()
    }

    fn save(&self, records: &mut HashMap<String, BatchRecord>, rec: BatchRecord) -> Result<(), ApiError> {
        write_json_atomic(&self.dir.join(format!("{}.json", rec.batch.id)), &rec).map_err(ApiError::internal)?;
        records.insert(rec.batch.id.clone(), rec);
        Ok(())
    }

    /// Change a batch under the lock and store it; returns the stored record.
    pub(crate) fn update(&self, id: &str, f: impl FnOnce(&mut BatchRecord)) -> Result<BatchRecord, ApiError> {
        let mut records = self.lock();
        let mut rec = records.get(id).cloned().ok_or_else(|| ApiError::internal(format!("batch {id} vanished")))?;
        f(&mut rec);
        self.save(&mut records, rec.clone())?;
        Ok(rec)
    }

    pub(crate) fn get(&self, tenant: &str, id: &str) -> Result<BatchObject, ApiError> {
        self.lock().get(id).filter(|b| b.tenant == tenant).map(|b| b.batch.clone()).ok_or_else(|| ApiError::not_found("Batch", id))
    }

    pub(crate) fn list(&self, tenant: &str) -> Vec<BatchObject> {
        self.lock().values().filter(|b| b.tenant == tenant).map(|b| b.batch.clone()).collect()
    }

    /// Store a new batch and start its runner (unless it failed validation).
    pub(crate) fn create(self: &Arc<Self>, tenant: &str, batch: BatchObject) -> Result<BatchObject, ApiError> {
        let failed = batch.status == BatchStatus::Failed;
        {
            let mut records = self.lock();
            let rec = BatchRecord { tenant: tenant.to_string(), outcome: None, batch: batch.clone() };
            self.save(&mut records, rec)?;
        }
        if !failed {
            self.start_runner(batch.id.clone());
        }
        Ok(batch)
    }

    pub(crate) fn cancel(&self, id: &str) -> Result<BatchObject, ApiError> {
        let rec = self.update(id, |b| {
            b.batch.status = BatchStatus::Cancelling;
            b.batch.cancelling_at = Some(now());
        })?;
        self.cancel_handle(id).notify_one();
        Ok(rec.batch)
    }

    pub(crate) fn cancel_handle(&self, id: &str) -> Arc<Notify> {
        let mut c = self.cancels.lock().unwrap_or_else(|e| e.into_inner());
        c.entry(id.to_string()).or_default().clone()
    }

    /// Run a batch's job in a task.
    fn start_runner(self: &Arc<Self>, id: String) {
        let this = self.clone();
        this.running.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            super::runner::drive(this.clone(), id.clone()).await;
            this.cancels.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            this.running.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Resume the batches an earlier run left unfinished (local mode resumes from committed chunks).
    pub fn resume_unfinished(self: &Arc<Self>) {
        let unfinished: Vec<String> = self.lock().values().filter(|b| b.batch.status.in_flight()).map(|b| b.batch.id.clone()).collect();
        for id in unfinished {
            tracing::info!(batch = %id, "resuming an unfinished batch");
            self.start_runner(id);
        }
    }

    /// Runners still going.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}
