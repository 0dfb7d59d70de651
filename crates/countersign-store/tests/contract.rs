//! The store contract: the same checks against every backend. SQLite (a temporary file) always runs;
//! PostgreSQL runs when `COUNTERSIGN_TEST_DATABASE_URL` names a server (`scripts/with-postgres` starts one),
//! each test in a fresh database of its own. Without the variable the PostgreSQL half is skipped with a note.
//!
//! What is checked: round trips and tenant isolation, filters and cursors, uniqueness as `Conflict`, a gapless
//! audit chain under concurrent writers, the schema's refusal to change the audit log except a retained prefix
//! behind a checkpoint, jobs claimed exactly once with leases, and writers serialising on an approval. These
//! tests do not cover the gateway's rules; the server's own tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use countersign_core::audit::{Actor, ActorKind, ChainVerifier, NewAuditEvent};
use countersign_core::capability::{Capability, NameGlob};
use countersign_core::checkpoint::Checkpoint;
use countersign_core::domain::{
    Action, Agent, ApiKey, Approval, DashboardSession, DecisionRecord, Delivery, HttpTarget, Job, JobKind, Org,
    PrincipalRef, Role, Session, StoredPolicy, Target, User, Webhook, WebhookFormat,
};
use countersign_core::ids::{
    ActionId, AgentId, ApprovalId, DeliveryId, JobId, KeyId, OrgId, SessionId, UserId, WebhookId,
};
use countersign_core::risk::RiskAssessment;
use countersign_core::state::{ActionState, ApprovalStatus, Decision, JobState};
use countersign_core::store::{ActionFilter, AuditFilter, JobEnd, JobFilter, PAGE_BYTES, Page, Store, StoreError};
use countersign_store::{FeedEvent, PostgresStore, SqliteStore};
use serde_json::json;
use sqlx::{Connection, Executor};
use tokio::sync::Barrier;

const PG_URL_VAR: &str = "COUNTERSIGN_TEST_DATABASE_URL";

// ---------------------------------------------------------------------------------------------------------
// Backends.

enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    /// A side door past the `Store` trait, to try what the trait cannot express.
    raw: Raw,
    _dir: Option<tempfile::TempDir>,
    /// (admin URL, database) to drop when the test is done.
    drop_db: Option<(String, String)>,
    /// PostgreSQL: the URL of this test's own database.
    url: Option<String>,
}

impl Backend {
    async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("countersign.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let raw = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&path))
            .await
            .unwrap();
        Backend {
            name: "sqlite",
            store: Arc::new(store),
            raw: Raw::Sqlite(raw),
            _dir: Some(dir),
            drop_db: None,
            url: None,
        }
    }

    async fn postgres(url: &str) -> Backend {
        let db = format!("cs_{}", OrgId::new().as_str().trim_start_matches("org_").to_ascii_lowercase());
        let mut admin = sqlx::PgConnection::connect(url).await.unwrap();
        admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).await.unwrap();
        admin.close().await.unwrap();
        let own_url = with_database(url, &db);
        let store = PostgresStore::connect(&own_url).await.unwrap();
        let raw = Raw::Postgres(store.pool().clone());
        Backend {
            name: "postgres",
            store: Arc::new(store),
            raw,
            _dir: None,
            drop_db: Some((url.to_owned(), db)),
            url: Some(own_url),
        }
    }

    /// PostgreSQL: another store on this database (a second replica) whose sessions start with `setting`
    /// (`name = value`, set for the database; the first store's open connections keep theirs).
    async fn replica_with(&self, url: &str, setting: &str) -> PostgresStore {
        let Raw::Postgres(pool) = &self.raw else { unreachable!() };
        let db = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER DATABASE {db} SET {setting}"))).execute(pool).await.unwrap();
        PostgresStore::connect(url).await.unwrap()
    }

    /// Runs one statement outside the store; the error text on failure.
    async fn raw(&self, sql: &'static str) -> Result<u64, String> {
        let done = match &self.raw {
            Raw::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(|r| r.rows_affected()),
            Raw::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(|r| r.rows_affected()),
        };
        done.map_err(|e| e.to_string())
    }

    async fn finish(self) {
        match &self.raw {
            Raw::Sqlite(pool) => pool.close().await,
            Raw::Postgres(pool) => pool.close().await,
        }
        drop(self.store);
        if let Some((url, db)) = self.drop_db
            && let Ok(mut admin) = sqlx::PgConnection::connect(&url).await
        {
            let _ = admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))).await;
            let _ = admin.close().await;
        }
    }
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{db}?{query}"),
        None => format!("{base}/{db}"),
    }
}

/// Runs `check` against SQLite, then against PostgreSQL when a server is configured.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $name() {
            run(stringify!($name), |b| Box::pin(checks::$name(b))).await;
        }
    )*};
}

type Check = for<'a> fn(&'a Backend) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

async fn run(test: &str, check: Check) {
    let started = Instant::now();
    let sqlite = Backend::sqlite().await;
    check(&sqlite).await;
    sqlite.finish().await;
    eprintln!("{test}: sqlite passed in {} ms", started.elapsed().as_millis());
    match std::env::var(PG_URL_VAR) {
        Ok(url) if !url.is_empty() => {
            let started = Instant::now();
            let pg = Backend::postgres(&url).await;
            check(&pg).await;
            pg.finish().await;
            eprintln!("{test}: postgres passed in {} ms", started.elapsed().as_millis());
        }
        _ => eprintln!("{test}: {PG_URL_VAR} is not set, so the PostgreSQL half is skipped"),
    }
}

contract!(
    principals_round_trip_and_stay_in_their_org,
    actions_round_trip_with_filters_and_cursor,
    approvals_and_decisions_round_trip,
    audit_appends_stay_gapless_under_concurrent_writers,
    many_appends_in_one_transaction_are_seen_by_it_and_land_together,
    audit_filters_select_events,
    schema_refuses_audit_changes_and_retention_needs_a_checkpoint,
    concurrent_claimers_take_each_job_once,
    leases_expire_renew_and_release,
    an_expired_lease_is_taken_before_the_queue,
    an_agent_lists_only_the_executions_of_its_own_actions,
    pages_of_actions_and_approvals_stop_at_the_byte_budget,
    webhooks_and_deliveries_round_trip,
    concurrent_writers_serialise_on_an_approval,
    lock_waits_that_time_out_are_unavailable,
    policy_writes_of_an_org_take_turns,
    published_changes_reach_subscribers_only_when_committed,
    policies_keep_every_version,
    precedent_counts_successes_and_human_approved_records_only,
    retention_ends_before_the_first_event_inside_the_window,
    a_checkpoint_is_stored_once_per_seq_and_listed_in_seq_order,
    conditional_ends_write_only_rows_still_as_expected,
    queued_writes_keep_the_order_of_the_calls,
);

// ---------------------------------------------------------------------------------------------------------
// Fixtures.

/// Now, at the store's precision (microseconds).
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

fn org(name: &str) -> Org {
    Org { id: OrgId::new(), name: format!("{name}-{}", OrgId::new()), created_at: now() }
}

fn user(org: &Org, name: &str, role: Role) -> User {
    User {
        id: UserId::new(),
        org_id: org.id.clone(),
        name: name.into(),
        role,
        instance_admin: role == Role::Admin,
        created_at: now(),
        disabled_at: None,
    }
}

fn agent(org: &Org, name: &str, owner: Option<&User>) -> Agent {
    Agent {
        id: AgentId::new(),
        org_id: org.id.clone(),
        name: name.into(),
        owner: owner.map(|u| u.id.clone()),
        created_at: now(),
        disabled_at: None,
    }
}

fn action(org: &Org, agent: &Agent, capability: &str, state: ActionState) -> Action {
    Action {
        id: ActionId::new(),
        org_id: org.id.clone(),
        agent_id: agent.id.clone(),
        agent_name: agent.name.clone(),
        session_id: None,
        capability: Capability::parse(capability).unwrap(),
        params: json!({"amount": 120, "nested": {"b": [1, 2], "a": null}}),
        reasoning: r#"{"why": "because"}"#.into(),
        target: None,
        idempotency_key: None,
        state,
        verdict: None,
        approval_id: None,
        result: None,
        error: None,
        request_hash: String::new(),
        created_at: now(),
        decided_at: None,
        started_at: None,
        finished_at: None,
        job_id: None,
    }
}

fn http_target() -> Target {
    Target::Http(http_target_parts())
}

fn http_target_parts() -> HttpTarget {
    HttpTarget {
        upstream: "bank".into(),
        method: "POST".into(),
        path: "/cards".into(),
        query: [("limit".to_owned(), "5".to_owned())].into(),
        headers: Default::default(),
        body: Some(json!({"card": "virtual"})),
    }
}

fn approval(org: &Org, action: &Action) -> Approval {
    Approval {
        id: ApprovalId::new(),
        org_id: org.id.clone(),
        action_id: action.id.clone(),
        group: "finance".into(),
        quorum: 2,
        status: ApprovalStatus::Pending,
        expires_at: now() + TimeDelta::hours(1),
        token_hash: format!("token-{}", ApprovalId::new()),
        policy_version: "v1".into(),
        request_hash: "rh".into(),
        rule: "big-spend".into(),
        snapshot: Some(json!({"name": "big-spend"})),
        risk: RiskAssessment {
            score: 0.625,
            reversible: false,
            external: true,
            prior_successes: 3,
            factors: vec!["base 0.3".into()],
        },
        decisions: Vec::new(),
        created_at: now(),
        decided_at: None,
    }
}

fn decision(user: &User, decision: Decision, counted: bool) -> DecisionRecord {
    DecisionRecord {
        user_id: user.id.clone(),
        user_name: user.name.clone(),
        decision,
        note: Some("ok".into()),
        counted,
        created_at: now(),
    }
}

fn event(action: &str, actor_id: &str, subject: Option<&str>, time_us: i64) -> NewAuditEvent {
    NewAuditEvent {
        time_us,
        actor: Actor { kind: ActorKind::User, id: actor_id.into(), name: actor_id.into() },
        action: action.into(),
        subject: subject.map(str::to_owned),
        data: json!({"k": action, "n": 1.5}),
    }
}

fn checkpoint(org: &Org, seq: i64, head_hash: &str) -> Checkpoint {
    Checkpoint {
        org_id: org.id.to_string(),
        seq,
        head_hash: head_hash.into(),
        time_us: now().timestamp_micros(),
        key_id: "0123456789abcdef".into(),
        signature: "c2lnbmF0dXJl".into(),
    }
}

fn page(limit: u32, after: Option<&str>) -> Page {
    Page { limit, after: after.map(str::to_owned) }
}

/// An org with one admin and one agent, committed.
async fn seed(b: &Backend, name: &str) -> (Org, User, Agent) {
    let o = org(name);
    let u = user(&o, "alice", Role::Admin);
    let a = agent(&o, "bot", Some(&u));
    let mut tx = b.store.write().await.unwrap();
    tx.insert_org(&o).await.unwrap();
    tx.insert_user(&u).await.unwrap();
    tx.insert_agent(&a).await.unwrap();
    tx.commit().await.unwrap();
    (o, u, a)
}

/// The feed's next message, failing the test after 10 s.
async fn next_message(feed: &mut countersign_store::ReplicaFeed) -> Option<countersign_store::FeedEvent> {
    tokio::time::timeout(Duration::from_secs(10), feed.recv()).await.expect("no message in 10 s")
}

fn is_conflict(result: Result<(), StoreError>) -> bool {
    matches!(result, Err(StoreError::Conflict(_)))
}

// ---------------------------------------------------------------------------------------------------------
// The checks.

mod checks {
    use super::*;

