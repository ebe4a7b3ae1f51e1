//! The gRPC API: the protobuf messages and the tonic client and server
//! generated from `proto/cellpay.proto` (package `cellpay.v1`), and their
//! conversions to and from ledger types.
//!
//! - [`ledger_server::Ledger`] is the trait the server implements, and
//!   [`ledger_server::LedgerServer`] wraps it as a tonic service;
//!   [`ledger_client::LedgerClient`] is the client.
//! - Every message that mirrors a ledger type has `from_ledger` and `to_ledger`.
//!   Request `to_ledger` checks what the wire shape cannot: required fields,
//!   u16 ranges, batch limits, and the filter (`AccountFilter::validate`). A
//!   [`DecodeError`] turns into a `tonic::Status` (`INVALID_ARGUMENT`) with `?`.
//! - A u128 is a [`Uint128`] (`hi * 2^64 + lo`). Encoding leaves zero-valued
//!   optional `Uint128` fields out; decoding reads an absent one as zero.

use cellpay_ledger as ledger;
use cellpay_ledger::{CreateAccountResult, CreateTransferResult};

use crate::error::{DecodeError, FieldPath};
use crate::wire::{check_batch, narrow_u16};

tonic::include_proto!("cellpay.v1");

/// The largest message the gRPC API sends or accepts; set it as the tonic
/// server's and client's `max_decoding_message_size`.
///
/// A full batch of 8,190 events with every field at its widest is 1.3 MiB
/// (see the test `full_batches_fit_message_bytes_max`).
pub const MESSAGE_BYTES_MAX: usize = 4 * 1024 * 1024;

impl From<u128> for Uint128 {
    fn from(value: u128) -> Uint128 {
        Uint128 { lo: value as u64, hi: (value >> 64) as u64 }
    }
}

impl From<Uint128> for u128 {
    fn from(value: Uint128) -> u128 {
        (u128::from(value.hi) << 64) | u128::from(value.lo)
    }
}

/// An optional `Uint128` field: left out when zero.
fn optional(value: u128) -> Option<Uint128> {
    (value != 0).then(|| Uint128::from(value))
}

fn or_zero(value: Option<Uint128>) -> u128 {
    value.map_or(0, u128::from)
}

fn required(field: FieldPath, value: Option<Uint128>) -> Result<u128, DecodeError> {
    value.map(u128::from).ok_or(DecodeError::MissingField { field })
}

fn index_u32(index: usize) -> u32 {
    u32::try_from(index).expect("a batch holds at most BATCH_EVENTS_MAX events")
}

impl Account {
    pub fn from_ledger(account: &ledger::Account) -> Account {
        Account {
            id: Some(account.id.into()),
            debits_pending: optional(account.debits_pending),
            debits_posted: optional(account.debits_posted),
            credits_pending: optional(account.credits_pending),
            credits_posted: optional(account.credits_posted),
            user_data_128: optional(account.user_data_128),
            user_data_64: account.user_data_64,
            user_data_32: account.user_data_32,
            ledger: account.ledger,
            code: u32::from(account.code),
            flags: u32::from(account.flags.0),
            timestamp: account.timestamp,
        }
    }

    /// Decodes the `index`-th element of `accounts`.
    pub fn to_ledger(&self, index: usize) -> Result<ledger::Account, DecodeError> {
        let at = |field| FieldPath::event("accounts", index, field);
        Ok(ledger::Account {
            id: required(at("id"), self.id)?,
            debits_pending: or_zero(self.debits_pending),
            debits_posted: or_zero(self.debits_posted),
            credits_pending: or_zero(self.credits_pending),
            credits_posted: or_zero(self.credits_posted),
            user_data_128: or_zero(self.user_data_128),
            user_data_64: self.user_data_64,
            user_data_32: self.user_data_32,
            ledger: self.ledger,
            code: narrow_u16(at("code"), self.code)?,
            flags: ledger::AccountFlags(narrow_u16(at("flags"), self.flags)?),
            timestamp: self.timestamp,
        })
    }
}

impl Transfer {
    pub fn from_ledger(transfer: &ledger::Transfer) -> Transfer {
        Transfer {
            id: Some(transfer.id.into()),
            debit_account_id: optional(transfer.debit_account_id),
            credit_account_id: optional(transfer.credit_account_id),
            amount: optional(transfer.amount),
            pending_id: optional(transfer.pending_id),
            user_data_128: optional(transfer.user_data_128),
            user_data_64: transfer.user_data_64,
            user_data_32: transfer.user_data_32,
            timeout_s: transfer.timeout_s,
            ledger: transfer.ledger,
            code: u32::from(transfer.code),
            flags: u32::from(transfer.flags.0),
            timestamp: transfer.timestamp,
        }
    }

