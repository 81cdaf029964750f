//! `sluice-kernel-bench`: times the engine's paged attention kernels alone on the GPU at a
//! model's attention shape, for a decode step (one query per sequence over its whole context)
//! and for prefill (every position of whole prompts, through the chunked kernel), on a bf16 and
//! an E4M3 cache. Prints one table row per case: µs per call, KV bytes read per second (decode)
//! and attention TFLOP/s (prefill). Needs the `cuda` feature and a GPU.
//!
//! `--overlap` instead probes whether decode attention and the layer's projections overlap on
//! two CUDA streams (the question before splitting a step into two nano-batches): per layer, the
//! decode case's attention and projections as one batch on one stream, as two halves on one
//! stream, and as two halves on two streams (each half's attention beside the other's GEMMs).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::Linear;
use clap::Parser;
use rand::{Rng, SeedableRng};
use sluice_worker::engine::cuda_ops::{Prefill, paged_attention, prefill_chunk_tokens, quantize_rows_e4m3, query_chunks};
use sluice_worker::engine::device::make_device;
use sluice_worker::engine::fp8::{Fp8Mode, Proj};
use sluice_worker::engine::{DeviceKind, EngineSwitches};

/// Attention kernel microbenchmark (one table on stdout).
#[derive(Debug, Parser)]
#[command(name = "sluice-kernel-bench")]
struct Args {
    /// Query heads (Llama-3.1-8B: 32).
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Sequences of the decode case.
    #[arg(long, default_value_t = 256)]
    decode_seqs: usize,
    /// Mean context of the decode case (each sequence's is uniform in [ctx/2, 3ctx/2]).
    #[arg(long, default_value_t = 1250)]
    decode_ctx: usize,
    /// Prompts of the prefill case, each `--prefill-len` tokens, attended causally.
    #[arg(long, default_value_t = 16)]
    prefill_seqs: usize,
    #[arg(long, default_value_t = 1000)]
    prefill_len: usize,
    /// Timed calls per case (after two warm-up calls).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Cache element types to run: bf16, fp8 or both.
    #[arg(long, default_value = "both")]
    kv: String,
    /// Label printed in the table's first column (e.g. the kernel variant under test).
    #[arg(long, default_value = "")]
    label: String,
    /// Run the two-stream overlap probe over the decode case instead of the kernel table.
    #[arg(long)]
    overlap: bool,
    /// Overlap probe: the projections' weights, bf16 or fp8 (E4M3, per-channel scales).
    #[arg(long, default_value = "bf16")]
    weights: String,
    /// Overlap probe: the model's hidden and MLP widths (Llama-3.1-8B: 4096, 14336).
    #[arg(long, default_value_t = 4096)]
    hidden: usize,
    #[arg(long, default_value_t = 14336)]
    intermediate: usize,
    /// Overlap probe: rows the projections take beyond the decode sequences' (the prefill
    /// tokens of a mixed step), split evenly between the halves.
    #[arg(long, default_value_t = 0)]
    extra_rows: usize,
    /// Overlap probe: layers per timed step (the streams join only at its end).
    #[arg(long, default_value_t = 32)]
    layers: usize,
}

struct Case {
    /// Per query: (sequence, context length).
    queries: Vec<(usize, usize)>,
    lens: Vec<usize>,
    prefill: bool,
}

