//! The gateway in the simulator: what `server/src/gateway/` does for a
//! request, stepped by the simulator instead of by tokio tasks, on the
//! production pure functions (`gateway::split`: the home cell of every
//! event, the split into parts, the verdict on a misroute, the merge).
//!
//! - **Its routing table** is its own copy, read from a node's replica of
//!   the global cell now and then (every `refresh_interval_ns`, drawn per
//!   run) and after a `misrouted` refusal, never otherwise: while shards
//!   move it is often stale. A restarted gateway routes by the topology's
//!   table (version 1) until its next read, and forgets the leaders and the
//!   requests it held (their clients see the call fail and retry).
//! - **A request** is split by home cell; each part is one call to its
//!   cell, sent to the leader the gateway believes in (learned from answers,
//!   redirects and a node's status, read every second), redirected at once
//!   on `NotLeader` naming a leader (three in a row at most), resent after
//!   a pause (10 ms doubling to 200 ms) on another refusal that applied
//!   nothing, and resent the same on an unknown outcome (no answer, the
//!   node crashed or timed out): creates are idempotent by id.
//! - **A misroute**: the parts refused `misrouted` (and only those) are
//!   split again by a table at least as new as the refusals name, read from
//!   the refusing cell's leader first; `split::misroute_verdict` says
//!   whether to resend at once (the table moved), after a pause (a shard
//!   between its release and its acquisition) or to answer the refusal. At
//!   most three rounds.
//! - **The answer**: every part's results merged back in request order; a
//!   part that fails fails the request, marked as maybe applied when other
//!   parts were or may have been (the client retries it whole, same ids).
//!   Lookups of transfers ask every cell and merge a cross-cell transfer's
//!   two legs into the transfer as sent (`cross_cell::merge_legs`); posts
//!   and voids naming no account look their pending transfer up first.
//!
//! Not modelled: batching across clients (one call per part), and the
//! network between the gateway and the nodes (calls reach a node at once,
//! as the clients' do).

use std::collections::BTreeMap;
use std::sync::Arc;

use cellpay_cluster::routing::RoutingTable;
use cellpay_cluster::topology::{CellId, NodeId, Topology, GLOBAL_CELL};
use cellpay_ledger::{Account, Transfer};
use cellpay_server::cross_cell;
use cellpay_server::gateway::split::{self, CreateEvent, MisrouteVerdict, Part, PendingFound, SplitError};
use cellpay_server::node::{NodeError, Reply, Request, SteppedNode};
use tokio::sync::oneshot;

use crate::rng::Rng;

/// Gateways side by side; a client sends each request to one of them.
pub const GATEWAYS: usize = 2;
/// Requests one gateway holds at once: one per client, and one its client
/// gave up on (dropped at the gateway's next poll).
const REQUESTS_MAX: usize = 2 * crate::CLIENTS as usize;
/// How long a request's parts are resent, from its arrival (production's `retry_duration`).
const RETRY_NS: u64 = 10_000_000_000;
/// How long one call waits for its answer (production's `call_timeout`).
const CALL_TIMEOUT_NS: u64 = 12_000_000_000;
/// The first pause before a call is resent; it doubles up to the maximum.
const RETRY_DELAY_MIN_NS: u64 = 10_000_000;
const RETRY_DELAY_MAX_NS: u64 = 200_000_000;
/// Redirects followed in a row without a pause.
const REDIRECTS_IN_A_ROW_MAX: u32 = 3;
/// Rounds of splitting a request's misrouted parts again.
const MISROUTE_ROUNDS_MAX: u32 = 3;
/// The pause before resending a part refused by the cell the table names, times the round.
const MISROUTE_PAUSE_NS: u64 = 50_000_000;
/// How often a node's status is read to learn the cells' leaders (production's `status_interval`).
const STATUS_INTERVAL_NS: u64 = 1_000_000_000;

pub type Nodes = BTreeMap<NodeId, Option<SteppedNode>>;
type Answer = oneshot::Receiver<Result<Reply, NodeError>>;

