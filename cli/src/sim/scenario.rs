//! Declarative scenarios for `sluice-sim`: the job (requests, shards, window, bounds, policy) and
//! the world it runs in (true throughput, noise, drift, start-up times, preemptions, capacity,
//! slow shards, failures). Data only; `world` runs them.

use sluice_api::job::SlaPolicy;

/// A uniform range of seconds `[lo, hi]` (`lo == hi` for a fixed value).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Range {
    pub lo: f64,
    pub hi: f64,
}

impl Range {
    /// A fixed value.
    pub const fn fixed(v: f64) -> Self {
        Self { lo: v, hi: v }
    }
    /// The value at quantile `u` in [0, 1).
    pub fn at(&self, u: f64) -> f64 {
        self.lo + (self.hi - self.lo) * u
    }
}

/// Throughput multiplier that moves linearly from 1 at `from_secs` to `factor` at `to_secs`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Drift {
    pub from_secs: f64,
    pub to_secs: f64,
    pub factor: f64,
}

/// One simulated job and its world.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Name for `--scenario`.
    pub name: &'static str,
    /// What it exercises.
    pub about: &'static str,
    /// Requests in the input.
    pub requests: u64,
    /// Shards in the plan (requests are split evenly).
    pub shards: u32,
    /// Seconds from submission to the deadline.
    pub window_secs: f64,
    /// `spec.sla.margin`.
    pub margin: f64,
    /// `spec.sla.policy`.
    pub policy: SlaPolicy,
    /// `spec.workers.min`.
    pub min_workers: u32,
    /// `spec.workers.max`.
    pub max_workers: u32,
    /// `spec.sampling.maxTokens` (sets the scaler's prior).
    pub max_tokens: u32,
    /// True mean requests per second of one worker while processing.
    pub rate: f64,
    /// Throughput noise: ± this fraction per shard and ± half of it per 15 s interval.
    pub noise: f64,
    /// Throughput drift over time, if any.
    pub drift: Option<Drift>,
    /// Pod start-up on a node that has not run a worker lately (image pull, model download).
    pub cold_startup: Range,
    /// Pod start-up on a node that ran a worker within the last 10 min (model in the node cache).
    pub warm_startup: Range,
    /// Preemptions per pod-hour (spot reclaim, node drain).
    pub preemptions_per_hour: f64,
    /// GPUs the scheduler can actually place (workers beyond this stay Pending).
    pub capacity: Option<u32>,
    /// Fraction of shards that run `slow_factor` times slower (long outputs).
    pub slow_fraction: f64,
    /// Slow-down of the slow shards.
    pub slow_factor: f64,
    /// Probability that an attempt fails part-way with a retryable error (first two attempts).
    pub fail_prob: f64,
    /// World seed.
    pub seed: u64,
}

/// The common defaults: 200k requests in 100 shards, 6 h window, 1–8 workers, 5 req/s each,
/// 3 min cold and 1 min warm start-up.
pub const BASE: Scenario = Scenario {
    name: "base",
    about: "",
    requests: 200_000,
    shards: 100,
    window_secs: 6.0 * 3600.0,
    margin: 0.1,
    policy: SlaPolicy::Deadline,
    min_workers: 1,
    max_workers: 8,
    max_tokens: 256,
    rate: 5.0,
    noise: 0.05,
    drift: None,
    cold_startup: Range::fixed(180.0),
    warm_startup: Range::fixed(60.0),
    preemptions_per_hour: 0.0,
    capacity: None,
    slow_fraction: 0.0,
    slow_factor: 1.0,
    fail_prob: 0.0,
    seed: 1,
};

const H: f64 = 3600.0;

