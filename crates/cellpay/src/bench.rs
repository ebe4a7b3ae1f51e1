//! `cellpay bench`: a load generator against a running server.
//!
//! Creates the accounts (idempotently), then `concurrency` clients each send
//! batches of transfers back to back until `transfers` have been sent (or
//! `--duration-s` has passed). `--two-phase P` sends P % of them pending,
//! each posted in its client's next batch (every pending one is posted
//! before the bench ends). Reports transfers/s, batch latency percentiles
//! and the CPU seconds spent per million transfers (the whole machine's, from
//! `/proc/stat`, and the bench's own), writes them as JSON, and checks at the
//! end that its accounts' debits and credits each grew by exactly the amount
//! the acknowledged transfers posted and that nothing is left pending, so a
//! fast wrong answer cannot pass. (It assumes no other client moves money on
//! its ledger meanwhile.)
//!
//! Through a gateway, `--cross-cell P` makes P % of the transfers pay an
//! account of another cell (a try/confirm/cancel operation between two
//! cells). Such a transfer is answered once its coordinator's decision is
//! durable; the other cell posts its credit leg a few milliseconds later, so
//! the check waits for the accounts' pending sums to come back to where they
//! were before it compares.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Result};
use cellpay_ledger::{
    id, Account, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags, BATCH_EVENTS_MAX,
};
use hdrhistogram::Histogram;
use serde::Serialize;

use cellpay_cluster::topology::Topology;

use crate::client::Client;

#[derive(clap::Args, Clone)]
pub struct BenchArgs {
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:7300", env = "CELLPAY_ADDRESS")]
    pub address: String,
    /// Accounts to spread transfers over (created first if missing).
    #[arg(long, default_value_t = 1_000_000)]
    pub accounts: u64,
    /// Transfers to send in all (with --duration-s: at most).
    #[arg(long, default_value_t = 1_000_000)]
    pub transfers: u64,
    /// Send for this many seconds (or until --transfers are sent), then
    /// post the pending transfers still open and stop.
    #[arg(long)]
    pub duration_s: Option<u64>,
    /// The percentage (0 to 100) of transfers sent as two-phase: pending
    /// first, then posted in the client's next batch (the post counts as a
    /// transfer too).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub two_phase: u8,
    /// Transfers per request (at most 8190).
    #[arg(long, default_value_t = 8190)]
    pub batch_size: usize,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// How accounts are picked: uniform, or zipf (a few hot accounts, like merchants).
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// The Zipf exponent (with --distribution zipf).
    #[arg(long, default_value_t = 1.0)]
    pub zipf_exponent: f64,
    /// Seed for account choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The ledger the bench's accounts live on: one the cluster defines
    /// (`ctl init` and the demo define ledger 1; see `ctl ledgers`).
    #[arg(long, default_value_t = 1)]
    pub ledger: u32,
    /// Write the result as JSON here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// The cluster's topology file: each batch's transfers then stay inside
    /// one cell (between accounts whose shards that cell owns), batches go
    /// to the cells in turn, and account creation is split by cell.
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// With --cluster: send every batch to --address (a gateway) rather
    /// than to the cells' leaders, each batch's transfers taking the cells
    /// in turn (each transfer stays inside one cell), so that the gateway
    /// splits every batch.
    #[arg(long, requires = "cluster")]
    pub gateway: bool,
    /// With --cluster and --gateway: the percentage (0 to 100) of transfers
    /// whose credit account is in another cell than their debit account.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub cross_cell: Option<u8>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Uniform,
    Zipf,
}

