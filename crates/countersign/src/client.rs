//! A small typed HTTP client for the v1 API, used by the integration tests and (later) the CLI.
//!
//! Each call answers an [`ApiResponse`] with the status and the JSON body, problem+json included, so
//! callers can assert on both. It does not retry and holds no state beyond the base URL and the key.

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

#[derive(Debug, thiserror::Error)]
#[error("request failed: {0}")]
pub struct ClientError(String);

#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: impl Into<String>, key: Option<String>) -> Result<Self, ClientError> {
        crate::server::install_crypto_provider();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ClientError(e.to_string()))?;
        Ok(Client { base: base.into().trim_end_matches('/').to_owned(), key, http })
    }

    /// The same server, another credential.
    pub fn with_key(&self, key: impl Into<String>) -> Client {
        Client { base: self.base.clone(), key: Some(key.into()), http: self.http.clone() }
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
        self.get(&format!("/v1/actions/{id}")).await
    }

    pub async fn wait_action(&self, id: &str, timeout_seconds: f64) -> Result<ApiResponse, ClientError> {
        self.get(&format!("/v1/actions/{id}/wait?timeout={timeout_seconds}")).await
    }

    pub async fn approve(&self, approval_id: &str, note: Option<&str>) -> Result<ApiResponse, ClientError> {
        self.post(&format!("/v1/approvals/{approval_id}/approve"), &json!({"note": note})).await
    }

    pub async fn deny(&self, approval_id: &str, note: Option<&str>) -> Result<ApiResponse, ClientError> {
        self.post(&format!("/v1/approvals/{approval_id}/deny"), &json!({"note": note})).await
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
}
