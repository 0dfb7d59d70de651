//! The `llm` connector: sends a frozen model request to a provider configured under `[llm.NAME]`, with the
//! provider's key from the configuration, through the same guarded client as every other outbound call; and
//! reads what providers answer (token usage and model from a JSON body or from a server-sent event stream).
//!
//! It does not decide whether a call may happen (the gateway does) and does not shape responses for
//! clients (the proxy does). The provider key is added here and appears in no result, log or error.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use countersign_core::domain::LlmTarget;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};

use super::{ConnectorError, Connectors, MAX_RESULT_BODY_BYTES, transport};
use crate::config::{Dialect, LlmConfig};

/// How much of a non-streamed provider answer is read; a larger answer is a failure.
pub const MAX_LLM_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// The `anthropic-version` sent to Anthropic-dialect providers.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// What a provider answered, classified, ready to be recorded on the action.
#[derive(Debug, Clone)]
pub struct LlmAnswer {
    pub status: u16,
    /// A 2xx answer that is what the request asked for (valid JSON, or a stream).
    pub succeeded: bool,
    /// Why it did not succeed.
    pub error: Option<String>,
    /// Stored on the action: status, selected headers, body (capped), truncation flag.
    pub result: Value,
    /// Recorded in the finish audit event: model and token usage when the provider reported them.
    pub details: Value,
}

impl Connectors {
    /// Adds the model providers of the LLM proxy.
    pub fn with_llm(mut self, providers: BTreeMap<String, LlmConfig>) -> Self {
        self.llm = providers;
        self
    }

    /// The dialect of a configured provider; `None` when no provider has this name.
    pub fn llm_dialect(&self, provider: &str) -> Option<Dialect> {
        self.llm.get(provider).map(|p| p.dialect)
    }

    /// How long a configured provider may take to answer (and, streaming, between two chunks).
    pub fn llm_timeout(&self, provider: &str) -> Option<Duration> {
        self.llm.get(provider).map(|p| Duration::from_secs(p.timeout_seconds.max(1)))
    }

    fn llm_request(
        &self,
        provider: &str,
        method: reqwest::Method,
        path: &str,
        client_headers: &BTreeMap<String, String>,
    ) -> Result<(reqwest::RequestBuilder, Duration), ConnectorError> {
        let config = self.llm.get(provider).ok_or_else(|| ConnectorError::UnknownUpstream(provider.to_owned()))?;
        // Both spellings are common: `https://api.openai.com/v1` (the SDKs' and design's) and the bare host.
        let base = config.base_url.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        let url = reqwest::Url::parse(&format!("{base}{path}"))
            .map_err(|e| ConnectorError::Invalid(format!("cannot build the URL: {e}")))?;
        self.check(&url)?;
        let mut request = self.client.request(method, url);
        let key = config.api_key.expose();
        match config.dialect {
            Dialect::Openai => {
                if !key.is_empty() {
                    request = request.bearer_auth(key);
                }
            }
            Dialect::Anthropic => {
                if !key.is_empty() {
                    request = request.header("x-api-key", key);
                }
                if !client_headers.contains_key("anthropic-version") {
                    request = request.header("anthropic-version", ANTHROPIC_VERSION);
                }
            }
        }
        for (name, value) in client_headers {
            request = request.header(name.as_str(), value.as_str());
        }
        request = request.header("user-agent", concat!("Countersign-LLM-Proxy/", env!("CARGO_PKG_VERSION")));
        Ok((request, Duration::from_secs(config.timeout_seconds.max(1))))
    }

