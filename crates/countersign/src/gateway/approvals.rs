//! Deciding approvals: routing and membership checks, the quorum of distinct approvers, one deny denies,
//! the owner's approval never counting for its own agent, expiry, and the poll-token status view.
//!
//! Each decision, and the transitions it causes, are written with their audit events in one transaction.

use countersign_core::audit::Actor;
use countersign_core::domain::{Action, Approval, DecisionRecord, Role, User};
use countersign_core::ids::{ApprovalId, OrgId};
use countersign_core::secrets::{self, SecretKind};
use countersign_core::state::{ActionState, ApprovalStatus, Decision};
use countersign_core::store::{Listed, Page};
use serde_json::json;

use super::{Caller, Gateway, Work};
use crate::error::{Error, Result};

/// What a poll-token holder may see: the status and nothing else.
#[derive(Debug, Clone)]
pub struct ApprovalStatusView {
    pub status: ApprovalStatus,
    pub decided_at: Option<chrono::DateTime<chrono::Utc>>,
    pub note: Option<String>,
}

impl Gateway {
    /// The queue (pending, oldest first) or the history, each with its action.
    pub async fn list_approvals(
        &self,
        caller: &Caller,
        status: Option<ApprovalStatus>,
        page: &Page,
    ) -> Result<Listed<(Approval, Action)>> {
        caller.require_user()?;
        let mut tx = self.read().await?;
        let approvals = tx.list_approvals(caller.org_id(), status, page).await?;
        let mut out = Vec::with_capacity(approvals.items.len());
        for approval in approvals.items {
            let action = tx
                .get_action(caller.org_id(), &approval.action_id)
                .await?
                .ok_or_else(|| Error::Internal(format!("approval {} has no action", approval.id)))?;
            out.push((approval, action));
        }
        Ok(Listed { items: out, cut: approvals.cut })
    }

    /// One approval and its action.
    pub async fn get_approval(&self, caller: &Caller, id: &ApprovalId) -> Result<(Approval, Action)> {
        caller.require_user()?;
        let mut tx = self.read().await?;
        let approval =
            tx.get_approval(caller.org_id(), id).await?.ok_or_else(|| Error::not_found("approval", id.as_str()))?;
        let action = tx
            .get_action(caller.org_id(), &approval.action_id)
            .await?
            .ok_or_else(|| Error::Internal(format!("approval {id} has no action")))?;
        Ok((approval, action))
    }

    pub async fn decide(
        &self,
        caller: &Caller,
        id: &ApprovalId,
        decision: Decision,
        note: Option<String>,
    ) -> Result<(Approval, Action)> {
        let user = Self::decider(caller)?.clone();
        let org = caller.org_id().clone();
        let mut work = self.write().await?;
        let mut approval =
            work.tx.get_approval(&org, id).await?.ok_or_else(|| Error::not_found("approval", id.as_str()))?;
        let mut action = work
            .tx
            .get_action(&org, &approval.action_id)
            .await?
            .ok_or_else(|| Error::Internal(format!("approval {id} has no action")))?;
        // Read once the approval is ours (the writer's turn on SQLite, its row lock on PostgreSQL): a decision
        // that waited past the deadline must find it expired, as the expiry timer queued behind it would.
        let now = self.now();
        // The decider as stored now, not as authenticated: a user disabled or made a viewer since (while this
        // request was on its way, or within another replica's credential cache) decides nothing, a deny
        // included, as an approval of theirs would no longer count.
        let user = match work.tx.get_user(&org, &user.id).await? {
            Some(stored) if stored.disabled_at.is_none() => stored,
            _ => return Err(Error::Unauthenticated("the user of this key is disabled".into())),
        };
        Self::role_may_decide(&user)?;
        self.check_group(&user, &approval)?;
        if approval.status != ApprovalStatus::Pending {
            return Err(Error::Conflict {
                message: format!("approval {id} is already {}", approval.status.as_str()),
                state: Some(approval.status.as_str().to_owned()),
            });
        }
        if approval.expires_at <= now {
            self.expire_in(&mut work, &mut approval, &mut action).await?;
            work.commit(self).await?;
            return Err(Error::Conflict {
                message: format!("approval {id} expired at {}", approval.expires_at.to_rfc3339()),
                state: Some("expired".into()),
            });
        }
        if approval.decisions.iter().any(|d| d.user_id == user.id) {
            return Err(Error::Conflict {
                message: "you have already decided this approval; quorum needs distinct approvers".into(),
                state: Some(approval.status.as_str().to_owned()),
            });
        }
        let agent = work.tx.get_agent(&org, &action.agent_id).await?;
        let is_owner = agent.and_then(|a| a.owner).is_some_and(|owner| owner == user.id);
        // The owner's approval never counts toward its own agent's quorum; a deny always counts.
        let counted = decision == Decision::Deny || !is_owner;
        let record = DecisionRecord {
            user_id: user.id.clone(),
            user_name: user.name.clone(),
            decision,
            note: note.clone(),
            counted,
            created_at: now,
        };
        work.tx.insert_decision(&org, &approval.id, &record).await?;
        approval.decisions.push(record);
        // Earlier approvals count only while their authors still may decide: a user since disabled, demoted,
        // or removed from the group by a policy change no longer makes up the quorum.
        let approvals = self.standing_approvals(&mut work, &approval).await?;
        let actor = caller.actor();
        work.audit(
            &org,
            now,
            &actor,
            "approval.decision",
            Some(approval.id.as_str()),
            json!({"decision": decision, "note": note, "counted": counted, "action_id": action.id,
                   "approvals": approvals, "quorum": approval.quorum}),
        )
        .await?;

        let outcome = match decision {
            Decision::Deny => Some(ApprovalStatus::Denied),
            Decision::Approve if approvals >= approval.quorum => Some(ApprovalStatus::Approved),
            Decision::Approve => None,
        };
        if let Some(status) = outcome {
            approval.status = approval.status.transition(status)?;
            approval.decided_at = Some(now);
            work.tx.update_approval(&approval).await?;
            let (next, event) = if status == ApprovalStatus::Approved {
                (ActionState::Approved, "approval.approved")
            } else {
                (ActionState::Denied, "approval.denied")
            };
            action.state = action.state.transition(next)?;
            action.decided_at = Some(now);
            if next == ActionState::Denied {
                action.finished_at = Some(now);
            }
            super::execute::enqueue_execution(self, &mut work, &mut action, now).await?;
            work.tx.update_action(&action).await?;
            let deciders: Vec<&str> = approval.decisions.iter().map(|d| d.user_name.as_str()).collect();
            work.audit(
                &org,
                now,
                &actor,
                event,
                Some(approval.id.as_str()),
                json!({"action_id": action.id, "decided_by": deciders, "note": note}),
            )
            .await?;
            work.emit("approval.decided", super::webhooks::approval_data(self, &approval, &action));
            if action.is_terminal() {
                work.emit("action.finished", super::webhooks::action_data(&action));
            }
            work.action_changed(&org, &action.id);
            self.metrics().observe_decision_latency((now - approval.created_at).to_std().unwrap_or_default());
        }
        work.commit(self).await?;
        Ok((approval, action))
    }

