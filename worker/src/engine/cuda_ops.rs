//! The engine's own CUDA kernels as candle custom ops (`worker/kernels/paged_attention.cu`,
//! compiled to PTX by `build.rs` with the `cuda` feature): paged attention over the KV cache for
//! decode and prefill tokens alike, the fused QKV epilogue (bias + RoPE + KV write), residual
//! add + RMSNorm, SwiGLU, the greedy argmax over logits rows, and the placeholder-token
//! resolution and pinned asynchronous id read-back that let the host run one step ahead, and the
//! FP8 projection (per-row E4M3 quantization and cuBLASLt's FP8 GEMM with outer-vector scales).
//! It also captures and replays CUDA graphs of decode steps (`capture_graph`).
//! Without the `cuda` feature nothing here runs: `paged_attention_supported` is always false.

use candle_core::{DType, Tensor};

use super::error::EngineError;

/// Query heads per KV head the attention kernel handles.
const MAX_GROUP: usize = 8;
/// Head sizes the attention kernel is compiled for.
const HEAD_DIMS: [usize; 5] = [16, 32, 64, 128, 256];

/// Whether the paged attention kernel can run this shape on `dtype` (CUDA builds, bf16 only).
pub fn paged_attention_supported(num_heads: usize, num_kv_heads: usize, head_dim: usize, dtype: DType) -> bool {
    cfg!(feature = "cuda")
        && dtype == DType::BF16
        && num_kv_heads > 0
        && num_heads.is_multiple_of(num_kv_heads)
        && num_heads / num_kv_heads <= MAX_GROUP
        && HEAD_DIMS.contains(&head_dim)
}

/// Element offset of position `r` of cache block `block`, KV head `kv_head`, in the paged
/// kernels' layout `[blocks][num_kv_heads][block_size][head_dim]` (the kernels' `kv_row` times
/// `head_dim`): what host code that fills or reads a paged cache directly must use.
pub fn kv_cache_offset(block: usize, kv_head: usize, r: usize, num_kv_heads: usize, block_size: usize, head_dim: usize) -> usize {
    ((block * num_kv_heads + kv_head) * block_size + r) * head_dim
}

/// Whether the tensor-core (mma.sync) attention kernel covers `head_dim` (64 or 128); the
/// CUDA-core kernel covers every size `paged_attention_supported` accepts.
pub fn tensor_core_attention_supported(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 128)
}

/// Attention of `n` query tokens, each over its own context read straight from the paged cache.
/// `tensor_cores` picks the mma.sync kernel (only where `tensor_core_attention_supported`).
/// Every kernel reads a bf16 or an F8E4M3 cache (E4M3 widened as it loads), except the chunked
/// prefill kernel: with an F8E4M3 cache, prefill tokens run one per block as decode tokens do.
///
/// * `q`: `[n, num_heads, head_dim]` bf16 (RoPE applied);
/// * `k_cache`, `v_cache`: `slots * num_kv_heads * head_dim` bf16 or F8E4M3 elements, shaped
///   `[slots, num_kv_heads * head_dim]` but laid out block-major for the kernels:
///   `[blocks][num_kv_heads][block_size][head_dim]`, so one block's keys of one KV head are
///   contiguous (`kv_cache_offset`; this step's keys written by `rope_qkv_cache`);
/// * `tables`: `[rows, max_blocks]` u32 block ids, one row per sequence;
/// * `table_rows`: `[n]` u32, the row of `tables` of each query's sequence;
/// * `ctx_lens`: `[n]` u32, how many leading positions of its sequence each query attends to
///   (≥ 1): `pos + 1` for the token at `pos` (causal).
///
/// * `prefill` (tensor cores only): `query_chunks` work items for the tokens from `first` on (a
///   block attends up to `prefill_chunk_tokens` consecutive positions, its K/V tiles staged in
///   shared memory once for all); tokens before `first` (decode tokens) run one per block.
///
/// Returns `[n, num_heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tables: &Tensor,
    table_rows: &Tensor,
    ctx_lens: &Tensor,
    num_kv_heads: usize,
    block_size: usize,
    scale: f32,
    tensor_cores: bool,
    pipelined: bool,
    prefill: Option<Prefill<'_>>,
) -> Result<Tensor, EngineError> {
    #[cfg(feature = "cuda")]
    {
        let (_, max_blocks) = tables.dims2()?;
        let op = imp::PagedAttention {
            k_cache: k_cache.clone(),
            v_cache: v_cache.clone(),
            tables: tables.clone(),
            table_rows: table_rows.clone(),
            ctx_lens: ctx_lens.clone(),
            prefill: if tensor_cores { prefill.map(|p| (p.items.clone(), p.first)) } else { None },
            num_kv_heads,
            block_size,
            max_blocks,
            scale,
            tensor_cores,
            pipelined,
        };
        Ok(q.contiguous()?.apply_op1_no_bwd(&op)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k_cache, v_cache, tables, table_rows, ctx_lens, num_kv_heads, block_size, scale, tensor_cores, pipelined, prefill);
        Err(EngineError::Config("the paged attention kernel needs the `cuda` feature".into()))
    }
}

/// The prefill tokens of a step for the tensor-core attention: `query_chunks` items for the
/// tokens from `first` on (every token before `first` is attended alone, as decode tokens are).
#[derive(Debug, Clone, Copy)]
pub struct Prefill<'a> {
    pub items: &'a Tensor,
    pub first: usize,
}

/// Warps per block of the chunked prefill kernel (PF_WARPS in the kernel).
pub const PREFILL_WARPS: usize = 8;

/// Positions per `query_chunks` item for a model of `num_heads` query heads over `num_kv_heads`:
/// each warp of the kernel takes `16 / g` positions (its m16 tile holds their `g` heads each).
pub fn prefill_chunk_tokens(num_heads: usize, num_kv_heads: usize) -> usize {
    let g = (num_heads / num_kv_heads.max(1)).clamp(1, 16);
    PREFILL_WARPS * (16 / g)
}

/// Work items of the chunked prefill kernel for the queries from `first` on (flat order, with
/// these `table_rows` and `ctx_lens`): runs of up to `chunk` (`prefill_chunk_tokens`, at most
/// 256) consecutive positions of one sequence, each `first_token | (count - 1) << 24`. Covers
/// every query from `first` on exactly once; needs fewer than 2^24 queries.
pub fn query_chunks(table_rows: &[u32], ctx_lens: &[u32], first: usize, chunk: usize) -> Vec<u32> {
    let chunk = chunk.clamp(1, 256);
    let mut items = Vec::new();
    let mut i = first;
    while i < table_rows.len() {
        let mut count = 1;
        while count < chunk
            && i + count < table_rows.len()
            && table_rows[i + count] == table_rows[i]
            && ctx_lens[i + count] == ctx_lens[i + count - 1] + 1
        {
            count += 1;
        }
        items.push(i as u32 | ((count as u32 - 1) << 24));
        i += count;
    }
    items
}

/// The QKV epilogue of the paged path (CUDA bf16): adds `bias`, applies rotate-half RoPE at
/// `positions` (f32 `cos`/`sin` tables `[max_len, head_dim / 2]`) to the query and key heads of
/// `qkv: [n, (heads + 2 * kv_heads) * head_dim]`, writes keys and values into cache slots
/// `slots` (blocks of `block_size` slots, in the kernels' block-major layout: see
/// `paged_attention`), and returns the rotated queries `[n, heads, head_dim]`. One kernel instead of a
/// bias add, three copies, two RoPE launches and two cache writes.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv_cache(
    qkv: &ProjOut,
    bias: Option<&Tensor>,
    positions: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slots: &Tensor,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> Result<Tensor, EngineError> {
    #[cfg(feature = "cuda")]
    {
        let op = imp::RopeQkvCache {
            block_size,
            bias: bias.cloned(),
            scales: qkv.scales.clone(),
            positions: positions.clone(),
            cos: cos.clone(),
            sin: sin.clone(),
            k_cache: k_cache.clone(),
            v_cache: v_cache.clone(),
            slots: slots.clone(),
            num_heads,
            num_kv_heads,
            head_dim,
        };
        Ok(qkv.y.contiguous()?.apply_op1_no_bwd(&op)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (qkv, bias, positions, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads, head_dim, block_size);
        Err(EngineError::Config("the fused RoPE/KV-write kernel needs the `cuda` feature".into()))
    }
}

/// Residual add and RMSNorm: returns `(x + r, rms_norm(x + r) * w)`, `r` scaled first where
/// it owes FP8 scales. One kernel on CUDA bf16 (`r` and the sum each rounded to bf16 first, as
/// the separate ops do); candle ops elsewhere.
pub fn add_rms_norm(x: &Tensor, r: &ProjOut, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor), EngineError> {
    #[cfg(feature = "cuda")]
    {
        if x.dtype() == DType::BF16 && r.y.dtype() == DType::BF16 && x.device().is_cuda() && x.rank() == 2 {
            let op = imp::AddRmsNorm { w: w.contiguous()?, eps, scales: r.scales.clone() };
            let both = x.contiguous()?.apply_op2_no_bwd(&r.y.contiguous()?, &op)?;
            return Ok((both.get(0)?, both.get(1)?));
        }
    }
    // Owed scales (CUDA FP8 only) applied by the separate scaling pass.
    let sum = (x + r.clone().finish()?)?;
    let normed = candle_nn::ops::rms_norm(&sum, w, eps)?;
    Ok((sum, normed))
}

/// RMSNorm of the rows of `x` times `w`: the `add_rms_norm` kernel without a residual on CUDA
/// bf16 (candle's generic kernel took ≈ 0.2 ms on 4,096 rows), candle's op elsewhere.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor, EngineError> {
    #[cfg(feature = "cuda")]
    {
        if x.dtype() == DType::BF16 && x.device().is_cuda() && x.rank() == 2 {
            let both = x.contiguous()?.apply_op1_no_bwd(&imp::RmsNorm { w: w.contiguous()?, eps })?;
            return Ok(both.get(1)?);
        }
    }
    Ok(candle_nn::ops::rms_norm(x, w, eps)?)
}

