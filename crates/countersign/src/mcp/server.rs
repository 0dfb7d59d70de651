//! The MCP server handler: the six tools over the gateway, the tools of the upstream MCP servers
//! (`NAME__tool`, see `upstream_tools`), and the subscribable action resources.
//!
//! Gateway errors become tool errors (`isError: true`) whose structured content is the same problem body
//! the REST API answers, so an agent sees the rule that denied it, the scope it lacks or the id it got
//! wrong. Malformed arguments and unknown tools are JSON-RPC errors, raised by rmcp.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::request::Parts;
use countersign_core::capability::Capability;
use countersign_core::domain::{Action, Target};
use countersign_core::ids::{ActionId, JobId};
use countersign_core::state::ActionState;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::{Extension, ToolCallContext};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, ListResourceTemplatesResult,
    ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult,
    ResourceContents, ResourceTemplate, ResourceUpdatedNotificationParam, ServerCapabilities, ServerConfig,
    SubscribeRequestParams, Tool, UnsubscribeRequestParams,
};
use rmcp::service::{MaybeSendFuture, NotificationContext, RequestContext};
use rmcp::{ErrorData, Peer, RoleServer, ServerHandler, schemars, tool, tool_handler, tool_router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Secret, upstream_tools};
use crate::error::Error;
use crate::gateway::{Caller, Gateway, SubmitOutcome, SubmitRequest, WaitSlot};
use crate::http::views;

const RESOURCE_PREFIX: &str = "countersign://actions/";
/// How long `wait_action` holds when the agent names no timeout; MCP clients commonly give up at 60 s.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitActionArgs {
    /// The capability to exercise, dotted, e.g. `payments.refund`.
    pub capability: String,
    /// The action's parameters, a JSON object the policy matches on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Map<String, Value>>,
    /// Why the agent wants this: any JSON (a string or an object), kept verbatim for the approver and the audit.
    pub reasoning: Value,
    /// Where an allowed action is carried out (a connector and its settings); omit to only ask permission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Value>,
    /// Makes a retried submission return the first one instead of creating another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionIdArgs {
    /// The action id returned by `submit_action`.
    pub id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitActionArgs {
    /// The action id returned by `submit_action`.
    pub id: String,
    /// How long to wait for a decision or result, in seconds (default 30, at most 600). Keep it under your
    /// client's request timeout; call again if the action is still pending.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListJobsArgs {
    /// Only jobs of this kind, e.g. `execute_action`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Only jobs in this state: queued, running, succeeded, failed or cancelled.
    #[serde(default)]
    pub state: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[serde(default)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobIdArgs {
    /// The job id.
    pub id: String,
}

/// One MCP session's handler; rmcp makes one per session.
#[derive(Clone)]
pub struct McpServer {
    gateway: Gateway,
    tool_router: ToolRouter<Self>,
    /// Live resource subscriptions of this session, by URI.
    subscriptions: Arc<Mutex<HashMap<String, CancellationToken>>>,
    /// Cancelled when the last clone of this session's handler is dropped: ends the task that forwards
    /// upstream tool list changes.
    ended: CancellationToken,
    _ended_on_drop: Arc<DropGuard>,
}

impl Drop for McpServer {
    fn drop(&mut self) {
        // The last clone of a session's handler ends its subscriptions.
        if Arc::strong_count(&self.subscriptions) == 1
            && let Ok(subs) = self.subscriptions.lock()
        {
            subs.values().for_each(CancellationToken::cancel);
        }
    }
}

fn caller_in(parts: &Parts) -> Result<Caller, ErrorData> {
    parts
        .extensions
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| ErrorData::internal_error("the request reached MCP without an authenticated caller", None))
}

fn caller_of(context: &RequestContext<RoleServer>) -> Result<(Caller, Option<Secret>), ErrorData> {
    let parts = context
        .extensions
        .get::<Parts>()
        .ok_or_else(|| ErrorData::internal_error("the request reached MCP without its HTTP parts", None))?;
    Ok((caller_in(parts)?, secret_in(parts)))
}

fn secret_in(parts: &Parts) -> Option<Secret> {
    parts.extensions.get::<Secret>().cloned()
}

/// After a wait: the credential must still stand for the caller (see [`Gateway::still_stands`]); a request
/// without its secret, which the authentication in front always adds, is refused as well.
pub(super) async fn still_stands(gateway: &Gateway, secret: Option<&Secret>) -> Result<(), Error> {
    let secret = secret.ok_or_else(|| Error::Internal("the request reached MCP without its credential".into()))?;
    gateway.still_stands(&secret.0).await
}

/// A gateway error as a tool error carrying the problem body.
fn tool_error(error: &Error) -> CallToolResult {
    let (_, problem) = error.problem();
    CallToolResult::structured_error(problem)
}

fn parse_action_id(id: &str) -> Result<ActionId, Error> {
    ActionId::parse(id).ok_or_else(|| Error::not_found("action", id))
}

fn resource_uri(id: &ActionId) -> String {
    format!("{RESOURCE_PREFIX}{id}")
}

/// The action as the REST API shows it, plus how to follow it when it is not finished.
fn action_result(gateway: &Gateway, outcome: &SubmitOutcome) -> CallToolResult {
    let action = &outcome.action;
    let mut body = views::action(gateway, action, outcome.approval.as_ref(), outcome.token.as_deref());
    if action.state == ActionState::Denied {
        let verdict = action.verdict.as_ref();
        let rule = verdict.map(|v| v.rule.clone()).unwrap_or_default();
        let message = if action.approval_id.is_some() {
            format!("action {} was denied by an approver", action.id)
        } else {
            let why = verdict.and_then(|v| v.message.clone()).unwrap_or_else(|| "the policy denies this action".into());
            format!("denied by rule `{rule}`: {why}")
        };
        let (_, mut problem) = Error::PolicyDenied { rule, action_id: action.id.to_string(), message }.problem();
        problem["action"] = body;
        return CallToolResult::structured_error(problem);
    }
    if !action.is_terminal() {
        body["next"] = next_steps(action);
    }
    CallToolResult::structured(body)
}

pub(super) fn next_steps(action: &Action) -> Value {
    let waiting_for = if matches!(action.state, ActionState::Submitted | ActionState::PendingApproval) {
        "a human approval"
    } else {
        "its execution"
    };
    json!({
        "message": format!(
            "action {} is {} and waiting for {waiting_for}; call `wait_action` with {{\"id\": \"{}\", \"timeout_seconds\": 30}} \
             (repeat while it stays pending), or subscribe to resource {} for an update notification",
            action.id, action.state.as_str(), action.id, resource_uri(&action.id)
        ),
        "tool": "wait_action",
        "arguments": {"id": action.id, "timeout_seconds": 30},
        "resource": resource_uri(&action.id),
    })
}

fn submit_request(args: &SubmitActionArgs) -> Result<SubmitRequest, Error> {
    let capability = Capability::parse(&args.capability).map_err(|e| Error::invalid("capability", e.to_string()))?;
    let params = Value::Object(args.params.clone().unwrap_or_default());
    let target = match &args.target {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            serde_json::from_value::<Target>(value.clone())
                .map_err(|e| Error::bad_request("target", format!("invalid target: {e}")))?,
        ),
    };
    if let Some(key) = &args.idempotency_key
        && (key.is_empty() || key.len() > 255)
    {
        return Err(Error::bad_request("idempotency_key", "must be 1 to 255 characters"));
    }
    Ok(SubmitRequest {
        capability,
        params,
        reasoning: args.reasoning.to_string(),
        target,
        idempotency_key: args.idempotency_key.clone(),
    })
}

