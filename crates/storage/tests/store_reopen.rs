//! A store reopened from its directory answers exactly as before, and a
//! delta that breaks its contract is refused before anything is written.

mod store_support;

use std::path::Path;

use cellpay_ledger::{CheckpointDelta, History, MemoryHistory};
use cellpay_storage::store::{Checkpoint, Store, StoreError};
use store_support::{assert_refused, check, Pair, Rng, Workload, WorkloadConfig};

const DELTAS_PER_OPEN: usize = 8;
const OPENS_COUNT: usize = 4;

fn config() -> WorkloadConfig {
    WorkloadConfig { accounts_max: 8, transfers_per_delta_max: 80, ids_random: true }
}

#[test]
fn reopened_store_answers_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let mut workload = Workload::new(3, config());
    let mut rng = Rng::new(3);
    let mut model = MemoryHistory::new();
    let mut op = 0;
    for _ in 0..OPENS_COUNT {
        let mut pair = Pair { store: Store::open(dir.path()).unwrap(), model, op };
        check(&pair.store, &pair.model, pair.op, &workload.transfer_ids_all, &mut rng, 100);
        for _ in 0..DELTAS_PER_OPEN {
            pair.apply(&workload.delta());
        }
        let before = pair.store.checkpoint().unwrap();
        let accounts = pair.store.accounts().unwrap();
        let open_pending = pair.store.open_pending().unwrap();
        drop(pair.store);

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.checkpoint().unwrap(), before);
        assert_eq!(store.accounts().unwrap(), accounts);
        assert_eq!(store.open_pending().unwrap(), open_pending);
        check(&store, &pair.model, pair.op, &workload.transfer_ids_all, &mut rng, 300);
        (model, op) = (pair.model, pair.op);
    }
    assert!(!model.transfers.is_empty() && !model.open_pending().is_empty(), "the workload wrote too little");
}

#[test]
fn store_is_locked_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(matches!(Store::open(dir.path()), Err(StoreError::Engine(_))));
    drop(store);
    assert_eq!(Store::open(dir.path()).unwrap().checkpoint().unwrap(), Checkpoint::default());
}

/// Applies `delta` at `op` to a store holding `deltas`, expects a panic whose
/// message contains `expected`, and checks that the store (also reopened)
/// still equals the model of `deltas`.
fn check_refused(expected: &str, deltas: &[CheckpointDelta], op: u64, delta: &CheckpointDelta) {
    let dir = tempfile::tempdir().unwrap();
    let mut model = MemoryHistory::new();
    let store = Store::open(dir.path()).unwrap();
    for (index, earlier) in deltas.iter().enumerate() {
        store.apply_checkpoint(index as u64 + 1, earlier).unwrap();
        model.apply(earlier);
    }
    assert_refused(expected, || store.apply_checkpoint(op, delta));
    let ids: Vec<u128> = deltas.iter().chain([delta]).flat_map(|d| d.transfers.iter().map(|t| t.id)).collect();
    let mut rng = Rng::new(9);
    check(&store, &model, deltas.len() as u64, &ids, &mut rng, 50);
    drop(store);
    check(&Store::open(dir.path()).unwrap(), &model, deltas.len() as u64, &ids, &mut rng, 50);
}

#[test]
fn store_refuses_contract_breaking_deltas_without_writing() {
    let mut workload = Workload::new(11, config());
    let deltas: Vec<CheckpointDelta> = (0..3).map(|_| workload.delta()).collect();
    let next = workload.delta();
    assert!(deltas.iter().all(|d| !d.transfers.is_empty()) && next.transfers.len() >= 2);
    let ops_done = deltas.len() as u64;

    check_refused("does not follow the last checkpoint", &deltas, ops_done, &next);

    let mut again = next.clone();
    again.transfers[0] = deltas[0].transfers[0];
    again.transfers[0].timestamp = next.transfers[0].timestamp;
    check_refused("is already checkpointed", &deltas, ops_done + 1, &again);

    let mut twice = next.clone();
    twice.transfers[1].id = twice.transfers[0].id;
    check_refused("is twice in one checkpoint", &deltas, ops_done + 1, &twice);

    let mut old = next.clone();
    old.transfers[0].timestamp = deltas[2].timestamp_last;
    check_refused("is not new", &deltas, ops_done + 1, &old);

    let mut back = next.clone();
    back.transfers.clear();
    back.balances.clear();
    back.timestamp_last = deltas[2].timestamp_last - 1;
    check_refused("goes back in time", &deltas, ops_done + 1, &back);

    let mut unsorted = next.clone();
    unsorted.transfers.swap(0, 1);
    check_refused("not in timestamp order", &deltas, ops_done + 1, &unsorted);

    // The unchanged delta is accepted: the refusals above were about what they changed.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for (index, delta) in deltas.iter().chain([&next]).enumerate() {
        store.apply_checkpoint(index as u64 + 1, delta).unwrap();
    }
    assert_eq!(store.checkpoint().unwrap().op, ops_done + 1);
    assert_eq!(store.transfer(next.transfers[0].id), Some(next.transfers[0]));
}

#[test]
fn store_open_under_a_file_fails_cleanly() {
    // A directory that cannot be created is an engine error, not a panic.
    let file = tempfile::NamedTempFile::new().unwrap();
    let under_a_file: &Path = &file.path().join("store");
    assert!(matches!(Store::open(under_a_file), Err(StoreError::Engine(_))));
}
