//! Leader election on a coordination.k8s.io Lease (kube-lease-manager): only the holder
//! reconciles and writes. Publishes leadership to a shared flag, the `sluice_operator_leader`
//! gauge, and a trigger that re-reconciles every job when leadership is gained.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::mpsc;

use crate::job_builder::FIELD_MANAGER;
use crate::metrics::Metrics;

/// Lease timing: a holder renews every few seconds; a dead holder is replaced after this many.
pub const LEASE_DURATION_SECS: u64 = 15;
/// Grace before the lease is renewed.
pub const LEASE_GRACE_SECS: u64 = 5;

/// Where the Lease lives and who we are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
}

/// The field manager of this replica's Lease writes: unique per identity.
pub fn lease_field_manager(identity: &str) -> String {
    format!("{FIELD_MANAGER}-lease-{identity}")
}

/// Take part in the election until `shutdown` resolves, then release the Lease. `leader` is set
/// while this replica holds it; each gain sends one `()` on `gained`.
pub async fn run(
    client: Client,
    settings: LeaseSettings,
    leader: Arc<AtomicBool>,
    metrics: Metrics,
    gained: mpsc::UnboundedSender<()>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), kube_lease_manager::LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(LEASE_DURATION_SECS)
        .with_grace(LEASE_GRACE_SECS)
        // One field manager per replica: the library takes an orphaned Lease with a server-side
        // apply that must conflict with another replica's; a shared manager never conflicts, and
        // two replicas starting together both became leader (seen on a real API server).
        .with_field_manager(lease_field_manager(&settings.identity))
        .build()
        .await?;
    let (mut channel, task) = manager.watch().await;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            changed = channel.changed() => {
                if changed.is_err() {
                    break;
                }
                let is_leader = *channel.borrow_and_update();
                let was = leader.swap(is_leader, Ordering::SeqCst);
                metrics.leader.set(i64::from(is_leader));
                if is_leader && !was {
                    tracing::info!(lease = %settings.name, identity = %settings.identity, "acquired the Lease; reconciling");
                    let _ = gained.send(());
                } else if !is_leader && was {
                    tracing::warn!(lease = %settings.name, "lost the Lease; no more writes");
                }
            }
        }
    }
    leader.store(false, Ordering::SeqCst);
    metrics.leader.set(0);
    drop(channel);
    match task.await {
        Ok(result) => result.map(|_| ()),
        Err(e) => {
            tracing::warn!(error = %e, "lease task ended abnormally");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_replica_writes_the_lease_as_its_own_field_manager() {
        let (a, b) = (super::lease_field_manager("op-1234"), super::lease_field_manager("op-5678"));
        assert_ne!(a, b);
        assert!(a.starts_with("sluice-operator-lease-") && a.len() <= 128, "{a}");
    }
}
