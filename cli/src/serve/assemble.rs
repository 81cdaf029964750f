//! A finished batch's two files from its local job's output: every committed line (final
//! shard files first, then the immutable chunks of shards that did not finish), each input line
//! once, and an error line with the given code for every input line that never ran.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sluice_api::lines::strip_bom;
use sluice_api::output::{OutputLine, Usage};

/// What the two files hold.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Assembled {
    pub succeeded: u64,
    pub failed: u64,
    pub usage: Usage,
}

fn jsonl_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().and_then(|e| e.to_str()) == Some("jsonl")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Committed output files of the job under `out`, in the order they are read.
fn sources(out: &Path) -> Vec<PathBuf> {
    let mut v = jsonl_files(&out.join("results"));
    v.extend(jsonl_files(&out.join("errors")));
    let mut shard_dirs: Vec<PathBuf> = std::fs::read_dir(out.join("_sluice").join("shards"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    shard_dirs.sort();
    for d in shard_dirs {
        v.extend(jsonl_files(&d));
    }
    v
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("cannot {what} {}: {e}", path.display())
}

/// Where the two files go: (successes, errors).
pub type Destinations<'a> = (&'a Path, &'a Path);

/// The error code and message of input lines that never ran.
pub type Missing<'a> = (&'a str, &'a str);

/// Write `ok_path` (successes) and `err_path` (errors) for the job output under `out` and its
/// input of `total` lines; input lines with no committed line get `missing_code`.
pub fn assemble(
    out: &Path,
    input: &Path,
    total: u64,
    job_key: &str,
    (missing_code, missing_message): Missing<'_>,
    (ok_path, err_path): Destinations<'_>,
) -> Result<Assembled, String> {
    let mut covered = vec![false; usize::try_from(total).unwrap_or(usize::MAX).saturating_add(1)];
    let mut ok = BufWriter::new(std::fs::File::create(ok_path).map_err(|e| io_err("create", ok_path, e))?);
    let mut err = BufWriter::new(std::fs::File::create(err_path).map_err(|e| io_err("create", err_path, e))?);
    let mut a = Assembled::default();
    let mut buf = Vec::new();
    for src in sources(out) {
        let file = std::fs::File::open(&src).map_err(|e| io_err("open", &src, e))?;
        let mut r = std::io::BufReader::new(file);
        loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf).map_err(|e| io_err("read", &src, e))? == 0 {
                break;
            }
            let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
            let Ok(v) = serde_json::from_slice::<Value>(line) else { continue };
            let Some(n) = v.get("line").and_then(Value::as_u64) else { continue };
            let Some(slot) = usize::try_from(n).ok().and_then(|i| covered.get_mut(i)) else { continue };
            if n == 0 || *slot {
                continue;
            }
            *slot = true;
            let success = v.get("error").is_none_or(Value::is_null) && v.get("response").is_some_and(|r| !r.is_null());
            if success {
                a.succeeded += 1;
                if let Some(u) = v.pointer("/response/body/usage").and_then(|u| serde_json::from_value::<Usage>(u.clone()).ok()) {
                    a.usage = Usage::new(a.usage.prompt_tokens + u.prompt_tokens, a.usage.completion_tokens + u.completion_tokens);
                }
                ok.write_all(line).and_then(|_| ok.write_all(b"\n")).map_err(|e| io_err("write", ok_path, e))?;
            } else {
                a.failed += 1;
                err.write_all(line).and_then(|_| err.write_all(b"\n")).map_err(|e| io_err("write", err_path, e))?;
            }
        }
    }
    // Every input line that has no committed line never ran.
    let file = std::fs::File::open(input).map_err(|e| io_err("open", input, e))?;
    let mut r = std::io::BufReader::new(file);
    let mut n = 0u64;
    while n < total {
        buf.clear();
        if r.read_until(b'\n', &mut buf).map_err(|e| io_err("read", input, e))? == 0 {
            break;
        }
        n += 1;
        if covered.get(usize::try_from(n).unwrap_or(usize::MAX)).copied().unwrap_or(true) {
            continue;
        }
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let line = strip_bom(line, n);
        let custom_id =
            serde_json::from_slice::<Value>(line).ok().and_then(|v| v.get("custom_id").and_then(Value::as_str).map(str::to_string));
        let rec = OutputLine::failure(job_key, custom_id.as_deref(), n, missing_code, missing_message);
        let text = serde_json::to_string(&rec).map_err(|e| format!("cannot serialise an error line: {e}"))?;
        err.write_all(text.as_bytes()).and_then(|_| err.write_all(b"\n")).map_err(|e| io_err("write", err_path, e))?;
        a.failed += 1;
    }
    ok.flush().map_err(|e| io_err("write", ok_path, e))?;
    err.flush().map_err(|e| io_err("write", err_path, e))?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_line_lands_once_in_one_of_the_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("results")).unwrap();
        std::fs::create_dir_all(out.join("errors")).unwrap();
        std::fs::create_dir_all(out.join("_sluice/shards/00000")).unwrap();
        let input = dir.path().join("in.jsonl");
        let lines: Vec<String> =
            (1..=5).map(|i| format!(r#"{{"custom_id":"r{i}","url":"/v1/completions","body":{{"prompt":"x"}}}}"#)).collect();
        std::fs::write(&input, format!("\u{feff}{}\n", lines.join("\n"))).unwrap();
        let success = |i: u64| {
            let id = format!("r{i}");
            let c = sluice_api::output::Completion {
                custom_id: &id,
                line: i,
                chat: false,
                model: "m",
                text: "t",
                finish_reason: "stop",
                usage: Usage::new(2, 3),
                created: 0,
            };
            serde_json::to_string(&OutputLine::success("j", &c)).unwrap()
        };
        // Line 1 in a final file and again in a chunk (the chunk is not counted twice).
        std::fs::write(out.join("results/00000.jsonl"), format!("{}\n", success(1))).unwrap();
        std::fs::write(out.join("_sluice/shards/00000/000000000001-000000000003.jsonl"), format!("{}\n{}\n", success(1), success(2)))
            .unwrap();
        let bad = serde_json::to_string(&OutputLine::failure("j", Some("r3"), 3, "invalid_json", "bad")).unwrap();
        std::fs::write(out.join("errors/00000.jsonl"), format!("{bad}\n")).unwrap();
        let (ok, err) = (dir.path().join("ok.jsonl"), dir.path().join("err.jsonl"));
        let a = assemble(&out, &input, 5, "j", ("batch_cancelled", "cancelled"), (&ok, &err)).unwrap();
        assert_eq!((a.succeeded, a.failed, a.usage.completion_tokens), (2, 3, 6));
        let ok_text = std::fs::read_to_string(&ok).unwrap();
        let err_text = std::fs::read_to_string(&err).unwrap();
        let mut ids: Vec<String> = ok_text
            .lines()
            .chain(err_text.lines())
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["custom_id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        assert_eq!(ids, ["r1", "r2", "r3", "r4", "r5"]);
        assert_eq!(err_text.matches("batch_cancelled").count(), 2);
    }
}
