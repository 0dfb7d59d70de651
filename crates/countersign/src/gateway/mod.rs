//! Application services: the only place that combines the store, the policy, connectors, notifications and
//! audit. Every front end (REST, and later MCP, the LLM proxy, the dashboard, the CLI) calls these methods,
//! so they can never disagree about a rule.
//!
//! Each operation reads and writes inside one store transaction and appends its audit events in that same
//! transaction; notifications go out only after the commit. Nothing here parses HTTP.

mod actions;
mod approvals;
mod auth;
mod execute;
pub mod notify;
pub mod policy;
mod principals;
mod queries;
mod sessions;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use countersign_core::audit::{Actor, ActorKind, AuditEvent, NewAuditEvent};
use countersign_core::clock::Clock;
use countersign_core::domain::{Agent, Role, Session, User};
use countersign_core::ids::{ActionId, OrgId};
use countersign_core::store::{Store, StoreTx};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use actions::{SubmitOutcome, SubmitRequest};
pub use approvals::ApprovalStatusView;
pub use execute::ExecutionQueue;
pub use principals::{Bootstrapped, CreatedKey, CreatedOrg, KeyOwner};
pub use queries::Trace;
pub use sessions::{CreatedSession, SessionRequest};

use crate::connectors::Connectors;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use notify::Notifier;
use policy::PolicyRegistry;

/// A request to arm the expiry timer of a pending approval.
#[derive(Debug, Clone)]
pub struct ExpiryRequest {
    pub org_id: OrgId,
    pub approval_id: countersign_core::ids::ApprovalId,
    pub expires_at: DateTime<Utc>,
}

/// Who is calling, once their credential has been checked.
#[derive(Debug, Clone)]
pub enum Caller {
    User(User),
    Agent(Agent),
    Session { session: Session, agent: Agent },
}

impl Caller {
    pub fn org_id(&self) -> &OrgId {
        match self {
            Caller::User(u) => &u.org_id,
            Caller::Agent(a) => &a.org_id,
            Caller::Session { session, .. } => &session.org_id,
        }
    }

    pub fn actor(&self) -> Actor {
        match self {
            Caller::User(u) => Actor { kind: ActorKind::User, id: u.id.to_string(), name: u.name.clone() },
            Caller::Agent(a) => Actor { kind: ActorKind::Agent, id: a.id.to_string(), name: a.name.clone() },
            Caller::Session { session, agent } => {
                Actor { kind: ActorKind::Session, id: session.id.to_string(), name: agent.name.clone() }
            }
        }
    }

    pub fn user(&self) -> Option<&User> {
        match self {
            Caller::User(u) => Some(u),
            _ => None,
        }
    }

    /// The agent this caller acts for, if it is an agent or an agent's session.
    pub fn agent(&self) -> Option<&Agent> {
        match self {
            Caller::Agent(a) | Caller::Session { agent: a, .. } => Some(a),
            Caller::User(_) => None,
        }
    }

    pub fn require_admin(&self) -> Result<&User> {
        match self {
            Caller::User(u) if u.role == Role::Admin => Ok(u),
            Caller::User(_) => Err(Error::Forbidden("this needs the admin role".into())),
            _ => Err(Error::Forbidden("this needs a user key with the admin role; agents and sessions cannot".into())),
        }
    }

    pub fn require_user(&self) -> Result<&User> {
        self.user().ok_or_else(|| Error::Forbidden("this needs a user key; agents and sessions cannot".into()))
    }
}

/// The gateway: cheap to clone, shared by every front end and worker.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    policies: PolicyRegistry,
    notifier: Notifier,
    connectors: Connectors,
    expiry: mpsc::UnboundedSender<ExpiryRequest>,
    executions: ExecutionQueue,
    metrics: Metrics,
    public_url: String,
    shutdown: CancellationToken,
}

/// Everything the gateway is built from.
pub struct GatewayParts {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub policies: PolicyRegistry,
    pub connectors: Connectors,
    pub expiry: mpsc::UnboundedSender<ExpiryRequest>,
    pub executions: ExecutionQueue,
    pub metrics: Metrics,
    pub public_url: String,
    /// Cancelled when the server stops: long waits and streams end then.
    pub shutdown: CancellationToken,
}

impl Gateway {
    pub fn new(parts: GatewayParts) -> Self {
        Gateway {
            inner: Arc::new(Inner {
                store: parts.store,
                clock: parts.clock,
                policies: parts.policies,
                notifier: Notifier::default(),
                connectors: parts.connectors,
                expiry: parts.expiry,
                executions: parts.executions,
                metrics: parts.metrics,
                public_url: parts.public_url,
                shutdown: parts.shutdown,
            }),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn notifier(&self) -> &Notifier {
        &self.inner.notifier
    }

    pub fn policies(&self) -> &PolicyRegistry {
        &self.inner.policies
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn public_url(&self) -> &str {
        &self.inner.public_url
    }

    /// Resolves when the server begins to stop.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    pub fn poll_url_for(&self, token: &str) -> String {
        format!("{}/v1/approval-status/{token}", self.inner.public_url)
    }

    async fn write(&self) -> Result<Work> {
        Ok(Work { tx: self.inner.store.write().await?, events: Vec::new(), changed: Vec::new() })
    }

    async fn read(&self) -> Result<Box<dyn StoreTx>> {
        Ok(self.inner.store.read().await?)
    }
}

/// One write transaction plus what to announce once it commits.
struct Work {
    tx: Box<dyn StoreTx>,
    events: Vec<AuditEvent>,
    changed: Vec<(OrgId, ActionId)>,
}

impl Work {
    /// Appends an audit event inside this transaction: if it fails, the whole change fails (fail closed).
    async fn audit(
        &mut self,
        org: &OrgId,
        time: DateTime<Utc>,
        actor: &Actor,
        action: &str,
        subject: Option<&str>,
        data: serde_json::Value,
    ) -> Result<()> {
        let event = NewAuditEvent {
            time_us: time.timestamp_micros(),
            actor: actor.clone(),
            action: action.to_owned(),
            subject: subject.map(str::to_owned),
            data,
        };
        let sealed = self.tx.append_audit(org, event).await?;
        self.events.push(sealed);
        Ok(())
    }

    fn action_changed(&mut self, org: &OrgId, action: &ActionId) {
        self.changed.push((org.clone(), action.clone()));
    }

    async fn commit(self, gateway: &Gateway) -> Result<()> {
        self.tx.commit().await?;
        let notifier = &gateway.inner.notifier;
        for (org, action) in &self.changed {
            notifier.action_changed(org, action);
        }
        notifier.audit_appended(self.events);
        Ok(())
    }
}
