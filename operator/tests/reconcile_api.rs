//! Mocked-API tests of the reconciler (the controller-rs `ApiServerVerifier` pattern over
//! `tower_test::mock`): each scenario runs one reconcile against a fake API server that answers
//! from the scenario's objects, and asserts the exact requests made, in order, and their bodies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::{Value, json};
use sluice_api::BatchInferenceJob;
use sluice_api::contract::layout;
use sluice_api::output::OutputManifest;
use sluice_api::progress::ShardProgress;
use sluice_operator::context::{Config, Context};
use sluice_operator::job_builder::WorkerDefaults;
use sluice_operator::metrics::Metrics;
use sluice_operator::reconcile::reconcile;
use sluice_operator::storage_io::SharedStoreOpener;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const T0: &str = "2026-03-01T12:00:00Z";

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn at(secs: i64) -> Timestamp {
    ts(T0).checked_add(jiff::SignedDuration::from_secs(secs)).unwrap()
}

/// The API server's state for one scenario.
#[derive(Clone, Default)]
struct Cluster {
    bij: Value,
    job: Option<Value>,
    pods: Vec<Value>,
    /// The plan and finalize Jobs of a job whose storage only its pods reach, by name.
    step_jobs: std::collections::BTreeMap<String, Value>,
    /// Other BatchInferenceJobs in the cluster (listed by the fleet under a GpuBudget).
    others: Vec<Value>,
}

/// One request the reconciler made.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

impl Call {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder().status(status).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap()
}

fn not_found(what: &str) -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

/// Answer every request from `cluster` until the client goes away, recording each one.
async fn api_server(mut handle: Handle, cluster: Cluster) -> Vec<Call> {
    let mut calls = Vec::new();
    while let Ok(Some((req, send))) = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        let call = Call { method: method.clone(), path: path.clone(), query, content_type, body: body.clone() };
        calls.push(call);
        let resp = match (method.as_str(), path.as_str()) {
            ("GET", p) if p.starts_with(STEP_JOBS_PREFIX) => match cluster.step_jobs.get(&p[JOBS_PREFIX.len()..]) {
                Some(j) => respond(StatusCode::OK, j),
                None => not_found("jobs.batch"),
            },
            ("DELETE", p) if p.starts_with(STEP_JOBS_PREFIX) => {
                respond(StatusCode::OK, &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}))
            }
            ("GET", p) if p.starts_with("/apis/batch/v1/namespaces/default/jobs/") => match &cluster.job {
                Some(j) => respond(StatusCode::OK, j),
                None => not_found("jobs.batch"),
            },
            ("GET", "/api/v1/namespaces/default/pods") => {
                respond(StatusCode::OK, &json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": cluster.pods}))
            }
            ("PATCH", p) if p.starts_with("/apis/batch/v1/namespaces/default/jobs/") => {
                let mut job = cluster.job.clone().unwrap_or_else(|| body.clone());
                merge(&mut job, &body);
                respond(StatusCode::OK, &job)
            }
            ("GET", "/apis/sluice.dev/v1alpha1/batchinferencejobs") => {
                let items: Vec<Value> = std::iter::once(cluster.bij.clone()).chain(cluster.others.iter().cloned()).collect();
                respond(
                    StatusCode::OK,
                    &json!({"kind": "BatchInferenceJobList", "apiVersion": "sluice.dev/v1alpha1", "metadata": {}, "items": items}),
                )
            }
            ("PATCH", p) if p.starts_with("/apis/sluice.dev/v1alpha1/gpubudgets/") => {
                let mut b =
                    json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "GpuBudget", "metadata": {"name": "fleet"}, "spec": {"gpus": 2}});
                b["status"] = body["status"].clone();
                respond(StatusCode::OK, &b)
            }
            ("PATCH", p) if p.ends_with("/status") => {
                let mut bij = cluster.bij.clone();
                bij["status"] = body["status"].clone();
                respond(StatusCode::OK, &bij)
            }
            ("PATCH", p) if p.starts_with("/apis/sluice.dev/") => respond(StatusCode::OK, &cluster.bij),
            ("POST", "/apis/events.k8s.io/v1/namespaces/default/events") => respond(StatusCode::CREATED, &body),
            ("GET", p) if p.starts_with(CONFIGMAPS_PATH) => match configmap(&p[CONFIGMAPS_PATH.len()..]) {
                Some(cm) => respond(StatusCode::OK, &cm),
                None => not_found("configmaps"),
            },
            ("POST", "/api/v1/namespaces/default/configmaps") => respond(StatusCode::CREATED, &body),
            (m, p) => panic!("unexpected request {m} {p}"),
        };
        send.send_response(resp);
    }
    calls
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

struct Harness {
    store: Arc<InMemory>,
    now: Timestamp,
    /// The operator's `--report-url` (jobs whose storage only their pods reach need one).
    report_url: Option<String>,
}

impl Harness {
    fn new(now: Timestamp) -> Self {
        Self { store: Arc::new(InMemory::new()), now, report_url: None }
    }

    async fn put(&self, path: &str, bytes: Vec<u8>) {
        self.store.put(&Path::from(path), PutPayload::from(bytes)).await.unwrap();
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Option<T> {
        let r = self.store.get(&Path::from(path)).await.ok()?;
        Some(serde_json::from_slice(&r.bytes().await.unwrap()).unwrap())
    }

    fn context(&self, client: Client, leader: bool) -> Arc<Context> {
        let now = self.now;
        let stores: Arc<dyn sluice_operator::storage_io::StoreOpener> =
            Arc::new(SharedStoreOpener { store: self.store.clone() as Arc<dyn ObjectStore> });
        let worker = WorkerDefaults { image: "sluice-worker:test".into(), report_url: self.report_url.clone(), ..Default::default() };
        let config = Config { worker, ..Config::default() };
        Arc::new(Context::new(client, Metrics::new(), config, stores, Arc::new(move || now), Arc::new(AtomicBool::new(leader))))
    }

    /// Run one reconcile of `cluster.bij` with a fresh context; return the result and the calls.
    async fn run(&self, cluster: Cluster) -> (Result<Action, String>, Vec<Call>) {
        let ctx = self.context_for_run();
        self.run_with(ctx, cluster).await
    }

    fn context_for_run(&self) -> (Arc<Context>, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (self.context(Client::new(service, "default"), true), handle)
    }

    async fn run_with(&self, (ctx, handle): (Arc<Context>, Handle), cluster: Cluster) -> (Result<Action, String>, Vec<Call>) {
        let guard: DeserializeGuard<BatchInferenceJob> = serde_json::from_value(cluster.bij.clone()).unwrap();
        let server = tokio::spawn(api_server(handle, cluster));
        let result = reconcile(Arc::new(guard), ctx).await.map_err(|e| e.to_string());
        // Dropping the context drops the client: the server sees the end and returns its log.
        let calls = server.await.unwrap();
        (result, calls)
    }
}

/// Five OpenAI-style lines; `requestsPerShard: 2` makes three shards.
fn input_lines(n: usize) -> Vec<u8> {
    (0..n).map(|i| format!("{{\"custom_id\":\"r{i}\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{{\"messages\":[{{\"role\":\"user\",\"content\":\"hi {i}\"}}]}}}}\n")).collect::<String>().into_bytes()
}

fn bij(extra_spec: Value, status: Option<Value>) -> Value {
    let mut spec = json!({
        "model": {"uri": "mem://models/tiny"},
        "input": {"uri": "mem://data/in.jsonl", "format": "openai"},
        "output": {"uri": "mem://data/out"},
        "sampling": {"maxTokens": 16},
        "sla": {"completionWindow": "10m", "margin": 0.1},
        "workers": {"min": 1, "max": 4, "gpus": 0},
        "sharding": {"requestsPerShard": 2},
    });
    merge(&mut spec, &extra_spec);
    let mut v = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "BatchInferenceJob",
        "metadata": {
            "name": "quickstart",
            "namespace": "default",
            "uid": "0b5e6f7a-1111-4222-8333-444455556666",
            "generation": 1,
            "resourceVersion": "100",
            "creationTimestamp": T0,
            "finalizers": ["sluice.dev/cleanup"],
        },
        "spec": spec,
    });
    if let Some(s) = status {
        v["status"] = s;
    }
    v
}

