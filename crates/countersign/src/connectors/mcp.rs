//! The MCP gateway's upstreams: one rmcp client per `[mcp_servers.NAME]`, over Streamable HTTP (through
//! the outbound guard, like every other outbound call) or over the stdio of a spawned child process.
//!
//! Each upstream has a supervisor task that connects, lists the tools and keeps the list in a cache,
//! lists them again when the upstream sends `notifications/tools/list_changed`, and reconnects with a
//! backoff when the connection ends. Nothing here blocks startup: an upstream that is down has no tools,
//! and a call to it fails at once saying it is unavailable. Every change of a tool list bumps one counter
//! ([`McpUpstreams::changes`]) that the `/mcp` sessions follow to tell their clients the list changed.
//!
//! A spawned child gets a minimal environment plus its configured `env`, is killed when its connection is
//! dropped (`kill_on_drop`), and the supervisor drops it when the server shuts down. This module does not
//! decide whether a call may happen, and does not record anything; the gateway does.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, ContentBlock, Implementation,
    ProtocolVersion, Tool,
};
use rmcp::service::{MaybeSendFuture, NotificationContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, Peer, RoleClient, ServiceError, ServiceExt};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ConnectorError;
use super::guard::OutboundGuard;
use crate::config::{McpServerConfig, McpTransportConfig};

/// How long connecting (spawning or the HTTP handshake) and listing the tools may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The first reconnect delay; each later one doubles, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// What a spawned upstream inherits of the server's environment; its credentials come from `env`.
const INHERITED_ENV: [&str; 8] = ["PATH", "HOME", "LANG", "USER", "LOGNAME", "SHELL", "TERM", "TMPDIR"];

/// The upstream MCP servers and their cached tool lists. Cheap to clone.
#[derive(Clone)]
pub struct McpUpstreams {
    servers: Arc<BTreeMap<String, Arc<Upstream>>>,
    /// Bumped whenever any upstream's tool list (or availability) changes.
    changes: Arc<watch::Sender<u64>>,
}

struct Upstream {
    name: String,
    config: McpServerConfig,
    link: RwLock<Link>,
    /// Set by the client handler on `notifications/tools/list_changed`.
    refresh: Arc<Notify>,
}

/// The live side of one upstream.
#[derive(Default)]
struct Link {
    peer: Option<Peer<RoleClient>>,
    tools: Arc<Vec<Tool>>,
    /// Why it is not connected, when it is not.
    error: Option<String>,
}

/// The rmcp client handler of one upstream connection.
#[derive(Clone)]
struct UpstreamClient {
    refresh: Arc<Notify>,
}

impl ClientHandler for UpstreamClient {
    fn on_tool_list_changed(
        &self,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + MaybeSendFuture + '_ {
        // Listing again is a request: the supervisor makes it, not the handler that reads the connection.
        self.refresh.notify_one();
        std::future::ready(())
    }

    fn get_info(&self) -> ClientConfig {
        // The initialize handshake (2025-11-25) is what every current server speaks; tool list changes then
        // arrive as notifications on the connection.
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("countersign-mcp-gateway", env!("CARGO_PKG_VERSION")),
        )
        .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
    }
}

impl McpUpstreams {
    pub fn new(configs: BTreeMap<String, McpServerConfig>) -> Self {
        let servers = configs
            .into_iter()
            .map(|(name, config)| {
                let upstream = Upstream {
                    name: name.clone(),
                    config,
                    link: RwLock::new(Link { error: Some("not connected yet".into()), ..Link::default() }),
                    refresh: Arc::new(Notify::new()),
                };
                (name, Arc::new(upstream))
            })
            .collect();
        McpUpstreams { servers: Arc::new(servers), changes: Arc::new(watch::channel(0).0) }
    }

