//! The REST API end to end: a node on a temporary directory, its front ends on
//! 127.0.0.1:0, and HTTP/1.1 requests as in the OpenAPI document.

mod front_support;

use front_support::{accounts_json, result_names, transfer_json, Server};
use hyper::StatusCode;
use serde_json::{json, Value};

/// 2^127: an amount that only a u128 holds.
const AMOUNT_HUGE: &str = "170141183460469231731687303715884105728";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_creates_and_reads_accounts_and_transfers() {
    let server = Server::start().await;

    let reply = server.post_ok("/v1/accounts", &accounts_json()).await;
    assert_eq!(result_names(&reply), ["ok", "ok", "ok"]);
    let reply = server.post_ok("/v1/accounts", &accounts_json()).await;
    assert_eq!(result_names(&reply), ["exists", "exists", "exists"]);

    let posted = transfer_json(1, 1, 2, "100");
    let mut pending = transfer_json(2, 1, 2, "40");
    pending["flags"] = json!(["pending"]);
    pending["timeout_s"] = json!(3600);
    let mut post = transfer_json(3, 1, 2, "30");
    post["pending_id"] = json!("2");
    post["flags"] = json!(["post_pending_transfer"]);
    let huge = transfer_json(4, 2, 1, AMOUNT_HUGE);
    let unknown_account = transfer_json(5, 1, 99, "1");
    let other_ledger = transfer_json(6, 1, 3, "1");
    let body = json!({"transfers": [posted, pending, post, huge, unknown_account, other_ledger]});
    let reply = server.post_ok("/v1/transfers", &body).await;
    assert_eq!(
        result_names(&reply),
        ["ok", "ok", "ok", "ok", "credit_account_not_found", "accounts_must_have_the_same_ledger"]
    );

    // Lookups: in request order, ids not found left out, every u128 a decimal string.
    let reply = server.post_ok("/v1/accounts/lookup", &json!({"ids": ["2", "404", "1"]})).await;
    let accounts = reply["accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 2, "{reply}");
    let expected_2 = json!({
        "id": "2",
        "debits_pending": "0",
        "debits_posted": AMOUNT_HUGE,
        "credits_pending": "0",
        "credits_posted": "130",
        "user_data_128": "0",
        "user_data_64": "18446744073709551615",
        "user_data_32": 0,
        "ledger": 1,
        "code": 10,
        "flags": [],
    });
    assert_eq!(without_timestamp(&accounts[0]), expected_2);
    let expected_1 = json!({
        "id": "1",
        "debits_pending": "0",
        "debits_posted": "130",
        "credits_pending": "0",
        "credits_posted": AMOUNT_HUGE,
        "user_data_128": "0",
        "user_data_64": "0",
        "user_data_32": 0,
        "ledger": 1,
        "code": 10,
        "flags": ["history"],
    });
    assert_eq!(without_timestamp(&accounts[1]), expected_1);
    assert!(decimal(&accounts[0]["timestamp"]) > decimal(&accounts[1]["timestamp"]));

    let reply = server.post_ok("/v1/transfers/lookup", &json!({"ids": ["3", "5", "2"]})).await;
    let transfers = reply["transfers"].as_array().unwrap();
    assert_eq!(transfers.len(), 2, "{reply}");
    assert_eq!(transfers[0]["id"], json!("3"));
    assert_eq!(transfers[0]["amount"], json!("30"));
    assert_eq!(transfers[0]["pending_id"], json!("2"));
    assert_eq!(transfers[0]["flags"], json!(["post_pending_transfer"]));
    assert_eq!(transfers[1]["id"], json!("2"));
    assert_eq!(transfers[1]["amount"], json!("40"));
    assert_eq!(transfers[1]["timeout_s"], json!(3600));
    assert_eq!(transfers[1]["flags"], json!(["pending"]));

    // The account's transfers, oldest first, and newest first.
    let filter = json!({"account_id": "1", "limit": 10, "debits": true, "credits": true});
    let reply = server.post_ok("/v1/accounts/transfers", &filter).await;
    assert_eq!(ids(&reply["transfers"]), ["1", "2", "3", "4"]);
    let timestamps: Vec<u128> =
        reply["transfers"].as_array().unwrap().iter().map(|t| decimal(&t["timestamp"])).collect();
    assert!(timestamps.windows(2).all(|pair| pair[0] < pair[1]), "{timestamps:?}");
    let reversed = json!({"account_id": "1", "limit": 2, "debits": true, "credits": true, "reversed": true});
    let reply = server.post_ok("/v1/accounts/transfers", &reversed).await;
    assert_eq!(ids(&reply["transfers"]), ["4", "3"]);
    let credits_only = json!({"account_id": "1", "limit": 10, "credits": true});
    let reply = server.post_ok("/v1/accounts/transfers", &credits_only).await;
    assert_eq!(ids(&reply["transfers"]), ["4"]);

    // The balance history of the account flagged `history`, after each of its transfers.
    let reply = server.post_ok("/v1/accounts/balances", &filter).await;
    let balances: Vec<(Value, Value, Value)> = reply["balances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["debits_pending"].clone(), b["debits_posted"].clone(), b["credits_posted"].clone()))
        .collect();
    assert_eq!(
        balances,
        [
            (json!("0"), json!("100"), json!("0")),
            (json!("40"), json!("100"), json!("0")),
            (json!("0"), json!("130"), json!("0")),
            (json!("0"), json!("130"), json!(AMOUNT_HUGE)),
        ]
    );
    assert!(reply["balances"].as_array().unwrap().iter().all(|b| b["account_id"] == json!("1")));

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_openapi_and_routing_are_served() {
    let server = Server::start().await;
    server.post_ok("/v1/accounts", &accounts_json()).await;
    server.post_ok("/v1/transfers", &json!({"transfers": [transfer_json(1, 1, 2, "5")]})).await;

    let reply = server.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.content_type.starts_with("application/openmetrics-text"), "{}", reply.content_type);
    let text = reply.text();
    let has_line = |prefix: &str| text.lines().any(|line| line.starts_with(prefix));
    assert!(has_line("cellpay_requests_total{operation=\"create_accounts\",outcome=\"ok\"} 1"), "{text}");
    assert!(has_line("cellpay_requests_total{operation=\"create_transfers\",outcome=\"ok\"} 1"), "{text}");
    assert!(has_line("cellpay_events_total{operation=\"create_accounts\",result=\"ok\"} 3"), "{text}");
    assert!(has_line("cellpay_events_total{operation=\"create_transfers\",result=\"ok\"} 1"), "{text}");

    let reply = server.get("/openapi.json").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type, "application/json");
    assert_eq!(reply.text(), cellpay_api::OPENAPI_JSON);

    let reply = server.get("/health").await;
    assert_eq!((reply.status, reply.text().as_str()), (StatusCode::OK, "ok"));

    // A node alone: one cell owns every shard, at the topology's version 1.
    let reply = server.get("/v1/cluster/routing").await;
    assert_eq!(reply.status, StatusCode::OK);
    let owners = vec![1; 100];
    let expected = json!({"version": 1, "shards": 100, "cells": [{"cell": 1, "shards": ["0-99"]}], "owners": owners});
    assert_eq!(reply.json(), expected);
    // The watch answers at once with a newer table, or after its wait with the one it has.
    let reply = server.get("/v1/cluster/routing?newer_than=0").await;
    assert_eq!(reply.json()["version"], 1);
    let asked = std::time::Instant::now();
    let reply = server.get("/v1/cluster/routing?newer_than=1&wait_ms=200").await;
    assert!(asked.elapsed() >= std::time::Duration::from_millis(200), "the watch waited");
    assert_eq!(reply.json()["version"], 1);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_get_json_errors() {
    let server = Server::start().await;

    let reply = server.get("/v1/nothing").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code(), "not_found");

    let reply = server.get("/v1/accounts").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.error_code(), "method_not_allowed");

    let reply = server.post("/health", "").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.error_code(), "method_not_allowed");

    server.stop().await;
}

fn without_timestamp(value: &Value) -> Value {
    let mut value = value.clone();
    value.as_object_mut().unwrap().remove("timestamp");
    value
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|item| item["id"].as_str().unwrap().to_string()).collect()
}

fn decimal(value: &Value) -> u128 {
    value.as_str().unwrap_or_else(|| panic!("not a decimal string: {value}")).parse().unwrap()
}
