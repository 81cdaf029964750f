//! Helpers for the `sluice-worker` binary tests: write an input and its plan, run the real
//! binary on the tiny model, read the committed output back and check it is exactly once.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_api::contract::{env, layout};
use sluice_api::output::OutputLine;
use sluice_api::plan::{PLAN_VERSION, Shard, ShardPlan};
use sluice_api::progress::ShardProgress;

/// The tiny model committed with the engine.
pub fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-qwen2")
}

/// Split `lines` into a plan of `per_shard` lines per shard.
pub fn plan_for(input_uri: &str, lines: &[Vec<u8>], per_shard: usize) -> ShardPlan {
    let mut shards = Vec::new();
    let (mut start, mut first) = (0u64, 1u64);
    for (i, group) in lines.chunks(per_shard).enumerate() {
        let len: u64 = group.iter().map(|l| l.len() as u64 + 1).sum();
        shards.push(Shard { index: i as u32, start, end: start + len, first_line: first, line_count: group.len() as u64 });
        start += len;
        first += group.len() as u64;
    }
    ShardPlan {
        version: PLAN_VERSION,
        input_uri: input_uri.to_string(),
        input_size: start,
        input_etag: None,
        line_count: lines.len() as u64,
        requests_per_shard: per_shard as u64,
        shards,
    }
}

/// The input body for `lines`.
pub fn body(lines: &[Vec<u8>]) -> Vec<u8> {
    lines.iter().flat_map(|l| l.iter().copied().chain([b'\n'])).collect()
}

