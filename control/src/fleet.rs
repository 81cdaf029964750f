//! The fleet scheduler: many jobs, one GPU budget. From each job's remaining work, its
//! throughput with its uncertainty, deadline, priority and start-up cost, [`plan`] chooses every
//! job's workers so that the most deadlines are met inside the budget at the fewest GPU-hours,
//! and says why; [`quote`] projects a job before it starts. Pure: times are seconds on the
//! caller's clock; the reconciler, `sluice quote` and `sluice-sim --fleet` apply or print it.

use std::collections::BTreeMap;

use crate::sla::RateEstimate;

/// The GPUs Sluice may hold at once: in all, and per namespace where a namespace has a cap.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Budget {
    pub gpus: u32,
    pub per_namespace: BTreeMap<String, u32>,
}

/// One job as the fleet scheduler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetJob {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    /// Higher runs first when not every deadline can be met (a strict tier, like a PriorityClass).
    pub priority: i32,
    /// When the job arrived (seconds on the caller's clock).
    pub arrived: f64,
    /// Its deadline (same clock).
    pub deadline: f64,
    /// Requests not yet committed.
    pub remaining_requests: f64,
    /// Per-worker requests per second (observed, or the model's learned profile before any).
    pub rate: RateEstimate,
    /// Seconds from a new worker's creation to its first request.
    pub startup_secs: f64,
    /// GPUs of one worker (1 for a CPU worker: the budget counts workers then).
    pub gpus_per_worker: u32,
    pub min_workers: u32,
    pub max_workers: u32,
    /// Workers now (running or starting), not counting those already given back.
    pub current_workers: u32,
    /// Of those, workers in the middle of a shard: a plan below them gives them back only as
    /// their shards finish, so until then they still hold their GPUs.
    pub protected_workers: u32,
    /// Workers given back that are finishing their shard: they hold GPUs whatever the plan.
    pub releasing_workers: u32,
    /// Shards not yet committed: more workers than this is waste.
    pub remaining_shards: u32,
    /// It was lending workers at the previous plan: it goes on saying so (to whom) while it gets
    /// fewer than it would with the budget to itself.
    pub lending: bool,
}

/// Tuning of the fleet scheduler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FleetConfig {
    /// Plan with `mean − k·stddev/√samples` (as the single-job scaler does).
    pub pessimism_k: f64,
    /// Aim to finish this many seconds before each deadline.
    pub safety_secs: f64,
    /// A job without workers for this long gets one before any job gets more than its need.
    pub starvation_secs: f64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self { pessimism_k: 1.0, safety_secs: 300.0, starvation_secs: 3600.0 }
    }
}

/// Why a job has the workers it has.
#[derive(Clone, Debug, PartialEq)]
pub enum Why {
    /// Its need is met: the deadline is reachable at these workers.
    OnTrack,
    /// Fewer than it needs now, but GPUs held by jobs ahead of it come free in time.
    Waiting { gpus_short: u32, reachable_at: f64 },
    /// Even all the workers it may use cannot make the deadline, or the budget never frees enough.
    Infeasible { earliest_finish: Option<f64>, gpus_needed: Option<u32> },
    /// Nothing left to run.
    Done,
}

/// The plan for one job.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub key: String,
    /// Workers to run now.
    pub workers: u32,
    /// Projected finish at the plan (conservative rate); `None` when it cannot be projected.
    pub projected_finish: Option<f64>,
    /// Projected GPU-hours still to spend.
    pub gpu_hours: f64,
    pub why: Why,
    /// Workers given up to jobs ahead of it: (to whom, how many).
    pub lent: Vec<(String, u32)>,
    /// A sentence for status, Events and `kubectl sluice status`.
    pub message: String,
}

impl Grant {
    pub fn feasible(&self) -> bool {
        !matches!(self.why, Why::Infeasible { .. })
    }
}

/// The rate the plan counts on: the mean less `k` standard errors, never below half the mean.
pub fn planning_rate(rate: &RateEstimate, k: f64) -> f64 {
    let se = if rate.samples > 0 { rate.stddev / f64::from(rate.samples).sqrt() } else { rate.stddev };
    (rate.mean - k * se).max(rate.mean * 0.5).max(1e-9)
}

fn usable_max(j: &FleetJob) -> u32 {
    j.max_workers.min(j.remaining_shards.max(1)).max(j.min_workers.min(j.max_workers)).max(1)
}

