//! The clients: each works in one cell's accounts, sends batches to its cell
//! (transfers, two-phase transfers with post, void and timeouts, linked
//! chains, and about a third of the events cross-cell: transfers, pending
//! transfers and linked chains paying users of other cells, a chain
//! sometimes two users of two other cells, and one payment across cells in
//! twenty an account nobody opened, which its cell refuses so that the
//! whole operation is cancelled) and lookups, and retries a batch with the
//! same ids after a timeout, a crash or a refusal until it is answered.
//!
//! A client sends either straight to a node for its cell (to the leader it
//! learned, else any node) or, a gateway client, through one of the
//! simulated gateways (`gateway.rs`), chosen per request. Gateway clients
//! also open a user in every shard the mover releases (in the cell the shard
//! moves to), once the old owner has released it (an account there before
//! would block the move), and use it like their other users: their batches
//! span cells, and a gateway whose table predates the move sends its events
//! to the old owner, which refuses them.

use std::collections::BTreeMap;

use cellpay_cluster::topology::{CellId, NodeId, Topology};
use cellpay_ledger::id::{account_id, user_of_account};
use cellpay_ledger::{Account, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags};
use cellpay_server::node::{NodeError, Reply, Request};
use tokio::sync::oneshot;

use crate::rng::Rng;

pub const LEDGER: u32 = 1;
/// Accounts a client owns besides the cell's bank account.
pub const USERS_PER_CELL: usize = 6;
/// How long a client waits for an answer before it retries (virtual).
pub const CLIENT_TIMEOUT_NS: u64 = 3_000_000_000;
/// How long a client waits before retrying a refused request.
pub const RETRY_BACKOFF_NS: u64 = 50_000_000;
/// One payment across cells in this many goes to an account nobody opened.
pub const UNKNOWN_PAYEE_IN: u64 = 20;
/// Events in a client's batch, at most.
pub const BATCH_EVENTS_MAX: u64 = 8;

/// Everything the clients were told, for the checkers.
#[derive(Default)]
pub struct Book {
    /// Every transfer sent, by id (the same every attempt), with its cell.
    pub sent: BTreeMap<u128, (CellId, Transfer)>,
    /// Every answer a transfer got, in order.
    pub results: BTreeMap<u128, Vec<CreateTransferResult>>,
    /// The cell of every account.
    pub accounts: BTreeMap<u128, CellId>,
    /// Lookups of acknowledged transfers that did not find them, and where they were sent.
    pub lookups_missing: Vec<(u128, Target)>,
    pub batches_acknowledged: u64,
    pub retries: u64,
}

impl Book {
    /// Whether a transfer was acknowledged as applied (`ok`, or `exists` on a retry).
    pub fn acknowledged(&self, id: u128) -> bool {
        self.results
            .get(&id)
            .is_some_and(|r| r.iter().any(|r| matches!(r, CreateTransferResult::Ok | CreateTransferResult::Exists)))
    }
}

enum Phase {
    /// The cell's accounts are not all created yet.
    Setup,
    Idle,
    Waiting {
        request: Request,
        answer: oneshot::Receiver<Result<Reply, NodeError>>,
        to: Target,
        deadline: u64,
    },
    /// A request to send again at `at`.
    Retry {
        request: Request,
        at: u64,
    },
}

pub struct Client {
    pub id: u64,
    pub cell: CellId,
    /// Sends through the gateways rather than to nodes.
    pub via_gateway: bool,
    bank: u128,
    users: Vec<u128>,
    /// The users of other cells' shards among `users`, and their cells.
    away: BTreeMap<u128, CellId>,
    /// Users of moved shards to open (account, cell), before they are used.
    unopened: Vec<(u128, CellId)>,
    /// Users of other cells' clients: the credit side of cross-cell transfers.
    foreign: Vec<u128>,
    rng: Rng,
    phase: Phase,
    leader_hint: Option<NodeId>,
    sequence: u64,
    /// Pending transfers acknowledged and not yet resolved by this client,
    /// with their debit account's cell (where they are held).
    pending: Vec<(u128, CellId)>,
    /// Virtual time this client's current request was first sent.
    pub waiting_since: Option<u64>,
    /// Requests answered (applied or found), all kinds.
    pub answered: u64,
    pub stopped: bool,
}

