//! `sluice-api`: the contract between the Sluice operator and its workers. The
//! `BatchInferenceJob` CRD types, the shard plan, progress records, input and output line
//! formats, the worker invocation contract, and manifest validation with the CRD's own rules.

pub mod budget;
pub mod contract;
pub mod deadline;
pub mod job;
#[cfg(feature = "storage")]
pub mod jobio;
pub mod lines;
pub mod output;
pub mod plan;
#[cfg(feature = "storage")]
pub mod planner;
pub mod progress;
pub mod report;
#[cfg(feature = "storage")]
pub mod storage;
pub mod tls;
pub mod validate;

pub use budget::{GpuBudget, GpuBudgetSpec, GpuBudgetStatus};
pub use job::{BatchInferenceJob, BatchInferenceJobSpec, BatchInferenceJobStatus};
