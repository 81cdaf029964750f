//! `kubectl-sluice` without a cluster: a clear error and exit status 1 when the API server
//! cannot be reached; `quote --local` works offline; bad usage exits 2. (Against a real control
//! plane it runs in the cluster suite: e2e/tests/cluster.rs, the fleet case.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn plugin(args: &[&str]) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join("kubectl-sluice-no-cluster");
    std::fs::create_dir_all(&dir).unwrap();
    // A kubeconfig naming a server nothing listens on.
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\"}}]\n\
         users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u, namespace: ml}}]\ncurrent-context: c\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-sluice")).env("KUBECONFIG", &kubeconfig).args(args).output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

const QUICKSTART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/quickstart.yaml");

#[test]
fn without_a_reachable_cluster_each_command_fails_clearly() {
    for args in [&["status"][..], &["status", "nightly"], &["results", "nightly"], &["cancel", "nightly"], &["quote", QUICKSTART]] {
        let (code, out) = plugin(args);
        assert_eq!(code, Some(if args[0] == "quote" { 2 } else { 1 }), "{args:?}: {out}");
        assert!(out.starts_with("kubectl-sluice: ") && (out.contains("127.0.0.1:1") || out.contains("onnect")), "{args:?}: {out}");
    }
}

#[test]
fn a_local_quote_needs_no_cluster_and_usage_errors_exit_2() {
    let (code, out) = plugin(&["quote", QUICKSTART, "--local"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("feasible:") && out.contains("based on: prior") && out.contains("accuracy:"), "{out}");
    let (code, out) = plugin(&["frobnicate"]);
    assert_eq!(code, Some(2), "{out}");
}
