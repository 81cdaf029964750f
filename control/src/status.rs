//! From what one sync observed (plan, the workers' progress records, the Job's status, its pods)
//! to the numbers the SLA core and the BatchInferenceJob status need: counts, throughput, the
//! per-worker rate estimate, start-up time, GPU-seconds, and the status itself. Pure; time is a
//! parameter.

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sluice_api::BatchInferenceJobStatus;
use sluice_api::job::{CloseReason, ReportedTotals};
use sluice_api::job::{JobPhase, RequestCounts, ShardCounts, SlaStatus, Throughput, WorkerCounts, condition_types as ct};
use sluice_api::plan::{PlanSummary, format_index_ranges, parse_index_ranges};
use sluice_api::progress::ShardProgress;

use crate::scaler::{ProgressFacts, ScalerState, WorkerFacts};

use crate::conditions::{self, Cond};
use crate::sla::{SlaDecision, ThroughputEstimator};

/// A progress record older than this (no update) no longer counts towards the live rate.
pub const STALE_PROGRESS_SECS: f64 = 90.0;
/// At most this many seconds of one attempt weigh in the rate estimate.
pub const MAX_OBSERVATION_WEIGHT_SECS: f64 = 3600.0;
/// The job's observed rate (`status.throughput`, the RATE column) is the work done in this many
/// seconds before now.
pub const RATE_WINDOW_SECS: f64 = 120.0;

/// Parse a Job's `completedIndexes`/`failedIndexes` (`"1,3-5,7"`). Malformed parts are skipped.
pub fn parse_indexes(s: Option<&str>) -> BTreeSet<u32> {
    sluice_api::plan::parse_index_ranges(s.unwrap_or(""))
}

/// What the Job reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobView {
    pub exists: bool,
    pub parallelism: i32,
    pub suspended: bool,
    pub completed: BTreeSet<u32>,
    pub failed: BTreeSet<u32>,
    /// Pods pending or running.
    pub active: i32,
    /// Pods running and ready.
    pub ready: i32,
    pub start_time: Option<Timestamp>,
    /// The Job itself failed (e.g. `maxFailedIndexes` exceeded), with its message.
    pub failed_condition: Option<String>,
    /// From the `sluice.dev/last-scale-time` annotation.
    pub last_scale_change: Option<Timestamp>,
}

/// A Job's condition `type_` when it is True, as `reason: message`.
pub fn true_condition(job: &Job, type_: &str) -> Option<String> {
    let c = job.status.as_ref()?.conditions.as_ref()?.iter().find(|c| c.type_ == type_ && c.status == "True")?;
    let reason = c.reason.clone().unwrap_or_else(|| format!("Job{type_}"));
    let message = c.message.clone().unwrap_or_else(|| format!("the Job {}", type_.to_ascii_lowercase()));
    Some(format!("{reason}: {message}"))
}

/// Annotation on the Job recording the last parallelism change (survives operator restarts).
pub const LAST_SCALE_ANNOTATION: &str = "sluice.dev/last-scale-time";

impl JobView {
    /// The scaler's memory as the cluster keeps it: the Job's parallelism (0 before the Job
    /// exists), its last-scale annotation and the status's previous SLA status.
    pub fn scaler_state(&self, previous_status: Option<SlaStatus>) -> ScalerState {
        ScalerState {
            parallelism: if self.exists { u32::try_from(self.parallelism.max(0)).unwrap_or(0) } else { 0 },
            last_change: self.last_scale_change,
            previous_status,
        }
    }

    pub fn from_job(job: Option<&Job>) -> Self {
        let Some(job) = job else { return Self::default() };
        let spec = job.spec.as_ref();
        let st = job.status.as_ref();
        let failed_condition = true_condition(job, "Failed");
        Self {
            exists: true,
            parallelism: spec.and_then(|s| s.parallelism).unwrap_or(1),
            suspended: spec.and_then(|s| s.suspend).unwrap_or(false),
            completed: parse_indexes(st.and_then(|s| s.completed_indexes.as_deref())),
            failed: parse_indexes(st.and_then(|s| s.failed_indexes.as_deref())),
            active: st.and_then(|s| s.active).unwrap_or(0),
            ready: st.and_then(|s| s.ready).unwrap_or(0),
            start_time: st.and_then(|s| s.start_time.as_ref()).map(|t| t.0),
            failed_condition,
            last_scale_change: job.metadata.annotations.as_ref().and_then(|a| a.get(LAST_SCALE_ANNOTATION)).and_then(|v| v.parse().ok()),
        }
    }
}

