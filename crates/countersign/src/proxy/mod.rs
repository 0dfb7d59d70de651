//! The LLM proxy: a front end that speaks the OpenAI and Anthropic APIs at `/llm/{provider}/v1/…`, so an
//! unmodified client governs every model call by changing only its base URL and API key (the Countersign
//! key, as `Authorization: Bearer` or `x-api-key`).
//!
//! Each request becomes an action through the gateway (`submit_inline`): denied answers the provider's
//! own error shape with 403 naming the rule; allowed is carried out at once on this connection (claim →
//! send → finish, streamed chunk by chunk when asked); held for approval waits on this connection until
//! decided (default, up to the rule's timeout or `Countersign-Wait`) or answers 202 at once
//! (`Countersign-Wait: 0`). An adapter only: every decision is the gateway's, and the provider key never
//! leaves the connectors.

mod relay;
mod wire;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use countersign_core::capability::Capability;
use countersign_core::domain::{Action, Approval, LLM_FORWARDED_HEADERS, LlmTarget, Target};
use countersign_core::state::ActionState;
use serde_json::{Value, json};

use crate::config::Dialect;
use crate::connectors::ConnectorError;
use crate::connectors::llm::{MAX_LLM_RESPONSE_BYTES, classify, content_type, read_all};
use crate::error::Error;
use crate::gateway::{Caller, Gateway, InlineOutcome, SubmitRequest, WaitSlot};
use crate::http::AppState;
pub use wire::Endpoint;

/// How long a client may hold its connection at most, whatever it asks for.
const MAX_HOLD: Duration = crate::gateway::MAX_WAIT;
/// The proxy's routes, merged into the v1 router (they share its middleware and state). Their bodies are read
/// only once the caller is authenticated, within the proxy's own limit (`llm_max_body_bytes`): model requests
/// carry long contexts and base64 images.
pub fn router() -> Router<AppState> {
    // One handler for every endpoint that becomes an action; only the endpoint differs.
    let action = |endpoint: Endpoint| {
        move |state: State<AppState>, provider: Provider, request: Request| async move {
            match provider {
                Ok(Path(provider)) => handle(&state, &provider, endpoint, request).await,
                Err(rejection) => bad_provider(endpoint.dialect(), &rejection),
            }
        }
    };
    Router::new()
        .route("/llm/{provider}/v1/chat/completions", post(action(Endpoint::ChatCompletions)))
        .route("/llm/{provider}/v1/completions", post(action(Endpoint::Completions)))
        .route("/llm/{provider}/v1/embeddings", post(action(Endpoint::Embeddings)))
        .route("/llm/{provider}/v1/messages", post(action(Endpoint::Messages)))
        .route("/llm/{provider}/v1/models", get(models))
        // Anthropic's SDK adds `/v1` to its base URL itself, so one pointed at `/llm/NAME/v1` (as the design
        // and the README say for both clients) asks for `/llm/NAME/v1/v1/messages`.
        .route("/llm/{provider}/v1/v1/messages", post(action(Endpoint::Messages)))
        .route("/llm/{provider}/v1/v1/models", get(models))
}

/// Any other path under `/llm/` (the router's fallback sends them here): 404 in a provider's error shape
/// (Anthropic's for a `messages` path, OpenAI's otherwise), so the SDK shows which paths exist and which base
/// URL to use. Said before authentication and the same for every provider name, so it tells no one which
/// providers exist.
pub fn no_endpoint(path: &str) -> Response {
    let dialect = if path.contains("/messages") { Dialect::Anthropic } else { Dialect::Openai };
    let message = format!(
        "no LLM proxy endpoint at {path}: point the client's base URL at /llm/PROVIDER/v1 (PROVIDER as named \
         [llm.PROVIDER] in the Countersign configuration); the proxy answers POST v1/chat/completions, \
         v1/completions, v1/embeddings and v1/messages, and GET v1/models"
    );
    wire::error(dialect, StatusCode::NOT_FOUND, &message)
}

/// The provider's name from the path, or why it cannot be read (answered in the provider's shape, not as
/// axum's plain text, so an SDK can show it).
type Provider = std::result::Result<Path<String>, axum::extract::rejection::PathRejection>;

fn bad_provider(dialect: Dialect, rejection: &axum::extract::rejection::PathRejection) -> Response {
    wire::error(dialect, StatusCode::BAD_REQUEST, &format!("the provider name in the path cannot be read: {rejection}"))
}

