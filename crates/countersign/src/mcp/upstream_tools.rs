//! The MCP gateway's front: the tools of every upstream MCP server, offered on `/mcp` as `NAME__tool` with
//! the upstream's description and input schema, and each call turned into an action through the gateway.
//!
//! Allowed: carried out at once on this request, answered with the upstream's `CallToolResult` as it is.
//! Denied: a tool error naming the rule and its message. Held for approval: the request waits for the
//! decision (up to the approval's deadline, at most [`DEFAULT_HOLD`] unless `_meta.countersign_wait` says
//! otherwise), then answers with the upstream's result (the approval's execution job made the call), a tool
//! error on deny or expiry, or, still pending, a result saying how to wait (`wait_action`, or the action's
//! resource). An unknown tool or arguments that do not fit the tool's schema are JSON-RPC errors, and
//! nothing is recorded. Adapter only: policy, state and audit are the gateway's.

use std::time::Duration;

use countersign_core::domain::{Action, Approval, Target};
use countersign_core::state::ActionState;
use rmcp::ErrorData;
use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock, JsonObject, RequestMetaObject, Tool};
use serde_json::{Value, json};

use super::Secret;
use super::server::{next_steps, rpc_error};
use crate::connectors::Service;
use crate::error::Error;
use crate::gateway::{Caller, Gateway, McpCall, WaitSlot};
use crate::http::views;

/// Between the server's name and the tool's in the names `/mcp` shows (server names never contain it).
pub const SEPARATOR: &str = "__";
/// How long a held call waits for its decision by default: under the 60 s many MCP clients give a request.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(50);
/// The longest hold `_meta.countersign_wait` may ask for.
const MAX_HOLD: Duration = crate::gateway::MAX_WAIT;

/// Every upstream tool the caller's org may use (its server's `orgs`), renamed `NAME__tool`.
pub async fn listed(gateway: &Gateway, caller: &Caller) -> Result<Vec<Tool>, Error> {
    let mut listed = Vec::new();
    for (server, tools) in gateway.mcp_upstreams().tools() {
        if !gateway.serves(caller.org_id(), Service::Mcp(&server)).await? {
            continue;
        }
        for tool in tools.iter() {
            listed.push(shown(tool.clone(), format!("{server}{SEPARATOR}{}", tool.name)));
        }
    }
    Ok(listed)
}

/// The upstream tool behind a `NAME__tool` name, renamed as `/mcp` shows it.
pub fn find(gateway: &Gateway, name: &str) -> Option<Tool> {
    let (server, tool) = name.split_once(SEPARATOR)?;
    Some(shown(gateway.mcp_upstreams().tool(server, tool)?, name.to_owned()))
}

/// An upstream tool as `/mcp` shows it: renamed, and without its output schema, since a held call answers
/// with the gateway's own structured content (pending, how to wait), which a client would check against it.
fn shown(mut tool: Tool, name: String) -> Tool {
    tool.name = name.into();
    tool.output_schema = None;
    tool
}

fn unknown_tool(name: &str) -> ErrorData {
    ErrorData::invalid_params(
        format!("unknown tool `{name}`: call tools/list for the tools this server offers"),
        Some(json!({"tool": name})),
    )
}

