//! The real `sluice-worker` binary against a real S3-compatible server on 127.0.0.1 (moto,
//! started by `scripts/s3-test-server.sh`; its endpoint in `SLUICE_TEST_S3_ENDPOINT`): input,
//! plan, output and the model itself in a bucket; and against the same server over HTTPS with a
//! private CA (`SLUICE_TEST_S3_TLS_*`) through `SLUICE_STORAGE_CA_FILE`. Skipped, with a
//! message, when they are unset.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};

use bytes::Bytes;
use common::*;
use sluice_api::contract::{env, exit, layout};
use sluice_api::storage::{CaBundle, Location, PutOutcome, StorageOptions, resolve};

/// The test server's endpoint, or `None` (with the reason printed) when the S3 tests must skip:
/// no server, or no credentials for the in-process S3 client.
fn endpoint() -> Option<String> {
    let ep = match std::env::var("SLUICE_TEST_S3_ENDPOINT") {
        Ok(e) if !e.is_empty() => e,
        _ => {
            eprintln!("skipped: SLUICE_TEST_S3_ENDPOINT is not set (start one with `source scripts/s3-test-server.sh`)");
            return None;
        }
    };
    if std::env::var("AWS_ACCESS_KEY_ID").is_err() {
        eprintln!("skipped: AWS_ACCESS_KEY_ID is not set for the in-process S3 client (scripts/s3-test-server.sh exports it)");
        return None;
    }
    Some(ep)
}

fn creds(c: &mut std::process::Command) {
    for (k, v) in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")] {
        if std::env::var(k).is_err() {
            c.env(k, v);
        }
    }
}

fn opts(endpoint: &str) -> StorageOptions {
    StorageOptions {
        endpoint: Some(endpoint.to_string()),
        region: Some("us-east-1".into()),
        path_style: true,
        allow_http: true,
        ..Default::default()
    }
}

/// Create a bucket with a plain HTTP PUT (moto does not check signatures).
fn create_bucket(endpoint: &str, bucket: &str) {
    let hostport = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    write!(s, "PUT /{bucket} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200") || out.contains("BucketAlreadyOwnedByYou"), "create bucket {bucket}: {out}");
}

