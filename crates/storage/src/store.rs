//! The checkpointed history store, on the fjall LSM engine.
//!
//! The ledger keeps its hot state in memory and hands over a [`CheckpointDelta`]
//! at every checkpoint. [`Store::apply_checkpoint`] writes the delta, together
//! with the WAL op it covers (and, with [`Store::apply_checkpoint_with`], the
//! consensus metadata of that op), in one atomic and durable write; the store
//! then answers the ledger's [`History`] reads and gives back what a restart
//! needs to rebuild the ledger ([`Store::accounts`], [`Store::open_pending`],
//! [`Store::checkpoint`]). It must answer exactly like the model,
//! [`cellpay_ledger::MemoryHistory`]; `tests/store_conformance.rs` checks that.
//!
//! # Layout
//!
//! One fjall `Database` in the store's directory, one keyspace per kind of
//! record. Integers in keys are big-endian so that byte order is numeric order
//! and range scans come out sorted; integers in values are little-endian.
//! Every value ends with a CRC32C of `key ++ payload` (4 bytes, LE), so a value
//! that is damaged, or that turns up under another key, is caught right after
//! it is read back.
//!
//! | keyspace            | key                                   | payload (before the CRC)                           |
//! |---------------------|---------------------------------------|----------------------------------------------------|
//! | `accounts`          | account id (16, BE)                   | `Account::encode` (128)                            |
//! | `transfers`         | transfer id (16, BE)                  | `Transfer::encode` (128)                           |
//! | `pending_status`    | transfer id (16, BE)                  | `PendingStatus` as u8 (1)                          |
//! | `open_pending`      | transfer id (16, BE)                  | empty: present iff the status is `Pending`         |
//! | `account_transfers` | account id (16, BE) ++ timestamp (8, BE) | transfer id (16) ++ side (1: bit 0 debit, bit 1 credit) |
//! | `balances`          | account id (16, BE) ++ timestamp (8, BE) | `AccountBalance` (88: five u128 then the timestamp) |
//! | `meta`              | `b"checkpoint"`                       | format version (u32) ++ op (u64) ++ timestamp_last (u64) |
//! | `meta`              | `b"consensus"`                        | opaque consensus metadata of the checkpoint (1 B to 896 KiB; none if empty) |
//!
//! Besides the stores' keyspaces, the database holds `registry` (key: a name
//! in UTF-8; payload: a u64, sealed the same way) and empty `~drop-guard.N`
//! keyspaces (see "Registry and dropping a store" below). Store names may
//! not begin with `~drop-guard.`.
//!
//! A transfer is indexed in `account_transfers` under both its debit and its
//! credit account (once if they are the same). `open_pending` lets a restart
//! find the open pending transfers without scanning every status ever.
//!
//! Bloom filters: `transfers` and `pending_status` are read by point lookups,
//! and most lookups miss (the idempotency check of every new transfer id), so
//! they keep bloom filters on every level, the last included
//! (`expect_point_read_hits(false)`). The other keyspaces are only scanned, so
//! they build no filters.
//!
//! # Atomicity and durability
//!
//! [`Store::apply_checkpoint`] writes a delta of at least
//! [`CHECKPOINT_INGEST_TRANSFERS_MIN`] transfers in two steps (a smaller one
//! goes whole into the batch of step 2, which is then all or nothing by
//! itself):
//!
//! 1. **Ingestion** of the immutable records: `transfers`, `account_transfers`
//!    and `balances`, each keyspace with fjall's bulk ingestion
//!    (`Keyspace::start_ingestion`): sorted records go straight into new
//!    table files, bypassing fjall's journal and memtable. Finishing an
//!    ingestion fsyncs its table files and directory and registers them in
//!    the keyspace's version, which is written atomically and fsynced.
//! 2. **The commit**: the mutable records (`accounts`, `pending_status`,
//!    `open_pending`) and the new `meta` records (checkpoint and consensus)
//!    in one `fjall::OwnedWriteBatch`, committed with durability
//!    `PersistMode::SyncAll`. fjall writes a batch to its journal as a
//!    `Start { item_count, seqno }` entry, the items, and an `End(checksum)`
//!    entry; recovery replays only complete batches whose checksum holds and
//!    truncates a torn last batch. All items of a batch get one sequence
//!    number and become visible to readers together. The commit fsyncs the
//!    journal (`File::sync_all`) before it returns, so a checkpoint is durable
//!    when `apply_checkpoint` returns `Ok`.
//!
//! The checkpoint record is the commit point. A crash after step 1 leaves
//! **leftovers**: records of the ingested keyspaces newer than the committed
//! checkpoint (`timestamp_last`). Every reader skips them: a transfer read by
//! id, the history scans (clamped to the committed timestamp), and
//! [`Store::export`]. So after a crash the store answers exactly as at its
//! last committed checkpoint. The log's replay then makes the same delta
//! again (the ledger is deterministic), and its ingestion rewrites the same
//! keys with the same values; `apply_checkpoint` checks that a leftover
//! transfer it meets is identical to the one written now, and panics
//! otherwise.
//!
//! Why two steps: the journal and the skip list cost two thirds of a
//! checkpoint written as one batch (a quarter of the whole machine in the
//! five-node benchmark, see BENCHMARKS.md), and both are redundant for the
//! immutable records, which the node's own write-ahead log keeps until the
//! checkpoint commits.
//!
//! If the commit fails, fjall poisons the database: every later write fails,
//! and the caller must reopen the store (which recovers the last complete
//! checkpoint) before going on. A complete batch whose checksum fails
//! (damage, not a torn tail) makes fjall refuse to open: `Store::open`
//! returns [`StoreError::Engine`], never a partial state.
//! `tests/store_crash.rs` checks all this on torn journal images, on a
//! checkpoint stopped between its two steps, and by killing a process that
//! is writing checkpoints.
//!
//! # Snapshots
//!
//! A lagging replica is sent the image of the leader's whole store:
//! [`Store::export`] streams it as chunks, [`Store::import`] loads them into
//! an empty store on the other side.
//!
//! **Consistency.** Export reads everything (records and `meta`) from one
//! fjall snapshot. A write batch gets one sequence number and is published to
//! readers after all its items are in, so a checkpoint committed during an
//! export is entirely in the image or not at all: the image is exactly the
//! checkpoint it names. Records of the ingested keyspaces newer than that
//! checkpoint (leftovers, or a checkpoint ingested but not yet committed when
//! the snapshot was taken) are left out. The snapshot keeps old versions
//! alive while an export runs (a slow sink delays their garbage collection,
//! nothing else).
//!
//! **Chunk format** (integers little-endian). Each chunk is at most
//! [`SNAPSHOT_CHUNK_BYTES_MAX`] bytes:
//!
//! | field     | size | meaning |
//! |-----------|------|---------|
//! | magic     | 4    | `b"CPSC"` |
//! | flags     | 4    | bit 0 first chunk, bit 1 last chunk, others zero |
//! | sequence  | 8    | 0, 1, 2, ... |
//! | body size | 4    | bytes after this 28-byte frame |
//! | chain     | 4    | checksum of the previous chunk (0 for the first) |
//! | checksum  | 4    | CRC32C of the 24 frame bytes before it ++ the body |
//! | body      | ...  | [header, first chunk only] records [trailer, last chunk only] |
//!
//! - header: snapshot format [`SNAPSHOT_FORMAT_VERSION`] (u32), store format
//!   [`FORMAT_VERSION`] (u32), checkpoint op (u64), timestamp_last (u64),
//!   consensus size (u32), consensus bytes (at most [`CONSENSUS_BYTES_MAX`]);
//! - record: keyspace tag (u8: 0 `accounts`, 1 `transfers`, 2 `pending_status`,
//!   3 `open_pending`, 4 `account_transfers`, 5 `balances`), key size (u16),
//!   value size (u32), key, value exactly as stored (payload ++ its CRC32C);
//!   keyspaces in tag order, keys in increasing order within each;
//! - trailer (64 bytes): records per keyspace (6 × u64), chunks in the image
//!   (u64), bytes in the image (u64, frames included).
//!
//! The `meta` records do not travel as records: the header carries them.
//! Every chunk but the last leaves room for the trailer, since the exporter
//! learns which chunk is the last only at the end.
//!
//! **Checks on import.** [`Importer::chunk`] checks the frame (size, magic,
//! flags, body size, checksum), the sequence (the next number, the chain to
//! the previous chunk's checksum, the first flag on chunk 0 only, nothing
//! after the last), the header (formats, limits), each record (tag, sizes,
//! the value's own CRC and the key it names, as every read does; timestamps
//! not after the checkpoint), keys strictly increasing within a keyspace and
//! keyspaces in order, and at the last chunk the trailer's totals against
//! what arrived. A cut, reordered, duplicated, missing or damaged chunk, or a
//! chunk of another image, is an error ([`StoreError::Snapshot`] or
//! [`StoreError::Corrupt`]), never a panic, and the importer refuses
//! everything after it. Export checks every record it reads in the same way.
//!
//! **Loading.** Each keyspace is loaded with fjall's bulk ingestion
//! (`Keyspace::start_ingestion`): sorted records go straight into new table
//! files, which fjall fsyncs (files, directory, version) when the keyspace's
//! ingestion finishes. Measured on 1M transfers (3.3M records, 278 MB of
//! chunks), ingestion loads about three times faster than write batches
//! without sync (about 1.0 s against 2.8 s), and it does not pass the image
//! through the journal, which the other stores of the database share. Two
//! costs: fjall's ingestion type is not `Send` (so an [`Importer`] stays on
//! the thread that made it), and finishing a keyspace holds fjall's journal
//! lock, pausing the database's other writers, while it writes and fsyncs
//! the keyspace's last table file (at most 64 MiB).
//!
//! **Completion and crashes.** [`Importer::finish`] checks the last chunk
//! came, finishes the last keyspace, and only then writes the `meta`
//! records (checkpoint and consensus) in one fsynced batch. Until then
//! [`Store::checkpoint`] reports op 0: a crash (or an importer dropped)
//! mid-import leaves a store at checkpoint 0 that may hold some records.
//! [`Store::import`] refuses a store that is not empty, so such a store must
//! be discarded with [`StoreDatabase::drop_store`]. The caller keeps track of
//! which store generation is live, for example in the registry.
//!
//! Memory: export holds one chunk (and fjall's iterators); import holds the
//! chunk it is given and the table writer of one keyspace.
//!
//! # Registry and dropping a store
//!
//! [`StoreDatabase::registry_set`] writes a named u64 durably (one fsynced
//! batch); [`StoreDatabase::registry_get`] reads it back, checking its CRC.
//!
//! [`StoreDatabase::drop_store`] deletes a store's keyspaces. fjall 3.1.13
//! hands out a keyspace id again after a restart if it was the highest one
//! and its folder is gone, and a keyspace created with a reused id can vanish
//! at the next restart, data and all: the deletion's tombstone in fjall's own
//! metadata tree carries a higher sequence number than the new name mapping
//! (the sequence counter is recovered from the data keyspaces only).
//! `drop_store` therefore first creates a new, empty `~drop-guard.N`
//! keyspace, whose id is above every id it then deletes, and deletes the
//! older guards last: at every moment a live keyspace has a higher id than
//! any deleted one, so no id is reused. `tests/store_snapshot.rs` checks that
//! stores recreated after drops (also in a killed process) survive restarts.
//!
//! # Write path
//!
//! Before writing, `apply_checkpoint` checks the delta against its contract
//! (order, timestamps newer than the last checkpoint, no transfer twice) and
//! looks every new transfer id up (a bloom-filtered miss) to assert it was
//! never checkpointed (or, if found, that it is an identical leftover: see
//! "Atomicity and durability"). It then ingests each immutable keyspace's
//! records in key order (ingestion requires it), and adds the mutable records
//! to the batch in key order too: fjall's memtable is a skip list, and
//! in-order inserts run about five times faster than random ones.
//!
//! # Errors
//!
//! Operating errors of the engine (I/O, a poisoned database) are
//! [`StoreError::Engine`]; data that fails its check is [`StoreError::Corrupt`].
//! The [`History`] methods cannot return errors: they read our own durable
//! data, without which the ledger cannot answer correctly, so they **panic**
//! on an engine error or on corrupt data. A wrong delta (out of order, going
//! back in time, a transfer checkpointed twice) is a bug in the caller and
//! panics too, before anything is written.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cellpay_ledger::{
    Account, AccountBalance, AccountFilter, CheckpointDelta, History, PendingStatus, Transfer, RECORD_SIZE,
};
use fjall::config::{BloomConstructionPolicy, FilterPolicy, FilterPolicyEntry};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode, Readable};

