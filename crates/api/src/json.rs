//! The REST API's JSON bodies and their conversions to and from ledger types.
//!
//! Shapes (the OpenAPI document, `openapi.json`, is the reference):
//! - u128 and u64 fields (ids, amounts, `user_data_128`, `user_data_64`,
//!   timestamps) are canonical decimal strings: `"340282366920938463463374607431768211455"`.
//!   JSON numbers cannot hold a u128, and JavaScript cannot hold a u64.
//!   Digits only: no sign, no whitespace, no leading zero.
//! - u32 and u16 fields (`user_data_32`, `ledger`, `code`, `timeout_s`, `limit`) are numbers.
//! - Flags are a list of lowercase names: `["linked", "pending"]`.
//! - An omitted field is zero (or empty, or false), except the field that names
//!   the record (`id`, `account_id`), which is required. Unknown fields are refused.
//! - A create reply holds one result per event, in request order: `{"index": 0, "result": "ok"}`.
//!
//! The server calls the `decode_*` functions on request bodies (they check the
//! size, the shape and the batch limits) and the `from_*` constructors for
//! replies. Clients use the same types the other way round.

use cellpay_ledger::{
    Account, AccountBalance, AccountFilter, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer,
    TransferFlags,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, ErrorCode, FieldPath};
use crate::wire::{check_batch, flags_from_names, flags_to_names, parse_u128, parse_u64};

/// The largest request body the REST API accepts (HTTP 413 above).
///
/// A full batch of 8,190 transfers with every field at its widest and every
/// flag set is 5.0 MiB of compact JSON, 6.5 MiB pretty-printed (see the test
/// `full_batch_fits_body_bytes_max`).
pub const BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

fn zero() -> String {
    "0".to_string()
}

/// An account. On create, leave the balances and `timestamp` out (they must be zero).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountJson {
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default = "zero")]
    pub debits_pending: String,
    #[serde(default = "zero")]
    pub debits_posted: String,
    #[serde(default = "zero")]
    pub credits_pending: String,
    #[serde(default = "zero")]
    pub credits_posted: String,
    #[serde(default = "zero")]
    pub user_data_128: String,
    #[serde(default = "zero")]
    pub user_data_64: String,
    #[serde(default)]
    pub user_data_32: u32,
    #[serde(default)]
    pub ledger: u32,
    #[serde(default)]
    pub code: u16,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default = "zero")]
    pub timestamp: String,
}

impl AccountJson {
    pub fn from_ledger(account: &Account) -> AccountJson {
        AccountJson {
            id: Some(account.id.to_string()),
            debits_pending: account.debits_pending.to_string(),
            debits_posted: account.debits_posted.to_string(),
            credits_pending: account.credits_pending.to_string(),
            credits_posted: account.credits_posted.to_string(),
            user_data_128: account.user_data_128.to_string(),
            user_data_64: account.user_data_64.to_string(),
            user_data_32: account.user_data_32,
            ledger: account.ledger,
            code: account.code,
            flags: flags_to_names(account.flags),
            timestamp: account.timestamp.to_string(),
        }
    }

    /// Decodes the `index`-th element of `accounts`.
    pub fn to_ledger(&self, index: usize) -> Result<Account, DecodeError> {
        let at = |field| FieldPath::event("accounts", index, field);
        Ok(Account {
            id: required_u128(at("id"), &self.id)?,
            debits_pending: parse_u128(at("debits_pending"), &self.debits_pending)?,
            debits_posted: parse_u128(at("debits_posted"), &self.debits_posted)?,
            credits_pending: parse_u128(at("credits_pending"), &self.credits_pending)?,
            credits_posted: parse_u128(at("credits_posted"), &self.credits_posted)?,
            user_data_128: parse_u128(at("user_data_128"), &self.user_data_128)?,
            user_data_64: parse_u64(at("user_data_64"), &self.user_data_64)?,
            user_data_32: self.user_data_32,
            ledger: self.ledger,
            code: self.code,
            flags: flags_from_names::<AccountFlags>(at("flags"), &self.flags)?,
            timestamp: parse_u64(at("timestamp"), &self.timestamp)?,
        })
    }
}

/// A transfer. On create, leave `timestamp` out (it must be zero).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferJson {
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default = "zero")]
    pub debit_account_id: String,
    #[serde(default = "zero")]
    pub credit_account_id: String,
    #[serde(default = "zero")]
    pub amount: String,
    #[serde(default = "zero")]
    pub pending_id: String,
    #[serde(default = "zero")]
    pub user_data_128: String,
    #[serde(default = "zero")]
    pub user_data_64: String,
    #[serde(default)]
    pub user_data_32: u32,
    #[serde(default)]
    pub timeout_s: u32,
    #[serde(default)]
    pub ledger: u32,
    #[serde(default)]
    pub code: u16,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default = "zero")]
    pub timestamp: String,
}

