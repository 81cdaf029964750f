//! The worker process: logging, signals, metrics server, shard preparation, model fetch and
//! load, the shard run (or the plan/finalize step), and the mapping of every outcome to the
//! contract's exit code. The
//! `sluice-worker` binary is a thin wrapper; local mode may call [`main_with`] in-process.

use std::sync::Arc;

use crate::cli::{Args, LogFormat, MetricsAddr, Step};
use crate::engine::{EngineConfig, EngineError, EngineHandle, EngineSwitches};
use crate::metrics::{self, WorkerMetrics};
use crate::model_fetch;
use crate::report::ReportClient;
use crate::runtime::{PreparedShard, RunError};
use crate::signals;
use crate::steps;
use sluice_api::contract::exit;

/// Run the worker with parsed arguments; returns the process exit code. Installs the global
/// tracing subscriber and builds its own async runtime.
pub fn main_with(args: Args) -> i32 {
    init_logging(args.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return exit::RETRYABLE;
        }
    };
    let status = rt.block_on(run(args));
    // Abandoned requests may still hold the engine thread; do not wait for them.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    status
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: local mode and pods write logs to files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // Already installed when the worker runs inside another program: keep that one.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn engine_error_is_permanent(e: &EngineError) -> bool {
    !matches!(e, EngineError::Candle(_) | EngineError::Thread(_))
}

async fn run(args: Args) -> i32 {
    let stop = match signals::stop_signal() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return exit::RETRYABLE;
        }
    };
    let report = match ReportClient::new(args.report_url.as_deref(), args.report_token.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            return exit::USAGE;
        }
    };
    let shard = match args.step {
        Step::Plan => return steps::plan(&args, report.as_ref()).await,
        Step::Finalize => return steps::finalize(&args, report.as_ref()).await,
        Step::Close => return steps::close(&args, report.as_ref(), stop).await,
        Step::Shard => match args.shard {
            Some(s) => s,
            None => {
                tracing::error!("the shard step needs --shard or {}", sluice_api::contract::env::JOB_COMPLETION_INDEX);
                return exit::USAGE;
            }
        },
    };
    let metrics = Arc::new(WorkerMetrics::new());
    if let MetricsAddr::Addr(addr) = args.metrics_addr {
        match metrics::serve(addr, metrics.clone()).await {
            Ok(bound) => tracing::info!(%bound, "serving /metrics and /healthz"),
            Err(e) => tracing::warn!(%addr, error = %e, "cannot serve metrics; going on without them"),
        }
    }
    let mut cfg = args.run_config(shard);
    cfg.report = report;
    tracing::info!(shard = cfg.shard, output = %cfg.output_uri, model = %args.model, attempt = %cfg.attempt, "starting");

    // Nothing is committed before the engine runs, so a stop here just exits.
    let mut stop_wait = stop.clone();
    let prepare = async {
        let mut prepared = PreparedShard::prepare(cfg).await?;
        let done = prepared.finish_if_done().await?;
        Ok::<_, RunError>((prepared, done))
    };
    let prepared = tokio::select! {
        r = prepare => match r {
            Ok((_, Some(done))) => return done.exit_code(),
            Ok((p, None)) => p,
            Err(e) => return fail(&e),
        },
        _ = stop_wait.wait_for(|s| *s) => {
            tracing::info!("stopped while preparing the shard");
            return exit::TERMINATED;
        }
    };

    // Model: fetch (if remote) and load on the engine thread, abandoned at once on SIGTERM.
    let load = async {
        let dir = model_fetch::ensure_model(&args.model, &args.storage(), &args.model_cache_dir())
            .await
            .map_err(|e| (e.is_permanent(), format!("model {}: {e}", args.model)))?;
        let engine_cfg = EngineConfig {
            model_dir: dir,
            device: args.device(),
            dtype: args.dtype,
            kv_cache_dtype: args.kv_cache_dtype,
            max_num_seqs: args.max_batch_size.max(1),
            max_model_len: args.max_model_len,
            kv_cache_bytes: args.kv_cache_mb.map(|mb| mb << 20),
            prefix_caching: args.prefix_caching,
            switches: EngineSwitches::from_env(),
            ..EngineConfig::default()
        };
        let started = std::time::Instant::now();
        let handle = tokio::task::spawn_blocking(move || EngineHandle::spawn(engine_cfg))
            .await
            .map_err(|e| (false, format!("engine loader: {e}")))?
            .map_err(|e| (engine_error_is_permanent(&e), format!("model {}: {e}", args.model)))?;
        tracing::info!(model = %handle.info().name, device = %handle.info().device, secs = started.elapsed().as_secs_f64(), "model loaded");
        Ok::<_, (bool, String)>(handle)
    };
    let engine = tokio::select! {
        r = load => match r {
            Ok(h) => h,
            Err((permanent, msg)) => {
                tracing::error!(permanent, "{msg}");
                return if permanent { exit::PERMANENT } else { exit::RETRYABLE };
            }
        },
        _ = stop_wait.wait_for(|s| *s) => {
            tracing::info!("stopped while loading the model");
            return exit::TERMINATED;
        }
    };

    let status = match prepared.run(&engine, &metrics, stop).await {
        Ok(outcome) => {
            tracing::info!(?outcome, "shard run ended");
            outcome.exit_code()
        }
        Err(e) => fail(&e),
    };
    // Requests abandoned at a stop would delay a clean engine shutdown; exit instead.
    std::mem::forget(engine);
    status
}

fn fail(e: &RunError) -> i32 {
    tracing::error!(permanent = e.is_permanent(), "shard failed: {e}");
    e.exit_code()
}
