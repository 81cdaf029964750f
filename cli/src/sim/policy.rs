//! The controllers `sluice-sim` compares: Sluice (the very [`sluice_control::scaler::Scaler`] the
//! reconciler steps, fed as the reconciler feeds it), static concurrency, a reactive queue-length scaler (HPA/KEDA
//! style) and the oracle's fixed count. Each only maps a [`View`] to a parallelism.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use sluice_api::BatchInferenceJobSpec;
use sluice_api::progress::ShardProgress;

use super::scenario::Scenario;
use super::world::{Controller, Decision, View};
use sluice_control::scaler::{Observed, ScaleStep, Scaler, ScalerState, WorkerFacts};
use sluice_control::sla::{self, SlaConfig, SlaDecision};
use sluice_control::status;

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

/// Sluice's own scaler, fed as the reconciler feeds it: the latest visible progress record of
/// each shard (in the workers' own format) and the pods' creation times go through the
/// reconciler's [`status::summarize`], and its throughput estimate, start-up time and counts,
/// with the age of the longest-starting pod, through the one [`Scaler`].
#[derive(Clone, Debug)]
pub struct Sluice {
    scaler: Scaler,
    progress: BTreeMap<u32, ShardProgress>,
    pod_created: BTreeMap<String, Timestamp>,
    epoch: Timestamp,
    state: ScalerState,
    /// The last decision (for tests and debugging).
    pub last: Option<SlaDecision>,
    /// The last step, guards applied (for tests).
    pub last_step: Option<ScaleStep>,
    /// With [`Sluice::traced`]: one line per decision that changed the count or the status.
    pub trace: Option<Vec<String>>,
}

impl Sluice {
    /// A scaler with this configuration.
    pub fn new(cfg: SlaConfig) -> Self {
        Self {
            scaler: Scaler::new(cfg),
            progress: BTreeMap::new(),
            pod_created: BTreeMap::new(),
            epoch: Timestamp::UNIX_EPOCH,
            state: ScalerState::default(),
            last: None,
            last_step: None,
            trace: None,
        }
    }

    /// A scaler that records a trace line per change (for `sluice-sim --trace`).
    pub fn traced(cfg: SlaConfig) -> Self {
        Self { trace: Some(Vec::new()), ..Self::new(cfg) }
    }

    /// The scaler it steps.
    pub fn scaler(&self) -> &Scaler {
        &self.scaler
    }

    /// This sync's observation with `workers` (the simulated cluster's own, or the same moment
    /// as another world shows it): the job's facts and `status::summarize` over the latest
    /// visible progress record of each shard, as the reconciler reads them.
    pub fn observed(&self, v: &View, workers: WorkerFacts) -> Observed {
        let now = self.at(v.finished_at.unwrap_or(v.now));
        let summary = status::summarize(&self.progress, &self.pod_created, now);
        Observed {
            now,
            window_start: self.at(0.0),
            deadline: self.at(v.deadline),
            total_requests: v.total_requests,
            progress: summary.scaler_progress(),
            total_shards: v.total_shards,
            remaining_shards: v.remaining_shards,
            finished: v.finished,
            suspended: false,
            workers,
            fleet_cap: None,
        }
    }

    /// The simulated time `secs` after submission as a timestamp.
    pub fn at(&self, secs: f64) -> Timestamp {
        self.epoch.checked_add(SignedDuration::from_secs_f64(secs)).unwrap_or(self.epoch)
    }
}

impl Controller for Sluice {
    fn sync(&mut self, v: &View) -> Decision {
        for r in &v.records {
            let attempt = format!("pod-{}", r.pod);
            self.pod_created.insert(attempt.clone(), self.at(r.pod_created));
            let record = ShardProgress {
                shard: r.shard,
                attempt,
                lines_total: r.lines_total,
                lines_done: r.lines_done,
                succeeded: r.lines_done,
                failed: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                started_at: self.at(r.started),
                updated_at: self.at(r.written),
                ready_at: Some(self.at(r.ready_at)),
                requests_per_second: r.requests_per_second,
                output_tokens_per_second: 0.0,
                complete: r.complete,
            };
            self.progress.insert(r.shard, record);
        }
        let observed = self.observed(v, v.workers());
        let step = self.scaler.step(&self.state, &observed);
        let d = step.decision.clone();
        if let Some(trace) = self.trace.as_mut()
            && (step.parallelism != self.state.parallelism || Some(d.status) != self.state.previous_status)
        {
            trace.push(format!(
                "{:>9} {:>3}→{:<3} active {:>3} done {:>9}/{} {:<10} {}",
                sla::fmt_secs(v.now),
                self.state.parallelism,
                step.parallelism,
                v.active,
                v.done_requests,
                v.total_requests,
                d.status.as_str(),
                d.reason
            ));
        }
        self.state = step.next;
        self.last_step = Some(step.clone());
        let out = Decision { parallelism: step.parallelism, status: Some(d.status), shard_capped: !step.scaled };
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