    pub async fn principals_round_trip_and_stay_in_their_org(b: &Backend) {
        let (o1, alice, bot) = seed(b, "one").await;
        let (o2, _, _) = seed(b, "two").await;
        let n = b.name;
        let mut tx = b.store.write().await.unwrap();
        assert_eq!(tx.count_orgs().await.unwrap(), 2, "{n}");
        let orgs = tx.list_orgs().await.unwrap();
        assert!(orgs.contains(&o1) && orgs.contains(&o2), "{n}");
        assert_eq!(tx.get_org(&o1.id).await.unwrap(), Some(o1.clone()), "{n}");
        assert_eq!(tx.get_org(&OrgId::new()).await.unwrap(), None, "{n}");

        // Users and agents, and the wrong org sees nothing.
        assert_eq!(tx.get_user(&o1.id, &alice.id).await.unwrap(), Some(alice.clone()), "{n}");
        assert_eq!(tx.get_user(&o2.id, &alice.id).await.unwrap(), None, "{n}");
        assert_eq!(tx.find_user_by_name(&o1.id, "alice").await.unwrap(), Some(alice.clone()), "{n}");
        assert_eq!(tx.find_user_by_name(&o2.id, "alice").await.unwrap().map(|u| u.org_id), Some(o2.id.clone()));
        assert_eq!(tx.get_agent(&o1.id, &bot.id).await.unwrap(), Some(bot.clone()), "{n}");
        assert_eq!(tx.get_agent(&o2.id, &bot.id).await.unwrap(), None, "{n}");
        assert_eq!(tx.find_agent_by_name(&o1.id, "bot").await.unwrap(), Some(bot.clone()), "{n}");
        let bob = user(&o1, "bob", Role::Viewer);
        tx.insert_user(&bob).await.unwrap();
        assert_eq!(tx.list_users(&o1.id).await.unwrap().len(), 2, "{n}");
        assert_eq!(tx.list_agents(&o1.id).await.unwrap(), vec![bot.clone()], "{n}");
        assert_eq!(tx.disable_user(&o2.id, &bob.id, now()).await.unwrap(), None, "{n}: wrong org");
        assert_eq!(tx.disable_user(&o1.id, &bob.id, now()).await.unwrap(), Some(vec![]), "{n}");
        assert_eq!(tx.disable_user(&o1.id, &bob.id, now()).await.unwrap(), None, "{n}: already disabled");
        assert!(tx.get_user(&o1.id, &bob.id).await.unwrap().unwrap().disabled_at.is_some(), "{n}");
        assert!(!tx.disable_agent(&o2.id, &bot.id, now()).await.unwrap(), "{n}: wrong org");

        // Keys: global lookup by hash, listing and revocation per org.
        let key = ApiKey {
            id: KeyId::new(),
            org_id: o1.id.clone(),
            principal: PrincipalRef::Agent(bot.id.clone()),
            hash: format!("hash-{}", KeyId::new()),
            prefix: "cs_sk_".into(),
            last_four: "abcd".into(),
            created_at: now(),
            expires_at: Some(now() + TimeDelta::days(30)),
            revoked_at: None,
        };
        let user_key = ApiKey {
            id: KeyId::new(),
            principal: PrincipalRef::User(alice.id.clone()),
            hash: format!("hash-{}", KeyId::new()),
            expires_at: None,
            ..key.clone()
        };
        tx.insert_key(&key).await.unwrap();
        tx.insert_key(&user_key).await.unwrap();
        assert_eq!(tx.find_key_by_hash(&key.hash).await.unwrap(), Some(key.clone()), "{n}");
        assert_eq!(tx.find_key_by_hash(&user_key.hash).await.unwrap(), Some(user_key.clone()), "{n}");
        assert_eq!(tx.find_key_by_hash("nope").await.unwrap(), None, "{n}");
        assert_eq!(tx.list_keys(&o1.id).await.unwrap().len(), 2, "{n}");
        assert!(tx.list_keys(&o2.id).await.unwrap().is_empty(), "{n}");
        assert_eq!(tx.get_key(&o1.id, &user_key.id).await.unwrap(), Some(user_key.clone()), "{n}");
        assert_eq!(tx.get_key(&o2.id, &user_key.id).await.unwrap(), None, "{n}: wrong org");
        assert_eq!(tx.get_key(&o1.id, &KeyId::new()).await.unwrap(), None, "{n}");
        assert_eq!(tx.revoke_key(&o2.id, &key.id, now()).await.unwrap(), None, "{n}: wrong org");
        assert_eq!(tx.revoke_key(&o1.id, &key.id, now()).await.unwrap(), Some(vec![]), "{n}");
        assert!(tx.find_key_by_hash(&key.hash).await.unwrap().unwrap().revoked_at.is_some(), "{n}");

        // Sessions.
        let session = Session {
            id: SessionId::new(),
            org_id: o1.id.clone(),
            agent_id: bot.id.clone(),
            hash: format!("st-{}", SessionId::new()),
            scopes: vec![NameGlob::parse("finance.*").unwrap(), NameGlob::parse("crm.read.contact").unwrap()],
            created_by: format!("user:{}", alice.id),
            created_at: now(),
            expires_at: now() + TimeDelta::hours(1),
            revoked_at: None,
            minted_with: None,
        };
        tx.insert_session(&session).await.unwrap();
        assert_eq!(tx.find_session_by_hash(&session.hash).await.unwrap(), Some(session.clone()), "{n}");
        assert_eq!(tx.list_sessions(&o1.id, None).await.unwrap(), vec![session.clone()], "{n}");
        assert_eq!(tx.list_sessions(&o1.id, Some(&bot.id)).await.unwrap().len(), 1, "{n}");
        assert!(tx.list_sessions(&o1.id, Some(&AgentId::new())).await.unwrap().is_empty(), "{n}");
        assert!(tx.list_sessions(&o2.id, None).await.unwrap().is_empty(), "{n}");
        assert!(!tx.revoke_session(&o2.id, &session.id, now()).await.unwrap(), "{n}: wrong org");
        assert!(tx.revoke_session(&o1.id, &session.id, now()).await.unwrap(), "{n}");
        tx.commit().await.unwrap();

        // Dashboard logins: found by the token's hash; touched, revoked and swept within their org only.
        let login = DashboardSession {
            token_hash: format!("ui-{}", SessionId::new()),
            org_id: o1.id.clone(),
            user_id: alice.id.clone(),
            key_hash: user_key.hash.clone(),
            created_at: now(),
            expires_at: now() + TimeDelta::hours(12),
            last_seen_at: now(),
            revoked_at: None,
        };
        let stale = DashboardSession {
            token_hash: format!("ui-{}", SessionId::new()),
            created_at: now() - TimeDelta::hours(13),
            expires_at: now() - TimeDelta::hours(1),
            last_seen_at: now() - TimeDelta::hours(2),
            ..login.clone()
        };
        let mut tx = b.store.write().await.unwrap();
        tx.insert_dashboard_session(&login).await.unwrap();
        tx.insert_dashboard_session(&stale).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = b.store.read().await.unwrap();
        assert_eq!(tx.find_dashboard_session(&login.token_hash).await.unwrap(), Some(login.clone()), "{n}");
        assert_eq!(tx.find_dashboard_session("nope").await.unwrap(), None, "{n}");
        drop(tx);
        let mut tx = b.store.write().await.unwrap();
        let later = now() + TimeDelta::minutes(5);
        assert!(!tx.touch_dashboard_session(&o2.id, &login.token_hash, later).await.unwrap(), "{n}: wrong org");
        assert!(tx.touch_dashboard_session(&o1.id, &login.token_hash, later).await.unwrap(), "{n}");
        // An older request landing late does not move last-seen back.
        assert!(tx.touch_dashboard_session(&o1.id, &login.token_hash, now()).await.unwrap(), "{n}");
        let touched = tx.find_dashboard_session(&login.token_hash).await.unwrap().unwrap();
        assert_eq!(touched.last_seen_at, later, "{n}");
        assert!(!tx.revoke_dashboard_session(&o2.id, &login.token_hash, later).await.unwrap(), "{n}: wrong org");
        assert!(tx.revoke_dashboard_session(&o1.id, &login.token_hash, later).await.unwrap(), "{n}");
        assert!(!tx.revoke_dashboard_session(&o1.id, &login.token_hash, later).await.unwrap(), "{n}: twice");
        assert!(!tx.touch_dashboard_session(&o1.id, &login.token_hash, later).await.unwrap(), "{n}: revoked");
        let revoked = tx.find_dashboard_session(&login.token_hash).await.unwrap().unwrap();
        assert_eq!(revoked.revoked_at, Some(later), "{n}");
        assert_eq!(tx.delete_expired_dashboard_sessions(now()).await.unwrap(), 1, "{n}: only the expired one");
        assert_eq!(tx.find_dashboard_session(&stale.token_hash).await.unwrap(), None, "{n}");
        assert!(tx.find_dashboard_session(&login.token_hash).await.unwrap().is_some(), "{n}");
        assert_eq!(tx.delete_expired_dashboard_sessions(now() + TimeDelta::hours(13)).await.unwrap(), 1, "{n}");
        tx.commit().await.unwrap();

        // Uniqueness is a conflict: an org name, a user name within an org, a key hash.
        let mut tx = b.store.write().await.unwrap();
        assert!(is_conflict(tx.insert_org(&Org { id: OrgId::new(), ..o1.clone() }).await), "{n}: org name");
        drop(tx);
        let mut tx = b.store.write().await.unwrap();
        assert!(is_conflict(tx.insert_user(&user(&o1, "alice", Role::Viewer)).await), "{n}: user name");
        drop(tx);
        let mut tx = b.store.write().await.unwrap();
        assert!(is_conflict(tx.insert_key(&ApiKey { id: KeyId::new(), ..key.clone() }).await), "{n}: key hash");
        drop(tx);

        // A transaction dropped without commit leaves nothing behind.
        let mut tx = b.store.write().await.unwrap();
        tx.insert_org(&org("ghost")).await.unwrap();
        drop(tx);
        assert_eq!(b.store.read().await.unwrap().count_orgs().await.unwrap(), 2, "{n}: rolled back");
        b.store.ping().await.unwrap();
    }

