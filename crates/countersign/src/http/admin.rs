//! Handlers for principals (orgs, agents, users, keys), sessions and the policy.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use countersign_core::capability::{Capability, NameGlob};
use countersign_core::domain::Role;
use countersign_core::ids::{AgentId, KeyId, SessionId, UserId};
use countersign_core::policy::Policy;
use countersign_core::secrets::{self, SecretKind};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Auth;
use super::problem::{ApiBytes, ApiJson, ApiPath};
use super::{AppState, views};
use crate::error::{Error, Result};
use crate::gateway::policy::ActivePolicy;
use crate::gateway::{KeyOwner, SessionRequest};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgBody {
    name: String,
}

pub async fn create_org(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiJson(body): ApiJson<OrgBody>,
) -> Result<(StatusCode, Json<Value>)> {
    let created = state.gateway.create_org(&caller, &body.name).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": created.org.id, "name": created.org.name, "admin_key": created.admin_key})),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentBody {
    name: String,
    #[serde(default)]
    owner: Option<String>,
}

pub async fn create_agent(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiJson(body): ApiJson<AgentBody>,
) -> Result<(StatusCode, Json<Value>)> {
    let agent = state.gateway.create_agent(&caller, &body.name, body.owner.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(views::agent(&agent))))
}

pub async fn list_agents(State(state): State<AppState>, Auth(caller): Auth) -> Result<Json<Value>> {
    let agents = state.gateway.list_agents(&caller).await?;
    Ok(Json(views::list(agents.iter().map(views::agent).collect(), None)))
}

