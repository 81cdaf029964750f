//! The `BatchInferenceJob` custom resource (group `sluice.dev`, version `v1alpha1`): spec, status
//! and the CEL rules the API server enforces. The doc comments become the CRD's descriptions.
//! This module holds types only; the operator decides, the worker does.

// kube's `printcolumn(...)` attributes legitimately repeat keys such as `type_ = "string"`.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalObjectReference, PodTemplateSpec, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A batch of LLM requests to finish before a deadline at the lowest GPU cost that makes it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "BatchInferenceJob",
    plural = "batchinferencejobs",
    singular = "batchinferencejob",
    shortname = "bij",
    category = "sluice",
    namespaced,
    status = "BatchInferenceJobStatus",
    derive = "PartialEq",
    doc = "A batch of LLM requests that Sluice runs on GPUs and finishes before a deadline at the lowest GPU cost that still makes it.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(name = "Done", type_ = "string", json_path = ".status.progress", description = "Finished requests / total"),
    printcolumn(name = "Rate", type_ = "string", json_path = ".status.throughput.display", description = "Observed requests per second"),
    printcolumn(
        name = "ETA",
        type_ = "string",
        json_path = ".status.projectedCompletionTime",
        description = "Projected completion time (RFC 3339, UTC)"
    ),
    printcolumn(name = "Deadline", type_ = "string", json_path = ".status.deadline", description = "Effective deadline (RFC 3339, UTC)"),
    printcolumn(name = "SLA", type_ = "string", json_path = ".status.slaStatus", description = "Deadline status"),
    printcolumn(name = "Workers", type_ = "string", json_path = ".status.workers.display", description = "Active / desired workers"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct BatchInferenceJobSpec {
    /// The model to serve. Immutable once the job is created.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.model is immutable once the job is created"))]
    pub model: ModelSpec,
    /// The input requests. Immutable once the job is created.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.input is immutable once the job is created"))]
    pub input: InputSpec,
    /// Where results go. Immutable once the job is created.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.output is immutable once the job is created"))]
    pub output: OutputSpec,
    /// Object-storage connection settings shared by model, input and output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// Sampling defaults; an OpenAI batch line's body overrides them per request.
    #[serde(default)]
    pub sampling: SamplingSpec,
    /// The completion deadline and how to trade cost against it.
    pub sla: SlaSpec,
    /// Worker pods: bounds, resources and scheduling.
    #[serde(default)]
    pub workers: WorkersSpec,
    /// How the input is split into shards.
    #[serde(default)]
    pub sharding: ShardingSpec,
    /// Retry limits for failed shards.
    #[serde(default)]
    pub retries: RetriesSpec,
    /// Pause the job: no new workers start; running workers are stopped gracefully.
    #[serde(default)]
    pub suspend: bool,
    /// Cancel the job, for good: running workers stop after committing, every committed result
    /// is kept, and each request that never ran is written to the error files with code
    /// `batch_cancelled`; the job ends `Cancelled`. Cannot be undone.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self || !oldSelf").message("spec.cancel cannot be undone once set"))]
    pub cancel: bool,
    /// Kueue LocalQueue name, passed to the Job as the `kueue.x-k8s.io/queue-name` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    /// Seconds after the job finishes before its Kubernetes Job (not the output) is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
}

/// Weight precision the worker loads the model in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    // bf16 on GPU, f32 on CPU.
    #[default]
    Auto,
    Bf16,
    F16,
    F32,
    // The projections' weights in FP8 E4M3 with one scale per output channel (bf16 weights are
    // quantized at load; FP8 checkpoints load with their scales), activations quantized per
    // token for each projection; the rest in bf16. Needs compute capability 8.9+ on a GPU.
    Fp8,
}

impl Dtype {
    /// The spelling in manifests and in the worker's `SLUICE_MODEL_DTYPE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Auto => "auto",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
            Dtype::Fp8 => "fp8",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;

