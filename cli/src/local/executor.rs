//! The local stand-in for the Indexed Job controller: starts one `sluice-worker` process per
//! shard with the pod environment contract, at most as many at once as the SLA core wants,
//! retries failed shards like `backoffLimitPerIndex`, and stops workers gracefully on Ctrl-C.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use jiff::Timestamp;
use sluice_api::contract::{env, exit};
use sluice_api::job::{CloseReason, NotRun, OnDeadline};
use sluice_api::plan::ShardPlan;
use tokio::process::{Child, Command};

use super::{LocalError, LocalJob, RunOptions, committed_shards};
use sluice_control::scaler::{Observed, Scaler, ScalerState, WorkerFacts};
use sluice_control::sla::{SlaConfig, SlaDecision};
use sluice_control::status::summarize;
use sluice_operator::context::JobCache;
use sluice_operator::reconcile::read_progress;

/// How to start a worker process: a program and the arguments before the worker's own.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// This binary's own `worker` subcommand (the same code as the `sluice-worker` binary, so
    /// `cargo run --bin sluice` needs nothing else and versions cannot skew), or the program
    /// named by `SLUICE_WORKER_BIN` (e.g. a separately installed `sluice-worker`).
    pub fn discover() -> Result<Self, LocalError> {
        if let Some(bin) = std::env::var_os(env::WORKER_BIN).filter(|b| !b.is_empty()) {
            return Ok(Self { program: PathBuf::from(bin), args: vec![] });
        }
        let me = std::env::current_exe().map_err(|e| LocalError::Other(format!("cannot locate the sluice binary: {e}")))?;
        Ok(Self { program: me, args: vec!["worker".into()] })
    }
}

/// What happened to the shards.
#[derive(Debug, Default)]
pub struct ExecOutcome {
    pub completed: BTreeSet<u32>,
    pub failed: BTreeMap<u32, String>,
    pub worker_seconds: f64,
    pub peak_workers: u32,
    pub retries: u32,
    pub first_projection: Option<Timestamp>,
    /// Whether `first_projection` came from an observed rate (else from the spec's prior).
    pub first_projection_observed: bool,
    pub last_decision: Option<SlaDecision>,
    pub deadline: Option<Timestamp>,
    /// Set when the job was closed before every request ran (`spec.cancel`, or the deadline
    /// with `sla.onDeadline: Expire`); its close step wrote the manifest.
    pub closed: Option<CloseReason>,
}

struct Running {
    child: Child,
    attempt: u32,
    started: Instant,
}

fn default_worker_cap(device: Option<&str>) -> u32 {
    if device == Some("cuda") {
        return 1;
    }
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1).max(1)
}

fn log_dir(opts: &RunOptions, local: &LocalJob) -> PathBuf {
    if let Some(d) = &opts.log_dir {
        return d.clone();
    }
    match local.job.spec.output.uri.strip_prefix("file://") {
        Some(p) => PathBuf::from(p).join("_sluice").join("logs"),
        None => std::env::temp_dir().join("sluice").join(&local.name),
    }
}

/// A local worker process is a pod's invocation with a process's settings: no metrics port,
/// text logs, the chosen device, a model cache in the temp directory, its share of the cores.
fn worker_env(local: &LocalJob, opts: &RunOptions, threads: usize) -> Result<Vec<(String, String)>, LocalError> {
    let mut invocation = sluice_operator::job_builder::worker_invocation(&local.job);
    invocation.metrics_addr = "none".into();
    invocation.log_format = "text";
    invocation.device = Some(opts.device.clone().unwrap_or_else(|| "cpu".into()));
    invocation.model_cache_dir = std::env::temp_dir().join("sluice-model-cache").display().to_string();
    let mut vars: Vec<(String, String)> = invocation
        .to_env()
        .map_err(|e| LocalError::Other(format!("spec.sampling: {e}")))?
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    vars.push(("RAYON_NUM_THREADS".into(), threads.to_string()));
    Ok(vars)
}

