//! The core approval loop end to end: submit, policy outcomes, approvals with routing and quorum, exactly-once
//! replay, waiting, expiry, audit, sessions, policy reload, tenant isolation, restart, and bad input.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{TestServer, Upstream, action, http_action};

#[tokio::test]
async fn allowed_denied_and_held_actions() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let bot = server.agent("bot").await;

    let allowed = bot
        .submit_action(&json!({"capability": "email.send.message", "params": {"to": "a@b.c"},
                                "reasoning": {"goal": "say hi",  "why": "asked"}}))
        .await
        .unwrap();
    assert_eq!(allowed.status, 200, "{:?}", allowed.body);
    assert_eq!(allowed.str("/state"), "approved");
    assert_eq!(allowed.str("/verdict/rule"), "default");
    assert_eq!(allowed.body["reasoning"], json!({"goal": "say hi", "why": "asked"}));

    let denied = bot.submit_action(&action("db.delete.row")).await.unwrap();
    assert_eq!(denied.status, 403);
    assert!(denied.content_type.starts_with("application/problem+json"));
    assert_eq!(denied.str("/rule"), "no-deletes");
    assert!(denied.str("/action_id").starts_with("act_"));
    assert!(denied.str("/detail").contains("Deletes are never allowed"));

    let held = bot.submit_action(&action("payments.charge.card")).await.unwrap();
    assert_eq!(held.status, 202, "{:?}", held.body);
    assert_eq!(held.str("/state"), "pending_approval");
    assert!(held.str("/approval/token").starts_with("cs_ap_"));
    assert!(held.str("/approval/poll_url").ends_with(held.str("/approval/token")));
    assert!(held.str("/approval/id").starts_with("apr_"));
    // The token is shown once: reading the action again does not reveal it.
    let again = bot.get_action(held.str("/id")).await.unwrap();
    assert_eq!(again.body["approval"].get("token"), None);

    let status = server.admin.get(&format!("/v1/approval-status/{}", held.str("/approval/token"))).await.unwrap();
    assert_eq!(status.status, 200);
    assert_eq!(status.str("/status"), "pending");
    let mut fields: Vec<&str> = status.body.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["decided_at", "note", "status"], "the token reveals only the status");

    // Withdrawn by its agent: the approval leaves the queue, and its own trail says so.
    let approval_id = held.str("/approval/id");
    let cancelled = bot.post(&format!("/v1/actions/{}/cancel", held.str("/id")), &json!({})).await.unwrap();
    assert_eq!((cancelled.status, cancelled.str("/state")), (200, "cancelled"), "{:?}", cancelled.body);
    let trail = server.admin.get(&format!("/v1/audit?subject={approval_id}")).await.unwrap();
    let kinds: Vec<&str> =
        trail.body["events"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert!(kinds.contains(&"approval.requested") && kinds.contains(&"approval.cancelled"), "{kinds:?}");

    let verify = server.admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verify.body["ok"], json!(true), "{:?}", verify.body);
    assert!(verify.body["events"].as_u64().unwrap() >= 10);
    server.stop().await;
}

#[tokio::test]
async fn approval_replays_the_frozen_request_exactly_once_and_wakes_the_waiter() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let server = TestServer::start(dir.path(), Some(&upstream.url)).await;
    let bot = server.agent("bot").await;

    let held = bot.submit_action(&http_action("payments.charge.card")).await.unwrap();
    assert_eq!(held.status, 202, "{:?}", held.body);
    let action_id = held.str("/id").to_owned();
    let approval_id = held.str("/approval/id").to_owned();
    let token = held.str("/approval/token").to_owned();
    assert_eq!(upstream.count(), 0, "nothing reaches the upstream before approval");

    let early = server.admin.get(&format!("/v1/approval-status/{token}/result")).await.unwrap();
    assert_eq!(early.status, 409);

    let waiter = {
        let bot = bot.clone();
        let id = action_id.clone();
        tokio::spawn(async move { bot.wait_action(&id, 30.0).await.unwrap() })
    };
    // The approval list shows the agent's reasoning verbatim and what flagged it.
    let queue = server.admin.get("/v1/approvals?status=pending").await.unwrap();
    assert_eq!(queue.body["items"][0]["id"], json!(approval_id));
    assert_eq!(queue.body["items"][0]["rule"], json!("hold-charges"));
    assert_eq!(queue.body["items"][0]["snapshot"]["name"], json!("hold-charges"));
    assert_eq!(queue.body["items"][0]["reasoning"]["goal"], json!("charge the customer"));
    assert!(queue.body["items"][0]["risk"]["score"].as_f64().is_some());

    let started = Instant::now();
    let approved = server.admin.approve(&approval_id, Some("looks right")).await.unwrap();
    assert_eq!(approved.status, 200, "{:?}", approved.body);
    let woke = waiter.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(woke.str("/state"), "succeeded", "{:?}", woke.body);
    assert_eq!(woke.body["result"]["status"], json!(201));
    assert_eq!(woke.body["result"]["body"]["card_id"], json!("card_123"));

    let requests = upstream.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "replayed exactly once");
    assert_eq!(requests[0].path, "/v1/charges");
    assert_eq!(requests[0].headers["idempotency-key"], action_id.as_str());
    assert_eq!(requests[0].headers["authorization"], "Bearer upstream-secret");
    assert_eq!(requests[0].headers.get_all("x-tenant").iter().collect::<Vec<_>>(), ["acme"]);
    assert_eq!(&requests[0].body[..], br#"{"amount":1200,"currency":"eur"}"#);

    let again = server.admin.approve(&approval_id, None).await.unwrap();
    assert_eq!(again.status, 409);
    assert_eq!(again.str("/state"), "approved");

    let result = server.admin.get(&format!("/v1/approval-status/{token}/result")).await.unwrap();
    assert_eq!(result.status, 200);
    assert_eq!(result.body["result"]["body"]["card_id"], json!("card_123"));

    let trace = bot.get(&format!("/v1/actions/{action_id}/trace")).await.unwrap();
    let events: Vec<&str> =
        trace.body["events"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        events,
        [
            "action.submitted",
            "policy.evaluated",
            "approval.requested",
            "approval.decision",
            "approval.approved",
            "action.executing",
            "action.executed"
        ]
    );
    assert_eq!(upstream.count(), 1);
    server.stop().await;
}

