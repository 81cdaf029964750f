//! `sluice-sim`: a discrete-event simulator that drives the real SLA core ([`sluice_control::sla`])
//! through declarative scenarios and compares it with static, reactive and oracle baselines.
//! It owns the scenario catalogue, the simulated cluster, the baselines and the report; it
//! never re-implements the scaler.

pub mod fleet;
pub mod policy;
pub mod scenario;
pub mod world;

use std::collections::BTreeMap;

use serde_json::json;
use sluice_api::job::SlaPolicy;

use policy::{Reactive, Sluice, Static, spec_for};
use scenario::Scenario;
use sluice_control::sla::{SlaConfig, fmt_secs};
use world::RunResult;

/// Simulator errors.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A scenario's spec could not be built (a bug in the scenario).
    #[error("scenario {scenario}: cannot build its BatchInferenceJob spec: {source}")]
    Spec {
        scenario: String,
        #[source]
        source: serde_json::Error,
    },
    /// `--knob` was not `name=value` with a known name and a finite value.
    #[error("bad --knob {0:?}: expected NAME=VALUE with NAME one of {KNOBS:?}")]
    Knob(String),
    /// `--scenario` named no known scenario.
    #[error("unknown scenario {0:?} (see --list)")]
    UnknownScenario(String),
}

/// The policies of one scenario's table rows, in order.
pub const POLICIES: [&str; 5] = ["sluice", "static-min", "static-max", "reactive", "oracle"];

/// One scenario × policy result.
#[derive(Clone, Debug)]
pub struct Row {
    /// Policy name (one of [`POLICIES`]).
    pub policy: &'static str,
    /// The run.
    pub run: RunResult,
    /// GPU-hours over the oracle's, for oracle-feasible scenarios.
    pub vs_oracle: Option<f64>,
}

/// All rows of one scenario.
#[derive(Clone, Debug)]
pub struct ScenarioReport {
    /// The scenario.
    pub scenario: Scenario,
    /// Whether any fixed worker count up to `workers.max` makes the deadline with the true
    /// throughput known in advance (the oracle).
    pub feasible: bool,
    /// The oracle's worker count (cheapest that makes it; `workers.max` when none does).
    pub oracle_workers: u32,
    /// Rows in [`POLICIES`] order.
    pub rows: Vec<Row>,
}

impl ScenarioReport {
    /// Sluice's row.
    pub fn sluice(&self) -> Option<&Row> {
        self.rows.iter().find(|r| r.policy == "sluice")
    }
}

/// Seconds before the deadline an infeasible job must be flagged by: 1 h, or 10 % of the window
/// for windows under 10 h.
pub fn required_flag_lead(window_secs: f64) -> f64 {
    if window_secs < 10.0 * 3600.0 { 0.1 * window_secs } else { 3600.0 }
}

/// Whether a run flagged the job early enough: at admission (the first sync) or the required
/// lead before the deadline, staying flagged until the deadline.
pub fn flagged_early(run: &RunResult) -> bool {
    run.flagged_at.is_some_and(|f| f <= 0.0 || run.deadline - f >= required_flag_lead(run.deadline))
}

/// Changes to the scaler's knobs and the worlds' seeds, for tuning experiments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tuning {
    /// Added to every scenario's seed (a different world with the same shape).
    pub seed_offset: u64,
    /// `(knob, value)` pairs applied over [`SlaConfig::from_spec`].
    pub knobs: Vec<(String, f64)>,
}

impl Tuning {
    /// Parse `name=value` for one of the scaler's knobs.
    pub fn parse_knob(s: &str) -> Result<(String, f64), SimError> {
        let bad = || SimError::Knob(s.to_string());
        let (k, v) = s.split_once('=').ok_or_else(bad)?;
        let v: f64 = v.trim().parse().map_err(|_| bad())?;
        if !KNOBS.contains(&k.trim()) || !v.is_finite() {
            return Err(bad());
        }
        Ok((k.trim().to_string(), v))
    }

    fn scenario(&self, sc: &Scenario) -> Scenario {
        Scenario { seed: sc.seed.wrapping_add(self.seed_offset), ..sc.clone() }
    }

