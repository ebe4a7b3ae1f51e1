//! The global cell and shard ownership, in process: a node alone hosting the
//! global cell and two cells. A shard moves in three logged steps (release,
//! routing change, acquire); each step refuses what would be unsafe, with
//! nothing changed; and the table and ownership survive restarts, from the
//! log and from checkpoints.

mod two_cells;

use cellpay_cluster::routing::RoutingChange;
use cellpay_cluster::topology::GLOBAL_CELL;
use cellpay_ledger::id::account_id;
use cellpay_ledger::{Account, CreateAccountResult};
use cellpay_server::node::{Node, NodeConfig, NodeError, Reply, Request};

fn start(dir: &std::path::Path) -> Node {
    Node::start(NodeConfig::cluster(dir, two_cells::topology(None), 1)).unwrap()
}

fn account(user: u64) -> Account {
    Account { id: account_id(user, 1).unwrap(), ledger: 1, code: 1, ..Account::default() }
}

async fn create(node: &Node, user: u64) -> Result<Reply, NodeError> {
    node.handle().submit(Request::CreateAccounts(vec![account(user)])).await
}

fn refused(result: Result<Reply, NodeError>, cell: u64, reason: &str) {
    match result {
        Err(NodeError::ChangeRefused { cell: refusing, reason: text }) => {
            assert_eq!(refusing, cell);
            assert!(text.contains(reason), "{text:?} does not say {reason:?}");
        }
        other => panic!("expected cell {cell} to refuse ({reason}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_moves_in_three_logged_steps_and_the_table_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let handle = node.handle();
    let ownership = |cell, shard, owned| Request::ShardOwnership { cell, shard, owned };
    let move_shard = |expected_version, shard, to| Request::ChangeRouting {
        expected_version,
        change: RoutingChange::MoveShard { shard, to },
    };
    assert_eq!(handle.status().routing().version(), 1);
    assert!(handle.status().cell(GLOBAL_CELL).is_some(), "the node hosts the global cell");
    assert_eq!(create(&node, 1).await, Ok(Reply::CreateAccounts(vec![CreateAccountResult::Ok])));

    // A shard holding an account cannot be released; a cell cannot acquire
    // a shard the table does not name it the owner of. Nothing changes.
    refused(handle.submit_admin(ownership(1, 1, false)).await, 1, "holds 1 accounts of shard 1");
    refused(handle.submit_admin(ownership(2, 0, true)).await, 2, "names cell 1 as the owner of shard 0");
    refused(handle.submit_admin(ownership(1, 100, false)).await, 1, "shard 100 does not exist");

    // Step 1: cell 1 releases the empty shard 0. From then on it applies
    // nothing for shard 0, though every router's table (still version 1) sends it there.
    assert_eq!(handle.submit_admin(ownership(1, 0, false)).await, Ok(Reply::ShardOwnership));
    let user = 100; // shard 0
    match create(&node, user).await {
        Err(NodeError::Misrouted { cell: 1, owner: 1, routing_version: 1, .. }) => {}
        other => panic!("a released shard's account was not refused: {other:?}"),
    }
    // Step 2: the table names cell 2, compare-and-set against version 1.
    let Ok(Reply::RoutingChanged(table)) = handle.submit_admin(move_shard(1, 0, 2)).await else {
        panic!("the routing change was refused")
    };
    assert_eq!((table.version(), table.owner(0)), (2, Some(2)));
    assert_eq!(handle.status().routing().version(), 2, "the node routes by the new table at once");
    refused(handle.submit_admin(move_shard(1, 1, 2)).await, GLOBAL_CELL, "not 1");
    // Step 3: cell 2 acquires shard 0, and serves it.
    match create(&node, user).await {
        Err(NodeError::Misrouted { cell: 2, owner: 2, routing_version: 2, .. }) => {}
        other => panic!("cell 2 served shard 0 before acquiring it: {other:?}"),
    }
    assert_eq!(handle.submit_admin(ownership(2, 0, true)).await, Ok(Reply::ShardOwnership));
    assert_eq!(handle.submit_admin(ownership(2, 0, true)).await, Ok(Reply::ShardOwnership), "idempotent");
    assert_eq!(create(&node, user).await, Ok(Reply::CreateAccounts(vec![CreateAccountResult::Ok])));
    assert!(matches!(
        handle.submit_cell(1, Request::CreateAccounts(vec![account(200)])).await,
        Err(NodeError::Misrouted { cell: 1, owner: 2, routing_version: 2, .. })
    ));
    two_cells::assert_accounts(&handle, 2, 1, "after the move").await;
    drop(handle);

    // A crash: the changes are replayed from the log.
    node.halt();
    let node = start(dir.path());
    assert_eq!(node.handle().status().routing().version(), 2, "the table is replayed from the log");
    assert_eq!(create(&node, 200).await, Ok(Reply::CreateAccounts(vec![CreateAccountResult::Ok])));
    two_cells::assert_accounts(&node.handle(), 2, 2, "shard 0's accounts are in cell 2").await;
    assert!(matches!(
        node.handle().submit_cell(1, Request::CreateAccounts(vec![account(300)])).await,
        Err(NodeError::Misrouted { cell: 1, .. })
    ));
    // A clean stop checkpoints: the table and ownership come from the stores.
    node.shutdown();
    let node = start(dir.path());
    assert_eq!(node.recovery.records_replayed, 0, "nothing to replay after a clean stop");
    assert_eq!(node.handle().status().routing().version(), 2, "the table is restored from the checkpoint");
    assert_eq!(create(&node, 300).await, Ok(Reply::CreateAccounts(vec![CreateAccountResult::Ok])));
    two_cells::assert_accounts(&node.handle(), 2, 3, "after a clean restart").await;
    node.shutdown();
}
