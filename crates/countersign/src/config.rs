//! Server configuration: defaults, then the TOML file, then `COUNTERSIGN_*` variables and flags (clap
//! handles those two together). Paths inside the file are relative to the file's folder; `${env:NAME}`
//! references in upstream settings are resolved once, at load.
//!
//! Secrets are redacted in `Debug`. This module does not open sockets or files other than the config file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A value that must never appear in logs.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// Which orgs may use an upstream, a model provider or an MCP server: `orgs = ["default", "acme"]`, by org
/// name or id. Absent: every org. The entry's credentials act for whoever may use it, so on an instance
/// with several orgs each credential should name the orgs it is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct OrgScope(Option<BTreeSet<String>>);

impl OrgScope {
    /// Only these orgs (names or ids).
    pub fn only<S: Into<String>>(orgs: impl IntoIterator<Item = S>) -> Self {
        OrgScope(Some(orgs.into_iter().map(Into::into).collect()))
    }

    /// No `orgs`: every org may use the entry.
    pub fn is_every_org(&self) -> bool {
        self.0.is_none()
    }

    /// Whether the org with this id and name may use the entry.
    pub fn admits(&self, id: &str, name: &str) -> bool {
        self.0.as_ref().is_none_or(|orgs| orgs.contains(id) || orgs.contains(name))
    }
}

/// Which capabilities may send through an upstream: `capabilities = ["finance.*"]` (globs as in policy).
/// Absent: any. The agent names both the capability (what policy rules on) and the upstream (whose
/// credential acts), so without this an action allowed as `email.send` could be aimed at the payments API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct CapabilityScope(Option<Vec<String>>);

impl CapabilityScope {
    pub fn only<S: Into<String>>(globs: impl IntoIterator<Item = S>) -> Self {
        CapabilityScope(Some(globs.into_iter().map(Into::into).collect()))
    }

    /// Whether an action of this capability may send through the upstream.
    pub fn admits(&self, capability: &str) -> bool {
        self.0.as_ref().is_none_or(|globs| {
            globs.iter().any(|g| countersign_core::capability::NameGlob::parse(g).is_ok_and(|g| g.matches(capability)))
        })
    }

    /// The globs, for messages.
    pub fn describe(&self) -> String {
        self.0.as_ref().map(|globs| globs.join(", ")).unwrap_or_else(|| "*".into())
    }

    fn check(&self) -> Result<(), String> {
        for glob in self.0.iter().flatten() {
            countersign_core::capability::NameGlob::parse(glob).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// An upstream an `http` target may name. The agent never sees its base URL's credentials or headers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub base_url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// May a request whose outcome is unknown after a crash be sent again?
    #[serde(default)]
    pub retry_safe: bool,
    #[serde(default = "default_upstream_timeout")]
    pub timeout_seconds: u64,
    #[serde(default)]
    pub orgs: OrgScope,
    #[serde(default)]
    pub capabilities: CapabilityScope,
}

fn default_upstream_timeout() -> u64 {
    30
}

/// The wire format a model provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`; `Authorization: Bearer`.
    Openai,
    /// `/v1/messages`; `x-api-key` and `anthropic-version`.
    Anthropic,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Openai => "openai",
            Dialect::Anthropic => "anthropic",
        }
    }
}

/// A model provider as written under `[llm.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmFileConfig {
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Default: `anthropic` when the provider is named `anthropic`, else `openai`.
    #[serde(default)]
    pub dialect: Option<Dialect>,
    /// How long a non-streamed call may take in all, and a stream may go without a byte (its first one
    /// included). Default 600 s, the OpenAI and Anthropic SDKs' own timeout: a reasoning model may think for
    /// minutes, and a call that works directly must not fail through the proxy.
    #[serde(default = "default_llm_timeout")]
    pub timeout_seconds: u64,
    /// Ask an OpenAI-dialect stream for its token usage (`stream_options.include_usage`) when the client
    /// did not, so the audit records it; the extra chunk is not passed on. Default: on for api.openai.com,
    /// off elsewhere (some OpenAI-compatible servers refuse the field).
    #[serde(default)]
    pub stream_usage: Option<bool>,
    #[serde(default)]
    pub orgs: OrgScope,
}

/// A model provider the LLM proxy forwards to. The agent never sees its key.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// The provider's address, with or without its `/v1`: `https://api.openai.com/v1` and
    /// `https://api.openai.com` both reach `https://api.openai.com/v1/chat/completions`.
    pub base_url: String,
    pub api_key: Secret,
    pub dialect: Dialect,
    pub timeout_seconds: u64,
    /// See [`LlmFileConfig::stream_usage`].
    pub stream_usage: bool,
    pub orgs: OrgScope,
}

