//! The demo's workload: a small payment company, its accounts spread over
//! the cells by user, paying through the gateway.
//!
//! Customers (who cannot overdraw), merchants, and a bank account that funds
//! customers, in every cell. Every tick sends one batch per cell, through
//! the gateway, mixing card payments (customer → merchant), two-phase card
//! authorisations (pending, then posted or voided a tick later), linked
//! payment-plus-fee chains, and, at the `--cross-cell` share, payments to a
//! merchant of another cell (a try/confirm/cancel operation between the two
//! cells), a fifth of them authorisations (reserved in both cells, then
//! posted or voided in both). Fee chains stay inside the customer's cell.
//! Some payments fail with `exceeds_credits`, as they would in life.
//!
//! A batch the gateway could not answer (a cell without a leader for longer
//! than the gateway resends, during a drill) is counted as an error and the
//! workload goes on; its authorisations are never resolved and expire.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Result};
use cellpay_cluster::topology::{CellId, Topology};
use cellpay_ledger::{
    id, Account, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags, BATCH_EVENTS_MAX,
};
use cellpay_server::node::{Reply, Request};

use super::board::Board;
use super::Cluster;
use crate::bench::Rng;

pub(super) const LEDGER: u32 = 1;
const CUSTOMERS: u64 = 10_000;
const MERCHANTS: u64 = 100;
const TICK: Duration = Duration::from_millis(100);

/// One cell's share of the payment company: its customers, merchants and
/// bank account are users whose shards the cell owns; `clearing` are the
/// cell's clearing accounts for every other cell, which a cross-cell
/// payment's leg in this cell debits or credits.
pub(super) struct CellAccounts {
    pub(super) cell: CellId,
    customers: Vec<u128>,
    merchants: Vec<u128>,
    pub(super) bank: u128,
    clearing: Vec<u128>,
}

impl CellAccounts {
    /// A merchant, the first ones more often (a few big merchants).
    fn merchant(&self, rng: &mut Rng) -> u128 {
        let merchants = self.merchants.len() as u64;
        self.merchants[rng.below(merchants).min(rng.below(merchants)) as usize]
    }

    /// Every account the audit sums for this cell. The clearing accounts
    /// the cell has not created yet (no cross-cell payment with that peer)
    /// are simply not found.
    fn audited(&self) -> Vec<u128> {
        let users = self.customers.iter().chain(&self.merchants).chain([&self.bank]);
        users.chain(&self.clearing).copied().collect()
    }
}

/// The first `count` users from `first_user` on whose shard `cell` owns.
fn users_of_cell(topology: &Topology, cell: CellId, first_user: u64, count: u64) -> Vec<u128> {
    (first_user..)
        .filter(|&user| topology.cell_of_shard(id::shard_of_user(user, topology.shards)) == Some(cell))
        .take(count as usize)
        .map(|user| id::account_id(user, 1).expect("not reserved"))
        .collect()
}

/// A clearing account's cell number: the ledger's ids hold it in 16 bits.
fn cell_u16(cell: CellId) -> Result<u16> {
    u16::try_from(cell).map_err(|_| anyhow!("cell {cell} has no clearing accounts: cell ids must fit 16 bits"))
}

pub(super) fn accounts_by_cell(topology: &Topology) -> Result<Vec<CellAccounts>> {
    let cells = topology.cells.len() as u64;
    // Each cell's accounts are read in one lookup by the audit (see `audit`).
    ensure!(
        cells >= 2 && CUSTOMERS / cells + MERCHANTS / cells + cells <= BATCH_EVENTS_MAX as u64,
        "the demo needs at least 2 cells (it has {cells}): the audit reads each cell's accounts in one lookup of at \
         most {BATCH_EVENTS_MAX}"
    );
    topology
        .cells
        .iter()
        .map(|cell| {
            let holder = cell_u16(cell.id)?;
            let peers = topology.cells.iter().filter(|peer| peer.id != cell.id);
            let clearing = peers.map(|peer| Ok(id::clearing_account_id(LEDGER, holder, cell_u16(peer.id)?)));
            Ok(CellAccounts {
                cell: cell.id,
                customers: users_of_cell(topology, cell.id, 1_000_000, CUSTOMERS / cells),
                merchants: users_of_cell(topology, cell.id, 2_000_000, MERCHANTS / cells),
                bank: users_of_cell(topology, cell.id, 3_000_000, 1)[0],
                clearing: clearing.collect::<Result<_>>()?,
            })
        })
        .collect()
}

