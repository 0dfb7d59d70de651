//! `/mcp` end to end with plain JSON-RPC over HTTP: the Streamable HTTP handshake, the tools, session scopes
//! and revocation, resource subscriptions, and bad input.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestServer, action, config, metric_until};

const PROTOCOL: &str = "2025-06-18";

/// A minimal Streamable HTTP MCP client: one session, requests answered as JSON or as SSE.
struct Mcp {
    http: reqwest::Client,
    url: String,
    token: String,
    session: Option<String>,
    next_id: u64,
}

struct Answer {
    status: u16,
    content_type: String,
    /// The JSON-RPC messages in the body (one for JSON, every `data:` line for SSE).
    messages: Vec<Value>,
    text: String,
}

impl Answer {
    /// The response to the request (the message with an `id`).
    fn response(&self) -> &Value {
        self.messages.iter().find(|m| m.get("id").is_some()).unwrap_or_else(|| panic!("no response in {}", self.text))
    }
}

fn parse_messages(content_type: &str, text: &str) -> Vec<Value> {
    if content_type.starts_with("text/event-stream") {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    } else {
        serde_json::from_str(text).map(|v| vec![v]).unwrap_or_default()
    }
}

impl Mcp {
    fn new(base: &str, token: &str) -> Mcp {
        Mcp {
            http: reqwest::Client::new(),
            url: format!("{base}/mcp"),
            token: token.to_owned(),
            session: None,
            next_id: 1,
        }
    }

