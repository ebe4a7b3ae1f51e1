//! Scenario tests of the ledger state machine, through its public API only.
//!
//! Every scenario runs against `World`, the one helper that calls the ledger,
//! and checks the ledger's own audit after every batch.

use cellpay_ledger::{
    Account, AccountFilter, AccountFlags, CreateAccountResult, CreateTransferResult as R, Ledger, LedgerConfig,
    MemoryHistory, PendingStatus, Transfer, TransferFlags,
};

const SECOND_NS: u64 = 1_000_000_000;

struct World {
    ledger: Ledger,
    history: MemoryHistory,
    clock_ns: u64,
}

impl World {
    fn new() -> World {
        World::with_config(LedgerConfig::default())
    }

    fn with_config(config: LedgerConfig) -> World {
        World { ledger: Ledger::new(config), history: MemoryHistory::new(), clock_ns: 1_000 * SECOND_NS }
    }

    /// Creates accounts 1..=n on ledger 1 with the given flags, all expected to succeed.
    fn accounts(&mut self, flags: &[AccountFlags]) {
        let accounts: Vec<Account> = flags
            .iter()
            .enumerate()
            .map(|(i, f)| Account { id: i as u128 + 1, ledger: 1, code: 10, flags: *f, ..Account::default() })
            .collect();
        let results = self.create_accounts(&accounts);
        assert!(results.iter().all(|r| *r == CreateAccountResult::Ok), "{results:?}");
    }

    fn create_accounts(&mut self, accounts: &[Account]) -> Vec<CreateAccountResult> {
        self.clock_ns += SECOND_NS;
        let results = self.ledger.create_accounts(self.clock_ns, accounts);
        self.ledger.audit().unwrap();
        results
    }

    fn transfers(&mut self, transfers: &[Transfer]) -> Vec<R> {
        self.clock_ns += SECOND_NS;
        let results = self.ledger.create_transfers(self.clock_ns, transfers, &self.history);
        self.ledger.audit().unwrap();
        results
    }

    fn advance_s(&mut self, seconds: u64) {
        self.clock_ns += seconds * SECOND_NS;
    }

    fn checkpoint(&mut self) {
        let delta = self.ledger.checkpoint();
        self.history.apply(&delta);
    }

    /// (debits_pending, debits_posted, credits_pending, credits_posted)
    fn balance(&self, id: u128) -> (u128, u128, u128, u128) {
        let a = self.ledger.account(id).unwrap();
        (a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted)
    }

    fn lookup(&self, id: u128) -> Option<Transfer> {
        self.ledger.lookup_transfers(&[id], &self.history).first().copied()
    }
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

fn with_flags(mut t: Transfer, flags: TransferFlags) -> Transfer {
    t.flags = flags;
    t
}

fn resolve(id: u128, pending_id: u128, amount: u128, flags: TransferFlags) -> Transfer {
    Transfer { id, pending_id, amount, flags, ..Transfer::default() }
}

const NONE: AccountFlags = AccountFlags(0);

#[test]
fn simple_transfer_moves_money_and_retry_is_idempotent() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE]);
    assert_eq!(w.transfers(&[transfer(100, 1, 2, 50)]), [R::Ok]);
    assert_eq!(w.balance(1), (0, 50, 0, 0));
    assert_eq!(w.balance(2), (0, 0, 0, 50));
    assert_eq!(w.transfers(&[transfer(100, 1, 2, 50)]), [R::Exists]);
    assert_eq!(w.transfers(&[transfer(100, 1, 2, 51)]), [R::ExistsWithDifferentAmount]);
    assert_eq!(w.transfers(&[transfer(100, 2, 1, 50)]), [R::ExistsWithDifferentDebitAccountId]);
    assert_eq!(w.balance(1), (0, 50, 0, 0));
    // The retry still answers `exists` after a checkpoint moved the transfer to history.
    w.checkpoint();
    assert_eq!(w.transfers(&[transfer(100, 1, 2, 50)]), [R::Exists]);
    assert_eq!(w.balance(2), (0, 0, 0, 50));
}