/// What the gateways did, for the report.
#[derive(Clone, Copy, Debug, Default)]
pub struct GatewayCounts {
    pub requests: u64,
    /// Parts sent, each one call resent until answered.
    pub parts: u64,
    /// Calls to nodes, and how many of them a `NotLeader` redirected.
    pub calls: u64,
    pub redirects: u64,
    /// Parts a cell refused `misrouted` (the gateway's table was stale).
    pub parts_misrouted: u64,
    /// Parts sent again after a misroute: split again by a newer table, or
    /// (a shard between its release and acquisition) resent after a pause.
    pub parts_rerouted: u64,
    /// Of the misroute rounds, those that paused.
    pub misroute_pauses: u64,
    /// Requests with a misrouted part that were then answered in full.
    pub misroutes_corrected: u64,
    /// Reads of a node's routing table that found a newer one.
    pub table_updates: u64,
    pub restarts: u64,
}

impl GatewayCounts {
    pub fn add(&mut self, other: &GatewayCounts) {
        self.requests += other.requests;
        self.parts += other.parts;
        self.calls += other.calls;
        self.redirects += other.redirects;
        self.parts_misrouted += other.parts_misrouted;
        self.parts_rerouted += other.parts_rerouted;
        self.misroute_pauses += other.misroute_pauses;
        self.misroutes_corrected += other.misroutes_corrected;
        self.table_updates += other.table_updates;
        self.restarts += other.restarts;
    }
}

/// What a gateway knows and does besides its requests in flight.
struct Router {
    id: u64,
    topology: Arc<Topology>,
    /// The nodes in the order it asks them: its region's first.
    nodes: Vec<NodeId>,
    table: Arc<RoutingTable>,
    /// Each cell's leader as it believes, and the term a node's status named it at.
    leaders: BTreeMap<CellId, (Option<NodeId>, u64)>,
    counts: GatewayCounts,
    /// What it did, for the simulator's trace hash.
    trace: Vec<[u64; 4]>,
}

pub struct Gateway {
    router: Router,
    requests: Vec<Routing>,
    refresh_interval_ns: u64,
    /// When it next reads a node's routing table, and a node's status.
    refresh_at: u64,
    status_at: u64,
    rng: Rng,
}

impl Gateway {
    pub fn new(id: u64, topology: Arc<Topology>, refresh_interval_ns: u64, mut rng: Rng) -> Gateway {
        // Its region: one per gateway in turn, its nodes asked first.
        let region = &topology.regions[id as usize % topology.regions.len()].name;
        let (mut nodes, rest): (Vec<NodeId>, Vec<NodeId>) = topology
            .nodes()
            .map(|node| node.id)
            .partition(|&node| topology.location(node).is_some_and(|location| location.region == region));
        nodes.extend(rest);
        let table = Arc::new(RoutingTable::initial(&topology));
        let refresh_at = rng.between(refresh_interval_ns / 2, refresh_interval_ns);
        let router = Router {
            id,
            topology,
            nodes,
            table,
            leaders: BTreeMap::new(),
            counts: GatewayCounts::default(),
            trace: Vec::new(),
        };
        Gateway { router, requests: Vec::new(), refresh_interval_ns, refresh_at, status_at: 0, rng }
    }

    pub fn counts(&self) -> &GatewayCounts {
        &self.router.counts
    }

    /// What the gateway did since last asked, for the trace hash.
    pub fn take_trace(&mut self) -> Vec<[u64; 4]> {
        std::mem::take(&mut self.router.trace)
    }

    /// A client's request: answered once every part is (see [`Gateway::poll`]).
    pub fn submit(&mut self, now: u64, request: Request) -> Answer {
        assert!(self.requests.len() < REQUESTS_MAX, "a client has one request at a time");
        let (reply, answer) = oneshot::channel();
        self.router.counts.requests += 1;
        let deadline = now + RETRY_NS;
        let job = match request {
            Request::CreateAccounts(accounts) => Job::Accounts(Create::new(accounts, &self.router)),
            Request::CreateTransfers(transfers) => Job::Transfers(Create::new(transfers, &self.router)),
            Request::LookupTransfers(ids) => Job::Lookup(Lookup::new(ids, &self.router)),
            other => unreachable!("the clients send no {} through a gateway", other.operation()),
        };
        self.requests.push(Routing { reply, deadline, job });
        answer
    }

    /// The gateway restarts: it forgets its table, the leaders and every
    /// request in flight (their clients see their calls fail).
    pub fn restart(&mut self, now: u64) {
        self.requests.clear();
        self.router.table = Arc::new(RoutingTable::initial(&self.router.topology));
        self.router.leaders.clear();
        self.router.counts.restarts += 1;
        self.status_at = now;
        self.refresh_at = now + self.rng.between(self.refresh_interval_ns / 2, self.refresh_interval_ns);
        self.router.trace.push([0x9A, self.router.id, 0, 0]);
    }

