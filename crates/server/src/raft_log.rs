//! The node's consensus log: one write-ahead log shared by the replicas of
//! every cell the node hosts, and each replica's in-memory view of its log.
//!
//! Every cell's Raft log entries, hard state (term, vote, commit) and base
//! (where its log starts after a checkpoint or snapshot, and its membership)
//! are records of the node's one [`Wal`], tagged with the cell. The engine
//! appends the records of every cell that has something to persist, then
//! syncs once: one fsync per round for the whole node (group commit across
//! cells).
//!
//! Record payload (inside a WAL record, which carries its own checksums):
//!
//! ```text
//! offset  size  field
//!      0     1  kind (1 entries, 2 hard state, 3 base)
//!      1     7  reserved, zero
//!      8     8  cell id (u64 LE)
//!     16     …  entries: count u32, reserved u32, then per entry:
//!                 index u64, term u64, entry type u8, reserved 3,
//!                 data length u32, context length u32, data, context
//!               hard state: term u64, vote u64, commit u64
//!               base: index u64, term u64, auto_leave u8, reserved 3,
//!                 then four u32 counts (voters, learners, voters_outgoing,
//!                 learners_next) and the u64 ids of each list in order
//! ```
//!
//! Replay rebuilds each cell's [`CellLog`]: entries are appended (an entry at
//! an index already held truncates the log there first, as Raft requires),
//! the last hard state wins, and a base record compacts the log up to its
//! index (or, if the log does not hold that entry with that term, empties it:
//! a snapshot replaced it).
//!
//! Truncation: after a restart a cell needs its entries after its durable
//! point (the state its store holds: the last checkpoint or snapshot), its
//! latest hard state and a base. Before old segments are deleted, every
//! cell's hard state and durable point (as a base) are logged again and
//! synced, so segments are needed only for entries; the cut is the oldest op
//! holding an entry some cell still needs. Replay runs twice: the first pass
//! finds each cell's newest base, the second starts each cell's log there
//! (older bases and entries before it are skipped).

use std::collections::{BTreeMap, VecDeque};

use cellpay_storage::wal::{Recovery, ReplayError, Wal, WalError, RECORD_PAYLOAD_MAX};
use raft::prelude::{ConfState, Entry, EntryType, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

pub type CellId = u64;

const KIND_ENTRIES: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_BASE: u8 = 3;
const RECORD_HEADER_SIZE: usize = 16;
const ENTRIES_HEADER_SIZE: usize = 8;
const ENTRY_HEADER_SIZE: usize = 8 + 8 + 4 + 4 + 4;
/// Members in one list of a configuration.
pub const CONF_MEMBERS_MAX: usize = 1024;
/// The largest entry (data plus context) the log accepts.
pub const ENTRY_BYTES_MAX: usize = RECORD_PAYLOAD_MAX - RECORD_HEADER_SIZE - ENTRIES_HEADER_SIZE - ENTRY_HEADER_SIZE;

/// A record of the node's log.
#[derive(Clone, Debug, PartialEq)]
pub enum LogRecord {
    Entries { cell: CellId, entries: Vec<Entry> },
    HardState { cell: CellId, hard_state: HardState },
    Base { cell: CellId, base: LogBase },
}

/// Where a cell's log starts, and its membership there.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LogBase {
    /// The last index covered by the checkpoint or snapshot before the log.
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
}

/// Why a log record could not be decoded: a bug or a format change (the WAL
/// checksums every record, so never a torn write).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogRecordError {
    #[error("log record of {size} bytes is truncated")]
    Short { size: usize },
    #[error("unknown log record kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("unknown entry type {entry_type}")]
    UnknownEntryType { entry_type: u8 },
    #[error("configuration list of {count} members is over the limit of {CONF_MEMBERS_MAX}")]
    ConfTooLarge { count: u32 },
    #[error("{extra} unexpected bytes after the record")]
    Trailing { extra: usize },
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn header(out: &mut Vec<u8>, kind: u8, cell: CellId) {
    out.clear();
    out.push(kind);
    out.extend_from_slice(&[0; 7]);
    put_u64(out, cell);
}

