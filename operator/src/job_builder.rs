//! The desired `batch/v1` Job of a BatchInferenceJob (pure): Indexed, one completion per shard,
//! the worker environment contract, GPU resources, scheduling, a restricted security context, the
//! user's pod template merged over ours, and an owner reference; and the one-pod plan and
//! finalize Jobs of jobs whose storage only their pods can reach. No client, no clock:
//! unit-tested from YAML fixtures.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource, KeyToPath,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecretEnvSource,
    SecretVolumeSource, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::Value;
use sluice_api::BatchInferenceJob;
use sluice_api::contract::{WorkerInvocation, env, exit};
use sluice_api::job::{CaBundleSpec, NotRun};
use sluice_api::plan::PlanSummary;
use sluice_api::report::report_path;

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
/// Where worker pods get `spec.storage.caBundle`, mounted read-only (a directory mount, not a
/// `subPath`, so an edit of the ConfigMap or Secret reaches running pods).
pub const STORAGE_CA_DIR: &str = "/etc/sluice/ca";
/// The bundle's file name in [`STORAGE_CA_DIR`], whatever its key.
pub const STORAGE_CA_FILE_NAME: &str = "ca.crt";
/// Name of the CA bundle's volume.
const STORAGE_CA_VOLUME: &str = "storage-ca";
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
    /// Base URL of the operator's report endpoint as the job's pods reach it (needed by jobs
    /// whose storage only their pods can reach).
    pub report_url: Option<String>,
}

impl Default for WorkerDefaults {
    fn default() -> Self {
        Self {
            image: "ghcr.io/sluice-dev/sluice-worker:latest".into(),
            gpu_resource_name: "nvidia.com/gpu".into(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            report_url: None,
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

/// What a worker pod of this job is told ([`WorkerInvocation::for_job`] with a pod's settings).
pub fn worker_invocation(bij: &BatchInferenceJob) -> WorkerInvocation {
    WorkerInvocation::for_job(bij.name_any(), &bij.spec, MODEL_CACHE_DIR, &format!("0.0.0.0:{WORKER_METRICS_PORT}"))
}

/// The worker's environment: the invocation's variables, plus the attempt name from the pod's
/// own name (downward API).
pub fn worker_env(bij: &BatchInferenceJob) -> Result<Vec<EnvVar>> {
    let vars = worker_invocation(bij).to_env().map_err(|source| Error::Serialize { what: "spec.sampling", source })?;
    let mut envs: Vec<EnvVar> = vars.into_iter().map(|(name, value)| env_var(name, value)).collect();
    let attempt = EnvVar {
        name: env::ATTEMPT.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), api_version: None }),
            ..Default::default()
        }),
    };
    envs.insert(1.min(envs.len()), attempt);
    Ok(envs)
}

/// Label naming the BatchInferenceJob on its plan and finalize Jobs and their pods (kept apart
/// from [`JOB_LABEL`], so those pods never count as workers).
pub const STEP_OF_LABEL: &str = "sluice.dev/step-of";
/// The step a plan or finalize pod runs.
pub const STEP_LABEL: &str = "sluice.dev/step";