/// What an agent may not put in a frozen request's headers: the forwarding and method-override family (which
/// a proxy in front of the upstream may trust to route or read the request as something else) and hop-by-hop
/// headers, refused at submission with 422 naming the header. Its own JSON media type is sent, once.
#[tokio::test]
async fn frozen_requests_carry_no_routing_headers_and_one_content_type() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let server = TestServer::start(dir.path(), Some(&upstream.url)).await;
    let bot = server.agent("bot").await;
    for name in ["X-Forwarded-Host", "x-forwarded-for", "Forwarded", "X-HTTP-Method-Override", "TE", "Upgrade"] {
        let mut submitted = http_action("email.send.message");
        submitted["target"]["headers"] = json!({name: "evil"});
        let refused = bot.submit_action(&submitted).await.unwrap();
        assert_eq!(refused.status, 422, "{name}: {:?}", refused.body);
        assert!(refused.str("/detail").contains(&format!("may not set `{name}`")), "{:?}", refused.body);
    }
    assert_eq!(upstream.count(), 0, "nothing refused was sent");

    let mut patch = http_action("email.send.message");
    patch["target"]["headers"] = json!({"Content-Type": "application/merge-patch+json", "X-Request-Source": "bot"});
    let sent = bot.submit_action(&patch).await.unwrap();
    assert_eq!(sent.status, 202, "allowed, and running: {:?}", sent.body);
    let done = bot.wait_action(sent.str("/id"), 10.0).await.unwrap();
    assert_eq!(done.str("/state"), "succeeded", "{:?}", done.body);
    let requests = upstream.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let types: Vec<_> = requests[0].headers.get_all("content-type").iter().collect();
    assert_eq!(types, ["application/merge-patch+json"], "one content type, the agent's");
    assert_eq!(&requests[0].body[..], br#"{"amount":1200,"currency":"eur"}"#);
    server.stop().await;

    // A content type the upstream's configuration sets is sent once (not beside application/json), and an
    // agent may not set its own.
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let mut config = crate::helpers::config(dir.path(), Some(&upstream.url));
    let configured = config.upstreams.get_mut("payments").unwrap();
    configured
        .headers
        .insert("Content-Type".into(), countersign::config::Secret::new("application/vnd.api+json".into()));
    let server = TestServer::start_with(config, None).await;
    let bot = server.agent("bot").await;
    let refused = bot.submit_action(&patch).await.unwrap();
    assert_eq!(refused.status, 422, "{:?}", refused.body);
    assert!(refused.str("/detail").contains("the upstream `payments` sets it"), "{:?}", refused.body);
    let sent = bot.submit_action(&http_action("email.send.message")).await.unwrap();
    let done = bot.wait_action(sent.str("/id"), 10.0).await.unwrap();
    assert_eq!(done.str("/state"), "succeeded", "{:?}", done.body);
    let requests = upstream.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let types: Vec<_> = requests[0].headers.get_all("content-type").iter().collect();
    assert_eq!(types, ["application/vnd.api+json"], "one content type, the configured one");
    server.stop().await;
}

