//! `cellpay demo`: a local five-node cluster (3 regions, 5 datacenters, one
//! node per datacenter, emulated inter-region latency), the global cell, the
//! cells over 100 shards and a gateway in one process, with a steady payment
//! workload through the gateway (see `workload`), a summary printed every
//! second, and a live dashboard served on loopback (see `dashboard`) where
//! a datacenter or a region can be cut off and healed (see `drill`).
//!
//! The nodes are real nodes (each with its data directory, write-ahead log,
//! stores, peer transport over loopback TCP and client API), and the gateway
//! is the one `cellpay gateway` runs (it serves its API on a port too); only
//! the process is shared. The topology is written to `DATA/cluster.toml` on
//! the first run and reused when the demo resumes.
//!
//! `--drill region[:NAME]` runs one drill without a browser: it cuts the
//! target off after a warm-up, waits until every cell commits again (the
//! RTO), keeps the cut a few seconds more, heals, audits (the RPO), prints
//! the results and exits, non-zero if the audit failed.

mod board;
mod dashboard;
mod drill;
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use cellpay_cluster::ledgers::LedgerDefinition;
use cellpay_cluster::topology::{CellId, Latency, NodeId, Topology};
use cellpay_server::front::{serve, FrontLimits};
use cellpay_server::gateway::{Gateway, GatewayConfig, GatewayHandle};
use cellpay_server::node::{CellStatus, NodeConfig, NodeHandle, Reply, Request};

use crate::server::{shutdown_signal, start_node};
use board::Board;
use drill::{Drills, Target};
use workload::{accounts_by_cell, audit, audit_every, setup, workload};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Data directory; running again resumes from it.
    #[arg(long, default_value = "cellpay-demo-data")]
    pub data: PathBuf,
    /// Delete the data directory first and start over.
    #[arg(long)]
    pub fresh: bool,
    /// Node i serves peers on BASE + 2(i-1) and clients (REST and gRPC) on
    /// BASE + 2(i-1) + 1; the gateway serves on BASE + 10 and the dashboard
    /// on BASE + 11. 0 picks free ports. The nodes' ports are fixed when the
    /// cluster is created (a resumed demo keeps them); the gateway's and
    /// the dashboard's are taken at every start.
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
    /// Run one drill and exit: `region` (the region that leads the most
    /// cells), `region:NAME` or `datacenter:NAME`. Exits non-zero if the
    /// audit fails.
    #[arg(long, value_name = "TARGET")]
    pub drill: Option<String>,
    /// With --drill: seconds of load before the cut.
    #[arg(long, default_value_t = 5)]
    pub drill_warm_up_s: u64,
    /// With --drill: seconds the cut lasts after every cell commits again.
    #[arg(long, default_value_t = 5)]
    pub drill_hold_s: u64,
}

/// The gateway's and the dashboard's ports after the base port: the five nodes take ten.
const GATEWAY_PORT_OFFSET: u16 = 10;
const DASHBOARD_PORT_OFFSET: u16 = 11;
/// How often the workload's accounts are audited for conservation.
const AUDIT_EVERY: Duration = Duration::from_secs(10);
/// How long `--drill` waits for every cell to commit again.
const DRILL_RTO_WAIT_MAX: Duration = Duration::from_secs(60);

/// The demo's cluster, shared by the workload, the drills and the dashboard.
struct Cluster {
    started: Instant,
    topology: Arc<Topology>,
    handles: BTreeMap<NodeId, NodeHandle>,
    /// Each node's client API (REST and gRPC): `None` while it is cut.
    fronts: tokio::sync::Mutex<BTreeMap<NodeId, Option<tokio::task::JoinHandle<std::io::Result<()>>>>>,
    /// Stops every front end (the demo is stopping).
    fronts_stopped: tokio::sync::watch::Receiver<bool>,
    gateway: GatewayHandle,
    gateway_address: SocketAddr,
    cut: Mutex<BTreeSet<NodeId>>,
}

impl Cluster {
    /// Sends a request through the gateway, which splits it by cell and
    /// sends the parts to the cells' leaders.
    async fn submit(&self, request: Request) -> Result<Reply> {
        submit(&self.gateway, request).await
    }

    fn handle(&self, node: NodeId) -> &NodeHandle {
        &self.handles[&node]
    }

    /// The global cell and the cells, by id.
    fn cell_ids(&self) -> Vec<CellId> {
        let cells = self.topology.cells.iter().map(|cell| cell.id);
        std::iter::once(self.topology.global().id).chain(cells).collect()
    }

