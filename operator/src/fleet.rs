//! The fleet in the reconciler: a job that a GpuBudget covers is planned together with every
//! other job of that budget by the one fleet scheduler (`sluice_control::fleet`), under one lock
//! so that two reconciles never hand out the same GPUs; its grant caps the job's parallelism and
//! is written to `status.fleet` with an Event when it changes. Also the budget's status and the
//! throughput profiles that finished jobs leave for the next job of their model.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use sluice_api::budget::{self, GpuBudget, GpuBudgetStatus, PROFILES_CONFIGMAP, ThroughputProfile};
use sluice_api::job::{AdmissionQuote, FleetStatus};
use sluice_api::{BatchInferenceJob, BatchInferenceJobStatus};
use sluice_control::fleet::{self, Budget, FleetConfig, FleetJob, Grant, Why};
use sluice_control::fleet_view::{self, JobFacts, RateBasis};
use tokio::sync::OwnedMutexGuard;

use crate::context::Context;
use crate::error::{Error, Result};

/// An Event to publish on the job: type, reason, note.
pub type FleetEvent = (EventType, &'static str, String);

/// This reconcile's part of the fleet plan. Holding it holds the fleet lock: drop it once the
/// job's parallelism is applied ([`FleetPlan::applied`]).
pub struct FleetPlan {
    pub budget: GpuBudget,
    pub grant: Grant,
    pub status: FleetStatus,
    pub events: Vec<FleetEvent>,
    /// The model's learned rate, for the job's own scaler prior.
    pub profile_rps: Option<f64>,
    /// The other covered jobs: key, namespace, GPUs per worker, workers now.
    others: Vec<(String, String, u32, u32)>,
    _lock: OwnedMutexGuard<()>,
}

fn secs(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

fn time_of(s: f64) -> Option<Time> {
    Timestamp::from_millisecond((s * 1000.0) as i64).ok().map(Time)
}

/// The learned throughput profiles; empty (with a warning) when they cannot be read.
pub async fn profiles(ctx: &Context) -> BTreeMap<String, ThroughputProfile> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.operator_namespace);
    match api.get_opt(PROFILES_CONFIGMAP).await {
        Ok(cm) => parse_profiles(cm.and_then(|c| c.data).unwrap_or_default()),
        Err(e) => {
            tracing::warn!(error = %e, configmap = PROFILES_CONFIGMAP, "reading the throughput profiles failed; quoting from the prior");
            BTreeMap::new()
        }
    }
}

/// The profiles in a ConfigMap's data (entries that do not parse are skipped with a warning).
pub fn parse_profiles(data: BTreeMap<String, String>) -> BTreeMap<String, ThroughputProfile> {
    data.into_iter()
        .filter_map(|(k, v)| match serde_json::from_str::<ThroughputProfile>(&v) {
            Ok(p) => Some((k, p)),
            Err(e) => {
                tracing::warn!(key = %k, error = %e, configmap = PROFILES_CONFIGMAP, "skipping a throughput profile that does not parse");
                None
            }
        })
        .collect()
}

/// The profile of `bij`'s model on its GPU type.
pub fn profile_of<'a>(profiles: &'a BTreeMap<String, ThroughputProfile>, bij: &BatchInferenceJob) -> Option<&'a ThroughputProfile> {
    profiles.get(&ThroughputProfile::key(&bij.spec.model.uri, &ThroughputProfile::gpu_type_of(&bij.spec)))
}

async fn all_jobs(ctx: &Context) -> Result<Vec<BatchInferenceJob>> {
    if let Some(store) = ctx.job_store() {
        return Ok(store.state().iter().filter_map(|g| g.0.as_ref().ok().cloned()).collect());
    }
    let api: Api<BatchInferenceJob> = Api::all(ctx.client.clone());
    Ok(api.list(&ListParams::default()).await.map_err(Error::kube("list BatchInferenceJobs".to_string()))?.items)
}

