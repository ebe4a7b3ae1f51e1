//! What the front ends serve: a [`Backend`]. A node ([`NodeHandle`]) and a
//! gateway (`gateway::GatewayHandle`) each plug in here, so both speak the
//! same API through the same stack (limits, shedding, timeouts, shutdown,
//! translation).

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use cellpay_api::ErrorCode;
use cellpay_cluster::routing::RoutingTable;
use cellpay_cluster::topology::CellId;
use tonic::metadata::MetadataMap;

use crate::forward::refusal_metadata;
use crate::node::{NodeError, NodeHandle, Origin, Reply, Request};

/// Who sent a request, as its gRPC metadata says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A client.
    Client,
    /// A node or a gateway, forwarding the part of a request for one cell
    /// (`cellpay-forwarded: cell=<id>`).
    Forwarded(CellId),
    /// A `cellpay-forwarded` header that does not name a cell.
    ForwardedMalformed,
}

/// A refusal of a whole request, as the front ends answer it.
pub trait FrontError: Display + Send {
    /// The API's error code: its HTTP status and gRPC code follow from it.
    fn code(&self) -> ErrorCode;
    /// Puts what a router needs on a gRPC refusal's metadata (see `forward`).
    fn metadata(&self, metadata: &mut MetadataMap);
}

/// What the front ends serve.
pub trait Backend: Clone + Send + Sync + 'static {
    type Error: FrontError + 'static;

    /// Serves one of the six ledger operations.
    fn submit(&self, request: Request, caller: Caller) -> impl Future<Output = Result<Reply, Self::Error>> + Send;

    /// `GET /metrics`, in the OpenMetrics text format.
    fn metrics_text(&self) -> String;

    /// `GET /health`: `Err(reason)` answers 503.
    fn health(&self) -> Result<(), String>;

    /// Whether the backend still serves (a routing watch ends when it stops).
    fn is_running(&self) -> bool;

    /// The routing table this backend routes by, and every newer one it learns
    /// (`GET /v1/cluster/routing`, a watch).
    fn routing_watch(&self) -> tokio::sync::watch::Receiver<Arc<RoutingTable>>;

    /// REST routes only this kind of server has (a node's operator endpoints).
    fn routes(&self) -> Router {
        Router::new()
    }
}

impl FrontError for NodeError {
    fn code(&self) -> ErrorCode {
        node_error_code(self)
    }

    fn metadata(&self, metadata: &mut MetadataMap) {
        refusal_metadata(self, metadata);
    }
}

/// The wire code of a node's refusal; its HTTP status and gRPC code follow from it.
pub fn node_error_code(error: &NodeError) -> ErrorCode {
    match error {
        NodeError::Overloaded { .. } | NodeError::ShuttingDown => ErrorCode::Overloaded,
        NodeError::BatchEmpty => ErrorCode::BatchEmpty,
        NodeError::BatchTooLarge { .. } => ErrorCode::BatchTooLarge,
        NodeError::InvalidFilter(_) => ErrorCode::InvalidFilter,
        NodeError::CrossCell { .. } => ErrorCode::CrossCell,
        NodeError::Misrouted { .. } => ErrorCode::Misrouted,
        NodeError::ChangeRefused { .. } => ErrorCode::Conflict,
        NodeError::NotLeader { .. }
        | NodeError::CellNotHosted { .. }
        | NodeError::Unavailable { .. }
        | NodeError::ForwardFailed { .. } => ErrorCode::Unavailable,
        NodeError::Timeout { .. } | NodeError::OutcomeUnknown { .. } => ErrorCode::Timeout,
    }
}

impl Backend for NodeHandle {
    type Error = NodeError;

    /// A client's request is routed by this node's table (and forwarded to
    /// the cell's leader); a forwarded one is served by this node's replica
    /// of the cell it names, never forwarded again.
    fn submit(&self, request: Request, caller: Caller) -> impl Future<Output = Result<Reply, NodeError>> + Send {
        let handle = self.clone();
        async move {
            match caller {
                Caller::Client => handle.submit_from(request, Origin::Client).await,
                Caller::Forwarded(cell) => handle.submit_forwarded(cell, request).await,
                Caller::ForwardedMalformed => Err(NodeError::Unavailable {
                    cell: 0,
                    reason: format!("a malformed {} header", crate::forward::FORWARDED_KEY),
                }),
            }
        }
    }

    fn metrics_text(&self) -> String {
        self.metrics().encode()
    }

    /// Live while the engine runs (whether or not this node leads any cell).
    fn health(&self) -> Result<(), String> {
        if self.is_running() {
            Ok(())
        } else {
            Err("the node is shutting down".to_string())
        }
    }

    fn is_running(&self) -> bool {
        NodeHandle::is_running(self)
    }

    fn routing_watch(&self) -> tokio::sync::watch::Receiver<Arc<RoutingTable>> {
        self.status().routing_watch()
    }

    fn routes(&self) -> Router {
        super::rest::node_router(self.clone())
    }
}
