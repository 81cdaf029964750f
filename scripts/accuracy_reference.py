#!/usr/bin/env python3
"""A random-weight model of a real shape and its float32 transformers reference, for the
engine's accuracy test at that shape (`engine_fp8`'s `fp8_accuracy_at_a_real_shape`).

Builds the `--shape` architecture of scripts/bench_transformers.py (optionally with fewer layers:
`--layers 4` keeps every width of the 8B shape and fits a CPU), draws its weights with a fixed
seed (normal, std 0.02; norms near one), rounds them to bfloat16 and writes them as a bf16
checkpoint (`model.safetensors`, `config.json`, the tiny-llama tokenizer files so the engine
loads it; the prompts are token ids). Then, in float32 with the same bf16-rounded weights, it
runs a cache-free greedy loop over `--cases` random prompts and writes `reference.json` in the
format of worker/tests/fixtures/reference_*.json: per case the prompt ids, the greedy ids and
the full logits of the first `--logit-steps` steps.

Usage:
  python3 scripts/accuracy_reference.py --shape llama-3.1-8b --layers 4 --out /tmp/acc-8b
  SLUICE_ACCURACY_DIR=/tmp/acc-8b cargo test --release -p sluice-worker --test engine_fp8 \
      -- --ignored --nocapture fp8_accuracy_at_a_real_shape
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_transformers import SplitMix64, preset  # noqa: E402
from make_tiny_models import reinit  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=None, help="keep only this many layers")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--logit-steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    cfg = preset(args.shape)
    if args.layers is not None:
        cfg.num_hidden_layers = args.layers
        if getattr(cfg, "layer_types", None):  # Qwen2 configs list one attention type per layer
            cfg.layer_types = cfg.layer_types[: args.layers]
    cfg.torch_dtype = "bfloat16"
    t0 = time.time()
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    reinit(model, args.seed, 0.02)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the checkpoint holds bf16; the reference uses the same values
    print(f"built {args.shape} with {cfg.num_hidden_layers} layers in {time.time() - t0:.0f} s", file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    # Cast a copy: `model.to(bfloat16)` would also round the RoPE frequency buffers.
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(args.out, state_dict=bf16, safe_serialization=True)
    del bf16
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(ROOT, "models", "tiny-llama", f), os.path.join(args.out, f))

    rng = SplitMix64(args.seed)
    ids_range = min(cfg.vocab_size, 10000)
    cases = []
    for c in range(args.cases):
        prompt = [int(rng.next_u64() % ids_range) for _ in range(args.prompt_len)]
        cur, greedy, logits = list(prompt), [], []
        for step in range(args.new_tokens):
            with torch.no_grad():
                row = model(torch.tensor([cur], device=args.device)).logits[0, -1].float().cpu()
            nxt = int(torch.argmax(row))
            if step < args.logit_steps:
                logits.append([float(f"{x:.7g}") for x in row.tolist()])
            greedy.append(nxt)
            cur.append(nxt)
        cases.append({"kind": "tokens", "prompt_ids": prompt, "greedy_ids": greedy, "logits": logits})
        print(f"case {c}: greedy {greedy}", file=sys.stderr)
    doc = {
        "shape": args.shape,
        "layers": cfg.num_hidden_layers,
        "seed": args.seed,
        "torch": torch.__version__,
        "device": args.device,
        "cases": cases,
    }
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(doc, f)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
