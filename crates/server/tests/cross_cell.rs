//! Cross-cell transfers, in process: one node hosting the global cell and
//! two cells (cell 1 owns shards 0–49, cell 2 shards 50–99). A transfer
//! between the cells is tried in both, decided by the debit account's cell
//! and posted in both; a refusal in either cancels both legs; a linked chain
//! across the cells is all or nothing; retries answer as the first attempt
//! did; and everything survives a crash (replayed from the log) and a clean
//! restart (restored from checkpoints, the cross-cell state with them).

mod two_cells;

use cellpay_ledger::id::{account_id, clearing_account_id, resolution_id};
use cellpay_ledger::{Account, AccountFlags, CreateAccountResult, CreateTransferResult as R, Transfer, TransferFlags};
use cellpay_server::node::{Node, NodeConfig, NodeHandle, Reply, Request};

const LEDGER: u32 = 1;

fn start(dir: &std::path::Path) -> Node {
    Node::start(NodeConfig::cluster(dir, two_cells::topology(None), 1)).unwrap()
}

/// User 1 and 2 are in cell 1; users 51 and 52 in cell 2.
fn user(user: u64) -> u128 {
    account_id(user, 1).unwrap()
}

fn transfer(id: u128, debit: u64, credit: u64, amount: u128) -> Transfer {
    Transfer {
        id,
        debit_account_id: user(debit),
        credit_account_id: user(credit),
        amount,
        ledger: LEDGER,
        code: 1,
        ..Transfer::default()
    }
}

async fn transfers(handle: &NodeHandle, batch: Vec<Transfer>) -> Vec<R> {
    match handle.submit(Request::CreateTransfers(batch)).await {
        Ok(Reply::CreateTransfers(results)) => results,
        other => panic!("transfers were not answered: {other:?}"),
    }
}

async fn account(handle: &NodeHandle, id: u128) -> Account {
    match handle.submit(Request::LookupAccounts(vec![id])).await {
        Ok(Reply::Accounts(accounts)) if accounts.len() == 1 => accounts[0],
        other => panic!("account {id} was not found: {other:?}"),
    }
}

/// (debits_posted, credits_posted, debits_pending, credits_pending)
async fn balance(handle: &NodeHandle, id: u128) -> (u128, u128, u128, u128) {
    let a = account(handle, id).await;
    (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending)
}

