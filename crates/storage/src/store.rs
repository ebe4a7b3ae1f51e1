//! The checkpointed history store, on the fjall LSM engine.
//!
//! The ledger keeps its hot state in memory and hands over a [`CheckpointDelta`]
//! at every checkpoint. [`Store::apply_checkpoint`] writes the delta, together
//! with the WAL op it covers, in one atomic and durable write; the store then
//! answers the ledger's [`History`] reads and gives back what a restart needs to
//! rebuild the ledger ([`Store::accounts`], [`Store::open_pending`],
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
//! [`Store::apply_checkpoint`] puts every record of a delta and the new `meta`
//! checkpoint record into one `fjall::OwnedWriteBatch` and commits it with
//! durability `PersistMode::SyncAll`. fjall writes a batch to its journal as a
//! `Start { item_count, seqno }` entry, the items, and an `End(checksum)`
//! entry; recovery replays only complete batches whose checksum holds and
//! truncates a torn last batch, so after a crash either all of a checkpoint
//! (data and op) is there or none of it. All items of a batch get one sequence
//! number and become visible to readers together. The commit fsyncs the
//! journal (`File::sync_all`) before it returns, so a checkpoint is durable
//! when `apply_checkpoint` returns `Ok`. If the commit fails, fjall poisons
//! the database: every later write fails, and the caller must reopen the store
//! (which recovers the last complete checkpoint) before going on. A complete
//! batch whose checksum fails (damage, not a torn tail) makes fjall refuse to
//! open: `Store::open` returns [`StoreError::Engine`], never a partial state.
//! `tests/store_crash.rs` checks all this on torn journal images and by
//! killing a process that is writing checkpoints.
//!
//! # Write path
//!
//! Before writing, `apply_checkpoint` checks the delta against its contract
//! (order, timestamps newer than the last checkpoint, no transfer twice) and
//! looks every new transfer id up (a bloom-filtered miss) to assert it was
//! never checkpointed. It then adds each keyspace's records to the batch in
//! key order: fjall's memtable is a skip list, and in-order inserts run about
//! five times faster than random ones for a million-transfer checkpoint.
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
/// checkpoint record). Bounds the memory of one write batch (roughly 150 bytes
/// an item) and stays far below fjall's `u32` batch length.
pub const CHECKPOINT_BATCH_ITEMS_MAX: usize = 8 * 1024 * 1024;

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

const SIDE_DEBIT: u8 = 1 << 0;
const SIDE_CREDIT: u8 = 1 << 1;

const KEY_CHECKPOINT: &[u8] = b"checkpoint";

const KEYSPACE_ACCOUNTS: &str = "accounts";
const KEYSPACE_TRANSFERS: &str = "transfers";
const KEYSPACE_PENDING_STATUS: &str = "pending_status";
const KEYSPACE_OPEN_PENDING: &str = "open_pending";
const KEYSPACE_ACCOUNT_TRANSFERS: &str = "account_transfers";
const KEYSPACE_BALANCES: &str = "balances";
const KEYSPACE_META: &str = "meta";

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
#[derive(Clone)]
pub struct StoreDatabase {
    db: Database,
    dir: PathBuf,
}

impl StoreDatabase {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<StoreDatabase, StoreError> {
        let db = Database::builder(dir).cache_size(BLOCK_CACHE_SIZE_BYTES).open()?;
        Ok(StoreDatabase { db, dir: dir.to_path_buf() })
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
        };
        // Refuses another format, and checks the checkpoint record, before anyone relies on it.
        let checkpoint = store.checkpoint()?;
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

