//! The command-line client: `approvals`, `actions`, `audit`, `policy`, `sessions`, `keys`, `agents`,
//! `users`, `jobs` and `webhooks`, over the typed v1 client (`client.rs`), the same one the tests use.
//!
//! This module holds the clap definitions, the global options (`--url`/`COUNTERSIGN_URL`,
//! `--key`/`COUNTERSIGN_KEY`, `--key-file`/`COUNTERSIGN_KEY_FILE`, `--json`), and the one place that turns a failure into a message and an exit
//! code. Output is a table or aligned fields for people, or with `--json` the server's JSON document as is.
//! Exit codes: 0 success; 1 an error (a problem+json answer is printed as `error: <title>: <detail>`), or for
//! the `wait` commands a denied, failed or cancelled outcome; 2 a usage error (clap), or for `wait` an
//! expired approval; 3 a `wait` that timed out with the action still pending or running.
//!
//! It decides nothing: every rule is the server's (or, for `policy check` and `policy test`, the same
//! `countersign_core::policy` code the server runs). `serve` and `config example` stay in `main.rs`.

mod admin;
mod approvals;
mod audit;
mod output;
mod policy;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::client::{ApiResponse, Client, ClientError};

/// Options every client command shares. `--key` and `--json` may come before or after the subcommand;
/// `--url` comes before it (`countersign --url URL approvals list`), because `webhooks create --url` names
/// the receiver, not the server.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// The server's base URL (give it before the subcommand).
    #[arg(long, env = "COUNTERSIGN_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The API key (a user key to decide and administer, an agent key to submit). Given as a flag it shows
    /// in `ps` and shell history: prefer COUNTERSIGN_KEY or --key-file.
    #[arg(long, global = true, env = "COUNTERSIGN_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// A file holding the API key (the data dir's admin.key, say); used instead of --key and COUNTERSIGN_KEY.
    #[arg(long, global = true, env = "COUNTERSIGN_KEY_FILE")]
    pub key_file: Option<std::path::PathBuf>,
    /// Machine output: the server's JSON as is, one document (JSON Lines for `audit tail`).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The approval queue: list, show, approve, deny, wait.
    Approvals {
        #[command(subcommand)]
        command: approvals::ApprovalsCommand,
    },
    /// Actions: submit (with an agent key), get, wait, trace.
    Actions {
        #[command(subcommand)]
        command: approvals::ActionsCommand,
    },
    /// The audit log: query, tail, verify (the server's chain, or an export offline), export.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Policies: check a file and run test cases offline; explain a decision of the server's policy.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Sessions: short-lived, scoped agent credentials.
    Sessions {
        #[command(subcommand)]
        command: admin::SessionsCommand,
    },
    /// API keys for agents and users.
    Keys {
        #[command(subcommand)]
        command: admin::KeysCommand,
    },
    /// Agents.
    Agents {
        #[command(subcommand)]
        command: admin::AgentsCommand,
    },
    /// Users and their roles.
    Users {
        #[command(subcommand)]
        command: admin::UsersCommand,
    },
    /// Background jobs: executions, webhook deliveries, exports, retention.
    Jobs {
        #[command(subcommand)]
        command: admin::JobsCommand,
    },
    /// Webhook subscriptions and their delivery history.
    Webhooks {
        #[command(subcommand)]
        command: admin::WebhooksCommand,
    },
}

/// Why a command stopped without its normal output.
#[derive(Debug)]
pub enum Failure {
    /// The server answered with an error status; the body is problem+json when the server wrote it.
    Api(ApiResponse),
    /// Anything else, as a sentence.
    Message(String),
    /// Stop with this exit code and print nothing more (e.g. stdout was closed).
    Quiet(u8),
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        Failure::Message(error.to_string())
    }
}

/// What a command hands back: its exit code (0 unless a `wait` says otherwise).
pub type Outcome = Result<u8, Failure>;

/// The context of one command: the global options.
pub struct Ctx {
    remote: Remote,
}

impl Ctx {
    pub fn json(&self) -> bool {
        self.remote.json
    }

