//! Jobs and webhooks end to end: signed deliveries to a real loopback receiver that fails and then accepts,
//! growing retry delays, every event kind, the Slack shape, the outbound guard refusing addresses and
//! redirects, upstream failures recorded on the execution job, and the jobs API with its visibility rules.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::helpers::{TestServer, Upstream, action, config, http_action, serve};

/// One delivery the receiver saw.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    event_type: String,
    body: Value,
    signature_ok: bool,
}

/// A loopback webhook receiver: checks the signature with the secret it is given, answers 500 to the first
/// `fail_first` deliveries and 200 after, and reports every delivery on a channel.
struct Receiver {
    url: String,
    secret: Arc<Mutex<String>>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let secret: Arc<Mutex<String>> = Arc::default();
        let (tx, seen) = mpsc::unbounded_channel();
        let count = Arc::new(Mutex::new(0usize));
        let key = secret.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let (key, tx, count) = (key.clone(), tx.clone(), count.clone());
            async move {
                let signature_ok = verify(&key.lock().unwrap(), &headers, &body);
                let event_type =
                    headers.get("countersign-event").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                tx.send(Seen { at: Instant::now(), event_type, body, signature_ok }).unwrap();
                let n = {
                    let mut count = count.lock().unwrap();
                    *count += 1;
                    *count
                };
                if n <= fail_first { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK }
            }
        });
        let url = format!("{}/hook", serve(app).await);
        Receiver { url, secret, seen }
    }

    async fn next(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(20), self.seen.recv()).await.expect("a delivery in time").unwrap()
    }
}

/// `Countersign-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`, checked as a receiver would.
fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(header) = headers.get("countersign-signature").and_then(|v| v.to_str().ok()) else { return false };
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = Some(value.to_owned()),
            Some(("v1", value)) => v1 = Some(value.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let fresh = (chrono::Utc::now().timestamp() - t.parse::<i64>().unwrap()).abs() < 300;
    fresh && hex::decode(v1).is_ok_and(|sig| mac.verify_slice(&sig).is_ok())
}

async fn subscribe(server: &TestServer, receiver: &Receiver, events: Value, format: &str) -> Value {
    let created = server
        .admin
        .post("/v1/webhooks", &json!({"url": receiver.url, "events": events, "format": format}))
        .await
        .unwrap();
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert!(created.str("/secret").starts_with("whsec_"));
    *receiver.secret.lock().unwrap() = created.str("/secret").to_owned();
    created.body
}