impl LlmConfig {
    /// A provider whose dialect follows its name, as in the file when `dialect` is left out.
    pub fn new(name: &str, base_url: String, api_key: Secret) -> Self {
        let stream_usage = default_stream_usage(&base_url);
        LlmConfig {
            base_url,
            api_key,
            dialect: default_dialect(name),
            timeout_seconds: default_llm_timeout(),
            stream_usage,
            orgs: OrgScope::default(),
        }
    }
}

/// OpenAI itself takes `stream_options`; other OpenAI-compatible servers may not.
fn default_stream_usage(base_url: &str) -> bool {
    reqwest::Url::parse(base_url).ok().and_then(|u| u.host_str().map(|h| h == "api.openai.com")).unwrap_or(false)
}

fn default_dialect(name: &str) -> Dialect {
    if name == "anthropic" { Dialect::Anthropic } else { Dialect::Openai }
}

fn default_llm_timeout() -> u64 {
    600
}

/// An upstream MCP server as written under `[mcp_servers.NAME]`: exactly one of `url` (Streamable HTTP)
/// or `command` (spawned, spoken to over stdio).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerFileConfig {
    #[serde(default)]
    pub url: Option<String>,
    /// Sent with every request to a `url` upstream (credentials); values may use `${env:NAME}`.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// The program and its arguments, e.g. `["python3", "server.py"]`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Environment of a `command` upstream (credentials); values may use `${env:NAME}`.
    #[serde(default)]
    pub env: BTreeMap<String, Secret>,
    /// Working directory of a `command` upstream, relative to the configuration file.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// How long one tool call may take.
    #[serde(default = "default_mcp_timeout")]
    pub timeout_seconds: u64,
    #[serde(default)]
    pub orgs: OrgScope,
}

/// How the gateway reaches an upstream MCP server.
#[derive(Debug, Clone)]
pub enum McpTransportConfig {
    /// Streamable HTTP, through the outbound guard.
    Http { url: String, headers: BTreeMap<String, Secret> },
    /// A child process spoken to over stdin/stdout. It gets only `PATH`, `HOME`, `LANG`, `USER`, `LOGNAME`,
    /// `SHELL`, `TERM` and `TMPDIR` of the server's environment, plus `env`.
    Stdio { command: Vec<String>, env: BTreeMap<String, Secret>, cwd: Option<PathBuf> },
}

/// An upstream MCP server whose tools the gateway offers as `NAME__tool`. The agent never sees its
/// credentials.
#[derive(Debug, Clone)]
pub struct McpServerConfig {
    pub transport: McpTransportConfig,
    pub timeout_seconds: u64,
    pub orgs: OrgScope,
}

impl McpServerConfig {
    pub fn http(url: impl Into<String>) -> Self {
        McpServerConfig {
            transport: McpTransportConfig::Http { url: url.into(), headers: BTreeMap::new() },
            timeout_seconds: default_mcp_timeout(),
            orgs: OrgScope::default(),
        }
    }

    pub fn stdio(command: Vec<String>) -> Self {
        McpServerConfig {
            transport: McpTransportConfig::Stdio { command, env: BTreeMap::new(), cwd: None },
            timeout_seconds: default_mcp_timeout(),
            orgs: OrgScope::default(),
        }
    }
}

fn default_mcp_timeout() -> u64 {
    60
}

/// The longest timeout, grace or margin the configuration takes: a day. Deadlines are computed from these,
/// and an unbounded value would overflow them.
const MAX_CONFIGURED_SECONDS: u64 = 86_400;

/// The longest a resolved credential may be served from memory.
const MAX_AUTH_CACHE_SECONDS: u64 = 60;

/// The LLM proxy's default body limit: room for a long context or a few base64 screenshots.
pub const DEFAULT_LLM_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The smallest body limit taken: below it every request would be refused.
const MIN_BODY_BYTES: usize = 1024;

/// `bytes` when it is a workable body limit; else an error naming `key`.
fn body_limit(key: &str, bytes: usize) -> Result<usize, ConfigError> {
    if bytes >= MIN_BODY_BYTES {
        Ok(bytes)
    } else {
        Err(ConfigError::Invalid(format!("{key} must be at least {MIN_BODY_BYTES} bytes, or every request is refused")))
    }
}

/// More jobs at once than this would only queue on the database's connections.
const MAX_JOB_CONCURRENCY: usize = 1024;

/// `seconds` when it lies between `min` and a day; else an error naming `key`.
fn seconds_in_range(key: &str, seconds: u64, min: u64) -> Result<u64, ConfigError> {
    if (min..=MAX_CONFIGURED_SECONDS).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(ConfigError::Invalid(format!("{key} must be between {min} and {MAX_CONFIGURED_SECONDS} seconds")))
    }
}

