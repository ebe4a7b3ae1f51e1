//! What the ledger has checkpointed, and how it reads it back.
//!
//! The ledger keeps its hot state in memory: every account, every open pending
//! transfer, and everything applied since the last checkpoint. All older
//! history (every transfer ever, the status of every resolved pending transfer,
//! balance history) lives in a [`History`] store, which the ledger only reads.
//! A checkpoint drains the ledger's new state as a [`CheckpointDelta`], which
//! the caller writes to the store before the ledger applies anything else.
//!
//! The ledger crate does no I/O: the store is passed in by the caller (the
//! storage crate implements it on disk; [`MemoryHistory`] here is the model
//! implementation used by tests and the simulator).

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use crate::query::AccountFilter;
use crate::types::{Account, AccountBalance, PendingStatus, Transfer};

/// Read access to checkpointed history. Implementations must answer exactly
/// what was written by the deltas applied so far, so that replaying the same
/// events over the same history gives the same results.
pub trait History {
    /// A checkpointed transfer by id.
    fn transfer(&self, id: u128) -> Option<Transfer>;
    /// The checkpointed status of a pending transfer.
    fn pending_status(&self, id: u128) -> Option<PendingStatus>;
    /// Checkpointed transfers of `filter.account_id` that match the filter, in
    /// timestamp order (descending when `filter.reversed`), at most `filter.limit`.
    fn account_transfers(&self, filter: &AccountFilter) -> Vec<Transfer>;
    /// Checkpointed balances of `filter.account_id` that match the filter (only
    /// `timestamp_min`, `timestamp_max`, `limit`, `reversed` apply), in timestamp order.
    fn account_balances(&self, filter: &AccountFilter) -> Vec<AccountBalance>;
}

/// Everything that changed since the previous checkpoint, in a deterministic order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointDelta {
    /// The accounts created or changed, sorted by id (full new values).
    pub accounts: Vec<Account>,
    /// The transfers applied, in timestamp order.
    pub transfers: Vec<Transfer>,
    /// The pending transfers whose status changed (new pending ones included), sorted by id.
    pub pending_statuses: Vec<(u128, PendingStatus)>,
    /// Balances of `history` accounts after each transfer, in timestamp order.
    pub balances: Vec<AccountBalance>,
    /// The ledger's last assigned timestamp.
    pub timestamp_last: u64,
}

/// An in-memory history store: the model every real store must agree with.
#[derive(Clone, Debug, Default)]
pub struct MemoryHistory {
    pub accounts: BTreeMap<u128, Account>,
    /// By id; hashed, since point lookups dominate and nothing iterates it.
    pub transfers: FxHashMap<u128, Transfer>,
    pub pending_statuses: BTreeMap<u128, PendingStatus>,
    /// (account id, timestamp) → transfer id.
    account_transfers: BTreeMap<(u128, u64), u128>,
    /// (account id, timestamp) → balance.
    balances: BTreeMap<(u128, u64), AccountBalance>,
    pub timestamp_last: u64,
}

impl MemoryHistory {
    pub fn new() -> MemoryHistory {
        MemoryHistory::default()
    }

    pub fn apply(&mut self, delta: &CheckpointDelta) {
        assert!(delta.timestamp_last >= self.timestamp_last, "checkpoints must not go back in time");
        for account in &delta.accounts {
            self.accounts.insert(account.id, *account);
        }
        for transfer in &delta.transfers {
            let previous = self.transfers.insert(transfer.id, *transfer);
            assert!(previous.is_none(), "transfer {} checkpointed twice", transfer.id);
            self.account_transfers.insert((transfer.debit_account_id, transfer.timestamp), transfer.id);
            self.account_transfers.insert((transfer.credit_account_id, transfer.timestamp), transfer.id);
        }
        for (id, status) in &delta.pending_statuses {
            self.pending_statuses.insert(*id, *status);
        }
        for balance in &delta.balances {
            self.balances.insert((balance.account_id, balance.timestamp), *balance);
        }
        self.timestamp_last = delta.timestamp_last;
    }

    /// The open pending transfers, for restoring a ledger (sorted by id).
    pub fn open_pending(&self) -> Vec<Transfer> {
        self.pending_statuses
            .iter()
            .filter(|(_, status)| **status == PendingStatus::Pending)
            .map(|(id, _)| self.transfers[id])
            .collect()
    }
}

impl History for MemoryHistory {
    fn transfer(&self, id: u128) -> Option<Transfer> {
        self.transfers.get(&id).copied()
    }

    fn pending_status(&self, id: u128) -> Option<PendingStatus> {
        self.pending_statuses.get(&id).copied()
    }

    fn account_transfers(&self, filter: &AccountFilter) -> Vec<Transfer> {
        let (min, max) = filter.timestamp_range();
        let range = self.account_transfers.range((filter.account_id, min)..=(filter.account_id, max));
        let matching = |(_, id): (&(u128, u64), &u128)| {
            let transfer = self.transfers[id];
            filter.matches_transfer(&transfer).then_some(transfer)
        };
        let limit = filter.limit as usize;
        if filter.reversed {
            range.rev().filter_map(matching).take(limit).collect()
        } else {
            range.filter_map(matching).take(limit).collect()
        }
    }

    fn account_balances(&self, filter: &AccountFilter) -> Vec<AccountBalance> {
        let (min, max) = filter.timestamp_range();
        let range = self.balances.range((filter.account_id, min)..=(filter.account_id, max));
        let limit = filter.limit as usize;
        if filter.reversed {
            range.rev().map(|(_, b)| *b).take(limit).collect()
        } else {
            range.map(|(_, b)| *b).take(limit).collect()
        }
    }
}
