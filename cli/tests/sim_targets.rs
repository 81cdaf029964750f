//! CI check of the SLA simulator's targets (issue 7) on a reduced set of scenarios: every
//! oracle-feasible deadline met, GPU-hours within 1.10x (mean) and 1.25x (worst) of the
//! oracle, infeasible jobs flagged early, no flapping. Fast in a debug build.
#![allow(clippy::expect_used)]

use sluice_cli::sim::{self, Summary, scenario};

fn reduced() -> Vec<sim::ScenarioReport> {
    let names: Vec<String> = scenario::REDUCED.iter().map(|s| s.to_string()).collect();
    let scenarios = sim::select(&names).expect("reduced scenarios exist");
    scenarios.iter().map(|sc| sim::run_scenario(sc).expect("scenario runs")).collect()
}

#[test]
fn sluice_meets_the_targets_on_the_reduced_set() {
    let reports = reduced();
    let s = Summary::of(&reports);
    assert!(s.feasible_total >= 5 && s.infeasible_total >= 2, "reduced set covers both kinds: {s:?}");
    assert_eq!(s.target_failures(), Vec::<String>::new(), "{s:?}\n{}", sim::table(&reports));
    // The summary line has exactly the keys.
    let json = s.to_json();
    let keys: Vec<&str> = json["summary"].as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "feasible_met",
            "feasible_total",
            "infeasible_flagged_early",
            "infeasible_total",
            "mean_gpu_hours_vs_oracle",
            "worst_gpu_hours_vs_oracle"
        ]
    );
}

#[test]
fn baselines_show_what_the_scaler_is_for() {
    let reports = reduced();
    for r in reports.iter().filter(|r| r.feasible) {
        let sluice = r.sluice().expect("sluice row");
        let oracle = r.rows.iter().find(|x| x.policy == "oracle").expect("oracle row");
        assert!(oracle.run.met(), "{}: the oracle meets feasible deadlines", r.scenario.name);
        assert!(sluice.run.met(), "{}: {:?}", r.scenario.name, sluice.run);
        assert_eq!(sluice.run.final_status.map(|s| s.as_str()), Some("Met"), "{}", r.scenario.name);
    }
    // Static concurrency at workers.min misses most deadlines that Sluice meets.
    let min_missed =
        reports.iter().filter(|r| r.feasible).filter(|r| r.rows.iter().any(|x| x.policy == "static-min" && !x.run.met())).count();
    assert!(min_missed >= 3, "static-min missed only {min_missed}");
    // Infeasible jobs end Missed (or still flagged), never OnTrack.
    for r in reports.iter().filter(|r| !r.feasible) {
        let run = &r.sluice().expect("sluice row").run;
        assert!(sim::flagged_early(run), "{}: {:?}", r.scenario.name, run);
        assert_ne!(run.final_status.map(|s| s.as_str()), Some("OnTrack"), "{}", r.scenario.name);
    }
}

fn sim_bin(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sluice-sim")).args(args).output().expect("sluice-sim runs")
}

#[test]
fn cli_json_ends_with_the_summary_line() {
    let out = sim_bin(&["--scenario", "steady", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
    assert_eq!(lines.len(), sim::POLICIES.len() + 1);
    for (row, policy) in lines.iter().zip(sim::POLICIES) {
        assert_eq!(row["scenario"], "steady");
        assert_eq!(row["policy"], policy);
    }
    let summary = &lines[sim::POLICIES.len()]["summary"];
    assert_eq!(summary["feasible_met"], 1);
    assert_eq!(summary["feasible_total"], 1);
}

#[test]
fn cli_rejects_bad_arguments_with_a_reason() {
    let none = sim_bin(&[]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("choose --all or --scenario NAME"));
    let unknown = sim_bin(&["--scenario", "nope"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown scenario \"nope\""));
    let knob = sim_bin(&["--all", "--knob", "speed=11"]);
    assert!(!knob.status.success());
    assert!(String::from_utf8_lossy(&knob.stderr).contains("bad --knob \"speed=11\""));
}

#[test]
fn cli_table_and_check() {
    let out = sim_bin(&["--scenario", "impossible-deadline", "--check"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("| scenario | policy | met |"), "{text}");
    assert!(text.contains("| impossible-deadline | sluice | no |"), "{text}");
    assert!(text.contains("infeasible flagged early 1/1"), "{text}");
}

/// The fleet simulator's targets (issue 17) over every fleet scenario, driving the real
/// `sluice_control::fleet::plan`: the budget never exceeded, every deadline the fleet oracle
/// meets met, no more misses than the oracle, GPU-hours within 1.05x of the oracle's on the
/// mean, every infeasible job flagged early.
#[test]
fn the_fleet_scheduler_meets_the_fleet_targets() {
    use sluice_cli::sim::fleet;
    let reports = fleet::run_all();
    let s = fleet::FleetSummary::of(&reports);
    let table = fleet::table(&reports);
    assert!(reports.len() >= 15 && s.infeasible_total >= 2, "{s:?}");
    assert_eq!(s.budget_exceeded, 0, "{s:?}\n{table}");
    assert_eq!(s.feasible_met, s.feasible_total, "{s:?}\n{table}");
    assert!(s.missed_vs_oracle <= 0, "{s:?}\n{table}");
    assert!(s.mean_gpu_hours_vs_oracle <= 1.05, "{s:?}\n{table}");
    assert_eq!(s.infeasible_flagged_early, s.infeasible_total, "{s:?}\n{table}");
    // Every quote of a job whose model ran before is within 20 % of its actual run time.
    assert!(s.quotes_total >= 20, "{s:?}");
    assert_eq!(s.quotes_within_20pct, s.quotes_total, "{s:?}");
    let json: serde_json::Value = serde_json::from_str(&s.to_json()).expect("the summary line is JSON");
    for key in [
        "budget_exceeded",
        "feasible_met",
        "feasible_total",
        "missed_vs_oracle",
        "mean_gpu_hours_vs_oracle",
        "infeasible_flagged_early",
        "infeasible_total",
    ] {
        assert!(json["summary"].get(key).is_some(), "the summary line lacks {key}: {json}");
    }
}
