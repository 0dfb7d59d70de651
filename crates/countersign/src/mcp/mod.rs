//! `/mcp`: the Model Context Protocol over Streamable HTTP (rmcp), for agents and session tokens.
//!
//! Every HTTP request is authenticated before rmcp sees it (an axum middleware answers 401 problem+json for
//! a missing, unknown, expired or revoked credential, so a revoked session is cut off at its next request);
//! the [`Caller`] rides in the request's extensions, which rmcp hands to the tools as
//! [`http::request::Parts`](axum::http::request::Parts). The tools are thin adapters over the gateway,
//! which checks session scopes, evaluates the policy and audits as for any other front end.
//!
//! Resources `countersign://actions/{id}` can be read and subscribed; a subscription sends
//! `notifications/resources/updated` when the action changes.
//!
//! A session is its opener's: the middleware notes which principal (a session token counts as its agent)
//! was handed each `Mcp-Session-Id`, and answers 404 to any other that presents it ([`SessionOwners`]).

mod server;
mod upstream_tools;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use serde_json::json;

use crate::error::Error;
use crate::gateway::{Caller, Gateway};
use crate::http::auth::presented_secret_in;

/// The bearer secret the request was authenticated with, so a subscription can re-check it before it
/// speaks again (a revoked session stops receiving updates).
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) Arc<str>);

/// The `/mcp` service: authentication in front of rmcp's Streamable HTTP server.
pub fn router(gateway: Gateway, max_body_bytes: usize) -> Router {
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(allowed_hosts(gateway.public_url()))
        .with_cancellation_token(gateway.shutdown().child_token())
        .with_max_request_body_bytes(max_body_bytes);
    let for_sessions = gateway.clone();
    let sessions = Arc::new(LocalSessionManager::default());
    let service =
        StreamableHttpService::new(move || Ok(server::McpServer::new(for_sessions.clone())), sessions.clone(), config);
    let state = Front { gateway, max_body_bytes, owners: Arc::new(SessionOwners::default()), sessions };
    Router::new().fallback_service(service).layer(middleware::from_fn_with_state(state, authenticate))
}

#[derive(Clone)]
struct Front {
    gateway: Gateway,
    max_body_bytes: usize,
    owners: Arc<SessionOwners>,
    /// rmcp's sessions, to tell which remembered ones are still open.
    sessions: Arc<LocalSessionManager>,
}

/// Who opened each MCP session: rmcp finds a session by its `Mcp-Session-Id` alone, so without this any
/// valid credential holding another principal's session id could read that session's notifications, cancel
/// its subscriptions or end it. A session id this replica did not hand out, or handed to another principal,
/// is answered 404, as rmcp answers an unknown one.
#[derive(Default)]
struct SessionOwners(std::sync::Mutex<Owners>);

#[derive(Default)]
struct Owners {
    by_session: std::collections::HashMap<String, (String, std::time::Instant)>,
    /// When entries idle past [`OWNER_IDLE`] were last dropped.
    swept: Option<std::time::Instant>,
}

/// How long an MCP session unused by any request is remembered: twice rmcp's own idle limit (5 minutes),
/// after which it has ended the session anyway.
const OWNER_IDLE: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// How often idle entries are dropped (not at every session opened: that scans them all).
const OWNER_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);
/// MCP sessions one principal may hold open at once (each is a task of rmcp's, with its own streams).
const MAX_SESSIONS_PER_PRINCIPAL: usize = 64;

