//! Local mode (`sluice run job.yaml`): the same job, plan, worker binary and SLA core as on a
//! cluster, with a tiny stand-in for the Job controller that runs `sluice-worker` processes
//! under the pod environment contract. It never talks to Kubernetes.

mod executor;
pub use executor::local_workers;
mod report;
mod uris;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};
use sluice_api::BatchInferenceJob;
use sluice_api::contract::layout;
use sluice_api::output::OutputManifest;
use sluice_api::plan::ShardPlan;
use sluice_api::storage::CaBundle;

use sluice_api::storage::PutOutcome;
use sluice_operator::error::Error as OperatorError;
use sluice_operator::storage_io::{self, Location, StorageRefs, StoreOpener, UriOpener};

pub use executor::WorkerCommand;
pub use report::{RunSummary, print_status};
pub use uris::resolve_uri;

/// Why a local run failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot read {path}: {source}")]
    ReadManifest { path: String, source: std::io::Error },
    #[error(transparent)]
    Manifest(#[from] sluice_api::validate::ManifestError),
    #[error("{0}")]
    Storage(#[from] OperatorError),
    #[error("spec.model.uri: {0}")]
    Model(String),
    #[error("spec.input.uri: {0}")]
    Input(String),
    #[error("the job failed: {0}")]
    JobFailed(String),
    #[error("stopped by Ctrl-C; committed work is kept, run the same command again to resume")]
    Interrupted,
    #[error("cannot start a worker ({program}): {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("{0}")]
    Other(String),
}

/// Options of `sluice run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub manifest: PathBuf,
    /// Overrides `spec.output.uri`.
    pub output: Option<String>,
    /// Overrides `spec.model.uri`.
    pub model: Option<String>,
    /// Caps concurrent workers (default: available cores, or 1 per GPU).
    pub max_workers: Option<u32>,
    /// `cpu` or `cuda`; passed to workers.
    pub device: Option<String>,
    /// Where worker logs go (default: `<output>/_sluice/logs/` for local outputs, else a temp dir).
    pub log_dir: Option<PathBuf>,
    /// How to start a worker.
    pub worker: WorkerCommand,
    /// Show the progress bar.
    pub progress_bar: bool,
    /// Seconds between progress polls.
    pub poll_interval: std::time::Duration,
}

/// The job after local URI resolution.
pub struct LocalJob {
    pub job: BatchInferenceJob,
    pub name: String,
    pub input: Location,
    pub output: Location,
    pub model_uri: String,
}

/// When the local job was first started: the SLA window of a rerun starts here, not at the rerun.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct LocalRunRecord {
    pub created_at: Timestamp,
}

/// Where the local run record lives under the output prefix.
pub const LOCAL_RUN_RECORD: &str = "_sluice/local-run.json";

/// Read, validate and resolve the manifest. Writes nothing.
pub fn prepare(opts: &RunOptions) -> Result<LocalJob, LocalError> {
    let text = std::fs::read_to_string(&opts.manifest)
        .map_err(|source| LocalError::ReadManifest { path: opts.manifest.display().to_string(), source })?;
    let mut job = sluice_api::validate::load_manifest(&text, &opts.manifest.display().to_string())?;
    let base = opts.manifest.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
    let cwd = std::env::current_dir().map_err(|e| LocalError::Other(format!("cannot read the current directory: {e}")))?;
    // Overrides from the command line are relative to where the user typed them.
    job.spec.model.uri = match &opts.model {
        Some(m) => resolve_uri(m, &cwd),
        None => resolve_uri(&job.spec.model.uri, &base),
    };
    job.spec.input.uri = resolve_uri(&job.spec.input.uri, &base);
    job.spec.output.uri = match &opts.output {
        Some(o) => resolve_uri(o, &cwd),
        None => resolve_uri(&job.spec.output.uri, &base),
    };
    let name = job.metadata.name.clone().unwrap_or_else(|| "job".into());
    // No cluster: credentials come from the environment (the object_store builders read it) and
    // so does the CA bundle, `SLUICE_STORAGE_CA_FILE`, which the workers inherit too.
    let ca_bundle =
        std::env::var_os(sluice_api::contract::env::STORAGE_CA_FILE).filter(|p| !p.is_empty()).map(|p| CaBundle::File(p.into()));
    let refs = StorageRefs { secret: BTreeMap::new(), ca_bundle };
    let storage = job.spec.storage.as_ref();
    let input = UriOpener.open("spec.input.uri", &job.spec.input.uri, storage, &refs)?;
    let output = UriOpener.open("spec.output.uri", &job.spec.output.uri, storage, &refs)?;
    let model_uri = job.spec.model.uri.clone();
    // A local model directory is checked up front, so a typo fails before anything is written.
    if let Some(dir) = model_uri.strip_prefix("file://") {
        let dir = Path::new(dir);
        if !dir.is_dir() {
            return Err(LocalError::Model(format!("{model_uri}: no such directory")));
        }
        if !dir.join("config.json").is_file() {
            return Err(LocalError::Model(format!("{model_uri}: not a model directory (no config.json)")));
        }
    }
    Ok(LocalJob { job, name, input, output, model_uri })
}

/// Shards whose final results and errors files exist.
pub async fn committed_shards(output: &Location, plan: &ShardPlan) -> Result<BTreeSet<u32>, LocalError> {
    let results: BTreeSet<String> = storage_io::list_names(&output.child("results/")).await?.into_iter().collect();
    let errors: BTreeSet<String> = storage_io::list_names(&output.child("errors/")).await?.into_iter().collect();
    let file = |p: String| p.rsplit('/').next().unwrap_or_default().to_string();
    Ok(plan
        .shards
        .iter()
        .filter(|s| results.contains(&file(layout::results(s.index))) && errors.contains(&file(layout::errors(s.index))))
        .map(|s| s.index)
        .collect())
}

/// Run the job to completion. Returns the summary; the manifest is written on success.
pub async fn run(opts: RunOptions) -> Result<RunSummary, LocalError> {
    let local = prepare(&opts)?;
    let started = Timestamp::now();

    // A finished job is a no-op that reports the existing results.
    let manifest_loc = local.output.child(layout::MANIFEST);
    if let Some(manifest) = storage_io::read_json::<OutputManifest>(&manifest_loc, "output manifest").await? {
        return Ok(RunSummary::already_complete(&local, manifest, manifest_loc.uri));
    }
    // Fail before writing anything if the input cannot be read.
    match local.input.store.head(&local.input.path).await {
        Ok(_) => {}
        Err(object_store::Error::NotFound { .. }) => return Err(LocalError::Input(format!("{} does not exist", local.input.uri))),
        Err(e) => return Err(LocalError::Input(format!("cannot read {}: {e}", local.input.uri))),
    }
    let plan = sluice_operator::planner::load_or_create(&local.job.spec, &local.input, &local.output).await?.plan;
    let record_loc = local.output.child(LOCAL_RUN_RECORD);
    let created_at = match storage_io::put_json_create(&record_loc, &LocalRunRecord { created_at: started }, "local run record").await? {
        PutOutcome::Created => started,
        // A rerun keeps the first run's window.
        PutOutcome::AlreadyExists => {
            storage_io::read_json::<LocalRunRecord>(&record_loc, "local run record").await?.map(|r| r.created_at).unwrap_or(started)
        }
    };
    let outcome = executor::execute(&opts, &local, &plan, created_at).await?;
    report::finish(&local, &plan, outcome, started).await
}
