//! The deterministic simulator: the whole cluster (five nodes across three
//! regions, every cell a five-replica Raft group) in one thread, running the
//! production engine (`cellpay_server::node::SteppedNode`) under virtual
//! time, a simulated network and a crashing disk, all driven by one seed.
//!
//! A run:
//! 1. **chaos** for `steps` events: clients send batches and lookups, half
//!    of them through two gateways (`gateway.rs`) whose routing tables lag
//!    while the mover (`mover.rs`) moves shards; the network delays (per
//!    region pair, with jitter; each link in order), loses and duplicates
//!    messages and drops connections; the fault schedule crashes nodes (the
//!    write-ahead log loses what was not fsynced, sometimes leaving a torn
//!    write, sometimes with a flipped bit in what was fsynced: the disk is
//!    then replaced, see `replace.rs`), restarts them, cuts links one way or
//!    both ways, isolates nodes, cuts whole regions and restarts gateways;
//!    the engines' fault points (slow fsyncs, late ticks, leader
//!    step-downs, dropped connections) fire as the seed chooses, and so do crash points right after a cell's leader applies
//!    a step of the cross-cell protocol (the node is crashed after the
//!    event it is handling, before what it sent in that round leaves);
//!    checkpoints and snapshots run as in production;
//! 2. **heal**: faults stop, every node restarts, every link heals; every
//!    client's request in doubt must resolve and every cell must commit
//!    within [`LIVENESS_BOUND_NS`];
//! 3. **quiesce**: the clients stop and the replicas converge; then the
//!    checkers (one file each in `checkers/`) examine every replica.
//!
//! Everything that happens is folded into a trace hash: the same seed gives
//! the same hash. The store (fjall) runs on a real temporary directory; its
//! contents are deterministic (what was written), its timing is not used.

pub mod checkers;
pub mod gateway;
mod mover;
mod replace;
pub mod rng;
pub mod workload;
pub mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cellpay_cluster::topology::{CellId, NodeId, Topology};
use cellpay_server::node::{NodeConfig, SteppedNode};
use cellpay_server::world::Bug;

use crate::checkers::Failure;
use crate::gateway::{Gateway, GatewayCounts, GATEWAYS};
use crate::replace::Phase;
use crate::rng::Rng;
use crate::workload::{Action, Book, Client, Target};
use crate::world::{step_index, FaultRates, Shared, SimWorld, STEPS};

pub const NODES: u64 = 5;
pub const CELLS: u32 = 4;
pub const CLIENTS: u64 = 8;
const TICK_NS: u64 = 100_000_000;
/// After the faults stop, every request in doubt resolves and every cell
/// commits within this (virtual) time.
pub const LIVENESS_BOUND_NS: u64 = 30_000_000_000;
/// The crash points right after each cross-cell protocol step (indexed like
/// `cross_cell::Step::ALL`), per million steps a leader applies, in the runs
/// that take them (each step's point is on in half the runs). A run's
/// leaders apply a few hundred of each step every cross-cell transfer takes
/// (tried, prepared, decided, resolved, forgotten) and a few tens of the
/// others (refused, tombstoned: mostly payments to accounts nobody opened;
/// released, release-applied: pending transfers across cells posted, voided
/// or expired), so each point crashes a node in about one run of three that
/// take it: a crash costs a restart and a catch-up, the bulk of the
/// simulator's time.
const STEP_CRASH_PER_MILLION: [u64; STEPS] = [1_000, 1_000, 10_000, 1_000, 1_000, 15_000, 1_000, 5_000, 5_000];
/// How long the replicas get to converge once the clients stop.
const QUIESCE_BOUND_NS: u64 = 30_000_000_000;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Events of the chaos phase.
    pub steps: u64,
    /// Deliberate bugs to switch on (the checkers must catch them).
    pub bugs: Vec<Bug>,
}

