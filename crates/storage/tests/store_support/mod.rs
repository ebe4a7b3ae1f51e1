//! Shared by the store's integration tests: a seeded workload that produces
//! checkpoint deltas shaped like the ledger's, and the check that compares a
//! [`Store`] with the model, [`MemoryHistory`], through every read method.

#![allow(dead_code)] // Each test crate uses a different part of this module.

use std::collections::{BTreeMap, HashSet};

use cellpay_ledger::{
    Account, AccountBalance, AccountFilter, AccountFlags, CheckpointDelta, History, MemoryHistory, PendingStatus,
    Transfer, TransferFlags, QUERY_LIMIT_MAX,
};
use cellpay_storage::store::{Checkpoint, Store};

/// A tiny deterministic generator (xorshift64*): the crate has no `rand`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..bound` (bound > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0);
        self.next_u64() % bound
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Shapes the deltas of a [`Workload`].
#[derive(Clone, Copy, Debug)]
pub struct WorkloadConfig {
    pub accounts_max: usize,
    pub transfers_per_delta_max: u64,
    /// Transfer ids: random u128 (true) or small sequential numbers (false).
    pub ids_random: bool,
}

/// Produces deltas as a ledger would: accounts created and changed, transfers
/// in timestamp order (some pending, some resolving a pending one), pending
/// statuses changed, balances of `history` accounts, gaps in the timestamps.
/// Amounts are random: the store keeps records, it does not check money.
pub struct Workload {
    rng: Rng,
    config: WorkloadConfig,
    timestamp_last: u64,
    accounts: BTreeMap<u128, Account>,
    pending_open: Vec<u128>,
    transfer_ids: HashSet<u128>,
    transfer_id_next: u128,
    /// Every transfer id ever generated, in order (for lookups in checks).
    pub transfer_ids_all: Vec<u128>,
}

impl Workload {
    pub fn new(seed: u64, config: WorkloadConfig) -> Workload {
        Workload {
            rng: Rng::new(seed),
            config,
            timestamp_last: 0,
            accounts: BTreeMap::new(),
            pending_open: Vec::new(),
            transfer_ids: HashSet::new(),
            transfer_id_next: 1,
            transfer_ids_all: Vec::new(),
        }
    }

    pub fn account_ids(&self) -> Vec<u128> {
        self.accounts.keys().copied().collect()
    }

    fn timestamp_next(&mut self) -> u64 {
        // Failed events consume timestamps too: leave gaps.
        self.timestamp_last += 1 + self.rng.below(3);
        self.timestamp_last
    }

    fn transfer_id_new(&mut self) -> u128 {
        loop {
            let id = if self.config.ids_random {
                u128::from(self.rng.next_u64()) << 64 | u128::from(self.rng.next_u64())
            } else {
                self.transfer_id_next += 1;
                self.transfer_id_next
            };
            if id != 0 && id != u128::MAX && self.transfer_ids.insert(id) {
                self.transfer_ids_all.push(id);
                return id;
            }
        }
    }

    fn account_create(&mut self, dirty: &mut BTreeMap<u128, ()>) {
        let user = self.rng.below(4);
        let index = self.accounts.len() as u64 + 1;
        let id = cellpay_ledger::id::account_id(user, index).expect("not reserved");
        let mut flags = AccountFlags::default();
        if self.rng.chance(50) {
            flags.insert(AccountFlags::HISTORY);
        }
        let account = Account {
            id,
            ledger: 1,
            code: self.rng.below(3) as u16 + 1,
            user_data_64: self.rng.below(3),
            flags,
            timestamp: self.timestamp_next(),
            ..Account::default()
        };
        self.accounts.insert(id, account);
        dirty.insert(id, ());
    }

