//! The state every reconcile shares: the Kubernetes client, the Event recorder, metrics, the
//! operator's configuration, the object-store opener, the clock (a parameter, fixed in tests),
//! leadership, and a small per-job cache of what never changes once read (plan, final progress).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use jiff::Timestamp;
use kube::Client;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use sluice_api::plan::{PlanSummary, ShardPlan};
use sluice_api::progress::ShardProgress;
use sluice_api::{BatchInferenceJob, GpuBudget};

use crate::job_builder::{FIELD_MANAGER, WorkerDefaults};
use crate::metrics::Metrics;
use crate::reports::ReportHub;
use crate::storage_io::StoreOpener;

/// Operator settings from flags.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Worker pod defaults.
    pub worker: WorkerDefaults,
    /// Resync interval while a job runs (progress must be visible within 30 s).
    pub requeue_running: Duration,
    /// Resync interval of a suspended or held job.
    pub requeue_idle: Duration,
    /// This replica's pod name: the Event reporter's instance.
    pub pod_name: Option<String>,
    /// The operator's namespace: where the learned throughput profiles are kept.
    pub operator_namespace: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            worker: WorkerDefaults::default(),
            requeue_running: Duration::from_secs(30),
            requeue_idle: Duration::from_secs(300),
            pod_name: None,
            operator_namespace: "default".into(),
        }
    }
}

/// What the operator remembers about one job between reconciles. Only facts that cannot change
/// are cached (a plan is write-once; a complete shard's record is final), so losing the cache
/// on restart costs reads, never correctness.
#[derive(Clone, Debug, Default)]
pub struct JobCache {
    pub plan: Option<Arc<ShardPlan>>,
    /// The plan's size, for a job whose pods planned it.
    pub summary: Option<PlanSummary>,
    /// Final progress records of complete shards.
    pub complete: BTreeMap<u32, ShardProgress>,
    /// Finished requests at the last sync, and when that number last grew.
    pub last_done: u64,
    pub last_progress_at: Option<Timestamp>,
    /// When this replica last wrote the status (see `status::only_time_moved`).
    pub last_status_write: Option<Timestamp>,
}

/// The clock: `Timestamp::now` in the binary, a fixed time in tests.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Shared reconcile state.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub config: Config,
    pub stores: Arc<dyn StoreOpener>,
    pub clock: Clock,
    leader: Arc<AtomicBool>,
    /// Reports from the pods of jobs whose storage only they can reach.
    pub reports: Arc<ReportHub>,
    cache: Mutex<HashMap<String, JobCache>>,
    failures: Mutex<HashMap<String, u32>>,
    /// Held while one job is planned against its GpuBudget and its parallelism applied, so that
    /// two reconciles never hand out the same GPUs.
    pub fleet_lock: Arc<tokio::sync::Mutex<()>>,
    /// The parallelism this replica last applied to each budgeted job (`namespace/name`).
    applied: Mutex<HashMap<String, u32>>,
    /// The controller's cache of every BatchInferenceJob, once it runs (the fleet reads the
    /// other jobs from it; without it, from a LIST).
    jobs: OnceLock<Store<DeserializeGuard<BatchInferenceJob>>>,
    /// The GpuBudgets, watched (`controller::run` sets it; without it no job is budgeted).
    budgets: OnceLock<Store<GpuBudget>>,
    /// Asks the controller to reconcile every job now (set by `controller::run`): a budgeted job
    /// that gives GPUs back wakes the others instead of leaving them to their resync.
    wakeups: OnceLock<futures::channel::mpsc::UnboundedSender<()>>,
}

impl Context {
    /// A context. `leader` is shared with the lease task; pass `Arc::new(AtomicBool::new(true))`
    /// without leader election.
    pub fn new(
        client: Client,
        metrics: Metrics,
        config: Config,
        stores: Arc<dyn StoreOpener>,
        clock: Clock,
        leader: Arc<AtomicBool>,
    ) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: config.pod_name.clone() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            config,
            stores,
            clock,
            reports: Arc::new(ReportHub::new(leader.clone())),
            leader,
            cache: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            fleet_lock: Arc::new(tokio::sync::Mutex::new(())),
            applied: Mutex::new(HashMap::new()),
            jobs: OnceLock::new(),
            budgets: OnceLock::new(),
            wakeups: OnceLock::new(),
        }
    }

    /// Whether this replica may write.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    pub fn now(&self) -> Timestamp {
        (self.clock)()
    }

    /// A copy of the cache entry of job `uid`.
    pub fn cached(&self, uid: &str) -> JobCache {
        self.cache.lock().map(|c| c.get(uid).cloned().unwrap_or_default()).unwrap_or_default()
    }

    /// Replace the cache entry of job `uid`.
    pub fn store_cache(&self, uid: &str, entry: JobCache) {
        if let Ok(mut c) = self.cache.lock() {
            c.insert(uid.to_string(), entry);
        }
    }

    /// Count a failed reconcile of `key`; returns the failures before this one.
    pub fn note_failure(&self, key: &str) -> u32 {
        self.failures
            .lock()
            .map(|mut f| {
                let n = f.entry(key.to_string()).or_insert(0);
                *n += 1;
                *n - 1
            })
            .unwrap_or(0)
    }

    /// Reset the failure count of `key` after a successful reconcile.
    pub fn clear_failures(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// The parallelism last applied to budgeted job `key`.
    pub fn applied(&self, key: &str) -> Option<u32> {
        self.applied.lock().ok().and_then(|a| a.get(key).copied())
    }

    /// Record (or, with `None`, forget) the parallelism applied to budgeted job `key`.
    pub fn set_applied(&self, key: &str, parallelism: Option<u32>) {
        if let Ok(mut a) = self.applied.lock() {
            match parallelism {
                Some(p) => a.insert(key.to_string(), p),
                None => a.remove(key),
            };
        }
    }

    /// Share the controller's cache of BatchInferenceJobs (set once).
    pub fn set_job_store(&self, store: Store<DeserializeGuard<BatchInferenceJob>>) {
        let _ = self.jobs.set(store);
    }

    /// The controller's cache of BatchInferenceJobs, once it is ready.
    pub fn job_store(&self) -> Option<&Store<DeserializeGuard<BatchInferenceJob>>> {
        self.jobs.get()
    }

    /// Share a watched cache of GpuBudgets (set once).
    pub fn set_budget_store(&self, store: Store<GpuBudget>) {
        let _ = self.budgets.set(store);
    }

    /// Every GpuBudget, sorted by name (none before the watch runs).
    pub fn budgets(&self) -> Vec<GpuBudget> {
        let mut all: Vec<GpuBudget> = self.budgets.get().map(|s| s.state().iter().map(|b| (**b).clone()).collect()).unwrap_or_default();
        all.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        all
    }

    /// Where [`Context::wake`] sends (set once).
    pub fn set_wakeups(&self, tx: futures::channel::mpsc::UnboundedSender<()>) {
        let _ = self.wakeups.set(tx);
    }

    /// Reconcile every job soon (nothing without a controller).
    pub fn wake_all(&self) {
        if let Some(tx) = self.wakeups.get() {
            let _ = tx.unbounded_send(());
        }
    }

    /// Forget job `uid`.
    pub fn forget(&self, uid: &str) {
        if let Ok(mut c) = self.cache.lock() {
            c.remove(uid);
        }
    }
}
