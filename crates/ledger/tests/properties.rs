//! Property tests: random workloads against the ledger, checked by an
//! independent auditor.
//!
//! Checked after every batch:
//! - the ledger's own audit (conservation per ledger, balance limits, pending
//!   amounts equal the open pending transfers);
//! - the auditor's balances, rebuilt only from the results and the stored
//!   transfers, equal the ledger's (so nothing is applied twice or lost);
//! - a retried transfer answers `exists` and changes nothing;
//! - every linked chain is all-or-nothing, and a failed chain leaves no transfer;
//! - determinism: a twin ledger that never checkpoints, and a ledger restored
//!   from each checkpoint, give the same results and the same state hash.

use std::collections::BTreeMap;

use cellpay_ledger::{
    Account, AccountFilter, AccountFlags, CreateAccountResult, CreateTransferResult as R, History, Ledger,
    LedgerConfig, MemoryHistory, PendingStatus, Transfer, TransferFlags,
};
use proptest::prelude::*;

const SECOND_NS: u64 = 1_000_000_000;
const ACCOUNTS: u128 = 7;

#[derive(Clone, Debug)]
enum Event {
    Simple { debit: u128, credit: u128, amount: u128, pending: bool, timeout_s: u32, balancing: u8, linked: bool },
    Resolve { pending: usize, post: bool, amount: u128, linked: bool },
    Retry { applied: usize },
}

#[derive(Clone, Debug)]
enum Step {
    Transfers(Vec<Event>),
    Pulse,
    Checkpoint,
    /// Begin a checkpoint and write it to the store, but confirm it later.
    CheckpointBegin,
    CheckpointEnd,
    Advance {
        seconds: u64,
    },
}

fn amount() -> impl Strategy<Value = u128> {
    prop_oneof![8 => 0u128..200, 1 => Just(u128::MAX / 2)]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (1..=ACCOUNTS, 1..=ACCOUNTS, amount(), any::<bool>(), 0u32..4, 0u8..4, prop::bool::weighted(0.25))
            .prop_map(|(debit, credit, amount, pending, timeout_s, balancing, linked)| Event::Simple {
                debit, credit, amount, pending, timeout_s, balancing, linked
            }),
        3 => (any::<usize>(), any::<bool>(), 0u128..150, prop::bool::weighted(0.25))
            .prop_map(|(pending, post, amount, linked)| Event::Resolve { pending, post, amount, linked }),
        1 => any::<usize>().prop_map(|applied| Event::Retry { applied }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => prop::collection::vec(event(), 1..24).prop_map(Step::Transfers),
        1 => Just(Step::Pulse),
        1 => Just(Step::Checkpoint),
        1 => Just(Step::CheckpointBegin),
        1 => Just(Step::CheckpointEnd),
        1 => (1u64..4).prop_map(|seconds| Step::Advance { seconds }),
    ]
}

/// What the auditor knows: balances rebuilt from applied transfers.
#[derive(Default)]
struct Auditor {
    /// account → (debits_pending, debits_posted, credits_pending, credits_posted)
    balances: BTreeMap<u128, [u128; 4]>,
    /// open pending transfers the auditor has seen applied
    pending_open: BTreeMap<u128, Transfer>,
}

impl Auditor {
    fn apply(&mut self, stored: &Transfer) {
        let flags = stored.flags;
        if flags.contains(TransferFlags::POST_PENDING_TRANSFER) || flags.contains(TransferFlags::VOID_PENDING_TRANSFER)
        {
            let pending = self.pending_open.remove(&stored.pending_id).expect("resolved an open pending transfer");
            self.release(&pending);
            if flags.contains(TransferFlags::POST_PENDING_TRANSFER) {
                self.entry(pending.debit_account_id)[1] += stored.amount;
                self.entry(pending.credit_account_id)[3] += stored.amount;
            }
        } else if flags.contains(TransferFlags::PENDING) {
            self.entry(stored.debit_account_id)[0] += stored.amount;
            self.entry(stored.credit_account_id)[2] += stored.amount;
            self.pending_open.insert(stored.id, *stored);
        } else {
            self.entry(stored.debit_account_id)[1] += stored.amount;
            self.entry(stored.credit_account_id)[3] += stored.amount;
        }
    }

