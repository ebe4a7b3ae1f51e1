//! Each simulated node's world: virtual time, the simulated network's
//! outbox, fault points and deliberate bugs, all owned by the simulator.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellpay_cluster::topology::{CellId, NodeId};
use cellpay_server::cross_cell::Step;
use cellpay_server::node::PeerStatus;
use cellpay_server::world::{Bug, Fault, World};

use crate::rng::Rng;

/// Virtual wall-clock time at the start of every run (2026-01-01T00:00:00Z).
pub const EPOCH_NS: u64 = 1_767_225_600_000_000_000;

/// Which fault points this run takes, and how often (per million calls).
#[derive(Clone, Debug, Default)]
pub struct FaultRates {
    pub slow_fsync: u64,
    pub delayed_tick: u64,
    pub leader_step_down: u64,
    pub dropped_connection: u64,
    /// A crash right after a leader applied a cross-cell protocol step,
    /// before that round's messages leave: one rate per step, indexed like
    /// [`Step::ALL`].
    pub step_crash: [u64; STEPS],
}

/// The cross-cell protocol's steps (see [`Step::ALL`]).
pub const STEPS: usize = Step::ALL.len();

/// The index of `step` in [`Step::ALL`].
pub fn step_index(step: Step) -> usize {
    Step::ALL.iter().position(|&s| s == step).expect("every step is in Step::ALL")
}

/// What the simulator shares with every node's world.
pub struct Shared {
    pub now_ns: u64,
    /// Messages sent since the simulator last looked: `(from, to, payload)`.
    pub outbox: Vec<(NodeId, NodeId, Vec<u8>)>,
    /// Nodes that asked to stall (a slow fsync), in order.
    pub stalls: Vec<NodeId>,
    pub rng: Rng,
    /// Zero once the faults stop.
    pub rates: FaultRates,
    pub bugs: Vec<Bug>,
    /// Fault points taken, by kind.
    pub faults_taken: [u64; 4],
    /// Connections the engines dropped (fault point), in order: `(from, to)`.
    pub dropped: Vec<(NodeId, NodeId)>,
    pub peers: Vec<NodeId>,
    /// Cross-cell protocol steps the nodes' leaders applied, by step.
    pub steps_applied: [u64; STEPS],
    /// Nodes that took a crash point after a protocol step, in order (at
    /// most once each until the simulator takes them): crashed after the
    /// event being handled, before their messages are flushed.
    pub crash_requests: Vec<(NodeId, Step)>,
}

pub struct SimWorld {
    pub node: NodeId,
    pub shared: Arc<Mutex<Shared>>,
    /// The real instant standing for virtual time zero.
    pub base: Instant,
    /// This node's clock error (wall clock only; monotonic time is exact).
    pub skew_ns: u64,
}

impl World for SimWorld {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.shared.lock().expect("sim lock").now_ns)
    }

    fn timestamp_ns(&self) -> u64 {
        EPOCH_NS + self.shared.lock().expect("sim lock").now_ns + self.skew_ns
    }

    fn send(&self, to: NodeId, payload: Vec<u8>) -> bool {
        self.shared.lock().expect("sim lock").outbox.push((self.node, to, payload));
        true
    }

    fn drop_connection(&self, to: NodeId) {
        let mut shared = self.shared.lock().expect("sim lock");
        // What this round queued on the link is lost too.
        let link = |from: NodeId, peer: NodeId| (from, peer) == (self.node, to) || (from, peer) == (to, self.node);
        shared.outbox.retain(|(from, peer, _)| !link(*from, *peer));
        shared.dropped.push((self.node, to));
    }

    fn peers(&self) -> Vec<PeerStatus> {
        let shared = self.shared.lock().expect("sim lock");
        shared.peers.iter().filter(|&&p| p != self.node).map(|&node| PeerStatus { node, connected: true }).collect()
    }

    fn election_timeout(&self, ticks: std::ops::Range<usize>) -> Option<usize> {
        let mut shared = self.shared.lock().expect("sim lock");
        Some(ticks.start + shared.rng.below((ticks.end - ticks.start) as u64) as usize)
    }

    fn buggify(&self, fault: Fault) -> bool {
        let mut shared = self.shared.lock().expect("sim lock");
        let (slot, rate) = match fault {
            Fault::SlowFsync => (0, shared.rates.slow_fsync),
            Fault::DelayedTick => (1, shared.rates.delayed_tick),
            Fault::LeaderStepDown => (2, shared.rates.leader_step_down),
            Fault::DroppedConnection => (3, shared.rates.dropped_connection),
        };
        if rate == 0 {
            return false;
        }
        let taken = shared.rng.chance(rate);
        shared.faults_taken[slot] += u64::from(taken);
        taken
    }

    fn stall(&self) {
        self.shared.lock().expect("sim lock").stalls.push(self.node);
    }

    fn bug(&self, bug: Bug) -> bool {
        self.shared.lock().expect("sim lock").bugs.contains(&bug)
    }

    fn cross_cell_step(&self, _cell: CellId, step: Step) {
        let mut shared = self.shared.lock().expect("sim lock");
        let index = step_index(step);
        shared.steps_applied[index] += 1;
        let rate = shared.rates.step_crash[index];
        let asked = shared.crash_requests.iter().any(|&(node, _)| node == self.node);
        if rate > 0 && !asked && shared.rng.chance(rate) {
            shared.crash_requests.push((self.node, step));
        }
    }
}
