//! Test harness: spawns the real server on port 0 in a temporary data directory, a recording loopback
//! upstream, and clients for the principals a test needs. No fixed ports, no sleeping until ready.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use countersign::client::Client;
use countersign::config::{Config, UpstreamConfig};
use countersign::server::Server;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TEST_POLICY: &str = r#"
version: 1
defaults:
  effect: allow
  approval: { group: admins, timeout: 15m, quorum: 1 }
groups:
  finance: [alice, bob, carol]
rules:
  - name: no-deletes
    effect: deny
    conditions: { capability: "*.delete.*" }
    message: "Deletes are never allowed"
  - name: payments-need-two
    effect: require_approval
    conditions: { capability: "finance.*" }
    approval: { group: finance, quorum: 2 }
  - name: quick-expiry
    effect: require_approval
    conditions: { capability: "ops.restart.*" }
    approval: { timeout: 1s }
  - name: hold-charges
    effect: require_approval
    conditions: { capability: "payments.charge.*" }
  - name: llm-no-launch-codes
    effect: deny
    conditions: { capability: "llm.*", content_patterns: ["launch codes?"] }
    message: "Never ask a model for launch codes"
  - name: llm-no-hot-sampling
    effect: deny
    conditions: { capability: "llm.*", params: { temperature: { gt: 1.5 } } }
    message: "Sampling that hot is not allowed"
  - name: llm-quick-review
    effect: require_approval
    conditions: { capability: "llm.*", models: ["review-fast-*"] }
    approval: { timeout: 2s }
  - name: llm-premium-models
    effect: require_approval
    conditions: { capability: "llm.*", models: ["gpt-premium", "claude-opus-*"] }
    message: "Premium models need a human"
  - name: llm-big-budget
    effect: require_approval
    conditions: { capability: "llm.*", max_tokens_threshold: 4000 }
    message: "More than 4000 tokens needs a human"
  - name: llm-money-talk
    effect: require_approval
    conditions: { capability: "llm.*", content_patterns: ["wire .*money"] }
    message: "Talk of wiring money needs a human"
"#;

/// One request the fake upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A loopback HTTP server that records every request and answers 201 with a JSON body.
pub struct Upstream {
    pub url: String,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let seen = requests.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(Recorded { path: uri.to_string(), headers, body });
                (axum::http::StatusCode::CREATED, axum::Json(json!({"card_id": "card_123"})))
            }
        });
        let url = serve(app).await;
        Upstream { url, requests }
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

pub struct TestServer {
    pub admin: Client,
    gateway: countersign::gateway::Gateway,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub fn config(data_dir: &std::path::Path, upstream: Option<&str>) -> Config {
    let mut config = Config::new(data_dir.to_path_buf());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let policy = data_dir.join("policy.yaml");
    if !policy.exists() {
        std::fs::create_dir_all(data_dir).unwrap();
        std::fs::write(&policy, TEST_POLICY).unwrap();
    }
    config.policy = Some(policy);
    config.watch_policy = false;
    // The loopback upstream and webhook receivers are private addresses: the guard lets only this one in.
    config.network.allow_private = vec!["127.0.0.1/32".into()];
    config.jobs.webhook_retry_base = std::time::Duration::from_millis(200);
    // Far longer than any test: a revocation that failed to empty the credential cache would show.
    config.auth_cache = std::time::Duration::from_secs(60);
    if let Some(url) = upstream {
        config.upstreams.insert(
            "payments".into(),
            UpstreamConfig {
                base_url: url.to_owned(),
                headers: [
                    ("Authorization".to_owned(), countersign::config::Secret::new("Bearer upstream-secret".into())),
                    ("X-Tenant".to_owned(), countersign::config::Secret::new("acme".into())),
                ]
                .into_iter()
                .collect(),
                retry_safe: false,
                timeout_seconds: 10,
                orgs: Default::default(),
                capabilities: Default::default(),
            },
        );
    }
    config
}

/// A configuration with the LLM proxy's providers pointed at a fake provider: `openai` (2 s timeout) and
/// `anthropic` at `provider_url`, and `down`, an OpenAI-dialect provider on a port nobody listens on.
/// `openai` is written the way the SDKs and the design spell it, with `/v1` (`https://api.openai.com/v1`),
/// `anthropic` without, so every proxy test covers both spellings of a base URL.
pub fn llm_config(data_dir: &std::path::Path, provider_url: &str) -> Config {
    use countersign::config::{LlmConfig, Secret};
    let mut config = config(data_dir, None);
    let key = Secret::new(crate::fake_llm::PROVIDER_KEY.into());
    let mut openai = LlmConfig::new("openai", format!("{provider_url}/v1/"), key.clone());
    openai.timeout_seconds = 2;
    openai.stream_usage = true;
    config.llm.insert("openai".into(), openai);
    config.llm.insert("anthropic".into(), LlmConfig::new("anthropic", provider_url.to_owned(), key.clone()));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    config.llm.insert("down".into(), LlmConfig::new("down", down, key));
    config
}

/// Set by `scripts/with-postgres`: the whole suite then runs against PostgreSQL.
pub fn postgres_url() -> Option<String> {
    std::env::var("COUNTERSIGN_TEST_DATABASE_URL").ok().filter(|url| !url.is_empty())
}

/// With PostgreSQL, the database of a data dir (created on first use, so a restart finds its data again).
pub async fn database_for(data_dir: &std::path::Path) -> Option<String> {
    use sha2::Digest;
    use sqlx::Connection;
    let base = postgres_url()?;
    let digest = sha2::Sha256::digest(data_dir.to_string_lossy().as_bytes());
    let name = format!("cs_{}", &hex::encode(digest)[..20]);
    let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
    let exists = sqlx::query("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut admin)
        .await
        .unwrap()
        .is_some();
    if !exists {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
    }
    let (prefix, _) = base.rsplit_once('/').unwrap();
    Some(format!("{prefix}/{name}"))
}

/// Runs one statement straight against a test server's database, as someone with database access would
/// (`?` placeholders, each bound to the text in `binds` at its position; `CAST(? AS BIGINT)` for a number).
/// Answers the rows affected or the database's error.
pub async fn raw_sql(data_dir: &std::path::Path, sql: &str, binds: &[&str]) -> Result<u64, String> {
    match database_for(data_dir).await {
        Some(url) => {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let mut numbered = String::new();
            for (n, part) in sql.split('?').enumerate() {
                if n > 0 {
                    numbered.push_str(&format!("${n}"));
                }
                numbered.push_str(part);
            }
            let mut query = sqlx::query(sqlx::AssertSqlSafe(numbered));
            for value in binds {
                query = query.bind(value.to_string());
            }
            let done = query.execute(&pool).await.map(|r| r.rows_affected()).map_err(|e| e.to_string());
            pool.close().await;
            done
        }
        None => {
            let url = format!("sqlite://{}", data_dir.join("countersign.db").display());
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()));
            for value in binds {
                query = query.bind(value.to_string());
            }
            let done = query.execute(&pool).await.map(|r| r.rows_affected()).map_err(|e| e.to_string());
            pool.close().await;
            done
        }
    }
}

