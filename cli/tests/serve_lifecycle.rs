//! Expiry and restart of `sluice serve --local` with nothing lost: a batch whose completion
//! window ends mid-run becomes `expired` with `batch_expired` error lines, and a batch running
//! when the server stops resumes at the next start and can still be cancelled; in both, every
//! custom_id of the input appears exactly once across the output and error files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_support;

use serde_json::json;
use serve_support::{Server, expected_ids, slow_lines, wait_done, wait_status};

const N: usize = 2000;

#[test]
fn expiry_and_a_restart_mid_run_keep_every_request_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]);

    // A window that ends mid-run.
    let (_, f) = s.upload(None, Some("batch"), &slow_lines("exp", N));
    let fid = f["id"].as_str().unwrap().to_string();
    let (code, b) =
        s.post_json("/v1/batches", None, &json!({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "4s"}));
    assert_eq!(code, 200, "{b}");
    let done = wait_done(&s, b["id"].as_str().unwrap(), None);
    assert_eq!(done["status"], "expired", "{done}\n{}", s.stderr());
    assert!(done["expired_at"].is_i64());
    assert_eq!(done["sluice"]["sla_status"], "Missed");
    let (ids, codes) = s.results(&done, None);
    assert_eq!(ids, expected_ids("exp", N));
    assert!(codes.iter().any(|c| c == "batch_expired"), "no request was left to expire");
    let counts = &done["request_counts"];
    assert_eq!(counts["completed"].as_u64().unwrap() + counts["failed"].as_u64().unwrap(), N as u64);

    // A batch running when the server stops resumes at the next start.
    let (_, f) = s.upload(None, Some("batch"), &slow_lines("rs", N));
    let fid = f["id"].as_str().unwrap().to_string();
    let (_, b) =
        s.post_json("/v1/batches", None, &json!({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "1d"}));
    let id = b["id"].as_str().unwrap().to_string();
    wait_status(&s, &id, None, "in_progress");
    std::thread::sleep(std::time::Duration::from_secs(2));
    s.stop();
    let s = Server::start(&data, &[]);
    let resumed = wait_status(&s, &id, None, "in_progress");
    assert!(resumed["in_progress_at"].is_i64());
    // Progress shows in request_counts and the `sluice` extension.
    let mut seen = json!(null);
    for _ in 0..100 {
        seen = s.get(&format!("/v1/batches/{id}"), None).1;
        if seen["sluice"]["workers"].as_u64() >= Some(1) && seen["sluice"]["projected_completion_at"].is_i64() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(seen["sluice"]["workers"].as_u64() >= Some(1), "{seen}");
    assert!(seen["request_counts"]["completed"].as_u64() > Some(0), "{seen}");
    assert!(matches!(seen["sluice"]["sla_status"].as_str(), Some("OnTrack" | "AtRisk")), "{seen}");
    // The input of a running batch cannot be deleted.
    let (code, e) = s.call("DELETE", &format!("/v1/files/{fid}"), None, None, b"");
    assert_eq!((code, e["error"]["code"].as_str()), (409, Some("file_in_use")), "{e}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (code, c) = s.post_json(&format!("/v1/batches/{id}/cancel"), None, &json!({}));
    assert_eq!(code, 200, "{c}");
    let done = wait_done(&s, &id, None);
    assert_eq!(done["status"], "cancelled", "{done}\n{}", s.stderr());
    let (ids, codes) = s.results(&done, None);
    assert_eq!(ids, expected_ids("rs", N));
    assert!(codes.iter().any(|c| c == "batch_cancelled"));
}

#[test]
fn a_model_that_does_not_load_fails_the_batch_with_every_request_in_the_error_file() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken-model");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("config.json"), "{}").unwrap();
    let config = dir.path().join("serve.yaml");
    std::fs::write(&config, format!("models:\n  broken: {{uri: {}}}\n", broken.display())).unwrap();
    let s = Server::start(&dir.path().join("data"), &["--config", config.to_str().unwrap()]);
    let lines = serve_support::chat_lines("br", 5, "broken");
    let (_, f) = s.upload(None, Some("batch"), &lines);
    let (code, b) =
        s.post_json("/v1/batches", None, &json!({"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "1h"}));
    assert_eq!(code, 200, "{b}");
    let done = wait_done(&s, b["id"].as_str().unwrap(), None);
    assert_eq!(done["status"], "failed", "{done}");
    assert!(done["failed_at"].is_i64());
    assert_eq!(done["errors"]["data"][0]["code"], "batch_failed");
    assert!(done["errors"]["data"][0]["message"].as_str().unwrap().contains("failed"), "{done}");
    let (ids, codes) = s.results(&done, None);
    assert_eq!(ids, expected_ids("br", 5));
    assert!(codes.iter().all(|c| c == "batch_failed"), "{codes:?}");
}
