//! Crash safety end to end: the real `countersign` binary runs as a child process, is killed with SIGKILL
//! while it works, and is started again on the same data directory. Nothing acknowledged may be lost,
//! nothing may be sent twice to an upstream that is not `retry_safe`, nothing approved may be dropped, and
//! the audit chain must still verify.
//!
//! Not here: graceful shutdown and in-process restarts (`core_loop` covers those through `Server`).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use countersign::client::{ApiResponse, Client};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use crate::helpers::{TEST_POLICY, action};

/// How long a test waits for anything that should take milliseconds before it gives up.
const PATIENCE: Duration = Duration::from_secs(20);

/// Writes `countersign.toml` and the policy into `dir`. With an upstream URL, configures two upstreams on
/// it: `unsafe_up` (not retry-safe) and `safe_up` (retry-safe). The rate limit is off: these tests are about
/// crashes, and their load must never be refused with 429.
fn write_config(dir: &Path, upstream: Option<&str>) {
    let mut toml = String::from(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\npolicy = \"policy.yaml\"\n\n\
         [network]\nallow_private = [\"127.0.0.1/32\"]\n\n\
         [rate_limit]\nper_second = 0\nburst = 0\n",
    );
    if let Some(url) = upstream {
        for (name, retry_safe) in [("unsafe_up", false), ("safe_up", true)] {
            toml.push_str(&format!(
                "\n[upstreams.{name}]\nbase_url = \"{url}\"\nretry_safe = {retry_safe}\ntimeout_seconds = 120\n\
                 headers = {{ Authorization = \"Bearer upstream-secret\" }}\n"
            ));
        }
    }
    std::fs::write(dir.join("countersign.toml"), toml).unwrap();
    std::fs::write(dir.join("policy.yaml"), TEST_POLICY).unwrap();
}

/// The `countersign serve` child process. Dropping it kills the child (SIGKILL), so a failing test leaves
/// no server behind.
struct Proc {
    child: Child,
    pid: u32,
    admin: Client,
}

