//! The ledger state machine.
//!
//! `Ledger` applies batches of events with a timestamp supplied by the caller
//! and returns one result code per event. It holds the hot state in memory:
//! every account, every open pending transfer, and everything applied since
//! the last checkpoint. Older history is read through [`History`].
//!
//! Timestamps: a batch gets `base = max(timestamp, timestamp_last + 1)`; the
//! expiries the batch performs first, then its events, take consecutive
//! timestamps from `base` on (failed events consume theirs too). So timestamps
//! are unique and strictly increasing, whatever clock the caller has.
//!
//! Invariants, asserted after every mutation (release builds too):
//! - per ledger, Σ debits_posted = Σ credits_posted and Σ debits_pending = Σ credits_pending
//!   (kept as wrapping sums: an account cannot overflow, a sum of many can);
//! - every account's balance limits hold.
//!
//! [`Ledger::audit`] recomputes all of them from scratch, plus the pending
//! amounts against the open pending transfers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::accounts::AccountTable;
use crate::history::{CheckpointDelta, History};
use crate::query::{AccountFilter, FilterError};
use crate::result::{CreateAccountResult, CreateTransferResult};
use crate::types::{Account, AccountBalance, AccountFlags, PendingStatus, Transfer, TransferFlags};
use crate::BATCH_EVENTS_MAX;

/// Nanoseconds per second, for pending timeouts.
const NS_PER_S: u64 = 1_000_000_000;

/// Limits on what the ledger holds in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Accounts are hot state, all in memory: this bounds it.
    pub accounts_max: u32,
    /// Open pending transfers are hot state too.
    pub pending_transfers_max: u32,
    /// How many pending transfers one batch may expire (the rest wait for the next batch).
    pub expiries_per_batch_max: u32,
}

impl Default for LedgerConfig {
    fn default() -> LedgerConfig {
        LedgerConfig { accounts_max: 10_000_000, pending_transfers_max: 1_000_000, expiries_per_batch_max: 8190 }
    }
}

/// Per-ledger (currency) sums over all accounts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LedgerTotals {
    pub debits_pending: u128,
    pub debits_posted: u128,
    pub credits_pending: u128,
    pub credits_posted: u128,
}

impl LedgerTotals {
    fn add(&mut self, account: &Account) {
        self.debits_pending = self.debits_pending.wrapping_add(account.debits_pending);
        self.debits_posted = self.debits_posted.wrapping_add(account.debits_posted);
        self.credits_pending = self.credits_pending.wrapping_add(account.credits_pending);
        self.credits_posted = self.credits_posted.wrapping_add(account.credits_posted);
    }

    fn sub(&mut self, account: &Account) {
        self.debits_pending = self.debits_pending.wrapping_sub(account.debits_pending);
        self.debits_posted = self.debits_posted.wrapping_sub(account.debits_posted);
        self.credits_pending = self.credits_pending.wrapping_sub(account.credits_pending);
        self.credits_posted = self.credits_posted.wrapping_sub(account.credits_posted);
    }

    pub fn conserved(&self) -> bool {
        self.debits_posted == self.credits_posted && self.debits_pending == self.credits_pending
    }
}

/// A checkpoint handed to the caller but not yet confirmed written: still
/// answered from memory, so the store write can happen off the hot path.
#[derive(Clone, Debug)]
struct Frozen {
    delta: Arc<CheckpointDelta>,
    transfer_index: FxHashMap<u128, u32>,
    pending_statuses: FxHashMap<u128, PendingStatus>,
}

/// What a batch's prefetch pass found for one transfer event.
#[derive(Clone, Copy, Debug, Default)]
struct Prefetched {
    /// Whether a transfer with the event's id was applied before the last
    /// checkpoint began (rare: a retry); it is fetched again only then.
    checkpointed: bool,
    debit_slot: Option<u32>,
    credit_slot: Option<u32>,
}

/// Who a transfer comes from: a client, or the system (cross-cell legs and
/// their resolutions, which may use system ids and clearing accounts).
#[derive(Clone, Copy)]
enum Origin<'a> {
    Client,
    /// A client, who may also post or void the cross-cell legs for which
    /// the function is true (the coordinator's legs of a client's pending
    /// transfer, once its cross-cell operation is confirmed).
    Holder(&'a dyn Fn(u128) -> bool),
    System,
}

impl Origin<'_> {
    fn is_client(self) -> bool {
        !matches!(self, Origin::System)
    }

    /// Whether this origin may post or void leg `id`.
    fn may_resolve_leg(self, id: u128) -> bool {
        match self {
            Origin::Client => false,
            Origin::Holder(held) => held(id),
            Origin::System => true,
        }
    }
}

/// One step to undo, recorded while a linked chain is open.
#[derive(Clone, Copy, Debug)]
enum Undo {
    /// The account had this value before.
    Account(Account),
    /// The account was created.
    AccountCreated(u128),
    /// The transfer was appended to `transfers_new`.
    TransferCreated(u128),
    /// The pending transfer was opened.
    PendingOpened(Transfer),
    /// The pending transfer was resolved (it was open with this value).
    PendingClosed(Transfer),
    /// The pending status had this previous unflushed value.
    PendingStatus(u128, Option<PendingStatus>),
    /// A balance was appended to `balances_new`.
    BalanceAppended,
}

/// The ledger state machine. See the module documentation.
#[derive(Clone, Debug)]
pub struct Ledger {
    config: LedgerConfig,
    accounts: AccountTable,
    totals: BTreeMap<u32, LedgerTotals>,
    /// Open pending transfers (status Pending), by id.
    pending_open: FxHashMap<u128, Transfer>,
    /// (expires_at, id) of open pending transfers with a timeout.
    expiries: BTreeSet<(u64, u128)>,
    timestamp_last: u64,

    // Applied since the last checkpoint.
    transfers_new: Vec<Transfer>,
    transfers_new_index: FxHashMap<u128, u32>,
    pending_statuses_new: FxHashMap<u128, PendingStatus>,
    balances_new: Vec<AccountBalance>,

    /// The checkpoint being written, if any.
    frozen: Option<Frozen>,
    /// The last timestamp the history store is known to hold (its last confirmed checkpoint).
    checkpointed_timestamp_last: u64,

    /// Open only while a linked chain is being applied.
    undo: Vec<Undo>,
    chain_open: bool,
    /// Scratch space for the prefetch pass, kept to avoid reallocating.
    prefetched: Vec<Prefetched>,
}