    /// Every node's own status of a cell.
    fn statuses(&self, cell: CellId) -> impl Iterator<Item = (NodeId, CellStatus)> + '_ {
        self.handles.iter().filter_map(move |(&node, handle)| Some((node, handle.status().cell(cell)?)))
    }

    /// The node that leads `cell` in the highest term among the nodes
    /// `among` accepts, by their own status, and that status.
    fn leader(&self, cell: CellId, among: impl Fn(NodeId) -> bool) -> Option<(NodeId, CellStatus)> {
        let leaders = self.statuses(cell).filter(|(node, status)| among(*node) && status.role == "leader");
        leaders.max_by_key(|(_, status)| status.term)
    }

    /// Each cell's commit index, by its leader.
    fn commits(&self) -> BTreeMap<CellId, u64> {
        let leaders = self.cell_ids().into_iter().filter_map(|cell| Some((cell, self.leader(cell, |_| true)?.1)));
        leaders.map(|(cell, status)| (cell, status.commit)).collect()
    }

    fn cut_nodes(&self) -> BTreeSet<NodeId> {
        self.cut.lock().expect("cut lock").clone()
    }

    fn leaders_line(&self) -> String {
        let cells = self.topology.cells.iter().map(|cell| {
            match self.leader(cell.id, |_| true).and_then(|(node, _)| self.topology.location(node).map(|l| (node, l))) {
                Some((node, place)) => format!("cell {}: node {node} ({}/{})", cell.id, place.region, place.datacenter),
                None => format!("cell {}: electing", cell.id),
            }
        });
        cells.collect::<Vec<_>>().join(", ")
    }

    /// Starts serving node `node`'s client API on its address.
    async fn start_front(&self, node: NodeId) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
        let address = self.topology.node(node).context("a node of the topology")?.client_address;
        let listener =
            tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))?;
        let shutdown = stopped(self.fronts_stopped.clone());
        Ok(tokio::spawn(serve(listener, self.handle(node).clone(), FrontLimits::default(), shutdown)))
    }

    /// Drops all traffic to and from `nodes`: their peer links to every
    /// other node are blocked both ways and their client APIs stop.
    async fn cut(&self, nodes: &[NodeId]) {
        self.set_links_blocked(nodes, true);
        self.cut.lock().expect("cut lock").extend(nodes);
        let mut fronts = self.fronts.lock().await;
        for node in nodes {
            if let Some(front) = fronts.get_mut(node).and_then(Option::take) {
                // Aborting drops the listener and every connection at once.
                front.abort();
                let _ = front.await;
            }
        }
    }

    /// Undoes [`Cluster::cut`].
    async fn heal(&self, nodes: &[NodeId]) {
        self.set_links_blocked(nodes, false);
        let mut fronts = self.fronts.lock().await;
        for &node in nodes {
            match self.start_front(node).await {
                Ok(front) => {
                    fronts.insert(node, Some(front));
                }
                Err(error) => eprintln!("node {node}: its client API did not restart: {error:#}"),
            }
        }
        self.cut.lock().expect("cut lock").retain(|node| !nodes.contains(node));
    }

    fn set_links_blocked(&self, nodes: &[NodeId], blocked: bool) {
        for &inside in nodes {
            for (&other, handle) in &self.handles {
                if !nodes.contains(&other) {
                    handle.set_link_blocked(inside, blocked);
                    self.handle(inside).set_link_blocked(other, blocked);
                }
            }
        }
    }
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

/// Sends a request through a gateway.
async fn submit(gateway: &GatewayHandle, request: Request) -> Result<Reply> {
    gateway.submit(request).await.map_err(|error| anyhow!("the gateway refused a request: {error}"))
}

