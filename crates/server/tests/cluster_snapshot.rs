//! A replica that missed more than its leader's log holds catches up from a
//! snapshot: three nodes in one process, one cell; one node stops while the
//! others commit and checkpoint many times (compacting their logs past it);
//! it restarts and must end with the same state as the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellpay_cluster::ledgers::LedgerDefinition;
use cellpay_cluster::topology::{Cell, Datacenter, Latency, NodeSpec, Region, Topology, SHARDS_DEFAULT};
use cellpay_ledger::{id, Account, CreateTransferResult, Transfer};
use cellpay_server::node::{CellStatus, Node, NodeConfig, Reply, Request};

/// `count` distinct free ports: every listener is held until all are bound
/// (a port freed at once can be handed out again: CI once got the same port
/// for a node's client address and another node's peer address).
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> =
        (0..count).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|listener| listener.local_addr().unwrap().port()).collect()
}

fn topology() -> Topology {
    let ports = free_ports(6);
    let free_port = |node: u64, client: bool| ports[2 * (node as usize - 1) + usize::from(client)];
    let region = |name: &str, id: u64| Region {
        name: name.to_string(),
        datacenters: vec![Datacenter {
            name: format!("{name}-a"),
            nodes: vec![NodeSpec {
                id,
                peer_address: ([127, 0, 0, 1], free_port(id, false)).into(),
                client_address: ([127, 0, 0, 1], free_port(id, true)).into(),
            }],
        }],
    };
    let regions = vec![region("r1", 1), region("r2", 2), region("r3", 3)];
    let cell = Cell {
        id: 1,
        shards: (0..SHARDS_DEFAULT).collect(),
        voters: vec![1, 2, 3],
        learners: vec![],
        // No preference: leadership stays where the first election put it.
        leader_preference: vec![],
    };
    Topology::new(SHARDS_DEFAULT, Latency::DISABLED, regions, vec![cell])
        .unwrap()
        .with_ledgers(vec![LedgerDefinition::local()])
        .unwrap()
}

fn config(dir: &std::path::Path, topology: &Arc<Topology>, node: u64) -> NodeConfig {
    NodeConfig {
        checkpoint_transfers_max: 500,
        log_retained_bytes: 4 * 1024,
        // Appends queued for the stopped node overflow: it cannot catch up from them.
        peer_queue_bytes_max: 2 << 20,
        ..NodeConfig::cluster(dir.join(format!("n{node}")), topology.clone(), node)
    }
}

