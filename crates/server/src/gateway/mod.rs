//! The gateway (`cellpay gateway`): a stateless router in front of the
//! cells. It serves the same REST and gRPC API as a node (through the same
//! front ends: it is a [`Backend`]), splits each client request by home
//! cell, sends each part to its cell's leader, and merges the answers back
//! in request order.
//!
//! - [`split`]: the pure part: the home cell of every event, the split of a
//!   request into parts, the merge of the answers (for the simulator's
//!   model of the gateway to reuse).
//! - `table`: the routing table, watched on the nodes; refreshed after a
//!   `misrouted` refusal.
//! - `cells`: who leads each cell, and one call to a cell, resent through
//!   leader changes and unknown outcomes.
//! - `batch`: concurrent clients' create parts combined into one call per cell.
//!
//! What it knows comes from the topology file (the nodes' addresses, the
//! cells' voters, the first routing table) and from the nodes: several
//! gateways may run side by side, and one may be restarted at any time.
//!
//! **What a client sees.** A request is answered once every part is: the
//! results in request order. A part is resent (to the new leader, after a
//! pause) while its cell refuses it with nothing applied, and also when its
//! outcome is unknown (no answer, a timeout): creates are idempotent by id,
//! so an event the lost call applied answers `exists`. A part refused
//! `misrouted` is split again by a table at least as new as the refusal
//! names, and resent (at most `misroute_retries_max` times). A part that
//! still fails fails the whole request with its error; the other parts (in
//! other cells) may have been applied, and the error says how many: the
//! client retries the whole request with the same ids, and what was applied
//! answers `exists`.
//!
//! Architecture invariant: the gateway holds no ledger state and writes
//! nothing to disk; every write goes to a cell's leader with the
//! `cellpay-forwarded` mark, so a cell serves it with its own replica and
//! checks its ownership of every account by its own log.

mod batch;
mod cells;
pub mod metrics;
pub mod split;
mod table;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cellpay_api::ErrorCode;
use cellpay_cluster::routing::RoutingTable;
use cellpay_cluster::topology::{CellId, NodeId, Topology, GLOBAL_CELL};
use cellpay_ledger::{Account, FilterError, Transfer, BATCH_EVENTS_MAX};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::cross_cell;
use crate::forward::{refusal_metadata, NOTHING_APPLIED_KEY};
use crate::front::{node_error_code, Backend, Caller, FrontError};
use crate::node::{NodeError, Reply, Request};
use batch::{results_of, Batcher, QueueError};
use cells::Cells;
use metrics::{CellLabels, GatewayMetrics, RequestLabels};
use split::{CreateEvent, MisrouteVerdict, Part, PendingFound, SplitError};
use table::Table;

/// A gateway's settings. Every queue and wait is bounded by one of them.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub topology: Arc<Topology>,
    /// The region the gateway runs in: its nodes are asked first for the
    /// routing table and the cells' leaders.
    pub region: Option<String>,
    /// Combine concurrent clients' create parts toward a cell into one call.
    pub batching: bool,
    /// Parts waiting per cell and kind (accounts, transfers); one more is
    /// refused `overloaded`.
    pub queue_parts_max: usize,
    /// Combined calls in flight per cell and kind.
    pub cell_calls_max: usize,
    /// How long a request's parts are resent through leader changes and
    /// unknown outcomes, from its arrival.
    pub retry_duration: Duration,
    /// How long one call to a cell may take. Over the cells' own commit
    /// timeout (10 s), so that a cell answers `timeout` itself.
    pub call_timeout: Duration,
    /// How many times a request's misrouted parts are split again and resent.
    pub misroute_retries_max: u32,
    /// Keep a watch on the nodes' routing table. Off (tests), the gateway
    /// routes by the topology's table until a `misrouted` refusal makes it
    /// fetch a newer one.
    pub routing_watch: bool,
    /// How often a node's status is read to learn the cells' leaders.
    pub status_interval: Duration,
}

/// Parts waiting per cell and kind, by default: with 8,190 events each at
/// most, the most the queues of one cell can hold is bounded.
pub const QUEUE_PARTS_MAX_DEFAULT: usize = 1024;
/// Combined calls in flight per cell and kind, by default: a few, so that
/// one slow commit does not stop a cell's traffic, and parts pile up (and
/// are combined) while they are busy.
pub const CELL_CALLS_MAX_DEFAULT: usize = 4;