impl Proc {
    /// Starts the binary on the config in `dir` and waits for the line that names its URL.
    async fn start(dir: &Path) -> Proc {
        let mut command = Command::new(env!("CARGO_BIN_EXE_countersign"));
        command
            .arg("serve")
            .arg("--config")
            .arg(dir.join("countersign.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Only the config file speaks: no COUNTERSIGN_* variable of the test's environment leaks in.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("COUNTERSIGN_") {
                command.env_remove(name);
            }
        }
        command.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
        let mut child = command.spawn().unwrap();
        let pid = child.id().unwrap_or_default();

        let stderr = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[countersign {pid}] {line}");
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = tokio::time::timeout(PATIENCE, async {
            while let Ok(Some(line)) = stdout.next_line().await {
                eprintln!("[countersign {pid}] {line}");
                if let Some(url) = line.strip_prefix("Countersign is listening on ") {
                    return Some(url.trim().to_owned());
                }
            }
            None
        })
        .await;
        let url = match url {
            Ok(Some(url)) => url,
            Ok(None) => panic!("countersign exited before listening: {:?}", child.wait().await),
            Err(_) => panic!("countersign printed no URL within {PATIENCE:?}"),
        };
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                eprintln!("[countersign {pid}] {line}");
            }
        });
        // The first start wrote it; later starts read the same file.
        let key = std::fs::read_to_string(dir.join("data").join("admin.key")).unwrap().trim().to_owned();
        assert!(key.starts_with("cs_sk_"), "admin.key holds {key:?}");
        Proc { child, pid, admin: Client::new(url, Some(key)).unwrap() }
    }

    /// SIGKILL, then reap; asserts the process had not ended by itself.
    async fn kill9(mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("countersign {} had already exited: {status}", self.pid);
        }
        self.child.kill().await.unwrap();
        let status = self.child.wait().await.unwrap();
        assert_eq!(status.signal(), Some(9), "countersign {} ended by {status}, not by SIGKILL", self.pid);
    }

    /// Creates an agent and answers its key.
    async fn agent_key(&self, name: &str) -> String {
        let created = self.admin.create_agent(name).await.unwrap();
        assert_eq!(created.status, 201, "{:?}", created.body);
        let key = self.admin.create_key("agent", name).await.unwrap();
        assert_eq!(key.status, 201, "{:?}", key.body);
        key.str("/key").to_owned()
    }

    /// Every item of a paged list (`items` or `events`), following `next_cursor`.
    async fn all(&self, path: &str, field: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let url = match &cursor {
                Some(c) => format!("{path}{sep}limit=1000&cursor={c}"),
                None => format!("{path}{sep}limit=1000"),
            };
            let page = self.admin.get(&url).await.unwrap();
            assert_eq!(page.status, 200, "{url}: {:?}", page.body);
            out.extend(page.body[field].as_array().unwrap().iter().cloned());
            match page.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }

    async fn verify_audit(&self) -> Value {
        let verify = self.admin.get("/v1/audit/verify").await.unwrap();
        assert_eq!(verify.status, 200, "{:?}", verify.body);
        if let Some(seq) = verify.body["first_broken_seq"].as_u64() {
            // Show the events around the break, for whoever has to find out why.
            let around = self.admin.get(&format!("/v1/audit?cursor={}&limit=4", seq.saturating_sub(2))).await.unwrap();
            for event in around.body["events"].as_array().into_iter().flatten() {
                eprintln!("{event}");
            }
        }
        assert_eq!(verify.body["ok"], json!(true), "the audit chain is broken: {:?}", verify.body);
        assert_eq!(verify.body["first_broken_seq"], Value::Null);
        verify.body
    }

    async fn wait_action(&self, id: &str) -> ApiResponse {
        let waited = self.admin.wait_action(id, PATIENCE.as_secs_f64()).await.unwrap();
        assert_eq!(waited.status, 200, "{:?}", waited.body);
        waited
    }

    async fn wait_job(&self, id: &str) -> ApiResponse {
        let waited = self.admin.get(&format!("/v1/jobs/{id}/wait?timeout={}", PATIENCE.as_secs())).await.unwrap();
        assert_eq!(waited.status, 200, "{:?}", waited.body);
        waited
    }

    /// The audit event names of an action's trace, in order.
    async fn trace_events(&self, id: &str) -> (Value, Vec<String>) {
        let trace = self.admin.get(&format!("/v1/actions/{id}/trace")).await.unwrap();
        assert_eq!(trace.status, 200, "{:?}", trace.body);
        let names =
            trace.body["events"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap().to_owned()).collect();
        (trace.body, names)
    }
}

/// One request the fake upstream received.
#[derive(Debug, Clone)]
struct Seen {
    idempotency_key: String,
    authorization: String,
    path: String,
    body: Bytes,
}

/// A loopback upstream that records every request. While `hold` is set it never answers (the request stays
/// open until the caller dies); otherwise it answers 200 with a JSON body.
struct FakeUpstream {
    url: String,
    hold: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    received: watch::Receiver<usize>,
}

impl FakeUpstream {
    async fn start(hold: bool) -> FakeUpstream {
        let hold = Arc::new(AtomicBool::new(hold));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (count_tx, received) = watch::channel(0usize);
        let count_tx = Arc::new(count_tx);
        let app = {
            let (hold, seen) = (hold.clone(), seen.clone());
            axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let (hold, seen, count_tx) = (hold.clone(), seen.clone(), count_tx.clone());
                async move {
                    let header =
                        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                    let n = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Seen {
                            idempotency_key: header("idempotency-key"),
                            authorization: header("authorization"),
                            path: uri.path().to_owned(),
                            body,
                        });
                        seen.len()
                    };
                    count_tx.send_replace(n);
                    if hold.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    (axum::http::StatusCode::OK, axum::Json(json!({"charge_id": "ch_1", "captured": true})))
                }
            })
        };
        let url = crate::helpers::serve(app).await;
        FakeUpstream { url, hold, seen, received }
    }

    /// Resolves once at least `n` requests have arrived in total.
    async fn received_at_least(&self, n: usize) {
        let mut received = self.received.clone();
        tokio::time::timeout(PATIENCE, received.wait_for(|count| *count >= n))
            .await
            .unwrap_or_else(|_| panic!("the upstream saw {} requests, not {n}, within {PATIENCE:?}", self.count()))
            .unwrap();
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The requests carrying `Idempotency-Key: <key>` (the action id).
    fn for_key(&self, key: &str) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|s| s.idempotency_key == key).cloned().collect()
    }
}

