//! Countersign's pure domain: identifiers, capability names and globs, the policy language, the action and
//! approval state machines, the risk score, audit-chain hashing and signed checkpoints, secrets, and the
//! `Store` trait.
//!
//! No sockets, no database driver, no HTTP; the only IO is reading or creating the checkpoint signing key
//! file. The gateway in the `countersign` crate
//! combines these pieces with a store and the network.
#![forbid(unsafe_code)]

pub mod audit;
pub mod capability;
pub mod checkpoint;
pub mod clock;
pub mod domain;
pub mod ids;
pub mod policy;
pub mod risk;
pub mod secrets;
pub mod state;
pub mod store;