#[test]
fn validation_follows_the_documented_precedence() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE]);
    let cases: Vec<(Transfer, R)> = vec![
        (Transfer { timestamp: 1, id: 0, ..transfer(1, 1, 2, 1) }, R::TimestampMustBeZero),
        (with_flags(transfer(0, 1, 2, 1), TransferFlags(1 << 15)), R::ReservedFlag),
        (transfer(0, 1, 2, 1), R::IdMustNotBeZero),
        (transfer(u128::MAX, 1, 2, 1), R::IdMustNotBeIntMax),
        (
            with_flags(transfer(1, 1, 2, 1), TransferFlags::PENDING | TransferFlags::VOID_PENDING_TRANSFER),
            R::FlagsAreMutuallyExclusive,
        ),
        (transfer(1, 0, 2, 1), R::DebitAccountIdMustNotBeZero),
        (transfer(1, 1, 0, 1), R::CreditAccountIdMustNotBeZero),
        (transfer(1, 1, 1, 1), R::AccountsMustBeDifferent),
        (Transfer { pending_id: 5, ..transfer(1, 1, 2, 1) }, R::PendingIdMustBeZero),
        (resolve(1, 0, 0, TransferFlags::POST_PENDING_TRANSFER), R::PendingIdMustNotBeZero),
        (resolve(1, 1, 0, TransferFlags::POST_PENDING_TRANSFER), R::PendingIdMustBeDifferent),
        (Transfer { timeout_s: 5, ..transfer(1, 1, 2, 1) }, R::TimeoutReservedForPendingTransfer),
        (with_flags(transfer(1, 1, 2, 1), TransferFlags::CLOSING_DEBIT), R::ClosingTransferMustBePending),
        (Transfer { ledger: 0, ..transfer(1, 1, 2, 1) }, R::LedgerMustNotBeZero),
        (Transfer { code: 0, ..transfer(1, 1, 2, 1) }, R::CodeMustNotBeZero),
        (transfer(1, 9, 2, 1), R::DebitAccountNotFound),
        (transfer(1, 1, 9, 1), R::CreditAccountNotFound),
        (Transfer { ledger: 2, ..transfer(1, 1, 2, 1) }, R::TransferMustHaveTheSameLedgerAsAccounts),
        (resolve(1, 77, 0, TransferFlags::POST_PENDING_TRANSFER), R::PendingTransferNotFound),
    ];
    for (event, expected) in cases {
        assert_eq!(w.transfers(&[event]), [expected], "{event:?}");
    }
    assert_eq!(w.balance(1), (0, 0, 0, 0));
    assert!(w.lookup(1).is_none());
}

#[test]
fn account_creation_validates_and_is_idempotent() {
    let mut w = World::new();
    let a = Account { id: 7, ledger: 1, code: 1, ..Account::default() };
    let cases: Vec<(Account, CreateAccountResult)> = vec![
        (Account { timestamp: 1, ..a }, CreateAccountResult::TimestampMustBeZero),
        (Account { flags: AccountFlags(1 << 14), ..a }, CreateAccountResult::ReservedFlag),
        (Account { id: 0, ..a }, CreateAccountResult::IdMustNotBeZero),
        (Account { id: u128::MAX, ..a }, CreateAccountResult::IdMustNotBeIntMax),
        (
            Account {
                flags: AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS,
                ..a
            },
            CreateAccountResult::FlagsAreMutuallyExclusive,
        ),
        (Account { credits_posted: 5, ..a }, CreateAccountResult::CreditsPostedMustBeZero),
        (Account { ledger: 0, ..a }, CreateAccountResult::LedgerMustNotBeZero),
        (Account { code: 0, ..a }, CreateAccountResult::CodeMustNotBeZero),
        (a, CreateAccountResult::Ok),
        (a, CreateAccountResult::Exists),
        (Account { code: 2, ..a }, CreateAccountResult::ExistsWithDifferentCode),
        (Account { user_data_64: 2, ..a }, CreateAccountResult::ExistsWithDifferentUserData64),
    ];
    for (event, expected) in cases {
        assert_eq!(w.create_accounts(&[event]), [expected], "{event:?}");
    }
    assert_eq!(w.ledger.accounts_count(), 1);
}

