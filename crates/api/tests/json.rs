//! The REST API's JSON bodies: round trips through text, defaults, and every
//! way a request can be refused, with its message.

mod common;

use cellpay_api::json::{
    self, AccountBalanceJson, AccountFilterJson, AccountJson, AccountsJson, BalancesJson, CreateResultsJson,
    ErrorBodyJson, IdsJson, TransferJson, TransfersJson,
};
use cellpay_api::{DecodeError, ErrorCode};
use cellpay_ledger::{Account, AccountFilter, CreateTransferResult, Transfer, TransferFlags, BATCH_EVENTS_MAX};
use proptest::prelude::*;

/// Serialises a wire value to JSON text and parses it back.
fn through_text<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let text = serde_json::to_vec(value).expect("wire types serialise");
    json::parse(&text).expect("what we write, we read")
}

proptest! {
    #[test]
    fn account_round_trips(account in common::account()) {
        let wire = through_text(&AccountJson::from_ledger(&account));
        prop_assert_eq!(wire.to_ledger(0), Ok(account));
    }

    #[test]
    fn transfer_round_trips(transfer in common::transfer()) {
        let wire = through_text(&TransferJson::from_ledger(&transfer));
        prop_assert_eq!(wire.to_ledger(0), Ok(transfer));
    }

    #[test]
    fn balance_round_trips(balance in common::balance()) {
        let wire = through_text(&AccountBalanceJson::from_ledger(&balance));
        prop_assert_eq!(wire.to_ledger(0), Ok(balance));
    }

    #[test]
    fn filter_round_trips(filter in common::filter()) {
        let wire = through_text(&AccountFilterJson::from_ledger(&filter));
        prop_assert_eq!(wire.to_ledger(), Ok(filter));
    }

    #[test]
    fn batches_round_trip(
        accounts in prop::collection::vec(common::account(), 0..8),
        transfers in prop::collection::vec(common::transfer(), 0..8),
        balances in prop::collection::vec(common::balance(), 0..8),
        ids in prop::collection::vec(any::<u128>(), 0..8),
    ) {
        prop_assert_eq!(through_text(&AccountsJson::from_ledger(&accounts)).to_ledger(), Ok(accounts));
        prop_assert_eq!(through_text(&TransfersJson::from_ledger(&transfers)).to_ledger(), Ok(transfers));
        prop_assert_eq!(through_text(&BalancesJson::from_ledger(&balances)).to_ledger(), Ok(balances));
        prop_assert_eq!(through_text(&IdsJson::from_ledger(&ids)).to_ledger(), Ok(ids));
    }

    #[test]
    fn results_round_trip(accounts in common::account_results(), transfers in common::transfer_results()) {
        let wire = through_text(&CreateResultsJson::from_account_results(&accounts));
        prop_assert_eq!(wire.to_account_results(), Ok(accounts));
        let wire = through_text(&CreateResultsJson::from_transfer_results(&transfers));
        prop_assert_eq!(wire.to_transfer_results(), Ok(transfers));
    }
}

#[test]
fn json_shapes_are_as_documented() {
    let transfer = Transfer {
        id: 1,
        debit_account_id: 2,
        credit_account_id: u128::MAX,
        amount: 10,
        flags: TransferFlags::LINKED | TransferFlags::PENDING,
        ledger: 7,
        code: 1,
        timestamp: u64::MAX,
        ..Transfer::default()
    };
    let text = serde_json::to_string(&TransfersJson::from_ledger(&[transfer])).unwrap();
    let expected = concat!(
        r#"{"transfers":[{"id":"1","debit_account_id":"2","#,
        r#""credit_account_id":"340282366920938463463374607431768211455","amount":"10","pending_id":"0","#,
        r#""user_data_128":"0","user_data_64":"0","user_data_32":0,"timeout_s":0,"ledger":7,"code":1,"#,
        r#""flags":["linked","pending"],"timestamp":"18446744073709551615"}]}"#,
    );
    assert_eq!(text, expected);
    let results = CreateResultsJson::from_transfer_results(&[CreateTransferResult::Ok, CreateTransferResult::Exists]);
    assert_eq!(
        serde_json::to_string(&results).unwrap(),
        r#"{"results":[{"index":0,"result":"ok"},{"index":1,"result":"exists"}]}"#
    );
}

