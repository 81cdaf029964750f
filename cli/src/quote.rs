//! `sluice quote job.yaml` and `kubectl sluice quote`: a job's projected finish and GPU-hours
//! before it starts, from the fleet scheduler's own [`fleet::quote`] (the code that plans a
//! cluster's jobs) and the input's request count; locally at the throughput prior of its
//! `maxTokens`, against a cluster beside the jobs its GpuBudget already runs, from its model's
//! learned profile when one exists. An infeasible deadline is flagged with what would make it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};
use serde_json::json;
use sluice_api::budget::{PROFILES_CONFIGMAP, ThroughputProfile};
use sluice_api::lines::DEFAULT_MAX_LINE_BYTES;
use sluice_api::{BatchInferenceJob, GpuBudget};
use sluice_control::fleet::{self, Budget, FleetConfig, FleetJob, Why};
use sluice_control::fleet_view::{self, JobFacts, RateBasis};
use sluice_operator::storage_io::{StoreOpener, UriOpener};

use crate::local::resolve_uri;

/// What the quote rests on and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct JobQuote {
    pub name: String,
    pub requests: u64,
    pub deadline: Timestamp,
    pub budget_gpus: u32,
    /// The GpuBudget it was quoted against (cluster quotes).
    pub budget_name: Option<String>,
    /// Other jobs of that budget it was planned beside.
    pub fleet_jobs: usize,
    pub per_worker_rps: f64,
    pub basis: RateBasis,
    /// CPU workers (`workers.gpus: 0`): the budget counts workers.
    pub cpu: bool,
    pub quote: fleet::Quote,
}

/// What to quote against.
pub enum Against {
    /// This machine alone: `gpus` GPUs (default: `workers.max` workers' worth), no profile.
    Local { gpus: Option<u32> },
    /// A cluster: the GpuBudget that covers the job, the jobs it already runs, and the learned
    /// profile of the job's model (in `operator_namespace`).
    Cluster { client: kube::Client, operator_namespace: String, gpus: Option<u32> },
}

/// Count the manifest's requests (non-blank input lines).
async fn count_requests(job: &BatchInferenceJob, path: &Path) -> Result<u64, String> {
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
    Ok(requests)
}

/// Quote the manifest at `path` at time `now`.
pub async fn quote(path: &Path, now: Timestamp, against: Against) -> Result<JobQuote, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut job = sluice_api::validate::load_manifest(&text, &path.display().to_string()).map_err(|e| e.to_string())?;
    let requests = count_requests(&job, path).await?;
    let deadline = sluice_api::deadline::effective_deadline(&job.spec.sla, now).map_err(|e| format!("spec.sla: {e}"))?;
    job.metadata.namespace.get_or_insert_with(|| "default".into());
    let spec = &job.spec;
    let gpus_per_worker = u32::try_from(spec.workers.gpus).unwrap_or(0).max(1);
    let max_workers = u32::try_from(spec.workers.max).unwrap_or(1).max(1);
    let per_shard = spec.sharding.requests_per_shard.map_or(requests.div_ceil(u64::from(max_workers)).max(1), u64::from);
    let shards = u32::try_from(requests.div_ceil(per_shard)).unwrap_or(u32::MAX);
    let facts = JobFacts { total_requests: requests, total_shards: shards, remaining_shards: shards, ..JobFacts::default() };
    let own_max = max_workers * gpus_per_worker;
    let (budget, budget_name, others, profile) = match against {
        Against::Local { gpus } => (Budget { gpus: gpus.unwrap_or(own_max), ..Budget::default() }, None, Vec::new(), None),
        Against::Cluster { client, operator_namespace, gpus } => {
            let view = ClusterFleet::read(&client, &operator_namespace).await?;
            let profile = sluice_operator::fleet::profile_of(&view.profiles, &job).cloned();
            match sluice_api::budget::covering(&view.budgets, &job.spec) {
                Some(b) => {
                    let name = b.metadata.name.clone().unwrap_or_default();
                    let budget = Budget {
                        gpus: gpus.unwrap_or(b.spec.gpus.max(0) as u32),
                        per_namespace: b.spec.per_namespace.iter().map(|(k, v)| (k.clone(), (*v).max(0) as u32)).collect(),
                    };
                    (budget, Some(name.clone()), view.jobs_of(&name, now), profile)
                }
                None => (Budget { gpus: gpus.unwrap_or(own_max), ..Budget::default() }, None, Vec::new(), profile),
            }
        }
    };
    let (candidate, basis) = fleet_view::fleet_job(&job, &facts, profile.as_ref(), now)
        .ok_or_else(|| "the job has no requests to quote (empty input)".to_string())?;
    let t0 = now.as_second() as f64;
    // Aim `sla.margin` of the window before the deadline (at most the scheduler's default).
    let window = (deadline.as_second() as f64 - t0).max(0.0);
    let cfg = FleetConfig { safety_secs: (spec.sla.margin * window).min(FleetConfig::default().safety_secs), ..FleetConfig::default() };
    let q = fleet::quote(t0, &others, &candidate, &budget, &cfg);
    Ok(JobQuote {
        name: job.metadata.name.clone().unwrap_or_else(|| "job".into()),
        requests,
        deadline,
        budget_gpus: budget.gpus,
        budget_name,
        fleet_jobs: others.len(),
        per_worker_rps: candidate.rate.mean,
        basis,
        cpu: spec.workers.gpus == 0,
        quote: q,
    })
}

