//! The topology the global cell holds, versioned: what the cluster file
//! said at start (version 1), changed online by compare-and-set.
//!
//! Only what the cluster can adopt without moving data or membership changes
//! online: each cell's **leader preference** (where its leader should live,
//! its users' city first). Every node places leaders by the topology its
//! replica of the global cell has applied, so a new preference moves leaders
//! within seconds, with no restart. Everything else has its own path and is
//! refused here, with nothing changed: shards move with `ctl routing move`,
//! replicas change with `ctl member`, ledgers are defined with
//! `ctl ledgers define`; regions, datacenters, nodes and latency are the
//! file's.
//!
//! Encoding (all integers little-endian), for storing a table:
//!
//! ```text
//! offset  size  field
//!      0     4  magic b"cpTP"
//!      4     8  version (>= 1)
//!     12     4  length L of the topology's text
//!     16     L  the topology, as `Topology::to_toml` writes it
//!   16+L     4  CRC32C of everything before it
//! ```

use std::sync::Arc;

use crate::topology::{Topology, TopologyError};

const MAGIC: [u8; 4] = *b"cpTP";
const HEADER_SIZE: usize = 16;

/// The largest topology the global cell holds, as `Topology::to_toml`
/// writes it (a node refuses to start with a larger one). 4,096 cells of
/// five voters take about 530 KiB.
pub const TOPOLOGY_TEXT_BYTES_MAX: usize = 640 * 1024;
/// The largest encoded table.
pub const TABLE_BYTES_MAX: usize = HEADER_SIZE + TOPOLOGY_TEXT_BYTES_MAX + 4;

/// The global cell's topology at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyTable {
    version: u64,
    topology: Arc<Topology>,
}

/// Why a topology change (or an encoding) was refused: nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyChangeError {
    #[error("the topology is at version {current}, not {expected}: read it again and retry")]
    VersionMismatch { expected: u64, current: u64 },
    #[error("the topology is unchanged: only the cells' leader_preference can change online")]
    Unchanged,
    #[error("{what} cannot change online ({how}): only the cells' leader_preference can")]
    Fixed { what: String, how: &'static str },
    #[error("the new topology is invalid: {0}")]
    Invalid(TopologyError),
    #[error("the topology takes {bytes} bytes, over the global cell's limit of {TOPOLOGY_TEXT_BYTES_MAX}")]
    TooLarge { bytes: usize },
    #[error("topology table encoding: {reason}")]
    Malformed { reason: String },
    #[error("only the global cell holds the topology")]
    NoTable,
}

