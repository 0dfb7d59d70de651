//! `application/problem+json` for every error, and the extractors that turn malformed input into one
//! instead of axum's plain-text rejections.
//!
//! Internal errors answer "internal error"; their detail is logged here, once, never sent to the client.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::error::Error;

impl Error {
    /// The problem+json body and status of this error.
    pub fn problem(&self) -> (StatusCode, Value) {
        let (code, status, title) = self.kind().table();
        let mut body = Map::new();
        body.insert("type".into(), json!(format!("https://countersign.dev/problems/{code}")));
        body.insert("title".into(), json!(title));
        body.insert("status".into(), json!(status));
        body.insert("code".into(), json!(code));
        let detail = match self {
            Error::Internal(message) => {
                tracing::error!(error = %message, "internal error");
                "internal error".to_owned()
            }
            Error::Unavailable(message) => {
                tracing::warn!(error = %message, "store unavailable");
                "the service is temporarily unavailable; retry shortly".to_owned()
            }
            other => other.to_string(),
        };
        body.insert("detail".into(), json!(detail));
        match self {
            Error::BadRequest { field: Some(f), .. } | Error::Invalid { field: Some(f), .. } => {
                body.insert("field".into(), json!(f));
            }
            Error::PolicyDenied { rule, action_id, .. } => {
                body.insert("rule".into(), json!(rule));
                body.insert("action_id".into(), json!(action_id));
            }
            Error::Conflict { state: Some(state), .. } => {
                body.insert("state".into(), json!(state));
            }
            Error::RateLimited { retry_after_seconds, .. } => {
                body.insert("retry_after_seconds".into(), json!(retry_after_seconds));
            }
            _ => {}
        }
        (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), Value::Object(body))
    }
}

/// A problem+json response from a status and body.
pub fn problem_response(status: StatusCode, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/problem+json"));
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
    }
    response
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, body) = self.problem();
        let mut response = problem_response(status, body);
        if let Error::RateLimited { retry_after_seconds, .. } = self {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, retry_after_seconds.into());
        }
        response
    }
}

/// Guesses the field a serde error is about from its text (`missing field `x``, `unknown field `x``).
fn field_of(message: &str) -> Option<String> {
    let start = message.find('`')?;
    let rest = &message[start + 1..];
    let end = rest.find('`')?;
    Some(rest[..end].to_owned())
}

fn json_rejection(rejection: JsonRejection) -> Error {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            let message = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_else(|| e.body_text());
            Error::BadRequest { field: field_of(&message), message: format!("invalid request body: {message}") }
        }
        JsonRejection::JsonSyntaxError(e) => {
            let message = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_else(|| e.body_text());
            Error::BadRequest { field: None, message: format!("request body is not valid JSON: {message}") }
        }
        JsonRejection::MissingJsonContentType(_) => Error::BadRequest {
            field: None,
            message: "expected a JSON body with `Content-Type: application/json`".into(),
        },
        JsonRejection::BytesRejection(e) => bytes_rejection(&e),
        other => Error::BadRequest { field: None, message: other.body_text() },
    }
}

/// JSON body extractor whose rejections are problem+json.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// A body that could not be read: over the size limit (413), or cut off, stalled past its deadline or
/// malformed on the wire (400).
fn bytes_rejection(rejection: &BytesRejection) -> Error {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Error::PayloadTooLarge(
            "the request body is over the size limit (max_body_bytes in the Countersign configuration)".into(),
        )
    } else {
        Error::BadRequest { field: None, message: format!("cannot read request body: {}", rejection.body_text()) }
    }
}

/// Raw body extractor (for handlers that parse YAML or an optional JSON body themselves) whose rejections
/// are problem+json.
pub struct ApiBytes(pub Bytes);

impl<S> FromRequest<S> for ApiBytes
where
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(body) => Ok(ApiBytes(body)),
            Err(rejection) => Err(bytes_rejection(&rejection)),
        }
    }
}

/// Query-string extractor whose rejections are problem+json.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> Error {
    let message = rejection.body_text();
    Error::BadRequest { field: field_of(&message), message }
}

/// Path-parameter extractor whose rejections are problem+json.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> Error {
    Error::BadRequest { field: None, message: rejection.body_text() }
}
