//! The pure middle of one reconcile: from what was observed (the Job, its pods, the shards'
//! progress) plus the job's spec and stored status, what to do: the phase, the scaling step, the
//! Job to create or the patch to send, and the Events to publish. No I/O; `reconcile` observes
//! before it and acts after it.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use serde_json::{Value, json};
use sluice_api::job::{CloseReason, JobPhase, OnDeadline, ReportedTotals, SlaStatus};
use sluice_api::output::ManifestCounts;
use sluice_api::plan::PlanSummary;
use sluice_api::progress::ShardProgress;
use sluice_api::{BatchInferenceJob, BatchInferenceJobStatus};
use sluice_control::scaler::{Observed, ScaleStep, Scaler};
use sluice_control::sla::SlaConfig;
use sluice_control::status::{self, JobView, LAST_SCALE_ANNOTATION, ProgressSummary};

use crate::context::JobCache;
use crate::error::Result;
use crate::job_builder::{self, WorkerDefaults};

/// What `reconcile` read from Kubernetes and storage (or the pods' reports) for one job.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// The job's Indexed Job, if it exists.
    pub job: Option<Job>,
    /// The Job's pods.
    pub pods: Vec<Pod>,
    /// The latest progress record of each shard.
    pub records: BTreeMap<u32, ShardProgress>,
    /// For a job whose storage only its pods reach: the totals reported so far (as stored in the
    /// status), to be folded with the records.
    pub reported: Option<ReportedTotals>,
    /// The finalize pod's report: manifest URI and counts.
    pub manifest_report: Option<(String, ManifestCounts)>,
}

/// The fixed facts of one reconcile: the job, its stored status and plan, its window, the time.
#[derive(Clone, Copy)]
pub struct Facts<'a> {
    pub bij: &'a BatchInferenceJob,
    pub old: &'a BatchInferenceJobStatus,
    pub plan: &'a PlanSummary,
    /// Start of the SLA window (the object's creation).
    pub created: Timestamp,
    pub deadline: Timestamp,
    pub now: Timestamp,
    /// Under a GpuBudget: the workers the fleet scheduler grants.
    pub fleet_cap: Option<u32>,
    /// The model's learned per-worker rate, when a finished job left one: the scaler's prior.
    pub prior_rps: Option<f64>,
}

/// Where the shards stand: counts folded from the records (and reports) and the Job's indexes.
#[derive(Clone, Debug)]
pub struct Progress {
    pub view: JobView,
    pub summary: ProgressSummary,
    pub reported: Option<ReportedTotals>,
    /// Shards committed (by their records or the Job's completed indexes).
    pub completed: BTreeSet<u32>,
    /// Shards that failed for good and are not committed.
    pub failed: BTreeSet<u32>,
    pub too_many_failed: bool,
    /// Every shard committed or failed within `retries.maxFailedShards`.
    pub all_done: bool,
}

/// Fold what was observed into shard and request counts.
pub fn assess(facts: &Facts, obs: &Observation) -> Progress {
    let Facts { bij, old, plan, now, .. } = *facts;
    let view = JobView::from_job(obs.job.as_ref());
    let pod_created: BTreeMap<String, Timestamp> =
        obs.pods.iter().filter_map(|p| Some((p.name_any(), p.metadata.creation_timestamp.as_ref()?.0))).collect();
    let mut summary = status::summarize(&obs.records, &pod_created, now);
    let mut reported = obs.reported.clone();
    if let Some(totals) = reported.as_mut() {
        status::fold_reported(totals, &mut summary, &obs.records);
        // After an operator restart, before the first records arrive: the last estimate.
        if summary.estimator.estimate().is_none() && old.throughput.per_worker_requests_per_second > 0.0 {
            summary.estimator.observe(old.throughput.per_worker_requests_per_second, 60.0);
        }
    }
    let indexes = 0..plan.shards;
    let completed: BTreeSet<u32> = view.completed.union(&summary.complete).filter(|i| indexes.contains(i)).copied().collect();
    let failed: BTreeSet<u32> = view.failed.iter().filter(|i| indexes.contains(i) && !completed.contains(i)).copied().collect();
    let max_failed = usize::try_from(bij.spec.retries.max_failed_shards.max(0)).unwrap_or(0);
    let too_many_failed = failed.len() > max_failed;
    let all_done = !too_many_failed && completed.len() + failed.len() == plan.shards as usize;
    Progress { view, summary, reported, completed, failed, too_many_failed, all_done }
}

