//! Application services: the only place that combines the store, the policy, connectors, notifications and
//! audit. Every front end (REST, and later MCP, the LLM proxy, the dashboard, the CLI) calls these methods,
//! so they can never disagree about a rule.
//!
//! Each operation reads and writes inside one store transaction and appends its audit events in that same
//! transaction; notifications go out only after the commit. Nothing here parses HTTP.

mod actions;
mod approvals;
mod auth;
mod checkpoints;
mod dashboard_sessions;
mod execute;
mod jobs;
mod llm;
mod mcp;
pub mod notify;
pub mod policy;
mod principals;
mod queries;
mod sessions;
mod webhooks;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use countersign_core::audit::{Actor, ActorKind, AuditEvent, NewAuditEvent};
use countersign_core::clock::Clock;
use countersign_core::domain::{Agent, Job, Role, Session, User};
use countersign_core::ids::{ActionId, AgentId, JobId, OrgId};
use countersign_core::store::{Store, StoreTx};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

pub use actions::{MAX_WAIT, SubmitOutcome, SubmitRequest, wait_seconds};
pub use approvals::ApprovalStatusView;
pub use auth::WaitSlot;
pub use dashboard_sessions::DashboardLogin;
pub use jobs::{JobOutcome, JobRunnerSettings, job_filter};
pub use llm::InlineOutcome;
pub use mcp::{MAX_MCP_RESULT_BYTES, McpCall, McpOutcome, mcp_capability};
pub use principals::{Bootstrapped, CreatedKey, CreatedOrg, KeyOwner};
pub use queries::{Trace, audit_filter, parse_audit_time};
pub use sessions::{CreatedSession, SessionRequest};
pub use webhooks::{CreatedWebhook, EVENT_TYPES as WEBHOOK_EVENTS, WebhookRequest};

use crate::connectors::{Connectors, Service};
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
    Session { session: Box<Session>, agent: Agent },
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

    /// May call a model provider with the server's key for one of `capabilities`: an agent, or a session
    /// scoped to at least one of them. Users decide and read; they do not call models.
    pub fn require_model_access<'c>(&self, mut capabilities: impl Iterator<Item = &'c str>) -> Result<()> {
        match self {
            Caller::Agent(_) => Ok(()),
            Caller::Session { session, .. } => {
                if capabilities.any(|c| session.scopes.iter().any(|scope| scope.matches(c))) {
                    Ok(())
                } else {
                    Err(Error::Forbidden("this session's scopes include no model capability (llm.*)".into()))
                }
            }
            Caller::User(_) => {
                Err(Error::Forbidden("the LLM proxy is for agents and their sessions; use an agent key".into()))
            }
        }
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
    jobs: JobRunnerSettings,
    limiter: Option<auth::RateLimiter>,
    open_waits: Arc<auth::OpenWaits>,
    /// Wakes the job runner when a commit added jobs.
    jobs_added: Notify,
    signer: countersign_core::checkpoint::AuditSigner,
    data_dir: std::path::PathBuf,
    metrics: Metrics,
    public_url: String,
    shutdown: CancellationToken,
    /// Inline executions (a model call's record, a tool call's send and record) run as tasks of their own,
    /// so a caller that goes away cannot cut them off halfway; the server waits for them before it stops
    /// the connectors they use.
    inline: tokio_util::task::TaskTracker,
    auth_cache: auth::AuthCache,
    /// With PostgreSQL: whether this replica hears the others' changes.
    replica_feed: Option<countersign_store::FeedHealth>,
    /// Org names by id, for the `orgs` of configured services. An org's name never changes, and orgs are
    /// never deleted, so an entry never goes stale.
    org_names: std::sync::Mutex<std::collections::HashMap<OrgId, String>>,
    /// Agent and capability pairs whose precedent count reached its cap, so a submission need not count again
    /// (see [`Gateway::prior_successes`]).
    precedent_capped:
        std::sync::Mutex<std::collections::HashSet<(OrgId, AgentId, countersign_core::capability::Capability)>>,
}