#[tokio::test]
async fn deliveries_are_signed_retried_with_growing_delays_and_stop_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let mut receiver = Receiver::start(2).await;
    let hook = subscribe(&server, &receiver, json!(["approval.requested"]), "json").await;
    let hook_id = hook["id"].as_str().unwrap();
    let agent = server.agent("buyer").await;

    let submitted = agent.submit_action(&action("finance.issue.card")).await.unwrap();
    assert_eq!(submitted.status, 202);
    let first = receiver.next().await;
    let second = receiver.next().await;
    let third = receiver.next().await;
    for seen in [&first, &second, &third] {
        assert!(seen.signature_ok, "a delivery failed the signature check");
        assert_eq!(seen.event_type, "approval.requested");
        assert_eq!(seen.body["type"], "approval.requested");
        assert_eq!(seen.body["data"]["approval"]["id"], submitted.body["approval"]["id"]);
        assert_eq!(seen.body["data"]["action"]["reasoning"], r#"{"goal":"test"}"#);
    }
    // The same event each time, so a receiver can deduplicate.
    assert_eq!(first.body["id"], third.body["id"]);
    let (gap1, gap2) = (second.at - first.at, third.at - second.at);
    // Base 200 ms with equal jitter: the first wait is 100–200 ms, the second 200–400 ms.
    assert!(gap1 >= Duration::from_millis(100), "first retry after {gap1:?}");
    assert!(gap2 >= Duration::from_millis(200), "second retry after {gap2:?}");
    // The two ranges meet at 200 ms and each gap also holds a commit and a send, so allow for that.
    assert!(gap2 + Duration::from_millis(100) >= gap1, "delays must grow: {gap1:?} then {gap2:?}");

    let jobs = server.admin.get(&format!("/v1/jobs?kind=webhook.deliver&subject={hook_id}")).await.unwrap();
    let job_id = jobs.body["items"][0]["id"].as_str().unwrap().to_owned();
    let job = server.admin.get(&format!("/v1/jobs/{job_id}/wait?timeout=10")).await.unwrap();
    assert_eq!(job.str("/state"), "succeeded", "{:?}", job.body);
    assert_eq!(job.body["attempts"], 3);
    let deliveries = server.admin.get(&format!("/v1/webhooks/{hook_id}/deliveries")).await.unwrap();
    let statuses: Vec<Value> =
        deliveries.body["items"].as_array().unwrap().iter().map(|d| d["status"].clone()).collect();
    assert_eq!(statuses, vec![json!(200), json!(500), json!(500)], "newest first");
    assert!(deliveries.body["items"][1]["error"].as_str().unwrap().contains("500"));
    assert!(deliveries.body["items"][0]["latency_ms"].is_u64());
    // Success stops the retries: nothing more arrives.
    assert!(tokio::time::timeout(Duration::from_millis(800), receiver.seen.recv()).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn every_event_kind_is_delivered_and_slack_gets_its_own_shape() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let mut all = Receiver::start(0).await;
    subscribe(&server, &all, json!(["*"]), "json").await;
    let mut slack = Receiver::start(0).await;
    subscribe(&server, &slack, json!(["approval.requested"]), "slack").await;
    let agent = server.agent("ops").await;

    // Held, then approved: requested, decided, finished. Its reasoning tries Slack's markup: a channel-wide
    // mention and a link posing as the real one.
    let mut charge = action("payments.charge.card");
    charge["reasoning"] = json!({"goal": "<!channel> see <https://evil.example/ui/login|Open in Countersign> & pay"});
    let held = agent.submit_action(&charge).await.unwrap();
    assert_eq!(held.status, 202);
    let approved = server.admin.approve(held.str("/approval/id"), Some("fine")).await.unwrap();
    assert_eq!(approved.status, 200);
    // Held with a one-second deadline: requested, expired, finished.
    let expiring = agent.submit_action(&action("ops.restart.db")).await.unwrap();
    assert_eq!(expiring.status, 202);

    let mut kinds = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    while kinds.len() < 6 {
        let seen = all.next().await;
        assert!(seen.signature_ok);
        assert!(ids.insert(seen.body["id"].as_str().unwrap().to_owned()), "event ids are unique: {:?}", seen.body);
        let subject = seen.body["data"]["action"]["id"].as_str().unwrap().to_owned();
        // Times at the store's precision, as a later read of the record says them, though most events are
        // built from the record in memory.
        for time in ["created_at", "finished_at"] {
            if let Some(at) = seen.body["data"]["action"][time].as_str() {
                let at = chrono::DateTime::parse_from_rfc3339(at).unwrap();
                assert_eq!(at.timestamp_subsec_nanos() % 1000, 0, "{time} finer than a microsecond: {:?}", seen.body);
            }
        }
        kinds.push((subject, seen.event_type.clone(), seen.body["data"]["action"]["state"].clone()));
    }
    // Deliveries run concurrently, so compare what arrived, not in which order.
    let of = |id: &str| -> Vec<(String, Value)> {
        let mut found: Vec<(String, Value)> =
            kinds.iter().filter(|(s, _, _)| s == id).map(|(_, k, st)| (k.clone(), st.clone())).collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    };
    assert_eq!(
        of(held.str("/id")),
        vec![
            ("action.finished".into(), json!("approved")),
            ("approval.decided".into(), json!("approved")),
            ("approval.requested".into(), json!("pending_approval")),
        ]
    );
    assert_eq!(
        of(expiring.str("/id")),
        vec![
            ("action.finished".into(), json!("expired")),
            ("approval.expired".into(), json!("expired")),
            ("approval.requested".into(), json!("pending_approval")),
        ]
    );

    // Both requests reach Slack, in whichever order their deliveries ran.
    let mut texts = Vec::new();
    let mut reasonings = Vec::new();
    for _ in 0..2 {
        let message = slack.next().await;
        assert!(message.signature_ok);
        let blocks = message.body["blocks"].as_array().unwrap();
        assert!(!blocks.is_empty());
        texts.push(message.body["text"].as_str().unwrap().to_owned());
        reasonings.extend(blocks.iter().filter(|b| b["type"] == "context").map(|b| b.to_string()));
    }
    // The agent's words arrive as text, escaped: no mention, no link but the gateway's own.
    let reasoning = reasonings.iter().find(|r| r.contains("evil.example")).unwrap_or_else(|| panic!("{reasonings:?}"));
    assert!(
        reasoning.contains("&lt;!channel&gt; see &lt;https://evil.example/ui/login|Open in Countersign&gt; &amp; pay"),
        "{reasoning}"
    );
    assert!(!reasoning.contains("<!channel>") && !reasoning.contains("<https://evil"), "{reasoning}");
    let text = texts.iter().find(|t| t.contains("payments.charge.card")).unwrap_or_else(|| panic!("{texts:?}"));
    assert!(text.contains("ops"), "{text}");
    assert!(text.contains("/ui/approvals/apr_"), "links to the dashboard: {text}");
    assert!(texts.iter().any(|t| t.contains("ops.restart.db")), "{texts:?}");
    server.stop().await;
}

#[tokio::test]
async fn bad_webhook_targets_fail_clearly_and_never_stick() {
    let dir = tempfile::tempdir().unwrap();
    // Reading the deliveries until the first attempt shows is many requests from one admin: no rate limit.
    let mut settings = config(dir.path(), None);
    settings.rate_limit.per_second = 0;
    let server = TestServer::start_with(settings, None).await;
    let admin = &server.admin;

    let ftp = admin.post("/v1/webhooks", &json!({"url": "ftp://example.com/x", "events": ["*"]})).await.unwrap();
    assert_eq!(ftp.status, 422);
    assert!(ftp.str("/detail").contains("http or https"), "{:?}", ftp.body);
    let unknown = admin.post("/v1/webhooks", &json!({"url": "https://example.com", "events": ["nope.*"]})).await;
    assert_eq!(unknown.unwrap().status, 422);
    let agent = server.agent("a").await;
    let forbidden = agent.post("/v1/webhooks", &json!({"url": "https://example.com", "events": ["*"]})).await;
    assert_eq!(forbidden.unwrap().status, 403);

    // A redirecting receiver: the redirect is recorded as a failed attempt and not followed.
    let redirected = Arc::new(Mutex::new(0usize));
    let hits = redirected.clone();
    let (attempted, mut attempts) = mpsc::unbounded_channel::<()>();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(move || {
                let _ = attempted.send(());
                async { (StatusCode::FOUND, [("location", "http://127.0.0.1:9/elsewhere")]) }
            }),
        )
        .fallback(move || {
            *hits.lock().unwrap() += 1;
            async { StatusCode::OK }
        });
    let redirect_url = format!("{}/hook", serve(app).await);

    let mut hooks = Vec::new();
    for url in [
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.2]/",
        &redirect_url,
        "http://no-such-host.invalid/hook",
    ] {
        let created = admin.post("/v1/webhooks", &json!({"url": url, "events": ["approval.requested"]})).await.unwrap();
        assert_eq!(created.status, 201, "{:?}", created.body);
        hooks.push(created.str("/id").to_owned());
    }
    assert_eq!(agent.submit_action(&action("payments.charge.card")).await.unwrap().status, 202);

    let expectations =
        ["10.1.2.3 is private", "169.254.169.254 is link-local", "refused by the outbound guard: ::ffff:127.0.0.2"];
    for (hook, expected) in hooks.iter().zip(expectations) {
        let job = job_of(admin, hook).await;
        let done = admin.get(&format!("/v1/jobs/{job}/wait?timeout=10")).await.unwrap();
        assert_eq!(done.str("/state"), "failed", "{:?}", done.body);
        assert_eq!(done.body["attempts"], 1, "a refusal is not retried");
        assert!(done.str("/error").contains(expected), "{expected}: {:?}", done.body);
        let deliveries = admin.get(&format!("/v1/webhooks/{hook}/deliveries")).await.unwrap();
        assert!(deliveries.body["items"][0]["error"].as_str().unwrap().contains("outbound guard"));
    }
    // A name that does not resolve is not a refusal: resolvers fail for a moment, so it is tried again.
    let unresolved = &hooks[4];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let tried = loop {
        let deliveries = admin.get(&format!("/v1/webhooks/{unresolved}/deliveries")).await.unwrap();
        let items = deliveries.body["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= 2 || std::time::Instant::now() > deadline {
            break items;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(tried.len() >= 2, "an unresolved name is retried: {tried:?}");
    assert!(tried[0]["error"].as_str().unwrap().contains("cannot resolve no-such-host.invalid"), "{tried:?}");
    let job = job_of(admin, unresolved).await;
    admin.post(&format!("/v1/jobs/{job}/cancel"), &json!({})).await.unwrap();

    // The redirect is retried (the receiver may fix itself) but never followed; an admin can cancel it.
    let redirect_hook = &hooks[3];
    let job = job_of(admin, redirect_hook).await;
    tokio::time::timeout(Duration::from_secs(10), attempts.recv()).await.unwrap().unwrap();
    // The attempt reached the receiver; its record follows within moments.
    let first = loop {
        let deliveries = admin.get(&format!("/v1/webhooks/{redirect_hook}/deliveries")).await.unwrap();
        if let Some(d) = deliveries.body["items"].as_array().and_then(|items| items.last()).cloned() {
            break d;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(first["status"], 302);
    assert!(first["error"].as_str().unwrap().contains("redirects are not followed"));
    let cancelled = admin.post(&format!("/v1/jobs/{job}/cancel"), &json!({})).await.unwrap();
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    assert_eq!(cancelled.str("/state"), "cancelled");
    assert_eq!(*redirected.lock().unwrap(), 0, "the redirect target was never called");
    let again = admin.post(&format!("/v1/jobs/{job}/cancel"), &json!({})).await.unwrap();
    assert_eq!(again.status, 409);
    server.stop().await;
}

/// A webhook URL often is the credential (a Slack hook's path): the audit log, which every user reads, and
/// the errors of failed attempts (on jobs every user lists) show only its origin.
#[tokio::test]
async fn a_webhook_url_is_kept_out_of_the_audit_log_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let admin = &server.admin;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("http://127.0.0.1:{port}/services/T0/B0/hook-secret?token=query-secret");
    let created = admin.post("/v1/webhooks", &json!({"url": url, "events": ["approval.requested"]})).await.unwrap();
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.str("/url"), url, "the admin sees the whole URL on the webhook");
    let hook = created.str("/id").to_owned();

    let audit = admin.get("/v1/audit?action=webhook.created").await.unwrap();
    assert_eq!(audit.body["events"][0]["data"]["url"], json!(format!("http://127.0.0.1:{port}/…")));

    let agent = server.agent("a").await;
    assert_eq!(agent.submit_action(&action("payments.charge.card")).await.unwrap().status, 202);
    let job = job_of(admin, &hook).await;
    let deliveries = loop {
        let deliveries = admin.get(&format!("/v1/webhooks/{hook}/deliveries")).await.unwrap();
        if deliveries.body["items"].as_array().is_some_and(|items| !items.is_empty()) {
            break deliveries;
        }
        tokio::task::yield_now().await;
    };
    let error = deliveries.body["items"][0]["error"].as_str().unwrap().to_owned();
    assert!(error.contains("connection failed"), "{error}");
    let job = admin.get(&format!("/v1/jobs/{job}")).await.unwrap();
    for shown in [error, job.body.to_string(), admin.get("/v1/audit?limit=1000").await.unwrap().body.to_string()] {
        assert!(!shown.contains("hook-secret") && !shown.contains("query-secret"), "{shown}");
    }
    server.stop().await;
}

async fn job_of(admin: &countersign::client::Client, subject: &str) -> String {
    let jobs = admin.get(&format!("/v1/jobs?subject={subject}")).await.unwrap();
    assert_eq!(jobs.status, 200, "{:?}", jobs.body);
    jobs.body["items"][0]["id"].as_str().expect("a job for the subject").to_owned()
}

/// Drops a message when the request it guards is cut off.
struct OnDrop(Option<mpsc::UnboundedSender<&'static str>>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send("dropped");
        }
    }
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<&'static str>) -> Option<&'static str> {
    tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("the upstream heard nothing within 10 s")
}

