//! Hearing the other replicas: with PostgreSQL, every commit publishes what it changed (`NOTIFY`), and this
//! worker feeds what the other replicas published into the local notifier, the job runner and the expiry
//! timers — so an agent waiting on one replica wakes when an approver decides on another.
//!
//! After a lost connection it may have missed messages, so it wakes every waiter to re-read and re-arms the
//! expiry timers from the store. While it cannot listen (the feed says so every few seconds) it re-reads
//! policies and credentials and wakes every waiter each time, so a change made elsewhere reaches this replica
//! within seconds even then; `/readyz` fails meanwhile. SQLite is one process and has no such worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use countersign_store::{FeedEvent, ReplicaFeed};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;

/// Runs the feed the server opened before it started serving ([`crate::server::Server`]), so nothing
/// another replica commits after that is missed.
///
/// A message is applied before the next is read (a policy it names is reloaded before anything is woken).
/// Re-reading everything (after a gap, while deaf, or for a message that could not list what changed) reads
/// every org's policy, which can take long with many orgs: it runs on a task of its own ([`Refresher`]), one
/// pass at a time, so the feed keeps being read and a burst of such messages costs one or two passes.
pub async fn run(gateway: Gateway, mut feed: ReplicaFeed, shutdown: CancellationToken) {
    let refresher = Refresher::start(&gateway);
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = feed.recv() => next,
        };
        match next {
            Some(FeedEvent::Message(message)) => {
                if gateway.apply_remote_changes(&message).await {
                    refresher.request(true);
                }
            }
            Some(FeedEvent::Deaf) => {
                tracing::warn!(
                    "not hearing the other replicas; re-reading policies and credentials and waking every waiter \
                     until the feed listens again"
                );
                refresher.request(false);
            }
            Some(FeedEvent::Resumed) => {
                tracing::info!(
                    "replica feed listening again; forgetting cached credentials, re-reading policies, waking every \
                     waiter to re-read"
                );
                refresher.request(true);
            }
            None => return,
        }
    }
}

/// Re-reads what a replica may have missed, one pass at a time. A pass asked for while one runs is queued
/// (at most one: it begins after every request it stands for, so nothing committed before a request is
/// missed); further requests meanwhile join it.
struct Refresher {
    requests: mpsc::Sender<()>,
    /// Some request since the queued pass began asked for the expiry timers to be re-armed too.
    rearm: Arc<AtomicBool>,
}

impl Refresher {
    /// Starts the task that runs the passes; it ends when the worker does.
    fn start(gateway: &Gateway) -> Refresher {
        let (requests, mut queued) = mpsc::channel::<()>(1);
        let rearm = Arc::new(AtomicBool::new(false));
        let (gateway, wanted) = (gateway.clone(), rearm.clone());
        tokio::spawn(async move {
            let mut rearming: Option<tokio::task::JoinHandle<()>> = None;
            while queued.recv().await.is_some() {
                let rearm = wanted.swap(false, Ordering::AcqRel);
                refresh(&gateway).await;
                // One re-arm at a time: while the store cannot be read, one already retries every second.
                if rearm && rearming.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                    rearming = Some(gateway.rearm_expiry_timers_until_done("a replica may have missed deadlines"));
                }
            }
        });
        Refresher { requests, rearm }
    }

    /// Asks for a pass (and with `rearm`, the expiry timers re-armed after it).
    fn request(&self, rearm: bool) {
        if rearm {
            self.rearm.store(true, Ordering::Release);
        }
        // Full: a pass is queued and has not begun, so it covers this request too.
        let _ = self.requests.try_send(());
    }
}

/// Forgets cached credentials, re-reads every org's policy, then wakes every waiter and the job runner.
async fn refresh(gateway: &Gateway) {
    gateway.forget_cached_credentials();
    gateway.reload_policies().await;
    gateway.notifier().wake_everyone();
    gateway.wake_job_runner();
}
