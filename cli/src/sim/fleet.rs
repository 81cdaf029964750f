//! `sluice-sim --fleet`: many jobs against one GPU budget. Declarative multi-job scenarios, a
//! simulated cluster (arrivals, start-ups, shards that finish before a worker is given back,
//! noisy and drifting throughput, pod failures, moving deadlines), and the policies compared:
//! Sluice's fleet scheduler ([`sluice_control::fleet::plan`], the real code), each job sized
//! alone, a Dynamo-style EDF replica floor, FIFO with fixed parallelism, and a fleet oracle.

use serde_json::json;
use sluice_control::fleet::{self, Budget, FleetConfig, FleetJob, Why};
use sluice_control::sla::{RateEstimate, ThroughputEstimator};

/// Seconds per simulation step (one resync).
const STEP: f64 = 30.0;

/// One job of a fleet scenario.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub name: &'static str,
    pub namespace: &'static str,
    pub model: &'static str,
    pub priority: i32,
    pub arrive: f64,
    pub requests: f64,
    pub window: f64,
    /// True requests/s of one worker.
    pub rps: f64,
    /// Coefficient of variation of the per-step rate.
    pub noise: f64,
    /// The true rate is multiplied by this from half-way through the job's window.
    pub drift: f64,
    pub startup: f64,
    pub max_workers: u32,
    pub gpus: u32,
    /// Requests per shard (a worker given back finishes its shard first).
    pub shard: f64,
    /// Times (after arrival) a worker pod fails, losing its shard in progress.
    pub failures: &'static [f64],
    /// `(after arrival, new window)`: the deadline moves.
    pub deadline_move: Option<(f64, f64)>,
}

/// A fleet scenario.
#[derive(Clone, Debug)]
pub struct FleetScenario {
    pub name: &'static str,
    pub about: &'static str,
    pub budget: u32,
    pub per_namespace: &'static [(&'static str, u32)],
    pub jobs: Vec<JobSpec>,
    pub seed: u64,
}

fn job(name: &'static str, arrive: f64, requests: f64, window: f64, max_workers: u32) -> JobSpec {
    JobSpec {
        name,
        namespace: "ml",
        model: "llama-8b",
        priority: 0,
        arrive,
        requests,
        window,
        rps: 1.0,
        noise: 0.1,
        drift: 1.0,
        startup: 120.0,
        max_workers,
        gpus: 1,
        shard: 200.0,
        failures: &[],
        deadline_move: None,
    }
}

const H: f64 = 3600.0;

