//! What local mode tells the user: the final manifest write, the end-of-run summary (a table,
//! or one JSON line with `--json`), and `sluice status <output>` from storage alone.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use jiff::Timestamp;
use serde::Serialize;
use sluice_api::contract::layout;
use sluice_api::output::OutputManifest;
use sluice_api::plan::ShardPlan;

use super::executor::ExecOutcome;
use super::{LOCAL_RUN_RECORD, LocalError, LocalJob, LocalRunRecord, committed_shards};
use sluice_api::jobio;
use sluice_operator::context::JobCache;
use sluice_operator::reconcile::read_progress;
use sluice_operator::storage_io::{self, Location};

/// The end-of-run summary.
#[derive(Serialize, Debug, Clone)]
pub struct RunSummary {
    pub job: String,
    pub status: &'static str,
    pub output_uri: String,
    pub manifest_uri: String,
    pub requests_total: u64,
    pub requests_succeeded: u64,
    pub requests_failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub shards: usize,
    pub wall_seconds: f64,
    pub requests_per_second: f64,
    pub output_tokens_per_second: f64,
    pub worker_seconds: f64,
    pub peak_workers: u32,
    pub shard_retries: u32,
    pub projected_finish: Option<String>,
    pub finished_at: String,
    pub deadline: Option<String>,
    pub deadline_met: Option<bool>,
}

impl RunSummary {
    /// The summary of a job that was already complete before this run.
    pub fn already_complete(local: &LocalJob, m: OutputManifest, manifest_uri: String) -> Self {
        Self {
            job: local.name.clone(),
            status: "AlreadyComplete",
            output_uri: local.output.uri.clone(),
            manifest_uri,
            requests_total: m.requests.total,
            requests_succeeded: m.requests.succeeded,
            requests_failed: m.requests.failed,
            prompt_tokens: m.usage.prompt_tokens,
            completion_tokens: m.usage.completion_tokens,
            shards: m.shards.len(),
            wall_seconds: 0.0,
            requests_per_second: 0.0,
            output_tokens_per_second: 0.0,
            worker_seconds: 0.0,
            peak_workers: 0,
            shard_retries: 0,
            projected_finish: None,
            finished_at: m.completed_at,
            deadline: None,
            deadline_met: None,
        }
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let rows: Vec<(&str, String)> = vec![
            ("job", format!("{} ({})", self.job, self.status)),
            ("requests", format!("{} ok, {} failed, {} total", self.requests_succeeded, self.requests_failed, self.requests_total)),
            ("tokens", format!("{} prompt, {} completion", self.prompt_tokens, self.completion_tokens)),
            ("throughput", format!("{:.1} req/s, {:.1} output tok/s", self.requests_per_second, self.output_tokens_per_second)),
            ("wall time", format!("{:.1} s", self.wall_seconds)),
            (
                "workers",
                format!("peak {}, {:.1} worker-seconds, {} shard retries", self.peak_workers, self.worker_seconds, self.shard_retries),
            ),
            ("projected finish", self.projected_finish.clone().unwrap_or_else(|| "-".into())),
            ("actual finish", self.finished_at.clone()),
            (
                "deadline",
                match (&self.deadline, self.deadline_met) {
                    (Some(d), Some(true)) => format!("{d} (met)"),
                    (Some(d), Some(false)) => format!("{d} (MISSED)"),
                    (Some(d), None) => d.clone(),
                    _ => "-".into(),
                },
            ),
            ("shards", self.shards.to_string()),
            ("output", self.output_uri.clone()),
            ("manifest", self.manifest_uri.clone()),
        ];
        for (k, v) in rows {
            let _ = writeln!(s, "  {k:<17} {v}");
        }
        s
    }
}

