//! A checkpoint is all or nothing across a crash, and durable once
//! `apply_checkpoint` returns.
//!
//! fjall frames every write batch in its journal as `Start`, items, `End`
//! (checksum and trailer) and on recovery drops a last batch that is not
//! complete. The store puts a whole delta and its checkpoint record in one
//! batch, so a reopened store must equal the model at exactly the op its
//! checkpoint names: never a part of the next delta.
//!
//! - `store_torn_checkpoint_write_recovers_the_previous_checkpoint` builds crash
//!   images byte by byte: the journal as it stood after checkpoint N, with the
//!   tail of checkpoint N cut off or zeroed (what a torn write leaves).
//! - `store_killed_process_recovers_a_whole_checkpoint` runs checkpoints in a child
//!   process (this same test binary) and kills it (SIGKILL) at random moments,
//!   several times over the same directory.
//! - A checkpoint's immutable records (transfers, the account index, balances)
//!   are ingested into tables before the journaled batch that commits it, so a
//!   crash can leave them without their commit: the `leftover` tests check that
//!   the store answers, exports and reopens as if they were not there, and that
//!   the same checkpoint applies again (and a different one does not).

mod store_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cellpay_ledger::{CheckpointDelta, MemoryHistory};
use cellpay_storage::store::Store;
use store_support::{assert_refused, check, Rng, Workload, WorkloadConfig};

const TORN_CHECKPOINTS_COUNT: u64 = 6;
const TORN_CUTS_PER_CHECKPOINT: usize = 12;
const KILL_ROUNDS: usize = 4;
const KILL_CHECKPOINTS_MAX: u64 = 400;
const KILL_SEED: u64 = 77;
const CHILD_DIR_ENV: &str = "CELLPAY_STORE_CRASH_CHILD_DIR";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The one journal file at the top of a store directory.
fn journal_path(dir: &Path) -> PathBuf {
    let journals: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jnl"))
        .collect();
    assert_eq!(journals.len(), 1, "expected one journal in {}: {journals:?}", dir.display());
    journals[0].clone()
}

/// Where the written part of the (zero-preallocated) journal ends: a batch
/// ends with a non-zero trailer, so this is the end of the last batch.
fn journal_written_size(dir: &Path) -> usize {
    let bytes = std::fs::read(journal_path(dir)).unwrap();
    bytes.iter().rposition(|byte| *byte != 0).map_or(0, |last| last + 1)
}

/// Opens a crash image and checks it equals the model after `deltas[..expected]`
/// (op = index + 1), with the transfers of the next delta absent.
fn check_image(image: &Path, deltas: &[CheckpointDelta], expected: usize, transfer_ids: &[u128], seed: u64) {
    let store = Store::open(image).unwrap();
    let mut model = MemoryHistory::new();
    for delta in &deltas[..expected] {
        model.apply(delta);
    }
    let mut rng = Rng::new(seed);
    check(&store, &model, expected as u64, transfer_ids, &mut rng, 100);
}

#[test]
fn store_torn_checkpoint_write_recovers_the_previous_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let live = root.path().join("live");
    let config = WorkloadConfig { accounts_max: 6, transfers_per_delta_max: 60, ids_random: true };
    let mut workload = Workload::new(5, config);
    let mut deltas: Vec<CheckpointDelta> = Vec::new();
    let store = Store::open(&live).unwrap();
    let mut written_sizes = vec![journal_written_size(&live)];
    for op in 1..=TORN_CHECKPOINTS_COUNT {
        let delta = workload.delta();
        store.apply_checkpoint(op, &delta).unwrap();
        deltas.push(delta);
        written_sizes.push(journal_written_size(&live));
        let (before, after) = (written_sizes[op as usize - 1], written_sizes[op as usize]);
        assert!(after > before, "checkpoint {op} wrote nothing to the journal");

        // Crash images of the moment checkpoint `op` was being written.
        let mut rng = Rng::new(op);
        for cut_index in 0..TORN_CUTS_PER_CHECKPOINT {
            let cut = if cut_index == 0 { after - 1 } else { before + rng.below((after - before) as u64) as usize };
            let image = root.path().join(format!("image-{op}-{cut_index}"));
            copy_dir(&live, &image);
            let journal = journal_path(&image);
            if cut_index.is_multiple_of(2) {
                // The file ends early.
                std::fs::OpenOptions::new().write(true).open(&journal).unwrap().set_len(cut as u64).unwrap();
            } else {
                // The tail of the batch never reached the disk: preallocated zeros.
                let mut bytes = std::fs::read(&journal).unwrap();
                bytes[cut..after].fill(0);
                std::fs::write(&journal, bytes).unwrap();
            }
            check_image(&image, &deltas, op as usize - 1, &workload.transfer_ids_all, op);
            std::fs::remove_dir_all(&image).unwrap();
        }
        // And the image of the moment after: the whole checkpoint.
        let image = root.path().join(format!("image-{op}-whole"));
        copy_dir(&live, &image);
        check_image(&image, &deltas, op as usize, &workload.transfer_ids_all, op);
        std::fs::remove_dir_all(&image).unwrap();
    }
}

