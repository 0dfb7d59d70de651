//! The real `openai` and `anthropic` Python packages drive the LLM proxy, against a real server and the fake
//! provider: allowed calls, streamed calls whose chunks arrive before the stream ends, denied calls that
//! raise with the rule's name, a held call approved from another thread, and a held call that expires.
//!
//! The packages live in the repository's `.venv`, made by `scripts/python-env` (which `scripts/test` runs
//! first). Without it this test fails and says so; it never skips silently.

use std::path::PathBuf;

use crate::fake_llm::{CHUNK_DELAY, FakeProvider};
use crate::helpers::{TestServer, llm_config};

fn repository_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_openai_and_anthropic_python_clients_work_through_the_proxy() {
    let root = repository_root();
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/python-env` first (it creates .venv with the openai and anthropic packages)",
        python.display()
    );
    let script = root.join("crates/countersign/tests/python/llm_clients.py");

    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start().await;
    let server = TestServer::start_with(llm_config(dir.path(), &provider.url), None).await;
    let agent = server.agent("python-agent").await;

    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .env("COUNTERSIGN_URL", agent.base())
        .env("COUNTERSIGN_AGENT_KEY", agent.key().unwrap())
        .env("COUNTERSIGN_ADMIN_KEY", server.admin.key().unwrap())
        .env("FAKE_CHUNK_DELAY", CHUNK_DELAY.as_secs_f64().to_string())
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("ANTHROPIC_BASE_URL")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the Python clients failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    for case in ["allowed", "streamed", "denied", "held_approved", "held_expired"] {
        assert!(stdout.contains(&format!("ok {case}")), "case {case} did not run:\n{stdout}");
    }
    server.stop().await;
}