#[test]
fn accounts_only_on_defined_ledgers_when_asked() {
    let mut w = World::new();
    let defined = |ledger: u32| ledger == 1;
    let a = Account { id: 7, ledger: 2, code: 1, ..Account::default() };
    let linked = Account { flags: AccountFlags::LINKED, ..Account { id: 8, ledger: 1, ..a } };
    let results = w.ledger.create_accounts_on(SECOND_NS, &[Account { ledger: 0, ..a }, a, linked, a], &defined);
    use CreateAccountResult as A;
    assert_eq!(results, [A::LedgerMustNotBeZero, A::LedgerNotDefined, A::LinkedEventFailed, A::LedgerNotDefined]);
    // The precedence: right after `ledger_must_not_be_zero`, before `code_must_not_be_zero` and `exists`.
    assert_eq!(
        w.ledger.create_accounts_on(2 * SECOND_NS, &[Account { code: 0, ..a }], &defined),
        [A::LedgerNotDefined]
    );
    assert_eq!(w.ledger.accounts_count(), 0);
    let b = Account { ledger: 1, ..a };
    assert_eq!(w.ledger.create_accounts_on(3 * SECOND_NS, &[b], &defined), [A::Ok]);
    assert_eq!(w.ledger.create_accounts_on(4 * SECOND_NS, &[b], &defined), [A::Exists]);
    w.ledger.audit().unwrap();
}

#[test]
fn balance_limits_refuse_overdrafts() {
    let mut w = World::new();
    w.accounts(&[AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS, NONE, AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS]);
    assert_eq!(w.transfers(&[transfer(1, 1, 2, 1)]), [R::ExceedsCredits]);
    assert_eq!(w.transfers(&[transfer(2, 2, 1, 100)]), [R::Ok]);
    assert_eq!(w.transfers(&[transfer(3, 1, 2, 100), transfer(4, 1, 2, 1)]), [R::Ok, R::ExceedsCredits]);
    assert_eq!(w.transfers(&[transfer(5, 2, 3, 1)]), [R::ExceedsDebits]);
    // A pending debit reserves headroom too.
    assert_eq!(w.transfers(&[transfer(6, 2, 1, 10)]), [R::Ok]);
    let pending = with_flags(transfer(7, 1, 2, 10), TransferFlags::PENDING);
    assert_eq!(w.transfers(&[pending, transfer(8, 1, 2, 1)]), [R::Ok, R::ExceedsCredits]);
    assert_eq!(w.balance(1), (10, 100, 0, 110));
}

#[test]
fn balancing_debit_moves_at_most_the_available_balance() {
    let mut w = World::new();
    w.accounts(&[AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS, NONE]);
    assert_eq!(w.transfers(&[transfer(1, 2, 1, 30)]), [R::Ok]);
    let sweep = with_flags(transfer(2, 1, 2, 1_000), TransferFlags::BALANCING_DEBIT);
    assert_eq!(w.transfers(&[sweep]), [R::Ok]);
    assert_eq!(w.lookup(2).unwrap().amount, 30);
    assert_eq!(w.balance(1), (0, 30, 0, 30));
    // A retry asking for at least what moved is the same transfer.
    assert_eq!(w.transfers(&[sweep]), [R::Exists]);
}