/// Resolves once the demo is stopping.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Where the dashboard listens: `base_port + 11`, or a free port with 0.
fn dashboard_address(base_port: u16) -> Result<SocketAddr> {
    let port = match base_port {
        0 => 0,
        base => base.checked_add(DASHBOARD_PORT_OFFSET).context("--base-port is too high for the dashboard's port")?,
    };
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    if args.fresh && args.data.exists() {
        std::fs::remove_dir_all(&args.data).with_context(|| format!("cannot remove {}", args.data.display()))?;
    }
    let topology = Arc::new(demo_topology(&args)?);
    let cells = Arc::new(accounts_by_cell(&topology)?);
    let dashboard_listener = tokio::net::TcpListener::bind(dashboard_address(args.base_port)?)
        .await
        .context("cannot listen for the dashboard (is another demo running? see --base-port)")?;
    let dashboard_address = dashboard_listener.local_addr()?;
    let mut nodes = Vec::new();
    for spec in topology.nodes() {
        let config = NodeConfig::cluster(args.data.join(format!("node{}", spec.id)), topology.clone(), spec.id);
        nodes.push((spec.id, start_node(config)?));
    }
    let gateway_address = gateway_address(args.base_port)?;
    let gateway_listener = tokio::net::TcpListener::bind(gateway_address)
        .await
        .with_context(|| format!("cannot listen on {gateway_address} for the gateway"))?;
    let gateway_address = gateway_listener.local_addr()?;
    let gateway = Gateway::start(GatewayConfig::new(topology.clone())).context("cannot start the gateway")?;
    let (stop_fronts, fronts_stopped) = tokio::sync::watch::channel(false);
    let cluster = Arc::new(Cluster {
        started,
        topology: topology.clone(),
        handles: nodes.iter().map(|(id, node)| (*id, node.handle())).collect(),
        fronts: tokio::sync::Mutex::default(),
        fronts_stopped: fronts_stopped.clone(),
        gateway: gateway.handle(),
        gateway_address,
        cut: Mutex::default(),
    });
    for (node, _) in &nodes {
        let front = cluster.start_front(*node).await?;
        cluster.fronts.lock().await.insert(*node, Some(front));
    }
    let shutdown = stopped(fronts_stopped.clone());
    let gateway_front = tokio::spawn(serve(gateway_listener, gateway.handle(), FrontLimits::default(), shutdown));
    let board = Arc::new(Board::new(started)?);
    let drills = Arc::new(Drills::new(cluster.clone(), board.clone(), cells.clone()));
    let shutdown = stopped(fronts_stopped.clone());
    let dashboard =
        tokio::spawn(dashboard::serve(dashboard_listener, cluster.clone(), board.clone(), drills.clone(), shutdown));
    print_cluster(&cluster, &args, cells[0].bank);
    println!("dashboard: http://{dashboard_address}/ (the cluster live; cut and heal a region there)");

    let outcome = async {
        setup(&cluster, &cells).await?;
        println!("leaders: {}", cluster.leaders_line());
        let sampler = sample_every_second(&cluster, &board);
        let auditor = audit_every(cluster.clone(), cells.clone(), AUDIT_EVERY);
        let load = workload(&cluster, &cells, &board, args.rate, args.cross_cell, args.duration_s);
        let drilled = async {
            match &args.drill {
                Some(spec) => run_drill(&cluster, &drills, spec, &args).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = load => result,
            result = auditor => result,
            () = sampler => Ok(()),
            result = drilled => result,
            _ = shutdown_signal() => Ok(()),
        }
    }
    .await;
    println!("stopping: auditing, then writing a checkpoint of every cell");
    drills.heal_for_shutdown().await;
    let audit = audit(&cluster, &cells).await;
    let _ = stop_fronts.send(true);
    // The gateway first: the nodes' front ends finish the requests in
    // flight before they stop, and its routing watch is one (a long poll).
    gateway_front.await??;
    gateway.shutdown();
    dashboard.await??;
    let fronts: Vec<_> = std::mem::take(&mut *cluster.fronts.lock().await).into_values().flatten().collect();
    for front in fronts {
        front.await??;
    }
    drop(drills);
    drop(cluster);
    tokio::task::spawn_blocking(move || nodes.into_iter().for_each(|(_, node)| node.shutdown())).await?;
    outcome?;
    let broken = audit?;
    ensure!(broken.is_empty(), "audit failed: cells {broken:?} do not conserve money");
    println!(
        "audit: every account conserves money (Σ debits = Σ credits, posted and pending, in every cell, its clearing \
         accounts included)"
    );
    Ok(())
}

fn print_cluster(cluster: &Cluster, args: &DemoArgs, bank: u128) {
    let topology = &cluster.topology;
    println!(
        "cellpay demo: {} nodes in {} regions, {} cells over {} shards and the global cell, a gateway, data in {}",
        topology.nodes().count(),
        topology.regions.len(),
        topology.cells.len(),
        topology.shards,
        args.data.display()
    );
    let latency = topology.latency;
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
    let gateway_address = cluster.gateway_address;
    println!("  gateway: API on {gateway_address} (the workload goes through it)");
    println!("try: cellpay ctl topology --cluster {}", args.data.join("cluster.toml").display());
    println!("try: cellpay lookup account {bank} --address {gateway_address}");
}

/// Every second: the workload's summary line, and a point for the dashboard.
async fn sample_every_second(cluster: &Cluster, board: &Board) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        println!("{}", board.sample(cluster.commits()));
    }
}

/// `--drill`: warm up, cut, wait for the RTO, hold, heal, audit; fails if the audit does.
async fn run_drill(cluster: &Cluster, drills: &Arc<Drills>, spec: &str, args: &DemoArgs) -> Result<()> {
    tokio::time::sleep(Duration::from_secs(args.drill_warm_up_s)).await;
    let target = Target::parse(spec, cluster)?;
    println!("drill: cutting {} off (nodes {:?})", target.spec(), target.nodes(&cluster.topology));
    drills.cut(target).await.map_err(|refused| anyhow!(refused.0))?;
    let deadline = Instant::now() + DRILL_RTO_WAIT_MAX;
    while drills.rto().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(args.drill_hold_s)).await;
    let report = drills.heal().await.map_err(|refused| anyhow!(refused.0))?;
    println!("drill results:");
    for line in report.lines() {
        println!("  {line}");
    }
    let report_path = args.data.join("drill-report.json");
    std::fs::write(&report_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", report_path.display()))?;
    println!("  (the report as JSON: {})", report_path.display());
    ensure!(report.rto_ms.is_some(), "the drill failed: not every cell committed again within {DRILL_RTO_WAIT_MAX:?}");
    ensure!(report.passed, "the drill failed: {}", report.problems.join("; "));
    Ok(())
}