impl SimConfig {
    pub fn new(seed: u64, steps: u64) -> SimConfig {
        SimConfig { seed, steps, bugs: Vec::new() }
    }

    /// The command that replays this run.
    pub fn command(&self) -> String {
        let bugs: String = self.bugs.iter().map(|b| format!(" --bug {}", bug_name(*b))).collect();
        format!("cellpay sim --seed {} --steps {}{bugs}", self.seed, self.steps)
    }
}

pub fn bug_name(bug: Bug) -> &'static str {
    match bug {
        Bug::AckBeforeFsync => "ack-before-fsync",
        Bug::FollowerClock => "follower-clock",
        Bug::AckBeforeCommit => "ack-before-commit",
        Bug::ConfirmWithoutTry => "confirm-without-try",
    }
}

pub fn bug_from_name(name: &str) -> Option<Bug> {
    [Bug::AckBeforeFsync, Bug::FollowerClock, Bug::AckBeforeCommit, Bug::ConfirmWithoutTry]
        .into_iter()
        .find(|&b| bug_name(b) == name)
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub steps: u64,
    pub trace_hash: u64,
    pub virtual_seconds: f64,
    pub batches_acknowledged: u64,
    pub transfers_acknowledged: u64,
    /// Of them, transfers between accounts of two cells.
    pub transfers_acknowledged_cross_cell: u64,
    pub retries: u64,
    pub crashes: u64,
    pub torn_writes: u64,
    pub link_cuts: u64,
    /// Connections dropped with their messages in flight.
    pub connection_drops: u64,
    pub region_cuts: u64,
    pub messages_sent: u64,
    pub messages_lost: u64,
    pub messages_duplicated: u64,
    /// Crashes that also flipped a bit of the fsynced log; of those, how
    /// many recovery caught (the disk was then replaced) and how many it cut
    /// as a torn write (the byte was in the last record).
    pub damaged_logs: u64,
    pub damage_caught: u64,
    pub damage_cut_as_torn: u64,
    /// Damaged disks replaced: removed from every cell, wiped, rejoined.
    pub disks_replaced: u64,
    /// Snapshots replicas installed (a replica that lagged past its leader's compacted log).
    pub snapshots_installed: u64,
    /// Shards moved to another cell (release, routing change, acquire) while the faults went on.
    pub shards_moved: u64,
    /// Fault points taken: slow fsyncs, late ticks, leader step-downs, dropped connections.
    pub fault_points: [u64; 4],
    /// Cross-cell protocol steps the cells' leaders applied, indexed like
    /// `cross_cell::Step::ALL`.
    pub cross_cell_steps: [u64; STEPS],
    /// Crashes taken right after a leader applied a protocol step, before
    /// the round's messages left (counted in `crashes` too), by step.
    pub step_crashes: [u64; STEPS],
    /// What the gateways did, all together (misroutes among it).
    pub gateways: GatewayCounts,
    pub failures: Vec<Failure>,
}

impl SimReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

#[derive(Debug)]
enum Event {
    Deliver {
        from: NodeId,
        to: NodeId,
        payload: Vec<u8>,
    },
    Tick {
        node: NodeId,
    },
    Restart {
        node: NodeId,
    },
    Heal {
        cut: usize,
    },
    /// The next step of replacing a node's damaged disk.
    Replace {
        node: NodeId,
    },
    Chaos,
}

/// How often the nodes of a run checkpoint, and how much log they keep.
#[derive(Clone, Copy, Debug)]
struct Storage {
    checkpoint_transfers_max: usize,
    checkpoint_interval_max_ns: u64,
    log_retained_bytes: u64,
}

/// A cut: messages from `from` to `to` are dropped while it lasts.
type Link = (NodeId, NodeId);

