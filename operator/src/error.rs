//! The operator's error type: every failure a reconcile, the planner or the storage edge can
//! report, with the object, field or URI it concerns, and a bounded `metric_label()` used as the
//! `error` label of `sluice_reconcile_errors_total`. No I/O here.

use std::time::Duration;

use sluice_api::jobio::JobIoError as J;

/// How long a job whose input does not exist yet waits before it is planned again.
pub const INPUT_NOT_FOUND_RETRY: Duration = Duration::from_secs(60);

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
    /// Planning, or reading or writing the job's documents, failed (`sluice_api::jobio`): a missing
    /// or changed input, too many shards, a bad document, a storage failure.
    #[error(transparent)]
    JobIo(Box<sluice_api::jobio::JobIoError>),
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
            Error::JobIo(e) => match **e {
                J::InputNotFound { .. } => "input_not_found",
                J::InputChanged { .. } => "input_changed",
                J::TooManyShards { .. } => "too_many_shards",
                J::BadDocument { .. } => "bad_document",
                J::Storage(_) => "storage",
                J::Serialize { .. } => "serialize",
            },
            Error::InvalidSpec { .. } => "invalid_spec",
            Error::Serialize { .. } => "serialize",
        }
    }

    /// Whether retrying cannot help until the user changes something (the job is failed or
    /// held with a condition instead of being retried with backoff).
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::BadUri { .. } | Error::InvalidSpec { .. } => true,
            Error::JobIo(e) => matches!(**e, J::InputChanged { .. } | J::TooManyShards { .. }),
            _ => false,
        }
    }

    /// How long to wait before retrying after this error.
    pub fn retry_after(&self) -> Duration {
        match self {
            Error::JobIo(e) if matches!(**e, J::InputNotFound { .. }) => INPUT_NOT_FOUND_RETRY,
            _ if self.is_permanent() => Duration::from_secs(300),
            _ => Duration::from_secs(10),
        }
    }

    pub(crate) fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }
}

impl From<J> for Error {
    fn from(e: J) -> Self {
        match e {
            // A storage failure is a storage failure, wherever it happened.
            J::Storage(e) => Error::Store(e),
            other => Error::JobIo(Box::new(other)),
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
        let e = Error::from(J::InputNotFound { uri: "s3://b/in.jsonl".into() });
        assert_eq!(e.metric_label(), "input_not_found");
        assert!(e.to_string().contains("spec.input.uri"));
        assert!(!e.is_permanent());
        assert_eq!(e.retry_after(), Duration::from_secs(60));
        let e = Error::from(J::TooManyShards { uri: "x".into(), limit: 100_000, requests_per_shard: 1 });
        assert!(e.is_permanent());
        assert!(e.to_string().contains("spec.sharding.requestsPerShard"));
    }
}
