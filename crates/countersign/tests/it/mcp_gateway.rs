//! The MCP gateway end to end: real upstream MCP servers written with the official Python `mcp` package
//! (`tests/python/mcp_upstream.py`), one spawned by the gateway over stdio and one over Streamable HTTP on a
//! free port this test picks, plus a third configured on a port nobody listens on. An rmcp client on
//! `/mcp` sees their tools as `NAME__tool`; an allowed call is forwarded, a denied one is a tool error
//! naming the rule, a held one answers with the upstream's result once approved over REST from another
//! task, and the upstream log shows it saw exactly one call. Also: a dead upstream, bad input, the REST
//! refusal of `mcp` targets, tool list changes, reconnecting, and the child killed at shutdown.
//!
//! The Python package lives in the repository's `.venv`, made by `scripts/python-env`; without it these
//! tests fail and say so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use countersign::config::{McpServerConfig, McpTransportConfig, Secret};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientConfig, MetaObject, ProtocolVersion, RequestMetaObject,
};
use rmcp::service::{MaybeSendFuture, NotificationContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceError, ServiceExt};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::helpers::{TestServer, config, metric_until, run_python_client, venv_python};

const POLICY: &str = r#"
version: 1
defaults:
  effect: allow
  approval: { group: admins, timeout: 15m, quorum: 1 }
rules:
  - name: never-delete-repos
    effect: deny
    conditions: { capability: "mcp.*.delete_repo" }
    message: "Repositories are never deleted by agents"
  - name: transfers-need-a-human
    effect: require_approval
    conditions: { capability: "mcp.*.transfer" }
    message: "Money moves only with a human's approval"
  - name: hold-charges
    effect: require_approval
    conditions: { capability: "payments.charge.*" }
"#;

const READY: Duration = Duration::from_secs(60);

pub fn upstream_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/mcp_upstream.py")
}

/// A port that was free a moment ago (the HTTP upstream binds it).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Starts the Python upstream over Streamable HTTP on 127.0.0.1:`port`, logging its calls to `log`.
pub fn spawn_http_upstream(port: u16, log: &Path) -> tokio::process::Child {
    tokio::process::Command::new(venv_python())
        .arg(upstream_script())
        .arg("--http")
        .arg(port.to_string())
        .env("MCP_UPSTREAM_LOG", log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

struct Gateway {
    server: TestServer,
    _dir: tempfile::TempDir,
    stdio_log: PathBuf,
    http_log: PathBuf,
    /// On the stdio upstream's command line, to find its process.
    tag: String,
    _http_upstream: tokio::process::Child,
}

impl Gateway {
    fn log(&self, server: &str) -> &Path {
        if server == "local" { &self.stdio_log } else { &self.http_log }
    }
}

/// The server with `local` (stdio), `web` (HTTP) and `dead` (nobody listening), both live ones connected.
async fn start() -> Gateway {
    start_configured(|_| {}).await
}

/// [`start`], with `tweak` applied to the configuration.
async fn start_configured(tweak: impl FnOnce(&mut countersign::config::Config)) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let stdio_log = dir.path().join("stdio-calls.jsonl");
    let http_log = dir.path().join("http-calls.jsonl");
    let port = free_port();
    let http_upstream = spawn_http_upstream(port, &http_log);

    let mut config = config(dir.path(), None);
    let tag = dir.path().display().to_string();
    let env = [
        ("MCP_UPSTREAM_LOG".to_owned(), Secret::new(stdio_log.display().to_string())),
        ("UPSTREAM_SECRET".to_owned(), Secret::new("s3cret-from-config".into())),
    ];
    config.mcp_servers.insert(
        "local".into(),
        McpServerConfig {
            transport: McpTransportConfig::Stdio {
                command: vec![
                    venv_python().display().to_string(),
                    upstream_script().display().to_string(),
                    "--tag".into(),
                    tag.clone(),
                ],
                env: env.into_iter().collect(),
                cwd: None,
            },
            timeout_seconds: 30,
            // Its credential is the default org's: other orgs do not see it.
            orgs: countersign::config::OrgScope::only(["default"]),
        },
    );
    config.mcp_servers.insert("web".into(), McpServerConfig::http(format!("http://127.0.0.1:{port}/mcp")));
    config.mcp_servers.insert("dead".into(), McpServerConfig::http(format!("http://127.0.0.1:{}/mcp", free_port())));
    tweak(&mut config);
    let server = TestServer::start_with(config, None).await;
    for name in ["local", "web"] {
        assert!(server.gateway().mcp_upstream_ready(name, READY).await, "upstream `{name}` did not connect");
    }
    Gateway { server, _dir: dir, stdio_log, http_log, tag, _http_upstream: http_upstream }
}

/// What the upstream logged: one JSON object per call.
fn calls(log: &Path, tool: &str) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|call| call["tool"] == tool)
        .collect()
}

