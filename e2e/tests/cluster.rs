//! Cluster end-to-end suite: runs only when `SLUICE_E2E_KUBECONFIG` names a kubeconfig (kind,
//! k3d or any conformant cluster whose nodes can run the worker image); otherwise it prints why
//! and passes. Drives `kubectl` and the real `sluice-operator` binary, out of cluster.
//! See docs/operator.md ("End-to-end tests on a cluster") for the set-up.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Cluster {
    kubeconfig: String,
    namespace: String,
}

impl Cluster {
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", &self.kubeconfig).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().expect("kubectl must be on PATH");
        if let Some(text) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let mut full = args.to_vec();
        full.extend(["-n", &self.namespace, "-o", "json"]);
        let out = self.kubectl(&full, None);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Poll `f` every 2 s until it returns `Some`, or fail after `timeout` with `what`.
    fn wait<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if start.elapsed() > timeout {
                let events = self.kubectl(&["get", "events", "-n", &self.namespace], None);
                panic!("timed out after {timeout:?} waiting for {what}\nevents:\n{}", String::from_utf8_lossy(&events.stdout));
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.kubectl(&["delete", "namespace", &self.namespace, "--wait=false"], None);
    }
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn operator_binary() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_E2E_OPERATOR_BIN") {
        return PathBuf::from(p);
    }
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "sluice-operator", "--bin", "sluice-operator"])
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(status.success(), "building sluice-operator failed");
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("target"));
    target.join("debug").join("sluice-operator")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A permissive mode so the non-root worker can write the output on the hostPath.
fn open_up(p: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777));
    }
}

