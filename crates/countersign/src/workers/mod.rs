//! Background workers: approval expiry timers, the job runner (executions, webhook deliveries, audit export
//! and retention), the hourly retention sweep, and the policy file watcher. Each stops when the server's
//! shutdown token is cancelled.

pub mod expiry;
pub mod jobs;
pub mod policy_watch;