    pub async fn actions_round_trip_with_filters_and_cursor(b: &Backend) {
        let (o, _, bot) = seed(b, "acts").await;
        let (other, _, other_bot) = seed(b, "other").await;
        let n = b.name;
        let bot2 = agent(&o, "bot2", None);
        let mut actions = vec![
            action(&o, &bot, "finance.issue.card", ActionState::Submitted),
            action(&o, &bot, "finance.issue.card", ActionState::Succeeded),
            action(&o, &bot, "finance.issue.card", ActionState::Approved),
            action(&o, &bot2, "crm.read.contact", ActionState::Submitted),
            action(&o, &bot, "crm.read.contact", ActionState::PendingApproval),
        ];
        actions[2].target = Some(http_target());
        actions[2].request_hash = "frozen".into();
        actions[0].idempotency_key = Some("k-1".into());
        let mut tx = b.store.write().await.unwrap();
        tx.insert_agent(&bot2).await.unwrap();
        for a in &actions {
            tx.insert_action(a).await.unwrap();
        }
        tx.insert_action(&action(&other, &other_bot, "finance.issue.card", ActionState::Submitted)).await.unwrap();
        tx.commit().await.unwrap();

        let mut tx = b.store.write().await.unwrap();
        for a in &actions {
            assert_eq!(tx.get_action(&o.id, &a.id).await.unwrap().as_ref(), Some(a), "{n}");
            assert_eq!(tx.get_action(&other.id, &a.id).await.unwrap(), None, "{n}: wrong org");
        }
        assert_eq!(
            tx.find_action_by_idempotency_key(&o.id, &bot.id, "k-1").await.unwrap().map(|a| a.id),
            Some(actions[0].id.clone()),
            "{n}"
        );
        assert_eq!(tx.find_action_by_idempotency_key(&o.id, &bot2.id, "k-1").await.unwrap(), None, "{n}");
        assert_eq!(tx.find_action_by_idempotency_key(&other.id, &bot.id, "k-1").await.unwrap(), None, "{n}");

        // Update writes the mutable fields.
        let mut updated = actions[0].clone();
        updated.state = ActionState::Failed;
        updated.result = Some(json!({"status": 502}));
        updated.error = Some("upstream failed".into());
        updated.approval_id = Some(ApprovalId::new());
        updated.decided_at = Some(now());
        updated.started_at = Some(now());
        updated.finished_at = Some(now());
        updated.job_id = Some(JobId::new());
        tx.update_action(&updated).await.unwrap();
        assert_eq!(tx.get_action(&o.id, &updated.id).await.unwrap(), Some(updated.clone()), "{n}");
        tx.commit().await.unwrap();
        actions[0] = updated.clone();

        // A job and an action read together: each found by its own id, in its org only.
        let mut tx = b.store.write().await.unwrap();
        let job = Job::new(o.id.clone(), JobKind::ActionExecute, Some(updated.id.to_string()), json!({}), now());
        tx.insert_job(&job).await.unwrap();
        let both = tx.get_job_and_action(&o.id, Some(&job.id), &updated.id).await.unwrap();
        assert_eq!(both, (Some(job.clone()), Some(updated.clone())), "{n}");
        let no_job = tx.get_job_and_action(&o.id, None, &updated.id).await.unwrap();
        assert_eq!(no_job, (None, Some(updated.clone())), "{n}");
        let no_action = tx.get_job_and_action(&o.id, Some(&job.id), &ActionId::new()).await.unwrap();
        assert_eq!(no_action, (Some(job.clone()), None), "{n}");
        let elsewhere = tx.get_job_and_action(&other.id, Some(&job.id), &updated.id).await.unwrap();
        assert_eq!(elsewhere, (None, None), "{n}: wrong org");
        drop(tx);

        // An update of a row that is not there fails its transaction: at once, or (both backends send their
        // updates with the next statement or the commit) at the commit, which then commits nothing of it.
        let mut tx = b.store.write().await.unwrap();
        let mut changed = updated.clone();
        changed.error = Some("changed in a transaction that fails".into());
        tx.update_action(&changed).await.unwrap();
        let mut missing = updated.clone();
        missing.id = ActionId::new();
        let failed = match tx.update_action(&missing).await {
            Err(e) => {
                drop(tx);
                Err(e)
            }
            Ok(()) => tx.commit().await,
        };
        assert!(matches!(failed, Err(StoreError::Internal(_))), "{n}: {failed:?}");
        let mut tx = b.store.read().await.unwrap();
        assert_eq!(tx.get_action(&o.id, &updated.id).await.unwrap(), Some(updated), "{n}");
        drop(tx);

        // Idempotency keys are unique per (org, agent).
        let mut tx = b.store.write().await.unwrap();
        let mut dup = action(&o, &bot, "finance.issue.card", ActionState::Submitted);
        dup.idempotency_key = Some("k-1".into());
        assert!(is_conflict(tx.insert_action(&dup).await), "{n}: idempotency key");
        drop(tx);

        let mut tx = b.store.read().await.unwrap();
        let mut newest_first: Vec<ActionId> = actions.iter().map(|a| a.id.clone()).collect();
        newest_first.sort();
        newest_first.reverse();
        let all = tx.list_actions(&o.id, &ActionFilter::default(), &page(100, None)).await.unwrap().items;
        assert_eq!(all.iter().map(|a| a.id.clone()).collect::<Vec<_>>(), newest_first, "{n}: newest first");
        // Cursor pages of two cover everything once.
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let chunk =
                tx.list_actions(&o.id, &ActionFilter::default(), &page(2, after.as_deref())).await.unwrap().items;
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 2, "{n}");
            after = chunk.last().map(|a| a.id.to_string());
            seen.extend(chunk.into_iter().map(|a| a.id));
        }
        assert_eq!(seen, newest_first, "{n}: cursor pages");
        let by_state = ActionFilter { state: Some(ActionState::Submitted), ..Default::default() };
        assert_eq!(tx.list_actions(&o.id, &by_state, &page(100, None)).await.unwrap().items.len(), 1, "{n}");
        let by_agent = ActionFilter { agent_id: Some(bot2.id.clone()), ..Default::default() };
        assert_eq!(tx.list_actions(&o.id, &by_agent, &page(100, None)).await.unwrap().items.len(), 1, "{n}");
        let by_cap = ActionFilter { capability: Some("crm.read.contact".into()), ..Default::default() };
        assert_eq!(tx.list_actions(&o.id, &by_cap, &page(100, None)).await.unwrap().items.len(), 2, "{n}");
        let both = ActionFilter {
            agent_id: Some(bot.id.clone()),
            capability: Some("crm.read.contact".into()),
            state: Some(ActionState::PendingApproval),
        };
        assert_eq!(
            tx.list_actions(&o.id, &both, &page(100, None)).await.unwrap().items,
            vec![actions[4].clone()],
            "{n}"
        );
        assert_eq!(tx.list_actions(&other.id, &by_agent, &page(100, None)).await.unwrap().items, vec![], "{n}");

        // Successes: succeeded, or record-only (no target) and approved by people.
        assert_eq!(tx.count_successes(&o.id, &bot.id, "finance.issue.card").await.unwrap(), 1, "{n}");
        assert_eq!(tx.count_successes(&other.id, &bot.id, "finance.issue.card").await.unwrap(), 0, "{n}");
        drop(tx);

        // Counted up to the cap, so a long history costs a submission nothing more.
        let cap = countersign_core::risk::PRECEDENT_CAP;
        let mut tx = b.store.write().await.unwrap();
        for _ in 0..cap + 5 {
            tx.insert_action(&action(&o, &bot2, "llm.chat.completion", ActionState::Succeeded)).await.unwrap();
        }
        assert_eq!(tx.count_successes(&o.id, &bot2.id, "llm.chat.completion").await.unwrap(), cap, "{n}");
        tx.commit().await.unwrap();
    }

    pub async fn approvals_and_decisions_round_trip(b: &Backend) {
        let (o, alice, bot) = seed(b, "apr").await;
        let (other, _, _) = seed(b, "other").await;
        let n = b.name;
        let carol = user(&o, "carol", Role::Approver);
        let mut tx = b.store.write().await.unwrap();
        tx.insert_user(&carol).await.unwrap();
        let mut approvals = Vec::new();
        for _ in 0..3 {
            let act = action(&o, &bot, "finance.issue.card", ActionState::PendingApproval);
            let apr = approval(&o, &act);
            tx.insert_action(&act).await.unwrap();
            tx.insert_approval(&apr).await.unwrap();
            approvals.push(apr);
        }
        approvals.sort_by(|a, b| a.id.cmp(&b.id));
        let first = approvals[0].clone();
        let d1 = decision(&alice, Decision::Approve, false);
        let d2 = decision(&carol, Decision::Approve, true);
        tx.insert_decision(&o.id, &first.id, &d1).await.unwrap();
        tx.insert_decision(&o.id, &first.id, &d2).await.unwrap();
        tx.commit().await.unwrap();

        let mut tx = b.store.write().await.unwrap();
        assert!(is_conflict(tx.insert_decision(&o.id, &first.id, &decision(&alice, Decision::Deny, true)).await));
        drop(tx);

        let mut tx = b.store.write().await.unwrap();
        let got = tx.get_approval(&o.id, &first.id).await.unwrap().unwrap();
        assert_eq!(got.decisions, vec![d1.clone(), d2.clone()], "{n}");
        assert_eq!(got.counted_approvals(), 1, "{n}");
        assert_eq!(Approval { decisions: Vec::new(), ..got.clone() }, first, "{n}");
        assert_eq!(tx.get_approval(&other.id, &first.id).await.unwrap(), None, "{n}: wrong org");
        assert_eq!(tx.find_approval_by_token_hash(&first.token_hash).await.unwrap(), Some(got.clone()), "{n}");
        assert_eq!(tx.find_approval_by_token_hash("nope").await.unwrap(), None, "{n}");
        assert_eq!(tx.count_pending_approvals().await.unwrap(), 3, "{n}");

        let mut decided = got.clone();
        decided.status = ApprovalStatus::Approved;
        decided.decided_at = Some(now());
        tx.update_approval(&decided).await.unwrap();
        tx.commit().await.unwrap();

        let mut tx = b.store.read().await.unwrap();
        assert_eq!(tx.get_approval(&o.id, &first.id).await.unwrap(), Some(decided.clone()), "{n}");
        let pending = tx.list_approvals(&o.id, Some(ApprovalStatus::Pending), &page(10, None)).await.unwrap().items;
        let pending_ids: Vec<_> = pending.iter().map(|a| a.id.clone()).collect();
        assert_eq!(pending_ids, vec![approvals[1].id.clone(), approvals[2].id.clone()], "{n}: oldest first");
        let after_first =
            tx.list_approvals(&o.id, Some(ApprovalStatus::Pending), &page(10, Some(approvals[1].id.as_str()))).await;
        assert_eq!(after_first.unwrap().items.len(), 1, "{n}: pending cursor");
        let all = tx.list_approvals(&o.id, None, &page(10, None)).await.unwrap().items;
        let all_ids: Vec<_> = all.iter().map(|a| a.id.clone()).collect();
        let mut newest_first: Vec<_> = approvals.iter().map(|a| a.id.clone()).collect();
        newest_first.reverse();
        assert_eq!(all_ids, newest_first, "{n}: history newest first");
        assert_eq!(all.last().unwrap().decisions.len(), 2, "{n}: listed with decisions");
        let approved = tx.list_approvals(&o.id, Some(ApprovalStatus::Approved), &page(10, None)).await.unwrap().items;
        assert_eq!(approved, vec![decided], "{n}");
        assert!(tx.list_approvals(&other.id, None, &page(10, None)).await.unwrap().items.is_empty(), "{n}");
        assert_eq!(tx.count_pending_approvals().await.unwrap(), 2, "{n}");
        let deadlines = tx.list_pending_deadlines().await.unwrap();
        assert_eq!(deadlines.len(), 2, "{n}");
        assert!(deadlines.iter().all(|d| d.org_id == o.id), "{n}");
    }

    pub async fn audit_appends_stay_gapless_under_concurrent_writers(b: &Backend) {
        const WRITERS: usize = 8;
        const APPENDS: usize = 50;
        let (o, _, _) = seed(b, "audit").await;
        let (other, _, _) = seed(b, "quiet").await;
        let n = b.name;
        let barrier = Arc::new(Barrier::new(WRITERS));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let store = b.store.clone();
            let org = o.id.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                for i in 0..APPENDS {
                    let mut tx = store.write().await.unwrap();
                    let actor = format!("writer-{w}");
                    let e = tx.append_audit(&org, event("test.append", &actor, None, i as i64)).await.unwrap();
                    tx.commit().await.unwrap();
                    assert!(e.seq >= 1);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let mut tx = b.store.read().await.unwrap();
        let events = tx.list_audit(&o.id, &AuditFilter::default(), 0, 10_000).await.unwrap();
        let total = (WRITERS * APPENDS) as i64;
        assert_eq!(events.len() as i64, total, "{n}");
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>(), "{n}");
        let mut verifier = ChainVerifier::default();
        events.iter().for_each(|e| verifier.push(e));
        let report = verifier.finish();
        assert!(report.ok, "{n}: chain broken at {:?}", report.first_broken_seq);
        let head = tx.audit_head(&o.id).await.unwrap().unwrap();
        assert_eq!((head.seq, head.hash), (total, report.head_hash), "{n}");
        assert_eq!(tx.audit_head(&other.id).await.unwrap(), None, "{n}: other org untouched");
        assert!(tx.list_audit(&other.id, &AuditFilter::default(), 0, 100).await.unwrap().is_empty(), "{n}");
        drop(tx);

        // A rolled-back append leaves no gap: the next one takes the same seq.
        let mut tx = b.store.write().await.unwrap();
        let lost = tx.append_audit(&o.id, event("test.lost", "x", None, 1)).await.unwrap();
        drop(tx);
        let mut tx = b.store.write().await.unwrap();
        let kept = tx.append_audit(&o.id, event("test.kept", "x", None, 1)).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!((lost.seq, kept.seq), (total + 1, total + 1), "{n}");
    }

    pub async fn many_appends_in_one_transaction_are_seen_by_it_and_land_together(b: &Backend) {
        // More than one multi-row insert's worth, for two orgs interleaved.
        const APPENDS: i64 = 150;
        let (o, _, _) = seed(b, "batch").await;
        let (other, _, _) = seed(b, "batch-other").await;
        let n = b.name;

        let mut tx = b.store.write().await.unwrap();
        for i in 0..APPENDS {
            let e = tx.append_audit(&o.id, event("test.batch", "x", None, i)).await.unwrap();
            assert_eq!(e.seq, i + 1, "{n}");
            if i % 50 == 0 {
                tx.append_audit(&other.id, event("test.other", "x", None, i)).await.unwrap();
            }
        }
        // Read back inside the transaction: every append is there, for both orgs.
        let head = tx.audit_head(&o.id).await.unwrap().unwrap();
        assert_eq!(head.seq, APPENDS, "{n}");
        assert_eq!(tx.audit_head(&other.id).await.unwrap().map(|h| h.seq), Some(3), "{n}");
        let after = tx.append_audit(&o.id, event("test.after-read", "x", None, 0)).await.unwrap();
        assert_eq!(after.prev_hash, head.hash, "{n}: an append after a read follows the head it read");
        drop(tx);
        let mut tx = b.store.read().await.unwrap();
        assert_eq!(tx.audit_head(&o.id).await.unwrap(), None, "{n}: a rolled-back batch left events behind");
        drop(tx);

        let mut tx = b.store.write().await.unwrap();
        for i in 0..APPENDS {
            tx.append_audit(&o.id, event("test.batch", "x", None, i)).await.unwrap();
        }
        tx.commit().await.unwrap();
        let mut tx = b.store.read().await.unwrap();
        let events = tx.list_audit(&o.id, &AuditFilter::default(), 0, 1_000).await.unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=APPENDS).collect::<Vec<_>>(), "{n}");
        let mut verifier = ChainVerifier::default();
        events.iter().for_each(|e| verifier.push(e));
        let report = verifier.finish();
        assert!(report.ok, "{n}: chain broken at {:?}", report.first_broken_seq);
        assert_eq!(tx.audit_head(&o.id).await.unwrap().map(|h| h.hash), Some(report.head_hash), "{n}");
    }

    pub async fn precedent_counts_successes_and_human_approved_records_only(b: &Backend) {
        let (o, _, bot) = seed(b, "precedent").await;
        let n = b.name;
        let cap = "files.write.note";
        let approved_by_people = |mut a: Action| {
            a.approval_id = Some(ApprovalId::new());
            a
        };
        let mut with_target = approved_by_people(action(&o, &bot, cap, ActionState::Approved));
        with_target.target = Some(http_target());
        let counted = [
            action(&o, &bot, cap, ActionState::Succeeded),
            approved_by_people(action(&o, &bot, cap, ActionState::Succeeded)),
            // Record-only, approved by people.
            approved_by_people(action(&o, &bot, cap, ActionState::Approved)),
        ];
        let not_counted = [
            // Record-only, allowed by the policy alone: a no-op an agent could repeat to farm precedent.
            action(&o, &bot, cap, ActionState::Approved),
            action(&o, &bot, cap, ActionState::Approved),
            // Approved but not yet carried out.
            with_target,
            approved_by_people(action(&o, &bot, cap, ActionState::Failed)),
            approved_by_people(action(&o, &bot, cap, ActionState::Denied)),
            action(&o, &bot, cap, ActionState::PendingApproval),
        ];
        let mut tx = b.store.write().await.unwrap();
        for a in counted.iter().chain(&not_counted) {
            tx.insert_action(a).await.unwrap();
        }
        assert_eq!(tx.count_successes(&o.id, &bot.id, cap).await.unwrap(), 3, "{n}");
        tx.commit().await.unwrap();

        // Allowed record-only no-ops never add up, however many there are.
        let mut tx = b.store.write().await.unwrap();
        for _ in 0..countersign_core::risk::PRECEDENT_CAP + 5 {
            tx.insert_action(&action(&o, &bot, cap, ActionState::Approved)).await.unwrap();
        }
        assert_eq!(tx.count_successes(&o.id, &bot.id, cap).await.unwrap(), 3, "{n}: farmed");
        tx.commit().await.unwrap();
    }

    pub async fn retention_ends_before_the_first_event_inside_the_window(b: &Backend) {
        let (o, _, _) = seed(b, "retention-end").await;
        let (empty, _, _) = seed(b, "retention-empty").await;
        let n = b.name;
        let cutoff = now();
        let old = (cutoff - TimeDelta::days(2)).timestamp_micros();
        let new = (cutoff + TimeDelta::seconds(1)).timestamp_micros();
        let mut tx = b.store.write().await.unwrap();
        assert_eq!(tx.last_audit_seq_before(&empty.id, cutoff).await.unwrap(), None, "{n}: no events");
        // Times do not strictly grow with seq: an old time can follow a new one.
        for time_us in [old, old, new, old] {
            tx.append_audit(&o.id, event("test.event", "alice", None, time_us)).await.unwrap();
        }
        tx.commit().await.unwrap();
        let mut tx = b.store.read().await.unwrap();
        assert_eq!(tx.last_audit_seq_before(&o.id, cutoff).await.unwrap(), Some(2), "{n}: stops before seq 3");
        // Exactly at the cutoff is not older than it.
        let at_new = DateTime::from_timestamp_micros(new).unwrap();
        assert_eq!(tx.last_audit_seq_before(&o.id, at_new).await.unwrap(), Some(2), "{n}");
        // Everything older: the head.
        let later = cutoff + TimeDelta::days(1);
        assert_eq!(tx.last_audit_seq_before(&o.id, later).await.unwrap(), Some(4), "{n}: all old");
        // The first event already inside the window: nothing.
        let earlier = cutoff - TimeDelta::days(3);
        assert_eq!(tx.last_audit_seq_before(&o.id, earlier).await.unwrap(), None, "{n}: none old");
        assert_eq!(tx.last_audit_seq_before(&empty.id, later).await.unwrap(), None, "{n}: other org");
    }

    pub async fn a_checkpoint_is_stored_once_per_seq_and_listed_in_seq_order(b: &Backend) {
        let (o, _, _) = seed(b, "checkpoints").await;
        let (other, _, _) = seed(b, "checkpoints-other").await;
        let n = b.name;
        let first = checkpoint(&o, 3, "aaaa");
        let mut tx = b.store.write().await.unwrap();
        tx.insert_checkpoint(&first).await.unwrap();
        // A second replica signing the same seq: no conflict, and the first stays.
        let second =
            Checkpoint { time_us: first.time_us + 1, signature: "b3RoZXI=".into(), ..checkpoint(&o, 3, "bbbb") };
        tx.insert_checkpoint(&second).await.unwrap();
        assert_eq!(tx.checkpoint_at(&o.id, 3).await.unwrap(), Some(first.clone()), "{n}: the first is kept");
        tx.commit().await.unwrap();

        // The same from two transactions, as two replicas would.
        let mut tx = b.store.write().await.unwrap();
        tx.insert_checkpoint(&second).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = b.store.write().await.unwrap();
        let later: Vec<Checkpoint> = [7, 5, 9].into_iter().map(|seq| checkpoint(&o, seq, &format!("h{seq}"))).collect();
        for c in &later {
            tx.insert_checkpoint(c).await.unwrap();
        }
        tx.insert_checkpoint(&checkpoint(&other, 4, "elsewhere")).await.unwrap();
        tx.commit().await.unwrap();

        let mut tx = b.store.read().await.unwrap();
        let seqs = |list: Vec<Checkpoint>| list.into_iter().map(|c| c.seq).collect::<Vec<_>>();
        assert_eq!(seqs(tx.list_checkpoints(&o.id, 0, i64::MAX, 100).await.unwrap()), vec![3, 5, 7, 9], "{n}");
        assert_eq!(tx.list_checkpoints(&o.id, 0, 3, 100).await.unwrap(), vec![first], "{n}: the first kept");
        assert_eq!(seqs(tx.list_checkpoints(&o.id, 3, 7, 100).await.unwrap()), vec![5, 7], "{n}: (after, upto]");
        assert_eq!(seqs(tx.list_checkpoints(&o.id, 0, i64::MAX, 2).await.unwrap()), vec![3, 5], "{n}: limit");
        assert_eq!(tx.list_checkpoints(&o.id, 9, i64::MAX, 100).await.unwrap(), vec![], "{n}");
        assert_eq!(seqs(tx.list_checkpoints(&other.id, 0, i64::MAX, 100).await.unwrap()), vec![4], "{n}: per org");
    }

    pub async fn audit_filters_select_events(b: &Backend) {
        let (o, _, _) = seed(b, "filters").await;
        let n = b.name;
        let mut tx = b.store.write().await.unwrap();
        let specs = [
            ("approval.requested", "alice", Some("apr_1"), 100),
            ("approval.approved", "bob", Some("apr_1"), 200),
            ("action.submitted", "alice", Some("act_1"), 300),
            ("action.executed", "system", Some("act_2"), 400),
            ("approvals.other", "carol", None, 500),
        ];
        for (action, actor, subject, time) in specs {
            tx.append_audit(&o.id, event(action, actor, subject, time)).await.unwrap();
        }
        tx.commit().await.unwrap();
        let mut tx = b.store.read().await.unwrap();
        let seqs = |events: Vec<countersign_core::audit::AuditEvent>| events.iter().map(|e| e.seq).collect::<Vec<_>>();
        let cases: Vec<(AuditFilter, i64, Vec<i64>)> = vec![
            (AuditFilter::default(), 0, vec![1, 2, 3, 4, 5]),
            (AuditFilter::default(), 3, vec![4, 5]),
            (AuditFilter { action: Some("approval.approved".into()), ..Default::default() }, 0, vec![2]),
            (AuditFilter { action: Some("approval.*".into()), ..Default::default() }, 0, vec![1, 2]),
            (AuditFilter { action: Some("action.*".into()), ..Default::default() }, 3, vec![4]),
            (AuditFilter { actor: Some("alice".into()), ..Default::default() }, 0, vec![1, 3]),
            (AuditFilter { subjects: vec!["apr_1".into(), "act_2".into()], ..Default::default() }, 0, vec![1, 2, 4]),
            (AuditFilter { since_us: Some(200), until_us: Some(400), ..Default::default() }, 0, vec![2, 3, 4]),
            (
                AuditFilter {
                    action: Some("approval.*".into()),
                    actor: Some("bob".into()),
                    subjects: vec!["apr_1".into()],
                    since_us: Some(150),
                    until_us: None,
                },
                0,
                vec![2],
            ),
        ];
        for (filter, after, expected) in cases {
            let got = seqs(tx.list_audit(&o.id, &filter, after, 100).await.unwrap());
            assert_eq!(got, expected, "{n}: {filter:?} after {after}");
        }
        assert_eq!(seqs(tx.list_audit(&o.id, &AuditFilter::default(), 0, 2).await.unwrap()), vec![1, 2], "{n}");
        // Newest first, before a seq (or from the head), with the same filters.
        let newest: Vec<(AuditFilter, Option<i64>, u32, Vec<i64>)> = vec![
            (AuditFilter::default(), None, 100, vec![5, 4, 3, 2, 1]),
            (AuditFilter::default(), None, 2, vec![5, 4]),
            (AuditFilter::default(), Some(4), 2, vec![3, 2]),
            (AuditFilter::default(), Some(1), 100, vec![]),
            (AuditFilter { action: Some("approval.*".into()), ..Default::default() }, None, 100, vec![2, 1]),
            (AuditFilter { actor: Some("alice".into()), ..Default::default() }, Some(3), 100, vec![1]),
            (AuditFilter { since_us: Some(200), until_us: Some(400), ..Default::default() }, None, 2, vec![4, 3]),
        ];
        for (filter, before, limit, expected) in newest {
            let got = seqs(tx.list_audit_newest(&o.id, &filter, before, limit).await.unwrap());
            assert_eq!(got, expected, "{n}: newest {filter:?} before {before:?}");
        }
        let before = DateTime::from_timestamp_micros(300).unwrap();
        assert_eq!(tx.last_audit_seq_before(&o.id, before).await.unwrap(), Some(2), "{n}");
        let epoch = DateTime::from_timestamp_micros(0).unwrap();
        assert_eq!(tx.last_audit_seq_before(&o.id, epoch).await.unwrap(), None, "{n}");
        let events = tx.list_audit(&o.id, &AuditFilter::default(), 0, 100).await.unwrap();
        assert_eq!(events[0].data, json!({"k": "approval.requested", "n": 1.5}), "{n}: data round trip");
        assert_eq!(events[0].actor.id, "alice", "{n}");
    }

    pub async fn schema_refuses_audit_changes_and_retention_needs_a_checkpoint(b: &Backend) {
        let (o, _, _) = seed(b, "retention").await;
        let n = b.name;
        let mut tx = b.store.write().await.unwrap();
        let mut events = Vec::new();
        for i in 0..10 {
            events.push(tx.append_audit(&o.id, event("test.event", "alice", None, i)).await.unwrap());
        }
        tx.commit().await.unwrap();

        // Raw SQL cannot change or remove an event.
        let err = b.raw("UPDATE audit_events SET action = 'forged'").await.unwrap_err();
        assert!(err.contains("append-only"), "{n}: {err}");
        let err = b.raw("DELETE FROM audit_events").await.unwrap_err();
        assert!(err.contains("append-only"), "{n}: {err}");
        if matches!(b.raw, Raw::Postgres(_)) {
            let err = b.raw("TRUNCATE audit_events").await.unwrap_err();
            assert!(err.contains("append-only"), "{n}: {err}");
        }

        // Retention without a checkpoint at its end is refused, and takes nothing with it.
        let mut tx = b.store.write().await.unwrap();
        let refused = tx.delete_audit_prefix(&o.id, 5).await;
        assert!(refused.is_err(), "{n}: {refused:?}");
        drop(tx);
        assert_eq!(b.store.read().await.unwrap().retention(&o.id).await.unwrap().deleted_upto, 0, "{n}");

        // Behind a checkpoint, the prefix goes and the rest still verifies from it.
        let mut tx = b.store.write().await.unwrap();
        tx.set_retention_days(&o.id, Some(30)).await.unwrap();
        let stored = checkpoint(&o, 5, &events[4].hash);
        tx.insert_checkpoint(&stored).await.unwrap();
        assert_eq!(tx.delete_audit_prefix(&o.id, 5).await.unwrap(), 5, "{n}");
        tx.commit().await.unwrap();
        let mut tx = b.store.write().await.unwrap();
        let rest = tx.list_audit(&o.id, &AuditFilter::default(), 0, 100).await.unwrap();
        assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![6, 7, 8, 9, 10], "{n}");
        let cp = tx.checkpoint_at(&o.id, 5).await.unwrap().unwrap();
        assert_eq!(cp, stored, "{n}");
        assert_eq!(tx.checkpoint_at(&o.id, 6).await.unwrap(), None, "{n}");
        let mut verifier = ChainVerifier::starting_after(cp.seq, &cp.head_hash);
        rest.iter().for_each(|e| verifier.push(e));
        assert!(verifier.finish().ok, "{n}: the kept suffix verifies from the checkpoint");
        let retention = tx.retention(&o.id).await.unwrap();
        assert_eq!((retention.days, retention.deleted_upto), (Some(30), 5), "{n}");
        assert_eq!(tx.list_retention_windows().await.unwrap(), vec![retention], "{n}");
        // Appends go on after the head, not after the deleted prefix.
        let next = tx.append_audit(&o.id, event("test.after", "alice", None, 11)).await.unwrap();
        assert_eq!((next.seq, next.prev_hash.as_str()), (11, events[9].hash.as_str()), "{n}");
        tx.set_retention_days(&o.id, None).await.unwrap();
        assert!(tx.list_retention_windows().await.unwrap().is_empty(), "{n}");
        tx.commit().await.unwrap();

        // Nothing past the declared prefix can go, even with a checkpoint in place.
        let err = b.raw("DELETE FROM audit_events WHERE seq = 7").await.unwrap_err();
        assert!(err.contains("append-only"), "{n}: {err}");
        // Retention only moves forward; checkpoints are never changed or removed.
        let err = b.raw("UPDATE audit_retention SET deleted_upto = 1").await.unwrap_err();
        assert!(err.contains("only moves forward"), "{n}: {err}");
        let mut tx = b.store.write().await.unwrap();
        assert!(tx.delete_audit_prefix(&o.id, 3).await.is_err(), "{n}: backwards");
        drop(tx);
        let err = b.raw("UPDATE audit_checkpoints SET seq = 6").await.unwrap_err();
        assert!(err.contains("append-only"), "{n}: {err}");
        let err = b.raw("DELETE FROM audit_checkpoints").await.unwrap_err();
        assert!(err.contains("append-only"), "{n}: {err}");
        // One checkpoint per seq: signing it again keeps the first.
        let mut tx = b.store.write().await.unwrap();
        tx.insert_checkpoint(&checkpoint(&o, 5, "x")).await.unwrap();
        assert_eq!(tx.checkpoint_at(&o.id, 5).await.unwrap(), Some(stored.clone()), "{n}: one checkpoint per seq");
        drop(tx);

        // Retention that takes every event: the chain goes on from the checkpoint, never from genesis.
        let mut tx = b.store.write().await.unwrap();
        let all = tx.list_audit(&o.id, &AuditFilter::default(), 0, 100).await.unwrap();
        let last = all.last().unwrap().clone();
        tx.insert_checkpoint(&checkpoint(&o, last.seq, &last.hash)).await.unwrap();
        tx.delete_audit_prefix(&o.id, last.seq).await.unwrap();
        let next = tx.append_audit(&o.id, event("test.after-all", "alice", None, 12)).await.unwrap();
        assert_eq!((next.seq, next.prev_hash.as_str()), (last.seq + 1, last.hash.as_str()), "{n}");
        tx.commit().await.unwrap();
    }

    pub async fn concurrent_claimers_take_each_job_once(b: &Backend) {
        const JOBS: usize = 100;
        const CLAIMERS: usize = 8;
        let (o1, _, _) = seed(b, "jobs-a").await;
        let (o2, _, _) = seed(b, "jobs-b").await;
        let n = b.name;
        let start = now();
        let mut tx = b.store.write().await.unwrap();
        for i in 0..JOBS {
            let org = if i % 2 == 0 { &o1 } else { &o2 };
            let job =
                Job::new(org.id.clone(), JobKind::WebhookDeliver, Some(format!("wh_{i}")), json!({"i": i}), start);
            tx.insert_job(&job).await.unwrap();
        }
        // Not yet due: never claimed here.
        let later = Job::new(o1.id.clone(), JobKind::AuditExport, None, json!({}), start + TimeDelta::hours(1));
        tx.insert_job(&later).await.unwrap();
        tx.commit().await.unwrap();

        let barrier = Arc::new(Barrier::new(CLAIMERS));
        let mut tasks = Vec::new();
        for c in 0..CLAIMERS {
            let store = b.store.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let owner = format!("claimer-{c}");
                let mut claimed = Vec::new();
                barrier.wait().await;
                loop {
                    let mut tx = store.write().await.unwrap();
                    let job = tx.claim_job(now(), &owner, now() + TimeDelta::minutes(5)).await.unwrap();
                    tx.commit().await.unwrap();
                    match job {
                        Some(job) => {
                            assert_eq!(job.lease_owner.as_deref(), Some(owner.as_str()));
                            claimed.push(job.id);
                        }
                        None => break,
                    }
                }
                claimed
            }));
        }
        let mut all = Vec::new();
        let mut per_claimer = Vec::new();
        for task in tasks {
            let claimed = task.await.unwrap();
            per_claimer.push(claimed.len());
            all.extend(claimed);
        }
        let unique: HashSet<_> = all.iter().cloned().collect();
        assert_eq!(all.len(), JOBS, "{n}: every job claimed once ({per_claimer:?})");
        assert_eq!(unique.len(), JOBS, "{n}: no job claimed twice");
        eprintln!("{n}: jobs per claimer {per_claimer:?}");
        let mut tx = b.store.read().await.unwrap();
        for id in all.iter().take(10) {
            let org = if tx.get_job(&o1.id, id).await.unwrap().is_some() { &o1 } else { &o2 };
            let job = tx.get_job(&org.id, id).await.unwrap().unwrap();
            assert_eq!((job.state, job.attempts), (JobState::Running, 1), "{n}");
            assert!(job.started_at.is_some(), "{n}");
        }
        assert_eq!(tx.get_job(&o1.id, &later.id).await.unwrap().unwrap().state, JobState::Queued, "{n}");
        let mut open = tx.count_open_jobs().await.unwrap();
        open.sort_by_key(|(kind, state, _)| (kind.as_str(), state.as_str()));
        assert_eq!(
            open,
            vec![
                (JobKind::AuditExport, JobState::Queued, 1),
                (JobKind::WebhookDeliver, JobState::Running, JOBS as i64)
            ],
            "{n}"
        );
    }

    /// The job list's `agent` filter: only `action.execute` jobs whose action is that agent's (in the org).
    pub async fn an_agent_lists_only_the_executions_of_its_own_actions(b: &Backend) {
        let (o, u, bot) = seed(b, "executions").await;
        let n = b.name;
        let peer = agent(&o, "peer", Some(&u));
        let mine = action(&o, &bot, "email.send.message", ActionState::Approved);
        let theirs = action(&o, &peer, "email.send.message", ActionState::Approved);
        let job = |kind, subject: &Action| Job::new(o.id.clone(), kind, Some(subject.id.to_string()), json!({}), now());
        let (mine_1, mine_2) = (job(JobKind::ActionExecute, &mine), job(JobKind::ActionExecute, &mine));
        let theirs_1 = job(JobKind::ActionExecute, &theirs);
        // Another kind of job naming the agent's action is not an execution.
        let other_kind = job(JobKind::WebhookDeliver, &mine);
        let mut tx = b.store.write().await.unwrap();
        tx.insert_agent(&peer).await.unwrap();
        tx.insert_action(&mine).await.unwrap();
        tx.insert_action(&theirs).await.unwrap();
        for j in [&mine_1, &theirs_1, &other_kind, &mine_2] {
            tx.insert_job(j).await.unwrap();
        }
        tx.commit().await.unwrap();
        let mut tx = b.store.read().await.unwrap();
        let ids = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
        let by_bot = JobFilter { agent: Some(bot.id.clone()), ..Default::default() };
        let mut expected = vec![mine_1.id.clone(), mine_2.id.clone()];
        expected.sort();
        expected.reverse();
        assert_eq!(ids(tx.list_jobs(&o.id, &by_bot, &page(10, None)).await.unwrap()), expected, "{n}");
        // A full page of the agent's own: the limit counts only what it may see.
        let first = tx.list_jobs(&o.id, &by_bot, &page(1, None)).await.unwrap();
        assert_eq!(ids(first), expected[..1], "{n}");
        let by_peer = JobFilter { agent: Some(peer.id.clone()), ..Default::default() };
        assert_eq!(ids(tx.list_jobs(&o.id, &by_peer, &page(10, None)).await.unwrap()), vec![theirs_1.id], "{n}");
        let succeeded = JobFilter { state: Some(JobState::Succeeded), ..by_bot };
        assert!(tx.list_jobs(&o.id, &succeeded, &page(10, None)).await.unwrap().is_empty(), "{n}: filters combine");
    }

    /// A page of actions, or of approvals with their actions, stops once its rows carry `PAGE_BYTES` of stored
    /// text, and says it was cut; the first row comes whatever its size, and the next page goes on from there.
    pub async fn pages_of_actions_and_approvals_stop_at_the_byte_budget(b: &Backend) {
        let (o, _, bot) = seed(b, "page-bytes").await;
        let n = b.name;
        let third = "x".repeat(usize::try_from(PAGE_BYTES / 3).unwrap());
        // Five actions of about a third of the budget each, in each column that can be large.
        let mut actions = Vec::new();
        for i in 0..5 {
            let mut a = action(&o, &bot, "email.send.message", ActionState::PendingApproval);
            match i {
                0 => a.params = json!({"body": third}),
                1 => a.reasoning = third.clone(),
                2 => a.result = Some(json!(third)),
                3 => a.error = Some(third.clone()),
                _ => a.target = Some(Target::Http(HttpTarget { body: Some(json!(third)), ..http_target_parts() })),
            }
            actions.push(a);
        }
        // Ids made in one millisecond need not sort in the order they were made; the indexes below are in id order.
        actions.sort_by(|a, b| a.id.cmp(&b.id));
        // One over the whole budget, after a small one, under another capability.
        let mut pair = [0, 1].map(|_| action(&o, &bot, "files.upload.blob", ActionState::PendingApproval));
        pair.sort_by(|a, b| a.id.cmp(&b.id));
        let [small, mut huge] = pair;
        huge.params = json!({"blob": "y".repeat(usize::try_from(PAGE_BYTES).unwrap() + 10)});
        let mut approvals: Vec<Approval> = actions.iter().map(|a| approval(&o, a)).collect();
        approvals.sort_by(|a, b| a.id.cmp(&b.id));
        let mut tx = b.store.write().await.unwrap();
        for a in actions.iter().chain([&small, &huge]) {
            tx.insert_action(a).await.unwrap();
        }
        for ap in &approvals {
            tx.insert_approval(ap).await.unwrap();
        }
        tx.commit().await.unwrap();

        let mut tx = b.store.read().await.unwrap();
        let ids = |actions: &[Action]| actions.iter().map(|a| a.id.clone()).collect::<Vec<_>>();
        let mail = ActionFilter { capability: Some("email.send.message".into()), ..Default::default() };
        // Newest first: 4, 3, 2 fit (what comes before 2 is two thirds); 1 would pass the budget.
        let first = tx.list_actions(&o.id, &mail, &page(100, None)).await.unwrap();
        assert_eq!(ids(&first.items), [4, 3, 2].map(|i| actions[i].id.clone()), "{n}");
        assert!(first.cut, "{n}: a page cut at the budget says so");
        let rest = tx.list_actions(&o.id, &mail, &page(100, Some(actions[2].id.as_str()))).await.unwrap();
        assert_eq!(ids(&rest.items), [1, 0].map(|i| actions[i].id.clone()), "{n}");
        assert!(!rest.cut, "{n}: the last page is not cut");
        assert_eq!(rest.items[1], actions[0], "{n}: rows come whole");
        let blobs = ActionFilter { capability: Some("files.upload.blob".into()), ..Default::default() };
        let first = tx.list_actions(&o.id, &blobs, &page(100, None)).await.unwrap();
        assert_eq!(ids(&first.items), [huge.id.clone()], "{n}: a row over the budget comes alone");
        assert!(first.cut, "{n}");
        let under_limit = tx.list_actions(&o.id, &mail, &page(2, None)).await.unwrap();
        assert_eq!(under_limit.items.len(), 2, "{n}");
        assert!(!under_limit.cut, "{n}: a page the limit ends is not cut");

        let approval_ids = |list: &[Approval]| list.iter().map(|a| a.id.clone()).collect::<Vec<_>>();
        let pending = Some(ApprovalStatus::Pending);
        // The queue, oldest first: 0, 1, 2 fit.
        let first = tx.list_approvals(&o.id, pending, &page(100, None)).await.unwrap();
        assert_eq!(approval_ids(&first.items), [0, 1, 2].map(|i| approvals[i].id.clone()), "{n}");
        assert!(first.cut, "{n}");
        let rest = tx.list_approvals(&o.id, pending, &page(100, Some(approvals[2].id.as_str()))).await.unwrap();
        assert_eq!(approval_ids(&rest.items), [3, 4].map(|i| approvals[i].id.clone()), "{n}");
        assert!(!rest.cut, "{n}");
        // The history, newest first: 4, 3, 2 fit.
        let history = tx.list_approvals(&o.id, None, &page(100, None)).await.unwrap();
        assert_eq!(approval_ids(&history.items), [4, 3, 2].map(|i| approvals[i].id.clone()), "{n}");
        assert!(history.cut, "{n}");
    }

    /// A job whose lease ran out is taken before a due queued job, even one due long before: a backlog of
    /// queued jobs does not keep a dead runner's job (and its action, stuck `executing`) waiting.
    pub async fn an_expired_lease_is_taken_before_the_queue(b: &Backend) {
        let (o, _, _) = seed(b, "dead-runner").await;
        let n = b.name;
        let t0 = now();
        let at = |secs: i64| t0 + TimeDelta::seconds(secs);
        let mut tx = b.store.write().await.unwrap();
        let stuck = Job::new(o.id.clone(), JobKind::ActionExecute, Some("act_x".into()), json!({}), at(-60));
        tx.insert_job(&stuck).await.unwrap();
        assert_eq!(tx.claim_job(at(-60), "dead", at(-30)).await.unwrap().map(|j| j.id), Some(stuck.id.clone()));
        let backlog = Job::new(o.id.clone(), JobKind::WebhookDeliver, Some("whd_x".into()), json!({}), at(-3600));
        tx.insert_job(&backlog).await.unwrap();
        let taken = tx.claim_job(at(0), "alive", at(30)).await.unwrap().unwrap();
        assert_eq!((taken.id, taken.attempts, taken.lease_owner.as_deref()), (stuck.id, 2, Some("alive")), "{n}");
        assert_eq!(tx.claim_job(at(0), "alive", at(30)).await.unwrap().map(|j| j.id), Some(backlog.id), "{n}");
        assert_eq!(tx.claim_job(at(0), "alive", at(30)).await.unwrap(), None, "{n}");
        tx.commit().await.unwrap();
    }

    pub async fn leases_expire_renew_and_release(b: &Backend) {
        let (o, _, _) = seed(b, "leases").await;
        let (other, _, _) = seed(b, "other").await;
        let n = b.name;
        let t0 = now();
        let at = |secs: i64| t0 + TimeDelta::seconds(secs);
        let job = Job::new(o.id.clone(), JobKind::ActionExecute, Some("act_x".into()), json!({"a": 1}), t0);
        let mut tx = b.store.write().await.unwrap();
        tx.insert_job(&job).await.unwrap();
        assert_eq!(tx.next_job_due().await.unwrap(), Some(t0), "{n}: queued job due");
        assert_eq!(tx.claim_job(at(-1), "early", at(60)).await.unwrap(), None, "{n}: not due yet");
        let claimed = tx.claim_job(at(0), "first", at(10)).await.unwrap().unwrap();
        assert_eq!(
            (claimed.state, claimed.attempts, claimed.lease_owner.as_deref(), claimed.lease_until, claimed.started_at),
            (JobState::Running, 1, Some("first"), Some(at(10)), Some(t0)),
            "{n}"
        );
        tx.commit().await.unwrap();

        let mut tx = b.store.write().await.unwrap();
        assert_eq!(tx.next_job_due().await.unwrap(), Some(at(10)), "{n}: the lease's end");
        assert_eq!(tx.claim_job(at(5), "second", at(60)).await.unwrap(), None, "{n}: the lease is live");
        assert!(!tx.renew_job_lease(&job.id, "second", at(30)).await.unwrap(), "{n}: not the holder");
        assert!(tx.renew_job_lease(&job.id, "first", at(20)).await.unwrap(), "{n}");
        assert_eq!(tx.claim_job(at(15), "second", at(60)).await.unwrap(), None, "{n}: renewed lease is live");
        let retaken = tx.claim_job(at(21), "second", at(60)).await.unwrap().unwrap();
        assert_eq!(
            (retaken.id.clone(), retaken.attempts, retaken.lease_owner.as_deref(), retaken.started_at),
            (job.id.clone(), 2, Some("second"), Some(t0)),
            "{n}: an expired lease is claimable again"
        );
        assert!(!tx.renew_job_lease(&job.id, "first", at(90)).await.unwrap(), "{n}: the lease was lost");
        tx.commit().await.unwrap();

        // Release: every running lease ends now, so the job is claimable at once.
        let mut tx = b.store.write().await.unwrap();
        assert_eq!(tx.release_job_leases(at(22)).await.unwrap(), 1, "{n}");
        let third = tx.claim_job(at(22), "third", at(80)).await.unwrap().unwrap();
        assert_eq!(third.attempts, 3, "{n}");

        // Finishing is an update; a finished job is never claimed.
        let mut done = third.clone();
        done.state = JobState::Succeeded;
        done.lease_owner = None;
        done.lease_until = None;
        done.progress = Some(json!({"pct": 100}));
        done.result = Some(json!({"ok": true}));
        done.finished_at = Some(at(23));
        tx.update_job(&done).await.unwrap();
        assert_eq!(tx.get_job(&o.id, &job.id).await.unwrap(), Some(done.clone()), "{n}");
        assert_eq!(tx.get_job(&other.id, &job.id).await.unwrap(), None, "{n}: wrong org");
        assert_eq!(tx.claim_job(at(3600), "late", at(3700)).await.unwrap(), None, "{n}");
        assert_eq!(tx.next_job_due().await.unwrap(), None, "{n}");
        assert!(!tx.renew_job_lease(&job.id, "third", at(90)).await.unwrap(), "{n}: finished");

        let mut failed = Job::new(o.id.clone(), JobKind::AuditRetention, Some("org".into()), json!({}), t0);
        failed.state = JobState::Failed;
        failed.error = Some("boom".into());
        tx.insert_job(&failed).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = b.store.read().await.unwrap();
        let all = tx.list_jobs(&o.id, &JobFilter::default(), &page(10, None)).await.unwrap();
        let mut newest_first = vec![job.id.clone(), failed.id.clone()];
        newest_first.sort();
        newest_first.reverse();
        assert_eq!(all.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), newest_first, "{n}");
        let one = tx.list_jobs(&o.id, &JobFilter::default(), &page(1, Some(newest_first[0].as_str()))).await.unwrap();
        assert_eq!(one.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![newest_first[1].clone()], "{n}");
        let by_kind = JobFilter { kind: Some(JobKind::AuditRetention), ..Default::default() };
        assert_eq!(tx.list_jobs(&o.id, &by_kind, &page(10, None)).await.unwrap(), vec![failed.clone()], "{n}");
        let by_state = JobFilter { state: Some(JobState::Succeeded), ..Default::default() };
        assert_eq!(tx.list_jobs(&o.id, &by_state, &page(10, None)).await.unwrap(), vec![done], "{n}");
        let by_subject = JobFilter { subject: Some("org".into()), ..Default::default() };
        assert_eq!(tx.list_jobs(&o.id, &by_subject, &page(10, None)).await.unwrap().len(), 1, "{n}");
        assert!(tx.list_jobs(&other.id, &JobFilter::default(), &page(10, None)).await.unwrap().is_empty(), "{n}");
        assert!(tx.count_open_jobs().await.unwrap().is_empty(), "{n}");
    }

    pub async fn webhooks_and_deliveries_round_trip(b: &Backend) {
        let (o, _, _) = seed(b, "hooks").await;
        let (other, _, _) = seed(b, "other").await;
        let n = b.name;
        let hook = |format| Webhook {
            id: WebhookId::new(),
            org_id: o.id.clone(),
            url: "https://hooks.example/in".into(),
            events: vec![NameGlob::parse("approval.*").unwrap(), NameGlob::parse("action.failed").unwrap()],
            secret: "whsec_123".into(),
            format,
            description: Some("ops".into()),
            created_at: now(),
            deleted_at: None,
        };
        let mut hooks = [hook(WebhookFormat::Json), hook(WebhookFormat::Slack)];
        hooks.sort_by(|a, b| a.id.cmp(&b.id));
        let job = Job::new(o.id.clone(), JobKind::WebhookDeliver, Some(hooks[0].id.to_string()), json!({}), now());
        let mut tx = b.store.write().await.unwrap();
        for h in &hooks {
            tx.insert_webhook(h).await.unwrap();
        }
        tx.insert_job(&job).await.unwrap();
        let mut deliveries = Vec::new();
        for attempt in 1..=3 {
            let d = Delivery {
                id: DeliveryId::new(),
                org_id: o.id.clone(),
                webhook_id: hooks[0].id.clone(),
                job_id: job.id.clone(),
                event_id: "evt_1".into(),
                event_type: "approval.requested".into(),
                attempt,
                status: if attempt == 3 { Some(200) } else { None },
                latency_ms: 12 * u64::from(attempt),
                error: if attempt == 3 { None } else { Some("connection refused".into()) },
                created_at: now(),
            };
            tx.insert_delivery(&d).await.unwrap();
            deliveries.push(d);
        }
        tx.commit().await.unwrap();

        let mut tx = b.store.write().await.unwrap();
        assert_eq!(tx.get_webhook(&o.id, &hooks[0].id).await.unwrap().as_ref(), Some(&hooks[0]), "{n}");
        assert_eq!(tx.get_webhook(&other.id, &hooks[0].id).await.unwrap(), None, "{n}: wrong org");
        assert_eq!(tx.list_webhooks(&o.id).await.unwrap(), hooks.to_vec(), "{n}: oldest first");
        assert!(tx.list_webhooks(&other.id).await.unwrap().is_empty(), "{n}");
        assert!(!tx.delete_webhook(&other.id, &hooks[1].id, now()).await.unwrap(), "{n}: wrong org");
        assert!(tx.delete_webhook(&o.id, &hooks[1].id, now()).await.unwrap(), "{n}");
        assert!(!tx.delete_webhook(&o.id, &hooks[1].id, now()).await.unwrap(), "{n}: already deleted");
        assert_eq!(tx.list_webhooks(&o.id).await.unwrap(), vec![hooks[0].clone()], "{n}");
        let deleted = tx.get_webhook(&o.id, &hooks[1].id).await.unwrap().unwrap();
        assert!(deleted.deleted_at.is_some(), "{n}: history stays readable");
        tx.commit().await.unwrap();

        let mut tx = b.store.read().await.unwrap();
        let mut newest_first = deliveries.clone();
        newest_first.sort_by(|a, b| b.id.cmp(&a.id));
        let listed = tx.list_deliveries(&o.id, &hooks[0].id, &page(10, None)).await.unwrap();
        assert_eq!(listed, newest_first, "{n}: newest first");
        let second_page =
            tx.list_deliveries(&o.id, &hooks[0].id, &page(2, Some(newest_first[1].id.as_str()))).await.unwrap();
        assert_eq!(second_page, vec![newest_first[2].clone()], "{n}: cursor");
        assert!(tx.list_deliveries(&other.id, &hooks[0].id, &page(10, None)).await.unwrap().is_empty(), "{n}");
        assert!(tx.list_deliveries(&o.id, &hooks[1].id, &page(10, None)).await.unwrap().is_empty(), "{n}");
    }

    pub async fn concurrent_writers_serialise_on_an_approval(b: &Backend) {
        const DECIDERS: usize = 4;
        let (o, _, bot) = seed(b, "race").await;
        let n = b.name;
        let act = action(&o, &bot, "finance.issue.card", ActionState::PendingApproval);
        let apr = approval(&o, &act);
        let mut tx = b.store.write().await.unwrap();
        tx.insert_action(&act).await.unwrap();
        tx.insert_approval(&apr).await.unwrap();
        tx.commit().await.unwrap();

        // Each decider reads the approval in a writer, decides only if it is still pending, and holds its
        // transaction open for a while so the others overlap with it.
        let barrier = Arc::new(Barrier::new(DECIDERS));
        let mut tasks = Vec::new();
        for d in 0..DECIDERS {
            let store = b.store.clone();
            let barrier = barrier.clone();
            let (org, id) = (o.id.clone(), apr.id.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut tx = store.write().await.unwrap();
                let mut approval = tx.get_approval(&org, &id).await.unwrap().unwrap();
                if approval.status != ApprovalStatus::Pending {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
                approval.status = ApprovalStatus::Approved;
                approval.decided_at = Some(now());
                tx.update_approval(&approval).await.unwrap();
                tx.append_audit(&org, event("approval.approved", &format!("decider-{d}"), Some(id.as_str()), 1))
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                Some(d)
            }));
        }
        // Meanwhile a reader is never blocked by the writers' locks.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        let seen = b.store.read().await.unwrap().get_approval(&o.id, &apr.id).await.unwrap().unwrap();
        let reader_waited = started.elapsed();
        let mut winners = Vec::new();
        for task in tasks {
            if let Some(d) = task.await.unwrap() {
                winners.push(d);
            }
        }
        assert_eq!(winners.len(), 1, "{n}: exactly one decider saw it pending ({winners:?})");
        assert!(reader_waited < Duration::from_millis(1000), "{n}: reader waited {reader_waited:?}");
        assert!(matches!(seen.status, ApprovalStatus::Pending | ApprovalStatus::Approved), "{n}");
        let mut tx = b.store.read().await.unwrap();
        assert_eq!(tx.get_approval(&o.id, &apr.id).await.unwrap().unwrap().status, ApprovalStatus::Approved);
        assert_eq!(tx.list_audit(&o.id, &AuditFilter::default(), 0, 100).await.unwrap().len(), 1, "{n}");
    }

    /// PostgreSQL only: a writer that cannot get a row lock in time (SQLSTATE 55P03) gets `Unavailable`, which
    /// the gateway answers as "retry later". (SQLite's equivalent is its 10 s busy timeout, too slow to test.)
    pub async fn lock_waits_that_time_out_are_unavailable(b: &Backend) {
        let Some(url) = &b.url else {
            eprintln!("{}: lock timeouts are checked on PostgreSQL only", b.name);
            return;
        };
        let (o, _, bot) = seed(b, "locks").await;
        let act = action(&o, &bot, "finance.issue.card", ActionState::PendingApproval);
        let apr = approval(&o, &act);
        let mut tx = b.store.write().await.unwrap();
        tx.insert_action(&act).await.unwrap();
        tx.insert_approval(&apr).await.unwrap();
        tx.commit().await.unwrap();
        // A second replica whose sessions give up on a lock after 100 ms.
        let impatient = b.replica_with(url, "lock_timeout = '100ms'").await;

        let mut holder = b.store.write().await.unwrap();
        assert!(holder.get_approval(&o.id, &apr.id).await.unwrap().is_some());
        let mut waiter = impatient.write().await.unwrap();
        let refused = waiter.get_approval(&o.id, &apr.id).await;
        assert!(matches!(refused, Err(StoreError::Unavailable(_))), "{refused:?}");
        drop(waiter);
        // Readers take no locks, so they are not refused.
        assert!(impatient.read().await.unwrap().get_approval(&o.id, &apr.id).await.unwrap().is_some());
        holder.commit().await.unwrap();
        impatient.pool().close().await;
    }

    /// PostgreSQL only: a writer that reads or writes an org's policy holds that org's turn until it commits,
    /// so policies commit in the order of their `seq` and the one in force is the last written. (SQLite has one
    /// writer.) Another org's policy, and the org's other writes, do not wait.
    pub async fn policy_writes_of_an_org_take_turns(b: &Backend) {
        let Some(url) = &b.url else { return };
        let (o, _, bot) = seed(b, "turns").await;
        let (other, _, _) = seed(b, "others").await;
        let policy = |org: &Org, version: &str, origin: &str| StoredPolicy {
            org_id: org.id.clone(),
            version: version.into(),
            sources: vec![("policy.yaml".into(), format!("version: {version}\n"))],
            origin: origin.into(),
            created_at: now(),
        };
        let impatient = b.replica_with(url, "lock_timeout = '100ms'").await;

        let mut first = b.store.write().await.unwrap();
        first.insert_policy(&policy(&o, "p1", "api")).await.unwrap();
        // A second writer cannot read the org's policy, nor write one, until the first commits.
        let mut second = impatient.write().await.unwrap();
        assert!(matches!(second.current_policy(&o.id).await, Err(StoreError::Unavailable(_))));
        drop(second);
        let mut second = impatient.write().await.unwrap();
        assert!(matches!(second.insert_policy(&policy(&o, "p2", "file")).await, Err(StoreError::Unavailable(_))));
        drop(second);
        // Other orgs' policies, the org's other writes and readers go on.
        let mut elsewhere = impatient.write().await.unwrap();
        elsewhere.insert_policy(&policy(&other, "q1", "file")).await.unwrap();
        elsewhere.insert_action(&action(&o, &bot, "email.send.message", ActionState::Succeeded)).await.unwrap();
        elsewhere.commit().await.unwrap();
        assert_eq!(impatient.read().await.unwrap().current_policy(&o.id).await.unwrap(), None);
        first.commit().await.unwrap();
        // Now the second sees the first's policy, as it decides what to write.
        let mut second = impatient.write().await.unwrap();
        assert_eq!(second.current_policy(&o.id).await.unwrap().map(|p| p.version), Some("p1".to_owned()));
        drop(second);
        impatient.pool().close().await;
    }

    /// `publish` is a no-op on SQLite and `NOTIFY` on PostgreSQL, heard by `subscribe` after commit only, and
    /// again after the listening connection is killed (with a "you may have missed some" marker first).
    pub async fn published_changes_reach_subscribers_only_when_committed(b: &Backend) {
        let mut tx = b.store.write().await.unwrap();
        tx.publish("nobody listens").await.unwrap();
        tx.commit().await.unwrap();
        let Some(url) = &b.url else { return };
        let store = PostgresStore::connect(url).await.unwrap();
        let mut feed = store.subscribe().await.unwrap();

        let mut tx = b.store.write().await.unwrap();
        tx.publish("rolled back").await.unwrap();
        drop(tx);
        let mut tx = b.store.write().await.unwrap();
        tx.publish(r#"{"a":[["org_1","act_1"]]}"#).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(next_message(&mut feed).await, Some(FeedEvent::Message(r#"{"a":[["org_1","act_1"]]}"#.to_owned())));
        assert_eq!(feed.health().deaf_for(), None);

        // Kill the listening connection: the feed says it may have missed messages, then hears new ones.
        let Raw::Postgres(pool) = &b.raw else { unreachable!() };
        let killed: i64 = sqlx::query_scalar(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(killed, 1);
        // Listening again at once (sqlx reconnects), or first deaf for a moment (a reconnect that failed).
        let mut next = next_message(&mut feed).await;
        if next == Some(FeedEvent::Deaf) {
            next = next_message(&mut feed).await;
        }
        assert_eq!(next, Some(FeedEvent::Resumed), "the feed reports the gap");
        assert_eq!(feed.health().deaf_for(), None);
        let mut tx = b.store.write().await.unwrap();
        tx.publish("after the gap").await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(next_message(&mut feed).await, Some(FeedEvent::Message("after the gap".to_owned())));
        store.pool().close().await;
    }

    pub async fn policies_keep_every_version(b: &Backend) {
        let (o, _, _) = seed(b, "policy").await;
        let (other, _, _) = seed(b, "other").await;
        let n = b.name;
        let v = |version: &str, origin: &str| StoredPolicy {
            org_id: o.id.clone(),
            version: version.into(),
            sources: vec![("policy.yaml".into(), format!("version: {version}\n"))],
            origin: origin.into(),
            created_at: now(),
        };
        let mut tx = b.store.write().await.unwrap();
        assert_eq!(tx.current_policy(&o.id).await.unwrap(), None, "{n}");
        tx.insert_policy(&v("v1", "file")).await.unwrap();
        tx.insert_policy(&v("v2", "api")).await.unwrap();
        let current = tx.current_policy(&o.id).await.unwrap().unwrap();
        assert_eq!((current.version.as_str(), current.origin.as_str()), ("v2", "api"), "{n}");
        assert_eq!(current.sources, vec![("policy.yaml".to_owned(), "version: v2\n".to_owned())], "{n}");
        assert_eq!(tx.current_policy(&other.id).await.unwrap(), None, "{n}: wrong org");
        let bad = StoredPolicy { origin: "ftp".into(), ..v("v3", "file") };
        assert!(tx.insert_policy(&bad).await.is_err(), "{n}: origin is checked");
    }
    /// `end_action` and `end_queued_job` write only a row still in the state they expect, in the caller's
    /// org; otherwise the transaction fails `Stale` (at the write or at the commit) and writes nothing.
    pub async fn conditional_ends_write_only_rows_still_as_expected(b: &Backend) {
        let (o, _, agent) = seed(b, "ends").await;
        let (other, _, _) = seed(b, "other").await;
        let n = b.name;
        let started = now() - TimeDelta::seconds(1);
        let action = Action {
            started_at: Some(started),
            decided_at: Some(started),
            ..super::action(&o, &agent, "llm.chat.completion", ActionState::Executing)
        };
        let job = Job::new(
            o.id.clone(),
            JobKind::ActionExecute,
            Some(action.id.to_string()),
            json!({"action_id": action.id}),
            now() + TimeDelta::minutes(5),
        );
        let action = Action { job_id: Some(job.id.clone()), ..action };
        let mut tx = b.store.write().await.unwrap();
        tx.insert_job(&job).await.unwrap();
        tx.insert_action(&action).await.unwrap();
        tx.commit().await.unwrap();

        let finished = now();
        let outcome = |a: &Action| Action {
            state: ActionState::Succeeded,
            result: Some(json!({"status": 200})),
            error: Some("none".into()),
            finished_at: Some(finished),
            ..a.clone()
        };
        // Only the outcome is written: the rest of the row stays as stored.
        let ended = Action { started_at: Some(finished), decided_at: None, ..outcome(&action) };
        let end = JobEnd {
            org_id: o.id.clone(),
            id: job.id.clone(),
            state: JobState::Succeeded,
            started_at: Some(started),
            finished_at: finished,
            result: Some(json!({"inline": true})),
            error: None,
        };
        // The writes of one finish, committed: `Stale` wherever the backend finds out.
        let finish = |end: JobEnd, ended: Action, from: ActionState| async move {
            let mut tx = b.store.write().await.unwrap();
            tx.end_queued_job(&end).await?;
            tx.end_action(&ended, from).await?;
            tx.commit().await
        };
        let stored = || async {
            let mut tx = b.store.read().await.unwrap();
            (
                tx.get_job(&o.id, &job.id).await.unwrap().unwrap(),
                tx.get_action(&o.id, &action.id).await.unwrap().unwrap(),
            )
        };

        // The runner took the job meanwhile: nothing is written, the action's end included.
        let running = Job { state: JobState::Running, attempts: 1, lease_owner: Some("runner".into()), ..job.clone() };
        let mut tx = b.store.write().await.unwrap();
        tx.update_job(&running).await.unwrap();
        tx.commit().await.unwrap();
        let stale = finish(end.clone(), ended.clone(), ActionState::Executing).await;
        assert!(matches!(&stale, Err(StoreError::Stale(_))), "{n}: a job no longer queued: {stale:?}");
        assert_eq!(stored().await, (running, action.clone()), "{n}: a stale finish wrote");

        // Back in the queue; another org's ids match no row.
        let mut tx = b.store.write().await.unwrap();
        tx.update_job(&job).await.unwrap();
        tx.commit().await.unwrap();
        let elsewhere = JobEnd { org_id: other.id.clone(), ..end.clone() };
        let stale = finish(elsewhere, ended.clone(), ActionState::Executing).await;
        assert!(matches!(&stale, Err(StoreError::Stale(_))), "{n}: another org's job: {stale:?}");
        let elsewhere = Action { org_id: other.id.clone(), ..ended.clone() };
        let stale = finish(end.clone(), elsewhere, ActionState::Executing).await;
        assert!(matches!(&stale, Err(StoreError::Stale(_))), "{n}: another org's action: {stale:?}");
        // An action not in the state expected.
        let stale = finish(end.clone(), ended.clone(), ActionState::Approved).await;
        assert!(matches!(&stale, Err(StoreError::Stale(_))), "{n}: an action in another state: {stale:?}");
        // A transaction that went stale goes no further: its next statement and its commit fail.
        let mut tx = b.store.write().await.unwrap();
        let first = tx.end_action(&ended, ActionState::Approved).await;
        let read = tx.get_job(&o.id, &job.id).await.map(drop);
        assert!(matches!(first.and(read), Err(StoreError::Stale(_))), "{n}: went on after a stale write");
        assert!(tx.commit().await.is_err(), "{n}: committed after a stale write");
        assert_eq!(stored().await, (job.clone(), action.clone()), "{n}: a stale finish wrote");

        // As expected: the outcome and one attempt more, nothing else.
        finish(end.clone(), ended.clone(), ActionState::Executing).await.unwrap();
        let settled = Job {
            state: JobState::Succeeded,
            attempts: job.attempts + 1,
            started_at: Some(started),
            finished_at: Some(finished),
            result: Some(json!({"inline": true})),
            ..job.clone()
        };
        assert_eq!(stored().await, (settled, outcome(&action)), "{n}");
        // Done once: a second finish is stale.
        let again = finish(end, ended, ActionState::Executing).await;
        assert!(matches!(&again, Err(StoreError::Stale(_))), "{n}: finished twice: {again:?}");
    }

    /// Both backends hold a write transaction's inserts and updates back and send them together, with the
    /// audit rows and, on PostgreSQL, with the next read of another table. Whatever goes together, each call
    /// sees the ones before it: a row may refer to one inserted just before it, an update finds a row
    /// inserted earlier in the same transaction, a read sees every write before it, and an update that finds
    /// no row fails the transaction, which then goes no further and writes nothing.
    pub async fn queued_writes_keep_the_order_of_the_calls(b: &Backend) {
        let (o, _, agent) = seed(b, "queued").await;
        let n = b.name;
        let hook = Webhook {
            id: WebhookId::new(),
            org_id: o.id.clone(),
            url: "https://hooks.example/in".into(),
            events: vec![NameGlob::parse("action.*").unwrap()],
            secret: "whsec_123".into(),
            format: WebhookFormat::Json,
            description: None,
            created_at: now(),
            deleted_at: None,
        };
        let mut tx = b.store.write().await.unwrap();
        tx.insert_webhook(&hook).await.unwrap();
        tx.commit().await.unwrap();
        let head = || async { b.store.read().await.unwrap().audit_head(&o.id).await.unwrap() };
        let before = head().await;

        let job = Job::new(o.id.clone(), JobKind::WebhookDeliver, Some(hook.id.to_string()), json!({}), now());
        let delivery = Delivery {
            id: DeliveryId::new(),
            org_id: o.id.clone(),
            webhook_id: hook.id.clone(),
            job_id: job.id.clone(),
            event_id: "evt_1".into(),
            event_type: "action.failed".into(),
            attempt: 1,
            status: None,
            latency_ms: 0,
            error: None,
            created_at: now(),
        };
        let action = super::action(&o, &agent, "email.send.message", ActionState::PendingApproval);
        let running = Job { state: JobState::Running, attempts: 1, lease_owner: Some("me".into()), ..job.clone() };
        let approved = Action { state: ActionState::Approved, decided_at: Some(now()), ..action.clone() };
        let mut tx = b.store.write().await.unwrap();
        tx.insert_job(&job).await.unwrap();
        tx.insert_delivery(&delivery).await.unwrap();
        tx.update_job(&running).await.unwrap();
        tx.insert_action(&action).await.unwrap();
        tx.update_action(&approved).await.unwrap();
        let appended = tx.append_audit(&o.id, event("test.queued", "x", None, 1)).await.unwrap();
        let later = Delivery { id: DeliveryId::new(), attempt: 2, ..delivery.clone() };
        tx.insert_delivery(&later).await.unwrap();
        tx.publish("queued").await.unwrap();
        assert_eq!(tx.list_webhooks(&o.id).await.unwrap(), vec![hook.clone()], "{n}: a read beside the writes");
        let second = tx.append_audit(&o.id, event("test.queued", "x", None, 2)).await.unwrap();
        assert_eq!(second.seq, appended.seq + 1, "{n}");
        assert_eq!(tx.get_job(&o.id, &job.id).await.unwrap(), Some(running.clone()), "{n}: the update went unread");
        tx.commit().await.unwrap();
        let mut tx = b.store.read().await.unwrap();
        assert_eq!(tx.get_job(&o.id, &job.id).await.unwrap(), Some(running), "{n}");
        assert_eq!(tx.get_action(&o.id, &action.id).await.unwrap(), Some(approved), "{n}");
        let mut listed = tx.list_deliveries(&o.id, &hook.id, &page(10, None)).await.unwrap();
        listed.sort_by_key(|d| d.attempt);
        assert_eq!(listed, vec![delivery, later], "{n}");
        assert_eq!(head().await.map(|h| h.seq), Some(second.seq), "{n}");
        assert!(before.is_none_or(|h| h.seq < appended.seq), "{n}");

        // An update of a row that is not there, found out at the next read or at the commit.
        for at_read in [true, false] {
            let kept = Job::new(o.id.clone(), JobKind::ActionExecute, None, json!({}), now());
            let missing = Job::new(o.id.clone(), JobKind::ActionExecute, None, json!({}), now());
            let mut tx = b.store.write().await.unwrap();
            tx.insert_job(&kept).await.unwrap();
            tx.append_audit(&o.id, event("test.lost", "x", None, 3)).await.unwrap();
            let updated = tx.update_job(&missing).await;
            if at_read {
                let failed = updated.and(tx.count_orgs().await.map(drop));
                assert!(matches!(failed, Err(StoreError::Internal(_))), "{n}: a missing row read past: {failed:?}");
                assert!(tx.get_job(&o.id, &kept.id).await.is_err(), "{n}: a failed transaction went on");
                assert!(tx.commit().await.is_err(), "{n}: a failed transaction committed");
            } else {
                let failed = match updated {
                    Ok(()) => tx.commit().await,
                    failed => failed,
                };
                assert!(matches!(failed, Err(StoreError::Internal(_))), "{n}: a missing row committed: {failed:?}");
            }
            let mut tx = b.store.read().await.unwrap();
            assert_eq!(tx.get_job(&o.id, &kept.id).await.unwrap(), None, "{n}: a failed transaction wrote");
            assert_eq!(head().await.map(|h| h.seq), Some(second.seq), "{n}: a failed transaction appended");
        }
    }
}

/// A fresh PostgreSQL backend for a test of PostgreSQL alone, or `None` (the test is skipped, saying so)
/// without a server.
async fn postgres_only() -> Option<Backend> {
    let Ok(url) = std::env::var(PG_URL_VAR) else {
        eprintln!("{PG_URL_VAR} is not set, so this PostgreSQL test is skipped");
        return None;
    };
    Some(Backend::postgres(&url).await)
}

/// PostgreSQL ends every session of the store's pool (as a restart or a failover does) while they sit
/// idle, a moment after their last use, so the pool's idle check would not ping them: the next transactions
/// still begin, on new connections, instead of failing on a dead one. Skipped without a server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_transactions_begin_on_a_live_connection_after_the_server_ended_the_pooled_ones() {
    let Some(b) = postgres_only().await else { return };
    // Several connections in the pool, all idle.
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut tx = b.store.write().await.unwrap();
        tx.count_orgs().await.unwrap();
        open.push(tx);
    }
    for tx in open {
        tx.commit().await.unwrap();
    }
    let mut admin = sqlx::PgConnection::connect(b.url.as_deref().unwrap()).await.unwrap();
    let ended: i64 = sqlx::query_scalar(
        "WITH others AS MATERIALIZED (
            SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid())
         SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM others",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(ended >= 4, "ended {ended} sessions");
    let (o, _, _) = seed(&b, "after").await;
    let mut tx = b.store.read().await.unwrap();
    assert_eq!(tx.get_org(&o.id).await.unwrap().map(|org| org.id), Some(o.id.clone()));
    drop(tx);
    admin.close().await.unwrap();
    b.finish().await;
}

