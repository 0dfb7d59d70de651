//! Credentials that end and limits that bite: keys and sessions past their expiry get 401 (with the clock
//! moved, not slept), a principal over its rate gets 429 with `Retry-After`, and an edit of the watched
//! policy file takes effect without a signal.

use std::sync::Arc;

use serde_json::json;

use crate::helpers::{
    ShiftedClock, TEST_POLICY, TestServer, action, audit_stream, config, metric, metric_until, read_until,
};

#[tokio::test]
async fn keys_and_sessions_stop_working_when_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ShiftedClock::default());
    let server = TestServer::start_with(config(dir.path(), None), Some(clock.clone())).await;
    let admin = &server.admin;
    assert_eq!(admin.create_agent("temp").await.unwrap().status, 201);
    let in_an_hour = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let key = admin.post("/v1/keys", &json!({"agent": "temp", "expires_at": in_an_hour})).await.unwrap();
    assert_eq!(key.status, 201, "{:?}", key.body);
    let agent = admin.with_key(key.str("/key"));
    assert_eq!(agent.submit_action(&action("email.send.message")).await.unwrap().status, 200);
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    assert_eq!(admin.post("/v1/keys", &json!({"agent": "temp", "expires_at": past})).await.unwrap().status, 422);

    let session = admin.post("/v1/sessions", &json!({"agent": "temp", "ttl_seconds": 600})).await.unwrap();
    assert_eq!(session.status, 201);
    let session = admin.with_key(session.str("/token"));
    assert_eq!(session.submit_action(&action("email.send.message")).await.unwrap().status, 200);

    clock.advance(chrono::Duration::minutes(11));
    let expired = session.submit_action(&action("email.send.message")).await.unwrap();
    assert_eq!(expired.status, 401);
    assert!(expired.str("/detail").contains("expired"), "{:?}", expired.body);
    assert_eq!(agent.submit_action(&action("email.send.message")).await.unwrap().status, 200, "the key lasts 1 h");

    clock.advance(chrono::Duration::hours(1));
    let expired = agent.submit_action(&action("email.send.message")).await.unwrap();
    assert_eq!(expired.status, 401);
    assert_eq!(expired.str("/detail"), "this API key has expired");
    server.stop().await;
}

#[tokio::test]
async fn a_principal_over_its_rate_gets_429_and_others_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), None);
    config.rate_limit = countersign::config::RateLimitConfig { per_second: 1, burst: 5, ..Default::default() };
    let server = TestServer::start_with(config, None).await;
    let chatty = server.agent("chatty").await;
    let quiet = server.agent("quiet").await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(chatty.get("/v1/actions").await.unwrap());
    }
    // Creating the agent's key counted against the admin, not the agent: the agent gets its full burst.
    assert!(
        statuses[..5].iter().all(|r| r.status == 200),
        "{:?}",
        statuses.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let limited = statuses.iter().find(|r| r.status == 429).expect("the burst runs out");
    assert_eq!(limited.content_type, "application/problem+json");
    assert_eq!(limited.str("/code"), "rate_limited");
    assert!(limited.body["retry_after_seconds"].as_u64().unwrap() >= 1);
    let raw = reqwest::Client::new()
        .get(format!("{}/v1/actions", chatty.base()))
        .bearer_auth(chatty.key().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 429);
    assert!(raw.headers().get("retry-after").is_some());
    // A session is the agent's credential, not another principal: minting sessions does not multiply the rate.
    let minted = server.admin.post("/v1/sessions", &serde_json::json!({"agent": "chatty"})).await.unwrap();
    assert_eq!(minted.status, 201, "{:?}", minted.body);
    let session = server.admin.with_key(minted.str("/token").to_owned());
    assert_eq!(session.get("/v1/actions").await.unwrap().status, 429, "the session shares its agent's bucket");
    assert_eq!(quiet.get("/v1/actions").await.unwrap().status, 200, "limits are per principal");
    server.stop().await;
}