/// The on-disk format this build reads and writes (stored in the checkpoint record).
pub const FORMAT_VERSION: u32 = 1;

/// The most records (batch items) one checkpoint may write: a transfer is
/// three, an account, a pending status or a balance one (plus one for the
/// checkpoint record and one for the consensus metadata). Bounds the memory of one write batch
/// (roughly 150 bytes an item) and stays far below fjall's `u32` batch length.
pub const CHECKPOINT_BATCH_ITEMS_MAX: usize = 8 * 1024 * 1024;

/// A checkpoint of at least this many transfers writes its immutable records
/// by ingestion (see "Atomicity and durability"); a smaller one writes
/// everything in its one journaled batch, as ingestion's fixed cost (three
/// new tables, each fsynced with its directory and version) would outweigh
/// what it saves, and would leave many tiny tables to compact.
pub const CHECKPOINT_INGEST_TRANSFERS_MIN: usize = 4096;

/// The capacity of fjall's block cache.
pub const BLOCK_CACHE_SIZE_BYTES: u64 = 256 * 1024 * 1024;

const CHECKSUM_SIZE: usize = 4;
const ID_KEY_SIZE: usize = 16;
const HISTORY_KEY_SIZE: usize = 16 + 8;
const BALANCE_SIZE: usize = 5 * 16 + 8;
const CHECKPOINT_SIZE: usize = 4 + 8 + 8;
const INDEX_SIZE: usize = 16 + 1;

const RECORD_VALUE_SIZE: usize = RECORD_SIZE + CHECKSUM_SIZE;
const STATUS_VALUE_SIZE: usize = 1 + CHECKSUM_SIZE;
const INDEX_VALUE_SIZE: usize = INDEX_SIZE + CHECKSUM_SIZE;
const BALANCE_VALUE_SIZE: usize = BALANCE_SIZE + CHECKSUM_SIZE;
const CHECKPOINT_VALUE_SIZE: usize = CHECKPOINT_SIZE + CHECKSUM_SIZE;
const REGISTRY_VALUE_SIZE: usize = 8 + CHECKSUM_SIZE;

const SIDE_DEBIT: u8 = 1 << 0;
const SIDE_CREDIT: u8 = 1 << 1;

/// Largest chunk [`Store::export`] produces and [`Importer::chunk`] accepts, frame included.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1 << 20;

/// Largest consensus metadata stored with a checkpoint ([`Store::apply_checkpoint_with`]).
pub const CONSENSUS_BYTES_MAX: usize = 896 * 1024;

/// The snapshot (chunk stream) format this build writes and reads (in the image header).
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;

/// Longest store name ([`Store::open_in`]): the name prefixes keyspace names,
/// which fjall limits to 255 bytes, and the longest suffix is `account_transfers`.
pub const STORE_NAME_BYTES_MAX: usize = 255 - KEYSPACE_ACCOUNT_TRANSFERS.len();

/// Longest name of a registry value ([`StoreDatabase::registry_set`]).
pub const REGISTRY_KEY_BYTES_MAX: usize = 255;

const KEY_CHECKPOINT: &[u8] = b"checkpoint";
const KEY_CONSENSUS: &[u8] = b"consensus";

const KEYSPACE_ACCOUNTS: &str = "accounts";
const KEYSPACE_TRANSFERS: &str = "transfers";
const KEYSPACE_PENDING_STATUS: &str = "pending_status";
const KEYSPACE_OPEN_PENDING: &str = "open_pending";
const KEYSPACE_ACCOUNT_TRANSFERS: &str = "account_transfers";
const KEYSPACE_BALANCES: &str = "balances";
const KEYSPACE_META: &str = "meta";
const KEYSPACE_REGISTRY: &str = "registry";
/// Empty keyspaces that keep deleted keyspace ids from being reused (see `StoreDatabase::drop_store`).
const KEYSPACE_DROP_GUARD_PREFIX: &str = "~drop-guard.";

/// Every keyspace suffix of a store, in snapshot order (`meta` last).
const KEYSPACE_SUFFIXES: [&str; 7] = [
    KEYSPACE_ACCOUNTS,
    KEYSPACE_TRANSFERS,
    KEYSPACE_PENDING_STATUS,
    KEYSPACE_OPEN_PENDING,
    KEYSPACE_ACCOUNT_TRANSFERS,
    KEYSPACE_BALANCES,
    KEYSPACE_META,
];

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed (I/O error, poisoned after a failed write, locked by another process).
    #[error("storage engine: {0}")]
    Engine(#[from] fjall::Error),
    /// A record read back failed its check.
    #[error("corrupt record in keyspace {keyspace} at key {key}: {reason}")]
    Corrupt {
        keyspace: &'static str,
        /// The key, in hex.
        key: String,
        reason: String,
    },
    /// The store was written by a build with another on-disk format.
    #[error("store format version {found} is not supported (this build reads version {expected})")]
    FormatVersion { found: u32, expected: u32 },
    /// A snapshot chunk, or the sequence of chunks, is not a valid image (damaged,
    /// cut, out of order, missing, duplicated, from another image, incomplete).
    #[error("snapshot chunk {sequence}: {reason}")]
    Snapshot {
        /// The chunk's place in the image: the number of chunks loaded before it.
        sequence: u64,
        reason: String,
    },
    /// An import needs an empty store.
    #[error("cannot import into a store that is not empty: {reason}")]
    NotEmpty { reason: String },
    /// Consensus metadata over [`CONSENSUS_BYTES_MAX`]: nothing was written.
    #[error("consensus metadata of {size} bytes is over the limit of {CONSENSUS_BYTES_MAX}")]
    ConsensusTooLarge { size: usize },
    /// A store name over [`STORE_NAME_BYTES_MAX`] or starting with `~drop-guard.`, or a
    /// registry key that is empty or over [`REGISTRY_KEY_BYTES_MAX`].
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
}

/// What the last durable checkpoint covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last WAL op whose effects the checkpoint holds (0: none).
    pub op: u64,
    /// The ledger's last assigned timestamp at the checkpoint.
    pub timestamp_last: u64,
}

/// The on-disk checkpoint and history store. See the module documentation.
pub struct Store {
    db: Database,
    accounts: Keyspace,
    transfers: Keyspace,
    pending_status: Keyspace,
    open_pending: Keyspace,
    account_transfers: Keyspace,
    balances: Keyspace,
    meta: Keyspace,
    /// Serialises checkpoints, so that checking the previous checkpoint and
    /// writing the next one cannot interleave.
    writer: Mutex<()>,
    /// An [`Importer`] is loading into this store: checkpoints are a bug meanwhile.
    importing: AtomicBool,
    /// The `timestamp_last` of the last committed checkpoint: records of the
    /// ingested keyspaces newer than it are left over from a checkpoint that
    /// did not commit, and readers skip them (see "Write path").
    timestamp_committed: AtomicU64,
    /// [`CHECKPOINT_INGEST_TRANSFERS_MIN`], or what a test set.
    ingest_transfers_min: AtomicUsize,
}

// The server shares one store between threads.
const _: fn() = || {
    fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<Store>();
};

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.accounts.path()).finish_non_exhaustive()
    }
}

/// The database under the stores of one process: one fjall instance (one
/// journal, one block cache, one set of flush and compaction workers) that
/// holds the keyspaces of many [`Store`]s, one per cell, told apart by name.
///
/// It also keeps a small durable registry of named `u64` values (for example
/// which generation of a cell's store is the live one), see [`StoreDatabase::registry_set`].
#[derive(Clone)]
pub struct StoreDatabase {
    db: Database,
    dir: PathBuf,
    registry: Keyspace,
}

impl std::fmt::Debug for StoreDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreDatabase").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl StoreDatabase {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<StoreDatabase, StoreError> {
        let db = Database::builder(dir).cache_size(BLOCK_CACHE_SIZE_BYTES).open()?;
        let registry = db.keyspace(KEYSPACE_REGISTRY, options_point_read)?;
        Ok(StoreDatabase { db, dir: dir.to_path_buf(), registry })
    }

    /// The registry value named `key`, if it was ever set.
    pub fn registry_get(&self, key: &str) -> Result<Option<u64>, StoreError> {
        registry_key_check(key)?;
        let Some(value) = self.registry.get(key.as_bytes())? else {
            return Ok(None);
        };
        let payload = unseal(KEYSPACE_REGISTRY, key.as_bytes(), &value, REGISTRY_VALUE_SIZE - CHECKSUM_SIZE)?;
        Ok(Some(u64::from_le_bytes(payload.try_into().expect("8 bytes"))))
    }

    /// Sets the registry value named `key`, durably (fsync) before returning.
    pub fn registry_set(&self, key: &str, value: u64) -> Result<(), StoreError> {
        registry_key_check(key)?;
        let sealed: [u8; REGISTRY_VALUE_SIZE] = seal(key.as_bytes(), &value.to_le_bytes());
        let mut batch = OwnedWriteBatch::with_capacity(self.db.clone(), 1).durability(Some(PersistMode::SyncAll));
        batch.insert(&self.registry, key.as_bytes(), sealed);
        batch.commit()?;
        let written = self.registry_get(key)?;
        assert_eq!(written, Some(value), "registry value {key:?} read back differs from the one written");
        Ok(())
    }

    /// Deletes every keyspace of the store named `name` (the name given to
    /// [`Store::open_in`]), durably: a later `open_in(name)` finds an empty
    /// store, also after a crash. Used to discard an old or half-imported
    /// store generation. The [`Store`] must have been dropped (or at least
    /// no longer be used: its handles keep the files until it is dropped,
    /// and every write through them fails). A name without keyspaces is no error.
    ///
    /// First creates a new empty guard keyspace, and deletes the older guards
    /// last; see "Registry and dropping a store" in the module documentation.
    pub fn drop_store(&self, name: &str) -> Result<(), StoreError> {
        store_name_check(name)?;
        let names: Vec<String> = KEYSPACE_SUFFIXES.iter().map(|suffix| format!("{name}{suffix}")).collect();
        if !names.iter().any(|keyspace_name| self.db.keyspace_exists(keyspace_name)) {
            return Ok(());
        }
        let guards_old = self.drop_guards();
        let guard_number = guards_old.iter().map(|(number, _)| number + 1).max().unwrap_or(1);
        let guard = self.db.keyspace(&format!("{KEYSPACE_DROP_GUARD_PREFIX}{guard_number}"), options_scanned)?;
        drop(guard);
        let mut dropped = 0usize;
        for keyspace_name in names.iter().chain(guards_old.iter().map(|(_, name)| name)) {
            if self.db.keyspace_exists(keyspace_name) {
                // Opens the existing keyspace: the options are not used.
                let keyspace = self.db.keyspace(keyspace_name, KeyspaceCreateOptions::default)?;
                self.db.delete_keyspace(keyspace)?;
                dropped += 1;
            }
            assert!(!self.db.keyspace_exists(keyspace_name), "keyspace {keyspace_name} still exists after delete");
        }
        // fjall records a deletion in its own metadata tree with fsynced table
        // and version files; syncing the journal too costs little.
        self.db.persist(PersistMode::SyncAll)?;
        tracing::info!(dir = %self.dir.display(), name, keyspaces = dropped, guard_number, "store dropped");
        Ok(())
    }

    /// The drop guard keyspaces, with their numbers.
    fn drop_guards(&self) -> Vec<(u64, String)> {
        let mut guards = Vec::new();
        for keyspace_name in self.db.list_keyspace_names() {
            let keyspace_name: &str = &keyspace_name;
            let number = keyspace_name.strip_prefix(KEYSPACE_DROP_GUARD_PREFIX).and_then(|n| n.parse::<u64>().ok());
            if let Some(number) = number {
                guards.push((number, keyspace_name.to_string()));
            }
        }
        guards
    }
}

