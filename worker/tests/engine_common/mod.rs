//! Shared helpers of the engine tests: the tiny models under `models/`, their transformers
//! reference fixtures, engine construction and float comparison.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use serde_json::Value;
use sluice_worker::engine::{ChatMessage, EngineConfig, GenerationRequest, LlmEngine, Prompt, SamplingParams};

pub const MODELS: [&str; 2] = ["tiny-qwen2", "tiny-llama"];

/// Whether the GPU parts of the tests run (`SLUICE_TEST_CUDA=1`); says so when they do not.
pub fn cuda_requested() -> bool {
    let on = std::env::var("SLUICE_TEST_CUDA").as_deref() == Ok("1");
    if !on {
        eprintln!("skipped (the CUDA part): set SLUICE_TEST_CUDA=1 (needs --features cuda and a GPU)");
    }
    on
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_dir(name: &str) -> PathBuf {
    repo_root().join("models").join(name)
}

pub struct Case {
    pub kind: String,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub rendered: Option<String>,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
}

impl Case {
    pub fn prompt(&self) -> Prompt {
        match (&self.messages, &self.prompt) {
            (Some(m), _) => Prompt::Chat(m.clone()),
            (None, Some(p)) => Prompt::Text(p.clone()),
            _ => Prompt::Tokens(self.prompt_ids.clone()),
        }
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn reference(name: &str) -> Vec<Case> {
    reference_at(&repo_root().join("worker/tests/fixtures").join(format!("reference_{name}.json")))
}

/// The cases of a reference file in the fixtures' format (scripts/make_tiny_models.py,
/// scripts/accuracy_reference.py).
pub fn reference_at(path: &std::path::Path) -> Vec<Case> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).unwrap();
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            kind: c["kind"].as_str().unwrap().to_string(),
            prompt: c["prompt"].as_str().map(str::to_string),
            messages: c.get("messages").map(|m| serde_json::from_value(m.clone()).unwrap()),
            rendered: c["rendered"].as_str().map(str::to_string),
            prompt_ids: ids(&c["prompt_ids"]),
            greedy_ids: ids(&c["greedy_ids"]),
            logits: c["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
                .collect(),
        })
        .collect()
}

pub fn config(name: &str) -> EngineConfig {
    EngineConfig { model_dir: model_dir(name), num_kv_blocks: Some(256), max_model_len: Some(512), ..EngineConfig::default() }
}

pub fn engine(cfg: &EngineConfig) -> LlmEngine {
    LlmEngine::load(cfg).unwrap_or_else(|e| panic!("loading {}: {e}", cfg.model_dir.display()))
}

pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

pub fn request(id: u64, prompt: Prompt, params: SamplingParams) -> GenerationRequest {
    GenerationRequest { id, prompt, params }
}

/// max |a - b| / max |b|: relative to the scale of the reference logits.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "logit vector lengths differ");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    let diff = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}
