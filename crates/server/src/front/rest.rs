//! The REST API, exactly as `cellpay_api::OPENAPI_JSON` describes it: JSON
//! bodies in and out, decoded and encoded by `cellpay_api::json`.
//!
//! A request body is read whole, up to `json::BODY_BYTES_MAX` (413
//! `body_too_large` above; see [`JsonBody`]), decoded (400 with the field and
//! the event named), and submitted; business outcomes are per-event results in
//! a 200 reply.
//!
//! [`router`] serves what every backend serves (the six ledger operations,
//! `/metrics`, `/health`, `/openapi.json`, the routing watch);
//! [`node_router`] adds a node's own endpoints (its status and the
//! operator's changes).

use axum::body::Bytes;
use axum::extract::{FromRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cellpay_api::json::{
    self, AccountsJson, BalancesJson, CreateResultsJson, ErrorBodyJson, TransfersJson, BODY_BYTES_MAX,
};
use cellpay_api::{DecodeError, ErrorCode, OPENAPI_JSON};
use std::time::Duration;

use axum::extract::Query;
use cellpay_cluster::ledgers::{LedgerDefinition, LedgerTable};
use cellpay_cluster::routing::{RoutingChange, RoutingTable};
use cellpay_cluster::topology::{shard_ranges, Topology, GLOBAL_CELL};
use cellpay_cluster::topology_table::TopologyTable;
use http_body_util::BodyExt;

use super::backend::{Backend, Caller, FrontError};
use super::{error_response, record_events};
use crate::node::{MembershipChange, NodeError, NodeHandle, Reply, Request};

/// The content type of `GET /metrics`: prometheus-client writes the OpenMetrics text format.
pub(super) const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The routes every backend serves, then the backend's own.
pub(super) fn router<B: Backend>(backend: B) -> Router {
    let own = backend.routes();
    Router::new()
        .route("/v1/accounts", post(create_accounts::<B>))
        .route("/v1/transfers", post(create_transfers::<B>))
        .route("/v1/accounts/lookup", post(lookup_accounts::<B>))
        .route("/v1/transfers/lookup", post(lookup_transfers::<B>))
        .route("/v1/accounts/transfers", post(get_account_transfers::<B>))
        .route("/v1/accounts/balances", post(get_account_balances::<B>))
        .route("/metrics", get(metrics::<B>))
        .route("/health", get(health::<B>))
        .route("/v1/cluster/routing", get(cluster_routing::<B>))
        .route("/openapi.json", get(openapi))
        .with_state(backend)
        .merge(own)
}

/// A node's own endpoints: its view of the cluster and the operator's changes.
pub(super) fn node_router(handle: NodeHandle) -> Router {
    Router::new()
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/cluster/routing", post(cluster_routing_change))
        .route("/v1/cluster/ownership", post(cluster_ownership))
        .route("/v1/cluster/drain", post(cluster_drain))
        .route("/v1/cluster/membership", post(cluster_membership))
        .route("/v1/cluster/ledgers", get(cluster_ledgers).post(cluster_define_ledger))
        .route("/v1/cluster/topology", get(cluster_topology).post(cluster_change_topology))
        .with_state(handle)
}

async fn create_accounts<B: Backend>(State(backend): State<B>, JsonBody(body): JsonBody) -> Response {
    call(&backend, json::decode_create_accounts(&body).map(Request::CreateAccounts)).await
}

async fn create_transfers<B: Backend>(State(backend): State<B>, JsonBody(body): JsonBody) -> Response {
    call(&backend, json::decode_create_transfers(&body).map(Request::CreateTransfers)).await
}

async fn lookup_accounts<B: Backend>(State(backend): State<B>, JsonBody(body): JsonBody) -> Response {
    call(&backend, json::decode_lookup_ids(&body).map(Request::LookupAccounts)).await
}

async fn lookup_transfers<B: Backend>(State(backend): State<B>, JsonBody(body): JsonBody) -> Response {
    call(&backend, json::decode_lookup_ids(&body).map(Request::LookupTransfers)).await
}

async fn get_account_transfers<B: Backend>(State(backend): State<B>, JsonBody(body): JsonBody) -> Response {
    call(&backend, json::decode_account_filter(&body).map(Request::GetAccountTransfers)).await
}

async fn get_account_balances<B: Backend>(State(backend): State<B>, JsonBody(body): JsonBody) -> Response {
    call(&backend, json::decode_account_filter(&body).map(Request::GetAccountBalances)).await
}

/// Submits a decoded request and answers with its reply or its error.
async fn call<B: Backend>(backend: &B, decoded: Result<Request, DecodeError>) -> Response {
    let request = match decoded {
        Ok(request) => request,
        Err(error) => return decode_error_response(&error),
    };
    record_events(&request);
    match backend.submit(request, Caller::Client).await {
        Ok(reply) => reply_response(&reply),
        Err(error) => error_response(error.code(), error.to_string()),
    }
}

/// Each reply has one JSON shape, whatever request it answers.
fn reply_response(reply: &Reply) -> Response {
    match reply {
        Reply::CreateAccounts(results) => Json(CreateResultsJson::from_account_results(results)).into_response(),
        Reply::CreateTransfers(results) => Json(CreateResultsJson::from_transfer_results(results)).into_response(),
        Reply::Accounts(accounts) => Json(AccountsJson::from_ledger(accounts)).into_response(),
        Reply::Transfers(transfers) => Json(TransfersJson::from_ledger(transfers)).into_response(),
        Reply::Balances(balances) => Json(BalancesJson::from_ledger(balances)).into_response(),
        Reply::RoutingChanged(table) => Json(routing_json(table)).into_response(),
        Reply::ShardOwnership => Json(serde_json::json!({"changed": true})).into_response(),
        Reply::LedgersChanged(table) => Json(ledgers_json(table)).into_response(),
        Reply::TopologyChanged(table) => Json(topology_json(table)).into_response(),
    }
}

fn decode_error_response(error: &DecodeError) -> Response {
    let status = StatusCode::from_u16(error.code().http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(ErrorBodyJson::from_decode_error(error))).into_response()
}

async fn metrics<B: Backend>(State(backend): State<B>) -> Response {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], backend.metrics_text()).into_response()
}