/// A runner that loses a job's lease stops the job where it is, as if its process had died, instead of
/// carrying on beside whoever holds the job now; that holder then meets the crash case (outcome unknown for
/// an upstream that is not retry_safe), and the request is never sent twice.
#[tokio::test]
async fn a_job_whose_lease_is_lost_stops_and_is_never_sent_twice() {
    let (seen, mut events) = mpsc::unbounded_channel::<&'static str>();
    let app = axum::Router::new().route(
        "/hang",
        axum::routing::post(move || {
            let seen = seen.clone();
            async move {
                let _ = seen.send("arrived");
                let _guard = OnDrop(Some(seen));
                std::future::pending::<StatusCode>().await
            }
        }),
    );
    let url = serve(app).await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Some(&url));
    config.jobs.lease = Duration::from_secs(2);
    if let Some(upstream) = config.upstreams.get_mut("payments") {
        upstream.timeout_seconds = 120;
    }
    let server = TestServer::start_with(config, None).await;
    let agent = server.agent("payer").await;
    let mut body = http_action("email.send.receipt");
    body["target"]["path"] = json!("/hang");
    let submitted = agent.submit_action(&body).await.unwrap();
    assert_eq!(submitted.status, 202, "{:?}", submitted.body);
    let job_id = submitted.str("/job_id").to_owned();
    assert_eq!(next_event(&mut events).await, Some("arrived"));

    // Another runner takes the job over (as after a stall longer than the lease).
    let taken = "UPDATE jobs SET lease_owner = 'another-runner' WHERE id = ?";
    assert_eq!(crate::helpers::raw_sql(dir.path(), taken, &[&job_id]).await, Ok(1));
    assert_eq!(next_event(&mut events).await, Some("dropped"), "the runner that lost the lease stopped its request");

    // That runner dies too: its lease runs out and the job is taken up again, as after a crash.
    let expired = "UPDATE jobs SET lease_until = 0 WHERE id = ?";
    assert_eq!(crate::helpers::raw_sql(dir.path(), expired, &[&job_id]).await, Ok(1));
    let job = agent.get(&format!("/v1/jobs/{job_id}/wait?timeout=20")).await.unwrap();
    assert_eq!(job.body["state"], "failed", "{:?}", job.body);
    let action = agent.get_action(submitted.str("/id")).await.unwrap();
    assert_eq!(action.body["state"], "failed");
    assert!(action.str("/error").contains("outcome unknown"), "{:?}", action.body);
    assert!(events.try_recv().is_err(), "the request was sent once");
    server.stop().await;
}

