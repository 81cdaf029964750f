//! Engine error types: [`EngineError`] for failures of the engine itself (loading, device,
//! a failed forward pass) and [`RequestError`] for one request that cannot be served.
//! A `RequestError` never stops the engine; an `EngineError` from `step` fails the batch.

use std::path::PathBuf;

/// A failure of the engine as a whole: the model could not be loaded or a step failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model file is missing, unreadable or not what it should be.
    #[error("{path}: {msg}", path = path.display())]
    ModelFile { path: PathBuf, msg: String },
    /// `config.json` names an architecture the engine does not implement.
    #[error(
        "{path}: unsupported architecture `{found}` (supported: Qwen2ForCausalLM, LlamaForCausalLM, MistralForCausalLM)",
        path = path.display()
    )]
    UnsupportedArchitecture { path: PathBuf, found: String },
    /// A tensor's shape differs from the one `config.json` implies.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}", path = path.display())]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    /// A tensor the model needs is in no weight file.
    #[error("{path}: tensor `{name}` not found", path = path.display())]
    MissingTensor { path: PathBuf, name: String },
    /// A safetensors file whose header or data cannot be parsed.
    #[error("{path}: corrupt safetensors file: {msg}", path = path.display())]
    CorruptSafetensors { path: PathBuf, msg: String },
    /// The engine configuration is invalid or the device cannot serve it.
    #[error("engine configuration: {0}")]
    Config(String),
    /// A tensor operation failed (device error, out of memory, ...).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The engine thread is gone.
    #[error("engine thread: {0}")]
    Thread(String),
}

impl EngineError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ModelFile { .. } => "model_file",
            Self::UnsupportedArchitecture { .. } => "unsupported_architecture",
            Self::ShapeMismatch { .. } => "shape_mismatch",
            Self::MissingTensor { .. } => "missing_tensor",
            Self::CorruptSafetensors { .. } => "corrupt_safetensors",
            Self::Config(_) => "config",
            Self::Candle(_) => "tensor_op",
            Self::Thread(_) => "thread",
        }
    }
}

/// Why one request got no completion. The engine goes on serving the others.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The prompt has more tokens than the model's maximum length allows.
    #[error("prompt has {len} tokens, more than the maximum of {max}")]
    PromptTooLong { len: usize, max: usize },
    /// The prompt has no tokens at all.
    #[error("prompt is empty")]
    EmptyPrompt,
    /// The chat template failed to render (or raised an exception).
    #[error("chat template: {0}")]
    Template(String),
    /// The prompt could not be tokenized (or the model has no tokenizer).
    #[error("tokenize: {0}")]
    Tokenize(String),
    /// Sampling parameters out of range, or token ids outside the vocabulary.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Another request with the same id is in flight.
    #[error("duplicate request id {0}")]
    DuplicateId(u64),
    /// The engine failed while this request was in flight.
    #[error("engine failure: {0}")]
    Engine(String),
    /// The engine was shut down before the request finished.
    #[error("engine shut down")]
    Shutdown,
    /// Not run: the job was closed (cancelled or expired) first.
    #[error("{}", .0.message())]
    Withdrawn(sluice_api::job::NotRun),
}

impl RequestError {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::PromptTooLong { .. } => "prompt_too_long",
            Self::EmptyPrompt => "empty_prompt",
            Self::Template(_) => "template",
            Self::Tokenize(_) => "tokenize",
            Self::Invalid(_) => "invalid",
            Self::DuplicateId(_) => "duplicate_id",
            Self::Engine(_) => "engine",
            Self::Shutdown => "shutdown",
            Self::Withdrawn(_) => "withdrawn",
        }
    }
}
