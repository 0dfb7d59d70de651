//! What the templates show, computed in Rust: relative times, parameters flattened into labelled fields,
//! JSON and YAML made readable, one row per approval. Templates escape every value; nothing here builds HTML.

use askama::Template;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use countersign_core::domain::{Action, Approval};
use serde_json::Value;

use super::session::UiUser;
use crate::error::Error;

/// Renders a template as an HTML response with the dashboard's security headers.
pub fn render<T: Template>(status: StatusCode, template: &T) -> Response {
    match template.render() {
        Ok(html) => {
            let mut response = (status, axum::response::Html(html)).into_response();
            let headers = response.headers_mut();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                     frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
                ),
            );
            headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            response
        }
        Err(e) => Error::Internal(format!("a dashboard template did not render: {e}")).into_response(),
    }
}

/// A refusal the user should read next to the form that caused it (bad input, not allowed, wrong state),
/// as its status and message; anything else stays an error.
pub fn shown(error: Error) -> Result<(StatusCode, String), Error> {
    match error {
        e @ (Error::Forbidden(_) | Error::Conflict { .. } | Error::BadRequest { .. } | Error::Invalid { .. }) => {
            let status = StatusCode::from_u16(e.kind().table().1).unwrap_or(StatusCode::BAD_REQUEST);
            Ok((status, e.to_string()))
        }
        other => Err(other),
    }
}

/// Why this user's forms that need the admin role are disabled; the gateway's own answer, so the page and
/// the refusal say the same thing.
pub fn admin_block(ui: &UiUser) -> Option<String> {
    ui.caller.require_admin().err().map(|e| e.to_string())
}

/// `a, b c` or one per line → `["a", "b", "c"]`.
pub fn list_of(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c.is_whitespace()).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

pub fn opt_clock(t: Option<DateTime<Utc>>) -> String {
    t.map(clock).unwrap_or_default()
}

/// `2026-11-23 10:04:05 UTC`
pub fn clock(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// RFC 3339, for `<time datetime>`.
pub fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A span of time in its largest units: `45s`, `3m 20s`, `2h 5m`, `4d 1h`.
pub fn span(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// One labelled value: `target.body.amount` = `1200`.
pub struct Field {
    pub label: String,
    pub value: String,
    /// Nesting depth, for indentation.
    pub depth: usize,
}

/// Flattens a JSON value into labelled fields, one per leaf, with the path as its label; objects and arrays
/// also get a heading row so the nesting stays visible.
pub fn fields(value: &Value) -> Vec<Field> {
    let mut out = Vec::new();
    flatten(value, String::new(), 0, &mut out);
    out
}

fn flatten(value: &Value, label: String, depth: usize, out: &mut Vec<Field>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            if !label.is_empty() {
                out.push(Field { label: label.clone(), value: String::new(), depth });
            }
            let child_depth = if label.is_empty() { depth } else { depth + 1 };
            for (key, child) in map {
                let key = crate::text::reveal(key);
                let child_label = if label.is_empty() { key } else { format!("{label}.{key}") };
                flatten(child, child_label, child_depth, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            out.push(Field { label: label.clone(), value: String::new(), depth });
            for (i, child) in items.iter().enumerate() {
                flatten(child, format!("{label}[{i}]"), depth + 1, out);
            }
        }
        Value::String(text) => out.push(Field { label, value: crate::text::reveal(text), depth }),
        other => out.push(Field { label, value: other.to_string(), depth }),
    }
}

pub fn pretty_json(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// The policy rule as it was, in the YAML it was written in (JSON if it cannot be shown as YAML).
pub fn yaml(value: &Value) -> String {
    yaml_serde::to_string(value).unwrap_or_else(|_| pretty_json(value))
}

/// One approval as a row of the queue or the history.
pub struct ApprovalRow {
    pub id: String,
    pub agent: String,
    pub capability: String,
    pub rule: String,
    pub axes: String,
    pub status: String,
    pub age: String,
    pub requested: String,
    pub requested_iso: String,
    pub expires_in: String,
    pub decided: String,
    pub progress: String,
    pub decisions: Vec<DecisionLine>,
}

/// One user's decision: who, `approved` or `denied`, their note, when, and whether it counted.
pub struct DecisionLine {
    pub who: String,
    pub verb: String,
    pub note: String,
    pub time: String,
    pub counted: bool,
}

impl ApprovalRow {
    pub fn new(approval: &Approval, action: &Action, now: DateTime<Utc>) -> ApprovalRow {
        let axes = action
            .verdict
            .as_ref()
            .map(|v| {
                v.axes
                    .iter()
                    .filter_map(|a| serde_json::to_value(a).ok().and_then(|v| v.as_str().map(str::to_owned)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        ApprovalRow {
            id: approval.id.to_string(),
            agent: action.agent_name.clone(),
            capability: action.capability.to_string(),
            rule: approval.rule.clone(),
            axes,
            status: approval.status.as_str().to_owned(),
            age: span((now - approval.created_at).num_seconds()),
            requested: clock(approval.created_at),
            requested_iso: iso(approval.created_at),
            expires_in: if approval.expires_at > now {
                span((approval.expires_at - now).num_seconds())
            } else {
                "expired".into()
            },
            decided: approval.decided_at.map(clock).unwrap_or_default(),
            progress: format!("{}/{}", approval.counted_approvals(), approval.quorum),
            decisions: approval
                .decisions
                .iter()
                .map(|d| {
                    let verb = match d.decision {
                        countersign_core::state::Decision::Approve => "approved",
                        countersign_core::state::Decision::Deny => "denied",
                    };
                    DecisionLine {
                        who: d.user_name.clone(),
                        verb: verb.to_owned(),
                        note: d.note.clone().unwrap_or_default(),
                        time: clock(d.created_at),
                        counted: d.counted,
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_fields() {
        assert_eq!(span(5), "5s");
        assert_eq!(span(200), "3m 20s");
        assert_eq!(span(7500), "2h 5m");
        assert_eq!(span(-3), "0s");
        let f = fields(&serde_json::json!({"a": 1, "b": {"c": "x", "d": [true]}}));
        let labels: Vec<_> = f.iter().map(|f| (f.label.as_str(), f.value.as_str(), f.depth)).collect();
        assert_eq!(labels, vec![("a", "1", 0), ("b", "", 0), ("b.c", "x", 1), ("b.d", "", 1), ("b.d[0]", "true", 2)]);
    }
}