#[tokio::test]
async fn routing_quorum_owner_and_who_may_decide() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let alice = server.user("alice", "approver").await;
    let bob = server.user("bob", "approver").await;
    let carol = server.user("carol", "approver").await;
    let outsider = server.user("dave", "approver").await;
    let viewer = server.user("vera", "viewer").await;
    // alice owns the agent: her approval never counts toward its quorum.
    let created = server.admin.post("/v1/agents", &json!({"name": "treasurer", "owner": "alice"})).await.unwrap();
    assert_eq!(created.status, 201, "{:?}", created.body);
    let key = server.admin.create_key("agent", "treasurer").await.unwrap();
    let bot = server.admin.with_key(key.str("/key"));

    let held = bot.submit_action(&action("finance.issue.card")).await.unwrap();
    assert_eq!(held.status, 202);
    assert_eq!(held.body["approval"]["group"], json!("finance"));
    assert_eq!(held.body["approval"]["quorum"], json!(2));
    let id = held.str("/approval/id").to_owned();

    assert_eq!(bot.approve(&id, None).await.unwrap().status, 403, "agents never decide");
    assert_eq!(viewer.approve(&id, None).await.unwrap().status, 403, "viewers never decide");
    // Validating a policy is an admin's (design §5): compiling patterns is work a reader could make huge.
    let policy = b"version: 1\nrules: []\n".to_vec();
    for (who, expected) in [(&viewer, 403), (&alice, 403), (&server.admin, 200)] {
        let validated = who.send_raw(reqwest::Method::POST, "/v1/policy/validate", "application/yaml", policy.clone());
        assert_eq!(validated.await.unwrap().status, expected);
    }
    assert_eq!(outsider.approve(&id, None).await.unwrap().status, 403, "not in the finance group");

    let owner = alice.approve(&id, Some("mine")).await.unwrap();
    assert_eq!(owner.status, 200);
    assert_eq!(owner.body["approvals"], json!(0));
    assert_eq!(owner.body["decisions"][0]["counted"], json!(false));
    let first = bob.approve(&id, None).await.unwrap();
    assert_eq!(first.str("/status"), "pending");
    assert_eq!(bob.approve(&id, None).await.unwrap().status, 409, "distinct approvers only");
    let second = carol.approve(&id, Some("ok")).await.unwrap();
    assert_eq!(second.str("/status"), "approved", "{:?}", second.body);
    assert_eq!(bot.get_action(held.str("/id")).await.unwrap().str("/state"), "approved");

    // One deny denies.
    let held = bot.submit_action(&action("finance.issue.card")).await.unwrap();
    let id = held.str("/approval/id").to_owned();
    assert_eq!(bob.approve(&id, None).await.unwrap().status, 200);
    let denied = carol.deny(&id, Some("no")).await.unwrap();
    assert_eq!(denied.str("/status"), "denied");
    let waited = bot.post("/v1/actions?wait=0.2", &action("finance.issue.card")).await.unwrap();
    assert_eq!(waited.status, 202, "still pending after the wait");
    let status = server.admin.get(&format!("/v1/approval-status/{}", held.str("/approval/token"))).await.unwrap();
    assert_eq!(status.str("/status"), "denied");
    assert_eq!(status.str("/note"), "no");

    // An approval counts only while its author still may decide: bob, disabled, no longer makes up the quorum.
    let held = bot.submit_action(&action("finance.issue.card")).await.unwrap();
    let id = held.str("/approval/id").to_owned();
    assert_eq!(bob.approve(&id, Some("looks fine to me")).await.unwrap().str("/status"), "pending");
    let token = held.str("/approval/token");
    let status = server.admin.get(&format!("/v1/approval-status/{token}")).await.unwrap();
    assert_eq!(status.body["note"], json!(null), "a partial approval's note stays with approvers");
    let users = server.admin.list_users().await.unwrap();
    let bob_id = users.body["items"].as_array().unwrap().iter().find(|u| u["name"] == "bob").unwrap()["id"].clone();
    assert_eq!(server.admin.delete_user(bob_id.as_str().unwrap()).await.unwrap().status, 204);
    let after = carol.approve(&id, None).await.unwrap();
    assert_eq!(after.str("/status"), "pending", "a disabled approver's decision no longer counts: {:?}", after.body);
    let admin = server.admin.approve(&id, None).await.unwrap();
    assert_eq!(admin.str("/status"), "approved", "{:?}", admin.body);
    server.stop().await;
}

#[tokio::test]
async fn pending_approvals_expire_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let bot = server.agent("bot").await;
    let held = bot.submit_action(&action("ops.restart.service")).await.unwrap();
    assert_eq!(held.status, 202);
    let waited = bot.wait_action(held.str("/id"), 10.0).await.unwrap();
    assert_eq!(waited.str("/state"), "expired");

    // A second one, left pending across a restart, still expires by its timer.
    let held = bot.submit_action(&action("ops.restart.service")).await.unwrap();
    let id = held.str("/id").to_owned();
    let bot_key = bot.key().unwrap().to_owned();
    server.stop().await;
    let server = TestServer::start(dir.path(), None).await;
    let bot = server.admin.with_key(bot_key);
    let waited = bot.wait_action(&id, 10.0).await.unwrap();
    assert_eq!(waited.str("/state"), "expired", "{:?}", waited.body);
    let verify = server.admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verify.body["ok"], json!(true));
    let expired = server.admin.get("/v1/audit?action=approval.expired").await.unwrap();
    assert_eq!(expired.body["events"].as_array().unwrap().len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn orgs_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let bot = server.agent("bot").await;
    let held = bot.submit_action(&action("payments.charge.card")).await.unwrap();
    let created = server.admin.post("/v1/orgs", &json!({"name": "other"})).await.unwrap();
    assert_eq!(created.status, 201, "{:?}", created.body);
    let other = server.admin.with_key(created.str("/admin_key"));
    for path in [
        format!("/v1/actions/{}", held.str("/id")),
        format!("/v1/actions/{}/trace", held.str("/id")),
        format!("/v1/approvals/{}", held.str("/approval/id")),
        format!("/v1/agents/{}", bot.get_action(held.str("/id")).await.unwrap().str("/agent/id")),
    ] {
        assert_eq!(other.get(&path).await.unwrap().status, 404, "{path}");
    }
    assert_eq!(other.approve(held.str("/approval/id"), None).await.unwrap().status, 404);
    assert_eq!(other.get("/v1/approvals?status=pending").await.unwrap().body["items"], json!([]));
    assert_eq!(other.get("/v1/actions").await.unwrap().body["items"], json!([]));

    // Every other endpoint that names an object of the first org answers 404 to the second.
    let user = server.admin.post("/v1/users", &json!({"name": "erin", "role": "viewer"})).await.unwrap();
    let key = server.admin.post("/v1/keys", &json!({"user": "erin"})).await.unwrap();
    let session = server.admin.post("/v1/sessions", &json!({"agent": "bot", "ttl_seconds": 60})).await.unwrap();
    let hook = server
        .admin
        .post("/v1/webhooks", &json!({"url": "https://hooks.example.com/x", "events": ["approval.*"]}))
        .await
        .unwrap();
    let export = server.admin.post("/v1/audit/exports", &json!({})).await.unwrap();
    let job = export.str("/id");
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/actions/{}/wait?timeout=0", held.str("/id"))),
        (reqwest::Method::POST, format!("/v1/actions/{}/cancel", held.str("/id"))),
        (reqwest::Method::POST, format!("/v1/approvals/{}/deny", held.str("/approval/id"))),
        (reqwest::Method::GET, format!("/v1/users/{}", user.str("/id"))),
        (reqwest::Method::DELETE, format!("/v1/users/{}", user.str("/id"))),
        (reqwest::Method::DELETE, format!("/v1/keys/{}", key.str("/id"))),
        (reqwest::Method::DELETE, format!("/v1/sessions/{}", session.str("/id"))),
        (reqwest::Method::GET, format!("/v1/webhooks/{}", hook.str("/id"))),
        (reqwest::Method::GET, format!("/v1/webhooks/{}/deliveries", hook.str("/id"))),
        (reqwest::Method::DELETE, format!("/v1/webhooks/{}", hook.str("/id"))),
        (reqwest::Method::GET, format!("/v1/jobs/{job}")),
        (reqwest::Method::GET, format!("/v1/jobs/{job}/wait?timeout=0")),
        (reqwest::Method::POST, format!("/v1/jobs/{job}/cancel")),
        (reqwest::Method::GET, format!("/v1/audit/exports/{job}")),
    ] {
        let body = (method == reqwest::Method::POST).then(|| json!({}));
        let answer = other.send(method.clone(), &path, body.as_ref()).await.unwrap();
        assert_eq!(answer.status, 404, "{method} {path}: {:?}", answer.body);
    }
    for path in ["/v1/users", "/v1/keys", "/v1/sessions", "/v1/webhooks", "/v1/agents"] {
        let listed = other.get(path).await.unwrap();
        let items = listed.body["items"].as_array().unwrap();
        let ours = [user.str("/id"), key.str("/id"), session.str("/id"), hook.str("/id")];
        assert!(items.iter().all(|i| !ours.contains(&i["id"].as_str().unwrap_or_default())), "{path}");
    }
    let theirs = other.get(&format!("/v1/audit?subject={}", held.str("/id"))).await.unwrap();
    assert_eq!(theirs.body["events"], json!([]));
    assert_eq!(other.get("/v1/jobs").await.unwrap().body["items"], json!([]));
    // Nothing the second org tried changed the first org's objects.
    assert_eq!(bot.get_action(held.str("/id")).await.unwrap().str("/state"), "pending_approval");
    assert_eq!(server.admin.get(&format!("/v1/webhooks/{}", hook.str("/id"))).await.unwrap().status, 200);
    // The new org's admin is not the instance admin.
    assert_eq!(other.post("/v1/orgs", &json!({"name": "third"})).await.unwrap().status, 403);
    server.stop().await;
}

