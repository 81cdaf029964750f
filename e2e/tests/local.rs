//! Local mode end to end, through the real binaries: the quickstart, a worker killed mid-shard,
//! a rerun of a finished job, and bad manifests that must fail without writing anything.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_e2e::{OutputCheck, binary, input_ids, repo_root};

fn sluice(args: &[&str]) -> Output {
    let bin = binary("sluice").unwrap();
    Command::new(bin).args(args).env("RUST_LOG", "warn").stdin(Stdio::null()).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", o.status.code(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn summary(o: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| panic!("no summary line\n{}", text(o)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("summary is not JSON ({e})\n{}", text(o)))
}

fn quickstart() -> PathBuf {
    repo_root().join("manifests/examples/quickstart.yaml")
}

#[test]
fn quickstart_runs_exactly_once_and_rerun_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let started = Instant::now();
    let o = sluice(&["run", quickstart().to_str().unwrap(), "--output", out.to_str().unwrap(), "--json", "--poll-seconds", "0.2"]);
    assert!(o.status.success(), "{}", text(&o));
    eprintln!("quickstart took {:.1} s", started.elapsed().as_secs_f64());
    let s = summary(&o);
    assert_eq!(s["status"], "Succeeded", "{s}");

    let ids = input_ids(&repo_root().join("manifests/examples/quickstart-input.jsonl")).unwrap();
    let check = OutputCheck::read(&out).unwrap();
    check.assert_exactly_once(&ids).unwrap();
    check.assert_usage_adds_up().unwrap();
    assert_eq!(check.results.len() + check.errors.len(), ids.len());
    assert_eq!(s["requests_total"], ids.len());
    // The manifest lists every shard of the plan.
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(out.join("_sluice/plan.json")).unwrap()).unwrap();
    let planned: Vec<u64> = plan["shards"].as_array().unwrap().iter().map(|s| s["index"].as_u64().unwrap()).collect();
    let listed: Vec<u64> = check.manifest["shards"].as_array().unwrap().iter().map(|s| s["index"].as_u64().unwrap()).collect();
    assert_eq!(planned, listed);
    assert!(planned.len() > 1, "the quickstart should have several shards");
    // Results have the OpenAI batch output shape.
    let r = &check.results[0];
    assert_eq!(r["response"]["status_code"], 200);
    assert_eq!(r["response"]["body"]["object"], "chat.completion");
    assert!(r["error"].is_null());

    // A second run of a finished job is a no-op that reports the existing results.
    let manifest_before = std::fs::read(out.join("manifest.json")).unwrap();
    let o = sluice(&["run", quickstart().to_str().unwrap(), "--output", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = summary(&o);
    assert_eq!(s["status"], "AlreadyComplete");
    assert_eq!(s["requests_succeeded"].as_u64().unwrap() + s["requests_failed"].as_u64().unwrap(), ids.len() as u64);
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), manifest_before);

    // `sluice status` reads the state back from storage.
    let o = sluice(&["status", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let st = String::from_utf8_lossy(&o.stdout);
    assert!(st.contains("Complete at"), "{st}");
}

fn write_job(dir: &Path, lines: usize, per_shard: usize, max_tokens: u32, batch: u32) -> PathBuf {
    let mut input = String::new();
    for i in 0..lines {
        input.push_str(&format!(
            "{{\"custom_id\":\"k-{i}\",\"method\":\"POST\",\"url\":\"/v1/completions\",\"body\":{{\"prompt\":\"Request number {i} says\",\"max_tokens\":{max_tokens}}}}}\n"
        ));
    }
    std::fs::write(dir.join("in.jsonl"), input).unwrap();
    let model = repo_root().join("models/tiny-qwen2");
    let manifest = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: BatchInferenceJob\nmetadata: {{name: killtest}}\nspec:\n  model: {{uri: {}}}\n  input: {{uri: in.jsonl}}\n  output: {{uri: out}}\n  sampling: {{maxTokens: {max_tokens}, temperature: 0.8, seed: 3}}\n  sla: {{completionWindow: 1h}}\n  workers: {{min: 1, max: 1, gpus: 0, maxBatchSize: {batch}}}\n  sharding: {{requestsPerShard: {per_shard}}}\n  retries: {{perShard: 3}}\n",
        model.display()
    );
    let path = dir.join("job.yaml");
    std::fs::write(&path, manifest).unwrap();
    path
}

