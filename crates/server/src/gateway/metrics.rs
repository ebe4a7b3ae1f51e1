//! Prometheus metrics of a gateway, served at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    /// `ok`, or the error code the client was answered with.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CellLabels {
    pub cell: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub cell: u64,
    /// `ok`, `not_leader`, `misrouted`, `refused` (nothing applied) or `no_answer` (outcome unknown).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// `not_leader`, `refused` (nothing applied), `no_answer` (outcome unknown: resent with the same events).
    pub reason: &'static str,
}

pub struct GatewayMetrics {
    registry: Registry,
    /// Client requests by operation and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Parts of client requests, by the cell they are for.
    pub parts: Family<CellLabels, Counter>,
    /// Calls to the cells' leaders, by cell and outcome.
    pub calls: Family<CallLabels, Counter>,
    /// Parts refused `misrouted` by a cell.
    pub misroutes: Counter,
    /// Calls resent, by reason.
    pub retries: Family<RetryLabels, Counter>,
    /// Events per call to a cell (a combined call carries several parts).
    pub batch_events: Histogram,
    /// Client parts per call to a cell.
    pub batch_parts: Histogram,
    /// Parts waiting to be combined, per cell (creates of both kinds).
    pub queue_parts: Family<CellLabels, Gauge>,
    /// The version of the routing table the gateway routes by.
    pub routing_version: Gauge,
    /// Routing tables fetched (watch answers and refreshes after a misroute).
    pub routing_fetches: Counter,
}

impl Default for GatewayMetrics {
    fn default() -> GatewayMetrics {
        GatewayMetrics::new()
    }
}

impl GatewayMetrics {
    pub fn new() -> GatewayMetrics {
        let mut registry = Registry::with_prefix("cellpay_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Client requests by operation and outcome", requests.clone());
        let parts = Family::<CellLabels, Counter>::default();
        registry.register("parts", "Parts of client requests sent toward each cell", parts.clone());
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("calls", "Calls to the cells' leaders by outcome", calls.clone());
        let misroutes = Counter::default();
        registry.register("misroutes", "Parts refused misrouted by a cell", misroutes.clone());
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register("retries", "Calls resent to a cell, by reason", retries.clone());
        let batch_events = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register("batch_events", "Events per call to a cell", batch_events.clone());
        let batch_parts = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        registry.register("batch_parts", "Client parts combined into one call to a cell", batch_parts.clone());
        let queue_parts = Family::<CellLabels, Gauge>::default();
        registry.register("queue_parts", "Parts waiting to be combined, per cell", queue_parts.clone());
        let routing_version = Gauge::default();
        registry.register(
            "routing_version",
            "The routing table version the gateway routes by",
            routing_version.clone(),
        );
        let routing_fetches = Counter::default();
        registry.register("routing_fetches", "Routing tables fetched from the nodes", routing_fetches.clone());
        GatewayMetrics {
            registry,
            requests,
            parts,
            calls,
            misroutes,
            retries,
            batch_events,
            batch_parts,
            queue_parts,
            routing_version,
            routing_fetches,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
