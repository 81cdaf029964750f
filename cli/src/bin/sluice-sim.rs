//! `sluice-sim`: run the SLA simulator's scenarios against Sluice's real scaler and the
//! baselines, and print a Markdown table or JSON lines. Argument parsing and printing only;
//! the simulator lives in `sluice_cli::sim`.

use std::process::ExitCode;

use clap::Parser;
use sluice_cli::sim::{self, Summary, Tuning};

/// Simulate BatchInferenceJobs under Sluice's scaler and baselines.
#[derive(Parser, Debug)]
#[command(name = "sluice-sim", version, about)]
struct Args {
    /// Run every scenario.
    #[arg(long, conflicts_with = "scenario")]
    all: bool,
    /// The fleet scenarios: many jobs against one GPU budget (with --all).
    #[arg(long)]
    fleet: bool,
    /// Run this scenario (repeatable).
    #[arg(long, value_name = "NAME")]
    scenario: Vec<String>,
    /// One JSON object per scenario × policy, then a summary line.
    #[arg(long)]
    json: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Exit with status 1 when Sluice misses a target.
    #[arg(long)]
    check: bool,
    /// Print Sluice's decisions (count or status changes) for each selected scenario.
    #[arg(long)]
    trace: bool,
    /// Add this to every scenario's seed (same shapes, different random worlds).
    #[arg(long, default_value_t = 0)]
    seed_offset: u64,
    /// Override a scaler knob for an experiment, e.g. `--knob pessimism_k=2` (repeatable).
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_knob)]
    knob: Vec<(String, f64)>,
}

/// `--fleet`: every fleet scenario under every policy, then the summary.
fn fleet(args: &Args) -> ExitCode {
    use sluice_cli::sim::fleet;
    if args.list {
        for s in fleet::scenarios() {
            println!("{:<22} {}", s.name, s.about);
        }
        return ExitCode::SUCCESS;
    }
    let reports = fleet::run_all();
    let summary = fleet::FleetSummary::of(&reports);
    if args.json {
        for r in &reports {
            for run in &r.runs {
                println!("{}", fleet::run_json(r, run));
            }
        }
    } else {
        print!("{}", fleet::table(&reports));
        println!();
    }
    println!("{}", summary.to_json());
    ExitCode::SUCCESS
}

fn parse_knob(s: &str) -> Result<(String, f64), String> {
    Tuning::parse_knob(s).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if args.fleet {
        return Ok(fleet(&args));
    }
    if args.list {
        for s in sim::scenario::all() {
            println!("{:<26} {}", s.name, s.about);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !args.all && args.scenario.is_empty() {
        anyhow::bail!("choose --all or --scenario NAME (see --list)");
    }
    let scenarios = sim::select(&args.scenario)?;
    let tuning = Tuning { seed_offset: args.seed_offset, knobs: args.knob.clone() };
    if args.trace {
        for sc in &scenarios {
            println!("# {}: {}", sc.name, sc.about);
            for line in sim::trace(sc, &tuning)? {
                println!("{line}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let reports = scenarios.iter().map(|sc| sim::run_scenario_tuned(sc, &tuning)).collect::<Result<Vec<_>, _>>()?;
    let summary = Summary::of(&reports);
    if args.json {
        for r in &reports {
            for row in &r.rows {
                println!("{}", sim::row_json(r, row));
            }
        }
        println!("{}", summary.to_json());
    } else {
        print!("{}", sim::table(&reports));
        println!();
        println!(
            "Sluice: met {}/{} oracle-feasible deadlines; GPU-hours vs oracle mean {:.3}x, worst {:.3}x; infeasible flagged early {}/{}; max scale changes per 5 min in steady state {}",
            summary.feasible_met,
            summary.feasible_total,
            summary.mean_gpu_hours_vs_oracle,
            summary.worst_gpu_hours_vs_oracle,
            summary.infeasible_flagged_early,
            summary.infeasible_total,
            summary.max_changes_per_5min_steady
        );
    }
    let failures = summary.target_failures();
    for f in &failures {
        eprintln!("target missed: {f}");
    }
    Ok(if args.check && !failures.is_empty() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
