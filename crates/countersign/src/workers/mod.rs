//! Background workers: approval expiry timers, the job runner (executions, webhook deliveries, audit export
//! and retention), the hourly retention sweep, the policy file watcher, and (PostgreSQL) the feed of other replicas' changes. Each stops when the server's
//! shutdown token is cancelled.

pub mod expiry;
pub mod jobs;
pub mod policy_watch;
pub mod replicas;