/// An rmcp client on `/mcp`, told when the tool list changes.
#[derive(Clone, Default)]
pub struct Downstream {
    pub tools_changed: Arc<Notify>,
}

impl ClientHandler for Downstream {
    fn on_tool_list_changed(
        &self,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + MaybeSendFuture + '_ {
        self.tools_changed.notify_one();
        std::future::ready(())
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::default().with_protocol_version(ProtocolVersion::V_2025_11_25)
    }
}

pub async fn connect(base: &str, key: &str) -> (RunningService<RoleClient, Downstream>, Downstream) {
    let handler = Downstream::default();
    let config = StreamableHttpClientTransportConfig::with_uri(format!("{base}/mcp")).auth_header(key);
    let transport = StreamableHttpClientTransport::with_client(reqwest::Client::new(), config);
    (handler.clone().serve(transport).await.unwrap(), handler)
}

pub async fn call(
    client: &RunningService<RoleClient, Downstream>,
    name: &str,
    arguments: Value,
    meta: Option<Value>,
) -> Result<CallToolResult, ServiceError> {
    let mut params = CallToolRequestParams::new(name.to_owned()).with_arguments(arguments.as_object().unwrap().clone());
    params.meta = meta.map(|m| RequestMetaObject(MetaObject(m.as_object().unwrap().clone())));
    client.peer().call_tool(params).await
}

pub fn text(result: &CallToolResult) -> String {
    result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect::<Vec<_>>().join("\n")
}

