//! Webhooks: subscriptions, the events they receive, and delivering one event as a job.
//!
//! An event is raised inside the transaction of the change it reports ([`super::Work::emit`]); just before
//! that transaction commits, one `webhook.deliver` job per matching subscription is written with it, so an
//! event is never announced for a change that did not happen, nor lost for one that did. Each delivery is
//! signed (`Countersign-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`), goes through the outbound
//! guard, and every attempt is recorded. Failed attempts are retried by the job runner with exponential
//! backoff and jitter.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::DateTime;
use countersign_core::audit::Actor;
use countersign_core::capability::NameGlob;
use countersign_core::domain::{Action, Approval, Delivery, Job, JobKind, Webhook, WebhookFormat};
use countersign_core::ids::{DeliveryId, OrgId, WebhookId};
use countersign_core::store::Page;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use super::jobs::JobOutcome;
use super::{Caller, Gateway, Work};
use crate::error::{Error, Result};

/// The events a subscription can ask for.
pub const EVENT_TYPES: [&str; 4] = ["approval.requested", "approval.decided", "approval.expired", "action.finished"];

/// A webhook event raised in a transaction, not yet fanned out to subscriptions.
#[derive(Debug, Clone)]
pub struct Emission {
    pub org_id: OrgId,
    /// The id of the audit event that records the change.
    pub id: String,
    pub event_type: &'static str,
    pub time_us: i64,
    pub data: Value,
}

#[derive(Debug, Clone)]
pub struct WebhookRequest {
    pub url: String,
    pub events: Vec<String>,
    pub format: Option<String>,
    pub description: Option<String>,
}

/// A new subscription and its signing secret, which is shown only now.
#[derive(Debug, Clone)]
pub struct CreatedWebhook {
    pub webhook: Webhook,
    pub secret: String,
}

/// Writes the delivery jobs for what a transaction raised. Called by `Work::commit` before it commits.
pub(super) async fn enqueue_deliveries(work: &mut Work, emitted: Vec<Emission>, gateway: &Gateway) -> Result<()> {
    if emitted.is_empty() {
        return Ok(());
    }
    let now = gateway.now();
    let mut subscriptions: BTreeMap<OrgId, Vec<Webhook>> = BTreeMap::new();
    for emission in emitted {
        if !subscriptions.contains_key(&emission.org_id) {
            let hooks = work.tx.list_webhooks(&emission.org_id).await?;
            subscriptions.insert(emission.org_id.clone(), hooks);
        }
        let hooks = subscriptions.get(&emission.org_id).map(Vec::as_slice).unwrap_or_default();
        for hook in hooks.iter().filter(|h| h.wants(emission.event_type)) {
            let created_at = DateTime::from_timestamp_micros(emission.time_us).unwrap_or(now);
            let event = json!({
                "id": emission.id,
                "type": emission.event_type,
                "created_at": created_at,
                "org_id": emission.org_id,
                "data": emission.data,
            });
            let mut job = Job::new(
                emission.org_id.clone(),
                JobKind::WebhookDeliver,
                Some(hook.id.to_string()),
                json!({"webhook_id": hook.id, "event": event}),
                now,
            );
            job.max_attempts = gateway.inner.jobs.webhook_max_attempts;
            work.enqueue(&job).await?;
        }
    }
    Ok(())
}

/// What webhook events say about an action.
pub(super) fn action_data(action: &Action) -> Value {
    json!({
        "action": {
            "id": action.id,
            "agent": {"id": action.agent_id, "name": action.agent_name},
            "capability": action.capability,
            "state": action.state,
            "error": action.error,
            "result_status": action.result.as_ref().and_then(|r| r.get("status")),
            "created_at": action.created_at,
            "finished_at": action.finished_at,
        }
    })
}

/// What webhook events say about an approval, with a link to it in the dashboard.
pub(super) fn approval_data(gateway: &Gateway, approval: &Approval, action: &Action) -> Value {
    let mut data = action_data(action);
    data["approval"] = json!({
        "id": approval.id,
        "status": approval.status,
        "group": approval.group,
        "quorum": approval.quorum,
        "rule": approval.rule,
        "expires_at": approval.expires_at,
        "decided_at": approval.decided_at,
        "decisions": approval.decisions.iter().map(|d| json!({
            "user": d.user_name, "decision": d.decision, "note": d.note, "counted": d.counted,
        })).collect::<Vec<_>>(),
        "risk_score": approval.risk.score,
        "url": format!("{}/ui/approvals/{}", gateway.public_url(), approval.id),
    });
    data["action"]["reasoning"] = Value::String(action.reasoning.clone());
    data
}

