//! The write-ahead log: checksummed records in segment files, group commit,
//! and recovery that cuts a torn tail but never skips corruption.
//!
//! # Use
//!
//! ```text
//! let (mut wal, recovery) = Wal::open(dir)?;      // scans, validates, cuts a torn tail
//! wal.replay(checkpoint_op + 1, |op, payload| apply(op, payload))?;
//! loop {
//!     for batch in group { wal.append(&batch)?; } // buffered, no fsync
//!     wal.sync()?;                                // one fdatasync for the whole group
//!     acknowledge(group);                         // only now
//! }
//! wal.truncate_before(checkpoint_op)?;            // after a checkpoint
//! ```
//!
//! Every record has an op: the first op of a fresh log is 1 and each append
//! takes the next one. To start a fresh, empty log at op `N + 1` (the node was
//! restored from a checkpoint at op `N`), call [`Wal::set_next_op`] before the
//! first append; it renames the empty segment and fsyncs the directory, so the
//! position survives a restart even if nothing is appended.
//!
//! # On-disk format
//!
//! A log is a directory of segment files. A segment is named after the op of
//! its first record, in 20 decimal digits: `00000000000000000001.wal`. Ops are
//! contiguous within a segment and across segments; a segment's last op is the
//! next segment's first op minus one. Other files in the directory are ignored.
//! A segment is a sequence of records, each starting at a multiple of 8 bytes
//! (all integers little-endian):
//!
//! ```text
//! offset  size  field
//!      0     8  magic            b"cpWAL01\n" (no zero byte, so zeros never look like a header)
//!      8     8  op               u64, >= 1
//!     16     4  payload_size     u32, <= RECORD_PAYLOAD_MAX
//!     20     4  reserved         0
//!     24     4  checksum         CRC32C over header bytes 0..24, then the payload
//!     28     4  checksum_header  CRC32C over header bytes 0..28
//!     32     n  payload          n = payload_size
//!   32+n     p  padding          zeros, 0 <= p < 8, so the next record is 8-byte aligned
//! ```
//!
//! `checksum_header` lets recovery trust `payload_size` before reading the
//! payload; `checksum` covers the header fields and the payload together.
//!
//! # Durability
//!
//! [`Wal::append`] only copies into a write buffer (payloads of at least
//! 64 KiB are written straight to the file with one `writev`, without a
//! copy) and never fsyncs, except as described below for a roll.
//! [`Wal::sync`] writes what is buffered, `fdatasync`s the segment and, when
//! a segment was created since the last sync, fsyncs the directory.
//! When a segment fills, the log rolls: the full segment is fdatasynced
//! before the first byte of the next segment reaches the file system (and
//! before the next segment file is even created). So after any crash, every
//! segment except the last is complete, and a fault in a segment that is not
//! the last is always corruption. Dropping a [`Wal`] without `sync` discards
//! the buffer, which is exactly what a crash does.
//!
//! After an I/O error in `append` or `sync` the state of the file is unknown
//! (and an `fsync` error cannot be retried safely), so the log refuses all
//! further writes with [`WalError::Failed`]; reopening it recovers.
//!
//! # Recovery: torn tail or corruption
//!
//! [`Wal::open`] reads every segment in op order and checks every record: the
//! magic, the header checksum, the fields (reserved zero, size within the
//! maximum, op exactly the previous op plus one), the record being complete
//! within the file, the payload checksum and the zero padding.
//!
//! - A record whose header checksum holds but whose fields are wrong (an
//!   unexpected op, a size over the maximum, a non-zero reserved field) was
//!   written whole by someone, so it is never a torn write: corruption.
//! - Ops must continue from one segment to the next: a gap or an overlap
//!   between segment names and their contents is corruption.
//! - Any other fault (bad magic, zeros, bad header checksum, a record cut
//!   short by the end of the file, a payload checksum mismatch) in a segment
//!   that is not the last is corruption.
//! - The same fault in the last segment is a torn tail only if no valid
//!   record follows it: recovery searches every 8-byte aligned offset after
//!   the fault (after the end of the faulty record when its header checksum
//!   holds, since its length is then trusted and the bytes inside it are
//!   payload) up to the end of the file for a complete record with a valid
//!   header, valid checksums and zero padding, whatever its op. If one is
//!   found, the fault is corruption followed by data, reported as
//!   [`WalError::Corrupt`] with the file left untouched. If none is found,
//!   the file is cut at the start of the faulty record (`set_len`, then
//!   fsync), a warning is logged and the cut is reported in [`Recovery`].
//!
//! Caveat: writes that were never synced may reach the disk out of order in a
//! crash (a later page of a group persisted, an earlier one not). If a valid
//! record of such an unacknowledged group survives after a hole, recovery
//! reports `Corrupt` rather than cutting, because it cannot tell this from
//! real corruption of acknowledged data. That costs availability, never data.
//!
//! After recovery every segment is fdatasynced and the directory fsynced, so
//! records that a crashed process left only in the page cache are durable
//! before anyone replays them.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, IoSlice, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The largest payload of one record, in bytes.
pub const RECORD_PAYLOAD_MAX: usize = 2 * 1024 * 1024;
/// The default size after which the log rolls to a new segment, in bytes. A
/// segment holding a single record may exceed it.
pub const SEGMENT_SIZE_MAX: u64 = 64 * 1024 * 1024;
/// The size of a record header, in bytes.
pub const RECORD_HEADER_SIZE: usize = 32;
/// Every record starts at a multiple of this many bytes.
pub const RECORD_ALIGNMENT: usize = 8;

