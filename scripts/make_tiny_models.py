#!/usr/bin/env python3
"""Build the tiny random-weight test models and their transformers reference outputs.

Produces, under the repository root:
  models/tiny-qwen2/   Qwen2ForCausalLM (GQA 4/2 heads, QKV bias, tied embeddings), one safetensors file
  models/tiny-llama/   LlamaForCausalLM (untied, Llama-3 "llama3" RoPE scaling), sharded safetensors + index
  worker/tests/fixtures/reference_<model>.json   prompts, prompt ids, greedy ids, first-step logits

Both models share one byte-level BPE tokenizer trained here on embedded text. Reference outputs
come from transformers in float32 on CPU (eager attention), with a cache-free greedy loop so that
nothing but the model's forward pass is being compared. Needs: tokenizers, torch, transformers,
jinja2 (only `tokenizers` for --tokenizer-only).

Usage: python3 scripts/make_tiny_models.py [--out ROOT] [--tokenizer-only] [--bf16]
"""
import argparse
import json
import os
import platform
import sys

CORPUS = """
Sluice runs large batches of language model requests on a cluster and finishes them before a deadline.
The operator plans shards, creates an indexed job, reads progress and scales the workers up or down.
The worker reads its shard, feeds the engine, and commits the output in chunks that never change.
A paged key value cache stores attention keys and values in fixed size blocks; a block table maps
each sequence to its blocks. The scheduler admits waiting sequences while the token budget and the
block budget allow, runs prefill for new sequences and decode for running ones, and preempts the
newest sequence when blocks run out. Nothing is ever dropped: a preempted sequence is recomputed later.
Sampling can be greedy, or use a temperature, top-k and top-p, with a seed per request so that a retry
gives the same answer. Stop strings end a completion early; the end of sequence token ends it too.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
How vexingly quick daft zebras jump; the five boxing wizards jump quickly.
Once upon a time there was a little robot who wanted to learn how to write poems about the sea.
Every morning it walked to the harbour, counted the boats, and listened to the gulls and the waves.
"Why do the waves never stop?" asked the robot. "Because the wind keeps pushing," said the old sailor.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 4096 3.14159 2.71828 -1 +1 = 2 * 3 / 4
def main():\n    for i in range(10):\n        print(f"hello {i}")\n    return 0
fn main() { let x: Vec<u32> = (0..10).collect(); println!("{:?}", x); }
{"id": "req-1", "prompt": "Translate to French: good morning", "max_tokens": 16}
User: What is the capital of France? Assistant: The capital of France is Paris.
User: Write a haiku about autumn. Assistant: Red leaves drift and fall / cold wind hums through empty trees / the year breathes slower.
Kubernetes schedules pods onto nodes; a job controller tracks completions and retries failed pods.
Graphics processing units multiply matrices very quickly, and memory bandwidth limits decoding speed.
Les modèles de langue écrivent du texte. Die Sprachmodelle schreiben Text. 言語モデルはテキストを書きます。
"""

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
VOCAB_SIZE = 768

# ChatML, as in Qwen2.5 (without the tool-calling branches).
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unsupported role: ' + message.role) }}"
    "{%- endif %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Llama 3 style: bos_token variable, python string methods (.strip()), raise_exception.
LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unsupported role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'].strip() + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

TEXT_PROMPTS = [
    "Hi",
    "The quick brown fox",
    "Once upon a time there was a little robot who wanted to learn",
    "The scheduler admits waiting sequences while the token budget and the block budget allow, "
    "runs prefill for new sequences and decode for running ones, and preempts the newest sequence "
    "when blocks run out. Nothing is ever dropped.",
    ("Kubernetes schedules pods onto nodes; a job controller tracks completions. " * 6).strip(),
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse poet."},
        {"role": "user", "content": "  Write a haiku about autumn.  "},
        {"role": "assistant", "content": "Red leaves drift and fall."},
        {"role": "user", "content": "Another one, about the sea."},
    ],
]
NEW_TOKENS = 16
LOGIT_STEPS = 2


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [l for l in CORPUS.split("\n") if l.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    qwen = Tokenizer.from_str(tok.to_str())
    qwen.post_processor = processors.ByteLevel(trim_offsets=False)
    llama = Tokenizer.from_str(tok.to_str())
    bos = "<|begin_of_text|>"
    llama.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )
    return qwen, llama


