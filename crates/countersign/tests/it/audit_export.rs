//! The audit log for auditors: an export verified offline by the real binary's `audit verify` with the public
//! key, a tampered export named at its first broken seq, retention that deletes a prefix while a signed
//! checkpoint keeps both the live chain and later exports verifiable, and online verification that holds a
//! rewritten chain against the checkpoints signed before the rewrite.

use std::sync::Arc;

use countersign_core::ids::OrgId;
use countersign_core::store::{AuditFilter, Store};
use serde_json::json;

use crate::helpers::{ShiftedClock, TestServer, Upstream, action, config, database_for, http_action, raw_sql};

/// Runs `countersign audit verify` on an export; answers the exit code and what it printed.
fn verify_offline(dir: &std::path::Path, name: &str, export: &str, public_key: &str) -> (i32, String) {
    let file = dir.join(name);
    std::fs::write(&file, export).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_countersign"))
        .args(["audit", "verify", "--file"])
        .arg(&file)
        .args(["--public-key", public_key])
        .output()
        .unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test]
async fn exports_verify_offline_and_retention_keeps_the_chain_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let clock = Arc::new(ShiftedClock::default());
    let server = TestServer::start_with(config(dir.path(), Some(&upstream.url)), Some(clock.clone())).await;
    let admin = &server.admin;
    let agent = server.agent("writer").await;
    // Enough successes (carried out, so they count as precedent) that the risk score becomes a float like
    // 0.030000000000000006, which must survive the store's JSON round trip without changing the chain hash.
    for n in 0..25 {
        let submitted = agent.submit_action(&http_action("email.send.message")).await.unwrap();
        assert_eq!(submitted.body["verdict"]["risk"]["prior_successes"], n, "{:?}", submitted.body);
        let done = agent.wait_action(submitted.str("/id"), 10.0).await.unwrap();
        assert_eq!(done.str("/state"), "succeeded", "{:?}", done.body);
    }
    let verified = admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verified.body["ok"], true, "{:?}", verified.body);
    let key = admin.get("/v1/audit/public-key").await.unwrap();
    assert_eq!(key.str("/algorithm"), "ed25519");
    let public_key = key.str("/public_key").to_owned();

    // The one-call export, and the same export as a job.
    let export = admin.get("/v1/audit/export").await.unwrap();
    assert_eq!(export.status, 200);
    assert_eq!(export.content_type, "application/jsonl");
    let text = export.body.as_str().unwrap().to_owned();
    let last = text.lines().last().unwrap();
    assert!(last.starts_with(r#"{"checkpoint":"#), "an export ends with its signed checkpoint: {last}");
    let (code, out) = verify_offline(dir.path(), "full.jsonl", &text, &public_key);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok:"), "{out}");
    let org = serde_json::from_str::<serde_json::Value>(text.lines().next().unwrap()).unwrap()["org_id"].clone();
    assert!(out.contains(&format!(" of org {} ", org.as_str().unwrap())), "names whose log it is: {out}");

    let queued = admin.post("/v1/audit/exports", &json!({})).await.unwrap();
    assert_eq!(queued.status, 202);
    let job = admin.get(&format!("/v1/jobs/{}/wait?timeout=10", queued.str("/id"))).await.unwrap();
    assert_eq!(job.str("/state"), "succeeded", "{:?}", job.body);
    assert_eq!(job.body["progress"]["events_written"], job.body["result"]["events"], "{:?}", job.body);
    let file = admin.get(&format!("/v1/audit/exports/{}", queued.str("/id"))).await.unwrap();
    assert_eq!(file.status, 200);
    {
        // The org's whole log is readable by the server's user only.
        use std::os::unix::fs::PermissionsExt;
        let export = dir.path().join("exports").join(format!("{}.jsonl", queued.str("/id")));
        assert_eq!(std::fs::metadata(&export).unwrap().permissions().mode() & 0o077, 0);
    }
    assert_eq!(verify_offline(dir.path(), "job.jsonl", file.body.as_str().unwrap(), &public_key).0, 0);

    // A changed word in one event, and a different key: both refused, the first naming the seq.
    let tampered = text.replacen("email.send.message", "email.send.messagf", 1);
    let seq = text
        .lines()
        .find(|l| l.contains("email.send.message"))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_i64().unwrap())
        .unwrap();
    let (code, out) = verify_offline(dir.path(), "tampered.jsonl", &tampered, &public_key);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with(&format!("BROKEN at seq {seq}")), "{out}");
    let other_key = countersign_core::checkpoint::AuditSigner::generate().public_key_base64();
    assert_eq!(verify_offline(dir.path(), "other-key.jsonl", &text, &other_key).0, 1);
    assert_eq!(agent.get("/v1/audit/public-key").await.unwrap().status, 200, "the public key is public");
    assert_eq!(agent.get("/v1/audit/export").await.unwrap().status, 403);

    // Retention: nothing is a day old yet; two days later, everything before goes behind a checkpoint.
    let set = admin.send(reqwest::Method::PUT, "/v1/audit/retention", Some(&json!({"days": 1}))).await.unwrap();
    assert_eq!(set.status, 200, "{:?}", set.body);
    let first_run = admin.get(&format!("/v1/jobs/{}/wait?timeout=10", set.str("/job/id"))).await.unwrap();
    assert_eq!(first_run.body["result"]["deleted"], 0, "{:?}", first_run.body);
    let head_before = admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(head_before.body["ok"], true);

    clock.advance(chrono::Duration::days(2));
    assert_eq!(agent.submit_action(&action("email.send.message")).await.unwrap().status, 200);
    let set = admin.send(reqwest::Method::PUT, "/v1/audit/retention", Some(&json!({"days": 1}))).await.unwrap();
    let run = admin.get(&format!("/v1/jobs/{}/wait?timeout=10", set.str("/job/id"))).await.unwrap();
    assert_eq!(run.str("/state"), "succeeded", "{:?}", run.body);
    let deleted = run.body["result"]["deleted"].as_u64().unwrap();
    let upto = run.body["result"]["upto_seq"].as_i64().unwrap();
    assert!(deleted >= 20 && upto as u64 == deleted, "{:?}", run.body);
    let retention = admin.get("/v1/audit/retention").await.unwrap();
    assert_eq!(retention.body, json!({"days": 1, "deleted_upto_seq": upto}));
    let remaining = admin.get("/v1/audit?limit=1").await.unwrap();
    assert_eq!(remaining.body["events"][0]["seq"], upto + 1, "the prefix is gone");

    let verified = admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verified.body["ok"], true, "{:?}", verified.body);
    let trimmed = admin.get("/v1/audit/export").await.unwrap().body.as_str().unwrap().to_owned();
    let first_line: serde_json::Value = serde_json::from_str(trimmed.lines().next().unwrap()).unwrap();
    assert_eq!(first_line["checkpoint"]["seq"], upto, "the export opens with the checkpoint retention left");
    let (code, out) = verify_offline(dir.path(), "trimmed.jsonl", &trimmed, &public_key);
    assert_eq!(code, 0, "{out}");
    // Without that opening checkpoint nothing vouches for the first remaining event.
    let headless: String = trimmed.lines().skip(1).map(|l| format!("{l}\n")).collect();
    let (code, out) = verify_offline(dir.path(), "headless.jsonl", &headless, &public_key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("seq {}", upto + 1)), "{out}");

    let bad = admin.send(reqwest::Method::PUT, "/v1/audit/retention", Some(&json!({"days": 0}))).await.unwrap();
    assert_eq!(bad.status, 422);
    // A window whose cutoff would fall before the calendar's start is refused, naming the range.
    let huge = admin.send(reqwest::Method::PUT, "/v1/audit/retention", Some(&json!({"days": 4_000_000_000u32}))).await;
    let huge = huge.unwrap();
    assert_eq!(huge.status, 422, "{}", huge.body);
    assert!(huge.body.to_string().contains("between 1 and 36500"), "{}", huge.body);
    let kept = admin.send(reqwest::Method::GET, "/v1/audit/retention", None).await.unwrap();
    assert_eq!(kept.body["days"], 1);
    server.stop().await;
}

