//! Device and dtype selection, and the KV-cache budget: a configured block count or byte size
//! on CPU, a fraction of the GPU's memory (`gpu_memory_utilization`) on CUDA.
//! Same code path for both devices; CUDA exists only with the `cuda` cargo feature.

use candle_core::{DType, Device};

use super::config::{ArchConfig, EngineSwitches};
use super::error::EngineError;
use sluice_api::job::Dtype;

/// Which device the engine runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// CUDA device ordinal (needs the `cuda` feature).
    Cuda(usize),
}

/// KV-cache bytes used on CPU when neither `num_kv_blocks` nor `kv_cache_bytes` is set.
pub const DEFAULT_CPU_KV_BYTES: u64 = 256 << 20;

/// Memory kept free on the GPU for activations, per batched token (a generous estimate).
fn activation_reserve(arch: &ArchConfig, max_batched_tokens: usize, dtype: DType) -> u64 {
    let per_token = (4 * arch.hidden_size + 3 * arch.intermediate_size) * 4;
    let logits = arch.vocab_size * 4 * 512;
    let base: u64 = 1 << 30;
    base + (per_token * max_batched_tokens * dtype.size_in_bytes().max(2) / 2 + logits) as u64
}

pub fn make_device(kind: DeviceKind, switches: &EngineSwitches) -> Result<Device, EngineError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda(i) => {
            if !cfg!(feature = "cuda") {
                return Err(EngineError::Config("CUDA requested but sluice-worker was built without the `cuda` feature".into()));
            }
            // Split steps (`EngineSwitches::nano_batches`) need one stream per host thread: the
            // per-thread default stream. Otherwise the engine has a stream of its own.
            let device = if switches.nano_batches { Device::new_cuda(i) } else { Device::new_cuda_with_stream(i) }
                .map_err(|e| EngineError::Config(format!("CUDA device {i}: {e}")))?;
            if !switches.cuda_event_tracking {
                disable_event_tracking(&device);
            }
            Ok(device)
        }
    }
}

/// Turns off cudarc's per-allocation event tracking for tensors created from now on. The
/// engine orders its work by stream order alone (one stream; with split steps, the halves'
/// explicit `cuda_ops::StreamMark`s), so the cross-stream events cudarc records around each
/// launch (several driver calls per argument) are pure host overhead.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn disable_event_tracking(device: &Device) {
    if let Device::Cuda(d) = device {
        // SAFETY: all engine work (weights, KV cache, activations, custom kernels) is enqueued
        // on this device's stream, so stream order alone orders every use of a buffer; a split
        // step's second stream touches other KV slots and joins the first through an event
        // before anything reads what it wrote (`Model::split_logits`).
        unsafe { d.disable_event_tracking() }
    }
}

#[cfg(not(feature = "cuda"))]
fn disable_event_tracking(_: &Device) {}

/// The candle dtype of activations and unquantized weights for `d`: `Auto` (and `Fp8`, whose
/// projections are E4M3) is bf16 on CUDA, f32 on CPU.
pub fn resolve_dtype(d: Dtype, device: &Device) -> DType {
    match d {
        Dtype::Auto | Dtype::Fp8 if device.is_cuda() => DType::BF16,
        // FP8 projections emulated in f32 on the CPU (`fp8::Fp8Mode::Emulated`).
        Dtype::Fp8 => DType::F32,
        Dtype::Auto | Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// Free and total bytes of the current CUDA device.
#[cfg(feature = "cuda")]
fn cuda_mem_info() -> Result<(u64, u64), EngineError> {
    candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
        .map(|(f, t)| (f as u64, t as u64))
        .map_err(|e| EngineError::Config(format!("cuMemGetInfo: {e:?}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_mem_info() -> Result<(u64, u64), EngineError> {
    Err(EngineError::Config("built without the `cuda` feature".into()))
}

/// The device's name as its driver reports it (e.g. `NVIDIA H100 80GB HBM3`), or `cpu`.
pub fn device_label(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d.cuda_stream().context().name().unwrap_or_else(|e| format!("cuda (name unavailable: {e:?})")),
        other => format!("{:?}", other.location()),
    }
}

/// The `EngineConfig` settings that size the KV cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvBudget {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Fraction of GPU memory the engine may use.
    pub gpu_memory_utilization: f32,
    /// Exact number of blocks (overrides every budget).
    pub num_kv_blocks: Option<usize>,
    /// KV cache size in bytes (overrides the GPU fraction).
    pub kv_cache_bytes: Option<u64>,
    /// Most tokens in one forward pass (the activations' reserve).
    pub max_num_batched_tokens: usize,
}

/// Number of KV blocks of `kv_dtype` elements to allocate, after the weights (activations in
/// `dtype`) are on the device.
pub fn kv_blocks(
    arch: &ArchConfig,
    dtype: DType,
    kv_dtype: DType,
    device: &Device,
    cfg: &KvBudget,
    useful_max: usize,
) -> Result<usize, EngineError> {
    let block_size = cfg.block_size;
    let gpu_memory_utilization = cfg.gpu_memory_utilization;
    if let Some(n) = cfg.num_kv_blocks {
        return Ok(n.max(1));
    }
    let per_block = (arch.kv_bytes_per_token(kv_dtype.size_in_bytes()) * block_size) as u64;
    let budget = if let Some(b) = cfg.kv_cache_bytes {
        b
    } else if device.is_cuda() {
        if !(gpu_memory_utilization > 0.0 && gpu_memory_utilization <= 1.0) {
            return Err(EngineError::Config(format!("gpu_memory_utilization {gpu_memory_utilization} must be in (0, 1]")));
        }
        let (free, total) = cuda_mem_info()?;
        let used = total.saturating_sub(free);
        let allowed = (total as f64 * f64::from(gpu_memory_utilization)) as u64;
        allowed.saturating_sub(used).saturating_sub(activation_reserve(arch, cfg.max_num_batched_tokens, dtype))
    } else {
        DEFAULT_CPU_KV_BYTES
    };
    let blocks = (budget / per_block.max(1)) as usize;
    if blocks == 0 {
        return Err(EngineError::Config(format!("no memory left for the KV cache (budget {budget} bytes, {per_block} bytes per block)")));
    }
    Ok(blocks.min(useful_max.max(1)))
}