/// Remember when the finished count last grew (the stall clock behind `SluiceJobStalled`).
pub fn note_progress(cache: &mut JobCache, progress: &Progress, now: Timestamp) {
    let done = progress.summary.succeeded + progress.summary.failed;
    if done > cache.last_done || cache.last_progress_at.is_none() && done > 0 {
        cache.last_done = done;
        cache.last_progress_at = progress.summary.last_update.or(Some(now));
    } else if cache.last_progress_at.is_none() {
        // No progress yet: the stall clock starts now, so a job whose workers never start
        // (Pending pods, crash loops) still trips SluiceJobStalled.
        cache.last_progress_at = Some(now);
    }
}

/// Why the job is being closed before every request ran, if it is: once closing (recorded in
/// the status) it stays closing, even after the close step has committed every shard.
pub fn closing(facts: &Facts, progress: &Progress) -> Option<CloseReason> {
    let Facts { bij, old, now, deadline, .. } = *facts;
    if let Some(r) = old.close_reason {
        return Some(r);
    }
    if progress.all_done || progress.too_many_failed {
        return None;
    }
    if bij.spec.cancel {
        Some(CloseReason::Cancelled)
    } else if bij.spec.sla.on_deadline == OnDeadline::Expire && now >= deadline {
        Some(CloseReason::Expired)
    } else {
        None
    }
}

/// Whether every worker of the job has stopped (none running, none terminating), so the close
/// step can commit the requests that never ran without racing a worker's last chunk.
pub fn workers_stopped(obs: &Observation) -> bool {
    let job_idle = obs.job.as_ref().is_none_or(|j| {
        let spec = j.spec.as_ref();
        let stopped = spec.and_then(|s| s.suspend).unwrap_or(false) || spec.and_then(|s| s.parallelism) == Some(0);
        stopped && j.status.as_ref().and_then(|s| s.active).unwrap_or(0) == 0
    });
    let pod_done = |p: &Pod| matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
    job_idle && obs.pods.iter().all(pod_done)
}

/// Where a step that writes the manifest (finalize, when only the job's pods reach its storage;
/// close, for a cancelled or expired job) stands.
#[derive(Clone, Debug, PartialEq)]
pub enum Finalized {
    /// The manifest is written (its counts when its report arrived).
    Done { uri: String, counts: Option<ManifestCounts> },
    /// Its pod is still to run or running.
    Pending,
    /// It failed.
    Failed(String),
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub type_: EventType,
    pub reason: String,
    pub note: String,
}

impl Note {
    fn normal(reason: &str, note: String) -> Self {
        Note { type_: EventType::Normal, reason: reason.into(), note }
    }

    fn warning(reason: &str, note: String) -> Self {
        Note { type_: EventType::Warning, reason: reason.into(), note }
    }
}

/// What to do to the Indexed Job.
#[derive(Clone, Debug)]
pub enum JobChange {
    /// Nothing (it matches, or the job is finished or has no shards).
    Keep,
    /// Create it (server-side apply), then publish `notes`.
    Create { job: Box<Job>, notes: Vec<Note> },
    /// Merge-patch it, then record the scale change `scaled` (from, to) and publish `notes`.
    Patch { patch: Value, scaled: Option<(i32, i32)>, notes: Vec<Note> },
}

/// Everything one reconcile decided.
#[derive(Clone, Debug)]
pub struct Decision {
    pub phase: JobPhase,
    /// Why the job failed, when `phase` is Failed.
    pub failure: Option<String>,
    /// Why the job is being (or was) closed before every request ran.
    pub closing: Option<CloseReason>,
    /// Every shard is committed and the finalize pod is still to write the manifest.
    pub finalizing: bool,
    /// The time the SLA decision is made at: now, or the completion time of a finished job.
    pub decided_at: Timestamp,
    pub step: ScaleStep,
    /// The Job's parallelism.
    pub desired: i32,
    /// Published before the Job is touched (a spec edit applied).
    pub spec_note: Option<Note>,
    pub job: JobChange,
    /// Published after the Job change: the SLA status moved, the job failed.
    pub notes: Vec<Note>,
}

