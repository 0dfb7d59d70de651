//! The one integration-test binary: end-to-end tests through the typed client against a real server on
//! port 0, with real loopback upstreams and the real SQLite file; plus the workspace tidy checks.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod audit_and_reload;
mod audit_export;
mod cli;
mod core_loop;
mod crash;
mod dashboard;
mod fake_llm;
mod helpers;
mod jobs_webhooks;
mod limits;
mod llm_proxy;
mod llm_python;
mod mcp;
mod mcp_gateway;
mod openapi;
mod replicas;
mod tidy;
