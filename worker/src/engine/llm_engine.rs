//! The synchronous engine core: owns the model, KV cache, scheduler and text codec, turns
//! requests into sequences and runs one scheduled forward pass per `step`, returning finished
//! requests. It has no threads or channels (see `handle`); per-request failures never stop it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use serde_json::Value;
use tokenizers::Tokenizer;

use super::config::{ArchConfig, EngineSwitches};
use super::device::{self, DeviceKind};
use super::error::{EngineError, RequestError};
use super::kv_cache::{KvCache, blocks_for};
use super::model::{LastToken, Model, PendingStep, SeqInput};
use super::sampling::{self, SamplingParams};
use super::scheduler::{Limits, PENDING, Scheduled, Scheduler, Sequence};
use super::tokenizer::{Prompt, TextCodec};
use sluice_api::job::{Dtype, KvCacheDtype};

/// How to load and run a model.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Hub-layout model directory (config.json, safetensors, tokenizer files).
    pub model_dir: PathBuf,
    pub device: DeviceKind,
    /// Weight precision; `Auto` = f32 on CPU, bf16 on CUDA.
    pub dtype: Dtype,
    /// KV cache elements: `Auto` = the activation dtype, `Fp8` = E4M3 at unit scale.
    pub kv_cache_dtype: KvCacheDtype,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass (prefill chunks + decode tokens).
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Fraction of GPU memory the engine may use (weights + KV cache + activations).
    pub gpu_memory_utilization: f32,
    /// Exact number of KV blocks (overrides every budget; for tests).
    pub num_kv_blocks: Option<usize>,
    /// KV cache size in bytes on CPU (default 256 MiB); also overrides the GPU fraction.
    pub kv_cache_bytes: Option<u64>,
    /// Cap on prompt + completion length (default: the model's `max_position_embeddings`).
    pub max_model_len: Option<usize>,
    /// Let a greedy step stay in flight while the next one is scheduled and enqueued (default
    /// true; `switches.async_steps = false` and profiling turn it off).
    pub overlap_steps: bool,
    /// Share the K/V of identical full prompt blocks between requests (default true).
    pub prefix_caching: bool,
    /// Kernel and debugging switches (the binaries fill them from the environment).
    pub switches: EngineSwitches,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model_dir: PathBuf::new(),
            device: DeviceKind::Cpu,
            dtype: Dtype::Auto,
            kv_cache_dtype: KvCacheDtype::Auto,
            max_num_seqs: 256,
            max_num_batched_tokens: 4096,
            block_size: 16,
            gpu_memory_utilization: 0.90,
            num_kv_blocks: None,
            kv_cache_bytes: None,
            max_model_len: None,
            overlap_steps: true,
            prefix_caching: true,
            switches: EngineSwitches::default(),
        }
    }
}

/// One request to the engine. `id` must be unique among requests in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub id: u64,
    pub prompt: Prompt,
    pub params: SamplingParams,
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the model's maximum length.
    Length,
}

impl FinishReason {
    /// OpenAI spelling: `stop` / `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    pub id: u64,
    /// Completion text, special tokens skipped, cut before a matched stop string.
    pub text: String,
    /// Generated token ids (an EOS that ended the completion included).
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
    /// Time from `add_request` to the first generated token.
    pub ttft: Duration,
    /// Time from `add_request` to completion.
    pub total: Duration,
}

/// A snapshot of the engine's load and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub peak_kv_blocks: usize,
    pub block_size: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub requests_finished: u64,
    pub requests_failed: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Tokens run in the last step and the most in any step (never above the budget).
    pub last_step_tokens: usize,
    pub max_step_tokens: usize,
    /// Steps enqueued while the previous step was still in flight (`overlap_steps`).
    pub overlapped_steps: u64,
    /// Decode steps launched as a CUDA graph (`EngineSwitches::cuda_graphs`).
    pub graph_steps: u64,
    /// Steps run as two halves on two streams (`EngineSwitches::nano_batches`), and those of
    /// them that also prefilled.
    pub split_steps: u64,
    pub split_prefill_steps: u64,
    /// Tokens of admitted sequences and how many of them came from the prefix cache.
    pub prefix_cache_query_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
    /// Blocks registered in the prefix cache now, and cached blocks evicted so far.
    pub prefix_cache_blocks: usize,
    pub prefix_cache_evictions: u64,
}

