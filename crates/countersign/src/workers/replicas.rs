//! Hearing the other replicas: with PostgreSQL, every commit publishes what it changed (`NOTIFY`), and this
//! worker feeds what the other replicas published into the local notifier, the job runner and the expiry
//! timers — so an agent waiting on one replica wakes when an approver decides on another.
//!
//! After a lost connection it may have missed messages, so it wakes every waiter to re-read and re-arms the
//! expiry timers from the store. While it cannot listen (the feed says so every few seconds) it re-reads
//! policies and credentials and wakes every waiter each time, so a change made elsewhere reaches this replica
//! within seconds even then; `/readyz` fails meanwhile. SQLite is one process and has no such worker.

use countersign_store::{FeedEvent, ReplicaFeed};
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

/// Runs the feed the server opened before it started serving ([`crate::server::Server`]), so nothing
/// another replica commits after that is missed.
///
/// A message is applied before the next is read (a policy it names is reloaded before anything is woken).
/// Re-reading everything after a gap reads every org's policy, which can take long with many orgs: it runs on
/// a task of its own ([`Refresher`]) so the feed keeps being read meanwhile.
pub async fn run(gateway: Gateway, mut feed: ReplicaFeed, shutdown: CancellationToken) {
    let mut refresher = Refresher::default();
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = feed.recv() => next,
        };
        match next {
            Some(FeedEvent::Message(message)) => gateway.apply_remote_changes(&message).await,
            Some(FeedEvent::Deaf) => {
                tracing::warn!(
                    "not hearing the other replicas; re-reading policies and credentials and waking every waiter \
                     until the feed listens again"
                );
                refresher.while_deaf(&gateway);
            }
            Some(FeedEvent::Resumed) => {
                tracing::info!(
                    "replica feed listening again; forgetting cached credentials, re-reading policies, waking every \
                     waiter to re-read"
                );
                refresher.after_gap(&gateway);
            }
            None => return,
        }
    }
}

/// Re-reads what a replica may have missed, one pass at a time.
#[derive(Default)]
struct Refresher {
    running: Option<tokio::task::JoinHandle<()>>,
}

impl Refresher {
    /// While deaf (said every few seconds): a pass, unless one is still running.
    fn while_deaf(&mut self, gateway: &Gateway) {
        if self.running.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
            let gateway = gateway.clone();
            self.running = Some(tokio::spawn(async move { refresh(&gateway).await }));
        }
    }

    /// Listening again: a pass that begins after the feed listens (once any running pass ends, since that
    /// one may have read before), so nothing committed in the gap is missed; and the expiry timers re-armed.
    fn after_gap(&mut self, gateway: &Gateway) {
        let previous = self.running.take();
        let gateway = gateway.clone();
        self.running = Some(tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            refresh(&gateway).await;
            gateway.rearm_expiry_timers_until_done("replica feed listening again");
        }));
    }
}

/// Forgets cached credentials, re-reads every org's policy, then wakes every waiter and the job runner.
async fn refresh(gateway: &Gateway) {
    gateway.forget_cached_credentials();
    gateway.reload_policies().await;
    gateway.notifier().wake_everyone();
    gateway.wake_job_runner();
}
