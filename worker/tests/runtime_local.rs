//! The real `sluice-worker` binary on the tiny model against `file://` storage: complete shards
//! in the OpenAI batch output shape, malformed lines, SIGKILL/SIGTERM at random points,
//! concurrent attempts, injected storage faults, and the permanent-failure exit code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use sluice_api::contract::{env, exit};
use sluice_api::output::OutputLine;

fn texts(results: &[OutputLine]) -> BTreeMap<String, String> {
    results
        .iter()
        .map(|l| {
            let c = &l.response.as_ref().unwrap().body["choices"][0];
            let text = c.get("text").or_else(|| c["message"].get("content")).and_then(|t| t.as_str()).unwrap();
            (l.custom_id.clone().unwrap(), text.to_string())
        })
        .collect()
}

#[test]
fn shards_complete_with_openai_batch_output_and_right_usage() {
    let mut lines = prompt_lines(9);
    lines.push(br#"{"custom_id":"chat-1","method":"POST","url":"/v1/chat/completions","body":{"model":"tiny","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello!"}],"temperature":0.7}}"#.to_vec());
    lines.push(
        br#"{"custom_id":"cmpl-1","method":"POST","url":"/v1/completions","body":{"prompt":"Once upon a time","max_tokens":2}}"#.to_vec(),
    );
    lines
        .push(br#"{"custom_id":"stop-1","method":"POST","url":"/v1/completions","body":{"prompt":"abc","stop":["e"],"seed":42}}"#.to_vec());
    let job = LocalJob::new(lines, 5);
    let tokenizer = tokenizers::Tokenizer::from_file(tiny_model().join("tokenizer.json")).unwrap();
    let mut all_texts = BTreeMap::new();
    for shard in 0..3 {
        let out = run(job.worker(shard));
        assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", stderr(&out));
        let (results, errors) = job.read_shard(shard);
        assert!(errors.is_empty(), "{errors:?}");
        let max = |l: &OutputLine| if l.custom_id.as_deref() == Some("cmpl-1") { 2 } else { 4 };
        assert_exactly_once(&job.plan, shard, &results, &errors, max);
        for r in &results {
            let u = r.usage().unwrap();
            // Plain prompts are tokenized as given (with the tokenizer's special tokens).
            if let Some(i) = r.custom_id.as_deref().and_then(|c| c.strip_prefix('r')) {
                let prompt = format!("Tell me about number {i}");
                let expected = tokenizer.encode(prompt.as_str(), true).unwrap().get_ids().len() as u64;
                assert_eq!(u.prompt_tokens, expected, "prompt tokens of {prompt:?}");
            }
        }
        let p = job.progress(shard);
        assert!(p.complete && p.ready_at.is_some());
        assert_eq!((p.lines_done, p.succeeded, p.failed), (results.len() as u64, results.len() as u64, 0));
        assert_eq!(p.prompt_tokens, results.iter().map(|r| r.usage().unwrap().prompt_tokens).sum::<u64>());
        assert_eq!(p.completion_tokens, results.iter().map(|r| r.usage().unwrap().completion_tokens).sum::<u64>());
        all_texts.extend(texts(&results));
    }
    let results: Vec<OutputLine> = (0..3).flat_map(|s| job.read_shard(s).0).collect();
    let chat = results.iter().find(|r| r.custom_id.as_deref() == Some("chat-1")).unwrap();
    assert_eq!(chat.response.as_ref().unwrap().body["object"], "chat.completion");
    let stop = results.iter().find(|r| r.custom_id.as_deref() == Some("stop-1")).unwrap();
    assert!(!texts(std::slice::from_ref(stop))["stop-1"].contains('e'), "text is cut before the stop string");

    // Same seeds, same texts: a second job over the same input generates identical output.
    let again = LocalJob::new(job.lines.clone(), 5);
    for shard in 0..3 {
        assert_eq!(run(again.worker(shard)).status.code(), Some(exit::SUCCESS));
        let (results, _) = again.read_shard(shard);
        for (id, text) in texts(&results) {
            assert_eq!(all_texts[&id], text, "{id} differs between runs");
        }
    }
    // Rerunning a finalized shard is a no-op success.
    let out = run(job.worker(0));
    assert_eq!(out.status.code(), Some(exit::SUCCESS));
    assert!(stderr(&out).contains("already finalized"));
}

#[test]
fn malformed_lines_become_one_error_record_each() {
    let good = |id: &str| format!(r#"{{"id":"{id}","prompt":"fine"}}"#).into_bytes();
    let mut huge = br#"{"id":"huge","prompt":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'x', 3000));
    huge.extend(br#""}"#);
    let corpus: Vec<(Vec<u8>, &str)> = vec![
        (good("g1"), ""),
        (br#"{"custom_id":"t1","method":"POST","url":"/v1/chat/completions","body":{"messages":[{"role":"us"#.to_vec(), "invalid_json"),
        (br#"{"custom_id":"w1","url":"/v1/chat/completions","body":{"messages":"hi"}}"#.to_vec(), "invalid_field"),
        (br#"{"custom_id":7,"url":"/v1/completions","body":{"prompt":"x"}}"#.to_vec(), "invalid_field"),
        (br#"{"id":"w2","prompt":"x","max_tokens":-1}"#.to_vec(), "invalid_field"),
        (huge, "line_too_long"),
        (b"{\"id\":\"u1\",\"prompt\":\"\xff\xfe\"}".to_vec(), "invalid_utf8"),
        (Vec::new(), "empty_line"),
        (b"   ".to_vec(), "empty_line"),
        (b"[1,2,3]".to_vec(), "invalid_json"),
        (br#"{"custom_id":"e1","url":"/v1/embeddings","body":{}}"#.to_vec(), "unsupported_url"),
        (good("g2"), ""),
        (good("g1"), "duplicate_custom_id"),
        (br#"{"id":"g2","prompt":"again"}"#.to_vec(), "duplicate_custom_id"),
        (b"\x00\x01\x02 binary".to_vec(), "invalid_json"),
        (good("g3"), ""),
    ];
    let lines: Vec<Vec<u8>> = corpus.iter().map(|(l, _)| l.clone()).collect();
    let job = LocalJob::new(lines, 100);
    let mut cmd = job.worker(0);
    cmd.env("SLUICE_MAX_LINE_BYTES", "1000");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", stderr(&out));
    let (results, errors) = job.read_shard(0);
    assert_exactly_once(&job.plan, 0, &results, &errors, |_| 4);
    assert_eq!(results.iter().map(|r| r.custom_id.clone().unwrap()).collect::<Vec<_>>(), ["g1", "g2", "g3"]);
    let expected: Vec<(u64, &str)> =
        corpus.iter().enumerate().filter(|(_, (_, c))| !c.is_empty()).map(|(i, (_, c))| (i as u64 + 1, *c)).collect();
    let got: Vec<(u64, &str)> = errors.iter().map(|e| (e.line.unwrap(), e.error.as_ref().unwrap().code.as_str())).collect();
    assert_eq!(got, expected);
    let dup = errors.iter().find(|e| e.line == Some(13)).unwrap();
    assert_eq!(dup.custom_id.as_deref(), Some("g1"));
    assert!(dup.error.as_ref().unwrap().message.contains("first seen on line 1)"), "{dup:?}");
    let truncated = errors.iter().find(|e| e.line == Some(2)).unwrap();
    assert!(truncated.error.as_ref().unwrap().message.starts_with("line 2:"));
    let p = job.progress(0);
    assert_eq!((p.succeeded, p.failed), (3, 13));
}

/// A small deterministic generator for kill points.
fn lcg(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *seed >> 33
}

#[test]
fn sigkill_at_random_points_then_rerun_gives_exactly_once() {
    for seed in [1u64, 2, 3] {
        let job = LocalJob::new(prompt_lines(120), 120);
        let mut rng = seed;
        let mut kills = 0;
        for _ in 0..3 {
            let mut cmd = job.worker(0);
            cmd.env(env::SAMPLING, r#"{"maxTokens":24,"temperature":0.8,"seed":3}"#);
            let mut child = cmd.spawn().unwrap();
            let delay = Duration::from_millis(30 + lcg(&mut rng) % 600);
            std::thread::sleep(delay);
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                kills += 1;
            }
            let _ = child.wait();
        }
        let mut cmd = job.worker(0);
        cmd.env(env::SAMPLING, r#"{"maxTokens":24,"temperature":0.8,"seed":3}"#);
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(exit::SUCCESS), "seed {seed}: {}", stderr(&out));
        let (results, errors) = job.read_shard(0);
        assert!(errors.is_empty());
        assert_exactly_once(&job.plan, 0, &results, &errors, |_| 24);
        assert!(kills > 0, "seed {seed}: at least one attempt was killed");
    }
}

#[test]
fn sigterm_commits_finished_work_and_exits_fast_and_metrics_are_served() {
    let job = LocalJob::new(prompt_lines(400), 400);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = job.worker(0);
    cmd.env(env::SAMPLING, r#"{"maxTokens":48}"#).env(env::METRICS_ADDR, format!("127.0.0.1:{port}"));
    let mut child = cmd.spawn().unwrap();
    // Wait for the first committed chunk, then scrape metrics while it runs.
    let start = Instant::now();
    while job.chunk_files(0).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "no chunk committed");
        assert!(child.try_wait().unwrap().is_none(), "worker exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains("sluice_worker_chunks_committed_total") && metrics.contains("sluice_worker_requests_total{outcome=\"succeeded\"}"),
        "{metrics}"
    );
    assert!(http_get(port, "/healthz").starts_with("HTTP/1.1 200"));
    sigterm(&child);
    let t = Instant::now();
    let out = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(exit::TERMINATED), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(4), "exit within the 3 s grace period, took {:?}", t.elapsed());
    assert!(!job.finalized(0), "400 lines cannot be done yet");
    let p = job.progress(0);
    assert!(!p.complete && p.lines_done > 0);
    let committed: u64 =
        job.chunk_files(0).iter().map(|n| sluice_api::contract::layout::parse_chunk_name(n).map(|(a, b)| b - a).unwrap()).sum();
    assert_eq!(committed, p.lines_done, "the progress record matches the committed chunks");
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn two_concurrent_attempts_of_one_shard_give_exactly_once() {
    let job = LocalJob::new(prompt_lines(60), 60);
    let spawn = |chunk: &str| {
        let mut c = job.worker(0);
        c.env(env::SAMPLING, r#"{"maxTokens":12}"#).env("SLUICE_CHUNK_LINES", chunk);
        c.spawn().unwrap()
    };
    let (a, b) = (spawn("3"), spawn("5"));
    for child in [a, b] {
        let out = wait_with_timeout(child, Duration::from_secs(120));
        assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", stderr(&out));
    }
    let (results, errors) = job.read_shard(0);
    assert_exactly_once(&job.plan, 0, &results, &errors, |_| 12);
}

#[cfg(feature = "fault-injection")]
#[test]
fn transient_storage_faults_are_retried() {
    let job = LocalJob::new(prompt_lines(20), 10);
    for shard in 0..2 {
        let mut cmd = job.worker(shard);
        cmd.env("SLUICE_INJECT_FAULTS", format!("error_rate=0.25,delay_rate=0.2,delay_ms=5,break_rate=0.5,seed={shard}"));
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", stderr(&out));
        assert!(stderr(&out).contains("injected fault"), "faults were injected and retried");
        let (results, errors) = job.read_shard(shard);
        assert_exactly_once(&job.plan, shard, &results, &errors, |_| 4);
    }
}

#[cfg(feature = "fault-injection")]
#[test]
fn permanent_failures_exit_with_the_permanent_code_and_a_clear_message() {
    let job = LocalJob::new(prompt_lines(4), 4);
    let check = |mut cmd: std::process::Command, code: i32, needles: &[&str]| {
        let out = run({
            cmd.env("SLUICE_GRACE_SECONDS", "1");
            cmd
        });
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{err}");
        for n in needles {
            assert!(err.contains(n), "{n:?} missing in:\n{err}");
        }
    };
    // Denied storage.
    let mut c = job.worker(0);
    c.env("SLUICE_INJECT_FAULTS", "error_rate=1,permanent=true");
    check(c, exit::PERMANENT, &["denied", "plan.json"]);
    // No such shard in the plan.
    check(job.worker(7), exit::PERMANENT, &["no shard 7"]);
    // Missing model directory.
    let mut c = job.worker(0);
    c.env(env::MODEL_URI, "/nonexistent/model");
    check(c, exit::PERMANENT, &["/nonexistent/model"]);
    // A model of an unsupported architecture.
    let bad_model = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(tiny_model()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), bad_model.path().join(f.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(bad_model.path().join("config.json")).unwrap().replace("Qwen2ForCausalLM", "GPT2LMHeadModel");
    std::fs::write(bad_model.path().join("config.json"), cfg).unwrap();
    let mut c = job.worker(0);
    c.env(env::MODEL_URI, bad_model.path());
    check(c, exit::PERMANENT, &["unsupported architecture", "GPT2LMHeadModel"]);
    // Missing input.
    let mut c = job.worker(0);
    c.env(env::INPUT_URI, job.dir.path().join("missing.jsonl"));
    check(c, exit::PERMANENT, &["missing.jsonl", "does not exist"]);
    // Unparseable plan.
    let broken = LocalJob::new(prompt_lines(2), 2);
    std::fs::write(broken.out().join("_sluice/plan.json"), "{not json").unwrap();
    check(broken.worker(0), exit::PERMANENT, &["plan", "not a valid plan"]);
    // Bad flags are usage errors.
    let mut c = job.worker(0);
    c.env(env::SAMPLING, "{\"maxTokens\":0}");
    check(c, exit::USAGE, &["maxTokens"]);
    assert!(!job.finalized(0));
}

#[cfg(feature = "fault-injection")]
#[test]
fn sigterm_while_preparing_exits_at_once() {
    let job = LocalJob::new(prompt_lines(4), 4);
    let mut cmd = job.worker(0);
    // Every storage call takes 5 s, so the worker is still reading the plan.
    cmd.env("SLUICE_INJECT_FAULTS", "delay_rate=1,delay_ms=5000");
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sigterm(&child);
    let t = Instant::now();
    let out = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(exit::TERMINATED), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert!(stderr(&out).contains("stopped while preparing"));
    assert!(job.chunk_files(0).is_empty() && !job.finalized(0));
}

#[test]
fn json_logs_and_a_taken_metrics_port_do_not_stop_the_shard() {
    let job = LocalJob::new(prompt_lines(3), 3);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = job.worker(0);
    cmd.env(env::LOG_FORMAT, "json").env(env::METRICS_ADDR, taken.local_addr().unwrap().to_string());
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", stderr(&out));
    let logs: Vec<serde_json::Value> = stderr(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(logs.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()));
    assert!(
        logs.iter().any(|l| l["level"] == "WARN" && l["fields"]["message"].as_str().unwrap_or("").contains("cannot serve metrics")),
        "{logs:?}"
    );
    assert!(job.finalized(0));
}

#[test]
fn close_commits_every_request_that_never_ran_with_the_close_code_and_writes_the_manifest() {
    let mut lines = prompt_lines(300);
    lines[250] = b"{not json".to_vec();
    let job = LocalJob::new(lines, 200);
    // Shard 0 is stopped part-way (some chunks committed); shard 1 never started.
    let child = job.worker(0).env(env::SAMPLING, r#"{"maxTokens":48}"#).spawn().unwrap();
    let start = Instant::now();
    while job.chunk_files(0).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "no chunk committed");
        std::thread::sleep(Duration::from_millis(20));
    }
    sigterm(&child);
    let out = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(exit::TERMINATED), "{}", stderr(&out));
    let ran = job.progress(0).lines_done;
    assert!(ran > 0 && ran < 200, "{ran}");

    let mut close = job.worker(0);
    close.arg("close").env_remove(env::JOB_COMPLETION_INDEX).env(env::CLOSE_CODE, "batch_cancelled").env(env::JOB_NAME, "ns/job");
    let out = run(close);
    assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", stderr(&out));
    // The manifest report, printed when no operator listens.
    let report: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(report["kind"], "manifest", "{report}");

    for shard in [0, 1] {
        let (results, errors) = job.read_shard(shard);
        assert_exactly_once(&job.plan, shard, &results, &errors, |_| 48);
        let cancelled = errors.iter().filter(|e| e.error.as_ref().unwrap().code == "batch_cancelled").count() as u64;
        let lines = job.plan.shard(shard).unwrap().line_count;
        if shard == 0 {
            assert_eq!((results.len() as u64, cancelled), (ran, lines - ran), "what ran is kept, the rest is cancelled");
        } else {
            assert!(results.is_empty());
            assert_eq!(cancelled, lines - 1, "every request of shard 1 but the malformed one");
            assert!(errors.iter().any(|e| e.error.as_ref().unwrap().code == "invalid_json"), "a malformed line keeps its own error");
        }
    }
    let manifest: sluice_api::output::OutputManifest =
        serde_json::from_slice(&std::fs::read(job.out().join(sluice_api::contract::layout::MANIFEST)).unwrap()).unwrap();
    assert_eq!(manifest.requests.total, 300);
    assert_eq!(manifest.requests.succeeded, ran);
    assert_eq!(manifest.requests.failed, 300 - ran);

    // A second close (a retried pod) changes nothing.
    let mut again = job.worker(0);
    again.arg("close").env_remove(env::JOB_COMPLETION_INDEX).env(env::CLOSE_CODE, "batch_cancelled");
    assert_eq!(run(again).status.code(), Some(exit::SUCCESS));
    assert_eq!(job.read_shard(0).0.len() as u64, ran);
}

#[test]
fn close_without_a_reason_is_a_usage_error_naming_the_variable() {
    let job = LocalJob::new(prompt_lines(4), 4);
    let mut close = job.worker(0);
    close.arg("close").env_remove(env::CLOSE_CODE);
    let out = run(close);
    assert_eq!(out.status.code(), Some(exit::USAGE));
    assert!(stderr(&out).contains(env::CLOSE_CODE), "{}", stderr(&out));
    let mut bad = job.worker(0);
    bad.arg("close").env(env::CLOSE_CODE, "batch_canceled");
    let out = run(bad);
    assert_eq!(out.status.code(), Some(exit::USAGE));
    assert!(stderr(&out).contains("batch_cancelled, batch_expired or shard_failed"), "{}", stderr(&out));
}

#[test]
fn close_of_the_failed_shards_gives_their_requests_shard_failed_lines() {
    let job = LocalJob::new(prompt_lines(12), 4);
    for shard in [0, 2] {
        let out = run(job.worker(shard));
        assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", stderr(&out));
    }
    let mut close = job.worker(0);
    close.arg("close").env_remove(env::JOB_COMPLETION_INDEX).env(env::CLOSE_CODE, "shard_failed").env(env::CLOSE_SHARDS, "1");
    let out = run(close);
    assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", stderr(&out));
    let (results, errors) = job.read_shard(1);
    assert!(results.is_empty());
    assert_exactly_once(&job.plan, 1, &results, &errors, |_| 4);
    assert!(errors.iter().all(|e| e.error.as_ref().unwrap().code == "shard_failed"), "{errors:?}");
    let manifest: sluice_api::output::OutputManifest =
        serde_json::from_slice(&std::fs::read(job.out().join(sluice_api::contract::layout::MANIFEST)).unwrap()).unwrap();
    assert_eq!((manifest.requests.total, manifest.requests.succeeded, manifest.requests.failed), (12, 8, 4));
    assert_eq!(manifest.shards.len(), 3, "every shard has its files");
}