/// `silu(gate) * up` of `x = [gate | up]: [n, 2 * inter]`, returning `[n, inter]`: one fused
/// kernel on CUDA bf16 (f32 arithmetic, one rounding), candle ops elsewhere.
pub fn silu_mul(x: &Tensor) -> Result<Tensor, EngineError> {
    let (_, two_i) = x.dims2()?;
    #[cfg(feature = "cuda")]
    {
        if x.dtype() == DType::BF16 && x.device().is_cuda() && two_i.is_multiple_of(16) {
            return Ok(x.contiguous()?.apply_op1_no_bwd(&imp::SiluMul)?);
        }
    }
    let i = two_i / 2;
    Ok((candle_nn::ops::silu(&x.narrow(1, 0, i)?)? * x.narrow(1, i, i)?)?)
}

/// Most rows `small_linear` takes (GEMV_ROWS in the kernel).
pub const SMALL_LINEAR_ROWS: usize = 8;

/// `x · w^T` for a few rows of `x: [m, k]` (m ≤ `SMALL_LINEAR_ROWS`) and `w: [n, k]`, bf16 on
/// CUDA: one warp per output column instead of a cuBLAS call, whose host cost (12–14 µs) bounded
/// decode at batch 1. With `silu_mul`, `w` is `[gate; up]` (`[2n, k]`) and the result is
/// `silu(gate) * up: [m, n]` in the same kernel. None where it does not apply (another device
/// or dtype, more rows, `k` not a multiple of 8): the caller runs the general path.
pub fn small_linear(x: &Tensor, w: &Tensor, silu_mul: bool) -> Result<Option<Tensor>, EngineError> {
    #[cfg(feature = "cuda")]
    {
        let (Ok((m, k)), Ok((n, wk))) = (x.dims2(), w.dims2()) else { return Ok(None) };
        let applies = x.device().is_cuda()
            && x.dtype() == DType::BF16
            && w.dtype() == DType::BF16
            && (1..=SMALL_LINEAR_ROWS).contains(&m)
            && k == wk
            && k.is_multiple_of(8)
            && (!silu_mul || n.is_multiple_of(2))
            && w.is_contiguous();
        if !applies {
            return Ok(None);
        }
        Ok(Some(x.contiguous()?.apply_op1_no_bwd(&imp::SmallLinear { w: w.clone(), silu_mul })?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, silu_mul);
        Ok(None)
    }
}

/// Greedy token of each row of `logits: [rows, vocab]` (bf16 on CUDA): the first index of the
/// row's largest value, as u32 `[rows]`. One block per row, one pass over the logits (candle's
/// generic `argmax` takes several times longer on vocabulary-sized rows).
pub fn argmax_rows(logits: &Tensor) -> Result<Tensor, EngineError> {
    #[cfg(feature = "cuda")]
    {
        if logits.dtype() == DType::BF16 && logits.device().is_cuda() {
            return Ok(logits.contiguous()?.apply_op1_no_bwd(&imp::ArgmaxRows)?);
        }
    }
    Ok(logits.argmax(candle_core::D::Minus1)?)
}

/// Token ids with `scheduler::PENDING` placeholders replaced by the ids the previous step
/// sampled: `ids[i] = prev[ids[i] & !PENDING]` where the top bit is set. One kernel on CUDA
/// (the previous step's ids never leave the device before this step is enqueued).
pub fn resolve_tokens(ids: &Tensor, prev: &Tensor) -> Result<Tensor, EngineError> {
    #[cfg(feature = "cuda")]
    {
        if ids.device().is_cuda() {
            return Ok(ids.contiguous()?.apply_op2_no_bwd(&prev.contiguous()?, &imp::ResolveTokens)?);
        }
    }
    let prev = prev.to_vec1::<u32>()?;
    let mut out = ids.to_vec1::<u32>()?;
    for t in &mut out {
        *t = super::scheduler::resolve_pending(*t, &prev)?;
    }
    let n = out.len();
    Ok(Tensor::from_vec(out, n, ids.device())?)
}

/// Page-locked host buffers that sampled token ids are copied into (CUDA), reused from step to
/// step (allocating page-locked memory costs more than a step's copy).
#[derive(Default)]
pub struct ReadbackPool {
    #[cfg(feature = "cuda")]
    free: std::sync::Mutex<Vec<imp::PinnedIds>>,
}

/// An asynchronous device-to-host copy of a step's sampled ids, started right after the argmax
/// and waited for only when the host needs the ids, so the GPU keeps running the work queued
/// after it (the next step). Only CUDA builds can make one.
pub struct IdsCopy {
    #[cfg(feature = "cuda")]
    inner: imp::IdsCopy,
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
}

/// Starts copying the u32 `ids` (on a CUDA device) into one of `pool`'s page-locked buffers.
pub fn copy_ids_to_host(ids: &Tensor, pool: &ReadbackPool) -> Result<IdsCopy, EngineError> {
    #[cfg(feature = "cuda")]
    {
        Ok(IdsCopy { inner: imp::IdsCopy::start(ids, &pool.free)? })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (ids, pool);
        Err(EngineError::Config("asynchronous id read-back needs the `cuda` feature".into()))
    }
}

impl IdsCopy {
    /// Waits for the copy (only it, not the work queued after it) and returns the ids; the
    /// buffer goes back to `pool`.
    pub fn wait(self, pool: &ReadbackPool) -> Result<Vec<u32>, EngineError> {
        #[cfg(feature = "cuda")]
        {
            Ok(self.inner.wait(&pool.free)?)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = pool;
            match self.never {}
        }
    }
}

/// A CUDA graph of work captured on a device's stream (`capture_graph`), replayed with
/// `launch`: one driver call instead of one per kernel. Only CUDA builds can make one.
pub struct StepGraph {
    #[cfg(feature = "cuda")]
    inner: imp::StepGraph,
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
}

/// Runs `enqueue` twice on `device`'s stream: once as usual (loading every kernel module and
/// filling candle's cache of kernel parameters), then under stream capture, and returns the
/// graph of the second run. `enqueue` must be repeatable (the first run's work is done again
/// by every launch of the graph), must not copy host data to the device, and must drop every
/// tensor it allocates before it returns (the graph then owns no memory past a launch).
pub fn capture_graph(device: &candle_core::Device, enqueue: impl FnMut() -> Result<(), EngineError>) -> Result<StepGraph, EngineError> {
    #[cfg(feature = "cuda")]
    {
        Ok(StepGraph { inner: imp::StepGraph::capture(device, enqueue)? })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (device, enqueue);
        Err(EngineError::Config("CUDA graphs need the `cuda` feature".into()))
    }
}

impl StepGraph {
    /// Enqueues one replay of the captured work on the stream it was captured on.
    pub fn launch(&self) -> Result<(), EngineError> {
        #[cfg(feature = "cuda")]
        {
            Ok(self.inner.launch()?)
        }
        #[cfg(not(feature = "cuda"))]
        {
            match self.never {}
        }
    }
}

/// The GEMM state of the second stream of a step split in two (`EngineSwitches::nano_batches`):
/// its own cuBLAS handle for the dense projections and its own FP8 GEMM state, because kernels
/// on two streams must not share a handle's workspace. The thread that runs the second half
/// passes it to every projection. On the CPU it holds nothing and candle's matmul runs.
pub struct Lane {
    #[cfg(feature = "cuda")]
    blas: Option<imp::LaneBlas>,
    /// The lane's FP8 GEMM state (models with `dtype: fp8` on CUDA).
    pub fp8: Option<std::sync::Arc<Fp8Gemm>>,
}

impl Lane {
    /// A lane for `device`; `fp8`: the model's projections are FP8 (CUDA only).
    pub fn new(device: &candle_core::Device, fp8: bool) -> Result<Self, EngineError> {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            let fp8 = if fp8 { Some(std::sync::Arc::new(Fp8Gemm::new(device)?)) } else { None };
            return Ok(Self { blas: Some(imp::LaneBlas::new(device)?), fp8 });
        }
        let _ = (device, fp8);
        Ok(Self {
            #[cfg(feature = "cuda")]
            blas: None,
            fp8: None,
        })
    }

    /// `x · w^T` for `x: [m, k]` and `w: [n, k]`: on CUDA (bf16) through this lane's cuBLAS
    /// handle, elsewhere candle's matmul (as `candle_nn::Linear` computes it).
    pub fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Tensor, EngineError> {
        #[cfg(feature = "cuda")]
        if let Some(b) = &self.blas {
            return Ok(x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &imp::LaneGemm(b.clone()))?);
        }
        Ok(x.matmul(&w.t()?)?)
    }
}

/// A point in the calling thread's CUDA stream that another thread's stream can wait for
/// (the two halves of a split step join through these). Empty on the CPU, whose work is done
/// when the call that enqueued it returns.
pub struct StreamMark {
    #[cfg(feature = "cuda")]
    event: Option<imp::CudaEvent>,
}

impl StreamMark {
    /// Marks the work enqueued so far on this thread's stream of `device`.
    pub fn record(device: &candle_core::Device) -> Result<Self, EngineError> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = device {
            let event = dev.cuda_stream().record_event(None).map_err(|e| EngineError::Config(format!("CUDA event: {e:?}")))?;
            return Ok(Self { event: Some(event) });
        }
        let _ = device;
        Ok(Self {
            #[cfg(feature = "cuda")]
            event: None,
        })
    }

    /// Makes this thread's stream of `device` wait (on the GPU, not the host) for the mark.
    pub fn wait(&self, device: &candle_core::Device) -> Result<(), EngineError> {
        #[cfg(feature = "cuda")]
        if let (candle_core::Device::Cuda(dev), Some(event)) = (device, &self.event) {
            dev.cuda_stream().wait(event).map_err(|e| EngineError::Config(format!("CUDA stream wait: {e:?}")))?;
        }
        let _ = device;
        Ok(())
    }
}

/// cuBLASLt state for FP8 projections on one CUDA device (handle, workspace, and a plan per GEMM
/// shape). Shared by every `fp8::Fp8Linear` of a model.
pub struct Fp8Gemm {
    #[cfg(feature = "cuda")]
    inner: imp::Fp8Gemm,
}

impl Fp8Gemm {
    /// For `device` (CUDA, compute capability 8.9 or newer: FP8 tensor cores).
    pub fn new(device: &candle_core::Device) -> Result<Self, EngineError> {
        #[cfg(feature = "cuda")]
        {
            Ok(Self { inner: imp::Fp8Gemm::new(device)? })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Err(EngineError::Config("the FP8 GEMM needs the `cuda` feature".into()))
        }
    }
}

