//! State-machine throughput on one core: 8,190-event batches over 1 million accounts.
//!
//! `cargo run --release -p cellpay-ledger --example ledger_bench [accounts] [batches]`
//!
//! Prints transfers/s of `create_transfers` alone (no I/O), checkpointing into
//! an in-memory history every 128 batches as the server would, and audits the
//! ledger at the end so a fast wrong answer cannot pass.

use std::time::Instant;

use cellpay_ledger::{Account, CreateTransferResult, Ledger, LedgerConfig, MemoryHistory, Transfer, BATCH_EVENTS_MAX};

fn main() {
    let mut args = std::env::args().skip(1);
    let accounts_count: u64 = args.next().map_or(1_000_000, |a| a.parse().expect("accounts"));
    let batches: u64 = args.next().map_or(500, |a| a.parse().expect("batches"));
    let mut ledger = Ledger::new(LedgerConfig { accounts_max: accounts_count as u32 + 1, ..LedgerConfig::default() });
    let mut history = MemoryHistory::new();
    let mut timestamp_ns = 1u64;
    for chunk in (1..=accounts_count).collect::<Vec<_>>().chunks(BATCH_EVENTS_MAX) {
        let batch: Vec<Account> =
            chunk.iter().map(|id| Account { id: u128::from(*id), ledger: 1, code: 1, ..Account::default() }).collect();
        ledger.create_accounts(timestamp_ns, &batch);
        timestamp_ns += 1_000_000;
    }
    // xorshift64*: a fixed, dependency-free sequence of account picks.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut id = 1u128;
    let mut batch = Vec::with_capacity(BATCH_EVENTS_MAX);
    let mut applied_ns = 0u128;
    let mut checkpoint_ns = 0u128;
    let mut ok = 0u64;
    for number in 0..batches {
        batch.clear();
        for _ in 0..BATCH_EVENTS_MAX {
            let debit = next() % accounts_count + 1;
            let mut credit = next() % accounts_count + 1;
            if credit == debit {
                credit = credit % accounts_count + 1;
            }
            batch.push(Transfer {
                id,
                debit_account_id: u128::from(debit),
                credit_account_id: u128::from(credit),
                amount: 1 + u128::from(next() % 1000),
                ledger: 1,
                code: 1,
                ..Transfer::default()
            });
            id += 1;
        }
        timestamp_ns += 1_000_000;
        let start = Instant::now();
        let results = ledger.create_transfers(timestamp_ns, &batch, &history);
        applied_ns += start.elapsed().as_nanos();
        ok += results.iter().filter(|r| **r == CreateTransferResult::Ok).count() as u64;
        if number % 128 == 127 {
            let start = Instant::now();
            history.apply(&ledger.checkpoint());
            checkpoint_ns += start.elapsed().as_nanos();
        }
    }
    let transfers = batches * BATCH_EVENTS_MAX as u64;
    assert_eq!(ok, transfers, "every transfer must apply");
    ledger.audit().expect("ledger audit");
    let per_s = transfers as f64 / (applied_ns as f64 / 1e9);
    println!(
        "accounts={accounts_count} batches={batches} batch_events={BATCH_EVENTS_MAX} transfers={transfers} \
         apply_s={:.3} transfers_per_s={per_s:.0} ns_per_transfer={:.1} checkpoint_to_memory_s={:.3}",
        applied_ns as f64 / 1e9,
        applied_ns as f64 / transfers as f64,
        checkpoint_ns as f64 / 1e9,
    );
}
