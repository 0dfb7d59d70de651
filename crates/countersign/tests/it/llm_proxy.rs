//! The LLM proxy end to end over HTTP against a real server and the fake provider: allowed calls forwarded
//! with the provider key and audited with model, usage and latency; denials in each provider's error shape;
//! held calls answered once approved from another task (or 403 once expired); `Countersign-Wait: 0` and the
//! stored result; upstream failures as 502/504; and streams relayed chunk by chunk as they arrive.

use std::time::{Duration, Instant};

use countersign::client::{AuditQuery, Client};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::fake_llm::{CHUNK_DELAY, FakeProvider, PROVIDER_KEY, STREAM_CHUNKS};
use crate::helpers::{TestServer, first_pending, llm_config, metric, metric_until};

struct Setup {
    server: TestServer,
    agent: Client,
    provider: FakeProvider,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start().await;
    let server = TestServer::start_with(llm_config(dir.path(), &provider.url), None).await;
    let agent = server.agent("model-user").await;
    Setup { server, agent, provider, http: reqwest::Client::new(), _dir: dir }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.agent.base())
    }

    /// A POST with the agent's key as `Authorization: Bearer` (OpenAI) or `x-api-key` (Anthropic).
    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        let key = self.agent.key().unwrap().to_owned();
        let request = self.http.post(self.url(path)).json(body);
        if path.ends_with("/messages") { request.header("x-api-key", key) } else { request.bearer_auth(key) }
    }

    async fn action(&self, response: &reqwest::Response) -> Value {
        let id = response.headers()["countersign-action-id"].to_str().unwrap().to_owned();
        self.agent.get_action(&id).await.unwrap().body
    }

    /// `GET /v1/approval-status/{token}/result` once it answers 200 (the job has run), asked again for up to
    /// 10 s: there is no event to await from outside. `Null` if it never did.
    async fn stored_result(&self, token: &str) -> Value {
        let url = self.url(&format!("/v1/approval-status/{token}/result"));
        for _ in 0..200 {
            let answer = self.http.get(&url).send().await.unwrap();
            if answer.status() == 200 {
                return answer.json().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Value::Null
    }

    async fn events(&self, action_id: &str) -> Vec<Value> {
        let query = AuditQuery { subject: Some(action_id.to_owned()), ..AuditQuery::default() };
        let page = self.server.admin.query_audit(&query).await.unwrap();
        page.body["events"].as_array().cloned().unwrap_or_default()
    }
}

fn event<'a>(events: &'a [Value], name: &str) -> &'a Value {
    events.iter().find(|e| e["action"] == name).unwrap_or_else(|| panic!("no {name} event in {events:?}"))
}

/// Approves the next pending approval as the admin, from another task, once it shows up.
fn approve_when_pending(server: &TestServer) -> tokio::task::JoinHandle<String> {
    let (gateway, admin) = (server.gateway().clone(), server.admin.clone());
    tokio::spawn(async move {
        let id = first_pending(&gateway, &admin).await;
        let approved = admin.approve(&id, Some("fine")).await.unwrap();
        assert_eq!(approved.status, 200, "{:?}", approved.body);
        id
    })
}

