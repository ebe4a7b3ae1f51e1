//! The cluster file: regions (cities) → datacenters → nodes, and the cells.
//!
//! A [`Topology`] says which nodes exist and where, how the shards are split
//! into cells, which nodes hold each cell's replicas (voters and non-voting
//! learners), and in which datacenters each cell's leader should live. For
//! local clusters it also carries emulated one-way delays between nodes
//! ([`Latency`]), since the kernel of a laptop or a CI runner has no netem.
//!
//! A topology is only ever built validated: by [`Topology::parse`],
//! [`Topology::load`], [`Topology::local`] or [`Topology::new`]. Every shard in
//! `0..shards` is owned by exactly one cell, every replica is a known node, and
//! every count is within a named limit (`*_MAX`). Invalid input is a
//! [`TopologyError`] that names what is wrong and where; no input panics.
//!
//! # The file
//!
//! TOML, in this shape (`latency`, `learners` and `leader_preference` are
//! optional; `shards` defaults to [`SHARDS_DEFAULT`]; unknown fields are errors):
//!
//! ```toml
//! # Users are split into shards: a user's shard is `user_id % shards`.
//! shards = 100
//!
//! # Emulated one-way delays between nodes, for local clusters. Off when absent.
//! [latency]
//! enabled = true
//! same_datacenter_us = 500
//! same_region_us = 2000
//! cross_region_us = 20000
//!
//! # A region is a city. Datacenter names are unique across the whole cluster.
//! [[region]]
//! name = "hangzhou"
//!
//! [[region.datacenter]]
//! name = "hz-a"
//!
//! # A node: its id (also its replica id in every cell), the address other
//! # nodes dial, and the address clients and gateways dial.
//! [[region.datacenter.node]]
//! id = 1
//! peer = "127.0.0.1:7000"
//! client = "127.0.0.1:7001"
//!
//! [[region.datacenter]]
//! name = "hz-b"
//!
//! [[region.datacenter.node]]
//! id = 2
//! peer = "127.0.0.1:7002"
//! client = "127.0.0.1:7003"
//!
//! [[region]]
//! name = "shenzhen"
//!
//! [[region.datacenter]]
//! name = "sz-a"
//!
//! [[region.datacenter.node]]
//! id = 3
//! peer = "127.0.0.1:7004"
//! client = "127.0.0.1:7005"
//!
//! # A cell: the shards it owns, as single shards ("50") or inclusive ranges
//! # ("0-49"); its voting replicas and non-voting learners, by node id; and
//! # the datacenters where its leader should live, most preferred first.
//! [[cell]]
//! id = 1
//! shards = ["0-49"]
//! voters = [1, 2, 3]
//! learners = []
//! leader_preference = ["hz-a", "hz-b", "sz-a"]
//!
//! [[cell]]
//! id = 2
//! shards = ["50-98", "99"]
//! voters = [1, 2, 3]
//! leader_preference = ["sz-a", "hz-a", "hz-b"]
//!
//! # The ledgers (currencies) accounts may be created on: the global cell's
//! # ledger definitions at version 1 (see `ledgers`). Optional; more are
//! # defined online with `cellpay ctl ledgers define`.
//! [[ledger]]
//! id = 1
//! name = "CNY"
//! asset_scale = 2
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::net::{AddrParseError, IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ledgers::{LedgerDefinition, LedgerError, LedgerTable};

/// A node's id: nonzero and unique in the cluster. It is also the node's
/// replica id in the consensus group of every cell it holds a replica of.
pub type NodeId = u64;

/// A cell's id: nonzero and unique in the cluster.
pub type CellId = u64;

/// The number of shards when the file does not say (the source system's "00"–"99").
pub const SHARDS_DEFAULT: u32 = 100;
/// The id of the global cell (see [`Topology::global`]); the cells of the
/// file are numbered from 1.
pub const GLOBAL_CELL: CellId = 0;
/// The largest number of shards: the ledger's own limit (`cellpay_ledger::id::SHARDS_MAX`).
pub const SHARDS_MAX: u32 = 10_000;
/// The largest number of nodes in a cluster.
pub const NODES_MAX: usize = 1024;
/// The largest number of cells in a cluster.
pub const CELLS_MAX: usize = 4096;
/// The largest number of replicas (voters and learners together) of one cell.
pub const CELL_REPLICAS_MAX: usize = 64;
/// The largest node id: TOML integers are signed 64-bit.
pub const ID_MAX: u64 = i64::MAX as u64;
/// The largest cell id: a clearing account's id names two cells in 16 bits
/// each (`cellpay_ledger::id::clearing_account_id`).
pub const CELL_ID_MAX: u64 = u16::MAX as u64;
/// The longest region or datacenter name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;
/// The largest emulated one-way delay (10 s).
pub const ONE_WAY_DELAY_US_MAX: u64 = 10_000_000;
/// The largest topology file.
pub const FILE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The number of nodes (and datacenters) of [`Topology::local`].
const LOCAL_NODES: u16 = 5;
/// The highest base port of [`Topology::local`]: each node takes two ports.
const LOCAL_BASE_PORT_MAX: u16 = u16::MAX - (2 * LOCAL_NODES - 1);
/// The regions and datacenters of [`Topology::local`], in file order.
const LOCAL_LAYOUT: [(&str, &[&str]); 3] =
    [("hangzhou", &["hz-a", "hz-b"]), ("shanghai", &["sh-a", "sh-b"]), ("shenzhen", &["sz-a"])];
/// The longest piece of user input quoted in an error message, in bytes.
const EXCERPT_BYTES_MAX: usize = 64;
/// The most unowned shard ranges listed in [`TopologyError::ShardsUnowned`].
const UNOWNED_RANGES_LISTED_MAX: usize = 8;

/// The whole cluster: its regions, datacenters and nodes, and its cells.
///
/// The public fields are the data; lookups ([`Topology::node`],
/// [`Topology::cell_of_shard`], ...) use indexes built when the topology is
/// validated. Treat the fields as read-only: to change a topology, build a new
/// one with [`Topology::new`], which validates the change and re-indexes.
/// Equality compares the public fields only.
#[derive(Clone)]
pub struct Topology {
    /// The number of shards; shards are numbered `0..shards`.
    pub shards: u32,
    /// Emulated one-way delays between nodes.
    pub latency: Latency,
    /// The regions, in file order.
    pub regions: Vec<Region>,
    /// The cells, in file order.
    pub cells: Vec<Cell>,
    /// The ledgers defined from the start (the global cell's ledger
    /// definitions at version 1), in file order.
    pub ledgers: Vec<LedgerDefinition>,
    index: Index,
}

/// Emulated one-way delays between nodes, for local clusters (the kernel has no netem).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency {
    /// Whether the transport delays messages at all.
    pub enabled: bool,
    /// The delay between two nodes in the same datacenter.
    pub same_datacenter_us: u64,
    /// The delay between two nodes in different datacenters of the same region.
    pub same_region_us: u64,
    /// The delay between two nodes in different regions.
    pub cross_region_us: u64,
}

