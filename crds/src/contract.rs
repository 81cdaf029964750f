//! The invocation contract between the operator (or local mode) and `sluice-worker`: environment
//! variable names, exit codes and the storage layout under the output prefix. Both sides use
//! these constants, so a pod and a local process see exactly the same interface.

/// Environment variables a worker reads (flags of the same meaning override them).
pub mod env {
    /// Shard index, set by the Job controller for Indexed Jobs.
    pub const JOB_COMPLETION_INDEX: &str = "JOB_COMPLETION_INDEX";
    /// URI of the job's `plan.json`.
    pub const PLAN_URI: &str = "SLUICE_PLAN_URI";
    /// Input JSONL object.
    pub const INPUT_URI: &str = "SLUICE_INPUT_URI";
    /// Input line format: `auto`, `openai` or `prompts`.
    pub const INPUT_FORMAT: &str = "SLUICE_INPUT_FORMAT";
    /// Output prefix.
    pub const OUTPUT_URI: &str = "SLUICE_OUTPUT_URI";
    /// Model directory: local path or object-store prefix.
    pub const MODEL_URI: &str = "SLUICE_MODEL_URI";
    /// Model dtype: `auto`, `bf16`, `f16`, `f32`, `fp8`.
    pub const MODEL_DTYPE: &str = "SLUICE_MODEL_DTYPE";
    /// KV cache element type: `auto` or `fp8`.
    pub const KV_CACHE_DTYPE: &str = "SLUICE_KV_CACHE_DTYPE";
    /// Longest prompt plus completion in tokens.
    pub const MAX_MODEL_LEN: &str = "SLUICE_MAX_MODEL_LEN";
    /// Directory where object-store models are cached.
    pub const MODEL_CACHE_DIR: &str = "SLUICE_MODEL_CACHE_DIR";
    /// Sampling defaults as the JSON form of `SamplingSpec`.
    pub const SAMPLING: &str = "SLUICE_SAMPLING";
    /// Most sequences per batch.
    pub const MAX_BATCH_SIZE: &str = "SLUICE_MAX_BATCH_SIZE";
    /// S3-compatible endpoint.
    pub const STORAGE_ENDPOINT: &str = "SLUICE_STORAGE_ENDPOINT";
    /// Bucket region.
    pub const STORAGE_REGION: &str = "SLUICE_STORAGE_REGION";
    /// `true` for path-style S3 addressing.
    pub const STORAGE_PATH_STYLE: &str = "SLUICE_STORAGE_PATH_STYLE";
    /// `true` to allow plain-HTTP endpoints.
    pub const STORAGE_ALLOW_HTTP: &str = "SLUICE_STORAGE_ALLOW_HTTP";
    /// A PEM file of extra CA certificates to trust for HTTPS storage endpoints: the key of
    /// `spec.storage.caBundle`, which the operator mounts read-only into worker pods.
    pub const STORAGE_CA_FILE: &str = "SLUICE_STORAGE_CA_FILE";
    /// Address for `/metrics` and `/healthz`.
    pub const METRICS_ADDR: &str = "SLUICE_METRICS_ADDR";
    /// Name of the BatchInferenceJob (for logs and the output's model field).
    pub const JOB_NAME: &str = "SLUICE_JOB_NAME";
    /// Identifies this attempt (the pod name on a cluster).
    pub const ATTEMPT: &str = "SLUICE_ATTEMPT";
    /// `json` for JSON logs.
    pub const LOG_FORMAT: &str = "SLUICE_LOG_FORMAT";
    /// `cpu` or `cuda` (default: cuda when built with it and a GPU is present).
    pub const DEVICE: &str = "SLUICE_DEVICE";
    /// Where the job's pods POST their reports (plan summary, progress records, manifest) when
    /// only they can reach the job's storage (`sluice_api::report`). Unset: no reports.
    pub const REPORT_URL: &str = "SLUICE_REPORT_URL";
    /// Bearer token of those reports.
    pub const REPORT_TOKEN: &str = "SLUICE_REPORT_TOKEN";
    /// `spec.sharding.requestsPerShard`, for `sluice-worker plan` (unset: automatic).
    pub const REQUESTS_PER_SHARD: &str = "SLUICE_REQUESTS_PER_SHARD";
    /// `spec.workers.max`, for `sluice-worker plan` (the automatic shard size uses it).
    pub const MAX_WORKERS: &str = "SLUICE_MAX_WORKERS";
    /// Shards that failed within `retries.maxFailedShards` (`1,3-5`), for `sluice-worker finalize`.
    pub const FAILED_SHARDS: &str = "SLUICE_FAILED_SHARDS";
    /// The input URI as the job's spec names it, recorded in the manifest by `finalize`.
    pub const SPEC_INPUT_URI: &str = "SLUICE_SPEC_INPUT_URI";
    /// Why `sluice-worker close` closes the job: `batch_cancelled` or `batch_expired`, the code
    /// each request that never ran gets in the error files.
    pub const CLOSE_CODE: &str = "SLUICE_CLOSE_CODE";
    /// The shards `sluice-worker close` closes (`1,3-5`): the failed ones, when a job that
    /// succeeded with failed shards gives their requests `shard_failed` lines. Unset: every
    /// shard not in `SLUICE_FAILED_SHARDS`.
    pub const CLOSE_SHARDS: &str = "SLUICE_CLOSE_SHARDS";