async fn health<B: Backend>(State(backend): State<B>) -> Response {
    match backend.health() {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "ok").into_response(),
        Err(reason) => error_response(ErrorCode::Overloaded, reason),
    }
}

/// `{"region": "shanghai", "drained": true}`: move every leader this node
/// holds out of the region and keep them out (`false`: let them return).
async fn cluster_drain(State(handle): State<NodeHandle>, JsonBody(body): JsonBody) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Drain {
        region: String,
        drained: bool,
    }
    let drain: Drain = match operator_json(&body) {
        Ok(drain) => drain,
        Err(refused) => return *refused,
    };
    if !handle.topology().regions.iter().any(|region| region.name == drain.region) {
        return error_response(ErrorCode::InvalidJson, format!("unknown region {:?}", drain.region));
    }
    match handle.set_region_drained(&drain.region, drain.drained) {
        Ok(()) => Json(serde_json::json!({"region": drain.region, "drained": drain.drained})).into_response(),
        Err(error) => error_response(error.code(), error.to_string()),
    }
}

/// `{"cell": 1, "add_learners": [6], "add_voters": [], "remove": [3]}`:
/// proposes one membership change of the cell (all its steps together, by
/// joint consensus). This node must lead the cell; else the error names the
/// leader. Answers once proposed: the change is in effect when the cell's
/// status shows it.
async fn cluster_membership(State(handle): State<NodeHandle>, JsonBody(body): JsonBody) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Membership {
        cell: u64,
        #[serde(default)]
        add_learners: Vec<u64>,
        #[serde(default)]
        add_voters: Vec<u64>,
        #[serde(default)]
        remove: Vec<u64>,
    }
    let request: Membership = match operator_json(&body) {
        Ok(request) => request,
        Err(refused) => return *refused,
    };
    let changes: Vec<MembershipChange> = (request.add_learners.iter().map(|&n| MembershipChange::AddLearner(n)))
        .chain(request.add_voters.iter().map(|&n| MembershipChange::AddVoter(n)))
        .chain(request.remove.iter().map(|&n| MembershipChange::Remove(n)))
        .collect();
    let topology = handle.topology();
    if changes.is_empty() || changes.len() > 16 {
        return error_response(ErrorCode::InvalidJson, "a membership change has 1 to 16 steps");
    }
    let unknown = changes.iter().find_map(|change| {
        let (MembershipChange::AddLearner(node) | MembershipChange::AddVoter(node) | MembershipChange::Remove(node)) =
            *change;
        topology.node(node).is_none().then_some(node)
    });
    if let Some(node) = unknown {
        return error_response(ErrorCode::InvalidJson, format!("node {node} is not in the topology"));
    }
    match handle.change_membership(request.cell, changes).await {
        Ok(()) => Json(serde_json::json!({"cell": request.cell, "proposed": true})).into_response(),
        Err(error) => error_response(error.code(), error.to_string()),
    }
}

