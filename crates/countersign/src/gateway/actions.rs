//! Submitting, cancelling and waiting on actions.
//!
//! Submission evaluates the policy once and writes the action, its verdict, its approval (when one is
//! needed) and their audit events in one transaction. An evaluation that cannot be made denies; nothing
//! here turns "could not decide" into "allow".

use std::sync::PoisonError;
use std::time::Duration;

use countersign_core::audit::canonical_hash;
use countersign_core::capability::Capability;
use countersign_core::domain::{Action, Approval, Target};
use countersign_core::ids::{ActionId, AgentId, ApprovalId, OrgId};
use countersign_core::policy::{Effect, EvalInput, Facts, Verdict};
use countersign_core::risk::{PRECEDENT_CAP, RiskAssessment};
use countersign_core::secrets::{self, SecretKind};
use countersign_core::state::{ActionState, ApprovalStatus};
use countersign_core::store::StoreError;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{Caller, Gateway, WaitSlot};
use crate::connectors::Service;
use crate::error::{Error, Result};

/// A validated submission.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    pub capability: Capability,
    pub params: Value,
    /// Raw JSON text, kept verbatim.
    pub reasoning: String,
    pub target: Option<Target>,
    pub idempotency_key: Option<String>,
}

/// What a submission produced.
#[derive(Debug)]
pub struct SubmitOutcome {
    pub action: Action,
    pub approval: Option<Approval>,
    /// The one-time approval poll token, present only in the response that created it.
    pub token: Option<String>,
    /// True when the idempotency key matched an earlier submission, which is returned as it is now.
    pub replayed: bool,
    /// An inline submission the policy allowed is claimed for the caller in the same transaction: the
    /// action is `executing`, its recovery job written, and the caller sends it now (and records how it
    /// ended with [`Gateway::finish_inline`] or [`Gateway::record`]).
    pub claimed: bool,
    /// A model call held for approval whose client holds its connection open (`LlmTarget::held`) holds one of
    /// the agent's open waits from before it was recorded, taken once the verdict was known: past the limit
    /// the submission failed (429) with nothing recorded.
    pub slot: Option<WaitSlot>,
}

/// Longest a caller may hold a wait open.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// A wait a caller asked for, in seconds (a query parameter, a header, an MCP argument): 0 or more, capped
/// at [`MAX_WAIT`]; anything else is a 400 naming `field`.
pub fn wait_seconds(field: &str, seconds: f64) -> Result<Duration> {
    if seconds.is_finite() && seconds >= 0.0 {
        // Capped before converting: a huge finite number would not fit a Duration.
        Ok(Duration::from_secs_f64(seconds.min(MAX_WAIT.as_secs_f64())))
    } else {
        Err(Error::bad_request(field, "must be a number of seconds, 0 or more"))
    }
}

fn no_policy_verdict() -> Verdict {
    Verdict {
        effect: Effect::Deny,
        rule: "no_policy".into(),
        policy_version: String::new(),
        axes: Vec::new(),
        message: Some("no policy is loaded for this org; failing closed".into()),
        approval: None,
        snapshot: None,
        risk: RiskAssessment { score: 1.0, reversible: false, external: true, prior_successes: 0, factors: Vec::new() },
        explanation: "no policy is loaded for this org, so every action is denied".into(),
    }
}

/// How many capped pairs are remembered at most; past it, submissions count again.
const PRECEDENT_CAPPED_MAX: usize = 100_000;