    /// A client holding the key; without one, a message that says where a key comes from.
    pub fn client(&self) -> Result<Client, Failure> {
        let from_file = match &self.remote.key_file {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                Failure::Message(format!(
                    "cannot read the key file {}: {e}",
                    output::clean(&path.display().to_string())
                ))
            })?),
            None => None,
        };
        let given = from_file.as_deref().or(self.remote.key.as_deref());
        let key = given.map(str::trim).filter(|k| !k.is_empty()).ok_or_else(|| {
            Failure::Message(
                "no API key: set COUNTERSIGN_KEY (or pass --key-file or --key) to a key of this server; the first \
                 admin key is printed by `countersign serve` at its first start and kept in the data dir as admin.key"
                    .into(),
            )
        })?;
        // A key not read from the file or the environment came as a flag: anyone on this machine can read it.
        if from_file.is_none() && std::env::var("COUNTERSIGN_KEY").ok().as_deref() != self.remote.key.as_deref() {
            output::note(
                "warning: --key shows the key to other users of this machine (ps) and keeps it in shell history; \
                 set COUNTERSIGN_KEY or pass --key-file instead",
            );
        }
        if sends_in_clear(&self.remote.url) {
            output::note(&format!(
                "warning: {} is plain http to another machine: the key goes over the network unencrypted; use https",
                output::clean(&self.remote.url)
            ));
        }
        Client::new(self.remote.url.clone(), Some(key.to_owned())).map_err(Failure::from)
    }

    /// Awaits a call and keeps only a 2xx answer; an error status becomes [`Failure::Api`], a transport
    /// error a message naming the server.
    pub async fn call(
        &self,
        call: impl std::future::Future<Output = Result<ApiResponse, ClientError>>,
    ) -> Result<ApiResponse, Failure> {
        match call.await {
            Ok(response) if (200..300).contains(&response.status) => Ok(response),
            Ok(response) => Err(Failure::Api(response)),
            Err(e) => Err(self.unreachable(&e)),
        }
    }

    /// A long poll (`…/wait`) until `deadline`: a 429 (the caller already holds as many waits as it may) is
    /// asked again after the `retry_after_seconds` it names, instead of failing the command.
    pub async fn call_waiting<F, Fut>(&self, deadline: std::time::Instant, call: F) -> Result<ApiResponse, Failure>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<ApiResponse, ClientError>>,
    {
        loop {
            match self.call(call()).await {
                Err(Failure::Api(response)) if response.status == 429 => {
                    let remaining = deadline.saturating_duration_since(std::time::Instant::now());
                    if remaining.is_zero() {
                        // At the deadline the call asks to wait no time, which the server answers at once
                        // without an open wait: the last state seen, so a wait that timed out says so.
                        return self.call(call()).await;
                    }
                    tokio::time::sleep(retry_after(&response.body).min(remaining)).await;
                }
                other => return other,
            }
        }
    }

    pub fn unreachable(&self, error: &ClientError) -> Failure {
        Failure::Message(format!("cannot reach the server at {} ({error}); is COUNTERSIGN_URL right?", self.remote.url))
    }

    /// Prints the server's document with `--json`, or the human rendering otherwise.
    pub fn show(&self, document: &Value, human: impl FnOnce(&Value) -> String) -> Result<(), Failure> {
        if self.json() { output::json(document) } else { output::out(&human(document)) }
    }

    /// What a 204 (delete, revoke) prints: `{"id": …, "ok": true}` with `--json`, or a sentence.
    pub fn done(&self, id: &str, sentence: &str) -> Outcome {
        if self.json() {
            output::json(&serde_json::json!({"id": id, "ok": true}))?;
        } else {
            output::out(sentence)?;
        }
        Ok(0)
    }
}

/// How long a 429's problem asks the client to wait (`retry_after_seconds`), 1 s to a minute.
pub fn retry_after(problem: &Value) -> std::time::Duration {
    std::time::Duration::from_secs(problem["retry_after_seconds"].as_u64().unwrap_or(1).clamp(1, 60))
}

/// Runs one client command and reports how it ended: its output on stdout, errors on stderr.
pub async fn run(remote: Remote, command: Command) -> ExitCode {
    let ctx = Ctx { remote };
    let outcome = match command {
        Command::Approvals { command } => approvals::run_approvals(&ctx, command).await,
        Command::Actions { command } => approvals::run_actions(&ctx, command).await,
        Command::Audit { command } => audit::run(&ctx, command).await,
        Command::Policy { command } => policy::run(&ctx, command).await,
        Command::Sessions { command } => admin::run_sessions(&ctx, command).await,
        Command::Keys { command } => admin::run_keys(&ctx, command).await,
        Command::Agents { command } => admin::run_agents(&ctx, command).await,
        Command::Users { command } => admin::run_users(&ctx, command).await,
        Command::Jobs { command } => admin::run_jobs(&ctx, command).await,
        Command::Webhooks { command } => admin::run_webhooks(&ctx, command).await,
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(failure) => ExitCode::from(report(&ctx, failure)),
    }
}

/// Prints a failure (stderr; with `--json` the problem document also goes to stdout) and answers the exit
/// code.
fn report(ctx: &Ctx, failure: Failure) -> u8 {
    match failure {
        Failure::Quiet(code) => code,
        Failure::Message(message) => {
            output::note(&format!("error: {}", output::clean(&message)));
            1
        }
        Failure::Api(response) => {
            if ctx.json() && response.body.is_object() {
                let _ = output::json(&response.body);
            }
            output::note(&problem_line(&response));
            1
        }
    }
}

