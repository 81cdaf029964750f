//! Pure line-range bookkeeping for one shard: which input lines committed chunks cover, which
//! chunks to cut from finished lines (deterministic boundaries, so two attempts name the same
//! chunks), and the deterministic cover used to assemble the final files. No I/O here.

use std::collections::BTreeMap;
use std::ops::Range;

/// Lines `[start, end)` of a committed chunk (1-based input line numbers).
pub type ChunkRange = Range<u64>;

/// Where chunk boundaries fall: every `chunk_lines` lines from the shard's first line, and for
/// early (timed) commits every `align` lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPolicy {
    pub chunk_lines: u64,
    pub align: u64,
}

impl ChunkPolicy {
    /// A policy with `chunk_lines` per chunk and timed commits aligned to an eighth of it.
    pub fn new(chunk_lines: u64) -> Self {
        let chunk_lines = chunk_lines.max(1);
        Self { chunk_lines, align: (chunk_lines / 8).max(1) }
    }
}

/// How eagerly to cut chunks from finished lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// Only full chunks at the fixed boundaries (and runs that close a gap).
    Full,
    /// Also the finished prefix of a partial chunk, cut at an `align` boundary (timer).
    Aligned,
    /// Everything finished (shutdown).
    All,
}

/// The committed chunks of a shard and the shard's line range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coverage {
    range: Range<u64>,
    chunks: Vec<ChunkRange>,
}

impl Coverage {
    /// A shard covering lines `range`, with no chunks committed.
    pub fn new(range: Range<u64>) -> Self {
        Self { range, chunks: Vec::new() }
    }

    /// The shard's lines.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    /// Record a committed chunk (ignored when it lies outside the shard or is already known).
    pub fn add(&mut self, c: ChunkRange) {
        if c.start < self.range.start || c.end > self.range.end || c.start >= c.end || self.chunks.contains(&c) {
            return;
        }
        let pos = self.chunks.partition_point(|x| (x.start, x.end) < (c.start, c.end));
        self.chunks.insert(pos, c);
    }

    /// The committed chunks, sorted.
    pub fn chunks(&self) -> &[ChunkRange] {
        &self.chunks
    }

    /// Whether a committed chunk holds this line.
    pub fn covers(&self, line: u64) -> bool {
        self.chunks.iter().any(|c| c.contains(&line))
    }

    /// Whether every line of the shard is committed.
    pub fn complete(&self) -> bool {
        self.cover().is_some()
    }

    /// Lines not in any committed chunk, as sorted disjoint runs.
    pub fn gaps(&self) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut p = self.range.start;
        for c in &self.chunks {
            if c.start > p {
                out.push(p..c.start);
            }
            p = p.max(c.end);
        }
        if p < self.range.end {
            out.push(p..self.range.end);
        }
        out
    }

    /// Number of committed lines.
    pub fn lines_covered(&self) -> u64 {
        let gaps: u64 = self.gaps().iter().map(|g| g.end - g.start).sum();
        (self.range.end - self.range.start) - gaps
    }

    /// A deterministic cover of the shard by committed chunks: `(chunk, lines taken from it)`
    /// pieces in line order, each line exactly once. At each line the chunk reaching furthest
    /// wins (ties: the earliest start). `None` while a line is uncovered. An empty shard has an
    /// empty cover.
    pub fn cover(&self) -> Option<Vec<(ChunkRange, Range<u64>)>> {
        let mut out = Vec::new();
        let mut p = self.range.start;
        while p < self.range.end {
            let best =
                self.chunks.iter().filter(|c| c.start <= p && p < c.end).max_by(|a, b| a.end.cmp(&b.end).then(b.start.cmp(&a.start)))?;
            out.push((best.clone(), p..best.end));
            p = best.end;
        }
        Some(out)
    }

    /// Chunks to commit from the finished, uncommitted lines `done` (keys are line numbers).
    /// Boundaries are fixed (`first + k * chunk_lines`) so attempts name the same chunks; a
    /// chunk starts at a boundary or right after a committed line, and ends at a boundary, at
    /// a committed line or at the shard's end. Timed and final flushes may cut earlier.
    pub fn cut<V>(&self, done: &BTreeMap<u64, V>, policy: ChunkPolicy, flush: Flush) -> Vec<ChunkRange> {
        let mut out = Vec::new();
        for run in runs(done) {
            let mut s = run.start;
            while s < run.end {
                let next_boundary = self.range.start + ((s - self.range.start) / policy.chunk_lines + 1) * policy.chunk_lines;
                let at_left_edge = (s - self.range.start).is_multiple_of(policy.chunk_lines) || self.covers(s - 1);
                if flush == Flush::Full && !at_left_edge {
                    // Wait for the lines before `s`; later full chunks may still go.
                    s = next_boundary;
                    continue;
                }
                // The run may close a gap before the boundary: a committed line or the shard end.
                let stop = self.next_covered_from(s).unwrap_or(self.range.end);
                let b = next_boundary.min(stop);
                if b <= run.end {
                    out.push(s..b);
                    s = b;
                    continue;
                }
                let e = match flush {
                    Flush::Full => s,
                    Flush::Aligned => {
                        let a = self.range.start + ((run.end - self.range.start) / policy.align) * policy.align;
                        a.max(s)
                    }
                    Flush::All => run.end,
                };
                if e > s {
                    out.push(s..e);
                }
                break;
            }
        }
        out
    }

    /// The first committed line at or after `line`.
    fn next_covered_from(&self, line: u64) -> Option<u64> {
        self.chunks.iter().filter(|c| c.end > line).map(|c| c.start.max(line)).min()
    }
}

