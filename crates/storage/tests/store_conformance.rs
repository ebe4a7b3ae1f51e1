//! The store must answer exactly like the model history, `MemoryHistory`:
//! the same seeded deltas go to both, then every read is compared. Even seeds
//! write every checkpoint's immutable records by ingestion, odd seeds as the
//! store decides by size (these small deltas: in the journaled batch).

mod store_support;

use cellpay_ledger::MemoryHistory;
use cellpay_storage::store::{Checkpoint, Store};
use store_support::{check, Pair, Rng, Workload, WorkloadConfig};

const SEEDS_COUNT: u64 = 12;
const DELTAS_PER_SEED: usize = 24;
const QUERIES_PER_CHECK: usize = 300;

fn conformance(seed: u64, config: WorkloadConfig) {
    let dir = tempfile::tempdir().unwrap();
    let mut workload = Workload::new(seed, config);
    let mut rng = Rng::new(seed ^ 0xF00D);
    let mut pair = Pair { store: Store::open(dir.path()).unwrap(), model: MemoryHistory::new(), op: 0 };
    if seed.is_multiple_of(2) {
        pair.store.set_ingest_transfers_min(0);
    }
    check(&pair.store, &pair.model, 0, &[], &mut rng, 20);
    for index in 0..DELTAS_PER_SEED {
        let delta = workload.delta();
        pair.apply(&delta);
        if index % 6 == 5 {
            check(&pair.store, &pair.model, pair.op, &workload.transfer_ids_all, &mut rng, QUERIES_PER_CHECK);
        }
    }
    check(&pair.store, &pair.model, pair.op, &workload.transfer_ids_all, &mut rng, QUERIES_PER_CHECK);
}

#[test]
fn store_conforms_to_model_with_random_ids() {
    for seed in 1..=SEEDS_COUNT {
        let config = WorkloadConfig { accounts_max: 6, transfers_per_delta_max: 40, ids_random: true };
        conformance(seed, config);
    }
}

#[test]
fn store_conforms_to_model_with_sequential_ids_and_many_accounts() {
    for seed in 100..100 + SEEDS_COUNT {
        let config = WorkloadConfig { accounts_max: 20, transfers_per_delta_max: 120, ids_random: false };
        conformance(seed, config);
    }
}

#[test]
fn store_conforms_to_model_with_long_account_histories() {
    // Few accounts and many transfers: limits and timestamp bounds cut deep histories.
    let config = WorkloadConfig { accounts_max: 3, transfers_per_delta_max: 400, ids_random: true };
    conformance(7, config);
    conformance(8, config);
}

#[test]
fn fresh_store_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.checkpoint().unwrap(), Checkpoint { op: 0, timestamp_last: 0 });
    assert_eq!(store.accounts().unwrap(), Vec::new());
    assert_eq!(store.open_pending().unwrap(), Vec::new());
    let mut rng = Rng::new(1);
    check(&store, &MemoryHistory::new(), 0, &[5, 6], &mut rng, 50);
}