const RECORD_MAGIC: [u8; 8] = *b"cpWAL01\n";
/// Payloads at least this big skip the write buffer (no copy, one `writev`).
const RECORD_PAYLOAD_DIRECT_MIN: usize = 64 * 1024;
/// Small records are gathered in a buffer of this many bytes before `write`.
const WRITE_BUFFER_SIZE_MAX: usize = 1024 * 1024;
const READ_BUFFER_SIZE: usize = 1024 * 1024;
/// Recovery searches for records after a fault through windows of this size.
const SCAN_WINDOW_SIZE: usize = 1024 * 1024;
const SEGMENT_NAME_DIGITS: usize = 20;
const SEGMENT_NAME_SUFFIX: &str = ".wal";
const PADDING_ZEROS: [u8; RECORD_ALIGNMENT] = [0; RECORD_ALIGNMENT];

const _: () = assert!(RECORD_PAYLOAD_MAX <= u32::MAX as usize);
const _: () = assert!(RECORD_HEADER_SIZE.next_multiple_of(RECORD_ALIGNMENT) == RECORD_HEADER_SIZE);
// A small record always fits in an empty buffer.
const _: () = assert!(RECORD_HEADER_SIZE + RECORD_PAYLOAD_DIRECT_MIN + RECORD_ALIGNMENT <= WRITE_BUFFER_SIZE_MAX);
const _: () = assert!(SCAN_WINDOW_SIZE >= RECORD_HEADER_SIZE);

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("wal record payload of {size_bytes} bytes exceeds the maximum of {size_max_bytes} bytes")]
    PayloadTooLarge { size_bytes: usize, size_max_bytes: usize },
    /// A record or segment is damaged in a way that is not a torn tail. The
    /// files are left as they were.
    #[error("wal corrupt: {} at offset {offset} (op {op:?}): {reason}", segment.display())]
    Corrupt { segment: PathBuf, offset: u64, op: Option<u64>, reason: String },
    /// Replay asked for ops that were truncated away (or never existed).
    #[error("wal replay from op {op} requested, but the oldest op retained is {op_first}")]
    OpNotRetained { op: u64, op_first: u64 },
    /// [`Wal::set_next_op`] on a log that holds records.
    #[error("wal is not empty (last op {op_last}); the next op can only be set on an empty log")]
    NotEmpty { op_last: u64 },
    /// An earlier I/O error left the files in an unknown state.
    #[error("wal failed after an earlier I/O error; reopen it to recover")]
    Failed,
}

/// An error from [`Wal::replay`]: the log's own, or the callback's.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError<E> {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("wal replay callback failed at op {op}: {error}")]
    Callback { op: u64, error: E },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalOptions {
    /// Roll to a new segment when a record would make the current one larger
    /// than this many bytes.
    pub segment_size_max: u64,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions { segment_size_max: SEGMENT_SIZE_MAX }
    }
}

/// What [`Wal::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub segment_count: u64,
    /// Valid records in the log after recovery (all of them durable).
    pub record_count: u64,
    /// The oldest op retained; `op_last + 1` when the log holds no record.
    pub op_first: u64,
    /// The newest op; `op_first - 1` when the log holds no record.
    pub op_last: u64,
    /// Bytes cut from the end of the last segment (0 when the tail was clean).
    pub torn_tail_bytes_cut: u64,
    pub torn_tail: Option<TornTail>,
}

/// Where a torn tail was cut, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: PathBuf,
    /// The file's new length: the start of the first faulty record.
    pub offset: u64,
    /// The op the cut record would have had; appends continue with it.
    pub op: u64,
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Segment {
    op_first: u64,
    path: PathBuf,
}

/// A write-ahead log of opaque payloads. See the module documentation.
pub struct Wal {
    directory: PathBuf,
    segment_size_max: u64,
    /// In op order; the last one is the segment being written.
    segments: Vec<Segment>,
    /// The last segment's file; `None` until its first byte is written.
    segment_file: Option<File>,
    /// The last segment's size including buffered bytes.
    segment_size_bytes: u64,
    /// The segment before the last, after a roll: written, not yet synced.
    /// It is synced before any byte is written to the last segment.
    segment_previous: Option<File>,
    /// A segment was created since the directory was last fsynced.
    directory_sync_needed: bool,
    /// Records appended but not yet written, all in the last segment.
    buffer: Vec<u8>,
    buffer_capacity: usize,
    op_last: u64,
    op_durable: u64,
    failed: bool,
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wal")
            .field("directory", &self.directory)
            .field("segment_size_max", &self.segment_size_max)
            .field("segments", &self.segments)
            .field("segment_size_bytes", &self.segment_size_bytes)
            .field("buffer_size_bytes", &self.buffer.len())
            .field("op_last", &self.op_last)
            .field("op_durable", &self.op_durable)
            .field("failed", &self.failed)
            .finish()
    }
}

impl Wal {
    /// Opens (creating if absent) the log in `directory` with default options.
    /// See [`Wal::open_with`].
    pub fn open(directory: &Path) -> Result<(Wal, Recovery), WalError> {
        Wal::open_with(directory, WalOptions::default())
    }

