//! The writes both backends queue instead of sending at once: inserts and updates of one row whose outcome
//! the caller need not see until the transaction's next statement or its commit (SQLite's `Batch`,
//! PostgreSQL's `Queue`). Each is its statement, with a `?` for each value, and the values in order, so a
//! column is written the same way on both; each backend says how it queues a write and checks its count.

use countersign_core::domain::{Action, Delivery, Job};
use countersign_core::state::ActionState;
use countersign_core::store::{JobEnd, StoreError};

use crate::rows::{opt_us, to_json, to_us};

/// A queued write: `sql` with a `?` for each of `values`, on `table`.
pub struct Write {
    pub table: &'static str,
    pub sql: &'static str,
    pub values: Vec<Value>,
    pub expect: Expect,
}

/// A value bound to a write: every column these writes set is text or an integer.
pub enum Value {
    Text(Option<String>),
    Int(Option<i64>),
}

/// What a write's count of changed rows must be.
pub enum Expect {
    /// An insert, which fails on its own when it cannot insert.
    Insert,
    /// An update of a row the transaction knows is there: one row, or it fails with `StoreError::Internal`
    /// saying this.
    One(String),
    /// A conditional update: one row, or it fails with [`StoreError::Stale`] saying this.
    Unchanged(String),
}

fn text(value: impl Into<String>) -> Value {
    Value::Text(Some(value.into()))
}

fn opt_text(value: Option<impl Into<String>>) -> Value {
    Value::Text(value.map(Into::into))
}

fn int(value: impl Into<i64>) -> Value {
    Value::Int(Some(value.into()))
}

/// Pushes a write's statement `sql` onto `query`, with `values` bound in place of its `?`s.
pub fn push_write<DB>(query: &mut sqlx::QueryBuilder<DB>, sql: &str, values: Vec<Value>)
where
    DB: sqlx::Database,
    for<'t> Option<String>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    for<'t> Option<i64>: sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let mut pieces = sql.split('?');
    if let Some(first) = pieces.next() {
        query.push(first);
    }
    for (value, piece) in values.into_iter().zip(pieces.by_ref()) {
        match value {
            Value::Text(text) => query.push_bind(text),
            Value::Int(int) => query.push_bind(int),
        };
        query.push(piece);
    }
    // A statement with more `?`s than values stays whole, and then fails for the values it lacks.
    for piece in pieces {
        query.push("?").push(piece);
    }
}

pub fn insert_action(a: &Action) -> Result<Write, StoreError> {
    Ok(Write {
        table: "actions",
        sql: "INSERT INTO actions (id, org_id, agent_id, agent_name, session_id, capability, params, reasoning,
                target, idempotency_key, state, verdict, approval_id, result, error, request_hash, created_at,
                decided_at, started_at, finished_at, job_id)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        values: vec![
            text(a.id.as_str()),
            text(a.org_id.as_str()),
            text(a.agent_id.as_str()),
            text(a.agent_name.as_str()),
            opt_text(a.session_id.as_ref().map(|s| s.as_str())),
            text(a.capability.as_str()),
            text(to_json(&a.params)?),
            text(a.reasoning.as_str()),
            opt_text(a.target.as_ref().map(to_json).transpose()?),
            opt_text(a.idempotency_key.as_deref()),
            text(a.state.as_str()),
            opt_text(a.verdict.as_ref().map(to_json).transpose()?),
            opt_text(a.approval_id.as_ref().map(|s| s.as_str())),
            opt_text(a.result.as_ref().map(to_json).transpose()?),
            opt_text(a.error.as_deref()),
            text(a.request_hash.as_str()),
            int(to_us(a.created_at)),
            Value::Int(opt_us(a.decided_at)),
            Value::Int(opt_us(a.started_at)),
            Value::Int(opt_us(a.finished_at)),
            opt_text(a.job_id.as_ref().map(|j| j.as_str())),
        ],
        expect: Expect::Insert,
    })
}

