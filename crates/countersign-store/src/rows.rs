//! Conversions shared by the backends: times as microseconds, enums and JSON columns as text, the mapping
//! of a result row onto each domain record, and the mapping of driver errors onto `StoreError`.
//!
//! Kept free of any one driver's row type: each backend implements [`Cols`] for its row, and the record
//! mappers here read through it, so a column added to a table is mapped once for both backends.

use chrono::{DateTime, Utc};
use countersign_core::audit::AuditEvent;
use countersign_core::capability::{Capability, NameGlob};
use countersign_core::checkpoint::Checkpoint;
use countersign_core::domain::{
    Action, Agent, ApiKey, Approval, DecisionRecord, Delivery, Job, JobKind, Org, PrincipalRef, Role, Session,
    StoredPolicy, User, Webhook, WebhookFormat,
};
use countersign_core::ids::{
    ActionId, AgentId, ApprovalId, DeliveryId, EventId, JobId, KeyId, OrgId, SessionId, UserId, WebhookId,
};
use countersign_core::state::{ActionState, ApprovalStatus, Decision, JobState};
use countersign_core::store::{Page, Retention, StoreError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::writes::Value;

pub fn to_us(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

pub fn opt_us(time: Option<DateTime<Utc>>) -> Option<i64> {
    time.map(to_us)
}

pub fn from_us(us: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| StoreError::Internal(format!("stored time {us} is out of range")))
}

pub fn opt_from_us(us: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    us.map(from_us).transpose()
}

pub fn to_json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Internal(format!("cannot encode JSON column: {e}")))
}

/// Seals `event` after the head (seq, hash) a write transaction holds and queues it for that transaction's
/// next multi-row insert ([`audit_rows`]); the caller keeps the sealed event as its new head. Both
/// backends seal this way.
pub fn seal_pending(
    pending: &mut Vec<AuditEvent>,
    org: &OrgId,
    seq: i64,
    hash: &str,
    event: countersign_core::audit::NewAuditEvent,
) -> AuditEvent {
    let sealed = AuditEvent::seal(org.clone(), seq, hash, event);
    pending.push(sealed.clone());
    sealed
}

/// A failure to write a transaction's sealed audit events, named as such whichever statement met it (so a
/// caller's mapping of, say, a uniqueness conflict on its own row never misreads it).
pub fn audit_write_failed(e: StoreError) -> StoreError {
    match e {
        StoreError::Conflict(m) | StoreError::Internal(m) => {
            StoreError::Internal(format!("writing the audit events failed: {m}"))
        }
        other @ (StoreError::Unavailable(_) | StoreError::Stale(_)) => other,
    }
}

