//! The short steps a job's own pods run besides its shards: `sluice-worker plan` (plan the input
//! once, report the plan's size) and `sluice-worker finalize` (write `manifest.json` from the
//! shards' records, report its counts), which run the code the operator runs when it can reach
//! the storage itself; and `sluice-worker close` (a cancelled or expired job: every request that
//! never ran committed as an error through the shards' own commit protocol, then finalize).

use jiff::Timestamp;
use sluice_api::contract::{exit, layout};
use sluice_api::jobio::{self, JobIoError};
use sluice_api::plan::{ShardPlan, parse_index_ranges};
use sluice_api::report::{PlanFailure, PodReport};
use sluice_api::storage::{Location, resolve};

use sluice_api::job::NotRun;
use tokio::sync::{oneshot, watch};

use crate::cli::Args;
use crate::engine::{EngineStats, GenerationOutput, GenerationRequest, RequestError};
use crate::metrics::WorkerMetrics;
use crate::report::ReportClient;
use crate::runtime::{Generator, PreparedShard, RunOutcome};

/// Attempts for a step's one report (a standby operator replica answers 503).
const FINAL_REPORT_ATTEMPTS: usize = 8;

fn open(field: &str, uri: &str, args: &Args) -> Result<Location, String> {
    resolve(uri, &args.storage()).map_err(|e| format!("{field}: {e}"))
}

/// Send a step's report, or print it as a JSON line when no operator listens (run by hand).
async fn deliver(report: Option<&ReportClient>, r: &PodReport) -> Result<(), String> {
    match report {
        Some(c) => c.send(r, FINAL_REPORT_ATTEMPTS).await,
        None => {
            println!("{}", serde_json::to_string(r).map_err(|e| e.to_string())?);
            Ok(())
        }
    }
}

/// Plan the input (or reuse the stored plan) and report its size. Exit 0 once reported; 3 when
/// retrying cannot help (reported as `planFailed`, the operator decides); 1 otherwise.
pub async fn plan(args: &Args, report: Option<&ReportClient>) -> i32 {
    let Some(input_uri) = args.input.as_deref().filter(|u| !u.is_empty()) else {
        tracing::error!("plan needs the input URI (--input or SLUICE_INPUT_URI)");
        return exit::USAGE;
    };
    let (input, output) = match (open("spec.input.uri", input_uri, args), open("spec.output.uri", &args.output, args)) {
        (Ok(i), Ok(o)) => (i, o),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("{e}");
            let r = PodReport::PlanFailed { failure: PlanFailure::Permanent, message: e };
            let _ = deliver(report, &r).await;
            return exit::PERMANENT;
        }
    };
    let outcome = sluice_api::planner::load_or_create(args.requests_per_shard, args.max_workers, &input, &output).await;
    let (r, code) = match outcome {
        Ok(o) => {
            tracing::info!(lines = o.plan.line_count, shards = o.plan.shards.len(), created = o.created, "plan ready");
            (PodReport::Plan { summary: o.plan.summary(), created: o.created }, exit::SUCCESS)
        }
        Err(e @ JobIoError::InputNotFound { .. }) => {
            tracing::error!("{e}");
            (PodReport::PlanFailed { failure: PlanFailure::InputNotFound, message: e.to_string() }, exit::PERMANENT)
        }
        Err(e) if e.is_permanent() => {
            tracing::error!("{e}");
            (PodReport::PlanFailed { failure: PlanFailure::Permanent, message: e.to_string() }, exit::PERMANENT)
        }
        Err(e) => {
            tracing::warn!("planning failed, the pod is retried: {e}");
            return exit::RETRYABLE;
        }
    };
    match deliver(report, &r).await {
        Ok(()) => code,
        Err(e) => {
            tracing::error!("cannot report the plan to the operator: {e}");
            exit::RETRYABLE
        }
    }
}

/// Build and write `manifest.json` once (an existing one is kept) and report its counts.
pub async fn finalize(args: &Args, report: Option<&ReportClient>) -> i32 {
    match write_manifest(args).await {
        Ok(r) => match deliver(report, &r).await {
            Ok(()) => exit::SUCCESS,
            Err(e) => {
                tracing::error!("cannot report the manifest to the operator: {e}");
                exit::RETRYABLE
            }
        },
        Err((permanent, e)) => {
            tracing::error!(permanent, "finalize failed: {e}");
            if permanent { exit::PERMANENT } else { exit::RETRYABLE }
        }
    }
}

