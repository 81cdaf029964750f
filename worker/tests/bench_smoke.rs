//! Smoke test of the `sluice-bench` binary on CPU: a tiny random-weight model, a few requests,
//! and the JSON line's fields; plus its usage errors.

use std::process::Command;

#[allow(clippy::unwrap_used)]
fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice-bench")).args(args).output().unwrap()
}

#[test]
fn tiny_cpu_run_prints_the_fields() {
    let out = bench(&[
        "--model",
        "tiny-qwen2",
        "--device",
        "cpu",
        "--requests",
        "5",
        "--input-len",
        "12",
        "--output-len",
        "6",
        "--max-num-seqs",
        "3",
        "--warmup-requests",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sluice-bench failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line expected, got {stdout:?}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let obj = v.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = vec![
        "device",
        "dtype",
        "kv_cache_dtype",
        "model",
        "requests",
        "input_len",
        "output_len",
        "wall_s",
        "requests_per_s",
        "output_tokens_per_s",
        "total_tokens_per_s",
        "tpot_mean_ms",
        "tpot_p99_ms",
        "ttft_mean_ms",
        "peak_kv_blocks",
        "prefix_caching",
        "prefix_cache_hit_rate",
        "preemptions",
        "steps",
        "graph_steps",
        "split_steps",
    ];
    want.sort_unstable();
    assert_eq!(keys, want);
    assert_eq!(v["device"], "cpu");
    // CUDA graphs are a GPU path: a CPU run launches none.
    assert_eq!(v["graph_steps"], 0);
    // Splitting steps in two is off by default (SLUICE_NANO_BATCHES=1).
    assert_eq!(v["split_steps"], 0);
    assert_eq!(v["dtype"], "f32");
    assert_eq!(v["kv_cache_dtype"], "f32");
    assert_eq!(v["model"], "tiny-qwen2");
    assert_eq!(v["requests"], 5);
    assert_eq!(v["input_len"], 12);
    assert_eq!(v["output_len"], 6);
    let wall = v["wall_s"].as_f64().unwrap();
    assert!(wall > 0.0);
    // Every request produced exactly output_len tokens (EOS ignored).
    let out_tps = v["output_tokens_per_s"].as_f64().unwrap();
    assert!((out_tps * wall - 30.0).abs() < 1e-6, "{out_tps} * {wall}");
    let total_tps = v["total_tokens_per_s"].as_f64().unwrap();
    assert!((total_tps * wall - 90.0).abs() < 1e-6);
    assert!((v["requests_per_s"].as_f64().unwrap() * wall - 5.0).abs() < 1e-6);
    let p99 = v["tpot_p99_ms"].as_f64().unwrap();
    assert!(p99 > 0.0 && p99 >= v["tpot_mean_ms"].as_f64().unwrap() * 0.999);
    assert!(v["ttft_mean_ms"].as_f64().unwrap() > 0.0);
    // 3 running sequences of at most 18 tokens in 16-token blocks: 2 blocks each.
    let peak = v["peak_kv_blocks"].as_u64().unwrap();
    assert!((1..=6).contains(&peak), "peak_kv_blocks {peak}");
}

#[test]
fn shared_prefix_workload_hits_the_cache_only_when_it_is_on() {
    let run = |switch: &str| {
        let out = bench(&[
            "--model",
            "tiny-qwen2",
            "--device",
            "cpu",
            "--workload",
            "shared-prefix",
            "--requests",
            "6",
            "--shared-len",
            "48",
            "--input-len",
            "5",
            "--output-len",
            "3",
            "--prefix-caching",
            switch,
        ]);
        assert!(out.status.success(), "sluice-bench failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let on = run("on");
    assert_eq!(on["input_len"], "48+5");
    assert_eq!(on["prefix_caching"], true);
    // 5 of 6 requests find the 3 shared blocks: 5 * 48 of 6 * 53 prompt tokens.
    let rate = on["prefix_cache_hit_rate"].as_f64().unwrap();
    assert!((rate - 240.0 / 318.0).abs() < 1e-9, "hit rate {rate}");
    let off = run("off");
    assert_eq!(off["prefix_cache_hit_rate"], 0.0);
    let bad = bench(&["--model", "tiny-qwen2", "--device", "cpu", "--prefix-caching", "maybe"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--prefix-caching"));
}

#[test]
fn unknown_preset_is_a_usage_error() {
    let out = bench(&["--model", "gpt-9", "--device", "cpu"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gpt-9") && stderr.contains("unknown preset"), "{stderr}");
}

#[test]
fn bad_device_is_a_usage_error() {
    let out = bench(&["--model", "tiny-qwen2", "--device", "tpu"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--device tpu"), "{stderr}");
}
