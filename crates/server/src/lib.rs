//! The cellpay node: one process that owns a ledger and its durable storage.
//!
//! - [`node`]: the engine. One thread owns the ledger, the write-ahead log and
//!   the history store; requests reach it through a bounded queue and are
//!   group-committed (many requests, one fsync) before they are applied and
//!   answered. Recovery at start-up rebuilds the ledger from the last
//!   checkpoint plus the log.
//! - [`record`]: the write-ahead log's record format (one record per write request).
//! - [`metrics`]: Prometheus metrics.
//! - [`front`]: the network front ends: REST, gRPC, `/metrics`, `/health` and
//!   `/openapi.json` on one listener, with connection and in-flight limits,
//!   serving a node or a gateway.
//! - [`gateway`]: the stateless router in front of the cells (`cellpay
//!   gateway`): splits requests by cell, sends each part to its cell's
//!   leader, merges the answers, batches across clients.
//!
//! Architecture invariant: only this crate (and the binary) knows about
//! threads, clocks, sockets and HTTP; the ledger crate stays pure.

#![forbid(unsafe_code)]

pub mod cell_state;
pub mod cross_cell;
pub mod front;
pub mod metrics;
pub mod node;
pub mod record;

pub use front::{serve, FrontLimits};
pub mod forward;
pub mod gateway;
pub mod raft_log;
pub mod raft_logger;
pub mod snapshot;
pub mod world;
