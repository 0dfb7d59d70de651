//! Turning a presented secret into a [`Caller`]: API keys (`cs_sk_`) and session tokens (`cs_st_`).
//!
//! Only hashes are looked up, and the stored hash is compared in constant time. Every failure answers the
//! same kind of 401 with a reason that helps the caller fix it without revealing whether a key exists.
//! A caller resolved from the store is kept in [`AuthCache`] for a moment, so a busy agent's requests do not
//! each read the store; revoking or disabling anything empties it on every replica.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use countersign_core::domain::PrincipalRef;
use countersign_core::secrets::{self, SecretKind};
use governor::clock::{Clock as _, DefaultClock};

use super::{Caller, Gateway};
use crate::config::RateLimitConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Requests per principal, in memory: each replica limits what it serves.
pub type RateLimiter = governor::DefaultKeyedRateLimiter<String>;

pub fn rate_limiter(config: RateLimitConfig) -> Option<RateLimiter> {
    let per_second = NonZeroU32::new(config.per_second)?;
    let burst = NonZeroU32::new(config.burst.max(config.per_second)).unwrap_or(per_second);
    Some(governor::RateLimiter::keyed(governor::Quota::per_second(per_second).allow_burst(burst)))
}

/// The key a principal is limited by: a session is its agent's (minting sessions must not multiply what an
/// agent may do).
fn principal_key(caller: &Caller) -> String {
    match caller {
        Caller::User(u) => u.id.to_string(),
        Caller::Agent(agent) | Caller::Session { agent, .. } => agent.id.to_string(),
    }
}

/// The waits each principal holds open on this replica: long polls (`?wait=`, `…/wait`), held model and MCP
/// tool calls, audit and dashboard streams, and MCP resource subscriptions. Each keeps a connection or a task,
/// and wakes on every change of its kind (across orgs), so one key holding thousands would cost every change
/// thousands of wake-ups and the server as many sockets; past the limit a new wait answers 429.
pub struct OpenWaits {
    /// Zero: no limit (still counted).
    limit: usize,
    open: Mutex<HashMap<String, usize>>,
    /// `countersign_open_waits` and `countersign_open_waits_refused`.
    metrics: Metrics,
}

impl OpenWaits {
    pub fn new(limit: u32, metrics: Metrics) -> Arc<Self> {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Arc::new(OpenWaits { limit, open: Mutex::new(HashMap::new()), metrics })
    }

    fn open(self: &Arc<Self>, key: String) -> Result<WaitSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let held = open.entry(key.clone()).or_default();
        if self.limit > 0 && *held >= self.limit {
            self.metrics.wait_refused();
            return Err(Error::RateLimited {
                message: format!(
                    "{key} already holds {} waits open on this server (long polls, held calls, streams, \
                     subscriptions); let one end first, or ask without waiting and poll",
                    self.limit
                ),
                retry_after_seconds: 1,
            });
        }
        *held += 1;
        self.metrics.wait_open(true);
        Ok(WaitSlot { waits: Arc::clone(self), key })
    }
}

/// One open wait, counted until dropped.
pub struct WaitSlot {
    waits: Arc<OpenWaits>,
    key: String,
}

