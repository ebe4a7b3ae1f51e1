//! The operator moving shards while the faults go on: `ctl routing move`'s
//! three steps (see `server/src/cell_state.rs`), then a check that the
//! cells obey the move.
//!
//! A move takes a shard no client uses from its owner to another cell:
//!
//! 1. **release** it in the old owner (a log entry of that cell);
//! 2. **change the routing table** in the global cell (compare and set);
//! 3. **acquire** it in the new owner (its leader checks the table);
//! 4. **create** an account of the shard through the new owner;
//! 5. send another account of the shard to the **old owner**, as a stale
//!    router would: it must be refused `misrouted`, nothing applied;
//! 6. try to **release** the shard from the new owner: refused, it now holds
//!    an account.
//!
//! Every step is retried (with the same request) until it is answered:
//! after a refusal for want of a leader, a lost answer, a crash. What the
//! cells answered wrongly is a failure of the `ownership` checker, which
//! also checks, at the end, that every replica agrees with the moves.

use std::collections::BTreeSet;

use cellpay_cluster::routing::RoutingChange;
use cellpay_cluster::topology::{CellId, NodeId, Topology, GLOBAL_CELL};
use cellpay_ledger::id::{account_id, shard_of_account};
use cellpay_ledger::{Account, CreateAccountResult};
use cellpay_server::node::{NodeError, Reply, Request, SteppedNode};
use tokio::sync::oneshot;

use crate::rng::Rng;
use crate::workload::{CLIENT_TIMEOUT_NS, LEDGER, RETRY_BACKOFF_NS};

/// Where a move is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Release,
    Change,
    Acquire,
    Create,
    Stale,
    RefuseRelease,
    Done,
}

/// A shard's move, and how far it got.
#[derive(Clone, Debug)]
pub(crate) struct Move {
    pub shard: u32,
    pub from: CellId,
    pub to: CellId,
    /// The routing table's version before the move.
    pub version: u64,
    pub step: Step,
    /// The account created in the shard through the new owner.
    pub account: u128,
    /// The account of the shard sent to the old owner.
    pub stale: u128,
}

type Answer = oneshot::Receiver<Result<Reply, NodeError>>;

pub(crate) struct Mover {
    rng: Rng,
    /// Shards no client uses and no move has taken.
    free: Vec<u32>,
    /// Moves still to start in this run.
    moves_left: u32,
    pub moves: Vec<Move>,
    /// When the next step may be sent.
    at: u64,
    /// The step sent: to which node, its answer, and until when it is waited for.
    waiting: Option<(NodeId, Answer, u64)>,
    leader_hint: Option<NodeId>,
    /// What the cells answered that they must not have.
    pub wrong: Vec<String>,
}

impl Mover {
    pub(crate) fn new(topology: &Topology, used: &BTreeSet<u32>, mut rng: Rng) -> Mover {
        let free = (0..topology.shards).filter(|shard| !used.contains(shard)).collect();
        let moves_left = 1 + rng.below(3) as u32;
        let at = rng.between(2_000_000_000, 20_000_000_000);
        Mover { rng, free, moves_left, moves: Vec::new(), at, waiting: None, leader_hint: None, wrong: Vec::new() }
    }

    /// Whether a move has started and not finished.
    pub(crate) fn busy(&self) -> bool {
        self.moves.last().is_some_and(|last| last.step != Step::Done)
    }

    /// Stops starting moves (the run is quiescing); one under way finishes.
    pub(crate) fn stop(&mut self) {
        self.moves_left = 0;
    }

    /// The cell the current step goes to, and its request.
    fn request(&self) -> Option<(CellId, Request)> {
        let current = self.moves.last().filter(|m| m.step != Step::Done)?;
        let ownership = |cell, owned| (cell, Request::ShardOwnership { cell, shard: current.shard, owned });
        let account = |id| Request::CreateAccounts(vec![Account { id, ledger: LEDGER, code: 1, ..Account::default() }]);
        Some(match current.step {
            Step::Release => ownership(current.from, false),
            Step::Change => {
                let change = RoutingChange::MoveShard { shard: current.shard, to: current.to };
                (GLOBAL_CELL, Request::ChangeRouting { expected_version: current.version, change })
            }
            Step::Acquire => ownership(current.to, true),
            Step::Create => (current.to, account(current.account)),
            Step::Stale => (current.from, account(current.stale)),
            Step::RefuseRelease => ownership(current.to, false),
            Step::Done => unreachable!("filtered above"),
        })
    }

