//! The v1 HTTP API: the axum router, its middleware (body limit, metrics, request spans, panic guard) and
//! the operational endpoints. Handlers are thin: parse into domain types, call the gateway, map the result.

mod actions;
mod admin;
mod approvals;
mod audit;
pub mod auth;
mod jobs;
pub mod problem;
pub mod views;

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use countersign_core::store::Page;
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::gateway::Gateway;

#[derive(Clone)]
pub struct AppState {
    pub gateway: Gateway,
    pub max_body_bytes: usize,
    /// The LLM proxy's own, larger body limit.
    pub llm_max_body_bytes: usize,
}

/// Page parameters: `limit` 1..=1000 (default 100) and the opaque cursor from a previous answer.
pub fn page_from(limit: Option<u32>, cursor: Option<String>) -> Result<Page> {
    let limit = limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(Error::bad_request("limit", "must be between 1 and 1000"));
    }
    if let Some(c) = &cursor
        && (c.is_empty() || c.len() > 64 || !c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_'))
    {
        return Err(Error::bad_request("cursor", "not a cursor this API returned"));
    }
    Ok(Page { limit, after: cursor })
}

/// A full page, or one the store cut short at its byte budget (`cut`), may have a successor; its cursor is the
/// last item's id.
pub fn next_cursor(page: &Page, last: Option<String>, count: usize, cut: bool) -> Option<String> {
    if cut || count == page.limit as usize { last } else { None }
}

pub fn router(gateway: Gateway, max_body_bytes: usize, llm_max_body_bytes: usize) -> Router {
    let state = AppState { gateway, max_body_bytes, llm_max_body_bytes };
    Router::new()
        .route("/v1/actions", post(actions::submit).get(actions::list))
        .route("/v1/actions/{id}", get(actions::get))
        .route("/v1/actions/{id}/wait", get(actions::wait))
        .route("/v1/actions/{id}/cancel", post(actions::cancel))
        .route("/v1/actions/{id}/trace", get(actions::trace))
        .route("/v1/approvals", get(approvals::list))
        .route("/v1/approvals/{id}", get(approvals::get))
        .route("/v1/approvals/{id}/approve", post(approvals::approve))
        .route("/v1/approvals/{id}/deny", post(approvals::deny))
        .route("/v1/approval-status/{token}", get(actions::approval_status))
        .route("/v1/approval-status/{token}/result", get(actions::approval_result))
        .route("/v1/audit", get(audit::query))
        .route("/v1/audit/stream", get(audit::stream))
        .route("/v1/audit/verify", get(audit::verify))
        .route("/v1/audit/export", get(jobs::export_now))
        .route("/v1/audit/exports", post(jobs::start_export))
        .route("/v1/audit/exports/{id}", get(jobs::download_export))
        .route("/v1/audit/public-key", get(jobs::public_key))
        .route("/v1/audit/checkpoints", post(jobs::checkpoint))
        .route("/v1/audit/retention", get(jobs::get_retention).put(jobs::set_retention))
        .route("/v1/jobs", get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/wait", get(jobs::wait))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/webhooks", post(jobs::create_webhook).get(jobs::list_webhooks))
        .route("/v1/webhooks/{id}", get(jobs::get_webhook).delete(jobs::delete_webhook))
        .route("/v1/webhooks/{id}/deliveries", get(jobs::deliveries))
        .route("/v1/sessions", post(admin::create_session).get(admin::list_sessions))
        .route("/v1/sessions/{id}", axum::routing::delete(admin::delete_session))
        .route("/v1/policy", get(admin::get_policy).put(admin::put_policy))
        .route("/v1/policy/validate", post(admin::validate_policy))
        .route("/v1/policy/evaluate", post(admin::evaluate_policy))
        .route("/v1/agents", post(admin::create_agent).get(admin::list_agents))
        .route("/v1/agents/{id}", get(admin::get_agent).delete(admin::delete_agent))
        .route("/v1/users", post(admin::create_user).get(admin::list_users))
        .route("/v1/users/{id}", get(admin::get_user).delete(admin::delete_user))
        .route("/v1/keys", post(admin::create_key).get(admin::list_keys))
        .route("/v1/keys/{id}", axum::routing::delete(admin::delete_key))
        .route("/v1/orgs", post(admin::create_org))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .nest_service("/mcp", crate::mcp::router(state.gateway.clone(), max_body_bytes))
        .merge(crate::proxy::router())
        .merge(crate::dashboard::router(state.gateway.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(CatchPanicLayer::custom(|_| Error::Internal("a request handler panicked".into()).into_response()))
        .with_state(state)
}

/// Records latency by route template and opens the request span.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // hyper takes any token as a method, before authentication: only the standard ones name a series, or
    // anyone could grow the metrics without bound.
    let method = match *request.method() {
        Method::GET | Method::POST | Method::PUT | Method::PATCH | Method::DELETE | Method::HEAD | Method::OPTIONS => {
            request.method().as_str().to_owned()
        }
        _ => "OTHER".to_owned(),
    };
    let route =
        request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    // The log keeps the method as sent (a log line is not a series that lives on).
    let span = tracing::info_span!("request", method = %request.method(), %route);
    let mut response = next.run(request).instrument(span.clone()).await;
    // A plain-text 413 from an extractor of axum's own (the dashboard's forms) becomes problem+json. The LLM proxy
    // shapes its own errors as the provider does, and relays a provider's 413 as it came.
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_problem(&response) && !route.starts_with("/llm/") {
        response =
            Error::PayloadTooLarge(format!("the body is over the {} byte limit", state.max_body_bytes)).into_response();
    }
    // No browser may guess another type than the one sent (a JSON body read as HTML, say); the dashboard's pages
    // set their own headers, this one included.
    response
        .headers_mut()
        .entry(axum::http::header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(axum::http::HeaderValue::from_static("nosniff"));
    let status = response.status().as_u16();
    state.gateway.metrics().observe_request(&method, &route, status, started.elapsed());
    tracing::debug!(parent: &span, status, elapsed_ms = started.elapsed().as_secs_f64() * 1000.0, "request done");
    response
}

fn is_problem(response: &Response) -> bool {
    response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"))
}

async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/llm/") {
        return crate::proxy::no_endpoint(uri.path());
    }
    Error::NotFound("no such endpoint; see /v1/openapi.json".into()).into_response()
}

