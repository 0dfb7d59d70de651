//! Dashboard sessions: login with a user key, the session cookie, the CSRF token, logout.
//!
//! The cookie holds only a random token. The session itself lives in the store (`Gateway::
//! start_dashboard_session`), keyed by the token's SHA-256, so any replica on the database accepts the
//! cookie. Every request resolves the session afresh through the gateway, so logout, expiry, revoking the
//! key or disabling the user ends it at once. The CSRF token is not stored: it is an HMAC of the cookie
//! token, which only the browser holding the cookie (and the server it sends it to) can compute. The login
//! form itself is guarded by a double-submit token (a short-lived cookie equal to a form field). This module
//! makes no authorization decision beyond "is this a logged-in user".

use askama::Template;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use countersign_core::domain::User;
use countersign_core::secrets::{self, SecretKind};
use hmac::{KeyInit, Mac};
use serde::Deserialize;

use super::DashboardState;
use super::view::render;
use crate::error::Error;
use crate::gateway::Caller;

pub const SESSION_COOKIE: &str = "cs_ui";
const LOGIN_COOKIE: &str = "cs_ui_login";
/// What the CSRF token's HMAC signs, so the same key could never sign anything else by accident.
const CSRF_LABEL: &[u8] = b"countersign dashboard csrf v1";

/// A random token for the login form (32 bytes, base64url).
fn random_token() -> String {
    // The API-key generator is the one source of secret randomness; its prefix is not wanted here.
    let secret = secrets::generate(SecretKind::ApiKey).plaintext;
    secret.trim_start_matches(SecretKind::ApiKey.prefix()).to_owned()
}

/// The CSRF token of a session: hex HMAC-SHA256 of a fixed label, keyed by the session's cookie token.
fn csrf_for(session_token: &str) -> String {
    // HMAC takes a key of any length, so `new_from_slice` cannot fail; if it ever did, a random token would
    // make every POST of the session fail closed.
    match hmac::Hmac::<sha2::Sha256>::new_from_slice(session_token.as_bytes()) {
        Ok(mut mac) => {
            mac.update(CSRF_LABEL);
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => random_token(),
    }
}

/// The value of one cookie from the request.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(state: &DashboardState, name: &str, value: &str, path: &str, max_age: Option<u64>) -> HeaderValue {
    let mut text = format!("{name}={value}; Path={path}; HttpOnly; SameSite=Strict");
    if let Some(seconds) = max_age {
        text.push_str(&format!("; Max-Age={seconds}"));
    }
    if state.secure_cookies {
        text.push_str("; Secure");
    }
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("cs_ui=; Path=/ui; Max-Age=0"))
}

/// Sent by the dashboard's script on the requests it makes by itself; they do not count as activity.
const BACKGROUND_HEADER: &str = "x-countersign-background";

/// A logged-in user of the dashboard, resolved afresh on every request.
pub struct UiUser {
    pub caller: Caller,
    pub user: User,
    pub csrf: String,
    /// The SHA-256 of the key this login was made with (sessions minted here are tied to it).
    pub key_hash: String,
}

impl UiUser {
    /// Refuses a state-changing request whose form field or `x-csrf-token` header is not this session's
    /// token (constant-time comparison).
    pub fn check_csrf(&self, presented: Option<&str>) -> Result<(), Error> {
        match presented {
            Some(token) if secrets::hashes_equal(token, &self.csrf) => Ok(()),
            _ => Err(Error::Forbidden("missing or wrong CSRF token; reload the page and try again".into())),
        }
    }
}

/// No session: a page asks the browser to log in; anything else answers 401.
pub enum NoSession {
    Login,
    Problem(Error),
}

impl IntoResponse for NoSession {
    fn into_response(self) -> Response {
        match self {
            NoSession::Login => Redirect::to("/ui/login").into_response(),
            NoSession::Problem(e) => e.into_response(),
        }
    }
}

impl FromRequestParts<DashboardState> for UiUser {
    type Rejection = NoSession;

