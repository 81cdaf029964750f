//! `sluice serve --local` over HTTP: every user-facing failure path of the Batch API (401, 404
//! across tenants, bad requests, unknown and mixed models, bad completion_window, per-tenant
//! limits, files that fail validation as a whole), OpenAI's error shape, and a restart that
//! keeps files and batches.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_support;

use serde_json::{Value, json};
use serve_support::{Server, chat_lines, keys_file, wait_done};

const A: Option<&str> = Some("sk-a");
const B: Option<&str> = Some("sk-b");
const C: Option<&str> = Some("sk-c");

fn assert_error(resp: &(u16, Value), status: u16, code: &str, needle: &str) {
    assert_eq!(resp.0, status, "{}", resp.1);
    let e = &resp.1["error"];
    assert_eq!(e["code"], code, "{}", resp.1);
    assert!(e["type"].is_string() && e.get("param").is_some(), "not OpenAI's error shape: {}", resp.1);
    assert!(e["message"].as_str().unwrap().contains(needle), "{:?} does not mention {needle:?}", e["message"]);
}

fn batch(s: &Server, key: Option<&str>, file: &str, window: &str) -> (u16, Value) {
    s.post_json("/v1/batches", key, &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": window}))
}

#[test]
fn error_paths_tenants_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys_file(
        dir.path(),
        &[("sk-a", "team-a"), ("sk-b", "team-b"), ("sk-c", "team-c")],
        "tenants:\n  team-b: {maxFileBytes: 2000, maxRequestsPerBatch: 3}\n  team-c: {maxBatchesInFlight: 0}\n",
    );
    let s = Server::start(&dir.path().join("data"), &["--keys", keys.to_str().unwrap()]);

    // 401: no key, a wrong key.
    assert_error(&s.get("/v1/files", None), 401, "invalid_api_key", "API key");
    assert_error(&s.get("/v1/files", Some("sk-nope")), 401, "invalid_api_key", "Incorrect API key");
    assert_error(&s.upload(Some("sk-nope"), Some("batch"), "x"), 401, "invalid_api_key", "Incorrect");

    // Uploads: purpose required and must be batch.
    assert_error(&s.upload(A, None, "x"), 400, "missing_required_parameter", "purpose");
    assert_error(&s.upload(A, Some("fine-tune"), "x"), 400, "invalid_value", "fine-tune");
    let (code, f) = s.upload(A, Some("batch"), &chat_lines("a", 2, "tiny-qwen2"));
    assert_eq!(code, 200, "{f}");
    let fa = f["id"].as_str().unwrap().to_string();
    assert_eq!((f["object"].as_str(), f["purpose"].as_str(), f["status"].as_str()), (Some("file"), Some("batch"), Some("processed")));

    // Another tenant's file is not found, whatever it does with it.
    assert_error(&s.get(&format!("/v1/files/{fa}"), B), 404, "not_found", &fa);
    assert_error(&s.get(&format!("/v1/files/{fa}/content"), B), 404, "not_found", &fa);
    assert_error(&s.call("DELETE", &format!("/v1/files/{fa}"), B, None, b""), 404, "not_found", &fa);
    assert_error(&batch(&s, B, &fa, "24h"), 404, "not_found", &fa);
    assert_eq!(s.get("/v1/files", B).1["data"], json!([]));
    assert_error(&s.get("/v1/files/file-000", A), 404, "not_found", "file-000");

    // Batch requests: body, endpoint, completion_window, metadata.
    assert_error(&s.call("POST", "/v1/batches", A, Some("application/json"), b"{"), 400, "invalid_request", "not a valid batch request");
    let r = s.post_json("/v1/batches", A, &json!({"input_file_id": fa, "endpoint": "/v1/embeddings", "completion_window": "24h"}));
    assert_error(&r, 400, "invalid_value", "/v1/embeddings");
    assert_error(&batch(&s, A, &fa, "soon"), 400, "invalid_value", "completion_window");
    assert_eq!(batch(&s, A, &fa, "0s").1["error"]["param"], "completion_window");
    let r = s.post_json(
        "/v1/batches",
        A,
        &json!({"input_file_id": fa, "endpoint": "/v1/chat/completions", "completion_window": "1h", "metadata": {"k": 1}}),
    );
    assert_error(&r, 400, "invalid_value", "metadata");
    assert_error(&batch(&s, A, "file-missing", "24h"), 404, "not_found", "file-missing");

    // Models: unknown, and more than one in a file.
    let (_, f) = s.upload(A, Some("batch"), &chat_lines("g", 2, "gpt-4o-mini"));
    assert_error(&batch(&s, A, f["id"].as_str().unwrap(), "24h"), 400, "model_not_found", "gpt-4o-mini");
    let mixed = chat_lines("x", 1, "tiny-qwen2") + &chat_lines("y", 1, "other-model");
    let (_, f) = s.upload(A, Some("batch"), &mixed);
    assert_error(&batch(&s, A, f["id"].as_str().unwrap(), "24h"), 400, "multiple_models", "other-model");

    // A file that fails validation as a whole: the batch is created failed, with errors.
    let (_, f) = s.upload(A, Some("batch"), "");
    let (code, b) = batch(&s, A, f["id"].as_str().unwrap(), "24h");
    assert_eq!((code, b["status"].as_str()), (200, Some("failed")), "{b}");
    assert_eq!(b["errors"]["data"][0]["code"], "empty_file");
    assert!(b["failed_at"].is_i64());
    let completions = r#"{"custom_id":"c","method":"POST","url":"/v1/completions","body":{"model":"tiny-qwen2","prompt":"p"}}"#;
    let (_, f) = s.upload(A, Some("batch"), &format!("{completions}\n"));
    let (_, b) = batch(&s, A, f["id"].as_str().unwrap(), "24h");
    assert_eq!(b["errors"]["data"][0]["code"], "mismatched_endpoint", "{b}");
    assert_eq!(b["errors"]["data"][0]["line"], 1);
    // A failed batch cannot be cancelled.
    let failed_id = b["id"].as_str().unwrap().to_string();
    assert_error(&s.post_json(&format!("/v1/batches/{failed_id}/cancel"), A, &json!({})), 409, "batch_not_cancellable", "failed");

    // Limits of team-b: file size (413), requests per batch (400); team-c: batches in flight (429).
    let big = "x".repeat(2001);
    assert_error(&s.upload(B, Some("batch"), &big), 413, "file_too_large", "2000 bytes");
    let (_, f) = s.upload(B, Some("batch"), &chat_lines("b", 4, "tiny-qwen2"));
    assert_error(&batch(&s, B, f["id"].as_str().unwrap(), "24h"), 400, "too_many_requests", "limit of 3");
    let (_, f) = s.upload(C, Some("batch"), &chat_lines("c", 1, "tiny-qwen2"));
    assert_error(&batch(&s, C, f["id"].as_str().unwrap(), "24h"), 429, "batch_limit_exceeded", "maxBatchesInFlight 0");

    // A batch of team-a runs; team-b cannot see or cancel it.
    let (code, b) = batch(&s, A, &fa, "90m");
    assert_eq!(code, 200, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["object"], "batch");
    for field in [
        "errors",
        "output_file_id",
        "error_file_id",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
        "metadata",
    ] {
        assert!(b.get(field).is_some(), "batch object lacks {field}: {b}");
    }
    assert_eq!(b["expires_at"].as_i64().unwrap() - b["created_at"].as_i64().unwrap(), 5400);
    assert_eq!(b["sluice"]["completion_window_seconds"], 5400);
    assert_error(&s.get(&format!("/v1/batches/{id}"), B), 404, "not_found", &id);
    assert_error(&s.post_json(&format!("/v1/batches/{id}/cancel"), B, &json!({})), 404, "not_found", &id);
    assert_eq!(s.get("/v1/batches", B).1["data"], json!([]));
    let done = wait_done(&s, &id, A);
    assert_eq!(done["status"], "completed", "{done}\n{}", s.stderr());
    assert_eq!(done["request_counts"], json!({"total": 2, "completed": 2, "failed": 0}));
    let out_id = done["output_file_id"].as_str().unwrap().to_string();
    assert_error(&s.get(&format!("/v1/files/{out_id}"), B), 404, "not_found", &out_id);
    assert_error(&s.post_json(&format!("/v1/batches/{id}/cancel"), A, &json!({})), 409, "batch_not_cancellable", "completed");

    // Listing: bad limits, unknown cursors, unknown routes.
    assert_error(&s.get("/v1/batches?limit=0", A), 400, "invalid_value", "limit");
    assert_error(&s.get("/v1/batches?after=batch_nope", A), 404, "not_found", "batch_nope");
    assert_error(&s.get("/v1/files?order=up", A), 400, "invalid_value", "order");
    assert_error(&s.get("/v1/models", A), 404, "unknown_url", "/v1/models");
    assert_error(&s.get("/v1/batches?limit=many", A), 400, "invalid_request", "limit");
    let huge = vec![b' '; 2 << 20];
    assert_error(&s.call("POST", "/v1/batches", A, Some("application/json"), &huge), 413, "request_too_large", "");
    assert_error(&s.call("POST", "/v1/files", A, Some("application/json"), b"{}"), 400, "invalid_request", "");
    let page = s.get("/v1/batches?limit=1", A).1;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["has_more"], true);

    // A restart keeps files and batches.
    s.stop();
    let s = Server::start(&dir.path().join("data"), &["--keys", keys.to_str().unwrap()]);
    let (code, again) = s.get(&format!("/v1/batches/{id}"), A);
    assert_eq!((code, again["status"].as_str()), (200, Some("completed")));
    assert_eq!(s.get(&format!("/v1/files/{out_id}"), A).0, 200);
    let (code, del) = s.call("DELETE", &format!("/v1/files/{fa}"), A, None, b"");
    assert_eq!((code, del["deleted"].as_bool()), (200, Some(true)));
    assert_error(&s.get(&format!("/v1/files/{fa}"), A), 404, "not_found", &fa);
}

