//! In-process notifications: "this action changed", "this job changed" and "these audit events were appended", published after
//! the transaction that caused them commits.
//!
//! Waiters subscribe before they read, so a change between the read and the wait is never missed; a waiter
//! that falls behind (lagged) simply re-reads. Cross-replica delivery (PostgreSQL LISTEN/NOTIFY) would feed
//! the same channels; this module does not talk to a database.

use countersign_core::audit::AuditEvent;
use countersign_core::ids::{ActionId, JobId, OrgId};
use tokio::sync::broadcast;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionChanged {
    pub org_id: OrgId,
    pub action_id: ActionId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobChanged {
    pub org_id: OrgId,
    pub job_id: JobId,
}

#[derive(Debug, Clone)]
pub struct Notifier {
    actions: broadcast::Sender<ActionChanged>,
    jobs: broadcast::Sender<JobChanged>,
    audit: broadcast::Sender<AuditEvent>,
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

impl Notifier {
    pub fn action_changed(&self, org_id: &OrgId, action_id: &ActionId) {
        // No receivers is normal: nobody is waiting.
        let _ = self.actions.send(ActionChanged { org_id: org_id.clone(), action_id: action_id.clone() });
    }

    pub fn job_changed(&self, org_id: &OrgId, job_id: &JobId) {
        let _ = self.jobs.send(JobChanged { org_id: org_id.clone(), job_id: job_id.clone() });
    }

    pub fn subscribe_jobs(&self) -> broadcast::Receiver<JobChanged> {
        self.jobs.subscribe()
    }

    pub fn audit_appended(&self, events: Vec<AuditEvent>) {
        for event in events {
            let _ = self.audit.send(event);
        }
    }

    pub fn subscribe_actions(&self) -> broadcast::Receiver<ActionChanged> {
        self.actions.subscribe()
    }

    pub fn subscribe_audit(&self) -> broadcast::Receiver<AuditEvent> {
        self.audit.subscribe()
    }
}