/// A send whose outcome is unknown (the upstream took the request and never answered) is sent again to a
/// `retry_safe` upstream, with the same `Idempotency-Key`, as after a crash.
#[tokio::test]
async fn an_unknown_outcome_is_resent_to_a_retry_safe_upstream() {
    let keys = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = keys.clone();
    let app = axum::Router::new().route(
        "/charge",
        axum::routing::post(move |headers: HeaderMap| {
            let seen = seen.clone();
            async move {
                let key = headers["idempotency-key"].to_str().unwrap().to_owned();
                let first = {
                    let mut keys = seen.lock().unwrap();
                    keys.push(key);
                    keys.len() == 1
                };
                if first {
                    std::future::pending::<()>().await;
                }
                (StatusCode::CREATED, "{\"card_id\": \"card_9\"}")
            }
        }),
    );
    let url = serve(app).await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Some(&url));
    if let Some(upstream) = config.upstreams.get_mut("payments") {
        upstream.timeout_seconds = 1;
        upstream.retry_safe = true;
    }
    let server = TestServer::start_with(config, None).await;
    let agent = server.agent("payer").await;
    let mut body = http_action("email.send.receipt");
    body["target"]["path"] = json!("/charge");
    let submitted = agent.submit_action(&body).await.unwrap();
    assert_eq!(submitted.status, 202, "{:?}", submitted.body);
    let job = agent.get(&format!("/v1/jobs/{}/wait?timeout=20", submitted.str("/job_id"))).await.unwrap();
    assert_eq!(job.body["state"], "succeeded", "{:?}", job.body);
    assert_eq!(job.body["attempts"], 2);
    let action = agent.get_action(submitted.str("/id")).await.unwrap();
    assert_eq!(action.body["state"], "succeeded", "{:?}", action.body);
    assert_eq!(action.body["result"]["status"], 201);
    let keys = keys.lock().unwrap().clone();
    assert_eq!(keys, [submitted.str("/id"), submitted.str("/id")], "sent twice, under one idempotency key");
    let trail = server.admin.get(&format!("/v1/audit?subject={}", submitted.str("/id"))).await.unwrap();
    let names: Vec<&str> =
        trail.body["events"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    let unknown = names.iter().position(|n| *n == "action.outcome_unknown").expect("the unknown outcome is audited");
    assert!(names[unknown..].contains(&"action.executed"), "{names:?}");
    server.stop().await;
}

