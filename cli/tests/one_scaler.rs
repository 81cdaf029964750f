//! The simulator, the reconciler and local mode step one `Scaler`; what differs is only how each
//! world shows itself. This runs simulator scenarios (capacity limits, slow start-ups,
//! preemptions, failures) and at every sync replays the same moment as the reconciler sees it
//! on a cluster: the Job (parallelism, Ready and active pods, the last-scale annotation), its
//! pods (Unschedulable, bound but not Ready), the status's previous SLA status, and the same
//! job facts and progress records (`Sluice::observed`, through `status::summarize`). The reconciler's translations
//! (`JobView::scaler_state`, `status::cluster_workers`) must give the very step the simulator
//! took, sync after sync, with the cluster's memory kept as the reconciler keeps it.
//! Local mode's only difference, its workers (`local_workers`), is checked at the end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sluice_api::job::SlaStatus;
use sluice_cli::local::local_workers;
use sluice_cli::sim::policy::{Sluice, spec_for};
use sluice_cli::sim::scenario;
use sluice_cli::sim::world::{self, Controller, Decision, View};
use sluice_control::scaler::WorkerFacts;
use sluice_control::sla::SlaConfig;
use sluice_control::status::{self, JobView};

/// What the reconciler keeps between syncs: the Job and the status.
#[derive(Default)]
struct ClusterMemory {
    job_exists: bool,
    parallelism: i32,
    last_scale_annotation: Option<Timestamp>,
    sla_status: Option<SlaStatus>,
}

struct Replay {
    sim: Sluice,
    cluster: ClusterMemory,
    syncs: u32,
    scaled: u32,
    protected_binds: u32,
    starting_bound_used: u32,
}

fn pod(phase: &str, conditions: Vec<PodCondition>) -> Pod {
    Pod { status: Some(PodStatus { phase: Some(phase.into()), conditions: Some(conditions), ..PodStatus::default() }), ..Pod::default() }
}

fn condition(type_: &str, status: &str, reason: Option<&str>, at: Option<Timestamp>) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.map(Into::into),
        last_transition_time: at.map(Time),
        ..PodCondition::default()
    }
}

/// The pods the API server would list at this moment: the unschedulable ones, the longest
/// starting one (bound, not Ready) and a Ready one.
fn pods_of(v: &View, now: Timestamp) -> Vec<Pod> {
    let mut pods: Vec<Pod> =
        (0..v.unschedulable).map(|_| pod("Pending", vec![condition("PodScheduled", "False", Some("Unschedulable"), None)])).collect();
    if let Some(secs) = v.oldest_starting_secs {
        let bound = now - SignedDuration::from_secs_f64(secs);
        pods.push(pod(
            "Running",
            vec![condition("PodScheduled", "True", None, Some(bound)), condition("Ready", "False", None, Some(bound))],
        ));
    }
    if v.running > 0 {
        pods.push(pod("Running", vec![condition("PodScheduled", "True", None, Some(now)), condition("Ready", "True", None, Some(now))]));
    }
    pods
}

impl Controller for Replay {
    fn sync(&mut self, v: &View) -> Decision {
        let decision = self.sim.sync(v);
        let sim_step = self.sim.last_step.clone().expect("the simulator stepped");
        self.syncs += 1;

        let now = self.sim.at(v.finished_at.unwrap_or(v.now));
        let job = JobView {
            exists: self.cluster.job_exists,
            parallelism: self.cluster.parallelism,
            active: i32::try_from(v.active).unwrap(),
            ready: i32::try_from(v.running).unwrap(),
            last_scale_change: self.cluster.last_scale_annotation,
            ..JobView::default()
        };
        let workers = status::cluster_workers(&job, &pods_of(v, now), now);
        let sim_workers = v.workers();
        assert_eq!(
            WorkerFacts { oldest_starting_secs: None, ..workers },
            WorkerFacts { oldest_starting_secs: None, ..sim_workers },
            "at {}s",
            v.now
        );
        match (workers.oldest_starting_secs, sim_workers.oldest_starting_secs) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-3, "oldest starting {a} vs {b} at {}s", v.now),
            (a, b) => assert_eq!(a, b, "at {}s", v.now),
        }
        let observed = self.sim.observed(v, workers);
        let cluster_step = self.sim.scaler().step(&job.scaler_state(self.cluster.sla_status), &observed);
        assert_eq!(cluster_step.parallelism, sim_step.parallelism, "parallelism at {}s", v.now);
        assert_eq!(cluster_step.scaled, sim_step.scaled, "scaled at {}s", v.now);
        assert_eq!(cluster_step.decision, sim_step.decision, "decision at {}s", v.now);

        // What the reconciler writes back: the Job's parallelism (created at the first sync),
        // the annotation on a scaling decision, the status.
        if cluster_step.scaled {
            self.scaled += 1;
            self.cluster.last_scale_annotation = Some(now);
        }
        if cluster_step.parallelism > cluster_step.decision.desired_workers {
            self.protected_binds += 1;
        }
        if observed.progress.startup_secs.is_none() && workers.oldest_starting_secs.is_some_and(|s| s > 180.0) {
            self.starting_bound_used += 1;
        }
        self.cluster.job_exists = true;
        self.cluster.parallelism = i32::try_from(cluster_step.parallelism).unwrap();
        self.cluster.sla_status = Some(cluster_step.decision.status);
        decision
    }
}

#[test]
fn the_reconciler_takes_the_simulators_step_at_every_sync() {
    let (mut scaled, mut protected, mut starting) = (0, 0, 0);
    for name in ["steady", "slow-startup", "capacity-cap", "preemptions", "failed-shards", "drift-down"] {
        let sc = scenario::by_name(name).unwrap_or_else(|| panic!("scenario {name}"));
        let cfg = SlaConfig::from_spec(&spec_for(&sc).unwrap());
        let mut replay = Replay {
            sim: Sluice::new(cfg),
            cluster: ClusterMemory::default(),
            syncs: 0,
            scaled: 0,
            protected_binds: 0,
            starting_bound_used: 0,
        };
        let result = world::run(&sc, &mut replay);
        assert!(result.finished_at.is_some(), "{name} finishes");
        assert!(replay.syncs > 20, "{name}: {} syncs", replay.syncs);
        scaled += replay.scaled;
        protected += replay.protected_binds;
        starting += replay.starting_bound_used;
    }
    // The replay went through every guard, not only the easy path.
    assert!(scaled > 6, "scaling decisions replayed: {scaled}");
    assert!(protected > 0, "the never-below-Ready-pods guard never bound");
    assert!(starting > 0, "the longest-starting-pod bound was never used");
}

#[test]
fn local_mode_differs_only_in_its_workers() {
    // Processes: nothing unschedulable, nothing to wait for, nothing a lower count would stop.
    assert_eq!(local_workers(3), WorkerFacts { active: 3, running_protected: 0, unschedulable: 0, oldest_starting_secs: None });
}