fn manifest(name: &str, host_dir: &str, suspend: bool, window: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: BatchInferenceJob
metadata:
  name: {name}
spec:
  model: {{uri: file:///data/models/tiny-qwen2}}
  input: {{uri: file:///data/quickstart-input.jsonl, format: openai}}
  output: {{uri: file:///data/out/{name}}}
  sampling: {{maxTokens: 8, temperature: 0.7, topP: 0.95, seed: 7}}
  sla: {{completionWindow: {window}, margin: 0.1}}
  workers:
    min: 1
    max: 2
    gpus: 0
    maxBatchSize: 64
    podTemplate:
      spec:
        volumes:
          - name: data
            hostPath: {{path: {host_dir}, type: Directory}}
        containers:
          - name: worker
            volumeMounts:
              - {{name: data, mountPath: /data}}
  sharding: {{requestsPerShard: 60}}
  retries: {{perShard: 2}}
  suspend: {suspend}
"#
    )
}

#[test]
fn operator_on_a_real_cluster() {
    let Ok(kubeconfig) = std::env::var("SLUICE_E2E_KUBECONFIG") else {
        eprintln!("skipping the cluster e2e suite: SLUICE_E2E_KUBECONFIG is not set (see docs/operator.md)");
        return;
    };
    let timeout = Duration::from_secs(std::env::var("SLUICE_E2E_TIMEOUT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(900));
    let host_root = std::env::var("SLUICE_E2E_HOST_PATH").unwrap_or_else(|_| "/tmp/sluice-e2e".into());
    let worker_image = std::env::var("SLUICE_E2E_WORKER_IMAGE").unwrap_or_else(|_| "ghcr.io/sluice-dev/sluice-worker:0.1.0".into());
    let suffix = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() % 0xffffff);
    let namespace = format!("sluice-e2e-{suffix}");
    let c = Cluster { kubeconfig, namespace: namespace.clone() };

    // Shared data on the hostPath: model, input, output directory.
    let host_dir = PathBuf::from(&host_root).join(&namespace);
    copy_dir(&repo().join("models/tiny-qwen2"), &host_dir.join("models/tiny-qwen2"));
    std::fs::copy(repo().join("manifests/examples/quickstart-input.jsonl"), host_dir.join("quickstart-input.jsonl")).unwrap();
    std::fs::create_dir_all(host_dir.join("out")).unwrap();
    for p in [host_dir.clone(), host_dir.join("out")] {
        open_up(&p);
    }
    let host_dir_s = host_dir.to_string_lossy().into_owned();

    // CRD, namespace, operator.
    c.ok(&["apply", "--server-side", "-f", &repo().join("crds/batchinferencejob.yaml").to_string_lossy()], None);
    c.ok(&["wait", "--for=condition=established", "--timeout=60s", "crd/batchinferencejobs.sluice.dev"], None);
    c.ok(&["create", "namespace", &namespace], None);
    let port = free_port();
    let child = Command::new(operator_binary())
        .env("KUBECONFIG", &c.kubeconfig)
        .env("RUST_LOG", "info,sluice_operator=debug")
        .args([
            &format!("--metrics-addr=127.0.0.1:{port}"),
            "--leader-election=true",
            &format!("--lease-namespace={namespace}"),
            &format!("--watch-namespace={namespace}"),
            &format!("--worker-image={worker_image}"),
            "--log-format=text",
        ])
        .spawn()
        .expect("starting sluice-operator");
    let _operator = Operator(child);

    // An invalid manifest is rejected by the API server with the CEL message.
    let invalid = manifest("invalid", &host_dir_s, false, "10m")
        .replace("sla: {completionWindow: 10m", "sla: {deadline: \"2030-01-01T00:00:00Z\", completionWindow: 10m");
    let out = c.kubectl(&["apply", "-n", &namespace, "-f", "-"], Some(&invalid));
    assert!(!out.status.success(), "an invalid manifest was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("set exactly one of sla.deadline or sla.completionWindow"), "{stderr}");

    // The quickstart job: Job shape, status, columns, completion with a manifest.
    c.ok(&["apply", "-n", &namespace, "-f", "-"], Some(&manifest("quickstart", &host_dir_s, false, "30m")));
    let job = c.wait("the Job", Duration::from_secs(120), || c.json(&["get", "job", "quickstart"]));
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(job["spec"]["completions"], 4);
    assert_eq!(job["metadata"]["labels"]["sluice.dev/job"], "quickstart");
    assert_eq!(job["metadata"]["ownerReferences"][0]["kind"], "BatchInferenceJob");
    assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"], false);
    let status = c.wait("status with conditions", Duration::from_secs(120), || {
        let b = c.json(&["get", "bij", "quickstart"])?;
        b["status"]["conditions"].as_array().filter(|cs| !cs.is_empty()).map(|_| b["status"].clone())
    });
    assert!(status["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Admitted" && c["status"] == "True"), "{status}");
    let row = c.ok(&["get", "bij", "quickstart", "-n", &namespace, "--no-headers"], None);
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert!(cols.len() >= 9, "columns: {row}");
    for (i, name) in [(1, "Phase"), (2, "Done"), (3, "Rate"), (5, "Deadline"), (6, "SLA"), (7, "Workers")] {
        assert_ne!(cols[i], "<none>", "column {name} is empty: {row}");
    }
    c.wait("the job to succeed", timeout, || {
        let b = c.json(&["get", "bij", "quickstart"])?;
        match b["status"]["phase"].as_str() {
            Some("Succeeded") => Some(()),
            Some("Failed") => panic!("the job failed: {}", b["status"]),
            _ => None,
        }
    });
    let manifest_json: Value = serde_json::from_slice(&std::fs::read(host_dir.join("out/quickstart/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest_json["requests"]["total"], 240);
    let b = c.json(&["get", "bij", "quickstart"]).unwrap();
    assert!(b["status"]["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Complete" && c["status"] == "True"));

    // Suspend pauses, resume restarts.
    c.ok(&["apply", "-n", &namespace, "-f", "-"], Some(&manifest("paused", &host_dir_s, true, "30m")));
    c.wait("a suspended Job", Duration::from_secs(120), || {
        let j = c.json(&["get", "job", "paused"])?;
        let b = c.json(&["get", "bij", "paused"])?;
        (j["spec"]["suspend"] == true && b["status"]["phase"] == "Suspended").then_some(())
    });
    c.ok(&["patch", "bij", "paused", "-n", &namespace, "--type=merge", "-p", r#"{"spec":{"suspend":false}}"#], None);
    c.wait("the Job to resume", Duration::from_secs(120), || {
        let j = c.json(&["get", "job", "paused"])?;
        let b = c.json(&["get", "bij", "paused"])?;
        (j["spec"]["suspend"] == false && matches!(b["status"]["phase"].as_str(), Some("Running" | "Succeeded"))).then_some(())
    });

    // Deleting the job deletes its Job (owner references), never the output.
    c.ok(&["delete", "bij", "paused", "-n", &namespace, "--wait=true", "--timeout=120s"], None);
    c.wait("the Job to be garbage-collected", Duration::from_secs(120), || c.json(&["get", "job", "paused"]).is_none().then_some(()));
    assert!(host_dir.join("out/quickstart/manifest.json").exists());
}