#[tokio::test]
async fn upstream_failures_end_on_the_job_and_never_stick_a_worker() {
    // An upstream that hangs, fails, sends far more than the cap, or answers 201 and breaks off its body.
    let app = axum::Router::new()
        .route("/hang", axum::routing::post(std::future::pending::<StatusCode>))
        .route(
            "/broken",
            axum::routing::post(|| async {
                // The head and first part go out; a moment later the body breaks off.
                let parts = futures_util::stream::unfold(0, |sent| async move {
                    match sent {
                        0 => Some((Ok(Bytes::from_static(b"{\"card_id\": \"card_")), 1)),
                        1 => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Some((Err(std::io::Error::other("cut")), 2))
                        }
                        _ => None,
                    }
                });
                (StatusCode::CREATED, axum::body::Body::from_stream(parts))
            }),
        )
        .route("/fail", axum::routing::post(|| async { (StatusCode::BAD_GATEWAY, "upstream broke") }))
        .route(
            "/huge",
            axum::routing::post(|| async {
                let chunk = Bytes::from(vec![b'x'; 1024 * 1024]);
                let stream = futures_util::stream::iter((0..100).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
                axum::body::Body::from_stream(stream)
            }),
        );
    let url = serve(app).await;

    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Some(&url));
    if let Some(upstream) = config.upstreams.get_mut("payments") {
        upstream.timeout_seconds = 1;
    }
    let server = TestServer::start_with(config, None).await;
    let agent = server.agent("payer").await;

    let run = |path: &'static str| {
        let agent = agent.clone();
        async move {
            let mut body = http_action("email.send.receipt");
            body["target"]["path"] = json!(path);
            let submitted = agent.submit_action(&body).await.unwrap();
            assert_eq!(submitted.status, 202, "running: {:?}", submitted.body);
            let job_id = submitted.str("/job_id").to_owned();
            let job = agent.get(&format!("/v1/jobs/{job_id}/wait?timeout=20")).await.unwrap();
            let action = agent.get_action(submitted.str("/id")).await.unwrap();
            (job.body, action.body)
        }
    };
    let ((hang_job, hang), (fail_job, fail), (huge_job, huge), (_, broken)) =
        tokio::join!(run("/hang"), run("/fail"), run("/huge"), run("/broken"));
    assert_eq!(hang_job["state"], "failed");
    assert!(hang_job["error"].as_str().unwrap().contains("timed out"), "{hang_job:?}");
    assert_eq!(hang["state"], "failed");
    // The request went out and no answer came: it may have taken effect, and the action says so.
    assert!(hang["error"].as_str().unwrap().starts_with("outcome unknown"), "{hang:?}");
    // The upstream answered 201: that is kept, with what came of the body, not turned into "no answer".
    assert_eq!(broken["state"], "succeeded", "{broken:?}");
    assert_eq!(broken["result"]["status"], 201);
    assert_eq!(broken["result"]["truncated"], true);
    assert!(broken["result"]["body_error"].as_str().unwrap().contains("broke off"), "{broken:?}");
    assert_eq!(fail_job["state"], "failed");
    assert!(fail_job["error"].as_str().unwrap().contains("502"), "{fail_job:?}");
    assert_eq!(fail["result"]["status"], 502);
    // 100 MB: only the capped head is read and kept, flagged as truncated.
    assert_eq!(huge["result"]["truncated"], true, "{huge:?}");
    assert_eq!(huge["result"]["body"].as_str().unwrap().len(), 64 * 1024);
    assert_eq!(huge_job["state"], "succeeded");
    server.stop().await;
}

