//! Continuous-batching scheduler: the waiting queue, the running set and the block tables.
//! Each step it picks which sequences run how many tokens under the max-sequences limit, the
//! token budget and the KV-block budget, preempting the newest sequence when blocks run out.
//! A token still being sampled by the step in flight is held as a `PENDING` placeholder.

use std::collections::VecDeque;
use std::time::Instant;

use rand_chacha::ChaCha12Rng;

use super::error::EngineError;
use super::kv_cache::{BlockAllocator, blocks_for};
use super::sampling::SamplingParams;

/// Marks a placeholder token: `PENDING | row` stands for the token the step in flight samples
/// into its `row`-th logits row (token ids are below 2^31; the engine checks the vocabulary).
pub const PENDING: u32 = 0x8000_0000;

/// `t` with a `PENDING` placeholder replaced by the id the previous step sampled into that row
/// (`prev`, its ids); any other id as it is.
pub fn resolve_pending(t: u32, prev: &[u32]) -> Result<u32, EngineError> {
    if t & PENDING == 0 {
        return Ok(t);
    }
    let row = (t & !PENDING) as usize;
    prev.get(row).copied().ok_or_else(|| pending_error(row, prev.len()))
}

/// A placeholder pointing past the previous step's `rows` sampled rows.
pub fn pending_error(row: usize, rows: usize) -> EngineError {
    EngineError::Config(format!("placeholder token for row {row}, but the previous step sampled {rows} rows"))
}

/// One request being served.
pub struct Sequence {
    pub id: u64,
    /// Arrival order; larger is newer (preempted first).
    pub arrival: u64,
    pub params: SamplingParams,
    /// Prompt followed by the generated tokens; the last one may be a `PENDING` placeholder.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Length at which the sequence ends for length (`max_tokens` or the model's maximum).
    pub max_len: usize,
    /// Leading tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub blocks: Vec<u32>,
    pub rng: ChaCha12Rng,
    pub arrived: Instant,
    pub first_token: Option<Instant>,
    pub preemptions: usize,
}

impl Sequence {
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Whether the step in flight samples this sequence's last token and that token is its
    /// last one (it ends for length): nothing of it is left to schedule.
    pub fn ends_in_flight(&self) -> bool {
        self.tokens.last().is_some_and(|&t| t & PENDING != 0) && self.tokens.len() >= self.max_len
    }
}

/// What one step runs: index into `running` and how many of its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub index: usize,
    pub num_tokens: usize,
}

/// Scheduler limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
}

pub struct Scheduler {
    pub limits: Limits,
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    pub allocator: BlockAllocator,
    pub preemptions: u64,
}

impl Scheduler {
    pub fn new(limits: Limits, num_blocks: usize) -> Self {
        Self { limits, waiting: VecDeque::new(), running: Vec::new(), allocator: BlockAllocator::new(num_blocks), preemptions: 0 }
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Frees a sequence's blocks and forgets its KV; it will be recomputed from its tokens.
    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        self.allocator.release(&mut seq.blocks);
        seq.num_computed = 0;
        seq.preemptions += 1;
        self.preemptions += 1;
        tracing::debug!(id = seq.id, "preempted: out of KV blocks");
        self.waiting.push_front(seq);
    }

    /// Releases a finished sequence's blocks and removes it from the running set.
    pub fn finish(&mut self, index: usize) -> Sequence {
        let mut seq = self.running.remove(index);
        self.allocator.release(&mut seq.blocks);
        seq
    }

    /// Decides this step's work. Running sequences (oldest first) get their next token or
    /// prefill chunk (except those whose last token is in flight and ends them); when their
    /// blocks do not fit, the newest running sequence is preempted.
    /// Then waiting sequences are admitted in arrival order while sequences, tokens and blocks
    /// allow (not in a step that had to preempt).
    pub fn schedule(&mut self) -> Vec<Scheduled> {
        let bs = self.limits.block_size;
        let mut budget = self.limits.max_num_batched_tokens;
        let mut out = Vec::new();
        let mut preempted = false;
        self.running.sort_by_key(|s| s.arrival);
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (remaining, computed, have) = {
                let s = &self.running[i];
                (s.tokens.len() - s.num_computed, s.num_computed, s.blocks.len())
            };
            if remaining == 0 || self.running[i].ends_in_flight() {
                i += 1;
                continue;
            }
            let n = remaining.min(budget);
            let need = blocks_for(computed + n, bs).saturating_sub(have);
            let mut self_preempted = false;
            while self.allocator.num_free() < need {
                preempted = true;
                let last = self.running.len() - 1;
                self.preempt(last);
                if last == i {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            if let Some(mut b) = self.allocator.allocate(need) {
                self.running[i].blocks.append(&mut b);
            }
            out.push(Scheduled { index: i, num_tokens: n });
            budget -= n;
            i += 1;
        }
        if preempted {
            return out;
        }
        while budget > 0 && self.running.len() < self.limits.max_num_seqs {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let n = (front.tokens.len() - front.num_computed).min(budget);
            let need = blocks_for(front.num_computed + n, bs).saturating_sub(front.blocks.len());
            if self.allocator.num_free() < need {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if let Some(mut b) = self.allocator.allocate(need) {
                seq.blocks.append(&mut b);
            }
            self.running.push(seq);
            out.push(Scheduled { index: self.running.len() - 1, num_tokens: n });
            budget -= n;
        }
        out
    }
}