def added_tokens_decoder(tok):
    return {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }


def render_chat(template, messages, bos, eos):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def write_tokenizer_files(d, tok, tcfg, template_in_file, template):
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    if template_in_file:
        with open(os.path.join(d, "chat_template.jinja"), "w") as f:
            f.write(template)
    else:
        tcfg = dict(tcfg, chat_template=template)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)


def expected_inv_freq(theta, head_dim, l3):
    import math

    inv = [1.0 / (theta ** (i / head_dim)) for i in range(0, head_dim, 2)]
    if l3 is None:
        return inv
    f, lo, hi, old = l3["factor"], l3["low_freq_factor"], l3["high_freq_factor"], l3["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for x in inv:
        wl = 2 * math.pi / x
        if wl < hi_wl:
            out.append(x)
        elif wl > lo_wl:
            out.append(x / f)
        else:
            smooth = (old / wl - lo) / (hi - lo)
            out.append((1 - smooth) * x / f + smooth * x)
    return out


def pick_config(cfg_cls, model_cls, kw, variants, want):
    """Construct the config with whichever RoPE spelling this transformers version honours."""
    errors = []
    for v in variants:
        try:
            cfg = cfg_cls(**kw, **v)
            m = model_cls(cfg)
            got = m.model.rotary_emb.inv_freq.tolist()
            if all(abs(a - b) <= 1e-6 * max(abs(b), 1e-30) for a, b in zip(got, want)):
                print("rope variant", v, "ok")
                return cfg
            errors.append((v, got))
        except Exception as e:  # noqa: BLE001
            errors.append((v, repr(e)))
    raise SystemExit(f"no config variant gave the expected inv_freq {want}: {errors}")


def reinit(model, seed, std):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def reference(model, prompts_ids, dtype_name):
    """Cache-free greedy loop: returns per prompt the greedy ids, first-step logits, min top1-top2 gap."""
    import torch

    out = []
    for ids in prompts_ids:
        cur = list(ids)
        gen, logits_steps, min_gap = [], [], float("inf")
        for step in range(NEW_TOKENS):
            with torch.no_grad():
                logits = model(torch.tensor([cur])).logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            min_gap = min(min_gap, float(top2[0] - top2[1]))
            nxt = int(torch.argmax(logits))
            if step < LOGIT_STEPS:
                logits_steps.append([float(f"{x:.8g}") for x in logits.tolist()])
            gen.append(nxt)
            cur.append(nxt)
        out.append({"greedy_ids": gen, "logits": logits_steps, "min_top2_gap": min_gap})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ap.add_argument("--tokenizer-only", action="store_true")
    args = ap.parse_args()
    root = os.path.abspath(args.out)

    qwen_tok, llama_tok = build_tokenizer()
    vocab = qwen_tok.get_vocab_size()
    ids = {t: qwen_tok.token_to_id(t) for t in SPECIAL_TOKENS}
    print("vocab", vocab, ids)
    qdir = os.path.join(root, "models", "tiny-qwen2")
    ldir = os.path.join(root, "models", "tiny-llama")
    write_tokenizer_files(
        qdir, qwen_tok,
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>", "add_bos_token": False, "model_max_length": 2048,
         "added_tokens_decoder": added_tokens_decoder(qwen_tok)},
        False, QWEN_TEMPLATE,
    )
    write_tokenizer_files(
        ldir, llama_tok,
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
         "eos_token": "<|eot_id|>", "add_bos_token": True, "model_max_length": 1024,
         "added_tokens_decoder": added_tokens_decoder(llama_tok)},
        True, LLAMA_TEMPLATE,
    )
    for p in TEXT_PROMPTS:
        print(len(qwen_tok.encode(p).ids), qwen_tok.encode(p).tokens[:12])
    for m in CHAT_PROMPTS:
        r = render_chat(QWEN_TEMPLATE, m, None, "<|im_end|>")
        print(repr(r), len(qwen_tok.encode(r, add_special_tokens=False).ids))
        r = render_chat(LLAMA_TEMPLATE, m, "<|begin_of_text|>", "<|eot_id|>")
        print(repr(r), len(llama_tok.encode(r, add_special_tokens=False).ids))
    if args.tokenizer_only:
        return

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", initializer_range=0.02,
        attention_dropout=0.0,
    )
    qwen_kw = dict(
        **common, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
        use_sliding_window=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
    )
    llama_kw = dict(
        **common, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<|eot_id|>"],
    )
    l3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    qwen_variants = [  # transformers 5 spelling first, then the 4.x one
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        dict(rope_theta=1000000.0),
    ]
    llama_variants = [
        dict(rope_parameters=dict(l3, rope_type="llama3", rope_theta=500000.0)),
        dict(rope_theta=500000.0, rope_scaling=dict(l3, rope_type="llama3")),
    ]
    qcfg = pick_config(Qwen2Config, Qwen2ForCausalLM, qwen_kw, qwen_variants,
                       expected_inv_freq(1000000.0, 16, None))
    lcfg = pick_config(LlamaConfig, LlamaForCausalLM, llama_kw, llama_variants,
                       expected_inv_freq(500000.0, 16, l3))
    specs = [
        ("tiny-qwen2", qdir, Qwen2ForCausalLM, qcfg, qwen_tok, QWEN_TEMPLATE, None, "<|im_end|>",
         [ids["<|im_end|>"], ids["<|endoftext|>"]], None, 11),
        ("tiny-llama", ldir, LlamaForCausalLM, lcfg, llama_tok, LLAMA_TEMPLATE, "<|begin_of_text|>",
         "<|eot_id|>", [ids["<|eot_id|>"], ids["<|endoftext|>"]], "150KB", 22),
    ]
    fixtures = os.path.join(root, "worker", "tests", "fixtures")
    os.makedirs(fixtures, exist_ok=True)
    for name, d, cls, cfg, tok, template, bos, eos, eos_ids, shard, seed in specs:
        try:
            cfg._attn_implementation = "eager"
        except Exception as e:  # noqa: BLE001
            print("could not set eager attention:", e)
        model = cls(cfg).eval()
        reinit(model, seed, 0.2)
        if cfg.tie_word_embeddings:
            model.tie_weights()
        kw = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(d, safe_serialization=True, **kw)
        gen_cfg = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos_ids, "do_sample": False,
                   "transformers_version": transformers.__version__}
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump(gen_cfg, f, indent=2)
        print(name, "files", sorted(os.listdir(d)))
        if hasattr(model.model, "rotary_emb"):
            print(name, "inv_freq", model.model.rotary_emb.inv_freq.tolist())

        cases = []
        for p in TEXT_PROMPTS:
            cases.append({"kind": "text", "prompt": p, "prompt_ids": tok.encode(p).ids})
        for m in CHAT_PROMPTS:
            rendered = render_chat(template, m, bos, eos)
            cases.append({"kind": "chat", "messages": m, "rendered": rendered,
                          "prompt_ids": tok.encode(rendered, add_special_tokens=False).ids})
        refs = reference(model, [c["prompt_ids"] for c in cases], "float32")
        for c, r in zip(cases, refs):
            c.update(r)
            c["greedy_text"] = tok.decode(r["greedy_ids"], skip_special_tokens=False)
            print(name, len(c["prompt_ids"]), r["greedy_ids"], "gap", r["min_top2_gap"])
        doc = {
            "model": name, "dtype": "float32", "device": "cpu", "attn_implementation": "eager",
            "new_tokens": NEW_TOKENS, "logit_steps": LOGIT_STEPS,
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                         "tokenizers": __import__("tokenizers").__version__,
                         "python": platform.python_version()},
            "cases": cases,
        }
        with open(os.path.join(fixtures, f"reference_{name}.json"), "w") as f:
            json.dump(doc, f, ensure_ascii=False)
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