    /// Changes an account's balance and records its balance if it keeps history.
    fn account_touch(
        &mut self,
        id: u128,
        timestamp: u64,
        balances: &mut Vec<AccountBalance>,
        dirty: &mut BTreeMap<u128, ()>,
    ) {
        let amount = u128::from(self.rng.below(1000));
        let account = self.accounts.get_mut(&id).expect("account exists");
        match self.rng.below(4) {
            0 => account.debits_posted += amount,
            1 => account.credits_posted += amount,
            2 => account.debits_pending += amount,
            _ => account.credits_pending += amount,
        }
        dirty.insert(id, ());
        if account.flags.contains(AccountFlags::HISTORY) {
            balances.push(AccountBalance {
                account_id: id,
                debits_pending: account.debits_pending,
                debits_posted: account.debits_posted,
                credits_pending: account.credits_pending,
                credits_posted: account.credits_posted,
                timestamp,
            });
        }
    }

    /// The next delta.
    pub fn delta(&mut self) -> CheckpointDelta {
        let mut dirty: BTreeMap<u128, ()> = BTreeMap::new();
        let mut transfers: Vec<Transfer> = Vec::new();
        let mut statuses: BTreeMap<u128, PendingStatus> = BTreeMap::new();
        let mut balances: Vec<AccountBalance> = Vec::new();

        while self.accounts.len() < 2 || (self.accounts.len() < self.config.accounts_max && self.rng.chance(20)) {
            self.account_create(&mut dirty);
        }
        let ids = self.account_ids();
        let count = if self.rng.chance(10) { 0 } else { self.rng.below(self.config.transfers_per_delta_max + 1) };
        for _ in 0..count {
            let timestamp = self.timestamp_next();
            // An expiry: a status change and balances, no transfer.
            if !self.pending_open.is_empty() && self.rng.chance(5) {
                let index = self.rng.below(self.pending_open.len() as u64) as usize;
                let id = self.pending_open.swap_remove(index);
                statuses.insert(id, PendingStatus::Expired);
                let account_id = self.rng.pick(&ids);
                self.account_touch(account_id, timestamp, &mut balances, &mut dirty);
                continue;
            }
            let debit_account_id = self.rng.pick(&ids);
            let mut credit_account_id = self.rng.pick(&ids);
            // Rarely the same account on both sides: the store indexes it once, like the model.
            if credit_account_id == debit_account_id && !self.rng.chance(10) {
                credit_account_id = *ids.iter().find(|id| **id != debit_account_id).expect("two accounts");
            }
            let mut transfer = Transfer {
                id: self.transfer_id_new(),
                debit_account_id,
                credit_account_id,
                amount: u128::from(self.rng.below(1_000_000)),
                user_data_128: u128::from(self.rng.below(3)),
                user_data_64: self.rng.below(3),
                user_data_32: self.rng.below(3) as u32,
                ledger: 1,
                code: self.rng.below(3) as u16 + 1,
                timestamp,
                ..Transfer::default()
            };
            if self.rng.chance(20) {
                transfer.flags = TransferFlags::PENDING;
                transfer.timeout_s = self.rng.below(2) as u32 * 60;
                self.pending_open.push(transfer.id);
                statuses.insert(transfer.id, PendingStatus::Pending);
            } else if !self.pending_open.is_empty() && self.rng.chance(25) {
                let index = self.rng.below(self.pending_open.len() as u64) as usize;
                let pending_id = self.pending_open.swap_remove(index);
                let (flag, status) = if self.rng.chance(50) {
                    (TransferFlags::POST_PENDING_TRANSFER, PendingStatus::Posted)
                } else {
                    (TransferFlags::VOID_PENDING_TRANSFER, PendingStatus::Voided)
                };
                transfer.flags = flag;
                transfer.pending_id = pending_id;
                statuses.insert(pending_id, status);
            }
            transfers.push(transfer);
            self.account_touch(debit_account_id, timestamp, &mut balances, &mut dirty);
            if credit_account_id != debit_account_id {
                self.account_touch(credit_account_id, timestamp, &mut balances, &mut dirty);
            }
        }
        if self.rng.chance(20) {
            self.timestamp_next(); // A failed event at the end of the last batch.
        }
        CheckpointDelta {
            accounts: dirty.keys().map(|id| self.accounts[id]).collect(),
            transfers,
            pending_statuses: statuses.into_iter().collect(),
            balances,
            timestamp_last: self.timestamp_last,
        }
    }
}

