//! `sluice-kernel-bench`: times the engine's paged attention kernels alone on the GPU at a
//! model's attention shape, for a decode step (one query per sequence over its whole context)
//! and for prefill (every position of whole prompts, through the chunked kernel), on a bf16 and
//! an E4M3 cache. Prints one table row per case: µs per call, KV bytes read per second (decode)
//! and attention TFLOP/s (prefill). Needs the `cuda` feature and a GPU.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use rand::{Rng, SeedableRng};
use sluice_worker::engine::cuda_ops::{Prefill, paged_attention, prefill_chunk_tokens, query_chunks};

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
}

struct Case {
    /// Per query: (sequence, context length).
    queries: Vec<(usize, usize)>,
    lens: Vec<usize>,
    prefill: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::new_cuda(0).context("CUDA device 0")?;
    let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(7);
    let decode_lens: Vec<usize> =
        (0..args.decode_seqs).map(|_| rng.random_range(args.decode_ctx / 2..=args.decode_ctx * 3 / 2).max(1)).collect();
    let decode = Case { queries: decode_lens.iter().copied().enumerate().collect(), lens: decode_lens, prefill: false };
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
    let q = Tensor::randn(0f32, 1.0, (n, nh, hd), dev)?.to_dtype(DType::BF16)?;
    // candle casts to F8E4M3 on the CPU only: an E4M3 cache is made there and copied over.
    let cache = || -> Result<Tensor> {
        Ok(if kv == DType::BF16 {
            Tensor::randn(0f32, 1.0, (slots, nkv * hd), dev)?.to_dtype(kv)?
        } else {
            Tensor::randn(0f32, 1.0, (slots, nkv * hd), &Device::Cpu)?.to_dtype(kv)?.to_device(dev)?
        })
    };
    let (kc, vc) = (cache()?, cache()?);
    let rows: Vec<u32> = case.queries.iter().map(|&(s, _)| s as u32).collect();
    let ctx: Vec<u32> = case.queries.iter().map(|&(_, c)| c as u32).collect();
    let tables_t = Tensor::from_slice(&tables, (b, max_blocks), dev)?;
    let rows_t = Tensor::from_slice(&rows, n, dev)?;
    let ctx_t = Tensor::from_slice(&ctx, n, dev)?;
    let items = if case.prefill {
        let v = query_chunks(&rows, &ctx, 0, prefill_chunk_tokens(nh, nkv));
        Some(Tensor::from_slice(&v, v.len(), dev)?)
    } else {
        None
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let call = || -> Result<Tensor> {
        let prefill = items.as_ref().map(|items| Prefill { items, first: 0 });
        Ok(paged_attention(&q, &kc, &vc, &tables_t, &rows_t, &ctx_t, nkv, bs, scale, true, false, prefill)?)
    };
    for _ in 0..2 {
        call()?;
    }
    dev.synchronize()?;
    let start = Instant::now();
    for _ in 0..args.iters {
        call()?;
    }
    dev.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1e6 / args.iters as f64)
}
