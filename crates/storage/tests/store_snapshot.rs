//! Snapshots: a store exported chunk by chunk and imported into a fresh store
//! answers every read exactly like its source, at exactly the checkpoint the
//! image names; damaged, cut, reordered, duplicated or missing chunks are
//! refused and leave the target at checkpoint 0; a crash mid-import leaves
//! checkpoint 0 and `drop_store` cleans up. Also the registry, `drop_store`,
//! the consensus metadata, and a rough throughput figure.

mod store_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use cellpay_ledger::{
    Account, AccountBalance, AccountFlags, CheckpointDelta, MemoryHistory, PendingStatus, Transfer, TransferFlags,
};
use cellpay_storage::store::{
    Checkpoint, ExportError, SnapshotImage, Store, StoreDatabase, StoreError, CONSENSUS_BYTES_MAX,
    SNAPSHOT_CHUNK_BYTES_MAX,
};
use store_support::{check, Rng, Workload, WorkloadConfig};

/// Enough transfers per delta, over enough deltas, for an image of several chunks.
const IMAGE_CONFIG: WorkloadConfig =
    WorkloadConfig { accounts_max: 24, transfers_per_delta_max: 400, ids_random: true };
const IMAGE_DELTAS_COUNT: usize = 60;
const IMAGE_CHUNKS_MIN: usize = 3;
const QUERIES_PER_CHECK: usize = 200;
const CONCURRENT_DELTAS_COUNT: usize = 16;
const FLIPS_PER_CHUNK: usize = 16;
const KILL_ROUNDS: usize = 5;
const KILL_CHILD_DIR_ENV: &str = "CELLPAY_SNAPSHOT_KILL_CHILD_DIR";
const THROUGHPUT_TRANSFERS_ENV: &str = "CELLPAY_SNAPSHOT_BENCH_TRANSFERS";
const THROUGHPUT_TRANSFERS_DEFAULT: usize = 20_000;
const THROUGHPUT_CHECKPOINT_TRANSFERS_MAX: usize = 250_000;
const THROUGHPUT_ACCOUNTS_COUNT: u64 = 10_000;
/// The chunk frame, as documented in `store.rs`: the checksum covers the 24
/// bytes before it and the body.
const CHUNK_FRAME_SIZE: usize = 28;
const CHUNK_CHECKSUM_AT: usize = 24;

/// The consensus metadata the tests store with checkpoint `op`.
fn consensus_of(op: u64) -> Vec<u8> {
    format!("term {} membership [1,2,3,4,5] op {op}", op / 7 + 1).into_bytes()
}

/// A store filled with a workload, and the model after every delta
/// (`models[k]` is the model at op `k`, `models[0]` the empty one).
struct Source {
    store: Store,
    deltas: Vec<CheckpointDelta>,
    models: Vec<MemoryHistory>,
    transfer_ids: Vec<u128>,
}

impl Source {
    fn build(store: Store, seed: u64, config: WorkloadConfig, deltas_count: usize) -> Source {
        let mut workload = Workload::new(seed, config);
        let deltas: Vec<CheckpointDelta> = (0..deltas_count).map(|_| workload.delta()).collect();
        let mut models = vec![MemoryHistory::new()];
        for delta in &deltas {
            let mut model = models.last().unwrap().clone();
            model.apply(delta);
            models.push(model);
        }
        Source { store, deltas, models, transfer_ids: workload.transfer_ids_all }
    }

    /// Applies the deltas up to op `op` (op = index + 1).
    fn apply_through(&self, op: usize) {
        let from = self.store.checkpoint().unwrap().op as usize;
        for index in from..op {
            let op = index as u64 + 1;
            self.store.apply_checkpoint_with(op, &self.deltas[index], &consensus_of(op)).unwrap();
        }
    }
}