/// Result of one request, as `step` returns it.
pub type StepOutput = (u64, Result<GenerationOutput, RequestError>);

/// The batched inference engine.
pub struct LlmEngine {
    model: Model,
    cache: KvCache,
    sched: Scheduler,
    codec: TextCodec,
    name: String,
    max_model_len: usize,
    arrivals: u64,
    ids_in_flight: HashSet<u64>,
    pending: Vec<StepOutput>,
    stats: EngineStats,
    /// The step launched by the previous `step` call whose tokens are not read yet.
    in_flight: Option<InFlight>,
    /// Whether a step whose sequences all sample greedily may stay in flight while the next
    /// one is scheduled and enqueued (`SLUICE_ASYNC_STEPS=0` turns it off; the profiler does).
    overlap_steps: bool,
    /// The layers' projections are FP8 (`dtype: fp8`).
    fp8: bool,
}

/// A launched step: its pending samples and, per scheduled sequence, its id and the index in
/// `tokens` of the `PENDING` placeholder its sample replaces (None: a prefill chunk that
/// wanted no logits).
struct InFlight {
    step: PendingStep,
    seqs: Vec<(u64, Option<usize>)>,
}

fn read_config(dir: &Path) -> Result<Value, EngineError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::ModelFile {
        path: path.clone(),
        msg: if e.kind() == std::io::ErrorKind::NotFound { "file not found".into() } else { format!("cannot read: {e}") },
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::ModelFile { path, msg: format!("invalid JSON: {e}") })
}