/// The system clock moved forward by however much a test says (for retention windows).
#[derive(Debug, Default)]
pub struct ShiftedClock {
    shift_seconds: std::sync::atomic::AtomicI64,
}

impl ShiftedClock {
    pub fn advance(&self, by: chrono::Duration) {
        self.shift_seconds.fetch_add(by.num_seconds(), std::sync::atomic::Ordering::SeqCst);
    }
}

impl countersign_core::clock::Clock for ShiftedClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + chrono::Duration::seconds(self.shift_seconds.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl TestServer {
    pub async fn start(data_dir: &std::path::Path, upstream: Option<&str>) -> TestServer {
        Self::start_with(config(data_dir, upstream), None).await
    }

    /// Starts a server from a configuration a test adjusted, optionally with its own clock.
    pub async fn start_with(mut config: Config, clock: Option<Arc<dyn countersign_core::clock::Clock>>) -> TestServer {
        if config.database_url.is_none()
            && let Some(url) = database_for(&config.data_dir).await
        {
            config.database_url = Some(countersign::config::Secret::new(url));
        }
        let data_dir = config.data_dir.clone();
        let data_dir = data_dir.as_path();
        let provided_key = config.bootstrap_admin_key.as_ref().map(|k| k.expose().to_owned());
        let server = match clock {
            Some(clock) => Server::build_with_clock(config, clock).await.unwrap(),
            None => Server::build(config).await.unwrap(),
        };
        let url = format!("http://{}", server.local_addr());
        let key = match server.bootstrapped().and_then(|b| b.generated_key.clone()).or(provided_key) {
            Some(k) => k,
            None => std::fs::read_to_string(data_dir.join("admin.key")).unwrap().trim().to_owned(),
        };
        let gateway = server.gateway().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run_until(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        TestServer { admin: Client::new(url, Some(key)).unwrap(), gateway, stop: Some(stop), task: Some(task) }
    }

    /// The server's gateway, for tests that build a situation no HTTP request can (a process that dies
    /// mid-call).
    pub fn gateway(&self) -> &countersign::gateway::Gateway {
        &self.gateway
    }

    /// Reloads the policy file as SIGHUP does; answers the new version.
    pub async fn reload(&self) -> Result<String, String> {
        self.gateway.reload_policy_file().await.map(|v| v.unwrap_or_default())
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    /// Creates an agent and answers a client holding its key.
    pub async fn agent(&self, name: &str) -> Client {
        let created = self.admin.create_agent(name).await.unwrap();
        assert_eq!(created.status, 201, "{:?}", created.body);
        let key = self.admin.create_key("agent", name).await.unwrap();
        assert_eq!(key.status, 201, "{:?}", key.body);
        self.admin.with_key(key.str("/key"))
    }

    /// Creates a user with a role and answers a client holding its key.
    pub async fn user(&self, name: &str, role: &str) -> Client {
        let created = self.admin.create_user(name, role).await.unwrap();
        assert_eq!(created.status, 201, "{:?}", created.body);
        let key = self.admin.create_key("user", name).await.unwrap();
        assert_eq!(key.status, 201, "{:?}", key.body);
        self.admin.with_key(key.str("/key"))
    }
}

pub fn action(capability: &str) -> Value {
    json!({"capability": capability, "params": {"amount_cents": 1200}, "reasoning": {"goal": "test"}})
}

pub fn http_action(capability: &str) -> Value {
    json!({
        "capability": capability,
        "params": {"amount_cents": 1200},
        "reasoning": {"goal": "charge the customer", "alternatives": ["none"]},
        "target": {"connector": "http", "upstream": "payments", "method": "POST", "path": "/v1/charges",
                   "body": {"amount": 1200, "currency": "eur"}}
    })
}

/// Opens the audit stream (Server-Sent Events) of `admin`'s server after `after_seq`, with an optional
/// `?filter`.
pub async fn audit_stream(
    admin: &Client,
    filter: &str,
    after_seq: i64,
) -> impl futures_util::Stream<Item = reqwest::Result<Bytes>> + use<> {
    let response = reqwest::Client::new()
        .get(format!("{}/v1/audit/stream{filter}", admin.base()))
        .bearer_auth(admin.key().unwrap())
        .header("last-event-id", after_seq.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes_stream()
}

/// Reads a stream into `text` until it contains `needle` (failing after 10 s without a chunk).
pub async fn read_until(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin),
    text: &mut String,
    needle: &str,
) {
    read_until_within(body, text, needle, std::time::Duration::from_secs(10)).await;
}

/// [`read_until`], failing after `patience` without a chunk.
pub async fn read_until_within(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin),
    text: &mut String,
    needle: &str,
    patience: std::time::Duration,
) {
    use futures_util::StreamExt;
    while !text.contains(needle) {
        let chunk = tokio::time::timeout(patience, body.next())
            .await
            .unwrap_or_else(|_| panic!("no `{needle}` within {patience:?}; read so far: {text}"))
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

pub fn repository_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `.venv` Python, or a failure that says how to make it (the tests never skip silently without it).
pub fn venv_python() -> std::path::PathBuf {
    let python = repository_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/python-env` first (it creates .venv with the openai, anthropic and mcp packages)",
        python.display()
    );
    python
}

/// Runs `tests/python/{script}` with the `.venv` Python against `agent`'s server (the agent's and the admin's
/// keys in `COUNTERSIGN_AGENT_KEY`/`COUNTERSIGN_ADMIN_KEY`, no provider keys or base URLs of the environment),
/// and asserts it succeeded and printed `ok CASE` for every case.
pub async fn run_python_client(script: &str, agent: &Client, admin: &Client, env: &[(&str, &str)], cases: &[&str]) {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script);
    let mut command = tokio::process::Command::new(venv_python());
    command
        .arg(&script)
        .env("COUNTERSIGN_URL", agent.base())
        .env("COUNTERSIGN_AGENT_KEY", agent.key().unwrap())
        .env("COUNTERSIGN_ADMIN_KEY", admin.key().unwrap())
        .envs(env.iter().copied())
        .kill_on_drop(true);
    for name in ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"] {
        command.env_remove(name);
    }
    let output = command.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}", script.display());
    for case in cases {
        assert!(stdout.contains(&format!("ok {case}")), "case {case} did not run:\n{stdout}\n{stderr}");
    }
}

/// Serves `app` on a free loopback port for the rest of the test; answers its base URL (`http://127.0.0.1:PORT`).
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// The first approval to become pending, as `admin` lists them: asked again each time the server announces
/// an action change (no polling tick), for up to 30 s.
pub async fn first_pending(gateway: &countersign::gateway::Gateway, admin: &Client) -> String {
    let mut changes = gateway.notifier().subscribe_actions();
    loop {
        let page = admin.list_approvals(Some("pending"), None, None).await.unwrap();
        if let Some(id) = page.body["items"][0]["id"].as_str() {
            return id.to_owned();
        }
        let changed = tokio::time::timeout(std::time::Duration::from_secs(30), changes.recv()).await;
        match changed.expect("no approval became pending") {
            Err(tokio::sync::broadcast::error::RecvError::Closed) => panic!("the server stopped"),
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
        }
    }
}

/// The value of one series in the Prometheus text format, if it is there.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Reads `/metrics` until `series` reads `value` (bounded, 30 s): a gauge such as the open waits has no event
/// to await.
pub async fn metric_until(client: &Client, series: &str, value: f64) {
    metric_until_it(client, series, |v| v == value).await;
}

/// [`metric_until`], until the series passes `check`.
pub async fn metric_until_it(client: &Client, series: &str, check: impl Fn(f64) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let metrics = client.get("/metrics").await.unwrap();
        let text = metrics.body.as_str().unwrap_or_default().to_owned();
        if metric(&text, series).is_some_and(&check) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{series} is still not as expected after 30 s:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