fn entry_type_code(entry_type: EntryType) -> u8 {
    match entry_type {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
    }
}

/// The bytes an entry takes in a record.
pub fn entry_size_bytes(entry: &Entry) -> usize {
    ENTRY_HEADER_SIZE + entry.data.len() + entry.context.len()
}

/// Encodes entries of one cell, all of which must fit in one record (see
/// [`entries_fitting`]).
pub fn encode_entries(out: &mut Vec<u8>, cell: CellId, entries: &[Entry]) {
    header(out, KIND_ENTRIES, cell);
    put_u32(out, u32::try_from(entries.len()).expect("entries count fits u32"));
    put_u32(out, 0);
    for entry in entries {
        assert!(entry.data.len() + entry.context.len() <= ENTRY_BYTES_MAX, "entry over the size limit");
        put_u64(out, entry.index);
        put_u64(out, entry.term);
        out.push(entry_type_code(entry.get_entry_type()));
        out.extend_from_slice(&[0; 3]);
        put_u32(out, entry.data.len() as u32);
        put_u32(out, entry.context.len() as u32);
        out.extend_from_slice(&entry.data);
        out.extend_from_slice(&entry.context);
    }
    assert!(out.len() <= RECORD_PAYLOAD_MAX);
}

/// How many of `entries`, from the first, fit in one record (at least one).
pub fn entries_fitting(entries: &[Entry]) -> usize {
    let mut size = RECORD_HEADER_SIZE + ENTRIES_HEADER_SIZE;
    let mut count = 0;
    for entry in entries {
        size += entry_size_bytes(entry);
        if size > RECORD_PAYLOAD_MAX && count > 0 {
            break;
        }
        count += 1;
    }
    count
}

pub fn encode_hard_state(out: &mut Vec<u8>, cell: CellId, hard_state: &HardState) {
    header(out, KIND_HARD_STATE, cell);
    put_u64(out, hard_state.term);
    put_u64(out, hard_state.vote);
    put_u64(out, hard_state.commit);
}

