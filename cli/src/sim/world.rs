//! The simulated cluster for one scenario: an Indexed-Job controller keeping `parallelism` pods
//! for unfinished shards, a scheduler with a GPU capacity and warm/cold nodes, workers that
//! process shards and write progress records every 15 s, preemptions and retried failures.
//! Time advances in fixed 15 s steps. It never decides the worker count: a [`Controller`] does.

use std::collections::VecDeque;

use sluice_api::job::SlaStatus;
use sluice_control::scaler::WorkerFacts;

use super::scenario::Scenario;

/// Simulation step: also the workers' progress-record interval.
pub const STEP_SECS: f64 = 15.0;
/// The operator's resync interval.
pub const SYNC_SECS: f64 = 30.0;
/// A record written at `t` is visible to a sync at `T` only if `t ≤ T − READ_LAG_SECS`
/// (object-store listing and the read itself): progress is 15–30 s old when the scaler sees it.
pub const READ_LAG_SECS: f64 = 10.0;
/// Scheduler delay from pod creation to binding when capacity is free.
pub const SCHED_DELAY_SECS: f64 = 2.0;
/// A node that ran a worker within this long keeps the image and model cached (warm start-up);
/// after it the cluster autoscaler has removed it.
pub const NODE_KEEP_SECS: f64 = 600.0;

/// One progress record as the reconciler reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// When the worker wrote it.
    pub written: f64,
    /// Shard index.
    pub shard: u32,
    /// The pod (attempt) that wrote it.
    pub pod: u64,
    /// Lines committed in the shard so far.
    pub lines_done: u64,
    /// Requests per second over the interval since this attempt's previous record, and the
    /// interval's length in seconds (what the reconciler computes from two records).
    pub interval: Option<(f64, f64)>,
    /// On the attempt's first record: seconds from the pod's binding to ready (start-up).
    pub startup_secs: Option<f64>,
    /// Lines in the shard.
    pub lines_total: u64,
    /// When the pod was created (the reconciler reads it from the pod).
    pub pod_created: f64,
    /// When the pod was bound to a node (the attempt's start).
    pub started: f64,
    /// When the attempt became ready (model loaded, first request admitted).
    pub ready_at: f64,
    /// Requests per second of this attempt since it became ready, as the worker reports it.
    pub requests_per_second: f64,
    /// The shard's final record: every line committed.
    pub complete: bool,
}

/// What a controller sees at a sync: the reconciler's inputs.
#[derive(Clone, Debug)]
pub struct View {
    /// Seconds since submission.
    pub now: f64,
    /// Seconds from submission to the deadline.
    pub deadline: f64,
    /// Progress records that became visible since the previous sync.
    pub records: Vec<Record>,
    /// Requests in the plan.
    pub total_requests: u64,
    /// Requests committed, as far as visible records and completed shards tell.
    pub done_requests: u64,
    /// Shards in the plan.
    pub total_shards: u32,
    /// Shards not completed (Job `completedIndexes` is immediate).
    pub remaining_shards: u32,
    /// Pods bound to a GPU (starting or running).
    pub active: u32,
    /// Pods past start-up, running a shard (the Job's Ready pods).
    pub running: u32,
    /// Pods Pending for lack of capacity for at least one step.
    pub unschedulable: u32,
    /// Seconds the longest-starting bound pod has been starting, if any is.
    pub oldest_starting_secs: Option<f64>,
    /// The Job's parallelism now.
    pub parallelism: u32,
    /// Every shard is complete.
    pub finished: bool,
    /// When the last shard completed, if finished.
    pub finished_at: Option<f64>,
}

impl View {
    /// The workers as the simulated cluster shows them to the scaler (what
    /// `status::cluster_workers` reads from the Job and its pods).
    pub fn workers(&self) -> WorkerFacts {
        WorkerFacts {
            active: self.active,
            running_protected: self.running,
            unschedulable: self.unschedulable,
            oldest_starting_secs: self.oldest_starting_secs,
        }
    }
}