    /// Sends a frozen model request; answers once the provider's status and headers are in. The caller
    /// reads the body (all of it, or as a stream). The provider's timeout bounds the wait for the headers;
    /// a non-streamed request is bounded by it as a whole.
    ///
    /// `stream_usage`: the caller relays an OpenAI stream and wants its token usage, which OpenAI sends only
    /// when asked (`stream_options.include_usage`); when the client did not ask, it is asked for here and
    /// the caller drops the extra usage chunk before the client sees it ([`adds_stream_usage`]).
    pub async fn send_llm(
        &self,
        target: &LlmTarget,
        idempotency_key: &str,
        stream: bool,
        stream_usage: bool,
    ) -> Result<(reqwest::Response, Duration), ConnectorError> {
        let (request, timeout) =
            self.llm_request(&target.provider, reqwest::Method::POST, &target.path, &target.headers)?;
        let mut request = request.header("idempotency-key", idempotency_key);
        request = match stream_usage.then(|| self.with_stream_usage(target)).flatten() {
            Some(body) => request.json(&body),
            None => request.json(&target.body),
        };
        if !stream {
            request = request.timeout(timeout);
        }
        let response = tokio::time::timeout(timeout, request.send())
            .await
            .map_err(|_| ConnectorError::Timeout(format!("the provider did not answer within {}s", timeout.as_secs())))?
            .map_err(|e| llm_transport(&e.without_url()))?;
        Ok((response, timeout))
    }

    /// The body with `stream_options.include_usage` added, when [`Connectors::adds_stream_usage`] says so.
    fn with_stream_usage(&self, target: &LlmTarget) -> Option<Value> {
        if !self.adds_stream_usage(target) {
            return None;
        }
        let mut body = target.body.clone();
        match body.as_object_mut()?.entry("stream_options").or_insert(Value::Null) {
            options @ Value::Null => *options = json!({"include_usage": true}),
            Value::Object(options) => {
                options.insert("include_usage".into(), Value::Bool(true));
            }
            _ => return None,
        }
        Some(body)
    }

    /// Whether a relayed stream of this request gets `stream_options.include_usage` added: a provider
    /// configured with `stream_usage` (on by default for api.openai.com), an OpenAI-dialect chat or text
    /// completion streamed without the client asking for usage, and `stream_options` absent or an object.
    /// The relay then drops the usage chunk ([`is_added_usage_event`]), so the client sees the stream it
    /// asked for.
    pub fn adds_stream_usage(&self, target: &LlmTarget) -> bool {
        let Some(config) = self.llm.get(&target.provider) else { return false };
        config.stream_usage
            && config.dialect == Dialect::Openai
            && matches!(target.path.as_str(), "/v1/chat/completions" | "/v1/completions")
            && target.body.get("stream").and_then(Value::as_bool) == Some(true)
            && matches!(target.body.get("stream_options"), None | Some(Value::Null) | Some(Value::Object(_)))
            && target.body.pointer("/stream_options/include_usage").and_then(Value::as_bool) != Some(true)
    }

    /// `GET` on a provider path (the model list): no action, just the provider's answer.
    pub async fn get_llm(&self, provider: &str, path: &str) -> Result<(u16, String, Vec<u8>), ConnectorError> {
        let (request, timeout) = self.llm_request(provider, reqwest::Method::GET, path, &BTreeMap::new())?;
        let response = request.timeout(timeout).send().await.map_err(|e| llm_transport(&e.without_url()))?;
        let status = response.status().as_u16();
        let content_type = content_type(&response);
        let body = read_all(response, MAX_LLM_RESPONSE_BYTES).await?;
        Ok((status, content_type, body))
    }

    /// Sends and reads the whole answer (the execution job's path: nobody is waiting on a stream).
    pub async fn execute_llm(&self, target: &LlmTarget, idempotency_key: &str) -> Result<LlmAnswer, ConnectorError> {
        let dialect = self.llm_dialect(&target.provider).unwrap_or(Dialect::Openai);
        let stream = target.body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        // As on the live relay, an OpenAI stream is asked for its usage; the added chunk is read for the
        // audit and then taken out of the stored answer, so the client gets the stream it asked for.
        let added_usage = stream && self.adds_stream_usage(target);
        let (response, timeout) = self.send_llm(target, idempotency_key, stream, added_usage).await?;
        let status = response.status().as_u16();
        let content_type = content_type(&response);
        // A whole answer is bounded by the request's timeout (set in `send_llm`); a stream, like a relayed
        // one, only by the silence between chunks: a long generation is not cut off halfway.
        let idle = stream.then_some(timeout);
        let body = read_within(response, MAX_LLM_RESPONSE_BYTES, idle).await?;
        let mut answer = classify(dialect, status, &content_type, &body);
        if added_usage && (200..300).contains(&status) && content_type.starts_with("text/event-stream") {
            let mut filter = UsageChunkFilter::default();
            let mut asked = filter.pass(&body).to_vec();
            asked.extend_from_slice(&filter.rest());
            answer.result = stored_result(status, &content_type, &asked, None);
        }
        Ok(answer)
    }
}