impl std::fmt::Debug for WaitSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WaitSlot").field("key", &self.key).finish()
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        let mut open = self.waits.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = open.get_mut(&self.key) {
            self.waits.metrics.wait_open(false);
            *held = held.saturating_sub(1);
            if *held == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Entries the cache holds at most; past that it starts over (a burst of distinct keys, or a scan).
const MAX_CACHED: usize = 10_000;

/// Callers recently resolved from the SHA-256 of their secret. An entry is served for at most the cache's
/// time to live and never past its key's or session's own expiry. Revoking a key or session, or disabling
/// an agent or user, empties the cache on this replica when it commits and, through the change feed, on
/// every other replica (which also empties it after losing the feed, since it may have missed a message).
/// A lookup that began before such a change cannot put its stale answer back: each entry carries the
/// generation it was read in, and emptying the cache moves the generation on.
pub struct AuthCache {
    ttl: Duration,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    generation: u64,
    entries: HashMap<String, Cached>,
}

struct Cached {
    caller: Caller,
    until: Instant,
    expires_at: Option<DateTime<Utc>>,
}

impl AuthCache {
    /// A zero `ttl` turns the cache off.
    pub fn new(ttl: Duration) -> Self {
        AuthCache { ttl, state: Mutex::new(CacheState::default()) }
    }

    fn get(&self, hash: &str, now: DateTime<Utc>, at: Instant) -> Option<Caller> {
        let state = self.state.lock().ok()?;
        let cached = state.entries.get(hash)?;
        (cached.until > at && cached.expires_at.is_none_or(|e| e > now)).then(|| cached.caller.clone())
    }

    fn generation(&self) -> Option<u64> {
        self.state.lock().ok().map(|s| s.generation)
    }

    fn put(&self, hash: String, caller: &Caller, expires_at: Option<DateTime<Utc>>, read_in: u64, at: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let Ok(mut state) = self.state.lock() else { return };
        if state.generation != read_in {
            return;
        }
        if state.entries.len() >= MAX_CACHED {
            state.entries.clear();
        }
        state.entries.insert(hash, Cached { caller: caller.clone(), until: at + self.ttl, expires_at });
    }

    /// Forgets every cached caller, including any a lookup now in flight would add.
    pub fn forget_all(&self) {
        match self.state.lock() {
            Ok(mut state) => {
                state.generation += 1;
                state.entries.clear();
            }
            // A poisoned lock serves nothing (`get` answers None), so there is nothing left to forget.
            Err(_) => tracing::error!("the credential cache's lock is poisoned; every request reads the store"),
        }
    }
}

/// A credential's 401 restated in the context it was checked in (`{context}: {why}`); other errors as they are.
pub(super) fn restated(error: Error, context: &str) -> Error {
    match error {
        Error::Unauthenticated(why) => Error::Unauthenticated(format!("{context}: {why}")),
        other => other,
    }
}

impl Gateway {
    /// Empties the credential cache (after the replica feed was lost and messages may have been missed).
    pub fn forget_cached_credentials(&self) {
        self.inner.auth_cache.forget_all();
    }

    /// Refuses a principal that is over its rate with 429 and when to retry.
    pub fn check_rate(&self, caller: &Caller) -> Result<()> {
        let Some(limiter) = &self.inner.limiter else { return Ok(()) };
        let key = principal_key(caller);
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

    /// Counts a wait the caller is about to hold open (see [`OpenWaits`]) until the slot is dropped; 429 when
    /// the caller already holds as many as it may (its only error).
    pub fn open_wait(&self, caller: &Caller) -> Result<WaitSlot> {
        self.inner.open_waits.open(principal_key(caller))
    }

    pub async fn authenticate(&self, secret: &str) -> Result<Caller> {
        let now = self.now();
        let hash = secrets::hash_secret(secret);
        // A replica that cannot hear the others would not hear a revocation either: it reads every credential.
        if self.replica_feed_deaf_for().is_some() {
            return Ok(self.resolve(secret, &hash, now).await?.0);
        }
        let cache = &self.inner.auth_cache;
        if let Some(caller) = cache.get(&hash, now, Instant::now()) {
            return Ok(caller);
        }
        let generation = cache.generation();
        let (caller, expires_at) = self.resolve(secret, &hash, now).await?;
        if let Some(generation) = generation {
            cache.put(hash, &caller, expires_at, generation, Instant::now());
        }
        Ok(caller)
    }

    /// [`Gateway::authenticate`] read from the store, never from the cache: what a long-lived stream asks after
    /// reading, so that a revocation its read saw (the cache forgets credentials only once the revoking commit
    /// has returned) is seen here too.
    pub async fn authenticate_uncached(&self, secret: &str) -> Result<Caller> {
        let hash = secrets::hash_secret(secret);
        Ok(self.resolve(secret, &hash, self.now()).await?.0)
    }

    /// Checks, from the store, that `secret` still stands: what a request that waited (a long poll, a held
    /// model call) asks before it answers or sends, so a credential revoked (or its principal disabled)
    /// meanwhile gets 401 instead of the outcome. (A secret always resolves to the same key or session, and
    /// so to the same principal: only whether it still works can change.)
    pub async fn still_stands(&self, secret: &str) -> Result<()> {
        self.authenticate_uncached(secret)
            .await
            .map(|_| ())
            .map_err(|e| restated(e, "this credential stopped working while the request waited"))
    }

    /// The caller behind a secret, read from the store, and when its key or session expires.
    async fn resolve(&self, secret: &str, hash: &str, now: DateTime<Utc>) -> Result<(Caller, Option<DateTime<Utc>>)> {
        // Refused before any store read: anyone reaching the port can send these.
        match SecretKind::of(secret) {
            Some(SecretKind::ApiKey) => {
                let mut tx = self.read().await?;
                return self.key_caller(&mut *tx, hash).await;
            }
            Some(SecretKind::SessionToken) => {}
            Some(SecretKind::ApprovalToken) => {
                return Err(Error::Unauthenticated(
                    "an approval poll token (cs_ap_) only works on /v1/approval-status/{token}".into(),
                ));
            }
            None => {
                return Err(Error::Unauthenticated(
                    "expected `Authorization: Bearer` with a Countersign key (cs_sk_…) or session token (cs_st_…)"
                        .into(),
                ));
            }
        }
        let mut tx = self.read().await?;
        let session = tx
            .find_session_by_hash(hash)
            .await?
            .filter(|s| secrets::hashes_equal(&s.hash, hash))
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
        // The key it was minted with must still stand, whatever the order of the commits that minted
        // the session and revoked the key or disabled its owner (on PostgreSQL a revocation's cascade
        // cannot see a session minted in a transaction still open).
        if let Some(id) = &session.minted_with {
            let key = tx.get_key(&session.org_id, id).await?.ok_or_else(|| {
                Error::Unauthenticated("the key this session was minted with no longer exists".into())
            })?;
            self.key_standing(&mut *tx, &key)
                .await
                .map_err(|e| restated(e, "the key this session was minted with no longer works"))?;
        }
        let expires_at = session.expires_at;
        Ok((Caller::Session { session: Box::new(session), agent }, Some(expires_at)))
    }

    /// The caller behind an API key, found by the key's SHA-256 (a dashboard session keeps only this hash, so
    /// a revoked key, an expired key or a disabled user ends the session at its next request).
    pub(super) async fn caller_for_key_hash(
        &self,
        tx: &mut dyn countersign_core::store::StoreTx,
        hash: &str,
    ) -> Result<Caller> {
        Ok(self.key_caller(tx, hash).await?.0)
    }

    /// [`Gateway::caller_for_key_hash`], and when the key expires.
    async fn key_caller(
        &self,
        tx: &mut dyn countersign_core::store::StoreTx,
        hash: &str,
    ) -> Result<(Caller, Option<DateTime<Utc>>)> {
        let key = tx
            .find_key_by_hash(hash)
            .await?
            .filter(|k| secrets::hashes_equal(&k.hash, hash))
            .ok_or_else(|| Error::Unauthenticated("unknown API key".into()))?;
        self.key_standing(tx, &key).await
    }

    /// The caller a key stands for, unless it is revoked or expired or its principal is disabled (401 naming
    /// which); and when it expires.
    pub(super) async fn key_standing(
        &self,
        tx: &mut dyn countersign_core::store::StoreTx,
        key: &countersign_core::domain::ApiKey,
    ) -> Result<(Caller, Option<DateTime<Utc>>)> {
        let now = self.now();
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
                Ok((Caller::User(user), key.expires_at))
            }
            PrincipalRef::Agent(id) => {
                let agent = tx
                    .get_agent(&key.org_id, id)
                    .await?
                    .filter(|a| a.disabled_at.is_none())
                    .ok_or_else(|| Error::Unauthenticated("the agent of this key is disabled".into()))?;
                Ok((Caller::Agent(agent), key.expires_at))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use countersign_core::domain::Agent;
    use countersign_core::ids::{AgentId, OrgId};

    use super::*;

    fn agent(name: &str) -> Caller {
        Caller::Agent(Agent {
            id: AgentId::new(),
            org_id: OrgId::new(),
            name: name.into(),
            owner: None,
            created_at: Utc::now(),
            disabled_at: None,
        })
    }

    fn name(caller: Option<Caller>) -> Option<String> {
        match caller {
            Some(Caller::Agent(a)) => Some(a.name),
            _ => None,
        }
    }

    #[test]
    fn entries_live_their_time_and_never_past_the_credentials_expiry() {
        let cache = AuthCache::new(Duration::from_secs(1));
        let (now, at) = (Utc::now(), Instant::now());
        let generation = cache.generation().unwrap();
        cache.put("h1".into(), &agent("a"), None, generation, at);
        cache.put("h2".into(), &agent("b"), Some(now + chrono::Duration::seconds(10)), generation, at);
        assert_eq!(name(cache.get("h1", now, at)), Some("a".into()));
        assert_eq!(name(cache.get("h2", now, at)), Some("b".into()));
        assert!(cache.get("h3", now, at).is_none());
        // Past the time to live.
        assert!(cache.get("h1", now, at + Duration::from_secs(1)).is_none());
        // Past the key's own expiry, though within the time to live.
        assert!(cache.get("h2", now + chrono::Duration::seconds(10), at).is_none());
    }

    #[test]
    fn forgetting_empties_it_and_a_lookup_from_before_cannot_refill_it() {
        let cache = AuthCache::new(Duration::from_secs(60));
        let (now, at) = (Utc::now(), Instant::now());
        let before = cache.generation().unwrap();
        cache.put("h1".into(), &agent("a"), None, before, at);
        cache.forget_all();
        assert!(cache.get("h1", now, at).is_none());
        // Read from the store before the revocation committed: not kept.
        cache.put("h1".into(), &agent("a"), None, before, at);
        assert!(cache.get("h1", now, at).is_none());
        cache.put("h1".into(), &agent("a"), None, cache.generation().unwrap(), at);
        assert!(cache.get("h1", now, at).is_some());
    }

    #[test]
    fn a_zero_time_to_live_keeps_nothing_and_the_size_is_bounded() {
        let (now, at) = (Utc::now(), Instant::now());
        let off = AuthCache::new(Duration::ZERO);
        off.put("h".into(), &agent("a"), None, off.generation().unwrap(), at);
        assert!(off.get("h", now, at).is_none());

        let cache = AuthCache::new(Duration::from_secs(60));
        let generation = cache.generation().unwrap();
        for i in 0..=MAX_CACHED {
            cache.put(format!("h{i}"), &agent("a"), None, generation, at);
        }
        let held = cache.state.lock().unwrap().entries.len();
        assert!(held <= MAX_CACHED, "{held} entries");
        assert!(cache.get(&format!("h{MAX_CACHED}"), now, at).is_some(), "the newest entry is kept");
    }
}
