//! The audit stream resumes from `Last-Event-ID`; replay refuses a frozen request that no longer matches its
//! approval's hash; the policy file reloads on change, and a bad edit leaves the running policy in force.

use futures_util::StreamExt;
use serde_json::json;

use crate::helpers::{TEST_POLICY, TestServer, Upstream, audit_stream, http_action, read_until};

#[tokio::test]
async fn a_tampered_frozen_request_is_refused_and_never_sent() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let server = TestServer::start(dir.path(), Some(&upstream.url)).await;
    let bot = server.agent("bot").await;
    let held = bot.submit_action(&http_action("payments.charge.card")).await.unwrap();
    assert_eq!(held.status, 202);
    // Someone with database access rewrites the frozen request while it waits for approval.
    let changed = crate::helpers::raw_sql(
        dir.path(),
        "UPDATE actions SET target = replace(target, '1200', '999999') WHERE id = ?",
        &[held.str("/id")],
    )
    .await;
    assert_eq!(changed, Ok(1));
    let approved = server.admin.approve(held.str("/approval/id"), None).await.unwrap();
    assert_eq!(approved.status, 200);
    let finished = bot.wait_action(held.str("/id"), 10.0).await.unwrap();
    assert_eq!(finished.str("/state"), "failed", "{:?}", finished.body);
    assert!(finished.str("/error").contains("no longer matches"));
    assert_eq!(upstream.count(), 0, "a tampered request is never sent");
    let failed = server.admin.get("/v1/audit?action=action.failed").await.unwrap();
    assert_eq!(failed.body["events"][0]["data"]["reason"], json!("request_hash_mismatch"));
    server.stop().await;
}

#[tokio::test]
async fn the_audit_stream_resumes_after_the_last_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let bot = server.agent("bot").await;
    let head = server.admin.get("/v1/audit?limit=1000").await.unwrap();
    let last_seq = head.body["events"].as_array().unwrap().last().unwrap()["seq"].as_i64().unwrap();

    let mut body = Box::pin(audit_stream(&server.admin, "", last_seq - 1).await);
    let mut text = String::new();
    // The backlog after the given id arrives first: exactly the last event.
    read_until(&mut body, &mut text, &format!("id: {last_seq}\n")).await;
    assert!(!text.contains(&format!("id: {}\n", last_seq - 1)));
    // Then new events arrive live.
    bot.submit_action(&json!({"capability": "email.send.message", "reasoning": "hi"})).await.unwrap();
    read_until(&mut body, &mut text, "action.submitted").await;
    assert!(text.contains(&format!("id: {}\n", last_seq + 1)));
    drop(body);

    // A viewer's stream ends once its key is revoked, without serving the events after that.
    assert_eq!(server.admin.create_user("auditor", "viewer").await.unwrap().status, 201);
    let created = server.admin.create_key("user", "auditor").await.unwrap();
    let viewer = server.admin.with_key(created.str("/key").to_owned());
    let mut watched = Box::pin(audit_stream(&viewer, "", last_seq + 1).await);
    let mut seen = String::new();
    bot.submit_action(&json!({"capability": "email.send.message", "reasoning": "seen"})).await.unwrap();
    read_until(&mut watched, &mut seen, "action.submitted").await;
    assert!(server.admin.revoke_key(created.str("/id")).await.unwrap().status < 300);
    bot.submit_action(&json!({"capability": "email.send.message", "reasoning": "unseen"})).await.unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(chunk) = watched.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream of a revoked key ends; it read: {seen}");
    assert!(!seen.contains("key.revoked") && !seen.contains("unseen"), "{seen}");
    server.stop().await;
}

#[tokio::test]
async fn the_policy_file_reloads_and_a_bad_edit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None).await;
    let admin = server.admin.clone();
    let before = admin.get("/v1/policy").await.unwrap();

    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, format!("{TEST_POLICY}\n  - name: bad\n    effect: maybe\n")).unwrap();
    assert!(server.reload().await.is_err());
    assert_eq!(admin.get("/v1/policy").await.unwrap().body["version"], before.body["version"]);

    std::fs::write(&policy, TEST_POLICY.replace("Deletes are never allowed", "No deletes, ever")).unwrap();
    let version = server.reload().await.unwrap();
    let after = admin.get("/v1/policy").await.unwrap();
    assert_eq!(after.body["version"], json!(version));
    assert_ne!(after.body["version"], before.body["version"]);
    let updates = admin.get("/v1/audit?action=policy.updated").await.unwrap();
    assert_eq!(updates.body["events"].as_array().unwrap().len(), 2);
    server.stop().await;
}