#[test]
fn omitted_fields_are_zero() {
    let transfers = json::decode_create_transfers(br#"{"transfers":[{"id":"5"}]}"#).unwrap();
    assert_eq!(transfers, vec![Transfer { id: 5, ..Transfer::default() }]);
    let accounts = json::decode_create_accounts(br#"{"accounts":[{"id":"5","ledger":1,"code":2}]}"#).unwrap();
    assert_eq!(accounts, vec![Account { id: 5, ledger: 1, code: 2, ..Account::default() }]);
    let filter = json::decode_account_filter(br#"{"account_id":"5","limit":10,"credits":true}"#).unwrap();
    assert_eq!(filter, AccountFilter { account_id: 5, limit: 10, credits: true, ..AccountFilter::default() });
}

#[test]
fn full_batches_are_accepted() {
    let transfers = common::full_batch(common::widest_transfer());
    let body = serde_json::to_vec(&TransfersJson::from_ledger(&transfers)).unwrap();
    assert_eq!(json::decode_create_transfers(&body), Ok(transfers));
    let ids = vec![u128::MAX; BATCH_EVENTS_MAX];
    let body = serde_json::to_vec(&IdsJson::from_ledger(&ids)).unwrap();
    assert_eq!(json::decode_lookup_ids(&body), Ok(ids));
}

#[test]
fn full_batch_fits_body_bytes_max() {
    // Pretty-printed, as a careless client might send it.
    let accounts = AccountsJson::from_ledger(&common::full_batch(common::widest_account()));
    let transfers = TransfersJson::from_ledger(&common::full_batch(common::widest_transfer()));
    let accounts_bytes = serde_json::to_vec_pretty(&accounts).unwrap().len();
    let transfers_bytes = serde_json::to_vec_pretty(&transfers).unwrap().len();
    assert!(accounts_bytes < json::BODY_BYTES_MAX, "{accounts_bytes}");
    assert!(transfers_bytes < json::BODY_BYTES_MAX, "{transfers_bytes}");
}

/// Decodes `body` with `decode` and checks the error's code and message.
fn check<T: std::fmt::Debug>(decode: fn(&[u8]) -> Result<T, DecodeError>, body: &str, code: ErrorCode, message: &str) {
    let error = decode(body.as_bytes()).expect_err(body);
    assert_eq!(error.to_string(), message, "body: {body}");
    assert_eq!(error.code(), code, "body: {body}");
}

/// As [`check`], for serde's messages: only their start is ours to fix.
fn check_json<T: std::fmt::Debug>(decode: fn(&[u8]) -> Result<T, DecodeError>, body: &str, message_start: &str) {
    let error = decode(body.as_bytes()).expect_err(body);
    assert_eq!(error.code(), ErrorCode::InvalidJson, "body: {body}");
    assert!(error.to_string().starts_with(message_start), "body: {body}\nerror: {error}");
}

#[test]
fn bad_numbers_are_refused() {
    let transfers = json::decode_create_transfers;
    check(
        transfers,
        r#"{"transfers":[{"id":"1"},{"id":"2"},{"id":"3"},{"id":"4","amount":"abc"}]}"#,
        ErrorCode::InvalidNumber,
        r#"transfers[3].amount: not a decimal u128: "abc""#,
    );
    check(
        transfers,
        r#"{"transfers":[{"id":"1","debit_account_id":"-1"}]}"#,
        ErrorCode::InvalidNumber,
        r#"transfers[0].debit_account_id: not a decimal u128: "-1""#,
    );
    check(
        transfers,
        r#"{"transfers":[{"id":"340282366920938463463374607431768211456"}]}"#,
        ErrorCode::InvalidNumber,
        r#"transfers[0].id: out of range for u128: "340282366920938463463374607431768211456""#,
    );
    check(
        transfers,
        r#"{"transfers":[{"id":"1","user_data_64":"18446744073709551616"}]}"#,
        ErrorCode::InvalidNumber,
        r#"transfers[0].user_data_64: out of range for u64: "18446744073709551616""#,
    );
    check(
        transfers,
        r#"{"transfers":[{"id":"01"}]}"#,
        ErrorCode::InvalidNumber,
        r#"transfers[0].id: not a decimal u128: "01""#,
    );
    check(
        transfers,
        r#"{"transfers":[{"id":""}]}"#,
        ErrorCode::InvalidNumber,
        r#"transfers[0].id: not a decimal u128: """#,
    );
    check(
        json::decode_create_accounts,
        r#"{"accounts":[{"id":"1","timestamp":"1.5"}]}"#,
        ErrorCode::InvalidNumber,
        r#"accounts[0].timestamp: not a decimal u64: "1.5""#,
    );
    check(
        json::decode_lookup_ids,
        r#"{"ids":["1"," 2"]}"#,
        ErrorCode::InvalidNumber,
        r#"ids[1]: not a decimal u128: " 2""#,
    );
    check(
        json::decode_account_filter,
        r#"{"account_id":"1","limit":1,"debits":true,"timestamp_min":"x"}"#,
        ErrorCode::InvalidNumber,
        r#"timestamp_min: not a decimal u64: "x""#,
    );
}

#[test]
fn bad_flags_are_refused() {
    check(
        json::decode_create_transfers,
        r#"{"transfers":[{"id":"1","flags":["linked","pendng"]}]}"#,
        ErrorCode::InvalidFlag,
        concat!(
            r#"transfers[0].flags: unknown flag "pendng" (expected one of: linked, pending, post_pending_transfer, "#,
            "void_pending_transfer, balancing_debit, balancing_credit, closing_debit, closing_credit, cross_cell_leg)",
        ),
    );
    check(
        json::decode_create_accounts,
        r#"{"accounts":[{"id":"1","flags":["pending"]}]}"#,
        ErrorCode::InvalidFlag,
        concat!(
            r#"accounts[0].flags: unknown flag "pending" (expected one of: linked, debits_must_not_exceed_credits, "#,
            "credits_must_not_exceed_debits, history, closed)",
        ),
    );
    check(
        json::decode_create_accounts,
        r#"{"accounts":[{"id":"1","flags":["History"]}]}"#,
        ErrorCode::InvalidFlag,
        concat!(
            r#"accounts[0].flags: unknown flag "History" (expected one of: linked, debits_must_not_exceed_credits, "#,
            "credits_must_not_exceed_debits, history, closed)",
        ),
    );
    check(
        json::decode_create_transfers,
        r#"{"transfers":[{"id":"1"},{"id":"2","flags":["pending","pending"]}]}"#,
        ErrorCode::InvalidFlag,
        r#"transfers[1].flags: flag "pending" is listed more than once"#,
    );
}

#[test]
fn missing_ids_are_refused() {
    check(
        json::decode_create_transfers,
        r#"{"transfers":[{"id":"1"},{"amount":"5"}]}"#,
        ErrorCode::MissingField,
        "transfers[1].id: missing required field",
    );
    check(
        json::decode_create_accounts,
        r#"{"accounts":[{"id":null}]}"#,
        ErrorCode::MissingField,
        "accounts[0].id: missing required field",
    );
    check(
        json::decode_account_filter,
        r#"{"limit":10,"debits":true}"#,
        ErrorCode::MissingField,
        "account_id: missing required field",
    );
}

#[test]
fn batch_sizes_are_bounded() {
    check(
        json::decode_create_transfers,
        r#"{"transfers":[]}"#,
        ErrorCode::BatchEmpty,
        "transfers: batch is empty (send 1 to 8190 events)",
    );
    check(
        json::decode_create_accounts,
        r#"{"accounts":[]}"#,
        ErrorCode::BatchEmpty,
        "accounts: batch is empty (send 1 to 8190 events)",
    );
    check(
        json::decode_lookup_ids,
        r#"{"ids":[]}"#,
        ErrorCode::BatchEmpty,
        "ids: batch is empty (send 1 to 8190 events)",
    );

    let oversized = TransfersJson::from_ledger(&vec![Transfer { id: 1, ..Transfer::default() }; BATCH_EVENTS_MAX + 1]);
    check(
        json::decode_create_transfers,
        &serde_json::to_string(&oversized).unwrap(),
        ErrorCode::BatchTooLarge,
        "transfers: batch holds 8191 events, more than the 8190 allowed",
    );
    let oversized = IdsJson::from_ledger(&vec![1; BATCH_EVENTS_MAX + 1]);
    check(
        json::decode_lookup_ids,
        &serde_json::to_string(&oversized).unwrap(),
        ErrorCode::BatchTooLarge,
        "ids: batch holds 8191 events, more than the 8190 allowed",
    );
}

#[test]
fn oversized_bodies_are_refused() {
    let body = " ".repeat(json::BODY_BYTES_MAX + 1);
    check(
        json::decode_create_transfers,
        &body,
        ErrorCode::BodyTooLarge,
        "request body is 8388609 bytes, more than the 8388608 allowed",
    );
    assert_eq!(ErrorCode::BodyTooLarge.http_status(), 413);
}

#[test]
fn filters_that_cannot_run_are_refused() {
    let filter = json::decode_account_filter;
    check(
        filter,
        r#"{"account_id":"1","debits":true}"#,
        ErrorCode::InvalidFilter,
        "invalid filter: limit must be between 1 and 8190",
    );
    check(
        filter,
        r#"{"account_id":"0","limit":1,"debits":true}"#,
        ErrorCode::InvalidFilter,
        "invalid filter: account_id must not be zero",
    );
    check(
        filter,
        r#"{"account_id":"1","limit":1}"#,
        ErrorCode::InvalidFilter,
        "invalid filter: at least one of debits and credits must be set",
    );
    check(
        filter,
        r#"{"account_id":"1","limit":1,"credits":true,"timestamp_min":"9","timestamp_max":"8"}"#,
        ErrorCode::InvalidFilter,
        "invalid filter: timestamp_min must not exceed timestamp_max",
    );
}

#[test]
fn malformed_json_is_refused() {
    let transfers = json::decode_create_transfers;
    check_json(transfers, "not json", "malformed JSON: expected ident at line 1 column 2");
    check_json(transfers, r#"{"transfers":[{"id":"1","amout":"5"}]}"#, "malformed JSON: unknown field `amout`");
    check_json(transfers, r#"{"transfers":[{"id":"1","amount":5}]}"#, "malformed JSON: invalid type: integer `5`");
    check_json(transfers, r#"{"transfers":[{"id":"1","amount":null}]}"#, "malformed JSON: invalid type: null");
    check_json(
        transfers,
        r#"{"transfers":[{"id":"1","code":65536}]}"#,
        "malformed JSON: invalid value: integer `65536`",
    );
    check_json(transfers, r#"{"transfers":[{"id":"1","ledger":-1}]}"#, "malformed JSON: invalid value: integer `-1`");
    check_json(transfers, r#"{"transfers":[{"id":"1","flags":"linked"}]}"#, "malformed JSON: invalid type: string");
    check_json(transfers, r#"{"accounts":[{"id":"1"}]}"#, "malformed JSON: unknown field `accounts`");
    check_json(transfers, r#"{}"#, "malformed JSON: missing field `transfers`");
    check_json(
        json::decode_account_filter,
        r#"{"account_id":"1","limit":1,"debits":1}"#,
        "malformed JSON: invalid type",
    );
}

#[test]
fn long_json_messages_are_truncated() {
    let body = format!(r#"{{"transfers":[{{"{}":"1"}}]}}"#, "x".repeat(100_000));
    let error = json::decode_create_transfers(body.as_bytes()).unwrap_err();
    let chars = error.to_string().chars().count();
    assert!(chars <= cellpay_api::ERROR_JSON_MESSAGE_CHARS_MAX + "malformed JSON: …".len(), "{chars}");
}

#[test]
fn bad_replies_are_refused() {
    let results: CreateResultsJson =
        json::parse(br#"{"results":[{"index":0,"result":"ok"},{"index":2,"result":"ok"}]}"#).unwrap();
    assert_eq!(results.to_transfer_results().unwrap_err().to_string(), "results[1].index: expected 1, found 2");
    let results: CreateResultsJson = json::parse(br#"{"results":[{"index":0,"result":"okay"}]}"#).unwrap();
    let error = results.to_transfer_results().unwrap_err();
    assert_eq!(error.to_string(), r#"results[0].result: unknown result code "okay""#);
    assert_eq!(error.code(), ErrorCode::Internal);
    // An account result is not a transfer result.
    let results = CreateResultsJson::from_transfer_results(&[CreateTransferResult::ExceedsCredits]);
    assert!(results.to_account_results().is_err());
}

#[test]
fn error_bodies_have_the_documented_shape() {
    let error = json::decode_create_transfers(br#"{"transfers":[]}"#).unwrap_err();
    let body = serde_json::to_string(&ErrorBodyJson::from_decode_error(&error)).unwrap();
    assert_eq!(
        body,
        r#"{"error":{"code":"batch_empty","message":"transfers: batch is empty (send 1 to 8190 events)"}}"#
    );
    assert_eq!(error.code().http_status(), 400);
    let body = serde_json::to_string(&ErrorBodyJson::new(ErrorCode::Overloaded, "try later")).unwrap();
    assert_eq!(body, r#"{"error":{"code":"overloaded","message":"try later"}}"#);
    assert_eq!(ErrorCode::Overloaded.http_status(), 503);
}