impl TopologyTable {
    /// Version 1: the cluster file's topology.
    pub fn initial(topology: &Topology) -> TopologyTable {
        TopologyTable { version: 1, topology: Arc::new(topology.clone()) }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// The table with `next` at the next version, if the table is still at
    /// `expected_version` and `next` differs only in what may change online.
    pub fn change(&self, expected_version: u64, next: Topology) -> Result<TopologyTable, TopologyChangeError> {
        if expected_version != self.version {
            return Err(TopologyChangeError::VersionMismatch { expected: expected_version, current: self.version });
        }
        check_online_change(&self.topology, &next)?;
        let bytes = next.to_toml().len();
        if bytes > TOPOLOGY_TEXT_BYTES_MAX {
            return Err(TopologyChangeError::TooLarge { bytes });
        }
        Ok(TopologyTable { version: self.version + 1, topology: Arc::new(next) })
    }

    pub fn encode(&self) -> Vec<u8> {
        let text = self.topology.to_toml();
        let mut out = Vec::with_capacity(HEADER_SIZE + text.len() + 4);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
        let checksum = crc32c::crc32c(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Decodes a table, checking its checksum, and the topology as a file is checked.
    pub fn decode(bytes: &[u8]) -> Result<TopologyTable, TopologyChangeError> {
        let malformed = |reason: String| TopologyChangeError::Malformed { reason };
        let body = crate::checked_body(bytes, &MAGIC, HEADER_SIZE, "a topology table").map_err(malformed)?;
        let version = u64::from_le_bytes(body[4..12].try_into().expect("8 bytes"));
        let length = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
        if version == 0 || length != body.len() - HEADER_SIZE {
            return Err(malformed(format!("version {version}, {length} bytes of text in {}", body.len())));
        }
        let text = std::str::from_utf8(&body[HEADER_SIZE..]).map_err(|_| malformed("not UTF-8".to_string()))?;
        let topology = Topology::parse(text).map_err(|error| malformed(error.to_string()))?;
        Ok(TopologyTable { version, topology: Arc::new(topology) })
    }
}

/// Whether `next` differs from `current` only in the cells' leader preferences (and does).
fn check_online_change(current: &Topology, next: &Topology) -> Result<(), TopologyChangeError> {
    let fixed = |what: &str, how: &'static str| Err(TopologyChangeError::Fixed { what: what.to_string(), how });
    if next.shards != current.shards {
        return fixed("shards", "move shards between cells with ctl routing move");
    }
    if next.latency != current.latency {
        return fixed("latency", "it is the cluster file's, read at start");
    }
    if next.regions != current.regions {
        return fixed("regions, datacenters and nodes", "they are the cluster file's, read at start");
    }
    if next.ledgers != current.ledgers {
        return fixed("ledgers", "define ledgers with ctl ledgers define");
    }
    let ids = |topology: &Topology| topology.cells.iter().map(|cell| cell.id).collect::<Vec<_>>();
    if ids(next) != ids(current) {
        return fixed("the cells (which, and their order)", "cells are the cluster file's");
    }
    for (old, new) in current.cells.iter().zip(&next.cells) {
        if (&new.shards, &new.voters, &new.learners) != (&old.shards, &old.voters, &old.learners) {
            let what = format!("cell {}'s shards and replicas", old.id);
            return Err(TopologyChangeError::Fixed { what, how: "ctl routing move moves shards, ctl member replicas" });
        }
    }
    if current.cells.iter().zip(&next.cells).all(|(old, new)| old.leader_preference == new.leader_preference) {
        return Err(TopologyChangeError::Unchanged);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Latency;

    fn local() -> Topology {
        Topology::local(20_000, 4)
    }

    /// `local()` with cell 1's leader preferring the last datacenter.
    fn preferring_shenzhen() -> Topology {
        let mut next = local();
        next.cells[0].leader_preference.rotate_right(1);
        assert_eq!(next.cells[0].leader_preference[0], "sz-a");
        Topology::parse(&next.to_toml()).unwrap()
    }

    #[test]
    fn leader_preferences_change_by_compare_and_set() {
        let table = TopologyTable::initial(&local());
        assert_eq!(table.version(), 1);
        let next = table.change(1, preferring_shenzhen()).unwrap();
        assert_eq!(next.version(), 2);
        assert_eq!(next.topology().preference_rank(1, 5), 0, "node 5 is in sz-a");
        assert_eq!(table.topology().preference_rank(1, 5), 4, "the old table is unchanged");
        assert!(matches!(
            next.change(1, local()),
            Err(TopologyChangeError::VersionMismatch { expected: 1, current: 2 })
        ));
        assert!(matches!(next.change(2, preferring_shenzhen()), Err(TopologyChangeError::Unchanged)));
        assert_eq!(next.change(2, local()).unwrap().version(), 3, "and back");
    }

    #[test]
    fn everything_else_is_refused() {
        let table = TopologyTable::initial(&local());
        let rebuilt = |edit: &dyn Fn(&mut Topology)| {
            let mut next = preferring_shenzhen();
            edit(&mut next);
            Topology::new(next.shards, next.latency, next.regions.clone(), next.cells.clone())
                .unwrap()
                .with_ledgers(next.ledgers.clone())
                .unwrap()
        };
        let cases: Vec<(Topology, &str)> = vec![
            (rebuilt(&|t| t.latency = Latency::DISABLED), "latency cannot change online"),
            (rebuilt(&|t| t.regions[0].datacenters[0].nodes[0].client_address.set_port(1)), "regions, datacenters"),
            (rebuilt(&|t| t.ledgers.clear()), "ctl ledgers define"),
            (
                rebuilt(&|t| {
                    t.cells[1].voters.pop();
                }),
                "cell 2's shards and replicas",
            ),
            (
                rebuilt(&|t| {
                    let shard = t.cells[0].shards.pop().unwrap();
                    t.cells[1].shards.insert(0, shard);
                }),
                "ctl routing move",
            ),
            (rebuilt(&|t| t.cells.swap(0, 1)), "the cells (which, and their order)"),
        ];
        for (next, expected) in cases {
            let error = table.change(1, next).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} does not say {expected:?}");
        }
    }

    #[test]
    fn encoding_round_trips_and_refuses_damage() {
        let table = TopologyTable::initial(&local()).change(1, preferring_shenzhen()).unwrap();
        let bytes = table.encode();
        assert_eq!(TopologyTable::decode(&bytes).unwrap(), table);
        for cut in [0, 3, 16, bytes.len() / 2, bytes.len() - 1] {
            assert!(TopologyTable::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert!(matches!(TopologyTable::decode(&flipped), Err(TopologyChangeError::Malformed { .. })));
    }
}