/// The fleet's reason for a grant, as `status.fleet.reason`.
pub fn reason_of(g: &Grant) -> &'static str {
    if !g.lent.is_empty() {
        return "Lent";
    }
    match g.why {
        Why::OnTrack => "OnTrack",
        Why::Waiting { .. } => "Waiting",
        Why::Infeasible { .. } => "Infeasible",
        Why::Done => "Done",
    }
}

/// Plan `own` beside `others` under `budget` (pure): the grant, the job's new `status.fleet`
/// (the admission quote made once, before any request is done) and the Events to publish.
pub fn plan_fleet(
    budget: &GpuBudget,
    own: &FleetJob,
    basis: &RateBasis,
    others: &[FleetJob],
    old: Option<&FleetStatus>,
    now: f64,
) -> (Grant, FleetStatus, Vec<FleetEvent>) {
    let b = Budget {
        gpus: budget.spec.gpus.max(0) as u32,
        per_namespace: budget.spec.per_namespace.iter().map(|(k, v)| (k.clone(), (*v).max(0) as u32)).collect(),
    };
    let cfg = FleetConfig::default();
    let mut all = others.to_vec();
    all.push(own.clone());
    let grant = fleet::plan(now, &all, &b, &cfg).into_iter().find(|g| g.key == own.key).unwrap_or(Grant {
        key: own.key.clone(),
        workers: 0,
        projected_finish: None,
        gpu_hours: 0.0,
        why: Why::Done,
        lent: Vec::new(),
        message: "not planned".into(),
    });
    let mut events = Vec::new();
    let quote = match old.and_then(|o| o.quote.clone()) {
        Some(q) => Some(q),
        None => {
            let mut fresh = own.clone();
            fresh.current_workers = 0;
            let q = fleet::quote(now, others, &fresh, &b, &cfg);
            let basis = basis.describe(own.rate.mean);
            let message = match q.grant.projected_finish {
                Some(f) if q.feasible => format!(
                    "quoted at admission: projected finish {} ({:.2} GPU-hours) against the deadline; from {basis}",
                    time_of(f).map(|t| t.0.to_string()).unwrap_or_default(),
                    q.grant.gpu_hours
                ),
                _ => format!("infeasible at admission: {}; from {basis}", q.grant.message),
            };
            events.push((
                if q.feasible { EventType::Normal } else { EventType::Warning },
                if q.feasible { "Quoted" } else { "InfeasibleAtAdmission" },
                message.clone(),
            ));
            Some(AdmissionQuote {
                quoted_at: time_of(now),
                projected_completion_time: q.grant.projected_finish.filter(|_| q.feasible).and_then(time_of),
                gpu_hours: (q.grant.gpu_hours * 100.0).round() / 100.0,
                feasible: q.feasible,
                basis,
                message,
            })
        }
    };
    let reason = reason_of(&grant);
    let status = FleetStatus {
        budget: budget.name_any(),
        workers: grant.workers as i32,
        gpus: (grant.workers * own.gpus_per_worker.max(1)) as i32,
        reason: reason.into(),
        message: grant.message.clone(),
        quote,
    };
    if old.is_none_or(|o| o.reason != status.reason || o.workers != status.workers) {
        let (t, r) = match reason {
            "Lent" => (EventType::Normal, "FleetLent"),
            "Waiting" => (EventType::Normal, "FleetWaiting"),
            "Infeasible" => (EventType::Warning, "FleetInfeasible"),
            "Done" => (EventType::Normal, "FleetDone"),
            _ => (EventType::Normal, "FleetGranted"),
        };
        events.push((t, r, format!("budget {}: {}", status.budget, status.message)));
    }
    (grant, status, events)
}

