//! The output commit protocol of one shard: immutable chunk objects under
//! `<output>/_sluice/shards/<i>/` written create-only, listed on start to resume, and assembled
//! by a deterministic cover into `results/<i>.jsonl` and `errors/<i>.jsonl` (also create-only).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use bytes::Bytes;
use sluice_api::contract::layout;
use sluice_api::output::OutputLine;
use sluice_api::storage::{Location, PutOutcome, StorageError};

use crate::shard::{ChunkRange, Coverage};

/// A commit-protocol failure.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("chunk {uri} is corrupt: {reason}")]
    CorruptChunk { uri: String, reason: String },
}

impl CommitError {
    /// Whether a retry of the shard cannot fix it.
    pub fn is_permanent(&self) -> bool {
        match self {
            CommitError::Storage(e) => e.is_permanent(),
            CommitError::CorruptChunk { .. } => false,
        }
    }
}

/// Counts over committed output lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub lines: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Tally {
    /// Count one output line.
    pub fn add(&mut self, l: &OutputLine) {
        self.lines += 1;
        if l.is_success() {
            self.succeeded += 1;
            let u = l.usage().unwrap_or_default();
            self.prompt_tokens += u.prompt_tokens;
            self.completion_tokens += u.completion_tokens;
        } else {
            self.failed += 1;
        }
    }
}

/// What the final assembly did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finalized {
    pub tally: Tally,
    /// Whether this call wrote the results file (false: another attempt had already).
    pub wrote_results: bool,
}

/// One shard's objects under the output prefix.
#[derive(Clone, Debug)]
pub struct ShardOutput {
    output: Location,
    shard: u32,
}

impl ShardOutput {
    pub fn new(output: Location, shard: u32) -> Self {
        Self { output, shard }
    }

    fn chunk_location(&self, c: &ChunkRange) -> Result<Location, StorageError> {
        self.output.join(&layout::chunk(self.shard, c.start, c.end))
    }

    /// The output prefix.
    pub fn output(&self) -> &Location {
        &self.output
    }

    /// List committed chunks into a coverage of `range`.
    pub async fn load_coverage(&self, range: Range<u64>) -> Result<Coverage, CommitError> {
        let mut cov = Coverage::new(range);
        let prefix = self.output.join(&layout::chunk_prefix(self.shard))?;
        for meta in prefix.list().await? {
            let name = meta.location.filename().unwrap_or_default();
            match layout::parse_chunk_name(name) {
                Some((a, b)) => cov.add(a..b),
                None => tracing::warn!(object = %prefix.uri_of(&meta.location), "ignoring a non-chunk object in the chunk prefix"),
            }
        }
        Ok(cov)
    }

    /// Serialize the lines `c` of `done` (all must be present) and commit them create-only.
    /// Returns the lines written; when another attempt already committed the same range, its
    /// chunk stands and ours is dropped (it holds the same requests).
    pub async fn commit_chunk(&self, c: &ChunkRange, done: &BTreeMap<u64, OutputLine>) -> Result<PutOutcome, CommitError> {
        let loc = self.chunk_location(c)?;
        let mut body = Vec::new();
        for line in c.clone() {
            let Some(l) = done.get(&line) else {
                return Err(CommitError::CorruptChunk { uri: loc.uri.clone(), reason: format!("line {line} is not finished") });
            };
            write_line(&mut body, l, &loc.uri)?;
        }
        Ok(loc.put_create(Bytes::from(body)).await?)
    }