/// An MCP server name: `[A-Za-z0-9_-]`, no `__` (the separator in `NAME__tool`) and no `_` at the end
/// (`a_` + `__` + `tool` would read back as `a` and `_tool`).
pub fn valid_mcp_server_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains("__")
        && !name.ends_with('_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Every `[mcp_servers.NAME]`, checked and resolved. Two names that differ only in case are refused: the
/// capability `mcp.NAME.tool` is lowercased, so policy could not tell them apart.
fn resolve_mcp_servers(
    servers: BTreeMap<String, McpServerFileConfig>,
    base: &Path,
) -> Result<BTreeMap<String, McpServerConfig>, ConfigError> {
    let mut out: BTreeMap<String, McpServerConfig> = BTreeMap::new();
    for (name, server) in servers {
        if let Some(other) = out.keys().find(|other| other.eq_ignore_ascii_case(&name)) {
            return Err(ConfigError::Invalid(format!(
                "mcp_servers.{name}: `{other}` differs only in case, and both would be the capability `mcp.{}.*`",
                name.to_ascii_lowercase()
            )));
        }
        let resolved = server.resolve(&name, base)?;
        out.insert(name, resolved);
    }
    Ok(out)
}

impl McpServerFileConfig {
    /// Checks the entry and resolves `${env:…}` references and a relative `cwd`.
    fn resolve(self, name: &str, base: &Path) -> Result<McpServerConfig, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(format!("mcp_servers.{name}: {m}"));
        if !valid_mcp_server_name(name) {
            return Err(invalid(
                "a server name is [A-Za-z0-9_-], must not contain `__` and must not end in `_`".into(),
            ));
        }
        seconds_in_range(&format!("mcp_servers.{name}.timeout_seconds"), self.timeout_seconds, 1)?;
        let transport = match (self.url, self.command) {
            (Some(url), None) => {
                if !self.env.is_empty() || self.cwd.is_some() {
                    return Err(invalid("`env` and `cwd` belong to a `command` server, not a `url` one".into()));
                }
                let url = expand_env(&url)?;
                url_is_http(&url).map_err(|m| invalid(format!("url: {m}")))?;
                let mut headers = BTreeMap::new();
                for (header, value) in self.headers {
                    axum::http::HeaderName::from_bytes(header.as_bytes())
                        .map_err(|_| invalid(format!("headers: `{header}` is not a header name")))?;
                    headers.insert(header, Secret::new(expand_env(value.expose())?));
                }
                McpTransportConfig::Http { url, headers }
            }
            (None, Some(command)) => {
                if !self.headers.is_empty() {
                    return Err(invalid("`headers` belong to a `url` server, not a `command` one".into()));
                }
                if command.first().is_none_or(|program| program.is_empty()) {
                    return Err(invalid("command must name a program: [\"python3\", \"server.py\"]".into()));
                }
                let mut env = BTreeMap::new();
                for (variable, value) in self.env {
                    env.insert(variable, Secret::new(expand_env(value.expose())?));
                }
                let cwd = self.cwd.map(|dir| if dir.is_absolute() { dir } else { base.join(dir) });
                McpTransportConfig::Stdio { command, env, cwd }
            }
            (Some(_), Some(_)) => return Err(invalid("give either `url` or `command`, not both".into())),
            (None, None) => {
                return Err(invalid("give `url` (Streamable HTTP) or `command` (spawned over stdio)".into()));
            }
        };
        Ok(McpServerConfig { transport, timeout_seconds: self.timeout_seconds, orgs: self.orgs })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Outbound-guard exceptions, as CIDR networks.
    #[serde(default)]
    pub allow_private: Vec<String>,
}

/// Requests per principal (agent, user or session), counted after authentication. 429 beyond it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second per principal; 0 turns the limit off.
    pub per_second: u32,
    /// How many requests may come at once above the sustained rate.
    pub burst: u32,
    /// Waits one principal may hold open at once on a replica (long polls, held model and MCP tool calls,
    /// audit and dashboard streams, MCP resource subscriptions); 0 turns the limit off.
    #[serde(default = "default_open_waits")]
    pub open_waits: u32,
}

/// The default of [`RateLimitConfig::open_waits`].
pub const DEFAULT_OPEN_WAITS: u32 = 128;

fn default_open_waits() -> u32 {
    DEFAULT_OPEN_WAITS
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig { per_second: 100, burst: 200, open_waits: DEFAULT_OPEN_WAITS }
    }
}

/// The configuration file as written; every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<Secret>,
    pub policy: Option<PathBuf>,
    pub public_url: Option<String>,
    pub log_format: Option<crate::telemetry::LogFormat>,
    pub max_body_bytes: Option<usize>,
    pub llm_max_body_bytes: Option<usize>,
    pub auth_cache_seconds: Option<u64>,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub llm: BTreeMap<String, LlmFileConfig>,
    #[serde(default)]
    pub mcp_servers: BTreeMap<String, McpServerFileConfig>,
    #[serde(default)]
    pub network: NetworkConfig,
    pub rate_limit: Option<RateLimitConfig>,
    pub jobs: Option<JobsFileConfig>,
}

