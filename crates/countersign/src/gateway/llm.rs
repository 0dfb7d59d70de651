//! The gateway's side of the LLM proxy: a model request the proxy submitted inline is claimed and carried
//! out by the proxy's live connection (so it can stream), through the same claim → send → finish steps as
//! the execution job, so the audit trail is the same: `action.executing`, then `action.executed` or
//! `action.failed` with model, token usage, latency and status.
//!
//! Nothing here shapes HTTP responses; the proxy does. The provider key stays inside the connectors.

use std::time::Duration;

use countersign_core::domain::{Action, Target};
use countersign_core::ids::ActionId;
use countersign_core::state::ActionState;
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
    /// provider's timeout (which also bounds the wait between two streamed chunks).
    pub async fn send_inline(
        &self,
        action: &Action,
        stream: bool,
    ) -> std::result::Result<(reqwest::Response, Duration), ConnectorError> {
        match &action.target {
            Some(Target::Llm(llm)) => self.inner.connectors.send_llm(llm, action.id.as_str(), stream).await,
            _ => Err(ConnectorError::Invalid("not a model request".into())),
        }
    }

    /// Records how an inline execution ended (`action.executed` or `action.failed`); durable when it returns.
    pub async fn finish_inline(&self, action: &Action, outcome: InlineOutcome) -> Result<()> {
        let state = if outcome.succeeded { ActionState::Succeeded } else { ActionState::Failed };
        self.record(action, state, outcome.result, outcome.error, outcome.details).await
    }
}