impl Ledger {
    pub fn new(config: LedgerConfig) -> Ledger {
        Ledger {
            config,
            accounts: AccountTable::default(),
            totals: BTreeMap::new(),
            pending_open: FxHashMap::default(),
            expiries: BTreeSet::new(),
            timestamp_last: 0,
            transfers_new: Vec::new(),
            transfers_new_index: FxHashMap::default(),
            pending_statuses_new: FxHashMap::default(),
            balances_new: Vec::new(),
            frozen: None,
            checkpointed_timestamp_last: 0,
            undo: Vec::new(),
            chain_open: false,
            prefetched: Vec::new(),
        }
    }

    /// Rebuilds a ledger from a checkpoint: its accounts and open pending transfers.
    /// Panics if the checkpoint breaks an invariant (the audit fails): that is
    /// corrupt data, and no money may move on top of it.
    pub fn restore(
        config: LedgerConfig,
        accounts: impl IntoIterator<Item = Account>,
        pending_open: impl IntoIterator<Item = Transfer>,
        timestamp_last: u64,
    ) -> Ledger {
        let mut ledger = Ledger::new(config);
        for account in accounts {
            assert!(account.timestamp <= timestamp_last, "account {} is newer than the checkpoint", account.id);
            ledger.totals.entry(account.ledger).or_default().add(&account);
            ledger.accounts.insert_new(account);
        }
        for pending in pending_open {
            assert!(pending.flags.contains(TransferFlags::PENDING));
            if let Some(expires_at) = pending.expires_at() {
                ledger.expiries.insert((expires_at, pending.id));
            }
            ledger.pending_open.insert(pending.id, pending);
        }
        ledger.timestamp_last = timestamp_last;
        ledger.checkpointed_timestamp_last = timestamp_last;
        if let Err(error) = ledger.audit() {
            panic!("restored ledger fails its audit: {error}");
        }
        ledger
    }

    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    pub fn timestamp_last(&self) -> u64 {
        self.timestamp_last
    }

    pub fn accounts_count(&self) -> usize {
        self.accounts.len()
    }

    /// How many accounts belong to `shard` of `shards` (a scan of every
    /// account: for rare operator checks, not the hot path).
    /// Clearing accounts belong to the cell, not to a shard: never counted.
    pub fn accounts_in_shard(&self, shard: u32, shards: u32) -> usize {
        self.accounts
            .values()
            .filter(|account| !crate::id::is_clearing_account(account.id))
            .filter(|account| crate::id::shard_of_account(account.id, shards) == shard)
            .count()
    }

    pub fn pending_open_count(&self) -> usize {
        self.pending_open.len()
    }

    /// Transfers applied since the last checkpoint (the server checkpoints to bound this).
    pub fn transfers_new_count(&self) -> usize {
        self.transfers_new.len()
    }

    /// The earliest expiry of an open pending transfer, so the caller knows when to pulse.
    pub fn expiry_next(&self) -> Option<u64> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// The per-ledger totals, by ledger.
    pub fn totals(&self) -> &BTreeMap<u32, LedgerTotals> {
        &self.totals
    }

    fn batch_timestamp(&self, timestamp: u64) -> u64 {
        let base = timestamp.max(self.timestamp_last + 1);
        assert!(base < u64::MAX / 2, "timestamp out of range: {base}");
        base
    }

    /// Records that `consumed` timestamps from `base` on were used.
    fn timestamp_advance(&mut self, base: u64, consumed: u64) {
        if consumed > 0 {
            assert!(base > self.timestamp_last);
            self.timestamp_last = base + consumed - 1;
        }
    }

    // ----------------------------------------------------------------------------------------
    // Accounts.

    /// Creates accounts, on any ledger. Returns one result per event, in order.
    pub fn create_accounts(&mut self, timestamp: u64, events: &[Account]) -> Vec<CreateAccountResult> {
        self.create_accounts_on(timestamp, events, &|_| true)
    }

    /// Creates accounts on the ledgers `defined` admits only (the others
    /// answer `ledger_not_defined`). `defined` must be a pure function of
    /// replicated state, like the rest of the input.
    pub fn create_accounts_on(
        &mut self,
        timestamp: u64,
        events: &[Account],
        defined: &dyn Fn(u32) -> bool,
    ) -> Vec<CreateAccountResult> {
        assert!(events.len() <= BATCH_EVENTS_MAX, "batch over the limit: the caller must refuse it");
        let base = self.batch_timestamp(timestamp);
        let linked = |a: &Account| a.flags.contains(AccountFlags::LINKED);
        let results = self.apply_chained(
            events,
            linked,
            CreateAccountResult::Ok,
            CreateAccountResult::LinkedEventFailed,
            CreateAccountResult::LinkedEventChainOpen,
            |ledger, index, account| ledger.create_account(account, base + index as u64, defined),
        );
        self.timestamp_advance(base, events.len() as u64);
        results
    }

