//! The layer projections (`Proj`): candle's dense `Linear` in the model dtype, or FP8 E4M3
//! weights with one scale per output channel (`dtype: fp8`), their activations quantized per
//! token at every call. On CUDA the product runs on FP8 tensor cores (`cuda_ops::fp8_linear`);
//! on the CPU the same rounding is emulated in f32, so the accuracy tests run anywhere.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_nn::{Linear, Module};

use super::cuda_ops::{self, Fp8Gemm, Lane, ProjOut};
use super::error::EngineError;

/// The largest finite E4M3 value: a row's absolute maximum maps to it.
pub const E4M3_MAX: f32 = 448.0;

/// Rows up to which `cuda_ops::small_linear` replaces cuBLAS in the model: measured on an H100
/// (0.5B shape, docs/BENCHMARKS.md attempt 23), batch 1 runs at 1.46 ms per output token with it
/// and 1.81 without, batch 8 at 2.14 with it and 1.71 without.
pub const SMALL_LINEAR_WINS: usize = 1;

/// A projection `y = x · W^T` (biases are added by the caller).
pub enum Proj {
    Dense(Linear),
    Fp8(Fp8Linear),
}

impl Proj {
    /// `linear` as it is, or quantized to FP8 when `gemm` is given (CUDA) or `emulate` (CPU).
    pub fn new(linear: Linear, fp8: Option<&Fp8Mode>) -> Result<Self, EngineError> {
        match fp8 {
            None => Ok(Self::Dense(linear)),
            Some(mode) => {
                if linear.bias().is_some() {
                    return Err(EngineError::Config("FP8 projections take their bias apart".into()));
                }
                Ok(Self::Fp8(Fp8Linear::quantize(linear.weight(), mode)?))
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        match self {
            Self::Dense(l) => Ok(l.forward(x)?),
            Self::Fp8(f) => f.forward(x),
        }
    }

    /// `forward`, through `cuda_ops::small_linear` where `small_weight` allows it.
    pub fn forward_small(&self, x: &Tensor, small: bool) -> Result<Tensor, EngineError> {
        if let Some(w) = self.small_weight(x, small)?
            && let Some(y) = cuda_ops::small_linear(x, w, false)?
        {
            return Ok(y);
        }
        self.forward(x)
    }

    /// `forward_small`, leaving an FP8 GEMM's scaling to the kernel that reads the output
    /// (`cuda_ops::add_rms_norm`, `cuda_ops::rope_qkv_cache`). With a `lane` (the second half
    /// of a split step) the GEMM runs on the lane's cuBLAS handle or FP8 state.
    pub fn forward_deferred(&self, x: &Tensor, small: bool, lane: Option<&Lane>) -> Result<ProjOut, EngineError> {
        match (self, lane) {
            (Self::Fp8(f), _) => f.forward_deferred(x, lane),
            (Self::Dense(l), Some(lane)) => Ok(ProjOut::done(dense_on(lane, l, x)?)),
            (Self::Dense(_), None) => Ok(ProjOut::done(self.forward_small(x, small)?)),
        }
    }

    /// `silu(gate) * up` of a stacked `[gate; up]` projection: one kernel with the product where
    /// `small_weight` allows it, else the projection then `cuda_ops::silu_mul`; `lane` as in
    /// `forward_deferred`.
    pub fn forward_silu_mul(&self, x: &Tensor, small: bool, lane: Option<&Lane>) -> Result<Tensor, EngineError> {
        match (self, lane) {
            (Self::Fp8(f), _) => f.forward_silu_mul(x, lane),
            (Self::Dense(l), Some(lane)) => cuda_ops::silu_mul(&dense_on(lane, l, x)?),
            (Self::Dense(_), None) => {
                if let Some(w) = self.small_weight(x, small)?
                    && let Some(y) = cuda_ops::small_linear(x, w, true)?
                {
                    return Ok(y);
                }
                cuda_ops::silu_mul(&self.forward(x)?)
            }
        }
    }

    /// The weight `cuda_ops::small_linear` may take instead of the general path: when `small`,
    /// `x` has at most `SMALL_LINEAR_WINS` rows and this is a dense projection without bias
    /// (the kernel itself declines other devices and dtypes).
    fn small_weight(&self, x: &Tensor, small: bool) -> Result<Option<&Tensor>, EngineError> {
        match self {
            Self::Dense(l) if small && l.bias().is_none() && x.dim(0)? <= SMALL_LINEAR_WINS => Ok(Some(l.weight())),
            _ => Ok(None),
        }
    }
}

/// `l.forward(x)` on `lane`'s GEMM state.
fn dense_on(lane: &Lane, l: &Linear, x: &Tensor) -> Result<Tensor, EngineError> {
    let y = lane.linear(x, l.weight())?;
    match l.bias() {
        Some(b) => Ok(y.broadcast_add(b)?),
        None => Ok(y),
    }
}

/// How FP8 projections run on this model's device.
#[derive(Clone)]
pub enum Fp8Mode {
    /// FP8 tensor cores through cuBLASLt.
    Cuda(Arc<Fp8Gemm>),
    /// f32 emulation of the same rounding (CPU).
    Emulated,
}

impl Fp8Mode {
    /// The mode for `device`: CUDA needs FP8 tensor cores (compute capability 8.9+).
    pub fn for_device(device: &candle_core::Device) -> Result<Self, EngineError> {
        if device.is_cuda() { Ok(Self::Cuda(Arc::new(Fp8Gemm::new(device)?))) } else { Ok(Self::Emulated) }
    }
}

/// An E4M3 weight `[out, in]` with per-output-channel f32 scales.
pub struct Fp8Linear {
    /// CUDA: the E4M3 values; emulated: their f32 dequantization `q * scale`.
    weight: Tensor,
    /// `[out]` f32 (CUDA only; folded into `weight` when emulated).
    scales: Option<Tensor>,
    mode: Fp8Mode,
}

impl Fp8Linear {
    /// Quantizes `w: [out, in]` per row (output channel) to E4M3.
    pub fn quantize(w: &Tensor, mode: &Fp8Mode) -> Result<Self, EngineError> {
        let (out, inp) = w.dims2()?;
        match mode {
            Fp8Mode::Cuda(_) => {
                if !out.is_multiple_of(16) || !inp.is_multiple_of(16) {
                    return Err(EngineError::Config(format!(
                        "dtype fp8: a projection of [{out}, {inp}] is not a multiple of 16 in both dimensions (FP8 GEMMs need it)"
                    )));
                }
                let (q, s) = cuda_ops::quantize_rows_e4m3(&w.to_dtype(DType::BF16)?)?;
                Ok(Self { weight: q, scales: Some(s), mode: mode.clone() })
            }
            Fp8Mode::Emulated => Ok(Self { weight: fake_quant_rows(w)?, scales: None, mode: mode.clone() }),
        }
    }

    /// The FP8 GEMM state to run on: the lane's where one is given (a split step's second
    /// half), else the model's.
    fn gemm<'a>(&'a self, lane: Option<&'a Lane>) -> Option<&'a Arc<Fp8Gemm>> {
        match &self.mode {
            Fp8Mode::Cuda(gemm) => Some(lane.and_then(|l| l.fp8.as_ref()).unwrap_or(gemm)),
            Fp8Mode::Emulated => None,
        }
    }

    /// `silu(gate) * up` of `forward(x)` for a stacked `[gate; up]` weight: on CUDA one SwiGLU
    /// pass that also applies the GEMM's scales (`cuda_ops::fp8_linear_silu_mul`).
    pub fn forward_silu_mul(&self, x: &Tensor, lane: Option<&Lane>) -> Result<Tensor, EngineError> {
        match (self.gemm(lane), &self.scales) {
            (Some(gemm), Some(s)) => cuda_ops::fp8_linear_silu_mul(&x.to_dtype(DType::BF16)?, &self.weight, s, gemm),
            _ => cuda_ops::silu_mul(&self.forward(x)?),
        }
    }

    /// `forward`, on CUDA with the scales left to the output's consumer.
    pub fn forward_deferred(&self, x: &Tensor, lane: Option<&Lane>) -> Result<ProjOut, EngineError> {
        match (self.gemm(lane), &self.scales) {
            (Some(gemm), Some(s)) => cuda_ops::fp8_linear_deferred(&x.to_dtype(DType::BF16)?, &self.weight, s, gemm),
            _ => Ok(ProjOut::done(self.forward(x)?)),
        }
    }

    /// `x: [n, in]` times the dequantized weight, `x` rounded through E4M3 per row first.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        match (&self.mode, &self.scales) {
            (Fp8Mode::Cuda(gemm), Some(s)) => cuda_ops::fp8_linear(&x.to_dtype(DType::BF16)?, &self.weight, s, gemm),
            _ => {
                let dtype = x.dtype();
                let xq = fake_quant_rows(x)?;
                Ok(xq.matmul(&self.weight.t()?)?.to_dtype(dtype)?)
            }
        }
    }
}