impl GatewayConfig {
    pub fn new(topology: Arc<Topology>) -> GatewayConfig {
        GatewayConfig {
            topology,
            region: None,
            batching: true,
            queue_parts_max: QUEUE_PARTS_MAX_DEFAULT,
            cell_calls_max: CELL_CALLS_MAX_DEFAULT,
            retry_duration: Duration::from_secs(10),
            call_timeout: Duration::from_secs(12),
            misroute_retries_max: 3,
            routing_watch: true,
            status_interval: Duration::from_secs(1),
        }
    }
}

/// How long a request waits, after a `misrouted` refusal, for a node to
/// give it the table version the refusal names.
const REFRESH_DURATION_MAX: Duration = Duration::from_secs(2);
/// The pause before resending a part its cell refused although the table
/// names it as the owner (a shard move between its steps), times the round.
const MISROUTE_PAUSE: Duration = Duration::from_millis(50);
/// How long one status read may take.
const STATUS_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a gateway refused a request as a whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("a request must carry at least one event")]
    BatchEmpty,
    #[error("a request carries {events} events; the limit is {BATCH_EVENTS_MAX}")]
    BatchTooLarge { events: usize },
    #[error("invalid filter: {0}")]
    InvalidFilter(FilterError),
    #[error(
        "accounts {first_index} and {index} are linked in one chain but belong to cells {first_cell} and {cell}: \
         a linked chain of accounts must stay in one cell; nothing was applied"
    )]
    CrossCell { first_index: usize, first_cell: CellId, index: usize, cell: CellId },
    #[error("a gateway does not serve this: {what}")]
    NotServed { what: &'static str },
    #[error(
        "the gateway's queue toward cell {cell} is full ({queue_parts_max} parts waiting): retry later{}",
        applied_note(*parts_maybe_applied)
    )]
    Overloaded { cell: CellId, queue_parts_max: usize, parts_maybe_applied: usize },
    /// A part failed in its cell (after the gateway's retries).
    #[error("{error}{}", applied_note(*parts_maybe_applied))]
    Cell { error: NodeError, parts_maybe_applied: usize },
}

fn applied_note(parts: usize) -> String {
    if parts == 0 {
        return String::new();
    }
    format!(
        " ({parts} other part(s) of the request, in other cells, were or may have been applied: retry the whole \
         request with the same ids; what was applied answers exists)"
    )
}

impl GatewayError {
    /// Whether the refusal guarantees that nothing of the request was applied.
    pub fn nothing_applied(&self) -> bool {
        match self {
            GatewayError::Overloaded { parts_maybe_applied, .. } => *parts_maybe_applied == 0,
            GatewayError::Cell { error, parts_maybe_applied } => error.nothing_applied() && *parts_maybe_applied == 0,
            _ => true,
        }
    }
}

impl FrontError for GatewayError {
    fn code(&self) -> ErrorCode {
        match self {
            GatewayError::ShuttingDown | GatewayError::Overloaded { .. } => ErrorCode::Overloaded,
            GatewayError::BatchEmpty => ErrorCode::BatchEmpty,
            GatewayError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
            GatewayError::InvalidFilter(_) => ErrorCode::InvalidFilter,
            GatewayError::CrossCell { .. } => ErrorCode::CrossCell,
            GatewayError::NotServed { .. } => ErrorCode::Unavailable,
            GatewayError::Cell { error, .. } => node_error_code(error),
        }
    }

    fn metadata(&self, metadata: &mut MetadataMap) {
        if let GatewayError::Cell { error, .. } = self {
            refusal_metadata(error, metadata);
        }
        if self.nothing_applied() {
            metadata.insert(NOTHING_APPLIED_KEY, tonic::metadata::MetadataValue::from_static("1"));
        } else {
            metadata.remove(NOTHING_APPLIED_KEY);
        }
    }
}

/// Why one part failed.
enum PartError {
    Cell(NodeError),
    QueueFull,
}

impl From<NodeError> for PartError {
    fn from(error: NodeError) -> PartError {
        PartError::Cell(error)
    }
}

