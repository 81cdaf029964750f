//! `dtype: fp8` (E4M3 projections, per-channel weight scales, per-token activation scales): the
//! accuracy bound against the float32 transformers reference on the tiny models (CPU, the
//! emulated rounding; on a GPU with `SLUICE_TEST_CUDA=1`, the FP8 tensor-core path too), FP8
//! checkpoints loaded with their scales, and the errors for checkpoints it cannot load; and the
//! FP8 KV cache (`kv_cache_dtype: fp8`, E4M3 at unit scale): its accuracy bound and capacity.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod engine_common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use engine_common::*;
use sluice_api::job::{Dtype, KvCacheDtype};
use sluice_worker::engine::{EngineConfig, LlmEngine, Prompt};

/// Worst relative logits error over every teacher-forced step of the reference cases, and the
/// share of greedy tokens equal to the reference's (each case's run compared up to its first
/// difference).
fn accuracy(eng: &mut LlmEngine, name: &str) -> (f32, f64) {
    let (err, agree, _) = accuracy_on(eng, &reference(name));
    (err, agree)
}

/// [`accuracy`] over `cases`, with the greedy tokens the engine produced.
fn accuracy_on(eng: &mut LlmEngine, cases: &[Case]) -> (f32, f64, Vec<Vec<u32>>) {
    let batch: Vec<_> = cases.iter().map(|c| (c.prompt_ids.clone(), c.greedy_ids[..c.logits.len() - 1].to_vec())).collect();
    let logits = eng.teacher_forced_logits(&batch).unwrap();
    let mut worst = 0f32;
    for (i, c) in cases.iter().enumerate() {
        for (step, want) in c.logits.iter().enumerate() {
            worst = worst.max(rel_err(&logits[i][step], want));
        }
    }
    let reqs: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| request(i as u64, Prompt::Tokens(c.prompt_ids.clone()), greedy(c.greedy_ids.len())))
        .collect();
    let mut out = eng.generate(reqs).unwrap();
    out.sort_by_key(|(id, _)| *id);
    let tokens: Vec<Vec<u32>> = out.into_iter().map(|(_, r)| r.unwrap().token_ids).collect();
    let want: Vec<Vec<u32>> = cases.iter().map(|c| c.greedy_ids.clone()).collect();
    (worst, agreement(&tokens, &want), tokens)
}

/// The share of `want`'s tokens that `got` reproduces, each sequence up to its first difference.
fn agreement(got: &[Vec<u32>], want: &[Vec<u32>]) -> f64 {
    let (mut same, mut total) = (0usize, 0usize);
    for (g, w) in got.iter().zip(want) {
        total += w.len();
        same += g.iter().zip(w).take_while(|(a, b)| a == b).count();
    }
    same as f64 / total.max(1) as f64
}

fn fp8_config(name: &str) -> EngineConfig {
    EngineConfig { dtype: Dtype::Fp8, ..config(name) }
}

/// The bound docs/engine.md states for the emulated (CPU) path on the tiny models. Their random
/// weights and near-uniform logits amplify rounding (bf16 alone is at ≈ 0.05 here): E4M3 keeps
/// 3 mantissa bits against bf16's 7, so its error is expected near 2^4 / 2 ≈ 8x bf16's.
const CPU_FP8_TOL: f32 = 0.5;

#[test]
fn fp8_logits_stay_within_the_bound_of_the_f32_reference() {
    for name in MODELS {
        let (f32_err, f32_agree) = accuracy(&mut engine(&config(name)), name);
        let (bf16_err, bf16_agree) = accuracy(&mut engine(&EngineConfig { dtype: Dtype::Bf16, ..config(name) }), name);
        let (fp8_err, fp8_agree) = accuracy(&mut engine(&fp8_config(name)), name);
        eprintln!(
            "{name}: vs transformers f32, worst relative logits error / greedy agreement: f32 {f32_err:.2e} / {f32_agree:.3}, bf16 {bf16_err:.4} / {bf16_agree:.3}, fp8 {fp8_err:.4} / {fp8_agree:.3}"
        );
        assert!(f32_err < 1e-3, "{name}: the f32 engine itself is off ({f32_err})");
        assert!(fp8_err <= 12.0 * bf16_err, "{name}: fp8 {fp8_err} more than 12x bf16's {bf16_err}");
        assert!(fp8_err > f32_err, "{name}: fp8 changed nothing ({fp8_err})");
        assert!(fp8_err <= CPU_FP8_TOL, "{name}: fp8 relative logits error {fp8_err} above {CPU_FP8_TOL}");
        assert_eq!(engine(&fp8_config(name)).dtype_label(), "fp8");
    }
}