/// The model list: forwarded for an authenticated caller; no action.
async fn models(State(state): State<AppState>, provider: Provider, headers: HeaderMap) -> Response {
    let provider = match provider {
        Ok(Path(provider)) => provider,
        Err(rejection) => return bad_provider(Dialect::Openai, &rejection),
    };
    // Who asks first: whether a provider exists is for the orgs it serves to learn, no one else.
    let caller = match caller_for(&state, &headers, &provider).await {
        Ok(Some(caller)) => caller,
        Ok(None) => return no_provider(Dialect::Openai, &provider),
        Err(e) => return wire::from_error(Dialect::Openai, &e),
    };
    let dialect = match provider_dialect(&state.gateway, &provider, None) {
        Ok(dialect) => dialect,
        Err(response) => return *response,
    };
    // The list goes out with the provider's key: only for those who may call the provider.
    let endpoints = [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings, Endpoint::Messages];
    if let Err(e) = caller.require_model_access(endpoints.iter().map(|e| e.capability())) {
        return wire::from_error(dialect, &e);
    }
    match state.gateway.llm_models(&caller, &provider).await {
        Ok((status, content_type, body)) => raw(status, &content_type, body),
        Err(e) => upstream_failure(dialect, &e),
    }
}

/// The provider's dialect, when it is configured and (for an action endpoint) speaks this endpoint's.
fn provider_dialect(gateway: &Gateway, provider: &str, endpoint: Option<Endpoint>) -> Result<Dialect, Box<Response>> {
    let wanted = endpoint.map(Endpoint::dialect);
    match (gateway.llm_dialect(provider), wanted) {
        (Some(dialect), None) => Ok(dialect),
        (Some(dialect), Some(wanted)) if dialect == wanted => Ok(dialect),
        (Some(dialect), Some(wanted)) => Err(Box::new(wire::error(
            wanted,
            StatusCode::NOT_FOUND,
            &format!("provider `{provider}` speaks the {} API, which has no such endpoint", dialect.as_str()),
        ))),
        (None, wanted) => Err(Box::new(no_provider(wanted.unwrap_or(Dialect::Openai), provider))),
    }
}

/// 404 for a provider that is not configured, or not for the caller's org (the same answer for both).
fn no_provider(dialect: Dialect, provider: &str) -> Response {
    wire::error(
        dialect,
        StatusCode::NOT_FOUND,
        &format!("no model provider `{provider}` is configured under [llm] on this server"),
    )
}

/// The caller, when its org may use the provider (its `orgs` in the configuration).
async fn caller_for(state: &AppState, headers: &HeaderMap, provider: &str) -> Result<Option<Caller>, Error> {
    let caller = authenticate(&state.gateway, headers).await?;
    let serves = state.gateway.serves(caller.org_id(), crate::connectors::Service::Llm(provider)).await?;
    Ok(serves.then_some(caller))
}

async fn authenticate(gateway: &Gateway, headers: &HeaderMap) -> Result<Caller, Error> {
    let secret = crate::http::auth::presented_secret_in(headers)?;
    let caller = gateway.authenticate(secret).await?;
    gateway.check_rate(&caller)?;
    Ok(caller)
}

/// `Countersign-Wait`: absent holds up to the rule's timeout; 0 answers 202 at once; else seconds to hold.
fn requested_wait(headers: &HeaderMap) -> Result<Option<Duration>, Error> {
    let Some(value) = headers.get("countersign-wait") else { return Ok(None) };
    let seconds = value.to_str().ok().and_then(|text| text.trim().parse::<f64>().ok()).unwrap_or(f64::NAN);
    crate::gateway::wait_seconds("Countersign-Wait", seconds).map(Some)
}

/// The client's headers that pick provider API versions and beta features, passed on with the request.
fn forwarded_headers(headers: &HeaderMap) -> Result<std::collections::BTreeMap<String, String>, Error> {
    let mut out = std::collections::BTreeMap::new();
    for name in LLM_FORWARDED_HEADERS {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().map(str::trim))
            .collect::<Result<_, _>>()
            .map_err(|_| Error::bad_request(name, "must be visible ASCII text"))?;
        if !values.is_empty() {
            out.insert(name.to_owned(), values.join(","));
        }
    }
    Ok(out)
}

/// `Countersign-Reasoning` as JSON when it is JSON, else as a JSON string; by default the proxy says so.
fn reasoning(headers: &HeaderMap) -> String {
    match headers.get("countersign-reasoning").and_then(|v| v.to_str().ok()).map(str::trim) {
        Some(text) if !text.is_empty() => match serde_json::from_str::<Value>(text) {
            Ok(_) => text.to_owned(),
            Err(_) => Value::String(text.to_owned()).to_string(),
        },
        _ => json!({"source": "llm-proxy"}).to_string(),
    }
}

