//! The fleet's contract: the cluster-scoped `GpuBudget` resource (the GPUs Sluice may hold at
//! once, cluster-wide and per namespace, optionally for one GPU type) and the throughput profile
//! per model and GPU type that finished jobs leave in the cluster for the next job's quote.

// kube's `printcolumn(...)` attributes legitimately repeat keys such as `type_ = "string"`.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::job::BatchInferenceJobSpec;

/// The node label that names a GPU type when `gpuTypeLabel` is not set (NVIDIA's GPU feature
/// discovery sets it, e.g. `NVIDIA-H100-80GB-HBM3`).
pub const DEFAULT_GPU_TYPE_LABEL: &str = "nvidia.com/gpu.product";

/// The GPUs Sluice's workers may hold at once. The operator plans every BatchInferenceJob the
/// budget covers together (deadline first, fewest GPU-hours) and never grants more than this.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "GpuBudget",
    plural = "gpubudgets",
    singular = "gpubudget",
    shortname = "gpub",
    category = "sluice",
    status = "GpuBudgetStatus",
    derive = "PartialEq",
    doc = "The GPUs Sluice's BatchInferenceJob workers may hold at once, cluster-wide and per namespace.",
    printcolumn(name = "GPUs", type_ = "integer", json_path = ".spec.gpus", description = "GPUs Sluice may hold at once"),
    printcolumn(name = "Held", type_ = "integer", json_path = ".status.heldGpus", description = "GPUs its jobs hold now"),
    printcolumn(name = "Jobs", type_ = "integer", json_path = ".status.jobs", description = "Jobs it covers that are not finished"),
    printcolumn(name = "GPU type", type_ = "string", json_path = ".spec.gpuType", description = "The GPU type it counts (all when empty)"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct GpuBudgetSpec {
    /// GPUs the covered jobs' workers may hold at once (a worker with `workers.gpus: 0` counts
    /// as one).
    #[schemars(range(min = 0))]
    pub gpus: i32,
    /// Caps for single namespaces, in GPUs, inside `gpus`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_namespace: BTreeMap<String, i32>,
    /// Count only jobs whose `workers.nodeSelector` asks for this GPU type under
    /// `gpuTypeLabel`. Unset: every job that no budget of its own type covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// The node label naming the GPU type (default `nvidia.com/gpu.product`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type_label: Option<String>,
}

/// What the budget's jobs hold, as the operator last planned them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuBudgetStatus {
    /// GPUs held by the covered jobs' workers (the Jobs' parallelism, workers finishing a shard
    /// they were asked to give back included).
    #[serde(default)]
    pub held_gpus: i32,
    /// Covered jobs that are not finished.
    #[serde(default)]
    pub jobs: i32,
    /// GPUs held per namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub held_per_namespace: BTreeMap<String, i32>,
    /// When the status was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<Time>,
}

impl GpuBudgetSpec {
    /// The label naming the GPU type.
    pub fn type_label(&self) -> &str {
        self.gpu_type_label.as_deref().unwrap_or(DEFAULT_GPU_TYPE_LABEL)
    }
}

/// The GPU type a job asks for under `label` (its `workers.nodeSelector`), if any.
pub fn job_gpu_type<'a>(spec: &'a BatchInferenceJobSpec, label: &str) -> Option<&'a str> {
    spec.workers.node_selector.as_ref()?.get(label).map(String::as_str)
}

/// The budget that covers `spec` among `budgets` (sorted by name): the first whose `gpuType`
/// the job asks for, else the first without a `gpuType`. Jobs that Kueue admits
/// (`queueName` set) are left to Kueue's quota: no budget covers them.
pub fn covering<'a>(budgets: &'a [GpuBudget], spec: &BatchInferenceJobSpec) -> Option<&'a GpuBudget> {
    if spec.queue_name.is_some() {
        return None;
    }
    let typed = budgets.iter().find(|b| b.spec.gpu_type.as_deref().is_some_and(|t| job_gpu_type(spec, b.spec.type_label()) == Some(t)));
    typed.or_else(|| budgets.iter().find(|b| b.spec.gpu_type.is_none()))
}

/// The ConfigMap (in the operator's namespace) that holds the learned throughput profiles.
pub const PROFILES_CONFIGMAP: &str = "sluice-throughput-profiles";

