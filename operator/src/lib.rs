//! Sluice operator.
pub mod sla;
pub mod error;
pub mod planner;
pub mod storage_io;