async fn handle(state: &AppState, provider: &str, endpoint: Endpoint, request: Request) -> Response {
    // Every answer in the endpoint's shape (the provider's, once it is known to speak it), so the SDK raises
    // its usual error.
    let dialect = endpoint.dialect();
    let headers = request.headers().clone();
    let answer = async {
        // Who is asking first: an unauthenticated or rate-limited caller never gets a body read, and whether
        // a provider exists is for the orgs it serves to learn, no one else.
        let Some(caller) = caller_for(state, &headers, provider).await? else {
            return Ok(no_provider(dialect, provider));
        };
        if let Err(response) = provider_dialect(&state.gateway, provider, Some(endpoint)) {
            return Ok(*response);
        }
        let body = read_body(request, state.llm_max_body_bytes).await?;
        governed(&state.gateway, &caller, provider, endpoint, dialect, &headers, &body).await
    };
    match answer.await {
        Ok(response) => response,
        Err(e) => wire::from_error(dialect, &e),
    }
}

/// The request body, read up to `limit` bytes (more is a 413 naming the setting; nothing is recorded).
async fn read_body(mut request: Request, limit: usize) -> Result<Bytes, Error> {
    DefaultBodyLimit::max(limit).apply(&mut request);
    match Bytes::from_request(request, &()).await {
        Ok(body) => Ok(body),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(Error::PayloadTooLarge(format!(
            "the request body is over the LLM proxy's limit of {limit} bytes (llm_max_body_bytes in the Countersign \
             configuration)"
        ))),
        Err(rejection) => {
            Err(Error::bad_request("body", format!("the request body could not be read: {}", rejection.body_text())))
        }
    }
}

async fn governed(
    gateway: &Gateway,
    caller: &Caller,
    provider: &str,
    endpoint: Endpoint,
    dialect: Dialect,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, Error> {
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| Error::bad_request("body", format!("request body is not valid JSON: {e}")))?;
    if !request.is_object() {
        return Err(Error::bad_request("body", "the request body must be a JSON object"));
    }
    // The client's clock started about now: a held call must answer before its own timeout runs out.
    let arrived = tokio::time::Instant::now();
    let wait = requested_wait(headers)?;
    let immediate = wait.is_some_and(|w| w.is_zero());
    let stream = request.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let capability = Capability::parse(endpoint.capability()).map_err(|e| Error::Internal(e.to_string()))?;
    let forwarded = forwarded_headers(headers)?;
    let mut params = wire::params(provider, &request);
    // So a rule can match a beta feature or API version, too; always set, so a body field of that name
    // cannot pose as headers the client sent.
    params["headers"] = json!(forwarded);
    let target = LlmTarget {
        provider: provider.to_owned(),
        path: endpoint.path().to_owned(),
        body: request,
        headers: forwarded,
        held: !immediate,
    };
    // A held call takes one of the agent's open waits once the verdict is known and before it is recorded
    // (`SubmitOutcome::slot`): past the limit it is refused (429 in the provider's shape, which SDKs retry
    // later) with nothing recorded and no approver paged. A call the policy allows or denies takes none.
    let mut outcome = gateway
        .submit_inline(
            caller,
            SubmitRequest {
                capability,
                params,
                reasoning: reasoning(headers),
                target: Some(Target::Llm(target)),
                idempotency_key: None,
            },
        )
        .await?;
    let slot = outcome.slot.take();
    let action = outcome.action;
    let response = match action.state {
        ActionState::Executing if outcome.claimed => carry_out(gateway, dialect, action.clone(), stream, None).await?,
        ActionState::PendingApproval => {
            let approval =
                outcome.approval.ok_or_else(|| Error::Internal("a pending action has no approval".into()))?;
            let token = outcome.token.unwrap_or_default();
            if let Some(slot) = slot {
                let until_expiry = (approval.expires_at - gateway.now()).to_std().unwrap_or_default();
                // A little past the deadline, so the expiry lands while this connection still waits; and
                // never past the client's own timeout, after which it would retry (a second action) and
                // never read this answer.
                let limit = hold_limit(wait.unwrap_or(until_expiry + Duration::from_secs(1)), headers);
                let decided = gateway
                    .wait_action_holding(&slot, caller, &action.id, limit, |a| a.state != ActionState::PendingApproval)
                    .await?;
                // A credential revoked during the hold gets neither the call carried out on its connection
                // nor its answer (an approved call is then carried out by its job, as for a client that left).
                let secret = crate::http::auth::presented_secret_in(headers)?;
                gateway.still_stands(secret).await?;
                match decided.state {
                    ActionState::PendingApproval => hold_ran_out(gateway, dialect, &decided, &approval, &token, limit),
                    ActionState::Approved => {
                        // What is left of the client's time, less the margin: a call approved late in a hold
                        // answers 504 when it would run past it, rather than leave the SDK to time out and
                        // send it again (a second action, for approval again). A header too large to add
                        // to the clock sets none.
                        let deadline = client_deadline(arrived, headers);
                        // Approved with less than a second of it left: not sent from here at all; its job
                        // carries it out (after the grace period), and the answer says where to find it.
                        if deadline.is_some_and(|d| d <= tokio::time::Instant::now() + Duration::from_secs(1)) {
                            approved_too_late(gateway, dialect, &decided, &approval, &token)
                        } else {
                            let response =
                                execute(gateway, caller, secret, dialect, &decided, stream, slot, deadline).await?;
                            no_retry_if_failed(response)
                        }
                    }
                    ActionState::Executing | ActionState::Succeeded | ActionState::Failed => {
                        no_retry_if_failed(stored_answer(gateway, caller, secret, dialect, &decided, &slot).await?)
                    }
                    _ => denied(dialect, &decided),
                }
            } else {
                pending(gateway, &action, &approval, &token)
            }
        }
        _ => denied(dialect, &action),
    };
    Ok(with_action_id(response, &action))
}