    fn create_account(&mut self, a: &Account, timestamp: u64, defined: &dyn Fn(u32) -> bool) -> CreateAccountResult {
        use CreateAccountResult as R;
        if a.timestamp != 0 {
            return R::TimestampMustBeZero;
        }
        if a.flags.has_reserved_bits() {
            return R::ReservedFlag;
        }
        if a.id == 0 {
            return R::IdMustNotBeZero;
        }
        if a.id == u128::MAX {
            return R::IdMustNotBeIntMax;
        }
        if crate::id::is_clearing_account(a.id) {
            return R::IdReserved;
        }
        if a.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)
            && a.flags.contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS)
        {
            return R::FlagsAreMutuallyExclusive;
        }
        if a.debits_pending != 0 {
            return R::DebitsPendingMustBeZero;
        }
        if a.debits_posted != 0 {
            return R::DebitsPostedMustBeZero;
        }
        if a.credits_pending != 0 {
            return R::CreditsPendingMustBeZero;
        }
        if a.credits_posted != 0 {
            return R::CreditsPostedMustBeZero;
        }
        if a.ledger == 0 {
            return R::LedgerMustNotBeZero;
        }
        if !defined(a.ledger) {
            return R::LedgerNotDefined;
        }
        if a.code == 0 {
            return R::CodeMustNotBeZero;
        }
        if let Some(existing) = self.accounts.get(&a.id) {
            return account_exists(a, existing);
        }
        if self.accounts.len() >= self.config.accounts_max as usize {
            return R::AccountsMaxReached;
        }
        let account = Account { timestamp, ..*a };
        self.account_insert(account);
        R::Ok
    }

    // ----------------------------------------------------------------------------------------
    // Transfers.

    /// Creates transfers. Open pending transfers whose timeout has passed are
    /// expired first. Returns one result per event, in order.
    pub fn create_transfers(
        &mut self,
        timestamp: u64,
        events: &[Transfer],
        history: &impl History,
    ) -> Vec<CreateTransferResult> {
        self.create_transfers_as(timestamp, events, history, Origin::Client)
    }

    /// Creates the system's transfers: the legs of cross-cell transfers and
    /// their resolutions. As [`Ledger::create_transfers`], except that they
    /// may use system ids and clearing accounts, and that posting or voiding
    /// a leg ignores closed accounts: a leg's resolution is the decision of
    /// the transfer's coordinator, and must apply.
    pub fn create_legs(
        &mut self,
        timestamp: u64,
        events: &[Transfer],
        history: &impl History,
    ) -> Vec<CreateTransferResult> {
        self.create_transfers_as(timestamp, events, history, Origin::System)
    }

    /// As [`Ledger::create_transfers`], except that the client may also post
    /// or void the cross-cell legs `held` names (see [`Origin::Holder`]).
    pub fn create_transfers_holding(
        &mut self,
        timestamp: u64,
        events: &[Transfer],
        history: &impl History,
        held: &dyn Fn(u128) -> bool,
    ) -> Vec<CreateTransferResult> {
        self.create_transfers_as(timestamp, events, history, Origin::Holder(held))
    }

    /// Expires pending transfer `id` now if it is open (a cross-cell leg
    /// whose coordinator decided so), and returns its status.
    pub fn expire_pending(&mut self, timestamp: u64, id: u128, history: &impl History) -> Option<PendingStatus> {
        assert!(!self.chain_open, "a pending transfer is expired outside linked chains");
        if let Some(p) = self.pending_open.get(&id).copied() {
            let base = self.batch_timestamp(timestamp);
            self.expire_open(&p, base);
            self.timestamp_advance(base, 1);
        }
        self.pending_status_get(id, history)
    }

    /// Creates (once) the clearing account `id` (see
    /// [`crate::id::clearing_account_id`]) in `ledger`.
    pub fn clearing_account(&mut self, timestamp: u64, ledger: u32, id: u128) {
        assert!(crate::id::is_clearing_account(id), "account {id} is not a clearing account");
        if self.accounts.get(&id).is_none() {
            assert!(!self.chain_open, "clearing accounts are created outside linked chains");
            let base = self.batch_timestamp(timestamp);
            let code = crate::id::CLEARING_ACCOUNT_CODE;
            self.account_insert(Account { id, ledger, code, timestamp: base, ..Account::default() });
            self.timestamp_advance(base, 1);
        }
    }

    fn create_transfers_as(
        &mut self,
        timestamp: u64,
        events: &[Transfer],
        history: &impl History,
        origin: Origin,
    ) -> Vec<CreateTransferResult> {
        assert!(events.len() <= BATCH_EVENTS_MAX, "batch over the limit: the caller must refuse it");
        let base = self.batch_timestamp(timestamp);
        let expired = self.expire(base);
        // Prefetch pass: every lookup that does not depend on earlier events of
        // the batch, done up front so the memory loads overlap. Checkpointed
        // history and account slots cannot change while the batch applies.
        let mut prefetched = std::mem::take(&mut self.prefetched);
        prefetched.clear();
        prefetched.extend(events.iter().map(|t| Prefetched {
            checkpointed: !self.transfers_new_index.contains_key(&t.id) && self.transfer_old(t.id, history).is_some(),
            debit_slot: self.accounts.slot_prefetch(&t.debit_account_id),
            credit_slot: self.accounts.slot_prefetch(&t.credit_account_id),
        }));
        let first = base + expired;
        let linked = |t: &Transfer| t.flags.contains(TransferFlags::LINKED);
        let results = self.apply_chained(
            events,
            linked,
            CreateTransferResult::Ok,
            CreateTransferResult::LinkedEventFailed,
            CreateTransferResult::LinkedEventChainOpen,
            |ledger, index, transfer| {
                ledger.create_transfer(transfer, first + index as u64, &prefetched[index], history, origin)
            },
        );
        self.prefetched = prefetched;
        self.timestamp_advance(base, expired + events.len() as u64);
        results
    }

    /// Expires due pending transfers with no other event (a "pulse"). Returns how many expired.
    pub fn pulse(&mut self, timestamp: u64) -> u64 {
        let base = self.batch_timestamp(timestamp);
        let expired = self.expire(base);
        self.timestamp_advance(base, expired);
        expired
    }

    /// Applies events one by one, rolling back linked chains that fail.
    fn apply_chained<E, R: Copy + PartialEq>(
        &mut self,
        events: &[E],
        linked: impl Fn(&E) -> bool,
        ok: R,
        linked_event_failed: R,
        linked_event_chain_open: R,
        mut apply_one: impl FnMut(&mut Ledger, usize, &E) -> R,
    ) -> Vec<R> {
        let mut results = Vec::with_capacity(events.len());
        let mut chain_start: Option<usize> = None;
        let mut chain_broken = false;
        for (index, event) in events.iter().enumerate() {
            let is_linked = linked(event);
            if chain_start.is_none() && is_linked {
                chain_start = Some(index);
                self.chain_open = true;
                assert!(self.undo.is_empty());
            }
            let result = if chain_broken {
                linked_event_failed
            } else if is_linked && index == events.len() - 1 {
                linked_event_chain_open
            } else {
                apply_one(self, index, event)
            };
            if result != ok && !chain_broken {
                if let Some(start) = chain_start {
                    chain_broken = true;
                    self.rollback();
                    for earlier in &mut results[start..index] {
                        *earlier = linked_event_failed;
                    }
                }
            }
            results.push(result);
            if !is_linked && chain_start.is_some() {
                chain_start = None;
                chain_broken = false;
                self.chain_open = false;
                self.undo.clear();
            }
        }
        // A chain left open at the end of the batch was failed (and rolled back) above.
        self.chain_open = false;
        self.undo.clear();
        results
    }

    fn create_transfer(
        &mut self,
        t: &Transfer,
        timestamp: u64,
        prefetched: &Prefetched,
        history: &impl History,
        origin: Origin,
    ) -> CreateTransferResult {
        if let Err(result) = validate_transfer(t, origin) {
            return result;
        }
        let existing = match self.transfers_new_index.get(&t.id) {
            Some(index) => Some(self.transfers_new[*index as usize]),
            None if prefetched.checkpointed => self.transfer_old(t.id, history),
            None => None,
        };
        if let Some(existing) = existing {
            return transfer_exists(t, &existing);
        }
        if t.flags.contains(TransferFlags::POST_PENDING_TRANSFER)
            || t.flags.contains(TransferFlags::VOID_PENDING_TRANSFER)
        {
            self.post_or_void(t, timestamp, history, origin)
        } else {
            self.transfer_simple(t, timestamp, prefetched)
        }
    }

    fn transfer_simple(&mut self, t: &Transfer, timestamp: u64, prefetched: &Prefetched) -> CreateTransferResult {
        use CreateTransferResult as R;
        let Some(dr_slot) = prefetched.debit_slot else {
            return R::DebitAccountNotFound;
        };
        let Some(cr_slot) = prefetched.credit_slot else {
            return R::CreditAccountNotFound;
        };
        let mut dr = *self.accounts.at(dr_slot);
        let mut cr = *self.accounts.at(cr_slot);
        if dr.ledger != cr.ledger {
            return R::AccountsMustHaveTheSameLedger;
        }
        if t.ledger != dr.ledger {
            return R::TransferMustHaveTheSameLedgerAsAccounts;
        }
        if dr.flags.contains(AccountFlags::CLOSED) {
            return R::DebitAccountAlreadyClosed;
        }
        if cr.flags.contains(AccountFlags::CLOSED) {
            return R::CreditAccountAlreadyClosed;
        }
        let mut amount = t.amount;
        if t.flags.contains(TransferFlags::BALANCING_DEBIT) {
            amount = amount.min(dr.debit_headroom());
        }
        if t.flags.contains(TransferFlags::BALANCING_CREDIT) {
            amount = amount.min(cr.credit_headroom());
        }
        let pending = t.flags.contains(TransferFlags::PENDING);
        if pending {
            if dr.debits_pending.checked_add(amount).is_none() {
                return R::OverflowsDebitsPending;
            }
            if cr.credits_pending.checked_add(amount).is_none() {
                return R::OverflowsCreditsPending;
            }
        } else {
            if dr.debits_posted.checked_add(amount).is_none() {
                return R::OverflowsDebitsPosted;
            }
            if cr.credits_posted.checked_add(amount).is_none() {
                return R::OverflowsCreditsPosted;
            }
        }
        let Some(dr_debits) = dr.debits_pending.checked_add(dr.debits_posted).and_then(|d| d.checked_add(amount))
        else {
            return R::OverflowsDebits;
        };
        let Some(cr_credits) = cr.credits_pending.checked_add(cr.credits_posted).and_then(|c| c.checked_add(amount))
        else {
            return R::OverflowsCredits;
        };
        if pending && t.timeout_s != 0 {
            let timeout_ns = u64::from(t.timeout_s) * NS_PER_S;
            if timestamp.checked_add(timeout_ns).is_none_or(|at| at >= u64::MAX / 2) {
                return R::OverflowsTimeout;
            }
        }
        if dr.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS) && dr_debits > dr.credits_posted {
            return R::ExceedsCredits;
        }
        if cr.flags.contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS) && cr_credits > cr.debits_posted {
            return R::ExceedsDebits;
        }
        if pending && self.pending_open.len() >= self.config.pending_transfers_max as usize {
            return R::PendingTransfersMaxReached;
        }

        // Every check passed: from here on nothing can fail.
        let transfer = Transfer { amount, timestamp, ..*t };
        if pending {
            dr.debits_pending += amount;
            cr.credits_pending += amount;
            if t.flags.contains(TransferFlags::CLOSING_DEBIT) {
                dr.flags.insert(AccountFlags::CLOSED);
            }
            if t.flags.contains(TransferFlags::CLOSING_CREDIT) {
                cr.flags.insert(AccountFlags::CLOSED);
            }
            self.pending_open_insert(transfer);
        } else {
            dr.debits_posted += amount;
            cr.credits_posted += amount;
        }
        self.transfer_commit(transfer, (dr_slot, dr), (cr_slot, cr));
        R::Ok
    }

    fn post_or_void(
        &mut self,
        t: &Transfer,
        timestamp: u64,
        history: &impl History,
        origin: Origin,
    ) -> CreateTransferResult {
        use CreateTransferResult as R;
        let post = t.flags.contains(TransferFlags::POST_PENDING_TRANSFER);
        let open = self.pending_open.get(&t.pending_id).copied();
        let Some(p) = open.or_else(|| self.transfer_get(t.pending_id, history)) else {
            return R::PendingTransferNotFound;
        };
        // A leg is the system's to resolve, but for a client's own pending
        // transfer (a held leg, `Origin::Holder`); once the client resolved
        // it (no system resolution exists), a client learns how, as for any.
        if p.flags.contains(TransferFlags::CROSS_CELL_LEG) && !origin.may_resolve_leg(p.id) {
            let by_client = open.is_none() && self.transfer_get(crate::id::resolution_id(p.id), history).is_none();
            if !by_client {
                return R::PendingTransferIsCrossCellLeg;
            }
        }
        if !p.flags.contains(TransferFlags::PENDING) {
            return R::PendingTransferNotPending;
        }
        if t.debit_account_id != 0 && t.debit_account_id != p.debit_account_id {
            return R::PendingTransferHasDifferentDebitAccountId;
        }
        if t.credit_account_id != 0 && t.credit_account_id != p.credit_account_id {
            return R::PendingTransferHasDifferentCreditAccountId;
        }
        if t.ledger != 0 && t.ledger != p.ledger {
            return R::PendingTransferHasDifferentLedger;
        }
        if t.code != 0 && t.code != p.code {
            return R::PendingTransferHasDifferentCode;
        }
        // Post: amount 0 posts the whole pending amount; less posts part of it.
        let amount = if post && t.amount != 0 { t.amount } else { p.amount };
        if post && amount > p.amount {
            return R::ExceedsPendingTransferAmount;
        }
        if !post && t.amount != 0 && t.amount != p.amount {
            return R::PendingTransferHasDifferentAmount;
        }
        if open.is_none() {
            let status = self.pending_status_get(p.id, history);
            return match status {
                Some(PendingStatus::Posted) => R::PendingTransferAlreadyPosted,
                Some(PendingStatus::Voided) => R::PendingTransferAlreadyVoided,
                Some(PendingStatus::Expired) => R::PendingTransferExpired,
                Some(PendingStatus::Pending) | None => {
                    panic!("pending transfer {} is neither open nor resolved", p.id)
                }
            };
        }
        if p.expires_at().is_some_and(|at| at <= timestamp) {
            return R::PendingTransferExpired;
        }
        let dr_slot = self.accounts.slot(&p.debit_account_id).expect("pending debit account exists");
        let cr_slot = self.accounts.slot(&p.credit_account_id).expect("pending credit account exists");
        let mut dr = *self.accounts.at(dr_slot);
        let mut cr = *self.accounts.at(cr_slot);
        let closed_matters = origin.is_client();
        if closed_matters && dr.flags.contains(AccountFlags::CLOSED) && !p.flags.contains(TransferFlags::CLOSING_DEBIT)
        {
            return R::DebitAccountAlreadyClosed;
        }
        if closed_matters && cr.flags.contains(AccountFlags::CLOSED) && !p.flags.contains(TransferFlags::CLOSING_CREDIT)
        {
            return R::CreditAccountAlreadyClosed;
        }
        if post {
            if dr.debits_posted.checked_add(amount).is_none() {
                return R::OverflowsDebitsPosted;
            }
            if cr.credits_posted.checked_add(amount).is_none() {
                return R::OverflowsCreditsPosted;
            }
        }

        // Every check passed: from here on nothing can fail.
        assert!(dr.debits_pending >= p.amount && cr.credits_pending >= p.amount);
        dr.debits_pending -= p.amount;
        cr.credits_pending -= p.amount;
        if post {
            dr.debits_posted += amount;
            cr.credits_posted += amount;
        } else {
            if p.flags.contains(TransferFlags::CLOSING_DEBIT) {
                dr.flags.remove(AccountFlags::CLOSED);
            }
            if p.flags.contains(TransferFlags::CLOSING_CREDIT) {
                cr.flags.remove(AccountFlags::CLOSED);
            }
        }
        let status = if post { PendingStatus::Posted } else { PendingStatus::Voided };
        self.pending_open_resolve(&p, status);
        let transfer = Transfer {
            debit_account_id: p.debit_account_id,
            credit_account_id: p.credit_account_id,
            ledger: p.ledger,
            code: p.code,
            amount,
            timestamp,
            ..*t
        };
        self.transfer_commit(transfer, (dr_slot, dr), (cr_slot, cr));
        R::Ok
    }

    /// Expires up to `expiries_per_batch_max` pending transfers due at `base`,
    /// giving each its own timestamp from `base` on. Returns how many.
    fn expire(&mut self, base: u64) -> u64 {
        let mut expired = 0u64;
        while expired < u64::from(self.config.expiries_per_batch_max) {
            let Some(&(expires_at, id)) = self.expiries.first() else { break };
            if expires_at > base {
                break;
            }
            let p = self.pending_open[&id];
            self.expire_open(&p, base + expired);
            expired += 1;
        }
        expired
    }

    /// Expires open pending transfer `p` at `timestamp`.
    fn expire_open(&mut self, p: &Transfer, timestamp: u64) {
        let dr_slot = self.accounts.slot(&p.debit_account_id).expect("pending debit account exists");
        let cr_slot = self.accounts.slot(&p.credit_account_id).expect("pending credit account exists");
        let mut dr = *self.accounts.at(dr_slot);
        let mut cr = *self.accounts.at(cr_slot);
        assert!(dr.debits_pending >= p.amount && cr.credits_pending >= p.amount);
        dr.debits_pending -= p.amount;
        cr.credits_pending -= p.amount;
        if p.flags.contains(TransferFlags::CLOSING_DEBIT) {
            dr.flags.remove(AccountFlags::CLOSED);
        }
        if p.flags.contains(TransferFlags::CLOSING_CREDIT) {
            cr.flags.remove(AccountFlags::CLOSED);
        }
        self.pending_open_resolve(p, PendingStatus::Expired);
        self.account_update(dr_slot, dr, timestamp);
        self.account_update(cr_slot, cr, timestamp);
        self.assert_conserved(dr.ledger);
    }

    // ----------------------------------------------------------------------------------------
    // Mutations: the only places state changes, each recording its undo step.

    fn account_insert(&mut self, account: Account) {
        self.totals.entry(account.ledger).or_default().add(&account);
        self.accounts.insert_new(account);
        if self.chain_open {
            self.undo.push(Undo::AccountCreated(account.id));
        }
    }

    /// Replaces an account's value; `timestamp` is the transfer (or expiry) that changed it.
    fn account_update(&mut self, slot: u32, account: Account, timestamp: u64) {
        assert!(account.limits_hold(), "balance limit violated on account {}", account.id);
        let previous = self.accounts.replace_at(slot, account);
        assert_eq!(previous.ledger, account.ledger);
        let totals = self.totals.get_mut(&account.ledger).expect("ledger has totals");
        totals.sub(&previous);
        totals.add(&account);
        if self.chain_open {
            self.undo.push(Undo::Account(previous));
        }
        if account.flags.contains(AccountFlags::HISTORY) {
            self.balances_new.push(AccountBalance {
                account_id: account.id,
                debits_pending: account.debits_pending,
                debits_posted: account.debits_posted,
                credits_pending: account.credits_pending,
                credits_posted: account.credits_posted,
                timestamp,
            });
            if self.chain_open {
                self.undo.push(Undo::BalanceAppended);
            }
        }
    }

    fn transfer_commit(&mut self, transfer: Transfer, (dr_slot, dr): (u32, Account), (cr_slot, cr): (u32, Account)) {
        assert_ne!(dr.id, cr.id);
        assert_eq!(dr.ledger, cr.ledger);
        self.account_update(dr_slot, dr, transfer.timestamp);
        self.account_update(cr_slot, cr, transfer.timestamp);
        self.assert_conserved(dr.ledger);
        let index = u32::try_from(self.transfers_new.len()).expect("checkpoint bounds new transfers");
        let previous = self.transfers_new_index.insert(transfer.id, index);
        assert!(previous.is_none(), "transfer {} applied twice", transfer.id);
        self.transfers_new.push(transfer);
        if self.chain_open {
            self.undo.push(Undo::TransferCreated(transfer.id));
        }
    }

    fn pending_open_insert(&mut self, transfer: Transfer) {
        if let Some(expires_at) = transfer.expires_at() {
            self.expiries.insert((expires_at, transfer.id));
        }
        self.pending_open.insert(transfer.id, transfer);
        self.pending_status_set(transfer.id, PendingStatus::Pending);
        if self.chain_open {
            self.undo.push(Undo::PendingOpened(transfer));
        }
    }

    fn pending_open_resolve(&mut self, pending: &Transfer, status: PendingStatus) {
        assert_ne!(status, PendingStatus::Pending);
        let removed = self.pending_open.remove(&pending.id).expect("pending transfer is open");
        if let Some(expires_at) = removed.expires_at() {
            assert!(self.expiries.remove(&(expires_at, removed.id)));
        }
        self.pending_status_set(pending.id, status);
        if self.chain_open {
            self.undo.push(Undo::PendingClosed(removed));
        }
    }

    fn pending_status_set(&mut self, id: u128, status: PendingStatus) {
        let previous = self.pending_statuses_new.insert(id, status);
        if self.chain_open {
            self.undo.push(Undo::PendingStatus(id, previous));
        }
    }

    /// Undoes every step of the open chain, newest first.
    fn rollback(&mut self) {
        while let Some(step) = self.undo.pop() {
            match step {
                Undo::Account(previous) => {
                    let current = self.accounts.replace(previous);
                    let totals = self.totals.get_mut(&previous.ledger).expect("ledger has totals");
                    totals.sub(&current);
                    totals.add(&previous);
                }
                Undo::AccountCreated(id) => {
                    let current = self.accounts.remove_newest(id);
                    self.totals.get_mut(&current.ledger).expect("ledger has totals").sub(&current);
                }
                Undo::TransferCreated(id) => {
                    let last = self.transfers_new.pop().expect("transfer was appended");
                    assert_eq!(last.id, id);
                    self.transfers_new_index.remove(&id);
                }
                Undo::PendingOpened(transfer) => {
                    self.pending_open.remove(&transfer.id).expect("pending was opened");
                    if let Some(expires_at) = transfer.expires_at() {
                        assert!(self.expiries.remove(&(expires_at, transfer.id)));
                    }
                }
                Undo::PendingClosed(transfer) => {
                    if let Some(expires_at) = transfer.expires_at() {
                        self.expiries.insert((expires_at, transfer.id));
                    }
                    self.pending_open.insert(transfer.id, transfer);
                }
                Undo::PendingStatus(id, previous) => match previous {
                    Some(status) => {
                        self.pending_statuses_new.insert(id, status);
                    }
                    None => {
                        self.pending_statuses_new.remove(&id);
                    }
                },
                Undo::BalanceAppended => {
                    self.balances_new.pop().expect("balance was appended");
                }
            }
        }
        // An account restored to its value before the chain may still be marked
        // dirty: writing an unchanged account at the checkpoint is harmless.
    }

    fn assert_conserved(&self, ledger: u32) {
        let totals = &self.totals[&ledger];
        assert!(totals.conserved(), "ledger {ledger} does not conserve money: {totals:?}");
    }

    // ----------------------------------------------------------------------------------------
    // Reads.

    fn transfer_get(&self, id: u128, history: &impl History) -> Option<Transfer> {
        match self.transfers_new_index.get(&id) {
            Some(index) => Some(self.transfers_new[*index as usize]),
            None => self.transfer_old(id, history),
        }
    }

    /// A transfer applied before the last checkpoint began: frozen, or in history.
    fn transfer_old(&self, id: u128, history: &impl History) -> Option<Transfer> {
        let frozen =
            self.frozen.as_ref().and_then(|f| f.transfer_index.get(&id).map(|i| f.delta.transfers[*i as usize]));
        frozen.or_else(|| history.transfer(id))
    }

    fn pending_status_get(&self, id: u128, history: &impl History) -> Option<PendingStatus> {
        self.pending_statuses_new
            .get(&id)
            .or_else(|| self.frozen.as_ref().and_then(|f| f.pending_statuses.get(&id)))
            .copied()
            .or_else(|| history.pending_status(id))
    }

    pub fn account(&self, id: u128) -> Option<&Account> {
        self.accounts.get(&id)
    }

    /// The accounts found, in the order asked (ids not found are left out).
    pub fn lookup_accounts(&self, ids: &[u128]) -> Vec<Account> {
        ids.iter().filter_map(|id| self.accounts.get(id).copied()).collect()
    }

    /// The transfers found, in the order asked (ids not found are left out).
    pub fn lookup_transfers(&self, ids: &[u128], history: &impl History) -> Vec<Transfer> {
        ids.iter().filter_map(|id| self.transfer_get(*id, history)).collect()
    }

    /// The transfer applied under `id`, if any.
    pub fn transfer(&self, id: u128, history: &impl History) -> Option<Transfer> {
        self.transfer_get(id, history)
    }

    /// How a retry `event` compares with the transfer `existing` applied
    /// under its id: `exists` if it is the same, else the first field that
    /// differs (`exists_with_different_*`), as `create_transfers` answers.
    pub fn compare_retry(event: &Transfer, existing: &Transfer) -> CreateTransferResult {
        transfer_exists(event, existing)
    }

    /// The status of a pending transfer (None if `id` is not a pending transfer).
    pub fn pending_status(&self, id: u128, history: &impl History) -> Option<PendingStatus> {
        self.pending_status_get(id, history)
    }

    /// An account's transfers matching the filter, oldest first (newest first if reversed).
    pub fn get_account_transfers(
        &self,
        filter: &AccountFilter,
        history: &impl History,
    ) -> Result<Vec<Transfer>, FilterError> {
        filter.validate()?;
        // Everything in memory is newer than everything checkpointed.
        let frozen = self.frozen.as_ref().map_or(&[][..], |f| &f.delta.transfers[..]);
        let memory = frozen.iter().chain(&self.transfers_new).filter(|t| filter.matches_transfer(t)).copied();
        Ok(merge_by_age(filter, self.checkpointed_timestamp_last, memory, |f| history.account_transfers(f)))
    }

    /// An account's balance history (only for accounts flagged `history`).
    pub fn get_account_balances(
        &self,
        filter: &AccountFilter,
        history: &impl History,
    ) -> Result<Vec<AccountBalance>, FilterError> {
        filter.validate()?;
        let flagged = self.accounts.get(&filter.account_id).is_some_and(|a| a.flags.contains(AccountFlags::HISTORY));
        if !flagged {
            return Ok(Vec::new());
        }
        let frozen = self.frozen.as_ref().map_or(&[][..], |f| &f.delta.balances[..]);
        let memory = frozen
            .iter()
            .chain(&self.balances_new)
            .filter(|b| b.account_id == filter.account_id && filter.timestamp_matches(b.timestamp))
            .copied();
        Ok(merge_by_age(filter, self.checkpointed_timestamp_last, memory, |f| history.account_balances(f)))
    }

    // ----------------------------------------------------------------------------------------
    // Checkpoints.

    /// Drains everything applied since the last checkpoint, in a deterministic
    /// order, for the caller to write to the history store. Until the caller
    /// confirms with [`Ledger::checkpoint_end`], the ledger keeps answering
    /// these from memory, so the write can proceed while it applies more.
    /// Only one checkpoint can be in flight.
    pub fn checkpoint_begin(&mut self) -> Arc<CheckpointDelta> {
        assert!(self.undo.is_empty() && !self.chain_open);
        assert!(self.frozen.is_none(), "a checkpoint is already in flight");
        let accounts = self.accounts.take_dirty();
        let mut pending_statuses: Vec<(u128, PendingStatus)> =
            self.pending_statuses_new.iter().map(|(id, status)| (*id, *status)).collect();
        pending_statuses.sort_unstable();
        // The next window is likely as big as this one: avoid regrowing it.
        let transfers_capacity = self.transfers_new.len();
        let delta = Arc::new(CheckpointDelta {
            accounts,
            transfers: std::mem::replace(&mut self.transfers_new, Vec::with_capacity(transfers_capacity)),
            pending_statuses,
            balances: std::mem::take(&mut self.balances_new),
            timestamp_last: self.timestamp_last,
        });
        let index_capacity = self.transfers_new_index.len();
        self.frozen = Some(Frozen {
            delta: delta.clone(),
            transfer_index: std::mem::replace(
                &mut self.transfers_new_index,
                FxHashMap::with_capacity_and_hasher(index_capacity, Default::default()),
            ),
            pending_statuses: std::mem::take(&mut self.pending_statuses_new),
        });
        delta
    }

    /// Confirms that the checkpoint begun last is in the history store.
    pub fn checkpoint_end(&mut self) {
        let frozen = self.frozen.take().expect("a checkpoint in flight");
        assert!(frozen.delta.timestamp_last >= self.checkpointed_timestamp_last);
        self.checkpointed_timestamp_last = frozen.delta.timestamp_last;
    }

    pub fn checkpoint_in_flight(&self) -> bool {
        self.frozen.is_some()
    }

    /// Begins and at once ends a checkpoint: for callers that write the delta
    /// to the store before applying anything else.
    pub fn checkpoint(&mut self) -> CheckpointDelta {
        let delta = self.checkpoint_begin();
        self.checkpoint_end();
        Arc::try_unwrap(delta).expect("the ledger holds no other reference")
    }

    /// A digest of the whole hot state, for comparing replicas and replays.
    /// Independent of hash-map order: each account and open pending transfer
    /// is hashed on its own and the record hashes are summed (a sum does not
    /// depend on the order it is taken in), so no sort and no allocation is
    /// needed: one pass over the accounts (about 25 ns each).
    pub fn state_hash(&self) -> u64 {
        let mut bytes = [0u8; crate::RECORD_SIZE];
        let mut accounts: u64 = 0;
        for account in self.accounts.values() {
            account.encode(&mut bytes);
            accounts = accounts.wrapping_add(record_hash(&bytes));
        }
        let mut pending: u64 = 0;
        for transfer in self.pending_open.values() {
            transfer.encode(&mut bytes);
            pending = pending.wrapping_add(record_hash(&bytes));
        }
        let mut hash = Fnv64::new();
        hash.write(&(self.accounts.len() as u64).to_le_bytes());
        hash.write(&accounts.to_le_bytes());
        hash.write(&(self.pending_open.len() as u64).to_le_bytes());
        hash.write(&pending.to_le_bytes());
        hash.write(&self.timestamp_last.to_le_bytes());
        hash.finish()
    }

    /// Recomputes every invariant from scratch. `Err` names the first one broken.
    pub fn audit(&self) -> Result<(), String> {
        let mut totals: BTreeMap<u32, LedgerTotals> = BTreeMap::new();
        for account in self.accounts.values() {
            totals.entry(account.ledger).or_default().add(account);
            if !account.limits_hold() {
                return Err(format!("account {} violates its balance limit: {account:?}", account.id));
            }
        }
        for (ledger, sums) in &totals {
            if !sums.conserved() {
                return Err(format!("ledger {ledger} does not conserve money: {sums:?}"));
            }
        }
        let nonzero: BTreeMap<u32, LedgerTotals> =
            self.totals.iter().filter(|(_, t)| **t != LedgerTotals::default()).map(|(l, t)| (*l, *t)).collect();
        let recomputed: BTreeMap<u32, LedgerTotals> =
            totals.into_iter().filter(|(_, t)| *t != LedgerTotals::default()).collect();
        if nonzero != recomputed {
            return Err(format!("running totals {nonzero:?} differ from recomputed {recomputed:?}"));
        }
        let mut debits_pending: BTreeMap<u128, u128> = BTreeMap::new();
        let mut credits_pending: BTreeMap<u128, u128> = BTreeMap::new();
        for p in self.pending_open.values() {
            *debits_pending.entry(p.debit_account_id).or_default() += p.amount;
            *credits_pending.entry(p.credit_account_id).or_default() += p.amount;
        }
        for account in self.accounts.values() {
            let debits = debits_pending.get(&account.id).copied().unwrap_or(0);
            let credits = credits_pending.get(&account.id).copied().unwrap_or(0);
            if account.debits_pending != debits || account.credits_pending != credits {
                return Err(format!(
                    "account {} pending amounts ({}, {}) differ from its open pending transfers ({debits}, {credits})",
                    account.id, account.debits_pending, account.credits_pending
                ));
            }
        }
        if self.expiries.len() != self.pending_open.values().filter(|p| p.timeout_s != 0).count() {
            return Err("expiry index out of step with open pending transfers".to_string());
        }
        Ok(())
    }
}