fn lines(calls: &[Call]) -> Vec<String> {
    calls.iter().map(Call::line).collect()
}

const BIJ_PATH: &str = "/apis/sluice.dev/v1alpha1/namespaces/default/batchinferencejobs/quickstart";
const STATUS_PATH: &str = "/apis/sluice.dev/v1alpha1/namespaces/default/batchinferencejobs/quickstart/status";
const JOB_PATH: &str = "/apis/batch/v1/namespaces/default/jobs/quickstart";
const PODS_PATH: &str = "/api/v1/namespaces/default/pods";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

fn get(p: &str) -> String {
    format!("GET {p}")
}
fn patch(p: &str) -> String {
    format!("PATCH {p}")
}
fn event() -> String {
    format!("POST {EVENTS_PATH}")
}

fn reasons(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.method == "POST" && c.path == EVENTS_PATH)
        .map(|c| c.body["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

fn last_status(calls: &[Call]) -> Value {
    calls.iter().rev().find(|c| c.path == STATUS_PATH).map(|c| c.body["status"].clone()).expect("a status patch")
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// The Job the API server would hold after our apply, with a status.
fn job_from_apply(applied: &Value, job_status: Value) -> Value {
    let mut job = applied.clone();
    job["metadata"]["resourceVersion"] = json!("200");
    job["metadata"]["uid"] = json!("aaaaaaaa-0000-4000-8000-000000000001");
    job["status"] = job_status;
    job
}

fn progress(shard: u32, lines_total: u64, done: u64, complete: bool, started: i64, updated: i64, rps: f64) -> ShardProgress {
    ShardProgress {
        shard,
        attempt: format!("quickstart-{shard}-abcde"),
        lines_total,
        lines_done: done,
        succeeded: done,
        failed: 0,
        prompt_tokens: done * 20,
        completion_tokens: done * 10,
        started_at: at(started),
        updated_at: at(updated),
        ready_at: Some(at(started + 20)),
        requests_per_second: rps,
        output_tokens_per_second: rps * 10.0,
        complete,
    }
}

async fn seed_input(h: &Harness, n: usize) {
    h.put("data/in.jsonl", input_lines(n)).await;
}

async fn seed_progress(h: &Harness, p: &ShardProgress) {
    h.put(&format!("data/out/{}", layout::progress(p.shard)), serde_json::to_vec(p).unwrap()).await;
}

/// First reconcile, then the state the API server would hold afterwards.
async fn first_reconcile(h: &Harness) -> (Vec<Call>, Value, Value) {
    let cluster = Cluster { bij: bij(json!({}), None), ..Default::default() };
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(30)));
    let applied = calls.iter().find(|c| c.path == JOB_PATH && c.method == "PATCH").expect("a Job apply").body.clone();
    let status = last_status(&calls);
    (calls, applied, status)
}

#[tokio::test]
async fn first_reconcile_plans_creates_the_job_and_writes_status() {
    let h = Harness::new(at(10));
    seed_input(&h, 5).await;
    let (calls, applied, status) = first_reconcile(&h).await;
    assert_eq!(lines(&calls), [patch(STATUS_PATH), event(), get(JOB_PATH), patch(JOB_PATH), event(), patch(STATUS_PATH)], "{calls:#?}");
    assert_eq!(reasons(&calls), ["Planned", "JobCreated"]);
    // Planning status first.
    assert_eq!(calls[0].body["status"]["phase"], "Planning");
    assert!(calls[0].query.contains("fieldManager=sluice-operator") && calls[0].query.contains("force=true"), "{}", calls[0].query);
    assert_eq!(calls[0].content_type, "application/apply-patch+yaml");
    // The plan is in storage.
    let plan: sluice_api::plan::ShardPlan = h.get_json("data/out/_sluice/plan.json").await.unwrap();
    assert_eq!((plan.line_count, plan.shards.len()), (5, 3));
    // The Job: server-side apply with our field manager, Indexed over the three shards.
    let job_call = &calls[3];
    assert_eq!(job_call.content_type, "application/apply-patch+yaml");
    assert!(job_call.query.contains("fieldManager=sluice-operator"));
    assert_eq!(applied["spec"]["completionMode"], "Indexed");
    assert_eq!(applied["spec"]["completions"], 3);
    assert_eq!(applied["spec"]["suspend"], false);
    assert_eq!(applied["metadata"]["ownerReferences"][0]["uid"], "0b5e6f7a-1111-4222-8333-444455556666");
    let parallelism = applied["spec"]["parallelism"].as_i64().unwrap();
    assert!((1..=3).contains(&parallelism), "{parallelism}");
    // Status: Running, counts, display columns, conditions with the generation.
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["progress"], "0/5");
    assert_eq!(status["shards"]["total"], 3);
    assert_eq!(status["requests"]["total"], 5);
    assert_eq!(status["workers"]["desired"], parallelism);
    assert_eq!(status["workers"]["display"], format!("0/{parallelism}"));
    assert_eq!(status["throughput"]["display"], "0.00/s");
    assert_eq!(status["deadline"], "2026-03-01T12:10:00Z");
    assert!(status["projectedCompletionTime"].is_string());
    assert!(status["slaStatus"].is_string());
    assert_eq!(status["observedGeneration"], 1);
    let admitted = condition(&status, "Admitted");
    assert_eq!((admitted["status"].as_str(), admitted["observedGeneration"].as_i64()), (Some("True"), Some(1)));
    assert_eq!(condition(&status, "Progressing")["status"], "True");
    assert_eq!(condition(&status, "Suspended")["status"], "False");
}