    fn config(&self, sc: &Scenario) -> Result<SlaConfig, SimError> {
        let spec = spec_for(sc).map_err(|source| SimError::Spec { scenario: sc.name.to_string(), source })?;
        let mut c = SlaConfig::from_spec(&spec);
        for (k, v) in &self.knobs {
            match k.as_str() {
                "pessimism_k" => c.pessimism_k = *v,
                "prior_cv" => c.prior_cv = *v,
                "scale_up_headroom" => c.scale_up_headroom = *v,
                "scale_down_headroom" => c.scale_down_headroom = *v,
                "scale_down_cooldown_secs" => c.scale_down_cooldown_secs = *v,
                "status_deadband" => c.status_deadband = *v,
                "prior_startup_secs" => c.prior_startup_secs = *v,
                "prior_scale" => c.prior_per_worker_rps *= *v,
                "margin" => c.margin = *v,
                _ => return Err(SimError::Knob(k.clone())),
            }
        }
        Ok(c)
    }
}

/// Knobs `--knob` accepts (`prior_scale` multiplies the prior throughput).
pub const KNOBS: &[&str] = &[
    "pessimism_k",
    "prior_cv",
    "scale_up_headroom",
    "scale_down_headroom",
    "scale_down_cooldown_secs",
    "status_deadband",
    "prior_startup_secs",
    "prior_scale",
    "margin",
];

/// Run one scenario under every policy with the default knobs.
pub fn run_scenario(sc: &Scenario) -> Result<ScenarioReport, SimError> {
    run_scenario_tuned(sc, &Tuning::default())
}

/// Run one scenario under every policy with changed knobs or seeds.
pub fn run_scenario_tuned(sc: &Scenario, tuning: &Tuning) -> Result<ScenarioReport, SimError> {
    let sc = &tuning.scenario(sc);
    let cfg = tuning.config(sc)?;
    let max = cfg.max_workers.min(sc.shards.max(1));
    let mut cache: BTreeMap<u32, RunResult> = BTreeMap::new();
    let mut fixed = |w: u32| -> RunResult { cache.entry(w).or_insert_with(|| world::run(sc, &mut Static(w))).clone() };

    // Oracle: the cheapest fixed count that makes the deadline with the true world known.
    let at_max = fixed(max);
    let (feasible, oracle_workers, oracle) = if at_max.met() {
        let (mut lo, mut hi) = (1u32, max);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if fixed(mid).met() { hi = mid } else { lo = mid + 1 }
        }
        // Fewer workers is usually cheaper but not always (drift, start-ups): try every count.
        let mut best = (lo, fixed(lo));
        for w in lo + 1..=max {
            let r = fixed(w);
            if r.met() && r.gpu_hours < best.1.gpu_hours {
                best = (w, r);
            }
        }
        (true, best.0, best.1)
    } else {
        (false, max, at_max.clone())
    };
    let min_fixed = fixed(cfg.min_workers.max(1));
    let max_fixed = fixed(cfg.max_workers);
    let sluice = world::run(sc, &mut Sluice::new(cfg.clone()));
    let reactive = world::run(sc, &mut Reactive::new(cfg.min_workers, cfg.max_workers));
    let oracle_gpu_hours = oracle.gpu_hours;
    let ratio = |r: &RunResult| (feasible && oracle_gpu_hours > 0.0).then(|| r.gpu_hours / oracle_gpu_hours);
    let rows = [("sluice", sluice), ("static-min", min_fixed), ("static-max", max_fixed), ("reactive", reactive), ("oracle", oracle)]
        .into_iter()
        .map(|(policy, run)| Row { policy, vs_oracle: ratio(&run), run })
        .collect();
    Ok(ScenarioReport { scenario: sc.clone(), feasible, oracle_workers, rows })
}

/// Sluice's decisions on one scenario, one line per change of count or status, and the result.
pub fn trace(sc: &Scenario, tuning: &Tuning) -> Result<Vec<String>, SimError> {
    let sc = &tuning.scenario(sc);
    let mut ctl = Sluice::traced(tuning.config(sc)?);
    let run = world::run(sc, &mut ctl);
    let mut lines = ctl.trace.take().unwrap_or_default();
    lines.push(format!("{run:?}"));
    Ok(lines)
}

/// Sluice's numbers over a set of scenarios, and whether the targets hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Oracle-feasible scenarios whose deadline Sluice met.
    pub feasible_met: u32,
    /// Oracle-feasible scenarios.
    pub feasible_total: u32,
    /// Mean of Sluice's GPU-hours over the oracle's, over feasible `Deadline`-policy scenarios.
    pub mean_gpu_hours_vs_oracle: f64,
    /// Worst of the same.
    pub worst_gpu_hours_vs_oracle: f64,
    /// Oracle-infeasible scenarios that Sluice flagged early enough.
    pub infeasible_flagged_early: u32,
    /// Oracle-infeasible scenarios.
    pub infeasible_total: u32,
    /// Most scaling decisions Sluice made within any 5 min of steady state, over all scenarios.
    pub max_changes_per_5min_steady: u32,
}