#[derive(Serialize, Debug)]
pub struct BenchResult {
    pub accounts: u64,
    /// Transfers sent: single-phase, pending, and posts of pending.
    pub transfers: u64,
    pub transfers_ok: u64,
    /// The `--two-phase` percentage asked for, and the pending transfers accepted (each posted later).
    pub two_phase_percent: u8,
    pub pending_ok: u64,
    /// Results other than `ok`, counted by code.
    pub transfers_not_ok: BTreeMap<&'static str, u64>,
    /// The `--cross-cell` percentage asked for.
    pub cross_cell_percent: u8,
    /// Transfers sent between two cells, and their share of all sent.
    pub transfers_cross_cell: u64,
    pub cross_cell_share: f64,
    pub batch_size: usize,
    pub concurrency: usize,
    pub distribution: Distribution,
    pub seconds: f64,
    pub transfers_per_second: f64,
    pub batch_latency_ms_p50: f64,
    pub batch_latency_ms_p99: f64,
    pub batch_latency_ms_p999: f64,
    pub batch_latency_ms_max: f64,
    /// How long after the last answer the accounts' pending sums took to
    /// come back to their values before the run (cross-cell credit legs
    /// posted after their decision).
    pub pending_settled_ms: f64,
    /// Whether the pending sums came back within `SETTLE_DURATION_MAX`
    /// (when not, `conserved` is false: legs are still in flight).
    pub pending_settled: bool,
    /// CPU seconds the whole machine (cluster and bench) spent per million
    /// transfers sent, from `/proc/stat`: on a machine running nothing
    /// else, the cost of a transfer end to end.
    pub cpu_seconds_per_million_transfers: Option<f64>,
    /// The bench process's own share of that.
    pub bench_cpu_seconds_per_million_transfers: Option<f64>,
    pub conserved: bool,
}

/// CPU time spent so far: the whole machine's busy time (all cores) and
/// this process's, in seconds; `None` where `/proc` cannot tell.
#[derive(Clone, Copy)]
struct CpuTimes {
    machine: Option<f64>,
    process: Option<f64>,
}

/// `/proc`'s clock ticks per second (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

impl CpuTimes {
    fn now() -> CpuTimes {
        let machine = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
            let line = stat.lines().next()?;
            let fields: Vec<f64> = line.split_whitespace().skip(1).map_while(|field| field.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
            let busy: f64 = fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
            (fields.len() >= 8).then_some(busy / USER_HZ)
        });
        let process = std::fs::read_to_string("/proc/self/stat").ok().and_then(|stat| {
            // After the command name's closing parenthesis: state is field 3, utime 14 and stime 15.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |at: usize| fields.get(at - 3)?.parse::<f64>().ok();
            Some((ticks(14)? + ticks(15)?) / USER_HZ)
        });
        CpuTimes { machine, process }
    }

    /// Seconds per million transfers since `before`.
    fn per_million(self, before: CpuTimes, transfers: u64) -> (Option<f64>, Option<f64>) {
        let per = |now: Option<f64>, then: Option<f64>| Some((now? - then?) * 1e6 / transfers.max(1) as f64);
        (per(self.machine, before.machine), per(self.process, before.process))
    }
}

/// xorshift64*: small, fast, seeded.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks account indexes in `0..accounts`.
#[derive(Clone)]
pub struct Picker {
    accounts: u64,
    /// Cumulative Zipf weights, or empty for uniform.
    cdf: Arc<Vec<f64>>,
}

impl Picker {
    pub fn new(accounts: u64, distribution: Distribution, exponent: f64) -> Picker {
        let cdf = match distribution {
            Distribution::Uniform => Vec::new(),
            Distribution::Zipf => {
                let mut sum = 0.0;
                let mut cdf: Vec<f64> = (1..=accounts)
                    .map(|rank| {
                        sum += 1.0 / (rank as f64).powf(exponent);
                        sum
                    })
                    .collect();
                cdf.iter_mut().for_each(|c| *c /= sum);
                cdf
            }
        };
        Picker { accounts, cdf: Arc::new(cdf) }
    }

    pub fn pick(&self, rng: &mut Rng) -> u64 {
        if self.cdf.is_empty() {
            rng.below(self.accounts)
        } else {
            let u = rng.unit();
            (self.cdf.partition_point(|c| *c < u) as u64).min(self.accounts - 1)
        }
    }

    /// Two different accounts.
    pub fn pair(&self, rng: &mut Rng) -> (u64, u64) {
        let debit = self.pick(rng);
        let mut credit = self.pick(rng);
        if credit == debit {
            credit = (debit + 1 + rng.below(self.accounts - 1)) % self.accounts;
        }
        (debit, credit)
    }
}

/// The id of the bench's `index`-th account: user `index + 1`, account 1, so
/// the accounts spread over every shard.
pub fn bench_account_id(index: u64) -> u128 {
    id::account_id(index + 1, 1).expect("not a reserved id")
}

