//! Ledger definitions in the global cell, in process: a node alone hosting
//! the global cell and two cells. A definition is a compare-and-set entry of
//! the global cell's log; each cell adopts the definitions into its own log
//! and creates accounts only on ledgers its log defines; and definitions and
//! adoptions survive a crash (replayed from the log) and a clean restart
//! (from the checkpoints).

mod two_cells;

use std::time::{Duration, Instant};

use cellpay_cluster::ledgers::LedgerDefinition;
use cellpay_cluster::topology::GLOBAL_CELL;
use cellpay_ledger::id::account_id;
use cellpay_ledger::{Account, CreateAccountResult};
use cellpay_server::node::{Node, NodeConfig, NodeError, NodeHandle, Reply, Request};

fn start(dir: &std::path::Path) -> Node {
    Node::start(NodeConfig::cluster(dir, two_cells::topology(None), 1)).unwrap()
}

fn account(user: u64, ledger: u32) -> Account {
    Account { id: account_id(user, u64::from(ledger)).unwrap(), ledger, code: 1, ..Account::default() }
}

async fn create(handle: &NodeHandle, accounts: Vec<Account>) -> Vec<CreateAccountResult> {
    match handle.submit(Request::CreateAccounts(accounts)).await {
        Ok(Reply::CreateAccounts(results)) => results,
        other => panic!("create_accounts failed: {other:?}"),
    }
}

fn usd() -> LedgerDefinition {
    LedgerDefinition { id: 840, name: "USD".to_string(), asset_scale: 2 }
}

/// Waits until every hosted cell's log has adopted definitions at `version`.
async fn adopted(handle: &NodeHandle, version: u64) -> Duration {
    let started = Instant::now();
    loop {
        let cells = handle.status().cells();
        if cells.iter().all(|cell| cell.ledgers_version >= version) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "not adopted in 10 s: {cells:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_are_compare_and_set_adopted_by_every_cell_enforced_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let handle = node.handle();
    let table = handle.status().ledgers();
    assert_eq!(table.version(), 1, "the topology's definitions");
    assert_eq!(table.definitions().map(|ledger| ledger.id).collect::<Vec<_>>(), [1]);

    // Users 1 and 99 are in cells 1 and 2 (shards 1 and 99 of two_cells' split).
    let (user_a, user_b) = (1, 99);
    let before = create(&handle, vec![account(user_a, 1), account(user_a, 840)]).await;
    assert_eq!(before, [CreateAccountResult::Ok, CreateAccountResult::LedgerNotDefined]);

    // Refused, with nothing changed: a stale version, a definition sent to a
    // cell, an invalid one, a redefinition.
    let define = |expected_version, definition| Request::DefineLedger { expected_version, definition };
    let refused = |result: Result<Reply, NodeError>, reason: &str| match result {
        Err(NodeError::ChangeRefused { reason: text, .. }) => assert!(text.contains(reason), "{text:?}: {reason:?}"),
        other => panic!("expected a refusal ({reason}), got {other:?}"),
    };
    refused(handle.submit_admin(define(0, usd())).await, "at version 1, not 0");
    let bad = LedgerDefinition { name: "U S D".to_string(), ..usd() };
    refused(handle.submit_admin(define(1, bad)).await, "name \"U S D\" is invalid");
    let cny_again = LedgerDefinition { asset_scale: 4, ..LedgerDefinition::local() };
    refused(handle.submit_admin(define(1, cny_again)).await, "ledger 1 is already defined");
    refused(handle.submit_cell(1, define(1, usd())).await, "only adopts ledger definitions");
    assert_eq!(handle.status().ledgers().version(), 1);

    let Ok(Reply::LedgersChanged(table)) = handle.submit_admin(define(1, usd())).await else {
        panic!("the definition was refused")
    };
    assert_eq!(table.version(), 2);
    assert_eq!(table.get(840), Some(&usd()));
    assert_eq!(handle.status().ledgers().version(), 2, "published as soon as applied");
    let took = adopted(&handle, 2).await;
    println!("every cell adopted definitions version 2 {} ms after the definition", took.as_millis());
    assert!(handle.status().cell(GLOBAL_CELL).is_some_and(|cell| cell.ledgers_version == 2));

    assert_eq!(create(&handle, vec![account(user_a, 840)]).await, [CreateAccountResult::Ok]);
    let after = create(&handle, vec![account(user_b, 840), account(user_b, 978)]).await;
    assert_eq!(after, [CreateAccountResult::Ok, CreateAccountResult::LedgerNotDefined]);
    drop(handle);

    // A crash: the definition and the adoptions are replayed from the logs.
    node.halt();
    let node = start(dir.path());
    let handle = node.handle();
    assert_eq!(handle.status().ledgers().get(840), Some(&usd()));
    assert!(handle.status().cells().iter().all(|cell| cell.ledgers_version == 2), "replayed, not re-adopted");
    assert_eq!(create(&handle, vec![account(user_a, 840)]).await, [CreateAccountResult::Exists]);
    assert_eq!(create(&handle, vec![account(user_b + 100, 840)]).await, [CreateAccountResult::Ok]);
    drop(handle);

    // A clean stop checkpoints: the definitions come from the stores.
    node.shutdown();
    let node = start(dir.path());
    assert_eq!(node.recovery.records_replayed, 0, "nothing to replay after a clean stop");
    let handle = node.handle();
    assert_eq!(handle.status().ledgers().version(), 2);
    assert!(handle.status().cells().iter().all(|cell| cell.ledgers_version == 2));
    let last = create(&handle, vec![account(user_b + 200, 840), account(user_b + 200, 978)]).await;
    assert_eq!(last, [CreateAccountResult::Ok, CreateAccountResult::LedgerNotDefined]);
    drop(handle);
    node.shutdown();
}
