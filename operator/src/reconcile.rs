//! One reconcile of a BatchInferenceJob: plan, then observe (the Job, its pods, the shards'
//! progress) → decide ([`decide`], pure: phase, scaling step, Job change, Events) → act (apply
//! the Job, publish, write the manifest and the status).
//! Finalizer-wrapped (cleanup only forgets the job: owner references delete the Job, the output
//! is never deleted). Writes only what differs from what it observed, so a resync is free.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use sluice_api::BatchInferenceJob;
use sluice_api::BatchInferenceJobStatus;
use sluice_api::contract::layout;
use sluice_api::deadline::effective_deadline;
use sluice_api::job::{JobPhase, NotRun, condition_types as ct};
use sluice_api::jobio::{self, JobIoError};
use sluice_api::output::ManifestCounts;
use sluice_api::plan::PlanSummary;
use sluice_api::plan::ShardPlan;
use sluice_api::progress::ShardProgress;
use sluice_api::report::PlanFailure;
use sluice_api::storage::{CA_BUNDLE_FIELD, CaBundle, parse_ca_pem};

use crate::context::{Context, JobCache};
use crate::error::{Error, Result};
use crate::fleet;
use crate::job_builder::{self, FIELD_MANAGER, Step};
use crate::planner;
use crate::storage_io::{Location, StorageRefs};
use sluice_control::conditions::{self, Cond};
use sluice_control::fleet_view::JobFacts;
use sluice_control::status::{self, JobView, StatusInput};

pub mod decide;
use decide::{Decision, Facts, Finalized, JobChange, Observation};

/// The finalizer the operator puts on every BatchInferenceJob.
pub const FINALIZER: &str = "sluice.dev/cleanup";