/// When `j` finishes with `w` workers from `start`: workers beyond those it has pay the
/// start-up first (while the ones it has keep going).
pub fn finish_at(j: &FleetJob, w: u32, start: f64, rate: f64) -> f64 {
    if j.remaining_requests <= 0.0 {
        return start;
    }
    let w = f64::from(w.max(1));
    let have = f64::from(j.current_workers.min(w as u32)).max(0.0);
    if have >= w {
        return start + j.remaining_requests / (w * rate);
    }
    let during_startup = have * rate * j.startup_secs;
    if during_startup >= j.remaining_requests {
        return start + j.remaining_requests / (have * rate);
    }
    start + j.startup_secs + (j.remaining_requests - during_startup) / (w * rate)
}

/// The fewest workers that finish `j` by its deadline (less the safety) when they start at
/// `start`; `None` when even its most usable workers cannot.
pub fn need(j: &FleetJob, start: f64, rate: f64, safety: f64) -> Option<u32> {
    let lo = j.min_workers.max(1);
    (lo..=usable_max(j).max(lo)).find(|&w| finish_at(j, w, start, rate) <= j.deadline - safety)
}

/// GPU-hours of `w` workers from `start` to `finish` (new workers count from their creation).
fn gpu_hours(j: &FleetJob, w: u32, start: f64, finish: f64) -> f64 {
    f64::from(w) * (finish - start).max(0.0) * f64::from(j.gpus_per_worker.max(1)) / 3600.0
}

fn hhmm(t: f64) -> String {
    let s = t.max(0.0) as i64;
    jiff::Timestamp::from_second(s).map(|ts| ts.strftime("%H:%M").to_string()).unwrap_or_else(|_| format!("{s}s"))
}

fn fmt_hours(secs: f64) -> String {
    crate::sla::fmt_secs(secs.max(0.0))
}

/// GPUs left to namespace `ns` under its cap (unbounded without one).
fn ns_room(budget: &Budget, ns: &str, used: &BTreeMap<&str, u32>, reserved: &BTreeMap<&str, u32>) -> u32 {
    budget
        .per_namespace
        .get(ns)
        .map_or(u32::MAX, |cap| cap.saturating_sub(used.get(ns).copied().unwrap_or(0) + reserved.get(ns).copied().unwrap_or(0)))
}