/// A controller's answer at a sync.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The parallelism to patch.
    pub parallelism: u32,
    /// The SLA status it reports, if it has one.
    pub status: Option<SlaStatus>,
    /// The change only follows the remaining-shards cap (not a scaling decision).
    pub shard_capped: bool,
}

/// Anything that sets the Job's parallelism at each sync.
pub trait Controller {
    /// Decide at one sync.
    fn sync(&mut self, view: &View) -> Decision;
}

/// What happened in one run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    /// When the last shard completed (seconds after submission), if within the horizon.
    pub finished_at: Option<f64>,
    /// Seconds from submission to the deadline.
    pub deadline: f64,
    /// Billed GPU-hours: each GPU node from its first pod's binding (cold start included) until
    /// the autoscaler removes it, [`NODE_KEEP_SECS`] after its last pod (or its preemption).
    pub gpu_hours: f64,
    /// GPU-hours of the pods alone (binding to end), what `status.gpuSeconds` reports.
    pub pod_gpu_hours: f64,
    /// Scaling decisions (parallelism changes other than following the remaining-shards cap).
    pub scale_changes: u32,
    /// Most scaling decisions within any 5 min in steady state (after the first progress has
    /// been visible for 15 min, before the remaining shards drop below the parallelism).
    pub max_changes_per_5min_steady: u32,
    /// `(time, status)` at every sync where the status changed.
    pub status_changes: Vec<(f64, SlaStatus)>,
    /// Start of the flagged period (AtRisk/Infeasible) that lasts to the deadline, if any.
    pub flagged_at: Option<f64>,
    /// The status at the last sync.
    pub final_status: Option<SlaStatus>,
    /// Most parallelism requested.
    pub peak_parallelism: u32,
    /// Distinct GPU nodes used.
    pub nodes_used: u32,
    /// Pods preempted.
    pub preemptions: u32,
    /// Attempts that failed and were retried.
    pub failures: u32,
}

impl RunResult {
    /// Finished by the deadline.
    pub fn met(&self) -> bool {
        self.finished_at.is_some_and(|f| f <= self.deadline)
    }
}

#[derive(Clone, Debug)]
struct Shard {
    lines: u64,
    /// Lines committed by earlier attempts (a retry resumes there).
    committed: u64,
    /// Lines the reconciler has seen committed.
    visible_done: u64,
    complete: bool,
    assigned: bool,
    attempts: u32,
    failures: u32,
    /// Persistent speed factor (slow shards, per-shard noise).
    speed: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum PodState {
    Pending,
    Starting,
    Running,
}

#[derive(Clone, Debug)]
struct Pod {
    id: u64,
    shard: u32,
    attempt: u32,
    created: f64,
    state: PodState,
    slot: usize,
    bound: f64,
    ready_at: f64,
    /// Lines processed in the shard (committed + in flight), as a fraction-carrying count.
    processed: f64,
    /// Committed lines at the last record.
    last_record_lines: u64,
    /// Committed lines of the shard when this attempt started (its own work is the rest).
    lines_at_ready: u64,
    last_record_time: f64,
    /// Pod lifetime (since binding) at which it is preempted.
    preempt_after: f64,
    /// Processed-line count at which this attempt fails.
    fail_at: Option<f64>,
}

#[derive(Clone, Debug)]
struct Slot {
    busy: bool,
    warm_until: f64,
    /// When the node's current lifetime began (None: no node now).
    life_start: Option<f64>,
}

/// Deterministic uniform in [0, 1) from a seed and a few keys (SplitMix64), so the world is
/// the same whichever controller runs it.
fn unit(seed: u64, a: u64, b: u64, c: u64) -> f64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ c.wrapping_mul(0x1656_67B1_9E37_79F9);
    for _ in 0..2 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    (z >> 11) as f64 / (1u64 << 53) as f64
}

