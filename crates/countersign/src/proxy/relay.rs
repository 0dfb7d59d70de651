//! Relaying a provider's server-sent event stream to the agent chunk by chunk, as it arrives (nothing is
//! buffered beyond the chunk in hand), while reading model and token usage out of it; the outcome is
//! recorded on the action when the stream ends, before the agent sees its end.
//!
//! A client that disconnects drops the response body, which drops the provider's stream (cancelling the
//! upstream call) and the [`Recorder`], which then records the action as failed. This module decides
//! nothing; it only carries bytes and reports what happened to the gateway.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use countersign_core::domain::Action;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::{Value, json};

use crate::config::Dialect;
use crate::connectors::MAX_RESULT_BODY_BYTES;
use crate::connectors::llm::{SseUsage, is_added_usage_event, stored_result};
use crate::gateway::{Gateway, InlineOutcome};

/// Watches one streamed execution and records its outcome exactly once.
pub struct Recorder {
    gateway: Gateway,
    action: Action,
    provider: String,
    status: u16,
    content_type: String,
    started: Instant,
    first_chunk_ms: Option<u128>,
    usage: SseUsage,
    /// The start of the stream, kept for the stored result.
    kept: Vec<u8>,
    bytes: usize,
    recorded: bool,
    /// When the recovery job was last pushed on, and how often a long stream pushes it again.
    kept_alive: Instant,
    keep_every: Duration,
}

impl Recorder {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gateway: Gateway,
        action: Action,
        provider: String,
        dialect: Dialect,
        status: u16,
        content_type: String,
        started: Instant,
    ) -> Self {
        Recorder {
            action,
            provider,
            status,
            content_type,
            started,
            first_chunk_ms: None,
            usage: SseUsage::new(dialect),
            kept: Vec::new(),
            bytes: 0,
            recorded: false,
            kept_alive: started,
            keep_every: gateway.job_settings().llm_recovery_margin / 2,
            gateway,
        }
    }

    /// A stream may run longer than the recovery job's deadline (the timeout bounds only the silence between
    /// chunks): every half margin, push the deadline on, off the stream's path.
    fn keep_alive(&mut self) {
        if self.kept_alive.elapsed() < self.keep_every {
            return;
        }
        self.kept_alive = Instant::now();
        let gateway = self.gateway.clone();
        let action = self.action.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = gateway.keep_inline(&action).await {
                    tracing::warn!(action = %action.id, error = %e, "cannot push on the recovery job of a model stream");
                }
            });
        }
    }

    fn chunk(&mut self, chunk: &[u8]) {
        if self.first_chunk_ms.is_none() {
            self.first_chunk_ms = Some(self.started.elapsed().as_millis());
        }
        self.keep_alive();
        self.bytes += chunk.len();
        self.usage.feed(chunk);
        let room = (MAX_RESULT_BODY_BYTES + 1).saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    fn outcome(&mut self, error: Option<String>) -> InlineOutcome {
        self.recorded = true;
        self.usage.finish();
        let mut details = Value::Object(self.usage.details());
        details["provider"] = json!(self.provider);
        details["streamed"] = json!(true);
        details["latency_ms"] = json!(self.started.elapsed().as_millis());
        details["first_chunk_ms"] = json!(self.first_chunk_ms);
        details["bytes"] = json!(self.bytes);
        details["completed"] = json!(self.usage.completed);
        let result = stored_result(self.status, &self.content_type, &self.kept, None);
        InlineOutcome { succeeded: error.is_none(), result: Some(result), error, details }
    }

    /// Records the outcome and waits until it is durable.
    async fn record(mut self, error: Option<String>) {
        let outcome = self.outcome(error);
        if let Err(e) = self.gateway.finish_inline(&self.action, outcome).await {
            tracing::error!(action = %self.action.id, error = %e, "cannot record a streamed model call");
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        let outcome = self
            .outcome(Some("the client disconnected before the stream ended; the provider call was cancelled".into()));
        let gateway = self.gateway.clone();
        let action = self.action.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = gateway.finish_inline(&action, outcome).await {
                    tracing::error!(action = %action.id, error = %e, "cannot record a disconnected model stream");
                }
            });
        }
    }
}

struct Relay {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    recorder: Option<Recorder>,
    idle: Duration,
    /// Set when the gateway asked an OpenAI stream for usage the client did not ask for.
    drop_usage: Option<UsageChunkFilter>,
}

/// Holds back the bytes of an unfinished server-sent event and drops the usage-only chunk the gateway
/// asked for, so the client gets the stream it asked for. Complete events pass at once.
#[derive(Default)]
struct UsageChunkFilter {
    pending: Vec<u8>,
}

impl UsageChunkFilter {
    fn pass(&mut self, chunk: &[u8]) -> Bytes {
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
        Bytes::from(out)
    }

    fn rest(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.pending))
    }
}

/// The length of the first complete event in `bytes`, its blank-line terminator included.
fn event_end(bytes: &[u8]) -> Option<usize> {
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The response body: the provider's bytes as they come; at the end the outcome is recorded (the agent
/// sees the end of the stream only after that). A provider that breaks off, or stays silent longer than
/// `idle`, ends the body with an error and the action failed.
///
/// `drop_usage`: the gateway added `include_usage` to an OpenAI stream; its usage chunk is read for the
/// record and not passed on.
pub fn relay(upstream: reqwest::Response, recorder: Recorder, idle: Duration, drop_usage: bool) -> Body {
    let state = Relay {
        upstream: upstream.bytes_stream().boxed(),
        recorder: Some(recorder),
        idle,
        drop_usage: drop_usage.then(UsageChunkFilter::default),
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        let mut recorder = state.recorder.take()?;
        match tokio::time::timeout(state.idle, state.upstream.next()).await {
            Ok(Some(Ok(chunk))) => {
                recorder.chunk(&chunk);
                state.recorder = Some(recorder);
                let chunk = match &mut state.drop_usage {
                    Some(filter) => filter.pass(&chunk),
                    None => chunk,
                };
                Some((Ok(chunk), state))
            }
            Ok(None) => {
                recorder.record(None).await;
                // What is left is an event the provider did not finish: passed on as it came.
                let rest = state.drop_usage.as_mut().map(UsageChunkFilter::rest).filter(|b| !b.is_empty())?;
                Some((Ok(rest), state))
            }
            Ok(Some(Err(e))) => {
                let message = format!("the provider's stream broke off: {e}");
                recorder.record(Some(message.clone())).await;
                Some((Err(std::io::Error::other(message)), state))
            }
            Err(_) => {
                let message = format!("the provider sent nothing for {}s", state.idle.as_secs());
                recorder.record(Some(message.clone())).await;
                Some((Err(std::io::Error::other(message)), state))
            }
        }
    });
    Body::from_stream(stream)
}