/// Everything the gateway is built from.
pub struct GatewayParts {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub policies: PolicyRegistry,
    pub connectors: Connectors,
    pub expiry: mpsc::UnboundedSender<ExpiryRequest>,
    pub jobs: JobRunnerSettings,
    pub rate_limit: crate::config::RateLimitConfig,
    /// Signs audit checkpoints.
    pub signer: countersign_core::checkpoint::AuditSigner,
    /// Where exports are written.
    pub data_dir: std::path::PathBuf,
    pub metrics: Metrics,
    pub public_url: String,
    /// Cancelled when the server stops: long waits and streams end then.
    pub shutdown: CancellationToken,
    /// How long a resolved credential is served from memory (zero: never).
    pub auth_cache: std::time::Duration,
    /// With PostgreSQL: whether the replica feed listens (readiness, and the credential cache is skipped
    /// while it does not).
    pub replica_feed: Option<countersign_store::FeedHealth>,
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
                jobs: parts.jobs,
                limiter: auth::rate_limiter(parts.rate_limit),
                open_waits: auth::OpenWaits::new(parts.rate_limit.open_waits, parts.metrics.clone()),
                jobs_added: Notify::new(),
                signer: parts.signer,
                data_dir: parts.data_dir,
                metrics: parts.metrics,
                public_url: parts.public_url,
                shutdown: parts.shutdown,
                inline: tokio_util::task::TaskTracker::new(),
                auth_cache: auth::AuthCache::new(parts.auth_cache),
                replica_feed: parts.replica_feed,
                org_names: std::sync::Mutex::default(),
                precedent_capped: std::sync::Mutex::default(),
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

    /// With PostgreSQL, how long this replica has not heard the others' changes (its feed's connection lost
    /// and not listening again yet); `None` while it hears them, and always with SQLite.
    pub fn replica_feed_deaf_for(&self) -> Option<std::time::Duration> {
        self.inner.replica_feed.as_ref().and_then(countersign_store::FeedHealth::deaf_for)
    }

    pub fn public_url(&self) -> &str {
        &self.inner.public_url
    }

    /// Whether an org may use a configured upstream, model provider or MCP server (its `orgs`; every org
    /// when it names none). An unknown service serves no one.
    pub async fn serves(&self, org: &OrgId, service: Service<'_>) -> Result<bool> {
        let Some(scope) = self.inner.connectors.scope(service) else { return Ok(false) };
        if scope.is_every_org() {
            return Ok(true);
        }
        let name = self.org_name(org).await?;
        Ok(scope.admits(org.as_str(), &name))
    }

    async fn org_name(&self, org: &OrgId) -> Result<String> {
        let cached = |names: &std::sync::Mutex<std::collections::HashMap<OrgId, String>>| {
            names.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(org).cloned()
        };
        if let Some(name) = cached(&self.inner.org_names) {
            return Ok(name);
        }
        let found = self.read().await?.get_org(org).await?.ok_or_else(|| Error::not_found("org", org.as_str()))?;
        let mut names = self.inner.org_names.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        names.insert(org.clone(), found.name.clone());
        Ok(found.name)
    }

    /// Applies what another replica committed: reloads the policies it set, then wakes local waiters, the
    /// job runner and expiry timers — so whoever sees the change announced here already meets its policy.
    /// Answers true for a message that could not list what changed (too large, or unreadable): cached
    /// credentials are forgotten here, and the caller re-reads everything else ([`crate::workers::replicas`]),
    /// reloading every policy before it wakes anyone.
    pub async fn apply_remote_changes(&self, message: &str) -> bool {
        let Some(mut changes) = notify::Changes::from_remote(message, &self.inner.jobs.owner) else { return false };
        if changes.principals || changes.everything {
            // First: a revocation must not wait behind the policy reloads.
            self.inner.auth_cache.forget_all();
        }
        let everything = std::mem::take(&mut changes.everything);
        for org in &changes.policies {
            self.reload_org_policy(org).await;
        }
        let follow_up = self.inner.notifier.apply_remote(changes, || self.inner.auth_cache.forget_all());
        if follow_up.jobs_added {
            self.inner.jobs_added.notify_one();
        }
        for request in follow_up.expiries {
            let _ = self.inner.expiry.send(request);
        }
        everything
    }