/// The other jobs `budget` covers, as the fleet sees them: every GPU they hold now counts as
/// held (only their own reconcile lowers them, as their shards finish).
fn others_of(
    ctx: &Context,
    jobs: &[BatchInferenceJob],
    budgets: &[GpuBudget],
    budget: &GpuBudget,
    own_key: &str,
    profiles: &BTreeMap<String, ThroughputProfile>,
    now: Timestamp,
) -> Vec<FleetJob> {
    jobs.iter()
        .filter(|j| budget::covering(budgets, &j.spec).is_some_and(|b| b.name_any() == budget.name_any()))
        .filter_map(|j| {
            let key = format!("{}/{}", j.namespace().unwrap_or_default(), j.name_any());
            if key == own_key {
                return None;
            }
            let facts = JobFacts::from_status(j, ctx.applied(&key));
            match fleet_view::fleet_job(j, &facts, profile_of(profiles, j), now) {
                Some((f, _)) => Some(f),
                // Holding workers with nothing to plan (yet): its GPUs still count.
                None => ctx.applied(&key).filter(|w| *w > 0).map(|w| fleet_view::holder(j, w)),
            }
        })
        .collect()
}

/// Plan the job under the budget that covers it, holding the fleet lock until the returned plan
/// is dropped; `None` when no budget covers it.
pub async fn plan_job(ctx: &Context, bij: &BatchInferenceJob, own_facts: &JobFacts, now: Timestamp) -> Result<Option<FleetPlan>> {
    let budgets = ctx.budgets();
    let Some(budget) = budget::covering(&budgets, &bij.spec).cloned() else {
        return Ok(None);
    };
    let lock = Arc::clone(&ctx.fleet_lock).lock_owned().await;
    let profiles = profiles(ctx).await;
    let jobs = all_jobs(ctx).await?;
    let key = format!("{}/{}", bij.namespace().unwrap_or_default(), bij.name_any());
    let others = others_of(ctx, &jobs, &budgets, &budget, &key, &profiles, now);
    let profile = profile_of(&profiles, bij);
    let Some((own, basis)) = fleet_view::fleet_job(bij, own_facts, profile, now) else {
        return Ok(None);
    };
    let old = bij.status.as_ref().and_then(|s| s.fleet.as_ref());
    let (grant, status, events) = plan_fleet(&budget, &own, &basis, &others, old, secs(now));
    let others = others.iter().map(|o| (o.key.clone(), o.namespace.clone(), o.gpus_per_worker.max(1), o.current_workers)).collect();
    let profile_rps = profile.map(|p| p.rate_for(None));
    Ok(Some(FleetPlan { budget, grant, status, events, profile_rps, others, _lock: lock }))
}