/// Rewrites one event as someone with write access to the database could: drops the trigger that refuses
/// updates, changes the event's data, and recomputes every hash from it to the head (and, on PostgreSQL, the
/// head the appends chain after), so the chain is whole again. Only a signature can tell. The server must be
/// stopped.
async fn rewrite_event(data_dir: &std::path::Path, org: &OrgId, seq: i64) {
    let store: Box<dyn Store> = match database_for(data_dir).await {
        Some(ref url) => Box::new(countersign_store::PostgresStore::connect(url).await.unwrap()),
        None => Box::new(countersign_store::SqliteStore::open(&data_dir.join("countersign.db")).await.unwrap()),
    };
    let events = store.read().await.unwrap().list_audit(org, &AuditFilter::default(), seq - 1, 100_000).await.unwrap();
    drop(store);
    assert_eq!(events.first().map(|e| e.seq), Some(seq));
    let mut prev_hash: Option<String> = None;
    let mut rewritten = Vec::new();
    for mut event in events {
        if event.seq == seq {
            event.data["to"] = json!("attacker@example.com");
        }
        if let Some(prev) = prev_hash {
            event.prev_hash = prev;
        }
        event.hash = event.compute_hash();
        prev_hash = Some(event.hash.clone());
        rewritten.push(event);
    }
    let head = rewritten.last().unwrap();
    let postgres = database_for(data_dir).await.is_some();
    let drop_trigger = if postgres { " ON audit_events" } else { "" };
    raw_sql(data_dir, &format!("DROP TRIGGER audit_events_no_update{drop_trigger}"), &[]).await.unwrap();
    let update =
        "UPDATE audit_events SET data = ?, prev_hash = ?, hash = ? WHERE org_id = ? AND seq = CAST(? AS BIGINT)";
    for event in &rewritten {
        let (data, seq) = (event.data.to_string(), event.seq.to_string());
        let binds = [data.as_str(), &event.prev_hash, &event.hash, org.as_str(), &seq];
        assert_eq!(raw_sql(data_dir, update, &binds).await, Ok(1));
    }
    if postgres {
        let head_update = "UPDATE audit_heads SET hash = ? WHERE org_id = ? AND seq = CAST(? AS BIGINT)";
        let seq = head.seq.to_string();
        assert_eq!(raw_sql(data_dir, head_update, &[&head.hash, org.as_str(), &seq]).await, Ok(1));
    }
}

