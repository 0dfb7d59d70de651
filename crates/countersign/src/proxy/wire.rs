//! The provider wire formats the proxy speaks to agents: which endpoint is which capability, the policy
//! params read out of a request body (model, requested max tokens, stream, and all message text), and the
//! providers' own error shapes, so an unmodified SDK raises its usual error with a readable message.
//!
//! Pure functions over JSON; no IO and no decisions (the gateway decides).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::config::Dialect;

/// The endpoints that become actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Messages,
}

impl Endpoint {
    pub fn capability(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "llm.chat.completion",
            Endpoint::Completions => "llm.completion.create",
            Endpoint::Embeddings => "llm.embedding.create",
            Endpoint::Messages => "llm.messages.create",
        }
    }

    /// The path on the provider's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Messages => "/v1/messages",
        }
    }

    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::Messages => Dialect::Anthropic,
            _ => Dialect::Openai,
        }
    }
}

/// Token-limit spellings, first found wins; policy reads the value as `max_tokens`.
const TOKEN_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// The action's params: `{provider, model, max_tokens, stream, text}`. Absent fields stay absent, so a
/// condition on them does not match. `text` joins every piece of text the model would read: string and
/// content-part message content, the system prompt (string or blocks), tool calls and tool results,
/// completion prompts and embedding inputs.
pub fn params(provider: &str, body: &Value) -> Value {
    let mut params = Map::new();
    params.insert("provider".into(), json!(provider));
    if let Some(model) = body.get("model").and_then(Value::as_str) {
        params.insert("model".into(), json!(model));
    }
    if let Some(tokens) = TOKEN_FIELDS.iter().find_map(|f| body.get(*f).filter(|v| v.is_number())) {
        params.insert("max_tokens".into(), tokens.clone());
    }
    params.insert("stream".into(), json!(body.get("stream").and_then(Value::as_bool).unwrap_or(false)));
    let mut texts = Vec::new();
    for field in ["system", "instructions", "prompt", "input"] {
        if let Some(value) = body.get(field) {
            collect_text(value, &mut texts);
        }
    }
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for message in messages {
            collect_text(message, &mut texts);
        }
    }
    params.insert("text".into(), json!(texts.join("\n")));
    Value::Object(params)
}

/// Text anywhere in a message or content value: strings, `text` and `content` of parts and blocks, tool
/// call arguments and tool inputs. Roles, types, ids and numbers (token arrays) are not text.
fn collect_text(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(text) => out.push(text.clone()),
        Value::Array(items) => {
            for item in items {
                collect_text(item, out);
            }
        }
        Value::Object(object) => {
            for key in ["text", "content", "arguments", "function", "tool_calls", "thinking"] {
                if let Some(inner) = object.get(key) {
                    collect_text(inner, out);
                }
            }
            // An Anthropic `tool_use` block's input is JSON the model wrote.
            if let Some(input) = object.get("input").filter(|i| i.is_object()) {
                out.push(input.to_string());
            }
        }
        _ => {}
    }
}

/// A provider-shaped error response.
pub fn error(dialect: Dialect, status: StatusCode, message: &str) -> Response {
    let body = match dialect {
        Dialect::Openai => {
            let (kind, code) = match status.as_u16() {
                400 | 413 | 422 => ("invalid_request_error", Value::Null),
                401 => ("invalid_request_error", json!("invalid_api_key")),
                403 => ("policy_denied", json!("policy_denied")),
                404 => ("invalid_request_error", json!("not_found")),
                409 => ("invalid_request_error", json!("conflict")),
                429 => ("rate_limit_exceeded", json!("rate_limit_exceeded")),
                502 => ("upstream_error", json!("upstream_error")),
                504 => ("upstream_timeout", json!("upstream_timeout")),
                _ => ("server_error", Value::Null),
            };
            json!({"error": {"message": message, "type": kind, "code": code, "param": null}})
        }
        Dialect::Anthropic => {
            let kind = match status.as_u16() {
                400 | 409 | 422 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                504 => "timeout_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
    };
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::FORBIDDEN {
        // A policy decision does not change on retry.
        response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    }
    response
}

/// The error of a gateway call, in the provider's shape with the gateway's status and text.
pub fn from_error(dialect: Dialect, error: &crate::error::Error) -> Response {
    let (status, problem) = error.problem();
    let message = problem.get("detail").and_then(Value::as_str).unwrap_or("error").to_owned();
    let mut response = self::error(dialect, status, &message);
    if let crate::error::Error::RateLimited { retry_after_seconds, .. } = error {
        response.headers_mut().insert(header::RETRY_AFTER, (*retry_after_seconds).into());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_gather_model_tokens_and_every_text_form() {
        let body = json!({
            "model": "gpt-x",
            "max_completion_tokens": 900,
            "stream": true,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "image_url", "image_url": {"url": "u"}}]},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"q\":\"args\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "tool said hi"}
            ]
        });
        let p = params("openai", &body);
        assert_eq!(p["model"], "gpt-x");
        assert_eq!(p["max_tokens"], 900);
        assert_eq!(p["stream"], true);
        let text = p["text"].as_str().unwrap_or_default();
        for piece in ["be brief", "part one", "args", "tool said hi"] {
            assert!(text.contains(piece), "{piece} in {text}");
        }
        assert!(!text.contains("image_url") && !text.contains("c1"));
    }

    #[test]
    fn anthropic_system_blocks_and_tool_results_are_text() {
        let body = json!({
            "model": "claude-x",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "system words"}],
            "messages": [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "result words"}]}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {"city": "Paris"}}]}
            ]
        });
        let p = params("anthropic", &body);
        let text = p["text"].as_str().unwrap_or_default();
        assert!(text.contains("system words") && text.contains("result words") && text.contains("Paris"), "{text}");
        assert_eq!(p["max_tokens"], 100);
        assert!(params("openai", &json!({"input": [1, 2]})).get("max_tokens").is_none());
    }
}
