//! Handlers for jobs, webhooks and their deliveries, and the audit export, checkpoint and retention
//! endpoints that run as jobs.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use countersign_core::ids::{JobId, WebhookId};
use countersign_core::state::JobState;
use serde::Deserialize;
use serde_json::{Value, json};

use super::actions::wait_duration;
use super::auth::{Auth, AuthThatWaits};
use super::problem::{ApiJson, ApiPath, ApiQuery};
use super::{AppState, next_cursor, page_from, views};
use crate::error::{Error, Result};
use crate::gateway::{WebhookRequest, job_filter};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobQuery {
    kind: Option<String>,
    state: Option<String>,
    subject: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutQuery {
    timeout: Option<f64>,
}

fn parse_job_id(id: &str) -> Result<JobId> {
    JobId::parse(id).ok_or_else(|| Error::not_found("job", id))
}

fn parse_webhook_id(id: &str) -> Result<WebhookId> {
    WebhookId::parse(id).ok_or_else(|| Error::not_found("webhook", id))
}

pub async fn list(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiQuery(query): ApiQuery<JobQuery>,
) -> Result<Json<Value>> {
    let page = page_from(query.limit, query.cursor)?;
    let filter = job_filter(query.kind.as_deref(), query.state.as_deref(), query.subject)?;
    let (jobs, next) = state.gateway.list_jobs(&caller, &filter, &page).await?;
    Ok(Json(views::list(jobs.iter().map(views::job).collect(), next)))
}

pub async fn get(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>> {
    let job = state.gateway.get_job(&caller, &parse_job_id(&id)?).await?;
    Ok(Json(views::job(&job)))
}

pub async fn wait(
    State(state): State<AppState>,
    AuthThatWaits(caller, secret): AuthThatWaits,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<TimeoutQuery>,
) -> Result<Json<Value>> {
    let timeout = wait_duration(query.timeout)?.unwrap_or(Duration::from_secs(30));
    let job = state.gateway.wait_job(&caller, &parse_job_id(&id)?, timeout).await?;
    state.gateway.still_stands(&secret).await?;
    Ok(Json(views::job(&job)))
}

pub async fn cancel(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>> {
    let job = state.gateway.cancel_job(&caller, &parse_job_id(&id)?).await?;
    Ok(Json(views::job(&job)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookBody {
    url: String,
    events: Vec<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

pub async fn create_webhook(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiJson(body): ApiJson<WebhookBody>,
) -> Result<(StatusCode, Json<Value>)> {
    let request =
        WebhookRequest { url: body.url, events: body.events, format: body.format, description: body.description };
    let created = state.gateway.create_webhook(&caller, request).await?;
    Ok((StatusCode::CREATED, Json(views::webhook(&created.webhook, Some(&created.secret)))))
}

pub async fn list_webhooks(State(state): State<AppState>, Auth(caller): Auth) -> Result<Json<Value>> {
    let hooks = state.gateway.list_webhooks(&caller).await?;
    Ok(Json(views::list(hooks.iter().map(|w| views::webhook(w, None)).collect(), None)))
}

pub async fn get_webhook(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>> {
    let hook = state.gateway.get_webhook(&caller, &parse_webhook_id(&id)?).await?;
    Ok(Json(views::webhook(&hook, None)))
}

pub async fn delete_webhook(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    state.gateway.delete_webhook(&caller, &parse_webhook_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<u32>,
    cursor: Option<String>,
}

pub async fn deliveries(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> Result<Json<Value>> {
    let page = page_from(query.limit, query.cursor)?;
    let list = state.gateway.list_deliveries(&caller, &parse_webhook_id(&id)?, &page).await?;
    let next = next_cursor(&page, list.last().map(|d| d.id.to_string()), list.len(), false);
    Ok(Json(views::list(list.iter().map(views::delivery).collect(), next)))
}

/// `POST /v1/audit/exports`: queues an export; 202 with the job.
pub async fn start_export(State(state): State<AppState>, Auth(caller): Auth) -> Result<(StatusCode, Json<Value>)> {
    let job = state.gateway.start_audit_export(&caller).await?;
    Ok((StatusCode::ACCEPTED, Json(views::job(&job))))
}

/// `GET /v1/audit/exports/{job}`: the finished file.
pub async fn download_export(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Response> {
    let path = state.gateway.export_file(&caller, &parse_job_id(&id)?).await?;
    file_response(&path).await
}

/// `GET /v1/audit/export`: the same export, waited for and streamed in one call.
pub async fn export_now(
    State(state): State<AppState>,
    AuthThatWaits(caller, secret): AuthThatWaits,
) -> Result<Response> {
    // Taken before the export starts: past the caller's open waits nothing is exported for nobody.
    let slot = state.gateway.open_wait(&caller)?;
    let job = state.gateway.start_audit_export(&caller).await?;
    let job = state.gateway.wait_job_holding(&slot, &caller, &job.id, Duration::from_secs(300)).await?;
    state.gateway.still_stands(&secret).await?;
    match job.state {
        JobState::Succeeded => file_response(&state.gateway.export_file(&caller, &job.id).await?).await,
        JobState::Failed | JobState::Cancelled => Err(Error::Internal(format!(
            "export job {} {}: {}",
            job.id,
            job.state.as_str(),
            job.error.unwrap_or_default()
        ))),
        _ => Err(Error::Unavailable(format!("export job {} is still {}; fetch it later", job.id, job.state.as_str()))),
    }
}

async fn file_response(path: &std::path::Path) -> Result<Response> {
    let file =
        tokio::fs::File::open(path).await.map_err(|e| Error::Internal(format!("cannot open the export: {e}")))?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], body).into_response())
}

pub async fn public_key(State(state): State<AppState>) -> Json<Value> {
    let (public_key, key_id) = state.gateway.audit_public_key();
    Json(json!({"algorithm": "ed25519", "public_key": public_key, "key_id": key_id}))
}

pub async fn checkpoint(State(state): State<AppState>, Auth(caller): Auth) -> Result<(StatusCode, Json<Value>)> {
    let checkpoint = state.gateway.checkpoint_now(&caller).await?;
    Ok((StatusCode::CREATED, Json(json!({"checkpoint": checkpoint}))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionBody {
    days: Option<u32>,
}

pub async fn set_retention(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiJson(body): ApiJson<RetentionBody>,
) -> Result<Json<Value>> {
    let job = state.gateway.set_audit_retention(&caller, body.days).await?;
    Ok(Json(json!({"days": body.days, "job": job.as_ref().map(views::job)})))
}

pub async fn get_retention(State(state): State<AppState>, Auth(caller): Auth) -> Result<Json<Value>> {
    let retention = state.gateway.audit_retention(&caller).await?;
    Ok(Json(json!({"days": retention.days, "deleted_upto_seq": retention.deleted_upto})))
}
