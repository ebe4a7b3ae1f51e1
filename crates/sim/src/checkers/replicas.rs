//! Replicas identical: once the cluster is quiet, every replica of a cell
//! has applied the same index and holds the same state (state hash).

use std::collections::BTreeMap;

use cellpay_cluster::topology::{CellId, NodeId};

use super::Failure;
use crate::Sim;

/// Whether every node is up and every replica of every cell has applied
/// everything its cell committed.
pub(crate) fn converged(sim: &Sim) -> bool {
    let mut applied: BTreeMap<CellId, Vec<(u64, u64)>> = BTreeMap::new();
    for stepped in sim.nodes.values() {
        let Some(stepped) = stepped else { return false };
        for status in stepped.status().cells() {
            applied.entry(status.cell).or_default().push((status.commit, status.applied));
        }
    }
    applied.values().all(|replicas| {
        let highest = replicas.iter().map(|&(commit, _)| commit).max().unwrap_or(0);
        replicas.len() == crate::NODES as usize && replicas.iter().all(|&(_, applied)| applied == highest)
    })
}

pub(crate) fn check(sim: &Sim) -> Vec<Failure> {
    let mut by_cell: BTreeMap<CellId, BTreeMap<(u64, u64), Vec<NodeId>>> = BTreeMap::new();
    for (&node, stepped) in &sim.nodes {
        let Some(stepped) = stepped else { continue };
        for (cell, applied, ledger, _) in stepped.replicas() {
            // The ledger's state and the cell's (shard ownership, the routing table).
            let state = stepped.cell_state(cell).map_or(0, |state| state.hash());
            by_cell.entry(cell).or_default().entry((applied, ledger.state_hash() ^ state)).or_default().push(node);
        }
    }
    let mut failures = Vec::new();
    for (cell, states) in by_cell {
        let applied: Vec<u64> = states.keys().map(|&(applied, _)| applied).collect();
        let same_index = applied.windows(2).all(|w| w[0] == w[1]);
        if states.len() > 1 && same_index {
            failures.push(Failure::new(
                "replicas",
                format!(
                    "cell {cell}: replicas differ at the same applied index: (index, state hash) -> nodes {states:?}"
                ),
            ));
        }
    }
    failures
}
