//! The node: one process hosting a replica of every cell the topology places
//! on it. One engine thread drives all of them.
//!
//! Each cell is a Raft group (the `raft` crate: a sans-I/O consensus core,
//! see ARCHITECTURE.md). The engine owns every replica's Raft state machine,
//! ledger and history store, the node's one write-ahead log, and the
//! transport to the other nodes. A round of the engine:
//!
//! 1. take what arrived: client requests (a bounded queue), messages from
//!    peers (a bounded inbox), and the clock's ticks;
//! 2. the leader of a cell turns each write request into one log entry (the
//!    request's events with the timestamp the leader chose for it) and
//!    proposes it; reads wait for a read index (linearizable reads);
//! 3. collect every replica's `Ready`: send its messages, append its new
//!    entries and hard state to the write-ahead log, then sync **once** for
//!    the whole node (group commit across cells), then send the messages that
//!    needed the sync (votes, append responses);
//! 4. apply committed entries to the ledger in log order, answer the
//!    requests this node proposed, serve the reads whose index is applied;
//! 5. checkpoint a cell whose ledger holds enough new transfers: its delta
//!    goes to the history store (durable) off the hot path; then its log is
//!    compacted and the write-ahead log truncated.
//!
//! Nothing is acknowledged before it is committed: durable on a majority of
//! the cell's voters (this node's own copy included when it is the leader).
//! A write whose outcome the node cannot know (leadership lost before its
//! entry committed) is answered `unavailable` or `timeout`: a retry with the
//! same ids is safe, because transfers are idempotent by id.
//!
//! Recovery: each cell's ledger is restored from its store checkpoint (which
//! records the last applied index), the write-ahead log rebuilds each cell's
//! Raft log and hard state, and Raft then hands over the committed entries
//! after the checkpoint, which are applied with their recorded timestamps.
//! The ledger is deterministic, so every replica that applied the same
//! entries has the same state.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use cellpay_cluster::ledgers::{LedgerDefinition, LedgerTable};
use cellpay_cluster::routing::{RoutingChange, RoutingTable};
use cellpay_cluster::topology::{CellId, NodeId, Topology, GLOBAL_CELL};
use cellpay_cluster::topology_table::{TopologyTable, TOPOLOGY_TEXT_BYTES_MAX};
use cellpay_cluster::transport::{Deliver, PeerConfig, Transport, TransportConfig};
use cellpay_ledger::{
    Account, AccountBalance, AccountFilter, CheckpointDelta, CreateAccountResult, CreateTransferResult, FilterError,
    Ledger, LedgerConfig, Transfer, TransferFlags, BATCH_EVENTS_MAX,
};
use cellpay_storage::store::{Store, StoreDatabase, StoreError};
use crossbeam_channel::{bounded, select, Receiver, Sender, TryRecvError, TrySendError};
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType,
    Ready, Snapshot,
};
use raft::{RawNode, StateRole};
use tokio::sync::oneshot;

use crate::cell_state::{self, CellState};
use crate::cross_cell::{self, Apply, Effects, Item, Triage};
use crate::metrics::Metrics;
use crate::raft_log::{CellLog, LogBase, NodeLog, NodeLogError};
use crate::record::{self, Record, RecordError};
use crate::snapshot::{self, PeerMessage, SnapshotReceiver, SnapshotSender, Staged};
use crate::world::{Bug, Fault, RealWorld, World};

/// A node's limits and tuning.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub ledger: LedgerConfig,
    /// The cluster, and which of its nodes this is.
    pub topology: Arc<Topology>,
    pub node: NodeId,
    /// Requests waiting for the engine; past this, requests are refused as overloaded.
    pub queue_requests_max: usize,
    /// Messages from peers waiting for the engine; past this they are dropped
    /// (Raft retries) and counted.
    pub inbox_messages_max: usize,
    /// Bytes queued toward one peer (messages to a peer that is down wait
    /// here, and are delivered when it is back, until this fills).
    pub peer_queue_bytes_max: usize,
    /// Requests taken in one engine round.
    pub group_requests_max: usize,
    /// Checkpoint a cell once this many transfers are held in memory.
    pub checkpoint_transfers_max: usize,
    /// A cell that applied anything since its last checkpoint checkpoints
    /// at least this often, however few transfers it holds: this bounds how
    /// long a quiet cell holds the node's shared log from being truncated,
    /// and the log a restart replays. Under load the window
    /// (`checkpoint_transfers_max`) comes first: this must be long enough
    /// not to cut the window short (at 10 s, a cell taking 7,000 transfers/s
    /// checkpointed every 70,000 transfers and rewrote most of its accounts
    /// each time, see BENCHMARKS.md).
    pub checkpoint_interval_max: Duration,
    /// One Raft tick.
    pub tick_interval: Duration,
    /// Ticks without a leader's heartbeat before a follower campaigns
    /// (randomised in `[election_ticks, 2 × election_ticks)`).
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Bytes of log entries kept beyond a checkpoint, for followers that lag.
    pub log_retained_bytes: u64,
    /// Entries of uncommitted proposals a leader holds before refusing more.
    pub uncommitted_bytes_max: u64,
    /// How long a write waits for its entry to commit before it is answered
    /// `timeout` (outcome unknown: retry with the same ids).
    pub proposal_timeout: Duration,
}

impl NodeConfig {
    /// A node alone: a one-node cluster with one cell owning every shard.
    pub fn new(data_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig::cluster(data_dir, Arc::new(single_node_topology()), 1)
    }

    /// Node `node` of `topology`.
    pub fn cluster(data_dir: impl Into<PathBuf>, topology: Arc<Topology>, node: NodeId) -> NodeConfig {
        NodeConfig {
            data_dir: data_dir.into(),
            ledger: LedgerConfig::default(),
            topology,
            node,
            queue_requests_max: 1024,
            inbox_messages_max: 16 * 1024,
            peer_queue_bytes_max: 64 << 20,
            group_requests_max: 256,
            checkpoint_transfers_max: 1 << 18,
            checkpoint_interval_max: Duration::from_secs(60),
            tick_interval: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            log_retained_bytes: 64 << 20,
            uncommitted_bytes_max: 256 << 20,
            proposal_timeout: Duration::from_secs(10),
        }
    }
}

/// A cluster of one node (id 1) with one cell (id 1) owning every shard. Its
/// addresses are never dialled: a node alone has no peers.
pub fn single_node_topology() -> Topology {
    use cellpay_cluster::topology::{Cell, Datacenter, Latency, NodeSpec, Region, SHARDS_DEFAULT};
    let node = NodeSpec { id: 1, peer_address: ([127, 0, 0, 1], 1).into(), client_address: ([127, 0, 0, 1], 2).into() };
    let datacenter = Datacenter { name: "local".to_string(), nodes: vec![node] };
    let region = Region { name: "local".to_string(), datacenters: vec![datacenter] };
    let cell = Cell {
        id: 1,
        shards: (0..SHARDS_DEFAULT).collect(),
        voters: vec![1],
        learners: Vec::new(),
        leader_preference: vec!["local".to_string()],
    };
    let latency = Latency { enabled: false, same_datacenter_us: 0, same_region_us: 0, cross_region_us: 0 };
    Topology::new(SHARDS_DEFAULT, latency, vec![region], vec![cell])
        .and_then(|topology| topology.with_ledgers(vec![LedgerDefinition::local()]))
        .expect("the single-node topology is valid")
}

/// A request to the node.
#[derive(Clone, Debug)]
pub enum Request {
    CreateAccounts(Vec<Account>),
    CreateTransfers(Vec<Transfer>),
    LookupAccounts(Vec<u128>),
    LookupTransfers(Vec<u128>),
    GetAccountTransfers(AccountFilter),
    GetAccountBalances(AccountFilter),
    /// Operator: change the routing table (served by the global cell's leader).
    ChangeRouting {
        expected_version: u64,
        change: RoutingChange,
    },
    /// Operator: release (`owned: false`) or acquire a shard in `cell`
    /// (served by its leader). One step of moving a shard (see `cell_state`).
    ShardOwnership {
        cell: CellId,
        shard: u32,
        owned: bool,
    },
    /// Operator: define a ledger (served by the global cell's leader), if
    /// the definitions are still at `expected_version`.
    DefineLedger {
        expected_version: u64,
        definition: LedgerDefinition,
    },
    /// Operator: change the topology held by the global cell (served by its
    /// leader) to `topology`, if it is still at `expected_version`. Only the
    /// cells' leader preferences may change (`cluster::topology_table`).
    ChangeTopology {
        expected_version: u64,
        topology: Arc<Topology>,
    },
}

impl Request {
    pub fn operation(&self) -> &'static str {
        match self {
            Request::CreateAccounts(_) => "create_accounts",
            Request::CreateTransfers(_) => "create_transfers",
            Request::LookupAccounts(_) => "lookup_accounts",
            Request::LookupTransfers(_) => "lookup_transfers",
            Request::GetAccountTransfers(_) => "get_account_transfers",
            Request::GetAccountBalances(_) => "get_account_balances",
            Request::ChangeRouting { .. } => "change_routing",
            Request::ShardOwnership { .. } => "shard_ownership",
            Request::DefineLedger { .. } => "define_ledger",
            Request::ChangeTopology { .. } => "change_topology",
        }
    }

    /// How many events (or ids) the request carries; 1 for a query or a change.
    pub fn events(&self) -> usize {
        match self {
            Request::CreateAccounts(events) => events.len(),
            Request::CreateTransfers(events) => events.len(),
            Request::LookupAccounts(ids) | Request::LookupTransfers(ids) => ids.len(),
            Request::GetAccountTransfers(_) | Request::GetAccountBalances(_) => 1,
            Request::ChangeRouting { .. }
            | Request::ShardOwnership { .. }
            | Request::DefineLedger { .. }
            | Request::ChangeTopology { .. } => 1,
        }
    }

    fn is_write(&self) -> bool {
        !matches!(
            self,
            Request::LookupAccounts(_)
                | Request::LookupTransfers(_)
                | Request::GetAccountTransfers(_)
                | Request::GetAccountBalances(_)
        )
    }
}

/// The answer to a [`Request`], variant for variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    CreateAccounts(Vec<CreateAccountResult>),
    CreateTransfers(Vec<CreateTransferResult>),
    Accounts(Vec<Account>),
    Transfers(Vec<Transfer>),
    Balances(Vec<AccountBalance>),
    /// The routing table a change made.
    RoutingChanged(RoutingTable),
    /// A shard was released or acquired.
    ShardOwnership,
    /// The ledger definitions a definition made.
    LedgersChanged(LedgerTable),
    /// The topology a change made.
    TopologyChanged(TopologyTable),
}

/// Why a request was refused as a whole. Except for `Timeout` (and
/// `NotLeader` of a write this node had proposed), nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("the node's queue is full ({queue_requests_max} requests): retry later")]
    Overloaded { queue_requests_max: usize },
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("a request must carry at least one event")]
    BatchEmpty,
    #[error("a request carries {events} events; the limit is {BATCH_EVENTS_MAX}")]
    BatchTooLarge { events: usize },
    #[error("invalid filter: {0}")]
    InvalidFilter(FilterError),
    #[error("this node's replica of cell {cell} is not its leader ({}): retry with the same ids", leader_text(*.leader))]
    NotLeader { cell: CellId, leader: Option<NodeId> },
    #[error("this node hosts no replica of cell {cell}")]
    CellNotHosted { cell: CellId },
    #[error(
        "events {first_index} and {index} belong to cells {first_cell} and {cell}: a request's events must \
         belong to one cell (cross-cell transfers need the gateway)"
    )]
    CrossCell { first_index: usize, first_cell: CellId, index: usize, cell: CellId },
    #[error(
        "cell {cell} did not commit the write within {timeout_ms} ms: its outcome is unknown; retry with the same ids"
    )]
    Timeout { cell: CellId, timeout_ms: u64 },
    #[error("cell {cell} is unavailable: {reason}; retry with the same ids")]
    Unavailable { cell: CellId, reason: String },
    #[error(
        "cell {cell} does not own account {account}: cell {owner} does, by routing table version \
         {routing_version}; nothing was applied: refresh the routing table and resend"
    )]
    Misrouted { cell: CellId, account: u128, owner: CellId, routing_version: u64 },
    /// An operator's change (routing, shard ownership) was refused: nothing changed.
    #[error("cell {cell} refused the change: {reason}; nothing changed")]
    ChangeRefused { cell: CellId, reason: String },
    /// The write was proposed but the node stopped (or replaced its state by
    /// a snapshot) before learning whether it committed.
    #[error("cell {cell}: {reason}: the write's outcome is unknown; retry with the same ids")]
    OutcomeUnknown { cell: CellId, reason: String },
    /// A call forwarded to the leader failed in a way that does not say
    /// whether the leader applied it (the connection broke, it timed out).
    #[error("cell {cell}: the call forwarded to leader node {node} failed ({reason}): its outcome is unknown; retry with the same ids")]
    ForwardFailed { cell: CellId, node: NodeId, reason: String },
}

impl NodeError {
    /// Whether the refusal guarantees that nothing was applied, so the
    /// request may be retried and answered exactly as if it were the first
    /// attempt (no `exists` for its own events).
    pub fn nothing_applied(&self) -> bool {
        !matches!(self, NodeError::Timeout { .. } | NodeError::ForwardFailed { .. } | NodeError::OutcomeUnknown { .. })
    }
}

fn leader_text(leader: Option<NodeId>) -> String {
    match leader {
        Some(node) => format!("the leader is node {node}"),
        None => "no leader is known".to_string(),
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("node {node} is not in the topology")]
    UnknownNode { node: NodeId },
    #[error("the topology takes {bytes} bytes as a file, over the global cell's limit of {TOPOLOGY_TEXT_BYTES_MAX}")]
    TopologyTooLarge { bytes: usize },
    #[error("history store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Log(#[from] NodeLogError),
    #[error(
        "cell {cell}: the store's checkpoint covers entry {checkpoint_index} but the log holds only \
         {log_first}..={log_last}: the log lost entries the store depends on"
    )]
    LogMismatch { cell: CellId, checkpoint_index: u64, log_first: u64, log_last: u64 },
    #[error("cell {cell}: consensus: {source}")]
    Raft { cell: CellId, source: raft::Error },
    #[error("cell {cell}: log entry {index}: {source}")]
    Record { cell: CellId, index: u64, source: RecordError },
    #[error("transport: {0}")]
    Transport(String),
}

/// What recovery found, for the start-up log line.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    /// Every cell's checkpointed index and committed entries re-applied.
    pub cells: Vec<CellRecovery>,
    /// Ledger records (requests and pulses) re-applied after the
    /// checkpoints, all cells together; Raft's own empty entries not counted.
    pub records_replayed: u64,
    pub torn_tail_bytes_cut: u64,
    pub accounts: usize,
    pub pending_open: usize,
    pub wal_op_last: u64,
}

#[derive(Clone, Debug, Default)]
pub struct CellRecovery {
    pub cell: CellId,
    pub checkpoint_index: u64,
    pub log_first: u64,
    pub log_last: u64,
    pub commit: u64,
    /// Ledger records re-applied after the checkpoint.
    pub records_replayed: u64,
}

/// What every handle may know of a cell, published by the engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CellStatus {
    pub cell: CellId,
    pub role: &'static str,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub log_first: u64,
    pub log_last: u64,
    pub log_bytes: u64,
    pub checkpoint_index: u64,
    pub elections: u64,
    /// Snapshots this replica installed since the process started.
    pub snapshots_installed: u64,
    /// The cell's membership as this replica knows it.
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// The ledger's state hash (see `Ledger::state_hash`) at index
    /// `state_hash_index`: computed when the cell has been idle for a second,
    /// so replicas of a quiescent cell can be compared.
    pub state_hash: u64,
    pub state_hash_index: u64,
    pub accounts: usize,
    /// The version of the ledger definitions this replica's log has adopted.
    pub ledgers_version: u64,
}

/// The node's published status: one entry per hosted cell, and its links.
pub struct StatusBoard {
    cells: RwLock<BTreeMap<CellId, CellStatus>>,
    peers: RwLock<Vec<PeerStatus>>,
    /// The routing table requests are routed by (the global cell's, as
    /// this node's replica has applied it), and its watchers.
    routing: tokio::sync::watch::Sender<Arc<RoutingTable>>,
    /// The global cell's ledger definitions as this node's replica has
    /// applied them (what its cells' leaders adopt), and their watchers.
    ledgers: tokio::sync::watch::Sender<Arc<LedgerTable>>,
    /// The global cell's topology as this node's replica has applied it
    /// (what it places leaders by), and its watchers.
    topology: tokio::sync::watch::Sender<Arc<TopologyTable>>,
}