/// Holds back the bytes of an unfinished server-sent event and drops the usage-only chunk the gateway
/// asked for, so the client gets the stream it asked for. Complete events pass at once. An event that grows
/// past [`MAX_PENDING_EVENT`] without ending turns the filter off: from then on bytes pass as they come.
#[derive(Default)]
pub struct UsageChunkFilter {
    pending: Vec<u8>,
    off: bool,
}

/// The most an unfinished event is held back.
const MAX_PENDING_EVENT: usize = 64 * 1024;

impl UsageChunkFilter {
    pub fn pass(&mut self, chunk: &[u8]) -> Bytes {
        if self.off {
            return Bytes::copy_from_slice(chunk);
        }
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(self.pending.len());
        let mut start = 0;
        while let Some(end) = event_end(&self.pending[start..]) {
            let event = &self.pending[start..start + end];
            if !is_added_usage_event(event) {
                out.extend_from_slice(event);
            }
            start += end;
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_PENDING_EVENT {
            self.off = true;
            out.append(&mut self.pending);
        }
        Bytes::from(out)
    }

    /// What is left when the stream ends: an event without its blank line, passed on unless it is the
    /// usage chunk.
    pub fn rest(&mut self) -> Bytes {
        let rest = std::mem::take(&mut self.pending);
        if is_added_usage_event(&rest) { Bytes::new() } else { Bytes::from(rest) }
    }
}

/// The length of the first complete event in `bytes`, up to and including the blank line that ends it.
/// Lines end with CRLF, LF or CR, as server-sent events allow.
fn event_end(bytes: &[u8]) -> Option<usize> {
    let mut line_start = true;
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let eol = match byte {
            b'\n' => 1,
            // A CR last in the buffer may be half of a CRLF: wait for the next byte.
            b'\r' if i + 1 == bytes.len() => return None,
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => 2,
            b'\r' => 1,
            _ => 0,
        };
        if eol == 0 {
            line_start = false;
            i += 1;
            continue;
        }
        i += eol;
        if line_start {
            return Some(i);
        }
        line_start = true;
    }
    None
}

/// The usage-only chunk OpenAI sends last when `include_usage` is on: no choices, a `usage` object.
/// `event` is one server-sent event, without its blank-line terminator.
pub fn is_added_usage_event(event: &[u8]) -> bool {
    let mut data = Vec::new();
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
        }
    }
    match serde_json::from_slice::<Value>(&data) {
        Ok(chunk) => {
            chunk.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty)
                && chunk.get("usage").is_some_and(Value::is_object)
        }
        Err(_) => false,
    }
}

pub fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned()
}

