//! Calls to the cells' leaders: which node leads each cell (learned from
//! the nodes' `/v1/cluster/status` and from `NotLeader` refusals), and one
//! call to a cell, resent through leader changes until it is answered or
//! its deadline passes.
//!
//! What is resent, and why it is safe:
//! - `NotLeader` naming the leader: at once, to that node (a redirect);
//! - other refusals marked *nothing applied* (no leader yet, overloaded,
//!   shutting down): after a pause, to the leader if known, else to the
//!   cell's voters in turn;
//! - no answer, or an unmarked error (a timeout, a broken connection, the
//!   node crashed): the outcome is unknown; the same events are resent after
//!   a pause. Creates are idempotent by id: an event the lost call applied
//!   answers `exists` (or `exists_with_different_*` if the client changed
//!   it, which it did not), and nothing is applied twice.
//!
//! `misrouted` is never resent here: the caller refreshes its table and
//! splits again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellpay_cluster::topology::{CellId, NodeId, Topology};
use tokio::time::Instant;

use super::metrics::{CallLabels, GatewayMetrics, RetryLabels};
use crate::forward::{self, CallError, Forwarder};
use crate::node::{NodeError, Reply, Request};

/// The first pause before a call is resent; it doubles up to `RETRY_DELAY_MAX`.
const RETRY_DELAY_MIN: Duration = Duration::from_millis(10);
const RETRY_DELAY_MAX: Duration = Duration::from_millis(200);
/// Redirects followed in a row without a pause (two nodes naming each
/// other during an election must not make a busy loop).
const REDIRECTS_IN_A_ROW_MAX: u32 = 3;

/// What the gateway knows of a cell's leader.
#[derive(Clone, Copy, Debug, Default)]
struct Leader {
    /// `None` after a call to it failed: try the voters.
    node: Option<NodeId>,
    /// The term a node's status named it at (a refusal names no term: the
    /// leader it names keeps the last term known, so that an older status
    /// does not overwrite it).
    term: u64,
}

pub(super) struct Cells {
    topology: Arc<Topology>,
    leaders: Mutex<BTreeMap<CellId, Leader>>,
    clients: Forwarder,
    /// How long one call may take.
    call_timeout: Duration,
    metrics: Arc<GatewayMetrics>,
}

impl Cells {
    pub(super) fn new(topology: Arc<Topology>, call_timeout: Duration, metrics: Arc<GatewayMetrics>) -> Cells {
        Cells { topology, leaders: Mutex::default(), clients: Forwarder::default(), call_timeout, metrics }
    }

    pub(super) fn leader(&self, cell: CellId) -> Option<NodeId> {
        self.leaders.lock().expect("leaders lock").get(&cell).and_then(|leader| leader.node)
    }

    /// The node to call for `cell`: its leader if known, else its voters in
    /// turn, most preferred first.
    fn candidate(&self, cell: CellId, attempt: u32) -> Option<NodeId> {
        if let Some(leader) = self.leader(cell) {
            return Some(leader);
        }
        let mut voters = self.topology.cell(cell)?.voters.clone();
        voters.sort_by_key(|&node| (self.topology.preference_rank(cell, node), node));
        voters.get(attempt as usize % voters.len().max(1)).copied()
    }

    /// A refusal named `node` as the leader.
    fn learn(&self, cell: CellId, node: NodeId) {
        self.leaders.lock().expect("leaders lock").entry(cell).or_default().node = Some(node);
    }

    /// A call to `node` failed: stop assuming it leads.
    fn forget(&self, cell: CellId, node: NodeId) {
        if let Some(leader) = self.leaders.lock().expect("leaders lock").get_mut(&cell) {
            if leader.node == Some(node) {
                leader.node = None;
            }
        }
    }

    /// Learns leaders from a node's `GET /v1/cluster/status`: each cell's
    /// leader at its term, if newer than what is known.
    pub(super) fn learn_status(&self, status: &serde_json::Value) {
        let Some(cells) = status["cells"].as_array() else { return };
        let mut leaders = self.leaders.lock().expect("leaders lock");
        for replica in cells {
            let (Some(cell), Some(node), Some(term)) =
                (replica["cell"].as_u64(), replica["leader"].as_u64(), replica["term"].as_u64())
            else {
                continue;
            };
            // Only the topology's cells and nodes: the map stays bounded.
            if self.topology.node(node).is_none() || self.topology.cell(cell).is_none() {
                continue;
            }
            let known = leaders.entry(cell).or_default();
            if term > known.term {
                *known = Leader { node: Some(node), term };
            }
        }
    }

    /// Sends `request` to `cell`'s leader, following redirects and resending
    /// (see the module) until it is answered, refused for good, or
    /// `deadline` passes (then the last refusal is returned). `misrouted`
    /// is returned at once.
    pub(super) async fn call(&self, cell: CellId, request: &Request, deadline: Instant) -> Result<Reply, NodeError> {
        let mut delay = RETRY_DELAY_MIN;
        let mut redirects_in_a_row = 0u32;
        for attempt in 0u32.. {
            let Some(node) = self.candidate(cell, attempt) else {
                return Err(NodeError::Unavailable { cell, reason: "the topology names no voter of the cell".into() });
            };
            let Some(client) = self.clients.client(&self.topology, node) else {
                return Err(NodeError::Unavailable { cell, reason: format!("node {node} is not in the topology") });
            };
            let outcome = forward::call(client, node, cell, request.clone(), self.call_timeout).await;
            let count = |outcome: &'static str| self.metrics.calls.get_or_create(&CallLabels { cell, outcome }).inc();
            let (error, reason, redirect) = match outcome {
                Ok(reply) => {
                    count("ok");
                    return Ok(reply);
                }
                Err(CallError::Refused { misrouted: Some((account, owner, routing_version)), .. }) => {
                    count("misrouted");
                    return Err(NodeError::Misrouted { cell, account, owner, routing_version });
                }
                Err(CallError::Refused { not_leader: Some(leader), .. }) => {
                    count("not_leader");
                    let redirect = leader.filter(|&leader| leader != node);
                    match redirect {
                        Some(leader) => self.learn(cell, leader),
                        None => self.forget(cell, node),
                    }
                    (NodeError::NotLeader { cell, leader }, "not_leader", redirect.is_some())
                }
                Err(CallError::Refused { code, message, .. }) => {
                    count("refused");
                    let error = NodeError::Unavailable { cell, reason: format!("node {node}: {message}") };
                    // Only UNAVAILABLE refusals pass (no leader, overloaded,
                    // shutting down); any other is the request's fault.
                    if code != tonic::Code::Unavailable {
                        return Err(error);
                    }
                    (error, "refused", false)
                }
                Err(CallError::NoAnswer { reason }) => {
                    count("no_answer");
                    self.forget(cell, node);
                    (NodeError::ForwardFailed { cell, node, reason }, "no_answer", false)
                }
            };
            redirects_in_a_row = if redirect { redirects_in_a_row + 1 } else { 0 };
            let pause = if redirect && redirects_in_a_row <= REDIRECTS_IN_A_ROW_MAX { Duration::ZERO } else { delay };
            if Instant::now() + pause >= deadline {
                return Err(error);
            }
            self.metrics.retries.get_or_create(&RetryLabels { reason }).inc();
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
                delay = (delay * 2).min(RETRY_DELAY_MAX);
            }
        }
        unreachable!("the loop returns")
    }
}