impl SessionOwners {
    /// Whether `principal` may use session `id`, noting the use.
    fn allows(&self, id: &str, principal: &str) -> bool {
        let Ok(mut owners) = self.0.lock() else { return false };
        match owners.by_session.get_mut(id) {
            Some((owner, seen)) if owner == principal => {
                *seen = std::time::Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Whether `principal` may open another session: fewer than [`MAX_SESSIONS_PER_PRINCIPAL`] of its sessions
    /// are still open (`open`: rmcp's, which ends a session idle for 5 minutes or whose worker stopped).
    fn may_open(&self, principal: &str, open: &std::collections::HashSet<String>) -> bool {
        let Ok(mut owners) = self.0.lock() else { return false };
        owners.sweep(open);
        let held = owners.by_session.iter().filter(|(id, (owner, _))| owner == principal && open.contains(*id));
        held.count() < MAX_SESSIONS_PER_PRINCIPAL
    }

    fn opened(&self, id: String, principal: String) {
        let Ok(mut owners) = self.0.lock() else { return };
        owners.by_session.insert(id, (principal, std::time::Instant::now()));
    }

    fn closed(&self, id: &str) {
        if let Ok(mut owners) = self.0.lock() {
            owners.by_session.remove(id);
        }
    }
}

impl Owners {
    /// Drops the entries of sessions rmcp no longer has `open` and nobody used for [`OWNER_IDLE`] (a session
    /// kept alive by what the server sends stays its opener's however long its client is quiet), at most once
    /// per [`OWNER_SWEEP`].
    fn sweep(&mut self, open: &std::collections::HashSet<String>) {
        let now = std::time::Instant::now();
        if self.swept.is_some_and(|at| now.duration_since(at) < OWNER_SWEEP) {
            return;
        }
        self.swept = Some(now);
        self.by_session.retain(|id, (_, seen)| open.contains(id) || now.duration_since(*seen) < OWNER_IDLE);
    }
}

/// The principal a caller acts as: a session token acts as its agent (users are refused before this).
fn principal_of(caller: &Caller) -> String {
    match caller {
        Caller::User(user) => format!("user:{}", user.id),
        Caller::Agent(agent) | Caller::Session { agent, .. } => format!("agent:{}", agent.id),
    }
}

const SESSION_HEADER: &str = "mcp-session-id";

/// Loopback names plus the host of the public URL, with and without its port.
fn allowed_hosts(public_url: &str) -> Vec<String> {
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into(), "[::1]".into()];
    let rest = public_url.split_once("://").map_or(public_url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if !authority.is_empty() {
        hosts.push(authority.to_owned());
        let host = if authority.starts_with('[') {
            authority.split_once(']').map(|(h, _)| format!("{h}]")).unwrap_or_else(|| authority.to_owned())
        } else {
            authority.split(':').next().unwrap_or(authority).to_owned()
        };
        hosts.push(host);
    }
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Checks the credential on every request and passes the [`Caller`] on; refusals are problem+json.
async fn authenticate(State(front): State<Front>, request: Request, next: Next) -> Response {
    let gateway = &front.gateway;
    let secret = match presented_secret_in(request.headers()) {
        Ok(secret) => Secret(Arc::from(secret)),
        Err(error) => return error.into_response(),
    };
    let caller = match caller_of(gateway, &secret).await {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    let principal = principal_of(&caller);
    let session = request.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(id) = &session
        && !front.owners.allows(id, &principal)
    {
        return Error::not_found("MCP session", id).into_response();
    }
    if session.is_none()
        && request.method() == Method::POST
        && !front.owners.may_open(&principal, &open_sessions(&front).await)
    {
        return Error::RateLimited {
            message: format!(
                "{MAX_SESSIONS_PER_PRINCIPAL} MCP sessions are open for this agent: end one (DELETE /mcp with its \
                 Mcp-Session-Id) or let one sit idle for 5 minutes"
            ),
            retry_after_seconds: 60,
        }
        .into_response();
    }
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(caller);
    parts.extensions.insert(secret);
    let closing = parts.method == Method::DELETE;
    let response = if parts.method != Method::POST {
        next.run(Request::from_parts(parts, body)).await
    } else {
        post(&front, parts, body, next).await
    };
    match session {
        // A session handed out now is its opener's.
        None => {
            if let Some(id) = response.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
                front.owners.opened(id.to_owned(), principal);
            }
        }
        Some(id) if closing && response.status().is_success() => front.owners.closed(&id),
        Some(_) => {}
    }
    response
}

/// A POST, read under the body limit so a refusal by rmcp (which answers plain text) can become a JSON-RPC
/// error.
async fn post(front: &Front, parts: axum::http::request::Parts, body: Body, next: Next) -> Response {
    // Read under the byte limit; only the limit is answered 413, a body that broke off is a 400.
    let mut limited = Request::from_parts(parts.clone(), body);
    DefaultBodyLimit::max(front.max_body_bytes).apply(&mut limited);
    let bytes = match Bytes::from_request(limited, &()).await {
        Ok(bytes) => bytes,
        Err(rejection) if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            return Error::PayloadTooLarge(format!("the body is over the {} byte limit", front.max_body_bytes))
                .into_response();
        }
        Err(rejection) => {
            return Error::bad_request(
                "body",
                format!("the request body could not be read: {}", rejection.body_text()),
            )
            .into_response();
        }
    };
    let is_json = serde_json::from_slice::<serde_json::Value>(&bytes).is_ok();
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    if response.status().is_client_error() && !is_json_response(&response) {
        return json_rpc_error(response, is_json).await;
    }
    response
}

fn is_json_response(response: &Response) -> bool {
    response.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/json") || v.starts_with(b"application/problem+json")
    })
}

/// rmcp's plain-text refusal of a POST as a JSON-RPC error object, keeping its status.
async fn json_rpc_error(response: Response, body_was_json: bool) -> Response {
    let status = response.status();
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024).await.unwrap_or_default();
    let (code, title) = if body_was_json { (-32600, "Invalid Request") } else { (-32700, "Parse error") };
    let message = format!("{title}: {}", String::from_utf8_lossy(&text).trim());
    let body = json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// The ids of the sessions rmcp has open.
async fn open_sessions(front: &Front) -> std::collections::HashSet<String> {
    front.sessions.sessions.read().await.keys().map(|id| id.to_string()).collect()
}

/// The agent or session behind a secret. `/mcp` is for agents (design §5): a user key is refused, so a user
/// cannot read the upstream tools' catalogue or a second path to actions and jobs that nobody expects.
async fn caller_of(gateway: &Gateway, secret: &Secret) -> crate::error::Result<Caller> {
    let caller = gateway.authenticate(&secret.0).await?;
    if caller.agent().is_none() {
        return Err(crate::error::Error::Forbidden(
            "/mcp is for agents: use an agent key or a session token (POST /v1/sessions mints one)".into(),
        ));
    }
    gateway.check_rate(&caller)?;
    Ok(caller)
}

#[cfg(test)]
mod tests {
    use super::allowed_hosts;

    #[test]
    fn public_host_is_allowed_with_and_without_port() {
        let hosts = allowed_hosts("https://gw.example.com:8443/base");
        assert!(hosts.contains(&"gw.example.com".to_owned()));
        assert!(hosts.contains(&"gw.example.com:8443".to_owned()));
        assert!(hosts.contains(&"localhost".to_owned()));
        let hosts = allowed_hosts("http://[::1]:9000");
        assert!(hosts.contains(&"[::1]".to_owned()));
    }
}