/// Publishes `value` (at `version`) to a watch if it is newer than the one it holds.
fn publish_newer<T: Clone>(
    sender: &tokio::sync::watch::Sender<Arc<T>>,
    value: &T,
    version: u64,
    version_of: impl Fn(&T) -> u64,
) {
    sender.send_if_modified(|current| {
        let newer = version > version_of(current);
        if newer {
            *current = Arc::new(value.clone());
        }
        newer
    });
}

/// Whether this node's outbound link to a peer is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub node: NodeId,
    pub connected: bool,
}

impl StatusBoard {
    /// The topology's routing table, ledger definitions and itself (each at version 1).
    pub fn initial(topology: &Topology) -> StatusBoard {
        let (routing, _) = tokio::sync::watch::channel(Arc::new(RoutingTable::initial(topology)));
        let (ledgers, _) = tokio::sync::watch::channel(Arc::new(topology.initial_ledgers()));
        let (topology, _) = tokio::sync::watch::channel(Arc::new(TopologyTable::initial(topology)));
        StatusBoard { cells: RwLock::default(), peers: RwLock::default(), routing, ledgers, topology }
    }

    /// The topology: the file's (version 1) until this node's replica of
    /// the global cell applies a change.
    pub fn topology(&self) -> Arc<TopologyTable> {
        self.topology.borrow().clone()
    }

    /// A watch of the topology (`GET /v1/cluster/topology?newer_than=V`).
    pub fn topology_watch(&self) -> tokio::sync::watch::Receiver<Arc<TopologyTable>> {
        self.topology.subscribe()
    }

    /// Publishes a topology if it is newer than the one published.
    fn publish_topology(&self, table: &TopologyTable) {
        publish_newer(&self.topology, table, table.version(), |current| current.version());
    }

    /// The ledger definitions: the topology's (version 1) until this node's
    /// replica of the global cell applies a definition.
    pub fn ledgers(&self) -> Arc<LedgerTable> {
        self.ledgers.borrow().clone()
    }

    /// A watch of the ledger definitions (`GET /v1/cluster/ledgers?newer_than=V`).
    pub fn ledgers_watch(&self) -> tokio::sync::watch::Receiver<Arc<LedgerTable>> {
        self.ledgers.subscribe()
    }

    /// Publishes definitions if they are newer than the ones published.
    fn publish_ledgers(&self, table: &LedgerTable) {
        publish_newer(&self.ledgers, table, table.version(), |current| current.version());
    }

    /// The routing table this node routes by: the topology's (version 1)
    /// until this node's replica of the global cell applies a change.
    pub fn routing(&self) -> Arc<RoutingTable> {
        self.routing.borrow().clone()
    }

    /// A watch of the routing table: it sees every newer version this node
    /// learns (`GET /v1/cluster/routing?newer_than=V` waits on it).
    pub fn routing_watch(&self) -> tokio::sync::watch::Receiver<Arc<RoutingTable>> {
        self.routing.subscribe()
    }

    /// Publishes a table if it is newer than the one published.
    fn publish_routing(&self, table: &RoutingTable) {
        publish_newer(&self.routing, table, table.version(), |current| current.version());
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        self.peers.read().expect("status lock").clone()
    }

    pub fn cells(&self) -> Vec<CellStatus> {
        self.cells.read().expect("status lock").values().cloned().collect()
    }

    pub fn cell(&self, cell: CellId) -> Option<CellStatus> {
        self.cells.read().expect("status lock").get(&cell).cloned()
    }

    fn publish(&self, status: CellStatus) {
        self.cells.write().expect("status lock").insert(status.cell, status);
    }
}

/// An operator's command to the engine.
enum Control {
    /// Move every leader out of `region` and keep them out (`drained`), or
    /// let them return (`!drained`).
    Drain { region: String, drained: bool },
    /// Propose a membership change of `cell` (this node must lead it).
    Membership { cell: CellId, changes: Vec<MembershipChange>, reply: oneshot::Sender<Result<(), NodeError>> },
}

/// One step of a membership change. Several in one request are applied
/// together (joint consensus), e.g. promote a learner and remove a voter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a non-voting replica: it is sent the log (or a snapshot) and applies it.
    AddLearner(NodeId),
    /// Make a node a voter (a learner is promoted).
    AddVoter(NodeId),
    /// Remove a replica.
    Remove(NodeId),
}

struct Envelope {
    cell: CellId,
    request: Request,
    reply: oneshot::Sender<Result<Reply, NodeError>>,
    queued_at: Instant,
}

/// A cheap, cloneable handle for submitting requests to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    sender: Sender<Envelope>,
    control: Sender<Control>,
    forwarder: Arc<crate::forward::Forwarder>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    topology: Arc<Topology>,
    node: NodeId,
    queue_requests_max: usize,
    stop: Arc<AtomicU8>,
    /// The node's peer transport, not kept alive by handles (its snapshot
    /// receiver's thread ends only when the transport is dropped).
    transport: Weak<Transport>,
}

/// A node's link to a peer, as its transport sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLink {
    pub peer: NodeId,
    /// The outbound connection is up.
    pub connected: bool,
    /// The link is cut ([`NodeHandle::set_link_blocked`]).
    pub blocked: bool,
}

/// Where a request comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A client: forwarded to the cell's leader if this node does not lead it.
    Client,
    /// Another node forwarded it: served here or refused, never forwarded again.
    Forwarded,
}

/// How long a leader waits for a majority to confirm a read index.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client's request waits for its cell to have a reachable leader.
pub const LEADER_WAIT: Duration = Duration::from_secs(5);

/// Operator commands waiting for the engine.
const CONTROLS_QUEUED_MAX: usize = 64;
/// A leader checks every this many ticks whether a better-placed replica should lead.
const PREFERENCE_CHECK_TICKS: u64 = 5;

/// A replica's state hash (in its status) is computed once it has applied
/// nothing for this many ticks (one second by default): under load a cell
/// pauses for a tick now and then, and hashing a cell of a million accounts
/// at every such pause cost half the machine's CPU in a five-node benchmark.
const STATE_HASH_IDLE_TICKS: u32 = 10;
/// How long a cell's leader waits for its adoption of the ledger
/// definitions to apply before it proposes it again.
const ADOPT_RETRY: Duration = Duration::from_secs(1);

/// The engine's run state, shared with handles.
const RUNNING: u8 = 0;
/// Finish the queued requests, write a final checkpoint, stop.
const STOP: u8 = 1;
/// Stop at once, skipping the final checkpoint (the next start replays the log).
const HALT: u8 = 2;

impl NodeHandle {
    /// Validates the request's shape, routes it to its cell, queues it for
    /// the engine, and waits for its answer. Refuses at once (never blocks)
    /// when the queue is full. A request whose events span cells is refused;
    /// lookups are split by cell and their answers merged.
    pub async fn submit(&self, request: Request) -> Result<Reply, NodeError> {
        self.submit_from(request, Origin::Client).await
    }

    /// As [`NodeHandle::submit`]; a request for a cell this node does not
    /// lead is forwarded to the leader unless it was itself forwarded.
    pub async fn submit_from(&self, request: Request, origin: Origin) -> Result<Reply, NodeError> {
        let operation = request.operation();
        let result = self.submit_inner(request, origin).await;
        self.metrics.request(operation, outcome_name(&result));
        result
    }

    /// A request another node forwarded for one cell (named in the call):
    /// served by this node's replica of that cell only, never split across
    /// cells or forwarded again. (A lookup of transfers is split by the node
    /// that forwards it; re-splitting it here would send the other cells'
    /// parts to replicas of this node that do not lead them.) The cell
    /// refuses accounts of shards it does not own (`misrouted`): the
    /// forwarding node's table may be older or newer than this one's.
    pub async fn submit_forwarded(&self, cell: CellId, request: Request) -> Result<Reply, NodeError> {
        let operation = request.operation();
        let result = match validate(&request) {
            Ok(()) => self.submit_routed(cell, request, Origin::Forwarded).await,
            Err(error) => Err(error),
        };
        self.metrics.request(operation, outcome_name(&result));
        result
    }

    async fn submit_inner(&self, request: Request, origin: Origin) -> Result<Reply, NodeError> {
        validate(&request)?;
        let routing = self.status.routing();
        match route(&self.topology, &routing, &request)? {
            Route::Cell(cell) => self.submit_routed(cell, request, origin).await,
            Route::Split(parts) => {
                let ids = match &request {
                    Request::LookupAccounts(ids) | Request::LookupTransfers(ids) => ids.clone(),
                    _ => unreachable!("only lookups are split"),
                };
                let mut accounts: Vec<Account> = Vec::new();
                let mut transfers: Vec<Transfer> = Vec::new();
                for (cell, part) in parts {
                    match self.submit_routed(cell, part, origin).await? {
                        Reply::Accounts(part) => accounts.extend(part),
                        Reply::Transfers(part) => transfers.extend(part),
                        other => unreachable!("a lookup answered {other:?}"),
                    }
                }
                Ok(match request {
                    Request::LookupAccounts(_) => Reply::Accounts(in_request_order(&ids, accounts, |a| a.id)),
                    // The two legs of a cross-cell transfer, as the client sent it.
                    _ => Reply::Transfers(crate::gateway::split::merge_found_with(
                        &ids,
                        transfers,
                        |t| t.id,
                        cross_cell::merge_legs,
                    )),
                })
            }
        }
    }

