//! The command-line client end to end: the real `countersign` binary run as a subprocess against a server
//! spawned on port 0, every subcommand at least once, `--json` output parsed, the `wait` exit codes (0
//! approved, 1 denied, 2 expired, 3 timed out), the error lines, and the offline `policy check`/`policy
//! test`. Nothing sleeps: waits are long-polls, and the live tail is read line by line.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::{TestServer, Upstream, action, metric, metric_until, metric_until_it};

/// What one run of the binary produced.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }
}

fn command(url: &str, key: Option<&str>, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_countersign"));
    command
        .args(args)
        .env("COUNTERSIGN_URL", url)
        .env_remove("COUNTERSIGN_KEY")
        .env_remove("COUNTERSIGN_KEY_FILE")
        .env_remove("COUNTERSIGN_LOG_FORMAT")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(key) = key {
        command.env("COUNTERSIGN_KEY", key);
    }
    command
}

/// Runs `countersign ARGS` with COUNTERSIGN_URL and (when given) COUNTERSIGN_KEY set.
async fn cs(url: &str, key: Option<&str>, args: &[&str]) -> Run {
    let output = command(url, key, args).output().await.unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

struct Cli {
    url: String,
    admin: String,
}

impl Cli {
    fn of(server: &TestServer) -> Cli {
        Cli { url: server.admin.base().to_owned(), admin: server.admin.key().unwrap().to_owned() }
    }

    async fn admin(&self, args: &[&str]) -> Run {
        cs(&self.url, Some(&self.admin), args).await
    }

    async fn with(&self, key: &str, args: &[&str]) -> Run {
        cs(&self.url, Some(key), args).await
    }
}

#[tokio::test]
async fn approvals_and_actions_with_wait_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let cli = Cli::of(&server);
    let bot = server.agent("bot").await;
    let bot_key = bot.key().unwrap().to_owned();

    // Submit with an agent key: held, with the poll token shown once.
    let submitted = cli
        .with(
            &bot_key,
            &[
                "actions",
                "submit",
                "--capability",
                "payments.charge.card",
                "--params",
                r#"{"amount_cents": 1200}"#,
                "--reasoning",
                r#"{"goal": "refund order 42"}"#,
                "--json",
            ],
        )
        .await
        .ok()
        .json();
    assert_eq!(submitted["state"], "pending_approval");
    assert!(submitted["approval"]["token"].as_str().unwrap().starts_with("cs_ap_"));
    let action_id = submitted["id"].as_str().unwrap().to_owned();
    let approval_id = submitted["approval"]["id"].as_str().unwrap().to_owned();

    let got = cli.with(&bot_key, &["actions", "get", &action_id]).await.ok();
    assert!(got.stdout.contains("pending_approval") && got.stdout.contains("payments.charge.card"), "{got:?}");
    assert!(got.stdout.contains("refund order 42"), "the reasoning is shown verbatim: {got:?}");

    // The queue, as JSON and as a table.
    let queue = cli.admin(&["approvals", "list", "--status", "pending", "--json"]).await.ok().json();
    assert!(queue["items"].as_array().unwrap().iter().any(|a| a["id"] == json!(approval_id)), "{queue}");
    let table = cli.admin(&["approvals", "list", "--status", "pending"]).await.ok();
    let header = table.stdout.lines().next().unwrap();
    assert!(header.starts_with("ID") && header.contains("CAPABILITY"), "{table:?}");
    assert!(table.stdout.contains(&approval_id) && table.stdout.contains("hold-charges"), "{table:?}");

    let shown = cli.admin(&["approvals", "show", &approval_id]).await.ok();
    assert!(shown.stdout.contains("refund order 42"), "{shown:?}");
    assert!(shown.stdout.contains("policy snapshot") && shown.stdout.contains("hold-charges"), "{shown:?}");
    let shown = cli.admin(&["approvals", "show", &approval_id, "--json"]).await.ok().json();
    assert_eq!(shown["capability"], "payments.charge.card");
    assert_eq!(shown["reasoning"], json!({"goal": "refund order 42"}));

    // Not yet decided: a wait that runs out exits 3.
    let timed_out = cli.with(&bot_key, &["actions", "wait", &action_id, "--timeout", "0"]).await;
    assert_eq!(timed_out.code, 3, "{timed_out:?}");
    assert!(timed_out.stderr.contains("timed out"), "{timed_out:?}");

    let approved =
        cli.admin(&["approvals", "approve", &approval_id, "--note", "looks right", "--json"]).await.ok().json();
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["decisions"][0]["note"], "looks right");
    let waited = cli.admin(&["approvals", "wait", &approval_id, "--json"]).await;
    assert_eq!(waited.code, 0, "{waited:?}");
    assert_eq!(waited.json()["state"], "approved");
    let waited = cli.with(&bot_key, &["actions", "wait", &action_id]).await;
    assert_eq!(waited.code, 0, "{waited:?}");
    assert!(waited.stdout.contains("approved"), "{waited:?}");

    let trace = cli.admin(&["actions", "trace", &action_id, "--json"]).await.ok().json();
    let events: Vec<&str> = trace["events"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(events.contains(&"action.submitted") && events.contains(&"approval.approved"), "{events:?}");
    let trace = cli.admin(&["actions", "trace", &action_id]).await.ok();
    assert!(trace.stdout.contains("approval.approved") && trace.stdout.contains("looks right"), "{trace:?}");

    // Denied by a person: wait exits 1.
    let held = bot.submit_action(&action("payments.charge.card")).await.unwrap();
    let denied = cli.admin(&["approvals", "deny", held.str("/approval/id"), "--note", "not today"]).await.ok();
    assert!(denied.stdout.contains("denied"), "{denied:?}");
    let waited = cli.with(&bot_key, &["actions", "wait", held.str("/id"), "--timeout", "30"]).await;
    assert_eq!(waited.code, 1, "{waited:?}");
    let waited = cli.admin(&["approvals", "wait", held.str("/approval/id"), "--json"]).await;
    assert_eq!(waited.code, 1, "{waited:?}");
    assert_eq!(waited.json()["state"], "denied");

    // Expired (the test policy gives ops.restart.* one second): wait exits 2, for the action and its approval,
    // and `submit --wait` exits the same way.
    let expiring = bot.submit_action(&action("ops.restart.service")).await.unwrap();
    let waited = cli.with(&bot_key, &["actions", "wait", expiring.str("/id"), "--timeout", "30", "--json"]).await;
    assert_eq!(waited.code, 2, "{waited:?}");
    assert_eq!(waited.json()["state"], "expired");
    let waited = cli.admin(&["approvals", "wait", expiring.str("/approval/id")]).await;
    assert_eq!(waited.code, 2, "{waited:?}");
    let submitted = cli
        .with(
            &bot_key,
            &["actions", "submit", "--capability", "ops.restart.db", "--reasoning", "stuck", "--wait", "30s", "--json"],
        )
        .await;
    assert_eq!(submitted.code, 2, "{submitted:?}");
    let submitted = submitted.json();
    assert_eq!(submitted["state"], "expired");
    assert!(submitted["approval"]["token"].as_str().unwrap().starts_with("cs_ap_"), "the token is kept: {submitted}");

    // Allowed at once: text reasoning is kept as a JSON string; exit 0.
    let allowed = cli
        .with(
            &bot_key,
            &[
                "actions",
                "submit",
                "--capability",
                "email.send.message",
                "--reasoning",
                "say hi",
                "--wait",
                "10",
                "--json",
            ],
        )
        .await
        .ok()
        .json();
    assert_eq!(allowed["state"], "approved");
    assert_eq!(allowed["reasoning"], "say hi");

    // Denied by policy: the problem on stderr (and as JSON on stdout with --json), exit 1.
    let refused = cli.with(&bot_key, &["actions", "submit", "--capability", "db.delete.row"]).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.starts_with("error: ") && refused.stderr.contains("rule: no-deletes"), "{refused:?}");
    let refused = cli.with(&bot_key, &["actions", "submit", "--capability", "db.delete.row", "--json"]).await;
    assert_eq!(refused.code, 1);
    assert_eq!(refused.json()["code"], "policy_denied");
    server.stop().await;
}