pub fn update_action(a: &Action) -> Result<Write, StoreError> {
    Ok(Write {
        table: "actions",
        sql: "UPDATE actions SET state = ?, verdict = ?, approval_id = ?, result = ?, error = ?, decided_at = ?,
                started_at = ?, finished_at = ?, job_id = ?
             WHERE org_id = ? AND id = ?",
        values: vec![
            text(a.state.as_str()),
            opt_text(a.verdict.as_ref().map(to_json).transpose()?),
            opt_text(a.approval_id.as_ref().map(|s| s.as_str())),
            opt_text(a.result.as_ref().map(to_json).transpose()?),
            opt_text(a.error.as_deref()),
            Value::Int(opt_us(a.decided_at)),
            Value::Int(opt_us(a.started_at)),
            Value::Int(opt_us(a.finished_at)),
            opt_text(a.job_id.as_ref().map(|j| j.as_str())),
            text(a.org_id.as_str()),
            text(a.id.as_str()),
        ],
        expect: Expect::One(format!("action {} vanished", a.id)),
    })
}

/// Ends an action that must still be in state `from` ([`StoreTx::end_action`]).
///
/// [`StoreTx::end_action`]: countersign_core::store::StoreTx::end_action
pub fn end_action(a: &Action, from: ActionState) -> Result<Write, StoreError> {
    Ok(Write {
        table: "actions",
        sql: "UPDATE actions SET state = ?, result = ?, error = ?, finished_at = ?
             WHERE org_id = ? AND id = ? AND state = ?",
        values: vec![
            text(a.state.as_str()),
            opt_text(a.result.as_ref().map(to_json).transpose()?),
            opt_text(a.error.as_deref()),
            Value::Int(opt_us(a.finished_at)),
            text(a.org_id.as_str()),
            text(a.id.as_str()),
            text(from.as_str()),
        ],
        expect: Expect::Unchanged(format!("action {} is no longer {}", a.id, from.as_str())),
    })
}

pub fn insert_job(j: &Job) -> Result<Write, StoreError> {
    Ok(Write {
        table: "jobs",
        sql: "INSERT INTO jobs (id, org_id, kind, subject, state, attempts, max_attempts, run_at, lease_owner,
                lease_until, payload, progress, result, error, created_at, started_at, finished_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        values: vec![
            text(j.id.as_str()),
            text(j.org_id.as_str()),
            text(j.kind.as_str()),
            opt_text(j.subject.as_deref()),
            text(j.state.as_str()),
            int(j.attempts),
            int(j.max_attempts),
            int(to_us(j.run_at)),
            opt_text(j.lease_owner.as_deref()),
            Value::Int(opt_us(j.lease_until)),
            text(to_json(&j.payload)?),
            opt_text(j.progress.as_ref().map(to_json).transpose()?),
            opt_text(j.result.as_ref().map(to_json).transpose()?),
            opt_text(j.error.as_deref()),
            int(to_us(j.created_at)),
            Value::Int(opt_us(j.started_at)),
            Value::Int(opt_us(j.finished_at)),
        ],
        expect: Expect::Insert,
    })
}

pub fn update_job(j: &Job) -> Result<Write, StoreError> {
    Ok(Write {
        table: "jobs",
        sql: "UPDATE jobs SET state = ?, attempts = ?, run_at = ?, lease_owner = ?, lease_until = ?,
                progress = ?, result = ?, error = ?, started_at = ?, finished_at = ?
             WHERE org_id = ? AND id = ?",
        values: vec![
            text(j.state.as_str()),
            int(j.attempts),
            int(to_us(j.run_at)),
            opt_text(j.lease_owner.as_deref()),
            Value::Int(opt_us(j.lease_until)),
            opt_text(j.progress.as_ref().map(to_json).transpose()?),
            opt_text(j.result.as_ref().map(to_json).transpose()?),
            opt_text(j.error.as_deref()),
            Value::Int(opt_us(j.started_at)),
            Value::Int(opt_us(j.finished_at)),
            text(j.org_id.as_str()),
            text(j.id.as_str()),
        ],
        expect: Expect::One(format!("job {} vanished", j.id)),
    })
}

