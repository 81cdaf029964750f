//! The worker's invocation contract: flags and the environment variables of
//! `sluice_api::contract::env` (a pod and local mode set the same ones), turned into a
//! [`RunConfig`] and engine settings. Documented in `docs/worker.md`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Parser, ValueEnum};
use sluice_api::contract::env;
use sluice_api::job::{Dtype, InputFormat, KvCacheDtype, NotRun, SamplingSpec};
use sluice_api::lines::DEFAULT_MAX_LINE_BYTES;
use sluice_api::storage::{CaBundle, RetryPolicy, StorageOptions};

use crate::engine::DeviceKind;
use crate::runtime::{FaultConfig, RunConfig};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What a worker process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Step {
    /// Process one shard and commit its results once (the Indexed Job's pods).
    #[default]
    Shard,
    /// Plan the input into shards (write `plan.json` once) and report the plan's size.
    Plan,
    /// Write `manifest.json` from the committed shards and report its counts.
    Finalize,
    /// Close a cancelled or expired job: every request of every shard that never ran goes to
    /// the error files with the close's code, then `manifest.json` is written and reported.
    Close,
}

/// `sluice-worker`: process one shard of a BatchInferenceJob and commit its results once (or
/// plan its input, or write its manifest, for jobs whose storage only their pods can reach).
#[derive(Parser, Debug, Clone)]
#[command(name = "sluice-worker", version, about)]
pub struct Args {
    /// What to do.
    #[arg(value_enum, default_value = "shard")]
    pub step: Step,
    /// Shard index (the Indexed Job's completion index); required by the shard step.
    #[arg(long, env = env::JOB_COMPLETION_INDEX)]
    pub shard: Option<u32>,
    /// Output prefix URI (file://, s3://, gs://, az:// or a local path).
    #[arg(long, env = env::OUTPUT_URI)]
    pub output: String,
    /// Model directory: a local path or an object-store prefix.
    #[arg(long, env = env::MODEL_URI)]
    pub model: String,
    /// The plan's URI [default: <output>/_sluice/plan.json].
    #[arg(long, env = env::PLAN_URI)]
    pub plan: Option<String>,
    /// Input JSONL object [default: the plan's inputUri].
    #[arg(long, env = env::INPUT_URI)]
    pub input: Option<String>,
    /// Input line format.
    #[arg(long, env = env::INPUT_FORMAT, default_value = "auto", value_parser = parse_format)]
    pub input_format: InputFormat,
    /// Model dtype: auto, bf16, f16, f32 or fp8 (E4M3 weights and activations; Hopper or Ada for the fast path).
    #[arg(long, env = env::MODEL_DTYPE, default_value = "auto", value_parser = Dtype::from_str)]
    pub dtype: Dtype,
    /// KV cache element type: auto (the activation dtype) or fp8 (E4M3 at unit scale, half the
    /// memory of bf16 per token of context).
    #[arg(long, env = env::KV_CACHE_DTYPE, default_value = "auto", value_parser = KvCacheDtype::from_str)]
    pub kv_cache_dtype: KvCacheDtype,
    /// Longest prompt plus completion, in tokens [default: the model's].
    #[arg(long, env = env::MAX_MODEL_LEN)]
    pub max_model_len: Option<usize>,
    /// Where object-store models are downloaded (shared by shards on a node).
    #[arg(long, env = env::MODEL_CACHE_DIR)]
    pub model_cache_dir: Option<PathBuf>,
    /// Sampling defaults, the JSON form of the job's `sampling` (camelCase keys).
    #[arg(long, env = env::SAMPLING, default_value = "{}", value_parser = parse_sampling)]
    pub sampling: SamplingSpec,
    /// Most sequences in one batch.
    #[arg(long, env = env::MAX_BATCH_SIZE, default_value_t = 64)]
    pub max_batch_size: usize,
    /// S3-compatible endpoint (and Azure endpoint).
    #[arg(long, env = env::STORAGE_ENDPOINT)]
    pub storage_endpoint: Option<String>,
    /// Bucket region.
    #[arg(long, env = env::STORAGE_REGION)]
    pub storage_region: Option<String>,
    /// Path-style S3 addressing.
    #[arg(long, env = env::STORAGE_PATH_STYLE, default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub storage_path_style: bool,
    /// Allow plain-HTTP storage endpoints.
    #[arg(long, env = env::STORAGE_ALLOW_HTTP, default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub storage_allow_http: bool,
    /// PEM file of extra CA certificates to trust for HTTPS storage endpoints (the operator
    /// mounts `spec.storage.caBundle` and sets it).
    #[arg(long, env = env::STORAGE_CA_FILE)]
    pub storage_ca_file: Option<PathBuf>,
    /// Retries of a failing storage request.
    #[arg(long, env = env::STORAGE_MAX_RETRIES, default_value_t = 6)]
    pub storage_max_retries: usize,
    /// `/metrics` and `/healthz` address, or `none`.
    #[arg(long, env = env::METRICS_ADDR, default_value = "0.0.0.0:9090", value_parser = parse_metrics_addr)]
    pub metrics_addr: MetricsAddr,
    /// Job name (key of the stable request ids) [default: the output URI].
    #[arg(long, env = env::JOB_NAME)]
    pub job_name: Option<String>,
    /// Name of this attempt in progress records [default: $HOSTNAME or the process id].
    #[arg(long, env = env::ATTEMPT)]
    pub attempt: Option<String>,
    /// Log format.
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value = "text", ignore_case = true)]
    pub log_format: LogFormat,
    /// `cpu`, `cuda` or `cuda:N` [default: cuda when built with it, else cpu].
    #[arg(long, env = env::DEVICE, value_parser = parse_device)]
    pub device: Option<DeviceKind>,
    /// Lines per output chunk (chunk boundaries are fixed multiples of it).
    #[arg(long, env = env::CHUNK_LINES, default_value_t = 64)]
    pub chunk_lines: u64,
    /// Commit finished lines at least this often, in seconds.
    #[arg(long, env = env::CHUNK_SECONDS, default_value_t = 10.0)]
    pub chunk_seconds: f64,
    /// Progress record interval, in seconds.
    #[arg(long, env = env::PROGRESS_SECONDS, default_value_t = 10.0)]
    pub progress_seconds: f64,
    /// Seconds from SIGTERM to exit (keep below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = env::GRACE_SECONDS, default_value_t = 25.0)]
    pub grace_seconds: f64,
    /// Longest input line, in bytes.
    #[arg(long, env = env::MAX_LINE_BYTES, default_value_t = DEFAULT_MAX_LINE_BYTES)]
    pub max_line_bytes: usize,
    /// KV cache size on CPU, in MiB [default: the engine's].
    #[arg(long, env = env::KV_CACHE_MB)]
    pub kv_cache_mb: Option<u64>,
    /// Share the KV blocks of identical prompt prefixes between requests (content-hashed full
    /// blocks; the shard's requests are queued so that shared prefixes run together).
    #[arg(long, env = env::PREFIX_CACHING, default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub prefix_caching: bool,
    /// Where to POST reports to the operator (plan, progress, manifest) [default: none].
    #[arg(long, env = env::REPORT_URL)]
    pub report_url: Option<String>,
    /// Bearer token of those reports.
    #[arg(long, env = env::REPORT_TOKEN, hide_env_values = true)]
    pub report_token: Option<String>,
    /// Plan step: lines per shard [default: automatic, by size].
    #[arg(long, env = env::REQUESTS_PER_SHARD)]
    pub requests_per_shard: Option<u32>,
    /// Plan step: the job's most workers (the automatic shard size uses it).
    #[arg(long, env = env::MAX_WORKERS, default_value_t = 1)]
    pub max_workers: i32,
    /// Finalize step: shards that failed within the job's tolerance (`1,3-5`).
    #[arg(long, env = env::FAILED_SHARDS)]
    pub failed_shards: Option<String>,
    /// Close step: the code of each request that never ran (`batch_cancelled`,
    /// `batch_expired` or `shard_failed`).
    #[arg(long, env = env::CLOSE_CODE, value_parser = NotRun::from_str)]
    pub close_code: Option<NotRun>,
    /// Close step: the shards to close (`1,3-5`) [default: every shard not among the failed ones].
    #[arg(long, env = env::CLOSE_SHARDS)]
    pub close_shards: Option<String>,
    /// Finalize step: the input URI as the job names it, for the manifest [default: the plan's].
    #[arg(long, env = env::SPEC_INPUT_URI)]
    pub spec_input_uri: Option<String>,
    /// Fault injection for tests (builds with the `fault-injection` feature): `error_rate=0.2,delay_rate=0.1,delay_ms=20,seed=1,permanent=false`.
    #[arg(long, env = env::INJECT_FAULTS, hide = true)]
    pub inject_faults: Option<FaultConfig>,
}

