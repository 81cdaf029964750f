//! The official `openai` Python package against `sluice serve --local`
//! (tests/openai/test_batch_api.py). Skips, saying why, where python3 cannot import openai; CI
//! installs it (scripts/ci-services.sh).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod serve_support;

use std::process::Command;

use serve_support::{Server, keys_file};

#[test]
fn the_openai_python_client_runs_the_batch_protocol() {
    let probe = Command::new("python3").args(["-c", "import openai"]).output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!("SKIPPED: python3 cannot import openai ({}); pip install openai", String::from_utf8_lossy(&o.stderr).trim());
            return;
        }
        Err(e) => {
            println!("SKIPPED: no python3 ({e})");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = keys_file(dir.path(), &[("sk-tenant-a", "team-a"), ("sk-tenant-b", "team-b")], "");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--keys", keys.to_str().unwrap()]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/openai/test_batch_api.py");
    let out = Command::new("python3")
        .arg(script)
        .env("SLUICE_BASE_URL", format!("http://{}/v1", server.addr))
        .env("SLUICE_KEY_A", "sk-tenant-a")
        .env("SLUICE_KEY_B", "sk-tenant-b")
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "the openai client test failed:\n{}\n--- server stderr ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.stderr()
    );
}
