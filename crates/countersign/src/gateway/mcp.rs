//! The gateway's side of the MCP gateway: a `tools/call` of an upstream MCP server becomes an action with
//! capability `mcp.NAME.tool` and the call's arguments as params, and an allowed one is carried out
//! through the same claim → send → finish steps as the execution job, so the audit trail is the same:
//! `action.executing`, then `action.executed` or `action.failed` with the server, tool and latency.
//!
//! An allowed call is submitted inline (no job) and carried out on the caller's own request, for latency;
//! its claim writes a recovery job, as for the LLM proxy, so a process that dies mid-call ends the action
//! `failed` with `outcome unknown` instead of sending it twice. A call held for approval is carried out by
//! the execution job the approval writes, and the waiting request answers with what it stored. Either way
//! the upstream sees the call at most once. Nothing here shapes MCP messages; `mcp/` does.

use std::time::{Duration, Instant};

use countersign_core::capability::Capability;
use countersign_core::domain::{Action, McpTarget, Target};
use countersign_core::ids::ActionId;
use countersign_core::state::ActionState;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::execute::Claim;
use super::{Caller, Gateway, SubmitOutcome, SubmitRequest};
use crate::connectors::ConnectorError;
use crate::connectors::mcp::McpUpstreams;
use crate::error::{Error, Result};

/// One upstream tool call as an agent made it.
#[derive(Debug, Clone)]
pub struct McpCall {
    pub server: String,
    pub tool: String,
    /// A JSON object.
    pub arguments: Value,
    /// Raw JSON text, kept verbatim.
    pub reasoning: String,
}

/// How a carried-out tool call ended, as stored on the action.
#[derive(Debug, Clone)]
pub struct McpOutcome {
    pub state: ActionState,
    /// The upstream's `CallToolResult` as JSON, when it answered.
    pub result: Option<Value>,
    pub error: Option<String>,
    /// Added to the finish audit event: server, tool, latency.
    pub details: Value,
}

/// The capability of upstream tool `tool` on server `server`: `mcp.<server>.<tool>`, lowercased, with every
/// character other than `a-z`, `0-9`, `_` and `-` turned into `_` (capability parts allow no others).
pub fn mcp_capability(server: &str, tool: &str) -> Result<Capability> {
    let part = |text: &str| -> String {
        text.chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' { c } else { '_' }
            })
            .collect()
    };
    Capability::parse(&format!("mcp.{}.{}", part(server), part(tool)))
        .map_err(|e| Error::invalid("tool", format!("no capability can be made of this tool's name: {e}")))
}

impl Gateway {
    /// Starts connecting to the configured upstream MCP servers, in the background, on `tracker`; they
    /// disconnect (a spawned one is killed) once `stop` is cancelled.
    pub fn start_mcp_upstreams(&self, stop: &CancellationToken, tracker: &TaskTracker) {
        self.inner.connectors.start_mcp(stop, tracker);
    }

    /// The upstream MCP servers and their cached tool lists.
    pub fn mcp_upstreams(&self) -> &McpUpstreams {
        self.inner.connectors.mcp()
    }

    /// Waits until upstream `server` is connected with its tools listed (or `timeout` passes).
    pub async fn mcp_upstream_ready(&self, server: &str, timeout: Duration) -> bool {
        self.mcp_upstreams().wait_connected(server, timeout).await
    }

    /// Submits an upstream tool call: evaluated like any action (session scopes first). Allowed, it is
    /// claimed for the caller as it is submitted (`claimed: true`) and the caller carries it out at once
    /// ([`Gateway::execute_mcp_inline`]). Held, the approval writes its execution job.
    pub async fn submit_mcp(&self, caller: &Caller, call: McpCall) -> Result<SubmitOutcome> {
        let capability = mcp_capability(&call.server, &call.tool)?;
        let target = McpTarget { server: call.server, tool: call.tool, arguments: call.arguments.clone() };
        self.submit_inline(
            caller,
            SubmitRequest {
                capability,
                params: call.arguments,
                reasoning: call.reasoning,
                target: Some(Target::Mcp(target)),
                idempotency_key: None,
            },
        )
        .await
    }

