//! GPU parity (bf16) of the engine on the tiny models, run on a CUDA machine with
//! `SLUICE_TEST_CUDA=1` (skipped otherwise; needs `--features cuda`). Writes the engine's
//! teacher-forced logits (prefill step and one batched decode step, all prompts in one ragged
//! batch) to `SLUICE_GPU_PARITY_OUT` *before* checking them, so that
//! `scripts/gpu_parity.py` can compare them with transformers bf16 on the same GPU, then checks
//! them against the float32 transformers reference with a bf16 tolerance, and checks that GPU
//! greedy generation (device argmax) starts with the reference's first token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod engine_common;

use engine_common::*;

/// bf16 (8-bit mantissa) through a few layers with N(0, 0.2) weights: relative error of a few
/// percent against float32 is expected; transformers bf16 shows the same (see BENCHMARKS.md).
const BF16_TOL: f32 = 0.1;

#[test]
fn gpu_bf16_parity() {
    if !cuda_requested() {
        return;
    }
    let mut dump = serde_json::Map::new();
    let mut worst = 0f32;
    let mut first_token_agree = 0;
    let mut total = 0;
    for name in MODELS {
        let cases = reference(name);
        let mut cfg = config(name);
        cfg.device = sluice_worker::engine::DeviceKind::Cuda(0);
        cfg.dtype = sluice_api::job::Dtype::Bf16;
        let mut eng = engine(&cfg);
        let batch: Vec<_> = cases.iter().map(|c| (c.prompt_ids.clone(), c.greedy_ids[..1].to_vec())).collect();
        let got = eng.teacher_forced_logits(&batch).unwrap();
        dump.insert(name.to_string(), serde_json::json!(got));
        let reqs: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| request(i as u64, sluice_worker::engine::Prompt::Tokens(c.prompt_ids.clone()), greedy(4)))
            .collect();
        let outs = eng.generate(reqs).unwrap();
        for (i, c) in cases.iter().enumerate() {
            for (step, want) in c.logits.iter().enumerate() {
                let e = rel_err(&got[i][step], want);
                eprintln!("{name} case {i} step {step}: bf16 rel err vs f32 reference {e:.4}");
                worst = worst.max(e);
            }
            let ids = &outs[i].1.as_ref().unwrap().token_ids;
            total += 1;
            if ids.first() == c.greedy_ids.first() {
                first_token_agree += 1;
            }
        }
    }
    if let Ok(path) = std::env::var("SLUICE_GPU_PARITY_OUT") {
        std::fs::write(path, serde_json::Value::Object(dump).to_string()).unwrap();
    }
    eprintln!("worst bf16 rel err vs f32 reference {worst:.4}; first greedy token agrees {first_token_agree}/{total}");
    assert!(worst <= BF16_TOL, "bf16 logits off the f32 reference by {worst}");
    assert!(first_token_agree * 10 >= total * 8, "first greedy token agrees only {first_token_agree}/{total}");
}

/// Decode steps replayed as CUDA graphs (`EngineSwitches::cuda_graphs`) give exactly the tokens
/// of the same steps launched kernel by kernel, greedy and sampled, bf16 and FP8, while the
/// batch shrinks through the sizes a graph covers (six requests ending three tokens apart).
#[test]
fn gpu_decode_graphs_match_kernel_by_kernel() {
    if !cuda_requested() {
        return;
    }
    for name in MODELS {
        let cases = reference(name);
        for dtype in [sluice_api::job::Dtype::Bf16, sluice_api::job::Dtype::Fp8] {
            let run = |graphs: bool| {
                let mut cfg = config(name);
                cfg.device = sluice_worker::engine::DeviceKind::Cuda(0);
                cfg.dtype = dtype;
                cfg.switches.cuda_graphs = graphs;
                let mut eng = engine(&cfg);
                let reqs: Vec<_> = (0..6)
                    .map(|i| {
                        let mut params = greedy(3 + 3 * i);
                        if i % 2 == 1 {
                            params.temperature = 0.8;
                            params.seed = i as u64;
                        }
                        let prompt = cases[i % cases.len()].prompt_ids.clone();
                        request(i as u64, sluice_worker::engine::Prompt::Tokens(prompt), params)
                    })
                    .collect();
                let outs = eng.generate(reqs).unwrap();
                let ids: Vec<Vec<u32>> = outs.iter().map(|o| o.1.as_ref().unwrap().token_ids.clone()).collect();
                (ids, eng.stats().graph_steps)
            };
            let (eager, eager_graph_steps) = run(false);
            let (graphed, graph_steps) = run(true);
            eprintln!("{name} {dtype:?}: {graph_steps} decode steps through CUDA graphs");
            assert_eq!(eager_graph_steps, 0, "{name} {dtype:?}: graphs ran with the switch off");
            assert!(graph_steps >= 12, "{name} {dtype:?}: only {graph_steps} steps went through a graph");
            assert_eq!(graphed, eager, "{name} {dtype:?}: graph replay changed the tokens");
        }
    }
}

