//! Handlers for the audit log: query with filters and cursor, live SSE stream resumable with
//! `Last-Event-ID`, chain verification, and JSON Lines export.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use countersign_core::store::AuditFilter;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::auth::Auth;
use super::problem::ApiQuery;
use super::{AppState, views};
use crate::error::{Error, Result};
use crate::gateway::audit_filter;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    action: Option<String>,
    actor: Option<String>,
    subject: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

fn filter_from(query: &AuditQuery) -> Result<AuditFilter> {
    audit_filter(
        query.action.as_deref(),
        query.actor.as_deref(),
        query.subject.as_deref(),
        query.since.as_deref(),
        query.until.as_deref(),
    )
}

fn parse_cursor(cursor: Option<&str>) -> Result<i64> {
    match cursor {
        None => Ok(0),
        Some(c) => c
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| Error::bad_request("cursor", "not a cursor this API returned")),
    }
}

pub async fn query(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<Value>> {
    let filter = filter_from(&query)?;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(Error::bad_request("limit", "must be between 1 and 1000"));
    }
    let after = parse_cursor(query.cursor.as_deref())?;
    let events = state.gateway.query_audit(&caller, &filter, after, limit).await?;
    let next = (events.len() == limit as usize).then(|| events.last().map(|e| e.seq.to_string())).flatten();
    Ok(Json(json!({"events": events.iter().map(views::audit_event).collect::<Vec<_>>(), "next_cursor": next})))
}

pub async fn verify(State(state): State<AppState>, Auth(caller): Auth) -> Result<Json<Value>> {
    let report = state.gateway.verify_audit(&caller).await?;
    Ok(Json(json!(report)))
}

/// How often an idle audit stream checks that its credential still holds.
const CREDENTIAL_RECHECK: Duration = Duration::from_secs(5);

/// Server-Sent Events: first the events after `Last-Event-ID` (or `?cursor=`), then new ones live. The
/// credential is checked again before every read, after it (from the store, before its events go out) and
/// every few seconds; the stream ends once it fails.
pub async fn stream(
    State(state): State<AppState>,
    Auth(caller): Auth,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Response> {
    caller.require_user()?;
    // Kept to ask again before every read and every so often: a stream must end once its key is revoked or
    // its user disabled, not serve the org's events for as long as the client stays connected.
    let secret = super::auth::presented_secret_in(&headers)?.to_owned();
    let filter = filter_from(&query)?;
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned).or(query.cursor.clone());
    let mut last_seq = parse_cursor(resume.as_deref())?;
    let org = caller.org_id().clone();
    // One of the caller's open waits for as long as the stream lasts.
    let slot = state.gateway.open_wait(&caller)?;
    // Subscribe before reading the backlog so nothing appended in between is lost.
    let mut live = state.gateway.notifier().subscribe_audit();
    let (tx, rx) = mpsc::channel(256);
    let gateway = state.gateway.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let to_event = |e: &countersign_core::audit::AuditEvent| {
            Event::default().id(e.seq.to_string()).event("audit").json_data(views::audit_event(e)).ok()
        };
        let still_allowed = |gateway: crate::gateway::Gateway, secret: String| async move {
            gateway.authenticate(&secret).await.ok().filter(|caller| caller.require_user().is_ok())
        };
        // Asked again after each read and before its events go out, from the store: a read that saw the
        // credential's revocation (or anything committed after it) must not be served.
        let allowed_after_read = |gateway: crate::gateway::Gateway, secret: String| async move {
            gateway.authenticate_uncached(&secret).await.is_ok_and(|caller| caller.require_user().is_ok())
        };
        loop {
            let Some(caller) = still_allowed(gateway.clone(), secret.clone()).await else { return };
            let page = match gateway.query_audit(&caller, &filter, last_seq, 500).await {
                Ok(page) => page,
                Err(_) => return,
            };
            let Some(last) = page.last() else { break };
            if !allowed_after_read(gateway.clone(), secret.clone()).await {
                return;
            }
            last_seq = last.seq;
            for e in &page {
                if let Some(event) = to_event(e)
                    && tx.send(Ok(event)).await.is_err()
                {
                    return;
                }
            }
        }
        let shutdown = gateway.shutdown().clone();
        let mut recheck = tokio::time::interval(CREDENTIAL_RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                // The client went away: nothing would ever be sent to notice it by.
                () = tx.closed() => return,
                _ = recheck.tick() => {
                    if still_allowed(gateway.clone(), secret.clone()).await.is_none() {
                        return;
                    }
                    continue;
                }
                next = live.recv() => next,
            };
            match next {
                Ok(e) if e.concerns(&org, last_seq) => {
                    let Some(caller) = still_allowed(gateway.clone(), secret.clone()).await else { return };
                    // Live events are filtered the same way as the backlog by re-reading through the query.
                    match gateway.query_audit(&caller, &filter, last_seq, 500).await {
                        Ok(page) => {
                            // Nothing after `last_seq` up to the append announced matches the filter: look after
                            // it next time, so a filter matching nothing does not re-read the log at every event.
                            if page.is_empty() && e.org_id.is_some() {
                                last_seq = last_seq.max(e.seq);
                            }
                            if !page.is_empty() && !allowed_after_read(gateway.clone(), secret.clone()).await {
                                return;
                            }
                            for e in &page {
                                last_seq = last_seq.max(e.seq);
                                if let Some(event) = to_event(e)
                                    && tx.send(Ok(event)).await.is_err()
                                {
                                    return;
                                }
                            }
                        }
                        Err(_) => return,
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            }
        }
    });
    let stream: ReceiverStream<std::result::Result<Event, Infallible>> = ReceiverStream::new(rx);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}
