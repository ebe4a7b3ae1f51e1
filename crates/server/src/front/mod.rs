//! The network front ends of a node or a gateway: the REST API, the gRPC
//! API, `/metrics`, `/health` and `/openapi.json`, all on one listener.
//! What they serve is a [`Backend`]: a node's handle, or a gateway's.
//!
//! One port, two protocols: every accepted connection is served by hyper-util's
//! auto builder, which reads the first bytes and speaks HTTP/2 (prior
//! knowledge, as gRPC clients do) or HTTP/1.1. Every request then goes through
//! the same stack:
//!
//! 1. `trace_request`: a `request` span (method, path, HTTP status, event
//!    count, and the gRPC status of a call that failed before its reply) and
//!    the `request_timeout`;
//! 2. load shedding: at most `requests_in_flight_max` requests are served at
//!    once (tower's `ConcurrencyLimit` behind `LoadShed`); one more is refused
//!    at once, never queued: HTTP 503 `overloaded`, or gRPC `UNAVAILABLE`;
//! 3. one axum router: the gRPC service under `/cellpay.v1.Ledger/*` (`grpc`),
//!    the REST routes (`rest`), and a fallback that answers in the caller's
//!    protocol (gRPC `UNIMPLEMENTED`, or a JSON 404).
//!
//! Connections are counted here: at most `connections_max` are open; one more
//! is closed as soon as it is accepted. On shutdown the listener is closed,
//! every connection is asked to finish (HTTP/1: after the request in flight;
//! HTTP/2: GOAWAY, then the open streams), and connections still open after
//! `shutdown_grace` are dropped.
//!
//! Architecture invariant: the front ends only translate (with `cellpay_api`)
//! and submit to a [`Backend`]; they hold no ledger state. No input can
//! make them panic: every malformed request is an error reply.

mod backend;
mod grpc;
mod rest;

pub use backend::{node_error_code, Backend, Caller, FrontError};

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::error_handling::HandleErrorLayer;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Json, Router};
use cellpay_api::json::ErrorBodyJson;
use cellpay_api::ErrorCode;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;
use tracing::field::Empty;
use tracing::Instrument;

use crate::node::Request;

/// The front ends' limits. Every one bounds a resource a client could hold.
#[derive(Clone, Debug)]
pub struct FrontLimits {
    /// Open TCP connections (both protocols). A connection past this is
    /// closed as soon as it is accepted.
    pub connections_max: usize,
    /// Requests being served at once (both APIs, `/metrics` and `/health`
    /// included). A request past this is refused at once: HTTP 503
    /// `overloaded` / gRPC `UNAVAILABLE`. It also bounds the memory held by
    /// request bodies: at most this many times `json::BODY_BYTES_MAX` (8 MiB)
    /// or `proto::MESSAGE_BYTES_MAX` (4 MiB).
    pub requests_in_flight_max: usize,
    /// Concurrent HTTP/2 streams (gRPC calls) on one connection.
    pub streams_per_connection_max: u32,
    /// How long a client may take to send a request's headers: from its
    /// connection to its first request, and between requests on an idle
    /// HTTP/1 connection. Past it, the connection is closed.
    pub header_read_timeout: Duration,
    /// How long one request may take, from its headers to its reply (a slow
    /// body included). Past it: HTTP 408 / gRPC `DEADLINE_EXCEEDED`. A create
    /// request already submitted is still applied: retry it with the same ids.
    pub request_timeout: Duration,
    /// After shutdown is asked for, how long in-flight requests may take to
    /// finish before their connections are dropped.
    pub shutdown_grace: Duration,
}