struct Sim {
    config: SimConfig,
    topology: Arc<Topology>,
    dir: tempfile::TempDir,
    shared: Arc<Mutex<Shared>>,
    base: Instant,
    rng: Rng,
    net_rng: Rng,
    nodes: BTreeMap<NodeId, Option<SteppedNode>>,
    /// A stalled node handles nothing before this.
    busy_until: BTreeMap<NodeId, u64>,
    skews: BTreeMap<NodeId, u64>,
    events: BTreeMap<(u64, u64), Event>,
    sequence: u64,
    /// Active cuts, by id: each a set of one-way links.
    cuts: BTreeMap<usize, Vec<Link>>,
    cut_next: usize,
    loss_per_million: u64,
    duplicate_per_million: u64,
    jitter_ns: u64,
    /// When the last message put on each link arrives: a link delivers in
    /// order, as the transport's TCP connection does (jitter reorders
    /// messages of different links only), and loses messages when its queue
    /// overflows or its connection drops.
    link_last: BTreeMap<Link, u64>,
    storage: Storage,
    /// The chance that a crash also flips a bit of what the log fsynced.
    damage_per_million: u64,
    /// Nodes whose log was damaged at their last crash, until they restart.
    damaged: BTreeSet<NodeId>,
    /// Nodes whose disk is being replaced.
    replacing: BTreeMap<NodeId, Phase>,
    clients: Vec<Client>,
    gateways: Vec<Gateway>,
    mover: mover::Mover,
    /// The mover's moves whose shard the gateway clients have taken users in.
    moves_adopted: usize,
    book: Book,
    chaos: bool,
    trace: u64,
    report: SimReport,
}

/// FNV-1a over the trace, one record at a time.
fn fold(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3))
}

impl Sim {
    fn new(config: SimConfig) -> Sim {
        let mut rng = Rng::new(config.seed);
        let topology = Arc::new(Topology::local(20_000, CELLS));
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("a temp dir");
        // Which fault points this run takes, and how often (FoundationDB's BUGGIFY: on for some runs only).
        let mut rate = |per_million: u64| if rng.chance(500_000) { per_million } else { 0 };
        let rates = FaultRates {
            slow_fsync: rate(20_000),
            delayed_tick: rate(50_000),
            leader_step_down: rate(2_000),
            dropped_connection: rate(200),
            step_crash: STEP_CRASH_PER_MILLION.map(&mut rate),
        };
        let nodes: Vec<NodeId> = topology.nodes().map(|n| n.id).collect();
        let shared = Arc::new(Mutex::new(Shared {
            now_ns: 0,
            outbox: Vec::new(),
            stalls: Vec::new(),
            rng: rng.fork(),
            rates,
            bugs: config.bugs.clone(),
            faults_taken: [0; 4],
            dropped: Vec::new(),
            peers: nodes.clone(),
            steps_applied: [0; STEPS],
            crash_requests: Vec::new(),
        }));
        let net_rng = rng.fork();
        let loss_per_million = [0, 1_000, 10_000, 50_000][rng.below(4) as usize];
        let duplicate_per_million = [0, 1_000, 10_000][rng.below(3) as usize];
        let jitter_ns = [0, 1_000_000, 10_000_000, 50_000_000][rng.below(4) as usize];
        let damage_per_million = if rng.chance(500_000) { 200_000 } else { 0 };
        let storage = Storage {
            checkpoint_transfers_max: [16, 256, 4096][rng.below(3) as usize],
            checkpoint_interval_max_ns: [500_000_000, 3_000_000_000, 10_000_000_000][rng.below(3) as usize],
            log_retained_bytes: [0, 16 << 10, 64 << 20][rng.below(3) as usize],
        };
        let mut skews = BTreeMap::new();
        for &node in &nodes {
            skews.insert(node, rng.below(2_000_000_000));
        }
        let clients = (0..CLIENTS)
            .map(|i| {
                let cell = topology.cells[(i % u64::from(CELLS)) as usize].id;
                Client::new(i + 1, cell, &topology, rng.fork())
            })
            .collect();
        let mut clients: Vec<Client> = clients;
        // The second client of each cell sends through the gateways.
        for client in clients.iter_mut().skip(CELLS as usize) {
            client.via_gateway = true;
        }
        // Each client also pays the users of the clients of other cells (cross-cell transfers).
        for index in 0..clients.len() {
            let cell = clients[index].cell;
            let foreign: Vec<u128> =
                clients.iter().filter(|other| other.cell != cell).flat_map(|other| other.users().to_vec()).collect();
            clients[index].set_foreign(foreign);
        }
        let used: BTreeSet<u32> = clients
            .iter()
            .flat_map(Client::accounts)
            .map(|account| cellpay_ledger::id::shard_of_account(account, topology.shards))
            .collect();
        let mover = mover::Mover::new(&topology, &used, rng.fork());
        // How often the gateways read the routing table (besides after a misroute): rarely, so
        // that they are often stale while shards move.
        let refresh_interval_ns = [1_000_000_000, 5_000_000_000, 20_000_000_000][rng.below(3) as usize];
        let gateways = (0..GATEWAYS as u64)
            .map(|id| Gateway::new(id, topology.clone(), refresh_interval_ns, rng.fork()))
            .collect();
        let report = SimReport { seed: config.seed, ..SimReport::default() };
        let mut sim = Sim {
            config,
            topology,
            dir,
            shared,
            base: Instant::now(),
            rng,
            net_rng,
            nodes: BTreeMap::new(),
            busy_until: BTreeMap::new(),
            skews,
            events: BTreeMap::new(),
            sequence: 0,
            cuts: BTreeMap::new(),
            cut_next: 0,
            loss_per_million,
            duplicate_per_million,
            jitter_ns,
            link_last: BTreeMap::new(),
            storage,
            damage_per_million,
            damaged: BTreeSet::new(),
            replacing: BTreeMap::new(),
            clients,
            gateways,
            mover,
            moves_adopted: 0,
            book: Book::default(),
            chaos: true,
            trace: 0xcbf2_9ce4_8422_2325,
            report,
        };
        for node in nodes {
            sim.start(node);
            let first_tick = sim.rng.below(TICK_NS);
            sim.schedule(first_tick, Event::Tick { node });
        }
        sim.schedule(1_000_000_000, Event::Chaos);
        sim
    }

