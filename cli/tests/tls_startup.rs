//! `sluice` pointed at a TLS endpoint that is not S3 exits with an error naming the URI and the
//! endpoint instead of panicking (the binary installs the one rustls provider first thing).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::process::Command;

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

#[test]
fn sluice_cli_against_a_tls_endpoint_that_is_not_s3_fails_cleanly() {
    let port = closing_listener();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["status", "s3://bucket/out"])
        .env("AWS_ENDPOINT", format!("https://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .env("AWS_REGION", "us-east-1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked"), "sluice panicked:\n{text}");
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("s3://bucket/out/_sluice/plan.json") && text.contains("127.0.0.1"), "{text}");
}