#[tokio::test]
async fn a_resync_with_no_change_makes_no_writes() {
    let h = Harness::new(at(10));
    seed_input(&h, 5).await;
    let (_, applied, status) = first_reconcile(&h).await;
    let cluster = Cluster {
        bij: bij(json!({}), Some(status.clone())),
        job: Some(job_from_apply(&applied, json!({"active": 0, "ready": 0}))),
        ..Default::default()
    };
    // A fresh context (as after a restart): the plan is re-read from storage, not re-planned.
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(30)));
    if let Some(c) = calls.iter().find(|c| c.path == STATUS_PATH) {
        assert_eq!(serde_json::to_string_pretty(&c.body["status"]).unwrap(), serde_json::to_string_pretty(&status).unwrap());
    }
    assert_eq!(lines(&calls), [get(JOB_PATH), get(PODS_PATH)], "{calls:#?}");
    assert!(calls[1].query.contains("labelSelector=sluice.dev%2Fjob%3Dquickstart"), "{}", calls[1].query);
}

#[tokio::test]
async fn slow_progress_scales_up_with_an_event() {
    // 600 requests in 3 shards of 200; one worker has done 30 in 60 s: 0.5 req/s. Five minutes
    // in, a single worker cannot finish 570 requests in the 4 minutes left before the target.
    let h = Harness::new(at(300));
    seed_input(&h, 600).await;
    let spec = json!({"sharding": {"requestsPerShard": 200}});
    let (_, applied, _) = {
        let cluster = Cluster { bij: bij(spec.clone(), None), ..Default::default() };
        let h0 = Harness { store: h.store.clone(), now: at(5), report_url: None };
        let (result, calls) = h0.run(cluster).await;
        result.unwrap();
        let applied = calls.iter().find(|c| c.path == JOB_PATH && c.method == "PATCH").unwrap().body.clone();
        (calls.clone(), applied, last_status(&calls))
    };
    let mut job = job_from_apply(&applied, json!({"active": 1, "ready": 1}));
    job["spec"]["parallelism"] = json!(1);
    seed_progress(&h, &progress(0, 200, 30, false, 220, 295, 0.5)).await;
    let status = json!({"phase": "Running", "observedGeneration": 1, "slaStatus": "OnTrack", "requests": {"total": 600, "succeeded": 0, "failed": 0}});
    let cluster = Cluster { bij: bij(spec, Some(status)), job: Some(job), pods: vec![], ..Default::default() };
    let (result, calls) = h.run(cluster).await;
    result.unwrap();
    let l = lines(&calls);
    assert_eq!(&l[..3], [get(JOB_PATH), get(PODS_PATH), patch(JOB_PATH)], "{calls:#?}");
    assert_eq!(l.last(), Some(&patch(STATUS_PATH)));
    let scale = &calls[2];
    assert_eq!(scale.content_type, "application/merge-patch+json");
    let to = scale.body["spec"]["parallelism"].as_i64().unwrap();
    assert!(to > 1 && to <= 3, "{scale:?}");
    assert!(scale.body["metadata"]["annotations"]["sluice.dev/last-scale-time"].is_string());
    let scaled = calls.iter().find(|c| c.method == "POST" && c.body["reason"] == "Scaled").expect("a Scaled event");
    let note = scaled.body["note"].as_str().unwrap();
    assert!(note.starts_with(&format!("scaled 1→{to}: ")), "{note}");
    let status = last_status(&calls);
    assert_eq!(status["workers"]["desired"], to);
    assert_eq!(status["workers"]["display"], format!("1/{to}"));
    assert_eq!(status["progress"], "30/600");
    // The job's rate over its 60 s since the worker was ready: 30 committed lines plus 5 s at
    // the record's 0.5/s since its last update.
    assert_eq!(status["throughput"]["requestsPerSecond"], 0.542);
    assert_eq!(status["throughput"]["perWorkerRequestsPerSecond"], 0.5);
}

/// Under a GpuBudget of 2 GPUs with another job holding 1, the job that alone would scale up
/// gets 1 worker, says why in `status.fleet` and an Event, and the budget's status counts both.
#[tokio::test]
async fn a_gpu_budget_caps_the_scale_up_and_says_why() {
    let h = Harness::new(at(300));
    seed_input(&h, 600).await;
    let spec = json!({"sharding": {"requestsPerShard": 200}});
    let applied = {
        let cluster = Cluster { bij: bij(spec.clone(), None), ..Default::default() };
        let h0 = Harness { store: h.store.clone(), now: at(5), report_url: None };
        let (result, calls) = h0.run(cluster).await;
        result.unwrap();
        calls.iter().find(|c| c.path == JOB_PATH && c.method == "PATCH").unwrap().body.clone()
    };
    let mut job = job_from_apply(&applied, json!({"active": 1, "ready": 1}));
    job["spec"]["parallelism"] = json!(1);
    seed_progress(&h, &progress(0, 200, 30, false, 220, 295, 0.5)).await;
    let status = json!({"phase": "Running", "observedGeneration": 1, "slaStatus": "OnTrack", "requests": {"total": 600, "succeeded": 0, "failed": 0}});
    let mut other = bij(
        json!({"sla": {"completionWindow": "24h"}}),
        Some(json!({
            "phase": "Running", "requests": {"total": 100, "succeeded": 0, "failed": 0},
            "shards": {"total": 10, "completed": 0, "failed": 0, "active": 1}, "workers": {"desired": 1, "active": 1},
        })),
    );
    other["metadata"]["name"] = json!("nightly");
    let cluster = Cluster { bij: bij(spec, Some(status)), job: Some(job), others: vec![other], ..Default::default() };
    let (ctx, handle) = h.context_for_run();
    let (budgets, mut writer) = kube::runtime::reflector::store::<sluice_api::GpuBudget>();
    let budget: sluice_api::GpuBudget = serde_json::from_value(
        json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "GpuBudget", "metadata": {"name": "fleet"}, "spec": {"gpus": 2}}),
    )
    .unwrap();
    writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(budget));
    ctx.set_budget_store(budgets);
    let (result, calls) = h.run_with((ctx, handle), cluster).await;
    result.unwrap();
    // No scale-up past the budget: 1 held by the other job, 1 here.
    assert!(calls.iter().all(|c| !(c.path == JOB_PATH && c.method == "PATCH")), "{calls:#?}");
    let status = last_status(&calls);
    assert_eq!(status["workers"]["desired"], 1);
    let fleet = &status["fleet"];
    assert_eq!((fleet["budget"].as_str(), fleet["workers"].as_i64()), (Some("fleet"), Some(1)), "{fleet}");
    assert!(matches!(fleet["reason"].as_str(), Some("Waiting" | "Infeasible")), "{fleet}");
    assert!(!fleet["message"].as_str().unwrap().is_empty(), "{fleet}");
    assert!(fleet["quote"]["basis"].as_str().unwrap().starts_with("measured"), "{fleet}");
    assert!(reasons(&calls).iter().any(|r| r == "FleetWaiting" || r == "FleetInfeasible"), "{:?}", reasons(&calls));
    let budget_status = calls.iter().find(|c| c.path == "/apis/sluice.dev/v1alpha1/gpubudgets/fleet/status").expect("the budget's status");
    assert_eq!(budget_status.body["status"]["heldGpus"], 2);
    assert_eq!(budget_status.body["status"]["jobs"], 2);
}

