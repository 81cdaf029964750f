//! Mocked-API tests of `sluice serve --cluster` (a fake API server over `tower_test::mock` that
//! keeps BatchInferenceJobs in memory and records every request): the Batch API's routes,
//! driven in process, must make exactly the Kubernetes requests cluster mode promises: a job in
//! the tenant's namespace with the batch's input, output, window and annotations; reads for
//! status; `spec.cancel` for cancel; one annotation patch recording the output files; nothing
//! outside the caller's namespace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Body as AxumBody;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use sluice_api::storage::{StorageOptions, resolve};
use sluice_cli::serve::cluster::ClusterBatches;
use sluice_cli::serve::config::{Auth, ClusterConfig, ModelEntry, ServerConfig, hash_key};
use sluice_cli::serve::store::FileStore;
use sluice_cli::serve::{AppState, Backend, router};
use tower::ServiceExt;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const JOBS: &str = "/apis/sluice.dev/v1alpha1/namespaces/";

#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: String,
    body: Value,
}

#[derive(Default)]
struct Fake {
    /// (namespace, name) → job.
    jobs: BTreeMap<(String, String), Value>,
    calls: Vec<Call>,
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder().status(status).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap()
}

fn not_found() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "not found", "reason": "NotFound", "code": 404}),
    )
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

/// Answer the client's requests from `fake` for as long as the test runs.
async fn api_server(mut handle: Handle, fake: Arc<Mutex<Fake>>) {
    while let Some((req, send)) = handle.next_request().await {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        let mut f = fake.lock().unwrap();
        f.calls.push(Call { method: method.clone(), path: path.clone(), query, body: body.clone() });
        let rest = path.strip_prefix(JOBS).unwrap_or_else(|| panic!("a request outside BatchInferenceJobs: {method} {path}"));
        let parts: Vec<&str> = rest.split('/').collect();
        let status = |code: u16, reason: &str, message: &str| {
            respond(
                StatusCode::from_u16(code).unwrap(),
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
            )
        };
        let resp = match (method.as_str(), parts.as_slice()) {
            // Tenants whose namespace answers with an error.
            ("POST", ["ghost", "batchinferencejobs"]) => status(404, "NotFound", "namespaces \"ghost\" not found"),
            ("POST", ["locked", "batchinferencejobs"]) => {
                status(403, "Forbidden", "batchinferencejobs.sluice.dev is forbidden: User cannot create resource")
            }
            ("POST", ["strict", "batchinferencejobs"]) => {
                status(422, "Invalid", "BatchInferenceJob.sluice.dev \"x\" is invalid: spec.workers: Invalid value")
            }
            ("POST", [ns, "batchinferencejobs"]) => {
                let mut job = body.clone();
                job["metadata"]["creationTimestamp"] = json!("2026-12-06T12:00:00Z");
                job["metadata"]["uid"] = json!(format!("uid-{}", f.jobs.len()));
                let name = job["metadata"]["name"].as_str().unwrap().to_string();
                f.jobs.insert((ns.to_string(), name), job.clone());
                respond(StatusCode::CREATED, &job)
            }
            ("GET", [ns, "batchinferencejobs"]) => {
                let items: Vec<Value> = f.jobs.iter().filter(|((n, _), _)| n == ns).map(|(_, j)| j.clone()).collect();
                respond(
                    StatusCode::OK,
                    &json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BatchInferenceJobList", "metadata": {}, "items": items}),
                )
            }
            ("GET", [ns, "batchinferencejobs", name]) => match f.jobs.get(&(ns.to_string(), name.to_string())) {
                Some(j) => respond(StatusCode::OK, j),
                None => not_found(),
            },
            ("PATCH", [ns, "batchinferencejobs", name]) => match f.jobs.get_mut(&(ns.to_string(), name.to_string())) {
                Some(j) => {
                    merge(j, &body);
                    let j = j.clone();
                    respond(StatusCode::OK, &j)
                }
                None => not_found(),
            },
            (m, p) => panic!("unexpected request {m} {p:?}"),
        };
        send.send_response(resp);
    }
}