/// Merges in-memory and checkpointed results, oldest first (newest first if
/// reversed). Memory holds everything after `checkpointed_timestamp_last`; the
/// store is asked only up to it (it may already hold more, mid-checkpoint).
fn merge_by_age<T>(
    filter: &AccountFilter,
    checkpointed_timestamp_last: u64,
    memory: impl DoubleEndedIterator<Item = T>,
    checkpointed: impl Fn(&AccountFilter) -> Vec<T>,
) -> Vec<T> {
    let limit = filter.limit as usize;
    let (min, max) = filter.timestamp_range();
    let max = max.min(checkpointed_timestamp_last);
    let ask = |limit: usize| -> Vec<T> {
        if checkpointed_timestamp_last == 0 || min > max || limit == 0 {
            return Vec::new();
        }
        checkpointed(&AccountFilter { timestamp_max: max, limit: limit as u32, ..*filter })
    };
    if filter.reversed {
        let mut out: Vec<T> = memory.rev().take(limit).collect();
        let rest = ask(limit - out.len());
        out.extend(rest);
        out
    } else {
        let mut out = ask(limit);
        out.extend(memory.take(limit - out.len()));
        out
    }
}

/// The checks that need nothing but the event itself, in order of precedence.
fn validate_transfer(t: &Transfer, origin: Origin) -> Result<(), CreateTransferResult> {
    use CreateTransferResult as R;
    let flags = t.flags;
    if t.timestamp != 0 {
        return Err(R::TimestampMustBeZero);
    }
    if flags.has_reserved_bits() {
        return Err(R::ReservedFlag);
    }
    if t.id == 0 {
        return Err(R::IdMustNotBeZero);
    }
    if t.id == u128::MAX {
        return Err(R::IdMustNotBeIntMax);
    }
    let client = origin.is_client();
    if client && flags.contains(TransferFlags::CROSS_CELL_LEG) {
        return Err(R::ReservedFlag);
    }
    if client && t.id >= crate::id::TRANSFER_ID_SYSTEM_MIN {
        return Err(R::IdReserved);
    }
    let reserved = |account: u128| client && crate::id::is_clearing_account(account);
    let pending = flags.contains(TransferFlags::PENDING);
    let post = flags.contains(TransferFlags::POST_PENDING_TRANSFER);
    let void = flags.contains(TransferFlags::VOID_PENDING_TRANSFER);
    let balancing = flags.contains(TransferFlags::BALANCING_DEBIT) || flags.contains(TransferFlags::BALANCING_CREDIT);
    let closing = flags.contains(TransferFlags::CLOSING_DEBIT) || flags.contains(TransferFlags::CLOSING_CREDIT);
    if u8::from(pending) + u8::from(post) + u8::from(void) > 1 || ((post || void) && (balancing || closing)) {
        return Err(R::FlagsAreMutuallyExclusive);
    }
    if post || void {
        if t.debit_account_id == u128::MAX {
            return Err(R::DebitAccountIdMustNotBeIntMax);
        }
        if t.credit_account_id == u128::MAX {
            return Err(R::CreditAccountIdMustNotBeIntMax);
        }
        if t.debit_account_id != 0 && t.debit_account_id == t.credit_account_id {
            return Err(R::AccountsMustBeDifferent);
        }
        if reserved(t.debit_account_id) || reserved(t.credit_account_id) {
            return Err(R::AccountReserved);
        }
        if t.pending_id == 0 {
            return Err(R::PendingIdMustNotBeZero);
        }
        if t.pending_id == u128::MAX {
            return Err(R::PendingIdMustNotBeIntMax);
        }
        if t.pending_id == t.id {
            return Err(R::PendingIdMustBeDifferent);
        }
        if t.timeout_s != 0 {
            return Err(R::TimeoutReservedForPendingTransfer);
        }
        return Ok(());
    }
    if t.debit_account_id == 0 {
        return Err(R::DebitAccountIdMustNotBeZero);
    }
    if t.debit_account_id == u128::MAX {
        return Err(R::DebitAccountIdMustNotBeIntMax);
    }
    if t.credit_account_id == 0 {
        return Err(R::CreditAccountIdMustNotBeZero);
    }
    if t.credit_account_id == u128::MAX {
        return Err(R::CreditAccountIdMustNotBeIntMax);
    }
    if t.debit_account_id == t.credit_account_id {
        return Err(R::AccountsMustBeDifferent);
    }
    if reserved(t.debit_account_id) || reserved(t.credit_account_id) {
        return Err(R::AccountReserved);
    }
    if t.pending_id != 0 {
        return Err(R::PendingIdMustBeZero);
    }
    if !pending && t.timeout_s != 0 {
        return Err(R::TimeoutReservedForPendingTransfer);
    }
    if closing && !pending {
        return Err(R::ClosingTransferMustBePending);
    }
    if t.ledger == 0 {
        return Err(R::LedgerMustNotBeZero);
    }
    if t.code == 0 {
        return Err(R::CodeMustNotBeZero);
    }
    Ok(())
}

