//! `cellpay ctl`: operate a cluster.
//!
//! - `ctl init` writes a topology file for a local cluster (3 regions, 5
//!   datacenters as 2+2+1, one node per datacenter, on loopback).
//! - `ctl topology` prints the topology with each cell's live leader and
//!   every replica's health, asked of every node's `/v1/cluster/status`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use cellpay_cluster::topology::{Latency, Topology};
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
    /// Print the topology with live leaders and replica health.
    Topology {
        /// The cluster's topology file.
        #[arg(long)]
        cluster: PathBuf,
        /// Print the raw JSON status of every node instead.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: CtlArgs) -> Result<()> {
    match args.command {
        CtlCommand::Init { cells, base_port, no_latency } => {
            let mut topology = Topology::try_local(base_port, cells)?;
            if no_latency {
                topology = Topology::new(topology.shards, Latency::DISABLED, topology.regions, topology.cells)?;
            }
            print!("{}", topology.to_toml());
            Ok(())
        }
        CtlCommand::Topology { cluster, json } => {
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

/// Every node's `/v1/cluster/status`, or `None` for a node that did not answer.
pub async fn fetch_statuses(topology: &Topology) -> BTreeMap<u64, Option<Value>> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("an HTTP client");
    let mut statuses = BTreeMap::new();
    for node in topology.nodes() {
        let url = format!("http://{}/v1/cluster/status", node.client_address);
        let status = async { client.get(&url).send().await?.error_for_status()?.json::<Value>().await }.await.ok();
        statuses.insert(node.id, status);
    }
    statuses
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
