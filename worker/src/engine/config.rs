//! Model architecture description: parses a hub `config.json` (Qwen2, Llama, Mistral) into one
//! [`ArchConfig`], and names the built-in shapes used for random-weight benchmarks.
//! It knows nothing of weights, devices or requests.

use std::path::Path;

use serde_json::Value;

use super::error::EngineError;

/// The model families the engine implements; they share one transformer block shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `Qwen2ForCausalLM` (Qwen2 and Qwen2.5): QKV bias.
    Qwen2,
    /// `LlamaForCausalLM` (Llama 2/3, with Llama-3 RoPE scaling).
    Llama,
    /// `MistralForCausalLM`, the Llama shape (sliding window unsupported beyond max length).
    Mistral,
}

impl Arch {
    /// The architecture names accepted in `config.json`'s `architectures`.
    pub const SUPPORTED: [&'static str; 3] = ["Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"];

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            _ => None,
        }
    }
}

/// Llama-3 style frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Everything the batched model needs to know about a checkpoint's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchConfig {
    pub arch: Arch,
    /// Name reported in outputs (directory name or preset name).
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn bad(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::ModelFile { path: path.to_path_buf(), msg: msg.into() }
}

fn req_usize(v: &Value, key: &str, path: &Path) -> Result<usize, EngineError> {
    v.get(key)
        .and_then(Value::as_u64)
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| bad(path, format!("missing or invalid integer field `{key}`")))
}

fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// `eos_token_id` may be an integer or a list of integers.
pub(crate) fn token_id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect(),
        _ => Vec::new(),
    }
}

