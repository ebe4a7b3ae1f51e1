//! A node and its front ends, served in process on 127.0.0.1:0, with small
//! HTTP/1.1 and gRPC clients. Shared by the `front_*` tests.

#![allow(dead_code)] // Each test file uses a different part.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use cellpay_api::proto::ledger_client::LedgerClient;
use cellpay_api::proto::MESSAGE_BYTES_MAX;
use cellpay_cluster::ledgers::LedgerDefinition;
use cellpay_cluster::topology::Topology;
use cellpay_server::node::{single_node_topology, Node, NodeConfig};
use cellpay_server::{serve, FrontLimits};
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// How long a test waits for anything before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Server {
    pub address: SocketAddr,
    node: Option<Node>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(FrontLimits::default()).await
    }

    pub async fn start_with(limits: FrontLimits) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(NodeConfig { topology: topology(), ..NodeConfig::new(dir.path()) }).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (shutdown, shutdown_receiver) = oneshot::channel::<()>();
        let signal = async move {
            let _ = shutdown_receiver.await;
        };
        let task = tokio::spawn(serve(listener, node.handle(), limits, signal));
        Server { address, node: Some(node), shutdown: Some(shutdown), task: Some(task), _dir: dir }
    }

    /// Asks the front ends to shut down; `finished` waits for them.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    pub fn serve_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|task| task.is_finished())
    }

    /// Waits for `serve` to return, and returns what it returned.
    pub async fn finished(&mut self) -> std::io::Result<()> {
        let task = self.task.take().expect("serve already awaited");
        tokio::time::timeout(WAIT, task).await.expect("serve did not return in time").unwrap()
    }

    /// Shuts the front ends and the node down cleanly.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        if self.task.is_some() {
            self.finished().await.unwrap();
        }
        let node = self.node.take().unwrap();
        tokio::task::spawn_blocking(move || node.shutdown()).await.unwrap();
    }

    pub async fn grpc(&self) -> LedgerClient<Channel> {
        let client = LedgerClient::connect(format!("http://{}", self.address)).await.unwrap();
        client.max_decoding_message_size(MESSAGE_BYTES_MAX)
    }

    pub async fn get(&self, path: &str) -> HttpReply {
        http(self.address, "GET", path, Bytes::new()).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> HttpReply {
        http(self.address, "POST", path, body.into()).await
    }

    /// POSTs JSON; the reply must be JSON.
    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let reply = self.post(path, serde_json::to_vec(body).unwrap()).await;
        (reply.status, reply.json())
    }

    /// A 200 reply's JSON body.
    pub async fn post_ok(&self, path: &str, body: &Value) -> Value {
        let (status, reply) = self.post_json(path, body).await;
        assert_eq!(status, StatusCode::OK, "{path} {body}: {reply}");
        reply
    }

    /// Everything the tests create, read over REST: to check that a refused
    /// request changed nothing.
    pub async fn snapshot(&self) -> Value {
        let accounts = self.post_ok("/v1/accounts/lookup", &json!({"ids": ["1", "2", "3", "4", "5"]})).await;
        let ids: Vec<String> = (1..=20).map(|id: u32| id.to_string()).collect();
        let transfers = self.post_ok("/v1/transfers/lookup", &json!({ "ids": ids })).await;
        json!({"accounts": accounts, "transfers": transfers})
    }
}

#[derive(Debug)]
pub struct HttpReply {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        assert_eq!(self.content_type, "application/json", "status {}: {}", self.status, self.text());
        serde_json::from_slice(&self.body).unwrap_or_else(|error| panic!("{error}: {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `{"error": {"code": ...}}` of an error reply, checking its shape.
    pub fn error_code(&self) -> String {
        let body = self.json();
        let error = body["error"].as_object().unwrap_or_else(|| panic!("not an error body: {body}"));
        assert_eq!(error.len(), 2, "{body}");
        assert!(error["message"].as_str().is_some_and(|message| !message.is_empty()), "{body}");
        error["code"].as_str().unwrap().to_string()
    }
}

/// One HTTP/1.1 request on a new connection.
pub async fn http(address: SocketAddr, method: &str, path: &str, body: Bytes) -> HttpReply {
    let stream = TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", address.to_string())
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request)).await.expect("no reply").unwrap();
    let status = response.status();
    let content_type =
        response.headers().get("content-type").map(|value| value.to_str().unwrap().to_string()).unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes().to_vec();
    drop(sender);
    connection.abort();
    HttpReply { status, content_type, body }
}

/// Writes raw bytes on a new connection and reads until the server closes it.
pub async fn raw(address: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_to_close(&mut stream).await
}

/// Reads until the server closes the connection; a reset counts as closed.
pub async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut reply = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut reply)).await.expect("connection not closed");
    if let Err(error) = read {
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    }
    String::from_utf8_lossy(&reply).into_owned()
}

/// The status code of a raw HTTP/1.1 reply.
pub fn raw_status(reply: &str) -> u16 {
    let status = reply.split(' ').nth(1).unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
    status.parse().unwrap()
}

/// The body of a raw HTTP/1.1 reply (not chunked).
pub fn raw_body(reply: &str) -> Value {
    let (_, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
    serde_json::from_str(body).unwrap_or_else(|error| panic!("{error}: {body:?}"))
}

/// The single node's topology, defining ledger 1 (CNY) and ledger 2 (USD): the accounts below use both.
fn topology() -> std::sync::Arc<Topology> {
    let usd = LedgerDefinition { id: 2, name: "USD".to_string(), asset_scale: 2 };
    std::sync::Arc::new(single_node_topology().with_ledgers(vec![LedgerDefinition::local(), usd]).unwrap())
}

/// Two accounts on ledger 1 (the first keeps a balance history) and a third on ledger 2.
pub fn accounts_json() -> Value {
    json!({"accounts": [
        {"id": "1", "ledger": 1, "code": 10, "flags": ["history"]},
        {"id": "2", "ledger": 1, "code": 10, "user_data_64": "18446744073709551615"},
        {"id": "3", "ledger": 2, "code": 10},
    ]})
}

pub fn transfer_json(id: u32, debit: u32, credit: u32, amount: &str) -> Value {
    json!({
        "id": id.to_string(),
        "debit_account_id": debit.to_string(),
        "credit_account_id": credit.to_string(),
        "amount": amount,
        "ledger": 1,
        "code": 1,
    })
}

/// The `result` names of a create reply, in order.
pub fn result_names(reply: &Value) -> Vec<String> {
    let results = reply["results"].as_array().unwrap_or_else(|| panic!("not a create reply: {reply}"));
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result["index"], json!(index), "{reply}");
    }
    results.iter().map(|result| result["result"].as_str().unwrap().to_string()).collect()
}