    /// Opens (creating if absent) the log in `directory`. Scans all segments,
    /// validates every record, cuts a torn tail, makes what it found durable,
    /// and returns the log positioned for appending plus what it found.
    pub fn open_with(directory: &Path, options: WalOptions) -> Result<(Wal, Recovery), WalError> {
        assert!(options.segment_size_max > 0);
        fs::create_dir_all(directory).map_err(io_error(directory))?;
        let mut segments = segments_list(directory)?;
        if segments.is_empty() {
            segments.push(Segment { op_first: 1, path: directory.join(segment_name(1)) });
            directory_sync(directory)?;
            let wal = Wal::new(directory, options, segments, None, 0, 0);
            let recovery = Recovery {
                segment_count: 0,
                record_count: 0,
                op_first: 1,
                op_last: 0,
                torn_tail_bytes_cut: 0,
                torn_tail: None,
            };
            return Ok((wal, recovery));
        }

        let mut payload = Vec::new();
        let mut record_count = 0;
        let mut torn_tail = None;
        let mut torn_tail_bytes_cut = 0;
        let mut segment_size_bytes = 0;
        let mut op_next = segments[0].op_first;
        for (index, segment) in segments.iter().enumerate() {
            let segment_is_last = index + 1 == segments.len();
            if segment.op_first != op_next {
                let relation = if segment.op_first > op_next { "gap" } else { "overlap" };
                return Err(WalError::Corrupt {
                    segment: segment.path.clone(),
                    offset: 0,
                    op: Some(op_next),
                    reason: format!(
                        "{relation} between segments: this segment starts at op {}, the previous one ends at op {}",
                        segment.op_first,
                        op_next - 1
                    ),
                });
            }
            let file = File::open(&segment.path).map_err(io_error(&segment.path))?;
            let scan = segment_scan(&file, &segment.path, segment.op_first, &mut payload)?;
            record_count += scan.op_next - segment.op_first;
            op_next = scan.op_next;
            segment_size_bytes = scan.size_valid_bytes;
            if let Some(fault) = scan.fault {
                if !segment_is_last {
                    return Err(WalError::Corrupt {
                        segment: segment.path.clone(),
                        offset: fault.offset,
                        op: Some(scan.op_next),
                        reason: format!("{} in a segment that is not the last", fault.reason),
                    });
                }
                let found =
                    record_valid_find(&file, &segment.path, fault.resume_offset, scan.size_file_bytes, &mut payload)?;
                if let Some((offset_later, op_later)) = found {
                    return Err(WalError::Corrupt {
                        segment: segment.path.clone(),
                        offset: fault.offset,
                        op: Some(scan.op_next),
                        reason: format!(
                            "{}, but a valid record (op {op_later}) follows at offset {offset_later}, so this is not a torn tail",
                            fault.reason
                        ),
                    });
                }
                let bytes_cut = scan.size_file_bytes - fault.offset;
                tail_cut(&segment.path, fault.offset)?;
                tracing::warn!(
                    segment = %segment.path.display(),
                    offset = fault.offset,
                    op = scan.op_next,
                    bytes_cut,
                    reason = %fault.reason,
                    "wal: cut a torn tail"
                );
                torn_tail_bytes_cut = bytes_cut;
                torn_tail = Some(TornTail {
                    segment: segment.path.clone(),
                    offset: fault.offset,
                    op: scan.op_next,
                    reason: fault.reason,
                });
            }
            // A crashed process may have left these bytes in the page cache only.
            file.sync_data().map_err(io_error(&segment.path))?;
        }
        directory_sync(directory)?;

        let segment_last = segments.last().expect("segments is not empty");
        let segment_file =
            OpenOptions::new().append(true).open(&segment_last.path).map_err(io_error(&segment_last.path))?;
        let recovery = Recovery {
            segment_count: segments.len() as u64,
            record_count,
            op_first: segments[0].op_first,
            op_last: op_next - 1,
            torn_tail_bytes_cut,
            torn_tail,
        };
        tracing::info!(
            directory = %directory.display(),
            segment_count = recovery.segment_count,
            record_count = recovery.record_count,
            op_first = recovery.op_first,
            op_last = recovery.op_last,
            torn_tail_bytes_cut = recovery.torn_tail_bytes_cut,
            "wal: opened"
        );
        let wal = Wal::new(directory, options, segments, Some(segment_file), segment_size_bytes, recovery.op_last);
        Ok((wal, recovery))
    }

    fn new(
        directory: &Path,
        options: WalOptions,
        segments: Vec<Segment>,
        segment_file: Option<File>,
        segment_size_bytes: u64,
        op_last: u64,
    ) -> Wal {
        let segment_last = segments.last().expect("a log always has a segment");
        assert!(op_last + 1 >= segment_last.op_first);
        assert_eq!(segment_size_bytes == 0, op_last + 1 == segment_last.op_first);
        assert!(segment_file.is_some() || segment_size_bytes == 0);
        let buffer = Vec::with_capacity(WRITE_BUFFER_SIZE_MAX + RECORD_HEADER_SIZE);
        let buffer_capacity = buffer.capacity();
        Wal {
            directory: directory.to_path_buf(),
            segment_size_max: options.segment_size_max,
            segments,
            segment_file,
            segment_size_bytes,
            segment_previous: None,
            directory_sync_needed: false,
            buffer,
            buffer_capacity,
            op_last,
            op_durable: op_last,
            failed: false,
        }
    }