/// An action whose frozen request goes to `upstream`.
fn http_to(capability: &str, upstream: &str, n: usize) -> Value {
    json!({
        "capability": capability,
        "params": {"amount_cents": 1200, "n": n},
        "reasoning": {"goal": "charge the customer", "n": n},
        "target": {"connector": "http", "upstream": upstream, "method": "POST", "path": "/v1/charges",
                   "body": {"amount": 1200, "currency": "eur", "n": n}}
    })
}

/// What the load in `acknowledged_work_survives_kill_9` heard back.
#[derive(Debug)]
enum Heard {
    Allowed(String),
    Denied(String),
    Held {
        action: String,
        approval: String,
    },
    Approved {
        action: String,
        approval: String,
    },
    /// A request the server never answered (it died meanwhile).
    Lost,
    Unexpected(String),
}

#[tokio::test]
async fn acknowledged_work_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), None);
    let server = Proc::start(dir.path()).await;
    let mut agent_keys = Vec::new();
    for worker in 0..8usize {
        agent_keys.push(server.agent_key(&format!("bot-{worker}")).await);
    }

    // One agent per submitter; each keeps submitting until the server dies under it (or it has sent 30), so
    // requests are in flight when it does. Every fourth submission is denied, every fourth is held; the rest
    // are allowed record-only actions. Every other held action is approved as soon as it is acknowledged.
    let (heard_tx, mut heard) = mpsc::unbounded_channel::<Heard>();
    let mut workers = Vec::new();
    for (worker, key) in agent_keys.iter().enumerate() {
        let (bot, heard_tx) = (server.admin.with_key(key.clone()), heard_tx.clone());
        workers.push(tokio::spawn(async move {
            for i in 0..30usize {
                let capability = match (worker + i) % 4 {
                    0 => "db.delete.row",
                    1 => "payments.charge.card",
                    _ => "email.send.message",
                };
                let heard = match bot.submit_action(&action(capability)).await {
                    Err(_) => Heard::Lost,
                    Ok(r) if r.status == 200 => Heard::Allowed(r.str("/id").to_owned()),
                    Ok(r) if r.status == 202 => {
                        Heard::Held { action: r.str("/id").to_owned(), approval: r.str("/approval/id").to_owned() }
                    }
                    Ok(r) if r.status == 403 => Heard::Denied(r.str("/action_id").to_owned()),
                    Ok(r) => Heard::Unexpected(format!("submit {capability}: {} {:?}", r.status, r.body)),
                };
                let done = matches!(heard, Heard::Lost | Heard::Unexpected(_));
                let _ = heard_tx.send(heard);
                if done {
                    return;
                }
            }
        }));
    }
    let approve = |action: String, approval: String| {
        let (admin, heard_tx) = (server.admin.clone(), heard_tx.clone());
        tokio::spawn(async move {
            let heard = match admin.approve(&approval, Some("ok")).await {
                Err(_) => Heard::Lost,
                Ok(r) if r.status == 200 && r.str("/status") == "approved" => Heard::Approved { action, approval },
                Ok(r) => Heard::Unexpected(format!("approve {approval}: {} {:?}", r.status, r.body)),
            };
            let _ = heard_tx.send(heard);
        })
    };

    let mut allowed = BTreeSet::new();
    let mut denied = BTreeSet::new();
    let mut held = BTreeMap::new(); // action id -> approval id
    let mut approved = BTreeMap::new(); // approval id -> action id
    let mut lost = 0usize;
    let mut unexpected = Vec::new();
    let mut record = |heard: Heard| match heard {
        Heard::Allowed(id) => {
            allowed.insert(id);
        }
        Heard::Denied(id) => {
            denied.insert(id);
        }
        Heard::Held { action, approval } => {
            held.insert(action, approval);
        }
        Heard::Approved { action, approval } => {
            approved.insert(approval, action);
        }
        Heard::Lost => lost += 1,
        Heard::Unexpected(what) => unexpected.push(what),
    };

    // Kill once enough was acknowledged, with the submitters and some approvals still going.
    let (mut acknowledged, mut approvals_acknowledged, mut held_seen) = (0usize, 0usize, 0usize);
    while acknowledged < 60 || approvals_acknowledged < 4 {
        let next = tokio::time::timeout(PATIENCE, heard.recv()).await.expect("the load stalled").unwrap();
        match &next {
            Heard::Allowed(_) | Heard::Denied(_) => acknowledged += 1,
            Heard::Held { action, approval } => {
                acknowledged += 1;
                held_seen += 1;
                if held_seen % 2 == 1 {
                    workers.push(approve(action.clone(), approval.clone()));
                }
            }
            Heard::Approved { .. } => approvals_acknowledged += 1,
            Heard::Lost | Heard::Unexpected(_) => {}
        }
        record(next);
    }
    server.kill9().await;
    for worker in workers {
        worker.await.unwrap();
    }
    drop(heard_tx);
    while let Some(next) = heard.recv().await {
        record(next);
    }
    assert!(unexpected.is_empty(), "unexpected answers before the kill: {unexpected:#?}");
    assert!(lost > 0, "the kill should have cut off requests in flight");
    assert!(!allowed.is_empty() && !denied.is_empty() && !held.is_empty() && !approved.is_empty());
    eprintln!(
        "acknowledged before the kill: {} allowed, {} denied, {} held, {} approvals; {lost} requests cut off",
        allowed.len(),
        denied.len(),
        held.len(),
        approved.len()
    );

    let server = Proc::start(dir.path()).await;
    let bot = server.admin.with_key(agent_keys[0].clone());
    for id in &allowed {
        let got = server.admin.get_action(id).await.unwrap();
        assert_eq!(got.status, 200, "acknowledged action {id} is lost: {:?}", got.body);
        assert_eq!(got.str("/state"), "approved", "{:?}", got.body);
        assert_eq!(got.str("/capability"), "email.send.message");
    }
    for id in &denied {
        let got = server.admin.get_action(id).await.unwrap();
        assert_eq!(got.status, 200, "acknowledged denial {id} is lost: {:?}", got.body);
        assert_eq!(got.str("/state"), "denied", "{:?}", got.body);
        assert_eq!(got.str("/verdict/rule"), "no-deletes");
    }
    let approved_actions: BTreeSet<&String> = approved.values().collect();
    for (id, approval_id) in &held {
        let got = server.admin.get_action(id).await.unwrap();
        assert_eq!(got.status, 200, "acknowledged held action {id} is lost: {:?}", got.body);
        let approval = server.admin.get(&format!("/v1/approvals/{approval_id}")).await.unwrap();
        assert_eq!(approval.status, 200, "the approval of {id} is lost: {:?}", approval.body);
        if approved_actions.contains(id) {
            assert_eq!(got.str("/state"), "approved", "an acknowledged approval was lost: {:?}", got.body);
            assert_eq!(approval.str("/status"), "approved", "{:?}", approval.body);
            assert_eq!(approval.body["decisions"].as_array().unwrap().len(), 1, "{:?}", approval.body);
            assert_eq!(approval.body["decisions"][0]["user"]["name"], json!("admin"));
            assert_eq!(approval.body["decisions"][0]["note"], json!("ok"));
        } else {
            // An approval in flight at the kill either committed or did not; nothing in between.
            match got.str("/state") {
                "pending_approval" => assert_eq!(approval.str("/status"), "pending"),
                "approved" => assert_eq!(approval.str("/status"), "approved"),
                other => panic!("held action {id} is {other}: {:?}", got.body),
            }
        }
    }

    // Everything in the store, acknowledged or not, is in a state a record-only action can rest in, and the
    // store and the audit log agree: each action has its submission event and each event its action.
    let actions = server.all("/v1/actions", "items").await;
    assert!(actions.len() >= allowed.len() + denied.len() + held.len());
    let mut stored = BTreeSet::new();
    for a in &actions {
        let state = a["state"].as_str().unwrap();
        assert!(["approved", "denied", "pending_approval"].contains(&state), "{a:?}");
        stored.insert(a["id"].as_str().unwrap().to_owned());
    }
    let submitted: BTreeSet<String> = server
        .all("/v1/audit?action=action.submitted", "events")
        .await
        .iter()
        .map(|e| e["subject"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(submitted, stored, "actions and their audit events disagree after the crash");
    let decided: BTreeSet<String> = server
        .all("/v1/audit?action=approval.approved", "events")
        .await
        .iter()
        .map(|e| e["subject"].as_str().unwrap().to_owned())
        .collect();
    let approved_now: BTreeSet<String> = server
        .all("/v1/approvals?status=approved", "items")
        .await
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(decided, approved_now, "approvals and their audit events disagree after the crash");
    assert!(approved.keys().all(|id| approved_now.contains(id)));
    let before = server.verify_audit().await;

    // The chain goes on after the crash: new work appends and still verifies.
    let after_crash = bot.submit_action(&action("payments.charge.card")).await.unwrap();
    assert_eq!(after_crash.status, 202, "{:?}", after_crash.body);
    let decided = server.admin.approve(after_crash.str("/approval/id"), None).await.unwrap();
    assert_eq!(decided.str("/status"), "approved", "{:?}", decided.body);
    let after = server.verify_audit().await;
    assert!(after["events"].as_u64().unwrap() > before["events"].as_u64().unwrap());
}

#[tokio::test]
async fn an_execution_cut_off_mid_send_is_not_sent_twice_unless_retry_safe() {
    let upstream = FakeUpstream::start(true).await;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), Some(&upstream.url));
    let server = Proc::start(dir.path()).await;
    let bot = server.admin.with_key(server.agent_key("bot").await);

    // Both are allowed by the default rule and go straight to execution; the upstream keeps both open.
    let mut ids = Vec::new();
    for (n, up) in ["unsafe_up", "safe_up"].into_iter().enumerate() {
        let submitted = bot.submit_action(&http_to("crm.update.contact", up, n)).await.unwrap();
        assert_eq!(submitted.status, 202, "{:?}", submitted.body);
        assert!(["approved", "executing"].contains(&submitted.str("/state")), "{:?}", submitted.body);
        ids.push(submitted.str("/id").to_owned());
    }
    let (unsafe_id, safe_id) = (ids[0].clone(), ids[1].clone());
    upstream.received_at_least(2).await;
    let running = server.admin.get_action(&unsafe_id).await.unwrap();
    assert_eq!(running.str("/state"), "executing", "{:?}", running.body);
    server.kill9().await;
    assert_eq!(upstream.for_key(&unsafe_id).len(), 1);
    assert_eq!(upstream.for_key(&safe_id).len(), 1);

    upstream.hold.store(false, Ordering::SeqCst);
    let server = Proc::start(dir.path()).await;

    // Not retry-safe: never sent again, ended `failed` with `outcome unknown`, audited.
    let ended = server.wait_action(&unsafe_id).await;
    assert_eq!(ended.str("/state"), "failed", "{:?}", ended.body);
    assert!(ended.str("/error").contains("outcome unknown"), "{:?}", ended.body);
    assert_eq!(ended.body["result"], Value::Null);
    let job = server.wait_job(ended.str("/job_id")).await;
    assert_eq!(job.str("/state"), "failed", "{:?}", job.body);
    assert!(job.str("/error").contains("outcome unknown"), "{:?}", job.body);
    let (trace, events) = server.trace_events(&unsafe_id).await;
    assert_eq!(events.iter().filter(|e| *e == "action.executing").count(), 1, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("action.failed"), "{events:?}");
    assert!(!events.iter().any(|e| e == "action.executed"), "{events:?}");
    let failed = trace["events"].as_array().unwrap().last().unwrap();
    assert_eq!(failed["actor"]["kind"], json!("system"));
    assert!(failed["data"]["error"].as_str().unwrap().contains("outcome unknown"), "{failed:?}");
    assert!(trace["execution"]["error"].as_str().unwrap().contains("outcome unknown"));

    // Retry-safe: sent exactly once more, with the same idempotency key and body, and it succeeded.
    let ended = server.wait_action(&safe_id).await;
    assert_eq!(ended.str("/state"), "succeeded", "{:?}", ended.body);
    assert_eq!(ended.body["result"]["status"], json!(200));
    assert_eq!(ended.body["result"]["body"]["charge_id"], json!("ch_1"));
    let job = server.wait_job(ended.str("/job_id")).await;
    assert_eq!(job.str("/state"), "succeeded", "{:?}", job.body);
    assert_eq!(job.body["attempts"], json!(2), "{:?}", job.body);
    let sent = upstream.for_key(&safe_id);
    assert_eq!(sent.len(), 2, "a retry-safe request cut off mid-send is re-sent exactly once");
    for s in &sent {
        assert_eq!(s.path, "/v1/charges");
        assert_eq!(s.authorization, "Bearer upstream-secret");
        assert_eq!(s.body, sent[0].body, "the re-sent request is the frozen one");
    }
    let (trace, events) = server.trace_events(&safe_id).await;
    assert_eq!(events.iter().filter(|e| *e == "action.executing").count(), 2, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("action.executed"), "{events:?}");
    assert!(!events.iter().any(|e| e == "action.failed"), "{events:?}");
    let retries: Vec<&Value> =
        trace["events"].as_array().unwrap().iter().filter(|e| e["action"] == "action.executing").collect();
    assert_eq!(retries[0]["data"]["retry"], json!(false));
    assert_eq!(retries[1]["data"]["retry"], json!(true));

    assert_eq!(upstream.for_key(&unsafe_id).len(), 1, "not retry-safe: sent once, never again");
    assert_eq!(upstream.count(), 3, "nothing else reached the upstream");
    server.verify_audit().await;
}

