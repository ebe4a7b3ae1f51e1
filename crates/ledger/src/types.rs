//! The ledger's data types: accounts, transfers, balances, and their flags.
//!
//! Both `Account` and `Transfer` have a fixed 128-byte little-endian encoding
//! (`encode`/`decode`), used by the write-ahead log and the history store.

/// Size in bytes of an encoded [`Account`] or [`Transfer`].
pub const RECORD_SIZE: usize = 128;

macro_rules! flags {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $flag:ident = $bit:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u16);

        impl $name {
            $($(#[$fmeta])* pub const $flag: $name = $name(1 << $bit);)*
            /// Every bit that names a flag; any other bit is reserved.
            pub const KNOWN: u16 = 0 $(| (1 << $bit))*;
            /// Every flag with its lowercase name, in bit order.
            pub const NAMES: &'static [(&'static str, $name)] = &[$((stringify!($flag), $name(1 << $bit)),)*];

            pub fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }
            pub fn insert(&mut self, other: $name) {
                self.0 |= other.0;
            }
            pub fn remove(&mut self, other: $name) {
                self.0 &= !other.0;
            }
            pub fn has_reserved_bits(self) -> bool {
                self.0 & !Self::KNOWN != 0
            }
            /// Parses one lowercase flag name (as in `NAMES`, lowercased).
            pub fn from_name(name: &str) -> Option<$name> {
                Self::NAMES
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, f)| *f)
            }
            /// The lowercase names of the flags that are set.
            pub fn names(self) -> Vec<String> {
                Self::NAMES
                    .iter()
                    .filter(|(_, f)| self.contains(*f))
                    .map(|(n, _)| n.to_ascii_lowercase())
                    .collect()
            }
        }

        impl std::ops::BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.names())
            }
        }
    };
}

flags! {
    /// Account flags.
    AccountFlags {
        /// This event and the next succeed or fail together.
        LINKED = 0,
        /// `debits_pending + debits_posted <= credits_posted` always holds.
        DEBITS_MUST_NOT_EXCEED_CREDITS = 1,
        /// `credits_pending + credits_posted <= debits_posted` always holds.
        CREDITS_MUST_NOT_EXCEED_DEBITS = 2,
        /// Keep the balance after every transfer (see `get_account_balances`).
        HISTORY = 3,
        /// No new transfers may touch the account.
        CLOSED = 4,
    }
}

flags! {
    /// Transfer flags.
    TransferFlags {
        /// This event and the next succeed or fail together.
        LINKED = 0,
        /// Reserve the amount as pending, to be posted or voided later.
        PENDING = 1,
        /// Post (fully or partially) the pending transfer named by `pending_id`.
        POST_PENDING_TRANSFER = 2,
        /// Void the pending transfer named by `pending_id`.
        VOID_PENDING_TRANSFER = 3,
        /// Transfer at most the debit account's available balance.
        BALANCING_DEBIT = 4,
        /// Transfer at most the credit account's available balance.
        BALANCING_CREDIT = 5,
        /// Close the debit account (the transfer must be pending; voiding it reopens).
        CLOSING_DEBIT = 6,
        /// Close the credit account (the transfer must be pending; voiding it reopens).
        CLOSING_CREDIT = 7,
        /// Set by the system only: a cross-cell transfer's leg in one cell,
        /// posted or voided by its coordinator's decision, never by a client.
        CROSS_CELL_LEG = 8,
    }
}

/// An account: a double-entry balance in one ledger (currency or asset).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Account {
    pub id: u128,
    pub debits_pending: u128,
    pub debits_posted: u128,
    pub credits_pending: u128,
    pub credits_posted: u128,
    pub user_data_128: u128,
    pub user_data_64: u64,
    pub user_data_32: u32,
    pub ledger: u32,
    pub code: u16,
    pub flags: AccountFlags,
    /// Set by the ledger when the account is created; must be zero on input.
    pub timestamp: u64,
}

