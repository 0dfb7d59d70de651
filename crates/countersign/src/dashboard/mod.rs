//! The dashboard at `/ui/`: server-rendered pages (askama templates compiled into the binary) over the
//! gateway, for the people who approve and audit. A thin adapter like the REST handlers: it parses forms,
//! calls `Gateway` methods and renders what they answer; every rule (who may decide, quorum, expiry) stays
//! in `gateway/`.
//!
//! Login takes a user key once; the store keeps, behind a random cookie token, only SHA-256 hashes of the
//! token and the key ([`session`]), so every replica accepts the cookie; every state-changing form carries
//! the session's CSRF token (an HMAC of the cookie token). The pending queue is live: an
//! SSE stream fed by the audit notifier tells a small embedded script when to re-fetch the list. No Node, no
//! build step, no asset outside the binary.
//!
//! Beside the approver's and auditor's pages are the operator's: Jobs, agent Sessions, Webhooks and Policy.
//! Each form that needs the admin role is shown disabled, with the gateway's reason, to other users.

mod agent_sessions;
mod approvals;
mod jobs;
mod live;
mod pages;
mod policy;
mod session;
mod view;
mod webhooks;

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};

use crate::gateway::Gateway;

/// What every dashboard handler shares.
#[derive(Clone)]
pub struct DashboardState {
    gateway: Gateway,
    /// Cookies get `Secure` when the public URL is https.
    secure_cookies: bool,
    /// The audit page's last chain verification per org, reused for a while: verifying reads every event
    /// since the last checkpoint, which no page view should cost each time.
    chain_checks: pages::ChainChecks,
}

/// The dashboard's routes, all under `/ui/`, with their own state; merged into the API router.
pub fn router<S: Clone + Send + Sync + 'static>(gateway: Gateway) -> Router<S> {
    let secure_cookies = gateway.public_url().starts_with("https://");
    let state = DashboardState { gateway, secure_cookies, chain_checks: pages::ChainChecks::default() };
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/pending") }))
        .route("/ui/login", get(session::login_page).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/pending", get(approvals::pending))
        .route("/ui/pending/list", get(approvals::pending_list))
        .route("/ui/approvals/{id}", get(approvals::detail))
        .route("/ui/approvals/{id}/decide", post(approvals::decide))
        .route("/ui/history", get(approvals::history))
        .route("/ui/audit", get(pages::audit))
        .route("/ui/audit/rows", get(pages::audit_rows))
        .route("/ui/jobs", get(jobs::list))
        .route("/ui/jobs/{id}", get(jobs::detail))
        .route("/ui/jobs/{id}/cancel", post(jobs::cancel))
        .route("/ui/sessions", get(agent_sessions::list).post(agent_sessions::mint))
        .route("/ui/sessions/{id}/revoke", post(agent_sessions::revoke))
        .route("/ui/webhooks", get(webhooks::list).post(webhooks::create))
        .route("/ui/webhooks/{id}", get(webhooks::deliveries))
        .route("/ui/webhooks/{id}/delete", post(webhooks::delete))
        .route("/ui/policy", get(policy::show))
        .route("/ui/policy/validate", post(policy::validate))
        .route("/ui/policy/evaluate", post(policy::evaluate))
        .route("/ui/events", get(live::events))
        .route("/ui/assets/dashboard.css", get(stylesheet))
        .route("/ui/assets/dashboard.js", get(script))
        .with_state(state)
}

async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")],
        include_str!("assets/dashboard.css"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")],
        include_str!("assets/dashboard.js"),
    )
}