fn export_chunks(store: &Store) -> (Vec<Vec<u8>>, SnapshotImage) {
    let mut chunks = Vec::new();
    let image = store
        .export(|chunk| {
            assert!(chunk.len() <= SNAPSHOT_CHUNK_BYTES_MAX);
            chunks.push(chunk);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap();
    assert_eq!(image.chunks, chunks.len() as u64);
    assert_eq!(image.bytes, chunks.iter().map(|chunk| chunk.len() as u64).sum::<u64>());
    (chunks, image)
}

fn import_chunks<'c>(
    store: &Store,
    chunks: impl IntoIterator<Item = &'c Vec<u8>>,
) -> Result<SnapshotImage, StoreError> {
    let mut importer = store.import()?;
    for chunk in chunks {
        importer.chunk(chunk)?;
    }
    importer.finish()
}

/// The imported store equals the model at `op` through every read, and the
/// consensus metadata is the one stored with `op`.
fn check_at(store: &Store, source: &Source, op: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    check(store, &source.models[op as usize], op, &source.transfer_ids, &mut rng, QUERIES_PER_CHECK);
    let consensus = if op == 0 { Vec::new() } else { consensus_of(op) };
    assert_eq!(store.consensus().unwrap(), consensus);
}

#[test]
fn snapshot_round_trips_into_another_store_and_another_database() {
    let dir = tempfile::tempdir().unwrap();
    let database = StoreDatabase::open(&dir.path().join("a")).unwrap();
    let source = Source::build(Store::open_in(&database, "cell1.g0.").unwrap(), 21, IMAGE_CONFIG, IMAGE_DELTAS_COUNT);
    source.apply_through(IMAGE_DELTAS_COUNT);
    let op = IMAGE_DELTAS_COUNT as u64;
    let (chunks, image) = export_chunks(&source.store);
    assert!(chunks.len() >= IMAGE_CHUNKS_MIN, "image of {} chunks: the workload wrote too little", chunks.len());
    assert_eq!(image.checkpoint, source.store.checkpoint().unwrap());
    assert_eq!(image.consensus, consensus_of(op));
    assert!(!source.models[op as usize].open_pending().is_empty(), "the workload left no pending transfer open");

    // Into another store of the same database, and into another database.
    let other = StoreDatabase::open(&dir.path().join("b")).unwrap();
    for (database, name) in [(&database, "cell1.g1."), (&other, "cell1.")] {
        let target = Store::open_in(database, name).unwrap();
        let imported = import_chunks(&target, &chunks).unwrap();
        assert_eq!(imported, image);
        check_at(&target, &source, op, 1);
        assert_eq!(target.accounts().unwrap(), source.store.accounts().unwrap());
        assert_eq!(target.open_pending().unwrap(), source.store.open_pending().unwrap());
        // The image of the copy is the same image, byte for byte.
        let (chunks_again, image_again) = export_chunks(&target);
        assert_eq!(image_again, image);
        assert!(chunks_again == chunks, "the copy exports another image");
        // The copy is a store like any other: it reopens, and takes the next checkpoint.
        drop(target);
        let target = Store::open_in(database, name).unwrap();
        check_at(&target, &source, op, 2);
        assert!(matches!(target.import(), Err(StoreError::NotEmpty { .. })));
    }
    // The other database, reopened, holds the image; and the copy takes the source's next checkpoint.
    drop(other);
    let other = StoreDatabase::open(&dir.path().join("b")).unwrap();
    let target = Store::open_in(&other, "cell1.").unwrap();
    check_at(&target, &source, op, 3);
    let mut workload = Workload::new(21, IMAGE_CONFIG);
    let deltas: Vec<CheckpointDelta> = (0..=IMAGE_DELTAS_COUNT).map(|_| workload.delta()).collect();
    target.apply_checkpoint_with(op + 1, &deltas[IMAGE_DELTAS_COUNT], b"next").unwrap();
    assert_eq!(target.consensus().unwrap(), b"next");
    assert_eq!(target.accounts().unwrap().len(), workload.account_ids().len());
}

#[test]
fn snapshot_of_an_empty_store_is_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let database = StoreDatabase::open(dir.path()).unwrap();
    let source = Store::open_in(&database, "a.").unwrap();
    let (chunks, image) = export_chunks(&source);
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        image,
        SnapshotImage {
            checkpoint: Checkpoint::default(),
            consensus: vec![],
            chunks: 1,
            bytes: image.bytes,
            records: 0
        }
    );
    let target = Store::open_in(&database, "b.").unwrap();
    assert_eq!(import_chunks(&target, &chunks).unwrap(), image);
    assert_eq!(target.checkpoint().unwrap(), Checkpoint::default());
    check(&target, &MemoryHistory::new(), 0, &[1, 2], &mut Rng::new(1), 10);
    // Still empty: it can take a real image.
    let source = Source::build(source, 3, IMAGE_CONFIG, 4);
    source.apply_through(4);
    import_chunks(&target, &export_chunks(&source.store).0).unwrap();
    check_at(&target, &source, 4, 4);
}

