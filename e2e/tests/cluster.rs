//! Cluster end-to-end suite: runs only when `SLUICE_E2E_KUBECONFIG` names a kubeconfig of a real
//! control plane whose node runs the worker image (docs/operator.md says how: the repository's
//! own process kubelet, kind or k3d); otherwise it prints why and passes. Drives `kubectl` and
//! two real `sluice-operator` processes, out of cluster, with leader election, behind a small
//! TCP balancer that plays the chart's Service for the pods' reports.
//!
//! Cases: a manifest the API server rejects; the quickstart job on a hostPath (`file://`);
//! the same job on a PersistentVolumeClaim mounted only inside the pods (the operator cannot see
//! it); a slow job with a tight deadline that scales up and down, survives a worker pod deleted
//! mid-shard and the leader being SIGKILLed and restarted (no second Job, every custom_id exactly
//! once, the rate shown again within one sync); suspend/resume; cancel; expiry; deletion; and
//! the Batch API: `sluice serve --cluster` as its own ServiceAccount with the chart's rules,
//! driven by the official `openai` Python client (tests/openai/test_batch_api.py); and the fleet:
//! three jobs against one GpuBudget smaller than their sum, read through `kubectl sluice`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_e2e::{OutputCheck, input_ids, repo_root};

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
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn apply(&self, yaml: &str) {
        self.ok(&["apply", "-n", &self.namespace, "-f", "-"], Some(yaml));
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let mut full = args.to_vec();
        full.extend(["-n", &self.namespace, "-o", "json"]);
        let out = self.kubectl(&full, None);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// The `kubectl get bij NAME` row, split into columns.
    fn row(&self, name: &str) -> Vec<String> {
        self.ok(&["get", "bij", name, "-n", &self.namespace, "--no-headers"], None).split_whitespace().map(str::to_string).collect()
    }

    /// Poll `f` every second until it returns `Some`, or fail after `timeout` with `what`.
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
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn wait_succeeded(&self, name: &str, timeout: Duration) -> Value {
        self.wait(&format!("{name} to succeed"), timeout, || {
            let b = self.json(&["get", "bij", name])?;
            match b["status"]["phase"].as_str() {
                Some("Succeeded") => Some(b),
                Some("Failed") => panic!("{name} failed: {}", b["status"]),
                _ => None,
            }
        })
    }

    fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) -> Value {
        self.wait(&format!("{name} to be {phase}"), timeout, || {
            let b = self.json(&["get", "bij", name])?;
            match b["status"]["phase"].as_str() {
                Some(p) if p == phase => Some(b),
                Some(p @ ("Failed" | "Succeeded")) => panic!("{name} ended {p}, not {phase}: {}", b["status"]),
                _ => None,
            }
        })
    }

    fn events_of(&self, name: &str) -> Vec<Value> {
        let list = self.json(&["get", "events", "--field-selector", &format!("involvedObject.name={name}")]).unwrap();
        list["items"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.kubectl(&["delete", "namespace", &self.namespace, "--wait=false"], None);
        let _ = self.kubectl(&["delete", "pv", &format!("{}-shared-data", self.namespace), "--wait=false"], None);
        let rbac = format!("{}-sluice-operator", self.namespace);
        let _ = self.kubectl(&["delete", "clusterrole,clusterrolebinding", &rbac, "--ignore-not-found"], None);
        // The fleet case's cluster-scoped budget and node label.
        let _ = self.kubectl(&["delete", "gpubudget", &self.namespace, "--ignore-not-found"], None);
        let _ = self.kubectl(&["label", "nodes", "--all", "sluice.dev/e2e-gpu-type-"], None);
    }
}

/// One `sluice-operator` process.
struct Operator {
    child: Child,
    port: u16,
}

impl Operator {
    fn start(bin: &Path, kubeconfig: &Path, namespace: &str, port: u16, report_url: &str, image: &str, log: &Path) -> Self {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(bin)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,sluice_operator=debug")
            .args([
                &format!("--metrics-addr=127.0.0.1:{port}"),
                "--leader-election=true",
                &format!("--lease-namespace={namespace}"),
                &format!("--watch-namespace={namespace}"),
                &format!("--worker-image={image}"),
                &format!("--report-url={report_url}"),
                "--log-format=text",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting sluice-operator");
        Self { child, port }
    }

    fn is_leader(&self) -> bool {
        http_get(self.port, "/metrics").is_some_and(|m| m.lines().any(|l| l.trim() == "sluice_operator_leader 1"))
    }

    /// SIGKILL: no Lease release, no graceful shutdown.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// A TCP balancer on loopback in front of the operator replicas, as the chart's Service is in a
/// cluster: each connection goes to the next replica that accepts it (a standby answers 503 and
/// the pod retries).
fn balancer(backends: Vec<u16>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let next = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let start = next.fetch_add(1, Ordering::SeqCst);
            let upstream = (0..backends.len()).find_map(|i| TcpStream::connect(("127.0.0.1", backends[(start + i) % backends.len()])).ok());
            let Some(upstream) = upstream else { continue };
            let (mut a, mut b) = (conn.try_clone().unwrap(), upstream.try_clone().unwrap());
            let (mut c, mut d) = (conn, upstream);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut d, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

fn operator_binary() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_E2E_OPERATOR_BIN") {
        return PathBuf::from(p);
    }
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "sluice-operator", "--bin", "sluice-operator"])
        .current_dir(repo_root())
        .status()
        .unwrap();
    assert!(status.success(), "building sluice-operator failed");
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| repo_root().join("target"));
    target.join("debug").join("sluice-operator")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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

/// World-writable, so the non-root worker can write the output.
fn open_up(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777));
}

