//! Prefix caching on the tiny models: requests that share a system prompt give the same tokens
//! with the cache on as with it off (greedy and seeded sampling), while the shared blocks are
//! computed once; and under KV pressure (preemption of sequences that share blocks, eviction of
//! cached blocks) nothing changes either.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod engine_common;

use engine_common::*;
use sluice_worker::engine::{EngineConfig, GenerationRequest, Prompt, SamplingParams};

/// `n` requests: a `shared`-token system prompt, then 3..=9 tokens of their own.
fn shared_prompt_requests(n: u64, shared: usize, params: impl Fn(u64) -> SamplingParams) -> Vec<GenerationRequest> {
    let system: Vec<u32> = (0..shared).map(|i| ((i * 37 + 11) % 700) as u32).collect();
    (0..n)
        .map(|i| {
            let mut p = system.clone();
            p.extend((0..3 + i % 7).map(|k| ((i * 101 + k * 13 + 5) % 700) as u32));
            request(i, Prompt::Tokens(p), params(i))
        })
        .collect()
}

fn run(cfg: &EngineConfig, reqs: Vec<GenerationRequest>) -> (Vec<Vec<u32>>, sluice_worker::engine::EngineStats) {
    let mut eng = engine(cfg);
    let out = eng.generate(reqs).unwrap();
    let tokens = out.into_iter().map(|(id, r)| r.unwrap_or_else(|e| panic!("request {id}: {e}")).token_ids).collect();
    (tokens, eng.stats())
}

fn on_off(model: &str, tweak: impl Fn(&mut EngineConfig)) -> (EngineConfig, EngineConfig) {
    let mut on = config(model);
    tweak(&mut on);
    let mut off = on.clone();
    off.prefix_caching = false;
    on.prefix_caching = true;
    (on, off)
}

#[test]
fn a_shared_system_prompt_is_computed_once_and_outputs_do_not_change() {
    for model in ["tiny-qwen2", "tiny-llama"] {
        let (on, off) = on_off(model, |_| {});
        let reqs = shared_prompt_requests(12, 70, |_| greedy(10));
        let (want, s_off) = run(&off, reqs.clone());
        let (got, s_on) = run(&on, reqs);
        assert_eq!(got, want, "{model}: tokens with the cache on");
        assert_eq!(s_off.prefix_cache_hit_tokens, 0);
        // 70 shared tokens = 4 full blocks of 16, found by the 11 requests after the first.
        assert_eq!(s_on.prefix_cache_hit_tokens, 11 * 64, "{model}: {s_on:?}");
        assert_eq!(s_on.prefix_cache_query_tokens, s_off.prefix_cache_query_tokens);
        assert!(s_on.prefix_cache_blocks >= 4);
        assert_eq!(s_on.kv_blocks_used, 0, "every block released");
        assert!(
            s_on.peak_kv_blocks < s_off.peak_kv_blocks,
            "shared blocks are held once: {} vs {}",
            s_on.peak_kv_blocks,
            s_off.peak_kv_blocks
        );
    }
}

#[test]
fn seeded_sampling_is_the_same_with_the_cache_on() {
    let (on, off) = on_off("tiny-qwen2", |_| {});
    let params = |i: u64| SamplingParams { max_tokens: 12, temperature: 0.9, top_p: 0.95, seed: 40 + i, ..SamplingParams::default() };
    let reqs = shared_prompt_requests(8, 40, params);
    assert_eq!(run(&on, reqs.clone()).0, run(&off, reqs).0);
}

#[test]
fn preemption_and_eviction_under_kv_pressure_change_no_tokens() {
    // 14 blocks of 16: a few sequences of ~90 tokens at a time; sharers get preempted and
    // cached blocks are evicted for new contents.
    let (on, off) = on_off("tiny-qwen2", |c| c.num_kv_blocks = Some(14));
    let mut reqs = shared_prompt_requests(10, 50, |_| greedy(30));
    // Requests with other prefixes in between, so that the shared blocks compete for space.
    for i in 0..6u64 {
        let p: Vec<u32> = (0..60).map(|k| ((i * 53 + k * 7 + 300) % 700) as u32).collect();
        reqs.push(request(100 + i, Prompt::Tokens(p), greedy(20)));
    }
    let (want, s_off) = run(&off, reqs.clone());
    let (got, s_on) = run(&on, reqs);
    assert_eq!(got, want);
    assert!(s_off.preemptions > 0 && s_on.preemptions > 0, "expected preemptions: {s_on:?}");
    assert!(s_on.prefix_cache_evictions > 0, "expected evictions: {s_on:?}");
    assert!(s_on.prefix_cache_hit_tokens > 0);
    assert_eq!(s_on.kv_blocks_used, 0);
    assert_eq!(s_on.requests_finished, 16);
}
