//! The desired `batch/v1` Job of a BatchInferenceJob (pure): Indexed, one completion per shard,
//! the worker environment contract, GPU resources, scheduling, a restricted security context, the
//! user's pod template merged over ours, and an owner reference. No client, no clock: unit-tested
//! from YAML fixtures.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecretEnvSource, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::Value;
use sluice_api::BatchInferenceJob;
use sluice_api::contract::{env, exit, layout};
use sluice_api::job::{Dtype, InputFormat};
use sluice_api::plan::ShardPlan;

use crate::error::{Error, Result};

/// Name of the worker container (the pod failure policy and the template merge key on it).
pub const WORKER_CONTAINER: &str = "worker";
/// Port of the worker's `/metrics` and `/healthz`.
pub const WORKER_METRICS_PORT: i32 = 9090;
/// Label naming the BatchInferenceJob on its Job and pods.
pub const JOB_LABEL: &str = "sluice.dev/job";
/// `app.kubernetes.io/name` of worker pods.
pub const WORKER_APP_NAME: &str = "sluice-worker";
/// Kueue's queue label.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// Where the worker caches object-store models.
pub const MODEL_CACHE_DIR: &str = "/var/cache/sluice";
/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "sluice-operator";

/// Operator-wide defaults for worker pods (from flags).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerDefaults {
    /// Image when `spec.workers.image` is unset.
    pub image: String,
    /// Extended resource requested per GPU, e.g. `nvidia.com/gpu`.
    pub gpu_resource_name: String,
    /// Node selector merged under the job's own.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations added before the job's own.
    pub tolerations: Vec<Toleration>,
}

impl Default for WorkerDefaults {
    fn default() -> Self {
        Self {
            image: "ghcr.io/sluice-dev/sluice-worker:latest".into(),
            gpu_resource_name: "nvidia.com/gpu".into(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
        }
    }
}

/// The Job's name: the BatchInferenceJob's own name when it fits a label value (63 characters),
/// otherwise a prefix plus a stable hash.
pub fn job_name(bij_name: &str) -> String {
    if bij_name.len() <= 63 {
        return bij_name.to_string();
    }
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bij_name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let prefix: String = bij_name.chars().take(46).collect();
    format!("{}-{h:016x}", prefix.trim_end_matches(['-', '.']))
}

/// Labels on the Job and its pods.
pub fn selector_labels(bij_name: &str) -> BTreeMap<String, String> {
    let value = if bij_name.len() <= 63 { bij_name.to_string() } else { job_name(bij_name) };
    BTreeMap::from([("app.kubernetes.io/name".to_string(), WORKER_APP_NAME.to_string()), (JOB_LABEL.to_string(), value)])
}

fn env_var(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.to_string(), value: Some(value.into()), value_from: None }
}

fn dtype_str(d: Dtype) -> &'static str {
    match d {
        Dtype::Auto => "auto",
        Dtype::Bf16 => "bf16",
        Dtype::F16 => "f16",
        Dtype::F32 => "f32",
    }
}

fn format_str(f: InputFormat) -> &'static str {
    match f {
        InputFormat::Auto => "auto",
        InputFormat::Openai => "openai",
        InputFormat::Prompts => "prompts",
    }
}

/// The worker's environment (the `sluice_api::contract::env` contract).
pub fn worker_env(bij: &BatchInferenceJob) -> Result<Vec<EnvVar>> {
    let spec = &bij.spec;
    let sampling = serde_json::to_string(&spec.sampling).map_err(|source| Error::Serialize { what: "spec.sampling", source })?;
    let mut vars = vec![
        env_var(env::JOB_NAME, bij.name_any()),
        EnvVar {
            name: env::ATTEMPT.to_string(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), api_version: None }),
                ..Default::default()
            }),
        },
        env_var(env::PLAN_URI, layout::join(&spec.output.uri, layout::PLAN)),
        env_var(env::INPUT_URI, &spec.input.uri),
        env_var(env::INPUT_FORMAT, format_str(spec.input.format)),
        env_var(env::OUTPUT_URI, &spec.output.uri),
        env_var(env::MODEL_URI, &spec.model.uri),
        env_var(env::MODEL_DTYPE, dtype_str(spec.model.dtype)),
    ];
    if let Some(n) = spec.model.max_model_len {
        vars.push(env_var(env::MAX_MODEL_LEN, n.to_string()));
    }
    vars.extend([
        env_var(env::MODEL_CACHE_DIR, MODEL_CACHE_DIR),
        env_var(env::SAMPLING, sampling),
        env_var(env::MAX_BATCH_SIZE, spec.workers.max_batch_size.to_string()),
        env_var(env::METRICS_ADDR, format!("0.0.0.0:{WORKER_METRICS_PORT}")),
        env_var(env::LOG_FORMAT, "json"),
    ]);
    if let Some(s) = &spec.storage {
        if let Some(v) = &s.endpoint {
            vars.push(env_var(env::STORAGE_ENDPOINT, v));
        }
        if let Some(v) = &s.region {
            vars.push(env_var(env::STORAGE_REGION, v));
        }
        if let Some(v) = s.path_style {
            vars.push(env_var(env::STORAGE_PATH_STYLE, v.to_string()));
        }
        if let Some(v) = s.allow_http {
            vars.push(env_var(env::STORAGE_ALLOW_HTTP, v.to_string()));
        }
    }
    if spec.workers.gpus == 0 {
        vars.push(env_var(env::DEVICE, "cpu"));
    }
    Ok(vars)
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}