    /// Called on every simulator step: reads the table when due, moves
    /// every request on, answers those done and drops those whose client
    /// gave up.
    pub fn poll(&mut self, now: u64, nodes: &mut Nodes) {
        if now >= self.status_at {
            self.router.read_status(nodes);
            self.status_at = now + STATUS_INTERVAL_NS;
        }
        if now >= self.refresh_at {
            self.router.read_table(nodes);
            self.refresh_at = now + self.rng.between(self.refresh_interval_ns / 2, self.refresh_interval_ns);
        }
        let mut index = 0;
        while index < self.requests.len() {
            let routing = &mut self.requests[index];
            if routing.reply.is_closed() {
                self.requests.remove(index);
                continue;
            }
            let mut ctx = Ctx { now, deadline: routing.deadline, router: &mut self.router, nodes };
            let done = match &mut routing.job {
                Job::Accounts(create) => create.poll(&mut ctx),
                Job::Transfers(create) => create.poll(&mut ctx),
                Job::Lookup(lookup) => lookup.poll(&mut ctx),
            };
            match done {
                Some(answer) => {
                    let routing = self.requests.remove(index);
                    let _ = routing.reply.send(answer);
                }
                None => index += 1,
            }
        }
    }
}

impl Router {
    /// The first node up, its region's first.
    fn first_up<'a>(&self, nodes: &'a Nodes) -> Option<&'a SteppedNode> {
        self.nodes.iter().find_map(|node| nodes.get(node).and_then(Option::as_ref))
    }

    /// Learns the leaders a node's status names at a newer term.
    fn read_status(&mut self, nodes: &Nodes) {
        let Some(stepped) = self.first_up(nodes) else { return };
        for status in stepped.status().cells() {
            let Some(leader) = status.leader else { continue };
            let known = self.leaders.entry(status.cell).or_default();
            if status.term > known.1 {
                *known = (Some(leader), status.term);
            }
        }
    }

    /// Takes a node's routing table, if newer.
    fn read_table(&mut self, nodes: &Nodes) {
        if let Some(stepped) = self.first_up(nodes) {
            self.take_table(stepped.status().routing());
        }
    }

    /// A table at least at `version` if a node has one (the refusing
    /// cell's leader asked first), else the newest found.
    fn refresh(&mut self, version: u64, first: Option<NodeId>, nodes: &Nodes) -> Arc<RoutingTable> {
        for node in first.into_iter().chain(self.nodes.clone()) {
            if self.table.version() >= version {
                break;
            }
            if let Some(Some(stepped)) = nodes.get(&node) {
                self.take_table(stepped.status().routing());
            }
        }
        self.table.clone()
    }

    /// The table only moves forward.
    fn take_table(&mut self, table: Arc<RoutingTable>) {
        if table.version() > self.table.version() {
            self.trace.push([0x9B, self.id, table.version(), 0]);
            self.counts.table_updates += 1;
            self.table = table;
        }
    }

    fn leader(&self, cell: CellId) -> Option<NodeId> {
        self.leaders.get(&cell).and_then(|&(node, _)| node)
    }

    fn learn(&mut self, cell: CellId, node: NodeId) {
        self.leaders.entry(cell).or_default().0 = Some(node);
    }

    fn forget(&mut self, cell: CellId, node: NodeId) {
        if let Some(leader) = self.leaders.get_mut(&cell) {
            if leader.0 == Some(node) {
                leader.0 = None;
            }
        }
    }

    /// The node to call for `cell`: its leader if known, else its voters in
    /// turn, most preferred first.
    fn candidate(&self, cell: CellId, attempt: u32) -> NodeId {
        if let Some(leader) = self.leader(cell) {
            return leader;
        }
        let mut voters = self.topology.cell(cell).expect("a topology cell").voters.clone();
        voters.sort_by_key(|&node| (self.topology.preference_rank(cell, node), node));
        voters[attempt as usize % voters.len()]
    }

    /// Where a part goes when its cell is not the topology's (a clearing
    /// account's id naming none), and a post or void whose pending transfer
    /// is found nowhere.
    fn fallback_cell(&self) -> CellId {
        self.topology.cells[0].id
    }

    fn known_cells(&self, parts: Vec<Part>) -> Vec<Part> {
        let known = |cell: CellId| cell != GLOBAL_CELL && self.topology.cell(cell).is_some();
        split::into_known_cells(parts, known, self.fallback_cell())
    }

    /// A lookup of `ids` in every cell (transfer ids are opaque).
    fn lookups(&self, ids: &[u128]) -> Vec<Call> {
        let cells = self.topology.cells.iter().map(|cell| cell.id).filter(|&cell| cell != GLOBAL_CELL);
        cells.map(|cell| Call::new(cell, Request::LookupTransfers(ids.to_vec()))).collect()
    }
}

