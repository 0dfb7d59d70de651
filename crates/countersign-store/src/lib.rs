//! Implementations of `countersign_core::store::Store`: SQLite (the embedded default) and PostgreSQL (one
//! database shared by several replicas), each with its own migrations and explicit row mapping.
//!
//! Nothing above this crate knows which database it talks to; no sqlx type leaves it, except through
//! [`PostgresStore::pool`]. Replicas on one PostgreSQL hear each other through [`PostgresStore::subscribe`].
#![forbid(unsafe_code)]

pub mod postgres;
mod rows;
pub mod sqlite;
mod stmt;
mod writes;

pub use postgres::{
    CHANGES_CHANNEL, DEAF_REPORT_INTERVAL, FEED_APPLICATION_NAME, FeedEvent, FeedHealth, HEARTBEAT_ECHO,
    HEARTBEAT_QUIET, PostgresStore, ReplicaFeed,
};
pub use sqlite::SqliteStore;