#[tokio::test]
async fn a_body_nested_to_the_parsers_limit_is_recorded_and_reads_back() {
    let s = setup().await;
    // 127 levels in all: as deep as serde_json accepts, one level more once stored inside the target.
    let deep = format!(
        r#"{{"model": "gpt-fake", "messages": [{{"role": "user", "content": "deep"}}], "x": {}1{}}}"#,
        "[".repeat(126),
        "]".repeat(126)
    );
    let key = s.agent.key().unwrap().to_owned();
    let response = s
        .http
        .post(s.url("/llm/openai/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The answers nest one level past the test client's own parser, which then keeps them as text.
    let text = |body: &Value| body.as_str().map_or_else(|| body.to_string(), str::to_owned);
    let id = response.headers()["countersign-action-id"].to_str().unwrap().to_owned();
    let action = s.agent.get_action(&id).await.unwrap();
    assert_eq!(action.status, 200);
    let action = text(&action.body);
    assert!(action.contains(r#""state":"succeeded""#) && action.contains(r#""content":"deep""#), "{action}");
    let listed = s.server.admin.get("/v1/actions").await.unwrap();
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    assert!(text(&listed.body).contains(&id));
}

#[tokio::test]
async fn allowed_calls_are_forwarded_with_the_provider_key_and_audited() {
    let s = setup().await;
    let response = s
        .post(
            "/llm/openai/v1/chat/completions",
            &json!({"model": "gpt-fake", "max_tokens": 50, "messages": [{"role": "user", "content": "hello there"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let action = s.action(&response).await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: hello there");
    assert!(!body.to_string().contains(PROVIDER_KEY));

    let seen = s.provider.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {PROVIDER_KEY}").as_str());
    assert_eq!(seen[0].body["messages"][0]["content"], "hello there", "the body is forwarded as sent");

    assert_eq!(action["state"], "succeeded");
    assert_eq!(action["capability"], "llm.chat.completion");
    assert_eq!(action["params"]["model"], "gpt-fake");
    assert_eq!(action["params"]["max_tokens"], 50);
    assert_eq!(action["params"]["text"], "hello there");
    assert_eq!(action["reasoning"], json!({"source": "llm-proxy"}));
    assert_eq!(action["target"]["connector"], "llm");
    assert_eq!(action["result"]["status"], 200);

    let events = s.events(action["id"].as_str().unwrap()).await;
    let names: Vec<&str> = events.iter().filter_map(|e| e["action"].as_str()).collect();
    let executing = names.iter().position(|n| *n == "action.executing").unwrap();
    let executed = names.iter().position(|n| *n == "action.executed").unwrap();
    assert!(executing < executed, "{names:?}");
    let done = event(&events, "action.executed");
    assert_eq!(done["data"]["model"], "gpt-fake");
    assert_eq!(done["data"]["usage"]["input_tokens"], 7);
    assert_eq!(done["data"]["usage"]["output_tokens"], 3);
    assert_eq!(done["data"]["status"], 200);
    assert!(done["data"]["latency_ms"].is_number());
    for e in &events {
        assert!(!e.to_string().contains(PROVIDER_KEY), "the provider key is never audited");
    }
    // Carried out inline, it still had a recovery job, settled with the call in the finish transaction.
    let job = s.server.admin.get(&format!("/v1/jobs/{}", action["job_id"].as_str().unwrap())).await.unwrap();
    assert_eq!(job.body["state"], "succeeded", "{:?}", job.body);
    assert_eq!(job.body["attempts"], 1, "{:?}", job.body);
    assert_eq!(
        job.body["result"],
        json!({"action_id": action["id"], "state": "succeeded", "status": 200, "inline": true})
    );

    // Anthropic, with the key as x-api-key; and the other OpenAI endpoints.
    let response = s
        .post(
            "/llm/anthropic/v1/messages",
            &json!({"model": "claude-fake", "max_tokens": 64, "system": "be kind",
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi claude"}]}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let action = s.action(&response).await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["content"][0]["text"], "echo: hi claude");
    assert_eq!(action["capability"], "llm.messages.create");
    assert_eq!(action["params"]["text"], "be kind\nhi claude");
    let last = s.provider.requests().pop().unwrap();
    assert_eq!(last.headers["x-api-key"], PROVIDER_KEY);
    assert!(last.headers.get("anthropic-version").is_some());
    let events = s.events(action["id"].as_str().unwrap()).await;
    assert_eq!(event(&events, "action.executed")["data"]["usage"]["output_tokens"], 6);

    let embeddings =
        s.post("/llm/openai/v1/embeddings", &json!({"model": "fake-embed", "input": "vectors"})).send().await.unwrap();
    assert_eq!(embeddings.status(), 200);
    assert_eq!(s.action(&embeddings).await["capability"], "llm.embedding.create");
    let completions = s
        .post("/llm/openai/v1/completions", &json!({"model": "fake-instruct", "prompt": "once"}))
        .send()
        .await
        .unwrap();
    assert_eq!(completions.status(), 200);
    assert_eq!(s.action(&completions).await["capability"], "llm.completion.create");
    let models = s.http.get(s.url("/llm/openai/v1/models")).bearer_auth(s.agent.key().unwrap()).send().await.unwrap();
    assert_eq!(models.status(), 200);
    assert_eq!(models.json::<Value>().await.unwrap()["data"][0]["id"], "gpt-fake");
    // The list goes out with the provider's key: not for user keys, nor for a session without llm.* scope.
    let listed = s.provider.count();
    let as_user = s.http.get(s.url("/llm/openai/v1/models")).bearer_auth(s.server.admin.key().unwrap()).send().await;
    assert_eq!(as_user.unwrap().status(), 403);
    let session = s.agent.create_session(None, None, Some(&["email.*".to_owned()])).await.unwrap();
    assert_eq!(session.status, 201, "{:?}", session.body);
    let token = session.str("/token").to_owned();
    let scoped = s.http.get(s.url("/llm/openai/v1/models")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(scoped.status(), 403);
    assert!(scoped.json::<Value>().await.unwrap()["error"]["message"].as_str().unwrap().contains("llm.*"));
    assert_eq!(s.provider.count(), listed, "nothing reached the provider");

    // No key, a wrong key, an unknown provider, a dialect mismatch: provider-shaped errors, nothing sent.
    let before = s.provider.count();
    let anonymous = s.http.post(s.url("/llm/openai/v1/chat/completions")).json(&json!({})).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let unknown = s.post("/llm/nobody/v1/chat/completions", &json!({"model": "x"})).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    let unreadable = s.post("/llm/%FF/v1/chat/completions", &json!({"model": "x"})).send().await.unwrap();
    assert_eq!(unreadable.status(), 400);
    let unreadable: Value = unreadable.json().await.unwrap();
    assert!(unreadable["error"]["message"].as_str().unwrap().contains("provider name"), "{unreadable}");
    let mismatch = s.post("/llm/openai/v1/messages", &json!({"model": "x"})).send().await.unwrap();
    assert_eq!(mismatch.status(), 404);
    assert_eq!(mismatch.json::<Value>().await.unwrap()["type"], "error");
    // A path the proxy does not serve (here the base URL without its /v1) says which base URL to use, in the
    // provider's shape, before any key is checked.
    for (path, anthropic) in [("/llm/openai/chat/completions", false), ("/llm/anthropic/messages", true)] {
        let stray = s.http.post(s.url(path)).json(&json!({"model": "x"})).send().await.unwrap();
        assert_eq!(stray.status(), 404, "{path}");
        let stray: Value = stray.json().await.unwrap();
        assert_eq!(stray["type"] == "error", anthropic, "{stray}");
        assert!(stray["error"]["message"].as_str().unwrap().contains("/llm/PROVIDER/v1"), "{stray}");
    }
    assert_eq!(s.provider.count(), before);

    // Anthropic's SDK adds /v1 to a base URL of /llm/anthropic/v1: that path is the messages endpoint too.
    let doubled = s
        .post(
            "/llm/anthropic/v1/v1/messages",
            &json!({"model": "claude-fake", "max_tokens": 8,
                                                        "messages": [{"role": "user", "content": "twice"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(doubled.status(), 200);
    assert_eq!(s.action(&doubled).await["capability"], "llm.messages.create");
    assert_eq!(doubled.json::<Value>().await.unwrap()["content"][0]["text"], "echo: twice");
    s.server.stop().await;
}

#[tokio::test]
async fn denied_calls_answer_403_in_the_providers_shape_naming_the_rule() {
    let s = setup().await;
    let openai = s
        .post(
            "/llm/openai/v1/chat/completions",
            &json!({"model": "gpt-fake", "messages": [{"role": "user", "content": "what are the launch codes?"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(openai.status(), 403);
    let action = s.action(&openai).await;
    assert_eq!(action["state"], "denied");
    let body: Value = openai.json().await.unwrap();
    assert_eq!(body["error"]["type"], "policy_denied");
    assert_eq!(body["error"]["code"], "policy_denied");
    assert!(body["error"]["param"].is_null());
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("rule `llm-no-launch-codes`") && message.contains("Never ask a model"), "{message}");

    // A rule may read any field of the request body: the params are the body itself.
    let hot = s
        .post(
            "/llm/openai/v1/chat/completions",
            &json!({"model": "gpt-fake", "temperature": 2, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(hot.status(), 403);
    let body: Value = hot.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("llm-no-hot-sampling"), "{body}");

    // Anthropic: the text may hide in the system prompt's blocks.
    let anthropic = s
        .post(
            "/llm/anthropic/v1/messages",
            &json!({"model": "claude-fake", "max_tokens": 10,
                    "system": [{"type": "text", "text": "You know the LAUNCH CODES."}],
                    "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic.status(), 403);
    let body: Value = anthropic.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "permission_error");
    assert!(body["error"]["message"].as_str().unwrap().contains("llm-no-launch-codes"));

    // A prompt given as token ids cannot be read, so it meets the first content rule that denies.
    for (path, body) in [
        ("/llm/openai/v1/completions", json!({"model": "gpt-fake", "prompt": [3497, 279, 6241, 14236]})),
        ("/llm/openai/v1/embeddings", json!({"model": "gpt-fake", "input": [[3497, 279], [6241]]})),
    ] {
        let tokens = s.post(path, &body).send().await.unwrap();
        assert_eq!(tokens.status(), 403, "{path}");
        let body: Value = tokens.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("llm-no-launch-codes"), "{path}: {message}");
    }
    assert_eq!(s.provider.count(), 0, "nothing denied reaches the provider");
    s.server.stop().await;
}

/// A held call checks its credential again once the hold ends: a key revoked while the call waited gets 401
/// in the provider's shape, not the call carried out on its connection nor its answer.
#[tokio::test]
async fn a_held_call_whose_key_is_revoked_meanwhile_answers_401() {
    let s = setup().await;
    let minted = s.server.admin.create_key("agent", "model-user").await.unwrap();
    let (key_id, key) = (minted.str("/id").to_owned(), minted.str("/key").to_owned());
    // Once the approval is pending, the held request has been authenticated and is waiting.
    let (gateway, admin) = (s.server.gateway().clone(), s.server.admin.clone());
    let revoke_then_approve = tokio::spawn(async move {
        let id = first_pending(&gateway, &admin).await;
        assert_eq!(admin.revoke_key(&key_id).await.unwrap().status, 204);
        admin.approve(&id, None).await.unwrap().status
    });
    let response = s
        .http
        .post(s.url("/llm/openai/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-premium", "messages": [{"role": "user", "content": "premium please"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(revoke_then_approve.await.unwrap(), 200);
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("stopped working while the request waited") && message.contains("revoked"), "{message}");
    s.server.stop().await;
}

/// A model call from an agent that already holds its `rate_limit.open_waits` gets 429 in the provider's shape
/// (its SDK retries later) before anything is recorded: no action left pending for a client that was turned
/// away, no approver paged.
#[tokio::test]
async fn a_held_call_over_the_agents_open_waits_is_refused_with_a_429_and_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start().await;
    let mut config = llm_config(dir.path(), &provider.url);
    config.rate_limit.open_waits = 1;
    let server = TestServer::start_with(config, None).await;
    let agent = server.agent("model-user").await;
    let s = Setup { server, agent, provider, http: reqwest::Client::new(), _dir: dir };
    let premium = json!({"model": "gpt-premium", "messages": [{"role": "user", "content": "premium please"}]});
    let first = s.post("/llm/openai/v1/chat/completions", &premium).send();
    let first = tokio::spawn(first);
    metric_until(&s.server.admin, "countersign_open_waits", 1.0).await;

    let refused = s.post("/llm/openai/v1/chat/completions", &premium).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("1 waits open"), "{message}");
    let recorded = s.server.admin.get("/v1/actions?capability=llm.chat.completion").await.unwrap();
    assert_eq!(recorded.body["items"].as_array().unwrap().len(), 1, "only the first call is recorded");
    // A call the policy allows never waits, so it needs no open wait and goes through.
    let allowed = json!({"model": "gpt-fake", "messages": [{"role": "user", "content": "hello"}]});
    let allowed = s.post("/llm/openai/v1/chat/completions", &allowed).send().await.unwrap();
    assert_eq!(allowed.status(), 200);

    // The first call still holds its place: approved, it is carried out; the refused one never is.
    let approval = first_pending(s.server.gateway(), &s.server.admin).await;
    assert_eq!(s.server.admin.approve(&approval, None).await.unwrap().status, 200);
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(s.provider.count(), 2, "the allowed call and the approved one");
    s.server.stop().await;
}

#[tokio::test]
async fn held_calls_wait_for_the_decision_then_answer_with_the_real_response() {
    let s = setup().await;
    let approver = approve_when_pending(&s.server);
    let response = s
        .post(
            "/llm/openai/v1/chat/completions",
            &json!({"model": "gpt-premium", "messages": [{"role": "user", "content": "premium please"}]}),
        )
        .send()
        .await
        .unwrap();
    approver.await.unwrap();
    assert_eq!(response.status(), 200);
    let action = s.action(&response).await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "echo: premium please");
    assert_eq!(action["state"], "succeeded");
    assert_eq!(action["verdict"]["rule"], "llm-premium-models");
    // The live connection carried it out; the grace-period job became its recovery job and ended with the
    // call's outcome, and nothing ran twice.
    let events = s.events(action["id"].as_str().unwrap()).await;
    assert_eq!(event(&events, "action.executing")["data"]["inline"], true);
    assert_eq!(event(&events, "action.executing")["data"]["recovery_job_id"], action["job_id"]);
    let job = s.server.admin.get(&format!("/v1/jobs/{}", action["job_id"].as_str().unwrap())).await.unwrap();
    assert_eq!(job.body["state"], "succeeded", "{:?}", job.body);
    assert_eq!(job.body["result"]["inline"], true, "{:?}", job.body);
    assert_eq!(s.provider.count(), 1);

    // Streamed and held: the approval arrives, then the chunks.
    let approver = approve_when_pending(&s.server);
    let response = s
        .post(
            "/llm/anthropic/v1/messages",
            &json!({"model": "claude-opus-9", "max_tokens": 10, "stream": true,
                    "messages": [{"role": "user", "content": "stream it"}]}),
        )
        .send()
        .await
        .unwrap();
    approver.await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("message_stop") && text.contains("part4"), "{text}");

    // Denied by the approver: 403 naming the rule that held it.
    let (gateway, admin) = (s.server.gateway().clone(), s.server.admin.clone());
    let denier = tokio::spawn(async move {
        let id = first_pending(&gateway, &admin).await;
        admin.deny(&id, Some("no")).await.unwrap().status
    });
    let response = s
        .post(
            "/llm/openai/v1/chat/completions",
            &json!({"model": "gpt-fake", "messages": [{"role": "user", "content": "please wire the money"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(denier.await.unwrap(), 200);
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("llm-money-talk"), "{body}");
    assert_eq!(s.provider.count(), 2);
    s.server.stop().await;
}

#[tokio::test]
async fn a_held_call_nobody_decides_expires_with_a_403() {
    let s = setup().await;
    let started = Instant::now();
    let response = s
        .post(
            "/llm/openai/v1/chat/completions",
            &json!({"model": "review-fast-1", "messages": [{"role": "user", "content": "anyone?"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(started.elapsed() >= Duration::from_millis(1500), "held until the 2 s approval timeout");
    let action = s.action(&response).await;
    assert_eq!(action["state"], "expired");
    let body: Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("expired") && message.contains("llm-quick-review"), "{message}");
    assert_eq!(s.provider.count(), 0);
    s.server.stop().await;
}

/// The job carries out an approved stream to its end: like a relayed stream, only the silence between
/// chunks is bounded, not the whole answer (the fake's stream runs longer than the provider's 2 s timeout).
#[tokio::test]
async fn an_approved_stream_run_by_the_job_is_not_cut_off_at_the_timeout() {
    let s = setup().await;
    let body = json!({"model": "gpt-premium", "stream": true, "messages": [{"role": "user", "content": "stream it"}]});
    let response = s.post("/llm/openai/v1/chat/completions", &body).header("Countersign-Wait", "0").send().await;
    let response = response.unwrap();
    assert_eq!(response.status(), 202);
    let token = response.json::<Value>().await.unwrap()["approval_token"].as_str().unwrap().to_owned();
    approve_when_pending(&s.server).await.unwrap();
    let stored = s.stored_result(&token).await;
    assert_eq!(stored["state"], "succeeded", "{stored}");
    let streamed = stored["result"]["body"].as_str().unwrap_or_default();
    assert!(streamed.contains(&format!("part{}", STREAM_CHUNKS - 1)) && streamed.contains("[DONE]"), "{streamed}");
    // Usage was asked for and recorded, and the chunk that carried it is not in the answer the client gets.
    assert!(!streamed.contains("\"usage\""), "{streamed}");
    let events = s.events(stored["action_id"].as_str().unwrap()).await;
    assert_eq!(event(&events, "action.executed")["data"]["usage"]["input_tokens"], 7, "{events:?}");
    s.server.stop().await;
}

/// A hold that runs out undecided (here the `Countersign-Wait` asked for) answers 504 in the provider's shape
/// with how to follow the approval and `x-should-retry: false`, not a 2xx an SDK would read as the model's
/// answer; the call stays pending. (Once approved its job carries it out after the grace period, as for a
/// client that left: `a_held_call_whose_client_left_is_carried_out_by_the_job_after_the_grace_period`.)
#[tokio::test]
async fn a_hold_that_runs_out_or_an_answer_past_the_clients_timeout_gets_504_that_sdks_do_not_retry() {
    let s = setup().await;
    let body = json!({"model": "claude-opus-9", "max_tokens": 8, "messages": [{"role": "user", "content": "soon?"}]});
    let response = s.post("/llm/anthropic/v1/messages", &body).header("Countersign-Wait", "1").send().await.unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["error"]["type"], "approval_required", "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("no one has decided yet"), "{answer}");
    assert!(answer["approval_token"].as_str().unwrap().starts_with("cs_ap_"), "{answer}");
    let status = s.http.get(answer["poll_url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(status.json::<Value>().await.unwrap()["status"], "pending");
    assert_eq!(s.provider.count(), 0);
    let denied = s.server.admin.deny(answer["approval_id"].as_str().unwrap(), None).await.unwrap();
    assert_eq!(denied.status, 200, "{:?}", denied.body);

    // Approved, but the provider would answer after the client's own timeout (4 s, as the SDK says; the slow
    // model takes 5 s): cut off before it, 504 with x-should-retry: false, recorded failed. Without the cut the
    // SDK would time out and send the call again, a new action held for approval again.
    let slow =
        json!({"model": "slow", "max_tokens": 5000, "messages": [{"role": "user", "content": "take your time"}]});
    let approver = approve_when_pending(&s.server);
    let response =
        s.post("/llm/anthropic/v1/messages", &slow).header("x-stainless-read-timeout", "4").send().await.unwrap();
    approver.await.unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let action = s.action(&response).await;
    assert_eq!(action["state"], "failed", "{action}");
    assert!(action["error"].as_str().unwrap().contains("client's own timeout"), "{action}");
    s.server.stop().await;
}

#[tokio::test]
async fn immediate_mode_answers_202_and_the_job_executes_after_approval() {
    let s = setup().await;
    let response = s
        .post(
            "/llm/openai/v1/chat/completions",
            &json!({"model": "gpt-fake", "max_completion_tokens": 5000,
                    "messages": [{"role": "user", "content": "long answer"}]}),
        )
        .header("Countersign-Wait", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "approval_required");
    assert_eq!(body["error"]["policy"], "llm-big-budget");
    assert_eq!(body["error"]["agent"], "model-user");
    assert!(body["error"]["message"].as_str().unwrap().contains("4000 tokens"));
    assert!(body["expires_at"].is_string());
    let token = body["approval_token"].as_str().unwrap().to_owned();
    assert!(body["poll_url"].as_str().unwrap().ends_with(&token));
    assert_eq!(s.provider.count(), 0);

    let result_url = s.url(&format!("/v1/approval-status/{token}/result"));
    assert_eq!(s.http.get(&result_url).send().await.unwrap().status(), 409, "no result before approval");
    approve_when_pending(&s.server).await.unwrap();
    let stored = s.stored_result(&token).await;
    assert_eq!(stored["state"], "succeeded", "{stored}");
    assert_eq!(stored["result"]["status"], 200);
    assert_eq!(stored["result"]["body"]["choices"][0]["message"]["content"], "echo: long answer");
    let seen = s.provider.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {PROVIDER_KEY}").as_str());
    let events = s.events(stored["action_id"].as_str().unwrap()).await;
    assert_eq!(event(&events, "action.executed")["data"]["usage"]["input_tokens"], 7);

    // Each condition routes a call to approval: model list, token threshold, content pattern.
    for (body, rule) in [
        (json!({"model": "gpt-premium", "messages": []}), "llm-premium-models"),
        (json!({"model": "gpt-fake", "max_tokens": 4001, "messages": []}), "llm-big-budget"),
        (
            json!({"model": "gpt-fake", "messages": [{"role": "user", "content": [{"type": "text", "text": "Wire the MONEY"}]}]}),
            "llm-money-talk",
        ),
        (json!({"model": "gpt-fake", "max_tokens": 4000, "messages": []}), ""),
    ] {
        let response =
            s.post("/llm/openai/v1/chat/completions", &body).header("Countersign-Wait", "0").send().await.unwrap();
        if rule.is_empty() {
            assert_eq!(response.status(), 200, "at the threshold is not above it");
        } else {
            assert_eq!(response.status(), 202, "{body}");
            assert_eq!(response.json::<Value>().await.unwrap()["error"]["policy"], rule);
        }
    }
    // A PDF, a file by id or a document by URL is text no content pattern can read: listed in
    // params.unreadable, it meets the content patterns of the rules that deny or hold, and the first of them
    // (here a deny) decides. A plain-text document is text, read by the patterns.
    let before = s.provider.count();
    let pdf_part =
        json!({"type": "file", "file": {"filename": "memo.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}});
    for (path, content, listed) in [
        (
            "/llm/openai/v1/chat/completions",
            json!([{"type": "text", "text": "summarise"}, pdf_part]),
            "file memo.pdf (inline)",
        ),
        (
            "/llm/openai/v1/chat/completions",
            json!([{"type": "file", "file": {"file_id": "file-abc123"}}]),
            "file file-abc123",
        ),
        (
            "/llm/anthropic/v1/messages",
            json!([{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}]),
            "document (base64, application/pdf)",
        ),
        (
            "/llm/anthropic/v1/messages",
            json!([{"type": "document", "source": {"type": "url", "url": "https://example.com/memo.pdf"}}]),
            "document (url)",
        ),
    ] {
        let body = json!({"model": "gpt-fake", "max_tokens": 8, "messages": [{"role": "user", "content": content}]});
        let response = s.post(path, &body).header("Countersign-Wait", "0").send().await.unwrap();
        assert_eq!(response.status(), 403, "{body}");
        let action = s.action(&response).await;
        assert_eq!(action["params"]["unreadable"], json!([listed]), "{action}");
        let answer: Value = response.json().await.unwrap();
        assert!(answer["error"]["message"].as_str().unwrap().contains("llm-no-launch-codes"), "{answer}");
    }
    assert_eq!(s.provider.count(), before, "nothing unreadable reached the provider");
    let document = |source: Value| {
        json!({"model": "claude-fake", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "document", "source": source}, {"type": "text", "text": "summarise"}]}]})
    };
    let text = document(json!({"type": "text", "media_type": "text/plain", "data": "minutes of the meeting"}));
    let response = s.post("/llm/anthropic/v1/messages", &text).header("Countersign-Wait", "0").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(s.action(&response).await["params"]["unreadable"], json!([]));
    s.server.stop().await;
}

#[tokio::test]
async fn upstream_failures_answer_502_or_504_in_the_providers_shape_and_are_recorded() {
    let s = setup().await;
    let chat = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "x"}]});
    for (path, body, status, error) in [
        ("/llm/openai/v1/chat/completions", chat("fail-500"), 502, "upstream answered 500"),
        ("/llm/openai/v1/chat/completions", chat("bad-json"), 502, "not valid JSON"),
        ("/llm/openai/v1/chat/completions", chat("slow"), 504, "timed out"),
        ("/llm/down/v1/chat/completions", chat("gpt-fake"), 502, "connection failed"),
        ("/llm/anthropic/v1/messages", json!({"model": "fail-500", "max_tokens": 5, "messages": []}), 502, "500"),
    ] {
        let response = s.post(path, &body).send().await.unwrap();
        assert_eq!(response.status(), status, "{path} {body}");
        let action = s.action(&response).await;
        let answer: Value = response.json().await.unwrap();
        let message = if path.ends_with("messages") {
            assert_eq!(answer["type"], "error");
            answer["error"]["message"].as_str().unwrap().to_owned()
        } else {
            assert!(answer["error"]["type"].is_string());
            answer["error"]["message"].as_str().unwrap().to_owned()
        };
        assert!(message.starts_with("Countersign"), "{message}");
        assert_eq!(action["state"], "failed", "{action}");
        assert!(action["error"].as_str().unwrap().contains(error), "{action}");
        let events = s.events(action["id"].as_str().unwrap()).await;
        assert!(event(&events, "action.failed")["data"]["error"].as_str().unwrap().contains(error));
    }
    // The provider's wait is measured by provider and outcome: a 500 and a page that is not JSON were
    // answers; a timeout and a refused connection were not.
    let metrics = s.server.admin.get("/metrics").await.unwrap();
    let text = metrics.body.as_str().unwrap();
    let upstream = |labels: &str| metric(text, &format!("countersign_llm_upstream_seconds_count{{{labels}}}"));
    assert_eq!(upstream(r#"provider="openai",outcome="answered""#), Some(2.0), "{text}");
    assert_eq!(upstream(r#"provider="openai",outcome="failed""#), Some(1.0), "{text}");
    assert_eq!(upstream(r#"provider="down",outcome="failed""#), Some(1.0), "{text}");
    assert_eq!(upstream(r#"provider="anthropic",outcome="answered""#), Some(1.0), "{text}");
    // Each call's claim deferred its sync and its finish made it durable.
    let commits = |sync: &str| metric(text, &format!("countersign_store_commit_seconds_count{{sync=\"{sync}\"}}"));
    assert_eq!(commits("deferred"), Some(5.0), "{text}");
    assert!(commits("durable").is_some_and(|n| n >= 5.0), "{text}");
    s.server.stop().await;
}

/// Reads a streamed body, noting when each piece arrived.
async fn arrivals(response: reqwest::Response) -> (Vec<Duration>, String) {
    let started = Instant::now();
    let mut times = Vec::new();
    let mut text = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        times.push(started.elapsed());
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    (times, text)
}

#[tokio::test]
async fn streams_are_relayed_chunk_by_chunk_as_they_arrive() {
    let s = setup().await;
    let whole = CHUNK_DELAY * u32::try_from(STREAM_CHUNKS + 3).unwrap();
    for (path, body, usage_field, usage) in [
        (
            "/llm/openai/v1/chat/completions",
            json!({"model": "gpt-fake", "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "stream"}]}),
            "input_tokens",
            7,
        ),
        (
            "/llm/anthropic/v1/messages",
            json!({"model": "claude-fake", "stream": true, "max_tokens": 20,
                   "messages": [{"role": "user", "content": "stream"}]}),
            "output_tokens",
            6,
        ),
    ] {
        let response = s.post(path, &body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let id = response.headers()["countersign-action-id"].to_str().unwrap().to_owned();
        let (times, text) = arrivals(response).await;
        assert!(times.len() >= STREAM_CHUNKS, "{path}: the body came in {} pieces", times.len());
        let first = times[0];
        let last = *times.last().unwrap();
        assert!(last >= whole - CHUNK_DELAY, "{path}: the stream lasted {last:?}");
        assert!(first + CHUNK_DELAY * 3 < last, "{path}: first chunk at {first:?}, last at {last:?}: buffered?");
        assert!(text.contains("part0") && text.contains("part4"));

        let action = s.agent.get_action(&id).await.unwrap().body;
        assert_eq!(action["state"], "succeeded", "the outcome is recorded before the stream ends: {action}");
        let events = s.events(&id).await;
        let done = event(&events, "action.executed");
        assert_eq!(done["data"]["usage"][usage_field], usage, "{done}");
        assert_eq!(done["data"]["streamed"], true);
        assert!(done["data"]["first_chunk_ms"].as_u64().unwrap() < done["data"]["latency_ms"].as_u64().unwrap());
    }
    s.server.stop().await;
}

/// A stream the provider closes after an error event (Anthropic's overloaded_error), or mid-answer without
/// saying it was complete (no `[DONE]`), reaches the client as it came and is recorded `failed`, saying why,
/// not `succeeded`.
#[tokio::test]
async fn a_stream_that_ends_with_an_error_or_cut_short_is_recorded_failed() {
    let s = setup().await;
    for (path, body, why) in [
        (
            "/llm/anthropic/v1/messages",
            json!({"model": "overloaded-stream", "stream": true, "max_tokens": 20,
                   "messages": [{"role": "user", "content": "busy?"}]}),
            "reported an error: overloaded_error: Overloaded",
        ),
        (
            "/llm/openai/v1/chat/completions",
            json!({"model": "cut-stream", "stream": true, "messages": [{"role": "user", "content": "cut"}]}),
            "ended before it said it was complete",
        ),
    ] {
        let response = s.post(path, &body).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let id = response.headers()["countersign-action-id"].to_str().unwrap().to_owned();
        let (_, text) = arrivals(response).await;
        assert!(text.contains("part4"), "{path}: {text}");
        let action = s.agent.get_action(&id).await.unwrap().body;
        assert_eq!(action["state"], "failed", "{path}: {action}");
        assert!(action["error"].as_str().unwrap().contains(why), "{path}: {action}");
        let events = s.events(&id).await;
        assert!(event(&events, "action.failed")["data"]["error"].as_str().unwrap().contains(why), "{events:?}");
    }
    // The same stream carried out by the job (held by a content rule, approved, not waited for) is judged the
    // same way.
    let body = json!({"model": "cut-stream", "stream": true,
                      "messages": [{"role": "user", "content": "please wire the money"}]});
    let response = s.post("/llm/openai/v1/chat/completions", &body).header("Countersign-Wait", "0").send().await;
    let token = response.unwrap().json::<Value>().await.unwrap()["approval_token"].as_str().unwrap().to_owned();
    approve_when_pending(&s.server).await.unwrap();
    let stored = s.stored_result(&token).await;
    assert_eq!(stored["state"], "failed", "{stored}");
    s.server.stop().await;
}

#[tokio::test]
async fn stream_usage_is_recorded_without_the_client_asking_and_version_headers_pass_on() {
    let s = setup().await;
    // OpenAI sends usage on a stream only when asked: the gateway asks, records it, and drops the extra
    // chunk, so the client gets the stream it asked for.
    let body = json!({"model": "gpt-fake", "stream": true, "messages": [{"role": "user", "content": "count me"}]});
    let response =
        s.post("/llm/openai/v1/chat/completions", &body).header("openai-beta", "assistants=v2").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["countersign-action-id"].to_str().unwrap().to_owned();
    let (_, text) = arrivals(response).await;
    assert!(text.contains("part4") && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"usage\""), "the usage chunk the client did not ask for reached it: {text}");
    let sent = s.provider.requests().into_iter().last().unwrap();
    assert_eq!(sent.body["stream_options"]["include_usage"], true, "{:?}", sent.body);
    assert_eq!(sent.headers["openai-beta"], "assistants=v2");
    let events = s.events(&id).await;
    assert_eq!(event(&events, "action.executed")["data"]["usage"]["input_tokens"], 7);
    let action = s.agent.get_action(&id).await.unwrap().body;
    assert_eq!(action["target"]["body"].get("stream_options"), None, "the frozen request is the agent's own");
    assert_eq!(action["target"]["headers"]["openai-beta"], "assistants=v2");
    assert_eq!(action["params"]["headers"]["openai-beta"], "assistants=v2", "rules can match it: {action}");
    // `stream_options` that is not an object is the provider's to judge: sent as it came, nothing added.
    let odd = json!({"model": "gpt-fake", "stream": true, "stream_options": "yes", "messages": [{"role": "user", "content": "x"}]});
    let response = s.post("/llm/openai/v1/chat/completions", &odd).send().await.unwrap();
    assert_eq!(response.status(), 200);
    arrivals(response).await;
    assert_eq!(s.provider.requests().into_iter().last().unwrap().body["stream_options"], "yes");

    // Anthropic: the client's version and beta headers reach the provider, once each; others do not.
    let body = json!({"model": "claude-fake", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    let response = s
        .post("/llm/anthropic/v1/messages", &body)
        .header("anthropic-version", "2023-01-01")
        .header("anthropic-beta", "tools-2024-04-04")
        .header("x-custom-thing", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sent = s.provider.requests().into_iter().last().unwrap();
    let versions: Vec<_> = sent.headers.get_all("anthropic-version").iter().collect();
    assert_eq!(versions, ["2023-01-01"]);
    assert_eq!(sent.headers["anthropic-beta"], "tools-2024-04-04");
    assert!(sent.headers.get("x-custom-thing").is_none());
    s.server.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_fails_the_action() {
    let s = setup().await;
    let response = s
        .post(
            "/llm/openai/v1/chat/completions",
            &json!({"model": "gpt-fake", "stream": true, "messages": [{"role": "user", "content": "bye"}]}),
        )
        .send()
        .await
        .unwrap();
    let id = response.headers()["countersign-action-id"].to_str().unwrap().to_owned();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let action = s.agent.wait_action(&id, 10.0).await.unwrap().body;
    assert_eq!(action["state"], "failed", "{action}");
    assert!(action["error"].as_str().unwrap().contains("disconnected"), "{action}");
    s.server.stop().await;
}

#[tokio::test]
async fn a_held_call_whose_client_left_is_carried_out_by_the_job_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start().await;
    let mut config = llm_config(dir.path(), &provider.url);
    config.jobs.llm_hold_grace = Duration::from_millis(500);
    let server = TestServer::start_with(config, None).await;
    let agent = server.agent("impatient").await;
    let gave_up = reqwest::Client::new()
        .post(format!("{}/llm/openai/v1/chat/completions", agent.base()))
        .bearer_auth(agent.key().unwrap())
        .json(&json!({"model": "gpt-premium", "messages": [{"role": "user", "content": "later is fine"}]}))
        // Long enough to be submitted and held on a slow machine; nobody decides before it gives up.
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client gave up while the call was held");
    approve_when_pending(&server).await.unwrap();
    let page = server.admin.get("/v1/actions?capability=llm.chat.completion").await.unwrap();
    let id = page.body["items"][0]["id"].as_str().unwrap().to_owned();
    let action = agent.wait_action(&id, 10.0).await.unwrap().body;
    assert_eq!(action["state"], "succeeded", "{action}");
    assert_eq!(action["result"]["body"]["choices"][0]["message"]["content"], "echo: later is fine");
    assert_eq!(provider.count(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_hangs_up_on_a_non_streamed_call_leaves_it_finished() {
    let s = setup().await;
    let gave_up = s
        .post(
            "/llm/openai/v1/chat/completions",
            &json!({"model": "slow", "messages": [{"role": "user", "content": "x"}]}),
        )
        // Long enough to reach the provider on a slow machine, short of its 2 s timeout (it answers after 5 s).
        .timeout(Duration::from_secs(1))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client hung up before the provider answered");
    let page = s.server.admin.get("/v1/actions?capability=llm.chat.completion").await.unwrap();
    let id = page.body["items"][0]["id"].as_str().unwrap().to_owned();
    let action = s.agent.wait_action(&id, 10.0).await.unwrap().body;
    assert_eq!(action["state"], "failed", "{action}");
    assert!(action["error"].as_str().unwrap().contains("disconnected"), "{action}");
    let job = s.server.admin.get(&format!("/v1/jobs/{}", action["job_id"].as_str().unwrap())).await.unwrap();
    assert_eq!(job.body["state"], "failed", "{:?}", job.body);
    assert_eq!(s.provider.count(), 1);
    // The wait for the provider, cut off with the request, is measured as abandoned, not lost.
    let metrics = s.server.admin.get("/metrics").await.unwrap();
    let text = metrics.body.as_str().unwrap();
    let upstream = |outcome: &str| {
        metric(text, &format!(r#"countersign_llm_upstream_seconds_count{{provider="openai",outcome="{outcome}"}}"#))
    };
    assert_eq!(upstream("abandoned"), Some(1.0), "{text}");
    assert_eq!((upstream("answered"), upstream("failed")), (None, None), "{text}");
    s.server.stop().await;
}

/// An allowed model call submitted through the gateway as the proxy submits it: claimed for the caller in the
/// submission's own transaction, with its recovery job.
async fn submit_in_flight(
    gateway: &countersign::gateway::Gateway,
    caller: &countersign::gateway::Caller,
) -> countersign::gateway::SubmitOutcome {
    use countersign::gateway::SubmitRequest;
    use countersign_core::capability::Capability;
    use countersign_core::domain::{LlmTarget, Target};

    let body = json!({"model": "gpt-fake", "messages": [{"role": "user", "content": "in flight"}]});
    gateway
        .submit_inline(
            caller,
            SubmitRequest {
                capability: Capability::parse("llm.chat.completion").unwrap(),
                params: json!({"provider": "openai", "model": "gpt-fake", "text": "in flight"}),
                reasoning: json!({"source": "llm-proxy"}).to_string(),
                target: Some(Target::Llm(LlmTarget {
                    provider: "openai".into(),
                    path: "/v1/chat/completions".into(),
                    body,
                    headers: Default::default(),
                    held: true,
                })),
                idempotency_key: None,
            },
        )
        .await
        .unwrap()
}

/// The finish of an inline call writes the action and its recovery job as the claim left them, each write
/// checking that they still are. If the call outlived its deadline and the runner took the job meanwhile, the
/// outcome is recorded from what the store holds: the action ends with the answer, once, the job stays the
/// runner's, and the audit chain still verifies (the rolled-back attempt had sealed an event after the head). If the
/// action was ended meanwhile, the finish is a conflict and writes nothing.
#[tokio::test]
async fn an_inline_finish_after_its_recovery_job_was_taken_records_from_the_store() {
    let s = setup().await;
    let gateway = s.server.gateway().clone();
    let caller = gateway.authenticate(s.agent.key().unwrap()).await.unwrap();
    let outcome = |text: &str| countersign::gateway::InlineOutcome {
        succeeded: true,
        result: Some(json!({"status": 200, "body": text})),
        error: None,
        details: json!({"provider": "openai", "streamed": false}),
    };
    let executed = |events: Vec<Value>| events.iter().filter(|e| e["action"] == "action.executed").count();

    // The runner takes the recovery job (as once it falls due) before the call's answer is recorded.
    let claimed = submit_in_flight(&gateway, &caller).await.action;
    let job_id = claimed.job_id.clone().unwrap().to_string();
    let mut tx = gateway.store().write().await.unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let taken = tx.claim_job(later, "runner", later).await.unwrap().unwrap();
    tx.commit().await.unwrap();
    assert_eq!(taken.id.to_string(), job_id);
    gateway.finish_inline(&claimed, outcome("answered late")).await.unwrap();
    let action = s.server.admin.get(&format!("/v1/actions/{}", claimed.id)).await.unwrap().body;
    assert_eq!(action["state"], "succeeded", "{action}");
    assert_eq!(action["result"]["body"], "answered late", "{action}");
    let job = s.server.admin.get(&format!("/v1/jobs/{job_id}")).await.unwrap().body;
    assert_eq!((&job["state"], &job["attempts"]), (&json!("running"), &json!(1)), "the runner's to settle: {job}");
    assert_eq!(executed(s.events(claimed.id.as_str()).await), 1);

    // The action ended meanwhile (the recovery job failed it): a conflict, and nothing written.
    let claimed = submit_in_flight(&gateway, &caller).await.action;
    let mut tx = gateway.store().write().await.unwrap();
    let failed = countersign_core::domain::Action {
        state: countersign_core::state::ActionState::Failed,
        error: Some("outcome unknown".into()),
        finished_at: Some(chrono::Utc::now()),
        ..claimed.clone()
    };
    tx.update_action(&failed).await.unwrap();
    tx.commit().await.unwrap();
    let err = gateway.finish_inline(&claimed, outcome("too late")).await.unwrap_err();
    assert_eq!(err.kind(), countersign::error::ErrorKind::Conflict, "{err}");
    assert!(!matches!(err, countersign::error::Error::Stale(_)), "read again before answering: {err}");
    let action = s.server.admin.get(&format!("/v1/actions/{}", claimed.id)).await.unwrap().body;
    assert_eq!((&action["state"], &action["result"]), (&json!("failed"), &Value::Null), "{action}");
    let job = s.server.admin.get(&format!("/v1/jobs/{}", claimed.job_id.clone().unwrap())).await.unwrap().body;
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(executed(s.events(claimed.id.as_str()).await), 0);

    let verify = s.server.admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verify.body["ok"], true, "{:?}", verify.body);
    assert_eq!(s.provider.count(), 0);
    s.server.stop().await;
}

/// The process carrying an allowed call inline dies after sending it: claim and send go through the gateway
/// as the proxy does them, then nothing records the answer, and the server stops. The recovery job written
/// with the claim, due after the provider's timeout and the margin, ends the action `failed` with
/// `outcome unknown` after the restart, audited, and the provider saw exactly one request.
#[tokio::test]
async fn an_inline_call_cut_off_by_a_crash_ends_failed_outcome_unknown_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start().await;
    let config = || {
        let mut config = llm_config(dir.path(), &provider.url);
        config.jobs.llm_recovery_margin = Duration::from_millis(500);
        config
    };
    let server = TestServer::start_with(config(), None).await;
    let agent = server.agent("cut-off").await;
    let gateway = server.gateway().clone();
    let caller = gateway.authenticate(agent.key().unwrap()).await.unwrap();
    let submitted = submit_in_flight(&gateway, &caller).await;
    // Allowed inline: claimed for the caller in the submission's own transaction.
    assert_eq!(submitted.action.state.as_str(), "executing");
    assert!(submitted.claimed);
    let claimed = submitted.action;
    assert!(gateway.claim_inline(&caller, &claimed.id).await.unwrap().is_none(), "claimed once only");
    let id = claimed.id.to_string();
    let job_id = claimed.job_id.clone().expect("the claim writes the recovery job").to_string();

    // Claimed: executing, with a queued, lease-free job due past the provider's timeout (2 s) and margin.
    let job = server.admin.get(&format!("/v1/jobs/{job_id}")).await.unwrap().body;
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(job["kind"], "action.execute");
    assert_eq!(job["subject"], id.as_str());
    let run_at = chrono::DateTime::parse_from_rfc3339(job["run_at"].as_str().unwrap()).unwrap();
    let started = claimed.started_at.unwrap();
    assert!(run_at >= started + chrono::Duration::milliseconds(2499), "{run_at} vs {started}");
    // A long stream pushes the deadline on while it runs.
    tokio::time::sleep(Duration::from_millis(20)).await;
    gateway.keep_inline(&claimed).await.unwrap();
    let pushed = server.admin.get(&format!("/v1/jobs/{job_id}")).await.unwrap().body;
    let pushed = chrono::DateTime::parse_from_rfc3339(pushed["run_at"].as_str().unwrap()).unwrap();
    assert!(pushed > run_at, "{pushed} after {run_at}");
    // While the call is in flight, nobody can cancel the only thing that would settle it.
    let cancel = server.admin.post(&format!("/v1/jobs/{job_id}/cancel"), &json!({})).await.unwrap();
    assert_eq!(cancel.status, 409, "{:?}", cancel.body);

    // The request goes out; then the process "dies": nothing reads or records the answer.
    let (response, _) = gateway.send_inline(&claimed, false).await.unwrap();
    drop(response);
    drop(gateway);
    server.stop().await;
    assert_eq!(provider.count(), 1);

    let server = TestServer::start_with(config(), None).await;
    let action = server.admin.wait_action(&id, 20.0).await.unwrap().body;
    assert_eq!(action["state"], "failed", "{action}");
    assert!(action["error"].as_str().unwrap().contains("outcome unknown"), "{action}");
    let job = server.admin.get(&format!("/v1/jobs/{job_id}/wait?timeout=10")).await.unwrap().body;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap().contains("outcome unknown"), "{job}");

    let query = AuditQuery { subject: Some(id.clone()), ..AuditQuery::default() };
    let events = server.admin.query_audit(&query).await.unwrap().body["events"].as_array().cloned().unwrap();
    let names: Vec<&str> = events.iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(names.iter().filter(|n| **n == "action.executing").count(), 1, "{names:?}");
    let failed = event(&events, "action.failed");
    assert_eq!(failed["data"]["reason"], "outcome_unknown", "{failed}");
    assert!(!names.contains(&"action.executed"), "{names:?}");
    let verify = server.admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verify.body["ok"], true, "{:?}", verify.body);

    // Nothing was sent again, during or after the recovery.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(provider.count(), 1, "a model call is never sent twice");
    server.stop().await;
}

/// Model requests have their own body limit (`llm_max_body_bytes`, 16 MiB by default): a request over the
/// general 1 MiB limit (here a 2 MiB base64 image) is governed and forwarded; one over the proxy's limit gets
/// 413 in each provider's error shape, naming the setting, and is neither recorded nor sent. The rest of the
/// API keeps the general limit.
#[tokio::test]
async fn model_requests_have_their_own_body_limit_answered_in_the_providers_shape() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start().await;
    let mut config = llm_config(dir.path(), &provider.url);
    assert_eq!(config.llm_max_body_bytes, countersign::config::DEFAULT_LLM_MAX_BODY_BYTES);
    config.llm_max_body_bytes = 3 * 1024 * 1024;
    let general = config.max_body_bytes;
    let server = TestServer::start_with(config, None).await;
    let agent = server.agent("model-user").await;
    let s = Setup { server, agent, provider, http: reqwest::Client::new(), _dir: dir };

    let image = format!("data:image/png;base64,{}", "iVBORw0K".repeat(2 * 1024 * 1024 / 8));
    let with_image = json!({"model": "gpt-fake", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is on this screen?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]}]});
    assert!(with_image.to_string().len() > general);
    let answered = s.post("/llm/openai/v1/chat/completions", &with_image).send().await.unwrap();
    assert_eq!(answered.status(), 200);
    assert_eq!(s.action(&answered).await["state"], "succeeded");
    assert_eq!(s.provider.count(), 1);

    let long = "many words ".repeat(4 * 1024 * 1024 / 11);
    let openai = s
        .post(
            "/llm/openai/v1/chat/completions",
            &json!({"model": "gpt-fake", "messages": [{"role": "user", "content": long}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(openai.status(), 413);
    assert!(openai.headers().get("countersign-action-id").is_none(), "a refused body is no action");
    let body: Value = openai.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("3145728 bytes") && message.contains("llm_max_body_bytes"), "{message}");

    let anthropic = s
        .post(
            "/llm/anthropic/v1/messages",
            &json!({"model": "claude-fake", "max_tokens": 10, "messages": [{"role": "user", "content": long}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic.status(), 413);
    let body: Value = anthropic.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], "request_too_large", "{body}");
    assert_eq!(s.provider.count(), 1, "nothing over the limit reaches the provider");

    // The caller is checked before the body is read: without a key, a body over the limit gets a 401.
    let anonymous = s
        .http
        .post(s.url("/llm/openai/v1/chat/completions"))
        .json(&json!({"model": "gpt-fake", "messages": [{"role": "user", "content": long}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    let actions = s.server.admin.get("/v1/actions?limit=10").await.unwrap();
    assert_eq!(actions.body["items"].as_array().map(Vec::len), Some(1), "{:?}", actions.body);

    // The rest of the API keeps the general limit.
    let over_general = vec![b' '; general + 1];
    let refused = s.server.admin.send_raw(reqwest::Method::POST, "/v1/actions", "application/json", over_general).await;
    assert_eq!(refused.unwrap().status, 413);
    s.server.stop().await;
}

/// A provider whose `orgs` leaves an org out is, for that org, a provider that is not configured.
#[tokio::test]
async fn a_provider_open_to_some_orgs_is_unknown_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start().await;
    let mut settings = llm_config(dir.path(), &provider.url);
    settings.llm.get_mut("openai").unwrap().orgs = countersign::config::OrgScope::only(["default"]);
    let server = TestServer::start_with(settings, None).await;
    let created = server.admin.post("/v1/orgs", &json!({"name": "other"})).await.unwrap();
    let other_admin = server.admin.with_key(created.str("/admin_key"));
    assert_eq!(other_admin.create_agent("obot").await.unwrap().status, 201);
    let key = other_admin.create_key("agent", "obot").await.unwrap().str("/key").to_owned();
    let http = reqwest::Client::new();
    let base = server.admin.base().to_owned();
    let chat = json!({"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]});
    let refused = http.post(format!("{base}/llm/openai/v1/chat/completions")).bearer_auth(&key).json(&chat).send();
    let refused = refused.await.unwrap();
    assert_eq!(refused.status(), 404);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("no model provider `openai`"), "{body}");
    let models = http.get(format!("{base}/llm/openai/v1/models")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(models.status(), 404);
    // Open to every org, the other provider serves it.
    let message = json!({"model": "claude-fake", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    let allowed = http.post(format!("{base}/llm/anthropic/v1/messages")).header("x-api-key", &key).json(&message);
    assert_eq!(allowed.send().await.unwrap().status(), 200);
    assert_eq!(provider.count(), 1, "only the open provider was called");
    server.stop().await;
}