/// Creates the accounts (idempotently, cell by cell) and funds customers that have no money yet.
pub(super) async fn setup(cluster: &Cluster, cells: &[CellAccounts]) -> Result<()> {
    let mut created = 0;
    for cell in cells {
        let mut accounts: Vec<Account> = cell
            .customers
            .iter()
            .map(|&id| Account {
                id,
                ledger: LEDGER,
                code: 1,
                flags: AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
                ..Account::default()
            })
            .collect();
        accounts.extend(cell.merchants.iter().map(|&id| Account { id, ledger: LEDGER, code: 2, ..Account::default() }));
        accounts.push(Account {
            id: cell.bank,
            ledger: LEDGER,
            code: 3,
            flags: AccountFlags::HISTORY,
            ..Account::default()
        });
        let mut created_here = 0;
        for chunk in accounts.chunks(BATCH_EVENTS_MAX) {
            let Reply::CreateAccounts(results) = cluster.submit(Request::CreateAccounts(chunk.to_vec())).await? else {
                bail!("unexpected reply");
            };
            for (account, result) in chunk.iter().zip(results) {
                match result {
                    CreateAccountResult::Ok => created_here += 1,
                    CreateAccountResult::Exists => {}
                    other => bail!("account {} could not be created: {other}", account.id),
                }
            }
        }
        if created_here > 0 {
            // Fund every customer once, with ids derived from the customer, so a rerun never funds twice.
            let deposits: Vec<Transfer> = cell
                .customers
                .iter()
                .map(|&customer| Transfer {
                    id: customer,
                    debit_account_id: cell.bank,
                    credit_account_id: customer,
                    amount: 100_000,
                    ledger: LEDGER,
                    code: 10,
                    ..Transfer::default()
                })
                .collect();
            for chunk in deposits.chunks(BATCH_EVENTS_MAX) {
                cluster.submit(Request::CreateTransfers(chunk.to_vec())).await?;
            }
        }
        created += created_here;
    }
    println!(
        "accounts: {CUSTOMERS} customers, {MERCHANTS} merchants, {} banks, one per cell ({created} created now)",
        cells.len()
    );
    println!("leaders: {}", cluster.leaders_line());
    Ok(())
}

/// A two-phase card authorisation, captured or voided the tick after it is accepted.
#[derive(Clone, Copy)]
struct Authorisation {
    id: u128,
    customer: u128,
    merchant: u128,
}

/// One cell's batch of a tick.
struct CellBatch {
    transfers: Vec<Transfer>,
    /// The authorisations in it, by position: those accepted are resolved next tick.
    authorisations: Vec<(usize, Authorisation)>,
    /// The positions of the payments to a merchant of another cell.
    cross_cell: Vec<usize>,
}

