//! Jobs: the one model for asynchronous work — executing approved actions, delivering webhooks, exporting
//! and trimming the audit log.
//!
//! A job is written in the transaction that creates the need for it, claimed by a runner with a lease
//! (`claim_job`), and settled by [`Gateway::settle_job`] only while that runner still holds the lease. A
//! runner that dies leaves its lease to run out; the job is then claimed again and its handler sees the
//! attempt count and the state of what it works on, so each kind decides what a second attempt may do.

use std::time::Duration;

use countersign_core::audit::Actor;
use countersign_core::domain::{Action, Job, JobKind};
use countersign_core::ids::{ActionId, JobId};
use countersign_core::state::{ActionState, JobState};
use countersign_core::store::{JobFilter, Page};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{Caller, Gateway, WaitSlot, Work};
use crate::error::{Error, Result};

/// The longest a `…/wait` holds a request.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// How the job runner behaves; tests shorten the delays.
#[derive(Debug, Clone)]
pub struct JobRunnerSettings {
    /// This runner's name on the leases it takes.
    pub owner: String,
    /// How long a claim holds before another runner may take the job; renewed while the job runs.
    pub lease: Duration,
    /// Jobs run at the same time.
    pub concurrency: usize,
    /// The first retry delay of a webhook delivery; each later one doubles, with jitter.
    pub webhook_retry_base: Duration,
    pub webhook_max_attempts: u32,
    /// How long the execution job of an approved model request waits while its client holds the LLM
    /// proxy's connection open, so that the live connection carries it out; the job runs it only after.
    pub llm_hold_grace: Duration,
    /// How far past the provider's timeout the recovery job of an inline model call is due: it runs only
    /// if the process carrying the call died, and ends the action `failed` with `outcome unknown`.
    pub llm_recovery_margin: Duration,
}

impl Default for JobRunnerSettings {
    fn default() -> Self {
        JobRunnerSettings {
            owner: format!("runner-{}", ulid::Ulid::generate()),
            lease: Duration::from_secs(30),
            concurrency: 64,
            webhook_retry_base: Duration::from_secs(1),
            webhook_max_attempts: 8,
            llm_hold_grace: Duration::from_secs(30),
            llm_recovery_margin: Duration::from_secs(60),
        }
    }
}

/// How one run of a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    Succeeded(Value),
    /// Permanently: no further attempt.
    Failed(String),
    /// Try again after a backoff, while attempts remain.
    Retry(String),
    Cancelled(String),
}

/// A job filter from the text every front end receives; an unknown kind or state is a 400 naming the field and
/// the values that exist.
pub fn job_filter(kind: Option<&str>, state: Option<&str>, subject: Option<String>) -> Result<JobFilter> {
    let kind = kind
        .map(|k| {
            JobKind::parse(k).ok_or_else(|| {
                let known: Vec<&str> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
                Error::bad_request("kind", format!("`{k}` is not a job kind; known: {}", known.join(", ")))
            })
        })
        .transpose()?;
    let state = state
        .map(|s| {
            JobState::parse(s).ok_or_else(|| {
                let known: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                Error::bad_request("state", format!("`{s}` is not a job state; known: {}", known.join(", ")))
            })
        })
        .transpose()?;
    Ok(JobFilter { kind, state, subject, agent: None })
}

/// `base · 2^(attempt-1)`, capped at an hour, with "equal jitter": half fixed, half random. Successive
/// delays never shrink, and runners that failed together do not retry together.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(20);
    let full = base.saturating_mul(1u32 << exponent).min(Duration::from_secs(3600));
    let half = full / 2;
    let jitter = rand::random_range(0.0..=1.0);
    half + half.mul_f64(jitter)
}