/// The rows of `x` (bf16 `[rows, cols]` on CUDA) in E4M3, each scaled by its absolute maximum /
/// 448: `(q: F8E4M3 [rows, cols], scales: f32 [rows])`, `x ≈ q * scales`.
pub fn quantize_rows_e4m3(x: &Tensor) -> Result<(Tensor, Tensor), EngineError> {
    #[cfg(feature = "cuda")]
    {
        let (rows, _) = x.dims2()?;
        let scales = Tensor::zeros(rows, DType::F32, x.device())?;
        let q = x.contiguous()?.apply_op1_no_bwd(&imp::QuantRows { scales: scales.clone() })?;
        Ok((q, scales))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        Err(EngineError::Config("E4M3 quantization on the GPU needs the `cuda` feature".into()))
    }
}

/// `x · dequant(w)^T` for bf16 `x: [m, k]` and an E4M3 weight `w: [n, k]` with per-row scales
/// `w_scales: f32 [n]`: `x` is quantized per row on the fly and the product runs on FP8 tensor
/// cores, `y[i, j] = (q_x[i] · q_w[j]) * s_x[i] * s_w[j]` accumulated in f32, bf16 out.
pub fn fp8_linear(x: &Tensor, w: &Tensor, w_scales: &Tensor, gemm: &std::sync::Arc<Fp8Gemm>) -> Result<Tensor, EngineError> {
    fp8_matmul(x, w, w_scales, gemm, Epilogue::Scale)
}

/// A projection's output `y` and, where an FP8 GEMM ran with unit scales, the scales it still
/// owes: the value is `y[i, j] * rows[i] * cols[j]`, which the kernel reading `y` next applies
/// (`add_rms_norm`, `rope_qkv_cache`), rounding to bf16 as a separate scaling pass would.
#[derive(Clone)]
pub struct ProjOut {
    pub y: Tensor,
    /// `(rows: f32 [m], cols: f32 [n])`.
    pub scales: Option<(Tensor, Tensor)>,
}

impl ProjOut {
    /// An output with nothing owed.
    pub fn done(y: Tensor) -> Self {
        Self { y, scales: None }
    }

    /// `y` with the owed scales applied (a separate pass; consumers that take the scales skip it).
    pub fn finish(self) -> Result<Tensor, EngineError> {
        match self.scales {
            None => Ok(self.y),
            Some((rows, cols)) => {
                #[cfg(feature = "cuda")]
                {
                    Ok(self.y.contiguous()?.apply_op1_no_bwd(&imp::ScaleRowsCols { rows, cols })?)
                }
                #[cfg(not(feature = "cuda"))]
                {
                    let _ = (rows, cols);
                    Err(EngineError::Config("FP8 scales are owed only by the CUDA FP8 GEMM".into()))
                }
            }
        }
    }
}

/// `fp8_linear` with the scaling left to the output's consumer: the GEMM runs with unit scales
/// and the result carries the token and channel scales (one pass over `[m, n]` fewer).
pub fn fp8_linear_deferred(x: &Tensor, w: &Tensor, w_scales: &Tensor, gemm: &std::sync::Arc<Fp8Gemm>) -> Result<ProjOut, EngineError> {
    let m = x.dim(0)?;
    let x_scales = Tensor::zeros(m, DType::F32, x.device())?;
    let y = fp8_matmul(x, w, w_scales, gemm, Epilogue::Defer { x_scales: x_scales.clone() })?;
    Ok(ProjOut { y, scales: Some((x_scales, w_scales.clone())) })
}

/// What the FP8 GEMM's op does with the product.
enum Epilogue {
    /// Scaled in the GEMM (outer-vector scales) or by `scale_rows_cols_bf16` after it.
    Scale,
    /// `silu(gate) * up` of a `[gate; up]` product, the SwiGLU kernel applying the scales.
    SiluMul,
    /// Unit scales; the activations' row scales are written to `x_scales` for the consumer.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Defer { x_scales: Tensor },
}

/// `silu(gate) * up` of `fp8_linear(x, w, ..)` for a stacked `[gate; up]` weight `w: [2i, k]`:
/// `[m, i]`, the SwiGLU kernel applying the GEMM's scales where cuBLASLt ran it with unit scales
/// (one pass over the product instead of a scaling pass and a SwiGLU pass).
pub fn fp8_linear_silu_mul(x: &Tensor, w: &Tensor, w_scales: &Tensor, gemm: &std::sync::Arc<Fp8Gemm>) -> Result<Tensor, EngineError> {
    fp8_matmul(x, w, w_scales, gemm, Epilogue::SiluMul)
}