    /// Claims an allowed tool call for the caller's request (`approved` → `executing`, audited, with its
    /// recovery job). `None`: the execution job claimed it first, or it is no longer approved.
    pub async fn claim_mcp_inline(&self, caller: &Caller, id: &ActionId) -> Result<Option<Action>> {
        let action = self.get_action(caller, id).await?;
        if !matches!(action.target, Some(Target::Mcp(_))) {
            return Err(Error::invalid("target", "only MCP tool calls are carried out here"));
        }
        match self.claim(&action.org_id, id, false, true).await? {
            Claim::Send(action) => Ok(Some(*action)),
            Claim::Done => Ok(None),
        }
    }

    /// Sends a claimed tool call and records its outcome (settling the recovery job) before answering. Runs
    /// on a task of its own, so a client that goes away meanwhile cannot cut the record off halfway.
    pub async fn execute_mcp_inline(&self, action: &Action) -> Result<McpOutcome> {
        let (gateway, action) = (self.clone(), action.clone());
        self.spawn_inline(async move {
            let outcome = gateway.send_mcp(&action).await;
            gateway
                .record(
                    &action,
                    outcome.state,
                    outcome.result.clone(),
                    outcome.error.clone(),
                    outcome.details.clone(),
                    true,
                )
                .await?;
            Ok(outcome)
        })
        .await
        .map_err(|e| Error::Internal(format!("carrying out a tool call stopped: {e}")))?
    }

    /// Calls the upstream once; never fails: every way it can end is an outcome to record.
    pub(super) async fn send_mcp(&self, action: &Action) -> McpOutcome {
        let Some(Target::Mcp(target)) = &action.target else {
            return McpOutcome {
                state: ActionState::Failed,
                result: None,
                error: Some("not an MCP tool call".into()),
                details: json!({}),
            };
        };
        let started = Instant::now();
        let answer = self.mcp_upstreams().call(&target.server, &target.tool, &target.arguments).await;
        let details = |extra: Value| {
            let mut details = json!({"server": target.server, "tool": target.tool,
                                     "latency_ms": started.elapsed().as_millis()});
            if let (Some(details), Value::Object(extra)) = (details.as_object_mut(), extra) {
                details.extend(extra);
            }
            details
        };
        match answer {
            Ok(result) => {
                let is_error = result.is_error.unwrap_or(false);
                let (stored, cut_from) = stored_result(&result);
                let mut extra = json!({});
                if let Some(bytes) = cut_from {
                    extra = json!({"result_truncated": true, "result_bytes": bytes});
                }
                if is_error {
                    let error = format!("MCP server `{}` answered `{}` with a tool error", target.server, target.tool);
                    extra["tool_error"] = json!(true);
                    McpOutcome {
                        state: ActionState::Failed,
                        result: Some(stored),
                        error: Some(error),
                        details: details(extra),
                    }
                } else {
                    McpOutcome {
                        state: ActionState::Succeeded,
                        result: Some(stored),
                        error: None,
                        details: details(extra),
                    }
                }
            }
            Err(error) => {
                // Sent and then cut off, or timed out: the tool may have run. Otherwise it was never sent.
                let reason = match error {
                    ConnectorError::OutcomeUnknown(_) | ConnectorError::Timeout(_) => "outcome_unknown",
                    _ => "upstream_unavailable",
                };
                McpOutcome {
                    state: ActionState::Failed,
                    result: None,
                    error: Some(error.to_string()),
                    details: details(json!({"reason": reason})),
                }
            }
        }
    }
}

/// The largest tool result, as JSON, that is stored on the action (and so answered) whole.
pub const MAX_MCP_RESULT_BYTES: usize = 1024 * 1024;

