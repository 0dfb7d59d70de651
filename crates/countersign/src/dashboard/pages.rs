//! The auditor's page: the audit log with filters (action, actor, subject, a UTC time range), newest or
//! oldest first with cursor pages both ways, a live tail that adds new events to the page showing the newest
//! ones, and the chain status from verification (admins only, as in the API). Bad filter input is shown on
//! the page as a 400 next to the form; it never reaches the store.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::DateTime;
use countersign_core::audit::AuditEvent;
use countersign_core::ids::OrgId;
use countersign_core::store::AuditFilter;
use serde::Deserialize;
use std::time::Instant;

use super::DashboardState;
use super::approvals::Chrome;
use super::session::UiUser;
use super::view::{self, render};
use crate::error::Error;
use crate::gateway;

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

/// The page's query string, all text so that a bad value is shown on the page rather than refused by the
/// extractor. The filters are read by the same parser as `GET /v1/audit` ([`gateway::audit_filter`]).
#[derive(Deserialize, Default)]
pub struct AuditQuery {
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    actor: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    /// Times: RFC 3339, microseconds, or a date and time without offset (what `datetime-local` sends), UTC.
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    /// `newest` (the default: the latest page first) or `oldest`.
    #[serde(default)]
    order: Option<String>,
    /// Cursors: the page of events just after, or just before, this seq.
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    before: Option<String>,
}

/// Which end of the log a page starts from, and the order its rows are shown in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    Newest,
    Oldest,
}

impl Order {
    fn as_str(self) -> &'static str {
        match self {
            Order::Newest => "newest",
            Order::Oldest => "oldest",
        }
    }
}

fn text(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

fn seq_param(field: &str, value: &Option<String>) -> Result<Option<i64>, Error> {
    match value.as_deref().map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| Error::bad_request(field, format!("`{v}` is not an audit seq (a whole number ≥ 0)"))),
    }
}

impl AuditQuery {
    fn filter(&self) -> Result<AuditFilter, Error> {
        gateway::audit_filter(
            self.action.as_deref(),
            self.actor.as_deref(),
            self.subject.as_deref(),
            self.since.as_deref(),
            self.until.as_deref(),
        )
    }

    fn order(&self) -> Result<Order, Error> {
        match self.order.as_deref().map(str::trim) {
            None | Some("") | Some("newest") => Ok(Order::Newest),
            Some("oldest") => Ok(Order::Oldest),
            Some(other) => Err(Error::bad_request("order", format!("`{other}` is not an order: newest or oldest"))),
        }
    }

    /// Everything a link must keep: the filters and the order, URL-encoded, blanks left out.
    fn link_query(&self, order: Order) -> String {
        let pairs: Vec<(&str, &str)> = [
            ("action", &self.action),
            ("actor", &self.actor),
            ("subject", &self.subject),
            ("since", &self.since),
            ("until", &self.until),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(|v| (k, v)))
        .chain(std::iter::once(("order", order.as_str())))
        .collect();
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }
}

