//! Continuous-batching scheduler: the waiting queue, the running set and the block tables.
//! Each step it picks which sequences run how many tokens under the max-sequences limit, the
//! token budget and the KV-block budget, preempting the newest sequence when blocks run out.
//! A token still being sampled by the step in flight is held as a `PENDING` placeholder.
//! With prefix caching, admission starts a sequence after the cached blocks of its prefix, and
//! computed full blocks are registered for later sequences (`kv_cache::BlockAllocator`).

use std::collections::VecDeque;
use std::time::Instant;

use rand_chacha::ChaCha12Rng;

use super::error::EngineError;
use super::kv_cache::{BlockAllocator, BlockHash, blocks_for, extend_hashes};
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
    /// Content hashes of the leading full blocks of `tokens` (as far as they are resolved).
    pub hashes: Vec<BlockHash>,
    /// Leading blocks of `blocks` that are registered in the prefix cache or were hits.
    pub cached_blocks: usize,
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
    /// Share the K/V of identical full prompt blocks between sequences.
    pub prefix_caching: bool,
}

pub struct Scheduler {
    pub limits: Limits,
    pub waiting: VecDeque<Sequence>,
    pub running: Vec<Sequence>,
    pub allocator: BlockAllocator,
    pub preemptions: u64,
    /// Tokens of admitted sequences (prompts, and everything so far of preempted ones) and how
    /// many of them were found in the prefix cache instead of being computed.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

/// Registers in the prefix cache the full blocks of `seq` among its first `written` positions:
/// those whose K/V are computed by the steps enqueued so far or by the step being scheduled.
/// A step writes the K/V of all its tokens in a layer before any of its attention reads them,
/// so a sequence admitted into the same step may already share them.
fn register_prefix(allocator: &mut BlockAllocator, seq: &mut Sequence, bs: usize, written: usize) {
    if !allocator.caching() {
        return;
    }
    let full = (written / bs).min(seq.blocks.len());
    if seq.cached_blocks >= full {
        return;
    }
    extend_hashes(&mut seq.hashes, &seq.tokens, bs, full);
    let upto = full.min(seq.hashes.len());
    for k in seq.cached_blocks..upto {
        let parent = k.checked_sub(1).map(|p| seq.hashes[p]);
        allocator.register(seq.blocks[k], seq.hashes[k], parent, &seq.tokens[k * bs..(k + 1) * bs]);
    }
    seq.cached_blocks = seq.cached_blocks.max(upto);
}

impl Scheduler {
    pub fn new(limits: Limits, num_blocks: usize) -> Self {
        Self {
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            allocator: BlockAllocator::new(num_blocks, limits.prefix_caching),
            preemptions: 0,
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
        }
    }

    /// Queues a new sequence. With prefix caching it goes right after the last waiting new
    /// sequence whose first block is the same, so that shared prefixes run together (their
    /// blocks are still cached when the next one is admitted); otherwise at the back.
    pub fn add(&mut self, mut seq: Sequence) {
        let bs = self.limits.block_size;
        if self.limits.prefix_caching {
            extend_hashes(&mut seq.hashes, &seq.tokens, bs, 1);
            if let Some(&first) = seq.hashes.first()
                && let Some(at) =
                    self.waiting.iter().rposition(|w| w.preemptions == 0 && w.num_computed == 0 && w.hashes.first() == Some(&first))
            {
                self.waiting.insert(at + 1, seq);
                return;
            }
        }
        self.waiting.push_back(seq);
    }

    /// Lets go of a sequence's blocks (its computed full blocks stay cached for others).
    pub fn release_blocks(&mut self, seq: &mut Sequence) {
        register_prefix(&mut self.allocator, seq, self.limits.block_size, seq.num_computed);
        self.allocator.release(&mut seq.blocks);
        seq.cached_blocks = 0;
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Frees a sequence's blocks and forgets its KV; it will be recomputed from its tokens.
    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        self.release_blocks(&mut seq);
        seq.num_computed = 0;
        seq.preemptions += 1;
        self.preemptions += 1;
        tracing::debug!(id = seq.id, "preempted: out of KV blocks");
        self.waiting.push_front(seq);
    }

    /// Releases a finished sequence's blocks and removes it from the running set.
    pub fn finish(&mut self, index: usize) -> Sequence {
        let mut seq = self.running.remove(index);
        self.release_blocks(&mut seq);
        seq
    }