    /// Starts one supervisor per upstream on `tracker`; each stops (and drops its child) on `shutdown`.
    pub fn start(&self, guard: Arc<OutboundGuard>, shutdown: &CancellationToken, tracker: &TaskTracker) {
        if self.servers.is_empty() {
            return;
        }
        let client = match super::guard::client_builder(guard.clone()).build() {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "cannot build the HTTP client for MCP upstreams; they stay unavailable");
                return;
            }
        };
        for upstream in self.servers.values() {
            let supervisor = Supervisor {
                upstream: upstream.clone(),
                guard: guard.clone(),
                client: client.clone(),
                changes: self.changes.clone(),
                shutdown: shutdown.clone(),
            };
            tracker.spawn(supervisor.run());
        }
    }

    /// Which orgs may use the server; `None` for an unknown name.
    pub fn scope(&self, name: &str) -> Option<&crate::config::OrgScope> {
        self.servers.get(name).map(|u| &u.config.orgs)
    }

    /// Every cached tool, by upstream name, in name order.
    pub fn tools(&self) -> Vec<(String, Arc<Vec<Tool>>)> {
        self.servers.values().map(|u| (u.name.clone(), u.read().tools.clone())).collect()
    }

    /// The cached tool `tool` of upstream `server`.
    pub fn tool(&self, server: &str, tool: &str) -> Option<Tool> {
        self.servers.get(server).and_then(|u| u.read().tools.iter().find(|t| t.name == tool).cloned())
    }

    /// `None` when `server` is connected; else why not. Unknown names answer that they are unknown.
    pub fn unavailable(&self, server: &str) -> Option<String> {
        match self.servers.get(server) {
            None => Some(format!("no MCP server `{server}` is configured")),
            Some(upstream) => {
                let link = upstream.read();
                match link.peer {
                    Some(_) => None,
                    None => Some(link.error.clone().unwrap_or_else(|| "not connected".into())),
                }
            }
        }
    }

    pub fn timeout(&self, server: &str) -> Option<Duration> {
        self.servers.get(server).map(|u| Duration::from_secs(u.config.timeout_seconds.max(1)))
    }

    /// A receiver that changes whenever a tool list changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Waits until `server` is connected with its tools listed, or `timeout` passes; answers whether it is.
    pub async fn wait_connected(&self, server: &str, timeout: Duration) -> bool {
        let mut changes = self.changes();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.unavailable(server).is_none() {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.unavailable(server).is_none(),
            }
        }
    }

    /// Calls `tool` on `server` once, within the server's timeout. A JSON-RPC error from the upstream comes
    /// back as a tool error result (the upstream answered); a connection that is down or breaks, or a
    /// timeout, is a [`ConnectorError`].
    pub async fn call(&self, server: &str, tool: &str, arguments: &Value) -> Result<CallToolResult, ConnectorError> {
        let upstream =
            self.servers.get(server).ok_or_else(|| ConnectorError::UnknownUpstream(format!("mcp:{server}")))?;
        let peer = {
            let link = upstream.read();
            match &link.peer {
                Some(peer) => peer.clone(),
                None => {
                    let why = link.error.clone().unwrap_or_else(|| "not connected".into());
                    return Err(ConnectorError::Transport(format!("MCP server `{server}` is unavailable: {why}")));
                }
            }
        };
        let Value::Object(arguments) = arguments else {
            return Err(ConnectorError::Invalid("tool arguments must be a JSON object".into()));
        };
        let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments.clone());
        let limit = Duration::from_secs(upstream.config.timeout_seconds.max(1));
        match tokio::time::timeout(limit, peer.call_tool(params)).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(ServiceError::McpError(error))) => {
                let message = format!("MCP server `{server}` refused the call: {} ({})", error.message, error.code.0);
                let mut result = CallToolResult::error(vec![ContentBlock::text(message)]);
                result.structured_content = Some(json!({"error": error}));
                Ok(result)
            }
            Ok(Err(error)) => {
                upstream.refresh.notify_one();
                Err(ConnectorError::OutcomeUnknown(upstream.scrubbed(&format!("MCP server `{server}`: {error}"))))
            }
            Err(_) => Err(ConnectorError::Timeout(format!(
                "MCP server `{server}` did not answer `{tool}` within {}s",
                limit.as_secs()
            ))),
        }
    }
}

