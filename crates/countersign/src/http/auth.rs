//! The credential extractor: `Authorization: Bearer <key or session token>` (or `x-api-key`) becomes a
//! [`Caller`] through the gateway, then the caller's rate limit is checked. Only a handler that waits takes the
//! secret too ([`AuthThatWaits`]), to check it again before it answers.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::AppState;
use crate::error::Error;
use crate::gateway::Caller;

/// An authenticated caller.
pub struct Auth(pub Caller);

/// The presented secret, from `Authorization: Bearer` or `x-api-key`.
pub fn presented_secret(parts: &Parts) -> Result<&str, Error> {
    presented_secret_in(&parts.headers)
}

/// The presented secret, from `Authorization: Bearer` or `x-api-key` in these headers.
pub fn presented_secret_in(headers: &axum::http::HeaderMap) -> Result<&str, Error> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let text =
            value.to_str().map_err(|_| Error::Unauthenticated("the Authorization header is not valid text".into()))?;
        let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(Error::Unauthenticated("use `Authorization: Bearer <Countersign key>`".into()));
        }
        return Ok(token.trim());
    }
    if let Some(value) = headers.get("x-api-key") {
        return value
            .to_str()
            .map(str::trim)
            .map_err(|_| Error::Unauthenticated("the x-api-key header is not valid text".into()));
    }
    Err(Error::Unauthenticated("no credential: send `Authorization: Bearer <Countersign key>`".into()))
}

/// An authenticated caller and the secret it presented, for a request that may wait a long time: its handler
/// asks [`crate::gateway::Gateway::still_stands`] before it answers.
pub struct AuthThatWaits(pub Caller, pub String);

impl FromRequestParts<AppState> for AuthThatWaits {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Auth(caller) = Auth::from_request_parts(parts, state).await?;
        Ok(AuthThatWaits(caller, presented_secret(parts)?.to_owned()))
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let secret = presented_secret(parts)?;
        let caller = state.gateway.authenticate(secret).await?;
        state.gateway.check_rate(&caller)?;
        Ok(Auth(caller))
    }
}