/// Approves the next pending approval as the admin once it shows up (woken by the server's own
/// notifications, not a polling tick); answers the approval.
async fn approve_next(server: &TestServer) -> Value {
    let mut changes = server.gateway().notifier().subscribe_actions();
    loop {
        let page = server.admin.list_approvals(Some("pending"), None, None).await.unwrap();
        if let Some(approval) = page.body["items"].get(0) {
            let id = approval["id"].as_str().unwrap();
            let approved = server.admin.approve(id, Some("fine")).await.unwrap();
            assert_eq!(approved.status, 200, "{:?}", approved.body);
            return approval.clone();
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(30), changes.recv()).await.expect("no approval became pending");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_tools_are_listed_and_governed_over_stdio_and_http() {
    let g = start().await;
    let agent = g.server.agent("mcp-gateway-agent").await;
    let (client, _) = connect(agent.base(), agent.key().unwrap()).await;

    let tools = client.peer().list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    for own in ["submit_action", "get_action", "wait_action", "cancel_action", "list_jobs", "get_job"] {
        assert!(names.contains(&own), "{own} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("dead__")), "a dead upstream lists no tools: {names:?}");

    for server in ["local", "web"] {
        for tool in ["echo", "transfer", "delete_repo"] {
            assert!(names.contains(&format!("{server}__{tool}").as_str()), "{server}__{tool} missing from {names:?}");
        }
        let echo = tools.iter().find(|t| t.name == format!("{server}__echo")).unwrap();
        assert_eq!(echo.description.as_deref(), Some("Echoes the text back."));
        assert_eq!(echo.input_schema.get("required"), Some(&json!(["text"])));

        // Allowed: forwarded, the upstream's own answer.
        let echoed =
            call(&client, &format!("{server}__echo"), json!({"text": format!("hello {server}")}), None).await.unwrap();
        assert_eq!(echoed.is_error, Some(false), "{echoed:?}");
        assert_eq!(text(&echoed), format!("echo: hello {server}"));
        assert_eq!(calls(g.log(server), "echo").len(), 1);

        // Denied: a tool error naming the rule and its message; never sent.
        let denied = call(&client, &format!("{server}__delete_repo"), json!({"name": "prod"}), None).await.unwrap();
        assert_eq!(denied.is_error, Some(true), "{denied:?}");
        let said = text(&denied);
        assert!(said.contains("never-delete-repos"), "{said}");
        assert!(said.contains("Repositories are never deleted by agents"), "{said}");
        assert!(calls(g.log(server), "delete_repo").is_empty());

        // Held: the call waits, an admin approves over REST from another task, the call answers with the
        // upstream's result, and the upstream saw it once.
        let held = {
            let transfer = format!("{server}__transfer");
            let peer_call = call(
                &client,
                &transfer,
                json!({"to": "bob", "amount_cents": 500}),
                Some(json!({"reasoning": {"goal": "pay bob"}})),
            );
            let (answer, approval) = tokio::join!(peer_call, approve_next(&g.server));
            let answer = answer.unwrap();
            assert_eq!(answer.is_error, Some(false), "{answer:?}");
            assert_eq!(text(&answer), "transferred 500 cents to bob");
            approval
        };
        assert_eq!(held["rule"], "transfers-need-a-human");
        let transfers = calls(g.log(server), "transfer");
        assert_eq!(transfers.len(), 1, "the upstream saw {transfers:?}");
        assert_eq!(transfers[0]["arguments"], json!({"to": "bob", "amount_cents": 500}));

        let action = agent.get_action(held["action_id"].as_str().unwrap()).await.unwrap();
        assert_eq!(action.body["state"], "succeeded", "{:?}", action.body);
        assert_eq!(action.body["capability"], format!("mcp.{server}.transfer"));
        assert_eq!(action.body["params"], json!({"to": "bob", "amount_cents": 500}));
        assert_eq!(action.body["reasoning"], json!({"goal": "pay bob"}));
        assert_eq!(action.body["target"]["connector"], "mcp");
        assert_eq!(action.body["result"]["content"][0]["text"], "transferred 500 cents to bob");
    }
    // A result over the gateway's limit is answered and stored cut to fit, saying so, and audited as cut.
    let size = 3 * countersign::gateway::MAX_MCP_RESULT_BYTES;
    let flooded = call(&client, "local__flood", json!({"size": size}), None).await.unwrap();
    assert_eq!(flooded.is_error, Some(false), "{:?}", flooded.content.last());
    let said = text(&flooded);
    assert!(said.starts_with("xxxx") && said.len() < countersign::gateway::MAX_MCP_RESULT_BYTES, "{}", said.len());
    assert!(said.ends_with("its text was cut to fit]"), "{}", &said[said.len() - 200..]);
    let id = g.server.admin.get("/v1/audit?action=action.executed&limit=1000").await.unwrap().body["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"]["tool"] == "flood")
        .map(|e| {
            assert_eq!(e["data"]["result_truncated"], true, "{e}");
            assert!(e["data"]["result_bytes"].as_u64().unwrap() > size as u64, "{e}");
            e["subject"].as_str().unwrap().to_owned()
        })
        .expect("no action.executed event for the flood call");
    let stored = agent.get_action(&id).await.unwrap();
    assert_eq!(stored.body["result"]["content"][0]["text"].as_str().map(str::len), Some(said.find("\n[").unwrap()));
    assert_eq!(calls(&g.stdio_log, "flood").len(), 1);

    // The spawned upstream got its credential from the configuration's env.
    assert_eq!(calls(&g.stdio_log, "echo")[0]["secret"], "s3cret-from-config");
    assert_eq!(calls(&g.http_log, "echo")[0]["secret"], Value::Null);
    client.cancel().await.unwrap();

    // Another org sees only the servers open to it (`local` names the default org alone).
    let created = g.server.admin.post("/v1/orgs", &json!({"name": "other"})).await.unwrap();
    let other_admin = g.server.admin.with_key(created.str("/admin_key"));
    assert_eq!(other_admin.create_agent("obot").await.unwrap().status, 201);
    let key = other_admin.create_key("agent", "obot").await.unwrap().str("/key").to_owned();
    let (other, _) = connect(agent.base(), &key).await;
    let names: Vec<String> = other.peer().list_all_tools().await.unwrap().iter().map(|t| t.name.to_string()).collect();
    assert!(names.iter().any(|n| n == "web__echo"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("local__")), "{names:?}");
    let refused = call(&other, "local__echo", json!({"text": "hi"}), None).await.unwrap_err();
    assert!(refused.to_string().contains("unknown tool"), "{refused}");
    assert_eq!(calls(&g.stdio_log, "echo").len(), 1, "nothing more reached the default org's server");
    other.cancel().await.unwrap();
    g.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_call_returns_pending_when_asked_not_to_wait_and_a_denial_by_an_approver_is_a_tool_error() {
    let g = start().await;
    let agent = g.server.agent("mcp-pending-agent").await;
    let (client, _) = connect(agent.base(), agent.key().unwrap()).await;

    let pending = call(
        &client,
        "web__transfer",
        json!({"to": "carol", "amount_cents": 900}),
        Some(json!({"countersign_wait": 0})),
    )
    .await
    .unwrap();
    assert_eq!(pending.is_error, Some(false), "{pending:?}");
    let body = pending.structured_content.clone().unwrap();
    assert_eq!(body["state"], "pending_approval");
    assert_eq!(body["rule"], "transfers-need-a-human");
    assert_eq!(body["next"]["tool"], "wait_action");
    let action_id = body["action_id"].as_str().unwrap().to_owned();
    assert_eq!(body["next"]["resource"], format!("countersign://actions/{action_id}"));
    assert!(calls(&g.http_log, "transfer").is_empty());

    // Approved later: the execution job makes the call once; wait_action shows its result.
    let approval = approve_next(&g.server).await;
    assert_eq!(approval["action_id"], action_id.as_str());
    let waited = call(&client, "wait_action", json!({"id": action_id, "timeout_seconds": 30}), None).await.unwrap();
    let waited = waited.structured_content.unwrap();
    assert_eq!(waited["state"], "succeeded", "{waited}");
    assert_eq!(waited["result"]["content"][0]["text"], "transferred 900 cents to carol");
    assert_eq!(calls(&g.http_log, "transfer").len(), 1);

    // Denied by the approver while the call waits: a tool error naming the rule that held it.
    let held = call(&client, "local__transfer", json!({"to": "mallory", "amount_cents": 1}), None);
    let deny = async {
        let mut changes = g.server.gateway().notifier().subscribe_actions();
        loop {
            let page = g.server.admin.list_approvals(Some("pending"), None, None).await.unwrap();
            if let Some(id) = page.body["items"][0]["id"].as_str() {
                let denied = g.server.admin.deny(id, Some("no")).await.unwrap();
                assert_eq!(denied.status, 200, "{:?}", denied.body);
                return;
            }
            let _ = tokio::time::timeout(Duration::from_secs(30), changes.recv()).await.unwrap();
        }
    };
    let (answer, ()) = tokio::join!(held, deny);
    let answer = answer.unwrap();
    assert_eq!(answer.is_error, Some(true), "{answer:?}");
    assert!(text(&answer).contains("an approver denied"), "{}", text(&answer));
    assert!(text(&answer).contains("transfers-need-a-human"), "{}", text(&answer));
    assert!(calls(&g.stdio_log, "transfer").is_empty());

    client.cancel().await.unwrap();
    g.server.stop().await;
}

/// A held tool call from an agent that already holds its `rate_limit.open_waits` answers pending at once, with
/// how to wait for it later, instead of waiting (or failing: the action is recorded and stays pending).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_call_over_the_agents_open_waits_answers_pending_at_once() {
    let g = start_configured(|config| config.rate_limit.open_waits = 1).await;
    let agent = g.server.agent("mcp-busy-agent").await;
    let (client, _) = connect(agent.base(), agent.key().unwrap()).await;
    let first =
        call(&client, "web__transfer", json!({"to": "carol", "amount_cents": 5}), Some(json!({"countersign_wait": 0})))
            .await
            .unwrap();
    let first_id = first.structured_content.unwrap()["action_id"].as_str().unwrap().to_owned();
    let peer = client.peer().clone();
    let waiting = tokio::spawn(async move {
        let params = CallToolRequestParams::new("wait_action")
            .with_arguments(json!({"id": first_id, "timeout_seconds": 120}).as_object().unwrap().clone());
        peer.call_tool(params).await
    });
    metric_until(&g.server.admin, "countersign_open_waits", 1.0).await;

    let held = tokio::time::timeout(
        Duration::from_secs(30),
        call(&client, "local__transfer", json!({"to": "dave", "amount_cents": 7}), None),
    )
    .await
    .expect("a held call over the open waits waited anyway")
    .unwrap();
    assert_eq!(held.is_error, Some(false), "{held:?}");
    let body = held.structured_content.unwrap();
    assert_eq!(body["state"], "pending_approval", "{body}");
    assert_eq!(body["next"]["tool"], "wait_action", "{body}");
    assert!(calls(&g.stdio_log, "transfer").is_empty());

    client.cancel().await.unwrap();
    let _ = waiting.await;
    g.server.stop().await;
}

/// The `reason` of the action's `action.failed` audit event.
async fn failure_reason(server: &TestServer, action_id: &str) -> Value {
    let query = countersign::client::AuditQuery { subject: Some(action_id.to_owned()), ..Default::default() };
    let events = server.admin.query_audit(&query).await.unwrap().body["events"].as_array().cloned().unwrap();
    events.iter().find(|e| e["action"] == "action.failed").unwrap()["data"]["reason"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_upstream_and_bad_input_get_errors_not_dropped_connections() {
    let g = start().await;
    let agent = g.server.agent("mcp-bad-input-agent").await;
    let (client, _) = connect(agent.base(), agent.key().unwrap()).await;

    // A dead upstream: a tool error saying it is unavailable, and the action recorded failed.
    let dead = call(&client, "dead__echo", json!({"text": "anyone?"}), None).await.unwrap();
    assert_eq!(dead.is_error, Some(true), "{dead:?}");
    assert!(text(&dead).contains("unavailable"), "{}", text(&dead));
    let action_id = dead.structured_content.as_ref().unwrap()["action_id"].as_str().unwrap().to_owned();
    let action = agent.get_action(&action_id).await.unwrap();
    assert_eq!(action.body["state"], "failed", "{:?}", action.body);
    assert!(action.body["error"].as_str().unwrap().contains("unavailable"), "{:?}", action.body);
    assert_eq!(action.body["capability"], "mcp.dead.echo");
    assert_eq!(failure_reason(&g.server, &action_id).await, "upstream_unavailable", "never sent");

    // An upstream that dies after it got the call: the tool may have run, so the outcome is unknown.
    assert!(g.server.gateway().mcp_upstream_ready("local", READY).await, "the stdio upstream did not connect");
    let vanished = call(&client, "local__vanish", json!({}), None).await.unwrap();
    assert_eq!(vanished.is_error, Some(true), "{vanished:?}");
    let action_id = vanished.structured_content.as_ref().unwrap()["action_id"].as_str().unwrap().to_owned();
    let action = agent.get_action(&action_id).await.unwrap();
    assert!(action.body["error"].as_str().unwrap().contains("outcome unknown"), "{:?}", action.body);
    assert_eq!(failure_reason(&g.server, &action_id).await, "outcome_unknown");
    assert_eq!(calls(&g.stdio_log, "vanish").len(), 1);

    // Unknown tools and arguments that do not fit the schema: JSON-RPC errors naming the problem, nothing
    // recorded, nothing sent.
    for (name, arguments, expected) in [
        ("web__nope", json!({}), "unknown tool `web__nope`"),
        ("nowhere__echo", json!({}), "unknown tool `nowhere__echo`"),
        ("web__transfer", json!({"to": "bob"}), "missing required `amount_cents`"),
        ("web__transfer", json!({"to": "bob", "amount_cents": "lots"}), "`amount_cents` must be of type integer"),
    ] {
        match call(&client, name, arguments, None).await {
            Err(ServiceError::McpError(error)) => {
                assert_eq!(error.code.0, -32602, "{error:?}");
                assert!(error.message.contains(expected), "{name}: {}", error.message);
            }
            other => panic!("{name}: expected a JSON-RPC error, got {other:?}"),
        }
    }
    match call(&client, "web__echo", json!({"text": "x"}), Some(json!({"countersign_wait": "soon"}))).await {
        Err(ServiceError::McpError(error)) => assert!(error.message.contains("countersign_wait"), "{error:?}"),
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    }
    assert!(calls(&g.http_log, "transfer").is_empty());

    // Arguments that are not an object, and a body that is not JSON, over raw HTTP: JSON-RPC errors.
    let http = reqwest::Client::new();
    let url = format!("{}/mcp", agent.base());
    let post = |body: String, session: Option<String>| {
        let mut request = http
            .post(&url)
            .bearer_auth(agent.key().unwrap())
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(body);
        if let Some(session) = session {
            request = request.header("mcp-session-id", session).header("mcp-protocol-version", "2025-06-18");
        }
        request.send()
    };
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
                      "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    let response = post(init.to_string(), None).await.unwrap();
    let session = response.headers().get("mcp-session-id").unwrap().to_str().unwrap().to_owned();
    response.text().await.unwrap();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(post(initialized.to_string(), Some(session.clone())).await.unwrap().status(), 202);
    let bad_arguments = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "web__echo", "arguments": [1, 2]}});
    let answer = post(bad_arguments.to_string(), Some(session.clone())).await.unwrap().text().await.unwrap();
    assert!(answer.contains("\"error\"") && answer.contains("\"id\":2"), "{answer}");
    let garbage = post("{not json".into(), Some(session.clone())).await.unwrap();
    assert!(garbage.status().is_client_error(), "{}", garbage.status());
    let garbage = garbage.text().await.unwrap();
    assert!(garbage.contains("\"error\"") && garbage.contains("\"code\""), "{garbage}");

    // The connection still works after all that.
    let echoed = call(&client, "web__echo", json!({"text": "still here"}), None).await.unwrap();
    assert_eq!(text(&echoed), "echo: still here");

    // REST never takes an `mcp` target: only the gateway makes them.
    let refused = agent
        .submit_action(&json!({"capability": "mcp.web.echo", "params": {"text": "x"}, "reasoning": "r",
                               "target": {"connector": "mcp", "server": "web", "tool": "echo",
                                          "arguments": {"text": "x"}}}))
        .await
        .unwrap();
    assert_eq!(refused.status, 422, "{:?}", refused.body);
    assert!(refused.body.to_string().contains("MCP gateway"), "{:?}", refused.body);
    // Nor does the submit_action tool.
    let via_tool = call(
        &client,
        "submit_action",
        json!({"capability": "mcp.web.echo", "reasoning": "r",
               "target": {"connector": "mcp", "server": "web", "tool": "echo", "arguments": {"text": "x"}}}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(via_tool.is_error, Some(true), "{via_tool:?}");
    assert_eq!(calls(&g.http_log, "echo").len(), 1);

    client.cancel().await.unwrap();
    g.server.stop().await;
}

/// The live stdio upstreams tagged `tag`, from `/proc`: children of this process running the upstream script.
fn stdio_upstream_pids(tag: &str) -> Vec<u32> {
    let me = std::process::id().to_string();
    let script = format!("{} --tag {tag}", upstream_script().display());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Fields after the command name: state, then the parent pid.
        let after =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect::<Vec<_>>()).unwrap_or_default();
        let alive = after.first().is_some_and(|state| *state != "Z");
        if alive && after.get(1) == Some(&me.as_str()) && cmdline.contains(&script) {
            pids.push(pid);
        }
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tool_list_changes_reach_the_client_and_the_child_is_restarted_and_killed() {
    let g = start().await;
    let agent = g.server.agent("mcp-change-agent").await;
    let (client, downstream) = connect(agent.base(), agent.key().unwrap()).await;
    let names = |tools: Vec<rmcp::model::Tool>| tools.into_iter().map(|t| t.name.to_string()).collect::<Vec<_>>();
    assert!(!names(client.peer().list_all_tools().await.unwrap()).contains(&"local__extra".to_owned()));

    // The upstream adds a tool and says so; the gateway lists again and tells this client.
    let changed = downstream.tools_changed.notified();
    let grown = call(&client, "local__grow", json!({}), None).await.unwrap();
    assert_eq!(text(&grown), "grown");
    tokio::time::timeout(READY, changed).await.expect("no notifications/tools/list_changed");
    loop {
        if names(client.peer().list_all_tools().await.unwrap()).contains(&"local__extra".to_owned()) {
            break;
        }
        tokio::time::timeout(READY, downstream.tools_changed.notified()).await.expect("local__extra never listed");
    }
    let extra = call(&client, "local__extra", json!({"note": "new"}), None).await.unwrap();
    assert_eq!(text(&extra), "extra: new");

    // The child dies: the gateway notices, starts it again, and calls work again.
    let pids = stdio_upstream_pids(&g.tag);
    assert_eq!(pids.len(), 1, "one stdio upstream for this test's server: {pids:?}");
    let mut changes = g.server.gateway().mcp_upstreams().changes();
    changes.mark_unchanged();
    std::process::Command::new("kill").arg("-9").arg(pids[0].to_string()).status().unwrap();
    while g.server.gateway().mcp_upstreams().unavailable("local").is_none() {
        tokio::time::timeout(READY, changes.changed()).await.expect("the gateway did not notice").unwrap();
    }
    assert!(g.server.gateway().mcp_upstream_ready("local", READY).await, "the stdio upstream did not come back");
    let echoed = call(&client, "local__echo", json!({"text": "again"}), None).await.unwrap();
    assert_eq!(text(&echoed), "echo: again");
    let restarted = stdio_upstream_pids(&g.tag);
    assert_eq!(restarted.len(), 1);
    assert_ne!(restarted, pids);

    // Shutdown kills the spawned child.
    client.cancel().await.unwrap();
    let tag = g.tag.clone();
    g.server.stop().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stdio_upstream_pids(&tag).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the stdio upstream outlived the server");
        // A process that is not ours to wait on: look again shortly.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_python_mcp_client_works_with_a_minted_session() {
    let g = start().await;
    let agent = g.server.agent("python-mcp-agent").await;
    let cases = [
        "list_tools",
        "upstream_allowed",
        "allowed",
        "held",
        "resource_updated",
        "scope_refused",
        "upstream_scope_refused",
        "revoked_401",
        "expired_401",
    ];
    run_python_client("mcp_client.py", &agent, &g.server.admin, &[], &cases).await;
    // The upstream call came from the session: its action names the session as the actor.
    let page = g.server.admin.get("/v1/actions?capability=mcp.web.echo").await.unwrap();
    let echo = page.body["items"].as_array().unwrap().iter().find(|a| a["capability"] == "mcp.web.echo").cloned();
    let echo = echo.unwrap_or_else(|| panic!("no mcp.web.echo action in {:?}", page.body));
    assert!(echo["session_id"].as_str().is_some_and(|s| !s.is_empty()), "{echo}");
    assert_eq!(echo["state"], "succeeded");
    assert_eq!(calls(&g.http_log, "echo").len(), 1);
    assert!(calls(&g.http_log, "transfer").is_empty(), "a call outside the scopes reached the upstream");
    g.server.stop().await;
}

/// The process carrying an allowed tool call dies after sending it: submit, claim and send go through the
/// gateway as `/mcp` does them, then nothing records the answer and the server stops. The recovery job the
/// claim wrote (due after the upstream's timeout and the margin) ends the action `failed` with `outcome
/// unknown` after the restart, audited, and the upstream saw exactly one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tool_call_cut_off_by_a_crash_ends_failed_outcome_unknown_and_is_never_resent() {
    use countersign::gateway::McpCall;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let log = dir.path().join("calls.jsonl");
    let port = free_port();
    let _upstream = spawn_http_upstream(port, &log);
    let configure = || {
        let mut config = config(dir.path(), None);
        config.jobs.llm_recovery_margin = Duration::from_millis(500);
        let mut web = McpServerConfig::http(format!("http://127.0.0.1:{port}/mcp"));
        web.timeout_seconds = 1;
        config.mcp_servers.insert("web".into(), web);
        config
    };
    let server = TestServer::start_with(configure(), None).await;
    assert!(server.gateway().mcp_upstream_ready("web", READY).await, "the upstream did not connect");
    let agent = server.agent("cut-off").await;
    let gateway = server.gateway().clone();
    let caller = gateway.authenticate(agent.key().unwrap()).await.unwrap();
    let arguments = json!({"text": "in flight"});
    let call = McpCall {
        server: "web".into(),
        tool: "echo".into(),
        arguments: arguments.clone(),
        reasoning: json!({"goal": "crash test"}).to_string(),
    };
    let submitted = gateway.submit_mcp(&caller, call).await.unwrap();
    // Allowed: claimed for the caller in the submission's own transaction.
    assert_eq!(submitted.action.state.as_str(), "executing");
    assert!(submitted.claimed);
    let claimed = submitted.action;
    let id = claimed.id.to_string();
    let job_id = claimed.job_id.clone().expect("the claim writes the recovery job").to_string();
    // Claimed twice? No: the second claim finds it executing.
    assert!(gateway.claim_mcp_inline(&caller, &claimed.id).await.unwrap().is_none());

    // The call goes out; then the process "dies": nothing records the answer.
    let sent = gateway.mcp_upstreams().call("web", "echo", &arguments).await.unwrap();
    assert_eq!(sent.is_error, Some(false));
    drop(gateway);
    server.stop().await;
    assert_eq!(calls(&log, "echo").len(), 1);

    let server = TestServer::start_with(configure(), None).await;
    let action = server.admin.wait_action(&id, 20.0).await.unwrap().body;
    assert_eq!(action["state"], "failed", "{action}");
    assert!(action["error"].as_str().unwrap().contains("outcome unknown"), "{action}");
    let job = server.admin.get(&format!("/v1/jobs/{job_id}/wait?timeout=10")).await.unwrap().body;
    assert_eq!(job["state"], "failed", "{job}");
    let query = countersign::client::AuditQuery { subject: Some(id.clone()), ..Default::default() };
    let events = server.admin.query_audit(&query).await.unwrap().body["events"].as_array().cloned().unwrap();
    let failed = events.iter().find(|e| e["action"] == "action.failed").unwrap();
    assert_eq!(failed["data"]["reason"], "outcome_unknown", "{failed}");
    assert_eq!(failed["data"]["tool"], "echo", "{failed}");
    assert!(!events.iter().any(|e| e["action"] == "action.executed"));
    assert_eq!(calls(&log, "echo").len(), 1, "a tool call is never sent twice");
    server.stop().await;
}