impl Default for FrontLimits {
    fn default() -> FrontLimits {
        FrontLimits {
            // Leaves room under a default 1,024 open-files limit for the node's own files.
            connections_max: 512,
            // At most 2 GiB of request bodies; and under the node's default
            // `queue_requests_max` (1,024), so the front sheds before the node must.
            requests_in_flight_max: 256,
            streams_per_connection_max: 128,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// How often an HTTP/2 connection is pinged, to find peers that vanished.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long an HTTP/2 ping may go unanswered before the connection is closed.
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The pause after an accept error such as "too many open files", so the
/// accept loop does not spin while the process is out of descriptors.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How often a connection that has sent part of the HTTP/2 preface is checked again.
const PREFACE_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// What an HTTP/2 prior-knowledge client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The service every connection runs: the whole request stack, boxed once.
type FrontService = BoxCloneSyncService<hyper::Request<Incoming>, Response, Infallible>;

/// Serves the REST API, the gRPC API, /metrics, /health and /openapi.json on one listener until `shutdown` resolves.
///
/// Then stops accepting, lets in-flight requests finish (for at most
/// `limits.shutdown_grace`), and returns `Ok`. Accept errors (such as running
/// out of file descriptors) and errors on single connections are logged and
/// served through, never returned.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    backend: B,
    limits: FrontLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let service = front_service(backend, &limits);
    let builder = Arc::new(connection_builder(&limits));
    let connections = Arc::new(Semaphore::new(limits.connections_max.min(Semaphore::MAX_PERMITS)));
    let (stop_sender, stop) = watch::channel(false);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut refusing = false;
    let mut shutdown = std::pin::pin!(shutdown);
    match listener.local_addr() {
        Ok(address) => tracing::info!(%address, ?limits, "serving REST and gRPC"),
        Err(error) => tracing::warn!(%error, "serving, but the listener has no local address"),
    }
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_task_end(joined),
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        accept_failed(&error).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    if !refusing {
                        let connections_max = limits.connections_max;
                        tracing::warn!(%peer, connections_max, "connection limit reached: closing new connections");
                    }
                    refusing = true;
                    drop(stream);
                    continue;
                };
                refusing = false;
                let connection = Connection {
                    builder: builder.clone(),
                    service: service.clone(),
                    header_read_timeout: limits.header_read_timeout,
                    stop: stop.clone(),
                    _permit: permit,
                };
                tasks.spawn(connection.serve(stream, peer));
            }
        }
    }

    drop(listener);
    let connections_open = tasks.len();
    tracing::info!(connections_open, "shutting down: no new connections, finishing requests in flight");
    stop_sender.send_replace(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while let Some(joined) = tasks.join_next().await {
            log_task_end(joined);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections_open = tasks.len(),
            shutdown_grace = ?limits.shutdown_grace,
            "connections still open after the shutdown grace: dropping them"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    tracing::info!("front ends stopped");
    Ok(())
}

/// The request stack, outermost first: trace and time out, shed load, route.
fn front_service<B: Backend>(backend: B, limits: &FrontLimits) -> FrontService {
    let router = Router::new()
        .merge(rest::router(backend.clone()))
        .merge(grpc::router(backend))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    let in_flight = Arc::new(Semaphore::new(limits.requests_in_flight_max.min(Semaphore::MAX_PERMITS)));
    let requests_in_flight_max = limits.requests_in_flight_max;
    let service = ServiceBuilder::new()
        .map_request(|request: hyper::Request<Incoming>| request.map(axum::body::Body::new))
        .layer(axum::middleware::from_fn_with_state(limits.request_timeout, trace_request))
        .layer(HandleErrorLayer::new(move |headers: HeaderMap, error: BoxError| async move {
            shed_response(&headers, &error, requests_in_flight_max)
        }))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(in_flight))
        .service(router);
    BoxCloneSyncService::new(service)
}

fn connection_builder(limits: &FrontLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.streams_per_connection_max)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    builder
}

/// One accepted connection, holding its place under `connections_max` until it ends.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: FrontService,
    header_read_timeout: Duration,
    stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(mut self, stream: TcpStream, peer: SocketAddr) {
        // Small request/reply exchanges: do not wait to fill packets.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        // hyper-util's protocol detection waits for the first bytes without a
        // deadline; a client that connects and says nothing must not hold a
        // connection slot for ever.
        let waiting = tokio::time::timeout(self.header_read_timeout, protocol_known(&stream));
        let known = tokio::select! {
            known = waiting => known.unwrap_or(false),
            () = stopped(&mut self.stop) => false,
        };
        if !known {
            tracing::debug!(%peer, "connection closed before its first request");
            return;
        }
        let service = TowerToHyperService::new(self.service);
        let connection = self.builder.serve_connection(TokioIo::new(stream), service);
        let mut connection = std::pin::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = stopped(&mut self.stop) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = result {
            // Clients that go away, time out or speak garbage end up here: not the server's fault.
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
    }
}

