//! The cluster's shape and its wires.
//!
//! - [`topology`]: the cluster file: regions → datacenters → nodes, the
//!   cells with their replicas and leader preference, the shard map and the
//!   emulated latency between regions.
//! - [`ledgers`]: the versioned ledger definitions (which ledgers exist).
//! - [`routing`]: the versioned routing table (which cell owns each shard).
//! - [`transport`]: node-to-node messages over TCP, with bounded queues,
//!   backpressure and emulated one-way latency.

#![forbid(unsafe_code)]

pub mod ledgers;
pub mod routing;
pub mod topology;
pub mod transport;
