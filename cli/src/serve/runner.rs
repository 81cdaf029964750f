//! A batch's life after it is accepted: its local job (`sluice run` on a manifest built from the
//! batch and the model's configuration, resumable from committed chunks), progress into
//! request_counts and the `sluice` fields, cancel and expiry (stop the job, keep what is
//! committed), and the final output and error files.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sluice_api::job::CloseReason;
use sluice_api::progress::ShardProgress;
use tokio::process::{Child, Command};

use super::assemble::assemble;
use super::job::{JobPlacement, job_name, job_spec};
use super::local_batches::LocalBatches;
use super::objects::{BatchError, BatchErrors, BatchRecord, BatchStatus, BatchUsage, FileObject, FileRecord, Outcome, new_id, now};

/// Drive batch `id` until it is finished, or until the server stops (then it resumes at the
/// next start).
pub async fn drive(state: Arc<LocalBatches>, id: String) {
    let outcome = match run_job(&state, &id).await {
        Ok(Some(o)) => o,
        Ok(None) => return,
        Err(message) => Outcome::Failed { message },
    };
    if let Err(e) = finish(&state, &id, outcome).await {
        tracing::error!(batch = %id, "cannot finish the batch: {e}");
        let _ = state.update(&id, |b| fail_without_files(b, &format!("cannot write the batch's output files: {e}")));
    }
}

fn fail_without_files(b: &mut BatchRecord, message: &str) {
    b.batch.status = BatchStatus::Failed;
    b.batch.failed_at = Some(now());
    b.batch.sluice.sla_status = "Failed".into();
    b.batch.sluice.workers = 0;
    b.batch.errors = Some(BatchErrors {
        object: "list".into(),
        data: vec![BatchError { code: "batch_failed".into(), message: message.into(), param: None, line: None }],
    });
}

/// The local path of a `file://` location of the server's own store.
fn local_path(loc: &sluice_api::storage::Location) -> std::path::PathBuf {
    std::path::PathBuf::from(loc.uri.strip_prefix("file://").unwrap_or(&loc.uri))
}

fn file_uri(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// The BatchInferenceJob manifest of a batch (JSON, which is YAML).
fn manifest(state: &LocalBatches, rec: &BatchRecord) -> Result<serde_json::Value, String> {
    let b = &rec.batch;
    let model = state.config.models.get(&b.model).ok_or_else(|| format!("the model {:?} is no longer in the server config", b.model))?;
    let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let cuda = state.config.workers.device.as_deref() == Some("cuda");
    let max = state.config.workers.max.unwrap_or(if cuda { 1 } else { cores }).max(1);
    let input = state.files.data(&rec.tenant, &b.input_file_id);
    let output = file_uri(&state.batch_dir(&b.id).join("out"));
    let spec = job_spec(
        model,
        b,
        JobPlacement {
            input_uri: &input.uri,
            output_uri: &output,
            workers: json!({"min": 1, "max": max, "gpus": if cuda { 1 } else { 0 }, "maxBatchSize": 256}),
            storage: None,
            expire_at_deadline: false,
        },
    );
    Ok(json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "BatchInferenceJob", "metadata": {"name": job_name(&b.id)}, "spec": spec}))
}

fn spawn_job(state: &LocalBatches, rec: &BatchRecord) -> Result<Child, String> {
    let dir = state.batch_dir(&rec.batch.id);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("job.yaml");
    let text = serde_json::to_string_pretty(&manifest(state, rec)?).map_err(|e| format!("cannot write the job manifest: {e}"))?;
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let open = |name: &str| std::fs::File::create(dir.join(name)).map_err(|e| format!("cannot create {}: {e}", dir.join(name).display()));
    let mut cmd = Command::new(&state.sluice_program);
    cmd.arg("run").arg(&path).args(["--json", "--no-progress", "--poll-seconds", "0.5"]).arg("--log-file").arg(dir.join("run.log"));
    if let Some(d) = &state.config.workers.device {
        cmd.args(["--device", d]);
    }
    // Progress and commits often enough for request_counts to move while one watches.
    for (k, v) in [(sluice_api::contract::env::PROGRESS_SECONDS, "1"), (sluice_api::contract::env::CHUNK_SECONDS, "2")] {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::null()).stdout(open("run.out")?).stderr(open("run.err")?).process_group(0).kill_on_drop(true);
    cmd.spawn().map_err(|e| format!("cannot start {} run: {e}", state.sluice_program.display()))
}