#[test]
fn without_keys_any_key_is_accepted_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]);
    assert_eq!(s.get("/v1/files", Some("anything")).0, 200);
    assert_eq!(s.get("/v1/batches", None).0, 200);
    assert!(s.stderr().contains("accepting any bearer key"), "{}", s.stderr());
}

#[test]
fn bad_server_configuration_fails_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("keys.yaml");
    std::fs::write(&bad, "keys:\n  plain-key: t\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--local", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("d"))
        .arg("--keys")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a SHA-256 hash"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--local"));
    // --cluster: a config without `cluster:`, a tenant that is not a namespace name, a
    // relative model path, --data-dir; each fails before anything is contacted.
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-qwen2");
    let local_cfg = dir.path().join("local.yaml");
    std::fs::write(&local_cfg, format!("models:\n  m: {{uri: {model}}}\n")).unwrap();
    let (code, err) = run(&["--cluster", "--config", local_cfg.to_str().unwrap()]);
    assert_eq!((code, err.contains("`cluster:` section")), (Some(2), true), "{err}");
    let cluster_cfg = dir.path().join("cluster.yaml");
    std::fs::write(&cluster_cfg, "models:\n  m: {uri: \"s3://models/m\"}\ncluster:\n  storageUri: \"s3://bucket/api\"\n").unwrap();
    let keys = dir.path().join("ns-keys.yaml");
    std::fs::write(&keys, format!("keys:\n  {}: Team_A\n", "a".repeat(64))).unwrap();
    let (code, err) = run(&["--cluster", "--config", cluster_cfg.to_str().unwrap(), "--keys", keys.to_str().unwrap()]);
    assert_eq!((code, err.contains("tenant \"Team_A\" is not a namespace name")), (Some(2), true), "{err}");
    let relative = dir.path().join("relative.yaml");
    std::fs::write(&relative, "models:\n  m: {uri: models/m}\ncluster:\n  storageUri: \"s3://bucket/api\"\n").unwrap();
    let (code, err) = run(&["--cluster", "--config", relative.to_str().unwrap()]);
    assert_eq!((code, err.contains("models.m.uri")), (Some(2), true), "{err}");
    let (code, err) = run(&["--cluster", "--config", cluster_cfg.to_str().unwrap(), "--data-dir", "/tmp/x"]);
    assert_eq!((code, err.contains("--data-dir is for --local")), (Some(2), true), "{err}");
}