/// A running gateway: its handle and its background tasks (the routing
/// watch, the status reader, the batchers' senders), aborted when it is
/// dropped.
pub struct Gateway {
    handle: GatewayHandle,
    tasks: Vec<JoinHandle<()>>,
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayStartError {
    #[error("region {0:?} is not in the topology")]
    UnknownRegion(String),
    #[error("a gateway needs at least one node, one cell and a queue: {0}")]
    Config(&'static str),
}

impl Gateway {
    /// Starts the gateway's tasks on the current tokio runtime. It routes by
    /// the topology's table until a node answers.
    pub fn start(config: GatewayConfig) -> Result<Gateway, GatewayStartError> {
        let topology = config.topology.clone();
        if let Some(region) = &config.region {
            if !topology.regions.iter().any(|r| &r.name == region) {
                return Err(GatewayStartError::UnknownRegion(region.clone()));
            }
        }
        if topology.nodes().next().is_none() || topology.cells.is_empty() {
            return Err(GatewayStartError::Config("the topology names none"));
        }
        if config.queue_parts_max == 0 || config.cell_calls_max == 0 {
            return Err(GatewayStartError::Config("queue_parts_max and cell_calls_max must be at least 1"));
        }
        let nodes = node_order(&topology, config.region.as_deref());
        let metrics = Arc::new(GatewayMetrics::new());
        let table = Arc::new(Table::new(topology.clone(), nodes.clone(), metrics.clone()));
        let cells = Arc::new(Cells::new(topology.clone(), config.call_timeout, metrics.clone()));
        let mut tasks = Vec::new();
        let mut accounts = BTreeMap::new();
        let mut transfers = BTreeMap::new();
        let (queue, calls, retry) = (config.queue_parts_max, config.cell_calls_max, config.retry_duration);
        for cell in topology.cells.iter().map(|cell| cell.id) {
            let (batcher, task) = Batcher::<Account>::start(cell, cells.clone(), queue, calls, retry, metrics.clone());
            accounts.insert(cell, batcher);
            tasks.push(task);
            for spans_cells in [false, true] {
                let (batcher, task) =
                    Batcher::<Transfer>::start(cell, cells.clone(), queue, calls, retry, metrics.clone());
                transfers.insert((cell, spans_cells), batcher);
                tasks.push(task);
            }
        }
        if config.routing_watch {
            tasks.push(tokio::spawn(table.clone().watch()));
        }
        tasks.push(tokio::spawn(read_statuses(topology.clone(), nodes, cells.clone(), config.status_interval)));
        let core = Core {
            fallback_cell: topology.cells[0].id,
            config,
            table,
            cells,
            accounts,
            transfers,
            metrics,
            running: AtomicBool::new(true),
        };
        Ok(Gateway { handle: GatewayHandle { core: Arc::new(core) }, tasks })
    }

    pub fn handle(&self) -> GatewayHandle {
        self.handle.clone()
    }

    /// Refuses new requests and stops the background tasks. Call it once
    /// the front ends have finished the requests in flight (`serve` returned).
    pub fn shutdown(mut self) {
        self.handle.core.running.store(false, Ordering::Release);
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.handle.core.running.store(false, Ordering::Release);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The nodes in the order the gateway asks them: `region`'s first, then
/// the others, each in topology order.
fn node_order(topology: &Topology, region: Option<&str>) -> Vec<NodeId> {
    let in_region =
        |node: NodeId| region.is_some_and(|region| topology.location(node).is_some_and(|l| l.region == region));
    let (mut first, rest): (Vec<NodeId>, Vec<NodeId>) =
        topology.nodes().map(|node| node.id).partition(|&node| in_region(node));
    first.extend(rest);
    first
}

/// Reads one node's status every `interval` (the next node if it does not
/// answer) and learns the cells' leaders from it.
async fn read_statuses(topology: Arc<Topology>, nodes: Vec<NodeId>, cells: Arc<Cells>, interval: Duration) {
    let http = reqwest::Client::builder().timeout(STATUS_CALL_TIMEOUT).build().expect("an HTTP client");
    let mut position = 0usize;
    loop {
        let node = nodes[position % nodes.len()];
        let address = topology.node(node).expect("nodes of the topology").client_address;
        let url = format!("http://{address}/v1/cluster/status");
        let status = async { http.get(&url).send().await?.error_for_status()?.json::<serde_json::Value>().await };
        match status.await {
            Ok(status) => cells.learn_status(&status),
            Err(error) => {
                tracing::debug!(node, %error, "status read failed: asking the next node");
                position += 1;
            }
        }
        tokio::time::sleep(interval).await;
    }
}

struct Core {
    config: GatewayConfig,
    table: Arc<Table>,
    cells: Arc<Cells>,
    accounts: BTreeMap<CellId, Batcher<Account>>,
    /// By cell and whether the parts span cells (see `Part::spans_cells`).
    transfers: BTreeMap<(CellId, bool), Batcher<Transfer>>,
    metrics: Arc<GatewayMetrics>,
    /// Where a post or void goes whose pending transfer is found nowhere
    /// (it answers `pending_transfer_not_found`).
    fallback_cell: CellId,
    running: AtomicBool,
}

/// A cheap, cloneable handle on a running gateway.
#[derive(Clone)]
pub struct GatewayHandle {
    core: Arc<Core>,
}

impl GatewayHandle {
    /// Serves one of the six ledger operations: splits it by cell, sends
    /// the parts, merges the answers (see the module).
    pub async fn submit(&self, request: Request) -> Result<Reply, GatewayError> {
        let operation = request.operation();
        let result = self.submit_inner(request).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(error) => error.code().as_str(),
        };
        self.core.metrics.requests.get_or_create(&RequestLabels { operation, outcome }).inc();
        result
    }

    /// The routing table the gateway routes by now.
    pub fn routing(&self) -> Arc<RoutingTable> {
        self.core.table.current()
    }

    /// The leader of `cell` as the gateway knows it.
    pub fn leader(&self, cell: CellId) -> Option<NodeId> {
        self.core.cells.leader(cell)
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.core.metrics
    }

    async fn submit_inner(&self, request: Request) -> Result<Reply, GatewayError> {
        if !self.core.running.load(Ordering::Acquire) {
            return Err(GatewayError::ShuttingDown);
        }
        validate(&request)?;
        let deadline = Instant::now() + self.core.config.retry_duration;
        match request {
            Request::CreateAccounts(accounts) => {
                let results = self.create(&accounts, &PendingFound::new(), split_accounts, deadline).await?;
                Ok(Reply::CreateAccounts(results))
            }
            Request::CreateTransfers(transfers) => {
                let found = self.find_pending(&transfers, deadline).await?;
                let results = self.create(&transfers, &found, split_transfers, deadline).await?;
                Ok(Reply::CreateTransfers(results))
            }
            Request::LookupAccounts(ids) => {
                let split = |table: &RoutingTable| {
                    self.known_cells(split::split_ids(table, &ids))
                        .iter()
                        .map(|part| (part.cell, Request::LookupAccounts(split::part_events(&ids, part))))
                        .collect()
                };
                let found = self.read(split, deadline).await?.into_iter().flat_map(|reply| match reply {
                    Reply::Accounts(accounts) => accounts,
                    _ => Vec::new(),
                });
                Ok(Reply::Accounts(split::merge_found(&ids, found, |account| account.id, |_, _| false)))
            }
            Request::LookupTransfers(ids) => {
                let found = self.lookup_transfers(&ids, deadline).await?;
                let merged = split::merge_found_with(&ids, found, |transfer| transfer.id, cross_cell::merge_legs);
                Ok(Reply::Transfers(merged))
            }
            Request::GetAccountTransfers(filter) => {
                self.query(filter.account_id, Request::GetAccountTransfers(filter), deadline).await
            }
            Request::GetAccountBalances(filter) => {
                self.query(filter.account_id, Request::GetAccountBalances(filter), deadline).await
            }
            Request::ChangeRouting { .. }
            | Request::ShardOwnership { .. }
            | Request::DefineLedger { .. }
            | Request::ChangeTopology { .. } => {
                Err(GatewayError::NotServed { what: "operator changes go to the nodes" })
            }
        }
    }

    /// Creates `events`: split by home cell, each part sent (combined with
    /// other clients' parts when it may be), answers merged in order;
    /// misrouted parts split again and resent (see the module).
    async fn create<E: Routed>(
        &self,
        events: &[E],
        found: &PendingFound,
        split: SplitFn<E>,
        deadline: Instant,
    ) -> Result<Vec<E::Result>, GatewayError> {
        let mut answered: Vec<(Part, Vec<E::Result>)> = Vec::new();
        // Parts answered, or failed with an unknown outcome: maybe applied.
        let mut parts_maybe_applied = 0usize;
        let mut todo: Vec<usize> = (0..events.len()).collect();
        let mut table = self.core.table.current();
        for round in 0.. {
            let subset: Vec<E> = todo.iter().map(|&index| events[index]).collect();
            let mut parts = split(&table, &subset, found, self.core.fallback_cell).map_err(|error| match error {
                SplitError::CrossCell { first_index, first_cell, index, cell } => {
                    GatewayError::CrossCell { first_index: todo[first_index], first_cell, index: todo[index], cell }
                }
            })?;
            parts = self.known_cells(parts);
            for part in &mut parts {
                part.indices.iter_mut().for_each(|index| *index = todo[*index]);
            }
            let answers = self.send_parts(events, &parts, deadline).await;
            let mut misrouted: Vec<(Part, NodeError)> = Vec::new();
            let mut failure: Option<GatewayError> = None;
            for (part, answer) in parts.into_iter().zip(answers) {
                match answer {
                    Ok(results) => {
                        parts_maybe_applied += 1;
                        answered.push((part, results));
                    }
                    Err(PartError::Cell(error @ NodeError::Misrouted { .. })) => {
                        self.core.metrics.misroutes.inc();
                        misrouted.push((part, error));
                    }
                    // The first failure is answered; the others count as
                    // maybe applied unless they say nothing was.
                    Err(PartError::Cell(error)) => match failure {
                        None => failure = Some(GatewayError::Cell { error, parts_maybe_applied: 0 }),
                        Some(_) => parts_maybe_applied += usize::from(!error.nothing_applied()),
                    },
                    Err(PartError::QueueFull) => {
                        let queue_parts_max = self.core.config.queue_parts_max;
                        let error =
                            GatewayError::Overloaded { cell: part.cell, queue_parts_max, parts_maybe_applied: 0 };
                        failure.get_or_insert(error);
                    }
                }
            }
            if let Some(failure) = failure {
                return Err(with_applied(failure, parts_maybe_applied));
            }
            if misrouted.is_empty() {
                return Ok(split::merge_results(events.len(), &answered));
            }
            let refusals: Vec<&NodeError> = misrouted.iter().map(|(_, error)| error).collect();
            table = match self.after_misroute(&table, &refusals, round, deadline).await {
                Ok(table) => table,
                Err(error) => return Err(GatewayError::Cell { error, parts_maybe_applied }),
            };
            todo = misrouted.into_iter().flat_map(|(part, _)| part.indices).collect();
            todo.sort_unstable();
        }
        unreachable!("after_misroute ends the loop")
    }

    /// `parts` with those for a cell the topology does not have (a clearing
    /// account's id that names none) sent to the fallback cell instead.
    fn known_cells(&self, parts: Vec<Part>) -> Vec<Part> {
        let topology = &self.core.config.topology;
        let known = |cell: CellId| cell != GLOBAL_CELL && topology.cell(cell).is_some();
        split::into_known_cells(parts, known, self.core.fallback_cell)
    }

    /// A query of one account's history, from the account's cell.
    async fn query(&self, account: u128, request: Request, deadline: Instant) -> Result<Reply, GatewayError> {
        let topology = &self.core.config.topology;
        let one = |table: &RoutingTable| {
            let cell = table.cell_of_account(account);
            let known = cell != GLOBAL_CELL && topology.cell(cell).is_some();
            vec![(if known { cell } else { self.core.fallback_cell }, request.clone())]
        };
        let mut replies = self.read(one, deadline).await?;
        Ok(replies.pop().expect("one read, one reply"))
    }

    /// Sends each part (at once, side by side) and returns their answers in order.
    async fn send_parts<E: Routed>(
        &self,
        events: &[E],
        parts: &[Part],
        deadline: Instant,
    ) -> Vec<Result<Vec<E::Result>, PartError>> {
        if let [part] = parts {
            return vec![self.send_part(part, split::part_events(events, part), deadline).await];
        }
        let tasks: Vec<JoinHandle<Result<Vec<E::Result>, PartError>>> = parts
            .iter()
            .map(|part| {
                let (gateway, part, events) = (self.clone(), part.clone(), split::part_events(events, part));
                tokio::spawn(async move { gateway.send_part(&part, events, deadline).await })
            })
            .collect();
        let mut answers = Vec::with_capacity(tasks.len());
        for (part, task) in parts.iter().zip(tasks) {
            answers.push(task.await.unwrap_or_else(|error| {
                let reason = format!("the part's task failed: {error}");
                Err(PartError::Cell(NodeError::OutcomeUnknown { cell: part.cell, reason }))
            }));
        }
        answers
    }

    /// Sends one part: through its cell's batcher if it may be combined,
    /// else alone.
    async fn send_part<E: Routed>(
        &self,
        part: &Part,
        events: Vec<E>,
        deadline: Instant,
    ) -> Result<Vec<E::Result>, PartError> {
        self.core.metrics.parts.get_or_create(&CellLabels { cell: part.cell }).inc();
        let count = events.len();
        if self.core.config.batching && part.combinable() {
            if let Some(batcher) = E::batcher(&self.core, part) {
                return match batcher.submit(events).await {
                    Ok(answer) => answer.map_err(PartError::Cell),
                    Err(QueueError::Full) => Err(PartError::QueueFull),
                    Err(QueueError::Closed) => Err(PartError::Cell(NodeError::Unavailable {
                        cell: part.cell,
                        reason: "the gateway is stopping".into(),
                    })),
                };
            }
        }
        self.core.metrics.batch_events.observe(count as f64);
        self.core.metrics.batch_parts.observe(1.0);
        let reply = self.core.cells.call(part.cell, &E::request(events), deadline).await?;
        Ok(results_of::<E>(part.cell, reply, count)?)
    }

    /// What to do after parts were refused `misrouted` by the table `used`:
    /// the table to split them again by, or the error to answer with.
    ///
    /// The table is refreshed to at least the newest version the refusals
    /// name. If it moved, the parts are split again. If not, a refusal of
    /// an account the table says the refusing cell owns is a shard move
    /// between its steps (released, or not yet acquired): resent after a
    /// pause. Any other (an event naming an account of another cell, which
    /// no table can route) is answered at once.
    async fn after_misroute(
        &self,
        used: &RoutingTable,
        refusals: &[&NodeError],
        round: u32,
        deadline: Instant,
    ) -> Result<Arc<RoutingTable>, NodeError> {
        let first = refusals.first().map(|error| (*error).clone()).expect("at least one refusal");
        if round >= self.core.config.misroute_retries_max {
            return Err(first);
        }
        let mut version = 0;
        let mut refused_by = None;
        for refusal in refusals {
            if let NodeError::Misrouted { cell, routing_version, .. } = refusal {
                version = version.max(*routing_version);
                refused_by = refused_by.or_else(|| self.core.cells.leader(*cell));
            }
        }
        let refresh_deadline = deadline.min(Instant::now() + REFRESH_DURATION_MAX);
        let table = self.core.table.refresh_at_least(version, refused_by, refresh_deadline).await;
        let refused: Vec<(CellId, u128)> = refusals
            .iter()
            .filter_map(|refusal| match refusal {
                NodeError::Misrouted { cell, account, .. } => Some((*cell, *account)),
                _ => None,
            })
            .collect();
        assert_eq!(refused.len(), refusals.len(), "only misrouted refusals come here");
        match split::misroute_verdict(used, &table, &refused) {
            MisrouteVerdict::SplitAgain => Ok(table),
            MisrouteVerdict::Answer(refusal) => Err((*refusals[refusal]).clone()),
            MisrouteVerdict::Pause => {
                let pause = MISROUTE_PAUSE * (round + 1);
                if Instant::now() + pause >= deadline {
                    return Err(first);
                }
                tokio::time::sleep(pause).await;
                Ok(table)
            }
        }
    }

    /// Reads: `split` makes one request per cell from a table; on a
    /// `misrouted` refusal the table is refreshed and the reads made again
    /// (a read applies nothing). The replies, in the order of the requests.
    async fn read(
        &self,
        split: impl Fn(&RoutingTable) -> Vec<(CellId, Request)>,
        deadline: Instant,
    ) -> Result<Vec<Reply>, GatewayError> {
        let mut table = self.core.table.current();
        for round in 0.. {
            let requests = split(&table);
            let answers = self.read_parts(requests, deadline).await;
            let mut misrouted: Vec<NodeError> = Vec::new();
            let mut replies = Vec::with_capacity(answers.len());
            for answer in answers {
                match answer {
                    Ok(reply) => replies.push(reply),
                    Err(error @ NodeError::Misrouted { .. }) => {
                        self.core.metrics.misroutes.inc();
                        misrouted.push(error);
                    }
                    Err(error) => return Err(GatewayError::Cell { error, parts_maybe_applied: 0 }),
                }
            }
            if misrouted.is_empty() {
                return Ok(replies);
            }
            let refusals: Vec<&NodeError> = misrouted.iter().collect();
            table = self
                .after_misroute(&table, &refusals, round, deadline)
                .await
                .map_err(|error| GatewayError::Cell { error, parts_maybe_applied: 0 })?;
        }
        unreachable!("after_misroute ends the loop")
    }

    /// Sends read requests side by side; their answers in order.
    async fn read_parts(&self, requests: Vec<(CellId, Request)>, deadline: Instant) -> Vec<Result<Reply, NodeError>> {
        if let [(cell, request)] = requests.as_slice() {
            self.core.metrics.parts.get_or_create(&CellLabels { cell: *cell }).inc();
            return vec![self.core.cells.call(*cell, request, deadline).await];
        }
        let tasks: Vec<(CellId, JoinHandle<Result<Reply, NodeError>>)> = requests
            .into_iter()
            .map(|(cell, request)| {
                self.core.metrics.parts.get_or_create(&CellLabels { cell }).inc();
                let cells = self.core.cells.clone();
                (cell, tokio::spawn(async move { cells.call(cell, &request, deadline).await }))
            })
            .collect();
        let mut answers = Vec::with_capacity(tasks.len());
        for (cell, task) in tasks {
            answers.push(task.await.unwrap_or_else(|error| {
                Err(NodeError::Unavailable { cell, reason: format!("the read's task failed: {error}") })
            }));
        }
        answers
    }

    /// Transfers by id, from every cell (transfer ids are opaque: any cell
    /// may hold one), cells in id order.
    async fn lookup_transfers(&self, ids: &[u128], deadline: Instant) -> Result<Vec<Transfer>, GatewayError> {
        let every_cell = |_: &RoutingTable| {
            let cells = self.core.config.topology.cells.iter().map(|cell| cell.id).filter(|&cell| cell != GLOBAL_CELL);
            cells.map(|cell| (cell, Request::LookupTransfers(ids.to_vec()))).collect()
        };
        let replies = self.read(every_cell, deadline).await?;
        Ok(replies
            .into_iter()
            .flat_map(|reply| match reply {
                Reply::Transfers(transfers) => transfers,
                _ => Vec::new(),
            })
            .collect())
    }

    /// The accounts of the pending transfers that posts and voids naming no
    /// account resolve, looked up in every cell (see `split::pending_to_find`).
    async fn find_pending(&self, transfers: &[Transfer], deadline: Instant) -> Result<PendingFound, GatewayError> {
        let wanted = split::pending_to_find(transfers);
        if wanted.is_empty() {
            return Ok(PendingFound::new());
        }
        let found = self.lookup_transfers(&wanted, deadline).await?;
        let found = split::merge_found(&wanted, found, |transfer| transfer.id, split::prefer_home_leg);
        Ok(found
            .into_iter()
            .map(|transfer| (transfer.id, (transfer.debit_account_id, transfer.credit_account_id)))
            .collect())
    }
}

/// `error` as the answer to a request of which `parts_maybe_applied` other
/// parts were or may have been applied.
fn with_applied(error: GatewayError, parts: usize) -> GatewayError {
    match error {
        GatewayError::Cell { error, .. } => GatewayError::Cell { error, parts_maybe_applied: parts },
        GatewayError::Overloaded { cell, queue_parts_max, .. } => {
            GatewayError::Overloaded { cell, queue_parts_max, parts_maybe_applied: parts }
        }
        other => other,
    }
}

type SplitFn<E> = fn(&RoutingTable, &[E], &PendingFound, CellId) -> Result<Vec<Part>, SplitError>;

fn split_accounts(
    table: &RoutingTable,
    accounts: &[Account],
    _: &PendingFound,
    _: CellId,
) -> Result<Vec<Part>, SplitError> {
    split::split_accounts(table, accounts)
}

fn split_transfers(
    table: &RoutingTable,
    transfers: &[Transfer],
    found: &PendingFound,
    fallback: CellId,
) -> Result<Vec<Part>, SplitError> {
    Ok(split::split_transfers(table, transfers, found, fallback))
}

/// A create event the gateway routes: the batcher of a part of them.
trait Routed: CreateEvent {
    fn batcher<'a>(core: &'a Core, part: &Part) -> Option<&'a Batcher<Self>>;
}

impl Routed for Account {
    fn batcher<'a>(core: &'a Core, part: &Part) -> Option<&'a Batcher<Account>> {
        core.accounts.get(&part.cell)
    }
}

