//! Account id layout and shard routing.
//!
//! An account id is a `u128` laid out as:
//!
//! ```text
//!  127                  64 63                   0
//! +----------------------+----------------------+
//! |   user id (u64)      |  account index (u64) |
//! +----------------------+----------------------+
//! ```
//!
//! Every account belongs to a user, and a user belongs to exactly one shard:
//! `shard_of_user(uid, shards) = uid % shards` (with the default 100 shards, the
//! last two decimal digits of the user id, "00".."99"). So the shard, and with
//! the routing table the owning cell, is derivable from an account id alone,
//! without a lookup.
//!
//! Transfer ids carry no layout: they are client-chosen idempotency keys.

/// The default number of shards (the source system's "00"–"99").
pub const SHARDS_DEFAULT: u32 = 100;
/// The largest supported number of shards.
pub const SHARDS_MAX: u32 = 10_000;

/// Mints an account id from a user id and the index of the account within that user.
///
/// Returns `None` for the two reserved ids (0 and `u128::MAX`).
pub fn account_id(user_id: u64, account_index: u64) -> Option<u128> {
    let id = (u128::from(user_id) << 64) | u128::from(account_index);
    if id == 0 || id == u128::MAX {
        None
    } else {
        Some(id)
    }
}

/// The user that owns an account.
pub fn user_of_account(account_id: u128) -> u64 {
    (account_id >> 64) as u64
}

/// The index of an account within its user.
pub fn index_of_account(account_id: u128) -> u64 {
    account_id as u64
}

/// The shard of a user, in `0..shards`.
pub fn shard_of_user(user_id: u64, shards: u32) -> u32 {
    assert!(shards > 0 && shards <= SHARDS_MAX, "shards out of range: {shards}");
    (user_id % u64::from(shards)) as u32
}

/// The shard of an account, in `0..shards`: the shard of its user.
pub fn shard_of_account(account_id: u128, shards: u32) -> u32 {
    shard_of_user(user_of_account(account_id), shards)
}

/// Transfer ids from this one up belong to the system: a client's transfer
/// with such an id is refused `id_reserved`. A cross-cell transfer's leg `t`
/// is resolved (posted or voided) by the transfer [`resolution_id`]`(t)`.
pub const TRANSFER_ID_SYSTEM_MIN: u128 = 1 << 127;

/// The user id of the cells' clearing accounts (see [`clearing_account_id`]):
/// a client's account of this user is refused `id_reserved`, and a client's
/// transfer naming one is refused `account_reserved`.
pub const CLEARING_USER_ID: u64 = u64::MAX;

/// The account code of clearing accounts.
pub const CLEARING_ACCOUNT_CODE: u16 = u16::MAX;

/// The clearing account cell `holder` holds, in `ledger`, for cross-cell
/// transfers with cell `peer`: the other side of every leg `holder` holds of
/// a transfer whose other account is in `peer`. Summed over both cells of a
/// pair, their clearing accounts net to zero once every cross-cell transfer
/// is decided. The id names the holder, so it is unique in the cluster:
///
/// ```text
///  127          64 63       32 31      16 15       0
/// +--------------+-----------+----------+----------+
/// | u64::MAX     | ledger    | holder   | peer     |
/// +--------------+-----------+----------+----------+
/// ```
pub fn clearing_account_id(ledger: u32, holder: u16, peer: u16) -> u128 {
    let index = (u64::from(ledger) << 32) | (u64::from(holder) << 16) | u64::from(peer);
    (u128::from(CLEARING_USER_ID) << 64) | u128::from(index)
}

/// Whether an account id is a clearing account's (the system's).
pub fn is_clearing_account(account_id: u128) -> bool {
    user_of_account(account_id) == CLEARING_USER_ID
}

/// The cell that holds a clearing account (see [`clearing_account_id`]).
pub fn clearing_holder(account_id: u128) -> u16 {
    (index_of_account(account_id) >> 16) as u16
}

/// The peer cell of a clearing account (see [`clearing_account_id`]).
pub fn clearing_peer(account_id: u128) -> u16 {
    index_of_account(account_id) as u16
}

/// The id of the transfer that posts or voids the cross-cell leg `transfer_id`.
pub fn resolution_id(transfer_id: u128) -> u128 {
    assert!(transfer_id < TRANSFER_ID_SYSTEM_MIN, "transfer id {transfer_id} is reserved");
    transfer_id | TRANSFER_ID_SYSTEM_MIN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let id = account_id(1234567, 3).unwrap();
        assert_eq!(user_of_account(id), 1234567);
        assert_eq!(index_of_account(id), 3);
        assert_eq!(shard_of_account(id, SHARDS_DEFAULT), 67);
        assert_eq!(shard_of_account(id, 10), 7);
    }

    #[test]
    fn reserved_ids_are_refused() {
        assert_eq!(account_id(0, 0), None);
        assert_eq!(account_id(u64::MAX, u64::MAX), None);
        assert_eq!(account_id(0, 1), Some(1));
    }

    #[test]
    fn every_shard_is_reachable() {
        let mut seen = [false; SHARDS_DEFAULT as usize];
        for uid in 0..1000u64 {
            seen[shard_of_account(account_id(uid, 1).unwrap(), SHARDS_DEFAULT) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn clearing_accounts_and_resolutions_are_reserved() {
        let clearing = clearing_account_id(7, 3, 4);
        assert!(is_clearing_account(clearing));
        assert_eq!((clearing_holder(clearing), clearing_peer(clearing)), (3, 4));
        assert!(!is_clearing_account(account_id(12, 1).unwrap()));
        assert_ne!(clearing, clearing_account_id(7, 4, 3));
        assert_ne!(clearing, u128::MAX);
        assert_eq!(resolution_id(5), TRANSFER_ID_SYSTEM_MIN | 5);
        assert!(resolution_id(5) >= TRANSFER_ID_SYSTEM_MIN);
    }
}
