//! The write-ahead log's record format: one record per write request.
//!
//! ```text
//! offset  size  field
//!      0     1  kind (1 create_accounts, 2 create_transfers, 3 pulse,
//!                 4 routing change, 5 shard ownership, 6 cross-cell
//!                 messages, 7 create_transfers naming cells, 8 ledger
//!                 definition, 9 adopted ledger definitions, 10
//!                 topology change)
//!      1     3  reserved, zero
//!      4     4  event count (u32 LE); 0 for kinds 3 to 6 and 8 to 10
//!      8     8  timestamp the ledger applied the request with (u64 LE, ns)
//!     16  128n  events, each in the ledger's 128-byte encoding
//! ```
//!
//! Kinds 4 and 5 are operator changes, with a fixed body after the header:
//!
//! ```text
//! 4 routing change (the global cell's log)     5 shard ownership (a cell's log)
//!     16     8  expected table version            16     4  shard (u32 LE)
//!     24     4  shard (u32 LE)                     20     1  owned (0 released, 1 acquired)
//!     28     4  reserved, zero                     21     3  reserved, zero
//!     32     8  the cell it moves to (u64 LE)
//! ```
//!
//! Kind 7 is `create_transfers` where some accounts are in other cells:
//! after the events, each event's (debit account's cell, credit account's
//! cell), u64 LE each, as the leader's routing table said when it proposed
//! (the log, not a later table, decides where each leg goes). Kind 6 holds
//! cross-cell messages a cell's leader received: the sending cell (u64 LE)
//! and the items (`cross_cell::encode_items`).
//!
//! Kinds 8 and 9 carry ledger definitions (`cluster::ledgers`). Kind 8, in
//! the global cell's log, defines one ledger if the definitions are still at
//! the expected version: expected version (u64 LE), ledger id (u32 LE), asset
//! scale (u8), name length L (u8), 2 reserved zero bytes, the name (L bytes).
//! Kind 9, in a cell's log, is the global cell's definitions as the cell's
//! leader read them (`LedgerTable::encode`), adopted if newer than the cell's.
//!
//! Kind 10, in the global cell's log, changes the topology if it is still at
//! the expected version: expected version (u64 LE), then the new topology's
//! text (`Topology::to_toml`, UTF-8, up to the end of the record), parsed and
//! checked when applied (`cluster::topology_table`).
//!
//! The timestamp is recorded so that replay applies every request exactly as
//! it was applied the first time: the ledger is deterministic given its input.

use cellpay_cluster::ledgers::{LedgerDefinition, LedgerTable, LEDGER_NAME_BYTES_MAX};
use cellpay_cluster::routing::RoutingChange;
use cellpay_cluster::topology::CellId;
use cellpay_ledger::{Account, Transfer, BATCH_EVENTS_MAX, RECORD_SIZE};

use crate::cross_cell::{self, Item};

pub const HEADER_SIZE: usize = 16;
/// The largest record payload: a full batch.
pub const PAYLOAD_SIZE_MAX: usize = HEADER_SIZE + BATCH_EVENTS_MAX * RECORD_SIZE;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    CreateAccounts {
        timestamp: u64,
        accounts: Vec<Account>,
    },
    CreateTransfers {
        timestamp: u64,
        transfers: Vec<Transfer>,
    },
    /// Expire due pending transfers.
    Pulse {
        timestamp: u64,
    },
    /// Change the routing table (the global cell), if it is still at `expected_version`.
    ChangeRouting {
        timestamp: u64,
        expected_version: u64,
        change: RoutingChange,
    },
    /// Release (`owned: false`) or acquire a shard (a cell). A cell serves
    /// the accounts of the shards its own log says it owns.
    ShardOwnership {
        timestamp: u64,
        shard: u32,
        owned: bool,
    },
    /// Cross-cell messages from cell `from` (see `cross_cell`).
    CrossCell {
        timestamp: u64,
        from: CellId,
        items: Vec<Item>,
    },
    /// Transfers some of whose accounts are in other cells: each event's
    /// (debit account's cell, credit account's cell).
    CreateTransfersAcross {
        timestamp: u64,
        transfers: Vec<Transfer>,
        cells: Vec<(CellId, CellId)>,
    },
    /// Define a ledger (the global cell), if the definitions are still at `expected_version`.
    DefineLedger {
        timestamp: u64,
        expected_version: u64,
        definition: LedgerDefinition,
    },
    /// The global cell's ledger definitions, for a cell to adopt if newer than its own.
    AdoptLedgers {
        timestamp: u64,
        table: LedgerTable,
    },
    /// Change the topology (the global cell) to `text`, if it is still at `expected_version`.
    ChangeTopology {
        timestamp: u64,
        expected_version: u64,
        text: String,
    },
}