/// The routing table this backend routes by: its version and each cell's
/// shards, as ranges in the topology file's syntax, and each shard's owner.
///
/// A watch: with `?newer_than=V`, the answer waits until the backend knows
/// a table newer than version V, or `wait_ms` passes (default and most
/// 25,000), then gives the table it has; a gateway polls again with the
/// version it got. Each node answers with its own replica of the global
/// cell's table (a read inside the caller's region; a stale table costs a
/// `misrouted` refusal, never a wrong write); a gateway with the table it
/// routes by.
async fn cluster_routing<B: Backend>(State(backend): State<B>, Query(watch): Query<Watch>) -> Response {
    let table = wait_newer(backend.routing_watch(), &watch, RoutingTable::version, || backend.is_running()).await;
    Json(routing_json(&table)).into_response()
}

/// A watch's answer: the value as soon as its version is newer than
/// `newer_than`, or when `wait_ms` (at most 25 s) passes; at once without
/// `newer_than`. Timing out, or the backend stopping (checked every slice,
/// so a watch never holds up a shutdown), answers with the value as it is.
async fn wait_newer<T>(
    mut receiver: tokio::sync::watch::Receiver<std::sync::Arc<T>>,
    watch: &Watch,
    version: impl Fn(&T) -> u64,
    running: impl Fn() -> bool,
) -> std::sync::Arc<T> {
    if let Some(newer_than) = watch.newer_than {
        let wait = Duration::from_millis(watch.wait_ms.unwrap_or(ROUTING_WAIT_MS_MAX).min(ROUTING_WAIT_MS_MAX));
        let deadline = tokio::time::Instant::now() + wait;
        while running() {
            let slice = deadline.saturating_duration_since(tokio::time::Instant::now()).min(ROUTING_WAIT_SLICE);
            if slice.is_zero() {
                break;
            }
            let newer = tokio::time::timeout(slice, receiver.wait_for(|value| version(value) > newer_than)).await;
            if newer.is_ok() {
                break;
            }
        }
    }
    let value = receiver.borrow().clone();
    value
}

/// The longest a routing watch waits: under the front end's 30 s request
/// timeout. Each open watch is one request in flight (`FrontLimits`).
const ROUTING_WAIT_MS_MAX: u64 = 25_000;
/// How often a waiting watch checks whether the node is stopping.
const ROUTING_WAIT_SLICE: Duration = Duration::from_millis(500);

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Watch {
    newer_than: Option<u64>,
    wait_ms: Option<u64>,
}

/// `{"expected_version": 3, "shard": 42, "to": 2}`: names cell `to` as the
/// owner of the shard in the routing table, if the table is still at
/// `expected_version` (else 409 `conflict`). Served by the global cell's
/// leader (else 503 naming it). One step of `cellpay ctl routing move`,
/// which releases the shard from its old owner first.
async fn cluster_routing_change(State(handle): State<NodeHandle>, JsonBody(body): JsonBody) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Change {
        expected_version: u64,
        shard: u32,
        to: u64,
    }
    let change: Change = match operator_json(&body) {
        Ok(change) => change,
        Err(refused) => return *refused,
    };
    let request = Request::ChangeRouting {
        expected_version: change.expected_version,
        change: RoutingChange::MoveShard { shard: change.shard, to: change.to },
    };
    admin_response(handle.submit_admin(request).await)
}

/// The ledger definitions as this node's replica of the global cell has
/// applied them; `?newer_than=V` waits (up to 25 s, or `wait_ms`) for a
/// newer version, as the routing watch does.
async fn cluster_ledgers(State(handle): State<NodeHandle>, Query(watch): Query<Watch>) -> Response {
    let watched = handle.status().ledgers_watch();
    let table = wait_newer(watched, &watch, LedgerTable::version, || handle.is_running()).await;
    Json(ledgers_json(&table)).into_response()
}

/// `{"expected_version": 1, "id": 840, "name": "USD", "asset_scale": 2}`:
/// defines a ledger if the definitions are still at `expected_version` (else
/// 409 `conflict`; a ledger already defined is 409 too: a definition is
/// final). Served by the global cell's leader (else 503 naming it). Every
/// cell adopts it into its own log within a second (`ledgers_version` in
/// `/v1/cluster/status`); `ctl ledgers define` waits for that.
async fn cluster_define_ledger(State(handle): State<NodeHandle>, JsonBody(body): JsonBody) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Define {
        expected_version: u64,
        id: u32,
        name: String,
        asset_scale: u8,
    }
    let define: Define = match operator_json(&body) {
        Ok(define) => define,
        Err(refused) => return *refused,
    };
    let definition = LedgerDefinition { id: define.id, name: define.name, asset_scale: define.asset_scale };
    admin_response(
        handle.submit_admin(Request::DefineLedger { expected_version: define.expected_version, definition }).await,
    )
}