/// The bench's account indexes `0..count` grouped by the cell that owns
/// them (one group when there is no topology), each group in index order.
pub fn accounts_by_cell(count: u64, topology: Option<&Topology>) -> Vec<Vec<u64>> {
    let Some(topology) = topology else { return vec![(0..count).collect()] };
    let mut groups: std::collections::BTreeMap<u64, Vec<u64>> = std::collections::BTreeMap::new();
    for index in 0..count {
        let shard = id::shard_of_account(bench_account_id(index), topology.shards);
        let cell = topology.cell_of_shard(shard).expect("a valid topology owns every shard");
        groups.entry(cell).or_default().push(index);
    }
    groups.into_values().collect()
}

/// The cells that own at least one of the bench's accounts, by id.
fn accounts_by_cell_ids(count: u64, topology: &Topology) -> Vec<u64> {
    let mut ids: Vec<u64> = (0..count)
        .map(|index| id::shard_of_account(bench_account_id(index), topology.shards))
        .filter_map(|shard| topology.cell_of_shard(shard))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Where each cell's leader is, refreshed every second from the nodes'
/// status, with a client of every node.
pub struct Routes {
    leaders: Arc<std::sync::RwLock<std::collections::BTreeMap<u64, u64>>>,
    clients: std::collections::BTreeMap<u64, Client>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Routes {
    pub async fn start(topology: Topology) -> Result<Routes> {
        let mut clients = std::collections::BTreeMap::new();
        for node in topology.nodes() {
            if let Ok(client) = Client::connect(&node.client_address.to_string()).await {
                clients.insert(node.id, client);
            }
        }
        let leaders = Arc::new(std::sync::RwLock::new(std::collections::BTreeMap::new()));
        let shared = leaders.clone();
        let refresher = tokio::spawn(async move {
            loop {
                let statuses = crate::ctl::fetch_statuses(&topology).await;
                let known = crate::ctl::leaders(&topology, &statuses)
                    .into_iter()
                    .filter_map(|(cell, leader)| Some((cell, leader?)))
                    .collect();
                *shared.write().expect("routes lock") = known;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(Routes { leaders, clients, refresher })
    }

    /// A client of `cell`'s leader, if known.
    pub fn client_for(&self, cell: u64) -> Option<Client> {
        let leader = *self.leaders.read().expect("routes lock").get(&cell)?;
        self.clients.get(&leader).cloned()
    }
}

impl Drop for Routes {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Creates accounts `0..count` on `ledger` (no balance limits), accepting
/// ones that exist; each request holds accounts of one cell only.
pub async fn create_accounts(client: &mut Client, count: u64, ledger: u32, topology: Option<&Topology>) -> Result<()> {
    let started = Instant::now();
    let mut created = 0u64;
    let groups = accounts_by_cell(count, topology);
    let chunks = groups.iter().flat_map(|group| group.chunks(BATCH_EVENTS_MAX));
    for (number, chunk) in chunks.enumerate() {
        let last = (number as u64 + 1) * BATCH_EVENTS_MAX as u64;
        let batch: Vec<Account> = chunk
            .iter()
            .map(|&index| Account { id: bench_account_id(index), ledger, code: 1, ..Account::default() })
            .collect();
        let results = client.create_accounts(&batch).await?;
        for (account, result) in batch.iter().zip(&results) {
            match result {
                CreateAccountResult::Ok => created += 1,
                CreateAccountResult::Exists => {}
                CreateAccountResult::LedgerNotDefined => {
                    bail!("ledger {ledger} is not defined: pick a defined one with --ledger (see ctl ledgers show)")
                }
                other => bail!("account {} could not be created: {other}", account.id),
            }
        }
        if started.elapsed() > Duration::from_secs(1) && number % 16 == 15 {
            eprintln!("accounts: {}/{count}", last.min(count));
        }
    }
    eprintln!("accounts: {count} ready ({created} created) in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Sums of the bench's accounts' balances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sums {
    pub debits_posted: u128,
    pub credits_posted: u128,
    pub debits_pending: u128,
    pub credits_pending: u128,
}

pub async fn sums(client: &mut Client, count: u64) -> Result<Sums> {
    let ids: Vec<u128> = (0..count).map(bench_account_id).collect();
    let accounts = client.lookup_accounts_all(&ids).await?;
    ensure!(accounts.len() as u64 == count, "{} of {count} accounts found", accounts.len());
    let mut sums = Sums::default();
    for a in &accounts {
        sums.debits_posted = sums.debits_posted.wrapping_add(a.debits_posted);
        sums.credits_posted = sums.credits_posted.wrapping_add(a.credits_posted);
        sums.debits_pending = sums.debits_pending.wrapping_add(a.debits_pending);
        sums.credits_pending = sums.credits_pending.wrapping_add(a.credits_pending);
    }
    Ok(sums)
}

/// True when, between `before` and `after`, the accounts' debits and credits
/// each grew by exactly the amount the acknowledged transfers moved. (The
/// accounts may share a ledger with earlier runs, so absolute sums over them
/// need not balance; the change made by this run must.)
pub fn conserved(before: Sums, after: Sums, amount_ok: u128) -> bool {
    after.debits_posted.wrapping_sub(before.debits_posted) == amount_ok
        && after.credits_posted.wrapping_sub(before.credits_posted) == amount_ok
        && after.debits_pending == before.debits_pending
        && after.credits_pending == before.credits_pending
}

/// How long the bench waits, after its last answer, for its accounts'
/// pending sums to come back: a cell posts a cross-cell credit leg as soon
/// as it has the coordinator's decision (milliseconds), or, if that message
/// was lost, at the coordinator's next resend (every second) or after an
/// election (1 to 2 s). After a minute of peak load on one machine, the
/// nodes are still writing the load's checkpoints and one read of a
/// million accounts' sums takes seconds: the wait for the sums took 18.6 s
/// in one run and passed 15 s in another (BENCHMARKS.md).
const SETTLE_DURATION_MAX: Duration = Duration::from_secs(60);
const SETTLE_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The accounts' sums once their pending sums are back at `before`'s (every
/// leg of the run posted or voided), how long that took, and whether they
/// came back. After `SETTLE_DURATION_MAX`, the last sums read: the
/// conservation check then fails, as it should.
pub async fn settled_sums(client: &mut Client, count: u64, before: Sums) -> Result<(Sums, Duration, bool)> {
    let started = Instant::now();
    loop {
        let sums = sums(client, count).await?;
        let settled = sums.debits_pending == before.debits_pending && sums.credits_pending == before.credits_pending;
        if settled || started.elapsed() >= SETTLE_DURATION_MAX {
            return Ok((sums, started.elapsed(), settled));
        }
        tokio::time::sleep(SETTLE_POLL_INTERVAL).await;
    }
}

pub async fn run(args: BenchArgs) -> Result<()> {
    ensure!((1..=BATCH_EVENTS_MAX).contains(&args.batch_size), "--batch-size must be 1 to {BATCH_EVENTS_MAX}");
    ensure!(args.accounts >= 2, "--accounts must be at least 2");
    ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(
        args.cross_cell.is_none() || args.gateway,
        "--cross-cell needs --cluster and --gateway: the bench takes the two accounts of a cross-cell transfer from \
         two cells of the topology, and sends such transfers through a gateway"
    );
    let result = bench(&args).await?;
    let json = serde_json::to_string_pretty(&result)?;
    println!("{json}");
    if let Some(path) = &args.output {
        std::fs::write(path, &json)?;
    }
    ensure!(
        result.pending_settled,
        "the bench's cross-cell legs were still pending {:.0} s after its last answer: the cluster has not settled \
         them, so conservation could not be checked",
        result.pending_settled_ms / 1000.0
    );
    ensure!(
        result.conserved,
        "the bench's accounts do not conserve money: the balances moved by other than the acknowledged transfers"
    );
    ensure!(
        result.transfers_ok == result.transfers,
        "{} transfers were not applied",
        result.transfers - result.transfers_ok
    );
    Ok(())
}

/// How long a two-phase transfer of the bench may stay pending (it is
/// posted in its client's next batch, milliseconds later).
const PENDING_TIMEOUT_S: u32 = 300;

/// Takes up to `wanted` from the transfers left to send; how many it took.
fn claim(budget: &AtomicU64, wanted: u64) -> u64 {
    let before = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| Some(left - left.min(wanted)));
    before.expect("the update always succeeds").min(wanted)
}

/// The bench's account indexes grouped by cell, with a picker for each group.
struct Groups {
    groups: Vec<Vec<u64>>,
    pickers: Vec<Picker>,
}

impl Groups {
    fn new(groups: Vec<Vec<u64>>, args: &BenchArgs) -> Groups {
        let pickers =
            groups.iter().map(|group| Picker::new(group.len() as u64, args.distribution, args.zipf_exponent)).collect();
        Groups { groups, pickers }
    }

    /// The debit and credit accounts of a transfer whose debit account is
    /// in group `cell`: the credit account in the same group, or with
    /// `cross_cell` in another one, taken at random.
    fn pair(&self, cell: usize, cross_cell: bool, rng: &mut Rng) -> (u128, u128) {
        let account = |group: usize, index: u64| bench_account_id(self.groups[group][index as usize]);
        if !cross_cell {
            let (debit, credit) = self.pickers[cell].pair(rng);
            return (account(cell, debit), account(cell, credit));
        }
        assert!(self.groups.len() >= 2, "a cross-cell transfer needs two cells");
        let other = (cell + 1 + rng.below(self.groups.len() as u64 - 1) as usize) % self.groups.len();
        (account(cell, self.pickers[cell].pick(rng)), account(other, self.pickers[other].pick(rng)))
    }
}

/// What the clients saw: batch latency (µs), and the transfers by outcome.
struct Tally {
    latency: Histogram<u64>,
    sent: u64,
    ok: u64,
    /// What the accepted transfers posted (a pending one posts nothing until its post).
    amount_ok: u128,
    pending_ok: u64,
    cross_cell: u64,
    not_ok: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn new() -> Tally {
        let latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        Tally { latency, sent: 0, ok: 0, amount_ok: 0, pending_ok: 0, cross_cell: 0, not_ok: BTreeMap::new() }
    }

    /// Counts a batch's results; the pending transfers accepted, to post.
    fn record(&mut self, batch: &[Transfer], results: &[CreateTransferResult], accepted: &mut Vec<Transfer>) {
        self.sent += batch.len() as u64;
        for (transfer, result) in batch.iter().zip(results) {
            if *result != CreateTransferResult::Ok {
                *self.not_ok.entry(result.as_str()).or_default() += 1;
                continue;
            }
            self.ok += 1;
            if transfer.flags.contains(TransferFlags::PENDING) {
                self.pending_ok += 1;
                accepted.push(*transfer);
            } else {
                self.amount_ok += transfer.amount;
            }
        }
    }

    fn add(&mut self, other: Tally) -> Result<()> {
        self.latency.add(other.latency)?;
        self.sent += other.sent;
        self.ok += other.ok;
        self.amount_ok += other.amount_ok;
        self.pending_ok += other.pending_ok;
        self.cross_cell += other.cross_cell;
        for (code, count) in other.not_ok {
            *self.not_ok.entry(code).or_default() += count;
        }
        Ok(())
    }
}

pub async fn bench(args: &BenchArgs) -> Result<BenchResult> {
    let cross_cell_percent = args.cross_cell.unwrap_or(0);
    let mut client = Client::connect(&args.address).await?;
    let topology = args.cluster.as_deref().map(Topology::load).transpose()?;
    create_accounts(&mut client, args.accounts, args.ledger, topology.as_ref()).await?;
    let before = sums(&mut client, args.accounts).await?;
    // Each batch stays in one cell: its transfers pick accounts of that cell.
    let groups = Arc::new(Groups::new(accounts_by_cell(args.accounts, topology.as_ref()), args));
    ensure!(
        groups.groups.iter().all(|group| group.len() >= 2),
        "every cell needs at least 2 of the bench's accounts: raise --accounts"
    );
    ensure!(
        cross_cell_percent == 0 || groups.groups.len() >= 2,
        "--cross-cell needs the bench's accounts in at least 2 cells: raise --accounts"
    );
    let cell_ids: Arc<Vec<u64>> = Arc::new(match &topology {
        Some(topology) => {
            let mut ids: Vec<u64> = topology.cells.iter().map(|cell| cell.id).collect();
            ids.sort_unstable();
            ids.retain(|&id| accounts_by_cell_ids(args.accounts, topology).contains(&id));
            ids
        }
        None => vec![0],
    });
    let routes = match &topology {
        Some(topology) if !args.gateway => Some(Arc::new(Routes::start(topology.clone()).await?)),
        _ => None,
    };
    // Fresh ids for every run: the high bits are the start time.
    let id_base = u128::from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64) << 64;
    let ids_next = Arc::new(AtomicU64::new(1));
    let budget = Arc::new(AtomicU64::new(args.transfers));
    let batch_next = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let cpu_before = CpuTimes::now();
    let started = Instant::now();
    let deadline = args.duration_s.map(|seconds| started + Duration::from_secs(seconds));
    let mut workers = Vec::new();
    for worker in 0..args.concurrency {
        let (mut client, groups, args) = (client.clone(), groups.clone(), args.clone());
        let (routes, cell_ids) = (routes.clone(), cell_ids.clone());
        let (batch_next, sent, ids_next, budget) = (batch_next.clone(), sent.clone(), ids_next.clone(), budget.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(args.seed ^ ((worker as u64 + 1) << 32));
            let mut tally = Tally::new();
            let mut batch = Vec::with_capacity(args.batch_size);
            // Pending transfers accepted and not posted yet: the next batches post them.
            let mut open: Vec<Transfer> = Vec::new();
            loop {
                let stopping = deadline.is_some_and(|deadline| Instant::now() >= deadline);
                // At least half the batch (one event at least) goes to posts when any are open.
                let posts_min = open.len().min((args.batch_size / 2).max(1));
                let wanted = if stopping { 0 } else { (args.batch_size - posts_min) as u64 };
                let claimed = claim(&budget, wanted);
                let posts = open.len().min(args.batch_size - claimed as usize);
                if posts == 0 && claimed == 0 {
                    break;
                }
                let number = batch_next.fetch_add(1, Ordering::Relaxed);
                let mut id = id_base | u128::from(ids_next.fetch_add(posts as u64 + claimed, Ordering::Relaxed));
                batch.clear();
                for pending in open.drain(..posts) {
                    batch.push(Transfer {
                        id,
                        pending_id: pending.id,
                        debit_account_id: pending.debit_account_id,
                        credit_account_id: pending.credit_account_id,
                        amount: pending.amount,
                        flags: TransferFlags::POST_PENDING_TRANSFER,
                        ..Transfer::default()
                    });
                    id += 1;
                }
                let cell = (number % groups.groups.len() as u64) as usize;
                for offset in 0..claimed as usize {
                    // Through a gateway, a batch's transfers take the cells in turn.
                    let cell = if args.gateway { (cell + offset) % groups.groups.len() } else { cell };
                    let cross_cell = cross_cell_percent > 0 && rng.below(100) < u64::from(cross_cell_percent);
                    tally.cross_cell += u64::from(cross_cell);
                    let (debit_account_id, credit_account_id) = groups.pair(cell, cross_cell, &mut rng);
                    let two_phase = args.two_phase > 0 && rng.below(100) < u64::from(args.two_phase);
                    batch.push(Transfer {
                        id,
                        debit_account_id,
                        credit_account_id,
                        amount: 1 + u128::from(rng.below(1000)),
                        ledger: args.ledger,
                        code: 1,
                        flags: if two_phase { TransferFlags::PENDING } else { TransferFlags::default() },
                        timeout_s: if two_phase { PENDING_TIMEOUT_S } else { 0 },
                        ..Transfer::default()
                    });
                    id += 1;
                }
                let sent_at = Instant::now();
                // Straight to the cell's leader when it is known (no forwarding hop).
                let leader_client = routes.as_ref().and_then(|routes| routes.client_for(cell_ids[cell]));
                let results = match leader_client {
                    Some(mut leader) => leader.create_transfers(&batch).await?,
                    None => client.create_transfers(&batch).await?,
                };
                tally.latency.saturating_record(sent_at.elapsed().as_micros() as u64);
                ensure!(results.len() == batch.len(), "{} results for {} transfers", results.len(), batch.len());
                tally.record(&batch, &results, &mut open);
                sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(tally)
        }));
    }
    let progress = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = (Instant::now(), sent.load(Ordering::Relaxed));
                let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
                eprintln!("transfers sent: {} ({rate:.0}/s)", now.1);
                last = now;
            }
        })
    };
    let mut tally = Tally::new();
    for worker in workers {
        tally.add(worker.await??)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_seconds_per_million, bench_cpu_seconds_per_million) = CpuTimes::now().per_million(cpu_before, tally.sent);
    progress.abort();
    let (after, settled, pending_settled) = settled_sums(&mut client, args.accounts, before).await?;
    let conserved = conserved(before, after, tally.amount_ok);
    let ms = |quantile: f64| tally.latency.value_at_quantile(quantile) as f64 / 1000.0;
    Ok(BenchResult {
        accounts: args.accounts,
        transfers: tally.sent,
        transfers_ok: tally.ok,
        two_phase_percent: args.two_phase,
        pending_ok: tally.pending_ok,
        transfers_not_ok: tally.not_ok,
        cross_cell_percent,
        transfers_cross_cell: tally.cross_cell,
        cross_cell_share: tally.cross_cell as f64 / tally.sent.max(1) as f64,
        batch_size: args.batch_size,
        concurrency: args.concurrency,
        distribution: args.distribution,
        seconds,
        transfers_per_second: tally.sent as f64 / seconds,
        batch_latency_ms_p50: ms(0.50),
        batch_latency_ms_p99: ms(0.99),
        batch_latency_ms_p999: ms(0.999),
        batch_latency_ms_max: tally.latency.max() as f64 / 1000.0,
        pending_settled_ms: settled.as_secs_f64() * 1000.0,
        pending_settled,
        cpu_seconds_per_million_transfers: cpu_seconds_per_million,
        bench_cpu_seconds_per_million_transfers: bench_cpu_seconds_per_million,
        conserved,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_never_take_more_than_is_left() {
        let budget = AtomicU64::new(10);
        assert_eq!(claim(&budget, 4), 4);
        assert_eq!(claim(&budget, 0), 0);
        assert_eq!(claim(&budget, 8), 6);
        assert_eq!(claim(&budget, 8), 0);
        assert_eq!(budget.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_pending_transfer_posts_nothing_until_its_post() {
        let mut tally = Tally::new();
        let mut open = Vec::new();
        let plain = Transfer { id: 1, amount: 5, ..Transfer::default() };
        let pending = Transfer { id: 2, amount: 7, flags: TransferFlags::PENDING, ..Transfer::default() };
        let refused = Transfer { id: 3, amount: 9, ..Transfer::default() };
        let results = [CreateTransferResult::Ok, CreateTransferResult::Ok, CreateTransferResult::ExceedsCredits];
        tally.record(&[plain, pending, refused], &results, &mut open);
        assert_eq!((tally.sent, tally.ok, tally.pending_ok, tally.amount_ok), (3, 2, 1, 5));
        assert_eq!(open.iter().map(|t| t.id).collect::<Vec<_>>(), [2], "the pending one is to be posted");
        let post = Transfer { id: 4, pending_id: 2, amount: 7, flags: TransferFlags::POST_PENDING_TRANSFER, ..plain };
        tally.record(&[post], &[CreateTransferResult::Ok], &mut open);
        assert_eq!((tally.sent, tally.ok, tally.amount_ok), (4, 3, 12), "the post moves the amount");
        assert_eq!(tally.not_ok["exceeds_credits"], 1);
    }

    #[test]
    fn cpu_times_count_this_process_and_the_machine() {
        let before = CpuTimes::now();
        let (process_before, machine_before) = (before.process.expect("/proc/self/stat"), before.machine.unwrap());
        let started = Instant::now();
        let mut spin = 0u64;
        while CpuTimes::now().process.unwrap() - process_before < 0.05 && started.elapsed() < Duration::from_secs(20) {
            for i in 0..100_000u64 {
                spin = spin.wrapping_add(std::hint::black_box(i * i));
            }
        }
        let after = CpuTimes::now();
        let process = after.process.unwrap() - process_before;
        let machine = after.machine.expect("/proc/stat") - machine_before;
        assert!(process >= 0.05, "a busy loop shows as this process's CPU time: {process} s");
        assert!(machine + 0.02 >= process, "the machine's busy time includes it: {machine} s < {process} s");
        let (machine_per_million, process_per_million) = after.per_million(before, 2_000_000);
        assert!((process_per_million.unwrap() - process / 2.0).abs() < 1e-9);
        assert!((machine_per_million.unwrap() - machine / 2.0).abs() < 1e-9);
    }
}