/// A session stands only while the key it was minted with does. Minting with a key whose user was disabled
/// after the request was authenticated is refused; and a session that a revocation's cascade missed (minted
/// in a transaction still open when the revocation committed, which PostgreSQL allows) stops working anyway.
#[tokio::test]
async fn a_session_never_outlives_the_key_it_was_minted_with() {
    use countersign::gateway::SessionRequest;
    use countersign_core::secrets::{SecretKind, generate, hash_secret};

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let gateway = server.gateway();
    let bot = server.agent("bot").await;
    assert_eq!(server.admin.create_user("bob", "admin").await.unwrap().status, 201);
    let bob_key = server.admin.create_key("user", "bob").await.unwrap().str("/key").to_owned();
    let request = |key: &str| SessionRequest {
        agent: Some("bot".into()),
        ttl_seconds: Some(600),
        scopes: None,
        minting_key_hash: Some(hash_secret(key)),
    };

    // Bob is authenticated, then disabled before his mint reaches the writer.
    let bob = gateway.authenticate(&bob_key).await.unwrap();
    let users = server.admin.list_users().await.unwrap();
    let bob_id = users.body["items"].as_array().unwrap().iter().find(|u| u["name"] == "bob").unwrap()["id"].clone();
    assert_eq!(server.admin.delete_user(bob_id.as_str().unwrap()).await.unwrap().status, 204);
    let refused = gateway.create_session(&bob, request(&bob_key)).await.map(|c| c.token).unwrap_err();
    assert!(refused.to_string().contains("the user of this key is disabled"), "{refused}");
    // Nor does he decide an approval, a deny included: it stays pending.
    let held = bot.submit_action(&action("finance.issue.card")).await.unwrap();
    let approval_id = countersign_core::ids::ApprovalId::parse(held.str("/approval/id")).unwrap();
    let denied = gateway.decide(&bob, &approval_id, countersign_core::state::Decision::Deny, None).await;
    assert!(denied.unwrap_err().to_string().contains("the user of this key is disabled"));
    assert_eq!(server.admin.get_approval(approval_id.as_str()).await.unwrap().str("/status"), "pending");

    // A session written as if its mint had committed after the revocation of its key.
    let bot_key = bot.key().unwrap().to_owned();
    let countersign::gateway::Caller::Agent(agent) = gateway.authenticate(&bot_key).await.unwrap() else {
        panic!("an agent key")
    };
    let minted =
        gateway.create_session(&gateway.authenticate(&bot_key).await.unwrap(), request(&bot_key)).await.unwrap();
    let key_id = minted.session.minted_with.clone().unwrap();
    assert!(gateway.authenticate(&minted.token).await.is_ok());
    let keys = server.admin.list_keys().await.unwrap();
    assert!(keys.body["items"].as_array().unwrap().iter().any(|k| k["id"] == key_id.as_str()));
    assert_eq!(server.admin.revoke_key(key_id.as_str()).await.unwrap().status, 204);
    let late = generate(SecretKind::SessionToken);
    let mut tx = gateway.store().write().await.unwrap();
    let session = countersign_core::domain::Session {
        id: countersign_core::ids::SessionId::new(),
        hash: late.hash.clone(),
        revoked_at: None,
        ..minted.session.clone()
    };
    assert_eq!(session.org_id, agent.org_id);
    tx.insert_session(&session).await.unwrap();
    tx.commit().await.unwrap();
    let refused = gateway.authenticate(&late.plaintext).await.map(|_| ()).unwrap_err();
    assert!(refused.to_string().contains("minted with no longer works: this API key has been revoked"), "{refused}");
    let over_http = server.admin.with_key(late.plaintext).submit_action(&action("email.send.message")).await.unwrap();
    assert_eq!(over_http.status, 401, "{:?}", over_http.body);
    server.stop().await;
}

