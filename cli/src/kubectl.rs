//! `kubectl sluice` (the `kubectl-sluice` binary): one job's or the whole fleet's standing
//! (deadline, projection, slack, workers, and why, from `status.fleet`), a quote against the
//! cluster, where a job's results are, and cancel, suspend and resume as spec patches.

use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use sluice_api::contract::layout;
use sluice_api::{BatchInferenceJob, GpuBudget};
use sluice_control::sla::fmt_secs;

/// A plugin command's failure: the message, and the exit status (1 for a refused or failed
/// request, 2 for bad usage).
#[derive(Debug)]
pub struct CmdError {
    pub message: String,
    pub code: u8,
}

impl CmdError {
    fn api(what: String) -> impl FnOnce(kube::Error) -> CmdError {
        move |e| {
            let message = match &e {
                kube::Error::Api(s) if s.code == 404 => format!("{what}: not found ({})", s.message),
                kube::Error::Api(s) if s.code == 403 => format!("{what}: forbidden by RBAC ({})", s.message),
                _ => format!("{what}: {e}"),
            };
            CmdError { message, code: 1 }
        }
    }
}

fn time(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| "-".into())
}

fn slack(st: &Value) -> String {
    st["slackSeconds"]
        .as_i64()
        .map(|s| if s < 0 { format!("-{}", fmt_secs(-s as f64)) } else { fmt_secs(s as f64) })
        .unwrap_or_else(|| "-".into())
}

fn key(b: &BatchInferenceJob) -> String {
    format!("{}/{}", b.metadata.namespace.as_deref().unwrap_or_default(), b.metadata.name.as_deref().unwrap_or_default())
}

/// One job's standing as text.
pub fn job_text(b: &BatchInferenceJob) -> String {
    let st = serde_json::to_value(b.status.clone().unwrap_or_default()).unwrap_or(Value::Null);
    let mut out = format!(
        "{}  {}  {} requests  (shards {}/{})\n",
        key(b),
        st["phase"].as_str().unwrap_or("Pending"),
        st["progress"].as_str().unwrap_or("0/?"),
        st["shards"]["completed"],
        st["shards"]["total"]
    );
    out.push_str(&format!("  deadline:   {}\n", time(&st["deadline"])));
    out.push_str(&format!(
        "  projected:  {}  (slack {}, SLA {})\n",
        time(&st["projectedCompletionTime"]),
        slack(&st),
        st["slaStatus"].as_str().unwrap_or("-")
    ));
    out.push_str(&format!(
        "  workers:    {} active / {} desired  ({:.3} requests/s per worker)\n",
        st["workers"]["active"],
        st["workers"]["desired"],
        st["throughput"]["perWorkerRequestsPerSecond"].as_f64().unwrap_or(0.0)
    ));
    match st.get("fleet").filter(|f| !f.is_null()) {
        Some(f) => {
            out.push_str(&format!(
                "  budget:     {}: {} workers ({} GPUs), {}\n",
                f["budget"].as_str().unwrap_or("-"),
                f["workers"],
                f["gpus"],
                f["reason"].as_str().unwrap_or("-")
            ));
            out.push_str(&format!("  why:        {}\n", f["message"].as_str().unwrap_or("-")));
            if let Some(q) = f.get("quote").filter(|q| !q.is_null()) {
                out.push_str(&format!("  quote:      {}\n", q["message"].as_str().unwrap_or("-")));
            }
        }
        None => out.push_str("  budget:     none (no GpuBudget covers it: sized alone)\n"),
    }
    if let Some(m) = st["manifestUri"].as_str() {
        out.push_str(&format!("  manifest:   {m}\n"));
    }
    out
}

