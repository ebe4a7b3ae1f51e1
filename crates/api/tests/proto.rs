//! The gRPC API's messages: round trips through protobuf bytes, and every way a
//! request can be refused, with its message.

mod common;

use cellpay_api::proto::{self, Uint128};
use cellpay_api::{DecodeError, ErrorCode};
use cellpay_ledger::{
    AccountFilter, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags, BATCH_EVENTS_MAX,
    QUERY_LIMIT_MAX,
};
use proptest::prelude::*;
use prost::Message;

/// Encodes a message to protobuf bytes and decodes it back.
fn through_bytes<M: Message + Default>(message: &M) -> M {
    M::decode(message.encode_to_vec().as_slice()).expect("what we write, we read")
}

proptest! {
    #[test]
    fn uint128_round_trips(value in any::<u128>()) {
        prop_assert_eq!(u128::from(through_bytes(&Uint128::from(value))), value);
    }

    #[test]
    fn account_round_trips(account in common::account()) {
        let wire = through_bytes(&proto::Account::from_ledger(&account));
        prop_assert_eq!(wire.to_ledger(0), Ok(account));
    }

    #[test]
    fn transfer_round_trips(transfer in common::transfer()) {
        let wire = through_bytes(&proto::Transfer::from_ledger(&transfer));
        prop_assert_eq!(wire.to_ledger(0), Ok(transfer));
    }

    #[test]
    fn balance_round_trips(balance in common::balance()) {
        let wire = through_bytes(&proto::AccountBalance::from_ledger(&balance));
        prop_assert_eq!(wire.to_ledger(0), Ok(balance));
    }

    #[test]
    fn filter_round_trips(filter in common::filter()) {
        let wire = through_bytes(&proto::AccountFilter::from_ledger(&filter));
        prop_assert_eq!(wire.to_ledger(), Ok(filter));
    }

    #[test]
    fn requests_round_trip(
        accounts in prop::collection::vec(common::account(), 1..8),
        transfers in prop::collection::vec(common::transfer(), 1..8),
        ids in prop::collection::vec(any::<u128>(), 1..8),
    ) {
        let wire = through_bytes(&proto::CreateAccountsRequest::from_ledger(&accounts));
        prop_assert_eq!(wire.to_ledger(), Ok(accounts));
        let wire = through_bytes(&proto::CreateTransfersRequest::from_ledger(&transfers));
        prop_assert_eq!(wire.to_ledger(), Ok(transfers));
        prop_assert_eq!(through_bytes(&proto::LookupAccountsRequest::from_ledger(&ids)).to_ledger(), Ok(ids.clone()));
        prop_assert_eq!(through_bytes(&proto::LookupTransfersRequest::from_ledger(&ids)).to_ledger(), Ok(ids));
    }

    #[test]
    fn valid_filter_requests_round_trip(filter in common::filter()) {
        let filter = AccountFilter {
            account_id: filter.account_id.clamp(1, u128::MAX - 1),
            limit: filter.limit % QUERY_LIMIT_MAX + 1,
            credits: filter.credits || !filter.debits,
            timestamp_max: filter.timestamp_max.max(filter.timestamp_min),
            ..filter
        };
        let wire = through_bytes(&proto::GetAccountTransfersRequest::from_ledger(&filter));
        prop_assert_eq!(wire.to_ledger(), Ok(filter));
        let wire = through_bytes(&proto::GetAccountBalancesRequest::from_ledger(&filter));
        prop_assert_eq!(wire.to_ledger(), Ok(filter));
    }

    #[test]
    fn replies_round_trip(
        accounts in prop::collection::vec(common::account(), 0..8),
        transfers in prop::collection::vec(common::transfer(), 0..8),
        balances in prop::collection::vec(common::balance(), 0..8),
        account_results in common::account_results(),
        transfer_results in common::transfer_results(),
    ) {
        let wire = through_bytes(&proto::LookupAccountsReply::from_ledger(&accounts));
        prop_assert_eq!(wire.to_ledger(), Ok(accounts));
        let wire = through_bytes(&proto::LookupTransfersReply::from_ledger(&transfers));
        prop_assert_eq!(wire.to_ledger(), Ok(transfers.clone()));
        let wire = through_bytes(&proto::GetAccountTransfersReply::from_ledger(&transfers));
        prop_assert_eq!(wire.to_ledger(), Ok(transfers));
        let wire = through_bytes(&proto::GetAccountBalancesReply::from_ledger(&balances));
        prop_assert_eq!(wire.to_ledger(), Ok(balances));
        let wire = through_bytes(&proto::CreateAccountsReply::from_ledger(&account_results));
        prop_assert_eq!(wire.to_ledger(), Ok(account_results));
        let wire = through_bytes(&proto::CreateTransfersReply::from_ledger(&transfer_results));
        prop_assert_eq!(wire.to_ledger(), Ok(transfer_results));
    }
}