/// One tick's batch for cell `cells[index]`: authorisations accepted since
/// the last tick resolved (captured or voided), then new payments from its
/// customers:
/// with probability `cross_cell_percent` % to a merchant of another cell,
/// otherwise inside the cell a payment, an authorisation or a linked
/// payment-plus-fee chain.
fn cell_batch(
    cells: &[CellAccounts],
    index: usize,
    size: usize,
    authorised: &mut Vec<Authorisation>,
    cross_cell_percent: u8,
    rng: &mut Rng,
    id_next: &mut u128,
) -> CellBatch {
    let cell = &cells[index];
    let mut batch =
        CellBatch { transfers: Vec::with_capacity(size + 1), authorisations: Vec::new(), cross_cell: Vec::new() };
    // At most half the batch resolves authorisations (the oldest first), so
    // a batch stays within `size + 1` events however many answers came in
    // since the last tick; a backlog waits for the next ticks.
    let resolving = authorised.len().min(size / 2);
    for authorisation in authorised.drain(..resolving) {
        *id_next += 1;
        let flags =
            if rng.below(5) == 0 { TransferFlags::VOID_PENDING_TRANSFER } else { TransferFlags::POST_PENDING_TRANSFER };
        // Naming the accounts lets the gateway route it to their cell at once
        // (one naming none costs it a lookup in every cell first).
        batch.transfers.push(Transfer {
            id: *id_next,
            pending_id: authorisation.id,
            debit_account_id: authorisation.customer,
            credit_account_id: authorisation.merchant,
            flags,
            ..Transfer::default()
        });
    }
    while batch.transfers.len() < size {
        let customer = cell.customers[rng.below(cell.customers.len() as u64) as usize];
        let amount = 1 + u128::from(rng.below(2_000));
        *id_next += 1;
        let payment = Transfer {
            id: *id_next,
            debit_account_id: customer,
            credit_account_id: cell.merchant(rng),
            amount,
            ledger: LEDGER,
            code: 20,
            ..Transfer::default()
        };
        if cross_cell_percent > 0 && rng.below(100) < u64::from(cross_cell_percent) {
            assert!(cells.len() >= 2, "a cross-cell payment needs two cells");
            let other = &cells[(index + 1 + rng.below(cells.len() as u64 - 1) as usize) % cells.len()];
            let payment = Transfer { credit_account_id: other.merchant(rng), code: 23, ..payment };
            batch.cross_cell.push(batch.transfers.len());
            if rng.below(5) == 0 {
                // An authorisation across cells: held by the customer's cell, reserved in both.
                let authorisation = Authorisation { id: payment.id, customer, merchant: payment.credit_account_id };
                batch.authorisations.push((batch.transfers.len(), authorisation));
                batch.transfers.push(Transfer { flags: TransferFlags::PENDING, timeout_s: 60, code: 24, ..payment });
            } else {
                batch.transfers.push(payment);
            }
            continue;
        }
        match rng.below(10) {
            0..=6 => batch.transfers.push(payment),
            7 | 8 => {
                let authorisation = Authorisation { id: payment.id, customer, merchant: payment.credit_account_id };
                batch.authorisations.push((batch.transfers.len(), authorisation));
                batch.transfers.push(Transfer { flags: TransferFlags::PENDING, timeout_s: 60, code: 21, ..payment });
            }
            _ => {
                // A payment and its fee to the bank, all or nothing.
                batch.transfers.push(Transfer { flags: TransferFlags::LINKED, ..payment });
                *id_next += 1;
                batch.transfers.push(Transfer {
                    id: *id_next,
                    debit_account_id: customer,
                    credit_account_id: cell.bank,
                    amount: 1 + amount / 100,
                    ledger: LEDGER,
                    code: 22,
                    ..Transfer::default()
                });
            }
        }
    }
    batch
}

/// Ticks whose batches may be in flight at once. A batch with a cross-cell
/// payment is answered after the payment's decision, a few cross-region
/// round trips (about 180 ms with the emulated latency), so later ticks
/// are sent meanwhile to keep the rate; the bound keeps what waits finite
/// when the cluster falls behind (the rate then drops).
const TICKS_IN_FLIGHT_MAX: usize = 8;

/// A batch sent through the gateway, with its answer.
struct Answered {
    /// The batch's cell, in the demo's order.
    index: usize,
    batch: CellBatch,
    reply: Result<Reply>,
    elapsed: Duration,
}

/// Records an answered batch; its accepted authorisations are resolved in
/// the cell's next batch. A failed batch is counted, not fatal.
fn answered(answered: Answered, board: &Board, authorised: &mut [Vec<Authorisation>]) -> Result<()> {
    let Answered { index, batch, reply, elapsed } = answered;
    let results = match reply {
        Ok(Reply::CreateTransfers(results)) => results,
        Ok(_) => bail!("unexpected reply to a batch of transfers"),
        Err(error) => {
            board.record_failure(batch.transfers.len(), &error.to_string());
            return Ok(());
        }
    };
    let (results_count, transfers_count) = (results.len(), batch.transfers.len());
    ensure!(results_count == transfers_count, "{results_count} results for {transfers_count} transfers");
    board.record(&batch.transfers, &batch.cross_cell, &results, elapsed);
    let accepted = batch.authorisations.iter().filter(|(at, _)| results[*at] == CreateTransferResult::Ok);
    authorised[index].extend(accepted.map(|(_, authorisation)| *authorisation));
    Ok(())
}