    /// Submits a request for one cell here, or to its leader if this node's
    /// replica does not lead it. While the cell has no reachable leader (an
    /// election, a leader transfer), a client's request waits and is retried
    /// for up to [`LEADER_WAIT`]: a refusal for want of a leader means the
    /// request was not applied, so the retry is exact. A forwarded call whose
    /// outcome is unknown (the leader crashed during it) is not retried here:
    /// the client is told, and its own retry answers `exists` for what was
    /// applied.
    async fn submit_routed(&self, cell: CellId, request: Request, origin: Origin) -> Result<Reply, NodeError> {
        if origin == Origin::Forwarded {
            return self.submit_once(cell, request, origin).await;
        }
        let deadline = Instant::now() + LEADER_WAIT;
        let mut delay = Duration::from_millis(10);
        loop {
            match self.submit_once(cell, request.clone(), origin).await {
                Err(NodeError::NotLeader { .. } | NodeError::Unavailable { .. })
                    if Instant::now() + delay < deadline =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    async fn submit_once(&self, cell: CellId, request: Request, origin: Origin) -> Result<Reply, NodeError> {
        let hosted = self.status.cell(cell);
        let leader = hosted.as_ref().and_then(|status| status.leader);
        let local = hosted.is_some() && (leader == Some(self.node) || leader.is_none() || origin == Origin::Forwarded);
        if local {
            return match self.submit_cell(cell, request.clone()).await {
                Err(NodeError::NotLeader { leader: Some(leader), .. })
                    if origin == Origin::Client && leader != self.node =>
                {
                    self.forwarder.forward(&self.topology, leader, cell, request).await
                }
                other => other,
            };
        }
        match (leader, origin) {
            (Some(leader), Origin::Client) => self.forwarder.forward(&self.topology, leader, cell, request).await,
            (leader, _) => Err(NodeError::NotLeader { cell, leader }),
        }
    }

    /// An operator's change ([`Request::ChangeRouting`],
    /// [`Request::ShardOwnership`], [`Request::DefineLedger`]), served by this node only if its replica
    /// leads the cell; otherwise refused `NotLeader` naming the leader, for
    /// the operator's tool to resend there. Never forwarded.
    pub async fn submit_admin(&self, request: Request) -> Result<Reply, NodeError> {
        let cell = match &request {
            Request::ChangeRouting { .. } | Request::DefineLedger { .. } | Request::ChangeTopology { .. } => {
                GLOBAL_CELL
            }
            Request::ShardOwnership { cell, .. } => *cell,
            _ => return Err(NodeError::Unavailable { cell: GLOBAL_CELL, reason: "not an operator change".into() }),
        };
        let operation = request.operation();
        let result = self.submit_cell(cell, request).await;
        self.metrics.request(operation, outcome_name(&result));
        result
    }

    /// Submits a request for one cell to this node's replica of it.
    pub async fn submit_cell(&self, cell: CellId, request: Request) -> Result<Reply, NodeError> {
        if self.stop.load(Ordering::Acquire) != RUNNING {
            return Err(NodeError::ShuttingDown);
        }
        if self.status.cell(cell).is_none() {
            return Err(NodeError::CellNotHosted { cell });
        }
        let (reply, answer) = oneshot::channel();
        let envelope = Envelope { cell, request, reply, queued_at: Instant::now() };
        match self.sender.try_send(envelope) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(NodeError::Overloaded { queue_requests_max: self.queue_requests_max })
            }
            Err(TrySendError::Disconnected(_)) => return Err(NodeError::ShuttingDown),
        }
        self.metrics.queue_requests.inc();
        answer.await.unwrap_or(Err(NodeError::ShuttingDown))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn status(&self) -> &Arc<StatusBoard> {
        &self.status
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Moves every cell leader out of `region` (leader transfer to the most
    /// preferred caught-up replica elsewhere) and keeps them out, or lets
    /// them return (`drained = false`). Each node must be told: it governs
    /// the leaders it holds.
    pub fn set_region_drained(&self, region: &str, drained: bool) -> Result<(), NodeError> {
        let control = Control::Drain { region: region.to_string(), drained };
        self.control.try_send(control).map_err(|_| NodeError::Overloaded { queue_requests_max: CONTROLS_QUEUED_MAX })
    }

    /// Proposes a membership change of `cell` on this node, which must be the
    /// cell's leader; answers once the change is proposed (it takes effect
    /// when committed and applied: watch the cell's status).
    pub async fn change_membership(&self, cell: CellId, changes: Vec<MembershipChange>) -> Result<(), NodeError> {
        let (reply, answer) = oneshot::channel();
        let control = Control::Membership { cell, changes, reply };
        self.control
            .try_send(control)
            .map_err(|_| NodeError::Overloaded { queue_requests_max: CONTROLS_QUEUED_MAX })?;
        answer.await.unwrap_or(Err(NodeError::ShuttingDown))
    }

    pub fn is_running(&self) -> bool {
        self.stop.load(Ordering::Acquire) == RUNNING
    }

    /// Cuts (or restores) this node's link to `peer` both ways as this node
    /// sees it: messages to it are dropped, and from it (see
    /// [`Transport::set_blocked`]). How a local cluster's drills emulate a
    /// network cut; the peer must be told too for a symmetric cut. No-op
    /// for a node alone or stopped.
    pub fn set_link_blocked(&self, peer: NodeId, blocked: bool) {
        if let Some(transport) = self.transport.upgrade() {
            transport.set_blocked(peer, blocked);
        }
    }

    /// This node's links to its peers (none for a node alone or stopped).
    pub fn peer_links(&self) -> Vec<PeerLink> {
        let Some(transport) = self.transport.upgrade() else { return Vec::new() };
        let mut peers = transport.peers();
        peers.sort_unstable();
        let links = peers.into_iter().map(|peer| PeerLink {
            peer,
            connected: transport.peer_connected(peer),
            blocked: transport.is_blocked(peer),
        });
        links.collect()
    }
}

/// The metrics' name of a request's outcome.
fn outcome_name(result: &Result<Reply, NodeError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(NodeError::Overloaded { .. }) => "overloaded",
        Err(NodeError::ShuttingDown) => "shutting_down",
        Err(NodeError::NotLeader { .. }) => "not_leader",
        Err(NodeError::Timeout { .. }) => "timeout",
        Err(NodeError::Unavailable { .. }) => "unavailable",
        Err(NodeError::ForwardFailed { .. }) => "forward_failed",
        Err(NodeError::OutcomeUnknown { .. }) => "outcome_unknown",
        Err(_) => "invalid",
    }
}

/// `items` (each found at most once) in the order their ids appear in `ids`.
fn in_request_order<T>(ids: &[u128], items: Vec<T>, id_of: impl Fn(&T) -> u128) -> Vec<T> {
    let mut by_id: BTreeMap<u128, T> = items.into_iter().map(|item| (id_of(&item), item)).collect();
    ids.iter().filter_map(|id| by_id.remove(id)).collect()
}

fn validate(request: &Request) -> Result<(), NodeError> {
    match request {
        Request::GetAccountTransfers(filter) | Request::GetAccountBalances(filter) => {
            filter.validate().map_err(NodeError::InvalidFilter)
        }
        _ => {
            let events = request.events();
            if events == 0 {
                Err(NodeError::BatchEmpty)
            } else if events > BATCH_EVENTS_MAX {
                Err(NodeError::BatchTooLarge { events })
            } else {
                Ok(())
            }
        }
    }
}

/// Where a request goes.
enum Route {
    Cell(CellId),
    /// A lookup split into one request per cell.
    Split(Vec<(CellId, Request)>),
}

/// The first account `request` names whose shard the cell does not own by
/// its `state`. (A lookup of transfers names no account: transfer ids are
/// opaque, any cell may hold one; operator changes name none.) Transfers may
/// name other cells' accounts (cross-cell transfers), but not an account the
/// `routing` table places in this cell, nor, for the first event (the one
/// that makes this cell the coordinator), a debit account of another cell.
fn not_owned(state: &CellState, routing: &RoutingTable, cell: CellId, request: &Request) -> Option<u128> {
    match request {
        Request::CreateAccounts(accounts) => first_foreign(state, accounts.iter().map(|account| account.id)),
        Request::CreateTransfers(transfers) => {
            let home = transfers.first().map(|t| t.debit_account_id).filter(|&id| id != 0);
            if let Some(home) = home.filter(|&id| !state.owns_account(id)) {
                return Some(home);
            }
            transfer_accounts(transfers)
                .find(|&account| !state.owns_account(account) && routing.cell_of_account(account) == cell)
        }
        Request::GetAccountTransfers(filter) | Request::GetAccountBalances(filter) => {
            first_foreign(state, std::iter::once(filter.account_id))
        }
        Request::LookupAccounts(ids) => first_foreign(state, ids.iter().copied()),
        Request::LookupTransfers(_)
        | Request::ChangeRouting { .. }
        | Request::ShardOwnership { .. }
        | Request::DefineLedger { .. }
        | Request::ChangeTopology { .. } => None,
    }
}

/// The first of `accounts` whose shard the cell does not own by its `state`.
fn first_foreign(state: &CellState, mut accounts: impl Iterator<Item = u128>) -> Option<u128> {
    accounts.find(|&account| !state.owns_account(account))
}

/// The accounts transfers name (a post or void may name none: id 0).
fn transfer_accounts(transfers: &[Transfer]) -> impl Iterator<Item = u128> + '_ {
    transfers.iter().flat_map(|t| [t.debit_account_id, t.credit_account_id]).filter(|&id| id != 0)
}

/// Each event's (debit account's cell, credit account's cell) if any event
/// names an account of another cell, else `None` (a cell-local request).
/// An account is this cell's if its log owns it, else the `routing` table's
/// owner's; an absent account (0: a post or void) counts as this cell's.
fn cells_across(
    state: &CellState,
    routing: &RoutingTable,
    cell: CellId,
    transfers: &[Transfer],
) -> Option<Vec<(CellId, CellId)>> {
    let cell_of = |account: u128| {
        if account == 0 || state.owns_account(account) {
            cell
        } else {
            routing.cell_of_account(account)
        }
    };
    let cells: Vec<(CellId, CellId)> =
        transfers.iter().map(|t| (cell_of(t.debit_account_id), cell_of(t.credit_account_id))).collect();
    cells.iter().any(|&(debit, credit)| debit != cell || credit != cell).then_some(cells)
}

/// The refusal of a request naming `account`, which `cell` does not own:
/// the owner and version by the node's routing table, for the router to
/// refresh and resend.
fn misrouted(routing: &RoutingTable, cell: CellId, account: u128) -> NodeError {
    let owner = routing.cell_of_account(account);
    NodeError::Misrouted { cell, account, owner, routing_version: routing.version() }
}

/// The cell a request belongs to by `routing`: the cell of its events'
/// accounts (all in one cell), or, for lookups, one request per cell.
fn route(topology: &Topology, routing: &RoutingTable, request: &Request) -> Result<Route, NodeError> {
    let single = |cells: &mut dyn Iterator<Item = (usize, CellId)>| -> Result<CellId, NodeError> {
        let Some((first_index, first_cell)) = cells.next() else {
            // Nothing names an account (a post or void naming only its
            // pending transfer): any cell refuses it correctly if it is not there.
            return Ok(topology.cells[0].id);
        };
        for (index, cell) in cells {
            if cell != first_cell {
                return Err(NodeError::CrossCell { first_index, first_cell, index, cell });
            }
        }
        Ok(first_cell)
    };
    match request {
        Request::CreateAccounts(accounts) => {
            let mut cells = accounts.iter().enumerate().map(|(index, a)| (index, routing.cell_of_account(a.id)));
            single(&mut cells).map(Route::Cell)
        }
        Request::CreateTransfers(transfers) => {
            // A transfer goes to its debit account's cell (which coordinates
            // it if the credit account is elsewhere); a linked chain to its
            // first event's.
            let mut chain_open = false;
            let mut cells = transfers.iter().enumerate().filter_map(|(index, t)| {
                let starts = !chain_open;
                chain_open = t.flags.contains(TransferFlags::LINKED);
                let home = [t.debit_account_id, t.credit_account_id].into_iter().find(|&id| id != 0);
                starts.then(|| home.map(|id| (index, routing.cell_of_account(id)))).flatten()
            });
            single(&mut cells).map(Route::Cell)
        }
        Request::GetAccountTransfers(filter) | Request::GetAccountBalances(filter) => {
            Ok(Route::Cell(routing.cell_of_account(filter.account_id)))
        }
        Request::ChangeRouting { .. } | Request::DefineLedger { .. } | Request::ChangeTopology { .. } => {
            Ok(Route::Cell(GLOBAL_CELL))
        }
        Request::ShardOwnership { cell, .. } => Ok(Route::Cell(*cell)),
        Request::LookupAccounts(ids) => {
            let mut by_cell: BTreeMap<CellId, Vec<u128>> = BTreeMap::new();
            for &id in ids {
                by_cell.entry(routing.cell_of_account(id)).or_default().push(id);
            }
            if by_cell.len() == 1 {
                return Ok(Route::Cell(*by_cell.keys().next().expect("one cell")));
            }
            Ok(Route::Split(by_cell.into_iter().map(|(cell, ids)| (cell, Request::LookupAccounts(ids))).collect()))
        }
        Request::LookupTransfers(ids) => {
            // Transfer ids are opaque: any cell may hold one.
            if topology.cells.len() == 1 {
                return Ok(Route::Cell(topology.cells[0].id));
            }
            Ok(Route::Split(
                topology.cells.iter().map(|cell| (cell.id, Request::LookupTransfers(ids.clone()))).collect(),
            ))
        }
    }
}

/// A running node: its handle, its engine thread and its transport.
pub struct Node {
    handle: NodeHandle,
    stop: Arc<AtomicU8>,
    thread: Option<std::thread::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
    pub recovery: RecoveryReport,
}

impl Node {
    /// Opens (or creates) the node's data, recovers every hosted cell, and
    /// starts the transport and the engine thread.
    pub fn start(config: NodeConfig) -> Result<Node, StartError> {
        let database = open_database(&config)?;
        let metrics = Arc::new(Metrics::new());
        let status = Arc::new(StatusBoard::initial(&config.topology));
        let (inbox_sender, inbox) = bounded::<(NodeId, PeerMessage)>(config.inbox_messages_max);
        let (staged_sender, staged) = bounded::<Staged>(1);
        let receiver = SnapshotReceiver::start(database.clone(), staged_sender);
        let (runtime, transport) = start_transport(&config, inbox_sender, receiver.sender())?;
        let world_transport = transport.clone();
        let world = Box::new(RealWorld { transport: transport.clone() });
        // A node alone has no peers: nothing to send snapshots to or receive from.
        let shipping = transport.map_or(Shipping::Off, |transport| Shipping::Threads(transport, receiver));
        let (mut engine, mut recovery) = Engine::open(
            config.clone(),
            database,
            metrics.clone(),
            status.clone(),
            world,
            shipping,
            CheckpointWriter::start(),
        )?;
        engine.catch_up_local();
        for cell in recovery.cells.iter_mut() {
            cell.records_replayed = engine.replicas[&cell.cell].records_applied;
        }
        recovery.records_replayed = recovery.cells.iter().map(|cell| cell.records_replayed).sum();
        recovery.accounts = engine.replicas.values().map(|r| r.ledger.accounts_count()).sum();
        recovery.pending_open = engine.replicas.values().map(|r| r.ledger.pending_open_count()).sum();
        recovery.wal_op_last = engine.log.last_op();
        tracing::info!(?recovery, "recovered");
        let (sender, receiver) = bounded(config.queue_requests_max);
        let (control, controls) = bounded(CONTROLS_QUEUED_MAX);
        let stop = Arc::new(AtomicU8::new(RUNNING));
        let engine_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cellpay-engine".to_string())
            .spawn(move || engine.run(receiver, inbox, controls, staged, &engine_stop))
            .map_err(|source| StartError::DataDir { path: config.data_dir.clone(), source })?;
        let handle = NodeHandle {
            sender,
            control,
            forwarder: Arc::default(),
            metrics,
            status,
            topology: config.topology.clone(),
            node: config.node,
            queue_requests_max: config.queue_requests_max,
            stop: stop.clone(),
            transport: world_transport.as_ref().map_or_else(Weak::new, Arc::downgrade),
        };
        Ok(Node { handle, stop, thread: Some(thread), runtime, recovery })
    }

    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Stops accepting requests, answers the queued ones, writes a final
    /// checkpoint of every cell, and joins the engine thread.
    pub fn shutdown(self) {
        self.stop_with(STOP);
    }

    /// Stops at once without the final checkpoint, as a crash would leave the
    /// data (everything acknowledged is in the log): the next start replays it.
    /// Queued requests are answered `shutting_down`.
    pub fn halt(self) {
        self.stop_with(HALT);
    }

    fn stop_with(mut self, mode: u8) {
        self.stop.store(mode, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("engine thread panicked");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(STOP, Ordering::Release);
            let _ = thread.join();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A node's engine stepped by its caller, one event at a time, instead of by
/// a thread of its own: how the deterministic simulator runs the production
/// engine. Time and the network are the caller's `world`; there are no
/// threads: checkpoints are written when they start, snapshots are exported
/// and sent through the world when Raft asks, and loaded when their last
/// message arrives.
pub struct SteppedNode {
    engine: Engine,
    receiver: snapshot::InlineReceiver,
}

impl SteppedNode {
    /// Opens (or creates) the node's data and recovers every hosted cell.
    pub fn open(config: NodeConfig, world: Box<dyn World>) -> Result<(SteppedNode, RecoveryReport), StartError> {
        let database = open_database(&config)?;
        let metrics = Arc::new(Metrics::new());
        let status = Arc::new(StatusBoard::initial(&config.topology));
        let receiver = snapshot::InlineReceiver::new(database.clone());
        let (mut engine, recovery) =
            Engine::open(config, database, metrics, status, world, Shipping::Inline, CheckpointWriter::inline())?;
        engine.catch_up_local();
        Ok((SteppedNode { engine, receiver }, recovery))
    }

    /// Hands a request for `cell` to the engine (as a node's queue would);
    /// the answer comes once a later step has it.
    pub fn submit(&mut self, cell: CellId, request: Request) -> oneshot::Receiver<Result<Reply, NodeError>> {
        let (reply, answer) = oneshot::channel();
        if let Err(error) = validate(&request) {
            let _ = reply.send(Err(error));
            return answer;
        }
        self.engine.metrics.queue_requests.inc();
        let queued_at = self.engine.world.now();
        self.engine.request(Envelope { cell, request, reply, queued_at });
        answer
    }

    /// A message from a peer, as the transport delivers it.
    pub fn receive(&mut self, from: NodeId, payload: &[u8]) {
        match snapshot::decode(payload) {
            Some(message @ (PeerMessage::Raft { .. } | PeerMessage::CrossCell { .. })) => {
                self.engine.peer_message(from, message)
            }
            Some(message) => {
                if let Some(staged) = self.receiver.receive(from, message) {
                    self.engine.snapshot_staged(staged);
                }
            }
            None => tracing::warn!(from, bytes = payload.len(), "dropped an undecodable message from a peer"),
        }
    }

    pub fn tick(&mut self) {
        self.engine.tick();
    }

    /// Proposes a membership change of `cell`, as `NodeHandle::change_membership` does.
    pub fn change_membership(&mut self, cell: CellId, changes: &[MembershipChange]) -> Result<(), NodeError> {
        self.engine.propose_membership(cell, changes)
    }

    /// One round of consensus I/O, application and answers.
    /// One round; again (a few times at most) while cross-cell messages
    /// delivered within this node wait to be logged, as the engine's thread does.
    pub fn round(&mut self) {
        self.engine.round();
        for _ in 0..3 {
            if self.engine.replicas.values().all(|replica| replica.cross_inbox.is_empty()) {
                break;
            }
            self.engine.round();
        }
    }

    pub fn status(&self) -> &Arc<StatusBoard> {
        &self.engine.status
    }

    /// The cells' replicas on this node: `(cell, applied index, the ledger, its history store)`.
    pub fn replicas(&self) -> impl Iterator<Item = (CellId, u64, &Ledger, &Store)> {
        self.engine.replicas.values().map(|r| (r.cell, r.applied, &r.ledger, r.store.as_ref()))
    }

    /// A hosted cell's shard ownership (and, the global cell's, routing table).
    pub fn cell_state(&self, cell: CellId) -> Option<&CellState> {
        self.engine.replicas.get(&cell).map(|replica| &replica.state)
    }

    /// The write-ahead log's last durable op: what a crash now keeps.
    pub fn wal_durable_op(&self) -> u64 {
        self.engine.log.durable_op()
    }

    /// Stops cleanly: answers what waits and writes a final checkpoint.
    pub fn shutdown(mut self) {
        self.engine.fail_waiting(NodeError::ShuttingDown);
        self.engine.checkpoints_all();
    }
}

/// Checks the node is in the topology and opens its store database,
/// dropping the store generations not in use (received but not installed,
/// being received, or replaced, when the node stopped) before anything can
/// receive a snapshot.
fn open_database(config: &NodeConfig) -> Result<StoreDatabase, StartError> {
    if config.topology.node(config.node).is_none() {
        return Err(StartError::UnknownNode { node: config.node });
    }
    let bytes = config.topology.to_toml().len();
    if bytes > TOPOLOGY_TEXT_BYTES_MAX {
        return Err(StartError::TopologyTooLarge { bytes });
    }
    let data_dir = &config.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| StartError::DataDir { path: data_dir.clone(), source })?;
    let database = StoreDatabase::open(&data_dir.join("store"))?;
    for cell in config.topology.cells_of_node(config.node) {
        let current = database.registry_get(&snapshot::generation_key(cell))?.unwrap_or(0);
        for unused in (0..snapshot::generation_next(&database, cell)?).filter(|&g| g != current) {
            database.drop_store(&snapshot::store_name(cell, unused))?;
        }
    }
    Ok(database)
}

/// Starts the transport to the node's peers on a runtime of its own (none
/// for a node alone).
fn start_transport(
    config: &NodeConfig,
    inbox: Sender<(NodeId, PeerMessage)>,
    snapshots: Sender<(NodeId, PeerMessage)>,
) -> Result<(Option<tokio::runtime::Runtime>, Option<Arc<Transport>>), StartError> {
    let topology = &config.topology;
    let me = topology.node(config.node).expect("checked by the caller");
    let peers: Vec<PeerConfig> = topology
        .nodes()
        .filter(|node| node.id != config.node)
        .map(|node| PeerConfig {
            id: node.id,
            address: node.peer_address,
            one_way_delay: topology.one_way_delay(config.node, node.id),
        })
        .collect();
    if peers.is_empty() {
        return Ok((None, None));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("cellpay-transport")
        .enable_all()
        .build()
        .map_err(|error| StartError::Transport(error.to_string()))?;
    // Messages are decoded here, on the transport's thread; snapshot chunks
    // go to the snapshot receiver, Raft messages to the engine.
    let deliver: Deliver = Arc::new(move |from, payload| match snapshot::decode(&payload) {
        Some(message @ (PeerMessage::Raft { .. } | PeerMessage::CrossCell { .. })) => {
            inbox.try_send((from, message)).is_ok()
        }
        Some(message) => snapshots.try_send((from, message)).is_ok(),
        None => {
            tracing::warn!(from, bytes = payload.len(), "dropped an undecodable message from a peer");
            true
        }
    });
    let defaults = TransportConfig::new(config.node, me.peer_address, peers);
    let transport_config = TransportConfig {
        queue_bytes_max: config.peer_queue_bytes_max,
        message_bytes_max: defaults.message_bytes_max.min(config.peer_queue_bytes_max),
        ..defaults
    };
    let transport = match Transport::start(transport_config, deliver, runtime.handle()) {
        Ok(transport) => transport,
        Err(error) => {
            // Not dropped here: this may run inside an async context.
            runtime.shutdown_background();
            return Err(StartError::Transport(error.to_string()));
        }
    };
    Ok((Some(runtime), Some(Arc::new(transport))))
}

/// A write this node proposed, waiting for its entry to be applied.
struct Proposal {
    index: u64,
    term: u64,
    /// `None` for the engine's own entries (pulses).
    envelope: Option<Envelope>,
    deadline: Instant,
}

/// Reads waiting for a read index, then for it to be applied.
struct ReadBatch {
    id: u64,
    /// The read index, once Raft has confirmed leadership for it.
    index: Option<u64>,
    envelopes: Vec<Envelope>,
    /// Raft may drop a read index (no quorum answered the heartbeat): past
    /// this, the reads are refused (nothing was changed: a retry is exact).
    deadline: Instant,
}

/// One cell's replica on this node.
struct Replica {
    cell: CellId,
    raw: RawNode<CellLog>,
    ledger: Ledger,
    /// Shard ownership and (the global cell) the routing table, by this log.
    state: CellState,
    store: Arc<Store>,
    /// The store generation in use (`snapshot::store_name`).
    generation: u64,
    /// A snapshot received and loaded, waiting for Raft to accept it.
    staged: Option<Staged>,
    applied: u64,
    checkpoint_index: u64,
    /// The index of the checkpoint the writer is storing.
    checkpoint_in_flight: Option<u64>,
    checkpoint_last: Instant,
    proposals: VecDeque<Proposal>,
    reads_new: Vec<Envelope>,
    reads: VecDeque<ReadBatch>,
    read_id_next: u64,
    pulse_in_flight: bool,
    /// The ledger definitions' version this replica last proposed to adopt, and when.
    ledgers_adopt_sent: Option<(u64, Instant)>,
    elections: u64,
    snapshots_installed: u64,
    role: StateRole,
    /// Ledger records applied since the process started.
    records_applied: u64,
    /// Checkpoint at the end of the round, whatever the ledger holds (after a membership change).
    checkpoint_wanted: bool,
    /// `(applied index, state hash)` as of the last idle tick.
    state_hash: (u64, u64),
    applied_last_tick: u64,
    /// Ticks in a row in which the replica applied nothing.
    idle_ticks: u32,
    /// Cross-cell messages received as leader, waiting to be logged.
    cross_inbox: Vec<(CellId, Item)>,
    /// What applying cross-cell entries produced: messages for the leader
    /// to send after the round (see `cross_cell`).
    cross_effects: Effects,
    /// The operations the entry being applied left waiting (its proposer's
    /// answer is deferred until they are decided).
    cross_waiting: Vec<(u128, usize)>,
    /// Requests applied here whose cross-cell operations are not decided yet.
    deferred: Vec<Deferred>,
    /// When this replica last resent its cross-cell messages (as leader).
    cross_resent: Instant,
}

/// A request whose answer waits for the decision of its cross-cell operations.
struct Deferred {
    envelope: Envelope,
    results: Vec<CreateTransferResult>,
    /// (operation, index of its first event in the request), not yet decided.
    waiting: Vec<(u128, usize)>,
    deadline: Instant,
}

impl Replica {
    /// A replica whose ledger, state and log are restored up to Raft's
    /// applied index (its store's checkpoint), with nothing in flight.
    fn new(
        cell: CellId,
        raw: RawNode<CellLog>,
        (ledger, state): (Ledger, CellState),
        store: Arc<Store>,
        generation: u64,
        now: Instant,
    ) -> Replica {
        let applied = raw.raft.raft_log.applied;
        Replica {
            cell,
            raw,
            ledger,
            state,
            store,
            generation,
            staged: None,
            applied,
            checkpoint_index: applied,
            checkpoint_in_flight: None,
            checkpoint_last: now,
            proposals: VecDeque::new(),
            reads_new: Vec::new(),
            reads: VecDeque::new(),
            read_id_next: 1,
            pulse_in_flight: false,
            ledgers_adopt_sent: None,
            elections: 0,
            snapshots_installed: 0,
            role: StateRole::Follower,
            records_applied: 0,
            checkpoint_wanted: false,
            state_hash: (u64::MAX, 0),
            applied_last_tick: applied,
            idle_ticks: 0,
            cross_inbox: Vec::new(),
            cross_effects: Effects::default(),
            cross_waiting: Vec::new(),
            deferred: Vec::new(),
            cross_resent: now,
        }
    }
}

/// A ready taken from a replica, waiting for the round's sync.
struct Persisting {
    cell: CellId,
    ready: Ready,
}

/// How an engine ships snapshots.
enum Shipping {
    /// A node alone: no peers.
    Off,
    /// A node's sender and receiver threads, over its transport.
    Threads(Arc<Transport>, SnapshotReceiver),
    /// Within the engine's steps, through its world (`SteppedNode`).
    Inline,
}

struct Engine {
    config: NodeConfig,
    replicas: BTreeMap<CellId, Replica>,
    log: NodeLog,
    database: StoreDatabase,
    /// Time and the network (see `world.rs`).
    world: Box<dyn World>,
    snapshot_sender: Option<SnapshotSender>,
    /// Snapshots sent and not yet answered: `(cell, to, when)`, oldest first.
    snapshots_sent: Vec<(CellId, NodeId, Instant)>,
    _snapshot_receiver: Option<SnapshotReceiver>,
    writer: CheckpointWriter,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    tick_next: Instant,
    ticks: u64,
    messages_unknown_cell: u64,
    /// Regions no leader may stay in (planned maintenance).
    drained_regions: std::collections::BTreeSet<String>,
}

impl Engine {
    fn open(
        config: NodeConfig,
        database: StoreDatabase,
        metrics: Arc<Metrics>,
        status: Arc<StatusBoard>,
        world: Box<dyn World>,
        shipping: Shipping,
        writer: CheckpointWriter,
    ) -> Result<(Engine, RecoveryReport), StartError> {
        let data_dir = &config.data_dir;
        let (mut log, log_recovery) = NodeLog::open(&data_dir.join("wal"))?;
        let mut cell_logs = log_recovery.cells;
        let logger = slog::Logger::root(crate::raft_logger::TracingDrain, slog::o!("node" => config.node));
        let mut replicas = BTreeMap::new();
        let mut report =
            RecoveryReport { torn_tail_bytes_cut: log_recovery.wal.torn_tail_bytes_cut, ..Default::default() };
        for cell_id in config.topology.cells_of_node(config.node) {
            let cell = config.topology.cell(cell_id).expect("cells_of_node names known cells");
            let generation = database.registry_get(&snapshot::generation_key(cell_id))?.unwrap_or(0);
            let store = Arc::new(Store::open_in(&database, &snapshot::store_name(cell_id, generation))?);
            let checkpoint = store.checkpoint()?;
            let consensus = store.consensus()?;
            let stored_base = cell_state::decode_consensus_base(&consensus);
            let state = cell_state::stored_or_initial(&consensus, &config.topology, cell_id);
            let initial_conf =
                ConfState { voters: cell.voters.clone(), learners: cell.learners.clone(), ..Default::default() };
            let mut cell_log = match cell_logs.remove(&cell_id) {
                Some(cell_log) => cell_log,
                None => {
                    // First start: every replica starts from the topology's
                    // membership (the state at index 0); later changes are
                    // entries of the log or come with a snapshot.
                    let cell_log = CellLog::new(initial_conf.clone());
                    log.append_base(cell_id, cell_log.base());
                    cell_log
                }
            };
            let index = checkpoint.op;
            if index > 0 {
                // An installed snapshot whose base record did not reach the
                // log before a crash: the store's state replaces the log's
                // (entries the log holds at or after it are of another history).
                if let Some(base) =
                    stored_base.clone().filter(|b| b.index == index && cell_log.term_of(index) != Some(b.term))
                {
                    cell_log.set_base(base.clone());
                    log.append_base(cell_id, &base);
                }
                if cell_log.term_of(index).is_none() {
                    return Err(StartError::LogMismatch {
                        cell: cell_id,
                        checkpoint_index: index,
                        log_first: cell_log.first_index(),
                        log_last: cell_log.last_index(),
                    });
                }
                cell_log.compact_to(index);
            }
            if cell_log.hard_state().commit < index {
                cell_log.set_commit(index);
            }
            report.cells.push(CellRecovery {
                cell: cell_id,
                checkpoint_index: index,
                log_first: cell_log.first_index(),
                log_last: cell_log.last_index(),
                commit: cell_log.hard_state().commit,
                records_replayed: 0,
            });
            let raft_config = raft::Config {
                id: config.node,
                election_tick: config.election_ticks,
                min_election_tick: config.election_ticks,
                max_election_tick: 2 * config.election_ticks,
                heartbeat_tick: config.heartbeat_ticks,
                applied: index,
                max_size_per_msg: 4 << 20,
                max_inflight_msgs: 64,
                max_uncommitted_size: config.uncommitted_bytes_max,
                check_quorum: true,
                pre_vote: true,
                read_only_option: raft::ReadOnlyOption::Safe,
                ..Default::default()
            };
            // Raft starts from the membership as of the applied index (the
            // checkpoint's); later changes are re-applied from the log.
            if let Some(base) = stored_base {
                cell_log.set_conf_state(base.conf_state.clone());
                cell_log.set_snapshot_point(base);
            } else if index == 0 {
                cell_log.set_conf_state(initial_conf.clone());
            }
            let cell_logger = logger.new(slog::o!("cell" => cell_id));
            let raw = RawNode::new(&raft_config, cell_log, &cell_logger)
                .map_err(|source| StartError::Raft { cell: cell_id, source })?;
            let ledger =
                Ledger::restore(config.ledger, store.accounts()?, store.open_pending()?, checkpoint.timestamp_last);
            if let Some(table) = state.routing() {
                status.publish_routing(table);
            }
            if cell_id == GLOBAL_CELL {
                status.publish_ledgers(state.ledgers());
            }
            if let Some(table) = state.topology() {
                status.publish_topology(table);
            }
            assert_eq!(raw.raft.raft_log.applied, index, "cell {cell_id}: raft starts at the checkpoint");
            let replica = Replica::new(cell_id, raw, (ledger, state), store, generation, world.now());
            replicas.insert(cell_id, replica);
        }
        log.sync();
        let (snapshot_sender, snapshot_receiver) = match shipping {
            Shipping::Off => (None, None),
            Shipping::Threads(transport, receiver) => (Some(SnapshotSender::start(transport)), Some(receiver)),
            Shipping::Inline => (Some(SnapshotSender::inline()), None),
        };
        let mut engine = Engine {
            tick_next: world.now() + config.tick_interval,
            config,
            replicas,
            log,
            database,
            world,
            snapshot_sender,
            snapshots_sent: Vec::new(),
            _snapshot_receiver: snapshot_receiver,
            writer,
            metrics,
            status,
            ticks: 0,
            messages_unknown_cell: 0,
            drained_regions: std::collections::BTreeSet::new(),
        };
        engine.election_timeouts_draw();
        for replica in engine.replicas.values() {
            engine.publish(replica);
        }
        Ok((engine, report))
    }

    /// Applies what the local log already holds as committed (recovery),
    /// elects a cell's only voter at once, and audits every ledger.
    fn catch_up_local(&mut self) {
        for replica in self.replicas.values_mut() {
            let cell = self.config.topology.cell(replica.cell).expect("hosted cells are in the topology");
            if cell.voters == [self.config.node] {
                let _ = replica.raw.campaign();
            }
        }
        self.round();
        for replica in self.replicas.values() {
            if let Err(error) = replica.ledger.audit() {
                panic!("cell {}: ledger fails its audit after recovery: {error}", replica.cell);
            }
        }
    }

    fn run(
        mut self,
        requests: Receiver<Envelope>,
        inbox: Receiver<(NodeId, PeerMessage)>,
        controls: Receiver<Control>,
        staged: Receiver<Staged>,
        stop: &AtomicU8,
    ) {
        loop {
            match stop.load(Ordering::Acquire) {
                RUNNING => {}
                HALT => {
                    while let Ok(envelope) = requests.try_recv() {
                        let _ = envelope.reply.send(Err(NodeError::ShuttingDown));
                    }
                    self.fail_waiting(NodeError::ShuttingDown);
                    // A checkpoint already handed to the writer completes (it is
                    // consistent either way); no new one starts.
                    self.checkpoints_finish(true);
                    tracing::info!(wal_op_last = self.log.last_op(), "engine halted");
                    return;
                }
                _ => {
                    // Handles refuse new requests now; answer what is queued, then stop.
                    while let Ok(envelope) = requests.try_recv() {
                        self.request(envelope);
                    }
                    self.round();
                    self.fail_waiting(NodeError::ShuttingDown);
                    break;
                }
            }
            let mut timeout = self.tick_next.saturating_duration_since(self.world.now());
            // Cross-cell messages delivered locally wait for the next round: run it now.
            if self.replicas.values().any(|replica| !replica.cross_inbox.is_empty()) {
                timeout = Duration::ZERO;
            }
            select! {
                recv(requests) -> envelope => if let Ok(envelope) = envelope { self.request(envelope) },
                recv(inbox) -> message => if let Ok((from, message)) = message { self.peer_message(from, message) },
                recv(controls) -> control => if let Ok(control) = control { self.control(control) },
                recv(staged) -> snapshot => if let Ok(snapshot) = snapshot { self.snapshot_staged(snapshot) },
                default(timeout) => {},
            }
            let mut taken = 0;
            while taken < self.config.group_requests_max {
                match requests.try_recv() {
                    Ok(envelope) => self.request(envelope),
                    Err(_) => break,
                }
                taken += 1;
            }
            for _ in 0..self.config.inbox_messages_max {
                match inbox.try_recv() {
                    Ok((from, message)) => self.peer_message(from, message),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if self.world.now() >= self.tick_next {
                self.tick();
            }
            self.round();
        }
        self.checkpoints_all();
        tracing::info!(wal_op_last = self.log.last_op(), "engine stopped");
    }

    /// Answers every proposal and read still waiting (the engine is stopping).
    fn fail_waiting(&mut self, error: NodeError) {
        for replica in self.replicas.values_mut() {
            // Proposed writes are in the log and may still commit.
            for proposal in replica.proposals.drain(..) {
                if let Some(envelope) = proposal.envelope {
                    let reason = "the node stopped before the write committed".to_string();
                    let _ = envelope.reply.send(Err(NodeError::OutcomeUnknown { cell: replica.cell, reason }));
                }
            }
            for deferred in replica.deferred.drain(..) {
                let reason = "the node stopped before its cross-cell transfers were decided".to_string();
                let _ = deferred.envelope.reply.send(Err(NodeError::OutcomeUnknown { cell: replica.cell, reason }));
            }
            for envelope in replica.reads_new.drain(..) {
                let _ = envelope.reply.send(Err(error.clone()));
            }
            for batch in replica.reads.drain(..) {
                for envelope in batch.envelopes {
                    let _ = envelope.reply.send(Err(error.clone()));
                }
            }
        }
    }

    fn request(&mut self, envelope: Envelope) {
        self.metrics.queue_requests.dec();
        let Some(replica) = self.replicas.get_mut(&envelope.cell) else {
            let cell = envelope.cell;
            let _ = envelope.reply.send(Err(NodeError::CellNotHosted { cell }));
            return;
        };
        // A cell serves only the accounts of the shards its log says it owns
        // (any replica can tell; applying checks again, at the entry's place in the log).
        let routing = self.status.routing();
        if let Some(account) = not_owned(&replica.state, &routing, envelope.cell, &envelope.request) {
            let _ = envelope.reply.send(Err(misrouted(&routing, envelope.cell, account)));
            return;
        }
        if let Err(error) = self.admin_precondition(envelope.cell, &envelope.request) {
            let _ = envelope.reply.send(Err(error));
            return;
        }
        let replica = self.replicas.get_mut(&envelope.cell).expect("checked above");
        if replica.raw.raft.state != StateRole::Leader {
            let leader = Some(replica.raw.raft.leader_id).filter(|&id| id != raft::INVALID_ID);
            let _ = envelope.reply.send(Err(NodeError::NotLeader { cell: replica.cell, leader }));
            return;
        }
        if !envelope.request.is_write() {
            replica.reads_new.push(envelope);
            return;
        }
        // The leader stamps the entry; every replica applies it with this timestamp.
        let timestamp = self.world.timestamp_ns();
        let mut data =
            Vec::with_capacity(record::HEADER_SIZE + envelope.request.events() * (cellpay_ledger::RECORD_SIZE + 16));
        match &envelope.request {
            Request::CreateAccounts(accounts) => record::encode_create_accounts(&mut data, timestamp, accounts),
            // Transfers naming another cell's accounts record each event's cells
            // (by this leader's table), for the cross-cell protocol.
            Request::CreateTransfers(transfers) => {
                match cells_across(&replica.state, &routing, replica.cell, transfers) {
                    None => record::encode_create_transfers(&mut data, timestamp, transfers),
                    Some(cells) => record::encode_create_transfers_across(&mut data, timestamp, transfers, &cells),
                }
            }
            &Request::ChangeRouting { expected_version, change } => {
                record::encode_change_routing(&mut data, timestamp, expected_version, change)
            }
            &Request::ShardOwnership { shard, owned, .. } => {
                record::encode_shard_ownership(&mut data, timestamp, shard, owned)
            }
            Request::DefineLedger { expected_version, definition } => {
                record::encode_define_ledger(&mut data, timestamp, *expected_version, definition)
            }
            Request::ChangeTopology { expected_version, topology } => {
                record::encode_change_topology(&mut data, timestamp, *expected_version, &topology.to_toml())
            }
            _ => unreachable!("writes only"),
        }
        let deadline = self.world.now() + self.config.proposal_timeout;
        if self.world.bug(Bug::AckBeforeCommit) {
            // Deliberate bug: answered `ok` now, whether or not the entry commits.
            let reply = match &envelope.request {
                Request::CreateAccounts(accounts) => {
                    Reply::CreateAccounts(vec![CreateAccountResult::Ok; accounts.len()])
                }
                Request::CreateTransfers(transfers) => {
                    Reply::CreateTransfers(vec![CreateTransferResult::Ok; transfers.len()])
                }
                Request::ChangeRouting { .. } => Reply::RoutingChanged(self.status.routing().as_ref().clone()),
                Request::ShardOwnership { .. } => Reply::ShardOwnership,
                Request::DefineLedger { .. } => Reply::LedgersChanged(self.status.ledgers().as_ref().clone()),
                Request::ChangeTopology { .. } => Reply::TopologyChanged(self.status.topology().as_ref().clone()),
                _ => unreachable!("writes only"),
            };
            let _ = envelope.reply.send(Ok(reply));
            propose(replica, data, None, deadline);
            return;
        }
        propose(replica, data, Some(envelope), deadline);
    }

    /// Checks an operator's change against the cell it is sent to before it
    /// is proposed. Acquiring a shard needs the routing table (as this node
    /// has applied it) to name the cell as the shard's owner: the table only
    /// names it after the old owner released the shard (`ctl routing move`).
    fn admin_precondition(&self, cell: CellId, request: &Request) -> Result<(), NodeError> {
        let refused = |reason: String| Err(NodeError::ChangeRefused { cell, reason });
        match *request {
            Request::ChangeRouting { .. } if cell != GLOBAL_CELL => {
                refused(format!("cell {cell} holds no routing table: send routing changes to the global cell"))
            }
            Request::ChangeTopology { .. } if cell != GLOBAL_CELL => {
                refused(format!("cell {cell} holds no topology: send topology changes to the global cell"))
            }
            // Checked here too (the size, and what may change, against this
            // node's table), so most refusals never reach the log.
            Request::ChangeTopology { expected_version, ref topology } => self
                .status
                .topology()
                .change(expected_version, topology.as_ref().clone())
                .map(|_| ())
                .map_err(|error| NodeError::ChangeRefused { cell, reason: error.to_string() }),
            Request::DefineLedger { .. } if cell != GLOBAL_CELL => {
                refused(format!("cell {cell} only adopts ledger definitions: send definitions to the global cell"))
            }
            // Checked here too, so an invalid definition never reaches the log.
            Request::DefineLedger { ref definition, .. } => {
                definition.check().map_err(|error| NodeError::ChangeRefused { cell, reason: error.to_string() })
            }
            Request::ShardOwnership { .. } if cell == GLOBAL_CELL => {
                refused("the global cell owns no shards".to_string())
            }
            Request::ShardOwnership { shard, owned: true, .. } => {
                let routing = self.status.routing();
                match routing.owner(shard) {
                    Some(owner) if owner != cell => refused(format!(
                        "routing table version {} names cell {owner} as the owner of shard {shard}, not cell \
                         {cell}: change the table first",
                        routing.version()
                    )),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn control(&mut self, control: Control) {
        match control {
            Control::Drain { region, drained } => {
                tracing::info!(region, drained, "region drain changed");
                if drained {
                    self.drained_regions.insert(region);
                } else {
                    self.drained_regions.remove(&region);
                }
                self.place_leaders();
            }
            Control::Membership { cell, changes, reply } => {
                let _ = reply.send(self.propose_membership(cell, &changes));
            }
        }
    }

    fn propose_membership(&mut self, cell: CellId, changes: &[MembershipChange]) -> Result<(), NodeError> {
        let Some(replica) = self.replicas.get(&cell) else { return Err(NodeError::CellNotHosted { cell }) };
        if replica.raw.raft.state != StateRole::Leader {
            let leader = Some(replica.raw.raft.leader_id).filter(|&id| id != raft::INVALID_ID);
            return Err(NodeError::NotLeader { cell, leader });
        }
        // A leader never removes or demotes itself: raft-rs 0.7 keeps such a
        // leader leading (nobody tells it of a newer term) and panics on its
        // next append response. Leadership moves first; the caller retries.
        let me = self.config.node;
        let leaving = |node: NodeId| {
            changes
                .iter()
                .any(|c| matches!(*c, MembershipChange::Remove(n) | MembershipChange::AddLearner(n) if n == node))
        };
        if leaving(me) {
            let live = self.status.topology();
            let successor = caught_up_voters(&replica.raw.raft)
                .into_iter()
                .filter(|&node| !leaving(node))
                .map(|node| (self.leader_rank(live.topology(), cell, node), node))
                .min()
                .map(|(_, node)| node);
            let replica = self.replicas.get_mut(&cell).expect("checked");
            let reason = match successor {
                Some(successor) => {
                    tracing::info!(cell, successor, "handing leadership over before this replica leaves the cell");
                    replica.raw.transfer_leader(successor);
                    format!("node {me} leads the cell and cannot remove itself: leadership moves to node {successor} first; retry")
                }
                None => format!("node {me} leads the cell and no other voter is caught up to take over; retry"),
            };
            return Err(NodeError::Unavailable { cell, reason });
        }
        let replica = self.replicas.get_mut(&cell).expect("checked");
        let singles: Vec<ConfChangeSingle> = changes
            .iter()
            .map(|change| {
                let (node, kind) = match *change {
                    MembershipChange::AddLearner(node) => (node, ConfChangeType::AddLearnerNode),
                    MembershipChange::AddVoter(node) => (node, ConfChangeType::AddNode),
                    MembershipChange::Remove(node) => (node, ConfChangeType::RemoveNode),
                };
                ConfChangeSingle { change_type: kind, node_id: node, ..Default::default() }
            })
            .collect();
        let change = ConfChangeV2 { changes: singles.into(), ..Default::default() };
        tracing::info!(cell, ?changes, "proposing a membership change");
        replica.raw.propose_conf_change(Vec::new(), change).map_err(|error| NodeError::Unavailable {
            cell,
            reason: format!("the membership change was refused: {error}"),
        })
    }

    /// Where `node` ranks as a leader of `cell`: its datacenter's place in
    /// the cell's leader preference (as the global cell's topology, applied
    /// by this node, says), or last if its region is drained.
    fn leader_rank(&self, topology: &Topology, cell: CellId, node: NodeId) -> usize {
        let drained = topology.location(node).is_some_and(|l| self.drained_regions.contains(l.region));
        if drained {
            usize::MAX
        } else {
            topology.preference_rank(cell, node)
        }
    }

    /// Raft draws a replica's election timeout whenever it resets its timer
    /// (a new term or role; the timer also restarts on every message from
    /// the leader). A world that draws its own (the simulator, from its
    /// seed) replaces Raft's draw here, before the next tick can use it.
    fn election_timeouts_draw(&mut self) {
        let ticks = self.config.election_ticks..2 * self.config.election_ticks;
        for replica in self.replicas.values_mut() {
            if replica.raw.raft.election_elapsed == 0 {
                if let Some(timeout) = self.world.election_timeout(ticks.clone()) {
                    replica.raw.raft.set_randomized_election_timeout(timeout);
                }
            }
        }
    }

    /// For every cell this node leads: if a caught-up, active replica ranks
    /// better (see `leader_rank`), hand leadership to the best one. Leaders
    /// so settle in their preferred datacenter and leave drained regions.
    fn place_leaders(&mut self) {
        let live = self.status.topology();
        let topology = live.topology();
        let mut transfers = Vec::new();
        for (&cell, replica) in &self.replicas {
            let raft = &replica.raw.raft;
            if raft.state != StateRole::Leader || raft.lead_transferee.is_some() {
                continue;
            }
            let my_rank = self.leader_rank(topology, cell, self.config.node);
            let best =
                caught_up_voters(raft).into_iter().map(|node| (self.leader_rank(topology, cell, node), node)).min();
            if let Some((rank, node)) = best {
                if rank < my_rank {
                    transfers.push((cell, node));
                }
            }
        }
        for (cell, node) in transfers {
            tracing::info!(cell, to = node, "transferring leadership to a better-placed replica");
            self.replicas.get_mut(&cell).expect("hosted").raw.transfer_leader(node);
        }
    }

    fn peer_message(&mut self, from: NodeId, message: PeerMessage) {
        let (cell, message) = match message {
            PeerMessage::Raft { cell, message } => (cell, message),
            PeerMessage::CrossCell { cell, from: from_cell, items } => {
                self.cross_received(cell, from_cell, items);
                return;
            }
            PeerMessage::Chunk { .. } | PeerMessage::SnapshotMessage { .. } => return,
        };
        // A snapshot is only accepted with its data (see `snapshot_staged`);
        // entries over the log's record limit could never be logged.
        let oversized =
            message.entries.iter().any(|e| e.data.len() + e.context.len() > crate::raft_log::ENTRY_BYTES_MAX);
        if message.get_msg_type() == MessageType::MsgSnapshot || oversized {
            tracing::warn!(from, cell, kind = ?message.get_msg_type(), "dropped a malformed message from a peer");
            return;
        }
        let Some(replica) = self.replicas.get_mut(&cell) else {
            self.messages_unknown_cell += 1;
            if self.messages_unknown_cell.is_power_of_two() {
                tracing::warn!(
                    from,
                    cell,
                    count = self.messages_unknown_cell,
                    "messages for a cell this node does not host"
                );
            }
            return;
        };
        let mut message = message;
        // A heartbeat carries the commit index the leader believes this
        // replica can reach; raft-rs panics if it is past the log's end.
        // That happens only when the replica lost entries it acknowledged
        // (a wiped disk not removed from the cell first) or the heartbeat was
        // queued for an earlier incarnation of this node: clamp and warn.
        let last_index = replica.raw.raft.raft_log.last_index();
        if message.get_msg_type() == MessageType::MsgHeartbeat && message.commit > last_index {
            tracing::warn!(
                cell,
                from,
                commit = message.commit,
                last_index,
                "a heartbeat's commit index is past this replica's log (a lost disk or a stale message)"
            );
            message.commit = last_index;
        }
        if let Err(error) = replica.raw.step(message) {
            tracing::debug!(cell, from, %error, "raft refused a message");
        }
    }

    /// A snapshot is loaded: let Raft decide on it (the install happens when
    /// its `Ready` carries the snapshot).
    fn snapshot_staged(&mut self, staged: Staged) {
        let Some(replica) = self.replicas.get_mut(&staged.cell) else { return };
        let message = staged.message.clone();
        let (cell, from) = (staged.cell, staged.from);
        if let Some(replaced) = replica.staged.replace(staged) {
            self.drop_generation(cell, replaced.generation, replaced.store);
        }
        let replica = self.replicas.get_mut(&cell).expect("hosted");
        if let Err(error) = replica.raw.step(message) {
            tracing::debug!(cell, from, %error, "raft refused a snapshot");
        }
    }

    /// Switches a cell to a received snapshot that Raft accepted: the new
    /// store generation becomes current (durably), the ledger is rebuilt from
    /// it, and the log restarts after it.
    fn snapshot_install(&mut self, cell: CellId, snapshot: &Snapshot) {
        let metadata = snapshot.get_metadata();
        let index = metadata.index;
        // A checkpoint of the old state still being written finishes first.
        while self.replicas[&cell].checkpoint_in_flight.is_some() {
            self.checkpoints_finish(true);
        }
        let replica = self.replicas.get_mut(&cell).expect("hosted");
        let staged = replica.staged.take().filter(|staged| staged.image.checkpoint.op == index);
        let Some(staged) = staged else {
            panic!("cell {cell}: raft accepted snapshot {index}, which was not received");
        };
        if let Err(error) = self.database.registry_set(&snapshot::generation_key(cell), staged.generation) {
            panic!("cell {cell}: cannot record the new store generation, stopping to recover on restart: {error}");
        }
        let old_generation = std::mem::replace(&mut replica.generation, staged.generation);
        let store = &staged.store;
        let restored = store.accounts().and_then(|accounts| Ok((accounts, store.open_pending()?)));
        let (accounts, pending) = match restored {
            Ok(restored) => restored,
            Err(error) => panic!("cell {cell}: cannot read the installed snapshot: {error}"),
        };
        replica.ledger = Ledger::restore(self.config.ledger, accounts, pending, staged.image.checkpoint.timestamp_last);
        replica.state = cell_state::stored_or_initial(&staged.image.consensus, &self.config.topology, cell);
        if let Some(table) = replica.state.routing() {
            self.status.publish_routing(table);
        }
        if cell == GLOBAL_CELL {
            self.status.publish_ledgers(replica.state.ledgers());
        }
        if let Some(table) = replica.state.topology() {
            self.status.publish_topology(table);
        }
        if let Err(error) = replica.ledger.audit() {
            panic!("cell {cell}: the installed snapshot fails its audit: {error}");
        }
        let base = LogBase { index, term: metadata.term, conf_state: metadata.get_conf_state().clone() };
        replica.raw.mut_store().set_base(base.clone());
        replica.raw.mut_store().set_snapshot_point(base.clone());
        self.log.append_base(cell, &base);
        replica.applied = index;
        replica.checkpoint_index = index;
        replica.snapshots_installed += 1;
        // The snapshot may or may not hold entries this node proposed.
        for proposal in replica.proposals.drain(..) {
            if let Some(envelope) = proposal.envelope {
                let reason = "a snapshot replaced the replica's state".to_string();
                let _ = envelope.reply.send(Err(NodeError::OutcomeUnknown { cell, reason }));
            }
        }
        for deferred in replica.deferred.drain(..) {
            let reason = "a snapshot replaced the replica's state".to_string();
            let _ = deferred.envelope.reply.send(Err(NodeError::OutcomeUnknown { cell, reason }));
        }
        replica.cross_effects = Effects::default();
        replica.pulse_in_flight = false;
        tracing::info!(
            cell,
            index,
            term = metadata.term,
            accounts = replica.ledger.accounts_count(),
            "snapshot installed"
        );
        let old_store = std::mem::replace(&mut replica.store, staged.store.clone());
        drop(staged);
        self.drop_generation(cell, old_generation, old_store);
    }

    /// Drops a store generation no longer used (replaced, or never installed).
    fn drop_generation(&self, cell: CellId, generation: u64, store: Arc<Store>) {
        assert_ne!(generation, self.replicas[&cell].generation, "cell {cell}: never drop the generation in use");
        drop(store);
        if let Err(error) = self.database.drop_store(&snapshot::store_name(cell, generation)) {
            tracing::warn!(cell, generation, %error, "could not drop an unused store generation");
        }
    }

    fn tick(&mut self) {
        self.publish_peers();
        self.snapshots_finished();
        self.ticks += 1;
        if self.ticks.is_multiple_of(PREFERENCE_CHECK_TICKS) {
            self.place_leaders();
        }
        let now = self.world.now();
        while self.tick_next <= now {
            self.tick_next += self.config.tick_interval;
        }
        let timestamp = self.world.timestamp_ns();
        let delayed = self.world.buggify(Fault::DelayedTick);
        for replica in self.replicas.values_mut() {
            // A late timer: Raft's clock misses this tick.
            if !delayed {
                replica.raw.tick();
            }
            if replica.raw.raft.state == StateRole::Leader && self.world.buggify(Fault::LeaderStepDown) {
                if let Some(&successor) = caught_up_voters(&replica.raw.raft).first() {
                    tracing::info!(cell = replica.cell, successor, "fault point: the leader steps down");
                    replica.raw.transfer_leader(successor);
                }
            }
            // Hashing the state reads every account (a few ms for a million):
            // only once a cell has applied nothing for STATE_HASH_IDLE_TICKS.
            if replica.applied == replica.applied_last_tick {
                replica.idle_ticks = replica.idle_ticks.saturating_add(1);
            } else {
                replica.idle_ticks = 0;
            }
            if replica.idle_ticks >= STATE_HASH_IDLE_TICKS && replica.state_hash.0 != replica.applied {
                replica.state_hash = (replica.applied, replica.ledger.state_hash() ^ replica.state.hash());
            }
            replica.applied_last_tick = replica.applied;
            // Writes whose entry neither committed nor was overwritten in time.
            while replica.proposals.front().is_some_and(|p| p.deadline <= now) {
                let proposal = replica.proposals.pop_front().expect("checked");
                if let Some(envelope) = proposal.envelope {
                    let timeout_ms = self.config.proposal_timeout.as_millis() as u64;
                    let _ = envelope.reply.send(Err(NodeError::Timeout { cell: replica.cell, timeout_ms }));
                } else {
                    replica.pulse_in_flight = false;
                }
            }
            // Reads a new leader could not issue in time (nothing committed in its term).
            if replica.reads_new.first().is_some_and(|e| now.duration_since(e.queued_at) >= READ_INDEX_TIMEOUT) {
                for envelope in replica.reads_new.drain(..) {
                    let reason = "the new leader has not committed an entry of its term yet".to_string();
                    let _ = envelope.reply.send(Err(NodeError::Unavailable { cell: replica.cell, reason }));
                }
            }
            // Reads whose read index no majority confirmed in time.
            while replica.reads.front().is_some_and(|batch| batch.index.is_none() && batch.deadline <= now) {
                let batch = replica.reads.pop_front().expect("checked");
                for envelope in batch.envelopes {
                    let reason = "no majority confirmed the leader's read index in time".to_string();
                    let _ = envelope.reply.send(Err(NodeError::Unavailable { cell: replica.cell, reason }));
                }
            }
            // The leader expires pending transfers whose timeout has passed,
            // through the log like any write.
            let due = replica.ledger.expiry_next().is_some_and(|at| at <= timestamp);
            if due && replica.raw.raft.state == StateRole::Leader && !replica.pulse_in_flight {
                let mut data = Vec::with_capacity(record::HEADER_SIZE);
                record::encode_pulse(&mut data, timestamp);
                replica.pulse_in_flight = propose(replica, data, None, now + self.config.proposal_timeout);
            }
        }
        self.cross_tick(now, timestamp);
        self.adopt_ledgers(now, timestamp);
        for cell in self.replicas.keys().copied().collect::<Vec<_>>() {
            let replica = &self.replicas[&cell];
            let stale = now.saturating_duration_since(replica.checkpoint_last) >= self.config.checkpoint_interval_max;
            // Any applied entry counts (accounts, membership, a leader's empty
            // entry): a cell that never checkpoints would hold the node's
            // shared log from being truncated.
            if stale && replica.applied > replica.checkpoint_index && replica.checkpoint_in_flight.is_none() {
                self.checkpoint_start(cell);
            }
        }
        self.checkpoints_finish(false);
        for replica in self.replicas.values() {
            self.publish(replica);
        }
    }

    /// Each cell this node leads logs the global cell's ledger definitions
    /// when they are newer than the ones it adopted: the cell enforces only
    /// what its own log holds. Not tracked: an entry lost to a leader change
    /// is proposed again after [`ADOPT_RETRY`].
    fn adopt_ledgers(&mut self, now: Instant, timestamp: u64) {
        let global = self.status.ledgers();
        for replica in self.replicas.values_mut() {
            let behind = replica.cell != GLOBAL_CELL && replica.state.ledgers().version() < global.version();
            if !behind || replica.raw.raft.state != StateRole::Leader {
                continue;
            }
            let sent = replica.ledgers_adopt_sent;
            if sent.is_some_and(|(version, at)| version >= global.version() && now.duration_since(at) < ADOPT_RETRY) {
                continue;
            }
            let mut data = Vec::new();
            record::encode_adopt_ledgers(&mut data, timestamp, &global);
            match replica.raw.propose(Vec::new(), data) {
                Ok(()) => replica.ledgers_adopt_sent = Some((global.version(), now)),
                Err(error) => tracing::debug!(cell = replica.cell, %error, "ledger definitions not logged"),
            }
        }
    }

    /// One round of consensus I/O for every replica: see the module documentation.
    fn round(&mut self) {
        self.election_timeouts_draw();
        self.cross_propose();
        for replica in self.replicas.values_mut() {
            // Raft drops a read index asked before the leader has committed
            // an entry of its term: the reads wait for that (a round or two).
            if !replica.reads_new.is_empty() && replica.raw.raft.commit_to_current_term() {
                let id = replica.read_id_next;
                replica.read_id_next += 1;
                replica.raw.read_index(id.to_le_bytes().to_vec());
                let envelopes = std::mem::take(&mut replica.reads_new);
                let deadline = self.world.now() + READ_INDEX_TIMEOUT;
                replica.reads.push_back(ReadBatch { id, index: None, envelopes, deadline });
            }
        }
        let mut persisting: Vec<Persisting> = Vec::new();
        let cells: Vec<CellId> = self.replicas.keys().copied().collect();
        for &cell in &cells {
            let replica = self.replicas.get_mut(&cell).expect("hosted");
            if !replica.raw.has_ready() {
                continue;
            }
            let mut ready = replica.raw.ready();
            let snapshots = send_messages(&*self.world, cell, ready.take_messages(), &mut replica.raw);
            self.snapshots_offer(cell, snapshots);
            let replica = self.replicas.get_mut(&cell).expect("hosted");
            if let Some(soft) = ready.ss() {
                if soft.raft_state != replica.role {
                    if soft.raft_state == StateRole::Leader {
                        replica.elections += 1;
                        tracing::info!(cell, term = replica.raw.raft.term, "became leader");
                    }
                    if replica.role == StateRole::Leader {
                        tracing::info!(cell, term = replica.raw.raft.term, "lost leadership");
                    }
                    replica.role = soft.raft_state;
                    if soft.raft_state != StateRole::Leader {
                        fail_reads(replica);
                    }
                }
            }
            for read_state in ready.take_read_states() {
                let id = read_state.request_ctx.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                if let Some(batch) = replica.reads.iter_mut().find(|batch| Some(batch.id) == id) {
                    batch.index = Some(read_state.index);
                }
            }
            if !ready.snapshot().is_empty() {
                let snapshot = ready.snapshot().clone();
                self.snapshot_install(cell, &snapshot);
            }
            let replica = self.replicas.get_mut(&cell).expect("hosted");
            let committed = ready.take_committed_entries();
            let clock = follower_clock(&*self.world, replica);
            let applying = Applying {
                metrics: &self.metrics,
                clock,
                topology: &self.config.topology,
                status: &self.status,
                confirm_without_try: self.world.bug(Bug::ConfirmWithoutTry),
            };
            apply_entries(replica, committed, &applying);
            if !ready.entries().is_empty() {
                self.log.append_entries(cell, ready.entries());
                if let Err(error) = replica.raw.mut_store().append(ready.entries()) {
                    panic!("cell {cell}: raft handed entries that do not continue the log: {error}");
                }
            }
            if let Some(hard_state) = ready.hs() {
                self.log.append_hard_state(cell, hard_state);
                replica.raw.mut_store().set_hard_state(hard_state.clone());
            }
            persisting.push(Persisting { cell, ready });
        }
        if persisting.is_empty() {
            self.serve_reads();
            self.cross_flush();
            return;
        }
        let started = Instant::now();
        // Deliberate bug: Raft goes on as if the round's entries were durable.
        if !self.world.bug(Bug::AckBeforeFsync) && self.log.sync() {
            self.metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
            if self.world.buggify(Fault::SlowFsync) {
                self.world.stall();
            }
        }
        for Persisting { cell, mut ready } in persisting {
            let replica = self.replicas.get_mut(&cell).expect("hosted");
            let persisted = ready.take_persisted_messages();
            let mut snapshots = send_messages(&*self.world, cell, persisted, &mut replica.raw);
            let mut light = replica.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                replica.raw.mut_store().set_commit(commit);
                let hard_state = replica.raw.store().hard_state().clone();
                self.log.append_hard_state(cell, &hard_state);
            }
            snapshots.extend(send_messages(&*self.world, cell, light.take_messages(), &mut replica.raw));
            let clock = follower_clock(&*self.world, replica);
            let applying = Applying {
                metrics: &self.metrics,
                clock,
                topology: &self.config.topology,
                status: &self.status,
                confirm_without_try: self.world.bug(Bug::ConfirmWithoutTry),
            };
            apply_entries(replica, light.take_committed_entries(), &applying);
            replica.raw.advance_apply();
            self.snapshots_offer(cell, snapshots);
        }
        self.snapshots_finished();
        self.serve_reads();
        self.cross_flush();
        for &cell in &cells {
            let replica = self.replicas.get_mut(&cell).expect("hosted");
            let due = replica.ledger.transfers_new_count() >= self.config.checkpoint_transfers_max;
            if due || std::mem::take(&mut replica.checkpoint_wanted) {
                self.checkpoint_start(cell);
            }
        }
        self.checkpoints_finish(false);
        for replica in self.replicas.values() {
            self.publish(replica);
        }
    }

    /// Cross-cell messages for `cell` from cell `from`. Only a leader takes
    /// them: what its applied state already answers is answered (or dropped)
    /// at once; the rest waits to be logged (`cross_propose`). A follower
    /// drops them: senders resend to the leader they learn.
    fn cross_received(&mut self, cell: CellId, from: CellId, items: Vec<Item>) {
        let Some(replica) = self.replicas.get_mut(&cell) else { return };
        if replica.raw.raft.state != StateRole::Leader {
            return;
        }
        let mut answers = Vec::new();
        for item in items {
            match replica.state.cross.triage(from, &item) {
                Triage::Log if replica.cross_inbox.len() < cross_cell::INBOX_ITEMS_MAX => {
                    replica.cross_inbox.push((from, item))
                }
                Triage::Log | Triage::Drop => {}
                Triage::Answer(answer) => answers.push((from, answer)),
            }
        }
        self.cross_send(cell, answers);
    }

    /// Sends cross-cell messages from `cell` to the leaders of their cells,
    /// one message per destination cell (local leaders directly). A message
    /// for a cell with no known leader goes to every node of its replicas.
    fn cross_send(&mut self, cell: CellId, items: Vec<(CellId, Item)>) {
        let mut by_cell: BTreeMap<CellId, Vec<Item>> = BTreeMap::new();
        for (to, item) in items {
            by_cell.entry(to).or_default().push(item);
        }
        for (to, items) in by_cell {
            let leader = match self.replicas.get(&to) {
                Some(replica) => Some(replica.raw.raft.leader_id).filter(|&id| id != raft::INVALID_ID),
                None => self.status.cell(to).and_then(|status| status.leader),
            };
            // No leader known (just started, or an election): to every node
            // of the topology's replicas of the cell (followers drop it;
            // the leader takes it), rather than wait for the next resend.
            let nodes: Vec<NodeId> = match leader {
                Some(leader) if leader == self.config.node => {
                    self.cross_received(to, cell, items);
                    continue;
                }
                Some(leader) => vec![leader],
                None => match self.config.topology.cell(to) {
                    Some(replicas) => replicas.replicas().filter(|&node| node != self.config.node).collect(),
                    None => continue,
                },
            };
            for chunk in item_chunks(items) {
                let message = snapshot::encode_cross_cell(to, cell, &chunk);
                for &node in &nodes {
                    let _ = self.world.send(node, message.clone());
                }
            }
        }
    }

    /// Logs the cross-cell messages each leader received (one entry per
    /// sending cell and round), and sends what applying entries produced.
    fn cross_propose(&mut self) {
        let timestamp = self.world.timestamp_ns();
        for replica in self.replicas.values_mut() {
            if replica.cross_inbox.is_empty() {
                continue;
            }
            let inbox = std::mem::take(&mut replica.cross_inbox);
            if replica.raw.raft.state != StateRole::Leader {
                continue;
            }
            let mut by_cell: BTreeMap<CellId, Vec<Item>> = BTreeMap::new();
            for (from, item) in inbox {
                by_cell.entry(from).or_default().push(item);
            }
            for (from, items) in by_cell {
                for chunk in item_chunks(items) {
                    let mut data = Vec::new();
                    record::encode_cross_cell(&mut data, timestamp, from, &chunk);
                    // Not tracked: a lost entry's messages are resent by their senders.
                    if let Err(error) = replica.raw.propose(Vec::new(), data) {
                        tracing::debug!(cell = replica.cell, %error, "cross-cell messages not logged");
                    }
                }
            }
        }
    }

    /// Sends the messages applying produced (a leader's; a follower's are dropped).
    fn cross_flush(&mut self) {
        let cells: Vec<CellId> = self.replicas.keys().copied().collect();
        for cell in cells {
            let replica = self.replicas.get_mut(&cell).expect("hosted");
            let steps = std::mem::take(&mut replica.cross_effects.steps);
            let outbox = std::mem::take(&mut replica.cross_effects.outbox);
            if replica.raw.raft.state != StateRole::Leader {
                continue;
            }
            for step in steps {
                self.world.cross_cell_step(cell, step);
            }
            if !outbox.is_empty() {
                self.cross_send(cell, outbox);
            }
        }
    }

    /// Every `RESEND_INTERVAL`, a leader resends what its cross-cell state
    /// has not had answered (see `CrossCellState::resend`); every replica
    /// answers its deferred requests that waited too long (`timeout`).
    fn cross_tick(&mut self, now: Instant, timestamp: u64) {
        let cells: Vec<CellId> = self.replicas.keys().copied().collect();
        for cell in cells {
            let replica = self.replicas.get_mut(&cell).expect("hosted");
            while let Some(index) = replica.deferred.iter().position(|deferred| deferred.deadline <= now) {
                let deferred = replica.deferred.swap_remove(index);
                let timeout_ms = (self.config.proposal_timeout + cross_cell::DECISION_WAIT).as_millis() as u64;
                let _ = deferred.envelope.reply.send(Err(NodeError::Timeout { cell, timeout_ms }));
            }
            let due = now.saturating_duration_since(replica.cross_resent) >= cross_cell::RESEND_INTERVAL;
            if replica.raw.raft.state != StateRole::Leader || !due {
                continue;
            }
            replica.cross_resent = now;
            let settle = cross_cell::RESEND_INTERVAL.as_nanos() as u64 / 2;
            let items = replica.state.cross.resend(cell, timestamp, settle);
            if !items.is_empty() {
                self.cross_send(cell, items);
            }
        }
    }

    fn publish_peers(&self) {
        *self.status.peers.write().expect("status lock") = self.world.peers();
    }

    /// Hands Raft's snapshot messages to the sender thread (or tells Raft
    /// they failed, when one is already in flight: it asks again later).
    fn snapshots_offer(&mut self, cell: CellId, messages: Vec<Message>) {
        for message in messages {
            let to = message.to;
            let replica = self.replicas.get_mut(&cell).expect("hosted");
            let accepted = match self.snapshot_sender.as_mut() {
                Some(sender) => sender.offer(&*self.world, cell, to, message, replica.store.clone()),
                None => false,
            };
            if !accepted {
                replica.raw.report_snapshot(to, raft::SnapshotStatus::Failure);
            }
        }
    }

    /// A failed send is reported to Raft at once. A sent snapshot is not
    /// reported: the follower's answer once it has installed it moves Raft
    /// on; without one in `SNAPSHOT_REPLY_WAIT`, it is reported failed (Raft
    /// ignores that if the follower has moved on) and Raft sends a new one.
    fn snapshots_finished(&mut self) {
        let Some(sender) = self.snapshot_sender.as_mut() else { return };
        let now = self.world.now();
        for done in sender.finished() {
            if done.ok {
                self.snapshots_sent.push((done.cell, done.to, now));
            } else if let Some(replica) = self.replicas.get_mut(&done.cell) {
                replica.raw.report_snapshot(done.to, raft::SnapshotStatus::Failure);
            }
        }
        while self
            .snapshots_sent
            .first()
            .is_some_and(|&(_, _, at)| now.duration_since(at) >= snapshot::SNAPSHOT_REPLY_WAIT)
        {
            let (cell, to, _) = self.snapshots_sent.remove(0);
            if let Some(replica) = self.replicas.get_mut(&cell) {
                replica.raw.report_snapshot(to, raft::SnapshotStatus::Failure);
            }
        }
    }

    fn serve_reads(&mut self) {
        for replica in self.replicas.values_mut() {
            while replica.reads.front().is_some_and(|batch| batch.index.is_some_and(|index| index <= replica.applied)) {
                let batch = replica.reads.pop_front().expect("checked");
                for envelope in batch.envelopes {
                    let reply = read(replica, &envelope.request);
                    let waited = self.world.now().saturating_duration_since(envelope.queued_at);
                    self.metrics.commit_seconds.observe(waited.as_secs_f64());
                    let _ = envelope.reply.send(reply);
                }
            }
        }
    }

    fn publish(&self, replica: &Replica) {
        let raft = &replica.raw.raft;
        let log = replica.raw.store();
        let status = CellStatus {
            cell: replica.cell,
            role: role_name(raft.state),
            leader: Some(raft.leader_id).filter(|&id| id != raft::INVALID_ID),
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: replica.applied,
            log_first: log.first_index(),
            log_last: log.last_index(),
            log_bytes: log.entries_bytes(),
            checkpoint_index: replica.checkpoint_index,
            elections: replica.elections,
            snapshots_installed: replica.snapshots_installed,
            voters: log.base().conf_state.voters.clone(),
            learners: log.base().conf_state.learners.clone(),
            state_hash: replica.state_hash.1,
            state_hash_index: replica.state_hash.0,
            accounts: replica.ledger.accounts_count(),
            ledgers_version: replica.state.ledgers().version(),
        };
        let ledger = &replica.ledger;
        let cross = replica.state.cross.counts();
        self.metrics.cell(&status, ledger.pending_open_count(), ledger.transfers_new_count(), cross);
        self.metrics.wal_op_last.set(self.log.last_op() as i64);
        self.status.publish(status);
    }

    /// Starts a checkpoint of a cell: its ledger hands over what changed
    /// (and keeps answering it from memory), and the writer thread puts it in
    /// the store while the engine goes on. At most one per cell is in
    /// flight: a second waits for the first (backpressure).
    fn checkpoint_start(&mut self, cell: CellId) {
        while self.replicas[&cell].checkpoint_in_flight.is_some() || self.writer.is_full() {
            self.checkpoints_finish(true);
        }
        let replica = self.replicas.get_mut(&cell).expect("hosted");
        if replica.checkpoint_in_flight.is_some() || replica.applied == replica.checkpoint_index {
            return;
        }
        if let Err(error) = replica.ledger.audit() {
            panic!("cell {cell}: ledger fails its audit at checkpoint: {error}");
        }
        let index = replica.applied;
        let log = replica.raw.store();
        let term = log.term_of(index).expect("an applied entry after the last checkpoint is in the log");
        let base = LogBase { index, term, conf_state: log.base().conf_state.clone() };
        let consensus = cell_state::encode_consensus(cell, &base, &replica.state);
        let delta = replica.ledger.checkpoint_begin();
        replica.checkpoint_in_flight = Some(index);
        replica.checkpoint_last = self.world.now();
        self.writer.send(CheckpointJob { cell, index, base, consensus, store: replica.store.clone(), delta });
    }

    /// Confirms the checkpoints the writer has finished (waiting for one if
    /// `wait`), compacts those cells' logs and truncates the write-ahead log.
    fn checkpoints_finish(&mut self, wait: bool) {
        let mut finished = false;
        while let Some(done) = self.writer.poll(wait && !finished) {
            finished = true;
            let replica = self.replicas.get_mut(&done.cell).expect("hosted");
            assert_eq!(replica.checkpoint_in_flight, Some(done.index));
            replica.checkpoint_in_flight = None;
            replica.ledger.checkpoint_end();
            replica.checkpoint_index = done.index;
            // Compact up to the checkpoint, keeping the newest entries before it for followers that lag.
            let compact_to = replica.raw.store().compaction_index(done.index, self.config.log_retained_bytes);
            replica.raw.mut_store().compact_to(compact_to);
            replica.raw.mut_store().set_snapshot_point(done.base);
            self.metrics.checkpoint_seconds.observe(done.seconds);
            tracing::info!(
                cell = done.cell,
                index = done.index,
                transfers = done.transfers,
                seconds = done.seconds,
                "checkpoint"
            );
        }
        if finished {
            let logs = self.replicas.iter().map(|(&cell, replica)| (cell, replica.raw.store()));
            self.log.truncate(logs);
        }
    }

    /// A final checkpoint of every cell, waited for (clean shutdown).
    fn checkpoints_all(&mut self) {
        self.checkpoints_finish(true);
        self.checkpoints_finish(false);
        let cells: Vec<CellId> = self.replicas.keys().copied().collect();
        for cell in cells {
            let replica = &self.replicas[&cell];
            if replica.applied > replica.checkpoint_index {
                self.checkpoint_start(cell);
                self.checkpoints_finish(true);
            }
        }
    }
}

/// A leader's other voters that are active and hold its whole log: those it
/// can hand leadership to at once, in id order.
fn caught_up_voters(raft: &raft::Raft<CellLog>) -> Vec<NodeId> {
    let last_index = raft.raft_log.last_index();
    let voters = raft.prs().conf().voters().ids();
    let caught_up = |node: NodeId| raft.prs().get(node).is_some_and(|p| p.recent_active && p.matched == last_index);
    voters.iter().filter(|&node| node != raft.id && caught_up(node)).collect()
}

fn role_name(role: StateRole) -> &'static str {
    match role {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre_candidate",
    }
}

/// Proposes an entry; on success the proposal waits for its entry's
/// application. Returns whether it was proposed.
fn propose(replica: &mut Replica, data: Vec<u8>, envelope: Option<Envelope>, deadline: Instant) -> bool {
    match replica.raw.propose(Vec::new(), data) {
        Ok(()) => {
            let index = replica.raw.raft.raft_log.last_index();
            let term = replica.raw.raft.term;
            enqueue_proposal(replica, Proposal { index, term, envelope, deadline });
            true
        }
        Err(error) => {
            if let Some(envelope) = envelope {
                let reason = format!("the leader refused the write: {error}");
                let _ = envelope.reply.send(Err(NodeError::Unavailable { cell: replica.cell, reason }));
            }
            false
        }
    }
}

/// Queues a proposal for its entry's application. Proposals of an earlier
/// term at its index or after were overwritten (never committed: a new
/// leader's log holds every committed entry), so nothing of them was
/// applied: they are answered `NotLeader` now. The queue stays in index order.
fn enqueue_proposal(replica: &mut Replica, proposal: Proposal) {
    while replica.proposals.back().is_some_and(|p| p.index >= proposal.index) {
        let overwritten = replica.proposals.pop_back().expect("checked");
        assert!(overwritten.term < proposal.term, "cell {}: two proposals at one index in one term", replica.cell);
        match overwritten.envelope {
            Some(envelope) => {
                let _ = envelope.reply.send(Err(NodeError::NotLeader { cell: replica.cell, leader: None }));
            }
            None => replica.pulse_in_flight = false,
        }
    }
    replica.proposals.push_back(proposal);
}

/// Answers the reads of a replica that is no longer the leader.
fn fail_reads(replica: &mut Replica) {
    let leader = Some(replica.raw.raft.leader_id).filter(|&id| id != raft::INVALID_ID);
    let waiting = replica.reads.drain(..).flat_map(|batch| batch.envelopes);
    for envelope in waiting.chain(replica.reads_new.drain(..)) {
        let _ = envelope.reply.send(Err(NodeError::NotLeader { cell: replica.cell, leader }));
    }
}

/// Splits items into batches of at most `cross_cell::ITEMS_BYTES_MAX` encoded bytes.
fn item_chunks(items: Vec<Item>) -> Vec<Vec<Item>> {
    let mut chunks: Vec<Vec<Item>> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let size = cross_cell::item_bytes(&item);
        if chunks.is_empty() || bytes + size > cross_cell::ITEMS_BYTES_MAX {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        chunks.last_mut().expect("pushed").push(item);
    }
    chunks
}

/// Sends Raft messages to their peers; returns the snapshot messages, which
/// need their data shipped first (see `snapshot.rs`).
fn send_messages(world: &dyn World, cell: CellId, messages: Vec<Message>, raw: &mut RawNode<CellLog>) -> Vec<Message> {
    let mut snapshots = Vec::new();
    for message in messages {
        if message.get_msg_type() == MessageType::MsgSnapshot {
            snapshots.push(message);
            continue;
        }
        let to = message.to;
        if world.buggify(Fault::DroppedConnection) {
            world.drop_connection(to);
        }
        if !world.send(to, snapshot::encode_raft(cell, &message)) {
            raw.report_unreachable(to);
        }
    }
    snapshots
}

/// Applies committed entries in order, answering the writes this node proposed.
/// The clock a replica applies entries with: `None` (the entries' own
/// timestamps) unless the deliberate bug [`Bug::FollowerClock`] is on.
fn follower_clock(world: &dyn World, replica: &Replica) -> Option<u64> {
    let follower = replica.raw.raft.state != StateRole::Leader;
    (follower && world.bug(Bug::FollowerClock)).then(|| world.timestamp_ns())
}

/// What applying entries needs besides the replica.
struct Applying<'a> {
    metrics: &'a Metrics,
    /// Only with the deliberate bug [`Bug::FollowerClock`]: a follower's own
    /// clock, used instead of the entries' timestamps.
    clock: Option<u64>,
    topology: &'a Topology,
    /// Where a routing table the global cell applies is published.
    status: &'a StatusBoard,
    /// The deliberate bug [`Bug::ConfirmWithoutTry`].
    confirm_without_try: bool,
}

fn apply_entries(replica: &mut Replica, entries: Vec<Entry>, applying: &Applying) {
    let metrics = applying.metrics;
    for entry in entries {
        assert_eq!(entry.index, replica.applied + 1, "cell {}: entries apply in order", replica.cell);
        let reply = match entry.get_entry_type() {
            EntryType::EntryNormal if entry.data.is_empty() => None,
            EntryType::EntryNormal => {
                let record = match record::decode(&entry.data) {
                    Ok(record) => record,
                    Err(error) => {
                        panic!("cell {}: committed entry {} is malformed: {error}", replica.cell, entry.index)
                    }
                };
                replica.records_applied += 1;
                replica.cross_waiting.clear();
                apply_record(replica, &record, applying)
            }
            EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                apply_conf_change(replica, &entry);
                None
            }
        };
        replica.applied = entry.index;
        // Answer the proposals up to this entry: ours if the term matches,
        // else ours was overwritten by another leader's entry.
        while replica.proposals.front().is_some_and(|p| p.index <= entry.index) {
            let proposal = replica.proposals.pop_front().expect("checked");
            let mine = proposal.index == entry.index && proposal.term == entry.term;
            match proposal.envelope {
                Some(envelope) => {
                    let answer = match (&reply, mine) {
                        (Some(reply), true) => reply.clone(),
                        _ => Err(NodeError::NotLeader { cell: replica.cell, leader: None }),
                    };
                    // Cross-cell operations still undecided: answered once they are.
                    if let (true, Ok(Reply::CreateTransfers(results))) = (mine, &answer) {
                        if !replica.cross_waiting.is_empty() {
                            let waiting = std::mem::take(&mut replica.cross_waiting);
                            let deadline = proposal.deadline + cross_cell::DECISION_WAIT;
                            let results = results.clone();
                            replica.deferred.push(Deferred { envelope, results, waiting, deadline });
                            continue;
                        }
                    }
                    metrics.commit_seconds.observe(envelope.queued_at.elapsed().as_secs_f64());
                    let _ = envelope.reply.send(answer);
                }
                None => replica.pulse_in_flight = false,
            }
        }
        answer_decided(replica, metrics);
    }
}

/// Answers the deferred requests whose cross-cell operations the entries
/// just applied decided (on any replica: a decision is in the log, whoever
/// leads now).
fn answer_decided(replica: &mut Replica, metrics: &Metrics) {
    if replica.cross_effects.decided.is_empty() {
        return;
    }
    let decided: BTreeMap<u128, Vec<CreateTransferResult>> = replica.cross_effects.decided.drain(..).collect();
    let mut index = 0;
    while index < replica.deferred.len() {
        let deferred = &mut replica.deferred[index];
        deferred.waiting.retain(|(op, start)| match decided.get(op) {
            Some(results) => {
                deferred.results[*start..*start + results.len()].copy_from_slice(results);
                false
            }
            None => true,
        });
        if deferred.waiting.is_empty() {
            let done = replica.deferred.swap_remove(index);
            metrics.commit_seconds.observe(done.envelope.queued_at.elapsed().as_secs_f64());
            let _ = done.envelope.reply.send(Ok(Reply::CreateTransfers(done.results)));
        } else {
            index += 1;
        }
    }
}

/// Applies a committed membership change: Raft's configuration and the
/// log's record of it (stored with the next checkpoint).
fn apply_conf_change(replica: &mut Replica, entry: &Entry) {
    let cell = replica.cell;
    let applied = if entry.get_entry_type() == EntryType::EntryConfChange {
        let change = ConfChange::parse_from_bytes(&entry.data).unwrap_or_else(|error| {
            panic!("cell {cell}: committed membership change {} is malformed: {error}", entry.index)
        });
        replica.raw.apply_conf_change(&change)
    } else {
        let change = ConfChangeV2::parse_from_bytes(&entry.data).unwrap_or_else(|error| {
            panic!("cell {cell}: committed membership change {} is malformed: {error}", entry.index)
        });
        replica.raw.apply_conf_change(&change)
    };
    match applied {
        Ok(conf_state) => {
            tracing::info!(cell, index = entry.index, voters = ?conf_state.voters, learners = ?conf_state.learners, "membership changed");
            replica.raw.mut_store().set_conf_state(conf_state);
            // A new replica needs a snapshot that includes it: checkpoint now.
            replica.checkpoint_wanted = true;
        }
        // Raft refuses an invalid change (e.g. removing the last voter) the same way on every replica.
        Err(error) => tracing::warn!(cell, index = entry.index, %error, "membership change not applied"),
    }
}

/// Applies one logged record to a replica: its ledger, or its cell state.
/// `None` for the engine's own entries (pulses), which answer nobody.
///
/// A ledger record naming an account of a shard the cell does not own at
/// this point of its log is not applied (on every replica alike): it was
/// checked against an older state when proposed, and the shard has been
/// released since. Its proposer is told `misrouted`.
fn apply_record(replica: &mut Replica, record: &Record, applying: &Applying) -> Option<Result<Reply, NodeError>> {
    let (metrics, clock, cell) = (applying.metrics, applying.clock, replica.cell);
    match record {
        Record::CreateAccounts { timestamp, accounts } => {
            if let Some(account) = first_foreign(&replica.state, accounts.iter().map(|a| a.id)) {
                return Some(Err(misrouted(&applying.status.routing(), cell, account)));
            }
            let timestamp = clock.unwrap_or(*timestamp);
            let ledgers = replica.state.ledgers();
            let results = replica.ledger.create_accounts_on(timestamp, accounts, &|ledger| ledgers.defines(ledger));
            metrics.results("create_accounts", &results, CreateAccountResult::as_str);
            Some(Ok(Reply::CreateAccounts(results)))
        }
        Record::CreateTransfers { timestamp, transfers } => {
            if let Some(account) = first_foreign(&replica.state, transfer_accounts(transfers)) {
                return Some(Err(misrouted(&applying.status.routing(), cell, account)));
            }
            let timestamp = clock.unwrap_or(*timestamp);
            let history = replica.store.as_ref();
            let cross = &mut replica.state.cross;
            let results = if cross.holds_any(transfers) {
                // A post or void of a cross-cell pending transfer held here: released to its other cell too.
                let cells = vec![(cell, cell); transfers.len()];
                let mut entry = Apply::new(&mut replica.ledger, history, cell, timestamp, &mut replica.cross_effects);
                let coordinated = cross.create_transfers(&mut entry, transfers, &cells);
                debug_assert!(coordinated.waiting.is_empty(), "cell-local events wait for no decision");
                cross.expire_due(&mut entry);
                coordinated.results
            } else {
                let results = replica.ledger.create_transfers(timestamp, transfers, history);
                cross.expire_due(&mut Apply::new(
                    &mut replica.ledger,
                    history,
                    cell,
                    timestamp,
                    &mut replica.cross_effects,
                ));
                results
            };
            metrics.results("create_transfers", &results, CreateTransferResult::as_str);
            Some(Ok(Reply::CreateTransfers(results)))
        }
        Record::CreateTransfersAcross { timestamp, transfers, cells } => {
            // The accounts the record places in this cell must still be its own.
            let local = transfers
                .iter()
                .zip(cells)
                .flat_map(|(t, &(debit, credit))| [(t.debit_account_id, debit), (t.credit_account_id, credit)])
                .filter(|&(account, owner)| account != 0 && owner == cell)
                .map(|(account, _)| account);
            if let Some(account) = first_foreign(&replica.state, local) {
                return Some(Err(misrouted(&applying.status.routing(), cell, account)));
            }
            let timestamp = clock.unwrap_or(*timestamp);
            let history = replica.store.as_ref();
            replica.state.cross.bug_confirm_without_try = applying.confirm_without_try;
            let mut entry = Apply::new(&mut replica.ledger, history, cell, timestamp, &mut replica.cross_effects);
            let coordinated = replica.state.cross.create_transfers(&mut entry, transfers, cells);
            replica.state.cross.expire_due(&mut entry);
            metrics.results("create_transfers", &coordinated.results, CreateTransferResult::as_str);
            replica.cross_waiting = coordinated.waiting;
            Some(Ok(Reply::CreateTransfers(coordinated.results)))
        }
        Record::CrossCell { timestamp, from, items } => {
            let timestamp = clock.unwrap_or(*timestamp);
            let mut cross = std::mem::take(&mut replica.state.cross);
            let state = &replica.state;
            let owns = |account: u128| state.owns_account(account);
            let history = replica.store.as_ref();
            let mut entry = Apply::new(&mut replica.ledger, history, cell, timestamp, &mut replica.cross_effects);
            cross.apply_items(&mut entry, &owns, *from, items);
            cross.expire_due(&mut entry);
            replica.state.cross = cross;
            // A decision changes what a snapshot must hold: the cell state.
            None
        }
        Record::Pulse { timestamp } => {
            let timestamp = clock.unwrap_or(*timestamp);
            replica.ledger.pulse(timestamp);
            let history = replica.store.as_ref();
            let mut entry = Apply::new(&mut replica.ledger, history, cell, timestamp, &mut replica.cross_effects);
            replica.state.cross.expire_due(&mut entry);
            None
        }
        &Record::ChangeRouting { expected_version, change, .. } => {
            let result = replica.state.change_routing(expected_version, change, applying.topology);
            Some(match result {
                Ok(table) => {
                    tracing::info!(version = table.version(), ?change, "routing table changed");
                    applying.status.publish_routing(table);
                    replica.checkpoint_wanted = true;
                    Ok(Reply::RoutingChanged(table.clone()))
                }
                Err(error) => Err(NodeError::ChangeRefused { cell, reason: error.to_string() }),
            })
        }
        &Record::ShardOwnership { shard, owned, .. } => {
            Some(match replica.state.set_owned(cell, shard, owned, &replica.ledger) {
                Ok(()) => {
                    tracing::info!(cell, shard, owned, "shard ownership changed");
                    replica.checkpoint_wanted = true;
                    Ok(Reply::ShardOwnership)
                }
                Err(error) => Err(NodeError::ChangeRefused { cell, reason: error.to_string() }),
            })
        }
        Record::DefineLedger { expected_version, definition, .. } => {
            if cell != GLOBAL_CELL {
                // Only the global cell's leader proposes these (`admin_precondition`).
                return Some(Err(NodeError::ChangeRefused { cell, reason: "not the global cell".to_string() }));
            }
            Some(match replica.state.define_ledger(*expected_version, definition.clone()) {
                Ok(table) => {
                    tracing::info!(version = table.version(), %definition, "ledger defined");
                    applying.status.publish_ledgers(table);
                    replica.checkpoint_wanted = true;
                    Ok(Reply::LedgersChanged(table.clone()))
                }
                Err(error) => Err(NodeError::ChangeRefused { cell, reason: error.to_string() }),
            })
        }
        Record::ChangeTopology { expected_version, text, .. } => {
            Some(match replica.state.change_topology(*expected_version, text) {
                Ok(table) => {
                    tracing::info!(version = table.version(), "topology changed: leaders follow the new preferences");
                    applying.status.publish_topology(table);
                    replica.checkpoint_wanted = true;
                    Ok(Reply::TopologyChanged(table.clone()))
                }
                Err(error) => Err(NodeError::ChangeRefused { cell, reason: error.to_string() }),
            })
        }
        Record::AdoptLedgers { table, .. } => {
            if cell != GLOBAL_CELL && replica.state.adopt_ledgers(table) {
                tracing::info!(cell, version = table.version(), ledgers = table.len(), "ledger definitions adopted");
                replica.checkpoint_wanted = true;
            }
            None
        }
    }
}

fn read(replica: &Replica, request: &Request) -> Result<Reply, NodeError> {
    let store = replica.store.as_ref();
    let ledger = &replica.ledger;
    Ok(match request {
        Request::LookupAccounts(ids) => Reply::Accounts(ledger.lookup_accounts(ids)),
        Request::LookupTransfers(ids) => Reply::Transfers(ledger.lookup_transfers(ids, store)),
        Request::GetAccountTransfers(filter) => {
            Reply::Transfers(ledger.get_account_transfers(filter, store).map_err(NodeError::InvalidFilter)?)
        }
        Request::GetAccountBalances(filter) => {
            Reply::Balances(ledger.get_account_balances(filter, store).map_err(NodeError::InvalidFilter)?)
        }
        Request::CreateAccounts(_)
        | Request::CreateTransfers(_)
        | Request::ChangeRouting { .. }
        | Request::ShardOwnership { .. }
        | Request::DefineLedger { .. }
        | Request::ChangeTopology { .. } => unreachable!("reads only"),
    })
}

/// A checkpoint for the writer thread.
struct CheckpointJob {
    cell: CellId,
    index: u64,
    /// Where the checkpoint puts the log's base, and the same as stored consensus metadata.
    base: LogBase,
    consensus: Vec<u8>,
    store: Arc<Store>,
    delta: Arc<CheckpointDelta>,
}

impl CheckpointJob {
    /// Writes the checkpoint to the cell's store, durably.
    fn write(self) -> CheckpointDone {
        let started = Instant::now();
        if let Err(error) = self.store.apply_checkpoint_with(self.index, &self.delta, &self.consensus) {
            panic!("cell {}: checkpoint write failed, stopping to recover on restart: {error}", self.cell);
        }
        let transfers = self.delta.transfers.len();
        let seconds = started.elapsed().as_secs_f64();
        CheckpointDone { cell: self.cell, index: self.index, base: self.base, transfers, seconds }
    }
}

/// A finished checkpoint write.
struct CheckpointDone {
    cell: CellId,
    index: u64,
    base: LogBase,
    transfers: usize,
    seconds: f64,
}

/// The thread that writes checkpoints to the stores, one at a time (or,
/// under the simulator, no thread: each is written when it is sent).
struct CheckpointWriter {
    sender: Option<Sender<CheckpointJob>>,
    done: Receiver<CheckpointDone>,
    in_flight: usize,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Inline mode: the checkpoints written, not yet polled.
    written: Option<VecDeque<CheckpointDone>>,
}

/// Checkpoints queued or being written, all cells together.
const CHECKPOINTS_IN_FLIGHT_MAX: usize = 64;

impl CheckpointWriter {
    fn start() -> CheckpointWriter {
        let (sender, jobs) = bounded::<CheckpointJob>(CHECKPOINTS_IN_FLIGHT_MAX);
        let (done_sender, done) = bounded(CHECKPOINTS_IN_FLIGHT_MAX);
        let thread = std::thread::Builder::new()
            .name("cellpay-checkpoint".to_string())
            .spawn(move || {
                for job in jobs {
                    if done_sender.send(job.write()).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the checkpoint writer");
        CheckpointWriter { sender: Some(sender), done, in_flight: 0, thread: Some(thread), written: None }
    }

    /// No thread: each checkpoint is written when it is sent (the simulator).
    fn inline() -> CheckpointWriter {
        let (_, done) = bounded(0);
        CheckpointWriter { sender: None, done, in_flight: 0, thread: None, written: Some(VecDeque::new()) }
    }

    /// Whether another checkpoint must wait for one to finish.
    fn is_full(&self) -> bool {
        self.in_flight >= CHECKPOINTS_IN_FLIGHT_MAX
    }

    fn send(&mut self, job: CheckpointJob) {
        assert!(!self.is_full(), "checkpoints in flight over the limit");
        self.in_flight += 1;
        if let Some(written) = self.written.as_mut() {
            written.push_back(job.write());
            return;
        }
        let sender = self.sender.as_ref().expect("writer running");
        sender.send(job).expect("the checkpoint writer stopped: see its panic");
    }

    /// A finished checkpoint, if one is done (waiting for one if `wait` and any is in flight).
    fn poll(&mut self, wait: bool) -> Option<CheckpointDone> {
        if self.in_flight == 0 {
            return None;
        }
        let done = if let Some(written) = self.written.as_mut() {
            written.pop_front()
        } else if wait {
            Some(self.done.recv().expect("the checkpoint writer stopped: see its panic"))
        } else {
            match self.done.try_recv() {
                Ok(done) => Some(done),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => panic!("the checkpoint writer stopped: see its panic"),
            }
        };
        if done.is_some() {
            self.in_flight -= 1;
        }
        done
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use cellpay_cluster::routing::RoutingChange;

    #[test]
    fn requests_route_to_the_cell_of_their_accounts() {
        let topology = Topology::local(17000, 4);
        let account = |user: u64| cellpay_ledger::id::account_id(user, 0).unwrap();
        let mut transfer =
            Transfer { id: 1, debit_account_id: account(1), credit_account_id: account(2), ..Transfer::default() };
        let routing = RoutingTable::initial(&topology);
        let Ok(Route::Cell(cell)) = route(&topology, &routing, &Request::CreateTransfers(vec![transfer])) else {
            panic!()
        };
        assert_eq!(cell, topology.cell_of_shard(1).unwrap());
        // Routing follows the table, not the topology file.
        let to = topology.cells.iter().map(|c| c.id).find(|&c| c != cell).unwrap();
        let moved = routing.apply(1, RoutingChange::MoveShard { shard: 1, to }, &topology).unwrap();
        let mut local = transfer;
        local.credit_account_id = account(101);
        let Ok(Route::Cell(moved_cell)) = route(&topology, &moved, &Request::CreateTransfers(vec![local])) else {
            panic!()
        };
        assert_eq!(moved_cell, to);
        // A transfer to another cell's account goes to its debit account's cell, which coordinates it;
        // transfers of different debit cells in one request are refused (a gateway splits them).
        transfer.credit_account_id = account(99);
        let Ok(Route::Cell(home)) = route(&topology, &routing, &Request::CreateTransfers(vec![transfer])) else {
            panic!()
        };
        assert_eq!(home, cell);
        let mut other = transfer;
        other.debit_account_id = account(99);
        other.credit_account_id = account(1);
        let error = route(&topology, &routing, &Request::CreateTransfers(vec![transfer, other])).err().unwrap();
        assert!(matches!(error, NodeError::CrossCell { first_index: 0, index: 1, .. }), "{error:?}");
        // A linked chain goes whole to its first event's cell.
        transfer.flags = TransferFlags::LINKED;
        let Ok(Route::Cell(chain)) = route(&topology, &routing, &Request::CreateTransfers(vec![transfer, other]))
        else {
            panic!()
        };
        assert_eq!(chain, cell);
        let Ok(Route::Split(parts)) =
            route(&topology, &routing, &Request::LookupAccounts(vec![account(1), account(99), account(2)]))
        else {
            panic!()
        };
        assert_eq!(parts.len(), 2);
        let Ok(Route::Split(parts)) = route(&topology, &routing, &Request::LookupTransfers(vec![5])) else { panic!() };
        assert_eq!(parts.len(), 4);
    }

    fn replica(dir: &std::path::Path, applied: u64) -> Replica {
        let conf = ConfState { voters: vec![1], ..Default::default() };
        let mut log = CellLog::new(conf);
        let entries: Vec<Entry> = (1..=applied).map(|index| Entry { index, term: 1, ..Entry::default() }).collect();
        log.append(&entries).unwrap();
        log.set_hard_state(raft::prelude::HardState { term: 7, vote: 1, commit: applied, ..Default::default() });
        let config = raft::Config { id: 1, applied, ..Default::default() };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&config, log, &logger).unwrap();
        let store = Arc::new(Store::open(dir).unwrap());
        let state = CellState::initial(&single_node_topology(), 1);
        let mut replica = Replica::new(1, raw, (Ledger::new(LedgerConfig::default()), state), store, 0, Instant::now());
        assert_eq!(replica.applied, applied);
        replica.checkpoint_index = 0;
        replica.role = StateRole::Leader;
        replica
    }

    fn proposal(index: u64, term: u64, id: u128) -> (Proposal, oneshot::Receiver<Result<Reply, NodeError>>) {
        let (reply, answer) = oneshot::channel();
        let accounts = vec![Account { id, ledger: 1, code: 1, ..Account::default() }];
        let envelope =
            Envelope { cell: 1, request: Request::CreateAccounts(accounts), reply, queued_at: Instant::now() };
        (Proposal { index, term, envelope: Some(envelope), deadline: Instant::now() + Duration::from_secs(10) }, answer)
    }

    fn account_entry(index: u64, term: u64, id: u128) -> Entry {
        let mut data = Vec::new();
        let accounts = [Account { id, ledger: 1, code: 1, ..Account::default() }];
        record::encode_create_accounts(&mut data, 1_000 + index, &accounts);
        Entry { index, term, data: data.into(), ..Entry::default() }
    }

    /// Found in review: a leader of term 5 proposed entries 100 and 101, lost
    /// leadership before they were replicated (the next leader overwrote its
    /// log from 98), and was elected again in term 7; its new write lands at
    /// index 99. The overwritten proposals are answered at once (nothing of
    /// them was applied) and the new one is answered when entry 99 applies.
    #[test]
    fn a_proposal_at_a_lower_index_in_a_new_term_is_answered_when_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = replica(dir.path(), 97);
        let metrics = Metrics::new();
        let (stale_a, mut answer_a) = proposal(100, 5, 1);
        let (stale_b, mut answer_b) = proposal(101, 5, 2);
        let (mine, mut answer) = proposal(99, 7, 3);
        for proposal in [stale_a, stale_b, mine] {
            enqueue_proposal(&mut replica, proposal);
        }
        assert!(matches!(answer_a.try_recv(), Ok(Err(NodeError::NotLeader { .. }))));
        assert!(matches!(answer_b.try_recv(), Ok(Err(NodeError::NotLeader { .. }))));
        let noop = Entry { index: 98, term: 7, ..Entry::default() };
        let topology = single_node_topology();
        let status = StatusBoard::initial(&topology);
        let applying = Applying {
            metrics: &metrics,
            clock: None,
            topology: &topology,
            status: &status,
            confirm_without_try: false,
        };
        apply_entries(&mut replica, vec![noop, account_entry(99, 7, 3)], &applying);
        assert_eq!(replica.ledger.accounts_count(), 1, "the write was applied");
        assert!(matches!(answer.try_recv(), Ok(Ok(Reply::CreateAccounts(_)))), "and answered as applied");
    }

    #[test]
    fn merged_lookups_keep_the_request_order() {
        let items = vec![(3u128, 'c'), (1, 'a')];
        assert_eq!(in_request_order(&[1, 2, 3], items, |item| item.0), vec![(1, 'a'), (3, 'c')]);
    }
}