/// A client's request in flight.
struct Routing {
    reply: oneshot::Sender<Result<Reply, NodeError>>,
    /// Parts are resent until then.
    deadline: u64,
    job: Job,
}

enum Job {
    Accounts(Create<Account>),
    Transfers(Create<Transfer>),
    Lookup(Lookup),
}

/// A request's answer, once it has one.
type Answered = Option<Result<Reply, NodeError>>;

/// What moving a request on takes: the time, the request's deadline, the
/// gateway's state and the nodes.
struct Ctx<'a> {
    now: u64,
    deadline: u64,
    router: &'a mut Router,
    nodes: &'a mut Nodes,
}

/// One call to a cell, resent through leader changes and unknown outcomes
/// until it is answered, refused for good, or the request's deadline passes
/// (`gateway/cells.rs`).
struct Call {
    cell: CellId,
    request: Request,
    attempt: u32,
    redirects_in_a_row: u32,
    delay_ns: u64,
    state: CallState,
}

enum CallState {
    /// To send at this time.
    Due(u64),
    Sent {
        node: NodeId,
        answer: Answer,
        deadline: u64,
    },
    Done(Result<Reply, NodeError>),
}

/// What a node's answer (or its silence) means for a call.
enum Outcome {
    Done(Result<Reply, NodeError>),
    /// Resend, at once if `redirect` (to the leader named), else after a pause.
    Again {
        error: NodeError,
        redirect: bool,
    },
}

impl Call {
    fn new(cell: CellId, request: Request) -> Call {
        Call {
            cell,
            request,
            attempt: 0,
            redirects_in_a_row: 0,
            delay_ns: RETRY_DELAY_MIN_NS,
            state: CallState::Due(0),
        }
    }

    fn result(&self) -> Option<&Result<Reply, NodeError>> {
        match &self.state {
            CallState::Done(result) => Some(result),
            _ => None,
        }
    }

    /// Sends, takes the answer, resends: whether the call is done.
    fn poll(&mut self, ctx: &mut Ctx) -> bool {
        let (now, deadline) = (ctx.now, ctx.deadline);
        loop {
            let outcome = match &mut self.state {
                CallState::Done(_) => return true,
                CallState::Due(at) if *at > now => return false,
                CallState::Due(_) => match self.send(ctx) {
                    Some(outcome) => outcome,
                    // Sent: the node may have answered at once (a refusal before proposing).
                    None => continue,
                },
                CallState::Sent { node, answer, deadline } => match answer.try_recv() {
                    Ok(result) => {
                        let node = *node;
                        self.answered(node, result, ctx.router)
                    }
                    Err(oneshot::error::TryRecvError::Empty) if now < *deadline => return false,
                    // No answer in time, or the node crashed: the outcome is unknown.
                    Err(_) => {
                        let (cell, node) = (self.cell, *node);
                        ctx.router.forget(cell, node);
                        let reason = "no answer".to_string();
                        Outcome::Again { error: NodeError::ForwardFailed { cell, node, reason }, redirect: false }
                    }
                },
            };
            match outcome {
                Outcome::Done(result) => self.state = CallState::Done(result),
                Outcome::Again { error, redirect } => {
                    self.redirects_in_a_row = if redirect { self.redirects_in_a_row + 1 } else { 0 };
                    let pause =
                        if redirect && self.redirects_in_a_row <= REDIRECTS_IN_A_ROW_MAX { 0 } else { self.delay_ns };
                    if now + pause >= deadline {
                        self.state = CallState::Done(Err(error));
                    } else {
                        self.state = CallState::Due(now + pause);
                        if pause > 0 {
                            self.delay_ns = (self.delay_ns * 2).min(RETRY_DELAY_MAX_NS);
                        }
                    }
                }
            }
        }
    }

