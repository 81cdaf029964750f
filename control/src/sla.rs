//! The SLA core: from the deadline, the clock (always a parameter), the remaining work, the
//! observed per-worker throughput with its uncertainty and the measured pod start-up time, decide
//! how many workers to run, project the completion time and set `slaStatus`.
//! Pure: no clock reads, no I/O, no Kubernetes client. The reconciler, local mode and
//! `sluice-sim` all call [`decide`]; `docs/sla.md` explains the model and its tuning.

use jiff::{SignedDuration, Timestamp};
use sluice_api::BatchInferenceJobSpec;
use sluice_api::job::{SlaPolicy, SlaStatus};

/// Output tokens per second one GPU worker is assumed to sustain before any progress is
/// observed. Deliberately modest (a small model on one modern GPU does several times more), so
/// the first scale-up errs on the side of more workers; replaced by the measurement as soon as
/// the first progress record lands.
pub const PRIOR_OUTPUT_TOKENS_PER_GPU_SEC: f64 = 1000.0;
/// The same assumption for a CPU-only worker (`workers.gpus: 0`, local mode).
pub const PRIOR_OUTPUT_TOKENS_PER_CPU_WORKER_SEC: f64 = 20.0;
/// Pod start-up (scheduling, image start, model load) assumed before one is measured.
pub const PRIOR_STARTUP_SECS: f64 = 180.0;

/// Per-worker throughput estimate in requests per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateEstimate {
    /// Mean requests per second of one worker while it is processing (start-up excluded).
    pub mean: f64,
    /// Standard deviation of the observed per-worker rates.
    pub stddev: f64,
    /// Effective number of independent observations behind the mean.
    pub samples: u32,
}

/// Static inputs of the scaler: the job's bounds and policy plus tuning knobs.
///
/// The knobs have defaults that `sluice-sim --all` validates (see `docs/sla.md`, notes table).
#[derive(Clone, Debug, PartialEq)]
pub struct SlaConfig {
    /// `spec.workers.min`: fewest workers while work remains.
    pub min_workers: u32,
    /// `spec.workers.max`: most workers.
    pub max_workers: u32,
    /// `spec.sla.policy`.
    pub policy: SlaPolicy,
    /// `spec.sla.margin`: aim for `deadline − margin × window`.
    pub margin: f64,
    /// Requests per second per worker assumed before any progress is observed.
    pub prior_per_worker_rps: f64,
    /// Pod start-up seconds (incl. scheduling and model load) assumed before one is measured.
    pub prior_startup_secs: f64,
    /// Pessimism: plan with `mean − k·stddev/√samples`. Default 1.0.
    pub pessimism_k: f64,
    /// Coefficient of variation assumed while fewer than two samples exist. Default 0.25.
    pub prior_cv: f64,
    /// Scale up to meet `target − scale_up_headroom × window` so that a slowly sinking estimate
    /// does not cause a scale-up every resync. Default 0.02.
    pub scale_up_headroom: f64,
    /// Scale down only to a count that still meets `target − scale_down_headroom × window`
    /// ("clearly ahead"). Default 0.08.
    pub scale_down_headroom: f64,
    /// Seconds since the last scale change before a scale-down is allowed. Default 300.
    pub scale_down_cooldown_secs: f64,
    /// Status deadband as a fraction of the window: OnTrack ⇄ AtRisk (and leaving Infeasible)
    /// only when the projection crosses the line by more than this. Default 0.01.
    pub status_deadband: f64,
}

impl SlaConfig {
    /// Default pessimism factor `k`.
    pub const DEFAULT_PESSIMISM_K: f64 = 1.0;
    /// Default coefficient of variation before two samples exist.
    pub const DEFAULT_PRIOR_CV: f64 = 0.25;
    /// Default scale-up headroom (fraction of the window).
    pub const DEFAULT_SCALE_UP_HEADROOM: f64 = 0.02;
    /// Default scale-down headroom (fraction of the window).
    pub const DEFAULT_SCALE_DOWN_HEADROOM: f64 = 0.08;
    /// Default scale-down cooldown in seconds.
    pub const DEFAULT_SCALE_DOWN_COOLDOWN_SECS: f64 = 300.0;
    /// Default status deadband (fraction of the window).
    pub const DEFAULT_STATUS_DEADBAND: f64 = 0.01;

