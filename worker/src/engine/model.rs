//! The batched, ragged transformer (Qwen2 / Llama / Mistral share this block): one forward pass
//! over the flattened new tokens of many sequences, each token with its own position, attending
//! over its sequence's keys in the paged KV cache. No scheduling or sampling policy lives here.

use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;

use super::config::{ArchConfig, EngineSwitches};
use super::error::EngineError;
use super::fp8::{Fp8Mode, Proj};
use super::kv_cache::KvCache;
use super::profile::Profiler;
use super::scheduler::{PENDING, pending_error, resolve_pending};
use super::weights::Weights;

struct Layer {
    input_norm: Tensor,
    /// Q, K and V projections stacked into one `[(heads + 2 * kv_heads) * head_dim, hidden]`
    /// matrix (one GEMM per layer instead of three); its bias is kept apart (`qkv_bias`) so
    /// the CUDA path can add it inside the RoPE kernel.
    qkv: Proj,
    qkv_bias: Option<Tensor>,
    o: Proj,
    post_norm: Tensor,
    /// Gate and up projections stacked: `[2 * intermediate, hidden]`.
    gate_up: Proj,
    down: Proj,
}

/// One sequence's share of a forward pass.
#[derive(Debug, Clone)]
pub struct SeqInput {
    /// New tokens to run (a prefill chunk, or the one token of a decode step).
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`; positions before it are already in the KV cache.
    pub start_pos: usize,
    /// The sequence's block table; it covers at least positions `0..start_pos + tokens.len()`.
    pub blocks: Vec<u32>,
    /// Whether the logits of the last token are wanted.
    pub want_logits: bool,
}

/// The flattened device-side inputs of one step, shared by every layer.
struct StepTensors {
    num_tokens: usize,
    token_ids: Tensor,
    /// `[num_tokens]` u32 position of every new token.
    positions: Tensor,
    /// `[num_tokens, head_dim / 2]` RoPE tables at those positions (model dtype; unused on
    /// the paged path, whose kernel reads the f32 tables).
    cos: Option<Tensor>,
    sin: Option<Tensor>,
    /// `[num_tokens, kv_heads * head_dim]` slot index of every new token (for `scatter_set`),
    /// or `[num_tokens]` slots for the CUDA write kernel.
    write_index: Tensor,
    /// Every token's attention through the paged kernel (CUDA bf16); when set, `decode` and
    /// `prefills` are empty.
    paged: Option<PagedInputs>,
    /// Decode group: sequences with one new token, first in the flat layout.
    decode: Option<DecodeGroup>,
    /// Every longer chunk, in flat order after the decode group.
    prefills: Vec<PrefillChunk>,
    /// Rows of the flat hidden states whose logits are returned.
    logit_rows: Option<Tensor>,
}

/// Inputs of the paged attention kernel (`cuda_ops::paged_attention`) for a whole step.
struct PagedInputs {
    /// `[sequences, max_blocks]` block ids, padded with 0.
    tables: Tensor,
    /// `[num_tokens]` each token's row in `tables`.
    table_rows: Tensor,
    /// `[num_tokens]` keys each token attends to (its position + 1).
    ctx_lens: Tensor,
    /// Work items grouping consecutive prefill positions (`cuda_ops::query_chunks`) for the
    /// tokens after the decode tokens, in steps with prefill chunks on the tensor-core kernel.
    prefill: Option<PrefillItems>,
}

struct PrefillItems {
    items: Tensor,
    /// Tokens before it (the decode tokens) are attended one per block.
    first: usize,
}

/// Decode attention with candle ops (CPU, f32/f16, shapes the kernel does not cover): keys
/// gathered from the cache and padded to the longest context.
struct DecodeGroup {
    batch: usize,
    max_ctx: usize,
    /// `[batch * max_ctx]` key slots, padded with slot 0.
    key_slots: Tensor,
    /// `[batch, 1, 1, max_ctx]` additive mask: 0 for keys, -inf for padding.
    mask: Tensor,
}

/// What `forward_sampled` brings back for a sequence that wanted logits.
#[derive(Debug, Clone, PartialEq)]
pub enum LastToken {
    /// The full f32 logits row (sampling on the host).
    Logits(Vec<f32>),
    /// The argmax computed on the device (greedy; only the id crosses to the host).
    Argmax(u32),
}

/// The sampled ids of a launched step, as the next step resolves its placeholders from them.
pub enum StepIds {
    /// Argmax computed on the host from host logits (CPU, or `SLUICE_DEVICE_ARGMAX=0`).
    Host(Vec<u32>),
    /// Argmax on the device (`[rows]` u32, still in GPU memory) and its asynchronous copy to a
    /// page-locked host buffer.
    Device { ids: Tensor, copy: super::cuda_ops::IdsCopy },
}

/// A step whose forward pass is enqueued (on CUDA: maybe still running). `Model::collect`
/// turns it into each sequence's `LastToken`.
pub struct PendingStep {
    /// Per input sequence, its row among the logits rows (sequences that wanted logits).
    logit_of: Vec<Option<usize>>,
    /// Per input sequence, whether it samples on the host and needs its full logits row.
    full_logits: Vec<bool>,
    /// Logits rows already on the host (host argmax path), indexed by row.
    host_logits: Option<Vec<Vec<f32>>>,
    /// The `[rows, vocab]` device logits, kept when some sequence needs its full row.
    device_logits: Option<Tensor>,
    pub ids: StepIds,
}

impl PendingStep {
    /// The logits row of input sequence `i`, if it wanted logits.
    pub fn row_of(&self, i: usize) -> Option<usize> {
        self.logit_of.get(i).copied().flatten()
    }

    /// Whether some sequence samples on the host (the next step needs its token first).
    pub fn samples_on_host(&self) -> bool {
        self.logit_of.iter().zip(&self.full_logits).any(|(r, &f)| r.is_some() && f)
    }
}

/// Prefill chunks of the same length and start position, attended together: `count` chunks
/// of `len` tokens each, consecutive in the flat layout from `start`, over `ctx` keys.
struct PrefillChunk {
    start: usize,
    count: usize,
    len: usize,
    ctx: usize,
    /// `[count * ctx]` key slots.
    key_slots: Tensor,
    /// `[len, ctx]` causal additive mask (shared by the group).
    mask: Tensor,
}

/// Most score elements (`chunks * len * ctx`, per query head) of one prefill group.
const PREFILL_GROUP_ELEMS: usize = 1 << 22;

/// Most sequences of a decode step replayed as a CUDA graph: one graph per batch size up to
/// this, captured the first time a decode step of that size runs. Larger batches keep the GPU
/// busy long enough that the host's kernel launches are hidden behind it.
pub const GRAPH_MAX_BATCH: usize = 8;

/// Fewest sequences of a step that `EngineSwitches::nano_batches` splits in two, and half of
/// it the fewest decode sequences the second half takes: each half must still fill the GPU
/// on its own (smaller steps are bound by their launches).
pub const SPLIT_MIN_SEQS: usize = 64;

/// How a step splits (`EngineSwitches::nano_batches`): the indices into `seqs` of the first
/// half and of the second, each in step order, or None when it does not split.
///
/// The second half takes only decode tokens that do not fill their block. The only K/V a
/// sequence reads that another sequence writes in the same step is a full block that a prompt
/// admitted in this step found in the prefix cache while the step computes it, and such a block
/// is filled by a prefill chunk or by a decode token at a block's last slot. Those stay in the
/// first half with every prefill chunk, so the halves share nothing that either writes. A
/// decode-only step gives the second half half its sequences; a step with prefill chunks gives
/// it every decode token it may take (their attention runs beside the prefill's GEMMs).
pub fn split_plan(seqs: &[SeqInput], block_size: usize) -> Option<(Vec<usize>, Vec<usize>)> {
    if seqs.len() < SPLIT_MIN_SEQS || block_size == 0 {
        return None;
    }
    let (mut first, mut movable): (Vec<usize>, Vec<usize>) =
        (0..seqs.len()).partition(|&i| seqs[i].tokens.len() > 1 || (seqs[i].start_pos + 1).is_multiple_of(block_size));
    let prefill = first.iter().any(|&i| seqs[i].tokens.len() > 1);
    let take = if prefill { movable.len() } else { (seqs.len() / 2).min(movable.len()) };
    if take < SPLIT_MIN_SEQS / 2 {
        return None;
    }
    let second = movable.split_off(movable.len() - take);
    first.extend(movable);
    first.sort_unstable();
    Some((first, second))
}

/// The captured decode graphs of a model, by batch size, for the KV cache they were captured
/// over (its layer-0 key tensor: a graph writes into the cache it saw).
#[derive(Default)]
struct DecodeGraphs {
    cache: Option<candle_core::TensorId>,
    by_batch: std::collections::HashMap<usize, DecodeGraph>,
}

enum DecodeGraph {
    Ready(CapturedDecode),
    /// Capture failed once for this size (logged); its steps run kernel by kernel.
    Failed,
}

/// A decode step of a fixed batch size captured as a CUDA graph. Every launch reads the step's
/// inputs from `inputs` (refilled in place before each launch; block tables padded to the
/// model's longest context so that their shape never changes) and leaves the logits and the
/// greedy ids in `logits` and `ids`.
struct CapturedDecode {
    graph: super::cuda_ops::StepGraph,
    inputs: StepTensors,
    logits: Tensor,
    ids: Tensor,
}

impl CapturedDecode {
    /// Copies the inputs of `st` (a decode step of the same batch size, prepared with the same
    /// table width) into the graph's input tensors, in stream order after the previous launch.
    /// Rows of tables and logits are `0..n` in every such step and stay as captured.
    fn refill(&self, st: &StepTensors) -> Result<(), EngineError> {
        let (Some(to), Some(from)) = (&self.inputs.paged, &st.paged) else {
            return Err(EngineError::Config("a CUDA graph step without paged attention inputs".into()));
        };
        if st.num_tokens != self.inputs.num_tokens || from.tables.dims() != to.tables.dims() {
            return Err(EngineError::Config(format!(
                "decode graph of {} tokens and tables {:?} refilled with {} tokens and tables {:?}",
                self.inputs.num_tokens,
                to.tables.dims(),
                st.num_tokens,
                from.tables.dims()
            )));
        }
        self.inputs.token_ids.slice_set(&st.token_ids, 0, 0)?;
        self.inputs.positions.slice_set(&st.positions, 0, 0)?;
        self.inputs.write_index.slice_set(&st.write_index, 0, 0)?;
        to.tables.slice_set(&from.tables, 0, 0)?;
        to.ctx_lens.slice_set(&from.ctx_lens, 0, 0)?;
        Ok(())
    }
}

/// What running a step as two halves needs (`Model::split_logits`).
struct SplitSteps {
    /// The second half's GEMM state (its own cuBLAS handle and FP8 workspace).
    lane: super::cuda_ops::Lane,
    /// The thread that enqueues the second half: one for the model's life, so that its
    /// per-thread CUDA stream is always the same one.
    thread: rayon::ThreadPool,
}

impl SplitSteps {
    fn new(device: &Device, fp8: bool) -> Result<Self, EngineError> {
        let thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "sluice-split".into())
            .build()
            .map_err(|e| EngineError::Thread(format!("cannot start the split-step thread: {e}")))?;
        Ok(Self { lane: super::cuda_ops::Lane::new(device, fp8)?, thread })
    }
}

/// A loaded causal LM ready for batched forward passes.
pub struct Model {
    cfg: ArchConfig,
    device: Device,
    dtype: DType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// `[max_len, head_dim / 2]` f32 RoPE tables.
    cos: Tensor,
    sin: Tensor,
    max_len: usize,
    /// All attention through the paged kernel (CUDA bf16; `SLUICE_PAGED_ATTENTION=0` off).
    paged_attention: bool,
    /// The paged path uses the tensor-core kernel (head_dim 64/128; `SLUICE_ATTN_MMA=0` off).
    attn_tensor_cores: bool,
    /// Steps with prefill chunks run their positions through the chunked prefill kernel
    /// (tensor cores; `SLUICE_ATTN_PREFILL=off`: one position per block).
    attn_prefill_chunks: bool,
    /// The double-buffered head_dim-64 tensor-core kernel (`EngineSwitches::attn_pipelined`).
    attn_pipelined: bool,
    /// Projections of a few rows through `cuda_ops::small_linear` (`EngineSwitches::small_linear`).
    small_linear: bool,
    /// Greedy argmax on the device (CUDA; `SLUICE_DEVICE_ARGMAX=0` turns it off for A/B runs).
    device_argmax: bool,
    /// Page-locked buffers for reading sampled ids back without waiting for later work.
    readback: super::cuda_ops::ReadbackPool,
    /// Small decode steps through CUDA graphs (`EngineSwitches::cuda_graphs`; needs the paged
    /// kernels and the device argmax).
    cuda_graphs: bool,
    graphs: std::sync::Mutex<DecodeGraphs>,
    /// Steps launched through a graph so far.
    graph_steps: std::sync::atomic::AtomicU64,
    /// Large steps run as two halves on two streams (`EngineSwitches::nano_batches`;
    /// off with the profiler).
    split: Option<SplitSteps>,
    /// Steps run as two halves so far, and those of them that also prefilled.
    split_steps: std::sync::atomic::AtomicU64,
    split_prefill_steps: std::sync::atomic::AtomicU64,
    /// Per-phase timing (`SLUICE_PROFILE=1`).
    profiler: std::sync::Mutex<Profiler>,
}

fn linear(w: &Weights, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear, EngineError> {
    let weight = w.get(&format!("{name}.weight"), &[out, inp])?;
    let b = if bias { Some(w.get(&format!("{name}.bias"), &[out])?) } else { None };
    Ok(Linear::new(weight, b))
}

/// Projections that read the same input, stacked along the output dimension.
fn stacked(parts: &[Linear]) -> Result<Linear, EngineError> {
    let weights: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
    let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias()).collect();
    let bias = match biases {
        Some(b) => Some(Tensor::cat(&b, 0)?),
        None => None,
    };
    Ok(Linear::new(Tensor::cat(&weights, 0)?, bias))
}

impl Model {
    /// Builds the model from `weights`, with RoPE tables for positions `< max_len`; with `fp8`
    /// the layers' projections are quantized to E4M3 (embeddings, norms and lm_head stay).
    pub fn new(
        cfg: &ArchConfig,
        weights: &Weights,
        device: &Device,
        max_len: usize,
        switches: &EngineSwitches,
        fp8: Option<&Fp8Mode>,
    ) -> Result<Self, EngineError> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let embed = weights.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let b = cfg.qkv_bias;
            let qkv = stacked(&[
                linear(weights, &format!("{p}.self_attn.q_proj"), cfg.num_heads * hd, h, b)?,
                linear(weights, &format!("{p}.self_attn.k_proj"), cfg.num_kv_heads * hd, h, b)?,
                linear(weights, &format!("{p}.self_attn.v_proj"), cfg.num_kv_heads * hd, h, b)?,
            ])?;
            let qkv_bias = qkv.bias().cloned();
            let qkv = Proj::new(Linear::new(qkv.weight().clone(), None), fp8)?;
            let gate_up = Proj::new(
                stacked(&[
                    linear(weights, &format!("{p}.mlp.gate_proj"), cfg.intermediate_size, h, false)?,
                    linear(weights, &format!("{p}.mlp.up_proj"), cfg.intermediate_size, h, false)?,
                ])?,
                fp8,
            )?;
            layers.push(Layer {
                input_norm: weights.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv,
                qkv_bias,
                o: Proj::new(linear(weights, &format!("{p}.self_attn.o_proj"), h, cfg.num_heads * hd, false)?, fp8)?,
                post_norm: weights.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up,
                down: Proj::new(linear(weights, &format!("{p}.mlp.down_proj"), h, cfg.intermediate_size, false)?, fp8)?,
            });
        }
        let norm = weights.get("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings || !weights.contains("lm_head.weight") {
            if !cfg.tie_word_embeddings {
                // Surface the missing tensor rather than silently tying.
                weights.get("lm_head.weight", &[cfg.vocab_size, h])?;
            }
            embed.clone()
        } else {
            weights.get("lm_head.weight", &[cfg.vocab_size, h])?
        };
        let inv = cfg.inv_freq();
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_len, half), device)?;
        let sin = Tensor::from_vec(sin, (max_len, half), device)?;
        let paged_attention = device.is_cuda()
            && super::cuda_ops::paged_attention_supported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, weights.dtype())
            && switches.paged_attention;
        let attn_tensor_cores = super::cuda_ops::tensor_core_attention_supported(cfg.head_dim) && switches.attn_tensor_cores;
        tracing::debug!(paged_attention, attn_tensor_cores, "attention path");
        Ok(Self {
            cfg: cfg.clone(),
            device: device.clone(),
            dtype: weights.dtype(),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            max_len,
            paged_attention,
            attn_tensor_cores,
            attn_prefill_chunks: attn_tensor_cores && switches.attn_prefill_chunks,
            attn_pipelined: attn_tensor_cores && switches.attn_pipelined,
            small_linear: switches.small_linear,
            device_argmax: device.is_cuda() && switches.device_argmax,
            readback: super::cuda_ops::ReadbackPool::default(),
            cuda_graphs: paged_attention && device.is_cuda() && switches.device_argmax && switches.cuda_graphs && !switches.profile,
            graphs: std::sync::Mutex::new(DecodeGraphs::default()),
            graph_steps: std::sync::atomic::AtomicU64::new(0),
            split: if switches.nano_batches && !switches.profile && (paged_attention || !device.is_cuda()) {
                Some(SplitSteps::new(device, matches!(fp8, Some(Fp8Mode::Cuda(_))))?)
            } else {
                None
            },
            split_steps: std::sync::atomic::AtomicU64::new(0),
            split_prefill_steps: std::sync::atomic::AtomicU64::new(0),
            profiler: std::sync::Mutex::new(Profiler::new(device, switches.profile)),
        })
    }

    /// Runs `f` on the profiler when profiling is on.
    pub(crate) fn prof(&self, f: impl FnOnce(&mut Profiler)) {
        if let Ok(mut p) = self.profiler.lock()
            && p.enabled()
        {
            f(&mut p);
        }
    }

    /// Decode steps launched through a CUDA graph so far.
    pub fn graph_steps(&self) -> u64 {
        self.graph_steps.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Steps run as two halves on two streams so far (`EngineSwitches::nano_batches`), and
    /// how many of them also prefilled.
    pub fn split_steps(&self) -> (u64, u64) {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        (load(&self.split_steps), load(&self.split_prefill_steps))
    }

    /// Whether `SLUICE_PROFILE=1` timing is on (its events assume one step at a time).
    pub fn profiling(&self) -> bool {
        self.profiler.lock().is_ok_and(|p| p.enabled())
    }

    /// Forgets the profiler's times so far.
    pub fn profile_reset(&self) {
        self.prof(|p| p.reset());
    }

    /// The profiler's table (`SLUICE_PROFILE=1`), or None.
    pub fn profile_report(&self) -> Option<String> {
        self.profiler.lock().ok().and_then(|p| p.report())
    }

    pub fn config(&self) -> &ArchConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether attention runs the paged CUDA kernels (which read an FP8 cache too).
    pub fn paged_attention(&self) -> bool {
        self.paged_attention
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Moves the key slots and mask of the prefill group being built to the device.
    fn close_group(&self, prefills: &mut [PrefillChunk], slots: &mut Vec<u32>, mask: &mut Vec<f32>) -> Result<(), EngineError> {
        if let Some(g) = prefills.last_mut()
            && !slots.is_empty()
        {
            g.key_slots = Tensor::from_vec(std::mem::take(slots), g.count * g.ctx, &self.device)?;
            g.mask = Tensor::from_vec(std::mem::take(mask), (g.len, g.ctx), &self.device)?;
        }
        Ok(())
    }

    /// Block tables (one row per sequence, in flat order) and each token's row and causal
    /// context length, for the paged attention kernel.
    /// The kernel inputs of the paged path; `table_width` pads every block table to that many
    /// entries (CUDA graphs, whose launches keep the shapes they were captured with).
    fn paged_inputs(
        &self,
        seqs: &[SeqInput],
        order: &[usize],
        block_size: usize,
        table_width: Option<usize>,
    ) -> Result<PagedInputs, EngineError> {
        let ctx_of = |i: usize| seqs[i].start_pos + seqs[i].tokens.len();
        let longest = order.iter().map(|&i| ctx_of(i).div_ceil(block_size)).max().unwrap_or(1).max(1);
        let max_blocks = table_width.unwrap_or(longest).max(longest);
        let n: usize = order.iter().map(|&i| seqs[i].tokens.len()).sum();
        let mut tables = Vec::with_capacity(order.len() * max_blocks);
        let mut rows = Vec::with_capacity(n);
        let mut lens = Vec::with_capacity(n);
        for (row, &i) in order.iter().enumerate() {
            let s = &seqs[i];
            let nb = ctx_of(i).div_ceil(block_size);
            tables.extend_from_slice(&s.blocks[..nb]);
            tables.extend(std::iter::repeat_n(0u32, max_blocks - nb));
            rows.extend(std::iter::repeat_n(row as u32, s.tokens.len()));
            lens.extend((s.start_pos..ctx_of(i)).map(|p| p as u32 + 1));
        }
        let prefill = if self.attn_prefill_chunks && n > order.len() {
            // Decode tokens (one new token) come first in the flat order.
            let first = order.iter().take_while(|&&i| seqs[i].tokens.len() == 1).count();
            let chunk = super::cuda_ops::prefill_chunk_tokens(self.cfg.num_heads, self.cfg.num_kv_heads);
            if n >= 1 << 24 {
                return Err(EngineError::Config(format!("{n} tokens in one step: the chunked prefill kernel takes fewer than 2^24")));
            }
            let items = super::cuda_ops::query_chunks(&rows, &lens, first, chunk);
            let m = items.len();
            Some(PrefillItems { items: Tensor::from_vec(items, m, &self.device)?, first })
        } else {
            None
        };
        Ok(PagedInputs {
            tables: Tensor::from_vec(tables, (order.len(), max_blocks), &self.device)?,
            table_rows: Tensor::from_vec(rows, n, &self.device)?,
            ctx_lens: Tensor::from_vec(lens, n, &self.device)?,
            prefill,
        })
    }

    /// Lays the sequences out flat (decode tokens first) and builds the index/mask tensors.
    /// Returns the tensors and, per input sequence, its row among the returned logits.
    /// `PENDING` placeholder tokens are resolved from `prev`, the step launched before this one.
    /// `table_width`: see `paged_inputs`.
    fn prepare(
        &self,
        seqs: &[SeqInput],
        block_size: usize,
        prev: Option<&StepIds>,
        table_width: Option<usize>,
    ) -> Result<(StepTensors, Vec<Option<usize>>), EngineError> {
        let kvd = self.cfg.num_kv_heads * self.cfg.head_dim;
        let mut order: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].tokens.len() == 1).collect();
        let n_decode = order.len();
        // Prefill chunks of equal (length, start) next to each other: one attention per group.
        let mut pre: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].tokens.len() > 1).collect();
        pre.sort_by_key(|&i| (seqs[i].tokens.len(), seqs[i].start_pos));
        order.extend(pre);
        let slot = |blocks: &[u32], p: usize| blocks[p / block_size] * block_size as u32 + (p % block_size) as u32;

        let mut ids = Vec::new();
        let mut pending_on_device = false;
        let mut pos = Vec::new();
        let mut write = Vec::new();
        let mut logit_rows = Vec::new();
        let mut logit_of = vec![None; seqs.len()];
        let mut prefills: Vec<PrefillChunk> = Vec::new();
        let mut group_slots: Vec<u32> = Vec::new();
        let mut group_mask: Vec<f32> = Vec::new();
        for &i in &order {
            let s = &seqs[i];
            let ctx = s.start_pos + s.tokens.len();
            if s.blocks.len() * block_size < ctx {
                return Err(EngineError::Config(format!("sequence has {} KV blocks for {ctx} positions", s.blocks.len())));
            }
            if ctx > self.max_len {
                return Err(EngineError::Config(format!("position {ctx} beyond the model's maximum length {}", self.max_len)));
            }
            let start = ids.len();
            for &t in &s.tokens {
                if t & PENDING == 0 {
                    ids.push(t);
                    continue;
                }
                let row = (t & !PENDING) as usize;
                match prev {
                    Some(StepIds::Host(v)) => ids.push(resolve_pending(t, v)?),
                    Some(StepIds::Device { ids: d, .. }) if row < d.dims1()? => {
                        pending_on_device = true;
                        ids.push(t);
                    }
                    Some(StepIds::Device { ids: d, .. }) => return Err(pending_error(row, d.dims1()?)),
                    None => return Err(pending_error(row, 0)),
                }
            }
            pos.extend((s.start_pos..ctx).map(|p| p as u32));
            write.extend((s.start_pos..ctx).map(|p| slot(&s.blocks, p)));
            if s.want_logits {
                logit_of[i] = Some(logit_rows.len());
                logit_rows.push((ids.len() - 1) as u32);
            }
            if s.tokens.len() > 1 && !self.paged_attention {
                let t = s.tokens.len();
                let joins = prefills.last().is_some_and(|g| {
                    g.len == t && g.ctx == ctx && g.start + g.count * t == start && (g.count + 1) * t * ctx <= PREFILL_GROUP_ELEMS
                });
                if !joins {
                    self.close_group(&mut prefills, &mut group_slots, &mut group_mask)?;
                    for q in 0..t {
                        let qpos = s.start_pos + q;
                        group_mask.extend((0..ctx).map(|k| if k <= qpos { 0f32 } else { f32::NEG_INFINITY }));
                    }
                    prefills.push(PrefillChunk {
                        start,
                        count: 0,
                        len: t,
                        ctx,
                        key_slots: Tensor::zeros(1, DType::U32, &Device::Cpu)?,
                        mask: Tensor::zeros(1, DType::F32, &Device::Cpu)?,
                    });
                }
                group_slots.extend((0..ctx).map(|p| slot(&s.blocks, p)));
                if let Some(g) = prefills.last_mut() {
                    g.count += 1;
                }
            }
        }
        self.close_group(&mut prefills, &mut group_slots, &mut group_mask)?;
        let paged = if self.paged_attention { Some(self.paged_inputs(seqs, &order, block_size, table_width)?) } else { None };
        let decode = if n_decode > 0 && !self.paged_attention {
            let ctx_of = |i: usize| seqs[i].start_pos + 1;
            let max_ctx = order[..n_decode].iter().map(|&i| ctx_of(i)).max().unwrap_or(1);
            let mut slots = Vec::with_capacity(n_decode * max_ctx);
            let mut mask = Vec::with_capacity(n_decode * max_ctx);
            for &i in &order[..n_decode] {
                let ctx = ctx_of(i);
                slots.extend((0..ctx).map(|p| slot(&seqs[i].blocks, p)));
                slots.extend(std::iter::repeat_n(0u32, max_ctx - ctx));
                mask.extend(std::iter::repeat_n(0f32, ctx));
                mask.extend(std::iter::repeat_n(f32::NEG_INFINITY, max_ctx - ctx));
            }
            Some(DecodeGroup {
                batch: n_decode,
                max_ctx,
                key_slots: Tensor::from_vec(slots, n_decode * max_ctx, &self.device)?,
                mask: Tensor::from_vec(mask, (n_decode, 1, 1, max_ctx), &self.device)?,
            })
        } else {
            None
        };
        let n = ids.len();
        let positions = Tensor::from_vec(pos, n, &self.device)?;
        let (cos, sin) = if self.paged_attention {
            (None, None)
        } else {
            (
                Some(self.cos.index_select(&positions, 0)?.to_dtype(self.dtype)?),
                Some(self.sin.index_select(&positions, 0)?.to_dtype(self.dtype)?),
            )
        };
        let write_index = if self.paged_attention {
            Tensor::from_vec(write, n, &self.device)?
        } else {
            Tensor::from_vec(write, (n, 1), &self.device)?.broadcast_as((n, kvd))?.contiguous()?
        };
        let logit_rows = if logit_rows.is_empty() {
            None
        } else {
            let len = logit_rows.len();
            Some(Tensor::from_vec(logit_rows, len, &self.device)?)
        };
        let mut token_ids = Tensor::from_vec(ids, n, &self.device)?;
        if pending_on_device && let Some(StepIds::Device { ids: prev_ids, .. }) = prev {
            token_ids = super::cuda_ops::resolve_tokens(&token_ids, prev_ids)?;
        }
        Ok((StepTensors { num_tokens: n, token_ids, positions, cos, sin, write_index, paged, decode, prefills, logit_rows }, logit_of))
    }

    /// Runs the new tokens of `seqs` through the model, writing their keys and values into
    /// `cache`. Returns, per sequence, the f32 logits of its last token when `want_logits`.
    pub fn forward(&self, seqs: &[SeqInput], cache: &mut KvCache) -> Result<Vec<Option<Vec<f32>>>, EngineError> {
        let mut out = vec![None; seqs.len()];
        let Some((logits, logit_of)) = self.last_logits(seqs, cache, None)? else {
            return Ok(out);
        };
        let logits = self.logits_to_host(&logits)?;
        for (i, row) in logit_of.iter().enumerate() {
            if let Some(r) = row {
                out[i] = logits.get(*r).cloned();
            }
        }
        Ok(out)
    }

    /// All logits rows as f32 on the host (waits for the step; closes its profile).
    fn logits_to_host(&self, logits: &Tensor) -> Result<Vec<Vec<f32>>, EngineError> {
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        self.prof(|p| {
            p.host("wait");
            p.gpu("d2h");
            p.end();
        });
        Ok(rows)
    }

    /// Enqueues the forward pass of `seqs` and the sampling inputs of its logits rows, without
    /// waiting for the GPU: greedy rows get their argmax (on the device when it can, its ids
    /// copied back asynchronously); sequences with `full_logits[i]` get their whole row in
    /// `collect`. Placeholder tokens resolve from `prev`, the step launched just before.
    /// Returns None when no sequence wants logits.
    pub fn launch(
        &self,
        seqs: &[SeqInput],
        cache: &mut KvCache,
        full_logits: &[bool],
        prev: Option<&StepIds>,
    ) -> Result<Option<PendingStep>, EngineError> {
        let full_logits: Vec<bool> = (0..seqs.len()).map(|i| full_logits.get(i).copied().unwrap_or(true)).collect();
        if let Some(step) = self.launch_graph(seqs, cache, &full_logits, prev)? {
            return Ok(Some(step));
        }
        let Some((logits, logit_of)) = self.last_logits(seqs, cache, prev)? else {
            return Ok(None);
        };
        if !self.device_argmax {
            let rows = self.logits_to_host(&logits)?;
            let ids = rows.iter().map(|r| super::sampling::argmax(r)).collect();
            return Ok(Some(PendingStep { logit_of, full_logits, host_logits: Some(rows), device_logits: None, ids: StepIds::Host(ids) }));
        }
        let ids = super::cuda_ops::argmax_rows(&logits)?;
        let step = self.device_step(logit_of, full_logits, ids, || Ok(logits))?;
        self.prof(|p| p.gpu("argmax"));
        Ok(Some(step))
    }

    /// The pending step of ids sampled on the device, their read-back to the host started;
    /// `keep_logits` gives it the device logits when some sequence samples on the host.
    fn device_step(
        &self,
        logit_of: Vec<Option<usize>>,
        full_logits: Vec<bool>,
        ids: Tensor,
        keep_logits: impl FnOnce() -> Result<Tensor, EngineError>,
    ) -> Result<PendingStep, EngineError> {
        let copy = super::cuda_ops::copy_ids_to_host(&ids, &self.readback)?;
        let mut step = PendingStep { logit_of, full_logits, host_logits: None, device_logits: None, ids: StepIds::Device { ids, copy } };
        if step.samples_on_host() {
            step.device_logits = Some(keep_logits()?);
        }
        Ok(step)
    }

    /// Waits for a launched step's sampled ids (only them: a step launched after it keeps
    /// running) and returns, per input sequence, its argmax or, where it asked, its full logits.
    pub fn collect(&self, step: PendingStep) -> Result<Vec<Option<LastToken>>, EngineError> {
        let PendingStep { logit_of, full_logits, host_logits, device_logits, ids } = step;
        let mut out = vec![None; logit_of.len()];
        if let Some(rows) = host_logits {
            let StepIds::Host(ids) = ids else {
                return Err(EngineError::Config("host logits without host ids".into()));
            };
            let mut rows: Vec<Option<Vec<f32>>> = rows.into_iter().map(Some).collect();
            for (i, r) in logit_of.iter().enumerate() {
                let Some(r) = *r else { continue };
                out[i] = if full_logits[i] {
                    rows.get_mut(r).and_then(Option::take).map(LastToken::Logits)
                } else {
                    ids.get(r).map(|&id| LastToken::Argmax(id))
                };
            }
            return Ok(out);
        }
        let StepIds::Device { copy, .. } = ids else {
            return Err(EngineError::Config("device step without device ids".into()));
        };
        let ids = copy.wait(&self.readback)?;
        self.prof(|p| {
            p.host("wait");
            p.gpu("d2h");
            p.end();
        });
        let mut want_rows = Vec::new();
        let mut want_seqs = Vec::new();
        for (i, r) in logit_of.iter().enumerate() {
            let Some(r) = *r else { continue };
            if full_logits[i] {
                want_rows.push(r as u32);
                want_seqs.push(i);
            } else if let Some(&id) = ids.get(r) {
                out[i] = Some(LastToken::Argmax(id));
            }
        }
        if let (false, Some(logits)) = (want_rows.is_empty(), device_logits) {
            let n = want_rows.len();
            let rows = Tensor::from_vec(want_rows, n, &self.device)?;
            let full = logits.index_select(&rows, 0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (i, row) in want_seqs.into_iter().zip(full) {
                out[i] = Some(LastToken::Logits(row));
            }
        }
        Ok(out)
    }

    /// The forward pass; returns the `[rows, vocab]` logits (model dtype) of the sequences that
    /// want them and each sequence's row, or None when no sequence wants logits.
    #[allow(clippy::type_complexity)]
    fn last_logits(
        &self,
        seqs: &[SeqInput],
        cache: &mut KvCache,
        prev: Option<&StepIds>,
    ) -> Result<Option<(Tensor, Vec<Option<usize>>)>, EngineError> {
        if seqs.is_empty() {
            return Ok(None);
        }
        if let Some(split) = &self.split
            && let Some(plan) = split_plan(seqs, cache.block_size())
        {
            return self.split_logits(seqs, plan, cache, prev, split);
        }
        self.prof(|p| p.begin(if seqs.iter().any(|s| s.tokens.len() > 1) { "mixed" } else { "decode" }));
        let (st, logit_of) = self.prepare(seqs, cache.block_size(), prev, None)?;
        self.prof(|p| {
            p.host("prepare");
            p.gpu("prepare_h2d");
        });
        Ok(self.forward_step(&st, cache)?.map(|logits| (logits, logit_of)))
    }

    /// A step of `seqs` as the two halves of `plan` (`split_plan`), each through every layer on
    /// its own CUDA stream, so that one half's attention can run beside the other's GEMMs: the
    /// first half on this thread's per-thread default stream, the second on the split thread's
    /// (with the lane's GEMM state). The halves join on the GPU before the shared lm_head.
    #[allow(clippy::type_complexity)]
    fn split_logits(
        &self,
        seqs: &[SeqInput],
        (first, second): (Vec<usize>, Vec<usize>),
        cache: &KvCache,
        prev: Option<&StepIds>,
        split: &SplitSteps,
    ) -> Result<Option<(Tensor, Vec<Option<usize>>)>, EngineError> {
        use super::cuda_ops::StreamMark;
        let bs = cache.block_size();
        let half = |idx: &[usize]| idx.iter().map(|&i| seqs[i].clone()).collect::<Vec<_>>();
        let (st_first, rows_first) = self.prepare(&half(&first), bs, prev, None)?;
        let (st_second, rows_second) = self.prepare(&half(&second), bs, prev, None)?;
        // Both halves' inputs (and the previous step, whose ids they may read) are enqueued on
        // this thread's stream: the second stream starts after them.
        let inputs_ready = StreamMark::record(&self.device)?;
        let mut out_second: Option<Result<(Option<Tensor>, StreamMark), EngineError>> = None;
        let out_first = split.thread.in_place_scope(|scope| {
            scope.spawn(|_| {
                let run = || {
                    inputs_ready.wait(&self.device)?;
                    let last = self.last_hidden(&st_second, cache, Some(&split.lane))?;
                    Ok((last, StreamMark::record(&self.device)?))
                };
                let out = run();
                if out.is_err() {
                    // Nothing this half enqueued may still run once the step's tensors go
                    // (the failure is returned to the engine either way).
                    let _ = self.device.synchronize();
                }
                out_second = Some(out);
            });
            self.last_hidden(&st_first, cache, None)
        });
        let out_second = out_second.unwrap_or_else(|| Err(EngineError::Config("the second half of a split step did not run".into())));
        let (last_second, second_done) = out_second?;
        // Everything after this (the lm_head, and the next step's reads of the K/V the second
        // half wrote) runs after the second half on this thread's stream.
        second_done.wait(&self.device)?;
        let last_first = out_first?;
        self.split_steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if first.iter().any(|&i| seqs[i].tokens.len() > 1) {
            self.split_prefill_steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let parts: Vec<Tensor> = [last_first, last_second].into_iter().flatten().collect();
        if parts.is_empty() {
            return Ok(None);
        }
        // The logits rows are the first half's, then the second's.
        let offset = rows_first.iter().flatten().count();
        let mut logit_of = vec![None; seqs.len()];
        for (&i, r) in first.iter().zip(rows_first) {
            logit_of[i] = r;
        }
        for (&i, r) in second.iter().zip(rows_second) {
            logit_of[i] = r.map(|r| r + offset);
        }
        Ok(Some((self.lm_head(&Tensor::cat(&parts, 0)?)?, logit_of)))
    }

    /// The layers over a prepared step: the hidden states of its `logit_rows` after the last
    /// layer (before the final norm), or None when it has none. `lane`: see `Proj::forward_deferred`.
    fn last_hidden(&self, st: &StepTensors, cache: &KvCache, lane: Option<&super::cuda_ops::Lane>) -> Result<Option<Tensor>, EngineError> {
        let eps = self.cfg.rms_norm_eps as f32;
        let small = self.small_linear && lane.is_none();
        let mut x = self.embed.index_select(&st.token_ids, 0)?;
        self.prof(|p| p.gpu("embed"));
        let Some(first) = self.layers.first() else {
            return Err(EngineError::Config("model has no layers".into()));
        };
        // Each residual add is fused with the norm that follows it.
        let mut h = super::cuda_ops::rms_norm(&x, &first.input_norm, eps)?;
        self.prof(|p| p.gpu("norm"));
        for (li, layer) in self.layers.iter().enumerate() {
            let attn = self.attention(layer, &h, st, cache, li, lane)?;
            let o = layer.o.forward_deferred(&attn, small, lane)?;
            self.prof(|p| p.gpu("o_proj"));
            let (x1, h1) = super::cuda_ops::add_rms_norm(&x, &o, &layer.post_norm, eps)?;
            self.prof(|p| p.gpu("add_norm"));
            let mlp = layer.gate_up.forward_silu_mul(&h1, small, lane)?;
            self.prof(|p| p.gpu("mlp_gate_up"));
            let d = layer.down.forward_deferred(&mlp, small, lane)?;
            self.prof(|p| p.gpu("mlp_down"));
            match self.layers.get(li + 1) {
                Some(next) => (x, h) = super::cuda_ops::add_rms_norm(&x1, &d, &next.input_norm, eps)?,
                None => x = (x1 + d.finish()?)?,
            }
            self.prof(|p| p.gpu("add_norm"));
        }
        self.prof(|p| p.host("enqueue_layers"));
        match &st.logit_rows {
            Some(rows) => Ok(Some(x.index_select(rows, 0)?)),
            None => Ok(None),
        }
    }

    /// The final norm and lm_head over hidden states `[rows, hidden]`: `[rows, vocab]` logits.
    fn lm_head(&self, last: &Tensor) -> Result<Tensor, EngineError> {
        let last = super::cuda_ops::rms_norm(last, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let logits = last.matmul(&self.lm_head.t()?)?;
        self.prof(|p| p.gpu("lm_head"));
        Ok(logits)
    }

    /// The layers and lm_head over a prepared step: the `[rows, vocab]` logits of its
    /// `logit_rows`, or None when it has none.
    fn forward_step(&self, st: &StepTensors, cache: &KvCache) -> Result<Option<Tensor>, EngineError> {
        let Some(last) = self.last_hidden(st, cache, None)? else {
            self.prof(|p| p.end());
            return Ok(None);
        };
        Ok(Some(self.lm_head(&last)?))
    }

    /// `launch` of a decode step through its CUDA graph (captured now if this batch size has
    /// none yet), or None when the step is not one a graph covers: the caller then runs it
    /// kernel by kernel. Covered: CUDA graphs on, up to `GRAPH_MAX_BATCH` sequences, each
    /// decoding one token and wanting its logits.
    fn launch_graph(
        &self,
        seqs: &[SeqInput],
        cache: &mut KvCache,
        full_logits: &[bool],
        prev: Option<&StepIds>,
    ) -> Result<Option<PendingStep>, EngineError> {
        let n = seqs.len();
        if !self.cuda_graphs || n == 0 || n > GRAPH_MAX_BATCH || !seqs.iter().all(|s| s.tokens.len() == 1 && s.want_logits) {
            return Ok(None);
        }
        let Ok(mut graphs) = self.graphs.lock() else {
            return Ok(None);
        };
        let cache_id = cache.layer(0)?.0.id();
        if graphs.cache != Some(cache_id) {
            graphs.by_batch.clear();
            graphs.cache = Some(cache_id);
        }
        if matches!(graphs.by_batch.get(&n), Some(DecodeGraph::Failed)) {
            return Ok(None);
        }
        let width = self.max_len.div_ceil(cache.block_size());
        let (st, logit_of) = self.prepare(seqs, cache.block_size(), prev, Some(width))?;
        let g = match graphs.by_batch.remove(&n) {
            Some(DecodeGraph::Ready(g)) => {
                g.refill(&st)?;
                g
            }
            _ => match self.capture_decode(st, cache) {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(batch = n, error = %e, "CUDA graph capture failed; decode steps of this size run kernel by kernel");
                    graphs.by_batch.insert(n, DecodeGraph::Failed);
                    return Ok(None);
                }
            },
        };
        let launched = g.graph.launch();
        let outputs = launched.and_then(|()| Ok((g.ids.copy()?, g.logits.clone())));
        graphs.by_batch.insert(n, DecodeGraph::Ready(g));
        let (ids, logits) = outputs?;
        self.graph_steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The graph's next launch overwrites its logits: a step that keeps them takes a copy.
        Ok(Some(self.device_step(logit_of, full_logits.to_vec(), ids, || Ok(logits.copy()?))?))
    }

    /// Captures the decode step `st` (prepared with padded block tables) as a graph; the
    /// capture runs the step once as usual, and the graph is launched by the caller.
    fn capture_decode(&self, st: StepTensors, cache: &mut KvCache) -> Result<CapturedDecode, EngineError> {
        let rows = st.num_tokens;
        let vocab = self.lm_head.dim(0)?;
        let logits_out = Tensor::zeros((rows, vocab), self.dtype, &self.device)?;
        let ids_out = Tensor::zeros(rows, DType::U32, &self.device)?;
        let graph = super::cuda_ops::capture_graph(&self.device, || {
            let Some(logits) = self.forward_step(&st, cache)? else {
                return Err(EngineError::Config("a captured decode step has no logits rows".into()));
            };
            let ids = super::cuda_ops::argmax_rows(&logits)?;
            logits_out.slice_set(&logits, 0, 0)?;
            ids_out.slice_set(&ids, 0, 0)?;
            Ok(())
        })?;
        Ok(CapturedDecode { graph, inputs: st, logits: logits_out, ids: ids_out })
    }

    /// Rotary embedding of `x: [n, heads, head_dim]` at each token's position (rotate-half).
    fn rope(&self, x: &Tensor, st: &StepTensors) -> Result<Tensor, EngineError> {
        let (Some(cos), Some(sin)) = (&st.cos, &st.sin) else {
            return Err(EngineError::Config("RoPE tables missing for the candle attention path".into()));
        };
        let x = x.contiguous()?.unsqueeze(0)?;
        Ok(candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0)?)
    }

    fn attention(
        &self,
        layer: &Layer,
        h: &Tensor,
        st: &StepTensors,
        cache: &KvCache,
        li: usize,
        lane: Option<&super::cuda_ops::Lane>,
    ) -> Result<Tensor, EngineError> {
        let n = st.num_tokens;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let g = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let qkv = layer.qkv.forward_deferred(h, self.small_linear && lane.is_none(), lane)?;
        self.prof(|p| p.gpu("qkv"));
        let (kc, vc) = cache.layer(li)?;
        if let Some(PagedInputs { tables, table_rows, ctx_lens, prefill }) = &st.paged {
            let q = super::cuda_ops::rope_qkv_cache(
                &qkv,
                layer.qkv_bias.as_ref(),
                &st.positions,
                &self.cos,
                &self.sin,
                kc,
                vc,
                &st.write_index,
                nh,
                nkv,
                hd,
                cache.block_size(),
            )?;
            self.prof(|p| p.gpu("rope_kv_write"));
            let o = super::cuda_ops::paged_attention(
                &q,
                kc,
                vc,
                tables,
                table_rows,
                ctx_lens,
                nkv,
                cache.block_size(),
                scale as f32,
                self.attn_tensor_cores,
                self.attn_pipelined,
                prefill.as_ref().map(|p| super::cuda_ops::Prefill { items: &p.items, first: p.first }),
            )?;
            self.prof(|p| p.gpu("attn_paged"));
            return Ok(o.reshape((n, nh * hd))?);
        }
        let qkv = qkv.finish()?;
        let qkv = match &layer.qkv_bias {
            Some(b) => qkv.broadcast_add(b)?,
            None => qkv,
        };
        let q = qkv.narrow(1, 0, nh * hd)?.reshape((n, nh, hd))?;
        let k = qkv.narrow(1, nh * hd, nkv * hd)?.reshape((n, nkv, hd))?;
        let v = qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?.reshape((n, nkv, hd))?;
        let q = self.rope(&q, st)?;
        let k = self.rope(&k, st)?;
        kc.scatter_set(&st.write_index, &to_cache(&k.reshape((n, nkv * hd))?, kc.dtype())?, 0)?;
        vc.scatter_set(&st.write_index, &to_cache(&v.reshape((n, nkv * hd))?.contiguous()?, vc.dtype())?, 0)?;
        let mut outs = Vec::with_capacity(1 + st.prefills.len());
        if let Some(DecodeGroup { batch, max_ctx, key_slots, mask }) = &st.decode {
            let (b, l) = (*batch, *max_ctx);
            // [b, nkv, g, hd]: head j*g + i reads kv head j (repeat_kv order).
            let qd = q.narrow(0, 0, b)?.reshape((b, nkv, g, hd))?;
            let kd = kc.index_select(key_slots, 0)?.to_dtype(self.dtype)?.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let vd = vc.index_select(key_slots, 0)?.to_dtype(self.dtype)?.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let scores = (qd.matmul(&kd.transpose(2, 3)?)? * scale)?.to_dtype(DType::F32)?.broadcast_add(mask)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
            outs.push(p.matmul(&vd)?.reshape((b, nh * hd))?);
            self.prof(|p| p.gpu("attn_decode"));
        }
        for c in &st.prefills {
            let (bn, t, ctx) = (c.count, c.len, c.ctx);
            // [bn, nkv, g*t, hd]: query head j*g + i reads kv head j.
            let qp = q.narrow(0, c.start, bn * t)?.reshape((bn, t, nkv, g, hd))?.permute((0, 2, 3, 1, 4))?.contiguous()?.reshape((
                bn,
                nkv,
                g * t,
                hd,
            ))?;
            let kp = kc.index_select(&c.key_slots, 0)?.to_dtype(self.dtype)?.reshape((bn, ctx, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let vp = vc.index_select(&c.key_slots, 0)?.to_dtype(self.dtype)?.reshape((bn, ctx, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let scores =
                (qp.matmul(&kp.transpose(2, 3)?)? * scale)?.to_dtype(DType::F32)?.reshape((bn, nkv, g, t, ctx))?.broadcast_add(&c.mask)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?.reshape((bn, nkv, g * t, ctx))?;
            let o = p.matmul(&vp)?.reshape((bn, nkv, g, t, hd))?.permute((0, 3, 1, 2, 4))?.contiguous()?.reshape((bn * t, nh * hd))?;
            outs.push(o);
            self.prof(|p| p.gpu("attn_prefill"));
        }
        let out = Tensor::cat(&outs, 0)?;
        self.prof(|p| p.gpu("attn_cat"));
        Ok(out)
    }
}

/// Keys or values `x` in the cache's element type: as they are, or (FP8 cache) saturated at
/// ±448 and rounded to E4M3 at unit scale, as the CUDA epilogue `rope_qkv_cache_e4m3` stores them.
fn to_cache(x: &Tensor, cache: DType) -> Result<Tensor, EngineError> {
    if x.dtype() == cache {
        return Ok(x.clone());
    }
    if cache == DType::F8E4M3 {
        let m = f64::from(super::fp8::E4M3_MAX);
        return Ok(x.to_dtype(DType::F32)?.clamp(-m, m)?.to_dtype(DType::F8E4M3)?);
    }
    Ok(x.to_dtype(cache)?)
}

#[cfg(test)]
mod split_tests {
    use super::{SPLIT_MIN_SEQS, SeqInput, split_plan};

    fn seq(tokens: usize, start_pos: usize) -> SeqInput {
        SeqInput { tokens: vec![1; tokens], start_pos, blocks: Vec::new(), want_logits: true }
    }

    fn fills_block(s: &SeqInput, bs: usize) -> bool {
        (s.start_pos + 1).is_multiple_of(bs)
    }

    #[test]
    fn a_decode_step_splits_in_halves_and_keeps_block_filling_tokens_first() {
        // Positions 0..70: the tokens at 15, 31, 47 and 63 fill their 16-slot block.
        let seqs: Vec<SeqInput> = (0..70).map(|p| seq(1, p)).collect();
        let Some((first, second)) = split_plan(&seqs, 16) else { panic!("a 70-sequence decode step splits") };
        assert_eq!(second.len(), 35);
        assert!(second.iter().all(|&i| !fills_block(&seqs[i], 16)), "{second:?}");
        for p in [15, 31, 47, 63] {
            assert!(first.contains(&p), "position {p} fills its block: first half");
        }
        let mut all: Vec<usize> = first.iter().chain(&second).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..70).collect::<Vec<_>>(), "every sequence in exactly one half");
        assert!(first.is_sorted() && second.is_sorted());
    }

    #[test]
    fn a_mixed_step_gives_the_second_half_every_decode_token_that_does_not_fill_a_block() {
        let mut seqs: Vec<SeqInput> = (0..10).map(|i| seq(100, i * 7)).collect();
        seqs.extend((0..60).map(|p| seq(1, 100 + p)));
        let Some((first, second)) = split_plan(&seqs, 16) else { panic!("a mixed step with 60 decode tokens splits") };
        assert!((0..10).all(|i| first.contains(&i)), "prefill chunks stay first");
        let plain = seqs.iter().filter(|s| s.tokens.len() == 1 && !fills_block(s, 16)).count();
        assert_eq!(second.len(), plain);
        assert!(second.iter().all(|&i| seqs[i].tokens.len() == 1 && !fills_block(&seqs[i], 16)));
        assert_eq!(first.len() + second.len(), seqs.len());
    }

    #[test]
    fn small_steps_and_steps_with_few_decode_tokens_do_not_split() {
        let small: Vec<SeqInput> = (0..SPLIT_MIN_SEQS - 1).map(|p| seq(1, p)).collect();
        assert!(split_plan(&small, 16).is_none());
        let mut mostly_prefill: Vec<SeqInput> = (0..50).map(|i| seq(20, i)).collect();
        mostly_prefill.extend((0..20).map(|p| seq(1, 200 + 2 * p)));
        assert!(split_plan(&mostly_prefill, 16).is_none(), "20 decode tokens are too few for a half");
    }
}