#[tokio::test]
async fn audit_query_tail_verify_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let cli = Cli::of(&server);
    let bot = server.agent("bot").await;
    let first = bot.submit_action(&action("payments.charge.card")).await.unwrap();
    server.admin.approve(first.str("/approval/id"), Some("fine")).await.unwrap();

    let page = cli.admin(&["audit", "query", "--action", "approval.*", "--limit", "5", "--json"]).await.ok().json();
    let names: Vec<&str> = page["events"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(!names.is_empty() && names.iter().all(|n| n.starts_with("approval.")), "{names:?}");
    let table = cli.admin(&["audit", "query", "--subject", first.str("/id")]).await.ok();
    assert!(table.stdout.starts_with("SEQ") && table.stdout.contains("action.submitted"), "{table:?}");

    let verified = cli.admin(&["audit", "verify"]).await.ok();
    assert!(verified.stdout.starts_with("ok: "), "{verified:?}");
    assert_eq!(cli.admin(&["audit", "verify", "--json"]).await.ok().json()["ok"], true);

    // Export to a file, then check it offline: no server, no key.
    let file = dir.path().join("audit.jsonl");
    let exported = cli.admin(&["audit", "export", "--out", file.to_str().unwrap(), "--json"]).await.ok().json();
    assert!(exported["events"].as_u64().unwrap() >= 5 && exported["checkpoints"].as_u64().unwrap() >= 1);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the org's whole log is readable by its owner only: {mode:o}");
    }
    // Written where the user points, special files included.
    let piped = cli.admin(&["audit", "export", "--out", "/dev/stdout"]).await.ok();
    assert!(piped.stdout.contains("{\"checkpoint\":"), "{piped:?}");
    let public_key = server.admin.audit_public_key().await.unwrap().str("/public_key").to_owned();
    let offline = cs(
        "http://127.0.0.1:1",
        None,
        &["audit", "verify", "--file", file.to_str().unwrap(), "--public-key", &public_key],
    )
    .await
    .ok();
    assert!(offline.stdout.starts_with("ok: "), "{offline:?}");
    // Checked against a head known from elsewhere: the file's own reaches it; once the log has grown, the
    // server's head is past the file's end, as it would be for an export cut short.
    let verify_file = |extra: Vec<String>| {
        let mut args = vec!["audit", "verify", "--file", file.to_str().unwrap(), "--public-key", &public_key];
        args.extend(extra.iter().map(String::as_str));
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move { cs("http://127.0.0.1:1", None, &args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let report = verify_file(vec!["--json".into()]).await.ok().json();
    let own_head = format!("{}:{}", report["last_seq"], report["head_hash"].as_str().unwrap());
    let own_org = report["org_id"].as_str().unwrap().to_owned();
    let reached = verify_file(vec!["--expect-head".into(), own_head, "--expect-org".into(), own_org]).await.ok();
    assert!(reached.stdout.starts_with("ok: "), "{reached:?}");
    bot.submit_action(&action("email.send.message")).await.unwrap();
    let server_head =
        cli.admin(&["audit", "verify", "--json"]).await.ok().json()["head_hash"].as_str().unwrap().to_owned();
    let behind = verify_file(vec!["--expect-head".into(), server_head]).await;
    assert_eq!(behind.code, 1, "{behind:?}");
    assert!(behind.stdout.contains("has the expected hash") && behind.stdout.contains("cut"), "{behind:?}");
    let elsewhere = verify_file(vec!["--expect-org".into(), "org_01ARZ3NDEKTSV4RRFFQ69G5FAV".into()]).await;
    assert_eq!(elsewhere.code, 1, "{elsewhere:?}");
    assert!(elsewhere.stdout.contains("not of the expected org"), "{elsewhere:?}");
    assert_eq!(verify_file(vec!["--expect-head".into(), "12:nothex".into()]).await.code, 2, "a usage error");
    let to_stdout = cli.admin(&["audit", "export"]).await.ok();
    assert!(to_stdout.stdout.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "JSON Lines");

    // Tail from the start: the backlog first.
    let mut backlog =
        command(&cli.url, Some(&cli.admin), &["audit", "tail", "--from", "0", "--action", "action.*", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    let mut lines = BufReader::new(backlog.stdout.take().unwrap()).lines();
    let line = within(lines.next_line()).await.unwrap().unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["action"], "action.submitted");
    assert_eq!(event["subject"], json!(first.str("/id")));
    interrupt(&mut backlog).await;

    // Tail by default: only what happens after it started, live, until Ctrl-C.
    let mut tail = command(&cli.url, Some(&cli.admin), &["audit", "tail", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut notes = BufReader::new(tail.stderr.take().unwrap()).lines();
    let following = within(notes.next_line()).await.unwrap().unwrap();
    let head: u64 = following
        .strip_prefix("following the audit log after seq ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|seq| seq.parse().ok())
        .unwrap_or_else(|| panic!("unexpected note: {following}"));
    let second = bot.submit_action(&action("payments.charge.card")).await.unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    loop {
        let line = within(lines.next_line()).await.unwrap().expect("the tail ended early");
        let event: Value = serde_json::from_str(&line).unwrap();
        assert!(event["seq"].as_u64().unwrap() > head, "only events after the start: {event}");
        if event["action"] == "action.submitted" && event["subject"] == json!(second.str("/id")) {
            break;
        }
    }
    interrupt(&mut tail).await;
    server.stop().await;
}

/// Guards a read of the child's output, so a broken tail fails the test instead of hanging it.
async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), future).await.expect("no output within 60 s")
}

/// Sends SIGINT (Ctrl-C) to a child this test started, and expects it to end cleanly.
async fn interrupt(child: &mut tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    let sent = tokio::process::Command::new("kill").args(["-INT", &pid]).status().await.unwrap();
    assert!(sent.success());
    let status = within(child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "Ctrl-C ends the tail with 0");
}

const POLICY: &str = "version: 1
defaults:
  effect: allow
rules:
  - name: no-deletes
    effect: deny
    conditions: { capability: \"*.delete.*\" }
  - name: hold-charges
    effect: require_approval
    conditions: { capability: \"payments.charge.*\" }
";

#[tokio::test]
async fn policy_check_test_and_explain() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let good = write("good.yaml", POLICY);
    // Line 9 names an effect that does not exist.
    let bad = write("bad.yaml", &POLICY.replace("effect: require_approval", "effect: maybe"));
    assert_eq!(std::fs::read_to_string(&bad).unwrap().lines().nth(8).unwrap().trim(), "effect: maybe");
    // Offline: no server and no key are needed.
    let nowhere = "http://127.0.0.1:1";

    let checked = cs(nowhere, None, &["policy", "check", &good]).await.ok();
    assert!(checked.stdout.starts_with("ok: ") && checked.stdout.contains("2 rules"), "{checked:?}");
    let checked = cs(nowhere, None, &["policy", "check", &good, "--json"]).await.ok().json();
    assert_eq!(checked["valid"], true);
    assert_eq!(checked["rules"], 2);
    let broken = cs(nowhere, None, &["policy", "check", &bad]).await;
    assert_eq!(broken.code, 1, "{broken:?}");
    assert!(broken.stderr.contains("bad.yaml:9:"), "the line is named: {broken:?}");
    assert!(broken.stderr.contains("maybe"), "{broken:?}");
    let broken = cs(nowhere, None, &["policy", "check", &bad, "--json"]).await;
    assert_eq!(broken.code, 1);
    assert_eq!(broken.json()["error"]["line"], 9);

    let passing = write(
        "pass.yaml",
        "cases:
  - name: deletes are refused
    action: {capability: db.delete.row, agent: bot, params: {}}
    expect: {effect: deny, rule: no-deletes}
  - name: charges are held
    action: {capability: payments.charge.card, agent: bot, params: {amount_cents: 1200}, reasoning: {goal: refund}}
    expect: {effect: require_approval, rule: hold-charges}
  - name: email is allowed by default
    action: {capability: email.send.message, agent: bot}
    expect: {effect: allow}
",
    );
    let failing = write(
        "fail.yaml",
        "- name: deletes are refused
  action: {capability: db.delete.row, agent: bot}
  expect: {effect: deny}
- name: deletes are allowed
  action: {capability: db.delete.row, agent: bot}
  expect: {effect: allow, rule: default}
",
    );
    let passed = cs(nowhere, None, &["policy", "test", &good, "--cases", &passing]).await.ok();
    assert_eq!(passed.stdout.matches("PASS").count(), 3, "{passed:?}");
    assert!(passed.stdout.contains("3 passed, 0 failed"), "{passed:?}");
    let failed = cs(nowhere, None, &["policy", "test", &good, "--cases", &failing]).await;
    assert_eq!(failed.code, 1, "{failed:?}");
    assert!(failed.stdout.contains("PASS  deletes are refused"), "{failed:?}");
    assert!(
        failed.stdout.contains("FAIL  deletes are allowed: expected allow (rule default), got deny (rule no-deletes)")
    );
    let report = cs(nowhere, None, &["policy", "test", &good, "--cases", &failing, "--json"]).await;
    assert_eq!(report.code, 1);
    let report = report.json();
    assert_eq!((report["passed"].as_u64(), report["failed"].as_u64()), (Some(1), Some(1)));
    assert_eq!(report["cases"][1]["actual"]["rule"], "no-deletes");
    let typo = write(
        "typo.yaml",
        "cases:\n  - name: x\n    action: {capability: a.b.c, agent: bot}\n    expect: {efect: deny}\n",
    );
    let typo = cs(nowhere, None, &["policy", "test", &good, "--cases", &typo]).await;
    assert_eq!(typo.code, 1);
    assert!(typo.stderr.contains("typo.yaml:4:") && typo.stderr.contains("efect"), "{typo:?}");

    // The shipped example policy passes its shipped cases (the README shows this command).
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policy");
    let example = shipped.join("example.yaml");
    let example_cases = shipped.join("example-cases.yaml");
    cs(nowhere, None, &["policy", "test", example.to_str().unwrap(), "--cases", example_cases.to_str().unwrap()])
        .await
        .ok();

    // Explain asks the server's current policy (the test policy).
    let server = TestServer::start(dir.path().join("server").as_path(), None).await;
    let cli = Cli::of(&server);
    let explained = cli
        .admin(&[
            "policy",
            "explain",
            "--capability",
            "payments.charge.card",
            "--params",
            r#"{"amount_cents": 5}"#,
            "--agent",
            "bot",
            "--json",
        ])
        .await
        .ok()
        .json();
    assert_eq!(explained["effect"], "require_approval");
    assert_eq!(explained["rule"], "hold-charges");
    let explained = cli.admin(&["policy", "explain", "--capability", "db.delete.row"]).await.ok();
    assert!(explained.stdout.contains("deny") && explained.stdout.contains("no-deletes"), "{explained:?}");
    server.stop().await;
}

#[tokio::test]
async fn principals_sessions_jobs_and_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let cli = Cli::of(&server);

    // Users and agents.
    let alice = cli.admin(&["users", "create", "alice", "--role", "approver", "--json"]).await.ok().json();
    assert_eq!(alice["role"], "approver");
    let users = cli.admin(&["users", "list"]).await.ok();
    assert!(users.stdout.contains("alice") && users.stdout.contains("approver"), "{users:?}");
    let bot = cli.admin(&["agents", "create", "bot", "--owner", "alice", "--json"]).await.ok().json();
    assert_eq!(bot["owner"], alice["id"]);
    let agents = cli.admin(&["agents", "list", "--json"]).await.ok().json();
    assert!(agents["items"].as_array().unwrap().iter().any(|a| a["name"] == "bot"));

    // Keys: the secret once; a revoked key is refused with a clear error.
    let bot_key = cli.admin(&["keys", "create", "--agent", "bot", "--json"]).await.ok().json();
    assert!(bot_key["key"].as_str().unwrap().starts_with("cs_sk_"));
    let alice_key =
        cli.admin(&["keys", "create", "--user", "alice", "--expires-at", "2099-01-01T00:00:00Z"]).await.ok();
    assert!(alice_key.stdout.contains("cs_sk_") && alice_key.stdout.contains("shown only now"), "{alice_key:?}");
    let keys = cli.admin(&["keys", "list"]).await.ok();
    assert!(keys.stdout.contains(bot_key["id"].as_str().unwrap()), "{keys:?}");
    assert!(!keys.stdout.contains(bot_key["key"].as_str().unwrap()), "never the secret");
    let revoked = cli.admin(&["keys", "revoke", bot_key["id"].as_str().unwrap(), "--json"]).await.ok().json();
    assert_eq!(revoked, json!({"id": bot_key["id"], "ok": true}));
    let refused =
        cli.with(bot_key["key"].as_str().unwrap(), &["actions", "get", "act_01ARZ3NDEKTSV4RRFFQ69G5FAV"]).await;
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.starts_with("error: "), "{refused:?}");

    // Sessions.
    let session = cli
        .admin(&[
            "sessions",
            "create",
            "--agent",
            "bot",
            "--ttl",
            "10m",
            "--scope",
            "payments.*",
            "--scope",
            "email.*",
            "--json",
        ])
        .await
        .ok()
        .json();
    assert!(session["token"].as_str().unwrap().starts_with("cs_st_"));
    assert_eq!(session["scopes"], json!(["payments.*", "email.*"]));
    let sessions = cli.admin(&["sessions", "list"]).await.ok();
    assert!(sessions.stdout.contains(session["id"].as_str().unwrap()), "{sessions:?}");
    let revoked = cli.admin(&["sessions", "revoke", session["id"].as_str().unwrap()]).await.ok();
    assert!(revoked.stdout.starts_with("revoked session"), "{revoked:?}");
    let sessions = cli.admin(&["sessions", "list", "--json"]).await.ok().json();
    let listed = sessions["items"].as_array().unwrap().iter().find(|s| s["id"] == session["id"]).unwrap().clone();
    assert!(!listed["revoked_at"].is_null());

    // Webhooks: one receiver that answers, one that never does (its delivery job stays open to cancel).
    let receiver = Upstream::start().await;
    let answering = subscribe(&cli, &format!("{}/hook", receiver.url)).await;
    assert!(answering["secret"].as_str().unwrap_or_else(|| panic!("{answering}")).starts_with("whsec_"));
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/hook", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let hanging = cli
        .admin(&["webhooks", "create", "--url", &silent_url, "--event", "approval.*", "--format", "slack", "--json"])
        .await
        .ok()
        .json();
    let webhooks = cli.admin(&["webhooks", "list"]).await.ok();
    assert!(webhooks.stdout.contains(&silent_url) && webhooks.stdout.contains("slack"), "{webhooks:?}");

    let agent = server.agent("ops").await;
    assert_eq!(agent.submit_action(&action("payments.charge.card")).await.unwrap().status, 202);
    let answered = cli
        .admin(&["jobs", "list", "--kind", "webhook.deliver", "--subject", answering["id"].as_str().unwrap(), "--json"])
        .await
        .ok()
        .json();
    let answered_job = answered["items"][0]["id"].as_str().unwrap().to_owned();
    let waited = cli.admin(&["jobs", "wait", &answered_job, "--timeout", "30"]).await;
    assert_eq!(waited.code, 0, "{waited:?}");
    assert!(waited.stdout.contains("succeeded"), "{waited:?}");
    let deliveries =
        cli.admin(&["webhooks", "deliveries", answering["id"].as_str().unwrap(), "--json"]).await.ok().json();
    assert_eq!(deliveries["items"][0]["status"], 201, "{deliveries}");
    let deliveries = cli.admin(&["webhooks", "deliveries", answering["id"].as_str().unwrap()]).await.ok();
    assert!(deliveries.stdout.contains("approval.requested"), "{deliveries:?}");

    let open = cli.admin(&["jobs", "list", "--subject", hanging["id"].as_str().unwrap(), "--json"]).await.ok().json();
    let open_job = open["items"][0]["id"].as_str().unwrap().to_owned();
    let cancelled = cli.admin(&["jobs", "cancel", &open_job, "--json"]).await.ok().json();
    assert_eq!(cancelled["state"], "cancelled");
    let got = cli.admin(&["jobs", "get", &open_job]).await.ok();
    assert!(got.stdout.contains("cancelled"), "{got:?}");
    let waited = cli.admin(&["jobs", "wait", &open_job]).await;
    assert_eq!(waited.code, 1, "a cancelled job: {waited:?}");
    let again = cli.admin(&["jobs", "cancel", &open_job]).await;
    assert_eq!(again.code, 1);
    assert!(again.stderr.starts_with("error: ") && again.stderr.contains("state: cancelled"), "{again:?}");
    holder.abort();

    // An export job, found in the list and waited for.
    let export = server.admin.post("/v1/audit/exports", &json!({})).await.unwrap();
    let waited = cli.admin(&["jobs", "wait", export.str("/id"), "--json"]).await;
    assert_eq!(waited.code, 0, "{waited:?}");
    assert_eq!(waited.json()["state"], "succeeded");
    let jobs = cli.admin(&["jobs", "list"]).await.ok();
    assert!(jobs.stdout.starts_with("ID") && jobs.stdout.contains("audit.export"), "{jobs:?}");

    // Deletions.
    let deleted = cli.admin(&["webhooks", "delete", hanging["id"].as_str().unwrap()]).await.ok();
    assert!(deleted.stdout.starts_with("deleted webhook"), "{deleted:?}");
    cli.admin(&["agents", "delete", bot["id"].as_str().unwrap()]).await.ok();
    cli.admin(&["users", "delete", alice["id"].as_str().unwrap(), "--json"]).await.ok();
    let users = cli.admin(&["users", "list", "--json"]).await.ok().json();
    let alice_now = users["items"].as_array().unwrap().iter().find(|u| u["id"] == alice["id"]).cloned();
    assert!(alice_now.is_none_or(|u| !u["disabled_at"].is_null()), "{users}");
    server.stop().await;
}

#[tokio::test]
async fn errors_are_clear_and_exit_codes_usable() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let cli = Cli::of(&server);
    let bot = server.agent("bot").await;

    let no_key = cs(&cli.url, None, &["approvals", "list"]).await;
    assert_eq!(no_key.code, 1);
    assert!(no_key.stderr.contains("COUNTERSIGN_KEY"), "{no_key:?}");
    // A key from the environment or a file is used quietly; one given as a flag, which `ps` shows, with a
    // warning.
    const FLAG_WARNING: &str = "warning: --key shows the key to other users of this machine";
    let from_env = cli.admin(&["approvals", "list"]).await.ok();
    assert!(!from_env.stderr.contains("warning"), "{from_env:?}");
    let key_file = dir.path().join("admin.key");
    let from_file = cs(&cli.url, None, &["approvals", "list", "--key-file", key_file.to_str().unwrap()]).await.ok();
    assert!(!from_file.stderr.contains("warning"), "{from_file:?}");
    let from_flag = cs(&cli.url, None, &["approvals", "list", "--key", &cli.admin]).await.ok();
    assert!(from_flag.stderr.contains(FLAG_WARNING), "{from_flag:?}");
    let no_file = cs(&cli.url, None, &["approvals", "list", "--key-file", "/nonexistent/admin.key"]).await;
    assert_eq!(no_file.code, 1);
    assert!(no_file.stderr.contains("cannot read the key file /nonexistent/admin.key"), "{no_file:?}");
    let bad_key = cli.with("cs_sk_not_a_real_key", &["approvals", "list"]).await;
    assert_eq!(bad_key.code, 1);
    assert!(bad_key.stderr.starts_with("error: "), "{bad_key:?}");
    let agent_queue = cli.with(bot.key().unwrap(), &["approvals", "list"]).await;
    assert_eq!(agent_queue.code, 1);
    assert!(agent_queue.stderr.starts_with("error: Not allowed: "), "{agent_queue:?}");
    let missing = cli.admin(&["approvals", "show", "apr_01ARZ3NDEKTSV4RRFFQ69G5FAV", "--json"]).await;
    assert_eq!(missing.code, 1);
    assert_eq!(missing.json()["status"], 404);
    assert!(missing.stderr.starts_with("error: "), "{missing:?}");
    let bad_params =
        cli.with(bot.key().unwrap(), &["actions", "submit", "--capability", "a.b.c", "--params", "{nope"]).await;
    assert_eq!(bad_params.code, 1);
    assert!(bad_params.stderr.contains("--params is not valid JSON"), "{bad_params:?}");
    let unreachable = cs("http://127.0.0.1:1", Some("cs_sk_x"), &["jobs", "list"]).await;
    assert_eq!(unreachable.code, 1);
    assert!(unreachable.stderr.contains("cannot reach the server at http://127.0.0.1:1"), "{unreachable:?}");

    // --url comes before the subcommand and wins over COUNTERSIGN_URL.
    let listed = cs("http://127.0.0.1:1", Some(&cli.admin), &["--url", &cli.url, "jobs", "list", "--json"]).await.ok();
    assert!(listed.json()["items"].is_array());

    // Usage errors are clap's: exit 2.
    assert_eq!(cli.admin(&["approvals"]).await.code, 2);
    assert_eq!(cli.admin(&["keys", "create"]).await.code, 2);
    assert_eq!(cli.admin(&["keys", "create", "--agent", "a", "--user", "b"]).await.code, 2);
    assert_eq!(cli.admin(&["actions", "wait", "act_x", "--timeout", "soon"]).await.code, 2);
    assert_eq!(cli.admin(&["audit", "verify", "--public-key", "x"]).await.code, 2);
    server.stop().await;
}

/// A duration too long for a deadline is a usage error (exit 2) from the parser, never a panic on
/// `Instant + timeout`; no server is needed, since parsing comes first.
#[tokio::test]
async fn huge_timeouts_are_usage_errors() {
    let url = "http://127.0.0.1:1";
    for args in [
        ["actions", "wait", "act_01ARZ3NDEKTSV4RRFFQ69G5FAV", "--timeout", "9300000000000000000s"],
        ["approvals", "wait", "apr_01ARZ3NDEKTSV4RRFFQ69G5FAV", "--timeout", "9300000000000000000"],
        ["jobs", "wait", "job_01ARZ3NDEKTSV4RRFFQ69G5FAV", "--timeout", "213503982334601d"],
        ["jobs", "wait", "job_01ARZ3NDEKTSV4RRFFQ69G5FAV", "--timeout", "1000000000s"],
    ] {
        let run = cs(url, Some("cs_sk_x"), &args).await;
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.stderr.contains("--timeout") && !run.stderr.contains("panicked"), "{run:?}");
    }
}

