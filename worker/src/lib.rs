//! `sluice-worker`: what runs in a worker pod. The inference engine (candle: model load,
//! batching scheduler, CUDA kernels), the shard runtime (read a shard's lines, generate, commit
//! results and progress exactly once), the plan/finalize steps and `sluice-bench`.
pub mod app;
pub mod cli;
pub mod commit;
pub mod engine;
pub mod metrics;
pub mod model_fetch;
pub mod parse;
pub mod progress;
pub mod report;
pub mod runtime;
pub mod shard;
pub mod signals;
pub mod steps;
