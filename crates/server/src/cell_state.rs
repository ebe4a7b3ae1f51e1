//! A cell's replicated state besides its ledger: which shards its own log
//! says it owns, its cross-cell transfers in flight (`cross_cell`), the
//! ledger definitions it has adopted (the global cell's own, which it
//! changes) and, in the global cell, the routing table and the topology.
//!
//! All change only through entries of the cell's log (`record.rs` kinds 4
//! to 10), so every replica holds the same state at the same index; all are
//! stored with each checkpoint (in the consensus metadata, see
//! [`encode_consensus`]) and travel with snapshots.
//!
//! **Ownership is decided by the cell's own log, not by the routing table.**
//! The table (the global cell's) tells routers where to send a request; a
//! cell applies an event only if its log, at that entry, says it owns the
//! shard of every account the event names. A shard moves in three steps, each
//! a log entry: the old owner releases it (refused while it holds an account
//! of the shard), the global cell's table names the new owner (compare and
//! set), the new owner acquires it. At no index do two cells both own a shard,
//! whatever routers believe meanwhile.
//!
//! Encoding of the consensus metadata (integers little-endian):
//!
//! ```text
//! offset  size  field
//!      0     4  magic b"cpCQ"
//!      4     4  length B of the log base record
//!      8     B  the log base record (raft_log's encoding)
//!    8+B     4  shards S
//!   12+B  ⌈S/8⌉ owned shards, one bit each (shard i: byte i/8, bit i%8)
//!      …     …  the cross-cell state (`CrossCellState::encode_into`)
//!      …     4  length D of the ledger definitions
//!      …     D  the ledger definitions (`LedgerTable::encode`)
//!      …     1  1 if a topology follows (the global cell's), else 0
//!      …     4  length T of the topology (if it follows)
//!      …     T  the topology (`TopologyTable::encode`)
//!      …     1  1 if a routing table follows, else 0
//!      …     …  the routing table (its own checksummed encoding)
//! ```
//!
//! Magic b"cpCP" is the same without the topology (stores written before it:
//! the file's applies, at version 1), b"cpCO" also without the ledger
//! definitions (the topology's apply), b"cpCN" also with the cross-cell state written before
//! cross-cell pending transfers (no held legs, holds or releases), and
//! b"cpCM" without the cross-cell state (stores written before cross-cell
//! transfers: none in flight). Stores written before cell
//! states hold the bare log base record; they decode with no cell state (the
//! topology's then applies).

use cellpay_cluster::ledgers::{self, LedgerDefinition, LedgerError, LedgerTable};
use cellpay_cluster::routing::{RoutingChange, RoutingError, RoutingTable};
use cellpay_cluster::topology::{CellId, Topology, GLOBAL_CELL};
use cellpay_cluster::topology_table::{self, TopologyChangeError, TopologyTable};
use cellpay_ledger::id::{is_clearing_account, shard_of_account};
use cellpay_ledger::Ledger;

use crate::cross_cell::CrossCellState;
use crate::raft_log::{self, LogBase, LogRecord};

const MAGIC: [u8; 4] = *b"cpCQ";
/// The format before the topology.
const MAGIC_WITHOUT_TOPOLOGY: [u8; 4] = *b"cpCP";
/// The format before ledger definitions.
const MAGIC_WITHOUT_LEDGERS: [u8; 4] = *b"cpCO";
/// The format before cross-cell pending transfers.
const MAGIC_CROSS_WITHOUT_HOLDS: [u8; 4] = *b"cpCN";
/// The format before cross-cell transfers.
const MAGIC_OWNERSHIP_ONLY: [u8; 4] = *b"cpCM";

// A cell's cross-cell state and ledger definitions, at their largest, and
// the rest (log base record, shard bits: a few KiB) fit the store's
// consensus metadata. The global cell has no cross-cell state, and its
// routing table (8 bytes a shard) is well under the budget left.
const _: () = assert!(
    crate::cross_cell::STATE_BYTES_MAX + ledgers::TABLE_BYTES_MAX + 64 * 1024
        <= cellpay_storage::store::CONSENSUS_BYTES_MAX
);
const _: () = assert!(
    8 * cellpay_cluster::topology::SHARDS_MAX as usize
        + ledgers::TABLE_BYTES_MAX
        + topology_table::TABLE_BYTES_MAX
        + 64 * 1024
        <= cellpay_storage::store::CONSENSUS_BYTES_MAX
);

