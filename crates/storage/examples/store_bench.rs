//! Measures the history store: applying checkpoints of a million transfers,
//! and point lookups of transfer ids that are missing (the idempotency check
//! of every new transfer) and present.
//!
//! ```text
//! cargo run --release -p cellpay-storage --example store_bench [-- DIR]
//! ```
//!
//! DIR (default: a temporary directory under /tmp) must be on a real disk,
//! not tmpfs, for the fsync to mean anything. It prints numbers; it asserts
//! only that the answers are right.

use std::time::{Duration, Instant};

use cellpay_ledger::{
    Account, AccountBalance, AccountFilter, AccountFlags, CheckpointDelta, History, PendingStatus, Transfer,
    TransferFlags,
};
use cellpay_storage::store::Store;

const CHECKPOINTS_COUNT: u64 = 3;
const CHECKPOINT_TRANSFERS_COUNT: usize = 1_000_000;
const ACCOUNTS_COUNT: u64 = 10_000;
const LOOKUPS_COUNT: usize = 100_000;
const QUERIES_COUNT: usize = 10_000;
const FLUSH_WAIT: Duration = Duration::from_secs(10);

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn id(&mut self) -> u128 {
        u128::from(self.next_u64()) << 64 | u128::from(self.next_u64())
    }
}

fn account_id(index: u64) -> u128 {
    cellpay_ledger::id::account_id(index % 100, index + 1).expect("not reserved")
}

/// One checkpoint's worth: `CHECKPOINT_TRANSFERS_COUNT` transfers between
/// `ACCOUNTS_COUNT` accounts (1 in 20 keeps balance history), 1 in 10 pending.
fn delta_make(rng: &mut Rng, timestamp_first: u64, ids: &mut Vec<u128>) -> CheckpointDelta {
    let history = |index: u64| index.is_multiple_of(20);
    let accounts = (0..ACCOUNTS_COUNT)
        .map(|index| Account {
            id: account_id(index),
            ledger: 1,
            code: 1,
            flags: if history(index) { AccountFlags::HISTORY } else { AccountFlags::default() },
            timestamp: 1,
            credits_posted: u128::from(timestamp_first),
            ..Account::default()
        })
        .collect::<Vec<_>>();
    let mut accounts_sorted = accounts;
    accounts_sorted.sort_unstable_by_key(|a| a.id);
    let mut transfers = Vec::with_capacity(CHECKPOINT_TRANSFERS_COUNT);
    let mut pending_statuses = Vec::new();
    let mut balances = Vec::new();
    for index in 0..CHECKPOINT_TRANSFERS_COUNT {
        let timestamp = timestamp_first + index as u64;
        let debit = rng.next_u64() % ACCOUNTS_COUNT;
        let credit = (debit + 1 + rng.next_u64() % (ACCOUNTS_COUNT - 1)) % ACCOUNTS_COUNT;
        let pending = index.is_multiple_of(10);
        let transfer = Transfer {
            id: rng.id(),
            debit_account_id: account_id(debit),
            credit_account_id: account_id(credit),
            amount: u128::from(rng.next_u64() % 1_000_000),
            user_data_64: rng.next_u64() % 8,
            ledger: 1,
            code: 1 + (rng.next_u64() % 4) as u16,
            flags: if pending { TransferFlags::PENDING } else { TransferFlags::default() },
            timestamp,
            ..Transfer::default()
        };
        ids.push(transfer.id);
        if pending {
            pending_statuses.push((transfer.id, PendingStatus::Pending));
        }
        for account in [debit, credit] {
            if history(account) {
                balances.push(AccountBalance {
                    account_id: account_id(account),
                    debits_posted: 1,
                    timestamp,
                    ..Default::default()
                });
            }
        }
        transfers.push(transfer);
    }
    pending_statuses.sort_unstable();
    let timestamp_last = timestamp_first + CHECKPOINT_TRANSFERS_COUNT as u64 - 1;
    CheckpointDelta { accounts: accounts_sorted, transfers, pending_statuses, balances, timestamp_last }
}

