//! Query filters.

use crate::types::Transfer;

/// The most results one query may return.
pub const QUERY_LIMIT_MAX: u32 = 8190;

/// Selects an account's transfers or balances (like TigerBeetle's `AccountFilter`).
/// Zero in `user_data_*`, `code` and the timestamps means "any".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountFilter {
    pub account_id: u128,
    pub user_data_128: u128,
    pub user_data_64: u64,
    pub user_data_32: u32,
    pub code: u16,
    /// Inclusive lower bound (0: unbounded).
    pub timestamp_min: u64,
    /// Inclusive upper bound (0: unbounded).
    pub timestamp_max: u64,
    pub limit: u32,
    /// Include transfers where the account is the debit side.
    pub debits: bool,
    /// Include transfers where the account is the credit side.
    pub credits: bool,
    /// Newest first.
    pub reversed: bool,
}

/// Why a filter was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterError {
    AccountIdMustNotBeZero,
    AccountIdMustNotBeIntMax,
    LimitMustBeBetweenOneAndMax,
    DebitsOrCreditsMustBeSet,
    TimestampRangeIsEmpty,
}

impl std::fmt::Display for FilterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            FilterError::AccountIdMustNotBeZero => "account_id must not be zero",
            FilterError::AccountIdMustNotBeIntMax => "account_id must not be 2^128-1",
            FilterError::LimitMustBeBetweenOneAndMax => "limit must be between 1 and 8190",
            FilterError::DebitsOrCreditsMustBeSet => "at least one of debits and credits must be set",
            FilterError::TimestampRangeIsEmpty => "timestamp_min must not exceed timestamp_max",
        };
        f.write_str(text)
    }
}

impl std::error::Error for FilterError {}

impl AccountFilter {
    /// A filter for all of an account's transfers, oldest first, up to the limit.
    pub fn account(account_id: u128, limit: u32) -> AccountFilter {
        AccountFilter { account_id, limit, debits: true, credits: true, ..AccountFilter::default() }
    }

    pub fn validate(&self) -> Result<(), FilterError> {
        if self.account_id == 0 {
            return Err(FilterError::AccountIdMustNotBeZero);
        }
        if self.account_id == u128::MAX {
            return Err(FilterError::AccountIdMustNotBeIntMax);
        }
        if self.limit == 0 || self.limit > QUERY_LIMIT_MAX {
            return Err(FilterError::LimitMustBeBetweenOneAndMax);
        }
        if !self.debits && !self.credits {
            return Err(FilterError::DebitsOrCreditsMustBeSet);
        }
        let (min, max) = self.timestamp_range();
        if min > max {
            return Err(FilterError::TimestampRangeIsEmpty);
        }
        Ok(())
    }

    /// The inclusive timestamp range, with the zero bounds opened up.
    pub fn timestamp_range(&self) -> (u64, u64) {
        let max = if self.timestamp_max == 0 { u64::MAX } else { self.timestamp_max };
        (self.timestamp_min, max)
    }

    pub fn timestamp_matches(&self, timestamp: u64) -> bool {
        let (min, max) = self.timestamp_range();
        min <= timestamp && timestamp <= max
    }

    /// Whether a transfer touching (or not) `account_id` passes every field of the filter.
    pub fn matches_transfer(&self, transfer: &Transfer) -> bool {
        let side = (self.debits && transfer.debit_account_id == self.account_id)
            || (self.credits && transfer.credit_account_id == self.account_id);
        side && self.timestamp_matches(transfer.timestamp)
            && (self.user_data_128 == 0 || self.user_data_128 == transfer.user_data_128)
            && (self.user_data_64 == 0 || self.user_data_64 == transfer.user_data_64)
            && (self.user_data_32 == 0 || self.user_data_32 == transfer.user_data_32)
            && (self.code == 0 || self.code == transfer.code)
    }
}
