//! Approval expiry by timers, not by scanning the table: one task holds a `DelayQueue` with one entry per
//! pending approval, armed at submission and, after a restart, from the store's pending deadlines.
//!
//! When a timer fires the gateway expires the approval in a transaction that first re-checks it is still
//! pending and due, so a decided approval is left alone and an early timer is simply re-armed. Up to
//! [`CONCURRENT_EXPIRIES`] run at once, each on a task of its own, so approvals due together expire together.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use countersign_core::ids::ApprovalId;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

use crate::gateway::{ExpiryRequest, Gateway};

/// The longest a timer is set for. A later deadline fires early, finds the approval not yet due and is set
/// again; this keeps every delay inside what the timer wheel accepts (about two years).
const LONGEST_TIMER: Duration = Duration::from_secs(24 * 3600);

fn delay_until(gateway: &Gateway, request: &ExpiryRequest) -> Duration {
    (request.expires_at - gateway.now()).to_std().unwrap_or(Duration::ZERO).min(LONGEST_TIMER)
}

/// How many expiries run at once. Each is a write transaction with a durable commit; run one at a time, a
/// burst of approvals due together (2,000 submitted within a second, say) would end seconds after their
/// deadline, and one slow expiry would hold up every timer behind it. Run together, SQLite's commits share
/// syncs (group commit), and on PostgreSQL different orgs' expiries proceed side by side (one org's queue
/// on its audit head). Well under the PostgreSQL pool's 16 connections, so a burst never takes them all.
const CONCURRENT_EXPIRIES: usize = 4;

/// How one expiry ended.
enum Expiry {
    /// Expired now, or decided before: nothing more to do.
    Settled,
    /// Its deadline has not come (a timer set for at most a day, or a clock that moved): set it again.
    NotDue,
    /// The transaction failed (logged): tried again in a second.
    Failed,
}

pub async fn run(gateway: Gateway, mut requests: mpsc::UnboundedReceiver<ExpiryRequest>, shutdown: CancellationToken) {
    let mut timers: DelayQueue<ExpiryRequest> = DelayQueue::new();
    // One timer per approval, however often it is announced (its own commit, other replicas, re-arming); an
    // approval stays armed while its expiry runs.
    let mut armed: HashSet<ApprovalId> = HashSet::new();
    let mut running: JoinSet<Expiry> = JoinSet::new();
    // What each running expiry is about, so one that ends in any way (a panic included) is seen to.
    let mut about: HashMap<tokio::task::Id, ExpiryRequest> = HashMap::new();
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
            Some(expired) = timers.next(), if !timers.is_empty() && running.len() < CONCURRENT_EXPIRIES => {
                let request = expired.into_inner();
                let (gateway, org, id) = (gateway.clone(), request.org_id.clone(), request.approval_id.clone());
                let task = running.spawn(async move {
                    match gateway.expire_approval(&org, &id).await {
                        Ok(true) => Expiry::Settled,
                        Ok(false) => Expiry::NotDue,
                        Err(error) => {
                            tracing::warn!(approval = %id, %error, "expiring an approval failed; retrying in 1s");
                            Expiry::Failed
                        }
                    }
                });
                about.insert(task.id(), request);
            }
            Some(ended) = running.join_next_with_id(), if !running.is_empty() => {
                let (task, outcome) = match ended {
                    Ok((task, outcome)) => (task, Some(outcome)),
                    Err(error) => (error.id(), None),
                };
                let Some(request) = about.remove(&task) else { continue };
                match outcome {
                    Some(Expiry::Settled) => {
                        armed.remove(&request.approval_id);
                    }
                    Some(Expiry::NotDue) => {
                        let delay = delay_until(&gateway, &request).max(Duration::from_millis(10));
                        timers.insert(request, delay);
                    }
                    Some(Expiry::Failed) => {
                        timers.insert(request, Duration::from_secs(1));
                    }
                    None => {
                        tracing::error!(approval = %request.approval_id, "expiring an approval panicked; retrying in 1s");
                        timers.insert(request, Duration::from_secs(1));
                    }
                }
            }
        }
    }
}