impl TransferJson {
    pub fn from_ledger(transfer: &Transfer) -> TransferJson {
        TransferJson {
            id: Some(transfer.id.to_string()),
            debit_account_id: transfer.debit_account_id.to_string(),
            credit_account_id: transfer.credit_account_id.to_string(),
            amount: transfer.amount.to_string(),
            pending_id: transfer.pending_id.to_string(),
            user_data_128: transfer.user_data_128.to_string(),
            user_data_64: transfer.user_data_64.to_string(),
            user_data_32: transfer.user_data_32,
            timeout_s: transfer.timeout_s,
            ledger: transfer.ledger,
            code: transfer.code,
            flags: flags_to_names(transfer.flags),
            timestamp: transfer.timestamp.to_string(),
        }
    }

    /// Decodes the `index`-th element of `transfers`.
    pub fn to_ledger(&self, index: usize) -> Result<Transfer, DecodeError> {
        let at = |field| FieldPath::event("transfers", index, field);
        Ok(Transfer {
            id: required_u128(at("id"), &self.id)?,
            debit_account_id: parse_u128(at("debit_account_id"), &self.debit_account_id)?,
            credit_account_id: parse_u128(at("credit_account_id"), &self.credit_account_id)?,
            amount: parse_u128(at("amount"), &self.amount)?,
            pending_id: parse_u128(at("pending_id"), &self.pending_id)?,
            user_data_128: parse_u128(at("user_data_128"), &self.user_data_128)?,
            user_data_64: parse_u64(at("user_data_64"), &self.user_data_64)?,
            user_data_32: self.user_data_32,
            timeout_s: self.timeout_s,
            ledger: self.ledger,
            code: self.code,
            flags: flags_from_names::<TransferFlags>(at("flags"), &self.flags)?,
            timestamp: parse_u64(at("timestamp"), &self.timestamp)?,
        })
    }
}

/// An account's balances right after one of its transfers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountBalanceJson {
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    #[serde(default = "zero")]
    pub debits_pending: String,
    #[serde(default = "zero")]
    pub debits_posted: String,
    #[serde(default = "zero")]
    pub credits_pending: String,
    #[serde(default = "zero")]
    pub credits_posted: String,
    #[serde(default = "zero")]
    pub timestamp: String,
}

impl AccountBalanceJson {
    pub fn from_ledger(balance: &AccountBalance) -> AccountBalanceJson {
        AccountBalanceJson {
            account_id: Some(balance.account_id.to_string()),
            debits_pending: balance.debits_pending.to_string(),
            debits_posted: balance.debits_posted.to_string(),
            credits_pending: balance.credits_pending.to_string(),
            credits_posted: balance.credits_posted.to_string(),
            timestamp: balance.timestamp.to_string(),
        }
    }

    /// Decodes the `index`-th element of `balances`.
    pub fn to_ledger(&self, index: usize) -> Result<AccountBalance, DecodeError> {
        let at = |field| FieldPath::event("balances", index, field);
        Ok(AccountBalance {
            account_id: required_u128(at("account_id"), &self.account_id)?,
            debits_pending: parse_u128(at("debits_pending"), &self.debits_pending)?,
            debits_posted: parse_u128(at("debits_posted"), &self.debits_posted)?,
            credits_pending: parse_u128(at("credits_pending"), &self.credits_pending)?,
            credits_posted: parse_u128(at("credits_posted"), &self.credits_posted)?,
            timestamp: parse_u64(at("timestamp"), &self.timestamp)?,
        })
    }
}

/// Selects an account's transfers or balances: the body of
/// `POST /v1/accounts/transfers` and `POST /v1/accounts/balances`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountFilterJson {
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    #[serde(default = "zero")]
    pub user_data_128: String,
    #[serde(default = "zero")]
    pub user_data_64: String,
    #[serde(default)]
    pub user_data_32: u32,
    #[serde(default)]
    pub code: u16,
    #[serde(default = "zero")]
    pub timestamp_min: String,
    #[serde(default = "zero")]
    pub timestamp_max: String,
    #[serde(default)]
    pub limit: u32,
    #[serde(default)]
    pub debits: bool,
    #[serde(default)]
    pub credits: bool,
    #[serde(default)]
    pub reversed: bool,
}