/// A region: a city, with one or more datacenters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Unique in the cluster.
    pub name: String,
    /// At least one.
    pub datacenters: Vec<Datacenter>,
}

/// A datacenter, with one or more nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datacenter {
    /// Unique in the whole cluster, not only in its region.
    pub name: String,
    /// At least one.
    pub nodes: Vec<NodeSpec>,
}

/// A node: a process holding replicas of cells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Nonzero, unique; also the node's replica id in every cell.
    pub id: NodeId,
    /// Where other nodes reach this node.
    pub peer_address: SocketAddr,
    /// Where clients and gateways reach this node.
    pub client_address: SocketAddr,
}

/// A cell: a consensus group that owns a set of shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    /// Nonzero, unique.
    pub id: CellId,
    /// The shards the cell owns, sorted, one entry per shard.
    pub shards: Vec<u32>,
    /// The voting replicas, by node: at least one.
    pub voters: Vec<NodeId>,
    /// The non-voting replicas, by node; disjoint from the voters.
    pub learners: Vec<NodeId>,
    /// Datacenter names where the cell's leader should live, most preferred first.
    pub leader_preference: Vec<String>,
}

/// Where a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location<'a> {
    /// The region's name.
    pub region: &'a str,
    /// The datacenter's name.
    pub datacenter: &'a str,
}

/// The role of a replica in a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaRole {
    /// Votes in elections and commits.
    Voter,
    /// Receives the log but does not vote.
    Learner,
}

/// Which of a node's two addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressKind {
    /// [`NodeSpec::peer_address`].
    Peer,
    /// [`NodeSpec::client_address`].
    Client,
}