impl Gateway {
    /// The agent's earlier successes on the capability, up to [`PRECEDENT_CAP`]. A count at the cap stays
    /// there: it counts `succeeded` actions, which are terminal, and approved record-only ones, which no move
    /// leaves (only an action with a target is claimed or failed), and actions are never deleted. So a pair at
    /// the cap is remembered and not counted again, on every replica alike.
    pub(super) async fn prior_successes(
        &self,
        tx: &mut dyn countersign_core::store::StoreTx,
        org: &OrgId,
        agent: &AgentId,
        capability: &Capability,
    ) -> Result<u64> {
        let capped = &self.inner.precedent_capped;
        let key = (org.clone(), agent.clone(), capability.clone());
        if capped.lock().unwrap_or_else(PoisonError::into_inner).contains(&key) {
            return Ok(PRECEDENT_CAP);
        }
        let count = tx.count_successes(org, agent, capability.as_str()).await?;
        if count >= PRECEDENT_CAP {
            let mut capped = capped.lock().unwrap_or_else(PoisonError::into_inner);
            if capped.len() < PRECEDENT_CAPPED_MAX {
                capped.insert(key);
            }
        }
        Ok(count)
    }

    /// Submits an action; an approved one with a target gets its execution job in the same transaction.
    pub async fn submit(&self, caller: &Caller, request: SubmitRequest) -> Result<SubmitOutcome> {
        if let Some(Target::Llm(_)) = &request.target {
            return Err(Error::invalid(
                "target.connector",
                "`llm` targets are made by the LLM proxy (/llm/{provider}/v1/…), not submitted directly",
            ));
        }
        if let Some(Target::Mcp(_)) = &request.target {
            return Err(Error::invalid(
                "target.connector",
                "`mcp` targets are made by the MCP gateway (call the upstream's tool NAME__tool on /mcp), not \
                 submitted directly",
            ));
        }
        self.submit_with(caller, request, false).await
    }

    /// Submits a model request of the LLM proxy or a tool call of the MCP gateway. Allowed at once, it is
    /// claimed for the caller in the same transaction (`executing`, `claimed: true`, with its recovery job):
    /// the caller's live connection carries it out and records the outcome ([`Gateway::finish_inline`]), so
    /// the audit trail is the same as the job's, and the call costs one write before it is sent. Held for
    /// approval, the approval enqueues the job as usual (after a grace period when the client holds its
    /// connection open), and the connection claims it with [`Gateway::claim_inline`] if it is still there.
    pub async fn submit_inline(&self, caller: &Caller, request: SubmitRequest) -> Result<SubmitOutcome> {
        if !matches!(request.target, Some(Target::Llm(_) | Target::Mcp(_))) {
            return Err(Error::invalid("target", "an inline submission carries an `llm` or `mcp` target"));
        }
        self.submit_with(caller, request, true).await
    }

