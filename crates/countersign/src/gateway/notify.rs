//! Notifications: "this action changed", "this job changed", "the audit log grew", "jobs were added" and
//! "an approval's expiry timer should be armed", published after the transaction that caused them commits.
//!
//! Waiters subscribe before they read, so a change between the read and the wait is never missed; a waiter
//! that falls behind (lagged) simply re-reads. With several replicas on one database, each commit also
//! publishes the same facts through the store ([`Changes::to_wire`], PostgreSQL `NOTIFY` inside the
//! transaction, so nothing is announced for a rolled-back change); every replica feeds what it hears from the
//! others into these same channels ([`Notifier::apply_remote`]). This module does not talk to a database.

use chrono::{DateTime, Utc};
use countersign_core::ids::{ActionId, ApprovalId, JobId, OrgId};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::ExpiryRequest;

/// An action changed; `None` means any may have (re-read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionChanged {
    pub action_id: Option<ActionId>,
}

impl ActionChanged {
    pub fn concerns(&self, id: &ActionId) -> bool {
        self.action_id.as_ref().is_none_or(|changed| changed == id)
    }
}

/// A job changed; `None` means any may have (re-read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobChanged {
    pub job_id: Option<JobId>,
}

impl JobChanged {
    pub fn concerns(&self, id: &JobId) -> bool {
        self.job_id.as_ref().is_none_or(|changed| changed == id)
    }
}

/// The org's audit log grew up to `seq`; `None` means any org's may have (re-read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAppended {
    pub org_id: Option<OrgId>,
    pub seq: i64,
}

impl AuditAppended {
    pub fn concerns(&self, org: &OrgId, after_seq: i64) -> bool {
        self.org_id.as_ref().is_none_or(|o| o == org) && self.seq > after_seq
    }
}

/// What one committed transaction changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// The replica that made the change (receivers skip their own).
    #[serde(rename = "r")]
    pub replica: String,
    #[serde(rename = "a", default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<(OrgId, ActionId)>,
    #[serde(rename = "j", default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<(OrgId, JobId)>,
    /// The highest seq appended per org.
    #[serde(rename = "e", default, skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<(OrgId, i64)>,
    #[serde(rename = "q", default, skip_serializing_if = "std::ops::Not::not")]
    pub jobs_added: bool,
    /// Approvals whose expiry every replica should time (it fires once: expiry re-checks under a lock).
    #[serde(rename = "x", default, skip_serializing_if = "Vec::is_empty")]
    pub expiries: Vec<(OrgId, ApprovalId, DateTime<Utc>)>,
    /// Too much to list: every waiter should re-read.
    #[serde(rename = "all", default, skip_serializing_if = "std::ops::Not::not")]
    pub everything: bool,
    /// A key or session was revoked, or an agent or user disabled: forget every cached credential.
    #[serde(rename = "p", default, skip_serializing_if = "std::ops::Not::not")]
    pub principals: bool,
    /// Orgs whose policy was set (`PUT /v1/policy`) or that were created: every replica reloads theirs.
    #[serde(rename = "pol", default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<OrgId>,
}

/// PostgreSQL refuses `NOTIFY` payloads of 8000 bytes or more.
const MAX_WIRE_BYTES: usize = 7000;

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
            && self.jobs.is_empty()
            && self.audit.is_empty()
            && !self.jobs_added
            && self.expiries.is_empty()
            && !self.everything
            && !self.principals
            && self.policies.is_empty()
    }

    /// A message from another replica, or `None` for one this replica sent itself. One that cannot be read
    /// may have named anything (a policy, a revocation): it is taken as "re-read everything".
    pub fn from_remote(message: &str, own_replica: &str) -> Option<Changes> {
        let Ok(changes) = serde_json::from_str::<Changes>(message) else {
            tracing::warn!("an unreadable replica notification; re-reading everything it may have named");
            return Some(Changes { everything: true, principals: true, ..Changes::default() });
        };
        (changes.replica != own_replica).then_some(changes)
    }

    /// The message other replicas receive; a change too large to list becomes "re-read everything".
    pub fn to_wire(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        if !text.is_empty() && text.len() <= MAX_WIRE_BYTES {
            return text;
        }
        let summary = Changes {
            replica: self.replica.clone(),
            jobs_added: self.jobs_added,
            everything: true,
            principals: self.principals,
            ..Changes::default()
        };
        serde_json::to_string(&summary).unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
pub struct Notifier {
    actions: broadcast::Sender<ActionChanged>,
    jobs: broadcast::Sender<JobChanged>,
    audit: broadcast::Sender<AuditAppended>,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            actions: broadcast::channel(4096).0,
            jobs: broadcast::channel(4096).0,
            audit: broadcast::channel(4096).0,
        }
    }
}