impl Summary {
    /// Summarise Sluice's rows. The GPU-hour ratios leave out `Fastest`-policy scenarios: that
    /// policy buys speed with GPUs on purpose.
    pub fn of(reports: &[ScenarioReport]) -> Self {
        let mut s = Summary {
            feasible_met: 0,
            feasible_total: 0,
            mean_gpu_hours_vs_oracle: 0.0,
            worst_gpu_hours_vs_oracle: 0.0,
            infeasible_flagged_early: 0,
            infeasible_total: 0,
            max_changes_per_5min_steady: 0,
        };
        let mut ratios = Vec::new();
        for r in reports {
            let Some(row) = r.sluice() else { continue };
            s.max_changes_per_5min_steady = s.max_changes_per_5min_steady.max(row.run.max_changes_per_5min_steady);
            if r.feasible {
                s.feasible_total += 1;
                s.feasible_met += u32::from(row.run.met());
                if r.scenario.policy == SlaPolicy::Deadline
                    && let Some(x) = row.vs_oracle
                {
                    ratios.push(x);
                }
            } else {
                s.infeasible_total += 1;
                s.infeasible_flagged_early += u32::from(flagged_early(&row.run));
            }
        }
        if !ratios.is_empty() {
            s.mean_gpu_hours_vs_oracle = ratios.iter().sum::<f64>() / ratios.len() as f64;
            s.worst_gpu_hours_vs_oracle = ratios.iter().copied().fold(0.0, f64::max);
        }
        s
    }

    /// The targets, as a list of failures (empty when they all hold).
    pub fn target_failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.feasible_met < self.feasible_total {
            f.push(format!("met {} of {} oracle-feasible deadlines (target: all)", self.feasible_met, self.feasible_total));
        }
        if self.mean_gpu_hours_vs_oracle > 1.10 {
            f.push(format!("mean GPU-hours {:.3}x the oracle (target ≤ 1.10x)", self.mean_gpu_hours_vs_oracle));
        }
        if self.worst_gpu_hours_vs_oracle > 1.25 {
            f.push(format!("worst GPU-hours {:.3}x the oracle (target ≤ 1.25x)", self.worst_gpu_hours_vs_oracle));
        }
        if self.infeasible_flagged_early < self.infeasible_total {
            f.push(format!(
                "flagged {} of {} infeasible jobs early enough (target: all)",
                self.infeasible_flagged_early, self.infeasible_total
            ));
        }
        if self.max_changes_per_5min_steady > 1 {
            f.push(format!("{} scale changes within 5 min in steady state (target ≤ 1)", self.max_changes_per_5min_steady));
        }
        f
    }

    /// The `--json` summary line.
    pub fn to_json(&self) -> serde_json::Value {
        json!({"summary": {
            "feasible_met": self.feasible_met,
            "feasible_total": self.feasible_total,
            "mean_gpu_hours_vs_oracle": round3(self.mean_gpu_hours_vs_oracle),
            "worst_gpu_hours_vs_oracle": round3(self.worst_gpu_hours_vs_oracle),
            "infeasible_flagged_early": self.infeasible_flagged_early,
            "infeasible_total": self.infeasible_total,
        }})
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// How long before the deadline a run was flagged, for the table.
fn flag_cell(run: &RunResult) -> String {
    match run.flagged_at {
        Some(f) if f <= 0.0 => "admission".into(),
        Some(f) => format!("{} before", fmt_secs(run.deadline - f)),
        None => "-".into(),
    }
}

fn finish_cell(run: &RunResult) -> String {
    match run.finished_at {
        Some(f) => fmt_secs(f - run.deadline),
        None => "never".into(),
    }
}

/// One JSON object per scenario × policy.
pub fn row_json(r: &ScenarioReport, row: &Row) -> serde_json::Value {
    let run = &row.run;
    json!({
        "scenario": r.scenario.name,
        "policy": row.policy,
        "oracle_feasible": r.feasible,
        "oracle_workers": r.oracle_workers,
        "deadline_met": run.met(),
        "deadline_secs": run.deadline,
        "finished_secs": run.finished_at.map(round3),
        "finish_minus_deadline_secs": run.finished_at.map(|f| round3(f - run.deadline)),
        "gpu_hours": round3(run.gpu_hours),
        "pod_gpu_hours": round3(run.pod_gpu_hours),
        "gpu_hours_vs_oracle": row.vs_oracle.map(round3),
        "scale_changes": run.scale_changes,
        "max_scale_changes_per_5min_steady": run.max_changes_per_5min_steady,
        "sla_status_changes": run.status_changes.len(),
        "peak_workers": run.peak_parallelism,
        "flagged_secs_before_deadline": run.flagged_at.map(|f| round3(run.deadline - f.max(0.0))),
        "flagged_at_admission": run.flagged_at.is_some_and(|f| f <= 0.0),
        "final_sla_status": run.final_status.map(|s| s.as_str()),
        "preemptions": run.preemptions,
        "failed_attempts": run.failures,
    })
}

/// The Markdown table of all rows.
pub fn table(reports: &[ScenarioReport]) -> String {
    let mut out = String::from(
        "| scenario | policy | met | finish − deadline | GPU-h | ×oracle | scale changes | max/5 min steady | flagged | SLA status |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        for row in &r.rows {
            let run = &row.run;
            let name = if row.policy == "sluice" { r.scenario.name.to_string() } else { String::new() };
            let policy = match row.policy {
                "oracle" => format!("oracle ({} w{})", r.oracle_workers, if r.feasible { "" } else { ", infeasible" }),
                p => p.to_string(),
            };
            let is_sluice = row.policy == "sluice";
            out.push_str(&format!(
                "| {name} | {policy} | {} | {} | {:.2} | {} | {} | {} | {} | {} |\n",
                if run.met() { "yes" } else { "no" },
                finish_cell(run),
                run.gpu_hours,
                row.vs_oracle.map_or("-".into(), |x| format!("{x:.3}")),
                run.scale_changes,
                if is_sluice { run.max_changes_per_5min_steady.to_string() } else { "-".into() },
                if is_sluice { flag_cell(run) } else { "-".into() },
                run.final_status.map_or("-", |s| s.as_str()),
            ));
        }
    }
    out
}