/// `error: <title>: <detail>`, then the rule, field, state or action the problem names.
pub fn problem_line(response: &ApiResponse) -> String {
    let body = &response.body;
    if !body.is_object() {
        let text = body.as_str().map(str::to_owned).unwrap_or_else(|| body.to_string());
        let text: String = text.chars().take(500).collect();
        return format!("error: HTTP {}: {}", response.status, output::clean(text.trim()));
    }
    let title = body.get("title").and_then(Value::as_str).unwrap_or("error");
    let mut line = format!("error: {}", output::clean(title));
    if let Some(detail) = body.get("detail").and_then(Value::as_str).filter(|d| !d.is_empty()) {
        line.push_str(&format!(": {}", output::clean(detail)));
    }
    let extras: Vec<String> = ["rule", "field", "state", "action_id", "retry_after_seconds"]
        .iter()
        .filter_map(|name| {
            let value = body.get(*name)?;
            let text = value.as_str().map(str::to_owned).unwrap_or_else(|| value.to_string());
            Some(format!("{}: {}", name.replace('_', " "), output::clean(&text)))
        })
        .collect();
    if !extras.is_empty() {
        line.push_str(&format!(" ({})", extras.join(", ")));
    }
    line
}

/// Durations on the command line stay below this many seconds (about 31 years): far beyond any real wait,
/// and small enough that a deadline `now + duration` cannot overflow.
const MAX_SECONDS: u64 = 1_000_000_000;

/// A duration given as seconds (`30`, `0.5`) or with a unit (`90s`, `15m`, `1h`, `2d`), below
/// [`MAX_SECONDS`] either way.
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let max = Duration::from_secs(MAX_SECONDS);
    if let Ok(seconds) = text.trim().parse::<f64>() {
        return if seconds.is_finite() && (0.0..max.as_secs_f64()).contains(&seconds) {
            Ok(Duration::from_secs_f64(seconds))
        } else {
            Err(format!("`{text}` is not a number of seconds from 0 to under {MAX_SECONDS}"))
        };
    }
    let duration = countersign_core::policy::parse_duration(text)?;
    if duration < max {
        Ok(duration)
    } else {
        Err(format!("`{text}` is too long: a duration must be under {MAX_SECONDS} seconds (about 31 years)"))
    }
}

/// The instant `timeout` from now; a timeout too long to add is refused rather than overflowing.
pub fn deadline_after(timeout: Duration) -> Result<Instant, Failure> {
    Instant::now()
        .checked_add(timeout)
        .ok_or_else(|| Failure::Message(format!("a timeout of {} seconds is too long", timeout.as_secs())))
}

/// A JSON value given on the command line; `what` names it in the message.
pub fn parse_json(what: &str, text: &str) -> Result<Value, Failure> {
    serde_json::from_str(text).map_err(|e| Failure::Message(format!("{what} is not valid JSON: {e}")))
}

/// `next_cursor` of a list, reported on stderr so a table stays a table.
pub fn more(document: &Value) {
    if let Some(cursor) = document.get("next_cursor").and_then(Value::as_str) {
        output::note(&format!("(more: pass --cursor {cursor})"));
    }
}

/// Whether a URL is plain http to a host other than this machine's loopback.
fn sends_in_clear(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else { return false };
    let host = parsed.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        || host.is_empty();
    parsed.scheme() == "http" && !loopback
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_flagged_only_off_this_machine() {
        assert!(sends_in_clear("http://gw.example.com:8080"));
        assert!(sends_in_clear("http://10.0.0.5"));
        for local in ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9000", "https://gw.example.com"] {
            assert!(!sends_in_clear(local), "{local}");
        }
    }

    #[test]
    fn seconds_take_numbers_and_units() {
        assert_eq!(parse_seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_seconds("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
    }

    #[test]
    fn seconds_with_a_unit_are_bounded_like_plain_numbers() {
        assert_eq!(parse_seconds("999999999s"), Ok(Duration::from_secs(999_999_999)));
        assert_eq!(parse_seconds("11574d"), Ok(Duration::from_secs(11574 * 86_400)));
        for huge in ["9300000000000000000s", "9300000000000000000", "1000000000s", "1000000000", "11575d", "1e9"] {
            let refused = parse_seconds(huge).expect_err(huge);
            assert!(refused.contains(huge), "{refused}");
        }
    }

    #[test]
    fn problems_read_as_one_line() {
        let response = ApiResponse {
            status: 403,
            content_type: "application/problem+json".into(),
            body: serde_json::json!({"title": "Policy denied", "detail": "denied by rule `x`", "rule": "x",
                                      "action_id": "act_1"}),
        };
        assert_eq!(problem_line(&response), "error: Policy denied: denied by rule `x` (rule: x, action id: act_1)");
        let plain = ApiResponse { status: 502, content_type: "text/plain".into(), body: Value::String("bad".into()) };
        assert_eq!(problem_line(&plain), "error: HTTP 502: bad");
    }
}