/// The reporting environment of a job whose storage only its pods can reach: where to POST
/// (the operator's report URL plus the job's path) and the job's token (its uid). Empty for
/// other jobs.
pub fn report_env(bij: &BatchInferenceJob, defaults: &WorkerDefaults) -> Result<Vec<EnvVar>> {
    if !bij.spec.storage_only_in_pods() {
        return Ok(Vec::new());
    }
    let base = defaults.report_url.as_deref().filter(|u| !u.is_empty()).ok_or_else(|| Error::InvalidSpec {
        field: "spec.output.uri".into(),
        reason: "the job's storage is a path only its pods can reach, so its pods report to the operator, but the operator \
                 has no --report-url (set it to an address of the operator that pods can reach)"
            .into(),
    })?;
    let uid =
        bij.uid().ok_or_else(|| Error::InvalidSpec { field: "metadata".into(), reason: "the BatchInferenceJob has no uid yet".into() })?;
    let ns = namespace_of(bij)?;
    Ok(vec![
        env_var(env::REPORT_URL, format!("{}{}", base.trim_end_matches('/'), report_path(&ns, &bij.name_any()))),
        env_var(env::REPORT_TOKEN, uid),
    ])
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

/// The volume holding `spec.storage.caBundle`'s key as [`STORAGE_CA_FILE_NAME`].
fn ca_bundle_volume(ca: &CaBundleSpec) -> Volume {
    let items = Some(vec![KeyToPath { key: ca.key.clone(), path: STORAGE_CA_FILE_NAME.into(), mode: None }]);
    let mut volume = Volume { name: STORAGE_CA_VOLUME.into(), ..Default::default() };
    match (&ca.config_map_ref, &ca.secret_ref) {
        (Some(cm), _) => {
            volume.config_map = Some(ConfigMapVolumeSource { name: cm.name.clone(), items, optional: Some(false), ..Default::default() })
        }
        (None, Some(secret)) => {
            volume.secret =
                Some(SecretVolumeSource { secret_name: Some(secret.name.clone()), items, optional: Some(false), ..Default::default() })
        }
        // The CRD's rule requires exactly one; without either there is nothing to mount.
        (None, None) => volume.empty_dir = Some(EmptyDirVolumeSource::default()),
    }
    volume
}

/// The generated pod template, before the user's override is merged.
fn base_template(bij: &BatchInferenceJob, defaults: &WorkerDefaults) -> Result<PodTemplateSpec> {
    let spec = &bij.spec;
    let mut envs = worker_env(bij)?;
    envs.extend(report_env(bij, defaults)?);
    let mut volumes = vec![Volume { name: "model-cache".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }];
    let mut volume_mounts = vec![VolumeMount { name: "model-cache".into(), mount_path: MODEL_CACHE_DIR.into(), ..Default::default() }];
    // The CA bundle is a pod thing (a mounted file), not part of `worker_env`, which local mode
    // shares: there the worker inherits `SLUICE_STORAGE_CA_FILE` from `sluice run`'s environment.
    if let Some(ca) = spec.storage.as_ref().and_then(|s| s.ca_bundle.as_ref()) {
        volumes.push(ca_bundle_volume(ca));
        volume_mounts.push(VolumeMount {
            name: STORAGE_CA_VOLUME.into(),
            mount_path: STORAGE_CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        envs.push(env_var(env::STORAGE_CA_FILE, format!("{STORAGE_CA_DIR}/{STORAGE_CA_FILE_NAME}")));
    }
    envs.sort_by(|a, b| a.name.cmp(&b.name));
    let env_from = spec.storage.as_ref().and_then(|s| s.secret_ref.as_ref()).map(|r| {
        vec![EnvFromSource { secret_ref: Some(SecretEnvSource { name: r.name.clone(), optional: Some(false) }), ..Default::default() }]
    });
    let container = Container {
        name: WORKER_CONTAINER.into(),
        image: Some(spec.workers.image.clone().unwrap_or_else(|| defaults.image.clone())),
        env: Some(envs),
        env_from,
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: WORKER_METRICS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: worker_resources(bij, defaults),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(volume_mounts),
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
            volumes: Some(volumes),
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
    let mut t: PodTemplateSpec = serde_json::from_value(merged).map_err(|e| Error::InvalidSpec {
        field: "spec.workers.podTemplate".into(),
        reason: format!("merged template is not a pod template: {e}"),
    })?;
    if let Some(spec) = t.spec.as_mut() {
        spec.restart_policy = Some("Never".into());
    }
    let labels = t.metadata.get_or_insert_with(Default::default).labels.get_or_insert_with(Default::default);
    labels.extend(selector_labels(&bij.name_any()));
    Ok(t)
}

/// A pod failure policy that does not count a disrupted pod (preemption, eviction, node drain)
/// against the retries, and takes `on_permanent` (`FailIndex` for shards, `FailJob` for the
/// one-pod steps) when the worker exits with its permanent-error code.
fn failure_policy(on_permanent: &str) -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
                on_exit_codes: None,
            },
            PodFailurePolicyRule {
                action: on_permanent.into(),
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

/// The pod failure policy of the shards: a disrupted pod does not count against the shard's
/// retries; the worker's permanent-error exit code fails the shard at once.
pub fn pod_failure_policy() -> PodFailurePolicy {
    failure_policy("FailIndex")
}

/// Whether the operator sets `spec.suspend` of the Job. With a Kueue queue, Kueue admits the
/// Job by unsuspending it; the operator then only ever suspends it (on `spec.suspend`).
pub fn desired_suspend(bij: &BatchInferenceJob) -> bool {
    bij.spec.suspend || bij.spec.queue_name.as_deref().is_some_and(|q| !q.is_empty())
}

/// The full desired Job, applied once with server-side apply when it does not exist.
pub fn desired_job(bij: &BatchInferenceJob, plan: &PlanSummary, parallelism: i32, defaults: &WorkerDefaults) -> Result<Job> {
    let name = bij.name_any();
    let completions = i32::try_from(plan.shards)
        .map_err(|_| Error::InvalidSpec { field: "spec.sharding".into(), reason: format!("{} shards do not fit a Job", plan.shards) })?;
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

/// The steps a job's own pods run besides its shards: plan and finalize when only they can reach
/// its storage, close for every cancelled or expired job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Plan the input (`sluice-worker plan`).
    Plan,
    /// Write the manifest (`sluice-worker finalize`).
    Finalize,
    /// Commit every request that never ran as an error, then write the manifest
    /// (`sluice-worker close`).
    Close,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Plan => "plan",
            Step::Finalize => "finalize",
            Step::Close => "close",
        }
    }
}

/// The name of a job's plan or finalize Job (stable, at most 63 characters).
pub fn step_job_name(bij_name: &str, step: Step) -> String {
    job_name(&format!("{bij_name}-{}", step.as_str()))
}

/// A one-pod Job that runs `step` in the job's own pod template (same image, volumes, Secret,
/// node placement), without the worker's GPUs. `extra_env` adds the step's inputs. Exit code 3
/// fails it at once; a disruption does not count against its retries.
pub fn step_job(bij: &BatchInferenceJob, defaults: &WorkerDefaults, step: Step, extra_env: Vec<EnvVar>) -> Result<Job> {
    let name = bij.name_any();
    let mut template = pod_template(bij, defaults)?;
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), WORKER_APP_NAME.to_string()),
        (STEP_OF_LABEL.to_string(), selector_labels(&name)[JOB_LABEL].clone()),
        (STEP_LABEL.to_string(), step.as_str().to_string()),
    ]);
    let meta = template.metadata.get_or_insert_with(Default::default);
    let pod_labels = meta.labels.get_or_insert_with(Default::default);
    pod_labels.remove(JOB_LABEL);
    pod_labels.extend(labels.clone());
    let spec = template.spec.get_or_insert_with(Default::default);
    if let Some(c) = spec.containers.iter_mut().find(|c| c.name == WORKER_CONTAINER) {
        c.args = Some(vec![step.as_str().to_string()]);
        c.ports = None;
        let env = c.env.get_or_insert_with(Vec::new);
        env.retain(|e| !extra_env.iter().any(|x| x.name == e.name));
        env.extend(extra_env);
        env.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(res) = c.resources.as_mut() {
            for m in [res.limits.as_mut(), res.requests.as_mut()].into_iter().flatten() {
                m.remove(&defaults.gpu_resource_name);
            }
        }
    }
    let owner = bij
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidSpec { field: "metadata".into(), reason: "the BatchInferenceJob has no uid yet".into() })?;
    let mut job_labels = labels;
    job_labels.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(step_job_name(&name, step)),
            namespace: bij.namespace(),
            labels: Some(job_labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            completions: Some(1),
            parallelism: Some(1),
            backoff_limit: Some(3),
            pod_failure_policy: Some(failure_policy("FailJob")),
            template,
            ..Default::default()
        }),
        status: None,
    })
}

