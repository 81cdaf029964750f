#!/usr/bin/env python3
"""Compare the engine's CUDA bf16 logits with transformers bf16 on the same GPU.

Input: the JSON written by the `engine_gpu_parity` test (SLUICE_GPU_PARITY_OUT),
{model: [[step0 logits, step1 logits], ...per case]}.
For each tiny model and fixture case it runs transformers in bfloat16 on cuda:0 (eager
attention) over the prompt (+ the first greedy token for step 1) and prints the relative error
max|a-b|/max|b| of engine vs transformers-bf16 and of both vs the float32 reference.
Usage: python3 scripts/gpu_parity.py ENGINE_JSON
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
engine = json.load(open(sys.argv[1]))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


worst = 0.0
worst_hf = 0.0
worst_eng = 0.0
agree = 0
total = 0
print("transformers", transformers.__version__, "torch", torch.__version__, torch.cuda.get_device_name(0))
for name, rows in engine.items():
    ref = json.load(open(os.path.join(root, "worker/tests/fixtures", f"reference_{name}.json")))
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(root, "models", name), dtype=torch.bfloat16, attn_implementation="eager"
    ).to("cuda:0").eval()
    for i, (case, got) in enumerate(zip(ref["cases"], rows)):
        ids = case["prompt_ids"]
        for step, eng in enumerate(got):
            seq = ids + case["greedy_ids"][:step]
            with torch.no_grad():
                hf = model(torch.tensor([seq], device="cuda:0")).logits[0, -1].float().cpu()
            e = torch.tensor(eng)
            f32 = torch.tensor(case["logits"][step])
            r = rel(e, hf)
            worst = max(worst, r)
            worst_hf = max(worst_hf, rel(hf, f32))
            worst_eng = max(worst_eng, rel(e, f32))
            agree += int(e.argmax()) == int(hf.argmax())
            total += 1
            print(f"{name} case {i} step {step}: engine-vs-hf-bf16 {r:.4f}  engine-vs-f32 {rel(e, f32):.4f}  hf-bf16-vs-f32 {rel(hf, f32):.4f}  argmax engine {int(e.argmax())} hf {int(hf.argmax())}")
print(f"worst engine-vs-hf-bf16 relative error: {worst:.4f}; worst engine-vs-f32: {worst_eng:.4f}; "
      f"worst hf-bf16-vs-f32: {worst_hf:.4f}")
# Pass when the engine in bf16 is about as close to the float32 reference as transformers in
# bf16 is (both round every layer to bf16; they round differently, hence engine-vs-hf-bf16 is
# of the same size and not a criterion by itself), and picks the same argmax where bf16
# transformers does.
if worst_eng > max(1.25 * worst_hf, 0.02):
    sys.exit(f"engine-vs-f32 {worst_eng:.4f} exceeds 1.25 x hf-bf16-vs-f32 {worst_hf:.4f}")
print(f"argmax agreement engine vs hf-bf16: {agree}/{total}")
print("PASS")