/// Which of the formats above a state is in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    OwnershipOnly,
    CrossWithoutHolds,
    WithoutLedgers,
    WithoutTopology,
    Current,
}

/// A cell's replicated state besides its ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellState {
    /// Whether the cell owns each shard, by its own log.
    owned: Vec<bool>,
    /// The routing table: the global cell's only.
    routing: Option<RoutingTable>,
    /// The topology, versioned: the global cell's only.
    topology: Option<TopologyTable>,
    /// Cross-cell transfers this cell coordinates or has prepared.
    pub cross: CrossCellState,
    /// The ledgers accounts may be created on: the global cell's definitions
    /// (which it changes), as this cell's log last adopted them.
    ledgers: LedgerTable,
}

/// Why an ownership change was refused (nothing changed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OwnershipError {
    #[error("shard {shard} does not exist: shards are 0 to {last}")]
    UnknownShard { shard: u32, last: u32 },
    #[error("cell {cell} holds {accounts} accounts of shard {shard}: moving accounts is not supported yet")]
    ShardNotEmpty { cell: CellId, shard: u32, accounts: usize },
}

impl CellState {
    /// The state at index 0: the topology's ownership, and its routing table
    /// (version 1) for the global cell.
    pub fn initial(topology: &Topology, cell: CellId) -> CellState {
        let owned = (0..topology.shards).map(|shard| topology.cell_of_shard(shard) == Some(cell)).collect();
        let routing = (cell == GLOBAL_CELL).then(|| RoutingTable::initial(topology));
        let ledgers = topology.initial_ledgers();
        let topology = (cell == GLOBAL_CELL).then(|| TopologyTable::initial(topology));
        CellState { owned, routing, topology, cross: CrossCellState::default(), ledgers }
    }

    pub fn shards(&self) -> u32 {
        self.owned.len() as u32
    }

    pub fn owns(&self, shard: u32) -> bool {
        self.owned.get(shard as usize).copied().unwrap_or(false)
    }

    /// Whether the cell owns the shard of `account`. Clearing accounts
    /// belong to the cell itself, whatever their shard.
    pub fn owns_account(&self, account: u128) -> bool {
        is_clearing_account(account) || self.owns(shard_of_account(account, self.shards()))
    }

    pub fn routing(&self) -> Option<&RoutingTable> {
        self.routing.as_ref()
    }

    /// Releases or acquires a shard. Releasing refuses while the ledger holds
    /// an account of the shard (accounts do not move yet); both are
    /// idempotent. Deterministic: a function of the state and the ledger.
    pub fn set_owned(&mut self, cell: CellId, shard: u32, owned: bool, ledger: &Ledger) -> Result<(), OwnershipError> {
        let last = self.shards() - 1;
        let Some(slot) = self.owned.get_mut(shard as usize) else {
            return Err(OwnershipError::UnknownShard { shard, last });
        };
        if !owned && *slot {
            let accounts = ledger.accounts_in_shard(shard, last + 1);
            if accounts > 0 {
                return Err(OwnershipError::ShardNotEmpty { cell, shard, accounts });
            }
        }
        *slot = owned;
        Ok(())
    }

    /// Applies a routing change to the global cell's table (compare and set).
    pub fn change_routing(
        &mut self,
        expected_version: u64,
        change: RoutingChange,
        topology: &Topology,
    ) -> Result<&RoutingTable, RoutingError> {
        let Some(table) = self.routing.as_mut() else { return Err(RoutingError::NoTable) };
        *table = table.apply(expected_version, change, topology)?;
        Ok(table)
    }

    /// The topology as the global cell's log has it (the global cell's only).
    pub fn topology(&self) -> Option<&TopologyTable> {
        self.topology.as_ref()
    }

    /// Changes the global cell's topology to the one `text` describes
    /// (compare and set; only what may change online). Deterministic: the
    /// text is parsed and checked alike on every replica.
    pub fn change_topology(
        &mut self,
        expected_version: u64,
        text: &str,
    ) -> Result<&TopologyTable, TopologyChangeError> {
        let Some(table) = self.topology.as_mut() else { return Err(TopologyChangeError::NoTable) };
        let next = Topology::parse(text).map_err(TopologyChangeError::Invalid)?;
        *table = table.change(expected_version, next)?;
        Ok(table)
    }

