//! Outbound calls: the `http` connector that replays a frozen request against a configured upstream, and
//! webhook deliveries.
//!
//! One reqwest client for all of them, built on the outbound guard ([`guard`]): every address checked, the
//! connection pinned to the checked address, redirects off, connect and total timeouts, no proxy taken from
//! the environment, and a cap on how much of a response is read. Credentials come from the server
//! configuration and are added here, never from the agent. This module does not decide whether a call may
//! happen; the gateway does.

pub mod guard;
pub mod llm;
pub mod mcp;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use countersign_core::domain::HttpTarget;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::config::{LlmConfig, McpServerConfig, OrgScope, UpstreamConfig};

/// Response bodies larger than this are truncated in the stored result.
pub const MAX_RESULT_BODY_BYTES: usize = 64 * 1024;

/// How much of a webhook receiver's answer is read (and thrown away).
const MAX_WEBHOOK_RESPONSE_BYTES: usize = 16 * 1024;

/// Response headers kept on the stored result.
const KEPT_HEADERS: [&str; 4] = ["content-type", "location", "idempotency-key", "request-id"];

#[derive(Clone)]
pub struct Connectors {
    client: reqwest::Client,
    guard: Arc<guard::OutboundGuard>,
    upstreams: BTreeMap<String, UpstreamConfig>,
    /// Model providers of the LLM proxy (`[llm.NAME]`).
    llm: BTreeMap<String, LlmConfig>,
    /// Upstream MCP servers of the MCP gateway (`[mcp_servers.NAME]`).
    mcp: mcp::McpUpstreams,
}

/// A configured service a target names, whose credentials act for the orgs its `orgs` admits.
#[derive(Debug, Clone, Copy)]
pub enum Service<'a> {
    Upstream(&'a str),
    Llm(&'a str),
    Mcp(&'a str),
}

impl Service<'_> {
    /// Where it is configured, for messages: `[upstreams.payments]`.
    pub fn section(&self) -> String {
        match self {
            Service::Upstream(name) => format!("[upstreams.{name}]"),
            Service::Llm(name) => format!("[llm.{name}]"),
            Service::Mcp(name) => format!("[mcp_servers.{name}]"),
        }
    }
}

/// What an upstream answered, as stored on the action.
#[derive(Debug, Clone)]
pub struct HttpOutcome {
    pub status: u16,
    pub result: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("unknown upstream `{0}`")]
    UnknownUpstream(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("upstream did not answer: {0}")]
    Transport(String),
    /// The upstream did not answer in time.
    #[error("upstream timed out: {0}")]
    Timeout(String),
    /// The outbound guard refused the address.
    #[error("{0}")]
    Refused(String),
    /// The request went out and the connection failed before an answer: it may or may not have taken
    /// effect upstream.
    #[error("outcome unknown: the request was sent and no answer came ({0})")]
    OutcomeUnknown(String),
}

impl Connectors {
    /// `allow_private` is `network.allow_private`: the only way past the outbound guard.
    pub fn new(upstreams: BTreeMap<String, UpstreamConfig>, allow_private: &[String]) -> Result<Self, ConnectorError> {
        let guard =
            Arc::new(guard::OutboundGuard::new(allow_private).map_err(|e| ConnectorError::Invalid(e.to_string()))?);
        let client = guard::client_builder(guard.clone())
            .build()
            .map_err(|e| ConnectorError::Invalid(format!("cannot build HTTP client: {e}")))?;
        Ok(Connectors { client, guard, upstreams, llm: BTreeMap::new(), mcp: mcp::McpUpstreams::new(BTreeMap::new()) })
    }

    /// Adds the upstream MCP servers; they connect once [`Connectors::start_mcp`] runs.
    pub fn with_mcp(mut self, servers: BTreeMap<String, McpServerConfig>) -> Self {
        self.mcp = mcp::McpUpstreams::new(servers);
        self
    }

    /// The upstream MCP servers and their cached tools.
    pub fn mcp(&self) -> &mcp::McpUpstreams {
        &self.mcp
    }

    /// Starts connecting to the upstream MCP servers (HTTP ones through the outbound guard), in the
    /// background; they stop, and spawned ones are killed, on `shutdown`.
    pub fn start_mcp(&self, shutdown: &tokio_util::sync::CancellationToken, tracker: &tokio_util::task::TaskTracker) {
        self.mcp.start(self.guard.clone(), shutdown, tracker);
    }

    /// Checks a URL against the guard before a request (IP-literal hosts never reach the resolver).
    fn check(&self, url: &reqwest::Url) -> Result<(), ConnectorError> {
        self.guard.check_url(url).map(drop).map_err(|e| ConnectorError::Refused(e.to_string()))
    }

