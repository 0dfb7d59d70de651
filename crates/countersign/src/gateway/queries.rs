//! Read-only views: action lists, the audit log with filters and cursors, chain verification, and the joint
//! trace of one action.
//!
//! Agents and sessions see only their own agent's actions; audit reads need a user.

use countersign_core::audit::AuditEvent;
use countersign_core::domain::{Action, Agent, Approval};
use countersign_core::ids::ActionId;
use countersign_core::store::{ActionFilter, AuditFilter, Page};

use super::{Caller, Gateway};
use crate::error::Result;

/// Everything about one action, in order.
#[derive(Debug, Clone)]
pub struct Trace {
    pub action: Action,
    pub approval: Option<Approval>,
    pub events: Vec<AuditEvent>,
}

impl Gateway {
    /// The approval of an action, if it has one (same org by construction).
    pub async fn approval_of(&self, action: &Action) -> Result<Option<Approval>> {
        match &action.approval_id {
            Some(id) => Ok(self.read().await?.get_approval(&action.org_id, id).await?),
            None => Ok(None),
        }
    }

    /// An agent of the caller's org by name.
    pub async fn find_agent(&self, caller: &Caller, name: &str) -> Result<Option<Agent>> {
        Ok(self.read().await?.find_agent_by_name(caller.org_id(), name).await?)
    }

    pub async fn list_actions(&self, caller: &Caller, mut filter: ActionFilter, page: &Page) -> Result<Vec<Action>> {
        if let Some(agent) = caller.agent() {
            filter.agent_id = Some(agent.id.clone());
        }
        Ok(self.read().await?.list_actions(caller.org_id(), &filter, page).await?)
    }

    pub async fn query_audit(
        &self,
        caller: &Caller,
        filter: &AuditFilter,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>> {
        caller.require_user()?;
        Ok(self.read().await?.list_audit(caller.org_id(), filter, after_seq, limit).await?)
    }

    pub async fn trace(&self, caller: &Caller, id: &ActionId) -> Result<Trace> {
        let action = self.get_action(caller, id).await?;
        let mut tx = self.read().await?;
        let approval = match &action.approval_id {
            Some(approval_id) => tx.get_approval(caller.org_id(), approval_id).await?,
            None => None,
        };
        let mut subjects = vec![action.id.to_string()];
        if let Some(a) = &approval {
            subjects.push(a.id.to_string());
        }
        let filter = AuditFilter { subjects, ..AuditFilter::default() };
        let events = tx.list_audit(caller.org_id(), &filter, 0, 10_000).await?;
        Ok(Trace { action, approval, events })
    }
}

impl Gateway {
    /// Pending approvals across all orgs, for the metrics gauge.
    pub async fn pending_approvals_count(&self) -> Result<i64> {
        Ok(self.read().await?.count_pending_approvals().await?)
    }

    /// Queued and running jobs by kind and state, for the queue-depth gauge.
    pub async fn open_jobs(&self) -> Result<Vec<(String, String, i64)>> {
        let open = self.read().await?.count_open_jobs().await?;
        Ok(open.into_iter().map(|(k, s, n)| (k.as_str().to_owned(), s.as_str().to_owned(), n)).collect())
    }
}