fn lookups(store: &Store, ids: &[u128], present: bool) -> Duration {
    let started = Instant::now();
    let mut found = 0usize;
    for id in ids {
        found += usize::from(store.transfer(*id).is_some());
    }
    let elapsed = started.elapsed();
    assert_eq!(found, if present { ids.len() } else { 0 });
    elapsed
}

fn report(what: &str, count: usize, elapsed: Duration) {
    let per_op_ns = elapsed.as_nanos() / count as u128;
    println!("{what:<48} {count:>9} in {:>9.3} ms  ({per_op_ns} ns each)", elapsed.as_secs_f64() * 1e3);
}

fn lookups_report(store: &Store, rng: &mut Rng, ids: &[u128], when: &str) {
    let missing: Vec<u128> = (0..LOOKUPS_COUNT).map(|_| rng.id()).collect();
    let present: Vec<u128> = (0..LOOKUPS_COUNT).map(|_| ids[(rng.next_u64() % ids.len() as u64) as usize]).collect();
    report(&format!("lookups of missing ids ({when})"), LOOKUPS_COUNT, lookups(store, &missing, false));
    report(&format!("lookups of present ids ({when})"), LOOKUPS_COUNT, lookups(store, &present, true));
}

fn main() {
    let dir_temporary = tempfile::tempdir_in("/tmp").expect("temporary directory");
    let dir = std::env::args().nth(1).map_or_else(|| dir_temporary.path().to_path_buf(), Into::into);
    println!("store in {}", dir.display());
    let store = Store::open(&dir).expect("open store");
    let mut rng = Rng(0x5EED_CAFE);
    let mut ids: Vec<u128> = Vec::new();
    let timestamp_base = store.checkpoint().expect("checkpoint").timestamp_last + 1;

    for checkpoint in 0..CHECKPOINTS_COUNT {
        let timestamp_first = timestamp_base + checkpoint * CHECKPOINT_TRANSFERS_COUNT as u64;
        let delta = delta_make(&mut rng, timestamp_first, &mut ids);
        let op = store.checkpoint().expect("checkpoint").op + 1;
        let started = Instant::now();
        store.apply_checkpoint(op, &delta).expect("apply checkpoint");
        let what = format!(
            "apply_checkpoint {} (+{} balances, {} pending)",
            checkpoint + 1,
            delta.balances.len(),
            delta.pending_statuses.len()
        );
        report(&what, delta.transfers.len(), started.elapsed());
    }
    lookups_report(&store, &mut rng, &ids, "after apply");

    // fjall flushes the big memtables to disk tables in the background; give it time.
    std::thread::sleep(FLUSH_WAIT);
    lookups_report(&store, &mut rng, &ids, "10 s later");
    lookups_report(&store, &mut rng, &ids, "10 s later, again");

    let started = Instant::now();
    let mut results = 0usize;
    for index in 0..QUERIES_COUNT {
        let mut filter = AccountFilter::account(account_id(rng.next_u64() % ACCOUNTS_COUNT), 10);
        filter.reversed = index.is_multiple_of(2);
        results += store.account_transfers(&filter).len();
    }
    assert_eq!(results, QUERIES_COUNT * 10);
    report("account_transfers (limit 10)", QUERIES_COUNT, started.elapsed());

    drop(store);
    let started = Instant::now();
    let store = Store::open(&dir).expect("reopen store");
    report("reopen", 1, started.elapsed());
    let started = Instant::now();
    let accounts = store.accounts().expect("accounts");
    let open_pending = store.open_pending().expect("open pending");
    assert_eq!(accounts.len() as u64, ACCOUNTS_COUNT);
    report(&format!("restore: accounts() + open_pending() ({} pending)", open_pending.len()), 1, started.elapsed());
}