/// A long poll checks its credential again before it answers: a key revoked while the wait was open gets 401,
/// not the approved action.
#[tokio::test]
async fn a_wait_answers_401_once_its_credential_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let _bot = server.agent("bot").await;
    let minted = server.admin.create_key("agent", "bot").await.unwrap();
    let (key_id, stolen) = (minted.str("/id").to_owned(), server.admin.with_key(minted.str("/key").to_owned()));
    let waiter =
        tokio::spawn(async move { stolen.post("/v1/actions?wait=30", &action("payments.charge.card")).await.unwrap() });
    // Once its approval is pending, the submission was authenticated and its wait is open.
    let approval_id = crate::helpers::first_pending(server.gateway(), &server.admin).await;
    assert_eq!(server.admin.revoke_key(&key_id).await.unwrap().status, 204);
    let approved = server.admin.approve(&approval_id, None).await.unwrap();
    assert_eq!(approved.status, 200, "{:?}", approved.body);
    let answered = waiter.await.unwrap();
    assert_eq!(answered.status, 401, "{:?}", answered.body);
    assert!(answered.str("/detail").contains("stopped working while the request waited"), "{:?}", answered.body);
    server.stop().await;
}

#[tokio::test]
async fn sessions_are_scoped_and_revocable() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let _bot = server.agent("bot").await;
    let minted = server
        .admin
        .post("/v1/sessions", &json!({"agent": "bot", "ttl_seconds": 600, "scopes": ["email.*"]}))
        .await
        .unwrap();
    assert_eq!(minted.status, 201, "{:?}", minted.body);
    let token = minted.str("/token").to_owned();
    assert!(token.starts_with("cs_st_"));
    assert_eq!(minted.body["mcp"]["headers"]["Authorization"], json!(format!("Bearer {token}")));
    let session = server.admin.with_key(token);
    assert_eq!(session.submit_action(&action("email.send.message")).await.unwrap().status, 200);
    let outside = session.submit_action(&action("finance.issue.card")).await.unwrap();
    assert_eq!(outside.status, 403);
    assert!(outside.str("/detail").contains("outside this session's scopes"));
    assert_eq!(session.post("/v1/sessions", &json!({"ttl_seconds": 60})).await.unwrap().status, 403);
    assert_eq!(session.post("/v1/keys", &json!({"agent": "bot"})).await.unwrap().status, 403);
    let too_long = server.admin.post("/v1/sessions", &json!({"agent": "bot", "ttl_seconds": 90000})).await.unwrap();
    assert_eq!(too_long.status, 422);

    // A session may end itself (a runtime logging out), and no other session.
    let sibling = server.admin.post("/v1/sessions", &json!({"agent": "bot", "ttl_seconds": 600})).await.unwrap();
    let sibling_token = server.admin.with_key(sibling.str("/token").to_owned());
    let refused = session.delete(&format!("/v1/sessions/{}", sibling.str("/id"))).await.unwrap();
    assert_eq!(refused.status, 403, "{:?}", refused.body);
    let ended = sibling_token.delete(&format!("/v1/sessions/{}", sibling.str("/id"))).await.unwrap();
    assert_eq!(ended.status, 204, "{:?}", ended.body);
    assert_eq!(sibling_token.submit_action(&action("email.send.message")).await.unwrap().status, 401);

    let revoked = server.admin.delete(&format!("/v1/sessions/{}", minted.str("/id"))).await.unwrap();
    assert_eq!(revoked.status, 204);
    assert_eq!(session.submit_action(&action("email.send.message")).await.unwrap().status, 401);

    // A session minted with a key ends when that key is revoked, and never outlives the key's expiry.
    let expires = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    let key = server.admin.create_key_expiring("agent", "bot", Some(&expires)).await.unwrap();
    assert_eq!(key.status, 201, "{:?}", key.body);
    let agent = server.admin.with_key(key.str("/key").to_owned());
    let minted = agent.post("/v1/sessions", &json!({"ttl_seconds": 3600})).await.unwrap();
    assert_eq!(minted.status, 201, "{:?}", minted.body);
    let session_expiry = chrono::DateTime::parse_from_rfc3339(minted.str("/expires_at")).unwrap();
    assert!(session_expiry <= chrono::DateTime::parse_from_rfc3339(&expires).unwrap(), "{:?}", minted.body);
    let session = server.admin.with_key(minted.str("/token").to_owned());
    assert_eq!(session.submit_action(&action("email.send.message")).await.unwrap().status, 200);
    let other = server.admin.post("/v1/sessions", &json!({"agent": "bot", "ttl_seconds": 600})).await.unwrap();
    let other = server.admin.with_key(other.str("/token").to_owned());
    assert_eq!(server.admin.revoke_key(key.str("/id")).await.unwrap().status, 204);
    assert_eq!(session.submit_action(&action("email.send.message")).await.unwrap().status, 401);
    assert_eq!(other.submit_action(&action("email.send.message")).await.unwrap().status, 200, "minted by another key");
    let revocations = server.admin.get("/v1/audit?action=key.revoked").await.unwrap();
    let event = &revocations.body["events"].as_array().unwrap().last().unwrap()["data"];
    assert_eq!(event["sessions_revoked"], json!([minted.str("/id")]), "the trail names the sessions that ended");

    // Disabling a user ends the sessions minted with that user's keys.
    let ops_id = server.admin.create_user("ops", "admin").await.unwrap().str("/id").to_owned();
    let ops = server.admin.with_key(server.admin.create_key("user", "ops").await.unwrap().str("/key").to_owned());
    let minted = ops.post("/v1/sessions", &json!({"agent": "bot", "ttl_seconds": 600})).await.unwrap();
    assert_eq!(minted.status, 201, "{:?}", minted.body);
    let by_ops = server.admin.with_key(minted.str("/token").to_owned());
    assert_eq!(by_ops.submit_action(&action("email.send.message")).await.unwrap().status, 200);
    assert_eq!(server.admin.delete_user(&ops_id).await.unwrap().status, 204);
    assert_eq!(by_ops.submit_action(&action("email.send.message")).await.unwrap().status, 401);
    assert_eq!(other.submit_action(&action("email.send.message")).await.unwrap().status, 200);
    let disabled = server.admin.get("/v1/audit?action=user.disabled").await.unwrap();
    let event = &disabled.body["events"].as_array().unwrap().last().unwrap()["data"];
    assert_eq!(event["sessions_revoked"], json!([minted.str("/id")]));
    server.stop().await;
}

