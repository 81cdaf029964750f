//! Scheduler and request-handling behaviour on the tiny Qwen2 model: preemption when KV
//! blocks run out, the per-step token budget, max_tokens 1, stop strings, over-long prompts,
//! seeded sampling independent of the batch, and the threaded handle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod engine_common;

use engine_common::*;
use sluice_worker::engine::{EngineHandle, FinishReason, Prompt, RequestError, SamplingParams};

fn prompts() -> Vec<Vec<u32>> {
    reference("tiny-qwen2").into_iter().map(|c| c.prompt_ids).collect()
}

#[test]
fn more_requests_than_kv_blocks_complete_through_preemption() {
    let base = prompts();
    let mut cfg = config("tiny-qwen2");
    let mut eng_ref = engine(&cfg);
    // 24 requests, ~1,900 prompt tokens, into 24 blocks of 16 = 384 slots.
    let reqs: Vec<_> = (0..24u64)
        .map(|i| {
            let p = base[i as usize % base.len()].clone();
            request(i, Prompt::Tokens(p), greedy(8 + (i as usize % 5)))
        })
        .collect();
    let want = eng_ref.generate(reqs.clone()).unwrap();
    cfg.num_kv_blocks = Some(24);
    let mut eng = engine(&cfg);
    assert!(eng.max_model_len() <= 24 * 16);
    let got = eng.generate(reqs).unwrap();
    assert_eq!(got.len(), 24, "no request dropped");
    for ((id, g), (_, w)) in got.iter().zip(&want) {
        assert_eq!(g.as_ref().unwrap().token_ids, w.as_ref().unwrap().token_ids, "request {id}");
    }
    let s = eng.stats();
    assert!(s.preemptions > 0, "expected preemptions, got {s:?}");
    assert!(s.peak_kv_blocks <= 24);
    assert_eq!(s.kv_blocks_used, 0);
    assert_eq!(s.requests_finished, 24);
}

#[test]
fn token_budget_is_respected_and_long_prompts_are_chunked() {
    let mut cfg = config("tiny-qwen2");
    cfg.max_num_batched_tokens = 16;
    let mut eng = engine(&cfg);
    let reqs: Vec<_> = prompts().into_iter().enumerate().map(|(i, p)| request(i as u64, Prompt::Tokens(p), greedy(4))).collect();
    let outs = eng.generate(reqs).unwrap();
    assert!(outs.iter().all(|(_, o)| o.is_ok()));
    let s = eng.stats();
    assert!(s.max_step_tokens <= 16, "{s:?}");
    assert_eq!(s.max_step_tokens, 16);
    // The 155-token prompt alone needs at least 10 steps of 16 tokens.
    assert!(s.steps >= 10 + 3);
}

#[test]
fn max_tokens_one() {
    let mut eng = engine(&config("tiny-qwen2"));
    let out = eng.generate(vec![request(7, Prompt::Text("Hello there".into()), greedy(1))]).unwrap().remove(0);
    let out = out.1.unwrap();
    assert_eq!(out.id, 7);
    assert_eq!(out.completion_tokens, 1);
    assert_eq!(out.token_ids.len(), 1);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert!(out.ttft <= out.total);
    assert_eq!(out.prompt_tokens, eng.encode_prompt(&Prompt::Text("Hello there".into())).unwrap().len());
}

#[test]
fn stop_string_cuts_text_and_finishes_with_stop() {
    let mut eng = engine(&config("tiny-qwen2"));
    let prompt = Prompt::Text("Once upon a time there was a little robot".into());
    let full = eng.generate(vec![request(1, prompt.clone(), greedy(16))]).unwrap().remove(0).1.unwrap();
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 8, "generated text too short: {:?}", full.text);
    let stop: String = chars[4..7].iter().collect();
    let at = full.text.find(&stop).unwrap();
    let params = SamplingParams { stop: vec!["never-appears".into(), stop.clone()], ..greedy(16) };
    let out = eng.generate(vec![request(2, prompt, params)]).unwrap().remove(0).1.unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text, full.text[..at], "text cut before the stop string {stop:?}");
    assert!(out.completion_tokens < 16);
    assert_eq!(out.token_ids[..], full.token_ids[..out.completion_tokens]);
}

