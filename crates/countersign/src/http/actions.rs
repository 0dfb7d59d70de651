//! Handlers for actions and the approval poll-token endpoints: parse, call the gateway, map the result.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use countersign_core::capability::Capability;
use countersign_core::domain::{Action, Target};
use countersign_core::ids::{ActionId, AgentId};
use countersign_core::state::ActionState;
use countersign_core::store::ActionFilter;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::auth::{Auth, AuthThatWaits};
use super::problem::{ApiJson, ApiPath, ApiQuery, problem_response};
use super::{AppState, next_cursor, page_from, views};
use crate::error::{Error, Result};
use crate::gateway::{SubmitOutcome, SubmitRequest};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    capability: String,
    #[serde(default)]
    params: Option<Value>,
    reasoning: Box<RawValue>,
    #[serde(default)]
    target: Option<Value>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
pub struct WaitQuery {
    wait: Option<f64>,
    timeout: Option<f64>,
}

pub fn wait_duration(seconds: Option<f64>) -> Result<Option<Duration>> {
    seconds.map(|s| crate::gateway::wait_seconds("wait", s)).transpose()
}

fn parse_submit(body: SubmitBody) -> Result<SubmitRequest> {
    let capability = Capability::parse(&body.capability).map_err(|e| Error::invalid("capability", e.to_string()))?;
    let params = body.params.unwrap_or_else(|| Value::Object(Default::default()));
    if !params.is_object() {
        return Err(Error::bad_request("params", "must be a JSON object"));
    }
    let target = match body.target {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            serde_json::from_value::<Target>(value)
                .map_err(|e| Error::bad_request("target", format!("invalid target: {e}")))?,
        ),
    };
    if let Some(key) = &body.idempotency_key
        && (key.is_empty() || key.len() > 255)
    {
        return Err(Error::bad_request("idempotency_key", "must be 1 to 255 characters"));
    }
    Ok(SubmitRequest {
        capability,
        params,
        reasoning: body.reasoning.get().to_owned(),
        target,
        idempotency_key: body.idempotency_key,
    })
}

/// 200 terminal, 202 pending or running, 403 denied (problem body with the rule and the action).
fn submit_response(state: &AppState, outcome: &SubmitOutcome) -> Response {
    let body = views::action(&state.gateway, &outcome.action, outcome.approval.as_ref(), outcome.token.as_deref());
    action_response(body, &outcome.action)
}

fn action_response(body: Value, action: &Action) -> Response {
    if action.state == ActionState::Denied {
        let verdict = action.verdict.as_ref();
        let by_human = action.approval_id.is_some();
        let rule = verdict.map(|v| v.rule.clone()).unwrap_or_default();
        let message = if by_human {
            format!("action {} was denied by an approver", action.id)
        } else {
            let why = verdict.and_then(|v| v.message.clone()).unwrap_or_else(|| "the policy denies this action".into());
            format!("denied by rule `{rule}`: {why}")
        };
        let (status, mut problem) = Error::PolicyDenied { rule, action_id: action.id.to_string(), message }.problem();
        // The action itself rides along, so the agent need not fetch it.
        problem["action"] = body;
        return problem_response(status, problem);
    }
    let status = if action.is_terminal() { StatusCode::OK } else { StatusCode::ACCEPTED };
    (status, Json(body)).into_response()
}

pub async fn submit(
    State(state): State<AppState>,
    AuthThatWaits(caller, secret): AuthThatWaits,
    ApiQuery(query): ApiQuery<WaitQuery>,
    ApiJson(body): ApiJson<SubmitBody>,
) -> Result<Response> {
    let request = parse_submit(body)?;
    let wait = wait_duration(query.wait)?;
    let mut outcome = state.gateway.submit(&caller, request).await?;
    if let Some(wait) = wait
        && !outcome.action.is_terminal()
        && !wait.is_zero()
    {
        match state.gateway.wait_action(&caller, &outcome.action.id, wait).await {
            Ok(action) => {
                outcome.action = action;
                state.gateway.still_stands(&secret).await?;
                outcome.approval = state.gateway.approval_of(&outcome.action).await?;
            }
            // Over the caller's open waits: the action is recorded, so it answers as submitted (202, pending)
            // rather than an error that would lose it; a wait on it later may find a free slot.
            Err(Error::RateLimited { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(submit_response(&state, &outcome))
}

fn parse_action_id(id: &str) -> Result<ActionId> {
    ActionId::parse(id).ok_or_else(|| Error::not_found("action", id))
}

pub async fn get(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>> {
    let action = state.gateway.get_action(&caller, &parse_action_id(&id)?).await?;
    let approval = state.gateway.approval_of(&action).await?;
    Ok(Json(views::action(&state.gateway, &action, approval.as_ref(), None)))
}

pub async fn wait(
    State(state): State<AppState>,
    AuthThatWaits(caller, secret): AuthThatWaits,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> Result<Json<Value>> {
    let timeout = wait_duration(query.timeout.or(query.wait))?.unwrap_or(Duration::from_secs(30));
    let action = state.gateway.wait_action(&caller, &parse_action_id(&id)?, timeout).await?;
    state.gateway.still_stands(&secret).await?;
    let approval = state.gateway.approval_of(&action).await?;
    Ok(Json(views::action(&state.gateway, &action, approval.as_ref(), None)))
}

pub async fn cancel(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>> {
    let action = state.gateway.cancel_action(&caller, &parse_action_id(&id)?).await?;
    let approval = state.gateway.approval_of(&action).await?;
    Ok(Json(views::action(&state.gateway, &action, approval.as_ref(), None)))
}

pub async fn trace(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>> {
    let trace = state.gateway.trace(&caller, &parse_action_id(&id)?).await?;
    Ok(Json(views::trace(&state.gateway, &trace)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    state: Option<String>,
    agent: Option<String>,
    capability: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>> {
    let action_state = match &query.state {
        Some(s) => {
            Some(ActionState::parse(s).ok_or_else(|| Error::bad_request("state", format!("unknown state `{s}`")))?)
        }
        None => None,
    };
    let agent_id = match &query.agent {
        Some(a) => match AgentId::parse(a) {
            Some(id) => Some(id),
            None => match state.gateway.find_agent(&caller, a).await? {
                Some(agent) => Some(agent.id),
                None => return Ok(Json(views::list(Vec::new(), None))),
            },
        },
        None => None,
    };
    let filter = ActionFilter { state: action_state, agent_id, capability: query.capability.clone() };
    let page = page_from(query.limit, query.cursor)?;
    let listed = state.gateway.list_actions(&caller, filter, &page).await?;
    let actions = &listed.items;
    let cursor = next_cursor(&page, actions.last().map(|a| a.id.to_string()), actions.len(), listed.cut);
    let items = actions.iter().map(|a| views::action(&state.gateway, a, None, None)).collect();
    Ok(Json(views::list(items, cursor)))
}

pub async fn approval_status(State(state): State<AppState>, ApiPath(token): ApiPath<String>) -> Result<Json<Value>> {
    let status = state.gateway.approval_status(&token).await?;
    Ok(Json(views::approval_status(&status)))
}

pub async fn approval_result(State(state): State<AppState>, ApiPath(token): ApiPath<String>) -> Result<Json<Value>> {
    let action = state.gateway.approval_result(&token).await?;
    Ok(Json(serde_json::json!({
        "action_id": action.id,
        "state": action.state,
        "result": action.result,
        "error": action.error,
        "finished_at": views::opt_time(action.finished_at),
    })))
}