/// PostgreSQL over TLS with the server's certificate checked: with `sslmode=verify-full` and the CA that
/// `scripts/with-postgres` made, the store connects, migrates and works, and the server reports the
/// connection encrypted; trusting an unrelated CA instead, the store refuses to connect, naming the
/// certificate. Skipped without the test server's variables.
#[tokio::test]
async fn postgres_connects_over_tls_only_to_the_certificate_it_trusts() {
    let (Ok(url), Ok(ca), Ok(other_ca)) = (
        std::env::var(PG_URL_VAR),
        std::env::var("COUNTERSIGN_TEST_PG_TLS_CA"),
        std::env::var("COUNTERSIGN_TEST_PG_TLS_OTHER_CA"),
    ) else {
        eprintln!("skipped: set {PG_URL_VAR} and the TLS variables (scripts/with-postgres sets them)");
        return;
    };
    let db = format!("cs_tls_{}", OrgId::new().as_str().trim_start_matches("org_").to_ascii_lowercase());
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).await.unwrap();
    let own = with_database(&url, &db);
    let separator = if own.contains('?') { '&' } else { '?' };

    let verified = format!("{own}{separator}sslmode=verify-full&sslrootcert={ca}");
    let store = PostgresStore::connect(&verified).await.unwrap();
    store.ping().await.unwrap();
    let mut tx = store.write().await.unwrap();
    assert_eq!(tx.count_orgs().await.unwrap(), 0);
    tx.commit().await.unwrap();
    let encrypted: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(encrypted, "the server says this connection is not encrypted");
    store.pool().close().await;
    drop(store);

    let untrusted = format!("{own}{separator}sslmode=verify-full&sslrootcert={other_ca}");
    let Err(refused) = PostgresStore::connect(&untrusted).await else {
        panic!("a server whose certificate another CA signed was accepted");
    };
    assert!(refused.to_string().to_lowercase().contains("certificate"), "unclear refusal: {refused}");

    let _ = admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))).await;
    let _ = admin.close().await;
}

