//! The approver's pages: the pending queue (full page and the live-refreshed list fragment), one approval
//! in detail (as a page, or as the drawer's fragment) with Approve and Deny, and the history.
//!
//! Who may decide is the gateway's answer (`Gateway::may_decide`), shown as disabled buttons with the reason;
//! the decision itself goes through `Gateway::decide`, which checks everything again.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use countersign_core::domain::{Action, Approval};
use countersign_core::ids::ApprovalId;
use countersign_core::state::{ApprovalStatus, Decision};
use countersign_core::store::Page;
use serde::Deserialize;

use super::DashboardState;
use super::session::{Posted, UiUser};
use super::view::{self, ApprovalRow, Field, render};
use crate::error::Error;

/// What the layout shows on every page: who is logged in, the CSRF token for the logout form, the tab.
pub struct Chrome {
    pub user: String,
    pub role: String,
    pub csrf: String,
    pub active: &'static str,
}

impl Chrome {
    pub fn new(ui: &UiUser, active: &'static str) -> Chrome {
        Chrome { user: ui.user.name.clone(), role: ui.user.role.as_str().to_owned(), csrf: ui.csrf.clone(), active }
    }
}

/// A page of the queue is this long; the queue page shows the oldest ones.
const QUEUE_LIMIT: u32 = 200;
const HISTORY_LIMIT: u32 = 25;

/// The oldest pending approvals, and whether there are more than the page shows.
async fn queue(state: &DashboardState, ui: &UiUser) -> Result<(Vec<ApprovalRow>, bool), Error> {
    // One more than the page, to know whether there are more.
    let page = Page { limit: QUEUE_LIMIT + 1, after: None };
    let listed = state.gateway.list_approvals(&ui.caller, Some(ApprovalStatus::Pending), &page).await?;
    let items = listed.items;
    let now = state.gateway.now();
    let more = listed.cut || items.len() > QUEUE_LIMIT as usize;
    let rows =
        items.iter().take(QUEUE_LIMIT as usize).map(|(approval, action)| ApprovalRow::new(approval, action, now));
    Ok((rows.collect(), more))
}

#[derive(Template)]
#[template(path = "pending.html")]
struct PendingPage {
    chrome: Chrome,
    rows: Vec<ApprovalRow>,
    /// More are pending than the queue shows (History lists them all).
    more: bool,
}

#[derive(Template)]
#[template(path = "pending_list.html")]
struct PendingList {
    rows: Vec<ApprovalRow>,
    more: bool,
}

pub async fn pending(State(state): State<DashboardState>, ui: UiUser) -> Result<Response, Error> {
    let (rows, more) = queue(&state, &ui).await?;
    Ok(render(StatusCode::OK, &PendingPage { chrome: Chrome::new(&ui, "pending"), rows, more }))
}

/// The queue's rows alone, which the page's script fetches whenever the SSE stream says approvals changed.
pub async fn pending_list(State(state): State<DashboardState>, ui: UiUser) -> Result<Response, Error> {
    let (rows, more) = queue(&state, &ui).await?;
    Ok(render(StatusCode::OK, &PendingList { rows, more }))
}

/// Everything the detail view shows about one approval.
pub struct Detail {
    pub row: ApprovalRow,
    pub action_id: String,
    pub action_state: String,
    pub group: String,
    pub quorum: u32,
    pub params: Vec<Field>,
    pub params_json: String,
    pub reasoning: String,
    pub target: Option<String>,
    pub rule_message: Option<String>,
    pub explanation: Option<String>,
    pub policy_version: String,
    pub snapshot: Option<String>,
    pub risk_score: String,
    pub risk_reversible: bool,
    pub risk_external: bool,
    pub risk_prior: u64,
    pub risk_factors: Vec<String>,
    /// `Some(reason)` when this user may not decide.
    pub blocked: Option<String>,
    pub expires: String,
}

impl Detail {
    fn new(state: &DashboardState, ui: &UiUser, approval: &Approval, action: &Action) -> Detail {
        let now = state.gateway.now();
        let verdict = action.verdict.as_ref();
        Detail {
            row: ApprovalRow::new(approval, action, now),
            action_id: action.id.to_string(),
            action_state: action.state.as_str().to_owned(),
            group: approval.group.clone(),
            quorum: approval.quorum,
            params: view::fields(&action.params),
            params_json: crate::text::reveal(&view::pretty_json(&action.params)),
            reasoning: crate::text::reveal(&action.reasoning),
            target: action
                .target
                .as_ref()
                .and_then(|t| serde_json::to_value(t).ok())
                .map(|t| crate::text::reveal(&view::pretty_json(&t))),
            rule_message: verdict.and_then(|v| v.message.clone()),
            explanation: verdict.map(|v| v.explanation.clone()),
            policy_version: approval.policy_version.clone(),
            snapshot: approval.snapshot.as_ref().map(view::yaml),
            risk_score: format!("{:.2}", approval.risk.score),
            risk_reversible: approval.risk.reversible,
            risk_external: approval.risk.external,
            risk_prior: approval.risk.prior_successes,
            risk_factors: approval.risk.factors.clone(),
            blocked: state.gateway.may_decide(&ui.caller, approval).err(),
            expires: view::clock(approval.expires_at),
        }
    }
}