/// A tools/call of `NAME__tool`, governed; any other name is an unknown tool. `meta` is the request's
/// `_meta` (rmcp moves it from the params into the request context).
pub async fn call(
    gateway: &Gateway,
    caller: &Caller,
    secret: Option<&Secret>,
    request: CallToolRequestParams,
    meta: &RequestMetaObject,
) -> Result<CallToolResult, ErrorData> {
    let name = request.name.to_string();
    let Some((server, tool)) = name.split_once(SEPARATOR) else { return Err(unknown_tool(&name)) };
    let upstreams = gateway.mcp_upstreams();
    // A server this org may not use is as unknown as one that is not configured (which serves no one).
    if !gateway.serves(caller.org_id(), Service::Mcp(server)).await.map_err(|e| rpc_error(&e))? {
        return Err(unknown_tool(&name));
    }
    let arguments = request.arguments.clone().unwrap_or_default();
    // Connected, the upstream's list is known: a tool it does not list is unknown, and the arguments
    // must fit the tool's schema. Down, the call is recorded and fails saying the upstream is unavailable.
    if upstreams.unavailable(server).is_none() {
        let Some(known) = upstreams.tool(server, tool) else { return Err(unknown_tool(&name)) };
        check_arguments(&known.input_schema, &arguments).map_err(|message| {
            ErrorData::invalid_params(format!("arguments of `{name}` do not fit its input schema: {message}"), None)
        })?;
    }
    let meta = request.meta.as_ref().unwrap_or(meta);
    let meta = Some(&meta.0.0);
    let reasoning = match meta.and_then(|m| m.get("reasoning")) {
        Some(Value::Null) | None => json!({"source": "mcp-gateway"}).to_string(),
        Some(value) => value.to_string(),
    };
    let hold = match meta.and_then(|m| m.get("countersign_wait")) {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_f64().map(|s| crate::gateway::wait_seconds("_meta.countersign_wait", s)) {
            Some(Ok(hold)) => Some(hold),
            _ => {
                return Err(ErrorData::invalid_params(
                    "_meta.countersign_wait must be a number of seconds, 0 or more",
                    None,
                ));
            }
        },
    };
    let call =
        McpCall { server: server.to_owned(), tool: tool.to_owned(), arguments: Value::Object(arguments), reasoning };
    Ok(governed(gateway, caller, secret, &name, call, hold).await.unwrap_or_else(|e| gateway_error(&e)))
}

async fn governed(
    gateway: &Gateway,
    caller: &Caller,
    secret: Option<&Secret>,
    name: &str,
    call: McpCall,
    hold: Option<Duration>,
) -> Result<CallToolResult, Error> {
    let outcome = gateway.submit_mcp(caller, call).await?;
    let action = outcome.action;
    match action.state {
        ActionState::Executing if outcome.claimed => {
            // Allowed, and claimed for this request as it was submitted.
            let done = gateway.execute_mcp_inline(&action).await?;
            Ok(answer_of(name, &action, done.state, done.result.as_ref(), done.error.as_deref()))
        }
        ActionState::Approved => match gateway.claim_mcp_inline(caller, &action.id).await? {
            Some(claimed) => {
                // Recorded before it answers: the result is the one stored on the action.
                let outcome = gateway.execute_mcp_inline(&claimed).await?;
                Ok(answer_of(name, &claimed, outcome.state, outcome.result.as_ref(), outcome.error.as_deref()))
            }
            None => finished(gateway, caller, secret, name, &action, MAX_HOLD, None).await,
        },
        ActionState::PendingApproval => {
            let until_expiry = outcome
                .approval
                .as_ref()
                .map(|a| (a.expires_at - gateway.now()).to_std().unwrap_or_default())
                .unwrap_or_default();
            // A little past the deadline, so an expiry lands while this request still waits.
            let limit = hold.unwrap_or(DEFAULT_HOLD).min(until_expiry + Duration::from_secs(1));
            // The hold is one of the agent's open waits, through the wait for the job's answer. Over the limit
            // (or asked not to wait) it answers pending at once, with how to wait for it later.
            let slot = if limit.is_zero() { None } else { gateway.open_wait(caller).ok() };
            let decided = match &slot {
                None => action.clone(),
                Some(slot) => {
                    let decided = gateway
                        .wait_action_holding(slot, caller, &action.id, limit, |a| {
                            a.state != ActionState::PendingApproval
                        })
                        .await?;
                    // A credential revoked during the hold gets no answer (the approved call is the job's).
                    super::server::still_stands(gateway, secret).await?;
                    decided
                }
            };
            match decided.state {
                ActionState::PendingApproval => Ok(pending(name, &decided, outcome.approval.as_ref())),
                ActionState::Approved | ActionState::Executing | ActionState::Succeeded | ActionState::Failed => {
                    // The approval's execution job makes the call; its answer is what it stored.
                    let timeout = gateway.mcp_upstreams().timeout(&call_server(&decided)).unwrap_or(DEFAULT_HOLD);
                    let limit = timeout + Duration::from_secs(5);
                    finished(gateway, caller, secret, name, &decided, limit, slot.as_ref()).await
                }
                _ => Ok(refused(name, &decided)),
            }
        }
        _ => Ok(refused(name, &action)),
    }
}

