//! What a job's pods report to the operator when only they can reach the job's storage: the
//! planner pod's plan summary (or why it could not plan), each worker's progress record, and the
//! finalize pod's manifest counts. Pure data; POSTed as JSON to `SLUICE_REPORT_URL` with
//! `Authorization: Bearer $SLUICE_REPORT_TOKEN`. See docs/design.md ("Storage only the pods can
//! reach").

use serde::{Deserialize, Serialize};

use crate::output::{ManifestCounts, Usage};
use crate::plan::PlanSummary;
use crate::progress::ShardProgress;

/// Largest report body the operator accepts, in bytes.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// The path of a job's report endpoint under the operator's report URL.
pub fn report_path(namespace: &str, name: &str) -> String {
    format!("/v1/jobs/{namespace}/{name}/reports")
}

/// Why a planner pod could not plan.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PlanFailure {
    /// The input does not exist (yet): the operator holds the job and plans again later.
    InputNotFound,
    /// Retrying cannot help (the input changed since planning, too many shards, a bad plan).
    Permanent,
}

/// One report from a pod of the job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum PodReport {
    /// The plan is written (or was already there): its size.
    #[serde(rename_all = "camelCase")]
    Plan { summary: PlanSummary, created: bool },
    /// Planning failed.
    #[serde(rename_all = "camelCase")]
    PlanFailed { failure: PlanFailure, message: String },
    /// A worker's progress record (the same record it writes to storage).
    #[serde(rename_all = "camelCase")]
    Progress { record: ShardProgress },
    /// The manifest is written: where, and its counts.
    #[serde(rename_all = "camelCase")]
    Manifest { uri: String, requests: ManifestCounts, usage: Usage },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_with_a_kind_tag() {
        let r = PodReport::Plan { summary: PlanSummary { line_count: 10, requests_per_shard: 5, shards: 2 }, created: true };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "plan");
        assert_eq!(v["summary"]["lineCount"], 10);
        assert_eq!(serde_json::from_value::<PodReport>(v).unwrap(), r);
        let f = PodReport::PlanFailed { failure: PlanFailure::InputNotFound, message: "x".into() };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!((v["kind"].as_str(), v["failure"].as_str()), (Some("planFailed"), Some("inputNotFound")));
        assert_eq!(report_path("ns", "job"), "/v1/jobs/ns/job/reports");
    }
}