/// `webhooks create` for `approval.requested` to `url`, through the CLI; its JSON answer.
async fn subscribe(cli: &Cli, url: &str) -> Value {
    cli.admin(&["webhooks", "create", "--url", url, "--event", "approval.requested", "--json"]).await.ok().json()
}

/// `webhooks deliveries` pages with `--limit` and `--cursor`, as the "(more: …)" note tells.
#[tokio::test]
async fn webhook_deliveries_page_with_cursor_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let cli = Cli::of(&server);
    let receiver = Upstream::start().await;
    let webhook = subscribe(&cli, &format!("{}/hook", receiver.url)).await;
    let webhook = webhook["id"].as_str().unwrap().to_owned();
    let agent = server.agent("ops").await;
    for _ in 0..2 {
        assert_eq!(agent.submit_action(&action("payments.charge.card")).await.unwrap().status, 202);
    }
    let jobs = cli.admin(&["jobs", "list", "--subject", &webhook, "--json"]).await.ok().json();
    let jobs = jobs["items"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    for job in &jobs {
        let waited = cli.admin(&["jobs", "wait", job["id"].as_str().unwrap(), "--timeout", "30"]).await;
        assert_eq!(waited.code, 0, "{waited:?}");
    }

    let first = cli.admin(&["webhooks", "deliveries", &webhook, "--limit", "1", "--json"]).await.ok().json();
    assert_eq!(first["items"].as_array().unwrap().len(), 1, "{first}");
    let cursor = first["next_cursor"].as_str().unwrap_or_else(|| panic!("{first}")).to_owned();
    let table = cli.admin(&["webhooks", "deliveries", &webhook, "--limit", "1"]).await.ok();
    assert!(table.stderr.contains(&format!("(more: pass --cursor {cursor})")), "{table:?}");
    let second = cli
        .admin(&["webhooks", "deliveries", &webhook, "--limit", "1", "--cursor", &cursor, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(second["items"].as_array().unwrap().len(), 1, "{second}");
    assert_ne!(second["items"][0]["id"], first["items"][0]["id"]);
    let mut delivered: Vec<&Value> = [&first, &second].iter().map(|page| &page["items"][0]["job_id"]).collect();
    delivered.sort_by_key(|id| id.as_str());
    let mut expected: Vec<&Value> = jobs.iter().map(|job| &job["id"]).collect();
    expected.sort_by_key(|id| id.as_str());
    assert_eq!(delivered, expected);
    server.stop().await;
}

/// `log_format` in the configuration file chooses JSON log lines for `serve`; a value that is not a format
/// stops the start with a message naming the key.
#[tokio::test]
async fn serve_logs_json_when_the_config_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("countersign.toml");
    let serve = || {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_countersign"));
        command.arg("serve").arg("--config").arg(&config).stdin(Stdio::null()).kill_on_drop(true);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("COUNTERSIGN_") {
                command.env_remove(name);
            }
        }
        command.env("RUST_LOG", "info");
        command
    };

    std::fs::write(&config, "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nlog_format = \"json\"\n").unwrap();
    let mut child = serve().stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let event: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if event["fields"]["message"] == "serving" {
                return event;
            }
        }
        panic!("the server ended without logging that it serves");
    })
    .await
    .expect("no `serving` log line within 20 s");
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["fields"]["store"], "sqlite");
    assert!(serving["fields"]["url"].as_str().unwrap().starts_with("http://127.0.0.1:"), "{serving}");
    child.kill().await.unwrap();

    std::fs::write(&config, "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nlog_format = \"yaml\"\n").unwrap();
    let refused = serve().output().await.unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("log_format") && stderr.contains("json"), "{stderr}");
}

