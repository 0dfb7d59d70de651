//! The policies in force: one per org, compiled and cached, every loaded version kept in the store.
//!
//! An org follows the configured policy file (origin `file`) until an admin sets its own with
//! `PUT /v1/policy` (origin `api`). A reload that fails validation changes nothing: the running policy keeps
//! ruling. Reading files happens here; evaluating is the pure engine in `countersign_core::policy`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use countersign_core::audit::Actor;
use countersign_core::capability::Capability;
use countersign_core::domain::StoredPolicy;
use countersign_core::ids::OrgId;
use countersign_core::policy::{EvalInput, Facts, Policy, PolicyError, Verdict};
use serde_json::json;

use super::{Caller, Gateway, Work};
use crate::error::{Error, Result};

/// The example policy shipped with the product, used when none is configured.
pub const EXAMPLE_POLICY: &str = include_str!("../../../../policy/example.yaml");

/// A compiled policy and where it came from.
#[derive(Clone)]
pub struct ActivePolicy {
    pub policy: Arc<Policy>,
    pub origin: String,
}

pub struct PolicyRegistry {
    path: Option<PathBuf>,
    file_policy: RwLock<Arc<Policy>>,
    by_org: RwLock<HashMap<OrgId, ActivePolicy>>,
    /// Orgs left without a policy on purpose, and why (their stored policy no longer compiles, or could not
    /// be read): their actions are denied, and `GET /v1/policy` says why.
    refused: RwLock<HashMap<OrgId, Refusal>>,
    /// Orgs whose reload is being retried, so one retry runs per org.
    retrying: std::sync::Mutex<HashSet<OrgId>>,
    /// Held from reading (or committing) a policy to setting it here, so an older read cannot overwrite a
    /// newer policy. Taken before any store transaction, never inside one.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// A retry of the org list is running ([`Gateway::retry_listing_orgs`]).
    listing: std::sync::atomic::AtomicBool,
}

/// Why an org has no policy.
#[derive(Clone)]
pub(super) struct Refusal {
    message: String,
    /// The store could not be read (retried), rather than a stored policy that no longer compiles.
    transient: bool,
}

/// Reads a policy file, or every `.yaml`/`.yml` file of a folder in name order.
pub fn load_policy_path(path: &Path) -> std::result::Result<Policy, PolicyError> {
    let read_error =
        |message: String| PolicyError { file: path.display().to_string(), line: None, column: None, message };
    if path.is_dir() {
        let mut names: Vec<PathBuf> = Vec::new();
        // An entry that cannot be read fails the load: a folder read short could drop a deny rule.
        for entry in std::fs::read_dir(path).map_err(|e| read_error(format!("cannot read folder: {e}")))? {
            let name = entry.map_err(|e| read_error(format!("cannot read folder: {e}")))?.path();
            if name.extension().is_some_and(|ext| ext == "yaml" || ext == "yml") {
                names.push(name);
            }
        }
        names.sort();
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let text = std::fs::read_to_string(&name)
                .map_err(|e| read_error(format!("cannot read {}: {e}", name.display())))?;
            files.push((name.display().to_string(), text));
        }
        if files.is_empty() {
            return Err(read_error("the folder holds no .yaml or .yml file".into()));
        }
        Policy::from_sources(&files)
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| read_error(format!("cannot read file: {e}")))?;
        Policy::from_source(&path.display().to_string(), &text)
    }
}

