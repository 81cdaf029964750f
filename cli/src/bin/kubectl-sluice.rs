//! `kubectl-sluice`: the kubectl plugin (`kubectl sluice ...` once it is on the PATH). `status`
//! shows one job or the fleet with why each has its workers; `quote` projects a manifest against
//! the cluster's GpuBudget; `results` says where a job's output is; `cancel`, `suspend` and
//! `resume` change its spec. Uses the kubeconfig (or in-cluster credentials), like kubectl.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_cli::kubectl::{self, CmdError, SpecChange};
use sluice_cli::quote::{self, Against};

#[derive(Parser)]
#[command(
    name = "kubectl-sluice",
    bin_name = "kubectl sluice",
    version,
    about = "Sluice's BatchInferenceJobs and GPU budget, from kubectl"
)]
struct Cli {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One job (deadline, projection, slack, workers, why), or with no name every job and budget.
    Status {
        name: Option<String>,
        /// Every namespace (without a name).
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Print the objects' status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Quote a manifest before applying it: against the GpuBudget that would cover it, beside
    /// the jobs it runs, from its model's learned profile (exit status 1 when infeasible).
    Quote {
        manifest: PathBuf,
        /// Quote against this many GPUs instead of the budget's.
        #[arg(long)]
        gpus: Option<u32>,
        /// The operator's namespace (where the learned profiles are).
        #[arg(long, default_value = "sluice-system")]
        operator_namespace: String,
        /// Quote on this machine alone (no cluster, the prior only).
        #[arg(long)]
        local: bool,
        #[arg(long)]
        json: bool,
    },
    /// Where a job's results and errors are, and how many.
    Results {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: running shards commit, the requests that never ran are recorded as such.
    Cancel { name: String },
    /// Suspend a job: no new workers start; committed results are kept.
    Suspend { name: String },
    /// Resume a suspended job.
    Resume { name: String },
}

async fn client() -> Result<kube::Client, CmdError> {
    kube::Client::try_default()
        .await
        .map_err(|e| CmdError { message: format!("cannot reach the Kubernetes API server (kubeconfig or in-cluster): {e}"), code: 1 })
}

async fn change(ns: &Option<String>, name: &str, what: SpecChange) -> Result<(String, bool), CmdError> {
    let c = client().await?;
    let ns = ns.clone().unwrap_or_else(|| c.default_namespace().to_string());
    Ok((format!("{}\n", kubectl::change(&c, &ns, name, what).await?), true))
}

async fn run(cli: Cli) -> Result<(String, bool), CmdError> {
    let ns_of = |c: &kube::Client| cli.namespace.clone().unwrap_or_else(|| c.default_namespace().to_string());
    match cli.command {
        Cmd::Status { name: Some(name), json, .. } => {
            let c = client().await?;
            let job = kubectl::get_job(&c, &ns_of(&c), &name).await?;
            Ok((
                if json { format!("{}\n", serde_json::to_string_pretty(&job.status).unwrap_or_default()) } else { kubectl::job_text(&job) },
                true,
            ))
        }
        Cmd::Status { name: None, all_namespaces, json } => {
            let c = client().await?;
            let ns = (!all_namespaces).then(|| ns_of(&c));
            let (jobs, budgets) = kubectl::fleet(&c, ns.as_deref()).await?;
            if json {
                let v = serde_json::json!({
                    "jobs": jobs.iter().map(|j| serde_json::json!({"metadata": {"namespace": j.metadata.namespace, "name": j.metadata.name}, "status": j.status})).collect::<Vec<_>>(),
                    "budgets": budgets.iter().map(|b| serde_json::json!({"name": b.metadata.name, "spec": b.spec, "status": b.status})).collect::<Vec<_>>(),
                });
                return Ok((format!("{v}\n"), true));
            }
            Ok((kubectl::fleet_text(&jobs, &budgets), true))
        }
        Cmd::Quote { manifest, gpus, operator_namespace, local, json } => {
            let against =
                if local { Against::Local { gpus } } else { Against::Cluster { client: client().await?, operator_namespace, gpus } };
            let q = quote::quote(&manifest, jiff::Timestamp::now(), against).await.map_err(|message| CmdError { message, code: 2 })?;
            Ok((if json { format!("{}\n", q.json()) } else { q.text() }, q.quote.feasible))
        }
        Cmd::Results { name, json } => {
            let c = client().await?;
            let job = kubectl::get_job(&c, &ns_of(&c), &name).await?;
            Ok((if json { format!("{}\n", kubectl::results_json(&job)) } else { kubectl::results_text(&job) }, true))
        }
        Cmd::Cancel { name } => change(&cli.namespace, &name, SpecChange::Cancel).await,
        Cmd::Suspend { name } => change(&cli.namespace, &name, SpecChange::Suspend).await,
        Cmd::Resume { name } => change(&cli.namespace, &name, SpecChange::Resume).await,
    }
}

fn main() -> ExitCode {
    sluice_api::tls::install_crypto_provider();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubectl-sluice: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok((out, ok)) => {
            print!("{out}");
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("kubectl-sluice: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
