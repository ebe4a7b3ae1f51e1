//! The cellpay ledger: a pure, deterministic double-entry state machine.
//!
//! Architecture invariant: this crate does no I/O, reads no clock, uses no
//! randomness and no threads. Its time comes from the caller (later: consensus)
//! with every batch; iteration over hash maps never reaches a result.

#![forbid(unsafe_code)]

mod accounts;
pub mod history;
pub mod id;
pub mod query;
pub mod result;
pub mod types;

pub use history::{CheckpointDelta, History, MemoryHistory};
pub use query::{AccountFilter, FilterError, QUERY_LIMIT_MAX};
pub use result::{CreateAccountResult, CreateTransferResult};
pub use types::{Account, AccountBalance, AccountFlags, PendingStatus, Transfer, TransferFlags, RECORD_SIZE};

/// The most events one request may carry (as in TigerBeetle: 8,190 × 128 bytes fits a 1 MiB message).
pub const BATCH_EVENTS_MAX: usize = 8190;

pub mod state_machine;
pub use state_machine::{Ledger, LedgerConfig, LedgerTotals};