/// The FP8 KV cache alone (f32 weights and activations) and with FP8 projections: worse than
/// the f32 engine, within the CPU bound of FP8 projections (keys and values are rounded to 3
/// mantissa bits once each, the projections' inputs at every layer).
#[test]
fn fp8_kv_cache_stays_within_the_bound_of_the_f32_reference() {
    for name in MODELS {
        let (f32_err, _) = accuracy(&mut engine(&config(name)), name);
        let kv = EngineConfig { kv_cache_dtype: KvCacheDtype::Fp8, ..config(name) };
        let mut kv_engine = engine(&kv);
        assert_eq!(kv_engine.kv_cache_dtype(), DType::F8E4M3);
        let (kv_err, kv_agree) = accuracy(&mut kv_engine, name);
        let both = EngineConfig { kv_cache_dtype: KvCacheDtype::Fp8, ..fp8_config(name) };
        let (both_err, both_agree) = accuracy(&mut engine(&both), name);
        eprintln!(
            "{name}: vs transformers f32, worst relative logits error / greedy agreement: fp8 KV cache {kv_err:.4} / {kv_agree:.3}, fp8 projections + fp8 KV cache {both_err:.4} / {both_agree:.3}"
        );
        assert!(kv_err > f32_err, "{name}: the fp8 KV cache changed nothing ({kv_err})");
        assert!(kv_err <= CPU_FP8_TOL, "{name}: fp8 KV cache relative logits error {kv_err} above {CPU_FP8_TOL}");
        assert!(both_err <= CPU_FP8_TOL, "{name}: fp8 projections + KV cache relative logits error {both_err} above {CPU_FP8_TOL}");
    }
}

/// An E4M3 cache holds a quarter of the bytes per token of an f32 one (half of bf16's): the
/// same byte budget gives four times the blocks.
#[test]
fn fp8_kv_cache_fits_more_blocks_in_the_same_bytes() {
    let budget = EngineConfig { num_kv_blocks: None, kv_cache_bytes: Some(4 << 20), ..config("tiny-qwen2") };
    let f32_blocks = engine(&budget).stats().kv_blocks_total;
    let fp8_blocks = engine(&EngineConfig { kv_cache_dtype: KvCacheDtype::Fp8, ..budget.clone() }).stats().kv_blocks_total;
    let bf16_blocks = engine(&EngineConfig { dtype: Dtype::Bf16, ..budget.clone() }).stats().kv_blocks_total;
    assert!(f32_blocks > 0, "{f32_blocks}");
    assert_eq!(fp8_blocks, 4 * f32_blocks, "f32 {f32_blocks} blocks, fp8 {fp8_blocks}");
    assert_eq!(bf16_blocks, 2 * f32_blocks, "f32 {f32_blocks} blocks, bf16 {bf16_blocks}");
    assert_eq!("FP8".parse::<KvCacheDtype>(), Ok(KvCacheDtype::Fp8));
    assert!("int8".parse::<KvCacheDtype>().unwrap_err().contains("auto or fp8"));
}

