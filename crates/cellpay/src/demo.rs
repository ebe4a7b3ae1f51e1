//! `cellpay demo`: a local five-node cluster (3 regions, 5 datacenters, one
//! node per datacenter, emulated inter-region latency) and a gateway in one
//! process, with a steady payment workload through the gateway and a live
//! summary: throughput, latency, result codes, the share of payments between
//! cells, and where each cell's leader is.
//!
//! The nodes are real nodes (each with its data directory, write-ahead log,
//! stores, peer transport over loopback TCP and client API), and the gateway
//! is the one `cellpay gateway` runs (it serves its API on a port too); only
//! the process is shared. Every node also hosts the global cell (the routing
//! table the gateway watches). The topology is written to `DATA/cluster.toml`
//! on the first run and reused when the demo resumes.
//!
//! The workload is a small payment company: customers (who cannot overdraw),
//! merchants, and a bank account that funds customers, spread over the cells
//! by user. Every tick sends one batch per cell, through the gateway, mixing
//! card payments (customer → merchant), two-phase card authorisations
//! (pending, then posted or voided a tick later), linked payment-plus-fee
//! chains, and, at the `--cross-cell` share, payments to a merchant of
//! another cell (a try/confirm/cancel operation between the two cells), a
//! fifth of them authorisations (reserved in both cells, then posted or
//! voided in both). Fee chains stay inside the customer's cell. Some payments fail with
//! `exceeds_credits`, as they would in life; the summary shows results by
//! code. Every few seconds the demo audits that every cell conserves money.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cellpay_cluster::ledgers::LedgerDefinition;
use cellpay_cluster::topology::{CellId, Latency, Topology};
use cellpay_ledger::{
    id, Account, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags, BATCH_EVENTS_MAX,
};
use cellpay_server::front::{serve, FrontLimits};
use cellpay_server::gateway::{Gateway, GatewayConfig, GatewayHandle};
use cellpay_server::node::{Node, NodeConfig, NodeHandle, Reply, Request};
use hdrhistogram::Histogram;

use crate::bench::Rng;
use crate::server::{shutdown_signal, start_node};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Data directory; running again resumes from it.
    #[arg(long, default_value = "cellpay-demo-data")]
    pub data: PathBuf,
    /// Delete the data directory first and start over.
    #[arg(long)]
    pub fresh: bool,
    /// Node i serves peers on BASE + 2(i-1) and clients (REST and gRPC) on
    /// BASE + 2(i-1) + 1; the gateway serves on BASE + 10. 0 picks free
    /// ports. The nodes' ports are fixed when the cluster is created (a
    /// resumed demo keeps them); the gateway's is taken at every start.
    #[arg(long, default_value_t = 7400)]
    pub base_port: u16,
    /// Cells to split the 100 shards into (at least 2).
    #[arg(long, default_value_t = 4)]
    pub cells: u32,
    /// Turn the emulated inter-region latency off.
    #[arg(long)]
    pub no_latency: bool,
    /// Transfers per second the workload aims for.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// The percentage (0 to 100) of new payments that go to a merchant of
    /// another cell than the customer's.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub cross_cell: u8,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration_s: Option<u64>,
}

const LEDGER: u32 = 1;
const CUSTOMERS: u64 = 10_000;
const MERCHANTS: u64 = 100;
const TICK: Duration = Duration::from_millis(100);
/// The gateway's port after the base port: the five nodes take ten.
const GATEWAY_PORT_OFFSET: u16 = 10;