/// The topology the global cell holds, as this node's replica has applied
/// it (what the node places leaders by): `{"version": V, "topology": "<the
/// file's text>", "leader_preference": {"1": ["hz-a", ...], ...}}`;
/// `?newer_than=V` is a watch, as for the routing table.
async fn cluster_topology(State(handle): State<NodeHandle>, Query(watch): Query<Watch>) -> Response {
    let watched = handle.status().topology_watch();
    let table = wait_newer(watched, &watch, TopologyTable::version, || handle.is_running()).await;
    Json(topology_json(&table)).into_response()
}

/// `{"expected_version": 1, "topology": "<a cluster file>"}`: the global
/// cell's topology becomes this one if it is still at `expected_version`
/// (else 409 `conflict`) and differs from it only in cells'
/// `leader_preference` (else 409, naming what differs). 400 if the file is
/// invalid. Served by the global cell's leader (else 503 naming it); leaders
/// move to their new preferred datacenters within seconds.
async fn cluster_change_topology(State(handle): State<NodeHandle>, JsonBody(body): JsonBody) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Change {
        expected_version: u64,
        topology: String,
    }
    let change: Change = match operator_json(&body) {
        Ok(change) => change,
        Err(refused) => return *refused,
    };
    let topology = match Topology::parse(&change.topology) {
        Ok(topology) => std::sync::Arc::new(topology),
        Err(error) => return error_response(ErrorCode::InvalidJson, format!("topology: {error}")),
    };
    let request = Request::ChangeTopology { expected_version: change.expected_version, topology };
    admin_response(handle.submit_admin(request).await)
}

fn topology_json(table: &TopologyTable) -> serde_json::Value {
    let topology = table.topology();
    let preferences: serde_json::Map<String, serde_json::Value> =
        topology.cells.iter().map(|cell| (cell.id.to_string(), serde_json::json!(cell.leader_preference))).collect();
    serde_json::json!({
        "version": table.version(),
        "topology": topology.to_toml(),
        "leader_preference": preferences,
    })
}

fn ledgers_json(table: &LedgerTable) -> serde_json::Value {
    let ledgers: Vec<serde_json::Value> = table
        .definitions()
        .map(|ledger| serde_json::json!({"id": ledger.id, "name": ledger.name, "asset_scale": ledger.asset_scale}))
        .collect();
    serde_json::json!({"version": table.version(), "ledgers": ledgers})
}

/// `{"cell": 1, "shard": 42, "owned": false}`: the cell releases the shard
/// (refused with 409 `conflict` while it holds accounts of it) or acquires
/// it (refused unless the routing table names the cell as its owner).
/// Served by the cell's leader (else 503 naming it).
async fn cluster_ownership(State(handle): State<NodeHandle>, JsonBody(body): JsonBody) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ownership {
        cell: u64,
        shard: u32,
        owned: bool,
    }
    let ownership: Ownership = match operator_json(&body) {
        Ok(ownership) => ownership,
        Err(refused) => return *refused,
    };
    if ownership.cell == GLOBAL_CELL || handle.topology().cell(ownership.cell).is_none() {
        return error_response(ErrorCode::InvalidJson, format!("cell {} is not a cell of shards", ownership.cell));
    }
    let request = Request::ShardOwnership { cell: ownership.cell, shard: ownership.shard, owned: ownership.owned };
    admin_response(handle.submit_admin(request).await)
}

/// An operator endpoint's JSON body, or its `invalid_json` refusal.
fn operator_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|error| Box::new(error_response(ErrorCode::InvalidJson, error.to_string())))
}

fn admin_response(result: Result<Reply, NodeError>) -> Response {
    match result {
        Ok(reply) => reply_response(&reply),
        Err(error) => error_response(error.code(), error.to_string()),
    }
}

fn routing_json(routing: &RoutingTable) -> serde_json::Value {
    let cells: Vec<serde_json::Value> = routing
        .shards_by_cell()
        .into_iter()
        .map(|(cell, shards)| serde_json::json!({"cell": cell, "shards": shard_ranges(&shards)}))
        .collect();
    let owners: Vec<u64> = (0..routing.shards()).filter_map(|shard| routing.owner(shard)).collect();
    serde_json::json!({"version": routing.version(), "shards": routing.shards(), "cells": cells, "owners": owners})
}