    /// Posts a webhook body; answers the receiver's status. Redirects are not followed.
    pub async fn post_webhook(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<u16, ConnectorError> {
        let url = reqwest::Url::parse(url).map_err(|e| ConnectorError::Invalid(format!("webhook URL: {e}")))?;
        self.check(&url)?;
        let mut request = self.client.post(url).timeout(timeout).body(body);
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        request = request.header("user-agent", concat!("Countersign-Webhooks/", env!("CARGO_PKG_VERSION")));
        let response = request.send().await.map_err(|e| sent_and_lost(&e.without_url()))?;
        let status = response.status().as_u16();
        // Read a little of the answer so the connection can be reused, never more.
        let mut stream = response.bytes_stream();
        let mut read = 0usize;
        while let Some(Ok(chunk)) = stream.next().await {
            read += chunk.len();
            if read >= MAX_WEBHOOK_RESPONSE_BYTES {
                break;
            }
        }
        Ok(status)
    }

    /// Which capabilities may send through an upstream; `None` for an unknown name.
    pub fn upstream_capabilities(&self, name: &str) -> Option<&crate::config::CapabilityScope> {
        self.upstreams.get(name).map(|u| &u.capabilities)
    }

    /// Which orgs may use a configured upstream, model provider or MCP server; `None` for an unknown name.
    pub fn scope(&self, service: Service<'_>) -> Option<&OrgScope> {
        match service {
            Service::Upstream(name) => self.upstreams.get(name).map(|u| &u.orgs),
            Service::Llm(name) => self.llm.get(name).map(|p| &p.orgs),
            Service::Mcp(name) => self.mcp.scope(name),
        }
    }

    /// A header the agent's target sets that the upstream's configuration sets too (a credential or a
    /// tenant): refused, so the configured value is the only one sent.
    pub fn configured_header_in<'t>(&self, target: &'t HttpTarget) -> Option<&'t str> {
        let upstream = self.upstreams.get(&target.upstream)?;
        target
            .headers
            .keys()
            .find(|name| upstream.headers.keys().any(|configured| configured.eq_ignore_ascii_case(name)))
            .map(String::as_str)
    }

    pub fn is_retry_safe(&self, name: &str) -> bool {
        self.upstreams.get(name).is_some_and(|u| u.retry_safe)
    }

    /// Sends the frozen request exactly as stored, with `Idempotency-Key: <action id>`.
    pub async fn send_http(&self, target: &HttpTarget, idempotency_key: &str) -> Result<HttpOutcome, ConnectorError> {
        let upstream = self
            .upstreams
            .get(&target.upstream)
            .ok_or_else(|| ConnectorError::UnknownUpstream(target.upstream.clone()))?;
        let base = upstream.base_url.trim_end_matches('/');
        let mut url = reqwest::Url::parse(&format!("{base}{}", target.path))
            .map_err(|e| ConnectorError::Invalid(format!("cannot build the URL: {e}")))?;
        // The path stays under the upstream's base path, whatever spelling the parser normalised.
        let base_path = reqwest::Url::parse(base)
            .map(|b| b.path().trim_end_matches('/').to_owned())
            .map_err(|e| ConnectorError::Invalid(format!("cannot read the upstream's base URL: {e}")))?;
        let under_base =
            url.path().strip_prefix(base_path.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if !under_base {
            return Err(ConnectorError::Invalid(format!(
                "target.path `{}` leaves the upstream's base path",
                target.path
            )));
        }
        self.check(&url)?;
        if !target.query.is_empty() {
            url.query_pairs_mut().extend_pairs(target.query.iter());
        }
        let method = reqwest::Method::from_bytes(target.method.as_bytes())
            .map_err(|_| ConnectorError::Invalid(format!("method `{}`", target.method)))?;
        let mut request = self
            .client
            .request(method, url)
            .timeout(Duration::from_secs(upstream.timeout_seconds.max(1)))
            .header("idempotency-key", idempotency_key);
        for (name, value) in &target.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        // Replacing, not adding: a configured header is sent once, with the configured value only.
        let mut configured = reqwest::header::HeaderMap::new();
        for (name, value) in &upstream.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ConnectorError::Invalid(format!("configured header name `{name}`")))?;
            let value = reqwest::header::HeaderValue::from_str(value.expose())
                .map_err(|_| ConnectorError::Invalid(format!("configured header `{name}` has an invalid value")))?;
            configured.insert(name, value);
        }
        request = request.headers(configured);
        if let Some(body) = &target.body {
            let bytes = serde_json::to_vec(body).map_err(|e| ConnectorError::Invalid(e.to_string()))?;
            // The body is JSON; a media type the agent or the upstream's configuration sets
            // (`application/merge-patch+json`) is kept and sent once (reqwest adds a header beside one already
            // set, it does not replace it).
            let is_type = |name: &String| name.eq_ignore_ascii_case("content-type");
            if !target.headers.keys().chain(upstream.headers.keys()).any(is_type) {
                request = request.header("content-type", "application/json");
            }
            request = request.body(bytes);
        }
        let response = request.send().await.map_err(|e| sent_and_lost(&e.without_url()))?;
        let status = response.status().as_u16();
        let headers: BTreeMap<String, String> = KEPT_HEADERS
            .iter()
            .filter_map(|name| {
                response.headers().get(*name).and_then(|v| v.to_str().ok()).map(|v| ((*name).to_owned(), v.to_owned()))
            })
            .collect();
        let mut stream = response.bytes_stream();
        let mut body = Vec::new();
        let mut truncated = false;
        // The status is the upstream's answer: a body that breaks off after it is kept as far as it came.
        let mut body_error = None;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    body_error = Some(format!("the body broke off: {}", describe(&e.without_url())));
                    truncated = true;
                    break;
                }
            };
            let room = MAX_RESULT_BODY_BYTES - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        let body_value = if truncated {
            Value::String(String::from_utf8_lossy(&body).into_owned())
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        let mut result = json!({"status": status, "headers": headers, "body": body_value, "truncated": truncated});
        if let Some(error) = body_error {
            result["body_error"] = json!(error);
        }
        Ok(HttpOutcome { status, result })
    }
}