impl FleetPlan {
    /// Record the parallelism applied to the job and write the budget's status when what its jobs
    /// hold changed; then release the fleet lock.
    pub async fn applied(self, ctx: &Context, bij: &BatchInferenceJob, parallelism: u32, terminal: bool, now: Timestamp) {
        let ns = bij.namespace().unwrap_or_default();
        let key = format!("{ns}/{}", bij.name_any());
        let before = ctx.applied(&key).or(u32::try_from(bij.status.as_ref().map_or(0, |s| s.workers.desired)).ok());
        let held: Vec<String> = self.others.iter().map(|(k, _, _, w)| format!("{k}={}", ctx.applied(k).unwrap_or(*w))).collect();
        tracing::info!(
            job = %key, budget = %self.budget.name_any(), parallelism, grant = self.grant.workers, reason = %self.status.reason,
            others = %held.join(","), message = %self.status.message, "fleet plan applied"
        );
        ctx.set_applied(&key, (!terminal).then_some(parallelism));
        // GPUs given back: the budget's other jobs may take them now, not at their next resync.
        if (before.is_some_and(|b| parallelism < b) || terminal) && !self.others.is_empty() {
            ctx.wake_all();
        }
        let gpw = bij.spec.workers.gpus.max(1) as u32;
        let mut held_ns: BTreeMap<String, i32> = BTreeMap::new();
        let mut jobs = 0;
        let own = (!terminal).then_some((ns, gpw, parallelism));
        for (n, g, p) in self.others.iter().map(|(k, n, g, w)| (n.clone(), *g, ctx.applied(k).unwrap_or(*w))).chain(own) {
            jobs += 1;
            *held_ns.entry(n).or_default() += (p * g) as i32;
        }
        let status = GpuBudgetStatus {
            held_gpus: held_ns.values().sum(),
            jobs,
            held_per_namespace: held_ns.into_iter().filter(|(_, v)| *v > 0).collect(),
            updated: self.budget.status.as_ref().and_then(|s| s.updated.clone()),
        };
        let same = self
            .budget
            .status
            .as_ref()
            .is_some_and(|old| GpuBudgetStatus { updated: None, ..old.clone() } == GpuBudgetStatus { updated: None, ..status.clone() });
        if same {
            return;
        }
        let status = GpuBudgetStatus { updated: Some(Time(now)), ..status };
        let api: Api<GpuBudget> = Api::all(ctx.client.clone());
        let patch = json!({ "apiVersion": "sluice.dev/v1alpha1", "kind": "GpuBudget", "status": status });
        if let Err(e) = api
            .patch_status(&self.budget.name_any(), &PatchParams::apply(crate::job_builder::FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await
        {
            tracing::warn!(budget = %self.budget.name_any(), error = %e, "writing the GpuBudget status failed");
        }
    }
}

/// A job that just succeeded: fold its measured throughput into its model's profile.
pub async fn learn(ctx: &Context, bij: &BatchInferenceJob, status: &BatchInferenceJobStatus, startup_secs: Option<f64>, now: Timestamp) {
    let rps = status.throughput.per_worker_requests_per_second;
    if !(rps.is_finite() && rps > 0.0) {
        return;
    }
    let tokens = status.reported.as_ref().map(|r| r.completion_tokens as f64);
    let per_request = match (tokens, status.requests.succeeded) {
        (Some(t), n) if n > 0 && t > 0.0 => t / n as f64,
        _ if status.throughput.requests_per_second > 0.0 => {
            status.throughput.output_tokens_per_second / status.throughput.requests_per_second
        }
        _ => 0.0,
    };
    let gpu_type = ThroughputProfile::gpu_type_of(&bij.spec);
    let key = ThroughputProfile::key(&bij.spec.model.uri, &gpu_type);
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.operator_namespace);
    let existing = match api.get_opt(PROFILES_CONFIGMAP).await {
        Ok(cm) => cm,
        Err(e) => {
            tracing::warn!(error = %e, "reading the throughput profiles failed; this job's throughput is not learned");
            return;
        }
    };
    let mut profile = existing
        .as_ref()
        .and_then(|c| c.data.as_ref()?.get(&key).cloned())
        .and_then(|v| serde_json::from_str::<ThroughputProfile>(&v).ok())
        .unwrap_or_else(|| ThroughputProfile {
            model: bij.spec.model.uri.clone(),
            gpu_type: gpu_type.clone(),
            gpus_per_worker: bij.spec.workers.gpus,
            ..ThroughputProfile::default()
        });
    profile.observe(rps, per_request, startup_secs, now.to_string());
    let Ok(value) = serde_json::to_string(&profile) else { return };
    let result = if existing.is_some() {
        api.patch(PROFILES_CONFIGMAP, &PatchParams::default(), &Patch::Merge(json!({ "data": { key.clone(): value } }))).await.map(|_| ())
    } else {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(PROFILES_CONFIGMAP.into());
        cm.metadata.labels = Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_string(), "sluice-operator".to_string())]));
        cm.data = Some(BTreeMap::from([(key.clone(), value)]));
        api.create(&PostParams::default(), &cm).await.map(|_| ())
    };
    match result {
        Ok(()) => {
            tracing::info!(job = %bij.object_ref(&()).name.unwrap_or_default(), profile = %key, rps, jobs = profile.jobs, "learned throughput profile")
        }
        Err(e) => tracing::warn!(profile = %key, error = %e, "writing the throughput profile failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_control::sla::RateEstimate;

    fn budget(gpus: i32) -> GpuBudget {
        GpuBudget::new("fleet", budget::GpuBudgetSpec { gpus, per_namespace: BTreeMap::new(), gpu_type: None, gpu_type_label: None })
    }

    fn job(key: &str, deadline: f64, remaining: f64, current: u32, protected: u32) -> FleetJob {
        FleetJob {
            key: key.into(),
            namespace: key.split('/').next().unwrap_or_default().into(),
            priority: 0,
            arrived: 0.0,
            deadline,
            remaining_requests: remaining,
            rate: RateEstimate { mean: 1.0, stddev: 0.0, samples: 10 },
            startup_secs: 60.0,
            gpus_per_worker: 1,
            min_workers: 0,
            max_workers: 4,
            current_workers: current,
            protected_workers: protected,
            releasing_workers: 0,
            remaining_shards: 100,
            lending: false,
        }
    }

    #[test]
    fn the_slack_job_lends_and_the_tight_one_waits_for_what_it_holds() {
        // Budget 4: the slack job runs 4 workers; the tight one arrives needing 3.
        let slack = job("ml/nightly", 100_000.0, 4000.0, 4, 0);
        let tight = job("ml/urgent", 2000.0, 4000.0, 0, 0);
        // The slack job's own reconcile: the tight one is ahead; the slack one keeps 1 and lends 3.
        let (g, st, ev) = plan_fleet(&budget(4), &slack, &RateBasis::Measured, std::slice::from_ref(&tight), None, 0.0);
        assert_eq!((g.workers, st.reason.as_str()), (1, "Lent"), "{g:?}");
        assert!(st.message.starts_with("lent 3 workers to ml/urgent (slack"), "{}", st.message);
        assert!(ev.iter().any(|(_, r, _)| *r == "FleetLent"));
        // The tight job's reconcile: the slack job's 4 still count as held until they are given
        // back, so nothing is granted beyond the budget.
        let held = FleetJob { protected_workers: 4, ..slack.clone() };
        let (g, st, _) = plan_fleet(&budget(4), &tight, &RateBasis::Prior, &[held], None, 0.0);
        assert_eq!(g.workers, 0);
        assert_eq!(st.reason, "Waiting");
        let q = st.quote.clone().expect("an admission quote");
        assert!(q.basis.starts_with("prior"), "{}", q.basis);
        // Once the slack job is down to 1, the tight one gets 3.
        let held = FleetJob { current_workers: 1, protected_workers: 1, ..slack };
        let (g, _, _) = plan_fleet(&budget(4), &tight, &RateBasis::Prior, &[held], Some(&st), 0.0);
        assert_eq!(g.workers, 3);
    }

    #[test]
    fn an_infeasible_job_is_flagged_at_admission_once() {
        let j = job("ml/impossible", 600.0, 100_000.0, 0, 0);
        let (_, st, ev) = plan_fleet(&budget(8), &j, &RateBasis::Prior, &[], None, 0.0);
        let q = st.quote.clone().unwrap();
        assert!(!q.feasible && q.message.contains("would make it"), "{q:?}");
        assert!(ev.iter().any(|(t, r, _)| *r == "InfeasibleAtAdmission" && *t == EventType::Warning));
        // The next reconcile keeps the quote and publishes nothing new.
        let (_, st2, ev2) = plan_fleet(&budget(8), &j, &RateBasis::Prior, &[], Some(&st), 10.0);
        assert_eq!(st2.quote, st.quote);
        assert!(ev2.is_empty(), "{ev2:?}");
    }

    #[test]
    fn profiles_that_do_not_parse_are_skipped() {
        let p = parse_profiles(BTreeMap::from([
            ("good".into(), serde_json::to_string(&ThroughputProfile::default()).unwrap()),
            ("bad".into(), "{".into()),
        ]));
        assert_eq!(p.keys().collect::<Vec<_>>(), ["good"]);
    }
}
