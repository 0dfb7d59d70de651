//! Carrying out approved actions exactly once, honestly.
//!
//! An approved action with a target gets an `action.execute` job in the transaction that approves it. The
//! job claims the execution (`approved` → `executing`, audited) in its own transaction before anything is
//! sent, and records the outcome in another. A process that dies between the two leaves the action
//! `executing` and the job's lease runs out; the next attempt sends again only when the upstream is marked
//! `retry_safe`, and otherwise ends the action `failed` with `outcome unknown`. Before sending, the stored request is checked against the
//! hash its approval bound; a mismatch fails the action and nothing is sent.

use countersign_core::audit::{Actor, canonical_hash};
use countersign_core::domain::{Action, Job, JobKind, Target};
use countersign_core::ids::{ActionId, OrgId};
use countersign_core::state::{ActionState, JobState};
use countersign_core::store::JobEnd;
use serde_json::json;

use super::jobs::JobOutcome;
use super::{Gateway, Work};
use crate::connectors::{ConnectorError, Service};
use crate::error::{Error, Result};

/// How long recording an execution's outcome keeps retrying a busy store (100 ms doubling, about 25 s).
const RECORD_RETRY_LIMIT: std::time::Duration = std::time::Duration::from_secs(13);

/// Attempts of an execution job: a busy store before the request is sent is worth retrying.
const EXECUTION_ATTEMPTS: u32 = 5;

pub(super) enum Claim {
    /// Send the request now.
    Send(Box<Action>),
    /// Nothing to do (already executed, or settled by the binding check).
    Done,
}