impl Routed for Transfer {
    fn batcher<'a>(core: &'a Core, part: &Part) -> Option<&'a Batcher<Transfer>> {
        core.transfers.get(&(part.cell, part.spans_cells))
    }
}

/// The checks a node makes before routing (the API's decoding makes them
/// too; an in-process caller may not have).
fn validate(request: &Request) -> Result<(), GatewayError> {
    match request {
        Request::GetAccountTransfers(filter) | Request::GetAccountBalances(filter) => {
            filter.validate().map_err(GatewayError::InvalidFilter)
        }
        Request::ChangeRouting { .. }
        | Request::ShardOwnership { .. }
        | Request::DefineLedger { .. }
        | Request::ChangeTopology { .. } => Ok(()),
        _ => match request.events() {
            0 => Err(GatewayError::BatchEmpty),
            events if events > BATCH_EVENTS_MAX => Err(GatewayError::BatchTooLarge { events }),
            _ => Ok(()),
        },
    }
}

impl Backend for GatewayHandle {
    type Error = GatewayError;

    fn submit(&self, request: Request, caller: Caller) -> impl Future<Output = Result<Reply, GatewayError>> + Send {
        let gateway = self.clone();
        async move {
            match caller {
                Caller::Client => gateway.submit(request).await,
                Caller::Forwarded(_) | Caller::ForwardedMalformed => {
                    Err(GatewayError::NotServed { what: "a gateway hosts no cell: forwarded calls go to nodes" })
                }
            }
        }
    }

