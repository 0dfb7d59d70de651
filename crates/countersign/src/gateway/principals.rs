//! Orgs, users, agents and keys: bootstrap on an empty store, creation, listing and revocation.
//!
//! Secrets are generated here and returned once; only their hashes reach the store. Every change is audited.

use chrono::{DateTime, Utc};
use countersign_core::audit::Actor;
use countersign_core::domain::{Agent, ApiKey, Org, PrincipalRef, Role, User};
use countersign_core::ids::{AgentId, KeyId, OrgId, UserId};
use countersign_core::secrets::{self, SecretKind};
use serde_json::json;

use super::{Caller, Gateway, Work};
use crate::error::{Error, Result};

/// What the first start created.
#[derive(Debug, Clone)]
pub struct Bootstrapped {
    pub org: Org,
    pub admin: User,
    /// The admin key's plaintext when it was generated here (not when it came from the environment).
    pub generated_key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CreatedOrg {
    pub org: Org,
    pub admin: User,
    pub admin_key: String,
}

#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub key: ApiKey,
    pub plaintext: String,
}

/// Whom a new key is for, by name or id.
#[derive(Debug, Clone)]
pub enum KeyOwner {
    Agent(String),
    User(String),
}

/// Names of agents and users: 1–64 of `A-Za-z0-9._@-`, starting with a letter or digit.
pub fn validate_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "`{name}` is not a valid name: 1–64 of letters, digits, `.`, `_`, `-`, `@`, starting with a letter or digit"
            ),
        ))
    }
}

fn conflict_on_duplicate(what: &str, name: &str) -> impl Fn(countersign_core::store::StoreError) -> Error {
    let message = format!("a {what} named `{name}` already exists");
    move |e| match e {
        countersign_core::store::StoreError::Conflict(_) => Error::Conflict { message: message.clone(), state: None },
        other => other.into(),
    }
}

impl Gateway {
    async fn insert_key(
        &self,
        work: &mut Work,
        org: &OrgId,
        principal: PrincipalRef,
        expires_at: Option<DateTime<Utc>>,
        plaintext: Option<String>,
        actor: &Actor,
    ) -> Result<CreatedKey> {
        let now = self.now();
        let plaintext = match plaintext {
            Some(p) => p,
            None => secrets::generate(SecretKind::ApiKey).plaintext,
        };
        let key = ApiKey {
            id: KeyId::new(),
            org_id: org.clone(),
            principal,
            hash: secrets::hash_secret(&plaintext),
            prefix: secrets::display_prefix(&plaintext),
            last_four: secrets::last_four(&plaintext),
            created_at: now,
            expires_at,
            revoked_at: None,
        };
        work.tx.insert_key(&key).await?;
        let principal = match &key.principal {
            PrincipalRef::User(id) => json!({"user": id}),
            PrincipalRef::Agent(id) => json!({"agent": id}),
        };
        work.audit(
            org,
            now,
            actor,
            "key.created",
            Some(key.id.as_str()),
            json!({"for": principal, "last_four": key.last_four}),
        )
        .await?;
        Ok(CreatedKey { key, plaintext })
    }

    async fn create_org_in(
        &self,
        work: &mut Work,
        name: &str,
        instance_admin: bool,
        key: Option<String>,
    ) -> Result<(CreatedOrg, super::policy::Activation)> {
        let now = self.now();
        let org = Org { id: OrgId::new(), name: name.to_owned(), created_at: now };
        work.tx.insert_org(&org).await.map_err(conflict_on_duplicate("org", name))?;
        let admin = User {
            id: UserId::new(),
            org_id: org.id.clone(),
            name: "admin".into(),
            role: Role::Admin,
            instance_admin,
            created_at: now,
            disabled_at: None,
        };
        work.tx.insert_user(&admin).await?;
        let system = Actor::system();
        work.audit(&org.id, now, &system, "org.created", Some(org.id.as_str()), json!({"name": name})).await?;
        work.audit(
            &org.id,
            now,
            &system,
            "user.created",
            Some(admin.id.as_str()),
            json!({"name": "admin", "role": "admin"}),
        )
        .await?;
        let created = self.insert_key(work, &org.id, PrincipalRef::User(admin.id.clone()), None, key, &system).await?;
        // Put in force by the caller once this commits (so a creation that fails leaves no org behind).
        let activation = self.activate_org_policy(work, &org.id).await?;
        work.policy_changed(&org.id);
        Ok((CreatedOrg { org, admin, admin_key: created.plaintext }, activation))
    }