/// Resolves once shutdown is asked for (or the server is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Waits until the client has sent enough to tell HTTP/1 from HTTP/2 prior
/// knowledge. False if it closes first.
async fn protocol_known(stream: &TcpStream) -> bool {
    let mut buffer = [0u8; H2_PREFACE.len()];
    loop {
        match stream.peek(&mut buffer).await {
            Ok(0) | Err(_) => return false,
            Ok(bytes) => {
                if bytes >= H2_PREFACE.len() || buffer[..bytes] != H2_PREFACE[..bytes] {
                    return true;
                }
            }
        }
        tokio::time::sleep(PREFACE_POLL_INTERVAL).await;
    }
}

async fn accept_failed(error: &io::Error) {
    match error.kind() {
        // The client gave up before we accepted it.
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted => {
            tracing::debug!(%error, "accept failed");
        }
        // Out of file descriptors or memory: wait for connections to close.
        _ => {
            tracing::warn!(%error, pause = ?ACCEPT_ERROR_PAUSE, "accept failed");
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
        }
    }
}

fn log_task_end(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            tracing::error!(%error, "a connection task panicked");
        }
    }
}

/// The outermost layer: one span per request, and the request timeout.
async fn trace_request(State(request_timeout): State<Duration>, request: HttpRequest, next: Next) -> Response {
    let grpc = is_grpc(request.headers());
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        status = Empty,
        grpc_status = Empty,
        events = Empty,
    );
    let started = Instant::now();
    let response = match tokio::time::timeout(request_timeout, next.run(request)).instrument(span.clone()).await {
        Ok(response) => response,
        Err(_elapsed) => timeout_response(grpc, request_timeout),
    };
    let status = response.status();
    span.record("status", status.as_u16());
    if let Some(grpc_status) = response.headers().get("grpc-status").and_then(|value| value.to_str().ok()) {
        span.record("grpc_status", grpc_status);
    }
    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let _entered = span.enter();
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(latency_us, "request failed");
    } else {
        tracing::debug!(latency_us, "request answered");
    }
    response
}

/// Records a request's event count on its span.
fn record_events(request: &Request) {
    tracing::Span::current().record("events", request.events());
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// A REST error reply: `{"error": {"code": ..., "message": ...}}` with the code's HTTP status.
fn error_response(code: ErrorCode, message: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(ErrorBodyJson::new(code, message))).into_response()
}

/// A REST error reply whose code is not one of the API's `ErrorCode`s (no route, no such method, timeout).
fn error_response_other(status: StatusCode, code: &str, message: String) -> Response {
    let mut body = ErrorBodyJson::new(ErrorCode::Internal, message);
    body.error.code = code.to_string();
    (status, Json(body)).into_response()
}

fn grpc_response(status: tonic::Status) -> Response {
    status.into_http::<axum::body::Body>()
}

/// The reply to a request shed by the in-flight limit, in the caller's protocol.
fn shed_response(headers: &HeaderMap, error: &BoxError, requests_in_flight_max: usize) -> Response {
    if !error.is::<tower::load_shed::error::Overloaded>() {
        // The router never fails; a failure here is a bug in the stack.
        tracing::error!(%error, "request stack failed");
        if is_grpc(headers) {
            return grpc_response(tonic::Status::internal("internal error"));
        }
        return error_response(ErrorCode::Internal, "internal error");
    }
    let message = format!("too many requests in flight (requests_in_flight_max {requests_in_flight_max}): retry later");
    if is_grpc(headers) {
        grpc_response(tonic::Status::new(ErrorCode::Overloaded.grpc_code(), message))
    } else {
        error_response(ErrorCode::Overloaded, message)
    }
}

fn timeout_response(grpc: bool, request_timeout: Duration) -> Response {
    let message = format!("request not answered within {request_timeout:?} (a create may still be applied: retry it)");
    if grpc {
        grpc_response(tonic::Status::deadline_exceeded(message))
    } else {
        error_response_other(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
    }
}

async fn not_found(request: HttpRequest) -> Response {
    let path = request.uri().path();
    if is_grpc(request.headers()) {
        return grpc_response(tonic::Status::unimplemented(format!("no gRPC method {path}")));
    }
    let message = format!("no route for {} {path}", request.method());
    error_response_other(StatusCode::NOT_FOUND, "not_found", message)
}

async fn method_not_allowed(request: HttpRequest) -> Response {
    let message = format!("{} is not allowed on {}", request.method(), request.uri().path());
    error_response_other(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message)
}