pub fn encode_base(out: &mut Vec<u8>, cell: CellId, base: &LogBase) {
    header(out, KIND_BASE, cell);
    put_u64(out, base.index);
    put_u64(out, base.term);
    let conf = &base.conf_state;
    out.push(u8::from(conf.auto_leave));
    out.extend_from_slice(&[0; 3]);
    let lists = [&conf.voters, &conf.learners, &conf.voters_outgoing, &conf.learners_next];
    for list in lists {
        assert!(list.len() <= CONF_MEMBERS_MAX);
        put_u32(out, list.len() as u32);
    }
    for list in lists {
        for id in list.iter() {
            put_u64(out, *id);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    size: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], LogRecordError> {
        if self.bytes.len() < count {
            return Err(LogRecordError::Short { size: self.size });
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    fn u64(&mut self) -> Result<u64, LogRecordError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn u32(&mut self) -> Result<u32, LogRecordError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u8(&mut self) -> Result<u8, LogRecordError> {
        Ok(self.take(1)?[0])
    }
}

pub fn decode(payload: &[u8]) -> Result<LogRecord, LogRecordError> {
    let mut reader = Reader { bytes: payload, size: payload.len() };
    let kind = reader.u8()?;
    reader.take(7)?;
    let cell = reader.u64()?;
    let record = match kind {
        KIND_ENTRIES => {
            let count = reader.u32()? as usize;
            reader.take(4)?;
            // Every entry takes at least its header: a bad count cannot make us allocate much.
            if count > reader.bytes.len() / ENTRY_HEADER_SIZE {
                return Err(LogRecordError::Short { size: payload.len() });
            }
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let mut entry = Entry { index: reader.u64()?, term: reader.u64()?, ..Entry::default() };
                let entry_type = reader.u8()?;
                entry.set_entry_type(match entry_type {
                    0 => EntryType::EntryNormal,
                    1 => EntryType::EntryConfChange,
                    2 => EntryType::EntryConfChangeV2,
                    _ => return Err(LogRecordError::UnknownEntryType { entry_type }),
                });
                reader.take(3)?;
                let data_size = reader.u32()? as usize;
                let context_size = reader.u32()? as usize;
                entry.data = reader.take(data_size)?.to_vec().into();
                entry.context = reader.take(context_size)?.to_vec().into();
                entries.push(entry);
            }
            LogRecord::Entries { cell, entries }
        }
        KIND_HARD_STATE => {
            let hard_state =
                HardState { term: reader.u64()?, vote: reader.u64()?, commit: reader.u64()?, ..Default::default() };
            LogRecord::HardState { cell, hard_state }
        }
        KIND_BASE => {
            let index = reader.u64()?;
            let term = reader.u64()?;
            let auto_leave = reader.u8()? != 0;
            reader.take(3)?;
            let mut counts = [0u32; 4];
            for count in counts.iter_mut() {
                *count = reader.u32()?;
                if *count as usize > CONF_MEMBERS_MAX {
                    return Err(LogRecordError::ConfTooLarge { count: *count });
                }
            }
            let mut lists: [Vec<u64>; 4] = Default::default();
            for (list, count) in lists.iter_mut().zip(counts) {
                for _ in 0..count {
                    list.push(reader.u64()?);
                }
            }
            let [voters, learners, voters_outgoing, learners_next] = lists;
            let conf_state =
                ConfState { voters, learners, voters_outgoing, learners_next, auto_leave, ..Default::default() };
            LogRecord::Base { cell, base: LogBase { index, term, conf_state } }
        }
        kind => return Err(LogRecordError::UnknownKind { kind }),
    };
    if !reader.bytes.is_empty() {
        return Err(LogRecordError::Trailing { extra: reader.bytes.len() });
    }
    Ok(record)
}

/// Why a cell's log refused entries: they do not continue it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CellLogError {
    #[error("entries start at index {first} but the log ends at {last}: a gap")]
    Gap { first: u64, last: u64 },
    #[error("entries start at index {first}, inside the compacted part of the log (base {base})")]
    Compacted { first: u64, base: u64 },
    #[error("entries are not consecutive at index {index}")]
    NotConsecutive { index: u64 },
}

/// One replica's log in memory: the entries after its base, its hard state
/// and membership. The Raft library reads it through [`Storage`]; the engine
/// changes it only after (or together with) logging the change durably.
#[derive(Clone, Debug, Default)]
pub struct CellLog {
    hard_state: HardState,
    base: LogBase,
    /// Entries `base.index + 1 ..= last_index`.
    entries: VecDeque<Entry>,
    entries_bytes: u64,
    /// The state a snapshot can be sent of: the last checkpoint's index,
    /// term and membership (the store holds its data).
    snapshot_point: Option<LogBase>,
}

impl CellLog {
    /// Records that the store now holds the state at `base` (a checkpoint or
    /// an installed snapshot): followers that lag past the log get that.
    pub fn set_snapshot_point(&mut self, base: LogBase) {
        self.snapshot_point = Some(base);
    }

    /// Where recovery needs the log from: the store's state (the last
    /// checkpoint or snapshot), else the log's base. Entries at or before it
    /// are kept in memory only for followers that lag.
    pub fn durable_point(&self) -> &LogBase {
        match &self.snapshot_point {
            Some(point) if point.index >= self.base.index => point,
            _ => &self.base,
        }
    }

    /// A new replica's log: empty, with the cluster's initial membership.
    pub fn new(conf_state: ConfState) -> CellLog {
        CellLog { base: LogBase { conf_state, ..LogBase::default() }, ..CellLog::default() }
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    pub fn base(&self) -> &LogBase {
        &self.base
    }

    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.base.conf_state = conf_state;
    }

    pub fn first_index(&self) -> u64 {
        self.base.index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.base.index + self.entries.len() as u64
    }

    pub fn entries_count(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of the entries held (data, context and a fixed overhead each).
    pub fn entries_bytes(&self) -> u64 {
        self.entries_bytes
    }

    fn entry(&self, index: u64) -> Option<&Entry> {
        let offset = index.checked_sub(self.first_index())?;
        self.entries.get(usize::try_from(offset).ok()?)
    }

    /// The term of the entry at `index`, if the log knows it (its base or an entry).
    pub fn term_of(&self, index: u64) -> Option<u64> {
        if index == self.base.index {
            Some(self.base.term)
        } else {
            self.entry(index).map(|entry| entry.term)
        }
    }

    /// Appends entries, first truncating any held entry at or after the
    /// first new index (a new leader overwrote them).
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), CellLogError> {
        let Some(first) = entries.first() else { return Ok(()) };
        if first.index <= self.base.index {
            return Err(CellLogError::Compacted { first: first.index, base: self.base.index });
        }
        if first.index > self.last_index() + 1 {
            return Err(CellLogError::Gap { first: first.index, last: self.last_index() });
        }
        for (offset, entry) in entries.iter().enumerate() {
            if entry.index != first.index + offset as u64 {
                return Err(CellLogError::NotConsecutive { index: entry.index });
            }
        }
        while self.last_index() >= first.index {
            let removed = self.entries.pop_back().expect("an entry at or after the first new one");
            self.entries_bytes -= entry_size_bytes(&removed) as u64;
        }
        for entry in entries {
            self.entries_bytes += entry_size_bytes(entry) as u64;
            self.entries.push_back(entry.clone());
        }
        Ok(())
    }

    /// The highest index `<= index` such that compacting to it keeps at least
    /// `retained_bytes` of entries at or before `index` (or all of them),
    /// for followers that lag.
    pub fn compaction_index(&self, index: u64, retained_bytes: u64) -> u64 {
        let mut target = index.min(self.last_index());
        let mut bytes = 0u64;
        while target > self.base.index {
            let Some(entry) = self.entry(target) else { break };
            bytes += entry_size_bytes(entry) as u64;
            if bytes > retained_bytes {
                break;
            }
            target -= 1;
        }
        target
    }

    /// Drops the entries up to and including `index`, which becomes the base.
    /// Does nothing unless the log holds the entry at `index`.
    pub fn compact_to(&mut self, index: u64) {
        let Some(term) = self.entry(index).map(|entry| entry.term) else { return };
        while self.base.index < index {
            let removed = self.entries.pop_front().expect("entries up to the new base");
            self.entries_bytes -= entry_size_bytes(&removed) as u64;
            self.base.index += 1;
        }
        self.base.term = term;
    }

    /// Sets the base as a base record says: keeps the entries after it if the
    /// log holds the entry at `base.index` with `base.term`, else drops every
    /// entry (a snapshot replaced the log).
    pub fn set_base(&mut self, base: LogBase) {
        if base.index < self.base.index {
            // An older base (replay meets it after starting from a newer one).
            return;
        }
        if self.term_of(base.index) == Some(base.term) {
            self.compact_to(base.index);
            self.base.conf_state = base.conf_state;
        } else {
            self.entries.clear();
            self.entries_bytes = 0;
            self.base = base;
        }
        if self.hard_state.commit < self.base.index {
            self.hard_state.commit = self.base.index;
        }
    }
}

fn entries_limited(entries: impl Iterator<Item = Entry>, bytes_max: Option<u64>) -> Vec<Entry> {
    let mut taken = Vec::new();
    let mut bytes = 0u64;
    for entry in entries {
        bytes += entry_size_bytes(&entry) as u64;
        if !taken.is_empty() && bytes_max.is_some_and(|max| bytes > max) {
            break;
        }
        taken.push(entry);
    }
    taken
}

impl Storage for CellLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.base.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let skip = (low - self.first_index()) as usize;
        let take = (high - low) as usize;
        Ok(entries_limited(self.entries.iter().skip(skip).take(take).cloned(), max_size.into()))
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index < self.base.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_of(index).ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(CellLog::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(CellLog::last_index(self))
    }

    /// The metadata of the last checkpoint; the engine ships the store's
    /// image with it (see `snapshot.rs`), so the snapshot carries no data here.
    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let Some(point) = &self.snapshot_point else {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        };
        let mut snapshot = Snapshot::default();
        let metadata = snapshot.mut_metadata();
        metadata.index = point.index;
        metadata.term = point.term;
        metadata.set_conf_state(point.conf_state.clone());
        Ok(snapshot)
    }
}

