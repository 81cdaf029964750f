//! The engine's own CUDA kernels as candle custom ops: paged-attention decode
//! (`worker/kernels/paged_attention.cu`, compiled to PTX by `build.rs` with the `cuda` feature).
//! Without the `cuda` feature nothing here runs: `paged_decode_supported` is always false.

use candle_core::{DType, Tensor};

use super::error::EngineError;

/// Query heads per KV head, and `g * head_dim`, the kernel handles (its shared-memory sizes).
const MAX_GROUP: usize = 8;
const MAX_GROUP_HEAD_DIM: usize = 1024;

/// Whether the paged decode kernel can run this shape on `dtype` (CUDA builds, bf16 only).
pub fn paged_decode_supported(num_heads: usize, num_kv_heads: usize, head_dim: usize, dtype: DType) -> bool {
    let g = num_heads / num_kv_heads.max(1);
    cfg!(feature = "cuda")
        && dtype == DType::BF16
        && num_kv_heads > 0
        && num_heads.is_multiple_of(num_kv_heads)
        && g <= MAX_GROUP
        && g * head_dim <= MAX_GROUP_HEAD_DIM
        && head_dim.is_multiple_of(8)
}

/// Decode attention for `b` sequences with one new token each, reading keys and values
/// straight from the paged cache.
///
/// * `q`: `[b, num_heads, head_dim]` bf16 (RoPE applied);
/// * `k_cache`, `v_cache`: `[slots, num_kv_heads * head_dim]` bf16;
/// * `tables`: `[b, max_blocks]` u32 block ids; `ctx_lens`: `[b]` u32 keys per sequence (≥ 1,
///   the new token's key already written).
///
/// Returns `[b, num_heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tables: &Tensor,
    ctx_lens: &Tensor,
    num_kv_heads: usize,
    block_size: usize,
    scale: f32,
) -> Result<Tensor, EngineError> {
    #[cfg(feature = "cuda")]
    {
        let (_, max_blocks) = tables.dims2()?;
        let op = imp::PagedDecode {
            k_cache: k_cache.clone(),
            v_cache: v_cache.clone(),
            tables: tables.clone(),
            ctx_lens: ctx_lens.clone(),
            num_kv_heads,
            block_size,
            max_blocks,
            scale,
        };
        Ok(q.contiguous()?.apply_op1_no_bwd(&op)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, k_cache, v_cache, tables, ctx_lens, num_kv_heads, block_size, scale);
        Err(EngineError::Config("the paged decode kernel needs the `cuda` feature".into()))
    }
}