/// Reads a whole body, refusing one over `limit` bytes.
pub async fn read_all(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, ConnectorError> {
    read_within(response, limit, None).await
}

/// [`read_all`], failing when `idle` passes without a chunk.
async fn read_within(
    response: reqwest::Response,
    limit: usize,
    idle: Option<Duration>,
) -> Result<Vec<u8>, ConnectorError> {
    let mut stream = response.bytes_stream();
    let mut body = Vec::new();
    loop {
        let next = match idle {
            Some(idle) => tokio::time::timeout(idle, stream.next())
                .await
                .map_err(|_| ConnectorError::Timeout(format!("the provider sent nothing for {}s", idle.as_secs())))?,
            None => stream.next().await,
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| llm_transport(&e.without_url()))?;
        if body.len() + chunk.len() > limit {
            return Err(ConnectorError::Transport(format!("the provider's answer is over {limit} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A failed send; timeouts kept apart so they can answer 504.
pub fn llm_transport(error: &reqwest::Error) -> ConnectorError {
    if error.is_timeout() { ConnectorError::Timeout("the provider timed out".into()) } else { transport(error) }
}

/// Classifies a whole provider answer: 2xx with the expected body succeeds; anything else fails, saying why.
pub fn classify(dialect: Dialect, status: u16, content_type: &str, body: &[u8]) -> LlmAnswer {
    let is_stream = content_type.starts_with("text/event-stream");
    let parsed: Option<Value> = if is_stream { None } else { serde_json::from_slice(body).ok() };
    let mut details = Map::new();
    let mut stream_failure = None;
    if is_stream {
        let mut usage = SseUsage::new(dialect);
        usage.feed(body);
        usage.finish();
        details = usage.details();
        stream_failure = usage.failure();
    } else if let Some(value) = &parsed {
        details = usage_of(dialect, value);
    }
    let (succeeded, error) = match (status, &parsed) {
        (200..=299, Some(_)) => (true, None),
        (200..=299, None) if is_stream => (stream_failure.is_none(), stream_failure),
        (200..=299, None) => (false, Some("the provider answered with a body that is not valid JSON".to_owned())),
        (status, _) => (false, Some(format!("upstream answered {status}"))),
    };
    LlmAnswer {
        status,
        succeeded,
        error,
        result: stored_result(status, content_type, body, parsed),
        details: Value::Object(details),
    }
}

/// The result stored on the action: like an `http` target's, the body capped at [`MAX_RESULT_BODY_BYTES`].
pub fn stored_result(status: u16, content_type: &str, body: &[u8], parsed: Option<Value>) -> Value {
    let truncated = body.len() > MAX_RESULT_BODY_BYTES;
    let body_value = match parsed {
        Some(value) if !truncated => value,
        _ => {
            let end = body.len().min(MAX_RESULT_BODY_BYTES);
            Value::String(String::from_utf8_lossy(&body[..end]).into_owned())
        }
    };
    json!({"status": status, "headers": {"content-type": content_type}, "body": body_value, "truncated": truncated})
}

/// Model and token usage from a non-streamed answer, as the provider reported them.
pub fn usage_of(dialect: Dialect, body: &Value) -> Map<String, Value> {
    let mut details = Map::new();
    if let Some(model) = body.get("model").and_then(Value::as_str) {
        details.insert("model".into(), json!(model));
    }
    if let Some(usage) = body.get("usage").filter(|u| u.is_object()) {
        details.insert("usage".into(), normalize_usage(dialect, usage));
    }
    details
}

/// The provider's own usage object, plus `input_tokens`/`output_tokens` in both dialects.
fn normalize_usage(dialect: Dialect, usage: &Value) -> Value {
    let mut out = usage.as_object().cloned().unwrap_or_default();
    if dialect == Dialect::Openai {
        if let Some(v) = usage.get("prompt_tokens") {
            out.insert("input_tokens".into(), v.clone());
        }
        if let Some(v) = usage.get("completion_tokens") {
            out.insert("output_tokens".into(), v.clone());
        }
    }
    Value::Object(out)
}

/// Reads model and token usage out of a server-sent event stream as it passes, chunk by chunk: OpenAI's
/// final chunk carries `usage` (with `stream_options.include_usage`); Anthropic's `message_start` carries the
/// input tokens and `message_delta` the output tokens.
#[derive(Debug)]
pub struct SseUsage {
    dialect: Dialect,
    line: Vec<u8>,
    model: Option<String>,
    usage: Map<String, Value>,
    /// The stream said it was complete (`[DONE]` or `message_stop`).
    pub completed: bool,
    /// OpenAI dialect: the choices seen, and those that carried a `finish_reason`. Some OpenAI-compatible
    /// servers end a whole stream without `[DONE]`; one whose every choice finished is complete too.
    choices_seen: std::collections::BTreeSet<u64>,
    choices_finished: std::collections::BTreeSet<u64>,
    /// The message of the first error event the stream carried (Anthropic's `{"type": "error", "error":
    /// {…}}`, such as `overloaded_error`; an OpenAI-style `{"error": {…}}`).
    pub error: Option<String>,
}

/// A line longer than this is not an event we read usage from; it is skipped, not buffered.
const MAX_SSE_LINE: usize = 1024 * 1024;

impl SseUsage {
    pub fn new(dialect: Dialect) -> Self {
        SseUsage {
            dialect,
            line: Vec::new(),
            model: None,
            usage: Map::new(),
            completed: false,
            error: None,
            choices_seen: std::collections::BTreeSet::new(),
            choices_finished: std::collections::BTreeSet::new(),
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        for &byte in chunk {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.line_done(&line);
            } else if self.line.len() < MAX_SSE_LINE {
                self.line.push(byte);
            }
        }
    }

    /// Reads a last line that had no newline after it.
    pub fn finish(&mut self) {
        let line = std::mem::take(&mut self.line);
        self.line_done(&line);
    }

    fn line_done(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else { return };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            self.completed = true;
            return;
        }
        let Ok(event) = serde_json::from_slice::<Value>(data) else { return };
        if self.error.is_none()
            && let Some(error) = event.get("error").filter(|e| e.is_object())
        {
            let kind = error.get("type").and_then(Value::as_str).unwrap_or("error");
            let message = error.get("message").and_then(Value::as_str).unwrap_or("no message");
            self.error = Some(format!("{kind}: {}", &message[..message.floor_char_boundary(500)]));
        }
        match self.dialect {
            Dialect::Openai => {
                if let Some(model) = event.get("model").and_then(Value::as_str) {
                    self.model = Some(model.to_owned());
                }
                for choice in event.get("choices").and_then(Value::as_array).into_iter().flatten() {
                    let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
                    self.choices_seen.insert(index);
                    if choice.get("finish_reason").is_some_and(|reason| !reason.is_null()) {
                        self.choices_finished.insert(index);
                    }
                }
                if let Some(usage) = event.get("usage").filter(|u| u.is_object())
                    && let Value::Object(u) = normalize_usage(Dialect::Openai, usage)
                {
                    self.usage = u;
                }
            }
            Dialect::Anthropic => {
                let message = event.get("message");
                if let Some(model) = message.and_then(|m| m.get("model")).and_then(Value::as_str) {
                    self.model = Some(model.to_owned());
                }
                let usage = message.and_then(|m| m.get("usage")).or_else(|| event.get("usage"));
                if let Some(Value::Object(usage)) = usage {
                    for (key, value) in usage {
                        if !value.is_null() {
                            self.usage.insert(key.clone(), value.clone());
                        }
                    }
                }
                if event.get("type").and_then(Value::as_str) == Some("message_stop") {
                    self.completed = true;
                }
            }
        }
    }

    /// Why a stream the provider closed is not a success: an error event in it, or no word that it was
    /// complete (`[DONE]`, `message_stop`, or a `finish_reason` on every choice): it was cut short. `None` for
    /// a complete stream. Read after [`SseUsage::finish`].
    pub fn failure(&self) -> Option<String> {
        let every_choice_finished = !self.choices_seen.is_empty() && self.choices_seen == self.choices_finished;
        match (&self.error, self.completed || every_choice_finished) {
            (Some(error), _) => Some(format!("the provider's stream reported an error: {error}")),
            (None, false) => {
                Some("the provider's stream ended before it said it was complete ([DONE] or message_stop)".into())
            }
            (None, true) => None,
        }
    }

    /// `{model, usage}` as far as the stream reported them.
    pub fn details(&self) -> Map<String, Value> {
        let mut details = Map::new();
        if let Some(model) = &self.model {
            details.insert("model".into(), json!(model));
        }
        if !self.usage.is_empty() {
            details.insert("usage".into(), Value::Object(self.usage.clone()));
        }
        details
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const USAGE: &str = r#"data: {"choices":[],"usage":{"prompt_tokens":1}}"#;

    #[test]
    fn events_end_at_a_blank_line_of_any_line_ending() {
        assert_eq!(event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(event_end(b"data: a\r\rx"), Some(9));
        assert_eq!(event_end(b"data: a\n\r\n"), Some(10));
        assert_eq!(event_end(b"data: a\r"), None, "a CR last may be half of a CRLF");
        assert_eq!(event_end(b"data: a\n"), None);
    }

    #[test]
    fn the_added_usage_chunk_is_dropped_wherever_the_chunks_split() {
        let stream = format!("data: {{\"choices\":[{{}}]}}\r\n\r\n{USAGE}\r\n\r\ndata: [DONE]\r\n\r\n");
        for split in 0..stream.len() {
            let mut filter = UsageChunkFilter::default();
            let (a, b) = stream.as_bytes().split_at(split);
            let mut out = filter.pass(a).to_vec();
            out.extend_from_slice(&filter.pass(b));
            out.extend_from_slice(&filter.rest());
            let out = String::from_utf8(out).unwrap();
            assert!(!out.contains("usage") && out.contains("choices") && out.ends_with("[DONE]\r\n\r\n"), "{out}");
        }
        // A usage chunk left without its blank line at the end is dropped too.
        let mut filter = UsageChunkFilter::default();
        assert!(filter.pass(USAGE.as_bytes()).is_empty());
        assert!(filter.rest().is_empty());
    }

    #[test]
    fn an_event_that_never_ends_is_passed_on_past_the_cap() {
        let mut filter = UsageChunkFilter::default();
        assert!(filter.pass(b"data: ").is_empty());
        let big = vec![b'x'; MAX_PENDING_EVENT + 1];
        assert_eq!(filter.pass(&big).len(), MAX_PENDING_EVENT + 7);
        assert_eq!(filter.pass(b"more").as_ref(), b"more");
    }

    #[test]
    fn openai_stream_usage_comes_from_the_last_chunk_across_chunk_boundaries() {
        let mut usage = SseUsage::new(Dialect::Openai);
        let text = "data: {\"model\":\"gpt-x\",\"choices\":[],\"usage\":null}\n\ndata: {\"model\":\"gpt-x\",\"choices\":[],\
                    \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"total_tokens\":8}}\n\ndata: [DONE]\n\n";
        for piece in text.as_bytes().chunks(7) {
            usage.feed(piece);
        }
        usage.finish();
        let details = Value::Object(usage.details());
        assert_eq!(details["model"], "gpt-x");
        assert_eq!(details["usage"]["input_tokens"], 3);
        assert_eq!(details["usage"]["output_tokens"], 5);
        assert!(usage.completed);
        assert_eq!(usage.failure(), None);
    }

    /// A stream is complete by `[DONE]`, or (for servers that never send it) once every choice finished; one
    /// cut short, or carrying an error event, is not.
    #[test]
    fn a_stream_is_complete_when_it_says_so_or_every_choice_finished() {
        let judge = |text: &str| {
            let mut usage = SseUsage::new(Dialect::Openai);
            usage.feed(text.as_bytes());
            usage.finish();
            usage.failure()
        };
        let chunk = |index: u64, finish: Value| {
            format!("data: {}\n\n", json!({"choices": [{"index": index, "delta": {}, "finish_reason": finish}]}))
        };
        let (open0, open1) = (chunk(0, Value::Null), chunk(1, Value::Null));
        let (done0, done1) = (chunk(0, json!("stop")), chunk(1, json!("length")));
        assert_eq!(judge(&format!("{open0}{open1}{done0}{done1}")), None, "every choice finished, no [DONE]");
        assert_eq!(judge(&format!("{open0}data: [DONE]\n\n")), None);
        assert!(judge(&format!("{open0}{open1}{done0}")).unwrap().contains("ended before"), "choice 1 unfinished");
        assert!(judge(&open0).unwrap().contains("ended before"));
        assert!(judge("").unwrap().contains("ended before"));
        let error = "data: {\"error\": {\"type\": \"server_error\", \"message\": \"boom\"}}\n\ndata: [DONE]\n\n";
        assert_eq!(judge(error).unwrap(), "the provider's stream reported an error: server_error: boom");
    }

    #[test]
    fn anthropic_stream_usage_joins_message_start_and_message_delta() {
        let mut usage = SseUsage::new(Dialect::Anthropic);
        usage.feed(
            b"event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\
                     \"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\r\n\r\n",
        );
        usage.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n");
        usage.feed(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        let details = Value::Object(usage.details());
        assert_eq!(details["model"], "claude-x");
        assert_eq!(details["usage"]["input_tokens"], 11);
        assert_eq!(details["usage"]["output_tokens"], 7);
        assert!(usage.completed);
    }

    #[test]
    fn answers_are_classified() {
        let ok = classify(Dialect::Openai, 200, "application/json", br#"{"model":"m","usage":{"prompt_tokens":1}}"#);
        assert!(ok.succeeded);
        assert_eq!(ok.details["usage"]["input_tokens"], 1);
        let bad = classify(Dialect::Openai, 200, "application/json", b"<html>");
        assert!(!bad.succeeded);
        let failed = classify(Dialect::Anthropic, 503, "application/json", b"{}");
        assert_eq!(failed.error.as_deref(), Some("upstream answered 503"));
    }
}