async fn setup(handle: &NodeHandle) {
    // Users 1 and 51 are funded by banks (user 3 in cell 1, user 53 in cell 2).
    let limited = |id| Account {
        id: user(id),
        ledger: LEDGER,
        code: 1,
        flags: AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
        ..Account::default()
    };
    let bank = |id| Account { id: user(id), ledger: LEDGER, code: 1, ..Account::default() };
    for accounts in [vec![limited(1), limited(2), bank(3)], vec![limited(51), limited(52), bank(53)]] {
        let results = handle.submit(Request::CreateAccounts(accounts)).await;
        assert_eq!(results, Ok(Reply::CreateAccounts(vec![CreateAccountResult::Ok; 3])));
    }
    assert_eq!(transfers(handle, vec![transfer(1, 3, 1, 1_000)]).await, vec![R::Ok]);
    assert_eq!(transfers(handle, vec![transfer(2, 53, 51, 1_000)]).await, vec![R::Ok]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_between_cells_is_applied_in_both_or_in_neither() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let handle = node.handle();
    setup(&handle).await;

    // Cell 1 → cell 2: decided by cell 1, posted in both.
    assert_eq!(transfers(&handle, vec![transfer(10, 1, 52, 100)]).await, vec![R::Ok]);
    assert_eq!(balance(&handle, user(1)).await, (100, 1_000, 0, 0));
    assert_eq!(balance(&handle, user(52)).await, (0, 100, 0, 0));
    let to_cell_2 = clearing_account_id(LEDGER, 1, 2);
    let from_cell_1 = clearing_account_id(LEDGER, 2, 1);
    assert_eq!(balance(&handle, to_cell_2).await, (0, 100, 0, 0), "cell 1's clearing account for cell 2");
    // The lookup finds both legs; each leg is posted by its resolution.
    let legs = match handle.submit(Request::LookupTransfers(vec![10, resolution_id(10)])).await {
        Ok(Reply::Transfers(found)) => found,
        other => panic!("{other:?}"),
    };
    assert_eq!(legs.len(), 2, "one leg and one resolution per id, merged by id: {legs:?}");
    assert!(legs.iter().any(|t| t.id == resolution_id(10) && t.flags.contains(TransferFlags::POST_PENDING_TRANSFER)));

    // A retry answers `exists`, and moves nothing.
    assert_eq!(transfers(&handle, vec![transfer(10, 1, 52, 100)]).await, vec![R::Exists]);
    let mut changed = transfer(10, 1, 52, 101);
    changed.user_data_32 = 0;
    assert_eq!(transfers(&handle, vec![changed]).await, vec![R::ExistsWithDifferentAmount]);
    assert_eq!(balance(&handle, user(1)).await, (100, 1_000, 0, 0));

    // Refused by the participant (no such credit account): nothing applied anywhere.
    assert_eq!(transfers(&handle, vec![transfer(11, 1, 77, 5)]).await, vec![R::CreditAccountNotFound]);
    assert_eq!(balance(&handle, user(1)).await, (100, 1_000, 0, 0), "the debit leg was voided");
    assert_eq!(balance(&handle, to_cell_2).await, (0, 100, 0, 0));
    // A retry of the cancelled transfer answers the same refusal.
    assert_eq!(transfers(&handle, vec![transfer(11, 1, 77, 5)]).await, vec![R::CreditAccountNotFound]);

    // Refused by the coordinator (over the balance): never tried elsewhere.
    assert_eq!(transfers(&handle, vec![transfer(12, 1, 52, 5_000)]).await, vec![R::ExceedsCredits]);
    assert_eq!(balance(&handle, user(52)).await, (0, 100, 0, 0));

    // Cell 2 → cell 1, and a local transfer in the same request.
    let batch = vec![transfer(13, 51, 2, 30), transfer(14, 51, 52, 20)];
    assert_eq!(transfers(&handle, batch).await, vec![R::Ok, R::Ok]);
    assert_eq!(balance(&handle, user(51)).await, (50, 1_000, 0, 0));
    assert_eq!(balance(&handle, user(2)).await, (0, 30, 0, 0));
    assert_eq!(balance(&handle, from_cell_1).await, (100, 30, 0, 0), "cell 2's clearing account for cell 1");

    // A linked chain across both cells: all or nothing. Its second event
    // (in cell 2, debiting user 52, who holds 120) fails: the first is undone.
    let mut first = transfer(20, 1, 51, 10);
    first.flags = TransferFlags::LINKED;
    let second = transfer(21, 52, 2, 500);
    assert_eq!(transfers(&handle, vec![first, second]).await, vec![R::LinkedEventFailed, R::ExceedsCredits]);
    assert_eq!(balance(&handle, user(1)).await, (100, 1_000, 0, 0));
    assert_eq!(balance(&handle, user(51)).await, (50, 1_000, 0, 0));
    // The same chain, possible this time (new ids): both apply.
    let mut first = transfer(22, 1, 51, 10);
    first.flags = TransferFlags::LINKED;
    let second = transfer(23, 52, 2, 60);
    assert_eq!(transfers(&handle, vec![first, second]).await, vec![R::Ok, R::Ok]);
    assert_eq!(balance(&handle, user(52)).await, (60, 120, 0, 0));
    assert_eq!(balance(&handle, user(2)).await, (0, 90, 0, 0));

    // A leg is the coordinator's to resolve: a client cannot post or void it, nor mark one.
    let post_leg = Transfer {
        id: 33,
        pending_id: 10,
        flags: TransferFlags::POST_PENDING_TRANSFER,
        ledger: LEDGER,
        code: 1,
        ..Transfer::default()
    };
    assert_eq!(transfers(&handle, vec![post_leg]).await, vec![R::PendingTransferIsCrossCellLeg]);
    let mut marked = transfer(34, 1, 2, 1);
    marked.flags = TransferFlags::CROSS_CELL_LEG;
    assert_eq!(transfers(&handle, vec![marked]).await, vec![R::ReservedFlag]);

    // Unsupported across cells (for now): balancing and closing transfers; reserved ids and accounts.
    let mut balancing = transfer(30, 1, 52, 1);
    balancing.flags = TransferFlags::BALANCING_DEBIT;
    assert_eq!(transfers(&handle, vec![balancing]).await, vec![R::CrossCellFlagsUnsupported]);
    assert_eq!(transfers(&handle, vec![transfer(resolution_id(31), 1, 2, 1)]).await, vec![R::IdReserved]);
    let mut clearing = transfer(32, 1, 2, 1);
    clearing.credit_account_id = to_cell_2;
    assert_eq!(transfers(&handle, vec![clearing]).await, vec![R::AccountReserved]);

    // Money is conserved in each cell, and the clearing accounts of the pair net to zero.
    let status = |cell| handle.status().cell(cell).unwrap();
    assert!(status(1).accounts > 0 && status(2).accounts > 0);
    let (x, y) = (balance(&handle, to_cell_2).await, balance(&handle, from_cell_1).await);
    assert_eq!(x.1 - x.0, y.0 - y.1, "what cell 1 credited cell 2's clearing account, cell 2 debited cell 1's");
    drop(handle);

    // A crash: everything is replayed from the log; a clean stop: from the checkpoints.
    let before = (balance(&node.handle(), user(1)).await, balance(&node.handle(), user(52)).await);
    node.halt();
    let node = start(dir.path());
    let handle = node.handle();
    assert_eq!((balance(&handle, user(1)).await, balance(&handle, user(52)).await), before);
    assert_eq!(transfers(&handle, vec![transfer(10, 1, 52, 100)]).await, vec![R::Exists]);
    assert_eq!(transfers(&handle, vec![transfer(40, 1, 52, 1)]).await, vec![R::Ok]);
    drop(handle);
    node.shutdown();
    let node = start(dir.path());
    assert_eq!(node.recovery.records_replayed, 0);
    let handle = node.handle();
    assert_eq!(balance(&handle, user(52)).await, (60, 121, 0, 0));
    assert_eq!(transfers(&handle, vec![transfer(11, 1, 77, 5)]).await, vec![R::CreditAccountNotFound]);
    drop(handle);
    node.shutdown();
}

fn pending(id: u128, debit: u64, credit: u64, amount: u128, timeout_s: u32) -> Transfer {
    Transfer { flags: TransferFlags::PENDING, timeout_s, ..transfer(id, debit, credit, amount) }
}

/// A post (or void) of pending transfer `pending_id`, naming its debit
/// account (so that the node routes it to that account's cell, which holds it).
fn resolve(id: u128, pending_id: u128, debit: u64, amount: u128, flags: TransferFlags) -> Transfer {
    Transfer {
        id,
        pending_id,
        debit_account_id: user(debit),
        amount,
        flags,
        ledger: LEDGER,
        code: 1,
        ..Transfer::default()
    }
}

async fn lookup(handle: &NodeHandle, id: u128) -> Transfer {
    match handle.submit(Request::LookupTransfers(vec![id])).await {
        Ok(Reply::Transfers(found)) if found.len() == 1 => found[0],
        other => panic!("transfer {id} was not found once: {other:?}"),
    }
}

/// Waits (up to 10 s) until `id`'s balance is `expected`: the other cell's
/// leg is released after the client's answer.
async fn await_balance(handle: &NodeHandle, id: u128, expected: (u128, u128, u128, u128), what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let found = balance(handle, id).await;
        if found == expected {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: balance {found:?}, expected {expected:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_transfer_between_cells_is_posted_voided_or_expired_in_both() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let handle = node.handle();
    setup(&handle).await;
    let to_cell_2 = clearing_account_id(LEDGER, 1, 2);
    let from_cell_1 = clearing_account_id(LEDGER, 2, 1);

    // Pending from cell 1 to cell 2: reserved in both once confirmed.
    assert_eq!(transfers(&handle, vec![pending(50, 1, 52, 100, 0)]).await, vec![R::Ok]);
    assert_eq!(balance(&handle, user(1)).await, (0, 1_000, 100, 0));
    await_balance(&handle, user(52), (0, 0, 0, 100), "the credit leg stays pending").await;
    assert_eq!(transfers(&handle, vec![pending(50, 1, 52, 100, 0)]).await, vec![R::Exists]);
    // A lookup shows it as the client sent it: both legs merged.
    let found = lookup(&handle, 50).await;
    assert_eq!((found.debit_account_id, found.credit_account_id, found.amount), (user(1), user(52), 100));
    assert!(found.flags.contains(TransferFlags::PENDING) && found.flags.contains(TransferFlags::CROSS_CELL_LEG));

    // A partial post, naming both of the client's accounts: posted here, released there.
    let mut post = resolve(51, 50, 1, 60, TransferFlags::POST_PENDING_TRANSFER);
    post.credit_account_id = user(52);
    assert_eq!(transfers(&handle, vec![post]).await, vec![R::Ok]);
    assert_eq!(balance(&handle, user(1)).await, (60, 1_000, 0, 0));
    await_balance(&handle, user(52), (0, 60, 0, 0), "the release posts the credit leg").await;
    await_balance(&handle, from_cell_1, (60, 0, 0, 0), "cell 2's clearing account").await;
    assert_eq!(balance(&handle, to_cell_2).await, (0, 60, 0, 0));
    assert_eq!(transfers(&handle, vec![post]).await, vec![R::Exists]);
    let found = lookup(&handle, 51).await;
    assert_eq!((found.debit_account_id, found.credit_account_id, found.amount), (user(1), user(52), 60));
    let again = resolve(52, 50, 1, 0, TransferFlags::POST_PENDING_TRANSFER);
    assert_eq!(transfers(&handle, vec![again]).await, vec![R::PendingTransferAlreadyPosted]);
    // Naming another credit account is refused, as for any pending transfer.
    assert_eq!(transfers(&handle, vec![pending(53, 1, 52, 10, 0)]).await, vec![R::Ok]);
    let mut wrong = resolve(54, 53, 1, 0, TransferFlags::POST_PENDING_TRANSFER);
    wrong.credit_account_id = user(51);
    assert_eq!(transfers(&handle, vec![wrong]).await, vec![R::PendingTransferHasDifferentCreditAccountId]);

    // A void releases both reservations.
    let void = resolve(55, 53, 1, 0, TransferFlags::VOID_PENDING_TRANSFER);
    assert_eq!(transfers(&handle, vec![void]).await, vec![R::Ok]);
    assert_eq!(balance(&handle, user(1)).await, (60, 1_000, 0, 0));
    await_balance(&handle, user(52), (0, 60, 0, 0), "the release voids the credit leg").await;

    // A timeout expires both: the coordinator expires its leg and releases the other.
    assert_eq!(transfers(&handle, vec![pending(56, 1, 52, 7, 1)]).await, vec![R::Ok]);
    await_balance(&handle, user(52), (0, 60, 0, 7), "the credit leg of the expiring transfer").await;
    await_balance(&handle, user(1), (60, 1_000, 0, 0), "the debit leg expires").await;
    await_balance(&handle, user(52), (0, 60, 0, 0), "the credit leg expires with it").await;
    let late = resolve(57, 56, 1, 0, TransferFlags::POST_PENDING_TRANSFER);
    assert_eq!(transfers(&handle, vec![late]).await, vec![R::PendingTransferExpired]);

    // Refused by the participant: nothing reserved anywhere.
    assert_eq!(transfers(&handle, vec![pending(58, 1, 77, 5, 0)]).await, vec![R::CreditAccountNotFound]);
    assert_eq!(balance(&handle, user(1)).await, (60, 1_000, 0, 0));
    // A pending transfer is held by its debit account's cell, which must coordinate it.
    let mut head = transfer(59, 1, 2, 1);
    head.flags = TransferFlags::LINKED;
    let chain = vec![head, pending(60, 51, 2, 1, 0)];
    assert_eq!(transfers(&handle, chain).await, vec![R::LinkedEventFailed, R::CrossCellFlagsUnsupported]);

    // Held transfers survive a crash (the log) and a clean restart (the checkpoints).
    assert_eq!(transfers(&handle, vec![pending(61, 1, 52, 5, 0), pending(62, 1, 52, 6, 0)]).await, vec![R::Ok; 2]);
    await_balance(&handle, user(52), (0, 60, 0, 11), "two credit legs pending").await;
    drop(handle);
    node.halt();
    let node = start(dir.path());
    let handle = node.handle();
    let post = resolve(63, 61, 1, 0, TransferFlags::POST_PENDING_TRANSFER);
    assert_eq!(transfers(&handle, vec![post]).await, vec![R::Ok]);
    await_balance(&handle, user(52), (0, 65, 0, 6), "posted after the crash").await;
    drop(handle);
    node.shutdown();
    let node = start(dir.path());
    assert_eq!(node.recovery.records_replayed, 0);
    let handle = node.handle();
    let void = resolve(64, 62, 1, 0, TransferFlags::VOID_PENDING_TRANSFER);
    assert_eq!(transfers(&handle, vec![void]).await, vec![R::Ok]);
    await_balance(&handle, user(52), (0, 65, 0, 0), "voided after the restart").await;
    assert_eq!(balance(&handle, user(1)).await, (65, 1_000, 0, 0));
    // Each cell conserves money; the pair's clearing accounts net to zero.
    let (x, y) = (balance(&handle, to_cell_2).await, balance(&handle, from_cell_1).await);
    assert_eq!((x.1, x.3), (65, 0));
    assert_eq!((y.0, y.2), (65, 0));
    drop(handle);
    node.shutdown();
}

/// The cross-cell state is stored with every checkpoint, within a byte
/// budget: past it, new cross-cell pending transfers are refused (not a
/// failed checkpoint), and a clean restart restores the full state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_cell_pending_transfers_are_refused_past_the_state_budget_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let handle = node.handle();
    setup(&handle).await;
    // Bank 3 (cell 1, no limits) reserves 1 for user 52 (cell 2), a thousand at a time.
    let mut held = 0u64;
    let mut refused = 0;
    for batch in 0..8u64 {
        let events: Vec<Transfer> =
            (0..1_000).map(|i| pending(u128::from((1 << 32) + batch * 1_000 + i), 3, 52, 1, 0)).collect();
        for result in transfers(&handle, events).await {
            match result {
                R::Ok => held += 1,
                R::CrossCellTransfersMaxReached => refused += 1,
                other => panic!("a pending transfer across cells answered {other}"),
            }
        }
    }
    assert!(held >= 3_000 && refused > 0, "{held} held, {refused} refused");
    await_balance(&handle, user(52), (0, 0, 0, u128::from(held)), "every held transfer reserved in cell 2").await;
    drop(handle);
    node.shutdown();
    let node = start(dir.path());
    assert_eq!(node.recovery.records_replayed, 0, "restored from the checkpoint");
    let handle = node.handle();
    // Voiding one makes room for one more.
    let void = resolve(1 << 40, 1 << 32, 3, 0, TransferFlags::VOID_PENDING_TRANSFER);
    assert_eq!(transfers(&handle, vec![void]).await, vec![R::Ok]);
    await_balance(&handle, user(52), (0, 0, 0, u128::from(held - 1)), "the void released").await;
    assert_eq!(transfers(&handle, vec![pending(1 << 41, 3, 52, 1, 0)]).await, vec![R::Ok]);
    drop(handle);
    node.shutdown();
}