#[test]
fn export_reads_one_checkpoint_while_checkpoints_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let database = StoreDatabase::open(dir.path()).unwrap();
    let deltas_count = IMAGE_DELTAS_COUNT + CONCURRENT_DELTAS_COUNT;
    let source = Source::build(Store::open_in(&database, "source.").unwrap(), 33, IMAGE_CONFIG, deltas_count);
    source.apply_through(IMAGE_DELTAS_COUNT);

    // A checkpoint after every chunk handed to the sink: none of them is in the image.
    let mut chunks = Vec::new();
    let image = source
        .store
        .export(|chunk| {
            chunks.push(chunk);
            let op = source.store.checkpoint().unwrap().op as usize + 1;
            source.apply_through(op);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap();
    assert!(chunks.len() >= IMAGE_CHUNKS_MIN);
    assert_eq!(image.checkpoint.op, IMAGE_DELTAS_COUNT as u64);
    assert_eq!(source.store.checkpoint().unwrap().op, (IMAGE_DELTAS_COUNT + chunks.len()) as u64);
    let target = Store::open_in(&database, "target0.").unwrap();
    assert_eq!(import_chunks(&target, &chunks).unwrap(), image);
    check_at(&target, &source, image.checkpoint.op, 5);

    // Another thread applies a checkpoint whenever an export has handed its
    // first chunk to the sink, which waits until it is committed: every
    // image is still exactly the checkpoint the export started at.
    let done = AtomicBool::new(false);
    let requested = AtomicU64::new(0);
    let applied = AtomicU64::new(0);
    let images = std::thread::scope(|scope| {
        scope.spawn(|| {
            let op_first = source.store.checkpoint().unwrap().op as usize + 1;
            for (count, op) in (op_first..=deltas_count).enumerate() {
                while requested.load(Ordering::Acquire) <= count as u64 {
                    std::thread::yield_now();
                }
                source.apply_through(op);
                applied.store(count as u64 + 1, Ordering::Release);
            }
            done.store(true, Ordering::Release);
        });
        let mut images = Vec::new();
        while !done.load(Ordering::Acquire) {
            let mut chunks = Vec::new();
            let image = source
                .store
                .export(|chunk| {
                    if chunks.is_empty() {
                        let count = requested.fetch_add(1, Ordering::AcqRel) + 1;
                        while applied.load(Ordering::Acquire) < count && !done.load(Ordering::Acquire) {
                            std::thread::yield_now();
                        }
                    }
                    chunks.push(chunk);
                    Ok::<(), std::convert::Infallible>(())
                })
                .unwrap();
            let target = Store::open_in(&database, &format!("target{}.", images.len() + 1)).unwrap();
            assert_eq!(import_chunks(&target, &chunks).unwrap(), image);
            images.push((target, image));
        }
        images
    });
    let ops: Vec<u64> = images.iter().map(|(_, image)| image.checkpoint.op).collect();
    println!("concurrent images at ops {ops:?}");
    let op_first = IMAGE_DELTAS_COUNT + chunks.len();
    assert_eq!(
        ops,
        (op_first..op_first + CONCURRENT_DELTAS_COUNT - chunks.len()).map(|op| op as u64).collect::<Vec<_>>()
    );
    for (index, (target, image)) in images.iter().enumerate() {
        check_at(target, &source, image.checkpoint.op, index as u64);
    }
}

#[test]
fn import_needs_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let database = StoreDatabase::open(dir.path()).unwrap();
    let source = Source::build(Store::open_in(&database, "source.").unwrap(), 4, IMAGE_CONFIG, 3);
    source.apply_through(3);
    let (chunks, _) = export_chunks(&source.store);
    assert!(matches!(source.store.import(), Err(StoreError::NotEmpty { .. })));

    let target = Store::open_in(&database, "target.").unwrap();
    let importer = target.import().unwrap();
    assert!(matches!(target.import(), Err(StoreError::NotEmpty { .. })), "two imports at once");
    drop(importer);
    // Nothing was loaded: still empty, and importable.
    import_chunks(&target, &chunks).unwrap();
    check_at(&target, &source, 3, 6);
    assert!(matches!(import_chunks(&target, &chunks), Err(StoreError::NotEmpty { .. })));
    check_at(&target, &source, 3, 7);
}

/// Sets the chunk's checksum to match its (changed) content, as the format documents.
fn reseal(chunk: &mut [u8]) {
    let (frame, body) = chunk.split_at(CHUNK_FRAME_SIZE);
    let checksum = crc32c::crc32c_append(crc32c::crc32c(&frame[..CHUNK_CHECKSUM_AT]), body);
    chunk[CHUNK_CHECKSUM_AT..CHUNK_FRAME_SIZE].copy_from_slice(&checksum.to_le_bytes());
}

/// Imports `chunks` into a fresh store named `name` and expects a failure:
/// an error from some chunk or from `finish`, after which the importer
/// refuses everything and the store is at checkpoint 0. Then drops the store.
fn check_refused(database: &StoreDatabase, name: &str, chunks: &[Vec<u8>], what: &str) -> StoreError {
    let target = Store::open_in(database, name).unwrap();
    let mut importer = target.import().unwrap();
    let mut error = None;
    for chunk in chunks {
        if let Err(chunk_error) = importer.chunk(chunk) {
            error = Some(chunk_error);
            break;
        }
    }
    let error = match error {
        Some(error) => {
            assert!(importer.chunk(&chunks[0]).is_err(), "{what}: importer usable after an error");
            assert!(importer.finish().is_err(), "{what}: importer finished after an error");
            error
        }
        None => importer.finish().expect_err(what),
    };
    assert_eq!(target.checkpoint().unwrap(), Checkpoint::default(), "{what}");
    assert_eq!(target.consensus().unwrap(), Vec::<u8>::new(), "{what}");
    drop(target);
    database.drop_store(name).unwrap();
    error
}