    /// A configuration with the given bounds and policy, the default knobs and the given prior.
    pub fn new(min_workers: u32, max_workers: u32, policy: SlaPolicy, margin: f64, prior_per_worker_rps: f64) -> Self {
        let max_workers = max_workers.max(1);
        Self {
            min_workers: min_workers.min(max_workers),
            max_workers,
            policy,
            margin: if margin.is_finite() { margin.clamp(0.0, 0.9) } else { 0.0 },
            prior_per_worker_rps,
            prior_startup_secs: PRIOR_STARTUP_SECS,
            pessimism_k: Self::DEFAULT_PESSIMISM_K,
            prior_cv: Self::DEFAULT_PRIOR_CV,
            scale_up_headroom: Self::DEFAULT_SCALE_UP_HEADROOM,
            scale_down_headroom: Self::DEFAULT_SCALE_DOWN_HEADROOM,
            scale_down_cooldown_secs: Self::DEFAULT_SCALE_DOWN_COOLDOWN_SECS,
            status_deadband: Self::DEFAULT_STATUS_DEADBAND,
        }
    }

    /// Bounds, policy and margin from the spec; the prior throughput from
    /// [`prior_per_worker_rps`]; default knobs.
    pub fn from_spec(spec: &BatchInferenceJobSpec) -> Self {
        let min = u32::try_from(spec.workers.min).unwrap_or(0);
        let max = u32::try_from(spec.workers.max).unwrap_or(1);
        Self::new(min, max, spec.sla.policy, spec.sla.margin, prior_per_worker_rps(spec))
    }
}

/// The stated prior: every request is assumed to generate `sampling.maxTokens` tokens (an upper
/// bound) at [`PRIOR_OUTPUT_TOKENS_PER_GPU_SEC`] per GPU of the worker
/// ([`PRIOR_OUTPUT_TOKENS_PER_CPU_WORKER_SEC`] for a CPU-only worker).
pub fn prior_per_worker_rps(spec: &BatchInferenceJobSpec) -> f64 {
    let tokens_per_sec = if spec.workers.gpus > 0 {
        PRIOR_OUTPUT_TOKENS_PER_GPU_SEC * f64::from(spec.workers.gpus)
    } else {
        PRIOR_OUTPUT_TOKENS_PER_CPU_WORKER_SEC
    };
    tokens_per_sec / f64::from(spec.sampling.max_tokens.max(1))
}

/// What the reconciler observed at one sync. Time is a parameter; nothing here reads a clock.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlaObservation {
    /// The time of this decision. When `finished`, the completion time.
    pub now: Timestamp,
    /// Start of the window (the job's creation time).
    pub window_start: Timestamp,
    /// The effective deadline.
    pub deadline: Timestamp,
    /// Requests in the plan.
    pub total_requests: u64,
    /// Requests committed (results plus errors).
    pub done_requests: u64,
    /// Per-worker throughput from [`ThroughputEstimator::estimate`]; `None` before any progress.
    pub per_worker_rate: Option<RateEstimate>,
    /// Measured pod start-up seconds (pod creation to first request admitted, incl. scheduling
    /// and model load); `None` before one is measured.
    pub startup_secs: Option<f64>,
    /// Worker pods running a shard now (started or starting).
    pub active_workers: u32,
    /// The parallelism in force now (0 before the first decision).
    pub current_desired: u32,
    /// Shards in the plan (0 if unknown: average shard size is then taken from what remains).
    pub total_shards: u32,
    /// Shards not yet committed (running or waiting); caps useful parallelism.
    pub remaining_shards: u32,
    /// Worker pods the scheduler reports as unschedulable (Pending for lack of capacity).
    pub unschedulable_workers: u32,
    /// When the parallelism last changed (other than following the remaining-shards cap).
    pub last_scale_change: Option<Timestamp>,
    /// The status decided at the previous sync (for the deadband).
    pub previous_status: Option<SlaStatus>,
    /// Every shard is committed.
    pub finished: bool,
}