impl AccountFilterJson {
    pub fn from_ledger(filter: &AccountFilter) -> AccountFilterJson {
        AccountFilterJson {
            account_id: Some(filter.account_id.to_string()),
            user_data_128: filter.user_data_128.to_string(),
            user_data_64: filter.user_data_64.to_string(),
            user_data_32: filter.user_data_32,
            code: filter.code,
            timestamp_min: filter.timestamp_min.to_string(),
            timestamp_max: filter.timestamp_max.to_string(),
            limit: filter.limit,
            debits: filter.debits,
            credits: filter.credits,
            reversed: filter.reversed,
        }
    }

    /// Decodes the filter's fields; does not run [`AccountFilter::validate`]
    /// ([`decode_account_filter`] does).
    pub fn to_ledger(&self) -> Result<AccountFilter, DecodeError> {
        let at = |field| FieldPath::field("", field);
        Ok(AccountFilter {
            account_id: required_u128(at("account_id"), &self.account_id)?,
            user_data_128: parse_u128(at("user_data_128"), &self.user_data_128)?,
            user_data_64: parse_u64(at("user_data_64"), &self.user_data_64)?,
            user_data_32: self.user_data_32,
            code: self.code,
            timestamp_min: parse_u64(at("timestamp_min"), &self.timestamp_min)?,
            timestamp_max: parse_u64(at("timestamp_max"), &self.timestamp_max)?,
            limit: self.limit,
            debits: self.debits,
            credits: self.credits,
            reversed: self.reversed,
        })
    }
}

/// `{"accounts": [...]}`: the `create_accounts` request and the `lookup_accounts` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsJson {
    pub accounts: Vec<AccountJson>,
}

impl AccountsJson {
    pub fn from_ledger(accounts: &[Account]) -> AccountsJson {
        AccountsJson { accounts: accounts.iter().map(AccountJson::from_ledger).collect() }
    }

    /// Decodes every account; no batch limits (a reply may be empty).
    pub fn to_ledger(&self) -> Result<Vec<Account>, DecodeError> {
        self.accounts.iter().enumerate().map(|(index, account)| account.to_ledger(index)).collect()
    }
}

/// `{"transfers": [...]}`: the `create_transfers` request and the
/// `lookup_transfers` and `get_account_transfers` replies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransfersJson {
    pub transfers: Vec<TransferJson>,
}

impl TransfersJson {
    pub fn from_ledger(transfers: &[Transfer]) -> TransfersJson {
        TransfersJson { transfers: transfers.iter().map(TransferJson::from_ledger).collect() }
    }

    /// Decodes every transfer; no batch limits (a reply may be empty).
    pub fn to_ledger(&self) -> Result<Vec<Transfer>, DecodeError> {
        self.transfers.iter().enumerate().map(|(index, transfer)| transfer.to_ledger(index)).collect()
    }
}

/// `{"ids": ["1", "2"]}`: the `lookup_accounts` and `lookup_transfers` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdsJson {
    pub ids: Vec<String>,
}

impl IdsJson {
    pub fn from_ledger(ids: &[u128]) -> IdsJson {
        IdsJson { ids: ids.iter().map(u128::to_string).collect() }
    }

    /// Decodes every id; no batch limits.
    pub fn to_ledger(&self) -> Result<Vec<u128>, DecodeError> {
        let at = |index| FieldPath::event("ids", index, "");
        self.ids.iter().enumerate().map(|(index, id)| parse_u128(at(index), id)).collect()
    }
}

/// `{"balances": [...]}`: the `get_account_balances` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancesJson {
    pub balances: Vec<AccountBalanceJson>,
}

impl BalancesJson {
    pub fn from_ledger(balances: &[AccountBalance]) -> BalancesJson {
        BalancesJson { balances: balances.iter().map(AccountBalanceJson::from_ledger).collect() }
    }

    pub fn to_ledger(&self) -> Result<Vec<AccountBalance>, DecodeError> {
        self.balances.iter().enumerate().map(|(index, balance)| balance.to_ledger(index)).collect()
    }
}

/// The outcome of one create event: `{"index": 0, "result": "ok"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateResultJson {
    /// The event's position in the request.
    pub index: u32,
    /// The result code's name (`CreateAccountResult::as_str` or `CreateTransferResult::as_str`).
    pub result: String,
}

/// `{"results": [...]}`: a create reply, one result per event, in request order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateResultsJson {
    pub results: Vec<CreateResultJson>,
}

impl CreateResultsJson {
    pub fn from_account_results(results: &[CreateAccountResult]) -> CreateResultsJson {
        CreateResultsJson::from_names(results.iter().map(|result| result.as_str()))
    }

