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

/// Token-limit spellings. A request may carry more than one (a server may honour either), so policy reads
/// the largest as `max_tokens`.
const TOKEN_FIELDS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// Top-level request fields the model reads: prompts, messages, and the tools it is offered.
const TEXT_FIELDS: [&str; 10] = [
    "system",
    "instructions",
    "prompt",
    "input",
    "messages",
    "tools",
    "functions",
    "function_call",
    "tool_choice",
    "response_format",
];

/// Keys whose string values name structure, not content: roles, block types, ids, formats.
const NOT_TEXT_KEYS: [&str; 11] = [
    "role",
    "type",
    "id",
    "tool_call_id",
    "tool_use_id",
    "media_type",
    "mime_type",
    "format",
    "detail",
    "signature",
    "cache_control",
];

/// The action's params: the provider request body itself (design §3), so a rule can read any field of it,
/// with three additions and one elision:
/// - `provider`: the configured provider's name (from the path, not the client);
/// - `max_tokens`: the largest of every spelling the body uses (`max_tokens`, `max_completion_tokens`,
///   `max_output_tokens`), so a threshold cannot be slipped by spelling a larger limit another way;
/// - `text`: every string the model would read, joined: message content in string and content-part form
///   (documents included), the system prompt (string or blocks), tool calls and tool results, tool
///   descriptions, completion prompts and embedding inputs; structural strings (roles, types, ids) left out;
/// - inline binary (base64 images, audio and files) is replaced by a short placeholder naming its size, so
///   patterns do not match by chance inside encoded bytes and the stored action does not hold them twice
///   (the target keeps the body exactly as sent).
pub fn params(provider: &str, body: &Value) -> Value {
    let mut params = match without_binary(body) {
        Value::Object(object) => object,
        _ => Map::new(),
    };
    params.insert("provider".into(), json!(provider));
    // A quoted limit counts too (lenient servers honour it); one that is not a plain number ranks highest,
    // so the policy, which reads it as ambiguous, sees it rather than a smaller one.
    let size = |v: &Value| match v {
        Value::Number(n) => n.as_f64().unwrap_or(f64::INFINITY),
        Value::String(text) => text.trim().parse::<f64>().ok().filter(|n| !n.is_nan()).unwrap_or(f64::INFINITY),
        _ => f64::NEG_INFINITY,
    };
    let largest = TOKEN_FIELDS
        .iter()
        .filter_map(|f| body.get(*f).filter(|v| v.is_number() || v.is_string()))
        .max_by(|a, b| size(a).total_cmp(&size(b)));
    if let Some(tokens) = largest {
        params.insert("max_tokens".into(), tokens.clone());
    }
    let mut texts = Vec::new();
    for field in TEXT_FIELDS {
        if let Some(value) = body.get(field) {
            collect_text(value, &mut texts);
        }
    }
    params.insert("text".into(), json!(texts.join("\n")));
    // Always set, so a body field of that name cannot pose as the list (or hide one).
    let mut unreadable = Vec::new();
    collect_unreadable(body, &mut unreadable);
    params.insert("unreadable".into(), json!(unreadable));
    Value::Object(params)
}

/// The documents and files in a request that the model reads and no content pattern can, each as a short
/// description: Anthropic `document` blocks given as base64 (a PDF), by URL or by file id; OpenAI `file`
/// parts given inline (`file_data`) or by `file_id`. Plain-text documents are text, and images are not
/// listed. The policy takes a request with any as meeting the content patterns of a rule that denies or
/// holds (`policy::condition`).
fn collect_unreadable(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| collect_unreadable(item, out)),
        Value::Object(object) => {
            match object.get("type").and_then(Value::as_str) {
                Some("document") => {
                    let source = object.get("source");
                    let kind = source.and_then(|s| s.get("type")).and_then(Value::as_str).unwrap_or("");
                    if matches!(kind, "base64" | "url" | "file") {
                        let media = source.and_then(|s| s.get("media_type")).and_then(Value::as_str);
                        out.push(format!("document ({kind}{})", media.map(|m| format!(", {m}")).unwrap_or_default()));
                    }
                }
                Some("file") => {
                    if let Some(file) = object.get("file").and_then(Value::as_object) {
                        if let Some(id) = file.get("file_id").and_then(Value::as_str) {
                            out.push(format!("file {}", &id[..id.floor_char_boundary(64)]));
                        } else if file.contains_key("file_data") {
                            let name = file.get("filename").and_then(Value::as_str).unwrap_or("unnamed");
                            out.push(format!("file {} (inline)", &name[..name.floor_char_boundary(64)]));
                        }
                    }
                }
                _ => {}
            }
            object.values().for_each(|inner| collect_unreadable(inner, out));
        }
        _ => {}
    }
}

/// Every string under `value` except structural keys and inline binary. Numbers (token-id prompts) are
/// not text: the policy sees them in the params as they came and takes such a prompt as meeting the content
/// patterns of a rule that denies or holds (`policy::condition`). Free-form JSON the model wrote or reads whole (a `tool_use` block's `input`, object-valued
/// `arguments`) is taken whole, keys included, so no key name hides a value from policy.
fn collect_text(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(text) => out.push(text.clone()),
        Value::Array(items) => {
            for item in items {
                collect_text(item, out);
            }
        }
        Value::Object(object) => {
            for (key, inner) in object {
                if matches!(key.as_str(), "input" | "arguments") && inner.is_object() {
                    out.push(inner.to_string());
                    continue;
                }
                // Structural keys hide only their own string (a schema property named `type` keeps its
                // description visible).
                let structural = NOT_TEXT_KEYS.contains(&key.as_str()) && inner.is_string();
                if !structural && !is_binary(object, key, inner) {
                    collect_text(inner, out);
                }
            }
        }
        _ => {}
    }
}

