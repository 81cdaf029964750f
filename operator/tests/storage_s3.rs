//! The operator's storage opener (`UriOpener`) against a real S3-compatible server on 127.0.0.1
//! (moto, started by `scripts/s3-test-server.sh`; endpoint in `SLUICE_TEST_S3_ENDPOINT`): a
//! job's Secret keys reach the S3 client as object_store config keys, and the reconciler's
//! create-only and read helpers work on S3. Then the same server over HTTPS with a certificate
//! from a private CA (`SLUICE_TEST_S3_TLS_*`): `spec.storage.caBundle` makes it work, its absence
//! is a clean certificate error, and a bad bundle is an error naming the field. Tests that need
//! a server are skipped, with a message, when none is set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use sluice_api::job::{CaBundleSpec, StorageSpec};
use sluice_api::storage::{CaBundle, PutOutcome, RetryPolicy, StorageError, StorageOptions, resolve};
use sluice_operator::storage_io::{StorageRefs, StoreOpener, UriOpener, list_names, put_json_create, read_json};

fn endpoint() -> Option<String> {
    match std::env::var("SLUICE_TEST_S3_ENDPOINT") {
        Ok(e) if !e.is_empty() => Some(e),
        _ => {
            eprintln!("skipped: SLUICE_TEST_S3_ENDPOINT is not set (start one with `source scripts/s3-test-server.sh`)");
            None
        }
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

#[tokio::test]
async fn secret_keys_configure_the_s3_client() {
    let Some(ep) = endpoint() else { return };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let bucket = format!("sluice-op-{}-{}", std::process::id(), nanos % 1_000_000_000);
    create_bucket(&ep, &bucket);
    // The endpoint and the credentials come only from the Secret (upper-case keys, as Secrets
    // usually spell them); spec.storage gives the path style and plain HTTP.
    let storage = StorageSpec { path_style: Some(true), allow_http: Some(true), region: Some("us-east-1".into()), ..Default::default() };
    let secret: BTreeMap<String, String> =
        [("AWS_ENDPOINT", ep.as_str()), ("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let refs = StorageRefs { secret: secret.clone(), ca_bundle: None };
    let out = UriOpener.open("spec.output.uri", &format!("s3://{bucket}/jobs/demo/"), Some(&storage), &refs).unwrap();
    let plan = out.child("_sluice/plan.json");
    assert_eq!(read_json::<serde_json::Value>(&plan, "shard plan").await.unwrap(), None);
    assert_eq!(put_json_create(&plan, &serde_json::json!({"shards": 4}), "shard plan").await.unwrap(), PutOutcome::Created);
    assert_eq!(put_json_create(&plan, &serde_json::json!({"shards": 5}), "shard plan").await.unwrap(), PutOutcome::AlreadyExists);
    let back: serde_json::Value = read_json(&plan, "shard plan").await.unwrap().unwrap();
    assert_eq!(back["shards"], 4, "the first plan stays");
    assert_eq!(list_names(&out.child("_sluice")).await.unwrap(), vec!["plan.json".to_string()]);

    // The same Secret with another endpoint (nothing listens on port 1) fails: the key, not
    // the environment, routes the client.
    let mut wrong = secret.clone();
    wrong.insert("AWS_ENDPOINT".into(), "http://127.0.0.1:1".into());
    let wrong = StorageRefs { secret: wrong, ca_bundle: None };
    let elsewhere = UriOpener.open("spec.output.uri", &format!("s3://{bucket}/jobs/demo/"), Some(&storage), &wrong).unwrap();
    let res = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        read_json::<serde_json::Value>(&elsewhere.child("_sluice/plan.json"), "shard plan"),
    )
    .await
    .expect("the failing read gives up within its retry budget");
    let err = res.unwrap_err().to_string();
    assert!(err.contains(&format!("s3://{bucket}/jobs/demo/_sluice/plan.json")), "{err}");
}

// ---- HTTPS with a private CA (spec.storage.caBundle) ----

/// The HTTPS test server, its CA file and a bucket on it, or `None` (with the reason printed):
/// `scripts/s3-test-server.sh` starts moto over TLS with a certificate from a CA it makes.
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

/// A self-signed CA that did not sign the test server's certificate (its key was thrown away).
const OTHER_CA: &str = include_str!("fixtures/test-ca.pem");

fn tls_options(endpoint: &str, ca_bundle: Option<CaBundle>) -> StorageOptions {
    StorageOptions {
        endpoint: Some(endpoint.to_string()),
        region: Some("us-east-1".into()),
        path_style: true,
        allow_http: false,
        // Fail fast: a certificate error does not go away on a retry.
        retry: RetryPolicy {
            max_retries: 1,
            init_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            timeout: Duration::from_secs(10),
        },
        config: [("aws_access_key_id", "testing"), ("aws_secret_access_key", "testing")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        ca_bundle,
    }
}

fn unique_prefix(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{tag}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// With the CA bundle (as PEM text or as a file), reads and writes over https succeed, through
/// the storage layer and through the operator's opener with `spec.storage` and a `caBundle`.
#[tokio::test]
async fn https_with_a_private_ca_works_when_the_ca_bundle_is_given() {
    sluice_api::tls::install_crypto_provider();
    let Some((ep, ca_file, bucket)) = tls_server() else { return };
    let pem = std::fs::read(&ca_file).unwrap();
    let prefix = unique_prefix("ca");

    for (how, bundle) in [("pem", CaBundle::Pem(pem.clone())), ("file", CaBundle::File(ca_file.clone()))] {
        let base = resolve(&format!("s3://{bucket}/{prefix}/{how}"), &tls_options(&ep, Some(bundle))).unwrap();
        let obj = base.join("a/b.jsonl").unwrap();
        assert!(!obj.exists().await.unwrap(), "{how}");
        assert_eq!(obj.put_create(Bytes::from_static(b"one\ntwo\n")).await.unwrap(), PutOutcome::Created, "{how}");
        assert_eq!(obj.put_create(Bytes::from_static(b"other")).await.unwrap(), PutOutcome::AlreadyExists, "{how}");
        assert_eq!(obj.get_bytes().await.unwrap(), Bytes::from_static(b"one\ntwo\n"), "{how}");
        assert_eq!(base.list().await.unwrap().len(), 1, "{how}");
    }

    // The operator's path: spec.storage gives the https endpoint, the CA bundle comes from the
    // job's ConfigMap (here: the file's PEM), the Secret gives the credentials.
    let storage = StorageSpec {
        endpoint: Some(ep.clone()),
        region: Some("us-east-1".into()),
        path_style: Some(true),
        ca_bundle: Some(CaBundleSpec::config_map("s3-ca")),
        ..Default::default()
    };
    let refs = StorageRefs {
        secret: [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        ca_bundle: Some(CaBundle::Pem(pem)),
    };
    let out = UriOpener.open("spec.output.uri", &format!("s3://{bucket}/{prefix}/job/"), Some(&storage), &refs).unwrap();
    let plan = out.child("_sluice/plan.json");
    assert_eq!(put_json_create(&plan, &serde_json::json!({"shards": 2}), "shard plan").await.unwrap(), PutOutcome::Created);
    let back: serde_json::Value = read_json(&plan, "shard plan").await.unwrap().unwrap();
    assert_eq!(back["shards"], 2);
}

/// Without the CA bundle (or with a CA that did not sign the server's certificate), the same
/// calls fail with a storage error that says it is the certificate, and nothing panics.
#[tokio::test]
async fn https_with_a_private_ca_fails_cleanly_without_the_ca_bundle() {
    sluice_api::tls::install_crypto_provider();
    let Some((ep, _, bucket)) = tls_server() else { return };
    let prefix = unique_prefix("noca");
    for (how, bundle) in [("no bundle", None), ("another CA", Some(CaBundle::Pem(OTHER_CA.as_bytes().to_vec())))] {
        let loc = resolve(&format!("s3://{bucket}/{prefix}/x.jsonl"), &tls_options(&ep, bundle)).unwrap();
        let res = tokio::time::timeout(Duration::from_secs(60), loc.get_bytes()).await.expect("gives up within its retry budget");
        let e = res.unwrap_err();
        assert!(matches!(e, StorageError::Failed { .. }), "{how}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("s3://{bucket}/{prefix}/x.jsonl")), "{how}: {msg}");
        assert!(msg.to_ascii_lowercase().contains("certificate"), "{how}: the message names the certificate problem: {msg}");
        assert!(msg.contains("give that CA in spec.storage.caBundle"), "{how}: the message says what to do: {msg}");
    }
}

/// A CA bundle that is not PEM certificates is an error naming `spec.storage.caBundle`, before
/// any request (no server needed).
#[test]
fn a_bad_ca_bundle_is_a_clear_error_naming_the_field() {
    let bad = [
        ("empty", Vec::new()),
        ("text", b"this is not a certificate".to_vec()),
        ("bad base64", b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".to_vec()),
        ("not X.509", b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n".to_vec()),
    ];
    for (what, pem) in bad {
        let e = resolve("s3://bucket/x", &tls_options("https://127.0.0.1:1", Some(CaBundle::Pem(pem.clone())))).unwrap_err();
        assert!(matches!(e, StorageError::CaBundle { .. }) && e.is_permanent(), "{what}: {e}");
        assert!(e.to_string().starts_with("spec.storage.caBundle: "), "{what}: {e}");

        let storage = StorageSpec { endpoint: Some("https://127.0.0.1:1".into()), ..Default::default() };
        let refs = StorageRefs { ca_bundle: Some(CaBundle::Pem(pem)), ..Default::default() };
        let e = UriOpener.open("spec.input.uri", "s3://bucket/in.jsonl", Some(&storage), &refs).unwrap_err();
        assert!(e.to_string().starts_with("spec.storage.caBundle: "), "{what}: {e}");
        assert!(e.is_permanent(), "{what}: {e}");
    }
    let missing = CaBundle::File("/nonexistent/sluice/ca.crt".into());
    let e = resolve("s3://bucket/x", &tls_options("https://127.0.0.1:1", Some(missing))).unwrap_err();
    assert!(e.to_string().contains("spec.storage.caBundle: cannot read the CA bundle file /nonexistent/sluice/ca.crt"), "{e}");
}