/// What the log holds of one cell, for truncation.
#[derive(Debug, Default)]
struct CellRecords {
    /// `(op, last index)` of each entries record still in the WAL, oldest first.
    entries: VecDeque<(u64, u64)>,
}

/// Why the node's log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NodeLogError {
    #[error("write-ahead log: {0}")]
    Wal(#[from] WalError),
    #[error("write-ahead log record at op {op}: {source}")]
    Record { op: u64, source: LogRecordError },
    #[error("write-ahead log record at op {op}, cell {cell}: {source}")]
    Entries { op: u64, cell: CellId, source: CellLogError },
}

/// The node's write-ahead log of every cell's consensus records.
pub struct NodeLog {
    wal: Wal,
    payload: Vec<u8>,
    cells: BTreeMap<CellId, CellRecords>,
}

/// What opening the node's log found.
#[derive(Debug)]
pub struct NodeLogRecovery {
    pub wal: Recovery,
    pub records: u64,
    /// Each cell's log as the records left it (cells with no record are absent).
    pub cells: BTreeMap<CellId, CellLog>,
}

impl NodeLog {
    /// Opens the log in `directory` and replays it into each cell's log.
    pub fn open(directory: &std::path::Path) -> Result<(NodeLog, NodeLogRecovery), NodeLogError> {
        let (wal, wal_recovery) = Wal::open(directory)?;
        let mut log = NodeLog { wal, payload: Vec::with_capacity(RECORD_PAYLOAD_MAX), cells: BTreeMap::new() };
        // First pass: each cell's newest base. Truncation keeps only the
        // records a cell needs after its base and logs the base again at the
        // end, so the replay of each cell starts from it.
        let first_op = log.wal.first_op();
        let mut bases: BTreeMap<CellId, LogBase> = BTreeMap::new();
        let result = log.wal.replay(first_op, |op, payload| {
            if payload.first() == Some(&KIND_BASE) {
                if let LogRecord::Base { cell, base } =
                    decode(payload).map_err(|source| NodeLogError::Record { op, source })?
                {
                    bases.insert(cell, base);
                }
            }
            Ok::<(), NodeLogError>(())
        });
        match result {
            Ok(()) => {}
            Err(ReplayError::Wal(error)) => return Err(error.into()),
            Err(ReplayError::Callback { error, .. }) => return Err(error),
        }
        let mut cells: BTreeMap<CellId, CellLog> = bases
            .into_iter()
            .map(|(cell, base)| {
                let mut cell_log = CellLog::default();
                cell_log.set_base(base);
                (cell, cell_log)
            })
            .collect();
        let mut records = 0u64;
        let records_by_cell = &mut log.cells;
        let result = log.wal.replay(first_op, |op, payload| {
            records += 1;
            match decode(payload).map_err(|source| NodeLogError::Record { op, source })? {
                LogRecord::Entries { cell, entries } => {
                    let cell_log = cells.entry(cell).or_default();
                    // Entries the base already covers were compacted after they were logged.
                    let fresh: Vec<Entry> = entries.into_iter().filter(|e| e.index > cell_log.base.index).collect();
                    if let Some(last) = fresh.last() {
                        let last_index = last.index;
                        cell_log.append(&fresh).map_err(|source| NodeLogError::Entries { op, cell, source })?;
                        records_by_cell.entry(cell).or_default().entries.push_back((op, last_index));
                    }
                }
                LogRecord::HardState { cell, hard_state } => cells.entry(cell).or_default().set_hard_state(hard_state),
                LogRecord::Base { cell, base } => cells.entry(cell).or_default().set_base(base),
            }
            Ok::<(), NodeLogError>(())
        });
        match result {
            Ok(()) => {}
            Err(ReplayError::Wal(error)) => return Err(error.into()),
            Err(ReplayError::Callback { error, .. }) => return Err(error),
        }
        // A hard state replayed before the base may name a commit below it.
        for cell_log in cells.values_mut() {
            if cell_log.hard_state.commit < cell_log.base.index {
                cell_log.hard_state.commit = cell_log.base.index;
            }
        }
        Ok((log, NodeLogRecovery { wal: wal_recovery, records, cells }))
    }

