//! The operator's end of the pod reports (`sluice_api::report`) for jobs whose storage only
//! their pods can reach: the HTTP handler that receives them and the in-memory table the
//! reconciler reads (plan summary, latest progress record per shard, manifest counts). What must
//! survive a restart is folded into the job's status by the reconciler, not kept here.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sluice_api::output::{ManifestCounts, Usage};
use sluice_api::plan::PlanSummary;
use sluice_api::progress::ShardProgress;
use sluice_api::report::{MAX_REPORT_BYTES, PlanFailure, PodReport};

/// What the pods of one job reported since this operator started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobReports {
    pub plan: Option<PlanSummary>,
    pub plan_failed: Option<(PlanFailure, String)>,
    /// The latest record of each shard (a later attempt's replaces an earlier one's).
    pub progress: BTreeMap<u32, ShardProgress>,
    pub manifest: Option<(String, ManifestCounts, Usage)>,
}

struct Entry {
    token: String,
    shards: Option<u32>,
    reports: JobReports,
}

/// Reports by job (`namespace/name`), accepted only for jobs the reconciler registered with
/// their token, and only while this replica leads.
pub struct ReportHub {
    jobs: Mutex<HashMap<String, Entry>>,
    leader: Arc<AtomicBool>,
}

/// Why a report was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// This replica does not lead (the pod retries and reaches the leader).
    NotLeader,
    /// No such job expects reports here.
    UnknownJob,
    /// Wrong or missing token.
    Unauthorized,
    /// A progress record for a shard outside the plan.
    BadShard(u32),
}

impl ReportHub {
    pub fn new(leader: Arc<AtomicBool>) -> Self {
        Self { jobs: Mutex::new(HashMap::new()), leader }
    }

    /// Expect reports for `key` with `token`; `shards` (once known) bounds the progress table.
    /// A new token (the job was recreated) starts from nothing.
    pub fn register(&self, key: &str, token: &str, shards: Option<u32>) {
        if let Ok(mut jobs) = self.jobs.lock() {
            match jobs.get_mut(key) {
                Some(e) if e.token == token => e.shards = shards.or(e.shards),
                _ => {
                    jobs.insert(key.to_string(), Entry { token: token.to_string(), shards, reports: JobReports::default() });
                }
            }
        }
    }

    /// Stop expecting reports for `key`.
    pub fn forget(&self, key: &str) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.remove(key);
        }
    }

    /// What `key`'s pods reported (for `token`).
    pub fn snapshot(&self, key: &str, token: &str) -> JobReports {
        self.jobs.lock().ok().and_then(|jobs| jobs.get(key).filter(|e| e.token == token).map(|e| e.reports.clone())).unwrap_or_default()
    }

    /// Drop a plan failure once acted on (the next planner pod reports afresh).
    pub fn clear_plan_failure(&self, key: &str) {
        if let Ok(mut jobs) = self.jobs.lock()
            && let Some(e) = jobs.get_mut(key)
        {
            e.reports.plan_failed = None;
        }
    }

    /// Take one report.
    pub fn accept(&self, key: &str, token: &str, report: PodReport) -> Result<(), Refused> {
        if !self.leader.load(Ordering::SeqCst) {
            return Err(Refused::NotLeader);
        }
        let mut jobs = self.jobs.lock().map_err(|_| Refused::UnknownJob)?;
        let entry = jobs.get_mut(key).ok_or(Refused::UnknownJob)?;
        if !constant_time_eq(entry.token.as_bytes(), token.as_bytes()) {
            return Err(Refused::Unauthorized);
        }
        let r = &mut entry.reports;
        match report {
            PodReport::Plan { summary, .. } => {
                entry.shards = Some(summary.shards);
                r.plan = Some(summary);
                r.plan_failed = None;
            }
            PodReport::PlanFailed { failure, message } => r.plan_failed = Some((failure, message)),
            PodReport::Progress { record } => {
                if entry.shards.is_some_and(|n| record.shard >= n) {
                    return Err(Refused::BadShard(record.shard));
                }
                // Keep the newer record of a shard (reports may arrive out of order).
                match r.progress.get(&record.shard) {
                    Some(old) if old.complete && !record.complete => {}
                    Some(old) if old.attempt == record.attempt && old.updated_at > record.updated_at => {}
                    _ => {
                        r.progress.insert(record.shard, record);
                    }
                }
            }
            PodReport::Manifest { uri, requests, usage } => r.manifest = Some((uri, requests, usage)),
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: String) -> Response {
    let body = serde_json::json!({ "error": { "message": message } });
    (status, axum::Json(body)).into_response()
}

/// `POST /v1/jobs/{namespace}/{name}/reports` (body: one JSON [`PodReport`], at most
/// [`MAX_REPORT_BYTES`]; `Authorization: Bearer <token>`).
pub async fn receive(
    State(hub): State<Arc<ReportHub>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if body.len() > MAX_REPORT_BYTES {
        return error(StatusCode::PAYLOAD_TOO_LARGE, format!("a report holds at most {MAX_REPORT_BYTES} bytes"));
    }
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim()
        .to_string();
    let report: PodReport = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a report: {e}")),
    };
    let key = format!("{namespace}/{name}");
    match hub.accept(&key, &token, report) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(Refused::NotLeader) => error(StatusCode::SERVICE_UNAVAILABLE, "this operator replica is not the leader; retry".into()),
        Err(Refused::UnknownJob) => error(StatusCode::NOT_FOUND, format!("no job {key} expects reports here (yet); retry")),
        Err(Refused::Unauthorized) => error(StatusCode::UNAUTHORIZED, format!("wrong report token for {key}")),
        Err(Refused::BadShard(s)) => error(StatusCode::BAD_REQUEST, format!("shard {s} is not in the plan of {key}")),
    }
}