/// Entry point for the controller: decode errors become a Warning Event and a log line, never a
/// stuck watch; everything else goes through the finalizer.
pub async fn reconcile(guard: Arc<DeserializeGuard<BatchInferenceJob>>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.is_leader() {
        return Ok(Action::requeue(std::time::Duration::from_secs(5)));
    }
    let bij = match &guard.0 {
        Ok(bij) => Arc::new(bij.clone()),
        Err(invalid) => {
            let name = invalid.metadata.name.clone().unwrap_or_default();
            tracing::warn!(object = %name, error = %invalid.error, "malformed BatchInferenceJob skipped");
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("sluice.dev/v1alpha1".into()),
                kind: Some("BatchInferenceJob".into()),
                name: invalid.metadata.name.clone(),
                namespace: invalid.metadata.namespace.clone(),
                uid: invalid.metadata.uid.clone(),
                ..Default::default()
            };
            let ev = Event {
                type_: EventType::Warning,
                reason: "InvalidObject".into(),
                note: Some(truncate(&format!("cannot decode the object: {}", invalid.error), 1000)),
                action: "Decode".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
                tracing::warn!(error = %e, "publishing an Event failed");
            }
            return Ok(Action::await_change());
        }
    };
    let _timer = ctx.metrics.reconcile_timer();
    let ns = job_builder::namespace_of(&bij)?;
    let api: Api<BatchInferenceJob> = Api::namespaced(ctx.client.clone(), &ns);
    let key = format!("{ns}/{}", bij.name_any());
    let result = finalizer(&api, FINALIZER, bij, |event| async {
        match event {
            Finalizer::Apply(bij) => apply(&bij, &ctx).await,
            Finalizer::Cleanup(bij) => cleanup(&bij, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.clear_failures(&key);
    }
    result
}

/// Count the failure and back off exponentially per object (10 s doubling, at most 5 min; an
/// error's own floor, e.g. a missing input, wins when longer).
pub fn error_policy(guard: Arc<DeserializeGuard<BatchInferenceJob>>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(err.metric_label());
    let meta = match &guard.0 {
        Ok(b) => &b.metadata,
        Err(i) => &i.metadata,
    };
    let key = format!("{}/{}", meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default());
    let n = ctx.note_failure(&key);
    let backoff = std::time::Duration::from_secs(10u64.saturating_mul(1u64 << n.min(5))).min(std::time::Duration::from_secs(300));
    tracing::warn!(object = %key, error = %err, attempt = n + 1, ?backoff, "reconcile failed");
    Action::requeue(backoff.max(err.retry_after().min(std::time::Duration::from_secs(300))))
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

async fn publish(ctx: &Context, bij: &BatchInferenceJob, type_: EventType, reason: &str, note: String) {
    let ev = Event { type_, reason: reason.into(), note: Some(truncate(&note, 1000)), action: reason.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &bij.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "publishing an Event failed");
    }
}

async fn patch_status(ctx: &Context, bij: &BatchInferenceJob, status: &BatchInferenceJobStatus) -> Result<()> {
    let name = bij.name_any();
    let ns = job_builder::namespace_of(bij)?;
    let api: Api<BatchInferenceJob> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({ "apiVersion": "sluice.dev/v1alpha1", "kind": "BatchInferenceJob", "status": status });
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(Error::kube(format!("patch status of {ns}/{name}")))?;
    Ok(())
}

/// Write `status` when it differs from the stored one.
async fn write_status(ctx: &Context, bij: &BatchInferenceJob, status: &BatchInferenceJobStatus) -> Result<()> {
    if bij.status.as_ref() == Some(status) {
        return Ok(());
    }
    patch_status(ctx, bij, status).await
}

async fn read_secret(ctx: &Context, bij: &BatchInferenceJob) -> Result<BTreeMap<String, String>> {
    let Some(name) = bij.spec.storage.as_ref().and_then(|s| s.secret_ref.as_ref()).map(|r| r.name.clone()) else {
        return Ok(BTreeMap::new());
    };
    let ns = job_builder::namespace_of(bij)?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = api.get(&name).await.map_err(Error::kube(format!("get Secret {ns}/{name} (spec.storage.secretRef)")))?;
    let mut out = BTreeMap::new();
    for (k, v) in secret.data.unwrap_or_default() {
        if let Ok(s) = String::from_utf8(v.0) {
            out.insert(k, s);
        }
    }
    out.extend(secret.string_data.unwrap_or_default());
    Ok(out)
}

/// The PEM text of `spec.storage.caBundle` (a ConfigMap's `data` or `binaryData` key, or a
/// Secret's), checked to be a CA bundle, so that a bad one is reported here (and retried, as a
/// fixed ConfigMap is picked up) rather than failing the job when its storage is opened.
async fn read_ca_bundle(ctx: &Context, bij: &BatchInferenceJob) -> Result<Option<CaBundle>> {
    let Some(ca) = bij.spec.storage.as_ref().and_then(|s| s.ca_bundle.as_ref()) else {
        return Ok(None);
    };
    let ns = job_builder::namespace_of(bij)?;
    let (what, pem) = match (&ca.config_map_ref, &ca.secret_ref) {
        (Some(r), _) => {
            let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
            let cm = api.get(&r.name).await.map_err(Error::kube(format!("get ConfigMap {ns}/{} ({CA_BUNDLE_FIELD})", r.name)))?;
            let text = cm.data.and_then(|mut d| d.remove(&ca.key)).map(String::into_bytes);
            (format!("ConfigMap {ns}/{}", r.name), text.or_else(|| cm.binary_data.and_then(|mut d| d.remove(&ca.key)).map(|b| b.0)))
        }
        (None, Some(r)) => {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            let secret = api.get(&r.name).await.map_err(Error::kube(format!("get Secret {ns}/{} ({CA_BUNDLE_FIELD})", r.name)))?;
            let bytes = secret.data.and_then(|mut d| d.remove(&ca.key)).map(|b| b.0);
            (
                format!("Secret {ns}/{}", r.name),
                bytes.or_else(|| secret.string_data.and_then(|mut d| d.remove(&ca.key)).map(String::into_bytes)),
            )
        }
        (None, None) => {
            let reason = "set exactly one of configMapRef or secretRef".to_string();
            return Err(Error::InvalidSpec { field: CA_BUNDLE_FIELD.into(), reason });
        }
    };
    let invalid = |reason: String| Error::InvalidSpec { field: CA_BUNDLE_FIELD.into(), reason };
    let pem = pem.ok_or_else(|| invalid(format!("{what} has no key {:?}", ca.key)))?;
    parse_ca_pem(&pem).map_err(|reason| invalid(format!("key {:?} of {what}: {reason}", ca.key)))?;
    Ok(Some(CaBundle::Pem(pem)))
}

/// A new job (no conditions yet) becomes `Planning` with `Admitted=True` and `message`, once.
async fn mark_planning(ctx: &Context, bij: &BatchInferenceJob, old: &BatchInferenceJobStatus, message: &str, now: Timestamp) -> Result<()> {
    if old.phase != JobPhase::Pending || !old.conditions.is_empty() {
        return Ok(());
    }
    let mut planning = old.clone();
    planning.phase = JobPhase::Planning;
    planning.observed_generation = bij.metadata.generation;
    conditions::set(&mut planning.conditions, Cond::new(ct::ADMITTED, true, "Planning", message), bij.metadata.generation, now);
    patch_status(ctx, bij, &planning).await
}

/// Hold the job (not planned yet) with `Admitted=False` and a Warning Event the first time.
async fn hold(ctx: &Context, bij: &BatchInferenceJob, reason: &str, message: String, now: Timestamp) -> Result<()> {
    let old = bij.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.phase = JobPhase::Pending;
    status.observed_generation = bij.metadata.generation;
    conditions::set(&mut status.conditions, Cond::new(ct::ADMITTED, false, reason, message.clone()), bij.metadata.generation, now);
    if status != old {
        publish(ctx, bij, EventType::Warning, reason, message).await;
        patch_status(ctx, bij, &status).await?;
    }
    Ok(())
}

/// Mark the job Failed (a permanent error before any Job ran).
async fn fail_early(ctx: &Context, bij: &BatchInferenceJob, reason: &str, message: String, now: Timestamp) -> Result<()> {
    let old = bij.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.phase = JobPhase::Failed;
    status.observed_generation = bij.metadata.generation;
    status.completion_time = status
        .completion_time
        .or(Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::from_second(now.as_second()).unwrap_or(now))));
    let g = bij.metadata.generation;
    conditions::set(&mut status.conditions, Cond::new(ct::ADMITTED, false, reason, message.clone()), g, now);
    conditions::set(&mut status.conditions, Cond::new(ct::FAILED, true, reason, message.clone()), g, now);
    conditions::set(&mut status.conditions, Cond::new(ct::PROGRESSING, false, reason, message.clone()), g, now);
    if status != old {
        publish(ctx, bij, EventType::Warning, reason, message).await;
        patch_status(ctx, bij, &status).await?;
    }
    Ok(())
}

