//! `cellpay ctl ledgers`: the ledger definitions the global cell holds
//! (`cluster::ledgers`).
//!
//! `show` prints the definitions every node has applied (nodes that
//! disagree are listed by version). `define` adds one: compare-and-set
//! against the version read from the global cell's leader (read again and
//! retried when another definition got in first), then waits until every
//! cell's leader has adopted it into its own log, since a cell creates
//! accounts only on ledgers its log defines. Running it again is safe: a
//! ledger already defined the same way is reported, not refused.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cellpay_cluster::ledgers::LedgerDefinition;
use cellpay_cluster::topology::{Topology, GLOBAL_CELL};
use serde_json::Value;

use crate::ctl::{fetch_all, fetch_statuses, post, read_global, Answer};

/// What `define` did.
pub struct Defined {
    /// The definitions' version that holds the ledger.
    pub version: u64,
    /// Whether the ledger was already defined, the same way.
    pub already: bool,
    /// How long until every cell had adopted it.
    pub adopted_after: Duration,
}

pub async fn show(topology: &Topology) -> Result<String> {
    let tables = fetch_all(topology, "ledgers").await;
    anyhow::ensure!(tables.values().any(Option::is_some), "no node answered");
    Ok(render(&tables))
}

pub async fn define(topology: &Topology, definition: &LedgerDefinition, timeout: Duration) -> Result<Defined> {
    definition.check()?;
    let started = Instant::now();
    let deadline = started + timeout;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let mut table = read_table(&client, topology, deadline).await?;
    let mut already = false;
    let version = loop {
        let version = table["version"].as_u64().context("the definitions have no version")?;
        if let Some(existing) = find(&table, definition.id) {
            if existing == *definition {
                already = true;
                break version;
            }
            bail!("ledger {} is already defined as {existing}: a definition is final", definition.id);
        }
        let body = serde_json::json!({
            "expected_version": version,
            "id": definition.id,
            "name": definition.name,
            "asset_scale": definition.asset_scale,
        });
        match post(&client, topology, GLOBAL_CELL, "ledgers", &body, deadline).await? {
            Answer::Done(defined) => break defined["version"].as_u64().context("the definitions have no version")?,
            Answer::Conflict(message) => {
                // Another definition got in first (read again and retry), or this one is refused.
                let now = read_table(&client, topology, deadline).await?;
                if now["version"].as_u64() == Some(version) {
                    bail!("the global cell refused ledger {}: {message}", definition.id);
                }
                table = now;
            }
        }
    };
    wait_adopted(topology, version, deadline).await?;
    Ok(Defined { version, already, adopted_after: started.elapsed() })
}

/// Waits until the leader of every cell of the topology reports ledger
/// definitions at `version` or newer in its log.
async fn wait_adopted(topology: &Topology, version: u64, deadline: Instant) -> Result<()> {
    loop {
        let statuses = fetch_statuses(topology).await;
        let mut adopted: BTreeMap<u64, u64> = BTreeMap::new();
        for status in statuses.values().flatten() {
            for cell in status["cells"].as_array().into_iter().flatten() {
                if cell["role"] == "leader" {
                    let cell_id = cell["cell"].as_u64().unwrap_or(0);
                    adopted.insert(cell_id, cell["ledgers_version"].as_u64().unwrap_or(0));
                }
            }
        }
        let behind: Vec<String> = topology
            .cells
            .iter()
            .filter(|cell| adopted.get(&cell.id).is_none_or(|&adopted| adopted < version))
            .map(|cell| cell.id.to_string())
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "defined at version {version}, but cells {} have not adopted it yet (or have no leader): their \
                 leaders adopt it once they can commit; see `ctl ledgers show` and `ctl topology`",
                behind.join(",")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The definitions as the global cell's leader has applied them.
async fn read_table(client: &reqwest::Client, topology: &Topology, deadline: Instant) -> Result<Value> {
    read_global(client, topology, "ledgers", deadline).await
}

fn find(table: &Value, id: u32) -> Option<LedgerDefinition> {
    table["ledgers"].as_array()?.iter().find(|ledger| ledger["id"].as_u64() == Some(u64::from(id))).map(|ledger| {
        LedgerDefinition {
            id,
            name: ledger["name"].as_str().unwrap_or_default().to_string(),
            asset_scale: ledger["asset_scale"].as_u64().and_then(|scale| u8::try_from(scale).ok()).unwrap_or(u8::MAX),
        }
    })
}

/// The definitions the nodes answered, grouped by version, newest first.
fn render(tables: &BTreeMap<u64, Option<Value>>) -> String {
    let mut by_version: BTreeMap<std::cmp::Reverse<u64>, (Vec<String>, &Value)> = BTreeMap::new();
    let mut silent = Vec::new();
    for (&node, table) in tables {
        match table {
            Some(table) => {
                let version = table["version"].as_u64().unwrap_or(0);
                by_version.entry(std::cmp::Reverse(version)).or_insert((Vec::new(), table)).0.push(node.to_string());
            }
            None => silent.push(node.to_string()),
        }
    }
    let mut out = String::new();
    for (std::cmp::Reverse(version), (nodes, table)) in by_version {
        let ledgers = table["ledgers"].as_array().map(Vec::as_slice).unwrap_or_default();
        let _ = writeln!(
            out,
            "ledger definitions version {version}, {} ledgers (nodes {})",
            ledgers.len(),
            nodes.join(",")
        );
        for ledger in ledgers {
            let (id, scale) = (ledger["id"].as_u64().unwrap_or(0), ledger["asset_scale"].as_u64().unwrap_or(0));
            let name = ledger["name"].as_str().unwrap_or("?");
            let _ = writeln!(out, "  ledger {id:<6} {name:<16} {scale} decimal places");
        }
    }
    if !silent.is_empty() {
        let _ = writeln!(out, "no answer from nodes {}", silent.join(","));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_that_disagree_are_listed_by_version() {
        let old = serde_json::json!({"version": 1, "ledgers": [{"id": 1, "name": "CNY", "asset_scale": 2}]});
        let new = serde_json::json!({"version": 2, "ledgers": [
            {"id": 1, "name": "CNY", "asset_scale": 2}, {"id": 840, "name": "USD", "asset_scale": 2}]});
        let tables = BTreeMap::from([(1, Some(new.clone())), (2, Some(old)), (3, None), (4, Some(new.clone()))]);
        let text = render(&tables);
        assert!(text.starts_with("ledger definitions version 2, 2 ledgers (nodes 1,4)\n"), "{text}");
        assert!(text.contains("  ledger 840    USD              2 decimal places\n"), "{text}");
        assert!(text.contains("ledger definitions version 1, 1 ledgers (nodes 2)\n"), "{text}");
        assert!(text.ends_with("no answer from nodes 3\n"), "{text}");
        assert_eq!(find(&new, 840), Some(LedgerDefinition { id: 840, name: "USD".to_string(), asset_scale: 2 }));
        assert_eq!(find(&new, 7), None);
    }
}
