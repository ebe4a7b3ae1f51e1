//! End-to-end: a five-node cluster of real `cellpay node` processes (three
//! regions, five datacenters, four cells, emulated inter-region latency),
//! driven over gRPC by a background load, with nodes killed by SIGKILL.
//!
//! `a_cluster_survives_a_leader_and_a_region_lost_under_load`:
//! 1. starts the five nodes and waits until every cell has a leader;
//! 2. creates accounts in every cell, then runs a load: tasks sending small
//!    cell-local transfer batches to every node in turn, retrying a failed
//!    batch with the same ids, recording every acknowledged transfer;
//! 3. kills the leader of cell 1 and measures how long until every cell
//!    commits a transfer again; the node restarts and catches up;
//! 4. kills both nodes of the region holding the most leaders and measures
//!    the same (three of five voters remain: a majority);
//! 5. restarts them; they catch up with what was committed while they were down;
//! 6. stops the load and audits: every acknowledged transfer is there, whole;
//!    every account's balances are the sums of the applied transfers; money
//!    is conserved; all five replicas of every cell hold the same state.
//!
//! `a_write_through_one_node_is_read_through_any_other`: linearizable reads
//! after writes through different nodes (no emulated latency); then `ctl
//! routing move` moves an empty shard to another cell: every node learns the
//! new table through the routing watch, the old owner refuses the shard's
//! accounts (`misrouted`) even when a stale router sends them there, and a
//! shard holding accounts is not moved.
//!
//! Each node's stdout and stderr (`RUST_LOG=info`) go to files beside its data
//! directory; when a test fails, the directory is kept and its path printed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellpay_api::proto;
use cellpay_api::proto::ledger_client::LedgerClient;
use cellpay_cluster::topology::{Topology, GLOBAL_CELL};
use cellpay_ledger::{Account, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags, BATCH_EVENTS_MAX};
use serde::Deserialize;
use tonic::transport::Channel;

mod e2e_support;
use e2e_support::{account_of_user, accounts_by_cell, free_port_range, grpc, tail, transfer, Rng, LEDGER};

/// The local topology's nodes (ids 1..=5) and the cells the test asks for.
const NODES: u64 = 5;
const CELLS: u32 = 4;
/// Ports a local cluster uses from its base: a peer and a client port per node.
const CLUSTER_PORTS: u16 = 2 * NODES as u16;
/// Users of the load test, one account each, spread over every shard.
const LOAD_USERS: u64 = 400;
const LOAD_WORKERS: u64 = 8;
const LOAD_BATCH_TRANSFERS_MIN: u64 = 50;
const LOAD_BATCH_TRANSFERS_MAX: u64 = 200;
/// How long one gRPC call of the load or a probe may take before the client
/// gives up on it (its outcome is then unknown: it is retried with the same ids).
const LOAD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause before a failed call is retried.
const RETRY_BACKOFF: Duration = Duration::from_millis(20);
/// After the load is told to stop, how long a batch in flight keeps being retried.
const LOAD_STOP_RETRY_DURATION: Duration = Duration::from_secs(15);
/// The interval between two polls of the nodes' status.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How long the cluster may take to elect a leader in every cell at start.
const ELECTION_DEADLINE: Duration = Duration::from_secs(20);
/// The bar of the test: every cell commits again within this after a region is lost.
const FAILOVER_REGION_MS_MAX: u128 = 15_000;
/// Generous bounds for steps that have no figure of their own to meet.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(30);
const QUIESCENCE_DEADLINE: Duration = Duration::from_secs(30);
const LOAD_PROGRESS_DEADLINE: Duration = Duration::from_secs(15);
/// Transfers the load acknowledges in every cell before the first kill.
const LOAD_WARM_UP_TRANSFERS_PER_CELL: u64 = 2_000;
/// Probe transfer ids: user bits no load worker uses.
const PROBE_ID_BASE: u128 = 1_000_000 << 64;

/// The test processes share two cores: run one cluster at a time, so one
/// test's ten nodes do not slow the other's failover.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// The cluster: five child processes, killed on drop.

#[derive(Deserialize, Debug, Clone)]
struct NodeStatus {
    node: u64,
    cells: Vec<CellStatus>,
}

#[derive(Deserialize, Debug, Clone)]
struct CellStatus {
    cell: u64,
    role: String,
    leader: Option<u64>,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    checkpoint_index: u64,
    accounts: u64,
    state_hash: String,
    state_hash_index: u64,
    voters: Vec<u64>,
}

struct Cluster {
    /// `None` once kept (a failed test leaves its logs behind).
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    topology_path: PathBuf,
    topology: Topology,
    /// The processes that are up, by node id.
    processes: BTreeMap<u64, Child>,
    http: reqwest::Client,
}

impl Cluster {
    /// Writes a topology with `cellpay ctl init` on free ports and starts every node.
    fn start(latency: bool) -> Cluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = dir.path().to_path_buf();
        let base_port = free_port_range(CLUSTER_PORTS);
        let base_port_text = base_port.to_string();
        let cells_text = CELLS.to_string();
        let mut args = vec!["ctl", "init", "--cells", &cells_text, "--base-port", &base_port_text];
        if !latency {
            args.push("--no-latency");
        }
        let output = Command::new(env!("CARGO_BIN_EXE_cellpay")).args(&args).output().expect("run cellpay ctl init");
        assert!(output.status.success(), "ctl init failed: {}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8(output.stdout).expect("the topology is UTF-8");
        let topology = Topology::parse(&text).expect("ctl init prints a valid topology");
        assert_eq!(topology.nodes().count() as u64, NODES);
        assert_eq!(topology.cells.len(), CELLS as usize);
        assert_eq!(topology.latency.enabled, latency);
        let topology_path = root.join("cluster.toml");
        std::fs::write(&topology_path, &text).expect("write the topology");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().expect("an HTTP client");
        let mut cluster = Cluster { dir: Some(dir), root, topology_path, topology, processes: BTreeMap::new(), http };
        eprintln!(
            "cluster: {NODES} nodes, {CELLS} cells, ports {base_port}..{}, latency {}, in {}",
            base_port + CLUSTER_PORTS - 1,
            if latency { "on" } else { "off" },
            cluster.root.display()
        );
        for node in 1..=NODES {
            cluster.spawn(node);
        }
        cluster
    }

    fn node_dir(&self, node: u64) -> PathBuf {
        self.root.join(format!("node-{node}"))
    }

    fn log_path(&self, node: u64) -> PathBuf {
        self.node_dir(node).join("stderr.log")
    }

    fn client_address(&self, node: u64) -> SocketAddr {
        self.topology.node(node).expect("a node of the topology").client_address
    }

    fn region_of(&self, node: u64) -> &str {
        self.topology.location(node).expect("a node of the topology").region
    }