#[tokio::test]
async fn approved_but_unsent_actions_run_after_restart() {
    let upstream = FakeUpstream::start(true).await;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), Some(&upstream.url));
    let server = Proc::start(dir.path()).await;
    let bot_key = server.agent_key("bot").await;
    let bot = server.admin.with_key(bot_key.clone());

    // Part 1, deterministic: two held actions are approved while every runner slot is busy with a request
    // the upstream never answers, so they are approved and queued, but certainly not sent, at the kill.
    let mut held = Vec::new();
    for (n, up) in ["unsafe_up", "safe_up"].into_iter().enumerate() {
        let submitted = bot.submit_action(&http_to("payments.charge.card", up, n)).await.unwrap();
        assert_eq!(submitted.status, 202, "{:?}", submitted.body);
        assert_eq!(submitted.str("/state"), "pending_approval");
        held.push((submitted.str("/id").to_owned(), submitted.str("/approval/id").to_owned()));
    }
    let slots = countersign::gateway::JobRunnerSettings::default().concurrency;
    let mut blockers = Vec::new();
    for n in 0..slots {
        let bot = bot.clone();
        blockers.push(tokio::spawn(async move {
            let submitted = bot.submit_action(&http_to("crm.update.contact", "unsafe_up", 100 + n)).await.unwrap();
            assert_eq!(submitted.status, 202, "{:?}", submitted.body);
            submitted.str("/id").to_owned()
        }));
    }
    let mut blocker_ids = Vec::new();
    for b in blockers {
        blocker_ids.push(b.await.unwrap());
    }
    upstream.received_at_least(slots).await;
    let mut jobs = Vec::new();
    for (id, approval) in &held {
        let approved = server.admin.approve(approval, None).await.unwrap();
        assert_eq!(approved.status, 200, "{:?}", approved.body);
        assert_eq!(approved.str("/status"), "approved");
        let job_id = approved.str("/action/job_id").to_owned();
        let job = server.admin.get(&format!("/v1/jobs/{job_id}")).await.unwrap();
        assert_eq!(job.str("/state"), "queued", "every runner slot is busy: {:?}", job.body);
        assert_eq!(server.admin.get_action(id).await.unwrap().str("/state"), "approved");
        jobs.push(job_id);
    }
    server.kill9().await;
    assert_eq!(upstream.count(), slots, "the approved actions were not sent before the kill");

    upstream.hold.store(false, Ordering::SeqCst);
    let server = Proc::start(dir.path()).await;
    let bot = server.admin.with_key(bot_key);
    for ((id, _), job_id) in held.iter().zip(&jobs) {
        let ended = server.wait_action(id).await;
        assert_eq!(ended.str("/state"), "succeeded", "an approved action was dropped: {:?}", ended.body);
        assert_eq!(upstream.for_key(id).len(), 1, "sent exactly once, after the restart");
        let job = server.wait_job(job_id).await;
        assert_eq!(job.str("/state"), "succeeded", "{:?}", job.body);
        assert_eq!(job.body["attempts"], json!(1), "{:?}", job.body);
    }
    for id in &blocker_ids {
        let ended = server.wait_action(id).await;
        assert_eq!(ended.str("/state"), "failed", "{:?}", ended.body);
        assert!(ended.str("/error").contains("outcome unknown"), "{:?}", ended.body);
        assert_eq!(upstream.for_key(id).len(), 1, "not retry-safe: never sent twice");
    }

    // Part 2, a race by design: approve a batch and kill the moment the last approval is acknowledged,
    // wherever the executions are then (queued, claimed, mid-send, recorded). Whatever the moment, every
    // action ends, a not-retry-safe request is sent at most once, and a retry-safe one succeeds.
    let mut batch = Vec::new();
    for n in 0..8usize {
        let up = if n % 2 == 0 { "unsafe_up" } else { "safe_up" };
        let submitted = bot.submit_action(&http_to("payments.charge.card", up, 200 + n)).await.unwrap();
        assert_eq!(submitted.status, 202, "{:?}", submitted.body);
        batch.push((submitted.str("/id").to_owned(), submitted.str("/approval/id").to_owned(), up));
    }
    let decisions = batch.iter().map(|(_, approval, _)| {
        let admin = server.admin.clone();
        let approval = approval.clone();
        async move { admin.approve(&approval, None).await.unwrap() }
    });
    for decided in futures_util::future::join_all(decisions).await {
        assert_eq!(decided.str("/status"), "approved", "{:?}", decided.body);
    }
    server.kill9().await;
    let sent_before: Vec<usize> = batch.iter().map(|(id, _, _)| upstream.for_key(id).len()).collect();

    let server = Proc::start(dir.path()).await;
    let mut outcomes = Vec::new();
    for ((id, _, up), before) in batch.iter().zip(sent_before) {
        let ended = server.wait_action(id).await;
        let state = ended.str("/state").to_owned();
        let sent = upstream.for_key(id).len();
        outcomes.push(format!("{up}: {state}, sent {before} before the kill and {sent} in all"));
        if *up == "unsafe_up" {
            assert!(sent <= 1, "a request to an upstream that is not retry-safe was sent {sent} times");
            match state.as_str() {
                "succeeded" => assert_eq!(sent, 1),
                "failed" => assert!(ended.str("/error").contains("outcome unknown"), "{:?}", ended.body),
                other => panic!("{id} ended {other}: {:?}", ended.body),
            }
        } else {
            assert_eq!(state, "succeeded", "{:?}", ended.body);
            assert!((1..=2).contains(&sent), "a retry-safe request is re-sent at most once, not {sent} times");
        }
    }
    eprintln!("killed right after the last approval: {outcomes:#?}");
    server.verify_audit().await;
}