#[tokio::test]
async fn all_shards_committed_writes_the_manifest_and_completes() {
    let h = Harness::new(at(10));
    seed_input(&h, 5).await;
    let (_, applied, status) = first_reconcile(&h).await;
    for (i, n) in [(0u32, 2u64), (1, 2), (2, 1)] {
        seed_progress(&h, &progress(i, n, n, true, 20, 200 + i64::from(i), 0.1)).await;
    }
    let h = Harness { store: h.store.clone(), now: at(240), report_url: None };
    let job = job_from_apply(&applied, json!({"active": 0, "succeeded": 3, "completedIndexes": "0-2"}));
    let cluster = Cluster { bij: bij(json!({}), Some(status)), job: Some(job), pods: vec![], ..Default::default() };
    let (result, calls) = h.run(cluster.clone()).await;
    assert_eq!(result.unwrap(), Action::await_change());
    // The finished job's throughput is learned into its model's profile (a ConfigMap made here).
    let profiles = format!("{CONFIGMAPS_PATH}sluice-throughput-profiles");
    assert_eq!(
        lines(&calls),
        [get(JOB_PATH), get(PODS_PATH), event(), patch(STATUS_PATH), get(&profiles), "POST /api/v1/namespaces/default/configmaps".into()],
        "{calls:#?}"
    );
    assert_eq!(reasons(&calls), ["Completed"]);
    let cm = &calls[5].body;
    assert_eq!(cm["metadata"]["name"], "sluice-throughput-profiles");
    let (key, value) = cm["data"].as_object().unwrap().iter().next().unwrap();
    assert!(key.starts_with("tiny.cpu."), "{key}");
    let learned: sluice_api::budget::ThroughputProfile = serde_json::from_str(value.as_str().unwrap()).unwrap();
    assert_eq!((learned.model.as_str(), learned.jobs), ("mem://models/tiny", 1));
    assert!(learned.per_worker_requests_per_second > 0.0, "{learned:?}");
    let manifest: OutputManifest = h.get_json("data/out/manifest.json").await.expect("manifest.json");
    assert_eq!((manifest.requests.total, manifest.requests.succeeded, manifest.requests.failed), (5, 5, 0));
    assert_eq!(manifest.shards.len(), 3);
    assert_eq!(manifest.shards[2].results, "results/00002.jsonl");
    assert_eq!((manifest.usage.prompt_tokens, manifest.usage.completion_tokens), (100, 50));
    assert_eq!(manifest.job, "default/quickstart");
    let status = last_status(&calls);
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(status["slaStatus"], "Met");
    assert_eq!(status["progress"], "5/5");
    assert_eq!(status["manifestUri"], "mem://data/out/manifest.json");
    assert_eq!(status["completionTime"], "2026-03-01T12:04:00Z");
    assert_eq!(status["workers"]["display"], "0/0");
    assert_eq!(condition(&status, "Complete")["status"], "True");
    assert_eq!(condition(&status, "Progressing")["status"], "False");

    // Once Succeeded, a resync reads nothing and writes nothing.
    let done = Cluster { bij: bij(json!({}), Some(status)), ..cluster };
    let (result, calls) = h.run(done).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(calls.is_empty(), "{calls:#?}");
}

#[tokio::test]
async fn too_many_failed_shards_fail_the_job_with_the_reason() {
    let h = Harness::new(at(10));
    seed_input(&h, 5).await;
    let (_, applied, status) = first_reconcile(&h).await;
    let job = job_from_apply(&applied, json!({"active": 1, "failedIndexes": "1", "completedIndexes": "0"}));
    let cluster = Cluster { bij: bij(json!({}), Some(status)), job: Some(job), pods: vec![], ..Default::default() };
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(reasons(&calls), ["Failed"]);
    let status = last_status(&calls);
    assert_eq!(status["phase"], "Failed");
    let failed = condition(&status, "Failed");
    assert_eq!(failed["status"], "True");
    let msg = failed["message"].as_str().unwrap();
    assert!(msg.contains("1 shards failed") && msg.contains("maxFailedShards=0"), "{msg}");
}

#[tokio::test]
async fn suspend_pauses_the_job_and_resume_restarts_it() {
    let h = Harness::new(at(10));
    seed_input(&h, 5).await;
    let (_, applied, status) = first_reconcile(&h).await;
    let parallelism = applied["spec"]["parallelism"].clone();

    let mut suspended = bij(json!({"suspend": true}), Some(status.clone()));
    suspended["metadata"]["generation"] = json!(2);
    let job = job_from_apply(&applied, json!({"active": 1, "ready": 1}));
    let cluster = Cluster { bij: suspended, job: Some(job.clone()), pods: vec![], ..Default::default() };
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    assert_eq!(reasons(&calls), ["SpecUpdated", "Suspended"]);
    assert_eq!(lines(&calls), [get(JOB_PATH), get(PODS_PATH), event(), patch(JOB_PATH), event(), patch(STATUS_PATH)], "{calls:#?}");
    assert_eq!(calls[3].body, json!({"spec": {"suspend": true}}));
    let status2 = last_status(&calls);
    assert_eq!(status2["phase"], "Suspended");
    assert_eq!(status2["observedGeneration"], 2);
    assert_eq!(condition(&status2, "Suspended")["status"], "True");
    assert_eq!(condition(&status2, "Progressing")["reason"], "Suspended");

    // Resume.
    let mut resumed = bij(json!({"suspend": false}), Some(status2));
    resumed["metadata"]["generation"] = json!(3);
    let mut job = job;
    job["spec"]["suspend"] = json!(true);
    job["status"] = json!({"active": 0});
    let (result, calls) = h.run(Cluster { bij: resumed, job: Some(job), pods: vec![], ..Default::default() }).await;
    result.unwrap();
    let resume = calls.iter().find(|c| c.path == JOB_PATH && c.method == "PATCH").expect("a resume patch");
    assert_eq!(resume.body["spec"]["suspend"], false);
    assert!(resume.body["spec"].get("parallelism").is_none_or(|p| *p == parallelism));
    assert!(reasons(&calls).contains(&"Resumed".to_string()));
    let status3 = last_status(&calls);
    assert_eq!(status3["phase"], "Running");
    assert_eq!(condition(&status3, "Suspended")["status"], "False");
}