/// Why a topology is invalid. Every message names what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An error in a topology file, with the file's path.
    #[error("topology file {}: {error}", path.display())]
    File { path: PathBuf, error: Box<TopologyError> },
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Read(std::io::Error),
    /// The text is longer than [`FILE_BYTES_MAX`].
    #[error("the topology is more than the limit of {FILE_BYTES_MAX} bytes ({bytes} bytes read)")]
    TooLarge { bytes: usize },
    /// The text is not TOML, or not TOML of the topology's shape (a missing,
    /// unknown or mistyped field). The message gives line and column.
    #[error("{0}")]
    Toml(Box<toml::de::Error>),
    /// `shards` is outside `1..=SHARDS_MAX`.
    #[error("shards = {shards}: must be in 1..={SHARDS_MAX}")]
    ShardCount { shards: u32 },
    /// A delay is larger than [`ONE_WAY_DELAY_US_MAX`].
    #[error("latency: {field} = {delay_us} is more than the limit of {ONE_WAY_DELAY_US_MAX} us")]
    LatencyTooLarge { field: &'static str, delay_us: u64 },
    /// The cluster has no regions.
    #[error("no regions: the cluster needs at least one [[region]]")]
    NoRegions,
    /// A region or datacenter name is empty, too long or has other characters
    /// than ASCII letters, digits, '-', '_' and '.'.
    #[error(
        "{kind} name {name:?} is invalid: use 1 to {NAME_BYTES_MAX} of the characters a-z, A-Z, 0-9, '-', '_' and '.'"
    )]
    InvalidName { kind: &'static str, name: String },
    /// Two regions have the same name.
    #[error("region {name} is listed twice")]
    DuplicateRegion { name: String },
    /// A region has no datacenters.
    #[error("region {region}: no datacenters: a region needs at least one [[region.datacenter]]")]
    NoDatacenters { region: String },
    /// Two datacenters have the same name (names are unique across regions).
    #[error("datacenter {name} is listed twice: in region {first_region} and in region {second_region}")]
    DuplicateDatacenter { name: String, first_region: String, second_region: String },
    /// A datacenter has no nodes.
    #[error("datacenter {datacenter}: no nodes: a datacenter needs at least one [[region.datacenter.node]]")]
    NoNodes { datacenter: String },
    /// More than [`NODES_MAX`] nodes.
    #[error("more than the limit of {NODES_MAX} nodes")]
    TooManyNodes,
    /// A node id is zero or larger than [`ID_MAX`].
    #[error("datacenter {datacenter}: node id {id} is out of range 1..={ID_MAX}")]
    NodeIdOutOfRange { datacenter: String, id: NodeId },
    /// Two nodes have the same id.
    #[error("node {id} is listed twice: in datacenter {first_datacenter} and in datacenter {second_datacenter}")]
    DuplicateNodeId { id: NodeId, first_datacenter: String, second_datacenter: String },
    /// A node address is not an IP:port socket address.
    #[error("node {node}: {kind} address {address:?} is not an IP:port socket address: {error}")]
    InvalidAddress { node: NodeId, kind: AddressKind, address: String, error: AddrParseError },
    /// Two addresses are the same (over all nodes, peer and client).
    #[error("address {address} is used twice: node {first_node} {first_kind} and node {second_node} {second_kind}")]
    DuplicateAddress {
        address: SocketAddr,
        first_node: NodeId,
        first_kind: AddressKind,
        second_node: NodeId,
        second_kind: AddressKind,
    },
    /// The cluster has no cells.
    #[error("no cells: the cluster needs at least one [[cell]]")]
    NoCells,
    /// More than [`CELLS_MAX`] cells.
    #[error("{count} cells is more than the limit of {CELLS_MAX}")]
    TooManyCells { count: usize },
    /// A cell id is zero or larger than [`CELL_ID_MAX`].
    #[error("cell id {id} is out of range 1..={CELL_ID_MAX}")]
    CellIdOutOfRange { id: CellId },
    /// Two cells have the same id.
    #[error("cell {id} is listed twice")]
    DuplicateCellId { id: CellId },
    /// A shard range is not `"N"` or `"N-M"` with `N <= M`.
    #[error("cell {cell}: shard range {range:?} is invalid: write a shard (\"7\") or an inclusive range (\"0-24\")")]
    ShardRangeSyntax { cell: CellId, range: String },
    /// A shard (or a range's end) is not below `shards`.
    #[error(
        "cell {cell}: shard {range} is out of range: shards are 0 to {last} (shards = {shards})",
        last = .shards.saturating_sub(1)
    )]
    ShardOutOfRange { cell: CellId, range: String, shards: u32 },
    /// A cell lists a shard twice.
    #[error("cell {cell}: shard {shard} is listed twice")]
    ShardListedTwice { cell: CellId, shard: u32 },
    /// Two cells own the same shard.
    #[error("cell {cell}: shard {shard} is also owned by cell {owner}")]
    ShardOwnedTwice { cell: CellId, shard: u32, owner: CellId },
    /// Some shards are owned by no cell.
    #[error("shards not owned by any cell: {shards} ({count} in all)")]
    ShardsUnowned { count: usize, shards: String },
    /// A cell has no voters.
    #[error("cell {cell}: no voters: a cell needs at least one voter")]
    NoVoters { cell: CellId },
    /// A cell has more than [`CELL_REPLICAS_MAX`] replicas.
    #[error("cell {cell}: {count} replicas is more than the limit of {CELL_REPLICAS_MAX}")]
    TooManyReplicas { cell: CellId, count: usize },
    /// A replica is not a node of the cluster.
    #[error("cell {cell}: {role} {node} is not a node of the cluster")]
    UnknownReplica { cell: CellId, role: ReplicaRole, node: NodeId },
    /// A cell lists a node twice in the same role.
    #[error("cell {cell}: {role} {node} is listed twice")]
    DuplicateReplica { cell: CellId, role: ReplicaRole, node: NodeId },
    /// A node is both a voter and a learner of a cell.
    #[error("cell {cell}: node {node} is both a voter and a learner")]
    VoterAndLearner { cell: CellId, node: NodeId },
    /// A leader preference names a datacenter that does not exist.
    #[error("cell {cell}: leader_preference names {name:?}, which is not a datacenter of the cluster")]
    UnknownPreferredDatacenter { cell: CellId, name: String },
    /// A leader preference names a datacenter twice.
    #[error("cell {cell}: leader_preference lists datacenter {name} twice")]
    DuplicatePreferredDatacenter { cell: CellId, name: String },
    /// A `[[ledger]]` entry is invalid, or repeats another's id or name.
    #[error("ledger definitions: {0}")]
    Ledger(LedgerError),
    /// [`Topology::try_local`] was given a base port too high for its ports.
    #[error("local cluster: base port {base_port} is too high: it must be at most {LOCAL_BASE_PORT_MAX}")]
    LocalBasePortTooHigh { base_port: u16 },
}

impl fmt::Display for ReplicaRole {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            ReplicaRole::Voter => "voter",
            ReplicaRole::Learner => "learner",
        })
    }
}

impl fmt::Display for AddressKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            AddressKind::Peer => "peer",
            AddressKind::Client => "client",
        })
    }
}

impl Latency {
    /// No emulated delays.
    pub const DISABLED: Latency =
        Latency { enabled: false, same_datacenter_us: 0, same_region_us: 0, cross_region_us: 0 };

    /// The delays of [`Topology::local`]: 0.5 ms within a datacenter, 2 ms
    /// within a region, 20 ms across regions.
    pub const LOCAL: Latency =
        Latency { enabled: true, same_datacenter_us: 500, same_region_us: 2_000, cross_region_us: 20_000 };
}

impl Cell {
    /// The cell's replicas: voters first, then learners.
    pub fn replicas(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().chain(&self.learners).copied()
    }

    /// Whether `node` holds a replica (voter or learner) of the cell.
    pub fn is_replica(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }
}

impl Topology {
    /// Validates a topology and indexes it for lookups. Each cell's shards are sorted.
    pub fn new(
        shards: u32,
        latency: Latency,
        regions: Vec<Region>,
        mut cells: Vec<Cell>,
    ) -> Result<Topology, TopologyError> {
        check_shard_count(shards)?;
        check_latency(&latency)?;
        let places = index_nodes(&regions)?;
        let cell_positions = index_cells(cells.iter().map(|cell| cell.id))?;
        let datacenter_names: HashSet<&str> =
            regions.iter().flat_map(|region| &region.datacenters).map(|datacenter| datacenter.name.as_str()).collect();
        let mut owners = ShardOwners::new(shards);
        for cell in &mut cells {
            cell.shards.sort_unstable();
            for &shard in &cell.shards {
                owners.claim(cell.id, shard)?;
            }
            check_replicas(cell, &places)?;
            check_leader_preference(cell, &datacenter_names)?;
        }
        let shard_cells = owners.finish()?;
        let global = global_cell(&regions);
        let index = Index { places, cell_positions, shard_cells, global };
        Ok(Topology { shards, latency, regions, cells, ledgers: Vec::new(), index })
    }

