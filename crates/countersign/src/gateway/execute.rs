//! Carrying out approved actions exactly once, honestly.
//!
//! An execution is claimed (`approved` → `executing`, audited) in its own transaction before anything is
//! sent, and its outcome is recorded in another. A process that dies between the two leaves the action
//! `executing`; at the next start it is sent again only when its upstream is marked `retry_safe`, and
//! otherwise ends `failed` with `outcome unknown`. Before sending, the stored request is checked against the
//! hash its approval bound; a mismatch fails the action and nothing is sent.

use countersign_core::audit::{Actor, canonical_hash};
use countersign_core::domain::{Action, Target};
use countersign_core::ids::{ActionId, OrgId};
use countersign_core::state::ActionState;
use serde_json::json;
use tokio::sync::mpsc;

use super::Gateway;
use crate::error::{Error, Result};

/// Where approved actions wait for the executor worker.
#[derive(Debug, Clone)]
pub struct ExecutionQueue {
    sender: mpsc::UnboundedSender<(OrgId, ActionId)>,
}

impl ExecutionQueue {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<(OrgId, ActionId)>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (ExecutionQueue { sender }, receiver)
    }

    pub fn enqueue(&self, org: OrgId, action: ActionId) {
        // The receiver lives as long as the server; after shutdown, restart recovery picks the action up.
        let _ = self.sender.send((org, action));
    }
}

enum Claim {
    /// Send the request now.
    Send(Box<Action>),
    /// Nothing to do (already executed, or settled by the binding check).
    Done,
}

impl Gateway {
    /// Runs one approved action to its end. Safe to call twice: only one call claims it.
    pub async fn execute_action(&self, org: &OrgId, id: &ActionId) -> Result<()> {
        let action = match self.claim(org, id, false).await? {
            Claim::Send(action) => *action,
            Claim::Done => return Ok(()),
        };
        self.send_and_record(action).await
    }

    /// At start: finishes what a previous process left `approved` or `executing`.
    pub async fn recover_executions(&self) -> Result<usize> {
        let unfinished = self.read().await?.list_unfinished_executions().await?;
        let count = unfinished.len();
        for action in unfinished {
            match action.state {
                ActionState::Approved => self.inner.executions.enqueue(action.org_id.clone(), action.id.clone()),
                _ => {
                    let retry_safe = match &action.target {
                        Some(Target::Http(http)) => self.inner.connectors.is_retry_safe(&http.upstream),
                        None => false,
                    };
                    if retry_safe {
                        if let Claim::Send(action) = self.claim(&action.org_id, &action.id, true).await? {
                            let gateway = self.clone();
                            tokio::spawn(async move {
                                if let Err(e) = gateway.send_and_record(*action).await {
                                    tracing::error!(error = %e, "retrying an execution failed");
                                }
                            });
                        }
                    } else {
                        self.finish(
                            &action,
                            ActionState::Failed,
                            None,
                            Some(
                                "outcome unknown: the gateway stopped after sending the request and before recording \
                                  the answer, and the upstream is not marked retry_safe"
                                    .into(),
                            ),
                        )
                        .await?;
                    }
                }
            }
        }
        Ok(count)
    }

    async fn claim(&self, org: &OrgId, id: &ActionId, retry: bool) -> Result<Claim> {
        let now = self.now();
        let mut work = self.write().await?;
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
        let approved_hash = match &action.approval_id {
            Some(approval_id) => work.tx.get_approval(org, approval_id).await?.map(|a| a.request_hash),
            None => Some(action.request_hash.clone()),
        };
        if approved_hash.as_deref() != Some(current_hash.as_str()) || action.request_hash != current_hash {
            action.state = action.state.transition(ActionState::Failed)?;
            action.error = Some("the stored request no longer matches the hash its approval bound; not sent".into());
            action.finished_at = Some(now);
            work.tx.update_action(&action).await?;
            work.audit(
                org,
                now,
                &Actor::system(),
                "action.failed",
                Some(id.as_str()),
                json!({"reason": "request_hash_mismatch", "expected": approved_hash, "found": current_hash}),
            )
            .await?;
            work.action_changed(org, id);
            work.commit(self).await?;
            return Ok(Claim::Done);
        }
        action.state = action.state.transition(ActionState::Executing)?;
        action.started_at = Some(now);
        work.tx.update_action(&action).await?;
        work.audit(org, now, &Actor::system(), "action.executing", Some(id.as_str()), json!({"retry": retry})).await?;
        work.action_changed(org, id);
        work.commit(self).await?;
        Ok(Claim::Send(Box::new(action)))
    }

    async fn send_and_record(&self, action: Action) -> Result<()> {
        let outcome = match &action.target {
            Some(Target::Http(http)) => self.inner.connectors.send_http(http, action.id.as_str()).await,
            None => return Ok(()),
        };
        match outcome {
            Ok(answer) if (200..300).contains(&answer.status) => {
                self.finish(&action, ActionState::Succeeded, Some(answer.result), None).await
            }
            Ok(answer) => {
                let error = format!("upstream answered {}", answer.status);
                self.finish(&action, ActionState::Failed, Some(answer.result), Some(error)).await
            }
            Err(e) => self.finish(&action, ActionState::Failed, None, Some(e.to_string())).await,
        }
    }

    async fn finish(
        &self,
        action: &Action,
        state: ActionState,
        result: Option<serde_json::Value>,
        error: Option<String>,
    ) -> Result<()> {
        let now = self.now();
        let mut work = self.write().await?;
        let mut current = work
            .tx
            .get_action(&action.org_id, &action.id)
            .await?
            .ok_or_else(|| Error::not_found("action", action.id.as_str()))?;
        current.state = current.state.transition(state)?;
        current.result = result;
        current.error = error.clone();
        current.finished_at = Some(now);
        work.tx.update_action(&current).await?;
        let status = current.result.as_ref().and_then(|r| r.get("status")).cloned();
        let event = if state == ActionState::Succeeded { "action.executed" } else { "action.failed" };
        work.audit(
            &action.org_id,
            now,
            &Actor::system(),
            event,
            Some(action.id.as_str()),
            json!({"status": status, "error": error}),
        )
        .await?;
        work.action_changed(&action.org_id, &action.id);
        work.commit(self).await
    }
}