/// A server with three actions submitted and the head then signed (`POST /v1/audit/checkpoints`'s answer).
async fn signed_after_three_actions(
    data_dir: &std::path::Path,
) -> (TestServer, countersign::client::Client, countersign::client::ApiResponse) {
    let server = TestServer::start(data_dir, None).await;
    let agent = server.agent("writer").await;
    for _ in 0..3 {
        assert_eq!(agent.submit_action(&action("email.send.message")).await.unwrap().status, 200);
    }
    let signed = server.admin.post("/v1/audit/checkpoints", &json!({})).await.unwrap();
    assert_eq!(signed.status, 201, "{:?}", signed.body);
    (server, agent, signed)
}

#[tokio::test]
async fn online_verify_holds_a_rewritten_chain_against_its_signed_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, signed) = signed_after_three_actions(dir.path()).await;
    let checkpoint_seq = signed.body["checkpoint"]["seq"].as_i64().unwrap();
    let org = OrgId::parse(signed.str("/checkpoint/org_id")).unwrap();
    // Signing the same head again answers the stored checkpoint.
    let again = server.admin.post("/v1/audit/checkpoints", &json!({})).await.unwrap();
    assert_eq!((again.status, &again.body), (201, &signed.body));
    // Events after the checkpoint, so the rewrite runs on past it.
    assert_eq!(agent.submit_action(&action("email.send.message")).await.unwrap().status, 200);
    let submitted = server.admin.get("/v1/audit?action=action.submitted&limit=100").await.unwrap();
    let forged_seq = submitted.body["events"].as_array().unwrap().iter().filter_map(|e| e["seq"].as_i64()).min();
    let forged_seq = forged_seq.unwrap();
    assert!(forged_seq < checkpoint_seq, "{forged_seq} {checkpoint_seq}");
    let verified = server.admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verified.body["ok"], true, "{:?}", verified.body);
    server.stop().await;

    rewrite_event(dir.path(), &org, forged_seq).await;

    let clock = Arc::new(ShiftedClock::default());
    let server = TestServer::start_with(config(dir.path(), None), Some(clock.clone())).await;
    let verified = server.admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verified.status, 200);
    assert_eq!(verified.body["ok"], false, "the rewritten chain is whole but the checkpoint says otherwise");
    assert_eq!(verified.body["first_broken_seq"], checkpoint_seq, "{:?}", verified.body);
    // Retention deletes nothing from a log that fails verification, though every event is past its window:
    // what it would delete may be the evidence, and a fresh checkpoint over the rewritten hash would launder it.
    clock.advance(chrono::Duration::days(2));
    let set = server.admin.send(reqwest::Method::PUT, "/v1/audit/retention", Some(&json!({"days": 1}))).await.unwrap();
    assert_eq!(set.status, 200, "{:?}", set.body);
    let run = server.admin.get(&format!("/v1/jobs/{}/wait?timeout=10", set.str("/job/id"))).await.unwrap();
    assert_eq!(run.str("/state"), "failed", "{:?}", run.body);
    let error = run.str("/error");
    assert!(error.contains(&format!("fails verification at seq {checkpoint_seq}")), "{error}");
    let first = server.admin.get("/v1/audit?limit=1").await.unwrap();
    assert_eq!(first.body["events"][0]["seq"], 1, "nothing was deleted: {:?}", first.body);
    server.stop().await;
}