/// `[jobs]`: how the job runner behaves. Every key optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsFileConfig {
    /// How long a claimed job is held before another replica may take it over (renewed while it runs).
    pub lease_seconds: Option<u64>,
    /// Jobs run at the same time per replica.
    pub concurrency: Option<usize>,
    /// The first webhook retry delay; each later one doubles, with jitter.
    pub webhook_retry_base_ms: Option<u64>,
    pub webhook_max_attempts: Option<u32>,
    /// After an approval, how long the execution job leaves a held model request to the client still
    /// waiting on its connection (which can stream it) before carrying it out itself.
    pub llm_hold_grace_seconds: Option<u64>,
    /// How long past the provider's timeout a model or tool call cut off by a crash is declared `failed`
    /// ("outcome unknown") by its recovery job.
    pub llm_recovery_margin_seconds: Option<u64>,
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: Option<Secret>,
    /// A policy file or folder; `None` loads the shipped example policy.
    pub policy: Option<PathBuf>,
    /// How clients reach this server (for `poll_url` and session MCP URLs); defaults to the listen address.
    pub public_url: Option<String>,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Model providers of the LLM proxy, by the name in `/llm/{name}/v1/…`.
    pub llm: BTreeMap<String, LlmConfig>,
    /// Upstream MCP servers of the MCP gateway, by the name in `NAME__tool`.
    pub mcp_servers: BTreeMap<String, McpServerConfig>,
    pub network: NetworkConfig,
    pub bootstrap_admin_key: Option<Secret>,
    pub max_body_bytes: usize,
    /// The body limit of the LLM proxy's routes (`llm_max_body_bytes`): model requests carry long contexts
    /// and base64 images, so they get their own, larger limit.
    pub llm_max_body_bytes: usize,
    /// Watch the policy file for changes and reload it.
    pub watch_policy: bool,
    pub rate_limit: RateLimitConfig,
    /// The job runner's lease, concurrency, retry delays, hold grace and recovery margin (`[jobs]`; tests shorten them).
    pub jobs: crate::gateway::JobRunnerSettings,
    /// `log_format` from the file; the `--log-format` flag or `COUNTERSIGN_LOG_FORMAT` wins over it.
    pub log_format: crate::telemetry::LogFormat,
    /// How long a resolved key or session is served from memory (`auth_cache_seconds`, 0 to 60; 0 is off).
    /// Revocations empty the cache on every replica at once; this bounds a credential's life after a
    /// revocation only if a replica missed the change feed and has not yet noticed.
    pub auth_cache: Duration,
}

impl Config {
    /// Everything at its default: loopback on 8080, `./data`, the example policy.
    pub fn new(data_dir: PathBuf) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir,
            database_url: None,
            policy: None,
            public_url: None,
            upstreams: BTreeMap::new(),
            llm: BTreeMap::new(),
            mcp_servers: BTreeMap::new(),
            network: NetworkConfig::default(),
            bootstrap_admin_key: None,
            max_body_bytes: 1024 * 1024,
            llm_max_body_bytes: DEFAULT_LLM_MAX_BODY_BYTES,
            watch_policy: true,
            rate_limit: RateLimitConfig::default(),
            jobs: crate::gateway::JobRunnerSettings::default(),
            log_format: crate::telemetry::LogFormat::default(),
            auth_cache: Duration::from_secs(1),
        }
    }
}

