//! Wiring the reconciler into a kube-runtime Controller: wait for the CRD to be established,
//! watch BatchInferenceJobs through `DeserializeGuard` (a malformed object is reported, not
//! fatal) and their owned Jobs, re-reconcile everything when leadership is gained, and stop
//! gracefully on shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Controller;
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, CustomResourceExt};
use sluice_api::{BatchInferenceJob, GpuBudget};

use crate::context::Context;
use crate::reconcile::{error_policy, log_results, reconcile};

/// Why the operator could not start watching.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "the CustomResourceDefinition {crd} was not established within {secs} s (install it first: kubectl apply -f crds/batchinferencejob.yaml)"
    )]
    CrdTimeout { crd: String, secs: u64 },
    #[error("waiting for the CustomResourceDefinition {crd}: {source}")]
    CrdWait {
        crd: String,
        #[source]
        source: kube::runtime::wait::Error,
    },
}

/// Wait until the BatchInferenceJob CRD is established.
pub async fn wait_for_crd(client: Client, timeout: Duration) -> Result<(), StartError> {
    let crd = BatchInferenceJob::crd_name();
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let established = await_condition(api, crd, conditions::is_crd_established());
    match tokio::time::timeout(timeout, established).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(StartError::CrdWait { crd: crd.to_string(), source }),
        Err(_) => Err(StartError::CrdTimeout { crd: crd.to_string(), secs: timeout.as_secs() }),
    }
}

/// Run the controller until `shutdown` resolves. `watch_namespace` empty or `None` watches all
/// namespaces. `leadership_gained` triggers a reconcile of every job.
pub async fn run(
    ctx: Arc<Context>,
    watch_namespace: Option<String>,
    leadership_gained: impl Stream<Item = ()> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (jobs, bijs): (Api<Job>, Api<DeserializeGuard<BatchInferenceJob>>) = match watch_namespace.as_deref().filter(|n| !n.is_empty()) {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=sluice-operator");
    let controller = Controller::new(bijs, watcher::Config::default().any_semantic());
    ctx.set_job_store(controller.store());
    // The GpuBudgets, cluster-scoped, in a cache the fleet reads (none while the CRD is absent:
    // the watch backs off and retries).
    let (budgets, writer) = reflector::store::<GpuBudget>();
    ctx.set_budget_store(budgets);
    let watch = reflector(writer, watcher(Api::<GpuBudget>::all(ctx.client.clone()), watcher::Config::default()))
        .default_backoff()
        .for_each(|e| async move {
            if let Err(e) = e {
                tracing::debug!(error = %e, "watching GpuBudgets (is the GpuBudget CRD installed?)");
            }
        });
    tokio::spawn(watch);
    let (wake_tx, wake_rx) = futures::channel::mpsc::unbounded();
    ctx.set_wakeups(wake_tx);
    let stream = controller
        .owns(jobs, owned)
        .reconcile_all_on(futures::stream::select(leadership_gained, wake_rx))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .boxed();
    log_results(stream).await;
}
