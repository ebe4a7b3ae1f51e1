//! The in-memory account table: dense slots plus an id index and a dirty set.
//!
//! Accounts live in a `Vec` (128 bytes each, never moved by a rehash); the
//! hash index maps an id to its slot (24 bytes an entry, so probing stays in
//! cache far longer than with accounts inline in the map). "Changed since the
//! last checkpoint" is one bit per slot plus a list, so marking is a bit test.

use rustc_hash::FxHashMap;

use crate::types::Account;

#[derive(Clone, Debug, Default)]
pub(crate) struct AccountTable {
    index: FxHashMap<u128, u32>,
    slots: Vec<Account>,
    dirty_bits: Vec<u64>,
    dirty: Vec<u32>,
}

impl AccountTable {
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn get(&self, id: &u128) -> Option<&Account> {
        self.index.get(id).map(|slot| &self.slots[*slot as usize])
    }

    /// The slot of an account, touching its memory: called for a whole batch
    /// before it is applied, so the loads overlap instead of stalling one
    /// event at a time. Slots are stable while transfers are applied.
    pub(crate) fn slot_prefetch(&self, id: &u128) -> Option<u32> {
        let slot = *self.index.get(id)?;
        std::hint::black_box(self.slots[slot as usize].debits_posted);
        Some(slot)
    }

    pub(crate) fn slot(&self, id: &u128) -> Option<u32> {
        self.index.get(id).copied()
    }

    pub(crate) fn at(&self, slot: u32) -> &Account {
        &self.slots[slot as usize]
    }

    /// Replaces the account in `slot`, returning the previous value.
    pub(crate) fn replace_at(&mut self, slot: u32, account: Account) -> Account {
        assert_eq!(self.slots[slot as usize].id, account.id);
        self.mark_dirty(slot);
        std::mem::replace(&mut self.slots[slot as usize], account)
    }

    /// Inserts a new account (its id must not exist).
    pub(crate) fn insert_new(&mut self, account: Account) {
        let slot = u32::try_from(self.slots.len()).expect("accounts_max fits u32");
        let previous = self.index.insert(account.id, slot);
        assert!(previous.is_none(), "account {} inserted twice", account.id);
        self.slots.push(account);
        if self.dirty_bits.len() * 64 < self.slots.len() {
            self.dirty_bits.push(0);
        }
        self.mark_dirty(slot);
    }

    /// Replaces an existing account's value, returning the previous one.
    pub(crate) fn replace(&mut self, account: Account) -> Account {
        let slot = *self.index.get(&account.id).expect("account exists");
        self.replace_at(slot, account)
    }

    /// Removes the most recently inserted account (undo of `insert_new`).
    pub(crate) fn remove_newest(&mut self, id: u128) -> Account {
        let account = self.slots.pop().expect("an account to remove");
        assert_eq!(account.id, id, "only the newest account can be removed");
        self.index.remove(&id);
        let slot = self.slots.len() as u32;
        let (word, bit) = (slot as usize / 64, slot % 64);
        if self.dirty_bits[word] & (1 << bit) != 0 {
            self.dirty_bits[word] &= !(1 << bit);
            let position = self.dirty.iter().rposition(|s| *s == slot).expect("dirty slot listed");
            self.dirty.swap_remove(position);
        }
        account
    }

    fn mark_dirty(&mut self, slot: u32) {
        let (word, bit) = (slot as usize / 64, slot % 64);
        if self.dirty_bits[word] & (1 << bit) == 0 {
            self.dirty_bits[word] |= 1 << bit;
            self.dirty.push(slot);
        }
    }

    /// The accounts changed since the last call, sorted by id; clears the dirty set.
    pub(crate) fn take_dirty(&mut self) -> Vec<Account> {
        let mut accounts: Vec<Account> = self.dirty.iter().map(|slot| self.slots[*slot as usize]).collect();
        for slot in self.dirty.drain(..) {
            self.dirty_bits[slot as usize / 64] &= !(1 << (slot % 64));
        }
        accounts.sort_unstable_by_key(|a| a.id);
        accounts
    }

    /// Every account, in slot order (creation order: deterministic).
    pub(crate) fn values(&self) -> impl Iterator<Item = &Account> {
        self.slots.iter()
    }
}