    /// The ledger definitions this cell's log has adopted (the global
    /// cell's: the definitions themselves).
    pub fn ledgers(&self) -> &LedgerTable {
        &self.ledgers
    }

    /// Defines a ledger in the global cell's definitions (compare and set).
    pub fn define_ledger(
        &mut self,
        expected_version: u64,
        definition: LedgerDefinition,
    ) -> Result<&LedgerTable, LedgerError> {
        self.ledgers = self.ledgers.define(expected_version, definition)?;
        Ok(&self.ledgers)
    }

    /// Adopts the global cell's definitions if they are newer than the
    /// cell's (an older or repeated adoption changes nothing). Whether it did.
    pub fn adopt_ledgers(&mut self, table: &LedgerTable) -> bool {
        let newer = table.version() > self.ledgers.version();
        if newer {
            self.ledgers = table.clone();
        }
        newer
    }

    /// A digest of the state, folded into the cell's state hash.
    pub fn hash(&self) -> u64 {
        // FNV-1a over the encoding: stable across processes and versions.
        let mut bytes = Vec::new();
        self.encode_into(&mut bytes);
        bytes
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3))
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.shards().to_le_bytes());
        let mut bits = vec![0u8; self.owned.len().div_ceil(8)];
        for (shard, _) in self.owned.iter().enumerate().filter(|(_, &owned)| owned) {
            bits[shard / 8] |= 1 << (shard % 8);
        }
        out.extend_from_slice(&bits);
        self.cross.encode_into(out);
        let table = self.ledgers.encode();
        out.extend_from_slice(&(table.len() as u32).to_le_bytes());
        out.extend_from_slice(&table);
        match &self.topology {
            Some(topology) => {
                let table = topology.encode();
                out.push(1);
                out.extend_from_slice(&(table.len() as u32).to_le_bytes());
                out.extend_from_slice(&table);
            }
            None => out.push(0),
        }
        match &self.routing {
            Some(table) => {
                out.push(1);
                out.extend_from_slice(&table.encode());
            }
            None => out.push(0),
        }
    }

    /// Decodes a state; what a format has not (ledger definitions, the
    /// global cell's topology) is the `initial` topology's.
    fn decode(bytes: &[u8], format: Format, initial: &Topology) -> Option<CellState> {
        let shards = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let bits = bytes.get(4..4 + shards.div_ceil(8))?;
        let owned = (0..shards).map(|shard| bits[shard / 8] & (1 << (shard % 8)) != 0).collect();
        let rest = &bytes[4 + bits.len()..];
        let (cross, rest) = match format {
            Format::OwnershipOnly => (CrossCellState::default(), rest),
            Format::CrossWithoutHolds => CrossCellState::decode(rest, false)?,
            Format::WithoutLedgers | Format::WithoutTopology | Format::Current => CrossCellState::decode(rest, true)?,
        };
        let (ledgers, rest) = match format {
            Format::WithoutTopology | Format::Current => {
                let (table, rest) = length_prefixed(rest)?;
                (LedgerTable::decode(table).ok()?, rest)
            }
            _ => (initial.initial_ledgers(), rest),
        };
        let (topology, rest) = match format {
            Format::Current => match rest.split_first()? {
                (0, rest) => (None, rest),
                (1, rest) => {
                    let (table, rest) = length_prefixed(rest)?;
                    (Some(TopologyTable::decode(table).ok()?), rest)
                }
                _ => return None,
            },
            _ => (None, rest),
        };
        let routing = match rest.split_first()? {
            (0, []) => None,
            (1, table) => Some(RoutingTable::decode(table).ok()?),
            _ => return None,
        };
        if shards == 0 || routing.as_ref().is_some_and(|table| table.shards() as usize != shards) {
            return None;
        }
        // The global cell (the one with a routing table) holds the topology: the file's, before it was stored.
        let topology = match (format, &routing) {
            (Format::Current, _) => topology,
            (_, Some(_)) => Some(TopologyTable::initial(initial)),
            (_, None) => None,
        };
        if topology.is_some() != routing.is_some() {
            return None;
        }
        Some(CellState { owned, routing, topology, cross, ledgers })
    }
}