/// SIGINT: `sluice run` stops its workers, which commit what is finished.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT);
    }
    if tokio::time::timeout(Duration::from_secs(60), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Progress of the job from its records: (succeeded, failed, running workers).
fn progress(out: &Path) -> (u64, u64, u32) {
    let dir = out.join("_sluice").join("progress");
    let now = jiff::Timestamp::now();
    let (mut ok, mut failed, mut workers) = (0, 0, 0);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read(entry.path()) else { continue };
        let Ok(p) = serde_json::from_slice::<ShardProgress>(&text) else { continue };
        ok += p.succeeded;
        failed += p.failed;
        if !p.complete && now.duration_since(p.updated_at).as_secs() < 30 {
            workers += 1;
        }
    }
    (ok, failed, workers)
}

fn refresh(state: &LocalBatches, id: &str) {
    let out = state.batch_dir(id).join("out");
    let (ok, failed, workers) = progress(&out);
    let _ = state.update(id, |b| {
        let t = now();
        let c = &mut b.batch.request_counts;
        c.completed = ok.min(c.total);
        c.failed = failed.min(c.total - c.completed);
        let done = c.completed + c.failed;
        let s = &mut b.batch.sluice;
        s.workers = workers;
        let started = b.batch.in_progress_at.unwrap_or(t);
        if done > 0 && t > started {
            let rate = done as f64 / (t - started) as f64;
            let projected = t + ((c.total - done) as f64 / rate).ceil() as i64;
            s.projected_completion_at = Some(projected);
            s.sla_status = if b.batch.expires_at.is_none_or(|e| projected <= e) { "OnTrack".into() } else { "AtRisk".into() };
        }
    });
}

/// Run (or resume) the batch's job. `None`: the server is stopping and the job is left to resume.
async fn run_job(state: &Arc<LocalBatches>, id: &str) -> Result<Option<Outcome>, String> {
    let rec = state.record(id).ok_or_else(|| format!("batch {id} vanished"))?;
    if let Some(o) = rec.outcome {
        return Ok(Some(o));
    }
    if rec.batch.status == BatchStatus::Cancelling {
        return Ok(Some(Outcome::Cancelled));
    }
    let expires_at = rec.batch.expires_at.unwrap_or(i64::MAX);
    if expires_at <= now() {
        return Ok(Some(Outcome::Expired));
    }
    let rec = state
        .update(id, |b| {
            if b.batch.status == BatchStatus::Validating {
                b.batch.status = BatchStatus::InProgress;
                b.batch.in_progress_at = Some(now());
            }
        })
        .map_err(|e| e.message)?;
    if rec.batch.status == BatchStatus::Cancelling {
        return Ok(Some(Outcome::Cancelled));
    }
    let mut child = spawn_job(state, &rec)?;
    let cancel = state.cancel_handle(id);
    let mut shutdown = state.shutdown.clone();
    let expiry = tokio::time::sleep(Duration::from_secs(u64::try_from(expires_at - now()).unwrap_or(0)));
    tokio::pin!(expiry);
    let exit = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(|e| format!("cannot wait for the batch's job: {e}"))?,
            _ = cancel.notified() => {
                stop(&mut child).await;
                return Ok(Some(Outcome::Cancelled));
            }
            _ = &mut expiry => {
                stop(&mut child).await;
                return Ok(Some(Outcome::Expired));
            }
            _ = shutdown.changed() => {
                stop(&mut child).await;
                return Ok(None);
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => refresh(state, id),
        }
    };
    if exit.success() {
        return Ok(Some(Outcome::Completed));
    }
    let err = std::fs::read_to_string(state.batch_dir(id).join("run.err")).unwrap_or_default();
    let why = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim_start_matches("sluice: ").to_string();
    let status = exit.code().map(|c| format!("status {c}")).unwrap_or_else(|| exit.to_string());
    Err(format!("the batch's local job exited with {status}: {why} (logs under {})", state.batch_dir(id).display()))
}

