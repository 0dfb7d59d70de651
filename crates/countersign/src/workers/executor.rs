//! The executor: takes approved actions off the queue and runs each to its end, a bounded number at a time.
//!
//! On shutdown it stops taking new work and lets running executions finish; whatever is left is found again
//! by restart recovery.

use std::sync::Arc;

use countersign_core::ids::{ActionId, OrgId};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::Gateway;

const MAX_CONCURRENT_EXECUTIONS: usize = 64;

pub async fn run(
    gateway: Gateway,
    mut queue: mpsc::UnboundedReceiver<(OrgId, ActionId)>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_EXECUTIONS));
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = queue.recv() => next,
        };
        let Some((org, action)) = next else { return };
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let gateway = gateway.clone();
        tracker.spawn(async move {
            if let Err(error) = gateway.execute_action(&org, &action).await {
                tracing::error!(action = %action, %error, "execution failed");
            }
            drop(permit);
        });
    }
}
