//! Handlers for the approval queue and decisions.

use axum::Json;
use axum::extract::State;
use countersign_core::ids::ApprovalId;
use countersign_core::state::{ApprovalStatus, Decision};
use serde::Deserialize;
use serde_json::Value;

use super::auth::Auth;
use super::problem::{ApiBytes, ApiPath, ApiQuery};
use super::{AppState, next_cursor, page_from, views};
use crate::error::{Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>> {
    let status = match query.status.as_deref() {
        None | Some("all") => None,
        Some(s) => Some(
            ApprovalStatus::parse(s).ok_or_else(|| Error::bad_request("status", format!("unknown status `{s}`")))?,
        ),
    };
    let page = page_from(query.limit, query.cursor)?;
    let listed = state.gateway.list_approvals(&caller, status, &page).await?;
    let approvals = &listed.items;
    let cursor = next_cursor(&page, approvals.last().map(|(a, _)| a.id.to_string()), approvals.len(), listed.cut);
    let items = approvals.iter().map(|(a, action)| views::approval_detail(&state.gateway, a, action)).collect();
    Ok(Json(views::list(items, cursor)))
}

fn parse_id(id: &str) -> Result<ApprovalId> {
    ApprovalId::parse(id).ok_or_else(|| Error::not_found("approval", id))
}

pub async fn get(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>> {
    let (approval, action) = state.gateway.get_approval(&caller, &parse_id(&id)?).await?;
    Ok(Json(views::approval_detail(&state.gateway, &approval, &action)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DecideBody {
    #[serde(default)]
    note: Option<String>,
}

/// The body is optional: empty means no note.
fn parse_body(bytes: &[u8]) -> Result<Option<DecideBody>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|e| Error::BadRequest { field: Some("note".into()), message: format!("invalid request body: {e}") })
}

async fn decide(
    state: AppState,
    caller: crate::gateway::Caller,
    id: String,
    decision: Decision,
    body: Option<DecideBody>,
) -> Result<Json<Value>> {
    let note = body.unwrap_or_default().note.filter(|n| !n.trim().is_empty());
    if note.as_ref().is_some_and(|n| n.len() > 4096) {
        return Err(Error::bad_request("note", "must be at most 4096 bytes"));
    }
    let (approval, action) = state.gateway.decide(&caller, &parse_id(&id)?, decision, note).await?;
    Ok(Json(views::approval_detail(&state.gateway, &approval, &action)))
}

pub async fn approve(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>> {
    decide(state, caller, id, Decision::Approve, parse_body(&body)?).await
}

pub async fn deny(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>> {
    decide(state, caller, id, Decision::Deny, parse_body(&body)?).await
}
