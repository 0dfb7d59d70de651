//! The dashboard's live channel: one SSE stream per open page, fed by the gateway's audit notifier.
//!
//! It sends `approvals` when an approval was requested, decided, expired or its action cancelled (the page
//! then re-fetches the queue fragment), and `audit` with the newest seq whenever the org's log grew (the
//! audit page appends the new rows). It carries no data a page could not fetch itself, so it needs no
//! filtering beyond the org.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use countersign_core::store::AuditFilter;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::DashboardState;
use super::session::{SESSION_COOKIE, UiUser, cookie};

/// How far back from a notified seq to look for the events of that commit (one commit appends a handful).
const LOOK_BACK: i64 = 64;

fn concerns_approvals(action: &str) -> bool {
    action.starts_with("approval.") || action == "action.cancelled"
}

/// How often an open stream checks that its login still holds (logged out, key revoked, user disabled,
/// expired or idle all end it).
const LOGIN_RECHECK: Duration = Duration::from_secs(5);

pub async fn events(State(state): State<DashboardState>, ui: UiUser, headers: HeaderMap) -> Response {
    let token = cookie(&headers, SESSION_COOKIE).unwrap_or_default().to_owned();
    let org = ui.caller.org_id().clone();
    // One of the user's open waits for as long as the stream lasts.
    let slot = match state.gateway.open_wait(&ui.caller) {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let mut live = state.gateway.notifier().subscribe_audit();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(16);
    let gateway = state.gateway.clone();
    let caller = ui.caller;
    tokio::spawn(async move {
        let _slot = slot;
        // A first message tells the page the stream is up (it re-fetches once, covering the gap before it).
        if tx.send(Ok(Event::default().event("ready").data("ok"))).await.is_err() {
            return;
        }
        let shutdown = gateway.shutdown().clone();
        let mut seen: i64 = 0;
        let mut recheck = tokio::time::interval(LOGIN_RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                _ = recheck.tick() => {
                    if !gateway.dashboard_session_holds(&token).await {
                        return;
                    }
                    continue;
                }
                next = live.recv() => next,
            };
            let (approvals, head) = match next {
                // A replica reconnected: anything may have changed.
                Ok(appended) if appended.org_id.is_none() => (true, seen),
                Ok(appended) if appended.concerns(&org, seen) => {
                    let after = seen.max(appended.seq.saturating_sub(LOOK_BACK)).max(0);
                    let events = gateway.query_audit(&caller, &AuditFilter::default(), after, 500).await;
                    match events {
                        Ok(events) => {
                            let head = events.last().map_or(appended.seq, |e| e.seq);
                            (events.iter().any(|e| concerns_approvals(&e.action)), head)
                        }
                        Err(_) => return,
                    }
                }
                Ok(_) => continue,
                // Fell behind: anything may have changed.
                Err(RecvError::Lagged(_)) => (true, seen),
                Err(RecvError::Closed) => return,
            };
            seen = seen.max(head);
            if approvals && tx.send(Ok(Event::default().event("approvals").data(seen.to_string()))).await.is_err() {
                return;
            }
            if tx.send(Ok(Event::default().event("audit").data(seen.to_string()))).await.is_err() {
                return;
            }
        }
    });
    let stream = ReceiverStream::new(rx);
    let mut response = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response();
    response.headers_mut().insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    response
}