fn with_action_id(mut response: Response, action: &Action) -> Response {
    if let Ok(value) = HeaderValue::from_str(action.id.as_str()) {
        response.headers_mut().insert("countersign-action-id", value);
    }
    response
}

/// 403 in the provider's shape, naming the rule; for every way an action ends without being sent.
fn denied(dialect: Dialect, action: &Action) -> Response {
    let verdict = action.verdict.as_ref();
    let rule = verdict.map(|v| v.rule.as_str()).unwrap_or("default");
    let message = match action.state {
        ActionState::Denied if action.approval_id.is_some() => {
            format!("Countersign: an approver denied this request (held by rule `{rule}`); action {}", action.id)
        }
        ActionState::Expired => {
            format!("Countersign: the approval for rule `{rule}` expired before anyone decided; action {}", action.id)
        }
        ActionState::Cancelled => format!("Countersign: action {} was cancelled (rule `{rule}`)", action.id),
        _ => {
            let why =
                verdict.and_then(|v| v.message.clone()).unwrap_or_else(|| "the policy denies this request".into());
            format!("Countersign denied this request by rule `{rule}`: {why}")
        }
    };
    wire::error(dialect, StatusCode::FORBIDDEN, &message)
}

/// 202 for `Countersign-Wait: 0`: how to follow the approval.
fn pending(gateway: &Gateway, action: &Action, approval: &Approval, token: &str) -> Response {
    let body = pending_body(gateway, action, approval, token, None);
    (StatusCode::ACCEPTED, axum::Json(body)).into_response()
}

/// The body that says how to follow a held call's approval: `{error: {type: "approval_required", message,
/// policy, agent}, action_id, approval_id, approval_token, poll_url, expires_at}`, its message saying how
/// long the call was held when that ran out.
fn pending_body(gateway: &Gateway, action: &Action, approval: &Approval, token: &str, held: Option<Duration>) -> Value {
    let verdict = action.verdict.as_ref();
    let rule = verdict.map(|v| v.rule.as_str()).unwrap_or("default");
    let why = verdict.and_then(|v| v.message.clone()).unwrap_or_else(|| "this request needs a human approval".into());
    let poll_url = gateway.poll_url_for(token);
    let message = match held {
        None => format!("Countersign holds this request for approval by rule `{rule}`: {why}"),
        Some(held) => format!(
            "Countersign held this request {}s for approval by rule `{rule}` ({why}) and no one has decided yet; \
             it stays pending until {}: follow it at {poll_url}, whose /result holds the answer once approved \
             (or send Countersign-Wait: 0 to be answered at once)",
            held.as_secs(),
            approval.expires_at.to_rfc3339()
        ),
    };
    json!({
        "error": {"type": "approval_required", "message": message, "policy": rule, "agent": action.agent_name},
        "action_id": action.id,
        "approval_id": approval.id,
        "approval_token": token,
        "poll_url": poll_url,
        "expires_at": approval.expires_at.to_rfc3339(),
    })
}

