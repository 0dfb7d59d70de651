//! `audit query|tail|verify|export`. `verify --file F --public-key K` checks an export offline with
//! nothing but the instance's public key (no server, no key); `verify` alone asks the server to check its
//! chain. `tail` follows the Server-Sent Events stream, resuming with `Last-Event-ID` if the connection drops,
//! until Ctrl-C.
//!
//! Nothing here interprets the chain itself: the offline check is `countersign_core::checkpoint`'s, the
//! online one the server's.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use countersign_core::checkpoint::Expected;
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::output::{self, Table, field, time};
use super::{Ctx, Failure, Outcome, more};
use crate::client::{AuditQuery, Client};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Query the audit log (users only).
    Query {
        #[command(flatten)]
        filters: Filters,
        /// At most this many events (1 to 1000; default 100).
        #[arg(long)]
        limit: Option<u32>,
        /// The `next_cursor` of a previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Print audit events as they happen, until Ctrl-C (with --from, the events after that seq first).
    Tail {
        #[command(flatten)]
        filters: Filters,
        /// Start after this seq (0: from the first event). Default: only events from now on.
        #[arg(long)]
        from: Option<u64>,
    },
    /// Verify the audit chain. Without --file the server checks its own chain (admins); with --file and
    /// --public-key an export is checked offline: the hash chain and every checkpoint's signature.
    /// Exit code 0 when intact, 1 when broken (the first broken event is named), 2 on a usage error.
    Verify {
        /// An export file (from `audit export` or `GET /v1/audit/export`) to check offline.
        #[arg(long, requires = "public_key")]
        file: Option<PathBuf>,
        /// The instance's public key, base64 (from `GET /v1/audit/public-key`).
        #[arg(long, requires = "file")]
        public_key: Option<String>,
        /// A head the export must reach, as HASH or SEQ:HASH (an earlier report's last seq and head, an export
        /// job's result, or the head_hash of `audit verify` on the server): an export cut short at an earlier
        /// checkpoint verifies on its own, but not against a head it does not hold.
        #[arg(long, requires = "file", value_parser = Expected::parse_head)]
        expect_head: Option<(Option<i64>, String)>,
        /// The org the export must be of (one instance signs every org's log with the same key).
        #[arg(long, requires = "file")]
        expect_org: Option<String>,
    },
    /// Export the audit log as JSON Lines with signed checkpoints (admins); to stdout or --out.
    Export {
        /// Write the export to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct Filters {
    /// Event name, exact, or a prefix ending in `.*` (e.g. approval.*).
    #[arg(long)]
    action: Option<String>,
    /// Actor id, exact.
    #[arg(long)]
    actor: Option<String>,
    /// Subject id, exact (an action, approval, job …).
    #[arg(long)]
    subject: Option<String>,
    /// RFC 3339, a UTC date and time without offset (2026-11-23T19:00), or microseconds since the epoch; inclusive.
    #[arg(long)]
    since: Option<String>,
    /// RFC 3339, a UTC date and time without offset (2026-11-23T19:00), or microseconds since the epoch; inclusive.
    #[arg(long)]
    until: Option<String>,
}

impl Filters {
    fn query(self) -> AuditQuery {
        AuditQuery {
            action: self.action,
            actor: self.actor,
            subject: self.subject,
            since: self.since,
            until: self.until,
            ..AuditQuery::default()
        }
    }
}

pub async fn run(ctx: &Ctx, command: AuditCommand) -> Outcome {
    match command {
        AuditCommand::Verify { file: Some(file), public_key: Some(public_key), expect_head, expect_org } => {
            let expected = countersign_core::checkpoint::Expected { org: expect_org, head: expect_head };
            verify_export(ctx, &file, &public_key, &expected)
        }
        AuditCommand::Verify { .. } => {
            let client = ctx.client()?;
            let report = ctx.call(client.verify_audit()).await?.body;
            ctx.show(&report, |r| {
                if r.get("ok").and_then(Value::as_bool) == Some(true) {
                    format!("ok: {} events, head {}", field(r, "/events"), field(r, "/head_hash"))
                } else {
                    format!("BROKEN at seq {}: the chain does not verify", field(r, "/first_broken_seq"))
                }
            })?;
            Ok(if report.get("ok").and_then(Value::as_bool) == Some(true) { 0 } else { 1 })
        }
        AuditCommand::Query { filters, limit, cursor } => {
            let client = ctx.client()?;
            let query = AuditQuery { limit, cursor, ..filters.query() };
            let page = ctx.call(client.query_audit(&query)).await?.body;
            ctx.show(&page, |p| {
                let events = p.get("events").and_then(Value::as_array).cloned().unwrap_or_default();
                if events.is_empty() {
                    return "no events".into();
                }
                let mut table = Table::new(&["SEQ", "TIME", "ACTOR", "EVENT", "SUBJECT"]);
                for e in &events {
                    table.row(event_cells(e));
                }
                table.render()
            })?;
            if !ctx.json() {
                more(&page);
            }
            Ok(0)
        }
        AuditCommand::Tail { filters, from } => tail(ctx, &ctx.client()?, &filters.query(), from).await,
        AuditCommand::Export { out } => export(ctx, out.as_deref()).await,
    }
}

fn event_cells(e: &Value) -> Vec<String> {
    vec![
        field(e, "/seq"),
        time(e, "/time"),
        format!("{}:{}", field(e, "/actor/kind"), field(e, "/actor/name")),
        field(e, "/action"),
        field(e, "/subject"),
    ]
}

/// The offline check of an export: the same report and exit code as before the CLI had a server side.
fn verify_export(ctx: &Ctx, file: &Path, public_key: &str, expected: &Expected) -> Outcome {
    let reader =
        std::fs::File::open(file).map_err(|e| Failure::Message(format!("cannot open {}: {e}", file.display())))?;
    let reader = std::io::BufReader::new(reader);
    let report = countersign_core::checkpoint::verify_export_expecting(reader, public_key.trim(), expected)
        .map_err(|e| Failure::Message(format!("cannot verify: {e}")))?;
    if ctx.json() {
        output::json(&json!(report))?;
    } else if report.ok {
        output::out(&format!(
            "ok: {} events of org {} (seq {} to {}), {} signed checkpoints, head {}",
            report.events,
            output::clean(report.org_id.as_deref().unwrap_or("-")),
            report.first_seq.unwrap_or(0),
            report.last_seq.unwrap_or(0),
            report.checkpoints,
            output::clean(report.head_hash.as_deref().unwrap_or("-"))
        ))?;
    } else {
        let at = report.first_broken_seq.map(|s| format!(" at seq {s}")).unwrap_or_default();
        // The reason can quote the file (a key id, a field name): an export under examination is untrusted.
        let reason = output::clean(report.reason.as_deref().unwrap_or("the chain does not verify"));
        output::out(&format!("BROKEN{at}: {reason}"))?;
    }
    Ok(if report.ok { 0 } else { 1 })
}

/// How long `audit export` asks again after 429s before it reports one.
const EXPORT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(300);

async fn export(ctx: &Ctx, out: Option<&Path>) -> Outcome {
    let client = ctx.client()?;
    let spinner = output::Spinner::start("exporting the audit log".into());
    // A 429 (the key already holds as many waits open as it may; an export is one) is asked again after the
    // time it names, for up to EXPORT_PATIENCE, as the CLI's waits are, instead of failing the command.
    let deadline = std::time::Instant::now() + EXPORT_PATIENCE;
    let response = loop {
        let response = match client.export_audit().await {
            Ok(response) => response,
            Err(e) => break Err(e),
        };
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        if response.status != 429 || remaining.is_zero() {
            break Ok(response);
        }
        let problem = serde_json::from_slice::<Value>(&response.body).unwrap_or(Value::Null);
        tokio::time::sleep(super::retry_after(&problem).min(remaining)).await;
    };
    spinner.stop().await;
    let response = response.map_err(|e| ctx.unreachable(&e))?;
    if response.status != 200 {
        let body = serde_json::from_slice(&response.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&response.body).into_owned()));
        return Err(Failure::Api(crate::client::ApiResponse {
            status: response.status,
            content_type: response.content_type,
            body,
        }));
    }
    let Some(path) = out else {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        return match stdout.write_all(&response.body).and_then(|()| stdout.flush()) {
            Ok(()) => Ok(0),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::Quiet(0)),
            Err(e) => Err(Failure::Message(format!("cannot write to stdout: {e}"))),
        };
    };
    write_owner_only(path, &response.body)
        .map_err(|e| Failure::Message(format!("cannot write {}: {e}", path.display())))?;
    let lines = response.body.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let (mut events, mut checkpoints) = (0u64, 0u64);
    for line in lines {
        if line.starts_with(b"{\"checkpoint\"") { checkpoints += 1 } else { events += 1 }
    }
    let summary = json!({"file": path.display().to_string(), "bytes": response.body.len(), "events": events, "checkpoints": checkpoints});
    ctx.show(&summary, |_| {
        format!(
            "wrote {events} events and {checkpoints} signed checkpoints to {}\nverify it offline with: countersign \
             audit verify --file {} --public-key <key from GET /v1/audit/public-key>",
            path.display(),
            path.display()
        )
    })?;
    Ok(0)
}