#[test]
fn stop_string_late_in_a_long_output_is_found() {
    // The per-step check decodes only a tail window of 4 * 3 + 8 = 20 tokens for a 3-character
    // stop string; a stop string first seen after 40 tokens must still end the request there.
    let mut eng = engine(&config("tiny-qwen2"));
    let prompt = Prompt::Text("Once upon a time there was a little robot".into());
    let full = eng.generate(vec![request(1, prompt.clone(), greedy(96))]).unwrap().remove(0).1.unwrap();
    let decode_prefix = |n: usize| eng.decode(&full.token_ids[..n]);
    let late = decode_prefix(40).len();
    // A 3-character string whose first occurrence starts after the first 40 tokens' text.
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    let stop = (0..chars.len().saturating_sub(3))
        .filter(|&i| chars[i].0 >= late)
        .map(|i| chars[i..i + 3].iter().map(|c| c.1).collect::<String>())
        .find(|s| full.text.find(s.as_str()).is_some_and(|at| at >= late))
        .expect("a late 3-character string");
    let at = full.text.find(&stop).unwrap();
    let params = SamplingParams { stop: vec![stop.clone()], ..greedy(96) };
    let out = eng.generate(vec![request(2, prompt, params)]).unwrap().remove(0).1.unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop, "stop {stop:?} at byte {at}");
    assert_eq!(out.text, full.text[..at], "text cut before the stop string {stop:?}");
    assert!(out.completion_tokens > 40 && out.completion_tokens < 96, "{}", out.completion_tokens);
}

#[test]
fn over_long_prompt_is_a_request_error_not_a_crash() {
    let mut cfg = config("tiny-qwen2");
    cfg.max_model_len = Some(64);
    let mut eng = engine(&cfg);
    let outs = eng
        .generate(vec![
            request(1, Prompt::Tokens(vec![5; 65]), greedy(4)),
            request(2, Prompt::Tokens(vec![5; 10]), greedy(4)),
            request(3, Prompt::Tokens(vec![]), greedy(4)),
            request(4, Prompt::Tokens(vec![100_000]), greedy(4)),
        ])
        .unwrap();
    assert_eq!(outs[0].1, Err(RequestError::PromptTooLong { len: 65, max: 64 }));
    assert!(outs[1].1.is_ok());
    assert_eq!(outs[2].1, Err(RequestError::EmptyPrompt));
    assert!(matches!(outs[3].1, Err(RequestError::Invalid(_))));
    // Generation stops at the model's maximum length.
    let out = eng.generate(vec![request(5, Prompt::Tokens(vec![5; 60]), greedy(100))]).unwrap().remove(0).1.unwrap();
    assert_eq!(out.completion_tokens, 4);
    assert_eq!(out.finish_reason, FinishReason::Length);
}