    /// The manifest spellings, case-insensitive, and torch's (`bfloat16`, `float16`/`half`,
    /// `float32`/`float`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Dtype::Auto),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" | "half" => Ok(Dtype::F16),
            "f32" | "float32" | "float" => Ok(Dtype::F32),
            "fp8" | "f8" | "e4m3" | "float8_e4m3fn" => Ok(Dtype::Fp8),
            other => Err(format!("unknown dtype {other:?} (use auto, bf16, f16, f32 or fp8)")),
        }
    }
}

/// Element type of the worker's KV cache.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    // The model's activation dtype (bf16 on GPU, f32 on CPU).
    #[default]
    Auto,
    // FP8 E4M3 at unit scale (values saturate at +-448): half the bytes of bf16 per token of
    // context, so twice the sequences fit; keys and values are rounded to 3 mantissa bits.
    Fp8,
}

impl KvCacheDtype {
    /// The spelling in manifests and in the worker's `SLUICE_KV_CACHE_DTYPE`.
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::Fp8 => "fp8",
        }
    }

    pub fn is_auto(&self) -> bool {
        *self == KvCacheDtype::Auto
    }
}

impl std::fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KvCacheDtype {
    type Err = String;

    /// `auto` or `fp8` (also vLLM's `fp8_e4m3`), case-insensitive.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(KvCacheDtype::Auto),
            "fp8" | "fp8_e4m3" | "e4m3" => Ok(KvCacheDtype::Fp8),
            other => Err(format!("unknown KV cache dtype {other:?} (use auto or fp8)")),
        }
    }
}

/// The model a worker loads.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// A model directory as published on the Hugging Face hub (config.json, safetensors,
    /// tokenizer.json): a local path or `file://` URI (PVC or hostPath mount) or an object-store
    /// prefix (`s3://`, `gs://`, `az://`).
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
    /// Weight precision.
    #[serde(default)]
    pub dtype: Dtype,
    /// KV cache element type: `auto` (the activation dtype) or `fp8` (E4M3, half the memory).
    #[serde(default, skip_serializing_if = "KvCacheDtype::is_auto")]
    pub kv_cache_dtype: KvCacheDtype,
    /// Longest prompt plus completion in tokens; defaults to the model's own limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_model_len: Option<u32>,
}

/// The format of the input lines.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    // Detect per line: OpenAI batch lines or `{"id","prompt"}` lines.
    #[default]
    Auto,
    // OpenAI batch lines `{"custom_id","method","url","body"}`.
    Openai,
    // Plain `{"id","prompt"}` lines.
    Prompts,
}

impl InputFormat {
    /// The spelling in manifests and in the worker's `SLUICE_INPUT_FORMAT`.
    pub fn as_str(self) -> &'static str {
        match self {
            InputFormat::Auto => "auto",
            InputFormat::Openai => "openai",
            InputFormat::Prompts => "prompts",
        }
    }
}

/// The input object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InputSpec {
    /// A JSONL object: `file://`, `s3://`, `gs://` or `az://` URI.
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
    /// Line format.
    #[serde(default)]
    pub format: InputFormat,
}

/// The output prefix.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// Prefix under which `results/`, `errors/`, `manifest.json` and `_sluice/` are written.
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,
}

/// Object-storage connection settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Secret whose keys are exposed to workers and the operator as environment variables
    /// (for example `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,
    /// Endpoint of an S3-compatible server such as MinIO (`http://minio.minio:9000`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region of the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Use path-style S3 addressing (needed by most S3-compatible servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// Allow plain-HTTP endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_http: Option<bool>,
    /// Extra CA certificates to trust for an HTTPS endpoint signed by a private CA (MinIO or
    /// Ceph behind an in-house CA): a PEM bundle in a ConfigMap or Secret of the job's
    /// namespace. Trusted in addition to the system's roots, by the operator and the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundleSpec>,
}

