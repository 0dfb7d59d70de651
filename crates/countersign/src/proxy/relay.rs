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

/// Holds back the bytes of an unfinished server-sent event and drops the usage-only chunk the gateway
/// asked for, so the client gets the stream it asked for. Complete events pass at once. An event that grows
/// past [`MAX_PENDING_EVENT`] without ending turns the filter off: from then on bytes pass as they come.
#[derive(Default)]
struct UsageChunkFilter {
    pending: Vec<u8>,
    off: bool,
}

/// The most an unfinished event is held back.
const MAX_PENDING_EVENT: usize = 64 * 1024;

impl UsageChunkFilter {
    fn pass(&mut self, chunk: &[u8]) -> Bytes {
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
    fn rest(&mut self) -> Bytes {
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
                // Not durable: the body ends with an error, not as a complete answer.
                if let Err(e) = recorder.record(None).await {
                    return Some((Err(e), state));
                }
                // What is left is an event the provider did not finish: passed on as it came.
                let rest = state.drop_usage.as_mut().map(UsageChunkFilter::rest).filter(|b| !b.is_empty())?;
                Some((Ok(rest), state))
            }
            Ok(Some(Err(e))) => {
                let message = format!("the provider's stream broke off: {e}");
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{MAX_PENDING_EVENT, UsageChunkFilter, event_end};

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
}