/// The progress records of the plan's shards. `cache` keeps the final records of complete
/// shards (those whose record says so, or in `completed_by_job`), so later calls skip them.
pub async fn read_progress(
    output: &Location,
    plan: &ShardPlan,
    cache: &mut JobCache,
    completed_by_job: &BTreeSet<u32>,
) -> Result<BTreeMap<u32, ShardProgress>> {
    let known: BTreeSet<u32> = cache.complete.keys().copied().collect();
    let fresh = jobio::read_progress_records(output, plan, &known).await?;
    for (shard, r) in &fresh {
        if r.complete || completed_by_job.contains(shard) {
            cache.complete.insert(*shard, r.clone());
        }
    }
    let mut records = cache.complete.clone();
    records.extend(fresh);
    Ok(records)
}

/// Build `manifest.json` from the final progress records (or the shard files).
pub use sluice_api::jobio::build_manifest;

/// How often a status whose only changes are the clock's (rates, projection) is rewritten.
const STATUS_REFRESH: jiff::SignedDuration = jiff::SignedDuration::from_secs(10);

/// How often a job whose pods plan or finalize is looked at while they run.
const STEP_POLL: std::time::Duration = std::time::Duration::from_secs(3);

/// Where this reconcile learns the plan (and progress, and the manifest) from.
enum StorageView {
    /// The operator reads the job's storage: the whole plan and the output prefix.
    Operator { summary: PlanSummary, plan: Arc<ShardPlan>, output: Location },
    /// Only the job's pods reach its storage: they report (`crate::reports`).
    Pods { summary: PlanSummary },
}

impl StorageView {
    fn summary(&self) -> &PlanSummary {
        match self {
            StorageView::Operator { summary, .. } | StorageView::Pods { summary } => summary,
        }
    }
}

/// The plan's size as an earlier reconcile recorded it in the status (`Admitted=True` with
/// reason `Planned`), so a restarted operator does not plan again.
fn planned_from_status(old: &BatchInferenceJobStatus) -> Option<PlanSummary> {
    let admitted = old.conditions.iter().find(|c| c.type_ == ct::ADMITTED)?;
    if admitted.status != "True" || admitted.reason != "Planned" {
        return None;
    }
    let shards = u32::try_from(old.shards.total).ok()?;
    let line_count = u64::try_from(old.requests.total).ok()?;
    Some(PlanSummary { line_count, requests_per_shard: line_count.div_ceil(u64::from(shards.max(1))), shards })
}