    /// The topology with these ledgers defined from the start (checked:
    /// valid, ids and names unique, at most `ledgers::LEDGERS_MAX`).
    pub fn with_ledgers(mut self, ledgers: Vec<LedgerDefinition>) -> Result<Topology, TopologyError> {
        LedgerTable::initial(&ledgers).map_err(TopologyError::Ledger)?;
        self.ledgers = ledgers;
        Ok(self)
    }

    /// The ledger definitions at version 1: the file's.
    pub fn initial_ledgers(&self) -> LedgerTable {
        LedgerTable::initial(&self.ledgers).expect("a valid topology's ledgers are valid")
    }

    /// Parses and validates a topology file's text (TOML, see the [module docs](self)).
    pub fn parse(text: &str) -> Result<Topology, TopologyError> {
        if text.len() > FILE_BYTES_MAX {
            return Err(TopologyError::TooLarge { bytes: text.len() });
        }
        let file: TopologyFile = toml::from_str(text).map_err(|error| TopologyError::Toml(Box::new(error)))?;
        file.into_topology()
    }

    /// Reads, parses and validates a topology file. The error names the path.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let within = |error| TopologyError::File { path: path.to_owned(), error: Box::new(error) };
        let text = read_bounded(path).map_err(within)?;
        Topology::parse(&text).map_err(within)
    }

    /// Writes the topology as a file that [`Topology::parse`] reads back equal,
    /// with shards as compact ranges.
    pub fn to_toml(&self) -> String {
        let mut lines = vec![format!("shards = {}", self.shards), String::new()];
        lines.push("[latency]".to_owned());
        lines.push(format!("enabled = {}", self.latency.enabled));
        lines.push(format!("same_datacenter_us = {}", self.latency.same_datacenter_us));
        lines.push(format!("same_region_us = {}", self.latency.same_region_us));
        lines.push(format!("cross_region_us = {}", self.latency.cross_region_us));
        for region in &self.regions {
            lines.extend([String::new(), "[[region]]".to_owned(), format!("name = {}", toml_string(&region.name))]);
            for datacenter in &region.datacenters {
                lines.push(String::new());
                lines.push("[[region.datacenter]]".to_owned());
                lines.push(format!("name = {}", toml_string(&datacenter.name)));
                for node in &datacenter.nodes {
                    lines.push(String::new());
                    lines.push("[[region.datacenter.node]]".to_owned());
                    lines.push(format!("id = {}", node.id));
                    lines.push(format!("peer = {}", toml_string(&node.peer_address.to_string())));
                    lines.push(format!("client = {}", toml_string(&node.client_address.to_string())));
                }
            }
        }
        for cell in &self.cells {
            let shards: Vec<String> = shard_ranges(&cell.shards).iter().map(|range| toml_string(range)).collect();
            let preference: Vec<String> = cell.leader_preference.iter().map(|name| toml_string(name)).collect();
            lines.push(String::new());
            lines.push("[[cell]]".to_owned());
            lines.push(format!("id = {}", cell.id));
            lines.push(format!("shards = [{}]", shards.join(", ")));
            lines.push(format!("voters = [{}]", join_ids(&cell.voters)));
            lines.push(format!("learners = [{}]", join_ids(&cell.learners)));
            lines.push(format!("leader_preference = [{}]", preference.join(", ")));
        }
        for ledger in &self.ledgers {
            lines.extend([String::new(), "[[ledger]]".to_owned(), format!("id = {}", ledger.id)]);
            lines.push(format!("name = {}", toml_string(&ledger.name)));
            lines.push(format!("asset_scale = {}", ledger.asset_scale));
        }
        lines.push(String::new());
        lines.join("\n")
    }

    /// The default local cluster: 3 regions and 5 datacenters (2 + 2 + 1), one
    /// node per datacenter, and `cells` cells over [`SHARDS_DEFAULT`] shards.
    /// See [`Topology::try_local`] for the details.
    ///
    /// # Panics
    ///
    /// If [`Topology::try_local`] fails: `cells` is 0 or more than
    /// [`CELLS_MAX`], or `base_port` is too high for the ten ports.
    pub fn local(base_port: u16, cells: u32) -> Topology {
        match Topology::try_local(base_port, cells) {
            Ok(topology) => topology,
            Err(error) => panic!("Topology::local({base_port}, {cells}): {error}"),
        }
    }

    /// The default local cluster, or why it cannot be built.
    ///
    /// - Regions "hangzhou" (datacenters "hz-a", "hz-b"), "shanghai" ("sh-a",
    ///   "sh-b") and "shenzhen" ("sz-a"); node `i` (ids 1..=5) is alone in the
    ///   `i`-th datacenter, on 127.0.0.1, with peer port `base_port + 2 * (i - 1)`
    ///   and client port one above.
    /// - Cells 1..=`cells` split the shards into contiguous, near-equal ranges
    ///   (a cell owns no shard if there are more cells than shards); every cell
    ///   has the five nodes as voters and no learners.
    /// - Cell `k`'s leader preference starts at datacenter `(k - 1) % 5`, then
    ///   the other datacenters of the same region, then the rest in file order.
    /// - Latency is [`Latency::LOCAL`].
    /// - Ledger 1, "CNY" with 2 decimal places, is defined.
    pub fn try_local(base_port: u16, cells: u32) -> Result<Topology, TopologyError> {
        let cell_count = usize::try_from(cells).unwrap_or(usize::MAX);
        if cell_count > CELLS_MAX {
            return Err(TopologyError::TooManyCells { count: cell_count });
        }
        if base_port > LOCAL_BASE_PORT_MAX {
            return Err(TopologyError::LocalBasePortTooHigh { base_port });
        }
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut next_id: u16 = 1;
        let mut regions = Vec::with_capacity(LOCAL_LAYOUT.len());
        for (region_name, datacenter_names) in LOCAL_LAYOUT {
            let mut datacenters = Vec::with_capacity(datacenter_names.len());
            for &datacenter_name in datacenter_names {
                let peer_port = base_port + 2 * (next_id - 1);
                let node = NodeSpec {
                    id: NodeId::from(next_id),
                    peer_address: SocketAddr::new(localhost, peer_port),
                    client_address: SocketAddr::new(localhost, peer_port + 1),
                };
                datacenters.push(Datacenter { name: datacenter_name.to_owned(), nodes: vec![node] });
                next_id += 1;
            }
            regions.push(Region { name: region_name.to_owned(), datacenters });
        }
        assert_eq!(next_id - 1, LOCAL_NODES);
        let voters: Vec<NodeId> = (1..=NodeId::from(LOCAL_NODES)).collect();
        let cells = (0..cells)
            .map(|position| Cell {
                id: CellId::from(position) + 1,
                shards: local_shards(position, cells),
                voters: voters.clone(),
                learners: Vec::new(),
                leader_preference: local_leader_preference(position as usize),
            })
            .collect();
        Topology::new(SHARDS_DEFAULT, Latency::LOCAL, regions, cells)?.with_ledgers(vec![LedgerDefinition::local()])
    }

    /// The node with this id.
    pub fn node(&self, id: NodeId) -> Option<&NodeSpec> {
        let place = self.index.places.get(&id)?;
        self.regions.get(place.region)?.datacenters.get(place.datacenter)?.nodes.get(place.node)
    }

    /// All nodes, in file order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeSpec> + '_ {
        self.regions.iter().flat_map(|region| &region.datacenters).flat_map(|datacenter| &datacenter.nodes)
    }

    /// The region and datacenter of a node.
    pub fn location(&self, id: NodeId) -> Option<Location<'_>> {
        let place = self.index.places.get(&id)?;
        let region = self.regions.get(place.region)?;
        let datacenter = region.datacenters.get(place.datacenter)?;
        Some(Location { region: &region.name, datacenter: &datacenter.name })
    }

    /// The cell with this id; [`GLOBAL_CELL`] is the global cell.
    pub fn cell(&self, id: CellId) -> Option<&Cell> {
        if id == GLOBAL_CELL {
            return Some(&self.index.global);
        }
        self.cells.get(*self.index.cell_positions.get(&id)?)
    }

    /// The global cell: it owns no shard and holds the routing table. Every
    /// node hosts a replica: the first node of each datacenter votes (one
    /// voter per datacenter, like the cells, so it survives a region's
    /// loss), every other node is a learner (a read replica in its
    /// datacenter); leaders prefer the datacenters in file order.
    pub fn global(&self) -> &Cell {
        &self.index.global
    }

    /// The cell that owns a shard; `None` if `shard >= shards`.
    pub fn cell_of_shard(&self, shard: u32) -> Option<CellId> {
        self.index.shard_cells.get(usize::try_from(shard).ok()?).copied()
    }

    /// The cells with a replica (voter or learner) on a node, by id: the
    /// global cell (id 0) first.
    pub fn cells_of_node(&self, node: NodeId) -> Vec<CellId> {
        let all = std::iter::once(&self.index.global).chain(&self.cells);
        let mut cells: Vec<CellId> = all.filter(|cell| cell.is_replica(node)).map(|cell| cell.id).collect();
        cells.sort_unstable();
        cells
    }

    /// The nodes of a region, in file order; empty for an unknown region.
    pub fn region_nodes(&self, region: &str) -> Vec<NodeId> {
        let Some(region) = self.regions.iter().find(|candidate| candidate.name == region) else {
            return Vec::new();
        };
        region.datacenters.iter().flat_map(|datacenter| &datacenter.nodes).map(|node| node.id).collect()
    }

    /// The emulated one-way delay from one node to another: zero if latency is
    /// disabled, `from == to`, or either node is unknown.
    pub fn one_way_delay(&self, from: NodeId, to: NodeId) -> Duration {
        if !self.latency.enabled || from == to {
            return Duration::ZERO;
        }
        let (Some(source), Some(target)) = (self.index.places.get(&from), self.index.places.get(&to)) else {
            return Duration::ZERO;
        };
        let delay_us = if source.region != target.region {
            self.latency.cross_region_us
        } else if source.datacenter != target.datacenter {
            self.latency.same_region_us
        } else {
            self.latency.same_datacenter_us
        };
        Duration::from_micros(delay_us)
    }

    /// Where `node`'s datacenter ranks in `cell`'s leader preference: 0 is most
    /// preferred; `leader_preference.len()` if the datacenter is not listed or
    /// the node is unknown. An unknown cell has no preference: every node ranks 0,
    /// the length of its empty list.
    pub fn preference_rank(&self, cell: CellId, node: NodeId) -> usize {
        let Some(cell) = self.cell(cell) else {
            return 0;
        };
        let unlisted = cell.leader_preference.len();
        let Some(location) = self.location(node) else {
            return unlisted;
        };
        cell.leader_preference.iter().position(|name| name == location.datacenter).unwrap_or(unlisted)
    }
}