    fn append(&mut self) {
        if let Err(error) = self.wal.append(&self.payload) {
            panic!("write-ahead log append failed, stopping to recover on restart: {error}");
        }
    }

    /// Logs a cell's new entries (not yet durable: see [`NodeLog::sync`]).
    pub fn append_entries(&mut self, cell: CellId, entries: &[Entry]) {
        let mut rest = entries;
        while !rest.is_empty() {
            let count = entries_fitting(rest);
            let (chunk, tail) = rest.split_at(count);
            encode_entries(&mut self.payload, cell, chunk);
            self.append();
            let last_index = chunk.last().expect("a chunk holds an entry").index;
            let records = self.cells.entry(cell).or_default();
            // Entries that overwrite newer ones make the older records of those indexes dead;
            // keeping them listed only delays truncation.
            records.entries.push_back((self.wal.last_op(), last_index));
            rest = tail;
        }
    }

    pub fn append_hard_state(&mut self, cell: CellId, hard_state: &HardState) {
        encode_hard_state(&mut self.payload, cell, hard_state);
        self.append();
    }

    pub fn append_base(&mut self, cell: CellId, base: &LogBase) {
        encode_base(&mut self.payload, cell, base);
        self.append();
    }

    /// Makes everything appended durable: one fsync. Fatal on failure.
    pub fn sync(&mut self) -> bool {
        if self.wal.last_op() == self.wal.durable_op() {
            return false;
        }
        if let Err(error) = self.wal.sync() {
            panic!("write-ahead log sync failed, stopping to recover on restart: {error}");
        }
        true
    }