/// The catalogue.
pub fn scenarios() -> Vec<FleetScenario> {
    let with = |mut j: JobSpec, f: &dyn Fn(&mut JobSpec)| {
        f(&mut j);
        j
    };
    let day: Vec<JobSpec> = (0..12)
        .map(|i| {
            let names = ["d00", "d01", "d02", "d03", "d04", "d05", "d06", "d07", "d08", "d09", "d10", "d11"];
            let w = [4.0, 6.0, 8.0, 3.0, 12.0, 5.0][i % 6] * H;
            with(job(names[i], f64::from(i as u32) * 2.0 * H, 20_000.0 + 4_000.0 * (i % 3) as f64, w, 8), &|j| j.noise = 0.15)
        })
        .collect();
    let small: Vec<JobSpec> = (0..20)
        .map(|i| {
            let names = [
                "s00", "s01", "s02", "s03", "s04", "s05", "s06", "s07", "s08", "s09", "s10", "s11", "s12", "s13", "s14", "s15", "s16",
                "s17", "s18", "s19",
            ];
            job(names[i], f64::from(i as u32) * 600.0, 3_000.0, 2.0 * H, 4)
        })
        .collect();
    vec![
        FleetScenario {
            name: "two-fit",
            about: "two jobs whose needs fit the budget together",
            budget: 16,
            per_namespace: &[],
            jobs: vec![job("a", 0.0, 20_000.0, 4.0 * H, 8), job("b", 0.0, 15_000.0, 6.0 * H, 8)],
            seed: 1,
        },
        FleetScenario {
            name: "tight-after-slack",
            about: "a slack job holds the budget; a tight one arrives and takes workers from it",
            budget: 8,
            per_namespace: &[],
            jobs: vec![job("slack", 0.0, 40_000.0, 20.0 * H, 8), job("tight", 1800.0, 18_000.0, 2.0 * H, 8)],
            seed: 2,
        },
        FleetScenario {
            name: "burst-past-budget",
            about: "six jobs at once, more than the budget can finish; priorities decide",
            budget: 12,
            per_namespace: &[],
            jobs: (0..6)
                .map(|i| {
                    let names = ["b0", "b1", "b2", "b3", "b4", "b5"];
                    with(job(names[i], 0.0, 30_000.0, 3.0 * H, 8), &|j| j.priority = (i % 2) as i32)
                })
                .collect(),
            seed: 3,
        },
        FleetScenario {
            name: "day-of-arrivals",
            about: "twelve jobs over a day, mixed windows",
            budget: 16,
            per_namespace: &[],
            jobs: day,
            seed: 4,
        },
        FleetScenario {
            name: "mixed-priorities",
            about: "equal deadlines, room for half: the high-priority jobs are met",
            budget: 8,
            per_namespace: &[],
            jobs: vec![
                with(job("low-1", 0.0, 20_000.0, 2.0 * H, 8), &|j| j.priority = 0),
                with(job("high-1", 0.0, 20_000.0, 2.0 * H, 8), &|j| j.priority = 10),
            ],
            seed: 5,
        },
        FleetScenario {
            name: "drifting-throughput",
            about: "every job slows to 70 % half-way through its window",
            budget: 16,
            per_namespace: &[],
            jobs: vec![
                with(job("drift-a", 0.0, 25_000.0, 4.0 * H, 8), &|j| j.drift = 0.7),
                with(job("drift-b", 600.0, 25_000.0, 5.0 * H, 8), &|j| j.drift = 0.7),
            ],
            seed: 6,
        },
        FleetScenario {
            name: "pod-failures",
            about: "the tight job loses four pods mid-run",
            budget: 10,
            per_namespace: &[],
            jobs: vec![
                with(job("fragile", 0.0, 20_000.0, 3.0 * H, 8), &|j| j.failures = &[1800.0, 2400.0, 3600.0, 5400.0]),
                job("steady", 0.0, 20_000.0, 10.0 * H, 8),
            ],
            seed: 7,
        },
        FleetScenario {
            name: "deadline-moves",
            about: "a job's deadline is brought forward by 3 h mid-run",
            budget: 10,
            per_namespace: &[],
            jobs: vec![
                with(job("moved", 0.0, 30_000.0, 8.0 * H, 8), &|j| j.deadline_move = Some((H, 5.0 * H))),
                job("other", 0.0, 20_000.0, 8.0 * H, 8),
            ],
            seed: 8,
        },
        FleetScenario {
            name: "infeasible-alone",
            about: "one job cannot make it even with every worker: flagged at admission",
            budget: 16,
            per_namespace: &[],
            jobs: vec![job("impossible", 0.0, 100_000.0, 2.0 * H, 8), job("fine", 0.0, 10_000.0, 4.0 * H, 8)],
            seed: 9,
        },
        FleetScenario {
            name: "infeasible-by-budget",
            about: "two tight jobs that each fit alone but not together",
            budget: 8,
            per_namespace: &[],
            jobs: vec![job("first", 0.0, 24_000.0, 1.5 * H, 8), job("second", 0.0, 24_000.0, 1.6 * H, 8)],
            seed: 10,
        },
        FleetScenario {
            name: "namespace-caps",
            about: "a namespace capped at 4 GPUs beside an uncapped one",
            budget: 16,
            per_namespace: &[("capped", 4)],
            jobs: vec![
                with(job("c1", 0.0, 20_000.0, 3.0 * H, 8), &|j| j.namespace = "capped"),
                with(job("free", 0.0, 30_000.0, 3.0 * H, 8), &|j| j.namespace = "open"),
            ],
            seed: 11,
        },
        FleetScenario {
            name: "long-startup",
            about: "10-minute start-ups: adding workers late costs",
            budget: 12,
            per_namespace: &[],
            jobs: vec![
                with(job("heavy-a", 0.0, 30_000.0, 3.0 * H, 8), &|j| j.startup = 600.0),
                with(job("heavy-b", 1200.0, 20_000.0, 4.0 * H, 8), &|j| j.startup = 600.0),
            ],
            seed: 12,
        },
        FleetScenario {
            name: "many-small",
            about: "twenty small jobs every 10 minutes",
            budget: 8,
            per_namespace: &[],
            jobs: small,
            seed: 13,
        },
        FleetScenario {
            name: "noisy-throughput",
            about: "per-step throughput with a 30 % coefficient of variation",
            budget: 12,
            per_namespace: &[],
            jobs: vec![
                with(job("noisy-a", 0.0, 25_000.0, 3.0 * H, 8), &|j| j.noise = 0.3),
                with(job("noisy-b", 900.0, 25_000.0, 4.0 * H, 8), &|j| j.noise = 0.3),
            ],
            seed: 14,
        },
        FleetScenario {
            name: "repeat-model",
            about: "the same model three times in a row: the later ones are quoted from the profile",
            budget: 8,
            per_namespace: &[],
            jobs: vec![
                with(job("run-1", 0.0, 15_000.0, 4.0 * H, 8), &|j| j.noise = 0.2),
                with(job("run-2", 3.0 * H, 15_000.0, 4.0 * H, 8), &|j| j.noise = 0.2),
                with(job("run-3", 6.0 * H, 15_000.0, 4.0 * H, 8), &|j| j.noise = 0.2),
            ],
            seed: 15,
        },
        FleetScenario {
            name: "mixed-gpu-sizes",
            about: "2-GPU workers beside 1-GPU workers in one budget",
            budget: 12,
            per_namespace: &[],
            jobs: vec![
                with(job("big", 0.0, 20_000.0, 3.0 * H, 6), &|j| {
                    j.gpus = 2;
                    j.rps = 1.8;
                }),
                job("small", 0.0, 20_000.0, 3.0 * H, 8),
            ],
            seed: 16,
        },
    ]
}