    /// Writes a delta atomically together with the WAL op it covers, and makes
    /// it durable (fsync) before returning. See the module documentation.
    ///
    /// Panics if the delta breaks its contract (a bug in the caller): `op` not
    /// after the last checkpoint's, time going back, records out of order, a
    /// transfer already checkpointed, more than [`CHECKPOINT_BATCH_ITEMS_MAX`]
    /// records. Nothing is written then.
    pub fn apply_checkpoint(&self, op: u64, delta: &CheckpointDelta) -> Result<(), StoreError> {
        let _writer = self.writer.lock().expect("an earlier checkpoint panicked: reopen the store");
        let started = Instant::now();
        let previous = self.checkpoint()?;
        assert!(op > previous.op, "checkpoint op {op} does not follow the last checkpoint's op {}", previous.op);
        delta_check(previous.timestamp_last, delta);
        let items = delta_items_count(delta);
        assert!(items <= CHECKPOINT_BATCH_ITEMS_MAX, "checkpoint of {items} records is over the limit");
        let transfers_by_id = transfers_sorted_by_id(&delta.transfers);
        self.transfers_check_new(&transfers_by_id)?;

        // Each keyspace's records go in in key order: inserting into fjall's
        // memtable (a skip list) in order is several times faster than at random.
        let mut batch = OwnedWriteBatch::with_capacity(self.db.clone(), items).durability(Some(PersistMode::SyncAll));
        self.batch_accounts(&mut batch, &delta.accounts);
        self.batch_transfers(&mut batch, &delta.transfers, &transfers_by_id);
        drop(transfers_by_id);
        self.batch_account_transfers(&mut batch, &delta.transfers);
        self.batch_pending_statuses(&mut batch, &delta.pending_statuses);
        self.batch_balances(&mut batch, &delta.balances);
        let checkpoint = Checkpoint { op, timestamp_last: delta.timestamp_last };
        batch.insert(&self.meta, KEY_CHECKPOINT, checkpoint_encode(&checkpoint));
        assert_eq!(batch.len(), items);
        batch.commit()?;

        // Check the checkpoint record right after it is read back.
        let written = self.checkpoint()?;
        assert_eq!(written, checkpoint, "checkpoint read back differs from the one written");
        tracing::debug!(
            op,
            timestamp_last = delta.timestamp_last,
            accounts = delta.accounts.len(),
            transfers = delta.transfers.len(),
            pending_statuses = delta.pending_statuses.len(),
            balances = delta.balances.len(),
            duration_ms = started.elapsed().as_millis() as u64,
            "checkpoint applied"
        );
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
    /// transfer is written once, ever. Looks the ids up in id order (`by_id`),
    /// which keeps the engine's memtable and block reads local.
    fn transfers_check_new(&self, by_id: &[(u128, u32)]) -> Result<(), StoreError> {
        for (id, _) in by_id {
            let exists = self.transfers.contains_key(id.to_be_bytes())?;
            assert!(!exists, "transfer {id} is already checkpointed");
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

    fn batch_transfers(&self, batch: &mut OwnedWriteBatch, transfers: &[Transfer], by_id: &[(u128, u32)]) {
        let mut payload = [0u8; RECORD_SIZE];
        for (_, index) in by_id {
            let transfer = &transfers[*index as usize];
            let key = transfer.id.to_be_bytes();
            transfer.encode(&mut payload);
            batch.insert(&self.transfers, key, seal::<RECORD_SIZE, RECORD_VALUE_SIZE>(&key, &payload));
        }
    }

    /// Indexes every transfer under its debit and its credit account (once if
    /// they are the same), in key order.
    fn batch_account_transfers(&self, batch: &mut OwnedWriteBatch, transfers: &[Transfer]) {
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
            batch.insert(&self.account_transfers, key, seal::<INDEX_SIZE, INDEX_VALUE_SIZE>(&key, &payload));
        }
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

    fn batch_balances(&self, batch: &mut OwnedWriteBatch, balances: &[AccountBalance]) {
        let mut by_key: Vec<&AccountBalance> = balances.iter().collect();
        by_key.sort_unstable_by_key(|balance| (balance.account_id, balance.timestamp));
        for balance in by_key {
            let key = history_key(balance.account_id, balance.timestamp);
            let payload = balance_encode(balance);
            batch.insert(&self.balances, key, seal::<BALANCE_SIZE, BALANCE_VALUE_SIZE>(&key, &payload));
        }
    }

    /// Reads one checkpointed transfer through `reader`. Panics on engine errors and corrupt data.
    fn transfer_read(&self, reader: &impl Readable, id: u128) -> Option<Transfer> {
        let key = id.to_be_bytes();
        let value = reader.get(&self.transfers, key).unwrap_or_else(|error| fatal_read(KEYSPACE_TRANSFERS, &error));
        value.map(|value| transfer_decode(&key, &value).unwrap_or_else(|error| panic!("{error}")))
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
        let value = self.transfers.get(key).unwrap_or_else(|error| fatal_read(KEYSPACE_TRANSFERS, &error));
        value.map(|value| transfer_decode(&key, &value).unwrap_or_else(|error| panic!("{error}")))
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
        let (min, max) = filter.timestamp_range();
        assert!(min <= max, "filter must be validated: empty timestamp range");
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
        let (min, max) = filter.timestamp_range();
        assert!(min <= max, "filter must be validated: empty timestamp range");
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
fn delta_items_count(delta: &CheckpointDelta) -> usize {
    let transfers: usize =
        delta.transfers.iter().map(|t| if t.debit_account_id == t.credit_account_id { 2 } else { 3 }).sum();
    delta.accounts.len() + transfers + 2 * delta.pending_statuses.len() + delta.balances.len() + 1
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