/// Where a PEM bundle of CA certificates is: a key of a ConfigMap or of a Secret in the job's
/// namespace. The operator reads it; workers get it mounted read-only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.configMapRef) != has(self.secretRef)").message("set exactly one of storage.caBundle.configMapRef or storage.caBundle.secretRef")
)]
pub struct CaBundleSpec {
    /// ConfigMap that holds the bundle (the usual place: CA certificates are public).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<LocalObjectReference>,
    /// Secret that holds the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,
    /// Key of the ConfigMap or Secret whose value is the PEM bundle (one or more
    /// `-----BEGIN CERTIFICATE-----` blocks).
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The default key of [`CaBundleSpec::key`].
pub const DEFAULT_CA_KEY: &str = "ca.crt";

fn default_ca_key() -> String {
    DEFAULT_CA_KEY.to_string()
}

impl CaBundleSpec {
    /// The bundle in a ConfigMap under the default key.
    pub fn config_map(name: impl Into<String>) -> Self {
        Self { config_map_ref: Some(LocalObjectReference { name: name.into() }), secret_ref: None, key: default_ca_key() }
    }

    /// The bundle in a Secret under the default key.
    pub fn secret(name: impl Into<String>) -> Self {
        Self { config_map_ref: None, secret_ref: Some(LocalObjectReference { name: name.into() }), key: default_ca_key() }
    }
}

/// Sampling defaults.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SamplingSpec {
    /// Most tokens generated per request.
    #[serde(default = "default_max_tokens")]
    #[schemars(range(min = 1))]
    pub max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: f64,
    /// Nucleus sampling mass, in (0, 1].
    #[serde(default = "default_top_p")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("sampling.topP must be in (0, 1]"))]
    pub top_p: f64,
    /// Keep only the k most likely tokens; unset keeps all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub top_k: Option<u32>,
    /// Base seed; each request's seed derives from it and its custom_id, so retries repeat.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub seed: i64,
    /// Stop strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub stop: Vec<String>,
}

fn default_max_tokens() -> u32 {
    256
}
fn default_top_p() -> f64 {
    1.0
}

impl Default for SamplingSpec {
    fn default() -> Self {
        Self { max_tokens: default_max_tokens(), temperature: 0.0, top_p: default_top_p(), top_k: None, seed: 0, stop: Vec::new() }
    }
}

/// How the scaler trades GPU cost against the deadline.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum SlaPolicy {
    // The fewest workers that still finish by `deadline − margin`.
    #[default]
    Deadline,
    // Always `workers.max`.
    Fastest,
}

/// The completion deadline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.deadline) != has(self.completionWindow)").message("set exactly one of sla.deadline or sla.completionWindow"))]
pub struct SlaSpec {
    /// Absolute deadline (RFC 3339, e.g. `2026-12-01T08:00:00Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub deadline: Option<String>,
    /// Deadline relative to the job's creation, as a duration such as `24h` or `90m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^(([0-9]+(\.[0-9]+)?d)([0-9]+(\.[0-9]+)?(ms|s|m|h))*|([0-9]+(\.[0-9]+)?(ms|s|m|h))+)$"),
        length(max = 64)
    )]
    #[x_kube(validation = Rule::new("!self.matches('^(0+(\\\\.0+)?(ms|s|m|h|d))+$')").message("sla.completionWindow must be longer than zero"))]
    // Days (first, at most once, as the pattern says) plus a Go duration for the rest: the same
    // sum `deadline::parse_duration` computes, so the API server and `sluice validate` refuse
    // the same over-long windows.
    #[x_kube(
        validation = Rule::new("(self.contains('d') ? double(self.split('d')[0]) * 86400.0 + (self.split('d')[1] == '' ? 0.0 : double(duration(self.split('d')[1]).getSeconds())) : double(duration(self).getSeconds())) <= 31622400.0").message("sla.completionWindow must be at most 366d")
    )]
    pub completion_window: Option<String>,
    /// Safety margin as a fraction of the window: the scaler aims for `deadline − margin × window`.
    #[serde(default = "default_margin")]
    #[schemars(range(min = 0.0, max = 0.9))]
    pub margin: f64,
    /// Scaling policy.
    #[serde(default)]
    pub policy: SlaPolicy,
    /// What happens when the deadline passes with work left: `Continue` (the default) runs on
    /// and reports the deadline `Missed`; `Expire` stops the job like a cancel, keeping every
    /// committed result and writing each request that never ran to the error files with code
    /// `batch_expired`; the job ends `Expired`.
    #[serde(default)]
    pub on_deadline: OnDeadline,
}