async fn method_not_allowed() -> Response {
    let (_, mut body) =
        Error::BadRequest { field: None, message: "method not allowed on this endpoint".into() }.problem();
    body["status"] = json!(405);
    body["title"] = json!("Method not allowed");
    body["code"] = json!("method_not_allowed");
    body["type"] = json!("https://countersign.dev/problems/method_not_allowed");
    problem::problem_response(StatusCode::METHOD_NOT_ALLOWED, body)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// How long a replica may not hear the others before `/readyz` says so.
const DEAF_BEFORE_UNREADY: std::time::Duration = std::time::Duration::from_secs(5);

async fn readyz(State(state): State<AppState>) -> Result<Response> {
    // A store that cannot answer within two seconds is not ready, whatever its pool would wait for.
    tokio::time::timeout(std::time::Duration::from_secs(2), state.gateway.store().ping())
        .await
        .map_err(|_| Error::Unavailable("the store did not answer within 2 s".into()))?
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    // A replica that cannot hear the others would decide by a policy another replica replaced, and wake its
    // waiters late: a load balancer should send requests elsewhere until it hears them again. Said in full
    // (a store error's detail is not), since it names nothing but this replica's state.
    // A moment's reconnect is not worth taking every replica out of rotation at once.
    if let Some(deaf) = state.gateway.replica_feed_deaf_for().filter(|deaf| *deaf >= DEAF_BEFORE_UNREADY) {
        let detail = format!(
            "this replica has not heard the other replicas' changes for {} s (its LISTEN connection to PostgreSQL \
             is lost and not back yet): policy changes and decisions made elsewhere reach it late",
            deaf.as_secs()
        );
        tracing::warn!("{detail}");
        let (status, mut body) = Error::Unavailable(detail.clone()).problem();
        body["detail"] = json!(detail);
        return Ok(problem::problem_response(status, body));
    }
    Ok(axum::Json(json!({"status": "ready", "store": state.gateway.store().backend()})).into_response())
}

async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse> {
    if state.gateway.metrics().store_gauges_due() {
        let pending = state.gateway.pending_approvals_count().await?;
        state.gateway.metrics().set_pending_approvals(pending);
        let open = state.gateway.open_jobs().await?;
        state.gateway.metrics().set_open_jobs(&open);
    }
    state.gateway.metrics().set_replica_feed_deaf(state.gateway.replica_feed_deaf_for());
    let text = state.gateway.metrics().encode().map_err(|e| Error::Internal(e.to_string()))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text))
}

/// The OpenAPI 3.1 description of this API, written by hand; a test keeps its paths equal to the router's.
async fn openapi() -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], include_str!("openapi.json"))
}
