//! The invariant checkers, one per file. Each looks at the run's book (what
//! the clients were told) and at every replica's ledger, and reports what
//! it found wrong; none changes anything.

pub mod acknowledged;
pub mod applied_once;
pub mod atomicity;
pub mod balance_limits;
pub mod conservation;
pub mod disk;
pub mod liveness;
pub mod ownership;
pub mod replicas;

use crate::Sim;

/// Failures reported per checker, at most (then a count).
const FAILURES_SHOWN_MAX: usize = 5;

/// A broken invariant: the checker that found it, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub checker: &'static str,
    pub detail: String,
}

impl Failure {
    pub fn new(checker: &'static str, detail: String) -> Failure {
        Failure { checker, detail }
    }
}

/// Runs the end-of-run checkers on the quiesced cluster.
pub(crate) fn run_all(sim: &mut Sim) {
    let mut failures = Vec::new();
    failures.extend(conservation::check(sim));
    failures.extend(balance_limits::check(sim));
    failures.extend(replicas::check(sim));
    failures.extend(acknowledged::check(sim));
    failures.extend(applied_once::check(sim));
    failures.extend(ownership::check(sim));
    failures.extend(atomicity::check(sim));
    // The first few of each checker, and how many more.
    let mut shown: std::collections::BTreeMap<&'static str, usize> = std::collections::BTreeMap::new();
    for failure in failures {
        let count = shown.entry(failure.checker).or_default();
        *count += 1;
        if *count <= FAILURES_SHOWN_MAX {
            sim.report.failures.push(failure);
        }
    }
    for (checker, count) in shown.into_iter().filter(|&(_, count)| count > FAILURES_SHOWN_MAX) {
        let more = count - FAILURES_SHOWN_MAX;
        sim.report.failures.push(Failure::new(checker, format!("... and {more} more")));
    }
}