    fn release(&mut self, pending: &Transfer) {
        self.entry(pending.debit_account_id)[0] -= pending.amount;
        self.entry(pending.credit_account_id)[2] -= pending.amount;
    }

    fn entry(&mut self, account: u128) -> &mut [u128; 4] {
        self.balances.entry(account).or_default()
    }

    /// Releases the pending transfers the ledger expired.
    fn expire(&mut self, ledger: &Ledger, history: &impl History) {
        let expired: Vec<Transfer> = self
            .pending_open
            .values()
            .filter(|p| ledger.pending_status(p.id, history) == Some(PendingStatus::Expired))
            .copied()
            .collect();
        for pending in expired {
            self.pending_open.remove(&pending.id);
            self.release(&pending);
        }
    }

    fn check(&self, ledger: &Ledger) {
        for id in 1..=ACCOUNTS + 1 {
            let a = ledger.account(id).unwrap();
            let expected = self.balances.get(&id).copied().unwrap_or_default();
            assert_eq!(
                [a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted],
                expected,
                "account {id}"
            );
        }
    }
}

struct Harness {
    ledger: Ledger,
    history: MemoryHistory,
    twin: Ledger,
    twin_history: MemoryHistory,
    restored: Option<Ledger>,
    auditor: Auditor,
    clock_ns: u64,
    id_next: u128,
    /// Pending transfers ever created (ids), for resolves to pick from.
    pendings: Vec<u128>,
    /// Events applied with `ok`, exactly as sent, for retries.
    applied: Vec<Transfer>,
}

impl Harness {
    fn new() -> Harness {
        let config = LedgerConfig { accounts_max: 100, pending_transfers_max: 30, expiries_per_batch_max: 3 };
        let mut ledger = Ledger::new(config);
        let flags = [
            AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
            AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS,
            AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags::HISTORY,
            AccountFlags(0),
            AccountFlags(0),
            AccountFlags::HISTORY,
            AccountFlags(0),
        ];
        let mut accounts: Vec<Account> = (1..=ACCOUNTS)
            .map(|id| Account { id, ledger: 1, code: 1, flags: flags[id as usize - 1], ..Account::default() })
            .collect();
        // One account on another ledger, to exercise ledger mismatches.
        accounts.push(Account { id: ACCOUNTS + 1, ledger: 2, code: 1, ..Account::default() });
        let results = ledger.create_accounts(SECOND_NS, &accounts);
        assert!(results.iter().all(|r| *r == CreateAccountResult::Ok));
        Harness {
            twin: ledger.clone(),
            ledger,
            history: MemoryHistory::new(),
            twin_history: MemoryHistory::new(),
            restored: None,
            auditor: Auditor::default(),
            clock_ns: 2 * SECOND_NS,
            id_next: 1,
            pendings: Vec::new(),
            applied: Vec::new(),
        }
    }