    /// Buffers a record and returns its op. Payloads of at least 64 KiB are
    /// written to the file at once (one `writev`, no copy); smaller ones when
    /// the 1 MiB buffer fills or at `sync`.
    ///
    /// Never fsyncs, with one exception: right after a roll, if bytes of the
    /// new segment must be written before the next `sync` (a large payload or
    /// a full buffer), the full segment is fdatasynced first, so that a
    /// segment never reaches the disk before the one it follows. That is at
    /// most once per segment, and it is the fdatasync the next `sync` would
    /// otherwise have done.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, WalError> {
        if self.failed {
            return Err(WalError::Failed);
        }
        if payload.len() > RECORD_PAYLOAD_MAX {
            return Err(WalError::PayloadTooLarge { size_bytes: payload.len(), size_max_bytes: RECORD_PAYLOAD_MAX });
        }
        assert!(self.op_last < u64::MAX);
        let op = self.op_last + 1;
        let record_size_bytes = record_size_bytes(payload.len());
        if self.segment_size_bytes > 0 && self.segment_size_bytes + record_size_bytes > self.segment_size_max {
            self.segment_roll(op)?;
        }
        let header = header_encode(op, payload);
        assert_eq!(header_decode(&header).map(|header| header.op), Ok(op));
        let padding = &PADDING_ZEROS[..padding_size(payload.len())];
        if payload.len() >= RECORD_PAYLOAD_DIRECT_MIN {
            self.buffer.extend_from_slice(&header);
            self.segment_write(&[payload, padding])?;
        } else {
            if self.buffer.len() as u64 + record_size_bytes > WRITE_BUFFER_SIZE_MAX as u64 {
                self.segment_write(&[])?;
            }
            self.buffer.extend_from_slice(&header);
            self.buffer.extend_from_slice(payload);
            self.buffer.extend_from_slice(padding);
        }
        assert_eq!(self.buffer.capacity(), self.buffer_capacity, "the write buffer never grows");
        self.segment_size_bytes += record_size_bytes;
        self.op_last = op;
        Ok(op)
    }

    /// Makes every appended record durable: writes what is buffered,
    /// fdatasyncs the segment, fsyncs the directory when a segment was created.
    /// Returns the last durable op.
    pub fn sync(&mut self) -> Result<u64, WalError> {
        if self.failed {
            return Err(WalError::Failed);
        }
        if self.op_durable == self.op_last {
            assert!(self.buffer.is_empty());
            assert!(self.segment_previous.is_none());
            return Ok(self.op_durable);
        }
        let result = self.sync_unchecked();
        if result.is_err() {
            self.failed = true;
        }
        result?;
        assert!(self.buffer.is_empty());
        assert!(self.segment_previous.is_none());
        self.op_durable = self.op_last;
        Ok(self.op_durable)
    }

    fn sync_unchecked(&mut self) -> Result<(), WalError> {
        self.segment_write(&[])?;
        let path = &self.segment_last().path;
        let file = self.segment_file.as_ref().expect("segment_write created the file");
        file.sync_data().map_err(io_error(path))?;
        if self.directory_sync_needed {
            directory_sync(&self.directory)?;
            self.directory_sync_needed = false;
        }
        Ok(())
    }

    /// The last appended op (0 for a fresh log).
    pub fn last_op(&self) -> u64 {
        self.op_last
    }

    /// The last durable op: everything up to it survives a crash.
    pub fn durable_op(&self) -> u64 {
        self.op_durable
    }

    /// The oldest op retained; `last_op() + 1` when the log holds no record.
    pub fn first_op(&self) -> u64 {
        self.segments[0].op_first
    }

    /// The number of segments, including the one being written (even if its
    /// file does not exist yet).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Makes the next appended op `op_next`, on a log that holds no record
    /// (for a node restored from a checkpoint at op `op_next - 1`). Durable on
    /// return: the empty segment is renamed (or created) and the directory
    /// fsynced, so `last_op()` is `op_next - 1` after a restart.
    pub fn set_next_op(&mut self, op_next: u64) -> Result<(), WalError> {
        assert!(op_next >= 1);
        if self.failed {
            return Err(WalError::Failed);
        }
        let log_is_empty = self.segments.len() == 1 && self.op_last + 1 == self.segments[0].op_first;
        if !log_is_empty {
            return Err(WalError::NotEmpty { op_last: self.op_last });
        }
        assert!(self.buffer.is_empty());
        assert!(self.segment_previous.is_none());
        assert_eq!(self.segment_size_bytes, 0);
        if op_next == self.segments[0].op_first {
            return Ok(());
        }
        let result = self.set_next_op_unchecked(op_next);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn set_next_op_unchecked(&mut self, op_next: u64) -> Result<(), WalError> {
        let path_next = self.directory.join(segment_name(op_next));
        let path_current = self.segments[0].path.clone();
        if self.segment_file.take().is_some() {
            fs::rename(&path_current, &path_next).map_err(io_error(&path_next))?;
        } else {
            File::create_new(&path_next).map_err(io_error(&path_next))?;
        }
        directory_sync(&self.directory)?;
        let file = OpenOptions::new().append(true).open(&path_next).map_err(io_error(&path_next))?;
        self.segments[0] = Segment { op_first: op_next, path: path_next };
        self.segment_file = Some(file);
        self.directory_sync_needed = false;
        self.op_last = op_next - 1;
        self.op_durable = op_next - 1;
        Ok(())
    }

    /// Deletes whole segments whose records all have an op `<= op` and are
    /// durable. Never deletes the segment being written, nor the segment
    /// before it while the newer segment's file is not yet durably created
    /// (the log's position must survive a crash).
    pub fn truncate_before(&mut self, op: u64) -> Result<(), WalError> {
        if self.failed {
            return Err(WalError::Failed);
        }
        let op_limit = op.min(self.op_durable);
        let segment_last_durable = self.segment_file.is_some() && !self.directory_sync_needed;
        let deletable_count_max =
            if segment_last_durable { self.segments.len() - 1 } else { self.segments.len().saturating_sub(2) };
        let mut delete_count = 0;
        while delete_count < deletable_count_max && self.segments[delete_count + 1].op_first - 1 <= op_limit {
            delete_count += 1;
        }
        if delete_count == 0 {
            return Ok(());
        }
        // Oldest first, so the segments left are always a contiguous suffix.
        for _ in 0..delete_count {
            let segment = &self.segments[0];
            fs::remove_file(&segment.path).map_err(io_error(&segment.path))?;
            tracing::debug!(segment = %segment.path.display(), "wal: deleted segment");
            self.segments.remove(0);
        }
        assert!(!self.segments.is_empty());
        directory_sync(&self.directory)
    }

    /// Calls `f(op, payload)` for every durable record with `op >= from_op`,
    /// in op order, reading one segment at a time with one reused payload
    /// buffer. Records are verified again as they are read. `from_op` must be
    /// at least [`Wal::first_op`]: a request for truncated ops is an error.
    pub fn replay<E, F>(&self, from_op: u64, mut f: F) -> Result<(), ReplayError<E>>
    where
        F: FnMut(u64, &[u8]) -> Result<(), E>,
    {
        let op_first = self.first_op();
        if from_op < op_first {
            return Err(WalError::OpNotRetained { op: from_op, op_first }.into());
        }
        let op_end = self.op_durable;
        let mut payload = Vec::new();
        for (index, segment) in self.segments.iter().enumerate() {
            if segment.op_first > op_end || from_op > op_end {
                break;
            }
            let segment_op_last = match self.segments.get(index + 1) {
                Some(segment_next) => (segment_next.op_first - 1).min(op_end),
                None => op_end,
            };
            if segment_op_last < from_op {
                continue;
            }
            let file = File::open(&segment.path).map_err(io_error(&segment.path))?;
            let size_file_bytes = file.metadata().map_err(io_error(&segment.path))?.len();
            let mut reader = RecordReader::new(&file, &segment.path, size_file_bytes);
            for op in segment.op_first..=segment_op_last {
                let wanted = op >= from_op;
                let offset = reader.offset;
                let corrupt =
                    |reason: String| WalError::Corrupt { segment: segment.path.clone(), offset, op: Some(op), reason };
                match reader.next(op, &mut payload, wanted)? {
                    RecordRead::Record { payload_size } => {
                        if wanted {
                            f(op, &payload[..payload_size]).map_err(|error| ReplayError::Callback { op, error })?;
                        }
                    }
                    RecordRead::End => {
                        return Err(corrupt("segment ends before a durable record".to_string()).into());
                    }
                    RecordRead::Fault(fault) => {
                        return Err(corrupt(format!("durable record unreadable: {}", fault.reason)).into());
                    }
                }
            }
        }
        Ok(())
    }

    fn segment_last(&self) -> &Segment {
        self.segments.last().expect("a log always has a segment")
    }

    /// Starts a new segment whose first op is `op_first`. The full segment's
    /// bytes are written now and synced before the new segment's first write.
    fn segment_roll(&mut self, op_first: u64) -> Result<(), WalError> {
        assert!(self.segment_size_bytes > 0);
        assert_eq!(op_first, self.op_last + 1);
        self.segment_write(&[])?;
        assert!(self.segment_previous.is_none());
        self.segment_previous = Some(self.segment_file.take().expect("segment_write created the file"));
        self.segments.push(Segment { op_first, path: self.directory.join(segment_name(op_first)) });
        self.segment_size_bytes = 0;
        Ok(())
    }

    /// Writes the buffer, then `slices`, to the last segment. Before that,
    /// syncs the previous segment if a roll left it unsynced, and creates the
    /// last segment's file if needed. Any error fails the log.
    fn segment_write(&mut self, slices: &[&[u8]]) -> Result<(), WalError> {
        assert!(!self.failed);
        let result = self.segment_write_unchecked(slices);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn segment_write_unchecked(&mut self, slices: &[&[u8]]) -> Result<(), WalError> {
        assert!(slices.len() <= 2);
        let segment_count = self.segments.len();
        if let Some(previous) = self.segment_previous.take() {
            let path = &self.segments[segment_count - 2].path;
            previous.sync_data().map_err(io_error(path))?;
            self.op_durable = self.op_durable.max(self.segments[segment_count - 1].op_first - 1);
        }
        let path = &self.segments[segment_count - 1].path;
        if self.segment_file.is_none() {
            let file = OpenOptions::new().append(true).create_new(true).open(path).map_err(io_error(path))?;
            self.segment_file = Some(file);
            self.directory_sync_needed = true;
        }
        let file = self.segment_file.as_mut().expect("created above");
        let mut io_slices = [
            IoSlice::new(&self.buffer),
            IoSlice::new(slices.first().copied().unwrap_or_default()),
            IoSlice::new(slices.get(1).copied().unwrap_or_default()),
        ];
        write_all_vectored(file, &mut io_slices).map_err(io_error(path))?;
        self.buffer.clear();
        Ok(())
    }
}

/// What a crash leaves of the log in `directory` (for the simulator, after
/// the log is dropped): every record after `durable_op` is lost, as the page
/// cache would lose it, and `torn` (a fragment of a write in progress, or
/// garbage) is left where the first lost record began. Returns the bytes lost.
pub fn crash_lose_unsynced(directory: &Path, durable_op: u64, torn: &[u8]) -> Result<u64, WalError> {
    let mut lost_bytes = 0;
    let mut payload = Vec::new();
    for segment in segments_list(directory)? {
        let size_file_bytes = fs::metadata(&segment.path).map_err(io_error(&segment.path))?.len();
        if segment.op_first > durable_op + 1 {
            // Created after the last sync: the directory entry is lost too.
            fs::remove_file(&segment.path).map_err(io_error(&segment.path))?;
            lost_bytes += size_file_bytes;
            continue;
        }
        let file = File::open(&segment.path).map_err(io_error(&segment.path))?;
        let mut reader = RecordReader::new(&file, &segment.path, size_file_bytes);
        let mut op = segment.op_first;
        while op <= durable_op {
            match reader.next(op, &mut payload, false)? {
                RecordRead::Record { .. } => op += 1,
                RecordRead::End | RecordRead::Fault(_) => break,
            }
        }
        let keep = reader.offset;
        drop(file);
        if keep < size_file_bytes {
            lost_bytes += size_file_bytes - keep;
            let file = OpenOptions::new().write(true).open(&segment.path).map_err(io_error(&segment.path))?;
            file.set_len(keep).map_err(io_error(&segment.path))?;
            file.write_all_at(torn, keep).map_err(io_error(&segment.path))?;
        }
    }
    Ok(lost_bytes)
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io { path: path.to_path_buf(), source }
}

fn directory_sync(directory: &Path) -> Result<(), WalError> {
    File::open(directory).and_then(|file| file.sync_all()).map_err(io_error(directory))
}

fn tail_cut(path: &Path, offset: u64) -> Result<(), WalError> {
    let file = OpenOptions::new().write(true).open(path).map_err(io_error(path))?;
    file.set_len(offset).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))?;
    let size_bytes = file.metadata().map_err(io_error(path))?.len();
    assert_eq!(size_bytes, offset);
    Ok(())
}