/// Why even the most workers cannot make the deadline, and what would.
#[derive(Clone, Debug, PartialEq)]
pub struct Infeasibility {
    /// Projected completion at the most usable workers minus the deadline, in seconds.
    pub late_by_secs: f64,
    /// Projected completion at the most usable workers.
    pub projected_at_max: Timestamp,
    /// Workers that would make the deadline; `None` if no count would (too few shards left, or
    /// too little time for even one shard).
    pub workers_needed: Option<u32>,
    /// The earliest deadline the job could be on track for at the most usable workers.
    pub feasible_deadline: Timestamp,
    /// A sentence for the Event and the condition message.
    pub suggestion: String,
}

/// The scaler's decision at one sync.
#[derive(Clone, Debug, PartialEq)]
pub struct SlaDecision {
    /// The parallelism to set.
    pub desired_workers: u32,
    /// Expected completion at `desired_workers` (mean throughput); `None` if unknown/unbounded.
    pub projected_completion: Option<Timestamp>,
    /// Deadline minus projected completion in seconds (negative is late).
    pub slack_secs: Option<f64>,
    /// The job's SLA status.
    pub status: SlaStatus,
    /// A human sentence for Events, e.g. `projected 26h0m against 24h0m deadline at 2 workers`.
    pub reason: String,
    /// Set when even the most usable workers cannot make the deadline.
    pub infeasible: Option<Infeasibility>,
    /// True when `desired_workers` differs from `current_desired` only because fewer shards
    /// remain than workers: not a scaling decision, no Event needed.
    pub shard_capped: bool,
    /// True when the projection still rests on the prior throughput (no progress yet).
    pub using_prior: bool,
}

/// Work left, in the terms the projection needs.
#[derive(Clone, Copy, Debug)]
struct Work {
    /// Requests left in shards already running.
    in_flight_requests: f64,
    /// Running shards.
    active: f64,
    /// Shards not started.
    unstarted: f64,
    /// Requests per fresh shard.
    shard_requests: f64,
    /// Start-up seconds of a fresh shard's pod.
    startup: f64,
}

impl Work {
    fn from_obs(obs: &SlaObservation, startup: f64) -> Self {
        let remaining = obs.total_requests.saturating_sub(obs.done_requests) as f64;
        let shards = obs.remaining_shards.max(u32::from(remaining > 0.0));
        let active = obs.active_workers.min(shards);
        let unstarted = shards - active;
        let shard_requests = if obs.total_shards > 0 {
            obs.total_requests as f64 / f64::from(obs.total_shards)
        } else if shards > 0 {
            remaining / f64::from(shards)
        } else {
            0.0
        };
        let fresh = (f64::from(unstarted) * shard_requests).min(remaining);
        Self {
            in_flight_requests: (remaining - fresh).max(0.0),
            active: f64::from(active),
            unstarted: f64::from(unstarted),
            shard_requests: if unstarted > 0 { fresh / f64::from(unstarted) } else { shard_requests },
            startup: startup.max(0.0),
        }
    }

    fn shards(&self) -> u32 {
        (self.active + self.unstarted) as u32
    }