/// A u32 LE length, that many bytes, and the rest.
fn length_prefixed(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let length = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let value = bytes.get(4..4usize.checked_add(length)?)?;
    Some((value, &bytes[4 + length..]))
}

/// The consensus metadata stored with a checkpoint: the log base (index,
/// term, membership) and the cell's state.
pub fn encode_consensus(cell: CellId, base: &LogBase, state: &CellState) -> Vec<u8> {
    let mut record = Vec::new();
    raft_log::encode_base(&mut record, cell, base);
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    out.extend_from_slice(&record);
    state.encode_into(&mut out);
    out
}

/// Decodes consensus metadata; `None` if malformed. The state is `None` for
/// metadata written before cell states were stored (a bare base record);
/// what an older format has not is the `initial` topology's.
pub fn decode_consensus(bytes: &[u8], initial: &Topology) -> Option<(LogBase, Option<CellState>)> {
    let (format, record, state) = split_consensus(bytes)?;
    let state = match format {
        Some(format) => Some(CellState::decode(state, format, initial)?),
        None => None,
    };
    Some((decode_base(record)?, state))
}

/// The log base of consensus metadata (the state is not decoded); `None` if malformed.
pub fn decode_consensus_base(bytes: &[u8]) -> Option<LogBase> {
    decode_base(split_consensus(bytes)?.1)
}

/// Every format's magic.
const FORMATS: [([u8; 4], Format); 5] = [
    (MAGIC, Format::Current),
    (MAGIC_WITHOUT_TOPOLOGY, Format::WithoutTopology),
    (MAGIC_WITHOUT_LEDGERS, Format::WithoutLedgers),
    (MAGIC_CROSS_WITHOUT_HOLDS, Format::CrossWithoutHolds),
    (MAGIC_OWNERSHIP_ONLY, Format::OwnershipOnly),
];

/// Consensus metadata's format (`None`: a bare base record, written before
/// cell states were stored), its base record and its encoded state.
fn split_consensus(bytes: &[u8]) -> Option<(Option<Format>, &[u8], &[u8])> {
    let Some(&(_, format)) = FORMATS.iter().find(|(magic, _)| bytes.get(..4) == Some(&magic[..])) else {
        return Some((None, bytes, &[]));
    };
    let length = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?) as usize;
    let record = bytes.get(8..8usize.checked_add(length)?)?;
    Some((Some(format), record, &bytes[8 + length..]))
}

fn decode_base(record: &[u8]) -> Option<LogBase> {
    match raft_log::decode(record).ok()? {
        LogRecord::Base { base, .. } => Some(base),
        _ => None,
    }
}

/// A cell's state as its store's consensus metadata records it, or the
/// topology's (index 0, or a store written before cell states were stored).
pub fn stored_or_initial(consensus: &[u8], topology: &Topology, cell: CellId) -> CellState {
    let stored = decode_consensus(consensus, topology).and_then(|(_, state)| state);
    stored.unwrap_or_else(|| CellState::initial(topology, cell))
}

#[cfg(test)]
mod tests {
    use cellpay_ledger::id::account_id;
    use cellpay_ledger::{Account, LedgerConfig};
    use raft::eraftpb::ConfState;

    use super::*;

    fn topology() -> Topology {
        Topology::local(20_000, 4)
    }

    #[test]
    fn the_initial_state_is_the_topologys() {
        let topology = topology();
        let cell = topology.cells[1].id;
        let state = CellState::initial(&topology, cell);
        for shard in 0..topology.shards {
            assert_eq!(state.owns(shard), topology.cell_of_shard(shard) == Some(cell));
        }
        assert!(state.routing().is_none());
        let global = CellState::initial(&topology, GLOBAL_CELL);
        assert!((0..topology.shards).all(|shard| !global.owns(shard)));
        assert_eq!(global.routing(), Some(&RoutingTable::initial(&topology)));
    }