#[test]
fn linked_chains_are_all_or_nothing() {
    let mut w = World::new();
    w.accounts(&[AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS, NONE, NONE]);
    let linked = TransferFlags::LINKED;
    let chain = [
        with_flags(transfer(1, 2, 3, 5), linked),
        with_flags(transfer(2, 3, 2, 7), linked),
        transfer(3, 1, 2, 1), // fails: exceeds_credits
        transfer(4, 2, 3, 1), // outside the chain: applies
    ];
    assert_eq!(w.transfers(&chain), [R::LinkedEventFailed, R::LinkedEventFailed, R::ExceedsCredits, R::Ok]);
    assert!(w.lookup(1).is_none() && w.lookup(2).is_none() && w.lookup(3).is_none());
    assert_eq!(w.balance(2), (0, 1, 0, 0));
    assert_eq!(w.balance(3), (0, 0, 0, 1));

    // A chain left open at the end of the batch fails as a whole.
    let open =
        [transfer(5, 2, 3, 1), with_flags(transfer(6, 2, 3, 1), linked), with_flags(transfer(7, 2, 3, 1), linked)];
    assert_eq!(w.transfers(&open), [R::Ok, R::LinkedEventFailed, R::LinkedEventChainOpen]);
    assert!(w.lookup(6).is_none());

    // A chain that holds commits together, including pending and post inside it.
    let good = [
        with_flags(transfer(8, 2, 1, 10), linked),
        with_flags(with_flags(transfer(9, 1, 3, 4), TransferFlags::PENDING), linked | TransferFlags::PENDING),
        resolve(10, 9, 0, TransferFlags::POST_PENDING_TRANSFER),
    ];
    assert_eq!(w.transfers(&good), [R::Ok, R::Ok, R::Ok]);
    assert_eq!(w.balance(1), (0, 4, 0, 10));

    // A failure after a pending and a post inside a chain restores the pending state.
    let pending = with_flags(transfer(11, 2, 3, 3), TransferFlags::PENDING);
    assert_eq!(w.transfers(&[pending]), [R::Ok]);
    let before = (w.balance(2), w.balance(3));
    let chain = [
        resolve(12, 11, 2, TransferFlags::POST_PENDING_TRANSFER | linked),
        transfer(13, 1, 2, 1_000_000), // exceeds_credits
    ];
    assert_eq!(w.transfers(&chain), [R::LinkedEventFailed, R::ExceedsCredits]);
    assert_eq!((w.balance(2), w.balance(3)), before);
    assert_eq!(w.ledger.pending_status(11, &w.history), Some(PendingStatus::Pending));
    assert_eq!(w.transfers(&[resolve(14, 11, 0, TransferFlags::VOID_PENDING_TRANSFER)]), [R::Ok]);
}