#[tokio::test]
async fn deletion_removes_only_the_finalizer() {
    let h = Harness::new(at(10));
    let mut deleting = bij(json!({}), Some(json!({"phase": "Running"})));
    deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T12:00:09Z");
    let (result, calls) = h.run(Cluster { bij: deleting, ..Default::default() }).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(lines(&calls), [event(), patch(BIJ_PATH)], "{calls:#?}");
    assert_eq!(reasons(&calls), ["Deleting"]);
    assert_eq!(calls[1].content_type, "application/json-patch+json");
    let ops = calls[1].body.as_array().unwrap();
    assert!(ops.iter().any(|op| op["op"] == "remove" && op["path"] == "/metadata/finalizers/0"), "{ops:?}");
    // No Job delete: owner references let the garbage collector remove the Job and its pods.
    assert!(!calls.iter().any(|c| c.method == "DELETE"));
}

#[tokio::test]
async fn a_new_object_first_gets_the_finalizer() {
    let h = Harness::new(at(1));
    let mut fresh = bij(json!({}), None);
    fresh["metadata"].as_object_mut().unwrap().remove("finalizers");
    let (result, calls) = h.run(Cluster { bij: fresh, ..Default::default() }).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(lines(&calls), [patch(BIJ_PATH)]);
    let ops = calls[0].body.as_array().unwrap();
    assert!(ops.iter().any(|op| op["op"] == "add" && op["value"] == json!(["sluice.dev/cleanup"])), "{ops:?}");
}

#[tokio::test]
async fn a_missing_input_holds_the_job_with_a_warning() {
    let h = Harness::new(at(1));
    let (result, calls) = h.run(Cluster { bij: bij(json!({}), None), ..Default::default() }).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(60)));
    assert_eq!(lines(&calls), [patch(STATUS_PATH), event(), patch(STATUS_PATH)], "{calls:#?}");
    assert_eq!(reasons(&calls), ["InputNotFound"]);
    let status = last_status(&calls);
    assert_eq!(status["phase"], "Pending");
    let admitted = condition(&status, "Admitted");
    assert_eq!((admitted["status"].as_str(), admitted["reason"].as_str()), (Some("False"), Some("InputNotFound")));
    assert!(admitted["message"].as_str().unwrap().contains("mem://data/in.jsonl"));
}

#[tokio::test]
async fn a_malformed_object_is_reported_not_fatal() {
    let h = Harness::new(at(1));
    let mut bad = bij(json!({}), None);
    bad["spec"]["workers"]["max"] = json!("many");
    let (result, calls) = h.run(Cluster { bij: bad, ..Default::default() }).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(lines(&calls), [event()]);
    assert_eq!(reasons(&calls), ["InvalidObject"]);
    assert_eq!(calls[0].body["regarding"]["name"], "quickstart");
}

#[tokio::test]
async fn a_follower_makes_no_requests() {
    let h = Harness::new(at(1));
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = h.context(Client::new(service, "default"), false);
    let (result, calls) = h.run_with((ctx, handle), Cluster { bij: bij(json!({}), None), ..Default::default() }).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(5)));
    assert!(calls.is_empty());
}

const JOBS_PREFIX: &str = "/apis/batch/v1/namespaces/default/jobs/";
/// The plan and finalize Jobs of the `quickstart` job.
const STEP_JOBS_PREFIX: &str = "/apis/batch/v1/namespaces/default/jobs/quickstart-";
const CONFIGMAPS_PATH: &str = "/api/v1/namespaces/default/configmaps/";

/// A CA certificate (self-signed; its key was thrown away).
const TEST_CA: &str = include_str!("fixtures/test-ca.pem");

/// The ConfigMaps of the fake API server: `good-ca` holds a CA bundle under `ca.crt`, `bad-ca`
/// holds text that is not one.
fn configmap(name: &str) -> Option<Value> {
    let data = match name {
        "good-ca" => json!({"ca.crt": TEST_CA}),
        "bad-ca" => json!({"ca.crt": "not a certificate"}),
        _ => return None,
    };
    Some(json!({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": name, "namespace": "default"}, "data": data}))
}

#[tokio::test]
async fn the_ca_bundle_is_read_from_its_configmap_and_a_bad_one_is_reported() {
    let ca_spec = |name: &str, key: &str| json!({"storage": {"caBundle": {"configMapRef": {"name": name}, "key": key}}});
    let h = Harness::new(at(10));
    seed_input(&h, 5).await;
    let (result, calls) = h.run(Cluster { bij: bij(ca_spec("good-ca", "ca.crt"), None), ..Default::default() }).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(30)));
    let cm = format!("{CONFIGMAPS_PATH}good-ca");
    assert_eq!(
        lines(&calls),
        [get(&cm), patch(STATUS_PATH), event(), get(JOB_PATH), patch(JOB_PATH), event(), patch(STATUS_PATH)],
        "{calls:#?}"
    );
    // The workers get the key mounted, and its path in SLUICE_STORAGE_CA_FILE.
    let applied = &calls.iter().find(|c| c.path == JOB_PATH && c.method == "PATCH").unwrap().body;
    let pod = &applied["spec"]["template"]["spec"];
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "storage-ca").expect("the CA volume");
    assert_eq!(volume["configMap"]["name"], "good-ca");
    assert_eq!(volume["configMap"]["items"][0], json!({"key": "ca.crt", "path": "ca.crt"}));
    let env = pod["containers"][0]["env"].as_array().unwrap();
    assert!(env.contains(&json!({"name": "SLUICE_STORAGE_CA_FILE", "value": "/etc/sluice/ca/ca.crt"})), "{env:?}");

    // A bundle that is not one, or a missing key: an error naming the field and a Warning
    // Event, before any storage is touched; the reconcile is retried (a fixed ConfigMap counts).
    for (name, key, want) in [("bad-ca", "ca.crt", "no certificate in it"), ("good-ca", "other.pem", "has no key \"other.pem\"")] {
        let h = Harness::new(at(10));
        seed_input(&h, 5).await;
        let (result, calls) = h.run(Cluster { bij: bij(ca_spec(name, key), None), ..Default::default() }).await;
        let err = result.unwrap_err();
        assert!(err.contains("spec.storage.caBundle") && err.contains(want), "{err}");
        assert_eq!(lines(&calls), [get(&format!("{CONFIGMAPS_PATH}{name}")), event()], "{calls:#?}");
        assert_eq!(reasons(&calls), ["InvalidCABundle"]);
        assert!(h.get_json::<Value>("data/out/_sluice/plan.json").await.is_none(), "nothing planned");
    }
    // A missing ConfigMap is an API error, retried like a missing storage Secret.
    let h = Harness::new(at(10));
    seed_input(&h, 5).await;
    let (result, calls) = h.run(Cluster { bij: bij(ca_spec("nope", "ca.crt"), None), ..Default::default() }).await;
    let err = result.unwrap_err();
    assert!(err.contains("get ConfigMap default/nope (spec.storage.caBundle)"), "{err}");
    assert_eq!(lines(&calls), [get(&format!("{CONFIGMAPS_PATH}nope"))]);
}

