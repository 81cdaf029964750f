//! `sluice quote job.yaml`: a job's projected finish and GPU-hours before it starts, from the
//! fleet scheduler's own [`fleet::quote`] (the code that plans a cluster's jobs), the input's
//! request count and the throughput prior of its `maxTokens`; an infeasible deadline is flagged
//! with what would make it feasible.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde_json::json;
use sluice_api::lines::DEFAULT_MAX_LINE_BYTES;
use sluice_control::fleet::{self, Budget, FleetConfig, FleetJob, Why};
use sluice_control::sla::{PRIOR_STARTUP_SECS, RateEstimate, prior_per_worker_rps};
use sluice_operator::storage_io::{StoreOpener, UriOpener};

use crate::local::resolve_uri;

/// What the quote rests on and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct JobQuote {
    pub name: String,
    pub requests: u64,
    pub deadline: Timestamp,
    pub budget_gpus: u32,
    pub per_worker_rps: f64,
    /// CPU workers (`workers.gpus: 0`): the budget counts workers.
    pub cpu: bool,
    pub quote: fleet::Quote,
}

/// Quote the manifest at `path` at time `now` with `gpus` GPUs (default: its `workers.max`
/// workers' worth).
pub async fn quote(path: &Path, now: Timestamp, gpus: Option<u32>) -> Result<JobQuote, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let job = sluice_api::validate::load_manifest(&text, &path.display().to_string()).map_err(|e| e.to_string())?;
    let base: PathBuf = path.parent().map(Path::to_path_buf).filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| PathBuf::from("."));
    let input_uri = resolve_uri(&job.spec.input.uri, &base);
    let input = UriOpener
        .open("spec.input.uri", &input_uri, job.spec.storage.as_ref(), &Default::default())
        .map_err(|e| format!("spec.input.uri: {e}"))?;
    let size = input.head().await.map_err(|e| format!("spec.input.uri: {e}"))?.size;
    let mut lines = input.lines(0..size, DEFAULT_MAX_LINE_BYTES).await.map_err(|e| format!("spec.input.uri: {e}"))?;
    let mut requests = 0u64;
    while let Some(l) = lines.next_line().await.map_err(|e| format!("spec.input.uri: {e}"))? {
        if !l.bytes.iter().all(u8::is_ascii_whitespace) {
            requests += 1;
        }
    }
    let deadline = sluice_api::deadline::effective_deadline(&job.spec.sla, now).map_err(|e| format!("spec.sla: {e}"))?;
    let spec = &job.spec;
    let gpus_per_worker = u32::try_from(spec.workers.gpus).unwrap_or(0).max(1);
    let max_workers = u32::try_from(spec.workers.max).unwrap_or(1).max(1);
    let budget_gpus = gpus.unwrap_or(max_workers * gpus_per_worker);
    let rps = prior_per_worker_rps(spec);
    let name = job.metadata.name.clone().unwrap_or_else(|| "job".into());
    let per_shard = spec.sharding.requests_per_shard.map_or(requests.div_ceil(u64::from(max_workers)).max(1), u64::from);
    let t0 = now.as_second() as f64;
    let candidate = FleetJob {
        key: format!("{}/{name}", job.metadata.namespace.clone().unwrap_or_else(|| "default".into())),
        namespace: job.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        priority: 0,
        arrived: t0,
        deadline: deadline.as_second() as f64,
        remaining_requests: requests as f64,
        // No profile of this model yet: the prior, with a heavy tail (half the runs slower by half).
        rate: RateEstimate { mean: rps, stddev: 0.5 * rps, samples: 1 },
        startup_secs: PRIOR_STARTUP_SECS,
        gpus_per_worker,
        min_workers: u32::try_from(spec.workers.min).unwrap_or(0),
        max_workers,
        current_workers: 0,
        protected_workers: 0,
        releasing_workers: 0,
        remaining_shards: u32::try_from(requests.div_ceil(per_shard)).unwrap_or(u32::MAX),
    };
    let budget = Budget { gpus: budget_gpus, ..Budget::default() };
    // Aim `sla.margin` of the window before the deadline (at most the scheduler's default).
    let window = (deadline.as_second() as f64 - t0).max(0.0);
    let cfg = FleetConfig { safety_secs: (spec.sla.margin * window).min(FleetConfig::default().safety_secs), ..FleetConfig::default() };
    let q = fleet::quote(t0, &[], &candidate, &budget, &cfg);
    Ok(JobQuote { name, requests, deadline, budget_gpus, per_worker_rps: rps, cpu: spec.workers.gpus == 0, quote: q })
}

fn ts(secs: f64) -> String {
    Timestamp::from_second(secs as i64).map(|t| t.to_string()).unwrap_or_else(|_| format!("{secs}"))
}

impl JobQuote {
    /// The human report.
    pub fn text(&self) -> String {
        let g = &self.quote.grant;
        let verdict = if self.quote.feasible { "feasible" } else { "INFEASIBLE" };
        let mut out = format!(
            "job {}: {} requests, deadline {}, budget {} {}\n\
             {verdict}: {} workers, projected finish {}, {:.2} GPU-hours\n{}\n",
            self.name,
            self.requests,
            self.deadline,
            self.budget_gpus,
            if self.cpu { "CPU workers" } else { "GPUs" },
            g.workers,
            g.projected_finish.map(ts).unwrap_or_else(|| "unknown".into()),
            g.gpu_hours,
            g.message
        );
        out.push_str(&format!(
            "based on: the throughput prior of {:.3} requests/s per worker (from maxTokens; no profile of this model yet), planned at the pessimistic rate\n",
            self.per_worker_rps
        ));
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let g = &self.quote.grant;
        let (earliest, gpus_needed) = match &g.why {
            Why::Infeasible { earliest_finish, gpus_needed } => (earliest_finish.map(ts), *gpus_needed),
            _ => (None, None),
        };
        json!({
            "job": self.name,
            "requests": self.requests,
            "deadline": self.deadline.to_string(),
            "budget_gpus": self.budget_gpus,
            "feasible": self.quote.feasible,
            "workers": g.workers,
            "projected_finish": g.projected_finish.map(ts),
            "gpu_hours": (g.gpu_hours * 1000.0).round() / 1000.0,
            "earliest_finish": earliest,
            "gpus_needed": gpus_needed,
            "message": g.message,
            "per_worker_rps_prior": self.per_worker_rps,
        })
    }
}