#[tokio::test]
async fn an_edit_of_the_watched_policy_file_takes_effect_without_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), None);
    config.watch_policy = true;
    let server = TestServer::start_with(config, None).await;
    let admin = &server.admin;
    let before = admin.get("/v1/policy").await.unwrap();
    let head = admin.get("/v1/audit?action=policy.updated").await.unwrap();
    let after_seq = head.body["events"].as_array().unwrap().last().unwrap()["seq"].as_i64().unwrap();

    // Follow the audit stream from here; the reload writes `policy.updated` when it lands.
    let mut body = Box::pin(audit_stream(admin, "?action=policy.updated", after_seq).await);
    std::fs::write(dir.path().join("policy.yaml"), TEST_POLICY.replace("Deletes are never allowed", "Never delete"))
        .unwrap();
    read_until(&mut body, &mut String::new(), "policy.updated").await;
    let after = admin.get("/v1/policy").await.unwrap();
    assert_ne!(after.body["version"], before.body["version"]);
    assert!(after.str("/source").contains("Never delete"));
    let denied = server.agent("a").await.submit_action(&action("db.delete.table")).await.unwrap();
    assert_eq!(denied.status, 403);
    assert!(denied.str("/detail").contains("Never delete"), "{:?}", denied.body);
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_body_is_a_problem_on_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let big = vec![b' '; 2 * 1024 * 1024];
    for (method, path) in [
        (reqwest::Method::POST, "/v1/actions"),
        (reqwest::Method::POST, "/v1/approvals/apr_01JZ0000000000000000000000/approve"),
        (reqwest::Method::PUT, "/v1/policy"),
        (reqwest::Method::POST, "/v1/policy/validate"),
    ] {
        let answer = server.admin.send_raw(method, path, "application/json", big.clone()).await.unwrap();
        assert_eq!(answer.status, 413, "{path}");
        assert_eq!(answer.content_type, "application/problem+json", "{path}");
        assert_eq!(answer.str("/code"), "payload_too_large", "{path}");
    }
    let wrong_method = server.admin.send(reqwest::Method::PATCH, "/v1/actions", None).await.unwrap();
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.str("/type"), "https://countersign.dev/problems/method_not_allowed");
    server.stop().await;
}

/// A page of actions, or of approvals, stops once it carries the store's byte budget (4 MiB of actions' stored
/// text) and gives a cursor to the rest, whatever its limit: a `limit=1000` of large actions would otherwise be
/// read into memory and serialized at once.
#[tokio::test]
async fn a_page_of_large_actions_stops_at_the_byte_budget_and_goes_on_by_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let bot = server.agent("verbose-bot").await;
    // Six of about 0.9 MiB each (under the 1 MiB body limit), each held for approval.
    let mut submitted = Vec::new();
    for i in 0..6 {
        let body = json!({
            "capability": "payments.charge.card",
            "params": {"i": i, "notes": "n".repeat(900 * 1024)},
            "reasoning": {"goal": "test"},
        });
        let answer = bot.submit_action(&body).await.unwrap();
        assert_eq!(answer.status, 202, "{:?}", answer.body["detail"]);
        submitted.push(answer.str("/id").to_owned());
    }
    submitted.reverse();
    for (list, field) in [("/v1/actions?limit=1000", "/id"), ("/v1/approvals?status=all&limit=1000", "/action/id")] {
        let first = server.admin.get(list).await.unwrap();
        assert_eq!(first.status, 200);
        let items = first.body["items"].as_array().unwrap();
        assert!((1..6).contains(&items.len()), "{list}: {} items in one page", items.len());
        let cursor = first.str("/next_cursor").to_owned();
        let rest = server.admin.get(&format!("{list}&cursor={cursor}")).await.unwrap();
        assert_eq!(rest.status, 200);
        assert!(rest.body["next_cursor"].is_null(), "{list}");
        let ids: Vec<&str> = items
            .iter()
            .chain(rest.body["items"].as_array().unwrap())
            .map(|item| item.pointer(field).and_then(|v| v.as_str()).unwrap())
            .collect();
        assert_eq!(ids, submitted, "{list}: every action once, newest first");
    }
    server.stop().await;
}