    async fn from_request_parts(parts: &mut Parts, state: &DashboardState) -> Result<Self, Self::Rejection> {
        let reject = |error: Error| {
            if parts.method == Method::GET { NoSession::Login } else { NoSession::Problem(error) }
        };
        let Some(token) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(reject(Error::Unauthenticated("not logged in to the dashboard".into())));
        };
        // The page's script marks the fetches no one clicked for (the queue's timer, live updates). Its live
        // stream cannot carry a header (EventSource), and the browser reconnects it by itself: a stream is
        // never activity, or a page left open would keep its login for ever.
        let stream = parts
            .headers
            .get(axum::http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
        let activity = !parts.headers.contains_key(BACKGROUND_HEADER) && !stream;
        let (caller, key_hash) = match state.gateway.resume_dashboard_session(token, activity).await {
            Ok(resumed) => resumed,
            Err(Error::Unauthenticated(reason)) => return Err(reject(Error::Unauthenticated(reason))),
            Err(other) => return Err(NoSession::Problem(other)),
        };
        state.gateway.check_rate(&caller).map_err(NoSession::Problem)?;
        let Some(user) = caller.user().cloned() else {
            return Err(reject(Error::Unauthenticated("the dashboard is for users, not agents".into())));
        };
        Ok(UiUser { caller, user, csrf: csrf_for(token), key_hash })
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    csrf: String,
    error: Option<String>,
}

fn login_response(state: &DashboardState, status: StatusCode, error: Option<String>) -> Response {
    let csrf = random_token();
    let cookie = set_cookie(state, LOGIN_COOKIE, &csrf, "/ui/login", Some(600));
    let mut response = render(status, &LoginPage { csrf, error });
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

pub async fn login_page(State(state): State<DashboardState>) -> Response {
    login_response(&state, StatusCode::OK, None)
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    key: String,
    #[serde(default)]
    csrf: Option<String>,
}

pub async fn login(State(state): State<DashboardState>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let form = serde_urlencoded::from_bytes::<LoginForm>(&body).unwrap_or(LoginForm { key: String::new(), csrf: None });
    let expected = cookie(&headers, LOGIN_COOKIE);
    let csrf_ok = matches!((expected, form.csrf.as_deref()), (Some(a), Some(b)) if secrets::hashes_equal(a, b));
    if !csrf_ok {
        return Error::Forbidden("missing or wrong CSRF token on the login form; reload the page".into())
            .into_response();
    }
    let key = form.key.trim();
    if SecretKind::of(key) != Some(SecretKind::ApiKey) {
        let message = "paste a user key: it starts with cs_sk_".to_owned();
        return login_response(&state, StatusCode::UNAUTHORIZED, Some(message));
    }
    let caller = match state.gateway.authenticate(key).await {
        Ok(caller) => caller,
        Err(Error::Unauthenticated(reason)) => return login_response(&state, StatusCode::UNAUTHORIZED, Some(reason)),
        Err(other) => return other.into_response(),
    };
    if let Err(e) = state.gateway.check_rate(&caller) {
        return e.into_response();
    }
    if caller.user().is_none() {
        let message = "this is an agent's key; the dashboard needs a user key".to_owned();
        return login_response(&state, StatusCode::FORBIDDEN, Some(message));
    }
    let login = match state.gateway.start_dashboard_session(&caller, key).await {
        Ok(login) => login,
        Err(e) => return e.into_response(),
    };
    let mut response = Redirect::to("/ui/pending").into_response();
    let headers = response.headers_mut();
    headers.append(header::SET_COOKIE, set_cookie(&state, SESSION_COOKIE, &login.token, "/ui", None));
    headers.append(header::SET_COOKIE, set_cookie(&state, LOGIN_COOKIE, "", "/ui/login", Some(0)));
    response
}

/// A state-changing request: a logged-in user whose CSRF token matched, and the form they sent. The token is
/// the form's `csrf` field or the `x-csrf-token` header; anything else (no token, a wrong one, no body)
/// answers 403 before the handler runs.
pub struct Posted<T> {
    pub ui: UiUser,
    pub form: T,
}

#[derive(Deserialize, Default)]
pub struct CsrfField {
    #[serde(default)]
    csrf: Option<String>,
}

impl<T: serde::de::DeserializeOwned + Send> axum::extract::FromRequest<DashboardState> for Posted<T> {
    type Rejection = Response;

    async fn from_request(request: axum::extract::Request, state: &DashboardState) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        let ui = UiUser::from_request_parts(&mut parts, state).await.map_err(IntoResponse::into_response)?;
        let bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .map_err(|_| Error::PayloadTooLarge("a dashboard form is at most 64 KiB".into()).into_response())?;
        let header = parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let field = serde_urlencoded::from_bytes::<CsrfField>(&bytes).unwrap_or_default().csrf;
        ui.check_csrf(field.or(header).as_deref()).map_err(IntoResponse::into_response)?;
        let form = serde_urlencoded::from_bytes::<T>(&bytes)
            .map_err(|e| Error::BadRequest { field: None, message: format!("unreadable form: {e}") }.into_response())?;
        Ok(Posted { ui, form })
    }
}

pub async fn logout(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    posted: Result<Posted<CsrfField>, Response>,
) -> Response {
    match posted {
        Ok(posted) => {
            if let Some(token) = cookie(&headers, SESSION_COOKIE)
                && let Err(e) = state.gateway.end_dashboard_session(&posted.ui.caller, token).await
            {
                return e.into_response();
            }
        }
        // No login, or one that ended (expired, idle, revoked): nothing to end, so the browser just goes to
        // the login form with the dead cookie cleared, instead of a 401 it cannot act on. A live login whose
        // form token did not match is still refused (403).
        Err(refused) if refused.status() == StatusCode::UNAUTHORIZED => {}
        Err(refused) => return refused,
    }
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().append(header::SET_COOKIE, set_cookie(&state, SESSION_COOKIE, "", "/ui", Some(0)));
    response
}