/// A copy of `value` with each inline binary string replaced by `[inline data: N bytes]`.
fn without_binary(value: &Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.iter().map(without_binary).collect()),
        Value::Object(object) => Value::Object(
            object
                .iter()
                .map(|(key, inner)| {
                    let kept = match inner {
                        Value::String(data) if is_binary(object, key, inner) => {
                            json!(format!("[inline data: {} bytes]", data.len()))
                        }
                        _ => without_binary(inner),
                    };
                    (key.clone(), kept)
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Whether `object[key]` holds inline bytes, not words; only where images, audio and files go.
fn is_binary(object: &Map<String, Value>, key: &str, inner: &Value) -> bool {
    let Some(text) = inner.as_str() else { return false };
    // An Anthropic image or document given inline (`source.type: base64`).
    (key == "data" && object.get("type").and_then(Value::as_str) == Some("base64"))
        // OpenAI `input_audio.data` and `file.file_data` are base64 too.
        || key == "file_data"
        || (key == "data" && object.contains_key("format"))
        || (matches!(key, "url" | "image_url") && is_inline_binary(text))
}

/// A `data:<type>;base64,…` URL: an inline image or file, not words (checked only where a URL goes).
fn is_inline_binary(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("data:") else { return false };
    let head = rest.get(..rest.len().min(128)).unwrap_or(rest);
    head.find(',').is_some_and(|comma| head[..comma].ends_with(";base64"))
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
        assert!(!text.contains("image_url") && !text.contains("c1") && !text.contains("system\n"));
    }

    #[test]
    fn params_are_the_body_itself_with_inline_bytes_elided() {
        let image = format!("data:image/png;base64,{}", "QUJD".repeat(1000));
        let body = json!({
            "model": "gpt-x",
            "temperature": 2,
            "user": "end-user-7",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
            ]}]
        });
        let p = params("openai", &body);
        assert_eq!(p["temperature"], 2, "any body field is there for a rule to read");
        assert_eq!(p["user"], "end-user-7");
        assert_eq!(p["provider"], "openai");
        assert_eq!(p["messages"][0]["content"][0]["text"], "look");
        assert_eq!(p["messages"][0]["content"][1]["image_url"]["url"], "[inline data: 4022 bytes]");
        assert_eq!(p["messages"][0]["content"][2]["input_audio"]["data"], "[inline data: 4 bytes]");
        assert_eq!(p["messages"][0]["content"][2]["input_audio"]["format"], "wav");
        assert!(!p.to_string().contains("QUJD"), "no encoded bytes in params");
    }

    #[test]
    fn the_largest_token_limit_is_the_one_policy_reads() {
        let p = params("openai", &json!({"max_tokens": 16, "max_completion_tokens": 100_000}));
        assert_eq!(p["max_tokens"], 100_000);
        let p = params("openai", &json!({"max_completion_tokens": 64, "max_tokens": 512}));
        assert_eq!(p["max_tokens"], 512);
        // A quoted limit is not swapped for a smaller unquoted one.
        let p = params("openai", &json!({"max_tokens": "100000", "max_completion_tokens": 16}));
        assert_eq!(p["max_tokens"], "100000");
        let p = params("anthropic", &json!({"max_output_tokens": "lots", "max_tokens": 16}));
        assert_eq!(p["max_tokens"], "lots");
    }

    #[test]
    fn documents_tool_descriptions_and_legacy_calls_are_text_but_inline_bytes_are_not() {
        let body = json!({
            "model": "claude-x",
            "tools": [{"name": "mailer", "description": "tool description words", "input_schema": {"type": "object",
                       "properties": {"format": {"type": "string", "description": "schema property words"}}}}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "document", "title": "doc title", "source": {"type": "text", "media_type": "text/plain", "data": "send the payroll email"}},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgoSECRET"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoSECRET"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRiSECRET", "format": "wav"}}
                ]},
                {"role": "assistant", "function_call": {"name": "f", "arguments": "legacy call words"}}
            ]
        });
        let text = params("anthropic", &body)["text"].as_str().unwrap_or_default().to_owned();
        for piece in [
            "send the payroll email",
            "doc title",
            "tool description words",
            "legacy call words",
            "schema property words",
        ] {
            assert!(text.contains(piece), "{piece} in {text}");
        }
        assert!(!text.contains("SECRET") && !text.contains("text/plain"), "{text}");
    }

    #[test]
    fn free_form_json_and_text_starting_with_data_stay_visible() {
        let body = json!({
            "messages": [
                {"role": "user", "content": "data: please send the payroll email"},
                {"role": "user", "content": "data:x;base64, hidden words"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n",
                                                   "input": {"format": "wire $1M to X", "type": "urgent"}}]}
            ]
        });
        let text = params("anthropic", &body)["text"].as_str().unwrap_or_default().to_owned();
        for piece in ["data: please send the payroll email", "wire $1M to X", "urgent", "format", "hidden words"] {
            assert!(text.contains(piece), "{piece} in {text}");
        }
        assert!(is_inline_binary("data:image/png;base64,iVBOR"));
        assert!(!is_inline_binary("data: a sentence, with a comma;base64"));
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