const KIND_CREATE_ACCOUNTS: u8 = 1;
const KIND_CREATE_TRANSFERS: u8 = 2;
const KIND_PULSE: u8 = 3;
const KIND_CHANGE_ROUTING: u8 = 4;
const KIND_SHARD_OWNERSHIP: u8 = 5;
const KIND_CROSS_CELL: u8 = 6;
const KIND_CREATE_TRANSFERS_ACROSS: u8 = 7;
const KIND_DEFINE_LEDGER: u8 = 8;
const KIND_ADOPT_LEDGERS: u8 = 9;
const KIND_CHANGE_TOPOLOGY: u8 = 10;
const DEFINE_LEDGER_FIXED: usize = 16;
const CHANGE_ROUTING_BODY: usize = 24;
const SHARD_OWNERSHIP_BODY: usize = 8;

/// Why a record could not be decoded. The log checksums every record, so this
/// means a bug or a format change, never a torn write.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record of {size} bytes is shorter than its {HEADER_SIZE}-byte header")]
    Short { size: usize },
    #[error("unknown record kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("record says {count} events but holds {size} bytes")]
    SizeMismatch { count: u32, size: usize },
    #[error("record holds {count} events, over the limit of {BATCH_EVENTS_MAX}")]
    TooManyEvents { count: u32 },
    #[error("record of kind {kind} holds {size} bytes, not {expected}")]
    BodySize { kind: u8, size: usize, expected: usize },
    #[error("cross-cell record of {size} bytes is malformed")]
    CrossCell { size: usize },
    #[error("topology change record of {size} bytes is malformed")]
    Topology { size: usize },
    #[error("ledger definitions record of {size} bytes is malformed: {reason}")]
    Ledgers { size: usize, reason: String },
}

fn header(out: &mut Vec<u8>, kind: u8, count: usize, timestamp: u64) {
    assert!(count <= BATCH_EVENTS_MAX);
    out.clear();
    out.push(kind);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&timestamp.to_le_bytes());
}

/// Encodes `create_accounts` into `out` (cleared first, so a buffer can be reused).
pub fn encode_create_accounts(out: &mut Vec<u8>, timestamp: u64, accounts: &[Account]) {
    header(out, KIND_CREATE_ACCOUNTS, accounts.len(), timestamp);
    let mut bytes = [0u8; RECORD_SIZE];
    for account in accounts {
        account.encode(&mut bytes);
        out.extend_from_slice(&bytes);
    }
}

/// Encodes `create_transfers` into `out` (cleared first).
pub fn encode_create_transfers(out: &mut Vec<u8>, timestamp: u64, transfers: &[Transfer]) {
    header(out, KIND_CREATE_TRANSFERS, transfers.len(), timestamp);
    let mut bytes = [0u8; RECORD_SIZE];
    for transfer in transfers {
        transfer.encode(&mut bytes);
        out.extend_from_slice(&bytes);
    }
}

/// Encodes a pulse into `out` (cleared first).
pub fn encode_pulse(out: &mut Vec<u8>, timestamp: u64) {
    header(out, KIND_PULSE, 0, timestamp);
}