    async fn submit_with(&self, caller: &Caller, request: SubmitRequest, inline: bool) -> Result<SubmitOutcome> {
        let org = caller.org_id().clone();
        let agent = caller
            .agent()
            .cloned()
            .ok_or_else(|| Error::Forbidden("only agents and sessions submit actions; use an agent key".into()))?;
        let actor = caller.actor();
        let now = self.now();

        if let Caller::Session { session, .. } = caller
            && !session.allows(&request.capability)
        {
            let scopes: Vec<&str> = session.scopes.iter().map(|s| s.as_str()).collect();
            let mut work = self.write().await?;
            work.audit(
                &org,
                now,
                &actor,
                "action.refused",
                Some(session.id.as_str()),
                json!({"capability": request.capability, "reason": "outside session scopes", "scopes": scopes}),
            )
            .await?;
            work.commit(self).await?;
            return Err(Error::Forbidden(format!(
                "capability `{}` is outside this session's scopes ({})",
                request.capability,
                scopes.join(", ")
            )));
        }
        if let Some(Target::Http(http)) = &request.target {
            http.validate().map_err(|m| Error::invalid("target", m))?;
            // One answer for an upstream that does not exist and one this org may not use: neither is there
            // for it (an org learns nothing of what others are configured with).
            if !self.serves(&org, Service::Upstream(&http.upstream)).await? {
                return Err(Error::invalid(
                    "target.upstream",
                    format!(
                        "unknown upstream `{}`: it must be named under [upstreams] in the server configuration, \
                         with this org among its `orgs` if it lists any",
                        http.upstream
                    ),
                ));
            }
            if let Some(scope) = self.inner.connectors.upstream_capabilities(&http.upstream)
                && !scope.admits(request.capability.as_str())
            {
                return Err(Error::invalid(
                    "target.upstream",
                    format!(
                        "upstream `{}` takes only actions of capability {} (its `capabilities` in the server \
                         configuration), not `{}`",
                        http.upstream,
                        scope.describe(),
                        request.capability
                    ),
                ));
            }
            if let Some(name) = self.inner.connectors.configured_header_in(http) {
                return Err(Error::invalid(
                    "target.headers",
                    format!(
                        "target.headers may not set `{name}`: the upstream `{}` sets it in the server configuration",
                        http.upstream
                    ),
                ));
            }
        }
        if let Some(Target::Llm(llm)) = &request.target {
            llm.validate().map_err(|m| Error::invalid("target", m))?;
            if !self.serves(&org, Service::Llm(&llm.provider)).await? {
                return Err(Error::invalid(
                    "target.provider",
                    format!(
                        "unknown model provider `{}`: it must be named under [llm] in the configuration, with \
                         this org among its `orgs` if it lists any",
                        llm.provider
                    ),
                ));
            }
        }

        if let Some(Target::Mcp(mcp)) = &request.target {
            mcp.validate().map_err(|m| Error::invalid("target", m))?;
            if !self.serves(&org, Service::Mcp(&mcp.server)).await? {
                return Err(Error::invalid(
                    "target.server",
                    format!(
                        "unknown MCP server `{}`: it must be named under [mcp_servers] in the configuration, with \
                         this org among its `orgs` if it lists any",
                        mcp.server
                    ),
                ));
            }
        }

        let request_hash = match &request.target {
            Some(target) => canonical_hash(&serde_json::to_value(target).map_err(|e| Error::Internal(e.to_string()))?),
            None => String::new(),
        };

        let mut work = self.write().await?;
        // Times are read once the turn is ours, so a wait for the writer does not shorten the approval window.
        let now = self.now();
        // A model call's claim defers its sync. Said before the first statement, so SQLite does not begin the
        // transaction to sync its commit; taken back below if the call is not claimed.
        work.defer_sync(inline && matches!(request.target, Some(Target::Llm(_))));
        if let Some(key) = &request.idempotency_key
            && let Some(existing) = work.tx.find_action_by_idempotency_key(&org, &agent.id, key).await?
        {
            drop(work);
            return self.idempotent_replay(existing, &request, &request_hash).await;
        }

        let prior_successes = self.prior_successes(&mut *work.tx, &org, &agent.id, &request.capability).await?;
        let started = std::time::Instant::now();
        let verdict = match self.policies().for_org(&org) {
            Some(active) => active.policy.evaluate(&EvalInput {
                agent: &agent.name,
                capability: &request.capability,
                params: &request.params,
                facts: &Facts { prior_successes },
            }),
            None => no_policy_verdict(),
        };
        self.metrics().observe_policy_evaluation(started.elapsed());

        let mut action = Action {
            id: ActionId::new(),
            org_id: org.clone(),
            agent_id: agent.id.clone(),
            agent_name: agent.name.clone(),
            session_id: match caller {
                Caller::Session { session, .. } => Some(session.id.clone()),
                _ => None,
            },
            capability: request.capability.clone(),
            params: request.params.clone(),
            reasoning: request.reasoning.clone(),
            target: request.target.clone(),
            idempotency_key: request.idempotency_key.clone(),
            state: ActionState::Submitted,
            verdict: Some(verdict.clone()),
            approval_id: None,
            result: None,
            error: None,
            request_hash: request_hash.clone(),
            created_at: now,
            decided_at: None,
            started_at: None,
            finished_at: None,
            job_id: None,
        };
        let subject = action.id.to_string();
        let mut approval = None;
        let mut token = None;
        let approval_route = verdict.approval.clone().filter(|_| verdict.effect == Effect::RequireApproval);
        let next_state = match (verdict.effect, &approval_route) {
            (Effect::Allow, _) => ActionState::Approved,
            (Effect::RequireApproval, Some(_)) => ActionState::PendingApproval,
            // An approval verdict without a route cannot be honoured: deny rather than guess.
            (Effect::RequireApproval, None) | (Effect::Deny, _) => ActionState::Denied,
        };
        action.state = ActionState::Submitted.transition(next_state)?;
        let slot = match &action.target {
            Some(Target::Llm(llm)) if llm.held && next_state == ActionState::PendingApproval => {
                Some(self.open_wait(caller)?)
            }
            _ => None,
        };
        if next_state != ActionState::PendingApproval {
            action.decided_at = Some(now);
        }
        if let (ActionState::PendingApproval, Some(route)) = (next_state, approval_route) {
            let secret = secrets::generate(SecretKind::ApprovalToken);
            // The policy caps timeouts at a year; the checks keep a bad route a clear error, never a panic.
            let expires_at = i64::try_from(route.timeout_seconds)
                .ok()
                .and_then(chrono::Duration::try_seconds)
                .and_then(|timeout| now.checked_add_signed(timeout))
                .ok_or_else(|| {
                    Error::Internal(format!("approval timeout of {} s is out of range", route.timeout_seconds))
                })?;
            let new_approval = Approval {
                id: ApprovalId::new(),
                org_id: org.clone(),
                action_id: action.id.clone(),
                group: route.group.clone(),
                quorum: route.quorum.max(1),
                status: ApprovalStatus::Pending,
                expires_at,
                token_hash: secret.hash,
                policy_version: verdict.policy_version.clone(),
                request_hash: request_hash.clone(),
                rule: verdict.rule.clone(),
                snapshot: verdict.snapshot.clone(),
                risk: verdict.risk.clone(),
                decisions: Vec::new(),
                created_at: now,
                decided_at: None,
            };
            action.approval_id = Some(new_approval.id.clone());
            approval = Some(new_approval);
            token = Some(secret.plaintext);
        }

        if !inline {
            super::execute::enqueue_execution(self, &mut work, &mut action, now).await?;
        }
        // Allowed inline: claimed here for the caller, so the call costs one transaction before it is sent.
        let claim = if inline && action.state == ActionState::Approved {
            let due = now + self.inline_recovery_delay(&action);
            let job = countersign_core::domain::Job { run_at: due, ..super::execute::execution_job(&action, now) };
            action.state = action.state.transition(ActionState::Executing)?;
            action.started_at = Some(now);
            action.job_id = Some(job.id.clone());
            // Written before the action that names it. Not due for a while: the runner finds it on its own.
            work.tx.insert_job(&job).await?;
            work.job_changed(&job);
            Some((job.id, due))
        } else {
            None
        };
        work.tx.insert_action(&action).await.map_err(|e| match e {
            StoreError::Conflict(_) => Error::Conflict {
                message: "an action with this idempotency key was submitted at the same moment; retry to read it"
                    .into(),
                state: None,
            },
            other => other.into(),
        })?;
        work.audit(
            &org,
            now,
            &actor,
            "action.submitted",
            Some(&subject),
            json!({
                "capability": action.capability,
                "agent": {"id": agent.id, "name": agent.name},
                "idempotency_key": action.idempotency_key,
                "request_hash": request_hash,
                "has_target": action.target.is_some(),
            }),
        )
        .await?;
        work.audit(
            &org,
            now,
            &countersign_core::audit::Actor::system(),
            "policy.evaluated",
            Some(&subject),
            json!({
                "effect": verdict.effect,
                "rule": verdict.rule,
                "axes": verdict.axes,
                "policy_version": verdict.policy_version,
                "risk_score": verdict.risk.score,
            }),
        )
        .await?;
        let system = countersign_core::audit::Actor::system();
        match (&approval, action.state) {
            (Some(a), _) => {
                work.tx.insert_approval(a).await?;
                work.audit(
                    &org,
                    now,
                    &system,
                    "approval.requested",
                    Some(a.id.as_str()),
                    json!({"action_id": action.id, "group": a.group, "quorum": a.quorum, "expires_at": a.expires_at, "rule": a.rule}),
                )
                .await?;
                work.emit("approval.requested", super::webhooks::approval_data(self, a, &action));
                work.expiry_armed(a);
            }
            (None, ActionState::Denied) => {
                work.audit(
                    &org,
                    now,
                    &system,
                    "action.denied",
                    Some(&subject),
                    json!({"rule": verdict.rule, "message": verdict.message}),
                )
                .await?;
                work.emit("action.finished", super::webhooks::action_data(&action));
            }
            (None, _) => {
                work.audit(
                    &org,
                    now,
                    &system,
                    "action.approved",
                    Some(&subject),
                    json!({"rule": verdict.rule, "by": "policy"}),
                )
                .await?;
                if action.is_terminal() {
                    work.emit("action.finished", super::webhooks::action_data(&action));
                }
            }
        }
        if let Some((job_id, due)) = &claim {
            work.audit(
                &org,
                now,
                &system,
                "action.executing",
                Some(&subject),
                json!({"retry": false, "inline": true, "recovery_job_id": job_id, "recovery_due": due}),
            )
            .await?;
        }
        work.action_changed(&org, &action.id);
        work.defer_sync(claim.is_some() && super::llm::defers_claim_sync(&action));
        work.commit(self).await?;
        // Counted by the verdict: an allowed inline call claimed at once still counts as approved.
        self.metrics().action_submitted(next_state.as_str());
        Ok(SubmitOutcome { action, approval, token, replayed: false, claimed: claim.is_some(), slot })
    }

