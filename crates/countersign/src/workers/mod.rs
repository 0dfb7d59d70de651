//! Background workers: approval expiry timers, the executor of approved actions, and the policy file
//! watcher. Each stops when the server's shutdown token is cancelled.

pub mod executor;
pub mod expiry;
pub mod policy_watch;