/// A hold that ran out undecided: 504 in the provider's shape (for Anthropic's, `type: "error"` beside the
/// same fields), carrying how to follow the approval, with `x-should-retry: false`. SDKs read a 2xx as the
/// model's answer (a 202 would be an empty completion, or an empty stream), and would retry a 5xx, which
/// records a second action and pages the approvers again; this one raises their error with the message.
fn hold_ran_out(
    gateway: &Gateway,
    dialect: Dialect,
    action: &Action,
    approval: &Approval,
    token: &str,
    held: Duration,
) -> Response {
    not_carried_out(dialect, pending_body(gateway, action, approval, token, Some(held)))
}

/// 504 for a held call this connection does not carry out (its body one of [`pending_body`]'s), in the
/// provider's shape (Anthropic's `type: "error"` added) with `x-should-retry: false`: a retry would be a new
/// action, held for approval again.
fn not_carried_out(dialect: Dialect, mut body: Value) -> Response {
    if dialect == Dialect::Anthropic {
        body["type"] = json!("error");
    }
    let mut response = (StatusCode::GATEWAY_TIMEOUT, axum::Json(body)).into_response();
    response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    response
}

/// A held call approved with too little of the client's time left to carry it out here: 504 in the
/// provider's shape with `x-should-retry: false`, saying its job carries it out and where its answer will be.
fn approved_too_late(
    gateway: &Gateway,
    dialect: Dialect,
    action: &Action,
    approval: &Approval,
    token: &str,
) -> Response {
    let mut body = pending_body(gateway, action, approval, token, None);
    let poll_url = gateway.poll_url_for(token);
    body["error"]["type"] = json!("approved_too_late");
    body["error"]["message"] = json!(format!(
        "Countersign: this request was approved just before the client's own timeout, too late to carry it out \
         on this connection; its job carries it out, and {poll_url}/result will hold the provider's answer"
    ));
    not_carried_out(dialect, body)
}

/// How long a held call may wait on its connection: what it asked for (or its approval's deadline), at most
/// [`MAX_HOLD`], and ending before the client's own timeout when the client says it, by a tenth of it (at
/// least 1 s, at most 5 s, never more than half), so the answer arrives while the client still reads: the
/// client's clock started before the request was sent, authenticated and recorded. OpenAI's and Anthropic's SDKs send it in
/// seconds (600 by default): `x-stainless-read-timeout`, how long they wait for a byte, which a hold never
/// sends, and `x-stainless-timeout` (Anthropic's, the whole call); the shorter counts.
fn hold_limit(asked: Duration, headers: &HeaderMap) -> Duration {
    let limit = asked.min(MAX_HOLD);
    match client_timeout(headers) {
        Some(client) => limit.min(client - client_margin(client)),
        None => limit,
    }
}