    async fn idempotent_replay(
        &self,
        existing: Action,
        request: &SubmitRequest,
        request_hash: &str,
    ) -> Result<SubmitOutcome> {
        if existing.capability != request.capability
            || existing.params != request.params
            || existing.request_hash != request_hash
        {
            return Err(Error::Conflict {
                message: format!("idempotency key was already used by action {} for a different request", existing.id),
                state: Some(existing.state.as_str().to_owned()),
            });
        }
        let approval = match &existing.approval_id {
            Some(id) => self.read().await?.get_approval(&existing.org_id, id).await?,
            None => None,
        };
        Ok(SubmitOutcome { action: existing, approval, token: None, replayed: true, claimed: false, slot: None })
    }

    /// Reads an action the caller may see: agents and sessions only their own agent's.
    pub async fn get_action(&self, caller: &Caller, id: &ActionId) -> Result<Action> {
        let action = self
            .read()
            .await?
            .get_action(caller.org_id(), id)
            .await?
            .ok_or_else(|| Error::not_found("action", id.as_str()))?;
        if let Some(agent) = caller.agent()
            && agent.id != action.agent_id
        {
            return Err(Error::not_found("action", id.as_str()));
        }
        Ok(action)
    }

    /// Waits until the action is terminal or `timeout` passes; answers the action as it is then.
    /// Wakes on the commit that changes it, not on a polling tick.
    pub async fn wait_action(&self, caller: &Caller, id: &ActionId, timeout: Duration) -> Result<Action> {
        self.wait_action_until(caller, id, timeout, Action::is_terminal).await
    }