    /// Decodes the `index`-th element of `transfers`.
    pub fn to_ledger(&self, index: usize) -> Result<ledger::Transfer, DecodeError> {
        let at = |field| FieldPath::event("transfers", index, field);
        Ok(ledger::Transfer {
            id: required(at("id"), self.id)?,
            debit_account_id: or_zero(self.debit_account_id),
            credit_account_id: or_zero(self.credit_account_id),
            amount: or_zero(self.amount),
            pending_id: or_zero(self.pending_id),
            user_data_128: or_zero(self.user_data_128),
            user_data_64: self.user_data_64,
            user_data_32: self.user_data_32,
            timeout_s: self.timeout_s,
            ledger: self.ledger,
            code: narrow_u16(at("code"), self.code)?,
            flags: ledger::TransferFlags(narrow_u16(at("flags"), self.flags)?),
            timestamp: self.timestamp,
        })
    }
}

impl AccountBalance {
    pub fn from_ledger(balance: &ledger::AccountBalance) -> AccountBalance {
        AccountBalance {
            account_id: Some(balance.account_id.into()),
            debits_pending: optional(balance.debits_pending),
            debits_posted: optional(balance.debits_posted),
            credits_pending: optional(balance.credits_pending),
            credits_posted: optional(balance.credits_posted),
            timestamp: balance.timestamp,
        }
    }

    /// Decodes the `index`-th element of `balances`.
    pub fn to_ledger(&self, index: usize) -> Result<ledger::AccountBalance, DecodeError> {
        let at = |field| FieldPath::event("balances", index, field);
        Ok(ledger::AccountBalance {
            account_id: required(at("account_id"), self.account_id)?,
            debits_pending: or_zero(self.debits_pending),
            debits_posted: or_zero(self.debits_posted),
            credits_pending: or_zero(self.credits_pending),
            credits_posted: or_zero(self.credits_posted),
            timestamp: self.timestamp,
        })
    }
}

impl AccountFilter {
    pub fn from_ledger(filter: &ledger::AccountFilter) -> AccountFilter {
        AccountFilter {
            account_id: Some(filter.account_id.into()),
            user_data_128: optional(filter.user_data_128),
            user_data_64: filter.user_data_64,
            user_data_32: filter.user_data_32,
            code: u32::from(filter.code),
            timestamp_min: filter.timestamp_min,
            timestamp_max: filter.timestamp_max,
            limit: filter.limit,
            debits: filter.debits,
            credits: filter.credits,
            reversed: filter.reversed,
        }
    }

    /// Decodes the filter's fields (as the `filter` of a request); does not run
    /// `AccountFilter::validate` (the requests' `to_ledger` do).
    pub fn to_ledger(&self) -> Result<ledger::AccountFilter, DecodeError> {
        let at = |field| FieldPath::field("filter", field);
        Ok(ledger::AccountFilter {
            account_id: required(at("account_id"), self.account_id)?,
            user_data_128: or_zero(self.user_data_128),
            user_data_64: self.user_data_64,
            user_data_32: self.user_data_32,
            code: narrow_u16(at("code"), self.code)?,
            timestamp_min: self.timestamp_min,
            timestamp_max: self.timestamp_max,
            limit: self.limit,
            debits: self.debits,
            credits: self.credits,
            reversed: self.reversed,
        })
    }
}

impl CreateAccountsRequest {
    pub fn from_ledger(accounts: &[ledger::Account]) -> CreateAccountsRequest {
        CreateAccountsRequest { accounts: accounts.iter().map(Account::from_ledger).collect() }
    }

    /// 1 to `BATCH_EVENTS_MAX` accounts.
    pub fn to_ledger(&self) -> Result<Vec<ledger::Account>, DecodeError> {
        check_batch(FieldPath::field("accounts", ""), self.accounts.len())?;
        self.accounts.iter().enumerate().map(|(index, account)| account.to_ledger(index)).collect()
    }
}

impl CreateTransfersRequest {
    pub fn from_ledger(transfers: &[ledger::Transfer]) -> CreateTransfersRequest {
        CreateTransfersRequest { transfers: transfers.iter().map(Transfer::from_ledger).collect() }
    }

    /// 1 to `BATCH_EVENTS_MAX` transfers.
    pub fn to_ledger(&self) -> Result<Vec<ledger::Transfer>, DecodeError> {
        check_batch(FieldPath::field("transfers", ""), self.transfers.len())?;
        self.transfers.iter().enumerate().map(|(index, transfer)| transfer.to_ledger(index)).collect()
    }
}

fn ids_to_ledger(ids: &[Uint128]) -> Result<Vec<u128>, DecodeError> {
    check_batch(FieldPath::field("ids", ""), ids.len())?;
    Ok(ids.iter().copied().map(u128::from).collect())
}

impl LookupAccountsRequest {
    pub fn from_ledger(ids: &[u128]) -> LookupAccountsRequest {
        LookupAccountsRequest { ids: ids.iter().copied().map(Uint128::from).collect() }
    }

    /// 1 to `BATCH_EVENTS_MAX` ids.
    pub fn to_ledger(&self) -> Result<Vec<u128>, DecodeError> {
        ids_to_ledger(&self.ids)
    }
}

impl LookupTransfersRequest {
    pub fn from_ledger(ids: &[u128]) -> LookupTransfersRequest {
        LookupTransfersRequest { ids: ids.iter().copied().map(Uint128::from).collect() }
    }