    // Tuning a worker reads with its defaults; the operator does not set them.

    /// Retries of a failing storage request (default 6).
    pub const STORAGE_MAX_RETRIES: &str = "SLUICE_STORAGE_MAX_RETRIES";
    /// Lines per output chunk (default 64).
    pub const CHUNK_LINES: &str = "SLUICE_CHUNK_LINES";
    /// Commit finished lines at least this often, in seconds (default 10).
    pub const CHUNK_SECONDS: &str = "SLUICE_CHUNK_SECONDS";
    /// Progress record interval, in seconds (default 10).
    pub const PROGRESS_SECONDS: &str = "SLUICE_PROGRESS_SECONDS";
    /// Seconds from SIGTERM to exit (default 25).
    pub const GRACE_SECONDS: &str = "SLUICE_GRACE_SECONDS";
    /// Longest input line in bytes.
    pub const MAX_LINE_BYTES: &str = "SLUICE_MAX_LINE_BYTES";
    /// KV cache size on CPU, in MiB.
    pub const KV_CACHE_MB: &str = "SLUICE_KV_CACHE_MB";
    /// `true`/`false`: share the KV blocks of identical prompt prefixes (worker default true).
    pub const PREFIX_CACHING: &str = "SLUICE_PREFIX_CACHING";
    /// Fault injection for tests (hidden).
    pub const INJECT_FAULTS: &str = "SLUICE_INJECT_FAULTS";
    /// The pod's host name: the default attempt name when [`ATTEMPT`] is unset.
    pub const HOSTNAME: &str = "HOSTNAME";
    /// Local mode: the worker program `sluice run` starts instead of `sluice worker`.
    pub const WORKER_BIN: &str = "SLUICE_WORKER_BIN";

    // What the platform sets in the operator's own pod.

    /// The pod's name (downward API in the chart): the operator's Event reporter instance and
    /// its Lease identity.
    pub const POD_NAME: &str = "POD_NAME";
    /// The pod's namespace (downward API in the chart): the namespace of the operator's Lease.
    pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
    /// The URL the pods of jobs whose storage only they reach report progress to.
    pub const OPERATOR_REPORT_URL: &str = "SLUICE_OPERATOR_REPORT_URL";
    /// Set by the kubelet in every pod: the operator runs in a cluster.
    pub const KUBERNETES_SERVICE_HOST: &str = "KUBERNETES_SERVICE_HOST";
}

