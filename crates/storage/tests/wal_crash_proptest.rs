//! Write-ahead log under random appends, syncs, truncations and crashes.
//!
//! A crash drops the log without `sync` (its buffer is lost), then may cut the
//! last segment at any byte after its last synced size and may append zeros
//! (a file extended without its data). After every reopen, every record that
//! was durable is present and intact, ops are contiguous, and every record
//! that survived is the one that was appended with that op.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use cellpay_storage::wal::{Wal, WalOptions};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const SEGMENT_SIZE_MAX: u64 = 2048;
const ACTION_COUNT_MAX: usize = 80;

#[derive(Debug, Clone)]
enum Action {
    Append { size_bytes: usize },
    Sync,
    TruncateBeforeDurable,
    Crash { cut_per_mille: Option<u16>, zeros_bytes: usize },
}

fn action_strategy() -> impl Strategy<Value = Action> {
    prop_oneof![
        12 => (0usize..1500).prop_map(|size_bytes| Action::Append { size_bytes }),
        1 => (60_000usize..80_000).prop_map(|size_bytes| Action::Append { size_bytes }),
        4 => Just(Action::Sync),
        1 => Just(Action::TruncateBeforeDurable),
        2 => (proptest::option::of(0u16..=1000), prop_oneof![3 => Just(0usize), 1 => 1usize..3000])
            .prop_map(|(cut_per_mille, zeros_bytes)| Action::Crash { cut_per_mille, zeros_bytes }),
    ]
}

/// What the test knows independently of the log.
struct Model {
    /// `payloads[op - 1]` is the payload appended with `op`.
    payloads: Vec<Vec<u8>>,
    /// The last segment and its size at the last `sync`: bytes before this
    /// offset in that file are durable.
    synced_segment: Option<(PathBuf, u64)>,
    /// Distinguishes payloads appended with the same op before and after a crash.
    generation: u64,
}

fn payload_for(op: u64, generation: u64, size_bytes: usize) -> Vec<u8> {
    let seed = op.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation.wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..size_bytes)
        .map(|index| (seed.wrapping_add(index as u64).wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8)
        .collect()
}

fn segment_last(directory: &Path) -> Option<PathBuf> {
    fs::read_dir(directory)
        .expect("read_dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "wal"))
        .max()
}

/// The last segment and its size, right after everything was synced.
fn segment_synced(directory: &Path) -> Option<(PathBuf, u64)> {
    segment_last(directory).map(|path| {
        let size_bytes = fs::metadata(&path).expect("metadata").len();
        (path, size_bytes)
    })
}

fn open(directory: &Path) -> Wal {
    let (wal, recovery) = Wal::open_with(directory, WalOptions { segment_size_max: SEGMENT_SIZE_MAX })
        .expect("recovery succeeds after a crash");
    assert_eq!(recovery.op_last, wal.last_op());
    assert_eq!(recovery.op_first, wal.first_op());
    assert_eq!(recovery.record_count, wal.last_op() + 1 - wal.first_op());
    assert_eq!(recovery.torn_tail.is_some(), recovery.torn_tail_bytes_cut > 0);
    wal
}

/// Every retained record replays with the payload the model holds for it.
fn check_replay(wal: &Wal, model: &Model) {
    let mut op_expected = wal.first_op();
    wal.replay(wal.first_op(), |op, payload| {
        assert_eq!(op, op_expected, "ops are contiguous");
        assert!(payload == model.payloads[op as usize - 1].as_slice(), "payload of op {op}");
        op_expected += 1;
        Ok::<(), String>(())
    })
    .expect("replay");
    assert_eq!(op_expected, wal.durable_op() + 1, "replay reaches the durable op");
}

fn crash(directory: &Path, wal: Wal, model: &mut Model, cut_per_mille: Option<u16>, zeros_bytes: usize) -> Wal {
    let op_durable = wal.durable_op();
    let op_last = wal.last_op();
    drop(wal);
    if let Some(path) = segment_last(directory) {
        let size_bytes = fs::metadata(&path).expect("metadata").len();
        let size_durable_bytes = match &model.synced_segment {
            Some((synced_path, synced_size_bytes)) if *synced_path == path => *synced_size_bytes,
            _ => 0,
        };
        assert!(size_durable_bytes <= size_bytes);
        let mut file = OpenOptions::new().write(true).open(&path).expect("open");
        if let Some(cut_per_mille) = cut_per_mille {
            let size_cut_bytes =
                size_durable_bytes + (size_bytes - size_durable_bytes) * u64::from(cut_per_mille) / 1000;
            file.set_len(size_cut_bytes).expect("set_len");
        }
        if zeros_bytes > 0 {
            let size_bytes = file.metadata().expect("metadata").len();
            file.set_len(size_bytes + zeros_bytes as u64).expect("set_len");
        }
        file.flush().expect("flush");
    }

    let wal = open(directory);
    assert!(wal.last_op() >= op_durable, "durable op {op_durable} lost: last op {}", wal.last_op());
    assert!(wal.last_op() <= op_last);
    assert_eq!(wal.durable_op(), wal.last_op(), "recovered records are durable");
    check_replay(&wal, model);
    model.payloads.truncate(wal.last_op() as usize);
    // Recovery syncs what it found: the whole last segment is durable now.
    model.synced_segment = segment_synced(directory);
    model.generation += 1;
    wal
}

fn run(actions: &[Action]) {
    let directory = tempfile::tempdir().expect("tempdir");
    let directory = directory.path();
    let mut wal = open(directory);
    let mut model = Model { payloads: Vec::new(), synced_segment: None, generation: 0 };
    for action in actions {
        match action {
            Action::Append { size_bytes } => {
                let op = wal.last_op() + 1;
                let payload = payload_for(op, model.generation, *size_bytes);
                assert_eq!(wal.append(&payload).expect("append"), op);
                model.payloads.push(payload);
                assert_eq!(model.payloads.len() as u64, op);
            }
            Action::Sync => {
                assert_eq!(wal.sync().expect("sync"), wal.last_op());
                model.synced_segment = segment_synced(directory);
            }
            Action::TruncateBeforeDurable => {
                let op_first_before = wal.first_op();
                let op_durable = wal.durable_op();
                wal.truncate_before(op_durable).expect("truncate_before");
                assert!(wal.first_op() >= op_first_before);
                assert!(wal.first_op() <= op_durable + 1, "no op after {op_durable} deleted");
                check_replay(&wal, &model);
            }
            Action::Crash { cut_per_mille, zeros_bytes } => {
                wal = crash(directory, wal, &mut model, *cut_per_mille, *zeros_bytes);
            }
        }
    }
    let op_last = wal.last_op();
    assert_eq!(wal.sync().expect("sync"), op_last);
    drop(wal);
    let wal = open(directory);
    assert_eq!(wal.last_op(), op_last, "a clean close loses nothing");
    check_replay(&wal, &model);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn wal_keeps_every_durable_record_across_crashes(
        actions in proptest::collection::vec(action_strategy(), 1..ACTION_COUNT_MAX),
    ) {
        run(&actions);
    }
}