/// One Server-Sent Event being read.
#[derive(Default)]
struct Pending {
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
}

/// Follows the stream until Ctrl-C. A dropped connection is resumed after the last seq seen; a server
/// that cannot be reached (or keeps dropping without sending anything) ends the command with an error.
async fn tail(ctx: &Ctx, client: &Client, query: &AuditQuery, from: Option<u64>) -> Outcome {
    let mut last_id: Option<String> = match from {
        Some(seq) => Some(seq.to_string()),
        None => Some(head_seq(ctx, client).await?.to_string()),
    };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut fruitless = 0u32;
    loop {
        let response = tokio::select! {
            _ = &mut ctrl_c => return Ok(0),
            response = client.stream_audit(query, last_id.as_deref()) => response,
        };
        let response = response.map_err(|e| ctx.unreachable(&e))?;
        if response.status() != reqwest::StatusCode::OK {
            let answer = crate::client::Client::into_api_response(response).await?;
            return Err(Failure::Api(answer));
        }
        output::note(&format!(
            "following the audit log after seq {} (Ctrl-C to stop)",
            last_id.as_deref().unwrap_or("0")
        ));
        let mut body = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        let mut pending = Pending::default();
        let mut got_any = false;
        loop {
            let chunk = tokio::select! {
                _ = &mut ctrl_c => return Ok(0),
                chunk = body.next() => chunk,
            };
            let Some(Ok(bytes)) = chunk else { break };
            buffer.extend_from_slice(&bytes);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    let event = std::mem::take(&mut pending);
                    if let Some(id) = &event.id {
                        last_id = Some(id.clone());
                    }
                    if !event.data.is_empty() && event.event.as_deref().is_none_or(|e| e == "audit") {
                        got_any = true;
                        print_event(ctx, &event.data.join("\n"))?;
                    }
                    continue;
                }
                let (name, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match name {
                    "id" => pending.id = Some(value.to_owned()),
                    "event" => pending.event = Some(value.to_owned()),
                    "data" => pending.data.push(value.to_owned()),
                    _ => {} // comments (keep-alives) and unknown fields
                }
            }
        }
        fruitless = if got_any { 0 } else { fruitless + 1 };
        if fruitless >= 3 {
            return Err(Failure::Message("the audit stream keeps closing; stopped following it".into()));
        }
        output::note("the audit stream closed; reconnecting");
    }
}