    /// Called on every simulator step: sends the next step's request, or
    /// takes its answer. `nodes` are the live nodes, by id.
    pub(crate) fn poll(
        &mut self,
        now: u64,
        topology: &Topology,
        nodes: &mut std::collections::BTreeMap<NodeId, Option<SteppedNode>>,
    ) {
        if let Some((node, mut answer, deadline)) = self.waiting.take() {
            match answer.try_recv() {
                Ok(result) => self.answered(now, node, result, nodes),
                Err(oneshot::error::TryRecvError::Empty) if now < deadline => {
                    self.waiting = Some((node, answer, deadline));
                }
                // Lost (a crash, a timeout): the same step again.
                Err(_) => {
                    self.leader_hint = None;
                    self.at = now;
                }
            }
            return;
        }
        if now < self.at {
            return;
        }
        if !self.busy() && !self.start(topology, nodes) {
            return;
        }
        let Some((cell, request)) = self.request() else { return };
        let all: Vec<NodeId> = nodes.keys().copied().collect();
        let node = self.leader_hint.unwrap_or_else(|| all[self.rng.below(all.len() as u64) as usize]);
        let answer = match nodes.get_mut(&node) {
            Some(Some(stepped)) => {
                let answer = stepped.submit(cell, request);
                stepped.round();
                answer
            }
            // The node is down: refused at once, nothing applied.
            _ => {
                let (reply, answer) = oneshot::channel();
                let _ = reply.send(Err(NodeError::Unavailable { cell, reason: "connection refused".into() }));
                answer
            }
        };
        self.waiting = Some((node, answer, now + CLIENT_TIMEOUT_NS));
    }

    /// Starts the next move, if any is left: returns whether one started.
    fn start(&mut self, topology: &Topology, nodes: &std::collections::BTreeMap<NodeId, Option<SteppedNode>>) -> bool {
        if self.moves_left == 0 || self.free.is_empty() {
            return false;
        }
        // The table as of now: only this mover changes it, one move at a time.
        let Some(table) = nodes.values().flatten().map(|node| node.status().routing()).max_by_key(|t| t.version())
        else {
            return false;
        };
        self.moves_left -= 1;
        let shard = self.free.swap_remove(self.rng.below(self.free.len() as u64) as usize);
        let from = table.owner(shard).expect("a shard below the count");
        let others: Vec<CellId> = topology.cells.iter().map(|cell| cell.id).filter(|&cell| cell != from).collect();
        let to = others[self.rng.below(others.len() as u64) as usize];
        let (account, stale) =
            (account_of_shard(shard, topology.shards, 1), account_of_shard(shard, topology.shards, 2));
        self.moves.push(Move { shard, from, to, version: table.version(), step: Step::Release, account, stale });
        self.leader_hint = None;
        true
    }

    fn answered(
        &mut self,
        now: u64,
        node: NodeId,
        result: Result<Reply, NodeError>,
        nodes: &std::collections::BTreeMap<NodeId, Option<SteppedNode>>,
    ) {
        let current = self.moves.last_mut().expect("a move is under way");
        let (shard, from, to) = (current.shard, current.from, current.to);
        let next = match (current.step, &result) {
            (Step::Release | Step::Acquire, Ok(Reply::ShardOwnership)) => true,
            (Step::Change, Ok(Reply::RoutingChanged(table))) => table.owner(shard) == Some(to),
            // An earlier attempt may have been applied, its answer lost: the table says.
            (Step::Change, Err(NodeError::ChangeRefused { .. })) => nodes.values().flatten().any(|node| {
                node.status().routing().version() > current.version && node.status().routing().owner(shard) == Some(to)
            }),
            (Step::Create, Ok(Reply::CreateAccounts(results))) => {
                matches!(results[..], [CreateAccountResult::Ok | CreateAccountResult::Exists])
            }
            (Step::Stale, Err(NodeError::Misrouted { cell, .. })) => *cell == from,
            (Step::Stale, Ok(reply)) => {
                self.wrong.push(format!("cell {from} took an account of shard {shard}, which it released: {reply:?}"));
                true
            }
            (Step::RefuseRelease, Err(NodeError::ChangeRefused { reason, .. })) => reason.contains("holds"),
            (Step::RefuseRelease, Ok(reply)) => {
                self.wrong.push(format!(
                    "cell {to} released shard {shard} while holding its account {}: {reply:?}",
                    current.account
                ));
                true
            }
            _ => false,
        };
        self.leader_hint = match &result {
            Ok(_) => Some(node),
            Err(NodeError::NotLeader { leader, .. }) => *leader,
            Err(_) => None,
        };
        if next {
            current.step = match current.step {
                Step::Release => Step::Change,
                Step::Change => Step::Acquire,
                Step::Acquire => Step::Create,
                Step::Create => Step::Stale,
                Step::Stale => Step::RefuseRelease,
                Step::RefuseRelease | Step::Done => Step::Done,
            };
            self.leader_hint = None;
            self.at =
                if current.step == Step::Done { now + self.rng.between(3_000_000_000, 10_000_000_000) } else { now };
        } else {
            self.at = now + RETRY_BACKOFF_NS;
        }
    }
}

/// The `n`-th account (of distinct users) whose shard is `shard`.
fn account_of_shard(shard: u32, shards: u32, n: u64) -> u128 {
    let user = u64::from(shard) + u64::from(shards) * (1_000_000 + n);
    let id = account_id(user, 1).expect("a valid id");
    debug_assert_eq!(shard_of_account(id, shards), shard);
    id
}