// --- Storage only the pods can reach ---------------------------------------------------------

const UID: &str = "0b5e6f7a-1111-4222-8333-444455556666";
const PLAN_JOB_PATH: &str = "/apis/batch/v1/namespaces/default/jobs/quickstart-plan";
const FINALIZE_JOB_PATH: &str = "/apis/batch/v1/namespaces/default/jobs/quickstart-finalize";

/// A job on a volume only its pods mount (file:///data), against an operator with a report URL.
fn pod_storage_bij(status: Option<Value>) -> Value {
    bij(
        json!({
            "model": {"uri": "file:///data/models/tiny"},
            "input": {"uri": "file:///data/in.jsonl"},
            "output": {"uri": "file:///data/out"},
        }),
        status,
    )
}

fn pods_harness(now: Timestamp) -> Harness {
    Harness { report_url: Some("http://sluice-operator.sluice-system.svc:8080".into()), ..Harness::new(now) }
}

fn delete(p: &str) -> String {
    format!("DELETE {p}")
}

/// A status as an earlier reconcile left it once the planner pod reported 5 requests in 3 shards.
fn planned_status() -> Value {
    json!({
        "phase": "Running", "observedGeneration": 1, "slaStatus": "OnTrack",
        "requests": {"total": 5, "succeeded": 0, "failed": 0},
        "shards": {"total": 3, "completed": 0, "failed": 0, "active": 0},
        "conditions": [{"type": "Admitted", "status": "True", "reason": "Planned", "message": "5 requests in 3 shards",
                        "lastTransitionTime": T0, "observedGeneration": 1}],
    })
}

#[tokio::test]
async fn pod_only_storage_is_planned_by_a_planner_pod_not_by_the_operator() {
    let h = pods_harness(at(5));
    // The input exists where the operator could open it: it must not.
    seed_input(&h, 5).await;
    let (result, calls) = h.run(Cluster { bij: pod_storage_bij(None), ..Default::default() }).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(3)));
    assert_eq!(lines(&calls), [patch(STATUS_PATH), get(PLAN_JOB_PATH), patch(PLAN_JOB_PATH)], "{calls:#?}");
    assert_eq!(calls[0].body["status"]["phase"], "Planning");
    let plan_job = &calls[2].body;
    assert_eq!(calls[2].content_type, "application/apply-patch+yaml");
    assert_eq!(plan_job["spec"]["completions"], 1);
    let c = &plan_job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["args"], json!(["plan"]));
    let env: std::collections::BTreeMap<&str, &Value> =
        c["env"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), &e["value"])).collect();
    assert_eq!(env["SLUICE_REPORT_URL"], "http://sluice-operator.sluice-system.svc:8080/v1/jobs/default/quickstart/reports");
    assert_eq!(env["SLUICE_REPORT_TOKEN"], UID);
    assert_eq!(env["SLUICE_REQUESTS_PER_SHARD"], "2");
    assert!(h.get_json::<Value>("data/out/_sluice/plan.json").await.is_none(), "the operator wrote a plan");
}

#[tokio::test]
async fn a_pod_only_job_without_a_report_url_fails_with_a_message_naming_the_flag() {
    let h = Harness::new(at(5));
    let (result, calls) = h.run(Cluster { bij: pod_storage_bij(None), ..Default::default() }).await;
    let err = result.unwrap_err();
    assert!(err.contains("--report-url"), "{err}");
    assert!(!lines(&calls).contains(&patch(JOB_PATH)), "{calls:#?}");
}

#[tokio::test]
async fn the_planner_pods_report_creates_the_indexed_job() {
    let h = pods_harness(at(5));
    let (ctx, handle) = h.context_for_run();
    ctx.reports.register("default/quickstart", UID, None);
    let summary = sluice_api::plan::PlanSummary { line_count: 5, requests_per_shard: 2, shards: 3 };
    ctx.reports.accept("default/quickstart", UID, sluice_api::report::PodReport::Plan { summary, created: true }).unwrap();
    let status = json!({"phase": "Planning", "conditions": [{"type": "Admitted", "status": "True", "reason": "Planning", "message": "", "lastTransitionTime": T0}]});
    let (result, calls) = h.run_with((ctx, handle), Cluster { bij: pod_storage_bij(Some(status)), ..Default::default() }).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(30)));
    assert_eq!(lines(&calls), [event(), get(JOB_PATH), patch(JOB_PATH), event(), patch(STATUS_PATH)], "{calls:#?}");
    assert_eq!(reasons(&calls), ["Planned", "JobCreated"]);
    assert!(calls[0].body["note"].as_str().unwrap().contains("by the job's planner pod"));
    assert_eq!(calls[2].body["spec"]["completions"], 3);
    let status = last_status(&calls);
    assert_eq!((status["requests"]["total"].as_i64(), status["shards"]["total"].as_i64()), (Some(5), Some(3)));
    assert_eq!(condition(&status, "Admitted")["reason"], "Planned");
}

