//! Parity with Hugging Face transformers (float32, CPU) on the tiny models: tokenization and
//! chat templates, greedy token ids and the logits of the first steps, for single requests and
//! for mixed-length batches (including chunked prefill and preemption, which must not change
//! results).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod engine_common;

use engine_common::*;
use sluice_worker::engine::{FinishReason, Prompt};

const TOL: f32 = 1e-4;

#[test]
fn tokenization_and_chat_template_match_transformers() {
    for name in MODELS {
        let eng = engine(&config(name));
        for (i, c) in reference(name).iter().enumerate() {
            if let (Some(m), Some(r)) = (&c.messages, &c.rendered) {
                assert_eq!(&eng.render_chat(m).unwrap(), r, "{name} case {i}: rendered chat");
            }
            let ids = eng.encode_prompt(&c.prompt()).unwrap();
            assert_eq!(ids, c.prompt_ids, "{name} case {i} ({}): prompt ids", c.kind);
        }
    }
}

#[test]
fn first_step_logits_match_single_and_batched() {
    for name in MODELS {
        let cases = reference(name);
        let mut eng = engine(&config(name));
        // Each prompt alone, then all together in one ragged prefill + batched decode.
        let forced = |c: &Case| c.greedy_ids[..c.logits.len() - 1].to_vec();
        let mut single = Vec::new();
        for c in &cases {
            single.push(eng.teacher_forced_logits(&[(c.prompt_ids.clone(), forced(c))]).unwrap().remove(0));
        }
        let batch: Vec<_> = cases.iter().map(|c| (c.prompt_ids.clone(), forced(c))).collect();
        let batched = eng.teacher_forced_logits(&batch).unwrap();
        for (i, c) in cases.iter().enumerate() {
            for (step, want) in c.logits.iter().enumerate() {
                let e1 = rel_err(&single[i][step], want);
                let e2 = rel_err(&batched[i][step], want);
                assert!(e1 <= TOL, "{name} case {i} step {step}: single rel err {e1}");
                assert!(e2 <= TOL, "{name} case {i} step {step}: batched rel err {e2}");
            }
        }
    }
}

fn check_greedy(name: &str, mut cfg: sluice_worker::engine::EngineConfig, together: bool) -> u64 {
    let cases = reference(name);
    cfg.max_model_len = Some(512);
    let mut eng = engine(&cfg);
    let n = cases[0].greedy_ids.len();
    let reqs = |base: u64| {
        cases.iter().enumerate().map(|(i, c)| request(base + i as u64, Prompt::Tokens(c.prompt_ids.clone()), greedy(n))).collect::<Vec<_>>()
    };
    let outs = if together {
        eng.generate(reqs(100)).unwrap()
    } else {
        reqs(0).into_iter().flat_map(|r| eng.generate(vec![r]).unwrap()).collect()
    };
    assert_eq!(outs.len(), cases.len());
    for ((_, out), c) in outs.into_iter().zip(&cases) {
        let out = out.unwrap();
        assert_eq!(out.token_ids, c.greedy_ids, "{name}: prompt of {} tokens", c.prompt_ids.len());
        assert_eq!(out.finish_reason, FinishReason::Length);
        assert_eq!(out.prompt_tokens, c.prompt_ids.len());
        assert_eq!(out.completion_tokens, n);
    }
    let stats = eng.stats();
    assert_eq!(stats.kv_blocks_used, 0, "all blocks returned");
    stats.preemptions
}

#[test]
fn greedy_tokens_match_single_requests() {
    for name in MODELS {
        check_greedy(name, config(name), false);
    }
}

#[test]
fn greedy_tokens_match_in_one_mixed_batch() {
    for name in MODELS {
        check_greedy(name, config(name), true);
    }
}

/// Runs SPLIT_MIN_SEQS + 2 greedy requests (the reference prompts in turn) with split steps
/// on, checks that each gets the reference's tokens and returns the engine's counters. The
/// halves do not start on the same prompt (66 = 9 x 7 + 3), so a mixed-up row shows as wrong
/// tokens.
fn check_split(name: &str, mut cfg: sluice_worker::engine::EngineConfig) -> sluice_worker::engine::EngineStats {
    let cases = reference(name);
    cfg.switches.nano_batches = true;
    let mut eng = engine(&cfg);
    let n = cases[0].greedy_ids.len();
    let count = sluice_worker::engine::model::SPLIT_MIN_SEQS + 2;
    let reqs: Vec<_> =
        (0..count).map(|i| request(i as u64, Prompt::Tokens(cases[i % cases.len()].prompt_ids.clone()), greedy(n))).collect();
    let outs = eng.generate(reqs).unwrap();
    assert_eq!(outs.len(), count);
    for (id, out) in outs {
        assert_eq!(&out.unwrap().token_ids, &cases[id as usize % cases.len()].greedy_ids, "{name}: request {id}");
    }
    let stats = eng.stats();
    eprintln!("{name}: {} of {} steps split, {} of them with prefill", stats.split_steps, stats.steps, stats.split_prefill_steps);
    assert_eq!(stats.kv_blocks_used, 0, "all blocks returned");
    stats
}

/// Decode steps split into two halves (`EngineSwitches::nano_batches`; on the CPU the second
/// half runs on a second thread) give the reference's greedy tokens, every request in its place.
#[test]
fn greedy_tokens_match_with_decode_steps_split_in_two() {
    for name in MODELS {
        let mut cfg = config(name);
        cfg.num_kv_blocks = Some(1024);
        let stats = check_split(name, cfg);
        // Most of the 15 decode steps (a step that still prefills some prompts may not split).
        assert!(stats.split_steps >= 8, "{name}: only {} of the decode steps were split", stats.split_steps);
    }
}

/// Steps that prefill (chunked prompts beside decode tokens) split too, with the prefix cache
/// sharing the blocks of the repeated prompts, some of them filled in the step that shares them.
#[test]
fn greedy_tokens_match_with_mixed_steps_split_in_two() {
    for name in MODELS {
        let mut cfg = config(name);
        cfg.block_size = 4;
        cfg.num_kv_blocks = Some(4096);
        cfg.max_num_batched_tokens = 100;
        let stats = check_split(name, cfg);
        assert!(stats.split_prefill_steps > 0, "{name}: no step with prefill chunks was split");
        assert!(stats.prefix_cache_hit_tokens > 0, "{name}: the repeated prompts never shared a block");
    }
}

#[test]
fn greedy_tokens_match_with_chunked_prefill_and_preemption() {
    for name in MODELS {
        let mut cfg = config(name);
        cfg.max_num_batched_tokens = 40;
        cfg.block_size = 4;
        cfg.num_kv_blocks = Some(64); // 256 slots for ~420 prompt tokens + 112 generated
        let preemptions = check_greedy(name, cfg, true);
        assert!(preemptions > 0, "{name}: expected preemption with 64 blocks");
    }
}

#[test]
fn chat_prompts_generate_like_token_prompts() {
    for name in MODELS {
        let cases = reference(name);
        let mut eng = engine(&config(name));
        for c in cases.iter().filter(|c| c.kind == "chat") {
            let out = eng.generate(vec![request(1, c.prompt(), greedy(c.greedy_ids.len()))]).unwrap().remove(0).1.unwrap();
            assert_eq!(out.token_ids, c.greedy_ids, "{name}");
        }
    }
}

// GPU parity (bf16) lives in `engine_gpu_parity.rs`.