/// Command-line and environment overrides (clap reads both).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// A TOML configuration file.
    #[arg(long, env = "COUNTERSIGN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "COUNTERSIGN_LISTEN")]
    pub listen: Option<String>,
    /// Folder for the SQLite file and the bootstrap admin key.
    #[arg(long, env = "COUNTERSIGN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL instead of the embedded SQLite store.
    #[arg(long, env = "COUNTERSIGN_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Policy file or folder (default: the shipped example policy).
    #[arg(long, env = "COUNTERSIGN_POLICY")]
    pub policy: Option<PathBuf>,
    /// The URL clients use to reach this server.
    #[arg(long, env = "COUNTERSIGN_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Request body limit in bytes.
    #[arg(long, env = "COUNTERSIGN_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Request body limit of the LLM proxy's routes, in bytes (default 16 MiB).
    #[arg(long, env = "COUNTERSIGN_LLM_MAX_BODY_BYTES")]
    pub llm_max_body_bytes: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("configuration file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Resolves `${env:NAME}` references; a missing variable is an error, never an empty string.
pub fn expand_env(text: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${env:") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 6..];
        let end = after
            .find('}')
            .ok_or_else(|| ConfigError::Invalid(format!("unterminated `${{env:` reference in `{text}`")))?;
        let name = &after[..end];
        let value = std::env::var(name)
            .map_err(|_| ConfigError::Invalid(format!("environment variable `{name}` is referenced but not set")))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl ServeArgs {
    /// Defaults, then the file, then these overrides.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let (file, base) = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
                let file: FileConfig = toml::from_str(&text)
                    .map_err(|e| ConfigError::Parse { path: path.display().to_string(), message: e.to_string() })?;
                (file, path.parent().map(Path::to_path_buf).unwrap_or_default())
            }
            None => (FileConfig::default(), PathBuf::new()),
        };
        let relative_to_file = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

        let mut config = Config::new(PathBuf::from("data"));
        if let Some(dir) = file.data_dir {
            config.data_dir = relative_to_file(dir);
        }
        if let Some(policy) = file.policy {
            config.policy = Some(relative_to_file(policy));
        }
        config.database_url = file.database_url;
        config.public_url = file.public_url;
        config.log_format = file.log_format.unwrap_or_default();
        if let Some(seconds) = file.auth_cache_seconds {
            if seconds > MAX_AUTH_CACHE_SECONDS {
                return Err(ConfigError::Invalid(format!(
                    "auth_cache_seconds must be between 0 and {MAX_AUTH_CACHE_SECONDS} seconds"
                )));
            }
            config.auth_cache = Duration::from_secs(seconds);
        }
        if let Some(bytes) = file.max_body_bytes {
            config.max_body_bytes = body_limit("max_body_bytes", bytes)?;
        }
        if let Some(bytes) = file.llm_max_body_bytes {
            config.llm_max_body_bytes = body_limit("llm_max_body_bytes", bytes)?;
        }
        let mut listen = file.listen;
        for (name, mut upstream) in file.upstreams {
            upstream.base_url = expand_env(&upstream.base_url)?;
            base_url_is_http(&upstream.base_url)
                .map_err(|m| ConfigError::Invalid(format!("upstreams.{name}.base_url: {m}")))?;
            upstream
                .capabilities
                .check()
                .map_err(|m| ConfigError::Invalid(format!("upstreams.{name}.capabilities: {m}")))?;
            for value in upstream.headers.values_mut() {
                *value = Secret::new(expand_env(value.expose())?);
            }
            config.upstreams.insert(name, upstream);
        }
        for (name, provider) in file.llm {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(ConfigError::Invalid(format!("llm.{name}: a provider name is [A-Za-z0-9_-]")));
            }
            let base_url = expand_env(&provider.base_url)?;
            base_url_is_http(&base_url).map_err(|m| ConfigError::Invalid(format!("llm.{name}.base_url: {m}")))?;
            let api_key = match provider.api_key {
                Some(key) => Secret::new(expand_env(key.expose())?),
                None => Secret::default(),
            };
            let dialect = provider.dialect.unwrap_or_else(|| default_dialect(&name));
            let stream_usage = provider.stream_usage.unwrap_or_else(|| default_stream_usage(&base_url));
            let timeout_seconds =
                seconds_in_range(&format!("llm.{name}.timeout_seconds"), provider.timeout_seconds, 1)?;
            let orgs = provider.orgs;
            config.llm.insert(name, LlmConfig { base_url, api_key, dialect, timeout_seconds, stream_usage, orgs });
        }
        config.mcp_servers = resolve_mcp_servers(file.mcp_servers, &base)?;
        config.network = file.network;
        if let Some(limit) = file.rate_limit {
            config.rate_limit = limit;
        }
        if let Some(jobs) = file.jobs {
            if let Some(seconds) = jobs.lease_seconds {
                config.jobs.lease = std::time::Duration::from_secs(seconds_in_range("jobs.lease_seconds", seconds, 1)?);
            }
            if let Some(concurrency) = jobs.concurrency {
                if !(1..=MAX_JOB_CONCURRENCY).contains(&concurrency) {
                    return Err(ConfigError::Invalid(format!(
                        "jobs.concurrency must be between 1 and {MAX_JOB_CONCURRENCY}"
                    )));
                }
                config.jobs.concurrency = concurrency;
            }
            if let Some(ms) = jobs.webhook_retry_base_ms {
                config.jobs.webhook_retry_base = std::time::Duration::from_millis(ms.max(1));
            }
            if let Some(attempts) = jobs.webhook_max_attempts {
                config.jobs.webhook_max_attempts = attempts.max(1);
            }
            if let Some(seconds) = jobs.llm_hold_grace_seconds {
                let seconds = seconds_in_range("jobs.llm_hold_grace_seconds", seconds, 0)?;
                config.jobs.llm_hold_grace = std::time::Duration::from_secs(seconds);
            }
            if let Some(seconds) = jobs.llm_recovery_margin_seconds {
                let seconds = seconds_in_range("jobs.llm_recovery_margin_seconds", seconds, 1)?;
                config.jobs.llm_recovery_margin = std::time::Duration::from_secs(seconds);
            }
        }

        if let Some(l) = &self.listen {
            listen = Some(l.clone());
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(url) = &self.database_url {
            config.database_url = Some(Secret::new(url.clone()));
        }
        if let Some(p) = &self.policy {
            config.policy = Some(p.clone());
        }
        if let Some(u) = &self.public_url {
            config.public_url = Some(u.clone());
        }
        if let Some(b) = self.max_body_bytes {
            config.max_body_bytes = body_limit("max_body_bytes", b)?;
        }
        if let Some(b) = self.llm_max_body_bytes {
            config.llm_max_body_bytes = body_limit("llm_max_body_bytes", b)?;
        }
        if let Some(l) = listen {
            config.listen = l
                .parse()
                .map_err(|_| ConfigError::Invalid(format!("listen `{l}` is not an address like 127.0.0.1:8080")))?;
        }
        config.bootstrap_admin_key = std::env::var("COUNTERSIGN_BOOTSTRAP_ADMIN_KEY").ok().map(Secret::new);
        Ok(config)
    }
}