    /// 1 to `BATCH_EVENTS_MAX` ids.
    pub fn to_ledger(&self) -> Result<Vec<u128>, DecodeError> {
        ids_to_ledger(&self.ids)
    }
}

fn filter_to_ledger(filter: Option<&AccountFilter>) -> Result<ledger::AccountFilter, DecodeError> {
    let filter = filter.ok_or(DecodeError::MissingField { field: FieldPath::field("", "filter") })?;
    let filter = filter.to_ledger()?;
    filter.validate()?;
    Ok(filter)
}

impl GetAccountTransfersRequest {
    pub fn from_ledger(filter: &ledger::AccountFilter) -> GetAccountTransfersRequest {
        GetAccountTransfersRequest { filter: Some(AccountFilter::from_ledger(filter)) }
    }

    /// A filter that passes `AccountFilter::validate`.
    pub fn to_ledger(&self) -> Result<ledger::AccountFilter, DecodeError> {
        filter_to_ledger(self.filter.as_ref())
    }
}

impl GetAccountBalancesRequest {
    pub fn from_ledger(filter: &ledger::AccountFilter) -> GetAccountBalancesRequest {
        GetAccountBalancesRequest { filter: Some(AccountFilter::from_ledger(filter)) }
    }

    /// A filter that passes `AccountFilter::validate`.
    pub fn to_ledger(&self) -> Result<ledger::AccountFilter, DecodeError> {
        filter_to_ledger(self.filter.as_ref())
    }
}

fn results_from_codes(codes: impl Iterator<Item = u32>) -> Vec<CreateResult> {
    codes.enumerate().map(|(index, result)| CreateResult { index: index_u32(index), result }).collect()
}

fn results_to_ledger<R>(results: &[CreateResult], from_u32: impl Fn(u32) -> Option<R>) -> Result<Vec<R>, DecodeError> {
    let mut codes = Vec::with_capacity(results.len());
    for (index, result) in results.iter().enumerate() {
        if usize::try_from(result.index) != Ok(index) {
            let field = FieldPath::event("results", index, "index");
            return Err(DecodeError::ResultIndex { field, expected: index, found: result.index });
        }
        let Some(code) = from_u32(result.result) else {
            let field = FieldPath::event("results", index, "result");
            return Err(DecodeError::UnknownResult { field, value: result.result.to_string() });
        };
        codes.push(code);
    }
    Ok(codes)
}

impl CreateAccountsReply {
    pub fn from_ledger(results: &[CreateAccountResult]) -> CreateAccountsReply {
        CreateAccountsReply { results: results_from_codes(results.iter().map(|result| *result as u32)) }
    }

    /// Client side: one result per event, in request order.
    pub fn to_ledger(&self) -> Result<Vec<CreateAccountResult>, DecodeError> {
        results_to_ledger(&self.results, CreateAccountResult::from_u32)
    }
}

impl CreateTransfersReply {
    pub fn from_ledger(results: &[CreateTransferResult]) -> CreateTransfersReply {
        CreateTransfersReply { results: results_from_codes(results.iter().map(|result| *result as u32)) }
    }

    /// Client side: one result per event, in request order.
    pub fn to_ledger(&self) -> Result<Vec<CreateTransferResult>, DecodeError> {
        results_to_ledger(&self.results, CreateTransferResult::from_u32)
    }
}

impl LookupAccountsReply {
    pub fn from_ledger(accounts: &[ledger::Account]) -> LookupAccountsReply {
        LookupAccountsReply { accounts: accounts.iter().map(Account::from_ledger).collect() }
    }

    pub fn to_ledger(&self) -> Result<Vec<ledger::Account>, DecodeError> {
        self.accounts.iter().enumerate().map(|(index, account)| account.to_ledger(index)).collect()
    }
}

impl LookupTransfersReply {
    pub fn from_ledger(transfers: &[ledger::Transfer]) -> LookupTransfersReply {
        LookupTransfersReply { transfers: transfers.iter().map(Transfer::from_ledger).collect() }
    }

    pub fn to_ledger(&self) -> Result<Vec<ledger::Transfer>, DecodeError> {
        self.transfers.iter().enumerate().map(|(index, transfer)| transfer.to_ledger(index)).collect()
    }
}

impl GetAccountTransfersReply {
    pub fn from_ledger(transfers: &[ledger::Transfer]) -> GetAccountTransfersReply {
        GetAccountTransfersReply { transfers: transfers.iter().map(Transfer::from_ledger).collect() }
    }

    pub fn to_ledger(&self) -> Result<Vec<ledger::Transfer>, DecodeError> {
        self.transfers.iter().enumerate().map(|(index, transfer)| transfer.to_ledger(index)).collect()
    }
}

impl GetAccountBalancesReply {
    pub fn from_ledger(balances: &[ledger::AccountBalance]) -> GetAccountBalancesReply {
        GetAccountBalancesReply { balances: balances.iter().map(AccountBalance::from_ledger).collect() }
    }

    pub fn to_ledger(&self) -> Result<Vec<ledger::AccountBalance>, DecodeError> {
        self.balances.iter().enumerate().map(|(index, balance)| balance.to_ledger(index)).collect()
    }
}