impl Store {
    /// Opens (creating if needed) a store alone in its own database in `dir`.
    /// Recovers the last complete checkpoint after a crash.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_in(&StoreDatabase::open(dir)?, "")
    }

    /// Opens (creating if needed) the store named `name` in a shared
    /// database: its keyspaces are the standard ones prefixed with `name`
    /// (for example `cell7.accounts`). Recovers the last complete checkpoint.
    pub fn open_in(database: &StoreDatabase, name: &str) -> Result<Store, StoreError> {
        store_name_check(name)?;
        let db = &database.db;
        let keyspace =
            |suffix: &str, options: fn() -> KeyspaceCreateOptions| db.keyspace(&format!("{name}{suffix}"), options);
        let store = Store {
            accounts: keyspace(KEYSPACE_ACCOUNTS, options_scanned)?,
            transfers: keyspace(KEYSPACE_TRANSFERS, options_point_read)?,
            pending_status: keyspace(KEYSPACE_PENDING_STATUS, options_point_read)?,
            open_pending: keyspace(KEYSPACE_OPEN_PENDING, options_scanned)?,
            account_transfers: keyspace(KEYSPACE_ACCOUNT_TRANSFERS, options_scanned)?,
            balances: keyspace(KEYSPACE_BALANCES, options_scanned)?,
            meta: keyspace(KEYSPACE_META, options_point_read)?,
            db: db.clone(),
            writer: Mutex::new(()),
            importing: AtomicBool::new(false),
            timestamp_committed: AtomicU64::new(0),
            ingest_transfers_min: AtomicUsize::new(CHECKPOINT_INGEST_TRANSFERS_MIN),
        };
        // Refuses another format, and checks the checkpoint record, before anyone relies on it.
        let checkpoint = store.checkpoint()?;
        store.timestamp_committed.store(checkpoint.timestamp_last, Ordering::Release);
        tracing::info!(
            dir = %database.dir.display(),
            name,
            op = checkpoint.op,
            timestamp_last = checkpoint.timestamp_last,
            "store opened"
        );
        Ok(store)
    }

    /// The last durable checkpoint (op 0, timestamp 0 for a fresh store).
    pub fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        match self.meta.get(KEY_CHECKPOINT)? {
            None => Ok(Checkpoint::default()),
            Some(value) => checkpoint_decode(&value),
        }
    }

    /// The consensus metadata stored with the last checkpoint (empty if none).
    pub fn consensus(&self) -> Result<Vec<u8>, StoreError> {
        match self.meta.get(KEY_CONSENSUS)? {
            None => Ok(Vec::new()),
            Some(value) => consensus_decode(&value),
        }
    }

    /// Writes a delta atomically together with the WAL op it covers, and makes
    /// it durable (fsync) before returning. See the module documentation.
    /// The same as [`Store::apply_checkpoint_with`] with empty consensus metadata.
    ///
    /// Panics if the delta breaks its contract (a bug in the caller): `op` not
    /// after the last checkpoint's, time going back, records out of order, a
    /// transfer already checkpointed, more than [`CHECKPOINT_BATCH_ITEMS_MAX`]
    /// records, an import under way. Nothing is written then.
    pub fn apply_checkpoint(&self, op: u64, delta: &CheckpointDelta) -> Result<(), StoreError> {
        self.apply_checkpoint_with(op, delta, &[])
    }

    /// As [`Store::apply_checkpoint`], and stores `consensus` (opaque bytes,
    /// for example the Raft term and membership of the checkpoint) in the same
    /// atomic, durable batch: [`Store::consensus`] reads them back, and a
    /// snapshot carries them. More than [`CONSENSUS_BYTES_MAX`] bytes is an
    /// error, before anything is written.
    pub fn apply_checkpoint_with(&self, op: u64, delta: &CheckpointDelta, consensus: &[u8]) -> Result<(), StoreError> {
        self.checkpoint_write(op, delta, consensus, true)
    }

    /// The first half of [`Store::apply_checkpoint_with`] alone, however
    /// small the delta: the ingestion of its immutable records, and no
    /// commit, as a crash between the two would leave the store. For crash
    /// tests: the store must answer as before, and the whole checkpoint must
    /// apply after it.
    #[doc(hidden)]
    pub fn apply_checkpoint_crashing_before_commit(&self, op: u64, delta: &CheckpointDelta) -> Result<(), StoreError> {
        self.checkpoint_write(op, delta, &[], false)
    }

    /// For tests: checkpoints of at least `transfers` transfers write by
    /// ingestion from now on (0: all of them; see [`CHECKPOINT_INGEST_TRANSFERS_MIN`]).
    #[doc(hidden)]
    pub fn set_ingest_transfers_min(&self, transfers: usize) {
        self.ingest_transfers_min.store(transfers, Ordering::Relaxed);
    }

    fn checkpoint_write(
        &self,
        op: u64,
        delta: &CheckpointDelta,
        consensus: &[u8],
        commit: bool,
    ) -> Result<(), StoreError> {
        if consensus.len() > CONSENSUS_BYTES_MAX {
            return Err(StoreError::ConsensusTooLarge { size: consensus.len() });
        }
        let _writer = self.writer.lock().expect("an earlier checkpoint panicked: reopen the store");
        assert!(!self.importing.load(Ordering::Acquire), "checkpoint {op} into a store that is being imported into");
        let started = Instant::now();
        let previous = self.checkpoint()?;
        assert!(op > previous.op, "checkpoint op {op} does not follow the last checkpoint's op {}", previous.op);
        delta_check(previous.timestamp_last, delta);
        // Empty consensus metadata is stored as no record: a checkpoint without
        // it writes the same batch as before consensus metadata existed.
        let consensus_item = !consensus.is_empty() || self.meta.contains_key(KEY_CONSENSUS)?;
        let items = delta_items_count(delta) + usize::from(consensus_item);
        assert!(items <= CHECKPOINT_BATCH_ITEMS_MAX, "checkpoint of {items} records is over the limit");
        let transfers_by_id = transfers_sorted_by_id(&delta.transfers);
        self.transfers_check_new(&delta.transfers, &transfers_by_id, previous.timestamp_last)?;
        let ingest = !commit || delta.transfers.len() >= self.ingest_transfers_min.load(Ordering::Relaxed);
        let immutable_items = delta_immutable_items_count(delta);
        let batch_items = items - if ingest { immutable_items } else { 0 };
        let mut batch =
            OwnedWriteBatch::with_capacity(self.db.clone(), batch_items).durability(Some(PersistMode::SyncAll));

        // 1. The immutable records, each keyspace in key order: ingested
        // straight into tables (durable when each ingestion finishes), or,
        // for a small checkpoint, into the batch.
        if ingest {
            self.ingest(&self.transfers, |put| self.transfers_records(&delta.transfers, &transfers_by_id, put))?;
            self.ingest(&self.account_transfers, |put| account_transfers_records(&delta.transfers, put))?;
            self.ingest(&self.balances, |put| balances_records(&delta.balances, put))?;
        } else {
            self.transfers_records(&delta.transfers, &transfers_by_id, &mut |k, v| {
                batch_put(&mut batch, &self.transfers, k, v)
            })?;
            account_transfers_records(&delta.transfers, &mut |k, v| {
                batch_put(&mut batch, &self.account_transfers, k, v)
            })?;
            balances_records(&delta.balances, &mut |k, v| batch_put(&mut batch, &self.balances, k, v))?;
        }
        drop(transfers_by_id);
        let ingested = started.elapsed();
        if !commit {
            return Ok(());
        }

        // 2. The commit: the mutable records and the checkpoint record in one
        // journaled, durable batch. Each keyspace's records go in in key
        // order: inserting into fjall's memtable (a skip list) in order is
        // several times faster than at random.
        self.batch_accounts(&mut batch, &delta.accounts);
        self.batch_pending_statuses(&mut batch, &delta.pending_statuses);
        let checkpoint = Checkpoint { op, timestamp_last: delta.timestamp_last };
        batch.insert(&self.meta, KEY_CHECKPOINT, checkpoint_encode(&checkpoint));
        if !consensus.is_empty() {
            batch.insert(&self.meta, KEY_CONSENSUS, consensus_encode(consensus));
        } else if consensus_item {
            batch.remove(&self.meta, KEY_CONSENSUS);
        }
        assert_eq!(batch.len(), batch_items);
        batch.commit()?;
        self.timestamp_committed.store(delta.timestamp_last, Ordering::Release);

        // Check the meta records right after they are read back.
        let written = self.checkpoint()?;
        assert_eq!(written, checkpoint, "checkpoint read back differs from the one written");
        assert!(self.consensus()? == consensus, "consensus read back differs from the one written");
        tracing::debug!(
            op,
            timestamp_last = delta.timestamp_last,
            accounts = delta.accounts.len(),
            transfers = delta.transfers.len(),
            pending_statuses = delta.pending_statuses.len(),
            balances = delta.balances.len(),
            ingest,
            ingest_ms = ingested.as_millis() as u64,
            duration_ms = started.elapsed().as_millis() as u64,
            "checkpoint applied"
        );
        Ok(())
    }

    /// Ingests into `keyspace` the records `records` produces (in key order),
    /// unless it produces none.
    fn ingest(
        &self,
        keyspace: &Keyspace,
        records: impl FnOnce(&mut RecordPut<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut ingestion = None;
        records(&mut |key, value| {
            if ingestion.is_none() {
                ingestion = Some(keyspace.start_ingestion()?);
            }
            ingestion.as_mut().expect("started above").write(key, value)?;
            Ok(())
        })?;
        if let Some(ingestion) = ingestion {
            ingestion.finish()?;
        }
        Ok(())
    }

    /// Every account, sorted by id.
    pub fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let snapshot = self.db.snapshot();
        let mut accounts: Vec<Account> = Vec::new();
        for guard in snapshot.iter(&self.accounts) {
            let (key, value) = guard.into_inner()?;
            let account = account_decode(&key, &value)?;
            // Big-endian keys come back in id order; the id inside matches the key (checked above).
            assert!(accounts.last().is_none_or(|last| last.id < account.id), "accounts out of order");
            accounts.push(account);
        }
        Ok(accounts)
    }

    /// The open pending transfers (status `Pending`), sorted by id.
    pub fn open_pending(&self) -> Result<Vec<Transfer>, StoreError> {
        let snapshot = self.db.snapshot();
        let mut pending: Vec<Transfer> = Vec::new();
        for guard in snapshot.iter(&self.open_pending) {
            let (key, value) = guard.into_inner()?;
            unseal(KEYSPACE_OPEN_PENDING, &key, &value, 0)?;
            let id = id_key_decode(KEYSPACE_OPEN_PENDING, &key)?;
            let status = snapshot.get(&self.pending_status, key.as_ref())?;
            let status = status.map(|value| pending_status_decode(&key, &value)).transpose()?;
            if status != Some(PendingStatus::Pending) {
                return Err(corrupt(
                    KEYSPACE_OPEN_PENDING,
                    &key,
                    format!("open pending transfer has status {status:?}"),
                ));
            }
            let Some(value) = snapshot.get(&self.transfers, key.as_ref())? else {
                return Err(corrupt(KEYSPACE_OPEN_PENDING, &key, "open pending transfer is missing".to_string()));
            };
            let transfer = transfer_decode(&key, &value)?;
            assert!(pending.last().is_none_or(|last| last.id < id), "open pending transfers out of order");
            pending.push(transfer);
        }
        Ok(pending)
    }

    /// Fails (panics) if a transfer of the delta is already checkpointed: a
    /// transfer is written once, ever. One found that is newer than the last
    /// checkpoint is left over from a checkpoint that was ingested but never
    /// committed (a crash between the two); the log's replay must have made
    /// the very same transfer again, so it must be identical. Looks the ids
    /// up in id order (`by_id`), which keeps the engine's block reads local.
    fn transfers_check_new(
        &self,
        transfers: &[Transfer],
        by_id: &[(u128, u32)],
        timestamp_committed: u64,
    ) -> Result<(), StoreError> {
        for (id, index) in by_id {
            let key = id.to_be_bytes();
            let Some(value) = self.transfers.get(key)? else {
                continue;
            };
            let found = transfer_decode(&key, &value)?;
            assert!(found.timestamp > timestamp_committed, "transfer {id} is already checkpointed");
            let transfer = &transfers[*index as usize];
            assert!(
                found == *transfer,
                "transfer {id} left over from a checkpoint that did not commit differs from the one written now: \
                 {found:?} then {transfer:?}"
            );
        }
        Ok(())
    }

    fn batch_accounts(&self, batch: &mut OwnedWriteBatch, accounts: &[Account]) {
        let mut payload = [0u8; RECORD_SIZE];
        for account in accounts {
            let key = account.id.to_be_bytes();
            account.encode(&mut payload);
            batch.insert(&self.accounts, key, seal::<RECORD_SIZE, RECORD_VALUE_SIZE>(&key, &payload));
        }
    }

    /// The `transfers` records of a delta, in key (id) order.
    fn transfers_records(
        &self,
        transfers: &[Transfer],
        by_id: &[(u128, u32)],
        put: &mut RecordPut<'_>,
    ) -> Result<(), StoreError> {
        let mut payload = [0u8; RECORD_SIZE];
        for (_, index) in by_id {
            let transfer = &transfers[*index as usize];
            let key = transfer.id.to_be_bytes();
            transfer.encode(&mut payload);
            put(&key, &seal::<RECORD_SIZE, RECORD_VALUE_SIZE>(&key, &payload))?;
        }
        Ok(())
    }

    fn batch_pending_statuses(&self, batch: &mut OwnedWriteBatch, statuses: &[(u128, PendingStatus)]) {
        for (id, status) in statuses {
            let key = id.to_be_bytes();
            batch.insert(&self.pending_status, key, seal::<1, STATUS_VALUE_SIZE>(&key, &[*status as u8]));
            if *status == PendingStatus::Pending {
                batch.insert(&self.open_pending, key, seal::<0, CHECKSUM_SIZE>(&key, &[]));
            } else {
                batch.remove(&self.open_pending, key);
            }
        }
    }

    /// The timestamp range a history scan may read: nothing newer than the
    /// committed checkpoint (see "Write path").
    fn committed_range(&self, filter: &AccountFilter) -> Option<(u64, u64)> {
        let (min, max) = filter.timestamp_range();
        assert!(min <= max, "filter must be validated: empty timestamp range");
        let max = max.min(self.timestamp_committed.load(Ordering::Acquire));
        (min <= max).then_some((min, max))
    }

    /// Reads one checkpointed transfer through `reader`. Panics on engine errors and corrupt data.
    fn transfer_read(&self, reader: &impl Readable, id: u128) -> Option<Transfer> {
        let key = id.to_be_bytes();
        let value = reader.get(&self.transfers, key).unwrap_or_else(|error| fatal_read(KEYSPACE_TRANSFERS, &error))?;
        self.transfer_committed(&key, &value)
    }

    /// A stored transfer, unless it is left over from a checkpoint that did
    /// not commit (newer than the committed one): that one is not there yet.
    fn transfer_committed(&self, key: &[u8], value: &[u8]) -> Option<Transfer> {
        let transfer = transfer_decode(key, value).unwrap_or_else(|error| panic!("{error}"));
        (transfer.timestamp <= self.timestamp_committed.load(Ordering::Acquire)).then_some(transfer)
    }

    /// One `account_transfers` index entry: the transfer it points at, if it
    /// is on a side the filter wants. Panics on engine errors and corrupt data.
    fn account_transfer_read(
        &self,
        snapshot: &fjall::Snapshot,
        guard: fjall::Guard,
        filter: &AccountFilter,
    ) -> Option<Transfer> {
        let (key, value) = guard.into_inner().unwrap_or_else(|error| fatal_read(KEYSPACE_ACCOUNT_TRANSFERS, &error));
        let (account_id, timestamp) =
            history_key_decode(KEYSPACE_ACCOUNT_TRANSFERS, &key).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(account_id, filter.account_id, "range scan left the account");
        assert!(filter.timestamp_matches(timestamp), "range scan left the timestamp range");
        let payload =
            unseal(KEYSPACE_ACCOUNT_TRANSFERS, &key, &value, INDEX_SIZE).unwrap_or_else(|error| panic!("{error}"));
        let id = u128::from_le_bytes(payload[..16].try_into().expect("16 bytes"));
        let side = payload[16];
        let side_wanted = (filter.debits && side & SIDE_DEBIT != 0) || (filter.credits && side & SIDE_CREDIT != 0);
        if !side_wanted {
            return None;
        }
        let Some(transfer) = self.transfer_read(snapshot, id) else {
            panic!("{}", corrupt(KEYSPACE_ACCOUNT_TRANSFERS, &key, format!("indexed transfer {id} is missing")));
        };
        let side_found = (u8::from(transfer.debit_account_id == account_id) * SIDE_DEBIT)
            | (u8::from(transfer.credit_account_id == account_id) * SIDE_CREDIT);
        if transfer.timestamp != timestamp || side_found != side {
            panic!(
                "{}",
                corrupt(KEYSPACE_ACCOUNT_TRANSFERS, &key, format!("index entry does not match transfer {transfer:?}"))
            );
        }
        filter.matches_transfer(&transfer).then_some(transfer)
    }

    fn account_transfers_collect(
        &self,
        snapshot: &fjall::Snapshot,
        filter: &AccountFilter,
        entries: impl Iterator<Item = fjall::Guard>,
    ) -> Vec<Transfer> {
        let limit = filter.limit as usize;
        let mut transfers = Vec::with_capacity(limit.min(cellpay_ledger::QUERY_LIMIT_MAX as usize));
        if limit == 0 {
            return transfers;
        }
        for guard in entries {
            if let Some(transfer) = self.account_transfer_read(snapshot, guard, filter) {
                transfers.push(transfer);
                if transfers.len() == limit {
                    break;
                }
            }
        }
        transfers
    }
}

