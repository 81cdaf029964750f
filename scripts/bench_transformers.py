#!/usr/bin/env python3
"""Hugging Face transformers `generate` baseline for `sluice-bench` (same JSON fields).

Builds the same architecture with random bf16 weights (no download), runs the same requests
(the splitmix64 generator of worker/src/bin/sluice-bench.rs: same token ids and lengths for
the same --seed), greedy, EOS ignored, a fixed output length, and sweeps the batch size.
Each batch is timed with the GPU synchronised; TTFT is the time of a 1-token generate over the
same batch (prefill), TPOT = (batch time - TTFT) / (output_len - 1). The printed line is the
best batch size's; one line per batch size tried goes to stderr.

Usage (on the GPU machine):
  python3 scripts/bench_transformers.py --batch-sizes 1024,2048,4096 --input-len 512 --output-len 512

`--cache static` makes transformers 5.17 compile the forward with inductor on its own (minutes
per batch size); the dynamic cache (default) runs eagerly.
"""
import argparse
import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

MASK = (1 << 64) - 1


class SplitMix64:
    """Mirror of sluice-bench's generator."""

    def __init__(self, seed):
        self.state = seed & MASK

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def uniform(self, lo, hi):
        return lo + self.next_u64() % (hi - lo + 1)


def preset(name):
    if name == "qwen2.5-0.5b":
        return Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
        )
    if name == "llama-3.2-1b":
        return LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
            tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        )
    if name == "llama-3.1-8b":
        return LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
            tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        )
    if name == "qwen2.5-7b":
        return Qwen2Config(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
            tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
        )
    if name == "mistral-7b":
        return MistralConfig(
            vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
            tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None,
        )
    raise SystemExit(f"unknown preset {name}")


def workload(n, input_len, output_len, seed, vocab):
    rng = SplitMix64(seed)
    ids_range = min(vocab, 10000)
    return [([rng.next_u64() % ids_range for _ in range(input_len)], output_len) for _ in range(n)]


def sync():
    torch.cuda.synchronize()


def run_batch(model, prompts, new_tokens, cache, max_time=None):
    """Seconds of one `generate` over `prompts`, and the tokens it produced per row (fewer than
    `new_tokens` only when `max_time` stopped it)."""
    ids = torch.tensor(prompts, device="cuda:0")
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids),
    )
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    if max_time is not None:
        kwargs["max_time"] = max_time
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, **kwargs)
    sync()
    dt = time.perf_counter() - t
    produced = out.shape[1] - ids.shape[1]
    if produced != new_tokens and max_time is None:
        raise SystemExit(f"generate produced {produced} tokens, expected {new_tokens}")
    return dt, produced


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=512)
    # transformers' generate is host-bound on small models, so its throughput grows with the
    # batch up to the whole workload: the default sweep ends at the gate's 4096 requests.
    ap.add_argument("--batch-sizes", default="1024,2048,4096")
    ap.add_argument("--batches", type=int, default=1, help="timed batches per batch size")
    ap.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-time", type=float, default=None,
                    help="stop each timed generate after this many seconds (transformers' "
                         "max_time); the line then counts the tokens produced by then")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = preset(args.model)
    with torch.device("cuda:0"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.eval()
    # EOS ignored: no end-of-sequence id at all, so every row runs to max_new_tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if args.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    device = torch.cuda.get_device_name(0)
    print(f"transformers {transformers.__version__} torch {torch.__version__} {device} "
          f"cache={args.cache} compile={args.compile}", file=sys.stderr)

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    work = workload(max(sizes) * args.batches, args.input_len, args.output_len, args.seed,
                    cfg.vocab_size)
    # Warm-up: kernels, cuBLAS handles (and compilation) out of the timings.
    run_batch(model, [p for p, _ in work[:2]], 4, args.cache)
    stopped = None

    best = None
    for b in sizes:
        try:
            ttft, _ = run_batch(model, [p for p, _ in work[:b]], 1, args.cache)
            times, produced = [], []
            for k in range(args.batches):
                batch = [p for p, _ in work[k * b:(k + 1) * b]]
                dt, got = run_batch(model, batch, args.output_len, args.cache, args.max_time)
                times.append(dt)
                produced.append(got)
        except torch.OutOfMemoryError:
            print(f"batch {b}: out of memory", file=sys.stderr)
            torch.cuda.empty_cache()
            continue
        wall = sum(times)
        n = b * args.batches
        out_tokens = b * sum(produced)
        per_batch = wall / args.batches
        per_row = sum(produced) / args.batches
        tpot = (per_batch - ttft) / max(per_row - 1, 1)
        blocks = n * -(-(args.input_len + args.output_len) // 16) // args.batches
        line = {
            "device": device,
            "dtype": "bf16",
            "model": args.model,
            "requests": n,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "wall_s": wall,
            "requests_per_s": n / wall,
            "output_tokens_per_s": out_tokens / wall,
            "total_tokens_per_s": (n * args.input_len + out_tokens) / wall,
            "tpot_mean_ms": tpot * 1e3,
            "tpot_p99_ms": tpot * 1e3,
            "ttft_mean_ms": ttft * 1e3,
            "peak_kv_blocks": blocks,
        }
        if min(produced) < args.output_len:
            # Stopped by --max-time: the rate of the first tokens, an upper bound on a full
            # run's (later tokens attend over longer contexts and cost more); no request finished.
            line["requests_per_s"] = 0.0
            line["stopped_after_tokens"] = min(produced)
            line["max_time_s"] = args.max_time
        print(f"batch {b}: " + json.dumps(line), file=sys.stderr)
        if best is None or line["output_tokens_per_s"] > best["output_tokens_per_s"]:
            best = line
        torch.cuda.empty_cache()
    if best is None:
        raise SystemExit("every batch size ran out of memory")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