/// The seq of the newest event, so `tail` starts with what happens next. Found by probing "is there an
/// event after seq n?" (one event per request) with a doubling and then a halving search: some 2·log2(head)
/// small requests, whatever the size of the log, and no reliance on the two clocks agreeing.
async fn head_seq(ctx: &Ctx, client: &Client) -> Result<u64, Failure> {
    let after = |n: u64| async move {
        let probe = AuditQuery { limit: Some(1), cursor: Some(n.to_string()), ..AuditQuery::default() };
        let body = ctx.call(client.query_audit(&probe)).await?.body;
        Ok::<bool, Failure>(body.get("events").and_then(Value::as_array).is_some_and(|e| !e.is_empty()))
    };
    if !after(0).await? {
        return Ok(0);
    }
    // Invariant: an event follows `low`, none follows `high`.
    let (mut low, mut high) = (0u64, 1024u64);
    while after(high).await? {
        if high >= 1 << 62 {
            return Ok(high);
        }
        low = high;
        high *= 2;
    }
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if after(middle).await? { low = middle } else { high = middle }
    }
    Ok(high)
}

fn print_event(ctx: &Ctx, data: &str) -> Result<(), Failure> {
    let event: Value = serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.to_owned()));
    if ctx.json() {
        let line = serde_json::to_string(&event).map_err(|e| Failure::Message(e.to_string()))?;
        return output::out(&line);
    }
    let cells = event_cells(&event);
    output::out(&cells.join("  "))
}

/// Writes `bytes` to `path` as the user asked, whatever it is (a file, `/dev/stdout`, a pipe), but a regular
/// file ends up readable by its owner only, new or not: the whole org's log is admin-only through the API.
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    if file.metadata()?.is_file() {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)?;
    file.flush()
}