impl Case {
    /// One query per sequence over its whole context.
    fn decode(lens: &[usize]) -> Self {
        Self { queries: lens.iter().copied().enumerate().collect(), lens: lens.to_vec(), prefill: false }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::new_cuda(0).context("CUDA device 0")?;
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(7);
    let decode_lens: Vec<usize> =
        (0..args.decode_seqs).map(|_| rng.random_range(args.decode_ctx / 2..=args.decode_ctx * 3 / 2).max(1)).collect();
    if args.overlap {
        return overlap(&args, &decode_lens, &mut rng);
    }
    let decode = Case::decode(&decode_lens);
    let prefill_lens = vec![args.prefill_len; args.prefill_seqs];
    let prefill = Case {
        queries: (0..args.prefill_seqs).flat_map(|s| (1..=args.prefill_len).map(move |c| (s, c))).collect(),
        lens: prefill_lens,
        prefill: true,
    };
    let kvs: Vec<DType> = match args.kv.as_str() {
        "bf16" => vec![DType::BF16],
        "fp8" => vec![DType::F8E4M3],
        _ => vec![DType::BF16, DType::F8E4M3],
    };
    println!("| variant | case | cache | queries | µs per call | KV GB/s | TFLOP/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for case in [&decode, &prefill] {
        for &kv in &kvs {
            let us = time_case(&args, &dev, case, kv, &mut rng)?;
            let keys: usize = case.queries.iter().map(|&(_, c)| c).sum();
            let elem = if kv == DType::BF16 { 2 } else { 1 };
            let bytes = if case.prefill {
                case.lens.iter().sum::<usize>() * args.kv_heads * args.head_dim * 2 * elem
            } else {
                keys * args.kv_heads * args.head_dim * 2 * elem
            };
            let flops = 4.0 * keys as f64 * (args.heads * args.head_dim) as f64;
            println!(
                "| {} | {} | {} | {} | {us:.1} | {:.0} | {:.1} |",
                args.label,
                if case.prefill { "prefill" } else { "decode" },
                if kv == DType::BF16 { "bf16" } else { "e4m3" },
                case.queries.len(),
                bytes as f64 / us / 1e3,
                flops / us / 1e6,
            );
        }
    }
    Ok(())
}

fn time_case(args: &Args, dev: &Device, case: &Case, kv: DType, rng: &mut rand_chacha::ChaCha12Rng) -> Result<f64> {
    let attn = Attn::new(args, dev, case, kv, rng)?;
    time_us(&[dev], args.iters, || attn.call())
}

/// Mean µs per call of `f` (after two warm-up calls), every device synchronized before the
/// clock starts and before it stops.
fn time_us(devs: &[&Device], iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    for d in devs {
        d.synchronize()?;
    }
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    for d in devs {
        d.synchronize()?;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / iters.max(1) as f64)
}

/// The inputs of one paged attention call over `case` on `dev`: random queries and caches,
/// block tables over shuffled blocks.
struct Attn {
    q: Tensor,
    kc: Tensor,
    vc: Tensor,
    tables: Tensor,
    rows: Tensor,
    ctx: Tensor,
    items: Option<Tensor>,
    kv_heads: usize,
    block_size: usize,
    scale: f32,
}

impl Attn {
    fn new(args: &Args, dev: &Device, case: &Case, kv: DType, rng: &mut rand_chacha::ChaCha12Rng) -> Result<Self> {
        let (nh, nkv, hd, bs) = (args.heads, args.kv_heads, args.head_dim, args.block_size);
        let b = case.lens.len();
        let max_blocks = case.lens.iter().map(|l| l.div_ceil(bs)).max().unwrap_or(1);
        let num_blocks = b * max_blocks + 1;
        let mut perm: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.random_range(0..=i));
        }
        let mut tables = vec![0u32; b * max_blocks];
        for (s, &l) in case.lens.iter().enumerate() {
            for j in 0..l.div_ceil(bs) {
                tables[s * max_blocks + j] = perm[s * max_blocks + j];
            }
        }
        let n = case.queries.len();
        let slots = num_blocks * bs;
        // candle casts to F8E4M3 on the CPU only (seconds per cache at these sizes): an E4M3
        // cache is the engine's per-row quantization of random bf16 rows, on the GPU.
        let cache = || -> Result<Tensor> {
            let x = Tensor::randn(0f32, 1.0, (slots, nkv * hd), dev)?.to_dtype(DType::BF16)?;
            Ok(if kv == DType::BF16 { x } else { quantize_rows_e4m3(&x)?.0 })
        };
        let rows: Vec<u32> = case.queries.iter().map(|&(s, _)| s as u32).collect();
        let ctx: Vec<u32> = case.queries.iter().map(|&(_, c)| c as u32).collect();
        let items = if case.prefill {
            let v = query_chunks(&rows, &ctx, 0, prefill_chunk_tokens(nh, nkv));
            Some(Tensor::from_slice(&v, v.len(), dev)?)
        } else {
            None
        };
        Ok(Self {
            q: Tensor::randn(0f32, 1.0, (n, nh, hd), dev)?.to_dtype(DType::BF16)?,
            kc: cache()?,
            vc: cache()?,
            tables: Tensor::from_slice(&tables, (b, max_blocks), dev)?,
            rows: Tensor::from_slice(&rows, n, dev)?,
            ctx: Tensor::from_slice(&ctx, n, dev)?,
            items,
            kv_heads: nkv,
            block_size: bs,
            scale: 1.0 / (hd as f32).sqrt(),
        })
    }

    /// Enqueues the attention (the tensor-core kernels, as the engine runs them).
    fn call(&self) -> Result<()> {
        let prefill = self.items.as_ref().map(|items| Prefill { items, first: 0 });
        paged_attention(
            &self.q,
            &self.kc,
            &self.vc,
            &self.tables,
            &self.rows,
            &self.ctx,
            self.kv_heads,
            self.block_size,
            self.scale,
            true,
            false,
            prefill,
        )?;
        Ok(())
    }
}

/// One decoder layer's four projections (QKV, o, gate/up with SiLU·mul, down) with random
/// weights on one device, and inputs of `rows` rows for them.
struct Projections {
    qkv: Proj,
    o: Proj,
    gate_up: Proj,
    down: Proj,
    x: Tensor,
    attn_out: Tensor,
}