impl History for Store {
    /// Panics on an engine error or corrupt data (see the module documentation).
    fn transfer(&self, id: u128) -> Option<Transfer> {
        let key = id.to_be_bytes();
        let value = self.transfers.get(key).unwrap_or_else(|error| fatal_read(KEYSPACE_TRANSFERS, &error))?;
        self.transfer_committed(&key, &value)
    }

    /// Panics on an engine error or corrupt data (see the module documentation).
    fn pending_status(&self, id: u128) -> Option<PendingStatus> {
        let key = id.to_be_bytes();
        let value = self.pending_status.get(key).unwrap_or_else(|error| fatal_read(KEYSPACE_PENDING_STATUS, &error));
        value.map(|value| pending_status_decode(&key, &value).unwrap_or_else(|error| panic!("{error}")))
    }

    /// Panics on an engine error or corrupt data (see the module documentation).
    /// Scans the account's index entries in the timestamp range until `limit`
    /// transfers match: a filter that matches few transfers reads many.
    fn account_transfers(&self, filter: &AccountFilter) -> Vec<Transfer> {
        let Some((min, max)) = self.committed_range(filter) else {
            return Vec::new();
        };
        let snapshot = self.db.snapshot();
        let range = history_key(filter.account_id, min)..=history_key(filter.account_id, max);
        let entries = snapshot.range(&self.account_transfers, range);
        if filter.reversed {
            self.account_transfers_collect(&snapshot, filter, entries.rev())
        } else {
            self.account_transfers_collect(&snapshot, filter, entries)
        }
    }

    /// Panics on an engine error or corrupt data (see the module documentation).
    fn account_balances(&self, filter: &AccountFilter) -> Vec<AccountBalance> {
        let Some((min, max)) = self.committed_range(filter) else {
            return Vec::new();
        };
        let range = history_key(filter.account_id, min)..=history_key(filter.account_id, max);
        let entries = self.balances.range(range);
        let limit = filter.limit as usize;
        let read = |guard: fjall::Guard| {
            let (key, value) = guard.into_inner().unwrap_or_else(|error| fatal_read(KEYSPACE_BALANCES, &error));
            let balance = balance_decode(&key, &value).unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(balance.account_id, filter.account_id, "range scan left the account");
            assert!(filter.timestamp_matches(balance.timestamp), "range scan left the timestamp range");
            balance
        };
        if filter.reversed {
            entries.rev().take(limit).map(read).collect()
        } else {
            entries.take(limit).map(read).collect()
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Snapshots: export a consistent image of a store as checksummed chunks, import it into an empty store.

/// What a snapshot image is of, and how big it was on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotImage {
    /// The checkpoint the image holds (all of it, and nothing after it).
    pub checkpoint: Checkpoint,
    /// The consensus metadata stored with that checkpoint.
    pub consensus: Vec<u8>,
    /// How many chunks the image took.
    pub chunks: u64,
    /// The size of all its chunks, frames included.
    pub bytes: u64,
    /// How many data records it holds (the `meta` records travel in the header).
    pub records: u64,
}

/// Why an export failed: the store, or the sink the chunks went to.
#[derive(Debug, thiserror::Error)]
pub enum ExportError<E> {
    #[error("exporting a snapshot: {0}")]
    Store(#[from] StoreError),
    #[error("the snapshot sink failed: {0}")]
    Sink(#[source] E),
}

/// The wire tag of each data keyspace in a snapshot; images list keyspaces in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SnapshotKeyspace {
    Accounts = 0,
    Transfers = 1,
    PendingStatus = 2,
    OpenPending = 3,
    AccountTransfers = 4,
    Balances = 5,
}

const SNAPSHOT_KEYSPACES_COUNT: usize = 6;

impl SnapshotKeyspace {
    const ALL: [SnapshotKeyspace; SNAPSHOT_KEYSPACES_COUNT] = [
        SnapshotKeyspace::Accounts,
        SnapshotKeyspace::Transfers,
        SnapshotKeyspace::PendingStatus,
        SnapshotKeyspace::OpenPending,
        SnapshotKeyspace::AccountTransfers,
        SnapshotKeyspace::Balances,
    ];

    fn from_u8(tag: u8) -> Option<SnapshotKeyspace> {
        SnapshotKeyspace::ALL.get(usize::from(tag)).copied()
    }

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        KEYSPACE_SUFFIXES[self.index()]
    }

    /// Written by ingestion before the checkpoint commits (see "Write path"):
    /// may hold records newer than the committed checkpoint.
    fn ingested(self) -> bool {
        matches!(self, SnapshotKeyspace::Transfers | SnapshotKeyspace::AccountTransfers | SnapshotKeyspace::Balances)
    }
}

const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"CPSC");
const CHUNK_FLAG_FIRST: u32 = 1 << 0;
const CHUNK_FLAG_LAST: u32 = 1 << 1;
/// magic (4) ++ flags (4) ++ sequence (8) ++ body size (4) ++ chain (4) ++ checksum (4).
const CHUNK_FRAME_SIZE: usize = 28;
/// The frame fields before the checksum, which the checksum covers (with the body).
const CHUNK_FRAME_CHECKED_SIZE: usize = CHUNK_FRAME_SIZE - CHECKSUM_SIZE;
/// snapshot format (4) ++ store format (4) ++ op (8) ++ timestamp_last (8) ++ consensus size (4).
const SNAPSHOT_HEADER_FIXED_SIZE: usize = 28;
/// keyspace tag (1) ++ key size (2) ++ value size (4).
const SNAPSHOT_RECORD_FRAME_SIZE: usize = 7;
const SNAPSHOT_RECORD_SIZE_MAX: usize = SNAPSHOT_RECORD_FRAME_SIZE + HISTORY_KEY_SIZE + RECORD_VALUE_SIZE;
/// records per keyspace (8 each) ++ chunks (8) ++ bytes (8).
const SNAPSHOT_TRAILER_SIZE: usize = 8 * SNAPSHOT_KEYSPACES_COUNT + 8 + 8;

// The largest header, the trailer and a record fit one chunk, whatever else is in it.
const _: () = assert!(
    CHUNK_FRAME_SIZE
        + SNAPSHOT_HEADER_FIXED_SIZE
        + CONSENSUS_BYTES_MAX
        + SNAPSHOT_RECORD_SIZE_MAX
        + SNAPSHOT_TRAILER_SIZE
        <= SNAPSHOT_CHUNK_BYTES_MAX
);
const _: () = assert!(SNAPSHOT_CHUNK_BYTES_MAX <= u32::MAX as usize);

impl Store {
    /// Streams a consistent image of the whole store as chunks of at most
    /// [`SNAPSHOT_CHUNK_BYTES_MAX`] bytes, calling `sink` with each in order,
    /// and returns what the image is of. Everything is read from one fjall
    /// snapshot: a checkpoint committed meanwhile (by another thread) is
    /// entirely in the image or not at all. Every record is checked as it is
    /// read (as on every read). Stops at the first error of the sink, which
    /// comes back as [`ExportError::Sink`]. Memory: one chunk. See the module
    /// documentation for the format.
    pub fn export<E>(&self, mut sink: impl FnMut(Vec<u8>) -> Result<(), E>) -> Result<SnapshotImage, ExportError<E>> {
        let started = Instant::now();
        let snapshot = self.db.snapshot();
        let checkpoint = match snapshot.get(&self.meta, KEY_CHECKPOINT).map_err(StoreError::from)? {
            None => Checkpoint::default(),
            Some(value) => checkpoint_decode(&value)?,
        };
        let consensus = match snapshot.get(&self.meta, KEY_CONSENSUS).map_err(StoreError::from)? {
            None => Vec::new(),
            Some(value) => consensus_decode(&value)?,
        };
        let mut writer = ChunkWriter::new(&checkpoint, &consensus);
        for keyspace in SnapshotKeyspace::ALL {
            for guard in snapshot.iter(self.snapshot_keyspace(keyspace)) {
                let (key, value) = guard.into_inner().map_err(StoreError::from)?;
                if keyspace.ingested() && record_timestamp(keyspace, &key, &value)? > checkpoint.timestamp_last {
                    // Left over from a checkpoint that did not commit (or is committing now).
                    continue;
                }
                snapshot_record_check(keyspace, &key, &value, checkpoint.timestamp_last)?;
                if let Some(chunk) = writer.record(keyspace, &key, &value) {
                    sink(chunk).map_err(ExportError::Sink)?;
                }
            }
        }
        let (chunk, totals) = writer.finish();
        sink(chunk).map_err(ExportError::Sink)?;
        let image = SnapshotImage {
            checkpoint,
            consensus,
            chunks: totals.chunks_count,
            bytes: totals.bytes_count,
            records: totals.records_counts.iter().sum(),
        };
        tracing::info!(
            op = image.checkpoint.op,
            chunks = image.chunks,
            bytes = image.bytes,
            records = image.records,
            duration_ms = started.elapsed().as_millis() as u64,
            "snapshot exported"
        );
        Ok(image)
    }

