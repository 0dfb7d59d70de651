//! The `Store` trait: everything the gateway keeps, behind one interface that SQLite and PostgreSQL both
//! implement.
//!
//! Work happens in a transaction ([`StoreTx`]): the gateway changes a record and appends its audit events in
//! the same transaction, so either both land or neither does. There is deliberately no method that updates
//! or deletes an audit event. Every query that reads tenant data takes the org id.

use chrono::{DateTime, Utc};

use crate::audit::{AuditEvent, NewAuditEvent};
use crate::checkpoint::Checkpoint;
use crate::domain::{
    Action, Agent, ApiKey, Approval, DashboardSession, DecisionRecord, Delivery, Job, JobKind, Org, Session,
    StoredPolicy, User, Webhook,
};
use crate::ids::{ActionId, AgentId, ApprovalId, JobId, KeyId, OrgId, SessionId, UserId, WebhookId};
use crate::state::{ActionState, ApprovalStatus, JobState};

/// Why the store could not do what was asked. Carries text, never a driver's error type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was broken (a name already taken, a user deciding twice, …).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database cannot be reached or is too busy; the caller may retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug, corrupt data, a failed migration.
    #[error("store error: {0}")]
    Internal(String),
    /// A conditional write ([`StoreTx::end_action`], [`StoreTx::end_queued_job`]) found its row no longer in
    /// the state it expected: someone changed it since its caller last saw it. The transaction can only roll
    /// back; the caller may read the row and decide again.
    #[error("changed meanwhile: {0}")]
    Stale(String),
}

/// How a queued job ended without the runner ([`StoreTx::end_queued_job`]): the live connection that
/// carried out an execution settles its recovery job with the action's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEnd {
    pub org_id: OrgId,
    pub id: JobId,
    /// `succeeded` or `failed`.
    pub state: JobState,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// How many bytes of actions' stored text (parameters, reasoning, target, result and error) one page of
/// actions or of approvals carries, whatever its limit; its first row comes whatever its size. Without it a
/// page of 1,000 model calls of up to 16 MiB each would be read into memory, and serialized, at once.
pub const PAGE_BYTES: i64 = 4 * 1024 * 1024;

/// One page of a list that stops at [`PAGE_BYTES`].
#[derive(Debug, Clone, PartialEq)]
pub struct Listed<T> {
    pub items: Vec<T>,
    /// The page stopped before its limit at [`PAGE_BYTES`]: more rows follow.
    pub cut: bool,
}

/// One page of a list, and where the next one starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub limit: u32,
    /// Opaque to callers; for the store, the last id (or seq) of the previous page.
    pub after: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActionFilter {
    pub state: Option<ActionState>,
    pub agent_id: Option<AgentId>,
    pub capability: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Exact event action, or a prefix when it ends with `.*` (`approval.*`).
    pub action: Option<String>,
    /// Actor id.
    pub actor: Option<String>,
    /// Any of these subject ids.
    pub subjects: Vec<String>,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub kind: Option<JobKind>,
    pub state: Option<JobState>,
    pub subject: Option<String>,
    /// Only the executions (`action.execute`) of this agent's actions: what an agent may see.
    pub agent: Option<AgentId>,
}

/// The newest event of an org's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    pub seq: i64,
    pub hash: String,
    pub time: DateTime<Utc>,
}

/// An org's audit retention: the window in days (none: keep forever) and how far it has deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub org_id: OrgId,
    pub days: Option<u32>,
    pub deleted_upto: i64,
}

/// A pending approval's deadline, for the expiry timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDeadline {
    pub org_id: OrgId,
    pub approval_id: ApprovalId,
    pub expires_at: DateTime<Utc>,
}

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// A transaction that may write. Writers are serialised per backend as needed.
    async fn write(&self) -> Result<Box<dyn StoreTx>, StoreError>;
    /// A transaction that only reads.
    async fn read(&self) -> Result<Box<dyn StoreTx>, StoreError>;
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Returns once every commit made so far is on disk, those whose sync was deferred
    /// ([`StoreTx::defer_sync`]) included. A store whose every commit syncs answers at once.
    async fn durable(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Which backend this is, for logs and metrics.
    fn backend(&self) -> &'static str;
}

#[async_trait::async_trait]
pub trait StoreTx: Send {
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;

    /// With `true`, lets this write transaction's commit return before it is on disk: it is still ordered
    /// before every later commit and on disk before any later durable commit (or [`Store::durable`]) returns.
    /// For a change whose caller answers only after a second write that waits (a model call's claim, then its
    /// finish). The last word before the commit counts (`false` takes it back), but it is best said before the
    /// transaction's first statement too: SQLite may otherwise have begun it to sync its commit.
    ///
    /// On SQLite the sync follows soon after, detached; no read returns before it, and a crash of the process
    /// alone does not lose the commit (a power loss can). On PostgreSQL the commit is asynchronous: other
    /// transactions may read it before it is on disk, and a crash of the server (not of this process) can lose
    /// it until the WAL writer or a later commit flushes it. A store that always syncs ignores it.
    fn defer_sync(&mut self, _defer: bool) {}

