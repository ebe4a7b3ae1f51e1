//! Prometheus metrics of a node, served at `GET /metrics`.
//!
//! Per-event counters are aggregated per batch before they touch a metric, so
//! the hot path pays one increment per distinct result code, not per event.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    /// `ok`, or why the request was refused as a whole (`overloaded`, `invalid`, ...).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub operation: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CellLabels {
    pub cell: u64,
}

/// Per-cell gauges, one family each, labelled by cell.
#[derive(Default)]
pub struct CellMetrics {
    /// 1 if this node's replica is the cell's leader.
    pub is_leader: Family<CellLabels, Gauge>,
    /// The leader's node id as this replica knows it (0: none known).
    pub leader: Family<CellLabels, Gauge>,
    pub term: Family<CellLabels, Gauge>,
    pub commit_index: Family<CellLabels, Gauge>,
    pub applied_index: Family<CellLabels, Gauge>,
    /// Committed entries not yet applied.
    pub apply_lag: Family<CellLabels, Gauge>,
    pub log_entries: Family<CellLabels, Gauge>,
    pub log_bytes: Family<CellLabels, Gauge>,
    pub checkpoint_index: Family<CellLabels, Gauge>,
    /// Elections this replica won since the process started.
    pub elections_won: Family<CellLabels, Gauge>,
    pub accounts: Family<CellLabels, Gauge>,
    pub pending_open: Family<CellLabels, Gauge>,
    pub transfers_uncheckpointed: Family<CellLabels, Gauge>,
    /// Cross-cell operations this cell coordinates, not yet decided or acknowledged.
    pub cross_operations: Family<CellLabels, Gauge>,
    /// Prepared operations and tombstones this cell holds as a participant.
    pub cross_parts: Family<CellLabels, Gauge>,
    /// Open cross-cell pending transfers this cell holds (coordinates).
    pub cross_holds: Family<CellLabels, Gauge>,
    /// Releases of held transfers not yet applied by the other cell.
    pub cross_releases: Family<CellLabels, Gauge>,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub events: Family<EventLabels, Counter>,
    pub batch_events: Family<OperationLabels, Histogram>,
    /// From a request's arrival in the queue to its reply: queueing, fsync and apply.
    pub commit_seconds: Histogram,
    pub fsync_seconds: Histogram,
    pub group_requests: Histogram,
    pub checkpoint_seconds: Histogram,
    pub cells: CellMetrics,
    pub wal_op_last: Gauge,
    pub queue_requests: Gauge,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 50 µs .. ~26 s.
    exponential_buckets(0.000_05, 2.0, 20)
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cellpay");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests by operation and outcome", requests.clone());
        let events = Family::<EventLabels, Counter>::default();
        registry.register("events", "Events by operation and result code", events.clone());
        let batch_events = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 2.0, 14))
        });
        registry.register("batch_events", "Events per request", batch_events.clone());
        let commit_seconds = Histogram::new(seconds_buckets());
        registry.register(
            "commit_seconds",
            "Request latency inside the node: queue, fsync, apply",
            commit_seconds.clone(),
        );
        let fsync_seconds = Histogram::new(seconds_buckets());
        registry.register(
            "fsync_seconds",
            "Write-ahead log sync latency (one per group commit)",
            fsync_seconds.clone(),
        );
        let group_requests = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register("group_requests", "Requests per group commit", group_requests.clone());
        let checkpoint_seconds = Histogram::new(seconds_buckets());
        registry.register("checkpoint_seconds", "Checkpoint write latency", checkpoint_seconds.clone());
        let cells = CellMetrics::default();
        let cell_gauges: [(&str, &str, &Family<CellLabels, Gauge>); 17] = [
            ("cell_is_leader", "1 if this node's replica leads the cell", &cells.is_leader),
            ("cell_leader", "The cell's leader node as this replica knows it (0: none)", &cells.leader),
            ("cell_term", "The cell's Raft term", &cells.term),
            ("cell_commit_index", "The cell's committed log index", &cells.commit_index),
            ("cell_applied_index", "The cell's log index applied to the ledger", &cells.applied_index),
            ("cell_apply_lag", "Committed entries not yet applied", &cells.apply_lag),
            ("cell_log_entries", "Log entries held (after the last compaction)", &cells.log_entries),
            ("cell_log_bytes", "Bytes of log entries held", &cells.log_bytes),
            ("cell_checkpoint_index", "Log index covered by the cell's last checkpoint", &cells.checkpoint_index),
            ("cell_elections_won", "Elections this replica won since the process started", &cells.elections_won),
            ("cell_accounts", "Accounts in the cell's ledger", &cells.accounts),
            ("cell_pending_open", "Open pending transfers in the cell", &cells.pending_open),
            (
                "cell_transfers_uncheckpointed",
                "Transfers applied since the cell's last checkpoint (held in memory)",
                &cells.transfers_uncheckpointed,
            ),
            ("cell_cross_operations", "Cross-cell operations coordinated, in flight", &cells.cross_operations),
            ("cell_cross_parts", "Cross-cell operations prepared (or tombstoned) as a participant", &cells.cross_parts),
            ("cell_cross_holds", "Open cross-cell pending transfers held as coordinator", &cells.cross_holds),
            (
                "cell_cross_releases",
                "Releases of held transfers not yet applied by the other cell",
                &cells.cross_releases,
            ),
        ];
        for (name, help, family) in cell_gauges {
            registry.register(name, help, family.clone());
        }
        let wal_op_last = Gauge::default();
        registry.register("wal_op_last", "Last write-ahead log op", wal_op_last.clone());
        let queue_requests = Gauge::default();
        registry.register("queue_requests", "Requests waiting in the node's queue", queue_requests.clone());
        Metrics {
            registry,
            requests,
            events,
            batch_events,
            commit_seconds,
            fsync_seconds,
            group_requests,
            checkpoint_seconds,
            cells,
            wal_op_last,
            queue_requests,
        }
    }

    pub fn request(&self, operation: &'static str, outcome: &'static str) {
        self.requests.get_or_create(&RequestLabels { operation, outcome }).inc();
    }

    /// Counts a batch's results: one increment per distinct code.
    pub fn results<C: Copy + Ord>(&self, operation: &'static str, results: &[C], name: impl Fn(C) -> &'static str) {
        let mut sorted: Vec<C> = results.to_vec();
        sorted.sort_unstable();
        for group in sorted.chunk_by(|a, b| a == b) {
            let labels = EventLabels { operation, result: name(group[0]) };
            self.events.get_or_create(&labels).inc_by(group.len() as u64);
        }
        self.batch_events.get_or_create(&OperationLabels { operation }).observe(results.len() as f64);
    }

    /// Publishes a cell's gauges.
    pub fn cell(
        &self,
        status: &crate::node::CellStatus,
        pending_open: usize,
        transfers_uncheckpointed: usize,
        cross: crate::cross_cell::Counts,
    ) {
        let labels = CellLabels { cell: status.cell };
        let set = |family: &Family<CellLabels, Gauge>, value: u64| {
            family.get_or_create(&labels).set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        let cells = &self.cells;
        set(&cells.is_leader, u64::from(status.role == "leader"));
        set(&cells.leader, status.leader.unwrap_or(0));
        set(&cells.term, status.term);
        set(&cells.commit_index, status.commit);
        set(&cells.applied_index, status.applied);
        set(&cells.apply_lag, status.commit.saturating_sub(status.applied));
        set(&cells.log_entries, (status.log_last + 1).saturating_sub(status.log_first));
        set(&cells.log_bytes, status.log_bytes);
        set(&cells.checkpoint_index, status.checkpoint_index);
        set(&cells.elections_won, status.elections);
        set(&cells.accounts, status.accounts as u64);
        set(&cells.pending_open, pending_open as u64);
        set(&cells.transfers_uncheckpointed, transfers_uncheckpointed as u64);
        set(&cells.cross_operations, cross.operations as u64);
        set(&cells.cross_parts, cross.parts as u64);
        set(&cells.cross_holds, cross.holds as u64);
        set(&cells.cross_releases, cross.releases as u64);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