/// Sends one batch per cell every tick at `rate` transfers/s in all, until
/// `duration_s` passes (or forever); answers are recorded on the board.
pub(super) async fn workload(
    cluster: &Cluster,
    cells: &[CellAccounts],
    board: &Board,
    rate: u64,
    cross_cell: u8,
    duration_s: Option<u64>,
) -> Result<()> {
    let started = Instant::now();
    let per_tick = (rate * TICK.as_millis() as u64 / 1000).max(4 * cells.len() as u64);
    let per_cell = (per_tick as usize / cells.len()).clamp(4, BATCH_EVENTS_MAX - 8);
    let mut rng = Rng::new(0xC0FFEE);
    let mut id_next = u128::from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64) << 64;
    let mut authorised: Vec<Vec<Authorisation>> = cells.iter().map(|_| Vec::new()).collect();
    let mut in_flight: tokio::task::JoinSet<Answered> = tokio::task::JoinSet::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                answered(done?, board, &mut authorised)?;
                continue;
            }
        }
        if duration_s.is_some_and(|limit| started.elapsed().as_secs() >= limit) {
            while let Some(done) = in_flight.join_next().await {
                answered(done?, board, &mut authorised)?;
            }
            return Ok(());
        }
        while in_flight.len() >= TICKS_IN_FLIGHT_MAX * cells.len() {
            let done = in_flight.join_next().await.expect("batches in flight");
            answered(done?, board, &mut authorised)?;
        }
        // One batch per cell, sent through the gateway at once.
        for (index, authorised) in authorised.iter_mut().enumerate() {
            let batch = cell_batch(cells, index, per_cell, authorised, cross_cell, &mut rng, &mut id_next);
            let gateway = cluster.gateway.clone();
            in_flight.spawn(async move {
                let sent_at = Instant::now();
                let reply = super::submit(&gateway, Request::CreateTransfers(batch.transfers.clone())).await;
                Answered { index, batch, reply, elapsed: sent_at.elapsed() }
            });
        }
    }
}

/// The cells whose accounts do not conserve money (none, or it is a bug).
///
/// Every entry of a cell's log conserves money on its own, once its
/// clearing accounts are counted: a payment to another cell debits the
/// customer and credits the clearing account for the merchant's cell in the
/// customer's cell, and debits the clearing account for the customer's cell
/// and credits the merchant in the merchant's. So per cell Σ debits =
/// Σ credits, posted and pending, at every point of its log, with payments
/// in flight between cells. The check is exact because each cell's
/// accounts are read in one lookup: the gateway sends it whole to the
/// cell's leader, which answers from one point of its log.
pub(super) async fn audit(cluster: &Cluster, cells: &[CellAccounts]) -> Result<Vec<CellId>> {
    let mut broken = Vec::new();
    for cell in cells {
        let ids = cell.audited();
        assert!(ids.len() <= BATCH_EVENTS_MAX, "accounts_by_cell keeps a cell's accounts to one lookup");
        let Reply::Accounts(accounts) = cluster.submit(Request::LookupAccounts(ids)).await? else {
            bail!("unexpected reply");
        };
        let users = cell.customers.len() + cell.merchants.len() + 1;
        let users_found = accounts.iter().filter(|a| !id::is_clearing_account(a.id)).count();
        ensure!(users_found == users, "cell {}: {users_found} of its {users} accounts found", cell.cell);
        let (mut debits, mut credits, mut debits_pending, mut credits_pending) = (0u128, 0u128, 0u128, 0u128);
        for a in &accounts {
            debits += a.debits_posted;
            credits += a.credits_posted;
            debits_pending += a.debits_pending;
            credits_pending += a.credits_pending;
        }
        if debits != credits || debits_pending != credits_pending {
            broken.push(cell.cell);
        }
    }
    Ok(broken)
}

/// Audits every `every` until the demo stops: a failed lookup (a cell
/// electing) is reported and retried next time; broken conservation ends
/// the demo with an error.
pub(super) async fn audit_every(cluster: Arc<Cluster>, cells: Arc<Vec<CellAccounts>>, every: Duration) -> Result<()> {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let seconds = cluster.started.elapsed().as_secs();
        println!("[{seconds:>4}s] leaders: {}", cluster.leaders_line());
        match audit(&cluster, &cells).await {
            Ok(broken) if broken.is_empty() => println!("[{seconds:>4}s] audit: money conserved in every cell"),
            Ok(broken) => bail!("[{seconds:>4}s] audit: CONSERVATION BROKEN in cells {broken:?}"),
            Err(error) => println!("[{seconds:>4}s] audit: not done this time ({error:#})"),
        }
    }
}