/// The policies, in table order.
pub const POLICIES: [&str; 5] = ["sluice", "alone", "edf-floor", "fifo-fixed", "oracle"];

#[derive(Clone, Debug)]
struct Worker {
    ready_at: f64,
    /// Given back: it stops at this time (its shard done).
    leaving_at: Option<f64>,
}

#[derive(Clone, Debug)]
struct JobState {
    spec: JobSpec,
    deadline: f64,
    done: f64,
    workers: Vec<Worker>,
    est: ThroughputEstimator,
    finished_at: Option<f64>,
    flagged_at: Option<f64>,
    quoted_finish: Option<f64>,
    gpu_secs: f64,
    next_failure: usize,
}

/// What one job's run came to.
#[derive(Clone, Debug)]
pub struct JobResult {
    pub name: &'static str,
    pub met: bool,
    pub finished_at: Option<f64>,
    pub deadline: f64,
    pub arrive: f64,
    pub flagged_at: Option<f64>,
    pub quoted_finish: Option<f64>,
    pub gpu_hours: f64,
}

/// One scenario under one policy.
#[derive(Clone, Debug)]
pub struct FleetRun {
    pub policy: &'static str,
    pub jobs: Vec<JobResult>,
    /// Steps at which the GPUs held exceeded the budget.
    pub budget_exceeded: u32,
    pub gpu_hours: f64,
}

