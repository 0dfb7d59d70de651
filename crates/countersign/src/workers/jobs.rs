//! The job runner: claims due jobs under a lease, runs each on its own task (a bounded number at a time),
//! renews the lease while it runs, and settles the outcome.
//!
//! It wakes when a commit adds jobs, when a slot frees up, and when the next delayed job or lease falls due —
//! never on a fixed polling tick, except a slow safety look every few seconds for work another replica
//! added. On shutdown it stops claiming and lets running jobs finish; a job cut off anyway is taken up again
//! when its lease runs out.

use std::sync::Arc;
use std::time::Duration;

use countersign_core::domain::Job;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::Gateway;

/// The longest the runner sleeps without looking at the store.
const SAFETY_LOOK: Duration = Duration::from_secs(5);
/// How long the runner waits after a claim failed before it tries again.
const CLAIM_RETRY: Duration = Duration::from_secs(1);
/// How often orgs with a retention window get a retention job.
const RETENTION_SWEEP: Duration = Duration::from_secs(3600);

pub async fn run(gateway: Gateway, shutdown: CancellationToken, tracker: TaskTracker) {
    let permits = Arc::new(Semaphore::new(gateway.job_settings().concurrency.max(1)));
    loop {
        // Claim while there are free slots and due jobs.
        let mut slots_full = false;
        let mut claim_failed = false;
        loop {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                slots_full = true;
                break;
            };
            if shutdown.is_cancelled() {
                return;
            }
            match gateway.claim_job().await {
                Ok(Some(job)) => {
                    let slot = Slot { permit: Some(permit), gateway: gateway.clone() };
                    tracker.spawn(async move {
                        run_one(&slot.gateway, job).await;
                        drop(slot);
                    });
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::error!(%error, "cannot claim a job");
                    claim_failed = true;
                    break;
                }
            }
        }
        // With every slot busy, a job that is due already cannot be claimed before a slot frees, and a freed
        // slot wakes the runner: sleeping until "due" (now) would spin on the store. After a failed claim,
        // back off instead of retrying at once.
        let sleep = if slots_full {
            SAFETY_LOOK
        } else if claim_failed {
            CLAIM_RETRY
        } else {
            match gateway.next_job_due().await {
                Ok(Some(due)) => (due - gateway.now()).to_std().unwrap_or_default().min(SAFETY_LOOK),
                Ok(None) => SAFETY_LOOK,
                Err(error) => {
                    tracing::error!(%error, "cannot read when the next job is due");
                    SAFETY_LOOK
                }
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = gateway.jobs_added() => {}
            () = tokio::time::sleep(sleep.max(Duration::from_millis(1))) => {}
        }
    }
}

/// A claimed job's slot: freed, and the runner woken to fill it, when the job's task ends, even by a panic
/// (the runner waits for a slot to free once all are busy).
struct Slot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    gateway: Gateway,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Free first, then wake: the runner wakes to a slot it can take.
        drop(self.permit.take());
        self.gateway.wake_job_runner();
    }
}

/// Runs a claimed job while its lease holds. Once the lease is lost (taken over, or not renewed in time
/// because the store stalled), the job may already be another runner's: the handler is stopped where it
/// is, as if this process had died, and the job is left to whoever holds it now. That runner meets the
/// crash case the handlers are built for (an execution found `executing` is resent only to a `retry_safe`
/// upstream, else ends "outcome unknown"), instead of two handlers racing on one job.
async fn run_one(gateway: &Gateway, job: Job) {
    let lease = gateway.job_settings().lease;
    let renew_every = lease / 3;
    // The lease began at the claim, a moment before this; count it a little short.
    let mut held_until = tokio::time::Instant::now() + lease - lease / 10;
    let work = gateway.run_job(&job);
    tokio::pin!(work);
    let outcome = loop {
        let renew_at = (tokio::time::Instant::now() + renew_every).min(held_until);
        tokio::select! {
            outcome = &mut work => break outcome,
            () = tokio::time::sleep_until(renew_at) => {
                let asked = tokio::time::Instant::now();
                match gateway.renew_job_lease(&job).await {
                    Ok(true) => held_until = asked + lease - lease / 10,
                    Ok(false) => {
                        tracing::warn!(job = %job.id, "lease lost while running; stopped, the job is another runner's now");
                        return;
                    }
                    Err(error) if tokio::time::Instant::now() >= held_until => {
                        tracing::error!(job = %job.id, %error, "cannot renew a job lease before it ran out; stopped, the job runs again");
                        return;
                    }
                    Err(error) => tracing::error!(job = %job.id, %error, "cannot renew a job lease; trying again"),
                }
            }
        }
    };
    if let Err(error) = gateway.settle_job(&job, outcome).await {
        tracing::error!(job = %job.id, %error, "cannot record a job's outcome; its lease will run out and it runs again");
    }
}

/// Queues retention runs at start and then hourly.
pub async fn sweep_retention(gateway: Gateway, shutdown: CancellationToken) {
    loop {
        if let Err(error) = gateway.schedule_retention().await {
            tracing::error!(%error, "cannot schedule audit retention");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETENTION_SWEEP) => {}
        }
    }
}