fn write_all_vectored(file: &mut File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut slices, written),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// The segments in `directory`, sorted by first op.
fn segments_list(directory: &Path) -> Result<Vec<Segment>, WalError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(directory).map_err(io_error(directory))? {
        let entry = entry.map_err(io_error(directory))?;
        let name = entry.file_name();
        let Some(op_first) = name.to_str().and_then(segment_name_parse) else {
            continue;
        };
        let path = entry.path();
        if op_first == 0 {
            return Err(WalError::Corrupt {
                segment: path,
                offset: 0,
                op: None,
                reason: "segment named op 0; ops start at 1".to_string(),
            });
        }
        segments.push(Segment { op_first, path });
    }
    segments.sort_by_key(|segment| segment.op_first);
    Ok(segments)
}

fn segment_name(op_first: u64) -> String {
    format!("{op_first:0width$}{SEGMENT_NAME_SUFFIX}", width = SEGMENT_NAME_DIGITS)
}

fn segment_name_parse(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_NAME_SUFFIX)?;
    if digits.len() != SEGMENT_NAME_DIGITS || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The size of a record with a payload of `payload_size_bytes`, header and
/// padding included.
pub fn record_size_bytes(payload_size_bytes: usize) -> u64 {
    assert!(payload_size_bytes <= RECORD_PAYLOAD_MAX);
    (RECORD_HEADER_SIZE + payload_size_bytes).next_multiple_of(RECORD_ALIGNMENT) as u64
}