impl FleetRun {
    pub fn met(&self) -> usize {
        self.jobs.iter().filter(|j| j.met).count()
    }
}

fn unit(seed: u64, a: u64, b: u64) -> f64 {
    let mut x = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A normal-ish noise factor (sum of uniforms), mean 1 and the given CV, never below 0.2.
fn noise(seed: u64, a: u64, b: u64, cv: f64) -> f64 {
    let s: f64 = (0..4).map(|k| unit(seed, a, b * 4 + k)).sum::<f64>() - 2.0;
    (1.0 + cv * s * (3.0f64).sqrt()).max(0.2)
}

impl JobState {
    fn true_rate(&self, t: f64) -> f64 {
        let half = self.spec.arrive + self.spec.window / 2.0;
        self.spec.rps * if t >= half { self.spec.drift } else { 1.0 }
    }

    fn held(&self) -> u32 {
        self.workers.len() as u32 * self.spec.gpus
    }

    fn view(&self, now: f64, profile: Option<f64>, oracle: bool) -> FleetJob {
        // Workers given back still hold their GPUs until their shard is done: they count as
        // workers the plan cannot take (as running shards do).
        let leaving = self.workers.iter().filter(|w| w.leaving_at.is_some()).count() as u32;
        let ready = self.workers.iter().filter(|w| w.ready_at <= now && w.leaving_at.is_none()).count() as u32;
        let staying = self.workers.iter().filter(|w| w.leaving_at.is_none()).count() as u32;
        let rate = if oracle {
            RateEstimate { mean: self.true_rate(now), stddev: 0.0, samples: 1000 }
        } else {
            self.est.estimate().unwrap_or(match profile {
                // The model's learned profile: the mean of earlier jobs, with the spread it had.
                Some(r) => RateEstimate { mean: r, stddev: 0.2 * r, samples: 4 },
                // No profile: a prior that is 30 % optimistic, with a wide spread.
                None => RateEstimate { mean: self.spec.rps * 1.3, stddev: 0.5 * self.spec.rps, samples: 1 },
            })
        };
        FleetJob {
            key: format!("{}/{}", self.spec.namespace, self.spec.name),
            namespace: self.spec.namespace.to_string(),
            priority: self.spec.priority,
            arrived: self.spec.arrive,
            deadline: self.deadline,
            remaining_requests: (self.spec.requests - self.done).max(0.0),
            rate,
            startup_secs: self.spec.startup,
            gpus_per_worker: self.spec.gpus,
            min_workers: 0,
            max_workers: self.spec.max_workers,
            current_workers: staying,
            protected_workers: ready,
            releasing_workers: leaving,
            remaining_shards: ((self.spec.requests - self.done) / self.spec.shard).ceil().max(0.0) as u32,
            lending: false,
        }
    }
}

fn budget_of(sc: &FleetScenario) -> Budget {
    Budget { gpus: sc.budget, per_namespace: sc.per_namespace.iter().map(|(n, g)| (n.to_string(), *g)).collect() }
}

/// Each policy's decision: workers per active job (indices into `active`), and whether it
/// flags a job as infeasible.
fn decide(policy: &str, sc: &FleetScenario, now: f64, views: &[FleetJob]) -> Vec<(u32, bool)> {
    let budget = budget_of(sc);
    let cfg = FleetConfig::default();
    match policy {
        "sluice" | "oracle" => {
            let cfg = if policy == "oracle" { FleetConfig { pessimism_k: 0.0, safety_secs: 60.0, ..cfg } } else { cfg };
            let grants = fleet::plan(now, views, &budget, &cfg);
            views
                .iter()
                .map(|v| {
                    grants.iter().find(|g| g.key == v.key).map_or((0, false), |g| (g.workers, matches!(g.why, Why::Infeasible { .. })))
                })
                .collect()
        }
        "alone" => {
            // Each job sized as if it had the cluster to itself; pods beyond the budget stay
            // Pending, first come first served.
            let mut order: Vec<usize> = (0..views.len()).collect();
            order.sort_by(|&a, &b| views[a].arrived.total_cmp(&views[b].arrived));
            fifo_clip(views, &order, &budget, |v| {
                let r = fleet::planning_rate(&v.rate, cfg.pessimism_k);
                fleet::need(v, now, r, cfg.safety_secs).unwrap_or(v.max_workers)
            })
        }
        "edf-floor" => {
            // Dynamo-style: earliest deadline first, each job's floor from its mean rate.
            let mut order: Vec<usize> = (0..views.len()).collect();
            order.sort_by(|&a, &b| views[a].deadline.total_cmp(&views[b].deadline));
            fifo_clip(views, &order, &budget, |v| fleet::need(v, now, v.rate.mean, 0.0).unwrap_or(v.max_workers))
        }
        _ => {
            // FIFO with fixed parallelism (a Kueue queue as people use it): a job starts when
            // its full parallelism fits.
            let mut order: Vec<usize> = (0..views.len()).collect();
            order.sort_by(|&a, &b| views[a].arrived.total_cmp(&views[b].arrived));
            let mut free = i64::from(budget.gpus)
                - views.iter().map(|v| i64::from((v.current_workers + v.releasing_workers) * v.gpus_per_worker)).sum::<i64>();
            let mut out = vec![(0, false); views.len()];
            for i in order {
                let v = &views[i];
                if v.current_workers > 0 {
                    out[i] = (v.current_workers, false);
                } else if free >= i64::from(v.max_workers * v.gpus_per_worker) {
                    free -= i64::from(v.max_workers * v.gpus_per_worker);
                    out[i] = (v.max_workers, false);
                }
            }
            out
        }
    }
}

/// Give jobs in `order` what `want` says while GPUs are free (workers mid-shard keep theirs).
fn fifo_clip(views: &[FleetJob], order: &[usize], budget: &Budget, want: impl Fn(&FleetJob) -> u32) -> Vec<(u32, bool)> {
    let floor = |v: &FleetJob| i64::from((v.protected_workers + v.releasing_workers) * v.gpus_per_worker.max(1));
    let mut free = i64::from(budget.gpus) - views.iter().map(floor).sum::<i64>();
    let mut out = vec![(0, false); views.len()];
    for &i in order {
        let v = &views[i];
        let g = i64::from(v.gpus_per_worker.max(1));
        free += floor(v);
        let ns_cap = budget.per_namespace.get(&v.namespace).map_or(i64::MAX, |c| i64::from(*c) / g);
        let room = (free - i64::from(v.releasing_workers) * g) / g;
        let grant = i64::from(want(v)).min(room).min(ns_cap).max(0);
        free -= (grant.max(i64::from(v.protected_workers)) + i64::from(v.releasing_workers)) * g;
        out[i] = (u32::try_from(grant).unwrap_or(0), false);
    }
    out
}

/// Run a scenario under one policy.
pub fn run(sc: &FleetScenario, policy: &'static str) -> FleetRun {
    let mut jobs: Vec<JobState> = sc
        .jobs
        .iter()
        .map(|s| JobState {
            spec: s.clone(),
            deadline: s.arrive + s.window,
            done: 0.0,
            workers: Vec::new(),
            est: ThroughputEstimator::new(),
            finished_at: None,
            flagged_at: None,
            quoted_finish: None,
            gpu_secs: 0.0,
            next_failure: 0,
        })
        .collect();
    let horizon = jobs.iter().map(|j| j.spec.arrive + j.spec.window).fold(0.0, f64::max) * 3.0;
    let mut profiles: std::collections::BTreeMap<&str, (f64, u32)> = Default::default();
    let mut exceeded = 0;
    let mut step: u64 = 0;
    let mut t = 0.0;
    while t < horizon && jobs.iter().any(|j| j.finished_at.is_none()) {
        let active: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].spec.arrive <= t && jobs[i].finished_at.is_none()).collect();
        for &i in &active {
            if let Some((after, w)) = jobs[i].spec.deadline_move
                && t >= jobs[i].spec.arrive + after
            {
                jobs[i].deadline = jobs[i].spec.arrive + w;
            }
        }
        let profile = |j: &JobState| profiles.get(j.spec.model).map(|(sum, n)| sum / f64::from(*n));
        let views: Vec<FleetJob> = active.iter().map(|&i| jobs[i].view(t, profile(&jobs[i]), policy == "oracle")).collect();
        // The quote at admission (Sluice's own plan, as `sluice quote` prints it).
        if policy == "sluice" {
            for (k, &i) in active.iter().enumerate() {
                if jobs[i].quoted_finish.is_none() {
                    let others: Vec<FleetJob> = views.iter().enumerate().filter(|(x, _)| *x != k).map(|(_, v)| v.clone()).collect();
                    let q =
                        fleet::quote(t, &others, &views[k], &budget_of(sc), &FleetConfig { pessimism_k: 0.0, ..FleetConfig::default() });
                    jobs[i].quoted_finish = q.grant.projected_finish.or(Some(f64::INFINITY));
                }
            }
        }
        let plan = decide(policy, sc, t, &views);
        for (k, &i) in active.iter().enumerate() {
            let (want, infeasible) = plan[k];
            let j = &mut jobs[i];
            if infeasible && j.flagged_at.is_none() {
                j.flagged_at = Some(t);
            }
            let staying: Vec<usize> = (0..j.workers.len()).filter(|&w| j.workers[w].leaving_at.is_none()).collect();
            let have = staying.len() as u32;
            if want > have {
                for _ in have..want {
                    j.workers.push(Worker { ready_at: t + j.spec.startup, leaving_at: None });
                }
            } else if want < have {
                // Starting workers go at once; running ones finish their shard first.
                let mut drop = have - want;
                let mut order = staying.clone();
                order.sort_by(|&a, &b| j.workers[b].ready_at.total_cmp(&j.workers[a].ready_at));
                for w in order {
                    if drop == 0 {
                        break;
                    }
                    let shard_left = j.spec.shard / j.true_rate(t) * unit(sc.seed, step, (i * 1000 + w) as u64);
                    j.workers[w].leaving_at = Some(if j.workers[w].ready_at > t { t } else { t + shard_left });
                    drop -= 1;
                }
            }
        }
        // Pod failures: a running worker dies; its shard in progress is lost (and re-run).
        for &i in &active {
            let j = &mut jobs[i];
            if let Some(&at) = j.spec.failures.get(j.next_failure)
                && t >= j.spec.arrive + at
            {
                j.next_failure += 1;
                if let Some(w) = j.workers.iter().position(|w| w.ready_at <= t && w.leaving_at.is_none()) {
                    j.workers.remove(w);
                    j.done = (j.done - j.spec.shard * 0.5).max(0.0);
                }
            }
        }
        // Workers given back before they started are gone now.
        for j in jobs.iter_mut() {
            j.workers.retain(|w| w.leaving_at.is_none_or(|l| l > t));
        }
        let held: u32 = jobs.iter().map(JobState::held).sum();
        if held > sc.budget {
            exceeded += 1;
        }
        // Work.
        for (i, j) in jobs.iter_mut().enumerate() {
            if j.finished_at.is_some() || j.spec.arrive > t {
                continue;
            }
            let rate = j.true_rate(t);
            let mut processed = 0.0;
            for (w, wk) in j.workers.iter().enumerate() {
                let from = wk.ready_at.max(t);
                let to = wk.leaving_at.map_or(t + STEP, |l| l.min(t + STEP));
                if to > from {
                    let r = rate * noise(sc.seed, step, (i * 1000 + w) as u64, j.spec.noise);
                    processed += r * (to - from);
                    j.est.observe(r, to - from);
                }
                j.gpu_secs += (wk.leaving_at.map_or(t + STEP, |l| l.min(t + STEP)) - t).max(0.0) * f64::from(j.spec.gpus);
            }
            j.done += processed;
            j.workers.retain(|w| w.leaving_at.is_none_or(|l| l > t + STEP));
            if j.done >= j.spec.requests {
                // Finished inside the step, in proportion.
                let over = (j.done - j.spec.requests) / processed.max(1e-9);
                j.finished_at = Some(t + STEP * (1.0 - over).clamp(0.0, 1.0));
                j.workers.clear();
                if let Some(e) = j.est.estimate() {
                    let p = profiles.entry(j.spec.model).or_insert((0.0, 0));
                    p.0 += e.mean;
                    p.1 += 1;
                }
            }
        }
        t += STEP;
        step += 1;
    }
    let results: Vec<JobResult> = jobs
        .iter()
        .map(|j| JobResult {
            name: j.spec.name,
            met: j.finished_at.is_some_and(|f| f <= j.deadline),
            finished_at: j.finished_at,
            deadline: j.deadline,
            arrive: j.spec.arrive,
            flagged_at: j.flagged_at,
            quoted_finish: j.quoted_finish,
            gpu_hours: j.gpu_secs / H,
        })
        .collect();
    FleetRun { policy, gpu_hours: results.iter().map(|r| r.gpu_hours).sum(), jobs: results, budget_exceeded: exceeded }
}

