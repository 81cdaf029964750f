//! `sluice-bench`: offline throughput benchmark of the real engine and scheduler. Builds a model
//! of a named architecture with random weights (or loads a model directory), runs N requests of
//! random token ids with EOS ignored and a fixed output length, and prints one JSON line.
//!
//! The request generator is splitmix64 seeded with `--seed`, mirrored exactly by
//! `scripts/bench_transformers.py`, so both programs run the same token ids and lengths.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde_json::json;
use sluice_api::job::{Dtype, KvCacheDtype};
use sluice_worker::engine::{ArchConfig, DeviceKind, EngineConfig, EngineSwitches, GenerationRequest, LlmEngine, Prompt, SamplingParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// `--requests` requests of exactly `--input-len` prompt and `--output-len` output tokens.
    Fixed,
    /// nano-vllm's benchmark: 256 sequences, input and output lengths uniform in 100..=1024.
    NanoVllm,
    /// `--requests` requests whose prompts start with the same `--shared-len` tokens (a system
    /// prompt) followed by `--input-len` tokens of their own; `--output-len` out.
    SharedPrefix,
}

/// Offline throughput benchmark of the sluice engine (one JSON line on stdout).
#[derive(Debug, Parser)]
#[command(name = "sluice-bench")]
struct Args {
    /// Built-in architecture with random weights: qwen2.5-0.5b, llama-3.2-1b, llama-3.1-8b,
    /// qwen2.5-7b, mistral-7b, tiny-qwen2.
    #[arg(long, default_value = "qwen2.5-0.5b", conflicts_with = "model_dir")]
    model: String,
    /// Hub-layout model directory to load instead of a random-weight preset.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "fixed")]
    workload: Workload,
    #[arg(long, default_value_t = 256)]
    requests: usize,
    #[arg(long, default_value_t = 512)]
    input_len: usize,
    #[arg(long, default_value_t = 512)]
    output_len: usize,
    /// Prompt tokens every request shares (`--workload shared-prefix`).
    #[arg(long, default_value_t = 1024)]
    shared_len: usize,
    /// Share the KV blocks of identical prompt prefixes (`on`/`off`).
    #[arg(long, default_value = "on", value_parser = parse_switch, action = clap::ArgAction::Set)]
    prefix_caching: bool,
    /// `cpu`, `cuda` or `cuda:N`; default cuda when built with the `cuda` feature.
    #[arg(long)]
    device: Option<String>,
    /// f32, f16, bf16, fp8 (E4M3 projections); default bf16 on CUDA, f32 on CPU.
    #[arg(long, default_value = "auto", value_parser = Dtype::from_str)]
    dtype: Dtype,
    /// KV cache elements: auto (the activation dtype) or fp8 (E4M3, half of bf16's bytes).
    #[arg(long, default_value = "auto", value_parser = KvCacheDtype::from_str)]
    kv_cache_dtype: KvCacheDtype,
    #[arg(long, default_value_t = 1024)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 16384)]
    max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 0.90)]
    gpu_memory_utilization: f32,
    /// KV cache size in bytes (overrides the GPU fraction; the CPU default is 256 MiB).
    #[arg(long)]
    kv_cache_bytes: Option<u64>,
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Sampling temperature (0 = greedy, the default).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Requests of 16 in / 8 out run before timing (module loads, cuBLAS handles).
    #[arg(long, default_value_t = 8)]
    warmup_requests: usize,
}

fn parse_switch(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

/// splitmix64, the generator `scripts/bench_transformers.py` mirrors.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (modulo bias is irrelevant here).
    fn uniform(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
}

/// `(prompt token ids, output length)` of every request.
fn workload(args: &Args, vocab: usize) -> Vec<(Vec<u32>, usize)> {
    let mut rng = SplitMix64(args.seed);
    let id_range = vocab.min(10_000) as u64;
    let ids = |n: usize, rng: &mut SplitMix64| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % id_range) as u32).collect() };
    match args.workload {
        Workload::Fixed => (0..args.requests).map(|_| (ids(args.input_len, &mut rng), args.output_len)).collect(),
        Workload::NanoVllm => (0..256)
            .map(|_| {
                let (inp, out) = (rng.uniform(100, 1024), rng.uniform(100, 1024));
                (ids(inp, &mut rng), out)
            })
            .collect(),
        Workload::SharedPrefix => {
            let shared = ids(args.shared_len, &mut rng);
            (0..args.requests)
                .map(|_| {
                    let mut p = shared.clone();
                    p.extend(ids(args.input_len, &mut rng));
                    (p, args.output_len)
                })
                .collect()
        }
    }
}

fn request(id: u64, ids: Vec<u32>, out: usize, temperature: f32) -> GenerationRequest {
    GenerationRequest {
        id,
        prompt: Prompt::Tokens(ids),
        params: SamplingParams { max_tokens: out, temperature, seed: id, ignore_eos: true, ..SamplingParams::default() },
    }
}