/// Model, inputs and an output directory under `dir` (the volume's root as the pods see it at
/// `/data`): the quickstart input, and `slow.jsonl` (`slow` lines with unique custom_ids).
fn seed_data(dir: &Path, slow: usize) {
    copy_dir(&repo_root().join("models/tiny-qwen2"), &dir.join("models/tiny-qwen2"));
    let quickstart = repo_root().join("manifests/examples/quickstart-input.jsonl");
    std::fs::copy(&quickstart, dir.join("quickstart-input.jsonl")).unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(&quickstart).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut out = String::new();
    for i in 0..slow {
        let mut l = lines[i % lines.len()].clone();
        l["custom_id"] = Value::String(format!("slow-{i:05}"));
        out.push_str(&l.to_string());
        out.push('\n');
    }
    std::fs::write(dir.join("slow.jsonl"), out).unwrap();
    std::fs::create_dir_all(dir.join("out")).unwrap();
    for p in [dir.to_path_buf(), dir.join("out")] {
        open_up(&p);
    }
}

/// A job reading `input` (under the volume's `/data`) with `volume` (a pod volume source as
/// YAML flow) mounted at `/data`. `worker_env` adds env entries to the worker container.
fn manifest(name: &str, volume: &str, input: &str, suspend: bool, window: &str, max: u32, worker_env: &str) -> String {
    format!(
        r#"apiVersion: sluice.dev/v1alpha1
kind: BatchInferenceJob
metadata:
  name: {name}
spec:
  model: {{uri: file:///data/models/tiny-qwen2}}
  input: {{uri: file:///data/{input}, format: openai}}
  output: {{uri: file:///data/out/{name}}}
  sampling: {{maxTokens: 8, temperature: 0.7, topP: 0.95, seed: 7}}
  sla: {{completionWindow: {window}, margin: 0.1}}
  workers:
    min: 1
    max: {max}
    gpus: 0
    maxBatchSize: 8
    podTemplate:
      spec:
        volumes:
          - {{name: data, {volume}}}
        containers:
          - name: worker
            env: [{worker_env}]
            volumeMounts:
              - {{name: data, mountPath: /data}}
  sharding: {{requestsPerShard: 60}}
  retries: {{perShard: 2}}
  suspend: {suspend}
"#
    )
}

/// A closed job's output: every custom_id once across results and errors, some requests
/// closed with `code`, and the manifest's counts adding up to the input.
fn assert_closed(out_dir: &Path, input: &Path, code: &str) {
    let out = OutputCheck::read(out_dir).unwrap();
    let ids = input_ids(input).unwrap();
    out.assert_exactly_once(&ids).unwrap();
    let closed = out.errors.iter().filter(|e| e["error"]["code"] == code).count();
    assert!(closed > 0, "no request was closed with {code}");
    let m = &out.manifest["requests"];
    assert_eq!(m["total"].as_u64(), Some(ids.len() as u64));
    assert_eq!(m["succeeded"].as_u64().unwrap() + m["failed"].as_u64().unwrap(), ids.len() as u64, "{m}");
    assert_eq!(m["succeeded"].as_u64(), Some(out.results.len() as u64));
}

/// `2026-12-04T15:32:42Z`-like: what the ETA and Deadline columns must show (never `<invalid>`).
fn is_rfc3339(s: &str) -> bool {
    s.ends_with('Z') && s.parse::<jiff::Timestamp>().is_ok()
}

fn rate_of(row: &[String]) -> f64 {
    let r = row.get(3).map(String::as_str).unwrap_or("");
    let num = r.trim_end_matches("/s");
    match num.strip_suffix('k') {
        Some(k) => k.parse::<f64>().map(|v| v * 1000.0).unwrap_or(0.0),
        None => num.parse().unwrap_or(0.0),
    }
}

fn check_columns(row: &[String]) {
    assert!(row.len() >= 9, "columns: {row:?}");
    for (i, name) in [(1, "Phase"), (2, "Done"), (3, "Rate"), (6, "SLA"), (7, "Workers")] {
        assert_ne!(row[i], "<none>", "column {name} is empty: {row:?}");
    }
    assert!(is_rfc3339(&row[4]), "ETA is not a readable time: {row:?}");
    assert!(is_rfc3339(&row[5]), "Deadline is not a readable time: {row:?}");
}

/// A kubeconfig for a ServiceAccount in the test namespace bound (cluster-wide, as the chart
/// does without a watch namespace) to a ClusterRole made of `operator/rbac.json`.
fn service_account_kubeconfig(c: &Cluster, dir: &Path) -> PathBuf {
    let rules: Value = serde_json::from_str(&std::fs::read_to_string(repo_root().join("operator/rbac.json")).unwrap()).unwrap();
    account_kubeconfig(c, dir, "sluice-operator", &rules)
}

/// A kubeconfig with the token of ServiceAccount `name`, bound cluster-wide to exactly `rules`.
fn account_kubeconfig(c: &Cluster, dir: &Path, name: &str, rules: &Value) -> PathBuf {
    let ns = &c.namespace;
    let objects = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": format!("{ns}-{name}")}, "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": format!("{ns}-{name}")},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("{ns}-{name}")},
             "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]},
        ]
    });
    c.apply(&objects.to_string());
    let token = c.ok(&["create", "token", name, "-n", ns, "--duration=2h"], None).trim().to_string();
    let server = c.ok(&["config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"], None);
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"{server}\", insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: sa, user: {{token: {token}}}}}]\ncontexts: [{{name: sa, context: {{cluster: c, user: sa}}}}]\ncurrent-context: sa\n"
        ),
    )
    .unwrap();
    path
}

/// The `sluice` binary (`SLUICE_E2E_SLUICE_BIN`, or the one built beside this test).
fn sluice_binary() -> PathBuf {
    match std::env::var("SLUICE_E2E_SLUICE_BIN") {
        Ok(p) => PathBuf::from(p),
        Err(_) => sluice_e2e::binary("sluice").expect("build it: cargo build -p sluice-cli --bin sluice"),
    }
}

/// The Batch API on the cluster: `sluice serve --cluster` with the chart's ClusterRole (create,
/// get, list, patch BatchInferenceJobs, nothing else), tenant A the suite's namespace and tenant
/// B another, files and outputs on a hostPath; the official `openai` client's flow (upload,
/// complete, pagination, cancel and expiry with every custom_id once, isolation, a bad key)
/// passes, and each batch is a BatchInferenceJob `kubectl get bij` lists.
fn batch_api_case(c: &Cluster, host_dir: &Path, worker_image: &str) {
    let probe = Command::new("python3").args(["-c", "import openai"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED the Batch API case: python3 cannot import openai (pip install openai)");
        return;
    }
    let ns = &c.namespace;
    let rules = serde_json::json!([{"apiGroups": ["sluice.dev"], "resources": ["batchinferencejobs"], "verbs": ["get", "list", "create", "patch"]}]);
    let kubeconfig = account_kubeconfig(c, host_dir, "sluice-api", &rules);
    let root = host_dir.join("api");
    std::fs::create_dir_all(&root).unwrap();
    open_up(&root);
    let config = host_dir.join("api-config.yaml");
    std::fs::write(
        &config,
        format!(
            "models:\n  tiny-qwen2: {{uri: \"file://{d}/models/tiny-qwen2\", maxTokens: 8}}\ndefaultModel: tiny-qwen2\ncluster:\n  storageUri: \"file://{r}\"\n  \
             workers:\n    max: 2\n    gpus: 0\n    maxBatchSize: 8\n    image: {worker_image}\n    podTemplate:\n      spec:\n        \
             volumes: [{{name: d, hostPath: {{path: {d}, type: Directory}}}}]\n        containers: [{{name: worker, volumeMounts: [{{name: d, mountPath: {d}}}]}}]\n",
            d = host_dir.display(),
            r = root.display()
        ),
    )
    .unwrap();
    let keys = host_dir.join("api-keys.yaml");
    let hash = |k: &str| {
        let out = Command::new("sh").args(["-c", &format!("printf %s {k} | sha256sum")]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
    };
    std::fs::write(&keys, format!("keys:\n  {}: {ns}\n  {}: {ns}-b\n", hash("sk-tenant-a"), hash("sk-tenant-b"))).unwrap();
    let port = free_port();
    let log = std::fs::File::create(host_dir.join("serve.log")).unwrap();
    let _server = KillOnDrop(
        Command::new(sluice_binary())
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .args(["serve", "--cluster", "--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(&config)
            .arg("--keys")
            .arg(&keys)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting sluice serve"),
    );
    c.wait("the Batch API to listen", Duration::from_secs(30), || http_get(port, "/healthz").filter(|b| b.contains("ok")).map(|_| ()));
    let base = format!("http://127.0.0.1:{port}/v1");
    let out = Command::new("python3")
        .arg(repo_root().join("tests/openai/test_batch_api.py"))
        .env("SLUICE_BASE_URL", &base)
        .env("SLUICE_KEY_A", "sk-tenant-a")
        .env("SLUICE_KEY_B", "sk-tenant-b")
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    let serve_log = || std::fs::read_to_string(host_dir.join("serve.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "the openai client flow failed:\n{}\n--- serve log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        serve_log()
    );
    // Every batch is a BatchInferenceJob of tenant A's namespace, labelled as the API's.
    let jobs = c.json(&["get", "bij", "-l", "sluice.dev/batch-api=true"]).unwrap();
    let phases: Vec<&str> = jobs["items"].as_array().unwrap().iter().filter_map(|j| j["status"]["phase"].as_str()).collect();
    for phase in ["Succeeded", "Cancelled", "Expired"] {
        assert!(phases.contains(&phase), "no {phase} job among {phases:?}");
    }
}

/// A child process killed when the case ends, passed or failed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `kubectl-sluice` plugin binary (`SLUICE_E2E_KUBECTL_SLUICE_BIN`, or the one built here).
fn kubectl_sluice_binary() -> PathBuf {
    match std::env::var("SLUICE_E2E_KUBECTL_SLUICE_BIN") {
        Ok(p) => PathBuf::from(p),
        Err(_) => sluice_e2e::binary("kubectl-sluice").expect("build it: cargo build -p sluice-cli --bin kubectl-sluice"),
    }
}

/// `kubectl sluice ARGS` in the suite's namespace: exit status and stdout + stderr.
fn plugin(c: &Cluster, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(kubectl_sluice_binary())
        .env("KUBECONFIG", &c.kubeconfig)
        .args(["-n", &c.namespace])
        .args(args)
        .output()
        .expect("running kubectl-sluice");
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Three jobs against a GpuBudget of 3 that their workers' sum exceeds (CPU workers count one
/// each): a slack job holding all 3, then a high-priority tight job needing 2 and a third
/// needing 1. The tight one gets its 2 from the slack one as the slack one's shards finish (no
/// running shard killed), the third waits, the parallelism of the three never adds up past 3,
/// all three complete, `kubectl sluice status` says why at each step, and the finished jobs
/// leave a throughput profile that the next quote uses. Returns what the plugin printed.
fn fleet_case(c: &Cluster, volume: &str, dir: &Path, env: &str, timeout: Duration) -> String {
    let ns = &c.namespace;
    // Only this case's jobs ask for the GPU type `ns` under the label below; the node has it.
    let node = c.ok(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"], None);
    c.ok(&["label", "node", node.trim(), &format!("sluice.dev/e2e-gpu-type={ns}"), "--overwrite"], None);
    c.apply(&format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: GpuBudget\nmetadata: {{name: {ns}}}\nspec: {{gpus: 3, gpuType: {ns}, gpuTypeLabel: sluice.dev/e2e-gpu-type}}\n"
    ));
    let job = |name: &str, input: &str, window: &str, min: u32, max: u32, priority: i32| {
        manifest(name, volume, input, false, window, max, env)
            .replace("    min: 1\n", &format!("    min: {min}\n    nodeSelector: {{sluice.dev/e2e-gpu-type: {ns}}}\n"))
            .replace(&format!("  name: {name}\n"), &format!("  name: {name}\n  annotations: {{sluice.dev/priority: \"{priority}\"}}\n"))
    };
    let parallelism = |name: &str| c.json(&["get", "job", name]).and_then(|j| j["spec"]["parallelism"].as_i64()).unwrap_or(0);
    c.apply(&job("fleet-slack", "slow.jsonl", "20m", 3, 3, 0));
    c.wait("the slack job to run 3 ready workers", Duration::from_secs(180), || {
        (c.json(&["get", "job", "fleet-slack"])?["status"]["ready"].as_i64()? >= 3).then_some(())
    });
    c.apply(&job("fleet-tight", "quickstart-input.jsonl", "15m", 2, 2, 10));
    c.apply(&job("fleet-third", "quickstart-input.jsonl", "30m", 1, 1, 0));
    let mut seen_lent = None;
    let mut seen_waiting = None;
    let mut seen: std::collections::BTreeSet<String> = Default::default();
    let mut tight_peak = 0;
    let mut peak_sum = 0;
    let names = ["fleet-slack", "fleet-tight", "fleet-third"];
    c.wait("the three fleet jobs to succeed", timeout, || {
        // One LIST: one consistent snapshot of the three Jobs (reading them one by one could
        // catch the slack one before it gave a worker back and the tight one after it took it).
        let jobs = c.json(&["get", "jobs"])?;
        let sum: i64 = jobs["items"]
            .as_array()?
            .iter()
            .filter(|j| j["metadata"]["name"].as_str().is_some_and(|n| names.contains(&n)))
            // A complete Job keeps its parallelism but runs no pods.
            .filter(|j| {
                !j["status"]["conditions"].as_array().is_some_and(|cs| cs.iter().any(|c| c["type"] == "Complete" && c["status"] == "True"))
            })
            .filter_map(|j| j["spec"]["parallelism"].as_i64())
            .sum();
        peak_sum = peak_sum.max(sum);
        let each: Vec<String> = jobs["items"]
            .as_array()?
            .iter()
            .map(|j| format!("{}={} (ready {})", j["metadata"]["name"], j["spec"]["parallelism"], j["status"]["ready"]))
            .collect();
        assert!(sum <= 3, "the three Jobs' parallelism adds up to {sum}, past the budget of 3: {each:?}");
        let slack = c.json(&["get", "bij", "fleet-slack"])?;
        let tight_p = parallelism("fleet-tight");
        if slack["status"]["phase"] == "Running" {
            tight_peak = tight_peak.max(tight_p);
        }
        seen.insert(format!("slack: {} / {}", slack["status"]["fleet"]["reason"], slack["status"]["fleet"]["message"]));
        if seen_lent.is_none() && slack["status"]["fleet"]["reason"] == "Lent" {
            seen_lent = Some((plugin(c, &["status"]).1, plugin(c, &["status", "fleet-slack"]).1));
        }
        let third = c.json(&["get", "bij", "fleet-third"])?;
        seen.insert(format!("third: {} / {}", third["status"]["fleet"]["reason"], third["status"]["fleet"]["message"]));
        if seen_waiting.is_none() && third["status"]["fleet"]["reason"] == "Waiting" {
            seen_waiting = Some(plugin(c, &["status", "fleet-third"]).1);
        }
        let budget = c.json(&["get", "gpubudget", ns])?;
        assert!(budget["status"]["heldGpus"].as_i64().unwrap_or(0) <= 3, "{}", budget["status"]);
        let phases: Vec<Value> =
            names.iter().map(|n| c.json(&["get", "bij", n]).map(|b| b["status"]["phase"].clone()).unwrap_or(Value::Null)).collect();
        if let Some(i) = phases.iter().position(|p| p == "Failed") {
            panic!("{} failed", names[i]);
        }
        phases.iter().all(|p| p == "Succeeded").then_some(())
    });
    let (fleet_text, slack_text) =
        seen_lent.unwrap_or_else(|| panic!("the slack job never lent workers (status.fleet.reason Lent); seen: {seen:#?}"));
    assert!(slack_text.contains("lent 2 workers to") && slack_text.contains("fleet-tight"), "{slack_text}");
    assert!(fleet_text.contains("fleet-tight") && fleet_text.contains("fleet-third") && fleet_text.contains("BUDGET"), "{fleet_text}");
    let waiting_text =
        seen_waiting.unwrap_or_else(|| panic!("the third job never waited for GPUs (status.fleet.reason Waiting); seen: {seen:#?}"));
    assert!(waiting_text.contains("waiting for"), "{waiting_text}");
    assert_eq!(tight_peak, 2, "the tight job never got its 2 workers while the slack job ran");
    // No running shard was killed: not one pod of the three failed.
    for n in names {
        let pods = c.json(&["get", "pods", "-l", &format!("sluice.dev/job={n}")]).unwrap();
        let failed: Vec<&str> = pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["status"]["phase"] == "Failed")
            .filter_map(|p| p["metadata"]["name"].as_str())
            .collect();
        assert!(failed.is_empty(), "{n}: pods failed: {failed:?}");
        let input = if n == "fleet-slack" { "slow.jsonl" } else { "quickstart-input.jsonl" };
        let out = OutputCheck::read(&dir.join(format!("out/{n}"))).unwrap();
        out.assert_exactly_once(&input_ids(&dir.join(input)).unwrap()).unwrap();
    }
    let reasons = |n: &str| -> Vec<String> { c.events_of(n).iter().filter_map(|e| e["reason"].as_str().map(str::to_string)).collect() };
    assert!(reasons("fleet-slack").iter().any(|r| r == "FleetLent"), "{:?}", reasons("fleet-slack"));
    assert!(reasons("fleet-third").iter().any(|r| r == "FleetWaiting"), "{:?}", reasons("fleet-third"));
    assert!(reasons("fleet-tight").iter().any(|r| r == "Quoted" || r == "InfeasibleAtAdmission"), "{:?}", reasons("fleet-tight"));
    // The finished jobs' throughput is the model's profile now; the next quote rests on it.
    let profiles = c.json(&["get", "configmap", "sluice-throughput-profiles"]).expect("the throughput profiles ConfigMap");
    assert!(profiles["data"].as_object().unwrap().keys().any(|k| k.starts_with("tiny-qwen2.cpu.")), "{profiles}");
    let next = job("fleet-next", "quickstart-input.jsonl", "30m", 1, 1, 0)
        .replace("file:///data/quickstart-input.jsonl", &format!("file://{}", dir.join("quickstart-input.jsonl").display()))
        .replace("  name: fleet-next\n", &format!("  name: fleet-next\n  namespace: {ns}\n"));
    let next_path = dir.join("fleet-next.yaml");
    std::fs::write(&next_path, next).unwrap();
    let (code, quote) = plugin(c, &["quote", &next_path.to_string_lossy(), &format!("--operator-namespace={ns}")]);
    assert_eq!(code, Some(0), "{quote}");
    assert!(
        quote.contains(&format!("against: GpuBudget {ns} (3 GPUs)")) && quote.contains("based on: learned profile tiny-qwen2.cpu."),
        "{quote}"
    );
    let (_, results) = plugin(c, &["results", "fleet-tight"]);
    assert!(results.contains("240 succeeded") || results.contains("succeeded, 0 failed, of 240"), "{results}");
    // Suspend, resume and cancel through the plugin; a finished job cannot be cancelled.
    let (code, out) = plugin(c, &["cancel", "fleet-tight"]);
    assert!(code == Some(1) && out.contains("already finished"), "{out}");
    c.apply(&manifest("fleet-plugin", volume, "quickstart-input.jsonl", true, "30m", 1, env));
    for (cmd, field, want) in [("resume", "suspend", false), ("suspend", "suspend", true), ("cancel", "cancel", true)] {
        let (code, out) = plugin(c, &[cmd, "fleet-plugin"]);
        assert_eq!(code, Some(0), "{cmd}: {out}");
        let b = c.json(&["get", "bij", "fleet-plugin"]).unwrap();
        assert_eq!(b["spec"][field], want, "{cmd}");
    }
    c.wait_phase("fleet-plugin", "Cancelled", timeout);
    let (code, out) = plugin(c, &["status", "no-such-job"]);
    assert!(code == Some(1) && out.contains("not found"), "{out}");
    eprintln!("fleet case: peak parallelism of the three {peak_sum} (budget 3)");
    format!("{fleet_text}\n{slack_text}\n{waiting_text}\n{quote}")
}

/// `spec.model.dtype: fp8` and `kvCacheDtype: fp8` accepted by the API server, wrong values
/// refused with the enums' values, and a job with both completing with every custom_id once.
fn fp8_case(c: &Cluster, volume: &str, dir: &Path, timeout: Duration) {
    let with_dtype = |name: &str, dtype: &str, kv: &str| {
        manifest(name, volume, "quickstart-input.jsonl", false, "30m", 2, "")
            .replace("tiny-qwen2}", &format!("tiny-qwen2, dtype: {dtype}, kvCacheDtype: {kv}}}"))
    };
    for (name, dtype, kv) in [("fp4", "fp4", "auto"), ("kv-int4", "fp8", "int4")] {
        let out = c.kubectl(&["apply", "--dry-run=server", "-n", &c.namespace, "-f", "-"], Some(&with_dtype(name, dtype, kv)));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("fp8"), "{name} was not refused with the choices: {stderr}");
    }
    c.apply(&with_dtype("fp8-job", "fp8", "fp8"));
    let b = c.wait_succeeded("fp8-job", timeout);
    assert_eq!(b["spec"]["model"]["dtype"], "fp8");
    assert_eq!(b["spec"]["model"]["kvCacheDtype"], "fp8");
    let out = OutputCheck::read(&dir.join("out/fp8-job")).unwrap();
    out.assert_exactly_once(&input_ids(&dir.join("quickstart-input.jsonl")).unwrap()).unwrap();
    assert_eq!(out.manifest["requests"]["succeeded"], 240);
}

#[test]
fn operator_on_a_real_cluster() {
    let Ok(kubeconfig) = std::env::var("SLUICE_E2E_KUBECONFIG") else {
        eprintln!("skipping the cluster e2e suite: SLUICE_E2E_KUBECONFIG is not set (see docs/operator.md)");
        return;
    };
    let timeout = Duration::from_secs(std::env::var("SLUICE_E2E_TIMEOUT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(900));
    let host_root = std::env::var("SLUICE_E2E_HOST_PATH").unwrap_or_else(|_| "/tmp/sluice-e2e".into());
    let pvc_root = std::env::var("SLUICE_E2E_PVC_ROOT").ok().filter(|p| !p.is_empty());
    let worker_image = std::env::var("SLUICE_E2E_WORKER_IMAGE").unwrap_or_else(|_| "sluice-worker:e2e".into());
    let slow_lines: usize = std::env::var("SLUICE_E2E_SLOW_LINES").ok().and_then(|s| s.parse().ok()).unwrap_or(1440);
    let suffix = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() % 0xffffff);
    let namespace = format!("sluice-e2e-{suffix}");
    let c = Cluster { kubeconfig, namespace: namespace.clone() };

    // Data: on a hostPath (same path here and on the node), and on the claim's directory.
    let host_dir = PathBuf::from(&host_root).join(&namespace);
    seed_data(&host_dir, slow_lines);
    let host_volume = format!("hostPath: {{path: {}, type: Directory}}", host_dir.display());
    let claim_dir = pvc_root.as_ref().map(|r| PathBuf::from(r).join(&namespace).join("shared-data"));
    if let Some(d) = &claim_dir {
        seed_data(d, slow_lines);
    }

    // CRD, namespace, a claim bound to a volume, two operator replicas behind a balancer.
    c.ok(&["apply", "--server-side", "-f", &repo_root().join("crds/batchinferencejob.yaml").to_string_lossy()], None);
    c.ok(&["apply", "--server-side", "-f", &repo_root().join("crds/gpubudget.yaml").to_string_lossy()], None);
    c.ok(&["wait", "--for=condition=established", "--timeout=60s", "crd/batchinferencejobs.sluice.dev", "crd/gpubudgets.sluice.dev"], None);
    c.ok(&["create", "namespace", &namespace], None);
    if claim_dir.is_some() {
        let pv = format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: {namespace}-shared-data}}\nspec:\n  capacity: {{storage: 1Gi}}\n  \
             accessModes: [ReadWriteMany]\n  storageClassName: \"\"\n  hostPath: {{path: /nonexistent/only-the-process-kubelet-serves-claims}}\n  \
             claimRef: {{namespace: {namespace}, name: shared-data}}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: shared-data}}\n\
             spec:\n  accessModes: [ReadWriteMany]\n  storageClassName: \"\"\n  volumeName: {namespace}-shared-data\n  resources: {{requests: {{storage: 1Gi}}}}\n"
        );
        c.apply(&pv);
        c.wait("the claim to bind", Duration::from_secs(60), || {
            (c.json(&["get", "pvc", "shared-data"])?["status"]["phase"] == "Bound").then_some(())
        });
    }
    // The operators run as the chart's ServiceAccount would: a token of a ServiceAccount bound
    // to exactly the rules of operator/rbac.json (what the chart renders), not as admin.
    let operator_kubeconfig = service_account_kubeconfig(&c, &host_dir);
    let bin = operator_binary();
    let (p1, p2) = (free_port(), free_port());
    let report_url = format!("http://127.0.0.1:{}", balancer(vec![p1, p2]));
    let logs = host_dir.join("operator.log");
    let mut ops = [
        Operator::start(&bin, &operator_kubeconfig, &namespace, p1, &report_url, &worker_image, &logs),
        Operator::start(&bin, &operator_kubeconfig, &namespace, p2, &report_url, &worker_image, &logs),
    ];
    c.wait("one operator replica to lead", Duration::from_secs(60), || ops.iter().any(Operator::is_leader).then_some(()));
    eprintln!("operators on {p1} and {p2}, reports through {report_url}, logs at {}", logs.display());

    // dtype fp8: the API server takes it (and names the choices for a wrong one); a job with it
    // runs on the CPU workers' emulated FP8 path to completion (SLUICE_E2E_ONLY=fp8: only this).
    fp8_case(&c, &host_volume, &host_dir, timeout);
    if std::env::var("SLUICE_E2E_ONLY").as_deref() == Ok("fp8") {
        eprintln!("fp8 case passed in namespace {namespace} (SLUICE_E2E_ONLY=fp8: the other cases skipped)");
        return;
    }

    // The fleet: three jobs against one GPU budget (SLUICE_E2E_ONLY=fleet runs only this case).
    let slow_env = r#"{name: SLUICE_CHUNK_LINES, value: "4"}, {name: SLUICE_PROGRESS_SECONDS, value: "5"},
              {name: SLUICE_INJECT_FAULTS, value: "delay_rate=1,delay_ms=150,error_rate=0,seed=1"}"#;
    let fleet_out = fleet_case(&c, &host_volume, &host_dir, slow_env, timeout);
    std::fs::write(host_dir.join("fleet-plugin-output.txt"), &fleet_out).unwrap();
    eprintln!("kubectl sluice during the fleet case:\n{fleet_out}");
    if std::env::var("SLUICE_E2E_ONLY").as_deref() == Ok("fleet") {
        eprintln!("fleet case passed in namespace {namespace} (SLUICE_E2E_ONLY=fleet: the other cases skipped)");
        return;
    }

    // An invalid manifest is rejected by the API server with the CEL message.
    let invalid = manifest("invalid", &host_volume, "quickstart-input.jsonl", false, "10m", 2, "")
        .replace("sla: {completionWindow: 10m", "sla: {deadline: \"2030-01-01T00:00:00Z\", completionWindow: 10m");
    let out = c.kubectl(&["apply", "-n", &namespace, "-f", "-"], Some(&invalid));
    assert!(!out.status.success(), "an invalid manifest was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("set exactly one of sla.deadline or sla.completionWindow"), "{stderr}");
    // The completion window's bounds, as `sluice validate` has them (crds/tests/crd.rs).
    for (window, message) in [("0s", Some("must be longer than zero")), ("400d", Some("must be at most 366d")), ("366d", None)] {
        let m = manifest("window", &host_volume, "quickstart-input.jsonl", false, window, 2, "");
        let out = c.kubectl(&["apply", "--dry-run=server", "-n", &namespace, "-f", "-"], Some(&m));
        let stderr = String::from_utf8_lossy(&out.stderr);
        match message {
            Some(m) => assert!(!out.status.success() && stderr.contains(m), "completionWindow {window}: {stderr}"),
            None => assert!(out.status.success(), "completionWindow {window} was refused: {stderr}"),
        }
    }

    // The quickstart job on a hostPath: planned by its own planner pod, the Job's shape, status,
    // columns, completion with a manifest, every custom_id once.
    c.apply(&manifest("quickstart", &host_volume, "quickstart-input.jsonl", false, "30m", 2, ""));
    let job = c.wait("the Job", Duration::from_secs(120), || c.json(&["get", "job", "quickstart"]));
    assert_eq!(job["spec"]["completionMode"], "Indexed");
    assert_eq!(job["spec"]["completions"], 4);
    assert_eq!(job["metadata"]["labels"]["sluice.dev/job"], "quickstart");
    assert_eq!(job["metadata"]["ownerReferences"][0]["kind"], "BatchInferenceJob");
    assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"], false);
    c.wait_succeeded("quickstart", timeout);
    check_columns(&c.row("quickstart"));
    let out = OutputCheck::read(&host_dir.join("out/quickstart")).unwrap();
    assert_eq!(out.manifest["requests"]["total"], 240);
    out.assert_exactly_once(&input_ids(&host_dir.join("quickstart-input.jsonl")).unwrap()).unwrap();
    out.assert_usage_adds_up().unwrap();
    let b = c.json(&["get", "bij", "quickstart"]).unwrap();
    assert!(b["status"]["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "Complete" && c["status"] == "True"));
    assert_eq!(b["status"]["requests"]["succeeded"].as_u64(), out.manifest["requests"]["succeeded"].as_u64());
    let reasons: Vec<String> = c.events_of("quickstart").iter().filter_map(|e| e["reason"].as_str().map(str::to_string)).collect();
    for r in ["Planned", "JobCreated", "Completed"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} event: {reasons:?}");
    }

    // The same job on a claim that only the pods mount: the operator never sees /data.
    if let Some(claim_dir) = &claim_dir {
        assert!(!Path::new("/data/quickstart-input.jsonl").exists(), "the claim must not be visible outside the pods for this case");
        c.apply(&manifest("on-a-claim", "persistentVolumeClaim: {claimName: shared-data}", "quickstart-input.jsonl", false, "30m", 2, ""));
        let b = c.wait_succeeded("on-a-claim", timeout);
        assert_eq!(b["status"]["manifestUri"], "file:///data/out/on-a-claim/manifest.json");
        let out = OutputCheck::read(&claim_dir.join("out/on-a-claim")).unwrap();
        out.assert_exactly_once(&input_ids(&claim_dir.join("quickstart-input.jsonl")).unwrap()).unwrap();
        out.assert_usage_adds_up().unwrap();
        let planned = c.events_of("on-a-claim").into_iter().find(|e| e["reason"] == "Planned").expect("a Planned event");
        assert!(planned["message"].as_str().unwrap().contains("by the job's planner pod"), "{planned}");
    } else {
        eprintln!("skipping the PersistentVolumeClaim case: SLUICE_E2E_PVC_ROOT is not set (see docs/operator.md)");
    }

    // A slow job against a tight deadline: every storage access of the workers is delayed, so
    // a shard takes seconds and the job minutes at one worker.
    let (slow_volume, slow_dir) = match &claim_dir {
        Some(d) => ("persistentVolumeClaim: {claimName: shared-data}".to_string(), d.clone()),
        None => (host_volume.clone(), host_dir.clone()),
    };
    c.apply(&manifest("slow", &slow_volume, "slow.jsonl", false, "2m", 4, slow_env));
    let slow_job_uid = c.wait("the slow Job", Duration::from_secs(120), || {
        c.json(&["get", "job", "slow"]).and_then(|j| j["metadata"]["uid"].as_str().map(str::to_string))
    });
    // While it runs: readable columns and a non-zero rate.
    let row = c.wait("a running row with a non-zero rate", Duration::from_secs(120), || {
        let row = c.row("slow");
        (row[1] == "Running" && rate_of(&row) > 0.0).then_some(row)
    });
    check_columns(&row);
    // A worker pod deleted in the middle of its shard.
    let victim = c.wait("a running worker pod", Duration::from_secs(60), || {
        let pods = c.json(&["get", "pods", "-l", "sluice.dev/job=slow"])?;
        pods["items"]
            .as_array()?
            .iter()
            .find(|p| p["status"]["phase"] == "Running")
            .and_then(|p| p["metadata"]["name"].as_str().map(str::to_string))
    });
    c.ok(&["delete", "pod", &victim, "-n", &namespace, "--wait=false"], None);
    // The leader is SIGKILLed mid-job and restarted (as its Deployment would); a replica takes
    // the Lease once it expires.
    let leader = ops.iter().position(Operator::is_leader).expect("a leader");
    ops[leader].kill();
    let killed_at = Instant::now();
    let port = ops[leader].port;
    ops[leader] = Operator::start(&bin, &operator_kubeconfig, &namespace, port, &report_url, &worker_image, &logs);
    // Whichever takes the Lease first (the standby, or the restarted process) leads.
    c.wait("a replica to lead again", Duration::from_secs(60), || ops.iter().any(Operator::is_leader).then_some(()));
    eprintln!("failover took {:?}", killed_at.elapsed());
    // Within one sync after the new leader took over, the rate is back (or the job is done).
    let took_over = Instant::now();
    let mut peak_parallelism = 0;
    let mut lowered_after_peak = false;
    c.wait("the rate after the failover", Duration::from_secs(45), || {
        let row = c.row("slow");
        if row[1] == "Running" && rate_of(&row) > 0.0 {
            check_columns(&row);
        }
        (rate_of(&row) > 0.0 || row[1] == "Succeeded").then_some(())
    });
    eprintln!("rate back {:?} after the new leader took over", took_over.elapsed());
    c.wait("the slow job to succeed while watching its parallelism", timeout, || {
        if let Some(p) = c.json(&["get", "job", "slow"]).and_then(|j| j["spec"]["parallelism"].as_i64()) {
            if p < peak_parallelism {
                lowered_after_peak = true;
            }
            peak_parallelism = peak_parallelism.max(p);
        }
        let b = c.json(&["get", "bij", "slow"])?;
        match b["status"]["phase"].as_str() {
            Some("Succeeded") => Some(()),
            Some("Failed") => panic!("slow failed: {}", b["status"]),
            _ => None,
        }
    });
    let job = c.json(&["get", "job", "slow"]).unwrap();
    assert_eq!(job["metadata"]["uid"].as_str(), Some(slow_job_uid.as_str()), "a second Job was created");
    let out = OutputCheck::read(&slow_dir.join("out/slow")).unwrap();
    out.assert_exactly_once(&input_ids(&slow_dir.join("slow.jsonl")).unwrap()).unwrap();
    out.assert_usage_adds_up().unwrap();
    assert_eq!(out.manifest["requests"]["total"].as_u64(), Some(slow_lines as u64));
    // It scaled up for the deadline and back down, and no running shard was killed for it: the
    // only failed pod is the one deleted above.
    let scaled: Vec<String> =
        c.events_of("slow").iter().filter(|e| e["reason"] == "Scaled").filter_map(|e| e["message"].as_str().map(str::to_string)).collect();
    assert!(peak_parallelism > 1, "never scaled above one worker; Scaled events: {scaled:?}");
    assert!(lowered_after_peak, "parallelism never went down from its peak {peak_parallelism}; Scaled events: {scaled:?}");
    let pods = c.json(&["get", "pods", "-l", "sluice.dev/job=slow"]).unwrap();
    let failed: Vec<&str> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"]["phase"] == "Failed")
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert!(failed.iter().all(|n| *n == victim), "pods failed besides the deleted {victim}: {failed:?}");
    check_columns(&c.row("slow"));

    // Suspend pauses, resume restarts.
    c.apply(&manifest("paused", &host_volume, "quickstart-input.jsonl", true, "30m", 2, ""));
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

    // Cancel, on the claim (the close pod does the storage work): committed results kept, every
    // request that never ran in the error files as batch_cancelled, each custom_id once.
    c.apply(&manifest("cancelled", &slow_volume, "slow.jsonl", false, "30m", 2, slow_env));
    c.wait("some committed results", Duration::from_secs(180), || {
        let b = c.json(&["get", "bij", "cancelled"])?;
        (b["status"]["requests"]["succeeded"].as_u64()? > 0).then_some(())
    });
    c.ok(&["patch", "bij", "cancelled", "-n", &namespace, "--type=merge", "-p", r#"{"spec":{"cancel":true}}"#], None);
    let undo = c.kubectl(&["patch", "bij", "cancelled", "-n", &namespace, "--type=merge", "-p", r#"{"spec":{"cancel":false}}"#], None);
    let undo_err = String::from_utf8_lossy(&undo.stderr);
    assert!(!undo.status.success() && undo_err.contains("spec.cancel cannot be undone"), "undoing a cancel: {undo_err}");
    let b = c.wait_phase("cancelled", "Cancelled", timeout);
    assert_eq!(b["status"]["closeReason"], "cancelled");
    assert_closed(&slow_dir.join("out/cancelled"), &slow_dir.join("slow.jsonl"), "batch_cancelled");
    let reasons: Vec<String> = c.events_of("cancelled").iter().filter_map(|e| e["reason"].as_str().map(str::to_string)).collect();
    for r in ["Cancelling", "Cancelled"] {
        assert!(reasons.iter().any(|x| x == r), "no {r} event: {reasons:?}");
    }
    assert_eq!(c.row("cancelled")[1], "Cancelled");

    // Expiry, on the hostPath (the operator reads the storage): a window far too short for
    // one worker, with sla.onDeadline: Expire.
    let expiring = manifest("expiring", &host_volume, "slow.jsonl", false, "40s", 1, slow_env)
        .replace("margin: 0.1}", "margin: 0.1, onDeadline: Expire}");
    c.apply(&expiring);
    let b = c.wait_phase("expiring", "Expired", timeout);
    assert_eq!(b["status"]["closeReason"], "expired");
    assert_closed(&host_dir.join("out/expiring"), &host_dir.join("slow.jsonl"), "batch_expired");
    assert!(c.events_of("expiring").iter().any(|e| e["reason"] == "Expiring" && e["type"] == "Warning"));

    batch_api_case(&c, &host_dir, &worker_image);

    // Deleting the job deletes its Jobs (owner references), never the output.
    c.ok(&["delete", "bij", "paused", "-n", &namespace, "--wait=true", "--timeout=120s"], None);
    c.wait("the Jobs to be garbage-collected", Duration::from_secs(120), || {
        (c.json(&["get", "job", "paused"]).is_none() && c.json(&["get", "job", "paused-plan"]).is_none()).then_some(())
    });
    assert!(host_dir.join("out/quickstart/manifest.json").exists());
    eprintln!("cluster suite passed in namespace {namespace}");
}