fn unique_bucket(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("sluice-{tag}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn s3(uri: &str, endpoint: &str) -> Location {
    resolve(uri, &opts(endpoint)).unwrap()
}

fn s3_worker(endpoint: &str, output: &str, shard: u32) -> std::process::Command {
    let mut c = worker(output, shard);
    c.env(env::STORAGE_ENDPOINT, endpoint)
        .env(env::STORAGE_REGION, "us-east-1")
        .env(env::STORAGE_ALLOW_HTTP, "true")
        .env(env::STORAGE_PATH_STYLE, "true");
    creds(&mut c);
    c
}

#[test]
fn a_job_on_s3_completes_with_the_model_fetched_from_the_bucket() {
    let Some(ep) = endpoint() else { return };
    let bucket = unique_bucket("job");
    create_bucket(&ep, &bucket);
    let rt = rt();
    let mut lines = prompt_lines(10);
    lines.push(b"{not json".to_vec());
    lines.push(br#"{"custom_id":"chat","url":"/v1/chat/completions","body":{"messages":[{"role":"user","content":"hi"}]}}"#.to_vec());
    let input_uri = format!("s3://{bucket}/in/requests.jsonl");
    let output_uri = format!("s3://{bucket}/out");
    let plan = plan_for(&input_uri, &lines, 5);
    rt.block_on(async {
        s3(&input_uri, &ep).put(Bytes::from(body(&lines))).await.unwrap();
        s3(&output_uri, &ep).join(layout::PLAN).unwrap().put(Bytes::from(serde_json::to_vec(&plan).unwrap())).await.unwrap();
        for f in std::fs::read_dir(tiny_model()).unwrap() {
            let f = f.unwrap();
            let uri = format!("s3://{bucket}/models/tiny-qwen2/{}", f.file_name().to_string_lossy());
            s3(&uri, &ep).put(Bytes::from(std::fs::read(f.path()).unwrap())).await.unwrap();
        }
    });
    let cache = tempfile::tempdir().unwrap();
    for shard in 0..3 {
        let mut c = s3_worker(&ep, &output_uri, shard);
        c.env(env::MODEL_URI, format!("s3://{bucket}/models/tiny-qwen2/")).env(env::MODEL_CACHE_DIR, cache.path());
        let out = run(c);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(exit::SUCCESS), "{err}");
        assert!(err.contains(if shard == 0 { "model downloaded" } else { "model already in the cache" }), "{err}");
        let (results, errors) = rt.block_on(async {
            let out = s3(&output_uri, &ep);
            let r = out.join(&layout::results(shard)).unwrap().get_bytes().await.unwrap();
            let e = out.join(&layout::errors(shard)).unwrap().get_bytes().await.unwrap();
            (parse_jsonl(&r), parse_jsonl(&e))
        });
        assert_exactly_once(&plan, shard, &results, &errors, |_| 4);
        if shard == 2 {
            assert_eq!(errors.len(), 1);
            assert_eq!(errors[0].error.as_ref().unwrap().code, "invalid_json");
            assert!(results.iter().any(|r| r.response.as_ref().unwrap().body["object"] == "chat.completion"));
        }
        let progress: sluice_api::progress::ShardProgress = rt.block_on(async {
            serde_json::from_slice(&s3(&output_uri, &ep).join(&layout::progress(shard)).unwrap().get_bytes().await.unwrap()).unwrap()
        });
        assert!(progress.complete);
    }
    assert!(std::fs::read_dir(cache.path()).unwrap().next().is_some(), "the model was cached");

    // Kill an attempt mid-shard and rerun it: exactly once on S3 as well.
    let big = prompt_lines(80);
    let big_input = format!("s3://{bucket}/in/big.jsonl");
    let big_out = format!("s3://{bucket}/big-out");
    let big_plan = plan_for(&big_input, &big, 80);
    rt.block_on(async {
        s3(&big_input, &ep).put(Bytes::from(body(&big))).await.unwrap();
        s3(&big_out, &ep).join(layout::PLAN).unwrap().put(Bytes::from(serde_json::to_vec(&big_plan).unwrap())).await.unwrap();
    });
    let mut c = s3_worker(&ep, &big_out, 0);
    c.env(env::SAMPLING, r#"{"maxTokens":24}"#);
    let mut child = c.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let _ = child.kill();
    let _ = child.wait();
    let mut c = s3_worker(&ep, &big_out, 0);
    c.env(env::SAMPLING, r#"{"maxTokens":24}"#);
    let out = run(c);
    assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", stderr(&out));
    let (results, errors) = rt.block_on(async {
        let out = s3(&big_out, &ep);
        (
            parse_jsonl(&out.join(&layout::results(0)).unwrap().get_bytes().await.unwrap()),
            parse_jsonl(&out.join(&layout::errors(0)).unwrap().get_bytes().await.unwrap()),
        )
    });
    assert_exactly_once(&big_plan, 0, &results, &errors, |_| 24);
}

#[test]
fn s3_storage_semantics_missing_objects_and_create_only_puts() {
    let Some(ep) = endpoint() else { return };
    let bucket = unique_bucket("sem");
    create_bucket(&ep, &bucket);
    rt().block_on(async {
        let base = s3(&format!("s3://{bucket}/p"), &ep);
        let obj = base.join("a/b.jsonl").unwrap();
        let e = obj.get_bytes().await.unwrap_err();
        assert!(e.is_permanent() && e.to_string().contains(&format!("s3://{bucket}/p/a/b.jsonl")), "{e}");
        assert_eq!(obj.put_create(Bytes::from_static(b"one\ntwo\nthree")).await.unwrap(), PutOutcome::Created);
        assert_eq!(obj.put_create(Bytes::from_static(b"other")).await.unwrap(), PutOutcome::AlreadyExists);
        assert_eq!(obj.get_bytes().await.unwrap(), Bytes::from_static(b"one\ntwo\nthree"));
        let mut r = obj.lines(4..13, 100).await.unwrap();
        let mut got = Vec::new();
        while let Some(l) = r.next_line().await.unwrap() {
            got.push(String::from_utf8(l.bytes.to_vec()).unwrap());
        }
        assert_eq!(got, ["two", "three"]);
        assert_eq!(base.list().await.unwrap().len(), 1);
        let missing_bucket = s3(&format!("s3://{bucket}-nope/x"), &ep);
        assert!(missing_bucket.get_bytes().await.is_err());
    });
    // The worker names the missing input and exits with the permanent code.
    let out_uri = format!("s3://{bucket}/missing-out");
    let plan = plan_for(&format!("s3://{bucket}/nope.jsonl"), &prompt_lines(2), 2);
    rt().block_on(async {
        s3(&out_uri, &ep).join(layout::PLAN).unwrap().put(Bytes::from(serde_json::to_vec(&plan).unwrap())).await.unwrap()
    });
    let out = run(s3_worker(&ep, &out_uri, 0));
    assert_eq!(out.status.code(), Some(exit::PERMANENT), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("s3://{bucket}/nope.jsonl")), "{}", stderr(&out));
}

/// The HTTPS test server (moto with a certificate from a CA that `scripts/s3-test-server.sh`
/// makes), its CA file and a bucket on it, or `None` with the reason printed.
fn tls_server() -> Option<(String, std::path::PathBuf, String)> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("SLUICE_TEST_S3_TLS_ENDPOINT"), var("SLUICE_TEST_S3_TLS_CA"), var("SLUICE_TEST_S3_TLS_BUCKET")) {
        (Some(ep), Some(ca), Some(bucket)) => Some((ep, ca.into(), bucket)),
        _ => {
            eprintln!(
                "skipped: SLUICE_TEST_S3_TLS_ENDPOINT, SLUICE_TEST_S3_TLS_CA or SLUICE_TEST_S3_TLS_BUCKET is not set (start the \
                 HTTPS test server with `source scripts/s3-test-server.sh`)"
            );
            None
        }
    }
}