    /// Read a chunk and check it holds exactly its lines.
    pub async fn read_chunk(&self, c: &ChunkRange) -> Result<Vec<OutputLine>, CommitError> {
        let loc = self.chunk_location(c)?;
        let bytes = loc.get_bytes().await?;
        let corrupt = |reason: String| CommitError::CorruptChunk { uri: loc.uri.clone(), reason };
        let mut out = Vec::with_capacity((c.end - c.start) as usize);
        for (i, raw) in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()).enumerate() {
            let l: OutputLine = serde_json::from_slice(raw).map_err(|e| corrupt(format!("record {}: {e}", i + 1)))?;
            let expected = c.start + i as u64;
            if l.line != Some(expected) {
                return Err(corrupt(format!("record {} is for line {:?}, expected {expected}", i + 1, l.line)));
            }
            out.push(l);
        }
        if out.len() as u64 != c.end - c.start {
            return Err(corrupt(format!("{} records for {} lines", out.len(), c.end - c.start)));
        }
        Ok(out)
    }

    /// Counts over the committed lines (deterministic cover of the committed chunks, gaps
    /// skipped), for progress after a restart.
    pub async fn tally(&self, cov: &Coverage) -> Result<Tally, CommitError> {
        let mut t = Tally::default();
        let mut p = cov.range().start;
        // Walk the gaps-and-chunks structure: at each covered line take the furthest chunk.
        while p < cov.range().end {
            let best = cov
                .chunks()
                .iter()
                .filter(|c| c.start <= p && p < c.end)
                .max_by(|a, b| a.end.cmp(&b.end).then(b.start.cmp(&a.start)))
                .cloned();
            match best {
                Some(c) => {
                    for l in self.read_chunk(&c).await? {
                        if l.line.is_some_and(|n| n >= p) {
                            t.add(&l);
                        }
                    }
                    p = c.end;
                }
                None => p += 1,
            }
        }
        Ok(t)
    }

    /// Whether the shard's results file exists (the shard was finalized by some attempt).
    pub async fn is_finalized(&self) -> Result<bool, CommitError> {
        Ok(self.output.join(&layout::results(self.shard))?.exists().await?)
    }

    /// Assemble the final results and errors files from a complete coverage.
    pub async fn finalize(&self, cov: &Coverage) -> Result<Finalized, CommitError> {
        let Some(cover) = cov.cover() else {
            let gaps = cov.gaps();
            return Err(CommitError::CorruptChunk {
                uri: self.output.uri.clone(),
                reason: format!("finalize called with uncovered lines {gaps:?}"),
            });
        };
        let results_loc = self.output.join(&layout::results(self.shard))?;
        let errors_loc = self.output.join(&layout::errors(self.shard))?;
        let mut cache: HashMap<ChunkRange, Vec<OutputLine>> = HashMap::new();
        let (mut results, mut errors) = (Vec::new(), Vec::new());
        let mut tally = Tally::default();
        for (chunk, take) in &cover {
            if !cache.contains_key(chunk) {
                let lines = self.read_chunk(chunk).await?;
                cache.insert(chunk.clone(), lines);
            }
            let lines = cache.get(chunk).map(Vec::as_slice).unwrap_or_default();
            for l in &lines[(take.start - chunk.start) as usize..(take.end - chunk.start) as usize] {
                tally.add(l);
                if l.is_success() {
                    write_line(&mut results, l, &results_loc.uri)?;
                } else {
                    write_line(&mut errors, l, &errors_loc.uri)?;
                }
            }
        }
        // Errors first: a reader that sees results/<i> (the "shard done" mark) sees both.
        errors_loc.put_create(Bytes::from(errors)).await?;
        let wrote = results_loc.put_create(Bytes::from(results)).await? == PutOutcome::Created;
        Ok(Finalized { tally, wrote_results: wrote })
    }
}

fn write_line(buf: &mut Vec<u8>, l: &OutputLine, uri: &str) -> Result<(), CommitError> {
    serde_json::to_writer(&mut *buf, l)
        .map_err(|e| CommitError::CorruptChunk { uri: uri.to_string(), reason: format!("cannot serialize line {:?}: {e}", l.line) })?;
    buf.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_api::storage::{StorageOptions, resolve};

    fn err_line(n: u64) -> OutputLine {
        OutputLine::failure("j", Some(&format!("c{n}")), n, "x", "bad")
    }

    #[tokio::test]
    async fn chunks_round_trip_and_finalize_once() {
        let dir = tempfile::tempdir().unwrap();
        let out = ShardOutput::new(resolve(&dir.path().display().to_string(), &StorageOptions::default()).unwrap(), 2);
        let done: BTreeMap<u64, OutputLine> = (5..15).map(|n| (n, err_line(n))).collect();
        assert_eq!(out.commit_chunk(&(5..10), &done).await.unwrap(), PutOutcome::Created);
        assert_eq!(out.commit_chunk(&(5..10), &done).await.unwrap(), PutOutcome::AlreadyExists);
        out.commit_chunk(&(8..15), &done).await.unwrap();
        assert!(out.commit_chunk(&(14..16), &done).await.is_err(), "line 15 is not finished");
        std::fs::write(dir.path().join("_sluice/shards/00002/README"), "x").unwrap();
        let cov = out.load_coverage(5..15).await.unwrap();
        assert_eq!(cov.chunks(), &[5..10, 8..15]);
        assert_eq!(out.tally(&cov).await.unwrap().lines, 10);
        assert!(!out.is_finalized().await.unwrap());
        let f = out.finalize(&cov).await.unwrap();
        assert_eq!((f.tally.lines, f.tally.failed, f.wrote_results), (10, 10, true));
        let errors = std::fs::read_to_string(dir.path().join("errors/00002.jsonl")).unwrap();
        let lines: Vec<u64> = errors.lines().map(|l| serde_json::from_str::<OutputLine>(l).unwrap().line.unwrap()).collect();
        assert_eq!(lines, (5..15).collect::<Vec<_>>());
        assert_eq!(std::fs::read_to_string(dir.path().join("results/00002.jsonl")).unwrap(), "");
        assert!(!out.finalize(&cov).await.unwrap().wrote_results);
        assert!(out.is_finalized().await.unwrap());
    }

    #[tokio::test]
    async fn corrupt_chunks_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = ShardOutput::new(resolve(&dir.path().display().to_string(), &StorageOptions::default()).unwrap(), 0);
        let p = dir.path().join("_sluice/shards/00000");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join(layout::chunk(0, 1, 3).rsplit('/').next().unwrap()), "{\"oops\"\n").unwrap();
        let cov = out.load_coverage(1..3).await.unwrap();
        let e = out.finalize(&cov).await.unwrap_err();
        assert!(e.to_string().contains("corrupt") && e.to_string().contains("000000000001-000000000003"), "{e}");
        let e = out.finalize(&Coverage::new(1..4)).await.unwrap_err();
        assert!(e.to_string().contains("uncovered"), "{e}");
    }
}