    /// Starts loading a snapshot image into this store, which must be empty:
    /// no checkpoint, no records (else [`StoreError::NotEmpty`]), and no other
    /// import under way. Checkpoints into the store are a bug (they panic)
    /// until the importer is finished or dropped.
    pub fn import(&self) -> Result<Importer<'_>, StoreError> {
        let _writer = self.writer.lock().expect("an earlier checkpoint panicked: reopen the store");
        if self.importing.load(Ordering::Acquire) {
            return Err(StoreError::NotEmpty { reason: "another import is under way".to_string() });
        }
        for (keyspace, suffix) in self.keyspaces().into_iter().zip(KEYSPACE_SUFFIXES) {
            if !keyspace.is_empty()? {
                return Err(StoreError::NotEmpty { reason: format!("keyspace {suffix} holds records") });
            }
        }
        self.importing.store(true, Ordering::Release);
        Ok(Importer {
            store: self,
            header: None,
            keyspace: None,
            loader: None,
            key_last: Vec::with_capacity(HISTORY_KEY_SIZE),
            records_counts: [0; SNAPSHOT_KEYSPACES_COUNT],
            chunks_count: 0,
            bytes_count: 0,
            checksum_previous: 0,
            complete: false,
            failed: false,
            started: Instant::now(),
        })
    }

    /// Every keyspace of the store, in the order of `KEYSPACE_SUFFIXES`.
    fn keyspaces(&self) -> [&Keyspace; 7] {
        [
            &self.accounts,
            &self.transfers,
            &self.pending_status,
            &self.open_pending,
            &self.account_transfers,
            &self.balances,
            &self.meta,
        ]
    }

    fn snapshot_keyspace(&self, keyspace: SnapshotKeyspace) -> &Keyspace {
        self.keyspaces()[keyspace.index()]
    }
}

/// Writes into one keyspace with fjall's bulk ingestion (sorted keys, written
/// straight into tables). fjall does not export the name of its `Ingestion`
/// type, so the importer keeps one behind this closure: `Some(record)` writes
/// it, `None` finishes the ingestion (once, last).
type KeyspaceLoader<'a> = Box<dyn FnMut(Option<(&[u8], &[u8])>) -> Result<(), fjall::Error> + 'a>;

fn keyspace_loader(keyspace: &Keyspace) -> Result<KeyspaceLoader<'_>, StoreError> {
    let mut ingestion = Some(keyspace.start_ingestion()?);
    Ok(Box::new(move |record: Option<(&[u8], &[u8])>| match record {
        Some((key, value)) => ingestion.as_mut().expect("ingestion not finished yet").write(key, value),
        None => ingestion.take().expect("ingestion finished once").finish(),
    }))
}

/// Loads a snapshot image, chunk by chunk, into an empty store. See [`Store::import`].
///
/// Dropping it before [`Importer::finish`] leaves a store whose checkpoint is
/// still 0 but that may hold some records: [`StoreDatabase::drop_store`] discards it.
pub struct Importer<'a> {
    store: &'a Store,
    /// The image's checkpoint and consensus metadata, from the first chunk's header.
    header: Option<(Checkpoint, Vec<u8>)>,
    /// The keyspace being loaded, its loader, and the last key loaded into it.
    keyspace: Option<SnapshotKeyspace>,
    loader: Option<KeyspaceLoader<'a>>,
    key_last: Vec<u8>,
    records_counts: [u64; SNAPSHOT_KEYSPACES_COUNT],
    chunks_count: u64,
    bytes_count: u64,
    /// The checksum of the last chunk loaded: the next chunk's chain must name it.
    checksum_previous: u32,
    /// The last chunk was loaded.
    complete: bool,
    /// A chunk failed: the importer is unusable.
    failed: bool,
    started: Instant,
}

impl std::fmt::Debug for Importer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer")
            .field("store", &self.store)
            .field("chunks_count", &self.chunks_count)
            .field("complete", &self.complete)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Importer<'_> {
    /// Loads the next chunk of the image (in export order). Checks the chunk's
    /// frame and checksum, its place in the sequence (number, chain to the
    /// previous chunk, first and last flags), the header, every record (its
    /// keyspace, its value's own checksum, key order within the keyspace and
    /// keyspace order) and, with the last chunk, the image's totals. Bad input
    /// is an error ([`StoreError::Snapshot`] or [`StoreError::Corrupt`]), and
    /// the importer is unusable after it.
    pub fn chunk(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        if self.failed {
            return Err(self.error("the importer failed on an earlier chunk".to_string()));
        }
        let result = self.chunk_load(bytes);
        if result.is_err() {
            self.failed = true;
            self.loader = None; // Drops the unfinished tables: never registered.
        }
        result
    }

    /// Checks that the whole image was loaded (the last chunk came), makes it
    /// durable, and only then writes the checkpoint and consensus records (in
    /// one batch, fsynced): until they are written, [`Store::checkpoint`]
    /// reports op 0, so a crash before leaves a store that is recognisably
    /// not an image. Returns what the image is of.
    pub fn finish(mut self) -> Result<SnapshotImage, StoreError> {
        if self.failed {
            return Err(self.error("the importer failed on an earlier chunk".to_string()));
        }
        if !self.complete {
            return Err(self.error("the image is incomplete: its last chunk was not loaded".to_string()));
        }
        self.failed = true; // Whatever happens below, this importer is done.
        self.keyspace_finish()?;
        let (checkpoint, consensus) = self.header.clone().expect("a complete image has a header");
        let records: u64 = self.records_counts.iter().sum();
        if checkpoint.op == 0 {
            // The image of an empty store: there is nothing to write.
            if records != 0 {
                return Err(self.error(format!("the image of op 0 holds {records} records")));
            }
        } else {
            // Ingested tables are fsynced (files and directory) when each keyspace
            // finishes; the meta records are the last write.
            let store = self.store;
            let mut batch = OwnedWriteBatch::with_capacity(store.db.clone(), 2).durability(Some(PersistMode::SyncAll));
            batch.insert(&store.meta, KEY_CHECKPOINT, checkpoint_encode(&checkpoint));
            if !consensus.is_empty() {
                batch.insert(&store.meta, KEY_CONSENSUS, consensus_encode(&consensus));
            }
            batch.commit()?;
        }
        self.store.db.persist(PersistMode::SyncAll)?;
        self.store.timestamp_committed.store(checkpoint.timestamp_last, Ordering::Release);
        assert_eq!(self.store.checkpoint()?, checkpoint, "imported checkpoint read back differs");
        assert!(self.store.consensus()? == consensus, "imported consensus read back differs");
        let image =
            SnapshotImage { checkpoint, consensus, chunks: self.chunks_count, bytes: self.bytes_count, records };
        tracing::info!(
            op = image.checkpoint.op,
            chunks = image.chunks,
            bytes = image.bytes,
            records = image.records,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "snapshot imported"
        );
        Ok(image)
    }

    /// An error about the chunk expected next.
    fn error(&self, reason: String) -> StoreError {
        StoreError::Snapshot { sequence: self.chunks_count, reason }
    }

    fn chunk_load(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        if self.complete {
            return Err(self.error("a chunk after the last one".to_string()));
        }
        let (frame, body) = chunk_frame_decode(bytes).map_err(|reason| self.error(reason))?;
        if frame.sequence != self.chunks_count {
            return Err(self.error(format!("chunk number {} where {} was expected", frame.sequence, self.chunks_count)));
        }
        if frame.chain != self.checksum_previous {
            return Err(self.error(format!(
                "chunk follows a chunk with checksum {:#010x}, the previous one had {:#010x}",
                frame.chain, self.checksum_previous
            )));
        }
        let first = frame.flags & CHUNK_FLAG_FIRST != 0;
        if first != (self.chunks_count == 0) {
            return Err(self.error(format!("first flag is {first} on chunk {}", self.chunks_count)));
        }
        let mut records = body;
        if first {
            let (checkpoint, consensus, header_size) =
                snapshot_header_decode(body).map_err(|reason| self.error(reason))?;
            self.header = Some((checkpoint, consensus));
            records = &body[header_size..];
        }
        let last = frame.flags & CHUNK_FLAG_LAST != 0;
        let mut trailer = None;
        if last {
            let Some(records_size) = records.len().checked_sub(SNAPSHOT_TRAILER_SIZE) else {
                return Err(self.error("last chunk too short for its trailer".to_string()));
            };
            trailer = Some(snapshot_trailer_decode(&records[records_size..]));
            records = &records[..records_size];
        }
        self.records_load(records)?;
        if let Some(trailer) = trailer {
            // What arrived, this chunk included.
            let received = SnapshotTrailer {
                records_counts: self.records_counts,
                chunks_count: self.chunks_count + 1,
                bytes_count: self.bytes_count + bytes.len() as u64,
            };
            if trailer != received {
                return Err(self.error(format!("image totals {trailer:?}, received {received:?}")));
            }
            self.complete = true;
        }
        self.chunks_count += 1;
        self.bytes_count += bytes.len() as u64;
        self.checksum_previous = frame.checksum;
        Ok(())
    }

    fn records_load(&mut self, mut records: &[u8]) -> Result<(), StoreError> {
        let (checkpoint, _) = self.header.as_ref().expect("the first chunk has a header");
        let timestamp_last = checkpoint.timestamp_last;
        while !records.is_empty() {
            let Some(frame) = records.get(..SNAPSHOT_RECORD_FRAME_SIZE) else {
                return Err(self.error(format!("record frame cut at {} bytes", records.len())));
            };
            let tag = frame[0];
            let key_size = usize::from(u16::from_le_bytes([frame[1], frame[2]]));
            let value_size = u32::from_le_bytes(frame[3..7].try_into().expect("4 bytes")) as usize;
            let Some(keyspace) = SnapshotKeyspace::from_u8(tag) else {
                return Err(self.error(format!("record of unknown keyspace {tag}")));
            };
            let record_size = SNAPSHOT_RECORD_FRAME_SIZE + key_size + value_size;
            if record_size > records.len() {
                return Err(self.error(format!("record of {record_size} bytes, {} left in the chunk", records.len())));
            }
            let key = &records[SNAPSHOT_RECORD_FRAME_SIZE..SNAPSHOT_RECORD_FRAME_SIZE + key_size];
            let value = &records[SNAPSHOT_RECORD_FRAME_SIZE + key_size..record_size];
            snapshot_record_check(keyspace, key, value, timestamp_last)?;
            self.record_write(keyspace, key, value)?;
            records = &records[record_size..];
        }
        Ok(())
    }

    /// Writes one checked record, after checking its place: keyspaces in
    /// export order, keys strictly increasing within a keyspace.
    fn record_write(&mut self, keyspace: SnapshotKeyspace, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        match self.keyspace {
            Some(current) if current == keyspace => {
                if key <= self.key_last.as_slice() {
                    return Err(corrupt(
                        keyspace.name(),
                        key,
                        "key not after the previous one in the image".to_string(),
                    ));
                }
            }
            Some(current) if current > keyspace => {
                return Err(self.error(format!("keyspace {} after keyspace {}", keyspace.name(), current.name())));
            }
            _ => {
                self.keyspace_finish()?;
                self.keyspace = Some(keyspace);
                self.loader = Some(keyspace_loader(self.store.snapshot_keyspace(keyspace))?);
            }
        }
        let loader = self.loader.as_mut().expect("a keyspace is being loaded");
        loader(Some((key, value)))?;
        self.key_last.clear();
        self.key_last.extend_from_slice(key);
        self.records_counts[keyspace.index()] += 1;
        Ok(())
    }

    /// Finishes loading the current keyspace, if any: registers its tables.
    fn keyspace_finish(&mut self) -> Result<(), StoreError> {
        if let Some(mut loader) = self.loader.take() {
            loader(None)?;
        }
        Ok(())
    }
}

impl Drop for Importer<'_> {
    fn drop(&mut self) {
        self.loader = None;
        self.store.importing.store(false, Ordering::Release);
    }
}

