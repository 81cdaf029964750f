//! The `sluice` command line: local mode (`sluice run`: plan, workers as child processes, the
//! manifest, all through the operator's planner, scaler and status code) and `sluice-sim`, the
//! simulator that drives the very scaler the reconciler steps; `sluice serve`, the OpenAI Batch API
//! (`serve`); `sluice quote`, a job's projection before it starts (`quote`); `kubectl sluice`, the kubectl
//! plugin (`kubectl`). The binaries are in
//! `src/bin`.
pub mod kubectl;
pub mod local;
pub mod quote;
pub mod serve;
pub mod sim;