/// Equality of the public fields (the index follows from them).
impl PartialEq for Topology {
    fn eq(&self, other: &Topology) -> bool {
        self.shards == other.shards
            && self.latency == other.latency
            && self.regions == other.regions
            && self.cells == other.cells
            && self.ledgers == other.ledgers
    }
}

impl Eq for Topology {}

impl fmt::Debug for Topology {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Topology")
            .field("shards", &self.shards)
            .field("latency", &self.latency)
            .field("regions", &self.regions)
            .field("cells", &self.cells)
            .field("ledgers", &self.ledgers)
            .finish_non_exhaustive()
    }
}

/// Lookups built by [`Topology::new`].
#[derive(Clone, Debug)]
struct Index {
    /// Where each node is in `regions`.
    places: HashMap<NodeId, Place>,
    /// Where each cell is in `cells`.
    cell_positions: HashMap<CellId, usize>,
    /// The owning cell of each shard.
    shard_cells: Vec<CellId>,
    /// The global cell, derived from the regions.
    global: Cell,
}

/// A node's position: `regions[region].datacenters[datacenter].nodes[node]`.
#[derive(Clone, Copy, Debug)]
struct Place {
    region: usize,
    datacenter: usize,
    node: usize,
}

/// Which cell owns each shard, filled in while validating.
struct ShardOwners {
    shards: u32,
    /// The owner of each shard; 0 (never a cell id) while unowned.
    cells: Vec<CellId>,
}

