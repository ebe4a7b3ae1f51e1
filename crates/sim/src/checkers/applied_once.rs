//! No transfer applied twice: every account's balances, in every replica,
//! equal what the transfers the ledger holds add up to (each counted once):
//! posted = single-phase transfers and posts (cross-cell legs' resolutions
//! included); pending = pending transfers still pending. A transfer applied twice (a retry not recognised) would
//! leave a balance above the sum.

use std::collections::BTreeMap;

use cellpay_ledger::id::resolution_id;
use cellpay_ledger::{PendingStatus, TransferFlags};

use super::Failure;
use crate::Sim;

#[derive(Default, Debug, PartialEq, Eq)]
struct Sums {
    debits_pending: u128,
    debits_posted: u128,
    credits_pending: u128,
    credits_posted: u128,
}

pub(crate) fn check(sim: &Sim) -> Vec<Failure> {
    let mut failures = Vec::new();
    for (&node, stepped) in &sim.nodes {
        let Some(stepped) = stepped else { continue };
        for (cell, _, ledger, store) in stepped.replicas() {
            // Every transfer sent (a cross-cell transfer has a leg in each of its
            // cells, under its id) and every leg's resolution.
            let ids: Vec<u128> = sim.book.sent.keys().flat_map(|&id| [id, resolution_id(id)]).collect();
            let mut sums: BTreeMap<u128, Sums> = BTreeMap::new();
            for transfer in ledger.lookup_transfers(&ids, store) {
                let flags = transfer.flags;
                let (debit, credit) = (transfer.debit_account_id, transfer.credit_account_id);
                if flags.contains(TransferFlags::PENDING) {
                    if ledger.pending_status(transfer.id, store) == Some(PendingStatus::Pending) {
                        sums.entry(debit).or_default().debits_pending += transfer.amount;
                        sums.entry(credit).or_default().credits_pending += transfer.amount;
                    }
                } else if !flags.contains(TransferFlags::VOID_PENDING_TRANSFER) {
                    sums.entry(debit).or_default().debits_posted += transfer.amount;
                    sums.entry(credit).or_default().credits_posted += transfer.amount;
                }
            }
            let accounts: Vec<u128> = sim.book.accounts.iter().filter(|(_, &c)| c == cell).map(|(&id, _)| id).collect();
            for account in ledger.lookup_accounts(&accounts) {
                let balances = Sums {
                    debits_pending: account.debits_pending,
                    debits_posted: account.debits_posted,
                    credits_pending: account.credits_pending,
                    credits_posted: account.credits_posted,
                };
                let expected = sums.remove(&account.id).unwrap_or_default();
                if balances != expected {
                    failures.push(Failure::new(
                        "applied_once",
                        format!("node {node} cell {cell}: account {:#x} holds {balances:?}, its transfers add up to {expected:?}", account.id),
                    ));
                }
            }
        }
    }
    failures
}