/// Someone with write access to the database can move the retention marker and delete a prefix behind any
/// stored checkpoint, which the schema's delete guard allows. Retention records every cut it makes in the log
/// it leaves, so a cut without that record, or behind a checkpoint that does not verify, never verifies, even
/// when no event follows it.
#[tokio::test]
async fn a_prefix_cut_by_hand_never_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (server, agent, signed) = signed_after_three_actions(dir.path()).await;
    let cut = signed.body["checkpoint"]["seq"].as_i64().unwrap().to_string();
    let org = signed.str("/checkpoint/org_id").to_owned();
    assert_eq!(agent.submit_action(&action("email.send.message")).await.unwrap().status, 200);
    server.stop().await;

    let mark = "INSERT INTO audit_retention (org_id, deleted_upto) VALUES (?, CAST(? AS BIGINT))
                ON CONFLICT (org_id) DO UPDATE SET deleted_upto = excluded.deleted_upto";
    let delete = "DELETE FROM audit_events WHERE org_id = ? AND seq <= CAST(? AS BIGINT)";
    // Behind a valid checkpoint (the one just signed): the prefix is gone with no record of retention.
    raw_sql(dir.path(), mark, &[&org, &cut]).await.unwrap();
    assert!(raw_sql(dir.path(), delete, &[&org, &cut]).await.unwrap() > 0);
    let server = TestServer::start(dir.path(), None).await;
    let verified = server.admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verified.body["ok"], false, "{:?}", verified.body);
    let after_cut = cut.parse::<i64>().unwrap() + 1;
    assert_eq!(verified.body["first_broken_seq"], after_cut, "{:?}", verified.body);
    server.stop().await;

    // Behind a junk checkpoint far past the head, with every event gone: nothing follows the cut to break.
    let far = "1000000";
    let junk = "INSERT INTO audit_checkpoints (org_id, seq, head_hash, time_us, key_id, signature)
                VALUES (?, CAST(? AS BIGINT), 'h', 1, 'k', 's')";
    raw_sql(dir.path(), junk, &[&org, far]).await.unwrap();
    raw_sql(dir.path(), mark, &[&org, far]).await.unwrap();
    assert!(raw_sql(dir.path(), delete, &[&org, far]).await.unwrap() > 0);
    let server = TestServer::start(dir.path(), None).await;
    let verified = server.admin.get("/v1/audit/verify").await.unwrap();
    assert_eq!(verified.body["ok"], false, "{:?}", verified.body);
    assert_eq!(verified.body["first_broken_seq"], 1_000_001, "{:?}", verified.body);
    server.stop().await;
}