/// Errors never quote the URL whole: it is read after `${env:…}` references are expanded, so its path or
/// query may hold a secret (`?key=${env:MAPS_KEY}`); they show it as `connectors::shown_url` does.
fn url_is_http(text: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(text).map_err(|e| format!("it is not a URL: {e}"))?;
    match parsed.scheme() {
        "http" | "https" => Ok(parsed),
        other => Err(format!("scheme `{other}` is not http or https")),
    }
}

/// A base URL that paths are appended to: http(s), and no query or fragment, which would swallow them.
fn base_url_is_http(text: &str) -> Result<(), String> {
    let parsed = url_is_http(text)?;
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "`{}` must not have a query or fragment (`?…`, `#…`); paths are appended to it",
            crate::connectors::shown_url(text)
        ));
    }
    Ok(())
}

/// A commented example configuration, printed by `countersign config example`.
pub const EXAMPLE: &str = r#"# countersign.toml — every key is optional; each is also a flag or a COUNTERSIGN_* variable.
listen = "127.0.0.1:8080"
data_dir = "./data"                 # SQLite file, admin.key, audit-signing.key, exports (relative to this file)
# database_url = "postgres://…"     # PostgreSQL instead of SQLite
# policy = "policy.yaml"            # file or folder; default: the shipped example policy
# public_url = "https://countersign.example.com"
# log_format = "json"               # text (default) or json; --log-format wins
# auth_cache_seconds = 1            # keys and sessions served from memory this long (0-60, 0 off);
                                    # a revocation empties the cache on every replica at once
# max_body_bytes = 1048576          # request body limit (bytes)
# llm_max_body_bytes = 16777216     # the LLM proxy's own limit: long contexts and base64 images

# Upstreams an action's http target may name. Credentials live here, never with the agent.
# [upstreams.payments]
# base_url = "https://api.payments.example"
# headers = { Authorization = "Bearer ${env:PAYMENTS_KEY}" }
# retry_safe = false                # resend when the outcome is unknown (a crash, no answer)?
# timeout_seconds = 30
# orgs = ["default"]                # the orgs that may use it (names or ids); default: every org
# capabilities = ["finance.*"]      # the capabilities that may send through it; default: any

# Model providers for the LLM proxy: agents call /llm/NAME/v1/… with their Countersign key.
# [llm.openai]
# base_url = "https://api.openai.com/v1"   # with or without the trailing /v1
# api_key = "${env:OPENAI_API_KEY}"
# dialect = "openai"                # default: "anthropic" for [llm.anthropic], else "openai"
# timeout_seconds = 600
# stream_usage = true               # ask streams for token usage (default: on for api.openai.com only)
# orgs = ["default"]                # the orgs that may use it; default: every org
# [llm.anthropic]
# base_url = "https://api.anthropic.com"
# api_key = "${env:ANTHROPIC_API_KEY}"

# Upstream MCP servers: their tools appear on /mcp as NAME__tool, and each call is an action with the
# capability mcp.NAME.tool (lowercased; other characters than a-z 0-9 _ - become _) and the arguments as params.
# [mcp_servers.github]
# url = "https://mcp.github.example/mcp"  # Streamable HTTP, through the outbound guard
# headers = { Authorization = "Bearer ${env:GITHUB_TOKEN}" }
# timeout_seconds = 60              # one tool call
# orgs = ["default"]                # the orgs that may use it; default: every org
# [mcp_servers.files]
# command = ["python3", "files_server.py", "--root", "/srv/files"]   # spawned, spoken to over stdio
# env = { FILES_TOKEN = "${env:FILES_TOKEN}" }   # the child gets PATH, HOME, LANG, … plus these
# cwd = "mcp"                       # relative to this file

# [network]
# allow_private = ["127.0.0.1/32"]  # outbound guard exceptions

# [jobs]
# lease_seconds = 30                # a crashed replica's job is taken over after this
# concurrency = 64
# webhook_retry_base_ms = 1000      # then doubling, with jitter
# webhook_max_attempts = 8
# llm_hold_grace_seconds = 30       # an approved held model call waits this long for its client first
# llm_recovery_margin_seconds = 60  # a call cut off by a crash ends "outcome unknown" this long past its timeout