fn call_server(action: &Action) -> String {
    match &action.target {
        Some(Target::Mcp(mcp)) => mcp.server.clone(),
        _ => String::new(),
    }
}

/// Waits for an approved call that the execution job carries out, then answers what it stored. `slot`: the
/// hold's open wait; without one, and over the agent's open waits, it answers that the call is being carried
/// out (with how to wait for it) rather than an error that would invite the call again.
async fn finished(
    gateway: &Gateway,
    caller: &Caller,
    secret: Option<&Secret>,
    name: &str,
    action: &Action,
    limit: Duration,
    slot: Option<&WaitSlot>,
) -> Result<CallToolResult, Error> {
    let done = match slot {
        Some(slot) => gateway.wait_action_holding(slot, caller, &action.id, limit, Action::is_terminal).await?,
        None => match gateway.wait_action(caller, &action.id, limit).await {
            Err(Error::RateLimited { .. }) => action.clone(),
            done => done?,
        },
    };
    // Only to a credential that still stands after that wait.
    super::server::still_stands(gateway, secret).await?;
    if !done.is_terminal() {
        let mut body = json!({
            "action_id": done.id,
            "state": done.state,
            "message": format!("`{name}` was approved and is being carried out (action {})", done.id),
        });
        body["next"] = next_steps(&done);
        return Ok(CallToolResult::structured(body));
    }
    Ok(stored_answer(name, &done))
}

/// A finished call as stored on the action.
fn stored_answer(name: &str, action: &Action) -> CallToolResult {
    answer_of(name, action, action.state, action.result.as_ref(), action.error.as_deref())
}

/// A finished call: the upstream's own result when it answered, else a tool error saying why not.
fn answer_of(
    name: &str,
    action: &Action,
    state: ActionState,
    result: Option<&Value>,
    error: Option<&str>,
) -> CallToolResult {
    if let Some(result) = result.and_then(|r| serde_json::from_value::<CallToolResult>(r.clone()).ok()) {
        return result;
    }
    match state {
        ActionState::Succeeded => CallToolResult::success(Vec::new()),
        ActionState::Failed => {
            let why = error.unwrap_or("the call failed");
            tool_error(
                format!("Countersign: `{name}` failed: {why} (action {})", action.id),
                json!({"action_id": action.id, "state": state, "error": why}),
            )
        }
        _ => refused(name, action),
    }
}

/// A tool error for every way an action ends without being carried out, naming the rule.
fn refused(name: &str, action: &Action) -> CallToolResult {
    let verdict = action.verdict.as_ref();
    let rule = verdict.map(|v| v.rule.clone()).unwrap_or_else(|| "default".into());
    let message = match action.state {
        ActionState::Denied if action.approval_id.is_some() => {
            format!("Countersign: an approver denied `{name}` (held by rule `{rule}`); action {}", action.id)
        }
        ActionState::Expired => format!(
            "Countersign: the approval of `{name}` for rule `{rule}` expired before anyone decided; action {}",
            action.id
        ),
        ActionState::Cancelled => format!("Countersign: `{name}` was cancelled (rule `{rule}`); action {}", action.id),
        _ => {
            let why = verdict.and_then(|v| v.message.clone()).unwrap_or_else(|| "the policy denies this call".into());
            format!("Countersign denied `{name}` by rule `{rule}`: {why} (action {})", action.id)
        }
    };
    let (_, problem) =
        Error::PolicyDenied { rule, action_id: action.id.to_string(), message: message.clone() }.problem();
    let mut problem = problem;
    problem["state"] = json!(action.state);
    tool_error(message, problem)
}