/// Checks one record of a data keyspace as every read does (sizes, checksum,
/// the key inside the value) and that its timestamp, if it has one, is not
/// after the image's checkpoint.
fn snapshot_record_check(
    keyspace: SnapshotKeyspace,
    key: &[u8],
    value: &[u8],
    timestamp_last: u64,
) -> Result<(), StoreError> {
    let timestamp = record_timestamp(keyspace, key, value)?;
    if timestamp > timestamp_last {
        return Err(corrupt(
            keyspace.name(),
            key,
            format!("timestamp {timestamp} is after the checkpoint's {timestamp_last}"),
        ));
    }
    Ok(())
}

/// Checks one record of a data keyspace and returns its timestamp (0 for
/// the keyspaces whose records have none).
fn record_timestamp(keyspace: SnapshotKeyspace, key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
    Ok(match keyspace {
        SnapshotKeyspace::Accounts => account_decode(key, value)?.timestamp,
        SnapshotKeyspace::Transfers => transfer_decode(key, value)?.timestamp,
        SnapshotKeyspace::PendingStatus => {
            pending_status_decode(key, value)?;
            0
        }
        SnapshotKeyspace::OpenPending => {
            id_key_decode(KEYSPACE_OPEN_PENDING, key)?;
            unseal(KEYSPACE_OPEN_PENDING, key, value, 0)?;
            0
        }
        SnapshotKeyspace::AccountTransfers => {
            let (_, timestamp) = history_key_decode(KEYSPACE_ACCOUNT_TRANSFERS, key)?;
            let payload = unseal(KEYSPACE_ACCOUNT_TRANSFERS, key, value, INDEX_SIZE)?;
            let side = payload[16];
            if side == 0 || side & !(SIDE_DEBIT | SIDE_CREDIT) != 0 {
                return Err(corrupt(KEYSPACE_ACCOUNT_TRANSFERS, key, format!("unknown side {side:#04x}")));
            }
            timestamp
        }
        SnapshotKeyspace::Balances => balance_decode(key, value)?.timestamp,
    })
}

/// The totals at the end of the last chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SnapshotTrailer {
    records_counts: [u64; SNAPSHOT_KEYSPACES_COUNT],
    chunks_count: u64,
    bytes_count: u64,
}

fn snapshot_trailer_encode(trailer: &SnapshotTrailer, out: &mut Vec<u8>) {
    for count in trailer.records_counts {
        out.extend_from_slice(&count.to_le_bytes());
    }
    out.extend_from_slice(&trailer.chunks_count.to_le_bytes());
    out.extend_from_slice(&trailer.bytes_count.to_le_bytes());
}

fn snapshot_trailer_decode(bytes: &[u8]) -> SnapshotTrailer {
    assert_eq!(bytes.len(), SNAPSHOT_TRAILER_SIZE);
    let field = |index: usize| u64::from_le_bytes(bytes[index * 8..index * 8 + 8].try_into().expect("8 bytes"));
    SnapshotTrailer {
        records_counts: std::array::from_fn(field),
        chunks_count: field(SNAPSHOT_KEYSPACES_COUNT),
        bytes_count: field(SNAPSHOT_KEYSPACES_COUNT + 1),
    }
}

fn snapshot_header_encode(checkpoint: &Checkpoint, consensus: &[u8], out: &mut Vec<u8>) {
    assert!(consensus.len() <= CONSENSUS_BYTES_MAX);
    out.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&checkpoint.op.to_le_bytes());
    out.extend_from_slice(&checkpoint.timestamp_last.to_le_bytes());
    out.extend_from_slice(&(consensus.len() as u32).to_le_bytes());
    out.extend_from_slice(consensus);
}

/// The header at the start of the first chunk's body: the checkpoint, the
/// consensus metadata, and the header's size.
fn snapshot_header_decode(body: &[u8]) -> Result<(Checkpoint, Vec<u8>, usize), String> {
    let Some(fixed) = body.get(..SNAPSHOT_HEADER_FIXED_SIZE) else {
        return Err(format!("first chunk too short for the image header: {} bytes", body.len()));
    };
    let u32_at = |at: usize| u32::from_le_bytes(fixed[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().expect("8 bytes"));
    let (snapshot_format, store_format) = (u32_at(0), u32_at(4));
    if snapshot_format != SNAPSHOT_FORMAT_VERSION || store_format != FORMAT_VERSION {
        return Err(format!(
            "image of snapshot format {snapshot_format} and store format {store_format}: this build reads \
             {SNAPSHOT_FORMAT_VERSION} and {FORMAT_VERSION}"
        ));
    }
    let checkpoint = Checkpoint { op: u64_at(8), timestamp_last: u64_at(16) };
    let consensus_size = u32_at(24) as usize;
    if consensus_size > CONSENSUS_BYTES_MAX {
        return Err(format!("consensus metadata of {consensus_size} bytes is over the limit"));
    }
    let header_size = SNAPSHOT_HEADER_FIXED_SIZE + consensus_size;
    let Some(consensus) = body.get(SNAPSHOT_HEADER_FIXED_SIZE..header_size) else {
        return Err(format!("first chunk too short for {consensus_size} bytes of consensus metadata"));
    };
    if checkpoint.op == 0 && (checkpoint.timestamp_last != 0 || !consensus.is_empty()) {
        return Err("image of op 0 with a timestamp or consensus metadata".to_string());
    }
    Ok((checkpoint, consensus.to_vec(), header_size))
}

struct ChunkFrame {
    flags: u32,
    sequence: u64,
    /// The checksum of the previous chunk (0 for the first).
    chain: u32,
    checksum: u32,
}

/// Checks a chunk's frame (size, magic, flags, body size, checksum) and splits off its body.
fn chunk_frame_decode(bytes: &[u8]) -> Result<(ChunkFrame, &[u8]), String> {
    if bytes.len() < CHUNK_FRAME_SIZE || bytes.len() > SNAPSHOT_CHUNK_BYTES_MAX {
        return Err(format!(
            "chunk of {} bytes (a chunk is {CHUNK_FRAME_SIZE} to {SNAPSHOT_CHUNK_BYTES_MAX})",
            bytes.len()
        ));
    }
    let (frame, body) = bytes.split_at(CHUNK_FRAME_SIZE);
    let u32_at = |at: usize| u32::from_le_bytes(frame[at..at + 4].try_into().expect("4 bytes"));
    let magic = u32_at(0);
    if magic != CHUNK_MAGIC {
        return Err(format!("magic {magic:#010x}, expected {CHUNK_MAGIC:#010x}"));
    }
    let flags = u32_at(4);
    if flags & !(CHUNK_FLAG_FIRST | CHUNK_FLAG_LAST) != 0 {
        return Err(format!("unknown flags {flags:#010x}"));
    }
    let sequence = u64::from_le_bytes(frame[8..16].try_into().expect("8 bytes"));
    let body_size = u32_at(16) as usize;
    if body_size != body.len() {
        return Err(format!("chunk body of {} bytes, its frame says {body_size}", body.len()));
    }
    let chain = u32_at(20);
    let stored = u32_at(24);
    let computed = checksum(&frame[..CHUNK_FRAME_CHECKED_SIZE], body);
    if stored != computed {
        return Err(format!("chunk checksum {stored:#010x}, computed {computed:#010x}"));
    }
    Ok((ChunkFrame { flags, sequence, chain, checksum: stored }, body))
}

/// Packs records into chunks (pure: no I/O). Reserves room for the trailer
/// in every chunk, since which chunk is the last is known only at the end.
struct ChunkWriter {
    /// The chunk being filled: a frame to fill in, then the body.
    buffer: Vec<u8>,
    trailer: SnapshotTrailer,
    checksum_previous: u32,
}

impl ChunkWriter {
    fn new(checkpoint: &Checkpoint, consensus: &[u8]) -> ChunkWriter {
        let mut buffer = Vec::with_capacity(SNAPSHOT_CHUNK_BYTES_MAX);
        buffer.resize(CHUNK_FRAME_SIZE, 0);
        snapshot_header_encode(checkpoint, consensus, &mut buffer);
        let trailer =
            SnapshotTrailer { records_counts: [0; SNAPSHOT_KEYSPACES_COUNT], chunks_count: 0, bytes_count: 0 };
        ChunkWriter { buffer, trailer, checksum_previous: 0 }
    }

    /// Adds a record; returns the previous chunk if it was full.
    fn record(&mut self, keyspace: SnapshotKeyspace, key: &[u8], value: &[u8]) -> Option<Vec<u8>> {
        let record_size = SNAPSHOT_RECORD_FRAME_SIZE + key.len() + value.len();
        assert!(record_size <= SNAPSHOT_RECORD_SIZE_MAX, "record of {record_size} bytes in {}", keyspace.name());
        let mut full = None;
        if self.buffer.len() + record_size + SNAPSHOT_TRAILER_SIZE > SNAPSHOT_CHUNK_BYTES_MAX {
            let mut next = Vec::with_capacity(SNAPSHOT_CHUNK_BYTES_MAX);
            next.resize(CHUNK_FRAME_SIZE, 0);
            let chunk = std::mem::replace(&mut self.buffer, next);
            full = Some(self.seal(chunk, false));
        }
        self.buffer.push(keyspace as u8);
        self.buffer.extend_from_slice(&u16::try_from(key.len()).expect("key size fits u16").to_le_bytes());
        self.buffer.extend_from_slice(&u32::try_from(value.len()).expect("value size fits u32").to_le_bytes());
        self.buffer.extend_from_slice(key);
        self.buffer.extend_from_slice(value);
        self.trailer.records_counts[keyspace.index()] += 1;
        full
    }

    /// The last chunk, with the trailer, and the image's totals.
    fn finish(mut self) -> (Vec<u8>, SnapshotTrailer) {
        let mut chunk = std::mem::take(&mut self.buffer);
        let totals = SnapshotTrailer {
            records_counts: self.trailer.records_counts,
            chunks_count: self.trailer.chunks_count + 1,
            bytes_count: self.trailer.bytes_count + (chunk.len() + SNAPSHOT_TRAILER_SIZE) as u64,
        };
        snapshot_trailer_encode(&totals, &mut chunk);
        let chunk = self.seal(chunk, true);
        assert_eq!(self.trailer, totals);
        (chunk, totals)
    }

    /// Fills in the frame of a chunk.
    fn seal(&mut self, mut chunk: Vec<u8>, last: bool) -> Vec<u8> {
        assert!(chunk.len() >= CHUNK_FRAME_SIZE && chunk.len() <= SNAPSHOT_CHUNK_BYTES_MAX);
        let sequence = self.trailer.chunks_count;
        let flags = if sequence == 0 { CHUNK_FLAG_FIRST } else { 0 } | if last { CHUNK_FLAG_LAST } else { 0 };
        let body_size = (chunk.len() - CHUNK_FRAME_SIZE) as u32;
        chunk[0..4].copy_from_slice(&CHUNK_MAGIC.to_le_bytes());
        chunk[4..8].copy_from_slice(&flags.to_le_bytes());
        chunk[8..16].copy_from_slice(&sequence.to_le_bytes());
        chunk[16..20].copy_from_slice(&body_size.to_le_bytes());
        chunk[20..24].copy_from_slice(&self.checksum_previous.to_le_bytes());
        let (frame, body) = chunk.split_at(CHUNK_FRAME_SIZE);
        let sealed = checksum(&frame[..CHUNK_FRAME_CHECKED_SIZE], body);
        chunk[24..28].copy_from_slice(&sealed.to_le_bytes());
        self.checksum_previous = sealed;
        self.trailer.chunks_count += 1;
        self.trailer.bytes_count += chunk.len() as u64;
        chunk
    }
}

// ------------------------------------------------------------------------------------------------
// Keyspace options.

/// For keyspaces read by point lookups that mostly miss: bloom filters on every level.
fn options_point_read() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .filter_policy(FilterPolicy::new([
            FilterPolicyEntry::Bloom(BloomConstructionPolicy::FalsePositiveRate(0.0001)),
            FilterPolicyEntry::Bloom(BloomConstructionPolicy::BitsPerKey(10.0)),
        ]))
        .expect_point_read_hits(false)
}

/// For keyspaces that are only range-scanned: filters would never be read.
fn options_scanned() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default().filter_policy(FilterPolicy::disabled())
}

// ------------------------------------------------------------------------------------------------
// Delta checks (pure): the contract of `CheckpointDelta`, checked right before it is written.