/// `t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` with the subscription's secret.
pub fn signature(secret: &str, unix: i64, body: &[u8]) -> Result<String> {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|e| Error::Internal(format!("cannot key the webhook signature: {e}")))?;
    mac.update(unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!("t={unix},v1={}", hex::encode(mac.finalize().into_bytes())))
}

/// Text for Slack's mrkdwn with its three control characters escaped, so what an agent wrote (its reasoning
/// above all) shows as written and cannot mention `@channel` or pose as a link (`<https://…|Open in
/// Countersign>`) beside the real one.
fn mrkdwn_text(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The reasoning as Slack shows it: escaped, then cut to at most [`SLACK_REASONING_CHARS`] characters (Slack
/// refuses a text object over 3,000, and would post nothing), never inside an escape.
fn shown_reasoning(reasoning: &str) -> String {
    let escaped = mrkdwn_text(reasoning);
    if escaped.chars().count() <= SLACK_REASONING_CHARS {
        return escaped;
    }
    let mut cut: String = escaped.chars().take(SLACK_REASONING_CHARS - 1).collect();
    // An escape is `&`, then letters, then `;`: drop one left open at the end.
    if let Some(amp) = cut.rfind('&')
        && !cut[amp..].contains(';')
    {
        cut.truncate(amp);
    }
    cut.push('…');
    cut
}

/// Room for the agent's reasoning in Slack's context block (3,000 characters at most), beside its label.
const SLACK_REASONING_CHARS: usize = 2900;

/// A Slack incoming-webhook message for an event.
fn slack_body(event: &Value) -> Value {
    let kind = event["type"].as_str().unwrap_or("event");
    let data = &event["data"];
    let action = &data["action"];
    let field = |value: &Value, absent: &str| mrkdwn_text(value.as_str().unwrap_or(absent));
    let agent = field(&action["agent"]["name"], "an agent");
    let capability = field(&action["capability"], "?");
    let approval_url = data["approval"]["url"].as_str();
    let headline = match kind {
        "approval.requested" => format!(
            "*{agent}* asks to `{capability}` (rule `{}`) — needs {} approval(s)",
            field(&data["approval"]["rule"], "?"),
            data["approval"]["quorum"]
        ),
        "approval.decided" => {
            format!("Approval for *{agent}* `{capability}` is {}", field(&data["approval"]["status"], "?"))
        }
        "approval.expired" => format!("Approval for *{agent}* `{capability}` expired unanswered"),
        _ => format!("*{agent}* `{capability}` ended {}", field(&action["state"], "?")),
    };
    let mut text = headline.clone();
    if let Some(url) = approval_url {
        text.push_str(&format!(" <{url}|Open in Countersign>"));
    }
    let mut blocks = vec![json!({"type": "section", "text": {"type": "mrkdwn", "text": text}})];
    if kind == "approval.requested"
        && let Some(reasoning) = action["reasoning"].as_str()
    {
        let shown = shown_reasoning(reasoning);
        blocks
            .push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!("Reasoning: {shown}")}]}));
    }
    if let Some(url) = approval_url {
        blocks.push(json!({"type": "actions", "elements": [{
            "type": "button", "text": {"type": "plain_text", "text": "Review"}, "url": url,
        }]}));
    }
    json!({"text": text, "blocks": blocks})
}

fn new_secret() -> String {
    use rand::Rng;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("whsec_{}", hex::encode(bytes))
}