    fn now(&self) -> u64 {
        self.shared.lock().expect("sim lock").now_ns
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.sequence += 1;
        self.events.insert((at, self.sequence), event);
    }

    fn record(&mut self, parts: &[u64]) {
        for part in parts {
            self.trace = fold(self.trace, &part.to_le_bytes());
        }
    }

    fn node_dir(&self, node: NodeId) -> PathBuf {
        self.dir.path().join(format!("node-{node}"))
    }

    fn start(&mut self, node: NodeId) {
        let mut config = NodeConfig::cluster(self.node_dir(node), self.topology.clone(), node);
        // Checkpoint and compact often, so that restarts recover from a
        // checkpoint and replicas that lag need snapshots.
        let storage = self.storage;
        config.checkpoint_transfers_max = storage.checkpoint_transfers_max;
        config.checkpoint_interval_max = std::time::Duration::from_nanos(storage.checkpoint_interval_max_ns);
        config.log_retained_bytes = storage.log_retained_bytes;
        let world = SimWorld { node, shared: self.shared.clone(), base: self.base, skew_ns: self.skews[&node] };
        let opened = SteppedNode::open(config, Box::new(world));
        if self.damaged.remove(&node) {
            match checkers::disk::check_start(node, opened.as_ref().map(|(_, recovery)| recovery)) {
                Ok(checkers::disk::Outcome::Caught) => {
                    tracing::info!(node, "the damaged log was caught: replacing the disk");
                    self.report.damage_caught += 1;
                    self.replace_begin(node);
                    return;
                }
                Ok(checkers::disk::Outcome::CutAsTorn) => self.report.damage_cut_as_torn += 1,
                Err(Some(failure)) => self.report.failures.push(failure),
                Err(None) => {}
            }
        }
        let stepped = match opened {
            Ok((stepped, _)) => stepped,
            Err(error) => panic!("node {node} does not start: {error}; replay: {}", self.config.command()),
        };
        self.nodes.insert(node, Some(stepped));
        self.flush_outbox();
    }