struct Harness {
    app: axum::Router,
    fake: Arc<Mutex<Fake>>,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("api");
    std::fs::create_dir_all(&root).unwrap();
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let fake = Arc::new(Mutex::new(Fake::default()));
    tokio::spawn(api_server(handle, fake.clone()));
    let model = ModelEntry {
        uri: "s3://models/qwen".into(),
        dtype: Some("bf16".into()),
        kv_cache_dtype: Some("fp8".into()),
        max_model_len: None,
        max_tokens: Some(16),
        temperature: None,
        max_batch_size: None,
        requests_per_shard: None,
    };
    let storage_uri = format!("file://{}", root.display());
    let config = ServerConfig {
        models: BTreeMap::from([("qwen".to_string(), model)]),
        default_model: None,
        workers: Default::default(),
        cluster: Some(ClusterConfig { storage_uri: storage_uri.clone(), storage: None, workers: None }),
    };
    let auth = Auth::Keys {
        hashes: BTreeMap::from([
            (hash_key("ka"), "team-a".to_string()),
            (hash_key("kb"), "team-b".to_string()),
            (hash_key("kg"), "ghost".to_string()),
            (hash_key("kl"), "locked".to_string()),
            (hash_key("ks"), "strict".to_string()),
        ]),
        limits: BTreeMap::new(),
    };
    let files = FileStore::new(resolve(&storage_uri, &StorageOptions::default()).unwrap());
    let backend = Backend::Cluster(Box::new(ClusterBatches::new(client, &config).unwrap()));
    let state = Arc::new(AppState { config, auth, files, backend });
    Harness { app: router(state), fake, root, _dir: dir }
}

impl Harness {
    async fn call(&self, method: &str, path: &str, key: &str, content_type: Option<&str>, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {key}"));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = self.app.clone().oneshot(req.body(AxumBody::from(body)).unwrap()).await.unwrap();
        let status = resp.status();
        (status, axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec())
    }

    async fn json(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (ct, bytes) = match body {
            Some(b) => (Some("application/json"), serde_json::to_vec(&b).unwrap()),
            None => (None, Vec::new()),
        };
        let (status, bytes) = self.call(method, path, key, ct, bytes).await;
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn upload(&self, key: &str, content: &str) -> Value {
        let b = "sluiceboundary";
        let body = format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{content}\r\n--{b}--\r\n"
        );
        let (status, bytes) =
            self.call("POST", "/v1/files", key, Some(&format!("multipart/form-data; boundary={b}")), body.into_bytes()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&bytes));
        serde_json::from_slice(&bytes).unwrap()
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.fake.lock().unwrap().calls)
    }

    fn job(&self, ns: &str, name: &str) -> Value {
        self.fake.lock().unwrap().jobs[&(ns.to_string(), name.to_string())].clone()
    }

    fn set_status(&self, ns: &str, name: &str, status: Value) {
        self.fake.lock().unwrap().jobs.get_mut(&(ns.to_string(), name.to_string())).unwrap()["status"] = status;
    }
}

fn lines(n: usize) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn line_of(id: &str, ok: bool) -> String {
    if ok {
        json!({"id": "x", "custom_id": id, "response": {"status_code": 200, "request_id": "r", "body": {}}, "error": null}).to_string()
    } else {
        json!({"id": "x", "custom_id": id, "response": null, "error": {"code": "batch_cancelled", "message": "cancelled"}}).to_string()
    }
}

