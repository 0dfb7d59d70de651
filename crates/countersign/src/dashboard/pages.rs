//! The auditor's page: the audit log with filters (action, actor, subject), a live tail that appends new
//! events as they are written, and the chain status from verification (admins only, as in the API).

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::DateTime;
use countersign_core::audit::AuditEvent;
use countersign_core::store::AuditFilter;
use serde::Deserialize;

use super::DashboardState;
use super::approvals::Chrome;
use super::session::UiUser;
use super::view::{self, render};
use crate::error::Error;

const AUDIT_LIMIT: u32 = 100;

pub struct AuditRow {
    pub seq: i64,
    pub time: String,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub data: String,
}

impl AuditRow {
    fn new(e: &AuditEvent) -> AuditRow {
        AuditRow {
            seq: e.seq,
            time: DateTime::from_timestamp_micros(e.time_us).map(view::clock).unwrap_or_default(),
            actor: format!("{} {}", format!("{:?}", e.actor.kind).to_lowercase(), e.actor.name),
            action: e.action.clone(),
            subject: e.subject.clone().unwrap_or_default(),
            data: e.data.to_string(),
        }
    }
}

#[derive(Deserialize, Default)]
pub struct AuditQuery {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    after: Option<i64>,
}

fn non_empty(value: &Option<String>) -> Option<String> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned)
}

impl AuditQuery {
    fn filter(&self) -> AuditFilter {
        AuditFilter {
            action: non_empty(&self.action),
            actor: non_empty(&self.actor),
            subjects: non_empty(&self.subject).into_iter().collect(),
            ..AuditFilter::default()
        }
    }
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    chrome: Chrome,
    rows: Vec<AuditRow>,
    action: String,
    actor: String,
    subject: String,
    chain: String,
    chain_ok: bool,
    next: Option<i64>,
    last: i64,
}

#[derive(Template)]
#[template(path = "audit_rows.html")]
struct AuditRows {
    rows: Vec<AuditRow>,
}

pub async fn audit(
    State(state): State<DashboardState>,
    ui: UiUser,
    Query(query): Query<AuditQuery>,
) -> Result<Response, Error> {
    let after = query.after.unwrap_or(0).max(0);
    let events = state.gateway.query_audit(&ui.caller, &query.filter(), after, AUDIT_LIMIT).await?;
    let last = events.last().map_or(after, |e| e.seq);
    let next = (events.len() == AUDIT_LIMIT as usize).then_some(last);
    let (chain, chain_ok) = match state.gateway.verify_audit(&ui.caller).await {
        Ok(report) if report.ok => (format!("intact: {} events, head {}", report.events, report.head_hash), true),
        Ok(report) => (
            format!("BROKEN at seq {}", report.first_broken_seq.map(|s| s.to_string()).unwrap_or_else(|| "?".into())),
            false,
        ),
        Err(Error::Forbidden(_)) => ("verification needs the admin role".into(), true),
        Err(other) => return Err(other),
    };
    let page = AuditPage {
        chrome: Chrome::new(&ui, "audit"),
        rows: events.iter().map(AuditRow::new).collect(),
        action: query.action.clone().unwrap_or_default(),
        actor: query.actor.clone().unwrap_or_default(),
        subject: query.subject.clone().unwrap_or_default(),
        chain,
        chain_ok,
        next,
        last,
    };
    Ok(render(StatusCode::OK, &page))
}

/// Rows after `after` (the live tail appends these), with the same filters.
pub async fn audit_rows(
    State(state): State<DashboardState>,
    ui: UiUser,
    Query(query): Query<AuditQuery>,
) -> Result<Response, Error> {
    let after = query.after.unwrap_or(0).max(0);
    let events = state.gateway.query_audit(&ui.caller, &query.filter(), after, AUDIT_LIMIT).await?;
    Ok(render(StatusCode::OK, &AuditRows { rows: events.iter().map(AuditRow::new).collect() }))
}