/// Sums over the workers' progress records.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProgressSummary {
    pub succeeded: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Shards whose record says complete.
    pub complete: BTreeSet<u32>,
    /// Requests per second over the last [`RATE_WINDOW_SECS`] (see [`window_rates`]).
    pub requests_per_second: f64,
    pub output_tokens_per_second: f64,
    pub estimator: ThroughputEstimator,
    /// Latest record update.
    pub last_update: Option<Timestamp>,
}

impl ProgressSummary {
    /// What the scaler takes from the records: requests committed (results plus errors), the
    /// per-worker throughput estimate and the measured start-up.
    pub fn scaler_progress(&self) -> ProgressFacts {
        ProgressFacts {
            done_requests: self.succeeded + self.failed,
            per_worker_rate: self.estimator.estimate(),
            startup_secs: self.estimator.startup_secs(),
        }
    }
}

fn secs(later: Timestamp, earlier: Timestamp) -> f64 {
    later.duration_since(earlier).as_secs_f64()
}

/// Summarise progress records (one per shard, keyed by shard index). `pod_created` maps an
/// attempt (pod name) to its creation time so start-up includes scheduling and image pull.
pub fn summarize(records: &BTreeMap<u32, ShardProgress>, pod_created: &BTreeMap<String, Timestamp>, now: Timestamp) -> ProgressSummary {
    let mut s = ProgressSummary::default();
    let mut by_update: Vec<&ShardProgress> = records.values().collect();
    by_update.sort_by_key(|r| (r.updated_at, r.shard));
    for r in by_update {
        s.succeeded += r.succeeded;
        s.failed += r.failed;
        s.prompt_tokens += r.prompt_tokens;
        s.completion_tokens += r.completion_tokens;
        if r.complete {
            s.complete.insert(r.shard);
        }
        if let Some(ready) = r.ready_at {
            let weight = secs(r.updated_at, ready).min(MAX_OBSERVATION_WEIGHT_SECS);
            if r.requests_per_second > 0.0 && weight > 0.0 {
                s.estimator.observe(r.requests_per_second, weight);
            }
            let started = pod_created.get(&r.attempt).copied().unwrap_or(r.started_at);
            s.estimator.observe_startup(secs(ready, started).max(0.0));
        }
        s.last_update = s.last_update.max(Some(r.updated_at));
    }
    (s.requests_per_second, s.output_tokens_per_second) = window_rates(records.values(), now);
    s
}

/// For a job whose pods report their progress: fold every final record not counted yet into
/// `totals` (which the status keeps across operator restarts), then make the summary's counts
/// `totals` plus the records of the shards not in it, and count its shards as complete.
pub fn fold_reported(totals: &mut ReportedTotals, summary: &mut ProgressSummary, records: &BTreeMap<u32, ShardProgress>) {
    let mut counted = parse_index_ranges(&totals.shards);
    let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let new_finals: Vec<&ShardProgress> = records.values().filter(|r| r.complete && !counted.contains(&r.shard)).collect();
    for r in new_finals {
        totals.succeeded += signed(r.succeeded);
        totals.failed += signed(r.failed);
        totals.prompt_tokens += signed(r.prompt_tokens);
        totals.completion_tokens += signed(r.completion_tokens);
        counted.insert(r.shard);
    }
    totals.shards = format_index_ranges(&counted);
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    let (mut ok, mut bad, mut prompt, mut completion) =
        (unsigned(totals.succeeded), unsigned(totals.failed), unsigned(totals.prompt_tokens), unsigned(totals.completion_tokens));
    for r in records.values().filter(|r| !counted.contains(&r.shard)) {
        ok += r.succeeded;
        bad += r.failed;
        prompt += r.prompt_tokens;
        completion += r.completion_tokens;
    }
    (summary.succeeded, summary.failed, summary.prompt_tokens, summary.completion_tokens) = (ok, bad, prompt, completion);
    summary.complete.extend(counted);
}

