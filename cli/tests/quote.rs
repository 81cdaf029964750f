//! `sluice quote`: the quickstart job is feasible with a projection; a window too short for one
//! worker's start-up is flagged infeasible (exit status 1) with what would make it feasible; a
//! bad manifest is a clear error (exit status 2).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn quote(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice")).arg("quote").args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const QUICKSTART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/quickstart.yaml");

#[test]
fn the_quickstart_is_quoted_feasible() {
    let (code, out, err) = quote(&[QUICKSTART, "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["requests"], 240);
    assert_eq!(v["feasible"], true);
    assert!(v["workers"].as_u64().unwrap() >= 1);
    assert!(v["projected_finish"].is_string() && v["gpu_hours"].as_f64().unwrap() > 0.0, "{v}");
    let (code, text, _) = quote(&[QUICKSTART]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains("feasible:") && text.contains("projected finish") && text.contains("based on: prior") && text.contains("accuracy:"),
        "{text}"
    );
}

#[test]
fn an_impossible_window_is_flagged_with_what_would_make_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/quickstart-input.jsonl");
    let text = std::fs::read_to_string(QUICKSTART)
        .unwrap()
        .replace("uri: quickstart-input.jsonl", &format!("uri: {input}"))
        .replace("completionWindow: 10m", "completionWindow: 1m");
    let path = dir.path().join("tight.yaml");
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = quote(&[path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("INFEASIBLE") && out.contains("would make it"), "{out}");

    std::fs::write(&path, "apiVersion: sluice.dev/v1alpha1\nkind: BatchInferenceJob\nmetadata: {name: x}\nspec: {model: {uri: m}}\n")
        .unwrap();
    let (code, _, err) = quote(&[path.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("spec"), "{err}");
}

#[test]
fn a_cluster_quote_without_a_reachable_cluster_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"https://127.0.0.1:1\"}}]\n\
         users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env("KUBECONFIG", &kubeconfig)
        .args(["quote", QUICKSTART, "--cluster"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("sluice quote: list GpuBudgets: ") || err.contains("cannot reach"), "{err}");
}