impl LlmEngine {
    /// Loads the model directory named by `cfg` onto its device.
    pub fn load(cfg: &EngineConfig) -> Result<Self, EngineError> {
        let dir = &cfg.model_dir;
        if !dir.is_dir() {
            return Err(EngineError::ModelFile { path: dir.clone(), msg: "model directory not found".into() });
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
        let json = read_config(dir)?;
        let arch = ArchConfig::from_json(&json, &dir.join("config.json"), &name)?;
        let codec = TextCodec::load(dir, &arch.eos_token_ids)?;
        let device = device::make_device(cfg.device, &cfg.switches)?;
        let dtype = device::resolve_dtype(cfg.dtype, &device);
        let weights = super::weights::Weights::load(dir, &device, dtype)?;
        Self::build(arch, weights, codec, device, cfg)
    }

    /// A model of `arch`'s shape with random weights (benchmarks). Without a tokenizer only
    /// `Prompt::Tokens` works and outputs have empty text.
    pub fn random(arch: ArchConfig, tokenizer: Option<Tokenizer>, cfg: &EngineConfig) -> Result<Self, EngineError> {
        let device = device::make_device(cfg.device, &cfg.switches)?;
        let dtype = device::resolve_dtype(cfg.dtype, &device);
        let weights = super::weights::Weights::Random { std: 0.02, dtype, device: device.clone() };
        let codec = TextCodec::from_tokenizer(tokenizer, arch.eos_token_ids.clone());
        Self::build(arch, weights, codec, device, cfg)
    }

    fn build(
        arch: ArchConfig,
        weights: super::weights::Weights,
        codec: TextCodec,
        device: Device,
        cfg: &EngineConfig,
    ) -> Result<Self, EngineError> {
        if cfg.block_size == 0 || cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 {
            return Err(EngineError::Config("block_size, max_num_seqs and max_num_batched_tokens must be positive".into()));
        }
        let mut max_model_len = cfg.max_model_len.unwrap_or(arch.max_position_embeddings).min(arch.max_position_embeddings);
        let dtype: DType = weights.dtype();
        let fp8 = match cfg.dtype {
            Dtype::Fp8 => Some(super::fp8::Fp8Mode::for_device(&device)?),
            _ => None,
        };
        let model = Model::new(&arch, &weights, &device, max_model_len, &cfg.switches, fp8.as_ref())?;
        // The checkpoint's tensors (bf16 copies of quantized projections included) go before the
        // free memory is measured for the KV cache.
        drop(weights);
        device.synchronize()?;
        let useful = cfg.max_num_seqs * blocks_for(max_model_len, cfg.block_size);
        let budget = device::KvBudget {
            block_size: cfg.block_size,
            gpu_memory_utilization: cfg.gpu_memory_utilization,
            num_kv_blocks: cfg.num_kv_blocks,
            kv_cache_bytes: cfg.kv_cache_bytes,
            max_num_batched_tokens: cfg.max_num_batched_tokens,
        };
        let kv_dtype = match cfg.kv_cache_dtype {
            KvCacheDtype::Auto => dtype,
            KvCacheDtype::Fp8 if device.is_cuda() && !model.paged_attention() => {
                return Err(EngineError::Config(format!(
                    "kv_cache_dtype fp8 on CUDA needs the paged attention kernel, which this model does not run ({} heads, {} KV heads, head_dim {}, {dtype:?}; SLUICE_PAGED_ATTENTION off?)",
                    arch.num_heads, arch.num_kv_heads, arch.head_dim
                )));
            }
            KvCacheDtype::Fp8 => DType::F8E4M3,
        };
        let num_blocks = device::kv_blocks(&arch, dtype, kv_dtype, &device, &budget, useful)?;
        // One sequence must always fit alone, or preemption could not make progress.
        let capacity = num_blocks * cfg.block_size;
        if capacity < max_model_len {
            tracing::warn!(capacity, max_model_len, "KV cache smaller than max model length; capping it");
            max_model_len = capacity;
        }
        let cache = KvCache::new(arch.num_layers, num_blocks, cfg.block_size, arch.num_kv_heads * arch.head_dim, kv_dtype, &device)?;
        // On the per-thread default stream (split steps) the engine may run on another thread
        // than the one that loaded it: the uploads and the cache's zeroing finish first.
        device.synchronize()?;
        tracing::info!(
            model = %arch.name,
            ?dtype,
            ?kv_dtype,
            num_blocks,
            block_size = cfg.block_size,
            max_model_len,
            "engine ready"
        );
        let sched = Scheduler::new(
            Limits {
                max_num_seqs: cfg.max_num_seqs,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                block_size: cfg.block_size,
                prefix_caching: cfg.prefix_caching,
            },
            num_blocks,
        );
        let stats = EngineStats { kv_blocks_total: num_blocks, block_size: cfg.block_size, ..EngineStats::default() };
        Ok(Self {
            name: arch.name.clone(),
            cache,
            sched,
            codec,
            max_model_len,
            arrivals: 0,
            overlap_steps: cfg.overlap_steps && cfg.switches.async_steps && !model.profiling(),
            fp8: fp8.is_some(),
            model,
            ids_in_flight: HashSet::new(),
            pending: Vec::new(),
            stats,
            in_flight: None,
        })
    }

    /// Forgets the per-phase times so far (`SLUICE_PROFILE=1`), e.g. after a warm-up.
    pub fn profile_reset(&self) {
        self.model.profile_reset();
    }

    /// The per-phase timing table when `SLUICE_PROFILE=1`, else None.
    pub fn profile_report(&self) -> Option<String> {
        self.model.profile_report()
    }

    pub fn model_name(&self) -> &str {
        &self.name
    }

    /// Longest prompt + completion, in tokens.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn arch(&self) -> &ArchConfig {
        self.model.config()
    }

