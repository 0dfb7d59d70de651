//! Turning a presented secret into a [`Caller`]: API keys (`cs_sk_`) and session tokens (`cs_st_`).
//!
//! Only hashes are looked up, and the stored hash is compared in constant time. Every failure answers the
//! same kind of 401 with a reason that helps the caller fix it without revealing whether a key exists.

use std::num::NonZeroU32;

use countersign_core::domain::PrincipalRef;
use countersign_core::secrets::{self, SecretKind};
use governor::clock::{Clock as _, DefaultClock};

use super::{Caller, Gateway};
use crate::config::RateLimitConfig;
use crate::error::{Error, Result};

/// Requests per principal, in memory: each replica limits what it serves.
pub type RateLimiter = governor::DefaultKeyedRateLimiter<String>;

pub fn rate_limiter(config: RateLimitConfig) -> Option<RateLimiter> {
    let per_second = NonZeroU32::new(config.per_second)?;
    let burst = NonZeroU32::new(config.burst.max(config.per_second)).unwrap_or(per_second);
    Some(governor::RateLimiter::keyed(governor::Quota::per_second(per_second).allow_burst(burst)))
}

impl Gateway {
    /// Refuses a principal that is over its rate with 429 and when to retry.
    pub fn check_rate(&self, caller: &Caller) -> Result<()> {
        let Some(limiter) = &self.inner.limiter else { return Ok(()) };
        let key = match caller {
            Caller::User(u) => u.id.to_string(),
            Caller::Agent(a) => a.id.to_string(),
            Caller::Session { session, .. } => session.id.to_string(),
        };
        match limiter.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(Error::RateLimited {
                    message: format!("too many requests from {key}; slow down and retry after {} ms", wait.as_millis()),
                    retry_after_seconds: wait.as_secs().max(1),
                })
            }
        }
    }

    pub async fn authenticate(&self, secret: &str) -> Result<Caller> {
        let now = self.now();
        let hash = secrets::hash_secret(secret);
        let mut tx = self.read().await?;
        match SecretKind::of(secret) {
            Some(SecretKind::ApiKey) => self.caller_for_key_hash(&mut *tx, &hash).await,
            Some(SecretKind::SessionToken) => {
                let session = tx
                    .find_session_by_hash(&hash)
                    .await?
                    .filter(|s| secrets::hashes_equal(&s.hash, &hash))
                    .ok_or_else(|| Error::Unauthenticated("unknown session token".into()))?;
                if session.revoked_at.is_some() {
                    return Err(Error::Unauthenticated("this session has been revoked".into()));
                }
                if session.expires_at <= now {
                    return Err(Error::Unauthenticated("this session has expired; mint a new one".into()));
                }
                let agent = tx
                    .get_agent(&session.org_id, &session.agent_id)
                    .await?
                    .filter(|a| a.disabled_at.is_none())
                    .ok_or_else(|| Error::Unauthenticated("the agent of this session is disabled".into()))?;
                Ok(Caller::Session { session, agent })
            }
            Some(SecretKind::ApprovalToken) => Err(Error::Unauthenticated(
                "an approval poll token (cs_ap_) only works on /v1/approval-status/{token}".into(),
            )),
            None => Err(Error::Unauthenticated(
                "expected `Authorization: Bearer` with a Countersign key (cs_sk_…) or session token (cs_st_…)".into(),
            )),
        }
    }

    /// The caller behind an API key, found by the key's SHA-256 (a dashboard session keeps only this hash, so
    /// a revoked key, an expired key or a disabled user ends the session at its next request).
    pub(super) async fn caller_for_key_hash(
        &self,
        tx: &mut dyn countersign_core::store::StoreTx,
        hash: &str,
    ) -> Result<Caller> {
        let now = self.now();
        let key = tx
            .find_key_by_hash(hash)
            .await?
            .filter(|k| secrets::hashes_equal(&k.hash, hash))
            .ok_or_else(|| Error::Unauthenticated("unknown API key".into()))?;
        if key.revoked_at.is_some() {
            return Err(Error::Unauthenticated("this API key has been revoked".into()));
        }
        if key.expires_at.is_some_and(|at| at <= now) {
            return Err(Error::Unauthenticated("this API key has expired".into()));
        }
        match &key.principal {
            PrincipalRef::User(id) => {
                let user = tx
                    .get_user(&key.org_id, id)
                    .await?
                    .filter(|u| u.disabled_at.is_none())
                    .ok_or_else(|| Error::Unauthenticated("the user of this key is disabled".into()))?;
                Ok(Caller::User(user))
            }
            PrincipalRef::Agent(id) => {
                let agent = tx
                    .get_agent(&key.org_id, id)
                    .await?
                    .filter(|a| a.disabled_at.is_none())
                    .ok_or_else(|| Error::Unauthenticated("the agent of this key is disabled".into()))?;
                Ok(Caller::Agent(agent))
            }
        }
    }
}
