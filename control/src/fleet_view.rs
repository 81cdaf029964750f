//! A BatchInferenceJob as the fleet scheduler sees it: its remaining work, throughput (measured,
//! else the model's learned profile, else the prior), deadline and workers, from its status (or
//! from a manifest not yet applied), and the basis of a quote in words. Shared by the operator,
//! `sluice quote` and `kubectl sluice`.

use jiff::Timestamp;
use sluice_api::BatchInferenceJob;
use sluice_api::budget::ThroughputProfile;
use sluice_api::deadline::effective_deadline;
use sluice_api::job::JobPhase;

use crate::fleet::FleetJob;
use crate::sla::{PRIOR_STARTUP_SECS, RateEstimate, prior_per_worker_rps};

/// The annotation giving a job's tier in the fleet (an integer; higher is planned first).
pub const PRIORITY_ANNOTATION: &str = "sluice.dev/priority";

/// Where a job's planning throughput comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum RateBasis {
    Measured,
    Profile { key: String, jobs: u32 },
    Prior,
}

impl RateBasis {
    /// In words, for a quote.
    pub fn describe(&self, rps: f64) -> String {
        match self {
            RateBasis::Measured => format!("measured throughput ({rps:.3} requests/s per worker)"),
            RateBasis::Profile { key, jobs } => {
                format!(
                    "learned profile {key} from {jobs} finished job{} ({rps:.3} requests/s per worker)",
                    if *jobs == 1 { "" } else { "s" }
                )
            }
            RateBasis::Prior => format!(
                "prior: no job of this model has finished yet, every request assumed to reach maxTokens ({rps:.3} requests/s per worker, ±50 %)"
            ),
        }
    }
}

fn secs(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

/// The per-worker rate to plan with before a job has measured its own, and its basis.
pub fn unmeasured_rate(bij: &BatchInferenceJob, profile: Option<&ThroughputProfile>) -> (RateEstimate, RateBasis, f64) {
    match profile.filter(|p| p.jobs > 0 && p.per_worker_requests_per_second > 0.0) {
        Some(p) => {
            let mean = p.rate_for(None);
            let key = ThroughputProfile::key(&p.model, &p.gpu_type);
            let rate = RateEstimate { mean, stddev: p.stddev.max(0.15 * mean), samples: p.jobs };
            (rate, RateBasis::Profile { key, jobs: p.jobs }, p.startup_seconds.unwrap_or(PRIOR_STARTUP_SECS))
        }
        None => {
            let rps = prior_per_worker_rps(&bij.spec);
            (RateEstimate { mean: rps, stddev: 0.5 * rps, samples: 1 }, RateBasis::Prior, PRIOR_STARTUP_SECS)
        }
    }
}

/// What the caller knows beyond the object: the work left and the workers now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobFacts {
    /// Requests in the plan (0 before it is planned).
    pub total_requests: u64,
    /// Requests committed.
    pub done_requests: u64,
    pub total_shards: u32,
    pub remaining_shards: u32,
    /// The measured rate, if any.
    pub measured: Option<RateEstimate>,
    /// Measured start-up seconds, if any.
    pub startup_secs: Option<f64>,
    /// Workers now (the Job's parallelism).
    pub current_workers: u32,
    /// Workers the plan may not take away in this step.
    pub protected_workers: u32,
}

impl JobFacts {
    /// The facts an earlier reconcile left in the job's status; `workers` is the parallelism in
    /// force (the operator's own record when it has one).
    pub fn from_status(bij: &BatchInferenceJob, workers: Option<u32>) -> Self {
        let st = bij.status.clone().unwrap_or_default();
        let done = (st.requests.succeeded + st.requests.failed).max(0) as u64;
        let shards = st.shards.total.max(0) as u32;
        let left_shards = shards.saturating_sub((st.shards.completed + st.shards.failed).max(0) as u32);
        let rps = st.throughput.per_worker_requests_per_second;
        let stopped = bij.spec.suspend || st.phase == JobPhase::Suspended || st.phase.is_terminal();
        let current = if stopped { 0 } else { workers.unwrap_or(st.workers.desired.max(0) as u32) };
        JobFacts {
            total_requests: st.requests.total.max(0) as u64,
            done_requests: done,
            total_shards: shards,
            remaining_shards: left_shards,
            measured: (rps > 0.0).then_some(RateEstimate { mean: rps, stddev: 0.1 * rps, samples: 10 }),
            startup_secs: None,
            current_workers: current,
            protected_workers: current,
        }
    }
}

