//! End-to-end figures on this machine: allowed record-only actions per second with audit on (sequential and
//! 16 concurrent agents), and the time from an approve call to the waiting agent's answer (median, p99).
//!
//! `cargo bench -p countersign --bench e2e` prints the figures; under `cargo test` it runs a few iterations
//! only, as a smoke test. Not a test of speed: nothing here asserts a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::{Running, ms, percentile};

use std::time::Instant;

use countersign::config::Config;
use countersign::server::Server;
use serde_json::json;

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (actions, approvals) = if full { (3000, 300) } else { (20, 5) };
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path().to_path_buf());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.watch_policy = false;
    // One agent key drives the whole load: measure the gateway, not the rate limit.
    config.rate_limit.per_second = 0;
    let running = Running::start(Server::build(config).await.unwrap());
    let admin = running.admin.clone();
    admin.create_agent("bench").await.unwrap();
    let agent = admin.with_key(admin.create_key("agent", "bench").await.unwrap().str("/key"));
    let allowed = json!({"capability": "email.send.message", "params": {"to": "a@example.com"}, "reasoning": "bench"});

    let started = Instant::now();
    for _ in 0..actions {
        assert_eq!(agent.submit_action(&allowed).await.unwrap().status, 200);
    }
    let sequential = actions as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..16 {
        let agent = agent.clone();
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
    let concurrent = (actions / 16 * 16) as f64 / started.elapsed().as_secs_f64();

    let held = json!({"capability": "finance.issue.card", "params": {"amount_cents": 100}, "reasoning": "bench"});
    let mut latencies = Vec::with_capacity(approvals);
    for _ in 0..approvals {
        let submitted = agent.submit_action(&held).await.unwrap();
        let id = submitted.str("/id").to_owned();
        let waiter = {
            let agent = agent.clone();
            tokio::spawn(async move {
                let answer = agent.wait_action(&id, 30.0).await.unwrap();
                (Instant::now(), answer)
            })
        };
        // Let the waiter's request reach the server before deciding.
        tokio::task::yield_now().await;
        let _ = agent.get_action(submitted.str("/id")).await.unwrap();
        let sent = Instant::now();
        assert_eq!(admin.approve(submitted.str("/approval/id"), None).await.unwrap().status, 200);
        let (woke, answer) = waiter.await.unwrap();
        assert_eq!(answer.str("/state"), "approved");
        latencies.push(woke.saturating_duration_since(sent));
    }
    latencies.sort();
    println!("allowed record-only actions, sequential: {sequential:.0}/s");
    println!("allowed record-only actions, 16 concurrent agents: {concurrent:.0}/s");
    println!(
        "approve call -> waiting agent answered: median {:.2} ms, p99 {:.2} ms ({} samples)",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        latencies.len()
    );
    running.stop().await;
}