#[tokio::test]
async fn a_missing_input_reported_by_the_planner_holds_the_job() {
    let h = pods_harness(at(5));
    let (ctx, handle) = h.context_for_run();
    ctx.reports.register("default/quickstart", UID, None);
    let failed = sluice_api::report::PodReport::PlanFailed {
        failure: sluice_api::report::PlanFailure::InputNotFound,
        message: "spec.input.uri: the input object file:///data/in.jsonl does not exist".into(),
    };
    ctx.reports.accept("default/quickstart", UID, failed).unwrap();
    let (result, calls) = h.run_with((ctx, handle), Cluster { bij: pod_storage_bij(None), ..Default::default() }).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(60)));
    assert_eq!(lines(&calls), [delete(PLAN_JOB_PATH), event(), patch(STATUS_PATH)], "{calls:#?}");
    assert_eq!(reasons(&calls), ["InputNotFound"]);
    let status = last_status(&calls);
    assert_eq!(status["phase"], "Pending");
    let admitted = condition(&status, "Admitted");
    assert_eq!((admitted["status"].as_str(), admitted["reason"].as_str()), (Some("False"), Some("InputNotFound")));
    assert!(admitted["message"].as_str().unwrap().contains("file:///data/in.jsonl"));
}

#[tokio::test]
async fn a_plan_that_cannot_be_made_fails_the_job_with_the_planners_message() {
    let h = pods_harness(at(5));
    let (ctx, handle) = h.context_for_run();
    ctx.reports.register("default/quickstart", UID, None);
    let failed = sluice_api::report::PodReport::PlanFailed {
        failure: sluice_api::report::PlanFailure::Permanent,
        message: "the input file:///data/in.jsonl needs more than 100000 shards at 1 requests per shard".into(),
    };
    ctx.reports.accept("default/quickstart", UID, failed).unwrap();
    let (result, calls) = h.run_with((ctx, handle), Cluster { bij: pod_storage_bij(None), ..Default::default() }).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(reasons(&calls), ["PlanFailed"]);
    let status = last_status(&calls);
    assert_eq!(status["phase"], "Failed");
    assert!(condition(&status, "Failed")["message"].as_str().unwrap().contains("100000 shards"));
}

#[tokio::test]
async fn a_planner_pod_that_failed_without_a_report_fails_the_job_naming_it() {
    let h = pods_harness(at(5));
    let failed_job = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "quickstart-plan", "namespace": "default"},
        "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}});
    let cluster = Cluster {
        bij: pod_storage_bij(Some(
            json!({"phase": "Planning", "conditions": [{"type": "Admitted", "status": "True", "reason": "Planning", "message": "", "lastTransitionTime": T0}]}),
        )),
        step_jobs: [("quickstart-plan".to_string(), failed_job)].into_iter().collect(),
        ..Default::default()
    };
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::await_change());
    let status = last_status(&calls);
    assert_eq!(status["phase"], "Failed");
    let msg = condition(&status, "Failed")["message"].as_str().unwrap().to_string();
    assert!(msg.contains("backoff limit") && msg.contains("job/quickstart-plan"), "{msg}");
}

#[tokio::test]
async fn when_every_shard_is_committed_a_finalize_pod_writes_the_manifest_then_the_job_completes() {
    let h = pods_harness(at(120));
    let job = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "quickstart", "namespace": "default", "resourceVersion": "9"},
        "spec": {"completions": 3, "parallelism": 1, "completionMode": "Indexed"},
        "status": {"completedIndexes": "0-2", "active": 0, "ready": 0, "succeeded": 3}});
    // First: no manifest yet, so the finalize Job is created and the job stays Running.
    let cluster = Cluster { bij: pod_storage_bij(Some(planned_status())), job: Some(job.clone()), ..Default::default() };
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(3)));
    let l = lines(&calls);
    assert_eq!(&l[..4], [get(JOB_PATH), get(PODS_PATH), get(FINALIZE_JOB_PATH), patch(FINALIZE_JOB_PATH)], "{calls:#?}");
    let fin = &calls[3].body["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(fin["args"], json!(["finalize"]));
    assert_eq!(last_status(&calls)["phase"], "Running");
    // Then the finalize pod's report: Succeeded with its counts.
    let (ctx, handle) = h.context_for_run();
    ctx.reports.register("default/quickstart", UID, Some(3));
    let counts = sluice_api::output::ManifestCounts { total: 5, succeeded: 4, failed: 1 };
    let report = sluice_api::report::PodReport::Manifest {
        uri: "file:///data/out/manifest.json".into(),
        requests: counts,
        usage: sluice_api::output::Usage::new(50, 20),
    };
    ctx.reports.accept("default/quickstart", UID, report).unwrap();
    let cluster = Cluster { bij: pod_storage_bij(Some(planned_status())), job: Some(job), ..Default::default() };
    let (result, calls) = h.run_with((ctx, handle), cluster).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(reasons(&calls).contains(&"Completed".to_string()), "{calls:#?}");
    let status = last_status(&calls);
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!(status["manifestUri"], "file:///data/out/manifest.json");
    assert_eq!((status["requests"]["succeeded"].as_i64(), status["requests"]["failed"].as_i64()), (Some(4), Some(1)));
    assert!(h.get_json::<Value>("data/out/manifest.json").await.is_none(), "the operator wrote the manifest itself");
}

