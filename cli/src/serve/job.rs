//! The BatchInferenceJob a batch becomes, in both modes: its model's entry of the server config
//! (URI, dtype, sampling defaults, shard size), its input and output, its completion window,
//! and the workers the mode gives it.

use serde_json::{Value, json};

use super::config::ModelEntry;
use super::objects::BatchObject;

/// The job name of a batch (`batch_0a1b…` → `batch-0a1b…`, a valid Kubernetes name).
pub fn job_name(batch_id: &str) -> String {
    batch_id.replace('_', "-").to_ascii_lowercase()
}

/// Where the job reads and writes, and what the mode decides.
pub struct JobPlacement<'a> {
    pub input_uri: &'a str,
    pub output_uri: &'a str,
    /// `spec.workers`.
    pub workers: Value,
    /// `spec.storage`, when the mode needs one.
    pub storage: Option<Value>,
    /// Let the operator stop the job when its window ends (`sla.onDeadline: Expire`); a local
    /// server stops its own jobs at that time.
    pub expire_at_deadline: bool,
}

/// The `spec` of batch `b`'s job.
pub fn job_spec(model: &ModelEntry, b: &BatchObject, at: JobPlacement<'_>) -> Value {
    let mut model_spec = json!({"uri": model.uri, "dtype": model.dtype.clone().unwrap_or_else(|| "auto".into())});
    if let Some(d) = &model.kv_cache_dtype {
        model_spec["kvCacheDtype"] = json!(d.trim().to_ascii_lowercase());
    }
    if let Some(n) = model.max_model_len {
        model_spec["maxModelLen"] = json!(n);
    }
    let mut sampling = json!({});
    if let Some(n) = model.max_tokens {
        sampling["maxTokens"] = json!(n);
    }
    if let Some(t) = model.temperature {
        sampling["temperature"] = json!(t);
    }
    let mut workers = at.workers;
    if let Some(n) = model.max_batch_size {
        workers["maxBatchSize"] = json!(n);
    }
    // All the workers the server allows: a batch is done as soon as it can be.
    let mut sla = json!({"completionWindow": b.completion_window, "margin": 0.1, "policy": "Fastest"});
    if at.expire_at_deadline {
        sla["onDeadline"] = json!("Expire");
    }
    let mut spec = json!({
        "model": model_spec,
        "input": {"uri": at.input_uri, "format": "openai"},
        "output": {"uri": at.output_uri},
        "sampling": sampling,
        "sla": sla,
        "workers": workers,
        // A shard that fails after its retries (a model that does not load…) fails the batch:
        // what was committed is kept and every other request gets a `batch_failed` line.
        "retries": {"perShard": 2, "maxFailedShards": 0},
    });
    if let Some(n) = model.requests_per_shard {
        spec["sharding"] = json!({"requestsPerShard": n});
    }
    if let Some(s) = at.storage {
        spec["storage"] = s;
    }
    spec
}