/// The worker as a pod runs it with `spec.storage.caBundle`: the bundle mounted as a file named
/// by `SLUICE_STORAGE_CA_FILE`. With it the shard completes over https; without it the worker
/// fails on the certificate (and says what to set); with a bad file it fails permanently,
/// naming the field.
#[test]
fn a_worker_uses_the_mounted_ca_bundle_for_https_storage() {
    let Some((ep, ca, bucket)) = tls_server() else { return };
    let prefix = unique_bucket("tls");
    let lines = prompt_lines(6);
    let input_uri = format!("s3://{bucket}/{prefix}/in.jsonl");
    let output_uri = format!("s3://{bucket}/{prefix}/out");
    let plan = plan_for(&input_uri, &lines, 6);
    let opts = StorageOptions {
        endpoint: Some(ep.clone()),
        region: Some("us-east-1".into()),
        path_style: true,
        config: [("aws_access_key_id", "testing"), ("aws_secret_access_key", "testing")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        ca_bundle: Some(CaBundle::File(ca.clone())),
        ..Default::default()
    };
    let tls = |uri: &str| resolve(uri, &opts).unwrap();
    let rt = rt();
    rt.block_on(async {
        tls(&input_uri).put(Bytes::from(body(&lines))).await.unwrap();
        tls(&output_uri).join(layout::PLAN).unwrap().put(Bytes::from(serde_json::to_vec(&plan).unwrap())).await.unwrap();
    });
    let tls_worker = |ca_file: Option<&std::path::Path>| {
        let mut c = worker(&output_uri, 0);
        c.env(env::STORAGE_ENDPOINT, &ep).env(env::STORAGE_REGION, "us-east-1").env(env::STORAGE_PATH_STYLE, "true");
        if let Some(f) = ca_file {
            c.env(env::STORAGE_CA_FILE, f);
        }
        creds(&mut c);
        c
    };

    // No bundle: the system's roots do not know the CA.
    let mut c = tls_worker(None);
    c.env("SLUICE_STORAGE_MAX_RETRIES", "0");
    let out = run(c);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(exit::SUCCESS), "{err}");
    assert!(err.contains("invalid peer certificate") && err.contains("spec.storage.caBundle"), "{err}");

    // A file that is not a PEM bundle: permanent, naming the field.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("ca.crt");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let out = run(tls_worker(Some(&bad)));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(exit::PERMANENT), "{err}");
    assert!(err.contains("spec.storage.caBundle: no certificate in it"), "{err}");

    // The mounted bundle: the shard completes and its output is on the https server.
    let out = run(tls_worker(Some(&ca)));
    assert_eq!(out.status.code(), Some(exit::SUCCESS), "{}", stderr(&out));
    let (results, errors) = rt.block_on(async {
        let out = tls(&output_uri);
        (
            parse_jsonl(&out.join(&layout::results(0)).unwrap().get_bytes().await.unwrap()),
            parse_jsonl(&out.join(&layout::errors(0)).unwrap().get_bytes().await.unwrap()),
        )
    });
    assert_exactly_once(&plan, 0, &results, &errors, |_| 4);
}