/// A tool result as stored on its action, and answered from there: whole when its JSON fits
/// [`MAX_MCP_RESULT_BYTES`]. A bigger one keeps its text blocks, cut to fit, drops its other content blocks
/// and its structured content, and ends with a text block saying so; the second value is then the size of
/// the whole result.
fn stored_result(result: &rmcp::model::CallToolResult) -> (Value, Option<usize>) {
    use rmcp::model::{CallToolResult, ContentBlock};
    let whole = serde_json::to_value(result).unwrap_or(Value::Null);
    let size = serde_json::to_vec(&whole).map_or(usize::MAX, |bytes| bytes.len());
    if size <= MAX_MCP_RESULT_BYTES {
        return (whole, None);
    }
    // Room for the note; then less text until the JSON fits (escaping can make text longer than it is).
    let mut budget = MAX_MCP_RESULT_BYTES - 1024;
    loop {
        let mut left = budget;
        let mut content = Vec::new();
        let (mut dropped, mut cut) = (0usize, false);
        for block in &result.content {
            match block.as_text() {
                Some(text) => {
                    let kept = &text.text[..text.text.floor_char_boundary(left)];
                    left -= kept.len();
                    cut |= kept.len() < text.text.len();
                    if !kept.is_empty() {
                        content.push(ContentBlock::text(kept.to_owned()));
                    }
                }
                None => dropped += 1,
            }
        }
        let mut what = Vec::new();
        if cut {
            what.push("its text was cut to fit".to_owned());
        }
        if dropped > 0 {
            what.push(format!("{dropped} content block(s) other than text were dropped"));
        }
        if result.structured_content.is_some() {
            what.push("its structured content was dropped".to_owned());
        }
        content.push(ContentBlock::text(format!(
            "[Countersign: the tool's result was {size} bytes, over the gateway's limit of {MAX_MCP_RESULT_BYTES}: {}]",
            what.join("; ")
        )));
        let cut = if result.is_error == Some(true) {
            CallToolResult::error(content)
        } else {
            CallToolResult::success(content)
        };
        let value = serde_json::to_value(&cut).unwrap_or(Value::Null);
        if serde_json::to_vec(&value).is_ok_and(|bytes| bytes.len() <= MAX_MCP_RESULT_BYTES) || budget == 0 {
            return (value, Some(size));
        }
        budget /= 2;
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::{MAX_MCP_RESULT_BYTES, mcp_capability, stored_result};
    use rmcp::model::{CallToolResult, ContentBlock};
    use serde_json::json;

    fn json_len(value: &serde_json::Value) -> usize {
        serde_json::to_vec(value).map(|b| b.len()).unwrap_or(usize::MAX)
    }

    #[test]
    fn a_tool_result_within_the_limit_is_stored_whole() {
        let mut result = CallToolResult::success(vec![ContentBlock::text("fine")]);
        result.structured_content = Some(json!({"ok": true}));
        let (stored, cut) = stored_result(&result);
        assert_eq!(cut, None);
        assert_eq!(stored, serde_json::to_value(&result).unwrap_or_default());
    }

    #[test]
    fn a_tool_result_over_the_limit_is_cut_to_fit_and_says_so() {
        let big = "ab".repeat(MAX_MCP_RESULT_BYTES);
        let mut result = CallToolResult::error(vec![
            ContentBlock::text(big.clone()),
            ContentBlock::image("aGk=", "image/png"),
            ContentBlock::text("tail"),
        ]);
        result.structured_content = Some(json!({"rows": big}));
        let (stored, cut) = stored_result(&result);
        assert!(cut.is_some_and(|bytes| bytes > 4 * MAX_MCP_RESULT_BYTES), "{cut:?}");
        assert!(json_len(&stored) <= MAX_MCP_RESULT_BYTES, "stored {} bytes", json_len(&stored));
        assert_eq!(stored["isError"], true);
        assert!(stored.get("structuredContent").is_none(), "structured content kept");
        let content = stored["content"].as_array().map(Vec::as_slice).unwrap_or_default();
        let first = content[0]["text"].as_str().unwrap_or_default();
        assert!(first.len() > MAX_MCP_RESULT_BYTES / 2 && big.starts_with(first), "{} bytes kept", first.len());
        let note = content.last().and_then(|c| c["text"].as_str()).unwrap_or_default();
        assert!(note.contains("over the gateway's limit") && note.contains("1 content block(s)"), "{note}");
        assert!(note.contains("text was cut") && note.contains("structured content was dropped"), "{note}");

        // Text that grows when escaped still fits, and a cut never splits a character.
        let escaped = CallToolResult::success(vec![ContentBlock::text("\u{1}é".repeat(MAX_MCP_RESULT_BYTES))]);
        let (stored, cut) = stored_result(&escaped);
        assert!(cut.is_some());
        assert!(json_len(&stored) <= MAX_MCP_RESULT_BYTES, "stored {} bytes", json_len(&stored));
        assert_eq!(stored["isError"], false);
    }

    #[test]
    fn capabilities_are_made_of_server_and_tool_names() {
        let made = |s: &str, t: &str| mcp_capability(s, t).map(|c| c.as_str().to_owned()).unwrap_or_default();
        assert_eq!(made("github", "create_issue"), "mcp.github.create_issue");
        assert_eq!(made("GitHub", "Files.Read"), "mcp.github.files_read");
        assert_eq!(made("fs-1", "läs fil"), "mcp.fs-1.l_s_fil");
    }
}
