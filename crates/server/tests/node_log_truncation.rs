//! The node's shared write-ahead log is truncated across cells, and the node
//! restarts from what is left (both found in review: a restart after the
//! first segment deletion failed; an idle cell pinned the whole log).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellpay_cluster::ledgers::LedgerDefinition;
use cellpay_cluster::topology::{Cell, Datacenter, Latency, NodeSpec, Region, Topology, SHARDS_DEFAULT};
use cellpay_ledger::id::account_id;
use cellpay_ledger::{Account, CreateTransferResult, Transfer};
use cellpay_server::node::{Node, NodeConfig, Reply, Request};

/// One node, cells splitting the shards evenly.
fn topology(cells: u64) -> Topology {
    let node = NodeSpec { id: 1, peer_address: ([127, 0, 0, 1], 1).into(), client_address: ([127, 0, 0, 1], 2).into() };
    let datacenter = Datacenter { name: "local".to_string(), nodes: vec![node] };
    let region = Region { name: "local".to_string(), datacenters: vec![datacenter] };
    let per_cell = SHARDS_DEFAULT / cells as u32;
    let cells = (1..=cells)
        .map(|id| {
            let first = (id as u32 - 1) * per_cell;
            let last = if id == cells { SHARDS_DEFAULT } else { first + per_cell };
            Cell { id, shards: (first..last).collect(), voters: vec![1], learners: vec![], leader_preference: vec![] }
        })
        .collect();
    Topology::new(SHARDS_DEFAULT, Latency::DISABLED, vec![region], cells)
        .unwrap()
        .with_ledgers(vec![LedgerDefinition::local()])
        .unwrap()
}

fn wal_segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("wal")).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cell_does_not_pin_the_log_and_a_truncated_log_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        checkpoint_transfers_max: 50_000,
        checkpoint_interval_max: Duration::from_secs(1),
        log_retained_bytes: 0,
        ..NodeConfig::cluster(dir.path(), Arc::new(topology(2)), 1)
    };
    let node = Node::start(config.clone()).unwrap();
    // Users 0 and 1 are in shards 0 and 1: cell 1. Cell 2 gets nothing.
    let (debit, credit) = (account_id(0, 1).unwrap(), account_id(1, 1).unwrap());
    let accounts = [debit, credit].map(|id| Account { id, ledger: 1, code: 1, ..Account::default() }).to_vec();
    node.handle().submit(Request::CreateAccounts(accounts)).await.unwrap();
    // 80 requests of 8,190 transfers, ~1 MiB each: more than one 64 MiB segment.
    let mut id = 0u128;
    for _ in 0..80 {
        let batch: Vec<Transfer> = (0..8190)
            .map(|_| {
                id += 1;
                Transfer {
                    id,
                    debit_account_id: debit,
                    credit_account_id: credit,
                    amount: 1,
                    ledger: 1,
                    code: 1,
                    ..Transfer::default()
                }
            })
            .collect();
        let Reply::CreateTransfers(results) = node.handle().submit(Request::CreateTransfers(batch)).await.unwrap()
        else {
            panic!("wrong reply")
        };
        assert!(results.iter().all(|r| *r == CreateTransferResult::Ok));
    }
    // The idle cell checkpoints too, so the old segments go.
    let started = Instant::now();
    while wal_segments(dir.path()) > 2 {
        assert!(started.elapsed() < Duration::from_secs(20), "{} segments kept", wal_segments(dir.path()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more writes after the truncation, then a crash and a restart.
    let last = Transfer {
        id: id + 1,
        debit_account_id: debit,
        credit_account_id: credit,
        amount: 1,
        ledger: 1,
        code: 1,
        ..Transfer::default()
    };
    node.handle().submit(Request::CreateTransfers(vec![last])).await.unwrap();
    node.halt();
    let node = Node::start(config).expect("the node restarts from its truncated log");
    let Reply::Accounts(accounts) = node.handle().submit(Request::LookupAccounts(vec![debit])).await.unwrap() else {
        panic!("wrong reply")
    };
    assert_eq!(accounts[0].debits_posted, id + 1, "every acknowledged transfer survived");
    node.shutdown();
}

/// More cells than checkpoints the writer holds in flight (64) want one at
/// the same time: the engine waits for the writer instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seventy_cells_checkpoint_at_once() {
    const CELLS: u64 = 70;
    let dir = tempfile::tempdir().unwrap();
    let topology = Topology::new(
        SHARDS_DEFAULT,
        Latency::DISABLED,
        topology(1).regions,
        (1..=CELLS)
            .map(|id| Cell {
                id,
                shards: if id == CELLS { (CELLS as u32 - 1..SHARDS_DEFAULT).collect() } else { vec![id as u32 - 1] },
                voters: vec![1],
                learners: vec![],
                leader_preference: vec![],
            })
            .collect(),
    )
    .unwrap()
    .with_ledgers(vec![LedgerDefinition::local()])
    .unwrap();
    let config = NodeConfig {
        checkpoint_interval_max: Duration::from_secs(1),
        ..NodeConfig::cluster(dir.path(), Arc::new(topology), 1)
    };
    let node = Node::start(config).unwrap();
    for user in 0..CELLS {
        let account = Account { id: account_id(user, 1).unwrap(), ledger: 1, code: 1, ..Account::default() };
        node.handle().submit(Request::CreateAccounts(vec![account])).await.unwrap();
    }
    let started = Instant::now();
    while node.handle().status().cells().iter().any(|cell| cell.checkpoint_index < cell.applied) {
        assert!(started.elapsed() < Duration::from_secs(20), "the cells did not all checkpoint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Reply::Accounts(found) =
        node.handle().submit(Request::LookupAccounts(vec![account_id(0, 1).unwrap()])).await.unwrap()
    else {
        panic!("wrong reply")
    };
    assert_eq!(found.len(), 1, "the engine still answers");
    node.shutdown();
}