#[test]
fn damaged_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let database = StoreDatabase::open(dir.path()).unwrap();
    let source = Source::build(Store::open_in(&database, "source.").unwrap(), 8, IMAGE_CONFIG, IMAGE_DELTAS_COUNT + 1);
    source.apply_through(IMAGE_DELTAS_COUNT);
    let (chunks, _) = export_chunks(&source.store);
    let count = chunks.len();
    assert!(count >= IMAGE_CHUNKS_MIN);
    source.apply_through(IMAGE_DELTAS_COUNT + 1);
    let (later, _) = export_chunks(&source.store);
    let mut cases: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    let with = |index: usize, chunk: Vec<u8>| {
        let mut image = chunks.clone();
        image[index] = chunk;
        image
    };

    // Cut, reordered, duplicated, missing.
    cases.push(("first chunk cut".into(), with(0, chunks[0][..10].to_vec())));
    cases.push(("middle chunk cut by a byte".into(), with(1, chunks[1][..chunks[1].len() - 1].to_vec())));
    cases.push(("middle chunk cut in half".into(), with(1, chunks[1][..chunks[1].len() / 2].to_vec())));
    cases.push(("last chunk cut".into(), with(count - 1, chunks[count - 1][..CHUNK_FRAME_SIZE + 3].to_vec())));
    cases.push(("empty chunk".into(), with(1, Vec::new())));
    cases.push(("oversized chunk".into(), with(1, vec![0; SNAPSHOT_CHUNK_BYTES_MAX + 1])));
    let mut swapped = chunks.clone();
    swapped.swap(1, 2);
    cases.push(("chunks 1 and 2 swapped".into(), swapped));
    let mut duplicated = chunks.clone();
    duplicated.insert(1, chunks[1].clone());
    cases.push(("chunk 1 twice".into(), duplicated));
    cases.push(("chunk after the last".into(), chunks.iter().chain([&chunks[count - 1]]).cloned().collect()));
    cases.push(("first chunk missing".into(), chunks[1..].to_vec()));
    cases.push(("middle chunk missing".into(), [&chunks[..1], &chunks[2..]].concat()));
    cases.push(("last chunk missing".into(), chunks[..count - 1].to_vec()));
    cases.push(("no chunk".into(), Vec::new()));
    cases.push(("a chunk of a later image".into(), with(1, later[1].clone())));

    // Damage behind a valid frame checksum: the records' own checks catch it.
    let resealed = |index: usize, change: &dyn Fn(&mut Vec<u8>)| {
        let mut chunk = chunks[index].clone();
        change(&mut chunk);
        reseal(&mut chunk);
        with(index, chunk)
    };
    // The first record of chunk 1 starts right after the frame (chunk 1 has no header).
    let first_record_value_at = |chunk: &[u8]| {
        let key_size = u16::from_le_bytes([chunk[CHUNK_FRAME_SIZE + 1], chunk[CHUNK_FRAME_SIZE + 2]]) as usize;
        CHUNK_FRAME_SIZE + 7 + key_size
    };
    cases.push((
        "a record's value damaged".into(),
        resealed(1, &|chunk| {
            let at = first_record_value_at(chunk);
            chunk[at] ^= 1;
        }),
    ));
    cases.push((
        "a record's key damaged".into(),
        resealed(1, &|chunk| {
            chunk[CHUNK_FRAME_SIZE + 7] ^= 0x80;
        }),
    ));
    cases.push(("an unknown keyspace".into(), resealed(1, &|chunk| chunk[CHUNK_FRAME_SIZE] = 9)));
    cases.push((
        "a record's size too big".into(),
        resealed(1, &|chunk| {
            chunk[CHUNK_FRAME_SIZE + 3..CHUNK_FRAME_SIZE + 7].copy_from_slice(&u32::MAX.to_le_bytes())
        }),
    ));
    cases.push((
        "a record repeated".into(),
        resealed(1, &|chunk| {
            let record_size = first_record_value_at(chunk) - CHUNK_FRAME_SIZE
                + u32::from_le_bytes(chunk[CHUNK_FRAME_SIZE + 3..CHUNK_FRAME_SIZE + 7].try_into().unwrap()) as usize;
            let record = chunk[CHUNK_FRAME_SIZE..CHUNK_FRAME_SIZE + record_size].to_vec();
            chunk.splice(CHUNK_FRAME_SIZE..CHUNK_FRAME_SIZE, record);
            let body_size = (chunk.len() - CHUNK_FRAME_SIZE) as u32;
            chunk[16..20].copy_from_slice(&body_size.to_le_bytes());
        }),
    ));
    cases.push(("a last flag on a middle chunk".into(), resealed(1, &|chunk| chunk[4] |= 2)));

    // Bit flips: in the frame, the header, the trailer and the records of every chunk.
    let mut rng = Rng::new(99);
    for (index, original) in chunks.iter().enumerate() {
        let bits = original.len() as u64 * 8;
        for flip in 0..FLIPS_PER_CHUNK {
            let bit = match flip {
                0..4 => rng.below(CHUNK_FRAME_SIZE as u64 * 8),
                4..6 => CHUNK_FRAME_SIZE as u64 * 8 + rng.below(28 * 8), // Header (first chunk) or records.
                6..8 => bits - 1 - rng.below(64 * 8),                    // Trailer (last chunk) or records.
                _ => rng.below(bits),
            };
            let mut chunk = original.clone();
            chunk[(bit / 8) as usize] ^= 1 << (bit % 8);
            cases.push((format!("bit {bit} of chunk {index} flipped"), with(index, chunk)));
        }
    }

    for (index, (what, image)) in cases.iter().enumerate() {
        let error = check_refused(&database, &format!("target{index}."), image, what);
        assert!(matches!(error, StoreError::Snapshot { .. } | StoreError::Corrupt { .. }), "{what}: {error}");
    }
    // The undamaged image still loads.
    let target = Store::open_in(&database, "whole.").unwrap();
    import_chunks(&target, &chunks).unwrap();
    check_at(&target, &source, IMAGE_DELTAS_COUNT as u64, 9);
}