/// This node's view of the cluster: where it is, every cell it hosts (role,
/// leader, term, commit and applied index, log, state hash) and its links.
async fn cluster_status(State(handle): State<NodeHandle>) -> Response {
    let topology = handle.topology();
    let node = handle.node();
    let location = topology.location(node);
    let cells: Vec<serde_json::Value> = handle
        .status()
        .cells()
        .into_iter()
        .map(|cell| {
            serde_json::json!({
                "cell": cell.cell,
                "role": cell.role,
                "leader": cell.leader,
                "term": cell.term,
                "commit_index": cell.commit,
                "applied_index": cell.applied,
                "log_first_index": cell.log_first,
                "log_last_index": cell.log_last,
                "log_bytes": cell.log_bytes,
                "checkpoint_index": cell.checkpoint_index,
                "elections_won": cell.elections,
                "snapshots_installed": cell.snapshots_installed,
                "voters": cell.voters,
                "learners": cell.learners,
                "accounts": cell.accounts,
                "state_hash": format!("{:016x}", cell.state_hash),
                "state_hash_index": cell.state_hash_index,
                "ledgers_version": cell.ledgers_version,
            })
        })
        .collect();
    let peers: Vec<serde_json::Value> = handle
        .status()
        .peers()
        .into_iter()
        .map(|peer| serde_json::json!({"node": peer.node, "connected": peer.connected}))
        .collect();
    Json(serde_json::json!({
        "node": node,
        "region": location.as_ref().map(|l| l.region),
        "datacenter": location.as_ref().map(|l| l.datacenter),
        "cells": cells,
        "peers": peers,
    }))
    .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

/// A refused body up to this size is still read (and thrown away) before the
/// 413 is sent: a client that sends its whole body before reading the reply
/// would otherwise find the connection reset and never see the 413.
const REFUSED_BODY_DRAIN_BYTES_MAX: usize = 2 * BODY_BYTES_MAX;

/// A request body read whole, at most `BODY_BYTES_MAX` bytes. Refusals are
/// JSON error replies: 413 `body_too_large`, or 400 when the body cannot be read.
struct JsonBody(Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = Response;

    async fn from_request(request: axum::extract::Request, _state: &S) -> Result<JsonBody, Response> {
        let length = content_length(request.headers());
        if let Some(bytes) = length.filter(|bytes| *bytes > BODY_BYTES_MAX) {
            // With `Expect: 100-continue` the client waits for us: answer before it sends anything.
            if !expects_continue(request.headers()) && bytes <= REFUSED_BODY_DRAIN_BYTES_MAX {
                drain(request.into_body(), 0).await;
            }
            return Err(decode_error_response(&DecodeError::BodyTooLarge { bytes, bytes_max: BODY_BYTES_MAX }));
        }
        let mut body = request.into_body();
        let mut buffer = Vec::with_capacity(length.unwrap_or(0));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| {
                error_response(ErrorCode::InvalidJson, format!("could not read the request body: {error}"))
            })?;
            let Ok(data) = frame.into_data() else { continue };
            if buffer.len() + data.len() > BODY_BYTES_MAX {
                // A body without a length (chunked, or HTTP/2) that runs past the limit.
                let bytes = drain(body, buffer.len() + data.len()).await;
                let message = match bytes {
                    Some(bytes) => DecodeError::BodyTooLarge { bytes, bytes_max: BODY_BYTES_MAX }.to_string(),
                    None => format!("request body is more than the {BODY_BYTES_MAX} bytes allowed"),
                };
                return Err(error_response(ErrorCode::BodyTooLarge, message));
            }
            buffer.extend_from_slice(&data);
        }
        Ok(JsonBody(Bytes::from(buffer)))
    }
}

/// Reads and discards the rest of a refused body, `bytes_read` bytes of which
/// were already read, up to `REFUSED_BODY_DRAIN_BYTES_MAX` in all. Returns the
/// body's size if it was read to its end.
async fn drain(mut body: axum::body::Body, bytes_read: usize) -> Option<usize> {
    let mut bytes = bytes_read;
    while bytes <= REFUSED_BODY_DRAIN_BYTES_MAX {
        match body.frame().await {
            None => return Some(bytes),
            Some(Err(_)) => return None,
            Some(Ok(frame)) => bytes = bytes.saturating_add(frame.data_ref().map_or(0, Bytes::len)),
        }
    }
    None
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers.get(header::EXPECT).is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}
