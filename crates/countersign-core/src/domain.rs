//! The records the product keeps: orgs, users, agents, keys, sessions, actions, approvals and decisions,
//! and the execution target of an action.
//!
//! These are domain types, not wire DTOs: the HTTP layer converts them explicitly. Nothing here does IO.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::capability::{Capability, NameGlob};
use crate::ids::{ActionId, AgentId, ApprovalId, DeliveryId, JobId, KeyId, OrgId, SessionId, UserId, WebhookId};
use crate::policy::Verdict;
use crate::risk::RiskAssessment;
use crate::state::{ActionState, ApprovalStatus, Decision, JobState};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Org {
    pub id: OrgId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Approver,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Approver => "approver",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "admin" => Some(Role::Admin),
            "approver" => Some(Role::Approver),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub org_id: OrgId,
    pub name: String,
    pub role: Role,
    /// The bootstrap admin: may create further orgs.
    pub instance_admin: bool,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub id: AgentId,
    pub org_id: OrgId,
    pub name: String,
    /// A user whose approval never counts toward this agent's quorum.
    pub owner: Option<UserId>,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
}

/// Who a key or session stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalRef {
    User(UserId),
    Agent(AgentId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: KeyId,
    pub org_id: OrgId,
    pub principal: PrincipalRef,
    pub hash: String,
    pub prefix: String,
    pub last_four: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: SessionId,
    pub org_id: OrgId,
    pub agent_id: AgentId,
    pub hash: String,
    pub scopes: Vec<NameGlob>,
    /// `user:<id>` or `agent:<id>` of whoever minted it.
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The API key it was minted with, if any: revoking that key revokes this session, and the session
    /// never outlives the key's expiry.
    pub minted_with: Option<KeyId>,
}

impl Session {
    pub fn allows(&self, capability: &Capability) -> bool {
        self.scopes.iter().any(|scope| scope.matches(capability.as_str()))
    }
}

/// A person's login to the dashboard. The browser's cookie holds a random token; only its SHA-256 is kept,
/// so a copy of the table cannot be replayed as a cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardSession {
    /// SHA-256 of the cookie token: the lookup key.
    pub token_hash: String,
    pub org_id: OrgId,
    pub user_id: UserId,
    /// SHA-256 of the user key that logged in (the hash `api_keys` already holds). Every request resolves
    /// it again, so revoking the key or disabling the user ends the session.
    pub key_hash: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// Set by logout.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// How an action is carried out once allowed. Absent: record-only, the agent acts itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "connector", rename_all = "snake_case")]
pub enum Target {
    Http(HttpTarget),
    /// Made by the LLM proxy: a model request frozen as the agent sent it.
    Llm(LlmTarget),
    /// Made by the MCP gateway: a `tools/call` on an upstream MCP server, frozen as the agent sent it.
    Mcp(McpTarget),
}

/// A tool call on an upstream MCP server named under `[mcp_servers.NAME]` in the server configuration. The
/// upstream's credentials (headers, environment) come from the configuration; they are never part of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpTarget {
    /// The upstream's name in the configuration.
    pub server: String,
    /// The tool's name as the upstream lists it (without the `NAME__` prefix the gateway shows).
    pub tool: String,
    /// The call's arguments exactly as the agent sent them: a JSON object.
    pub arguments: Value,
}

impl McpTarget {
    /// Checks what serde cannot: the server name, the tool name and the arguments.
    pub fn validate(&self) -> Result<(), String> {
        if self.server.is_empty()
            || self.server.contains("__")
            || self.server.ends_with('_')
            || !self.server.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "target.server `{}` must be an MCP server name ([A-Za-z0-9_-], no `__`, not ending in `_`)",
                self.server
            ));
        }
        if self.tool.is_empty() || self.tool.len() > 256 || self.tool.chars().any(char::is_control) {
            return Err(format!("target.tool `{}` must be a tool name (1 to 256 printable characters)", self.tool));
        }
        if !self.arguments.is_object() {
            return Err("target.arguments must be a JSON object".into());
        }
        Ok(())
    }
}

/// The client headers the LLM proxy passes on to a provider: they pick API versions and beta features.
/// Credentials and everything else stay the gateway's.
pub const LLM_FORWARDED_HEADERS: [&str; 3] = ["anthropic-beta", "anthropic-version", "openai-beta"];

