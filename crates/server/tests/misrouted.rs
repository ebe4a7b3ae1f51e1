//! A cell refuses what it does not own: a request naming an account whose
//! shard another cell owns (by the node's routing table) is refused
//! `misrouted`, naming the owner and the table's version, before anything is
//! proposed; any replica can tell, leader or not.

use std::sync::Arc;

use cellpay_cluster::topology::Topology;
use cellpay_ledger::id::account_id;
use cellpay_ledger::{Account, AccountFilter, Transfer};
use cellpay_server::node::{NodeConfig, NodeError, Request, SteppedNode};
use cellpay_server::world::RealWorld;

#[test]
fn a_cell_refuses_accounts_of_shards_it_does_not_own_naming_the_routing_version() {
    let dir = tempfile::tempdir().unwrap();
    let topology = Arc::new(Topology::local(21_000, 2));
    let node = topology.cells[0].voters[0];
    let config = NodeConfig::cluster(dir.path(), topology.clone(), node);
    // No transport: this replica never leads, which the check does not need.
    let (mut stepped, _) = SteppedNode::open(config, Box::new(RealWorld { transport: None })).unwrap();
    let owner = topology.cell_of_shard(1).unwrap();
    let other = topology.cells.iter().map(|cell| cell.id).find(|&cell| cell != owner).unwrap();
    let mine = account_id(1, 0).unwrap();
    let theirs = account_id(99, 0).unwrap();
    assert_eq!(topology.cell_of_shard(99), Some(other));

    let account = Account { id: mine, ledger: 1, code: 1, ..Account::default() };
    let transfer = Transfer {
        id: 7,
        debit_account_id: mine,
        credit_account_id: mine,
        amount: 1,
        ledger: 1,
        code: 1,
        ..Transfer::default()
    };
    let filter = AccountFilter { account_id: mine, limit: 10, debits: true, ..AccountFilter::default() };
    let requests = [
        Request::CreateAccounts(vec![account]),
        Request::CreateTransfers(vec![transfer]),
        Request::LookupAccounts(vec![mine]),
        Request::GetAccountTransfers(filter),
        Request::GetAccountBalances(filter),
    ];
    for request in requests {
        let mut answer = stepped.submit(other, request.clone());
        match answer.try_recv() {
            Ok(Err(NodeError::Misrouted { cell, account, owner: named, routing_version })) => {
                assert_eq!((cell, account, named, routing_version), (other, mine, owner, 1), "{request:?}");
            }
            unexpected => panic!("{request:?} to cell {other}: {unexpected:?}"),
        }
        // The owning cell takes it: not refused as misrouted (this replica is
        // no leader, so it says so instead).
        let mut answer = stepped.submit(owner, request.clone());
        assert!(matches!(answer.try_recv(), Ok(Err(NodeError::NotLeader { .. }))), "{request:?}");
    }
    // A transfer to another cell's account is a cross-cell transfer, taken
    // by its debit account's cell (which coordinates it); the credit
    // account's cell refuses it, naming the debit account. A lookup of
    // transfers names no account.
    let mixed = Transfer { credit_account_id: theirs, ..transfer };
    let mut answer = stepped.submit(owner, Request::CreateTransfers(vec![mixed]));
    assert!(matches!(answer.try_recv(), Ok(Err(NodeError::NotLeader { .. }))));
    let mut answer = stepped.submit(other, Request::CreateTransfers(vec![mixed]));
    assert!(matches!(answer.try_recv(), Ok(Err(NodeError::Misrouted { account, .. })) if account == mine));
    let mut answer = stepped.submit(other, Request::LookupTransfers(vec![7]));
    assert!(matches!(answer.try_recv(), Ok(Err(NodeError::NotLeader { .. }))));
    stepped.shutdown();
}
