//! The front ends' limits: connections, requests in flight, timeouts, and a
//! graceful shutdown that lets requests in flight finish.

mod front_support;

use std::time::{Duration, Instant};

use cellpay_api::proto;
use cellpay_server::FrontLimits;
use front_support::{accounts_json, raw, raw_body, raw_status, read_to_close, Server, WAIT};
use hyper::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";

/// Reads one `/health` reply from a kept-alive connection.
async fn read_health(stream: &mut TcpStream) -> String {
    let mut reply = Vec::new();
    let mut buffer = [0u8; 1024];
    while !reply.ends_with(b"\r\n\r\nok") {
        let bytes = tokio::time::timeout(WAIT, stream.read(&mut buffer)).await.expect("no reply").unwrap();
        assert!(bytes > 0, "closed after {:?}", String::from_utf8_lossy(&reply));
        reply.extend_from_slice(&buffer[..bytes]);
    }
    String::from_utf8(reply).unwrap()
}

/// A lookup whose body is only half sent: once the server has its headers it
/// is a request in flight, until [`SlowRequest::finish`].
struct SlowRequest {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl SlowRequest {
    async fn start(server: &Server) -> SlowRequest {
        let body = serde_json::to_vec(&json!({"ids": ["1"]})).unwrap();
        let head = format!(
            "POST /v1/accounts/lookup HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body[..3]).await.unwrap();
        SlowRequest { stream, rest: body[3..].to_vec() }
    }

    /// Sends the rest of the body and returns the raw reply.
    async fn finish(mut self) -> String {
        self.stream.write_all(&self.rest).await.unwrap();
        read_to_close(&mut self.stream).await
    }
}

/// With `requests_in_flight_max` 1: starts a slow request and waits until it
/// holds the one place (another request is shed). Returns it and the shed reply.
async fn slow_request_in_flight(server: &Server) -> (SlowRequest, front_support::HttpReply) {
    let deadline = Instant::now() + WAIT;
    let mut slow = SlowRequest::start(server).await;
    loop {
        let reply = server.post("/v1/accounts/lookup", r#"{"ids": ["1"]}"#).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            return (slow, reply);
        }
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert!(Instant::now() < deadline, "the slow request never took the place");
        // The probe may have held the place when the slow request came: then
        // the slow one was shed, and has its reply. Start another.
        let mut buffer = [0u8; 64];
        match slow.stream.try_read(&mut buffer) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => slow = SlowRequest::start(server).await,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_connection_is_closed_at_the_limit() {
    let server = Server::start_with(FrontLimits { connections_max: 2, ..FrontLimits::default() }).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        stream.write_all(HEALTH).await.unwrap();
        assert!(read_health(&mut stream).await.starts_with("HTTP/1.1 200"));
        held.push(stream);
    }

    // The kernel completes the handshake; the server closes the connection at once, unanswered.
    for _ in 0..3 {
        let mut third = TcpStream::connect(server.address).await.unwrap();
        // The write may fail if the close came first: either way no reply.
        let _ = third.write_all(HEALTH).await;
        assert_eq!(read_to_close(&mut third).await, "");
    }

    // The two held connections still serve.
    for stream in &mut held {
        stream.write_all(HEALTH).await.unwrap();
        assert!(read_health(stream).await.starts_with("HTTP/1.1 200"));
    }

    // One closes: its place is free again.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = raw(server.address, b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        if !reply.is_empty() {
            assert_eq!(raw_status(&reply), 200, "{reply}");
            break;
        }
        assert!(Instant::now() < deadline, "the closed connection's place was never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(held);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_in_flight_limit_are_shed() {
    let server = Server::start_with(FrontLimits { requests_in_flight_max: 1, ..FrontLimits::default() }).await;
    server.post_ok("/v1/accounts", &accounts_json()).await;
    let mut grpc = server.grpc().await;
    // REST: 503 with the JSON error body, at once.
    let (slow, reply) = slow_request_in_flight(&server).await;
    assert_eq!(reply.error_code(), "overloaded");
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("requests_in_flight_max 1"));
    let reply = server.get("/health").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "overloaded");