    /// Waits until `done` holds for the action or `timeout` passes; answers the action as it is then. A wait
    /// that has to wait counts as one of the caller's open waits: 429 when it holds as many as it may.
    pub async fn wait_action_until(
        &self,
        caller: &Caller,
        id: &ActionId,
        timeout: Duration,
        done: impl Fn(&Action) -> bool,
    ) -> Result<Action> {
        self.wait_action_in(None, caller, id, timeout, done).await
    }

    /// [`Gateway::wait_action_until`] for a caller that already holds one of its open waits (`slot`): a held
    /// call takes it before it is recorded, so every wait of its hold is one it may make.
    pub async fn wait_action_holding(
        &self,
        slot: &WaitSlot,
        caller: &Caller,
        id: &ActionId,
        timeout: Duration,
        done: impl Fn(&Action) -> bool,
    ) -> Result<Action> {
        self.wait_action_in(Some(slot), caller, id, timeout, done).await
    }

    async fn wait_action_in(
        &self,
        held: Option<&WaitSlot>,
        caller: &Caller,
        id: &ActionId,
        timeout: Duration,
        done: impl Fn(&Action) -> bool,
    ) -> Result<Action> {
        let mut changes = self.notifier().subscribe_actions();
        let action = self.get_action(caller, id).await?;
        // A wait of no time answers at once and holds nothing open, so it is never refused for the open
        // waits: the CLI's last ask at its deadline relies on that.
        if done(&action) || timeout.is_zero() {
            return Ok(action);
        }
        let _own = if held.is_none() { Some(self.open_wait(caller)?) } else { None };
        let deadline = tokio::time::Instant::now() + timeout.min(MAX_WAIT);
        loop {
            let next = tokio::select! {
                () = self.shutdown().cancelled() => None,
                next = tokio::time::timeout_at(deadline, changes.recv()) => next.ok(),
            };
            match next {
                None => return self.get_action(caller, id).await,
                Some(Ok(change)) if !change.concerns(id) => continue,
                Some(Ok(_)) | Some(Err(RecvError::Lagged(_))) => {
                    let action = self.get_action(caller, id).await?;
                    if done(&action) {
                        return Ok(action);
                    }
                }
                Some(Err(RecvError::Closed)) => return self.get_action(caller, id).await,
            }
        }
    }

