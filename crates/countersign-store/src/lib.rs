//! Implementations of `countersign_core::store::Store`: SQLite now (the embedded default), PostgreSQL
//! later, each with its own migrations and explicit row mapping.
//!
//! Nothing above this crate knows which database it talks to; no sqlx type leaves it.
#![forbid(unsafe_code)]

mod rows;
pub mod sqlite;

pub use sqlite::SqliteStore;