/// A store and its model, fed the same deltas.
pub struct Pair {
    pub store: Store,
    pub model: MemoryHistory,
    pub op: u64,
}

impl Pair {
    pub fn apply(&mut self, delta: &CheckpointDelta) {
        self.op += 1 + self.op % 3; // Not every op is a checkpoint.
        self.store.apply_checkpoint(self.op, delta).expect("apply checkpoint");
        self.model.apply(delta);
    }
}

/// Compares the store with the model through every read: the checkpoint,
/// accounts, open pending transfers, every transfer and pending status (and
/// ids that are not there), and `queries` random filters over every account.
pub fn check(store: &Store, model: &MemoryHistory, op: u64, transfer_ids: &[u128], rng: &mut Rng, queries: usize) {
    assert_eq!(store.checkpoint().unwrap(), Checkpoint { op, timestamp_last: model.timestamp_last });
    assert_eq!(store.accounts().unwrap(), model.accounts.values().copied().collect::<Vec<_>>());
    assert_eq!(store.open_pending().unwrap(), model.open_pending());

    for id in transfer_ids.iter().copied().chain([1, 2, 3, u128::MAX - 1, 1 << 100]) {
        assert_eq!(store.transfer(id), model.transfer(id), "transfer {id}");
        assert_eq!(store.pending_status(id), model.pending_status(id), "pending status {id}");
    }

    let mut account_ids: Vec<u128> = model.accounts.keys().copied().collect();
    account_ids.push(cellpay_ledger::id::account_id(999, 1).expect("not reserved")); // No such account.
    let timestamp_max = model.timestamp_last + 2;
    let mut nonempty = 0;
    for _ in 0..queries {
        let filter = filter_random(rng, &account_ids, timestamp_max);
        assert!(filter.validate().is_ok(), "generated an invalid filter: {filter:?}");
        let transfers = store.account_transfers(&filter);
        assert_eq!(transfers, model.account_transfers(&filter), "account_transfers {filter:?}");
        let balances = store.account_balances(&filter);
        assert_eq!(balances, model.account_balances(&filter), "account_balances {filter:?}");
        nonempty += usize::from(!transfers.is_empty()) + usize::from(!balances.is_empty());
    }
    // Guard against a generator that only ever compares empty answers.
    if queries >= 100 && !model.transfers.is_empty() {
        assert!(nonempty * 4 >= queries, "only {nonempty} of {queries} queries found anything");
    }
}

fn filter_random(rng: &mut Rng, account_ids: &[u128], timestamp_max: u64) -> AccountFilter {
    let mut filter = AccountFilter::account(rng.pick(account_ids), rng.pick(&[1, 2, 3, 7, 50, QUERY_LIMIT_MAX]));
    filter.reversed = rng.chance(50);
    match rng.below(4) {
        0 => filter.credits = false,
        1 => filter.debits = false,
        _ => {}
    }
    if rng.chance(40) {
        filter.timestamp_min = rng.below(timestamp_max + 1);
    }
    if rng.chance(40) {
        filter.timestamp_max = filter.timestamp_min.max(1) + rng.below(timestamp_max / 2 + 1);
    }
    if rng.chance(15) {
        filter.code = rng.below(4) as u16;
    }
    if rng.chance(15) {
        filter.user_data_128 = u128::from(rng.below(3));
    }
    if rng.chance(15) {
        filter.user_data_64 = rng.below(3);
    }
    if rng.chance(15) {
        filter.user_data_32 = rng.below(3) as u32;
    }
    filter
}

/// Runs `write`, which must panic with a message containing `expected`
/// (a write the store refuses as a bug in its caller); fails otherwise.
pub fn assert_refused<T>(expected: &str, write: impl FnOnce() -> T) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(write));
    let Err(payload) = result else {
        panic!("the store accepted what it must refuse: {expected}");
    };
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    assert!(message.contains(expected), "refused for another reason: {message:?}, expected {expected:?}");
}
