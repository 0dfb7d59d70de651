//! The gateway's side of the LLM proxy: a model request the proxy submitted inline is claimed and carried
//! out by the proxy's live connection (so it can stream), through the same claim → send → finish steps as
//! the execution job, so the audit trail is the same: `action.executing`, then `action.executed` or
//! `action.failed` with model, token usage, latency and status.
//!
//! The claim also makes the call recoverable: in its transaction the action's `action.execute` job becomes
//! (or is created as) a queued, lease-free recovery job due after the provider's timeout plus
//! `llm_recovery_margin`; the finish transaction settles it with the action's outcome. If the process dies
//! mid-call, the job runs later, finds the action `executing`, and ends it `failed` with `outcome unknown`,
//! audited, without a second send. A stream that outlives the first deadline pushes it on
//! ([`Gateway::keep_inline`]).
//!
//! **The claim's sync overlaps the call.** A model call's claim commit does not wait for its sync
//! ([`defers_claim_sync`]): it is written, ordered before every later commit and safe from a crash of the
//! process, and synced while the request goes out (the next durable commit's sync covers it, or one of its own
//! starts about 2 ms later; a stream's starts at once). Nothing reaches the client before the claim is on disk:
//! an answer waits for the finish's durable commit (whose sync covers the claim too), a stream for
//! [`Gateway::inline_durable`], awaited together with the send, before its first chunk. Only the request may
//! leave before that sync; a power loss in that window loses the record of a call whose answer no one received. A
//! tool call of the MCP gateway, whose side effects are the point, keeps a claim that is on disk before it is
//! sent.
//!
//! Nothing here shapes HTTP responses; the proxy does. The provider key stays inside the connectors.

use std::time::Duration;

use countersign_core::domain::{Action, Target};
use countersign_core::ids::ActionId;
use countersign_core::state::{ActionState, JobState};
use serde_json::Value;

use super::execute::Claim;
use super::{Caller, Gateway};
use crate::config::Dialect;
use crate::connectors::ConnectorError;
use crate::error::{Error, Result};

/// How an inline execution ended, as the proxy saw it.
#[derive(Debug, Clone)]
pub struct InlineOutcome {
    pub succeeded: bool,
    /// Stored on the action (status, headers, body capped, truncation flag).
    pub result: Option<Value>,
    pub error: Option<String>,
    /// Added to the finish audit event: model, usage, latency, streamed.
    pub details: Value,
}

/// Whether an inline claim's commit may return before its sync: a model call's only (see the module docs).
pub(super) fn defers_claim_sync(action: &Action) -> bool {
    matches!(action.target, Some(Target::Llm(_)))
}

impl Gateway {
    /// The dialect of a configured model provider; `None` for an unknown name.
    pub fn llm_dialect(&self, provider: &str) -> Option<Dialect> {
        self.inner.connectors.llm_dialect(provider)
    }

    /// The provider's model list, for an authenticated caller: no action, nothing decided.
    pub async fn llm_models(
        &self,
        _caller: &Caller,
        provider: &str,
    ) -> std::result::Result<(u16, String, Vec<u8>), ConnectorError> {
        self.inner.connectors.get_llm(provider, "/v1/models").await
    }

    /// Claims an approved model request for the caller's live connection (`approved` → `executing`,
    /// audited, after the binding check). `None`: someone else (the execution job) claimed it first, or it
    /// is no longer approved.
    pub async fn claim_inline(&self, caller: &Caller, id: &ActionId) -> Result<Option<Action>> {
        let action = self.get_action(caller, id).await?;
        if !matches!(action.target, Some(Target::Llm(_))) {
            return Err(Error::invalid("target", "only model requests are carried out inline"));
        }
        match self.claim(&action.org_id, id, false, true).await? {
            Claim::Send(action) => Ok(Some(*action)),
            Claim::Done => Ok(None),
        }
    }

    /// Sends a claimed model request; answers once the provider's status and headers are in, with the
    /// provider's timeout (which also bounds the wait between two streamed chunks). A relayed OpenAI stream
    /// asks for usage (see [`Gateway::llm_adds_stream_usage`]). The wait is observed as
    /// `countersign_llm_upstream_seconds`.
    pub async fn send_inline(
        &self,
        action: &Action,
        stream: bool,
    ) -> std::result::Result<(reqwest::Response, Duration), ConnectorError> {
        let Some(Target::Llm(llm)) = &action.target else {
            return Err(ConnectorError::Invalid("not a model request".into()));
        };
        // Observed as abandoned if the client hangs up first (hyper then drops this future).
        let wait = self.metrics().llm_upstream_wait(&llm.provider);
        let sent = self.inner.connectors.send_llm(llm, action.id.as_str(), stream, stream).await;
        wait.ended(sent.is_ok());
        sent
    }

    /// Returns once the claim of a model call (and every other commit so far) is on disk: its commit did not
    /// wait ([`defers_claim_sync`]), so a stream waits here (while its request is out) before the client gets
    /// its first chunk, as an answer waits for the finish's commit.
    pub async fn inline_durable(&self) -> Result<()> {
        Ok(self.inner.store.durable().await?)
    }

    /// Whether a relayed stream of this request has `include_usage` added, whose usage chunk the relay
    /// then holds back from the client.
    pub fn llm_adds_stream_usage(&self, target: &countersign_core::domain::LlmTarget) -> bool {
        self.inner.connectors.adds_stream_usage(target)
    }

    /// Pushes the recovery job of an inline execution still in flight (a long stream) past the provider's
    /// timeout and the margin again, from now. A no-op once the execution finished.
    pub async fn keep_inline(&self, action: &Action) -> Result<()> {
        let Some(job_id) = &action.job_id else { return Ok(()) };
        let due = self.now() + self.inline_recovery_delay(action);
        let mut work = self.write().await?;
        let Some(mut job) = work.tx.get_job(&action.org_id, job_id).await? else { return Ok(()) };
        if job.state != JobState::Queued || job.run_at >= due {
            return Ok(());
        }
        job.run_at = due;
        work.tx.update_job(&job).await?;
        work.job_changed(&job);
        work.commit(self).await
    }

    /// How long after a claim (or a [`Gateway::keep_inline`]) the recovery job of an inline execution is
    /// due: the provider's timeout (twice for a stream: once for the headers, once more for the first chunk)
    /// plus the margin.
    pub(super) fn inline_recovery_delay(&self, action: &Action) -> chrono::Duration {
        let (timeout, stream) = match &action.target {
            Some(Target::Llm(llm)) => (
                self.inner.connectors.llm_timeout(&llm.provider).unwrap_or(Duration::from_secs(120)),
                llm.body.get("stream").and_then(Value::as_bool).unwrap_or(false),
            ),
            Some(Target::Mcp(mcp)) => {
                (self.inner.connectors.mcp().timeout(&mcp.server).unwrap_or(Duration::from_secs(120)), false)
            }
            _ => (Duration::from_secs(120), false),
        };
        let timeout = if stream { timeout * 2 } else { timeout };
        chrono::Duration::from_std(timeout + self.inner.jobs.llm_recovery_margin)
            .unwrap_or_else(|_| chrono::Duration::hours(1))
    }

    /// Records how an inline execution ended (`action.executed` or `action.failed`) and settles its recovery
    /// job in the same transaction; durable when it returns.
    pub async fn finish_inline(&self, action: &Action, outcome: InlineOutcome) -> Result<()> {
        let state = if outcome.succeeded { ActionState::Succeeded } else { ActionState::Failed };
        self.record(action, state, outcome.result, outcome.error, outcome.details, true).await
    }
}
