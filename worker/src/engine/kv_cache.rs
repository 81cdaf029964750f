//! Paged KV cache: per layer one K and one V tensor of `num_blocks * block_size` slots, and the
//! block allocator that hands fixed-size blocks to sequences, shares full blocks of identical
//! prefixes (the prefix cache: content-hashed, reference-counted, evicted least recently used)
//! and takes them back. It does not decide who gets blocks (the scheduler does) nor how big the
//! budget is (`device`).

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use candle_core::{DType, Device, Tensor};

use super::error::EngineError;
use super::scheduler::PENDING;

/// Content hash of a full block, chained over the hash of the block before it: equal hashes
/// mean equal token prefixes up to the end of the block. A hit is also checked against the
/// cached block's own tokens and parent hash, so a false share needs a 64-bit collision of the
/// parent chain.
pub type BlockHash = u64;

/// The hash of a full block of `tokens` whose preceding block hashes to `parent`.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Extends `hashes` (the hashes of the leading full blocks of `tokens`) to cover up to
/// `upto` blocks, stopping at the first block that is not full or holds a placeholder token.
pub fn extend_hashes(hashes: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize, upto: usize) {
    while hashes.len() < upto {
        let k = hashes.len();
        let Some(block) = tokens.get(k * block_size..(k + 1) * block_size) else { return };
        if block.iter().any(|&t| t & PENDING != 0) {
            return;
        }
        hashes.push(block_hash(hashes.last().copied(), block));
    }
}

/// What a cached block holds: its chain hash, the hash of the block before it and its tokens.
#[derive(Debug, Clone)]
struct Content {
    hash: BlockHash,
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

/// Prefix-cache counters since the engine started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Cached blocks handed out again for new contents (least recently used first).
    pub evictions: u64,
}

/// Allocator of KV blocks (plain indices `0..total`) with reference counts. With prefix
/// caching on, a full block whose K/V are computed is registered under its content hash; when
/// its last user lets go it stays free but cached (evicted last-released-first among equals:
/// a sequence's tail goes before its head) until the allocator needs it for new contents.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    total: usize,
    refs: Vec<u32>,
    /// Free blocks holding nothing worth keeping, handed out first (fresh ones in increasing
    /// order).
    free_plain: Vec<u32>,
    /// Free blocks still holding a cached prefix, by release time (the oldest is evicted first).
    free_cached: BTreeSet<(u64, u32)>,
    released_at: Vec<u64>,
    clock: u64,
    content: Vec<Option<Content>>,
    index: HashMap<BlockHash, u32>,
    caching: bool,
    pub counters: CacheCounters,
}

impl BlockAllocator {
    pub fn new(total: usize, caching: bool) -> Self {
        Self {
            total,
            refs: vec![0; total],
            // Reversed so that blocks are handed out in increasing order.
            free_plain: (0..total as u32).rev().collect(),
            free_cached: BTreeSet::new(),
            released_at: vec![0; total],
            clock: 0,
            content: vec![None; total],
            index: HashMap::new(),
            caching,
            counters: CacheCounters::default(),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Whether full blocks are registered and shared.
    pub fn caching(&self) -> bool {
        self.caching
    }

    /// Blocks no sequence holds (cached ones included: they are taken back when needed).
    pub fn num_free(&self) -> usize {
        self.free_plain.len() + self.free_cached.len()
    }

    pub fn num_used(&self) -> usize {
        self.total - self.num_free()
    }

    /// Blocks registered in the prefix cache (held or free).
    pub fn num_cached(&self) -> usize {
        self.index.len()
    }

    /// Sequences holding block `b`.
    pub fn refs(&self, b: u32) -> u32 {
        self.refs.get(b as usize).copied().unwrap_or(0)
    }

    /// Takes `n` blocks for new contents (plain free blocks first, then the least recently
    /// released cached ones, which leave the cache), or none at all when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.num_free() {
            return None;
        }
        let mut blocks = Vec::with_capacity(n);
        while blocks.len() < n {
            let b = match self.free_plain.pop() {
                Some(b) => b,
                None => {
                    let (_, b) = self.free_cached.pop_first()?;
                    self.forget(b);
                    self.counters.evictions += 1;
                    b
                }
            };
            self.refs[b as usize] = 1;
            blocks.push(b);
        }
        Some(blocks)
    }

    fn forget(&mut self, b: u32) {
        if let Some(c) = self.content[b as usize].take()
            && self.index.get(&c.hash) == Some(&b)
        {
            self.index.remove(&c.hash);
        }
    }

    /// Lets go of blocks (last first, so that a sequence's tail is evicted before its head);
    /// a block nobody holds any more becomes free, cached if it is registered.
    pub fn release(&mut self, blocks: &mut Vec<u32>) {
        for b in blocks.drain(..).rev() {
            let Some(r) = self.refs.get_mut(b as usize) else { continue };
            if *r == 0 {
                tracing::warn!(block = b, "released a KV block nobody holds");
                continue;
            }
            *r -= 1;
            if *r > 0 {
                continue;
            }
            if self.content[b as usize].is_some() {
                self.clock += 1;
                self.released_at[b as usize] = self.clock;
                self.free_cached.insert((self.clock, b));
            } else {
                self.free_plain.push(b);
            }
        }
    }