    /// A crash: the node's process is gone; its log keeps only what was fsynced.
    fn crash(&mut self, node: NodeId) {
        let Some(stepped) = self.nodes.insert(node, None).flatten() else { return };
        let durable = stepped.wal_durable_op();
        self.report.snapshots_installed += snapshots_installed(&stepped);
        drop(stepped);
        let torn: Vec<u8> = if self.rng.chance(500_000) {
            self.report.torn_writes += 1;
            (0..self.rng.between(1, 300)).map(|_| self.rng.below(256) as u8).collect()
        } else {
            Vec::new()
        };
        let wal = self.node_dir(node).join("wal");
        cellpay_storage::wal::crash_lose_unsynced(&wal, durable, &torn)
            .unwrap_or_else(|error| panic!("cutting node {node}'s log: {error}"));
        // Sometimes the crash also damages what was fsynced (one node at a time).
        let quiet = self.damaged.is_empty() && self.replacing.is_empty();
        if quiet && torn.is_empty() && self.rng.chance(self.damage_per_million) {
            if let Some((segment, offset)) = replace::flip_a_bit(&wal, &mut self.rng) {
                tracing::info!(node, segment, offset, "flipped a bit of the fsynced log");
                self.damaged.insert(node);
                self.report.damaged_logs += 1;
                self.record(&[0xDA, node, offset]);
            }
        }
        self.report.crashes += 1;
        self.record(&[0xC0, node, durable]);
        // Messages sent before the crash may still arrive; none after.
        self.shared.lock().expect("sim lock").outbox.retain(|(from, _, _)| *from != node);
    }