#[test]
fn uint128_halves_are_as_documented() {
    assert_eq!(Uint128::from((1u128 << 64) + 5), Uint128 { lo: 5, hi: 1 });
    assert_eq!(Uint128::from(u128::MAX), Uint128 { lo: u64::MAX, hi: u64::MAX });
    assert_eq!(u128::from(Uint128 { lo: 0, hi: 1 }), 1u128 << 64);
}

#[test]
fn zero_fields_are_left_out_and_read_as_zero() {
    let transfer = Transfer { id: 7, amount: 0, ..Transfer::default() };
    let wire = proto::Transfer::from_ledger(&transfer);
    assert_eq!(wire.amount, None);
    assert_eq!(wire.id, Some(Uint128 { lo: 7, hi: 0 }));
    // Tag 1 (id, length-delimited), length 9, then the fixed64 `lo` (tag 1, wire type 1).
    assert_eq!(wire.encode_to_vec(), [0x0a, 9, 0x09, 7, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(through_bytes(&wire).to_ledger(0), Ok(transfer));
}

#[test]
fn reserved_flag_bits_pass_through_to_the_ledger() {
    let wire = proto::Transfer { id: Some(1.into()), flags: 1 << 15, ..proto::Transfer::default() };
    let transfer = wire.to_ledger(0).unwrap();
    assert_eq!(transfer.flags, TransferFlags(1 << 15));
    assert!(transfer.flags.has_reserved_bits());
}

#[test]
fn full_batches_fit_message_bytes_max() {
    let transfers = common::full_batch(common::widest_transfer());
    let accounts = common::full_batch(common::widest_account());
    let sizes = [
        proto::CreateTransfersRequest::from_ledger(&transfers).encoded_len(),
        proto::CreateAccountsRequest::from_ledger(&accounts).encoded_len(),
        proto::LookupAccountsReply::from_ledger(&accounts).encoded_len(),
        proto::GetAccountTransfersReply::from_ledger(&transfers).encoded_len(),
    ];
    for size in sizes {
        assert!(size <= proto::MESSAGE_BYTES_MAX, "{size}");
    }
    let request = proto::CreateTransfersRequest::from_ledger(&transfers);
    assert_eq!(through_bytes(&request).to_ledger(), Ok(transfers));
}

/// Checks a decoding error's message and its gRPC status.
fn check<T: std::fmt::Debug>(result: Result<T, DecodeError>, message: &str) {
    let error = result.expect_err(message);
    assert_eq!(error.to_string(), message);
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), message);
}

fn transfer(id: u128) -> proto::Transfer {
    proto::Transfer { id: Some(id.into()), ..proto::Transfer::default() }
}

#[test]
fn missing_required_fields_are_refused() {
    let request = proto::CreateTransfersRequest { transfers: vec![transfer(1), proto::Transfer::default()] };
    check(request.to_ledger(), "transfers[1].id: missing required field");
    let request = proto::CreateAccountsRequest { accounts: vec![proto::Account::default()] };
    check(request.to_ledger(), "accounts[0].id: missing required field");
    check(proto::GetAccountTransfersRequest { filter: None }.to_ledger(), "filter: missing required field");
    let filter = proto::AccountFilter { limit: 1, debits: true, ..proto::AccountFilter::default() };
    let request = proto::GetAccountBalancesRequest { filter: Some(filter) };
    check(request.to_ledger(), "filter.account_id: missing required field");
}

