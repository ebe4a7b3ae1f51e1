//! The topology several in-process tests share: one node hosting the global
//! cell and two cells, cell 1 owning shards 0–49 and cell 2 shards 50–99.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cellpay_cluster::topology::{Cell, Topology};
use cellpay_server::node::{single_node_topology, NodeHandle};

/// The one node's topology; its client address is `address` if given.
pub fn topology(address: Option<SocketAddr>) -> Arc<Topology> {
    let mut one = single_node_topology();
    if let Some(address) = address {
        one.regions[0].datacenters[0].nodes[0].client_address = address;
    }
    let cell = |id, shards: std::ops::Range<u32>| Cell {
        id,
        shards: shards.collect(),
        voters: vec![1],
        learners: Vec::new(),
        leader_preference: Vec::new(),
    };
    let cells = vec![cell(1, 0..50), cell(2, 50..100)];
    Arc::new(Topology::new(one.shards, one.latency, one.regions, cells).unwrap().with_ledgers(one.ledgers).unwrap())
}

/// Waits until `cell` holds `expected` accounts as the node's status says:
/// the engine publishes it at the end of a round, after it has answered the
/// round's requests, so a read right after an answer may be a round behind.
#[allow(dead_code)] // Not every test that shares this module uses it.
pub async fn assert_accounts(node: &NodeHandle, cell: u64, expected: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let accounts = node.status().cell(cell).unwrap().accounts;
        if accounts == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: cell {cell} holds {accounts} accounts, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