#[test]
fn two_phase_post_partial_void_and_their_errors() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE]);
    let pending = with_flags(transfer(1, 1, 2, 100), TransferFlags::PENDING);
    assert_eq!(w.transfers(&[pending]), [R::Ok]);
    assert_eq!(w.balance(1), (100, 0, 0, 0));
    assert_eq!(
        w.transfers(&[resolve(2, 1, 101, TransferFlags::POST_PENDING_TRANSFER)]),
        [R::ExceedsPendingTransferAmount]
    );
    assert_eq!(w.transfers(&[resolve(2, 1, 40, TransferFlags::POST_PENDING_TRANSFER)]), [R::Ok]);
    assert_eq!(w.balance(1), (0, 40, 0, 0));
    assert_eq!(w.balance(2), (0, 0, 0, 40));
    let posted = w.lookup(2).unwrap();
    assert_eq!((posted.debit_account_id, posted.credit_account_id, posted.amount), (1, 2, 40));
    assert_eq!(
        w.transfers(&[resolve(3, 1, 0, TransferFlags::POST_PENDING_TRANSFER)]),
        [R::PendingTransferAlreadyPosted]
    );
    assert_eq!(
        w.transfers(&[resolve(3, 1, 0, TransferFlags::VOID_PENDING_TRANSFER)]),
        [R::PendingTransferAlreadyPosted]
    );
    assert_eq!(w.transfers(&[resolve(3, 2, 0, TransferFlags::VOID_PENDING_TRANSFER)]), [R::PendingTransferNotPending]);

    assert_eq!(w.transfers(&[with_flags(transfer(4, 1, 2, 9), TransferFlags::PENDING)]), [R::Ok]);
    w.checkpoint(); // the pending transfer and its status now come from history
    assert_eq!(
        w.transfers(&[resolve(5, 4, 8, TransferFlags::VOID_PENDING_TRANSFER)]),
        [R::PendingTransferHasDifferentAmount]
    );
    let wrong_side = Transfer { debit_account_id: 2, ..resolve(5, 4, 0, TransferFlags::VOID_PENDING_TRANSFER) };
    assert_eq!(w.transfers(&[wrong_side]), [R::PendingTransferHasDifferentDebitAccountId]);
    assert_eq!(w.transfers(&[resolve(5, 4, 0, TransferFlags::VOID_PENDING_TRANSFER)]), [R::Ok]);
    assert_eq!(w.balance(1), (0, 40, 0, 0));
    w.checkpoint();
    assert_eq!(
        w.transfers(&[resolve(6, 4, 0, TransferFlags::POST_PENDING_TRANSFER)]),
        [R::PendingTransferAlreadyVoided]
    );
    assert_eq!(w.transfers(&[resolve(5, 4, 0, TransferFlags::VOID_PENDING_TRANSFER)]), [R::Exists]);
}

#[test]
fn pending_transfers_expire_by_timestamp() {
    let mut w = World::new();
    w.accounts(&[NONE, AccountFlags::HISTORY]);
    let pending = Transfer { timeout_s: 10, ..with_flags(transfer(1, 1, 2, 5), TransferFlags::PENDING) };
    assert_eq!(w.transfers(&[pending]), [R::Ok]);
    let created_ns = w.lookup(1).unwrap().timestamp;
    assert_eq!(w.ledger.expiry_next(), Some(created_ns + 10 * SECOND_NS));
    w.advance_s(5);
    assert_eq!(w.ledger.pulse(w.clock_ns), 0);
    assert_eq!(w.balance(1), (5, 0, 0, 0));
    w.advance_s(5);
    assert_eq!(w.ledger.pulse(w.clock_ns), 1);
    w.ledger.audit().unwrap();
    assert_eq!(w.balance(1), (0, 0, 0, 0));
    assert_eq!(w.ledger.pending_status(1, &w.history), Some(PendingStatus::Expired));
    assert_eq!(w.transfers(&[resolve(2, 1, 0, TransferFlags::POST_PENDING_TRANSFER)]), [R::PendingTransferExpired]);
    let balances = w.ledger.get_account_balances(&AccountFilter::account(2, 10), &w.history).unwrap();
    let credits_pending: Vec<u128> = balances.iter().map(|b| b.credits_pending).collect();
    assert_eq!(credits_pending, [5, 0]);
}

#[test]
fn expiry_happens_before_the_batch_that_passes_it() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE]);
    let pending = Transfer { timeout_s: 1, ..with_flags(transfer(1, 1, 2, 5), TransferFlags::PENDING) };
    assert_eq!(w.transfers(&[pending]), [R::Ok]);
    w.advance_s(3);
    assert_eq!(w.transfers(&[resolve(2, 1, 0, TransferFlags::POST_PENDING_TRANSFER)]), [R::PendingTransferExpired]);
    assert_eq!(w.balance(1), (0, 0, 0, 0));
}

