//! Shared helpers for the end-to-end tests: locating the built binaries, reading a job's
//! output layout, and checking the exactly-once property against the input.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary built by `cargo test --workspace` (or `cargo build`) next to the test executable.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).context("test executable has no target directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!("{} is not built; run `cargo build --workspace` (or `cargo test --workspace`) first", path.display());
    }
    Ok(path)
}

/// All lines of every `*.jsonl` file in `dir`, parsed.
pub fn read_jsonl_dir(dir: &Path) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "jsonl")) {
        let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            out.push(serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", f.display(), i + 1))?);
        }
    }
    Ok(out)
}

/// The custom_ids of an input JSONL file (`custom_id` or `id`), in order.
pub fn input_ids(input: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            let id = v.get("custom_id").or_else(|| v.get("id")).and_then(Value::as_str).context("input line without id")?;
            Ok(id.to_string())
        })
        .collect()
}

/// What an output prefix holds.
#[derive(Debug)]
pub struct OutputCheck {
    pub results: Vec<Value>,
    pub errors: Vec<Value>,
    pub manifest: Value,
}

impl OutputCheck {
    /// Read `results/`, `errors/` and `manifest.json` under `out`.
    pub fn read(out: &Path) -> Result<Self> {
        let manifest_path = out.join("manifest.json");
        let manifest: Value = serde_json::from_str(
            &std::fs::read_to_string(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?,
        )?;
        Ok(Self { results: read_jsonl_dir(&out.join("results"))?, errors: read_jsonl_dir(&out.join("errors"))?, manifest })
    }

    /// Every id in `ids` appears exactly once across results and errors, and nothing else does.
    pub fn assert_exactly_once(&self, ids: &[String]) -> Result<()> {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for line in self.results.iter().chain(&self.errors) {
            let id = line.get("custom_id").and_then(Value::as_str).context("output line without custom_id")?;
            *seen.entry(id.to_string()).or_default() += 1;
        }
        let expected: BTreeSet<&String> = ids.iter().collect();
        let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        if !dupes.is_empty() {
            bail!("custom_ids written more than once: {dupes:?}");
        }
        let missing: Vec<_> = expected.iter().filter(|id| !seen.contains_key(id.as_str())).collect();
        if !missing.is_empty() {
            bail!("custom_ids missing from the output: {missing:?}");
        }
        let extra: Vec<_> = seen.keys().filter(|id| !expected.contains(id)).collect();
        if !extra.is_empty() {
            bail!("unexpected custom_ids in the output: {extra:?}");
        }
        Ok(())
    }

    /// Usage in the results adds up to the manifest's usage and counts.
    pub fn assert_usage_adds_up(&self) -> Result<()> {
        let (mut prompt, mut completion) = (0u64, 0u64);
        for r in &self.results {
            let u = &r["response"]["body"]["usage"];
            let (p, c, t) = (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64(), u["total_tokens"].as_u64());
            let (Some(p), Some(c), Some(t)) = (p, c, t) else { bail!("result without usage: {r}") };
            if p + c != t {
                bail!("total_tokens {t} != {p} + {c} in {r}");
            }
            prompt += p;
            completion += c;
        }
        let m = &self.manifest;
        if m["usage"]["prompt_tokens"].as_u64() != Some(prompt) || m["usage"]["completion_tokens"].as_u64() != Some(completion) {
            bail!("manifest usage {} != summed usage prompt={prompt} completion={completion}", m["usage"]);
        }
        if m["requests"]["succeeded"].as_u64() != Some(self.results.len() as u64)
            || m["requests"]["failed"].as_u64() != Some(self.errors.len() as u64)
        {
            bail!("manifest counts {} != {} results / {} errors", m["requests"], self.results.len(), self.errors.len());
        }
        Ok(())
    }
}
