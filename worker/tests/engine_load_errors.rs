//! Bad model directories: each error names the file and says what is wrong with it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod engine_common;

use std::path::Path;

use engine_common::*;
use sluice_worker::engine::{EngineError, LlmEngine};

fn copy_model(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(model_dir(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

fn load_err(dir: &Path) -> EngineError {
    let mut cfg = config("tiny-qwen2");
    cfg.model_dir = dir.to_path_buf();
    match LlmEngine::load(&cfg) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn missing_config_json() {
    let d = copy_model("tiny-qwen2");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = load_err(d.path()).to_string();
    assert!(e.contains("config.json") && e.contains("not found"), "{e}");
}

#[test]
fn missing_tokenizer_json() {
    let d = copy_model("tiny-qwen2");
    std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
    let e = load_err(d.path()).to_string();
    assert!(e.contains("tokenizer.json") && e.contains("not found"), "{e}");
}

#[test]
fn missing_weights() {
    let d = copy_model("tiny-qwen2");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load_err(d.path()).to_string();
    assert!(e.contains("model.safetensors") && e.contains("not found"), "{e}");
}

#[test]
fn missing_shard_named_by_index() {
    let d = copy_model("tiny-llama");
    std::fs::remove_file(d.path().join("model-00003-of-00005.safetensors")).unwrap();
    let e = load_err(d.path()).to_string();
    assert!(e.contains("model-00003-of-00005.safetensors") && e.contains("not found"), "{e}");
}

#[test]
fn unsupported_architecture() {
    let d = copy_model("tiny-qwen2");
    edit_config(d.path(), |v| v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]));
    let e = load_err(d.path());
    assert!(matches!(e, EngineError::UnsupportedArchitecture { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("config.json") && e.contains("GPT2LMHeadModel"), "{e}");
}

#[test]
fn tensor_shape_mismatch() {
    let d = copy_model("tiny-qwen2");
    edit_config(d.path(), |v| v["intermediate_size"] = serde_json::json!(200));
    let e = load_err(d.path());
    assert!(matches!(e, EngineError::ShapeMismatch { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("model.safetensors") && e.contains("mlp") && e.contains("200"), "{e}");
}

#[test]
fn corrupt_safetensors_header() {
    let d = copy_model("tiny-qwen2");
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&p, bytes).unwrap();
    let e = load_err(d.path());
    assert!(matches!(e, EngineError::CorruptSafetensors { .. }), "{e:?}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn invalid_config_json() {
    let d = copy_model("tiny-qwen2");
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    let e = load_err(d.path()).to_string();
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let d = copy_model("tiny-llama");
    edit_config(d.path(), |v| v["num_hidden_layers"] = serde_json::json!(3));
    let e = load_err(d.path()).to_string();
    assert!(e.contains("model.layers.2."), "{e}");
}

#[test]
fn random_weights_engine_runs() {
    use sluice_worker::engine::{ArchConfig, Prompt};
    let arch = ArchConfig::preset("tiny-qwen2").unwrap();
    let mut cfg = config("tiny-qwen2");
    cfg.model_dir = Default::default();
    let mut eng = LlmEngine::random(arch, None, &cfg).unwrap();
    let out = eng.generate(vec![request(1, Prompt::Tokens(vec![1, 2, 3]), greedy(5))]).unwrap().remove(0).1.unwrap();
    assert_eq!(out.completion_tokens, 5);
    for name in ArchConfig::PRESETS {
        let a = ArchConfig::preset(name).unwrap_or_else(|| panic!("preset {name}"));
        assert_eq!(a.head_dim * a.num_heads, a.hidden_size, "{name}");
    }
    let l8 = ArchConfig::preset("llama-3.1-8b").unwrap();
    assert_eq!((l8.num_layers, l8.num_kv_heads, l8.intermediate_size, l8.tie_word_embeddings), (32, 8, 14_336, false));
    assert!(ArchConfig::preset("qwen2.5-7b").unwrap().qkv_bias);
    assert!(ArchConfig::preset("gpt-5").is_none());
}
