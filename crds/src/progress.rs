//! The per-shard progress record (`<output>/_sluice/progress/<index>.json`) a worker writes at
//! least every 15 s and at the end, and the operator reads each sync. Pure data.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Progress of one shard, as last reported by its worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShardProgress {
    /// Shard index.
    pub shard: u32,
    /// Which attempt wrote this (pod name or local process id).
    #[serde(default)]
    pub attempt: String,
    /// Lines in the shard.
    pub lines_total: u64,
    /// Lines committed (results plus errors).
    pub lines_done: u64,
    /// Committed successful results.
    pub succeeded: u64,
    /// Committed error records.
    pub failed: u64,
    /// Prompt tokens of committed results.
    pub prompt_tokens: u64,
    /// Completion tokens of committed results.
    pub completion_tokens: u64,
    /// When this attempt started.
    pub started_at: Timestamp,
    /// When this record was written.
    pub updated_at: Timestamp,
    /// When the model was loaded and the first request admitted (start-up time = this − startedAt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Timestamp>,
    /// Requests per second of this attempt since it became ready.
    pub requests_per_second: f64,
    /// Output tokens per second of this attempt since it became ready.
    pub output_tokens_per_second: f64,
    /// Whether the shard's final results and errors files are written.
    pub complete: bool,
}
