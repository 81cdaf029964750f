//! The controllers `sluice-sim` compares: Sluice (the real [`crate::sla::decide`] fed the way
//! the reconciler feeds it), static concurrency, a reactive queue-length scaler (HPA/KEDA
//! style) and the oracle's fixed count. Each only maps a [`View`] to a parallelism.

use jiff::{SignedDuration, Timestamp};
use sluice_api::BatchInferenceJobSpec;
use sluice_api::job::SlaStatus;

use super::scenario::Scenario;
use super::world::{Controller, Decision, SCHED_DELAY_SECS, View};
use crate::sla::{self, SlaConfig, SlaDecision, SlaObservation, ThroughputEstimator};

/// The spec a user would write for this scenario (what the scaler's configuration comes from).
pub fn spec_for(sc: &Scenario) -> Result<BatchInferenceJobSpec, serde_json::Error> {
    serde_json::from_value(serde_json::json!({
        "model": {"uri": "s3://models/sim/"},
        "input": {"uri": "s3://bucket/in.jsonl"},
        "output": {"uri": "s3://bucket/out/"},
        "sampling": {"maxTokens": sc.max_tokens},
        "sla": {"completionWindow": format!("{}s", sc.window_secs.round() as u64), "margin": sc.margin, "policy": sc.policy},
        "workers": {"min": sc.min_workers, "max": sc.max_workers, "gpus": 1}
    }))
}

/// Sluice's own scaler, fed as the reconciler feeds it: one estimator observation per new
/// progress interval, start-up from each attempt's first record (plus the scheduler delay the
/// record cannot see), and, before any start-up is measured, the age of the longest-starting
/// pod once it exceeds the prior.
#[derive(Clone, Debug)]
pub struct Sluice {
    cfg: SlaConfig,
    est: ThroughputEstimator,
    epoch: Timestamp,
    current: u32,
    last_change: Option<Timestamp>,
    previous: Option<SlaStatus>,
    /// The last decision (for tests and debugging).
    pub last: Option<SlaDecision>,
    /// With [`Sluice::traced`]: one line per decision that changed the count or the status.
    pub trace: Option<Vec<String>>,
}

impl Sluice {
    /// A scaler with this configuration.
    pub fn new(cfg: SlaConfig) -> Self {
        Self {
            cfg,
            est: ThroughputEstimator::new(),
            epoch: Timestamp::UNIX_EPOCH,
            current: 0,
            last_change: None,
            previous: None,
            last: None,
            trace: None,
        }
    }

    /// A scaler that records a trace line per change (for `sluice-sim --trace`).
    pub fn traced(cfg: SlaConfig) -> Self {
        Self { trace: Some(Vec::new()), ..Self::new(cfg) }
    }

    fn at(&self, secs: f64) -> Timestamp {
        self.epoch.checked_add(SignedDuration::from_secs_f64(secs)).unwrap_or(self.epoch)
    }
}

impl Controller for Sluice {
    fn sync(&mut self, v: &View) -> Decision {
        for r in &v.records {
            if let Some(s) = r.startup_secs {
                self.est.observe_startup(s + SCHED_DELAY_SECS);
            }
            if let Some((rps, secs)) = r.interval {
                self.est.observe(rps, secs);
            }
        }
        let startup = self.est.startup_secs().or_else(|| v.oldest_starting_secs.filter(|&e| e > self.cfg.prior_startup_secs));
        let obs = SlaObservation {
            now: self.at(v.finished_at.unwrap_or(v.now)),
            window_start: self.at(0.0),
            deadline: self.at(v.deadline),
            total_requests: v.total_requests,
            done_requests: v.done_requests,
            per_worker_rate: self.est.estimate(),
            startup_secs: startup,
            active_workers: v.active,
            current_desired: self.current,
            total_shards: v.total_shards,
            remaining_shards: v.remaining_shards,
            unschedulable_workers: v.unschedulable,
            last_scale_change: self.last_change,
            previous_status: self.previous,
            finished: v.finished,
        };
        let d = sla::decide(&self.cfg, &obs);
        if d.desired_workers != self.current && !d.shard_capped && !v.finished {
            self.last_change = Some(obs.now);
        }
        if let Some(trace) = self.trace.as_mut()
            && (d.desired_workers != self.current || Some(d.status) != self.previous)
        {
            trace.push(format!(
                "{:>9} {:>3}→{:<3} active {:>3} done {:>9}/{} {:<10} {}",
                sla::fmt_secs(v.now),
                self.current,
                d.desired_workers,
                v.active,
                v.done_requests,
                v.total_requests,
                d.status.as_str(),
                d.reason
            ));
        }
        let out = Decision { parallelism: d.desired_workers, status: Some(d.status), shard_capped: d.shard_capped || v.finished };
        self.current = d.desired_workers;
        self.previous = Some(d.status);
        self.last = Some(d);
        out
    }
}

/// Fixed parallelism (the seed report's "concurrency 2"; the oracle's chosen count).
#[derive(Clone, Copy, Debug)]
pub struct Static(pub u32);

impl Controller for Static {
    fn sync(&mut self, _: &View) -> Decision {
        Decision { parallelism: self.0, status: None, shard_capped: false }
    }
}

/// HPA/KEDA-style queue-length scaling: one worker per `shards_per_worker` queued shards,
/// clamped to the bounds, scaled up at once and down only to the highest recommendation of
/// the last 5 min (HPA's default stabilization window). Deadline-blind.
#[derive(Clone, Debug)]
pub struct Reactive {
    min: u32,
    max: u32,
    shards_per_worker: u32,
    history: Vec<(f64, u32)>,
}

impl Reactive {
    /// Queued shards each worker should have (KEDA's target value).
    pub const SHARDS_PER_WORKER: u32 = 4;
    /// HPA's scale-down stabilization window.
    pub const STABILIZATION_SECS: f64 = 300.0;

    /// A reactive scaler with the job's bounds.
    pub fn new(min: u32, max: u32) -> Self {
        Self { min: min.max(1), max: max.max(1), shards_per_worker: Self::SHARDS_PER_WORKER, history: Vec::new() }
    }
}

impl Controller for Reactive {
    fn sync(&mut self, v: &View) -> Decision {
        let rec = v.remaining_shards.div_ceil(self.shards_per_worker).clamp(self.min.min(self.max), self.max);
        self.history.push((v.now, rec));
        self.history.retain(|(t, _)| v.now - t <= Self::STABILIZATION_SECS);
        let p = self.history.iter().map(|(_, r)| *r).max().unwrap_or(rec);
        Decision { parallelism: if v.finished { 0 } else { p }, status: None, shard_capped: v.finished }
    }
}