/// Everything the operator (for a pod) or local mode (for a process) tells a worker, as one
/// value. [`WorkerInvocation::to_env`] is the only place the variables of [`env`] are written;
/// the worker's flags read the same names, and a worker test parses `to_env`'s output through
/// the worker's own argument definitions. The shard index (`JOB_COMPLETION_INDEX`, from the
/// Job controller) and the attempt name (the pod's name, from the downward API) are the
/// platform's, not part of this value.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerInvocation {
    /// `<namespace>/<name>` on a cluster, the job's name locally: the key of the request ids.
    pub job_name: String,
    /// The job's `plan.json`.
    pub plan_uri: String,
    /// The input object.
    pub input_uri: String,
    /// The input line format.
    pub input_format: crate::job::InputFormat,
    /// The output prefix.
    pub output_uri: String,
    /// The model directory.
    pub model_uri: String,
    /// The model's weight precision.
    pub model_dtype: crate::job::Dtype,
    /// The KV cache's element type.
    pub kv_cache_dtype: crate::job::KvCacheDtype,
    /// Longest prompt plus completion, if the spec caps it.
    pub max_model_len: Option<u32>,
    /// Where object-store models are cached.
    pub model_cache_dir: String,
    /// Sampling defaults.
    pub sampling: crate::job::SamplingSpec,
    /// Most sequences in one batch.
    pub max_batch_size: u32,
    /// `/metrics` and `/healthz` address, or `none`.
    pub metrics_addr: String,
    /// `json` or `text`.
    pub log_format: &'static str,
    /// `spec.storage`'s endpoint, region, path style and plain-HTTP switch.
    pub storage_endpoint: Option<String>,
    /// Bucket region.
    pub storage_region: Option<String>,
    /// Path-style S3 addressing.
    pub storage_path_style: Option<bool>,
    /// Plain-HTTP endpoints allowed.
    pub storage_allow_http: Option<bool>,
    /// `cpu`, `cuda` or `cuda:N`; `None`: the worker's default.
    pub device: Option<String>,
}

impl WorkerInvocation {
    /// The invocation of `spec`'s workers, with the settings a pod gets (`log_format: json`, no
    /// device override unless the job asks for no GPU); callers adjust the fields they own.
    pub fn for_job(job_name: String, spec: &crate::BatchInferenceJobSpec, model_cache_dir: &str, metrics_addr: &str) -> Self {
        let storage = spec.storage.as_ref();
        Self {
            job_name,
            plan_uri: layout::join(&spec.output.uri, layout::PLAN),
            input_uri: spec.input.uri.clone(),
            input_format: spec.input.format,
            output_uri: spec.output.uri.clone(),
            model_uri: spec.model.uri.clone(),
            model_dtype: spec.model.dtype,
            kv_cache_dtype: spec.model.kv_cache_dtype,
            max_model_len: spec.model.max_model_len,
            model_cache_dir: model_cache_dir.to_string(),
            sampling: spec.sampling.clone(),
            max_batch_size: u32::try_from(spec.workers.max_batch_size.max(1)).unwrap_or(1),
            metrics_addr: metrics_addr.to_string(),
            log_format: "json",
            storage_endpoint: storage.and_then(|s| s.endpoint.clone()),
            storage_region: storage.and_then(|s| s.region.clone()),
            storage_path_style: storage.and_then(|s| s.path_style),
            storage_allow_http: storage.and_then(|s| s.allow_http),
            device: (spec.workers.gpus == 0).then(|| "cpu".to_string()),
        }
    }

    /// The environment variables of this invocation, in a stable order.
    pub fn to_env(&self) -> Result<Vec<(&'static str, String)>, serde_json::Error> {
        let mut vars = vec![
            (env::JOB_NAME, self.job_name.clone()),
            (env::PLAN_URI, self.plan_uri.clone()),
            (env::INPUT_URI, self.input_uri.clone()),
            (env::INPUT_FORMAT, self.input_format.as_str().to_string()),
            (env::OUTPUT_URI, self.output_uri.clone()),
            (env::MODEL_URI, self.model_uri.clone()),
            (env::MODEL_DTYPE, self.model_dtype.as_str().to_string()),
        ];
        if !self.kv_cache_dtype.is_auto() {
            vars.push((env::KV_CACHE_DTYPE, self.kv_cache_dtype.as_str().to_string()));
        }
        if let Some(n) = self.max_model_len {
            vars.push((env::MAX_MODEL_LEN, n.to_string()));
        }
        vars.extend([
            (env::MODEL_CACHE_DIR, self.model_cache_dir.clone()),
            (env::SAMPLING, serde_json::to_string(&self.sampling)?),
            (env::MAX_BATCH_SIZE, self.max_batch_size.to_string()),
            (env::METRICS_ADDR, self.metrics_addr.clone()),
            (env::LOG_FORMAT, self.log_format.to_string()),
        ]);
        let optional = [
            (env::STORAGE_ENDPOINT, self.storage_endpoint.clone()),
            (env::STORAGE_REGION, self.storage_region.clone()),
            (env::STORAGE_PATH_STYLE, self.storage_path_style.map(|b| b.to_string())),
            (env::STORAGE_ALLOW_HTTP, self.storage_allow_http.map(|b| b.to_string())),
            (env::DEVICE, self.device.clone()),
        ];
        vars.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        Ok(vars)
    }
}

