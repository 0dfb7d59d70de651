//! A fake model provider for the LLM proxy tests: a loopback axum server speaking the OpenAI dialect
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`) and the Anthropic one
//! (`/v1/messages`), both with server-sent event streaming and a delay between chunks.
//!
//! The model name picks the behaviour: `fail-500` answers 500, `bad-json` answers 200 with a body that is
//! not JSON, `slow` answers after 5 s, anything else answers normally (echoing the last user text). It
//! records every request so tests can check the provider key arrived and the Countersign key did not.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// The key the proxy must add; tests check it arrived and never reached the agent.
pub const PROVIDER_KEY: &str = "sk-provider-secret-0123456789";

/// How many content chunks a stream sends, and the pause before each.
pub const STREAM_CHUNKS: usize = 5;
pub const CHUNK_DELAY: Duration = Duration::from_millis(300);

#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone, Default)]
struct Shared {
    seen: Arc<Mutex<Vec<Seen>>>,
}

pub struct FakeProvider {
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeProvider {
    pub async fn start() -> FakeProvider {
        let shared = Shared::default();
        let seen = shared.seen.clone();
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/models", get(models))
            .route("/v1/messages", post(messages))
            // A provider takes long contexts and images, as the proxy's own limit lets through.
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(shared);
        let url = crate::helpers::serve(app).await;
        FakeProvider { url, seen }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn record(state: &Shared, path: &str, headers: HeaderMap, body: &Bytes) -> Value {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    state.seen.lock().unwrap().push(Seen { path: path.to_owned(), headers, body: body.clone() });
    body
}

/// The text of the last message, whatever its form.
fn last_text(body: &Value) -> String {
    let content = body["messages"].as_array().and_then(|m| m.last()).map(|m| m["content"].clone());
    match content {
        Some(Value::String(text)) => text,
        Some(Value::Array(parts)) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(" "),
        _ => String::new(),
    }
}

/// Behaviours picked by the model name; `None` means answer normally.
async fn misbehave(model: &str) -> Option<Response> {
    match model {
        "fail-500" => Some(
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({"error": {"message": "the fake provider broke"}})))
                .into_response(),
        ),
        "bad-json" => Some(([(header::CONTENT_TYPE, "application/json")], "<html>not json</html>").into_response()),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Some(axum::Json(json!({"late": true})).into_response())
        }
        _ => None,
    }
}

fn sse(events: Vec<String>) -> Response {
    let stream = futures_util::stream::unfold(events.into_iter(), |mut events| async move {
        let event = events.next()?;
        tokio::time::sleep(CHUNK_DELAY).await;
        Some((Ok::<_, Infallible>(Bytes::from(event)), events))
    });
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(stream))
        .into_response()
}

async fn chat(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let body = record(&state, "/v1/chat/completions", headers, &body);
    let model = body["model"].as_str().unwrap_or("gpt-fake").to_owned();
    if let Some(response) = misbehave(&model).await {
        return response;
    }
    let answer = format!("echo: {}", last_text(&body));
    let usage = json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10});
    if body["stream"].as_bool() == Some(true) {
        let mut events = Vec::new();
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        };
        events.push(format!("data: {}\n\n", chunk(json!({"role": "assistant", "content": ""}), Value::Null)));
        for i in 0..STREAM_CHUNKS {
            events.push(format!("data: {}\n\n", chunk(json!({"content": format!("part{i} ")}), Value::Null)));
        }
        if model == "cut-stream" {
            // Closed mid-answer, with no finish and no [DONE].
            return sse(events);
        }
        events.push(format!("data: {}\n\n", chunk(json!({}), json!("stop"))));
        if body["stream_options"]["include_usage"].as_bool() == Some(true) {
            let last = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                              "choices": [], "usage": usage});
            events.push(format!("data: {last}\n\n"));
        }
        events.push("data: [DONE]\n\n".to_owned());
        return sse(events);
    }
    axum::Json(json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": usage,
    }))
    .into_response()
}

async fn completions(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let body = record(&state, "/v1/completions", headers, &body);
    let model = body["model"].as_str().unwrap_or("fake-instruct").to_owned();
    if let Some(response) = misbehave(&model).await {
        return response;
    }
    axum::Json(json!({
        "id": "cmpl-fake", "object": "text_completion", "created": 1, "model": model,
        "choices": [{"index": 0, "text": "completed", "finish_reason": "stop", "logprobs": null}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }))
    .into_response()
}

async fn embeddings(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let body = record(&state, "/v1/embeddings", headers, &body);
    let model = body["model"].as_str().unwrap_or("fake-embed").to_owned();
    axum::Json(json!({
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }))
    .into_response()
}

async fn models(State(state): State<Shared>, headers: HeaderMap) -> Response {
    record(&state, "/v1/models", headers, &Bytes::new());
    axum::Json(json!({"object": "list", "data": [
        {"id": "gpt-fake", "object": "model", "created": 1, "owned_by": "fake"},
        {"id": "gpt-premium", "object": "model", "created": 1, "owned_by": "fake"},
    ]}))
    .into_response()
}

async fn messages(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let body = record(&state, "/v1/messages", headers, &body);
    let model = body["model"].as_str().unwrap_or("claude-fake").to_owned();
    if let Some(response) = misbehave(&model).await {
        return response;
    }
    let answer = format!("echo: {}", last_text(&body));
    if body["stream"].as_bool() == Some(true) {
        let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
        let mut events = vec![
            event(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
                       "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                       "usage": {"input_tokens": 11, "output_tokens": 1}}}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
        ];
        for i in 0..STREAM_CHUNKS {
            events.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": format!("part{i} ")}}),
            ));
        }
        if model == "overloaded-stream" {
            // Anthropic's way to fail a stream under way: an error event, then the end of the stream.
            let error = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
            events.push(event("error", error));
            return sse(events);
        }
        events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
        events.push(event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": {"output_tokens": 6}}),
        ));
        events.push(event("message_stop", json!({"type": "message_stop"})));
        return sse(events);
    }
    axum::Json(json!({
        "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": answer}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 11, "output_tokens": 6},
    }))
    .into_response()
}