    async fn post_raw(&mut self, body: String) -> Answer {
        let mut request = self
            .http
            .post(&self.url)
            .header("authorization", format!("Bearer {}", self.token))
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(body);
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session).header("mcp-protocol-version", PROTOCOL);
        }
        let response = request.send().await.unwrap();
        if let Some(session) = response.headers().get("mcp-session-id") {
            self.session = Some(session.to_str().unwrap().to_owned());
        }
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let text = response.text().await.unwrap();
        Answer { status, messages: parse_messages(&content_type, &text), content_type, text }
    }

    async fn request(&mut self, method: &str, params: Value) -> Answer {
        let id = self.next_id;
        self.next_id += 1;
        self.post_raw(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()).await
    }

    async fn notify(&mut self, method: &str) -> Answer {
        self.post_raw(json!({"jsonrpc": "2.0", "method": method}).to_string()).await
    }

    async fn initialize(&mut self) -> Value {
        let answer = self
            .request(
                "initialize",
                json!({"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "it", "version": "0"}}),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert!(self.session.is_some(), "no mcp-session-id");
        let result = answer.response()["result"].clone();
        let initialized = self.notify("notifications/initialized").await;
        assert_eq!(initialized.status, 202, "{}", initialized.text);
        result
    }

    /// `tools/call`, answering the JSON-RPC response.
    async fn call(&mut self, tool: &str, arguments: Value) -> Value {
        let answer = self.request("tools/call", json!({"name": tool, "arguments": arguments})).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        answer.response().clone()
    }
}

fn reasoning() -> Value {
    json!({"goal": "test over MCP"})
}

#[tokio::test]
async fn agent_tools_over_streamable_http() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let _bot = server.agent("bot").await;
    let session = server
        .admin
        .post("/v1/sessions", &json!({"agent": "bot", "ttl_seconds": 600, "scopes": ["email.*", "payments.*"]}))
        .await
        .unwrap();
    assert_eq!(session.status, 201, "{:?}", session.body);
    let url = session.str("/mcp/url").to_owned();
    let base = url.strip_suffix("/mcp").unwrap().to_owned();
    let header = session.str("/mcp/headers/Authorization").to_owned();
    let token = header.strip_prefix("Bearer ").unwrap().to_owned();
    assert_eq!(token, session.str("/token"));

    let mut mcp = Mcp::new(&base, &token);
    let info = mcp.initialize().await;
    assert_eq!(info["serverInfo"]["name"], "countersign");
    assert!(info["capabilities"]["tools"].is_object());
    assert_eq!(info["capabilities"]["resources"]["subscribe"], true);

    // tools/list: the six tools, each with an input schema.
    let listed = mcp.request("tools/list", json!({})).await;
    let tools = listed.response()["result"]["tools"].as_array().unwrap().clone();
    let mut names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["cancel_action", "get_action", "get_job", "list_jobs", "submit_action", "wait_action"]);
    let submit = tools.iter().find(|t| t["name"] == "submit_action").unwrap();
    assert_eq!(submit["inputSchema"]["type"], "object");
    let required: Vec<&str> =
        submit["inputSchema"]["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(required.contains(&"capability") && required.contains(&"reasoning"), "{submit}");

    // Allowed: structured content with the action, approved at once.
    let allowed = mcp
        .call(
            "submit_action",
            json!({"capability": "email.send.message", "params": {"to": "a@b.c"}, "reasoning": reasoning()}),
        )
        .await;
    let result = &allowed["result"];
    assert_eq!(result["isError"], false, "{allowed}");
    assert_eq!(result["structuredContent"]["state"], "approved", "{allowed}");
    let allowed_id = result["structuredContent"]["id"].as_str().unwrap().to_owned();

    // Held: pending, with directions to wait.
    let held = mcp
        .call(
            "submit_action",
            json!({"capability": "payments.charge.card", "params": {"amount_cents": 1200}, "reasoning": reasoning()}),
        )
        .await;
    let held = held["result"]["structuredContent"].clone();
    assert_eq!(held["state"], "pending_approval", "{held}");
    let held_id = held["id"].as_str().unwrap().to_owned();
    assert_eq!(held["next"]["tool"], "wait_action");
    assert_eq!(held["next"]["arguments"]["id"], held_id.as_str());
    assert!(held["next"]["message"].as_str().unwrap().contains("wait_action"));

    // get_action and a short wait_action that times out while pending.
    let got = mcp.call("get_action", json!({"id": allowed_id})).await;
    assert_eq!(got["result"]["structuredContent"]["id"], allowed_id.as_str());
    let waited = mcp.call("wait_action", json!({"id": held_id, "timeout_seconds": 0.2})).await;
    assert_eq!(waited["result"]["structuredContent"]["state"], "pending_approval");

    // The held action's resource can be read and subscribed; approval over REST notifies.
    let uri = format!("countersign://actions/{held_id}");
    let read = mcp.request("resources/read", json!({"uri": uri})).await;
    let contents = &read.response()["result"]["contents"][0];
    assert_eq!(contents["uri"], uri.as_str(), "{}", read.text);
    let body: Value = serde_json::from_str(contents["text"].as_str().unwrap()).unwrap();
    assert_eq!(body["state"], "pending_approval");
    let templates = mcp.request("resources/templates/list", json!({})).await;
    assert_eq!(templates.response()["result"]["resourceTemplates"][0]["uriTemplate"], "countersign://actions/{id}");

    let mut stream = mcp
        .http
        .get(&mcp.url)
        .header("authorization", format!("Bearer {token}"))
        .header("accept", "text/event-stream")
        .header("mcp-session-id", mcp.session.clone().unwrap())
        .header("mcp-protocol-version", PROTOCOL)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let subscribed = mcp.request("resources/subscribe", json!({"uri": uri})).await;
    assert!(subscribed.response().get("result").is_some(), "{}", subscribed.text);

    let approval_id = held["approval"]["id"].as_str().unwrap().to_owned();
    let approved = server.admin.approve(&approval_id, Some("fine")).await.unwrap();
    assert_eq!(approved.status, 200, "{:?}", approved.body);
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains("notifications/resources/updated") {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk()).await.expect("no update notification").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(seen.contains(&uri), "{seen}");
    drop(stream);
    let decided = mcp.call("wait_action", json!({"id": held_id, "timeout_seconds": 5})).await;
    assert_eq!(decided["result"]["structuredContent"]["state"], "approved", "{decided}");

    // Denied: a tool error naming the rule.
    let denied = mcp
        .call("submit_action", json!({"capability": "payments.delete.all", "params": {}, "reasoning": reasoning()}))
        .await;
    assert_eq!(denied["result"]["isError"], true, "{denied}");
    assert_eq!(denied["result"]["structuredContent"]["rule"], "no-deletes", "{denied}");
    assert!(denied["result"]["content"][0]["text"].as_str().unwrap().contains("no-deletes"));

    // Outside the session's scopes: refused before policy, as a tool error.
    let outside = mcp
        .call("submit_action", json!({"capability": "db.query.users", "params": {}, "reasoning": reasoning()}))
        .await;
    assert_eq!(outside["result"]["isError"], true, "{outside}");
    assert!(outside["result"]["structuredContent"]["detail"].as_str().unwrap().contains("scopes"), "{outside}");

    // A held action can be cancelled; an unknown id is a tool error.
    let another = mcp
        .call("submit_action", json!({"capability": "payments.charge.x", "params": {}, "reasoning": reasoning()}))
        .await;
    let another_id = another["result"]["structuredContent"]["id"].as_str().unwrap().to_owned();
    let cancelled = mcp.call("cancel_action", json!({"id": another_id})).await;
    assert_eq!(cancelled["result"]["structuredContent"]["state"], "cancelled", "{cancelled}");
    let missing = mcp.call("get_action", json!({"id": "act_nope"})).await;
    assert_eq!(missing["result"]["isError"], true);
    assert_eq!(missing["result"]["structuredContent"]["code"], "not_found", "{missing}");

    // Jobs: a list (empty for an agent with no executions) and an unknown job.
    let jobs = mcp.call("list_jobs", json!({})).await;
    assert!(jobs["result"]["structuredContent"]["items"].is_array(), "{jobs}");
    let bad_state = mcp.call("list_jobs", json!({"state": "sleeping"})).await;
    assert_eq!(bad_state["result"]["isError"], true);
    let no_job = mcp.call("get_job", json!({"id": "job_nope"})).await;
    assert_eq!(no_job["result"]["isError"], true);

    // Bad input: unknown tool, arguments that fail the schema, malformed JSON-RPC.
    let unknown = mcp.call("launch_rockets", json!({})).await;
    assert!(unknown.get("error").is_some() || unknown["result"]["isError"] == true, "{unknown}");
    let bad_args = mcp.call("submit_action", json!({"capability": 7})).await;
    // rmcp answers arguments that fail the schema as a tool error (isError), as the current spec asks.
    assert!(bad_args["error"]["code"].is_i64() || bad_args["result"]["isError"] == true, "{bad_args}");
    let malformed = mcp.post_raw("{\"jsonrpc\": \"2.0\", \"id\": 9, \"method\": ".into()).await;
    assert!(malformed.status >= 400 && malformed.status < 500, "{} {}", malformed.status, malformed.text);
    assert!(malformed.messages.first().is_some_and(|m| m["error"]["code"].is_i64()), "{}", malformed.text);

    // Every MCP call is audited with the session as actor.
    let audit = server.admin.get(&format!("/v1/audit?subject={allowed_id}")).await.unwrap();
    let events = audit.body["events"].as_array().unwrap();
    assert!(!events.is_empty());
    assert!(events.iter().any(|e| e["actor"]["kind"] == "session"), "{events:?}");

    // Revoked: the next request gets 401 problem+json, mid-session.
    let revoked = server.admin.revoke_session(session.str("/id")).await.unwrap();
    assert!(revoked.status == 204 || revoked.status == 200, "{:?}", revoked.body);
    let cut_off = mcp.request("tools/list", json!({})).await;
    assert_eq!(cut_off.status, 401, "{}", cut_off.text);
    assert!(cut_off.content_type.starts_with("application/problem+json"));
    assert!(cut_off.text.contains("revoked"));

    // No credential at all: 401 as well.
    let mut anonymous = Mcp::new(&base, "nothing");
    let refused = anonymous.request("initialize", json!({})).await;
    assert_eq!(refused.status, 401);
    // A user key, even an admin's: /mcp is for agents and their sessions.
    let mut user = Mcp::new(&base, server.admin.key().unwrap());
    let refused = user.request("initialize", json!({})).await;
    assert_eq!(refused.status, 403, "{}", refused.text);
    assert!(refused.content_type.starts_with("application/problem+json"));
    assert!(refused.text.contains("/mcp is for agents"), "{}", refused.text);

    server.stop().await;
}

/// An MCP session is its opener's: another principal presenting its id, even with a valid key of the same
/// org, gets 404 on every method and cannot end it; the opener goes on.
#[tokio::test]
async fn an_mcp_session_answers_only_the_principal_that_opened_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let owner = server.agent("owner").await;
    let other = server.agent("other").await;
    let mut mcp = Mcp::new(owner.base(), owner.key().unwrap());
    mcp.initialize().await;
    let session = mcp.session.clone().unwrap();

    let mut intruder = Mcp::new(other.base(), other.key().unwrap());
    intruder.session = Some(session.clone());
    let listed = intruder.request("tools/list", json!({})).await;
    assert_eq!(listed.status, 404, "{}", listed.text);
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let answer = intruder
            .http
            .request(method.clone(), &intruder.url)
            .header("authorization", format!("Bearer {}", other.key().unwrap()))
            .header("accept", "text/event-stream")
            .header("mcp-session-id", &session)
            .header("mcp-protocol-version", PROTOCOL)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 404, "{method}");
    }
    // A session token of the owner's agent is the same principal.
    let minted = server.admin.post("/v1/sessions", &json!({"agent": "owner"})).await.unwrap();
    let mut delegated = Mcp::new(owner.base(), minted.str("/token"));
    delegated.session = Some(session);
    assert_eq!(delegated.request("tools/list", json!({})).await.status, 200);
    let listed = mcp.request("tools/list", json!({})).await;
    assert_eq!(listed.status, 200, "the opener's session is still there: {}", listed.text);
    assert!(listed.response()["result"]["tools"].as_array().is_some_and(|t| !t.is_empty()));
    server.stop().await;
}