#[test]
fn export_stops_at_the_sink_error() {
    let dir = tempfile::tempdir().unwrap();
    let source = Source::build(Store::open(dir.path()).unwrap(), 10, IMAGE_CONFIG, IMAGE_DELTAS_COUNT);
    source.apply_through(IMAGE_DELTAS_COUNT);
    let mut calls = 0;
    let result = source.store.export(|_chunk| {
        calls += 1;
        if calls == 2 {
            Err(std::io::Error::other("peer went away"))
        } else {
            Ok(())
        }
    });
    assert!(matches!(&result, Err(ExportError::Sink(error)) if error.to_string() == "peer went away"));
    assert_eq!(calls, 2);
    assert!(result.unwrap_err().to_string().contains("peer went away"));
}

#[test]
fn import_dropped_midway_leaves_checkpoint_zero_and_drop_store_cleans_it() {
    let dir = tempfile::tempdir().unwrap();
    let source_dir = tempfile::tempdir().unwrap();
    let source = Source::build(Store::open(source_dir.path()).unwrap(), 12, IMAGE_CONFIG, IMAGE_DELTAS_COUNT);
    source.apply_through(IMAGE_DELTAS_COUNT);
    let (chunks, image) = export_chunks(&source.store);
    assert!(chunks.len() >= IMAGE_CHUNKS_MIN);
    for loaded in 0..=chunks.len() {
        {
            let database = StoreDatabase::open(dir.path()).unwrap();
            let target = Store::open_in(&database, "cell.g1.").unwrap();
            let mut importer = target.import().unwrap();
            for chunk in &chunks[..loaded] {
                importer.chunk(chunk).unwrap();
            }
            // The process stops here: no finish.
        }
        let database = StoreDatabase::open(dir.path()).unwrap();
        let target = Store::open_in(&database, "cell.g1.").unwrap();
        assert_eq!(target.checkpoint().unwrap(), Checkpoint::default(), "after {loaded} chunks");
        assert_eq!(target.consensus().unwrap(), Vec::<u8>::new());
        if loaded >= 2 {
            // Some keyspaces were loaded whole: the store is not empty, and says so.
            assert!(matches!(target.import(), Err(StoreError::NotEmpty { .. })), "after {loaded} chunks");
        }
        drop(target);
        database.drop_store("cell.g1.").unwrap();
        drop(database);
        let database = StoreDatabase::open(dir.path()).unwrap();
        let target = Store::open_in(&database, "cell.g1.").unwrap();
        check(&target, &MemoryHistory::new(), 0, &source.transfer_ids[..50], &mut Rng::new(1), 10);
        assert_eq!(import_chunks(&target, &chunks).unwrap(), image);
        check_at(&target, &source, IMAGE_DELTAS_COUNT as u64, loaded as u64);
        drop(target);
        database.drop_store("cell.g1.").unwrap();
    }
}

