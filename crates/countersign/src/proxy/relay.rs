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
use crate::connectors::llm::{SseUsage, UsageChunkFilter, stored_result};
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
        // Outside a runtime (the process is ending) there is nothing to run it on.
        if tokio::runtime::Handle::try_current().is_ok() {
            gateway.clone().spawn_inline(async move {
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

    /// Records the outcome and waits until it is durable. An error when it could not be: the stream must
    /// then not end as if complete (the recovery job later ends the action "outcome unknown"). The record
    /// runs on a task of its own ([`super::finish`]): a client that hangs up while it waits makes hyper drop
    /// this body, and the record must not be cut off with it.
    async fn record(mut self, error: Option<String>) -> Result<(), std::io::Error> {
        let outcome = self.outcome(error);
        super::finish(&self.gateway, &self.action, outcome).await.map_err(|e| {
            tracing::error!(action = %self.action.id, error = %e, "cannot record a streamed model call");
            std::io::Error::other(format!("Countersign could not record this call's outcome: {e}"))
        })
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
        // Outside a runtime (the process is ending) there is nothing to run it on; the recovery job settles it.
        if tokio::runtime::Handle::try_current().is_ok() {
            gateway.clone().spawn_inline(async move {
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
                // The provider closed its stream: a success only if the stream said it was complete and
                // carried no error event (an overloaded provider sends one, then closes). Either way the
                // client gets the stream as it came.
                recorder.usage.finish();
                let failure = recorder.usage.failure();
                // Not durable: the body ends with an error, not as a complete answer.
                if let Err(e) = recorder.record(failure).await {
                    return Some((Err(e), state));
                }
                // What is left is an event the provider did not finish: passed on as it came.
                let rest = state.drop_usage.as_mut().map(UsageChunkFilter::rest).filter(|b| !b.is_empty())?;
                Some((Ok(rest), state))
            }
            Ok(Some(Err(e))) => {
                let message = format!("the provider's stream broke off: {}", e.without_url());
                // Ends with an error either way; a failed record is logged by `record`.
                recorder.record(Some(message.clone())).await.ok();
                Some((Err(std::io::Error::other(message)), state))
            }
            Err(_) => {
                let message = format!("the provider sent nothing for {}s", state.idle.as_secs());
                // Ends with an error either way; a failed record is logged by `record`.
                recorder.record(Some(message.clone())).await.ok();
                Some((Err(std::io::Error::other(message)), state))
            }
        }
    });
    Body::from_stream(stream)
}