#[test]
fn closing_transfer_closes_and_void_reopens() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE]);
    let closing = with_flags(transfer(1, 1, 2, 0), TransferFlags::PENDING | TransferFlags::CLOSING_DEBIT);
    assert_eq!(w.transfers(&[closing]), [R::Ok]);
    assert!(w.ledger.account(1).unwrap().flags.contains(AccountFlags::CLOSED));
    assert_eq!(w.transfers(&[transfer(2, 1, 2, 1)]), [R::DebitAccountAlreadyClosed]);
    assert_eq!(w.transfers(&[transfer(2, 2, 1, 1)]), [R::CreditAccountAlreadyClosed]);
    assert_eq!(w.transfers(&[resolve(3, 1, 0, TransferFlags::VOID_PENDING_TRANSFER)]), [R::Ok]);
    assert!(!w.ledger.account(1).unwrap().flags.contains(AccountFlags::CLOSED));
    assert_eq!(w.transfers(&[transfer(4, 1, 2, 1)]), [R::Ok]);
}

#[test]
fn limits_on_accounts_and_pending_transfers_are_result_codes() {
    let config = LedgerConfig { accounts_max: 2, pending_transfers_max: 1, ..LedgerConfig::default() };
    let mut w = World::with_config(config);
    w.accounts(&[NONE, NONE]);
    let third = Account { id: 3, ledger: 1, code: 1, ..Account::default() };
    assert_eq!(w.create_accounts(&[third]), [CreateAccountResult::AccountsMaxReached]);
    let p1 = with_flags(transfer(1, 1, 2, 1), TransferFlags::PENDING);
    let p2 = with_flags(transfer(2, 1, 2, 1), TransferFlags::PENDING);
    assert_eq!(w.transfers(&[p1, p2]), [R::Ok, R::PendingTransfersMaxReached]);
    assert_eq!(w.transfers(&[resolve(3, 1, 0, TransferFlags::VOID_PENDING_TRANSFER), p2]), [R::Ok, R::Ok]);
}

#[test]
fn overflow_is_refused() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE, NONE]);
    assert_eq!(w.transfers(&[transfer(1, 1, 2, u128::MAX)]), [R::Ok]);
    assert_eq!(w.transfers(&[transfer(2, 3, 2, 1)]), [R::OverflowsCreditsPosted]);
    assert_eq!(w.transfers(&[transfer(2, 1, 3, 1)]), [R::OverflowsDebitsPosted]);
    let p = with_flags(transfer(3, 3, 1, 1), TransferFlags::PENDING);
    assert_eq!(w.transfers(&[p]), [R::Ok]);
    assert_eq!(w.transfers(&[transfer(4, 3, 2, 1)]), [R::OverflowsCreditsPosted]);
    let late = Transfer { timeout_s: u32::MAX, ..with_flags(transfer(5, 3, 1, 1), TransferFlags::PENDING) };
    // u32::MAX seconds fits u64 nanoseconds: no overflow, so this one is fine.
    assert_eq!(w.transfers(&[late]), [R::Ok]);
}

#[test]
fn timestamps_are_unique_and_increasing_even_if_the_caller_clock_goes_back() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE]);
    let first = w.ledger.create_transfers(5_000 * SECOND_NS, &[transfer(1, 1, 2, 1), transfer(2, 1, 2, 1)], &w.history);
    let second = w.ledger.create_transfers(1, &[transfer(3, 1, 2, 1)], &w.history);
    assert_eq!((first, second), (vec![R::Ok, R::Ok], vec![R::Ok]));
    let stamps: Vec<u64> = w.ledger.lookup_transfers(&[1, 2, 3], &w.history).iter().map(|t| t.timestamp).collect();
    assert_eq!(stamps, [5_000 * SECOND_NS, 5_000 * SECOND_NS + 1, 5_000 * SECOND_NS + 2]);
}