#[tokio::test]
async fn policy_updates_keep_the_old_policy_when_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let before = server.admin.get("/v1/policy").await.unwrap();
    let bad = server
        .admin
        .send_raw(
            reqwest::Method::PUT,
            "/v1/policy",
            "application/yaml",
            b"version: 1\nrules:\n  - name: x\n    effect: deny\n    conditions: { content_patterns: ['(unclosed'] }\n"
                .to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 422, "{:?}", bad.body);
    assert!(bad.str("/detail").contains(":5:"), "names the line: {}", bad.str("/detail"));
    assert_eq!(server.admin.get("/v1/policy").await.unwrap().body["version"], before.body["version"]);

    let good = server
        .admin
        .send_raw(
            reqwest::Method::PUT,
            "/v1/policy",
            "application/yaml",
            b"version: 1\nrules:\n  - name: deny-mail\n    effect: deny\n    conditions: { capability: 'email.*' }\n"
                .to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(good.status, 200, "{:?}", good.body);
    assert_ne!(good.body["version"], before.body["version"]);
    let dry = server
        .admin
        .post("/v1/policy/evaluate", &json!({"agent": "bot", "capability": "email.send.message", "params": {}}))
        .await
        .unwrap();
    assert_eq!(dry.str("/effect"), "deny");
    assert_eq!(dry.str("/rule"), "deny-mail");
    assert!(!dry.str("/explanation").is_empty());

    // A stored policy that no longer compiles (here: rewritten to a format version this build does not
    // read) is not swapped for the configured file policy, which may allow more: the org is denied and
    // told why until an admin sets a policy.
    let bot_key = server.agent("bot").await.key().unwrap().to_owned();
    server.stop().await;
    let broken = "UPDATE policies SET sources = replace(sources, 'version: 1', 'version: 9') WHERE origin = 'api'";
    assert!(crate::helpers::raw_sql(dir.path(), broken, &[]).await.unwrap() >= 1);
    let server = TestServer::start(dir.path(), None).await;
    let policy = server.admin.get("/v1/policy").await.unwrap();
    assert_eq!(policy.status, 409, "{:?}", policy.body);
    assert!(policy.str("/detail").contains("no longer compiles"), "{:?}", policy.body);
    // The dashboard's policy page still opens, saying why, so an admin can validate a fix there.
    let (cookie, _) = crate::dashboard::login(server.admin.base(), server.admin.key().unwrap()).await;
    let page = crate::dashboard::http()
        .get(format!("{}/ui/policy", server.admin.base()))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("no longer compiles"));
    let bot = server.admin.with_key(bot_key);
    let denied = bot.submit_action(&json!({"capability": "ops.restart.service", "reasoning": "x"})).await.unwrap();
    assert_eq!(denied.status, 403, "{:?}", denied.body);
    let set = server
        .admin
        .send_raw(reqwest::Method::PUT, "/v1/policy", "application/yaml", b"version: 1\nrules: []\n".to_vec())
        .await
        .unwrap();
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(server.admin.get("/v1/policy").await.unwrap().status, 200);
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_precise_problems() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let bot = server.agent("bot").await;
    let raw = |body: &'static str| {
        bot.send_raw(reqwest::Method::POST, "/v1/actions", "application/json", body.as_bytes().to_vec())
    };

    let malformed = raw("{not json").await.unwrap();
    assert_eq!(malformed.status, 400);
    assert!(malformed.content_type.starts_with("application/problem+json"));
    let missing = raw(r#"{"params": {}, "reasoning": "x"}"#).await.unwrap();
    assert_eq!(missing.status, 400);
    assert_eq!(missing.str("/field"), "capability");
    let bad_capability = raw(r#"{"capability": "Finance", "reasoning": "x"}"#).await.unwrap();
    assert_eq!(bad_capability.status, 422);
    assert_eq!(bad_capability.str("/field"), "capability");
    let huge = format!(r#"{{"capability": "a.b.c", "reasoning": "{}"}}"#, "x".repeat(1_100_000));
    let too_large =
        bot.send_raw(reqwest::Method::POST, "/v1/actions", "application/json", huge.into_bytes()).await.unwrap();
    assert_eq!(too_large.status, 413);
    let unknown_upstream = bot.submit_action(&http_action("payments.charge.card")).await.unwrap();
    assert_eq!(unknown_upstream.status, 422);
    assert_eq!(bot.get_action("act_01ARZ3NDEKTSV4RRFFQ69G5FAV").await.unwrap().status, 404);
    assert_eq!(bot.get_action("nonsense").await.unwrap().status, 404);
    let wrong = bot.with_key("cs_sk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(wrong.get("/v1/actions").await.unwrap().status, 401);
    assert_eq!(bot.with_key("garbage").get("/v1/actions").await.unwrap().status, 401);
    assert_eq!(server.admin.get("/v1/approval-status/cs_ap_nope").await.unwrap().status, 401);
    assert_eq!(server.admin.get("/v1/nothing-here").await.unwrap().status, 404);
    // Nothing half-written: the audit chain still verifies and holds no action for those requests.
    let verify = server.admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verify.body["ok"], json!(true));
    assert_eq!(server.admin.get("/v1/actions").await.unwrap().body["items"], json!([]));
    server.stop().await;
}

/// A frozen request stays on its upstream's base path and carries the configured credentials only: spellings
/// of `..` that URL parsing would resolve are refused, and so is a header the upstream's configuration sets.
#[tokio::test]
async fn targets_stay_under_the_upstream_and_cannot_set_its_configured_headers() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Some(&upstream.url)).await;
    let bot = server.agent("bot").await;
    for path in ["/%2e%2e/admin", "/v1/.%2E/admin", "/v1\\..\\admin", "/../admin", "/.\t./admin"] {
        let mut body = http_action("payments.charge.card");
        body["target"]["path"] = json!(path);
        let refused = bot.submit_action(&body).await.unwrap();
        assert_eq!(refused.status, 422, "{path}: {:?}", refused.body);
        assert_eq!(refused.str("/field"), "target", "{path}");
    }
    let mut body = http_action("payments.charge.card");
    body["target"]["headers"] = json!({"x-TENANT": "someone-else"});
    let refused = bot.submit_action(&body).await.unwrap();
    assert_eq!(refused.status, 422, "{:?}", refused.body);
    assert_eq!(refused.str("/field"), "target.headers");
    assert!(refused.str("/detail").contains("x-TENANT"), "{:?}", refused.body);
    assert_eq!(upstream.count(), 0);
    assert_eq!(server.admin.get("/v1/actions").await.unwrap().body["items"], json!([]));
    server.stop().await;
}