    /// A user who may decide approvals at all: not an agent or session, not a viewer.
    fn decider(caller: &Caller) -> Result<&User> {
        let user = match caller {
            Caller::User(user) => user,
            _ => return Err(Error::Forbidden("agents and sessions can never decide approvals".into())),
        };
        Self::role_may_decide(user)?;
        Ok(user)
    }

    fn role_may_decide(user: &User) -> Result<()> {
        if user.role == Role::Viewer {
            return Err(Error::Forbidden(
                "viewers cannot decide approvals; this needs the approver or admin role".into(),
            ));
        }
        Ok(())
    }

    /// The counted approvals whose authors, read again in this transaction, are still enabled users who may
    /// decide this approval (an admin, or a member of its group under the policy in force now).
    async fn standing_approvals(&self, work: &mut Work, approval: &Approval) -> Result<u32> {
        let mut standing = 0u32;
        for decision in approval.decisions.iter().filter(|d| d.decision == Decision::Approve && d.counted) {
            let user = work.tx.get_user(&approval.org_id, &decision.user_id).await?;
            if user.is_some_and(|u| u.disabled_at.is_none() && self.check_group(&u, approval).is_ok()) {
                standing = standing.saturating_add(1);
            }
        }
        Ok(standing)
    }

    /// Only members of the approval's group, or admins, may decide it.
    fn check_group(&self, user: &User, approval: &Approval) -> Result<()> {
        let members = self
            .policies()
            .for_org(&approval.org_id)
            .and_then(|p| p.policy.group_members(&approval.group).map(<[String]>::to_vec));
        let is_member = members.as_ref().is_some_and(|m| m.contains(&user.name));
        if user.role != Role::Admin && !is_member {
            return Err(Error::Forbidden(format!(
                "approval {} is routed to group `{}`, and you are not a member of it",
                approval.id, approval.group
            )));
        }
        Ok(())
    }

    /// Whether `decide` would accept a decision from this caller on this approval as it stands now, and if
    /// not, the reason to show (the same checks `decide` makes, so a front end can disable its buttons).
    pub fn may_decide(&self, caller: &Caller, approval: &Approval) -> std::result::Result<(), String> {
        let user = Self::decider(caller).map_err(|e| e.to_string())?;
        self.check_group(user, approval).map_err(|e| e.to_string())?;
        if approval.status != ApprovalStatus::Pending {
            return Err(format!("this approval is already {}", approval.status.as_str()));
        }
        if approval.expires_at <= self.now() {
            return Err("this approval has expired".into());
        }
        if approval.decisions.iter().any(|d| d.user_id == user.id) {
            return Err("you have already decided this approval; the quorum needs distinct approvers".into());
        }
        Ok(())
    }