fn worker_resources(bij: &BatchInferenceJob, defaults: &WorkerDefaults) -> Option<ResourceRequirements> {
    let mut res = bij.spec.workers.resources.clone().unwrap_or_default();
    if bij.spec.workers.gpus > 0 {
        let q = Quantity(bij.spec.workers.gpus.to_string());
        res.limits.get_or_insert_with(BTreeMap::new).insert(defaults.gpu_resource_name.clone(), q.clone());
        res.requests.get_or_insert_with(BTreeMap::new).insert(defaults.gpu_resource_name.clone(), q);
    }
    (res != ResourceRequirements::default()).then_some(res)
}

/// The generated pod template, before the user's override is merged.
fn base_template(bij: &BatchInferenceJob, defaults: &WorkerDefaults) -> Result<PodTemplateSpec> {
    let spec = &bij.spec;
    let mut envs = worker_env(bij)?;
    envs.sort_by(|a, b| a.name.cmp(&b.name));
    let env_from = spec.storage.as_ref().and_then(|s| s.secret_ref.as_ref()).map(|r| {
        vec![EnvFromSource { secret_ref: Some(SecretEnvSource { name: r.name.clone(), optional: Some(false) }), ..Default::default()}]
    });
    let container = Container {
        name: WORKER_CONTAINER.into(),
        image: Some(spec.workers.image.clone().unwrap_or_else(|| defaults.image.clone())),
        env: Some(envs),
        env_from,
        ports: Some(vec![ContainerPort { name: Some("metrics".into()), container_port: WORKER_METRICS_PORT, protocol: Some("TCP".into()), ..Default::default() }]),
        resources: worker_resources(bij, defaults),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![VolumeMount { name: "model-cache".into(), mount_path: MODEL_CACHE_DIR.into(), ..Default::default() }]),
        ..Default::default()
    };
    let mut node_selector = defaults.node_selector.clone();
    node_selector.extend(spec.workers.node_selector.clone().unwrap_or_default());
    let mut tolerations = defaults.tolerations.clone();
    tolerations.extend(spec.workers.tolerations.clone().unwrap_or_default());
    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(selector_labels(&bij.name_any())), ..Default::default() }),
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            priority_class_name: spec.workers.priority_class_name.clone(),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
                ..Default::default()
            }),
            volumes: Some(vec![Volume { name: "model-cache".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }]),
            ..Default::default()
        }),
    })
}