    /// Starts a node on its data directory (created on first start); its
    /// output is appended to files, so a restart keeps the earlier logs.
    fn spawn(&mut self, node: u64) {
        assert!(!self.processes.contains_key(&node), "node {node} is already running");
        let node_dir = self.node_dir(node);
        std::fs::create_dir_all(&node_dir).expect("the node's directory");
        let append = |name: &str| -> File {
            OpenOptions::new().create(true).append(true).open(node_dir.join(name)).expect("a log file")
        };
        let child = Command::new(env!("CARGO_BIN_EXE_cellpay"))
            .arg("node")
            .arg("--cluster")
            .arg(&self.topology_path)
            .args(["--node", &node.to_string(), "--data"])
            .arg(node_dir.join("data"))
            // Checkpoints (and log compaction) happen during the test too.
            .args(["--checkpoint-transfers", "4000"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(append("stdout.log"))
            .stderr(append("stderr.log"))
            .spawn()
            .expect("start cellpay node");
        self.processes.insert(node, child);
    }

    /// SIGKILL (std's `kill` on Unix), and reap.
    fn kill(&mut self, node: u64) {
        let mut child = self.processes.remove(&node).unwrap_or_else(|| panic!("node {node} is not running"));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap the killed node");
    }

    fn live_nodes(&self) -> Vec<u64> {
        self.processes.keys().copied().collect()
    }

    /// Panics, naming the node and showing its log, if a node that should be
    /// up has exited by itself.
    fn assert_running(&mut self) {
        for (&node, child) in self.processes.iter_mut() {
            if let Some(exit) = child.try_wait().expect("poll a child") {
                let log =
                    std::fs::read_to_string(self.root.join(format!("node-{node}/stderr.log"))).unwrap_or_default();
                panic!("node {node} exited by itself ({exit}); its log:\n{}", tail(&log, 40));
            }
        }
    }

    async fn status(&self, node: u64) -> Option<NodeStatus> {
        let url = format!("http://{}/v1/cluster/status", self.client_address(node));
        let reply = self.http.get(url).send().await.ok()?.error_for_status().ok()?;
        reply.json::<NodeStatus>().await.ok()
    }

    /// The status of every live node that answers.
    async fn statuses(&self) -> BTreeMap<u64, NodeStatus> {
        let mut statuses = BTreeMap::new();
        for node in self.live_nodes() {
            if let Some(status) = self.status(node).await {
                assert_eq!(status.node, node, "node {node} answers as another node");
                statuses.insert(node, status);
            }
        }
        statuses
    }

    /// The leader of every cell, once every live node answers and agrees on
    /// it, and the leader itself reports the role.
    async fn wait_for_leaders(&mut self, deadline: Duration) -> BTreeMap<u64, u64> {
        let started = Instant::now();
        loop {
            self.assert_running();
            let statuses = self.statuses().await;
            if statuses.len() == self.processes.len() {
                if let Some(leaders) = agreed_leaders(&self.topology, &statuses) {
                    return leaders;
                }
            }
            assert!(started.elapsed() < deadline, "no agreed leader in every cell after {deadline:?}: {statuses:#?}");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Restarts nodes and waits until each of their replicas has applied
    /// everything the cell's leader had committed when they came back up.
    /// Returns the milliseconds from the start to that point.
    async fn restart_and_catch_up(&mut self, nodes: &[u64]) -> u128 {
        let started = Instant::now();
        for &node in nodes {
            self.spawn(node);
        }
        // Wait for the restarted nodes to serve.
        let mut targets: BTreeMap<u64, u64> = BTreeMap::new();
        loop {
            self.assert_running();
            let statuses = self.statuses().await;
            if nodes.iter().all(|node| statuses.contains_key(node)) {
                // What the cells had committed when the nodes came back.
                for cell in &self.topology.cells {
                    let commit = statuses.values().flat_map(|s| &s.cells).filter(|c| c.cell == cell.id);
                    targets.insert(cell.id, commit.map(|c| c.commit_index).max().unwrap_or(0));
                }
                break;
            }
            assert!(started.elapsed() < CATCH_UP_DEADLINE, "restarted nodes {nodes:?} do not serve");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        loop {
            self.assert_running();
            let statuses = self.statuses().await;
            let mut behind: Vec<(u64, u64, u64)> = Vec::new();
            for &node in nodes {
                for (&cell, &target) in &targets {
                    let replica = statuses.get(&node).and_then(|s| s.cells.iter().find(|c| c.cell == cell));
                    if replica.is_none_or(|c| c.applied_index < target) {
                        behind.push((node, cell, target));
                    }
                }
            }
            if behind.is_empty() {
                return started.elapsed().as_millis();
            }
            assert!(
                started.elapsed() < CATCH_UP_DEADLINE,
                "restarted nodes {nodes:?} did not catch up within {CATCH_UP_DEADLINE:?}: (node, cell, target) \
                 behind: {behind:?}; statuses: {statuses:#?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the cluster is quiescent: in every cell, every replica has
    /// applied the same index, its commit index, and hashed its state there.
    /// Then every replica's state hash must be the same.
    async fn assert_replicas_identical(&mut self) {
        let started = Instant::now();
        loop {
            self.assert_running();
            let statuses = self.statuses().await;
            let mut settled = statuses.len() as u64 == NODES;
            let mut hashes: BTreeMap<u64, BTreeMap<(u64, String), Vec<u64>>> = BTreeMap::new();
            let mut checkpoints: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            for cell in std::iter::once(self.topology.global()).chain(&self.topology.cells) {
                let replicas: Vec<(u64, &CellStatus)> = statuses
                    .values()
                    .filter_map(|s| s.cells.iter().find(|c| c.cell == cell.id).map(|c| (s.node, c)))
                    .collect();
                let applied: BTreeSet<u64> = replicas.iter().map(|(_, c)| c.applied_index).collect();
                settled &= replicas.len() as u64 == NODES
                    && applied.len() == 1
                    && replicas.iter().all(|(_, c)| c.commit_index == c.applied_index)
                    && replicas.iter().all(|(_, c)| c.state_hash_index == c.applied_index);
                checkpoints.insert(cell.id, replicas.iter().map(|(_, c)| c.checkpoint_index).collect());
                for (node, c) in &replicas {
                    hashes
                        .entry(cell.id)
                        .or_default()
                        .entry((c.state_hash_index, c.state_hash.clone()))
                        .or_default()
                        .push(*node);
                }
            }
            if settled {
                for (cell, by_hash) in &hashes {
                    assert_eq!(
                        by_hash.len(),
                        1,
                        "cell {cell}: the replicas diverge: (state_hash_index, state_hash) -> nodes: {by_hash:?}"
                    );
                    let ((index, hash), nodes) = by_hash.iter().next().expect("one");
                    eprintln!(
                        "cell {cell}: replicas {nodes:?} all hold state {hash} at index {index} (checkpoints at {:?})",
                        checkpoints[cell]
                    );
                }
                return;
            }
            assert!(
                started.elapsed() < QUIESCENCE_DEADLINE,
                "the cluster did not settle within {QUIESCENCE_DEADLINE:?}: {statuses:#?}"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.processes) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for node in 1..=NODES {
                let log = std::fs::read_to_string(self.log_path(node)).unwrap_or_default();
                eprintln!("---- node {node} stderr (last lines) ----\n{}", tail(&log, 6));
            }
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("the test failed: the cluster's data and logs are kept in {}", kept.display());
            }
        }
    }
}

/// Every cell's leader, if every answering node names the same one for it
/// and that node reports itself the leader.
fn agreed_leaders(topology: &Topology, statuses: &BTreeMap<u64, NodeStatus>) -> Option<BTreeMap<u64, u64>> {
    let mut leaders = BTreeMap::new();
    for cell in &topology.cells {
        let replicas: Vec<&CellStatus> =
            statuses.values().filter_map(|s| s.cells.iter().find(|c| c.cell == cell.id)).collect();
        let leader = replicas.first()?.leader?;
        if replicas.len() != statuses.len() || replicas.iter().any(|c| c.leader != Some(leader)) {
            return None;
        }
        let leader_replica = statuses.get(&leader)?.cells.iter().find(|c| c.cell == cell.id)?;
        if leader_replica.role != "leader" {
            return None;
        }
        leaders.insert(cell.id, leader);
    }
    Some(leaders)
}

/// The leader of every cell as the nodes report it now: the replica that
/// says it leads, at the highest term.
fn current_leaders(statuses: &BTreeMap<u64, NodeStatus>) -> BTreeMap<u64, u64> {
    let mut leaders: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for status in statuses.values() {
        for cell in status.cells.iter().filter(|c| c.role == "leader") {
            let entry = leaders.entry(cell.cell).or_insert((cell.term, status.node));
            if cell.term > entry.0 {
                *entry = (cell.term, status.node);
            }
        }
    }
    leaders.into_iter().map(|(cell, (_, node))| (cell, node)).collect()
}

// ---------------------------------------------------------------------------
// Clients, accounts and transfers.

/// Calls until the call succeeds; a refusal as invalid is a bug of the test.
async fn retry<T, F, Fut>(what: &str, deadline: Duration, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let started = Instant::now();
    loop {
        match call().await {
            Ok(value) => return value,
            Err(status) => {
                assert_ne!(status.code(), tonic::Code::InvalidArgument, "{what} refused: {}", status.message());
                assert!(started.elapsed() < deadline, "{what} failed for {deadline:?}, last: {status}");
            }
        }
        tokio::time::sleep(RETRY_BACKOFF).await;
    }
}

/// Creates the accounts, one request per cell (a request stays in one cell),
/// each through a different node.
async fn create_accounts(cluster: &Cluster, groups: &BTreeMap<u64, Vec<u128>>) {
    for (position, group) in groups.values().enumerate() {
        let node = 1 + position as u64 % NODES;
        let client = grpc(cluster.client_address(node), LOAD_REQUEST_TIMEOUT);
        let accounts: Vec<Account> =
            group.iter().map(|&id| Account { id, ledger: LEDGER, code: 1, ..Account::default() }).collect();
        let results = retry("create accounts", FAILOVER_DEADLINE, || {
            let mut client = client.clone();
            let request = proto::CreateAccountsRequest::from_ledger(&accounts);
            async move { client.create_accounts(request).await }
        })
        .await
        .into_inner()
        .to_ledger()
        .expect("a well-formed reply");
        // A retry of a request that was applied answers `exists`.
        assert!(
            results.iter().all(|r| matches!(r, CreateAccountResult::Ok | CreateAccountResult::Exists)),
            "{results:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// The load.

/// What the load and the probes learned, shared with the test.
#[derive(Default)]
struct Ledgerbook {
    /// Every transfer sent, by id.
    sent: Mutex<BTreeMap<u128, Transfer>>,
    /// Transfers acknowledged applied, with the answer (`ok`, or `exists` for
    /// a retry of a request that had been applied).
    acknowledged: Mutex<BTreeMap<u128, CreateTransferResult>>,
    /// Transfers whose request failed on every retry: outcome unknown.
    unknown: Mutex<BTreeSet<u128>>,
    /// Transfers acknowledged per cell.
    acknowledged_by_cell: Mutex<BTreeMap<u64, u64>>,
    /// Failed calls by gRPC code, and batches answered `exists` after a retry.
    failures: Mutex<BTreeMap<String, u64>>,
    batches_retried: AtomicU64,
    batches_exists: AtomicU64,
    stop: AtomicBool,
}

impl Ledgerbook {
    fn acknowledged_in(&self, cell: u64) -> u64 {
        self.acknowledged_by_cell.lock().unwrap().get(&cell).copied().unwrap_or(0)
    }

    fn acknowledged_by_cell(&self) -> BTreeMap<u64, u64> {
        self.acknowledged_by_cell.lock().unwrap().clone()
    }

    fn record_sent(&self, batch: &[Transfer]) {
        let mut sent = self.sent.lock().unwrap();
        for transfer in batch {
            assert!(sent.insert(transfer.id, *transfer).is_none(), "transfer id {} sent twice", transfer.id);
        }
    }

    /// Records a request's answer; the batch is one log entry, applied whole:
    /// every event answers the same.
    fn record_results(&self, cell: u64, batch: &[Transfer], results: &[CreateTransferResult], attempts: u32) {
        assert_eq!(results.len(), batch.len(), "one result per event");
        let first = results[0];
        assert!(results.iter().all(|r| *r == first), "a batch applied in part: {results:?}");
        match first {
            CreateTransferResult::Ok => {}
            CreateTransferResult::Exists => {
                assert!(attempts > 1, "fresh ids cannot exist on the first attempt");
                self.batches_exists.fetch_add(1, Ordering::Relaxed);
            }
            other => panic!("transfer {} answered {other}", batch[0].id),
        }
        let mut acknowledged = self.acknowledged.lock().unwrap();
        for transfer in batch {
            acknowledged.insert(transfer.id, first);
        }
        *self.acknowledged_by_cell.lock().unwrap().entry(cell).or_default() += batch.len() as u64;
    }

    fn record_failure(&self, status: &tonic::Status) {
        assert_ne!(status.code(), tonic::Code::InvalidArgument, "the test sent a bad request: {}", status.message());
        let message: String = status.message().chars().take(160).collect();
        *self.failures.lock().unwrap().entry(format!("{:?}: {message}", status.code())).or_default() += 1;
    }
}

/// Sends a batch until it is answered; `None` if it could not be within
/// `LOAD_STOP_RETRY_DURATION` of the load being stopped.
async fn send_until_answered(
    book: &Ledgerbook,
    clients: &[LedgerClient<Channel>],
    node_next: &mut usize,
    batch: &[Transfer],
) -> Option<(Vec<CreateTransferResult>, u32)> {
    let mut stopped_at: Option<Instant> = None;
    for attempts in 1u32.. {
        let mut client = clients[*node_next % clients.len()].clone();
        *node_next += 1;
        let request = proto::CreateTransfersRequest::from_ledger(batch);
        match client.create_transfers(request).await {
            Ok(reply) => return Some((reply.into_inner().to_ledger().expect("a well-formed reply"), attempts)),
            Err(status) => book.record_failure(&status),
        }
        if attempts == 1 {
            book.batches_retried.fetch_add(1, Ordering::Relaxed);
        }
        if book.stop.load(Ordering::Relaxed) {
            let stopped_at = *stopped_at.get_or_insert_with(Instant::now);
            if stopped_at.elapsed() > LOAD_STOP_RETRY_DURATION {
                return None;
            }
        }
        tokio::time::sleep(RETRY_BACKOFF).await;
    }
    unreachable!()
}

/// One load task: cell-local batches, to the cells and the nodes in turn.
async fn load_worker(
    worker: u64,
    clients: Vec<LedgerClient<Channel>>,
    groups: Arc<BTreeMap<u64, Vec<u128>>>,
    book: Arc<Ledgerbook>,
) {
    let mut rng = Rng::new(worker + 1);
    let mut node_next = worker as usize;
    let mut sequence = 0u128;
    let cells: Vec<u64> = groups.keys().copied().collect();
    for round in 0u64.. {
        if book.stop.load(Ordering::Relaxed) {
            return;
        }
        let cell = cells[((worker + round) % cells.len() as u64) as usize];
        let accounts = &groups[&cell];
        let size = LOAD_BATCH_TRANSFERS_MIN + rng.below(LOAD_BATCH_TRANSFERS_MAX - LOAD_BATCH_TRANSFERS_MIN + 1);
        let batch: Vec<Transfer> = (0..size)
            .map(|_| {
                sequence += 1;
                let debit = rng.below(accounts.len() as u64) as usize;
                let credit = (debit + 1 + rng.below(accounts.len() as u64 - 1) as usize) % accounts.len();
                let id = (u128::from(worker + 1) << 64) | sequence;
                transfer(id, accounts[debit], accounts[credit], 1 + u128::from(rng.below(1_000)))
            })
            .collect();
        book.record_sent(&batch);
        match send_until_answered(&book, &clients, &mut node_next, &batch).await {
            Some((results, attempts)) => book.record_results(cell, &batch, &results, attempts),
            None => book.unknown.lock().unwrap().extend(batch.iter().map(|t| t.id)),
        }
    }
}

/// Sends one probe transfer to each cell, through the live nodes in turn,
/// each retried with its id until answered; returns, per cell, the time
/// from `since` until its probe was acknowledged.
async fn probe_every_cell(
    cluster: &Cluster,
    groups: &BTreeMap<u64, Vec<u128>>,
    book: &Arc<Ledgerbook>,
    probe_next: &mut u128,
    since: Instant,
) -> BTreeMap<u64, u128> {
    let clients: Vec<LedgerClient<Channel>> = cluster
        .live_nodes()
        .into_iter()
        .map(|node| grpc(cluster.client_address(node), PROBE_REQUEST_TIMEOUT))
        .collect();
    let mut tasks = Vec::new();
    for (&cell, accounts) in groups {
        *probe_next += 1;
        let probe = [transfer(PROBE_ID_BASE | *probe_next, accounts[0], accounts[1], 1)];
        book.record_sent(&probe);
        let (clients, book) = (clients.clone(), book.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            for attempts in 1u32.. {
                // The live nodes in turn, starting from a different one per cell.
                let mut client = clients[(cell as usize + attempts as usize) % clients.len()].clone();
                let request = proto::CreateTransfersRequest::from_ledger(&probe);
                match client.create_transfers(request).await {
                    Ok(reply) => {
                        let results = reply.into_inner().to_ledger().expect("a well-formed reply");
                        book.record_results(cell, &probe, &results, attempts);
                        return (cell, since.elapsed().as_millis());
                    }
                    Err(status) => book.record_failure(&status),
                }
                assert!(
                    started.elapsed() < FAILOVER_DEADLINE,
                    "cell {cell} committed nothing for {FAILOVER_DEADLINE:?}"
                );
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
            unreachable!()
        }));
    }
    let mut times = BTreeMap::new();
    for task in tasks {
        let (cell, ms) = task.await.expect("a probe task");
        times.insert(cell, ms);
    }
    times
}

/// Fails the test at once if a load worker has ended before the load was
/// stopped (a worker that panicked: its assertion's message is shown).
async fn assert_workers_running(workers: &mut Vec<tokio::task::JoinHandle<()>>) {
    if let Some(position) = workers.iter().position(|worker| worker.is_finished()) {
        let worker = workers.swap_remove(position);
        match worker.await {
            Ok(()) => panic!("a load worker stopped before the load was stopped"),
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
}

/// Waits until the load has acknowledged more transfers in every cell than it had when called.
async fn assert_load_advances(
    cluster: &mut Cluster,
    book: &Ledgerbook,
    workers: &mut Vec<tokio::task::JoinHandle<()>>,
    what: &str,
) {
    let before = book.acknowledged_by_cell();
    let started = Instant::now();
    loop {
        cluster.assert_running();
        assert_workers_running(workers).await;
        let now = book.acknowledged_by_cell();
        let stalled: Vec<u64> = before
            .iter()
            .filter(|(cell, count)| now.get(cell).copied().unwrap_or(0) <= **count)
            .map(|(cell, _)| *cell)
            .collect();
        if stalled.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < LOAD_PROGRESS_DEADLINE,
            "{what}: the load acknowledged nothing more in cells {stalled:?} for {LOAD_PROGRESS_DEADLINE:?}; \
             failures so far: {:?}",
            book.failures.lock().unwrap()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_survives_a_leader_and_a_region_lost_under_load() {
    let _serial = SERIAL.lock().await;
    let test_started = Instant::now();

    // 1. Five nodes; every cell elects a leader.
    let mut cluster = Cluster::start(true);
    let leaders = cluster.wait_for_leaders(ELECTION_DEADLINE).await;
    eprintln!("leaders after start: {leaders:?} (cell -> node) in {} ms", test_started.elapsed().as_millis());

    // 2. Accounts in every cell, then the load in the background.
    let groups = Arc::new(accounts_by_cell(&cluster.topology, LOAD_USERS, CELLS as usize));
    create_accounts(&cluster, &groups).await;
    let book = Arc::new(Ledgerbook::default());
    let clients: Vec<LedgerClient<Channel>> =
        (1..=NODES).map(|node| grpc(cluster.client_address(node), LOAD_REQUEST_TIMEOUT)).collect();
    let mut workers: Vec<_> = (0..LOAD_WORKERS)
        .map(|worker| tokio::spawn(load_worker(worker, clients.clone(), groups.clone(), book.clone())))
        .collect();
    let load_started = Instant::now();
    loop {
        cluster.assert_running();
        assert_workers_running(&mut workers).await;
        if groups.keys().all(|&cell| book.acknowledged_in(cell) >= LOAD_WARM_UP_TRANSFERS_PER_CELL) {
            break;
        }
        assert!(
            load_started.elapsed() < LOAD_PROGRESS_DEADLINE,
            "the load did not warm up: {:?}, failures {:?}",
            book.acknowledged_by_cell(),
            book.failures.lock().unwrap()
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    let warm: u64 = book.acknowledged_by_cell().values().sum();
    eprintln!(
        "load warm: {warm} transfers acknowledged in {} ms ({:.0}/s)",
        load_started.elapsed().as_millis(),
        warm as f64 / load_started.elapsed().as_secs_f64()
    );
    let mut probe_next = 0u128;

    // 3. Kill the leader of cell 1.
    let statuses = cluster.statuses().await;
    let leaders = current_leaders(&statuses);
    let victim = leaders[&1];
    let led: Vec<u64> = leaders.iter().filter(|(_, node)| **node == victim).map(|(cell, _)| *cell).collect();
    let killed_at = Instant::now();
    cluster.kill(victim);
    let times = probe_every_cell(&cluster, &groups, &book, &mut probe_next, killed_at).await;
    let failover_leader_ms = times.values().copied().max().expect("cells");
    println!(
        "failover after leader kill: {failover_leader_ms} ms (node {victim} in {}, leader of cells {led:?}; \
         per cell: {times:?})",
        cluster.region_of(victim)
    );
    assert_load_advances(&mut cluster, &book, &mut workers, "after the leader kill").await;
    let catch_up_ms = cluster.restart_and_catch_up(&[victim]).await;
    println!("catch-up after restarting node {victim}: {catch_up_ms} ms");

    // 4. Kill both nodes of the two-node region that holds the most leaders.
    let statuses = cluster.statuses().await;
    let leaders = current_leaders(&statuses);
    let region = cluster
        .topology
        .regions
        .iter()
        .map(|region| region.name.clone())
        .filter(|region| cluster.topology.region_nodes(region).len() == 2)
        .max_by_key(|region| {
            let nodes = cluster.topology.region_nodes(region);
            // Most leaders; on a tie, the later region in file order.
            leaders.values().filter(|node| nodes.contains(node)).count()
        })
        .expect("a two-node region");
    let region_nodes = cluster.topology.region_nodes(&region);
    let led: Vec<u64> = leaders.iter().filter(|(_, node)| region_nodes.contains(node)).map(|(cell, _)| *cell).collect();
    let killed_at = Instant::now();
    for &node in &region_nodes {
        cluster.kill(node);
    }
    let times = probe_every_cell(&cluster, &groups, &book, &mut probe_next, killed_at).await;
    let failover_region_ms = times.values().copied().max().expect("cells");
    println!(
        "failover after region loss: {failover_region_ms} ms (region {region}, nodes {region_nodes:?}, leaders of \
         cells {led:?}; per cell: {times:?})"
    );
    assert!(
        failover_region_ms < FAILOVER_REGION_MS_MAX,
        "every cell must commit again within {FAILOVER_REGION_MS_MAX} ms of losing a region: {failover_region_ms} ms"
    );
    assert_load_advances(&mut cluster, &book, &mut workers, "after the region loss").await;

    // 5. The region comes back and catches up.
    let catch_up_ms = cluster.restart_and_catch_up(&region_nodes).await;
    println!("catch-up after restarting region {region} (nodes {region_nodes:?}): {catch_up_ms} ms");
    assert_load_advances(&mut cluster, &book, &mut workers, "after the region came back").await;

    // 6. Stop the load, let the cluster settle, and audit.
    book.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("a load worker");
    }
    let load_seconds = load_started.elapsed().as_secs_f64();
    let acknowledged = book.acknowledged.lock().unwrap().clone();
    let sent = book.sent.lock().unwrap().clone();
    let unknown = book.unknown.lock().unwrap().clone();
    let exists = acknowledged.values().filter(|r| **r == CreateTransferResult::Exists).count();
    println!(
        "load: {} transfers sent, {} acknowledged ({exists} as exists after a retry), {} unknown, in {load_seconds:.1} s \
         ({:.0}/s); batches retried {}, answered exists {}; failed calls by code {:?}",
        sent.len(),
        acknowledged.len(),
        unknown.len(),
        acknowledged.len() as f64 / load_seconds,
        book.batches_retried.load(Ordering::Relaxed),
        book.batches_exists.load(Ordering::Relaxed),
        book.failures.lock().unwrap()
    );
    assert_eq!(acknowledged.len() + unknown.len(), sent.len(), "every batch ended acknowledged or unknown");
    cluster.assert_replicas_identical().await;

    let client = grpc(cluster.client_address(1), LOAD_REQUEST_TIMEOUT);
    let ids: Vec<u128> = sent.keys().copied().collect();
    let mut found: BTreeMap<u128, Transfer> = BTreeMap::new();
    for chunk in ids.chunks(BATCH_EVENTS_MAX) {
        let transfers = retry("lookup transfers", QUIESCENCE_DEADLINE, || {
            let mut client = client.clone();
            let request = proto::LookupTransfersRequest::from_ledger(chunk);
            async move { client.lookup_transfers(request).await }
        })
        .await
        .into_inner()
        .to_ledger()
        .expect("a well-formed reply");
        for transfer in transfers {
            assert!(found.insert(transfer.id, transfer).is_none(), "transfer {} found twice", transfer.id);
        }
    }
    // Every acknowledged transfer is there, as it was sent.
    for id in acknowledged.keys() {
        let stored = found.get(id).unwrap_or_else(|| panic!("acknowledged transfer {id} is missing"));
        let sent = &sent[id];
        assert_eq!(
            (stored.debit_account_id, stored.credit_account_id, stored.amount, stored.ledger, stored.code),
            (sent.debit_account_id, sent.credit_account_id, sent.amount, sent.ledger, sent.code),
            "transfer {id}"
        );
    }
    // Whatever was found was sent, and is either acknowledged or of unknown outcome.
    for (id, stored) in &found {
        assert!(acknowledged.contains_key(id) || unknown.contains(id), "transfer {id} found but never sent");
        let sent = &sent[id];
        assert_eq!(
            (stored.debit_account_id, stored.credit_account_id, stored.amount),
            (sent.debit_account_id, sent.credit_account_id, sent.amount)
        );
    }
    let unknown_applied = unknown.iter().filter(|id| found.contains_key(id)).count();
    println!(
        "audit: {} transfers found: {} acknowledged, {unknown_applied} of {} with an unknown outcome applied",
        found.len(),
        acknowledged.len(),
        unknown.len()
    );

    // Balances are exactly the sums of the applied transfers; money is conserved.
    let mut expected: BTreeMap<u128, (u128, u128)> = BTreeMap::new();
    for transfer in found.values() {
        expected.entry(transfer.debit_account_id).or_default().0 += transfer.amount;
        expected.entry(transfer.credit_account_id).or_default().1 += transfer.amount;
    }
    let account_ids: Vec<u128> = groups.values().flatten().copied().collect();
    let mut accounts: Vec<Account> = Vec::new();
    for chunk in account_ids.chunks(BATCH_EVENTS_MAX) {
        accounts.extend(
            retry("lookup accounts", QUIESCENCE_DEADLINE, || {
                let mut client = client.clone();
                let request = proto::LookupAccountsRequest::from_ledger(chunk);
                async move { client.lookup_accounts(request).await }
            })
            .await
            .into_inner()
            .to_ledger()
            .expect("a well-formed reply"),
        );
    }
    assert_eq!(accounts.len(), account_ids.len(), "every account is found");
    let (mut debits, mut credits) = (0u128, 0u128);
    for account in &accounts {
        let (debited, credited) = expected.get(&account.id).copied().unwrap_or_default();
        assert_eq!(
            (account.debits_posted, account.credits_posted, account.debits_pending, account.credits_pending),
            (debited, credited, 0, 0),
            "account {} holds other than the sum of its transfers",
            account.id
        );
        debits += account.debits_posted;
        credits += account.credits_posted;
    }
    assert_eq!(debits, credits, "ledger {LEDGER}: money is conserved");
    println!("audit: {} accounts, Σ debits_posted = Σ credits_posted = {debits}", accounts.len());
    let statuses = cluster.statuses().await;
    for cell in &cluster.topology.cells {
        for status in statuses.values() {
            let replica = status.cells.iter().find(|c| c.cell == cell.id).expect("every node hosts every cell");
            assert_eq!(replica.accounts, groups[&cell.id].len() as u64, "cell {} on node {}", cell.id, status.node);
        }
    }

    // A retry of an acknowledged batch applies nothing, through any node.
    for (position, (&cell, _)) in groups.iter().enumerate() {
        let batch: Vec<Transfer> = acknowledged
            .keys()
            .map(|id| sent[id])
            .filter(|t| groups[&cell].contains(&t.debit_account_id))
            .take(100)
            .collect();
        let client = grpc(cluster.client_address(1 + position as u64 % NODES), LOAD_REQUEST_TIMEOUT);
        let results = retry("retry acknowledged transfers", QUIESCENCE_DEADLINE, || {
            let mut client = client.clone();
            let request = proto::CreateTransfersRequest::from_ledger(&batch);
            async move { client.create_transfers(request).await }
        })
        .await
        .into_inner()
        .to_ledger()
        .expect("a well-formed reply");
        assert_eq!(results, vec![CreateTransferResult::Exists; batch.len()], "cell {cell}");
    }
    cluster.assert_replicas_identical().await;
    eprintln!("the test ran {:.1} s", test_started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_node_is_read_through_any_other() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut cluster = Cluster::start(false);
    cluster.wait_for_leaders(ELECTION_DEADLINE).await;
    // Users 1 to 99: shard 0 (user 100's) stays empty, to be moved below.
    let groups = accounts_by_cell(&cluster.topology, 99, CELLS as usize);
    create_accounts(&cluster, &groups).await;
    let clients: BTreeMap<u64, LedgerClient<Channel>> =
        (1..=NODES).map(|node| (node, grpc(cluster.client_address(node), LOAD_REQUEST_TIMEOUT))).collect();
    let cells: Vec<u64> = groups.keys().copied().collect();
    let mut balances: BTreeMap<u128, (u128, u128)> = BTreeMap::new();
    let rounds = 20u64;
    for round in 0..rounds {
        let cell = cells[(round % cells.len() as u64) as usize];
        let accounts = &groups[&cell];
        let (debit, credit) =
            (accounts[round as usize % accounts.len()], accounts[(round as usize + 1) % accounts.len()]);
        let amount = u128::from(round + 1);
        let writer = 1 + round % NODES;
        let id = (7u128 << 64) | u128::from(round + 1);
        let batch = [transfer(id, debit, credit, amount)];
        let mut client = clients[&writer].clone();
        let request = proto::CreateTransfersRequest::from_ledger(&batch);
        let results = client.create_transfers(request).await.expect("a write").into_inner().to_ledger().unwrap();
        assert_eq!(results, [CreateTransferResult::Ok], "round {round}: write through node {writer}");
        balances.entry(debit).or_default().0 += amount;
        balances.entry(credit).or_default().1 += amount;
        // Every other node sees the write at once: reads are linearizable.
        for reader in (1..=NODES).filter(|&node| node != writer) {
            let mut client = clients[&reader].clone();
            let request = proto::LookupTransfersRequest::from_ledger(&[id]);
            let found = client.lookup_transfers(request).await.expect("a read").into_inner().to_ledger().unwrap();
            assert_eq!(
                found.len(),
                1,
                "round {round}: transfer written through node {writer} not seen by node {reader}"
            );
            assert_eq!(
                (found[0].debit_account_id, found[0].credit_account_id, found[0].amount),
                (debit, credit, amount)
            );
            let request = proto::LookupAccountsRequest::from_ledger(&[debit, credit]);
            let read = client.lookup_accounts(request).await.expect("a read").into_inner().to_ledger().unwrap();
            assert_eq!(read.len(), 2);
            for account in read {
                assert_eq!(
                    (account.debits_posted, account.credits_posted),
                    balances[&account.id],
                    "round {round}: node {reader} reads a stale balance of account {} after a write through node {writer}",
                    account.id
                );
            }
        }
    }
    println!(
        "linearizable reads: {rounds} writes, each read back through the 4 other nodes, in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Cross-cell transfers over the real transport: from every cell to the
    // next, each written through one node and read back through another.
    for (index, &from) in cells.iter().enumerate() {
        let to = cells[(index + 1) % cells.len()];
        let (debit, credit) = (groups[&from][0], groups[&to][0]);
        let amount = 1_000 + index as u128;
        let id = (8u128 << 64) | (index as u128 + 1);
        let writer = 1 + index as u64 % NODES;
        let sent = Instant::now();
        let request = proto::CreateTransfersRequest::from_ledger(&[transfer(id, debit, credit, amount)]);
        let mut client = clients[&writer].clone();
        let results = client.create_transfers(request).await.expect("a write").into_inner().to_ledger().unwrap();
        assert_eq!(results, [CreateTransferResult::Ok], "cross-cell transfer from cell {from} to cell {to}");
        println!(
            "cross-cell transfer cell {from} -> cell {to}: answered in {:.1} ms",
            sent.elapsed().as_secs_f64() * 1e3
        );
        balances.entry(debit).or_default().0 += amount;
        balances.entry(credit).or_default().1 += amount;
        // The client is answered once the coordinator's decision is durable:
        // its leg is posted; the credit leg may still be pending (money in
        // flight is visible as pending) until the credit cell applies the decision.
        let reader = 1 + (index as u64 + 1) % NODES;
        let mut client = clients[&reader].clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let request = proto::LookupAccountsRequest::from_ledger(&[debit, credit]);
            let read = client.lookup_accounts(request).await.expect("a read").into_inner().to_ledger().unwrap();
            assert_eq!(read.len(), 2);
            let mut posted = true;
            for account in read {
                let (debits, credits) = balances[&account.id];
                let debits_read = account.debits_posted + account.debits_pending;
                let credits_read = account.credits_posted + account.credits_pending;
                assert_eq!(
                    (debits_read, credits_read),
                    (debits, credits),
                    "account {}: money in flight is pending",
                    account.id
                );
                assert!(
                    account.id != debit || account.debits_pending == 0,
                    "the coordinator's leg is posted when answered"
                );
                posted &= account.debits_pending == 0 && account.credits_pending == 0;
            }
            if posted {
                break;
            }
            assert!(Instant::now() < deadline, "the credit leg of cross-cell transfer {id:#x} was not posted in 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // A pending transfer between cells, posted in part through another node:
    // reserved in both cells, then the coordinator's post is released to the other.
    let (from, to) = (cells[0], cells[1]);
    let (debit, credit) = (groups[&from][1], groups[&to][1]);
    let pending_id = 9u128 << 64;
    let pending = Transfer { flags: TransferFlags::PENDING, ..transfer(pending_id, debit, credit, 500) };
    let mut client = clients[&1].clone();
    let request = proto::CreateTransfersRequest::from_ledger(&[pending]);
    let results = client.create_transfers(request).await.expect("a write").into_inner().to_ledger().unwrap();
    assert_eq!(results, [CreateTransferResult::Ok], "a pending transfer from cell {from} to cell {to}");
    let post = Transfer {
        id: pending_id + 1,
        pending_id,
        debit_account_id: debit,
        amount: 200,
        flags: TransferFlags::POST_PENDING_TRANSFER,
        ..Transfer::default()
    };
    let mut client = clients[&2].clone();
    let request = proto::CreateTransfersRequest::from_ledger(&[post]);
    let results = client.create_transfers(request).await.expect("a write").into_inner().to_ledger().unwrap();
    assert_eq!(results, [CreateTransferResult::Ok], "the post of the cross-cell pending transfer");
    balances.entry(debit).or_default().0 += 200;
    balances.entry(credit).or_default().1 += 200;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let request = proto::LookupAccountsRequest::from_ledger(&[debit, credit]);
        let read = client.lookup_accounts(request).await.expect("a read").into_inner().to_ledger().unwrap();
        let released = read.iter().all(|account| {
            let expected = balances[&account.id];
            account.debits_pending == 0
                && account.credits_pending == 0
                && (account.debits_posted, account.credits_posted) == expected
        });
        if released {
            break;
        }
        assert!(Instant::now() < deadline, "the post was not released to cell {to} in 5 s: {read:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("cross-cell pending transfer cell {from} -> cell {to}: reserved in both, posted in part, released");
    cluster.assert_replicas_identical().await;

    // Every node routes by the topology's table, version 1: `ctl routing show` says so.
    let path = cluster.topology_path.to_str().expect("a UTF-8 path");
    let output = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["ctl", "routing", "show", "--cluster", path])
        .output()
        .expect("run cellpay ctl routing show");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "ctl routing show failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    let mut expected = "routing version 1, 100 shards (nodes 1,2,3,4,5)\n".to_string();
    for cell in &cluster.topology.cells {
        let ranges = cellpay_cluster::topology::shard_ranges(&cell.shards).join(",");
        expected.push_str(&format!("  cell {:<3} shards {ranges}\n", cell.id));
    }
    assert_eq!(stdout, expected);

    move_an_empty_shard(&mut cluster).await;
    cluster.assert_replicas_identical().await;
}

/// `cellpay ctl routing move`, run as an operator would: `(succeeded, stdout + stderr)`.
fn routing_move(cluster: &Cluster, shard: u32, to: u64) -> (bool, String) {
    let path = cluster.topology_path.to_str().expect("a UTF-8 path");
    let output = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["ctl", "routing", "move", "--cluster", path, "--shard", &shard.to_string(), "--to", &to.to_string()])
        .output()
        .expect("run cellpay ctl routing move");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// Moves shard 0 (no accounts) to another cell and checks what every node sees.
async fn move_an_empty_shard(cluster: &mut Cluster) {
    let topology = cluster.topology.clone();
    let from = topology.cell_of_shard(0).expect("shard 0 is owned");
    let to = topology.cells.iter().map(|cell| cell.id).find(|&cell| cell != from).expect("another cell");
    // A shard holding accounts is not moved, and nothing changes.
    let (moved, text) = routing_move(cluster, 1, to);
    assert!(!moved && text.contains("did not release shard 1"), "{text}");
    assert!(text.contains("accounts of shard 1"), "{text}");

    // Every node watches the table: each answers as soon as it knows a version after 1.
    let watches: Vec<_> = (1..=NODES)
        .map(|node| {
            let url = format!("http://{}/v1/cluster/routing?newer_than=1&wait_ms=10000", cluster.client_address(node));
            tokio::spawn(async move {
                let client = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
                let table: serde_json::Value = client.get(url).send().await.unwrap().json().await.unwrap();
                (node, table, Instant::now())
            })
        })
        .collect();
    let started = Instant::now();
    let (moved, text) = routing_move(cluster, 0, to);
    let moved_at = Instant::now();
    assert!(moved, "ctl routing move failed: {text}");
    assert_eq!(text, format!("shard 0: moved from cell {from} to cell {to}; routing version 2\n"));
    eprintln!("ctl routing move: shard 0 from cell {from} to cell {to} in {} ms", (moved_at - started).as_millis());
    for watch in watches {
        let (node, table, seen) = watch.await.unwrap();
        assert_eq!(table["version"], 2, "node {node}: {table}");
        assert_eq!(table["owners"][0], to, "node {node}: {table}");
        assert_eq!(table["owners"][1], topology.cell_of_shard(1).unwrap(), "node {node}");
        eprintln!(
            "node {node} learned routing version 2 {} ms after the move began",
            seen.saturating_duration_since(started).as_millis()
        );
    }
    // A stale router sends shard 0's account to the old owner (a call
    // forwarded for that cell): refused, nothing applied.
    let user = 100;
    let account = Account { id: account_of_user(user), ledger: LEDGER, code: 1, ..Account::default() };
    let mut client = grpc(cluster.client_address(1), LOAD_REQUEST_TIMEOUT);
    let mut request = tonic::Request::new(proto::CreateAccountsRequest::from_ledger(&[account]));
    request.metadata_mut().insert("cellpay-forwarded", format!("cell={from}").parse().unwrap());
    let status = client.create_accounts(request).await.expect_err("the old owner refuses");
    assert!(status.message().contains(&format!("cell {from} does not own account")), "{status:?}");
    // Routed by the new table, it lands in the new owner, once.
    let results = retry("create the moved shard's account", FAILOVER_DEADLINE, || {
        let mut client = client.clone();
        let request = proto::CreateAccountsRequest::from_ledger(&[account]);
        async move { client.create_accounts(request).await }
    })
    .await
    .into_inner()
    .to_ledger()
    .unwrap();
    assert_eq!(results, [CreateAccountResult::Ok]);
    // Every replica of the new owner holds it (once applied), none of the old owner's.
    // (Each cell also holds two clearing accounts: the cross-cell transfers above went to and came from it.)
    let clearing = |cell: u64| if cell == GLOBAL_CELL { 0 } else { 2 };
    let expected = |cell: u64| groups_count(&topology, cell) + u64::from(cell == to) + clearing(cell);
    let deadline = Instant::now() + FAILOVER_DEADLINE;
    loop {
        let statuses = cluster.statuses().await;
        let counts: Vec<(u64, u64, Option<u64>)> = statuses
            .values()
            .flat_map(|status| {
                [GLOBAL_CELL, from, to]
                    .map(|cell| (status.node, cell, status.cells.iter().find(|c| c.cell == cell).map(|c| c.accounts)))
            })
            .collect();
        let right = counts.iter().all(|&(_, cell, accounts)| accounts == Some(expected(cell)));
        if right && statuses.len() as u64 == NODES {
            break;
        }
        assert!(Instant::now() < deadline, "accounts per (node, cell) are not as expected: {counts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Now shard 0 holds an account: it does not move back.
    let (moved, text) = routing_move(cluster, 0, from);
    assert!(!moved && text.contains("did not release shard 0"), "{text}");
}

/// How many of users 1 to 99's accounts the topology puts in `cell`.
fn groups_count(topology: &Topology, cell: u64) -> u64 {
    accounts_by_cell(topology, 99, CELLS as usize).get(&cell).map_or(0, |group| group.len() as u64)
}

/// `cellpay ctl switchover`, run as an operator would; returns its output.
fn switchover(cluster: &Cluster, region: &str, back: bool) -> String {
    let mut args = vec!["ctl", "switchover", "--cluster", cluster.topology_path.to_str().expect("a UTF-8 path")];
    args.extend(["--region", region]);
    if back {
        args.push("--back");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_cellpay")).args(&args).output().expect("run cellpay ctl switchover");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "switchover failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_moves_every_leader_out_of_a_region_and_back_with_no_failed_request() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(true);
    cluster.wait_for_leaders(ELECTION_DEADLINE).await;
    let groups = Arc::new(accounts_by_cell(&cluster.topology, LOAD_USERS, CELLS as usize));
    create_accounts(&cluster, &groups).await;
    // Leaders settle in their preferred datacenters (cells 3 and 4 prefer shanghai).
    let region = "shanghai";
    let region_nodes = cluster.topology.region_nodes(region);
    let settled = Instant::now();
    loop {
        let leaders = current_leaders(&cluster.statuses().await);
        if leaders.values().filter(|node| region_nodes.contains(node)).count() >= 2 {
            break;
        }
        assert!(settled.elapsed() < ELECTION_DEADLINE, "leaders never settled in {region}: {leaders:?}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }

    let book = Arc::new(Ledgerbook::default());
    let clients: Vec<LedgerClient<Channel>> =
        (1..=NODES).map(|node| grpc(cluster.client_address(node), LOAD_REQUEST_TIMEOUT)).collect();
    let workers: Vec<_> = (0..LOAD_WORKERS)
        .map(|worker| tokio::spawn(load_worker(worker, clients.clone(), groups.clone(), book.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let out = switchover(&cluster, region, false);
    println!("switchover out of {region}: {} ms\n{out}", started.elapsed().as_millis());
    let leaders = current_leaders(&cluster.statuses().await);
    assert!(leaders.values().all(|node| !region_nodes.contains(node)), "a leader is still in {region}: {leaders:?}");
    // Leaders stay out while the region is drained.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leaders = current_leaders(&cluster.statuses().await);
    assert!(leaders.values().all(|node| !region_nodes.contains(node)), "a leader went back to {region}: {leaders:?}");
    let acknowledged_during = book.acknowledged_by_cell();

    let started = Instant::now();
    let out = switchover(&cluster, region, true);
    println!("switchover back into {region}: {} ms\n{out}", started.elapsed().as_millis());
    tokio::time::sleep(Duration::from_millis(500)).await;
    book.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("a load worker");
    }
    let failures = book.failures.lock().unwrap().clone();
    let acknowledged = book.acknowledged.lock().unwrap().clone();
    println!(
        "load during both switchovers: {} transfers acknowledged, failed calls {failures:?}, batches retried {}",
        acknowledged.len(),
        book.batches_retried.load(Ordering::Relaxed)
    );
    assert!(groups.keys().all(|cell| acknowledged_during.get(cell).copied().unwrap_or(0) > 0), "every cell served");
    assert!(failures.is_empty(), "no request may fail during a switchover: {failures:?}");
    assert_eq!(book.batches_retried.load(Ordering::Relaxed), 0);
    assert!(book.unknown.lock().unwrap().is_empty());
    assert!(acknowledged.values().all(|result| *result == CreateTransferResult::Ok));
    cluster.assert_replicas_identical().await;
}

/// `cellpay ctl member`, run as an operator would; returns its output.
fn member(cluster: &Cluster, change: &[&str]) -> String {
    let path = cluster.topology_path.to_str().expect("a UTF-8 path");
    let mut args = vec!["ctl", "member", "--cluster", path, "--cell", "all"];
    args.extend(change);
    let output = Command::new(env!("CARGO_BIN_EXE_cellpay")).args(&args).output().expect("run cellpay ctl member");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "ctl member {change:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The documented procedure to replace a node's disk, with the real binary:
/// remove its replicas, wipe its data, start it, add it back as a learner of
/// every cell, promote it. Writes keep committing throughout, and at the end
/// every replica of every cell, the new one included, holds the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_disk_is_replaced_with_ctl_member_while_the_cells_serve() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(false);
    cluster.wait_for_leaders(ELECTION_DEADLINE).await;
    let groups = Arc::new(accounts_by_cell(&cluster.topology, LOAD_USERS, CELLS as usize));
    create_accounts(&cluster, &groups).await;
    let book = Arc::new(Ledgerbook::default());
    // The load avoids node 5, whose disk is replaced.
    let clients: Vec<LedgerClient<Channel>> =
        (1..NODES).map(|node| grpc(cluster.client_address(node), LOAD_REQUEST_TIMEOUT)).collect();
    let workers: Vec<_> = (0..LOAD_WORKERS / 2)
        .map(|worker| tokio::spawn(load_worker(worker, clients.clone(), groups.clone(), book.clone())))
        .collect();
    let replaced = NODES;
    println!("{}", member(&cluster, &["--remove", &replaced.to_string()]));
    cluster.kill(replaced);
    std::fs::remove_dir_all(cluster.node_dir(replaced).join("data")).expect("wipe the node's data");
    let before: u64 = book.acknowledged_by_cell().values().sum();
    cluster.spawn(replaced);
    println!("{}", member(&cluster, &["--add-learner", &replaced.to_string()]));
    println!("{}", member(&cluster, &["--promote", &replaced.to_string()]));
    let after: u64 = book.acknowledged_by_cell().values().sum();
    assert!(after > before, "the cells committed while the node was replaced");
    book.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("a load worker");
    }
    assert!(book.failures.lock().unwrap().is_empty(), "no request failed: {:?}", book.failures.lock().unwrap());
    let statuses = cluster.statuses().await;
    for cell in &statuses[&1].cells {
        assert!(cell.voters.contains(&replaced), "cell {}: node {replaced} is a voter again", cell.cell);
    }
    cluster.assert_replicas_identical().await;
}