/// Ends a job that must still be queued ([`StoreTx::end_queued_job`]).
///
/// [`StoreTx::end_queued_job`]: countersign_core::store::StoreTx::end_queued_job
pub fn end_queued_job(end: &JobEnd) -> Result<Write, StoreError> {
    Ok(Write {
        table: "jobs",
        sql:
            "UPDATE jobs SET state = ?, attempts = attempts + 1, result = ?, error = ?, started_at = ?, finished_at = ?
             WHERE org_id = ? AND id = ? AND state = 'queued'",
        values: vec![
            text(end.state.as_str()),
            opt_text(end.result.as_ref().map(to_json).transpose()?),
            opt_text(end.error.as_deref()),
            Value::Int(opt_us(end.started_at)),
            int(to_us(end.finished_at)),
            text(end.org_id.as_str()),
            text(end.id.as_str()),
        ],
        expect: Expect::Unchanged(format!("job {} is no longer queued", end.id)),
    })
}

pub fn insert_delivery(d: &Delivery) -> Write {
    Write {
        table: "webhook_deliveries",
        sql: "INSERT INTO webhook_deliveries (id, org_id, webhook_id, job_id, event_id, event_type, attempt, status,
                latency_ms, error, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        values: vec![
            text(d.id.as_str()),
            text(d.org_id.as_str()),
            text(d.webhook_id.as_str()),
            text(d.job_id.as_str()),
            text(d.event_id.as_str()),
            text(d.event_type.as_str()),
            int(d.attempt),
            Value::Int(d.status.map(i64::from)),
            int(i64::try_from(d.latency_ms).unwrap_or(i64::MAX)),
            opt_text(d.error.as_deref()),
            int(to_us(d.created_at)),
        ],
        expect: Expect::Insert,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use countersign_core::capability::Capability;
    use countersign_core::domain::{Action, Delivery, Job, JobKind};
    use countersign_core::ids::{ActionId, AgentId, DeliveryId, JobId, OrgId, WebhookId};
    use countersign_core::state::{ActionState, JobState};
    use countersign_core::store::JobEnd;
    use serde_json::json;

    use super::*;

    #[test]
    fn every_write_binds_a_value_for_each_placeholder() {
        let now = chrono::Utc::now();
        let org = OrgId::new();
        let job = Job::new(org.clone(), JobKind::ActionExecute, None, json!({}), now);
        let action = Action {
            id: ActionId::new(),
            org_id: org.clone(),
            agent_id: AgentId::new(),
            agent_name: "a".into(),
            session_id: None,
            capability: Capability::parse("email.send.message").unwrap(),
            params: json!({}),
            reasoning: String::new(),
            target: None,
            idempotency_key: None,
            state: ActionState::Executing,
            verdict: None,
            approval_id: None,
            result: None,
            error: None,
            request_hash: String::new(),
            created_at: now,
            decided_at: None,
            started_at: None,
            finished_at: None,
            job_id: None,
        };
        let end = JobEnd {
            org_id: org.clone(),
            id: JobId::new(),
            state: JobState::Succeeded,
            started_at: None,
            finished_at: now,
            result: None,
            error: None,
        };
        let delivery = Delivery {
            id: DeliveryId::new(),
            org_id: org,
            webhook_id: WebhookId::new(),
            job_id: job.id.clone(),
            event_id: "evt".into(),
            event_type: "action.failed".into(),
            attempt: 1,
            status: None,
            latency_ms: 0,
            error: None,
            created_at: now,
        };
        let writes = [
            insert_action(&action).unwrap(),
            update_action(&action).unwrap(),
            end_action(&action, ActionState::Executing).unwrap(),
            insert_job(&job).unwrap(),
            update_job(&job).unwrap(),
            end_queued_job(&end).unwrap(),
            insert_delivery(&delivery),
        ];
        for write in writes {
            assert_eq!(write.sql.matches('?').count(), write.values.len(), "{}", write.sql);
        }
    }
}
