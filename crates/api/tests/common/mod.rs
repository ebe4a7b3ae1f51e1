//! Generators shared by the integration tests.

#![allow(dead_code)] // Each test file uses a different part.

use cellpay_ledger::{
    Account, AccountBalance, AccountFilter, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer,
    TransferFlags, BATCH_EVENTS_MAX,
};
use proptest::prelude::*;

pub fn account() -> impl Strategy<Value = Account> {
    let balances = (any::<u128>(), any::<u128>(), any::<u128>(), any::<u128>());
    let user_data = (any::<u128>(), any::<u64>(), any::<u32>());
    let rest = (any::<u32>(), any::<u16>(), any::<u16>(), any::<u64>());
    (any::<u128>(), balances, user_data, rest).prop_map(
        |(id, (debits_pending, debits_posted, credits_pending, credits_posted), (u128_, u64_, u32_), rest)| {
            let (ledger, code, flags, timestamp) = rest;
            Account {
                id,
                debits_pending,
                debits_posted,
                credits_pending,
                credits_posted,
                user_data_128: u128_,
                user_data_64: u64_,
                user_data_32: u32_,
                ledger,
                code,
                flags: AccountFlags(flags & AccountFlags::KNOWN),
                timestamp,
            }
        },
    )
}

pub fn transfer() -> impl Strategy<Value = Transfer> {
    let ids = (any::<u128>(), any::<u128>(), any::<u128>(), any::<u128>(), any::<u128>());
    let user_data = (any::<u128>(), any::<u64>(), any::<u32>());
    let rest = (any::<u32>(), any::<u32>(), any::<u16>(), any::<u16>(), any::<u64>());
    (ids, user_data, rest).prop_map(
        |((id, debit_account_id, credit_account_id, amount, pending_id), (u128_, u64_, u32_), rest)| {
            let (timeout_s, ledger, code, flags, timestamp) = rest;
            Transfer {
                id,
                debit_account_id,
                credit_account_id,
                amount,
                pending_id,
                user_data_128: u128_,
                user_data_64: u64_,
                user_data_32: u32_,
                timeout_s,
                ledger,
                code,
                flags: TransferFlags(flags & TransferFlags::KNOWN),
                timestamp,
            }
        },
    )
}

pub fn balance() -> impl Strategy<Value = AccountBalance> {
    (any::<u128>(), any::<u128>(), any::<u128>(), any::<u128>(), any::<u128>(), any::<u64>()).prop_map(
        |(account_id, debits_pending, debits_posted, credits_pending, credits_posted, timestamp)| AccountBalance {
            account_id,
            debits_pending,
            debits_posted,
            credits_pending,
            credits_posted,
            timestamp,
        },
    )
}

pub fn filter() -> impl Strategy<Value = AccountFilter> {
    let user_data = (any::<u128>(), any::<u64>(), any::<u32>(), any::<u16>());
    let rest = (any::<u64>(), any::<u64>(), any::<u32>(), any::<bool>(), any::<bool>(), any::<bool>());
    (any::<u128>(), user_data, rest).prop_map(|(account_id, (u128_, u64_, u32_, code), rest)| {
        let (timestamp_min, timestamp_max, limit, debits, credits, reversed) = rest;
        AccountFilter {
            account_id,
            user_data_128: u128_,
            user_data_64: u64_,
            user_data_32: u32_,
            code,
            timestamp_min,
            timestamp_max,
            limit,
            debits,
            credits,
            reversed,
        }
    })
}

pub fn account_results() -> impl Strategy<Value = Vec<CreateAccountResult>> {
    prop::collection::vec(prop::sample::select(CreateAccountResult::ALL), 0..32)
}

pub fn transfer_results() -> impl Strategy<Value = Vec<CreateTransferResult>> {
    prop::collection::vec(prop::sample::select(CreateTransferResult::ALL), 0..32)
}

/// A transfer with every field at its widest encoding and every flag set.
pub fn widest_transfer() -> Transfer {
    Transfer {
        id: u128::MAX,
        debit_account_id: u128::MAX,
        credit_account_id: u128::MAX,
        amount: u128::MAX,
        pending_id: u128::MAX,
        user_data_128: u128::MAX,
        user_data_64: u64::MAX,
        user_data_32: u32::MAX,
        timeout_s: u32::MAX,
        ledger: u32::MAX,
        code: u16::MAX,
        flags: TransferFlags(TransferFlags::KNOWN),
        timestamp: u64::MAX,
    }
}

/// An account with every field at its widest encoding and every flag set.
pub fn widest_account() -> Account {
    Account {
        id: u128::MAX,
        debits_pending: u128::MAX,
        debits_posted: u128::MAX,
        credits_pending: u128::MAX,
        credits_posted: u128::MAX,
        user_data_128: u128::MAX,
        user_data_64: u64::MAX,
        user_data_32: u32::MAX,
        ledger: u32::MAX,
        code: u16::MAX,
        flags: AccountFlags(AccountFlags::KNOWN),
        timestamp: u64::MAX,
    }
}

pub fn full_batch<T: Clone>(event: T) -> Vec<T> {
    vec![event; BATCH_EVENTS_MAX]
}