/// Scenarios by name (all when `names` is empty).
pub fn select(names: &[String]) -> Result<Vec<Scenario>, SimError> {
    if names.is_empty() {
        return Ok(scenario::all());
    }
    names.iter().map(|n| scenario::by_name(n).ok_or_else(|| SimError::UnknownScenario(n.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_scenario_is_an_error() {
        let err = select(&["nope".into()]).unwrap_err();
        assert_eq!(err.to_string(), "unknown scenario \"nope\" (see --list)");
    }

    #[test]
    fn catalogue_has_twenty_distinct_scenarios_and_reduced_set_exists() {
        let all = scenario::all();
        assert!(all.len() >= 20);
        let mut names: Vec<_> = all.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for n in scenario::REDUCED {
            assert!(scenario::by_name(n).is_some(), "{n}");
        }
        for s in &all {
            assert!(spec_for(s).is_ok(), "{}", s.name);
        }
    }

    #[test]
    fn knobs_parse_or_fail_with_the_name() {
        assert_eq!(Tuning::parse_knob("pessimism_k=2").unwrap(), ("pessimism_k".into(), 2.0));
        assert!(Tuning::parse_knob("pessimism_k").unwrap_err().to_string().contains("pessimism_k"));
        assert!(Tuning::parse_knob("nope=1").is_err());
        assert!(Tuning::parse_knob("margin=abc").is_err());
        let t = Tuning { seed_offset: 0, knobs: vec![("prior_scale".into(), 2.0), ("margin".into(), 0.2)] };
        let sc = scenario::by_name("steady").unwrap();
        let c = t.config(&sc).unwrap();
        assert!((c.prior_per_worker_rps - 2000.0 / 256.0).abs() < 1e-9);
        assert!((c.margin - 0.2).abs() < 1e-12);
    }

    #[test]
    fn flag_lead_rule() {
        assert_eq!(required_flag_lead(24.0 * 3600.0), 3600.0);
        assert!((required_flag_lead(3600.0) - 360.0).abs() < 1e-9);
    }

    #[test]
    fn static_max_finishes_steady_and_counts_gpu_time() {
        let sc = scenario::by_name("steady").unwrap();
        let r = world::run(&sc, &mut Static(8));
        assert!(r.met(), "{r:?}");
        // 40k worker-seconds of work plus 100 start-ups: 11–14 pod GPU-hours; the nodes add
        // their cold starts and a 10 min idle tail each.
        assert!(r.pod_gpu_hours > 11.0 && r.pod_gpu_hours < 14.0, "{r:?}");
        let tails = 8.0 * world::NODE_KEEP_SECS / 3600.0;
        assert!(r.gpu_hours > r.pod_gpu_hours + 0.9 * tails && r.gpu_hours < r.pod_gpu_hours + 1.1 * tails + 0.5, "{r:?}");
        assert_eq!(r.nodes_used, 8);
        assert_eq!(r.scale_changes, 1);
    }
}
