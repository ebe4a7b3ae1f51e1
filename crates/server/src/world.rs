//! What the engine takes from outside its cells: time, the network to its
//! peers, and, only under the simulator, faults and deliberate bugs.
//!
//! A running [`crate::node::Node`] gives its engine [`RealWorld`]: the
//! system clocks and the TCP transport. The deterministic simulator
//! (`crates/sim`) gives each engine a world of virtual time and a simulated
//! network, all driven by one seed, and steps the same engine code one event
//! at a time (see `node::SteppedNode`).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cellpay_cluster::topology::{CellId, NodeId};
use cellpay_cluster::transport::Transport;

use crate::cross_cell::Step;
use crate::node::PeerStatus;

/// A fault point in the engine (BUGGIFY): the simulator's world says when
/// to take it, chosen by its seed; production's world never does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The round's fsync takes long: the world stalls the node.
    SlowFsync,
    /// A tick fires late: Raft's clock skips it.
    DelayedTick,
    /// A leader hands its leadership to another caught-up voter.
    LeaderStepDown,
    /// The connection to a peer drops as a message is sent to it: what was
    /// in flight either way is lost (the world's `drop_connection`).
    DroppedConnection,
}

/// A deliberate bug, switched on only by the simulator's tests to show that
/// its checkers catch it. Production's world never switches one on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bug {
    /// Raft is told the round's entries are durable without the fsync.
    AckBeforeFsync,
    /// Followers apply an entry with their own clock, not the leader's timestamp.
    FollowerClock,
    /// The leader answers a write `ok` when it proposes it, before it commits.
    AckBeforeCommit,
    /// A cross-cell transfer's coordinator confirms it as soon as its own
    /// legs are tried, without the other cells' tries.
    ConfirmWithoutTry,
}

pub trait World: Send {
    /// Monotonic time: ticks and deadlines.
    fn now(&self) -> Instant;
    /// Wall-clock nanoseconds since the Unix epoch: only a leader reads it,
    /// to stamp the entries it proposes.
    fn timestamp_ns(&self) -> u64;
    /// Queues `payload` for peer `to`; false if it cannot be queued now.
    fn send(&self, to: NodeId, payload: Vec<u8>) -> bool;
    /// The peers and whether the link to each is up (status only).
    fn peers(&self) -> Vec<PeerStatus>;
    /// Whether to take fault point `fault` now.
    fn buggify(&self, _fault: Fault) -> bool {
        false
    }
    /// Stalls this node for a while (the effect of [`Fault::SlowFsync`]).
    fn stall(&self) {}
    /// Drops the connection to `to` with what is in flight either way (the
    /// effect of [`Fault::DroppedConnection`]).
    fn drop_connection(&self, _to: NodeId) {}
    /// Whether deliberate bug `bug` is on.
    fn bug(&self, _bug: Bug) -> bool {
        false
    }
    /// This node's replica of `cell`, as its leader, applied protocol step
    /// `step` of a cross-cell transfer; the round's messages are not sent
    /// yet. The simulator may crash the node here (after the round), so
    /// that a crash falls between any two steps of the protocol.
    fn cross_cell_step(&self, _cell: CellId, _step: Step) {}
    /// An election timeout in ticks, drawn from `ticks`; `None` leaves the
    /// draw to Raft (which uses the thread's random generator, so a
    /// simulation draws its own from its seed).
    fn election_timeout(&self, _ticks: std::ops::Range<usize>) -> Option<usize> {
        None
    }
}

/// The system clocks and the TCP transport (none for a node alone).
pub struct RealWorld {
    pub transport: Option<Arc<Transport>>,
}

impl World for RealWorld {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn timestamp_ns(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    }

    fn send(&self, to: NodeId, payload: Vec<u8>) -> bool {
        self.transport.as_ref().is_some_and(|transport| transport.send(to, payload).is_ok())
    }

    fn peers(&self) -> Vec<PeerStatus> {
        let Some(transport) = &self.transport else { return Vec::new() };
        transport
            .peers()
            .into_iter()
            .map(|node| PeerStatus { node, connected: transport.peer_connected(node) })
            .collect()
    }
}
