//! `cellpay demo`: a local five-node cluster (3 regions, 5 datacenters, one
//! node per datacenter, emulated inter-region latency) in one process, with a
//! steady payment workload and a live summary: throughput, latency, result
//! codes, and where each cell's leader is.
//!
//! The nodes are real nodes (each with its data directory, write-ahead log,
//! stores, peer transport over loopback TCP and client API); only the process
//! is shared. The topology is written to `DATA/cluster.toml` on the first run
//! and reused when the demo resumes.
//!
//! The workload is a small payment company: customers (who cannot overdraw),
//! merchants, and a bank account that funds customers. Every tick sends one
//! batch mixing card payments (customer → merchant), two-phase card
//! authorisations (pending, then posted or voided a tick later), and linked
//! payment-plus-fee chains. Some payments fail with `exceeds_credits`, as they
//! would in life; the summary shows results by code. Every few seconds the
//! demo audits that all its accounts conserve money.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use cellpay_cluster::topology::{Latency, Topology};
use cellpay_ledger::{
    id, Account, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags, BATCH_EVENTS_MAX,
};
use cellpay_server::front::{serve, FrontLimits};
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
    /// BASE + 2(i-1) + 1. 0 picks free ports. Used when the cluster is
    /// created; a resumed demo keeps its ports.
    #[arg(long, default_value_t = 7400)]
    pub base_port: u16,
    /// Cells to split the 100 shards into.
    #[arg(long, default_value_t = 4)]
    pub cells: u32,
    /// Turn the emulated inter-region latency off.
    #[arg(long)]
    pub no_latency: bool,
    /// Transfers per second the workload aims for.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration_s: Option<u64>,
}

const LEDGER: u32 = 1;
const CUSTOMERS: u64 = 10_000;
const MERCHANTS: u64 = 100;
const TICK: Duration = Duration::from_millis(100);

/// One cell's share of the payment company: its customers, merchants and
/// bank account are users whose shards the cell owns, so every payment stays
/// inside the cell.
struct CellAccounts {
    cell: u64,
    customers: Vec<u128>,
    merchants: Vec<u128>,
    bank: u128,
}

/// The first `count` users from `first_user` on whose shard `cell` owns.
fn users_of_cell(topology: &Topology, cell: u64, first_user: u64, count: u64) -> Vec<u128> {
    (first_user..)
        .filter(|&user| topology.cell_of_shard(id::shard_of_user(user, topology.shards)) == Some(cell))
        .take(count as usize)
        .map(|user| id::account_id(user, 1).expect("not reserved"))
        .collect()
}

fn accounts_by_cell(topology: &Topology) -> Vec<CellAccounts> {
    let cells = topology.cells.len() as u64;
    topology
        .cells
        .iter()
        .map(|cell| CellAccounts {
            cell: cell.id,
            customers: users_of_cell(topology, cell.id, 1_000_000, CUSTOMERS / cells),
            merchants: users_of_cell(topology, cell.id, 2_000_000, MERCHANTS / cells),
            bank: users_of_cell(topology, cell.id, 3_000_000, 1)[0],
        })
        .collect()
}

fn all_accounts(cells: &[CellAccounts]) -> Vec<u128> {
    cells.iter().flat_map(|c| c.customers.iter().chain(&c.merchants).chain([&c.bank])).copied().collect()
}

/// The demo's cluster: five nodes in this process.
struct Cluster {
    topology: Arc<Topology>,
    nodes: Vec<Node>,
    handles: Vec<NodeHandle>,
}

