//! The routing table: which cell owns each shard, and its version.
//!
//! The topology file gives the first table (version 1). Every change makes a
//! new table with the next version, so a version names one table exactly: a
//! cell that refuses a request it does not own names its version, and a
//! router holding an older one knows to refresh. A change is checked against
//! the version its author saw (compare-and-set), so two operators moving
//! shards at once cannot overwrite each other. (The global cell, which will
//! replicate the table, applies changes in its log's order.)
//!
//! Encoding (all integers little-endian), for storing and shipping a table:
//!
//! ```text
//! offset  size  field
//!      0     4  magic b"cpRT"
//!      4     8  version (>= 1)
//!     12     4  shards (1..=SHARDS_MAX)
//!     16   8n   the owner of each shard, a cell id (u64), in shard order
//!  16+8n     4  CRC32C of everything before it
//! ```

use std::collections::BTreeMap;

use cellpay_ledger::id::{clearing_holder, is_clearing_account, shard_of_account};

use crate::topology::{CellId, Topology, GLOBAL_CELL, SHARDS_MAX};

const MAGIC: [u8; 4] = *b"cpRT";
const HEADER_SIZE: usize = 16;

/// Which cell owns each shard, at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingTable {
    version: u64,
    /// The owner of each shard, indexed by shard.
    owners: Vec<CellId>,
}

/// A change to the routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingChange {
    /// `shard` is owned by cell `to` from the next version on.
    MoveShard { shard: u32, to: CellId },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingError {
    #[error("the routing table is at version {current}, not {expected}: read it again and retry")]
    VersionMismatch { expected: u64, current: u64 },
    #[error("shard {shard} does not exist: shards are 0 to {last}")]
    UnknownShard { shard: u32, last: u32 },
    #[error("cell {cell} is not one of the topology's cells of shards")]
    UnknownCell { cell: CellId },
    #[error("cell {cell} already owns shard {shard}")]
    AlreadyOwner { shard: u32, cell: CellId },
    #[error("routing table encoding: {reason}")]
    Malformed { reason: String },
    #[error("only the global cell holds the routing table")]
    NoTable,
}

