//! A damaged disk, and its replacement.
//!
//! A crash may also flip a bit of what the node's write-ahead log had
//! fsynced (a latent sector error, a bit rot). On restart the node's
//! checksums must catch it: recovery refuses to start, naming the damage.
//! Then the simulator does what an operator does (see ARCHITECTURE.md,
//! "Replacing a node's disk"), through the cells' leaders, while the
//! faults go on:
//!
//! 1. **remove** the node from every cell it belongs to (a replica that lost
//!    its log must not vote again: it could vote twice in one term);
//! 2. **wipe** its data and start it on an empty disk;
//! 3. **add it as a learner** to every cell; once its replica has caught up
//!    (from the log or a snapshot), **promote** it to a voter.
//!
//! A flipped bit in the log's last record cannot be told from a torn write
//! (a record cut short by the crash): recovery cuts it, as it must for a
//! torn write. Such a node lost a record it had fsynced; the run counts it.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cellpay_cluster::topology::{CellId, NodeId};
use cellpay_server::node::{CellStatus, MembershipChange};

use crate::rng::Rng;
use crate::{Event, Sim};

/// How often the replacement looks at the cells and takes its next step.
pub(crate) const STEP_NS: u64 = 200_000_000;

/// Where a node's replacement is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Its damaged disk is out of service; it is being removed from its cells.
    Removing,
    /// It runs on an empty disk and is joining its cells as learner, then voter.
    Joining,
}

/// Flips one bit of one of the log's segment files (chosen by `rng`):
/// everything in them was fsynced. Returns the file and offset, or `None`
/// if the log is empty.
pub(crate) fn flip_a_bit(wal: &Path, rng: &mut Rng) -> Option<(String, u64)> {
    let mut segments: Vec<(String, u64)> = std::fs::read_dir(wal)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let size = entry.metadata().ok()?.len();
            (name.ends_with(".wal") && size > 0).then_some((name, size))
        })
        .collect();
    segments.sort();
    if segments.is_empty() {
        return None;
    }
    let (name, size) = segments.swap_remove(rng.below(segments.len() as u64) as usize);
    let offset = rng.below(size);
    let file = OpenOptions::new().read(true).write(true).open(wal.join(&name)).expect("open a wal segment");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).expect("read a wal byte");
    byte[0] ^= 1 << rng.below(8);
    file.write_all_at(&byte, offset).expect("write a wal byte");
    Some((name, offset))
}

impl Sim {
    /// Takes the node's damaged disk out of service and starts replacing it.
    pub(crate) fn replace_begin(&mut self, node: NodeId) {
        self.record(&[0xD0, node]);
        self.replacing.insert(node, Phase::Removing);
        self.schedule(self.now() + STEP_NS, Event::Replace { node });
    }

    /// One step of a node's replacement; reschedules itself until done.
    pub(crate) fn replace_step(&mut self, node: NodeId) {
        let Some(&phase) = self.replacing.get(&node) else { return };
        let cells = self.topology.cells_of_node(node);
        let mut done = true;
        for &cell in &cells {
            let Some((leader, status)) = self.leader_of(cell) else {
                done = false;
                continue;
            };
            let member = status.voters.contains(&node) || status.learners.contains(&node);
            let change = match phase {
                Phase::Removing if member => Some(MembershipChange::Remove(node)),
                Phase::Removing => None,
                Phase::Joining if !member => Some(MembershipChange::AddLearner(node)),
                Phase::Joining if status.learners.contains(&node) => {
                    let caught_up = self.cell_status(node, cell).is_some_and(|mine| mine.applied >= status.commit);
                    caught_up.then_some(MembershipChange::AddVoter(node))
                }
                Phase::Joining => None,
            };
            if let Some(change) = change {
                done = false;
                let stepped = self.nodes.get_mut(&leader).and_then(Option::as_mut).expect("a leader is up");
                // Refused while another change is pending, or if leadership moved: retried next step.
                let _ = stepped.change_membership(cell, &[change]);
                stepped.round();
                self.record(&[0xD1, node, cell, leader]);
            } else if phase == Phase::Joining && !status.voters.contains(&node) {
                done = false;
            }
        }
        self.flush_outbox();
        match (phase, done) {
            (Phase::Removing, true) => {
                // Out of every cell: a new, empty disk.
                let dir = self.node_dir(node);
                std::fs::remove_dir_all(&dir).unwrap_or_else(|error| panic!("wiping {}: {error}", dir.display()));
                self.replacing.insert(node, Phase::Joining);
                self.start(node);
                self.record(&[0xD2, node]);
            }
            (Phase::Joining, true) => {
                self.replacing.remove(&node);
                self.report.disks_replaced += 1;
                self.record(&[0xD3, node]);
                return;
            }
            _ => {}
        }
        self.schedule(self.now() + STEP_NS, Event::Replace { node });
    }

    /// The cell's leader with the highest term among the nodes that are up, and its view of the cell.
    fn leader_of(&self, cell: CellId) -> Option<(NodeId, CellStatus)> {
        let leaders = self.nodes.keys().filter_map(|&node| {
            let status = self.cell_status(node, cell)?;
            (status.role == "leader").then_some((node, status))
        });
        leaders.max_by_key(|(_, status)| status.term)
    }

    fn cell_status(&self, node: NodeId, cell: CellId) -> Option<CellStatus> {
        let stepped = self.nodes.get(&node)?.as_ref()?;
        stepped.status().cells().into_iter().find(|status| status.cell == cell)
    }

    /// Nodes whose disk is out of service (not to be restarted as they are).
    pub(crate) fn disks_out(&self) -> BTreeSet<NodeId> {
        self.replacing.iter().filter(|(_, &phase)| phase == Phase::Removing).map(|(&node, _)| node).collect()
    }
}