/// Still pending: not an error; says how to wait.
fn pending(name: &str, action: &Action, approval: Option<&Approval>) -> CallToolResult {
    let verdict = action.verdict.as_ref();
    let rule = verdict.map(|v| v.rule.as_str()).unwrap_or("default");
    let why = verdict.and_then(|v| v.message.clone()).unwrap_or_else(|| "this call needs a human approval".into());
    let approval_view = match approval {
        Some(approval) => views::approval(approval),
        None => json!({"id": action.approval_id}),
    };
    CallToolResult::structured(json!({
        "action_id": action.id,
        "state": "pending_approval",
        "message": format!(
            "Countersign holds `{name}` for approval by rule `{rule}`: {why}. The call is made once approved; \
             follow action {} to get its result", action.id
        ),
        "rule": rule,
        "approval": approval_view,
        "next": next_steps(action),
    }))
}

fn tool_error(message: String, structured: Value) -> CallToolResult {
    let mut result = CallToolResult::error(vec![ContentBlock::text(message)]);
    result.structured_content = Some(structured);
    result
}

/// A gateway refusal (scope, validation, store) as a tool error carrying the problem body.
fn gateway_error(error: &Error) -> CallToolResult {
    let (_, problem) = error.problem();
    let detail = problem.get("detail").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| error.to_string());
    tool_error(format!("Countersign: {detail}"), problem)
}

/// Checks the arguments against what every schema states plainly: the required properties are present,
/// and present properties have the declared JSON type. The upstream validates the rest.
fn check_arguments(schema: &JsonObject, arguments: &JsonObject) -> Result<(), String> {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        let missing: Vec<&str> =
            required.iter().filter_map(Value::as_str).filter(|key| !arguments.contains_key(*key)).collect();
        if !missing.is_empty() {
            return Err(format!(
                "missing required {}",
                missing.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else { return Ok(()) };
    for (key, value) in arguments {
        let Some(declared) = properties.get(key).and_then(|p| p.get("type")) else { continue };
        let types: Vec<&str> = match declared {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        if !types.is_empty() && !types.iter().any(|t| has_type(value, t)) {
            return Err(format!("`{key}` must be of type {}", types.join(" or ")));
        }
    }
    if schema.get("additionalProperties") == Some(&Value::Bool(false))
        && let Some(extra) = arguments.keys().find(|key| !properties.contains_key(*key))
    {
        return Err(format!("`{extra}` is not a property of this tool"));
    }
    Ok(())
}

fn has_type(value: &Value, json_type: &str) -> bool {
    match json_type {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "null" => value.is_null(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::check_arguments;
    use serde_json::json;

    fn object(value: serde_json::Value) -> rmcp::model::JsonObject {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn arguments_are_checked_against_the_plain_parts_of_the_schema() {
        let schema = object(json!({
            "type": "object",
            "properties": {"to": {"type": "string"}, "cents": {"type": "integer"}, "note": {"type": ["string", "null"]}},
            "required": ["to", "cents"],
            "additionalProperties": false,
        }));
        assert!(check_arguments(&schema, &object(json!({"to": "bob", "cents": 5}))).is_ok());
        assert!(check_arguments(&schema, &object(json!({"to": "bob", "cents": 5, "note": null}))).is_ok());
        let missing = check_arguments(&schema, &object(json!({"to": "bob"}))).err().unwrap_or_default();
        assert!(missing.contains("`cents`"), "{missing}");
        let typed = check_arguments(&schema, &object(json!({"to": 7, "cents": 5}))).err().unwrap_or_default();
        assert!(typed.contains("`to` must be of type string"), "{typed}");
        let extra = check_arguments(&schema, &object(json!({"to": "b", "cents": 1, "x": 1}))).err().unwrap_or_default();
        assert!(extra.contains("`x`"), "{extra}");
        assert!(check_arguments(&object(json!({})), &object(json!({"anything": 1}))).is_ok());
    }
}
