//! The operator's Prometheus metrics (prometheus-client), with exactly the names and bounded
//! labels of `docs/metrics.md`: per-job gauges set from each reconcile's status, reconcile
//! counters and a duration histogram that records on drop. Serving them is the binary's job.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sluice_api::BatchInferenceJobStatus;
use sluice_api::job::{JobPhase, SlaStatus};
use tokio::time::Instant;

type F64Gauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub namespace: String,
    pub job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub namespace: String,
    pub job: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub namespace: String,
    pub job: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub namespace: String,
    pub job: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: String,
    pub job: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub namespace: String,
    pub job: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

const REQUEST_STATES: [&str; 4] = ["total", "succeeded", "failed", "pending"];
const SHARD_STATES: [&str; 4] = ["total", "completed", "failed", "active"];
const WORKER_KINDS: [&str; 2] = ["desired", "active"];

/// Every operator metric.
#[derive(Clone)]
pub struct Metrics {
    pub job_requests: Family<StateLabels, Gauge>,
    pub job_shards: Family<StateLabels, Gauge>,
    pub job_workers: Family<KindLabels, Gauge>,
    pub job_throughput_rps: Family<JobLabels, F64Gauge>,
    pub job_throughput_tps: Family<JobLabels, F64Gauge>,
    pub job_projected_completion: Family<JobLabels, F64Gauge>,
    pub job_deadline: Family<JobLabels, F64Gauge>,
    pub job_slack: Family<JobLabels, F64Gauge>,
    pub job_sla_status: Family<StatusLabels, Gauge>,
    pub job_phase: Family<PhaseLabels, Gauge>,
    pub job_gpu_seconds: Family<JobLabels, F64Gauge>,
    pub job_last_progress: Family<JobLabels, F64Gauge>,
    pub job_scale_events: Family<DirectionLabels, Counter>,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub leader: Gauge,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn ts(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> f64 {
    t.0.as_millisecond() as f64 / 1000.0
}

impl Metrics {
    /// A fresh registry with every metric registered under the `sluice` prefix.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("sluice");
        let m = Self {
            job_requests: Family::default(),
            job_shards: Family::default(),
            job_workers: Family::default(),
            job_throughput_rps: Family::default(),
            job_throughput_tps: Family::default(),
            job_projected_completion: Family::default(),
            job_deadline: Family::default(),
            job_slack: Family::default(),
            job_sla_status: Family::default(),
            job_phase: Family::default(),
            job_gpu_seconds: Family::default(),
            job_last_progress: Family::default(),
            job_scale_events: Family::default(),
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
            leader: Gauge::default(),
            registry: Arc::new(Registry::default()),
        };
        r.register("job_requests", "Request counts from the plan and the workers' progress records", m.job_requests.clone());
        r.register("job_shards", "Shard counts", m.job_shards.clone());
        r.register("job_workers", "Concurrent workers the scaler wants / pods running", m.job_workers.clone());
        r.register("job_throughput_requests_per_second", "Observed job throughput", m.job_throughput_rps.clone());
        r.register("job_throughput_output_tokens_per_second", "Observed output tokens per second", m.job_throughput_tps.clone());
        r.register("job_projected_completion_timestamp_seconds", "Projected completion (Unix seconds)", m.job_projected_completion.clone());
        r.register("job_deadline_timestamp_seconds", "Effective deadline (Unix seconds)", m.job_deadline.clone());
        r.register("job_slack_seconds", "Deadline minus projected completion (negative = late)", m.job_slack.clone());
        r.register("job_sla_status", "1 for the job's current SLA status, 0 for the others", m.job_sla_status.clone());
        r.register("job_phase", "1 for the job's current phase", m.job_phase.clone());
        r.register("job_gpu_seconds", "GPU-seconds used so far", m.job_gpu_seconds.clone());
        r.register(
            "job_last_progress_timestamp_seconds",
            "Last time the finished request count grew (Unix seconds)",
            m.job_last_progress.clone(),
        );
        r.register("job_scale_events", "Parallelism changes", m.job_scale_events.clone());
        r.register("reconcile", "Reconciles run", m.reconciles.clone());
        r.register("reconcile_errors", "Reconciles that failed", m.reconcile_errors.clone());
        r.register("reconcile_duration_seconds", "Reconcile wall time", m.reconcile_duration.clone());
        r.register("operator_leader", "1 while this replica holds the Lease", m.leader.clone());
        Self { registry: Arc::new(r), ..m }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Start timing a reconcile; the duration is recorded when the guard drops.
    pub fn reconcile_timer(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer { start: Instant::now(), histogram: self.reconcile_duration.clone() }
    }

    /// Count a failed reconcile.
    pub fn reconcile_failed(&self, label: &str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { error: label.to_string() }).inc();
    }

    /// Count a parallelism change.
    pub fn scaled(&self, namespace: &str, job: &str, from: i32, to: i32) {
        let direction = if to > from { "up" } else { "down" };
        self.job_scale_events
            .get_or_create(&DirectionLabels { namespace: namespace.into(), job: job.into(), direction: direction.into() })
            .inc();
    }

    /// Set every per-job gauge from the job's status.
    pub fn set_job(&self, namespace: &str, job: &str, s: &BatchInferenceJobStatus, last_progress: Option<f64>) {
        let jl = JobLabels { namespace: namespace.into(), job: job.into() };
        let st = |state: &str| StateLabels { namespace: namespace.into(), job: job.into(), state: state.into() };
        let pending = (s.requests.total - s.requests.succeeded - s.requests.failed).max(0);
        for (state, v) in REQUEST_STATES.iter().zip([s.requests.total, s.requests.succeeded, s.requests.failed, pending]) {
            self.job_requests.get_or_create(&st(state)).set(v);
        }
        for (state, v) in SHARD_STATES.iter().zip([s.shards.total, s.shards.completed, s.shards.failed, s.shards.active]) {
            self.job_shards.get_or_create(&st(state)).set(i64::from(v));
        }
        for (kind, v) in WORKER_KINDS.iter().zip([s.workers.desired, s.workers.active]) {
            self.job_workers
                .get_or_create(&KindLabels { namespace: namespace.into(), job: job.into(), kind: (*kind).into() })
                .set(i64::from(v));
        }
        self.job_throughput_rps.get_or_create(&jl).set(s.throughput.requests_per_second);
        self.job_throughput_tps.get_or_create(&jl).set(s.throughput.output_tokens_per_second);
        match &s.projected_completion_time {
            Some(t) => {
                self.job_projected_completion.get_or_create(&jl).set(ts(t));
            }
            None => {
                self.job_projected_completion.remove(&jl);
            }
        }
        if let Some(t) = &s.deadline {
            self.job_deadline.get_or_create(&jl).set(ts(t));
        }
        match s.slack_seconds {
            Some(v) => {
                self.job_slack.get_or_create(&jl).set(v as f64);
            }
            None => {
                self.job_slack.remove(&jl);
            }
        }
        for status in SlaStatus::ALL {
            let on = i64::from(s.sla_status == Some(status));
            self.job_sla_status
                .get_or_create(&StatusLabels { namespace: namespace.into(), job: job.into(), status: status.as_str().into() })
                .set(on);
        }
        for phase in JobPhase::ALL {
            let on = i64::from(s.phase == phase);
            self.job_phase
                .get_or_create(&PhaseLabels { namespace: namespace.into(), job: job.into(), phase: phase.as_str().into() })
                .set(on);
        }
        self.job_gpu_seconds.get_or_create(&jl).set(s.gpu_seconds);
        if let Some(t) = last_progress {
            self.job_last_progress.get_or_create(&jl).set(t);
        }
    }

    /// Drop every series of a deleted job.
    pub fn remove_job(&self, namespace: &str, job: &str) {
        let jl = JobLabels { namespace: namespace.into(), job: job.into() };
        let st = |state: &str| StateLabels { namespace: namespace.into(), job: job.into(), state: state.into() };
        for state in REQUEST_STATES {
            self.job_requests.remove(&st(state));
        }
        for state in SHARD_STATES {
            self.job_shards.remove(&st(state));
        }
        for kind in WORKER_KINDS {
            self.job_workers.remove(&KindLabels { namespace: namespace.into(), job: job.into(), kind: kind.into() });
        }
        for f in [
            &self.job_throughput_rps,
            &self.job_throughput_tps,
            &self.job_projected_completion,
            &self.job_deadline,
            &self.job_slack,
            &self.job_gpu_seconds,
            &self.job_last_progress,
        ] {
            f.remove(&jl);
        }
        for status in SlaStatus::ALL {
            self.job_sla_status.remove(&StatusLabels { namespace: namespace.into(), job: job.into(), status: status.as_str().into() });
        }
        for phase in JobPhase::ALL {
            self.job_phase.remove(&PhaseLabels { namespace: namespace.into(), job: job.into(), phase: phase.as_str().into() });
        }
        for direction in ["up", "down"] {
            self.job_scale_events.remove(&DirectionLabels { namespace: namespace.into(), job: job.into(), direction: direction.into() });
        }
    }
}

/// Records the reconcile duration when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operator metric name in docs/metrics.md appears in the exposition.
    #[test]
    fn names_match_the_metrics_contract() {
        let m = Metrics::new();
        let mut s = BatchInferenceJobStatus::default();
        s.requests.total = 10;
        s.requests.succeeded = 4;
        s.slack_seconds = Some(-5);
        s.deadline = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:00:00Z".parse().unwrap()));
        s.projected_completion_time = s.deadline.clone();
        s.sla_status = Some(SlaStatus::AtRisk);
        m.set_job("ns", "j", &s, Some(1.0));
        m.scaled("ns", "j", 1, 3);
        m.reconcile_failed("kube");
        drop(m.reconcile_timer());
        m.leader.set(1);
        let text = m.encode();
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md")).unwrap();
        let operator_part = doc.split("## Worker").next().unwrap();
        let names: Vec<&str> = operator_part.lines().filter_map(|l| l.strip_prefix("| `")).filter_map(|l| l.split('`').next()).collect();
        assert_eq!(names.len(), 17, "{names:?}");
        for name in names {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))
                    || l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name}_bucket"))),
                "missing {name} in\n{text}"
            );
        }
        assert!(text.contains(r#"sluice_job_requests{namespace="ns",job="j",state="pending"} 6"#), "{text}");
        assert!(text.contains(r#"sluice_job_sla_status{namespace="ns",job="j",status="AtRisk"} 1"#));
        assert!(text.contains(r#"sluice_job_scale_events_total{namespace="ns",job="j",direction="up"} 1"#));
        m.remove_job("ns", "j");
        assert!(!m.encode().contains(r#"job="j""#));
    }
}