/// SIGKILL several times under load: allowed record-only actions, held ones approved at once, and allowed
/// actions executed against a non-retry-safe upstream, from four agents at a time. After the last restart
/// every acknowledged action is there, every execution ended, no upstream call happened twice, and the
/// chain verifies.
#[tokio::test]
async fn repeated_kill_9_under_load_loses_nothing_and_sends_nothing_twice() {
    let upstream = FakeUpstream::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), Some(&upstream.url));
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    let mut executions: BTreeSet<String> = BTreeSet::new();
    let mut n = 0usize;
    for round in 0..3 {
        let server = Proc::start(dir.path()).await;
        let key = server.agent_key(&format!("round-{round}")).await;
        let (heard_tx, mut heard) = mpsc::unbounded_channel::<(String, bool)>();
        let mut workers = Vec::new();
        for worker in 0..4usize {
            let (bot, admin, heard_tx) = (server.admin.with_key(key.clone()), server.admin.clone(), heard_tx.clone());
            let base = n + worker * 1000;
            workers.push(tokio::spawn(async move {
                for i in 0..200usize {
                    let (body, execution) = match i % 3 {
                        0 => (http_to("email.send.receipt", "unsafe_up", base + i), true),
                        1 => (action("payments.charge.card"), false),
                        _ => (action("email.send.message"), false),
                    };
                    let Ok(answer) = bot.submit_action(&body).await else { return };
                    if ![200, 202].contains(&answer.status) {
                        return;
                    }
                    let id = answer.str("/id").to_owned();
                    if heard_tx.send((id, execution)).is_err() {
                        return;
                    }
                    if i % 3 == 1 && admin.approve(answer.str("/approval/id"), None).await.is_err() {
                        return;
                    }
                }
            }));
        }
        drop(heard_tx);
        // Kill once this round has had 30 acknowledgements, with the load still running.
        let mut this_round = 0;
        while this_round < 30 {
            let (id, execution) = tokio::time::timeout(PATIENCE, heard.recv()).await.unwrap().unwrap();
            acknowledged.insert(id.clone());
            if execution {
                executions.insert(id);
            }
            this_round += 1;
        }
        server.kill9().await;
        for worker in workers {
            worker.await.unwrap();
        }
        while let Ok((id, execution)) = heard.try_recv() {
            acknowledged.insert(id.clone());
            if execution {
                executions.insert(id);
            }
        }
        n += 10_000;
    }

    let server = Proc::start(dir.path()).await;
    for id in &acknowledged {
        let found = server.admin.get_action(id).await.unwrap();
        assert_eq!(found.status, 200, "acknowledged action {id} lost");
    }
    for id in &executions {
        let done = server.wait_action(id).await;
        let state = done.str("/state");
        assert!(
            state == "succeeded" || (state == "failed" && done.str("/error").contains("outcome unknown")),
            "{id}: {:?}",
            done.body
        );
        assert!(upstream.for_key(id).len() <= 1, "{id} was sent {} times", upstream.for_key(id).len());
        if state == "succeeded" {
            assert_eq!(upstream.for_key(id).len(), 1);
        }
    }
    assert!(acknowledged.len() >= 90 && !executions.is_empty());
    let verified = server.verify_audit().await;
    assert_eq!(verified["ok"], true, "{verified:?}");
}