/// Encodes a routing change into `out` (cleared first).
pub fn encode_change_routing(out: &mut Vec<u8>, timestamp: u64, expected_version: u64, change: RoutingChange) {
    let RoutingChange::MoveShard { shard, to } = change;
    header(out, KIND_CHANGE_ROUTING, 0, timestamp);
    out.extend_from_slice(&expected_version.to_le_bytes());
    out.extend_from_slice(&shard.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&to.to_le_bytes());
}

/// Encodes a shard's release or acquisition into `out` (cleared first).
pub fn encode_shard_ownership(out: &mut Vec<u8>, timestamp: u64, shard: u32, owned: bool) {
    header(out, KIND_SHARD_OWNERSHIP, 0, timestamp);
    out.extend_from_slice(&shard.to_le_bytes());
    out.extend_from_slice(&[u8::from(owned), 0, 0, 0]);
}

/// Encodes cross-cell messages from cell `from` into `out` (cleared first).
pub fn encode_cross_cell(out: &mut Vec<u8>, timestamp: u64, from: CellId, items: &[Item]) {
    header(out, KIND_CROSS_CELL, 0, timestamp);
    out.extend_from_slice(&from.to_le_bytes());
    cross_cell::encode_items(out, items);
}

/// Encodes transfers naming accounts of other cells into `out` (cleared first).
pub fn encode_create_transfers_across(
    out: &mut Vec<u8>,
    timestamp: u64,
    transfers: &[Transfer],
    cells: &[(CellId, CellId)],
) {
    assert_eq!(transfers.len(), cells.len());
    encode_create_transfers(out, timestamp, transfers);
    out[0] = KIND_CREATE_TRANSFERS_ACROSS;
    for &(debit, credit) in cells {
        out.extend_from_slice(&debit.to_le_bytes());
        out.extend_from_slice(&credit.to_le_bytes());
    }
}

/// Encodes a ledger definition into `out` (cleared first).
pub fn encode_define_ledger(out: &mut Vec<u8>, timestamp: u64, expected_version: u64, definition: &LedgerDefinition) {
    assert!(definition.name.len() <= LEDGER_NAME_BYTES_MAX, "a checked definition");
    header(out, KIND_DEFINE_LEDGER, 0, timestamp);
    out.extend_from_slice(&expected_version.to_le_bytes());
    out.extend_from_slice(&definition.id.to_le_bytes());
    out.extend_from_slice(&[definition.asset_scale, definition.name.len() as u8, 0, 0]);
    out.extend_from_slice(definition.name.as_bytes());
}

/// Encodes ledger definitions for a cell to adopt into `out` (cleared first).
pub fn encode_adopt_ledgers(out: &mut Vec<u8>, timestamp: u64, table: &LedgerTable) {
    header(out, KIND_ADOPT_LEDGERS, 0, timestamp);
    out.extend_from_slice(&table.encode());
}