/// The database records only the audit key's public half, and a start with another key file (a lost one
/// replaced by a new one) or none is refused, since its checkpoints would verify against nothing signed before.
#[tokio::test]
async fn the_signing_key_stays_out_of_the_database_and_another_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let public_key = server.admin.get("/v1/audit/public-key").await.unwrap().str("/public_key").to_owned();
    server.stop().await;
    let no_private = raw_sql(dir.path(), "DELETE FROM instance_secrets WHERE name = 'audit_signing_key'", &[]).await;
    assert_eq!(no_private, Ok(0), "no private key in the database");
    let recorded = "UPDATE instance_secrets SET value = value WHERE name = 'audit_public_key' AND value = ?";
    assert_eq!(raw_sql(dir.path(), recorded, &[&public_key]).await, Ok(1), "its public half is recorded");

    let path = dir.path().join("audit-signing.key");
    let original = std::fs::read_to_string(&path).unwrap();
    let build = || async {
        let mut config = config(dir.path(), None);
        config.database_url = database_for(dir.path()).await.map(countersign::config::Secret::new);
        countersign::server::Server::build(config).await.map(|_| ()).unwrap_err().to_string()
    };
    std::fs::write(&path, countersign_core::checkpoint::AuditSigner::generate().to_file_contents()).unwrap();
    let refused = build().await;
    assert!(refused.contains("but this database's checkpoints are signed with key"), "{refused}");
    std::fs::remove_file(&path).unwrap();
    let refused = build().await;
    assert!(refused.contains("does not exist, but this database's checkpoints are signed with key"), "{refused}");
    assert!(!path.exists(), "no new key was made");

    std::fs::write(&path, &original).unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let again = server.admin.get("/v1/audit/public-key").await.unwrap().str("/public_key").to_owned();
    assert_eq!(again, public_key);
    server.stop().await;
}

/// `audit verify` is run on exports nobody trusts: what it prints from the file (here a key id that is a
/// terminal escape drawing a fake "ok" line) reaches the terminal as visible escapes, never as control bytes.
#[test]
fn offline_verify_prints_nothing_from_the_file_raw() {
    let dir = tempfile::tempdir().unwrap();
    let forged = json!({"checkpoint": {"org_id": "org_x", "seq": 1, "head_hash": "00", "time_us": 0,
                                       "key_id": "\u{1b}[2K\r\u{1b}[1Aok: 5120 events", "signature": "AA=="}});
    let public_key = countersign_core::checkpoint::AuditSigner::generate().public_key_base64();
    let (code, out) = verify_offline(dir.path(), "forged.jsonl", &format!("{forged}\n"), &public_key);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("BROKEN"), "{out}");
    assert!(!out.contains('\u{1b}') && !out.contains('\r'), "{out:?}");
}

/// A data directory the server creates is private to its user: the database holds webhook signing secrets
/// and every action's params.
#[tokio::test]
async fn a_data_directory_the_server_creates_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = config(dir.path(), None);
    settings.data_dir = dir.path().join("fresh/data");
    let server = TestServer::start_with(settings, None).await;
    let mode = std::fs::metadata(dir.path().join("fresh/data")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    server.stop().await;
}
