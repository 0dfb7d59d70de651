//! The one error type every front end maps: each variant has a stable snake_case code and an HTTP status,
//! listed once in [`ErrorKind::table`]. Clients branch on the code, never on the text.
//!
//! This module does not log; internal errors are logged once, by the HTTP middleware, with the request span.

use countersign_core::state::InvalidTransition;
use countersign_core::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed input: bad JSON, a missing field, a wrong type. `field` names what to fix.
    #[error("{message}")]
    BadRequest { field: Option<String>, message: String },
    /// Well-formed but semantically invalid: an unknown capability syntax, an invalid policy, …
    #[error("{message}")]
    Invalid { field: Option<String>, message: String },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    /// The policy refused the action; the action exists, in state `denied`.
    #[error("{message}")]
    PolicyDenied { rule: String, action_id: String, message: String },
    #[error("{0}")]
    NotFound(String),
    /// An invalid state transition or a uniqueness conflict; `state` is the object's current state.
    #[error("{message}")]
    Conflict { message: String, state: Option<String> },
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Too many requests from one principal; retry after the given seconds.
    #[error("{message}")]
    RateLimited { message: String, retry_after_seconds: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// A conditional write found its row changed meanwhile ([`StoreError::Stale`]): a conflict to clients, and
    /// for the gateway a sign to read the row and decide again.
    #[error("{0}")]
    Stale(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    Invalid,
    Unauthenticated,
    Forbidden,
    PolicyDenied,
    NotFound,
    Conflict,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorKind {
    /// (code, HTTP status, title) for each kind: the single mapping table.
    pub fn table(self) -> (&'static str, u16, &'static str) {
        match self {
            ErrorKind::BadRequest => ("bad_request", 400, "Malformed request"),
            ErrorKind::Invalid => ("invalid", 422, "Invalid request"),
            ErrorKind::Unauthenticated => ("unauthenticated", 401, "Missing or invalid credential"),
            ErrorKind::Forbidden => ("forbidden", 403, "Not allowed"),
            ErrorKind::PolicyDenied => ("policy_denied", 403, "Denied by policy"),
            ErrorKind::NotFound => ("not_found", 404, "Not found"),
            ErrorKind::Conflict => ("conflict", 409, "Conflict"),
            ErrorKind::PayloadTooLarge => ("payload_too_large", 413, "Payload too large"),
            ErrorKind::RateLimited => ("rate_limited", 429, "Too many requests"),
            ErrorKind::Unavailable => ("unavailable", 503, "Service unavailable"),
            ErrorKind::Internal => ("internal", 500, "Internal error"),
        }
    }
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::BadRequest { .. } => ErrorKind::BadRequest,
            Error::Invalid { .. } => ErrorKind::Invalid,
            Error::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Error::Forbidden(_) => ErrorKind::Forbidden,
            Error::PolicyDenied { .. } => ErrorKind::PolicyDenied,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Conflict { .. } | Error::Stale(_) => ErrorKind::Conflict,
            Error::PayloadTooLarge(_) => ErrorKind::PayloadTooLarge,
            Error::RateLimited { .. } => ErrorKind::RateLimited,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    pub fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::BadRequest { field: Some(field.into()), message: message.into() }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid { field: Some(field.into()), message: message.into() }
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Error::NotFound(format!("no {what} `{id}`"))
    }
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(message) => Error::Conflict { message, state: None },
            StoreError::Unavailable(message) => Error::Unavailable(message),
            StoreError::Internal(message) => Error::Internal(message),
            StoreError::Stale(message) => Error::Stale(message),
        }
    }
}

impl From<InvalidTransition> for Error {
    fn from(error: InvalidTransition) -> Self {
        Error::Conflict { message: error.to_string(), state: Some(error.from.to_owned()) }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