    pub(super) async fn expire_in(&self, work: &mut Work, approval: &mut Approval, action: &mut Action) -> Result<()> {
        let now = self.now();
        approval.status = approval.status.transition(ApprovalStatus::Expired)?;
        approval.decided_at = Some(now);
        work.tx.update_approval(approval).await?;
        action.state = action.state.transition(ActionState::Expired)?;
        action.decided_at = Some(now);
        action.finished_at = Some(now);
        work.tx.update_action(action).await?;
        work.audit(
            &approval.org_id,
            now,
            &Actor::system(),
            "approval.expired",
            Some(approval.id.as_str()),
            json!({"action_id": action.id, "expires_at": approval.expires_at}),
        )
        .await?;
        work.emit("approval.expired", super::webhooks::approval_data(self, approval, action));
        work.emit("action.finished", super::webhooks::action_data(action));
        work.action_changed(&approval.org_id, &action.id);
        Ok(())
    }

    /// Called by the expiry timer. Answers whether the approval is settled (expired now or decided before);
    /// `false` means the deadline has not come yet and the timer should be re-armed.
    pub async fn expire_approval(&self, org: &OrgId, id: &ApprovalId) -> Result<bool> {
        let mut work = self.write().await?;
        let Some(mut approval) = work.tx.get_approval(org, id).await? else {
            return Ok(true);
        };
        if approval.status != ApprovalStatus::Pending {
            return Ok(true);
        }
        if approval.expires_at > self.now() {
            return Ok(false);
        }
        let mut action = work
            .tx
            .get_action(org, &approval.action_id)
            .await?
            .ok_or_else(|| Error::Internal(format!("approval {id} has no action")))?;
        self.expire_in(&mut work, &mut approval, &mut action).await?;
        work.commit(self).await?;
        Ok(true)
    }

    async fn approval_by_token(&self, token: &str) -> Result<Approval> {
        if !secrets::is_well_formed(SecretKind::ApprovalToken, token) {
            return Err(Error::Unauthenticated("not an approval poll token (cs_ap_…)".into()));
        }
        let hash = secrets::hash_secret(token);
        self.read()
            .await?
            .find_approval_by_token_hash(&hash)
            .await?
            .filter(|a| secrets::hashes_equal(&a.token_hash, &hash))
            .ok_or_else(|| Error::Unauthenticated("unknown approval poll token".into()))
    }

    /// `GET /v1/approval-status/{token}`: the token is the credential and reveals only the status.
    pub async fn approval_status(&self, token: &str) -> Result<ApprovalStatusView> {
        let approval = self.approval_by_token(token).await?;
        // Only the note of the decision that decided it: the remarks of partial approvals stay with approvers.
        // The deciding decision is the one made at `decided_at` (the same instant `decide` stamps on both);
        // the list's order is not proof, since two approvers' clocks and commits need not agree.
        let deciding = |wanted: Option<Decision>| {
            approval
                .decisions
                .iter()
                .filter(|d| Some(d.created_at) == approval.decided_at)
                .find(|d| wanted.is_none_or(|w| d.decision == w))
                .and_then(|d| d.note.clone())
        };
        let note = match approval.status {
            ApprovalStatus::Approved => deciding(Some(Decision::Approve)),
            ApprovalStatus::Denied => deciding(Some(Decision::Deny)),
            _ => None,
        };
        Ok(ApprovalStatusView { status: approval.status, decided_at: approval.decided_at, note })
    }

    /// `GET /v1/approval-status/{token}/result`: the stored result of the executed request.
    pub async fn approval_result(&self, token: &str) -> Result<Action> {
        let approval = self.approval_by_token(token).await?;
        let action = self
            .read()
            .await?
            .get_action(&approval.org_id, &approval.action_id)
            .await?
            .ok_or_else(|| Error::Internal("approval has no action".into()))?;
        match action.state {
            ActionState::Succeeded | ActionState::Failed => Ok(action),
            ActionState::Approved if action.target.is_none() => Ok(action),
            state => Err(Error::Conflict {
                message: format!("there is no result yet: the action is {}", state.as_str()),
                state: Some(state.as_str().to_owned()),
            }),
        }
    }
}

impl Gateway {
    /// At start: one timer per pending approval, from the store.
    pub async fn rearm_expiry_timers(&self) -> Result<usize> {
        let deadlines = self.read().await?.list_pending_deadlines().await?;
        for d in &deadlines {
            let _ = self.inner.expiry.send(super::ExpiryRequest {
                org_id: d.org_id.clone(),
                approval_id: d.approval_id.clone(),
                expires_at: d.expires_at,
            });
        }
        Ok(deadlines.len())
    }

    /// [`Gateway::rearm_expiry_timers`] on a task of its own, tried again every second until the store
    /// answers or the server stops: a pending approval whose timer was never armed would otherwise wait
    /// past its deadline until someone tried to decide it.
    pub fn rearm_expiry_timers_until_done(&self, why: &'static str) -> tokio::task::JoinHandle<()> {
        let gateway = self.clone();
        tokio::spawn(async move {
            loop {
                match gateway.rearm_expiry_timers().await {
                    Ok(n) => {
                        if n > 0 {
                            tracing::info!(pending = n, why, "expiry timers re-armed");
                        }
                        return;
                    }
                    Err(error) => tracing::error!(%error, why, "cannot re-arm expiry timers; trying again in 1 s"),
                }
                tokio::select! {
                    () = gateway.shutdown().cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        })
    }
}