/// `INSERT INTO audit_events (…) VALUES (…), (…)` with a `?` for each of every row's values, and the values:
/// how both backends write the audit events a transaction sealed, in one statement (the caller keeps `rows`
/// under the backend's limit on bound values).
pub fn audit_rows(rows: &[AuditEvent]) -> Result<(String, Vec<Value>), StoreError> {
    let mut sql = String::from(
        "INSERT INTO audit_events (org_id, seq, id, time_us, actor, action, subject, data, prev_hash, hash) VALUES ",
    );
    let mut values = Vec::with_capacity(rows.len() * 10);
    for (i, event) in rows.iter().enumerate() {
        sql.push_str(if i == 0 { "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" } else { ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" });
        values.extend([
            Value::Text(Some(event.org_id.as_str().to_owned())),
            Value::Int(Some(event.seq)),
            Value::Text(Some(event.id.as_str().to_owned())),
            Value::Int(Some(event.time_us)),
            Value::Text(Some(to_json(&event.actor)?)),
            Value::Text(Some(event.action.clone())),
            Value::Text(event.subject.clone()),
            Value::Text(Some(to_json(&event.data)?)),
            Value::Text(Some(event.prev_hash.clone())),
            Value::Text(Some(event.hash.clone())),
        ]);
    }
    Ok((sql, values))
}

/// The error of a statement that carried a transaction's sealed audit rows: named as an audit failure when the
/// audit rows met it, so a caller's mapping of a conflict on its own row never misreads it.
pub fn batch_error(e: sqlx::Error) -> StoreError {
    let audit = matches!(&e, sqlx::Error::Database(db) if db.message().contains("audit_"));
    if audit { audit_write_failed(map_sqlx(e)) } else { map_sqlx(e) }
}

/// The deepest stored JSON read back past serde_json's nesting limit (128). A request body the gateway
/// accepted at that limit is stored inside a wrapper or two (`{"connector": "llm", …, "body": …}`), so it
/// must read back a few levels deeper; nothing the gateway writes comes near this bound, which keeps the
/// unlimited parse's recursion small.
const MAX_STORED_DEPTH: usize = 192;

pub fn from_json<T: DeserializeOwned>(column: &str, text: &str) -> Result<T, StoreError> {
    let invalid = |e: serde_json::Error| StoreError::Internal(format!("stored {column} is not valid: {e}"));
    match serde_json::from_str(text) {
        Ok(value) => Ok(value),
        Err(e) if nesting_depth(text) <= MAX_STORED_DEPTH => {
            let mut deserializer = serde_json::Deserializer::from_str(text);
            deserializer.disable_recursion_limit();
            let value = T::deserialize(&mut deserializer).map_err(|_| invalid(e))?;
            deserializer.end().map_err(invalid)?;
            Ok(value)
        }
        Err(e) => Err(invalid(e)),
    }
}

/// How deeply arrays and objects nest in a JSON text, counted without recursion.
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match byte {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    deepest
}

pub fn corrupt(column: &str, value: &str) -> StoreError {
    StoreError::Internal(format!("stored {column} `{value}` is not valid"))
}

/// SQLSTATEs after which PostgreSQL asks the client to try again: serialization failure, deadlock, lock not
/// available, admin shutdown, cannot connect now, too many connections.
const PG_RETRYABLE: [&str; 6] = ["40001", "40P01", "55P03", "57P01", "57P03", "53300"];

/// A backend's embedded migrations (version, name, SQL), each run in a transaction of its own.
pub fn migrator(migrations: &[(i64, &'static str, &'static str)]) -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType};
    let migrations = migrations
        .iter()
        .map(|(version, name, sql)| {
            let sql = sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(*sql));
            Migration::new(*version, std::borrow::Cow::Borrowed(*name), MigrationType::Simple, sql, false)
        })
        .collect();
    sqlx::migrate::Migrator::with_migrations(migrations)
}

pub fn map_sqlx(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(db.message().to_owned()),
        sqlx::Error::Database(db) if db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() => {
            let code = db.code().unwrap_or_default();
            // Class 08 is "connection exception".
            if PG_RETRYABLE.contains(&code.as_ref()) || code.starts_with("08") {
                StoreError::Unavailable(format!("{} ({code})", db.message()))
            } else {
                StoreError::Internal(format!("{} ({code})", db.message()))
            }
        }
        sqlx::Error::Database(db) if db.message().contains("locked") || db.message().contains("busy") => {
            StoreError::Unavailable(db.message().to_owned())
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Internal(error.to_string()),
    }
}

/// Typed column access over one driver's result row. Each backend implements it for its row type; the
/// record mappers below use nothing else.
pub trait Cols {
    fn text(&self, column: &str) -> Result<String, StoreError>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, column: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError>;
    /// A boolean column (an integer 0/1 in SQLite, `BOOLEAN` in PostgreSQL).
    fn flag(&self, column: &str) -> Result<bool, StoreError>;
}

/// A sqlx row (SQLite's readers, PostgreSQL's): every column read as sqlx decodes it, the error mapped, except
/// a boolean, which each backend stores its own way.
pub trait SqlxRow: sqlx::Row {
    fn flag_of(&self, column: &str) -> Result<bool, StoreError>;
}

impl<R> Cols for R
where
    R: SqlxRow,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    fn text(&self, column: &str) -> Result<String, StoreError> {
        self.try_get(column).map_err(map_sqlx)
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        self.try_get(column).map_err(map_sqlx)
    }

    fn int(&self, column: &str) -> Result<i64, StoreError> {
        self.try_get(column).map_err(map_sqlx)
    }

    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        self.try_get(column).map_err(map_sqlx)
    }

    fn flag(&self, column: &str) -> Result<bool, StoreError> {
        self.flag_of(column)
    }
}

/// A Rust type one column can be read as, through [`Cols`].
pub trait Column: Sized {
    fn read(row: &impl Cols, column: &str) -> Result<Self, StoreError>;
}