fn padding_size(payload_size_bytes: usize) -> usize {
    let padding = record_size_bytes(payload_size_bytes) as usize - RECORD_HEADER_SIZE - payload_size_bytes;
    assert!(padding < RECORD_ALIGNMENT);
    padding
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecordHeader {
    op: u64,
    payload_size: u32,
    checksum: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HeaderFault {
    /// Not a header: what a torn or never-written region looks like.
    Absent(&'static str),
    /// A header that was written whole (its checksum holds) with impossible
    /// fields: never a torn write.
    Invalid(String),
}

fn header_encode(op: u64, payload: &[u8]) -> [u8; RECORD_HEADER_SIZE] {
    assert!(op >= 1);
    assert!(payload.len() <= RECORD_PAYLOAD_MAX);
    let mut header = [0u8; RECORD_HEADER_SIZE];
    header[0..8].copy_from_slice(&RECORD_MAGIC);
    header[8..16].copy_from_slice(&op.to_le_bytes());
    header[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[20..24].copy_from_slice(&0u32.to_le_bytes());
    let checksum = crc32c::crc32c_append(crc32c::crc32c(&header[0..24]), payload);
    header[24..28].copy_from_slice(&checksum.to_le_bytes());
    let checksum_header = crc32c::crc32c(&header[0..28]);
    header[28..32].copy_from_slice(&checksum_header.to_le_bytes());
    header
}

fn header_decode(header: &[u8; RECORD_HEADER_SIZE]) -> Result<RecordHeader, HeaderFault> {
    if header[0..8] != RECORD_MAGIC {
        if header.iter().all(|byte| *byte == 0) {
            return Err(HeaderFault::Absent("zeros where a record header should be"));
        }
        return Err(HeaderFault::Absent("bad record magic"));
    }
    let field_u32 = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    if crc32c::crc32c(&header[0..28]) != field_u32(28) {
        return Err(HeaderFault::Absent("record header checksum mismatch"));
    }
    let op = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let payload_size = field_u32(16);
    let reserved = field_u32(20);
    if reserved != 0 {
        return Err(HeaderFault::Invalid(format!("record header reserved field is {reserved}, not 0")));
    }
    if op == 0 {
        return Err(HeaderFault::Invalid("record header has op 0".to_string()));
    }
    if payload_size as usize > RECORD_PAYLOAD_MAX {
        return Err(HeaderFault::Invalid(format!(
            "record payload size {payload_size} exceeds the maximum {RECORD_PAYLOAD_MAX}"
        )));
    }
    Ok(RecordHeader { op, payload_size, checksum: field_u32(24) })
}

/// Checks a record's body (payload, then padding) against its header.
fn record_body_verify(
    header_bytes: &[u8; RECORD_HEADER_SIZE],
    header: RecordHeader,
    body: &[u8],
) -> Result<(), &'static str> {
    let payload_size = header.payload_size as usize;
    assert_eq!(body.len() as u64, record_size_bytes(payload_size) - RECORD_HEADER_SIZE as u64);
    let (payload, padding) = body.split_at(payload_size);
    if padding.iter().any(|byte| *byte != 0) {
        return Err("record padding is not zero");
    }
    if crc32c::crc32c_append(crc32c::crc32c(&header_bytes[0..24]), payload) != header.checksum {
        return Err("record checksum mismatch");
    }
    Ok(())
}

/// A fault that may be a torn tail.
#[derive(Debug)]
struct RecordFault {
    offset: u64,
    reason: String,
    /// Where a search for later valid records starts: past the faulty record
    /// when its header (and so its length) is trusted.
    resume_offset: u64,
}

#[derive(Debug)]
enum RecordRead {
    /// The record is valid; its payload is `payload[..payload_size]` (unless
    /// it was skipped).
    Record {
        payload_size: usize,
    },
    /// The end of the file, at a record boundary.
    End,
    Fault(RecordFault),
}

/// Reads a segment's records in order through a buffer.
struct RecordReader<'a> {
    reader: BufReader<&'a File>,
    path: &'a Path,
    offset: u64,
    size_file_bytes: u64,
}

impl<'a> RecordReader<'a> {
    fn new(file: &'a File, path: &'a Path, size_file_bytes: u64) -> RecordReader<'a> {
        RecordReader { reader: BufReader::with_capacity(READ_BUFFER_SIZE, file), path, offset: 0, size_file_bytes }
    }

    /// Reads the record at the current offset, which must have `op_expected`.
    /// A header that is valid but wrong is `Corrupt`; anything that may be a
    /// torn write is a `Fault`, after which the reader must not be used.
    /// With `payload_wanted` false the payload is skipped, not verified.
    fn next(&mut self, op_expected: u64, payload: &mut Vec<u8>, payload_wanted: bool) -> Result<RecordRead, WalError> {
        let offset = self.offset;
        assert!(offset <= self.size_file_bytes);
        assert_eq!(offset % RECORD_ALIGNMENT as u64, 0);
        let remaining_bytes = self.size_file_bytes - offset;
        if remaining_bytes == 0 {
            return Ok(RecordRead::End);
        }
        let fault =
            |reason: String, resume_offset: u64| Ok(RecordRead::Fault(RecordFault { offset, reason, resume_offset }));
        if remaining_bytes < RECORD_HEADER_SIZE as u64 {
            let reason = format!("incomplete record header: {remaining_bytes} bytes before the end of the file");
            return fault(reason, offset + RECORD_ALIGNMENT as u64);
        }
        let mut header_bytes = [0u8; RECORD_HEADER_SIZE];
        self.reader.read_exact(&mut header_bytes).map_err(io_error(self.path))?;
        let header = match header_decode(&header_bytes) {
            Ok(header) => header,
            Err(HeaderFault::Absent(reason)) => return fault(reason.to_string(), offset + RECORD_ALIGNMENT as u64),
            Err(HeaderFault::Invalid(reason)) => {
                return Err(WalError::Corrupt {
                    segment: self.path.to_path_buf(),
                    offset,
                    op: Some(op_expected),
                    reason,
                })
            }
        };
        if header.op != op_expected {
            return Err(WalError::Corrupt {
                segment: self.path.to_path_buf(),
                offset,
                op: Some(op_expected),
                reason: format!("record has op {}, expected op {op_expected}", header.op),
            });
        }
        let payload_size = header.payload_size as usize;
        let record_size_bytes = record_size_bytes(payload_size);
        let offset_end = offset + record_size_bytes;
        if record_size_bytes > remaining_bytes {
            let reason = format!(
                "incomplete record: {record_size_bytes} bytes long, {remaining_bytes} bytes before the end of the file"
            );
            return fault(reason, offset_end);
        }
        let body_size = (record_size_bytes - RECORD_HEADER_SIZE as u64) as usize;
        if payload_wanted {
            if payload.len() < body_size {
                payload.resize(body_size, 0);
            }
            let body = &mut payload[..body_size];
            self.reader.read_exact(body).map_err(io_error(self.path))?;
            if let Err(reason) = record_body_verify(&header_bytes, header, body) {
                return fault(reason.to_string(), offset_end);
            }
        } else {
            self.reader.seek_relative(body_size as i64).map_err(io_error(self.path))?;
        }
        self.offset = offset_end;
        Ok(RecordRead::Record { payload_size })
    }
}

#[derive(Debug)]
struct SegmentScan {
    /// The op after the last valid record.
    op_next: u64,
    /// The bytes of valid records from the start of the file.
    size_valid_bytes: u64,
    size_file_bytes: u64,
    /// The first record that is not valid, if any.
    fault: Option<RecordFault>,
}

/// Reads and verifies a segment's records until the end or the first fault.
fn segment_scan(file: &File, path: &Path, op_first: u64, payload: &mut Vec<u8>) -> Result<SegmentScan, WalError> {
    let size_file_bytes = file.metadata().map_err(io_error(path))?.len();
    let mut reader = RecordReader::new(file, path, size_file_bytes);
    let mut op = op_first;
    loop {
        let offset = reader.offset;
        match reader.next(op, payload, true)? {
            RecordRead::Record { .. } => op += 1,
            RecordRead::End => {
                return Ok(SegmentScan { op_next: op, size_valid_bytes: offset, size_file_bytes, fault: None })
            }
            RecordRead::Fault(fault) => {
                return Ok(SegmentScan { op_next: op, size_valid_bytes: offset, size_file_bytes, fault: Some(fault) })
            }
        }
    }
}

/// Searches every aligned offset in `offset_start..size_file_bytes` for a
/// complete, valid record of any op. Returns its offset and op.
fn record_valid_find(
    file: &File,
    path: &Path,
    offset_start: u64,
    size_file_bytes: u64,
    payload: &mut Vec<u8>,
) -> Result<Option<(u64, u64)>, WalError> {
    let mut window = vec![0u8; SCAN_WINDOW_SIZE];
    let mut offset = offset_start.next_multiple_of(RECORD_ALIGNMENT as u64);
    while offset + RECORD_HEADER_SIZE as u64 <= size_file_bytes {
        let window_size = (size_file_bytes - offset).min(SCAN_WINDOW_SIZE as u64) as usize;
        let window = &mut window[..window_size];
        file.read_exact_at(window, offset).map_err(io_error(path))?;
        let mut position = 0;
        while position + RECORD_HEADER_SIZE <= window_size {
            let header_bytes: &[u8; RECORD_HEADER_SIZE] =
                window[position..position + RECORD_HEADER_SIZE].try_into().expect("header size");
            if let Ok(header) = header_decode(header_bytes) {
                let record_offset = offset + position as u64;
                let record_size_bytes = record_size_bytes(header.payload_size as usize);
                if record_offset + record_size_bytes <= size_file_bytes {
                    let body_size = (record_size_bytes - RECORD_HEADER_SIZE as u64) as usize;
                    if payload.len() < body_size {
                        payload.resize(body_size, 0);
                    }
                    let body = &mut payload[..body_size];
                    file.read_exact_at(body, record_offset + RECORD_HEADER_SIZE as u64).map_err(io_error(path))?;
                    if record_body_verify(header_bytes, header, body).is_ok() {
                        return Ok(Some((record_offset, header.op)));
                    }
                }
            }
            position += RECORD_ALIGNMENT;
        }
        assert!(position > 0);
        offset += position as u64;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_fault_kind(header: &[u8; RECORD_HEADER_SIZE]) -> &'static str {
        match header_decode(header) {
            Ok(_) => "valid",
            Err(HeaderFault::Absent(_)) => "absent",
            Err(HeaderFault::Invalid(_)) => "invalid",
        }
    }

    /// A header with arbitrary fields and correct checksums.
    fn header_forge(op: u64, payload_size: u32, reserved: u32) -> [u8; RECORD_HEADER_SIZE] {
        let mut header = [0u8; RECORD_HEADER_SIZE];
        header[0..8].copy_from_slice(&RECORD_MAGIC);
        header[8..16].copy_from_slice(&op.to_le_bytes());
        header[16..20].copy_from_slice(&payload_size.to_le_bytes());
        header[20..24].copy_from_slice(&reserved.to_le_bytes());
        let checksum_header = crc32c::crc32c(&header[0..28]);
        header[28..32].copy_from_slice(&checksum_header.to_le_bytes());
        header
    }

    #[test]
    fn header_round_trip() {
        for (op, payload) in [(1u64, &b""[..]), (7, b"hello"), (u64::MAX, &[0xAB; 100][..])] {
            let header = header_encode(op, payload);
            let decoded = header_decode(&header).expect("valid header");
            assert_eq!(decoded.op, op);
            assert_eq!(decoded.payload_size as usize, payload.len());
            let mut body = payload.to_vec();
            body.resize(body.len() + padding_size(payload.len()), 0);
            assert_eq!(record_body_verify(&header, decoded, &body), Ok(()));
        }
    }

    #[test]
    fn header_zeros_and_bit_flips_are_absent() {
        assert_eq!(header_fault_kind(&[0u8; RECORD_HEADER_SIZE]), "absent");
        let header = header_encode(42, b"payload");
        for byte in 0..RECORD_HEADER_SIZE {
            for bit in 0..8 {
                let mut flipped = header;
                flipped[byte] ^= 1 << bit;
                assert_eq!(header_fault_kind(&flipped), "absent", "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn header_with_impossible_fields_is_invalid() {
        assert_eq!(header_fault_kind(&header_forge(5, 10, 0)), "valid");
        assert_eq!(header_fault_kind(&header_forge(5, 10, 1)), "invalid");
        assert_eq!(header_fault_kind(&header_forge(0, 10, 0)), "invalid");
        let size_over_max = RECORD_PAYLOAD_MAX as u32 + 1;
        assert_eq!(header_fault_kind(&header_forge(5, size_over_max, 0)), "invalid");
    }

    #[test]
    fn record_body_checks_payload_and_padding() {
        let header_bytes = header_encode(3, b"abc");
        let header = header_decode(&header_bytes).expect("valid header");
        let mut body = b"abc".to_vec();
        body.resize(body.len() + padding_size(3), 0);
        assert_eq!(record_body_verify(&header_bytes, header, &body), Ok(()));
        let mut payload_flipped = body.clone();
        payload_flipped[1] ^= 0x10;
        assert_eq!(record_body_verify(&header_bytes, header, &payload_flipped), Err("record checksum mismatch"));
        let mut padding_dirty = body.clone();
        *padding_dirty.last_mut().expect("padding") = 1;
        assert_eq!(record_body_verify(&header_bytes, header, &padding_dirty), Err("record padding is not zero"));
    }

    #[test]
    fn record_sizes_are_aligned() {
        assert_eq!(record_size_bytes(0), 32);
        assert_eq!(record_size_bytes(1), 40);
        assert_eq!(record_size_bytes(8), 40);
        assert_eq!(record_size_bytes(9), 48);
        assert_eq!(record_size_bytes(RECORD_PAYLOAD_MAX), 32 + RECORD_PAYLOAD_MAX as u64);
        for size in 0..64 {
            assert_eq!(record_size_bytes(size) % RECORD_ALIGNMENT as u64, 0);
            assert_eq!(record_size_bytes(size), (32 + size + padding_size(size)) as u64);
        }
    }

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_name(1), "00000000000000000001.wal");
        assert_eq!(segment_name_parse(&segment_name(1)), Some(1));
        assert_eq!(segment_name_parse(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(segment_name_parse("1.wal"), None);
        assert_eq!(segment_name_parse("00000000000000000001.wal.tmp"), None);
        assert_eq!(segment_name_parse("0000000000000000000x.wal"), None);
        assert_eq!(segment_name_parse("99999999999999999999.wal"), None);
    }
}