/// What a cluster quote reads: the budgets, the learned profiles and every job.
pub struct ClusterFleet {
    pub budgets: Vec<GpuBudget>,
    pub profiles: BTreeMap<String, ThroughputProfile>,
    pub jobs: Vec<BatchInferenceJob>,
}

impl ClusterFleet {
    /// Read them (the GpuBudget CRD may be absent: no budgets then).
    pub async fn read(client: &kube::Client, operator_namespace: &str) -> Result<Self, String> {
        let budgets: Api<GpuBudget> = Api::all(client.clone());
        let mut budgets = match budgets.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
            Err(e) => return Err(format!("list GpuBudgets: {e}")),
        };
        budgets.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), operator_namespace);
        let profiles = match cms.get_opt(PROFILES_CONFIGMAP).await {
            Ok(cm) => sluice_operator::fleet::parse_profiles(cm.and_then(|c| c.data).unwrap_or_default()),
            Err(e) => return Err(format!("get ConfigMap {operator_namespace}/{PROFILES_CONFIGMAP}: {e}")),
        };
        let bijs: Api<BatchInferenceJob> = Api::all(client.clone());
        let jobs = bijs.list(&ListParams::default()).await.map_err(|e| format!("list BatchInferenceJobs: {e}"))?.items;
        Ok(Self { budgets, profiles, jobs })
    }

    /// The unfinished jobs budget `name` covers, as the fleet scheduler sees them.
    pub fn jobs_of(&self, name: &str, now: Timestamp) -> Vec<FleetJob> {
        self.jobs
            .iter()
            .filter(|j| sluice_api::budget::covering(&self.budgets, &j.spec).is_some_and(|b| b.metadata.name.as_deref() == Some(name)))
            .filter_map(|j| {
                let facts = JobFacts::from_status(j, None);
                fleet_view::fleet_job(j, &facts, sluice_operator::fleet::profile_of(&self.profiles, j), now).map(|(f, _)| f)
            })
            .collect()
    }
}

fn ts(secs: f64) -> String {
    Timestamp::from_second(secs as i64).map(|t| t.to_string()).unwrap_or_else(|_| format!("{secs}"))
}

impl JobQuote {
    /// How far the quote can be trusted, from what it rests on.
    pub fn accuracy(&self) -> &'static str {
        match self.basis {
            RateBasis::Profile { .. } | RateBasis::Measured => {
                "from a measured throughput: in sluice-sim --fleet, every such quote is within 20 % of the actual finish"
            }
            RateBasis::Prior => {
                "from the prior only (no job of this model has finished here): expect the actual finish to differ by more than 20 %"
            }
        }
    }

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
        if let Some(b) = &self.budget_name {
            out.push_str(&format!("against: GpuBudget {b} ({} GPUs), beside {} running jobs\n", self.budget_gpus, self.fleet_jobs));
        }
        out.push_str(&format!("based on: {}, planned at the pessimistic rate\n", self.basis.describe(self.per_worker_rps)));
        out.push_str(&format!("accuracy: {}\n", self.accuracy()));
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
            "per_worker_rps": self.per_worker_rps,
            "basis": self.basis.describe(self.per_worker_rps),
            "budget": self.budget_name,
            "fleet_jobs": self.fleet_jobs,
            "accuracy": self.accuracy(),
        })
    }
}
