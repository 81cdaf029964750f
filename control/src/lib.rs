//! `sluice-control`: the pure middle of Sluice. The SLA model ([`sla`]), the one [`scaler`] the
//! reconciler, local mode and the simulator all drive, and the job status and conditions
//! ([`status`], [`conditions`]) computed from what was observed, and the [`fleet`] scheduler that
//! plans many jobs against one GPU budget. No I/O: no Kubernetes client,
//! no object storage, no clock of its own, no engine; callers observe, this decides, they act.
pub mod conditions;
pub mod fleet;
pub mod fleet_view;
pub mod scaler;
pub mod sla;
pub mod status;
