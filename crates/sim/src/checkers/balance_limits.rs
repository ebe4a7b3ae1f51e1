//! Balance limits: no account flagged `debits_must_not_exceed_credits` has
//! debits (posted and pending) above its posted credits, in any replica.

use cellpay_ledger::AccountFlags;

use super::Failure;
use crate::Sim;

pub(crate) fn check(sim: &Sim) -> Vec<Failure> {
    let mut failures = Vec::new();
    let ids: Vec<u128> = sim.book.accounts.keys().copied().collect();
    for (&node, stepped) in &sim.nodes {
        let Some(stepped) = stepped else { continue };
        for (cell, _, ledger, _) in stepped.replicas() {
            for account in ledger.lookup_accounts(&ids) {
                let limited = account.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS);
                if limited && account.debits_posted + account.debits_pending > account.credits_posted {
                    failures.push(Failure::new(
                        "balance_limits",
                        format!(
                            "node {node} cell {cell}: account {:#x} debits exceed credits: {account:?}",
                            account.id
                        ),
                    ));
                }
            }
        }
    }
    failures
}