/// Run `step` in a one-pod Job of the job's own template unless it exists; the existing Job.
async fn ensure_step_job(
    ctx: &Context,
    bij: &BatchInferenceJob,
    step: Step,
    env: Vec<k8s_openapi::api::core::v1::EnvVar>,
) -> Result<Option<Job>> {
    let ns = job_builder::namespace_of(bij)?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let name = job_builder::step_job_name(&bij.name_any(), step);
    if let Some(j) = jobs.get_opt(&name).await.map_err(Error::kube(format!("get Job {ns}/{name}")))? {
        return Ok(Some(j));
    }
    let desired = job_builder::step_job(bij, &ctx.config.worker, step, env)?;
    jobs.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&desired))
        .await
        .map_err(Error::kube(format!("apply Job {ns}/{name}")))?;
    Ok(None)
}

/// Delete a step's Job (and, through the garbage collector, its pod) so that it runs again.
async fn delete_step_job(ctx: &Context, bij: &BatchInferenceJob, step: Step) -> Result<()> {
    let ns = job_builder::namespace_of(bij)?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let name = job_builder::step_job_name(&bij.name_any(), step);
    match jobs.delete(&name, &kube::api::DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("delete Job {ns}/{name}"))(e)),
    }
}

/// The plan of a job whose storage only its pods reach: from the planner pod's report, or as
/// recorded in the status; otherwise start (or wait for) the planner pod. `Err(action)` means
/// "not planned yet, come back then".
async fn plan_by_pods(
    ctx: &Context,
    bij: &BatchInferenceJob,
    old: &BatchInferenceJobStatus,
    key: &str,
    uid: &str,
    cache: &mut JobCache,
    now: Timestamp,
) -> Result<std::result::Result<PlanSummary, Action>> {
    if let Some(p) = &cache.summary {
        return Ok(Ok(p.clone()));
    }
    let reports = ctx.reports.snapshot(key, uid);
    if let Some(p) = reports.plan {
        let note = format!(
            "planned {} requests into {} shards of about {} requests (by the job's planner pod); plan at {}",
            p.line_count,
            p.shards,
            p.requests_per_shard,
            layout::join(&bij.spec.output.uri, layout::PLAN)
        );
        publish(ctx, bij, EventType::Normal, "Planned", note).await;
        cache.summary = Some(p.clone());
        return Ok(Ok(p));
    }
    if let Some(p) = planned_from_status(old) {
        cache.summary = Some(p.clone());
        return Ok(Ok(p));
    }
    if let Some((failure, message)) = reports.plan_failed {
        ctx.reports.clear_plan_failure(key);
        delete_step_job(ctx, bij, Step::Plan).await?;
        return Ok(Err(match failure {
            PlanFailure::InputNotFound => {
                hold(ctx, bij, "InputNotFound", message, now).await?;
                Action::requeue(crate::error::INPUT_NOT_FOUND_RETRY)
            }
            PlanFailure::Permanent => {
                fail_early(ctx, bij, "PlanFailed", message, now).await?;
                Action::await_change()
            }
        }));
    }
    mark_planning(ctx, bij, old, "the job's planner pod is reading the input to plan shards", now).await?;
    let Some(job) = ensure_step_job(ctx, bij, Step::Plan, job_builder::plan_step_env(bij)).await? else {
        return Ok(Err(Action::requeue(STEP_POLL)));
    };
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Err(Action::requeue(STEP_POLL)));
    }
    if let Some(why) = status::true_condition(&job, "Failed") {
        let ns = job_builder::namespace_of(bij)?;
        let message = format!(
            "the planner pod failed without a report ({why}); see kubectl logs -n {ns} job/{}",
            job_builder::step_job_name(&bij.name_any(), Step::Plan)
        );
        fail_early(ctx, bij, "PlanFailed", message, now).await?;
        return Ok(Err(Action::await_change()));
    }
    if status::true_condition(&job, "Complete").is_some() {
        // It reported to an operator that is gone (a restart): run it again, it reuses the plan.
        delete_step_job(ctx, bij, Step::Plan).await?;
    }
    Ok(Err(Action::requeue(STEP_POLL)))
}