/// The inputs of the plan step.
pub fn plan_step_env(bij: &BatchInferenceJob) -> Vec<EnvVar> {
    let mut v = vec![env_var(env::MAX_WORKERS, bij.spec.workers.max.to_string())];
    if let Some(n) = bij.spec.sharding.requests_per_shard {
        v.push(env_var(env::REQUESTS_PER_SHARD, n.to_string()));
    }
    v
}

/// The job's namespace. BatchInferenceJob is namespaced, so the API server always sets one; a
/// job without one (a malformed object) is an error naming it, never the namespace `""`.
pub fn namespace_of(bij: &BatchInferenceJob) -> Result<String> {
    bij.namespace().filter(|ns| !ns.is_empty()).ok_or_else(|| Error::InvalidSpec {
        field: "metadata.namespace".into(),
        reason: format!("the BatchInferenceJob {} has no namespace", bij.name_any()),
    })
}

/// The inputs of the finalize step: the shards that failed within the tolerance.
pub fn finalize_step_env(bij: &BatchInferenceJob, failed: &BTreeSet<u32>) -> Result<Vec<EnvVar>> {
    let ns = namespace_of(bij)?;
    Ok(vec![
        env_var(env::FAILED_SHARDS, sluice_api::plan::format_index_ranges(failed)),
        env_var(env::SPEC_INPUT_URI, bij.spec.input.uri.clone()),
        env_var(env::JOB_NAME, format!("{ns}/{}", bij.name_any())),
    ])
}