    fn blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.cuts.values().any(|links| links.contains(&(from, to)))
    }

    /// A crash of the fault schedule: `node` goes down (unless two nodes
    /// are down already) and restarts later. Whether it went down.
    fn crash_for_a_while(&mut self, node: NodeId) -> bool {
        let down = self.nodes.values().filter(|stepped| stepped.is_none()).count();
        if down >= 2 || self.nodes.get(&node).is_none_or(Option::is_none) {
            return false;
        }
        self.crash(node);
        let restart = self.now() + self.rng.between(500_000_000, 8_000_000_000);
        self.schedule(restart, Event::Restart { node });
        true
    }

    /// Crashes the nodes whose leader took a crash point after a
    /// cross-cell protocol step, before what they sent leaves.
    fn take_step_crashes(&mut self) {
        let requests = std::mem::take(&mut self.shared.lock().expect("sim lock").crash_requests);
        for (node, step) in requests {
            if self.crash_for_a_while(node) {
                let index = step_index(step);
                self.report.step_crashes[index] += 1;
                self.record(&[0xC5, node, index as u64]);
            }
        }
    }

    /// Puts what the engines sent on the simulated network (after crashing
    /// the nodes that asked to: what they sent this round is lost).
    fn flush_outbox(&mut self) {
        self.take_step_crashes();
        let (sent, stalls, dropped) = {
            let mut shared = self.shared.lock().expect("sim lock");
            let shared = &mut *shared;
            (
                std::mem::take(&mut shared.outbox),
                std::mem::take(&mut shared.stalls),
                std::mem::take(&mut shared.dropped),
            )
        };
        for (a, b) in dropped {
            self.drop_connection(a, b);
        }
        let now = self.now();
        for node in stalls {
            let until = now + self.rng.between(10_000_000, 500_000_000);
            self.busy_until.insert(node, until);
        }
        for (from, to, payload) in sent {
            self.report.messages_sent += 1;
            if self.blocked(from, to) || (self.chaos && self.net_rng.chance(self.loss_per_million)) {
                self.report.messages_lost += 1;
                continue;
            }
            let copies = if self.chaos && self.net_rng.chance(self.duplicate_per_million) { 2 } else { 1 };
            self.report.messages_duplicated += copies - 1;
            for _ in 0..copies {
                let delay = self.topology.one_way_delay(from, to).as_nanos() as u64
                    + if self.jitter_ns > 0 { self.net_rng.below(self.jitter_ns) } else { 0 };
                let last = self.link_last.entry((from, to)).or_insert(0);
                let at = (now + delay.max(1)).max(*last);
                *last = at;
                self.schedule(at, Event::Deliver { from, to, payload: payload.clone() });
            }
        }
    }

    /// Handles one event; false when there is none.
    fn step(&mut self) -> bool {
        let Some(((at, _), event)) = self.events.pop_first() else { return false };
        self.shared.lock().expect("sim lock").now_ns = at;
        // A stalled node's events wait for it.
        let target = match &event {
            Event::Deliver { to, .. } => Some(*to),
            Event::Tick { node } => Some(*node),
            _ => None,
        };
        if let Some(node) = target {
            if let Some(&until) = self.busy_until.get(&node) {
                if until > at {
                    self.schedule(until, event);
                    return true;
                }
            }
        }
        match event {
            Event::Deliver { from, to, payload } => {
                self.record(&[1, at, from, to, payload.len() as u64]);
                if let Some(Some(node)) = self.nodes.get_mut(&to) {
                    node.receive(from, &payload);
                    node.round();
                }
            }
            Event::Tick { node } => {
                self.record(&[2, at, node]);
                if let Some(Some(stepped)) = self.nodes.get_mut(&node) {
                    stepped.tick();
                    stepped.round();
                }
                self.schedule(at + TICK_NS, Event::Tick { node });
            }
            Event::Restart { node } => {
                self.record(&[3, at, node]);
                if self.nodes[&node].is_none() && !self.disks_out().contains(&node) {
                    self.start(node);
                }
            }
            Event::Heal { cut } => {
                self.record(&[4, at, cut as u64]);
                self.cuts.remove(&cut);
            }
            Event::Replace { node } => self.replace_step(node),
            Event::Chaos => {
                if self.chaos {
                    self.chaos_event();
                    let next = at + self.rng.between(200_000_000, 2_000_000_000);
                    self.schedule(next, Event::Chaos);
                }
            }
        }
        self.flush_outbox();
        self.clients_step();
        self.gateways_step();
        let now = self.now();
        self.mover.poll(now, &self.topology, &mut self.nodes);
        self.flush_outbox();
        self.adopt_moved_shards();
        true
    }

    /// The gateways move their requests on.
    fn gateways_step(&mut self) {
        let now = self.now();
        for index in 0..self.gateways.len() {
            self.gateways[index].poll(now, &mut self.nodes);
            for record in self.gateways[index].take_trace() {
                self.record(&record);
            }
            self.flush_outbox();
        }
    }

    /// Every shard the mover has released (its old owner can no longer
    /// take an account of it, and an account there no longer blocks the
    /// move) gets a user of every gateway client, in the cell taking it.
    fn adopt_moved_shards(&mut self) {
        let moves = self.mover.moves.get(self.moves_adopted..).unwrap_or_default();
        let released: Vec<(u32, CellId)> =
            moves.iter().take_while(|m| m.step != mover::Step::Release).map(|m| (m.shard, m.to)).collect();
        for (shard, cell) in released {
            self.moves_adopted += 1;
            self.record(&[0xAD, u64::from(shard), cell]);
            for client in self.clients.iter_mut().filter(|client| client.via_gateway) {
                client.adopt(shard, self.topology.shards, cell);
            }
        }
    }

    fn clients_step(&mut self) {
        let now = self.now();
        let all: Vec<NodeId> = self.nodes.keys().copied().collect();
        for index in 0..self.clients.len() {
            let client = &mut self.clients[index];
            let Action::Send { to, request } = client.poll(now, &all, &mut self.book) else { continue };
            let cell = client.cell;
            let node = match to {
                Target::Node(node) => node,
                Target::Gateway(gateway) => {
                    self.trace = fold(self.trace, &[5, index as u8, 0x80 | gateway as u8]);
                    let answer = self.gateways[gateway].submit(now, request.clone());
                    self.clients[index].sent(now, to, request, answer);
                    continue;
                }
            };
            self.trace = fold(self.trace, &[5, index as u8, node as u8]);
            match self.nodes.get_mut(&node) {
                Some(Some(stepped)) => {
                    let answer = stepped.submit(cell, request.clone());
                    stepped.round();
                    self.clients[index].sent(now, to, request, answer);
                }
                // The node is down: the call fails at once (connection refused), nothing applied.
                _ => {
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    let reason = "connection refused".to_string();
                    let _ = reply.send(Err(cellpay_server::node::NodeError::Unavailable { cell, reason }));
                    self.clients[index].sent(now, to, request, answer);
                }
            }
            self.flush_outbox();
        }
    }

    fn chaos_event(&mut self) {
        let nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
        let node = nodes[self.rng.below(nodes.len() as u64) as usize];
        match self.rng.below(7) {
            // Crash a node (at most two down at once), restart it later.
            0 | 1 => {
                self.crash_for_a_while(node);
            }
            // Cut one link one way.
            2 => {
                let other = nodes[self.rng.below(nodes.len() as u64) as usize];
                if other != node {
                    self.cut(vec![(node, other)]);
                }
            }
            // Isolate a node both ways.
            3 => {
                let links = nodes.iter().filter(|&&o| o != node).flat_map(|&o| [(node, o), (o, node)]).collect();
                self.cut(links);
            }
            // Cut a whole region off.
            4 => {
                let region = self.topology.location(node).expect("a topology node").region.to_string();
                let inside: BTreeSet<NodeId> = self.topology.region_nodes(&region).into_iter().collect();
                let mut links = Vec::new();
                for &a in &inside {
                    for &b in nodes.iter().filter(|n| !inside.contains(n)) {
                        links.extend([(a, b), (b, a)]);
                    }
                }
                self.report.region_cuts += 1;
                self.cut(links);
            }
            // Drop the connection between two nodes: what is in flight either way is lost.
            5 => {
                let other = nodes[self.rng.below(nodes.len() as u64) as usize];
                if other != node {
                    self.drop_connection(node, other);
                }
            }
            // Restart a gateway: it routes by the topology's table until it reads a newer one.
            _ => {
                let gateway = self.rng.below(GATEWAYS as u64);
                self.record(&[8, gateway]);
                let now = self.now();
                self.gateways[gateway as usize].restart(now);
            }
        }
    }

    fn drop_connection(&mut self, a: NodeId, b: NodeId) {
        let before = self.events.len();
        self.events.retain(|_, event| {
            !matches!(event, Event::Deliver { from, to, .. } if (*from, *to) == (a, b) || (*from, *to) == (b, a))
        });
        let lost = (before - self.events.len()) as u64;
        self.report.connection_drops += 1;
        self.report.messages_lost += lost;
        self.record(&[7, a, b, lost]);
    }

    fn cut(&mut self, links: Vec<Link>) {
        let id = self.cut_next;
        self.cut_next += 1;
        self.record(&[6, id as u64, links.len() as u64]);
        self.report.link_cuts += 1;
        self.cuts.insert(id, links);
        let heal = self.now() + self.rng.between(500_000_000, 6_000_000_000);
        self.schedule(heal, Event::Heal { cut: id });
    }

    /// Stops every fault: restarts the crashed nodes, heals every link.
    fn heal(&mut self) {
        self.chaos = false;
        self.cuts.clear();
        self.shared.lock().expect("sim lock").rates = FaultRates::default();
        let out = self.disks_out();
        let down: Vec<NodeId> = self.nodes.iter().filter(|(_, n)| n.is_none()).map(|(&id, _)| id).collect();
        for node in down.into_iter().filter(|node| !out.contains(node)) {
            self.start(node);
        }
    }

    fn run_until(&mut self, deadline: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        while !done(self) {
            if self.now() >= deadline || !self.step() {
                return false;
            }
        }
        true
    }
}

