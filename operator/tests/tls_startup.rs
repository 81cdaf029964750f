//! Start-up over TLS: the kube client and object_store's S3 client are built against `https://`
//! endpoints in one process (rustls must find exactly one crypto provider), and the
//! `sluice-operator` binary, pointed at a TLS endpoint that is not a cluster, exits with a
//! connection error instead of panicking. (`sluice` is covered by `cli/tests/tls_startup.rs`,
//! `sluice-worker` over HTTPS by `worker/tests/runtime_s3.rs`; `sluice-bench` opens no
//! connection; every binary installs the provider first thing in `main`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_api::storage::{RetryPolicy, StorageOptions, resolve};

/// A port that accepts connections and closes them at once: a TLS handshake against it fails.
fn closing_listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    port
}

// Deliberately no `install_crypto_provider()` here: this checks the workspace's feature set, so
// it fails (rustls panics: "Could not automatically determine the process-level CryptoProvider")
// as soon as a dependency enables a second provider.
#[tokio::test]
async fn kube_and_s3_clients_over_https_in_one_process() {
    let port = closing_listener();
    let url: http::Uri = format!("https://127.0.0.1:{port}").parse().unwrap();
    let client = kube::Client::try_from(kube::Config::new(url)).expect("a kube client for an https:// API server");
    let err = client.apiserver_version().await.expect_err("nothing speaks TLS there");
    assert!(!err.to_string().is_empty());

    let mut opts = StorageOptions {
        endpoint: Some(format!("https://127.0.0.1:{port}")),
        retry: RetryPolicy { max_retries: 0, timeout: Duration::from_secs(5), ..RetryPolicy::default() },
        ..StorageOptions::default()
    };
    opts.config.insert("aws_access_key_id".into(), "k".into());
    opts.config.insert("aws_secret_access_key".into(), "s".into());
    let loc = resolve("s3://bucket/in.jsonl", &opts).expect("an S3 client for an https:// endpoint");
    let err = loc.head().await.expect_err("nothing speaks TLS there");
    assert!(err.to_string().contains("s3://bucket/in.jsonl"), "{err}");
}

#[test]
fn operator_against_a_tls_endpoint_that_is_not_a_cluster_exits_cleanly() {
    let port = closing_listener();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"https://127.0.0.1:{port}\"}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-operator"))
        .args(["--metrics-addr", "127.0.0.1:0", "--leader-election=false", "--crd-wait-secs", "5", "--log-format", "text"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("sluice-operator did not exit within 60 s against a non-cluster TLS endpoint");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(!out.contains("panicked"), "the operator panicked:\n{out}");
    assert!(!status.success(), "exit status {status:?}:\n{out}");
    assert!(status.code().is_some(), "killed by a signal (a panic abort?): {status:?}\n{out}");
    assert!(out.contains("batchinferencejobs.sluice.dev"), "the error should name the CRD it waited for:\n{out}");
}
