//! `cellpay ctl`: operate a cluster.
//!
//! - `ctl init` writes a topology file for a local cluster (3 regions, 5
//!   datacenters as 2+2+1, one node per datacenter, on loopback).
//! - `ctl topology` prints the topology with each cell's live leader and
//!   every replica's health, asked of every node's `/v1/cluster/status`;
//!   `ctl topology --apply FILE` changes cells' leader preferences online
//!   (see `topology_apply.rs`).
//! - `ctl routing show` prints the routing table (its version and each
//!   cell's shards) that every node routes by (`/v1/cluster/routing`);
//!   `ctl routing move` moves an empty shard to another cell (see
//!   `shard_move.rs`).
//! - `ctl ledgers show` prints the ledger definitions every node has
//!   applied; `ctl ledgers define` adds one (see `ledger_defs.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cellpay_cluster::ledgers::LedgerDefinition;
use cellpay_cluster::topology::{CellId, Latency, Topology, GLOBAL_CELL};
use serde_json::Value;

#[derive(clap::Args)]
pub struct CtlArgs {
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(clap::Subcommand)]
pub enum CtlCommand {
    /// Print a topology file for a local five-node cluster.
    Init {
        /// Cells to split the 100 shards into.
        #[arg(long, default_value_t = 4)]
        cells: u32,
        /// Node i listens for peers on BASE + 2(i-1) and for clients on BASE + 2(i-1) + 1.
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
        /// Turn emulated inter-region latency off.
        #[arg(long)]
        no_latency: bool,
    },
    /// Move every cell leader out of a region before maintenance (leader
    /// transfer: requests keep being served), or let them return (--back).
    Switchover {
        /// The cluster's topology file.
        #[arg(long)]
        cluster: PathBuf,
        /// The region to empty of leaders.
        #[arg(long)]
        region: String,
        /// Let leaders return to the region (to their preferred datacenters).
        #[arg(long)]
        back: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
    /// Change a cell's replicas: add a non-voting learner, promote a learner
    /// to voter, remove a replica. To replace a node's disk: --remove N, stop
    /// it, wipe its data, start it, --add-learner N (it catches up), --promote N.
    Member {
        /// The cluster's topology file.
        #[arg(long)]
        cluster: PathBuf,
        /// The cell to change, or `all` (every cell).
        #[arg(long)]
        cell: String,
        #[arg(long)]
        add_learner: Vec<u64>,
        #[arg(long)]
        promote: Vec<u64>,
        #[arg(long)]
        remove: Vec<u64>,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
    },
    /// The routing table: which cell owns each shard.
    Routing {
        #[command(subcommand)]
        command: RoutingCommand,
    },
    /// The ledger definitions: which ledgers (currencies) accounts may be created on.
    Ledgers {
        #[command(subcommand)]
        command: LedgersCommand,
    },
    /// Print the topology with live leaders and replica health; or, with
    /// --apply, change the cells' leader preferences online.
    Topology {
        /// The cluster's topology file.
        #[arg(long)]
        cluster: PathBuf,
        /// Print the raw JSON status of every node instead.
        #[arg(long)]
        json: bool,
        /// A topology file the same as the cluster's but for cells'
        /// leader_preference: the global cell adopts it, and leaders move to
        /// their new preferred datacenters.
        #[arg(long)]
        apply: Option<PathBuf>,
        /// With --apply: give up waiting after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
}

#[derive(clap::Subcommand)]
pub enum LedgersCommand {
    /// Print the definitions every node has applied (nodes that disagree are listed by version).
    Show {
        /// The cluster's topology file.
        #[arg(long)]
        cluster: PathBuf,
    },
    /// Define a ledger (final: it cannot be changed later), then wait until
    /// every cell has adopted it. Safe to run again.
    Define {
        /// The cluster's topology file.
        #[arg(long)]
        cluster: PathBuf,
        /// The number accounts and transfers name the ledger by.
        #[arg(long)]
        id: u32,
        /// 1 to 16 letters, digits, '-' and '_', e.g. USD.
        #[arg(long)]
        name: String,
        /// Decimal places of its amounts: with 2, an amount of 1234 is 12.34.
        #[arg(long)]
        asset_scale: u8,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
}

#[derive(clap::Subcommand)]
pub enum RoutingCommand {
    /// Print the table every node routes by: its version and each cell's
    /// shards (nodes that disagree are listed by version).
    Show {
        /// The cluster's topology file.
        #[arg(long)]
        cluster: PathBuf,
    },
    /// Move a shard to another cell: its old owner releases it (refused while
    /// it holds accounts of the shard: accounts do not move yet), the global
    /// cell's table names the new owner, the new owner acquires it. Safe to
    /// run again after a failure: every step is idempotent.
    Move {
        /// The cluster's topology file.
        #[arg(long)]
        cluster: PathBuf,
        #[arg(long)]
        shard: u32,
        /// The cell to own the shard.
        #[arg(long)]
        to: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout_s: u64,
    },
}

pub async fn run(args: CtlArgs) -> Result<()> {
    match args.command {
        CtlCommand::Init { cells, base_port, no_latency } => {
            let mut topology = Topology::try_local(base_port, cells)?;
            if no_latency {
                let ledgers = topology.ledgers;
                topology = Topology::new(topology.shards, Latency::DISABLED, topology.regions, topology.cells)?
                    .with_ledgers(ledgers)?;
            }
            print!("{}", topology.to_toml());
            Ok(())
        }
        CtlCommand::Switchover { cluster, region, back, timeout_s } => {
            let topology = Topology::load(&cluster)?;
            switchover(&topology, &region, !back, Duration::from_secs(timeout_s)).await
        }
        CtlCommand::Member { cluster, cell, add_learner, promote, remove, timeout_s } => {
            let topology = Topology::load(&cluster)?;
            let cells: Vec<u64> = if cell == "all" {
                std::iter::once(GLOBAL_CELL).chain(topology.cells.iter().map(|c| c.id)).collect()
            } else {
                vec![cell.parse().map_err(|_| anyhow::anyhow!("--cell takes a cell id or `all`, not {cell:?}"))?]
            };
            let change = Change { add_learners: add_learner, add_voters: promote, remove };
            anyhow::ensure!(!change.is_empty(), "nothing to change: give --add-learner, --promote or --remove");
            for cell in cells {
                change_membership(&topology, cell, &change, Duration::from_secs(timeout_s)).await?;
            }
            Ok(())
        }
        CtlCommand::Routing { command: RoutingCommand::Show { cluster } } => {
            let topology = Topology::load(&cluster)?;
            let tables = fetch_all(&topology, "routing").await;
            anyhow::ensure!(tables.values().any(Option::is_some), "no node answered");
            print!("{}", render_routing(&tables));
            Ok(())
        }
        CtlCommand::Routing { command: RoutingCommand::Move { cluster, shard, to, timeout_s } } => {
            let topology = Topology::load(&cluster)?;
            let moved = crate::shard_move::move_shard(&topology, shard, to, Duration::from_secs(timeout_s)).await?;
            println!("shard {shard}: moved from cell {} to cell {to}; routing version {}", moved.from, moved.version);
            Ok(())
        }
        CtlCommand::Ledgers { command: LedgersCommand::Show { cluster } } => {
            print!("{}", crate::ledger_defs::show(&Topology::load(&cluster)?).await?);
            Ok(())
        }
        CtlCommand::Ledgers { command: LedgersCommand::Define { cluster, id, name, asset_scale, timeout_s } } => {
            let topology = Topology::load(&cluster)?;
            let definition = LedgerDefinition { id, name, asset_scale };
            let timeout = Duration::from_secs(timeout_s);
            let defined = crate::ledger_defs::define(&topology, &definition, timeout).await?;
            let what = if defined.already { "was already defined" } else { "defined" };
            println!(
                "{definition} {what}: definitions version {}; every cell adopted it within {} ms",
                defined.version,
                defined.adopted_after.as_millis()
            );
            Ok(())
        }
        CtlCommand::Topology { cluster, apply: Some(file), timeout_s, .. } => {
            let topology = Topology::load(&cluster)?;
            let next = Topology::load(&file)?;
            let applied = crate::topology_apply::apply(&topology, &next, Duration::from_secs(timeout_s)).await?;
            let what = if applied.already { "was already applied" } else { "applied" };
            println!("topology {what}: version {} in the global cell", applied.version);
            for (cell, after) in &applied.moved {
                println!("cell {cell}: led from its new first choice after {} ms", after.as_millis());
            }
            for cell in &applied.not_moved {
                println!(
                    "cell {cell}: not led from its new first choice yet (is that datacenter up?): see ctl topology"
                );
            }
            Ok(())
        }
        CtlCommand::Topology { cluster, json, apply: None, .. } => {
            let topology = Topology::load(&cluster)?;
            let statuses = fetch_statuses(&topology).await;
            if json {
                let all: BTreeMap<String, Value> = statuses
                    .into_iter()
                    .map(|(node, status)| (node.to_string(), status.unwrap_or(Value::Null)))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", render(&topology, &statuses));
            }
            Ok(())
        }
    }
}

/// Tells every node to drain (or undrain) `region`, then waits until no
/// cell leader is in it (draining) or every cell leader is in its most
/// preferred live datacenter (undraining), and prints the leaders.
pub async fn switchover(topology: &Topology, region: &str, drained: bool, timeout: Duration) -> Result<()> {
    anyhow::ensure!(topology.regions.iter().any(|r| r.name == region), "no region {region:?} in the topology");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let started = std::time::Instant::now();
    for node in topology.nodes() {
        let url = format!("http://{}/v1/cluster/drain", node.client_address);
        let body = serde_json::json!({"region": region, "drained": drained});
        if let Err(error) = client.post(&url).json(&body).send().await.and_then(|r| r.error_for_status()) {
            eprintln!("node {}: not told ({error}); it holds no leader while it is down", node.id);
        }
    }
    loop {
        let statuses = fetch_statuses(topology).await;
        let leaders = leaders(topology, &statuses);
        let in_region = |node: u64| topology.location(node).is_some_and(|l| l.region == region);
        let done = if drained {
            leaders.values().all(|leader| leader.is_some_and(|node| !in_region(node)))
        } else {
            topology.cells.iter().all(|cell| {
                let best = cell
                    .voters
                    .iter()
                    .filter(|node| matches!(statuses.get(node), Some(Some(_))))
                    .map(|&node| topology.preference_rank(cell.id, node))
                    .min();
                let leader = leaders.get(&cell.id).copied().flatten();
                leader.is_some_and(|node| Some(topology.preference_rank(cell.id, node)) == best)
            })
        };
        if done {
            let what = if drained { "out of" } else { "back into" };
            println!("leaders moved {what} {region} in {} ms", started.elapsed().as_millis());
            for (cell, leader) in leaders {
                let place = leader.and_then(|node| topology.location(node)).map(|l| l.datacenter).unwrap_or("none");
                println!("  cell {cell}: leader node {} ({place})", leader.unwrap_or(0));
            }
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < timeout, "leaders did not move within {} s", timeout.as_secs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A membership change of one cell.
pub struct Change {
    pub add_learners: Vec<u64>,
    pub add_voters: Vec<u64>,
    pub remove: Vec<u64>,
}

impl Change {
    fn is_empty(&self) -> bool {
        self.add_learners.is_empty() && self.add_voters.is_empty() && self.remove.is_empty()
    }

    /// Whether the leader's reported membership shows the change done; a
    /// removal also waits until the removed node no longer leads.
    fn done(&self, leader: u64, replica: &Value) -> bool {
        let ids = |field: &str| -> Vec<u64> {
            replica[field].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
        };
        let (voters, learners) = (ids("voters"), ids("learners"));
        self.add_learners.iter().all(|n| learners.contains(n))
            && self.add_voters.iter().all(|n| voters.contains(n))
            && self.remove.iter().all(|n| !voters.contains(n) && !learners.contains(n))
            && !self.remove.contains(&leader)
    }
}

/// The leader's view of `cell`: `(leader node, its status of the cell)`.
pub async fn leader_view(topology: &Topology, cell: u64) -> Option<(u64, Value)> {
    let statuses = fetch_statuses(topology).await;
    let leader = leaders(topology, &statuses).get(&cell).copied().flatten()?;
    let status = statuses.get(&leader)?.as_ref()?;
    let replica = status["cells"].as_array()?.iter().find(|c| c["cell"].as_u64() == Some(cell))?.clone();
    (replica["role"] == "leader").then_some((leader, replica))
}

/// Proposes a membership change to the cell's leader, waits until it is in
/// effect and, for new learners, until they have caught up with the leader.
pub async fn change_membership(topology: &Topology, cell: u64, change: &Change, timeout: Duration) -> Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let started = std::time::Instant::now();
    let body = serde_json::json!({
        "cell": cell, "add_learners": change.add_learners, "add_voters": change.add_voters, "remove": change.remove,
    });
    let mut proposed = false;
    loop {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "cell {cell}: the change did not take effect in {} s",
            timeout.as_secs()
        );
        let Some((leader, replica)) = leader_view(topology, cell).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if change.done(leader, &replica) {
            break;
        }
        if !proposed {
            let address = topology.node(leader).expect("leaders are topology nodes").client_address;
            let url = format!("http://{address}/v1/cluster/membership");
            let response = client.post(&url).json(&body).send().await?;
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            if status.is_client_error() {
                anyhow::bail!("cell {cell}: the change was refused: {text}");
            }
            proposed = status.is_success();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New learners: wait until they hold what the leader had committed.
    let target = leader_view(topology, cell).await.and_then(|(_, r)| r["commit_index"].as_u64()).unwrap_or(0);
    for &learner in &change.add_learners {
        loop {
            anyhow::ensure!(started.elapsed() < timeout, "cell {cell}: node {learner} did not catch up");
            let statuses = fetch_statuses(topology).await;
            let applied = statuses.get(&learner).cloned().flatten().and_then(|status| {
                let cells = status["cells"].as_array()?.clone();
                cells.iter().find(|c| c["cell"].as_u64() == Some(cell))?["applied_index"].as_u64()
            });
            if applied.is_some_and(|applied| applied >= target) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!("cell {cell}: membership changed in {} ms", started.elapsed().as_millis());
    Ok(())
}

/// Each cell's leader: the one named by the replica with the highest term.
pub fn leaders(topology: &Topology, statuses: &BTreeMap<u64, Option<Value>>) -> BTreeMap<u64, Option<u64>> {
    let mut leaders = BTreeMap::new();
    for cell in std::iter::once(topology.global()).chain(&topology.cells) {
        let mut best: Option<(u64, u64)> = None;
        for status in statuses.values().flatten() {
            let Some(replicas) = status["cells"].as_array() else { continue };
            for replica in replicas.iter().filter(|r| r["cell"].as_u64() == Some(cell.id)) {
                let term = replica["term"].as_u64().unwrap_or(0);
                if let Some(leader) = replica["leader"].as_u64() {
                    if best.is_none_or(|(t, _)| term > t) {
                        best = Some((term, leader));
                    }
                }
            }
        }
        leaders.insert(cell.id, best.map(|(_, leader)| leader));
    }
    leaders
}

/// Every node's `/v1/cluster/status`, or `None` for a node that did not answer.
pub async fn fetch_statuses(topology: &Topology) -> BTreeMap<u64, Option<Value>> {
    fetch_all(topology, "status").await
}

/// Every node's `/v1/cluster/{what}`, or `None` for a node that did not answer.
pub async fn fetch_all(topology: &Topology, what: &str) -> BTreeMap<u64, Option<Value>> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("an HTTP client");
    let mut statuses = BTreeMap::new();
    for node in topology.nodes() {
        let url = format!("http://{}/v1/cluster/{what}", node.client_address);
        let status = async { client.get(&url).send().await?.error_for_status()?.json::<Value>().await }.await.ok();
        statuses.insert(node.id, status);
    }
    statuses
}

/// The routing tables the nodes answered, grouped by version, newest first.
fn render_routing(tables: &BTreeMap<u64, Option<Value>>) -> String {
    use std::fmt::Write as _;
    let mut by_version: BTreeMap<std::cmp::Reverse<u64>, (Vec<u64>, &Value)> = BTreeMap::new();
    let mut silent = Vec::new();
    for (&node, table) in tables {
        match table {
            Some(table) => {
                let version = table["version"].as_u64().unwrap_or(0);
                by_version.entry(std::cmp::Reverse(version)).or_insert((Vec::new(), table)).0.push(node);
            }
            None => silent.push(node),
        }
    }
    let mut out = String::new();
    for (std::cmp::Reverse(version), (nodes, table)) in by_version {
        let nodes: Vec<String> = nodes.iter().map(u64::to_string).collect();
        let shards = table["shards"].as_u64().unwrap_or(0);
        let _ = writeln!(out, "routing version {version}, {shards} shards (nodes {})", nodes.join(","));
        for cell in table["cells"].as_array().into_iter().flatten() {
            let ranges: Vec<&str> = cell["shards"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let id = cell["cell"].as_u64().unwrap_or(0);
            let _ = writeln!(out, "  cell {id:<3} shards {}", ranges.join(","));
        }
    }
    if !silent.is_empty() {
        let nodes: Vec<String> = silent.iter().map(u64::to_string).collect();
        let _ = writeln!(out, "no answer from nodes {}", nodes.join(","));
    }
    out
}

fn render(topology: &Topology, statuses: &BTreeMap<u64, Option<Value>>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for region in &topology.regions {
        let _ = writeln!(out, "region {}", region.name);
        for datacenter in &region.datacenters {
            for node in &datacenter.nodes {
                let health = match statuses.get(&node.id) {
                    Some(Some(_)) => "up",
                    _ => "DOWN",
                };
                let _ = writeln!(
                    out,
                    "  datacenter {:<8} node {:<3} {:<5} client {} peer {}",
                    datacenter.name, node.id, health, node.client_address, node.peer_address
                );
            }
        }
    }
    let _ = writeln!(out, "cells");
    for cell in &topology.cells {
        // The leader as the highest term seen among the replicas that answered.
        let mut leader: Option<(u64, u64)> = None;
        let mut replicas = Vec::new();
        for &node in cell.voters.iter().chain(&cell.learners) {
            let status = statuses.get(&node).cloned().flatten();
            let replica = status
                .as_ref()
                .and_then(|s| s["cells"].as_array()?.iter().find(|c| c["cell"].as_u64() == Some(cell.id)).cloned());
            match replica {
                Some(replica) => {
                    let term = replica["term"].as_u64().unwrap_or(0);
                    if let Some(id) = replica["leader"].as_u64() {
                        if leader.is_none_or(|(t, _)| term > t) {
                            leader = Some((term, id));
                        }
                    }
                    replicas.push(format!(
                        "{}:{}@{}",
                        node,
                        replica["role"].as_str().unwrap_or("?"),
                        replica["applied_index"].as_u64().unwrap_or(0)
                    ));
                }
                None => replicas.push(format!("{node}:DOWN")),
            }
        }
        let leader_text = match leader {
            Some((term, id)) => {
                let place = topology.location(id).map(|l| format!("{}/{}", l.region, l.datacenter)).unwrap_or_default();
                format!("leader node {id} ({place}, term {term})")
            }
            None => "no leader".to_string(),
        };
        let _ = writeln!(
            out,
            "  cell {:<3} shards {:>3} {:<40} prefers {:<24} replicas {}",
            cell.id,
            cell.shards.len(),
            leader_text,
            cell.leader_preference.join(","),
            replicas.join(" ")
        );
    }
    out
}

/// How a cell's leader answered an operator change.
pub(crate) enum Answer {
    Done(Value),
    /// 409: the change conflicts with the cell's state; nothing changed.
    Conflict(String),
}

/// `/v1/cluster/{what}` as the global cell's leader has it.
pub(crate) async fn read_global(
    client: &reqwest::Client,
    topology: &Topology,
    what: &str,
    deadline: Instant,
) -> Result<Value> {
    loop {
        if let Some((leader, _)) = leader_view(topology, GLOBAL_CELL).await {
            let address = topology.node(leader).context("leaders are topology nodes")?.client_address;
            let url = format!("http://{address}/v1/cluster/{what}");
            let value = async { client.get(&url).send().await?.error_for_status()?.json::<Value>().await }.await;
            if let Ok(value) = value {
                return Ok(value);
            }
        }
        if Instant::now() >= deadline {
            bail!("the global cell's leader did not answer");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Posts an operator change to `cell`'s leader (`/v1/cluster/{what}`),
/// following leadership until it answers, or the deadline passes.
pub(crate) async fn post(
    client: &reqwest::Client,
    topology: &Topology,
    cell: CellId,
    what: &str,
    body: &Value,
    deadline: Instant,
) -> Result<Answer> {
    let mut last = String::from("no leader found");
    while Instant::now() < deadline {
        if let Some((leader, _)) = leader_view(topology, cell).await {
            let address = topology.node(leader).context("leaders are topology nodes")?.client_address;
            let url = format!("http://{address}/v1/cluster/{what}");
            match client.post(&url).json(body).send().await {
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    if status.is_success() {
                        return Ok(Answer::Done(serde_json::from_str(&text)?));
                    }
                    if status == reqwest::StatusCode::CONFLICT {
                        return Ok(Answer::Conflict(text));
                    }
                    if status.is_client_error() {
                        bail!("cell {cell} refused {body}: {text}");
                    }
                    // 503 (not the leader any more, overloaded), 504: try again.
                    last = text;
                }
                Err(error) => last = error.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("cell {cell}: {what} change {body} not done in time: {last}")
}
