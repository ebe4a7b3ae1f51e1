//! Per-event result codes.
//!
//! Business outcomes are result codes, never errors or panics. Each event gets
//! exactly one code. When several apply, the one listed first here wins: the
//! declaration order below *is* the order of precedence, and the numeric value
//! of a code is its position (so codes can be compared to check precedence).
//! `ok` is 0. Codes are stable wire values: new codes are only appended, so a
//! code appended later (from `id_reserved` on) takes the place in precedence
//! its comment names, not its position.

macro_rules! result_codes {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:expr => $text:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl $name {
            /// Every code, in order of precedence.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The snake_case name used on the wire (JSON) and in metrics.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }

            pub fn from_str_name(name: &str) -> Option<$name> {
                match name {
                    $($text => Some($name::$variant),)*
                    _ => None,
                }
            }

            pub fn from_u32(value: u32) -> Option<$name> {
                match value {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

result_codes! {
    /// The outcome of one `create_accounts` event, in order of precedence.
    CreateAccountResult {
        Ok = 0 => "ok",
        /// Another event in this event's linked chain failed.
        LinkedEventFailed = 1 => "linked_event_failed",
        /// The batch ended with the `linked` flag set: the chain was never closed.
        LinkedEventChainOpen = 2 => "linked_event_chain_open",
        TimestampMustBeZero = 3 => "timestamp_must_be_zero",
        ReservedFlag = 4 => "reserved_flag",
        IdMustNotBeZero = 5 => "id_must_not_be_zero",
        IdMustNotBeIntMax = 6 => "id_must_not_be_int_max",
        FlagsAreMutuallyExclusive = 7 => "flags_are_mutually_exclusive",
        DebitsPendingMustBeZero = 8 => "debits_pending_must_be_zero",
        DebitsPostedMustBeZero = 9 => "debits_posted_must_be_zero",
        CreditsPendingMustBeZero = 10 => "credits_pending_must_be_zero",
        CreditsPostedMustBeZero = 11 => "credits_posted_must_be_zero",
        LedgerMustNotBeZero = 12 => "ledger_must_not_be_zero",
        CodeMustNotBeZero = 13 => "code_must_not_be_zero",
        ExistsWithDifferentFlags = 14 => "exists_with_different_flags",
        ExistsWithDifferentUserData128 = 15 => "exists_with_different_user_data_128",
        ExistsWithDifferentUserData64 = 16 => "exists_with_different_user_data_64",
        ExistsWithDifferentUserData32 = 17 => "exists_with_different_user_data_32",
        ExistsWithDifferentLedger = 18 => "exists_with_different_ledger",
        ExistsWithDifferentCode = 19 => "exists_with_different_code",
        /// An account with this id and identical fields exists: a retry, nothing changed.
        Exists = 20 => "exists",
        /// The ledger holds `accounts_max` accounts already.
        AccountsMaxReached = 21 => "accounts_max_reached",
        /// The account's user id is the system's (`id::CLEARING_USER_ID`).
        /// Checked right after `id_must_not_be_int_max`.
        IdReserved = 22 => "id_reserved",
        /// The account's ledger is not one the cluster has defined (as the
        /// cell's log says: see `cluster::ledgers`). Checked right after
        /// `ledger_must_not_be_zero`.
        LedgerNotDefined = 23 => "ledger_not_defined",
    }
}

result_codes! {
    /// The outcome of one `create_transfers` event, in order of precedence.
    CreateTransferResult {
        Ok = 0 => "ok",
        /// Another event in this event's linked chain failed.
        LinkedEventFailed = 1 => "linked_event_failed",
        /// The batch ended with the `linked` flag set: the chain was never closed.
        LinkedEventChainOpen = 2 => "linked_event_chain_open",
        TimestampMustBeZero = 3 => "timestamp_must_be_zero",
        ReservedFlag = 4 => "reserved_flag",
        IdMustNotBeZero = 5 => "id_must_not_be_zero",
        IdMustNotBeIntMax = 6 => "id_must_not_be_int_max",
        FlagsAreMutuallyExclusive = 7 => "flags_are_mutually_exclusive",
        DebitAccountIdMustNotBeZero = 8 => "debit_account_id_must_not_be_zero",
        DebitAccountIdMustNotBeIntMax = 9 => "debit_account_id_must_not_be_int_max",
        CreditAccountIdMustNotBeZero = 10 => "credit_account_id_must_not_be_zero",
        CreditAccountIdMustNotBeIntMax = 11 => "credit_account_id_must_not_be_int_max",
        AccountsMustBeDifferent = 12 => "accounts_must_be_different",
        PendingIdMustBeZero = 13 => "pending_id_must_be_zero",
        PendingIdMustNotBeZero = 14 => "pending_id_must_not_be_zero",
        PendingIdMustNotBeIntMax = 15 => "pending_id_must_not_be_int_max",
        PendingIdMustBeDifferent = 16 => "pending_id_must_be_different",
        TimeoutReservedForPendingTransfer = 17 => "timeout_reserved_for_pending_transfer",
        ClosingTransferMustBePending = 18 => "closing_transfer_must_be_pending",
        LedgerMustNotBeZero = 19 => "ledger_must_not_be_zero",
        CodeMustNotBeZero = 20 => "code_must_not_be_zero",
        // The idempotency check comes right after the event's own fields are
        // validated, so a retry of an applied transfer always answers `exists`
        // (or `exists_with_different_*`), whatever happened to its accounts since.
        ExistsWithDifferentFlags = 21 => "exists_with_different_flags",
        ExistsWithDifferentPendingId = 22 => "exists_with_different_pending_id",
        ExistsWithDifferentTimeout = 23 => "exists_with_different_timeout",
        ExistsWithDifferentDebitAccountId = 24 => "exists_with_different_debit_account_id",
        ExistsWithDifferentCreditAccountId = 25 => "exists_with_different_credit_account_id",
        ExistsWithDifferentAmount = 26 => "exists_with_different_amount",
        ExistsWithDifferentUserData128 = 27 => "exists_with_different_user_data_128",
        ExistsWithDifferentUserData64 = 28 => "exists_with_different_user_data_64",
        ExistsWithDifferentUserData32 = 29 => "exists_with_different_user_data_32",
        ExistsWithDifferentLedger = 30 => "exists_with_different_ledger",
        ExistsWithDifferentCode = 31 => "exists_with_different_code",
        /// A transfer with this id and identical fields exists: a retry, nothing changed.
        Exists = 32 => "exists",
        DebitAccountNotFound = 33 => "debit_account_not_found",
        CreditAccountNotFound = 34 => "credit_account_not_found",
        AccountsMustHaveTheSameLedger = 35 => "accounts_must_have_the_same_ledger",
        TransferMustHaveTheSameLedgerAsAccounts = 36 => "transfer_must_have_the_same_ledger_as_accounts",
        PendingTransferNotFound = 37 => "pending_transfer_not_found",
        PendingTransferNotPending = 38 => "pending_transfer_not_pending",
        PendingTransferHasDifferentDebitAccountId = 39 => "pending_transfer_has_different_debit_account_id",
        PendingTransferHasDifferentCreditAccountId = 40 => "pending_transfer_has_different_credit_account_id",
        PendingTransferHasDifferentLedger = 41 => "pending_transfer_has_different_ledger",
        PendingTransferHasDifferentCode = 42 => "pending_transfer_has_different_code",
        ExceedsPendingTransferAmount = 43 => "exceeds_pending_transfer_amount",
        PendingTransferHasDifferentAmount = 44 => "pending_transfer_has_different_amount",
        PendingTransferAlreadyPosted = 45 => "pending_transfer_already_posted",
        PendingTransferAlreadyVoided = 46 => "pending_transfer_already_voided",
        PendingTransferExpired = 47 => "pending_transfer_expired",
        DebitAccountAlreadyClosed = 48 => "debit_account_already_closed",
        CreditAccountAlreadyClosed = 49 => "credit_account_already_closed",
        OverflowsDebitsPending = 50 => "overflows_debits_pending",
        OverflowsCreditsPending = 51 => "overflows_credits_pending",
        OverflowsDebitsPosted = 52 => "overflows_debits_posted",
        OverflowsCreditsPosted = 53 => "overflows_credits_posted",
        OverflowsDebits = 54 => "overflows_debits",
        OverflowsCredits = 55 => "overflows_credits",
        OverflowsTimeout = 56 => "overflows_timeout",
        ExceedsCredits = 57 => "exceeds_credits",
        ExceedsDebits = 58 => "exceeds_debits",
        /// The ledger holds `pending_transfers_max` open pending transfers already.
        PendingTransfersMaxReached = 59 => "pending_transfers_max_reached",
        /// The transfer id is the system's (`id::TRANSFER_ID_SYSTEM_MIN` and
        /// up). Checked right after `id_must_not_be_int_max`.
        IdReserved = 60 => "id_reserved",
        /// The transfer names a cell's clearing account, which only the
        /// system moves. Checked right after the account ids' own checks.
        AccountReserved = 61 => "account_reserved",
        /// A transfer between cells (or a linked chain touching several
        /// cells) may not be balancing or closing, nor post or void a pending
        /// transfer; a pending one must debit the account of the chain's
        /// first debit account's cell. Checked before the transfer is tried.
        CrossCellFlagsUnsupported = 62 => "cross_cell_flags_unsupported",
        /// A cell the transfer involves does not own the account (a stale
        /// routing table): nothing was applied; retry with a new id.
        CrossCellMisrouted = 63 => "cross_cell_misrouted",
        /// A cell the transfer involves did not answer in time: the transfer
        /// was cancelled (nothing applied); retry with a new id.
        CrossCellTimedOut = 64 => "cross_cell_timed_out",
        /// The coordinating cell holds its limit of undecided cross-cell
        /// transfers, or of open cross-cell pending transfers.
        CrossCellTransfersMaxReached = 65 => "cross_cell_transfers_max_reached",
        /// The pending transfer to post or void is a cross-cell transfer's
        /// leg: only its coordinator's decision resolves it (a client's own
        /// cross-cell pending transfer is posted or voided under its id, in
        /// its debit account's cell, once created). Checked right after
        /// `pending_transfer_not_found`.
        PendingTransferIsCrossCellLeg = 66 => "pending_transfer_is_cross_cell_leg",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_positions() {
        for (index, code) in CreateTransferResult::ALL.iter().enumerate() {
            assert_eq!(*code as u32 as usize, index);
            assert_eq!(CreateTransferResult::from_u32(index as u32), Some(*code));
            assert_eq!(CreateTransferResult::from_str_name(code.as_str()), Some(*code));
        }
        for (index, code) in CreateAccountResult::ALL.iter().enumerate() {
            assert_eq!(*code as u32 as usize, index);
            assert_eq!(CreateAccountResult::from_str_name(code.as_str()), Some(*code));
        }
    }
}