fn answer(result: Result<CallToolResult, Error>) -> Result<CallToolResult, ErrorData> {
    Ok(result.unwrap_or_else(|e| tool_error(&e)))
}

#[tool_router]
impl McpServer {
    pub fn new(gateway: Gateway) -> Self {
        let ended = CancellationToken::new();
        Self {
            gateway,
            tool_router: Self::tool_router(),
            subscriptions: Arc::new(Mutex::new(HashMap::new())),
            _ended_on_drop: Arc::new(ended.clone().drop_guard()),
            ended,
        }
    }

    async fn outcome_of(&self, action: Action) -> Result<SubmitOutcome, Error> {
        let approval = self.gateway.approval_of(&action).await?;
        Ok(SubmitOutcome { action, approval, token: None, replayed: false, claimed: false, slot: None })
    }

    #[tool(description = "Ask Countersign for permission to perform an action (and, with a target, to carry it out). \
                       The policy allows it, denies it (a tool error naming the rule) or holds it for a human \
                       approval; a held action's answer says how to wait for the decision.")]
    async fn submit_action(
        &self,
        Parameters(args): Parameters<SubmitActionArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Result<CallToolResult, ErrorData> {
        let caller = caller_in(&parts)?;
        answer(
            async {
                let request = submit_request(&args)?;
                let outcome = self.gateway.submit(&caller, request).await?;
                Ok(action_result(&self.gateway, &outcome))
            }
            .await,
        )
    }

    #[tool(description = "Read an action submitted by this agent: its state, verdict, approval and result.")]
    async fn get_action(
        &self,
        Parameters(args): Parameters<ActionIdArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Result<CallToolResult, ErrorData> {
        let caller = caller_in(&parts)?;
        answer(
            async {
                let action = self.gateway.get_action(&caller, &parse_action_id(&args.id)?).await?;
                Ok(action_result(&self.gateway, &self.outcome_of(action).await?))
            }
            .await,
        )
    }

    #[tool(description = "Wait until an action is decided and finished, or the timeout passes; answers the action as \
                       it is then. Call again while it is still pending.")]
    async fn wait_action(
        &self,
        Parameters(args): Parameters<WaitActionArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Result<CallToolResult, ErrorData> {
        let caller = caller_in(&parts)?;
        answer(
            async {
                let timeout = match args.timeout_seconds {
                    None => DEFAULT_WAIT,
                    Some(s) => crate::gateway::wait_seconds("timeout_seconds", s)?,
                };
                let action = self.gateway.wait_action(&caller, &parse_action_id(&args.id)?, timeout).await?;
                still_stands(&self.gateway, secret_in(&parts).as_ref()).await?;
                Ok(action_result(&self.gateway, &self.outcome_of(action).await?))
            }
            .await,
        )
    }

    #[tool(description = "Withdraw an action that is still pending approval.")]
    async fn cancel_action(
        &self,
        Parameters(args): Parameters<ActionIdArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Result<CallToolResult, ErrorData> {
        let caller = caller_in(&parts)?;
        answer(
            async {
                let action = self.gateway.cancel_action(&caller, &parse_action_id(&args.id)?).await?;
                Ok(action_result(&self.gateway, &self.outcome_of(action).await?))
            }
            .await,
        )
    }

    #[tool(description = "List the background jobs this agent may see (executions of its actions), newest first.")]
    async fn list_jobs(
        &self,
        Parameters(args): Parameters<ListJobsArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Result<CallToolResult, ErrorData> {
        let caller = caller_in(&parts)?;
        answer(
            async {
                let page = crate::http::page_from(args.limit, args.cursor)?;
                let filter = crate::gateway::job_filter(args.kind.as_deref(), args.state.as_deref(), None)?;
                let (jobs, next) = self.gateway.list_jobs(&caller, &filter, &page).await?;
                Ok(CallToolResult::structured(views::list(jobs.iter().map(views::job).collect(), next)))
            }
            .await,
        )
    }

    #[tool(description = "Read one background job: its kind, state, attempts, progress and result.")]
    async fn get_job(
        &self,
        Parameters(args): Parameters<JobIdArgs>,
        Extension(parts): Extension<Parts>,
    ) -> Result<CallToolResult, ErrorData> {
        let caller = caller_in(&parts)?;
        answer(
            async {
                let id = JobId::parse(&args.id).ok_or_else(|| Error::not_found("job", &args.id))?;
                let job = self.gateway.get_job(&caller, &id).await?;
                Ok(CallToolResult::structured(views::job(&job)))
            }
            .await,
        )
    }
}

/// An error as the client may see it: the problem's `detail`, which for an internal or store failure says
/// only that one happened (its text is in the log), never the driver's message; the problem itself (with
/// its HTTP `status`) as the error's data. JSON-RPC's code says whose the fault is: a refusal of the request
/// (4xx: over the open waits, forbidden, not found…) is "invalid request", not "internal error", so a client
/// does not take a limit it can wait out for a broken server.
pub(super) fn rpc_error(error: &Error) -> ErrorData {
    let (status, problem) = error.problem();
    let detail = problem.get("detail").and_then(serde_json::Value::as_str).unwrap_or("internal error").to_owned();
    if status.is_client_error() {
        ErrorData::invalid_request(detail, Some(problem))
    } else {
        ErrorData::internal_error(detail, Some(problem))
    }
}

impl McpServer {
    /// The action behind a `countersign://actions/{id}` URI, if the caller may see it.
    async fn resource_action(&self, caller: &Caller, uri: &str) -> Result<Action, ErrorData> {
        let id = uri
            .strip_prefix(RESOURCE_PREFIX)
            .and_then(ActionId::parse)
            .ok_or_else(|| ErrorData::resource_not_found(format!("no resource `{uri}`"), None))?;
        self.gateway.get_action(caller, &id).await.map_err(|e| match e {
            Error::NotFound(message) => ErrorData::resource_not_found(message, None),
            other => rpc_error(&other),
        })
    }

    fn unsubscribe_uri(&self, uri: &str) {
        if let Ok(mut subs) = self.subscriptions.lock()
            && let Some(token) = subs.remove(uri)
        {
            token.cancel();
        }
    }
}

/// A resource subscription's follower: sends `notifications/resources/updated` for its URI whenever the
/// action changes, until it is terminal, the subscription ends, the session's credential stops working or the
/// peer goes away. It holds one of the agent's open waits until then.
struct Follower {
    gateway: Gateway,
    peer: Peer<RoleServer>,
    secret: Option<Secret>,
    stop: CancellationToken,
    _slot: WaitSlot,
}

impl Follower {
    async fn follow(
        self,
        id: ActionId,
        uri: String,
        mut changes: tokio::sync::broadcast::Receiver<crate::gateway::notify::ActionChanged>,
    ) {
        // However it ends, the subscription is over (subscribing again starts a new follower).
        let _ended = self.stop.clone().drop_guard();
        loop {
            let change = tokio::select! {
                () = self.stop.cancelled() => return,
                () = self.gateway.shutdown().cancelled() => return,
                change = changes.recv() => change,
            };
            match change {
                Ok(change) if !change.concerns(&id) => continue,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
            let caller = match &self.secret {
                Some(secret) => match self.gateway.authenticate(&secret.0).await {
                    Ok(caller) => caller,
                    Err(_) => return,
                },
                None => return,
            };
            let Ok(action) = self.gateway.get_action(&caller, &id).await else { return };
            if self.peer.notify_resource_updated(ResourceUpdatedNotificationParam::new(uri.clone())).await.is_err() {
                return;
            }
            if action.is_terminal() {
                return;
            }
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .enable_resources()
                .enable_resources_subscribe()
                .build(),
        )
        .with_server_info(Implementation::new("countersign", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Countersign governs what this agent may do. Call `submit_action` before any consequential action; \
                 when it answers pending, call `wait_action` with the action id (or subscribe to the resource \
                 countersign://actions/{id}) and act only once the action is approved or succeeded.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let (caller, _) = caller_of(&context)?;
        let mut tools = self.tool_router.list_all();
        tools.extend(upstream_tools::listed(&self.gateway, &caller).await.map_err(|e| rpc_error(&e))?);
        Ok(ListToolsResult::with_all_items(tools))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tool_router.get(name).cloned().or_else(|| upstream_tools::find(&self.gateway, name))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if self.tool_router.has_route(&request.name) {
            let call = ToolCallContext::new(self, request, context);
            return self.tool_router.call(call).await;
        }
        let (caller, secret) = caller_of(&context)?;
        upstream_tools::call(&self.gateway, &caller, secret.as_ref(), request, &context.meta)
            .await
            .map(CallToolResponse::from)
    }

    /// With upstream MCP servers configured, tells this client `notifications/tools/list_changed` whenever
    /// an upstream's tools change (or it comes or goes), until the session ends.
    fn on_initialized(
        &self,
        context: NotificationContext<RoleServer>,
    ) -> impl Future<Output = ()> + MaybeSendFuture + '_ {
        if self.gateway.mcp_upstreams().tools().is_empty() {
            return std::future::ready(());
        }
        let mut changes = self.gateway.mcp_upstreams().changes();
        changes.mark_unchanged();
        let (peer, ended, shutdown) = (context.peer, self.ended.clone(), self.gateway.shutdown().clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = ended.cancelled() => return,
                    () = shutdown.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
                if peer.notify_tool_list_changed().await.is_err() {
                    return;
                }
            }
        });
        std::future::ready(())
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new("countersign://actions/{id}", "action")
                .with_title("A Countersign action")
                .with_description("An action this agent submitted: state, verdict, approval and result. Subscribable.")
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let (caller, _) = caller_of(&context)?;
        let action = self.resource_action(&caller, &request.uri).await?;
        let approval = self.gateway.approval_of(&action).await.map_err(|e| rpc_error(&e))?;
        let body = views::action(&self.gateway, &action, approval.as_ref(), None);
        Ok(ReadResourceResult::new(vec![
            ResourceContents::text(body.to_string(), request.uri).with_mime_type("application/json"),
        ])
        .into())
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let (caller, secret) = caller_of(&context)?;
        // Listening before the action is read: a change committed from here on is announced, never lost in
        // the gap before the follower task first runs.
        let changes = self.gateway.notifier().subscribe_actions();
        let action = self.resource_action(&caller, &request.uri).await?;
        // Decided, taken and started under one lock: concurrent subscribes to one URI leave one follower.
        let mut subs = self.subscriptions.lock().unwrap_or_else(PoisonError::into_inner);
        // Followers that ended leave their cancelled tokens behind.
        subs.retain(|_, stop| !stop.is_cancelled());
        // Subscribing again to what is still followed changes nothing (and takes no second open wait); a
        // finished action never changes again, so there is nothing to follow.
        if subs.contains_key(&request.uri) || action.is_terminal() {
            return Ok(());
        }
        // One of the agent's open waits until the action finishes or the subscription ends.
        let slot = self.gateway.open_wait(&caller).map_err(|e| rpc_error(&e))?;
        let stop = CancellationToken::new();
        subs.insert(request.uri.clone(), stop.clone());
        let follower =
            Follower { gateway: self.gateway.clone(), peer: context.peer.clone(), secret, stop, _slot: slot };
        tokio::spawn(follower.follow(action.id, request.uri, changes));
        Ok(())
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.unsubscribe_uri(&request.uri);
        Ok(())
    }
}
