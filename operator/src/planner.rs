//! Planning a job whose storage the operator can reach: `sluice_api::planner` (one streaming
//! pass over the input, the write-once `plan.json`) with the job's sharding settings. Jobs whose
//! storage only their pods can reach are planned by a planner pod running the same code.

use sluice_api::job::BatchInferenceJobSpec;
use sluice_api::planner::PlanOutcome;

use crate::error::Result;
use crate::storage_io::Location;

/// Reuse `<output>/_sluice/plan.json` when it matches the input, otherwise plan the input and
/// write the plan once.
pub async fn load_or_create(spec: &BatchInferenceJobSpec, input: &Location, output: &Location) -> Result<PlanOutcome> {
    Ok(sluice_api::planner::load_or_create(spec.sharding.requests_per_shard, spec.workers.max, input, output).await?)
}
