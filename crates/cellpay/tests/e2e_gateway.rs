//! End-to-end: two `cellpay gateway` processes in front of a five-node
//! cluster of real `cellpay node` processes (four cells), under a load of
//! batches that span every cell, sent through both gateways and retried
//! with the same ids on any failure.
//!
//! `two_gateways_under_load_lose_and_double_nothing_when_one_is_killed_and_restarted`:
//! 1. a batch spanning the four cells is split, applied and answered in
//!    request order through a gateway;
//! 2. the load runs through both gateways; gateway 1 is killed (SIGKILL)
//!    and restarted on its port, and the load goes on through both;
//! 3. the leader of cell 1 is killed, so the gateways follow the new leader
//!    (redirects, calls cut mid-flight resent with the same events), and
//!    the node comes back;
//! 4. the audit: every acknowledged transfer is in exactly one cell (each
//!    cell's leader asked directly), once, as sent; every account's balances
//!    are the sums of the transfers found; money is conserved;
//! 5. `cellpay bench --gateway --cross-cell 50` on the same accounts: half
//!    of its transfers pay an account of another cell (try/confirm/cancel
//!    between two cells); every one is applied, and the accounts' debits and
//!    credits each grew by exactly the acknowledged amount once the credit
//!    legs settled (the bench's own check, which fails its exit status).
//!
//! Each process's stdout and stderr go to files beside the cluster's data;
//! when the test fails, the directory is kept and its path printed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellpay_api::proto;
use cellpay_api::proto::ledger_client::LedgerClient;
use cellpay_cluster::topology::Topology;
use cellpay_ledger::{Account, CreateAccountResult, CreateTransferResult, Transfer, BATCH_EVENTS_MAX};
use tonic::transport::Channel;

mod e2e_support;
use e2e_support::{account_of_user, accounts_by_cell, free_port_range, grpc, tail, transfer, Rng, LEDGER};

const NODES: u64 = 5;
const CELLS: u32 = 4;
/// A local cluster's ports (a peer and a client port per node), then one per gateway.
const CLUSTER_PORTS: u16 = 2 * NODES as u16;
const GATEWAYS: usize = 2;
/// Users of the load, one account each, spread over every shard.
const USERS: u64 = 200;
const WORKERS: u64 = 8;
const BATCH_TRANSFERS_MIN: u64 = 8;
const BATCH_TRANSFERS_MAX: u64 = 64;
/// How long a client waits for a gateway's answer (over the gateway's own
/// 10 s of retries plus one call); then the batch is resent, same ids.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const RETRY_BACKOFF: Duration = Duration::from_millis(20);
/// After the load is told to stop, how long a batch in flight keeps being resent.
const STOP_RETRY_DURATION: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(25);
const START_DEADLINE: Duration = Duration::from_secs(30);
const PROGRESS_DEADLINE: Duration = Duration::from_secs(20);
/// Transfers the load acknowledges between two steps of the test.
const PROGRESS_TRANSFERS: u64 = 3_000;
/// `cellpay bench` at the end: transfers, and the percentage between cells.
const BENCH_TRANSFERS: u64 = 4_000;
const BENCH_CROSS_CELL_PERCENT: u64 = 50;
/// The share of the bench's transfers sent pending, then posted.
const BENCH_TWO_PHASE_PERCENT: u64 = 20;

// ---------------------------------------------------------------------------
// The processes: five nodes and two gateways, killed on drop.