fn status(node: &Node) -> CellStatus {
    node.handle().status().cell(1).expect("the node hosts cell 1")
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn account(user: u64) -> u128 {
    id::account_id(user, 1).unwrap()
}

/// Three nodes with one cell, a leader elected and 20 accounts created:
/// the topology, the nodes (by id - 1) and the leader's id.
async fn start_three(dir: &std::path::Path) -> (Arc<Topology>, Vec<Option<Node>>, u64) {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let topology = Arc::new(topology());
    let nodes: Vec<Option<Node>> =
        (1..=3).map(|node| Some(Node::start(config(dir, &topology, node)).unwrap())).collect();
    let leader_of = |nodes: &Vec<Option<Node>>| {
        nodes.iter().flatten().find_map(|node| status(node).leader.filter(|&id| id == node.handle().node()))
    };
    wait_until("a leader is elected", Duration::from_secs(10), || leader_of(&nodes).is_some()).await;
    let leader = leader_of(&nodes).unwrap();
    let accounts: Vec<Account> =
        (1..=20).map(|user| Account { id: account(user), ledger: 1, code: 1, ..Account::default() }).collect();
    let handle = nodes[leader as usize - 1].as_ref().unwrap().handle();
    handle.submit(Request::CreateAccounts(accounts)).await.unwrap();
    (topology, nodes, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_compacted_entries_catches_up_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (topology, mut nodes, leader) = start_three(dir.path()).await;
    let handle = nodes[leader as usize - 1].as_ref().unwrap().handle();

    // Stop a follower, then commit enough for several checkpoints: the
    // others' logs are compacted far past where it stopped.
    let follower = (1..=3u64).find(|&node| node != leader).unwrap();
    let stopping = nodes[follower as usize - 1].take().unwrap();
    let stopped_at = status(&stopping).log_last;
    stopping.halt();
    for round in 0..400 {
        transfers(&handle, 1 + round * 100, 100).await;
    }
    let leader_node = nodes[leader as usize - 1].as_ref().unwrap();
    wait_until("the leader's log is compacted past the stopped follower", Duration::from_secs(20), || {
        status(leader_node).log_first > stopped_at + 1
    })
    .await;

    // Restart the follower: it needs entries nobody has any more.
    nodes[follower as usize - 1] = Some(Node::start(config(dir.path(), &topology, follower)).unwrap());
    let leader_node = nodes[leader as usize - 1].as_ref().unwrap();
    let restarted = nodes[follower as usize - 1].as_ref().unwrap();
    let target = status(leader_node).commit;
    wait_until("the restarted follower catches up", Duration::from_secs(30), || status(restarted).applied >= target)
        .await;
    wait_until("every replica has hashed the same applied state", Duration::from_secs(10), || {
        let statuses: Vec<CellStatus> = nodes.iter().flatten().map(status).collect();
        let first = &statuses[0];
        statuses.iter().all(|s| s.state_hash_index == first.applied && s.applied == first.applied)
            && statuses.iter().all(|s| s.state_hash == first.state_hash)
    })
    .await;
    let restarted_status = status(restarted);
    assert!(restarted_status.snapshots_installed >= 1, "the follower's state came from a snapshot");
    // Per-cell metrics: leadership, term, indexes, log, elections.
    let metrics = leader_node.handle().metrics().encode();
    for name in ["cellpay_cell_is_leader", "cellpay_cell_term", "cellpay_cell_commit_index", "cellpay_cell_apply_lag"] {
        assert!(metrics.contains(&format!("{name}{{cell=\"1\"}}")), "{name} in {metrics}");
    }
    assert!(metrics.contains("cellpay_cell_is_leader{cell=\"1\"} 1"), "{metrics}");
    assert!(metrics.contains("cellpay_cell_elections_won{cell=\"1\"} 1"), "{metrics}");
    assert!(restarted_status.checkpoint_index > stopped_at);
    assert_eq!(restarted_status.accounts, 20);
    for node in nodes.into_iter().flatten() {
        node.shutdown();
    }
}

async fn transfers(handle: &cellpay_server::node::NodeHandle, first_id: u128, count: u128) {
    let batch: Vec<Transfer> = (first_id..first_id + count)
        .map(|id| Transfer {
            id,
            debit_account_id: account(1 + (id % 20) as u64),
            credit_account_id: account(1 + ((id + 7) % 20) as u64),
            amount: 1 + id,
            ledger: 1,
            code: 1,
            ..Transfer::default()
        })
        .collect();
    let Reply::CreateTransfers(results) = handle.submit(Request::CreateTransfers(batch)).await.unwrap() else {
        panic!("wrong reply")
    };
    assert!(results.iter().all(|r| *r == CreateTransferResult::Ok), "{results:?}");
}

/// Replacing a node's disk without stopping the cell: remove the replica,
/// wipe and restart the node, add it back as a learner (it catches up from a
/// snapshot), then promote it; the cell commits throughout, and the new
/// replica then counts as a voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_new_empty_disk_replaces_a_replica_without_stopping_the_cell() {
    use cellpay_server::node::MembershipChange;
    let dir = tempfile::tempdir().unwrap();
    let (topology, mut nodes, leader) = start_three(dir.path()).await;
    let handle = nodes[leader as usize - 1].as_ref().unwrap().handle();
    transfers(&handle, 1, 100).await;

    // 1. Remove the replica of the node whose disk is replaced.
    let replaced = (1..=3u64).find(|&node| node != leader).unwrap();
    let other = (1..=3u64).find(|&node| node != leader && node != replaced).unwrap();
    handle.change_membership(1, vec![MembershipChange::Remove(replaced)]).await.unwrap();
    let leader_node = nodes[leader as usize - 1].as_ref().unwrap();
    wait_until("the replica is removed", Duration::from_secs(10), || !status(leader_node).voters.contains(&replaced))
        .await;
    // 2. The node stops and its disk is replaced; the cell goes on (2 of 2 voters).
    nodes[replaced as usize - 1].take().unwrap().halt();
    std::fs::remove_dir_all(dir.path().join(format!("n{replaced}"))).unwrap();
    for round in 0..20 {
        transfers(&handle, 1_000 + round * 100, 100).await;
    }
    // 3. It starts on the empty disk and is added back as a learner: it
    //    catches up (from a snapshot: the log was compacted).
    nodes[replaced as usize - 1] = Some(Node::start(config(dir.path(), &topology, replaced)).unwrap());
    handle.change_membership(1, vec![MembershipChange::AddLearner(replaced)]).await.unwrap();
    let target = status(nodes[leader as usize - 1].as_ref().unwrap()).commit;
    let fresh = nodes[replaced as usize - 1].as_ref().unwrap();
    wait_until("the new replica catches up", Duration::from_secs(30), || status(fresh).applied >= target).await;
    assert!(status(fresh).snapshots_installed >= 1, "the new replica was sent a snapshot");
    // 4. Promoted, it is a voter again.
    handle.change_membership(1, vec![MembershipChange::AddVoter(replaced)]).await.unwrap();
    let leader_node = nodes[leader as usize - 1].as_ref().unwrap();
    wait_until("the replica is a voter again", Duration::from_secs(10), || {
        let status = status(leader_node);
        status.voters.contains(&replaced) && status.learners.is_empty()
    })
    .await;
    // It counts: with the third node stopped, the leader and it are a majority.
    nodes[other as usize - 1].take().unwrap().halt();
    transfers(&handle, 10_000, 100).await;
    wait_until("both live replicas hash the same state", Duration::from_secs(10), || {
        let statuses: Vec<CellStatus> = nodes.iter().flatten().map(status).collect();
        statuses.iter().all(|s| s.state_hash_index == statuses[0].applied && s.applied == statuses[0].applied)
            && statuses.iter().all(|s| s.state_hash == statuses[0].state_hash)
    })
    .await;
    for node in nodes.into_iter().flatten() {
        node.shutdown();
    }
}

/// A leader asked to remove its own replica refuses (nothing applied: raft-rs
/// would keep a self-removed leader leading, then panic) and hands
/// leadership to another voter; the change then goes through the new leader,
/// and the cell commits without the removed replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_hands_leadership_over_before_its_replica_is_removed() {
    use cellpay_server::node::{MembershipChange, NodeError};
    let dir = tempfile::tempdir().unwrap();
    let (_topology, mut nodes, leader) = start_three(dir.path()).await;
    let handle = nodes[leader as usize - 1].as_ref().unwrap().handle();
    transfers(&handle, 1, 100).await;
    let error = handle.change_membership(1, vec![MembershipChange::Remove(leader)]).await.unwrap_err();
    assert!(matches!(error, NodeError::Unavailable { .. }) && error.nothing_applied(), "{error:?}");
    let successor_of = |nodes: &Vec<Option<Node>>| {
        nodes.iter().flatten().find_map(|node| {
            let status = status(node);
            (status.role == "leader" && node.handle().node() != leader).then_some(node.handle().node())
        })
    };
    wait_until("leadership moves", Duration::from_secs(5), || successor_of(&nodes).is_some()).await;
    let successor = nodes[successor_of(&nodes).unwrap() as usize - 1].as_ref().unwrap().handle();
    successor.change_membership(1, vec![MembershipChange::Remove(leader)]).await.unwrap();
    let successor_node = nodes[successor.node() as usize - 1].as_ref().unwrap();
    wait_until("the replica is removed", Duration::from_secs(5), || !status(successor_node).voters.contains(&leader))
        .await;
    let removed = nodes[leader as usize - 1].take().unwrap();
    assert!(removed.handle().is_running(), "the removed node's engine is still running");
    removed.halt();
    transfers(&successor, 1_000, 100).await;
    assert_eq!(status(nodes[successor.node() as usize - 1].as_ref().unwrap()).voters.len(), 2);
    for node in nodes.into_iter().flatten() {
        node.shutdown();
    }
}