/// Write the manifest and build the summary once every shard is committed.
pub async fn finish(local: &LocalJob, plan: &ShardPlan, outcome: ExecOutcome, started: Timestamp) -> Result<RunSummary, LocalError> {
    let now = Timestamp::now();
    let records = read_progress(&local.output, plan, &mut JobCache::default(), &outcome.completed).await?;
    let failed: BTreeSet<u32> = outcome.failed.keys().copied().collect();
    let manifest =
        sluice_operator::reconcile::build_manifest(&local.name, &local.job.spec.input.uri, &local.output, plan, &records, &failed, now)
            .await
            .map_err(sluice_operator::error::Error::from)?;
    // A concurrent run that finished first keeps its manifest: report what it wrote.
    let manifest = jobio::write_manifest_once(&local.output, manifest).await.map_err(sluice_operator::error::Error::from)?;
    let wall = now.duration_since(started).as_secs_f64().max(1e-3);
    let deadline = outcome.deadline;
    Ok(RunSummary {
        job: local.name.clone(),
        status: match outcome.closed {
            Some(r) => r.phase().as_str(),
            None if outcome.failed.is_empty() => "Succeeded",
            None => "SucceededWithFailedShards",
        },
        output_uri: local.output.uri.clone(),
        manifest_uri: local.output.child(layout::MANIFEST).uri,
        requests_total: manifest.requests.total,
        requests_succeeded: manifest.requests.succeeded,
        requests_failed: manifest.requests.failed,
        prompt_tokens: manifest.usage.prompt_tokens,
        completion_tokens: manifest.usage.completion_tokens,
        shards: plan.shards.len(),
        wall_seconds: wall,
        requests_per_second: (manifest.requests.succeeded + manifest.requests.failed) as f64 / wall,
        output_tokens_per_second: manifest.usage.completion_tokens as f64 / wall,
        worker_seconds: outcome.worker_seconds,
        peak_workers: outcome.peak_workers,
        shard_retries: outcome.retries,
        projected_finish: outcome.first_projection.map(|t| {
            if outcome.first_projection_observed {
                format!("{t} (first projection from observed throughput)")
            } else {
                format!("{t} (from the spec's prior rate; no throughput observed before the end)")
            }
        }),
        finished_at: now.to_string(),
        deadline: deadline.map(|d| d.to_string()),
        deadline_met: deadline.map(|d| now <= d),
    })
}

/// `sluice status <output-uri>`: the state of a job from its storage alone.
pub async fn print_status(output: &Location) -> Result<String, LocalError> {
    let mut s = String::new();
    let plan = storage_io::read_json::<ShardPlan>(&output.child(layout::PLAN), "shard plan").await?;
    let Some(plan) = plan else {
        return Err(LocalError::Other(format!(
            "{}: no plan found at {} (not a Sluice output prefix, or not planned yet)",
            output.uri,
            layout::PLAN
        )));
    };
    let _ = writeln!(s, "output      {}", output.uri);
    let _ = writeln!(s, "input       {} ({} lines, {} bytes)", plan.input_uri, plan.line_count, plan.input_size);
    if let Ok(Some(r)) = storage_io::read_json::<LocalRunRecord>(&output.child(LOCAL_RUN_RECORD), "local run record").await {
        let _ = writeln!(s, "started     {}", r.created_at);
    }
    let committed = committed_shards(output, &plan).await?;
    let records = read_progress(output, &plan, &mut JobCache::default(), &committed).await?;
    let done: u64 = records.values().map(|r| r.lines_done).sum();
    let ok: u64 = records.values().map(|r| r.succeeded).sum();
    let failed: u64 = records.values().map(|r| r.failed).sum();
    let _ = writeln!(s, "shards      {} committed of {}", committed.len(), plan.shards.len());
    let _ = writeln!(s, "requests    {done} done of {} ({ok} ok, {failed} failed)", plan.line_count);
    match storage_io::read_json::<OutputManifest>(&output.child(layout::MANIFEST), "output manifest").await? {
        Some(m) => {
            let _ = writeln!(s, "state       Complete at {} ({} ok, {} failed)", m.completed_at, m.requests.succeeded, m.requests.failed);
        }
        None => {
            let _ = writeln!(
                s,
                "state       {}",
                if committed.len() == plan.shards.len() { "Committed (manifest not yet written)" } else { "Incomplete" }
            );
        }
    }
    let _ = writeln!(s, "\n  shard  lines   done     ok  failed  complete  updated");
    for shard in &plan.shards {
        match records.get(&shard.index) {
            Some(r) => {
                let _ = writeln!(
                    s,
                    "  {:>5}  {:>5}  {:>5}  {:>5}  {:>6}  {:>8}  {}",
                    shard.index,
                    shard.line_count,
                    r.lines_done,
                    r.succeeded,
                    r.failed,
                    if committed.contains(&shard.index) { "yes" } else { "no" },
                    r.updated_at
                );
            }
            None => {
                let _ = writeln!(s, "  {:>5}  {:>5}  {:>5}  {:>5}  {:>6}  {:>8}  -", shard.index, shard.line_count, 0, 0, 0, "no");
            }
        }
    }
    Ok(s)
}
