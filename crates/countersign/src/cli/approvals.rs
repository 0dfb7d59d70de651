//! `approvals list|show|approve|deny|wait` and `actions submit|get|wait|trace`, with the one wait loop both
//! share and its exit codes: 0 approved or succeeded, 1 denied, failed or cancelled, 2 expired, 3 still
//! pending or running when the timeout ran out.
//!
//! Waiting long-polls `GET /v1/actions/{id}/wait` in slices well under the client's request timeout, so
//! any `--timeout` works; it never sleeps and never decides an outcome itself.

use std::time::{Duration, Instant};

use clap::Subcommand;
use serde_json::{Value, json};

use super::output::{self, Spinner, Table, details, field, time, time_and_relative};
use super::{Ctx, Failure, Outcome, deadline_after, more, parse_json, parse_seconds};
use crate::client::Client;

/// The longest single long-poll; the client gives up on a request after 120 s.
const WAIT_SLICE: Duration = Duration::from_secs(60);

#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// List approvals, oldest pending first.
    List {
        /// pending, approved, denied, expired, cancelled or all (default: all).
        #[arg(long)]
        status: Option<String>,
        /// At most this many (1 to 1000; default 100).
        #[arg(long)]
        limit: Option<u32>,
        /// The `next_cursor` of a previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// One approval: the action, the agent's reasoning verbatim, the policy snapshot, the risk, decisions.
    Show { id: String },
    /// Approve (counts toward the quorum).
    Approve {
        id: String,
        /// A note kept with the decision and in the audit log.
        #[arg(long)]
        note: Option<String>,
    },
    /// Deny (one deny denies).
    Deny {
        id: String,
        #[arg(long)]
        note: Option<String>,
    },
    /// Wait until the approval's action is settled. Exit 0 approved or succeeded, 1 denied, failed or
    /// cancelled, 2 expired, 3 still pending when the timeout ran out.
    Wait {
        id: String,
        /// Seconds (or 90s, 15m, 1h) to wait at most.
        #[arg(long, default_value = "300", value_parser = parse_seconds)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum ActionsCommand {
    /// Submit an action (with an agent or session key). With --wait, exit codes as for `actions wait`.
    Submit {
        /// `domain.verb.entity`, e.g. payments.charge.card.
        #[arg(long)]
        capability: String,
        /// The parameters, a JSON object.
        #[arg(long)]
        params: Option<String>,
        /// The agent's account of why: JSON, or else taken as text (default: null).
        #[arg(long)]
        reasoning: Option<String>,
        /// A request to replay once approved, JSON: {"connector":"http","upstream":…,"method":…,"path":…}.
        #[arg(long)]
        target: Option<String>,
        /// Wait this long (seconds, or 90s, 15m, 1h) for the outcome.
        #[arg(long, value_parser = parse_seconds)]
        wait: Option<Duration>,
    },
    /// One action.
    Get { id: String },
    /// Wait until the action is settled. Exit 0 approved or succeeded, 1 denied, failed or cancelled,
    /// 2 expired, 3 still pending or running when the timeout ran out.
    Wait {
        id: String,
        /// Seconds (or 90s, 15m, 1h) to wait at most.
        #[arg(long, default_value = "300", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// The joint trace: the verdict with its snapshot, the decisions, the execution, the audit events.
    Trace { id: String },
}

pub async fn run_approvals(ctx: &Ctx, command: ApprovalsCommand) -> Outcome {
    let client = ctx.client()?;
    match command {
        ApprovalsCommand::List { status, limit, cursor } => {
            let page = ctx.call(client.list_approvals(status.as_deref(), limit, cursor.as_deref())).await?;
            ctx.show(&page.body, approval_table)?;
            if !ctx.json() {
                more(&page.body);
            }
            Ok(0)
        }
        ApprovalsCommand::Show { id } => {
            let approval = ctx.call(client.get_approval(&id)).await?;
            ctx.show(&approval.body, approval_view)?;
            Ok(0)
        }
        ApprovalsCommand::Approve { id, note } => {
            let decided = ctx.call(client.approve(&id, note.as_deref())).await?;
            ctx.show(&decided.body, decided_view)?;
            Ok(0)
        }
        ApprovalsCommand::Deny { id, note } => {
            let decided = ctx.call(client.deny(&id, note.as_deref())).await?;
            ctx.show(&decided.body, decided_view)?;
            Ok(0)
        }
        ApprovalsCommand::Wait { id, timeout } => {
            let approval = ctx.call(client.get_approval(&id)).await?;
            let action_id = approval.str("/action_id").to_owned();
            if action_id.is_empty() {
                return Err(Failure::Message(format!("approval {id} names no action")));
            }
            let action = wait_for_action(ctx, &client, &action_id, timeout).await?;
            finish_wait(ctx, &action, timeout)
        }
    }
}

pub async fn run_actions(ctx: &Ctx, command: ActionsCommand) -> Outcome {
    let client = ctx.client()?;
    match command {
        ActionsCommand::Submit { capability, params, reasoning, target, wait } => {
            let params = match params {
                Some(text) => parse_json("--params", &text)?,
                None => json!({}),
            };
            // Reasoning is the agent's own account: JSON when it parses, else the text itself.
            let reasoning = match reasoning {
                Some(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
                None => Value::Null,
            };
            let target = match target {
                Some(text) => parse_json("--target", &text)?,
                None => Value::Null,
            };
            let body = json!({"capability": capability, "params": params, "reasoning": reasoning, "target": target});
            let Some(wait) = wait else {
                let submitted = ctx.call(client.submit_action(&body)).await?;
                ctx.show(&submitted.body, action_view)?;
                return Ok(0);
            };
            let started = Instant::now();
            let spinner = Spinner::start(format!("submitting {capability} and waiting for its outcome"));
            let submitted = ctx.call(client.submit_action_waiting(&body, wait.min(WAIT_SLICE).as_secs_f64())).await;
            spinner.stop().await;
            let mut action = submitted?.body;
            let remaining = wait.saturating_sub(started.elapsed());
            if !is_settled(&action) && !remaining.is_zero() {
                let id = output::field(&action, "/id");
                let token = action.pointer("/approval/token").cloned();
                action = wait_for_action(ctx, &client, &id, remaining).await?;
                // The poll token is shown once, in the submit answer; keep it in the final document.
                if let (Some(token), Some(approval)) =
                    (token, action.get_mut("approval").and_then(Value::as_object_mut))
                {
                    approval.insert("token".into(), token);
                }
            }
            finish_wait(ctx, &action, wait)
        }
        ActionsCommand::Get { id } => {
            let action = ctx.call(client.get_action(&id)).await?;
            ctx.show(&action.body, action_view)?;
            Ok(0)
        }
        ActionsCommand::Wait { id, timeout } => {
            let action = wait_for_action(ctx, &client, &id, timeout).await?;
            finish_wait(ctx, &action, timeout)
        }
        ActionsCommand::Trace { id } => {
            let trace = ctx.call(client.trace_action(&id)).await?;
            ctx.show(&trace.body, trace_view)?;
            Ok(0)
        }
    }
}

/// Whether an action has reached its outcome: a terminal state, or `approved` with nothing to execute.
fn is_settled(action: &Value) -> bool {
    match action.get("state").and_then(Value::as_str) {
        Some("succeeded" | "failed" | "denied" | "expired" | "cancelled") => true,
        Some("approved") => action.get("target").is_none_or(Value::is_null),
        _ => false,
    }
}

/// The `wait` exit code of an action.
fn wait_code(action: &Value) -> u8 {
    match action.get("state").and_then(Value::as_str) {
        _ if !is_settled(action) => 3,
        Some("approved" | "succeeded") => 0,
        Some("expired") => 2,
        _ => 1,
    }
}

/// Long-polls until the action is settled or `timeout` passes; answers the last action seen.
async fn wait_for_action(ctx: &Ctx, client: &Client, id: &str, timeout: Duration) -> Result<Value, Failure> {
    let deadline = deadline_after(timeout)?;
    let spinner = Spinner::start(format!("waiting for {}", output::clean(id)));
    let result = async {
        loop {
            let slice = || deadline.saturating_duration_since(Instant::now()).min(WAIT_SLICE);
            let asked = slice();
            // Each ask (again after a 429) waits only for what is left of the deadline.
            let action = ctx.call_waiting(deadline, || client.wait_action(id, slice().as_secs_f64())).await?.body;
            if is_settled(&action) || Instant::now() >= deadline || asked.is_zero() {
                return Ok(action);
            }
        }
    }
    .await;
    spinner.stop().await;
    result
}

fn finish_wait(ctx: &Ctx, action: &Value, waited: Duration) -> Outcome {
    let code = wait_code(action);
    ctx.show(action, action_view)?;
    if code == 3 && !ctx.json() {
        output::note(&format!(
            "timed out after {}: {} is still {}",
            output::human_span(waited.as_secs()),
            field(action, "/id"),
            field(action, "/state")
        ));
    }
    Ok(code)
}

fn approval_table(page: &Value) -> String {
    let items = page.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
    if items.is_empty() {
        return "no approvals".into();
    }
    let mut table = Table::new(&["ID", "STATUS", "AGENT", "CAPABILITY", "RULE", "VOTES", "REQUESTED", "EXPIRES"]);
    for a in &items {
        table.row(vec![
            field(a, "/id"),
            field(a, "/status"),
            field(a, "/agent/name"),
            field(a, "/capability"),
            field(a, "/rule"),
            format!("{}/{}", field(a, "/approvals"), field(a, "/quorum")),
            output::relative(a, "/created_at"),
            if a.get("status").and_then(Value::as_str) == Some("pending") {
                output::relative(a, "/expires_at")
            } else {
                "-".into()
            },
        ]);
    }
    table.render()
}

fn axes(value: &Value, pointer: &str) -> String {
    match value.pointer(pointer).and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
        _ => "-".into(),
    }
}

fn risk(value: &Value, pointer: &str) -> String {
    let Some(risk) = value.pointer(pointer) else { return "-".into() };
    let score = risk.get("score").and_then(Value::as_f64).map(|s| format!("{s:.2}")).unwrap_or_else(|| "-".into());
    let reversible =
        if risk.get("reversible").and_then(Value::as_bool) == Some(false) { "irreversible" } else { "reversible" };
    let external = if risk.get("external").and_then(Value::as_bool) == Some(true) { "external" } else { "internal" };
    format!("{score} ({reversible}, {external}, {} prior successes)", field(risk, "/prior_successes"))
}

fn approval_view(a: &Value) -> String {
    let mut text = details(&[
        ("approval", field(a, "/id")),
        (
            "status",
            format!(
                "{} ({} of {} approvals, group {})",
                field(a, "/status"),
                field(a, "/approvals"),
                field(a, "/quorum"),
                field(a, "/group")
            ),
        ),
        ("action", format!("{} ({})", field(a, "/action_id"), field(a, "/action/state"))),
        ("agent", field(a, "/agent/name")),
        ("capability", field(a, "/capability")),
        ("rule", format!("{} (axes: {})", field(a, "/rule"), axes(a, "/axes"))),
        ("message", field(a, "/message")),
        ("explanation", field(a, "/explanation")),
        ("risk", risk(a, "/risk")),
        ("requested", time_and_relative(a, "/created_at")),
        ("expires", time_and_relative(a, "/expires_at")),
        ("decided", time(a, "/decided_at")),
        ("policy", field(a, "/policy_version")),
    ]);
    let sections = [
        ("parameters", a.pointer("/action/params")),
        ("reasoning (verbatim)", a.get("reasoning")),
        ("policy snapshot", a.get("snapshot")),
        ("target", a.pointer("/action/target")),
    ];
    for (title, value) in sections {
        if let Some(value) = value.filter(|v| !v.is_null()) {
            text.push_str(&format!("\n\n{title}:\n{}", output::block(value, 2)));
        }
    }
    if let Some(factors) = a.pointer("/risk/factors").and_then(Value::as_array).filter(|f| !f.is_empty()) {
        text.push_str("\n\nrisk factors:");
        for factor in factors {
            text.push_str(&format!("\n  - {}", output::clean(factor.as_str().unwrap_or_default())));
        }
    }
    text.push_str(&format!("\n\ndecisions:\n{}", decisions(a)));
    text
}

fn decisions(a: &Value) -> String {
    let list = a.get("decisions").and_then(Value::as_array).cloned().unwrap_or_default();
    if list.is_empty() {
        return "  none yet".into();
    }
    let mut table = Table::new(&["  USER", "DECISION", "COUNTED", "AT", "NOTE"]);
    for d in &list {
        table.row(vec![
            format!("  {}", field(d, "/user/name")),
            field(d, "/decision"),
            field(d, "/counted"),
            time(d, "/decided_at"),
            field(d, "/note"),
        ]);
    }
    table.render()
}

fn decided_view(a: &Value) -> String {
    let status = field(a, "/status");
    let mut line =
        format!("{}: {} ({} of {} approvals)", field(a, "/id"), status, field(a, "/approvals"), field(a, "/quorum"));
    if status == "pending" {
        line.push_str(" - more approvals needed");
    }
    line.push_str(&format!("\naction {}: {}", field(a, "/action_id"), field(a, "/action/state")));
    line
}

fn action_view(a: &Value) -> String {
    let mut pairs = vec![
        ("action", field(a, "/id")),
        ("state", field(a, "/state")),
        ("agent", field(a, "/agent/name")),
        ("capability", field(a, "/capability")),
        ("verdict", format!("{} by rule {}", field(a, "/verdict/effect"), field(a, "/verdict/rule"))),
    ];
    if a.pointer("/verdict/message").is_some_and(|m| !m.is_null()) {
        pairs.push(("message", field(a, "/verdict/message")));
    }
    if a.get("approval").is_some_and(|v| !v.is_null()) {
        pairs.push(("approval", format!("{} ({})", field(a, "/approval/id"), field(a, "/approval/status"))));
        if a.pointer("/approval/expires_at").is_some() {
            pairs.push(("expires", time_and_relative(a, "/approval/expires_at")));
        }
        if a.pointer("/approval/token").is_some() {
            pairs.push(("poll token", format!("{} (shown once)", field(a, "/approval/token"))));
            pairs.push(("poll url", field(a, "/approval/poll_url")));
        }
    }
    if a.get("result").is_some_and(|v| !v.is_null()) {
        pairs.push(("result", format!("HTTP {}", field(a, "/result/status"))));
    }
    if a.get("error").is_some_and(|v| !v.is_null()) {
        pairs.push(("error", field(a, "/error")));
    }
    pairs.push(("created", time(a, "/created_at")));
    if a.get("finished_at").is_some_and(|v| !v.is_null()) {
        pairs.push(("finished", time(a, "/finished_at")));
    }
    let mut text = details(&pairs);
    if let Some(params) = a.get("params").filter(|p| p.as_object().is_some_and(|o| !o.is_empty())) {
        text.push_str(&format!("\n\nparameters:\n{}", output::block(params, 2)));
    }
    if let Some(reasoning) = a.get("reasoning").filter(|r| !r.is_null()) {
        text.push_str(&format!("\n\nreasoning:\n{}", output::block(reasoning, 2)));
    }
    text
}

fn trace_view(t: &Value) -> String {
    let action = t.get("action").cloned().unwrap_or(Value::Null);
    let mut text = action_view(&action);
    if let Some(approval) = t.get("approval").filter(|a| !a.is_null()) {
        text.push_str(&format!(
            "\n\napproval {} ({}, {} of {}):\n{}",
            field(approval, "/id"),
            field(approval, "/status"),
            field(approval, "/approvals"),
            field(approval, "/quorum"),
            decisions(approval)
        ));
    }
    if let Some(execution) = t.get("execution").filter(|e| e.get("started_at").is_some_and(|s| !s.is_null())) {
        text.push_str(&format!(
            "\n\nexecution:\n{}",
            details(&[
                ("  started", time(execution, "/started_at")),
                ("  finished", time(execution, "/finished_at")),
                ("  status", field(execution, "/result/status")),
                ("  error", field(execution, "/error")),
            ])
        ));
    }
    let events = t.get("events").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut table = Table::new(&["  SEQ", "TIME", "ACTOR", "EVENT"]);
    for e in &events {
        table.row(vec![
            format!("  {}", field(e, "/seq")),
            time(e, "/time"),
            format!("{}:{}", field(e, "/actor/kind"), field(e, "/actor/name")),
            field(e, "/action"),
        ]);
    }
    text.push_str(&format!("\n\naudit events:\n{}", table.render()));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_codes_follow_the_state() {
        assert_eq!(wait_code(&json!({"state": "succeeded"})), 0);
        assert_eq!(wait_code(&json!({"state": "approved", "target": null})), 0);
        assert_eq!(wait_code(&json!({"state": "approved", "target": {"connector": "http"}})), 3);
        assert_eq!(wait_code(&json!({"state": "denied"})), 1);
        assert_eq!(wait_code(&json!({"state": "failed"})), 1);
        assert_eq!(wait_code(&json!({"state": "cancelled"})), 1);
        assert_eq!(wait_code(&json!({"state": "expired"})), 2);
        assert_eq!(wait_code(&json!({"state": "pending_approval"})), 3);
        assert_eq!(wait_code(&json!({"state": "executing"})), 3);
    }
}
