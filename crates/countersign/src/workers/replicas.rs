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
pub async fn run(gateway: Gateway, mut feed: ReplicaFeed, shutdown: CancellationToken) {
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
                gateway.forget_cached_credentials();
                gateway.reload_policies().await;
                gateway.notifier().wake_everyone();
                gateway.wake_job_runner();
            }
            Some(FeedEvent::Resumed) => {
                tracing::info!(
                    "replica feed reconnected; forgetting cached credentials, waking every waiter to re-read"
                );
                gateway.forget_cached_credentials();
                gateway.reload_policies().await;
                gateway.notifier().wake_everyone();
                gateway.wake_job_runner();
                gateway.rearm_expiry_timers_until_done("replica feed reconnected");
            }
            None => return,
        }
    }
}