/// Direct children of `pid` that are still running (not zombies), from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let mut fields = after.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(pid) && state != "Z" {
            out.push(child);
        }
    }
    out
}

/// Start `sluice run` on a job slow enough to interrupt: small chunks, one sequence at a time,
/// one worker, so a worker is surely mid-shard once its first chunk is committed.
fn start_slow_job(dir: &Path) -> (PathBuf, std::process::Child) {
    let job = write_job(dir, 64, 32, 48, 1);
    let run = Command::new(binary("sluice").unwrap())
        .env("SLUICE_CHUNK_LINES", "4")
        .args(["run", job.to_str().unwrap(), "--json", "--max-workers", "1", "--poll-seconds", "0.1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (job, run)
}

/// Wait (up to 120 s) until some shard has a committed chunk under `shards` while `run` is
/// still running; `false` if it exited or the time ran out first.
fn wait_for_committed_chunk(run: &mut std::process::Child, shards: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && run.try_wait().unwrap().is_none() {
        let committed = std::fs::read_dir(shards)
            .map(|d| d.flatten().any(|s| std::fs::read_dir(s.path()).map(|c| c.count() > 0).unwrap_or(false)))
            .unwrap_or(false);
        if committed {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn killed_worker_is_retried_and_output_stays_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // Small chunks and one sequence at a time, so a worker is surely mid-shard when killed.
    let (_job, mut run) = start_slow_job(dir.path());
    // Wait until a worker has committed something, then SIGKILL it mid-shard.
    let shards = dir.path().join("out/_sluice/shards");
    let mut killed = false;
    while !killed && wait_for_committed_chunk(&mut run, &shards) {
        for child in children(run.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child as i32), nix::sys::signal::Signal::SIGKILL);
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = run.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(killed, "the job finished before a worker could be killed; make it slower\n{}", text(&o));
    let s = summary(&o);
    assert!(s["shard_retries"].as_u64().unwrap() >= 1, "{s}");
    let ids = input_ids(&dir.path().join("in.jsonl")).unwrap();
    let check = OutputCheck::read(&dir.path().join("out")).unwrap();
    check.assert_exactly_once(&ids).unwrap();
    check.assert_usage_adds_up().unwrap();
}

fn assert_rejected(manifest: &str, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.jsonl"), "{\"id\":\"a\",\"prompt\":\"x\"}\n").unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, manifest).unwrap();
    let o = sluice(&["run", path.to_str().unwrap(), "--json"]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(expect), "expected {expect:?} in\n{}", text(&o));
    assert!(!dir.path().join("out").exists(), "a rejected job wrote output");
}

const HEAD: &str = "apiVersion: sluice.dev/v1alpha1\nkind: BatchInferenceJob\nmetadata: {name: bad}\nspec:\n";

#[test]
fn bad_manifests_fail_without_writing() {
    let model = repo_root().join("models/tiny-qwen2");
    let model = model.display();
    // missing field
    assert_rejected(&format!("{HEAD}  model: {{uri: {model}}}\n  output: {{uri: out}}\n  sla: {{completionWindow: 1h}}\n"), "input");
    // both deadline and window
    assert_rejected(
        &format!(
            "{HEAD}  model: {{uri: {model}}}\n  input: {{uri: in.jsonl}}\n  output: {{uri: out}}\n  sla: {{completionWindow: 1h, deadline: \"2030-01-01T00:00:00Z\"}}\n"
        ),
        "set exactly one of sla.deadline or sla.completionWindow",
    );
    // unreadable input
    assert_rejected(
        &format!(
            "{HEAD}  model: {{uri: {model}}}\n  input: {{uri: missing.jsonl}}\n  output: {{uri: out}}\n  sla: {{completionWindow: 1h}}\n"
        ),
        "missing.jsonl",
    );
    // min > max
    assert_rejected(
        &format!(
            "{HEAD}  model: {{uri: {model}}}\n  input: {{uri: in.jsonl}}\n  output: {{uri: out}}\n  sla: {{completionWindow: 1h}}\n  workers: {{min: 3, max: 1}}\n"
        ),
        "workers.min must be less than or equal to workers.max",
    );
    // model directory that does not exist
    assert_rejected(
        &format!(
            "{HEAD}  model: {{uri: /nonexistent/model}}\n  input: {{uri: in.jsonl}}\n  output: {{uri: out}}\n  sla: {{completionWindow: 1h}}\n"
        ),
        "spec.model.uri: file:///nonexistent/model: no such directory",
    );
    // not YAML at all
    assert_rejected("spec: [unclosed\n", "not valid YAML");
}

#[test]
fn ctrl_c_stops_gracefully_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (job, mut run) = start_slow_job(dir.path());
    let interrupted = wait_for_committed_chunk(&mut run, &dir.path().join("out/_sluice/shards"));
    if interrupted {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    }
    assert!(interrupted, "the job finished before it could be interrupted");
    let stopped_at = Instant::now();
    let o = run.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(stopped_at.elapsed() < Duration::from_secs(30), "graceful stop took too long");
    assert!(String::from_utf8_lossy(&o.stderr).contains("resume"), "{}", text(&o));
    assert!(!dir.path().join("out/manifest.json").exists());

    let o = Command::new(binary("sluice").unwrap()).args(["run", job.to_str().unwrap(), "--json"]).stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let ids = input_ids(&dir.path().join("in.jsonl")).unwrap();
    let check = OutputCheck::read(&dir.path().join("out")).unwrap();
    check.assert_exactly_once(&ids).unwrap();
    check.assert_usage_adds_up().unwrap();
}

#[test]
fn status_of_a_prefix_without_a_job_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let o = sluice(&["status", dir.path().to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no plan found"), "{}", text(&o));
    let o = sluice(&["validate", repo_root().join("manifests/examples/openai-24h-s3.yaml").to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_cancelled_job_writes_every_request_as_batch_cancelled_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), 20, 10, 4, 4);
    let text_of = std::fs::read_to_string(&job).unwrap().replace("  sla:", "  cancel: true\n  sla:");
    std::fs::write(&job, text_of).unwrap();
    let o = sluice(&["run", job.to_str().unwrap(), "--json", "--poll-seconds", "0.1"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = summary(&o);
    assert_eq!(s["status"], "Cancelled", "{s}");
    let check = OutputCheck::read(&dir.path().join("out")).unwrap();
    check.assert_exactly_once(&input_ids(&dir.path().join("in.jsonl")).unwrap()).unwrap();
    assert!(check.results.is_empty());
    assert!(check.errors.iter().all(|e| e["error"]["code"] == "batch_cancelled"), "{:?}", check.errors.first());
    assert_eq!((s["requests_succeeded"].as_u64(), s["requests_failed"].as_u64()), (Some(0), Some(20)));
}

#[test]
fn a_job_past_its_deadline_with_on_deadline_expire_ends_expired_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    // About 15 s of work at one worker (one sequence at a time), against a 2 s window.
    let job = write_job(dir.path(), 480, 120, 48, 1);
    let text_of = std::fs::read_to_string(&job).unwrap().replace("completionWindow: 1h}", "completionWindow: 2s, onDeadline: Expire}");
    std::fs::write(&job, text_of).unwrap();
    let o = Command::new(binary("sluice").unwrap())
        .env("SLUICE_CHUNK_LINES", "4")
        .env("RUST_LOG", "warn")
        .args(["run", job.to_str().unwrap(), "--json", "--max-workers", "1", "--poll-seconds", "0.1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let s = summary(&o);
    assert_eq!(s["status"], "Expired", "{s}");
    assert_eq!(s["deadline_met"], false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("sla.onDeadline is Expire"), "{}", text(&o));
    let check = OutputCheck::read(&dir.path().join("out")).unwrap();
    check.assert_exactly_once(&input_ids(&dir.path().join("in.jsonl")).unwrap()).unwrap();
    let expired = check.errors.iter().filter(|e| e["error"]["code"] == "batch_expired").count();
    assert!(expired > 0, "nothing was left to expire: {s}");
    assert_eq!(check.results.len() + expired, 480);
    // A rerun reports the closed job as it is.
    let o = sluice(&["run", job.to_str().unwrap(), "--json"]);
    assert_eq!(summary(&o)["status"], "AlreadyComplete");
}