impl ShardOwners {
    fn new(shards: u32) -> ShardOwners {
        ShardOwners { shards, cells: vec![0; shards as usize] }
    }

    fn claim(&mut self, cell: CellId, shard: u32) -> Result<(), TopologyError> {
        assert_ne!(cell, 0);
        let Some(owner) = self.cells.get_mut(shard as usize) else {
            return Err(TopologyError::ShardOutOfRange { cell, range: shard.to_string(), shards: self.shards });
        };
        match *owner {
            0 => {
                *owner = cell;
                Ok(())
            }
            owner if owner == cell => Err(TopologyError::ShardListedTwice { cell, shard }),
            owner => Err(TopologyError::ShardOwnedTwice { cell, shard, owner }),
        }
    }

    /// The owner of every shard, or the shards that have none.
    fn finish(self) -> Result<Vec<CellId>, TopologyError> {
        let unowned: Vec<u32> = (0..self.shards).filter(|&shard| self.cells[shard as usize] == 0).collect();
        if unowned.is_empty() {
            return Ok(self.cells);
        }
        let ranges = shard_ranges(&unowned);
        let mut listed = ranges[..ranges.len().min(UNOWNED_RANGES_LISTED_MAX)].join(", ");
        if ranges.len() > UNOWNED_RANGES_LISTED_MAX {
            listed.push_str(", …");
        }
        Err(TopologyError::ShardsUnowned { count: unowned.len(), shards: listed })
    }
}

fn check_shard_count(shards: u32) -> Result<(), TopologyError> {
    if (1..=SHARDS_MAX).contains(&shards) {
        Ok(())
    } else {
        Err(TopologyError::ShardCount { shards })
    }
}

fn check_latency(latency: &Latency) -> Result<(), TopologyError> {
    let delays_us = [
        ("same_datacenter_us", latency.same_datacenter_us),
        ("same_region_us", latency.same_region_us),
        ("cross_region_us", latency.cross_region_us),
    ];
    for (field, delay_us) in delays_us {
        if delay_us > ONE_WAY_DELAY_US_MAX {
            return Err(TopologyError::LatencyTooLarge { field, delay_us });
        }
    }
    Ok(())
}

fn check_name(kind: &'static str, name: &str) -> Result<(), TopologyError> {
    let valid = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(TopologyError::InvalidName { kind, name: excerpt(name) })
    }
}

/// Checks regions, datacenters, nodes and addresses, and finds every node.
fn index_nodes(regions: &[Region]) -> Result<HashMap<NodeId, Place>, TopologyError> {
    if regions.is_empty() {
        return Err(TopologyError::NoRegions);
    }
    let mut region_names: HashSet<&str> = HashSet::new();
    let mut datacenter_regions: HashMap<&str, &str> = HashMap::new();
    let mut addresses: HashMap<SocketAddr, (NodeId, AddressKind)> = HashMap::new();
    let mut places: HashMap<NodeId, Place> = HashMap::new();
    for (region_position, region) in regions.iter().enumerate() {
        check_name("region", &region.name)?;
        if !region_names.insert(&region.name) {
            return Err(TopologyError::DuplicateRegion { name: region.name.clone() });
        }
        if region.datacenters.is_empty() {
            return Err(TopologyError::NoDatacenters { region: region.name.clone() });
        }
        for (datacenter_position, datacenter) in region.datacenters.iter().enumerate() {
            check_name("datacenter", &datacenter.name)?;
            if let Some(first_region) = datacenter_regions.insert(&datacenter.name, &region.name) {
                return Err(TopologyError::DuplicateDatacenter {
                    name: datacenter.name.clone(),
                    first_region: first_region.to_owned(),
                    second_region: region.name.clone(),
                });
            }
            if datacenter.nodes.is_empty() {
                return Err(TopologyError::NoNodes { datacenter: datacenter.name.clone() });
            }
            for (node_position, node) in datacenter.nodes.iter().enumerate() {
                if places.len() == NODES_MAX {
                    return Err(TopologyError::TooManyNodes);
                }
                if node.id == 0 || node.id > ID_MAX {
                    return Err(TopologyError::NodeIdOutOfRange { datacenter: datacenter.name.clone(), id: node.id });
                }
                let place = Place { region: region_position, datacenter: datacenter_position, node: node_position };
                if let Some(first) = places.insert(node.id, place) {
                    return Err(TopologyError::DuplicateNodeId {
                        id: node.id,
                        first_datacenter: regions[first.region].datacenters[first.datacenter].name.clone(),
                        second_datacenter: datacenter.name.clone(),
                    });
                }
                for (kind, address) in
                    [(AddressKind::Peer, node.peer_address), (AddressKind::Client, node.client_address)]
                {
                    if let Some((first_node, first_kind)) = addresses.insert(address, (node.id, kind)) {
                        return Err(TopologyError::DuplicateAddress {
                            address,
                            first_node,
                            first_kind,
                            second_node: node.id,
                            second_kind: kind,
                        });
                    }
                }
            }
        }
    }
    Ok(places)
}

/// The global cell of `regions` (see [`Topology::global`]).
fn global_cell(regions: &[Region]) -> Cell {
    let datacenters = || regions.iter().flat_map(|region| &region.datacenters);
    let voters = datacenters().filter_map(|datacenter| datacenter.nodes.first()).map(|node| node.id).collect();
    let learners = datacenters().flat_map(|datacenter| datacenter.nodes.iter().skip(1)).map(|node| node.id);
    Cell {
        id: GLOBAL_CELL,
        shards: Vec::new(),
        voters,
        learners: learners.take(CELL_REPLICAS_MAX.saturating_sub(datacenters().count())).collect(),
        leader_preference: datacenters().map(|datacenter| datacenter.name.clone()).collect(),
    }
}