/// Decode steps split into two halves on two CUDA streams (`EngineSwitches::nano_batches`)
/// compute what one batch computes, in bf16 and FP8:
/// * teacher-forced logits (a prefill step, then one decode step of 66 sequences, which
///   splits) within the bf16 tolerance of one batch's, and in bf16 of the f32 reference (the
///   halves' GEMMs have other row counts, so cuBLAS may round differently);
/// * greedy generation, through the device argmax and read-back path, giving the same tokens
///   for at least 90 % of the requests; a budget of 100 tokens per step makes steps that
///   prefill beside at least 32 decode tokens, and some of those split too.
#[test]
fn gpu_split_decode_steps_match_one_batch() {
    if !cuda_requested() {
        return;
    }
    let split_min = sluice_worker::engine::model::SPLIT_MIN_SEQS;
    for name in MODELS {
        let cases = reference(name);
        // The halves do not start on the same prompt (66 = 9 x 7 + 3): a mixed-up row shows.
        let count = split_min + 2;
        for dtype in [sluice_api::job::Dtype::Bf16, sluice_api::job::Dtype::Fp8] {
            let run = |split: bool| {
                let mut cfg = config(name);
                cfg.device = sluice_worker::engine::DeviceKind::Cuda(0);
                cfg.dtype = dtype;
                cfg.num_kv_blocks = Some(1024);
                cfg.max_num_batched_tokens = 100;
                cfg.switches.nano_batches = split;
                let mut eng = engine(&cfg);
                let forced: Vec<_> = (0..count)
                    .map(|i| {
                        let c = &cases[i % cases.len()];
                        (c.prompt_ids.clone(), c.greedy_ids[..c.logits.len() - 1].to_vec())
                    })
                    .collect();
                let logits = eng.teacher_forced_logits(&forced).unwrap();
                let reqs: Vec<_> = (0..count)
                    .map(|i| {
                        request(i as u64, sluice_worker::engine::Prompt::Tokens(cases[i % cases.len()].prompt_ids.clone()), greedy(16))
                    })
                    .collect();
                let mut outs = eng.generate(reqs).unwrap();
                outs.sort_by_key(|o| o.0);
                let ids: Vec<Vec<u32>> = outs.iter().map(|o| o.1.as_ref().unwrap().token_ids.clone()).collect();
                let stats = eng.stats();
                (logits, ids, (stats.split_steps, stats.split_prefill_steps))
            };
            let (one_logits, one_ids, (one_split, _)) = run(false);
            let (split_logits, split_ids, (split_steps, split_prefill)) = run(true);
            assert_eq!(one_split, 0, "{name} {dtype:?}: steps were split with the switch off");
            // One teacher-forced decode step and several of generation's (on the CPU this
            // configuration splits 6 to 7 of them, one with prefill chunks).
            assert!(split_steps >= 4, "{name} {dtype:?}: only {split_steps} steps were split");
            assert!(split_prefill > 0, "{name} {dtype:?}: no step with prefill chunks was split");
            let (mut vs_one, mut vs_ref) = (0f32, 0f32);
            for (i, (a, b)) in split_logits.iter().zip(&one_logits).enumerate() {
                for (step, (x, y)) in a.iter().zip(b).enumerate() {
                    vs_one = vs_one.max(rel_err(x, y));
                    if dtype == sluice_api::job::Dtype::Bf16 {
                        vs_ref = vs_ref.max(rel_err(x, &cases[i % cases.len()].logits[step]));
                    }
                }
            }
            let same = split_ids.iter().zip(&one_ids).filter(|(a, b)| a == b).count();
            eprintln!(
                "{name} {dtype:?}: {split_steps} split steps ({split_prefill} with prefill); split vs one batch rel err {vs_one:.4}, bf16 vs f32 reference {vs_ref:.4}; {same}/{count} greedy sequences identical"
            );
            assert!(vs_one <= BF16_TOL, "{name} {dtype:?}: split logits off one batch's by {vs_one}");
            assert!(vs_ref <= BF16_TOL, "{name} {dtype:?}: split bf16 logits off the f32 reference by {vs_ref}");
            assert!(same * 10 >= count * 9, "{name} {dtype:?}: only {same}/{count} greedy sequences identical");
        }
    }
}
