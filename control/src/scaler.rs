//! The one scaling loop step: observations in, the parallelism to apply and the scaler's next
//! memory out, with every guard inside. The reconciler, local mode and `sluice-sim` only
//! translate their world into [`Observed`] and apply the [`ScaleStep`]. Pure, like [`crate::sla`].

use jiff::Timestamp;
use sluice_api::job::SlaStatus;

use crate::sla::{self, RateEstimate, SlaConfig, SlaDecision, SlaObservation};

/// What the scaler remembers between steps. The reconciler keeps it in Kubernetes (the Job's
/// parallelism, its last-scale annotation, `status.slaStatus`); local mode and the simulator in
/// memory.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScalerState {
    /// The parallelism in force (0 before the first step).
    pub parallelism: u32,
    /// When the parallelism last changed by a scaling decision.
    pub last_change: Option<Timestamp>,
    /// The SLA status of the previous step (for the deadband).
    pub previous_status: Option<SlaStatus>,
}

/// The workers, as each world sees them: the only part of an observation that differs in kind
/// between a cluster (`status::cluster_workers`), local mode and the simulator.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WorkerFacts {
    /// Workers running a shard or starting.
    pub active: u32,
    /// Workers that lowering the parallelism would stop in the middle of a shard: the Job's
    /// Ready pods on a cluster (the Job controller deletes pods above the parallelism); 0 where
    /// a lower count only stops new starts (local mode, whose workers always finish).
    pub running_protected: u32,
    /// Worker pods Pending for lack of capacity.
    pub unschedulable: u32,
    /// How long the longest-starting worker (bound, not ready) has been starting: before any
    /// start-up is measured, a lower bound once it exceeds the prior.
    pub oldest_starting_secs: Option<f64>,
}

/// What the progress records tell the scaler.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProgressFacts {
    /// Requests committed (clamped to the plan by the step).
    pub done_requests: u64,
    /// Per-worker throughput; `None` before any progress.
    pub per_worker_rate: Option<RateEstimate>,
    /// Measured pod start-up seconds (creation to first request admitted).
    pub startup_secs: Option<f64>,
}

/// One observation of the job, in any world.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The time of this step; when `finished`, the completion time.
    pub now: Timestamp,
    /// Start of the window (the job's creation).
    pub window_start: Timestamp,
    /// The effective deadline.
    pub deadline: Timestamp,
    /// Requests in the plan.
    pub total_requests: u64,
    /// What the progress records tell (`ProgressSummary::scaler_progress` in every world).
    pub progress: ProgressFacts,
    /// Shards in the plan.
    pub total_shards: u32,
    /// Shards not yet committed.
    pub remaining_shards: u32,
    /// Every shard is committed.
    pub finished: bool,
    /// The job is suspended: the parallelism is held as it is.
    pub suspended: bool,
    /// The workers.
    pub workers: WorkerFacts,
    /// The most workers the fleet scheduler grants under a GPU budget (none without one): the
    /// step never goes above it, except to keep workers mid-shard until their shard is done.
    pub fleet_cap: Option<u32>,
}

/// The result of one step.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleStep {
    /// The SLA core's decision (status, projection, reasons).
    pub decision: SlaDecision,
    /// The parallelism to apply, after the guards.
    pub parallelism: u32,
    /// The parallelism changed by a scaling decision (not by following the shards left, not
    /// at the end): worth an Event, and recorded as the last change.
    pub scaled: bool,
    /// The memory for the next step.
    pub next: ScalerState,
}

/// The scaling loop's step function for one job's configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Scaler {
    cfg: SlaConfig,
}

impl Scaler {
    /// A scaler with this configuration.
    pub fn new(cfg: SlaConfig) -> Self {
        Self { cfg }
    }

    /// The configuration.
    pub fn config(&self) -> &SlaConfig {
        &self.cfg
    }