    fn metrics_text(&self) -> String {
        self.core.metrics.encode()
    }

    /// Ready once a node has answered with the routing table.
    fn health(&self) -> Result<(), String> {
        if !self.core.running.load(Ordering::Acquire) {
            return Err("the gateway is shutting down".to_string());
        }
        if !self.core.table.heard() {
            return Err("no node has answered the gateway yet".to_string());
        }
        Ok(())
    }

    fn is_running(&self) -> bool {
        self.core.running.load(Ordering::Acquire)
    }

    fn routing_watch(&self) -> tokio::sync::watch::Receiver<Arc<RoutingTable>> {
        self.core.table.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nodes_of_the_gateways_region_are_asked_first() {
        let topology = Topology::local(20_000, 4);
        let all: Vec<NodeId> = topology.nodes().map(|node| node.id).collect();
        assert_eq!(node_order(&topology, None), all, "without a region: topology order");
        let region = topology.regions[1].name.clone();
        let first = topology.region_nodes(&region);
        let order = node_order(&topology, Some(&region));
        assert_eq!(order[..first.len()], first[..], "its region's nodes first");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, all, "every node, once");
    }

    #[tokio::test]
    async fn a_gateway_refuses_to_start_in_an_unknown_region_or_with_no_queue() {
        let topology = Arc::new(Topology::local(20_000, 4));
        let config = GatewayConfig { region: Some("atlantis".into()), ..GatewayConfig::new(topology.clone()) };
        assert!(
            matches!(Gateway::start(config), Err(GatewayStartError::UnknownRegion(region)) if region == "atlantis")
        );
        let config = GatewayConfig { queue_parts_max: 0, ..GatewayConfig::new(topology) };
        assert!(matches!(Gateway::start(config), Err(GatewayStartError::Config(_))));
    }
}
