//! The operator's storage opener (`UriOpener`) against a real S3-compatible server on 127.0.0.1
//! (moto, started by `scripts/s3-test-server.sh`; endpoint in `SLUICE_TEST_S3_ENDPOINT`): a
//! job's Secret keys reach the S3 client as object_store config keys, and the reconciler's
//! create-only and read helpers work on S3. Skipped, with a message, when no server is set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{Read, Write};

use sluice_api::job::StorageSpec;
use sluice_operator::storage_io::{Created, StoreOpener, UriOpener, list_names, put_json_create, read_json};

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
    let out = UriOpener.open("spec.output.uri", &format!("s3://{bucket}/jobs/demo/"), Some(&storage), &secret).unwrap();
    let plan = out.child("_sluice/plan.json");
    assert_eq!(read_json::<serde_json::Value>(&plan, "shard plan").await.unwrap(), None);
    assert_eq!(put_json_create(&plan, &serde_json::json!({"shards": 4}), "shard plan").await.unwrap(), Created::Written);
    assert_eq!(put_json_create(&plan, &serde_json::json!({"shards": 5}), "shard plan").await.unwrap(), Created::AlreadyExisted);
    let back: serde_json::Value = read_json(&plan, "shard plan").await.unwrap().unwrap();
    assert_eq!(back["shards"], 4, "the first plan stays");
    assert_eq!(list_names(&out.child("_sluice")).await.unwrap(), vec!["plan.json".to_string()]);

    // The same Secret with another endpoint (nothing listens on port 1) fails: the key, not
    // the environment, routes the client.
    let mut wrong = secret.clone();
    wrong.insert("AWS_ENDPOINT".into(), "http://127.0.0.1:1".into());
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
