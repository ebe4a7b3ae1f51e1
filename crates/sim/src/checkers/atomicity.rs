//! Cross-cell transfers are atomic: at quiescence, every leg has its twin.
//!
//! - No cell holds an undecided cross-cell operation or a prepared leg
//!   waiting for a decision, and no clearing account holds pending money (no
//!   leg left behind).
//! - For every transfer a client sent across cells, its legs in the debit
//!   account's cell and in the credit account's cell are both posted, or
//!   neither is (each voided, or never tried), and neither is pending.
//! - For every pair of cells and ledger, what one cell's clearing account
//!   for the other was credited net is what the other's was debited net.

use std::collections::BTreeMap;

use cellpay_cluster::topology::CellId;
use cellpay_ledger::id::{clearing_account_id, resolution_id};
use cellpay_ledger::{History, Ledger, TransferFlags};

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

fn leg(ledger: &Ledger, store: &impl History, id: u128) -> Leg {
    if ledger.transfer(id, store).is_none() {
        return Leg::Absent;
    }
    match ledger.transfer(resolution_id(id), store) {
        None => Leg::Pending,
        Some(resolution) if resolution.flags.contains(TransferFlags::POST_PENDING_TRANSFER) => Leg::Posted,
        Some(_) => Leg::Voided,
    }
}

/// Whether no cross-cell transfer is in flight in any replica (part of quiescence:
/// a client is answered at the decision, before the other cells apply it).
pub(crate) fn settled(sim: &Sim) -> bool {
    sim.nodes.values().flatten().all(|stepped| {
        stepped.status().cells().iter().all(|status| {
            stepped
                .cell_state(status.cell)
                .is_none_or(|state| state.cross.ops().is_empty() && state.cross.prepared() == 0)
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
            if !state.cross.ops().is_empty() || state.cross.prepared() > 0 {
                let ops: Vec<String> = state
                    .cross
                    .ops()
                    .iter()
                    .map(|(op, record)| format!("{op:#x} ({:?}, {:?})", record.decision, record.participants))
                    .collect();
                let prepared = state.cross.prepared();
                fail(
                    &mut failures,
                    format!("node {node} cell {cell}: cross-cell transfers left in doubt: operations {ops:?}, {prepared} prepared"),
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
    // Clearing accounts: nothing pending; each pair nets to zero.
    for &x in &cells {
        for &y in cells.iter().filter(|&&y| y > x) {
            let (Some((lx, _)), Some((ly, _))) = (replica(x), replica(y)) else { continue };
            let account = |ledger: &Ledger, holder: CellId, peer: CellId| {
                ledger.account(clearing_account_id(LEDGER, holder as u16, peer as u16)).copied().unwrap_or_default()
            };
            let (ax, ay) = (account(lx, x, y), account(ly, y, x));
            for (cell, a) in [(x, ax), (y, ay)] {
                if a.debits_pending != 0 || a.credits_pending != 0 {
                    fail(&mut failures, format!("cell {cell}: a clearing account holds pending money: {a:?}"));
                }
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
    // Every transfer sent across cells: its two legs agree.
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
        // Posted in both, or in neither (a cancelled transfer's leg is voided, or was never tried).
        let posted = |leg: Leg| leg == Leg::Posted;
        let twins = posted(debit_leg) == posted(credit_leg) && debit_leg != Leg::Pending && credit_leg != Leg::Pending;
        if !twins {
            fail(
                &mut failures,
                format!(
                    "transfer {id:#x}: its leg in cell {debit_cell} is {debit_leg:?}, its leg in cell {credit_cell} is {credit_leg:?}"
                ),
            );
        }
    }
    failures
}