impl RoutingTable {
    /// The table the topology file describes: version 1.
    pub fn initial(topology: &Topology) -> RoutingTable {
        let owners = (0..topology.shards)
            .map(|shard| topology.cell_of_shard(shard).expect("a valid topology assigns every shard to a cell"))
            .collect();
        RoutingTable { version: 1, owners }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The number of shards; shards are numbered `0..shards`.
    pub fn shards(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The cell that owns `shard`; `None` if there is no such shard.
    pub fn owner(&self, shard: u32) -> Option<CellId> {
        self.owners.get(usize::try_from(shard).ok()?).copied()
    }

    /// The table a node published (`GET /v1/cluster/routing`): `owners[shard]`
    /// is the shard's cell. Checked as [`RoutingTable::decode`] checks.
    pub fn from_owners(version: u64, owners: Vec<CellId>) -> Result<RoutingTable, RoutingError> {
        let malformed = |reason: String| RoutingError::Malformed { reason };
        let shards = owners.len();
        if version == 0 || shards == 0 || shards > SHARDS_MAX as usize {
            return Err(malformed(format!("version {version}, shards {shards}")));
        }
        if let Some(shard) = owners.iter().position(|&owner| owner == GLOBAL_CELL) {
            return Err(malformed(format!("shard {shard} has no owner")));
        }
        Ok(RoutingTable { version, owners })
    }

    /// The cell that owns `account`: the owner of its shard
    /// (`ledger::id::shard_of_account`), except a clearing account, which
    /// is its holder's whatever its shard (`ledger::id::clearing_holder`; a
    /// cell the topology may not have, for an id no cell minted). Every
    /// account id has a shard, so every account has an owner.
    pub fn cell_of_account(&self, account: u128) -> CellId {
        if is_clearing_account(account) {
            return CellId::from(clearing_holder(account));
        }
        let shard = shard_of_account(account, self.shards());
        self.owners[shard as usize]
    }

    /// Each cell's shards, in shard order, cells in id order.
    pub fn shards_by_cell(&self) -> BTreeMap<CellId, Vec<u32>> {
        let mut cells: BTreeMap<CellId, Vec<u32>> = BTreeMap::new();
        for (shard, &cell) in self.owners.iter().enumerate() {
            cells.entry(cell).or_default().push(shard as u32);
        }
        cells
    }

    /// The table after `change`, at the next version, if the table is still
    /// at `expected_version` and the change is valid for `topology`'s cells.
    /// The table itself is unchanged.
    pub fn apply(
        &self,
        expected_version: u64,
        change: RoutingChange,
        topology: &Topology,
    ) -> Result<RoutingTable, RoutingError> {
        if expected_version != self.version {
            return Err(RoutingError::VersionMismatch { expected: expected_version, current: self.version });
        }
        let RoutingChange::MoveShard { shard, to } = change;
        let last = self.shards() - 1;
        let owner = self.owner(shard).ok_or(RoutingError::UnknownShard { shard, last })?;
        // The global cell is a cell of the topology, but owns no shard.
        if to == GLOBAL_CELL || topology.cell(to).is_none() {
            return Err(RoutingError::UnknownCell { cell: to });
        }
        if owner == to {
            return Err(RoutingError::AlreadyOwner { shard, cell: to });
        }
        let mut next = self.clone();
        next.version += 1;
        next.owners[shard as usize] = to;
        Ok(next)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_SIZE + 8 * self.owners.len() + 4);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.shards().to_le_bytes());
        for owner in &self.owners {
            out.extend_from_slice(&owner.to_le_bytes());
        }
        let checksum = crc32c::crc32c(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Decodes a table, checking its checksum and fields.
    pub fn decode(bytes: &[u8]) -> Result<RoutingTable, RoutingError> {
        let malformed = |reason: String| RoutingError::Malformed { reason };
        let body = crate::checked_body(bytes, &MAGIC, HEADER_SIZE, "a routing table").map_err(malformed)?;
        let version = u64::from_le_bytes(body[4..12].try_into().expect("8 bytes"));
        let shards = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes"));
        if version == 0 || shards == 0 || shards > SHARDS_MAX {
            return Err(malformed(format!("version {version}, shards {shards}")));
        }
        let owners_bytes = &body[HEADER_SIZE..];
        if owners_bytes.len() != 8 * shards as usize {
            return Err(malformed(format!("{shards} shards but {} bytes of owners", owners_bytes.len())));
        }
        let owners: Vec<CellId> =
            owners_bytes.chunks_exact(8).map(|owner| u64::from_le_bytes(owner.try_into().expect("8 bytes"))).collect();
        if let Some(shard) = owners.iter().position(|&owner| owner == 0) {
            return Err(malformed(format!("shard {shard} has no owner")));
        }
        Ok(RoutingTable { version, owners })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology::local(20_000, 4)
    }

    #[test]
    fn the_initial_table_is_the_topologys_at_version_1() {
        let topology = topology();
        let table = RoutingTable::initial(&topology);
        assert_eq!((table.version(), table.shards()), (1, topology.shards));
        for shard in 0..topology.shards {
            assert_eq!(table.owner(shard), topology.cell_of_shard(shard));
        }
        assert_eq!(table.owner(topology.shards), None);
        let by_cell = table.shards_by_cell();
        assert_eq!(by_cell.len(), 4);
        assert_eq!(by_cell.values().map(Vec::len).sum::<usize>(), topology.shards as usize);
    }

    #[test]
    fn a_move_makes_the_next_version_and_checks_what_it_was_written_against() {
        let topology = topology();
        let table = RoutingTable::initial(&topology);
        let from = table.owner(7).unwrap();
        let to = topology.cells.iter().map(|c| c.id).find(|&c| c != from).unwrap();
        let moved = table.apply(1, RoutingChange::MoveShard { shard: 7, to }, &topology).unwrap();
        assert_eq!((moved.version(), moved.owner(7)), (2, Some(to)));
        assert_eq!(table.owner(7), Some(from), "the old table is unchanged");
        for shard in (0..topology.shards).filter(|&s| s != 7) {
            assert_eq!(moved.owner(shard), table.owner(shard));
        }
        // A change written against version 1 is refused by version 2.
        let stale = moved.apply(1, RoutingChange::MoveShard { shard: 8, to }, &topology);
        assert_eq!(stale, Err(RoutingError::VersionMismatch { expected: 1, current: 2 }));
        let last = topology.shards - 1;
        assert_eq!(
            table.apply(1, RoutingChange::MoveShard { shard: 100, to }, &topology),
            Err(RoutingError::UnknownShard { shard: 100, last })
        );
        assert_eq!(
            table.apply(1, RoutingChange::MoveShard { shard: 7, to: 99 }, &topology),
            Err(RoutingError::UnknownCell { cell: 99 })
        );
        assert_eq!(
            table.apply(1, RoutingChange::MoveShard { shard: 7, to: GLOBAL_CELL }, &topology),
            Err(RoutingError::UnknownCell { cell: GLOBAL_CELL }),
            "the global cell owns no shard"
        );
        assert_eq!(
            table.apply(1, RoutingChange::MoveShard { shard: 7, to: from }, &topology),
            Err(RoutingError::AlreadyOwner { shard: 7, cell: from })
        );
    }

    #[test]
    fn an_account_belongs_to_the_owner_of_its_users_shard() {
        let topology = topology();
        let table = RoutingTable::initial(&topology);
        for user in [0u64, 1, 42, 99, 100, 12_345, u64::MAX - 1] {
            let account = cellpay_ledger::id::account_id(user, 7).unwrap();
            let shard = (user % u64::from(topology.shards)) as u32;
            assert_eq!(Some(table.cell_of_account(account)), topology.cell_of_shard(shard), "user {user}");
        }
        let moved = table.apply(1, RoutingChange::MoveShard { shard: 42, to: 4 }, &topology).unwrap();
        assert_eq!(moved.cell_of_account(cellpay_ledger::id::account_id(142, 1).unwrap()), 4);
        // Id 0 (a post or void naming no account) belongs to shard 0's owner.
        assert_eq!(table.cell_of_account(0), table.owner(0).unwrap());
        // A clearing account is its holder's.
        assert_eq!(table.cell_of_account(cellpay_ledger::id::clearing_account_id(1, 3, 2)), 3);
    }

    #[test]
    fn a_published_table_is_checked_like_a_decoded_one() {
        let table = RoutingTable::initial(&topology());
        let owners: Vec<CellId> = (0..table.shards()).map(|shard| table.owner(shard).unwrap()).collect();
        assert_eq!(RoutingTable::from_owners(1, owners.clone()), Ok(table));
        assert!(RoutingTable::from_owners(0, owners.clone()).is_err(), "version 0");
        assert!(RoutingTable::from_owners(1, Vec::new()).is_err(), "no shards");
        assert!(RoutingTable::from_owners(1, vec![1; SHARDS_MAX as usize + 1]).is_err(), "too many shards");
        let mut unowned = owners;
        unowned[3] = GLOBAL_CELL;
        assert!(RoutingTable::from_owners(1, unowned).is_err(), "an unowned shard");
    }

    #[test]
    fn the_encoding_round_trips_and_every_damage_is_refused() {
        let topology = topology();
        let table = RoutingTable::initial(&topology);
        let bytes = table.encode();
        assert_eq!(RoutingTable::decode(&bytes), Ok(table));
        for index in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[index] ^= 0x10;
            assert!(RoutingTable::decode(&damaged).is_err(), "a flipped bit at byte {index}");
        }
        for length in 0..bytes.len() {
            assert!(RoutingTable::decode(&bytes[..length]).is_err(), "cut to {length} bytes");
        }
        // Well-formed bytes with bad fields: checksummed, so only bad fields are left to refuse.
        let seal = |mut body: Vec<u8>| {
            let checksum = crc32c::crc32c(&body);
            body.extend_from_slice(&checksum.to_le_bytes());
            body
        };
        let body = |version: u64, shards: u32, owners: &[u64]| {
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&shards.to_le_bytes());
            owners.iter().for_each(|o| out.extend_from_slice(&o.to_le_bytes()));
            seal(out)
        };
        assert!(RoutingTable::decode(&body(1, 2, &[1, 2])).is_ok());
        assert!(RoutingTable::decode(&body(0, 2, &[1, 2])).is_err(), "version 0");
        assert!(RoutingTable::decode(&body(1, 3, &[1, 2])).is_err(), "a missing owner");
        assert!(RoutingTable::decode(&body(1, 2, &[1, 0])).is_err(), "an unowned shard");
        assert!(RoutingTable::decode(&body(1, 0, &[])).is_err(), "no shards");
    }
}