/// The child's side: applies checkpoint after checkpoint from where the store
/// stands, printing each op once it is durable, until it is killed.
fn crash_child(dir: &Path) {
    let store = Store::open(dir).unwrap();
    let op_first = store.checkpoint().unwrap().op + 1;
    let mut workload = Workload::new(KILL_SEED, kill_config());
    for _ in 1..op_first {
        workload.delta();
    }
    for op in op_first..=KILL_CHECKPOINTS_MAX {
        store.apply_checkpoint(op, &workload.delta()).unwrap();
        println!("durable {op}");
    }
}

fn kill_config() -> WorkloadConfig {
    WorkloadConfig { accounts_max: 12, transfers_per_delta_max: 6_000, ids_random: true }
}

#[test]
fn store_killed_process_recovers_a_whole_checkpoint() {
    if let Some(dir) = std::env::var_os(CHILD_DIR_ENV) {
        crash_child(Path::new(&dir));
        panic!("the child ran out of checkpoints before it was killed");
    }
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let mut rng = Rng::new(KILL_SEED);
    let mut durable_op = 0;
    for round in 0..KILL_ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store_killed_process_recovers_a_whole_checkpoint", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let checkpoints_before_kill = 1 + rng.below(4);
        let mut seen = 0;
        while seen < checkpoints_before_kill {
            let line = lines.next().expect("child exited early").unwrap();
            if let Some(op) = line.strip_prefix("durable ") {
                let op: u64 = op.parse().unwrap();
                assert!(op > durable_op);
                durable_op = op;
                seen += 1;
            }
        }
        // Kill it somewhere inside a later checkpoint (or between two).
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        child.kill().unwrap();
        child.wait().unwrap();
        // Lines the child printed before it died are durable too.
        for line in lines {
            if let Some(op) = line.unwrap().strip_prefix("durable ") {
                durable_op = op.parse().unwrap();
            }
        }

        let store = Store::open(&dir).unwrap();
        let recovered = store.checkpoint().unwrap().op;
        assert!(recovered >= durable_op, "round {round}: checkpoint {durable_op} was durable, recovered {recovered}");
        assert!(recovered <= durable_op + 1, "round {round}: recovered {recovered} past {durable_op} + 1");
        // Exactly the first `recovered` deltas, and nothing of the next one.
        let mut workload = Workload::new(KILL_SEED, kill_config());
        let mut model = MemoryHistory::new();
        for _ in 0..recovered {
            model.apply(&workload.delta());
        }
        workload.delta();
        check(&store, &model, recovered, &workload.transfer_ids_all, &mut rng, 200);
        durable_op = recovered;
    }
}

fn leftover_workload() -> Workload {
    Workload::new(9, WorkloadConfig { accounts_max: 8, transfers_per_delta_max: 200, ids_random: true })
}

#[test]
fn store_leftover_of_an_uncommitted_checkpoint_is_invisible_and_the_checkpoint_applies_again() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let mut workload = leftover_workload();
    let mut model = MemoryHistory::new();
    let store = Store::open(&dir).unwrap();
    for op in 1..=3 {
        let delta = workload.delta();
        store.apply_checkpoint(op, &delta).unwrap();
        model.apply(&delta);
    }
    let delta = workload.delta();
    assert!(!delta.transfers.is_empty() && !delta.balances.is_empty(), "the workload wrote too little");
    store.apply_checkpoint_crashing_before_commit(4, &delta).unwrap();

    // The store answers as at op 3: no transfer, index entry or balance of op 4.
    let mut rng = Rng::new(9);
    check(&store, &model, 3, &workload.transfer_ids_all, &mut rng, 300);
    drop(store);
    let store = Store::open(&dir).unwrap();
    check(&store, &model, 3, &workload.transfer_ids_all, &mut rng, 300);

    // A snapshot of it leaves the leftovers out: the image loads into an
    // empty store (which refuses records newer than the image's checkpoint)
    // and that store answers as at op 3 too.
    let copy = Store::open(&root.path().join("copy")).unwrap();
    let mut importer = copy.import().unwrap();
    let exported = store.export(|chunk| importer.chunk(&chunk)).unwrap();
    let imported = importer.finish().unwrap();
    assert_eq!(exported, imported);
    check(&copy, &model, 3, &workload.transfer_ids_all, &mut rng, 300);

    // The log's replay writes the same checkpoint again: it applies, once.
    store.apply_checkpoint(4, &delta).unwrap();
    model.apply(&delta);
    check(&store, &model, 4, &workload.transfer_ids_all, &mut rng, 300);
    drop(store);
    let store = Store::open(&dir).unwrap();
    check(&store, &model, 4, &workload.transfer_ids_all, &mut rng, 300);
}

#[test]
fn store_leftover_that_differs_from_the_transfer_written_again_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut workload = leftover_workload();
    let mut model = MemoryHistory::new();
    let store = Store::open(dir.path()).unwrap();
    let first = workload.delta();
    store.apply_checkpoint(1, &first).unwrap();
    model.apply(&first);
    let delta = workload.delta();
    store.apply_checkpoint_crashing_before_commit(2, &delta).unwrap();
    let mut changed = delta.clone();
    changed.transfers[0].user_data_64 += 1;
    assert_refused("left over from a checkpoint that did not commit differs from the one written now", || {
        store.apply_checkpoint(2, &changed)
    });
    // Refused before anything was written: the store still answers as at op 1.
    let mut rng = Rng::new(10);
    check(&store, &model, 1, &workload.transfer_ids_all, &mut rng, 100);
}