/// The report routes, to merge into the operator's HTTP server.
pub fn router(hub: Arc<ReportHub>) -> axum::Router {
    axum::Router::new()
        .route("/v1/jobs/{namespace}/{name}/reports", axum::routing::post(receive))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REPORT_BYTES + 1024))
        .with_state(hub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    fn record(shard: u32, attempt: &str, done: u64, complete: bool, updated: i64) -> ShardProgress {
        let t = Timestamp::from_second(updated).unwrap();
        ShardProgress {
            shard,
            attempt: attempt.into(),
            lines_total: 10,
            lines_done: done,
            succeeded: done,
            failed: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            started_at: t,
            updated_at: t,
            ready_at: Some(t),
            requests_per_second: 1.0,
            output_tokens_per_second: 1.0,
            complete,
        }
    }

    #[test]
    fn reports_need_the_leader_a_registered_job_and_its_token() {
        let leader = Arc::new(AtomicBool::new(false));
        let hub = ReportHub::new(leader.clone());
        let plan = || PodReport::Plan { summary: PlanSummary { line_count: 20, requests_per_shard: 10, shards: 2 }, created: true };
        assert_eq!(hub.accept("ns/a", "t", plan()), Err(Refused::NotLeader));
        leader.store(true, Ordering::SeqCst);
        assert_eq!(hub.accept("ns/a", "t", plan()), Err(Refused::UnknownJob));
        hub.register("ns/a", "t", None);
        assert_eq!(hub.accept("ns/a", "wrong", plan()), Err(Refused::Unauthorized));
        hub.accept("ns/a", "t", plan()).unwrap();
        assert_eq!(hub.snapshot("ns/a", "t").plan.unwrap().shards, 2);
        assert_eq!(hub.snapshot("ns/a", "other"), JobReports::default());
        // Shards outside the plan are refused; the newest record of a shard wins; a final record
        // is never replaced by a late intermediate one.
        let p = |r| PodReport::Progress { record: r };
        assert_eq!(hub.accept("ns/a", "t", p(record(2, "x", 1, false, 10))), Err(Refused::BadShard(2)));
        hub.accept("ns/a", "t", p(record(0, "x", 5, false, 20))).unwrap();
        hub.accept("ns/a", "t", p(record(0, "x", 3, false, 10))).unwrap();
        assert_eq!(hub.snapshot("ns/a", "t").progress[&0].lines_done, 5);
        hub.accept("ns/a", "t", p(record(0, "x", 10, true, 30))).unwrap();
        hub.accept("ns/a", "t", p(record(0, "y", 2, false, 40))).unwrap();
        assert!(hub.snapshot("ns/a", "t").progress[&0].complete);
        // Re-registering with a new token (the job was recreated) starts over.
        hub.register("ns/a", "t2", None);
        assert_eq!(hub.snapshot("ns/a", "t2"), JobReports::default());
        hub.forget("ns/a");
        assert_eq!(hub.accept("ns/a", "t2", plan()), Err(Refused::UnknownJob));
    }
}