    pub fn last_op(&self) -> u64 {
        self.wal.last_op()
    }

    /// The last op a crash now would keep.
    pub fn durable_op(&self) -> u64 {
        self.wal.durable_op()
    }

    pub fn segment_count(&self) -> usize {
        self.wal.segment_count()
    }

    /// Deletes the segments no cell needs. `cells` gives, for every cell the
    /// node hosts, its log as it is now: records of entries at or before its
    /// base are no longer needed. Logs every cell's hard state and base again
    /// first (and syncs), so that the deleted segments held nothing else any
    /// cell needs.
    pub fn truncate<'a>(&mut self, cells: impl Iterator<Item = (CellId, &'a CellLog)> + Clone) {
        // Recovery needs each cell's log only after its durable point (its
        // store's state); entries kept in memory before it for followers
        // that lag are not needed after a restart.
        for (cell, log) in cells.clone() {
            let point = LogBase { conf_state: log.base().conf_state.clone(), ..log.durable_point().clone() };
            self.append_base(cell, &point);
            self.append_hard_state(cell, log.hard_state());
        }
        self.sync();
        let mut needed_op = self.wal.last_op();
        for (cell, log) in cells {
            let records = self.cells.entry(cell).or_default();
            let point = log.durable_point().index;
            while records.entries.front().is_some_and(|&(_, last_index)| last_index <= point) {
                records.entries.pop_front();
            }
            if let Some(&(op, _)) = records.entries.front() {
                needed_op = needed_op.min(op);
            }
        }
        if let Err(error) = self.wal.truncate_before(needed_op - 1) {
            tracing::warn!(%error, "could not truncate the write-ahead log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry { index, term, data: data.to_vec().into(), ..Entry::default() }
    }

    #[test]
    fn records_round_trip() {
        let mut out = Vec::new();
        let mut conf_entry = entry(9, 3, b"cc");
        conf_entry.set_entry_type(EntryType::EntryConfChangeV2);
        conf_entry.context = b"ctx".to_vec().into();
        let entries = vec![entry(7, 2, b"abc"), entry(8, 3, b""), conf_entry];
        encode_entries(&mut out, 5, &entries);
        assert_eq!(decode(&out), Ok(LogRecord::Entries { cell: 5, entries }));

        let hard_state = HardState { term: 4, vote: 2, commit: 99, ..Default::default() };
        encode_hard_state(&mut out, 6, &hard_state);
        assert_eq!(decode(&out), Ok(LogRecord::HardState { cell: 6, hard_state }));

        let conf_state = ConfState { voters: vec![1, 2, 3], learners: vec![4], ..Default::default() };
        let base = LogBase { index: 77, term: 5, conf_state };
        encode_base(&mut out, 7, &base);
        assert_eq!(decode(&out), Ok(LogRecord::Base { cell: 7, base }));
    }

    #[test]
    fn truncated_and_garbage_records_are_errors_not_panics() {
        let mut out = Vec::new();
        encode_entries(&mut out, 1, &[entry(1, 1, b"hello")]);
        for size in 0..out.len() {
            assert!(decode(&out[..size]).is_err(), "prefix of {size} bytes");
        }
        let mut longer = out.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(LogRecordError::Trailing { extra: 1 }));
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let size = (state % 200) as usize;
            let bytes: Vec<u8> = (0..size)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn entries_split_across_records_by_size() {
        let big = vec![0u8; RECORD_PAYLOAD_MAX / 3];
        let entries: Vec<Entry> = (1..=5).map(|index| entry(index, 1, &big)).collect();
        assert_eq!(entries_fitting(&entries), 2);
        assert_eq!(entries_fitting(&entries[4..]), 1);
    }

    #[test]
    fn cell_log_appends_truncates_compacts() {
        let mut log = CellLog::new(ConfState { voters: vec![1], ..Default::default() });
        log.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")]).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (1, 3));
        // A new leader overwrites index 3 onwards.
        log.append(&[entry(3, 2, b"x"), entry(4, 2, b"y")]).unwrap();
        assert_eq!(log.term_of(3), Some(2));
        assert_eq!(log.last_index(), 4);
        assert_eq!(log.append(&[entry(6, 2, b"")]), Err(CellLogError::Gap { first: 6, last: 4 }));
        let entry_bytes = (ENTRY_HEADER_SIZE + 1) as u64;
        assert_eq!(log.compaction_index(3, 0), 3);
        assert_eq!(log.compaction_index(3, entry_bytes), 2, "keeps entry 3");
        assert_eq!(log.compaction_index(3, 10 * entry_bytes), 0, "keeps everything");
        assert_eq!(log.compaction_index(9, 0), 4, "never past the last entry");
        log.compact_to(2);
        assert_eq!((log.first_index(), log.last_index(), log.base().term), (3, 4, 1));
        assert_eq!(log.term(2), Ok(1));
        assert!(log.term(1).is_err());
        assert!(log.entries(2, 4, None, GetEntriesContext::empty(false)).is_err());
        let got = log.entries(3, 5, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(log.append(&[entry(2, 9, b"")]), Err(CellLogError::Compacted { first: 2, base: 2 }));
        let bytes = log.entries_bytes();
        assert_eq!(bytes, (2 * ENTRY_HEADER_SIZE + 2) as u64);
        // A base that the log does not hold (a snapshot) empties it.
        log.set_base(LogBase { index: 10, term: 3, conf_state: ConfState::default() });
        assert_eq!((log.first_index(), log.last_index(), log.entries_bytes()), (11, 10, 0));
        assert_eq!(log.hard_state().commit, 10);
    }

    #[test]
    fn node_log_replays_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let conf = ConfState { voters: vec![1, 2, 3], ..Default::default() };
        {
            let (mut log, recovery) = NodeLog::open(dir.path()).unwrap();
            assert!(recovery.cells.is_empty());
            log.append_base(1, &LogBase { conf_state: conf.clone(), ..LogBase::default() });
            log.append_entries(1, &[entry(1, 1, b"one"), entry(2, 1, b"two")]);
            log.append_entries(2, &[entry(1, 1, b"other cell")]);
            log.append_entries(1, &[entry(2, 2, b"two again"), entry(3, 2, b"three")]);
            log.append_hard_state(1, &HardState { term: 2, vote: 1, commit: 3, ..Default::default() });
            log.sync();
        }
        let (mut log, recovery) = NodeLog::open(dir.path()).unwrap();
        let cells = recovery.cells;
        let cell1 = &cells[&1];
        assert_eq!(cell1.base().conf_state, conf);
        assert_eq!((cell1.first_index(), cell1.last_index()), (1, 3));
        assert_eq!(cell1.term_of(2), Some(2));
        assert_eq!(cell1.hard_state().commit, 3);
        assert_eq!(cells[&2].last_index(), 1);
        let mut cell1 = cell1.clone();
        cell1.compact_to(2);
        let cell2 = cells[&2].clone();
        log.truncate([(1, &cell1), (2, &cell2)].into_iter());
        drop(log);
        let (_, recovery) = NodeLog::open(dir.path()).unwrap();
        let again = &recovery.cells[&1];
        assert_eq!((again.first_index(), again.last_index(), again.base().term), (3, 3, 2));
        assert_eq!(again.hard_state().commit, 3);
    }

    /// Found in review: a log whose first segments were deleted must reopen
    /// (its first kept record holds entries far after index 1).
    #[test]
    fn reopen_after_a_segment_was_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let conf = ConfState { voters: vec![1], ..Default::default() };
        let mut cell = CellLog::new(conf);
        let megabyte = vec![7u8; 1 << 20];
        {
            let (mut log, _) = NodeLog::open(dir.path()).unwrap();
            log.append_base(1, cell.base());
            // 100 entries of 1 MiB: two 64 MiB segments at least.
            for index in 1..=100u64 {
                let entries = [entry(index, 1, &megabyte)];
                log.append_entries(1, &entries);
                cell.append(&entries).unwrap();
                log.sync();
            }
            cell.set_hard_state(HardState { term: 1, vote: 1, commit: 100, ..Default::default() });
            log.append_hard_state(1, cell.hard_state());
            log.sync();
            assert!(log.segment_count() >= 2, "{} segments", log.segment_count());
            // A checkpoint at 100 keeping 20 MiB of entries: compacts to 80.
            let to = cell.compaction_index(100, 20 << 20);
            cell.compact_to(to);
            cell.set_snapshot_point(LogBase { index: 100, term: 1, conf_state: cell.base().conf_state.clone() });
            let before = log.segment_count();
            log.truncate([(1, &cell)].into_iter());
            assert!(log.segment_count() < before, "truncation deleted no segment");
        }
        let (_, recovery) = NodeLog::open(dir.path()).expect("the truncated log reopens");
        let again = &recovery.cells[&1];
        // The entries kept for followers that lag are not needed after a restart.
        assert_eq!((again.first_index(), again.last_index(), again.hard_state().commit), (101, 100, 100));
        assert_eq!(again.base().term, 1);
    }
}
