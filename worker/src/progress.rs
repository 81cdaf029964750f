//! The shard's progress record (`<output>/_sluice/progress/<i>.json`): committed counts, this
//! attempt's start and ready times and rates. Built here and overwritten in place; the record
//! is advisory (the committed chunks are the truth), so a failed write is logged, not fatal.

use std::time::Instant;

use bytes::Bytes;
use jiff::Timestamp;
use sluice_api::progress::ShardProgress;
use sluice_api::report::PodReport;
use sluice_api::storage::Location;

use crate::commit::Tally;
use crate::report::ReportClient;

/// Tracks and publishes one attempt's progress.
#[derive(Debug)]
pub struct ProgressReporter {
    loc: Location,
    record: ShardProgress,
    ready: Option<Instant>,
    /// Lines and completion tokens this attempt committed since it became ready.
    own_lines: u64,
    own_tokens: u64,
    /// Where each record is also POSTed (jobs whose storage only their pods can reach).
    report: Option<ReportClient>,
}

impl ProgressReporter {
    pub fn new(loc: Location, shard: u32, attempt: String, lines_total: u64) -> Self {
        let now = Timestamp::now();
        let record = ShardProgress {
            shard,
            attempt,
            lines_total,
            lines_done: 0,
            succeeded: 0,
            failed: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            started_at: now,
            updated_at: now,
            ready_at: None,
            requests_per_second: 0.0,
            output_tokens_per_second: 0.0,
            complete: false,
        };
        Self { loc, record, ready: None, own_lines: 0, own_tokens: 0, report: None }
    }

    /// Also report every record to the operator through `report`.
    pub fn reporting_to(mut self, report: Option<ReportClient>) -> Self {
        self.report = report;
        self
    }

    /// The model is loaded and requests are being admitted.
    pub fn set_ready(&mut self) {
        self.record.ready_at = Some(Timestamp::now());
        self.ready = Some(Instant::now());
    }

    /// Set the committed totals (from chunks committed by earlier attempts).
    pub fn set_committed(&mut self, t: Tally) {
        let r = &mut self.record;
        (r.lines_done, r.succeeded, r.failed, r.prompt_tokens, r.completion_tokens) =
            (t.lines, t.succeeded, t.failed, t.prompt_tokens, t.completion_tokens);
    }

    /// Add lines this attempt committed.
    pub fn add_committed(&mut self, t: Tally) {
        let r = &mut self.record;
        r.lines_done += t.lines;
        r.succeeded += t.succeeded;
        r.failed += t.failed;
        r.prompt_tokens += t.prompt_tokens;
        r.completion_tokens += t.completion_tokens;
        self.own_lines += t.lines;
        self.own_tokens += t.completion_tokens;
    }

    /// Mark the shard complete.
    pub fn set_complete(&mut self) {
        self.record.complete = true;
        self.record.lines_done = self.record.lines_total;
    }

    /// The record as it would be written now.
    pub fn snapshot(&mut self) -> ShardProgress {
        self.record.updated_at = Timestamp::now();
        if let Some(t) = self.ready {
            let secs = t.elapsed().as_secs_f64();
            if secs > 0.0 {
                self.record.requests_per_second = self.own_lines as f64 / secs;
                self.record.output_tokens_per_second = self.own_tokens as f64 / secs;
            }
        }
        self.record.clone()
    }

    /// Write the record; failures are logged.
    pub async fn publish(&mut self) {
        let rec = self.snapshot();
        match serde_json::to_vec(&rec) {
            Ok(body) => {
                if let Err(e) = self.loc.put(Bytes::from(body)).await {
                    tracing::warn!(error = %e, "cannot write the progress record");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot serialize the progress record"),
        }
        if let Some(report) = &self.report {
            // The final record is retried (a standby replica answers 503); a lost intermediate
            // one is superseded by the next.
            let attempts = if rec.complete { 8 } else { 1 };
            let complete = rec.complete;
            if let Err(e) = report.send(&PodReport::Progress { record: rec }, attempts).await {
                tracing::warn!(error = %e, complete, "cannot report progress to the operator");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_api::storage::{StorageOptions, resolve};

    #[tokio::test]
    async fn publishes_counts_and_completion() {
        let dir = tempfile::tempdir().unwrap();
        let loc = resolve(&dir.path().join("p.json").display().to_string(), &StorageOptions::default()).unwrap();
        let mut p = ProgressReporter::new(loc, 3, "pod-a".into(), 10);
        p.set_committed(Tally { lines: 2, succeeded: 1, failed: 1, prompt_tokens: 5, completion_tokens: 3 });
        p.set_ready();
        p.add_committed(Tally { lines: 4, succeeded: 4, failed: 0, prompt_tokens: 8, completion_tokens: 8 });
        p.publish().await;
        let rec: ShardProgress = serde_json::from_slice(&std::fs::read(dir.path().join("p.json")).unwrap()).unwrap();
        assert_eq!((rec.shard, rec.lines_done, rec.succeeded, rec.failed, rec.completion_tokens), (3, 6, 5, 1, 11));
        assert!(rec.ready_at.is_some() && !rec.complete && rec.requests_per_second > 0.0);
        p.set_complete();
        p.publish().await;
        let rec: ShardProgress = serde_json::from_slice(&std::fs::read(dir.path().join("p.json")).unwrap()).unwrap();
        assert!(rec.complete);
        assert_eq!(rec.lines_done, 10);
    }
}