/// Where a client sends a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Node(NodeId),
    /// A gateway, by index.
    Gateway(usize),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Node(node) => write!(f, "node {node}"),
            Target::Gateway(gateway) => write!(f, "gateway {gateway}"),
        }
    }
}

/// What a client wants the simulator to do.
pub enum Action {
    Nothing,
    Send { to: Target, request: Request },
}

impl Client {
    pub fn new(id: u64, cell: CellId, topology: &Topology, rng: Rng) -> Client {
        // Users whose shard the cell owns; the client's id keeps them apart.
        let users: Vec<u64> = (1..)
            .map(|i| i * crate::CLIENTS + id)
            .filter(|&user| topology.cell_of_shard((user % u64::from(topology.shards)) as u32) == Some(cell))
            .take(USERS_PER_CELL + 1)
            .collect();
        let account = |user: u64| account_id(user, 1).expect("a valid id");
        Client {
            id,
            cell,
            via_gateway: false,
            bank: account(users[0]),
            users: users[1..].iter().map(|&u| account(u)).collect(),
            away: BTreeMap::new(),
            unopened: Vec::new(),
            foreign: Vec::new(),
            rng,
            phase: Phase::Setup,
            leader_hint: None,
            sequence: 0,
            pending: Vec::new(),
            waiting_since: None,
            answered: 0,
            stopped: false,
        }
    }

    pub fn users(&self) -> &[u128] {
        &self.users
    }

    /// The users this client pays across cells.
    pub fn set_foreign(&mut self, foreign: Vec<u128>) {
        self.foreign = foreign;
    }