/// One cell's share of the payment company: its customers, merchants and
/// bank account are users whose shards the cell owns; `clearing` are the
/// cell's clearing accounts for every other cell, which a cross-cell
/// payment's leg in this cell debits or credits.
struct CellAccounts {
    cell: CellId,
    customers: Vec<u128>,
    merchants: Vec<u128>,
    bank: u128,
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

fn accounts_by_cell(topology: &Topology) -> Result<Vec<CellAccounts>> {
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

/// The demo's cluster: five nodes and a gateway in this process.
struct Cluster {
    topology: Arc<Topology>,
    nodes: Vec<Node>,
    handles: Vec<NodeHandle>,
    gateway: Gateway,
}

impl Cluster {
    /// Sends a request through the gateway, which splits it by cell and
    /// sends the parts to the cells' leaders.
    async fn submit(&self, request: Request) -> Result<Reply> {
        submit(&self.gateway.handle(), request).await
    }

    fn leaders_line(&self) -> String {
        let cells = self.topology.cells.iter().map(|cell| {
            let leader = self.handles.iter().find_map(|handle| handle.status().cell(cell.id).and_then(|s| s.leader));
            match leader.and_then(|node| self.topology.location(node).map(|l| (node, l))) {
                Some((node, place)) => format!("cell {}: node {node} ({}/{})", cell.id, place.region, place.datacenter),
                None => format!("cell {}: electing", cell.id),
            }
        });
        cells.collect::<Vec<_>>().join(", ")
    }
}

async fn submit(gateway: &GatewayHandle, request: Request) -> Result<Reply> {
    gateway.submit(request).await.map_err(|error| anyhow!("the gateway refused a request: {error}"))
}

/// A topology with free ports for the five nodes.
fn free_ports_topology(cells: u32) -> Result<Topology> {
    // Ten consecutive free ports are not guaranteed; ten free ports are, if
    // every listener is held until all are bound (a port freed at once can
    // be handed out again).
    let listeners: Vec<std::net::TcpListener> =
        (0..10).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<_>>()?;
    let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<std::io::Result<_>>()?;
    drop(listeners);
    let local = Topology::try_local(7400, cells)?;
    let regions = local
        .regions
        .iter()
        .map(|region| {
            let mut region = region.clone();
            for datacenter in &mut region.datacenters {
                for node in &mut datacenter.nodes {
                    let slot = 2 * (node.id as usize - 1);
                    node.peer_address.set_port(ports[slot]);
                    node.client_address.set_port(ports[slot + 1]);
                }
            }
            region
        })
        .collect();
    Ok(Topology::new(local.shards, local.latency, regions, local.cells.clone())?.with_ledgers(local.ledgers.clone())?)
}

/// The topology of the demo in `data`: the saved one, or a new one saved there.
fn demo_topology(args: &DemoArgs) -> Result<Topology> {
    let path = args.data.join("cluster.toml");
    if path.exists() {
        let saved = Topology::load(&path)?;
        // Saved before ledger definitions: the demo's ledger was defined implicitly then.
        if saved.ledgers.is_empty() {
            return Ok(saved.with_ledgers(vec![LedgerDefinition::local()])?);
        }
        return Ok(saved);
    }
    let mut topology = if args.base_port == 0 {
        free_ports_topology(args.cells)?
    } else {
        Topology::try_local(args.base_port, args.cells)?
    };
    if args.no_latency {
        let ledgers = topology.ledgers;
        topology = Topology::new(topology.shards, Latency::DISABLED, topology.regions, topology.cells)?
            .with_ledgers(ledgers)?;
    }
    std::fs::create_dir_all(&args.data).with_context(|| format!("cannot create {}", args.data.display()))?;
    std::fs::write(&path, topology.to_toml()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(topology)
}

/// Where the gateway listens: `base_port + 10`, or a free port with 0.
fn gateway_address(base_port: u16) -> Result<SocketAddr> {
    let port = match base_port {
        0 => 0,
        base => base.checked_add(GATEWAY_PORT_OFFSET).context("--base-port is too high for the gateway's port")?,
    };
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

pub async fn run(args: DemoArgs) -> Result<()> {
    if args.fresh && args.data.exists() {
        std::fs::remove_dir_all(&args.data).with_context(|| format!("cannot remove {}", args.data.display()))?;
    }
    let topology = Arc::new(demo_topology(&args)?);
    let cells = accounts_by_cell(&topology)?;
    let mut nodes = Vec::new();
    let mut fronts = Vec::new();
    let (stop_fronts, fronts_stopped) = tokio::sync::watch::channel(false);
    let stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    for spec in topology.nodes() {
        let listener = tokio::net::TcpListener::bind(spec.client_address)
            .await
            .with_context(|| format!("cannot listen on {}", spec.client_address))?;
        let config = NodeConfig::cluster(args.data.join(format!("node{}", spec.id)), topology.clone(), spec.id);
        let node = start_node(config)?;
        let shutdown = stopped(fronts_stopped.clone());
        fronts.push(tokio::spawn(serve(listener, node.handle(), FrontLimits::default(), shutdown)));
        nodes.push(node);
    }
    let gateway_address = gateway_address(args.base_port)?;
    let listener = tokio::net::TcpListener::bind(gateway_address)
        .await
        .with_context(|| format!("cannot listen on {gateway_address} for the gateway"))?;
    let gateway_address = listener.local_addr()?;
    let gateway = Gateway::start(GatewayConfig::new(topology.clone())).context("cannot start the gateway")?;
    let shutdown = stopped(fronts_stopped.clone());
    let gateway_front = tokio::spawn(serve(listener, gateway.handle(), FrontLimits::default(), shutdown));
    let handles = nodes.iter().map(Node::handle).collect();
    let cluster = Cluster { topology: topology.clone(), nodes, handles, gateway };
    let latency = topology.latency;
    println!(
        "cellpay demo: {} nodes in {} regions, {} cells over {} shards and the global cell, a gateway, data in {}",
        topology.nodes().count(),
        topology.regions.len(),
        topology.cells.len(),
        topology.shards,
        args.data.display()
    );
    if latency.enabled {
        println!(
            "emulated one-way latency: {} us within a datacenter, {} us within a region, {} us across regions",
            latency.same_datacenter_us, latency.same_region_us, latency.cross_region_us
        );
    }
    for region in &topology.regions {
        for datacenter in &region.datacenters {
            for node in &datacenter.nodes {
                println!("  node {} in {}/{}: API on {}", node.id, region.name, datacenter.name, node.client_address);
            }
        }
    }
    println!("  gateway: API on {gateway_address} (the workload goes through it)");
    println!("try: cellpay ctl topology --cluster {}", args.data.join("cluster.toml").display());
    println!("try: cellpay lookup account {} --address {gateway_address}", cells[0].bank);

    let outcome = async {
        setup(&cluster, &cells).await?;
        tokio::select! {
            result = workload(&cluster, &cells, &args) => result,
            _ = shutdown_signal() => Ok(()),
        }
    }
    .await;
    println!("stopping: auditing, then writing a checkpoint of every cell");
    let audit = audit(&cluster, &cells).await;
    let _ = stop_fronts.send(true);
    // The gateway first: the nodes' front ends finish the requests in
    // flight before they stop, and its routing watch is one (a long poll).
    gateway_front.await??;
    let Cluster { nodes, handles, gateway, .. } = cluster;
    gateway.shutdown();
    for front in fronts {
        front.await??;
    }
    drop(handles);
    tokio::task::spawn_blocking(move || nodes.into_iter().for_each(Node::shutdown)).await?;
    outcome?;
    let broken = audit?;
    ensure!(broken.is_empty(), "audit failed: cells {broken:?} do not conserve money");
    println!(
        "audit: every account conserves money (Σ debits = Σ credits, posted and pending, in every cell, its clearing \
         accounts included)"
    );
    Ok(())
}

/// Creates the accounts (idempotently, cell by cell) and funds customers that have no money yet.
async fn setup(cluster: &Cluster, cells: &[CellAccounts]) -> Result<()> {
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

/// What the workload has seen: results since the start, latency in the current second.
struct Stats {
    results: BTreeMap<&'static str, u64>,
    cross_cell_sent: u64,
    cross_cell_ok: u64,
    latency: Histogram<u64>,
    /// When the current second began, and the transfers answered since.
    window: (Instant, u64),
}

impl Stats {
    fn new() -> Result<Stats> {
        let latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        Ok(Stats {
            results: BTreeMap::new(),
            cross_cell_sent: 0,
            cross_cell_ok: 0,
            latency,
            window: (Instant::now(), 0),
        })
    }

    fn record(&mut self, batch: &CellBatch, results: &[CreateTransferResult], elapsed: Duration) {
        self.latency.saturating_record(elapsed.as_micros() as u64);
        for result in results {
            *self.results.entry(result.as_str()).or_default() += 1;
        }
        self.cross_cell_sent += batch.cross_cell.len() as u64;
        self.cross_cell_ok +=
            batch.cross_cell.iter().filter(|&&at| results[at] == CreateTransferResult::Ok).count() as u64;
        self.window.1 += batch.transfers.len() as u64;
    }

    /// The live summary's line for the current second.
    fn line(&self, seconds: u64) -> String {
        let rate = self.window.1 as f64 / self.window.0.elapsed().as_secs_f64();
        let ok = self.results.get("ok").copied().unwrap_or(0);
        let total: u64 = self.results.values().sum();
        let cross_cell_share = 100.0 * self.cross_cell_sent as f64 / total.max(1) as f64;
        let others: Vec<String> =
            self.results.iter().filter(|(code, _)| **code != "ok").map(|(code, n)| format!("{code}={n}")).collect();
        format!(
            "[{seconds:>4}s] {rate:>8.0} transfers/s  batch p50 {:>6.2} ms  p99 {:>6.2} ms  ok {ok}/{total}  \
             cross-cell {cross_cell_share:.1}% of transfers ({}/{} ok)  {}",
            self.latency.value_at_quantile(0.5) as f64 / 1000.0,
            self.latency.value_at_quantile(0.99) as f64 / 1000.0,
            self.cross_cell_ok,
            self.cross_cell_sent,
            others.join(" "),
        )
    }

    fn next_window(&mut self) {
        self.latency.reset();
        self.window = (Instant::now(), 0);
    }
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
/// the cell's next batch.
fn answered(answered: Answered, stats: &mut Stats, authorised: &mut [Vec<Authorisation>]) -> Result<()> {
    let Answered { index, batch, reply, elapsed } = answered;
    let Reply::CreateTransfers(results) = reply? else { bail!("unexpected reply") };
    let (results_count, transfers_count) = (results.len(), batch.transfers.len());
    ensure!(results_count == transfers_count, "{results_count} results for {transfers_count} transfers");
    stats.record(&batch, &results, elapsed);
    let accepted = batch.authorisations.iter().filter(|(at, _)| results[*at] == CreateTransferResult::Ok);
    authorised[index].extend(accepted.map(|(_, authorisation)| *authorisation));
    Ok(())
}

async fn workload(cluster: &Cluster, cells: &[CellAccounts], args: &DemoArgs) -> Result<()> {
    let started = Instant::now();
    let per_tick = (args.rate * TICK.as_millis() as u64 / 1000).max(4 * cells.len() as u64);
    let per_cell = (per_tick as usize / cells.len()).clamp(4, BATCH_EVENTS_MAX - 8);
    let mut rng = Rng::new(0xC0FFEE);
    let mut id_next = u128::from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64) << 64;
    let mut authorised: Vec<Vec<Authorisation>> = cells.iter().map(|_| Vec::new()).collect();
    let mut stats = Stats::new()?;
    let mut in_flight: tokio::task::JoinSet<Answered> = tokio::task::JoinSet::new();
    let mut ticker = tokio::time::interval(TICK);
    let mut seconds = 0u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                answered(done?, &mut stats, &mut authorised)?;
                continue;
            }
        }
        if args.duration_s.is_some_and(|limit| started.elapsed().as_secs() >= limit) {
            while let Some(done) = in_flight.join_next().await {
                answered(done?, &mut stats, &mut authorised)?;
            }
            return Ok(());
        }
        while in_flight.len() >= TICKS_IN_FLIGHT_MAX * cells.len() {
            let done = in_flight.join_next().await.expect("batches in flight");
            answered(done?, &mut stats, &mut authorised)?;
        }
        // One batch per cell, sent through the gateway at once.
        for (index, authorised) in authorised.iter_mut().enumerate() {
            let batch = cell_batch(cells, index, per_cell, authorised, args.cross_cell, &mut rng, &mut id_next);
            let gateway = cluster.gateway.handle();
            in_flight.spawn(async move {
                let sent_at = Instant::now();
                let reply = submit(&gateway, Request::CreateTransfers(batch.transfers.clone())).await;
                Answered { index, batch, reply, elapsed: sent_at.elapsed() }
            });
        }
        if stats.window.0.elapsed() >= Duration::from_secs(1) {
            seconds += 1;
            println!("{}", stats.line(seconds));
            if seconds.is_multiple_of(10) {
                println!("[{seconds:>4}s] leaders: {}", cluster.leaders_line());
                let broken = audit(cluster, cells).await?;
                match broken.is_empty() {
                    true => println!("[{seconds:>4}s] audit: money conserved in every cell"),
                    false => bail!("[{seconds:>4}s] audit: CONSERVATION BROKEN in cells {broken:?}"),
                }
            }
            stats.next_window();
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
async fn audit(cluster: &Cluster, cells: &[CellAccounts]) -> Result<Vec<CellId>> {
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