impl Upstream {
    /// `text` without this upstream's URL (an HTTP one's path and query may hold its credential).
    fn scrubbed(&self, text: &str) -> String {
        match &self.config.transport {
            McpTransportConfig::Http { url, .. } => super::without_url_in(text, url),
            McpTransportConfig::Stdio { .. } => text.to_owned(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Link> {
        self.link.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Link> {
        self.link.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Keeps one upstream connected for as long as the server runs.
struct Supervisor {
    upstream: Arc<Upstream>,
    guard: Arc<OutboundGuard>,
    client: reqwest::Client,
    changes: Arc<watch::Sender<u64>>,
    shutdown: CancellationToken,
}

impl Supervisor {
    async fn run(self) {
        let name = self.upstream.name.clone();
        let mut failures: u32 = 0;
        loop {
            let connected = tokio::select! {
                () = self.shutdown.cancelled() => return,
                connected = tokio::time::timeout(CONNECT_TIMEOUT, self.connect()) => connected,
            };
            let running = match connected {
                Ok(Ok(running)) => Some(running),
                Ok(Err(error)) => {
                    self.down(error, failures == 0);
                    None
                }
                Err(_) => {
                    self.down(format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()), failures == 0);
                    None
                }
            };
            if let Some(running) = running {
                match self.serve(running).await {
                    Served::Shutdown => return,
                    Served::Listed => failures = 0,
                    Served::NeverListed => {}
                }
            }
            failures = failures.saturating_add(1);
            let delay = FIRST_BACKOFF.saturating_mul(2u32.saturating_pow(failures.min(8) - 1)).min(MAX_BACKOFF);
            tracing::debug!(server = %name, delay_ms = delay.as_millis(), "MCP upstream: reconnecting after a delay");
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Connects and completes the MCP handshake.
    async fn connect(&self) -> Result<RunningService<RoleClient, UpstreamClient>, String> {
        let handler = UpstreamClient { refresh: self.upstream.refresh.clone() };
        match &self.upstream.config.transport {
            McpTransportConfig::Http { url, headers } => {
                let parsed = reqwest::Url::parse(url).map_err(|e| format!("url `{}`: {e}", super::shown_url(url)))?;
                self.guard.check_url(&parsed).map_err(|e| e.to_string())?;
                let mut custom = HashMap::new();
                for (name, value) in headers {
                    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("header `{name}`"))?;
                    let mut value = HeaderValue::from_str(value.expose())
                        .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
                    value.set_sensitive(true);
                    custom.insert(name, value);
                }
                let config = StreamableHttpClientTransportConfig::with_uri(url.as_str()).custom_headers(custom);
                let transport = StreamableHttpClientTransport::with_client(self.client.clone(), config);
                handler.serve(transport).await.map_err(|e| super::without_url_in(&describe_init_error(&e), url))
            }
            McpTransportConfig::Stdio { command, env, cwd } => {
                let (program, args) = command.split_first().ok_or("the command is empty")?;
                let mut child = tokio::process::Command::new(program);
                child.args(args).env_clear().kill_on_drop(true);
                for variable in INHERITED_ENV {
                    if let Some(value) = std::env::var_os(variable) {
                        child.env(variable, value);
                    }
                }
                for (variable, value) in env {
                    child.env(variable, value.expose());
                }
                if let Some(dir) = cwd {
                    child.current_dir(dir);
                }
                let (transport, _) = TokioChildProcess::builder(child)
                    .stderr(std::process::Stdio::inherit())
                    .spawn()
                    .map_err(|e| format!("cannot start `{program}`: {e}"))?;
                handler.serve(transport).await.map_err(|e| describe_init_error(&e))
            }
        }
    }

    /// Lists the tools, then keeps the connection until it ends or the server stops, listing again when
    /// the upstream says its tools changed.
    async fn serve(&self, running: RunningService<RoleClient, UpstreamClient>) -> Served {
        let name = &self.upstream.name;
        let peer = running.peer().clone();
        let stop = running.cancellation_token();
        let mut waiting = std::pin::pin!(running.waiting());
        match self.list(&peer).await {
            Ok(count) => tracing::info!(server = %name, tools = count, "MCP upstream connected"),
            Err(error) => {
                stop.cancel();
                let _ = waiting.await;
                self.down(error, true);
                return Served::NeverListed;
            }
        }
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    stop.cancel();
                    let _ = waiting.await;
                    self.set(Link { error: Some("the server is shutting down".into()), ..Link::default() });
                    return Served::Shutdown;
                }
                _ = &mut waiting => {
                    self.down("the connection ended".into(), true);
                    return Served::Listed;
                }
                () = self.upstream.refresh.notified() => {
                    if peer.is_transport_closed() {
                        continue;
                    }
                    if let Err(error) = self.list(&peer).await {
                        tracing::warn!(server = %name, %error, "MCP upstream: cannot list its tools again");
                    }
                }
            }
        }
    }

    /// Lists the tools and stores them with the peer; answers how many.
    async fn list(&self, peer: &Peer<RoleClient>) -> Result<usize, String> {
        let tools = tokio::time::timeout(CONNECT_TIMEOUT, peer.list_all_tools())
            .await
            .map_err(|_| format!("tools/list got no answer within {}s", CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| format!("tools/list failed: {e}"))?;
        let count = tools.len();
        self.set(Link { peer: Some(peer.clone()), tools: Arc::new(tools), error: None });
        Ok(count)
    }

    fn down(&self, error: String, log: bool) {
        // Every reason reaches agents (a call to a server that is down fails saying why): never its URL.
        let error = self.upstream.scrubbed(&error);
        if log {
            tracing::warn!(server = %self.upstream.name, %error, "MCP upstream unavailable; retrying with backoff");
        }
        self.set(Link { error: Some(error), ..Link::default() });
    }

    fn set(&self, link: Link) {
        *self.upstream.write() = link;
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

enum Served {
    Shutdown,
    /// It was connected with its tools listed, then the connection ended.
    Listed,
    NeverListed,
}

fn describe_init_error(error: &rmcp::service::ClientInitializeError) -> String {
    format!("the MCP handshake failed: {error}")
}