/// Worker exit codes. The operator's pod failure policy fails an index at once on
/// [`EXIT_PERMANENT`] and retries on anything else.
pub mod exit {
    /// The shard is fully committed.
    pub const SUCCESS: i32 = 0;
    /// A transient failure (storage hiccup, OOM, preemption): retry the shard.
    pub const RETRYABLE: i32 = 1;
    /// Bad invocation (flags).
    pub const USAGE: i32 = 2;
    /// A failure a retry cannot fix (bad model, unreadable or missing input, bad plan).
    pub const PERMANENT: i32 = 3;
    /// Stopped by SIGTERM after committing what was finished.
    pub const TERMINATED: i32 = 143;
}

/// Object paths relative to the output prefix.
pub mod layout {
    /// The shard plan, written once by the planner.
    pub const PLAN: &str = "_sluice/plan.json";
    /// The final manifest, written last (like `_SUCCESS`).
    pub const MANIFEST: &str = "manifest.json";
    /// Prefix of progress records.
    pub const PROGRESS_PREFIX: &str = "_sluice/progress/";

    /// A shard's progress record.
    pub fn progress(shard: u32) -> String {
        format!("{PROGRESS_PREFIX}{shard:05}.json")
    }
    /// Prefix of a shard's immutable chunks.
    pub fn chunk_prefix(shard: u32) -> String {
        format!("_sluice/shards/{shard:05}/")
    }
    /// A chunk covering input lines `[first_line, end_line)` of a shard (1-based line numbers).
    /// Zero-padded so lexical order is line order.
    pub fn chunk(shard: u32, first_line: u64, end_line: u64) -> String {
        format!("{}{first_line:012}-{end_line:012}.jsonl", chunk_prefix(shard))
    }
    /// Parse a chunk object name (the last path segment) back into `(first_line, end_line)`.
    pub fn parse_chunk_name(name: &str) -> Option<(u64, u64)> {
        let stem = name.rsplit('/').next()?.strip_suffix(".jsonl")?;
        let (a, b) = stem.split_once('-')?;
        let (a, b) = (a.parse().ok()?, b.parse().ok()?);
        (a < b).then_some((a, b))
    }
    /// A shard's final result file.
    pub fn results(shard: u32) -> String {
        format!("results/{shard:05}.jsonl")
    }
    /// A shard's final error file.
    pub fn errors(shard: u32) -> String {
        format!("errors/{shard:05}.jsonl")
    }

    /// Join an output prefix URI and a relative path with exactly one `/`.
    pub fn join(prefix: &str, rel: &str) -> String {
        format!("{}/{}", prefix.trim_end_matches('/'), rel.trim_start_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::layout::*;

    #[test]
    fn chunk_names_round_trip_and_sort() {
        let a = chunk(3, 1, 65);
        let b = chunk(3, 65, 129);
        assert!(a < b);
        assert_eq!(parse_chunk_name(&a), Some((1, 65)));
        assert_eq!(parse_chunk_name("x/000000000009-000000000001.jsonl"), None);
        assert_eq!(parse_chunk_name("garbage.jsonl"), None);
    }

    #[test]
    fn join_handles_slashes() {
        assert_eq!(join("s3://b/out/", "/manifest.json"), "s3://b/out/manifest.json");
        assert_eq!(join("file:///tmp/o", PLAN), "file:///tmp/o/_sluice/plan.json");
    }
}