/// The child of `import_killed_midway_*`: imports the chunk files of
/// `dir/chunks` into `dir/db`, printing a line after each chunk.
fn kill_child(dir: &Path) {
    let database = StoreDatabase::open(&dir.join("db")).unwrap();
    let target = Store::open_in(&database, "target.").unwrap();
    let mut importer = target.import().unwrap();
    let count = std::fs::read_dir(dir.join("chunks")).unwrap().count();
    for index in 0..count {
        importer.chunk(&std::fs::read(dir.join("chunks").join(index.to_string())).unwrap()).unwrap();
        println!("chunk {index}");
    }
    importer.finish().unwrap();
    println!("finished");
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn import_killed_midway_leaves_checkpoint_zero_or_the_whole_image() {
    if let Ok(dir) = std::env::var(KILL_CHILD_DIR_ENV) {
        kill_child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = Source::build(Store::open(&dir.path().join("source")).unwrap(), 14, IMAGE_CONFIG, IMAGE_DELTAS_COUNT);
    source.apply_through(IMAGE_DELTAS_COUNT);
    let (chunks, image) = export_chunks(&source.store);
    std::fs::create_dir(dir.path().join("chunks")).unwrap();
    for (index, chunk) in chunks.iter().enumerate() {
        std::fs::write(dir.path().join("chunks").join(index.to_string()), chunk).unwrap();
    }
    let mut rng = Rng::new(15);
    let mut outcomes = Vec::new();
    for round in 0..KILL_ROUNDS {
        // Kill after a number of chunk lines (the last round: after "finished").
        let lines_before_kill =
            if round + 1 == KILL_ROUNDS { chunks.len() + 1 } else { rng.below(chunks.len() as u64 + 1) as usize };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "import_killed_midway_leaves_checkpoint_zero_or_the_whole_image", "--nocapture"])
            .env(KILL_CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while seen < lines_before_kill {
            let line = lines.next().expect("child output").unwrap();
            seen += usize::from(line.starts_with("chunk ") || line == "finished");
        }
        child.kill().unwrap();
        child.wait().unwrap();

        let database = StoreDatabase::open(&dir.path().join("db")).unwrap();
        let target = Store::open_in(&database, "target.").unwrap();
        let checkpoint = target.checkpoint().unwrap();
        if checkpoint == image.checkpoint {
            check_at(&target, &source, checkpoint.op, round as u64);
        } else {
            assert_eq!(checkpoint, Checkpoint::default(), "round {round}");
        }
        outcomes.push((lines_before_kill, checkpoint.op));
        drop(target);
        database.drop_store("target.").unwrap();
    }
    println!("killed after (lines, op): {outcomes:?}");
    assert_eq!(outcomes.last().unwrap().1, image.checkpoint.op, "the child finished before it was killed");
}

#[test]
fn registry_values_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let database = StoreDatabase::open(dir.path()).unwrap();
        assert_eq!(database.registry_get("cell1.generation").unwrap(), None);
        database.registry_set("cell1.generation", 1).unwrap();
        database.registry_set("cell2.generation", u64::MAX).unwrap();
        database.registry_set("cell1.generation", 2).unwrap();
        assert_eq!(database.registry_get("cell1.generation").unwrap(), Some(2));
        assert!(matches!(database.registry_get(""), Err(StoreError::InvalidName { .. })));
        assert!(matches!(database.registry_set(&"x".repeat(256), 1), Err(StoreError::InvalidName { .. })));
        // A store named like the registry does not collide with it; a drop guard's name is refused.
        let store = Store::open_in(&database, "registry").unwrap();
        store.apply_checkpoint(1, &CheckpointDelta { timestamp_last: 1, ..CheckpointDelta::default() }).unwrap();
        assert!(matches!(Store::open_in(&database, "~drop-guard.1"), Err(StoreError::InvalidName { .. })));
    }
    let database = StoreDatabase::open(dir.path()).unwrap();
    assert_eq!(database.registry_get("cell1.generation").unwrap(), Some(2));
    assert_eq!(database.registry_get("cell2.generation").unwrap(), Some(u64::MAX));
    assert_eq!(database.registry_get("cell3.generation").unwrap(), None);
    assert_eq!(Store::open_in(&database, "registry").unwrap().checkpoint().unwrap().op, 1);
}

#[test]
fn drop_store_removes_one_generation() {
    let dir = tempfile::tempdir().unwrap();
    let database = StoreDatabase::open(dir.path()).unwrap();
    let old = Source::build(Store::open_in(&database, "cell1.g0.").unwrap(), 16, IMAGE_CONFIG, 6);
    old.apply_through(6);
    let kept = Source::build(Store::open_in(&database, "cell1.g1.").unwrap(), 17, IMAGE_CONFIG, 5);
    kept.apply_through(5);
    let Source { store, .. } = old;
    drop(store);
    database.drop_store("cell1.g0.").unwrap();
    database.drop_store("cell9.never.").unwrap(); // Nothing there: no error.
    assert!(matches!(database.drop_store(&"x".repeat(300)), Err(StoreError::InvalidName { .. })));

    let empty = |database: &StoreDatabase| {
        let store = Store::open_in(database, "cell1.g0.").unwrap();
        check(&store, &MemoryHistory::new(), 0, &[1, 2, 3], &mut Rng::new(1), 10);
        assert_eq!(store.consensus().unwrap(), Vec::<u8>::new());
        store
    };
    drop(empty(&database));
    check_at(&kept.store, &kept, 5, 1);
    drop(kept.store);
    drop(database);
    let database = StoreDatabase::open(dir.path()).unwrap();
    let store = empty(&database);
    let kept_again = Source::build(Store::open_in(&database, "cell1.g1.").unwrap(), 17, IMAGE_CONFIG, 5);
    check_at(&kept_again.store, &kept_again, 5, 2);

    // The name is reusable: a new generation under it holds only its own data.
    let renewed = Source::build(store, 18, IMAGE_CONFIG, 3);
    renewed.apply_through(3);
    drop(renewed.store);
    drop(kept_again);
    drop(database);
    let database = StoreDatabase::open(dir.path()).unwrap();
    let renewed = Source { store: Store::open_in(&database, "cell1.g0.").unwrap(), ..renewed };
    check_at(&renewed.store, &renewed, 3, 3);
}