    pub fn accounts(&self) -> impl Iterator<Item = u128> + '_ {
        std::iter::once(self.bank).chain(self.users.iter().copied())
    }

    pub fn is_waiting(&self) -> bool {
        matches!(self.phase, Phase::Waiting { .. } | Phase::Retry { .. })
    }

    /// Where the next request goes: one of the gateways, or the node the
    /// client believes leads its cell (any node if it knows none).
    fn target(&mut self, nodes: &[NodeId]) -> Target {
        if self.via_gateway {
            return Target::Gateway(self.rng.below(crate::gateway::GATEWAYS as u64) as usize);
        }
        match self.leader_hint {
            Some(node) => Target::Node(node),
            None => Target::Node(nodes[self.rng.below(nodes.len() as u64) as usize]),
        }
    }

    /// Opens a user in `shard`, which cell `cell` is taking over (after its
    /// old owner released it), unless the client has stopped.
    pub fn adopt(&mut self, shard: u32, shards: u32, cell: CellId) {
        if self.stopped {
            return;
        }
        // Users the mover's accounts (1_000_000 + n shards up) never take.
        let user = u64::from(shard) + u64::from(shards) * (2_000_000 + self.id);
        self.unopened.push((account_id(user, 1).expect("a valid id"), cell));
    }

    /// The cell of one of this client's accounts.
    fn cell_of(&self, account: u128) -> CellId {
        self.away.get(&account).copied().unwrap_or(self.cell)
    }

    fn transfer_id(&mut self) -> u128 {
        self.sequence += 1;
        (u128::from(self.id) << 64) | u128::from(self.sequence)
    }

    /// The accounts of `bank` (no limit) and of `users` (debits must not exceed credits).
    fn accounts_request(bank: Option<u128>, users: &[u128]) -> Request {
        let account =
            |id: u128, flags: AccountFlags| Account { id, ledger: LEDGER, code: 1, flags, ..Account::default() };
        let bank = bank.map(|id| account(id, AccountFlags::default()));
        let users = users.iter().map(|&id| account(id, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS));
        Request::CreateAccounts(bank.into_iter().chain(users).collect())
    }

    fn next_request(&mut self, book: &mut Book) -> Request {
        if !self.unopened.is_empty() {
            let users: Vec<u128> = self.unopened.iter().map(|&(id, _)| id).collect();
            return Client::accounts_request(None, &users);
        }
        // A tenth of the requests look up some of this client's transfers.
        if self.sequence > 0 && self.rng.chance(100_000) {
            let ids = (0..4).map(|_| (u128::from(self.id) << 64) | u128::from(self.rng.between(1, self.sequence)));
            return Request::LookupTransfers(ids.collect());
        }
        let count = self.rng.between(1, BATCH_EVENTS_MAX);
        let mut transfers = Vec::new();
        // The cell of the pending transfer each post or void resolves.
        let mut posts_home: BTreeMap<u128, CellId> = BTreeMap::new();
        while (transfers.len() as u64) < count {
            let roll = self.rng.below(100);
            let id = self.transfer_id();
            let (debit, mut credit) = self.pair();
            // Two thirds of the simple transfers and chains pay a user of another cell.
            let across = !self.foreign.is_empty() && self.rng.chance(650_000);
            let amount = u128::from(self.rng.between(1, 300));
            let base = Transfer {
                id,
                debit_account_id: debit,
                credit_account_id: credit,
                amount,
                ledger: LEDGER,
                code: 1,
                ..Transfer::default()
            };
            if roll < 55 {
                if across {
                    credit = self.payee();
                }
                transfers.push(Transfer { credit_account_id: credit, ..base });
            } else if roll < 70 {
                // Across cells too: held by this cell, posted, voided or expired here, released to the other.
                let timeout_s = if self.rng.chance(500_000) { 0 } else { self.rng.between(1, 4) as u32 };
                if across {
                    credit = self.payee();
                }
                transfers.push(Transfer {
                    flags: TransferFlags::PENDING,
                    timeout_s,
                    credit_account_id: credit,
                    ..base
                });
            } else if roll < 85 && !self.pending.is_empty() {
                let index = self.rng.below(self.pending.len() as u64) as usize;
                let (pending_id, home) = self.pending.swap_remove(index);
                posts_home.insert(id, home);
                let flags = if self.rng.chance(600_000) {
                    TransferFlags::POST_PENDING_TRANSFER
                } else {
                    TransferFlags::VOID_PENDING_TRANSFER
                };
                transfers.push(Transfer { id, pending_id, flags, ledger: LEDGER, code: 1, ..Transfer::default() });
            } else {
                // A linked chain of two: both or neither (across cells too;
                // half of those pay a second user of another cell, so the
                // chain may touch three cells).
                let (debit2, mut credit2) = self.pair();
                let second_id = self.transfer_id();
                if across {
                    credit = self.payee();
                    if self.rng.chance(500_000) {
                        credit2 = self.payee();
                    }
                }
                transfers.push(Transfer { flags: TransferFlags::LINKED, credit_account_id: credit, ..base });
                transfers.push(Transfer {
                    id: second_id,
                    debit_account_id: debit2,
                    credit_account_id: credit2,
                    ..base
                });
            }
        }
        for transfer in &transfers {
            // Its home: its debit account's cell (a post or void: its pending transfer's).
            let home = posts_home.get(&transfer.id).copied().unwrap_or_else(|| self.cell_of(transfer.debit_account_id));
            book.sent.insert(transfer.id, (home, *transfer));
        }
        Request::CreateTransfers(transfers)
    }

    /// A user of another cell to pay; one time in [`UNKNOWN_PAYEE_IN`], an
    /// account nobody opened (that user's second account), which its cell
    /// refuses, so the transfer or chain is cancelled in every cell.
    fn payee(&mut self) -> u128 {
        let user = self.foreign[self.rng.below(self.foreign.len() as u64) as usize];
        if self.rng.below(UNKNOWN_PAYEE_IN) == 0 {
            return account_id(user_of_account(user), 2).expect("a valid id");
        }
        user
    }

    fn pair(&mut self) -> (u128, u128) {
        // A tenth of the transfers fund a user from the bank (no limit).
        if self.rng.chance(100_000) {
            let user = self.users[self.rng.below(self.users.len() as u64) as usize];
            return (self.bank, user);
        }
        let debit = self.rng.below(self.users.len() as u64) as usize;
        let credit = (debit + 1 + self.rng.below(self.users.len() as u64 - 1) as usize) % self.users.len();
        (self.users[debit], self.users[credit])
    }

    /// Called on every simulator step: what the client does now.
    pub fn poll(&mut self, now: u64, nodes: &[NodeId], book: &mut Book) -> Action {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        match phase {
            Phase::Setup => {
                let to = self.target(nodes);
                self.waiting_since = Some(now);
                Action::Send { to, request: Client::accounts_request(Some(self.bank), &self.users) }
            }
            Phase::Idle if self.stopped => Action::Nothing,
            Phase::Idle => {
                let to = self.target(nodes);
                self.waiting_since = Some(now);
                Action::Send { to, request: self.next_request(book) }
            }
            Phase::Retry { request, at } if at <= now => {
                book.retries += 1;
                let to = self.target(nodes);
                Action::Send { to, request }
            }
            phase @ Phase::Retry { .. } => {
                self.phase = phase;
                Action::Nothing
            }
            Phase::Waiting { request, mut answer, to, deadline } => match answer.try_recv() {
                Ok(result) => {
                    self.answered(now, request, to, result, book);
                    Action::Nothing
                }
                Err(oneshot::error::TryRecvError::Empty) if now < deadline => {
                    self.phase = Phase::Waiting { request, answer, to, deadline };
                    Action::Nothing
                }
                // No answer in time, or the node crashed: the outcome is unknown; same ids again.
                Err(_) => {
                    self.leader_hint = None;
                    self.phase = Phase::Retry { request, at: now };
                    Action::Nothing
                }
            },
        }
    }

    /// The simulator sent `request` to `to`.
    pub fn sent(
        &mut self,
        now: u64,
        to: Target,
        request: Request,
        answer: oneshot::Receiver<Result<Reply, NodeError>>,
    ) {
        self.phase = Phase::Waiting { request, answer, to, deadline: now + CLIENT_TIMEOUT_NS };
    }

    fn answered(&mut self, now: u64, request: Request, to: Target, result: Result<Reply, NodeError>, book: &mut Book) {
        let node = match to {
            Target::Node(node) => Some(node),
            Target::Gateway(_) => None,
        };
        if result.is_ok() {
            self.answered += 1;
        }
        match result {
            Ok(Reply::CreateAccounts(results)) => {
                let created =
                    results.iter().all(|r| matches!(r, CreateAccountResult::Ok | CreateAccountResult::Exists));
                assert!(created, "client {}: the accounts could not be created: {results:?}", self.id);
                let Request::CreateAccounts(accounts) = &request else { unreachable!("an accounts reply") };
                for account in accounts {
                    let opened = self.unopened.iter().position(|&(id, _)| id == account.id);
                    let cell = match opened {
                        Some(position) => {
                            let (id, cell) = self.unopened.remove(position);
                            self.users.push(id);
                            if cell != self.cell {
                                self.away.insert(id, cell);
                            }
                            cell
                        }
                        None => self.cell,
                    };
                    book.accounts.insert(account.id, cell);
                }
                self.leader_hint = node;
                self.waiting_since = None;
            }
            Ok(Reply::CreateTransfers(results)) => {
                let Request::CreateTransfers(transfers) = &request else { unreachable!("a transfers reply") };
                for (transfer, result) in transfers.iter().zip(&results) {
                    book.results.entry(transfer.id).or_default().push(*result);
                    let fresh_pending = transfer.flags.contains(TransferFlags::PENDING)
                        && *result == CreateTransferResult::Ok
                        && !self.pending.iter().any(|&(id, _)| id == transfer.id);
                    if fresh_pending {
                        self.pending.push((transfer.id, self.cell_of(transfer.debit_account_id)));
                    }
                }
                book.batches_acknowledged += 1;
                self.leader_hint = node;
                self.waiting_since = None;
            }
            Ok(Reply::Transfers(found)) => {
                let Request::LookupTransfers(ids) = &request else { unreachable!("a lookup reply") };
                for id in ids {
                    if book.acknowledged(*id) && !found.iter().any(|t| t.id == *id) {
                        book.lookups_missing.push((*id, to));
                    }
                }
                self.leader_hint = node;
                self.waiting_since = None;
            }
            Ok(_) => unreachable!("the clients send no other request"),
            Err(error) => {
                self.leader_hint = match &error {
                    NodeError::NotLeader { leader, .. } => *leader,
                    _ => None,
                };
                // Refused (nothing applied): after a pause; outcome unknown: at once. The same ids.
                let at = if error.nothing_applied() { now + RETRY_BACKOFF_NS } else { now };
                self.phase = Phase::Retry { request, at };
            }
        }
    }
}
