//! `cellpay ctl topology --apply FILE`: change the topology the global cell
//! holds (`cluster::topology_table`): only cells' leader preferences change
//! online. Compare-and-set against the version read from the global cell's
//! leader (read again and retried when another change got in first); then
//! waits until every cell whose preference changed is led from its new first
//! choice. Running it again is safe: a topology already applied is reported.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cellpay_cluster::topology::Topology;
use cellpay_cluster::topology::GLOBAL_CELL;
use cellpay_cluster::topology_table::TOPOLOGY_TEXT_BYTES_MAX;
use serde_json::Value;

use crate::ctl::{fetch_statuses, leaders, post, read_global, Answer};

/// What `apply` did.
pub struct Applied {
    /// The topology's version in the global cell.
    pub version: u64,
    /// Whether it was applied already.
    pub already: bool,
    /// Cells whose first choice changed and which were led from it by the
    /// time `apply` returned, with how long that took; and those that were not.
    pub moved: Vec<(u64, Duration)>,
    pub not_moved: Vec<u64>,
}

/// Applies `next` (the cluster is reached through `topology`'s addresses).
pub async fn apply(topology: &Topology, next: &Topology, timeout: Duration) -> Result<Applied> {
    let text = next.to_toml();
    anyhow::ensure!(text.len() <= TOPOLOGY_TEXT_BYTES_MAX, "the topology is over {TOPOLOGY_TEXT_BYTES_MAX} bytes");
    let started = Instant::now();
    let deadline = started + timeout;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let mut table = read_global(&client, topology, "topology", deadline).await?;
    // `current`: the topology the change replaced (read again after a conflict).
    let (version, already, current) = loop {
        let version = table["version"].as_u64().context("the topology has no version")?;
        let current = parse(&table)?;
        if current == *next {
            break (version, true, current);
        }
        let body = serde_json::json!({"expected_version": version, "topology": text});
        match post(&client, topology, GLOBAL_CELL, "topology", &body, deadline).await? {
            Answer::Done(changed) => break (changed["version"].as_u64().context("no version")?, false, current),
            Answer::Conflict(message) => {
                // Another change got in first (read again and retry), or this one is refused.
                let now = read_global(&client, topology, "topology", deadline).await?;
                if now["version"].as_u64() == Some(version) {
                    bail!("the global cell refused the topology: {message}");
                }
                table = now;
            }
        }
    };
    // The cells whose first choice changed, and where their leaders are.
    let mut waiting: Vec<(u64, String)> = next
        .cells
        .iter()
        .filter(|cell| {
            current.cell(cell.id).map(|old| old.leader_preference.first()) != Some(cell.leader_preference.first())
        })
        .filter_map(|cell| Some((cell.id, cell.leader_preference.first()?.clone())))
        .collect();
    let mut moved = Vec::new();
    while !waiting.is_empty() && Instant::now() < deadline {
        let statuses = fetch_statuses(topology).await;
        let leaders = leaders(topology, &statuses);
        waiting.retain(|(cell, datacenter)| {
            let leader = leaders.get(cell).copied().flatten();
            let there = leader.and_then(|node| topology.location(node)).is_some_and(|l| l.datacenter == datacenter);
            if there {
                moved.push((*cell, started.elapsed()));
            }
            !there
        });
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(Applied { version, already, moved, not_moved: waiting.into_iter().map(|(cell, _)| cell).collect() })
}

fn parse(table: &Value) -> Result<Topology> {
    let text = table["topology"].as_str().context("the answer holds no topology")?;
    Ok(Topology::parse(text)?)
}