/// The inputs of the close step: the finalize step's, the code of the requests that never ran,
/// and which shards to close (`None`: every shard not in `failed`).
pub fn close_step_env(
    bij: &BatchInferenceJob,
    failed: &BTreeSet<u32>,
    code: NotRun,
    shards: Option<&BTreeSet<u32>>,
) -> Result<Vec<EnvVar>> {
    let mut v = finalize_step_env(bij, failed)?;
    v.push(env_var(env::CLOSE_CODE, code.code().to_string()));
    if let Some(s) = shards {
        v.push(env_var(env::CLOSE_SHARDS, sluice_api::plan::format_index_ranges(s)));
    }
    Ok(v)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn load(name: &str) -> BatchInferenceJob {
        serde_yaml::from_str(&fixture(name)).unwrap()
    }

    fn plan() -> PlanSummary {
        serde_json::from_str::<sluice_api::plan::ShardPlan>(&fixture("plan-3.json")).unwrap().summary()
    }

    fn env_of(c: &Container) -> BTreeMap<String, EnvVar> {
        c.env.iter().flatten().map(|e| (e.name.clone(), e.clone())).collect()
    }

    #[test]
    fn a_job_without_a_namespace_is_an_error_naming_it() {
        let mut bij = load("bij-gpu.yaml");
        assert_eq!(namespace_of(&bij).unwrap(), "research");
        bij.metadata.namespace = None;
        let err = namespace_of(&bij).unwrap_err().to_string();
        assert!(err.contains("metadata.namespace") && err.contains("eval-run-42"), "{err}");
        assert!(finalize_step_env(&bij, &BTreeSet::new()).is_err());
    }

    #[test]
    fn gpu_job_has_the_full_shape() {
        let bij = load("bij-gpu.yaml");
        let defaults =
            WorkerDefaults { node_selector: BTreeMap::from([("pool".to_string(), "gpu".to_string())]), ..WorkerDefaults::default() };
        let job = desired_job(&bij, &plan(), 4, &defaults).unwrap();
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(v["apiVersion"], "batch/v1");
        assert_eq!(v["kind"], "Job");
        assert_eq!(v["metadata"]["name"], "eval-run-42");
        assert_eq!(v["metadata"]["namespace"], "research");
        let labels = &v["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/name"], "sluice-worker");
        assert_eq!(labels["sluice.dev/job"], "eval-run-42");
        assert_eq!(labels["kueue.x-k8s.io/queue-name"], "team-a");
        let owner = &v["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["name"].as_str(), owner["controller"].as_bool()),
            (Some("BatchInferenceJob"), Some("eval-run-42"), Some(true))
        );
        assert_eq!(owner["uid"], "7f9c2d4e-0000-4000-8000-000000000042");

        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!((spec.completions, spec.parallelism), (Some(3), Some(3)), "parallelism is capped at the shard count");
        assert_eq!((spec.backoff_limit_per_index, spec.max_failed_indexes), (Some(2), Some(1)));
        assert_eq!(spec.ttl_seconds_after_finished, Some(3600));
        // Kueue admits the Job by unsuspending it.
        assert_eq!(spec.suspend, Some(true));
        let rules = &v["spec"]["podFailurePolicy"]["rules"];
        assert_eq!(rules[0]["action"], "Ignore");
        assert_eq!(rules[0]["onPodConditions"][0]["type"], "DisruptionTarget");
        assert_eq!(rules[1]["action"], "FailIndex");
        assert_eq!(rules[1]["onExitCodes"]["containerName"], "worker");
        assert_eq!(rules[1]["onExitCodes"]["values"][0], exit::PERMANENT);

        let tmpl = &spec.template;
        let meta = tmpl.metadata.as_ref().unwrap();
        assert_eq!(meta.labels.as_ref().unwrap()["sluice.dev/job"], "eval-run-42");
        assert_eq!(meta.labels.as_ref().unwrap()["team"], "research");
        assert_eq!(meta.annotations.as_ref().unwrap()["example.com/team"], "research");
        let pod = tmpl.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.service_account_name.as_deref(), Some("eval-runner"));
        assert_eq!(pod.priority_class_name.as_deref(), Some("batch-low"));
        let ns = pod.node_selector.as_ref().unwrap();
        assert_eq!((ns["pool"].as_str(), ns["gpu.example.com/class"].as_str()), ("gpu", "a100"));
        assert_eq!(pod.tolerations.as_ref().unwrap()[0].key.as_deref(), Some("nvidia.com/gpu"));
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let volumes: Vec<&str> = pod.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        assert_eq!(volumes, ["model-cache", "storage-ca", "data"]);
        // spec.storage.caBundle: the ConfigMap's key (default `ca.crt`), read-only.
        let ca = pod.volumes.as_ref().unwrap()[1].config_map.as_ref().unwrap();
        assert_eq!((ca.name.as_str(), ca.optional), ("minio-ca", Some(false)));
        let item = &ca.items.as_ref().unwrap()[0];
        assert_eq!((item.key.as_str(), item.path.as_str()), ("ca.crt", STORAGE_CA_FILE_NAME));

        let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["worker", "sidecar"]);
        let w = &pod.containers[0];
        assert_eq!(w.image.as_deref(), Some("registry.example.com/sluice-worker:v1"));
        assert_eq!(w.ports.as_ref().unwrap()[0].container_port, 9090);
        let sc = w.security_context.as_ref().unwrap();
        assert_eq!((sc.run_as_non_root, sc.allow_privilege_escalation), (Some(true), Some(false)));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let res = w.resources.as_ref().unwrap();
        assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "2");
        assert_eq!(res.requests.as_ref().unwrap()["nvidia.com/gpu"].0, "2");
        assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "4");
        assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "32Gi");
        let mounts: Vec<&str> = w.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
        assert_eq!(mounts, [MODEL_CACHE_DIR, STORAGE_CA_DIR, "/data"]);
        assert_eq!(w.volume_mounts.as_ref().unwrap()[1].read_only, Some(true));
        assert_eq!(w.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name, "s3-creds");

        let env = env_of(w);
        let val = |k: &str| env[k].value.clone().unwrap_or_default();
        assert_eq!(val(env::PLAN_URI), "s3://evals/run-42/out/_sluice/plan.json");
        assert_eq!(val(env::INPUT_URI), "s3://evals/run-42/prompts.jsonl");
        assert_eq!(val(env::INPUT_FORMAT), "prompts");
        assert_eq!(val(env::OUTPUT_URI), "s3://evals/run-42/out/");
        assert_eq!(val(env::MODEL_URI), "s3://models/Llama-3.2-1B-Instruct/");
        assert_eq!(val(env::MODEL_DTYPE), "bf16");
        assert_eq!(val(env::KV_CACHE_DTYPE), "fp8");
        assert_eq!(val(env::MAX_MODEL_LEN), "4096");
        assert_eq!(val(env::MAX_BATCH_SIZE), "128");
        assert_eq!(val(env::STORAGE_ENDPOINT), "http://minio.minio:9000");
        assert_eq!(val(env::STORAGE_REGION), "us-east-1");
        assert_eq!(val(env::STORAGE_PATH_STYLE), "true");
        assert_eq!(val(env::STORAGE_ALLOW_HTTP), "true");
        assert_eq!(val(env::STORAGE_CA_FILE), "/etc/sluice/ca/ca.crt");
        assert_eq!(val(env::METRICS_ADDR), "0.0.0.0:9090");
        assert_eq!(val(env::JOB_NAME), "eval-run-42");
        // The override replaced the value of a generated variable and added one.
        assert_eq!(val(env::LOG_FORMAT), "text");
        assert_eq!(val("HF_HOME"), "/data/hf");
        assert_eq!(env[env::ATTEMPT].value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "metadata.name");
        let sampling: serde_json::Value = serde_json::from_str(&val(env::SAMPLING)).unwrap();
        assert_eq!(
            (sampling["maxTokens"].as_u64(), sampling["topK"].as_u64(), sampling["stop"][0].as_str()),
            (Some(256), Some(50), Some("\n\n"))
        );
        assert!(!env.contains_key(env::DEVICE));
    }

    fn reporting() -> WorkerDefaults {
        WorkerDefaults { report_url: Some("http://sluice-operator.sluice-system.svc:8080/".into()), ..Default::default() }
    }

    #[test]
    fn cpu_job_is_suspended_without_gpu_resources() {
        let bij = load("bij-cpu.yaml");
        let job = desired_job(&bij, &plan(), 1, &WorkerDefaults { image: "sluice-worker:dev".into(), ..reporting() }).unwrap();
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.suspend, Some(true));
        assert_eq!(spec.parallelism, Some(1));
        assert_eq!((spec.backoff_limit_per_index, spec.max_failed_indexes), (Some(3), Some(0)));
        assert!(!job.metadata.labels.as_ref().unwrap().contains_key(KUEUE_QUEUE_LABEL));
        let pod = spec.template.spec.as_ref().unwrap();
        let w = &pod.containers[0];
        assert_eq!(w.image.as_deref(), Some("sluice-worker:dev"));
        assert!(w.resources.is_none());
        assert!(w.env_from.is_none());
        assert!(pod.node_selector.is_none() && pod.tolerations.is_none() && pod.priority_class_name.is_none());
        let env = env_of(w);
        assert_eq!(env[env::DEVICE].value.as_deref(), Some("cpu"));
        assert_eq!(env[env::PLAN_URI].value.as_deref(), Some("file:///data/out/quickstart/_sluice/plan.json"));
        assert!(!env.contains_key(env::STORAGE_ENDPOINT) && !env.contains_key(env::MAX_MODEL_LEN));
        assert!(!env.contains_key(env::STORAGE_CA_FILE) && !env.contains_key(env::KV_CACHE_DTYPE));
        assert_eq!(pod.volumes.iter().flatten().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["model-cache"]);
        // file:// storage: only the pods reach it, so they report to the operator with the uid.
        assert_eq!(
            env[env::REPORT_URL].value.as_deref(),
            Some("http://sluice-operator.sluice-system.svc:8080/v1/jobs/default/quickstart/reports")
        );
        assert_eq!(env[env::REPORT_TOKEN].value, bij.uid());
    }

    #[test]
    fn pod_only_storage_needs_a_report_url_and_object_storage_reports_nothing() {
        let bij = load("bij-cpu.yaml");
        let err = desired_job(&bij, &plan(), 1, &WorkerDefaults::default()).unwrap_err();
        assert!(err.to_string().contains("--report-url"), "{err}");
        let gpu = load("bij-gpu.yaml");
        let job = desired_job(&gpu, &plan(), 1, &reporting()).unwrap();
        let env = env_of(&job.spec.unwrap().template.spec.unwrap().containers[0]);
        assert!(!env.contains_key(env::REPORT_URL) && !env.contains_key(env::REPORT_TOKEN));
    }

    #[test]
    fn plan_and_finalize_steps_run_in_the_job_template_without_gpus() {
        let mut bij = load("bij-gpu.yaml");
        bij.spec.input.uri = "file:///data/in.jsonl".into();
        let job = step_job(&bij, &reporting(), Step::Plan, plan_step_env(&bij)).unwrap();
        assert_eq!(job.metadata.name.as_deref(), Some(step_job_name(&bij.name_any(), Step::Plan).as_str()));
        let labels = job.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], FIELD_MANAGER);
        assert_eq!(labels[STEP_LABEL], "plan");
        let spec = job.spec.as_ref().unwrap();
        assert_eq!((spec.completions, spec.completion_mode.as_deref(), spec.backoff_limit), (Some(1), None, Some(3)));
        let rules = &spec.pod_failure_policy.as_ref().unwrap().rules;
        assert!(rules.iter().any(|r| r.action == "FailJob" && r.on_exit_codes.as_ref().is_some_and(|c| c.values == [exit::PERMANENT])));
        let t = &spec.template;
        let pod_labels = t.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert!(!pod_labels.contains_key(JOB_LABEL), "step pods must not count as workers: {pod_labels:?}");
        let pod = t.spec.as_ref().unwrap();
        let w = &pod.containers[0];
        assert_eq!(w.args.as_deref(), Some(&["plan".to_string()][..]));
        let res = w.resources.as_ref().unwrap();
        assert!(res.limits.iter().chain(res.requests.iter()).all(|m| !m.contains_key("nvidia.com/gpu")), "{res:?}");
        let env = env_of(w);
        assert_eq!(env[env::MAX_WORKERS].value.as_deref(), Some(bij.spec.workers.max.to_string().as_str()));
        assert!(env[env::REPORT_URL].value.as_deref().unwrap().ends_with("/reports"));
        // The user's volumes (where the storage is) come along.
        let worker = desired_job(&bij, &plan(), 1, &reporting()).unwrap();
        assert_eq!(pod.volumes, worker.spec.unwrap().template.spec.unwrap().volumes);
        let fin = step_job(&bij, &reporting(), Step::Finalize, finalize_step_env(&bij, &BTreeSet::from([1, 2, 3, 7])).unwrap()).unwrap();
        let env = env_of(&fin.spec.unwrap().template.spec.unwrap().containers[0]);
        assert_eq!(env[env::FAILED_SHARDS].value.as_deref(), Some("1-3,7"));
        assert_eq!(step_job_name(&"x".repeat(70), Step::Finalize).len(), 63);
    }

    #[test]
    fn a_ca_bundle_in_a_secret_is_mounted_from_its_key() {
        let mut bij = load("bij-gpu.yaml");
        let storage = bij.spec.storage.as_mut().unwrap();
        storage.ca_bundle = Some(CaBundleSpec { key: "bundle.pem".into(), ..CaBundleSpec::secret("ceph-ca") });
        let job = desired_job(&bij, &plan(), 1, &WorkerDefaults::default()).unwrap();
        let pod = job.spec.unwrap().template.spec.unwrap();
        let volume = pod.volumes.iter().flatten().find(|v| v.name == "storage-ca").unwrap();
        assert!(volume.config_map.is_none());
        let secret = volume.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("ceph-ca"));
        let item = &secret.items.as_ref().unwrap()[0];
        assert_eq!((item.key.as_str(), item.path.as_str()), ("bundle.pem", "ca.crt"));
        // Local mode shares `worker_env`: the mount path is not part of it.
        assert!(worker_env(&bij).unwrap().iter().all(|e| e.name != env::STORAGE_CA_FILE));
    }

    #[test]
    fn a_job_without_uid_cannot_be_owned() {
        let mut bij = load("bij-cpu.yaml");
        bij.metadata.uid = None;
        let err = desired_job(&bij, &plan(), 1, &reporting()).unwrap_err();
        assert!(err.to_string().contains("no uid"), "{err}");
    }

    #[test]
    fn scaling_patch_only_names_what_differs() {
        let mut bij = load("bij-cpu.yaml");
        bij.spec.suspend = false;
        let job = desired_job(&bij, &plan(), 2, &reporting()).unwrap();
        assert_eq!(scaling_patch(&bij, &job, 2), None);
        assert_eq!(scaling_patch(&bij, &job, 3), Some(serde_json::json!({"spec": {"parallelism": 3}})));
        assert_eq!(scaling_patch(&bij, &job, 9), Some(serde_json::json!({"spec": {"parallelism": 3}})), "capped at completions");
        bij.spec.suspend = true;
        assert_eq!(scaling_patch(&bij, &job, 2), Some(serde_json::json!({"spec": {"suspend": true}})));
        // With a Kueue queue the operator never unsuspends: Kueue admits.
        let kueue = load("bij-gpu.yaml");
        let job = desired_job(&kueue, &plan(), 2, &WorkerDefaults::default()).unwrap();
        assert_eq!(scaling_patch(&kueue, &job, 2), None);
    }

    #[test]
    fn long_names_are_shortened_stably() {
        let long = "a".repeat(80);
        let n = job_name(&long);
        assert!(n.len() <= 63, "{n}");
        assert_eq!(n, job_name(&long));
        assert_ne!(n, job_name(&"a".repeat(81)));
        assert_eq!(job_name("short"), "short");
    }

    #[test]
    fn merge_by_name_and_replace_otherwise() {
        let mut base = serde_json::json!({"a": [{"name": "x", "v": 1}], "b": [1, 2], "c": {"d": 1}});
        merge_json(&mut base, &serde_json::json!({"a": [{"name": "x", "w": 2}, {"name": "y"}], "b": [3], "c": {"e": 2}}));
        assert_eq!(base, serde_json::json!({"a": [{"name": "x", "v": 1, "w": 2}, {"name": "y"}], "b": [3], "c": {"d": 1, "e": 2}}));
    }
}
