//! Liveness: once the faults stop (every node up, every link healed), every
//! client's request in doubt resolves and every client, so every cell, has
//! a batch acknowledged within `LIVENESS_BOUND_NS`.

use super::Failure;
use crate::{Sim, LIVENESS_BOUND_NS};

pub(crate) fn check(sim: &mut Sim) {
    let healed_at = sim.now();
    let answered: Vec<u64> = sim.clients.iter().map(|c| c.answered).collect();
    // A client has one request at a time: an answer after the heal means
    // the one in doubt then was answered.
    let done = |sim: &Sim| sim.clients.iter().zip(&answered).all(|(c, &before)| c.answered > before);
    if !sim.run_until(healed_at + LIVENESS_BOUND_NS, done) {
        let stuck: Vec<String> = sim
            .clients
            .iter()
            .zip(&answered)
            .filter(|(c, &before)| c.answered <= before)
            .map(|(c, _)| format!("client {} (cell {}, waiting since {:?} ns)", c.id, c.cell, c.waiting_since))
            .collect();
        sim.report.failures.push(Failure::new(
            "liveness",
            format!(
                "{} s after the faults stopped, still not answered: {}",
                LIVENESS_BOUND_NS / 1_000_000_000,
                stuck.join(", ")
            ),
        ));
    }
}
