//! The inference engine: hub model directories (Qwen2, Llama, Mistral) loaded with candle,
//! run with continuous batching over a paged KV cache, on CPU (f32) or CUDA (bf16).
//! It knows nothing of shards, storage or output files: the runtime feeds it requests.
//!
//! [`LlmEngine`] is the synchronous core (tests, benchmarks); [`EngineHandle`] runs it on its
//! own thread for the async runtime. See `docs/engine.md` for the design.

pub mod config;
pub mod cuda_ops;
pub mod device;
pub mod error;
pub mod fp8;
pub mod handle;
pub mod kv_cache;
pub mod llm_engine;
pub mod model;
pub mod profile;
pub mod sampling;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ArchConfig, EngineSwitches, Llama3RopeScaling};
pub use device::DeviceKind;
pub use error::{EngineError, RequestError};
pub use handle::{EngineHandle, ModelInfo};
pub use llm_engine::{EngineConfig, EngineStats, FinishReason, GenerationOutput, GenerationRequest, LlmEngine, StepOutput};
pub use sampling::SamplingParams;
pub use tokenizer::{ChatMessage, Prompt};
pub use tokenizers::Tokenizer;
