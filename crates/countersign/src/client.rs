//! A small typed HTTP client for the v1 API, used by the integration tests and by the CLI (`cli/`).
//!
//! Each call answers an [`ApiResponse`] with the status and the JSON body, problem+json included, so
//! callers can assert on both; the two exceptions are the audit export (raw JSON Lines bytes) and the audit
//! stream (the open response, read as it arrives). It does not retry, does not interpret statuses, and holds
//! no state beyond the base URL and the key.

use std::time::Duration;

use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Value,
}

impl ApiResponse {
    /// A string field of the body, or "" when absent.
    pub fn str(&self, pointer: &str) -> &str {
        self.body.pointer(pointer).and_then(Value::as_str).unwrap_or_default()
    }
}

/// A response whose body is not JSON (the audit export), kept as bytes.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("request failed: {0}")]
pub struct ClientError(String);

/// Filters of the audit log (`GET /v1/audit` and `/v1/audit/stream`); `None` leaves a filter out.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub action: Option<String>,
    pub actor: Option<String>,
    pub subject: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

impl AuditQuery {
    fn pairs(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("action", self.action.clone()),
            ("actor", self.actor.clone()),
            ("subject", self.subject.clone()),
            ("since", self.since.clone()),
            ("until", self.until.clone()),
            ("limit", self.limit.map(|l| l.to_string())),
            ("cursor", self.cursor.clone()),
        ]
    }
}

/// `path?k=v&…` with the values percent-encoded; pairs whose value is `None` are left out.
pub fn with_query(path: &str, pairs: &[(&str, Option<String>)]) -> String {
    let mut serializer = reqwest::Url::parse("http://query.invalid/").ok();
    let Some(url) = serializer.as_mut() else { return path.to_owned() };
    {
        let mut query = url.query_pairs_mut();
        for (name, value) in pairs {
            if let Some(value) = value {
                query.append_pair(name, value);
            }
        }
    }
    match url.query() {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_owned(),
    }
}

/// One path segment (an id typed by a person) percent-encoded, so it cannot change the route.
fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
    /// Without a total timeout, for the audit stream; a read timeout (the server sends a keep-alive every
    /// 15 s) notices a server that went away.
    streaming: reqwest::Client,
}