/// The same bound at a real shape: `SLUICE_ACCURACY_DIR` holds a bf16 checkpoint and its float32
/// transformers reference from scripts/accuracy_reference.py (for example the Llama-3.1-8B
/// widths with 4 layers on a CPU, or all 32 on a GPU with `SLUICE_ACCURACY_DEVICE=cuda`).
/// Prints, per dtype, the worst relative logits error against transformers f32, the greedy
/// agreement with it and, for fp8, the greedy agreement with the bf16 engine.
#[test]
#[ignore = "needs SLUICE_ACCURACY_DIR from scripts/accuracy_reference.py (gigabytes)"]
fn fp8_accuracy_at_a_real_shape() {
    let dir = std::path::PathBuf::from(std::env::var("SLUICE_ACCURACY_DIR").expect("set SLUICE_ACCURACY_DIR"));
    let device = match std::env::var("SLUICE_ACCURACY_DEVICE").as_deref() {
        Ok("cuda") => sluice_worker::engine::DeviceKind::Cuda(0),
        _ => sluice_worker::engine::DeviceKind::Cpu,
    };
    let cases = reference_at(&dir.join("reference.json"));
    let longest = cases.iter().map(|c| c.prompt_ids.len() + c.greedy_ids.len()).max().unwrap();
    let cfg = EngineConfig {
        model_dir: dir.clone(),
        device,
        num_kv_blocks: Some(cases.len() * longest.div_ceil(16) + 8),
        max_model_len: Some(longest.next_power_of_two()),
        ..EngineConfig::default()
    };
    let mut rows = Vec::new();
    let mut bf16_tokens = Vec::new();
    let mut kv_err = None;
    for (dtype, kv_cache_dtype) in [
        (Dtype::Bf16, KvCacheDtype::Auto),
        (Dtype::F32, KvCacheDtype::Auto),
        (Dtype::Fp8, KvCacheDtype::Auto),
        (Dtype::Bf16, KvCacheDtype::Fp8),
    ] {
        if dtype == Dtype::F32 && device != sluice_worker::engine::DeviceKind::Cpu {
            continue; // the GPU path is bf16 or fp8
        }
        let t = std::time::Instant::now();
        let (err, agree, tokens) = accuracy_on(&mut engine(&EngineConfig { dtype, kv_cache_dtype, ..cfg.clone() }), &cases);
        let vs_bf16 = if dtype == Dtype::Bf16 && kv_cache_dtype == KvCacheDtype::Auto {
            bf16_tokens = tokens;
            1.0
        } else {
            agreement(&tokens, &bf16_tokens)
        };
        eprintln!(
            "{} {dtype:?}, KV cache {kv_cache_dtype:?}: worst relative logits error vs transformers f32 {err:.2e}, greedy agreement with it {agree:.3}, with the bf16 engine {vs_bf16:.3} ({:.0} s)",
            dir.display(),
            t.elapsed().as_secs_f64()
        );
        if kv_cache_dtype == KvCacheDtype::Fp8 {
            kv_err = Some(err);
        } else {
            rows.push((dtype, err));
        }
    }
    let err = |d: Dtype| rows.iter().find(|(x, _)| *x == d).map(|(_, e)| *e).unwrap();
    if device == sluice_worker::engine::DeviceKind::Cpu {
        assert!(err(Dtype::F32) < 1e-3, "the f32 engine itself is off ({})", err(Dtype::F32));
    }
    assert!(err(Dtype::Fp8) > err(Dtype::Bf16) / 4.0, "fp8 changed nothing");
    assert!(err(Dtype::Fp8) <= 12.0 * err(Dtype::Bf16).max(1e-3), "fp8 {} more than 12x bf16's {}", err(Dtype::Fp8), err(Dtype::Bf16));
    let kv_err = kv_err.unwrap();
    assert!(kv_err <= 12.0 * err(Dtype::Bf16).max(1e-3), "fp8 KV cache {kv_err} more than 12x bf16's {}", err(Dtype::Bf16));
}