/// Panics if the delta is not in the documented order or goes back in time.
fn delta_check(timestamp_last_previous: u64, delta: &CheckpointDelta) {
    let timestamp_last = delta.timestamp_last;
    assert!(
        timestamp_last >= timestamp_last_previous,
        "checkpoint goes back in time: {timestamp_last} < {timestamp_last_previous}"
    );
    let new = |timestamp: u64| timestamp_last_previous < timestamp && timestamp <= timestamp_last;
    for pair in delta.accounts.windows(2) {
        assert!(pair[0].id < pair[1].id, "checkpoint accounts not sorted by id: {} then {}", pair[0].id, pair[1].id);
    }
    for account in &delta.accounts {
        assert!(account.id != 0 && account.id != u128::MAX, "account id {} is reserved", account.id);
        assert!(
            account.timestamp != 0 && account.timestamp <= timestamp_last,
            "account {} timestamp out of range",
            account.id
        );
    }
    for pair in delta.transfers.windows(2) {
        assert!(pair[0].timestamp < pair[1].timestamp, "checkpoint transfers not in timestamp order");
    }
    for transfer in &delta.transfers {
        assert!(transfer.id != 0 && transfer.id != u128::MAX, "transfer id {} is reserved", transfer.id);
        assert!(new(transfer.timestamp), "transfer {} timestamp {} is not new", transfer.id, transfer.timestamp);
    }
    for pair in delta.pending_statuses.windows(2) {
        assert!(pair[0].0 < pair[1].0, "checkpoint pending statuses not sorted by id");
    }
    for balance in &delta.balances {
        assert!(new(balance.timestamp), "balance of {} timestamp {} is not new", balance.account_id, balance.timestamp);
    }
    // In timestamp order, one balance per account and timestamp. A timestamp
    // is one transfer or one expiry, which touches at most two accounts.
    for pair in delta.balances.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert!(before.timestamp <= after.timestamp, "checkpoint balances not in timestamp order");
        assert!(
            before.timestamp != after.timestamp || before.account_id != after.account_id,
            "two balances of {} at {}",
            after.account_id,
            after.timestamp
        );
    }
    for triple in delta.balances.windows(3) {
        assert!(triple[0].timestamp != triple[2].timestamp, "three balances at {}", triple[0].timestamp);
    }
}

/// The ids of `transfers` in order, each with its index in `transfers`.
/// Panics if an id is there twice: a transfer is written once, ever.
fn transfers_sorted_by_id(transfers: &[Transfer]) -> Vec<(u128, u32)> {
    let count = u32::try_from(transfers.len()).expect("checkpoint transfers fit u32");
    let mut by_id: Vec<(u128, u32)> = transfers.iter().map(|t| t.id).zip(0..count).collect();
    by_id.sort_unstable();
    for pair in by_id.windows(2) {
        assert!(pair[0].0 != pair[1].0, "transfer {} is twice in one checkpoint", pair[0].0);
    }
    by_id
}

/// How many batch items `apply_checkpoint` writes for `delta`.
/// Where a record producer puts each (key, value) of a checkpoint, in key
/// order: into the checkpoint's batch, or into an ingestion.
type RecordPut<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError> + 'a;

/// Adds one record to a checkpoint's batch (a record producer's `put`).
fn batch_put(batch: &mut OwnedWriteBatch, keyspace: &Keyspace, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
    batch.insert(keyspace, key, value);
    Ok(())
}

/// The `account_transfers` records of a delta, in key order: every transfer
/// under its debit and its credit account (once if they are the same).
fn account_transfers_records(transfers: &[Transfer], put: &mut RecordPut<'_>) -> Result<(), StoreError> {
    // (account id, timestamp, transfer id, side): the transfer id is copied
    // in because reading it from `transfers` in key order would miss the cache.
    let mut entries: Vec<(u128, u64, u128, u8)> = Vec::with_capacity(transfers.len() * 2);
    for transfer in transfers {
        let (debit, credit) = (transfer.debit_account_id, transfer.credit_account_id);
        if debit == credit {
            entries.push((debit, transfer.timestamp, transfer.id, SIDE_DEBIT | SIDE_CREDIT));
        } else {
            entries.push((debit, transfer.timestamp, transfer.id, SIDE_DEBIT));
            entries.push((credit, transfer.timestamp, transfer.id, SIDE_CREDIT));
        }
    }
    // Timestamps are unique across transfers (checked), so keys are unique.
    entries.sort_unstable_by_key(|(account_id, timestamp, _, _)| (*account_id, *timestamp));
    let mut payload = [0u8; INDEX_SIZE];
    for (account_id, timestamp, id, side) in entries {
        let key = history_key(account_id, timestamp);
        payload[..16].copy_from_slice(&id.to_le_bytes());
        payload[16] = side;
        put(&key, &seal::<INDEX_SIZE, INDEX_VALUE_SIZE>(&key, &payload))?;
    }
    Ok(())
}

/// The `balances` records of a delta, in key order.
fn balances_records(balances: &[AccountBalance], put: &mut RecordPut<'_>) -> Result<(), StoreError> {
    let mut by_key: Vec<&AccountBalance> = balances.iter().collect();
    by_key.sort_unstable_by_key(|balance| (balance.account_id, balance.timestamp));
    for balance in by_key {
        let key = history_key(balance.account_id, balance.timestamp);
        let payload = balance_encode(balance);
        put(&key, &seal::<BALANCE_SIZE, BALANCE_VALUE_SIZE>(&key, &payload))?;
    }
    Ok(())
}

/// How many records of a delta go to the keyspaces that large checkpoints
/// ingest: `transfers`, `account_transfers` and `balances`.
fn delta_immutable_items_count(delta: &CheckpointDelta) -> usize {
    let transfers: usize =
        delta.transfers.iter().map(|t| if t.debit_account_id == t.credit_account_id { 2 } else { 3 }).sum();
    transfers + delta.balances.len()
}

fn delta_items_count(delta: &CheckpointDelta) -> usize {
    // Plus the checkpoint record.
    delta.accounts.len() + delta_immutable_items_count(delta) + 2 * delta.pending_statuses.len() + 1
}

// ------------------------------------------------------------------------------------------------
// Record encoding. Every value is `payload ++ crc32c(key ++ payload)`.

fn checksum(key: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(key), payload)
}

/// `payload` followed by its checksum. `VALUE` must be `PAYLOAD + CHECKSUM_SIZE`.
fn seal<const PAYLOAD: usize, const VALUE: usize>(key: &[u8], payload: &[u8; PAYLOAD]) -> [u8; VALUE] {
    assert_eq!(VALUE, PAYLOAD + CHECKSUM_SIZE);
    let mut value = [0u8; VALUE];
    value[..PAYLOAD].copy_from_slice(payload);
    value[PAYLOAD..].copy_from_slice(&checksum(key, payload).to_le_bytes());
    value
}

/// The payload of a value read back, after checking its size and checksum.
fn unseal<'a>(
    keyspace: &'static str,
    key: &[u8],
    value: &'a [u8],
    payload_size: usize,
) -> Result<&'a [u8], StoreError> {
    if value.len() != payload_size + CHECKSUM_SIZE {
        return Err(corrupt(
            keyspace,
            key,
            format!("value is {} bytes, expected {}", value.len(), payload_size + CHECKSUM_SIZE),
        ));
    }
    let (payload, stored) = value.split_at(payload_size);
    let stored = u32::from_le_bytes(stored.try_into().expect("checksum size"));
    let computed = checksum(key, payload);
    if stored != computed {
        return Err(corrupt(keyspace, key, format!("checksum {stored:#010x}, computed {computed:#010x}")));
    }
    Ok(payload)
}

fn corrupt(keyspace: &'static str, key: &[u8], reason: String) -> StoreError {
    let mut key_hex = String::with_capacity(key.len() * 2);
    for byte in key {
        write!(key_hex, "{byte:02x}").expect("writing to a String");
    }
    StoreError::Corrupt { keyspace, key: key_hex, reason }
}

fn fatal_read(keyspace: &'static str, error: &fjall::Error) -> ! {
    panic!(
        "reading the history store (keyspace {keyspace}) failed: {error}; the ledger cannot answer without its history"
    )
}

fn history_key(account_id: u128, timestamp: u64) -> [u8; HISTORY_KEY_SIZE] {
    let mut key = [0u8; HISTORY_KEY_SIZE];
    key[..16].copy_from_slice(&account_id.to_be_bytes());
    key[16..].copy_from_slice(&timestamp.to_be_bytes());
    key
}

fn history_key_decode(keyspace: &'static str, key: &[u8]) -> Result<(u128, u64), StoreError> {
    let Ok(key_fixed) = <[u8; HISTORY_KEY_SIZE]>::try_from(key) else {
        return Err(corrupt(keyspace, key, format!("key is {} bytes, expected {HISTORY_KEY_SIZE}", key.len())));
    };
    let account_id = u128::from_be_bytes(key_fixed[..16].try_into().expect("16 bytes"));
    let timestamp = u64::from_be_bytes(key_fixed[16..].try_into().expect("8 bytes"));
    Ok((account_id, timestamp))
}

fn id_key_decode(keyspace: &'static str, key: &[u8]) -> Result<u128, StoreError> {
    let Ok(key_fixed) = <[u8; ID_KEY_SIZE]>::try_from(key) else {
        return Err(corrupt(keyspace, key, format!("key is {} bytes, expected {ID_KEY_SIZE}", key.len())));
    };
    Ok(u128::from_be_bytes(key_fixed))
}

fn account_decode(key: &[u8], value: &[u8]) -> Result<Account, StoreError> {
    let id = id_key_decode(KEYSPACE_ACCOUNTS, key)?;
    let payload = unseal(KEYSPACE_ACCOUNTS, key, value, RECORD_SIZE)?;
    let account = Account::decode(payload.try_into().expect("record size"));
    if account.id != id {
        return Err(corrupt(KEYSPACE_ACCOUNTS, key, format!("holds account {}", account.id)));
    }
    Ok(account)
}

fn transfer_decode(key: &[u8], value: &[u8]) -> Result<Transfer, StoreError> {
    let id = id_key_decode(KEYSPACE_TRANSFERS, key)?;
    let payload = unseal(KEYSPACE_TRANSFERS, key, value, RECORD_SIZE)?;
    let transfer = Transfer::decode(payload.try_into().expect("record size"));
    if transfer.id != id {
        return Err(corrupt(KEYSPACE_TRANSFERS, key, format!("holds transfer {}", transfer.id)));
    }
    Ok(transfer)
}

fn pending_status_decode(key: &[u8], value: &[u8]) -> Result<PendingStatus, StoreError> {
    id_key_decode(KEYSPACE_PENDING_STATUS, key)?;
    let payload = unseal(KEYSPACE_PENDING_STATUS, key, value, 1)?;
    PendingStatus::from_u8(payload[0])
        .ok_or_else(|| corrupt(KEYSPACE_PENDING_STATUS, key, format!("unknown status {}", payload[0])))
}

fn balance_encode(balance: &AccountBalance) -> [u8; BALANCE_SIZE] {
    let mut payload = [0u8; BALANCE_SIZE];
    let fields = [
        balance.account_id,
        balance.debits_pending,
        balance.debits_posted,
        balance.credits_pending,
        balance.credits_posted,
    ];
    for (chunk, field) in payload.chunks_exact_mut(16).zip(fields) {
        chunk.copy_from_slice(&field.to_le_bytes());
    }
    payload[80..].copy_from_slice(&balance.timestamp.to_le_bytes());
    payload
}

fn balance_decode(key: &[u8], value: &[u8]) -> Result<AccountBalance, StoreError> {
    let (account_id, timestamp) = history_key_decode(KEYSPACE_BALANCES, key)?;
    let payload = unseal(KEYSPACE_BALANCES, key, value, BALANCE_SIZE)?;
    let field = |index: usize| u128::from_le_bytes(payload[index * 16..index * 16 + 16].try_into().expect("16 bytes"));
    let balance = AccountBalance {
        account_id: field(0),
        debits_pending: field(1),
        debits_posted: field(2),
        credits_pending: field(3),
        credits_posted: field(4),
        timestamp: u64::from_le_bytes(payload[80..].try_into().expect("8 bytes")),
    };
    if balance.account_id != account_id || balance.timestamp != timestamp {
        return Err(corrupt(
            KEYSPACE_BALANCES,
            key,
            format!("holds balance of {} at {}", balance.account_id, balance.timestamp),
        ));
    }
    Ok(balance)
}

fn consensus_encode(consensus: &[u8]) -> Vec<u8> {
    assert!(consensus.len() <= CONSENSUS_BYTES_MAX);
    let mut value = Vec::with_capacity(consensus.len() + CHECKSUM_SIZE);
    value.extend_from_slice(consensus);
    value.extend_from_slice(&checksum(KEY_CONSENSUS, consensus).to_le_bytes());
    value
}

