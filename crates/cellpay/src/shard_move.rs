//! `cellpay ctl routing move`: moving a shard from one cell to another.
//!
//! Three steps, each a log entry of one cell, each idempotent (see
//! `server/src/cell_state.rs` for why ownership lives in the cells' logs):
//!
//! 1. the old owner **releases** the shard: from that entry on it applies
//!    nothing naming an account of the shard. Refused while it holds such an
//!    account (accounts do not move yet), and then nothing has changed;
//! 2. the global cell's routing table names the new owner (compare and set
//!    against the version read in step 1; on a conflict the table is read
//!    again: the release stands, so retrying is safe);
//! 3. the new owner **acquires** the shard (its leader checks that the table
//!    it has applied names it; the table may take a moment to reach it).
//!
//! Between steps 1 and 3 no cell serves the shard: requests for it are
//! refused `misrouted` (nothing applied) and routers retry.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cellpay_cluster::topology::{CellId, Topology, GLOBAL_CELL};
use serde_json::Value;

use crate::ctl::{post, read_global, Answer};

/// A finished move.
pub struct Moved {
    pub from: CellId,
    /// The routing table's version that names the new owner.
    pub version: u64,
}

pub async fn move_shard(topology: &Topology, shard: u32, to: CellId, timeout: Duration) -> Result<Moved> {
    let deadline = Instant::now() + timeout;
    anyhow::ensure!(shard < topology.shards, "shard {shard} does not exist: shards are 0 to {}", topology.shards - 1);
    anyhow::ensure!(to != GLOBAL_CELL && topology.cell(to).is_some(), "cell {to} is not in the topology");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let (mut version, from) = read_table(&client, topology, shard, deadline).await?;
    if from != to {
        let release = serde_json::json!({"cell": from, "shard": shard, "owned": false});
        if let Answer::Conflict(message) = post(&client, topology, from, "ownership", &release, deadline).await? {
            bail!("cell {from} did not release shard {shard}: {message}");
        }
        loop {
            let change = serde_json::json!({"expected_version": version, "shard": shard, "to": to});
            match post(&client, topology, GLOBAL_CELL, "routing", &change, deadline).await? {
                Answer::Done(table) => {
                    version = table["version"].as_u64().context("the new table has no version")?;
                    break;
                }
                Answer::Conflict(message) => {
                    // The table changed since it was read: read it again.
                    let (now, owner) = read_table(&client, topology, shard, deadline).await?;
                    if owner == to {
                        version = now;
                        break;
                    }
                    if owner != from || now == version {
                        bail!(
                            "the routing table (version {now}) names cell {owner} as the owner of shard {shard} \
                             ({message}); cell {from} has released it: run the move again"
                        );
                    }
                    version = now;
                }
            }
        }
    }
    // The new owner's leader acquires the shard once the table it has applied names it.
    let acquire = serde_json::json!({"cell": to, "shard": shard, "owned": true});
    loop {
        match post(&client, topology, to, "ownership", &acquire, deadline).await? {
            Answer::Done(_) => return Ok(Moved { from, version }),
            Answer::Conflict(message) if Instant::now() >= deadline => {
                bail!("cell {to} did not acquire shard {shard}: {message}")
            }
            Answer::Conflict(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The routing table as the global cell's leader has it: its version and
/// the owner of `shard`.
async fn read_table(
    client: &reqwest::Client,
    topology: &Topology,
    shard: u32,
    deadline: Instant,
) -> Result<(u64, CellId)> {
    let table = read_global(client, topology, "routing", deadline).await?;
    let version = table["version"].as_u64().context("the table has no version")?;
    let owner = table["owners"].get(shard as usize).and_then(Value::as_u64);
    Ok((version, owner.context("the table names no owner of the shard")?))
}