/// The fleet as a table, then the budgets.
pub fn fleet_text(jobs: &[BatchInferenceJob], budgets: &[GpuBudget]) -> String {
    let mut rows = vec![["JOB", "PHASE", "DONE", "DEADLINE", "PROJECTED", "SLACK", "WORKERS", "BUDGET", "WHY"].map(String::from).to_vec()];
    for b in jobs {
        let st = serde_json::to_value(b.status.clone().unwrap_or_default()).unwrap_or(Value::Null);
        let f = &st["fleet"];
        rows.push(vec![
            key(b),
            st["phase"].as_str().unwrap_or("Pending").into(),
            st["progress"].as_str().unwrap_or("-").into(),
            time(&st["deadline"]),
            time(&st["projectedCompletionTime"]),
            slack(&st),
            st["workers"]["display"].as_str().unwrap_or("-").into(),
            f["budget"].as_str().map_or("-".into(), |n| format!("{n} ({})", f["reason"].as_str().unwrap_or("-"))),
            f["message"].as_str().unwrap_or("-").into(),
        ]);
    }
    let mut out = table(&rows);
    if !budgets.is_empty() {
        out.push('\n');
        let mut rows = vec![["BUDGET", "GPUS", "HELD", "JOBS", "GPU TYPE"].map(String::from).to_vec()];
        for g in budgets {
            let st = g.status.clone().unwrap_or_default();
            rows.push(vec![
                g.metadata.name.clone().unwrap_or_default(),
                g.spec.gpus.to_string(),
                st.held_gpus.to_string(),
                st.jobs.to_string(),
                g.spec.gpu_type.clone().unwrap_or_else(|| "any".into()),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> =
            r.iter().enumerate().map(|(c, s)| if c + 1 == cols { s.clone() } else { format!("{s:<w$}", w = widths[c]) }).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Where a job's output is and what it counts.
pub fn results_json(b: &BatchInferenceJob) -> Value {
    let st = b.status.clone().unwrap_or_default();
    let out = &b.spec.output.uri;
    json!({
        "job": key(b),
        "phase": st.phase.as_str(),
        "requests": {"total": st.requests.total, "succeeded": st.requests.succeeded, "failed": st.requests.failed},
        "manifest": st.manifest_uri,
        "results": layout::join(out, "results/"),
        "errors": layout::join(out, "errors/"),
        "complete": st.manifest_uri.is_some(),
    })
}

/// The results as text.
pub fn results_text(b: &BatchInferenceJob) -> String {
    let v = results_json(b);
    let mut out = format!(
        "{}  {}: {} succeeded, {} failed, of {}\n  results: {}\n  errors:  {}\n",
        v["job"].as_str().unwrap_or_default(),
        v["phase"].as_str().unwrap_or_default(),
        v["requests"]["succeeded"],
        v["requests"]["failed"],
        v["requests"]["total"],
        v["results"].as_str().unwrap_or_default(),
        v["errors"].as_str().unwrap_or_default()
    );
    match v["manifest"].as_str() {
        Some(m) => out.push_str(&format!("  manifest: {m} (lists every committed file)\n")),
        None => out.push_str("  manifest: not written yet (the job has not finished); committed shards are already in results/\n"),
    }
    out
}

/// Read one job.
pub async fn get_job(client: &kube::Client, ns: &str, name: &str) -> Result<BatchInferenceJob, CmdError> {
    let api: Api<BatchInferenceJob> = Api::namespaced(client.clone(), ns);
    api.get(name).await.map_err(CmdError::api(format!("get BatchInferenceJob {ns}/{name}")))
}

/// Every job (in `ns`, or all namespaces) and every budget, sorted.
pub async fn fleet(client: &kube::Client, ns: Option<&str>) -> Result<(Vec<BatchInferenceJob>, Vec<GpuBudget>), CmdError> {
    let api: Api<BatchInferenceJob> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut jobs = api.list(&ListParams::default()).await.map_err(CmdError::api("list BatchInferenceJobs".into()))?.items;
    jobs.sort_by_key(key);
    let budgets: Api<GpuBudget> = Api::all(client.clone());
    let mut budgets = match budgets.list(&ListParams::default()).await {
        Ok(l) => l.items,
        // No GpuBudget CRD, or no right to read budgets: the jobs alone.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 403 => Vec::new(),
        Err(e) => return Err(CmdError::api("list GpuBudgets".into())(e)),
    };
    budgets.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok((jobs, budgets))
}

/// A spec change the plugin makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecChange {
    Cancel,
    Suspend,
    Resume,
}

/// Apply `change` to job `ns/name` (a merge patch of `spec.cancel` or `spec.suspend`); the
/// sentence to print.
pub async fn change(client: &kube::Client, ns: &str, name: &str, change: SpecChange) -> Result<String, CmdError> {
    let job = get_job(client, ns, name).await?;
    let phase = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if phase.is_terminal() {
        return Err(CmdError { message: format!("{ns}/{name} has already finished ({}); nothing to change", phase.as_str()), code: 1 });
    }
    let (patch, done) = match change {
        SpecChange::Cancel => (json!({"spec": {"cancel": true}}), "cancelling: running shards commit, the rest are recorded as never run"),
        SpecChange::Suspend => (json!({"spec": {"suspend": true}}), "suspended: no new workers start, committed results are kept"),
        SpecChange::Resume => (json!({"spec": {"suspend": false}}), "resumed"),
    };
    if change == SpecChange::Resume && job.spec.cancel {
        return Err(CmdError { message: format!("{ns}/{name} is being cancelled; it cannot be resumed"), code: 1 });
    }
    let api: Api<BatchInferenceJob> = Api::namespaced(client.clone(), ns);
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(CmdError::api(format!("patch BatchInferenceJob {ns}/{name}")))?;
    Ok(format!("{ns}/{name} {done}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(status: Value) -> BatchInferenceJob {
        serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "BatchInferenceJob",
            "metadata": {"name": "nightly", "namespace": "ml"},
            "spec": {"model": {"uri": "s3://m/qwen"}, "input": {"uri": "s3://b/in.jsonl"}, "output": {"uri": "s3://b/out"}, "sla": {"completionWindow": "24h"}},
            "status": status,
        }))
        .unwrap()
    }

    fn lending() -> Value {
        json!({
            "phase": "Running", "progress": "300/1000",
            "requests": {"total": 1000, "succeeded": 290, "failed": 10},
            "shards": {"total": 10, "completed": 3, "failed": 0, "active": 1},
            "workers": {"desired": 1, "active": 3, "display": "3/1"},
            "deadline": "2026-12-06T20:00:00Z", "projectedCompletionTime": "2026-12-06T15:00:00Z", "slackSeconds": 18000,
            "fleet": {"budget": "fleet", "workers": 1, "gpus": 1, "reason": "Lent", "message": "lent 2 workers to ml/urgent (slack 5h)"},
        })
    }

    #[test]
    fn one_job_says_why_it_has_its_workers() {
        let text = job_text(&job(lending()));
        assert!(text.starts_with("ml/nightly  Running  300/1000 requests  (shards 3/10)"), "{text}");
        assert!(text.contains("slack 5h") && text.contains("budget:     fleet: 1 workers (1 GPUs), Lent"), "{text}");
        assert!(text.contains("why:        lent 2 workers to ml/urgent (slack 5h)"), "{text}");
        let alone = job_text(&job(json!({"phase": "Pending"})));
        assert!(alone.contains("no GpuBudget covers it"), "{alone}");
    }

    #[test]
    fn the_fleet_table_lines_up_jobs_and_budgets() {
        let budget: GpuBudget = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "GpuBudget", "metadata": {"name": "fleet"},
            "spec": {"gpus": 8}, "status": {"heldGpus": 3, "jobs": 2},
        }))
        .unwrap();
        let text = fleet_text(&[job(lending())], &[budget]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("JOB") && lines[0].contains("WHY"), "{text}");
        assert!(lines[1].contains("fleet (Lent)") && lines[1].ends_with("lent 2 workers to ml/urgent (slack 5h)"), "{text}");
        assert_eq!(lines[0].find("PHASE"), lines[1].find("Running"), "{text}");
        assert!(lines[3].starts_with("BUDGET") && lines[4].starts_with("fleet") && lines[4].contains('8'), "{text}");
    }

    #[test]
    fn results_name_the_output_and_say_when_they_are_not_final() {
        let text = results_text(&job(lending()));
        assert!(text.contains("290 succeeded, 10 failed, of 1000"), "{text}");
        assert!(text.contains("results: s3://b/out/results/") && text.contains("not written yet"), "{text}");
        let v = results_json(&job(
            json!({"phase": "Succeeded", "manifestUri": "s3://b/out/manifest.json", "requests": {"total": 5, "succeeded": 5, "failed": 0}, "shards": {"total": 1, "completed": 1, "failed": 0, "active": 0}}),
        ));
        assert_eq!((v["complete"].as_bool(), v["manifest"].as_str()), (Some(true), Some("s3://b/out/manifest.json")));
    }
}