/// Every policy on one scenario.
pub struct FleetReport {
    pub scenario: FleetScenario,
    pub runs: Vec<FleetRun>,
}

impl FleetReport {
    fn run_of(&self, policy: &str) -> Option<&FleetRun> {
        self.runs.iter().find(|r| r.policy == policy)
    }
}

pub fn run_all() -> Vec<FleetReport> {
    scenarios().into_iter().map(|sc| FleetReport { runs: POLICIES.iter().map(|p| run(&sc, p)).collect(), scenario: sc }).collect()
}

/// The summary line's numbers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetSummary {
    pub budget_exceeded: u32,
    pub feasible_met: usize,
    pub feasible_total: usize,
    pub missed_vs_oracle: i64,
    pub mean_gpu_hours_vs_oracle: f64,
    pub infeasible_flagged_early: usize,
    pub infeasible_total: usize,
    /// Jobs of a model that ran before whose admission quote was within 20 % of the actual run time.
    pub quotes_within_20pct: usize,
    pub quotes_total: usize,
}

impl FleetSummary {
    pub fn of(reports: &[FleetReport]) -> Self {
        let mut s = FleetSummary::default();
        let mut ratios = Vec::new();
        for r in reports {
            let (Some(sl), Some(or)) = (r.run_of("sluice"), r.run_of("oracle")) else { continue };
            s.budget_exceeded += sl.budget_exceeded;
            s.missed_vs_oracle += (sl.jobs.len() - sl.met()) as i64 - (or.jobs.len() - or.met()) as i64;
            if or.gpu_hours > 0.0 {
                ratios.push(sl.gpu_hours / or.gpu_hours);
            }
            let mut quoted = std::collections::BTreeSet::new();
            for (js, jo) in sl.jobs.iter().zip(&or.jobs) {
                let spec = r.scenario.jobs.iter().find(|x| x.name == js.name);
                if jo.met {
                    s.feasible_total += 1;
                    s.feasible_met += usize::from(js.met);
                } else {
                    s.infeasible_total += 1;
                    let lead = super::required_flag_lead(js.deadline - js.arrive);
                    if js.flagged_at.is_some_and(|f| f <= js.arrive || js.deadline - f >= lead) {
                        s.infeasible_flagged_early += 1;
                    }
                }
                // Quotes of jobs whose model finished a job before this one arrived.
                let ran_before = |model: &str| {
                    sl.jobs
                        .iter()
                        .zip(&r.scenario.jobs)
                        .any(|(o, os)| os.model == model && o.name != js.name && o.finished_at.is_some_and(|of| of <= js.arrive))
                };
                if let (Some(spec), Some(q), Some(f)) = (spec, js.quoted_finish, js.finished_at)
                    && ran_before(spec.model)
                    && quoted.insert(js.name)
                {
                    s.quotes_total += 1;
                    let actual = f - js.arrive;
                    if ((q - js.arrive) - actual).abs() <= 0.2 * actual {
                        s.quotes_within_20pct += 1;
                    }
                }
            }
        }
        s.mean_gpu_hours_vs_oracle = if ratios.is_empty() { 1.0 } else { ratios.iter().sum::<f64>() / ratios.len() as f64 };
        s
    }

