//! What the LLM proxy adds to a model call, on this machine: a fake provider on loopback (OpenAI dialect,
//! written here; the same shape as the integration tests' `fake_llm.rs`) is called directly and through
//! the proxy by the same HTTP client, and the figures are the difference. Non-streamed: median and p99 at 1
//! and at 64 concurrent clients. Streamed: time to the first chunk, median and p99, at 1 and 64. Every
//! proxied call is an allowed action with its audit events durable before the answer returns (submit and
//! claim with its recovery job in one write transaction, then the finish in a second). Rate limit off.
//!
//! With `COUNTERSIGN_BENCH_LITELLM` naming a `litellm` executable (`scripts/bench-llm` installs one into
//! `.venv-litellm`), LiteLLM's proxy is started too, in front of the same fake provider (its defaults: one
//! uvicorn worker, no database, telemetry and the remote cost map off), measured by the same loop in the
//! same run, and each case also prints the ratio of the two added latencies (LiteLLM's over Countersign's).
//! Without the variable LiteLLM is never touched. With `COUNTERSIGN_TEST_DATABASE_URL` (`scripts/with-postgres`;
//! `scripts/bench-llm` sets `WITH_POSTGRES_DURABLE=1` so PostgreSQL syncs its commits as SQLite does) a second
//! Countersign on a fresh PostgreSQL database is measured as `countersign-pg`.
//!
//! Before the cases it prints the disk's own price for a durable commit in the same directory
//! ([`common::disk_sync_floor`]): a proxied call waits for one sync of both its commits' frames (the submit's
//! commit does not wait for its own; the finish's sync covers it), so that figure is what no gateway could add
//! less than on this machine with its audit durable. After each non-streamed series at 1 client, a Countersign also
//! shows where its calls spent their time, from its own `/metrics`: the claim's commit, the durable commit (the
//! finish's, with the sync) and the wait for the provider's response headers, as means.
//!
//! `cargo bench -p countersign --bench llm_proxy` prints the figures; under `cargo test` it runs a few
//! iterations only, as a smoke test. Not a test of speed: nothing here asserts a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::{Running, disk_sync_floor, fresh_database, gather, ms, percentile, serve_loopback};

use std::convert::Infallible;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use countersign::config::{Config, LlmConfig, Secret};
use countersign::server::Server;
use futures_util::StreamExt;
use serde_json::{Value, json};

const POLICY: &str = "version: 1\ndefaults:\n  effect: allow\n";
const PROVIDER_KEY: &str = "sk-bench-provider";
/// About how many WAL frames (pages) each of a proxied call's two commits writes: 34 a call, measured as
/// the WAL's growth over 12 sequential calls on a new database (2,048-byte pages; 28 a call with 4,096-byte
/// pages, counted with `strace`). The first writes the action and its recovery job with their index entries,
/// the audit rows and the chain head; the second updates them.
const FRAMES_PER_COMMIT: usize = 17;
const LITELLM_ENV: &str = "COUNTERSIGN_BENCH_LITELLM";
const LITELLM_KEY: &str = "sk-bench-litellm";
/// How long LiteLLM may take to answer its health endpoint (it imports a lot of Python: ~15 s here).
const LITELLM_STARTUP: Duration = Duration::from_secs(180);

/// Median and p99 of one series of calls.
#[derive(Clone, Copy)]
struct Stats {
    median: Duration,
    p99: Duration,
}

impl Stats {
    fn of(sorted: &[Duration]) -> Self {
        Self { median: percentile(sorted, 0.5), p99: percentile(sorted, 0.99) }
    }

    /// What a proxy added over the direct calls.
    fn minus(self, direct: Stats) -> Self {
        Self { median: self.median.saturating_sub(direct.median), p99: self.p99.saturating_sub(direct.p99) }
    }
}

/// `a / b` as "12.3x", or "n/a" when `b` is too small to divide by meaningfully.
fn ratio(a: Duration, b: Duration) -> String {
    if b < Duration::from_micros(1) { "n/a".into() } else { format!("{:.1}x", a.as_secs_f64() / b.as_secs_f64()) }
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
    format!("http://{}", serve_loopback(app).await)
}

#[derive(Clone)]
struct Target {
    url: String,
    key: String,
    /// A Countersign's `/metrics`, from which the bench reads where a call's time went.
    metrics: Option<String>,
}

/// Totals of the series a proxied call's time is broken down by, read from a Countersign's `/metrics`.
#[derive(Clone, Copy, Default)]
struct Spent {
    /// Sum and count of the claim's commit (its sync deferred), the durable commits (the finish's), and the
    /// provider's wait for response headers.
    claim: (f64, f64),
    durable: (f64, f64),
    provider: (f64, f64),
}