    /// Decides this step's work. Running sequences (oldest first) get their next token or
    /// prefill chunk (except those whose last token is in flight and ends them); when their
    /// blocks do not fit, the newest running sequence is preempted.
    /// Then waiting sequences are admitted in queue order while sequences, tokens and blocks
    /// allow (not in a step that had to preempt), each starting after the cached blocks of its
    /// prefix (never its last token: that one's logits are wanted).
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
            register_prefix(&mut self.allocator, &mut self.running[i], bs, computed + n);
            out.push(Scheduled { index: i, num_tokens: n });
            budget -= n;
            i += 1;
        }
        if preempted {
            return out;
        }
        while budget > 0 && self.running.len() < self.limits.max_num_seqs {
            let Some(front) = self.waiting.front_mut() else {
                break;
            };
            let hits = if self.allocator.caching() && front.blocks.is_empty() {
                let limit = (front.tokens.len() - 1) / bs;
                extend_hashes(&mut front.hashes, &front.tokens, bs, limit);
                self.allocator.lookup(&front.hashes[..limit.min(front.hashes.len())], &front.tokens, bs)
            } else {
                Vec::new()
            };
            let start = front.num_computed.max(hits.len() * bs);
            let n = (front.tokens.len() - start).min(budget);
            let need = blocks_for(start + n, bs).saturating_sub(front.blocks.len().max(hits.len()));
            if self.allocator.num_free() < need + self.allocator.free_taken_by(&hits) {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if !hits.is_empty() {
                self.allocator.acquire(&hits);
                seq.cached_blocks = hits.len();
                seq.blocks = hits;
                seq.num_computed = start;
            }
            self.prefix_query_tokens += seq.tokens.len() as u64;
            self.prefix_hit_tokens += (seq.cached_blocks * bs) as u64;
            if let Some(mut b) = self.allocator.allocate(need) {
                seq.blocks.append(&mut b);
            }
            register_prefix(&mut self.allocator, &mut seq, bs, start + n);
            self.running.push(seq);
            out.push(Scheduled { index: self.running.len() - 1, num_tokens: n });
            budget -= n;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    fn sched(blocks: usize, max_tokens: usize) -> Scheduler {
        Scheduler::new(Limits { max_num_seqs: 8, max_num_batched_tokens: max_tokens, block_size: BS, prefix_caching: true }, blocks)
    }

    fn seq(id: u64, tokens: Vec<u32>) -> Sequence {
        let params = SamplingParams::default();
        Sequence {
            id,
            arrival: id,
            rng: params.rng(),
            params,
            prompt_len: tokens.len(),
            max_len: tokens.len() + 8,
            tokens,
            num_computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            cached_blocks: 0,
            arrived: Instant::now(),
            first_token: None,
            preemptions: 0,
        }
    }

    /// What the engine does after a step: the scheduled tokens are computed.
    fn computed(s: &mut Scheduler, plan: &[Scheduled]) {
        for p in plan {
            s.running[p.index].num_computed += p.num_tokens;
        }
    }

    fn by_id(s: &Scheduler, id: u64) -> &Sequence {
        s.running.iter().find(|q| q.id == id).unwrap_or_else(|| panic!("sequence {id} not running"))
    }

    #[test]
    fn a_shared_prefix_is_computed_once_and_the_divergent_block_is_private() {
        let mut s = sched(16, 64);
        let shared: Vec<u32> = (1..=10).collect();
        let mut a = shared.clone();
        a.extend([50, 51]);
        let mut b = shared.clone();
        b.extend([60, 61]);
        s.add(seq(1, a));
        let plan = s.schedule();
        assert_eq!(plan, vec![Scheduled { index: 0, num_tokens: 12 }]);
        computed(&mut s, &plan);
        s.add(seq(2, b));
        let plan = s.schedule();
        // B starts after the two full blocks it shares with A (8 tokens) and computes 4.
        let b_in = plan.iter().find(|p| s.running[p.index].id == 2).copied();
        assert_eq!(b_in.map(|p| p.num_tokens), Some(4));
        let (ab, bb) = (by_id(&s, 1).blocks.clone(), by_id(&s, 2).blocks.clone());
        assert_eq!(ab[..2], bb[..2], "blocks 0 and 1 are shared");
        assert_ne!(ab[2], bb[2], "block 2 (tokens 8..12, where they differ) is B's own copy");
        assert_eq!((s.allocator.refs(ab[0]), s.allocator.refs(ab[2]), s.allocator.refs(bb[2])), (2, 1, 1));
        assert_eq!(s.prefix_hit_tokens, 8);
        // A finishing leaves the shared blocks held by B.
        let i = s.running.iter().position(|q| q.id == 1).unwrap_or(0);
        s.finish(i);
        assert_eq!(s.allocator.refs(bb[0]), 1);
    }

    #[test]
    fn sequences_admitted_in_the_same_step_share_the_blocks_the_step_writes() {
        let mut s = sched(16, 64);
        let p: Vec<u32> = (1..=9).collect();
        s.add(seq(1, p.clone()));
        s.add(seq(2, p.clone()));
        let plan = s.schedule();
        assert_eq!(plan.iter().map(|x| x.num_tokens).collect::<Vec<_>>(), vec![9, 1], "the second computes only its last token");
        assert_eq!(s.running[0].blocks[..2], s.running[1].blocks[..2]);
    }

    #[test]
    fn a_whole_cached_prompt_still_computes_its_last_token() {
        let mut s = sched(16, 64);
        let p: Vec<u32> = (1..=8).collect();
        s.add(seq(1, p.clone()));
        let plan = s.schedule();
        computed(&mut s, &plan);
        s.add(seq(2, p));
        let plan = s.schedule();
        let second = plan.iter().find(|x| s.running[x.index].id == 2).copied();
        // 8 tokens = 2 full blocks, but the last token's logits are needed: 1 block shared.
        assert_eq!(second.map(|x| x.num_tokens), Some(4));
        let b = &by_id(&s, 2).blocks;
        assert_eq!(b[0], by_id(&s, 1).blocks[0]);
        assert_ne!(b[1], by_id(&s, 1).blocks[1]);
    }

    #[test]
    fn preempting_a_sharer_keeps_the_others_blocks_and_readmission_hits_the_cache() {
        // 5 blocks: A (8 prompt tokens) and B sharing A's first block.
        let mut s = sched(5, 64);
        let a: Vec<u32> = (1..=8).collect();
        let mut b: Vec<u32> = (1..=4).collect();
        b.extend([70, 71, 72]);
        s.add(seq(1, a));
        let plan = s.schedule();
        computed(&mut s, &plan);
        s.add(seq(2, b));
        let plan = s.schedule();
        computed(&mut s, &plan);
        let shared = by_id(&s, 1).blocks[0];
        assert_eq!(by_id(&s, 2).blocks[0], shared);
        assert_eq!(s.allocator.refs(shared), 2);
        // Both decode; A's 9th token needs a third block, B's 8th its second: grow them until
        // the pool runs out and the newest (B) is preempted.
        for _ in 0..8 {
            for q in &mut s.running {
                q.tokens.push(5);
            }
            let plan = s.schedule();
            computed(&mut s, &plan);
            if s.preemptions > 0 {
                break;
            }
        }
        assert_eq!(s.preemptions, 1);
        assert_eq!(s.waiting.front().map(|q| q.id), Some(2));
        assert_eq!(s.allocator.refs(shared), 1, "A still holds the shared block");
        assert_eq!(by_id(&s, 1).blocks[0], shared);
        // A finishes; B comes back and finds its computed blocks in the cache.
        let hits_before = s.prefix_hit_tokens;
        s.finish(0);
        let plan = s.schedule();
        let bq = by_id(&s, 2);
        assert_eq!(bq.blocks[0], shared);
        assert!(s.prefix_hit_tokens - hits_before >= 4, "B's recompute starts after its cached blocks");
        assert!(plan[0].num_tokens < bq.tokens.len());
    }

    #[test]
    fn evicted_prefixes_are_recomputed() {
        let mut s = sched(4, 64);
        let a: Vec<u32> = (1..=9).collect();
        s.add(seq(1, a.clone()));
        let plan = s.schedule();
        computed(&mut s, &plan);
        s.finish(0);
        // Another 3-block prompt takes every block back, A's cached ones included.
        s.add(seq(2, (100..112).collect()));
        let plan = s.schedule();
        computed(&mut s, &plan);
        assert!(s.allocator.counters.evictions >= 1);
        s.finish(0);
        let hits = s.prefix_hit_tokens;
        s.add(seq(3, a));
        let plan = s.schedule();
        assert!(s.prefix_hit_tokens - hits < 8, "A's first blocks were evicted");
        assert!(plan[0].num_tokens > 1);
    }

    #[test]
    fn new_requests_queue_behind_those_with_the_same_first_block() {
        let mut s = sched(16, 64);
        s.add(seq(1, vec![1, 2, 3, 4, 5]));
        s.add(seq(2, vec![9, 9, 9, 9, 9]));
        s.add(seq(3, vec![1, 2, 3, 4, 6]));
        s.add(seq(4, vec![7]));
        let order: Vec<u64> = s.waiting.iter().map(|q| q.id).collect();
        assert_eq!(order, vec![1, 3, 2, 4]);
    }
}