impl Column for String {
    fn read(row: &impl Cols, column: &str) -> Result<Self, StoreError> {
        row.text(column)
    }
}

impl Column for Option<String> {
    fn read(row: &impl Cols, column: &str) -> Result<Self, StoreError> {
        row.opt_text(column)
    }
}

impl Column for i64 {
    fn read(row: &impl Cols, column: &str) -> Result<Self, StoreError> {
        row.int(column)
    }
}

impl Column for Option<i64> {
    fn read(row: &impl Cols, column: &str) -> Result<Self, StoreError> {
        row.opt_int(column)
    }
}

/// Reads one column as whatever type the caller needs.
pub fn get<T: Column>(row: &impl Cols, column: &str) -> Result<T, StoreError> {
    T::read(row, column)
}

pub fn org_row(row: &impl Cols) -> Result<Org, StoreError> {
    Ok(Org {
        id: OrgId::from_stored(get(row, "id")?),
        name: get(row, "name")?,
        created_at: from_us(get(row, "created_at")?)?,
    })
}

pub fn user_row(row: &impl Cols) -> Result<User, StoreError> {
    let role: String = get(row, "role")?;
    Ok(User {
        id: UserId::from_stored(get(row, "id")?),
        org_id: OrgId::from_stored(get(row, "org_id")?),
        name: get(row, "name")?,
        role: Role::parse(&role).ok_or_else(|| corrupt("role", &role))?,
        instance_admin: row.flag("instance_admin")?,
        created_at: from_us(get(row, "created_at")?)?,
        disabled_at: opt_from_us(get(row, "disabled_at")?)?,
    })
}

pub fn agent_row(row: &impl Cols) -> Result<Agent, StoreError> {
    Ok(Agent {
        id: AgentId::from_stored(get(row, "id")?),
        org_id: OrgId::from_stored(get(row, "org_id")?),
        name: get(row, "name")?,
        owner: get::<Option<String>>(row, "owner_user_id")?.map(UserId::from_stored),
        created_at: from_us(get(row, "created_at")?)?,
        disabled_at: opt_from_us(get(row, "disabled_at")?)?,
    })
}

pub fn key_row(row: &impl Cols) -> Result<ApiKey, StoreError> {
    let kind: String = get(row, "principal_kind")?;
    let principal_id: String = get(row, "principal_id")?;
    let principal = match kind.as_str() {
        "user" => PrincipalRef::User(UserId::from_stored(principal_id)),
        "agent" => PrincipalRef::Agent(AgentId::from_stored(principal_id)),
        other => return Err(corrupt("principal_kind", other)),
    };
    Ok(ApiKey {
        id: KeyId::from_stored(get(row, "id")?),
        org_id: OrgId::from_stored(get(row, "org_id")?),
        principal,
        hash: get(row, "hash")?,
        prefix: get(row, "prefix")?,
        last_four: get(row, "last_four")?,
        created_at: from_us(get(row, "created_at")?)?,
        expires_at: opt_from_us(get(row, "expires_at")?)?,
        revoked_at: opt_from_us(get(row, "revoked_at")?)?,
    })
}

/// The ids in the rows a cascading session revocation returned, sorted (for a stable audit event).
pub fn revoked_sessions(rows: &[impl Cols]) -> Result<Vec<SessionId>, StoreError> {
    let mut ids = rows.iter().map(|row| get(row, "id").map(SessionId::from_stored)).collect::<Result<Vec<_>, _>>()?;
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(ids)
}

pub fn session_row(row: &impl Cols) -> Result<Session, StoreError> {
    let scopes: Vec<String> = from_json("scopes", &get::<String>(row, "scopes")?)?;
    let scopes =
        scopes.iter().map(|s| NameGlob::parse(s).map_err(|_| corrupt("scope", s))).collect::<Result<Vec<_>, _>>()?;
    Ok(Session {
        id: SessionId::from_stored(get(row, "id")?),
        org_id: OrgId::from_stored(get(row, "org_id")?),
        agent_id: AgentId::from_stored(get(row, "agent_id")?),
        hash: get(row, "hash")?,
        scopes,
        created_by: get(row, "created_by")?,
        created_at: from_us(get(row, "created_at")?)?,
        expires_at: from_us(get(row, "expires_at")?)?,
        revoked_at: opt_from_us(get(row, "revoked_at")?)?,
        minted_with: get::<Option<String>>(row, "minted_with")?.map(KeyId::from_stored),
    })
}

