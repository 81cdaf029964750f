//! The report path of jobs whose storage only their pods can reach, without a cluster: the
//! worker's real `plan` and `finalize` steps POST to the operator's real report endpoint, and the
//! operator's table holds what they said; refusals (wrong token, unknown job, standby replica)
//! are HTTP errors the worker sees, and a missing input is reported as such.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use sluice_api::contract::exit;
use sluice_api::report::{PlanFailure, PodReport, report_path};
use sluice_operator::reports::{self, ReportHub};
use sluice_worker::cli::Args;
use sluice_worker::report::ReportClient;
use sluice_worker::steps;

async fn serve(hub: Arc<ReportHub>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, reports::router(hub)).await });
    format!("http://{addr}")
}

fn args(dir: &std::path::Path, step: &str, input: &str) -> Args {
    Args::try_parse_from([
        "sluice-worker",
        step,
        &format!("--output=file://{}/out", dir.display()),
        "--model=/unused",
        &format!("--input={input}"),
        "--requests-per-shard=2",
        "--metrics-addr=none",
    ])
    .unwrap()
}

#[tokio::test]
async fn plan_and_finalize_pods_report_to_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"id\":\"a\",\"prompt\":\"x\"}\n{\"id\":\"b\",\"prompt\":\"y\"}\n{\"id\":\"c\",\"prompt\":\"z\"}\n").unwrap();
    let leader = Arc::new(AtomicBool::new(true));
    let hub = Arc::new(ReportHub::new(leader.clone()));
    let base = serve(hub.clone()).await;
    let url = format!("{base}{}", report_path("ns", "job"));
    let client = ReportClient::new(Some(&url), Some("uid-1")).unwrap().unwrap();

    // Not registered yet (an operator that just restarted): 404, which the pod retries.
    let input_uri = format!("file://{}", input.display());
    let err = client.send(&PodReport::PlanFailed { failure: PlanFailure::Permanent, message: "x".into() }, 1).await.unwrap_err();
    assert!(err.contains("404"), "{err}");
    hub.register("ns/job", "uid-1", None);
    assert_eq!(steps::plan(&args(dir.path(), "plan", &input_uri), Some(&client)).await, exit::SUCCESS);
    let got = hub.snapshot("ns/job", "uid-1").plan.expect("the plan summary");
    assert_eq!((got.line_count, got.shards, got.requests_per_shard), (3, 2, 2));
    assert!(dir.path().join("out/_sluice/plan.json").exists());

    // A wrong token is refused and not retried.
    let wrong = ReportClient::new(Some(&url), Some("nope")).unwrap().unwrap();
    let err = wrong.send(&PodReport::PlanFailed { failure: PlanFailure::Permanent, message: "x".into() }, 3).await.unwrap_err();
    assert!(err.contains("401"), "{err}");

    // A standby replica answers 503.
    leader.store(false, Ordering::SeqCst);
    let err = client.send(&PodReport::PlanFailed { failure: PlanFailure::Permanent, message: "x".into() }, 1).await.unwrap_err();
    assert!(err.contains("503"), "{err}");
    leader.store(true, Ordering::SeqCst);

    // A missing input: reported as such, exit 3 (the operator holds the job and plans later).
    let missing = format!("file://{}/nope.jsonl", dir.path().display());
    let other = tempfile::tempdir().unwrap();
    assert_eq!(steps::plan(&args(other.path(), "plan", &missing), Some(&client)).await, exit::PERMANENT);
    let (failure, message) = hub.snapshot("ns/job", "uid-1").plan_failed.expect("a plan failure");
    assert_eq!(failure, PlanFailure::InputNotFound);
    assert!(message.contains("nope.jsonl"), "{message}");

    // Finalize with nothing committed and both shards failed within the tolerance: the manifest
    // counts every line as failed, and its counts reach the operator.
    let mut fin = args(dir.path(), "finalize", &input_uri);
    fin.failed_shards = Some("0-1".into());
    assert_eq!(steps::finalize(&fin, Some(&client)).await, exit::SUCCESS);
    let (uri, counts, _) = hub.snapshot("ns/job", "uid-1").manifest.expect("the manifest report");
    assert!(uri.ends_with("/out/manifest.json"), "{uri}");
    assert_eq!((counts.total, counts.succeeded, counts.failed), (3, 0, 3));
    assert!(dir.path().join("out/manifest.json").exists());
    // Finalize again: the manifest is written once and reported again.
    assert_eq!(steps::finalize(&fin, Some(&client)).await, exit::SUCCESS);

    // Finalize without a plan: a permanent error naming where it looked.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(steps::finalize(&args(empty.path(), "finalize", &input_uri), Some(&client)).await, exit::PERMANENT);
}
