//! The Webhooks pages: subscriptions listed, created with URL, events and format (the signing secret shown
//! once, on the answer to the form) and deleted; and one webhook's deliveries with status, latency and
//! error, in cursor pages.
//!
//! What a valid subscription is and who may manage one are the gateway's rules (`create_webhook`,
//! `delete_webhook`, all admin-only); this module parses the form and renders.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use countersign_core::domain::Webhook;
use countersign_core::ids::WebhookId;
use serde::Deserialize;

use super::DashboardState;
use super::approvals::Chrome;
use super::session::{CsrfField, Posted, UiUser};
use super::view::{self, render};
use crate::error::Error;
use crate::gateway::{WEBHOOK_EVENTS, WebhookRequest};

const DELIVERIES_LIMIT: u32 = 50;

pub struct WebhookRow {
    pub id: String,
    pub url: String,
    pub events: String,
    pub format: String,
    pub description: String,
    pub created: String,
    pub deleted: String,
}

impl WebhookRow {
    fn new(w: &Webhook) -> WebhookRow {
        WebhookRow {
            id: w.id.to_string(),
            url: w.url.clone(),
            events: w.events.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(", "),
            format: w.format.as_str().to_owned(),
            description: w.description.clone().unwrap_or_default(),
            created: view::clock(w.created_at),
            deleted: view::opt_clock(w.deleted_at),
        }
    }
}

/// A freshly created webhook: its secret is on this one page and nowhere else.
pub struct Created {
    pub id: String,
    pub secret: String,
}

#[derive(Deserialize, Default)]
pub struct CreateForm {
    #[serde(default)]
    url: String,
    #[serde(default)]
    events: String,
    #[serde(default)]
    format: String,
    #[serde(default)]
    description: String,
}

#[derive(Template)]
#[template(path = "webhooks.html")]
struct WebhooksPage {
    chrome: Chrome,
    rows: Vec<WebhookRow>,
    known_events: String,
    blocked: Option<String>,
    created: Option<Created>,
    form: CreateForm,
    error: Option<String>,
}

fn fresh_form() -> CreateForm {
    CreateForm { events: "approval.*".into(), format: "json".into(), ..CreateForm::default() }
}

async fn page(
    state: &DashboardState,
    ui: &UiUser,
    form: CreateForm,
    created: Option<Created>,
    error: Option<String>,
) -> Result<WebhooksPage, Error> {
    let (hooks, blocked) = match state.gateway.list_webhooks(&ui.caller).await {
        Ok(hooks) => (hooks, None),
        Err(Error::Forbidden(reason)) => (Vec::new(), Some(reason)),
        Err(other) => return Err(other),
    };
    Ok(WebhooksPage {
        chrome: Chrome::new(ui, "webhooks"),
        rows: hooks.iter().filter(|w| w.deleted_at.is_none()).map(WebhookRow::new).collect(),
        known_events: WEBHOOK_EVENTS.join(", "),
        blocked,
        created,
        form,
        error,
    })
}

pub async fn list(State(state): State<DashboardState>, ui: UiUser) -> Result<Response, Error> {
    Ok(render(StatusCode::OK, &page(&state, &ui, fresh_form(), None, None).await?))
}

pub async fn create(State(state): State<DashboardState>, posted: Posted<CreateForm>) -> Result<Response, Error> {
    let Posted { ui, form } = posted;
    let request = WebhookRequest {
        url: form.url.trim().to_owned(),
        events: view::list_of(&form.events),
        format: Some(form.format.trim().to_owned()).filter(|f| !f.is_empty()),
        description: Some(form.description.trim().to_owned()).filter(|d| !d.is_empty()),
    };
    match state.gateway.create_webhook(&ui.caller, request).await {
        Ok(created) => {
            let created = Created { id: created.webhook.id.to_string(), secret: created.secret };
            Ok(render(StatusCode::CREATED, &page(&state, &ui, fresh_form(), Some(created), None).await?))
        }
        Err(error) => {
            let (status, message) = view::shown(error)?;
            Ok(render(status, &page(&state, &ui, form, None, Some(message)).await?))
        }
    }
}

fn parse_id(id: &str) -> Result<WebhookId, Error> {
    WebhookId::parse(id).ok_or_else(|| Error::not_found("webhook", id))
}

pub async fn delete(
    State(state): State<DashboardState>,
    Path(id): Path<String>,
    posted: Posted<CsrfField>,
) -> Result<Response, Error> {
    let ui = posted.ui;
    match state.gateway.delete_webhook(&ui.caller, &parse_id(&id)?).await {
        Ok(()) => Ok(Redirect::to("/ui/webhooks").into_response()),
        Err(error) => {
            let (status, message) = view::shown(error)?;
            Ok(render(status, &page(&state, &ui, fresh_form(), None, Some(message)).await?))
        }
    }
}

pub struct DeliveryRow {
    pub time: String,
    pub event_type: String,
    pub event_id: String,
    pub attempt: u32,
    pub status: String,
    pub ok: bool,
    pub latency: String,
    pub error: String,
    pub job: String,
}

#[derive(Template)]
#[template(path = "webhook.html")]
struct WebhookPage {
    chrome: Chrome,
    hook: WebhookRow,
    rows: Vec<DeliveryRow>,
    next: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct PageQuery {
    #[serde(default)]
    cursor: Option<String>,
}

pub async fn deliveries(
    State(state): State<DashboardState>,
    ui: UiUser,
    Path(id): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<Response, Error> {
    let id = parse_id(&id)?;
    let hook = state.gateway.get_webhook(&ui.caller, &id).await?;
    let page = crate::http::page_from(Some(DELIVERIES_LIMIT), query.cursor.filter(|c| !c.is_empty()))?;
    let list = state.gateway.list_deliveries(&ui.caller, &id, &page).await?;
    let next = crate::http::next_cursor(&page, list.last().map(|d| d.id.to_string()), list.len(), false);
    let rows = list
        .iter()
        .map(|d| DeliveryRow {
            time: view::clock(d.created_at),
            event_type: d.event_type.clone(),
            event_id: d.event_id.clone(),
            attempt: d.attempt,
            status: d.status.map(|s| s.to_string()).unwrap_or_else(|| "no answer".into()),
            ok: d.status.is_some_and(|s| (200..300).contains(&s)),
            latency: format!("{} ms", d.latency_ms),
            error: d.error.clone().unwrap_or_default(),
            job: d.job_id.to_string(),
        })
        .collect();
    let page = WebhookPage { chrome: Chrome::new(&ui, "webhooks"), hook: WebhookRow::new(&hook), rows, next };
    Ok(render(StatusCode::OK, &page))
}