impl ArchConfig {
    /// Parses a `config.json` document; `path` is only used in error messages.
    pub fn from_json(v: &Value, path: &Path, name: &str) -> Result<Self, EngineError> {
        let archs: Vec<&str> =
            v.get("architectures").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let arch = match archs.iter().find_map(|a| Arch::from_name(a)) {
            Some(a) => a,
            None => {
                let found = if archs.is_empty() {
                    v.get("model_type").and_then(Value::as_str).unwrap_or("<none>").to_string()
                } else {
                    archs.join(", ")
                };
                return Err(EngineError::UnsupportedArchitecture { path: path.to_path_buf(), found });
            }
        };
        let hidden_size = req_usize(v, "hidden_size", path)?;
        let num_heads = req_usize(v, "num_attention_heads", path)?;
        let num_kv_heads = v.get("num_key_value_heads").and_then(Value::as_u64).map_or(num_heads, |x| x as usize);
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(path, format!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")));
        }
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(d) => d as usize,
            None => {
                if !hidden_size.is_multiple_of(num_heads) {
                    return Err(bad(path, "hidden_size is not a multiple of num_attention_heads"));
                }
                hidden_size / num_heads
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(bad(path, format!("head_dim {head_dim} must be even for RoPE")));
        }
        // transformers 5 writes `rope_parameters` (theta inside); older configs `rope_theta` +
        // `rope_scaling`.
        let rope_params = v.get("rope_parameters").filter(|x| x.is_object()).or_else(|| v.get("rope_scaling").filter(|x| x.is_object()));
        let rope_theta = opt_f64(v, "rope_theta").or_else(|| rope_params.and_then(|p| opt_f64(p, "rope_theta"))).unwrap_or(10_000.0) as f32;
        let rope_scaling = match rope_params {
            None => None,
            Some(p) => {
                let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => Some(Llama3RopeScaling {
                        factor: opt_f64(p, "factor").unwrap_or(8.0) as f32,
                        low_freq_factor: opt_f64(p, "low_freq_factor").unwrap_or(1.0) as f32,
                        high_freq_factor: opt_f64(p, "high_freq_factor").unwrap_or(4.0) as f32,
                        original_max_position_embeddings: p
                            .get("original_max_position_embeddings")
                            .and_then(Value::as_u64)
                            .map_or(8192, |x| x as usize),
                    }),
                    other => {
                        return Err(bad(path, format!("unsupported rope scaling type `{other}`")));
                    }
                }
            }
        };
        let qkv_bias = match arch {
            Arch::Qwen2 => true,
            Arch::Llama | Arch::Mistral => v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
        };
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(bad(path, format!("unsupported hidden_act `{act}` (only silu)")));
        }
        Ok(Self {
            arch,
            name: name.to_string(),
            vocab_size: req_usize(v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size", path)?,
            num_layers: req_usize(v, "num_hidden_layers", path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: v.get("max_position_embeddings").and_then(Value::as_u64).map_or(4096, |x| x as usize),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias,
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).and_then(|x| u32::try_from(x).ok()),
            eos_token_ids: token_id_list(v.get("eos_token_id")),
        })
    }

    /// The names `preset` knows.
    pub const PRESETS: [&'static str; 6] = ["qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b", "mistral-7b", "tiny-qwen2"];

    /// Built-in shapes for random-weight benchmarks (`PRESETS`): the published configs of
    /// Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-7B and Mistral-7B-v0.3, and
    /// `tiny-qwen2` (the test model's shape).
    pub fn preset(name: &str) -> Option<Self> {
        let base = |arch, vocab, hidden, inter, layers, heads, kv, maxpos, tie, theta: f32| Self {
            arch,
            name: name.to_string(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-6,
            rope_theta: theta,
            rope_scaling: None,
            max_position_embeddings: maxpos,
            tie_word_embeddings: tie,
            qkv_bias: arch == Arch::Qwen2,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        };
        match name {
            "qwen2.5-0.5b" => Some(base(Arch::Qwen2, 151_936, 896, 4864, 24, 14, 2, 32_768, true, 1_000_000.0)),
            "llama-3.2-1b" => {
                let mut c = base(Arch::Llama, 128_256, 2048, 8192, 16, 32, 8, 131_072, true, 500_000.0);
                c.rms_norm_eps = 1e-5;
                c.rope_scaling = Some(Llama3RopeScaling {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                });
                Some(c)
            }
            "llama-3.1-8b" => {
                let mut c = base(Arch::Llama, 128_256, 4096, 14_336, 32, 32, 8, 131_072, false, 500_000.0);
                c.rms_norm_eps = 1e-5;
                c.rope_scaling = Some(Llama3RopeScaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                });
                Some(c)
            }
            "qwen2.5-7b" => Some(base(Arch::Qwen2, 152_064, 3584, 18_944, 28, 28, 4, 32_768, false, 1_000_000.0)),
            "mistral-7b" => {
                // Mistral-7B-v0.3: the Llama block, a 32,768-token vocabulary, no sliding window.
                let mut c = base(Arch::Mistral, 32_768, 4096, 14_336, 32, 32, 8, 32_768, false, 1_000_000.0);
                c.rms_norm_eps = 1e-5;
                Some(c)
            }
            "tiny-qwen2" => Some(base(Arch::Qwen2, 768, 64, 176, 2, 4, 2, 4096, true, 1_000_000.0)),
            _ => None,
        }
    }

    /// Bytes of K and V cache one token takes in `dtype_size`-byte elements, over all layers.
    pub fn kv_bytes_per_token(&self, dtype_size: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size
    }

    /// Inverse RoPE frequencies, computed in f32 like transformers does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let mut inv: Vec<f32> = (0..d).step_by(2).map(|i| 1.0 / self.rope_theta.powf(i as f32 / d as f32)).collect();
        if let Some(s) = self.rope_scaling {
            let old = s.original_max_position_embeddings as f32;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for x in &mut inv {
                let wavelen = 2.0 * std::f32::consts::PI / *x;
                if wavelen < high_wavelen {
                    // high frequency: unchanged
                } else if wavelen > low_wavelen {
                    *x /= s.factor;
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *x = (1.0 - smooth) * *x / s.factor + smooth * *x;
                }
            }
        }
        inv
    }
}

/// Engine switches for experiments and debugging, all on their production default unless the
/// environment says otherwise. [`EngineSwitches::from_env`] is the one place the engine reads
/// the environment; the worker and `sluice-bench` call it once and pass the result in
/// `EngineConfig::switches`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineSwitches {
    /// Per-kernel timing table (`SLUICE_PROFILE=1`); also turns off overlapped steps.
    pub profile: bool,
    /// The paged-attention kernel on CUDA (`SLUICE_PAGED_ATTENTION=0` falls back to dense).
    pub paged_attention: bool,
    /// Tensor-core attention where the head size allows (`SLUICE_ATTN_MMA=0` turns it off).
    pub attn_tensor_cores: bool,
    /// Chunked tensor-core prefill attention (`SLUICE_ATTN_PREFILL=off` turns it off).
    pub attn_prefill_chunks: bool,
    /// Double-buffered head_dim-64 tensor-core kernel (`SLUICE_ATTN_PIPELINE=1`; off by default:
    /// 4 % slower on an H200, docs/BENCHMARKS.md attempt 13).
    pub attn_pipelined: bool,
    /// Greedy argmax on the GPU (`SLUICE_DEVICE_ARGMAX=0` copies logits to the host).
    pub device_argmax: bool,
    /// Overlap a greedy step with scheduling the next (`SLUICE_ASYNC_STEPS=0` turns it off).
    pub async_steps: bool,
    /// cudarc's per-allocation event tracking (`SLUICE_CUDA_EVENT_TRACKING=1` keeps it on).
    pub cuda_event_tracking: bool,
    /// One-row projections (decode at batch 1) through the engine's GEMV kernel instead of
    /// cuBLAS (`SLUICE_SMALL_LINEAR=0` turns it off; `fp8::SMALL_LINEAR_WINS`).
    pub small_linear: bool,
    /// Decode steps of up to `model::GRAPH_MAX_BATCH` sequences replayed as CUDA graphs
    /// (`SLUICE_CUDA_GRAPHS=0` turns them off).
    pub cuda_graphs: bool,
    /// Steps of at least `model::SPLIT_MIN_SEQS` sequences run as two halves on two CUDA
    /// streams (`model::split_plan`), one half's attention beside the other's GEMMs
    /// (`SLUICE_NANO_BATCHES=1`; off by default until measured: docs/engine.md).
    pub nano_batches: bool,
}