/// Where to serve metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Disabled,
    Addr(SocketAddr),
}

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.eq_ignore_ascii_case("none") || s.is_empty() {
        return Ok(MetricsAddr::Disabled);
    }
    s.parse().map(MetricsAddr::Addr).map_err(|e| format!("{s:?} is not host:port or none: {e}"))
}

fn parse_format(s: &str) -> Result<InputFormat, String> {
    serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase())).map_err(|_| format!("{s:?} is not auto, openai or prompts"))
}

fn parse_sampling(s: &str) -> Result<SamplingSpec, String> {
    let spec: SamplingSpec = serde_json::from_str(s).map_err(|e| format!("not a sampling spec: {e}"))?;
    if spec.max_tokens == 0 || !(0.0..=2.0).contains(&spec.temperature) || !(spec.top_p > 0.0 && spec.top_p <= 1.0) {
        return Err("maxTokens must be ≥ 1, temperature in [0, 2], topP in (0, 1]".into());
    }
    Ok(spec)
}

fn parse_device(s: &str) -> Result<DeviceKind, String> {
    match s.to_ascii_lowercase().as_str() {
        "cpu" => Ok(DeviceKind::Cpu),
        "cuda" | "gpu" => Ok(DeviceKind::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceKind::Cuda)
            .ok_or_else(|| format!("{s:?} is not cpu, cuda or cuda:N")),
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(if s.is_finite() && s > 0.0 { s } else { 0.0 })
}

impl Args {
    /// The device to run on.
    pub fn device(&self) -> DeviceKind {
        self.device.unwrap_or(if cfg!(feature = "cuda") { DeviceKind::Cuda(0) } else { DeviceKind::Cpu })
    }

    /// Storage settings.
    pub fn storage(&self) -> StorageOptions {
        StorageOptions {
            endpoint: self.storage_endpoint.clone().filter(|e| !e.is_empty()),
            region: self.storage_region.clone().filter(|r| !r.is_empty()),
            path_style: self.storage_path_style,
            allow_http: self.storage_allow_http,
            retry: RetryPolicy { max_retries: self.storage_max_retries, ..RetryPolicy::default() },
            config: Default::default(),
            ca_bundle: self.storage_ca_file.clone().filter(|p| !p.as_os_str().is_empty()).map(CaBundle::File),
        }
    }

    /// The model cache directory.
    pub fn model_cache_dir(&self) -> PathBuf {
        self.model_cache_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("sluice-models"))
    }

    /// The shard run settings for shard `shard`.
    pub fn run_config(&self, shard: u32) -> RunConfig {
        RunConfig {
            shard,
            plan_uri: self.plan.clone().filter(|p| !p.is_empty()),
            input_uri: self.input.clone().filter(|p| !p.is_empty()),
            input_format: self.input_format,
            output_uri: self.output.clone(),
            job_key: self.job_name.clone().filter(|j| !j.is_empty()).unwrap_or_else(|| self.output.trim_end_matches('/').to_string()),
            attempt: self
                .attempt
                .clone()
                .or_else(|| std::env::var(env::HOSTNAME).ok())
                .unwrap_or_else(|| format!("pid-{}", std::process::id())),
            sampling: self.sampling.clone(),
            max_in_flight: self.max_batch_size.max(1) * 2,
            chunk_lines: self.chunk_lines.max(1),
            chunk_max_age: secs(self.chunk_seconds),
            progress_interval: secs(self.progress_seconds),
            grace: secs(self.grace_seconds),
            max_line_bytes: self.max_line_bytes,
            storage: self.storage(),
            faults: self.inject_faults.clone(),
            report: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's one writer and the worker's flags agree: every variable `to_env` writes is
    /// one the worker reads, into the field of the same meaning.
    #[test]
    fn the_contracts_invocation_parses_through_the_worker_flags() {
        use clap::CommandFactory;
        use sluice_api::contract::WorkerInvocation;

        let spec: sluice_api::BatchInferenceJobSpec = serde_json::from_value(serde_json::json!({
            "model": {"uri": "s3://models/qwen/", "dtype": "bf16", "maxModelLen": 4096},
            "input": {"uri": "s3://b/in.jsonl", "format": "openai"},
            "output": {"uri": "s3://b/out/"},
            "sampling": {"maxTokens": 32, "temperature": 0.5, "seed": 3},
            "sla": {"completionWindow": "1h"},
            "workers": {"gpus": 0, "maxBatchSize": 48},
            "storage": {"endpoint": "https://s3.example", "region": "eu-1", "pathStyle": false, "allowHttp": true}
        }))
        .unwrap();
        let inv = WorkerInvocation::for_job("team/job".into(), &spec, "/cache", "none");
        let cmd = Args::command();
        let mut argv = vec!["sluice-worker".to_string(), "--shard=0".to_string()];
        for (name, value) in inv.to_env().unwrap() {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_env() == Some(std::ffi::OsStr::new(name)))
                .unwrap_or_else(|| panic!("the worker reads no {name}"));
            argv.push(format!("--{}={value}", arg.get_long().unwrap()));
        }
        let a = Args::try_parse_from(&argv).unwrap();
        assert_eq!(a.job_name.as_deref(), Some("team/job"));
        assert_eq!(a.plan.as_deref(), Some("s3://b/out/_sluice/plan.json"));
        assert_eq!(a.input.as_deref(), Some("s3://b/in.jsonl"));
        assert_eq!(a.input_format, InputFormat::Openai);
        assert_eq!(a.output, "s3://b/out/");
        assert_eq!(a.model, "s3://models/qwen/");
        assert_eq!(a.dtype, Dtype::Bf16);
        assert_eq!(a.max_model_len, Some(4096));
        assert_eq!(a.model_cache_dir, Some(PathBuf::from("/cache")));
        assert_eq!(a.sampling, spec.sampling);
        assert_eq!(a.max_batch_size, 48);
        assert_eq!(a.metrics_addr, MetricsAddr::Disabled);
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(a.storage_endpoint.as_deref(), Some("https://s3.example"));
        assert_eq!(a.storage_region.as_deref(), Some("eu-1"));
        assert!(!a.storage_path_style && a.storage_allow_http);
        assert_eq!(a.device, Some(DeviceKind::Cpu));
    }

    #[test]
    fn a_bad_dtype_fails_at_the_flags_naming_the_choices() {
        let base = ["sluice-worker", "--shard=0", "--output=s3://b/out/", "--model=/m", "--metrics-addr=none"];
        let ok = Args::try_parse_from(base.iter().copied().chain(["--dtype=BF16"])).unwrap();
        assert_eq!(ok.dtype, Dtype::Bf16);
        let err = Args::try_parse_from(base.iter().copied().chain(["--dtype=bf61"])).unwrap_err().to_string();
        assert!(err.contains("bf61") && err.contains("auto, bf16, f16, f32 or fp8"), "{err}");
        assert_eq!(ok.kv_cache_dtype, KvCacheDtype::Auto);
        let fp8 = Args::try_parse_from(base.iter().copied().chain(["--kv-cache-dtype=FP8"])).unwrap();
        assert_eq!(fp8.kv_cache_dtype, KvCacheDtype::Fp8);
        let err = Args::try_parse_from(base.iter().copied().chain(["--kv-cache-dtype=int4"])).unwrap_err().to_string();
        assert!(err.contains("--kv-cache-dtype") && err.contains("int4") && err.contains("auto or fp8"), "{err}");
    }

    #[test]
    fn flags_parse_into_a_run_config() {
        let a = Args::try_parse_from([
            "sluice-worker",
            "--shard=3",
            "--output=s3://b/out/",
            "--model=/m",
            "--sampling={\"maxTokens\":5,\"seed\":2}",
            "--metrics-addr=none",
            "--device=cuda:1",
            "--storage-allow-http=true",
            "--input-format=prompts",
            "--log-format=json",
        ])
        .unwrap();
        assert_eq!(a.metrics_addr, MetricsAddr::Disabled);
        assert_eq!(a.device(), DeviceKind::Cuda(1));
        let c = a.run_config(a.shard.unwrap());
        assert_eq!((c.shard, c.sampling.max_tokens, c.sampling.seed, c.input_format), (3, 5, 2, InputFormat::Prompts));
        assert_eq!(c.job_key, "s3://b/out");
        assert!(c.storage.allow_http && c.storage.path_style);
        assert_eq!(c.storage.ca_bundle, None);
        let with_ca =
            Args::try_parse_from(["sluice-worker", "--shard=0", "--output=/o", "--model=/m", "--storage-ca-file=/etc/sluice/ca/ca.crt"])
                .unwrap();
        assert_eq!(with_ca.storage().ca_bundle, Some(CaBundle::File("/etc/sluice/ca/ca.crt".into())));
        assert_eq!(a.log_format, LogFormat::Json);
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for bad in [
            vec!["--shard=x"],
            vec!["--shard=1", "--sampling={\"maxTokens\":0}"],
            vec!["--shard=1", "--metrics-addr=nowhere"],
            vec!["--shard=1", "--device=tpu"],
            vec!["--shard=1", "--input-format=csv"],
        ] {
            let args = ["sluice-worker", "--output=/o", "--model=/m"].into_iter().chain(bad.iter().copied());
            let e = Args::try_parse_from(args).unwrap_err();
            assert_eq!(e.exit_code(), sluice_api::contract::exit::USAGE, "{bad:?}: {e}");
        }
    }
}
