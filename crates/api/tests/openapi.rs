//! The OpenAPI document cannot drift from the code: its paths, enums, schemas
//! and examples are checked against the ledger and the JSON types.

use cellpay_api::json::{
    self, AccountBalanceJson, AccountFilterJson, AccountJson, AccountsJson, BalancesJson, CreateResultsJson,
    ErrorBodyJson, TransferJson, TransfersJson,
};
use cellpay_api::{DecodeError, ErrorCode, OPENAPI_JSON};
use cellpay_ledger::{
    Account, AccountBalance, AccountFilter, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer,
    TransferFlags,
};
use serde_json::Value;

fn document() -> Value {
    serde_json::from_str(OPENAPI_JSON).expect("openapi.json is JSON")
}

fn schema(name: &str) -> Value {
    let schema = &document()["components"]["schemas"][name];
    assert!(schema.is_object(), "no schema {name}");
    schema.clone()
}

fn strings(value: &Value) -> Vec<String> {
    let list = value.as_array().unwrap_or_else(|| panic!("not a list: {value}"));
    list.iter().map(|item| item.as_str().expect("a string").to_string()).collect()
}

/// The `(method, path)` pairs the server serves.
const OPERATIONS: &[(&str, &str)] = &[
    ("post", "/v1/accounts"),
    ("post", "/v1/transfers"),
    ("post", "/v1/accounts/lookup"),
    ("post", "/v1/transfers/lookup"),
    ("post", "/v1/accounts/transfers"),
    ("post", "/v1/accounts/balances"),
    ("get", "/metrics"),
    ("get", "/health"),
    ("get", "/openapi.json"),
];

#[test]
fn document_is_openapi_3_0() {
    let document = document();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.0."));
    assert!(document["info"]["title"].is_string());
    assert!(document["info"]["version"].is_string());
}

#[test]
fn every_path_is_documented() {
    let document = document();
    let paths = document["paths"].as_object().unwrap();
    for (method, path) in OPERATIONS {
        assert!(paths.get(*path).and_then(|item| item.get(*method)).is_some(), "{method} {path} missing");
    }
    let documented: usize = paths.values().map(|item| item.as_object().unwrap().len()).sum();
    assert_eq!(documented, OPERATIONS.len(), "an operation is documented that the server does not serve");
}

#[test]
fn every_post_documents_its_errors() {
    let document = document();
    for (method, path) in OPERATIONS.iter().filter(|(method, _)| *method == "post") {
        let responses = &document["paths"][*path][*method]["responses"];
        for status in ["200", "400", "413", "500", "503"] {
            assert!(responses.get(status).is_some(), "{method} {path}: no {status} response");
        }
    }
}

#[test]
fn result_code_enums_match_the_ledger() {
    let names: Vec<&str> = CreateTransferResult::ALL.iter().map(|code| code.as_str()).collect();
    assert_eq!(strings(&schema("CreateTransferResult")["enum"]), names);
    let names: Vec<&str> = CreateAccountResult::ALL.iter().map(|code| code.as_str()).collect();
    assert_eq!(strings(&schema("CreateAccountResult")["enum"]), names);
}

#[test]
fn flag_enums_match_the_ledger() {
    let names: Vec<String> = AccountFlags::NAMES.iter().map(|(name, _)| name.to_ascii_lowercase()).collect();
    assert_eq!(strings(&schema("AccountFlag")["enum"]), names);
    let names: Vec<String> = TransferFlags::NAMES.iter().map(|(name, _)| name.to_ascii_lowercase()).collect();
    assert_eq!(strings(&schema("TransferFlag")["enum"]), names);
}

#[test]
fn error_code_enum_matches_the_code() {
    let names: Vec<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
    assert_eq!(strings(&schema("ErrorCode")["enum"]), names);
}

#[test]
fn error_responses_match_their_status() {
    let document = document();
    for (response, status) in [("BadRequest", 400), ("BodyTooLarge", 413), ("Overloaded", 503), ("Internal", 500)] {
        let example = &document["components"]["responses"][response]["content"]["application/json"]["example"];
        let body: ErrorBodyJson = serde_json::from_value(example.clone()).expect(response);
        let code = ErrorCode::ALL.iter().find(|code| code.as_str() == body.error.code).expect("a known code");
        assert_eq!(code.http_status(), status, "{response}");
    }
    // The examples quote real messages.
    let example = &document["components"]["responses"]["BodyTooLarge"]["content"]["application/json"]["example"];
    let error = DecodeError::BodyTooLarge { bytes: 10_000_000, bytes_max: json::BODY_BYTES_MAX };
    assert_eq!(example["error"]["message"], error.to_string());
    let example = &document["components"]["responses"]["BadRequest"]["content"]["application/json"]["example"];
    let body = br#"{"transfers":[{"id":"1"},{"id":"2"},{"id":"3"},{"id":"4","amount":"abc"}]}"#;
    let error = json::decode_create_transfers(body).unwrap_err();
    assert_eq!(example["error"]["message"], error.to_string());
}

