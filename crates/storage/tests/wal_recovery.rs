//! Write-ahead log: round trips, torn tails, corruption, truncation.

/// In a module so that `cargo test wal` selects these tests.
mod wal {
    use std::fs::{self, OpenOptions};
    use std::io::Write;
    use std::path::{Path, PathBuf};

    use cellpay_storage::wal::{
        record_size_bytes, Recovery, ReplayError, Wal, WalError, WalOptions, RECORD_HEADER_SIZE, RECORD_PAYLOAD_MAX,
    };

    const SEGMENT_SIZE_SMALL_MAX: u64 = 4096;

    fn open(directory: &Path, segment_size_max: u64) -> Result<(Wal, Recovery), WalError> {
        Wal::open_with(directory, WalOptions { segment_size_max })
    }

    /// The payload of `op`: its size varies with the op, its bytes depend on it.
    fn payload_for(op: u64, size_bytes: usize) -> Vec<u8> {
        (0..size_bytes).map(|index| (op.wrapping_mul(131).wrapping_add(index as u64 * 7) % 251) as u8).collect()
    }

    fn payload_size_for(op: u64) -> usize {
        (op as usize * 37) % 700
    }

    fn append_ops(wal: &mut Wal, count: u64) {
        for _ in 0..count {
            let op = wal.last_op() + 1;
            assert_eq!(wal.append(&payload_for(op, payload_size_for(op))).expect("append"), op);
        }
    }

    fn replay_all(wal: &Wal, from_op: u64) -> Vec<(u64, Vec<u8>)> {
        let mut records = Vec::new();
        wal.replay(from_op, |op, payload| {
            records.push((op, payload.to_vec()));
            Ok::<(), std::convert::Infallible>(())
        })
        .expect("replay");
        records
    }

    /// Asserts that replay from `from_op` yields exactly ops `from_op..=op_last`
    /// with the payloads `append_ops` wrote.
    fn assert_replays(wal: &Wal, from_op: u64, op_last: u64) {
        let records = replay_all(wal, from_op);
        let ops: Vec<u64> = records.iter().map(|(op, _)| *op).collect();
        assert_eq!(ops, (from_op..=op_last).collect::<Vec<u64>>());
        for (op, payload) in records {
            assert_eq!(payload, payload_for(op, payload_size_for(op)), "payload of op {op}");
        }
    }

