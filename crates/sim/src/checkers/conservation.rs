//! Conservation: in every replica of every cell, for every ledger, total
//! debits equal total credits (posted and pending), and the ledger's own
//! audit (every account's balances against the totals) passes.

use super::Failure;
use crate::Sim;

pub(crate) fn check(sim: &Sim) -> Vec<Failure> {
    let mut failures = Vec::new();
    for (&node, stepped) in &sim.nodes {
        let Some(stepped) = stepped else { continue };
        for (cell, applied, ledger, _) in stepped.replicas() {
            for (ledger_id, totals) in ledger.totals() {
                if !totals.conserved() {
                    failures.push(Failure::new(
                        "conservation",
                        format!("node {node} cell {cell} at index {applied}: ledger {ledger_id} is not conserved: {totals:?}"),
                    ));
                }
            }
            if let Err(error) = ledger.audit() {
                failures.push(Failure::new("conservation", format!("node {node} cell {cell}: audit: {error}")));
            }
        }
    }
    failures
}