/// Another admin of the first org cannot become the instance admin (who creates orgs) by minting a key for
/// that user, nor disable them.
#[tokio::test]
async fn an_org_admin_cannot_take_over_the_instance_admin() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    assert_eq!(server.admin.create_user("ops", "admin").await.unwrap().status, 201);
    let ops = server.admin.with_key(server.admin.create_key("user", "ops").await.unwrap().str("/key").to_owned());
    assert_eq!(ops.post("/v1/orgs", &json!({"name": "mine"})).await.unwrap().status, 403);
    let minted = ops.create_key("user", "admin").await.unwrap();
    assert_eq!(minted.status, 403, "{:?}", minted.body);
    assert!(minted.str("/detail").contains("instance admin"), "{:?}", minted.body);
    let users = server.admin.list_users().await.unwrap();
    let admin_id = users.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "admin")
        .and_then(|u| u["id"].as_str())
        .unwrap()
        .to_owned();
    assert_eq!(ops.delete_user(&admin_id).await.unwrap().status, 403);
    // Nor revoke its keys, which would lock it out as surely: nothing else mints it one.
    let keys = ops.list_keys().await.unwrap();
    let admin_keys: Vec<String> = keys.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["user"] == admin_id.as_str())
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!admin_keys.is_empty(), "{:?}", keys.body);
    for id in &admin_keys {
        let revoked = ops.revoke_key(id).await.unwrap();
        assert_eq!(revoked.status, 403, "{:?}", revoked.body);
        assert!(revoked.str("/detail").contains("instance admin"), "{:?}", revoked.body);
    }
    assert_eq!(server.admin.list_users().await.unwrap().status, 200, "the instance admin's key still works");
    // The instance admin itself still can.
    assert_eq!(server.admin.create_key("user", "admin").await.unwrap().status, 201);
    server.stop().await;
}

/// The generated admin key is written readable by its owner only, even over a file left in the data directory
/// with a wider mode (restored from a backup), and never through a symlink planted there.
#[tokio::test]
async fn the_admin_key_file_is_private_whatever_was_there() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.key");
    std::fs::write(&path, "stale\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), server.admin.key().unwrap());
    server.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::os::unix::fs::symlink(&elsewhere, dir.path().join("admin.key")).unwrap();
    let server = TestServer::start(dir.path(), None).await;
    assert!(!elsewhere.exists(), "the symlink was replaced, not followed");
    server.stop().await;
}

#[tokio::test]
async fn the_schema_refuses_to_rewrite_audit_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    server.stop().await;
    let update = crate::helpers::raw_sql(dir.path(), "UPDATE audit_events SET data = '{}'", &[]).await;
    let delete = crate::helpers::raw_sql(dir.path(), "DELETE FROM audit_events", &[]).await;
    let update = update.unwrap_err();
    assert!(update.contains("append-only"), "{update}");
    assert!(delete.unwrap_err().contains("append-only"));
}