/// A request to a model provider named under `[llm.NAME]` in the server configuration. The provider's key
/// is added from the configuration when it is sent; it is never part of the frozen request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmTarget {
    pub provider: String,
    /// The path on the provider's base URL, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The request body exactly as the agent sent it.
    pub body: Value,
    /// The client's provider headers that change what the request does (`anthropic-beta`,
    /// `anthropic-version`, `openai-beta`), lowercased; frozen with the body so an approval binds them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// A client holds its connection open for the answer: once approved, the execution job waits a grace
    /// period so that the live connection can carry the request out (and stream it) itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
}

impl LlmTarget {
    /// Checks what serde cannot: the provider name, the path shape and the body.
    pub fn validate(&self) -> Result<(), String> {
        if self.provider.is_empty() || !self.provider.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!("target.provider `{}` must be a provider name ([A-Za-z0-9_-])", self.provider));
        }
        if !self.path.starts_with("/v1/") || self.path.contains("..") || self.path.contains("//") {
            return Err(format!("target.path `{}` must be a provider path under /v1/ (no `..`)", self.path));
        }
        if !self.body.is_object() {
            return Err("target.body must be a JSON object".into());
        }
        if let Some(name) = self.headers.keys().find(|name| !LLM_FORWARDED_HEADERS.contains(&name.as_str())) {
            return Err(format!(
                "target.headers: `{name}` is not forwarded to a model provider (only {})",
                LLM_FORWARDED_HEADERS.join(", ")
            ));
        }
        Ok(())
    }
}

/// A request against an upstream named in the server configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTarget {
    pub upstream: String,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

/// Headers an agent may not set on a frozen request: credentials come from the server configuration;
/// framing, hop-by-hop and idempotency headers are the gateway's; and the forwarding and override family
/// would let a request a human approved as one thing be routed or read upstream as another (another host or
/// tenant behind a proxy that trusts them, a spoofed client address, a `DELETE` sent as the approved `POST`).
pub const FORBIDDEN_TARGET_HEADERS: [&str; 23] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "idempotency-key",
    "x-api-key",
    "forwarded",
    "via",
    "x-real-ip",
    "x-client-ip",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// Header name prefixes refused the same way: `x-forwarded-for`, `-host`, `-proto`, `-port`, `-prefix`, ….
pub const FORBIDDEN_TARGET_HEADER_PREFIXES: [&str; 1] = ["x-forwarded-"];

