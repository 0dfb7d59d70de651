//! Jobs and recovery figures: webhook deliveries per second to a loopback receiver (jobs written straight
//! into the store, then drained by the runner), jobs claimed per second (the store's `claim_job`, one and
//! eight claimers), and the time from SIGKILL to serving again with 100,000 pending approvals whose expiry
//! timers must be re-armed.
//!
//! `cargo bench -p countersign --bench jobs`; under `cargo test` it runs small counts as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::Running;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use countersign::config::Config;
use countersign::server::Server;
use countersign_core::domain::{Job, JobKind};
use countersign_core::ids::{ActionId, ApprovalId, OrgId};
use countersign_core::store::Store;
use countersign_store::SqliteStore;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

const POLICY: &str = "version: 1\ndefaults:\n  effect: allow\n  approval: { group: admins, timeout: 2h, quorum: 1 }\n\
rules:\n  - name: hold-cards\n    effect: require_approval\n    conditions: { capability: \"finance.*\" }\n";

fn config(dir: &std::path::Path) -> Config {
    std::fs::write(dir.join("policy.yaml"), POLICY).unwrap();
    let mut config = Config::new(dir.to_path_buf());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.watch_policy = false;
    config.policy = Some(dir.join("policy.yaml"));
    config.rate_limit.per_second = 0;
    config.network.allow_private = vec!["127.0.0.1/32".into()];
    config
}