fn fp8_matmul(
    x: &Tensor,
    w: &Tensor,
    w_scales: &Tensor,
    gemm: &std::sync::Arc<Fp8Gemm>,
    epilogue: Epilogue,
) -> Result<Tensor, EngineError> {
    #[cfg(feature = "cuda")]
    {
        let op = imp::Fp8Matmul { w: w.clone(), w_scales: w_scales.clone(), gemm: gemm.clone(), epilogue };
        Ok(x.contiguous()?.apply_op1_no_bwd(&op)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, w_scales, gemm, epilogue);
        Err(EngineError::Config("the FP8 GEMM needs the `cuda` feature".into()))
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc;
    use candle_core::cuda_backend::cudarc::cublaslt as lt;
    pub(super) use candle_core::cuda_backend::cudarc::driver::CudaEvent;
    use candle_core::cuda_backend::cudarc::driver::sys::{self, CUdevice_attribute};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaGraph, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig, PinnedHostSlice,
        PushKernelArg, result,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId, WrapErr};
    use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor, bail};
    use float8::F8E4M3;
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
    /// Must match THREADS in the kernel.
    const THREADS: u32 = 128;
    /// Must match PF_THREADS in the kernel.
    const PREFILL_THREADS: u32 = super::PREFILL_WARPS as u32 * 32;

    pub(super) struct PagedAttention {
        pub k_cache: Tensor,
        pub v_cache: Tensor,
        pub tables: Tensor,
        pub table_rows: Tensor,
        pub ctx_lens: Tensor,
        /// Prefill chunk items and the first token they cover.
        pub prefill: Option<(Tensor, usize)>,
        pub num_kv_heads: usize,
        pub block_size: usize,
        pub max_blocks: usize,
        pub scale: f32,
        pub tensor_cores: bool,
        /// The head_dim-64 tensor-core kernel double-buffers its tiles
        /// (`EngineSwitches::attn_pipelined`; off by default: on an H200 it ran 4 % slower than
        /// the single-buffered kernel, which keeps twice the warps resident — docs/BENCHMARKS.md,
        /// attempt 13).
        pub pipelined: bool,
    }

    /// A cuBLAS handle of its own for `Lane` (bound to the per-thread stream handle, so it
    /// enqueues on the stream of the thread that calls it).
    #[derive(Clone)]
    pub(super) struct LaneBlas(Arc<cudarc::cublas::CudaBlas>);

    impl LaneBlas {
        pub(super) fn new(device: &candle_core::Device) -> Result<Self, super::EngineError> {
            let candle_core::Device::Cuda(dev) = device else {
                return Err(super::EngineError::Config("a CUDA lane needs a CUDA device".into()));
            };
            let blas = cudarc::cublas::CudaBlas::new(dev.cuda_stream())
                .map_err(|e| super::EngineError::Config(format!("cuBLAS handle: {e:?}")))?;
            Ok(Self(Arc::new(blas)))
        }
    }

    /// `x · w^T` (bf16 `x: [m, k]`, `w: [n, k]`) through a lane's cuBLAS handle.
    pub(super) struct LaneGemm(pub LaneBlas);

    impl CustomOp2 for LaneGemm {
        fn name(&self) -> &'static str {
            "lane-gemm"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("lane-gemm runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            use cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t};
            let (m, k) = xl.shape().dims2()?;
            let (n, kw) = wl.shape().dims2()?;
            if k != kw {
                bail!("lane-gemm: x is [{m}, {k}] but w is [{n}, {kw}]");
            }
            let dev = x.device.clone();
            let xv = view::<bf16>(x, xl, "x")?;
            let wv = view::<bf16>(w, wl, "w")?;
            // SAFETY: the GEMM writes every element (beta = 0).
            let mut y = unsafe { dev.alloc::<bf16>(m * n)? };
            let int =
                |v: usize, what: &str| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("lane-gemm: {what} {v} exceeds i32")));
            // Column-major: y^T [n, m] = w [n, k] (stored as k x n, transposed) · x^T [k, m].
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: int(n, "n")?,
                n: int(m, "m")?,
                k: int(k, "k")?,
                alpha: bf16::ONE,
                lda: int(k, "k")?,
                ldb: int(k, "k")?,
                beta: bf16::ZERO,
                ldc: int(n, "n")?,
            };
            if m > 0 && n > 0 {
                // SAFETY: the views hold m*k and n*k elements and y m*n, as the config says.
                unsafe { self.0.0.gemm(cfg, &wv, &xv, &mut y) }.map_err(|e| candle_core::Error::Msg(format!("lane-gemm: {e:?}")))?;
            }
            Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, n))))
        }
    }

    /// The engine's kernel `name` on `dev` and the device's stream: looked up in the module once
    /// per process and device, then cached (candle's `get_or_load_custom_func` asks the driver
    /// for the function at every launch, a cost that adds up at ~220 launches per decode step).
    fn kernel(dev: &CudaDevice, name: &'static str) -> candle_core::Result<(CudaFunction, Arc<CudaStream>)> {
        static CACHE: OnceLock<Mutex<HashMap<(DeviceId, &'static str), CudaFunction>>> = OnceLock::new();
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let key = (dev.id(), name);
        if let Some(f) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok((f, dev.cuda_stream()));
        }
        let f = dev.get_or_load_custom_func(name, "sluice_kernels", PTX)?.into_cuda_function();
        if let Ok(mut c) = cache.lock() {
            c.insert(key, f.clone());
        }
        Ok((f, dev.cuda_stream()))
    }

    /// The contiguous device view of a tensor's storage.
    fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> candle_core::Result<CudaView<'a, T>> {
        if !l.is_contiguous() {
            bail!("cuda op: {what} must be contiguous");
        }
        let n = l.shape().elem_count();
        let start = l.start_offset();
        Ok(s.as_cuda_slice::<T>()?.slice(start..start + n))
    }

    /// A paged cache of `slots` rows ([slots, nkv * head_dim]) must be whole blocks whose
    /// `kv_row` indices (slots * nkv) fit the kernels' u32.
    fn check_cache_rows(slots: usize, nkv: usize, block_size: usize, what: &str) -> candle_core::Result<()> {
        if block_size == 0 || !slots.is_multiple_of(block_size) {
            bail!("{what}: a cache of {slots} slots is not whole blocks of {block_size}");
        }
        if slots.checked_mul(nkv).is_none_or(|rows| rows > u32::MAX as usize) {
            bail!("{what}: {slots} slots x {nkv} KV heads exceed the kernels' u32 cache rows");
        }
        Ok(())
    }

    fn as_i32(x: usize, what: &str) -> candle_core::Result<i32> {
        i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("cuda op: {what} {x} out of range")))
    }

    fn as_u32(x: usize, what: &str) -> candle_core::Result<u32> {
        u32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("cuda op: {what} {x} out of range")))
    }

    /// The K and V caches' device views, in their element type.
    enum CacheViews<'a> {
        Bf16(CudaView<'a, bf16>, CudaView<'a, bf16>),
        E4m3(CudaView<'a, F8E4M3>, CudaView<'a, F8E4M3>),
    }

    impl<'a> CacheViews<'a> {
        fn of(ks: &'a CudaStorage, kl: &Layout, vs: &'a CudaStorage, vl: &Layout) -> candle_core::Result<Self> {
            match (ks.dtype(), vs.dtype()) {
                (candle_core::DType::BF16, candle_core::DType::BF16) => {
                    Ok(Self::Bf16(view::<bf16>(ks, kl, "k cache")?, view::<bf16>(vs, vl, "v cache")?))
                }
                (candle_core::DType::F8E4M3, candle_core::DType::F8E4M3) => {
                    Ok(Self::E4m3(view::<F8E4M3>(ks, kl, "k cache")?, view::<F8E4M3>(vs, vl, "v cache")?))
                }
                (k, v) => bail!("KV cache of {k:?} keys and {v:?} values (bf16 or F8E4M3, both alike)"),
            }
        }

        /// Pushes the K then the V cache pointer.
        fn push<'l>(&'a self, b: &mut LaunchArgs<'l>)
        where
            'a: 'l,
        {
            match self {
                Self::Bf16(k, v) => {
                    b.arg(k);
                    b.arg(v);
                }
                Self::E4m3(k, v) => {
                    b.arg(k);
                    b.arg(v);
                }
            }
        }
    }

    impl CustomOp1 for PagedAttention {
        fn name(&self) -> &'static str {
            "paged-attention"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("paged-attention runs on CUDA only")
        }

        fn cuda_fwd(&self, q: &CudaStorage, ql: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (n, nh, hd) = ql.shape().dims3()?;
            let dev = q.device.clone();
            let (ks, kl) = self.k_cache.storage_and_layout();
            let (vs, vl) = self.v_cache.storage_and_layout();
            let (ts, tl) = self.tables.storage_and_layout();
            let (rs, rl) = self.table_rows.storage_and_layout();
            let (cs, cl) = self.ctx_lens.storage_and_layout();
            let (Storage::Cuda(ks), Storage::Cuda(vs), Storage::Cuda(ts), Storage::Cuda(rs), Storage::Cuda(cs)) =
                (&*ks, &*vs, &*ts, &*rs, &*cs)
            else {
                bail!("paged-attention: cache and tables must be on the GPU");
            };
            if kl.shape().dims2()?.1 != self.num_kv_heads * hd || kl.shape() != vl.shape() {
                bail!("paged-attention: cache shape {:?} does not match {} KV heads of {hd}", kl.shape(), self.num_kv_heads);
            }
            check_cache_rows(kl.shape().dims2()?.0, self.num_kv_heads, self.block_size, "paged-attention")?;
            if rl.shape().dims1()? != n || cl.shape().dims1()? != n {
                bail!("paged-attention: table_rows/ctx_lens do not have {n} entries");
            }
            if !super::paged_attention_supported(nh, self.num_kv_heads, hd, candle_core::DType::BF16) {
                bail!("paged-attention: unsupported shape ({nh} heads, {} KV heads, head_dim {hd})", self.num_kv_heads);
            }
            let qv = view::<bf16>(q, ql, "q")?;
            let caches = CacheViews::of(ks, kl, vs, vl)?;
            let tv = view::<u32>(ts, tl, "block tables")?;
            let rv = view::<u32>(rs, rl, "table rows")?;
            let cv = view::<u32>(cs, cl, "context lengths")?;
            let item_guard = self.prefill.as_ref().map(|(p, _)| p.storage_and_layout());
            let item_view = match &item_guard {
                Some((ps, pl)) => {
                    let Storage::Cuda(ps) = &**ps else { bail!("paged-attention: prefill items must be on the GPU") };
                    Some(view::<u32>(ps, pl, "prefill items")?)
                }
                None => None,
            };
            let first = self.prefill.as_ref().map_or(n, |(_, first)| *first);
            if first > n {
                bail!("paged-attention: prefill items start at token {first} of {n}");
            }
            let fp8 = matches!(caches, CacheViews::E4m3(..));
            let entry = match (hd, self.tensor_cores, fp8) {
                (64, true, false) if self.pipelined => "paged_attention_mma_pipe_bf16_hd64",
                (64, true, false) => "paged_attention_mma_bf16_hd64",
                (128, true, false) => "paged_attention_mma_bf16_hd128",
                (64, true, true) if self.pipelined => "paged_attention_mma_pipe_e4m3_hd64",
                (64, true, true) => "paged_attention_mma_e4m3_hd64",
                (128, true, true) => "paged_attention_mma_e4m3_hd128",
                (16, _, false) => "paged_attention_bf16_hd16",
                (32, _, false) => "paged_attention_bf16_hd32",
                (64, _, false) => "paged_attention_bf16_hd64",
                (128, _, false) => "paged_attention_bf16_hd128",
                (_, _, false) => "paged_attention_bf16_hd256",
                (16, _, true) => "paged_attention_e4m3_hd16",
                (32, _, true) => "paged_attention_e4m3_hd32",
                (64, _, true) => "paged_attention_e4m3_hd64",
                (128, _, true) => "paged_attention_e4m3_hd128",
                (_, _, true) => "paged_attention_e4m3_hd256",
            };
            // SAFETY: every element is written by the kernels before it is read (the items
            // cover every token from `first` on).
            let out = unsafe { dev.alloc::<bf16>(n * nh * hd)? };
            if n == 0 {
                return Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, nh, hd))));
            }
            let (nh_, nkv_) = (as_i32(nh, "heads")?, as_i32(self.num_kv_heads, "kv heads")?);
            let (bs_, mb_) = (as_i32(self.block_size, "block_size")?, as_i32(self.max_blocks, "max_blocks")?);
            let nkv_u = as_u32(self.num_kv_heads, "kv heads")?;
            // Tokens before `first` (all of them without prefill items): one block each.
            let mut launches = Vec::with_capacity(2);
            if first > 0 {
                launches.push((entry, first, None));
            }
            if let Some(items) = &item_view {
                let name = match (hd, fp8) {
                    (64, false) => "prefill_attention_mma_bf16_hd64",
                    (_, false) => "prefill_attention_mma_bf16_hd128",
                    (64, true) => "prefill_attention_mma_e4m3_hd64",
                    (_, true) => "prefill_attention_mma_e4m3_hd128",
                };
                if !items.is_empty() {
                    launches.push((name, items.len(), Some(items)));
                }
            }
            for (name, blocks, items) in launches {
                let (func, stream) = kernel(&dev, name)?;
                let threads = if items.is_some() { PREFILL_THREADS } else { THREADS };
                let cfg =
                    LaunchConfig { grid_dim: (as_u32(blocks, "query blocks")?, nkv_u, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
                let mut builder = stream.launch_builder(&func);
                builder.arg(&qv);
                caches.push(&mut builder);
                builder.arg(&tv);
                builder.arg(&rv);
                builder.arg(&cv);
                if let Some(p) = items {
                    builder.arg(p);
                }
                builder.arg(&out);
                builder.arg(&nh_);
                builder.arg(&nkv_);
                builder.arg(&bs_);
                builder.arg(&mb_);
                builder.arg(&self.scale);
                // SAFETY: argument types and order match the kernels (the prefill kernel takes
                // the items pointer after ctx_lens); the shapes were checked above; each query
                // reads `ctx_lens[s]` keys through its own table row, which the engine sized to
                // cover them; `query_chunks` groups only consecutive positions of one sequence,
                // from `first` on, so the two launches write disjoint rows.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, nh, hd))))
        }
    }

    pub(super) struct RopeQkvCache {
        pub bias: Option<Tensor>,
        /// The FP8 scales `qkv` owes (rows [n], cols [width]).
        pub scales: Option<(Tensor, Tensor)>,
        pub positions: Tensor,
        pub cos: Tensor,
        pub sin: Tensor,
        pub k_cache: Tensor,
        pub v_cache: Tensor,
        pub slots: Tensor,
        pub num_heads: usize,
        pub num_kv_heads: usize,
        pub head_dim: usize,
        pub block_size: usize,
    }

    impl CustomOp1 for RopeQkvCache {
        fn name(&self) -> &'static str {
            "rope-qkv-cache"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("rope-qkv-cache runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
            let (n, width) = xl.shape().dims2()?;
            if width != (nh + 2 * nkv) * hd || !hd.is_multiple_of(4) {
                bail!("rope-qkv-cache: qkv width {width} is not ({nh} + 2 * {nkv}) * {hd} with head_dim a multiple of 4");
            }
            let dev = x.device.clone();
            let (ps, pl) = self.positions.storage_and_layout();
            let (cs, cl) = self.cos.storage_and_layout();
            let (ss, sl) = self.sin.storage_and_layout();
            let (ks, kl) = self.k_cache.storage_and_layout();
            let (vs, vl) = self.v_cache.storage_and_layout();
            let (ts, tl) = self.slots.storage_and_layout();
            let (Storage::Cuda(ps), Storage::Cuda(cs), Storage::Cuda(ss), Storage::Cuda(ks), Storage::Cuda(vs), Storage::Cuda(ts)) =
                (&*ps, &*cs, &*ss, &*ks, &*vs, &*ts)
            else {
                bail!("rope-qkv-cache: inputs must be on the GPU");
            };
            if pl.shape().dims1()? != n || tl.shape().dims1()? != n {
                bail!("rope-qkv-cache: positions/slots do not have {n} entries");
            }
            if cl.shape().dims2()?.1 != hd / 2 || cl.shape() != sl.shape() {
                bail!("rope-qkv-cache: RoPE tables {:?} do not have {} columns", cl.shape(), hd / 2);
            }
            if kl.shape().dims2()?.1 != nkv * hd || kl.shape() != vl.shape() {
                bail!("rope-qkv-cache: cache shape {:?} does not match {nkv} KV heads of {hd}", kl.shape());
            }
            check_cache_rows(kl.shape().dims2()?.0, nkv, self.block_size, "rope-qkv-cache")?;
            let xv = view::<bf16>(x, xl, "qkv")?;
            let pv = view::<u32>(ps, pl, "positions")?;
            let cv = view::<f32>(cs, cl, "cos")?;
            let sv = view::<f32>(ss, sl, "sin")?;
            let caches = CacheViews::of(ks, kl, vs, vl)?;
            let tv = view::<u32>(ts, tl, "slots")?;
            let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
            let bias_view = match &bias_guard {
                Some((bs, bl)) => {
                    let Storage::Cuda(bs) = &**bs else { bail!("rope-qkv-cache: bias must be on the GPU") };
                    if bl.shape().dims1()? != width {
                        bail!("rope-qkv-cache: bias {:?} does not match width {width}", bl.shape());
                    }
                    Some(view::<bf16>(bs, bl, "bias")?)
                }
                None => None,
            };
            let held_scales = hold_scales(&self.scales);
            let scale_views = scale_views(&held_scales, n, width, "rope-qkv-cache")?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<bf16>(n * nh * hd)? };
            let total = n * (nh + 2 * nkv) * (hd / 4);
            as_u32(total, "RoPE work items")?;
            if total == 0 {
                return Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, nh, hd))));
            }
            let name = match caches {
                CacheViews::Bf16(..) => "rope_qkv_cache_bf16",
                CacheViews::E4m3(..) => "rope_qkv_cache_e4m3",
            };
            let (func, stream) = kernel(&dev, name)?;
            let blocks = as_u32(total.div_ceil(256).min(1 << 16), "blocks")?;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let (n_, nh_, nkv_, hd_) = (as_i32(n, "tokens")?, as_i32(nh, "heads")?, as_i32(nkv, "kv heads")?, as_i32(hd, "head_dim")?);
            let null: u64 = 0;
            let mut builder = stream.launch_builder(&func);
            builder.arg(&xv);
            match &bias_view {
                Some(b) => builder.arg(b),
                None => builder.arg(&null),
            };
            push_scales(&mut builder, scale_views.as_ref(), &null);
            builder.arg(&pv);
            builder.arg(&cv);
            builder.arg(&sv);
            builder.arg(&out);
            caches.push(&mut builder);
            builder.arg(&tv);
            builder.arg(&n_);
            builder.arg(&nh_);
            builder.arg(&nkv_);
            builder.arg(&hd_);
            let bs_ = as_i32(self.block_size, "block size")?;
            builder.arg(&bs_);
            // SAFETY: argument types and order match `rope_qkv_cache_{bf16,e4m3}` (a null bias or
            // scale pointer is a u64 0); shapes checked above. The kernel writes the cache rows `slots` through
            // the caches' device pointers: the engine owns the caches, runs everything on one
            // stream, and the slots are its own allocator's.
            unsafe { builder.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, nh, hd))))
        }
    }

    pub(super) struct AddRmsNorm {
        pub w: Tensor,
        pub eps: f32,
        /// The FP8 scales the residual owes (rows [n], cols [h]).
        pub scales: Option<(Tensor, Tensor)>,
    }

    /// A tensor's storage, held while views into it are in use, and its layout.
    type Held<'a> = (candle_core::StorageRef<'a>, &'a Layout);

    /// The storages of an FP8 output's owed scales (rows, cols), held for `scale_views`.
    fn hold_scales(scales: &Option<(Tensor, Tensor)>) -> Option<(Held<'_>, Held<'_>)> {
        scales.as_ref().map(|(r, c)| (r.storage_and_layout(), c.storage_and_layout()))
    }

    /// The views of an FP8 output's owed scales (`hold_scales`), checked against its
    /// `[n, width]` shape; None when nothing is owed.
    fn scale_views<'a>(
        held: &'a Option<(Held<'_>, Held<'_>)>,
        n: usize,
        width: usize,
        what: &str,
    ) -> candle_core::Result<Option<(CudaView<'a, f32>, CudaView<'a, f32>)>> {
        let Some(((rs, rl), (cs, cl))) = held else { return Ok(None) };
        let (Storage::Cuda(rs), Storage::Cuda(cs)) = (&**rs, &**cs) else { bail!("{what}: FP8 scales must be on the GPU") };
        if rl.shape().dims1()? != n || cl.shape().dims1()? != width {
            bail!("{what}: FP8 scales {:?} x {:?} do not match [{n}, {width}]", rl.shape(), cl.shape());
        }
        Ok(Some((view::<f32>(rs, rl, "row scales")?, view::<f32>(cs, cl, "column scales")?)))
    }

    /// The kernels' `rs, cs` arguments: the owed scales, or two null pointers.
    fn push_scales<'a>(builder: &mut LaunchArgs<'a>, scales: Option<&'a (CudaView<'a, f32>, CudaView<'a, f32>)>, null: &'a u64) {
        match scales {
            Some((r, c)) => {
                builder.arg(r);
                builder.arg(c);
            }
            None => {
                builder.arg(null);
                builder.arg(null);
            }
        }
    }

    /// Must match NORM_THREADS in the kernel.
    const NORM_THREADS: u32 = 128;

    impl CustomOp2 for AddRmsNorm {
        fn name(&self) -> &'static str {
            "add-rms-norm"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("add-rms-norm runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, r: &CudaStorage, rl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            if rl.shape() != xl.shape() {
                bail!("add-rms-norm: residual {:?} does not match {:?}", rl.shape(), xl.shape());
            }
            let rv = view::<bf16>(r, rl, "residual")?;
            let (n, h) = xl.shape().dims2()?;
            let held = hold_scales(&self.scales);
            let scales = scale_views(&held, n, h, "add-rms-norm")?;
            launch_add_rms_norm(x, xl, Some((&rv, scales.as_ref())), &self.w, self.eps)
        }
    }

    pub(super) struct RmsNorm {
        pub w: Tensor,
        pub eps: f32,
    }

    impl CustomOp1 for RmsNorm {
        fn name(&self) -> &'static str {
            "rms-norm"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("rms-norm runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            launch_add_rms_norm(x, xl, None, &self.w, self.eps)
        }
    }

    /// The residual of `add_rms_norm_bf16` and the FP8 scales it owes.
    type Residual<'a> = (&'a CudaView<'a, bf16>, Option<&'a (CudaView<'a, f32>, CudaView<'a, f32>)>);

    /// `add_rms_norm_bf16` over `x` (+ `r` when given); returns `[2, n, h]` (sum, normed).
    fn launch_add_rms_norm(
        x: &CudaStorage,
        xl: &Layout,
        rv: Option<Residual<'_>>,
        w: &Tensor,
        eps: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, h) = xl.shape().dims2()?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else { bail!("add-rms-norm: weight must be on the GPU") };
        if wl.shape().dims1()? != h {
            bail!("add-rms-norm: weight {:?} does not match hidden size {h}", wl.shape());
        }
        let dev = x.device.clone();
        let xv = view::<bf16>(x, xl, "x")?;
        let wv = view::<bf16>(ws, wl, "weight")?;
        // SAFETY: the kernel writes both halves of every row.
        let out = unsafe { dev.alloc::<bf16>(2 * n * h)? };
        if n == 0 || h == 0 {
            return Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((2, n, h))));
        }
        let (func, stream) = kernel(&dev, "add_rms_norm_bf16")?;
        let cfg = LaunchConfig { grid_dim: (as_u32(n, "rows")?, 1, 1), block_dim: (NORM_THREADS, 1, 1), shared_mem_bytes: 0 };
        let (n_, h_) = (as_i32(n, "rows")?, as_i32(h, "hidden size")?);
        let null: u64 = 0;
        let mut builder = stream.launch_builder(&func);
        builder.arg(&xv);
        match rv {
            Some((r, scales)) => {
                builder.arg(r);
                push_scales(&mut builder, scales, &null);
            }
            None => {
                builder.arg(&null);
                push_scales(&mut builder, None, &null);
            }
        };
        builder.arg(&wv);
        builder.arg(&out);
        builder.arg(&n_);
        builder.arg(&h_);
        builder.arg(&eps);
        // SAFETY: argument types and order match `add_rms_norm_bf16` (a null residual or scale
        // pointer is a u64 0, which the kernel reads as none); one block per row of contiguous
        // [n, h] inputs, [2, n, h] output, scales of n and h f32 (checked by `scale_views`).
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((2, n, h))))
    }

    pub(super) struct SmallLinear {
        pub w: Tensor,
        pub silu_mul: bool,
    }

    /// Must match GEMV_WARPS in the kernel (warps per block).
    const GEMV_WARPS: u32 = 8;

    impl CustomOp1 for SmallLinear {
        fn name(&self) -> &'static str {
            "small-linear"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("small-linear runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (m, k) = xl.shape().dims2()?;
            let (ws, wl) = self.w.storage_and_layout();
            let Storage::Cuda(ws) = &*ws else { bail!("small-linear: weight must be on the GPU") };
            let (rows, wk) = wl.shape().dims2()?;
            let n = if self.silu_mul { rows / 2 } else { rows };
            if wk != k
                || m > super::SMALL_LINEAR_ROWS
                || !k.is_multiple_of(8)
                || !xl.start_offset().is_multiple_of(8)
                || !wl.start_offset().is_multiple_of(8)
            {
                bail!("small-linear: x {:?} and weight {:?} do not fit the kernel", xl.shape(), wl.shape());
            }
            let dev = x.device.clone();
            let xv = view::<bf16>(x, xl, "x")?;
            let wv = view::<bf16>(ws, wl, "weight")?;
            // SAFETY: the kernel writes every element of [m, n].
            let out = unsafe { dev.alloc::<bf16>(m * n)? };
            if m == 0 || n == 0 {
                return Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((m, n))));
            }
            let name = if self.silu_mul { "gemv_silu_mul_bf16" } else { "gemv_bf16" };
            let (func, stream) = kernel(&dev, name)?;
            // Threads per output column: about three 16-byte chunks of the row each, a warp to
            // the whole block (a power of two, so columns tile the block).
            let tpc = (k / 8).div_ceil(3).next_power_of_two().clamp(32, GEMV_WARPS as usize * 32);
            let cols = GEMV_WARPS as usize * 32 / tpc;
            let blocks = as_u32(n.div_ceil(cols), "output columns")?;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (GEMV_WARPS * 32, 1, 1), shared_mem_bytes: 0 };
            let (m_, n_, k_, tpc_) = (as_i32(m, "rows")?, as_i32(n, "columns")?, as_i32(k, "inner size")?, as_i32(tpc, "threads")?);
            let mut builder = stream.launch_builder(&func);
            builder.arg(&xv);
            builder.arg(&wv);
            builder.arg(&out);
            builder.arg(&m_);
            builder.arg(&n_);
            builder.arg(&k_);
            builder.arg(&tpc_);
            // SAFETY: argument types and order match `gemv_bf16` / `gemv_silu_mul_bf16`;
            // contiguous x [m, k] and w [n or 2n, k] with 16-byte aligned rows (k % 8 == 0 and
            // aligned start offsets, checked above), m <= GEMV_ROWS; out [m, n].
            unsafe { builder.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((m, n))))
        }
    }

    pub(super) struct SiluMul;

    impl CustomOp1 for SiluMul {
        fn name(&self) -> &'static str {
            "silu-mul"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("silu-mul runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (n, two_i) = xl.shape().dims2()?;
            if !two_i.is_multiple_of(16) {
                bail!("silu-mul: width {two_i} is not a multiple of 16");
            }
            let inter = two_i / 2;
            let dev = x.device.clone();
            let xv = view::<bf16>(x, xl, "gate_up")?;
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<bf16>(n * inter)? };
            let total = n * inter / 8;
            if total == 0 {
                return Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, inter))));
            }
            launch_silu_mul(&dev, &xv, None, &out, n, inter)?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, inter))))
        }
    }

    /// `silu_mul_bf16` over `x: [n, 2 * inter]` into `out: [n, inter]`; `scales` (per row, per
    /// column) when `x` is an FP8 GEMM's unscaled output.
    fn launch_silu_mul(
        dev: &CudaDevice,
        x: &CudaView<'_, bf16>,
        scales: Option<(&CudaView<'_, f32>, &CudaView<'_, f32>)>,
        out: &CudaSlice<bf16>,
        n: usize,
        inter: usize,
    ) -> candle_core::Result<()> {
        let total = n * inter / 8;
        if total == 0 {
            return Ok(());
        }
        let (func, stream) = kernel(dev, "silu_mul_bf16")?;
        let blocks = as_u32(total.div_ceil(256).min(1 << 16), "blocks")?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (n_, i_) = (as_i32(n, "rows")?, as_i32(inter, "intermediate size")?);
        let null = 0u64;
        let mut builder = stream.launch_builder(&func);
        builder.arg(x);
        match scales {
            Some((rs, cs)) => {
                builder.arg(rs);
                builder.arg(cs);
            }
            None => {
                builder.arg(&null);
                builder.arg(&null);
            }
        }
        builder.arg(out);
        builder.arg(&n_);
        builder.arg(&i_);
        // SAFETY: argument types and order match `silu_mul_bf16` (null scale pointers as 0);
        // contiguous [n, 2 * inter] input with inter % 8 == 0, [n, inter] output, scales of n
        // and 2 * inter f32, all on this stream.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }

    pub(super) struct ArgmaxRows;

    /// Must match ARGMAX_THREADS in the kernel.
    const ARGMAX_THREADS: u32 = 512;

    impl CustomOp1 for ArgmaxRows {
        fn name(&self) -> &'static str {
            "argmax-rows"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("argmax-rows runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (rows, cols) = xl.shape().dims2()?;
            let dev = x.device.clone();
            let xv = view::<bf16>(x, xl, "logits")?;
            // SAFETY: the kernel writes every row's entry.
            let out = unsafe { dev.alloc::<u32>(rows)? };
            if rows == 0 || cols == 0 {
                bail!("argmax-rows: empty logits {:?}", xl.shape());
            }
            let (func, stream) = kernel(&dev, "argmax_rows_bf16")?;
            let cfg = LaunchConfig { grid_dim: (as_u32(rows, "rows")?, 1, 1), block_dim: (ARGMAX_THREADS, 1, 1), shared_mem_bytes: 0 };
            let cols_ = as_i32(cols, "vocabulary")?;
            let mut builder = stream.launch_builder(&func);
            builder.arg(&xv);
            builder.arg(&out);
            builder.arg(&cols_);
            // SAFETY: argument types and order match `argmax_rows_bf16`; one block per row of a
            // contiguous [rows, cols] view.
            unsafe { builder.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(rows)))
        }
    }

    pub(super) struct ResolveTokens;

    impl CustomOp2 for ResolveTokens {
        fn name(&self) -> &'static str {
            "resolve-tokens"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("resolve-tokens runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, p: &CudaStorage, pl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let n = xl.shape().dims1()?;
            let rows = pl.shape().dims1()?;
            let dev = x.device.clone();
            let xv = view::<u32>(x, xl, "token ids")?;
            let pv = view::<u32>(p, pl, "previous ids")?;
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<u32>(n)? };
            if n == 0 {
                return Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)));
            }
            let (func, stream) = kernel(&dev, "resolve_tokens_u32")?;
            let cfg = LaunchConfig { grid_dim: (as_u32(n.div_ceil(256), "blocks")?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let (n_, rows_) = (as_i32(n, "tokens")?, as_i32(rows, "previous rows")?);
            let mut builder = stream.launch_builder(&func);
            builder.arg(&xv);
            builder.arg(&pv);
            builder.arg(&out);
            builder.arg(&n_);
            builder.arg(&rows_);
            // SAFETY: argument types and order match `resolve_tokens_u32`; the kernel reads
            // `prev` only below `prev_rows`.
            unsafe { builder.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)))
        }
    }

    /// A page-locked buffer and the event recorded after the last copy into it.
    pub(super) struct PinnedIds {
        buf: PinnedHostSlice<u32>,
        done: CudaEvent,
    }

    /// A copy in flight into a page-locked buffer; `len` ids.
    pub(super) struct IdsCopy {
        entry: PinnedIds,
        len: usize,
    }

    impl IdsCopy {
        pub(super) fn start(ids: &Tensor, free: &std::sync::Mutex<Vec<PinnedIds>>) -> candle_core::Result<Self> {
            let (s, l) = ids.storage_and_layout();
            let Storage::Cuda(cs) = &*s else { bail!("id read-back: ids must be on the GPU") };
            let v = view::<u32>(cs, l, "ids")?;
            let len = v.len();
            let stream = cs.device.cuda_stream();
            let reused = free.lock().ok().and_then(|mut f| f.iter().position(|e| e.buf.len() >= len).map(|i| f.swap_remove(i)));
            let mut entry = match reused {
                Some(e) => e,
                None => PinnedIds {
                    // SAFETY: only the first `len` ids are read, after the copy into them completed.
                    buf: unsafe { stream.context().alloc_pinned_with_flags::<u32>(len.max(4096), 0) }.w()?,
                    done: stream.context().new_event(None).w()?,
                },
            };
            // cudarc's `memcpy_dtoh` copies the whole destination; copy only `len` ids.
            let Some(dst) = entry.buf.as_mut_slice().w()?.get_mut(..len) else {
                bail!("id read-back: buffer shorter than {len} ids");
            };
            let (src, _read) = v.device_ptr(&stream);
            // SAFETY: `src` is `len` u32 of device memory kept alive by `ids` (the caller keeps
            // it until the copy is waited for), `dst` is `len` u32 of page-locked memory owned by
            // `entry`, which is only read after `done` (recorded after the copy) completed.
            unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }.w()?;
            entry.done.record(&stream).w()?;
            Ok(Self { entry, len })
        }

        pub(super) fn wait(self, free: &std::sync::Mutex<Vec<PinnedIds>>) -> candle_core::Result<Vec<u32>> {
            self.entry.done.synchronize().w()?;
            let ids = self.entry.buf.as_slice().w()?.get(..self.len).map(<[u32]>::to_vec);
            if let Ok(mut f) = free.lock() {
                f.push(self.entry);
            }
            ids.ok_or_else(|| candle_core::Error::Msg("id read-back: buffer shorter than the copy".into()))
        }
    }

    /// A captured, instantiated graph.
    pub(super) struct StepGraph {
        graph: CudaGraph,
    }

    // SAFETY: a CUDA graph may be launched from any thread as long as calls on it are
    // serialized; the engine keeps its graphs behind a mutex and launches them from one thread
    // at a time.
    unsafe impl Send for StepGraph {}

    impl StepGraph {
        pub(super) fn capture(
            device: &candle_core::Device,
            mut enqueue: impl FnMut() -> Result<(), super::EngineError>,
        ) -> candle_core::Result<Self> {
            let candle_core::Device::Cuda(dev) = device else { bail!("CUDA graph capture needs a CUDA device") };
            let to_candle = |e: super::EngineError| candle_core::Error::Msg(e.to_string());
            // Parameter vectors (shapes, strides) candle uploads for its kernels come from a cache
            // while this guard lives: the first run fills it, the captured run reads it.
            let _params = dev.enable_cuda_graph_htod_cache();
            enqueue().map_err(to_candle)?;
            let stream = dev.cuda_stream();
            // Thread-local mode: a call from this thread that the capture cannot record (a
            // synchronous allocation or copy) fails the capture instead of running unordered.
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
            let captured = enqueue();
            // Always end the capture, so that a failure leaves the stream usable.
            let ended = stream.end_capture(sys::CUgraphInstantiate_flags_enum(0));
            captured.map_err(|e| candle_core::Error::Msg(format!("CUDA graph capture: {e}")))?;
            let Some(graph) = ended.w()? else { bail!("CUDA graph capture recorded no work") };
            graph.upload().w()?;
            Ok(Self { graph })
        }

        pub(super) fn launch(&self) -> candle_core::Result<()> {
            self.graph.launch().w()
        }
    }

    /// Must match QUANT_THREADS in the kernel.
    const QUANT_THREADS: u32 = 256;

    /// Quantizes the rows of x into E4M3 and writes their scales into `scales` (f32 [rows]).
    pub(super) struct QuantRows {
        pub scales: Tensor,
    }

    /// Launches `quant_rows_e4m3` over `x` ([rows, cols] bf16) into `q` and `scales`.
    fn launch_quant(
        dev: &candle_core::cuda_backend::CudaDevice,
        x: &CudaView<'_, bf16>,
        q: &mut CudaSlice<F8E4M3>,
        scales: &CudaView<'_, f32>,
        rows: usize,
        cols: usize,
    ) -> candle_core::Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let (func, stream) = kernel(dev, "quant_rows_e4m3")?;
        let cfg = LaunchConfig { grid_dim: (as_u32(rows, "rows")?, 1, 1), block_dim: (QUANT_THREADS, 1, 1), shared_mem_bytes: 0 };
        let cols_ = as_i32(cols, "columns")?;
        let mut builder = stream.launch_builder(&func);
        builder.arg(x);
        builder.arg(q);
        builder.arg(scales);
        builder.arg(&cols_);
        // SAFETY: argument types and order match `quant_rows_e4m3` (E4M3 values are one byte);
        // x is rows * cols contiguous bf16, q rows * cols bytes, scales rows f32.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }

    impl CustomOp1 for QuantRows {
        fn name(&self) -> &'static str {
            "quant-rows-e4m3"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("quant-rows-e4m3 runs on CUDA only (engine/fp8.rs emulates it on the CPU)")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (rows, cols) = xl.shape().dims2()?;
            let dev = x.device.clone();
            let xv = view::<bf16>(x, xl, "x")?;
            let (ss, sl) = self.scales.storage_and_layout();
            let Storage::Cuda(ss) = &*ss else { bail!("quant-rows-e4m3: scales must be on the GPU") };
            if sl.shape().dims1()? != rows {
                bail!("quant-rows-e4m3: {} scales for {rows} rows", sl.shape().elem_count());
            }
            let sv = view::<f32>(ss, sl, "scales")?;
            // SAFETY: the kernel writes every element.
            let mut q = unsafe { dev.alloc::<F8E4M3>(rows * cols)? };
            launch_quant(&dev, &xv, &mut q, &sv, rows, cols)?;
            Ok((CudaStorage::wrap_cuda_slice(q, dev), Shape::from((rows, cols))))
        }
    }

    /// One cuBLASLt matmul description for a GEMM shape `(m, n, k)`, with its chosen algorithm.
    struct Plan {
        desc: lt::sys::cublasLtMatmulDesc_t,
        a: lt::sys::cublasLtMatrixLayout_t,
        b: lt::sys::cublasLtMatrixLayout_t,
        d: lt::sys::cublasLtMatrixLayout_t,
        algo: lt::sys::cublasLtMatmulAlgo_t,
        /// The GEMM applies the per-channel and per-token scales (outer-vector scaling); else it
        /// runs with unit scales and `scale_rows_cols_bf16` applies them after.
        outer: bool,
    }

    pub(super) struct Fp8Gemm {
        handle: lt::sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
        /// Keyed by `(m, n, k, unit)`: `unit` plans leave the scaling to the caller.
        plans: Mutex<HashMap<(usize, usize, usize, bool), Plan>>,
        /// Set once cuBLASLt has refused outer-vector scaling (not tried again).
        outer_refused: std::sync::atomic::AtomicBool,
    }

    // SAFETY: the handle and descriptors are plain cuBLASLt objects with no thread affinity; every
    // use goes through `plans`' lock (the descriptors' scale pointers are set under it).
    unsafe impl Send for Fp8Gemm {}
    // SAFETY: as for Send: all mutation happens under the mutex.
    unsafe impl Sync for Fp8Gemm {}

    /// Workspace for cuBLASLt's FP8 kernels (NVIDIA's recommendation for Hopper).
    const WORKSPACE_BYTES: usize = 32 << 20;

    fn lt_err(what: &str, e: lt::result::CublasError) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
    }

    fn set_desc<T>(desc: lt::sys::cublasLtMatmulDesc_t, attr: lt::sys::cublasLtMatmulDescAttributes_t, v: &T) -> candle_core::Result<()> {
        // SAFETY: `desc` is live; `v` points to a value of the size the attribute takes.
        unsafe { lt::result::set_matmul_desc_attribute(desc, attr, (v as *const T).cast(), std::mem::size_of::<T>()) }
            .map_err(|e| lt_err("set matmul attribute", e))
    }

    impl Fp8Gemm {
        pub(super) fn new(device: &candle_core::Device) -> Result<Self, super::EngineError> {
            use super::EngineError;
            let candle_core::Device::Cuda(dev) = device else {
                return Err(EngineError::Config("dtype fp8 needs a CUDA device".into()));
            };
            let stream = dev.cuda_stream();
            let cap = |a| stream.context().attribute(a).map_err(|e| EngineError::Config(format!("CUDA device attribute: {e:?}")));
            let major = cap(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = cap(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            if (major, minor) < (8, 9) {
                return Err(EngineError::Config(format!(
                    "dtype fp8 needs FP8 tensor cores (compute capability 8.9 or newer: L4, L40S, H100, H200); this GPU has {major}.{minor}: use bf16"
                )));
            }
            let handle = lt::result::create_handle().map_err(|e| EngineError::Config(format!("cuBLASLt handle: {e:?}")))?;
            let workspace = dev.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
            Ok(Self { handle, workspace, plans: Mutex::new(HashMap::new()), outer_refused: std::sync::atomic::AtomicBool::new(false) })
        }

        /// The plan for `(m, n, k)`: outer-vector scaling with these scale vectors (device
        /// addresses, set before the heuristic runs), or, where cuBLASLt refuses that mode (as
        /// cuBLAS 13.0 did on an H100), unit scales and a separate scaling kernel.
        fn plan(&self, m: usize, n: usize, k: usize, w_scales: u64, x_scales: u64) -> candle_core::Result<Plan> {
            use std::sync::atomic::Ordering;
            if !self.outer_refused.load(Ordering::Relaxed) {
                match self.plan_with(m, n, k, Some((w_scales, x_scales))) {
                    Ok(p) => return Ok(p),
                    Err(e) => {
                        tracing::warn!(error = %e, "cuBLASLt refused outer-vector FP8 scaling; scaling the GEMM's output in a separate kernel");
                        self.outer_refused.store(true, Ordering::Relaxed);
                    }
                }
            }
            self.plan_with(m, n, k, None)
        }

        fn plan_with(&self, m: usize, n: usize, k: usize, outer: Option<(u64, u64)>) -> candle_core::Result<Plan> {
            use lt::sys::cublasLtMatmulDescAttributes_t as A;
            let desc = lt::result::create_matmul_desc(lt::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, lt::sys::cudaDataType::CUDA_R_32F)
                .map_err(|e| lt_err("matmul description", e))?;
            // Column-major view: D[n, m] = op(A)[n, k] · B[k, m] with A = the [n, k] row-major
            // weight transposed (TN, the layout FP8 needs) and B = the [m, k] row-major activations.
            set_desc(
                desc,
                A::CUBLASLT_MATMUL_DESC_TRANSA,
                &(candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32),
            )?;
            set_desc(
                desc,
                A::CUBLASLT_MATMUL_DESC_TRANSB,
                &(candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N as i32),
            )?;
            if let Some((w_scales, x_scales)) = outer {
                let mode = lt::sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as i32;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scales)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scales)?;
            }
            let layout = |t, rows: usize, cols: usize, ld: usize| {
                lt::result::create_matrix_layout(t, rows as u64, cols as u64, ld as i64).map_err(|e| lt_err("matrix layout", e))
            };
            let a = layout(lt::sys::cudaDataType::CUDA_R_8F_E4M3, k, n, k)?;
            let b = layout(lt::sys::cudaDataType::CUDA_R_8F_E4M3, k, m, k)?;
            let d = layout(lt::sys::cudaDataType::CUDA_R_16BF, n, m, n)?;
            let pref = lt::result::create_matmul_pref().map_err(|e| lt_err("matmul preference", e))?;
            let ws = WORKSPACE_BYTES as u64;
            // SAFETY: `pref` is live; the attribute takes a u64.
            unsafe {
                lt::result::set_matmul_pref_attribute(
                    pref,
                    lt::sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&ws as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(|e| lt_err("workspace preference", e))?;
            // SAFETY: every object is live; the preference is destroyed once the heuristic ran.
            let found = unsafe { lt::result::get_matmul_algo_heuristic(self.handle, desc, a, b, d, d, pref) };
            // SAFETY: `pref` is live and not used again.
            unsafe {
                let _ = lt::result::destroy_matmul_pref(pref);
            }
            let algo = match found {
                Ok(h) => h.algo,
                Err(e) => {
                    // SAFETY: the objects were created above and are not used again.
                    unsafe {
                        let _ = lt::result::destroy_matrix_layout(a);
                        let _ = lt::result::destroy_matrix_layout(b);
                        let _ = lt::result::destroy_matrix_layout(d);
                        let _ = lt::result::destroy_matmul_desc(desc);
                    }
                    let mode = if outer.is_some() { "outer-vector scales" } else { "unit scales" };
                    return Err(lt_err(&format!("no FP8 GEMM algorithm for m={m} n={n} k={k} with {mode}"), e));
                }
            };
            Ok(Plan { desc, a, b, d, algo, outer: outer.is_some() })
        }
    }

    impl Drop for Fp8Gemm {
        fn drop(&mut self) {
            let plans = self.plans.get_mut().map(std::mem::take).unwrap_or_default();
            // SAFETY: the objects were created by this value and are not used after this.
            unsafe {
                for p in plans.into_values() {
                    let _ = lt::result::destroy_matrix_layout(p.a);
                    let _ = lt::result::destroy_matrix_layout(p.b);
                    let _ = lt::result::destroy_matrix_layout(p.d);
                    let _ = lt::result::destroy_matmul_desc(p.desc);
                }
                let _ = lt::result::destroy_handle(self.handle);
            }
        }
    }

    pub(super) struct Fp8Matmul {
        pub w: Tensor,
        pub w_scales: Tensor,
        pub gemm: std::sync::Arc<super::Fp8Gemm>,
        pub epilogue: super::Epilogue,
    }

    /// `scale_rows_cols_bf16` over a `[rows, cols]` bf16 tensor into a new one: what
    /// `ProjOut::finish` runs when no consumer took the owed scales.
    pub(super) struct ScaleRowsCols {
        pub rows: Tensor,
        pub cols: Tensor,
    }

    impl CustomOp1 for ScaleRowsCols {
        fn name(&self) -> &'static str {
            "scale-rows-cols"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("scale-rows-cols runs on CUDA only (FP8 scales are owed only by the CUDA GEMM)")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (m, n) = xl.shape().dims2()?;
            if !n.is_multiple_of(2) {
                bail!("scale-rows-cols: y {:?} must have an even width", xl.shape());
            }
            let held = Some((self.rows.storage_and_layout(), self.cols.storage_and_layout()));
            let Some((rv, cv)) = scale_views(&held, m, n, "scale-rows-cols")? else { bail!("scale-rows-cols: no scales") };
            let dev = x.device.clone();
            let xv = view::<bf16>(x, xl, "y")?;
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<bf16>(m * n)? };
            launch_scale_rows_cols(&dev, &xv, &out, &rv, &cv, m, n)?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((m, n))))
        }
    }

    /// `scale_rows_cols_bf16`: `y = x * rs[row] * cs[col]` over `[m, n]` (n even), `y` a
    /// distinct buffer.
    fn launch_scale_rows_cols(
        dev: &CudaDevice,
        x: &CudaView<'_, bf16>,
        y: &CudaSlice<bf16>,
        rs: &CudaView<'_, f32>,
        cs: &CudaView<'_, f32>,
        m: usize,
        n: usize,
    ) -> candle_core::Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (func, stream) = kernel(dev, "scale_rows_cols_bf16")?;
        let pairs = m * n / 2;
        let blocks = as_u32(pairs.div_ceil(256).min(1 << 16), "blocks")?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (m_, n_) = (as_i32(m, "rows")?, as_i32(n, "columns")?);
        let mut builder = stream.launch_builder(&func);
        builder.arg(x);
        builder.arg(y);
        builder.arg(rs);
        builder.arg(cs);
        builder.arg(&m_);
        builder.arg(&n_);
        // SAFETY: argument types and order match `scale_rows_cols_bf16`; x and y are distinct
        // m * n bf16 buffers (n even), rs m and cs n f32, all on this stream.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }

    impl CustomOp1 for Fp8Matmul {
        fn name(&self) -> &'static str {
            "fp8-matmul"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("fp8-matmul runs on CUDA only (engine/fp8.rs emulates it on the CPU)")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (m, k) = xl.shape().dims2()?;
            let (ws, wl) = self.w.storage_and_layout();
            let (ss, sl) = self.w_scales.storage_and_layout();
            let (Storage::Cuda(ws), Storage::Cuda(ss)) = (&*ws, &*ss) else { bail!("fp8-matmul: weight and scales must be on the GPU") };
            let (n, wk) = wl.shape().dims2()?;
            if wk != k || sl.shape().dims1()? != n {
                bail!("fp8-matmul: x [{m}, {k}] against weight {:?} with {} scales", wl.shape(), sl.shape().elem_count());
            }
            if !k.is_multiple_of(16) || !n.is_multiple_of(16) {
                bail!("fp8-matmul: FP8 GEMM dimensions must be multiples of 16 (n={n}, k={k})");
            }
            let dev = x.device.clone();
            // SAFETY: the GEMM writes every element.
            let mut y = unsafe { dev.alloc::<bf16>(m * n)? };
            let silu_mul = matches!(self.epilogue, super::Epilogue::SiluMul);
            if m == 0 {
                let cols = if silu_mul { n / 2 } else { n };
                return Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, cols))));
            }
            let xv = view::<bf16>(x, xl, "x")?;
            let wv = view::<F8E4M3>(ws, wl, "weight")?;
            let sv = view::<f32>(ss, sl, "weight scales")?;
            // The activations' row scales: the consumer's tensor when it takes the scaling.
            let deferred = match &self.epilogue {
                super::Epilogue::Defer { x_scales } => Some(x_scales.storage_and_layout()),
                _ => None,
            };
            let deferred_view = match &deferred {
                Some((ds, dl)) => {
                    let Storage::Cuda(ds) = &**ds else { bail!("fp8-matmul: row scales must be on the GPU") };
                    if dl.shape().dims1()? != m {
                        bail!("fp8-matmul: {} row scales for {m} rows", dl.shape().elem_count());
                    }
                    Some(view::<f32>(ds, dl, "row scales")?)
                }
                None => None,
            };
            // SAFETY: both are written by the quantization kernel before the GEMM reads them.
            let mut xq = unsafe { dev.alloc::<F8E4M3>(m * k)? };
            let own_xs;
            let xs: CudaView<'_, f32> = match &deferred_view {
                Some(d) => d.slice(..),
                None => {
                    own_xs = dev.alloc_zeros::<f32>(m)?;
                    own_xs.slice(..)
                }
            };
            launch_quant(&dev, &xv, &mut xq, &xs, m, k)?;
            let stream = dev.cuda_stream();
            let gemm = &self.gemm.inner;
            let mut plans = gemm.plans.lock().map_err(|_| candle_core::Error::Msg("fp8-matmul: plan cache poisoned".into()))?;
            let (w_ptr, _w_read) = wv.device_ptr(&stream);
            let (ws_ptr, _ws_read) = sv.device_ptr(&stream);
            let (x_ptr, _x_read) = xq.device_ptr(&stream);
            let (xs_ptr, _xs_read) = xs.device_ptr(&stream);
            let (work_ptr, _work) = gemm.workspace.device_ptr(&stream);
            let (y_ptr, _y_write) = y.device_ptr_mut(&stream);
            let unit = deferred_view.is_some();
            let plan = match plans.entry((m, n, k, unit)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) if unit => e.insert(gemm.plan_with(m, n, k, None)?),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(gemm.plan(m, n, k, ws_ptr, xs_ptr)?),
            };
            use lt::sys::cublasLtMatmulDescAttributes_t as A;
            if plan.outer {
                // The scale pointers are device addresses (`void*` attributes).
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws_ptr)?;
                set_desc(plan.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs_ptr)?;
            }
            let (alpha, beta) = (1f32, 0f32);
            // SAFETY: the plan was made for (m, n, k) with these layouts; the pointers are live
            // device buffers of those sizes (kept by the guards and tensors above until after the
            // call is enqueued; frees are stream-ordered); everything runs on the device's stream.
            unsafe {
                lt::result::matmul(
                    gemm.handle,
                    plan.desc,
                    (&alpha as *const f32).cast(),
                    (&beta as *const f32).cast(),
                    w_ptr as *const std::ffi::c_void,
                    plan.a,
                    x_ptr as *const std::ffi::c_void,
                    plan.b,
                    y_ptr as *const std::ffi::c_void,
                    plan.d,
                    y_ptr as *mut std::ffi::c_void,
                    plan.d,
                    &plan.algo,
                    work_ptr as *mut std::ffi::c_void,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as _,
                )
            }
            .map_err(|e| lt_err(&format!("FP8 matmul m={m} n={n} k={k}"), e))?;
            let outer = plan.outer;
            drop((_w_read, _ws_read, _x_read, _xs_read, _work, _y_write));
            drop(plans);
            if silu_mul {
                let inter = n / 2;
                // SAFETY: the kernel writes every element.
                let out = unsafe { dev.alloc::<bf16>(m * inter)? };
                let scales = if outer { None } else { Some((&xs, &sv)) };
                launch_silu_mul(&dev, &y.slice(..), scales, &out, m, inter)?;
                return Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((m, inter))));
            }
            if !outer && !unit {
                // SAFETY: the kernel writes every element.
                let scaled = unsafe { dev.alloc::<bf16>(m * n)? };
                launch_scale_rows_cols(&dev, &y.slice(..), &scaled, &xs, &sv, m, n)?;
                return Ok((CudaStorage::wrap_cuda_slice(scaled, dev), Shape::from((m, n))));
            }
            Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, n))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{kv_cache_offset, prefill_chunk_tokens, query_chunks};

    #[test]
    fn cache_offsets_tile_the_cache_block_major() {
        let (blocks, nkv, bs, hd) = (5usize, 3usize, 4usize, 8usize);
        let mut seen = vec![false; blocks * nkv * bs * hd];
        for b in 0..blocks {
            for h in 0..nkv {
                // One block's keys of one head are one contiguous run of bs * hd elements.
                let start = kv_cache_offset(b, h, 0, nkv, bs, hd);
                assert_eq!(start, (b * nkv + h) * bs * hd);
                for r in 0..bs {
                    let at = kv_cache_offset(b, h, r, nkv, bs, hd);
                    assert_eq!(at, start + r * hd);
                    for d in 0..hd {
                        assert!(!seen[at + d], "offset {} twice", at + d);
                        seen[at + d] = true;
                    }
                }
            }
        }
        // Every element of the cache belongs to exactly one (block, head, position, dim).
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn query_chunks_cover_each_prefill_query_once_in_runs_of_one_sequence() {
        // 16 / g positions per warp, 8 warps.
        assert_eq!(prefill_chunk_tokens(32, 8), 32);
        assert_eq!(prefill_chunk_tokens(14, 2), 16);
        assert_eq!(prefill_chunk_tokens(8, 8), 128);
        // Two decode tokens, then positions 0..40 of sequence 2, then positions 5..8 of sequence 3.
        let mut rows = vec![0u32, 1];
        let mut ctx = vec![7u32, 9];
        rows.extend([2; 40]);
        ctx.extend(1..=40);
        rows.extend([3; 3]);
        ctx.extend(6..=8);
        let items = query_chunks(&rows, &ctx, 2, 32);
        let decoded: Vec<(u32, u32)> = items.iter().map(|i| (i & 0x00ff_ffff, (i >> 24) + 1)).collect();
        assert_eq!(decoded, vec![(2, 32), (34, 8), (42, 3)]);
        // A break in the positions of one sequence starts a new item.
        let items = query_chunks(&[4, 4, 4], &[3, 4, 9], 0, 128);
        assert_eq!(items, vec![1 << 24, 2]);
    }
}