fn consensus_decode(value: &[u8]) -> Result<Vec<u8>, StoreError> {
    let size = value.len().saturating_sub(CHECKSUM_SIZE);
    if size > CONSENSUS_BYTES_MAX {
        return Err(corrupt(KEYSPACE_META, KEY_CONSENSUS, format!("consensus metadata of {size} bytes")));
    }
    Ok(unseal(KEYSPACE_META, KEY_CONSENSUS, value, size)?.to_vec())
}

fn store_name_check(name: &str) -> Result<(), StoreError> {
    if name.len() > STORE_NAME_BYTES_MAX {
        return Err(StoreError::InvalidName { name: name.to_string(), reason: "store name too long" });
    }
    if name.starts_with(KEYSPACE_DROP_GUARD_PREFIX) {
        return Err(StoreError::InvalidName { name: name.to_string(), reason: "store name of a drop guard" });
    }
    Ok(())
}

fn registry_key_check(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > REGISTRY_KEY_BYTES_MAX {
        return Err(StoreError::InvalidName { name: key.to_string(), reason: "registry key empty or too long" });
    }
    Ok(())
}

fn checkpoint_encode(checkpoint: &Checkpoint) -> [u8; CHECKPOINT_VALUE_SIZE] {
    let mut payload = [0u8; CHECKPOINT_SIZE];
    payload[..4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    payload[4..12].copy_from_slice(&checkpoint.op.to_le_bytes());
    payload[12..].copy_from_slice(&checkpoint.timestamp_last.to_le_bytes());
    seal(KEY_CHECKPOINT, &payload)
}

fn checkpoint_decode(value: &[u8]) -> Result<Checkpoint, StoreError> {
    let payload = unseal(KEYSPACE_META, KEY_CHECKPOINT, value, CHECKPOINT_SIZE)?;
    let version = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(StoreError::FormatVersion { found: version, expected: FORMAT_VERSION });
    }
    Ok(Checkpoint {
        op: u64::from_le_bytes(payload[4..12].try_into().expect("8 bytes")),
        timestamp_last: u64::from_le_bytes(payload[12..].try_into().expect("8 bytes")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_value_round_trips_and_detects_damage() {
        let key = 7u128.to_be_bytes();
        let value: [u8; STATUS_VALUE_SIZE] = seal(&key, &[PendingStatus::Posted as u8]);
        assert_eq!(pending_status_decode(&key, &value).unwrap(), PendingStatus::Posted);
        for bit in 0..STATUS_VALUE_SIZE * 8 {
            let mut damaged = value;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(pending_status_decode(&key, &damaged), Err(StoreError::Corrupt { .. })), "bit {bit}");
        }
        // The same value under another key is caught too.
        let other = 8u128.to_be_bytes();
        assert!(matches!(pending_status_decode(&other, &value), Err(StoreError::Corrupt { .. })));
        assert!(matches!(pending_status_decode(&key, &value[..4]), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn balance_round_trips() {
        let balance = AccountBalance {
            account_id: 1 << 100 | 3,
            debits_pending: 1,
            debits_posted: 2,
            credits_pending: 3,
            credits_posted: u128::MAX,
            timestamp: 99,
        };
        let key = history_key(balance.account_id, balance.timestamp);
        let value: [u8; BALANCE_VALUE_SIZE] = seal(&key, &balance_encode(&balance));
        assert_eq!(balance_decode(&key, &value).unwrap(), balance);
        let wrong_key = history_key(balance.account_id, 100);
        assert!(matches!(balance_decode(&wrong_key, &value), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn checkpoint_round_trips_and_checks_version() {
        let checkpoint = Checkpoint { op: 5, timestamp_last: 1 << 40 };
        let value = checkpoint_encode(&checkpoint);
        assert_eq!(checkpoint_decode(&value).unwrap(), checkpoint);
        let mut payload = [0u8; CHECKPOINT_SIZE];
        payload.copy_from_slice(&value[..CHECKPOINT_SIZE]);
        payload[..4].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let future: [u8; CHECKPOINT_VALUE_SIZE] = seal(KEY_CHECKPOINT, &payload);
        assert!(matches!(
            checkpoint_decode(&future),
            Err(StoreError::FormatVersion { found, expected: FORMAT_VERSION }) if found == FORMAT_VERSION + 1
        ));
    }

    #[test]
    fn history_keys_sort_by_account_then_timestamp() {
        let keys = [
            history_key(1, u64::MAX),
            history_key(2, 0),
            history_key(2, 1),
            history_key(2, 256),
            history_key(1 << 64, 0),
        ];
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(history_key_decode(KEYSPACE_BALANCES, &keys[3]).unwrap(), (2, 256));
    }

    #[test]
    fn delta_check_refuses_bad_balances() {
        let balance = |account_id: u128, timestamp: u64| AccountBalance { account_id, timestamp, ..Default::default() };
        let delta =
            |balances: Vec<AccountBalance>| CheckpointDelta { balances, timestamp_last: 10, ..Default::default() };
        let refused =
            |previous: u64, delta: &CheckpointDelta| std::panic::catch_unwind(|| delta_check(previous, delta)).is_err();
        assert!(!refused(0, &delta(vec![balance(1, 1), balance(2, 1), balance(1, 2), balance(1, 10)])));
        assert!(refused(0, &delta(vec![balance(1, 1), balance(1, 1)])), "twice");
        assert!(refused(0, &delta(vec![balance(1, 1), balance(2, 1), balance(3, 1)])), "three at once");
        assert!(refused(0, &delta(vec![balance(1, 2), balance(2, 1)])), "out of order");
        assert!(refused(0, &delta(vec![balance(1, 11)])), "after timestamp_last");
        assert!(refused(5, &delta(vec![balance(1, 5)])), "not after the previous checkpoint");
    }

    #[test]
    fn chunk_writer_splits_at_the_limit_and_frames_round_trip() {
        let checkpoint = Checkpoint { op: 9, timestamp_last: 1 << 33 };
        let consensus = b"term 3".to_vec();
        let mut writer = ChunkWriter::new(&checkpoint, &consensus);
        let value = [7u8; RECORD_VALUE_SIZE];
        let record_size = SNAPSHOT_RECORD_FRAME_SIZE + ID_KEY_SIZE + RECORD_VALUE_SIZE;
        let records_count = 3 * SNAPSHOT_CHUNK_BYTES_MAX / record_size;
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        for index in 0..records_count {
            chunks.extend(writer.record(SnapshotKeyspace::Transfers, &(index as u128).to_be_bytes(), &value));
        }
        let (last, totals) = writer.finish();
        chunks.push(last);
        assert!(chunks.len() >= 4);
        assert_eq!(totals.chunks_count, chunks.len() as u64);
        assert_eq!(totals.bytes_count, chunks.iter().map(|chunk| chunk.len() as u64).sum::<u64>());
        assert_eq!(totals.records_counts, [0, records_count as u64, 0, 0, 0, 0]);
        let mut chain = 0;
        let mut records = 0;
        for (sequence, chunk) in chunks.iter().enumerate() {
            assert!(chunk.len() <= SNAPSHOT_CHUNK_BYTES_MAX);
            let (frame, mut body) = chunk_frame_decode(chunk).unwrap();
            let last = sequence + 1 == chunks.len();
            assert_eq!((frame.sequence, frame.chain), (sequence as u64, chain));
            assert_eq!(frame.flags & CHUNK_FLAG_FIRST != 0, sequence == 0);
            assert_eq!(frame.flags & CHUNK_FLAG_LAST != 0, last);
            chain = frame.checksum;
            if sequence == 0 {
                let (decoded, decoded_consensus, header_size) = snapshot_header_decode(body).unwrap();
                assert_eq!((decoded, decoded_consensus), (checkpoint, consensus.clone()));
                body = &body[header_size..];
            }
            if last {
                let (records_part, trailer) = body.split_at(body.len() - SNAPSHOT_TRAILER_SIZE);
                assert_eq!(snapshot_trailer_decode(trailer), totals);
                body = records_part;
            } else {
                // Full: no room for another record and the trailer.
                assert!(chunk.len() + record_size + SNAPSHOT_TRAILER_SIZE > SNAPSHOT_CHUNK_BYTES_MAX);
            }
            assert_eq!(body.len() % record_size, 0);
            records += body.len() / record_size;
        }
        assert_eq!(records, records_count);
    }

    #[test]
    fn chunk_frame_detects_every_bit_flip() {
        let (chunk, _) = ChunkWriter::new(&Checkpoint { op: 1, timestamp_last: 2 }, b"c").finish();
        assert!(chunk_frame_decode(&chunk).is_ok());
        for bit in 0..chunk.len() * 8 {
            let mut damaged = chunk.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(chunk_frame_decode(&damaged).is_err(), "bit {bit}");
        }
        for size in 0..chunk.len() {
            assert!(chunk_frame_decode(&chunk[..size]).is_err(), "cut to {size}");
        }
    }

    #[test]
    fn snapshot_header_refuses_bad_headers() {
        let header = |op: u64, timestamp_last: u64, consensus: &[u8]| {
            let mut body = Vec::new();
            snapshot_header_encode(&Checkpoint { op, timestamp_last }, consensus, &mut body);
            body
        };
        let good = header(5, 6, b"meta");
        assert_eq!(
            snapshot_header_decode(&good).unwrap(),
            (Checkpoint { op: 5, timestamp_last: 6 }, b"meta".to_vec(), 32)
        );
        assert!(snapshot_header_decode(&good[..31]).is_err(), "consensus cut");
        assert!(snapshot_header_decode(&good[..10]).is_err(), "header cut");
        assert!(snapshot_header_decode(&header(0, 6, b"")).is_err(), "op 0 with a timestamp");
        assert!(snapshot_header_decode(&header(0, 0, b"x")).is_err(), "op 0 with consensus metadata");
        assert!(snapshot_header_decode(&header(0, 0, b"")).is_ok());
        for (at, value) in
            [(0, SNAPSHOT_FORMAT_VERSION + 1), (4, FORMAT_VERSION + 1), (24, CONSENSUS_BYTES_MAX as u32 + 1)]
        {
            let mut bad = good.clone();
            bad[at..at + 4].copy_from_slice(&value.to_le_bytes());
            assert!(snapshot_header_decode(&bad).is_err(), "field at {at}");
        }
    }

    #[test]
    fn snapshot_record_check_refuses_bad_records() {
        let key = history_key(3, 10);
        let index = |side: u8| {
            let mut payload = [0u8; INDEX_SIZE];
            payload[16] = side;
            seal::<INDEX_SIZE, INDEX_VALUE_SIZE>(&key, &payload)
        };
        let check = |value: &[u8], timestamp_last: u64| {
            snapshot_record_check(SnapshotKeyspace::AccountTransfers, &key, value, timestamp_last)
        };
        assert!(check(&index(SIDE_DEBIT), 10).is_ok());
        assert!(check(&index(SIDE_DEBIT | SIDE_CREDIT), 10).is_ok());
        assert!(matches!(check(&index(0), 10), Err(StoreError::Corrupt { .. })), "no side");
        assert!(matches!(check(&index(4), 10), Err(StoreError::Corrupt { .. })), "unknown side");
        assert!(matches!(check(&index(SIDE_DEBIT), 9), Err(StoreError::Corrupt { .. })), "after the checkpoint");
        // A value sealed under another key, in another keyspace, of another size.
        let other = history_key(3, 11);
        let moved = seal::<INDEX_SIZE, INDEX_VALUE_SIZE>(&other, &[1; INDEX_SIZE]);
        assert!(matches!(check(&moved, 20), Err(StoreError::Corrupt { .. })));
        let status = seal::<1, STATUS_VALUE_SIZE>(&key[..16], &[PendingStatus::Pending as u8]);
        assert!(snapshot_record_check(SnapshotKeyspace::PendingStatus, &key[..16], &status, 0).is_ok());
        assert!(snapshot_record_check(SnapshotKeyspace::PendingStatus, &key, &status, 0).is_err(), "history key");
        assert!(snapshot_record_check(SnapshotKeyspace::OpenPending, &key[..16], &status, 0).is_err(), "size");
    }

    #[test]
    fn delta_items_count_matches_layout() {
        let transfer = |id: u128, debit: u128, credit: u128| Transfer {
            id,
            debit_account_id: debit,
            credit_account_id: credit,
            timestamp: id as u64,
            ..Transfer::default()
        };
        let delta = CheckpointDelta {
            accounts: vec![Account { id: 1, timestamp: 1, ..Account::default() }],
            transfers: vec![transfer(2, 1, 3), transfer(3, 1, 1)],
            pending_statuses: vec![(2, PendingStatus::Pending)],
            balances: vec![],
            timestamp_last: 3,
        };
        assert_eq!(delta_items_count(&delta), 1 + 3 + 2 + 2 + 1);
    }
}