/// Encodes a topology change into `out` (cleared first).
pub fn encode_change_topology(out: &mut Vec<u8>, timestamp: u64, expected_version: u64, text: &str) {
    header(out, KIND_CHANGE_TOPOLOGY, 0, timestamp);
    out.extend_from_slice(&expected_version.to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

pub fn decode(payload: &[u8]) -> Result<Record, RecordError> {
    if payload.len() < HEADER_SIZE {
        return Err(RecordError::Short { size: payload.len() });
    }
    let kind = payload[0];
    let count = u32_at(payload, 4);
    let timestamp = u64_at(payload, 8);
    let body = &payload[HEADER_SIZE..];
    let fixed = |expected: usize| {
        if count != 0 || body.len() != expected {
            return Err(RecordError::BodySize { kind, size: payload.len(), expected: HEADER_SIZE + expected });
        }
        Ok(body)
    };
    match kind {
        KIND_CHANGE_ROUTING => {
            let body = fixed(CHANGE_ROUTING_BODY)?;
            let change = RoutingChange::MoveShard { shard: u32_at(body, 8), to: u64_at(body, 16) };
            return Ok(Record::ChangeRouting { timestamp, expected_version: u64_at(body, 0), change });
        }
        KIND_SHARD_OWNERSHIP => {
            let body = fixed(SHARD_OWNERSHIP_BODY)?;
            return Ok(Record::ShardOwnership { timestamp, shard: u32_at(body, 0), owned: body[4] != 0 });
        }
        KIND_CROSS_CELL => {
            let malformed = RecordError::CrossCell { size: payload.len() };
            if count != 0 || body.len() < 8 {
                return Err(malformed);
            }
            let items = cross_cell::decode_items(&body[8..]).ok_or(malformed)?;
            return Ok(Record::CrossCell { timestamp, from: u64_at(body, 0), items });
        }
        KIND_CHANGE_TOPOLOGY => {
            let malformed = RecordError::Topology { size: payload.len() };
            if count != 0 || body.len() < 8 {
                return Err(malformed);
            }
            let text = String::from_utf8(body[8..].to_vec()).map_err(|_| malformed)?;
            return Ok(Record::ChangeTopology { timestamp, expected_version: u64_at(body, 0), text });
        }
        KIND_DEFINE_LEDGER | KIND_ADOPT_LEDGERS => {
            let malformed = |reason: String| RecordError::Ledgers { size: payload.len(), reason };
            if count != 0 {
                return Err(malformed(format!("{count} events")));
            }
            if kind == KIND_ADOPT_LEDGERS {
                let table = LedgerTable::decode(body).map_err(|error| malformed(error.to_string()))?;
                return Ok(Record::AdoptLedgers { timestamp, table });
            }
            let (fixed, name) =
                body.split_at_checked(DEFINE_LEDGER_FIXED).ok_or_else(|| malformed("truncated".to_string()))?;
            if name.len() != usize::from(fixed[13]) {
                return Err(malformed(format!("a name of {} bytes, not {}", name.len(), fixed[13])));
            }
            let name = String::from_utf8(name.to_vec()).map_err(|_| malformed("name is not UTF-8".to_string()))?;
            let definition = LedgerDefinition { id: u32_at(fixed, 8), name, asset_scale: fixed[12] };
            return Ok(Record::DefineLedger { timestamp, expected_version: u64_at(fixed, 0), definition });
        }
        _ => {}
    }
    if count as usize > BATCH_EVENTS_MAX {
        return Err(RecordError::TooManyEvents { count });
    }
    let cells_size = if kind == KIND_CREATE_TRANSFERS_ACROSS { count as usize * 16 } else { 0 };
    if body.len() != count as usize * RECORD_SIZE + cells_size {
        return Err(RecordError::SizeMismatch { count, size: payload.len() });
    }
    let (body, cells) = body.split_at(count as usize * RECORD_SIZE);
    let events = body.chunks_exact(RECORD_SIZE).map(|chunk| chunk.try_into().expect("128 bytes"));
    match kind {
        KIND_CREATE_ACCOUNTS => {
            Ok(Record::CreateAccounts { timestamp, accounts: events.map(Account::decode).collect() })
        }
        KIND_CREATE_TRANSFERS => {
            Ok(Record::CreateTransfers { timestamp, transfers: events.map(Transfer::decode).collect() })
        }
        KIND_CREATE_TRANSFERS_ACROSS => Ok(Record::CreateTransfersAcross {
            timestamp,
            transfers: events.map(Transfer::decode).collect(),
            cells: cells.chunks_exact(16).map(|pair| (u64_at(pair, 0), u64_at(pair, 8))).collect(),
        }),
        KIND_PULSE if count == 0 => Ok(Record::Pulse { timestamp }),
        KIND_PULSE => Err(RecordError::SizeMismatch { count, size: payload.len() }),
        kind => Err(RecordError::UnknownKind { kind }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut buffer = Vec::new();
        let transfers =
            vec![Transfer { id: 1, amount: 5, ..Transfer::default() }, Transfer { id: 2, ..Transfer::default() }];
        encode_create_transfers(&mut buffer, 42, &transfers);
        assert_eq!(decode(&buffer), Ok(Record::CreateTransfers { timestamp: 42, transfers }));
        let accounts = vec![Account { id: 9, ledger: 1, code: 1, ..Account::default() }];
        encode_create_accounts(&mut buffer, 43, &accounts);
        assert_eq!(decode(&buffer), Ok(Record::CreateAccounts { timestamp: 43, accounts }));
        encode_pulse(&mut buffer, 44);
        assert_eq!(decode(&buffer), Ok(Record::Pulse { timestamp: 44 }));
        let change = RoutingChange::MoveShard { shard: 42, to: 3 };
        encode_change_routing(&mut buffer, 45, 7, change);
        assert_eq!(decode(&buffer), Ok(Record::ChangeRouting { timestamp: 45, expected_version: 7, change }));
        for owned in [false, true] {
            encode_shard_ownership(&mut buffer, 46, 99, owned);
            assert_eq!(decode(&buffer), Ok(Record::ShardOwnership { timestamp: 46, shard: 99, owned }));
        }
        let transfers =
            vec![Transfer { id: 3, amount: 7, ..Transfer::default() }, Transfer { id: 4, ..Transfer::default() }];
        let cells = vec![(1, 2), (2, 2)];
        encode_create_transfers_across(&mut buffer, 47, &transfers, &cells);
        assert_eq!(decode(&buffer), Ok(Record::CreateTransfersAcross { timestamp: 47, transfers, cells }));
        let items = vec![
            Item::Try {
                op: 3,
                deadline: 9,
                events: vec![Transfer { id: 3, ..Transfer::default() }],
                cells: vec![(1, 2)],
            },
            Item::Decide { op: 3, confirm: true, deadline: 9 },
            Item::Prepared { op: 3 },
            Item::Refused { op: 3, event: 1, code: 34 },
            Item::Done { op: 3 },
            Item::Ask { op: 3 },
            Item::Timeout { op: 3 },
        ];
        encode_cross_cell(&mut buffer, 48, 2, &items);
        assert_eq!(decode(&buffer), Ok(Record::CrossCell { timestamp: 48, from: 2, items }));
        buffer.push(0);
        assert!(matches!(decode(&buffer), Err(RecordError::CrossCell { .. })));
        let definition = LedgerDefinition { id: 840, name: "USD".to_string(), asset_scale: 2 };
        encode_define_ledger(&mut buffer, 49, 3, &definition);
        assert_eq!(decode(&buffer), Ok(Record::DefineLedger { timestamp: 49, expected_version: 3, definition }));
        buffer.push(b'X');
        assert!(matches!(decode(&buffer), Err(RecordError::Ledgers { .. })));
        let table = LedgerTable::initial(&[LedgerDefinition::local()]).unwrap();
        encode_adopt_ledgers(&mut buffer, 50, &table);
        assert_eq!(decode(&buffer), Ok(Record::AdoptLedgers { timestamp: 50, table }));
        buffer.pop();
        assert!(matches!(decode(&buffer), Err(RecordError::Ledgers { .. })));
        let text = "shards = 100\n".to_string();
        encode_change_topology(&mut buffer, 51, 4, &text);
        assert_eq!(decode(&buffer), Ok(Record::ChangeTopology { timestamp: 51, expected_version: 4, text }));
        buffer.push(0xff);
        assert!(matches!(decode(&buffer), Err(RecordError::Topology { .. })));
    }

    #[test]
    fn malformed_records_are_errors() {
        assert_eq!(decode(&[1, 0, 0]), Err(RecordError::Short { size: 3 }));
        let mut buffer = Vec::new();
        encode_pulse(&mut buffer, 1);
        buffer[0] = 99;
        assert_eq!(decode(&buffer), Err(RecordError::UnknownKind { kind: 99 }));
        encode_create_transfers(&mut buffer, 1, &[Transfer::default()]);
        buffer.pop();
        assert!(matches!(decode(&buffer), Err(RecordError::SizeMismatch { .. })));
        encode_shard_ownership(&mut buffer, 1, 5, true);
        buffer.push(0);
        assert!(matches!(decode(&buffer), Err(RecordError::BodySize { kind: 5, .. })));
    }
}