/// Maximal runs of consecutive keys.
fn runs<V>(done: &BTreeMap<u64, V>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for &k in done.keys() {
        match out.last_mut() {
            Some(r) if r.end == k => r.end = k + 1,
            _ => out.push(k..k + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(lines: impl IntoIterator<Item = u64>) -> BTreeMap<u64, ()> {
        lines.into_iter().map(|l| (l, ())).collect()
    }

    #[test]
    fn full_chunks_use_fixed_boundaries() {
        let cov = Coverage::new(11..31); // 20 lines
        let p = ChunkPolicy::new(8);
        assert_eq!(cov.cut(&done(11..25), p, Flush::Full), vec![11..19]);
        assert_eq!(cov.cut(&done(11..31), p, Flush::Full), vec![11..19, 19..27, 27..31], "the last chunk ends at the shard end");
        assert_eq!(cov.cut(&done(12..31), p, Flush::Full), vec![19..27, 27..31], "12..19 waits for line 11");
        assert!(cov.cut(&done(20..26), p, Flush::Full).is_empty());
        assert_eq!(cov.cut(&done(29..31), p, Flush::Full), vec![], "29 is no chunk start");
        assert_eq!(cov.cut(&done(27..31), p, Flush::Full), vec![27..31]);
        assert_eq!(cov.cut(&done(12..31), p, Flush::All), vec![12..19, 19..27, 27..31]);
    }

    #[test]
    fn timed_and_final_flushes() {
        let cov = Coverage::new(1..101);
        let p = ChunkPolicy::new(32); // align 4
        assert_eq!(cov.cut(&done(1..40), p, Flush::Aligned), vec![1..33, 33..37]);
        assert_eq!(cov.cut(&done(1..40), p, Flush::All), vec![1..33, 33..40]);
        assert_eq!(cov.cut(&done((1..3).chain(5..7)), p, Flush::All), vec![1..3, 5..7]);
        assert!(cov.cut(&done(1..3), p, Flush::Aligned).is_empty());
    }

    #[test]
    fn runs_that_close_a_gap_are_committed() {
        let mut cov = Coverage::new(1..101);
        cov.add(1..33);
        cov.add(37..65);
        let p = ChunkPolicy::new(32);
        assert_eq!(cov.gaps(), vec![33..37, 65..101]);
        assert_eq!(cov.cut(&done(33..37), p, Flush::Full), vec![33..37]);
        assert_eq!(cov.cut(&done(34..37), p, Flush::Full), vec![], "line 33 is still missing");
        assert_eq!(cov.cut(&done(65..70), p, Flush::Full), vec![], "a full chunk is 65..97");
        assert_eq!(cov.lines_covered(), 60);
        assert!(!cov.complete());
    }

    #[test]
    fn cover_is_deterministic_and_exact_with_overlaps() {
        let mut a = Coverage::new(1..21);
        for c in [1..9, 1..5, 5..13, 9..17, 13..21, 17..21] {
            a.add(c);
        }
        let mut b = Coverage::new(1..21);
        for c in [17..21, 13..21, 9..17, 5..13, 1..5, 1..9] {
            b.add(c);
        }
        let ca = a.cover().unwrap();
        assert_eq!(ca, b.cover().unwrap(), "insertion order does not matter");
        let mut lines = Vec::new();
        for (chunk, take) in &ca {
            assert!(chunk.start <= take.start && take.end <= chunk.end);
            lines.extend(take.clone());
        }
        assert_eq!(lines, (1..21).collect::<Vec<_>>());
        assert!(a.complete());
        assert_eq!(a.gaps(), vec![]);
        assert_eq!(Coverage::new(5..5).cover(), Some(vec![]));
    }

    #[test]
    fn out_of_range_chunks_are_ignored() {
        let mut c = Coverage::new(10..20);
        c.add(5..12);
        c.add(15..25);
        c.add(12..12);
        assert!(c.chunks().is_empty());
        assert!(!c.covers(11));
    }
}