#[tokio::test]
async fn agent_keys_work_and_expired_sessions_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let bot = server.agent("bot").await;
    let base = bot.base().to_owned();
    let mut mcp = Mcp::new(&base, bot.key().unwrap());
    mcp.initialize().await;
    let allowed = mcp
        .call("submit_action", json!({"capability": "email.send.message", "params": {}, "reasoning": "plain text"}))
        .await;
    assert_eq!(allowed["result"]["structuredContent"]["state"], "approved", "{allowed}");

    let session = server.admin.post("/v1/sessions", &json!({"agent": "bot", "ttl_seconds": 1})).await.unwrap();
    assert_eq!(session.status, 201, "{:?}", session.body);
    let mut short = Mcp::new(&base, session.str("/token"));
    short.initialize().await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let expired = short.request("tools/list", json!({})).await;
    assert_eq!(expired.status, 401, "{}", expired.text);
    assert!(expired.text.contains("expired"));
    server.stop().await;
}

/// A message over the byte limit is a 413 problem; the limit, not a body that could not be read, says so.
#[tokio::test]
async fn a_message_over_the_limit_is_refused_with_413() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let agent = server.agent("mcp-bot").await;
    let huge =
        format!(r#"{{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {{"pad": "{}"}}}}"#, "x".repeat(2 << 20));
    let response = reqwest::Client::new()
        .post(format!("{}/mcp", agent.base()))
        .bearer_auth(agent.key().unwrap())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert!(response.text().await.unwrap().contains("byte limit"));
    server.stop().await;
}