    // gRPC: UNAVAILABLE.
    let status = grpc.lookup_accounts(proto::LookupAccountsRequest::from_ledger(&[1])).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("requests_in_flight_max 1"), "{status:?}");
    let status = grpc.create_accounts(proto::CreateAccountsRequest { accounts: vec![] }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "shed before decoding: {status:?}");

    // The request in flight is answered; then the place is free again.
    let reply = slow.finish().await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    assert_eq!(raw_body(&reply)["accounts"][0]["id"], json!("1"));
    let reply = grpc.lookup_accounts(proto::LookupAccountsRequest::from_ledger(&[1])).await.unwrap();
    assert_eq!(reply.get_ref().accounts.len(), 1);
    server.post_ok("/v1/accounts/lookup", &json!({"ids": ["1"]})).await;

    drop(grpc);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish() {
    let mut server = Server::start_with(FrontLimits { requests_in_flight_max: 1, ..FrontLimits::default() }).await;
    server.post_ok("/v1/accounts", &accounts_json()).await;
    // An idle gRPC connection must not hold the shutdown up.
    let mut grpc = server.grpc().await;
    grpc.lookup_accounts(proto::LookupAccountsRequest::from_ledger(&[1])).await.unwrap();
    let (slow, _) = slow_request_in_flight(&server).await;

    server.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!server.serve_finished(), "serve returned with a request in flight");
    assert!(TcpStream::connect(server.address).await.is_err(), "still accepting after shutdown");

    let reply = slow.finish().await;
    assert_eq!(raw_status(&reply), 200, "{reply}");
    assert_eq!(raw_body(&reply)["accounts"][0]["id"], json!("1"));
    server.finished().await.unwrap();
    drop(grpc);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drops_connections_after_the_grace() {
    let grace = Duration::from_millis(200);
    let limits = FrontLimits { shutdown_grace: grace, requests_in_flight_max: 1, ..FrontLimits::default() };
    let mut server = Server::start_with(limits).await;
    let (mut slow, _) = slow_request_in_flight(&server).await;
    server.begin_shutdown();
    let started = Instant::now();
    server.finished().await.unwrap();
    assert!(started.elapsed() >= grace, "serve returned before the grace: {:?}", started.elapsed());
    assert_eq!(read_to_close(&mut slow.stream).await, "", "an abandoned request got a reply");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_time_out() {
    let limits = FrontLimits { request_timeout: Duration::from_millis(300), ..FrontLimits::default() };
    let server = Server::start_with(limits).await;
    let mut slow = SlowRequest::start(&server).await;
    let reply = read_to_close(&mut slow.stream).await;
    assert_eq!(raw_status(&reply), 408, "{reply}");
    assert_eq!(raw_body(&reply)["error"]["code"], json!("request_timeout"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed() {
    let limits = FrontLimits { header_read_timeout: Duration::from_millis(300), ..FrontLimits::default() };
    let server = Server::start_with(limits).await;
    for said in [&b""[..], b"PRI * HTTP/2", b"GET /health HT"] {
        let started = Instant::now();
        let mut stream = TcpStream::connect(server.address).await.unwrap();
        stream.write_all(said).await.unwrap();
        let reply = read_to_close(&mut stream).await;
        assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 408"), "{said:?}: {reply:?}");
        assert!(started.elapsed() >= Duration::from_millis(250), "{said:?} closed too early");
    }
    // A kept-alive HTTP/1.1 connection that goes quiet is closed too.
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    stream.write_all(HEALTH).await.unwrap();
    read_health(&mut stream).await;
    assert_eq!(read_to_close(&mut stream).await, "");
    server.stop().await;
}