/// A transfer: moves `amount` from `debit_account_id` to `credit_account_id`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Transfer {
    /// Client-chosen idempotency key.
    pub id: u128,
    pub debit_account_id: u128,
    pub credit_account_id: u128,
    pub amount: u128,
    /// For post/void: the pending transfer it resolves.
    pub pending_id: u128,
    pub user_data_128: u128,
    pub user_data_64: u64,
    pub user_data_32: u32,
    /// For pending transfers: seconds until the reservation expires (0: never).
    pub timeout_s: u32,
    pub ledger: u32,
    pub code: u16,
    pub flags: TransferFlags,
    /// Set by the ledger when the transfer is applied; must be zero on input.
    pub timestamp: u64,
}

/// The state of a pending transfer.
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord, Hash)]
pub enum PendingStatus {
    Pending = 1,
    Posted = 2,
    Voided = 3,
    Expired = 4,
}

impl PendingStatus {
    pub fn from_u8(value: u8) -> Option<PendingStatus> {
        match value {
            1 => Some(PendingStatus::Pending),
            2 => Some(PendingStatus::Posted),
            3 => Some(PendingStatus::Voided),
            4 => Some(PendingStatus::Expired),
            _ => None,
        }
    }
}

/// An account's balances right after a transfer (accounts flagged `history`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct AccountBalance {
    pub account_id: u128,
    pub debits_pending: u128,
    pub debits_posted: u128,
    pub credits_pending: u128,
    pub credits_posted: u128,
    /// The timestamp of the transfer that produced this balance.
    pub timestamp: u64,
}

/// Encoding of fixed-layout records.
struct Writer<'a> {
    out: &'a mut [u8; RECORD_SIZE],
    at: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.out[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
}

struct Reader<'a> {
    input: &'a [u8; RECORD_SIZE],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let bytes: [u8; N] = self.input[self.at..self.at + N].try_into().expect("in bounds");
        self.at += N;
        bytes
    }
    fn u128(&mut self) -> u128 {
        u128::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
}

impl Account {
    pub fn encode(&self, out: &mut [u8; RECORD_SIZE]) {
        let mut w = Writer { out, at: 0 };
        w.put(&self.id.to_le_bytes());
        w.put(&self.debits_pending.to_le_bytes());
        w.put(&self.debits_posted.to_le_bytes());
        w.put(&self.credits_pending.to_le_bytes());
        w.put(&self.credits_posted.to_le_bytes());
        w.put(&self.user_data_128.to_le_bytes());
        w.put(&self.user_data_64.to_le_bytes());
        w.put(&self.user_data_32.to_le_bytes());
        w.put(&self.ledger.to_le_bytes());
        w.put(&self.code.to_le_bytes());
        w.put(&self.flags.0.to_le_bytes());
        w.put(&[0u8; 4]);
        w.put(&self.timestamp.to_le_bytes());
        assert_eq!(w.at, RECORD_SIZE);
    }

    pub fn decode(input: &[u8; RECORD_SIZE]) -> Account {
        let mut r = Reader { input, at: 0 };
        let account = Account {
            id: r.u128(),
            debits_pending: r.u128(),
            debits_posted: r.u128(),
            credits_pending: r.u128(),
            credits_posted: r.u128(),
            user_data_128: r.u128(),
            user_data_64: r.u64(),
            user_data_32: r.u32(),
            ledger: r.u32(),
            code: r.u16(),
            flags: AccountFlags(r.u16()),
            timestamp: {
                let _reserved: [u8; 4] = r.take();
                r.u64()
            },
        };
        assert_eq!(r.at, RECORD_SIZE);
        account
    }

    /// Posted balance available to spend: `credits_posted - debits_posted - debits_pending`, floored at 0.
    pub fn debit_headroom(&self) -> u128 {
        self.credits_posted.saturating_sub(self.debits_posted.saturating_add(self.debits_pending))
    }

    /// Mirror of `debit_headroom` for accounts that must not have more credits than debits.
    pub fn credit_headroom(&self) -> u128 {
        self.debits_posted.saturating_sub(self.credits_posted.saturating_add(self.credits_pending))
    }