#[tokio::test]
async fn the_jobs_api_tracks_executions_and_keeps_to_its_org_and_agent() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Some(&upstream.url)).await;
    let agent = server.agent("payer").await;
    let other_agent = server.agent("someone-else").await;

    let submitted = agent.submit_action(&http_action("email.send.receipt")).await.unwrap();
    let job_id = submitted.str("/job_id").to_owned();
    assert!(job_id.starts_with("job_"), "{:?}", submitted.body);
    let job = agent.get(&format!("/v1/jobs/{job_id}/wait?timeout=10")).await.unwrap();
    assert_eq!(job.str("/state"), "succeeded", "{:?}", job.body);
    assert_eq!(job.str("/kind"), "action.execute");
    assert_eq!(job.body["subject"], submitted.body["id"]);
    assert_eq!(job.body["result"]["status"], 201);
    assert_eq!(upstream.count(), 1);

    let listed = server.admin.get("/v1/jobs?kind=action.execute&state=succeeded").await.unwrap();
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 1);
    let none = server.admin.get("/v1/jobs?state=queued").await.unwrap();
    assert_eq!(none.body["items"], json!([]));
    assert_eq!(server.admin.get("/v1/jobs?kind=bogus").await.unwrap().status, 400);
    assert_eq!(server.admin.get("/v1/jobs?state=bogus").await.unwrap().status, 400);
    assert_eq!(server.admin.get("/v1/jobs/job_nope").await.unwrap().status, 404);
    // The agent lists its own execution, and a page of one holds it though a newer job of the org (an
    // export) is not the agent's to see: the store filters, so a page is never thinned after the read.
    let export = server.admin.post("/v1/audit/exports", &json!({})).await.unwrap();
    assert_eq!(export.status, 202, "{:?}", export.body);
    let own = agent.get("/v1/jobs?limit=1").await.unwrap();
    let own: Vec<&str> = own.body["items"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(own, [job_id.as_str()]);
    // Another agent of the same org does not see this agent's executions.
    assert_eq!(other_agent.get(&format!("/v1/jobs/{job_id}")).await.unwrap().status, 404);
    assert_eq!(other_agent.get("/v1/jobs").await.unwrap().body["items"], json!([]));
    // Only its own agent (or an admin) may cancel an execution; a finished one cannot be cancelled.
    let cancel = format!("/v1/jobs/{job_id}/cancel");
    assert_eq!(other_agent.post(&cancel, &json!({})).await.unwrap().status, 404);
    assert_eq!(agent.post(&format!("/v1/jobs/{}/cancel", export.str("/id")), &json!({})).await.unwrap().status, 404);
    assert_eq!(agent.post(&cancel, &json!({})).await.unwrap().status, 409);
    assert_eq!(server.admin.post(&cancel, &json!({})).await.unwrap().status, 409);
    // Another org sees nothing.
    let org = server.admin.post("/v1/orgs", &json!({"name": "elsewhere"})).await.unwrap();
    let stranger = server.admin.with_key(org.str("/admin_key"));
    assert_eq!(stranger.get(&format!("/v1/jobs/{job_id}")).await.unwrap().status, 404);
    assert_eq!(stranger.get("/v1/jobs").await.unwrap().body["items"], json!([]));

    let metrics = server.admin.get("/metrics").await.unwrap();
    let text = metrics.body.as_str().unwrap();
    for series in [
        "countersign_jobs_open{",
        "countersign_jobs_finished_total{kind=\"action.execute\",state=\"succeeded\"} 1",
        "countersign_pending_approvals",
        "countersign_approval_decision_latency_seconds",
        "countersign_policy_evaluation_seconds",
    ] {
        assert!(text.contains(series), "metrics lack {series}");
    }
    server.stop().await;
}