    /// Resolves when the server begins to stop.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Runs an inline execution's step on a task of its own, awaited by [`Gateway::inline_finished`].
    pub fn spawn_inline<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.inline.spawn(task)
    }

    /// Waits for every inline execution still running (at shutdown, before the connectors stop).
    pub async fn inline_finished(&self) {
        self.inner.inline.close();
        self.inner.inline.wait().await;
    }

    /// The clock's time at the store's precision (microseconds), so a record sent from memory (a webhook event
    /// built from the action a submission or a finish holds) says what a later read says.
    pub fn now(&self) -> DateTime<Utc> {
        chrono::SubsecRound::trunc_subsecs(self.inner.clock.now(), 6)
    }

    pub fn poll_url_for(&self, token: &str) -> String {
        format!("{}/v1/approval-status/{token}", self.inner.public_url)
    }

    async fn write(&self) -> Result<Work> {
        Ok(Work {
            tx: self.inner.store.write().await?,
            events: Vec::new(),
            changed: Vec::new(),
            jobs_changed: Vec::new(),
            emitted: Vec::new(),
            jobs_added: false,
            expiries: Vec::new(),
            principals: false,
            policies: Vec::new(),
            deferred: false,
            audit_failed: false,
        })
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
    jobs_changed: Vec<(OrgId, JobId)>,
    /// Webhook events raised in this transaction; their delivery jobs are written just before the commit.
    emitted: Vec<webhooks::Emission>,
    jobs_added: bool,
    expiries: Vec<(OrgId, countersign_core::ids::ApprovalId, DateTime<Utc>)>,
    /// A credential was revoked or a principal disabled: cached credentials are forgotten on commit.
    principals: bool,
    /// Orgs whose policy this transaction set: the other replicas reload theirs.
    policies: Vec<OrgId>,
    /// The commit's sync was asked to be left to a later commit ([`StoreTx::defer_sync`]), for the commit's
    /// metric.
    deferred: bool,
    /// An audit append failed: the commit refuses, whatever the caller did with the error, so no change
    /// lands without its event (an error that did not fail the transaction itself, such as a head row that
    /// cannot be decoded, would otherwise let it).
    audit_failed: bool,
}

