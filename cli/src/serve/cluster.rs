//! `sluice serve --cluster`'s batches: each one a BatchInferenceJob in its tenant's namespace
//! (the tenant name is the namespace), reading its input from and writing its output to the
//! tenant's storage prefix. The batch object is the job's: its creation fields in an annotation,
//! its status from the job's status, cancel as `spec.cancel`. When the job ends, the batch's
//! output and error files are recorded as the job's committed `results/` and `errors/` files.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_api::contract::layout;
use sluice_api::job::{JobPhase, WorkersSpec, condition_types};
use sluice_api::output::OutputManifest;
use sluice_api::storage::{Location, StorageError};
use sluice_api::{BatchInferenceJob, BatchInferenceJobSpec};
use sluice_operator::storage_io::{StorageRefs, storage_options};

use super::AppState;
use super::config::{ClusterConfig, ServerConfig};
use super::error::ApiError;
use super::job::{JobPlacement, job_name, job_spec};
use super::objects::{BatchError, BatchErrors, BatchObject, BatchStatus, BatchUsage, FileObject, FileRecord, now};
use super::store::{FileStore, storage};

/// Label on every job the API created; lists select on it.
pub const BATCH_LABEL: &str = "sluice.dev/batch-api";
/// Annotation: the batch object as created (JSON).
pub const BATCH_ANNOTATION: &str = "sluice.dev/batch";
/// Annotation: when cancel was asked (Unix seconds).
pub const CANCELLING_AT_ANNOTATION: &str = "sluice.dev/batch-cancelling-at";
/// Annotation: the batch's output files, once recorded ([`Finalized`] as JSON).
pub const FILES_ANNOTATION: &str = "sluice.dev/batch-files";
/// Field manager of the server's writes.
const MANAGER: &str = "sluice-serve";

/// What finalizing a batch recorded on its job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Finalized {
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub finalizing_at: i64,
    pub completed: u64,
    pub failed: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

fn kube_err(action: &str, e: kube::Error) -> ApiError {
    ApiError::internal(format!("Kubernetes API: cannot {action}: {e}"))
}

/// The batches of a cluster server.
pub struct ClusterBatches {
    client: kube::Client,
    config: ClusterConfig,
}

impl ClusterBatches {
    /// Needs the config's `cluster:` section.
    pub fn new(client: kube::Client, server: &ServerConfig) -> Result<Self, String> {
        let config = server.cluster.clone().ok_or("--cluster needs a `cluster:` section in --config (storageUri, storage, workers)")?;
        Ok(Self { client, config })
    }

    pub fn storage_uri(&self) -> &str {
        &self.config.storage_uri
    }

    /// The store under `cluster.storageUri`, reached with `cluster.storage`'s settings and the
    /// server's own credentials.
    pub fn storage_root(&self) -> Result<Location, String> {
        let opts = storage_options(self.config.storage.as_ref(), &StorageRefs::default());
        sluice_api::storage::resolve(&self.config.storage_uri, &opts).map_err(|e| format!("cluster.storageUri: {e}"))
    }