impl Projections {
    fn new(args: &Args, dev: &Device, rows: usize, fp8: Option<&Fp8Mode>) -> Result<Self> {
        let (h, i, q, kv) = (args.hidden, args.intermediate, args.heads * args.head_dim, args.kv_heads * args.head_dim);
        let proj = |out: usize, inp: usize| -> Result<Proj> {
            let w = (Tensor::randn(0f32, 1.0, (out, inp), dev)? * 0.02)?.to_dtype(DType::BF16)?;
            Ok(Proj::new(Linear::new(w, None), fp8)?)
        };
        Ok(Self {
            qkv: proj(q + 2 * kv, h)?,
            o: proj(h, q)?,
            gate_up: proj(2 * i, h)?,
            down: proj(h, i)?,
            x: Tensor::randn(0f32, 1.0, (rows, h), dev)?.to_dtype(DType::BF16)?,
            attn_out: Tensor::randn(0f32, 1.0, (rows, q), dev)?.to_dtype(DType::BF16)?,
        })
    }

    /// Enqueues the four GEMMs as the engine runs them (FP8 scales left to their consumers).
    fn call(&self) -> Result<()> {
        self.qkv.forward_deferred(&self.x, false, None)?;
        self.o.forward_deferred(&self.attn_out, false, None)?;
        let mlp = self.gate_up.forward_silu_mul(&self.x, false, None)?;
        self.down.forward_deferred(&mlp, false, None)?;
        Ok(())
    }
}

/// `--overlap`: one table of µs per layer (mean over `--layers`-layer steps).
fn overlap(args: &Args, lens: &[usize], rng: &mut rand_chacha::ChaCha12Rng) -> Result<()> {
    let kv = match args.kv.as_str() {
        "fp8" => DType::F8E4M3,
        _ => DType::BF16,
    };
    // Two devices over the same GPU as the engine makes them, each with its own stream (and
    // cuBLAS handle, and FP8 workspace) and without cudarc's event tracking: tensors of one are
    // only ever used on its stream.
    let make = || make_device(DeviceKind::Cuda(0), &EngineSwitches::default());
    let (da, db) = (make().context("CUDA stream A")?, make().context("CUDA stream B")?);
    let fp8 = |d: &Device| -> Result<Option<Fp8Mode>> {
        Ok(match args.weights.as_str() {
            "fp8" => Some(Fp8Mode::for_device(d)?),
            "bf16" => None,
            w => anyhow::bail!("--weights {w}: expected bf16 or fp8"),
        })
    };
    let (fa, fb) = (fp8(&da)?, fp8(&db)?);
    let half = lens.len() / 2;
    let rows = lens.len() + args.extra_rows;
    let (rows_a, rows_b) = (half + args.extra_rows / 2, rows - half - args.extra_rows / 2);
    let full_attn = Attn::new(args, &da, &Case::decode(lens), kv, rng)?;
    let full_proj = Projections::new(args, &da, rows, fa.as_ref())?;
    let a_attn = Attn::new(args, &da, &Case::decode(&lens[..half]), kv, rng)?;
    let a_proj = Projections::new(args, &da, rows_a, fa.as_ref())?;
    let b_attn_on_a = Attn::new(args, &da, &Case::decode(&lens[half..]), kv, rng)?;
    let b_proj_on_a = Projections::new(args, &da, rows_b, fa.as_ref())?;
    let b_attn = Attn::new(args, &db, &Case::decode(&lens[half..]), kv, rng)?;
    let b_proj = Projections::new(args, &db, rows_b, fb.as_ref())?;
    let layers = args.layers.max(1);
    let per_layer = |us: f64| us / layers as f64;
    let step = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        time_us(&[&da, &db], args.iters, || {
            for _ in 0..layers {
                f()?;
            }
            Ok(())
        })
        .map(per_layer)
    };
    let attn = step(&|| full_attn.call())?;
    let proj = step(&|| full_proj.call())?;
    let one_batch = step(&|| {
        full_attn.call()?;
        full_proj.call()
    })?;
    let halves_one_stream = step(&|| {
        a_attn.call()?;
        a_proj.call()?;
        b_attn_on_a.call()?;
        b_proj_on_a.call()
    })?;
    // Stream A runs its half's attention then GEMMs; stream B its GEMMs then attention, so each
    // attention is enqueued beside the other half's GEMMs.
    let halves_two_streams = step(&|| {
        a_attn.call()?;
        b_proj.call()?;
        a_proj.call()?;
        b_attn.call()
    })?;
    println!(
        "| {} | decode {} seqs, ctx ~{}, {} cache; projections {} rows, {} weights; {layers} layers | µs per layer |",
        args.label,
        lens.len(),
        args.decode_ctx,
        if kv == DType::BF16 { "bf16" } else { "e4m3" },
        rows,
        args.weights
    );
    println!("| --- | --- | --- |");
    for (what, us) in [
        ("attention alone, one batch", attn),
        ("projections alone, one batch", proj),
        ("attention + projections, one batch, one stream (the engine now)", one_batch),
        ("two halves, one stream", halves_one_stream),
        ("two halves, two streams", halves_two_streams),
    ] {
        println!("| {} | {what} | {us:.1} |", args.label);
    }
    println!(
        "| {} | two streams vs the engine now: {:.3}x; bound if all overlapped: {:.3}x |",
        args.label,
        one_batch / halves_two_streams,
        one_batch / attn.max(proj)
    );
    Ok(())
}
