//! Malformed and oversized requests on both APIs: each gets a clear error in
//! its protocol, and none changes the ledger.

mod front_support;

use cellpay_api::json::BODY_BYTES_MAX;
use cellpay_api::proto::{self, MESSAGE_BYTES_MAX};
use cellpay_ledger::{AccountFilter, BATCH_EVENTS_MAX};
use front_support::{accounts_json, raw, raw_body, raw_status, transfer_json, Server};
use hyper::StatusCode;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A node holding three accounts and one transfer.
async fn server_with_state() -> Server {
    let server = Server::start().await;
    server.post_ok("/v1/accounts", &accounts_json()).await;
    server.post_ok("/v1/transfers", &json!({"transfers": [transfer_json(1, 1, 2, "7")]})).await;
    server
}

/// Sends `body` to `path`, expects `status` and `code`, and a message that
/// contains `message_part`; then checks that nothing changed.
async fn check_refused(server: &Server, path: &str, body: &[u8], status: StatusCode, code: &str, message_part: &str) {
    let before = server.snapshot().await;
    let reply = server.post(path, body.to_vec()).await;
    let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
    assert_eq!(reply.status, status, "{path} {shown}: {}", reply.text());
    assert_eq!(reply.error_code(), code, "{path} {shown}");
    let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains(message_part), "{path} {shown}: {message:?} lacks {message_part:?}");
    assert_eq!(server.snapshot().await, before, "{path} {shown} changed the ledger");
}