    /// The cached blocks holding the leading blocks whose hashes are `hashes` (of `tokens`),
    /// as far as they are consecutive hits. Changes nothing (see `acquire`).
    pub fn lookup(&self, hashes: &[BlockHash], tokens: &[u32], block_size: usize) -> Vec<u32> {
        let mut hits = Vec::new();
        if !self.caching {
            return hits;
        }
        for (k, h) in hashes.iter().enumerate() {
            let Some(&b) = self.index.get(h) else { break };
            let parent = k.checked_sub(1).map(|p| hashes[p]);
            let same = self.content[b as usize]
                .as_ref()
                .is_some_and(|c| c.parent == parent && tokens.get(k * block_size..(k + 1) * block_size) == Some(&c.tokens[..]));
            if !same {
                break;
            }
            hits.push(b);
        }
        hits
    }

    /// Free blocks that taking `blocks` (from `lookup`) would use up.
    pub fn free_taken_by(&self, blocks: &[u32]) -> usize {
        blocks.iter().filter(|&&b| self.refs(b) == 0).count()
    }

    /// Takes a reference to each of `blocks` (cache hits), reviving free cached ones.
    pub fn acquire(&mut self, blocks: &[u32]) {
        for &b in blocks {
            let i = b as usize;
            if self.refs[i] == 0 {
                self.free_cached.remove(&(self.released_at[i], b));
            }
            self.refs[i] += 1;
        }
    }

    /// Forgets every cached content (after a failed step, whose K/V writes are unknown); held
    /// blocks stay held.
    pub fn clear_cache(&mut self) {
        for (_, b) in std::mem::take(&mut self.free_cached) {
            self.free_plain.push(b);
        }
        self.content.iter_mut().for_each(|c| *c = None);
        self.index.clear();
    }

    /// Registers held block `b` as holding the full block `tokens` with chain hash `hash`
    /// (after `parent`). Nothing happens with caching off, for a block already registered, or
    /// when another block already holds the same contents (this one stays private).
    pub fn register(&mut self, b: u32, hash: BlockHash, parent: Option<BlockHash>, tokens: &[u32]) {
        let i = b as usize;
        if !self.caching || i >= self.total || self.content[i].is_some() || self.index.contains_key(&hash) {
            return;
        }
        self.index.insert(hash, b);
        self.content[i] = Some(Content { hash, parent, tokens: tokens.into() });
    }
}

/// The K and V tensors of every layer, `[num_blocks * block_size, kv_heads * head_dim]` each.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    block_size: usize,
    num_blocks: usize,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let slots = num_blocks * block_size;
        let mut layers = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            layers.push((Tensor::zeros((slots, kv_dim), dtype, device)?, Tensor::zeros((slots, kv_dim), dtype, device)?));
        }
        Ok(Self { layers, block_size, num_blocks })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The element type of the K and V tensors (the activation dtype, or F8E4M3).
    pub fn dtype(&self) -> Result<DType, EngineError> {
        self.layers.first().map(|(k, _)| k.dtype()).ok_or_else(|| EngineError::Config("a KV cache of no layers".into()))
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The K and V tensors of layer `i`.
    pub fn layer(&self, i: usize) -> Result<(&Tensor, &Tensor), EngineError> {
        self.layers.get(i).map(|(k, v)| (k, v)).ok_or_else(|| EngineError::Config(format!("no KV cache for layer {i}")))
    }
}

/// Slot of every position `0..len` of a sequence with this block table.
pub fn slots_for(table: &[u32], block_size: usize, len: usize) -> Vec<u32> {
    (0..len).map(|p| table[p / block_size] * block_size as u32 + (p % block_size) as u32).collect()
}

