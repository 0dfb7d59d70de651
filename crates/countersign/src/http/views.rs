//! Wire shapes of the v1 API, converted explicitly from domain types. Field names here are a public
//! contract (design §5): change them only with a note.
//!
//! The agent's reasoning is embedded as the raw JSON it sent, byte for byte.

use chrono::{DateTime, SecondsFormat, Utc};
use countersign_core::audit::AuditEvent;
use countersign_core::domain::{Action, Agent, ApiKey, Approval, Delivery, Job, PrincipalRef, Session, User, Webhook};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::gateway::{ApprovalStatusView, Gateway, Trace};

pub fn time(t: DateTime<Utc>) -> Value {
    Value::String(t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

pub fn opt_time(t: Option<DateTime<Utc>>) -> Value {
    t.map(time).unwrap_or(Value::Null)
}

fn raw(reasoning: &str) -> Value {
    // The stored text is the JSON the agent sent; embedding it through RawValue keeps it verbatim.
    match RawValue::from_string(reasoning.to_owned()) {
        // Deeper than serde_json rebuilds (the raw text was checked without a depth limit): shown as text.
        Ok(raw) => serde_json::to_value(raw).unwrap_or_else(|_| Value::String(reasoning.to_owned())),
        Err(_) => Value::String(reasoning.to_owned()),
    }
}

/// The approval summary carried on an action while it exists.
fn action_approval(gateway: &Gateway, approval: Option<&Approval>, token: Option<&str>) -> Value {
    let Some(a) = approval else { return Value::Null };
    let mut v = json!({
        "id": a.id,
        "status": a.status,
        "group": a.group,
        "quorum": a.quorum,
        "approvals": a.counted_approvals(),
        "expires_at": time(a.expires_at),
        "decided_at": opt_time(a.decided_at),
    });
    if let Some(token) = token {
        v["token"] = json!(token);
        v["poll_url"] = json!(gateway.poll_url_for(token));
    } else {
        v["poll_url"] = json!(format!("{}/v1/approval-status/{{token}}", gateway.public_url()));
    }
    v
}

pub fn action(gateway: &Gateway, a: &Action, approval: Option<&Approval>, token: Option<&str>) -> Value {
    let approval_value = match (approval, &a.approval_id) {
        (Some(ap), _) => action_approval(gateway, Some(ap), token),
        (None, Some(id)) => json!({"id": id}),
        (None, None) => Value::Null,
    };
    json!({
        "id": a.id,
        "agent": {"id": a.agent_id, "name": a.agent_name},
        "session_id": a.session_id,
        "capability": a.capability,
        "params": a.params,
        "reasoning": raw(&a.reasoning),
        "target": a.target,
        "idempotency_key": a.idempotency_key,
        "state": a.state,
        "verdict": a.verdict,
        "approval": approval_value,
        "result": a.result,
        "error": a.error,
        "request_hash": if a.request_hash.is_empty() { Value::Null } else { json!(a.request_hash) },
        "created_at": time(a.created_at),
        "decided_at": opt_time(a.decided_at),
        "started_at": opt_time(a.started_at),
        "finished_at": opt_time(a.finished_at),
        "job_id": a.job_id,
    })
}

pub fn job(j: &Job) -> Value {
    json!({
        "id": j.id,
        "kind": j.kind,
        "subject": j.subject,
        "state": j.state,
        "attempts": j.attempts,
        "max_attempts": j.max_attempts,
        "run_at": time(j.run_at),
        "progress": j.progress,
        "result": j.result,
        "error": j.error,
        "created_at": time(j.created_at),
        "started_at": opt_time(j.started_at),
        "finished_at": opt_time(j.finished_at),
    })
}

/// A subscription; the secret only in the creation answer.
pub fn webhook(w: &Webhook, secret: Option<&str>) -> Value {
    let mut v = json!({
        "id": w.id,
        "url": w.url,
        "events": w.events,
        "format": w.format,
        "description": w.description,
        "created_at": time(w.created_at),
        "deleted_at": opt_time(w.deleted_at),
    });
    if let Some(secret) = secret {
        v["secret"] = json!(secret);
    }
    v
}

pub fn delivery(d: &Delivery) -> Value {
    json!({
        "id": d.id,
        "webhook_id": d.webhook_id,
        "job_id": d.job_id,
        "event_id": d.event_id,
        "event_type": d.event_type,
        "attempt": d.attempt,
        "status": d.status,
        "latency_ms": d.latency_ms,
        "error": d.error,
        "created_at": time(d.created_at),
    })
}

pub fn approval(a: &Approval) -> Value {
    let decisions: Vec<Value> = a
        .decisions
        .iter()
        .map(|d| {
            json!({
                "user": {"id": d.user_id, "name": d.user_name},
                "decision": d.decision,
                "note": d.note,
                "counted": d.counted,
                "decided_at": time(d.created_at),
            })
        })
        .collect();
    json!({
        "id": a.id,
        "action_id": a.action_id,
        "status": a.status,
        "group": a.group,
        "quorum": a.quorum,
        "approvals": a.counted_approvals(),
        "decisions": decisions,
        "rule": a.rule,
        "policy_version": a.policy_version,
        "request_hash": a.request_hash,
        "snapshot": a.snapshot,
        "risk": a.risk,
        "created_at": time(a.created_at),
        "expires_at": time(a.expires_at),
        "decided_at": opt_time(a.decided_at),
    })
}

/// One approval with its action: what an approver needs on one screen.
pub fn approval_detail(gateway: &Gateway, a: &Approval, act: &Action) -> Value {
    let mut v = approval(a);
    v["axes"] = act.verdict.as_ref().map(|verdict| json!(verdict.axes)).unwrap_or(Value::Null);
    v["explanation"] = act.verdict.as_ref().map(|verdict| json!(verdict.explanation)).unwrap_or(Value::Null);
    v["message"] =
        act.verdict.as_ref().and_then(|verdict| verdict.message.clone()).map(Value::String).unwrap_or(Value::Null);
    v["agent"] = json!({"id": act.agent_id, "name": act.agent_name});
    v["capability"] = json!(act.capability);
    v["reasoning"] = raw(&act.reasoning);
    v["action"] = action(gateway, act, None, None);
    v
}

pub fn approval_status(s: &ApprovalStatusView) -> Value {
    // Exactly the design's `{status, decided_at, note}`: the token is a credential anyone holding it may use,
    // and it reveals nothing else.
    json!({"status": s.status, "decided_at": opt_time(s.decided_at), "note": s.note})
}

pub fn audit_event(e: &AuditEvent) -> Value {
    json!({
        "seq": e.seq,
        "id": e.id,
        "time": time(DateTime::from_timestamp_micros(e.time_us).unwrap_or_default()),
        "time_us": e.time_us,
        "actor": e.actor,
        "action": e.action,
        "subject": e.subject,
        "data": e.data,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    })
}

pub fn trace(gateway: &Gateway, t: &Trace) -> Value {
    json!({
        "action": action(gateway, &t.action, t.approval.as_ref(), None),
        "verdict": t.action.verdict,
        "approval": t.approval.as_ref().map(approval),
        "execution": {
            "target": t.action.target,
            "started_at": opt_time(t.action.started_at),
            "finished_at": opt_time(t.action.finished_at),
            "result": t.action.result,
            "error": t.action.error,
        },
        "events": t.events.iter().map(audit_event).collect::<Vec<_>>(),
    })
}

pub fn agent(a: &Agent) -> Value {
    json!({"id": a.id, "name": a.name, "owner": a.owner, "created_at": time(a.created_at), "disabled_at": opt_time(a.disabled_at)})
}

pub fn user(u: &User) -> Value {
    json!({"id": u.id, "name": u.name, "role": u.role, "created_at": time(u.created_at), "disabled_at": opt_time(u.disabled_at)})
}

pub fn key(k: &ApiKey) -> Value {
    let (kind, id) = match &k.principal {
        PrincipalRef::User(id) => ("user", id.to_string()),
        PrincipalRef::Agent(id) => ("agent", id.to_string()),
    };
    json!({
        "id": k.id,
        kind: id,
        "prefix": k.prefix,
        "last_four": k.last_four,
        "created_at": time(k.created_at),
        "expires_at": opt_time(k.expires_at),
        "revoked_at": opt_time(k.revoked_at),
    })
}

pub fn session(s: &Session, agent_name: Option<&str>) -> Value {
    json!({
        "id": s.id,
        "agent": {"id": s.agent_id, "name": agent_name},
        "scopes": s.scopes,
        "created_by": s.created_by,
        "created_at": time(s.created_at),
        "expires_at": time(s.expires_at),
        "revoked_at": opt_time(s.revoked_at),
    })
}

pub fn list(items: Vec<Value>, next_cursor: Option<String>) -> Value {
    json!({"items": items, "next_cursor": next_cursor})
}