/// An agent withdraws the execution of its own approved action while it waits for a free job slot: the
/// request is never sent and the action fails saying who cancelled it. Another agent cannot see the job;
/// a user who is not an admin may not cancel.
#[tokio::test]
async fn an_agent_cancels_the_queued_execution_of_its_own_action() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Some(&upstream.url));
    config.jobs.concurrency = 1;
    let server = TestServer::start_with(config, None).await;
    // The one job slot is taken by a delivery to a receiver that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/hook", silent.local_addr().unwrap());
    let (accepted, mut delivering) = mpsc::unbounded_channel();
    let receiver = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
            let _ = accepted.send(());
        }
    });
    let hook = json!({"url": silent_url, "events": ["approval.requested"]});
    assert_eq!(server.admin.post("/v1/webhooks", &hook).await.unwrap().status, 201);
    let agent = server.agent("payer").await;
    let other_agent = server.agent("someone-else").await;
    let approver = server.user("avery", "approver").await;

    let held = agent.submit_action(&http_action("payments.charge.card")).await.unwrap();
    assert_eq!(held.status, 202, "{:?}", held.body);
    tokio::time::timeout(Duration::from_secs(10), delivering.recv()).await.unwrap().unwrap();
    let approved = server.admin.approve(held.str("/approval/id"), None).await.unwrap();
    assert_eq!(approved.status, 200, "{:?}", approved.body);
    let action = agent.get_action(held.str("/id")).await.unwrap();
    let job_id = action.str("/job_id").to_owned();
    let job = agent.get(&format!("/v1/jobs/{job_id}")).await.unwrap();
    assert_eq!(job.str("/state"), "queued", "the slot is busy: {:?}", job.body);

    // A wait on the job by a key revoked while it waits answers 401 when the job ends, not the job.
    let minted = server.admin.create_key("agent", "payer").await.unwrap();
    let revocable = server.admin.with_key(minted.str("/key").to_owned());
    let listening = server.gateway().notifier().job_listeners();
    let waiter = {
        let path = format!("/v1/jobs/{job_id}/wait?timeout=30");
        tokio::spawn(async move { revocable.get(&path).await.unwrap() })
    };
    // The wait is open once it listens for job changes (it authenticated before that).
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.gateway().notifier().job_listeners() == listening {
        assert!(Instant::now() < deadline, "the wait never began");
        tokio::task::yield_now().await;
    }
    assert_eq!(server.admin.revoke_key(minted.str("/id")).await.unwrap().status, 204);

    let cancel = format!("/v1/jobs/{job_id}/cancel");
    assert_eq!(other_agent.post(&cancel, &json!({})).await.unwrap().status, 404);
    assert_eq!(approver.post(&cancel, &json!({})).await.unwrap().status, 403);
    let cancelled = agent.post(&cancel, &json!({})).await.unwrap();
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    assert_eq!(cancelled.str("/state"), "cancelled");
    assert_eq!(cancelled.str("/error"), "cancelled by payer");
    let failed = agent.get_action(held.str("/id")).await.unwrap();
    assert_eq!(failed.str("/state"), "failed", "{:?}", failed.body);
    assert_eq!(failed.str("/error"), "execution cancelled by payer before it was sent");
    let trail = server.admin.get(&format!("/v1/audit?subject={job_id}")).await.unwrap();
    let cancelled_by = trail.body["events"].as_array().unwrap().iter().find(|e| e["action"] == "job.cancelled");
    assert_eq!(cancelled_by.unwrap()["actor"]["name"], "payer", "{:?}", trail.body);
    assert_eq!(upstream.count(), 0, "never sent");
    let answered = waiter.await.unwrap();
    assert_eq!(answered.status, 401, "{:?}", answered.body);
    assert!(answered.str("/detail").contains("stopped working while the request waited"), "{:?}", answered.body);
    receiver.abort();
    server.stop().await;
}
