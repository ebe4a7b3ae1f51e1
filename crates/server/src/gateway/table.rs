//! The routing table a gateway routes by: the topology's (version 1) until
//! a node answers, then every newer version the nodes publish.
//!
//! - **The watch** keeps one long poll open on a node
//!   (`GET /v1/cluster/routing?newer_than=V&wait_ms=W`): a node answers as
//!   soon as it applies a newer table, or after `W` with the one it has. A
//!   node that does not answer is left for the next one, the gateway's
//!   region first.
//! - **A refresh** follows a `misrouted` refusal: it asks the nodes (the one
//!   that refused first) for a table at least as new as the version the
//!   refusal named. One refresh runs at a time; callers that wait for it
//!   find the table already new enough.
//!
//! The table only moves forward: an answer older than the table held (a
//! node that lags) is ignored. A table whose shard count or owners do not
//! fit the topology file is refused (a node of another cluster).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cellpay_cluster::routing::RoutingTable;
use cellpay_cluster::topology::{NodeId, Topology, GLOBAL_CELL};
use tokio::sync::watch;
use tokio::time::Instant;

use super::metrics::GatewayMetrics;

/// How long one watch waits at a node (under the nodes' 25 s cap).
const WATCH_WAIT_MS: u64 = 20_000;
/// The margin past the wait before a watch call is given up.
const WATCH_CALL_MARGIN: Duration = Duration::from_secs(5);
/// The pause before the watch asks the next node, doubling up to `WATCH_RETRY_DELAY_MAX`.
const WATCH_RETRY_DELAY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_DELAY_MAX: Duration = Duration::from_secs(2);
/// How long one node may take to answer a refresh.
const REFRESH_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a refresh waits at a node for the version it needs.
const REFRESH_WAIT_MS: u64 = 500;

#[derive(serde::Deserialize)]
struct TableJson {
    version: u64,
    owners: Vec<u64>,
}

pub(super) struct Table {
    topology: Arc<Topology>,
    /// The nodes in the order they are asked: the gateway's region first.
    nodes: Vec<NodeId>,
    sender: watch::Sender<Arc<RoutingTable>>,
    /// Whether a node has answered yet (the gateway is ready).
    heard: AtomicBool,
    refreshing: tokio::sync::Mutex<()>,
    http: reqwest::Client,
    metrics: Arc<GatewayMetrics>,
}

impl Table {
    pub(super) fn new(topology: Arc<Topology>, nodes: Vec<NodeId>, metrics: Arc<GatewayMetrics>) -> Table {
        let initial = RoutingTable::initial(&topology);
        metrics.routing_version.set(initial.version() as i64);
        let (sender, _) = watch::channel(Arc::new(initial));
        // No overall timeout: each call sets its own.
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(1)).build().expect("an HTTP client");
        Table {
            topology,
            nodes,
            sender,
            heard: AtomicBool::new(false),
            refreshing: tokio::sync::Mutex::new(()),
            http,
            metrics,
        }
    }

    pub(super) fn current(&self) -> Arc<RoutingTable> {
        self.sender.borrow().clone()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.sender.subscribe()
    }

    pub(super) fn heard(&self) -> bool {
        self.heard.load(Ordering::Acquire)
    }

    /// Keeps a watch open on the nodes, for ever (the gateway aborts it).
    pub(super) async fn watch(self: Arc<Self>) {
        let mut position = 0usize;
        let mut delay = WATCH_RETRY_DELAY_MIN;
        loop {
            let node = self.nodes[position % self.nodes.len()];
            let newer_than = if self.heard() { self.current().version() } else { 0 };
            let timeout = Duration::from_millis(WATCH_WAIT_MS) + WATCH_CALL_MARGIN;
            let started = Instant::now();
            match self.fetch(node, newer_than, WATCH_WAIT_MS, timeout).await {
                Ok(table) => {
                    delay = WATCH_RETRY_DELAY_MIN;
                    // Nothing newer long before the wait was over: the node
                    // is stopping (it answers at once then). Ask another.
                    let early = started.elapsed() < Duration::from_millis(WATCH_WAIT_MS / 2);
                    if !self.publish(table) && early && newer_than > 0 {
                        position += 1;
                        tokio::time::sleep(WATCH_RETRY_DELAY_MIN).await;
                    }
                }
                Err(error) => {
                    tracing::debug!(node, %error, "routing watch: asking the next node");
                    position += 1;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(WATCH_RETRY_DELAY_MAX);
                }
            }
        }
    }

    /// Fetches a table at least at `version`, asking `first` and then the
    /// others, until one has it or `deadline` passes. Returns the table held
    /// then (maybe still older: the caller decides).
    pub(super) async fn refresh_at_least(
        &self,
        version: u64,
        first: Option<NodeId>,
        deadline: Instant,
    ) -> Arc<RoutingTable> {
        let _one_at_a_time = self.refreshing.lock().await;
        let order = first.into_iter().chain(self.nodes.iter().copied().filter(|&node| Some(node) != first));
        for node in order {
            if self.current().version() >= version || Instant::now() >= deadline {
                break;
            }
            let newer_than = version.saturating_sub(1);
            match self.fetch(node, newer_than, REFRESH_WAIT_MS, REFRESH_CALL_TIMEOUT).await {
                Ok(table) => {
                    self.publish(table);
                }
                Err(error) => tracing::debug!(node, %error, "routing refresh: asking the next node"),
            }
        }
        self.current()
    }

    /// One watch call to `node`.
    async fn fetch(
        &self,
        node: NodeId,
        newer_than: u64,
        wait_ms: u64,
        timeout: Duration,
    ) -> Result<RoutingTable, String> {
        let address = self.topology.node(node).ok_or("not in the topology")?.client_address;
        let url = format!("http://{address}/v1/cluster/routing?newer_than={newer_than}&wait_ms={wait_ms}");
        let response = self.http.get(&url).timeout(timeout).send().await.map_err(|error| error.to_string())?;
        let response = response.error_for_status().map_err(|error| error.to_string())?;
        let json: TableJson = response.json().await.map_err(|error| error.to_string())?;
        self.metrics.routing_fetches.inc();
        let table = RoutingTable::from_owners(json.version, json.owners).map_err(|error| error.to_string())?;
        self.check(&table)?;
        self.heard.store(true, Ordering::Release);
        Ok(table)
    }

    /// A table must fit the topology file: its shard count, its cells.
    fn check(&self, table: &RoutingTable) -> Result<(), String> {
        if table.shards() != self.topology.shards {
            return Err(format!("{} shards, the topology has {}", table.shards(), self.topology.shards));
        }
        let foreign =
            table.shards_by_cell().into_keys().find(|&cell| cell == GLOBAL_CELL || self.topology.cell(cell).is_none());
        match foreign {
            Some(cell) => Err(format!("cell {cell} is not a cell of the topology")),
            None => Ok(()),
        }
    }

    /// Routes by `table` from now on if it is newer than the one held.
    pub(super) fn publish(&self, table: RoutingTable) -> bool {
        let version = table.version();
        let table = Arc::new(table);
        let newer = self.sender.send_if_modified(|current| {
            let newer = version > current.version();
            if newer {
                *current = table;
            }
            newer
        });
        if newer {
            tracing::info!(version, "routing table updated");
            self.metrics.routing_version.set(version as i64);
        }
        newer
    }
}