async fn webhook_deliveries(full: bool) {
    let deliveries = if full { 5000 } else { 20 };
    let received = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (count, finished) = (received.clone(), done.clone());
    let app = axum::Router::new().fallback(move || {
        let (count, finished) = (count.clone(), finished.clone());
        async move {
            if count.fetch_add(1, Ordering::SeqCst) + 1 == deliveries {
                finished.notify_one();
            }
            axum::http::StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let server = Server::build(config(dir.path())).await.unwrap();
    let org = server.bootstrapped().unwrap().org.id.clone();
    // The server's own store: a second one on the same file is refused (one process per database).
    let store = server.gateway().store().clone();
    let running = Running::start(server);
    let admin = running.admin.clone();
    let hook = admin.post("/v1/webhooks", &json!({"url": receiver, "events": ["approval.requested"]})).await.unwrap();
    let hook_id = hook.str("/id").to_owned();

    // The jobs go in behind the server's back; the runner finds them at its next look (within 5 s), so the
    // clock starts at the first delivery.
    let mut tx = store.write().await.unwrap();
    let now = chrono::Utc::now();
    for i in 0..deliveries {
        let event = json!({"id": format!("evt_bench_{i}"), "type": "approval.requested", "org_id": org, "data": {}});
        let mut job = Job::new(
            org.clone(),
            JobKind::WebhookDeliver,
            Some(hook_id.clone()),
            json!({"webhook_id": hook_id, "event": event}),
            now,
        );
        job.max_attempts = 8;
        tx.insert_job(&job).await.unwrap();
    }
    tx.commit().await.unwrap();
    let first = loop {
        if received.load(Ordering::SeqCst) > 0 {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    tokio::time::timeout(Duration::from_secs(300), done.notified()).await.unwrap();
    let rate = (deliveries - 1) as f64 / first.elapsed().as_secs_f64();
    println!("webhook deliveries to a loopback receiver: {rate:.0}/s ({deliveries} signed deliveries)");
    running.stop().await;
}

async fn jobs_claimed(full: bool) {
    let jobs = if full { 20_000 } else { 50 };
    for claimers in [1usize, 8] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("jobs.db")).await.unwrap());
        let org =
            countersign_core::domain::Org { id: OrgId::new(), name: "bench".into(), created_at: chrono::Utc::now() };
        let mut tx = store.write().await.unwrap();
        tx.insert_org(&org).await.unwrap();
        let now = chrono::Utc::now();
        for i in 0..jobs {
            let job = Job::new(org.id.clone(), JobKind::WebhookDeliver, Some(format!("whk_{i}")), json!({}), now);
            tx.insert_job(&job).await.unwrap();
        }
        tx.commit().await.unwrap();
        let started = Instant::now();
        let claimed = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for c in 0..claimers {
            let (store, claimed) = (store.clone(), claimed.clone());
            workers.push(tokio::spawn(async move {
                let owner = format!("bench-{c}");
                loop {
                    let now = chrono::Utc::now();
                    let mut tx = store.write().await.unwrap();
                    let job = tx.claim_job(now, &owner, now + chrono::Duration::seconds(30)).await.unwrap();
                    tx.commit().await.unwrap();
                    if job.is_none() {
                        return;
                    }
                    claimed.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
        assert_eq!(claimed.load(Ordering::SeqCst), jobs);
        let rate = jobs as f64 / started.elapsed().as_secs_f64();
        println!("jobs claimed (SQLite, {claimers} claimer(s)): {rate:.0}/s");
    }
}

/// Starts the binary on `dir` and answers the child and its URL once it is serving.
async fn spawn(dir: &std::path::Path) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_countersign"))
        .args(["serve", "--listen", "127.0.0.1:0", "--policy"])
        .arg(dir.join("policy.yaml"))
        .arg("--data-dir")
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(url) = line.strip_prefix("Countersign is listening on ") {
            let url = url.trim().to_owned();
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return (child, url);
        }
    }
    panic!("the server never said where it listens");
}

async fn restart_with_pending(full: bool) {
    let pending = if full { 100_000 } else { 100 };
    let dir = tempfile::tempdir().unwrap();
    let base = config(dir.path());
    // One real held action gives the shape; the rest are copies with their own ids.
    {
        let running = Running::start(Server::build(base).await.unwrap());
        let admin = running.admin.clone();
        admin.create_agent("bench").await.unwrap();
        let agent = admin.with_key(admin.create_key("agent", "bench").await.unwrap().str("/key"));
        let held = agent
            .submit_action(&json!({"capability": "finance.issue.card", "params": {"n": 1}, "reasoning": "bench"}))
            .await
            .unwrap();
        assert_eq!(held.status, 202);
        running.stop().await;
    }
    let store = SqliteStore::open(&dir.path().join("countersign.db")).await.unwrap();
    let mut tx = store.read().await.unwrap();
    let orgs = tx.list_orgs().await.unwrap();
    let org = &orgs[0].id;
    let actions = tx
        .list_actions(org, &Default::default(), &countersign_core::store::Page { limit: 1, after: None })
        .await
        .unwrap()
        .items;
    let template = actions[0].clone();
    let approval = tx.get_approval(org, template.approval_id.as_ref().unwrap()).await.unwrap().unwrap();
    drop(tx);
    let started = Instant::now();
    let mut tx = store.write().await.unwrap();
    for i in 1..pending {
        let mut action = template.clone();
        action.id = ActionId::new();
        let mut copy = approval.clone();
        copy.id = ApprovalId::new();
        copy.action_id = action.id.clone();
        copy.token_hash = format!("{:064x}", i);
        action.approval_id = Some(copy.id.clone());
        tx.insert_action(&action).await.unwrap();
        tx.insert_approval(&copy).await.unwrap();
    }
    tx.commit().await.unwrap();
    drop(store);
    eprintln!("{pending} pending approvals written in {:.1} s", started.elapsed().as_secs_f64());

    let (mut child, _) = spawn(dir.path()).await;
    child.kill().await.unwrap();
    let killed = Instant::now();
    let (mut child, url) = spawn(dir.path()).await;
    let http = reqwest::Client::new();
    while !http.get(format!("{url}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "SIGKILL -> serving again with {pending} pending approvals (timers re-armed): {:.0} ms",
        killed.elapsed().as_secs_f64() * 1000.0
    );
    child.kill().await.unwrap();
}

#[tokio::main]
async fn main() {
    countersign::server::install_crypto_provider();
    let full = std::env::args().any(|a| a == "--bench");
    webhook_deliveries(full).await;
    jobs_claimed(full).await;
    restart_with_pending(full).await;
}
