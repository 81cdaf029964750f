//! Paged KV cache: per layer one K and one V tensor of `num_blocks * block_size` slots, and the
//! block allocator that hands fixed-size blocks to sequences and takes them back.
//! It does not decide who gets blocks (the scheduler does) nor how big the budget is (`device`).

use candle_core::{DType, Device, Tensor};

use super::error::EngineError;

/// Free-list allocator of KV blocks. Blocks are plain indices `0..total`.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    pub fn new(total: usize) -> Self {
        // Reversed so that blocks are handed out in increasing order.
        Self { free: (0..total as u32).rev().collect(), total }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Takes `n` blocks, or none at all when fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        let mut blocks = self.free.split_off(at);
        blocks.reverse();
        Some(blocks)
    }

    /// Returns blocks to the free list.
    pub fn release(&mut self, blocks: &mut Vec<u32>) {
        self.free.extend(blocks.drain(..).rev());
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
        let mut a = BlockAllocator::new(4);
        let mut x = a.allocate(3).unwrap_or_default();
        assert_eq!(x, vec![0, 1, 2]);
        assert!(a.allocate(2).is_none());
        assert_eq!(a.num_used(), 3);
        a.release(&mut x);
        assert_eq!(a.num_free(), 4);
        assert_eq!(slots_for(&[3, 1], 4, 6), vec![12, 13, 14, 15, 4, 5]);
        assert_eq!(blocks_for(17, 16), 2);
    }
}
