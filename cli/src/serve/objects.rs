//! The API's objects as OpenAI documents them (the file object, the batch object with every
//! field, list pages) plus the records the server keeps, which add the owning tenant. Ids sort
//! in creation order (a time prefix), which is what pagination orders by.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// OpenAI's file object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FileObject {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: i64,
    pub filename: String,
    /// `batch` (uploads) or `batch_output` (a batch's output and error files).
    pub purpose: String,
    pub status: String,
    pub status_details: Option<String>,
    pub expires_at: Option<i64>,
}

/// A file as stored: the object plus its tenant and where its bytes are.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct FileRecord {
    pub tenant: String,
    /// Objects (relative to the tenant's prefix) whose concatenation is the file's content: a
    /// batch's output on a cluster is its job's committed `results/` (or `errors/`) files, not a
    /// copy. Empty: the content is the file's own data object.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<String>,
    #[serde(flatten)]
    pub file: FileObject,
}

/// A batch's status, OpenAI's values.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    /// Not finished: counts against `maxBatchesInFlight`.
    pub fn in_flight(self) -> bool {
        matches!(self, Self::Validating | Self::InProgress | Self::Finalizing | Self::Cancelling)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// One error of a batch that failed as a whole.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BatchError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub line: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BatchErrors {
    pub object: String,
    pub data: Vec<BatchError>,
}

/// OpenAI's batch usage object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct BatchUsage {
    pub input_tokens: u64,
    pub input_tokens_details: Value,
    pub output_tokens: u64,
    pub output_tokens_details: Value,
    pub total_tokens: u64,
}

/// Sluice's own fields, under the one extension key `sluice` (OpenAI clients ignore it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SluiceFields {
    /// The model directory the batch's `model` mapped to.
    pub model_uri: String,
    /// Unix seconds when the batch is projected to finish, from the observed rate.
    pub projected_completion_at: Option<i64>,
    /// `Pending`, `OnTrack`, `AtRisk`, `Met` or `Missed` (against `expires_at`).
    pub sla_status: String,
    /// Worker processes running now.
    pub workers: u32,
    /// The completion window in seconds.
    pub completion_window_seconds: i64,
}

/// OpenAI's batch object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BatchObject {
    pub id: String,
    pub object: String,
    pub endpoint: String,
    pub model: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    pub usage: Option<BatchUsage>,
    pub metadata: Option<Map<String, Value>>,
    pub sluice: SluiceFields,
}

/// How a batch ended, recorded before its files are assembled so a restart finishes the same way.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Cancelled,
    Expired,
    Failed { message: String },
}

/// A batch as stored by the local server.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct BatchRecord {
    pub tenant: String,
    #[serde(default)]
    pub outcome: Option<Outcome>,
    #[serde(flatten)]
    pub batch: BatchObject,
}

/// A list page: `{"object":"list","data":[…],"first_id","last_id","has_more"}`.
#[derive(Serialize, Debug)]
pub struct ListPage<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// A new id: `prefix`, the time in microseconds (14 hex digits, so ids sort in creation
/// order) and 10 random hex digits.
pub fn new_id(prefix: &str) -> String {
    let micros = jiff::Timestamp::now().as_microsecond().max(0);
    let r: u64 = rand::random::<u64>() & 0xff_ffff_ffff;
    format!("{prefix}{micros:014x}{r:010x}")
}

/// Whether `id` can be an id this server made with `prefix` (checked before an id from a URL
/// becomes part of a storage path).
pub fn is_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// Unix seconds now.
pub fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}