    /// The device's name (`cpu` or `cuda:N`).
    pub fn device_name(&self) -> String {
        match self.model.device().location() {
            candle_core::DeviceLocation::Cpu => "cpu".into(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }

    /// The device's name as its driver reports it (`NVIDIA H100 80GB HBM3`, ...), or `cpu`.
    pub fn device_label(&self) -> String {
        device::device_label(self.model.device())
    }

    /// The KV cache's element type, as `kv_cache_dtype` resolved it.
    pub fn kv_cache_dtype(&self) -> DType {
        self.cache.dtype().unwrap_or(self.model.dtype())
    }

    /// The dtype of activations and unquantized weights (bf16 for `fp8` on CUDA).
    pub fn dtype(&self) -> DType {
        self.model.dtype()
    }

    /// The precision as configured: `fp8` when the projections are E4M3, else the dtype.
    pub fn dtype_label(&self) -> String {
        if self.fp8 { "fp8".into() } else { format!("{:?}", self.dtype()).to_lowercase() }
    }

    /// The text of token ids, as outputs carry it (empty without a tokenizer).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.codec.decode(ids)
    }

    /// Tokenizes a prompt as the engine would (chat template included).
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, RequestError> {
        self.codec.encode_prompt(prompt)
    }

    /// Renders chat messages with the model's chat template.
    pub fn render_chat(&self, m: &[super::tokenizer::ChatMessage]) -> Result<String, RequestError> {
        self.codec.render_chat(m)
    }

    /// Queues a request. Problems with it (bad prompt, too long, ...) come back from the next
    /// `step` as that request's error.
    pub fn add_request(&mut self, r: GenerationRequest) {
        let arrived = Instant::now();
        match self.prepare(&r) {
            Ok(tokens) => {
                self.ids_in_flight.insert(r.id);
                self.arrivals += 1;
                let rng = r.params.rng();
                self.sched.add(Sequence {
                    id: r.id,
                    arrival: self.arrivals,
                    prompt_len: tokens.len(),
                    max_len: (tokens.len() + r.params.max_tokens).min(self.max_model_len),
                    tokens,
                    params: r.params,
                    num_computed: 0,
                    blocks: Vec::new(),
                    hashes: Vec::new(),
                    cached_blocks: 0,
                    rng,
                    arrived,
                    first_token: None,
                    preemptions: 0,
                });
            }
            Err(e) => {
                self.stats.requests_failed += 1;
                self.pending.push((r.id, Err(e)));
            }
        }
    }

    fn prepare(&self, r: &GenerationRequest) -> Result<Vec<u32>, RequestError> {
        if self.ids_in_flight.contains(&r.id) {
            return Err(RequestError::DuplicateId(r.id));
        }
        r.params.validate().map_err(RequestError::Invalid)?;
        let tokens = self.codec.encode_prompt(&r.prompt)?;
        if tokens.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if tokens.len() > self.max_model_len {
            return Err(RequestError::PromptTooLong { len: tokens.len(), max: self.max_model_len });
        }
        let vocab = self.model.config().vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(RequestError::Invalid(format!("token id {bad} outside the vocabulary of {vocab}")));
        }
        Ok(tokens)
    }