pub fn dashboard_session_row(row: &impl Cols) -> Result<countersign_core::domain::DashboardSession, StoreError> {
    Ok(countersign_core::domain::DashboardSession {
        token_hash: get(row, "token_hash")?,
        org_id: OrgId::from_stored(get(row, "org_id")?),
        user_id: UserId::from_stored(get(row, "user_id")?),
        key_hash: get(row, "key_hash")?,
        created_at: from_us(get(row, "created_at")?)?,
        expires_at: from_us(get(row, "expires_at")?)?,
        last_seen_at: from_us(get(row, "last_seen_at")?)?,
        revoked_at: opt_from_us(get(row, "revoked_at")?)?,
    })
}

pub fn action_row(row: &impl Cols) -> Result<Action, StoreError> {
    let state: String = get(row, "state")?;
    let capability: String = get(row, "capability")?;
    Ok(Action {
        id: ActionId::from_stored(get(row, "id")?),
        org_id: OrgId::from_stored(get(row, "org_id")?),
        agent_id: AgentId::from_stored(get(row, "agent_id")?),
        agent_name: get(row, "agent_name")?,
        session_id: get::<Option<String>>(row, "session_id")?.map(SessionId::from_stored),
        capability: Capability::parse(&capability).map_err(|_| corrupt("capability", &capability))?,
        params: from_json("params", &get::<String>(row, "params")?)?,
        reasoning: get(row, "reasoning")?,
        target: get::<Option<String>>(row, "target")?.map(|t| from_json("target", &t)).transpose()?,
        idempotency_key: get(row, "idempotency_key")?,
        state: ActionState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
        verdict: get::<Option<String>>(row, "verdict")?.map(|t| from_json("verdict", &t)).transpose()?,
        approval_id: get::<Option<String>>(row, "approval_id")?.map(ApprovalId::from_stored),
        result: get::<Option<String>>(row, "result")?.map(|t| from_json("result", &t)).transpose()?,
        error: get(row, "error")?,
        request_hash: get(row, "request_hash")?,
        created_at: from_us(get(row, "created_at")?)?,
        decided_at: opt_from_us(get(row, "decided_at")?)?,
        started_at: opt_from_us(get(row, "started_at")?)?,
        finished_at: opt_from_us(get(row, "finished_at")?)?,
        job_id: get::<Option<String>>(row, "job_id")?.map(JobId::from_stored),
    })
}

pub fn count(value: i64, column: &str) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| corrupt(column, &value.to_string()))
}

pub fn job_row(row: &impl Cols) -> Result<Job, StoreError> {
    let kind: String = get(row, "kind")?;
    let state: String = get(row, "state")?;
    Ok(Job {
        id: JobId::from_stored(get(row, "id")?),
        org_id: OrgId::from_stored(get(row, "org_id")?),
        kind: JobKind::parse(&kind).ok_or_else(|| corrupt("kind", &kind))?,
        subject: get(row, "subject")?,
        state: JobState::parse(&state).ok_or_else(|| corrupt("state", &state))?,
        attempts: count(get(row, "attempts")?, "attempts")?,
        max_attempts: count(get(row, "max_attempts")?, "max_attempts")?,
        run_at: from_us(get(row, "run_at")?)?,
        lease_owner: get(row, "lease_owner")?,
        lease_until: opt_from_us(get(row, "lease_until")?)?,
        payload: from_json("payload", &get::<String>(row, "payload")?)?,
        progress: get::<Option<String>>(row, "progress")?.map(|t| from_json("progress", &t)).transpose()?,
        result: get::<Option<String>>(row, "result")?.map(|t| from_json("result", &t)).transpose()?,
        error: get(row, "error")?,
        created_at: from_us(get(row, "created_at")?)?,
        started_at: opt_from_us(get(row, "started_at")?)?,
        finished_at: opt_from_us(get(row, "finished_at")?)?,
    })
}