#[test]
fn account_transfers_query_filters_paginates_and_spans_checkpoints() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE, NONE]);
    for id in 1..=6u128 {
        let (debit, credit) = if id % 2 == 0 { (1, 2) } else { (3, 1) };
        let t = Transfer { code: if id <= 3 { 1 } else { 2 }, ..transfer(id, debit, credit, id) };
        assert_eq!(w.transfers(&[t]), [R::Ok]);
        if id == 3 {
            w.checkpoint();
        }
    }
    let ids = |filter: AccountFilter| -> Vec<u128> {
        w.ledger.get_account_transfers(&filter, &w.history).unwrap().iter().map(|t| t.id).collect()
    };
    let all = AccountFilter::account(1, 100);
    assert_eq!(ids(all), [1, 2, 3, 4, 5, 6]);
    assert_eq!(ids(AccountFilter { reversed: true, ..all }), [6, 5, 4, 3, 2, 1]);
    assert_eq!(ids(AccountFilter { limit: 2, ..all }), [1, 2]);
    assert_eq!(ids(AccountFilter { limit: 4, reversed: true, ..all }), [6, 5, 4, 3]);
    assert_eq!(ids(AccountFilter { credits: false, ..all }), [2, 4, 6]);
    assert_eq!(ids(AccountFilter { debits: false, ..all }), [1, 3, 5]);
    assert_eq!(ids(AccountFilter { code: 2, ..all }), [4, 5, 6]);
    let third = w.lookup(3).unwrap().timestamp;
    // Pagination: continue after the last timestamp seen.
    assert_eq!(ids(AccountFilter { timestamp_min: third + 1, limit: 2, ..all }), [4, 5]);
    assert_eq!(ids(AccountFilter { timestamp_max: third, reversed: true, ..all }), [3, 2, 1]);
    assert_eq!(ids(AccountFilter::account(2, 100)), [2, 4, 6]);
    let bad = AccountFilter { limit: 0, ..all };
    assert!(w.ledger.get_account_transfers(&bad, &w.history).is_err());
}

#[test]
fn balance_history_only_for_flagged_accounts() {
    let mut w = World::new();
    w.accounts(&[AccountFlags::HISTORY, NONE]);
    assert_eq!(w.transfers(&[transfer(1, 2, 1, 10)]), [R::Ok]);
    w.checkpoint();
    assert_eq!(w.transfers(&[transfer(2, 2, 1, 5)]), [R::Ok]);
    let filter = AccountFilter::account(1, 10);
    let credits: Vec<u128> =
        w.ledger.get_account_balances(&filter, &w.history).unwrap().iter().map(|b| b.credits_posted).collect();
    assert_eq!(credits, [10, 15]);
    let newest = w.ledger.get_account_balances(&AccountFilter { reversed: true, limit: 1, ..filter }, &w.history);
    assert_eq!(newest.unwrap()[0].credits_posted, 15);
    assert!(w.ledger.get_account_balances(&AccountFilter::account(2, 10), &w.history).unwrap().is_empty());
}

#[test]
fn restore_from_checkpoint_gives_the_same_state() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE]);
    let pending = Transfer { timeout_s: 30, ..with_flags(transfer(1, 1, 2, 5), TransferFlags::PENDING) };
    assert_eq!(w.transfers(&[pending, transfer(2, 2, 1, 3)]), [R::Ok, R::Ok]);
    w.checkpoint();
    let restored = Ledger::restore(
        *w.ledger.config(),
        w.history.accounts.values().copied(),
        w.history.open_pending(),
        w.history.timestamp_last,
    );
    assert_eq!(restored.state_hash(), w.ledger.state_hash());
    assert_eq!(restored.expiry_next(), w.ledger.expiry_next());
}