/// Decide the phase, the scaling step, the Job change and the Events.
pub fn decide(
    facts: &Facts,
    obs: &Observation,
    progress: &Progress,
    finalized: Option<&Finalized>,
    worker: &WorkerDefaults,
) -> Result<Decision> {
    let Facts { bij, old, plan, created, deadline, now, fleet_cap, prior_rps } = *facts;
    let total_shards = plan.shards as usize;
    let finalizing = matches!(finalized, Some(Finalized::Pending));
    let finalize_failure = match finalized {
        Some(Finalized::Failed(m)) => Some(m.clone()),
        _ => None,
    };
    let closing = closing(facts, progress);
    let phase = if let Some(reason) = closing {
        // Closed once the close step's manifest is written; until then it runs down.
        match finalized {
            Some(Finalized::Done { .. }) => reason.phase(),
            Some(Finalized::Failed(_)) => JobPhase::Failed,
            _ => JobPhase::Running,
        }
    } else if progress.all_done && !finalizing && finalize_failure.is_none() {
        JobPhase::Succeeded
    } else if progress.too_many_failed || finalize_failure.is_some() {
        JobPhase::Failed
    } else if bij.spec.suspend {
        JobPhase::Suspended
    } else {
        JobPhase::Running
    };
    let failure = finalize_failure.or_else(|| progress.too_many_failed.then(|| too_many_failed_message(facts, progress)));

    let decided_at = if phase.is_terminal() { old.completion_time.as_ref().map_or(now, |t| t.0) } else { now };
    let remaining_shards = u32::try_from(total_shards - progress.completed.len() - progress.failed.len()).unwrap_or(u32::MAX);
    let observed = Observed {
        now: decided_at,
        window_start: created,
        deadline,
        total_requests: plan.line_count,
        progress: progress.summary.scaler_progress(),
        total_shards: plan.shards,
        remaining_shards,
        finished: phase == JobPhase::Succeeded,
        suspended: bij.spec.suspend || closing.is_some(),
        workers: status::cluster_workers(&progress.view, &obs.pods, decided_at),
        fleet_cap,
    };
    let mut sla = SlaConfig::from_spec(&bij.spec);
    if let Some(rps) = prior_rps.filter(|r| r.is_finite() && *r > 0.0) {
        sla.prior_per_worker_rps = rps;
    }
    let step = Scaler::new(sla).step(&progress.view.scaler_state(old.sla_status), &observed);
    let desired = if closing.is_some() { 0 } else { i32::try_from(step.parallelism).unwrap_or(i32::MAX) };

    let spec_note = match (old.observed_generation, bij.metadata.generation) {
        (Some(seen), Some(g)) if g > seen && !phase.is_terminal() => {
            let w = &bij.spec.workers;
            Some(Note::normal(
                "SpecUpdated",
                format!(
                    "applied spec generation {g}: workers {}..{}, deadline {deadline}, margin {}, policy {:?}",
                    w.min, w.max, bij.spec.sla.margin, bij.spec.sla.policy
                ),
            ))
        }
        _ => None,
    };

    let job = if total_shards == 0 || phase.is_terminal() {
        JobChange::Keep
    } else if closing.is_some() {
        close_job(bij, obs.job.as_ref())
    } else {
        job_change(facts, obs.job.as_ref(), &progress.view, &step, desired, worker)?
    };

    let mut notes = Vec::new();
    if let Some(reason) = closing
        && old.close_reason.is_none()
    {
        notes.push(close_note(facts, reason, progress));
    }
    let decision = &step.decision;
    if decision.status != old.sla_status.unwrap_or(SlaStatus::OnTrack) || old.sla_status.is_none() {
        match (&decision.infeasible, decision.status) {
            (Some(inf), SlaStatus::Infeasible) => notes.push(Note::warning("Infeasible", inf.suggestion.clone())),
            (_, SlaStatus::AtRisk | SlaStatus::Breached) => notes.push(Note::warning(decision.status.as_str(), decision.reason.clone())),
            _ => {}
        }
    }
    if phase == JobPhase::Failed && old.phase != JobPhase::Failed {
        notes.push(Note::warning("Failed", failure.clone().unwrap_or_default()));
    }
    Ok(Decision { phase, failure, closing, finalizing, decided_at, step, desired, spec_note, job, notes })
}