/// One agent may hold a bounded number of MCP sessions open (each is a task of rmcp's with its own
/// streams): past it, opening another answers 429 saying how to free one, and ending one makes room.
#[tokio::test]
async fn an_agent_holds_a_bounded_number_of_mcp_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let agent = server.agent("opener").await;
    let mut open = Vec::new();
    for _ in 0..64 {
        let mut mcp = Mcp::new(agent.base(), agent.key().unwrap());
        mcp.initialize().await;
        open.push(mcp);
    }
    let mut one_more = Mcp::new(agent.base(), agent.key().unwrap());
    let hello = json!({"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "it", "version": "0"}});
    let refused = one_more.request("initialize", hello).await;
    assert_eq!(refused.status, 429, "{}", refused.text);
    assert!(refused.text.contains("64 MCP sessions are open for this agent"), "{}", refused.text);
    // Another agent is not held back by this one.
    let other = server.agent("someone-else").await;
    Mcp::new(other.base(), other.key().unwrap()).initialize().await;

    let first = open[0].session.clone().unwrap();
    let ended = reqwest::Client::new()
        .delete(format!("{}/mcp", agent.base()))
        .bearer_auth(agent.key().unwrap())
        .header("mcp-session-id", &first)
        .header("mcp-protocol-version", PROTOCOL)
        .send()
        .await
        .unwrap();
    assert!(ended.status().is_success(), "{}", ended.status());
    Mcp::new(agent.base(), agent.key().unwrap()).initialize().await;
    server.stop().await;
}

/// A resource subscription and a `wait_action` each hold one of the agent's open waits (`rate_limit.open_waits`):
/// past the limit, a subscription is refused with an error and a wait is a tool error, both saying why; a
/// finished action's resource is subscribed without one (it never changes again), and a subscription gives its
/// wait back once its action finishes.
#[tokio::test]
async fn subscriptions_and_waits_count_against_the_agents_open_waits() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), None);
    config.rate_limit.open_waits = 1;
    let server = TestServer::start_with(config, None).await;
    let bot = server.agent("mcp-subscriber").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let submitted = bot.submit_action(&action("payments.charge.card")).await.unwrap();
        assert_eq!(submitted.status, 202, "{:?}", submitted.body);
        held.push(submitted.str("/id").to_owned());
    }
    let done = bot.submit_action(&action("email.send.message")).await.unwrap();
    assert_eq!(done.status, 200, "{:?}", done.body);
    let uri = |id: &str| format!("countersign://actions/{id}");

    let mut first = Mcp::new(bot.base(), bot.key().unwrap());
    first.initialize().await;
    let subscribed = first.request("resources/subscribe", json!({"uri": uri(&held[0])})).await;
    assert!(subscribed.response().get("result").is_some(), "{}", subscribed.text);
    metric_until(&server.admin, "countersign_open_waits", 1.0).await;

    let mut second = Mcp::new(bot.base(), bot.key().unwrap());
    second.initialize().await;
    let refused = second.request("resources/subscribe", json!({"uri": uri(&held[1])})).await;
    let error = &refused.response()["error"];
    assert!(error["message"].as_str().unwrap().contains("1 waits open"), "{}", refused.text);
    // A refusal the client can wait out, not a broken server: "invalid request", carrying the 429 problem.
    assert_eq!(error["code"], -32600, "{}", refused.text);
    assert_eq!(error["data"]["status"], 429, "{}", refused.text);
    let waited = second.call("wait_action", json!({"id": held[1], "timeout_seconds": 30})).await;
    assert_eq!(waited["result"]["isError"], true, "{waited}");
    assert!(waited.to_string().contains("1 waits open"), "{waited}");
    let finished = second.request("resources/subscribe", json!({"uri": uri(done.str("/id"))})).await;
    assert!(finished.response().get("result").is_some(), "{}", finished.text);
    // Subscribing again to what the session still follows keeps its subscription.
    let again = first.request("resources/subscribe", json!({"uri": uri(&held[0])})).await;
    assert!(again.response().get("result").is_some(), "{}", again.text);

    // Its action finished (withdrawn), the subscription ends and its wait is free again.
    let cancelled = bot.post(&format!("/v1/actions/{}/cancel", held[0]), &json!({})).await.unwrap();
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    metric_until(&server.admin, "countersign_open_waits", 0.0).await;
    let again = second.request("resources/subscribe", json!({"uri": uri(&held[1])})).await;
    assert!(again.response().get("result").is_some(), "{}", again.text);
    server.stop().await;
}