pub fn webhook_row(row: &impl Cols) -> Result<Webhook, StoreError> {
    let format: String = get(row, "format")?;
    Ok(Webhook {
        id: WebhookId::from_stored(get(row, "id")?),
        org_id: OrgId::from_stored(get(row, "org_id")?),
        url: get(row, "url")?,
        events: from_json("events", &get::<String>(row, "events")?)?,
        secret: get(row, "secret")?,
        format: WebhookFormat::parse(&format).ok_or_else(|| corrupt("format", &format))?,
        description: get(row, "description")?,
        created_at: from_us(get(row, "created_at")?)?,
        deleted_at: opt_from_us(get(row, "deleted_at")?)?,
    })
}

pub fn delivery_row(row: &impl Cols) -> Result<Delivery, StoreError> {
    let status: Option<i64> = get(row, "status")?;
    Ok(Delivery {
        id: DeliveryId::from_stored(get(row, "id")?),
        org_id: OrgId::from_stored(get(row, "org_id")?),
        webhook_id: WebhookId::from_stored(get(row, "webhook_id")?),
        job_id: JobId::from_stored(get(row, "job_id")?),
        event_id: get(row, "event_id")?,
        event_type: get(row, "event_type")?,
        attempt: count(get(row, "attempt")?, "attempt")?,
        status: status.map(|s| u16::try_from(s).map_err(|_| corrupt("status", &s.to_string()))).transpose()?,
        latency_ms: u64::try_from(get::<i64>(row, "latency_ms")?).unwrap_or(0),
        error: get(row, "error")?,
        created_at: from_us(get(row, "created_at")?)?,
    })
}

pub fn checkpoint_row(row: &impl Cols) -> Result<Checkpoint, StoreError> {
    Ok(Checkpoint {
        org_id: get(row, "org_id")?,
        seq: get(row, "seq")?,
        head_hash: get(row, "head_hash")?,
        time_us: get(row, "time_us")?,
        key_id: get(row, "key_id")?,
        signature: get(row, "signature")?,
    })
}

pub fn retention_row(row: &impl Cols) -> Result<Retention, StoreError> {
    let days: Option<i64> = get(row, "days")?;
    Ok(Retention {
        org_id: OrgId::from_stored(get(row, "org_id")?),
        days: days.map(|d| count(d, "days")).transpose()?,
        deleted_upto: get(row, "deleted_upto")?,
    })
}

pub fn approval_row(row: &impl Cols) -> Result<Approval, StoreError> {
    let status: String = get(row, "status")?;
    Ok(Approval {
        id: ApprovalId::from_stored(get(row, "id")?),
        org_id: OrgId::from_stored(get(row, "org_id")?),
        action_id: ActionId::from_stored(get(row, "action_id")?),
        group: get(row, "group_name")?,
        quorum: u32::try_from(get::<i64>(row, "quorum")?).map_err(|_| corrupt("quorum", "out of range"))?,
        status: ApprovalStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        expires_at: from_us(get(row, "expires_at")?)?,
        token_hash: get(row, "token_hash")?,
        policy_version: get(row, "policy_version")?,
        request_hash: get(row, "request_hash")?,
        rule: get(row, "rule")?,
        snapshot: get::<Option<String>>(row, "snapshot")?.map(|t| from_json("snapshot", &t)).transpose()?,
        risk: from_json("risk", &get::<String>(row, "risk")?)?,
        decisions: Vec::new(),
        created_at: from_us(get(row, "created_at")?)?,
        decided_at: opt_from_us(get(row, "decided_at")?)?,
    })
}

pub fn decision_row(row: &impl Cols) -> Result<DecisionRecord, StoreError> {
    let decision: String = get(row, "decision")?;
    Ok(DecisionRecord {
        user_id: UserId::from_stored(get(row, "user_id")?),
        user_name: get(row, "user_name")?,
        decision: Decision::parse(&decision).ok_or_else(|| corrupt("decision", &decision))?,
        note: get(row, "note")?,
        counted: row.flag("counted")?,
        created_at: from_us(get(row, "created_at")?)?,
    })
}

