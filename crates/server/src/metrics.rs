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
    pub accounts: Gauge,
    pub pending_open: Gauge,
    pub transfers_uncheckpointed: Gauge,
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
        let accounts = Gauge::default();
        registry.register("accounts", "Accounts in the ledger", accounts.clone());
        let pending_open = Gauge::default();
        registry.register("pending_open", "Open pending transfers", pending_open.clone());
        let transfers_uncheckpointed = Gauge::default();
        registry.register(
            "transfers_uncheckpointed",
            "Transfers applied since the last checkpoint (held in memory)",
            transfers_uncheckpointed.clone(),
        );
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
            accounts,
            pending_open,
            transfers_uncheckpointed,
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

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
