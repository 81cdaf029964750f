//! Stop signals: SIGTERM (a pod's preemption or deletion) and SIGINT become one watch flag the
//! runtime polls; it stops admitting work, commits what is finished and exits with 143.

use tokio::sync::watch;

/// Install handlers; the receiver turns `true` at the first SIGTERM or SIGINT.
pub fn stop_signal() -> std::io::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = which, "stop requested: no new requests; committing finished work");
        let _ = tx.send(true);
        // Keep the sender alive so receivers do not see a closed channel.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}