    /// Withdraws a pending action: its own agent (or session) or an admin.
    pub async fn cancel_action(&self, caller: &Caller, id: &ActionId) -> Result<Action> {
        let org = caller.org_id().clone();
        // Lock the approval before the action, in the same order as deciding does.
        let approval_id = self.read().await?.get_action(&org, id).await?.and_then(|a| a.approval_id);
        let mut work = self.write().await?;
        let locked_approval = match &approval_id {
            Some(approval_id) => work.tx.get_approval(&org, approval_id).await?,
            None => None,
        };
        let mut action = work.tx.get_action(&org, id).await?.ok_or_else(|| Error::not_found("action", id.as_str()))?;
        let now = self.now();
        match caller {
            Caller::User(_) => {
                caller.require_admin()?;
            }
            _ => {
                if caller.agent().map(|a| &a.id) != Some(&action.agent_id) {
                    return Err(Error::not_found("action", id.as_str()));
                }
            }
        }
        // Past its deadline an approval is expired, whether or not its timer has fired yet: the action ends
        // as the timer would end it, as a decision arriving then finds it.
        if let Some(mut approval) = locked_approval.clone()
            && approval.status == ApprovalStatus::Pending
            && approval.expires_at <= now
        {
            self.expire_in(&mut work, &mut approval, &mut action).await?;
            work.commit(self).await?;
            return Err(Error::Conflict {
                message: format!("action {id} expired at {}; nothing to cancel", approval.expires_at.to_rfc3339()),
                state: Some("expired".into()),
            });
        }
        action.state = action.state.transition(ActionState::Cancelled)?;
        action.decided_at = Some(now);
        action.finished_at = Some(now);
        work.tx.update_action(&action).await?;
        let mut cancelled_approval = None;
        if let Some(mut approval) = locked_approval {
            approval.status = approval.status.transition(ApprovalStatus::Cancelled)?;
            approval.decided_at = Some(now);
            work.tx.update_approval(&approval).await?;
            cancelled_approval = Some(approval.id);
        }
        let data = json!({"approval_id": cancelled_approval});
        work.audit(&org, now, &caller.actor(), "action.cancelled", Some(action.id.as_str()), data).await?;
        // The approval left the queue too: its own trail (`?subject=apr_…`) says so, as for every other end.
        if let Some(approval_id) = &cancelled_approval {
            let data = json!({"action_id": action.id});
            work.audit(&org, now, &caller.actor(), "approval.cancelled", Some(approval_id.as_str()), data).await?;
        }
        work.emit("action.finished", super::webhooks::action_data(&action));
        work.action_changed(&org, &action.id);
        work.commit(self).await?;
        Ok(action)
    }
}