pub fn audit_row(row: &impl Cols) -> Result<AuditEvent, StoreError> {
    Ok(AuditEvent {
        org_id: OrgId::from_stored(get(row, "org_id")?),
        seq: get(row, "seq")?,
        id: EventId::from_stored(get(row, "id")?),
        time_us: get(row, "time_us")?,
        actor: from_json("actor", &get::<String>(row, "actor")?)?,
        action: get(row, "action")?,
        subject: get(row, "subject")?,
        data: from_json("data", &get::<String>(row, "data")?)?,
        prev_hash: get(row, "prev_hash")?,
        hash: get(row, "hash")?,
    })
}

pub fn policy_row(row: &impl Cols) -> Result<StoredPolicy, StoreError> {
    Ok(StoredPolicy {
        org_id: OrgId::from_stored(get(row, "org_id")?),
        version: get(row, "version")?,
        sources: from_json("sources", &get::<String>(row, "sources")?)?,
        origin: get(row, "origin")?,
        created_at: from_us(get(row, "created_at")?)?,
    })
}

/// What an action's stored text weighs, for [`countersign_core::store::PAGE_BYTES`]: `octet_length` reads a
/// value's size without loading the value (from SQLite's record header; from PostgreSQL's TOAST pointer). The
/// action is `a`. A macro, so the queries that use it stay literals.
macro_rules! action_bytes {
    () => {
        "COALESCE(octet_length(a.params), 0) + COALESCE(octet_length(a.reasoning), 0)
         + COALESCE(octet_length(a.target), 0) + COALESCE(octet_length(a.result), 0)
         + COALESCE(octet_length(a.error), 0)"
    };
}
pub(crate) use action_bytes;

/// A page query that stops at [`countersign_core::store::PAGE_BYTES`]: the inner query (the rest of the
/// arguments, concatenated) selects the page's `id`s and their `bytes` in `$order` with its `LIMIT`; the sizes
/// are summed for the whole page (`bytes_before`: what the page's earlier rows weigh) and only the rows of
/// `$table` within the budget are read, each with `page_rows` (see [`page_cut`]). `$join` joins the page to
/// `$table` (SQLite's `CROSS JOIN` keeps the page as the outer loop; PostgreSQL's takes no `ON`); `$org` and
/// `$budget` are the parameters of the org and the budget.
macro_rules! within_page_bytes {
    ($table:literal, $order:literal, $join:literal, $org:literal, $budget:literal, $($inner:expr),+ $(,)?) => {
        concat!(
            "SELECT x.*, p.page_rows FROM (
               SELECT id, COUNT(*) OVER () AS page_rows,
                      SUM(bytes) OVER (ORDER BY id ", $order, " ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                        AS bytes_before
                 FROM (", $($inner),+, ") s) p ",
            $join, " ", $table, " x ON x.id = p.id
             WHERE x.org_id = ", $org, " AND COALESCE(p.bytes_before, 0) < ", $budget, "
             ORDER BY x.id ", $order
        )
    };
}
pub(crate) use within_page_bytes;

/// Whether a page read under [`countersign_core::store::PAGE_BYTES`] stopped short: each row carries
/// `page_rows`, how many rows the page had before the byte budget.
pub fn page_cut(rows: &[impl Cols]) -> Result<bool, StoreError> {
    let Some(first) = rows.first() else { return Ok(false) };
    let before: i64 = get(first, "page_rows")?;
    Ok(usize::try_from(before).unwrap_or(usize::MAX) > rows.len())
}

pub fn limit(page: &Page) -> i64 {
    i64::from(page.limit.clamp(1, 1000))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn a_body_at_serde_jsons_limit_reads_back_inside_its_wrapper() {
        let body: serde_json::Value = serde_json::from_str(&nested(127)).unwrap();
        let stored = serde_json::json!({"connector": "llm", "body": body}).to_string();
        assert!(serde_json::from_str::<serde_json::Value>(&stored).is_err(), "one level past the default limit");
        let read: serde_json::Value = from_json("target", &stored).unwrap();
        assert_eq!(read["body"], body);
        assert_eq!(nesting_depth(r#"{"a": "[[[{{", "b": ["\"]"]}"#), 2);
    }

    #[test]
    fn json_deeper_than_anything_written_is_refused_without_recursing() {
        let error = from_json::<serde_json::Value>("target", &nested(100_000)).unwrap_err();
        assert!(error.to_string().contains("stored target is not valid"), "{error}");
        assert!(from_json::<serde_json::Value>("target", "[1").is_err());
    }
}