impl PolicyRegistry {
    /// Loads the configured policy (or the example); a policy that does not validate stops the start.
    pub fn load(path: Option<PathBuf>) -> std::result::Result<Self, PolicyError> {
        let policy = match &path {
            Some(p) => load_policy_path(p)?,
            None => Policy::from_source("example.yaml", EXAMPLE_POLICY)?,
        };
        Ok(PolicyRegistry {
            path,
            file_policy: RwLock::new(Arc::new(policy)),
            by_org: RwLock::new(HashMap::new()),
            refused: RwLock::new(HashMap::new()),
            retrying: std::sync::Mutex::new(HashSet::new()),
            turn: Arc::new(tokio::sync::Mutex::new(())),
            listing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn file_policy(&self) -> Arc<Policy> {
        match self.file_policy.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Every org's policy and refusal as they are now, for [`PolicyRegistry::restore`].
    fn snapshot(&self) -> (HashMap<OrgId, ActivePolicy>, HashMap<OrgId, Refusal>) {
        let by_org = self.by_org.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let refused = self.refused.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        (by_org, refused)
    }

    /// Puts back what [`PolicyRegistry::snapshot`] saw, after a file policy (`rejected`) failed to activate
    /// and `previous` is the file policy again. An org the snapshot did not know (created meanwhile, which
    /// sets its policy without taking the turn) keeps what it has, except the rejected file policy: it gets
    /// `previous`, like every other org that follows the file.
    fn restore(
        &self,
        (by_org, refused): (HashMap<OrgId, ActivePolicy>, HashMap<OrgId, Refusal>),
        rejected: &Arc<Policy>,
        previous: &Arc<Policy>,
    ) {
        let mut current_orgs = self.by_org.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut current_refused = self.refused.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = |org: &OrgId| by_org.contains_key(org) || refused.contains_key(org);
        current_orgs.retain(|org, _| !known(org));
        current_refused.retain(|org, _| !known(org));
        for active in current_orgs.values_mut() {
            if Arc::ptr_eq(&active.policy, rejected) {
                active.policy = previous.clone();
            }
        }
        current_orgs.extend(by_org.clone());
        current_refused.extend(refused.clone());
    }

    /// Puts `policy` in force as the file policy; answers the one it replaced.
    fn replace_file_policy(&self, policy: Arc<Policy>) -> Arc<Policy> {
        let mut guard = match self.file_policy.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        std::mem::replace(&mut *guard, policy)
    }

    /// Every org the registry rules or refuses.
    fn known_orgs(&self) -> Vec<OrgId> {
        let by_org = self.by_org.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let refused = self.refused.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut orgs: Vec<OrgId> = by_org.keys().chain(refused.keys()).cloned().collect();
        orgs.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        orgs.dedup();
        orgs
    }

    /// The org's policy. `None` only for an org the registry has not seen, which callers treat as deny.
    pub fn for_org(&self, org: &OrgId) -> Option<ActivePolicy> {
        let map = match self.by_org.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.get(org).cloned()
    }

    /// Drops the org's policy, so its submissions are denied until it is loaded again (fail closed).
    fn refuse(&self, org: &OrgId, why: Refusal) {
        let mut map = match self.by_org.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.remove(org);
        let mut refused = match self.refused.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        refused.insert(org.clone(), why);
    }

    /// Why the org has no policy, when it was refused one.
    fn refused(&self, org: &OrgId) -> Option<Refusal> {
        let refused = match self.refused.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        refused.get(org).cloned()
    }

    fn set(&self, org: &OrgId, active: ActivePolicy) {
        let mut map = match self.by_org.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert(org.clone(), active);
        let mut refused = match self.refused.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        refused.remove(org);
    }

    /// Marks a reload retry as running for the org; false if one already is.
    fn start_retry(&self, org: &OrgId) -> bool {
        match self.retrying.lock() {
            Ok(mut set) => set.insert(org.clone()),
            Err(poisoned) => poisoned.into_inner().insert(org.clone()),
        }
    }

    /// Ends the org's retry if the org is no longer refused. Checked with the retry still marked, and every
    /// failure refuses before it asks for a retry, so no refusal is ever left without one.
    fn end_retry_if_loaded(&self, org: &OrgId) -> bool {
        let mut set = match self.retrying.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.refused(org).is_some_and(|r| r.transient) {
            return false;
        }
        set.remove(org);
        true
    }
}

fn stored(org: &OrgId, policy: &Policy, origin: &str, now: chrono::DateTime<chrono::Utc>) -> StoredPolicy {
    StoredPolicy {
        org_id: org.clone(),
        version: policy.version().to_owned(),
        sources: policy.sources().to_vec(),
        origin: origin.to_owned(),
        created_at: now,
    }
}

impl Gateway {
    /// Decides an org's policy at start, when the file policy changed, or when the org is created: an `api`
    /// policy stays, otherwise the configured file policy is recorded (a new version only when it changed). A
    /// stored `api` policy that no longer compiles is not replaced by the file policy, which may allow more:
    /// the org is left without a policy (its actions denied) until an admin sets one. The caller puts the
    /// answer in force ([`Gateway::put_in_force`]) once `work` has committed, so no action is decided by a
    /// policy whose record never landed.
    pub(super) async fn activate_org_policy(&self, work: &mut Work, org: &OrgId) -> Result<Activation> {
        let now = self.now();
        let file_policy = self.policies().file_policy();
        let current = work.tx.current_policy(org).await?;
        if let Some(current) = &current
            && current.origin == "api"
        {
            return Ok(stored_activation(org, current));
        }
        if current.as_ref().is_none_or(|c| c.version != file_policy.version() || c.origin != "file") {
            work.tx.insert_policy(&stored(org, &file_policy, "file", now)).await?;
            work.audit(
                org,
                now,
                &Actor::system(),
                "policy.updated",
                None,
                json!({"version": file_policy.version(), "origin": "file", "rules": file_policy.rule_count()}),
            )
            .await?;
        }
        Ok(Activation::Rule(ActivePolicy { policy: file_policy, origin: "file".into() }))
    }

    /// Puts what [`Gateway::activate_org_policy`] decided in force.
    pub(super) fn put_in_force(&self, org: &OrgId, activation: Activation) {
        match activation {
            Activation::Rule(active) => self.policies().set(org, active),
            Activation::Refuse(why) => self.policies().refuse(org, why),
        }
    }

    /// Loads every org's policy at start (and after the policy file changed).
    pub async fn activate_policies(&self) -> Result<()> {
        let _turn = self.policies().turn.lock().await;
        self.activate_policies_in_turn().await
    }

    /// [`Gateway::activate_policies`] for a caller that holds the registry's turn.
    async fn activate_policies_in_turn(&self) -> Result<()> {
        let mut work = self.write().await?;
        let mut activations = Vec::new();
        for org in work.tx.list_orgs().await? {
            let activation = self.activate_org_policy(&mut work, &org.id).await?;
            activations.push((org.id, activation));
        }
        work.commit(self).await?;
        for (org, activation) in activations {
            self.put_in_force(&org, activation);
        }
        Ok(())
    }

    /// Reloads an org's policy from the store after another replica set it (or created the org). Read-only:
    /// an `api` policy is compiled, else this replica's file policy rules. If the store cannot be read, the
    /// org is left without a policy, so its actions are denied, and the load is tried again every second
    /// until it succeeds or the server stops: a replica never keeps ruling by a policy it knows was replaced.
    pub(crate) async fn reload_org_policy(&self, org: &OrgId) {
        if !self.reload_or_refuse(org).await {
            self.retry_until_loaded(org);
        }
    }

    /// Tries to load a refused org's policy every second until it loads or the server stops (one retry per
    /// org at a time).
    fn retry_until_loaded(&self, org: &OrgId) {
        if !self.policies().start_retry(org) {
            return;
        }
        let (gateway, org) = (self.clone(), org.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = gateway.shutdown().cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
                gateway.reload_or_refuse(&org).await;
                if gateway.policies().end_retry_if_loaded(&org) {
                    return;
                }
            }
        });
    }

    /// Loads the org's policy from the store, or refuses it one, in one turn of the registry: true if loaded.
    async fn reload_or_refuse(&self, org: &OrgId) -> bool {
        let _turn = self.policies().turn.lock().await;
        let current = match self.read().await {
            Ok(mut tx) => tx.current_policy(org).await.map_err(Error::from),
            Err(error) => Err(error),
        };
        match current {
            Ok(current) => {
                match current.filter(|c| c.origin == "api") {
                    Some(current) => self.put_in_force(org, stored_activation(org, &current)),
                    None => {
                        let file_policy = self.policies().file_policy();
                        self.policies().set(org, ActivePolicy { policy: file_policy, origin: "file".into() });
                    }
                }
                true
            }
            Err(error) => {
                tracing::error!(org = %org, %error, "cannot reload the org's policy set on another replica; denying its actions until it loads");
                let message = "the org's policy could not be reloaded from the database; retrying".to_owned();
                self.policies().refuse(org, Refusal { message, transient: true });
                false
            }
        }
    }

    /// Reloads every org's policy after this replica may have missed what others set (a lost connection,
    /// or a message too large to list). An org that cannot be reloaded is denied until it is.
    pub(crate) async fn reload_policies(&self) {
        let orgs = match self.read().await {
            Ok(mut tx) => tx.list_orgs().await.map_err(Error::from),
            Err(error) => Err(error),
        };
        match orgs {
            Ok(orgs) => {
                for org in orgs {
                    self.reload_org_policy(&org.id).await;
                }
            }
            // Every org this replica rules may have a policy it missed: each is denied at once (no store read,
            // so none waits behind another) and retried until it loads, and the list is read again every second
            // until it can be, for orgs this replica has not seen yet.
            Err(error) => {
                tracing::error!(%error, "cannot list the orgs to reload their policies; denying each known org until it loads");
                for org in self.policies().known_orgs() {
                    let message = "the org's policy could not be reloaded from the database; retrying".to_owned();
                    self.policies().refuse(&org, Refusal { message, transient: true });
                    self.retry_until_loaded(&org);
                }
                self.retry_listing_orgs();
            }
        }
    }

    /// Reads the org list every second until it can, then loads the policy of every org (one such retry at
    /// a time).
    fn retry_listing_orgs(&self) {
        if self.policies().listing.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let gateway = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = gateway.shutdown().cancelled() => break,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
                let orgs = match gateway.read().await {
                    Ok(mut tx) => tx.list_orgs().await.map_err(Error::from),
                    Err(error) => Err(error),
                };
                if let Ok(orgs) = orgs {
                    for org in orgs {
                        gateway.reload_org_policy(&org.id).await;
                    }
                    break;
                }
            }
            gateway.policies().listing.store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// Re-reads the configured file (SIGHUP, file change). On a validation error the running policy stays
    /// and the error is returned for the log.
    pub async fn reload_policy_file(&self) -> std::result::Result<Option<String>, String> {
        let Some(path) = self.policies().path().map(Path::to_path_buf) else {
            return Ok(None);
        };
        let policy = load_policy_path(&path).map_err(|e| e.to_string())?;
        if policy.version() == self.policies().file_policy().version() {
            return Ok(None);
        }
        let version = policy.version().to_owned();
        // In one turn of the registry, so no other reload interleaves with the swap or its undoing.
        let _turn = self.policies().turn.lock().await;
        let before = self.policies().snapshot();
        let rejected = Arc::new(policy);
        let previous = self.policies().replace_file_policy(rejected.clone());
        if let Err(error) = self.activate_policies_in_turn().await {
            // Nothing was stored: the previous file, and every org's policy, stay as they were (the failed pass
            // may have set some in memory), so the next reload (SIGHUP, a file change) tries this one again
            // instead of finding it "unchanged".
            self.policies().restore(before, &rejected, &previous);
            self.policies().replace_file_policy(previous);
            return Err(format!("the new policy file could not be activated, the previous one stays: {error}"));
        }
        Ok(Some(version))
    }

    /// `PUT /v1/policy`: validates, stores as this org's own policy, audits.
    pub async fn put_policy(&self, caller: &Caller, files: Vec<(String, String)>) -> Result<ActivePolicy> {
        caller.require_admin()?;
        let policy = Policy::from_sources(&files).map_err(|e| invalid_policy(&e))?;
        let org = caller.org_id().clone();
        let turn = self.policies().turn.clone().lock_owned().await;
        let now = self.now();
        let mut work = self.write().await?;
        work.tx.insert_policy(&stored(&org, &policy, "api", now)).await?;
        work.audit(
            &org,
            now,
            &caller.actor(),
            "policy.updated",
            None,
            json!({"version": policy.version(), "origin": "api", "rules": policy.rule_count()}),
        )
        .await?;
        let active = ActivePolicy { policy: Arc::new(policy), origin: "api".into() };
        work.policy_changed(&org);
        // The commit and setting it here run on a task of their own: a client that hangs up meanwhile must
        // not leave this replica on the old policy while the store (and every other replica) has the new.
        let (gateway, set) = (self.clone(), active.clone());
        tokio::spawn(async move {
            let _turn = turn;
            work.commit(&gateway).await?;
            gateway.policies().set(&org, set);
            Ok::<_, Error>(())
        })
        .await
        .map_err(|e| Error::Internal(format!("setting the policy stopped: {e}")))??;
        Ok(active)
    }

    pub fn current_policy(&self, caller: &Caller) -> Result<ActivePolicy> {
        caller.require_user()?;
        let org = caller.org_id();
        match (self.policies().for_org(org), self.policies().refused(org)) {
            (Some(active), _) => Ok(active),
            (None, Some(Refusal { message, transient: true })) => Err(Error::Unavailable(message)),
            (None, Some(Refusal { message, transient: false })) => Err(Error::Conflict { message, state: None }),
            (None, None) => Err(Error::Internal("no policy is loaded for this org".into())),
        }
    }

    /// `POST /v1/policy/validate`.
    pub fn validate_policy(&self, caller: &Caller, files: &[(String, String)]) -> Result<Policy> {
        self.check_policy(caller, files)?.map_err(|e| invalid_policy(&e))
    }

    /// The same check as `validate_policy`, answering the policy's own error (file, line, column) for a
    /// front end that shows where it is.
    pub fn check_policy(
        &self,
        caller: &Caller,
        files: &[(String, String)],
    ) -> Result<std::result::Result<Policy, PolicyError>> {
        // Admins, as the design says: compiling a policy's patterns is work a viewer could make huge.
        caller.require_admin()?;
        Ok(Policy::from_sources(files))
    }

    /// `POST /v1/policy/evaluate`: a dry run with the org's facts, creating nothing.
    pub async fn evaluate_policy(
        &self,
        caller: &Caller,
        agent_name: &str,
        capability: &Capability,
        params: &serde_json::Value,
    ) -> Result<Verdict> {
        caller.require_admin()?;
        let active = self.current_policy(caller)?;
        let mut tx = self.read().await?;
        let prior_successes = match tx.find_agent_by_name(caller.org_id(), agent_name).await? {
            Some(agent) => self.prior_successes(&mut *tx, caller.org_id(), &agent.id, capability).await?,
            None => 0,
        };
        let facts = Facts { prior_successes };
        Ok(active.policy.evaluate(&EvalInput { agent: agent_name, capability, params, facts: &facts }))
    }
}

/// What an org is to be ruled by.
pub(super) enum Activation {
    Rule(ActivePolicy),
    /// No policy (its actions denied): a stored one that no longer compiles.
    Refuse(Refusal),
}

/// The org's stored `api` policy, or a refusal (fail closed) if that no longer compiles.
fn stored_activation(org: &OrgId, current: &StoredPolicy) -> Activation {
    match Policy::from_sources(&current.sources) {
        Ok(policy) => Activation::Rule(ActivePolicy { policy: Arc::new(policy), origin: "api".into() }),
        Err(e) => {
            tracing::error!(org = %org, error = %e, "the org's stored policy no longer compiles; denying its actions until an admin sets one");
            Activation::Refuse(Refusal {
                message: format!(
                    "the org's stored policy (version {}) no longer compiles: {e}; its actions are denied until an \
                     admin sets a policy with PUT /v1/policy",
                    current.version
                ),
                transient: false,
            })
        }
    }
}

pub fn invalid_policy(error: &PolicyError) -> Error {
    Error::Invalid { field: Some("policy".into()), message: format!("policy is invalid: {error}") }
}