/// Have the job's own pod run `step`, which writes the manifest: finalize (every shard is
/// committed, only the pods reach the storage) or close (a cancelled or expired job).
/// `manifest` is the step's report, if it arrived.
async fn manifest_step(
    ctx: &Context,
    bij: &BatchInferenceJob,
    step: Step,
    env: Vec<k8s_openapi::api::core::v1::EnvVar>,
    manifest: Option<(String, ManifestCounts)>,
) -> Result<Finalized> {
    if let Some((uri, counts)) = manifest {
        return Ok(Finalized::Done { uri, counts: Some(counts) });
    }
    let Some(job) = ensure_step_job(ctx, bij, step, env).await? else {
        return Ok(Finalized::Pending);
    };
    if let Some(why) = status::true_condition(&job, "Failed") {
        let ns = job_builder::namespace_of(bij)?;
        let what = match step {
            Step::Close => "the close pod could not write the requests that never ran and the manifest",
            _ => "every shard is committed but the finalize pod could not write the manifest",
        };
        return Ok(Finalized::Failed(format!(
            "{what} ({why}); see kubectl logs -n {ns} job/{}",
            job_builder::step_job_name(&bij.name_any(), step)
        )));
    }
    if status::true_condition(&job, "Complete").is_some() {
        // Done, but its report reached an operator that is gone: the counts reported so far
        // (kept in the status) stand.
        return Ok(Finalized::Done { uri: layout::join(&bij.spec.output.uri, layout::MANIFEST), counts: None });
    }
    Ok(Finalized::Pending)
}

