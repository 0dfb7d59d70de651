//! Short-lived session tokens (`cs_st_`) for one agent, limited to capability globs no wider than the
//! caller's, for at most 24 hours.
//!
//! A session cannot mint sessions or keys and cannot decide approvals; those checks live with the
//! operations themselves. This module mints, lists and revokes.

use chrono::Duration;
use countersign_core::capability::NameGlob;
use countersign_core::domain::{Agent, Session};
use countersign_core::ids::{AgentId, SessionId};
use countersign_core::secrets::{self, SecretKind};
use serde_json::json;

use super::{Caller, Gateway};
use crate::error::{Error, Result};

pub const DEFAULT_SESSION_TTL_SECONDS: u64 = 3600;
pub const MAX_SESSION_TTL_SECONDS: u64 = 24 * 3600;

#[derive(Debug, Clone)]
pub struct SessionRequest {
    /// Agent name or id; an agent caller may leave it out (itself).
    pub agent: Option<String>,
    pub ttl_seconds: Option<u64>,
    /// Capability globs; default everything the caller may do.
    pub scopes: Option<Vec<NameGlob>>,
    /// The SHA-256 of the API key the caller presented (REST) or logged in to the dashboard with: the
    /// session is tied to that key, revoked with it, and never valid past its expiry.
    pub minting_key_hash: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CreatedSession {
    pub session: Session,
    pub agent: Agent,
    pub token: String,
}

impl Gateway {
    pub async fn create_session(&self, caller: &Caller, request: SessionRequest) -> Result<CreatedSession> {
        let org = caller.org_id().clone();
        let now = self.now();
        // What the caller itself may do: API keys are unscoped.
        let caller_scopes: Vec<NameGlob> = vec![NameGlob::parse("*").map_err(|e| Error::Internal(e.to_string()))?];
        let mut tx = self.read().await?;
        let agent = match caller {
            Caller::Session { .. } => {
                return Err(Error::Forbidden("a session token cannot mint sessions; use an agent or admin key".into()));
            }
            Caller::Agent(me) => {
                if let Some(name) = &request.agent
                    && name != &me.name
                    && name != me.id.as_str()
                {
                    return Err(Error::Forbidden("an agent may mint sessions only for itself".into()));
                }
                me.clone()
            }
            Caller::User(_) => {
                caller.require_admin()?;
                let name = request
                    .agent
                    .as_deref()
                    .ok_or_else(|| Error::bad_request("agent", "missing field `agent`: the agent's name or id"))?;
                let found = match AgentId::parse(name) {
                    Some(id) => tx.get_agent(&org, &id).await?,
                    None => tx.find_agent_by_name(&org, name).await?,
                };
                found
                    .filter(|a| a.disabled_at.is_none())
                    .ok_or_else(|| Error::invalid("agent", format!("no agent `{name}`")))?
            }
        };
        drop(tx);
        let ttl = request.ttl_seconds.unwrap_or(DEFAULT_SESSION_TTL_SECONDS);
        if ttl == 0 || ttl > MAX_SESSION_TTL_SECONDS {
            return Err(Error::invalid(
                "ttl_seconds",
                format!("must be between 1 and {MAX_SESSION_TTL_SECONDS} (24 hours)"),
            ));
        }
        let scopes = request.scopes.unwrap_or_else(|| caller_scopes.clone());
        if scopes.is_empty() {
            return Err(Error::invalid("scopes", "must name at least one capability glob"));
        }
        if let Some(wide) = scopes.iter().find(|s| !caller_scopes.iter().any(|c| s.is_within(c))) {
            return Err(Error::Forbidden(format!("scope `{wide}` is wider than the caller's own scopes")));
        }
        let mut work = self.write().await?;
        // The key it is minted with, read in the transaction that inserts it (a revocation commits before
        // or after, never between): the session ends when the key is revoked, and never outlives it.
        let minting_key = match request.minting_key_hash.as_deref() {
            Some(hash) => work.tx.find_key_by_hash(hash).await?.filter(|k| secrets::hashes_equal(&k.hash, hash)),
            None => None,
        };
        // Revoked, expired, or its user or agent disabled since the request was authenticated.
        if let Some(key) = &minting_key {
            self.key_standing(&mut *work.tx, key)
                .await
                .map_err(|e| super::auth::restated(e, "the key this session would be minted with no longer works"))?;
        }
        let secret = secrets::generate(SecretKind::SessionToken);
        let created_by = match caller {
            Caller::User(u) => format!("user:{}", u.id),
            _ => format!("agent:{}", agent.id),
        };
        let ttl_i64 = i64::try_from(ttl).unwrap_or(i64::MAX);
        let mut expires_at = now + Duration::seconds(ttl_i64);
        if let Some(key_expiry) = minting_key.as_ref().and_then(|k| k.expires_at) {
            expires_at = expires_at.min(key_expiry);
        }
        let session = Session {
            id: SessionId::new(),
            org_id: org.clone(),
            agent_id: agent.id.clone(),
            hash: secret.hash,
            scopes,
            created_by,
            created_at: now,
            expires_at,
            revoked_at: None,
            minted_with: minting_key.map(|k| k.id),
        };
        work.tx.insert_session(&session).await?;
        let scope_names: Vec<&str> = session.scopes.iter().map(|s| s.as_str()).collect();
        work.audit(
            &org,
            now,
            &caller.actor(),
            "session.created",
            Some(session.id.as_str()),
            json!({"agent": agent.name, "scopes": scope_names, "expires_at": session.expires_at}),
        )
        .await?;
        work.commit(self).await?;
        Ok(CreatedSession { session, agent, token: secret.plaintext })
    }

    pub async fn list_sessions(&self, caller: &Caller) -> Result<Vec<Session>> {
        let filter = match caller {
            Caller::User(_) => {
                caller.require_admin()?;
                None
            }
            Caller::Agent(a) => Some(a.id.clone()),
            Caller::Session { .. } => return Err(Error::Forbidden("a session token cannot list sessions".into())),
        };
        Ok(self.read().await?.list_sessions(caller.org_id(), filter.as_ref()).await?)
    }

    pub async fn revoke_session(&self, caller: &Caller, id: &SessionId) -> Result<()> {
        let org = caller.org_id().clone();
        let now = self.now();
        let mut work = self.write().await?;
        let own_agent = match caller {
            Caller::User(_) => {
                caller.require_admin()?;
                None
            }
            Caller::Agent(a) => Some(a.id.clone()),
            // A runtime may end its own session (log out); no other.
            Caller::Session { session, agent } if &session.id == id => Some(agent.id.clone()),
            Caller::Session { .. } => {
                return Err(Error::Forbidden("a session token can revoke only itself".into()));
            }
        };
        let sessions = work.tx.list_sessions(&org, own_agent.as_ref()).await?;
        if !sessions.iter().any(|s| &s.id == id) {
            return Err(Error::not_found("session", id.as_str()));
        }
        if !work.tx.revoke_session(&org, id, now).await? {
            return Err(Error::Conflict {
                message: format!("session {id} is already revoked"),
                state: Some("revoked".into()),
            });
        }
        work.audit(&org, now, &caller.actor(), "session.revoked", Some(id.as_str()), json!({})).await?;
        work.principals_changed();
        work.commit(self).await
    }
}