/// A principal holds at most `rate_limit.open_waits` waits open at once (each keeps a connection and wakes on
/// every change): past it a wait answers 429, and a submission that asks to wait answers as submitted (its
/// action is recorded, so an error would lose it). A session counts as its agent; another agent has its own.
#[tokio::test]
async fn a_principal_holds_only_so_many_waits_open_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), None);
    config.rate_limit.open_waits = 2;
    let server = TestServer::start_with(config, None).await;
    let bot = server.agent("patient-bot").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let submitted = bot.submit_action(&action("payments.charge.card")).await.unwrap();
        assert_eq!(submitted.status, 202, "{:?}", submitted.body);
        held.push(submitted.str("/id").to_owned());
    }
    let waits: Vec<_> = held[..2]
        .iter()
        .map(|id| {
            let (bot, id) = (bot.clone(), id.clone());
            tokio::spawn(async move { bot.wait_action(&id, 120.0).await.unwrap() })
        })
        .collect();
    metric_until(&server.admin, "countersign_open_waits", 2.0).await;

    let refused = bot.wait_action(&held[2], 120.0).await.unwrap();
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(refused.content_type, "application/problem+json");
    assert!(refused.str("/detail").contains("2 waits open"), "{:?}", refused.body);
    let session =
        server.admin.post("/v1/sessions", &json!({"agent": "patient-bot", "ttl_seconds": 600})).await.unwrap();
    let session = server.admin.with_key(session.str("/token"));
    assert_eq!(session.wait_action(&held[2], 120.0).await.unwrap().status, 429, "a session is its agent's");
    // Answered as submitted, at once, not after the two minutes it asked for.
    let asked = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        bot.submit_action_waiting(&action("payments.charge.card"), 120.0),
    )
    .await
    .expect("a submission over the open waits waited anyway")
    .unwrap();
    assert_eq!(asked.status, 202, "{:?}", asked.body);
    assert_eq!(asked.str("/state"), "pending_approval");
    let text = server.admin.get("/metrics").await.unwrap().body.as_str().unwrap().to_owned();
    assert_eq!(metric(&text, "countersign_open_waits_refused_total"), Some(3.0), "{text}");

    // Another agent's waits are its own: this one waits out its short timeout.
    let other = server.agent("other-bot").await;
    let mine = other.submit_action(&action("payments.charge.card")).await.unwrap();
    let waited = other.wait_action(mine.str("/id"), 0.2).await.unwrap();
    assert_eq!((waited.status, waited.str("/state")), (200, "pending_approval"), "{:?}", waited.body);

    // Decisions end the waits, and their slots are free again.
    let queue = server.admin.list_approvals(Some("pending"), None, None).await.unwrap();
    for item in queue.body["items"].as_array().unwrap() {
        if held[..2].iter().any(|id| item["action"]["id"] == json!(id)) {
            assert_eq!(server.admin.approve(item["id"].as_str().unwrap(), None).await.unwrap().status, 200);
        }
    }
    for wait in waits {
        let answer = wait.await.unwrap();
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    metric_until(&server.admin, "countersign_open_waits", 0.0).await;
    let again = bot.wait_action(&held[2], 0.2).await.unwrap();
    assert_eq!((again.status, again.str("/state")), (200, "pending_approval"), "{:?}", again.body);
    server.stop().await;
}

#[tokio::test]
async fn a_wait_must_be_seconds_and_a_huge_one_is_capped_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let bot = server.agent("waiting-bot").await;
    // Allowed and record-only: terminal at once, so even the longest wait answers now.
    let huge = bot.submit_action_waiting(&action("crm.read.contact"), 1e300).await.unwrap();
    assert!(huge.status < 300, "{} {:?}", huge.status, huge.body);
    assert_eq!(huge.body["state"], "approved", "{:?}", huge.body);
    for bad in [-1.0, f64::NAN] {
        let refused = bot.submit_action_waiting(&action("crm.read.contact"), bad).await.unwrap();
        assert_eq!(refused.status, 400, "{bad}: {:?}", refused.body);
        assert_eq!(refused.body["field"], "wait", "{:?}", refused.body);
    }
    server.stop().await;
}

