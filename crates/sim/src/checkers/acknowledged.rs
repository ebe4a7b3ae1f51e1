//! Acknowledged transfers are durable: every transfer a client was told was
//! applied (`ok`, or `exists` on a retry) is in every replica of its cell,
//! as sent (a cross-cell transfer: as its leg there, posted); and no
//! linearizable lookup missed one.

use cellpay_ledger::id::{is_clearing_account, resolution_id};
use cellpay_ledger::{History, Ledger, Transfer, TransferFlags};

use super::Failure;
use crate::Sim;

/// Whether `stored` is what the client sent as `sent` (a post or void takes
/// its accounts and amount from the pending transfer).
fn same(sent: &Transfer, stored: &Transfer) -> bool {
    let resolves = sent.flags.contains(TransferFlags::POST_PENDING_TRANSFER)
        || sent.flags.contains(TransferFlags::VOID_PENDING_TRANSFER);
    let accounts = resolves
        || (sent.debit_account_id == stored.debit_account_id && sent.credit_account_id == stored.credit_account_id);
    let amount = resolves || sent.amount == stored.amount;
    accounts && amount && sent.pending_id == stored.pending_id && sent.flags == stored.flags
}

/// Whether `stored` is the coordinator's leg of the cross-cell transfer
/// `sent` (an event of a cross-cell operation: a pending transfer under its
/// id, with a clearing account for the side in another cell), posted.
fn posted_leg(sent: &Transfer, stored: &Transfer, ledger: &Ledger, store: &impl History) -> bool {
    let side = |sent: u128, stored: u128| sent == stored || is_clearing_account(stored);
    let leg = !sent.flags.contains(TransferFlags::PENDING)
        && stored.flags.contains(TransferFlags::PENDING)
        && side(sent.debit_account_id, stored.debit_account_id)
        && side(sent.credit_account_id, stored.credit_account_id)
        && sent.amount == stored.amount;
    let posted = ledger
        .transfer(resolution_id(sent.id), store)
        .is_some_and(|resolution| resolution.flags.contains(TransferFlags::POST_PENDING_TRANSFER));
    leg && posted
}

pub(crate) fn check(sim: &Sim) -> Vec<Failure> {
    let mut failures = Vec::new();
    for &(id, node) in &sim.book.lookups_missing {
        failures.push(Failure::new(
            "acknowledged",
            format!("a lookup on node {node} did not find acknowledged transfer {id:#x}"),
        ));
    }
    for (&node, stepped) in &sim.nodes {
        let Some(stepped) = stepped else { continue };
        for (cell, applied, ledger, store) in stepped.replicas() {
            let ids: Vec<u128> = sim
                .book
                .sent
                .iter()
                .filter(|(&id, &(sent_cell, _))| sent_cell == cell && sim.book.acknowledged(id))
                .map(|(&id, _)| id)
                .collect();
            let found = ledger.lookup_transfers(&ids, store);
            for id in &ids {
                let (_, sent) = &sim.book.sent[id];
                match found.iter().find(|t| t.id == *id) {
                    Some(stored) if same(sent, stored) || posted_leg(sent, stored, ledger, store) => {}
                    Some(stored) => failures.push(Failure::new(
                        "acknowledged",
                        format!("node {node} cell {cell}: transfer {id:#x} differs from what was acknowledged: sent {sent:?}, stored {stored:?}"),
                    )),
                    None => failures.push(Failure::new(
                        "acknowledged",
                        format!(
                            "node {node} cell {cell} (applied {applied}): acknowledged transfer {id:#x} is missing (answers {:?})",
                            sim.book.results.get(id)
                        ),
                    )),
                }
            }
        }
    }
    failures
}