#[test]
fn values_over_u16_are_refused() {
    let request = proto::CreateTransfersRequest { transfers: vec![proto::Transfer { code: 65536, ..transfer(1) }] };
    check(request.to_ledger(), "transfers[0].code: out of range for u16: 65536");
    let request = proto::CreateTransfersRequest { transfers: vec![proto::Transfer { flags: 1 << 16, ..transfer(1) }] };
    check(request.to_ledger(), "transfers[0].flags: out of range for u16: 65536");
    let account = proto::Account { id: Some(1.into()), flags: u32::MAX, ..proto::Account::default() };
    let request = proto::CreateAccountsRequest { accounts: vec![account] };
    check(request.to_ledger(), "accounts[0].flags: out of range for u16: 4294967295");
}

#[test]
fn batch_sizes_are_bounded() {
    check(
        proto::CreateTransfersRequest { transfers: vec![] }.to_ledger(),
        "transfers: batch is empty (send 1 to 8190 events)",
    );
    check(
        proto::CreateAccountsRequest { accounts: vec![] }.to_ledger(),
        "accounts: batch is empty (send 1 to 8190 events)",
    );
    check(proto::LookupAccountsRequest { ids: vec![] }.to_ledger(), "ids: batch is empty (send 1 to 8190 events)");
    let request = proto::CreateTransfersRequest { transfers: vec![transfer(1); BATCH_EVENTS_MAX + 1] };
    check(request.to_ledger(), "transfers: batch holds 8191 events, more than the 8190 allowed");
    let request = proto::LookupTransfersRequest { ids: vec![Uint128::from(1); BATCH_EVENTS_MAX + 1] };
    check(request.to_ledger(), "ids: batch holds 8191 events, more than the 8190 allowed");
}

#[test]
fn filters_that_cannot_run_are_refused() {
    let filter = AccountFilter::account(1, 0);
    check(
        proto::GetAccountTransfersRequest::from_ledger(&filter).to_ledger(),
        "invalid filter: limit must be between 1 and 8190",
    );
    let filter = AccountFilter::account(u128::MAX, 10);
    check(
        proto::GetAccountBalancesRequest::from_ledger(&filter).to_ledger(),
        "invalid filter: account_id must not be 2^128-1",
    );
}

#[test]
fn bad_replies_are_refused() {
    let reply = proto::CreateTransfersReply {
        results: vec![proto::CreateResult { index: 0, result: 0 }, proto::CreateResult { index: 0, result: 0 }],
    };
    assert_eq!(reply.to_ledger().unwrap_err().to_string(), "results[1].index: expected 1, found 0");
    let last = CreateTransferResult::ALL.len() as u32;
    let reply = proto::CreateTransfersReply { results: vec![proto::CreateResult { index: 0, result: last }] };
    let error = reply.to_ledger().unwrap_err();
    assert_eq!(error.to_string(), format!("results[0].result: unknown result code {last}"));
    assert_eq!(error.code(), ErrorCode::Internal);
    let last = CreateAccountResult::ALL.len() as u32;
    let reply = proto::CreateAccountsReply { results: vec![proto::CreateResult { index: 0, result: last }] };
    assert!(reply.to_ledger().is_err());
}

#[test]
fn result_codes_travel_as_their_numbers() {
    let reply =
        proto::CreateTransfersReply::from_ledger(&[CreateTransferResult::Ok, CreateTransferResult::ExceedsCredits]);
    let codes: Vec<(u32, u32)> = reply.results.iter().map(|result| (result.index, result.result)).collect();
    assert_eq!(codes, vec![(0, 0), (1, CreateTransferResult::ExceedsCredits as u32)]);
}