impl HttpTarget {
    /// Checks what serde cannot: the method, the path shape and the headers.
    pub fn validate(&self) -> Result<(), String> {
        const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
        if !METHODS.contains(&self.method.as_str()) {
            return Err(format!("target.method `{}` must be one of {}", self.method, METHODS.join(", ")));
        }
        // URL parsing reads `%2e` as `.` and `\` as `/`, so those spellings of `..` are refused too.
        let lowered = self.path.to_ascii_lowercase();
        if !self.path.starts_with('/')
            || self.path.starts_with("//")
            || self.path.contains("..")
            || self.path.contains('\\')
            || self.path.chars().any(char::is_control)
            || lowered.contains("%2e")
        {
            return Err(format!(
                "target.path `{}` must be an absolute path on the upstream (start with `/`; no `..`, `%2e`, `\\` or control characters)",
                self.path
            ));
        }
        let forbidden = |name: &str| {
            let name = name.to_ascii_lowercase();
            FORBIDDEN_TARGET_HEADERS.contains(&name.as_str())
                || FORBIDDEN_TARGET_HEADER_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
        };
        if let Some(name) = self.headers.keys().find(|name| forbidden(name)) {
            return Err(format!(
                "target.headers may not set `{name}`: credentials, framing, forwarding and method-override headers \
                 are the gateway's and the server configuration's"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub id: ActionId,
    pub org_id: OrgId,
    pub agent_id: AgentId,
    pub agent_name: String,
    pub session_id: Option<SessionId>,
    pub capability: Capability,
    pub params: Value,
    /// The agent's own account as raw JSON text, stored and served verbatim.
    pub reasoning: String,
    pub target: Option<Target>,
    pub idempotency_key: Option<String>,
    pub state: ActionState,
    pub verdict: Option<Verdict>,
    pub approval_id: Option<ApprovalId>,
    pub result: Option<Value>,
    pub error: Option<String>,
    /// SHA-256 of the canonical JSON of the frozen target (empty for record-only actions).
    pub request_hash: String,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The job that carries out an approved action with a target.
    pub job_id: Option<JobId>,
}

impl Action {
    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal(self.target.is_some())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecisionRecord {
    pub user_id: UserId,
    pub user_name: String,
    pub decision: Decision,
    pub note: Option<String>,
    pub counted: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Approval {
    pub id: ApprovalId,
    pub org_id: OrgId,
    pub action_id: ActionId,
    pub group: String,
    pub quorum: u32,
    pub status: ApprovalStatus,
    pub expires_at: DateTime<Utc>,
    pub token_hash: String,
    pub policy_version: String,
    pub request_hash: String,
    pub rule: String,
    pub snapshot: Option<Value>,
    pub risk: RiskAssessment,
    pub decisions: Vec<DecisionRecord>,
    pub created_at: DateTime<Utc>,
    pub decided_at: Option<DateTime<Utc>>,
}

impl Approval {
    /// Approvals from distinct users that count toward the quorum.
    pub fn counted_approvals(&self) -> u32 {
        let count = self.decisions.iter().filter(|d| d.decision == Decision::Approve && d.counted).count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }
}

/// A policy as stored: every loaded version is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPolicy {
    pub org_id: OrgId,
    pub version: String,
    /// `(file name, text)` pairs in load order.
    pub sources: Vec<(String, String)>,
    /// `file` for the configured policy, `api` for one set by `PUT /v1/policy`.
    pub origin: String,
    pub created_at: DateTime<Utc>,
}

/// What a job does. Each kind has one handler in the job runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    /// Carry out an approved action (subject: the action).
    #[serde(rename = "action.execute")]
    ActionExecute,
    /// Deliver one event to one webhook (subject: the webhook).
    #[serde(rename = "webhook.deliver")]
    WebhookDeliver,
    /// Write the org's audit log to a JSON Lines file with a signed checkpoint.
    #[serde(rename = "audit.export")]
    AuditExport,
    /// Delete the org's audit events older than its retention window, behind a signed checkpoint.
    #[serde(rename = "audit.retention")]
    AuditRetention,
}

impl JobKind {
    pub const ALL: [JobKind; 4] =
        [JobKind::ActionExecute, JobKind::WebhookDeliver, JobKind::AuditExport, JobKind::AuditRetention];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::ActionExecute => "action.execute",
            JobKind::WebhookDeliver => "webhook.deliver",
            JobKind::AuditExport => "audit.export",
            JobKind::AuditRetention => "audit.retention",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// One unit of asynchronous work, durable in the store and claimed with a lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub org_id: OrgId,
    pub kind: JobKind,
    /// The id of what the job is about (an action, a webhook, …).
    pub subject: Option<String>,
    pub state: JobState,
    /// How many times a worker has started it.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Not before this time (backoff between attempts).
    pub run_at: DateTime<Utc>,
    /// The worker holding it while `running`, and until when; a lease that ran out is taken up again.
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    /// What the handler needs, written at creation.
    pub payload: Value,
    pub progress: Option<Value>,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Job {
    pub fn new(org_id: OrgId, kind: JobKind, subject: Option<String>, payload: Value, now: DateTime<Utc>) -> Job {
        Job {
            id: JobId::new(),
            org_id,
            kind,
            subject,
            state: JobState::Queued,
            attempts: 0,
            max_attempts: 1,
            run_at: now,
            lease_owner: None,
            lease_until: None,
            payload,
            progress: None,
            result: None,
            error: None,
            created_at: now,
            started_at: None,
            finished_at: None,
        }
    }
}

/// How a webhook's body is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// `{id, type, created_at, org_id, data}`.
    Json,
    /// A Slack incoming-webhook message linking to the dashboard.
    Slack,
}

impl WebhookFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Json => "json",
            WebhookFormat::Slack => "slack",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "json" => Some(WebhookFormat::Json),
            "slack" => Some(WebhookFormat::Slack),
            _ => None,
        }
    }
}

/// A subscription: events matching any glob are delivered to the URL, signed with the secret.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub id: WebhookId,
    pub org_id: OrgId,
    pub url: String,
    pub events: Vec<NameGlob>,
    /// Kept in the clear: it signs every delivery. Shown once, at creation.
    pub secret: String,
    pub format: WebhookFormat,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

impl Webhook {
    pub fn wants(&self, event_type: &str) -> bool {
        self.deleted_at.is_none() && self.events.iter().any(|glob| glob.matches(event_type))
    }
}

/// One attempt to deliver one event to one webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub id: DeliveryId,
    pub org_id: OrgId,
    pub webhook_id: WebhookId,
    pub job_id: JobId,
    pub event_id: String,
    pub event_type: String,
    pub attempt: u32,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
}