/// A time bound as a `datetime-local` input shows it (UTC, to the second); what was typed if unreadable.
fn time_input(value: &Option<String>) -> String {
    let raw = text(value);
    match gateway::parse_audit_time("time", &raw).ok().and_then(DateTime::from_timestamp_micros) {
        Some(time) if !raw.trim().is_empty() => time.format("%Y-%m-%dT%H:%M:%S").to_string(),
        _ => raw,
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
    since: String,
    until: String,
    newest_first: bool,
    error: Option<String>,
    chain: String,
    chain_ok: bool,
    /// The filters and order, for links; and the filters with each order, for the jumps to either end.
    query: String,
    newest_query: String,
    oldest_query: String,
    /// Cursor of the page of newer events, if there are any.
    newer: Option<i64>,
    /// Cursor of the page of older events, if there are any.
    older: Option<i64>,
    /// Whether this page shows the newest events, so the live tail adds rows to it.
    at_head: bool,
    /// The newest seq the page covers: the live tail asks for events after it.
    last: i64,
}

#[derive(Template)]
#[template(path = "audit_rows.html")]
struct AuditRows {
    rows: Vec<AuditRow>,
}

/// One page of events (oldest first) and whether more match beyond each end.
struct Window {
    events: Vec<AuditEvent>,
    newer: Option<i64>,
    older: Option<i64>,
    last: i64,
}

/// The page a query asks for: after or before a cursor, or from one end of the log. One extra event is read
/// in the page's direction to learn whether more lie beyond it, and one in the other direction.
async fn window(
    state: &DashboardState,
    ui: &UiUser,
    filter: &AuditFilter,
    order: Order,
    after: Option<i64>,
    before: Option<i64>,
) -> Result<Window, Error> {
    let gateway = &state.gateway;
    let caller = &ui.caller;
    let page = AUDIT_LIMIT as usize;
    // The events oldest first, whether they were read toward newer ones, and the seqs the page spans when
    // it is empty (its first and last seq otherwise).
    let (mut events, toward_newer, low, high) = match (after, before, order) {
        (Some(_), _, _) | (None, None, Order::Oldest) => {
            let after = after.unwrap_or(0);
            (gateway.query_audit(caller, filter, after, AUDIT_LIMIT + 1).await?, true, after.saturating_add(1), after)
        }
        (None, Some(before), _) => {
            let mut events = gateway.query_audit_newest(caller, filter, Some(before), AUDIT_LIMIT + 1).await?;
            events.reverse();
            (events, false, before, (before - 1).max(0))
        }
        (None, None, Order::Newest) => {
            let mut events = gateway.query_audit_newest(caller, filter, None, AUDIT_LIMIT + 1).await?;
            events.reverse();
            (events, false, 1, 0)
        }
    };
    let more = events.len() > page;
    if more {
        if toward_newer {
            events.truncate(page);
        } else {
            events.drain(..events.len() - page);
        }
    }
    let low = events.first().map_or(low, |e| e.seq);
    let high = events.last().map_or(high, |e| e.seq);
    let newer = if toward_newer {
        more
    } else {
        before.is_some() && !gateway.query_audit(caller, filter, high, 1).await?.is_empty()
    };
    let older = if toward_newer {
        low > 1 && !gateway.query_audit_newest(caller, filter, Some(low), 1).await?.is_empty()
    } else {
        more
    };
    Ok(Window { events, newer: newer.then_some(high), older: older.then_some(low), last: high })
}

/// How long the audit page shows a chain verification before running another.
const CHAIN_CHECK_REUSE: std::time::Duration = std::time::Duration::from_secs(30);

/// The last chain verification shown per org: (when, text, intact).
pub type ChainChecks = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<OrgId, (Instant, String, bool)>>>;

/// The chain's state for the audit page: verified afresh at most every 30 s per org (paging and filtering
/// reuse the last result, which says when it was taken), since a verification reads the whole log since its
/// last checkpoint.
async fn chain_status(state: &DashboardState, ui: &UiUser) -> Result<(String, bool), Error> {
    // The role first: a cached result is as much the admin's as a fresh one.
    if ui.caller.require_admin().is_err() {
        return Ok(("verification needs the admin role".into(), true));
    }
    let org = ui.caller.org_id().clone();
    let recent = |checks: &ChainChecks| {
        let checks = checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        checks.get(&org).filter(|(at, _, _)| at.elapsed() < CHAIN_CHECK_REUSE).map(|(_, text, ok)| (text.clone(), *ok))
    };
    if let Some(shown) = recent(&state.chain_checks) {
        return Ok(shown);
    }
    let checked_at = state.gateway.now().format("%H:%M:%S UTC");
    let (text, ok) = match state.gateway.verify_audit(&ui.caller).await {
        Ok(report) if report.ok => {
            (format!("intact: {} events, head {} (checked {checked_at})", report.events, report.head_hash), true)
        }
        Ok(report) => (
            format!(
                "BROKEN at seq {} (checked {checked_at})",
                report.first_broken_seq.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
            ),
            false,
        ),
        Err(Error::Forbidden(_)) => return Ok(("verification needs the admin role".into(), true)),
        Err(other) => return Err(other),
    };
    let mut checks = state.chain_checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    checks.insert(org, (Instant::now(), text.clone(), ok));
    Ok((text, ok))
}

pub async fn audit(
    State(state): State<DashboardState>,
    ui: UiUser,
    Query(query): Query<AuditQuery>,
) -> Result<Response, Error> {
    let (chain, chain_ok) = chain_status(&state, &ui).await?;
    let order = query.order().unwrap_or(Order::Newest);
    let mut page = AuditPage {
        chrome: Chrome::new(&ui, "audit"),
        rows: Vec::new(),
        action: text(&query.action),
        actor: text(&query.actor),
        subject: text(&query.subject),
        since: time_input(&query.since),
        until: time_input(&query.until),
        newest_first: order == Order::Newest,
        error: None,
        chain,
        chain_ok,
        query: query.link_query(order),
        newest_query: query.link_query(Order::Newest),
        oldest_query: query.link_query(Order::Oldest),
        newer: None,
        older: None,
        at_head: false,
        last: 0,
    };
    let parsed = query.order().and_then(|order| {
        Ok((order, query.filter()?, seq_param("after", &query.after)?, seq_param("before", &query.before)?))
    });
    let (order, filter, after, before) = match parsed {
        Ok(parsed) => parsed,
        // Bad input is shown on the page, next to the form that can fix it.
        Err(Error::BadRequest { message, .. }) => {
            page.error = Some(message);
            return Ok(render(StatusCode::BAD_REQUEST, &page));
        }
        Err(other) => return Err(other),
    };
    let window = window(&state, &ui, &filter, order, after, before).await?;
    let mut rows: Vec<AuditRow> = window.events.iter().map(AuditRow::new).collect();
    if order == Order::Newest {
        rows.reverse();
    }
    page.rows = rows;
    page.newer = window.newer;
    page.older = window.older;
    page.at_head = window.newer.is_none();
    page.last = window.last;
    Ok(render(StatusCode::OK, &page))
}

/// Rows after `after` (the live tail adds these), with the same filters, in the page's order.
pub async fn audit_rows(
    State(state): State<DashboardState>,
    ui: UiUser,
    Query(query): Query<AuditQuery>,
) -> Result<Response, Error> {
    let order = query.order()?;
    let after = seq_param("after", &query.after)?.unwrap_or(0);
    let events = state.gateway.query_audit(&ui.caller, &query.filter()?, after, AUDIT_LIMIT).await?;
    let mut rows: Vec<AuditRow> = events.iter().map(AuditRow::new).collect();
    if order == Order::Newest {
        rows.reverse();
    }
    Ok(render(StatusCode::OK, &AuditRows { rows }))
}
