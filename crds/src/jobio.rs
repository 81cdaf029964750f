//! A job's own documents under its output prefix, read and written through the storage layer:
//! typed JSON reads and create-only writes, progress records, and the output manifest built from
//! the final records (or the shard files). Shared by the operator (when it can reach a job's
//! storage) and the worker's `plan`/`finalize` commands (when only the job's pods can).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use jiff::Timestamp;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::contract::layout;
use crate::output::{ManifestCounts, ManifestShard, OutputLine, OutputManifest, Usage};
use crate::plan::ShardPlan;
use crate::progress::ShardProgress;
use crate::storage::{Location, PutOutcome, StorageError};

/// Why reading or writing a job's documents (or planning its input) failed, naming the URI.
#[derive(Debug, thiserror::Error)]
pub enum JobIoError {
    /// The input object does not exist.
    #[error("spec.input.uri: the input object {uri} does not exist")]
    InputNotFound { uri: String },
    /// The input changed after it was planned.
    #[error("the input {uri} changed after planning (planned {planned}, now {current}); the plan at {plan_uri} no longer matches it")]
    InputChanged { uri: String, plan_uri: String, planned: String, current: String },
    /// A plan would need more shards than an Indexed Job may have.
    #[error(
        "the input {uri} needs more than {limit} shards at {requests_per_shard} requests per shard; raise spec.sharding.requestsPerShard"
    )]
    TooManyShards { uri: String, limit: u64, requests_per_shard: u64 },
    /// A stored document (plan, progress record, manifest) does not parse.
    #[error("{uri}: not a valid {what}: {reason}")]
    BadDocument { uri: String, what: &'static str, reason: String },
    /// A storage operation failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Serializing a document failed (a bug, reported rather than panicking).
    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl JobIoError {
    /// True when retrying cannot help: the input changed, too many shards, a bad document, or a
    /// permanent storage answer (denied, malformed URI). A missing input is not permanent: it
    /// may still be uploaded.
    pub fn is_permanent(&self) -> bool {
        match self {
            JobIoError::InputNotFound { .. } => false,
            JobIoError::InputChanged { .. } | JobIoError::TooManyShards { .. } | JobIoError::BadDocument { .. } => true,
            JobIoError::Serialize { .. } => true,
            JobIoError::Storage(e) => e.is_permanent() && !matches!(e, StorageError::NotFound { .. }),
        }
    }
}

/// Result with [`JobIoError`].
pub type Result<T, E = JobIoError> = std::result::Result<T, E>;

/// Read and parse a JSON document; `Ok(None)` when it does not exist.
pub async fn read_json<T: DeserializeOwned>(loc: &Location, what: &'static str) -> Result<Option<T>> {
    let bytes = match loc.get_bytes().await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| JobIoError::BadDocument { uri: loc.uri.clone(), what, reason: e.to_string() })
}

/// Write a JSON document only if nothing exists at `loc`.
pub async fn put_json_create<T: Serialize>(loc: &Location, value: &T, what: &'static str) -> Result<PutOutcome> {
    let body = serde_json::to_vec_pretty(value).map_err(|source| JobIoError::Serialize { what, source })?;
    Ok(loc.put_create(Bytes::from(body)).await?)
}

/// Write a JSON document, replacing whatever is there.
pub async fn put_json<T: Serialize>(loc: &Location, value: &T, what: &'static str) -> Result<()> {
    let body = serde_json::to_vec_pretty(value).map_err(|source| JobIoError::Serialize { what, source })?;
    Ok(loc.put(Bytes::from(body)).await?)
}

/// Names (last path segments) of the objects under `loc`, sorted.
pub async fn list_names(loc: &Location) -> Result<Vec<String>> {
    let mut names: Vec<String> = loc.list().await?.into_iter().filter_map(|m| m.location.filename().map(str::to_string)).collect();
    names.sort();
    Ok(names)
}