    /// Sends the call to the node the gateway believes leads the cell; the
    /// outcome if the node is down.
    fn send(&mut self, ctx: &mut Ctx) -> Option<Outcome> {
        let router = &mut *ctx.router;
        let (cell, node) = (self.cell, router.candidate(self.cell, self.attempt));
        self.attempt += 1;
        router.counts.calls += 1;
        router.trace.push([0x9C, router.id, cell, node]);
        let Some(Some(stepped)) = ctx.nodes.get_mut(&node) else {
            // The connection is refused: to the gateway, the outcome is unknown.
            router.forget(cell, node);
            let reason = "connection refused".to_string();
            return Some(Outcome::Again { error: NodeError::ForwardFailed { cell, node, reason }, redirect: false });
        };
        let answer = stepped.submit(cell, self.request.clone());
        stepped.round();
        self.state = CallState::Sent { node, answer, deadline: ctx.now + CALL_TIMEOUT_NS };
        None
    }

    fn answered(&mut self, node: NodeId, result: Result<Reply, NodeError>, router: &mut Router) -> Outcome {
        let cell = self.cell;
        match result {
            Ok(reply) => {
                router.learn(cell, node);
                Outcome::Done(Ok(reply))
            }
            Err(error @ NodeError::Misrouted { .. }) => Outcome::Done(Err(error)),
            Err(NodeError::NotLeader { leader, .. }) => {
                let redirect = leader.filter(|&leader| leader != node);
                match redirect {
                    Some(leader) => {
                        router.counts.redirects += 1;
                        router.learn(cell, leader);
                    }
                    None => router.forget(cell, node),
                }
                Outcome::Again { error: NodeError::NotLeader { cell, leader }, redirect: redirect.is_some() }
            }
            // Refusals marked nothing-applied pass if the node said
            // UNAVAILABLE (no leader, overloaded, stopping); the others
            // are the request's fault.
            Err(error) if error.nothing_applied() && !passing(&error) => Outcome::Done(Err(error)),
            Err(error) if error.nothing_applied() => Outcome::Again { error, redirect: false },
            // A timeout, an outcome the node does not know: the same events again.
            Err(error) => {
                router.forget(cell, node);
                Outcome::Again { error, redirect: false }
            }
        }
    }
}

/// Whether a refusal that applied nothing is resent: those a node marks
/// UNAVAILABLE (production passes on those only).
fn passing(error: &NodeError) -> bool {
    matches!(
        error,
        NodeError::Overloaded { .. }
            | NodeError::ShuttingDown
            | NodeError::NotLeader { .. }
            | NodeError::CellNotHosted { .. }
            | NodeError::Unavailable { .. }
    )
}

/// Polls `calls`: whether every one is done.
fn poll_calls<'a>(calls: impl IntoIterator<Item = &'a mut Call>, ctx: &mut Ctx) -> bool {
    let mut done = true;
    for call in calls {
        done &= call.poll(ctx);
    }
    done
}

/// `error` (from a part for `cell`) as the answer to a request of which
/// `parts` other parts were or may have been applied: then it no longer
/// says that nothing was.
fn with_applied(error: NodeError, cell: CellId, parts: usize) -> NodeError {
    if parts == 0 || !error.nothing_applied() {
        return error;
    }
    let reason = format!("{error} ({parts} other part(s) of the request were or may have been applied)");
    NodeError::OutcomeUnknown { cell, reason }
}

/// A lookup of transfers by id, in every cell (transfer ids are opaque).
struct Lookup {
    ids: Vec<u128>,
    calls: Vec<Call>,
}

impl Lookup {
    fn new(ids: Vec<u128>, router: &Router) -> Lookup {
        let calls = router.lookups(&ids);
        Lookup { ids, calls }
    }

    /// What every cell found (a cross-cell transfer: a leg in each of its
    /// cells), once every cell answered.
    fn found(&mut self, ctx: &mut Ctx) -> Option<Result<Vec<Transfer>, NodeError>> {
        if !poll_calls(&mut self.calls, ctx) {
            return None;
        }
        let mut found = Vec::new();
        for call in &self.calls {
            match call.result().expect("done") {
                Ok(Reply::Transfers(transfers)) => found.extend_from_slice(transfers),
                Ok(other) => unreachable!("a lookup answered {other:?}"),
                Err(error) => return Some(Err(error.clone())),
            }
        }
        Some(Ok(found))
    }