/// Every scenario of `--all`.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario { name: "steady", about: "constant throughput, 6 h window, needs about 3 of 8 workers", ..BASE },
        Scenario { name: "noisy", about: "throughput ±30 % per shard and per interval", noise: 0.3, seed: 2, ..BASE },
        Scenario {
            name: "drift-down",
            about: "throughput falls to 60 % between hour 1 and hour 3",
            drift: Some(Drift { from_secs: H, to_secs: 3.0 * H, factor: 0.6 }),
            ..BASE
        },
        Scenario {
            name: "drift-up",
            about: "throughput doubles between hour 1 and hour 2 (scale down)",
            drift: Some(Drift { from_secs: H, to_secs: 2.0 * H, factor: 2.0 }),
            window_secs: 5.0 * H,
            ..BASE
        },
        Scenario {
            name: "slow-startup",
            about: "pod start-up anywhere from 30 s to 10 min",
            cold_startup: Range { lo: 30.0, hi: 600.0 },
            warm_startup: Range { lo: 30.0, hi: 600.0 },
            seed: 3,
            ..BASE
        },
        Scenario {
            name: "model-load-per-shard",
            about: "small shards that each reload a large model (4 min warm, 8 min cold)",
            shards: 400,
            cold_startup: Range::fixed(480.0),
            warm_startup: Range::fixed(240.0),
            ..BASE
        },
        Scenario { name: "preemptions", about: "each pod preempted about once per 2 h (spot)", preemptions_per_hour: 0.5, seed: 4, ..BASE },
        Scenario {
            name: "capacity-cap",
            about: "8 allowed, only 4 GPUs schedulable; 4 suffice",
            capacity: Some(4),
            window_secs: 4.5 * H,
            ..BASE
        },
        Scenario {
            name: "capacity-cap-infeasible",
            about: "8 allowed, only 2 GPUs schedulable; 4 needed",
            capacity: Some(2),
            window_secs: 4.0 * H,
            ..BASE
        },
        Scenario {
            name: "long-tail",
            about: "5 % of shards 5x slower (long outputs)",
            slow_fraction: 0.05,
            slow_factor: 5.0,
            seed: 5,
            ..BASE
        },
        Scenario { name: "failed-shards", about: "15 % of attempts fail part-way and are retried", fail_prob: 0.15, seed: 6, ..BASE },
        Scenario { name: "tight-deadline", about: "needs about 85 % of max workers", window_secs: 1.85 * H, ..BASE },
        Scenario { name: "loose-deadline", about: "48 h window: one worker is plenty", window_secs: 48.0 * H, min_workers: 0, ..BASE },
        Scenario { name: "impossible-deadline", about: "needs about twice max workers", window_secs: 0.75 * H, ..BASE },
        Scenario {
            name: "one-hour-left",
            about: "submitted with 1 h left: 30k requests in 60 shards",
            requests: 30_000,
            shards: 60,
            window_secs: H,
            ..BASE
        },
        Scenario {
            name: "one-hour-left-impossible",
            about: "submitted with 1 h left, needs about 2x max workers",
            requests: 240_000,
            shards: 120,
            window_secs: H,
            ..BASE
        },
        Scenario {
            name: "24h-10M",
            about: "24 h window, 10M requests in 1000 shards at 20 req/s per worker, up to 16",
            requests: 10_000_000,
            shards: 1000,
            window_secs: 24.0 * H,
            max_workers: 16,
            rate: 20.0,
            noise: 0.1,
            ..BASE
        },
        Scenario { name: "many-small-shards", about: "1000 shards of 200 requests", shards: 1000, ..BASE },
        Scenario { name: "few-large-shards", about: "8 shards of 25k requests (1.4 h each)", shards: 8, window_secs: 4.0 * H, ..BASE },
        Scenario {
            name: "prior-optimistic",
            about: "true throughput 4x below the prior (short maxTokens, slow model)",
            rate: 1.0,
            requests: 50_000,
            max_tokens: 256,
            ..BASE
        },
        Scenario {
            name: "prior-pessimistic",
            about: "true throughput 10x above the prior (long maxTokens, short outputs)",
            rate: 10.0,
            requests: 400_000,
            max_tokens: 2560,
            ..BASE
        },
        Scenario { name: "min-floor", about: "workers.min 4 although 3 would do", min_workers: 4, ..BASE },
        Scenario { name: "fastest", about: "policy Fastest: always max workers", policy: SlaPolicy::Fastest, ..BASE },
        Scenario {
            name: "messy",
            about: "noise ±30 %, preemptions, long tail, failures and slow start-up together",
            noise: 0.3,
            preemptions_per_hour: 0.3,
            slow_fraction: 0.05,
            slow_factor: 5.0,
            fail_prob: 0.1,
            cold_startup: Range { lo: 60.0, hi: 600.0 },
            warm_startup: Range { lo: 30.0, hi: 180.0 },
            seed: 7,
            ..BASE
        },
    ]
}

/// The reduced set the CI test runs: one of each kind, small enough for a debug build.
pub const REDUCED: &[&str] = &[
    "steady",
    "noisy",
    "drift-down",
    "preemptions",
    "capacity-cap-infeasible",
    "long-tail",
    "impossible-deadline",
    "one-hour-left",
    "few-large-shards",
];

/// The scenario with this name.
pub fn by_name(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}
