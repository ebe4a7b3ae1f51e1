//! Shard ownership: the cells obey the moves the mover made (see `mover.rs`).
//!
//! - what the cells answered during the moves that they must not have (an
//!   old owner taking an account of a shard it released, a cell releasing a
//!   shard that holds an account);
//! - every account a replica holds is in a shard that replica's own log says
//!   its cell owns;
//! - after each finished move, on every replica: the global cell's table
//!   names the new owner, the new owner owns the shard, the old owner does
//!   not, and the account the stale router sent the old owner is nowhere.

use cellpay_cluster::topology::GLOBAL_CELL;

use super::Failure;
use crate::mover::Step;
use crate::Sim;

pub(crate) fn check(sim: &Sim) -> Vec<Failure> {
    let mut failures: Vec<Failure> = sim.mover.wrong.iter().map(|w| Failure::new("ownership", w.clone())).collect();
    let moved = || sim.mover.moves.iter().filter(|m| m.step == Step::Done);
    let known: Vec<u128> =
        sim.book.accounts.keys().copied().chain(sim.mover.moves.iter().flat_map(|m| [m.account, m.stale])).collect();
    for (&node, stepped) in &sim.nodes {
        let Some(stepped) = stepped else { continue };
        for (cell, applied, ledger, _) in stepped.replicas() {
            let Some(state) = stepped.cell_state(cell) else { continue };
            for account in ledger.lookup_accounts(&known) {
                if !state.owns_account(account.id) {
                    failures.push(Failure::new(
                        "ownership",
                        format!(
                            "node {node} cell {cell} (applied {applied}) holds account {} of a shard it does not own",
                            account.id
                        ),
                    ));
                }
                if moved().any(|m| m.stale == account.id) {
                    failures.push(Failure::new(
                        "ownership",
                        format!("node {node} cell {cell} holds account {}, sent to a shard's old owner", account.id),
                    ));
                }
            }
        }
        for m in moved() {
            let table = stepped.cell_state(GLOBAL_CELL).and_then(|state| state.routing()).map(|t| t.owner(m.shard));
            let owns = |cell| stepped.cell_state(cell).map(|state| state.owns(m.shard));
            let seen = (table, owns(m.to), owns(m.from));
            if seen != (Some(Some(m.to)), Some(true), Some(false)) {
                failures.push(Failure::new(
                    "ownership",
                    format!(
                        "node {node}: shard {} moved from cell {} to cell {}, but (table owner, new owns, old owns) \
                         = {seen:?}",
                        m.shard, m.from, m.to
                    ),
                ));
            }
        }
    }
    failures
}
