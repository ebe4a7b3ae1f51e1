//! Cross-cell transfers are atomic: at quiescence, every leg has its twin.
//!
//! - No cell holds an undecided cross-cell operation, a prepared leg waiting
//!   for a decision, or a release of a held leg its participant has not
//!   applied (no leg left behind).
//! - For every transfer a client sent across cells, its legs in the debit
//!   account's cell and in the credit account's cell are both posted, or
//!   neither is (each voided, or never tried); neither is pending, except
//!   that a client's pending transfer its client has not posted or voided
//!   (and that has not expired) has both legs pending.
//! - For every pair of cells and ledger, what one cell's clearing account
//!   for the other holds as pending credits is what the other's holds as
//!   pending debits: the sum of the open pending transfers between them
//!   (none but those); and what one was credited net (posted) is what the
//!   other was debited net.

use std::collections::BTreeMap;

use cellpay_cluster::topology::CellId;
use cellpay_ledger::id::{clearing_account_id, resolution_id};
use cellpay_ledger::{History, Ledger, PendingStatus, TransferFlags};

use super::Failure;
use crate::workload::LEDGER;
use crate::Sim;

/// A leg's state in one cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leg {
    Absent,
    Pending,
    Posted,
    Voided,
}

/// A leg is resolved by the system's resolution (a decision), or, held for
/// a client's pending transfer, by the client's post or void, or its expiry.
fn leg(ledger: &Ledger, store: &impl History, id: u128) -> Leg {
    if ledger.transfer(id, store).is_none() {
        return Leg::Absent;
    }
    match ledger.transfer(resolution_id(id), store) {
        Some(resolution) if resolution.flags.contains(TransferFlags::POST_PENDING_TRANSFER) => Leg::Posted,
        Some(_) => Leg::Voided,
        None => match ledger.pending_status(id, store) {
            Some(PendingStatus::Posted) => Leg::Posted,
            Some(PendingStatus::Voided | PendingStatus::Expired) => Leg::Voided,
            _ => Leg::Pending,
        },
    }
}

/// Whether no cross-cell transfer is in flight in any replica (part of quiescence:
/// a client is answered at the decision, before the other cells apply it).
pub(crate) fn settled(sim: &Sim) -> bool {
    sim.nodes.values().flatten().all(|stepped| {
        stepped.status().cells().iter().all(|status| {
            stepped.cell_state(status.cell).is_none_or(|state| {
                state.cross.ops().is_empty() && state.cross.prepared() == 0 && state.cross.counts().releases == 0
            })
        })
    })
}

pub(crate) fn check(sim: &Sim) -> Vec<Failure> {
    let mut failures = Vec::new();
    let fail = |failures: &mut Vec<Failure>, detail: String| failures.push(Failure::new("atomicity", detail));
    // One replica per cell (the replicas checker compares them all): the one that applied most.
    let mut chosen: BTreeMap<CellId, (u64, u64)> = BTreeMap::new();
    for (&node, stepped) in &sim.nodes {
        let Some(stepped) = stepped else { continue };
        for (cell, applied, _, _) in stepped.replicas() {
            let state = stepped.cell_state(cell).expect("a hosted cell has a state");
            let releases = state.cross.counts().releases;
            if !state.cross.ops().is_empty() || state.cross.prepared() > 0 || releases > 0 {
                let ops: Vec<String> = state
                    .cross
                    .ops()
                    .iter()
                    .map(|(op, record)| format!("{op:#x} ({:?}, {:?})", record.decision, record.participants))
                    .collect();
                let prepared = state.cross.prepared();
                fail(
                    &mut failures,
                    format!("node {node} cell {cell}: cross-cell transfers left in doubt: operations {ops:?}, {prepared} prepared, {releases} releases not applied"),
                );
            }
            if chosen.get(&cell).is_none_or(|&(best, _)| applied > best) {
                chosen.insert(cell, (applied, node));
            }
        }
    }
    let replica = |cell: CellId| {
        let &(_, node) = chosen.get(&cell)?;
        let stepped = sim.nodes.get(&node)?.as_ref()?;
        stepped.replicas().find(|(c, ..)| *c == cell).map(|(_, _, ledger, store)| (ledger, store))
    };
    let cells: Vec<CellId> =
        chosen.keys().copied().filter(|&cell| cell != cellpay_cluster::topology::GLOBAL_CELL).collect();
    // Every transfer sent across cells: its two legs agree. The amounts of
    // the pending transfers still open, by (debit cell, credit cell).
    let mut open: BTreeMap<(CellId, CellId), u128> = BTreeMap::new();
    for (&id, (_, sent)) in &sim.book.sent {
        let (Some(&debit_cell), Some(&credit_cell)) =
            (sim.book.accounts.get(&sent.debit_account_id), sim.book.accounts.get(&sent.credit_account_id))
        else {
            continue;
        };
        if debit_cell == credit_cell {
            continue;
        }
        let (Some((ld, sd)), Some((lc, sc))) = (replica(debit_cell), replica(credit_cell)) else { continue };
        let (debit_leg, credit_leg) = (leg(ld, sd, id), leg(lc, sc, id));
        // Posted in both, or in neither (a cancelled transfer's leg is voided,
        // or was never tried); pending in both only while a client's pending
        // transfer is open.
        let posted = |leg: Leg| leg == Leg::Posted;
        let pending = |leg: Leg| leg == Leg::Pending;
        let held = sent.flags.contains(TransferFlags::PENDING);
        let twins = posted(debit_leg) == posted(credit_leg)
            && pending(debit_leg) == pending(credit_leg)
            && (held || !pending(debit_leg));
        if !twins {
            fail(
                &mut failures,
                format!(
                    "transfer {id:#x}: its leg in cell {debit_cell} is {debit_leg:?}, its leg in cell {credit_cell} is {credit_leg:?}"
                ),
            );
        }
        if pending(debit_leg) {
            *open.entry((debit_cell, credit_cell)).or_default() += sent.amount;
        }
    }
    // Clearing accounts: pending only what is open between the two cells, the
    // same on both sides; each pair nets to zero.
    for &x in &cells {
        for &y in cells.iter().filter(|&&y| y > x) {
            let (Some((lx, _)), Some((ly, _))) = (replica(x), replica(y)) else { continue };
            let account = |ledger: &Ledger, holder: CellId, peer: CellId| {
                ledger.account(clearing_account_id(LEDGER, holder as u16, peer as u16)).copied().unwrap_or_default()
            };
            let (ax, ay) = (account(lx, x, y), account(ly, y, x));
            let (x_to_y, y_to_x) = (open.get(&(x, y)).copied().unwrap_or(0), open.get(&(y, x)).copied().unwrap_or(0));
            let pending = [ax.credits_pending, ay.debits_pending, ay.credits_pending, ax.debits_pending];
            if pending != [x_to_y, x_to_y, y_to_x, y_to_x] {
                fail(
                    &mut failures,
                    format!(
                        "cells {x} and {y}: their clearing accounts hold pending money other than the {x_to_y} open \
                         from {x} to {y} and the {y_to_x} from {y} to {x}: {ax:?} and {ay:?}"
                    ),
                );
            }
            let net = |a: cellpay_ledger::Account| a.credits_posted as i128 - a.debits_posted as i128;
            if net(ax) != -net(ay) {
                fail(
                    &mut failures,
                    format!("cells {x} and {y}: clearing accounts do not net to zero: {} and {}", net(ax), net(ay)),
                );
            }
        }
    }
    failures
}