    /// One step: decide from `obs` given the memory `state`, then apply the guards:
    /// - a suspended job keeps its parallelism;
    /// - the parallelism never drops below the workers it would stop mid-shard;
    /// - while work remains, at least one worker and no more than the shards left.
    pub fn step(&self, state: &ScalerState, obs: &Observed) -> ScaleStep {
        let sla_obs = SlaObservation {
            now: obs.now,
            window_start: obs.window_start,
            deadline: obs.deadline,
            total_requests: obs.total_requests,
            done_requests: obs.progress.done_requests.min(obs.total_requests),
            per_worker_rate: obs.progress.per_worker_rate,
            startup_secs: obs
                .progress
                .startup_secs
                .or_else(|| obs.workers.oldest_starting_secs.filter(|&s| s.is_finite() && s > self.cfg.prior_startup_secs)),
            active_workers: obs.workers.active,
            current_desired: state.parallelism,
            total_shards: obs.total_shards,
            remaining_shards: obs.remaining_shards,
            unschedulable_workers: obs.workers.unschedulable,
            last_scale_change: state.last_change,
            previous_status: state.previous_status,
            finished: obs.finished,
        };
        let decision = sla::decide(&self.cfg, &sla_obs);
        let mut target = decision.desired_workers;
        if !obs.finished && obs.remaining_shards > 0 {
            target = target.clamp(1, obs.remaining_shards.max(1));
        }
        if let Some(cap) = obs.fleet_cap {
            target = target.min(cap);
        }
        let parallelism = if obs.suspended && state.parallelism > 0 {
            state.parallelism
        } else if target < state.parallelism && !obs.finished {
            target.max(obs.workers.running_protected.min(state.parallelism))
        } else {
            target
        };
        let scaled = parallelism != state.parallelism && !decision.shard_capped && !obs.finished;
        let next = ScalerState {
            parallelism,
            last_change: if scaled { Some(obs.now) } else { state.last_change },
            previous_status: Some(decision.status),
        };
        ScaleStep { decision, parallelism, scaled, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;
    use sluice_api::job::SlaPolicy;

    fn at(secs: i64) -> Timestamp {
        Timestamp::UNIX_EPOCH + SignedDuration::from_secs(secs)
    }

    fn observed(now: i64) -> Observed {
        Observed {
            now: at(now),
            window_start: at(0),
            deadline: at(3600),
            total_requests: 10_000,
            progress: ProgressFacts::default(),
            total_shards: 100,
            remaining_shards: 100,
            finished: false,
            suspended: false,
            workers: WorkerFacts::default(),
            fleet_cap: None,
        }
    }

    fn scaler() -> Scaler {
        Scaler::new(SlaConfig::new(1, 20, SlaPolicy::Deadline, 0.1, 1.0))
    }

    #[test]
    fn first_step_scales_up_and_records_the_change() {
        let step = scaler().step(&ScalerState::default(), &observed(0));
        assert!(step.parallelism >= 1 && step.parallelism <= 20, "{step:?}");
        assert!(step.scaled);
        assert_eq!(step.next.last_change, Some(at(0)));
        assert_eq!(step.next.parallelism, step.parallelism);
        assert_eq!(step.next.previous_status, Some(step.decision.status));
    }

    #[test]
    fn suspended_job_keeps_its_parallelism() {
        let state = ScalerState { parallelism: 7, ..Default::default() };
        let obs = Observed { suspended: true, ..observed(60) };
        let step = scaler().step(&state, &obs);
        assert_eq!(step.parallelism, 7);
        assert!(!step.scaled);
        assert_eq!(step.next.last_change, None);
    }

    #[test]
    fn never_lowers_below_workers_it_would_stop() {
        // Far ahead of the deadline: the core wants fewer workers than the 20 in force.
        let rate = RateEstimate { mean: 50.0, stddev: 1.0, samples: 50 };
        let workers = WorkerFacts { active: 20, running_protected: 12, ..WorkerFacts::default() };
        let obs =
            Observed { progress: ProgressFacts { per_worker_rate: Some(rate), ..ProgressFacts::default() }, workers, ..observed(1200) };
        let state = ScalerState { parallelism: 20, last_change: Some(at(0)), previous_status: Some(SlaStatus::OnTrack) };
        let step = scaler().step(&state, &obs);
        assert!(step.decision.desired_workers < 12, "{:?}", step.decision);
        assert_eq!(step.parallelism, 12);
        // Without running workers to protect the same step goes down to the core's answer.
        let free = scaler().step(&state, &Observed { workers: WorkerFacts { running_protected: 0, ..workers }, ..obs });
        assert_eq!(free.parallelism, free.decision.desired_workers);
    }

    #[test]
    fn the_fleet_cap_bounds_the_step_but_never_stops_a_shard() {
        let workers = WorkerFacts { active: 6, running_protected: 4, ..WorkerFacts::default() };
        let state = ScalerState { parallelism: 6, last_change: Some(at(0)), previous_status: Some(SlaStatus::OnTrack) };
        // Behind the deadline the job alone would want more; the fleet grants 2.
        let obs = Observed { fleet_cap: Some(2), workers, ..observed(3000) };
        let step = scaler().step(&state, &obs);
        assert_eq!(step.parallelism, 4, "the 4 workers mid-shard finish their shards first");
        let step = scaler().step(&state, &Observed { workers: WorkerFacts { running_protected: 0, ..workers }, ..obs.clone() });
        assert_eq!(step.parallelism, 2);
        // A job waiting for GPUs gets none, even with work left.
        let step = scaler().step(&ScalerState::default(), &Observed { fleet_cap: Some(0), ..observed(0) });
        assert_eq!(step.parallelism, 0);
    }

    #[test]
    fn done_count_is_clamped_to_the_plan() {
        // Progress records counting more than the plan (a retried shard's two attempts) must
        // not look like negative work left.
        let obs = Observed {
            progress: ProgressFacts { done_requests: 12_000, ..ProgressFacts::default() },
            remaining_shards: 3,
            ..observed(600)
        };
        let step = scaler().step(&ScalerState { parallelism: 4, ..Default::default() }, &obs);
        assert!(step.parallelism >= 1 && step.parallelism <= 3, "{step:?}");
    }

    #[test]
    fn finishing_is_not_a_scaling_decision() {
        let obs = Observed {
            finished: true,
            progress: ProgressFacts { done_requests: 10_000, ..ProgressFacts::default() },
            remaining_shards: 0,
            ..observed(3000)
        };
        let state = ScalerState { parallelism: 5, last_change: Some(at(100)), previous_status: Some(SlaStatus::OnTrack) };
        let step = scaler().step(&state, &obs);
        assert_eq!(step.parallelism, 0);
        assert!(!step.scaled);
        assert_eq!(step.next.last_change, Some(at(100)));
        assert_eq!(step.decision.status, SlaStatus::Met);
    }
}