/// The client's own timeout, when its SDK says it: the shorter of the two headers, a positive number of
/// seconds.
fn client_timeout(headers: &HeaderMap) -> Option<Duration> {
    ["x-stainless-read-timeout", "x-stainless-timeout"]
        .into_iter()
        .filter_map(|name| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok())
        .filter_map(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .filter(|timeout| !timeout.is_zero())
        .min()
}

/// When the client will have stopped waiting, less the margin, for a request that arrived at `arrived`; none
/// when it does not say, or says a time too large to add to the clock.
fn client_deadline(arrived: tokio::time::Instant, headers: &HeaderMap) -> Option<tokio::time::Instant> {
    client_timeout(headers).and_then(|client| arrived.checked_add(client - client_margin(client)))
}

/// How long before the client's timeout its answer must be on its way.
fn client_margin(client: Duration) -> Duration {
    (client / 10).clamp(Duration::from_secs(1), Duration::from_secs(5)).min(client / 2)
}

/// Carries out an approved request on this connection, or, when the execution job took it first,
/// answers with what the job stored. The hold's open wait (`slot`) ends once it is carried out here, or is
/// kept for the wait for the job's answer.
#[allow(clippy::too_many_arguments)]
async fn execute(
    gateway: &Gateway,
    caller: &Caller,
    secret: &str,
    dialect: Dialect,
    action: &Action,
    stream: bool,
    slot: WaitSlot,
    deadline: Option<tokio::time::Instant>,
) -> Result<Response, Error> {
    let Some(action) = gateway.claim_inline(caller, &action.id).await? else {
        return stored_answer(gateway, caller, secret, dialect, action, &slot).await;
    };
    drop(slot);
    carry_out(gateway, dialect, action, stream, deadline).await
}

/// A held call's failed answer (502, 504) with `x-should-retry: false`: its approval was spent on it, and a
/// retry would be a new action, held for approval again.
fn no_retry_if_failed(mut response: Response) -> Response {
    if response.status().is_server_error() {
        response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    }
    response
}

/// Sends a request claimed for this connection, relays or reads the answer, and records the outcome.
/// `deadline`: when the client will have stopped waiting (a call approved after a hold); the provider's
/// response headers, and a whole non-streamed answer, must come by then, or the call is cut off and answered
/// 504 (recorded failed).
async fn carry_out(
    gateway: &Gateway,
    dialect: Dialect,
    action: Action,
    stream: bool,
    deadline: Option<tokio::time::Instant>,
) -> Result<Response, Error> {
    let provider = match &action.target {
        Some(Target::Llm(llm)) => llm.provider.clone(),
        _ => return Err(Error::Internal("a model request without its target".into())),
    };
    let started = Instant::now();
    let mut hung_up = HangUp { gateway: gateway.clone(), action: Some(action.clone()), started, stream };
    let failed = |error: &ConnectorError| InlineOutcome {
        succeeded: false,
        result: None,
        error: Some(error.to_string()),
        details: json!({"provider": provider, "latency_ms": started.elapsed().as_millis(), "streamed": stream}),
    };
    let too_late = || ConnectorError::Timeout("the provider had not answered by the client's own timeout".into());
    let sent = async {
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, gateway.send_inline(&action, stream))
                .await
                .unwrap_or_else(|_| Err(too_late())),
            None => gateway.send_inline(&action, stream).await,
        }
    };
    // A stream's first chunk waits for the claim to be on disk: that sync runs while the request is out, so
    // the client waits for the longer of the two instead of both.
    let (sent, claim_durable) = match stream {
        true => tokio::join!(sent, gateway.inline_durable()),
        false => (sent.await, Ok(())),
    };
    let (response, idle) = match sent {
        Ok(sent) => sent,
        Err(e) => {
            hung_up.disarm();
            finish(gateway, &action, failed(&e)).await?;
            return Ok(upstream_failure(dialect, &e));
        }
    };
    let status = response.status().as_u16();
    let content_type = content_type(&response);
    if stream && (200..300).contains(&status) && content_type.starts_with("text/event-stream") {
        // Nothing reaches the client before the claim is on disk.
        claim_durable?;
        let recorder = relay::Recorder::new(
            gateway.clone(),
            action.clone(),
            provider.clone(),
            dialect,
            status,
            content_type.clone(),
            started,
        );
        // From here the recorder answers for the outcome, a hang-up included.
        hung_up.disarm();
        let drop_usage = match &action.target {
            Some(Target::Llm(llm)) => gateway.llm_adds_stream_usage(llm),
            _ => false,
        };
        let body = relay::relay(response, recorder, idle, drop_usage);
        let mut answer = Response::new(body);
        *answer.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        answer.headers_mut().insert(header::CONTENT_TYPE, header_value(&content_type));
        answer.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(answer);
    }
    let idle =
        deadline.map_or(idle, |deadline| idle.min(deadline.saturating_duration_since(tokio::time::Instant::now())));
    let body = match tokio::time::timeout(idle, read_all(response, MAX_LLM_RESPONSE_BYTES)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            hung_up.disarm();
            finish(gateway, &action, failed(&e)).await?;
            return Ok(upstream_failure(dialect, &e));
        }
        Err(_) => {
            hung_up.disarm();
            let e = ConnectorError::Timeout(format!("the provider's answer took over {}s", idle.as_secs()));
            finish(gateway, &action, failed(&e)).await?;
            return Ok(upstream_failure(dialect, &e));
        }
    };
    hung_up.disarm();
    let answer = classify(dialect, status, &content_type, &body);
    let mut details = answer.details.clone();
    details["provider"] = json!(provider);
    details["latency_ms"] = json!(started.elapsed().as_millis());
    details["streamed"] = json!(false);
    let error = answer.error.clone();
    // Durable before the agent sees the answer: a failed record is an error, not an answer.
    finish(
        gateway,
        &action,
        InlineOutcome { succeeded: answer.succeeded, result: Some(answer.result), error, details },
    )
    .await?;
    Ok(answer_response(dialect, status, &content_type, body, answer.succeeded))
}

/// Records an inline outcome on a task of its own, so a client that hangs up meanwhile (hyper then drops
/// this handler) cannot cut the record off halfway; the handler still waits for it to be durable.
async fn finish(gateway: &Gateway, action: &Action, outcome: InlineOutcome) -> Result<(), Error> {
    let (gateway, action) = (gateway.clone(), action.clone());
    gateway
        .clone()
        .spawn_inline(async move { gateway.finish_inline(&action, outcome).await })
        .await
        .map_err(|e| Error::Internal(format!("recording a model call's outcome stopped: {e}")))?
}