/// Writes a copy of the tiny model whose projections are E4M3 with `scale(w)` scales (per
/// channel `[out, 1]`, or per tensor `[]`); `drop` leaves one scale out.
fn fp8_checkpoint(per_channel: bool, drop: Option<&str>) -> tempfile::TempDir {
    let src = model_dir("tiny-qwen2");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in tensors {
        let projection = name.ends_with("proj.weight");
        if !projection {
            out.insert(name, t);
            continue;
        }
        let w = t.to_dtype(DType::F32).unwrap();
        let amax = if per_channel { w.abs().unwrap().max_keepdim(1).unwrap() } else { w.abs().unwrap().max_all().unwrap() };
        let s = (amax.maximum(1e-12f32).unwrap() / 448.0).unwrap();
        let q = w.broadcast_div(&s).unwrap().clamp(-448f32, 448f32).unwrap().to_dtype(DType::F8E4M3).unwrap();
        if drop != Some(name.as_str()) {
            out.insert(format!("{name}_scale"), s);
        }
        out.insert(name, q);
    }
    candle_core::safetensors::save(&out, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn fp8_checkpoints_load_with_their_scales() {
    let cases = reference("tiny-qwen2");
    let batch: Vec<_> = cases.iter().map(|c| (c.prompt_ids.clone(), c.greedy_ids[..2].to_vec())).collect();
    // Per channel: requantizing the dequantized weights reproduces them, so the fp8 engine on
    // the checkpoint equals the fp8 engine on the bf16 original.
    let ckpt = fp8_checkpoint(true, None);
    let on_original = engine(&fp8_config("tiny-qwen2")).teacher_forced_logits(&batch).unwrap();
    let cfg = EngineConfig { model_dir: ckpt.path().to_path_buf(), ..fp8_config("tiny-qwen2") };
    let on_checkpoint = engine(&cfg).teacher_forced_logits(&batch).unwrap();
    for (a, b) in on_checkpoint.iter().flatten().zip(on_original.iter().flatten()) {
        assert!(rel_err(a, b) < 1e-5, "{}", rel_err(a, b));
    }
    // Per tensor, loaded in f32: the dequantized weights, close to the original model.
    let ckpt = fp8_checkpoint(false, None);
    let cfg = EngineConfig { model_dir: ckpt.path().to_path_buf(), ..config("tiny-qwen2") };
    let logits = engine(&cfg).teacher_forced_logits(&batch).unwrap();
    let worst = logits.iter().zip(&cases).flat_map(|(l, c)| l.iter().zip(&c.logits).map(|(a, b)| rel_err(a, b))).fold(0f32, f32::max);
    assert!(worst > 0.0 && worst < CPU_FP8_TOL, "per-tensor checkpoint in f32: {worst}");
}

#[test]
fn fp8_checkpoints_it_cannot_read_fail_naming_the_tensor() {
    let missing = "model.layers.0.mlp.down_proj.weight";
    let ckpt = fp8_checkpoint(true, Some(missing));
    let cfg = EngineConfig { model_dir: ckpt.path().to_path_buf(), ..config("tiny-qwen2") };
    let err = LlmEngine::load(&cfg).err().expect("a checkpoint without a scale must not load").to_string();
    assert!(err.contains(missing) && err.contains("_scale"), "{err}");

    // Block-wise scales (`weight_scale_inv`) are refused with what to use instead.
    let dir = fp8_checkpoint(true, None);
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.insert("model.layers.0.mlp.up_proj.weight_scale_inv".into(), Tensor::ones((2, 1), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let cfg = EngineConfig { model_dir: dir.path().to_path_buf(), ..config("tiny-qwen2") };
    let err = LlmEngine::load(&cfg).err().expect("block scales must not load").to_string();
    assert!(err.contains("weight_scale_inv") && err.contains("block-wise"), "{err}");
    assert_eq!("FP8".parse::<Dtype>(), Ok(Dtype::Fp8));
    assert!("fp4".parse::<Dtype>().unwrap_err().contains("fp8"));
}

/// The FP8 tensor-core path against the emulated one and the reference (needs a GPU).
#[cfg(feature = "cuda")]
#[test]
fn cuda_fp8_matches_the_emulated_rounding() {
    use sluice_worker::engine::DeviceKind;
    use sluice_worker::engine::cuda_ops::{fp8_linear, fp8_linear_deferred, quantize_rows_e4m3};
    use sluice_worker::engine::fp8::{Fp8Mode, fake_quant_rows};
    if !cuda_requested() {
        return;
    }
    let dev = Device::new_cuda(0).unwrap();
    // One projection: the GEMM against the f32 product of the emulated operands.
    for (m, n, k) in [(1usize, 64usize, 64usize), (37, 256, 512), (300, 352, 176), (1024, 4096, 4096)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let (q, s) = quantize_rows_e4m3(&w).unwrap();
        let Fp8Mode::Cuda(gemm) = Fp8Mode::for_device(&dev).unwrap() else { panic!("not CUDA") };
        let y = fp8_linear(&x, &q, &s, &gemm).unwrap().to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
        // The deferred form (unit-scale GEMM, scales owed to the consumer) once its scales are
        // applied: the fallback's rounding, so equal to `fp8_linear` where cuBLASLt refuses
        // outer-vector scales, within the GEMM's rounding where it does not.
        let owed = fp8_linear_deferred(&x, &q, &s, &gemm).unwrap();
        assert!(owed.scales.is_some(), "the deferred GEMM owes its scales");
        let yd = owed.finish().unwrap().to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
        let (yv, ydv) = (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), yd.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let derr = rel_err(&ydv, &yv);
        eprintln!("fp8 GEMM m={m} n={n} k={k}: deferred scaling vs fp8_linear rel err {derr:.2e}");
        assert!(derr < 1e-2, "m={m} n={n} k={k}: deferred {derr}");
        let wq = fake_quant_rows(&w.to_device(&Device::Cpu).unwrap()).unwrap();
        let xq = fake_quant_rows(&x.to_device(&Device::Cpu).unwrap()).unwrap();
        let want = xq.matmul(&wq.t().unwrap()).unwrap();
        let (y, want) = (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let err = rel_err(&y, &want);
        eprintln!("fp8 GEMM m={m} n={n} k={k}: rel err vs emulation {err:.2e}");
        assert!(err < 2e-2, "m={m} n={n} k={k}: {err}");
    }
    // The engine: fp8 on the GPU against the emulated fp8 engine and the f32 reference.
    for name in MODELS {
        let gpu = EngineConfig { device: DeviceKind::Cuda(0), ..fp8_config(name) };
        let (err, agree) = accuracy(&mut engine(&gpu), name);
        let (cpu_err, cpu_agree) = accuracy(&mut engine(&fp8_config(name)), name);
        eprintln!("{name}: GPU fp8 rel err {err:.4} (greedy agreement {agree:.3}); CPU fp8 {cpu_err:.4} ({cpu_agree:.3})");
        assert!(err <= CPU_FP8_TOL + 0.05, "{name}: GPU fp8 rel err {err}");
    }
}

/// The FP8 KV cache on the GPU (the E4M3 epilogue and the E4M3 attention kernels, which every
/// token then takes one per block, prefill tokens included: the tiny models' head_dim 16 runs the
/// CUDA-core kernel; engine_cuda_kernels covers the tensor-core one) against the emulated cache
/// on the CPU, the f32 reference, and the GPU engine with a bf16 cache.
#[cfg(feature = "cuda")]
#[test]
fn cuda_fp8_kv_cache_matches_the_emulated_rounding() {
    use sluice_worker::engine::DeviceKind;
    if !cuda_requested() {
        return;
    }
    for name in MODELS {
        let gpu = EngineConfig { device: DeviceKind::Cuda(0), ..config(name) };
        let (bf16_err, _, bf16_tokens) = accuracy_on(&mut engine(&gpu), &reference(name));
        let kv = EngineConfig { kv_cache_dtype: KvCacheDtype::Fp8, ..gpu.clone() };
        let mut kv_engine = engine(&kv);
        assert_eq!(kv_engine.kv_cache_dtype(), DType::F8E4M3);
        let (err, agree, tokens) = accuracy_on(&mut kv_engine, &reference(name));
        let cpu = EngineConfig { dtype: Dtype::Bf16, kv_cache_dtype: KvCacheDtype::Fp8, ..config(name) };
        let (cpu_err, cpu_agree) = accuracy(&mut engine(&cpu), name);
        eprintln!(
            "{name}: GPU fp8 KV cache rel err {err:.4} (greedy agreement {agree:.3}, with the GPU bf16 cache {:.3}); GPU bf16 cache {bf16_err:.4}; CPU bf16 + fp8 KV cache {cpu_err:.4} ({cpu_agree:.3})",
            agreement(&tokens, &bf16_tokens)
        );
        assert!(err <= CPU_FP8_TOL + 0.05, "{name}: GPU fp8 KV cache rel err {err}");
        assert!(err >= bf16_err / 4.0, "{name}: the fp8 KV cache changed nothing? ({err} vs {bf16_err})");
    }
}