    /// Seconds from now until the last shard finishes with `workers` slots at `rate` requests
    /// per second each. Running shards are never cut short; fresh shards each pay `startup`.
    fn makespan(&self, workers: u32, rate: f64) -> f64 {
        if self.active + self.unstarted <= 0.0 {
            return 0.0;
        }
        if workers == 0 || rate <= 0.0 || !rate.is_finite() {
            return f64::INFINITY;
        }
        let w = f64::from(workers);
        let t_active = if self.active > 0.0 { self.in_flight_requests / (self.active * rate) } else { 0.0 };
        if self.unstarted <= 0.0 {
            return t_active;
        }
        let d = self.startup + self.shard_requests / rate;
        if d <= 0.0 {
            return t_active;
        }
        // Slots: `busy` free at t_active (they finish their running shard first), `idle` free now.
        let (busy, idle) = if w >= self.active { (self.active, w - self.active) } else { (w, 0.0) };
        let done_by = |t: f64| -> f64 {
            let a = if t > t_active { ((t - t_active) / d).floor() } else { 0.0 };
            let b = (t / d).floor();
            busy * a + idle * b
        };
        // The U-th finish among the slots' shard completions: bisect on time.
        let mut lo = 0.0;
        let mut hi = t_active + ((self.unstarted / w).ceil() + 1.0) * d;
        for _ in 0..64 {
            let mid = 0.5 * (lo + hi);
            if done_by(mid) >= self.unstarted {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi.max(t_active)
    }
}

fn add_secs(t: Timestamp, secs: f64) -> Option<Timestamp> {
    if !secs.is_finite() || secs.abs() > 100.0 * 365.0 * 86400.0 {
        return None;
    }
    t.checked_add(SignedDuration::from_secs_f64(secs)).ok()
}

fn secs_between(later: Timestamp, earlier: Timestamp) -> f64 {
    later.duration_since(earlier).as_secs_f64()
}

/// A duration as `2d3h`, `26h0m`, `45m`, `30s` (rounded to whole seconds; sign kept).
pub fn fmt_secs(secs: f64) -> String {
    if !secs.is_finite() {
        return "∞".into();
    }
    let sign = if secs < 0.0 { "-" } else { "" };
    let s = secs.abs().round() as u64;
    let (d, h, m, sec) = (s / 86400, (s % 86400) / 3600, (s % 3600) / 60, s % 60);
    if d >= 2 {
        format!("{sign}{d}d{h}h")
    } else if s >= 3600 {
        format!("{sign}{}h{m}m", d * 24 + h)
    } else if s >= 60 {
        if sec == 0 { format!("{sign}{m}m") } else { format!("{sign}{m}m{sec}s") }
    } else {
        format!("{sign}{sec}s")
    }
}

/// Decide the parallelism and SLA status for one sync. Pure.
pub fn decide(cfg: &SlaConfig, obs: &SlaObservation) -> SlaDecision {
    let now = obs.now;
    let window = secs_between(obs.deadline, obs.window_start).max(1.0);
    let to_deadline = secs_between(obs.deadline, now);
    let since_start = |t: Timestamp| fmt_secs(secs_between(t, obs.window_start));
    let max_workers = cfg.max_workers.max(1);
    let min_workers = cfg.min_workers.min(max_workers);
    let remaining = obs.total_requests.saturating_sub(obs.done_requests);

    if obs.finished || (remaining == 0 && obs.remaining_shards == 0 && obs.total_requests > 0) {
        let met = now <= obs.deadline;
        return SlaDecision {
            desired_workers: 0,
            projected_completion: Some(now),
            slack_secs: Some(to_deadline),
            status: if met { SlaStatus::Met } else { SlaStatus::Missed },
            reason: format!(
                "finished in {} against {} deadline ({} {})",
                since_start(now),
                since_start(obs.deadline),
                fmt_secs(to_deadline.abs()),
                if met { "early" } else { "late" }
            ),
            infeasible: None,
            shard_capped: obs.current_desired != 0 && obs.remaining_shards == 0,
            using_prior: obs.per_worker_rate.is_none(),
        };
    }

    // Throughput: measured (mean and pessimistic) or the prior.
    let measured = obs.per_worker_rate.filter(|r| r.samples > 0 && r.mean.is_finite() && r.mean > 0.0);
    let using_prior = measured.is_none();
    let (mean_rate, plan_rate) = match measured {
        Some(r) => {
            let sd = if r.samples < 2 { r.mean * cfg.prior_cv } else { r.stddev.max(0.0) };
            let se = cfg.pessimism_k * sd / f64::from(r.samples).sqrt();
            (r.mean, (r.mean - se).max(0.5 * r.mean))
        }
        None => (cfg.prior_per_worker_rps, cfg.prior_per_worker_rps),
    };
    let startup = obs.startup_secs.filter(|s| s.is_finite() && *s >= 0.0).unwrap_or(cfg.prior_startup_secs);
    let work = Work::from_obs(obs, startup);
    let shards = work.shards().max(1);
    let usable_max = max_workers.min(shards);
    let target = to_deadline - cfg.margin * window; // seconds from now

    // Fewest workers whose pessimistic makespan fits `limit` seconds (None if none ≤ usable_max).
    let fewest = |limit: f64| -> Option<u32> {
        if work.makespan(usable_max, plan_rate) > limit {
            return None;
        }
        let (mut lo, mut hi) = (1u32, usable_max);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if work.makespan(mid, plan_rate) <= limit { hi = mid } else { lo = mid + 1 }
        }
        Some(lo)
    };

    // Desired parallelism.
    let cur = obs.current_desired;
    let floor = min_workers.min(shards);
    let clamp = |w: u32| w.clamp(floor, usable_max);
    let cur_clamped = cur.min(max_workers).min(shards).max(floor);
    let (desired, shard_capped) = match cfg.policy {
        SlaPolicy::Fastest => (usable_max, cur.min(max_workers) > shards && usable_max == shards),
        SlaPolicy::Deadline => {
            let up = clamp(fewest(target - cfg.scale_up_headroom * window).unwrap_or(usable_max));
            let need = clamp(fewest(target).unwrap_or(usable_max));
            if cur_clamped < need {
                (up, false)
            } else {
                let cooled = obs.last_scale_change.is_none_or(|t| secs_between(now, t) >= cfg.scale_down_cooldown_secs);
                let down = clamp(fewest(target - cfg.scale_down_headroom * window).unwrap_or(usable_max));
                if cooled && down < cur_clamped {
                    (down, false)
                } else {
                    // Keep the current count, except where the bounds or the shards left cap it.
                    (cur_clamped, cur_clamped < cur && cur_clamped == shards && cur <= max_workers)
                }
            }
        }
    };

    // Capacity: pods the scheduler cannot place do not help the projection.
    let schedulable = if obs.unschedulable_workers > 0 {
        obs.current_desired.saturating_sub(obs.unschedulable_workers).max(obs.active_workers).max(1)
    } else {
        u32::MAX
    };
    let effective = desired.min(schedulable).max(1);
    let best = usable_max.min(schedulable).max(1);

    let proj_secs = work.makespan(effective, mean_rate);
    let projected = add_secs(now, proj_secs);
    let slack = projected.map(|p| secs_between(obs.deadline, p));
    let plan_secs = work.makespan(effective, plan_rate);
    let best_secs = work.makespan(best, mean_rate);
    let band = cfg.status_deadband * window;
    let prev = obs.previous_status;

    let at_workers = |w: u32| format!("{w} worker{}", if w == 1 { "" } else { "s" });
    let rate_note = if using_prior {
        format!("{:.3} req/s per worker assumed (prior: nothing measured yet, corrected when the first shard reports)", mean_rate)
    } else {
        format!("{:.3} req/s per worker", mean_rate)
    };

    let late_at_best = best_secs - to_deadline;
    // A prior is a guess (it assumes every request runs to maxTokens): on it alone a job is at
    // most AtRisk, never Infeasible with advice to move the deadline. Infeasible needs measured
    // throughput.
    let infeasible_now = match prev {
        _ if using_prior => false,
        Some(SlaStatus::Infeasible) => late_at_best > -band,
        _ => late_at_best > 0.0,
    };

    let (status, infeasible) = if to_deadline < 0.0 {
        (SlaStatus::Breached, None)
    } else if infeasible_now {
        let projected_at_max = add_secs(now, best_secs).unwrap_or(Timestamp::MAX);
        // Most workers that could help: one per remaining shard.
        let workers_needed = if work.makespan(shards, mean_rate) <= to_deadline {
            let (mut lo, mut hi) = (1u32, shards);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if work.makespan(mid, mean_rate) <= to_deadline { hi = mid } else { lo = mid + 1 }
            }
            Some(lo)
        } else {
            None
        };
        // Earliest deadline D with projection ≤ D − margin·(D − start).
        let start = obs.window_start.as_millisecond() as f64 / 1000.0;
        let p = projected_at_max.as_millisecond() as f64 / 1000.0;
        let feasible = (p - cfg.margin * start) / (1.0 - cfg.margin).max(0.1);
        let feasible_deadline = Timestamp::from_millisecond((feasible.ceil() * 1000.0) as i64).unwrap_or(Timestamp::MAX);
        let limit = if schedulable < usable_max {
            format!("only {} could be scheduled", at_workers(schedulable))
        } else {
            format!("workers.max is {max_workers}")
        };
        let more = match workers_needed {
            Some(n) if n > best => {
                format!("raise workers.max to at least {n} (with GPUs to schedule them) or ")
            }
            _ => String::new(),
        };
        let suggestion = format!(
            "{limit}: projected {} against {} deadline, {} late at {} ({rate_note}); {more}move the deadline to {} or later",
            since_start(projected_at_max),
            since_start(obs.deadline),
            fmt_secs(late_at_best.max(0.0)),
            at_workers(best),
            feasible_deadline.round(jiff::Unit::Minute).unwrap_or(feasible_deadline),
        );
        let inf = Infeasibility { late_by_secs: late_at_best, projected_at_max, workers_needed, feasible_deadline, suggestion };
        (SlaStatus::Infeasible, Some(inf))
    } else {
        let over = plan_secs - target;
        let at_risk = match prev {
            Some(SlaStatus::OnTrack) => over > band,
            Some(SlaStatus::AtRisk) | Some(SlaStatus::Infeasible) => over > -band,
            _ => over > 0.0,
        };
        (if at_risk { SlaStatus::AtRisk } else { SlaStatus::OnTrack }, None)
    };

