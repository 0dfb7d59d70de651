//! The records the product keeps: orgs, users, agents, keys, sessions, actions, approvals and decisions,
//! and the execution target of an action.
//!
//! These are domain types, not wire DTOs: the HTTP layer converts them explicitly. Nothing here does IO.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::capability::{Capability, NameGlob};
use crate::ids::{ActionId, AgentId, ApprovalId, KeyId, OrgId, SessionId, UserId};
use crate::policy::Verdict;
use crate::risk::RiskAssessment;
use crate::state::{ActionState, ApprovalStatus, Decision};

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
}

impl Session {
    pub fn allows(&self, capability: &Capability) -> bool {
        self.scopes.iter().any(|scope| scope.matches(capability.as_str()))
    }
}

/// How an action is carried out once allowed. Absent: record-only, the agent acts itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "connector", rename_all = "snake_case")]
pub enum Target {
    Http(HttpTarget),
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

/// Headers an agent may not set on a frozen request: credentials come from the server configuration, and
/// framing and idempotency headers are the gateway's.
pub const FORBIDDEN_TARGET_HEADERS: [&str; 9] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "idempotency-key",
    "x-api-key",
];

impl HttpTarget {
    /// Checks what serde cannot: the method, the path shape and the headers.
    pub fn validate(&self) -> Result<(), String> {
        const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
        if !METHODS.contains(&self.method.as_str()) {
            return Err(format!("target.method `{}` must be one of {}", self.method, METHODS.join(", ")));
        }
        if !self.path.starts_with('/') || self.path.starts_with("//") || self.path.contains("..") {
            return Err(format!(
                "target.path `{}` must be an absolute path on the upstream (start with `/`, no `..`)",
                self.path
            ));
        }
        if let Some(name) =
            self.headers.keys().find(|name| FORBIDDEN_TARGET_HEADERS.contains(&name.to_ascii_lowercase().as_str()))
        {
            return Err(format!(
                "target.headers may not set `{name}`: credentials and framing come from the server configuration"
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