/// Seconds of `[a, b]` inside `[lo, hi]`.
fn overlap(a: f64, b: f64, lo: f64, hi: f64) -> f64 {
    (b.min(hi) - a.max(lo)).max(0.0)
}

/// The job's requests and output tokens per second over the [`RATE_WINDOW_SECS`] before `now`,
/// from the progress records alone (so it is the same after an operator restart): each attempt's
/// committed lines and tokens are spread evenly over its time from ready (or start) to its last
/// record, and a running attempt with a fresh record adds its own rate from that record to now.
/// Shards that run for a few seconds between two syncs count as much as long ones.
pub fn window_rates<'a>(records: impl IntoIterator<Item = &'a ShardProgress>, now: Timestamp) -> (f64, f64) {
    let t = |ts: Timestamp| ts.as_millisecond() as f64 / 1000.0;
    let hi = t(now);
    let lo = hi - RATE_WINDOW_SECS;
    let (mut requests, mut tokens) = (0.0, 0.0);
    let mut first_start = hi;
    for r in records {
        let start = t(r.ready_at.unwrap_or(r.started_at));
        let updated = t(r.updated_at).max(start);
        first_start = first_start.min(start);
        let committed_share = if updated > start {
            overlap(start, updated, lo, hi) / (updated - start)
        } else if (lo..=hi).contains(&updated) {
            1.0
        } else {
            0.0
        };
        requests += r.lines_done as f64 * committed_share;
        tokens += r.completion_tokens as f64 * committed_share;
        if !r.complete && hi - updated <= STALE_PROGRESS_SECS {
            let since = overlap(updated, hi, lo, hi);
            requests += r.requests_per_second.max(0.0) * since;
            tokens += r.output_tokens_per_second.max(0.0) * since;
        }
    }
    // A job younger than the window is measured over its own age.
    let span = (hi - first_start.max(lo)).max(1.0);
    (requests / span, tokens / span)
}

/// GPU-seconds of the job's pods: each pod's run time (start to finish, or to `now` while it
/// runs) times its GPUs.
pub fn pod_gpu_seconds(pods: &[Pod], gpus: i32, now: Timestamp) -> f64 {
    let gpus = f64::from(gpus.max(0));
    pods.iter()
        .filter_map(|p| {
            let st = p.status.as_ref()?;
            let start = st.start_time.as_ref()?.0;
            let finished = st
                .container_statuses
                .iter()
                .flatten()
                .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref().map(|t| t.0))
                .max();
            let end = match st.phase.as_deref() {
                Some("Succeeded") | Some("Failed") => finished.unwrap_or(start),
                _ => now,
            };
            Some(secs(end, start).max(0.0) * gpus)
        })
        .sum()
}

/// Pods Pending because the scheduler found no room.
pub fn unschedulable_pods(pods: &[Pod]) -> u32 {
    pods.iter()
        .filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Pending")
                    && s.conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
            })
        })
        .count() as u32
}

/// Seconds the longest-starting pod (bound to a node, not Ready, not finished) has been
/// starting, from its `PodScheduled` transition; `None` when no pod is starting.
pub fn oldest_starting_secs(pods: &[Pod], now: Timestamp) -> Option<f64> {
    pods.iter()
        .filter_map(|p| {
            let s = p.status.as_ref()?;
            if !matches!(s.phase.as_deref(), Some("Pending" | "Running")) {
                return None;
            }
            let conditions = s.conditions.as_deref().unwrap_or_default();
            let is_true = |t: &str| conditions.iter().find(|c| c.type_ == t).filter(|c| c.status == "True");
            if is_true("Ready").is_some() {
                return None;
            }
            let bound = is_true("PodScheduled")?.last_transition_time.as_ref()?.0;
            Some(secs(now, bound).max(0.0))
        })
        .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))))
}