const K_SPEED: u64 = 1;
const K_SLOW: u64 = 2;
const K_STEP: u64 = 3;
const K_STARTUP: u64 = 4;
const K_PREEMPT: u64 = 5;
const K_FAIL: u64 = 6;
const K_FAIL_AT: u64 = 7;

/// Run `sc` under `ctl` until every shard completes or the horizon (3 windows + 1 h) passes.
pub fn run(sc: &Scenario, ctl: &mut dyn Controller) -> RunResult {
    let seed = sc.seed;
    let shards_n = sc.shards.max(1);
    let base_lines = sc.requests / u64::from(shards_n);
    let extra = sc.requests % u64::from(shards_n);
    let mut shards: Vec<Shard> = (0..shards_n)
        .map(|i| {
            let noise = 1.0 + sc.noise * (2.0 * unit(seed, K_SPEED, u64::from(i), 0) - 1.0);
            let slow = if unit(seed, K_SLOW, u64::from(i), 0) < sc.slow_fraction { 1.0 / sc.slow_factor.max(1.0) } else { 1.0 };
            Shard {
                lines: base_lines + u64::from(u64::from(i) < extra),
                committed: 0,
                visible_done: 0,
                complete: false,
                assigned: false,
                attempts: 0,
                failures: 0,
                speed: noise.max(0.05) * slow,
            }
        })
        .collect();
    let horizon = 3.0 * sc.window_secs + 3600.0;
    let mut pods: Vec<Pod> = Vec::new();
    let mut slots: Vec<Slot> = Vec::new();
    let mut records: VecDeque<Record> = VecDeque::new();
    let mut next_pod_id = 0u64;
    let mut parallelism = 0u32;
    let mut pending_parallelism: Option<u32> = None;
    let mut gpu_secs = 0.0;
    let mut node_secs = 0.0;
    let mut finished_at: Option<f64> = None;
    let mut last_completion = 0.0f64;
    let mut remaining = shards_n;
    let mut done_visible = 0u64;
    let mut preemptions = 0u32;
    let mut failures = 0u32;

    let mut changes: Vec<f64> = Vec::new();
    let mut steady_from: Option<f64> = None;
    let mut steady_until: Option<f64> = None;
    let mut status_changes: Vec<(f64, SlaStatus)> = Vec::new();
    let mut last_status: Option<SlaStatus> = None;
    let mut peak = 0u32;
    let mut statuses: Vec<(f64, SlaStatus)> = Vec::new();

    let drift = |t: f64| -> f64 {
        match sc.drift {
            Some(d) if t > d.from_secs => {
                let span = (d.to_secs - d.from_secs).max(1.0);
                let f = ((t - d.from_secs) / span).min(1.0);
                1.0 + (d.factor - 1.0) * f
            }
            _ => 1.0,
        }
    };

    let mut step: u64 = 0;
    loop {
        let t = step as f64 * STEP_SECS;
        // 1. Operator sync (every SYNC_SECS, and once more when the job has just finished).
        let sync_now = (t % SYNC_SECS).abs() < 1e-9 || finished_at.is_some();
        if sync_now {
            let mut new_records = Vec::new();
            while records.front().is_some_and(|r| r.written <= t - READ_LAG_SECS) {
                if let Some(r) = records.pop_front() {
                    if let Some(s) = shards.get_mut(r.shard as usize)
                        && !s.complete
                        && r.lines_done > s.visible_done
                    {
                        done_visible += r.lines_done - s.visible_done;
                        s.visible_done = r.lines_done;
                    }
                    new_records.push(r);
                }
            }
            if steady_from.is_none() && new_records.iter().any(|r| r.interval.is_some()) {
                steady_from = Some(t + 900.0);
            }
            let active = pods.iter().filter(|p| p.state != PodState::Pending).count() as u32;
            let running = pods.iter().filter(|p| p.state == PodState::Running).count() as u32;
            let unschedulable = pods.iter().filter(|p| p.state == PodState::Pending && t - p.created >= STEP_SECS).count() as u32;
            let oldest = pods
                .iter()
                .filter(|p| p.state == PodState::Starting)
                .map(|p| t - p.bound)
                .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))));
            let view = View {
                now: t,
                deadline: sc.window_secs,
                records: new_records,
                total_requests: sc.requests,
                done_requests: done_visible,
                total_shards: shards_n,
                remaining_shards: remaining,
                active,
                running,
                unschedulable,
                oldest_starting_secs: oldest,
                parallelism,
                finished: finished_at.is_some(),
                finished_at,
            };
            let d = ctl.sync(&view);
            if let Some(s) = d.status {
                statuses.push((t, s));
                if last_status != Some(s) {
                    status_changes.push((t, s));
                    last_status = Some(s);
                }
            }
            if finished_at.is_some() {
                break;
            }
            let target = pending_parallelism.unwrap_or(parallelism);
            if d.parallelism != target {
                if !d.shard_capped {
                    changes.push(t);
                }
                pending_parallelism = Some(d.parallelism);
            }
            peak = peak.max(d.parallelism);
            if steady_until.is_none() && remaining <= d.parallelism && remaining < shards_n {
                steady_until = Some(t);
            }
        } else if let Some(p) = pending_parallelism.take() {
            // 2. The Job controller sees the patched parallelism one step after the sync.
            parallelism = p;
        }
        if t > horizon {
            break;
        }

        // 3. Job controller: keep `parallelism` pods for unassigned shards; on scale-down only
        // Pending pods are removed (running shards are never cut short).
        let mut live = pods.len() as u32;
        if live > parallelism {
            let mut excess = live - parallelism;
            let mut i = pods.len();
            while excess > 0 && i > 0 {
                i -= 1;
                if pods[i].state == PodState::Pending {
                    let p = pods.remove(i);
                    if let Some(s) = shards.get_mut(p.shard as usize) {
                        s.assigned = false;
                    }
                    excess -= 1;
                }
            }
            live = pods.len() as u32;
        }
        while live < parallelism {
            let Some(idx) = shards.iter().position(|s| !s.complete && !s.assigned) else {
                break;
            };
            let s = &mut shards[idx];
            s.assigned = true;
            let attempt = s.attempts;
            s.attempts += 1;
            let key = u64::from(idx as u32);
            let fail_at = (attempt < 2 && unit(seed, K_FAIL, key, u64::from(attempt)) < sc.fail_prob).then(|| {
                s.committed as f64 + (s.lines - s.committed) as f64 * (0.1 + 0.8 * unit(seed, K_FAIL_AT, key, u64::from(attempt)))
            });
            let preempt_after = if sc.preemptions_per_hour > 0.0 {
                -(1.0 - unit(seed, K_PREEMPT, key, u64::from(attempt))).ln() * 3600.0 / sc.preemptions_per_hour
            } else {
                f64::INFINITY
            };
            pods.push(Pod {
                id: next_pod_id,
                shard: idx as u32,
                attempt,
                created: t,
                state: PodState::Pending,
                slot: usize::MAX,
                bound: 0.0,
                ready_at: 0.0,
                processed: s.committed as f64,
                last_record_lines: s.committed,
                lines_at_ready: s.committed,
                last_record_time: 0.0,
                preempt_after,
                fail_at,
            });
            next_pod_id += 1;
            live += 1;
        }

        // 4. Scheduler: warm free node first, then a cold free node, then a new node.
        let cap = sc.capacity.unwrap_or(u32::MAX) as usize;
        for p in pods.iter_mut().filter(|p| p.state == PodState::Pending) {
            let now = t + SCHED_DELAY_SECS;
            let warm = slots.iter().position(|s| !s.busy && s.warm_until >= now);
            let slot = warm.or_else(|| slots.iter().position(|s| !s.busy)).or_else(|| {
                (slots.len() < cap).then(|| {
                    slots.push(Slot { busy: false, warm_until: f64::NEG_INFINITY, life_start: None });
                    slots.len() - 1
                })
            });
            let Some(si) = slot else { break };
            let is_warm = slots[si].warm_until >= now;
            if !is_warm {
                // A new node: bill the previous lifetime of this slot, start a new one.
                if let Some(start) = slots[si].life_start {
                    node_secs += (slots[si].warm_until - start).max(0.0);
                }
                slots[si].life_start = Some(now);
            }
            slots[si].busy = true;
            let u = unit(seed, K_STARTUP, u64::from(p.shard), u64::from(p.attempt));
            let startup = if is_warm { sc.warm_startup.at(u) } else { sc.cold_startup.at(u) };
            p.state = PodState::Starting;
            p.slot = si;
            p.bound = now;
            p.ready_at = now + startup;
        }

        // 5. Workers: advance every bound pod through [t, t + STEP].
        let t1 = t + STEP_SECS;
        let mut i = 0;
        while i < pods.len() {
            let p = &mut pods[i];
            if p.state == PodState::Pending {
                i += 1;
                continue;
            }
            let shard_idx = p.shard as usize;
            let Some(sh) = shards.get(shard_idx) else {
                i += 1;
                continue;
            };
            let lines = sh.lines as f64;
            let mut end: Option<(f64, End)> = None;
            let kill_at = p.bound + p.preempt_after;
            if p.state == PodState::Starting && p.ready_at < t1 {
                if kill_at < p.ready_at {
                    end = Some((kill_at.max(t), End::Preempted));
                } else {
                    p.state = PodState::Running;
                    p.last_record_time = p.ready_at;
                    records.push_back(Record {
                        written: p.ready_at,
                        shard: p.shard,
                        pod: p.id,
                        lines_done: p.last_record_lines,
                        interval: None,
                        startup_secs: Some(p.ready_at - p.bound),
                        lines_total: sh.lines,
                        pod_created: p.created,
                        started: p.bound,
                        ready_at: p.ready_at,
                        requests_per_second: 0.0,
                        complete: false,
                    });
                }
            } else if p.state == PodState::Starting && kill_at < t1 {
                end = Some((kill_at.max(t), End::Preempted));
            }
            if end.is_none() && p.state == PodState::Running {
                let from = t.max(p.ready_at);
                let step_noise = 1.0 + 0.5 * sc.noise * (2.0 * unit(seed, K_STEP, shard_idx as u64, step) - 1.0);
                let rate = (sc.rate * drift(0.5 * (from + t1)) * sh.speed * step_noise).max(1e-9);
                let mut until = t1;
                let mut why = None;
                if kill_at < until {
                    until = kill_at.max(from);
                    why = Some(End::Preempted);
                }
                let finish_t = from + (lines - p.processed) / rate;
                if finish_t <= until {
                    until = finish_t;
                    why = Some(End::Complete);
                }
                if let Some(f) = p.fail_at {
                    let fail_t = from + (f - p.processed) / rate;
                    if fail_t <= until {
                        until = fail_t;
                        why = Some(End::Failed);
                    }
                }
                p.processed = (p.processed + rate * (until - from)).min(lines);
                if let Some(w) = why {
                    end = Some((until, w));
                } else {
                    // Progress record at the step's end: committed = whole requests done.
                    let committed = p.processed.floor() as u64;
                    let dt = t1 - p.last_record_time;
                    let since_ready = t1 - p.ready_at;
                    records.push_back(Record {
                        written: t1,
                        shard: p.shard,
                        pod: p.id,
                        lines_done: committed,
                        interval: (dt > 0.0).then(|| ((committed.saturating_sub(p.last_record_lines)) as f64 / dt, dt)),
                        startup_secs: None,
                        lines_total: sh.lines,
                        pod_created: p.created,
                        started: p.bound,
                        ready_at: p.ready_at,
                        requests_per_second: if since_ready > 0.0 {
                            committed.saturating_sub(p.lines_at_ready) as f64 / since_ready
                        } else {
                            0.0
                        },
                        complete: false,
                    });
                    p.last_record_lines = committed;
                    p.last_record_time = t1;
                }
            }
            let Some((at, why)) = end else {
                i += 1;
                continue;
            };
            let p = pods.remove(i);
            gpu_secs += (at - p.bound).max(0.0);
            if let Some(slot) = slots.get_mut(p.slot) {
                slot.busy = false;
                if why == End::Preempted {
                    if let Some(start) = slot.life_start.take() {
                        node_secs += (at - start).max(0.0);
                    }
                    slot.warm_until = f64::NEG_INFINITY;
                } else {
                    slot.warm_until = at + NODE_KEEP_SECS;
                }
            }
            let Some(s) = shards.get_mut(shard_idx) else {
                continue;
            };
            s.assigned = false;
            match why {
                End::Complete => {
                    // The worker's final record (visible after the read lag, like the others);
                    // the Job's completedIndexes has the shard at once.
                    let since_ready = at - p.ready_at;
                    records.push_back(Record {
                        written: at,
                        shard: p.shard,
                        pod: p.id,
                        lines_done: s.lines,
                        interval: None,
                        startup_secs: None,
                        lines_total: s.lines,
                        pod_created: p.created,
                        started: p.bound,
                        ready_at: p.ready_at,
                        requests_per_second: if since_ready > 0.0 {
                            s.lines.saturating_sub(p.lines_at_ready) as f64 / since_ready
                        } else {
                            0.0
                        },
                        complete: true,
                    });
                    s.complete = true;
                    s.committed = s.lines;
                    done_visible += s.lines.saturating_sub(s.visible_done);
                    s.visible_done = s.lines;
                    remaining -= 1;
                    last_completion = last_completion.max(at);
                }
                End::Preempted => {
                    preemptions += 1;
                    s.committed = s.committed.max(p.last_record_lines);
                }
                End::Failed => {
                    failures += 1;
                    s.failures += 1;
                    s.committed = s.committed.max(p.last_record_lines);
                }
            }
        }
        if remaining == 0 && finished_at.is_none() {
            finished_at = Some(last_completion);
        }
        step += 1;
    }
    // Pods still bound at the horizon.
    let t_end = step as f64 * STEP_SECS;
    gpu_secs += pods.iter().filter(|p| p.state != PodState::Pending).map(|p| (t_end - p.bound).max(0.0)).sum::<f64>();
    node_secs += slots
        .iter()
        .filter_map(|s| s.life_start.map(|start| (if s.busy { t_end } else { s.warm_until }) - start))
        .map(|x| x.max(0.0))
        .sum::<f64>();

    let (lo, hi) = (steady_from.unwrap_or(f64::INFINITY), steady_until.unwrap_or(f64::INFINITY));
    let steady: Vec<f64> = changes.iter().copied().filter(|c| *c >= lo && *c < hi).collect();
    let max_changes = steady.iter().map(|&c| steady.iter().filter(|&&d| d >= c && d < c + 300.0).count() as u32).max().unwrap_or(0);

    // The flagged period that lasts until the deadline (or the end, if earlier).
    let flagged = |s: SlaStatus| matches!(s, SlaStatus::AtRisk | SlaStatus::Infeasible);
    let mut flagged_at = None;
    for &(t, s) in statuses.iter().filter(|(t, _)| *t <= sc.window_secs) {
        if flagged(s) {
            flagged_at.get_or_insert(t);
        } else {
            flagged_at = None;
        }
    }
    RunResult {
        finished_at,
        deadline: sc.window_secs,
        gpu_hours: node_secs / 3600.0,
        pod_gpu_hours: gpu_secs / 3600.0,
        scale_changes: changes.len() as u32,
        max_changes_per_5min_steady: max_changes,
        final_status: statuses.last().map(|(_, s)| *s),
        status_changes,
        flagged_at,
        peak_parallelism: peak,
        nodes_used: slots.len() as u32,
        preemptions,
        failures,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum End {
    Complete,
    Preempted,
    Failed,
}
