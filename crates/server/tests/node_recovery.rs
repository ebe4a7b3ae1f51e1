//! The node engine, in process: group commit, restart and recovery from the
//! checkpoint plus the log, checkpoints with log truncation, and refusals.

use cellpay_ledger::{Account, AccountFilter, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags};
use cellpay_server::node::{Node, NodeConfig, NodeError, Reply, Request};

fn config(dir: &std::path::Path) -> NodeConfig {
    NodeConfig { checkpoint_transfers_max: 1000, ..NodeConfig::new(dir) }
}

fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> Transfer {
    Transfer {
        id,
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        ledger: 1,
        code: 1,
        ..Transfer::default()
    }
}

async fn create_transfers(node: &Node, transfers: Vec<Transfer>) -> Vec<CreateTransferResult> {
    match node.handle().submit(Request::CreateTransfers(transfers)).await.unwrap() {
        Reply::CreateTransfers(results) => results,
        other => panic!("unexpected reply {other:?}"),
    }
}

async fn accounts(node: &Node, ids: Vec<u128>) -> Vec<Account> {
    match node.handle().submit(Request::LookupAccounts(ids)).await.unwrap() {
        Reply::Accounts(accounts) => accounts,
        other => panic!("unexpected reply {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_every_acknowledged_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(config(dir.path())).unwrap();
    let new_accounts: Vec<Account> =
        (1..=10u128).map(|id| Account { id, ledger: 1, code: 1, ..Account::default() }).collect();
    let reply = node.handle().submit(Request::CreateAccounts(new_accounts)).await.unwrap();
    assert_eq!(reply, Reply::CreateAccounts(vec![CreateAccountResult::Ok; 10]));

    // 2,500 transfers in concurrent requests: more than two checkpoints' worth.
    let mut tasks = Vec::new();
    for request in 0..25u128 {
        let handle = node.handle();
        tasks.push(tokio::spawn(async move {
            let batch: Vec<Transfer> =
                (0..100u128).map(|i| transfer(request * 100 + i + 1, i % 10 + 1, (i + 3) % 10 + 1, 1)).collect();
            handle.submit(Request::CreateTransfers(batch)).await.unwrap()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), Reply::CreateTransfers(vec![CreateTransferResult::Ok; 100]));
    }
    let pending = Transfer { flags: TransferFlags::PENDING, timeout_s: 3600, ..transfer(9_000, 1, 2, 7) };
    assert_eq!(create_transfers(&node, vec![pending]).await, [CreateTransferResult::Ok]);
    let before = accounts(&node, (1..=10).collect()).await;
    node.shutdown();

    let node = Node::start(config(dir.path())).unwrap();
    // A clean shutdown checkpoints everything: nothing to replay.
    assert!(node.recovery.cells.iter().find(|c| c.cell == 1).unwrap().checkpoint_index > 0);
    assert_eq!(node.recovery.records_replayed, 0);
    assert_eq!(accounts(&node, (1..=10).collect()).await, before);
    // Every transfer is still there: retries answer `exists`.
    let retry: Vec<Transfer> = (0..100u128).map(|i| transfer(i + 1, i % 10 + 1, (i + 3) % 10 + 1, 1)).collect();
    assert_eq!(create_transfers(&node, retry).await, vec![CreateTransferResult::Exists; 100]);
    // The open pending transfer survived and can be posted once.
    let post =
        Transfer { id: 9_001, pending_id: 9_000, flags: TransferFlags::POST_PENDING_TRANSFER, ..Transfer::default() };
    assert_eq!(create_transfers(&node, vec![post]).await, [CreateTransferResult::Ok]);
    assert_eq!(create_transfers(&node, vec![post]).await, [CreateTransferResult::Exists]);
    let history = node.handle().submit(Request::GetAccountTransfers(AccountFilter::account(1, 8190))).await.unwrap();
    let Reply::Transfers(history) = history else { panic!("unexpected reply") };
    assert_eq!(history.len(), 2 * 250 + 2);
    assert!(history.windows(2).all(|w| w[0].timestamp < w[1].timestamp));
    node.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_without_a_clean_shutdown_replays_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(NodeConfig { checkpoint_transfers_max: usize::MAX, ..config(dir.path()) }).unwrap();
    let new_accounts: Vec<Account> =
        (1..=3u128).map(|id| Account { id, ledger: 1, code: 1, ..Account::default() }).collect();
    node.handle().submit(Request::CreateAccounts(new_accounts)).await.unwrap();
    for id in 1..=50u128 {
        assert_eq!(create_transfers(&node, vec![transfer(id, 1, 2, id)]).await, [CreateTransferResult::Ok]);
    }
    let before = accounts(&node, vec![1, 2, 3]).await;
    // Stop without the final checkpoint: the data is as a crash leaves it.
    node.halt();

    let node = Node::start(config(dir.path())).unwrap();
    assert_eq!(node.recovery.cells.iter().find(|c| c.cell == 1).unwrap().checkpoint_index, 0);
    assert_eq!(node.recovery.records_replayed, 51);
    assert_eq!(accounts(&node, vec![1, 2, 3]).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(config(dir.path())).unwrap();
    let handle = node.handle();
    assert_eq!(handle.submit(Request::CreateTransfers(vec![])).await, Err(NodeError::BatchEmpty));
    let too_many = vec![transfer(1, 1, 2, 1); 8191];
    assert_eq!(handle.submit(Request::CreateTransfers(too_many)).await, Err(NodeError::BatchTooLarge { events: 8191 }));
    let filter = AccountFilter { limit: 0, ..AccountFilter::account(1, 1) };
    assert!(matches!(handle.submit(Request::GetAccountTransfers(filter)).await, Err(NodeError::InvalidFilter(_))));
    node.shutdown();
    let node = Node::start(config(dir.path())).unwrap();
    // Raft's own records (membership, votes, a new leader's empty entry) are
    // logged; no request was.
    assert_eq!(node.recovery.records_replayed, 0, "nothing was logged");
    assert_eq!(node.recovery.accounts, 0);
}