/// Armed while a non-streamed inline call is in flight. Hyper drops the handler when the client hangs up,
/// which drops (and so cancels) the provider call; this then records the action `failed`, as a stream's
/// [`relay::Recorder`] does, instead of leaving it `executing` until its recovery job runs.
struct HangUp {
    gateway: Gateway,
    action: Option<Action>,
    started: Instant,
    stream: bool,
}

impl HangUp {
    fn disarm(&mut self) {
        self.action = None;
    }
}

impl Drop for HangUp {
    fn drop(&mut self) {
        let Some(action) = self.action.take() else { return };
        let provider = match &action.target {
            Some(Target::Llm(llm)) => llm.provider.clone(),
            _ => String::new(),
        };
        let outcome = InlineOutcome {
            succeeded: false,
            result: None,
            error: Some("the client disconnected before the provider answered; the provider call was cancelled".into()),
            details: json!({"provider": provider, "latency_ms": self.started.elapsed().as_millis(),
                            "streamed": self.stream, "client_disconnected": true}),
        };
        let gateway = self.gateway.clone();
        // Outside a runtime (the process is ending) there is nothing to run it on; the recovery job settles it.
        if tokio::runtime::Handle::try_current().is_ok() {
            gateway.clone().spawn_inline(async move {
                if let Err(e) = gateway.finish_inline(&action, outcome).await {
                    tracing::error!(action = %action.id, error = %e, "cannot record a model call the client left");
                }
            });
        }
    }
}

/// The provider's answer as the agent gets it: a success or the provider's own 4xx verbatim; a provider
/// failure (5xx, or a success that is not valid JSON) as 502 in the provider's shape.
fn answer_response(dialect: Dialect, status: u16, content_type: &str, body: Vec<u8>, succeeded: bool) -> Response {
    if succeeded || (400..500).contains(&status) {
        return raw(status, content_type, body);
    }
    let message = if (200..300).contains(&status) {
        "the model provider answered with a body that is not valid JSON".to_owned()
    } else {
        format!("the model provider answered {status}")
    };
    wire::error(dialect, StatusCode::BAD_GATEWAY, &format!("Countersign: {message}"))
}

/// Once the execution job carried the request out: its stored answer (waiting for it to finish).
async fn stored_answer(
    gateway: &Gateway,
    caller: &Caller,
    secret: &str,
    dialect: Dialect,
    action: &Action,
    slot: &WaitSlot,
) -> Result<Response, Error> {
    let action = gateway.wait_action_holding(slot, caller, &action.id, MAX_HOLD, Action::is_terminal).await?;
    // That wait can be long too: the answer goes only to a credential that still stands.
    gateway.still_stands(secret).await?;
    Ok(recorded_answer(dialect, &action))
}

/// The answer an action's record holds, in the provider's shape: what the job stored, or why there is none.
/// A body cut at the stored size cap is not relayed as if whole (a 200 with broken JSON or a stream without
/// its end): 502 saying so.
fn recorded_answer(dialect: Dialect, action: &Action) -> Response {
    let result = action.result.as_ref();
    if result.and_then(|r| r.get("truncated")).and_then(Value::as_bool) == Some(true) {
        return wire::error(
            dialect,
            StatusCode::BAD_GATEWAY,
            &format!(
                "Countersign: action {} was carried out by its job, not on this connection, and the provider's \
                 answer was larger than the {} bytes kept on the action, so it cannot be relayed whole; the call \
                 was made (see /v1/actions/{})",
                action.id,
                crate::connectors::MAX_RESULT_BODY_BYTES,
                action.id
            ),
        );
    }
    let status = result.and_then(|r| r.get("status")).and_then(Value::as_u64).unwrap_or(0);
    let status = u16::try_from(status).unwrap_or(0);
    let content_type = result
        .and_then(|r| r.pointer("/headers/content-type"))
        .and_then(Value::as_str)
        .unwrap_or("application/json")
        .to_owned();
    let body = match result.and_then(|r| r.get("body")) {
        Some(Value::String(text)) => text.clone().into_bytes(),
        Some(value) => value.to_string().into_bytes(),
        None => Vec::new(),
    };
    match action.state {
        ActionState::Succeeded | ActionState::Failed if status != 0 => {
            answer_response(dialect, status, &content_type, body, action.state == ActionState::Succeeded)
        }
        ActionState::Failed => {
            let error = action.error.clone().unwrap_or_else(|| "the request failed".into());
            let status =
                if error.contains("timed out") { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::BAD_GATEWAY };
            wire::error(dialect, status, &format!("Countersign: {error}"))
        }
        _ => wire::error(
            dialect,
            StatusCode::GATEWAY_TIMEOUT,
            &format!("Countersign: action {} is still being carried out; see /v1/actions/{}", action.id, action.id),
        ),
    }
}