/// Cancel: the Job is stopped (parallelism 0, suspended) with one `Cancelling` Event; once no
/// worker runs, the close Job is applied; once it has completed, the manifest is read back and
/// the job ends `Cancelled` with a `Cancelled` Event, never to be reconciled again.
#[tokio::test]
async fn cancel_stops_the_job_runs_the_close_step_and_ends_cancelled() {
    let h = Harness::new(at(10));
    seed_input(&h, 5).await;
    let (_, applied, status) = first_reconcile(&h).await;
    seed_progress(&h, &progress(0, 2, 2, true, 20, 60, 0.1)).await;
    let h = Harness { store: h.store.clone(), now: at(90), report_url: None };

    // 1. The cancel arrives while a worker runs.
    let mut cancelled = bij(json!({"cancel": true}), Some(status));
    cancelled["metadata"]["generation"] = json!(2);
    let job = job_from_apply(&applied, json!({"active": 1, "succeeded": 1, "completedIndexes": "0"}));
    let running_pod = json!({"metadata": {"name": "quickstart-1-abcde", "namespace": "default"}, "status": {"phase": "Running"}});
    let cluster = Cluster { bij: cancelled.clone(), job: Some(job.clone()), pods: vec![running_pod], ..Default::default() };
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(3)));
    assert_eq!(lines(&calls), [get(JOB_PATH), get(PODS_PATH), event(), patch(JOB_PATH), event(), patch(STATUS_PATH)], "{calls:#?}");
    assert_eq!(calls[3].body, json!({"spec": {"parallelism": 0, "suspend": true}}));
    assert_eq!(reasons(&calls), ["SpecUpdated", "Cancelling"]);
    let status = last_status(&calls);
    assert_eq!((status["phase"].as_str(), status["closeReason"].as_str()), (Some("Running"), Some("cancelled")));
    assert_eq!(condition(&status, "Progressing")["reason"], "Cancelling");

    // 2. The Job is stopped and its pods have ended: the close Job is created.
    let mut stopped = job.clone();
    stopped["spec"]["parallelism"] = json!(0);
    stopped["spec"]["suspend"] = json!(true);
    stopped["status"] = json!({"active": 0, "succeeded": 1, "completedIndexes": "0"});
    let mut closing = cancelled.clone();
    closing["status"] = status.clone();
    let ended_pod = json!({"metadata": {"name": "quickstart-1-abcde", "namespace": "default"}, "status": {"phase": "Failed"}});
    let cluster = Cluster { bij: closing.clone(), job: Some(stopped.clone()), pods: vec![ended_pod.clone()], ..Default::default() };
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(3)));
    let close_path = format!("{JOBS_PREFIX}quickstart-close");
    assert_eq!(lines(&calls)[..4], [get(JOB_PATH), get(PODS_PATH), get(&close_path), patch(&close_path)], "{calls:#?}");
    let close = &calls[3].body;
    let container = &close["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"], json!(["close"]));
    let env: Vec<(&str, &str)> =
        container["env"].as_array().unwrap().iter().filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?))).collect();
    assert!(env.contains(&("SLUICE_CLOSE_CODE", "batch_cancelled")), "{env:?}");
    assert!(env.contains(&("SLUICE_JOB_NAME", "default/quickstart")), "{env:?}");
    assert!(reasons(&calls).is_empty(), "the close was announced once, in step 1");
    if calls.iter().any(|c| c.path == STATUS_PATH) {
        let s = last_status(&calls);
        assert_eq!((s["phase"].as_str(), s["closeReason"].as_str()), (Some("Running"), Some("cancelled")));
    }

    // 3. The close Job completed (it wrote the manifest): Cancelled.
    let manifest = OutputManifest {
        job: "default/quickstart".into(),
        input_uri: "mem://data/in.jsonl".into(),
        output_uri: "mem://data/out".into(),
        completed_at: "2026-03-01T12:01:40Z".into(),
        requests: sluice_api::output::ManifestCounts { total: 5, succeeded: 2, failed: 3 },
        usage: sluice_api::output::Usage::new(40, 20),
        shards: vec![],
    };
    h.put("data/out/manifest.json", serde_json::to_vec(&manifest).unwrap()).await;
    let mut done_close = close.clone();
    done_close["status"] = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
    let step_jobs = std::collections::BTreeMap::from([("quickstart-close".to_string(), done_close)]);
    let cluster = Cluster { bij: closing, job: Some(stopped), pods: vec![ended_pod], step_jobs, ..Default::default() };
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(lines(&calls), [get(JOB_PATH), get(PODS_PATH), get(&close_path), event(), patch(STATUS_PATH)], "{calls:#?}");
    assert_eq!(reasons(&calls), ["Cancelled"]);
    let note = calls[3].body["note"].as_str().unwrap();
    assert!(note.contains("2 requests succeeded, 3 failed or never ran") && note.contains("batch_cancelled"), "{note}");
    let status = last_status(&calls);
    assert_eq!(status["phase"], "Cancelled");
    assert_eq!(status["manifestUri"], "mem://data/out/manifest.json");
    assert_eq!((status["requests"]["succeeded"].as_u64(), status["requests"]["failed"].as_u64()), (Some(2), Some(3)));
    assert_eq!(condition(&status, "Progressing")["reason"], "Cancelled");
    assert!(status["completionTime"].is_string());
    // A cancelled job has no SLA verdict and no projection (`kubectl get bij` shows neither).
    assert!(status.get("slaStatus").is_none_or(Value::is_null), "{status}");
    assert!(status.get("projectedCompletionTime").is_none_or(Value::is_null), "{status}");
}

/// Done with a failed shard within `retries.maxFailedShards`: the close Job gives that shard's
/// requests `shard_failed` lines (and writes the manifest) before the job succeeds.
#[tokio::test]
async fn a_job_done_with_a_failed_shard_closes_it_before_it_succeeds() {
    let h = Harness::new(at(10));
    seed_input(&h, 5).await;
    let (_, applied, status) = first_reconcile(&h).await;
    for (i, n) in [(0u32, 2u64), (1, 2)] {
        seed_progress(&h, &progress(i, n, n, true, 20, 200 + i64::from(i), 0.1)).await;
    }
    let h = Harness { store: h.store.clone(), now: at(240), report_url: None };
    let spec = json!({"retries": {"maxFailedShards": 1}});
    let job = job_from_apply(&applied, json!({"active": 0, "succeeded": 2, "failed": 3, "completedIndexes": "0-1", "failedIndexes": "2"}));
    let cluster = Cluster { bij: bij(spec.clone(), Some(status.clone())), job: Some(job.clone()), ..Default::default() };
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(3)));
    let close_path = format!("{JOBS_PREFIX}quickstart-close");
    let apply = calls.iter().find(|c| c.path == close_path && c.method == "PATCH").expect("the close Job");
    let env: Vec<(String, String)> = apply.body["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .collect();
    for want in [("SLUICE_CLOSE_CODE", "shard_failed"), ("SLUICE_CLOSE_SHARDS", "2"), ("SLUICE_FAILED_SHARDS", "")] {
        assert!(env.iter().any(|(k, v)| k == want.0 && v == want.1), "{want:?} not in {env:?}");
    }
    assert_ne!(last_status(&calls)["phase"], "Succeeded", "not before the close pod is done");

    // The close pod wrote the manifest: Succeeded, with its counts.
    let manifest = OutputManifest {
        job: "default/quickstart".into(),
        input_uri: "mem://data/in.jsonl".into(),
        output_uri: "mem://data/out".into(),
        completed_at: "2026-03-01T12:04:00Z".into(),
        requests: sluice_api::output::ManifestCounts { total: 5, succeeded: 4, failed: 1 },
        usage: sluice_api::output::Usage::new(80, 40),
        shards: vec![],
    };
    h.put("data/out/manifest.json", serde_json::to_vec(&manifest).unwrap()).await;
    let mut done_close = apply.body.clone();
    done_close["status"] = json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]});
    let step_jobs = std::collections::BTreeMap::from([("quickstart-close".to_string(), done_close)]);
    let cluster = Cluster { bij: bij(spec, Some(status)), job: Some(job), step_jobs, ..Default::default() };
    let (result, calls) = h.run(cluster).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_eq!(reasons(&calls), ["Completed"]);
    let status = last_status(&calls);
    assert_eq!(status["phase"], "Succeeded");
    assert_eq!((status["requests"]["succeeded"].as_u64(), status["requests"]["failed"].as_u64()), (Some(4), Some(1)));
}
