//! What the LLM proxy adds to a model call, on this machine: a fake provider on loopback (OpenAI dialect,
//! written here; the same shape as the integration tests' `fake_llm.rs`) is called directly and through
//! the proxy by the same HTTP client, and the figures are the difference. Non-streamed: median and p99 at 1
//! and at 64 concurrent clients. Streamed: time to the first chunk, median and p99, at 1 and 64. Every
//! proxied call is an allowed action with its audit events durable before the answer returns (submit, claim
//! with its recovery job, finish: three write transactions). Rate limit off.
//!
//! `cargo bench -p countersign --bench llm_proxy` prints the figures; under `cargo test` it runs a few
//! iterations only, as a smoke test. Not a test of speed: nothing here asserts a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use countersign::client::Client;
use countersign::config::{Config, LlmConfig, Secret};
use countersign::server::Server;
use futures_util::StreamExt;
use serde_json::{Value, json};

const POLICY: &str = "version: 1\ndefaults:\n  effect: allow\n";
const PROVIDER_KEY: &str = "sk-bench-provider";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(index.min(sorted.len().saturating_sub(1))).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The fake provider: `/v1/chat/completions`, a JSON answer at once, or (with `stream: true`) five
/// server-sent chunks, the first at once and the rest 1 ms apart.
async fn fake_provider() -> String {
    async fn chat(body: Bytes) -> Response {
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let model = body["model"].as_str().unwrap_or("gpt-fake").to_owned();
        if body["stream"].as_bool() == Some(true) {
            let chunk = |i: usize| {
                let c = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                               "choices": [{"index": 0, "delta": {"content": format!("part{i} ")}, "finish_reason": null}]});
                format!("data: {c}\n\n")
            };
            let mut events: Vec<String> = (0..5).map(chunk).collect();
            events.push("data: [DONE]\n\n".to_owned());
            let stream = futures_util::stream::unfold((events.into_iter(), true), |(mut events, first)| async move {
                let event = events.next()?;
                if !first {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Some((Ok::<_, Infallible>(Bytes::from(event)), (events, false)))
            });
            return ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(stream)).into_response();
        }
        axum::Json(json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }))
        .into_response()
    }
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(chat));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[derive(Clone)]
struct Target {
    url: String,
    key: String,
}

/// One call: the whole answer, or (streamed) up to its first chunk, which is what is timed; the rest of
/// the stream is read to its end so the action finishes.
async fn call(http: &reqwest::Client, target: &Target, stream: bool) -> Duration {
    let body = json!({"model": "gpt-fake", "stream": stream, "messages": [{"role": "user", "content": "hello"}]});
    let started = Instant::now();
    let response = http.post(&target.url).bearer_auth(&target.key).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    if stream {
        let mut chunks = response.bytes_stream();
        chunks.next().await.unwrap().unwrap();
        let first = started.elapsed();
        while let Some(chunk) = chunks.next().await {
            chunk.unwrap();
        }
        first
    } else {
        response.bytes().await.unwrap();
        started.elapsed()
    }
}

/// `clients` concurrent clients, `per_client` calls each; sorted latencies.
async fn run(
    http: &reqwest::Client,
    target: &Target,
    clients: usize,
    per_client: usize,
    stream: bool,
) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, target) = (http.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                out.push(call(&http, &target, stream).await);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    all
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (sequential, per_client_64, warmup) = if full { (2000, 60, 200) } else { (5, 1, 2) };

    let provider = fake_provider().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let mut config = Config::new(dir.path().to_path_buf());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.watch_policy = false;
    config.policy = Some(dir.path().join("policy.yaml"));
    config.rate_limit.per_second = 0;
    config.network.allow_private = vec!["127.0.0.1/32".into()];
    config.llm.insert("openai".into(), LlmConfig::new("openai", provider.clone(), Secret::new(PROVIDER_KEY.into())));
    let server = Server::build(config).await.unwrap();
    let url = format!("http://{}", server.local_addr());
    let key = server.bootstrapped().unwrap().generated_key.clone().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run_until(async move {
        let _ = stopped.await;
    }));
    let admin = Client::new(url.clone(), Some(key)).unwrap();
    admin.create_agent("bench").await.unwrap();
    let agent_key = admin.create_key("agent", "bench").await.unwrap().str("/key").to_owned();

    let direct = Target { url: format!("{provider}/v1/chat/completions"), key: PROVIDER_KEY.into() };
    let proxied = Target { url: format!("{url}/llm/openai/v1/chat/completions"), key: agent_key };
    let http = reqwest::Client::builder().pool_max_idle_per_host(128).build().unwrap();

    // Warm both paths (connections, the SQLite cache) before measuring.
    run(&http, &direct, 8, warmup / 8 + 1, false).await;
    run(&http, &proxied, 8, warmup / 8 + 1, false).await;

    println!("LLM proxy added latency (fake provider on loopback; proxied minus direct, same client)");
    for (label, stream) in [("non-streamed, whole answer", false), ("streamed, time to first chunk", true)] {
        for clients in [1usize, 64] {
            let per_client = if clients == 1 { sequential } else { per_client_64 };
            let d = run(&http, &direct, clients, per_client, stream).await;
            let p = run(&http, &proxied, clients, per_client, stream).await;
            let (dm, d99, pm, p99) =
                (percentile(&d, 0.5), percentile(&d, 0.99), percentile(&p, 0.5), percentile(&p, 0.99));
            println!(
                "  {label}, {clients:>2} client(s), {} calls: direct median {:.3} ms p99 {:.3} ms; proxied median \
                 {:.3} ms p99 {:.3} ms; added median {:.3} ms p99 {:.3} ms",
                p.len(),
                ms(dm),
                ms(d99),
                ms(pm),
                ms(p99),
                ms(pm.saturating_sub(dm)),
                ms(p99.saturating_sub(d99)),
            );
        }
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