impl Gateway {
    pub async fn create_webhook(&self, caller: &Caller, request: WebhookRequest) -> Result<CreatedWebhook> {
        caller.require_admin()?;
        let url = reqwest::Url::parse(request.url.trim())
            .map_err(|e| Error::invalid("url", format!("`url` is not a valid URL: {e}")))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(Error::invalid("url", format!("`url` must be http or https, not `{}`", url.scheme())));
        }
        if url.host_str().is_none() {
            return Err(Error::invalid("url", "`url` has no host"));
        }
        if request.events.is_empty() {
            return Err(Error::invalid(
                "events",
                format!("`events` must name at least one of {}", EVENT_TYPES.join(", ")),
            ));
        }
        let mut events = Vec::new();
        for text in &request.events {
            let glob = NameGlob::parse(text)
                .map_err(|e| Error::invalid("events", format!("`events` entry `{text}` is invalid: {e}")))?;
            if !EVENT_TYPES.iter().any(|t| glob.matches(t)) {
                return Err(Error::invalid(
                    "events",
                    format!("`events` entry `{text}` matches no event; known events: {}", EVENT_TYPES.join(", ")),
                ));
            }
            events.push(glob);
        }
        let format = match request.format.as_deref() {
            None => WebhookFormat::Json,
            Some(text) => WebhookFormat::parse(text)
                .ok_or_else(|| Error::invalid("format", format!("`format` must be `json` or `slack`, not `{text}`")))?,
        };
        let now = self.now();
        let secret = new_secret();
        let webhook = Webhook {
            id: WebhookId::new(),
            org_id: caller.org_id().clone(),
            url: url.to_string(),
            events,
            secret: secret.clone(),
            format,
            description: request.description,
            created_at: now,
            deleted_at: None,
        };
        let mut work = self.write().await?;
        work.tx.insert_webhook(&webhook).await?;
        work.audit(
            &webhook.org_id,
            now,
            &caller.actor(),
            "webhook.created",
            Some(webhook.id.as_str()),
            json!({"url": crate::connectors::shown_url(&webhook.url), "events": webhook.events, "format": webhook.format}),
        )
        .await?;
        work.commit(self).await?;
        Ok(CreatedWebhook { webhook, secret })
    }

    pub async fn list_webhooks(&self, caller: &Caller) -> Result<Vec<Webhook>> {
        caller.require_admin()?;
        Ok(self.read().await?.list_webhooks(caller.org_id()).await?)
    }

    pub async fn get_webhook(&self, caller: &Caller, id: &WebhookId) -> Result<Webhook> {
        caller.require_admin()?;
        self.read()
            .await?
            .get_webhook(caller.org_id(), id)
            .await?
            .ok_or_else(|| Error::not_found("webhook", id.as_str()))
    }

    /// Stops new deliveries; queued ones end `cancelled` when they come up. The history stays.
    pub async fn delete_webhook(&self, caller: &Caller, id: &WebhookId) -> Result<()> {
        caller.require_admin()?;
        let org = caller.org_id().clone();
        let now = self.now();
        let mut work = self.write().await?;
        if !work.tx.delete_webhook(&org, id, now).await? {
            return Err(Error::not_found("webhook", id.as_str()));
        }
        work.audit(&org, now, &caller.actor(), "webhook.deleted", Some(id.as_str()), json!({})).await?;
        work.commit(self).await
    }

    pub async fn list_deliveries(&self, caller: &Caller, id: &WebhookId, page: &Page) -> Result<Vec<Delivery>> {
        self.get_webhook(caller, id).await?;
        Ok(self.read().await?.list_deliveries(caller.org_id(), id, page).await?)
    }

    /// One attempt to deliver a `webhook.deliver` job's event; the attempt is recorded whatever happens.
    pub(super) async fn deliver_webhook(&self, job: &Job) -> JobOutcome {
        let Some(webhook_id) = job.payload.get("webhook_id").and_then(Value::as_str).and_then(WebhookId::parse) else {
            return JobOutcome::Failed("the job names no webhook".into());
        };
        let event = job.payload.get("event").cloned().unwrap_or(Value::Null);
        let webhook = match self.read().await {
            Ok(mut tx) => tx.get_webhook(&job.org_id, &webhook_id).await,
            Err(e) => return JobOutcome::Retry(format!("store unavailable: {e}")),
        };
        let webhook = match webhook {
            Ok(Some(w)) if w.deleted_at.is_none() => w,
            Ok(_) => return JobOutcome::Cancelled("the webhook was deleted".into()),
            Err(e) => return JobOutcome::Retry(format!("store unavailable: {e}")),
        };
        let body = match webhook.format {
            WebhookFormat::Json => event.clone(),
            WebhookFormat::Slack => slack_body(&event),
        };
        let body = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => return JobOutcome::Failed(format!("cannot encode the event: {e}")),
        };
        let started = Instant::now();
        let sent = self.send_webhook(&webhook, &event, body).await;
        let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let (status, error) = match &sent {
            Ok(status) if (200..300).contains(status) => (Some(*status), None),
            Ok(status) if (300..400).contains(status) => {
                (Some(*status), Some(format!("receiver answered {status}: redirects are not followed")))
            }
            Ok(status) => (Some(*status), Some(format!("receiver answered {status}"))),
            Err(e) => (None, Some(e.to_string())),
        };
        let delivery = Delivery {
            id: DeliveryId::new(),
            org_id: job.org_id.clone(),
            webhook_id: webhook.id.clone(),
            job_id: job.id.clone(),
            event_id: event["id"].as_str().unwrap_or_default().to_owned(),
            event_type: event["type"].as_str().unwrap_or_default().to_owned(),
            attempt: job.attempts,
            status,
            latency_ms,
            error: error.clone(),
            created_at: self.now(),
        };
        if let Err(e) = self.record_delivery(&delivery, &webhook).await {
            // Every attempt is recorded: one that cannot be is tried again (receivers dedupe by event id).
            tracing::error!(error = %e, job = %job.id, "cannot record a webhook delivery; trying it again");
            return JobOutcome::Retry(format!("the delivery attempt could not be recorded: {e}"));
        }
        let outcome_label = match (&error, &sent) {
            (None, _) => "delivered",
            (Some(_), Err(SendError::Refused(_))) => "refused",
            (Some(_), _) => "failed",
        };
        self.metrics().webhook_outcome(outcome_label);
        match (error, sent) {
            (None, _) => JobOutcome::Succeeded(json!({"status": status, "attempts": job.attempts})),
            (Some(e), Err(SendError::Refused(_))) => JobOutcome::Failed(e),
            (Some(e), _) => JobOutcome::Retry(e),
        }
    }

    async fn record_delivery(&self, delivery: &Delivery, webhook: &Webhook) -> Result<()> {
        let mut work = self.write().await?;
        work.tx.insert_delivery(delivery).await?;
        if delivery.error.is_some() {
            work.audit(
                &delivery.org_id,
                delivery.created_at,
                &Actor::system(),
                "webhook.failed",
                Some(webhook.id.as_str()),
                json!({"job_id": delivery.job_id, "attempt": delivery.attempt, "status": delivery.status,
                       "error": delivery.error, "event_id": delivery.event_id}),
            )
            .await?;
        }
        work.commit(self).await
    }

    async fn send_webhook(&self, webhook: &Webhook, event: &Value, body: Vec<u8>) -> Result<u16, SendError> {
        let unix = self.now().timestamp();
        let signature = signature(&webhook.secret, unix, &body).map_err(|e| SendError::Other(e.to_string()))?;
        self.inner
            .connectors
            .post_webhook(
                &webhook.url,
                &[
                    ("content-type", "application/json".to_owned()),
                    ("countersign-signature", signature),
                    ("countersign-event", event["type"].as_str().unwrap_or_default().to_owned()),
                    ("countersign-event-id", event["id"].as_str().unwrap_or_default().to_owned()),
                ],
                body,
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| match e {
                crate::connectors::ConnectorError::Refused(reason) => SendError::Refused(reason),
                other => SendError::Other(other.to_string()),
            })
    }
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The outbound guard refused the address: retrying will not help.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_is_escaped_then_cut_to_what_slack_takes_never_mid_escape() {
        assert_eq!(shown_reasoning("a <b> & c"), "a &lt;b&gt; &amp; c");
        // 2,000 `<` escape to 8,000 characters: cut below Slack's 3,000, at a whole escape.
        let shown = shown_reasoning(&"<".repeat(2000));
        assert!(shown.chars().count() <= SLACK_REASONING_CHARS, "{}", shown.len());
        assert!(shown.ends_with("&lt;…"), "{}", &shown[shown.len() - 12..]);
        let shown = shown_reasoning(&format!("{}&", "x".repeat(2897)));
        assert_eq!(shown, format!("{}…", "x".repeat(2897)), "an escape that does not fit is dropped whole");
        let event = json!({"type": "approval.requested", "data": {"action": {"reasoning": "&".repeat(5000)}}});
        let body = slack_body(&event);
        let context = body["blocks"][1]["elements"][0]["text"].as_str().unwrap();
        assert!(context.chars().count() <= 3000, "{}", context.chars().count());
    }
}