/// A provider that did not answer: 504 on a timeout, else 502, in the provider's shape.
fn upstream_failure(dialect: Dialect, error: &ConnectorError) -> Response {
    let status = match error {
        ConnectorError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    wire::error(dialect, status, &format!("Countersign could not reach the model provider: {error}"))
}

fn raw(status: u16, content_type: &str, body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response.headers_mut().insert(header::CONTENT_TYPE, header_value(content_type));
    response
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// An action as the execution job left it, with `result` stored.
    fn finished(result: Value) -> Action {
        use countersign_core::ids::{ActionId, AgentId, OrgId};
        Action {
            id: ActionId::new(),
            org_id: OrgId::new(),
            agent_id: AgentId::new(),
            agent_name: "bot".into(),
            session_id: None,
            capability: Capability::parse("llm.chat.completion").unwrap(),
            params: json!({}),
            reasoning: "{}".into(),
            target: None,
            idempotency_key: None,
            state: ActionState::Succeeded,
            verdict: None,
            approval_id: None,
            result: Some(result),
            error: None,
            request_hash: String::new(),
            created_at: chrono::Utc::now(),
            decided_at: None,
            started_at: None,
            finished_at: None,
            job_id: None,
        }
    }

    #[tokio::test]
    async fn a_stored_answer_cut_at_the_cap_is_a_502_not_a_broken_200() {
        let cut = "x".repeat(100);
        let action = finished(json!({"status": 200, "headers": {"content-type": "application/json"},
                                     "body": format!("{{\"choices\": \"{cut}"), "truncated": true}));
        let response = recorded_answer(Dialect::Openai, &action);
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains("cannot be relayed whole"), "{body}");

        let whole = finished(json!({"status": 200, "headers": {"content-type": "application/json"},
                                    "body": {"choices": []}, "truncated": false}));
        let response = recorded_answer(Dialect::Openai, &whole);
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({"choices": []}));
    }

    /// A hold ends before the client's own timeout by a tenth of it, at least 1 s and at most 5 s (never more
    /// than half); the shorter of the SDK's two headers counts; a header that is not a positive number of
    /// seconds is ignored.
    #[test]
    fn a_hold_ends_before_the_clients_timeout() {
        let hold = |asked: u64, headers: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.insert(*name, HeaderValue::from_str(value).unwrap());
            }
            hold_limit(Duration::from_secs(asked), &map)
        };
        assert_eq!(hold(900, &[]), MAX_HOLD);
        assert_eq!(hold(900, &[("x-stainless-read-timeout", "600")]), Duration::from_secs(595));
        assert_eq!(hold(900, &[("x-stainless-read-timeout", "20.0")]), Duration::from_secs(18));
        assert_eq!(hold(900, &[("x-stainless-read-timeout", "4")]), Duration::from_secs(3));
        assert_eq!(hold(900, &[("x-stainless-read-timeout", "1")]), Duration::from_millis(500));
        assert_eq!(hold(10, &[("x-stainless-timeout", "600")]), Duration::from_secs(10));
        let both = [("x-stainless-read-timeout", "600"), ("x-stainless-timeout", "30")];
        assert_eq!(hold(900, &both), Duration::from_secs(27));
        for odd in ["0", "-5", "NaN", "inf", "soon"] {
            assert_eq!(hold(60, &[("x-stainless-read-timeout", odd)]), Duration::from_secs(60), "{odd}");
        }
        // A timeout too large to add to the clock holds as asked and sets no deadline (no overflow).
        let mut huge = HeaderMap::new();
        huge.insert("x-stainless-read-timeout", HeaderValue::from_static("1e19"));
        assert_eq!(hold_limit(Duration::from_secs(60), &huge), Duration::from_secs(60));
        assert_eq!(client_deadline(tokio::time::Instant::now(), &huge), None);
        let mut four = HeaderMap::new();
        four.insert("x-stainless-read-timeout", HeaderValue::from_static("4"));
        let arrived = tokio::time::Instant::now();
        assert_eq!(client_deadline(arrived, &four), Some(arrived + Duration::from_secs(3)));
    }
}