/// An execution job that ended without its action ending (it gave up after its attempts, or failed on an
/// error of its own) takes the action with it, in the same transaction: nothing else would ever finish it.
/// Still `approved`, nothing was sent; `executing`, the request may have gone out, so the outcome is unknown.
async fn fail_unfinished_action(work: &mut Work, job: &Job, now: chrono::DateTime<chrono::Utc>) -> Result<()> {
    let Some(id) = job.subject.as_deref().and_then(ActionId::parse) else { return Ok(()) };
    let Some(mut action) = work.tx.get_action(&job.org_id, &id).await? else { return Ok(()) };
    let why = job.error.as_deref().unwrap_or("no reason recorded");
    let (error, reason) = match action.state {
        ActionState::Approved => {
            (format!("not carried out: its execution job gave up before sending ({why})"), "not_sent")
        }
        ActionState::Executing => (
            format!("outcome unknown: its execution job gave up after the request may have gone out ({why})"),
            "outcome_unknown",
        ),
        _ => return Ok(()),
    };
    let data = json!({"status": null, "error": error, "reason": reason, "job_id": job.id});
    fail_action(work, &mut action, now, &Actor::system(), error, data).await
}

/// Ends an action of an execution job that is no longer coming `failed`, audited and announced, in `work`.
pub(super) async fn fail_action(
    work: &mut Work,
    action: &mut Action,
    now: chrono::DateTime<chrono::Utc>,
    actor: &Actor,
    error: String,
    data: Value,
) -> Result<()> {
    action.state = action.state.transition(ActionState::Failed)?;
    action.error = Some(error);
    action.finished_at = Some(now);
    work.tx.update_action(action).await?;
    work.audit(&action.org_id, now, actor, "action.failed", Some(action.id.as_str()), data).await?;
    work.emit("action.finished", super::webhooks::action_data(action));
    work.action_changed(&action.org_id, &action.id);
    Ok(())
}

impl Gateway {
    pub fn job_settings(&self) -> &JobRunnerSettings {
        &self.inner.jobs
    }

    /// Resolves when a commit added jobs.
    pub async fn jobs_added(&self) {
        self.inner.jobs_added.notified().await;
    }

    /// Wakes the runner, e.g. when a slot frees up.
    pub fn wake_job_runner(&self) {
        self.inner.jobs_added.notify_one();
    }

    /// Takes the next due job under a lease of its own, if there is one. The lease's owner names this
    /// runner and this one claim (`<runner>/<claim>`), so a job this runner lost and then took again is a
    /// different claim: the earlier handler's renewals and settling no longer match it.
    pub async fn claim_job(&self) -> Result<Option<Job>> {
        let owner = format!("{}/{}", self.inner.jobs.owner, ulid::Ulid::generate());
        let mut work = self.write().await?;
        // The lease runs from when the writer is ours, not from before a wait for it (a busy pool, a long
        // write ahead): the runner counts its first renewal from the claim's return, so a lease timed from
        // earlier could run out, and another runner take the job, while this one still holds it in mind.
        let now = self.now();
        let lease_until = now + chrono::Duration::from_std(self.inner.jobs.lease).unwrap_or_default();
        let job = work.tx.claim_job(now, &owner, lease_until).await?;
        if let Some(job) = &job {
            work.job_changed(job);
        }
        work.commit(self).await?;
        Ok(job)
    }