/// What to do when the deadline passes with work left.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum OnDeadline {
    // Keep running until every request is done.
    #[default]
    Continue,
    // Stop: keep committed results, write the rest to the error files as `batch_expired`.
    Expire,
}

/// Why a job stopped before every request ran: the requests that never ran go to the error
/// files with this reason's code (the OpenAI Batch API's codes).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// `spec.cancel`, or a batch cancelled through the Batch API.
    Cancelled,
    /// The deadline passed with `sla.onDeadline: Expire`.
    Expired,
}

impl CloseReason {
    /// What each request that never ran gets in the error files.
    pub fn not_run(self) -> NotRun {
        match self {
            CloseReason::Cancelled => NotRun::Cancelled,
            CloseReason::Expired => NotRun::Expired,
        }
    }

    /// The error code of each request that never ran.
    pub fn code(self) -> &'static str {
        self.not_run().code()
    }

    /// The phase a job closed for this reason ends in.
    pub fn phase(self) -> JobPhase {
        match self {
            CloseReason::Cancelled => JobPhase::Cancelled,
            CloseReason::Expired => JobPhase::Expired,
        }
    }
}

/// Why a request whose line is valid has no result: the error code and message its line gets
/// in the error files, so that every request of the input is in exactly one of the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotRun {
    /// The job was cancelled first.
    Cancelled,
    /// The deadline passed first (`sla.onDeadline: Expire`).
    Expired,
    /// Its shard failed after its retries (within `retries.maxFailedShards`).
    ShardFailed,
}

impl NotRun {
    pub fn code(self) -> &'static str {
        match self {
            NotRun::Cancelled => "batch_cancelled",
            NotRun::Expired => "batch_expired",
            NotRun::ShardFailed => "shard_failed",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            NotRun::Cancelled => "the job was cancelled before this request ran",
            NotRun::Expired => "the job's deadline passed before this request ran",
            NotRun::ShardFailed => {
                "this request's shard failed after its retries (retries.perShard); the job's Events and worker logs say why"
            }
        }
    }
}

impl std::str::FromStr for NotRun {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "batch_cancelled" => Ok(NotRun::Cancelled),
            "batch_expired" => Ok(NotRun::Expired),
            "shard_failed" => Ok(NotRun::ShardFailed),
            other => Err(format!("{other:?} is not batch_cancelled, batch_expired or shard_failed")),
        }
    }
}

fn default_margin() -> f64 {
    0.1
}

/// Worker pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.min <= self.max").message("workers.min must be less than or equal to workers.max"))]
pub struct WorkersSpec {
    /// Fewest concurrent workers while work remains.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub min: i32,
    /// Most concurrent workers.
    #[serde(default = "default_max_workers")]
    #[schemars(range(min = 1))]
    pub max: i32,
    /// GPUs per worker pod.
    #[serde(default = "default_gpus")]
    #[schemars(range(min = 0))]
    pub gpus: i32,
    /// Worker image; defaults to the operator's `--worker-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Most sequences a worker runs in one batch.
    #[serde(default = "default_max_batch_size")]
    #[schemars(range(min = 1))]
    pub max_batch_size: i32,
    /// Worker container resources (the GPU request is added from `gpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector for worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations for worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Priority class of worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// A pod template merged over the generated one (the `worker` container is matched by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub pod_template: Option<PodTemplateSpec>,
}

fn default_max_workers() -> i32 {
    1
}
fn default_gpus() -> i32 {
    1
}
fn default_max_batch_size() -> i32 {
    256
}

impl Default for WorkersSpec {
    fn default() -> Self {
        Self {
            min: 0,
            max: default_max_workers(),
            gpus: default_gpus(),
            image: None,
            max_batch_size: default_max_batch_size(),
            resources: None,
            node_selector: None,
            tolerations: None,
            priority_class_name: None,
            pod_template: None,
        }
    }
}

fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "A pod template merged over the generated one (the `worker` container is matched by name).",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// How the input is split into shards.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardingSpec {
    /// Requests per shard; unset chooses automatically from the input size and `workers.max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_shard: Option<u32>,
}

