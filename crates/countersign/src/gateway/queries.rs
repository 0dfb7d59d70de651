//! Read-only views: action lists, the audit log with filters and cursors (and their parser), and the joint
//! trace of one action.
//!
//! Agents and sessions see only their own agent's actions; audit reads need a user.

use chrono::{DateTime, NaiveDateTime};
use countersign_core::audit::AuditEvent;
use countersign_core::domain::{Action, Agent, Approval};
use countersign_core::ids::ActionId;
use countersign_core::store::{ActionFilter, AuditFilter, Listed, Page};

use super::{Caller, Gateway};
use crate::error::{Error, Result};

/// The text forms of a time that no offset qualifies; they are read as UTC (`datetime-local` sends these).
const NAIVE_TIME_FORMATS: [&str; 4] =
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M"];

/// A time bound of the audit log, in microseconds since the epoch, from the text every front end receives:
/// microseconds since the epoch, RFC 3339 (`2026-11-23T19:00:00Z`, any offset), or a date and time without
/// an offset (`2026-11-23T19:00`, seconds optional), which is UTC. Anything else is a 400 naming `field`.
pub fn parse_audit_time(field: &str, text: &str) -> Result<i64> {
    let text = text.trim();
    if let Ok(us) = text.parse::<i64>() {
        return Ok(us);
    }
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.timestamp_micros());
    }
    NAIVE_TIME_FORMATS
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|time| time.and_utc().timestamp_micros())
        .ok_or_else(|| {
            Error::bad_request(
                field,
                format!(
                    "`{text}` is not a time: use RFC 3339 (2026-11-23T19:00:00Z), a UTC date and time \
                     (2026-11-23T19:00) or microseconds since the epoch"
                ),
            )
        })
}

/// A value that is present and not blank.
fn given(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

/// An audit filter from the text every front end receives. Blank values filter nothing; times are read by
/// [`parse_audit_time`]; `since` after `until` is a 400.
pub fn audit_filter(
    action: Option<&str>,
    actor: Option<&str>,
    subject: Option<&str>,
    since: Option<&str>,
    until: Option<&str>,
) -> Result<AuditFilter> {
    let since_us = given(since).map(|t| parse_audit_time("since", t)).transpose()?;
    let until_us = given(until).map(|t| parse_audit_time("until", t)).transpose()?;
    if let (Some(since), Some(until)) = (since_us, until_us)
        && since > until
    {
        return Err(Error::bad_request("since", "`since` is after `until`: nothing can match"));
    }
    Ok(AuditFilter {
        action: given(action).map(str::to_owned),
        actor: given(actor).map(str::to_owned),
        subjects: given(subject).map(str::to_owned).into_iter().collect(),
        since_us,
        until_us,
    })
}

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

    pub async fn list_actions(&self, caller: &Caller, mut filter: ActionFilter, page: &Page) -> Result<Listed<Action>> {
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

    /// Newest first: the events before `before_seq`, or the newest ones when `None`.
    pub async fn query_audit_newest(
        &self,
        caller: &Caller,
        filter: &AuditFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>> {
        caller.require_user()?;
        Ok(self.read().await?.list_audit_newest(caller.org_id(), filter, before_seq, limit).await?)
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
