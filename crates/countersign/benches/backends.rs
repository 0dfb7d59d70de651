//! Store throughput by backend: audit events per second (allowed actions from 16 concurrent agents, three
//! events each) and approval decisions per second (16 concurrent approvers), on SQLite, on PostgreSQL with
//! one replica and with three; and the cross-replica wake-up (approve on one replica, the agent waits on
//! another), median and p99.
//!
//! `scripts/with-postgres cargo bench -p countersign --bench backends` measures all three; without
//! `COUNTERSIGN_TEST_DATABASE_URL` only SQLite. Under `cargo test` it runs a few iterations as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::{fresh_database, ms, percentile};

use std::time::Instant;

use countersign::client::Client;
use countersign::config::{Config, Secret};
use countersign::server::Server;
use countersign_core::secrets::{SecretKind, generate};
use serde_json::json;

struct Replica {
    admin: Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(dir: &std::path::Path, database_url: Option<&str>, key: &str) -> Replica {
    let mut config = Config::new(dir.to_path_buf());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.watch_policy = false;
    config.rate_limit.per_second = 0;
    config.database_url = database_url.map(|u| Secret::new(u.to_owned()));
    config.bootstrap_admin_key = Some(Secret::new(key.to_owned()));
    let server = Server::build(config).await.unwrap();
    let admin = Client::new(format!("http://{}", server.local_addr()), Some(key.to_owned())).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run_until(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Replica { admin, stop, task }
}

async fn measure(label: &str, database_url: Option<String>, replicas: usize, full: bool) {
    let (actions, decisions, wakes) = if full { (2000, 600, 200) } else { (32, 16, 4) };
    let key = generate(SecretKind::ApiKey).plaintext;
    let dirs: Vec<tempfile::TempDir> = (0..replicas).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for dir in &dirs {
        // Replicas share the audit signing key as a file (the database holds only its public half).
        if !nodes.is_empty() {
            std::fs::copy(dirs[0].path().join("audit-signing.key"), dir.path().join("audit-signing.key")).unwrap();
        }
        nodes.push(start(dir.path(), database_url.as_deref(), &key).await);
    }
    let admins: Vec<Client> = nodes.iter().map(|n| n.admin.clone()).collect();
    admins[0].create_agent("bench").await.unwrap();
    let agent_key = admins[0].create_key("agent", "bench").await.unwrap().str("/key").to_owned();
    let agents: Vec<Client> = admins.iter().map(|a| a.with_key(agent_key.clone())).collect();
    let allowed = json!({"capability": "email.send.message", "params": {"to": "a@example.com"}, "reasoning": "bench"});
    let held = json!({"capability": "finance.issue.card", "params": {"amount_cents": 100}, "reasoning": "bench"});

    let head = |v: &serde_json::Value| v["events"].as_u64().unwrap_or(0);
    let before = head(&admins[0].get("/v1/audit/verify").await.unwrap().body);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..16 {
        let agent = agents[w % replicas].clone();
        let allowed = allowed.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..actions / 16 {
                assert_eq!(agent.submit_action(&allowed).await.unwrap().status, 200);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = head(&admins[0].get("/v1/audit/verify").await.unwrap().body);
    let events_per_second = (after - before) as f64 / elapsed;

    let mut approvals = Vec::new();
    for i in 0..decisions {
        let submitted = agents[i % replicas].submit_action(&held).await.unwrap();
        approvals.push(submitted.str("/approval/id").to_owned());
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for (w, chunk) in approvals.chunks(decisions.div_ceil(16)).enumerate() {
        let admin = admins[w % replicas].clone();
        let chunk = chunk.to_vec();
        workers.push(tokio::spawn(async move {
            for id in chunk {
                assert_eq!(admin.approve(&id, None).await.unwrap().status, 200);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let decisions_per_second = decisions as f64 / started.elapsed().as_secs_f64();
    println!("{label}: {events_per_second:.0} audit events/s; {decisions_per_second:.0} approval decisions/s");

    if replicas > 1 {
        let mut latencies = Vec::new();
        for _ in 0..wakes {
            let submitted = agents[0].submit_action(&held).await.unwrap();
            let id = submitted.str("/id").to_owned();
            let waiter = {
                let agent = agents[1].clone();
                tokio::spawn(async move {
                    let answer = agent.wait_action(&id, 30.0).await.unwrap();
                    (Instant::now(), answer)
                })
            };
            let _ = agents[1].get_action(submitted.str("/id")).await.unwrap();
            let sent = Instant::now();
            let approver = &admins[replicas - 1];
            assert_eq!(approver.approve(submitted.str("/approval/id"), None).await.unwrap().status, 200);
            let (woke, answer) = waiter.await.unwrap();
            assert_eq!(answer.str("/state"), "approved");
            latencies.push(woke.saturating_duration_since(sent));
        }
        latencies.sort();
        println!(
            "{label}: approve on one replica -> agent waiting on another answered: median {:.2} ms, p99 {:.2} ms",
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99))
        );
    }
    for node in nodes {
        let _ = node.stop.send(());
        node.task.await.unwrap();
    }
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    measure("sqlite", None, 1, full).await;
    if let Some(base) = std::env::var("COUNTERSIGN_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        measure("postgres, 1 replica", Some(fresh_database(&base).await), 1, full).await;
        measure("postgres, 3 replicas", Some(fresh_database(&base).await), 3, full).await;
    }
}