/// Checks the cell count and ids, and finds every cell.
fn index_cells(ids: impl ExactSizeIterator<Item = CellId>) -> Result<HashMap<CellId, usize>, TopologyError> {
    let count = ids.len();
    if count == 0 {
        return Err(TopologyError::NoCells);
    }
    if count > CELLS_MAX {
        return Err(TopologyError::TooManyCells { count });
    }
    let mut positions = HashMap::with_capacity(count);
    for (position, id) in ids.enumerate() {
        if id == 0 || id > CELL_ID_MAX {
            return Err(TopologyError::CellIdOutOfRange { id });
        }
        if positions.insert(id, position).is_some() {
            return Err(TopologyError::DuplicateCellId { id });
        }
    }
    Ok(positions)
}

fn check_replicas(cell: &Cell, places: &HashMap<NodeId, Place>) -> Result<(), TopologyError> {
    if cell.voters.is_empty() {
        return Err(TopologyError::NoVoters { cell: cell.id });
    }
    let count = cell.voters.len() + cell.learners.len();
    if count > CELL_REPLICAS_MAX {
        return Err(TopologyError::TooManyReplicas { cell: cell.id, count });
    }
    let mut roles: HashMap<NodeId, ReplicaRole> = HashMap::with_capacity(count);
    for (role, nodes) in [(ReplicaRole::Voter, &cell.voters), (ReplicaRole::Learner, &cell.learners)] {
        for &node in nodes {
            if !places.contains_key(&node) {
                return Err(TopologyError::UnknownReplica { cell: cell.id, role, node });
            }
            match roles.insert(node, role) {
                None => {}
                Some(first) if first == role => {
                    return Err(TopologyError::DuplicateReplica { cell: cell.id, role, node })
                }
                Some(_) => return Err(TopologyError::VoterAndLearner { cell: cell.id, node }),
            }
        }
    }
    Ok(())
}

fn check_leader_preference(cell: &Cell, datacenter_names: &HashSet<&str>) -> Result<(), TopologyError> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(cell.leader_preference.len());
    for name in &cell.leader_preference {
        if !datacenter_names.contains(name.as_str()) {
            return Err(TopologyError::UnknownPreferredDatacenter { cell: cell.id, name: excerpt(name) });
        }
        if !seen.insert(name) {
            return Err(TopologyError::DuplicatePreferredDatacenter { cell: cell.id, name: name.clone() });
        }
    }
    Ok(())
}

/// Reads at most [`FILE_BYTES_MAX`] bytes (and one more, to notice a longer file).
fn read_bounded(path: &Path) -> Result<String, TopologyError> {
    let file = std::fs::File::open(path).map_err(TopologyError::Read)?;
    let mut text = String::new();
    file.take(FILE_BYTES_MAX as u64 + 1).read_to_string(&mut text).map_err(TopologyError::Read)?;
    if text.len() > FILE_BYTES_MAX {
        return Err(TopologyError::TooLarge { bytes: text.len() });
    }
    Ok(text)
}

/// Cell `position` (0-based) of `cells`: a contiguous, near-equal share of [`SHARDS_DEFAULT`].
fn local_shards(position: u32, cells: u32) -> Vec<u32> {
    let share = |position: u32| u64::from(position) * u64::from(SHARDS_DEFAULT) / u64::from(cells);
    // Both bounds are at most SHARDS_DEFAULT, so they fit a u32.
    (share(position) as u32..share(position + 1) as u32).collect()
}

/// Cell `position` (0-based): datacenter `position % 5` first, then the rest of
/// its region, then the other datacenters in file order.
fn local_leader_preference(position: usize) -> Vec<String> {
    let datacenters: Vec<(&str, &str)> = LOCAL_LAYOUT
        .iter()
        .flat_map(|&(region, datacenters)| datacenters.iter().map(move |&datacenter| (region, datacenter)))
        .collect();
    let (first_region, first_datacenter) = datacenters[position % datacenters.len()];
    let same_region = datacenters.iter().filter(|&&(region, name)| region == first_region && name != first_datacenter);
    let other_regions = datacenters.iter().filter(|&&(region, _)| region != first_region);
    std::iter::once(first_datacenter)
        .chain(same_region.chain(other_regions).map(|&(_, name)| name))
        .map(str::to_owned)
        .collect()
}

