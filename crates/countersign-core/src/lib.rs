//! Countersign's pure domain: identifiers, capability names and globs, the policy language, the action and
//! approval state machines, the risk score, audit-chain hashing, secrets, and the `Store` trait.
//!
//! Nothing here does IO: no sockets, no database driver, no HTTP. The gateway in the `countersign` crate
//! combines these pieces with a store and the network.
#![forbid(unsafe_code)]

pub mod audit;
pub mod capability;
pub mod clock;
pub mod domain;
pub mod ids;
pub mod policy;
pub mod risk;
pub mod secrets;
pub mod state;
pub mod store;