    let reason = match (&infeasible, status) {
        (Some(inf), _) => format!("infeasible: {}", inf.suggestion),
        (None, SlaStatus::Breached) => format!(
            "deadline passed {} ago with {} requests left; {}",
            fmt_secs(-to_deadline),
            remaining,
            projected.map_or("no projection".to_string(), |p| format!(
                "projected {} against {} deadline",
                since_start(p),
                since_start(obs.deadline)
            ))
        ),
        _ => {
            let head = if desired != cur && !shard_capped && cur > 0 {
                let at_cur = add_secs(now, work.makespan(cur.min(schedulable).max(1), mean_rate));
                format!(
                    "projected {} at {} against {} deadline (target {}); ",
                    at_cur.map_or("never".to_string(), since_start),
                    at_workers(cur),
                    since_start(obs.deadline),
                    fmt_secs(window * (1.0 - cfg.margin))
                )
            } else {
                String::new()
            };
            format!(
                "{head}projected {} at {} against {} deadline ({rate_note}, start-up {})",
                projected.map_or("never".to_string(), since_start),
                at_workers(effective),
                since_start(obs.deadline),
                fmt_secs(startup)
            )
        }
    };

    SlaDecision {
        desired_workers: desired,
        projected_completion: projected,
        slack_secs: slack,
        status,
        reason,
        infeasible,
        shard_capped,
        using_prior,
    }
}