struct Cluster {
    /// `None` once kept (a failed test leaves its logs behind).
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    topology_path: PathBuf,
    topology: Topology,
    gateway_addresses: Vec<SocketAddr>,
    /// Running processes by name (`node-3`, `gateway-1`).
    processes: BTreeMap<String, Child>,
    http: reqwest::Client,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = dir.path().to_path_buf();
        let base_port = free_port_range(CLUSTER_PORTS + GATEWAYS as u16);
        let (base, cells) = (base_port.to_string(), CELLS.to_string());
        let output = Command::new(env!("CARGO_BIN_EXE_cellpay"))
            .args(["ctl", "init", "--cells", &cells, "--base-port", &base, "--no-latency"])
            .output()
            .expect("run cellpay ctl init");
        assert!(output.status.success(), "ctl init failed: {}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8(output.stdout).expect("the topology is UTF-8");
        let topology = Topology::parse(&text).expect("ctl init prints a valid topology");
        let topology_path = root.join("cluster.toml");
        std::fs::write(&topology_path, &text).expect("write the topology");
        let gateway_addresses =
            (0..GATEWAYS as u16).map(|g| SocketAddr::from(([127, 0, 0, 1], base_port + CLUSTER_PORTS + g))).collect();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("an HTTP client");
        let mut cluster = Cluster {
            dir: Some(dir),
            root,
            topology_path,
            topology,
            gateway_addresses,
            processes: BTreeMap::new(),
            http,
        };
        eprintln!("cluster: {NODES} nodes, {CELLS} cells, {GATEWAYS} gateways, in {}", cluster.root.display());
        for node in 1..=NODES {
            cluster.spawn_node(node);
        }
        for gateway in 1..=GATEWAYS {
            cluster.spawn_gateway(gateway);
        }
        cluster
    }

    fn spawn(&mut self, name: String, args: &[String]) {
        assert!(!self.processes.contains_key(&name), "{name} is already running");
        let dir = self.root.join(&name);
        std::fs::create_dir_all(&dir).expect("the process's directory");
        let append = |file: &str| -> File {
            OpenOptions::new().create(true).append(true).open(dir.join(file)).expect("a log file")
        };
        let child = Command::new(env!("CARGO_BIN_EXE_cellpay"))
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(append("stdout.log"))
            .stderr(append("stderr.log"))
            .spawn()
            .unwrap_or_else(|error| panic!("start {name}: {error}"));
        self.processes.insert(name, child);
    }

    fn spawn_node(&mut self, node: u64) {
        let name = format!("node-{node}");
        let data = self.root.join(&name).join("data").display().to_string();
        let cluster = self.topology_path.display().to_string();
        let args = ["node", "--cluster", &cluster, "--node", &node.to_string(), "--data", &data];
        self.spawn(name, &args.map(String::from));
    }

    /// Gateway `gateway` (1-based) on its port; the second prefers the nodes
    /// of the last region for its routing watch and status reads.
    fn spawn_gateway(&mut self, gateway: usize) {
        let cluster = self.topology_path.display().to_string();
        let listen = self.gateway_addresses[gateway - 1].to_string();
        let mut args: Vec<String> = ["gateway", "--cluster", &cluster, "--listen", &listen].map(String::from).to_vec();
        if gateway == 2 {
            let region = self.topology.regions.last().expect("regions").name.clone();
            args.extend(["--region".to_string(), region]);
        }
        self.spawn(format!("gateway-{gateway}"), &args);
    }