/// Write the output and error files, register them, and set the final status.
async fn finish(state: &Arc<LocalBatches>, id: &str, outcome: Outcome) -> Result<(), String> {
    let rec = state
        .update(id, |b| {
            // A cancel that arrived as the job finished: nothing was left to cancel.
            let outcome = if b.batch.status == BatchStatus::Cancelling && outcome == Outcome::Completed {
                Outcome::Cancelled
            } else {
                outcome.clone()
            };
            if outcome == Outcome::Completed && b.batch.finalizing_at.is_none() {
                b.batch.status = BatchStatus::Finalizing;
                b.batch.finalizing_at = Some(now());
            }
            b.outcome = Some(outcome);
        })
        .map_err(|e| e.message)?;
    let outcome = rec.outcome.clone().unwrap_or(Outcome::Completed);
    let b = &rec.batch;
    let (code, message) = match &outcome {
        Outcome::Completed => ("request_not_run", "the request's shard failed after its retries; see the batch's worker logs".to_string()),
        Outcome::Cancelled => (CloseReason::Cancelled.code(), "the batch was cancelled before this request ran".to_string()),
        Outcome::Expired => {
            (CloseReason::Expired.code(), format!("the batch's completion window ({}) ended before this request ran", b.completion_window))
        }
        Outcome::Failed { message } => ("batch_failed", format!("the batch failed before this request ran: {message}")),
    };
    let (ok_id, err_id) = (new_id("file-"), new_id("file-"));
    let (ok_path, err_path) = (local_path(&state.files.data(&rec.tenant, &ok_id)), local_path(&state.files.data(&rec.tenant, &err_id)));
    let out = state.batch_dir(id).join("out");
    let input = local_path(&state.files.data(&rec.tenant, &b.input_file_id));
    let (total, key) = (b.request_counts.total, job_name(id));
    let (okp, errp) = (ok_path.clone(), err_path.clone());
    let a = tokio::task::spawn_blocking(move || assemble(&out, &input, total, &key, (code, &message), (&okp, &errp)))
        .await
        .map_err(|e| format!("the output assembly stopped: {e}"))??;
    let register_file = async |fid: &str, path: &Path, kind: &str, lines: u64| -> Result<Option<String>, String> {
        if lines == 0 {
            let _ = std::fs::remove_file(path);
            return Ok(None);
        }
        let bytes = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?.len();
        let file = FileObject {
            id: fid.to_string(),
            object: "file".into(),
            bytes,
            created_at: now(),
            filename: format!("{id}_{kind}.jsonl"),
            purpose: "batch_output".into(),
            status: "processed".into(),
            status_details: None,
            expires_at: None,
        };
        state.files.save(&FileRecord { tenant: rec.tenant.clone(), parts: Vec::new(), file }).await.map_err(|e| e.message)?;
        Ok(Some(fid.to_string()))
    };
    let output_file_id = register_file(&ok_id, &ok_path, "output", a.succeeded).await?;
    let error_file_id = register_file(&err_id, &err_path, "error", a.failed).await?;
    state
        .update(id, |b| {
            let t = now();
            let o = &mut b.batch;
            o.output_file_id = output_file_id;
            o.error_file_id = error_file_id;
            o.request_counts.completed = a.succeeded;
            o.request_counts.failed = a.failed;
            o.usage = Some(BatchUsage {
                input_tokens: a.usage.prompt_tokens,
                input_tokens_details: json!({"cached_tokens": 0}),
                output_tokens: a.usage.completion_tokens,
                output_tokens_details: json!({"reasoning_tokens": 0}),
                total_tokens: a.usage.total_tokens,
            });
            o.sluice.workers = 0;
            o.sluice.projected_completion_at = None;
            match &outcome {
                Outcome::Completed => {
                    o.status = BatchStatus::Completed;
                    o.completed_at = Some(t);
                    o.sluice.sla_status = if o.expires_at.is_none_or(|e| t <= e) { "Met".into() } else { "Missed".into() };
                }
                Outcome::Cancelled => {
                    o.status = BatchStatus::Cancelled;
                    o.cancelled_at = Some(t);
                    o.sluice.sla_status = "Cancelled".into();
                }
                Outcome::Expired => {
                    o.status = BatchStatus::Expired;
                    o.expired_at = Some(t);
                    o.sluice.sla_status = "Missed".into();
                }
                Outcome::Failed { message } => {
                    let msg = message.clone();
                    fail_without_files(b, &msg);
                }
            }
        })
        .map_err(|e| e.message)?;
    Ok(())
}