    /// On an empty store: org `default`, user `admin`, and an admin key (the given one, or a new one).
    /// On an empty store: creates org `default` with an admin user and key. A generated key is handed to
    /// `keep_key` (which writes it to the data dir) before the transaction commits, so a crash can never
    /// leave a bootstrapped store whose only admin key was lost.
    pub async fn bootstrap(
        &self,
        provided_key: Option<&str>,
        keep_key: impl FnOnce(&str) -> std::io::Result<()> + Send,
    ) -> Result<Option<Bootstrapped>> {
        if let Some(key) = provided_key
            && !secrets::is_well_formed(SecretKind::ApiKey, key)
        {
            return Err(Error::invalid(
                "COUNTERSIGN_BOOTSTRAP_ADMIN_KEY",
                "must be a Countersign key: cs_sk_ followed by 43 base64url characters (32 bytes)",
            ));
        }
        let mut work = self.write().await?;
        if work.tx.count_orgs().await? > 0 {
            return Ok(None);
        }
        let (created, activation) =
            self.create_org_in(&mut work, "default", true, provided_key.map(str::to_owned)).await?;
        if provided_key.is_none() {
            keep_key(&created.admin_key)
                .map_err(|e| Error::Internal(format!("cannot keep the generated admin key: {e}")))?;
        }
        work.commit(self).await?;
        self.put_in_force(&created.org.id, activation);
        Ok(Some(Bootstrapped {
            org: created.org,
            admin: created.admin,
            generated_key: provided_key.is_none().then_some(created.admin_key),
        }))
    }

    /// `POST /v1/orgs`: only the instance admin.
    pub async fn create_org(&self, caller: &Caller, name: &str) -> Result<CreatedOrg> {
        let user = caller.require_admin()?;
        if !user.instance_admin {
            return Err(Error::Forbidden("only the instance admin creates orgs".into()));
        }
        validate_name("name", name)?;
        let mut work = self.write().await?;
        let (created, activation) = self.create_org_in(&mut work, name, false, None).await?;
        let now = self.now();
        work.audit(
            caller.org_id(),
            now,
            &caller.actor(),
            "org.created",
            Some(created.org.id.as_str()),
            json!({"name": name}),
        )
        .await?;
        work.commit(self).await?;
        self.put_in_force(&created.org.id, activation);
        Ok(created)
    }

    pub async fn create_agent(&self, caller: &Caller, name: &str, owner: Option<&str>) -> Result<Agent> {
        caller.require_admin()?;
        validate_name("name", name)?;
        let org = caller.org_id().clone();
        let now = self.now();
        let mut work = self.write().await?;
        let owner = match owner {
            Some(o) => Some(
                self.resolve_user(&mut work, &org, o)
                    .await?
                    .ok_or_else(|| Error::invalid("owner", format!("no user `{o}`")))?
                    .id,
            ),
            None => None,
        };
        let agent = Agent {
            id: AgentId::new(),
            org_id: org.clone(),
            name: name.to_owned(),
            owner,
            created_at: now,
            disabled_at: None,
        };
        work.tx.insert_agent(&agent).await.map_err(conflict_on_duplicate("agent", name))?;
        work.audit(
            &org,
            now,
            &caller.actor(),
            "agent.created",
            Some(agent.id.as_str()),
            json!({"name": name, "owner": agent.owner}),
        )
        .await?;
        work.commit(self).await?;
        Ok(agent)
    }

    pub async fn create_user(&self, caller: &Caller, name: &str, role: Role) -> Result<User> {
        caller.require_admin()?;
        validate_name("name", name)?;
        let org = caller.org_id().clone();
        let now = self.now();
        let user = User {
            id: UserId::new(),
            org_id: org.clone(),
            name: name.to_owned(),
            role,
            instance_admin: false,
            created_at: now,
            disabled_at: None,
        };
        let mut work = self.write().await?;
        work.tx.insert_user(&user).await.map_err(conflict_on_duplicate("user", name))?;
        work.audit(
            &org,
            now,
            &caller.actor(),
            "user.created",
            Some(user.id.as_str()),
            json!({"name": name, "role": role}),
        )
        .await?;
        work.commit(self).await?;
        Ok(user)
    }

    async fn resolve_user(&self, work: &mut Work, org: &OrgId, name_or_id: &str) -> Result<Option<User>> {
        match UserId::parse(name_or_id) {
            Some(id) => Ok(work.tx.get_user(org, &id).await?),
            None => Ok(work.tx.find_user_by_name(org, name_or_id).await?),
        }
    }

    async fn resolve_agent(&self, work: &mut Work, org: &OrgId, name_or_id: &str) -> Result<Option<Agent>> {
        match AgentId::parse(name_or_id) {
            Some(id) => Ok(work.tx.get_agent(org, &id).await?),
            None => Ok(work.tx.find_agent_by_name(org, name_or_id).await?),
        }
    }