/// Retry limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetriesSpec {
    /// Retries of one shard before it counts as failed (the Job's `backoffLimitPerIndex`).
    #[serde(default = "default_per_shard")]
    #[schemars(range(min = 0, max = 100))]
    pub per_shard: i32,
    /// Failed shards tolerated before the whole job fails (the Job's `maxFailedIndexes`).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_failed_shards: i32,
}

fn default_per_shard() -> i32 {
    3
}

impl Default for RetriesSpec {
    fn default() -> Self {
        Self { per_shard: default_per_shard(), max_failed_shards: 0 }
    }
}

/// Lifecycle phase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
pub enum JobPhase {
    // Accepted, not yet planned.
    #[default]
    Pending,
    // Reading the input to plan shards.
    Planning,
    // Workers are processing shards.
    Running,
    // Paused by `spec.suspend`.
    Suspended,
    // Every shard committed and the manifest written.
    Succeeded,
    // Too many failed shards, or a permanent error.
    Failed,
    // Stopped by `spec.cancel`: committed results kept, the rest in the error files.
    Cancelled,
    // Stopped at the deadline (`sla.onDeadline: Expire`): committed results kept, the rest in
    // the error files.
    Expired,
}

impl JobPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Pending => "Pending",
            JobPhase::Planning => "Planning",
            JobPhase::Running => "Running",
            JobPhase::Suspended => "Suspended",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
            JobPhase::Cancelled => "Cancelled",
            JobPhase::Expired => "Expired",
        }
    }
    pub const ALL: [JobPhase; 8] = [
        JobPhase::Pending,
        JobPhase::Planning,
        JobPhase::Running,
        JobPhase::Suspended,
        JobPhase::Succeeded,
        JobPhase::Failed,
        JobPhase::Cancelled,
        JobPhase::Expired,
    ];
    /// Whether the job has finished for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled | JobPhase::Expired)
    }
    /// Whether the job ended with its manifest written (every request in output or error files).
    pub fn has_manifest(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Cancelled | JobPhase::Expired)
    }
}

/// Whether the job will make its deadline.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum SlaStatus {
    // Projected to finish before `deadline − margin`.
    OnTrack,
    // Projected to finish after `deadline − margin`, or too uncertain to promise.
    AtRisk,
    // The deadline has passed and work remains.
    Breached,
    // Finished before the deadline.
    Met,
    // Finished after the deadline.
    Missed,
    // Even `workers.max` cannot make the deadline.
    Infeasible,
}

impl SlaStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SlaStatus::OnTrack => "OnTrack",
            SlaStatus::AtRisk => "AtRisk",
            SlaStatus::Breached => "Breached",
            SlaStatus::Met => "Met",
            SlaStatus::Missed => "Missed",
            SlaStatus::Infeasible => "Infeasible",
        }
    }
    pub const ALL: [SlaStatus; 6] =
        [SlaStatus::OnTrack, SlaStatus::AtRisk, SlaStatus::Breached, SlaStatus::Met, SlaStatus::Missed, SlaStatus::Infeasible];
}

/// Condition types used in `status.conditions`.
pub mod condition_types {
    pub const ADMITTED: &str = "Admitted";
    pub const PROGRESSING: &str = "Progressing";
    pub const ON_TRACK: &str = "OnTrack";
    pub const COMPLETE: &str = "Complete";
    pub const FAILED: &str = "Failed";
    pub const SUSPENDED: &str = "Suspended";
}