/// PostgreSQL: `durable` returns only once the WAL is flushed past every commit before it, a deferred one
/// (`synchronous_commit` off, as a model call's claim commits) included. A transaction that only takes an
/// id writes no WAL, so its commit flushes nothing; `durable` writes a record of its own. The test server's
/// default is `synchronous_commit = off`, so the database is set to `on`, as a durable server is. Skipped
/// without a server.
#[tokio::test]
async fn postgres_durable_flushes_the_deferred_commits_before_it() {
    let Some(b) = postgres_only().await else { return };
    let Raw::Postgres(pool) = &b.raw else { unreachable!() };
    let store = b.replica_with(b.url.as_deref().unwrap(), "synchronous_commit = on").await;
    let (o, _, bot) = seed(&b, "durable").await;
    for round in 0..5 {
        let mut tx = store.write().await.unwrap();
        tx.defer_sync(true);
        tx.insert_action(&action(&o, &bot, "llm.chat.completion", ActionState::Executing)).await.unwrap();
        tx.commit().await.unwrap();
        let written: String =
            sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text").fetch_one(pool).await.unwrap();
        store.durable().await.unwrap();
        let flushed: bool = sqlx::query_scalar("SELECT pg_current_wal_flush_lsn() >= $1::pg_lsn")
            .bind(&written)
            .fetch_one(pool)
            .await
            .unwrap();
        assert!(flushed, "round {round}: the WAL is not flushed to {written} after durable()");
    }
    store.pool().close().await;
    b.finish().await;
}