#[tokio::test]
async fn cluster_mode_makes_exactly_the_requests_it_promises() {
    let h = harness();
    let file = h.upload("ka", &lines(3)).await;
    let file_id = file["id"].as_str().unwrap();
    // Files are storage only: no request to the API server.
    assert!(h.calls().is_empty());
    assert!(h.root.join("team-a/files").join(format!("{file_id}.jsonl")).is_file());

    // Create: one POST in the tenant's namespace, after the in-flight count (none configured: no list).
    let (status, batch) = h
        .json(
            "POST",
            "/v1/batches",
            "ka",
            Some(json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "2h", "metadata": {"k": "v"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert_eq!(batch["status"], "validating");
    let id = batch["id"].as_str().unwrap().to_string();
    let name = id.replace('_', "-");
    let calls = h.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        (calls[0].method.as_str(), calls[0].path.as_str()),
        ("POST", "/apis/sluice.dev/v1alpha1/namespaces/team-a/batchinferencejobs")
    );
    assert!(calls[0].query.contains("fieldManager=sluice-serve"), "{}", calls[0].query);
    let job = &calls[0].body;
    assert_eq!(job["metadata"]["name"], name.as_str());
    assert_eq!(job["metadata"]["labels"]["sluice.dev/batch-api"], "true");
    let created: Value = serde_json::from_str(job["metadata"]["annotations"]["sluice.dev/batch"].as_str().unwrap()).unwrap();
    assert_eq!((created["id"].as_str(), created["metadata"]["k"].as_str()), (Some(id.as_str()), Some("v")));
    let spec = &job["spec"];
    let root = format!("file://{}", h.root.display());
    assert_eq!(spec["input"]["uri"], format!("{root}/team-a/files/{file_id}.jsonl"));
    assert_eq!(spec["output"]["uri"], format!("{root}/team-a/batches/{id}/out"));
    assert_eq!(spec["model"]["uri"], "s3://models/qwen");
    assert_eq!(spec["model"]["dtype"], "bf16");
    assert_eq!(spec["model"]["kvCacheDtype"], "fp8");
    assert_eq!(spec["sampling"]["maxTokens"], 16);
    assert_eq!(spec["sla"]["completionWindow"], "2h");
    assert_eq!(spec["sla"]["onDeadline"], "Expire");
    assert_eq!((spec["workers"]["min"].as_i64(), spec["workers"]["max"].as_i64()), (Some(1), Some(4)));

    // Status comes from the job: a read of it, nothing else.
    h.set_status(
        "team-a",
        &name,
        json!({"phase": "Running", "requests": {"total": 3, "succeeded": 1, "failed": 0},
        "startTime": "2026-12-06T12:00:05Z", "workers": {"desired": 1, "active": 1}, "slaStatus": "OnTrack"}),
    );
    let (_, b) = h.json("GET", &format!("/v1/batches/{id}"), "ka", None).await;
    assert_eq!((b["status"].as_str(), b["request_counts"]["completed"].as_u64()), (Some("in_progress"), Some(1)));
    assert_eq!(b["sluice"]["sla_status"], "OnTrack");
    let calls = h.calls();
    assert_eq!(
        calls.iter().map(|c| format!("{} {}", c.method, c.path)).collect::<Vec<_>>(),
        [format!("GET /apis/sluice.dev/v1alpha1/namespaces/team-a/batchinferencejobs/{name}")]
    );

    // Another tenant: its own namespace only, and not found.
    let (status, err) = h.json("GET", &format!("/v1/batches/{id}"), "kb", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    let (status, _) = h.json("GET", &format!("/v1/files/{file_id}"), "kb", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let calls = h.calls();
    assert!(calls.iter().all(|c| c.path.contains("/namespaces/team-b/")), "{calls:?}");

    // The job ends: the server records the output files once (an annotation patch), from the
    // job's committed results/ and errors/, and serves their concatenation.
    let out = h.root.join(format!("team-a/batches/{id}/out"));
    std::fs::create_dir_all(out.join("results")).unwrap();
    std::fs::create_dir_all(out.join("errors")).unwrap();
    std::fs::write(out.join("results/00000.jsonl"), format!("{}\n{}\n", line_of("r0", true), line_of("r1", true))).unwrap();
    std::fs::write(out.join("errors/00000.jsonl"), format!("{}\n", line_of("r2", false))).unwrap();
    let manifest = json!({"job": format!("team-a/{name}"), "inputUri": "x", "outputUri": "y", "completedAt": "2026-12-06T12:01:00Z",
        "requests": {"total": 3, "succeeded": 2, "failed": 1}, "usage": {"prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15},
        "shards": [{"index": 0, "results": "results/00000.jsonl", "errors": "errors/00000.jsonl", "lines": 3, "succeeded": 2, "failed": 1,
                    "promptTokens": 6, "completionTokens": 9}]});
    std::fs::write(out.join("manifest.json"), manifest.to_string()).unwrap();
    h.set_status(
        "team-a",
        &name,
        json!({"phase": "Succeeded", "requests": {"total": 3, "succeeded": 2, "failed": 1},
        "startTime": "2026-12-06T12:00:05Z", "completionTime": "2026-12-06T12:01:00Z", "slaStatus": "Met"}),
    );
    let (_, done) = h.json("GET", &format!("/v1/batches/{id}"), "ka", None).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!((done["request_counts"]["completed"].as_u64(), done["request_counts"]["failed"].as_u64()), (Some(2), Some(1)));
    assert_eq!(done["usage"]["output_tokens"], 9);
    assert_eq!(done["sluice"]["sla_status"], "Met");
    let calls = h.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].method, "PATCH");
    assert!(calls[1].query.contains("fieldManager=sluice-serve"));
    let recorded: Value =
        serde_json::from_str(calls[1].body["metadata"]["annotations"]["sluice.dev/batch-files"].as_str().unwrap()).unwrap();
    assert_eq!(recorded["output_file_id"], done["output_file_id"]);
    assert_eq!(calls[1].body.as_object().unwrap().len(), 1, "only metadata is patched: {}", calls[1].body);
    let (status, content) =
        h.call("GET", &format!("/v1/files/{}/content", done["output_file_id"].as_str().unwrap()), "ka", None, vec![]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(String::from_utf8(content).unwrap().lines().count(), 2);
    let (_, errf) = h.json("GET", &format!("/v1/files/{}", done["error_file_id"].as_str().unwrap()), "ka", None).await;
    assert_eq!(errf["purpose"], "batch_output");
    // A second read finds them recorded: a read, no second patch.
    let (_, again) = h.json("GET", &format!("/v1/batches/{id}"), "ka", None).await;
    assert_eq!(again["output_file_id"], done["output_file_id"]);
    assert_eq!(h.calls().iter().filter(|c| c.method == "PATCH").count(), 0);

    // The input of a finished batch may be deleted; list reads the namespace with the label.
    let (status, _) = h.json("DELETE", &format!("/v1/files/{file_id}"), "ka", None).await;
    assert_eq!(status, StatusCode::OK);
    let calls = h.calls();
    assert_eq!(calls[0].method, "GET");
    assert!(calls[0].path.ends_with("/namespaces/team-a/batchinferencejobs"), "{calls:?}");
    assert!(calls[0].query.contains("labelSelector=sluice.dev%2Fbatch-api%3Dtrue"), "{}", calls[0].query);
}

#[tokio::test]
async fn cancel_sets_spec_cancel_and_a_running_batchs_input_cannot_be_deleted() {
    let h = harness();
    let file = h.upload("ka", &lines(2)).await;
    let file_id = file["id"].as_str().unwrap();
    let (_, batch) = h
        .json(
            "POST",
            "/v1/batches",
            "ka",
            Some(json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})),
        )
        .await;
    let id = batch["id"].as_str().unwrap().to_string();
    let name = id.replace('_', "-");
    h.set_status("team-a", &name, json!({"phase": "Running", "requests": {"total": 2, "succeeded": 0, "failed": 0}}));
    let (status, err) = h.json("DELETE", &format!("/v1/files/{file_id}"), "ka", None).await;
    assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("file_in_use")));
    h.calls();

    let (status, c) = h.json("POST", &format!("/v1/batches/{id}/cancel"), "ka", None).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(c["status"], "cancelling");
    let calls = h.calls();
    assert_eq!(calls.iter().map(|c| c.method.as_str()).collect::<Vec<_>>(), ["GET", "PATCH"]);
    assert_eq!(calls[1].body["spec"], json!({"cancel": true}));
    assert!(calls[1].body["metadata"]["annotations"]["sluice.dev/batch-cancelling-at"].is_string());
    assert_eq!(h.job("team-a", &name)["spec"]["cancel"], true);

    // The operator closes it; nothing was committed, so the error file is its close step's lines.
    let out = h.root.join(format!("team-a/batches/{id}/out"));
    std::fs::create_dir_all(out.join("errors")).unwrap();
    std::fs::write(out.join("errors/00000.jsonl"), format!("{}\n{}\n", line_of("r0", false), line_of("r1", false))).unwrap();
    h.set_status("team-a", &name, json!({"phase": "Cancelled", "requests": {"total": 2, "succeeded": 0, "failed": 2}}));
    let (_, done) = h.json("GET", &format!("/v1/batches/{id}"), "ka", None).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["output_file_id"].is_null());
    assert!(done["cancelled_at"].is_i64() && done["cancelling_at"].is_i64());
    // Cancelling a cancelled batch is a no-op answer, not a second patch.
    h.calls();
    let (status, _) = h.json("POST", &format!("/v1/batches/{id}/cancel"), "ka", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(h.calls().iter().all(|c| c.method == "GET"));
    // Another tenant cannot cancel it.
    let (status, _) = h.json("POST", &format!("/v1/batches/{id}/cancel"), "kb", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn errors_of_the_api_server_are_clear_and_leave_nothing_behind() {
    let h = harness();
    for (key, status, code, words) in [
        ("kg", StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "namespace \"ghost\""),
        ("kl", StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "RBAC"),
        ("ks", StatusCode::BAD_REQUEST, "invalid_job", "refused the batch's job"),
    ] {
        let file = h.upload(key, &lines(1)).await;
        let (got, err) = h
            .json(
                "POST",
                "/v1/batches",
                key,
                Some(json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "1h"})),
            )
            .await;
        assert_eq!(got, status, "{key}: {err}");
        assert_eq!(err["error"]["code"], code, "{err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{key}: {message}");
        // Nothing was created: the tenant lists no batch, and its file is still there.
        let (_, files) = h.json("GET", "/v1/files", key, None).await;
        assert_eq!(files["data"].as_array().unwrap().len(), 1);
    }
    assert!(h.fake.lock().unwrap().jobs.is_empty());
}
