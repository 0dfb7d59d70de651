//! The administrative commands: `sessions`, `keys`, `agents`, `users`, `jobs` and `webhooks`. Each is one
//! call of the typed client and a table or a few aligned fields; secrets the server shows once (keys,
//! session tokens, webhook signing secrets) are printed once, with a note saying so.
//!
//! `jobs wait` long-polls like `actions wait`: exit 0 succeeded, 1 failed or cancelled, 3 still queued or
//! running when the timeout ran out. Who may do what is the server's business alone.

use std::time::{Duration, Instant};

use clap::{ArgGroup, Subcommand};
use serde_json::Value;

use super::output::{self, Spinner, Table, details, field, time};
use super::{Ctx, Failure, Outcome, deadline_after, more, parse_seconds};

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Mint a session for an agent: a short-lived token limited to capability globs.
    Create {
        /// The agent's name or id.
        #[arg(long)]
        agent: String,
        /// Lifetime: seconds or 30m, 1h, … (default 1h, at most 1d).
        #[arg(long, value_parser = parse_seconds)]
        ttl: Option<Duration>,
        /// A capability glob the session may submit (repeatable; default `*`).
        #[arg(long = "scope", num_args = 1..)]
        scopes: Vec<String>,
    },
    /// List sessions.
    List,
    /// Revoke a session.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key for an agent or a user; the secret is shown once.
    #[command(group(ArgGroup::new("owner").required(true).args(["agent", "user"])))]
    Create {
        /// The agent's name or id.
        #[arg(long)]
        agent: Option<String>,
        /// The user's name or id.
        #[arg(long)]
        user: Option<String>,
        /// When the key stops working (RFC 3339).
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Create an agent.
    Create {
        name: String,
        /// The owning user (name or id); an owner's approval does not count for their own agent.
        #[arg(long)]
        owner: Option<String>,
    },
    /// List agents.
    List,
    /// Delete (disable) an agent.
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user.
    Create {
        name: String,
        /// admin, approver or viewer.
        #[arg(long)]
        role: String,
    },
    /// List users.
    List,
    /// Delete (disable) a user.
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// action.execute, webhook.deliver, audit.export or audit.retention.
        #[arg(long)]
        kind: Option<String>,
        /// queued, running, succeeded, failed or cancelled.
        #[arg(long)]
        state: Option<String>,
        /// Only jobs about this id (an action, a webhook …).
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// One job.
    Get { id: String },
    /// Wait until a job finishes. Exit 0 succeeded, 1 failed or cancelled, 3 still queued or running.
    Wait {
        id: String,
        /// Seconds (or 90s, 15m, 1h) to wait at most.
        #[arg(long, default_value = "300", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Cancel a queued or running job (an execution already sending cannot be called back).
    Cancel { id: String },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Subscribe a URL to events; the signing secret is shown once.
    Create {
        /// The receiver's URL (http or https; checked by the server's outbound guard).
        #[arg(long)]
        url: String,
        /// An event-type glob, e.g. approval.requested or approval.* (repeatable).
        #[arg(long = "event", required = true, num_args = 1..)]
        events: Vec<String>,
        #[arg(long, value_parser = ["json", "slack"])]
        format: Option<String>,
    },
    /// List subscriptions.
    List,
    /// Delete a subscription.
    Delete { id: String },
    /// A subscription's delivery attempts, newest first.
    Deliveries {
        id: String,
        /// At most this many (1 to 1000; default 100).
        #[arg(long)]
        limit: Option<u32>,
        /// The `next_cursor` of a previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
}

fn items(page: &Value) -> Vec<Value> {
    page.get("items").and_then(Value::as_array).cloned().unwrap_or_default()
}

fn list_of(page: &Value, empty: &str, table: &mut Table, row: impl Fn(&Value) -> Vec<String>) -> String {
    for item in items(page) {
        table.row(row(&item));
    }
    if table.is_empty() { empty.to_owned() } else { table.render() }
}

fn shown_once(label: &str) -> String {
    format!("(the {label} is shown only now; keep it somewhere safe)")
}

pub async fn run_sessions(ctx: &Ctx, command: SessionsCommand) -> Outcome {
    let client = ctx.client()?;
    match command {
        SessionsCommand::Create { agent, ttl, scopes } => {
            let scopes = (!scopes.is_empty()).then_some(scopes);
            let created =
                ctx.call(client.create_session(Some(&agent), ttl.map(|t| t.as_secs()), scopes.as_deref())).await?;
            ctx.show(&created.body, |s| {
                format!(
                    "{}\n{}",
                    details(&[
                        ("session", field(s, "/id")),
                        ("agent", field(s, "/agent/name")),
                        ("scopes", scopes_of(s)),
                        ("expires", output::time_and_relative(s, "/expires_at")),
                        ("token", field(s, "/token")),
                        ("mcp url", field(s, "/mcp/url")),
                    ]),
                    shown_once("token")
                )
            })?;
            Ok(0)
        }
        SessionsCommand::List => {
            let page = ctx.call(client.list_sessions()).await?.body;
            ctx.show(&page, |p| {
                let mut table = Table::new(&["ID", "AGENT", "SCOPES", "CREATED", "EXPIRES", "REVOKED"]);
                list_of(p, "no sessions", &mut table, |s| {
                    vec![
                        field(s, "/id"),
                        field(s, "/agent/id"),
                        scopes_of(s),
                        time(s, "/created_at"),
                        time(s, "/expires_at"),
                        time(s, "/revoked_at"),
                    ]
                })
            })?;
            Ok(0)
        }
        SessionsCommand::Revoke { id } => {
            ctx.call(client.revoke_session(&id)).await?;
            ctx.done(&id, &format!("revoked session {}", output::clean(&id)))
        }
    }
}

fn scopes_of(session: &Value) -> String {
    session
        .get("scopes")
        .and_then(Value::as_array)
        .map(|s| s.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
        .unwrap_or_else(|| "-".into())
}

fn key_owner(key: &Value) -> String {
    match (key.get("agent").and_then(Value::as_str), key.get("user").and_then(Value::as_str)) {
        (Some(agent), _) => format!("agent {agent}"),
        (None, Some(user)) => format!("user {user}"),
        _ => "-".into(),
    }
}

pub async fn run_keys(ctx: &Ctx, command: KeysCommand) -> Outcome {
    let client = ctx.client()?;
    match command {
        KeysCommand::Create { agent, user, expires_at } => {
            let (kind, name) = match (agent, user) {
                (Some(agent), None) => ("agent", agent),
                (None, Some(user)) => ("user", user),
                _ => return Err(Failure::Message("give exactly one of --agent or --user".into())),
            };
            let created = ctx.call(client.create_key_expiring(kind, &name, expires_at.as_deref())).await?;
            ctx.show(&created.body, |k| {
                format!(
                    "{}\n{}",
                    details(&[
                        ("key id", field(k, "/id")),
                        ("owner", key_owner(k)),
                        ("expires", time(k, "/expires_at")),
                        ("key", field(k, "/key")),
                    ]),
                    shown_once("key")
                )
            })?;
            Ok(0)
        }
        KeysCommand::List => {
            let page = ctx.call(client.list_keys()).await?.body;
            ctx.show(&page, |p| {
                let mut table = Table::new(&["ID", "OWNER", "KEY", "CREATED", "EXPIRES", "REVOKED"]);
                list_of(p, "no keys", &mut table, |k| {
                    vec![
                        field(k, "/id"),
                        key_owner(k),
                        format!("{}…{}", field(k, "/prefix"), field(k, "/last_four")),
                        time(k, "/created_at"),
                        time(k, "/expires_at"),
                        time(k, "/revoked_at"),
                    ]
                })
            })?;
            Ok(0)
        }
        KeysCommand::Revoke { id } => {
            ctx.call(client.revoke_key(&id)).await?;
            ctx.done(&id, &format!("revoked key {}", output::clean(&id)))
        }
    }
}

pub async fn run_agents(ctx: &Ctx, command: AgentsCommand) -> Outcome {
    let client = ctx.client()?;
    match command {
        AgentsCommand::Create { name, owner } => {
            let created = ctx.call(client.create_agent_owned(&name, owner.as_deref())).await?;
            ctx.show(&created.body, |a| {
                format!(
                    "created agent {} ({})\ngive it a key with: countersign keys create --agent {}",
                    field(a, "/name"),
                    field(a, "/id"),
                    field(a, "/name")
                )
            })?;
            Ok(0)
        }
        AgentsCommand::List => {
            let page = ctx.call(client.list_agents()).await?.body;
            ctx.show(&page, |p| {
                let mut table = Table::new(&["ID", "NAME", "OWNER", "CREATED", "DISABLED"]);
                list_of(p, "no agents", &mut table, |a| {
                    vec![
                        field(a, "/id"),
                        field(a, "/name"),
                        field(a, "/owner"),
                        time(a, "/created_at"),
                        time(a, "/disabled_at"),
                    ]
                })
            })?;
            Ok(0)
        }
        AgentsCommand::Delete { id } => {
            ctx.call(client.delete_agent(&id)).await?;
            ctx.done(&id, &format!("deleted agent {}", output::clean(&id)))
        }
    }
}

pub async fn run_users(ctx: &Ctx, command: UsersCommand) -> Outcome {
    let client = ctx.client()?;
    match command {
        UsersCommand::Create { name, role } => {
            let created = ctx.call(client.create_user(&name, &role)).await?;
            ctx.show(&created.body, |u| {
                format!(
                    "created user {} ({}, {})\ngive them a key with: countersign keys create --user {}",
                    field(u, "/name"),
                    field(u, "/role"),
                    field(u, "/id"),
                    field(u, "/name")
                )
            })?;
            Ok(0)
        }
        UsersCommand::List => {
            let page = ctx.call(client.list_users()).await?.body;
            ctx.show(&page, |p| {
                let mut table = Table::new(&["ID", "NAME", "ROLE", "CREATED", "DISABLED"]);
                list_of(p, "no users", &mut table, |u| {
                    vec![
                        field(u, "/id"),
                        field(u, "/name"),
                        field(u, "/role"),
                        time(u, "/created_at"),
                        time(u, "/disabled_at"),
                    ]
                })
            })?;
            Ok(0)
        }
        UsersCommand::Delete { id } => {
            ctx.call(client.delete_user(&id)).await?;
            ctx.done(&id, &format!("deleted user {}", output::clean(&id)))
        }
    }
}

fn job_view(j: &Value) -> String {
    details(&[
        ("job", field(j, "/id")),
        ("kind", field(j, "/kind")),
        ("state", field(j, "/state")),
        ("subject", field(j, "/subject")),
        ("attempts", format!("{} of {}", field(j, "/attempts"), field(j, "/max_attempts"))),
        ("run at", time(j, "/run_at")),
        ("created", time(j, "/created_at")),
        ("started", time(j, "/started_at")),
        ("finished", time(j, "/finished_at")),
        ("progress", field(j, "/progress")),
        ("result", field(j, "/result")),
        ("error", field(j, "/error")),
    ])
}

fn job_finished(job: &Value) -> bool {
    matches!(job.get("state").and_then(Value::as_str), Some("succeeded" | "failed" | "cancelled"))
}

pub async fn run_jobs(ctx: &Ctx, command: JobsCommand) -> Outcome {
    let client = ctx.client()?;
    match command {
        JobsCommand::List { kind, state, subject, limit, cursor } => {
            let page = ctx
                .call(client.list_jobs(kind.as_deref(), state.as_deref(), subject.as_deref(), limit, cursor.as_deref()))
                .await?
                .body;
            ctx.show(&page, |p| {
                let mut table = Table::new(&["ID", "KIND", "STATE", "SUBJECT", "ATTEMPTS", "CREATED", "ERROR"]);
                list_of(p, "no jobs", &mut table, |j| {
                    vec![
                        field(j, "/id"),
                        field(j, "/kind"),
                        field(j, "/state"),
                        field(j, "/subject"),
                        format!("{}/{}", field(j, "/attempts"), field(j, "/max_attempts")),
                        time(j, "/created_at"),
                        field(j, "/error"),
                    ]
                })
            })?;
            if !ctx.json() {
                more(&page);
            }
            Ok(0)
        }
        JobsCommand::Get { id } => {
            let job = ctx.call(client.get_job(&id)).await?.body;
            ctx.show(&job, job_view)?;
            Ok(0)
        }
        JobsCommand::Wait { id, timeout } => {
            let deadline = deadline_after(timeout)?;
            let spinner = Spinner::start(format!("waiting for job {}", output::clean(&id)));
            let waited = async {
                loop {
                    let slice = || deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(60));
                    let asked = slice();
                    // Each ask (again after a 429) waits only for what is left of the deadline.
                    let job = ctx.call_waiting(deadline, || client.wait_job(&id, slice().as_secs_f64())).await?.body;
                    if job_finished(&job) || Instant::now() >= deadline || asked.is_zero() {
                        return Ok::<Value, Failure>(job);
                    }
                }
            }
            .await;
            spinner.stop().await;
            let job = waited?;
            ctx.show(&job, job_view)?;
            Ok(match job.get("state").and_then(Value::as_str) {
                Some("succeeded") => 0,
                Some("failed" | "cancelled") => 1,
                _ => {
                    if !ctx.json() {
                        output::note(&format!(
                            "timed out: job {} is still {}",
                            field(&job, "/id"),
                            field(&job, "/state")
                        ));
                    }
                    3
                }
            })
        }
        JobsCommand::Cancel { id } => {
            let job = ctx.call(client.cancel_job(&id)).await?.body;
            ctx.show(&job, job_view)?;
            Ok(0)
        }
    }
}

pub async fn run_webhooks(ctx: &Ctx, command: WebhooksCommand) -> Outcome {
    let client = ctx.client()?;
    match command {
        WebhooksCommand::Create { url, events, format } => {
            let created = ctx.call(client.create_webhook(&url, &events, format.as_deref())).await?;
            ctx.show(&created.body, |w| {
                format!(
                    "{}\n{}",
                    details(&[
                        ("webhook", field(w, "/id")),
                        ("url", field(w, "/url")),
                        ("events", events_of(w)),
                        ("format", field(w, "/format")),
                        ("signing secret", field(w, "/secret")),
                    ]),
                    shown_once("signing secret")
                )
            })?;
            Ok(0)
        }
        WebhooksCommand::List => {
            let page = ctx.call(client.list_webhooks()).await?.body;
            ctx.show(&page, |p| {
                let mut table = Table::new(&["ID", "FORMAT", "EVENTS", "CREATED", "URL"]);
                list_of(p, "no webhooks", &mut table, |w| {
                    vec![field(w, "/id"), field(w, "/format"), events_of(w), time(w, "/created_at"), field(w, "/url")]
                })
            })?;
            Ok(0)
        }
        WebhooksCommand::Delete { id } => {
            ctx.call(client.delete_webhook(&id)).await?;
            ctx.done(&id, &format!("deleted webhook {}", output::clean(&id)))
        }
        WebhooksCommand::Deliveries { id, limit, cursor } => {
            let page = ctx.call(client.webhook_deliveries(&id, limit, cursor.as_deref())).await?.body;
            ctx.show(&page, |p| {
                let mut table = Table::new(&["AT", "EVENT", "ATTEMPT", "STATUS", "LATENCY", "JOB", "ERROR"]);
                list_of(p, "no deliveries yet", &mut table, |d| {
                    vec![
                        time(d, "/created_at"),
                        field(d, "/event_type"),
                        field(d, "/attempt"),
                        field(d, "/status"),
                        format!("{} ms", field(d, "/latency_ms")),
                        field(d, "/job_id"),
                        field(d, "/error"),
                    ]
                })
            })?;
            if !ctx.json() {
                more(&page);
            }
            Ok(0)
        }
    }
}

fn events_of(webhook: &Value) -> String {
    webhook
        .get("events")
        .and_then(Value::as_array)
        .map(|s| s.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
        .unwrap_or_else(|| "-".into())
}