/// Online estimate of per-worker throughput from progress records, forgetting old data so a
/// drifting rate is followed. Also keeps a running mean of measured pod start-up times.
///
/// Feed it one observation per new progress record of a running shard: the shard's requests
/// per second over the interval since its previous record (or since it became ready), weighted
/// by that interval's length in seconds. Records of finished shards carry no new interval.
#[derive(Clone, Debug, PartialEq)]
pub struct ThroughputEstimator {
    half_life: f64,
    sum_w: f64,
    sum_wx: f64,
    sum_wxx: f64,
    sum_ww: f64,
    count: u64,
    /// Smoothed start-up seconds.
    startup_sum: f64,
    /// Start-up measurements seen.
    startup_weight: f64,
}

impl Default for ThroughputEstimator {
    fn default() -> Self {
        Self::new()
    }
}

impl ThroughputEstimator {
    /// Default half-life of an observation, in units of weight (worker-seconds).
    pub const DEFAULT_HALF_LIFE: f64 = 7200.0;
    /// Smallest weight of a new start-up measurement: a plain mean of the first ten, then an
    /// exponential average over about the last ten (start-ups vary a lot from pod to pod).
    const STARTUP_ALPHA: f64 = 0.1;

    /// An empty estimator with the default half-life.
    pub fn new() -> Self {
        Self::with_half_life(Self::DEFAULT_HALF_LIFE)
    }