/// Adds the execution job of an action that was just approved and has a target, in the same transaction.
/// Call before the action is written, so it carries its job id. A model request whose client holds its
/// connection open waits the grace period first, so that the live connection claims it (and can stream it);
/// the job carries it out only if that client went away.
pub(super) async fn enqueue_execution(
    gateway: &Gateway,
    work: &mut Work,
    action: &mut Action,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<()> {
    if action.state != ActionState::Approved || action.target.is_none() {
        return Ok(());
    }
    let mut job = execution_job(action, now);
    if let Some(Target::Llm(llm)) = &action.target
        && llm.held
    {
        job.run_at = now + chrono::Duration::from_std(gateway.job_settings().llm_hold_grace).unwrap_or_default();
    }
    action.job_id = Some(job.id.clone());
    work.enqueue(&job).await
}

/// A new, queued `action.execute` job for an action, due now.
pub(super) fn execution_job(action: &Action, now: chrono::DateTime<chrono::Utc>) -> Job {
    let job = Job::new(
        action.org_id.clone(),
        JobKind::ActionExecute,
        Some(action.id.to_string()),
        json!({"action_id": action.id}),
        now,
    );
    Job { max_attempts: EXECUTION_ATTEMPTS, ..job }
}

impl Gateway {
    /// The `action.execute` job: runs one approved action to its end. A first attempt sends; a later attempt
    /// (the runner died holding it) finds the action `executing` with no recorded outcome and re-sends only
    /// when the upstream is `retry_safe`, else ends it `failed` with `outcome unknown`.
    pub(super) async fn execute_job(&self, job: &Job) -> JobOutcome {
        match self.execute_job_inner(job).await {
            Ok(outcome) => outcome,
            Err(Error::Unavailable(e)) => JobOutcome::Retry(format!("store unavailable: {e}")),
            Err(e) => JobOutcome::Failed(e.to_string()),
        }
    }

    async fn execute_job_inner(&self, job: &Job) -> Result<JobOutcome> {
        let Some(id) = job.subject.as_deref().and_then(ActionId::parse) else {
            return Ok(JobOutcome::Failed("the job names no action".into()));
        };
        let org = &job.org_id;
        let action =
            self.read().await?.get_action(org, &id).await?.ok_or_else(|| Error::not_found("action", id.as_str()))?;
        let claim = match action.state {
            ActionState::Approved => self.claim(org, &id, false, false).await?,
            ActionState::Executing => {
                let retry_safe = match &action.target {
                    Some(Target::Http(http)) => self.inner.connectors.is_retry_safe(&http.upstream),
                    // A model call is never resent blind: it costs, and its answer may differ. Nor is a tool
                    // call: nothing says an upstream MCP tool is idempotent.
                    Some(Target::Llm(_) | Target::Mcp(_)) | None => false,
                };
                if retry_safe {
                    self.claim(org, &id, true, false).await?
                } else {
                    let (error, details, outcome) = match &action.target {
                        Some(Target::Llm(llm)) => (
                            "outcome unknown: the gateway stopped while the model call was in flight and before \
                             recording the answer; a model call is never sent twice",
                            json!({"reason": "outcome_unknown", "provider": llm.provider}),
                            "outcome unknown; a model call is not retried",
                        ),
                        Some(Target::Mcp(mcp)) => (
                            "outcome unknown: the gateway stopped while the tool call was in flight and before \
                             recording the answer; a tool call is never sent twice",
                            json!({"reason": "outcome_unknown", "server": mcp.server, "tool": mcp.tool}),
                            "outcome unknown; a tool call is not retried",
                        ),
                        _ => (
                            "outcome unknown: the gateway stopped after sending the request and before recording \
                             the answer, and the upstream is not marked retry_safe",
                            json!({"reason": "outcome_unknown"}),
                            "outcome unknown; not retried (upstream not retry_safe)",
                        ),
                    };
                    let failed =
                        Outcome { state: ActionState::Failed, result: None, error: Some(error.into()), details };
                    self.finish(&action, &failed, false).await?;
                    return Ok(JobOutcome::Failed(outcome.into()));
                }
            }
            _ => Claim::Done,
        };
        if let Claim::Send(action) = claim
            && let Some(again) = self.send_and_record(*action).await?
        {
            return Ok(JobOutcome::Retry(again));
        }
        let after =
            self.read().await?.get_action(org, &id).await?.ok_or_else(|| Error::not_found("action", id.as_str()))?;
        let status = after.result.as_ref().and_then(|r| r.get("status")).cloned();
        Ok(match after.state {
            ActionState::Succeeded => {
                JobOutcome::Succeeded(json!({"action_id": id, "state": after.state, "status": status}))
            }
            _ => JobOutcome::Failed(after.error.unwrap_or_else(|| format!("action ended {}", after.state.as_str()))),
        })
    }

    /// `approved` → `executing`, audited, after the binding check. `inline`: the live connection of the LLM
    /// proxy claims it, and in the same transaction its execution job (the grace-period job of a held
    /// request, or a new one) becomes the recovery job: queued, lease-free, due only once the provider's
    /// timeout and the recovery margin have passed. The finish transaction settles it; it runs only if the
    /// process carrying the call died, and then ends the action `failed` with `outcome unknown` (a model
    /// call is never sent twice). A job the runner already took keeps the action, and this claim answers
    /// `Done`.
    pub(super) async fn claim(&self, org: &OrgId, id: &ActionId, retry: bool, inline: bool) -> Result<Claim> {
        // The hash the approval bound never changes: read it before locking the action, so this
        // transaction never holds the action's row while waiting for the approval's (decide locks the
        // approval first, then the action).
        let (bound, job_id, read) = {
            let mut tx = self.read().await?;
            let action = tx.get_action(org, id).await?;
            let job_id = action.as_ref().and_then(|a| a.job_id.clone());
            let bound = match action.as_ref().and_then(|a| a.approval_id.clone()) {
                Some(approval_id) => Some(tx.get_approval(org, &approval_id).await?.map(|a| a.request_hash)),
                None => None,
            };
            (bound, job_id, action)
        };
        // The configuration may have changed since the submission: the service must still take this org's
        // action. Checked before the write transaction (it may read the org's name); the target it reads
        // is frozen, so the answer holds for the action the transaction finds.
        let out_of_scope = match &read {
            Some(action) => self.out_of_scope(org, action).await?,
            None => None,
        };
        let now = self.now();
        let mut work = self.write().await?;
        // Said before the first statement, as the claim's commit will (see `submit_with`).
        work.defer_sync(inline && read.as_ref().is_some_and(super::llm::defers_claim_sync));
        // The job before the action, in the same order as cancelling a job does.
        let waiting_job = match (&job_id, inline) {
            (Some(job_id), true) => match work.tx.get_job(org, job_id).await? {
                Some(job) if job.state == JobState::Running => return Ok(Claim::Done),
                job => job.filter(|j| j.state == JobState::Queued),
            },
            _ => None,
        };
        let Some(mut action) = work.tx.get_action(org, id).await? else {
            return Err(Error::not_found("action", id.as_str()));
        };
        let expected = if retry { ActionState::Executing } else { ActionState::Approved };
        if action.state != expected || action.target.is_none() {
            return Ok(Claim::Done);
        }
        // The binding: the stored request must still be the one that was approved.
        let current_hash = match &action.target {
            Some(target) => canonical_hash(&serde_json::to_value(target).map_err(|e| Error::Internal(e.to_string()))?),
            None => String::new(),
        };
        let approved_hash = match (&action.approval_id, bound) {
            (Some(_), Some(bound)) => bound,
            (Some(_), None) => None,
            (None, _) => Some(action.request_hash.clone()),
        };
        let refusal = if approved_hash.as_deref() != Some(current_hash.as_str()) || action.request_hash != current_hash
        {
            Some((
                "the stored request no longer matches the hash its approval bound; not sent".to_owned(),
                json!({"reason": "request_hash_mismatch", "expected": approved_hash, "found": current_hash}),
            ))
        } else {
            out_of_scope
        };
        if let Some((error, data)) = refusal {
            super::jobs::fail_action(&mut work, &mut action, now, &Actor::system(), error, data).await?;
            work.defer_sync(false);
            work.commit(self).await?;
            return Ok(Claim::Done);
        }
        action.state = action.state.transition(ActionState::Executing)?;
        action.started_at = Some(now);
        let mut data = json!({"retry": retry});
        if inline {
            let due = now + self.inline_recovery_delay(&action);
            let job = match waiting_job {
                Some(mut job) => {
                    job.run_at = due;
                    work.tx.update_job(&job).await?;
                    job
                }
                None => {
                    let job = Job { run_at: due, ..execution_job(&action, now) };
                    // Not due for a while: the runner finds it on its own, no need to wake it now.
                    work.tx.insert_job(&job).await?;
                    action.job_id = Some(job.id.clone());
                    job
                }
            };
            work.job_changed(&job);
            data["inline"] = json!(true);
            data["recovery_job_id"] = json!(job.id);
            data["recovery_due"] = json!(due);
        }
        work.tx.update_action(&action).await?;
        work.audit(org, now, &Actor::system(), "action.executing", Some(id.as_str()), data).await?;
        work.action_changed(org, id);
        work.defer_sync(inline && super::llm::defers_claim_sync(&action));
        work.commit(self).await?;
        Ok(Claim::Send(Box::new(action)))
    }

    /// Sends and records the outcome. `Some(why)`: nothing was recorded and the job should run again — an
    /// `http` send whose outcome is unknown, to an upstream marked `retry_safe` (the action stays
    /// `executing`, and the next attempt resends it, as after a crash).
    async fn send_and_record(&self, action: Action) -> Result<Option<String>> {
        let started = std::time::Instant::now();
        let (state, result, error, details) = match &action.target {
            Some(Target::Http(http)) => match self.inner.connectors.send_http(http, action.id.as_str()).await {
                Ok(answer) if (200..300).contains(&answer.status) => {
                    (ActionState::Succeeded, Some(answer.result), None, json!({}))
                }
                Ok(answer) => {
                    let error = format!("upstream answered {}", answer.status);
                    (ActionState::Failed, Some(answer.result), Some(error), json!({}))
                }
                Err(e @ ConnectorError::OutcomeUnknown(_)) if self.inner.connectors.is_retry_safe(&http.upstream) => {
                    tracing::warn!(action = %action.id, error = %e, "outcome unknown; resending to a retry_safe upstream");
                    // The trail says that a request which may have taken effect went out before the resend.
                    let mut work = self.write().await?;
                    work.audit(
                        &action.org_id,
                        self.now(),
                        &Actor::system(),
                        "action.outcome_unknown",
                        Some(action.id.as_str()),
                        json!({"error": e.to_string(), "reason": "outcome_unknown", "resend": true,
                               "upstream": http.upstream}),
                    )
                    .await?;
                    work.commit(self).await?;
                    return Ok(Some(format!("{e}; the upstream is retry_safe, so it is sent again")));
                }
                Err(e @ ConnectorError::OutcomeUnknown(_)) => {
                    (ActionState::Failed, None, Some(e.to_string()), json!({"reason": "outcome_unknown"}))
                }
                Err(e) => (ActionState::Failed, None, Some(e.to_string()), json!({})),
            },
            Some(Target::Llm(llm)) => match self.inner.connectors.execute_llm(llm, action.id.as_str()).await {
                Ok(answer) => {
                    let mut details = answer.details;
                    details["latency_ms"] = json!(started.elapsed().as_millis());
                    details["provider"] = json!(llm.provider);
                    let state = if answer.succeeded { ActionState::Succeeded } else { ActionState::Failed };
                    (state, Some(answer.result), answer.error, details)
                }
                Err(e) => (
                    ActionState::Failed,
                    None,
                    Some(e.to_string()),
                    json!({"provider": llm.provider, "latency_ms": started.elapsed().as_millis()}),
                ),
            },
            Some(Target::Mcp(_)) => {
                let outcome = self.send_mcp(&action).await;
                (outcome.state, outcome.result, outcome.error, outcome.details)
            }
            None => return Ok(None),
        };
        self.record(&action, state, result, error, details, false).await.map(|()| None)
    }

    /// Records an execution's outcome. The request went out: its outcome is known only here, so a busy store
    /// must not lose it. `claimed`: this process claimed the action inline (the LLM proxy's or the MCP
    /// gateway's live connection) and `action` is as its claim left it (see [`Gateway::finish`]).
    pub(super) async fn record(
        &self,
        action: &Action,
        state: ActionState,
        result: Option<serde_json::Value>,
        error: Option<String>,
        details: serde_json::Value,
        claimed: bool,
    ) -> Result<()> {
        let outcome = Outcome { state, result, error, details };
        let mut delay = std::time::Duration::from_millis(100);
        loop {
            match self.finish(action, &outcome, claimed).await {
                Err(Error::Unavailable(e)) if delay <= RECORD_RETRY_LIMIT => {
                    tracing::warn!(action = %action.id, error = %e, "store busy recording an outcome; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                other => return other,
            }
        }
    }

    /// Ends the action with the outcome, audited, and settles its recovery job if that is still queued (an
    /// inline execution's: carried out on the live connection, its one attempt, with the action's outcome; a
    /// job the runner holds is the runner's to settle).
    ///
    /// `claimed`: the claim left the action `executing` and its recovery job queued, and nothing but this
    /// finish changes either unless the call outlived the job's deadline (then the job ran, or is running),
    /// so they are written as the claim left them, without reading them first: one round trip fewer on the
    /// way to the answer. Each write checks that its row is still as the claim left it; if one is not, that
    /// transaction rolls back and the outcome is recorded from what the store holds, as for an execution
    /// the runner carried out.
    async fn finish(&self, action: &Action, outcome: &Outcome, claimed: bool) -> Result<()> {
        if claimed && action.state == ActionState::Executing {
            match self.finish_from(action, outcome, true).await {
                Err(Error::Stale(why)) => {
                    tracing::info!(action = %action.id, why, "an inline execution's rows changed while it ran; \
                                   recording its outcome from what the store holds");
                }
                other => return other,
            }
        }
        self.finish_from(action, outcome, false).await
    }

    /// [`Gateway::finish`] with the action and its queued recovery job as the claim left them (`known`), or
    /// as the store holds them.
    async fn finish_from(&self, action: &Action, outcome: &Outcome, known: bool) -> Result<()> {
        let Outcome { state, result, error, details } = outcome;
        let state = *state;
        let now = self.now();
        let mut work = self.write().await?;
        // The job before the action (the order cancelling a job takes), in reads and in writes.
        let (recovery, mut current) = if known {
            (action.job_id.clone(), action.clone())
        } else {
            let (job, current) = work.tx.get_job_and_action(&action.org_id, action.job_id.as_ref(), &action.id).await?;
            let recovery = job.filter(|j| j.state == JobState::Queued).map(|j| j.id);
            (recovery, current.ok_or_else(|| Error::not_found("action", action.id.as_str()))?)
        };
        let from = current.state;
        current.state = current.state.transition(state)?;
        current.result = result.clone();
        current.error = error.clone();
        current.finished_at = Some(now);
        let status = current.result.as_ref().and_then(|r| r.get("status")).cloned();
        let settled = match recovery {
            Some(id) => {
                let end = if state == ActionState::Succeeded { JobState::Succeeded } else { JobState::Failed };
                let end = JobState::Queued.transition(JobState::Running)?.transition(end)?;
                work.tx
                    .end_queued_job(&JobEnd {
                        org_id: action.org_id.clone(),
                        id: id.clone(),
                        state: end,
                        started_at: current.started_at,
                        finished_at: now,
                        result: Some(json!({"action_id": current.id, "state": current.state, "status": status,
                                            "inline": true})),
                        error: error.clone(),
                    })
                    .await?;
                work.job_id_changed(&action.org_id, &id);
                Some(end)
            }
            None => None,
        };
        work.tx.end_action(&current, from).await?;
        let event = if state == ActionState::Succeeded { "action.executed" } else { "action.failed" };
        let mut data = json!({"status": status, "error": error});
        if let (Some(data), serde_json::Value::Object(details)) = (data.as_object_mut(), details) {
            for (key, value) in details {
                data.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        work.audit(&action.org_id, now, &Actor::system(), event, Some(action.id.as_str()), data).await?;
        work.emit("action.finished", super::webhooks::action_data(&current));
        work.action_changed(&action.org_id, &action.id);
        work.commit(self).await?;
        if let Some(end) = settled {
            self.metrics().job_finished(JobKind::ActionExecute.as_str(), end.as_str());
        }
        Ok(())
    }
}

/// How an execution ended, as [`Gateway::record`] writes it.
struct Outcome {
    state: ActionState,
    result: Option<serde_json::Value>,
    error: Option<String>,
    details: serde_json::Value,
}

impl Gateway {
    /// Why the configuration no longer lets this action go out (its service not open to the org, or its
    /// upstream not taking its capability): the error and the audit data; `None` when it may.
    async fn out_of_scope(&self, org: &OrgId, action: &Action) -> Result<Option<(String, serde_json::Value)>> {
        let Some(service) = action.target.as_ref().and_then(service_of) else { return Ok(None) };
        if !self.serves(org, service).await? {
            return Ok(Some((
                format!(
                    "{} is not open to this org (its `orgs` in the server configuration); not sent",
                    service.section()
                ),
                json!({"reason": "service_not_open_to_org", "service": service.section()}),
            )));
        }
        if let Service::Upstream(upstream) = service
            && !self
                .inner
                .connectors
                .upstream_capabilities(upstream)
                .is_some_and(|s| s.admits(action.capability.as_str()))
        {
            return Ok(Some((
                format!(
                    "[upstreams.{upstream}] no longer takes capability `{}` (its `capabilities`); not sent",
                    action.capability
                ),
                json!({"reason": "capability_not_taken_by_upstream", "upstream": upstream}),
            )));
        }
        Ok(None)
    }
}

/// The configured service a target goes through.
fn service_of(target: &Target) -> Option<Service<'_>> {
    match target {
        Target::Http(http) => Some(Service::Upstream(&http.upstream)),
        Target::Llm(llm) => Some(Service::Llm(&llm.provider)),
        Target::Mcp(mcp) => Some(Service::Mcp(&mcp.server)),
    }
}