/// `n` prompt lines `{"id":"r<i>","prompt":...}`.
pub fn prompt_lines(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!(r#"{{"id":"r{i}","prompt":"Tell me about number {i}"}}"#).into_bytes()).collect()
}

/// A job on the local filesystem: `in.jsonl` and `out/_sluice/plan.json`.
pub struct LocalJob {
    pub dir: tempfile::TempDir,
    pub lines: Vec<Vec<u8>>,
    pub plan: ShardPlan,
}

impl LocalJob {
    pub fn new(lines: Vec<Vec<u8>>, per_shard: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        std::fs::write(&input, body(&lines)).unwrap();
        let plan = plan_for(&format!("file://{}", input.display()), &lines, per_shard);
        std::fs::create_dir_all(dir.path().join("out/_sluice")).unwrap();
        std::fs::write(dir.path().join("out").join(layout::PLAN), serde_json::to_vec(&plan).unwrap()).unwrap();
        Self { dir, lines, plan }
    }

    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    pub fn output_uri(&self) -> String {
        format!("file://{}", self.out().display())
    }

    /// The worker command for `shard` with fast test settings.
    pub fn worker(&self, shard: u32) -> Command {
        worker(&self.output_uri(), shard)
    }

    pub fn read_shard(&self, shard: u32) -> (Vec<OutputLine>, Vec<OutputLine>) {
        let read = |rel: String| parse_jsonl(&std::fs::read(self.out().join(rel)).unwrap());
        (read(layout::results(shard)), read(layout::errors(shard)))
    }

    pub fn progress(&self, shard: u32) -> ShardProgress {
        serde_json::from_slice(&std::fs::read(self.out().join(layout::progress(shard))).unwrap()).unwrap()
    }

    pub fn chunk_files(&self, shard: u32) -> Vec<String> {
        let dir = self.out().join(layout::chunk_prefix(shard));
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn finalized(&self, shard: u32) -> bool {
        self.out().join(layout::results(shard)).is_file()
    }
}

/// The `sluice-worker` command with the test defaults (CPU, tiny model, small chunks, no
/// metrics port, short intervals); callers add or override environment.
pub fn worker(output_uri: &str, shard: u32) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice-worker"));
    for var in [
        env::PLAN_URI,
        env::INPUT_URI,
        env::INPUT_FORMAT,
        env::JOB_NAME,
        env::STORAGE_ENDPOINT,
        env::STORAGE_CA_FILE,
        env::MODEL_CACHE_DIR,
        env::MAX_MODEL_LEN,
        env::INJECT_FAULTS,
    ] {
        c.env_remove(var);
    }
    c.env(env::JOB_COMPLETION_INDEX, shard.to_string())
        .env(env::OUTPUT_URI, output_uri)
        .env(env::MODEL_URI, tiny_model())
        .env(env::SAMPLING, r#"{"maxTokens":4,"seed":1}"#)
        .env(env::METRICS_ADDR, "none")
        .env(env::DEVICE, "cpu")
        .env(env::MAX_BATCH_SIZE, "4")
        .env(env::LOG_FORMAT, "text")
        .env("SLUICE_KV_CACHE_MB", "16")
        .env("SLUICE_CHUNK_LINES", "4")
        .env("SLUICE_CHUNK_SECONDS", "0.2")
        .env("SLUICE_PROGRESS_SECONDS", "0.2")
        .env("SLUICE_GRACE_SECONDS", "3")
        .env("SLUICE_STORAGE_MAX_RETRIES", "10")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Run to the end with a timeout; returns the output (status, logs).
pub fn run(mut c: Command) -> Output {
    let child = c.spawn().unwrap();
    wait_with_timeout(child, Duration::from_secs(120))
}

pub fn wait_with_timeout(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("worker did not finish in {limit:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn parse_jsonl(bytes: &[u8]) -> Vec<OutputLine> {
    bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
}

/// Send SIGTERM (std has no portable signal API).
pub fn sigterm(child: &Child) {
    let ok = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap().success();
    assert!(ok, "kill -TERM failed");
}

/// Every line of `shard` appears exactly once across results and errors, in line order, and
/// every result has the OpenAI batch output shape with consistent usage.
/// `max_tokens` gives each result's token limit.
pub fn assert_exactly_once(
    plan: &ShardPlan,
    shard: u32,
    results: &[OutputLine],
    errors: &[OutputLine],
    max_tokens: impl Fn(&OutputLine) -> u64,
) {
    let s = plan.shard(shard).unwrap();
    let mut seen: BTreeMap<u64, &OutputLine> = BTreeMap::new();
    for l in results.iter().chain(errors) {
        let n = l.line.expect("every record has its line");
        assert!(seen.insert(n, l).is_none(), "line {n} appears twice");
    }
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (s.first_line..s.end_line()).collect::<Vec<_>>(), "every line exactly once");
    for l in results {
        assert_success_shape(l, max_tokens(l));
    }
    for e in errors {
        assert!(e.response.is_none() && e.error.is_some(), "{e:?}");
        let v = serde_json::to_value(e).unwrap();
        assert!(v["id"].as_str().unwrap().starts_with("batch_req_"));
        assert!(!v["error"]["code"].as_str().unwrap().is_empty() && !v["error"]["message"].as_str().unwrap().is_empty());
    }
}

pub fn assert_success_shape(l: &OutputLine, max_tokens: u64) {
    let v = serde_json::to_value(l).unwrap();
    assert_eq!(v["error"], Value::Null);
    assert!(v["custom_id"].is_string());
    assert_eq!(v["response"]["status_code"], 200);
    assert_eq!(v["response"]["request_id"], v["id"]);
    let body = &v["response"]["body"];
    let choice = &body["choices"][0];
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{finish}");
    let u = l.usage().unwrap();
    assert!(u.prompt_tokens > 0);
    assert!(u.completion_tokens >= 1 && u.completion_tokens <= max_tokens, "{u:?}");
    assert_eq!(u.total_tokens, u.prompt_tokens + u.completion_tokens);
    if finish == "length" {
        assert_eq!(u.completion_tokens, max_tokens, "a length finish used every token");
    }
    match body["object"].as_str().unwrap() {
        "text_completion" => assert!(choice["text"].is_string()),
        "chat.completion" => assert_eq!(choice["message"]["role"], "assistant"),
        o => panic!("unexpected object {o}"),
    }
}