    /// An empty estimator whose observations lose half their weight after `half_life` units of
    /// newer weight (non-positive means never forget).
    pub fn with_half_life(half_life: f64) -> Self {
        Self {
            half_life: if half_life.is_finite() && half_life > 0.0 { half_life } else { f64::INFINITY },
            sum_w: 0.0,
            sum_wx: 0.0,
            sum_wxx: 0.0,
            sum_ww: 0.0,
            count: 0,
            startup_sum: 0.0,
            startup_weight: 0.0,
        }
    }

    /// Record a per-worker rate (requests/s) measured over `weight` seconds. Non-finite,
    /// negative or zero-weight observations are ignored.
    pub fn observe(&mut self, worker_rps: f64, weight: f64) {
        if !worker_rps.is_finite() || worker_rps < 0.0 || !weight.is_finite() || weight <= 0.0 {
            return;
        }
        let decay = (-std::f64::consts::LN_2 * weight / self.half_life).exp();
        self.sum_w = self.sum_w * decay + weight;
        self.sum_wx = self.sum_wx * decay + weight * worker_rps;
        self.sum_wxx = self.sum_wxx * decay + weight * worker_rps * worker_rps;
        self.sum_ww = self.sum_ww * decay * decay + weight * weight;
        self.count += 1;
    }

    /// The current estimate, `None` before any observation.
    pub fn estimate(&self) -> Option<RateEstimate> {
        if self.count == 0 || self.sum_w <= 0.0 {
            return None;
        }
        let mean = self.sum_wx / self.sum_w;
        let var = (self.sum_wxx / self.sum_w - mean * mean).max(0.0);
        let n_eff = if self.sum_ww > 0.0 { self.sum_w * self.sum_w / self.sum_ww } else { 1.0 };
        let samples = (n_eff.round() as u64).clamp(1, self.count.min(u64::from(u32::MAX))) as u32;
        Some(RateEstimate { mean, stddev: var.sqrt(), samples })
    }

    /// Record one measured pod start-up (creation to first request admitted), in seconds.
    pub fn observe_startup(&mut self, secs: f64) {
        if !secs.is_finite() || secs < 0.0 {
            return;
        }
        self.startup_weight += 1.0;
        let alpha = (1.0 / self.startup_weight).max(Self::STARTUP_ALPHA);
        self.startup_sum += alpha * (secs - self.startup_sum);
    }

    /// Smoothed pod start-up seconds, `None` before any measurement.
    pub fn startup_secs(&self) -> Option<f64> {
        (self.startup_weight > 0.0).then_some(self.startup_sum)
    }
}

#[cfg(test)]
mod tests;