async fn apply(bij: &BatchInferenceJob, ctx: &Context) -> Result<Action> {
    let now = ctx.now();
    let ns = job_builder::namespace_of(bij)?;
    let name = bij.name_any();
    let uid = bij.uid().unwrap_or_default();
    let generation = bij.metadata.generation;
    let old = bij.status.clone().unwrap_or_default();
    let created = bij.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);

    if old.phase.is_terminal() {
        ctx.metrics.set_job(&ns, &name, &old, None);
        return Ok(Action::await_change());
    }
    let deadline = match effective_deadline(&bij.spec.sla, created) {
        Ok(d) => d,
        Err(reason) => {
            hold(ctx, bij, "InvalidSpec", reason, now).await?;
            return Ok(Action::await_change());
        }
    };

    // Storage and plan: the operator reads the job's storage itself, or, when only the job's
    // pods can reach it, its planner pod plans and reports (docs/design.md).
    let key = format!("{ns}/{name}");
    let mut cache = ctx.cached(&uid);
    let storage_view = if bij.spec.storage_only_in_pods() {
        ctx.reports.register(&key, &uid, cache.summary.as_ref().map(|p| p.shards).or_else(|| planned_from_status(&old).map(|p| p.shards)));
        match plan_by_pods(ctx, bij, &old, &key, &uid, &mut cache, now).await? {
            Ok(summary) => StorageView::Pods { summary },
            Err(action) => {
                ctx.store_cache(&uid, cache);
                return Ok(action);
            }
        }
    } else {
        let secret = read_secret(ctx, bij).await?;
        let ca_bundle = match read_ca_bundle(ctx, bij).await {
            Ok(ca) => ca,
            Err(e) => {
                if matches!(e, Error::InvalidSpec { .. }) {
                    publish(ctx, bij, EventType::Warning, "InvalidCABundle", e.to_string()).await;
                }
                return Err(e);
            }
        };
        let refs = StorageRefs { secret, ca_bundle };
        let storage = bij.spec.storage.as_ref();
        let opened = ctx
            .stores
            .open("spec.input.uri", &bij.spec.input.uri, storage, &refs)
            .and_then(|i| Ok((i, ctx.stores.open("spec.output.uri", &bij.spec.output.uri, storage, &refs)?)));
        let (input, output) = match opened {
            Ok(v) => v,
            Err(e) => {
                fail_early(ctx, bij, "InvalidStorage", e.to_string(), now).await?;
                return Ok(Action::await_change());
            }
        };
        let plan = match cache.plan.clone() {
            Some(p) => p,
            None => {
                mark_planning(ctx, bij, &old, "reading the input to plan shards", now).await?;
                match planner::load_or_create(&bij.spec, &input, &output).await {
                    Ok(outcome) => {
                        if outcome.created {
                            let p = &outcome.plan;
                            let note = format!(
                                "planned {} requests into {} shards of about {} requests; plan at {}",
                                p.line_count,
                                p.shards.len(),
                                p.requests_per_shard,
                                layout::join(&output.uri, layout::PLAN)
                            );
                            publish(ctx, bij, EventType::Normal, "Planned", note).await;
                        }
                        let p = Arc::new(outcome.plan);
                        cache.plan = Some(p.clone());
                        p
                    }
                    Err(Error::JobIo(e)) if matches!(*e, JobIoError::InputNotFound { .. }) => {
                        hold(ctx, bij, "InputNotFound", e.to_string(), now).await?;
                        return Ok(Action::requeue(crate::error::INPUT_NOT_FOUND_RETRY));
                    }
                    Err(e) if e.is_permanent() => {
                        fail_early(ctx, bij, "PlanFailed", e.to_string(), now).await?;
                        return Ok(Action::await_change());
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        StorageView::Operator { summary: plan.summary(), plan, output }
    };
    let plan = storage_view.summary().clone();

    let facts = Facts { bij, old: &old, plan: &plan, created, deadline, now, fleet_cap: None, prior_rps: None };

    // Observe.
    let obs = observe(ctx, bij, &storage_view, &mut cache, &key, &uid, &old).await?;
    let progress = decide::assess(&facts, &obs);
    decide::note_progress(&mut cache, &progress, now);
    // Under a GpuBudget: this job's grant in the fleet plan caps its parallelism. The fleet lock
    // is held until the parallelism is applied.
    let fleet_plan = if decide::closing(&facts, &progress).is_none() && !bij.spec.suspend && !progress.all_done {
        fleet::plan_job(ctx, bij, &own_fleet_facts(&plan, &progress), now).await?
    } else {
        // Done, closing or suspended: its GPUs go back to the budget's other jobs now.
        if ctx.applied(&key).is_some_and(|p| p > 0) {
            ctx.wake_all();
        }
        ctx.set_applied(&key, None);
        None
    };
    let facts = Facts {
        fleet_cap: fleet_plan.as_ref().map(|p| p.grant.workers),
        prior_rps: fleet_plan.as_ref().and_then(|p| p.profile_rps),
        ..facts
    };
    // Every shard is committed; a job whose storage only its pods reach also needs its
    // finalize pod to have written the manifest. A cancelled or expired job, once its workers
    // have stopped, needs its close pod to have written the requests that never ran and the
    // manifest; so does a job done with failed shards (their requests as `shard_failed`).
    let finalized = match (decide::closing(&facts, &progress), &storage_view, progress.all_done) {
        (Some(reason), _, _) if decide::workers_stopped(&obs) => {
            let env = job_builder::close_step_env(bij, &progress.failed, reason.not_run(), None)?;
            Some(manifest_step(ctx, bij, Step::Close, env, obs.manifest_report.clone()).await?)
        }
        (Some(_), _, _) => Some(Finalized::Pending),
        (None, _, true) if !progress.failed.is_empty() => {
            let env = job_builder::close_step_env(bij, &BTreeSet::new(), NotRun::ShardFailed, Some(&progress.failed))?;
            Some(manifest_step(ctx, bij, Step::Close, env, obs.manifest_report.clone()).await?)
        }
        (None, StorageView::Pods { .. }, true) => {
            let env = job_builder::finalize_step_env(bij, &progress.failed)?;
            Some(manifest_step(ctx, bij, Step::Finalize, env, obs.manifest_report.clone()).await?)
        }
        _ => None,
    };

    // Decide (pure).
    let decision = decide::decide(&facts, &obs, &progress, finalized.as_ref(), &ctx.config.worker)?;

    // Act: the Job, the Events, the manifest, the status.
    act_on_job(ctx, bij, &decision).await?;
    let mut summary = progress.summary.clone();
    let manifest_uri = if decision.phase.has_manifest() && old.phase != decision.phase {
        let (uri, counts) = write_manifest(bij, &storage_view, finalized, &obs.records, &progress.failed, decision.decided_at).await?;
        if let Some(c) = counts {
            // The manifest's counts are the truth (read back from the committed files).
            summary.succeeded = c.succeeded;
            summary.failed = c.failed;
        }
        let (reason, note) = match decision.closing {
            Some(r) => (
                r.phase().as_str(),
                format!(
                    "{}: {} requests succeeded, {} failed or never ran (those that never ran are in the error files as {}); manifest at {uri}",
                    r.phase().as_str().to_lowercase(),
                    summary.succeeded,
                    summary.failed,
                    r.code()
                ),
            ),
            None => (
                "Completed",
                format!(
                    "all {} shards committed ({} succeeded, {} failed); manifest at {uri}; {}",
                    plan.shards, summary.succeeded, summary.failed, decision.step.decision.reason
                ),
            ),
        };
        publish(ctx, bij, EventType::Normal, reason, note).await;
        Some(uri)
    } else {
        None
    };
    let input_status = StatusInput {
        now,
        generation,
        phase: decision.phase,
        plan: &plan,
        job: &progress.view,
        progress: &summary,
        completed: &progress.completed,
        failed: &progress.failed,
        desired: decision.desired,
        deadline,
        decision: &decision.step.decision,
        gpu_seconds: status::pod_gpu_seconds(&obs.pods, bij.spec.workers.gpus, now),
        manifest_uri,
        failure: decision.failure.clone(),
        closing: decision.closing,
    };
    let mut new_status = status::build(&old, &input_status);
    new_status.reported = progress.reported.clone();
    if let Some(p) = &fleet_plan {
        new_status.fleet = Some(p.status.clone());
        for (type_, reason, note) in &p.events {
            publish(ctx, bij, *type_, reason, note.clone()).await;
        }
    }
    // A status write is itself a watch event that triggers a reconcile, and the windowed rates
    // and the projection move with the clock: writes that only those moved are spaced out, or a
    // running job would reconcile itself in a loop.
    let only_clock = status::only_time_moved(&old, &new_status);
    let recent = cache.last_status_write.is_some_and(|t| now.duration_since(t) < STATUS_REFRESH);
    if !(only_clock && recent) && bij.status.as_ref() != Some(&new_status) {
        write_status(ctx, bij, &new_status).await?;
        cache.last_status_write = Some(now);
    }
    if let Some(p) = fleet_plan {
        p.applied(ctx, bij, u32::try_from(decision.desired).unwrap_or(0), decision.phase.is_terminal(), now).await;
    }
    if decision.phase == JobPhase::Succeeded && old.phase != JobPhase::Succeeded {
        fleet::learn(ctx, bij, &new_status, progress.summary.estimator.startup_secs(), now).await;
    }
    let last_progress = cache.last_progress_at.map(|t| t.as_millisecond() as f64 / 1000.0);
    ctx.metrics.set_job(&ns, &name, &new_status, last_progress);
    ctx.store_cache(&uid, cache);

    Ok(match decision.phase {
        JobPhase::Running if decision.finalizing || decision.closing.is_some() => Action::requeue(STEP_POLL),
        JobPhase::Running | JobPhase::Suspended | JobPhase::Pending | JobPhase::Planning => {
            let every = if decision.phase == JobPhase::Running { ctx.config.requeue_running } else { ctx.config.requeue_idle };
            Action::requeue(until_expiry(bij, deadline, now).map_or(every, |d| d.min(every)))
        }
        JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled | JobPhase::Expired => Action::await_change(),
    })
}

/// The reconciling job's own facts for the fleet plan: its workers may all be planned away (the
/// scaler keeps those mid-shard until their shard is committed).
fn own_fleet_facts(plan: &PlanSummary, progress: &decide::Progress) -> JobFacts {
    let done = progress.summary.succeeded + progress.summary.failed;
    let finished = (progress.completed.len() + progress.failed.len()) as u32;
    JobFacts {
        total_requests: plan.line_count,
        done_requests: done,
        total_shards: plan.shards,
        remaining_shards: plan.shards.saturating_sub(finished),
        measured: progress.summary.estimator.estimate(),
        startup_secs: progress.summary.estimator.startup_secs(),
        current_workers: u32::try_from(progress.view.parallelism).unwrap_or(0),
        protected_workers: 0,
    }
}

/// For a job that expires at its deadline (`sla.onDeadline: Expire`), the time until then: the
/// reconcile that expires it is due at the deadline, not a requeue interval later.
fn until_expiry(bij: &BatchInferenceJob, deadline: Timestamp, now: Timestamp) -> Option<std::time::Duration> {
    if bij.spec.sla.on_deadline != sluice_api::job::OnDeadline::Expire {
        return None;
    }
    let left = deadline.duration_since(now);
    Some(std::time::Duration::try_from(left).unwrap_or_default().max(std::time::Duration::from_secs(1)))
}

/// Read the Job, its pods and the shards' progress (from storage, or from the pods' reports).
async fn observe(
    ctx: &Context,
    bij: &BatchInferenceJob,
    storage_view: &StorageView,
    cache: &mut JobCache,
    key: &str,
    uid: &str,
    old: &BatchInferenceJobStatus,
) -> Result<Observation> {
    let ns = job_builder::namespace_of(bij)?;
    let name = bij.name_any();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let job_name = job_builder::job_name(&name);
    let job = jobs.get_opt(&job_name).await.map_err(Error::kube(format!("get Job {ns}/{job_name}")))?;
    let pods: Vec<Pod> = if job.is_some() {
        let selector = format!("{}={}", job_builder::JOB_LABEL, job_builder::selector_labels(&name)[job_builder::JOB_LABEL]);
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        api.list(&ListParams::default().labels(&selector)).await.map_err(Error::kube(format!("list pods of {ns}/{job_name}")))?.items
    } else {
        Vec::new()
    };
    Ok(match storage_view {
        StorageView::Operator { plan, output, .. } => {
            let completed = JobView::from_job(job.as_ref()).completed;
            let records = read_progress(output, plan, cache, &completed).await?;
            Observation { job, pods, records, reported: None, manifest_report: None }
        }
        StorageView::Pods { .. } => {
            let reports = ctx.reports.snapshot(key, uid);
            let manifest_report = reports.manifest.map(|(uri, counts, _usage)| (uri, counts));
            Observation { job, pods, records: reports.progress, reported: Some(old.reported.clone().unwrap_or_default()), manifest_report }
        }
    })
}

/// Apply the decided Job change and publish its Events.
async fn act_on_job(ctx: &Context, bij: &BatchInferenceJob, decision: &Decision) -> Result<()> {
    let ns = job_builder::namespace_of(bij)?;
    let name = bij.name_any();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let job_name = job_builder::job_name(&name);
    if let Some(n) = &decision.spec_note {
        publish(ctx, bij, n.type_, &n.reason, n.note.clone()).await;
    }
    let notes = match &decision.job {
        JobChange::Keep => &[][..],
        JobChange::Create { job, notes } => {
            jobs.patch(&job_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(job.as_ref()))
                .await
                .map_err(Error::kube(format!("apply Job {ns}/{job_name}")))?;
            notes
        }
        JobChange::Patch { patch, scaled, notes } => {
            let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            jobs.patch(&job_name, &params, &Patch::Merge(patch)).await.map_err(Error::kube(format!("patch Job {ns}/{job_name}")))?;
            if let Some((from, to)) = scaled {
                ctx.metrics.scaled(&ns, &name, *from, *to);
            }
            notes
        }
    };
    for n in notes.iter().chain(&decision.notes) {
        publish(ctx, bij, n.type_, &n.reason, n.note.clone()).await;
    }
    Ok(())
}

/// Write `manifest.json` (the operator reads the storage) or take the finalize pod's; its URI
/// and counts.
async fn write_manifest(
    bij: &BatchInferenceJob,
    storage_view: &StorageView,
    finalized: Option<Finalized>,
    records: &BTreeMap<u32, ShardProgress>,
    failed: &BTreeSet<u32>,
    decided_at: Timestamp,
) -> Result<(String, Option<ManifestCounts>)> {
    Ok(match (storage_view, finalized) {
        (StorageView::Operator { plan: full, output, .. }, _) => {
            let ns = job_builder::namespace_of(bij)?;
            let job = format!("{ns}/{}", bij.name_any());
            let manifest = build_manifest(&job, &bij.spec.input.uri, output, full, records, failed, decided_at).await?;
            let manifest = jobio::write_manifest_once(output, manifest).await?;
            (output.child(layout::MANIFEST).uri, Some(manifest.requests))
        }
        (StorageView::Pods { .. }, Some(Finalized::Done { uri, counts })) => (uri, counts),
        (StorageView::Pods { .. }, _) => (layout::join(&bij.spec.output.uri, layout::MANIFEST), None),
    })
}

async fn cleanup(bij: &BatchInferenceJob, ctx: &Context) -> Result<Action> {
    let ns = job_builder::namespace_of(bij)?;
    let name = bij.name_any();
    let note = format!("deleting: the Job and its pods are garbage-collected; the output at {} is kept", bij.spec.output.uri);
    publish(ctx, bij, EventType::Normal, "Deleting", note).await;
    ctx.metrics.remove_job(&ns, &name);
    ctx.forget(&bij.uid().unwrap_or_default());
    ctx.reports.forget(&format!("{ns}/{name}"));
    Ok(Action::await_change())
}

/// Drain a stream of controller results into logs (used by the controller runner).
pub async fn log_results<S, T, E>(stream: S)
where
    S: futures::Stream<Item = std::result::Result<T, E>>,
    T: std::fmt::Debug,
    E: std::fmt::Display,
{
    stream
        .for_each(|r| async move {
            match r {
                Ok(o) => tracing::debug!(object = ?o, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
}