    #[test]
    fn a_shard_with_accounts_cannot_be_released() {
        let topology = topology();
        let cell = topology.cell_of_shard(7).unwrap();
        let mut state = CellState::initial(&topology, cell);
        let mut ledger = Ledger::new(LedgerConfig::default());
        let account = Account { id: account_id(7, 1).unwrap(), ledger: 1, code: 1, ..Account::default() };
        ledger.create_accounts(1, &[account]);
        let before = state.clone();
        assert_eq!(
            state.set_owned(cell, 7, false, &ledger),
            Err(OwnershipError::ShardNotEmpty { cell, shard: 7, accounts: 1 })
        );
        assert_eq!(state, before, "a refused change changes nothing");
        assert_eq!(
            state.set_owned(cell, 100, true, &ledger),
            Err(OwnershipError::UnknownShard { shard: 100, last: 99 })
        );
        // An empty shard is released, and released again (idempotent), then acquired.
        let empty = Ledger::new(LedgerConfig::default());
        state.set_owned(cell, 7, false, &empty).unwrap();
        state.set_owned(cell, 7, false, &empty).unwrap();
        assert!(!state.owns(7) && !state.owns_account(account.id));
        assert_ne!(state.hash(), before.hash());
        state.set_owned(cell, 7, true, &ledger).unwrap();
        assert_eq!(state, before);
    }

    #[test]
    fn consensus_metadata_round_trips_and_reads_the_old_formats() {
        let topology = topology();
        let base = LogBase { index: 9, term: 2, conf_state: ConfState { voters: vec![1, 2, 3], ..Default::default() } };
        for cell in [GLOBAL_CELL, topology.cells[0].id] {
            let mut state = CellState::initial(&topology, cell);
            if cell == GLOBAL_CELL {
                let to = topology.cells[0].id;
                let from = RoutingTable::initial(&topology).owner(99).unwrap();
                assert_ne!(from, to);
                state.change_routing(1, RoutingChange::MoveShard { shard: 99, to }, &topology).unwrap();
                assert_eq!(state.routing().unwrap().version(), 2);
                let mut next = topology.clone();
                next.cells[0].leader_preference.reverse();
                assert_eq!(state.change_topology(1, &next.to_toml()).unwrap().version(), 2);
                assert!(state.change_topology(2, "not toml").is_err());
            } else {
                assert!(state.topology().is_none() && state.change_topology(1, &topology.to_toml()).is_err());
            }
            let initial = topology.initial_ledgers();
            let defined = LedgerDefinition { id: 840, name: "USD".to_string(), asset_scale: 2 };
            let table = initial.define(1, defined).unwrap();
            assert!(state.adopt_ledgers(&table) && !state.adopt_ledgers(&initial) && !state.adopt_ledgers(&table));
            let bytes = encode_consensus(cell, &base, &state);
            assert_eq!(decode_consensus(&bytes, &topology), Some((base.clone(), Some(state.clone()))));
            assert_eq!(decode_consensus(&bytes[..bytes.len() - 1], &topology), None);
            assert_eq!(decode_consensus_base(&bytes), Some(base.clone()));

            // The formats before the topology and before the ledger definitions: the
            // sections are cut from the encoding, and the topology's values come back.
            let routing_bytes = 1 + state.routing().map_or(0, |table| table.encode().len());
            let topology_bytes = 1 + state.topology().map_or(0, |table| 4 + table.encode().len());
            let ledgers_bytes = 4 + state.ledgers().encode().len();
            let (head, routing) = bytes.split_at(bytes.len() - routing_bytes);
            let head = &head[..head.len() - topology_bytes];
            let mut expected = state.clone();
            expected.topology = (cell == GLOBAL_CELL).then(|| TopologyTable::initial(&topology));
            let old = [&MAGIC_WITHOUT_TOPOLOGY[..], &head[4..], routing].concat();
            assert_eq!(decode_consensus(&old, &topology), Some((base.clone(), Some(expected.clone()))));
            assert_eq!(decode_consensus_base(&old), Some(base.clone()));
            expected.ledgers = initial.clone();
            let older = [&MAGIC_WITHOUT_LEDGERS[..], &head[4..head.len() - ledgers_bytes], routing].concat();
            assert_eq!(decode_consensus(&older, &topology), Some((base.clone(), Some(expected))));
        }
        let mut old = Vec::new();
        raft_log::encode_base(&mut old, 1, &base);
        assert_eq!(decode_consensus(&old, &topology), Some((base.clone(), None)));
        assert_eq!(decode_consensus_base(&old), Some(base));
        assert_eq!(decode_consensus_base(b"junk"), None);
    }
}