/// Observed state, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchInferenceJobStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: JobPhase,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Kubernetes-style conditions: Admitted, Progressing, OnTrack, Complete, Failed, Suspended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Finished requests over total, e.g. `1200/5000`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Request counts.
    #[serde(default)]
    pub requests: RequestCounts,
    /// Shard counts.
    #[serde(default)]
    pub shards: ShardCounts,
    /// Worker counts.
    #[serde(default)]
    pub workers: WorkerCounts,
    /// Observed throughput.
    #[serde(default)]
    pub throughput: Throughput,
    /// When the job is projected to finish at the desired worker count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projected_completion_time: Option<Time>,
    /// The effective deadline (from `sla.deadline`, or creation time plus `sla.completionWindow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Time>,
    /// Deadline minus projected completion, in seconds (negative means late).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack_seconds: Option<i64>,
    /// Whether the job will make its deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sla_status: Option<SlaStatus>,
    /// GPU-seconds used by workers so far.
    #[serde(default)]
    pub gpu_seconds: f64,
    /// When the first worker started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Set once the job is being closed before every request ran (`cancelled` by `spec.cancel`,
    /// `expired` at the deadline with `sla.onDeadline: Expire`); kept to the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<CloseReason>,
    /// URI of `manifest.json`, set on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_uri: Option<String>,
    /// For a job whose storage only its pods can reach: the totals of the shards whose final
    /// report the operator has counted, kept here so an operator restart loses none of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<ReportedTotals>,
    /// Under a GpuBudget: the fleet scheduler's grant (workers, why) and the admission quote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
}

/// The fleet scheduler's view of one job under a GpuBudget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FleetStatus {
    /// The GpuBudget that covers the job.
    pub budget: String,
    /// Workers the plan grants now (workers finishing a shard they were asked to give back keep
    /// running until it is committed).
    pub workers: i32,
    /// GPUs those workers hold.
    pub gpus: i32,
    /// `OnTrack`, `Waiting`, `Lent`, `Infeasible` or `Done`.
    pub reason: String,
    /// Why, in a sentence: "waiting for 3 GPUs held by other jobs; …", "lent 2 workers to …".
    pub message: String,
    /// The quote made when the job was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote: Option<AdmissionQuote>,
}

/// A job's projection before it started, against the fleet as it was.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionQuote {
    /// When it was made.
    pub quoted_at: Option<Time>,
    /// Projected finish (none when the deadline cannot be met).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projected_completion_time: Option<Time>,
    /// Projected GPU-hours.
    pub gpu_hours: f64,
    /// Whether the deadline is reachable inside the budget.
    pub feasible: bool,
    /// What the throughput rests on: a learned profile (which, from how many jobs) or the prior.
    pub basis: String,
    /// The quote in a sentence, with what would make an infeasible deadline feasible.
    pub message: String,
}

/// Totals of the shards whose final progress report was counted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportedTotals {
    /// The shards counted, as index ranges (`0-3,5`).
    pub shards: String,
    /// Their committed results.
    pub succeeded: i64,
    /// Their committed error records.
    pub failed: i64,
    /// Their prompt tokens.
    pub prompt_tokens: i64,
    /// Their completion tokens.
    pub completion_tokens: i64,
}

impl BatchInferenceJobSpec {
    /// Whether only the job's pods can reach its storage: its input or output is a `file://`
    /// URI or a plain path (a PersistentVolumeClaim, hostPath or other volume mounted into the
    /// pods). Then the pods plan, report progress and write the manifest, and the operator never
    /// opens the storage.
    pub fn storage_only_in_pods(&self) -> bool {
        let local = |uri: &str| uri.starts_with("file:") || !uri.contains("://");
        local(&self.input.uri) || local(&self.output.uri)
    }
}

/// Request counts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestCounts {
    /// Lines in the input.
    pub total: i64,
    /// Requests with a committed result.
    pub succeeded: i64,
    /// Requests with a committed error record.
    pub failed: i64,
}

/// Shard counts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardCounts {
    /// Shards in the plan.
    pub total: i32,
    /// Shards fully committed.
    pub completed: i32,
    /// Shards that ran out of retries.
    pub failed: i32,
    /// Shards with a running worker.
    pub active: i32,
}

/// Worker counts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCounts {
    /// Concurrent workers the scaler wants (the Job's parallelism).
    pub desired: i32,
    /// Worker pods running now.
    pub active: i32,
    /// `active/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

/// Observed throughput.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Throughput {
    /// Requests per second, whole job.
    pub requests_per_second: f64,
    /// Output tokens per second, whole job.
    pub output_tokens_per_second: f64,
    /// Requests per second of one worker (the scaler's estimate).
    #[serde(default)]
    pub per_worker_requests_per_second: f64,
    /// Human-readable rate, e.g. `12.5/s`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}