#[derive(Template)]
#[template(path = "detail.html")]
struct DetailPage {
    chrome: Chrome,
    d: Detail,
    error: Option<String>,
}

#[derive(Template)]
#[template(path = "detail_fragment.html")]
struct DetailFragment {
    chrome: Chrome,
    d: Detail,
    error: Option<String>,
}

fn parse_id(id: &str) -> Result<ApprovalId, Error> {
    ApprovalId::parse(id).ok_or_else(|| Error::not_found("approval", id))
}

#[derive(Deserialize)]
pub struct DetailQuery {
    #[serde(default)]
    partial: Option<String>,
}

pub async fn detail(
    State(state): State<DashboardState>,
    ui: UiUser,
    Path(id): Path<String>,
    Query(query): Query<DetailQuery>,
) -> Result<Response, Error> {
    let (approval, action) = state.gateway.get_approval(&ui.caller, &parse_id(&id)?).await?;
    let d = Detail::new(&state, &ui, &approval, &action);
    let chrome = Chrome::new(&ui, "pending");
    if query.partial.is_some() {
        return Ok(render(StatusCode::OK, &DetailFragment { chrome, d, error: None }));
    }
    Ok(render(StatusCode::OK, &DetailPage { chrome, d, error: None }))
}

#[derive(Deserialize)]
pub struct DecideForm {
    #[serde(default)]
    decision: String,
    #[serde(default)]
    note: Option<String>,
}

pub async fn decide(
    State(state): State<DashboardState>,
    Path(id): Path<String>,
    posted: Posted<DecideForm>,
) -> Result<Response, Error> {
    let Posted { ui, form } = posted;
    let id = parse_id(&id)?;
    let decision = match form.decision.as_str() {
        "approve" => Decision::Approve,
        "deny" => Decision::Deny,
        other => return Err(Error::bad_request("decision", format!("expected approve or deny, not `{other}`"))),
    };
    let note = form.note.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    match state.gateway.decide(&ui.caller, &id, decision, note).await {
        Ok(_) => Ok(Redirect::to("/ui/pending").into_response()),
        Err(
            error @ (Error::Forbidden(_) | Error::Conflict { .. } | Error::BadRequest { .. } | Error::Invalid { .. }),
        ) => {
            // Show the refusal next to the approval as it now stands.
            let status = StatusCode::from_u16(error.kind().table().1).unwrap_or(StatusCode::BAD_REQUEST);
            let (approval, action) = state.gateway.get_approval(&ui.caller, &id).await?;
            let d = Detail::new(&state, &ui, &approval, &action);
            let page = DetailPage { chrome: Chrome::new(&ui, "pending"), d, error: Some(error.to_string()) };
            Ok(render(status, &page))
        }
        Err(other) => Err(other),
    }
}

#[derive(Template)]
#[template(path = "history.html")]
struct HistoryPage {
    chrome: Chrome,
    rows: Vec<ApprovalRow>,
    status: String,
    statuses: Vec<String>,
    next: Option<String>,
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

pub async fn history(
    State(state): State<DashboardState>,
    ui: UiUser,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, Error> {
    let status_text = query.status.filter(|s| !s.is_empty() && s != "all").unwrap_or_else(|| "all".into());
    let status = match status_text.as_str() {
        "all" => None,
        s => Some(
            ApprovalStatus::parse(s).ok_or_else(|| Error::bad_request("status", format!("unknown status `{s}`")))?,
        ),
    };
    let page = crate::http::page_from(Some(HISTORY_LIMIT), query.cursor.filter(|c| !c.is_empty()))?;
    let listed = state.gateway.list_approvals(&ui.caller, status, &page).await?;
    let items = listed.items;
    let next = crate::http::next_cursor(&page, items.last().map(|(a, _)| a.id.to_string()), items.len(), listed.cut);
    let now = state.gateway.now();
    let rows = items.iter().map(|(approval, action)| ApprovalRow::new(approval, action, now)).collect();
    let statuses = ["all", "pending", "approved", "denied", "expired", "cancelled"].map(String::from).to_vec();
    Ok(render(
        StatusCode::OK,
        &HistoryPage { chrome: Chrome::new(&ui, "history"), rows, status: status_text, statuses, next },
    ))
}
