//! The Sluice operator: the reconciler that runs the pure control core (`sluice-control`: SLA,
//! scaler, status) against Kubernetes, the Job builder, leader election, metrics and the endpoint worker
//! pods report progress to. No inference engine: the `sluice` CLI and local mode live in
//! `sluice-cli`, the engine in `sluice-worker`.
pub mod context;
pub mod controller;
pub mod error;
pub mod fleet;
pub mod job_builder;
pub mod lease;
pub mod metrics;
pub mod planner;
pub mod rbac;
pub mod reconcile;
pub mod reports;
pub mod storage_io;