fn account_exists(a: &Account, e: &Account) -> CreateAccountResult {
    use CreateAccountResult as R;
    if a.flags != e.flags {
        // `closed` may have been set since by a closing transfer: compare what the client chose.
        let chosen = |f: AccountFlags| AccountFlags(f.0 & !AccountFlags::CLOSED.0);
        if chosen(a.flags) != chosen(e.flags) || a.flags.contains(AccountFlags::CLOSED) {
            return R::ExistsWithDifferentFlags;
        }
    }
    if a.user_data_128 != e.user_data_128 {
        return R::ExistsWithDifferentUserData128;
    }
    if a.user_data_64 != e.user_data_64 {
        return R::ExistsWithDifferentUserData64;
    }
    if a.user_data_32 != e.user_data_32 {
        return R::ExistsWithDifferentUserData32;
    }
    if a.ledger != e.ledger {
        return R::ExistsWithDifferentLedger;
    }
    if a.code != e.code {
        return R::ExistsWithDifferentCode;
    }
    R::Exists
}

/// Compares a retried transfer with the one applied under its id. Fields the
/// client may leave zero on a post/void (accounts, ledger, code, amount) match
/// when zero; a balancing transfer matches when it asked for at least what moved.
fn transfer_exists(t: &Transfer, e: &Transfer) -> CreateTransferResult {
    use CreateTransferResult as R;
    let resolving = e.flags.contains(TransferFlags::POST_PENDING_TRANSFER)
        || e.flags.contains(TransferFlags::VOID_PENDING_TRANSFER);
    let balancing =
        e.flags.contains(TransferFlags::BALANCING_DEBIT) || e.flags.contains(TransferFlags::BALANCING_CREDIT);
    let optional = |asked: u128, applied: u128| asked == applied || (resolving && asked == 0);
    if t.flags != e.flags {
        return R::ExistsWithDifferentFlags;
    }
    if t.pending_id != e.pending_id {
        return R::ExistsWithDifferentPendingId;
    }
    if t.timeout_s != e.timeout_s {
        return R::ExistsWithDifferentTimeout;
    }
    if !optional(t.debit_account_id, e.debit_account_id) {
        return R::ExistsWithDifferentDebitAccountId;
    }
    if !optional(t.credit_account_id, e.credit_account_id) {
        return R::ExistsWithDifferentCreditAccountId;
    }
    let amount_matches = if balancing { t.amount >= e.amount } else { optional(t.amount, e.amount) };
    if !amount_matches {
        return R::ExistsWithDifferentAmount;
    }
    if t.user_data_128 != e.user_data_128 {
        return R::ExistsWithDifferentUserData128;
    }
    if t.user_data_64 != e.user_data_64 {
        return R::ExistsWithDifferentUserData64;
    }
    if t.user_data_32 != e.user_data_32 {
        return R::ExistsWithDifferentUserData32;
    }
    if !optional(u128::from(t.ledger), u128::from(e.ledger)) {
        return R::ExistsWithDifferentLedger;
    }
    if !optional(u128::from(t.code), u128::from(e.code)) {
        return R::ExistsWithDifferentCode;
    }
    R::Exists
}

/// A 64-bit hash of one encoded record, eight bytes at a time: a
/// multiply-xorshift step per word and a final avalanche (the finalizer of
/// MurmurHash3's 64-bit variant), so that a change in any bit of the record
/// changes about half the bits of the hash, and summing record hashes stays
/// a good digest. Deterministic: the same on every machine and build.
fn record_hash(bytes: &[u8; crate::RECORD_SIZE]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut hash: u64 = 0x2545_f491_4f6c_dd1d;
    for word in bytes.chunks_exact(8) {
        let word = u64::from_le_bytes(word.try_into().expect("chunks of eight bytes"));
        hash = (hash ^ word).wrapping_mul(K);
        hash ^= hash >> 29;
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// FNV-1a, 64-bit: a small, stable, dependency-free digest (not for security).
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Fnv64 {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}