/// Plan every job's workers at time `now`.
pub fn plan(now: f64, jobs: &[FleetJob], budget: &Budget, cfg: &FleetConfig) -> Vec<Grant> {
    let rate = |j: &FleetJob| planning_rate(&j.rate, cfg.pessimism_k);
    let feasible_alone = |j: &FleetJob| j.remaining_requests <= 0.0 || need(j, now, rate(j), cfg.safety_secs).is_some();
    // Order: priority tier, then jobs that can make it before those that cannot, then earliest
    // deadline, then arrival. A starving job goes first within its tier for one worker.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    let starving = |j: &FleetJob| j.current_workers == 0 && j.remaining_requests > 0.0 && now - j.arrived >= cfg.starvation_secs;
    order.sort_by(|&a, &b| {
        let (x, y) = (&jobs[a], &jobs[b]);
        y.priority
            .cmp(&x.priority)
            .then(feasible_alone(y).cmp(&feasible_alone(x)))
            .then(x.deadline.total_cmp(&y.deadline))
            .then(x.arrived.total_cmp(&y.arrived))
            .then(x.key.cmp(&y.key))
    });
    let gpw = |j: &FleetJob| j.gpus_per_worker.max(1);
    // GPUs the protected workers of each job hold whatever the plan says.
    let held_floor = |j: &FleetJob| (j.protected_workers + j.releasing_workers) * gpw(j);
    let mut reserved: u32 = jobs.iter().map(held_floor).sum();
    let mut reserved_ns: BTreeMap<&str, u32> = BTreeMap::new();
    for j in jobs {
        *reserved_ns.entry(j.namespace.as_str()).or_default() += held_floor(j);
    }
    let mut used: u32 = 0;
    let mut used_ns: BTreeMap<&str, u32> = BTreeMap::new();
    // One worker for each starving job, before anyone's need.
    let mut starve_floor: BTreeMap<usize, u32> = BTreeMap::new();
    for &i in &order {
        let j = &jobs[i];
        if starving(j) && j.protected_workers == 0 && j.releasing_workers == 0 {
            let g = gpw(j);
            let ns_free = ns_room(budget, &j.namespace, &used_ns, &reserved_ns);
            if budget.gpus.saturating_sub(used + reserved) >= g && ns_free >= g {
                used += g;
                *used_ns.entry(j.namespace.as_str()).or_default() += g;
                starve_floor.insert(i, 1);
            }
        }
    }
    // When GPUs held by jobs planned so far come free: (time, gpus).
    let mut releases: Vec<(f64, u32)> = Vec::new();
    let mut grants: Vec<Option<Grant>> = vec![None; jobs.len()];
    // Half a shard: when a worker mid-shard that the plan gives back frees its GPUs.
    let half_shard = |j: &FleetJob| j.remaining_requests / f64::from(j.remaining_shards.max(1)) / rate(j) / 2.0;
    for (pos, &i) in order.iter().enumerate() {
        let j = &jobs[i];
        let g = gpw(j);
        let r = rate(j);
        let own_reserved = held_floor(j);
        reserved -= own_reserved;
        if let Some(v) = reserved_ns.get_mut(j.namespace.as_str()) {
            *v -= own_reserved;
        }
        // The plan may go below the protected workers (they leave as their shards finish); only
        // a starving job's one worker is a floor.
        let floor = starve_floor.get(&i).copied().unwrap_or(0);
        let already = starve_floor.get(&i).copied().unwrap_or(0) * g;
        used -= already;
        if let Some(v) = used_ns.get_mut(j.namespace.as_str()) {
            *v -= already;
        }
        let free_total = budget.gpus.saturating_sub(used + reserved);
        let free_ns = ns_room(budget, &j.namespace, &used_ns, &reserved_ns);
        // The job's own releasing workers hold GPUs it cannot reuse.
        let free_workers = free_total.min(free_ns).saturating_sub(j.releasing_workers * g) / g;
        let hi = usable_max(j);
        if j.remaining_requests <= 0.0 {
            grants[i] = Some(Grant {
                key: j.key.clone(),
                workers: 0,
                projected_finish: Some(now),
                gpu_hours: 0.0,
                why: Why::Done,
                lent: Vec::new(),
                message: "done".into(),
            });
            used += held_floor(j);
            *used_ns.entry(j.namespace.as_str()).or_default() += held_floor(j);
            continue;
        }
        let want_now = need(j, now, r, cfg.safety_secs);
        let (workers, why) = match want_now {
            Some(n) if n <= free_workers.max(floor) => (n.max(floor), Why::OnTrack),
            Some(n) => {
                // Not now: does the job still make it when GPUs ahead of it come free?
                let have = free_workers.max(floor);
                // GPUs held by jobs after this one in the order come to it as their shards end.
                let mut rel = releases.clone();
                rel.extend(order[pos + 1..].iter().map(|&k| (now + half_shard(&jobs[k]), held_floor(&jobs[k]))).filter(|r| r.1 > 0));
                rel.sort_by(|a, b| a.0.total_cmp(&b.0));
                let mut pool = free_total.min(free_ns);
                let mut reachable = None;
                for (t, gpus) in rel {
                    pool += gpus;
                    if t >= j.deadline {
                        break;
                    }
                    // Work done by `have` workers until `t` shortens what remains.
                    let mut later = j.clone();
                    later.remaining_requests = (j.remaining_requests - f64::from(have) * r * (t - now - j.startup_secs).max(0.0)).max(0.0);
                    later.current_workers = have;
                    if let Some(m) = need(&later, t, r, cfg.safety_secs)
                        && m * g <= pool
                    {
                        reachable = Some((t, finish_at(&later, m, t, r)));
                        break;
                    }
                }
                match reachable {
                    Some((_, fin)) => (have.min(hi).max(floor), Why::Waiting { gpus_short: (n - have.min(n)) * g, reachable_at: fin }),
                    None => (have.min(hi).max(floor), Why::Infeasible { earliest_finish: None, gpus_needed: Some(n * g) }),
                }
            }
            None => {
                let w = free_workers.min(hi).max(floor);
                let earliest = finish_at(j, hi, now, r);
                (w, Why::Infeasible { earliest_finish: Some(earliest), gpus_needed: None })
            }
        };
        let finish = match &why {
            Why::Waiting { reachable_at, .. } => Some(*reachable_at),
            _ if workers > 0 => Some(finish_at(j, workers, now, r)),
            _ => None,
        };
        if let Some(f) = finish
            && workers > 0
        {
            releases.push((f, workers * g));
        }
        // Protected workers above the plan, and releasing ones, free their GPUs as their shards
        // end: about half a shard from now.
        let surplus = j.protected_workers.saturating_sub(workers) + j.releasing_workers;
        if surplus > 0 {
            releases.push((now + half_shard(j), surplus * g));
        }
        let held = (workers.max(j.protected_workers) + j.releasing_workers) * g;
        used += held;
        *used_ns.entry(j.namespace.as_str()).or_default() += held;
        let message = match &why {
            Why::OnTrack => format!(
                "{workers} workers; projected {} against deadline {} (slack {})",
                finish.map(hhmm).unwrap_or_default(),
                hhmm(j.deadline),
                fmt_hours(j.deadline - finish.unwrap_or(now))
            ),
            Why::Waiting { gpus_short, reachable_at } => format!(
                "waiting for {gpus_short} GPUs held by other jobs (given back as their shards finish, or held by jobs with earlier deadlines); deadline {} still reachable (projected {})",
                hhmm(j.deadline),
                hhmm(*reachable_at)
            ),
            Why::Infeasible { earliest_finish: Some(t), .. } => format!(
                "infeasible: even {hi} workers finish at {}, after the deadline {}; a deadline of {} or later would make it",
                hhmm(*t),
                hhmm(j.deadline),
                hhmm(*t + cfg.safety_secs)
            ),
            Why::Infeasible { gpus_needed, .. } => format!(
                "infeasible within the budget: needs {} GPUs that jobs ahead of it hold past its deadline {}; more budget or a later deadline would make it",
                gpus_needed.unwrap_or(0),
                hhmm(j.deadline)
            ),
            Why::Done => "done".into(),
        };
        grants[i] = Some(Grant {
            key: j.key.clone(),
            workers,
            projected_finish: finish,
            gpu_hours: finish.map_or(0.0, |f| gpu_hours(j, workers, now, f)),
            why,
            lent: Vec::new(),
            message,
        });
    }
    let mut grants: Vec<Grant> = grants.into_iter().flatten().collect();
    // Who gave up workers to whom. A job granted fewer than it runs lends the difference to the
    // jobs ahead of it in the order that hold workers (the ones that grew first); having lent, it
    // goes on lending what it would take with the budget to itself while they hold it.
    let granted = |i: usize| grants.iter().find(|x| x.key == jobs[i].key).map_or(0, |g| g.workers);
    let ahead_of = |pos: usize| -> Vec<(String, u32)> {
        let mut ahead: Vec<(bool, String, u32)> = order[..pos]
            .iter()
            .filter(|&&k| granted(k) > 0)
            .map(|&k| (granted(k) <= jobs[k].current_workers, jobs[k].key.clone(), granted(k)))
            .collect();
        ahead.sort_by_key(|a| a.0);
        ahead.into_iter().map(|(_, k, n)| (k, n)).collect()
    };
    let lenders: Vec<(usize, Vec<(String, u32)>)> = order
        .iter()
        .enumerate()
        .filter(|(_, i)| jobs[**i].remaining_requests > 0.0)
        .map(|(pos, &i)| (i, ahead_of(pos)))
        .filter(|(_, ahead)| !ahead.is_empty())
        .collect();
    for (i, ahead) in lenders {
        let j = &jobs[i];
        let Some(g) = grants.iter_mut().find(|x| x.key == j.key) else { continue };
        let alone = need(j, now, rate(j), cfg.safety_secs).unwrap_or_else(|| usable_max(j));
        let still = if j.lending { alone.saturating_sub(g.workers) } else { 0 };
        let mut left = j.current_workers.saturating_sub(g.workers).max(still);
        if left == 0 {
            continue;
        }
        for (to, n) in &ahead {
            if left == 0 {
                break;
            }
            let k = left.min(*n);
            g.lent.push((to.clone(), k));
            left -= k;
        }
        let slack = g.projected_finish.map(|f| j.deadline - f);
        let to: Vec<String> = g.lent.iter().map(|(k, n)| format!("{n} workers to {k}")).collect();
        g.message = format!("lent {} (slack {}); {}", to.join(", "), slack.map(fmt_hours).unwrap_or_else(|| "unknown".into()), g.message);
    }
    grants.sort_by(|a, b| a.key.cmp(&b.key));
    grants
}