/// `actions wait` from an agent that already holds its `rate_limit.open_waits` asks again after the 429's
/// `retry_after_seconds` instead of failing, and settles once a slot is free.
#[tokio::test]
async fn a_wait_over_the_open_waits_is_asked_again_not_failed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::helpers::config(dir.path(), None);
    config.rate_limit.open_waits = 1;
    let server = TestServer::start_with(config, None).await;
    let bot = server.agent("cli-waiter").await;
    let first = bot.submit_action(&action("payments.charge.card")).await.unwrap();
    let second = bot.submit_action(&action("payments.charge.card")).await.unwrap();
    assert_eq!((first.status, second.status), (202, 202));
    let holder = {
        let (bot, id) = (bot.clone(), first.str("/id").to_owned());
        tokio::spawn(async move { bot.wait_action(&id, 120.0).await.unwrap() })
    };
    metric_until(&server.admin, "countersign_open_waits", 1.0).await;
    // The admin holds its one wait too (on a third action), so its `audit export` (an open wait while it
    // runs) is refused, and asked again until that wait ends, when the action is cancelled.
    let third = bot.submit_action(&action("payments.charge.card")).await.unwrap();
    let admin_holder = {
        let (admin, id) = (server.admin.clone(), third.str("/id").to_owned());
        tokio::spawn(async move { admin.wait_action(&id, 120.0).await.unwrap() })
    };
    metric_until(&server.admin, "countersign_open_waits", 2.0).await;
    let export_file = dir.path().join("export.jsonl");
    let exporting = {
        let (url, key) = (server.admin.base().to_owned(), server.admin.key().unwrap().to_owned());
        let out = export_file.to_str().unwrap().to_owned();
        tokio::spawn(async move { cs(&url, Some(&key), &["audit", "export", "--out", &out]).await })
    };
    metric_until_it(&server.admin, "countersign_open_waits_refused_total", |n| n >= 1.0).await;
    let cancelled = bot.post(&format!("/v1/actions/{}/cancel", third.str("/id")), &json!({})).await.unwrap();
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    assert_eq!(admin_holder.await.unwrap().status, 200);
    let exported = exporting.await.unwrap().ok();
    assert!(exported.stdout.contains("signed checkpoints"), "{}", exported.stdout);
    assert!(std::fs::read_to_string(&export_file).unwrap().contains("action.submitted"));
    metric_until(&server.admin, "countersign_open_waits", 1.0).await;
    let refused_before = {
        let text = server.admin.get("/metrics").await.unwrap().body.as_str().unwrap_or_default().to_owned();
        metric(&text, "countersign_open_waits_refused_total").unwrap()
    };

    let waiting = {
        let (url, key, id) =
            (server.admin.base().to_owned(), bot.key().unwrap().to_owned(), second.str("/id").to_owned());
        tokio::spawn(async move { cs(&url, Some(&key), &["actions", "wait", &id, "--timeout", "60", "--json"]).await })
    };
    metric_until_it(&server.admin, "countersign_open_waits_refused_total", |n| n > refused_before).await;

    // A wait whose deadline passes while every ask is refused ends as a timed-out wait does (exit 3, the
    // action as last seen), not as a failed command: its last ask, at the deadline, waits no time.
    let (url, key, id) = (server.admin.base(), bot.key().unwrap(), second.str("/id"));
    let timed_out = cs(url, Some(key), &["actions", "wait", id, "--timeout", "2", "--json"]).await;
    assert_eq!(timed_out.code, 3, "{} {}", timed_out.stdout, timed_out.stderr);
    assert_eq!(timed_out.json()["state"], "pending_approval", "{}", timed_out.stdout);

    // The first wait ends with its decision; the command's next ask takes the free slot and waits.
    assert_eq!(server.admin.approve(first.str("/approval/id"), None).await.unwrap().status, 200);
    assert_eq!(holder.await.unwrap().status, 200);
    metric_until(&server.admin, "countersign_open_waits", 1.0).await;
    assert_eq!(server.admin.approve(second.str("/approval/id"), None).await.unwrap().status, 200);
    let waited = waiting.await.unwrap().ok().json();
    assert_eq!(waited["id"], second.body["id"]);
    assert_eq!(waited["state"], "approved", "{waited}");
    server.stop().await;
}