    fn segment_paths(directory: &Path) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = fs::read_dir(directory)
            .expect("read_dir")
            .map(|entry| entry.expect("entry").path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "wal"))
            .collect();
        paths.sort();
        paths
    }

    /// The offset of `op` in the only segment of a log written by `append_ops`
    /// from op 1.
    fn record_offset(op: u64) -> u64 {
        (1..op).map(|op| record_size_bytes(payload_size_for(op))).sum()
    }

    fn corrupt_fields(result: Result<(Wal, Recovery), WalError>) -> (PathBuf, u64, Option<u64>, String) {
        match result {
            Err(WalError::Corrupt { segment, offset, op, reason }) => (segment, offset, op, reason),
            Err(error) => panic!("expected Corrupt, got {error}"),
            Ok((wal, _)) => panic!("expected Corrupt, opened {wal:?}"),
        }
    }

    fn byte_flip(path: &Path, offset: u64) {
        let mut bytes = fs::read(path).expect("read");
        bytes[offset as usize] ^= 0x40;
        fs::write(path, bytes).expect("write");
    }

    fn bytes_append(path: &Path, bytes: &[u8]) {
        let mut file = OpenOptions::new().append(true).open(path).expect("open");
        file.write_all(bytes).expect("write");
    }

    fn file_cut(path: &Path, size_bytes: u64) {
        let file = OpenOptions::new().write(true).open(path).expect("open");
        file.set_len(size_bytes).expect("set_len");
    }

    #[test]
    fn fresh_log_is_empty() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (mut wal, recovery) = Wal::open(directory.path()).expect("open");
        assert_eq!(recovery.record_count, 0);
        assert_eq!(recovery.op_first, 1);
        assert_eq!(recovery.op_last, 0);
        assert_eq!((wal.last_op(), wal.durable_op(), wal.first_op()), (0, 0, 1));
        assert_eq!(wal.sync().expect("sync"), 0);
        assert!(replay_all(&wal, 1).is_empty());
        assert!(matches!(
            wal.replay(0, |_, _| Ok::<(), String>(())),
            Err(ReplayError::Wal(WalError::OpNotRetained { op: 0, op_first: 1 }))
        ));
    }

    #[test]
    fn round_trip_over_several_segments() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("open");
        for group in 0..10 {
            append_ops(&mut wal, 10);
            assert_eq!(wal.last_op(), (group + 1) * 10);
            assert_eq!(wal.durable_op(), group * 10, "append does not make records durable");
            assert_eq!(wal.sync().expect("sync"), (group + 1) * 10);
            assert_eq!(wal.durable_op(), (group + 1) * 10);
        }
        assert_replays(&wal, 1, 100);
        drop(wal);

        let segments = segment_paths(directory.path());
        assert!(segments.len() > 5, "{} segments", segments.len());
        for path in &segments[..segments.len() - 1] {
            let size_bytes = fs::metadata(path).expect("metadata").len();
            assert!(size_bytes <= SEGMENT_SIZE_SMALL_MAX, "{} is {size_bytes} bytes", path.display());
        }

        let (mut wal, recovery) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("reopen");
        assert_eq!(recovery.segment_count, segments.len() as u64);
        assert_eq!(recovery.record_count, 100);
        assert_eq!((recovery.op_first, recovery.op_last), (1, 100));
        assert_eq!(recovery.torn_tail_bytes_cut, 0);
        assert_eq!(recovery.torn_tail, None);
        assert_eq!((wal.last_op(), wal.durable_op()), (100, 100));
        assert_replays(&wal, 1, 100);
        assert_replays(&wal, 57, 100);
        assert!(replay_all(&wal, 101).is_empty());

        append_ops(&mut wal, 5);
        assert_eq!(wal.sync().expect("sync"), 105);
        drop(wal);
        let (wal, recovery) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("reopen");
        assert_eq!(recovery.op_last, 105);
        assert_replays(&wal, 1, 105);
    }

    #[test]
    fn large_payloads_round_trip() {
        let directory = tempfile::tempdir().expect("tempdir");
        let sizes = [RECORD_PAYLOAD_MAX, 1024 * 1024, 64 * 1024, 64 * 1024 - 1, 3, 1024 * 1024 + 5];
        let payloads: Vec<Vec<u8>> =
            sizes.iter().enumerate().map(|(index, size)| payload_for(index as u64 + 1, *size)).collect();
        // Segments: [2 MiB] (one record over the maximum), [1 MiB, 64 KiB, 64 KiB, 3], [1 MiB].
        let segment_size_max = 3 * 1024 * 1024 / 2;
        let (mut wal, _) = open(directory.path(), segment_size_max).expect("open");
        for payload in &payloads {
            wal.append(payload).expect("append");
        }
        assert_eq!(wal.sync().expect("sync"), sizes.len() as u64);
        drop(wal);
        assert_eq!(segment_paths(directory.path()).len(), 3);
        let (wal, recovery) = open(directory.path(), segment_size_max).expect("reopen");
        assert_eq!(recovery.record_count, sizes.len() as u64);
        let records = replay_all(&wal, 1);
        assert_eq!(records.len(), payloads.len());
        for ((op, payload), (index, expected)) in records.iter().zip(payloads.iter().enumerate()) {
            assert_eq!(*op, index as u64 + 1);
            assert!(payload == expected, "payload of op {op}");
        }
    }

    #[test]
    fn unsynced_records_are_lost_on_crash_and_synced_ones_kept() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("open");
        append_ops(&mut wal, 3);
        wal.sync().expect("sync");
        append_ops(&mut wal, 4);
        assert_eq!((wal.last_op(), wal.durable_op()), (7, 3));
        drop(wal); // A crash: the buffered records never reach the file.
        let (mut wal, recovery) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("reopen");
        assert_eq!(recovery.op_last, 3);
        assert_eq!(recovery.torn_tail, None);
        assert_replays(&wal, 1, 3);
        assert_eq!(wal.append(b"next").expect("append"), 4);
    }

    /// Writes `count` records from op 1 in one segment, syncs, closes; returns
    /// the segment's path.
    fn log_single_segment(directory: &Path, count: u64) -> PathBuf {
        let (mut wal, _) = Wal::open(directory).expect("open");
        append_ops(&mut wal, count);
        assert_eq!(wal.sync().expect("sync"), count);
        drop(wal);
        let segments = segment_paths(directory);
        assert_eq!(segments.len(), 1);
        assert_eq!(fs::metadata(&segments[0]).expect("metadata").len(), record_offset(count + 1));
        segments.into_iter().next().expect("one segment")
    }

    /// Reopens a log whose last record (op `count`) was damaged into a torn tail
    /// and checks that it is cut, that appends go on, and that the next reopen is
    /// clean.
    fn check_torn_tail_cut(directory: &Path, segment: &Path, count: u64, size_file_bytes: u64) {
        let (mut wal, recovery) = Wal::open(directory).expect("reopen cuts the torn tail");
        let offset = record_offset(count);
        assert_eq!(recovery.op_last, count - 1);
        assert_eq!(recovery.torn_tail_bytes_cut, size_file_bytes - offset);
        let torn_tail = recovery.torn_tail.expect("torn tail reported");
        assert_eq!(torn_tail.segment, segment);
        assert_eq!(torn_tail.offset, offset);
        assert_eq!(torn_tail.op, count);
        assert_eq!(fs::metadata(segment).expect("metadata").len(), offset, "file cut at the torn record");
        assert_replays(&wal, 1, count - 1);

        assert_eq!(wal.last_op(), count - 1);
        append_ops(&mut wal, 2);
        assert_eq!(wal.sync().expect("sync"), count + 1);
        drop(wal);

        let (wal, recovery) = Wal::open(directory).expect("reopen is clean");
        assert_eq!(recovery.torn_tail, None);
        assert_eq!(recovery.torn_tail_bytes_cut, 0);
        assert_eq!(recovery.op_last, count + 1);
        assert_replays(&wal, 1, count + 1);
    }

    #[test]
    fn torn_tail_cut_in_the_payload_of_the_last_record() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 10);
        let size_bytes = record_offset(10) + RECORD_HEADER_SIZE as u64 + 5;
        assert!(payload_size_for(10) > 5);
        file_cut(&segment, size_bytes);
        check_torn_tail_cut(directory.path(), &segment, 10, size_bytes);
    }

    #[test]
    fn torn_tail_cut_in_the_header_of_the_last_record() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 10);
        let size_bytes = record_offset(10) + 13;
        file_cut(&segment, size_bytes);
        check_torn_tail_cut(directory.path(), &segment, 10, size_bytes);
    }

    #[test]
    fn torn_tail_of_zeros_after_the_last_record() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 10);
        bytes_append(&segment, &[0u8; 5000]);
        // The zeros start where op 11 would be.
        check_torn_tail_cut(directory.path(), &segment, 11, record_offset(11) + 5000);
    }

    #[test]
    fn torn_tail_of_garbage_after_the_last_record() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 10);
        let garbage: Vec<u8> = (0..777u32).map(|index| (index * 7 + 3) as u8).collect();
        bytes_append(&segment, &garbage);
        check_torn_tail_cut(directory.path(), &segment, 11, record_offset(11) + 777);
    }

    #[test]
    fn torn_tail_of_zeros_inside_the_last_record() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 10);
        // The last record's payload was never written: its pages are zeros.
        let mut bytes = fs::read(&segment).expect("read");
        let payload_start = (record_offset(10) + RECORD_HEADER_SIZE as u64) as usize;
        bytes[payload_start..].fill(0);
        fs::write(&segment, &bytes).expect("write");
        check_torn_tail_cut(directory.path(), &segment, 10, bytes.len() as u64);
    }

    #[test]
    fn whole_segment_of_zeros_is_a_torn_tail() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 4);
        let size_bytes = fs::metadata(&segment).expect("metadata").len();
        fs::write(&segment, vec![0u8; size_bytes as usize]).expect("write");
        let (mut wal, recovery) = Wal::open(directory.path()).expect("reopen");
        assert_eq!(recovery.op_last, 0);
        assert_eq!(recovery.torn_tail_bytes_cut, size_bytes);
        assert_eq!(fs::metadata(&segment).expect("metadata").len(), 0);
        assert_eq!(wal.append(b"first").expect("append"), 1);
    }

    #[test]
    fn corruption_in_the_payload_of_an_early_record() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 10);
        byte_flip(&segment, record_offset(3) + RECORD_HEADER_SIZE as u64 + 2);
        let bytes_before = fs::read(&segment).expect("read");
        let (path, offset, op, reason) = corrupt_fields(Wal::open(directory.path()));
        assert_eq!(path, segment);
        assert_eq!(offset, record_offset(3));
        assert_eq!(op, Some(3));
        assert!(reason.contains("checksum"), "{reason}");
        assert_eq!(fs::read(&segment).expect("read"), bytes_before, "file left untouched");
        // It stays corrupt: nothing was cut or repaired.
        let (_, offset_again, _, _) = corrupt_fields(Wal::open(directory.path()));
        assert_eq!(offset_again, record_offset(3));
    }

    #[test]
    fn corruption_in_the_header_of_an_early_record() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 10);
        // The payload size field: the record's length can no longer be trusted.
        byte_flip(&segment, record_offset(4) + 17);
        let bytes_before = fs::read(&segment).expect("read");
        let (path, offset, op, _) = corrupt_fields(Wal::open(directory.path()));
        assert_eq!((path, offset, op), (segment.clone(), record_offset(4), Some(4)));
        assert_eq!(fs::read(&segment).expect("read"), bytes_before, "file left untouched");
    }

    #[test]
    fn corruption_before_the_last_record_is_not_a_torn_tail() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 10);
        byte_flip(&segment, record_offset(9) + RECORD_HEADER_SIZE as u64);
        let (_, offset, op, reason) = corrupt_fields(Wal::open(directory.path()));
        assert_eq!((offset, op), (record_offset(9), Some(9)));
        assert!(reason.contains("op 10"), "names the valid record after it: {reason}");
    }

    #[test]
    fn corruption_in_a_segment_that_is_not_the_last() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("open");
        append_ops(&mut wal, 40);
        wal.sync().expect("sync");
        drop(wal);
        let segments = segment_paths(directory.path());
        assert!(segments.len() >= 3);
        // Damage the last record of the first segment: in the last segment this
        // would be a torn tail.
        let size_bytes = fs::metadata(&segments[0]).expect("metadata").len();
        byte_flip(&segments[0], size_bytes - 1);
        let bytes_before = fs::read(&segments[0]).expect("read");
        let (path, offset, op, reason) = corrupt_fields(open(directory.path(), SEGMENT_SIZE_SMALL_MAX));
        assert_eq!(path, segments[0]);
        let ops_in_first: u64 = segment_ops(&segments[1]) - 1;
        assert_eq!(op, Some(ops_in_first));
        assert_eq!(offset, record_offset(ops_in_first));
        assert!(reason.contains("not the last"), "{reason}");
        assert_eq!(fs::read(&segments[0]).expect("read"), bytes_before, "file left untouched");
    }

    #[test]
    fn torn_tail_in_a_segment_that_is_not_the_last_is_corruption() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("open");
        append_ops(&mut wal, 40);
        wal.sync().expect("sync");
        drop(wal);
        let segments = segment_paths(directory.path());
        let size_bytes = fs::metadata(&segments[1]).expect("metadata").len();
        file_cut(&segments[1], size_bytes - 3);
        let (path, _, op, _) = corrupt_fields(open(directory.path(), SEGMENT_SIZE_SMALL_MAX));
        assert_eq!(path, segments[1]);
        assert_eq!(op, Some(segment_ops(&segments[2]) - 1));
        assert_eq!(fs::metadata(&segments[1]).expect("metadata").len(), size_bytes - 3, "not cut");
    }

    /// The first op of a segment, from its name.
    fn segment_ops(path: &Path) -> u64 {
        let stem = path.file_stem().expect("stem").to_str().expect("utf-8");
        stem.parse().expect("segment named by its first op")
    }

    #[test]
    fn missing_segment_is_a_gap() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("open");
        append_ops(&mut wal, 40);
        wal.sync().expect("sync");
        drop(wal);
        let segments = segment_paths(directory.path());
        fs::remove_file(&segments[1]).expect("remove");
        let (path, offset, op, reason) = corrupt_fields(open(directory.path(), SEGMENT_SIZE_SMALL_MAX));
        assert_eq!(path, segments[2]);
        assert_eq!(offset, 0);
        assert_eq!(op, Some(segment_ops(&segments[1])));
        assert!(reason.contains("gap"), "{reason}");
    }

    #[test]
    fn record_with_an_unexpected_op_is_corruption() {
        // A complete, checksummed record of op 5 right after op 2.
        let directory_first = tempfile::tempdir().expect("tempdir");
        let segment_first = log_single_segment(directory_first.path(), 2);
        let directory_other = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(directory_other.path()).expect("open");
        wal.set_next_op(5).expect("set_next_op");
        wal.append(b"op five").expect("append");
        wal.sync().expect("sync");
        drop(wal);
        let segment_other = &segment_paths(directory_other.path())[0];
        bytes_append(&segment_first, &fs::read(segment_other).expect("read"));

        let (path, offset, op, reason) = corrupt_fields(Wal::open(directory_first.path()));
        assert_eq!((path, offset, op), (segment_first, record_offset(3), Some(3)));
        assert!(reason.contains("op 5"), "{reason}");
    }

    #[test]
    fn payload_over_the_maximum_is_refused() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(directory.path()).expect("open");
        append_ops(&mut wal, 1);
        let payload = vec![7u8; RECORD_PAYLOAD_MAX + 1];
        match wal.append(&payload) {
            Err(WalError::PayloadTooLarge { size_bytes, size_max_bytes }) => {
                assert_eq!((size_bytes, size_max_bytes), (RECORD_PAYLOAD_MAX + 1, RECORD_PAYLOAD_MAX))
            }
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
        assert_eq!(wal.last_op(), 1, "nothing appended");
        // The log is still usable.
        assert_eq!(wal.append(&payload[..RECORD_PAYLOAD_MAX]).expect("append"), 2);
        assert_eq!(wal.sync().expect("sync"), 2);
        drop(wal);
        let (wal, recovery) = Wal::open(directory.path()).expect("reopen");
        assert_eq!(recovery.op_last, 2);
        let records = replay_all(&wal, 1);
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].1.len(), RECORD_PAYLOAD_MAX);
        assert!(records[1].1.iter().all(|byte| *byte == 7));
    }

    #[test]
    fn truncate_before_deletes_old_segments() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("open");
        append_ops(&mut wal, 100);
        wal.sync().expect("sync");
        let segments_before = segment_paths(directory.path());
        assert_eq!(wal.segment_count(), segments_before.len());

        wal.truncate_before(60).expect("truncate_before");
        let segments_after = segment_paths(directory.path());
        assert!(segments_after.len() < segments_before.len());
        // Exactly the segments whose ops all are <= 60 are gone.
        for (index, path) in segments_before.iter().enumerate() {
            let op_last_in_segment = segments_before.get(index + 1).map_or(100, |next| segment_ops(next) - 1);
            assert_eq!(segments_after.contains(path), op_last_in_segment > 60, "{}", path.display());
        }
        let op_first = wal.first_op();
        assert!(op_first > 1 && op_first <= 61, "first op {op_first}");
        assert_eq!(op_first, segment_ops(&segments_after[0]));
        assert_replays(&wal, op_first, 100);
        assert_replays(&wal, 61, 100);
        assert!(matches!(
            wal.replay(1, |_, _| Ok::<(), String>(())),
            Err(ReplayError::Wal(WalError::OpNotRetained { op: 1, .. }))
        ));

        append_ops(&mut wal, 3);
        wal.sync().expect("sync");
        drop(wal);
        let (mut wal, recovery) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("reopen");
        assert_eq!((recovery.op_first, recovery.op_last), (op_first, 103));
        assert_eq!(recovery.record_count, 103 - op_first + 1);
        assert_replays(&wal, op_first, 103);

        // Truncating everything keeps the segment being written.
        wal.truncate_before(u64::MAX).expect("truncate_before");
        assert_eq!(segment_paths(directory.path()).len(), 1);
        assert_eq!(wal.segment_count(), 1);
        assert_eq!(wal.last_op(), 103);
        append_ops(&mut wal, 1);
        assert_eq!(wal.sync().expect("sync"), 104);
        drop(wal);
        let (wal, recovery) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("reopen");
        assert_eq!(recovery.op_last, 104);
        assert_replays(&wal, wal.first_op(), 104);
    }

    #[test]
    fn truncate_before_keeps_records_that_are_not_durable() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = open(directory.path(), SEGMENT_SIZE_SMALL_MAX).expect("open");
        append_ops(&mut wal, 10);
        wal.sync().expect("sync");
        append_ops(&mut wal, 60); // Rolls segments, not synced.
        assert!(wal.segment_count() > 2);
        // A roll makes the full segment durable before the next one is written.
        let op_durable = wal.durable_op();
        assert!((10..70).contains(&op_durable), "durable op {op_durable}");
        wal.truncate_before(70).expect("truncate_before");
        assert!(wal.first_op() > 1, "durable segments were deleted");
        assert!(wal.first_op() <= op_durable + 1, "ops after the durable op {op_durable} stay");
        wal.sync().expect("sync");
        assert_replays(&wal, wal.first_op(), 70);
    }

    #[test]
    fn set_next_op_on_an_empty_log() {
        let directory = tempfile::tempdir().expect("tempdir");
        let (mut wal, _) = Wal::open(directory.path()).expect("open");
        wal.set_next_op(1001).expect("set_next_op");
        assert_eq!((wal.last_op(), wal.durable_op(), wal.first_op()), (1000, 1000, 1001));
        drop(wal);

        // The position is durable without any append.
        let (mut wal, recovery) = Wal::open(directory.path()).expect("reopen");
        assert_eq!((recovery.op_first, recovery.op_last, recovery.record_count), (1001, 1000, 0));
        assert_eq!(wal.append(b"a").expect("append"), 1001);
        assert_eq!(wal.sync().expect("sync"), 1001);
        assert!(matches!(wal.set_next_op(5), Err(WalError::NotEmpty { op_last: 1001 })));
        drop(wal);

        let (wal, recovery) = Wal::open(directory.path()).expect("reopen");
        assert_eq!(recovery.op_last, 1001);
        assert_eq!(replay_all(&wal, 1001), vec![(1001, b"a".to_vec())]);
        assert_eq!(segment_paths(directory.path()).len(), 1);
    }

    #[test]
    fn set_next_op_after_the_only_segment_was_cut_to_empty() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 1);
        file_cut(&segment, 7);
        let (mut wal, recovery) = Wal::open(directory.path()).expect("reopen");
        assert_eq!(recovery.torn_tail_bytes_cut, 7);
        wal.set_next_op(50).expect("set_next_op");
        assert_eq!(wal.append(b"x").expect("append"), 50);
        wal.sync().expect("sync");
        drop(wal);
        let paths = segment_paths(directory.path());
        assert_eq!(paths.len(), 1);
        assert_eq!(segment_ops(&paths[0]), 50);
        let (wal, _) = Wal::open(directory.path()).expect("reopen");
        assert_eq!(replay_all(&wal, 50), vec![(50, b"x".to_vec())]);
    }

    #[test]
    fn replay_stops_at_the_first_callback_error() {
        let directory = tempfile::tempdir().expect("tempdir");
        log_single_segment(directory.path(), 10);
        let (wal, _) = Wal::open(directory.path()).expect("open");
        let mut ops_seen = Vec::new();
        let result = wal.replay(2, |op, _| {
            ops_seen.push(op);
            if op == 5 {
                Err("stop")
            } else {
                Ok(())
            }
        });
        assert!(matches!(result, Err(ReplayError::Callback { op: 5, error: "stop" })));
        assert_eq!(ops_seen, vec![2, 3, 4, 5]);
    }

    #[test]
    fn replay_reports_a_durable_record_damaged_after_open() {
        let directory = tempfile::tempdir().expect("tempdir");
        let segment = log_single_segment(directory.path(), 10);
        let (wal, _) = Wal::open(directory.path()).expect("open");
        byte_flip(&segment, record_offset(6) + RECORD_HEADER_SIZE as u64);
        let result = wal.replay(1, |_, _| Ok::<(), String>(()));
        match result {
            Err(ReplayError::Wal(WalError::Corrupt { offset, op, .. })) => {
                assert_eq!((offset, op), (record_offset(6), Some(6)));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
