//! Approval expiry by timers, not by scanning the table: one task holds a `DelayQueue` with one entry per
//! pending approval, armed at submission and, after a restart, from the store's pending deadlines.
//!
//! When a timer fires the gateway expires the approval in a transaction that first re-checks it is still
//! pending and due, so a decided approval is left alone and an early timer is simply re-armed.

use std::collections::HashSet;
use std::time::Duration;

use countersign_core::ids::ApprovalId;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

use crate::gateway::{ExpiryRequest, Gateway};

/// The longest a timer is set for. A later deadline fires early, finds the approval not yet due and is set
/// again; this keeps every delay inside what the timer wheel accepts (about two years).
const LONGEST_TIMER: Duration = Duration::from_secs(24 * 3600);

fn delay_until(gateway: &Gateway, request: &ExpiryRequest) -> Duration {
    (request.expires_at - gateway.now()).to_std().unwrap_or(Duration::ZERO).min(LONGEST_TIMER)
}

pub async fn run(gateway: Gateway, mut requests: mpsc::UnboundedReceiver<ExpiryRequest>, shutdown: CancellationToken) {
    let mut timers: DelayQueue<ExpiryRequest> = DelayQueue::new();
    // One timer per approval, however often it is announced (its own commit, other replicas, re-arming).
    let mut armed: HashSet<ApprovalId> = HashSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            request = requests.recv() => match request {
                Some(request) => {
                    if armed.insert(request.approval_id.clone()) {
                        let delay = delay_until(&gateway, &request);
                        timers.insert(request, delay);
                    }
                }
                None => return,
            },
            Some(expired) = timers.next(), if !timers.is_empty() => {
                let request = expired.into_inner();
                armed.remove(&request.approval_id);
                match gateway.expire_approval(&request.org_id, &request.approval_id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        let delay = delay_until(&gateway, &request).max(Duration::from_millis(10));
                        armed.insert(request.approval_id.clone());
                        timers.insert(request, delay);
                    }
                    Err(error) => {
                        tracing::warn!(approval = %request.approval_id, %error, "expiring an approval failed; retrying in 1s");
                        armed.insert(request.approval_id.clone());
                        timers.insert(request, Duration::from_secs(1));
                    }
                }
            }
        }
    }
}
