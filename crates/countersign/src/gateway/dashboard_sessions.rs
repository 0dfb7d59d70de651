//! Dashboard logins kept in the store, so every replica on the database accepts the same cookie.
//!
//! A login stores the SHA-256 of a random cookie token (never the token), the user, and the SHA-256 of the
//! user key that logged in. Every request finds the row by the token's hash, compares in constant time,
//! checks expiry, idleness and logout, and resolves the key hash again, so revoking the key or disabling the user ends
//! the session at its next request. Expired rows are swept at each login. This module knows nothing of
//! cookies or CSRF; the dashboard adapter owns those.

use chrono::{DateTime, TimeDelta, Utc};
use countersign_core::domain::DashboardSession;
use countersign_core::secrets::{self, SecretKind};

use super::{Caller, Gateway};
use crate::error::{Error, Result};

/// A session ends this long after login, whatever happens.
pub const DASHBOARD_SESSION_LIFETIME: TimeDelta = TimeDelta::hours(12);
/// A session also ends after this long without a request, so a browser left open cannot be used to approve
/// for the rest of the day. Activity is recorded to the minute (below), so the limit holds to within one.
pub const DASHBOARD_SESSION_IDLE: TimeDelta = TimeDelta::minutes(30);
/// Last-seen is written at most this often per session, so reading pages costs no write each time.
const LAST_SEEN_GRANULARITY: TimeDelta = TimeDelta::minutes(1);

/// A fresh dashboard login: the cookie token (shown to the browser once) and when it ends.
#[derive(Clone)]
pub struct DashboardLogin {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for DashboardLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashboardLogin").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// A random token for a cookie (32 bytes, base64url, no prefix).
fn random_token() -> String {
    // The API-key generator is the one source of secret randomness; its prefix is not wanted here.
    let secret = secrets::generate(SecretKind::ApiKey).plaintext;
    secret.trim_start_matches(SecretKind::ApiKey.prefix()).to_owned()
}

impl Gateway {
    /// Starts a dashboard session for a user who presented `key` (already authenticated as `caller`).
    pub async fn start_dashboard_session(&self, caller: &Caller, key: &str) -> Result<DashboardLogin> {
        let user = caller.require_user()?;
        let now = self.now();
        let token = random_token();
        let session = DashboardSession {
            token_hash: secrets::hash_secret(&token),
            org_id: user.org_id.clone(),
            user_id: user.id.clone(),
            key_hash: secrets::hash_secret(key),
            created_at: now,
            expires_at: now + DASHBOARD_SESSION_LIFETIME,
            last_seen_at: now,
            revoked_at: None,
        };
        let mut work = self.write().await?;
        let swept = work.tx.delete_expired_dashboard_sessions(now).await?;
        work.tx.insert_dashboard_session(&session).await?;
        work.audit(
            &user.org_id,
            now,
            &caller.actor(),
            "dashboard.login",
            Some(user.id.as_str()),
            serde_json::json!({"expires_at": session.expires_at}),
        )
        .await?;
        work.commit(self).await?;
        tracing::debug!(user_id = %user.id, swept, "dashboard session started");
        Ok(DashboardLogin { token, expires_at: session.expires_at })
    }

    /// The user behind a dashboard cookie token, checked afresh: the session is live and not logged out, and
    /// the key that started it still authenticates that user. Answers the caller and the SHA-256 of the key
    /// it logged in with; the request counts as activity.
    /// `activity` is false for what a page fetches on its own (a timer, the live stream's nudge): those
    /// must not keep an idle session alive, or a page left open could be used to approve all day.
    pub async fn resume_dashboard_session(&self, token: &str, activity: bool) -> Result<(Caller, String)> {
        self.dashboard_session(token, activity).await
    }

    /// Whether a login still holds, checked the same way without counting as activity: a page's live
    /// stream asks this every few seconds, which must not keep an idle session alive.
    pub async fn dashboard_session_holds(&self, token: &str) -> bool {
        self.dashboard_session(token, false).await.is_ok()
    }

    async fn dashboard_session(&self, token: &str, activity: bool) -> Result<(Caller, String)> {
        let now = self.now();
        let hash = secrets::hash_secret(token);
        let mut tx = self.read().await?;
        let session = tx
            .find_dashboard_session(&hash)
            .await?
            .filter(|s| secrets::hashes_equal(&s.token_hash, &hash))
            .ok_or_else(|| Error::Unauthenticated("the dashboard session has ended; log in again".into()))?;
        if session.revoked_at.is_some() {
            return Err(Error::Unauthenticated("you logged out of this dashboard session; log in again".into()));
        }
        if session.expires_at <= now {
            return Err(Error::Unauthenticated("the dashboard session has expired; log in again".into()));
        }
        if now - session.last_seen_at >= DASHBOARD_SESSION_IDLE {
            return Err(Error::Unauthenticated(format!(
                "the dashboard session ended after {} minutes without a request; log in again",
                DASHBOARD_SESSION_IDLE.num_minutes()
            )));
        }
        let caller = self.caller_for_key_hash(&mut *tx, &session.key_hash).await?;
        drop(tx);
        match caller.user() {
            Some(user) if user.id == session.user_id && user.org_id == session.org_id => {}
            _ => return Err(Error::Unauthenticated("the dashboard is for users, not agents".into())),
        }
        if activity && now - session.last_seen_at >= LAST_SEEN_GRANULARITY {
            // Bookkeeping only: a failure here must not turn a good session away.
            if let Err(error) = self.touch_dashboard_session(&session, now).await {
                tracing::warn!(%error, "could not record dashboard session activity");
            }
        }
        Ok((caller, session.key_hash))
    }

    async fn touch_dashboard_session(&self, session: &DashboardSession, now: DateTime<Utc>) -> Result<()> {
        let mut work = self.write().await?;
        work.tx.touch_dashboard_session(&session.org_id, &session.token_hash, now).await?;
        work.commit(self).await
    }

    /// Logout: the token stops working on every replica at once.
    pub async fn end_dashboard_session(&self, caller: &Caller, token: &str) -> Result<()> {
        let hash = secrets::hash_secret(token);
        let now = self.now();
        let mut work = self.write().await?;
        if work.tx.revoke_dashboard_session(caller.org_id(), &hash, now).await? {
            let subject = caller.user().map(|u| u.id.to_string());
            work.audit(
                caller.org_id(),
                now,
                &caller.actor(),
                "dashboard.logout",
                subject.as_deref(),
                serde_json::json!({}),
            )
            .await?;
        }
        work.commit(self).await
    }
}