impl Work {
    /// [`StoreTx::defer_sync`], remembered for the commit's metric.
    fn defer_sync(&mut self, defer: bool) {
        self.deferred = defer;
        self.tx.defer_sync(defer);
    }

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
        let sealed = self.tx.append_audit(org, event).await.inspect_err(|_| self.audit_failed = true)?;
        self.events.push(sealed);
        Ok(())
    }

    /// Marks this change as setting the org's policy, for the other replicas to reload.
    fn policy_changed(&mut self, org: &OrgId) {
        self.policies.push(org.clone());
    }

    /// Marks this change as revoking a credential or disabling a principal.
    fn principals_changed(&mut self) {
        self.principals = true;
    }

    fn action_changed(&mut self, org: &OrgId, action: &ActionId) {
        self.changed.push((org.clone(), action.clone()));
    }

    /// Adds a job in this transaction; the runner is woken once it commits.
    async fn enqueue(&mut self, job: &Job) -> Result<()> {
        self.tx.insert_job(job).await?;
        self.jobs_added = true;
        self.jobs_changed.push((job.org_id.clone(), job.id.clone()));
        Ok(())
    }

    fn job_changed(&mut self, job: &Job) {
        self.job_id_changed(&job.org_id, &job.id);
    }

    fn job_id_changed(&mut self, org: &OrgId, id: &JobId) {
        self.jobs_changed.push((org.clone(), id.clone()));
    }

    /// Raises a webhook event, tied to the audit event appended just before it.
    fn emit(&mut self, event_type: &'static str, data: serde_json::Value) {
        if let Some(cause) = self.events.last() {
            // The id of the audit event that caused it; a second event raised by the same audit event (a deny
            // or an expiry also finishes the action) gets `<id>.<type>`, so receivers deduplicating by id
            // never drop one for the other.
            let mut id = cause.id.to_string();
            if self.emitted.iter().any(|e| e.id == id) {
                id = format!("{id}.{event_type}");
            }
            self.emitted.push(webhooks::Emission {
                org_id: cause.org_id.clone(),
                id,
                event_type,
                time_us: cause.time_us,
                data,
            });
        }
    }

    /// An approval's deadline: armed here and, through the commit's message, on every other replica.
    fn expiry_armed(&mut self, approval: &countersign_core::domain::Approval) {
        self.expiries.push((approval.org_id.clone(), approval.id.clone(), approval.expires_at));
    }

    async fn commit(mut self, gateway: &Gateway) -> Result<()> {
        if self.audit_failed {
            return Err(Error::Internal(
                "an audit append failed in this transaction; nothing of it was committed".into(),
            ));
        }
        let mut audit: Vec<(OrgId, i64)> = Vec::new();
        for event in &self.events {
            match audit.iter_mut().find(|(org, _)| *org == event.org_id) {
                Some(entry) => entry.1 = entry.1.max(event.seq),
                None => audit.push((event.org_id.clone(), event.seq)),
            }
        }
        let mut changes = notify::Changes {
            replica: gateway.inner.jobs.owner.clone(),
            actions: std::mem::take(&mut self.changed),
            jobs: std::mem::take(&mut self.jobs_changed),
            audit,
            jobs_added: self.jobs_added,
            expiries: std::mem::take(&mut self.expiries),
            everything: false,
            principals: self.principals,
            policies: std::mem::take(&mut self.policies),
        };
        // Told before the delivery fan-out reads the webhooks, so on PostgreSQL the message goes with the audit
        // rows and that read in one statement; the delivery jobs, if any, are told in a message of their own.
        if !changes.is_empty() {
            self.tx.publish(&changes.to_wire()).await?;
        }
        let emitted = std::mem::take(&mut self.emitted);
        webhooks::enqueue_deliveries(&mut self, emitted, gateway).await?;
        if !self.jobs_changed.is_empty() {
            let deliveries = notify::Changes {
                replica: changes.replica.clone(),
                jobs: std::mem::take(&mut self.jobs_changed),
                jobs_added: true,
                ..notify::Changes::default()
            };
            self.tx.publish(&deliveries.to_wire()).await?;
            changes.jobs.extend(deliveries.jobs);
            changes.jobs_added = true;
        }
        // The commit and what follows it run on a task of their own: a caller that goes away while the commit
        // waits for its sync cannot skip the wake-ups, the expiry timers or forgetting revoked credentials.
        let (gateway, tx, deferred) = (gateway.clone(), self.tx, self.deferred);
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let committed = tx.commit().await;
            if committed.is_ok() {
                gateway.metrics().observe_commit(deferred, started.elapsed());
            }
            if changes.principals {
                // Even when the commit reported an error: it may have landed all the same.
                gateway.inner.auth_cache.forget_all();
            }
            // Armed even when the commit reported an error, for the same reason: a timer for an approval that
            // does not exist, or was decided, finds it settled and ends.
            for (org_id, approval_id, expires_at) in std::mem::take(&mut changes.expiries) {
                let _ = gateway.inner.expiry.send(ExpiryRequest { org_id, approval_id, expires_at });
            }
            committed?;
            gateway.inner.notifier.publish(&changes);
            if changes.jobs_added {
                gateway.inner.jobs_added.notify_one();
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("a commit stopped: {e}")))?
    }
}