/// An upstream whose `orgs` names some orgs is unknown to the others: their targets are refused as for an
/// upstream that is not configured, and an approved action of an org the configuration no longer names is
/// not sent. An upstream whose `capabilities` names some refuses actions of any other capability.
#[tokio::test]
async fn an_upstream_open_to_some_orgs_is_unknown_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let scoped = |orgs: &[&str]| {
        let mut settings = crate::helpers::config(dir.path(), Some(&upstream.url));
        let payments = settings.upstreams.get_mut("payments").unwrap();
        payments.orgs = countersign::config::OrgScope::only(orgs.to_vec());
        payments.capabilities = countersign::config::CapabilityScope::only(["payments.*"]);
        settings
    };
    let server = TestServer::start_with(scoped(&["default"]), None).await;
    let bot = server.agent("bot").await;
    let held = bot.submit_action(&http_action("payments.charge.card")).await.unwrap();
    assert_eq!(held.status, 202, "the default org may use it: {:?}", held.body);
    // The upstream takes only the capabilities it names: an action allowed as an email cannot be aimed at it.
    let mislabelled = bot.submit_action(&http_action("email.send.message")).await.unwrap();
    assert_eq!(mislabelled.status, 422, "{:?}", mislabelled.body);
    assert!(
        mislabelled.str("/detail").contains("takes only actions of capability payments.*"),
        "{:?}",
        mislabelled.body
    );

    let created = server.admin.post("/v1/orgs", &json!({"name": "other"})).await.unwrap();
    assert_eq!(created.status, 201, "{:?}", created.body);
    let other_admin = server.admin.with_key(created.str("/admin_key"));
    assert_eq!(other_admin.create_agent("obot").await.unwrap().status, 201);
    let other_bot = other_admin.with_key(other_admin.create_key("agent", "obot").await.unwrap().str("/key"));
    let refused = other_bot.submit_action(&http_action("payments.charge.card")).await.unwrap();
    assert_eq!(refused.status, 422, "{:?}", refused.body);
    assert!(refused.str("/detail").contains("unknown upstream `payments`"), "{:?}", refused.body);
    server.stop().await;

    // The configuration changes while the first org's action waits: approved, it is not sent.
    let server = TestServer::start_with(scoped(&["other"]), None).await;
    let approved = server.admin.approve(held.str("/approval/id"), None).await.unwrap();
    assert_eq!(approved.str("/status"), "approved", "{:?}", approved.body);
    let done = server.admin.get(&format!("/v1/actions/{}/wait?timeout=10", held.str("/id"))).await.unwrap();
    assert_eq!(done.str("/state"), "failed", "{:?}", done.body);
    assert!(done.str("/error").contains("not open to this org"), "{:?}", done.body);
    assert_eq!(upstream.count(), 0, "nothing was sent");
    server.stop().await;
}

/// Precedent is counted up to its cap, and the cap, once reached, is remembered for that agent and capability
/// only (the store is not asked again, even if its rows changed underneath): another agent, or another
/// capability of the same agent, is still counted from the store.
#[tokio::test]
async fn precedent_stops_at_its_cap_for_that_agent_and_capability_only() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let server = TestServer::start(dir.path(), Some(&upstream.url)).await;
    let (busy, fresh) = (server.agent("busy").await, server.agent("fresh").await);
    let cap = countersign_core::risk::PRECEDENT_CAP;
    let submit = |agent: &countersign::client::Client, capability: &str| {
        let (agent, body) = (agent.clone(), http_action(capability));
        async move {
            let done = agent.post("/v1/actions?wait=10", &body).await.unwrap();
            assert_eq!(done.str("/state"), "succeeded", "{:?}", done.body);
            done.body["verdict"]["risk"]["prior_successes"].as_u64().unwrap()
        }
    };
    for n in 0..=cap + 1 {
        assert_eq!(submit(&busy, "email.send.message").await, n.min(cap));
    }
    assert_eq!(submit(&fresh, "email.send.message").await, 0, "another agent's precedent is its own");
    assert_eq!(submit(&busy, "email.send.digest").await, 0, "another capability's precedent is its own");
    // Rows no path changes, changed behind the gateway's back: the remembered cap answers, the store does not.
    let failed = "UPDATE actions SET state = 'failed' WHERE agent_id = (SELECT id FROM agents WHERE name = ?)";
    assert!(crate::helpers::raw_sql(dir.path(), failed, &["busy"]).await.unwrap() > cap);
    assert_eq!(submit(&busy, "email.send.message").await, cap, "the cap was counted again");
    assert_eq!(submit(&busy, "email.send.digest").await, 0, "a pair below the cap is counted from the store");
}

/// An agent that cancels its action after the approval's deadline, before the expiry timer has fired (here
/// the clock jumps a day; the timer still waits its 15 minutes), finds it expired, as a decision would: the
/// action ends `expired`, not `cancelled`, and the cancel answers 409 saying so.
#[tokio::test]
async fn a_cancel_after_the_deadline_finds_the_action_expired() {
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(crate::helpers::ShiftedClock::default());
    let server = TestServer::start_with(crate::helpers::config(dir.path(), None), Some(clock.clone())).await;
    let bot = server.agent("bot").await;
    let held = bot.submit_action(&action("finance.issue.card")).await.unwrap();
    assert_eq!(held.str("/state"), "pending_approval");
    clock.advance(chrono::Duration::days(1));
    let cancelled = bot.post(&format!("/v1/actions/{}/cancel", held.str("/id")), &json!({})).await.unwrap();
    assert_eq!(cancelled.status, 409, "{:?}", cancelled.body);
    assert!(cancelled.str("/detail").contains("expired"), "{:?}", cancelled.body);
    assert_eq!(bot.get_action(held.str("/id")).await.unwrap().str("/state"), "expired");
    let approval = server.admin.get_approval(held.str("/approval/id")).await.unwrap();
    assert_eq!(approval.str("/status"), "expired");
    server.stop().await;
}
