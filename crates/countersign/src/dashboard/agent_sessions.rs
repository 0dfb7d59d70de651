//! The Sessions page: agent sessions (short-lived, scoped tokens) listed, minted with agent, scopes and TTL
//! (the token shown once, on the answer to the form), and revoked. Not the dashboard's own login sessions,
//! which are `session.rs`.
//!
//! Who may mint and revoke, the TTL bounds and how wide a scope may be are the gateway's rules
//! (`create_session`, `revoke_session`); this module parses the form and renders.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use countersign_core::capability::NameGlob;
use countersign_core::domain::Session;
use countersign_core::ids::SessionId;
use serde::Deserialize;

use super::DashboardState;
use super::approvals::Chrome;
use super::session::{CsrfField, Posted, UiUser};
use super::view::{self, render};
use crate::error::Error;
use crate::gateway::SessionRequest;

pub struct SessionRow {
    pub id: String,
    pub agent: String,
    pub scopes: String,
    pub created_by: String,
    pub created: String,
    pub expires: String,
    pub status: String,
}

/// A freshly minted session: the token is on this one page and nowhere else.
pub struct Minted {
    pub id: String,
    pub agent: String,
    pub token: String,
    pub expires: String,
    pub mcp_url: String,
}

/// What the mint form showed, kept when it is shown again with an error.
#[derive(Deserialize, Default)]
pub struct MintForm {
    #[serde(default)]
    agent: String,
    #[serde(default)]
    scopes: String,
    #[serde(default)]
    ttl_seconds: String,
}

#[derive(Template)]
#[template(path = "sessions.html")]
struct SessionsPage {
    chrome: Chrome,
    rows: Vec<SessionRow>,
    agents: Vec<String>,
    /// `Some(reason)` when this user may not list, mint or revoke.
    blocked: Option<String>,
    minted: Option<Minted>,
    form: MintForm,
    error: Option<String>,
}

async fn page(
    state: &DashboardState,
    ui: &UiUser,
    form: MintForm,
    minted: Option<Minted>,
    error: Option<String>,
) -> Result<SessionsPage, Error> {
    let agents = state.gateway.list_agents(&ui.caller).await?;
    let names: HashMap<String, String> = agents.iter().map(|a| (a.id.to_string(), a.name.clone())).collect();
    let (sessions, blocked) = match state.gateway.list_sessions(&ui.caller).await {
        Ok(sessions) => (sessions, None),
        Err(Error::Forbidden(reason)) => (Vec::new(), Some(reason)),
        Err(other) => return Err(other),
    };
    let now = state.gateway.now();
    let row = |s: &Session| SessionRow {
        id: s.id.to_string(),
        agent: names.get(s.agent_id.as_str()).cloned().unwrap_or_else(|| s.agent_id.to_string()),
        scopes: s.scopes.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(", "),
        created_by: s.created_by.clone(),
        created: view::clock(s.created_at),
        expires: view::clock(s.expires_at),
        status: if s.revoked_at.is_some() {
            "revoked".into()
        } else if s.expires_at <= now {
            "expired".into()
        } else {
            "active".into()
        },
    };
    let agents = agents.iter().filter(|a| a.disabled_at.is_none()).map(|a| a.name.clone()).collect();
    Ok(SessionsPage {
        chrome: Chrome::new(ui, "sessions"),
        rows: sessions.iter().map(row).collect(),
        agents,
        blocked,
        minted,
        form,
        error,
    })
}

pub async fn list(State(state): State<DashboardState>, ui: UiUser) -> Result<Response, Error> {
    let form = MintForm { scopes: "*".into(), ttl_seconds: "3600".into(), ..MintForm::default() };
    Ok(render(StatusCode::OK, &page(&state, &ui, form, None, None).await?))
}

fn request(form: &MintForm) -> Result<SessionRequest, Error> {
    let scopes = view::list_of(&form.scopes)
        .iter()
        .map(|s| NameGlob::parse(s).map_err(|e| Error::invalid("scopes", format!("scope `{s}`: {e}"))))
        .collect::<Result<Vec<_>, Error>>()?;
    let ttl = form.ttl_seconds.trim();
    let ttl_seconds = match ttl {
        "" => None,
        t => Some(t.parse::<u64>().map_err(|_| Error::invalid("ttl_seconds", "the TTL is a number of seconds"))?),
    };
    let agent = Some(form.agent.trim().to_owned()).filter(|a| !a.is_empty());
    Ok(SessionRequest { agent, ttl_seconds, scopes: (!scopes.is_empty()).then_some(scopes), minting_key_hash: None })
}

pub async fn mint(State(state): State<DashboardState>, posted: Posted<MintForm>) -> Result<Response, Error> {
    let Posted { ui, form } = posted;
    let created = match request(&form) {
        Ok(request) => {
            let request = SessionRequest { minting_key_hash: Some(ui.key_hash.clone()), ..request };
            state.gateway.create_session(&ui.caller, request).await
        }
        Err(e) => Err(e),
    };
    match created {
        Ok(created) => {
            let minted = Minted {
                id: created.session.id.to_string(),
                agent: created.agent.name.clone(),
                token: created.token,
                expires: view::clock(created.session.expires_at),
                mcp_url: format!("{}/mcp", state.gateway.public_url()),
            };
            let form = MintForm { scopes: "*".into(), ttl_seconds: "3600".into(), ..MintForm::default() };
            Ok(render(StatusCode::CREATED, &page(&state, &ui, form, Some(minted), None).await?))
        }
        Err(error) => {
            let (status, message) = view::shown(error)?;
            Ok(render(status, &page(&state, &ui, form, None, Some(message)).await?))
        }
    }
}

pub async fn revoke(
    State(state): State<DashboardState>,
    Path(id): Path<String>,
    posted: Posted<CsrfField>,
) -> Result<Response, Error> {
    let ui = posted.ui;
    let id = SessionId::parse(&id).ok_or_else(|| Error::not_found("session", &id))?;
    match state.gateway.revoke_session(&ui.caller, &id).await {
        Ok(()) => Ok(Redirect::to("/ui/sessions").into_response()),
        Err(error) => {
            let (status, message) = view::shown(error)?;
            Ok(render(status, &page(&state, &ui, MintForm::default(), None, Some(message)).await?))
        }
    }
}