/// Blocks needed to hold `tokens` positions.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_hands_out_and_takes_back() {
        let mut a = BlockAllocator::new(4, false);
        let mut x = a.allocate(3).unwrap_or_default();
        assert_eq!(x, vec![0, 1, 2]);
        assert!(a.allocate(2).is_none());
        assert_eq!(a.num_used(), 3);
        a.release(&mut x);
        assert_eq!(a.num_free(), 4);
        assert_eq!(slots_for(&[3, 1], 4, 6), vec![12, 13, 14, 15, 4, 5]);
        assert_eq!(blocks_for(17, 16), 2);
    }

    /// Registers the leading full blocks of `tokens` held in `blocks`.
    fn register_all(a: &mut BlockAllocator, blocks: &[u32], tokens: &[u32], bs: usize) -> Vec<BlockHash> {
        let mut hashes = Vec::new();
        extend_hashes(&mut hashes, tokens, bs, blocks.len());
        for (k, &h) in hashes.iter().enumerate() {
            a.register(blocks[k], h, k.checked_sub(1).map(|p| hashes[p]), &tokens[k * bs..(k + 1) * bs]);
        }
        hashes
    }

    #[test]
    fn full_blocks_are_shared_by_content_and_reference_counted() {
        let mut a = BlockAllocator::new(8, true);
        let tokens: Vec<u32> = (0..10).collect();
        let mut first = a.allocate(3).unwrap_or_default();
        let hashes = register_all(&mut a, &first, &tokens, 4);
        assert_eq!(hashes.len(), 2, "only the two full blocks of 10 tokens are hashed");
        assert_eq!(a.num_cached(), 2);
        // The same prefix finds both full blocks; another token in block 1 finds only block 0.
        assert_eq!(a.lookup(&hashes, &tokens, 4), first[..2].to_vec());
        let mut other = tokens.clone();
        other[6] = 99;
        let mut other_hashes = Vec::new();
        extend_hashes(&mut other_hashes, &other, 4, 2);
        assert_eq!(other_hashes[0], hashes[0]);
        assert_eq!(a.lookup(&other_hashes, &other, 4), vec![first[0]]);
        // A block whose stored tokens differ is no hit even under the same hash.
        let mut forged = tokens.clone();
        forged[0] = 7;
        assert!(a.lookup(&hashes[..1], &forged, 4).is_empty());
        let hits = a.lookup(&hashes, &tokens, 4);
        assert_eq!(a.free_taken_by(&hits), 0, "held blocks cost no free block");
        a.acquire(&hits);
        assert_eq!(a.refs(first[0]), 2);
        let used = a.num_used();
        a.release(&mut first);
        assert_eq!(a.refs(hits[0]), 1, "still held by the second sequence");
        assert_eq!(a.num_used(), used - 1, "only the private third block was freed");
        // Registering a second block with the same contents keeps it private.
        let mut dup = a.allocate(1).unwrap_or_default();
        a.register(dup[0], hashes[0], None, &tokens[..4]);
        assert_eq!(a.lookup(&hashes[..1], &tokens, 4), vec![hits[0]]);
        a.release(&mut dup);
        let mut held = hits;
        a.release(&mut held);
        assert_eq!(a.num_free(), 8);
        assert_eq!(a.num_cached(), 2, "free blocks keep their contents");
        // Free cached blocks come back as hits and leave the free pool while held.
        let again = a.lookup(&hashes, &tokens, 4);
        assert_eq!(a.free_taken_by(&again), 2);
        a.acquire(&again);
        assert_eq!(a.num_free(), 6);
    }

    #[test]
    fn eviction_takes_plain_blocks_first_then_the_least_recently_released_tail_first() {
        let mut a = BlockAllocator::new(4, true);
        let ta: Vec<u32> = (0..8).collect();
        let tb: Vec<u32> = (100..108).collect();
        let mut sa = a.allocate(2).unwrap_or_default();
        let ha = register_all(&mut a, &sa, &ta, 4);
        let mut sb = a.allocate(2).unwrap_or_default();
        let hb = register_all(&mut a, &sb, &tb, 4);
        let (a0, a1, b0) = (sa[0], sa[1], sb[0]);
        a.release(&mut sa);
        a.release(&mut sb);
        assert_eq!(a.num_free(), 4);
        // A's tail, then A's head: A was released first and tails go before heads.
        assert_eq!(a.allocate(1), Some(vec![a1]));
        assert_eq!(a.lookup(&ha, &ta, 4), vec![a0], "A's head is still cached");
        assert_eq!(a.allocate(1), Some(vec![a0]));
        assert!(a.lookup(&ha, &ta, 4).is_empty());
        assert_eq!(a.counters.evictions, 2);
        assert_eq!(a.lookup(&hb, &tb, 4).len(), 2, "B untouched");
        // Freed blocks without contents are reused before B's cached ones.
        let mut plain = vec![a0];
        a.release(&mut plain);
        assert_eq!(a.allocate(1), Some(vec![a0]));
        let hits = a.lookup(&hb, &tb, 4);
        assert_eq!((hits.len(), hits[0]), (2, b0), "B still cached whole");
    }

    #[test]
    fn caching_off_registers_nothing() {
        let mut a = BlockAllocator::new(2, false);
        let t: Vec<u32> = (0..4).collect();
        let b = a.allocate(1).unwrap_or_default();
        let h = register_all(&mut a, &b, &t, 4);
        assert_eq!(a.num_cached(), 0);
        assert!(a.lookup(&h, &t, 4).is_empty());
        let mut pending = t.clone();
        pending[3] = PENDING;
        let mut hp = Vec::new();
        extend_hashes(&mut hp, &pending, 4, 1);
        assert!(hp.is_empty(), "a block with a placeholder token has no hash yet");
    }
}