/// What finished jobs of one model on one GPU type measured: the quote of the next job of the
/// same model rests on it instead of the prior.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ThroughputProfile {
    /// `spec.model.uri`.
    pub model: String,
    /// The GPU type (`cpu` for CPU workers, `any` when the job names none).
    pub gpu_type: String,
    /// GPUs per worker.
    pub gpus_per_worker: i32,
    /// Requests per second of one worker: the mean over the jobs counted.
    pub per_worker_requests_per_second: f64,
    /// Spread of that rate between jobs (0 after one job).
    pub stddev: f64,
    /// Output tokens per request (the mean over the jobs counted).
    pub output_tokens_per_request: f64,
    /// Seconds from a worker's creation to its first request, where measured.
    #[serde(default)]
    pub startup_seconds: Option<f64>,
    /// Finished jobs counted (the mean weighs at most the last 10).
    pub jobs: u32,
    /// When the last job was counted (RFC 3339).
    pub updated: String,
}

impl ThroughputProfile {
    /// The ConfigMap key of a model on a GPU type: readable and within the key alphabet
    /// (`[-._a-zA-Z0-9]`), with a hash of the full URI so that two models never share a key.
    pub fn key(model: &str, gpu_type: &str) -> String {
        let tail: String = model.rsplit('/').find(|s| !s.is_empty()).unwrap_or("model").chars().take(40).collect();
        let clean = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '-' }).collect::<String>();
        // FNV-1a: stable across releases, unlike the standard library's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in model.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{}.{}.{:08x}", clean(&tail), clean(gpu_type), h as u32)
    }

    /// The GPU type a job's profile is kept under.
    pub fn gpu_type_of(spec: &BatchInferenceJobSpec) -> String {
        if spec.workers.gpus == 0 {
            return "cpu".into();
        }
        job_gpu_type(spec, DEFAULT_GPU_TYPE_LABEL).unwrap_or("any").to_string()
    }

    /// Fold one more finished job's measurement in (a running mean and spread over at most the
    /// last 10 jobs).
    pub fn observe(&mut self, rps: f64, tokens_per_request: f64, startup: Option<f64>, updated: String) {
        let n = f64::from(self.jobs.min(9));
        let old_mean = self.per_worker_requests_per_second;
        let mean = (old_mean * n + rps) / (n + 1.0);
        let var = if self.jobs == 0 { 0.0 } else { (self.stddev.powi(2) * n + (rps - old_mean) * (rps - mean)) / (n + 1.0) };
        self.per_worker_requests_per_second = mean;
        self.stddev = var.max(0.0).sqrt();
        self.output_tokens_per_request = (self.output_tokens_per_request * n + tokens_per_request) / (n + 1.0);
        self.startup_seconds = match (self.startup_seconds, startup) {
            (Some(a), Some(b)) => Some((a * n + b) / (n + 1.0)),
            (a, b) => b.or(a),
        };
        self.jobs += 1;
        self.updated = updated;
    }

    /// The per-worker rate this profile predicts for a job generating about `tokens_per_request`
    /// output tokens per request (the profile's own when unknown): a decode-bound worker's
    /// tokens per second carry over between jobs better than its requests per second.
    pub fn rate_for(&self, tokens_per_request: Option<f64>) -> f64 {
        match tokens_per_request {
            Some(t) if t > 0.0 && self.output_tokens_per_request > 0.0 => {
                self.per_worker_requests_per_second * self.output_tokens_per_request / t
            }
            _ => self.per_worker_requests_per_second,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_keys_are_valid_configmap_keys_and_distinct() {
        let a = ThroughputProfile::key("s3://models/Qwen2.5-7B-Instruct/", "NVIDIA H100 80GB");
        let b = ThroughputProfile::key("s3://other/Qwen2.5-7B-Instruct", "NVIDIA H100 80GB");
        assert!(a.starts_with("Qwen2.5-7B-Instruct.NVIDIA-H100-80GB."), "{a}");
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)));
    }

    #[test]
    fn a_profile_averages_jobs_and_scales_by_output_length() {
        let mut p = ThroughputProfile::default();
        p.observe(2.0, 100.0, Some(30.0), "t1".into());
        assert_eq!((p.per_worker_requests_per_second, p.stddev, p.jobs), (2.0, 0.0, 1));
        p.observe(4.0, 100.0, None, "t2".into());
        assert!((p.per_worker_requests_per_second - 3.0).abs() < 1e-9);
        assert!((p.stddev - 1.0).abs() < 1e-9, "{}", p.stddev);
        assert_eq!(p.startup_seconds, Some(30.0));
        // Twice the output per request: half the requests per second.
        assert!((p.rate_for(Some(200.0)) - 1.5).abs() < 1e-9);
        assert!((p.rate_for(None) - 3.0).abs() < 1e-9);
    }
}