/// What a remote message asks of the local replica beyond waking waiters.
#[derive(Debug, Default)]
pub struct RemoteFollowUp {
    pub jobs_added: bool,
    pub expiries: Vec<ExpiryRequest>,
}

impl Notifier {
    /// Wakes local waiters for what a committed transaction changed. No receivers is normal.
    pub fn publish(&self, changes: &Changes) {
        for (_, action_id) in &changes.actions {
            let _ = self.actions.send(ActionChanged { action_id: Some(action_id.clone()) });
        }
        for (_, job_id) in &changes.jobs {
            let _ = self.jobs.send(JobChanged { job_id: Some(job_id.clone()) });
        }
        for (org_id, seq) in &changes.audit {
            let _ = self.audit.send(AuditAppended { org_id: Some(org_id.clone()), seq: *seq });
        }
    }

    /// Feeds another replica's change ([`Changes::from_remote`]) into the local channels.
    /// `forget_credentials` runs first when the message says a credential or principal was revoked (or
    /// cannot say what changed), so no waiter woken by that message's audit event can still be served by a
    /// cached credential.
    pub fn apply_remote(&self, changes: Changes, forget_credentials: impl FnOnce()) -> RemoteFollowUp {
        if changes.principals || changes.everything {
            forget_credentials();
        }
        if changes.everything {
            self.wake_everyone();
        }
        self.publish(&changes);
        RemoteFollowUp {
            jobs_added: changes.jobs_added || changes.everything,
            expiries: changes
                .expiries
                .into_iter()
                .map(|(org_id, approval_id, expires_at)| ExpiryRequest { org_id, approval_id, expires_at })
                .collect(),
        }
    }

    /// Makes every waiter re-read, as if it had lagged (after a lost replica connection, say).
    pub fn wake_everyone(&self) {
        let _ = self.actions.send(ActionChanged { action_id: None });
        let _ = self.jobs.send(JobChanged { job_id: None });
        let _ = self.audit.send(AuditAppended { org_id: None, seq: i64::MAX });
    }

    pub fn subscribe_actions(&self) -> broadcast::Receiver<ActionChanged> {
        self.actions.subscribe()
    }

    pub fn subscribe_jobs(&self) -> broadcast::Receiver<JobChanged> {
        self.jobs.subscribe()
    }

    /// How many are listening for job changes right now (job waits, and the runner's own).
    pub fn job_listeners(&self) -> usize {
        self.jobs.receiver_count()
    }

    pub fn subscribe_audit(&self) -> broadcast::Receiver<AuditAppended> {
        self.audit.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_and_oversized_ones_become_a_wake_up() {
        let org = OrgId::new();
        let changes = Changes {
            replica: "r1".into(),
            actions: vec![(org.clone(), ActionId::new())],
            audit: vec![(org.clone(), 7)],
            jobs_added: true,
            ..Changes::default()
        };
        let wire = changes.to_wire();
        assert_eq!(serde_json::from_str::<Changes>(&wire).ok(), Some(changes.clone()));

        let big = Changes { actions: (0..500).map(|_| (org.clone(), ActionId::new())).collect(), ..changes };
        let wire = big.to_wire();
        assert!(wire.len() < MAX_WIRE_BYTES);
        let summary: Changes = serde_json::from_str(&wire).unwrap_or_default();
        assert!(summary.everything && summary.jobs_added && summary.actions.is_empty());
    }

    #[test]
    fn own_messages_change_nothing_and_unreadable_ones_everything() {
        let notifier = Notifier::default();
        let mut actions = notifier.subscribe_actions();
        let changes =
            Changes { replica: "me".into(), actions: vec![(OrgId::new(), ActionId::new())], ..Changes::default() };
        let forgot = std::cell::Cell::new(0);
        assert_eq!(Changes::from_remote(&changes.to_wire(), "me"), None);
        // It may have named a policy or a revocation: everything is read again.
        let unreadable = Changes::from_remote("not json", "me").unwrap_or_default();
        assert!(unreadable.everything && unreadable.principals, "{unreadable:?}");
        let theirs = Changes::from_remote(&changes.to_wire(), "other").unwrap_or_default();
        assert!(!notifier.apply_remote(theirs, || forgot.set(forgot.get() + 1)).jobs_added);
        assert!(actions.try_recv().is_ok());
        assert_eq!(forgot.get(), 0, "no credential changed");
        let revoked = Changes { replica: "other".into(), principals: true, ..Changes::default() };
        notifier.apply_remote(revoked, || forgot.set(forgot.get() + 1));
        let summary = Changes { replica: "other".into(), everything: true, ..Changes::default() };
        notifier.apply_remote(summary, || forgot.set(forgot.get() + 1));
        assert_eq!(forgot.get(), 2, "a revocation, or a message too large to list, forgets cached credentials");
    }
}