fn snapshots_installed(node: &SteppedNode) -> u64 {
    node.status().cells().iter().map(|cell| cell.snapshots_installed).sum()
}

/// Runs one seed.
pub fn run(config: SimConfig) -> SimReport {
    let mut sim = Sim::new(config.clone());
    let mut steps = 0;
    while steps < config.steps && sim.step() {
        steps += 1;
    }
    sim.report.steps = steps;
    sim.heal();
    checkers::liveness::check(&mut sim);
    for client in &mut sim.clients {
        client.stopped = true;
    }
    sim.mover.stop();
    let deadline = sim.now() + QUIESCE_BOUND_NS;
    let quiet = sim.run_until(deadline, |sim| {
        !sim.clients.iter().any(Client::is_waiting)
            && !sim.mover.busy()
            && checkers::atomicity::settled(sim)
            && checkers::replicas::converged(sim)
    });
    if !quiet {
        let replicas: Vec<String> = sim
            .nodes
            .iter()
            .flat_map(|(node, stepped)| stepped.iter().flat_map(|s| s.status().cells()).map(move |c| (node, c)))
            .map(|(node, c)| {
                format!(
                    "node {node} cell {}: {} commit {} applied {} term {}",
                    c.cell, c.role, c.commit, c.applied, c.term
                )
            })
            .collect();
        sim.report.failures.push(Failure::new(
            "liveness",
            format!(
                "the clients' requests did not resolve or the replicas did not converge within {} s of quiet: {}",
                QUIESCE_BOUND_NS / 1_000_000_000,
                replicas.join("; ")
            ),
        ));
    }
    checkers::run_all(&mut sim);
    let shared = sim.shared.lock().expect("sim lock");
    sim.report.fault_points = shared.faults_taken;
    sim.report.cross_cell_steps = shared.steps_applied;
    drop(shared);
    for gateway in &sim.gateways {
        sim.report.gateways.add(gateway.counts());
    }
    sim.report.virtual_seconds = sim.now() as f64 / 1e9;
    sim.report.batches_acknowledged = sim.book.batches_acknowledged;
    sim.report.transfers_acknowledged = sim.book.sent.keys().filter(|id| sim.book.acknowledged(**id)).count() as u64;
    // An account nobody opened (an unknown payee): its shard's cell by the topology.
    let cell_of = |account: u128| {
        let shard = cellpay_ledger::id::shard_of_account(account, sim.topology.shards);
        sim.book.accounts.get(&account).copied().or_else(|| sim.topology.cell_of_shard(shard))
    };
    sim.report.transfers_acknowledged_cross_cell = sim
        .book
        .sent
        .iter()
        .filter(|(id, (_, t))| {
            sim.book.acknowledged(**id) && cell_of(t.debit_account_id) != cell_of(t.credit_account_id)
        })
        .count() as u64;
    sim.report.retries = sim.book.retries;
    sim.report.shards_moved = sim.mover.moves.iter().filter(|m| m.step == mover::Step::Done).count() as u64;
    sim.report.trace_hash = sim.trace;
    for node in std::mem::take(&mut sim.nodes).into_values().flatten() {
        sim.report.snapshots_installed += snapshots_installed(&node);
        node.shutdown();
    }
    std::mem::take(&mut sim.report)
}