    pub fn from_transfer_results(results: &[CreateTransferResult]) -> CreateResultsJson {
        CreateResultsJson::from_names(results.iter().map(|result| result.as_str()))
    }

    /// Client side: the results of a `create_accounts` reply.
    pub fn to_account_results(&self) -> Result<Vec<CreateAccountResult>, DecodeError> {
        self.to_results(CreateAccountResult::from_str_name)
    }

    /// Client side: the results of a `create_transfers` reply.
    pub fn to_transfer_results(&self) -> Result<Vec<CreateTransferResult>, DecodeError> {
        self.to_results(CreateTransferResult::from_str_name)
    }

    fn from_names<'a>(names: impl Iterator<Item = &'a str>) -> CreateResultsJson {
        let results = names
            .enumerate()
            .map(|(index, name)| CreateResultJson {
                index: u32::try_from(index).expect("a batch holds at most BATCH_EVENTS_MAX events"),
                result: name.to_string(),
            })
            .collect();
        CreateResultsJson { results }
    }

    fn to_results<R>(&self, from_name: impl Fn(&str) -> Option<R>) -> Result<Vec<R>, DecodeError> {
        let mut results = Vec::with_capacity(self.results.len());
        for (index, result) in self.results.iter().enumerate() {
            if usize::try_from(result.index) != Ok(index) {
                let field = FieldPath::event("results", index, "index");
                return Err(DecodeError::ResultIndex { field, expected: index, found: result.index });
            }
            let Some(code) = from_name(&result.result) else {
                let field = FieldPath::event("results", index, "result");
                let value = crate::error::quoted(&result.result);
                return Err(DecodeError::UnknownResult { field, value });
            };
            results.push(code);
        }
        Ok(results)
    }
}

/// `{"code": "batch_too_large", "message": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorJson {
    /// One of [`ErrorCode::ALL`], as a string.
    pub code: String,
    /// For humans: names the field and the event.
    pub message: String,
}

/// The body of every REST error reply: `{"error": {"code": "...", "message": "..."}}`.
/// Its HTTP status is [`ErrorCode::http_status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBodyJson {
    pub error: ErrorJson,
}

impl ErrorBodyJson {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBodyJson {
        ErrorBodyJson { error: ErrorJson { code: code.as_str().to_string(), message: message.into() } }
    }

    pub fn from_decode_error(error: &DecodeError) -> ErrorBodyJson {
        ErrorBodyJson::new(error.code(), error.to_string())
    }
}

/// Parses a JSON body into a wire type: checks its size and shape only.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    if body.len() > BODY_BYTES_MAX {
        return Err(DecodeError::BodyTooLarge { bytes: body.len(), bytes_max: BODY_BYTES_MAX });
    }
    serde_json::from_slice(body).map_err(|error| DecodeError::json(&error))
}

/// `POST /v1/accounts`: 1 to `BATCH_EVENTS_MAX` accounts.
pub fn decode_create_accounts(body: &[u8]) -> Result<Vec<Account>, DecodeError> {
    let request: AccountsJson = parse(body)?;
    check_batch(FieldPath::field("accounts", ""), request.accounts.len())?;
    request.to_ledger()
}

/// `POST /v1/transfers`: 1 to `BATCH_EVENTS_MAX` transfers.
pub fn decode_create_transfers(body: &[u8]) -> Result<Vec<Transfer>, DecodeError> {
    let request: TransfersJson = parse(body)?;
    check_batch(FieldPath::field("transfers", ""), request.transfers.len())?;
    request.to_ledger()
}

/// `POST /v1/accounts/lookup` and `POST /v1/transfers/lookup`: 1 to `BATCH_EVENTS_MAX` ids.
pub fn decode_lookup_ids(body: &[u8]) -> Result<Vec<u128>, DecodeError> {
    let request: IdsJson = parse(body)?;
    check_batch(FieldPath::field("ids", ""), request.ids.len())?;
    request.to_ledger()
}

/// `POST /v1/accounts/transfers` and `POST /v1/accounts/balances`: a filter
/// that passes [`AccountFilter::validate`].
pub fn decode_account_filter(body: &[u8]) -> Result<AccountFilter, DecodeError> {
    let request: AccountFilterJson = parse(body)?;
    let filter = request.to_ledger()?;
    filter.validate()?;
    Ok(filter)
}

fn required_u128(field: FieldPath, text: &Option<String>) -> Result<u128, DecodeError> {
    match text {
        None => Err(DecodeError::MissingField { field }),
        Some(text) => parse_u128(field, text),
    }
}