/// Writes `src: [n, kv_dim]` (bf16, contiguous) into rows `slots: [n]` (u32) of `cache:
/// [slots, kv_dim]` in place: one parallel copy kernel (candle's `scatter_set` on dim 0 runs
/// `kv_dim` threads that each loop over all `n` rows).
pub fn write_kv(cache: &Tensor, src: &Tensor, slots: &Tensor) -> Result<(), EngineError> {
    #[cfg(feature = "cuda")]
    {
        Ok(cache.inplace_op3(&src.contiguous()?, slots, &imp::WriteKv)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (cache, src, slots);
        Err(EngineError::Config("the KV write kernel needs the `cuda` feature".into()))
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod imp {
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{CpuStorage, CustomOp1, InplaceOp3, Layout, Shape, Storage, Tensor, bail};
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
    /// Must match THREADS in the kernel.
    const THREADS: u32 = 128;

    pub(super) struct PagedDecode {
        pub k_cache: Tensor,
        pub v_cache: Tensor,
        pub tables: Tensor,
        pub ctx_lens: Tensor,
        pub num_kv_heads: usize,
        pub block_size: usize,
        pub max_blocks: usize,
        pub scale: f32,
    }

    /// The contiguous device view of a tensor's storage.
    fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> candle_core::Result<CudaView<'a, T>> {
        if !l.is_contiguous() {
            bail!("paged-decode: {what} must be contiguous");
        }
        let n = l.shape().elem_count();
        let start = l.start_offset();
        Ok(s.as_cuda_slice::<T>()?.slice(start..start + n))
    }

    fn as_i32(x: usize, what: &str) -> candle_core::Result<i32> {
        i32::try_from(x).map_err(|_| candle_core::Error::Msg(format!("paged-decode: {what} {x}")))
    }

    impl CustomOp1 for PagedDecode {
        fn name(&self) -> &'static str {
            "paged-decode"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            bail!("paged-decode runs on CUDA only")
        }

        fn cuda_fwd(&self, q: &CudaStorage, ql: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (b, nh, hd) = ql.shape().dims3()?;
            let dev = q.device.clone();
            let (ks, kl) = self.k_cache.storage_and_layout();
            let (vs, vl) = self.v_cache.storage_and_layout();
            let (ts, tl) = self.tables.storage_and_layout();
            let (cs, cl) = self.ctx_lens.storage_and_layout();
            let (Storage::Cuda(ks), Storage::Cuda(vs), Storage::Cuda(ts), Storage::Cuda(cs)) = (&*ks, &*vs, &*ts, &*cs) else {
                bail!("paged-decode: cache and tables must be on the GPU");
            };
            if kl.shape().dims2()?.1 != self.num_kv_heads * hd || kl.shape() != vl.shape() {
                bail!("paged-decode: cache shape {:?} does not match {} KV heads of {hd}", kl.shape(), self.num_kv_heads);
            }
            if tl.shape().dims2()?.0 != b || cl.shape().dims1()? != b {
                bail!("paged-decode: tables/ctx_lens do not have {b} rows");
            }
            let qv = view::<bf16>(q, ql, "q")?;
            let kv = view::<bf16>(ks, kl, "k cache")?;
            let vv = view::<bf16>(vs, vl, "v cache")?;
            let tv = view::<u32>(ts, tl, "block tables")?;
            let cv = view::<u32>(cs, cl, "context lengths")?;
            let entry = match hd {
                64 => "paged_decode_bf16_hd64",
                128 => "paged_decode_bf16_hd128",
                _ => "paged_decode_bf16",
            };
            let func = dev.get_or_load_custom_func(entry, "sluice_paged_attention", PTX)?;
            // SAFETY: every element is written by the kernel before it is read.
            let out = unsafe { dev.alloc::<bf16>(b * nh * hd)? };
            let cfg = LaunchConfig {
                grid_dim: (
                    u32::try_from(self.num_kv_heads).map_err(|_| candle_core::Error::Msg("too many KV heads".into()))?,
                    u32::try_from(b).map_err(|_| candle_core::Error::Msg("batch".into()))?,
                    1,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (nh_, nkv_, hd_) = (as_i32(nh, "heads")?, as_i32(self.num_kv_heads, "kv heads")?, as_i32(hd, "head_dim")?);
            let (bs_, mb_) = (as_i32(self.block_size, "block_size")?, as_i32(self.max_blocks, "max_blocks")?);
            let mut builder = func.builder();
            builder.arg(&qv);
            builder.arg(&kv);
            builder.arg(&vv);
            builder.arg(&tv);
            builder.arg(&cv);
            builder.arg(&out);
            builder.arg(&nh_);
            builder.arg(&nkv_);
            builder.arg(&hd_);
            builder.arg(&bs_);
            builder.arg(&mb_);
            builder.arg(&self.scale);
            // SAFETY: argument types and order match `paged_decode_bf16`; the shapes were
            // checked above and the kernel reads only `ctx_lens[s]` keys through `tables[s]`.
            unsafe { builder.launch(cfg) }.w()?;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((b, nh, hd))))
        }
    }

    pub(super) struct WriteKv;

    impl InplaceOp3 for WriteKv {
        fn name(&self) -> &'static str {
            "write-kv"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<()> {
            bail!("write-kv runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            cache: &mut CudaStorage,
            cl: &Layout,
            src: &CudaStorage,
            sl: &Layout,
            slots: &CudaStorage,
            tl: &Layout,
        ) -> candle_core::Result<()> {
            let (_, kvd) = cl.shape().dims2()?;
            let (n, skvd) = sl.shape().dims2()?;
            if skvd != kvd || tl.shape().dims1()? != n || !kvd.is_multiple_of(8) || !cl.is_contiguous() {
                bail!("write-kv: cache {:?}, src {:?}, slots {:?}", cl.shape(), sl.shape(), tl.shape());
            }
            if n == 0 {
                return Ok(());
            }
            let dev = src.device.clone();
            let sv = view::<bf16>(src, sl, "src")?;
            let tv = view::<u32>(slots, tl, "slots")?;
            let start = cl.start_offset();
            let len = cl.shape().elem_count();
            let mut cv = cache.as_cuda_slice_mut::<bf16>()?.slice_mut(start..start + len);
            let func = dev.get_or_load_custom_func("write_kv_bf16", "sluice_paged_attention", PTX)?;
            let total = (n * kvd / 8) as u32;
            let cfg = LaunchConfig { grid_dim: (total.div_ceil(256).clamp(1, 65_535), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let (n_, kvd_) = (as_i32(n, "tokens")?, as_i32(kvd, "kv_dim")?);
            let mut builder = func.builder();
            builder.arg(&sv);
            builder.arg(&mut cv);
            builder.arg(&tv);
            builder.arg(&n_);
            builder.arg(&kvd_);
            // SAFETY: argument types and order match `write_kv_bf16`; shapes checked above; the
            // engine's slots are all inside the cache (block tables come from its allocator).
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        }
    }
}