/// `x: [rows, cols]` rounded through E4M3 row by row, as f32: `q * s` with
/// `s = max(amax(row), 1e-12) / 448` and `q` = `x / s` to the nearest E4M3 value (saturating),
/// the rounding of the CUDA kernel `quant_rows_e4m3`.
pub fn fake_quant_rows(x: &Tensor) -> Result<Tensor, EngineError> {
    let x = x.to_dtype(DType::F32)?;
    let amax = x.abs()?.max_keepdim(1)?;
    let s = (amax.maximum(1e-12f32)? / f64::from(E4M3_MAX))?;
    let q = x.broadcast_div(&s)?.clamp(-E4M3_MAX, E4M3_MAX)?.to_dtype(DType::F8E4M3)?.to_dtype(DType::F32)?;
    Ok(q.broadcast_mul(&s)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_lane_computes_what_the_dense_projection_computes_bias_included() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let p = Proj::new(Linear::new(w, Some(b)), None).unwrap();
        let lane = Lane::new(&dev, false).unwrap();
        let want = p.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let got = p.forward_deferred(&x, false, Some(&lane)).unwrap().finish().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, want);
        let want = cuda_ops::silu_mul(&p.forward(&x).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        let got = p.forward_silu_mul(&x, false, Some(&lane)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn fake_quantization_keeps_row_maxima_and_three_mantissa_bits() {
        let x = Tensor::new(&[[1.0f32, -0.5, 0.3, 0.0], [1000.0, 3.0, -7.0, 250.0]], &Device::Cpu).unwrap();
        let q = fake_quant_rows(&x).unwrap().to_vec2::<f32>().unwrap();
        // Row maxima are exact (they map to 448).
        assert!((q[0][0] - 1.0).abs() < 1e-6 && (q[1][0] - 1000.0).abs() < 1e-3, "{q:?}");
        assert_eq!(q[0][3], 0.0);
        // E4M3 has 3 mantissa bits: relative rounding error at most 1/16.
        for (row, orig) in q.iter().zip(x.to_vec2::<f32>().unwrap()) {
            for (a, b) in row.iter().zip(orig) {
                assert!((a - b).abs() <= b.abs() / 16.0 + 1e-6, "{a} vs {b}");
            }
        }
        // A zero row stays zero (no division by zero).
        let z = fake_quant_rows(&Tensor::zeros((1, 8), DType::F32, &Device::Cpu).unwrap()).unwrap();
        assert!(z.to_vec2::<f32>().unwrap()[0].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn emulated_projection_is_close_to_the_dense_one() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.02, (64, 128), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 128), &dev).unwrap();
        let dense = Proj::new(Linear::new(w.clone(), None), None).unwrap().forward(&x).unwrap();
        let fp8 = Proj::new(Linear::new(w, None), Some(&Fp8Mode::Emulated)).unwrap().forward(&x).unwrap();
        let err = (&fp8 - &dense).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let norm = dense.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(err / norm < 0.06, "relative error {}", err / norm);
        assert!(err > 0.0, "the weight really was rounded");
        let biased = Linear::new(Tensor::zeros((16, 16), DType::F32, &dev).unwrap(), Some(Tensor::zeros(16, DType::F32, &dev).unwrap()));
        assert!(Proj::new(biased, Some(&Fp8Mode::Emulated)).is_err());
    }
}
