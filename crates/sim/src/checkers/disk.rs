//! Disk: a damaged log is never accepted as it is. When a crash flipped a
//! bit of what a node's log had fsynced, the node's next start must either
//! refuse, naming the damage (the simulator then replaces the disk), or have
//! cut the damage as a torn tail: a flipped bit in the last record cannot be
//! told from a torn write (counted; see ARCHITECTURE.md's known limits).
//! Starting as if nothing happened is a failure.

use cellpay_cluster::topology::NodeId;
use cellpay_server::node::{RecoveryReport, StartError};
use cellpay_server::raft_log::NodeLogError;
use cellpay_storage::wal::WalError;

use super::Failure;

/// What a start on a damaged log did.
pub(crate) enum Outcome {
    /// Recovery refused to start, naming the damage.
    Caught,
    /// Recovery cut the damaged last record as a torn tail.
    CutAsTorn,
}

/// Whether a start failed because recovery found damage in the log.
fn is_damage(error: &StartError) -> bool {
    matches!(error, StartError::Log(NodeLogError::Wal(WalError::Corrupt { .. }) | NodeLogError::Record { .. }))
}

/// Judges a start of `node` on a log with a flipped bit; an error this check
/// does not recognise (`Err(None)`) is the caller's to report.
pub(crate) fn check_start(
    node: NodeId,
    start: Result<&RecoveryReport, &StartError>,
) -> Result<Outcome, Option<Failure>> {
    match start {
        Err(error) if is_damage(error) => Ok(Outcome::Caught),
        Err(_) => Err(None),
        Ok(recovery) if recovery.torn_tail_bytes_cut > 0 => Ok(Outcome::CutAsTorn),
        Ok(_) => Err(Some(Failure::new(
            "disk",
            format!("node {node} started on a log with a flipped bit and did not notice"),
        ))),
    }
}