/// A job's projection before it starts, against the fleet as it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Quote {
    pub grant: Grant,
    /// Whether its deadline is reachable inside the budget.
    pub feasible: bool,
}

/// Run `j` forward as the scheduler will run it, re-planning its workers every step (the fewest
/// that still make the deadline, at most `cap`): a job ahead of plan sheds workers and finishes
/// nearer its deadline than the first plan's projection says. Its finish and GPU-hours.
pub fn run_forward(j: &FleetJob, now: f64, cap: u32, rate: f64, safety: f64) -> (f64, f64) {
    let cap = cap.max(1);
    let window = (j.deadline - now).max(600.0);
    let dt = (window / 400.0).clamp(5.0, 600.0);
    let mut ready_at: Vec<f64> = vec![now; j.current_workers.min(cap) as usize];
    let (mut t, mut left, mut gpu_secs) = (now, j.remaining_requests, 0.0);
    let gpw = f64::from(j.gpus_per_worker.max(1));
    while left > 0.0 && t < now + 20.0 * window {
        let mut view = j.clone();
        view.remaining_requests = left;
        view.current_workers = ready_at.len() as u32;
        let w = need(&view, t, rate, safety).unwrap_or(cap).clamp(1, cap) as usize;
        if w > ready_at.len() {
            ready_at.resize(w, t + j.startup_secs);
        } else {
            // The latest to start go first.
            ready_at.sort_by(f64::total_cmp);
            ready_at.truncate(w);
        }
        let work: f64 = ready_at.iter().map(|&r| rate * (t + dt - r.max(t)).max(0.0)).sum();
        gpu_secs += ready_at.len() as f64 * dt * gpw;
        if work >= left {
            let frac = left / work;
            gpu_secs -= ready_at.len() as f64 * dt * gpw * (1.0 - frac);
            return (t + dt * frac, gpu_secs / 3600.0);
        }
        left -= work;
        t += dt;
    }
    (t, gpu_secs / 3600.0)
}