    /// When the runner should look again if nothing wakes it.
    pub async fn next_job_due(&self) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        Ok(self.read().await?.next_job_due().await?)
    }

    /// Keeps the lease of this claim of a running job; false once it was lost.
    pub async fn renew_job_lease(&self, job: &Job) -> Result<bool> {
        let Some(owner) = job.lease_owner.as_deref() else { return Ok(false) };
        let mut work = self.write().await?;
        let until = self.now() + chrono::Duration::from_std(self.inner.jobs.lease).unwrap_or_default();
        let held = work.tx.renew_job_lease(&job.id, owner, until).await?;
        work.commit(self).await?;
        Ok(held)
    }

    /// Records how far a running job has come, if this runner still holds it.
    pub async fn report_progress(&self, job: &Job, progress: Value) -> Result<()> {
        let mut work = self.write().await?;
        let Some(mut current) = work.tx.get_job(&job.org_id, &job.id).await? else { return Ok(()) };
        if current.state != JobState::Running || job.lease_owner.is_none() || current.lease_owner != job.lease_owner {
            return Ok(());
        }
        current.progress = Some(progress);
        work.tx.update_job(&current).await?;
        work.job_changed(&current);
        work.commit(self).await
    }

    /// At the start of a single-process store: whatever was running belonged to a process that is gone.
    pub async fn release_job_leases(&self) -> Result<u64> {
        let mut work = self.write().await?;
        let released = work.tx.release_job_leases(self.now()).await?;
        work.commit(self).await?;
        if released > 0 {
            self.wake_job_runner();
        }
        Ok(released)
    }

    /// Runs one claimed job's handler.
    pub async fn run_job(&self, job: &Job) -> JobOutcome {
        match job.kind {
            JobKind::ActionExecute => self.execute_job(job).await,
            JobKind::WebhookDeliver => self.deliver_webhook(job).await,
            JobKind::AuditExport => self.export_audit_job(job).await,
            JobKind::AuditRetention => self.retention_job(job).await,
        }
    }

    /// Records how a run ended, if this runner still holds the job; a retry goes back to the queue.
    pub async fn settle_job(&self, job: &Job, outcome: JobOutcome) -> Result<()> {
        let now = self.now();
        let mut work = self.write().await?;
        let Some(mut current) = work.tx.get_job(&job.org_id, &job.id).await? else {
            return Err(Error::not_found("job", job.id.as_str()));
        };
        if current.state != JobState::Running || job.lease_owner.is_none() || current.lease_owner != job.lease_owner {
            // Cancelled meanwhile, or the lease ran out and another claim took it: theirs to settle.
            tracing::warn!(job = %job.id, state = current.state.as_str(), "job no longer held; outcome dropped");
            return Ok(());
        }
        current.lease_owner = None;
        current.lease_until = None;
        let (state, event) = match outcome {
            JobOutcome::Succeeded(result) => {
                current.result = Some(result);
                current.error = None;
                (JobState::Succeeded, "job.succeeded")
            }
            JobOutcome::Retry(error) if current.attempts < current.max_attempts => {
                let delay = match current.kind {
                    JobKind::WebhookDeliver => backoff(self.inner.jobs.webhook_retry_base, current.attempts),
                    _ => backoff(Duration::from_secs(1), current.attempts),
                };
                current.run_at = now + chrono::Duration::from_std(delay).unwrap_or_default();
                current.error = Some(error);
                (JobState::Queued, "job.retry")
            }
            JobOutcome::Retry(error) => {
                current.error = Some(format!("{error} (gave up after {} attempts)", current.attempts));
                (JobState::Failed, "job.failed")
            }
            JobOutcome::Failed(error) => {
                current.error = Some(error);
                (JobState::Failed, "job.failed")
            }
            JobOutcome::Cancelled(reason) => {
                current.error = Some(reason);
                (JobState::Cancelled, "job.cancelled")
            }
        };
        current.state = current.state.transition(state)?;
        if state.is_terminal() {
            current.finished_at = Some(now);
        }
        work.tx.update_job(&current).await?;
        if state == JobState::Failed
            && current.kind == JobKind::ActionExecute
            && let Err(error) = fail_unfinished_action(&mut work, &current, now).await
        {
            // A store that is only unavailable for now (a lock timeout, a lost connection): nothing is settled,
            // the lease runs out and the job runs again, and then ends its action.
            if matches!(error, Error::Unavailable(_)) {
                return Err(error);
            }
            // Otherwise the job still ends (run again, the same error would fail it forever), but alone, in a
            // transaction of its own: this one may hold the action's change without its audit event. The
            // action stays as it was, and this log line is what says so.
            tracing::error!(job = %current.id, %error, "cannot end the action of a failed execution job");
            drop(work);
            return self.settle_job_alone(job, current).await;
        }
        // Retries are visible on the job and in webhook deliveries; the audit log records how jobs end.
        if state.is_terminal() && current.kind != JobKind::ActionExecute {
            work.audit(
                &current.org_id,
                now,
                &Actor::system(),
                event,
                Some(current.id.as_str()),
                json!({"kind": current.kind, "subject": current.subject, "attempts": current.attempts,
                       "error": current.error}),
            )
            .await?;
        }
        work.job_changed(&current);
        work.jobs_added |= state == JobState::Queued;
        work.commit(self).await?;
        self.metrics().job_finished(current.kind.as_str(), current.state.as_str());
        Ok(())
    }

    /// Ends a job as `settled` says, touching nothing else, if this runner still holds it.
    async fn settle_job_alone(&self, job: &Job, settled: Job) -> Result<()> {
        let mut work = self.write().await?;
        let held = work.tx.get_job(&job.org_id, &job.id).await?.is_some_and(|current| {
            current.state == JobState::Running && job.lease_owner.is_some() && current.lease_owner == job.lease_owner
        });
        if !held {
            tracing::warn!(job = %job.id, "job no longer held; outcome dropped");
            return Ok(());
        }
        work.tx.update_job(&settled).await?;
        work.job_changed(&settled);
        work.commit(self).await?;
        self.metrics().job_finished(settled.kind.as_str(), settled.state.as_str());
        Ok(())
    }

    /// One page of the org's jobs the caller may see, and the cursor of the next page.
    pub async fn list_jobs(
        &self,
        caller: &Caller,
        filter: &JobFilter,
        page: &Page,
    ) -> Result<(Vec<Job>, Option<String>)> {
        // What an agent may see ([`Gateway::may_see_job`]) is filtered by the store, in the same read.
        let filter = JobFilter { agent: caller.agent().map(|agent| agent.id.clone()), ..filter.clone() };
        let jobs = self.read().await?.list_jobs(caller.org_id(), &filter, page).await?;
        let next = if jobs.len() == page.limit as usize { jobs.last().map(|j| j.id.to_string()) } else { None };
        Ok((jobs, next))
    }

    pub async fn get_job(&self, caller: &Caller, id: &JobId) -> Result<Job> {
        let job = self
            .read()
            .await?
            .get_job(caller.org_id(), id)
            .await?
            .ok_or_else(|| Error::not_found("job", id.as_str()))?;
        if !self.may_see_job(caller, &job).await? {
            return Err(Error::not_found("job", id.as_str()));
        }
        Ok(job)
    }

    /// Users see every job of their org; agents and sessions only the executions of their own actions.
    async fn may_see_job(&self, caller: &Caller, job: &Job) -> Result<bool> {
        let Some(agent) = caller.agent() else { return Ok(true) };
        if job.kind != JobKind::ActionExecute {
            return Ok(false);
        }
        let Some(action_id) = job.subject.as_deref().and_then(countersign_core::ids::ActionId::parse) else {
            return Ok(false);
        };
        let action = self.read().await?.get_action(&job.org_id, &action_id).await?;
        Ok(action.is_some_and(|a| a.agent_id == agent.id))
    }

    /// Waits until the job ends or `timeout` passes; wakes on the commit that changes it. Counts as one of the
    /// caller's open waits while it waits (429 past the limit).
    pub async fn wait_job(&self, caller: &Caller, id: &JobId, timeout: Duration) -> Result<Job> {
        self.wait_job_in(None, caller, id, timeout).await
    }

    /// [`Gateway::wait_job`] for a caller that already holds one of its open waits (`slot`), taken before it
    /// started the job.
    pub async fn wait_job_holding(
        &self,
        slot: &WaitSlot,
        caller: &Caller,
        id: &JobId,
        timeout: Duration,
    ) -> Result<Job> {
        self.wait_job_in(Some(slot), caller, id, timeout).await
    }

    async fn wait_job_in(
        &self,
        held: Option<&WaitSlot>,
        caller: &Caller,
        id: &JobId,
        timeout: Duration,
    ) -> Result<Job> {
        let mut changes = self.notifier().subscribe_jobs();
        let job = self.get_job(caller, id).await?;
        // As for an action: a wait of no time answers at once and is never refused for the open waits.
        if job.state.is_terminal() || timeout.is_zero() {
            return Ok(job);
        }
        let _own = if held.is_none() { Some(self.open_wait(caller)?) } else { None };
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
        loop {
            let next = tokio::select! {
                () = self.shutdown().cancelled() => None,
                next = tokio::time::timeout_at(deadline, changes.recv()) => next.ok(),
            };
            match next {
                None | Some(Err(RecvError::Closed)) => return self.get_job(caller, id).await,
                Some(Ok(change)) if !change.concerns(id) => continue,
                Some(Ok(_)) | Some(Err(RecvError::Lagged(_))) => {
                    let job = self.get_job(caller, id).await?;
                    if job.state.is_terminal() {
                        return Ok(job);
                    }
                }
            }
        }
    }

    /// Cancels a queued job: an admin any job of the org, an agent (or its session) the executions of its own
    /// actions, the jobs it may see. A webhook delivery waiting for its next attempt is queued too. A queued
    /// execution fails its action, audited; an execution already running cannot be called back (409).
    pub async fn cancel_job(&self, caller: &Caller, id: &JobId) -> Result<Job> {
        let who = match caller.agent() {
            Some(agent) => agent.name.clone(),
            None => caller.require_admin()?.name.clone(),
        };
        let org = caller.org_id().clone();
        let now = self.now();
        let mut work = self.write().await?;
        let mut job = work.tx.get_job(&org, id).await?.ok_or_else(|| Error::not_found("job", id.as_str()))?;
        if let Some(agent) = caller.agent() {
            let action_id = job.subject.as_deref().and_then(countersign_core::ids::ActionId::parse);
            let own = match action_id {
                Some(action_id) if job.kind == JobKind::ActionExecute => {
                    work.tx.get_action(&org, &action_id).await?.is_some_and(|action| action.agent_id == agent.id)
                }
                _ => false,
            };
            if !own {
                return Err(Error::not_found("job", id.as_str()));
            }
        }
        if job.state == JobState::Running && job.kind == JobKind::ActionExecute {
            return Err(Error::Conflict {
                message: format!("job {id} is sending its request now; an execution in flight cannot be called back"),
                state: Some(job.state.as_str().to_owned()),
            });
        }
        // A queued execution whose action is already `executing` is the recovery job of a model or tool call
        // in flight on a live connection (the only thing that settles that call if the process dies), or,
        // for an `http` target, a resend to a `retry_safe` upstream after an unknown outcome, which may be
        // cancelled (below).
        if job.kind == JobKind::ActionExecute
            && job.state == JobState::Queued
            && let Some(action_id) = job.subject.as_deref().and_then(countersign_core::ids::ActionId::parse)
            && let Some(action) = work.tx.get_action(&org, &action_id).await?
            && action.state == ActionState::Executing
            && !matches!(action.target, Some(countersign_core::domain::Target::Http(_)))
        {
            return Err(Error::Conflict {
                message: format!(
                    "job {id} guards action {action_id}, a model call in flight; it ends with that call and cannot \
                     be cancelled"
                ),
                state: Some(job.state.as_str().to_owned()),
            });
        }
        job.state = job.state.transition(JobState::Cancelled)?;
        job.error = Some(format!("cancelled by {who}"));
        job.finished_at = Some(now);
        job.lease_owner = None;
        job.lease_until = None;
        work.tx.update_job(&job).await?;
        // Every row lock before the first audit append (which locks the org's chain head).
        if job.kind == JobKind::ActionExecute
            && let Some(action_id) = job.subject.as_deref().and_then(countersign_core::ids::ActionId::parse)
            && let Some(mut action) = work.tx.get_action(&org, &action_id).await?
            && matches!(action.state, ActionState::Approved | ActionState::Executing)
        {
            let error = match action.state {
                ActionState::Approved => format!("execution cancelled by {who} before it was sent"),
                _ => format!("outcome unknown: the request went out with no answer, and {who} cancelled its resend"),
            };
            let data = json!({"reason": "execution_cancelled", "job_id": job.id});
            fail_action(&mut work, &mut action, now, &caller.actor(), error, data).await?;
        }
        work.audit(
            &org,
            now,
            &caller.actor(),
            "job.cancelled",
            Some(job.id.as_str()),
            json!({"kind": job.kind, "subject": job.subject}),
        )
        .await?;
        work.job_changed(&job);
        work.commit(self).await?;
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_its_band() {
        let base = Duration::from_millis(100);
        for attempt in 1..=6u32 {
            let full = base * (1 << (attempt - 1));
            for _ in 0..50 {
                let delay = backoff(base, attempt);
                assert!(delay >= full / 2 && delay <= full, "attempt {attempt}: {delay:?}");
            }
        }
        assert!(backoff(Duration::from_secs(10), 40) <= Duration::from_secs(3600));
    }
}