/// The workers as the cluster shows them to the scaler: the Job's active and Ready pods (the
/// Job controller deletes pods above the parallelism, Ready ones included) and its pods'
/// scheduling state.
pub fn cluster_workers(view: &JobView, pods: &[Pod], now: Timestamp) -> WorkerFacts {
    WorkerFacts {
        active: u32::try_from(view.active.max(0)).unwrap_or(0),
        running_protected: u32::try_from(view.ready.max(0)).unwrap_or(0),
        unschedulable: unschedulable_pods(pods),
        oldest_starting_secs: oldest_starting_secs(pods, now),
    }
}

/// `12.5/s`, `0.31/s`, `1.2k/s`.
pub fn rate_display(rps: f64) -> String {
    if rps >= 1000.0 {
        format!("{:.1}k/s", rps / 1000.0)
    } else if rps >= 10.0 {
        format!("{rps:.1}/s")
    } else {
        format!("{rps:.2}/s")
    }
}

/// Everything the status is built from.
#[derive(Clone, Debug)]
pub struct StatusInput<'a> {
    pub now: Timestamp,
    pub generation: Option<i64>,
    pub phase: JobPhase,
    pub plan: &'a PlanSummary,
    pub job: &'a JobView,
    pub progress: &'a ProgressSummary,
    pub completed: &'a BTreeSet<u32>,
    pub failed: &'a BTreeSet<u32>,
    pub desired: i32,
    pub deadline: Timestamp,
    pub decision: &'a SlaDecision,
    pub gpu_seconds: f64,
    pub manifest_uri: Option<String>,
    /// For Failed: why.
    pub failure: Option<String>,
    /// Why the job is being (or was) closed before every request ran.
    pub closing: Option<CloseReason>,
}