/// Merge `over` into `base`: objects merge key by key; arrays whose items all carry a `name`
/// (containers, volumes, env, volumeMounts, ports, …) merge item by item on that name, new
/// items appended; any other value in `over` replaces the one in `base`.
pub fn merge_json(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) if !v.is_null() => merge_json(existing, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(o)) if named(b) && named(o) => {
            for item in o {
                let name = item.get("name").cloned();
                match b.iter_mut().find(|x| x.get("name") == name.as_ref()) {
                    Some(existing) => merge_json(existing, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn named(items: &[Value]) -> bool {
    items.iter().all(|i| i.get("name").is_some_and(Value::is_string))
}

/// The generated template with `spec.workers.podTemplate` merged over it. The restart policy
/// stays `Never` (the pod failure policy needs it) and the selector labels stay ours.
pub fn pod_template(bij: &BatchInferenceJob, defaults: &WorkerDefaults) -> Result<PodTemplateSpec> {
    let base = base_template(bij, defaults)?;
    let Some(over) = &bij.spec.workers.pod_template else { return Ok(base) };
    let ser = |what: &'static str| move |source| Error::Serialize { what, source };
    let mut merged = serde_json::to_value(&base).map_err(ser("the pod template"))?;
    let over = serde_json::to_value(over).map_err(ser("spec.workers.podTemplate"))?;
    merge_json(&mut merged, &over);
    let mut t: PodTemplateSpec = serde_json::from_value(merged)
        .map_err(|e| Error::InvalidSpec { field: "spec.workers.podTemplate".into(), reason: format!("merged template is not a pod template: {e}") })?;
    if let Some(spec) = t.spec.as_mut() {
        spec.restart_policy = Some("Never".into());
    }
    let labels = t.metadata.get_or_insert_with(Default::default).labels.get_or_insert_with(Default::default);
    labels.extend(selector_labels(&bij.name_any()));
    Ok(t)
}

/// The pod failure policy: a disrupted pod (preemption, eviction, node drain) does not count
/// against the shard's retries; the worker's permanent-error exit code fails the shard at once.
pub fn pod_failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern { type_: "DisruptionTarget".into(), status: "True".into() }]),
                on_exit_codes: None,
            },
            PodFailurePolicyRule {
                action: "FailIndex".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some(WORKER_CONTAINER.into()),
                    operator: "In".into(),
                    values: vec![exit::PERMANENT],
                }),
                on_pod_conditions: None,
            },
        ],
    }
}

/// Whether the operator sets `spec.suspend` of the Job. With a Kueue queue, Kueue admits the
/// Job by unsuspending it; the operator then only ever suspends it (on `spec.suspend`).
pub fn desired_suspend(bij: &BatchInferenceJob) -> bool {
    bij.spec.suspend || bij.spec.queue_name.as_deref().is_some_and(|q| !q.is_empty())
}

/// The full desired Job, applied once with server-side apply when it does not exist.
pub fn desired_job(bij: &BatchInferenceJob, plan: &ShardPlan, parallelism: i32, defaults: &WorkerDefaults) -> Result<Job> {
    let name = bij.name_any();
    let completions = i32::try_from(plan.shards.len())
        .map_err(|_| Error::InvalidSpec { field: "spec.sharding".into(), reason: format!("{} shards do not fit a Job", plan.shards.len()) })?;
    let owner = bij
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidSpec { field: "metadata".into(), reason: "the BatchInferenceJob has no uid yet".into() })?;
    let mut labels = selector_labels(&name);
    labels.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    if let Some(q) = bij.spec.queue_name.as_deref().filter(|q| !q.is_empty()) {
        labels.insert(KUEUE_QUEUE_LABEL.into(), q.into());
    }
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(&name)),
            namespace: bij.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            completion_mode: Some("Indexed".into()),
            completions: Some(completions),
            parallelism: Some(parallelism.clamp(0, completions)),
            backoff_limit_per_index: Some(bij.spec.retries.per_shard),
            max_failed_indexes: Some(bij.spec.retries.max_failed_shards.min(completions)),
            pod_failure_policy: Some(pod_failure_policy()),
            suspend: Some(desired_suspend(bij)),
            ttl_seconds_after_finished: bij.spec.ttl_seconds_after_finished,
            template: pod_template(bij, defaults)?,
            ..Default::default()
        }),
        status: None,
    })
}

/// The scaling fields of an existing Job the reconciler keeps in line: `(parallelism, suspend)`.
/// `None` for suspend means "leave it" (Kueue owns it while the job is not suspended).
pub fn scaling_patch(bij: &BatchInferenceJob, observed: &Job, parallelism: i32) -> Option<Value> {
    let spec = observed.spec.as_ref();
    let completions = spec.and_then(|s| s.completions).unwrap_or(0);
    let want_parallelism = parallelism.clamp(0, completions.max(0));
    let have_parallelism = spec.and_then(|s| s.parallelism).unwrap_or(1);
    let have_suspend = spec.and_then(|s| s.suspend).unwrap_or(false);
    let kueue = bij.spec.queue_name.as_deref().is_some_and(|q| !q.is_empty());
    let want_suspend = if kueue && !bij.spec.suspend { have_suspend } else { bij.spec.suspend };
    let mut patch = serde_json::Map::new();
    if want_parallelism != have_parallelism {
        patch.insert("parallelism".into(), want_parallelism.into());
    }
    if want_suspend != have_suspend {
        patch.insert("suspend".into(), want_suspend.into());
    }
    (!patch.is_empty()).then(|| serde_json::json!({ "spec": patch }))
}