fn parse_device(s: Option<&str>) -> anyhow::Result<DeviceKind> {
    let s = match s {
        Some(s) => s,
        None if cfg!(feature = "cuda") => "cuda",
        None => "cpu",
    };
    match s {
        "cpu" => Ok(DeviceKind::Cpu),
        "cuda" => Ok(DeviceKind::Cuda(0)),
        other => match other.strip_prefix("cuda:") {
            Some(n) => Ok(DeviceKind::Cuda(n.parse().with_context(|| format!("--device {other}"))?)),
            None => bail!("--device {other}: expected cpu, cuda or cuda:N"),
        },
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// Nearest-rank percentile of `v` (sorted in place).
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn main() -> anyhow::Result<()> {
    sluice_api::tls::install_crypto_provider();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if args.workload != Workload::NanoVllm && args.requests == 0 {
        bail!("--requests must be positive");
    }
    if args.workload == Workload::Fixed && args.input_len == 0 {
        bail!("--input-len must be positive");
    }
    if args.workload == Workload::SharedPrefix && args.shared_len + args.input_len == 0 {
        bail!("--shared-len and --input-len must not both be 0");
    }
    if args.output_len == 0 {
        bail!("--output-len must be positive");
    }
    let cfg = EngineConfig {
        model_dir: args.model_dir.clone().unwrap_or_default(),
        device: parse_device(args.device.as_deref())?,
        dtype: args.dtype,
        kv_cache_dtype: args.kv_cache_dtype,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        block_size: args.block_size,
        gpu_memory_utilization: args.gpu_memory_utilization,
        num_kv_blocks: None,
        kv_cache_bytes: args.kv_cache_bytes,
        max_model_len: args.max_model_len,
        overlap_steps: true,
        prefix_caching: args.prefix_caching,
        switches: EngineSwitches::from_env(),
    };
    let mut engine = match &args.model_dir {
        Some(dir) => LlmEngine::load(&cfg).with_context(|| format!("loading {}", dir.display()))?,
        None => {
            let arch = ArchConfig::preset(&args.model)
                .with_context(|| format!("--model {}: unknown preset ({})", args.model, ArchConfig::PRESETS.join(", ")))?;
            LlmEngine::random(arch, None, &cfg).context("building the random-weight model")?
        }
    };
    let work = workload(&args, engine.arch().vocab_size);
    let longest = work.iter().map(|(p, o)| p.len() + o).max().unwrap_or(0);
    if longest > engine.max_model_len() {
        bail!("requests of {longest} tokens exceed the engine's max_model_len {}", engine.max_model_len());
    }

    if args.warmup_requests > 0 {
        let warm: Vec<_> = (0..args.warmup_requests)
            .map(|i| {
                let ids = (0..16).map(|t| ((i * 31 + t * 7) % 1000) as u32).collect();
                request(u64::MAX - i as u64, ids, 8, args.temperature)
            })
            .collect();
        for (id, r) in engine.generate(warm).context("warm-up")? {
            r.with_context(|| format!("warm-up request {id}"))?;
        }
    }
    engine.profile_reset();
    let before = engine.stats();

    let n = work.len();
    let requests: Vec<_> = work.into_iter().enumerate().map(|(i, (ids, out))| request(i as u64, ids, out, args.temperature)).collect();
    let start = Instant::now();
    let results = engine.generate(requests).context("benchmark run")?;
    let wall = start.elapsed().as_secs_f64();
    let after = engine.stats();

    let mut prompt_tokens = 0usize;
    let mut output_tokens = 0usize;
    let mut ttft = Vec::with_capacity(n);
    let mut tpot = Vec::with_capacity(n);
    for (id, r) in results {
        let o = r.with_context(|| format!("request {id}"))?;
        prompt_tokens += o.prompt_tokens;
        output_tokens += o.completion_tokens;
        ttft.push(o.ttft.as_secs_f64() * 1e3);
        if o.completion_tokens > 1 {
            let decode = o.total.saturating_sub(o.ttft).as_secs_f64() * 1e3;
            tpot.push(decode / (o.completion_tokens - 1) as f64);
        }
    }
    let (input_len, output_len) = match args.workload {
        Workload::Fixed => (json!(args.input_len), json!(args.output_len)),
        Workload::NanoVllm => (json!("100-1024"), json!("100-1024")),
        Workload::SharedPrefix => (json!(format!("{}+{}", args.shared_len, args.input_len)), json!(args.output_len)),
    };
    let queried = after.prefix_cache_query_tokens - before.prefix_cache_query_tokens;
    let hit = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens;
    let line = json!({
        "device": engine.device_label(),
        "dtype": engine.dtype_label(),
        "kv_cache_dtype": format!("{:?}", engine.kv_cache_dtype()).to_lowercase(),
        "model": engine.model_name(),
        "requests": n,
        "input_len": input_len,
        "output_len": output_len,
        "wall_s": wall,
        "requests_per_s": n as f64 / wall,
        "output_tokens_per_s": output_tokens as f64 / wall,
        "total_tokens_per_s": (prompt_tokens + output_tokens) as f64 / wall,
        "tpot_mean_ms": mean(&tpot),
        "tpot_p99_ms": percentile(&mut tpot, 99.0),
        "ttft_mean_ms": mean(&ttft),
        "peak_kv_blocks": after.peak_kv_blocks,
        "prefix_caching": args.prefix_caching,
        "prefix_cache_hit_rate": if queried == 0 { 0.0 } else { hit as f64 / queried as f64 },
        "preemptions": after.preemptions - before.preemptions,
        "steps": after.steps - before.steps,
        "graph_steps": after.graph_steps - before.graph_steps,
        "split_steps": after.split_steps - before.split_steps,
    });
    eprintln!(
        "sluice-bench: {} steps ({} as CUDA graphs, {} as two halves), {} preemptions, {} KV blocks of {} tokens, {:.3} ms/step",
        after.steps - before.steps,
        after.graph_steps - before.graph_steps,
        after.split_steps - before.split_steps,
        after.preemptions - before.preemptions,
        after.kv_blocks_total,
        after.block_size,
        wall * 1e3 / (after.steps - before.steps).max(1) as f64
    );
    if let Some(report) = engine.profile_report() {
        eprintln!("{report}");
    }
    println!("{line}");
    Ok(())
}
