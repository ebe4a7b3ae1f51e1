//! Acknowledged transfers are durable: every transfer a client was told was
//! applied (`ok`, or `exists` on a retry) is in every replica of its cell,
//! as sent (a cross-cell transfer: as its leg there, posted; a cross-cell
//! pending transfer: as its leg there, held for the client, not cancelled);
//! and no linearizable lookup missed one.

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

/// Whether `stored` is a leg of the cross-cell transfer `sent`: a pending
/// transfer under its id, flagged `cross_cell_leg`, with a clearing account
/// for the side in another cell.
fn leg(sent: &Transfer, stored: &Transfer) -> bool {
    let side = |sent: u128, stored: u128| sent == stored || is_clearing_account(stored);
    stored.flags.contains(TransferFlags::PENDING)
        && stored.flags.contains(TransferFlags::CROSS_CELL_LEG)
        && side(sent.debit_account_id, stored.debit_account_id)
        && side(sent.credit_account_id, stored.credit_account_id)
        && sent.amount == stored.amount
}

/// Whether `stored` is the leg of a cross-cell transfer `sent` as it must
/// be once acknowledged: posted by the system's resolution; or, for a
/// client's pending transfer, held with the client's timeout (the
/// coordinator's leg carries it), never voided by a cancel.
fn acknowledged_leg(sent: &Transfer, stored: &Transfer, ledger: &Ledger, store: &impl History) -> bool {
    let resolution = ledger.transfer(resolution_id(sent.id), store);
    if sent.flags.contains(TransferFlags::PENDING) {
        return leg(sent, stored) && sent.timeout_s == stored.timeout_s && resolution.is_none();
    }
    let posted = resolution.is_some_and(|resolution| resolution.flags.contains(TransferFlags::POST_PENDING_TRANSFER));
    leg(sent, stored) && posted
}

pub(crate) fn check(sim: &Sim) -> Vec<Failure> {
    let mut failures = Vec::new();
    for &(id, to) in &sim.book.lookups_missing {
        failures.push(Failure::new(
            "acknowledged",
            format!("a lookup sent to {to} did not find acknowledged transfer {id:#x}"),
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
                    Some(stored) if same(sent, stored) || acknowledged_leg(sent, stored, ledger, store) => {}
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
