//! Sluice worker.
pub mod engine;