impl Spent {
    async fn read(http: &reqwest::Client, url: &str) -> Spent {
        let text = http.get(url).send().await.unwrap().text().await.unwrap();
        let series = |name: &str, labels: &str| {
            let value = |suffix: &str| {
                let prefix = format!("{name}_{suffix}{{{labels}}} ");
                text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
            };
            (value("sum"), value("count"))
        };
        Spent {
            claim: series("countersign_store_commit_seconds", r#"sync="deferred""#),
            durable: series("countersign_store_commit_seconds", r#"sync="durable""#),
            provider: series("countersign_llm_upstream_seconds", r#"provider="openai",outcome="answered""#),
        }
    }

    /// What went by between `self` (earlier) and `later`, as "name mean ms (count a call)" for each series,
    /// over `calls` calls.
    fn since(self, later: Spent, calls: usize) -> String {
        let part = |name: &str, (sum, count): (f64, f64), (sum2, count2): (f64, f64)| {
            let n = count2 - count;
            let mean = if n > 0.0 { (sum2 - sum) / n * 1e3 } else { 0.0 };
            format!("{name} {mean:.3} ms ({:.1} a call)", n / calls as f64)
        };
        [
            part("claim's commit", self.claim, later.claim),
            part("durable commit", self.durable, later.durable),
            part("provider's headers", self.provider, later.provider),
        ]
        .join(", ")
    }
}

/// LiteLLM's proxy as a child process in front of the fake provider; killed when dropped.
struct LiteLlm {
    target: Target,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl LiteLlm {
    /// Writes its config (the fake provider as `gpt-fake`, a master key, no database), starts `bin` on a free
    /// loopback port and waits, up to `LITELLM_STARTUP`, for `/health/liveliness` to answer.
    async fn start(bin: &Path, provider: &str, http: &reqwest::Client) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        // YAML, written as JSON (which YAML reads).
        let config = dir.path().join("litellm.yaml");
        let model = json!({"model": "openai/gpt-fake", "api_base": format!("{provider}/v1"), "api_key": PROVIDER_KEY});
        let yaml = json!({
            "model_list": [{"model_name": "gpt-fake", "litellm_params": model}],
            "general_settings": {"master_key": LITELLM_KEY},
            "litellm_settings": {"telemetry": false},
        });
        std::fs::write(&config, yaml.to_string())?;
        // A free port: bound, read and released for LiteLLM to bind.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = dir.path().join("litellm.log");
        let log_file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(bin)
            .arg("--config")
            .arg(&config)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .env("LITELLM_TELEMETRY", "False")
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()?;
        let url = format!("http://127.0.0.1:{port}");
        let mut litellm = Self {
            target: Target { url: format!("{url}/v1/chat/completions"), key: LITELLM_KEY.into(), metrics: None },
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + LITELLM_STARTUP;
        loop {
            let health = http.get(format!("{url}/health/liveliness")).timeout(Duration::from_secs(5)).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(litellm);
            }
            if let Some(status) = litellm.child.try_wait()? {
                anyhow::bail!("{} exited with {status}; its log ends:\n{}", bin.display(), tail(&log));
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} did not answer within {LITELLM_STARTUP:?}; its log ends:\n{}",
                    bin.display(),
                    tail(&log)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// One call: the whole answer, or (streamed) up to its first chunk, which is what is timed; the rest of
/// the stream is read to its end so the action finishes.
async fn call(http: &reqwest::Client, target: &Target, stream: bool) -> Duration {
    let body = json!({"model": "gpt-fake", "stream": stream, "messages": [{"role": "user", "content": "hello"}]});
    let started = Instant::now();
    let response = http.post(&target.url).bearer_auth(&target.key).json(&body).send().await.unwrap();
    if response.status() != 200 {
        let status = response.status();
        panic!("{}: {status}: {}", target.url, response.text().await.unwrap_or_default());
    }
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
    gather(tasks).await
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (sequential, per_client_64, warmup) = if full { (2000, 60, 200) } else { (5, 1, 2) };

    let provider = fake_provider().await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Gateway::start(&dir.path().join("sqlite"), &provider, None).await;
    let postgres = match std::env::var("COUNTERSIGN_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        Some(base) => {
            Some(Gateway::start(&dir.path().join("postgres"), &provider, Some(fresh_database(&base).await)).await)
        }
        None => None,
    };

    let direct = Target { url: format!("{provider}/v1/chat/completions"), key: PROVIDER_KEY.into(), metrics: None };
    let http = reqwest::Client::builder().pool_max_idle_per_host(128).build().unwrap();

    let litellm = match std::env::var_os(LITELLM_ENV) {
        None => None,
        Some(bin) => match LiteLlm::start(Path::new(&bin), &provider, &http).await {
            Ok(litellm) => Some(litellm),
            Err(e) => {
                eprintln!("{LITELLM_ENV} is set but LiteLLM did not start, measuring without it: {e:#}");
                None
            }
        },
    };
    let mut targets = vec![("countersign", sqlite.target.clone())];
    if let Some(postgres) = &postgres {
        targets.push(("countersign-pg", postgres.target.clone()));
    }
    if let Some(litellm) = &litellm {
        targets.push(("litellm", litellm.target.clone()));
    }

    // Warm every path (connections, the SQLite cache, LiteLLM's first-call setup) before measuring.
    for target in std::iter::once(&direct).chain(targets.iter().map(|(_, t)| t)) {
        run(&http, target, 8, warmup / 8 + 1, false).await;
        run(&http, target, 8, 1, true).await;
    }

    // The disk's own price for a durable commit, measured beside the database: the sync of both commits'
    // frames is the floor of a proxied call's added latency here.
    let rounds = if full { 2000 } else { 5 };
    println!("Disk floor (fdatasync after writing WAL frames, in the data directory, {rounds} rounds each)");
    for pages in [1usize, FRAMES_PER_COMMIT, 2 * FRAMES_PER_COMMIT] {
        let floor = Stats::of(&disk_sync_floor(dir.path(), pages, rounds).await);
        let note = if pages == 2 * FRAMES_PER_COMMIT { "  (a proxied call's one sync)" } else { "" };
        println!("  {pages:>2} frame(s)   median {:>7.3} ms  p99 {:>7.3} ms{note}", ms(floor.median), ms(floor.p99));
    }

    println!("LLM proxy added latency (fake provider on loopback; through the proxy minus direct, same client)");
    for (label, stream) in [("non-streamed, whole answer", false), ("streamed, time to first chunk", true)] {
        for clients in [1usize, 64] {
            let per_client = if clients == 1 { sequential } else { per_client_64 };
            let direct_stats = Stats::of(&run(&http, &direct, clients, per_client, stream).await);
            println!("  {label}, {clients} client(s), {} calls each target", clients * per_client);
            println!(
                "    {:<12} median {:>7.3} ms  p99 {:>7.3} ms",
                "direct",
                ms(direct_stats.median),
                ms(direct_stats.p99)
            );
            let mut added = Vec::new();
            for (name, target) in &targets {
                // Where a whole answer's time went, from the gateway's own histograms (means), for one sequential
                // client, where nothing queues. (A stream's first chunk waits for neither commit's sync.)
                let breakdown = target.metrics.as_ref().filter(|_| clients == 1 && !stream);
                let before = match breakdown {
                    Some(url) => Some(Spent::read(&http, url).await),
                    None => None,
                };
                let stats = Stats::of(&run(&http, target, clients, per_client, stream).await);
                let plus = stats.minus(direct_stats);
                println!(
                    "    {name:<12} median {:>7.3} ms  p99 {:>7.3} ms  added median {:>7.3} ms  p99 {:>7.3} ms",
                    ms(stats.median),
                    ms(stats.p99),
                    ms(plus.median),
                    ms(plus.p99),
                );
                if let (Some(before), Some(url)) = (before, breakdown) {
                    let after = Spent::read(&http, url).await;
                    println!("      of which, means: {}", before.since(after, per_client));
                }
                added.push(plus);
            }
            if litellm.is_some()
                && let (Some(countersign), Some(litellm)) = (added.first(), added.last())
            {
                println!(
                    "    ratio, LiteLLM added / Countersign added: median {}  p99 {}",
                    ratio(litellm.median, countersign.median),
                    ratio(litellm.p99, countersign.p99),
                );
            }
        }
    }
    if let Some(litellm) = litellm {
        litellm.stop().await;
    } else if std::env::var_os(LITELLM_ENV).is_none() && full {
        println!("(LiteLLM not measured: set {LITELLM_ENV} to a litellm executable, or run scripts/bench-llm)");
    }
    sqlite.stop().await;
    if let Some(postgres) = postgres {
        postgres.stop().await;
    }
}

/// A Countersign server in front of the fake provider, with an agent key to call it with.
struct Gateway {
    target: Target,
    server: Running,
}

impl Gateway {
    /// On SQLite under `dir`, or on the PostgreSQL database at `database_url`.
    async fn start(dir: &Path, provider: &str, database_url: Option<String>) -> Gateway {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("policy.yaml"), POLICY).unwrap();
        let mut config = Config::new(dir.to_path_buf());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.watch_policy = false;
        config.policy = Some(dir.join("policy.yaml"));
        config.database_url = database_url.map(Secret::new);
        config.rate_limit.per_second = 0;
        config.network.allow_private = vec!["127.0.0.1/32".into()];
        config.llm.insert("openai".into(), LlmConfig::new("openai", provider.into(), Secret::new(PROVIDER_KEY.into())));
        let server = Running::start(Server::build(config).await.unwrap());
        server.admin.create_agent("bench").await.unwrap();
        let agent_key = server.admin.create_key("agent", "bench").await.unwrap().str("/key").to_owned();
        let url = format!("{}/llm/openai/v1/chat/completions", server.url);
        let metrics = Some(format!("{}/metrics", server.url));
        Gateway { target: Target { url, key: agent_key, metrics }, server }
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}
