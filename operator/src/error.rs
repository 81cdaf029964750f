//! The operator's error type: every failure a reconcile, the planner or the storage edge can
//! report, with the object, field or URI it concerns, and a bounded `metric_label()` used as the
//! `error` label of `sluice_reconcile_errors_total`. No I/O here.

use std::time::Duration;

/// Why a reconcile, a plan or a storage access failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API {action} failed: {source}")]
    Kube {
        /// What was being done, e.g. `patch status of ns/job`.
        action: String,
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// An object-store operation failed.
    #[error("object store {action} {uri}: {source}")]
    Storage {
        /// `get`, `put`, `list`, `head`, `open`.
        action: &'static str,
        uri: String,
        #[source]
        source: object_store::Error,
    },
    /// A storage operation through the shared storage layer failed (with its retries).
    #[error(transparent)]
    Store(#[from] sluice_api::storage::StorageError),
    /// A URI the job names cannot be opened.
    #[error("{field}: cannot use {uri:?}: {reason}")]
    BadUri { field: &'static str, uri: String, reason: String },
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
    /// The job's spec cannot be turned into a Job (bad deadline, bad quantity, missing field).
    #[error("{field}: {reason}")]
    InvalidSpec { field: String, reason: String },
    /// Serializing an object failed (a bug, reported rather than panicking).
    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// A small, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Storage { .. } | Error::Store(_) => "storage",
            Error::BadUri { .. } => "bad_uri",
            Error::InputNotFound { .. } => "input_not_found",
            Error::InputChanged { .. } => "input_changed",
            Error::TooManyShards { .. } => "too_many_shards",
            Error::BadDocument { .. } => "bad_document",
            Error::InvalidSpec { .. } => "invalid_spec",
            Error::Serialize { .. } => "serialize",
        }
    }

    /// Whether retrying cannot help until the user changes something (the job is failed or
    /// held with a condition instead of being retried with backoff).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::BadUri { .. } | Error::InputChanged { .. } | Error::TooManyShards { .. } | Error::InvalidSpec { .. })
    }

    /// How long to wait before retrying after this error.
    pub fn retry_after(&self) -> Duration {
        match self {
            Error::InputNotFound { .. } => Duration::from_secs(60),
            _ if self.is_permanent() => Duration::from_secs(300),
            _ => Duration::from_secs(10),
        }
    }

    pub(crate) fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }
}

impl From<sluice_api::jobio::JobIoError> for Error {
    fn from(e: sluice_api::jobio::JobIoError) -> Self {
        use sluice_api::jobio::JobIoError as J;
        match e {
            J::InputNotFound { uri } => Error::InputNotFound { uri },
            J::InputChanged { uri, plan_uri, planned, current } => Error::InputChanged { uri, plan_uri, planned, current },
            J::TooManyShards { uri, limit, requests_per_shard } => Error::TooManyShards { uri, limit, requests_per_shard },
            J::BadDocument { uri, what, reason } => Error::BadDocument { uri, what, reason },
            J::Storage(e) => Error::Store(e),
            J::Serialize { what, source } => Error::Serialize { what, source },
        }
    }
}

/// Result with the operator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_and_messages_name_the_field() {
        let e = Error::InputNotFound { uri: "s3://b/in.jsonl".into() };
        assert_eq!(e.metric_label(), "input_not_found");
        assert!(e.to_string().contains("spec.input.uri"));
        assert!(!e.is_permanent());
        assert_eq!(e.retry_after(), Duration::from_secs(60));
        let e = Error::TooManyShards { uri: "x".into(), limit: 100_000, requests_per_shard: 1 };
        assert!(e.is_permanent());
        assert!(e.to_string().contains("spec.sharding.requestsPerShard"));
    }
}
