//! Starting `sluice serve --local` for the integration tests (a free port, read back from its
//! first line of output) and a minimal HTTP/1.1 client, so the tests need no client crate.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub struct Server {
    pub child: Child,
    pub addr: String,
    pub stderr_path: std::path::PathBuf,
}

impl Server {
    /// Start the server on `data_dir` with extra arguments; waits until it listens.
    pub fn start(data_dir: &Path, args: &[&str]) -> Server {
        let stderr_path = data_dir.with_extension(format!("stderr-{}", rand_suffix()));
        let err = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--local", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(args)
            // Stopped workers give up unfinished requests sooner than the 25 s default.
            .env("SLUICE_GRACE_SECONDS", "3")
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}; stderr: {}", std::fs::read_to_string(&stderr_path).unwrap_or_default()))
            .to_string();
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Server { child, addr, stderr_path }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }

    /// One HTTP/1.0 request (so the answer is never chunked); returns the status and the body.
    pub fn raw(&self, method: &str, path: &str, key: Option<&str>, content_type: Option<&str>, body: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: {}\r\n", self.addr, body.len());
        if let Some(k) = key {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        if let Some(c) = content_type {
            head.push_str(&format!("Content-Type: {c}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let text = String::from_utf8_lossy(&resp).to_string();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, body.to_string())
    }

    /// One request; returns the status and the JSON body (Null when the body is not JSON).
    pub fn call(&self, method: &str, path: &str, key: Option<&str>, content_type: Option<&str>, body: &[u8]) -> (u16, Value) {
        let (status, text) = self.raw(method, path, key, content_type, body);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The custom_ids of a finished batch's output and error files, and the error codes.
    pub fn results(&self, batch: &Value, key: Option<&str>) -> (Vec<String>, Vec<String>) {
        let (mut ids, mut codes) = (vec![], vec![]);
        for field in ["output_file_id", "error_file_id"] {
            let Some(id) = batch[field].as_str() else { continue };
            let (status, text) = self.raw("GET", &format!("/v1/files/{id}/content"), key, None, b"");
            assert_eq!(status, 200, "{text}");
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line).unwrap();
                ids.push(v["custom_id"].as_str().unwrap().to_string());
                if let Some(c) = v["error"]["code"].as_str() {
                    codes.push(c.to_string());
                }
            }
        }
        ids.sort();
        (ids, codes)
    }

    pub fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        self.call("GET", path, key, None, b"")
    }

    pub fn post_json(&self, path: &str, key: Option<&str>, body: &Value) -> (u16, Value) {
        self.call("POST", path, key, Some("application/json"), body.to_string().as_bytes())
    }

    /// `POST /v1/files` with the given purpose (None: leave the field out) and content.
    pub fn upload(&self, key: Option<&str>, purpose: Option<&str>, content: &str) -> (u16, Value) {
        let b = "sluiceboundary7";
        let mut body = String::new();
        if let Some(p) = purpose {
            body.push_str(&format!("--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{p}\r\n"));
        }
        body.push_str(&format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n{content}\r\n--{b}--\r\n"
        ));
        self.call("POST", "/v1/files", key, Some(&format!("multipart/form-data; boundary={b}")), body.as_bytes())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
        ^ u64::from(std::process::id())
}

/// The SHA-256 of `key` in hex (as the keys file stores it), via the crate's own function.
pub fn keys_file(dir: &Path, entries: &[(&str, &str)], tenants_yaml: &str) -> std::path::PathBuf {
    let mut text = String::from("keys:\n");
    for (key, tenant) in entries {
        text.push_str(&format!("  {}: {tenant}\n", sluice_cli::serve::config::hash_key(key)));
    }
    text.push_str(tenants_yaml);
    let path = dir.join("keys.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// OpenAI batch input lines for the bundled model.
pub fn chat_lines(prefix: &str, n: usize, model: &str) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({"custom_id": format!("{prefix}-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": format!("hi {i}")}], "max_tokens": 4}})
            .to_string()
                + "\n"
        })
        .collect()
}

/// Requests slow enough on the tiny model that a cancel or a short window lands mid-run.
pub fn slow_lines(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({"custom_id": format!("{prefix}-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "tiny-qwen2", "messages": [{"role": "user", "content": format!("hi {i}")}], "max_tokens": 400, "temperature": 1.0}})
            .to_string()
                + "\n"
        })
        .collect()
}

/// The sorted custom_ids `prefix-0..n`.
pub fn expected_ids(prefix: &str, n: usize) -> Vec<String> {
    let mut v: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    v.sort();
    v
}

/// Poll a batch until it has `status`.
pub fn wait_status(s: &Server, id: &str, key: Option<&str>, status: &str) -> Value {
    for _ in 0..600 {
        let (code, b) = s.get(&format!("/v1/batches/{id}"), key);
        assert_eq!(code, 200, "{b}");
        if b["status"] == status {
            return b;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("batch {id} never reached {status}");
}

/// Poll a batch until it leaves the in-flight states.
pub fn wait_done(s: &Server, id: &str, key: Option<&str>) -> Value {
    for _ in 0..600 {
        let (code, b) = s.get(&format!("/v1/batches/{id}"), key);
        assert_eq!(code, 200, "{b}");
        if !matches!(b["status"].as_str(), Some("validating" | "in_progress" | "finalizing" | "cancelling")) {
            return b;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!("batch {id} did not finish");
}