impl Default for EngineSwitches {
    fn default() -> Self {
        Self {
            profile: false,
            paged_attention: true,
            attn_tensor_cores: true,
            attn_prefill_chunks: true,
            attn_pipelined: false,
            device_argmax: true,
            async_steps: true,
            cuda_event_tracking: false,
            small_linear: true,
            cuda_graphs: true,
            nano_batches: false,
        }
    }
}

impl EngineSwitches {
    /// The environment variables the switches read.
    pub const VARIABLES: [&'static str; 11] = [
        "SLUICE_PROFILE",
        "SLUICE_PAGED_ATTENTION",
        "SLUICE_ATTN_MMA",
        "SLUICE_ATTN_PREFILL",
        "SLUICE_ATTN_PIPELINE",
        "SLUICE_DEVICE_ARGMAX",
        "SLUICE_ASYNC_STEPS",
        "SLUICE_CUDA_EVENT_TRACKING",
        "SLUICE_SMALL_LINEAR",
        "SLUICE_CUDA_GRAPHS",
        "SLUICE_NANO_BATCHES",
    ];

    /// The switches from the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The switches from any variable lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let [profile, paged, mma, prefill, pipeline, argmax, steps, events, small, graphs, nano] = Self::VARIABLES;
        let is = |name: &str, value: &str| get(name).as_deref() == Some(value);
        let d = Self::default();
        Self {
            profile: is(profile, "1"),
            paged_attention: d.paged_attention && !is(paged, "0"),
            attn_tensor_cores: d.attn_tensor_cores && !is(mma, "0"),
            attn_prefill_chunks: d.attn_prefill_chunks && !is(prefill, "off"),
            attn_pipelined: is(pipeline, "1"),
            device_argmax: d.device_argmax && !is(argmax, "0"),
            async_steps: d.async_steps && !is(steps, "0"),
            cuda_event_tracking: is(events, "1"),
            small_linear: d.small_linear && !is(small, "0"),
            cuda_graphs: d.cuda_graphs && !is(graphs, "0"),
            nano_batches: is(nano, "1"),
        }
    }
}

#[cfg(test)]
mod switch_tests {
    use super::EngineSwitches;
    use std::collections::HashMap;

    #[test]
    fn switches_default_on_the_production_path_and_read_each_variable() {
        assert_eq!(EngineSwitches::from_lookup(|_| None), EngineSwitches::default());
        let env: HashMap<&str, &str> = [
            ("SLUICE_PROFILE", "1"),
            ("SLUICE_PAGED_ATTENTION", "0"),
            ("SLUICE_ATTN_MMA", "0"),
            ("SLUICE_ATTN_PREFILL", "off"),
            ("SLUICE_ATTN_PIPELINE", "1"),
            ("SLUICE_DEVICE_ARGMAX", "0"),
            ("SLUICE_ASYNC_STEPS", "0"),
            ("SLUICE_CUDA_EVENT_TRACKING", "1"),
            ("SLUICE_SMALL_LINEAR", "0"),
            ("SLUICE_CUDA_GRAPHS", "0"),
            ("SLUICE_NANO_BATCHES", "1"),
        ]
        .into_iter()
        .collect();
        let s = EngineSwitches::from_lookup(|k| env.get(k).map(|v| (*v).to_string()));
        let flipped = EngineSwitches {
            profile: true,
            paged_attention: false,
            attn_tensor_cores: false,
            attn_prefill_chunks: false,
            attn_pipelined: true,
            device_argmax: false,
            async_steps: false,
            cuda_event_tracking: true,
            small_linear: false,
            cuda_graphs: false,
            nano_batches: true,
        };
        assert_eq!(s, flipped);
        // Values other than the documented ones leave the default.
        let odd = EngineSwitches::from_lookup(|k| (k == "SLUICE_PAGED_ATTENTION").then(|| "no".to_string()));
        assert!(odd.paged_attention);
    }
}