    pub async fn create_key(
        &self,
        caller: &Caller,
        owner: KeyOwner,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<CreatedKey> {
        let me = caller.require_admin()?;
        let org = caller.org_id().clone();
        if expires_at.is_some_and(|at| at <= self.now()) {
            return Err(Error::invalid("expires_at", "must be in the future"));
        }
        let mut work = self.write().await?;
        let principal = match &owner {
            KeyOwner::Agent(a) => PrincipalRef::Agent(
                self.resolve_agent(&mut work, &org, a)
                    .await?
                    .filter(|a| a.disabled_at.is_none())
                    .ok_or_else(|| Error::invalid("agent", format!("no agent `{a}`")))?
                    .id,
            ),
            KeyOwner::User(u) => {
                let user = self
                    .resolve_user(&mut work, &org, u)
                    .await?
                    .filter(|u| u.disabled_at.is_none())
                    .ok_or_else(|| Error::invalid("user", format!("no user `{u}`")))?;
                // A key of the instance admin creates orgs: an org admin minting one would become that.
                if user.instance_admin && !me.instance_admin {
                    return Err(Error::Forbidden("only the instance admin creates keys for the instance admin".into()));
                }
                PrincipalRef::User(user.id)
            }
        };
        let created = self.insert_key(&mut work, &org, principal, expires_at, None, &caller.actor()).await?;
        work.commit(self).await?;
        Ok(created)
    }

    pub async fn list_agents(&self, caller: &Caller) -> Result<Vec<Agent>> {
        caller.require_user()?;
        Ok(self.read().await?.list_agents(caller.org_id()).await?)
    }

    pub async fn list_users(&self, caller: &Caller) -> Result<Vec<User>> {
        caller.require_admin()?;
        Ok(self.read().await?.list_users(caller.org_id()).await?)
    }

    pub async fn list_keys(&self, caller: &Caller) -> Result<Vec<ApiKey>> {
        caller.require_admin()?;
        Ok(self.read().await?.list_keys(caller.org_id()).await?)
    }

    pub async fn get_agent(&self, caller: &Caller, id: &AgentId) -> Result<Agent> {
        caller.require_user()?;
        self.read().await?.get_agent(caller.org_id(), id).await?.ok_or_else(|| Error::not_found("agent", id.as_str()))
    }

    pub async fn get_user(&self, caller: &Caller, id: &UserId) -> Result<User> {
        caller.require_admin()?;
        self.read().await?.get_user(caller.org_id(), id).await?.ok_or_else(|| Error::not_found("user", id.as_str()))
    }

    pub async fn revoke_key(&self, caller: &Caller, id: &KeyId) -> Result<()> {
        let me = caller.require_admin()?;
        let org = caller.org_id().clone();
        let now = self.now();
        let mut work = self.write().await?;
        // The instance admin's keys are its only way in (no other path mints it one once the store is set up),
        // so an org admin revoking them would lock it out for good, as disabling it would.
        if !me.instance_admin {
            let owner = work.tx.get_key(&org, id).await?.map(|k| k.principal);
            if let Some(PrincipalRef::User(user)) = owner
                && work.tx.get_user(&org, &user).await?.is_some_and(|u| u.instance_admin)
            {
                return Err(Error::Forbidden("only the instance admin may revoke the instance admin's keys".into()));
            }
        }
        let Some(sessions) = work.tx.revoke_key(&org, id, now).await? else {
            return Err(Error::not_found("active key", id.as_str()));
        };
        // The sessions minted with the key end with it: named, so the trail says which credentials stopped.
        let data = json!({"sessions_revoked": sessions});
        work.audit(&org, now, &caller.actor(), "key.revoked", Some(id.as_str()), data).await?;
        work.principals_changed();
        work.commit(self).await
    }

    /// Disables an agent: its keys and sessions stop working at once.
    pub async fn disable_agent(&self, caller: &Caller, id: &AgentId) -> Result<()> {
        caller.require_admin()?;
        let org = caller.org_id().clone();
        let now = self.now();
        let mut work = self.write().await?;
        if !work.tx.disable_agent(&org, id, now).await? {
            return Err(Error::not_found("active agent", id.as_str()));
        }
        work.audit(&org, now, &caller.actor(), "agent.disabled", Some(id.as_str()), json!({})).await?;
        work.principals_changed();
        work.commit(self).await
    }

    pub async fn disable_user(&self, caller: &Caller, id: &UserId) -> Result<()> {
        let me = caller.require_admin()?;
        if &me.id == id {
            return Err(Error::Conflict { message: "you cannot disable yourself".into(), state: None });
        }
        let org = caller.org_id().clone();
        let now = self.now();
        let mut work = self.write().await?;
        if !me.instance_admin && work.tx.get_user(&org, id).await?.is_some_and(|u| u.instance_admin) {
            return Err(Error::Forbidden("only the instance admin may disable the instance admin".into()));
        }
        let Some(sessions) = work.tx.disable_user(&org, id, now).await? else {
            return Err(Error::not_found("active user", id.as_str()));
        };
        let data = json!({"sessions_revoked": sessions});
        work.audit(&org, now, &caller.actor(), "user.disabled", Some(id.as_str()), data).await?;
        work.principals_changed();
        work.commit(self).await
    }
}