/// A failed send: the guard's refusal when the resolver refused the name (permanent), else what went wrong.
/// A name that did not resolve is a transport failure like any other, worth another try: resolvers fail
/// for a moment.
fn transport(error: &reqwest::Error) -> ConnectorError {
    match guard::GuardError::find_in(error) {
        Some(failed @ (guard::GuardError::Lookup { .. } | guard::GuardError::NoAddresses { .. })) => {
            ConnectorError::Transport(failed.to_string())
        }
        Some(refusal) => ConnectorError::Refused(refusal.to_string()),
        None => ConnectorError::Transport(describe(error)),
    }
}

/// A failed send of a request that may have reached the upstream: only a connection that never opened (or
/// a refusal before it) is certain to have sent nothing. A timeout or a connection lost after that leaves
/// the outcome unknown, and the action says so, so nobody resubmits what may have taken effect.
fn sent_and_lost(error: &reqwest::Error) -> ConnectorError {
    if error.is_connect() || error.is_builder() || guard::GuardError::find_in(error).is_some() {
        return transport(error);
    }
    match transport(error) {
        ConnectorError::Transport(message) => ConnectorError::OutcomeUnknown(message),
        other => other,
    }
}

/// A configured URL as those who may not hold its credential see it: scheme, host and port only. Its
/// userinfo, path and query often are the credential (a Slack hook URL, an MCP server's `?token=`), and the
/// audit log, jobs and actions are read by every user (and actions by agents).
pub fn shown_url(url: &str) -> String {
    let Ok(parsed) = reqwest::Url::parse(url) else { return "[unreadable URL]".into() };
    let host = parsed.host_str().unwrap_or_default();
    let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
    let rest =
        if parsed.path() != "/" || parsed.query().is_some() || !parsed.username().is_empty() { "/…" } else { "" };
    format!("{}://{host}{port}{rest}", parsed.scheme())
}

/// `text` with every spelling of `url` (as configured, and as parsed) shown by [`shown_url`] instead.
pub fn without_url_in(text: &str, url: &str) -> String {
    let shown = shown_url(url);
    let mut text = text.replace(url, &shown);
    if let Ok(parsed) = reqwest::Url::parse(url) {
        text = text.replace(parsed.as_str(), &shown);
    }
    text
}

fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timed out".into()
    } else if error.is_connect() {
        format!("connection failed: {error}")
    } else {
        error.to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_credentials() {
        let hook = "https://hooks.slack.com/services/T0/B0/secret?x=1";
        assert_eq!(shown_url(hook), "https://hooks.slack.com/…");
        assert_eq!(shown_url("https://user:pw@example.com/"), "https://example.com/…");
        assert_eq!(shown_url("http://10.0.0.1:8080/"), "http://10.0.0.1:8080");
        assert_eq!(shown_url("not a url"), "[unreadable URL]");
        let mcp = "http://127.0.0.1:9/mcp?token=abc";
        // reqwest spells a URL as parsed: both spellings go.
        let error = format!("error sending request for url ({mcp}) and ({})", reqwest::Url::parse(mcp).unwrap());
        let shown = without_url_in(&error, mcp);
        assert!(!shown.contains("token=abc"), "{shown}");
        assert!(shown.contains("http://127.0.0.1:9/…"), "{shown}");
    }
}
