//! Durable storage for a cellpay node.
//!
//! - [`wal`]: the write-ahead log. Checksummed records in segment files, group
//!   commit (one fsync for many records), recovery that cuts a torn tail and
//!   reports corruption in the middle.
//! - [`store`]: the checkpointed history store (every transfer ever, pending
//!   statuses, balance history, account snapshots) on an embedded engine; it
//!   implements the ledger's `History` trait.

#![forbid(unsafe_code)]

pub mod store;
pub mod wal;