#[test]
fn seeded_sampling_is_independent_of_batch_composition() {
    let mut eng = engine(&config("tiny-qwen2"));
    let params = |seed| SamplingParams {
        max_tokens: 12,
        temperature: 0.9,
        top_p: 0.95,
        top_k: Some(50),
        seed,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let p = Prompt::Text("The quick brown fox".into());
    let alone = eng.generate(vec![request(1, p.clone(), params(7))]).unwrap();
    let mut batch = vec![request(1, p.clone(), params(7))];
    for (i, q) in prompts().into_iter().enumerate() {
        batch.push(request(10 + i as u64, Prompt::Tokens(q), params(i as u64)));
    }
    let together = eng.generate(batch).unwrap();
    let a = alone[0].1.as_ref().unwrap();
    let b = together[0].1.as_ref().unwrap();
    assert_eq!(a.token_ids, b.token_ids);
    let other = eng.generate(vec![request(1, p, params(8))]).unwrap();
    assert_ne!(other[0].1.as_ref().unwrap().token_ids, a.token_ids);
}

/// A copy of the tiny Qwen2 model whose generation_config.json declares `eos` an EOS id.
fn tiny_qwen2_with_eos(eos: u32) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(model_dir("tiny-qwen2")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    std::fs::write(tmp.path().join("generation_config.json"), format!("{{\"eos_token_id\": [2, {eos}]}}")).unwrap();
    tmp
}

#[test]
fn eos_ends_a_completion_unless_ignored() {
    // Declare the third greedy token of a reference case an EOS id in generation_config.json.
    let c = &reference("tiny-qwen2")[1];
    let eos = c.greedy_ids[2];
    assert!(!c.greedy_ids[..2].contains(&eos));
    let tmp = tiny_qwen2_with_eos(eos);
    let mut cfg = config("tiny-qwen2");
    cfg.model_dir = tmp.path().to_path_buf();
    let mut eng = engine(&cfg);
    let p = Prompt::Tokens(c.prompt_ids.clone());
    let stop = SamplingParams { ignore_eos: false, ..greedy(16) };
    let outs = eng.generate(vec![request(1, p.clone(), stop), request(2, p, greedy(16))]).unwrap();
    let a = outs[0].1.as_ref().unwrap();
    assert_eq!(a.finish_reason, FinishReason::Stop);
    assert_eq!(a.token_ids, c.greedy_ids[..3]);
    assert_eq!(a.completion_tokens, 3);
    let b = outs[1].1.as_ref().unwrap();
    assert_eq!(b.token_ids, c.greedy_ids);
    assert_eq!(b.finish_reason, FinishReason::Length);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_serves_concurrent_requests() {
    let handle = EngineHandle::spawn(config("tiny-qwen2")).unwrap();
    assert_eq!(handle.info().name, "tiny-qwen2");
    let cases = reference("tiny-qwen2");
    let rxs: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| handle.submit(request(i as u64, Prompt::Tokens(c.prompt_ids.clone()), greedy(c.greedy_ids.len()))))
        .collect();
    let dup = handle.submit(request(0, Prompt::Text("x".into()), greedy(1)));
    for (rx, c) in rxs.into_iter().zip(&cases) {
        let out = rx.await.unwrap().unwrap();
        assert_eq!(out.token_ids, c.greedy_ids);
    }
    let d = dup.await.unwrap();
    assert!(matches!(d, Err(RequestError::DuplicateId(0)) | Ok(_)));
    let s = handle.stats();
    assert!(s.requests_finished >= cases.len() as u64);
    handle.shutdown();
}

#[test]
fn spawn_reports_load_errors() {
    let mut cfg = config("tiny-qwen2");
    cfg.model_dir = repo_root().join("models/does-not-exist");
    let err = EngineHandle::spawn(cfg).err().unwrap();
    assert!(err.to_string().contains("does-not-exist"), "{err}");
}

/// The host runs one step ahead of the device on greedy steps (placeholder tokens resolved from
/// the step in flight): outputs must equal strictly alternating steps, through preemption,
/// EOS, stop strings, max_tokens 1 and a sampled (host-sampled) request in the same batch.
#[test]
fn overlapped_steps_match_one_step_at_a_time() {
    let base = prompts();
    let c = &reference("tiny-qwen2")[1];
    let eos = c.greedy_ids[2];
    let tmp = tiny_qwen2_with_eos(eos);
    let mut cfg = config("tiny-qwen2");
    cfg.model_dir = tmp.path().to_path_buf();
    cfg.num_kv_blocks = Some(24);
    cfg.max_num_batched_tokens = 96;
    let mut reqs: Vec<_> = (0..20u64)
        .map(|i| {
            let p = base[i as usize % base.len()].clone();
            let params = match i % 5 {
                0 => SamplingParams { ignore_eos: false, ..greedy(12) },
                1 => greedy(1),
                2 => SamplingParams { temperature: 0.8, seed: i, ..greedy(9) },
                _ => greedy(6 + (i as usize % 7)),
            };
            request(i, Prompt::Tokens(p), params)
        })
        .collect();
    reqs.push(request(100, Prompt::Tokens(c.prompt_ids.clone()), SamplingParams { ignore_eos: false, ..greedy(16) }));
    // Without prefix caching the batch runs long enough for greedy-only stretches to overlap;
    // with it (the prompts repeat) the outputs must still equal the one-step-at-a-time run.
    for prefix_caching in [false, true] {
        cfg.prefix_caching = prefix_caching;
        let mut sync_cfg = cfg.clone();
        sync_cfg.overlap_steps = false;
        let want = engine(&sync_cfg).generate(reqs.clone()).unwrap();
        let mut eng = engine(&cfg);
        let got = eng.generate(reqs.clone()).unwrap();
        assert_eq!(got.len(), want.len());
        for ((id, g), (wid, w)) in got.iter().zip(&want) {
            assert_eq!(id, wid);
            let (g, w) = (g.as_ref().unwrap(), w.as_ref().unwrap());
            assert_eq!(g.token_ids, w.token_ids, "request {id} (prefix caching {prefix_caching})");
            assert_eq!(g.finish_reason, w.finish_reason, "request {id} (prefix caching {prefix_caching})");
        }
        let eos_out = got.iter().find(|(id, _)| *id == 100).unwrap().1.as_ref().unwrap();
        assert_eq!(eos_out.token_ids, c.greedy_ids[..3], "EOS ends the request even with a step in flight");
        let s = eng.stats();
        if prefix_caching {
            assert!(s.prefix_cache_hit_tokens > 0, "the repeated prompts hit the cache: {s:?}");
        } else {
            assert!(s.overlapped_steps > 0, "no step was overlapped: {s:?}");
            assert!(s.preemptions > 0, "expected preemptions: {s:?}");
        }
        assert_eq!(s.kv_blocks_used, 0, "every block returned");
        assert_eq!(s.requests_finished, 21);
    }
}