    pub fn to_json(&self) -> String {
        json!({"summary": {
            "budget_exceeded": self.budget_exceeded,
            "feasible_met": self.feasible_met,
            "feasible_total": self.feasible_total,
            "missed_vs_oracle": self.missed_vs_oracle,
            "mean_gpu_hours_vs_oracle": (self.mean_gpu_hours_vs_oracle * 1000.0).round() / 1000.0,
            "infeasible_flagged_early": self.infeasible_flagged_early,
            "infeasible_total": self.infeasible_total,
            "quotes_within_20pct": self.quotes_within_20pct,
            "quotes_total": self.quotes_total,
        }})
        .to_string()
    }
}

/// One JSON object per scenario × policy.
pub fn run_json(r: &FleetReport, run: &FleetRun) -> String {
    json!({
        "scenario": r.scenario.name,
        "policy": run.policy,
        "met": run.met(),
        "jobs": run.jobs.len(),
        "gpu_hours": (run.gpu_hours * 100.0).round() / 100.0,
        "budget_exceeded": run.budget_exceeded,
        "missed": run.jobs.iter().filter(|j| !j.met).map(|j| j.name).collect::<Vec<_>>(),
        "quotes": run.jobs.iter().filter_map(|j| {
            let (q, f) = (j.quoted_finish?, j.finished_at?);
            let actual = f - j.arrive;
            Some(json!({
                "job": j.name,
                "quoted_secs": (q - j.arrive).round(),
                "actual_secs": actual.round(),
                "error_pct": (((q - j.arrive) - actual) / actual.max(1e-9) * 1000.0).round() / 10.0,
            }))
        }).collect::<Vec<_>>(),
    })
    .to_string()
}