fn spawn(cmd: &WorkerCommand, vars: &[(String, String)], shard: u32, attempt: u32, logs: &std::path::Path) -> Result<Child, LocalError> {
    let program = cmd.program.display().to_string();
    std::fs::create_dir_all(logs).map_err(|source| LocalError::Spawn { program: program.clone(), source })?;
    let log =
        std::fs::File::create(log_path(logs, shard, attempt)).map_err(|source| LocalError::Spawn { program: program.clone(), source })?;
    let log_err = log.try_clone().map_err(|source| LocalError::Spawn { program: program.clone(), source })?;
    let mut c = Command::new(&cmd.program);
    c.args(&cmd.args)
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .env(env::JOB_COMPLETION_INDEX, shard.to_string())
        .env(env::ATTEMPT, format!("local-{}-{shard}-{attempt}", std::process::id()))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: Ctrl-C reaches only us, and we stop workers gracefully.
        .process_group(0)
        .kill_on_drop(true);
    c.spawn().map_err(|source| LocalError::Spawn { program, source })
}

/// Stop every running worker gracefully (SIGTERM: each commits what it finished), killing one
/// that has not exited after 30 s.
async fn stop_all(running: &mut HashMap<u32, Running>) {
    for r in running.values() {
        terminate(&r.child);
    }
    for (_, mut r) in running.drain() {
        if tokio::time::timeout(Duration::from_secs(30), r.child.wait()).await.is_err() {
            let _ = r.child.kill().await;
        }
    }
}

/// Run the worker's close step (as the operator's close pod does): every request that never ran
/// is committed as an error with `reason`'s code, then the manifest is written.
async fn close(
    cmd: &WorkerCommand,
    vars: &[(String, String)],
    failed: &BTreeSet<u32>,
    logs: &std::path::Path,
    reason: NotRun,
    shards: Option<&BTreeSet<u32>>,
) -> Result<(), LocalError> {
    let mut vars = vars.to_vec();
    vars.push((env::CLOSE_CODE.into(), reason.code().into()));
    if let Some(s) = shards {
        vars.push((env::CLOSE_SHARDS.into(), sluice_api::plan::format_index_ranges(s)));
    }
    vars.push((env::FAILED_SHARDS.into(), sluice_api::plan::format_index_ranges(failed)));
    let mut step = WorkerCommand { program: cmd.program.clone(), args: cmd.args.clone() };
    step.args.push("close".into());
    let mut child = spawn(&step, &vars, CLOSE_STEP, 1, logs)?;
    let status = child.wait().await.map_err(|source| LocalError::Spawn { program: cmd.program.display().to_string(), source })?;
    if status.code() == Some(exit::SUCCESS) {
        return Ok(());
    }
    let log = log_path(logs, CLOSE_STEP, 1);
    Err(LocalError::JobFailed(format!(
        "the close step exited with {:?}{}; log: {} (run again to resume it)",
        status.code(),
        last_error(&log).unwrap_or_default(),
        log.display()
    )))
}

/// The close step's stand-in shard index: its log is `close.log`.
const CLOSE_STEP: u32 = u32::MAX;

fn log_path(logs: &std::path::Path, shard: u32, attempt: u32) -> PathBuf {
    if shard == CLOSE_STEP {
        return logs.join("close.log");
    }
    logs.join(format!("shard-{shard:05}-attempt-{attempt}.log"))
}

/// `: <message>` of the last ERROR line a worker logged, for the user-facing failure.
fn last_error(log: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains("ERROR"))?;
    let msg = line.split_once("ERROR").map(|(_, m)| m.trim())?;
    // Drop the module path prefix (`sluice_worker::app: `).
    let msg = msg.split_once(": ").map(|(_, m)| m).unwrap_or(msg);
    Some(format!(": {msg}"))
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
}

fn bar(total: u64, enabled: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), if enabled { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
    let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    pb.set_style(style);
    pb
}