    fn api(&self, namespace: &str) -> Api<BatchInferenceJob> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The job of batch `b` of tenant `namespace`.
    fn job(&self, server: &ServerConfig, files: &FileStore, namespace: &str, b: &BatchObject) -> Result<BatchInferenceJob, ApiError> {
        let model = server.models.get(&b.model).ok_or_else(|| ApiError::internal(format!("model {:?} vanished", b.model)))?;
        let input = files.data(namespace, &b.input_file_id);
        let output = output_prefix(files, namespace, &b.id);
        let mut workers = self.config.workers.clone().unwrap_or(WorkersSpec { max: 4, ..WorkersSpec::default() });
        workers.min = workers.min.max(1);
        let workers = serde_json::to_value(&workers).map_err(|e| ApiError::internal(format!("cannot serialise cluster.workers: {e}")))?;
        let storage = match &self.config.storage {
            Some(s) => Some(serde_json::to_value(s).map_err(|e| ApiError::internal(format!("cannot serialise cluster.storage: {e}")))?),
            None => None,
        };
        let spec =
            job_spec(model, b, JobPlacement { input_uri: &input.uri, output_uri: &output.uri, workers, storage, expire_at_deadline: true });
        let spec: BatchInferenceJobSpec =
            serde_json::from_value(spec).map_err(|e| ApiError::internal(format!("the batch's job spec is not valid: {e}")))?;
        let created = serde_json::to_string(b).map_err(|e| ApiError::internal(format!("cannot serialise the batch: {e}")))?;
        let mut job = BatchInferenceJob::new(&job_name(&b.id), spec);
        job.metadata = ObjectMeta {
            name: Some(job_name(&b.id)),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(BATCH_LABEL.to_string(), "true".to_string())])),
            annotations: Some(BTreeMap::from([(BATCH_ANNOTATION.to_string(), created)])),
            ..ObjectMeta::default()
        };
        Ok(job)
    }

    /// Create the batch's job (a batch that failed validation is recorded as a job too, so that
    /// it lists; it is created suspended and never runs).
    pub(crate) async fn create(&self, st: &AppState, namespace: &str, b: BatchObject) -> Result<BatchObject, ApiError> {
        let mut job = self.job(&st.config, &st.files, namespace, &b)?;
        if b.status == BatchStatus::Failed {
            job.spec.suspend = true;
        }
        let pp = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
        match self.api(namespace).create(&pp, &job).await {
            Ok(_) => Ok(b),
            Err(kube::Error::Api(e)) if e.code == 404 => Err(ApiError::internal(format!(
                "namespace {namespace:?} of tenant {namespace:?} does not exist, or the BatchInferenceJob CRD is not installed: {}",
                e.message
            ))),
            Err(kube::Error::Api(e)) if e.code == 403 => Err(ApiError::internal(format!(
                "the server may not create BatchInferenceJobs in namespace {namespace:?} (RBAC): {}",
                e.message
            ))),
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                Err(ApiError::invalid(format!("the cluster refused the batch's job: {}", e.message), None, "invalid_job"))
            }
            Err(e) => Err(kube_err("create the batch's BatchInferenceJob", e)),
        }
    }

    /// The batch of job `name`, recording its files first if it has just ended.
    async fn batch_of(&self, files: &FileStore, namespace: &str, job: BatchInferenceJob) -> Result<Option<BatchObject>, ApiError> {
        let Some(created) = created_batch(&job) else { return Ok(None) };
        let phase = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
        let mut finalized = finalized(&job);
        if phase.is_terminal() && finalized.is_none() {
            let f = self.finalize(files, namespace, &job, &created).await?;
            finalized = Some(f);
        }
        Ok(Some(project(created, &job, finalized.as_ref(), now())))
    }

    pub(crate) async fn get(&self, files: &FileStore, namespace: &str, id: &str) -> Result<BatchObject, ApiError> {
        let job = self.api(namespace).get_opt(&job_name(id)).await.map_err(|e| kube_err("read the batch's BatchInferenceJob", e))?;
        let Some(job) = job else { return Err(ApiError::not_found("Batch", id)) };
        match self.batch_of(files, namespace, job).await? {
            Some(b) if b.id == id => Ok(b),
            _ => Err(ApiError::not_found("Batch", id)),
        }
    }

    pub(crate) async fn list(&self, files: &FileStore, namespace: &str) -> Result<Vec<BatchObject>, ApiError> {
        let lp = ListParams::default().labels(&format!("{BATCH_LABEL}=true"));
        let jobs = match self.api(namespace).list(&lp).await {
            Ok(l) => l.items,
            // A tenant whose namespace does not exist has no batches.
            Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
            Err(e) => return Err(kube_err("list the tenant's BatchInferenceJobs", e)),
        };
        let mut out = Vec::new();
        for job in jobs {
            if let Some(b) = self.batch_of(files, namespace, job).await? {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// `spec.cancel: true` and the time it was asked; the operator stops the job and closes it.
    pub(crate) async fn cancel(&self, namespace: &str, b: &BatchObject) -> Result<BatchObject, ApiError> {
        let t = now();
        let patch = json!({
            "metadata": {"annotations": {CANCELLING_AT_ANNOTATION: t.to_string()}},
            "spec": {"cancel": true},
        });
        let pp = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
        let job = self
            .api(namespace)
            .patch(&job_name(&b.id), &pp, &Patch::Merge(&patch))
            .await
            .map_err(|e| kube_err("set spec.cancel on the batch's BatchInferenceJob", e))?;
        let created = created_batch(&job).unwrap_or_else(|| b.clone());
        Ok(project(created, &job, finalized(&job).as_ref(), t))
    }

    /// Record the output and error files of an ended job (idempotent: their ids come from the
    /// batch's, and a second server finalizing at once writes the same records).
    async fn finalize(&self, files: &FileStore, namespace: &str, job: &BatchInferenceJob, b: &BatchObject) -> Result<Finalized, ApiError> {
        let out = output_prefix(files, namespace, &b.id);
        let rel = |p: &str| format!("batches/{}/out/{}", b.id, p.trim_start_matches('/'));
        let manifest = match out.child(layout::MANIFEST).get_bytes().await {
            Ok(bytes) => Some(
                serde_json::from_slice::<OutputManifest>(&bytes)
                    .map_err(|e| ApiError::internal(format!("{}: not a job manifest: {e}", out.child(layout::MANIFEST).uri)))?,
            ),
            Err(StorageError::NotFound { .. }) => None,
            Err(e) => return Err(storage(e)),
        };
        let status = job.status.clone().unwrap_or_default();
        let (mut results, mut errors, mut f) = (Vec::new(), Vec::new(), Finalized { finalizing_at: now(), ..Finalized::default() });
        match &manifest {
            Some(m) => {
                for s in &m.shards {
                    results.push(rel(&s.results));
                    errors.push(rel(&s.errors));
                }
                f.completed = m.requests.succeeded;
                f.failed = m.requests.failed;
                f.input_tokens = m.usage.prompt_tokens;
                f.output_tokens = m.usage.completion_tokens;
            }
            // A failed job has no manifest: what it committed to results/ and errors/ is kept.
            None => {
                for (dir, into) in [("results", &mut results), ("errors", &mut errors)] {
                    let prefix = out.child(dir);
                    for meta in prefix.list().await.map_err(storage)? {
                        let uri = prefix.uri_of(&meta.location);
                        if let Some(name) = uri.rsplit('/').next() {
                            into.push(rel(&format!("{dir}/{name}")));
                        }
                    }
                }
                f.completed = u64::try_from(status.requests.succeeded).unwrap_or(0);
                f.failed = u64::try_from(status.requests.failed).unwrap_or(0);
            }
        }
        // Shards with nothing to say have empty files; only objects that exist are parts.
        let keep = |parts: Vec<String>| async {
            let root = files.tenant_root(namespace);
            let mut kept = Vec::new();
            for p in parts {
                match root.child(&p).head().await {
                    Ok(m) if m.size > 0 => kept.push(p),
                    Ok(_) | Err(StorageError::NotFound { .. }) => {}
                    Err(e) => return Err(storage(e)),
                }
            }
            Ok(kept)
        };
        let results = keep(results).await?;
        let errors = keep(errors).await?;
        let hex = b.id.trim_start_matches("batch_");
        for (parts, kind, slot) in [(results, "output", &mut f.output_file_id), (errors, "error", &mut f.error_file_id)] {
            if parts.is_empty() {
                continue;
            }
            let id = format!("file-{hex}-{kind}");
            let file = FileObject {
                id: id.clone(),
                object: "file".into(),
                bytes: files.size_of(namespace, &parts).await?,
                created_at: f.finalizing_at,
                filename: format!("{}_{kind}.jsonl", b.id),
                purpose: "batch_output".into(),
                status: "processed".into(),
                status_details: None,
                expires_at: None,
            };
            files.save_new(&FileRecord { tenant: namespace.to_string(), parts, file }).await?;
            *slot = Some(id);
        }
        let text = serde_json::to_string(&f).map_err(|e| ApiError::internal(format!("cannot serialise the batch's files: {e}")))?;
        let patch = json!({"metadata": {"annotations": {FILES_ANNOTATION: text}}});
        let pp = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
        let name = job.metadata.name.clone().unwrap_or_else(|| job_name(&b.id));
        self.api(namespace).patch(&name, &pp, &Patch::Merge(&patch)).await.map_err(|e| kube_err("record the batch's files", e))?;
        Ok(f)
    }
}

/// Where batch `id`'s job writes.
fn output_prefix(files: &FileStore, namespace: &str, id: &str) -> Location {
    files.tenant_root(namespace).child(&format!("batches/{id}/out"))
}

fn annotation<'a>(job: &'a BatchInferenceJob, key: &str) -> Option<&'a str> {
    job.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The batch object a job was created with; `None` for a job the API did not create.
pub fn created_batch(job: &BatchInferenceJob) -> Option<BatchObject> {
    serde_json::from_str(annotation(job, BATCH_ANNOTATION)?).ok()
}

fn finalized(job: &BatchInferenceJob) -> Option<Finalized> {
    serde_json::from_str(annotation(job, FILES_ANNOTATION)?).ok()
}

fn secs(t: &Option<Time>) -> Option<i64> {
    t.as_ref().map(|t| t.0.as_second())
}

/// The batch object of a job: its creation fields with its status (pure; `now` stands in for
/// times the job does not record).
pub fn project(mut b: BatchObject, job: &BatchInferenceJob, finalized: Option<&Finalized>, now: i64) -> BatchObject {
    if b.status == BatchStatus::Failed {
        // Failed validation at creation: the job never runs.
        return b;
    }
    let st = job.status.clone().unwrap_or_default();
    let cancel = job.spec.cancel;
    let started = secs(&st.start_time);
    let ended = secs(&st.completion_time).or(finalized.map(|f| f.finalizing_at)).unwrap_or(now);
    if !matches!(st.phase, JobPhase::Pending | JobPhase::Planning) {
        b.in_progress_at = started.or(Some(b.created_at));
    }
    if cancel {
        b.cancelling_at = annotation(job, CANCELLING_AT_ANNOTATION).and_then(|s| s.parse().ok()).or(Some(now));
    }
    let total = b.request_counts.total;
    b.request_counts.completed = u64::try_from(st.requests.succeeded).unwrap_or(0).min(total);
    b.request_counts.failed = u64::try_from(st.requests.failed).unwrap_or(0).min(total - b.request_counts.completed);
    b.sluice.workers = u32::try_from(st.workers.active).unwrap_or(0);
    b.sluice.projected_completion_at = secs(&st.projected_completion_time);
    b.sluice.sla_status = st.sla_status.map(|s| s.as_str().to_string()).unwrap_or_else(|| "Pending".into());
    b.status = match (st.phase, finalized) {
        (JobPhase::Pending | JobPhase::Planning, _) if cancel => BatchStatus::Cancelling,
        (JobPhase::Pending | JobPhase::Planning, _) => BatchStatus::Validating,
        (JobPhase::Running | JobPhase::Suspended, _) if cancel => BatchStatus::Cancelling,
        (JobPhase::Running | JobPhase::Suspended, _) => BatchStatus::InProgress,
        (_, None) if cancel => BatchStatus::Cancelling,
        (_, None) => BatchStatus::Finalizing,
        (phase, Some(f)) => {
            b.output_file_id = f.output_file_id.clone();
            b.error_file_id = f.error_file_id.clone();
            b.finalizing_at = Some(f.finalizing_at);
            b.request_counts.completed = f.completed.min(total);
            b.request_counts.failed = f.failed.min(total - b.request_counts.completed);
            b.usage = Some(BatchUsage {
                input_tokens: f.input_tokens,
                input_tokens_details: json!({"cached_tokens": 0}),
                output_tokens: f.output_tokens,
                output_tokens_details: json!({"reasoning_tokens": 0}),
                total_tokens: f.input_tokens + f.output_tokens,
            });
            b.sluice.workers = 0;
            b.sluice.projected_completion_at = None;
            match phase {
                JobPhase::Succeeded => {
                    b.completed_at = Some(ended);
                    BatchStatus::Completed
                }
                JobPhase::Cancelled => {
                    b.cancelled_at = Some(ended);
                    b.sluice.sla_status = "Cancelled".into();
                    BatchStatus::Cancelled
                }
                JobPhase::Expired => {
                    b.expired_at = Some(ended);
                    b.sluice.sla_status = "Missed".into();
                    BatchStatus::Expired
                }
                _ => {
                    b.failed_at = Some(ended);
                    b.sluice.sla_status = "Failed".into();
                    let why = st
                        .conditions
                        .iter()
                        .find(|c| c.type_ == condition_types::FAILED)
                        .map(|c| c.message.clone())
                        .filter(|m| !m.is_empty())
                        .unwrap_or_else(|| "the batch's job failed; see its Events".into());
                    b.errors = Some(BatchErrors {
                        object: "list".into(),
                        data: vec![BatchError { code: "batch_failed".into(), message: why, param: None, line: None }],
                    });
                    BatchStatus::Failed
                }
            }
        }
    };
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::objects::{RequestCounts, SluiceFields};

    fn batch() -> BatchObject {
        BatchObject {
            id: "batch_0001".into(),
            object: "batch".into(),
            endpoint: "/v1/chat/completions".into(),
            model: "m".into(),
            errors: None,
            input_file_id: "file-1".into(),
            completion_window: "1h".into(),
            status: BatchStatus::Validating,
            output_file_id: None,
            error_file_id: None,
            created_at: 100,
            in_progress_at: None,
            expires_at: Some(3700),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts { total: 10, completed: 0, failed: 0 },
            usage: None,
            metadata: None,
            sluice: SluiceFields::default(),
        }
    }

    fn job(phase: &str, cancel: bool) -> BatchInferenceJob {
        serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "BatchInferenceJob",
            "metadata": {"name": "batch-0001", "annotations": {CANCELLING_AT_ANNOTATION: "150"}},
            "spec": {"model": {"uri": "file:///m"}, "input": {"uri": "file:///i"}, "output": {"uri": "file:///o"}, "sla": {"completionWindow": "1h"}, "cancel": cancel},
            "status": {"phase": phase, "requests": {"total": 10, "succeeded": 4, "failed": 1}, "startTime": "1970-01-01T00:02:00Z",
                       "workers": {"desired": 2, "active": 2}, "slaStatus": "OnTrack"}
        }))
        .unwrap()
    }

    #[test]
    fn a_jobs_phase_becomes_openais_status() {
        let running = project(batch(), &job("Running", false), None, 200);
        assert_eq!((running.status, running.in_progress_at, running.request_counts.completed), (BatchStatus::InProgress, Some(120), 4));
        assert_eq!((running.sluice.workers, running.sluice.sla_status.as_str()), (2, "OnTrack"));
        assert_eq!(project(batch(), &job("Planning", false), None, 200).status, BatchStatus::Validating);
        let cancelling = project(batch(), &job("Running", true), None, 200);
        assert_eq!((cancelling.status, cancelling.cancelling_at), (BatchStatus::Cancelling, Some(150)));
        // Ended but its files not yet recorded.
        assert_eq!(project(batch(), &job("Succeeded", false), None, 200).status, BatchStatus::Finalizing);
        let f = Finalized { output_file_id: Some("file-o".into()), completed: 9, failed: 1, finalizing_at: 190, ..Finalized::default() };
        let done = project(batch(), &job("Succeeded", false), Some(&f), 200);
        assert_eq!(
            (done.status, done.output_file_id.as_deref(), done.request_counts.completed),
            (BatchStatus::Completed, Some("file-o"), 9)
        );
        assert_eq!(project(batch(), &job("Cancelled", true), Some(&f), 200).status, BatchStatus::Cancelled);
        assert_eq!(project(batch(), &job("Expired", false), Some(&f), 200).status, BatchStatus::Expired);
        let failed = project(batch(), &job("Failed", false), Some(&f), 200);
        assert_eq!((failed.status, failed.errors.unwrap().data[0].code.as_str()), (BatchStatus::Failed, "batch_failed"));
    }
}
