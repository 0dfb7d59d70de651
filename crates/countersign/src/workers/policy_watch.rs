//! Reloads the policy file when it changes on disk (and on demand, for SIGHUP). A policy that fails
//! validation is logged and ignored: the running one keeps ruling.

use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

/// Reloads once and logs the outcome.
pub async fn reload(gateway: &Gateway, why: &str) {
    match gateway.reload_policy_file().await {
        Ok(Some(version)) => tracing::info!(%version, why, "policy reloaded"),
        Ok(None) => tracing::debug!(why, "policy unchanged"),
        Err(error) => tracing::error!(%error, why, "policy reload refused; the running policy stays"),
    }
}

/// Watches the configured policy path until shutdown. Bursts of events are coalesced.
pub async fn run(gateway: Gateway, shutdown: CancellationToken) {
    let Some(path) = gateway.policies().path().map(std::path::Path::to_path_buf) else { return };
    let (tx, mut rx) = mpsc::unbounded_channel();
    // An error from the watcher may stand for a change it could not describe (an overflowed event queue):
    // logged, and the file read again (a reload of an unchanged file changes nothing).
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Err(error) = &event {
            tracing::warn!(%error, "the policy file watcher reported an error; reading the file again");
        }
        let _ = tx.send(());
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(error) => {
            tracing::warn!(%error, "cannot watch the policy file; reload with SIGHUP or PUT /v1/policy");
            return;
        }
    };
    // Watch the folder that holds the file, so editors that replace the file are seen too.
    let watched =
        if path.is_dir() { path.clone() } else { path.parent().map(std::path::Path::to_path_buf).unwrap_or_default() };
    if let Err(error) = watcher.watch(&watched, RecursiveMode::NonRecursive) {
        tracing::warn!(%error, "cannot watch the policy file; reload with SIGHUP or PUT /v1/policy");
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            event = rx.recv() => {
                if event.is_none() { return; }
                // Let the writer finish, then take every event that arrived meanwhile.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while rx.try_recv().is_ok() {}
                reload(&gateway, "file changed").await;
            }
        }
    }
}