/// Parses a shard range as written in the file: `"N"` or `"N-M"` with `N <= M`,
/// decimal digits only.
fn parse_shard_range(text: &str) -> Option<(u32, u32)> {
    let (start, end) = text.split_once('-').unwrap_or((text, text));
    let number = |digits: &str| -> Option<u32> {
        if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let (start, end) = (number(start)?, number(end)?);
    (start <= end).then_some((start, end))
}

/// Writes sorted shards as compact ranges: `[0, 1, 2, 5]` → `["0-2", "5"]`.
pub fn shard_ranges(shards: &[u32]) -> Vec<String> {
    let mut ranges = Vec::new();
    let mut shards = shards.iter().copied().peekable();
    while let Some(start) = shards.next() {
        let mut end = start;
        while let Some(next) = shards.next_if(|&next| end.checked_add(1) == Some(next)) {
            end = next;
        }
        ranges.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
    }
    ranges
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for character in text.chars() {
        match character {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            character if character.is_control() => quoted.push_str(&format!("\\u{:04X}", u32::from(character))),
            character => quoted.push(character),
        }
    }
    quoted.push('"');
    quoted
}

fn join_ids(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// User input quoted in an error: at most [`EXCERPT_BYTES_MAX`] bytes of it.
fn excerpt(text: &str) -> String {
    if text.len() <= EXCERPT_BYTES_MAX {
        return text.to_owned();
    }
    let mut end = EXCERPT_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The file's shape. Public types carry no serde; these private ones do.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyFile {
    #[serde(default = "shards_default")]
    shards: u32,
    latency: Option<LatencyFile>,
    #[serde(default, rename = "region")]
    regions: Vec<RegionFile>,
    #[serde(default, rename = "cell")]
    cells: Vec<CellFile>,
    #[serde(default, rename = "ledger")]
    ledgers: Vec<LedgerFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    id: u32,
    name: String,
    asset_scale: u8,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyFile {
    enabled: bool,
    same_datacenter_us: u64,
    same_region_us: u64,
    cross_region_us: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionFile {
    name: String,
    #[serde(default, rename = "datacenter")]
    datacenters: Vec<DatacenterFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatacenterFile {
    name: String,
    #[serde(default, rename = "node")]
    nodes: Vec<NodeFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    id: NodeId,
    peer: String,
    client: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CellFile {
    id: CellId,
    shards: Vec<String>,
    voters: Vec<NodeId>,
    #[serde(default)]
    learners: Vec<NodeId>,
    #[serde(default)]
    leader_preference: Vec<String>,
}

fn shards_default() -> u32 {
    SHARDS_DEFAULT
}

impl TopologyFile {
    /// Converts and validates, in file order: shards and latency, then regions
    /// and nodes, then cells. Shard ranges are expanded one shard at a time
    /// into the owner table, so a file can never make us expand more than
    /// `shards` shards.
    fn into_topology(self) -> Result<Topology, TopologyError> {
        check_shard_count(self.shards)?;
        let latency = self.latency.map_or(Latency::DISABLED, |latency| Latency {
            enabled: latency.enabled,
            same_datacenter_us: latency.same_datacenter_us,
            same_region_us: latency.same_region_us,
            cross_region_us: latency.cross_region_us,
        });
        check_latency(&latency)?;
        let regions = self.regions.into_iter().map(RegionFile::into_region).collect::<Result<Vec<_>, _>>()?;
        index_nodes(&regions)?;
        index_cells(self.cells.iter().map(|cell| cell.id))?;
        let mut owners = ShardOwners::new(self.shards);
        let cells = self.cells.into_iter().map(|cell| cell.into_cell(&mut owners)).collect::<Result<Vec<_>, _>>()?;
        let ledgers = self
            .ledgers
            .into_iter()
            .map(|ledger| LedgerDefinition { id: ledger.id, name: ledger.name, asset_scale: ledger.asset_scale })
            .collect();
        Topology::new(self.shards, latency, regions, cells)?.with_ledgers(ledgers)
    }
}

impl RegionFile {
    fn into_region(self) -> Result<Region, TopologyError> {
        let datacenters = self
            .datacenters
            .into_iter()
            .map(|datacenter| {
                let nodes = datacenter.nodes.into_iter().map(NodeFile::into_node).collect::<Result<Vec<_>, _>>()?;
                Ok(Datacenter { name: datacenter.name, nodes })
            })
            .collect::<Result<Vec<_>, TopologyError>>()?;
        Ok(Region { name: self.name, datacenters })
    }
}

impl NodeFile {
    fn into_node(self) -> Result<NodeSpec, TopologyError> {
        let address = |kind: AddressKind, text: &str| {
            text.parse::<SocketAddr>().map_err(|error| TopologyError::InvalidAddress {
                node: self.id,
                kind,
                address: excerpt(text),
                error,
            })
        };
        Ok(NodeSpec {
            id: self.id,
            peer_address: address(AddressKind::Peer, &self.peer)?,
            client_address: address(AddressKind::Client, &self.client)?,
        })
    }
}

impl CellFile {
    /// Expands the shard ranges, claiming each shard for this cell.
    fn into_cell(self, owners: &mut ShardOwners) -> Result<Cell, TopologyError> {
        let cell = self.id;
        let mut shards = Vec::new();
        for text in &self.shards {
            let Some((start, end)) = parse_shard_range(text) else {
                return Err(TopologyError::ShardRangeSyntax { cell, range: excerpt(text) });
            };
            if end >= owners.shards {
                return Err(TopologyError::ShardOutOfRange { cell, range: excerpt(text), shards: owners.shards });
            }
            for shard in start..=end {
                owners.claim(cell, shard)?;
                shards.push(shard);
            }
        }
        shards.sort_unstable();
        Ok(Cell {
            id: cell,
            shards,
            voters: self.voters,
            learners: self.learners,
            leader_preference: self.leader_preference,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_range_syntax() {
        assert_eq!(parse_shard_range("7"), Some((7, 7)));
        assert_eq!(parse_shard_range("0-24"), Some((0, 24)));
        assert_eq!(parse_shard_range("007-8"), Some((7, 8)));
        for bad in ["", "-", "1-", "-1", "+1", "1 - 2", " 1", "2-1", "1-2-3", "a", "1-b", "99999999999", "١"] {
            assert_eq!(parse_shard_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn compact_ranges() {
        assert_eq!(shard_ranges(&[]), Vec::<String>::new());
        assert_eq!(shard_ranges(&[0, 1, 2, 5, 7, 8]), ["0-2", "5", "7-8"]);
        assert_eq!(shard_ranges(&[u32::MAX - 1, u32::MAX]), [format!("{}-{}", u32::MAX - 1, u32::MAX)]);
    }

    #[test]
    fn toml_strings_round_trip() {
        for text in ["plain", "quote \" and \\ backslash", "tab\tnewline\n\u{7f}", "ünïcode"] {
            let value: toml::Value = toml::from_str(&format!("key = {}", toml_string(text))).unwrap();
            assert_eq!(value["key"].as_str(), Some(text));
        }
    }

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt("short"), "short");
        let long = "é".repeat(100);
        let cut = excerpt(&long);
        assert!(cut.len() <= EXCERPT_BYTES_MAX + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn local_shares_are_contiguous_and_near_equal() {
        for cells in [1, 3, 7, 100, 150] {
            let shares: Vec<Vec<u32>> = (0..cells).map(|position| local_shards(position, cells)).collect();
            let all: Vec<u32> = shares.concat();
            assert_eq!(all, (0..SHARDS_DEFAULT).collect::<Vec<_>>());
            let sizes: Vec<usize> = shares.iter().map(Vec::len).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
    }
}