    /// Tells the other replicas on this database about the transaction's changes, delivered only if it
    /// commits (PostgreSQL `NOTIFY`). A single-process store has no one to tell.
    async fn publish(&mut self, _message: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// The public key (standard base64) this database's audit checkpoints are signed with, once recorded.
    /// Only the public half is ever stored: the private key is each replica's `audit-signing.key`.
    async fn audit_public_key(&mut self) -> Result<Option<String>, StoreError>;

    /// Records `candidate` as the audit public key unless one is recorded already, and answers the recorded
    /// one: the first recorded wins, so a replica or a restart with another key can be refused.
    async fn record_audit_public_key(&mut self, candidate: &str) -> Result<String, StoreError>;

    /// The private signing key that earlier versions kept in the database for PostgreSQL replicas to share,
    /// if it is still there: read only so that a replica without a key file can write it to one. `None` on a
    /// store that never held one.
    async fn legacy_signing_key(&mut self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    // Orgs and principals.
    async fn count_orgs(&mut self) -> Result<i64, StoreError>;
    async fn list_orgs(&mut self) -> Result<Vec<Org>, StoreError>;
    async fn insert_org(&mut self, org: &Org) -> Result<(), StoreError>;
    async fn get_org(&mut self, id: &OrgId) -> Result<Option<Org>, StoreError>;
    async fn insert_user(&mut self, user: &User) -> Result<(), StoreError>;
    async fn get_user(&mut self, org: &OrgId, id: &UserId) -> Result<Option<User>, StoreError>;
    async fn find_user_by_name(&mut self, org: &OrgId, name: &str) -> Result<Option<User>, StoreError>;
    async fn list_users(&mut self, org: &OrgId) -> Result<Vec<User>, StoreError>;
    /// Disables an active user and revokes the sessions minted with its keys: `None` when no active user has
    /// this id in the org, else the ids of the sessions it ended.
    async fn disable_user(
        &mut self,
        org: &OrgId,
        id: &UserId,
        at: DateTime<Utc>,
    ) -> Result<Option<Vec<SessionId>>, StoreError>;
    async fn insert_agent(&mut self, agent: &Agent) -> Result<(), StoreError>;
    async fn get_agent(&mut self, org: &OrgId, id: &AgentId) -> Result<Option<Agent>, StoreError>;
    async fn find_agent_by_name(&mut self, org: &OrgId, name: &str) -> Result<Option<Agent>, StoreError>;
    async fn list_agents(&mut self, org: &OrgId) -> Result<Vec<Agent>, StoreError>;
    async fn disable_agent(&mut self, org: &OrgId, id: &AgentId, at: DateTime<Utc>) -> Result<bool, StoreError>;

    // Keys and sessions. Lookup by hash is global: the secret names its org.
    async fn insert_key(&mut self, key: &ApiKey) -> Result<(), StoreError>;
    async fn find_key_by_hash(&mut self, hash: &str) -> Result<Option<ApiKey>, StoreError>;
    async fn list_keys(&mut self, org: &OrgId) -> Result<Vec<ApiKey>, StoreError>;
    async fn get_key(&mut self, org: &OrgId, id: &KeyId) -> Result<Option<ApiKey>, StoreError>;
    /// Revokes an active key and the sessions minted with it: `None` when no active key has this id in the
    /// org, else the ids of the sessions it ended.
    async fn revoke_key(
        &mut self,
        org: &OrgId,
        id: &KeyId,
        at: DateTime<Utc>,
    ) -> Result<Option<Vec<SessionId>>, StoreError>;
    async fn insert_session(&mut self, session: &Session) -> Result<(), StoreError>;
    async fn find_session_by_hash(&mut self, hash: &str) -> Result<Option<Session>, StoreError>;
    async fn list_sessions(&mut self, org: &OrgId, agent: Option<&AgentId>) -> Result<Vec<Session>, StoreError>;
    async fn revoke_session(&mut self, org: &OrgId, id: &SessionId, at: DateTime<Utc>) -> Result<bool, StoreError>;

    // Dashboard logins.
    async fn insert_dashboard_session(&mut self, session: &DashboardSession) -> Result<(), StoreError>;
    /// By the SHA-256 of the cookie token, in any org (the token names its org, as a key does).
    async fn find_dashboard_session(&mut self, token_hash: &str) -> Result<Option<DashboardSession>, StoreError>;
    /// Records that the session was used at `at`; false when the org has no such unrevoked session.
    async fn touch_dashboard_session(
        &mut self,
        org: &OrgId,
        token_hash: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// Logout: false when the org has no such unrevoked session.
    async fn revoke_dashboard_session(
        &mut self,
        org: &OrgId,
        token_hash: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
    /// Across all orgs: deletes the sessions whose lifetime ended before `now`, revoked or not; answers how
    /// many went.
    async fn delete_expired_dashboard_sessions(&mut self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    // Actions.
    async fn insert_action(&mut self, action: &Action) -> Result<(), StoreError>;
    /// Writes the mutable fields: state, verdict, approval, result, error and times.
    async fn update_action(&mut self, action: &Action) -> Result<(), StoreError>;
    /// Writes an execution's outcome (state, result, error, `finished_at`) only if the stored action is still
    /// in state `from`, without reading it first: the caller knows the row (it claimed it, or read it in this
    /// transaction). A row no longer in `from`, or gone, fails the transaction with [`StoreError::Stale`]
    /// (here, or at its next statement or commit where writes are sent together), and it can only roll back.
    async fn end_action(&mut self, action: &Action, from: ActionState) -> Result<(), StoreError>;
    async fn get_action(&mut self, org: &OrgId, id: &ActionId) -> Result<Option<Action>, StoreError>;
    async fn find_action_by_idempotency_key(
        &mut self,
        org: &OrgId,
        agent: &AgentId,
        key: &str,
    ) -> Result<Option<Action>, StoreError>;
    /// Newest first, up to [`PAGE_BYTES`].
    async fn list_actions(
        &mut self,
        org: &OrgId,
        filter: &ActionFilter,
        page: &Page,
    ) -> Result<Listed<Action>, StoreError>;
    /// The agent's earlier successes on the capability, counted up to [`crate::risk::PRECEDENT_CAP`]: never
    /// more than that, so a submission costs the same at any history. A success is an action that
    /// succeeded, or a record-only one (no target) that people approved (it has an approval). A record-only
    /// action the policy allowed by itself does not count: an agent could farm precedent with no-ops.
    async fn count_successes(&mut self, org: &OrgId, agent: &AgentId, capability: &str) -> Result<u64, StoreError>;

    // Approvals.
    async fn insert_approval(&mut self, approval: &Approval) -> Result<(), StoreError>;
    /// Writes status and decided_at.
    async fn update_approval(&mut self, approval: &Approval) -> Result<(), StoreError>;
    async fn insert_decision(
        &mut self,
        org: &OrgId,
        approval: &ApprovalId,
        decision: &DecisionRecord,
    ) -> Result<(), StoreError>;
    async fn get_approval(&mut self, org: &OrgId, id: &ApprovalId) -> Result<Option<Approval>, StoreError>;
    async fn find_approval_by_token_hash(&mut self, hash: &str) -> Result<Option<Approval>, StoreError>;
    /// Pending ones oldest first; decided ones newest first; up to [`PAGE_BYTES`] of their actions.
    async fn list_approvals(
        &mut self,
        org: &OrgId,
        status: Option<ApprovalStatus>,
        page: &Page,
    ) -> Result<Listed<Approval>, StoreError>;
    async fn count_pending_approvals(&mut self) -> Result<i64, StoreError>;
    /// Across all orgs, for arming expiry timers at start.
    async fn list_pending_deadlines(&mut self) -> Result<Vec<PendingDeadline>, StoreError>;

    // Audit.
    /// Appends after the org's current head and returns the sealed event.
    async fn append_audit(&mut self, org: &OrgId, event: NewAuditEvent) -> Result<AuditEvent, StoreError>;
    /// In seq order, after `after_seq`.
    async fn list_audit(
        &mut self,
        org: &OrgId,
        filter: &AuditFilter,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;
    /// Newest first: the events before `before_seq` (all of them when `None`), in descending seq order.
    async fn list_audit_newest(
        &mut self,
        org: &OrgId,
        filter: &AuditFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError>;

    /// The newest event of the org's chain, if it has any.
    async fn audit_head(&mut self, org: &OrgId) -> Result<Option<AuditHead>, StoreError>;
    /// The largest seq such that every event of the org up to it is older than `before`: the seq before the
    /// first event at or after `before`, or the head when there is none; `None` when there is no such seq (no
    /// events, or seq 1 is that new). Event times do not strictly grow with seq (a writer reads the clock
    /// before it waits for its turn; replicas' clocks drift), so the newest old event is not the answer.
    async fn last_audit_seq_before(&mut self, org: &OrgId, before: DateTime<Utc>) -> Result<Option<i64>, StoreError>;

    // Signed checkpoints and retention.
    /// Stores the checkpoint unless one is already stored at its (org, seq): then the stored one is kept and
    /// this is not an error (two replicas may sign the same head). Read it back with `checkpoint_at`.
    async fn insert_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), StoreError>;
    async fn checkpoint_at(&mut self, org: &OrgId, seq: i64) -> Result<Option<Checkpoint>, StoreError>;
    /// The org's checkpoints with `after_seq < seq <= upto_seq`, in seq order, at most `limit`.
    async fn list_checkpoints(
        &mut self,
        org: &OrgId,
        after_seq: i64,
        upto_seq: i64,
        limit: u32,
    ) -> Result<Vec<Checkpoint>, StoreError>;
    async fn retention(&mut self, org: &OrgId) -> Result<Retention, StoreError>;
    /// Across all orgs that have a window.
    async fn list_retention_windows(&mut self) -> Result<Vec<Retention>, StoreError>;
    async fn set_retention_days(&mut self, org: &OrgId, days: Option<u32>) -> Result<(), StoreError>;
    /// Deletes the org's events up to `upto_seq`. A checkpoint at `upto_seq` must already be stored; the
    /// schema refuses any other delete. Returns how many events went.
    async fn delete_audit_prefix(&mut self, org: &OrgId, upto_seq: i64) -> Result<u64, StoreError>;

    // Jobs.
    async fn insert_job(&mut self, job: &Job) -> Result<(), StoreError>;
    /// Writes state, attempts, run_at, lease, progress, result, error and times.
    async fn update_job(&mut self, job: &Job) -> Result<(), StoreError>;
    /// Ends a job as `end` says, with one attempt more, only if it is still queued, without reading it first;
    /// otherwise fails as [`StoreTx::end_action`] does.
    async fn end_queued_job(&mut self, end: &JobEnd) -> Result<(), StoreError>;
    async fn get_job(&mut self, org: &OrgId, id: &JobId) -> Result<Option<Job>, StoreError>;
    /// The job `job` names (none without one), then the action: in that order, the order cancelling a job
    /// takes, so a backend that locks what it reads locks them alike. One round trip where the backend can.
    async fn get_job_and_action(
        &mut self,
        org: &OrgId,
        job: Option<&JobId>,
        action: &ActionId,
    ) -> Result<(Option<Job>, Option<Action>), StoreError> {
        let job = match job {
            Some(id) => self.get_job(org, id).await?,
            None => None,
        };
        Ok((job, self.get_action(org, action).await?))
    }
    /// Newest first.
    async fn list_jobs(&mut self, org: &OrgId, filter: &JobFilter, page: &Page) -> Result<Vec<Job>, StoreError>;
    /// Across all orgs: takes the oldest due job — queued with `run_at` passed, or running with a lease that
    /// ran out — marks it running under `owner` until `lease_until` and counts the attempt.
    async fn claim_job(
        &mut self,
        now: DateTime<Utc>,
        owner: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<Job>, StoreError>;
    /// When the next queued job falls due or the next lease runs out.
    async fn next_job_due(&mut self) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// Extends the lease if `owner` still holds it; false when it was lost.
    async fn renew_job_lease(&mut self, id: &JobId, owner: &str, until: DateTime<Utc>) -> Result<bool, StoreError>;
    /// Every running job's lease ends now (a single-process store at start: their holder is gone).
    async fn release_job_leases(&mut self, now: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Queued and running jobs by kind and state, for metrics.
    async fn count_open_jobs(&mut self) -> Result<Vec<(JobKind, JobState, i64)>, StoreError>;

    // Webhooks.
    async fn insert_webhook(&mut self, webhook: &Webhook) -> Result<(), StoreError>;
    /// Deleted ones too (their history stays readable).
    async fn get_webhook(&mut self, org: &OrgId, id: &WebhookId) -> Result<Option<Webhook>, StoreError>;
    /// Live ones, oldest first.
    async fn list_webhooks(&mut self, org: &OrgId) -> Result<Vec<Webhook>, StoreError>;
    async fn delete_webhook(&mut self, org: &OrgId, id: &WebhookId, at: DateTime<Utc>) -> Result<bool, StoreError>;
    async fn insert_delivery(&mut self, delivery: &Delivery) -> Result<(), StoreError>;
    /// Newest first.
    async fn list_deliveries(
        &mut self,
        org: &OrgId,
        webhook: &WebhookId,
        page: &Page,
    ) -> Result<Vec<Delivery>, StoreError>;

    // Policy versions.
    async fn insert_policy(&mut self, policy: &StoredPolicy) -> Result<(), StoreError>;
    async fn current_policy(&mut self, org: &OrgId) -> Result<Option<StoredPolicy>, StoreError>;
}
