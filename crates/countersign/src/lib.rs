//! Countersign: the governance gateway for AI agents. This crate is the server (gateway services, HTTP
//! API, workers, connectors), the typed client and the command-line client over it (`cli`); `main.rs` is
//! the thin binary over them.
//!
//! Policy, state transitions and audit happen in `gateway` only; every other module is an adapter.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod config;
pub mod connectors;
pub mod dashboard;
pub mod error;
pub mod gateway;
pub mod http;
pub mod mcp;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod telemetry;
pub mod text;
pub mod workers;