#[test]
fn consensus_is_stored_with_each_checkpoint_and_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut workload = Workload::new(19, IMAGE_CONFIG);
    let deltas: Vec<CheckpointDelta> = (0..4).map(|_| workload.delta()).collect();
    {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.consensus().unwrap(), Vec::<u8>::new());
        let largest = vec![0xA5; CONSENSUS_BYTES_MAX];
        store.apply_checkpoint_with(1, &deltas[0], &largest).unwrap();
        assert_eq!(store.consensus().unwrap(), largest);
        let too_large = vec![1; CONSENSUS_BYTES_MAX + 1];
        let error = store.apply_checkpoint_with(2, &deltas[1], &too_large).unwrap_err();
        assert!(matches!(error, StoreError::ConsensusTooLarge { size } if size == CONSENSUS_BYTES_MAX + 1));
        assert_eq!(store.checkpoint().unwrap().op, 1, "nothing written");
        assert_eq!(store.consensus().unwrap(), largest);
        store.apply_checkpoint(2, &deltas[1]).unwrap();
        assert_eq!(store.consensus().unwrap(), Vec::<u8>::new(), "a checkpoint without consensus metadata clears it");
        store.apply_checkpoint_with(3, &deltas[2], b"term 9").unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.checkpoint().unwrap().op, 3);
    assert_eq!(store.consensus().unwrap(), b"term 9");
    // The largest consensus metadata travels in the first chunk.
    store.apply_checkpoint_with(4, &deltas[3], &vec![7; CONSENSUS_BYTES_MAX]).unwrap();
    let (chunks, image) = export_chunks(&store);
    assert_eq!(image.consensus, vec![7; CONSENSUS_BYTES_MAX]);
    let other = tempfile::tempdir().unwrap();
    let target = Store::open(other.path()).unwrap();
    assert_eq!(import_chunks(&target, &chunks).unwrap(), image);
    assert_eq!(target.consensus().unwrap(), vec![7; CONSENSUS_BYTES_MAX]);
}

// ------------------------------------------------------------------------------------------------
// Throughput (a figure, not a check): CELLPAY_SNAPSHOT_BENCH_TRANSFERS=1000000 cargo test --release
// -p cellpay-storage --test store_snapshot snapshot_throughput -- --nocapture

fn bench_account_id(index: u64) -> u128 {
    cellpay_ledger::id::account_id(index % 100, index + 1).expect("not reserved")
}

/// `transfers_count` transfers between `THROUGHPUT_ACCOUNTS_COUNT` accounts
/// (1 in 20 keeps balance history), 1 in 10 pending, from `timestamp_first`.
fn bench_delta(rng: &mut Rng, timestamp_first: u64, transfers_count: usize) -> CheckpointDelta {
    let history = |index: u64| index.is_multiple_of(20);
    let mut accounts: Vec<Account> = (0..THROUGHPUT_ACCOUNTS_COUNT)
        .map(|index| Account {
            id: bench_account_id(index),
            ledger: 1,
            code: 1,
            flags: if history(index) { AccountFlags::HISTORY } else { AccountFlags::default() },
            timestamp: 1,
            credits_posted: u128::from(timestamp_first),
            ..Account::default()
        })
        .collect();
    accounts.sort_unstable_by_key(|account| account.id);
    let mut transfers = Vec::with_capacity(transfers_count);
    let mut pending_statuses = Vec::new();
    let mut balances = Vec::new();
    for index in 0..transfers_count {
        let timestamp = timestamp_first + index as u64;
        let debit = rng.below(THROUGHPUT_ACCOUNTS_COUNT);
        let credit = (debit + 1 + rng.below(THROUGHPUT_ACCOUNTS_COUNT - 1)) % THROUGHPUT_ACCOUNTS_COUNT;
        let pending = index.is_multiple_of(10);
        let transfer = Transfer {
            id: u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()),
            debit_account_id: bench_account_id(debit),
            credit_account_id: bench_account_id(credit),
            amount: u128::from(rng.below(1_000_000)),
            ledger: 1,
            code: 1,
            flags: if pending { TransferFlags::PENDING } else { TransferFlags::default() },
            timestamp,
            ..Transfer::default()
        };
        if pending {
            pending_statuses.push((transfer.id, PendingStatus::Pending));
        }
        for account in [debit, credit] {
            if history(account) {
                let account_id = bench_account_id(account);
                balances.push(AccountBalance { account_id, debits_posted: 1, timestamp, ..Default::default() });
            }
        }
        transfers.push(transfer);
    }
    pending_statuses.sort_unstable();
    let timestamp_last = timestamp_first + transfers_count as u64 - 1;
    CheckpointDelta { accounts, transfers, pending_statuses, balances, timestamp_last }
}

