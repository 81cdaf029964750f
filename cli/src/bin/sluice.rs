//! `sluice`: the command-line tool. `sluice run job.yaml` runs a BatchInferenceJob on this
//! machine (local mode); `sluice status <output>` reads a job's state from its storage;
//! `sluice validate job.yaml` checks a manifest with the CRD's rules; `sluice serve --local` is the
//! OpenAI Batch API in front of local mode.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice_cli::local::{self, LocalError, RunOptions, WorkerCommand};
use sluice_operator::storage_io::{StoreOpener, UriOpener};

#[derive(Parser)]
#[command(name = "sluice", version, about = "Run batches of LLM requests before a deadline, on a cluster or on this machine")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a BatchInferenceJob manifest on this machine, with the same plan, workers and SLA core as on a cluster.
    Run {
        /// The BatchInferenceJob manifest (the YAML you would `kubectl apply`).
        manifest: PathBuf,
        /// Override spec.output.uri (a path, file:// or s3:// URI).
        #[arg(long)]
        output: Option<String>,
        /// Override spec.model.uri (a model directory).
        #[arg(long)]
        model: Option<String>,
        /// Most worker processes at once (default: cores on CPU, 1 on CUDA).
        #[arg(long)]
        max_workers: Option<u32>,
        /// Device for the workers.
        #[arg(long, value_parser = ["cpu", "cuda"])]
        device: Option<String>,
        /// Print the final summary as one JSON line instead of a table.
        #[arg(long)]
        json: bool,
        /// Write logs to this file (default: warnings only, to stderr).
        #[arg(long)]
        log_file: Option<PathBuf>,
        /// Directory for worker logs (default: <output>/_sluice/logs for local outputs).
        #[arg(long)]
        worker_log_dir: Option<PathBuf>,
        /// Hide the progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Seconds between progress polls.
        #[arg(long, default_value_t = 1.0)]
        poll_seconds: f64,
    },
    /// Print the state of a job (local or remote) from its output prefix: plan, progress, committed shards, manifest.
    Status {
        /// The job's output URI (path, file://, s3://, gs://, az://).
        output: String,
    },
    /// Validate a manifest with the CRD's schema and CEL rules, as the API server would.
    Validate { manifest: PathBuf },
    /// Quote a job before it starts: projected finish and GPU-hours within a GPU budget, and
    /// whether its deadline is feasible (exit status 1 when it is not).
    Quote {
        manifest: PathBuf,
        /// GPUs the job may use (default: workers.max workers' worth, or with --cluster the
        /// budget's).
        #[arg(long)]
        gpus: Option<u32>,
        /// Quote against the cluster of the kubeconfig: the GpuBudget that would cover the job,
        /// the jobs it runs, the model's learned profile (as `kubectl sluice quote`).
        #[arg(long)]
        cluster: bool,
        /// With --cluster: the operator's namespace (where the learned profiles are).
        #[arg(long, default_value = "sluice-system")]
        operator_namespace: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Serve the OpenAI Batch API (Files and Batches): `--local` runs batches as local-mode jobs,
    /// `--cluster` as BatchInferenceJobs in each tenant's namespace.
    Serve {
        /// Run batches on this machine (local mode), keeping files and batches under --data-dir.
        #[arg(long, conflicts_with = "cluster")]
        local: bool,
        /// Run each batch as a BatchInferenceJob in its tenant's namespace (kubeconfig or
        /// in-cluster credentials); files under the config's `cluster.storageUri`.
        #[arg(long)]
        cluster: bool,
        /// Address to listen on (port 0 picks a free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: std::net::SocketAddr,
        /// Where files, batches and their jobs are kept (survives restarts); `--local` only.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Server config: `models: {name: {uri, dtype, maxTokens, …}}` (default: the bundled tiny-qwen2).
        #[arg(long)]
        config: Option<PathBuf>,
        /// API keys file: `keys: {<sha256 of key>: tenant}`, `tenants: {tenant: limits}` (default: any key).
        #[arg(long)]
        keys: Option<PathBuf>,
        /// Write logs to this file (default: warnings only, to stderr).
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Run one shard as a worker (what `sluice run` starts; same as the `sluice-worker` binary).
    #[command(disable_help_flag = true)]
    Worker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

fn init_logs(log_file: Option<&PathBuf>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    match log_file {
        Some(path) => {
            let file = std::fs::File::create(path).map_err(|e| format!("cannot create log file {}: {e}", path.display()))?;
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .init();
        }
        None => {
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
                .with_writer(std::io::stderr)
                .init();
        }
    }
    Ok(())
}

fn serve_options(
    mode: (bool, bool),
    listen: std::net::SocketAddr,
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    keys: Option<PathBuf>,
) -> Result<sluice_cli::serve::ServeOptions, String> {
    use sluice_cli::serve::Mode;
    use sluice_cli::serve::config::{Auth, ServerConfig};
    let config = match config {
        Some(p) => ServerConfig::load(&p)?,
        None => ServerConfig::bundled(),
    };
    let auth = match keys {
        Some(p) => Auth::load(&p)?,
        None => Auth::Open,
    };
    let mode = match (mode, data_dir) {
        ((true, _), Some(data_dir)) => {
            std::fs::create_dir_all(&data_dir).map_err(|e| format!("cannot create --data-dir {}: {e}", data_dir.display()))?;
            let data_dir = data_dir.canonicalize().map_err(|e| format!("--data-dir {}: {e}", data_dir.display()))?;
            let sluice_program = std::env::current_exe().map_err(|e| format!("cannot locate the sluice binary: {e}"))?;
            Mode::Local { data_dir, sluice_program }
        }
        ((true, _), None) => return Err("--local needs --data-dir DIR (where files and batches are kept)".into()),
        ((false, true), None) => {
            if config.cluster.is_none() {
                return Err("--cluster needs --config with a `cluster:` section (storageUri, storage, workers); see docs/api.md".into());
            }
            auth.check_namespaces()?;
            Mode::Cluster
        }
        ((false, true), Some(_)) => return Err("--data-dir is for --local; on a cluster files live under cluster.storageUri".into()),
        ((false, false), _) => return Err("say where batches run: --local (this machine) or --cluster (BatchInferenceJobs)".into()),
    };
    Ok(sluice_cli::serve::ServeOptions { listen, config, auth, mode })
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("sluice: cannot start the async runtime: {e}");
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    sluice_api::tls::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Worker { args } => {
            use clap::Parser as _;
            let argv = std::iter::once(std::ffi::OsString::from("sluice-worker")).chain(args);
            match sluice_worker::cli::Args::try_parse_from(argv) {
                Ok(a) => ExitCode::from(u8::try_from(sluice_worker::app::main_with(a)).unwrap_or(1)),
                Err(e) => {
                    let _ = e.print();
                    ExitCode::from(u8::try_from(sluice_api::contract::exit::USAGE).unwrap_or(2))
                }
            }
        }
        Cmd::Serve { local, cluster, listen, data_dir, config, keys, log_file } => {
            if let Err(e) = init_logs(log_file.as_ref()) {
                eprintln!("sluice: {e}");
                return ExitCode::from(2);
            }
            match serve_options((local, cluster), listen, data_dir, config, keys) {
                Ok(opts) => {
                    let rt = match runtime() {
                        Ok(rt) => rt,
                        Err(c) => return c,
                    };
                    match rt.block_on(sluice_cli::serve::serve(opts)) {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => {
                            eprintln!("sluice serve: {e}");
                            ExitCode::FAILURE
                        }
                    }
                }
                Err(e) => {
                    eprintln!("sluice serve: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Quote { manifest, gpus, cluster, operator_namespace, json } => {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(c) => return c,
            };
            let quoted = rt.block_on(async {
                let against = if cluster {
                    let client = kube::Client::try_default()
                        .await
                        .map_err(|e| format!("cannot reach the Kubernetes API server (kubeconfig or in-cluster): {e}"))?;
                    sluice_cli::quote::Against::Cluster { client, operator_namespace, gpus }
                } else {
                    sluice_cli::quote::Against::Local { gpus }
                };
                sluice_cli::quote::quote(&manifest, jiff::Timestamp::now(), against).await
            });
            match quoted {
                Ok(q) => {
                    if json {
                        println!("{}", q.json());
                    } else {
                        print!("{}", q.text());
                    }
                    if q.quote.feasible { ExitCode::SUCCESS } else { ExitCode::FAILURE }
                }
                Err(e) => {
                    eprintln!("sluice quote: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Validate { manifest } => {
            let text = match std::fs::read_to_string(&manifest) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("sluice: cannot read {}: {e}", manifest.display());
                    return ExitCode::from(2);
                }
            };
            match sluice_api::validate::load_manifest(&text, &manifest.display().to_string()) {
                Ok(job) => {
                    println!("{}: valid BatchInferenceJob {:?}", manifest.display(), job.metadata.name.unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sluice: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Status { output } => {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(c) => return c,
            };
            let cwd = std::env::current_dir().unwrap_or_default();
            let uri = local::resolve_uri(&output, &cwd);
            let result = rt.block_on(async {
                let loc = UriOpener.open("output", &uri, None, &Default::default()).map_err(LocalError::from)?;
                local::print_status(&loc).await
            });
            match result {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sluice: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run { manifest, output, model, max_workers, device, json, log_file, worker_log_dir, no_progress, poll_seconds } => {
            if let Err(e) = init_logs(log_file.as_ref()) {
                eprintln!("sluice: {e}");
                return ExitCode::from(2);
            }
            let worker = match WorkerCommand::discover() {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let opts = RunOptions {
                manifest,
                output,
                model,
                max_workers,
                device,
                log_dir: worker_log_dir,
                worker,
                progress_bar: !no_progress && !json && std::io::stderr().is_terminal(),
                poll_interval: Duration::from_secs_f64(poll_seconds.clamp(0.05, 60.0)),
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(c) => return c,
            };
            match rt.block_on(local::run(opts)) {
                Ok(summary) => {
                    if json {
                        println!("{}", serde_json::to_string(&summary).unwrap_or_default());
                    } else {
                        if summary.status == "AlreadyComplete" {
                            println!("{} was already complete; nothing to do.", summary.job);
                        } else {
                            println!("{} finished.", summary.job);
                        }
                        print!("{}", summary.table());
                    }
                    ExitCode::SUCCESS
                }
                Err(e @ (LocalError::Manifest(_) | LocalError::ReadManifest { .. } | LocalError::Model(_) | LocalError::Input(_))) => {
                    eprintln!("sluice: {e}");
                    ExitCode::from(2)
                }
                Err(LocalError::Interrupted) => {
                    eprintln!("sluice: {}", LocalError::Interrupted);
                    ExitCode::from(130)
                }
                Err(e) => {
                    eprintln!("sluice: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