/// A closing job's Job: parallelism 0 and, unless Kueue owns its suspension, suspended; its
/// running workers stop after committing and no new ones start. No Job is created for it.
fn close_job(bij: &BatchInferenceJob, job: Option<&Job>) -> JobChange {
    let Some(spec) = job.and_then(|j| j.spec.as_ref()) else {
        return JobChange::Keep;
    };
    let kueue = bij.spec.queue_name.as_deref().is_some_and(|q| !q.is_empty());
    let mut patch = serde_json::Map::new();
    if spec.parallelism != Some(0) {
        patch.insert("parallelism".into(), 0.into());
    }
    if !kueue && spec.suspend != Some(true) {
        patch.insert("suspend".into(), true.into());
    }
    if patch.is_empty() {
        return JobChange::Keep;
    }
    JobChange::Patch { patch: json!({ "spec": patch }), scaled: None, notes: Vec::new() }
}

/// The Event of a close beginning.
fn close_note(facts: &Facts, reason: CloseReason, progress: &Progress) -> Note {
    let left = facts.plan.line_count.saturating_sub(progress.summary.succeeded + progress.summary.failed);
    match reason {
        CloseReason::Cancelled => Note::normal(
            "Cancelling",
            format!("spec.cancel is set: workers stop after committing; the {left} requests left go to the error files as batch_cancelled"),
        ),
        CloseReason::Expired => Note::warning(
            "Expiring",
            format!(
                "the deadline {} passed with {left} requests left and sla.onDeadline is Expire: workers stop after committing; those requests go to the error files as batch_expired",
                facts.deadline
            ),
        ),
    }
}

fn too_many_failed_message(facts: &Facts, progress: &Progress) -> String {
    let spec = &facts.bij.spec;
    let list: Vec<String> = progress.failed.iter().take(20).map(u32::to_string).collect();
    let why = progress.view.failed_condition.clone().map(|c| format!(" ({c})")).unwrap_or_default();
    format!(
        "{} shards failed after {} retries each (shards {}), more than retries.maxFailedShards={}{why}",
        progress.failed.len(),
        spec.retries.per_shard,
        list.join(","),
        spec.retries.max_failed_shards.max(0)
    )
}

/// Create the Job, or patch its parallelism and suspension to the decision.
fn job_change(
    facts: &Facts,
    job: Option<&Job>,
    view: &JobView,
    step: &ScaleStep,
    desired: i32,
    worker: &WorkerDefaults,
) -> Result<JobChange> {
    let bij = facts.bij;
    let Some(observed) = job else {
        let created = job_builder::desired_job(bij, facts.plan, desired, worker)?;
        let note = format!(
            "created Job {}: {} shards, parallelism {desired}{}",
            job_builder::job_name(&bij.name_any()),
            facts.plan.shards,
            if bij.spec.suspend { ", suspended" } else { "" }
        );
        return Ok(JobChange::Create { job: Box::new(created), notes: vec![Note::normal("JobCreated", note)] });
    };
    let Some(mut patch) = job_builder::scaling_patch(bij, observed, desired) else {
        return Ok(JobChange::Keep);
    };
    let mut notes = Vec::new();
    let scaled =
        patch["spec"].get("parallelism").and_then(Value::as_i64).map(|to| (view.parallelism, i32::try_from(to).unwrap_or(desired)));
    if let Some((from, to)) = scaled
        && step.scaled
    {
        patch["metadata"] = json!({ "annotations": { LAST_SCALE_ANNOTATION: facts.now.to_string() } });
        notes.push(Note::normal("Scaled", format!("scaled {from}→{to}: {}", step.decision.reason)));
    }
    match patch["spec"].get("suspend").and_then(Value::as_bool) {
        Some(true) => {
            notes.push(Note::normal("Suspended", "suspended: running workers stop after committing; no new workers start".into()))
        }
        Some(false) => notes.push(Note::normal("Resumed", format!("resumed at parallelism {desired}"))),
        None => {}
    }
    Ok(JobChange::Patch { patch, scaled, notes })
}

#[cfg(test)]
mod tests;
