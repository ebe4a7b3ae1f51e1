//! The demo's dashboard: a page served by the binary on loopback (static
//! assets compiled in: `assets/`), and the JSON API it polls. The API is
//! documented in `docs/DASHBOARD.md`:
//!
//! - `GET /api/state`: the whole picture (topology, nodes and links, cells
//!   and their replicas, the shard map, the workload's series, the drills);
//! - `POST /api/cut` `{"target": "region:NAME" | "datacenter:NAME"}`;
//! - `POST /api/heal`: heals, then audits (follow `drill.phase` and `drill.last`);
//! - `POST /api/switchover` `{"region": NAME, "back": false}`.
//!
//! A control answers 202 when started, 400 for a malformed request and 409
//! when the drill under way does not allow it, with `{"error": "..."}`.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cellpay_cluster::routing::RoutingTable;
use cellpay_cluster::topology::CellId;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::board::Board;
use super::drill::{Drills, Refused, Target};
use super::Cluster;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
/// A control's body is a few names; anything bigger is refused.
const BODY_BYTES_MAX: usize = 4096;

#[derive(Clone)]
struct App {
    cluster: Arc<Cluster>,
    board: Arc<Board>,
    drills: Arc<Drills>,
}

pub(super) async fn serve(
    listener: TcpListener,
    cluster: Arc<Cluster>,
    board: Arc<Board>,
    drills: Arc<Drills>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = App { cluster, board, drills };
    let router = Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX_HTML)))
        .route("/app.js", get(|| asset("text/javascript; charset=utf-8", APP_JS)))
        .route("/style.css", get(|| asset("text/css; charset=utf-8", STYLE_CSS)))
        .route("/api/state", get(state))
        .route("/api/cut", post(cut))
        .route("/api/heal", post(heal))
        .route("/api/switchover", post(switchover))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(app);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn accepted(message: String) -> Response {
    (StatusCode::ACCEPTED, Json(json!({ "ok": message }))).into_response()
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error(StatusCode::CONFLICT, self.0)
    }
}

#[derive(Deserialize)]
struct CutBody {
    target: String,
}

async fn cut(State(app): State<App>, body: Json<CutBody>) -> Response {
    let target = match Target::parse(&body.target, &app.cluster) {
        Ok(target) => target,
        Err(problem) => return error(StatusCode::BAD_REQUEST, format!("{problem:#}")),
    };
    let spec = target.spec();
    match app.drills.cut(target).await {
        Ok(()) => accepted(format!("{spec} cut off")),
        Err(refused) => refused.into_response(),
    }
}

async fn heal(State(app): State<App>) -> Response {
    if let Err(refused) = app.drills.can_heal() {
        return refused.into_response();
    }
    let drills = app.drills.clone();
    tokio::spawn(async move {
        if let Err(refused) = drills.heal().await {
            eprintln!("heal: {}", refused.0);
        }
    });
    accepted("healing, then auditing".to_string())
}

#[derive(Deserialize)]
struct SwitchoverBody {
    region: String,
    #[serde(default)]
    back: bool,
}

async fn switchover(State(app): State<App>, body: Json<SwitchoverBody>) -> Response {
    match app.drills.switchover(&body.region, body.back) {
        Ok(()) if body.back => accepted(format!("leaders may return to region {}", body.region)),
        Ok(()) => accepted(format!("moving every leader out of region {}", body.region)),
        Err(refused) => refused.into_response(),
    }
}

async fn state(State(app): State<App>) -> Json<Value> {
    Json(state_json(&app))
}

/// The page's whole picture; see `docs/DASHBOARD.md` for the fields.
fn state_json(app: &App) -> Value {
    let cluster = &app.cluster;
    let topology = &cluster.topology;
    let cut = cluster.cut_nodes();
    let regions: Vec<Value> = topology
        .regions
        .iter()
        .map(|region| {
            let datacenters: Vec<Value> = region
                .datacenters
                .iter()
                .map(|datacenter| {
                    let nodes: Vec<_> = datacenter.nodes.iter().map(|node| node.id).collect();
                    json!({ "name": datacenter.name, "nodes": nodes })
                })
                .collect();
            json!({ "name": region.name, "datacenters": datacenters })
        })
        .collect();
    let nodes: Vec<Value> = topology
        .nodes()
        .map(|spec| {
            let handle = cluster.handle(spec.id);
            let place = topology.location(spec.id).expect("a node of the topology");
            let links: Vec<Value> = handle
                .peer_links()
                .iter()
                .map(|link| json!({ "peer": link.peer, "connected": link.connected, "blocked": link.blocked }))
                .collect();
            let statuses = handle.status().cells();
            let leads: Vec<_> = statuses.iter().filter(|cell| cell.role == "leader").map(|cell| cell.cell).collect();
            json!({
                "id": spec.id,
                "region": place.region,
                "datacenter": place.datacenter,
                "client_address": spec.client_address.to_string(),
                "cut": cut.contains(&spec.id),
                "running": handle.is_running(),
                "leads": leads,
                "links": links,
            })
        })
        .collect();
    let cells: Vec<Value> = cluster
        .cell_ids()
        .into_iter()
        .map(|cell| {
            let spec = topology.cell(cell).expect("a cell of the topology");
            let leader = cluster.leader(cell, |node| !cut.contains(&node)).or_else(|| cluster.leader(cell, |_| true));
            let replicas: Vec<Value> = cluster
                .statuses(cell)
                .map(|(node, status)| {
                    json!({
                        "node": node,
                        "role": status.role,
                        "term": status.term,
                        "commit": status.commit,
                        "applied": status.applied,
                        "leader": status.leader,
                    })
                })
                .collect();
            json!({
                "id": cell,
                "global": cell == topology.global().id,
                "leader": leader.as_ref().map(|(node, _)| node),
                "term": leader.as_ref().map(|(_, status)| status.term),
                "commit": leader.as_ref().map(|(_, status)| status.commit),
                "leader_preference": spec.leader_preference,
                "replicas": replicas,
            })
        })
        .collect();
    let routing = newest_routing(cluster);
    let owners: Vec<Option<CellId>> = (0..routing.shards()).map(|shard| routing.owner(shard)).collect();
    let latency = topology.latency;
    json!({
        "uptime_s": cluster.started.elapsed().as_secs_f64(),
        "gateway": cluster.gateway_address.to_string(),
        "latency": {
            "enabled": latency.enabled,
            "same_datacenter_us": latency.same_datacenter_us,
            "same_region_us": latency.same_region_us,
            "cross_region_us": latency.cross_region_us,
        },
        "regions": regions,
        "nodes": nodes,
        "cells": cells,
        "routing": { "version": routing.version(), "owners": owners },
        "series": app.board.series(),
        "totals": app.board.totals(),
        "drill": app.drills.json(),
    })
}

/// The newest routing table any node has applied.
fn newest_routing(cluster: &Cluster) -> Arc<RoutingTable> {
    let tables = cluster.handles.values().map(|handle| handle.status().routing());
    tables.max_by_key(|table| table.version()).expect("the demo has nodes")
}