fn json_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rest_requests_are_refused_with_400() {
    let server = server_with_state().await;
    let bad = StatusCode::BAD_REQUEST;

    check_refused(&server, "/v1/transfers", b"not json", bad, "invalid_json", "malformed JSON").await;
    check_refused(&server, "/v1/transfers", b"", bad, "invalid_json", "malformed JSON").await;
    check_refused(&server, "/v1/accounts", b"{\"accounts\": [", bad, "invalid_json", "malformed JSON").await;
    let unknown_field = json!({"transfers": [{"id": "9", "amount": "1", "colour": "red"}]});
    check_refused(&server, "/v1/transfers", &json_bytes(&unknown_field), bad, "invalid_json", "colour").await;
    let mut abc = transfer_json(9, 1, 2, "abc");
    let body = json_bytes(&json!({"transfers": [transfer_json(8, 1, 2, "1"), abc.clone()]}));
    check_refused(&server, "/v1/transfers", &body, bad, "invalid_number", "transfers[1].amount: not a decimal u128")
        .await;
    abc["amount"] = json!("340282366920938463463374607431768211456");
    let body = json_bytes(&json!({"transfers": [abc.clone()]}));
    check_refused(&server, "/v1/transfers", &body, bad, "invalid_number", "transfers[0].amount: out of range").await;
    abc["amount"] = json!(5);
    let body = json_bytes(&json!({"transfers": [abc.clone()]}));
    check_refused(&server, "/v1/transfers", &body, bad, "invalid_json", "malformed JSON").await;
    abc["amount"] = json!("-1");
    let body = json_bytes(&json!({"transfers": [abc.clone()]}));
    check_refused(&server, "/v1/transfers", &body, bad, "invalid_number", "not a decimal").await;
    let missing_id = json!({"accounts": [{"ledger": 1, "code": 1}]});
    check_refused(&server, "/v1/accounts", &json_bytes(&missing_id), bad, "missing_field", "accounts[0].id").await;
    let bad_flag = json!({"accounts": [{"id": "4", "ledger": 1, "code": 1, "flags": ["History"]}]});
    check_refused(&server, "/v1/accounts", &json_bytes(&bad_flag), bad, "invalid_flag", "History").await;
    let code_too_big = json!({"accounts": [{"id": "4", "ledger": 1, "code": 70000}]});
    check_refused(&server, "/v1/accounts", &json_bytes(&code_too_big), bad, "invalid_json", "malformed JSON").await;

    // Batch limits.
    let empty = json!({"accounts": []});
    check_refused(&server, "/v1/accounts", &json_bytes(&empty), bad, "batch_empty", "accounts").await;
    check_refused(&server, "/v1/accounts/lookup", &json_bytes(&json!({"ids": []})), bad, "batch_empty", "ids").await;
    let too_many: Vec<Value> =
        (0..=BATCH_EVENTS_MAX).map(|i| json!({"id": (i + 100).to_string(), "ledger": 1, "code": 1})).collect();
    assert_eq!(too_many.len(), 8191);
    let body = json_bytes(&json!({ "accounts": too_many }));
    check_refused(&server, "/v1/accounts", &body, bad, "batch_too_large", "8191").await;
    let ids: Vec<String> = (0..=BATCH_EVENTS_MAX).map(|i| (i + 1).to_string()).collect();
    let body = json_bytes(&json!({ "ids": ids }));
    check_refused(&server, "/v1/transfers/lookup", &body, bad, "batch_too_large", "8191").await;

    // Filters the ledger cannot run.
    for (filter, part) in [
        (json!({"account_id": "1", "limit": 0, "debits": true}), "limit"),
        (json!({"account_id": "1", "limit": 8191, "debits": true}), "limit"),
        (json!({"account_id": "1", "limit": 10}), "debits"),
        (json!({"account_id": "0", "limit": 10, "debits": true}), "account_id"),
        (json!({"limit": 10, "debits": true}), "account_id"),
    ] {
        let code = if filter.get("account_id").is_none() { "missing_field" } else { "invalid_filter" };
        for path in ["/v1/accounts/transfers", "/v1/accounts/balances"] {
            check_refused(&server, path, &json_bytes(&filter), bad, code, part).await;
        }
    }

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_bodies_over_8_mib_are_refused_with_413() {
    let server = server_with_state().await;
    let before = server.snapshot().await;

    // A valid body of exactly BODY_BYTES_MAX bytes (padded with spaces) is served.
    let mut body = json_bytes(&json!({"ids": ["1"]}));
    body.resize(BODY_BYTES_MAX, b' ');
    let reply = server.post("/v1/accounts/lookup", body.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["accounts"][0]["id"], json!("1"));

    // One byte more: refused, and the client (which sends the whole body first) sees the 413.
    body.push(b' ');
    let reply = server.post("/v1/accounts/lookup", body.clone()).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", reply.text());
    assert_eq!(reply.error_code(), "body_too_large");
    let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
    assert_eq!(message, "request body is 8388609 bytes, more than the 8388608 allowed");

    // The same sent chunked, with no length: refused once the limit is passed.
    let reply = post_chunked(&server, "/v1/accounts", &body).await;
    assert_eq!(raw_status(&reply), 413, "{reply}");
    assert!(reply.contains("content-type: application/json"), "{reply}");
    let error = raw_body(&dechunk(&reply));
    assert_eq!(error["error"]["code"], json!("body_too_large"), "{error}");
    assert_eq!(error["error"]["message"], json!("request body is 8388609 bytes, more than the 8388608 allowed"));

    // Announced in the headers and never sent: refused at once when the client
    // waits for `100 Continue`, or when the body is too large to be worth reading.
    for (bytes, expect) in [(10 * 1024 * 1024, "expect: 100-continue\r\n"), (100 * 1024 * 1024, "")] {
        let head = format!(
            "POST /v1/accounts HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{expect}content-length: {bytes}\r\n\r\n"
        );
        let reply = raw(server.address, head.as_bytes()).await;
        assert_eq!(raw_status(&reply), 413, "{reply}");
        let error = raw_body(&reply);
        assert_eq!(error["error"]["code"], json!("body_too_large"));
        assert!(error["error"]["message"].as_str().unwrap().contains(&bytes.to_string()), "{error}");
    }

    assert_eq!(server.snapshot().await, before);
    server.stop().await;
}

/// POSTs `body` with `transfer-encoding: chunked` and reads the reply until the server closes.
async fn post_chunked(server: &Server, path: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect(server.address).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(64 * 1024) {
        stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.unwrap();
        stream.write_all(chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    front_support::read_to_close(&mut stream).await
}

/// The body of a chunked HTTP/1.1 reply, as a plain reply.
fn dechunk(reply: &str) -> String {
    let (head, mut rest) = reply.split_once("\r\n\r\n").unwrap();
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return reply.to_string();
    }
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    format!("{head}\r\n\r\n{body}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_requests_are_refused() {
    let server = server_with_state().await;
    let mut grpc = server.grpc().await;
    let before = server.snapshot().await;

    let valid = proto::Transfer::from_ledger(&cellpay_ledger::Transfer {
        id: 50,
        debit_account_id: 1,
        credit_account_id: 2,
        amount: 1,
        ledger: 1,
        code: 1,
        ..Default::default()
    });
    let cases: Vec<(proto::CreateTransfersRequest, &str)> = vec![
        (proto::CreateTransfersRequest { transfers: vec![] }, "transfers: batch is empty"),
        (proto::CreateTransfersRequest { transfers: vec![valid; BATCH_EVENTS_MAX + 1] }, "8191"),
        (
            proto::CreateTransfersRequest { transfers: vec![valid, proto::Transfer { id: None, ..valid }] },
            "transfers[1].id",
        ),
        (
            proto::CreateTransfersRequest { transfers: vec![proto::Transfer { code: 70_000, ..valid }] },
            "transfers[0].code",
        ),
        (proto::CreateTransfersRequest { transfers: vec![proto::Transfer { flags: 1 << 16, ..valid }] }, "flags"),
    ];
    for (request, part) in cases {
        let status = grpc.create_transfers(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(part), "{status:?} lacks {part:?}");
    }
    let status = grpc.create_accounts(proto::CreateAccountsRequest { accounts: vec![] }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = grpc.lookup_accounts(proto::LookupAccountsRequest { ids: vec![] }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    let zero_limit = AccountFilter { account_id: 1, limit: 0, debits: true, ..AccountFilter::default() };
    let status = grpc.get_account_transfers(proto::GetAccountTransfersRequest::from_ledger(&zero_limit)).await;
    let status = status.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("limit"), "{status:?}");
    let status = grpc.get_account_balances(proto::GetAccountBalancesRequest { filter: None }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("filter"), "{status:?}");

    // A message over 4 MiB (250,000 ids of 20 bytes each).
    let ids: Vec<u128> = (0..250_000u128).map(|i| (i << 64) | (i + 1)).collect();
    let request = proto::LookupAccountsRequest::from_ledger(&ids);
    assert!(prost::Message::encoded_len(&request) > MESSAGE_BYTES_MAX);
    let status = grpc.lookup_accounts(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("4194304"), "{status:?}");

    // The same connection still serves, and nothing changed.
    let reply = grpc.lookup_accounts(proto::LookupAccountsRequest::from_ledger(&[1])).await.unwrap();
    assert_eq!(reply.get_ref().accounts.len(), 1);
    assert_eq!(server.snapshot().await, before);
    drop(grpc);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_closes_only_its_connection() {
    let server = server_with_state().await;
    for garbage in [
        &b"\x00\x01\x02\x03 garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/accounts HTTP/1.1\r\ncontent-length: nope\r\n\r\n",
    ] {
        // Either a 400 from hyper or a closed connection: never a crash.
        let reply = raw(server.address, garbage).await;
        assert!(reply.is_empty() || reply.starts_with("HTTP/1.1 4"), "{garbage:?}: {reply:?}");
    }
    // An HTTP/2 preface followed by a frame header of all ones: the server
    // answers with its SETTINGS and a GOAWAY (frame type 7), then closes.
    let reply = raw(server.address, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff").await;
    assert!(reply.as_bytes().windows(4).any(|frame_head| frame_head == [0, 0, 8, 7]), "{reply:?}");
    let reply = server.get("/health").await;
    assert_eq!(reply.status, StatusCode::OK);
    server.stop().await;
}