async fn write_manifest(args: &Args) -> Result<PodReport, (bool, String)> {
    let output = open("spec.output.uri", &args.output, args).map_err(|e| (true, e))?;
    let plan_loc = match args.plan.as_deref().filter(|p| !p.is_empty()) {
        Some(uri) => open("plan", uri, args).map_err(|e| (true, e))?,
        None => output.child(layout::PLAN),
    };
    let io = |e: JobIoError| (e.is_permanent(), e.to_string());
    let plan: ShardPlan =
        jobio::read_json(&plan_loc, "shard plan").await.map_err(io)?.ok_or_else(|| (true, format!("{}: no plan there", plan_loc.uri)))?;
    let failed = parse_index_ranges(args.failed_shards.as_deref().unwrap_or(""));
    let records = jobio::read_progress_records(&output, &plan, &Default::default()).await.map_err(io)?;
    let job = args.job_name.clone().unwrap_or_else(|| args.output.clone());
    let input = args.spec_input_uri.clone().unwrap_or_else(|| plan.input_uri.clone());
    let manifest = jobio::build_manifest(&job, &input, &output, &plan, &records, &failed, Timestamp::now()).await.map_err(io)?;
    let manifest = jobio::write_manifest_once(&output, manifest).await.map_err(io)?;
    tracing::info!(succeeded = manifest.requests.succeeded, failed = manifest.requests.failed, "manifest written");
    Ok(PodReport::Manifest { uri: output.child(layout::MANIFEST).uri, requests: manifest.requests, usage: manifest.usage })
}

/// The "engine" of a closed job: every request it is given is withdrawn with the close's code,
/// so the shard's ordinary run commits each one as an error line, exactly once.
struct Withdraw(NotRun);

impl Generator for Withdraw {
    fn submit(&self, _req: GenerationRequest) -> oneshot::Receiver<Result<GenerationOutput, RequestError>> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Err(RequestError::Withdrawn(self.0)));
        rx
    }
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }
    fn model_name(&self) -> String {
        String::new()
    }
}

/// Close a job's shards: each one chosen (`--close-shards`, else every shard not among the
/// failed ones) and not yet finalized gets its uncommitted requests committed as errors with
/// the close's code (`batch_cancelled`/`batch_expired` for a cancelled or expired job,
/// `shard_failed` for the failed shards of a job that succeeded without them), then the
/// manifest is written and reported. Run only once the job's workers have stopped: a chunk a
/// worker still writes would race this one (the commit protocol keeps the first).
pub async fn close(args: &Args, report: Option<&ReportClient>, stop: watch::Receiver<bool>) -> i32 {
    let Some(reason) = args.close_code else {
        tracing::error!("close needs the reason (--close-code or {})", sluice_api::contract::env::CLOSE_CODE);
        return exit::USAGE;
    };
    let output = match open("spec.output.uri", &args.output, args) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("{e}");
            return exit::PERMANENT;
        }
    };
    let plan_loc = match args.plan.as_deref().filter(|p| !p.is_empty()) {
        Some(uri) => match open("plan", uri, args) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return exit::PERMANENT;
            }
        },
        None => output.child(layout::PLAN),
    };
    let plan: ShardPlan = match jobio::read_json(&plan_loc, "shard plan").await {
        Ok(Some(p)) => p,
        Ok(None) => {
            tracing::error!("{}: no plan there", plan_loc.uri);
            return exit::PERMANENT;
        }
        Err(e) => {
            tracing::error!(permanent = e.is_permanent(), "{e}");
            return if e.is_permanent() { exit::PERMANENT } else { exit::RETRYABLE };
        }
    };
    let failed = parse_index_ranges(args.failed_shards.as_deref().unwrap_or(""));
    let only = args.close_shards.as_deref().map(parse_index_ranges);
    let metrics = WorkerMetrics::new();
    let withdraw = Withdraw(reason);
    let chosen = |i: &u32| only.as_ref().map_or(!failed.contains(i), |o| o.contains(i));
    for shard in plan.shards.iter().map(|s| s.index).filter(chosen) {
        let mut cfg = args.run_config(shard);
        cfg.report = report.cloned();
        let outcome = match PreparedShard::prepare(cfg).await {
            Ok(p) => p.run(&withdraw, &metrics, stop.clone()).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(RunOutcome::Complete(t)) => tracing::debug!(shard, lines = t.lines, failed = t.failed, "shard closed"),
            Ok(other) => {
                tracing::info!(shard, ?other, "stopped while closing; the next close goes on from the committed chunks");
                return other.exit_code();
            }
            Err(e) => {
                tracing::error!(shard, permanent = e.is_permanent(), "cannot close the shard: {e}");
                return e.exit_code();
            }
        }
    }
    tracing::info!(code = reason.code(), shards = plan.shards.len(), "every shard closed");
    finalize(args, report).await
}