/// Run every uncommitted shard. Returns when all shards are committed or failed for good.
pub async fn execute(opts: &RunOptions, local: &LocalJob, plan: &ShardPlan, created_at: Timestamp) -> Result<ExecOutcome, LocalError> {
    let spec = &local.job.spec;
    let deadline = sluice_api::deadline::effective_deadline(&spec.sla, created_at).map_err(LocalError::Other)?;
    let cap = opts.max_workers.unwrap_or_else(|| default_worker_cap(opts.device.as_deref())).max(1);
    let mut sla_cfg = SlaConfig::from_spec(spec);
    sla_cfg.max_workers = sla_cfg.max_workers.min(cap).max(1);
    sla_cfg.min_workers = sla_cfg.min_workers.min(sla_cfg.max_workers);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let vars = worker_env(local, opts, (cores / sla_cfg.max_workers as usize).max(1))?;
    let logs = log_dir(opts, local);

    let mut out = ExecOutcome { deadline: Some(deadline), ..Default::default() };
    out.completed = committed_shards(&local.output, plan).await?;
    let mut pending: VecDeque<u32> = plan.shards.iter().map(|s| s.index).filter(|i| !out.completed.contains(i)).collect();
    let mut running: HashMap<u32, Running> = HashMap::new();
    let mut failures: HashMap<u32, u32> = HashMap::new();
    let retries = spec.retries.per_shard.max(0) as u32;
    let max_failed = spec.retries.max_failed_shards.max(0) as usize;

    let pb = bar(plan.line_count, opts.progress_bar);
    let scaler = Scaler::new(sla_cfg);
    let mut state = ScalerState { parallelism: scaler.config().max_workers.min(pending.len() as u32).max(1), ..Default::default() };
    let mut next_poll = Instant::now();
    let mut cache = JobCache::default();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        // 1. Reap finished workers.
        let mut finished = Vec::new();
        for (shard, r) in running.iter_mut() {
            if let Ok(Some(status)) = r.child.try_wait() {
                finished.push((*shard, status.code(), r.attempt, r.started.elapsed()));
            }
        }
        for (shard, code, attempt, took) in finished {
            running.remove(&shard);
            out.worker_seconds += took.as_secs_f64();
            match code {
                Some(exit::SUCCESS) => {
                    out.completed.insert(shard);
                }
                Some(exit::PERMANENT) => {
                    let log = log_path(&logs, shard, attempt);
                    let why = last_error(&log).unwrap_or_default();
                    out.failed.insert(shard, format!("shard {shard} failed permanently (attempt {attempt}){why}; log: {}", log.display()));
                }
                other => {
                    let n = failures.entry(shard).or_default();
                    *n += 1;
                    if *n > retries {
                        out.failed.insert(
                            shard,
                            format!(
                                "shard {shard} failed {n} times (last exit {other:?}){}; log: {}",
                                last_error(&log_path(&logs, shard, attempt)).unwrap_or_default(),
                                log_path(&logs, shard, attempt).display()
                            ),
                        );
                    } else {
                        out.retries += 1;
                        pending.push_front(shard);
                    }
                }
            }
        }
        if out.failed.len() > max_failed {
            for r in running.values() {
                terminate(&r.child);
            }
            for (_, mut r) in running.drain() {
                let _ = r.child.wait().await;
            }
            pb.finish_and_clear();
            let reasons: Vec<&str> = out.failed.values().map(String::as_str).collect();
            return Err(LocalError::JobFailed(format!(
                "{} shard(s) failed, more than retries.maxFailedShards = {max_failed}: {}",
                out.failed.len(),
                reasons.join("; ")
            )));
        }
        if pending.is_empty() && running.is_empty() {
            pb.finish_and_clear();
            if !out.failed.is_empty() {
                // Done without the failed shards: their requests get `shard_failed` lines, so
                // every request is in the output or the error files.
                let failed: BTreeSet<u32> = out.failed.keys().copied().collect();
                close(&opts.worker, &vars, &BTreeSet::new(), &logs, NotRun::ShardFailed, Some(&failed)).await?;
            }
            return Ok(out);
        }
        // Cancelled, or expired at the deadline: stop, then close what never ran.
        let reason = if spec.cancel {
            Some(CloseReason::Cancelled)
        } else {
            (spec.sla.on_deadline == OnDeadline::Expire && Timestamp::now() >= deadline).then_some(CloseReason::Expired)
        };
        if let Some(reason) = reason {
            pb.finish_and_clear();
            eprintln!(
                "{}: stopping {} worker(s); every request that never ran goes to the error files as {}",
                match reason {
                    CloseReason::Cancelled => "spec.cancel is set".to_string(),
                    CloseReason::Expired => format!("the deadline {deadline} passed with work left and sla.onDeadline is Expire"),
                },
                running.len(),
                reason.code()
            );
            stop_all(&mut running).await;
            let failed: BTreeSet<u32> = out.failed.keys().copied().collect();
            close(&opts.worker, &vars, &failed, &logs, reason.not_run(), None).await?;
            out.closed = Some(reason);
            return Ok(out);
        }

        // 2. Observe progress and ask the SLA core how many workers to run.
        if Instant::now() >= next_poll {
            next_poll = Instant::now() + opts.poll_interval;
            let now = Timestamp::now();
            let records = read_progress(&local.output, plan, &mut cache, &out.completed).await?;
            let summary = summarize(&records, &BTreeMap::new(), now);
            let done = summary.succeeded + summary.failed;
            let remaining_shards = (pending.len() + running.len()) as u32;
            let observed = Observed {
                now,
                window_start: created_at,
                deadline,
                total_requests: plan.line_count,
                progress: summary.scaler_progress(),
                total_shards: plan.shards.len() as u32,
                remaining_shards,
                finished: false,
                suspended: false,
                workers: local_workers(running.len()),
                fleet_cap: None,
            };
            let step = scaler.step(&state, &observed);
            if step.parallelism != state.parallelism {
                tracing::info!(from = state.parallelism, to = step.parallelism, reason = %step.decision.reason, "scaled local workers");
            }
            state = step.next;
            let d = step.decision;
            // The first projection made from observed throughput (the first ones only restate
            // the spec's prior); the prior-based one stands in until a rate is observed.
            let observed = summary.estimator.estimate().is_some();
            if let Some(t) = d.projected_completion
                && (out.first_projection.is_none() || (observed && !out.first_projection_observed))
            {
                out.first_projection = Some(t);
                out.first_projection_observed = observed;
            }
            pb.set_position(done.min(plan.line_count));
            let eta = d.projected_completion.map(|t| t.strftime("%H:%M:%S").to_string()).unwrap_or_else(|| "?".into());
            pb.set_message(format!(
                "{:.1} req/s  ETA {eta}  deadline {}  SLA {}  workers {}/{}",
                summary.requests_per_second,
                deadline.strftime("%H:%M:%S"),
                d.status.as_str(),
                running.len(),
                state.parallelism
            ));
            out.last_decision = Some(d);
        }

        // 3. Start workers up to the desired count (scaling down lets running ones finish).
        while (running.len() as u32) < state.parallelism {
            let Some(shard) = pending.pop_front() else { break };
            let attempt = failures.get(&shard).copied().unwrap_or(0) + 1;
            let child = spawn(&opts.worker, &vars, shard, attempt, &logs)?;
            running.insert(shard, Running { child, attempt, started: Instant::now() });
            out.peak_workers = out.peak_workers.max(running.len() as u32);
        }

        // 4. Wait a little, or stop on Ctrl-C.
        tokio::select! {
            _ = &mut ctrl_c => {
                pb.finish_and_clear();
                eprintln!("stopping {} worker(s) gracefully…", running.len());
                stop_all(&mut running).await;
                return Err(LocalError::Interrupted);
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// The workers as local mode shows them to the scaler: processes, which need no scheduler
/// (nothing unschedulable, start-up measured by the first record) and always finish their
/// shard (a lower count only stops new starts: nothing to protect).
pub fn local_workers(running: usize) -> WorkerFacts {
    WorkerFacts { active: u32::try_from(running).unwrap_or(u32::MAX), running_protected: 0, unschedulable: 0, oldest_starting_secs: None }
}