    /// SIGKILL (std's `kill` on Unix), and reap.
    fn kill(&mut self, name: &str) {
        let mut child = self.processes.remove(name).unwrap_or_else(|| panic!("{name} is not running"));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Panics, showing its log, if a process that should be up has exited.
    fn assert_running(&mut self) {
        for (name, child) in self.processes.iter_mut() {
            if let Some(exit) = child.try_wait().expect("poll a child") {
                let log = std::fs::read_to_string(self.root.join(name).join("stderr.log")).unwrap_or_default();
                panic!("{name} exited by itself ({exit}); its log:\n{}", tail(&log, 40));
            }
        }
    }

    fn node_address(&self, node: u64) -> SocketAddr {
        self.topology.node(node).expect("a node of the topology").client_address
    }

    /// Each cell's leader: the replica that says it leads, at the highest
    /// term, among the nodes that answer; `None` until every cell has one.
    async fn leaders(&self) -> Option<BTreeMap<u64, u64>> {
        let mut best: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for node in self.processes.keys().filter_map(|name| name.strip_prefix("node-")?.parse().ok()) {
            let Some(status) = self.status(node).await else { continue };
            for replica in status["cells"].as_array()?.iter().filter(|replica| replica["role"] == "leader") {
                let (cell, term) = (replica["cell"].as_u64()?, replica["term"].as_u64()?);
                if best.get(&cell).is_none_or(|&(known, _)| term > known) {
                    best.insert(cell, (term, node));
                }
            }
        }
        let leaders: BTreeMap<u64, u64> = best.into_iter().map(|(cell, (_, node))| (cell, node)).collect();
        self.topology.cells.iter().all(|cell| leaders.contains_key(&cell.id)).then_some(leaders)
    }

    async fn status(&self, node: u64) -> Option<serde_json::Value> {
        let url = format!("http://{}/v1/cluster/status", self.node_address(node));
        self.http.get(url).send().await.ok()?.error_for_status().ok()?.json().await.ok()
    }

    async fn wait_for_leaders(&mut self) -> BTreeMap<u64, u64> {
        let started = Instant::now();
        loop {
            self.assert_running();
            if let Some(leaders) = self.leaders().await {
                return leaders;
            }
            assert!(started.elapsed() < START_DEADLINE, "no leader in every cell after {START_DEADLINE:?}");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until gateway `gateway` (1-based) answers `/health` (a node has given it the routing table).
    async fn wait_for_gateway(&mut self, gateway: usize) {
        let url = format!("http://{}/health", self.gateway_addresses[gateway - 1]);
        let started = Instant::now();
        loop {
            self.assert_running();
            let healthy = self.http.get(&url).send().await.is_ok_and(|reply| reply.status().is_success());
            if healthy {
                return;
            }
            assert!(started.elapsed() < START_DEADLINE, "gateway {gateway} not healthy after {START_DEADLINE:?}");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn gateway_client(&self, gateway: usize) -> LedgerClient<Channel> {
        grpc(self.gateway_addresses[gateway - 1], REQUEST_TIMEOUT)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.processes) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("the test failed: the cluster's data and logs are kept in {}", kept.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The load.

#[derive(Default)]
struct Book {
    sent: Mutex<BTreeMap<u128, Transfer>>,
    /// Every event acknowledged (`ok`, or `exists` after a retry).
    acknowledged: Mutex<BTreeMap<u128, CreateTransferResult>>,
    /// Transfers whose batch was never answered: outcome unknown.
    unknown: Mutex<BTreeSet<u128>>,
    /// Transfers acknowledged through each gateway (0-based).
    through: [AtomicU64; GATEWAYS],
    failures: Mutex<BTreeMap<String, u64>>,
    batches_retried: AtomicU64,
    stop: AtomicBool,
}

impl Book {
    fn acknowledged_count(&self) -> u64 {
        self.acknowledged.lock().unwrap().len() as u64
    }

    fn record_failure(&self, gateway: usize, status: &tonic::Status) {
        assert_ne!(status.code(), tonic::Code::InvalidArgument, "a bad request: {}", status.message());
        let message: String = status.message().chars().take(120).collect();
        let key = format!("gateway {}: {:?}: {message}", gateway + 1, status.code());
        *self.failures.lock().unwrap().entry(key).or_default() += 1;
    }
}

/// Sends batches mixing every cell, through the gateways in turn; a failed
/// batch is resent whole, same ids, through the next gateway.
async fn load_worker(
    worker: u64,
    clients: Vec<LedgerClient<Channel>>,
    groups: Arc<BTreeMap<u64, Vec<u128>>>,
    book: Arc<Book>,
) {
    let mut rng = Rng::new(worker + 1);
    let mut next_gateway = worker as usize % clients.len();
    let mut sequence = 0u128;
    let cells: Vec<&Vec<u128>> = groups.values().collect();
    while !book.stop.load(Ordering::Relaxed) {
        let size = BATCH_TRANSFERS_MIN + rng.below(BATCH_TRANSFERS_MAX - BATCH_TRANSFERS_MIN + 1);
        let batch: Vec<Transfer> = (0..size)
            .map(|_| {
                sequence += 1;
                let accounts = cells[rng.below(cells.len() as u64) as usize];
                let debit = rng.below(accounts.len() as u64) as usize;
                let credit = (debit + 1 + rng.below(accounts.len() as u64 - 1) as usize) % accounts.len();
                let id = (u128::from(worker + 1) << 64) | sequence;
                transfer(id, accounts[debit], accounts[credit], 1 + u128::from(rng.below(100)))
            })
            .collect();
        {
            let mut sent = book.sent.lock().unwrap();
            batch.iter().for_each(|t| assert!(sent.insert(t.id, *t).is_none(), "id {} sent twice", t.id));
        }
        let mut stopped_at: Option<Instant> = None;
        for attempt in 1u32.. {
            let gateway = next_gateway % clients.len();
            let mut client = clients[gateway].clone();
            match client.create_transfers(proto::CreateTransfersRequest::from_ledger(&batch)).await {
                Ok(reply) => {
                    let results = reply.into_inner().to_ledger().expect("a well-formed reply");
                    assert_eq!(results.len(), batch.len(), "one result per event");
                    let mut acknowledged = book.acknowledged.lock().unwrap();
                    // `exists` may come on a first attempt too: the gateway
                    // resends a call whose outcome it did not learn.
                    for (transfer, result) in batch.iter().zip(&results) {
                        match result {
                            CreateTransferResult::Ok | CreateTransferResult::Exists => {}
                            other => panic!("transfer {} answered {other}", transfer.id),
                        }
                        acknowledged.insert(transfer.id, *result);
                    }
                    book.through[gateway].fetch_add(batch.len() as u64, Ordering::Relaxed);
                    next_gateway += 1;
                    break;
                }
                Err(status) => book.record_failure(gateway, &status),
            }
            if attempt == 1 {
                book.batches_retried.fetch_add(1, Ordering::Relaxed);
            }
            next_gateway += 1;
            if book.stop.load(Ordering::Relaxed)
                && stopped_at.get_or_insert_with(Instant::now).elapsed() > STOP_RETRY_DURATION
            {
                book.unknown.lock().unwrap().extend(batch.iter().map(|t| t.id));
                break;
            }
            tokio::time::sleep(RETRY_BACKOFF).await;
        }
    }
}

/// Waits until the load has acknowledged `transfers` more (and, if given, that many more through `gateway`).
async fn assert_progress(
    cluster: &mut Cluster,
    book: &Book,
    workers: &[tokio::task::JoinHandle<()>],
    gateway: Option<usize>,
    what: &str,
) {
    let before = book.acknowledged_count();
    let through_before = gateway.map(|g| book.through[g].load(Ordering::Relaxed));
    let started = Instant::now();
    loop {
        cluster.assert_running();
        assert!(workers.iter().all(|worker| !worker.is_finished()), "{what}: a load worker ended (panicked?)");
        let done = book.acknowledged_count() >= before + PROGRESS_TRANSFERS;
        let through = match (gateway, through_before) {
            (Some(g), Some(b)) => book.through[g].load(Ordering::Relaxed) >= b + PROGRESS_TRANSFERS,
            _ => true,
        };
        if done && through {
            eprintln!(
                "{what}: {} transfers acknowledged in {} ms",
                book.acknowledged_count() - before,
                started.elapsed().as_millis()
            );
            return;
        }
        if started.elapsed() >= PROGRESS_DEADLINE {
            let failures = book.failures.lock().unwrap().clone();
            panic!("{what}: the load made no progress for {PROGRESS_DEADLINE:?}; failures: {failures:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

// ---------------------------------------------------------------------------
// The test.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_under_load_lose_and_double_nothing_when_one_is_killed_and_restarted() {
    let test_started = Instant::now();
    let mut cluster = Cluster::start();
    let leaders = cluster.wait_for_leaders().await;
    for gateway in 1..=GATEWAYS {
        cluster.wait_for_gateway(gateway).await;
    }
    eprintln!("leaders {leaders:?} (cell -> node); gateways up in {} ms", test_started.elapsed().as_millis());

    // 1. One request of accounts spanning the four cells, then one of
    // transfers: split, applied, answered in request order.
    let groups = Arc::new(accounts_by_cell(&cluster.topology, USERS, CELLS as usize));
    let mut client = cluster.gateway_client(1);
    let accounts: Vec<Account> = (1..=USERS)
        .map(|u| Account { id: account_of_user(u), ledger: LEDGER, code: 1, ..Account::default() })
        .collect();
    let results = create_accounts(&mut client, &accounts).await;
    assert_eq!(results, vec![CreateAccountResult::Ok; accounts.len()]);
    let firsts: Vec<u128> = groups.values().map(|group| group[0]).collect();
    let seconds: Vec<u128> = groups.values().map(|group| group[1]).collect();
    let mut batch = Vec::new();
    for (position, (&debit, &credit)) in firsts.iter().zip(&seconds).enumerate() {
        batch.push(transfer(u128::from(position as u64) + 1, debit, credit, 10));
        batch.push(transfer(u128::from(position as u64) + 100, credit, debit, 3));
    }
    batch.insert(3, transfer(1, firsts[0], seconds[0], 10)); // the same id again: exists, in its place
    let results = client
        .create_transfers(proto::CreateTransfersRequest::from_ledger(&batch))
        .await
        .expect("a batch")
        .into_inner()
        .to_ledger()
        .unwrap();
    let mut expected = vec![CreateTransferResult::Ok; batch.len()];
    expected[3] = CreateTransferResult::Exists;
    assert_eq!(results, expected, "results in request order");
    let mut book = Book::default();
    for transfer in &batch {
        book.sent.get_mut().unwrap().insert(transfer.id, *transfer);
        book.acknowledged.get_mut().unwrap().insert(transfer.id, CreateTransferResult::Ok);
    }
    let book = Arc::new(book);

    // 2. The load through both gateways; gateway 1 killed and restarted.
    let clients: Vec<LedgerClient<Channel>> = (1..=GATEWAYS).map(|g| cluster.gateway_client(g)).collect();
    let workers: Vec<_> =
        (0..WORKERS).map(|w| tokio::spawn(load_worker(w, clients.clone(), groups.clone(), book.clone()))).collect();
    assert_progress(&mut cluster, &book, &workers, Some(0), "warm-up through gateway 1").await;
    cluster.kill("gateway-1");
    eprintln!("killed gateway 1");
    assert_progress(&mut cluster, &book, &workers, Some(1), "gateway 1 down").await;
    cluster.spawn_gateway(1);
    cluster.wait_for_gateway(1).await;
    eprintln!("restarted gateway 1");
    assert_progress(&mut cluster, &book, &workers, Some(0), "gateway 1 back").await;

    // 3. The leader of cell 1 is killed; the gateways follow the new one.
    let leaders = cluster.wait_for_leaders().await;
    let victim = leaders[&cluster.topology.cells[0].id];
    cluster.kill(&format!("node-{victim}"));
    eprintln!("killed node {victim}, the leader of cell {}", cluster.topology.cells[0].id);
    assert_progress(&mut cluster, &book, &workers, None, "a leader down").await;
    cluster.spawn_node(victim);
    assert_progress(&mut cluster, &book, &workers, None, "the node back").await;

    // 4. Stop the load, then audit.
    book.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("a load worker");
    }
    let sent = book.sent.lock().unwrap().clone();
    let acknowledged = book.acknowledged.lock().unwrap().clone();
    let unknown = book.unknown.lock().unwrap().clone();
    let exists = acknowledged.values().filter(|r| **r == CreateTransferResult::Exists).count();
    println!(
        "load: {} transfers sent, {} acknowledged ({exists} as exists after a retry), {} unknown; through gateway 1 {}, \
         gateway 2 {}; batches retried {}; failed calls {:?}",
        sent.len(),
        acknowledged.len(),
        unknown.len(),
        book.through[0].load(Ordering::Relaxed),
        book.through[1].load(Ordering::Relaxed),
        book.batches_retried.load(Ordering::Relaxed),
        book.failures.lock().unwrap()
    );
    assert_eq!(acknowledged.len() + unknown.len(), sent.len(), "every batch ended acknowledged or unknown");

    // Each cell's leader, asked directly for every id: each transfer is in one cell only.
    let ids: Vec<u128> = sent.keys().copied().collect();
    let mut found: BTreeMap<u128, Transfer> = BTreeMap::new();
    let mut holders: BTreeMap<u128, Vec<u64>> = BTreeMap::new();
    let cells: Vec<u64> = cluster.topology.cells.iter().map(|cell| cell.id).collect();
    for cell in cells {
        for transfer in lookup_in_cell(&mut cluster, cell, &ids).await {
            holders.entry(transfer.id).or_default().push(cell);
            found.insert(transfer.id, transfer);
        }
    }
    let doubled: Vec<(&u128, &Vec<u64>)> = holders.iter().filter(|(_, cells)| cells.len() > 1).collect();
    assert!(doubled.is_empty(), "transfers in more than one cell: {doubled:?}");
    for id in acknowledged.keys() {
        let stored = found.get(id).unwrap_or_else(|| panic!("acknowledged transfer {id} is missing"));
        let sent = &sent[id];
        assert_eq!(
            (stored.debit_account_id, stored.credit_account_id, stored.amount),
            (sent.debit_account_id, sent.credit_account_id, sent.amount),
            "transfer {id}"
        );
    }
    assert!(found.keys().all(|id| sent.contains_key(id)), "a transfer found that was never sent");
    // The gateway agrees, in request order.
    let mut gateway = cluster.gateway_client(2);
    for chunk in ids.chunks(BATCH_EVENTS_MAX) {
        let through_gateway = gateway
            .lookup_transfers(proto::LookupTransfersRequest::from_ledger(chunk))
            .await
            .expect("a lookup")
            .into_inner()
            .to_ledger()
            .unwrap();
        let expected: Vec<u128> = chunk.iter().copied().filter(|id| found.contains_key(id)).collect();
        assert_eq!(through_gateway.iter().map(|t| t.id).collect::<Vec<_>>(), expected);
    }

    // Balances are the sums of the transfers found: nothing lost, nothing doubled.
    let mut sums: BTreeMap<u128, (u128, u128)> = BTreeMap::new();
    for transfer in found.values() {
        sums.entry(transfer.debit_account_id).or_default().0 += transfer.amount;
        sums.entry(transfer.credit_account_id).or_default().1 += transfer.amount;
    }
    let account_ids: Vec<u128> = (1..=USERS).map(account_of_user).collect();
    let accounts = gateway
        .lookup_accounts(proto::LookupAccountsRequest::from_ledger(&account_ids))
        .await
        .expect("a lookup")
        .into_inner()
        .to_ledger()
        .unwrap();
    assert_eq!(accounts.len(), account_ids.len());
    let (mut debits, mut credits) = (0u128, 0u128);
    for account in &accounts {
        let (debited, credited) = sums.get(&account.id).copied().unwrap_or_default();
        assert_eq!((account.debits_posted, account.credits_posted), (debited, credited), "account {}", account.id);
        debits += account.debits_posted;
        credits += account.credits_posted;
    }
    assert_eq!(debits, credits, "money is conserved");
    println!(
        "audit: {} transfers found, each in one cell; {} accounts, Σ debits = Σ credits = {debits}; the test ran {:.1} s",
        found.len(),
        accounts.len(),
        test_started.elapsed().as_secs_f64()
    );

    // 5. The bench through gateway 2, half of its transfers between cells.
    bench_cross_cell(&cluster).await;

    // 6. A ledger defined online: every cell adopts it before `ctl` returns.
    define_ledger(&cluster).await;

    // 7. A cell's leader preference changed online: its leader moves.
    change_leader_preference(&cluster).await;
}

/// `cellpay ctl topology --apply`: the global cell adopts a topology where
/// cell 1 prefers shenzhen (node 5), and cell 1's leader moves there; what
/// may not change online is refused.
async fn change_leader_preference(cluster: &Cluster) {
    let mut next = cluster.topology.clone();
    next.cells[0].leader_preference.rotate_right(1);
    assert_eq!(next.cells[0].leader_preference[0], "sz-a");
    let next_path = cluster.root.join("preferring-shenzhen.toml");
    std::fs::write(&next_path, next.to_toml()).expect("write the topology");
    let apply = |path: &std::path::Path| ctl(cluster, &["topology", "--apply", &path.display().to_string()]);
    let (ok, text) = apply(&next_path);
    assert!(ok && text.contains("topology applied: version 2 in the global cell"), "{text}");
    assert!(text.contains("cell 1: led from its new first choice after"), "{text}");
    println!("ctl topology --apply: {}", text.trim().replace('\n', "; "));
    let (ok, text) = apply(&next_path);
    assert!(ok && text.contains("topology was already applied: version 2"), "{text}");
    let mut latency = next.to_toml();
    assert_eq!(latency.matches("enabled = false").count(), 1);
    latency = latency.replace("enabled = false", "enabled = true");
    let latency_path = cluster.root.join("latency.toml");
    std::fs::write(&latency_path, latency).expect("write the topology");
    let (ok, text) = apply(&latency_path);
    assert!(!ok && text.contains("latency cannot change online"), "{text}");
    for node in 1..=NODES {
        let url = format!("http://{}/v1/cluster/topology?newer_than=1&wait_ms=1500", cluster.node_address(node));
        let table: serde_json::Value = cluster.http.get(&url).send().await.unwrap().json().await.unwrap();
        assert_eq!(table["version"], 2, "node {node}: {table}");
        assert_eq!(table["leader_preference"]["1"][0], "sz-a", "node {node}: {table}");
    }
}

/// Runs `cellpay ctl ARGS --cluster FILE`: whether it succeeded, and its stdout and stderr.
fn ctl(cluster: &Cluster, args: &[&str]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cellpay"));
    command.arg("ctl").args(args).arg("--cluster").arg(&cluster.topology_path);
    let output = command.output().expect("run cellpay ctl");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), format!("{stdout}{stderr}"))
}

/// Creates accounts through a gateway; the per-account results.
async fn create_accounts(client: &mut LedgerClient<Channel>, accounts: &[Account]) -> Vec<CreateAccountResult> {
    let request = proto::CreateAccountsRequest::from_ledger(accounts);
    client.create_accounts(request).await.expect("accounts created").into_inner().to_ledger().unwrap()
}

/// `cellpay ctl ledgers define` and `show`: the global cell defines USD
/// (ledger 840), every cell adopts it, and accounts on it are created in
/// every cell through a gateway; an undefined ledger is refused.
async fn define_ledger(cluster: &Cluster) {
    let ledgers = |args: &[&str]| ctl(cluster, &[&["ledgers"], args].concat());
    let usd = ["define", "--id", "840", "--name", "USD", "--asset-scale", "2"];
    let (ok, text) = ledgers(&usd);
    assert!(ok && text.contains("USD (ledger 840, 2 decimal places) defined: definitions version 2"), "{text}");
    println!("ctl ledgers define: {}", text.trim());
    let (ok, text) = ledgers(&usd);
    assert!(ok && text.contains("was already defined"), "running it again is safe: {text}");
    let (ok, text) = ledgers(&["define", "--id", "840", "--name", "USD", "--asset-scale", "4"]);
    assert!(!ok && text.contains("a definition is final"), "{text}");
    // `define` waits for every cell's leader; a follower's replica of the
    // global cell (here node 4, just restarted) may apply it a moment later.
    for node in 1..=NODES {
        let url = format!("http://{}/v1/cluster/ledgers?newer_than=1&wait_ms=3000", cluster.node_address(node));
        let table: serde_json::Value = cluster.http.get(&url).send().await.unwrap().json().await.unwrap();
        assert_eq!(table["version"], 2, "node {node}: {table}");
    }
    let (ok, text) = ledgers(&["show"]);
    assert!(ok && text.starts_with("ledger definitions version 2, 2 ledgers (nodes 1,2,3,4,5)\n"), "{text}");

    let mut client = cluster.gateway_client(1);
    let groups = accounts_by_cell(&cluster.topology, USERS, CELLS as usize);
    let mut accounts: Vec<Account> =
        groups.values().map(|group| Account { id: group[0] + 1, ledger: 840, code: 1, ..Account::default() }).collect();
    accounts.push(Account { id: groups.values().next().unwrap()[1] + 1, ledger: 978, code: 1, ..Account::default() });
    let results = create_accounts(&mut client, &accounts).await;
    let mut expected = vec![CreateAccountResult::Ok; CELLS as usize];
    expected.push(CreateAccountResult::LedgerNotDefined);
    assert_eq!(results, expected, "ledger 840 in every cell, 978 nowhere");
}

/// Runs `cellpay bench` through gateway 2 with `--cross-cell 50` on the
/// load's accounts (same ledger and fields, so the bench finds them
/// created), and checks its result.
async fn bench_cross_cell(cluster: &Cluster) {
    let output_path = cluster.root.join("bench.json");
    let mut args: Vec<String> =
        ["bench", "--gateway", "--ledger", "1", "--batch-size", "100", "--concurrency", "4"].map(String::from).to_vec();
    args.extend(["--address".into(), cluster.gateway_addresses[1].to_string()]);
    args.extend(["--cluster".into(), cluster.topology_path.display().to_string()]);
    args.extend(["--accounts".into(), USERS.to_string(), "--transfers".into(), BENCH_TRANSFERS.to_string()]);
    args.extend(["--cross-cell".into(), BENCH_CROSS_CELL_PERCENT.to_string()]);
    args.extend(["--two-phase".into(), BENCH_TWO_PHASE_PERCENT.to_string()]);
    args.extend(["--output".into(), output_path.display().to_string()]);
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || Command::new(env!("CARGO_BIN_EXE_cellpay")).args(&args).output())
        .await
        .expect("the bench's task")
        .expect("run cellpay bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "cellpay bench failed: {}", tail(&stderr, 20));
    let text = std::fs::read_to_string(&output_path).expect("the bench's JSON");
    let result: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    // Every pending transfer accepted was posted: its post is a transfer too.
    let pending = result["pending_ok"].as_u64().expect("pending_ok");
    let expected_pending = BENCH_TRANSFERS * BENCH_TWO_PHASE_PERCENT / 100;
    assert!(pending.abs_diff(expected_pending) < expected_pending / 5, "a fifth two-phase: {text}");
    assert_eq!(result["transfers"], BENCH_TRANSFERS + pending, "{text}");
    assert_eq!(result["transfers_ok"], BENCH_TRANSFERS + pending, "every transfer applied: {text}");
    assert_eq!(result["conserved"], true, "{text}");
    let cross_cell = result["transfers_cross_cell"].as_u64().expect("transfers_cross_cell");
    let expected = BENCH_TRANSFERS * BENCH_CROSS_CELL_PERCENT / 100;
    assert!(cross_cell.abs_diff(expected) < expected / 10, "about half between cells: {text}");
    println!(
        "bench: {BENCH_TRANSFERS} transfers through gateway 2, {cross_cell} between cells, {pending} two-phase (and \
         their posts), all applied and conserved (pending settled in {:.1} ms); {:.1} s",
        result["pending_settled_ms"].as_f64().unwrap_or(f64::NAN),
        started.elapsed().as_secs_f64()
    );
}

/// The transfers of `ids` that cell `cell` holds, from its leader (a call
/// forwarded for that cell, served by the leader's replica only).
async fn lookup_in_cell(cluster: &mut Cluster, cell: u64, ids: &[u128]) -> Vec<Transfer> {
    let started = Instant::now();
    let mut found = Vec::new();
    for chunk in ids.chunks(BATCH_EVENTS_MAX) {
        loop {
            let leaders = cluster.wait_for_leaders().await;
            let mut client = grpc(cluster.node_address(leaders[&cell]), REQUEST_TIMEOUT);
            let mut request = tonic::Request::new(proto::LookupTransfersRequest::from_ledger(chunk));
            request.metadata_mut().insert("cellpay-forwarded", format!("cell={cell}").parse().unwrap());
            match client.lookup_transfers(request).await {
                Ok(reply) => {
                    found.extend(reply.into_inner().to_ledger().unwrap());
                    break;
                }
                Err(status) => assert!(started.elapsed() < START_DEADLINE, "cell {cell}: lookups fail: {status}"),
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
    found
}