fn rate_report(what: &str, image: &SnapshotImage, transfers_count: usize, seconds: f64) {
    println!(
        "{what:<28} {:>8.3} s  {:>8.1} MB/s  {:>10.0} records/s  {:>10.0} transfers/s",
        seconds,
        image.bytes as f64 / 1e6 / seconds,
        image.records as f64 / seconds,
        transfers_count as f64 / seconds,
    );
}

#[test]
fn snapshot_throughput() {
    let transfers_count: usize = std::env::var(THROUGHPUT_TRANSFERS_ENV)
        .map_or(THROUGHPUT_TRANSFERS_DEFAULT, |value| value.parse().expect("a number of transfers"));
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let database = StoreDatabase::open(&dir.path().join("source")).unwrap();
    let source = Store::open_in(&database, "source.").unwrap();
    let mut rng = Rng::new(0x5EED);
    let mut written = 0;
    let mut op = 0;
    let started = Instant::now();
    while written < transfers_count {
        let count = (transfers_count - written).min(THROUGHPUT_CHECKPOINT_TRANSFERS_MAX);
        op += 1;
        source.apply_checkpoint_with(op, &bench_delta(&mut rng, written as u64 + 2, count), &consensus_of(op)).unwrap();
        written += count;
    }
    println!("source: {transfers_count} transfers in {op} checkpoints, {:.3} s", started.elapsed().as_secs_f64());

    let started = Instant::now();
    let mut chunks_bytes = 0u64;
    let image = source
        .export(|chunk| {
            chunks_bytes += chunk.len() as u64;
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(chunks_bytes, image.bytes);
    println!("image: {} chunks, {} bytes, {} records", image.chunks, image.bytes, image.records);
    rate_report("export alone", &image, transfers_count, seconds);

    // Export piped into an import, into another database, as a follower would receive it.
    let target_database = StoreDatabase::open(&dir.path().join("target")).unwrap();
    let target = Store::open_in(&target_database, "target.").unwrap();
    let started = Instant::now();
    let mut importer = target.import().unwrap();
    let mut import_seconds = 0.0;
    let exported = source
        .export(|chunk| {
            let chunk_started = Instant::now();
            let result = importer.chunk(&chunk);
            import_seconds += chunk_started.elapsed().as_secs_f64();
            result
        })
        .unwrap();
    let finish_started = Instant::now();
    let imported = importer.finish().unwrap();
    import_seconds += finish_started.elapsed().as_secs_f64();
    let seconds = started.elapsed().as_secs_f64();
    println!("import finish (last keyspace, meta records, fsync): {:.3} s", finish_started.elapsed().as_secs_f64());
    rate_report("import alone", &image, transfers_count, import_seconds);
    assert_eq!(exported, image);
    assert_eq!(imported, image);
    rate_report("export + import", &image, transfers_count, seconds);
    assert_eq!(target.checkpoint().unwrap(), source.checkpoint().unwrap());
    assert_eq!(target.open_pending().unwrap().len(), transfers_count.div_ceil(10));
}

/// fjall 3.1.13 reuses the id of a deleted keyspace after a restart, and the
/// recreated keyspace can vanish at the next restart (its name mapping sorts
/// below the deletion's tombstone): `drop_store` keeps ids from being reused.
#[test]
fn store_recreated_after_drop_store_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let source = Source::build(Store::open(&dir.path().join("source")).unwrap(), 22, IMAGE_CONFIG, 8);
    source.apply_through(8);
    let (chunks, image) = export_chunks(&source.store);
    let open = || StoreDatabase::open(&dir.path().join("db")).unwrap();
    for round in 0..3u64 {
        {
            let database = open();
            import_chunks(&Store::open_in(&database, "cell.g0.").unwrap(), &chunks).unwrap();
        }
        {
            let database = open();
            database.drop_store("cell.g0.").unwrap();
            // Keyspaces that come and go in between.
            for index in 0..5 {
                let name = format!("other{round}.{index}.");
                drop(Store::open_in(&database, &name).unwrap());
                database.drop_store(&name).unwrap();
            }
        }
        {
            let database = open();
            assert_eq!(import_chunks(&Store::open_in(&database, "cell.g0.").unwrap(), &chunks).unwrap(), image);
            let kept =
                Source::build(Store::open_in(&database, &format!("kept{round}.")).unwrap(), round, IMAGE_CONFIG, 2);
            kept.apply_through(2);
        }
        for _ in 0..2 {
            let database = open();
            check_at(&Store::open_in(&database, "cell.g0.").unwrap(), &source, 8, round);
            for earlier in 0..=round {
                let kept = Source::build(
                    Store::open_in(&database, &format!("kept{earlier}.")).unwrap(),
                    earlier,
                    IMAGE_CONFIG,
                    2,
                );
                check_at(&kept.store, &kept, 2, earlier);
            }
        }
        open().drop_store("cell.g0.").unwrap();
    }
}
