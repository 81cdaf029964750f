//! The shard plan (`<output>/_sluice/plan.json`): line-aligned byte ranges of the input,
//! written once by the planner and read by every worker. Pure data; planning lives in the
//! operator.

use serde::{Deserialize, Serialize};

/// Current plan format version.
pub const PLAN_VERSION: u32 = 1;

/// The split of one input object into shards.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ShardPlan {
    /// Format version.
    pub version: u32,
    /// The input object this plan describes.
    pub input_uri: String,
    /// Input size in bytes when planned.
    pub input_size: u64,
    /// The input's ETag when planned, if the store reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_etag: Option<String>,
    /// Lines in the input (a final line without newline counts).
    pub line_count: u64,
    /// Target lines per shard.
    pub requests_per_shard: u64,
    /// The shards, in input order.
    pub shards: Vec<Shard>,
}

/// What the operator needs of a plan: its size. A planner pod reports it when only the job's
/// pods can read the plan itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlanSummary {
    /// Lines in the input.
    pub line_count: u64,
    /// Target lines per shard.
    pub requests_per_shard: u64,
    /// Shards in the plan (indexes `0..shards`).
    pub shards: u32,
}

impl ShardPlan {
    /// The plan's size.
    pub fn summary(&self) -> PlanSummary {
        PlanSummary {
            line_count: self.line_count,
            requests_per_shard: self.requests_per_shard,
            shards: u32::try_from(self.shards.len()).unwrap_or(u32::MAX),
        }
    }
}

/// Parse an index list as Kubernetes writes `completedIndexes` (`"1,3-5,7"`). Malformed parts
/// are skipped.
pub fn parse_index_ranges(s: &str) -> std::collections::BTreeSet<u32> {
    let mut out = std::collections::BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(i) = part.parse() {
                    out.insert(i);
                }
            }
        }
    }
    out
}

/// Write indexes as Kubernetes does (`"1,3-5,7"`).
pub fn format_index_ranges<'a>(indexes: impl IntoIterator<Item = &'a u32>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut run: Option<(u32, u32)> = None;
    let flush = |r: (u32, u32), parts: &mut Vec<String>| {
        parts.push(if r.0 == r.1 { r.0.to_string() } else { format!("{}-{}", r.0, r.1) });
    };
    for &i in indexes {
        run = match run {
            Some((a, b)) if i == b + 1 => Some((a, i)),
            Some(r) => {
                flush(r, &mut parts);
                Some((i, i))
            }
            None => Some((i, i)),
        };
    }
    if let Some(r) = run {
        flush(r, &mut parts);
    }
    parts.join(",")
}

/// One shard: a line-aligned byte range of the input.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Shard {
    /// Index, equal to the Indexed Job's completion index.
    pub index: u32,
    /// First byte (inclusive).
    pub start: u64,
    /// Last byte (exclusive).
    pub end: u64,
    /// 1-based number of the shard's first line in the input.
    pub first_line: u64,
    /// Lines in the shard.
    pub line_count: u64,
}

impl Shard {
    /// One past the shard's last line number.
    pub fn end_line(&self) -> u64 {
        self.first_line + self.line_count
    }
}

impl ShardPlan {
    /// Check internal consistency: contiguous ranges, indexes in order, counts adding up.
    pub fn check(&self) -> Result<(), String> {
        if self.version != PLAN_VERSION {
            return Err(format!("unsupported plan version {} (expected {PLAN_VERSION})", self.version));
        }
        let mut next_byte = 0;
        let mut next_line = 1;
        for (i, s) in self.shards.iter().enumerate() {
            if s.index as usize != i {
                return Err(format!("shard {i} has index {}", s.index));
            }
            if s.start != next_byte || s.end < s.start {
                return Err(format!("shard {i} covers bytes {}..{}, expected to start at {next_byte}", s.start, s.end));
            }
            if s.first_line != next_line {
                return Err(format!("shard {i} starts at line {}, expected {next_line}", s.first_line));
            }
            next_byte = s.end;
            next_line += s.line_count;
        }
        if next_byte != self.input_size {
            return Err(format!("shards cover {next_byte} bytes of {}", self.input_size));
        }
        if next_line - 1 != self.line_count {
            return Err(format!("shards cover {} lines of {}", next_line - 1, self.line_count));
        }
        Ok(())
    }

    /// The shard with this index.
    pub fn shard(&self, index: u32) -> Option<&Shard> {
        self.shards.get(index as usize)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn index_ranges_round_trip() {
        let set = super::parse_index_ranges("0,2-4,9, 11 - 12,x");
        assert_eq!(set, [0, 2, 3, 4, 9, 11, 12].into_iter().collect());
        assert_eq!(super::format_index_ranges(&set), "0,2-4,9,11-12");
        assert_eq!(super::format_index_ranges(&std::collections::BTreeSet::new()), "");
        assert!(super::parse_index_ranges("").is_empty());
    }
}