    /// Whether the account's balance limits hold.
    pub fn limits_hold(&self) -> bool {
        let debits_ok = !self.flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)
            || self.debits_posted.checked_add(self.debits_pending).is_some_and(|d| d <= self.credits_posted);
        let credits_ok = !self.flags.contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS)
            || self.credits_posted.checked_add(self.credits_pending).is_some_and(|c| c <= self.debits_posted);
        debits_ok && credits_ok
    }
}

impl Transfer {
    pub fn encode(&self, out: &mut [u8; RECORD_SIZE]) {
        let mut w = Writer { out, at: 0 };
        w.put(&self.id.to_le_bytes());
        w.put(&self.debit_account_id.to_le_bytes());
        w.put(&self.credit_account_id.to_le_bytes());
        w.put(&self.amount.to_le_bytes());
        w.put(&self.pending_id.to_le_bytes());
        w.put(&self.user_data_128.to_le_bytes());
        w.put(&self.user_data_64.to_le_bytes());
        w.put(&self.user_data_32.to_le_bytes());
        w.put(&self.timeout_s.to_le_bytes());
        w.put(&self.ledger.to_le_bytes());
        w.put(&self.code.to_le_bytes());
        w.put(&self.flags.0.to_le_bytes());
        w.put(&self.timestamp.to_le_bytes());
        assert_eq!(w.at, RECORD_SIZE);
    }

    pub fn decode(input: &[u8; RECORD_SIZE]) -> Transfer {
        let mut r = Reader { input, at: 0 };
        let transfer = Transfer {
            id: r.u128(),
            debit_account_id: r.u128(),
            credit_account_id: r.u128(),
            amount: r.u128(),
            pending_id: r.u128(),
            user_data_128: r.u128(),
            user_data_64: r.u64(),
            user_data_32: r.u32(),
            timeout_s: r.u32(),
            ledger: r.u32(),
            code: r.u16(),
            flags: TransferFlags(r.u16()),
            timestamp: r.u64(),
        };
        assert_eq!(r.at, RECORD_SIZE);
        transfer
    }

    /// The timestamp at which a pending transfer's reservation expires, if it has a timeout.
    pub fn expires_at(&self) -> Option<u64> {
        if self.timeout_s == 0 {
            None
        } else {
            Some(self.timestamp.saturating_add(u64::from(self.timeout_s).saturating_mul(1_000_000_000)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_round_trips() {
        let account = Account {
            id: 1 << 70 | 5,
            debits_pending: 1,
            debits_posted: 2,
            credits_pending: 3,
            credits_posted: u128::MAX,
            user_data_128: 7,
            user_data_64: 8,
            user_data_32: 9,
            ledger: 10,
            code: 11,
            flags: AccountFlags::HISTORY | AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
            timestamp: 12,
        };
        let mut bytes = [0u8; RECORD_SIZE];
        account.encode(&mut bytes);
        assert_eq!(Account::decode(&bytes), account);
    }

    #[test]
    fn transfer_round_trips() {
        let transfer = Transfer {
            id: 1,
            debit_account_id: 2,
            credit_account_id: 3,
            amount: 4,
            pending_id: 5,
            user_data_128: 6,
            user_data_64: 7,
            user_data_32: 8,
            timeout_s: 9,
            ledger: 10,
            code: 11,
            flags: TransferFlags::PENDING | TransferFlags::LINKED,
            timestamp: u64::MAX,
        };
        let mut bytes = [0u8; RECORD_SIZE];
        transfer.encode(&mut bytes);
        assert_eq!(Transfer::decode(&bytes), transfer);
    }

    #[test]
    fn flag_names_parse() {
        assert_eq!(TransferFlags::from_name("pending"), Some(TransferFlags::PENDING));
        assert_eq!(TransferFlags::from_name("nope"), None);
        assert_eq!((TransferFlags::PENDING | TransferFlags::LINKED).names(), vec!["linked", "pending"]);
        assert!(TransferFlags(1 << 15).has_reserved_bits());
    }
}