    /// True while requests are queued, running, or have results not yet returned.
    pub fn has_work(&self) -> bool {
        self.sched.has_work() || !self.pending.is_empty() || self.in_flight.is_some()
    }

    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.clone();
        s.running = self.sched.running.len();
        s.waiting = self.sched.waiting.len();
        s.kv_blocks_used = self.sched.allocator.num_used();
        s.preemptions = self.sched.preemptions;
        s.graph_steps = self.model.graph_steps();
        (s.split_steps, s.split_prefill_steps) = self.model.split_steps();
        s.prefix_cache_query_tokens = self.sched.prefix_query_tokens;
        s.prefix_cache_hit_tokens = self.sched.prefix_hit_tokens;
        s.prefix_cache_blocks = self.sched.allocator.num_cached();
        s.prefix_cache_evictions = self.sched.allocator.counters.evictions;
        s
    }

    /// Fails every request in flight (after an engine error) and frees their blocks.
    pub fn abort_all(&mut self, reason: &str) -> Vec<StepOutput> {
        self.in_flight = None;
        let mut out = std::mem::take(&mut self.pending);
        while !self.sched.running.is_empty() {
            let seq = self.sched.finish(0);
            out.push((seq.id, Err(RequestError::Engine(reason.to_string()))));
        }
        for seq in self.sched.waiting.drain(..) {
            out.push((seq.id, Err(RequestError::Engine(reason.to_string()))));
        }
        self.sched.allocator.clear_cache();
        self.stats.requests_failed += out.iter().filter(|(_, r)| r.is_err()).count() as u64;
        self.ids_in_flight.clear();
        out
    }

    /// Runs one scheduled forward pass; returns the requests that finished (or failed) by it.
    ///
    /// On a GPU a greedy step stays in flight: this call schedules and enqueues the next step
    /// (its placeholder tokens read on the device from the step in flight) before it waits for
    /// the step in flight's tokens, so the host's scheduling, input preparation and output
    /// handling overlap the GPU's work. A sequence that ends at step N (EOS, stop string) may
    /// have run one more token in step N + 1; that token is dropped.
    pub fn step(&mut self) -> Result<Vec<StepOutput>, EngineError> {
        let mut out = std::mem::take(&mut self.pending);
        let launched = self.launch()?;
        if let Some(prev) = self.in_flight.take() {
            self.complete(prev, &mut out)?;
        }
        if let Some(step) = launched {
            if self.overlap_steps && !step.step.samples_on_host() {
                self.in_flight = Some(step);
            } else {
                self.complete(step, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Schedules and enqueues one forward pass; marks every sampled token as a placeholder.
    fn launch(&mut self) -> Result<Option<InFlight>, EngineError> {
        let step_start = Instant::now();
        let plan = self.sched.schedule();
        if plan.is_empty() {
            return Ok(None);
        }
        let bs = self.cache.block_size();
        let inputs: Vec<SeqInput> = plan
            .iter()
            .map(|p| {
                let s = &self.sched.running[p.index];
                let end = s.num_computed + p.num_tokens;
                SeqInput {
                    tokens: s.tokens[s.num_computed..end].to_vec(),
                    start_pos: s.num_computed,
                    blocks: s.blocks[..blocks_for(end, bs)].to_vec(),
                    want_logits: end == s.tokens.len(),
                }
            })
            .collect();
        let step_tokens: usize = plan.iter().map(|p| p.num_tokens).sum();
        self.model.prof(|p| p.host_span("schedule", step_start.elapsed().as_secs_f64() * 1e3));
        let full: Vec<bool> = plan.iter().map(|p| !self.sched.running[p.index].params.is_greedy()).collect();
        let prev = self.in_flight.as_ref().map(|f| &f.step.ids);
        self.stats.overlapped_steps += u64::from(prev.is_some());
        let Some(step) = self.model.launch(&inputs, &mut self.cache, &full, prev)? else {
            // No sequence wanted logits (prefill chunks only): nothing to sample.
            for p in &plan {
                self.sched.running[p.index].num_computed += p.num_tokens;
            }
            self.count_step(step_tokens);
            return Ok(None);
        };
        let mut seqs = Vec::with_capacity(plan.len());
        for (i, &Scheduled { index, num_tokens }) in plan.iter().enumerate() {
            let seq = &mut self.sched.running[index];
            seq.num_computed += num_tokens;
            let at = step.row_of(i).map(|row| {
                seq.tokens.push(PENDING | row as u32);
                seq.tokens.len() - 1
            });
            seqs.push((seq.id, at));
        }
        self.count_step(step_tokens);
        Ok(Some(InFlight { step, seqs }))
    }

    fn count_step(&mut self, step_tokens: usize) {
        self.stats.steps += 1;
        self.stats.last_step_tokens = step_tokens;
        self.stats.max_step_tokens = self.stats.max_step_tokens.max(step_tokens);
        self.stats.peak_kv_blocks = self.stats.peak_kv_blocks.max(self.sched.allocator.num_used());
    }

    /// Waits for a launched step's samples, puts them in place of their placeholders and
    /// finishes the sequences they end. A sequence may have been preempted since (it is found
    /// among the waiting ones) or have ended already (its sample is dropped).
    fn complete(&mut self, step: InFlight, out: &mut Vec<StepOutput>) -> Result<(), EngineError> {
        let samples = self.model.collect(step.step)?;
        let now = Instant::now();
        let running: std::collections::HashMap<u64, usize> = self.sched.running.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        let mut finished_running: Vec<(usize, FinishReason, Option<String>)> = Vec::new();
        let mut finished_waiting: Vec<(u64, FinishReason, Option<String>)> = Vec::new();
        for ((id, at), sample) in step.seqs.into_iter().zip(samples) {
            let (Some(at), Some(sample)) = (at, sample) else { continue };
            let (seq, index) = match running.get(&id) {
                Some(&i) => (&mut self.sched.running[i], Some(i)),
                None => match self.sched.waiting.iter_mut().find(|s| s.id == id) {
                    Some(s) => (s, None),
                    None => continue,
                },
            };
            if seq.tokens.get(at).is_none_or(|&t| t & PENDING == 0) {
                continue;
            }
            let tok = match sample {
                LastToken::Logits(l) => sampling::sample(&l, &seq.params, &mut seq.rng),
                LastToken::Argmax(id) => id,
            };
            seq.tokens[at] = tok;
            seq.first_token.get_or_insert(now);
            if let Some((reason, text)) = finish_reason(&self.codec, seq, at + 1, self.max_model_len) {
                // Anything sampled after the ending token (by the step launched since) goes.
                seq.tokens.truncate(at + 1);
                match index {
                    Some(i) => finished_running.push((i, reason, text)),
                    None => finished_waiting.push((id, reason, text)),
                }
            }
        }
        // Remove from the back so indices stay valid.
        finished_running.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut ended: Vec<(Sequence, FinishReason, Option<String>)> = Vec::new();
        for (index, reason, text) in finished_running {
            ended.push((self.sched.finish(index), reason, text));
        }
        for (id, reason, text) in finished_waiting {
            if let Some(i) = self.sched.waiting.iter().position(|s| s.id == id)
                && let Some(mut seq) = self.sched.waiting.remove(i)
            {
                self.sched.release_blocks(&mut seq);
                ended.push((seq, reason, text));
            }
        }
        for (seq, reason, text) in ended {
            self.ids_in_flight.remove(&seq.id);
            let completion = seq.tokens[seq.prompt_len..].to_vec();
            let text = text.unwrap_or_else(|| self.codec.decode(&completion));
            self.stats.prompt_tokens += seq.prompt_len as u64;
            self.stats.completion_tokens += completion.len() as u64;
            self.stats.requests_finished += 1;
            out.push((
                seq.id,
                Ok(GenerationOutput {
                    id: seq.id,
                    text,
                    prompt_tokens: seq.prompt_len,
                    completion_tokens: completion.len(),
                    token_ids: completion,
                    finish_reason: reason,
                    ttft: seq.first_token.unwrap_or(now) - seq.arrived,
                    total: now - seq.arrived,
                }),
            ));
        }
        self.model.prof(|p| p.host_span("postprocess", now.elapsed().as_secs_f64() * 1e3));
        Ok(())
    }

    /// Logits of teacher-forced steps, for numerical checks: step 0 runs every prompt in one
    /// ragged prefill pass; step k runs the k-th forced token of every sequence in one batched
    /// decode pass. Returns `logits[seq][step]`. Needs an idle engine (no requests in flight).
    pub fn teacher_forced_logits(&mut self, seqs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<Vec<Vec<f32>>>, EngineError> {
        if self.sched.has_work() || self.in_flight.is_some() {
            return Err(EngineError::Config("teacher_forced_logits needs an idle engine".into()));
        }
        let bs = self.cache.block_size();
        let mut tables: Vec<Vec<u32>> = Vec::new();
        let result = (|| -> Result<Vec<Vec<Vec<f32>>>, EngineError> {
            for (prompt, forced) in seqs {
                let n = blocks_for(prompt.len() + forced.len(), bs);
                let t = self
                    .sched
                    .allocator
                    .allocate(n)
                    .ok_or_else(|| EngineError::Config("not enough KV blocks for teacher forcing".into()))?;
                tables.push(t);
            }
            let steps = 1 + seqs.iter().map(|(_, f)| f.len()).max().unwrap_or(0);
            let mut out = vec![Vec::new(); seqs.len()];
            for step in 0..steps {
                let mut inputs = Vec::new();
                let mut who = Vec::new();
                for (i, (prompt, forced)) in seqs.iter().enumerate() {
                    let (tokens, start) = if step == 0 {
                        (prompt.clone(), 0)
                    } else if let Some(&t) = forced.get(step - 1) {
                        (vec![t], prompt.len() + step - 1)
                    } else {
                        continue;
                    };
                    let end = start + tokens.len();
                    inputs.push(SeqInput {
                        tokens,
                        start_pos: start,
                        blocks: tables[i][..blocks_for(end, bs)].to_vec(),
                        want_logits: true,
                    });
                    who.push(i);
                }
                let logits = self.model.forward(&inputs, &mut self.cache)?;
                for (i, l) in who.into_iter().zip(logits) {
                    out[i].push(l.unwrap_or_default());
                }
            }
            Ok(out)
        })();
        for t in &mut tables {
            self.sched.allocator.release(t);
        }
        result
    }

    /// Runs `requests` to completion and returns their results in request order.
    pub fn generate(&mut self, requests: Vec<GenerationRequest>) -> Result<Vec<StepOutput>, EngineError> {
        let order: Vec<u64> = requests.iter().map(|r| r.id).collect();
        for r in requests {
            self.add_request(r);
        }
        let mut done = Vec::new();
        while self.has_work() {
            done.extend(self.step()?);
        }
        let mut sorted = Vec::with_capacity(done.len());
        for id in order {
            if let Some(i) = done.iter().position(|(d, _)| *d == id) {
                sorted.push(done.swap_remove(i));
            }
        }
        sorted.extend(done);
        Ok(sorted)
    }
}

/// Why the sequence ends with its first `len` tokens (the newest sampled last), if it does:
/// EOS, a stop string (with the text cut before it), or length.
fn finish_reason(codec: &TextCodec, seq: &Sequence, len: usize, max_model_len: usize) -> Option<(FinishReason, Option<String>)> {
    let tok = *seq.tokens.get(len.checked_sub(1)?)?;
    let generated = len.saturating_sub(seq.prompt_len);
    if !seq.params.ignore_eos && codec.eos_ids().contains(&tok) {
        Some((FinishReason::Stop, None))
    } else if let Some(text) = stop_text(codec, seq, len) {
        Some((FinishReason::Stop, Some(text)))
    } else if generated >= seq.params.max_tokens || len >= max_model_len {
        Some((FinishReason::Length, None))
    } else {
        None
    }
}

/// If the completion in the first `len` tokens contains a stop string, the text cut before the
/// earliest one.
fn stop_text(codec: &TextCodec, seq: &Sequence, len: usize) -> Option<String> {
    if seq.params.stop.is_empty() {
        return None;
    }
    let completion = seq.tokens.get(seq.prompt_len..len)?;
    // A stop string not seen at the previous token can only end in the newest token, so only
    // a tail of the completion is decoded per step (a full decode per token per sequence is
    // quadratic in the output length): enough tokens for the longest stop string even at four
    // byte-level tokens per character, plus slack for the window's ragged first token.
    let longest = seq.params.stop.iter().map(|s| s.chars().count()).max().unwrap_or(0);
    let window = 4 * longest + 8;
    if completion.len() > window {
        let tail = codec.decode(&completion[completion.len() - window..]);
        if !seq.params.stop.iter().any(|s| tail.contains(s.as_str())) {
            return None;
        }
    }
    let text = codec.decode(completion);
    seq.params.stop.iter().filter_map(|s| text.find(s.as_str())).min().map(|at| text[..at].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlmEngine {
        let arch = ArchConfig::preset("tiny-qwen2").unwrap();
        let cfg = EngineConfig { max_num_seqs: 16, num_kv_blocks: Some(64), block_size: 4, ..EngineConfig::default() };
        LlmEngine::random(arch, None, &cfg).unwrap()
    }

    fn req(id: u64, ids: &[u32]) -> GenerationRequest {
        GenerationRequest {
            id,
            prompt: Prompt::Tokens(ids.to_vec()),
            params: SamplingParams { max_tokens: 6, ignore_eos: true, ..SamplingParams::default() },
        }
    }

    /// Prefill chunks of equal length are attended as one group; the result must equal each
    /// prompt run alone (and different prompts of the same length must not mix).
    #[test]
    fn grouped_prefill_matches_single_runs() {
        let prompts: [&[u32]; 5] =
            [&[5, 9, 13, 2, 7, 7], &[5, 9, 13, 2, 7, 7], &[100, 3, 40, 41, 42, 8], &[11, 12, 13], &[300, 301, 302, 303, 304, 305]];
        // One engine throughout: random weights differ between engines.
        let mut eng = tiny();
        let mut alone = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let out = eng.generate(vec![req(i as u64, p)]).unwrap();
            alone.push(out[0].1.as_ref().unwrap().token_ids.clone());
        }
        let batch: Vec<_> = prompts.iter().enumerate().map(|(i, p)| req(i as u64, p)).collect();
        let together = eng.generate(batch).unwrap();
        for (i, (id, r)) in together.iter().enumerate() {
            assert_eq!(*id, i as u64);
            assert_eq!(r.as_ref().unwrap().token_ids, alone[i], "request {i}");
        }
        assert_eq!(alone[0], alone[1]);
        let tf: Vec<(Vec<u32>, Vec<u32>)> = prompts.iter().map(|p| (p.to_vec(), vec![1, 2])).collect();
        let batched = eng.teacher_forced_logits(&tf).unwrap();
        for (i, seq) in tf.iter().enumerate() {
            let single = eng.teacher_forced_logits(std::slice::from_ref(seq)).unwrap();
            for (step, (a, b)) in batched[i].iter().zip(&single[0]).enumerate() {
                let max = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(max > 0.0 && err <= 1e-4 * max, "prompt {i} step {step}: {err} vs {max}");
            }
        }
        assert!(batched[0][0] != batched[2][0], "different prompts, different logits");
    }
}