/// PostgreSQL: the store's connections have the server probe them when idle (so a replica that dies holding
/// row locks loses them in about a minute, not two hours) and end a transaction left idle; a setting the
/// database URL's `options` names is the URL's. Skipped without a server.
#[tokio::test]
async fn postgres_sessions_are_probed_and_the_url_options_win() {
    let Some(b) = postgres_only().await else { return };
    // The store's own pool.
    let Raw::Postgres(pool) = &b.raw else { unreachable!() };
    let show = |name: &'static str| async move {
        sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("SHOW {name}"))).fetch_one(pool).await.unwrap()
    };
    assert_eq!(show("tcp_keepalives_idle").await, "30");
    assert_eq!(show("tcp_keepalives_interval").await, "10");
    assert_eq!(show("tcp_keepalives_count").await, "3");
    assert_eq!(show("idle_in_transaction_session_timeout").await, "5min");
    let own_url = b.url.clone().unwrap();
    let separator = if own_url.contains('?') { '&' } else { '?' };
    let custom = format!("{own_url}{separator}options=-c%20idle_in_transaction_session_timeout%3D7s");
    let store = PostgresStore::connect(&custom).await.unwrap();
    let timeout: String =
        sqlx::query_scalar("SHOW idle_in_transaction_session_timeout").fetch_one(store.pool()).await.unwrap();
    assert_eq!(timeout, "7s");
    let idle: String = sqlx::query_scalar("SHOW tcp_keepalives_idle").fetch_one(store.pool()).await.unwrap();
    assert_eq!(idle, "30");
    store.pool().close().await;
    b.finish().await;
}