/// Kubernetes serializes times to whole seconds; round so a stored status compares equal.
fn whole_seconds(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

fn round_rate(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The new status, starting from the old one (conditions keep their transition times, start
/// and completion times are kept once set, GPU-seconds never go down).
pub fn build(old: &BatchInferenceJobStatus, i: &StatusInput<'_>) -> BatchInferenceJobStatus {
    let total = i64::try_from(i.plan.line_count).unwrap_or(i64::MAX);
    let requests = RequestCounts {
        total,
        succeeded: i64::try_from(i.progress.succeeded).unwrap_or(i64::MAX),
        failed: i64::try_from(i.progress.failed).unwrap_or(i64::MAX),
    };
    let done = requests.succeeded + requests.failed;
    let shards_total = i32::try_from(i.plan.shards).unwrap_or(i32::MAX);
    let active = if i.phase.is_terminal() { 0 } else { i.job.active };
    let shards = ShardCounts {
        total: shards_total,
        completed: i32::try_from(i.completed.len()).unwrap_or(i32::MAX),
        failed: i32::try_from(i.failed.len()).unwrap_or(i32::MAX),
        active,
    };
    let desired = if i.phase.is_terminal() { 0 } else { i.desired };
    let workers = WorkerCounts { desired, active, display: Some(format!("{active}/{desired}")) };
    let live = !i.phase.is_terminal() && i.phase != JobPhase::Suspended;
    let rps = if live { round_rate(i.progress.requests_per_second) } else { 0.0 };
    let throughput = Throughput {
        requests_per_second: rps,
        output_tokens_per_second: if live { round_rate(i.progress.output_tokens_per_second) } else { 0.0 },
        per_worker_requests_per_second: round_rate(i.progress.estimator.estimate().map_or(0.0, |e| e.mean)),
        display: Some(rate_display(rps)),
    };
    let d = i.decision;
    let completion_time = match i.phase {
        p if p.is_terminal() => old.completion_time.clone().or(Some(whole_seconds(i.now))),
        _ => None,
    };
    let start_time = old.start_time.clone().or_else(|| i.job.start_time.map(whole_seconds));

    let mut conds = old.conditions.clone();
    let now = i.now;
    let g = i.generation;
    let planned = format!("{} requests in {} shards", i.plan.line_count, i.plan.shards);
    conditions::set(&mut conds, Cond::new(ct::ADMITTED, true, "Planned", planned), g, now);
    let closed_note =
        |r: CloseReason| format!("committed results are kept; every request that never ran is in the error files as {}", r.code());
    let (progressing, reason, msg) = match (i.phase, i.closing) {
        (JobPhase::Running, Some(r @ CloseReason::Cancelled)) => {
            (true, "Cancelling", format!("spec.cancel is set: workers stop after committing; {}", closed_note(r)))
        }
        (JobPhase::Running, Some(r @ CloseReason::Expired)) => {
            (true, "Expiring", format!("the deadline passed with sla.onDeadline Expire: workers stop after committing; {}", closed_note(r)))
        }
        (JobPhase::Running, None) => (true, "Running", format!("{done}/{total} requests done, {active} workers active")),
        (JobPhase::Suspended, _) => (false, "Suspended", "spec.suspend is true".to_string()),
        (JobPhase::Succeeded, _) => (false, "Complete", "every shard is committed".to_string()),
        (JobPhase::Failed, _) => (false, "Failed", i.failure.clone().unwrap_or_default()),
        (JobPhase::Cancelled, _) => (false, "Cancelled", closed_note(CloseReason::Cancelled)),
        (JobPhase::Expired, _) => (false, "Expired", closed_note(CloseReason::Expired)),
        (JobPhase::Pending | JobPhase::Planning, _) => (true, "Planning", "planning shards".to_string()),
    };
    conditions::set(&mut conds, Cond::new(ct::PROGRESSING, progressing, reason, msg), g, now);
    let on_track = matches!(d.status, SlaStatus::OnTrack | SlaStatus::Met);
    let message = match &d.infeasible {
        Some(inf) => inf.suggestion.clone(),
        None => d.reason.clone(),
    };
    conditions::set(&mut conds, Cond::new(ct::ON_TRACK, on_track, d.status.as_str(), message), g, now);
    conditions::set(
        &mut conds,
        Cond::new(ct::SUSPENDED, i.phase == JobPhase::Suspended, if i.phase == JobPhase::Suspended { "Suspended" } else { "Running" }, ""),
        g,
        now,
    );
    if i.phase == JobPhase::Succeeded {
        conditions::set(
            &mut conds,
            Cond::new(
                ct::COMPLETE,
                true,
                "AllShardsCommitted",
                format!("manifest written: {}", i.manifest_uri.clone().unwrap_or_default()),
            ),
            g,
            now,
        );
    } else {
        conditions::remove(&mut conds, ct::COMPLETE);
    }
    if i.phase == JobPhase::Failed {
        conditions::set(&mut conds, Cond::new(ct::FAILED, true, "ShardsFailed", i.failure.clone().unwrap_or_default()), g, now);
    } else {
        conditions::remove(&mut conds, ct::FAILED);
    }

    let closed = matches!(i.phase, JobPhase::Cancelled | JobPhase::Expired);
    BatchInferenceJobStatus {
        phase: i.phase,
        observed_generation: g,
        conditions: conds,
        progress: Some(format!("{done}/{total}")),
        requests,
        shards,
        workers,
        throughput,
        // A job stopped by a cancel or at its deadline has no projection, and no SLA verdict for
        // a cancel (the user stopped it); one stopped at its deadline missed it.
        projected_completion_time: if closed { None } else { d.projected_completion.map(whole_seconds) },
        deadline: Some(whole_seconds(i.deadline)),
        slack_seconds: d.slack_secs.filter(|s| s.is_finite()).map(|s| s.round() as i64),
        sla_status: match i.phase {
            JobPhase::Cancelled => None,
            JobPhase::Expired => Some(SlaStatus::Missed),
            _ => Some(d.status),
        },
        gpu_seconds: (i.gpu_seconds.max(old.gpu_seconds) * 10.0).round() / 10.0,
        start_time,
        completion_time,
        close_reason: i.closing.or(old.close_reason),
        manifest_uri: i.manifest_uri.clone().or_else(|| old.manifest_uri.clone()),
        reported: old.reported.clone(),
        fleet: old.fleet.clone(),
    }
}

/// Whether `new` differs from `old` only in what moves with the clock while nothing happens:
/// the windowed rates, the projection and slack, GPU-seconds, condition messages, and the fleet's
/// message. Such a status need not be rewritten at every reconcile.
pub fn only_time_moved(old: &BatchInferenceJobStatus, new: &BatchInferenceJobStatus) -> bool {
    let calm = |s: &BatchInferenceJobStatus| {
        let mut s = s.clone();
        s.throughput = Default::default();
        s.projected_completion_time = None;
        s.slack_seconds = None;
        s.gpu_seconds = 0.0;
        for c in &mut s.conditions {
            c.message.clear();
        }
        if let Some(f) = s.fleet.as_mut() {
            f.message.clear();
        }
        s
    };
    calm(old) == calm(new)
}

/// `now` plus whole seconds (saturating at the far future).
pub fn plus_secs(now: Timestamp, s: i64) -> Timestamp {
    now.checked_add(SignedDuration::from_secs(s)).unwrap_or(Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn record(shard: u32, done: u64, complete: bool, updated: &str) -> ShardProgress {
        ShardProgress {
            shard,
            attempt: format!("pod-{shard}"),
            lines_total: 100,
            lines_done: done,
            succeeded: done.saturating_sub(1),
            failed: u64::from(done > 0),
            prompt_tokens: done * 10,
            completion_tokens: done * 5,
            started_at: t("2026-01-01T00:00:00Z"),
            updated_at: t(updated),
            ready_at: Some(t("2026-01-01T00:01:00Z")),
            requests_per_second: 2.0,
            output_tokens_per_second: 10.0,
            complete,
        }
    }

    #[test]
    fn indexes_parse_ranges() {
        assert_eq!(parse_indexes(Some("0,2-4,9")), BTreeSet::from([0, 2, 3, 4, 9]));
        assert_eq!(parse_indexes(Some("")), BTreeSet::new());
        assert_eq!(parse_indexes(None), BTreeSet::new());
        assert_eq!(parse_indexes(Some("x,1")), BTreeSet::from([1]));
    }

    #[test]
    fn summary_counts_live_rates_only_from_fresh_records() {
        let now = t("2026-01-01T00:10:00Z");
        let records = BTreeMap::from([
            (0, record(0, 100, true, "2026-01-01T00:05:00Z")),
            (1, record(1, 40, false, "2026-01-01T00:09:50Z")),
            (2, record(2, 10, false, "2026-01-01T00:02:00Z")), // stale
        ]);
        let pods = BTreeMap::from([("pod-1".to_string(), t("2025-12-31T23:59:00Z"))]);
        let s = summarize(&records, &pods, now);
        assert_eq!((s.succeeded, s.failed), (99 + 39 + 9, 3));
        assert_eq!(s.complete, BTreeSet::from([0]));
        // Window 00:08:00-00:10:00: shard 1 committed 40 lines over 00:01:00-00:09:50 (110 s of
        // them in the window) and runs at 2/s since its last record; shard 0 finished before the
        // window, shard 2 is stale.
        let expected = (40.0 * 110.0 / 530.0 + 2.0 * 10.0) / 120.0;
        assert!((s.requests_per_second - expected).abs() < 1e-9, "{}", s.requests_per_second);
        let est = s.estimator.estimate().unwrap();
        assert!((est.mean - 2.0).abs() < 1e-9);
        // pod-1 started a minute before its process: its start-up counts from pod creation.
        assert!(s.estimator.startup_secs().unwrap() > 60.0);
        assert_eq!(s.last_update, Some(t("2026-01-01T00:09:50Z")));
    }

    #[test]
    fn rate_counts_shards_that_finished_between_syncs() {
        // Short shards: each runs 5 s and is complete before any sync sees it running. The rate
        // is what they did in the window, not 0.
        let now = t("2026-01-01T00:10:00Z");
        let short = |shard: u32, ready: &str, done: &str| ShardProgress {
            ready_at: Some(t(ready)),
            started_at: t(ready),
            updated_at: t(done),
            lines_done: 50,
            completion_tokens: 500,
            complete: true,
            ..record(shard, 50, true, done)
        };
        let records = BTreeMap::from([
            (0, short(0, "2026-01-01T00:08:10Z", "2026-01-01T00:08:15Z")),
            (1, short(1, "2026-01-01T00:09:00Z", "2026-01-01T00:09:05Z")),
            (2, short(2, "2026-01-01T00:06:00Z", "2026-01-01T00:06:05Z")), // before the window
        ]);
        let (rps, tps) = window_rates(records.values(), now);
        assert!((rps - 100.0 / 120.0).abs() < 1e-9, "{rps}");
        assert!((tps - 1000.0 / 120.0).abs() < 1e-9, "{tps}");
        // A job younger than the window: measured over its age.
        let young = BTreeMap::from([(0, short(0, "2026-01-01T00:09:30Z", "2026-01-01T00:09:40Z"))]);
        let (rps, _) = window_rates(young.values(), now);
        assert!((rps - 50.0 / 30.0).abs() < 1e-9, "{rps}");
        // One long shard, records every 15 s at a steady 2/s: the rate is 2/s.
        let long = ShardProgress {
            ready_at: Some(t("2026-01-01T00:00:00Z")),
            started_at: t("2026-01-01T00:00:00Z"),
            updated_at: t("2026-01-01T00:09:50Z"),
            lines_done: 1180,
            requests_per_second: 2.0,
            complete: false,
            ..record(3, 1180, false, "2026-01-01T00:09:50Z")
        };
        let (rps, _) = window_rates([&long], now);
        assert!((rps - 2.0).abs() < 1e-9, "{rps}");
        assert_eq!(window_rates([], now), (0.0, 0.0));
    }

    #[test]
    fn reported_totals_survive_a_restart_without_double_counting() {
        let now = t("2026-01-01T00:10:00Z");
        let records =
            BTreeMap::from([(0, record(0, 100, true, "2026-01-01T00:05:00Z")), (1, record(1, 40, false, "2026-01-01T00:09:50Z"))]);
        let mut totals = ReportedTotals::default();
        let mut s = summarize(&records, &BTreeMap::new(), now);
        fold_reported(&mut totals, &mut s, &records);
        assert_eq!(totals.shards, "0");
        assert_eq!((totals.succeeded, totals.failed), (99, 1));
        assert_eq!((s.succeeded, s.failed), (99 + 39, 2));
        // Again with the same records: nothing is counted twice.
        let again = totals.clone();
        fold_reported(&mut totals, &mut s, &records);
        assert_eq!(totals, again);
        // After a restart only shard 1's next record has arrived; shard 0 comes from the totals.
        let after = BTreeMap::from([(1, record(1, 60, false, "2026-01-01T00:10:00Z"))]);
        let mut s = summarize(&after, &BTreeMap::new(), now);
        fold_reported(&mut totals, &mut s, &after);
        assert_eq!((s.succeeded, s.failed), (99 + 59, 2));
        assert!(s.complete.contains(&0));
    }

    #[test]
    fn rate_display_formats() {
        assert_eq!(rate_display(0.314), "0.31/s");
        assert_eq!(rate_display(12.54), "12.5/s");
        assert_eq!(rate_display(1234.0), "1.2k/s");
    }

    #[test]
    fn gpu_seconds_from_pods() {
        let pods: Vec<Pod> = serde_yaml::from_str(
            r#"
- status: {phase: Running, startTime: "2026-01-01T00:00:00Z"}
- status:
    phase: Succeeded
    startTime: "2026-01-01T00:00:00Z"
    containerStatuses:
      - {name: worker, image: w, imageID: "", ready: false, restartCount: 0, state: {terminated: {exitCode: 0, finishedAt: "2026-01-01T00:01:40Z"}}}
- status: {phase: Pending}
"#,
        )
        .unwrap();
        assert_eq!(pod_gpu_seconds(&pods, 2, t("2026-01-01T00:10:00Z")), (600.0 + 100.0) * 2.0);
        assert_eq!(unschedulable_pods(&pods), 0);
    }
}