#[test]
fn the_state_hash_ignores_the_order_of_accounts_and_sees_every_change() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE, NONE]);
    let pending = Transfer { timeout_s: 30, ..with_flags(transfer(1, 1, 2, 5), TransferFlags::PENDING) };
    assert_eq!(w.transfers(&[pending, transfer(2, 2, 3, 3)]), [R::Ok, R::Ok]);
    w.checkpoint();
    let restore = |accounts: Vec<Account>, pending: Vec<Transfer>, timestamp_last: u64| {
        Ledger::restore(*w.ledger.config(), accounts, pending, timestamp_last)
    };
    let accounts: Vec<Account> = w.history.accounts.values().copied().collect();
    let timestamp_last = w.history.timestamp_last;
    let hash = w.ledger.state_hash();
    // The same state, its accounts loaded in another order (another slot order in memory).
    let reversed: Vec<Account> = accounts.iter().rev().copied().collect();
    assert_eq!(restore(reversed, w.history.open_pending(), timestamp_last).state_hash(), hash);
    // One account's posted credits differ by one unit (its debits too, so that the ledger still balances).
    let mut changed = accounts.clone();
    changed[2].credits_posted += 1;
    changed[2].debits_posted += 1;
    assert_ne!(restore(changed, w.history.open_pending(), timestamp_last).state_hash(), hash);
    // One open pending transfer's user data differs.
    let mut pending_changed = w.history.open_pending();
    pending_changed[0].user_data_64 += 1;
    assert_ne!(restore(accounts.clone(), pending_changed, timestamp_last).state_hash(), hash);
    // Only the last timestamp differs.
    assert_ne!(restore(accounts, w.history.open_pending(), timestamp_last + 1).state_hash(), hash);
}

#[test]
fn a_held_cross_cell_leg_is_the_clients_to_post_and_expires_on_demand() {
    let mut w = World::new();
    w.accounts(&[NONE, NONE, NONE]);
    let leg = |id: u128| {
        let flags = TransferFlags::PENDING | TransferFlags::CROSS_CELL_LEG;
        Transfer { timeout_s: 60, ..with_flags(transfer(id, 1, 2, 10), flags) }
    };
    w.clock_ns += SECOND_NS;
    let results = w.ledger.create_legs(w.clock_ns, &[leg(10), leg(11), leg(12)], &w.history);
    assert_eq!(results, vec![R::Ok; 3]);
    // A client may not resolve a leg, unless it is held (its own pending transfer).
    let post = |id, pending_id| resolve(id, pending_id, 0, TransferFlags::POST_PENDING_TRANSFER);
    assert_eq!(w.transfers(&[post(20, 10)]), vec![R::PendingTransferIsCrossCellLeg]);
    w.clock_ns += SECOND_NS;
    let held = |id: u128| id == 10;
    let results = w.ledger.create_transfers_holding(w.clock_ns, &[post(20, 10), post(21, 11)], &w.history, &held);
    assert_eq!(results, vec![R::Ok, R::PendingTransferIsCrossCellLeg]);
    assert_eq!(w.balance(1), (20, 10, 0, 0));
    // Once the client resolved it, a client learns how, as for any pending transfer.
    assert_eq!(w.transfers(&[post(22, 10)]), vec![R::PendingTransferAlreadyPosted]);
    // A system resolution keeps a leg the system's.
    w.clock_ns += SECOND_NS;
    let void = resolve(cellpay_ledger::id::resolution_id(11), 11, 0, TransferFlags::VOID_PENDING_TRANSFER);
    assert_eq!(w.ledger.create_legs(w.clock_ns, &[void], &w.history), vec![R::Ok]);
    assert_eq!(w.transfers(&[post(23, 11)]), vec![R::PendingTransferIsCrossCellLeg]);
    // Expired on demand (its coordinator's decision), before its timeout; again, it stays expired.
    w.clock_ns += SECOND_NS;
    assert_eq!(w.ledger.expire_pending(w.clock_ns, 12, &w.history), Some(PendingStatus::Expired));
    assert_eq!(w.ledger.expire_pending(w.clock_ns, 12, &w.history), Some(PendingStatus::Expired));
    assert_eq!(w.balance(1), (0, 10, 0, 0));
    w.ledger.audit().unwrap();
    w.advance_s(120);
    assert_eq!(w.transfers(&[transfer(30, 1, 2, 1)]), vec![R::Ok], "nothing left to expire");
    assert_eq!(w.balance(1), (0, 11, 0, 0));
}