/// The progress record of `shard`, if its worker wrote one; a record naming another shard is a
/// bad document.
pub async fn read_progress_record(output: &Location, shard: u32) -> Result<Option<ShardProgress>> {
    let loc = output.child(&layout::progress(shard));
    let record = read_json::<ShardProgress>(&loc, "progress record").await?;
    if let Some(r) = &record
        && r.shard != shard
    {
        return Err(JobIoError::BadDocument {
            uri: loc.uri,
            what: "progress record",
            reason: format!("names shard {} instead of {shard}", r.shard),
        });
    }
    Ok(record)
}

/// The progress records of the plan's shards, skipping `skip` (records the caller already
/// holds). One LIST, then a GET per record present.
pub async fn read_progress_records(output: &Location, plan: &ShardPlan, skip: &BTreeSet<u32>) -> Result<BTreeMap<u32, ShardProgress>> {
    let present: BTreeSet<String> = list_names(&output.child(layout::PROGRESS_PREFIX)).await?.into_iter().collect();
    let mut records = BTreeMap::new();
    for shard in &plan.shards {
        if skip.contains(&shard.index) {
            continue;
        }
        let rel = layout::progress(shard.index);
        let file = rel.rsplit('/').next().unwrap_or(&rel);
        if !present.contains(file) {
            continue;
        }
        if let Some(r) = read_progress_record(output, shard.index).await? {
            records.insert(shard.index, r);
        }
    }
    Ok(records)
}

/// Count lines, results and usage of a committed shard's files, when its final progress record
/// is missing.
pub async fn count_shard_files(output: &Location, index: u32, lines: u64) -> Result<ManifestShard> {
    let mut shard = ManifestShard {
        index,
        results: layout::results(index),
        errors: layout::errors(index),
        lines,
        succeeded: 0,
        failed: 0,
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    for (rel, success) in [(layout::results(index), true), (layout::errors(index), false)] {
        let bytes = match output.child(&rel).get_bytes().await {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if success {
                shard.succeeded += 1;
                let usage = serde_json::from_slice::<OutputLine>(line).ok().and_then(|l| l.usage()).unwrap_or_default();
                shard.prompt_tokens += usage.prompt_tokens;
                shard.completion_tokens += usage.completion_tokens;
            } else {
                shard.failed += 1;
            }
        }
    }
    Ok(shard)
}

/// Build `manifest.json` from the final progress records (or the shard files where a record is
/// missing). Shards in `failed_shards` count all their lines as failed.
pub async fn build_manifest(
    job: &str,
    spec_input: &str,
    output: &Location,
    plan: &ShardPlan,
    records: &BTreeMap<u32, ShardProgress>,
    failed_shards: &BTreeSet<u32>,
    now: Timestamp,
) -> Result<OutputManifest> {
    let mut shards = Vec::new();
    let mut counts = ManifestCounts { total: plan.line_count, succeeded: 0, failed: 0 };
    let (mut prompt, mut completion) = (0u64, 0u64);
    for s in &plan.shards {
        if failed_shards.contains(&s.index) {
            counts.failed += s.line_count;
            continue;
        }
        let m = match records.get(&s.index).filter(|r| r.complete) {
            Some(r) => ManifestShard {
                index: s.index,
                results: layout::results(s.index),
                errors: layout::errors(s.index),
                lines: s.line_count,
                succeeded: r.succeeded,
                failed: r.failed,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
            },
            None => count_shard_files(output, s.index, s.line_count).await?,
        };
        counts.succeeded += m.succeeded;
        counts.failed += m.failed;
        prompt += m.prompt_tokens;
        completion += m.completion_tokens;
        shards.push(m);
    }
    Ok(OutputManifest {
        job: job.to_string(),
        input_uri: spec_input.to_string(),
        output_uri: output.uri.clone(),
        completed_at: now.to_string(),
        requests: counts,
        usage: Usage::new(prompt, completion),
        shards,
    })
}

/// Write the manifest once; when one exists already (an earlier finalize), return that one.
pub async fn write_manifest_once(output: &Location, manifest: OutputManifest) -> Result<OutputManifest> {
    let loc = output.child(layout::MANIFEST);
    match put_json_create(&loc, &manifest, "output manifest").await? {
        PutOutcome::Created => Ok(manifest),
        PutOutcome::AlreadyExists => Ok(read_json::<OutputManifest>(&loc, "output manifest").await?.unwrap_or(manifest)),
    }
}