/// Requests with made-up methods, unauthenticated, share one metrics series: a method name is not a label
/// anyone can add to without bound.
#[tokio::test]
async fn made_up_methods_share_one_metrics_series() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let http = reqwest::Client::new();
    for i in 0..50 {
        let method = reqwest::Method::from_bytes(format!("X{i}").as_bytes()).unwrap();
        let answered = http.request(method, format!("{}/healthz", server.admin.base())).send().await.unwrap();
        assert!(answered.status().is_client_error(), "{}", answered.status());
    }
    let metrics = server.admin.get("/metrics").await.unwrap();
    let text = metrics.body.as_str().unwrap();
    assert!(!text.contains("method=\"X49\"") && !text.contains("method=\"X0\""), "a series per made-up method");
    assert!(text.contains("method=\"OTHER\""), "{text}");
    server.stop().await;
}

/// A client that sends nothing, never finishes its headers, stops sending a body it announced, or stops reading
/// the answers it asked for, is cut off once the deadline passes (90 s for headers, 30 s without progress for
/// a body or for a write), instead of holding its connection (and a file descriptor, and buffers) for ever:
/// anyone reaching the port could otherwise exhaust them with a few thousand such sockets. A handler that was
/// reading the stalled body answers a problem+json 400 first.
#[tokio::test]
async fn clients_that_stall_mid_request_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let address = server.admin.base().trim_start_matches("http://").to_owned();
    let stalled = |request: Vec<u8>| {
        let address = address.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
            stream.write_all(&request).await.unwrap();
            let mut answer = Vec::new();
            // Closed (an end of stream or a reset) well within two minutes; still open after them is the defect.
            let read = tokio::time::timeout(std::time::Duration::from_secs(120), stream.read_to_end(&mut answer)).await;
            assert!(read.is_ok(), "still connected after 120 s, having sent {:?}", String::from_utf8_lossy(&request));
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let headers = stalled(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n".to_vec());
    // Authenticated, so the handler reads the body, which stops after 14 of its 100 bytes.
    let key = server.admin.key().unwrap();
    let body = stalled(
        format!(
            "POST /v1/policy/validate HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/yaml\r\nContent-Length: 100\r\n\r\nversion: 1\nrul"
        )
        .into_bytes(),
    );
    let nothing = stalled(Vec::new());
    // Asks for 200 copies of the OpenAPI document (about 35 MB, far more than the sockets' buffers hold) in one go,
    // then reads nothing for longer than the write deadline: the server gives up on the connection, and the
    // client, reading at last, gets what was buffered and then the end, not every answer.
    const ASKED: usize = 200;
    let unread = async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(address.parse().unwrap()).await.unwrap();
        let ask = "GET /v1/openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(ASKED);
        stream.write_all(ask.as_bytes()).await.unwrap();
        // The client that does not read: nothing to await but time.
        tokio::time::sleep(std::time::Duration::from_secs(45)).await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            let mut chunk = vec![0u8; 1 << 16];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => answer.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "still connected after reading for 60 s");
        String::from_utf8_lossy(&answer).matches("HTTP/1.1 200 OK").count()
    };
    let (headers, body, nothing, answered) = tokio::join!(headers, body, nothing, unread);
    assert!(answered < ASKED, "all {ASKED} answers were written to a client that did not read for 45 s");
    assert!(!nothing.contains("200 OK"), "{nothing}");
    assert!(!headers.contains("200 OK"), "{headers}");
    assert!(body.starts_with("HTTP/1.1 400") && body.contains("application/problem+json"), "{body}");
    server.stop().await;
}