/// The Markdown table: per scenario, each policy's deadlines met and GPU-hours.
pub fn table(reports: &[FleetReport]) -> String {
    let mut out = String::from("| scenario | budget | jobs |");
    for p in POLICIES {
        out.push_str(&format!(" {p} met | {p} GPU-h |"));
    }
    out.push('\n');
    out.push_str("|---|---:|---:|");
    for _ in POLICIES {
        out.push_str("---:|---:|");
    }
    out.push('\n');
    for r in reports {
        out.push_str(&format!("| {} | {} | {} |", r.scenario.name, r.scenario.budget, r.scenario.jobs.len()));
        for run in &r.runs {
            let over = if run.budget_exceeded > 0 { format!(" (over budget {}×)", run.budget_exceeded) } else { String::new() };
            out.push_str(&format!(" {}{over} | {:.1} |", run.met(), run.gpu_hours));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sluice_never_exceeds_the_budget_and_the_tight_job_borrows() {
        let sc = scenarios().into_iter().find(|s| s.name == "tight-after-slack").unwrap();
        let r = run(&sc, "sluice");
        assert_eq!(r.budget_exceeded, 0);
        assert_eq!(r.met(), 2, "{r:?}");
    }

    #[test]
    fn there_are_at_least_fifteen_scenarios() {
        assert!(scenarios().len() >= 15);
    }
}