impl Cluster {
    /// The handle of the node that leads `cell` (any node's if none is known:
    /// it waits for an election and forwards).
    fn handle_for(&self, cell: u64) -> &NodeHandle {
        let leader = self.handles.iter().find_map(|handle| handle.status().cell(cell).and_then(|s| s.leader));
        let index = leader.and_then(|leader| self.handles.iter().position(|h| h.node() == leader)).unwrap_or(0);
        &self.handles[index]
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

/// A topology with free ports for the five nodes.
fn free_ports_topology(cells: u32) -> Result<Topology> {
    // Ten consecutive free ports are not guaranteed; ten free ports are.
    let ports: Vec<u16> = (0..10)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
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
    Ok(Topology::new(local.shards, local.latency, regions, local.cells.clone())?)
}

/// The topology of the demo in `data`: the saved one, or a new one saved there.
fn demo_topology(args: &DemoArgs) -> Result<Topology> {
    let path = args.data.join("cluster.toml");
    if path.exists() {
        return Ok(Topology::load(&path)?);
    }
    let mut topology = if args.base_port == 0 {
        free_ports_topology(args.cells)?
    } else {
        Topology::try_local(args.base_port, args.cells)?
    };
    if args.no_latency {
        topology = Topology::new(topology.shards, Latency::DISABLED, topology.regions, topology.cells)?;
    }
    std::fs::create_dir_all(&args.data).with_context(|| format!("cannot create {}", args.data.display()))?;
    std::fs::write(&path, topology.to_toml()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(topology)
}

pub async fn run(args: DemoArgs) -> Result<()> {
    if args.fresh && args.data.exists() {
        std::fs::remove_dir_all(&args.data).with_context(|| format!("cannot remove {}", args.data.display()))?;
    }
    let topology = Arc::new(demo_topology(&args)?);
    let mut nodes = Vec::new();
    let mut fronts = Vec::new();
    let (stop_fronts, fronts_stopped) = tokio::sync::watch::channel(false);
    for spec in topology.nodes() {
        let listener = tokio::net::TcpListener::bind(spec.client_address)
            .await
            .with_context(|| format!("cannot listen on {}", spec.client_address))?;
        let config = NodeConfig::cluster(args.data.join(format!("node{}", spec.id)), topology.clone(), spec.id);
        let node = start_node(config)?;
        let mut stopped = fronts_stopped.clone();
        fronts.push(tokio::spawn(serve(listener, node.handle(), FrontLimits::default(), async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        })));
        nodes.push(node);
    }
    let handles = nodes.iter().map(Node::handle).collect();
    let cluster = Cluster { topology: topology.clone(), nodes, handles };
    let latency = topology.latency;
    println!(
        "cellpay demo: {} nodes in {} regions, {} cells over {} shards, data in {}",
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
    let cells = accounts_by_cell(&topology);
    let first_node = topology.nodes().next().expect("a node").client_address;
    println!("try: cellpay ctl topology --cluster {}", args.data.join("cluster.toml").display());
    println!("try: cellpay lookup account {} --address {first_node}", cells[0].bank);

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
    for front in fronts {
        front.await??;
    }
    let Cluster { nodes, handles, .. } = cluster;
    drop(handles);
    tokio::task::spawn_blocking(move || nodes.into_iter().for_each(Node::shutdown)).await?;
    outcome?;
    match audit? {
        true => println!("audit: every account conserves money (Σ debits = Σ credits, posted and pending)"),
        false => bail!("audit failed: the demo's accounts do not conserve money"),
    }
    Ok(())
}

async fn submit(handle: &NodeHandle, request: Request) -> Result<Reply> {
    handle.submit(request).await.map_err(|error| anyhow::anyhow!("node refused a request: {error}"))
}

/// Creates the accounts (idempotently, cell by cell) and funds customers that have no money yet.
async fn setup(cluster: &Cluster, cells: &[CellAccounts]) -> Result<()> {
    let mut created = 0;
    for cell in cells {
        let handle = cluster.handle_for(cell.cell);
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
            let Reply::CreateAccounts(results) = submit(handle, Request::CreateAccounts(chunk.to_vec())).await? else {
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
                submit(handle, Request::CreateTransfers(chunk.to_vec())).await?;
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

/// One tick's batch for one cell: last tick's authorisations resolved
/// (captured or voided), then new payments, authorisations and linked
/// payment-plus-fee chains between the cell's accounts.
fn cell_batch(
    cell: &CellAccounts,
    size: usize,
    authorised: &mut Vec<u128>,
    rng: &mut Rng,
    id_next: &mut u128,
) -> (Vec<Transfer>, Vec<u128>) {
    let mut batch = Vec::with_capacity(size + authorised.len());
    for pending_id in authorised.drain(..) {
        *id_next += 1;
        let flags =
            if rng.below(5) == 0 { TransferFlags::VOID_PENDING_TRANSFER } else { TransferFlags::POST_PENDING_TRANSFER };
        batch.push(Transfer { id: *id_next, pending_id, flags, ..Transfer::default() });
    }
    let mut pending_ids = Vec::new();
    let (customers, merchants) = (cell.customers.len() as u64, cell.merchants.len() as u64);
    while batch.len() < size {
        let payer = cell.customers[rng.below(customers) as usize];
        let payee = cell.merchants[rng.below(merchants).min(rng.below(merchants)) as usize];
        let amount = 1 + u128::from(rng.below(2_000));
        *id_next += 1;
        let payment = Transfer {
            id: *id_next,
            debit_account_id: payer,
            credit_account_id: payee,
            amount,
            ledger: LEDGER,
            code: 20,
            ..Transfer::default()
        };
        match rng.below(10) {
            0..=6 => batch.push(payment),
            7 | 8 => {
                pending_ids.push(*id_next);
                batch.push(Transfer { flags: TransferFlags::PENDING, timeout_s: 60, code: 21, ..payment });
            }
            _ => {
                // A payment and its fee to the bank, all or nothing.
                batch.push(Transfer { flags: TransferFlags::LINKED, ..payment });
                *id_next += 1;
                batch.push(Transfer {
                    id: *id_next,
                    debit_account_id: payer,
                    credit_account_id: cell.bank,
                    amount: 1 + amount / 100,
                    ledger: LEDGER,
                    code: 22,
                    ..Transfer::default()
                });
            }
        }
    }
    (batch, pending_ids)
}

async fn workload(cluster: &Cluster, cells: &[CellAccounts], args: &DemoArgs) -> Result<()> {
    let started = Instant::now();
    let per_tick = (args.rate * TICK.as_millis() as u64 / 1000).max(4 * cells.len() as u64);
    let per_cell = (per_tick as usize / cells.len()).clamp(4, BATCH_EVENTS_MAX - 8);
    let mut rng = Rng::new(0xC0FFEE);
    let mut id_next = u128::from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64) << 64;
    let mut authorised: Vec<Vec<u128>> = cells.iter().map(|_| Vec::new()).collect();
    let mut results: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut window = (Instant::now(), 0u64);
    let mut ticker = tokio::time::interval(TICK);
    let mut seconds = 0u64;
    loop {
        ticker.tick().await;
        if args.duration_s.is_some_and(|limit| started.elapsed().as_secs() >= limit) {
            return Ok(());
        }
        // One batch per cell, sent to the cells' leaders at once.
        let mut batches = Vec::with_capacity(cells.len());
        for (cell, authorised) in cells.iter().zip(authorised.iter_mut()) {
            batches.push(cell_batch(cell, per_cell, authorised, &mut rng, &mut id_next));
        }
        let replies = futures_join(cells.iter().zip(&batches).map(|(cell, (batch, _))| {
            let handle = cluster.handle_for(cell.cell).clone();
            let request = Request::CreateTransfers(batch.clone());
            async move {
                let started = Instant::now();
                let reply = submit(&handle, request).await;
                (reply, started.elapsed())
            }
        }))
        .await;
        for ((reply, elapsed), ((batch, pending_ids), authorised)) in
            replies.into_iter().zip(batches.iter().zip(authorised.iter_mut()))
        {
            let Reply::CreateTransfers(batch_results) = reply? else { bail!("unexpected reply") };
            latency.saturating_record(elapsed.as_micros() as u64);
            for (transfer, result) in batch.iter().zip(&batch_results) {
                *results.entry(result.as_str()).or_default() += 1;
                if *result == CreateTransferResult::Ok && pending_ids.contains(&transfer.id) {
                    authorised.push(transfer.id);
                }
            }
            window.1 += batch.len() as u64;
        }
        if window.0.elapsed() >= Duration::from_secs(1) {
            seconds += 1;
            let rate = window.1 as f64 / window.0.elapsed().as_secs_f64();
            let ok = results.get("ok").copied().unwrap_or(0);
            let total: u64 = results.values().sum();
            let others: Vec<String> =
                results.iter().filter(|(code, _)| **code != "ok").map(|(code, n)| format!("{code}={n}")).collect();
            println!(
                "[{seconds:>4}s] {rate:>8.0} transfers/s  batch p50 {:>6.2} ms  p99 {:>6.2} ms  ok {ok}/{total}  {}",
                latency.value_at_quantile(0.5) as f64 / 1000.0,
                latency.value_at_quantile(0.99) as f64 / 1000.0,
                others.join(" "),
            );
            if seconds.is_multiple_of(10) {
                println!("[{seconds:>4}s] leaders: {}", cluster.leaders_line());
                let conserved = audit(cluster, cells).await?;
                println!(
                    "[{seconds:>4}s] audit: {}",
                    if conserved { "money conserved" } else { "CONSERVATION BROKEN" }
                );
                if !conserved {
                    bail!("audit failed");
                }
            }
            latency.reset();
            window = (Instant::now(), 0);
        }
    }
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outputs.push(task.await.expect("a demo task panicked"));
    }
    outputs
}

/// True when the demo's accounts conserve money.
async fn audit(cluster: &Cluster, cells: &[CellAccounts]) -> Result<bool> {
    let (mut debits, mut credits, mut debits_pending, mut credits_pending) = (0u128, 0u128, 0u128, 0u128);
    for chunk in all_accounts(cells).chunks(BATCH_EVENTS_MAX) {
        let Reply::Accounts(accounts) = submit(&cluster.handles[0], Request::LookupAccounts(chunk.to_vec())).await?
        else {
            bail!("unexpected reply");
        };
        for a in accounts {
            debits += a.debits_posted;
            credits += a.credits_posted;
            debits_pending += a.debits_pending;
            credits_pending += a.credits_pending;
        }
    }
    Ok(debits == credits && debits_pending == credits_pending)
}