impl Client {
    pub fn new(base: impl Into<String>, key: Option<String>) -> Result<Self, ClientError> {
        crate::server::install_crypto_provider();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ClientError(e.to_string()))?;
        let streaming = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError(e.to_string()))?;
        Ok(Client { base: base.into().trim_end_matches('/').to_owned(), key, http, streaming })
    }

    /// The same server, another credential.
    pub fn with_key(&self, key: impl Into<String>) -> Client {
        Client {
            base: self.base.clone(),
            key: Some(key.into()),
            http: self.http.clone(),
            streaming: self.streaming.clone(),
        }
    }

    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request; `body` is JSON when given.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<ApiResponse, ClientError> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| ClientError(e.to_string()))?;
        Self::read(response).await
    }

    /// Sends raw bytes with a content type.
    pub async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<ApiResponse, ClientError> {
        let mut request =
            self.http.request(method, format!("{}{path}", self.base)).header("content-type", content_type).body(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| ClientError(e.to_string()))?;
        Self::read(response).await
    }

    async fn read(response: reqwest::Response) -> Result<ApiResponse, ClientError> {
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let bytes = response.bytes().await.map_err(|e| ClientError(e.to_string()))?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(ApiResponse { status, content_type, body })
    }

    pub async fn get(&self, path: &str) -> Result<ApiResponse, ClientError> {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<ApiResponse, ClientError> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<ApiResponse, ClientError> {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    pub async fn submit_action(&self, body: &Value) -> Result<ApiResponse, ClientError> {
        self.post("/v1/actions", body).await
    }

    pub async fn get_action(&self, id: &str) -> Result<ApiResponse, ClientError> {
        self.get(&format!("/v1/actions/{}", segment(id))).await
    }

    pub async fn wait_action(&self, id: &str, timeout_seconds: f64) -> Result<ApiResponse, ClientError> {
        self.get(&format!("/v1/actions/{}/wait?timeout={timeout_seconds}", segment(id))).await
    }

    pub async fn approve(&self, approval_id: &str, note: Option<&str>) -> Result<ApiResponse, ClientError> {
        self.post(&format!("/v1/approvals/{}/approve", segment(approval_id)), &json!({"note": note})).await
    }

    pub async fn deny(&self, approval_id: &str, note: Option<&str>) -> Result<ApiResponse, ClientError> {
        self.post(&format!("/v1/approvals/{}/deny", segment(approval_id)), &json!({"note": note})).await
    }

    pub async fn create_agent(&self, name: &str) -> Result<ApiResponse, ClientError> {
        self.post("/v1/agents", &json!({"name": name})).await
    }

    pub async fn create_user(&self, name: &str, role: &str) -> Result<ApiResponse, ClientError> {
        self.post("/v1/users", &json!({"name": name, "role": role})).await
    }

    /// A key for an agent (`"agent"`) or a user (`"user"`), by name or id.
    pub async fn create_key(&self, kind: &str, name: &str) -> Result<ApiResponse, ClientError> {
        self.post("/v1/keys", &json!({kind: name})).await
    }

    /// Submits an action and holds the answer until it is terminal or `wait_seconds` pass (`?wait=`).
    pub async fn submit_action_waiting(&self, body: &Value, wait_seconds: f64) -> Result<ApiResponse, ClientError> {
        self.post(&format!("/v1/actions?wait={wait_seconds}"), body).await
    }

    pub async fn trace_action(&self, id: &str) -> Result<ApiResponse, ClientError> {
        self.get(&format!("/v1/actions/{}/trace", segment(id))).await
    }

    /// The approval queue; `status` is one of the approval statuses or `all` (`None`: every status).
    pub async fn list_approvals(
        &self,
        status: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<ApiResponse, ClientError> {
        let pairs = [
            ("status", status.map(str::to_owned)),
            ("limit", limit.map(|l| l.to_string())),
            ("cursor", cursor.map(str::to_owned)),
        ];
        self.get(&with_query("/v1/approvals", &pairs)).await
    }

    pub async fn get_approval(&self, id: &str) -> Result<ApiResponse, ClientError> {
        self.get(&format!("/v1/approvals/{}", segment(id))).await
    }

    pub async fn query_audit(&self, query: &AuditQuery) -> Result<ApiResponse, ClientError> {
        self.get(&with_query("/v1/audit", &query.pairs())).await
    }

    pub async fn verify_audit(&self) -> Result<ApiResponse, ClientError> {
        self.get("/v1/audit/verify").await
    }

    pub async fn audit_public_key(&self) -> Result<ApiResponse, ClientError> {
        self.get("/v1/audit/public-key").await
    }

    /// Runs an export and answers the JSON Lines file as bytes (a problem+json body on failure).
    pub async fn export_audit(&self) -> Result<RawResponse, ClientError> {
        let mut request = self.http.get(format!("{}/v1/audit/export", self.base)).timeout(Duration::from_secs(330));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| ClientError(e.to_string()))?;
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let body = response.bytes().await.map_err(|e| ClientError(e.to_string()))?.to_vec();
        Ok(RawResponse { status, content_type, body })
    }

    /// Opens the audit event stream (Server-Sent Events), resuming after `last_event_id` when given. The
    /// caller reads the body as it arrives (`bytes_stream`); a non-200 answer carries a problem body.
    pub async fn stream_audit(
        &self,
        query: &AuditQuery,
        last_event_id: Option<&str>,
    ) -> Result<reqwest::Response, ClientError> {
        let path = with_query("/v1/audit/stream", &query.pairs());
        let mut request = self.streaming.get(format!("{}{path}", self.base)).header("accept", "text/event-stream");
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        request.send().await.map_err(|e| ClientError(e.to_string()))
    }

    /// Reads a non-JSON error answer of [`Client::stream_audit`] or any other raw response as an
    /// [`ApiResponse`].
    pub async fn into_api_response(response: reqwest::Response) -> Result<ApiResponse, ClientError> {
        Self::read(response).await
    }

    /// Dry-runs the current policy against an action (`POST /v1/policy/evaluate`).
    pub async fn evaluate_policy(
        &self,
        agent: &str,
        capability: &str,
        params: &Value,
    ) -> Result<ApiResponse, ClientError> {
        self.post("/v1/policy/evaluate", &json!({"agent": agent, "capability": capability, "params": params})).await
    }

    pub async fn create_session(
        &self,
        agent: Option<&str>,
        ttl_seconds: Option<u64>,
        scopes: Option<&[String]>,
    ) -> Result<ApiResponse, ClientError> {
        self.post("/v1/sessions", &json!({"agent": agent, "ttl_seconds": ttl_seconds, "scopes": scopes})).await
    }

    pub async fn list_sessions(&self) -> Result<ApiResponse, ClientError> {
        self.get("/v1/sessions").await
    }

    pub async fn revoke_session(&self, id: &str) -> Result<ApiResponse, ClientError> {
        self.delete(&format!("/v1/sessions/{}", segment(id))).await
    }

    /// Like [`Client::create_key`], with an optional expiry (RFC 3339).
    pub async fn create_key_expiring(
        &self,
        kind: &str,
        name: &str,
        expires_at: Option<&str>,
    ) -> Result<ApiResponse, ClientError> {
        self.post("/v1/keys", &json!({kind: name, "expires_at": expires_at})).await
    }

    pub async fn list_keys(&self) -> Result<ApiResponse, ClientError> {
        self.get("/v1/keys").await
    }

    pub async fn revoke_key(&self, id: &str) -> Result<ApiResponse, ClientError> {
        self.delete(&format!("/v1/keys/{}", segment(id))).await
    }

    /// An agent owned by a user (name or id); the owner's approval never counts for its own agent.
    pub async fn create_agent_owned(&self, name: &str, owner: Option<&str>) -> Result<ApiResponse, ClientError> {
        self.post("/v1/agents", &json!({"name": name, "owner": owner})).await
    }

    pub async fn list_agents(&self) -> Result<ApiResponse, ClientError> {
        self.get("/v1/agents").await
    }

    pub async fn delete_agent(&self, id: &str) -> Result<ApiResponse, ClientError> {
        self.delete(&format!("/v1/agents/{}", segment(id))).await
    }

    pub async fn list_users(&self) -> Result<ApiResponse, ClientError> {
        self.get("/v1/users").await
    }

    pub async fn delete_user(&self, id: &str) -> Result<ApiResponse, ClientError> {
        self.delete(&format!("/v1/users/{}", segment(id))).await
    }

    pub async fn list_jobs(
        &self,
        kind: Option<&str>,
        state: Option<&str>,
        subject: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<ApiResponse, ClientError> {
        let pairs = [
            ("kind", kind.map(str::to_owned)),
            ("state", state.map(str::to_owned)),
            ("subject", subject.map(str::to_owned)),
            ("limit", limit.map(|l| l.to_string())),
            ("cursor", cursor.map(str::to_owned)),
        ];
        self.get(&with_query("/v1/jobs", &pairs)).await
    }

    pub async fn get_job(&self, id: &str) -> Result<ApiResponse, ClientError> {
        self.get(&format!("/v1/jobs/{}", segment(id))).await
    }

    pub async fn wait_job(&self, id: &str, timeout_seconds: f64) -> Result<ApiResponse, ClientError> {
        self.get(&format!("/v1/jobs/{}/wait?timeout={timeout_seconds}", segment(id))).await
    }

    pub async fn cancel_job(&self, id: &str) -> Result<ApiResponse, ClientError> {
        self.post(&format!("/v1/jobs/{}/cancel", segment(id)), &json!({})).await
    }

    pub async fn create_webhook(
        &self,
        url: &str,
        events: &[String],
        format: Option<&str>,
    ) -> Result<ApiResponse, ClientError> {
        self.post("/v1/webhooks", &json!({"url": url, "events": events, "format": format})).await
    }

    pub async fn list_webhooks(&self) -> Result<ApiResponse, ClientError> {
        self.get("/v1/webhooks").await
    }

    pub async fn delete_webhook(&self, id: &str) -> Result<ApiResponse, ClientError> {
        self.delete(&format!("/v1/webhooks/{}", segment(id))).await
    }

    pub async fn webhook_deliveries(
        &self,
        id: &str,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<ApiResponse, ClientError> {
        let pairs = [("limit", limit.map(|l| l.to_string())), ("cursor", cursor.map(str::to_owned))];
        self.get(&with_query(&format!("/v1/webhooks/{}/deliveries", segment(id)), &pairs)).await
    }
}