    /// The client's lookup: in `ids` order, a cross-cell transfer's two legs
    /// merged into the transfer as the client sent it.
    fn poll(&mut self, ctx: &mut Ctx) -> Answered {
        let found = self.found(ctx)?;
        Some(found.map(|found| {
            Reply::Transfers(split::merge_found_with(&self.ids, found, |transfer| transfer.id, cross_cell::merge_legs))
        }))
    }
}

/// What a request's events are split by, besides themselves.
struct SplitBy<'a> {
    table: &'a RoutingTable,
    /// The pending transfers that posts and voids naming no account resolve.
    found: &'a PendingFound,
    /// Where a post or void goes whose pending transfer is found nowhere.
    fallback: CellId,
}

/// A create event the gateway routes.
trait Routed: CreateEvent {
    fn split(events: &[Self], by: &SplitBy) -> Result<Vec<Part>, SplitError>;
    /// The pending transfers to look up before splitting (posts and voids naming no account).
    fn to_find(events: &[Self]) -> Vec<u128>;
    fn reply(results: Vec<Self::Result>) -> Reply;
}

impl Routed for Account {
    fn split(accounts: &[Account], by: &SplitBy) -> Result<Vec<Part>, SplitError> {
        split::split_accounts(by.table, accounts)
    }
    fn to_find(_: &[Account]) -> Vec<u128> {
        Vec::new()
    }
    fn reply(results: Vec<Self::Result>) -> Reply {
        Reply::CreateAccounts(results)
    }
}

impl Routed for Transfer {
    fn split(transfers: &[Transfer], by: &SplitBy) -> Result<Vec<Part>, SplitError> {
        Ok(split::split_transfers(by.table, transfers, by.found, by.fallback))
    }
    fn to_find(transfers: &[Transfer]) -> Vec<u128> {
        split::pending_to_find(transfers)
    }
    fn reply(results: Vec<Self::Result>) -> Reply {
        Reply::CreateTransfers(results)
    }
}

/// A request of create events: split by home cell, the parts sent, the
/// misrouted ones split again, the answers merged (`GatewayHandle::create`).
struct Create<E: Routed> {
    events: Vec<E>,
    /// Pending transfers looked up before the first split (transfers only).
    finding: Option<Lookup>,
    found: PendingFound,
    /// The table this round was split by.
    table: Arc<RoutingTable>,
    round: u32,
    /// This round's parts, each with its call.
    sending: Vec<(Part, Call)>,
    /// Events to split again (after a misroute) at this time.
    again: Option<(Vec<usize>, u64)>,
    answered: Vec<(Part, Vec<E::Result>)>,
    /// Parts answered, or failed with an unknown outcome.
    parts_maybe_applied: usize,
    misrouted: bool,
}

impl<E: Routed> Create<E> {
    fn new(events: Vec<E>, router: &Router) -> Create<E> {
        let wanted = E::to_find(&events);
        let finding = (!wanted.is_empty()).then(|| Lookup::new(wanted, router));
        let again = finding.is_none().then(|| ((0..events.len()).collect(), 0));
        Create {
            events,
            finding,
            found: PendingFound::new(),
            table: router.table.clone(),
            round: 0,
            sending: Vec::new(),
            again,
            answered: Vec::new(),
            parts_maybe_applied: 0,
            misrouted: false,
        }
    }

    fn poll(&mut self, ctx: &mut Ctx) -> Answered {
        if let Some(finding) = &mut self.finding {
            let found = match finding.found(ctx)? {
                Ok(found) => split::merge_found(&finding.ids, found, |transfer| transfer.id, split::prefer_home_leg),
                Err(error) => return Some(Err(error)),
            };
            self.found = found.into_iter().map(|t| (t.id, (t.debit_account_id, t.credit_account_id))).collect();
            self.finding = None;
            self.table = ctx.router.table.clone();
            self.again = Some(((0..self.events.len()).collect(), ctx.now));
        }
        if let Some((todo, at)) = self.again.take() {
            if at > ctx.now {
                self.again = Some((todo, at));
                return None;
            }
            if let Err(error) = self.split(&todo, ctx.router) {
                return Some(Err(error));
            }
        }
        if !poll_calls(self.sending.iter_mut().map(|(_, call)| call), ctx) {
            return None;
        }
        self.round_answered(ctx)
    }