pub async fn get_agent(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>> {
    let id = AgentId::parse(&id).ok_or_else(|| Error::not_found("agent", &id))?;
    Ok(Json(views::agent(&state.gateway.get_agent(&caller, &id).await?)))
}

pub async fn delete_agent(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    let id = AgentId::parse(&id).ok_or_else(|| Error::not_found("agent", &id))?;
    state.gateway.disable_agent(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    name: String,
    role: String,
}

pub async fn create_user(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiJson(body): ApiJson<UserBody>,
) -> Result<(StatusCode, Json<Value>)> {
    let role = Role::parse(&body.role).ok_or_else(|| {
        Error::invalid("role", format!("unknown role `{}`: use admin, approver or viewer", body.role))
    })?;
    let user = state.gateway.create_user(&caller, &body.name, role).await?;
    Ok((StatusCode::CREATED, Json(views::user(&user))))
}

pub async fn list_users(State(state): State<AppState>, Auth(caller): Auth) -> Result<Json<Value>> {
    let users = state.gateway.list_users(&caller).await?;
    Ok(Json(views::list(users.iter().map(views::user).collect(), None)))
}

pub async fn get_user(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>> {
    let id = UserId::parse(&id).ok_or_else(|| Error::not_found("user", &id))?;
    Ok(Json(views::user(&state.gateway.get_user(&caller, &id).await?)))
}

pub async fn delete_user(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    let id = UserId::parse(&id).ok_or_else(|| Error::not_found("user", &id))?;
    state.gateway.disable_user(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

pub async fn create_key(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiJson(body): ApiJson<KeyBody>,
) -> Result<(StatusCode, Json<Value>)> {
    let owner = match (body.agent, body.user) {
        (Some(a), None) => KeyOwner::Agent(a),
        (None, Some(u)) => KeyOwner::User(u),
        _ => return Err(Error::bad_request("agent", "give exactly one of `agent` or `user` (name or id)")),
    };
    let created = state.gateway.create_key(&caller, owner, body.expires_at).await?;
    let mut v = views::key(&created.key);
    v["key"] = json!(created.plaintext);
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn list_keys(State(state): State<AppState>, Auth(caller): Auth) -> Result<Json<Value>> {
    let keys = state.gateway.list_keys(&caller).await?;
    Ok(Json(views::list(keys.iter().map(views::key).collect(), None)))
}

pub async fn delete_key(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    let id = KeyId::parse(&id).ok_or_else(|| Error::not_found("key", &id))?;
    state.gateway.revoke_key(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionBody {
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

pub async fn create_session(
    State(state): State<AppState>,
    Auth(caller): Auth,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<SessionBody>,
) -> Result<(StatusCode, Json<Value>)> {
    let scopes = match body.scopes {
        Some(list) => Some(
            list.iter()
                .map(|s| NameGlob::parse(s).map_err(|e| Error::invalid("scopes", e.to_string())))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let created = state
        .gateway
        .create_session(
            &caller,
            SessionRequest {
                agent: body.agent,
                ttl_seconds: body.ttl_seconds,
                scopes,
                minting_key_hash: super::auth::presented_secret_in(&headers)
                    .ok()
                    .filter(|s| SecretKind::of(s) == Some(SecretKind::ApiKey))
                    .map(secrets::hash_secret),
            },
        )
        .await?;
    let mut v = views::session(&created.session, Some(&created.agent.name));
    v["token"] = json!(created.token);
    v["mcp"] = json!({
        "url": format!("{}/mcp", state.gateway.public_url()),
        "headers": {"Authorization": format!("Bearer {}", created.token)},
    });
    Ok((StatusCode::CREATED, Json(v)))
}

pub async fn list_sessions(State(state): State<AppState>, Auth(caller): Auth) -> Result<Json<Value>> {
    let sessions = state.gateway.list_sessions(&caller).await?;
    Ok(Json(views::list(sessions.iter().map(|s| views::session(s, None)).collect(), None)))
}

pub async fn delete_session(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    let id = SessionId::parse(&id).ok_or_else(|| Error::not_found("session", &id))?;
    state.gateway.revoke_session(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn policy_view(active: &ActivePolicy) -> Value {
    let files: Vec<Value> =
        active.policy.sources().iter().map(|(name, text)| json!({"name": name, "source": text})).collect();
    let source =
        if active.policy.sources().len() == 1 { active.policy.sources().first().map(|(_, t)| t.clone()) } else { None };
    json!({
        "version": active.policy.version(),
        "origin": active.origin,
        "rules": active.policy.rule_count(),
        "source": source,
        "files": files,
    })
}

/// A policy body: raw YAML (`Content-Type: application/yaml` or text), or JSON `{source}` or
/// `{files: [{name, source}]}`.
fn policy_files(headers: &HeaderMap, body: &Bytes) -> Result<Vec<(String, String)>> {
    let content_type = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/json") {
        let text =
            std::str::from_utf8(body).map_err(|_| Error::bad_request("policy", "the policy is not UTF-8 text"))?;
        return Ok(vec![("policy.yaml".into(), text.to_owned())]);
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        name: String,
        source: String,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(default)]
        source: Option<String>,
        #[serde(default)]
        files: Option<Vec<File>>,
    }
    let parsed: Body =
        serde_json::from_slice(body).map_err(|e| Error::bad_request("source", format!("invalid request body: {e}")))?;
    match (parsed.source, parsed.files) {
        (Some(source), None) => Ok(vec![("policy.yaml".into(), source)]),
        (None, Some(files)) if !files.is_empty() => Ok(files.into_iter().map(|f| (f.name, f.source)).collect()),
        _ => Err(Error::bad_request("source", "give `source` (the YAML text) or a non-empty `files` list")),
    }
}

pub async fn get_policy(State(state): State<AppState>, Auth(caller): Auth) -> Result<Json<Value>> {
    Ok(Json(policy_view(&state.gateway.current_policy(&caller)?)))
}

pub async fn put_policy(
    State(state): State<AppState>,
    Auth(caller): Auth,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>> {
    let files = policy_files(&headers, &body)?;
    Ok(Json(policy_view(&state.gateway.put_policy(&caller, files).await?)))
}

pub async fn validate_policy(
    State(state): State<AppState>,
    Auth(caller): Auth,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>> {
    let files = policy_files(&headers, &body)?;
    let policy: Policy = state.gateway.validate_policy(&caller, &files)?;
    Ok(Json(json!({"valid": true, "version": policy.version(), "rules": policy.rule_count()})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateBody {
    agent: String,
    capability: String,
    #[serde(default)]
    params: Option<Value>,
}

pub async fn evaluate_policy(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiJson(body): ApiJson<EvaluateBody>,
) -> Result<Json<Value>> {
    let capability = Capability::parse(&body.capability).map_err(|e| Error::invalid("capability", e.to_string()))?;
    let params = body.params.unwrap_or_else(|| json!({}));
    if !params.is_object() {
        return Err(Error::bad_request("params", "must be a JSON object"));
    }
    let verdict = state.gateway.evaluate_policy(&caller, &body.agent, &capability, &params).await?;
    Ok(Json(json!({
        "effect": verdict.effect,
        "rule": verdict.rule,
        "axes": verdict.axes,
        "policy_version": verdict.policy_version,
        "explanation": verdict.explanation,
        "message": verdict.message,
        "approval": verdict.approval,
        "risk": verdict.risk,
        "snapshot": verdict.snapshot,
    })))
}