# [rate_limit]                      # per agent, user or session; 429 beyond it
# per_second = 100                  # 0 turns the limit off
# burst = 200
# open_waits = 128                  # long polls, held calls and streams open at once; 0 turns it off
"#;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn env_references_expand_and_missing_ones_fail() {
        assert_eq!(expand_env("plain").ok(), Some("plain".to_owned()));
        assert!(expand_env("Bearer ${env:COUNTERSIGN_SURELY_UNSET_VARIABLE}").is_err());
        assert!(expand_env("${env:UNTERMINATED").is_err());
        let path = std::env::var("PATH").unwrap_or_default();
        assert_eq!(expand_env("x${env:PATH}y").ok(), Some(format!("x{path}y")));
    }

    #[test]
    fn llm_providers_take_their_dialect_from_the_name_by_default() {
        let file: FileConfig = toml::from_str(
            "[llm.anthropic]\nbase_url = \"https://a.example\"\n[llm.local]\nbase_url = \"http://l.example\"\n\
             dialect = \"anthropic\"\n[llm.openai]\nbase_url = \"https://o.example\"\napi_key = \"k\"\n",
        )
        .unwrap_or_default();
        assert_eq!(file.llm.len(), 3);
        assert_eq!(file.llm.get("local").and_then(|p| p.dialect), Some(Dialect::Anthropic));
        assert_eq!(default_dialect("anthropic"), Dialect::Anthropic);
        assert_eq!(default_dialect("openai"), Dialect::Openai);
        assert_eq!(file.llm.get("openai").map(|p| p.timeout_seconds), Some(600));
        assert!(!format!("{:?}", file.llm.get("openai")).contains("\"k\""));
    }

    fn mcp(text: &str) -> Result<BTreeMap<String, McpServerConfig>, String> {
        let file: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        resolve_mcp_servers(file.mcp_servers, Path::new("/etc/countersign")).map_err(|e| e.to_string())
    }

    #[test]
    fn mcp_servers_take_a_url_or_a_command() {
        let servers = mcp("[mcp_servers.gh]\nurl = \"https://mcp.example/mcp\"\nheaders = { Authorization = \"Bearer x\" }\n\
                           [mcp_servers.files-1]\ncommand = [\"python3\", \"s.py\"]\nenv = { TOKEN = \"t\" }\ncwd = \"mcp\"\n")
        .unwrap_or_default();
        assert_eq!(servers.len(), 2);
        match servers.get("gh").map(|s| &s.transport) {
            Some(McpTransportConfig::Http { url, headers }) => {
                assert_eq!(url, "https://mcp.example/mcp");
                assert_eq!(headers.get("Authorization").map(Secret::expose), Some("Bearer x"));
            }
            other => unreachable!("{other:?}"),
        }
        match servers.get("files-1").map(|s| &s.transport) {
            Some(McpTransportConfig::Stdio { command, env, cwd }) => {
                assert_eq!(command, &["python3".to_owned(), "s.py".to_owned()]);
                assert_eq!(env.get("TOKEN").map(Secret::expose), Some("t"));
                assert_eq!(cwd.as_deref(), Some(Path::new("/etc/countersign/mcp")));
                assert!(!format!("{env:?}").contains("\"t\""));
            }
            other => unreachable!("{other:?}"),
        }
        assert_eq!(servers.get("gh").map(|s| s.timeout_seconds), Some(60));
    }

    #[test]
    fn mcp_servers_refuse_bad_entries() {
        for (text, expected) in [
            ("[mcp_servers.a]\nurl = \"http://x\"\ncommand = [\"p\"]\n", "not both"),
            ("[mcp_servers.a]\ntimeout_seconds = 5\n", "give `url`"),
            ("[mcp_servers.a__b]\nurl = \"http://x\"\n", "`__`"),
            ("[mcp_servers.gh_]\nurl = \"http://x\"\n", "end in `_`"),
            (
                "[mcp_servers.GitHub]\nurl = \"http://x\"\n[mcp_servers.github]\nurl = \"http://y\"\n",
                "differs only in case",
            ),
            ("[mcp_servers.\"a.b\"]\nurl = \"http://x\"\n", "[A-Za-z0-9_-]"),
            ("[mcp_servers.a]\ncommand = []\n", "must name a program"),
            ("[mcp_servers.a]\nurl = \"ftp://x\"\n", "scheme"),
            ("[mcp_servers.a]\nurl = \"http://x\"\nenv = { A = \"b\" }\n", "belong to a `command`"),
            ("[mcp_servers.a]\ncommand = [\"p\"]\nheaders = { A = \"b\" }\n", "belong to a `url`"),
            ("[mcp_servers.a]\nurl = \"http://x\"\nbogus = 1\n", "unknown field"),
            ("[mcp_servers.a]\nurl = \"http://x\"\nheaders = { \"bad header\" = \"b\" }\n", "not a header name"),
        ] {
            match mcp(text) {
                Err(message) => assert!(message.contains(expected), "{text}: {message}"),
                Ok(_) => unreachable!("{text} was accepted"),
            }
        }
        assert!(valid_mcp_server_name("files_1-a"));
        assert!(!valid_mcp_server_name(""));
    }

    #[test]
    fn jobs_settings_are_read_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("countersign.toml");
        std::fs::write(
            &path,
            "[jobs]\nllm_hold_grace_seconds = 5\nllm_recovery_margin_seconds = 7\nlease_seconds = 9\n",
        )
        .unwrap();
        let args = ServeArgs { config: Some(path.clone()), ..ServeArgs::default() };
        let config = args.resolve().unwrap();
        assert_eq!(config.jobs.llm_hold_grace, std::time::Duration::from_secs(5));
        assert_eq!(config.jobs.llm_recovery_margin, std::time::Duration::from_secs(7));
        assert_eq!(config.jobs.lease, std::time::Duration::from_secs(9));
        for text in [
            "[jobs]\nllm_recovery_margin_seconds = 0\n",
            "[jobs]\nllm_hold_grace_seconds = 99999999999\n",
            "[jobs]\nlease_seconds = 0\n",
            "[jobs]\nlease_seconds = 9000000000000\n",
            "[jobs]\nconcurrency = 0\n",
            "[jobs]\nconcurrency = 4611686018427387904\n",
        ] {
            std::fs::write(&path, text).unwrap();
            let error = ServeArgs { config: Some(path.clone()), ..ServeArgs::default() }.resolve().unwrap_err();
            assert!(error.to_string().contains("must be between"), "{text}: {error}");
        }
    }

    #[test]
    fn base_urls_take_no_query_but_mcp_urls_may() {
        assert!(base_url_is_http("https://api.example/v1").is_ok());
        let error = base_url_is_http("https://api.example/v1?tenant=x").unwrap_err();
        assert!(error.contains("query or fragment"), "{error}");
        assert!(base_url_is_http("https://api.example/#x").is_err());
        assert!(url_is_http("https://mcp.example/mcp?token=x").is_ok());
        // What `${env:…}` put in a URL is never quoted back.
        let error = base_url_is_http("https://maps.example/api?key=sk-secret-123").unwrap_err();
        assert!(error.contains("https://maps.example/…") && !error.contains("sk-secret-123"), "{error}");
        let error = url_is_http("https://exa mple/sk-secret-123").unwrap_err();
        assert!(!error.contains("sk-secret-123"), "{error}");
    }

    #[test]
    fn log_format_is_read_from_the_file_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("countersign.toml");
        let resolve = |text: &str| {
            std::fs::write(&path, text).unwrap();
            ServeArgs { config: Some(path.clone()), ..ServeArgs::default() }.resolve()
        };
        assert_eq!(resolve("").unwrap().log_format, crate::telemetry::LogFormat::Text);
        assert_eq!(resolve("log_format = \"json\"\n").unwrap().log_format, crate::telemetry::LogFormat::Json);
        assert_eq!(resolve("").unwrap().auth_cache, Duration::from_secs(1));
        assert_eq!(resolve("auth_cache_seconds = 0\n").unwrap().auth_cache, Duration::ZERO);
        assert_eq!(resolve("llm_max_body_bytes = 33554432\n").unwrap().llm_max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(resolve("").unwrap().llm_max_body_bytes, DEFAULT_LLM_MAX_BODY_BYTES);
        for key in ["max_body_bytes", "llm_max_body_bytes"] {
            let error = resolve(&format!("{key} = 0\n")).unwrap_err().to_string();
            assert!(error.contains(key) && error.contains("at least"), "{error}");
        }
        let error = resolve("auth_cache_seconds = 3600\n").unwrap_err().to_string();
        assert!(error.contains("auth_cache_seconds"), "{error}");
        let error = resolve("log_format = \"yaml\"\n").unwrap_err().to_string();
        assert!(error.contains("log_format") && error.contains("json"), "{error}");
    }

    #[test]
    fn example_parses() {
        assert!(toml::from_str::<FileConfig>(EXAMPLE).is_ok());
        // Its commented top-level keys, uncommented, are real keys with values of the right type.
        let top = EXAMPLE.split("\n# [").next().unwrap_or_default();
        let uncommented: String = top
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(key)
                    if key
                        .split(" = ")
                        .next()
                        .is_some_and(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_')) =>
                {
                    key
                }
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        assert!(uncommented.contains("\nllm_max_body_bytes = "), "{uncommented}");
        let file = toml::from_str::<FileConfig>(&uncommented).unwrap();
        assert_eq!(file.llm_max_body_bytes, Some(DEFAULT_LLM_MAX_BODY_BYTES));
        assert_eq!(file.max_body_bytes, Some(1024 * 1024));
    }
}