/// The job as a [`FleetJob`], with the basis of its rate; `None` when it has nothing to plan
/// (finished, or not planned yet) or its deadline cannot be read. A manifest not yet applied
/// (no creation time) arrives at `now`.
pub fn fleet_job(
    bij: &BatchInferenceJob,
    facts: &JobFacts,
    profile: Option<&ThroughputProfile>,
    now: Timestamp,
) -> Option<(FleetJob, RateBasis)> {
    let st = bij.status.as_ref();
    if st.is_some_and(|s| s.phase.is_terminal()) || facts.total_requests == 0 {
        return None;
    }
    let created = bij.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
    let deadline = effective_deadline(&bij.spec.sla, created).ok()?;
    let (prior, basis, startup) = unmeasured_rate(bij, profile);
    let (rate, basis) = match facts.measured {
        Some(m) => (m, RateBasis::Measured),
        None => (prior, basis),
    };
    let ns = bij.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = bij.metadata.name.clone().unwrap_or_default();
    let w = &bij.spec.workers;
    let job = FleetJob {
        key: format!("{ns}/{name}"),
        namespace: ns,
        priority: bij
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PRIORITY_ANNOTATION))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0),
        arrived: secs(created),
        deadline: secs(deadline),
        remaining_requests: facts.total_requests.saturating_sub(facts.done_requests) as f64,
        rate,
        startup_secs: facts.startup_secs.unwrap_or(startup),
        gpus_per_worker: w.gpus.max(1) as u32,
        min_workers: w.min.max(0) as u32,
        max_workers: w.max.max(1) as u32,
        current_workers: facts.current_workers,
        protected_workers: facts.protected_workers,
        releasing_workers: 0,
        remaining_shards: facts.remaining_shards,
        lending: st.and_then(|s| s.fleet.as_ref()).is_some_and(|f| f.reason == "Lent"),
    };
    Some((job, basis))
}

/// A job that holds `workers` but has nothing the plan can use yet (its status not planned, or
/// read before its latest write): it only holds GPUs, which nobody else may take.
pub fn holder(bij: &BatchInferenceJob, workers: u32) -> FleetJob {
    let ns = bij.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    FleetJob {
        key: format!("{ns}/{}", bij.metadata.name.clone().unwrap_or_default()),
        namespace: ns,
        priority: 0,
        arrived: 0.0,
        deadline: 0.0,
        remaining_requests: 0.0,
        rate: RateEstimate { mean: 1.0, stddev: 0.0, samples: 1 },
        startup_secs: 0.0,
        gpus_per_worker: bij.spec.workers.gpus.max(1) as u32,
        min_workers: 0,
        max_workers: workers,
        current_workers: workers,
        protected_workers: workers,
        releasing_workers: 0,
        remaining_shards: 0,
        lending: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bij(status: serde_json::Value) -> BatchInferenceJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "BatchInferenceJob",
            "metadata": {"name": "j", "namespace": "ml", "creationTimestamp": "2026-12-06T10:00:00Z",
                         "annotations": {PRIORITY_ANNOTATION: "5"}},
            "spec": {"model": {"uri": "s3://m/qwen"}, "input": {"uri": "s3://b/in.jsonl"}, "output": {"uri": "s3://b/out/"},
                     "sla": {"deadline": "2026-12-06T14:00:00Z"}, "workers": {"max": 4, "gpus": 2}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_running_job_from_its_status() {
        let b = bij(serde_json::json!({
            "phase": "Running", "requests": {"total": 1000, "succeeded": 300, "failed": 100},
            "shards": {"total": 10, "completed": 4, "failed": 0, "active": 3}, "workers": {"desired": 3, "active": 3},
            "throughput": {"requestsPerSecond": 3.0, "outputTokensPerSecond": 300.0, "perWorkerRequestsPerSecond": 1.0}
        }));
        let (j, basis) = fleet_job(&b, &JobFacts::from_status(&b, None), None, Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!((j.key.as_str(), j.priority, j.remaining_requests, j.remaining_shards), ("ml/j", 5, 600.0, 6));
        assert_eq!((j.current_workers, j.protected_workers, j.gpus_per_worker), (3, 3, 2));
        assert_eq!(basis, RateBasis::Measured);
        assert_eq!(j.deadline - j.arrived, 4.0 * 3600.0);
    }

    #[test]
    fn before_any_progress_the_profile_wins_over_the_prior() {
        let b = bij(serde_json::json!({"phase": "Running", "requests": {"total": 1000, "succeeded": 0, "failed": 0},
            "shards": {"total": 10, "completed": 0, "failed": 0, "active": 0}}));
        let facts = JobFacts::from_status(&b, Some(0));
        let (_, basis) = fleet_job(&b, &facts, None, Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(basis, RateBasis::Prior);
        let mut p = ThroughputProfile { model: "s3://m/qwen".into(), gpu_type: "any".into(), ..Default::default() };
        p.observe(2.5, 100.0, Some(40.0), "now".into());
        let (j, basis) = fleet_job(&b, &facts, Some(&p), Timestamp::UNIX_EPOCH).unwrap();
        assert!(matches!(basis, RateBasis::Profile { jobs: 1, .. }), "{basis:?}");
        assert_eq!((j.rate.mean, j.startup_secs), (2.5, 40.0));
        // Finished or unplanned jobs have nothing to plan.
        let done = bij(serde_json::json!({"phase": "Succeeded", "requests": {"total": 10, "succeeded": 10, "failed": 0}}));
        assert!(fleet_job(&done, &JobFacts::from_status(&done, None), None, Timestamp::UNIX_EPOCH).is_none());
        let new = bij(serde_json::json!({}));
        assert!(fleet_job(&new, &JobFacts::from_status(&new, None), None, Timestamp::UNIX_EPOCH).is_none());
    }
}