/// The properties a JSON type writes are the properties its schema lists.
fn check_properties(schema_name: &str, written: impl serde::Serialize, required: &[&str]) {
    let schema = schema(schema_name);
    let documented: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
    let written = serde_json::to_value(written).unwrap();
    let written: Vec<&String> = written.as_object().unwrap().keys().collect();
    assert_eq!(documented, written, "{schema_name}");
    assert_eq!(strings(&schema["required"]), required, "{schema_name}");
    assert_eq!(schema["additionalProperties"], false, "{schema_name}");
}

#[test]
fn schemas_match_the_json_types() {
    check_properties("Account", AccountJson::from_ledger(&Account::default()), &["id"]);
    check_properties("Transfer", TransferJson::from_ledger(&Transfer::default()), &["id"]);
    check_properties("AccountBalance", AccountBalanceJson::from_ledger(&AccountBalance::default()), &["account_id"]);
    check_properties("AccountFilter", AccountFilterJson::from_ledger(&AccountFilter::default()), &["account_id"]);
}

fn example_value(path: &str, part: &str) -> Value {
    let operation = &document()["paths"][path]["post"];
    let content = match part {
        "request" => &operation["requestBody"]["content"]["application/json"],
        _ => &operation["responses"]["200"]["content"]["application/json"],
    };
    assert!(content["example"].is_object(), "{path}: no {part} example");
    content["example"].clone()
}

fn example(path: &str, part: &str) -> Vec<u8> {
    serde_json::to_vec(&example_value(path, part)).unwrap()
}

#[test]
fn request_examples_decode() {
    let accounts = json::decode_create_accounts(&example("/v1/accounts", "request")).unwrap();
    assert_eq!(accounts[0].id, (1 << 64) | 1);
    assert_eq!(accounts[0].flags, AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags::HISTORY);
    let transfers = json::decode_create_transfers(&example("/v1/transfers", "request")).unwrap();
    assert_eq!(transfers[1].flags, TransferFlags::LINKED | TransferFlags::PENDING);
    assert_eq!(transfers[2].amount, 50);
    let ids = json::decode_lookup_ids(&example("/v1/accounts/lookup", "request")).unwrap();
    assert_eq!(ids, vec![(1 << 64) | 1, 999]);
    let ids = json::decode_lookup_ids(&example("/v1/transfers/lookup", "request")).unwrap();
    assert_eq!(ids, vec![1001, 1004]);
    for path in ["/v1/accounts/transfers", "/v1/accounts/balances"] {
        let filter = json::decode_account_filter(&example(path, "request")).unwrap();
        assert_eq!(filter, AccountFilter { reversed: true, ..AccountFilter::account((1 << 64) | 1, 100) });
    }
}

#[test]
fn reply_examples_decode() {
    let results: CreateResultsJson = json::parse(&example("/v1/accounts", "reply")).unwrap();
    assert_eq!(results.to_account_results(), Ok(vec![CreateAccountResult::Ok, CreateAccountResult::Exists]));
    let results: CreateResultsJson = json::parse(&example("/v1/transfers", "reply")).unwrap();
    assert_eq!(results.to_transfer_results().unwrap().len(), 3);
    let accounts: AccountsJson = json::parse(&example("/v1/accounts/lookup", "reply")).unwrap();
    let accounts = accounts.to_ledger().unwrap();
    assert_eq!(accounts[0].credits_posted, 10_000);
    for path in ["/v1/transfers/lookup", "/v1/accounts/transfers"] {
        let transfers: TransfersJson = json::parse(&example(path, "reply")).unwrap();
        assert_eq!(transfers.to_ledger().unwrap()[0].amount, 2500);
    }
    let balances: BalancesJson = json::parse(&example("/v1/accounts/balances", "reply")).unwrap();
    assert_eq!(balances.to_ledger().unwrap()[0].debits_posted, 2500);
}

#[test]
fn reply_examples_are_complete() {
    // Replies carry every field: re-encoding an example gives the example back.
    let accounts: AccountsJson = json::parse(&example("/v1/accounts/lookup", "reply")).unwrap();
    let again = AccountsJson::from_ledger(&accounts.to_ledger().unwrap());
    assert_eq!(serde_json::to_value(again).unwrap(), example_value("/v1/accounts/lookup", "reply"));
    let transfers: TransfersJson = json::parse(&example("/v1/transfers/lookup", "reply")).unwrap();
    let again = TransfersJson::from_ledger(&transfers.to_ledger().unwrap());
    assert_eq!(serde_json::to_value(again).unwrap(), example_value("/v1/transfers/lookup", "reply"));
    let balances: BalancesJson = json::parse(&example("/v1/accounts/balances", "reply")).unwrap();
    let again = BalancesJson::from_ledger(&balances.to_ledger().unwrap());
    assert_eq!(serde_json::to_value(again).unwrap(), example_value("/v1/accounts/balances", "reply"));
}