    /// Splits the events `todo` (positions in the request) by the table
    /// and starts a call per part.
    fn split(&mut self, todo: &[usize], router: &mut Router) -> Result<(), NodeError> {
        let subset: Vec<E> = todo.iter().map(|&index| self.events[index]).collect();
        let by = SplitBy { table: &self.table, found: &self.found, fallback: router.fallback_cell() };
        let parts = E::split(&subset, &by).map_err(|error| match error {
            SplitError::CrossCell { first_index, first_cell, index, cell } => {
                NodeError::CrossCell { first_index: todo[first_index], first_cell, index: todo[index], cell }
            }
        })?;
        for mut part in router.known_cells(parts) {
            part.indices.iter_mut().for_each(|index| *index = todo[*index]);
            router.counts.parts += 1;
            router.counts.parts_rerouted += u64::from(self.round > 0);
            let request = E::request(split::part_events(&self.events, &part));
            let call = Call::new(part.cell, request);
            self.sending.push((part, call));
        }
        Ok(())
    }

    /// Every part of the round is done: the answer, or the next round.
    fn round_answered(&mut self, ctx: &mut Ctx) -> Answered {
        let (now, deadline, router) = (ctx.now, ctx.deadline, &mut *ctx.router);
        let mut misrouted: Vec<(Part, NodeError)> = Vec::new();
        let mut failure: Option<(CellId, NodeError)> = None;
        for (part, call) in std::mem::take(&mut self.sending) {
            let CallState::Done(result) = call.state else { unreachable!("every call is done") };
            let results = result.and_then(|reply| {
                E::results(reply).filter(|results| results.len() == part.indices.len()).ok_or_else(|| {
                    NodeError::OutcomeUnknown { cell: part.cell, reason: "a reply that does not fit the part".into() }
                })
            });
            match results {
                Ok(results) => {
                    self.parts_maybe_applied += 1;
                    self.answered.push((part, results));
                }
                Err(error @ NodeError::Misrouted { .. }) => {
                    router.counts.parts_misrouted += 1;
                    router.trace.push([0x9D, router.id, part.cell, self.round.into()]);
                    misrouted.push((part, error));
                }
                // The first failure is answered; the others count as maybe
                // applied unless they say nothing was.
                Err(error) => match failure {
                    None => failure = Some((part.cell, error)),
                    Some(_) => self.parts_maybe_applied += usize::from(!error.nothing_applied()),
                },
            }
        }
        let applied = self.parts_maybe_applied;
        if let Some((cell, failure)) = failure {
            return Some(Err(with_applied(failure, cell, applied)));
        }
        if misrouted.is_empty() {
            router.counts.misroutes_corrected += u64::from(self.misrouted);
            let results = split::merge_results(self.events.len(), &self.answered);
            return Some(Ok(E::reply(results)));
        }
        self.misrouted = true;
        let answer =
            |refusal: usize| Some(Err(with_applied(misrouted[refusal].1.clone(), misrouted[refusal].0.cell, applied)));
        if self.round >= MISROUTE_ROUNDS_MAX {
            return answer(0);
        }
        // A table at least as new as the refusals name, from the refusing cell's leader first.
        let mut version = 0;
        let mut refused_by = None;
        let mut refusals: Vec<(CellId, u128)> = Vec::new();
        for (_, error) in &misrouted {
            let NodeError::Misrouted { cell, account, routing_version, .. } = error else { unreachable!("misrouted") };
            version = version.max(*routing_version);
            refused_by = refused_by.or_else(|| router.leader(*cell));
            refusals.push((*cell, *account));
        }
        let fresh = router.refresh(version, refused_by, ctx.nodes);
        let at = match split::misroute_verdict(&self.table, &fresh, &refusals) {
            MisrouteVerdict::SplitAgain => now,
            MisrouteVerdict::Pause => {
                router.counts.misroute_pauses += 1;
                let pause = MISROUTE_PAUSE_NS * u64::from(self.round + 1);
                if now + pause >= deadline {
                    return answer(0);
                }
                now + pause
            }
            MisrouteVerdict::Answer(refusal) => return answer(refusal),
        };
        self.table = fresh;
        self.round += 1;
        let mut todo: Vec<usize> = misrouted.into_iter().flat_map(|(part, _)| part.indices).collect();
        todo.sort_unstable();
        self.again = Some((todo, at));
        None
    }
}