/// Quote `job` (not yet running) at `now` beside `fleet`: the plan's grant, with a reachable
/// job's finish and GPU-hours from [`run_forward`] at the rate's mean (what it will most likely
/// do, not the plan's pessimistic bound).
pub fn quote(now: f64, fleet: &[FleetJob], job: &FleetJob, budget: &Budget, cfg: &FleetConfig) -> Quote {
    let mut all = fleet.to_vec();
    all.push(job.clone());
    let mut grant = plan(now, &all, budget, cfg).into_iter().find(|g| g.key == job.key).unwrap_or(Grant {
        key: job.key.clone(),
        workers: 0,
        projected_finish: None,
        gpu_hours: 0.0,
        why: Why::Infeasible { earliest_finish: None, gpus_needed: None },
        lent: Vec::new(),
        message: "not planned".into(),
    });
    if grant.why == Why::OnTrack && grant.workers > 0 {
        let (finish, hours) = run_forward(
            job,
            now,
            grant.workers.max(need(job, now, job.rate.mean, cfg.safety_secs).unwrap_or(0)),
            job.rate.mean.max(1e-9),
            cfg.safety_secs,
        );
        grant.projected_finish = Some(finish);
        grant.gpu_hours = hours;
    }
    Quote { feasible: grant.feasible(), grant }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(key: &str, deadline: f64, remaining: f64, current: u32, protected: u32) -> FleetJob {
        FleetJob {
            key: key.into(),
            namespace: key.split('/').next().unwrap_or("ns").into(),
            priority: 0,
            arrived: 0.0,
            deadline,
            remaining_requests: remaining,
            rate: RateEstimate { mean: 1.0, stddev: 0.0, samples: 10 },
            startup_secs: 60.0,
            gpus_per_worker: 1,
            min_workers: 0,
            max_workers: 8,
            current_workers: current,
            protected_workers: protected,
            releasing_workers: 0,
            remaining_shards: 100,
            lending: false,
        }
    }

    fn cfg() -> FleetConfig {
        FleetConfig { pessimism_k: 0.0, safety_secs: 0.0, starvation_secs: 3600.0 }
    }

    fn by<'a>(g: &'a [Grant], key: &str) -> &'a Grant {
        g.iter().find(|x| x.key == key).unwrap()
    }

    #[test]
    fn the_fewest_workers_that_make_the_deadline() {
        // 3600 requests at 1 rps per worker, 1860 s left: 2 workers (60 s start-up + 1800 s).
        let g = plan(0.0, &[job("a/x", 1860.0, 3600.0, 0, 0)], &Budget { gpus: 10, ..Budget::default() }, &cfg());
        assert_eq!((g[0].workers, &g[0].why), (2, &Why::OnTrack));
    }

    #[test]
    fn the_budget_is_never_exceeded_and_the_tight_job_goes_first() {
        let tight = job("a/tight", 1000.0, 3000.0, 0, 0); // needs 4 (60 + 3000/4 = 810)
        let slack = job("b/slack", 20_000.0, 3000.0, 4, 1); // runs 4, one mid-shard
        let budget = Budget { gpus: 5, ..Budget::default() };
        let g = plan(0.0, &[tight.clone(), slack.clone()], &budget, &cfg());
        let total: u32 = g.iter().map(|x| x.workers).sum();
        assert!(total <= 5, "{g:?}");
        assert_eq!(by(&g, "a/tight").workers, 4);
        let s = by(&g, "b/slack");
        assert_eq!(s.workers, 1, "the slack job keeps its protected worker only");
        assert_eq!(s.lent, [("a/tight".to_string(), 3)]);
        assert!(s.message.starts_with("lent 3 workers to a/tight"), "{}", s.message);
    }

    #[test]
    fn a_job_that_lent_goes_on_saying_so_while_it_runs_fewer_than_it_would_alone() {
        // The slack job is down to 1 (tight holds 4); alone it would take 2.
        let tight = job("a/tight", 1000.0, 3000.0, 4, 4);
        let mut slack = job("b/slack", 2000.0, 3000.0, 1, 1);
        let budget = Budget { gpus: 5, ..Budget::default() };
        let g = plan(0.0, &[tight.clone(), slack.clone()], &budget, &cfg());
        assert!(by(&g, "b/slack").lent.is_empty(), "it never ran more than it has: {g:?}");
        slack.lending = true;
        let g = plan(0.0, &[tight, slack], &budget, &cfg());
        let s = by(&g, "b/slack");
        assert_eq!(s.lent, [("a/tight".to_string(), 1)], "{g:?}");
    }

    #[test]
    fn a_job_that_can_wait_says_so_and_an_impossible_one_says_what_would_do() {
        let first = job("a/first", 2000.0, 4000.0, 4, 4); // holds the whole budget until ~1000 s
        let later = job("b/later", 5000.0, 2000.0, 0, 0);
        let g = plan(0.0, &[first, later], &Budget { gpus: 4, ..Budget::default() }, &cfg());
        let l = by(&g, "b/later");
        assert_eq!(l.workers, 0);
        assert!(matches!(l.why, Why::Waiting { .. }), "{l:?}");
        assert!(l.message.starts_with("waiting for"), "{}", l.message);
        // 10,000 requests in 600 s at 8 workers: impossible; the message names a later time.
        let g = plan(0.0, &[job("c/x", 600.0, 10_000.0, 0, 0)], &Budget { gpus: 100, ..Budget::default() }, &cfg());
        assert!(matches!(g[0].why, Why::Infeasible { earliest_finish: Some(_), .. }));
        assert_eq!(g[0].workers, 8, "an infeasible job still runs as fast as it can with what is free");
        assert!(g[0].message.contains("would make it"));
    }

    #[test]
    fn namespace_caps_hold_and_starving_jobs_get_a_worker() {
        let mut budget = Budget { gpus: 10, ..Budget::default() };
        budget.per_namespace.insert("a".into(), 2);
        let g = plan(0.0, &[job("a/x", 1000.0, 5000.0, 0, 0)], &budget, &cfg());
        assert_eq!(g[0].workers, 2);
        // A low-priority job waiting past the starvation limit gets one worker.
        let mut hog = job("h/hog", 1e9, 4e9, 4, 0);
        hog.priority = 10;
        hog.max_workers = 4;
        let mut low = job("l/low", 1e9, 100.0, 0, 0);
        low.arrived = -4000.0;
        let g = plan(0.0, &[hog, low], &Budget { gpus: 4, ..Budget::default() }, &cfg());
        assert_eq!(by(&g, "l/low").workers, 1, "{g:?}");
        assert_eq!(by(&g, "h/hog").workers, 3);
    }

    #[test]
    fn a_quote_projects_the_finish_and_gpu_hours() {
        let q = quote(0.0, &[], &job("a/new", 10_000.0, 3600.0, 0, 0), &Budget { gpus: 8, ..Budget::default() }, &cfg());
        assert!(q.feasible);
        let f = q.grant.projected_finish.unwrap();
        assert!((f - (60.0 + 3600.0)).abs() < 1.0, "{f}");
        assert!((q.grant.gpu_hours - f / 3600.0).abs() < 0.01);
    }
}