    fn build(&mut self, events: &[Event]) -> Vec<Transfer> {
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            let transfer = match *event {
                Event::Simple { debit, credit, amount, pending, timeout_s, balancing, linked } => {
                    let mut flags = TransferFlags(0);
                    if pending {
                        flags.insert(TransferFlags::PENDING);
                    }
                    if balancing & 1 != 0 {
                        flags.insert(TransferFlags::BALANCING_DEBIT);
                    }
                    if balancing & 2 != 0 {
                        flags.insert(TransferFlags::BALANCING_CREDIT);
                    }
                    if linked {
                        flags.insert(TransferFlags::LINKED);
                    }
                    let id = self.fresh_id();
                    if pending {
                        self.pendings.push(id);
                    }
                    Transfer {
                        id,
                        debit_account_id: debit,
                        credit_account_id: credit,
                        amount,
                        timeout_s: if pending { timeout_s } else { 0 },
                        ledger: 1,
                        code: 1,
                        flags,
                        ..Transfer::default()
                    }
                }
                Event::Resolve { pending, post, amount, linked } => {
                    let pending_id =
                        if self.pendings.is_empty() { 999_999 } else { self.pendings[pending % self.pendings.len()] };
                    let mut flags =
                        if post { TransferFlags::POST_PENDING_TRANSFER } else { TransferFlags::VOID_PENDING_TRANSFER };
                    if linked {
                        flags.insert(TransferFlags::LINKED);
                    }
                    let amount = if post { amount } else { 0 };
                    Transfer { id: self.fresh_id(), pending_id, amount, flags, ..Transfer::default() }
                }
                Event::Retry { applied } => {
                    if self.applied.is_empty() {
                        continue;
                    }
                    let mut retry = self.applied[applied % self.applied.len()];
                    // Sent alone, outside any chain, so its answer is its own.
                    retry.flags.remove(TransferFlags::LINKED);
                    if out.last().is_some_and(|t: &Transfer| t.flags.contains(TransferFlags::LINKED)) {
                        continue;
                    }
                    retry
                }
            };
            out.push(transfer);
        }
        out
    }

    fn fresh_id(&mut self) -> u128 {
        let id = self.id_next;
        self.id_next += 1;
        id
    }

    fn run(&mut self, step: &Step) {
        match step {
            Step::Transfers(events) => {
                let batch = self.build(events);
                self.transfers(&batch);
            }
            Step::Pulse => {
                let expired = self.ledger.pulse(self.clock_ns);
                assert_eq!(self.twin.pulse(self.clock_ns), expired);
                if let Some(restored) = &mut self.restored {
                    assert_eq!(restored.pulse(self.clock_ns), expired);
                }
            }
            Step::CheckpointBegin => {
                if !self.ledger.checkpoint_in_flight() {
                    let delta = self.ledger.checkpoint_begin();
                    // The store may hold the delta before the ledger hears so.
                    self.history.apply(&delta);
                }
            }
            Step::CheckpointEnd => {
                if self.ledger.checkpoint_in_flight() {
                    self.ledger.checkpoint_end();
                }
            }
            Step::Checkpoint => {
                if self.ledger.checkpoint_in_flight() {
                    self.ledger.checkpoint_end();
                }
                let delta = self.ledger.checkpoint();
                self.history.apply(&delta);
                let restored = Ledger::restore(
                    *self.ledger.config(),
                    self.history.accounts.values().copied(),
                    self.history.open_pending(),
                    self.history.timestamp_last,
                );
                assert_eq!(restored.state_hash(), self.ledger.state_hash());
                self.restored = Some(restored);
            }
            Step::Advance { seconds } => self.clock_ns += seconds * SECOND_NS,
        }
        self.clock_ns += SECOND_NS / 10;
        self.ledger.audit().unwrap();
        self.auditor.expire(&self.ledger, &self.history);
        self.auditor.check(&self.ledger);
        assert_eq!(self.twin.state_hash(), self.ledger.state_hash());
        if let Some(restored) = &self.restored {
            assert_eq!(restored.state_hash(), self.ledger.state_hash());
        }
        // Queries span memory, an in-flight checkpoint and history: same answers as the twin's.
        for account in [1, 3, 6] {
            for (limit, reversed) in [(5, false), (7, true), (8190, false)] {
                let filter = AccountFilter { reversed, ..AccountFilter::account(account, limit) };
                let ours = self.ledger.get_account_transfers(&filter, &self.history).unwrap();
                assert_eq!(ours, self.twin.get_account_transfers(&filter, &self.twin_history).unwrap());
                let ours = self.ledger.get_account_balances(&filter, &self.history).unwrap();
                assert_eq!(ours, self.twin.get_account_balances(&filter, &self.twin_history).unwrap());
            }
        }
    }

    fn transfers(&mut self, batch: &[Transfer]) {
        let before: Vec<Option<Transfer>> =
            batch.iter().map(|t| self.ledger.lookup_transfers(&[t.id], &self.history).first().copied()).collect();
        let results = self.ledger.create_transfers(self.clock_ns, batch, &self.history);
        assert_eq!(results.len(), batch.len());
        let twin_results = self.twin.create_transfers(self.clock_ns, batch, &self.twin_history);
        assert_eq!(twin_results, results, "a ledger with no checkpoints answers the same");
        if let Some(restored) = &mut self.restored {
            assert_eq!(restored.create_transfers(self.clock_ns, batch, &self.history), results);
        }
        // Expiries happen before the batch's events.
        self.auditor.expire(&self.ledger, &self.history);

        let mut chain: Vec<usize> = Vec::new();
        for (index, (event, result)) in batch.iter().zip(&results).enumerate() {
            let stored = self.ledger.lookup_transfers(&[event.id], &self.history).first().copied();
            match result {
                R::Ok => {
                    assert!(before[index].is_none(), "ok for an id that existed");
                    let stored = stored.expect("an ok transfer is stored");
                    self.auditor.apply(&stored);
                    self.applied.push(*event);
                }
                R::Exists => assert_eq!(stored, before[index], "a retry changes nothing"),
                _ => assert_eq!(stored, before[index], "a failed event stores nothing"),
            }
            if let Some(previous) = before[index] {
                // A retry of an applied transfer (sent alone) must answer exists.
                if self.applied.iter().any(|a| a.id == previous.id && *a == *event) && chain.is_empty() {
                    assert_eq!(*result, R::Exists, "retry of {event:?}");
                }
            }
            chain.push(index);
            if !event.flags.contains(TransferFlags::LINKED) || index == batch.len() - 1 {
                let oks = chain.iter().filter(|i| results[**i] == R::Ok).count();
                assert!(oks == 0 || oks == chain.len(), "chain {chain:?} is partial: {results:?}");
                chain.clear();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_keep_every_invariant(steps in prop::collection::vec(step(), 1..40)) {
        let mut harness = Harness::new();
        for step in &steps {
            harness.run(step);
        }
    }

    #[test]
    fn identical_input_gives_identical_output(steps in prop::collection::vec(step(), 1..25)) {
        let run = |steps: &[Step]| {
            let mut harness = Harness::new();
            for step in steps {
                harness.run(step);
            }
            harness.run(&Step::CheckpointEnd);
            (harness.ledger.state_hash(), harness.ledger.checkpoint())
        };
        prop_assert_eq!(run(&steps), run(&steps));
    }
}

#[test]
fn workload_reaches_the_interesting_outcomes() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    for _ in 0..64 {
        let steps = prop::collection::vec(step(), 20..40).new_tree(&mut runner).unwrap().current();
        let mut harness = Harness::new();
        for step in &steps {
            if let Step::Transfers(events) = step {
                let batch = harness.build(events);
                let results = harness.ledger.clone().create_transfers(harness.clock_ns, &batch, &harness.history);
                for result in results {
                    *seen.entry(result.as_str()).or_default() += 1;
                }
                harness.transfers(&batch);
            } else {
                harness.run(step);
            }
        }
    }
    // The generator must reach the outcomes the properties are about.
    for outcome in [
        "ok",
        "exists",
        "exceeds_credits",
        "exceeds_debits",
        "linked_event_failed",
        "pending_transfer_already_posted",
        "pending_transfer_already_voided",
        "pending_transfer_expired",
        "exceeds_pending_transfer_amount",
        "accounts_must_be_different",
        "pending_transfers_max_reached",
    ] {
        assert!(seen.get(outcome).copied().unwrap_or(0) > 0, "never saw {outcome}: {seen:?}");
    }
    let overflows: usize = seen.iter().filter(|(code, _)| code.starts_with("overflows_")).map(|(_, n)| n).sum();
    assert!(overflows > 0, "never saw an overflow: {seen:?}");
}
