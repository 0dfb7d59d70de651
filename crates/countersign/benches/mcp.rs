//! What the MCP gateway adds to a tool call, on this machine: a small rmcp upstream server (Streamable HTTP
//! on loopback, one `echo` tool, written here) is called directly and through Countersign's `/mcp` as
//! `bench__echo`, by the same rmcp client, and the figures are the difference. Median and p99 for one
//! client calling in a loop and for 16 clients at once. Every gateway call is an allowed action with its
//! audit events durable before the answer returns (submit and claim with its recovery job in one
//! write transaction, then the finish in a second). Rate limit off.
//!
//! `cargo bench -p countersign --bench mcp` prints the figures; under `cargo test` it runs a few
//! iterations only, as a smoke test. Not a test of speed: nothing here asserts a time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::{Running, gather, ms, percentile, serve_loopback};

use std::sync::Arc;
use std::time::{Duration, Instant};

use countersign::config::{Config, McpServerConfig};
use countersign::server::Server;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ProtocolVersion, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ClientHandler, ErrorData, RoleClient, RoleServer, ServerHandler, ServiceExt};
use serde_json::json;

const POLICY: &str = "version: 1\ndefaults:\n  effect: allow\n";

/// The upstream: one tool, `echo`, answering its `text` at once.
#[derive(Clone)]
struct EchoServer;

impl ServerHandler for EchoServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]});
        let schema = Arc::new(schema.as_object().cloned().unwrap_or_default());
        Ok(ListToolsResult::with_all_items(vec![Tool::new("echo", "Echoes the text back.", schema)]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let text = request.arguments.as_ref().and_then(|a| a.get("text")).and_then(|t| t.as_str()).unwrap_or("");
        Ok(CallToolResult::success(vec![ContentBlock::text(format!("echo: {text}"))]).into())
    }
}

async fn upstream() -> String {
    let service = StreamableHttpService::new(
        || Ok(EchoServer),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let app = axum::Router::new().nest_service("/mcp", service);
    format!("http://{}/mcp", serve_loopback(app).await)
}

#[derive(Clone)]
struct BenchClient;

impl ClientHandler for BenchClient {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::default().with_protocol_version(ProtocolVersion::V_2025_11_25)
    }
}

async fn connect(url: &str, key: Option<&str>) -> RunningService<RoleClient, BenchClient> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
    if let Some(key) = key {
        config = config.auth_header(key.to_owned());
    }
    let transport = StreamableHttpClientTransport::with_client(reqwest::Client::new(), config);
    BenchClient.serve(transport).await.unwrap()
}

/// One `tools/call`, timed to its answer.
async fn call(client: &RunningService<RoleClient, BenchClient>, tool: &str) -> Duration {
    let arguments = json!({"text": "hello"}).as_object().cloned().unwrap_or_default();
    let started = Instant::now();
    let result = client.peer().call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments)).await;
    let elapsed = started.elapsed();
    let result = result.unwrap();
    assert_eq!(result.is_error, Some(false), "{result:?}");
    elapsed
}

/// `clients` connections calling `per_client` times each, all at once; sorted latencies.
async fn run(url: &str, key: Option<&str>, tool: &str, clients: usize, per_client: usize) -> Vec<Duration> {
    let mut connections = Vec::new();
    for _ in 0..clients {
        connections.push(connect(url, key).await);
    }
    let mut tasks = Vec::new();
    for client in connections {
        let tool = tool.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                out.push(call(&client, &tool).await);
            }
            client.cancel().await.unwrap();
            out
        }));
    }
    gather(tasks).await
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (sequential, per_client_16, warmup) = if full { (2000, 100, 200) } else { (5, 1, 2) };

    let upstream_url = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let mut config = Config::new(dir.path().to_path_buf());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.watch_policy = false;
    config.policy = Some(dir.path().join("policy.yaml"));
    config.rate_limit.per_second = 0;
    config.network.allow_private = vec!["127.0.0.1/32".into()];
    config.mcp_servers.insert("bench".into(), McpServerConfig::http(upstream_url.clone()));
    let server = Server::build(config).await.unwrap();
    let gateway = server.gateway().clone();
    let running = Running::start(server);
    assert!(gateway.mcp_upstream_ready("bench", Duration::from_secs(30)).await, "the upstream did not connect");
    let (url, admin) = (running.url.clone(), running.admin.clone());
    admin.create_agent("bench").await.unwrap();
    let agent_key = admin.create_key("agent", "bench").await.unwrap().str("/key").to_owned();
    let gateway_url = format!("{url}/mcp");

    // Warm both paths (connections, the SQLite cache) before measuring.
    run(&upstream_url, None, "echo", 4, warmup / 4 + 1).await;
    run(&gateway_url, Some(&agent_key), "bench__echo", 4, warmup / 4 + 1).await;

    println!("MCP gateway added latency (rmcp upstream on loopback; through /mcp minus direct, same rmcp client)");
    for clients in [1usize, 16] {
        let per_client = if clients == 1 { sequential } else { per_client_16 };
        let d = run(&upstream_url, None, "echo", clients, per_client).await;
        let g = run(&gateway_url, Some(&agent_key), "bench__echo", clients, per_client).await;
        let (dm, d99, gm, g99) = (percentile(&d, 0.5), percentile(&d, 0.99), percentile(&g, 0.5), percentile(&g, 0.99));
        println!(
            "  allowed tools/call, {clients:>2} client(s), {} calls: direct median {:.3} ms p99 {:.3} ms; gateway \
             median {:.3} ms p99 {:.3} ms; added median {:.3} ms p99 {:.3} ms",
            g.len(),
            ms(dm),
            ms(d99),
            ms(gm),
            ms(g99),
            ms(gm.saturating_sub(dm)),
            ms(g99.saturating_sub(d99)),
        );
    }
    running.stop().await;
}
