//! The real `openai` and `anthropic` Python packages drive the LLM proxy, against a real server and the fake
//! provider: allowed calls, streamed calls whose chunks arrive before the stream ends, denied calls that
//! raise with the rule's name, a held call approved from another thread, and a held call that expires.
//!
//! The packages live in the repository's `.venv`, made by `scripts/python-env` (which `scripts/test` runs
//! first). Without it this test fails and says so; it never skips silently.

use crate::fake_llm::{CHUNK_DELAY, FakeProvider};
use crate::helpers::{TestServer, llm_config, run_python_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_openai_and_anthropic_python_clients_work_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let provider = FakeProvider::start().await;
    let server = TestServer::start_with(llm_config(dir.path(), &provider.url), None).await;
    let agent = server.agent("python-agent").await;
    let delay = CHUNK_DELAY.as_secs_f64().to_string();
    let cases = ["allowed", "streamed", "denied", "held_approved", "held_expired", "held_past_client_timeout"];
    run_python_client("llm_clients.py", &agent, &server.admin, &[("FAKE_CHUNK_DELAY", &delay)], &cases).await;
    server.stop().await;
}