/// With PostgreSQL (skipped without it): a replica killed while it holds an execution's lease. Another
/// replica on the same database takes the job over once the lease runs out and, the upstream being
/// retry-safe, sends the request once more with the same `Idempotency-Key`; the action succeeds.
#[tokio::test]
async fn a_replica_killed_mid_job_has_its_job_taken_over() {
    if crate::helpers::postgres_url().is_none() {
        eprintln!("a_replica_killed_mid_job_has_its_job_taken_over: skipped (no PostgreSQL; scripts/with-postgres)");
        return;
    }
    let upstream = FakeUpstream::start(true).await;
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let database = crate::helpers::database_for(first.path()).await.unwrap();
    for dir in [first.path(), second.path()] {
        write_config(dir, Some(&upstream.url));
        let toml = std::fs::read_to_string(dir.join("countersign.toml")).unwrap();
        let toml = format!("database_url = \"{database}\"\n{toml}\n[jobs]\nlease_seconds = 2\n");
        std::fs::write(dir.join("countersign.toml"), toml).unwrap();
    }
    let a = Proc::start(first.path()).await;
    let bot = a.admin.with_key(a.agent_key("mover").await);
    let submitted = bot.submit_action(&http_to("email.send.receipt", "safe_up", 1)).await.unwrap();
    assert_eq!(submitted.status, 202, "{:?}", submitted.body);
    let id = submitted.str("/id").to_owned();
    upstream.received_at_least(1).await;

    // The second replica shares the database (and so the admin key the first one bootstrapped), and is given
    // the audit signing key as replicas are.
    std::fs::create_dir_all(second.path().join("data")).unwrap();
    for file in ["admin.key", "audit-signing.key"] {
        std::fs::copy(first.path().join("data").join(file), second.path().join("data").join(file)).unwrap();
    }
    let b = Proc::start(second.path()).await;
    upstream.hold.store(false, Ordering::SeqCst);
    a.kill9().await;

    let done = b.wait_action(&id).await;
    assert_eq!(done.str("/state"), "succeeded", "{:?}", done.body);
    let sent = upstream.for_key(&id);
    assert_eq!(sent.len(), 2, "sent by the dead replica, then once more by the one that took over");
    let job = b.wait_job(submitted.str("/job_id")).await;
    assert_eq!(job.body["attempts"], 2, "{:?}", job.body);
    assert_eq!(b.verify_audit().await["ok"], true);
}
