//! Splitting a client's request by cell, and merging the cells' answers
//! back: pure functions (no I/O, no clock), for the gateway and for the
//! simulator's model of it.
//!
//! **The home cell** of an event is where the gateway sends it:
//! - an account: the owner of its shard;
//! - a transfer: the owner of its debit account; if it names no debit
//!   account (a post or void may name none), of its credit account; if it
//!   names neither, the home of the pending transfer it resolves: an earlier
//!   transfer of the same request goes where that one goes; otherwise the
//!   gateway looks it up in every cell first (`pending_to_find`) and passes
//!   the accounts it found (`PendingFound`); one found nowhere goes to the
//!   `fallback` cell, which answers `pending_transfer_not_found`;
//! - a **linked chain** (events joined by the `linked` flag) goes whole to
//!   the home of its first event. A chain of accounts whose accounts belong
//!   to different cells is refused (`SplitError::CrossCell`): nothing is sent.
//!
//! A [`Part`] is the events of one cell, in request order. A request splits
//! into at most one part per cell; `merge_*` put the answers back in request
//! order.

use std::collections::{BTreeMap, HashMap, HashSet};

use cellpay_cluster::routing::RoutingTable;
use cellpay_cluster::topology::CellId;
use cellpay_ledger::id::is_clearing_account;
use cellpay_ledger::{Account, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags};

use crate::node::{Reply, Request};

/// The events of a request that go to one cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub cell: CellId,
    /// The events' positions in the request, ascending.
    pub indices: Vec<usize>,
    /// The part ends with an open linked chain (its last event has the
    /// `linked` flag): never combine it with another part, so that the cell
    /// answers `linked_event_chain_open` exactly as it would to the client.
    pub chain_open: bool,
    /// An event of the part names an account of another cell (a transfer
    /// between cells, or a chain spanning cells): the cell coordinates it
    /// with the other cells and answers only once they have decided, so
    /// such parts are combined only with each other, never with parts a
    /// cell answers at once.
    pub spans_cells: bool,
}

impl Part {
    /// Whether the part may share one request to its cell with other parts.
    pub fn combinable(&self) -> bool {
        !self.chain_open
    }
}

/// Why a request cannot be split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SplitError {
    /// Accounts `first_index` and `index` of one linked chain belong to
    /// different cells: an account chain must stay in one cell.
    CrossCell { first_index: usize, first_cell: CellId, index: usize, cell: CellId },
}

/// A create event: an account or a transfer.
pub trait CreateEvent: Copy + Send + Sync + std::fmt::Debug + 'static {
    type Result: Copy + Send + Sync + std::fmt::Debug + PartialEq + 'static;
    /// The operation's name in metrics.
    const OPERATION: &'static str;
    fn linked(&self) -> bool;
    /// Whether the event names `account`.
    fn names(&self, account: u128) -> bool;
    fn request(events: Vec<Self>) -> Request;
    /// The results in `reply`, if it answers this kind of request.
    fn results(reply: Reply) -> Option<Vec<Self::Result>>;
}

impl CreateEvent for Account {
    type Result = CreateAccountResult;
    const OPERATION: &'static str = "create_accounts";
    fn linked(&self) -> bool {
        self.flags.contains(AccountFlags::LINKED)
    }
    fn names(&self, account: u128) -> bool {
        self.id == account
    }
    fn request(events: Vec<Account>) -> Request {
        Request::CreateAccounts(events)
    }
    fn results(reply: Reply) -> Option<Vec<CreateAccountResult>> {
        match reply {
            Reply::CreateAccounts(results) => Some(results),
            _ => None,
        }
    }
}

impl CreateEvent for Transfer {
    type Result = CreateTransferResult;
    const OPERATION: &'static str = "create_transfers";
    fn linked(&self) -> bool {
        self.flags.contains(TransferFlags::LINKED)
    }
    fn names(&self, account: u128) -> bool {
        account != 0 && (self.debit_account_id == account || self.credit_account_id == account)
    }
    fn request(events: Vec<Transfer>) -> Request {
        Request::CreateTransfers(events)
    }
    fn results(reply: Reply) -> Option<Vec<CreateTransferResult>> {
        match reply {
            Reply::CreateTransfers(results) => Some(results),
            _ => None,
        }
    }
}

/// The linked chains of `count` events, as `start..end` ranges in order: a
/// chain runs from an event to the first one without the `linked` flag
/// (included), or to the end of the request (an open chain).
pub fn chains(count: usize, linked: impl Fn(usize) -> bool) -> Vec<std::ops::Range<usize>> {
    let mut chains = Vec::new();
    let mut start = 0;
    for index in 0..count {
        if !linked(index) || index + 1 == count {
            chains.push(start..index + 1);
            start = index + 1;
        }
    }
    chains
}

/// The home cell of a transfer by the accounts it names, if it names any.
pub fn transfer_home(table: &RoutingTable, transfer: &Transfer) -> Option<CellId> {
    home_of_accounts(table, transfer.debit_account_id, transfer.credit_account_id)
}

fn home_of_accounts(table: &RoutingTable, debit: u128, credit: u128) -> Option<CellId> {
    match (debit, credit) {
        (0, 0) => None,
        (0, credit) => Some(table.cell_of_account(credit)),
        (debit, _) => Some(table.cell_of_account(debit)),
    }
}

/// The accounts of pending transfers found by a lookup: pending id →
/// (debit account, credit account).
pub type PendingFound = BTreeMap<u128, (u128, u128)>;

/// The pending transfers the gateway must look up before it can split
/// `transfers`: those resolved by a chain's first event that names no
/// account and are not created earlier in the same request. In request
/// order, without repeats.
pub fn pending_to_find(transfers: &[Transfer]) -> Vec<u128> {
    let heads_without_accounts = chains(transfers.len(), |index| transfers[index].linked())
        .into_iter()
        .map(|chain| &transfers[chain.start])
        .filter(|head| transfer_home_unknown(head))
        .count();
    if heads_without_accounts == 0 {
        return Vec::new();
    }
    let mut created: HashSet<u128> = HashSet::new();
    let mut wanted: Vec<u128> = Vec::new();
    let mut seen: HashSet<u128> = HashSet::new();
    for chain in chains(transfers.len(), |index| transfers[index].linked()) {
        let head = &transfers[chain.start];
        if transfer_home_unknown(head) && !created.contains(&head.pending_id) && seen.insert(head.pending_id) {
            wanted.push(head.pending_id);
        }
        created.extend(transfers[chain].iter().map(|transfer| transfer.id));
    }
    wanted
}

fn transfer_home_unknown(transfer: &Transfer) -> bool {
    transfer.debit_account_id == 0 && transfer.credit_account_id == 0
}

/// Splits `transfers` by home cell (see the module). `found` holds the
/// pending transfers looked up (see [`pending_to_find`]); one neither found
/// nor created earlier in the request goes to `fallback`.
pub fn split_transfers(
    table: &RoutingTable,
    transfers: &[Transfer],
    found: &PendingFound,
    fallback: CellId,
) -> Vec<Part> {
    // Where each transfer of the request goes, by id, for a post or void
    // naming one created earlier in the request (built only if needed).
    let needs_ids = transfers.iter().any(transfer_home_unknown);
    let mut home_by_id: HashMap<u128, CellId> = HashMap::new();
    let mut parts = Parts::default();
    for chain in chains(transfers.len(), |index| transfers[index].linked()) {
        let head = &transfers[chain.start];
        let home = transfer_home(table, head).unwrap_or_else(|| {
            home_by_id
                .get(&head.pending_id)
                .copied()
                .or_else(|| {
                    found.get(&head.pending_id).and_then(|&(debit, credit)| home_of_accounts(table, debit, credit))
                })
                .unwrap_or(fallback)
        });
        let spans_cells = transfers[chain.clone()].iter().any(|transfer| {
            [transfer.debit_account_id, transfer.credit_account_id]
                .into_iter()
                .any(|account| account != 0 && table.cell_of_account(account) != home)
        });
        if needs_ids {
            for transfer in &transfers[chain.clone()] {
                home_by_id.insert(transfer.id, home);
            }
        }
        let open = transfers[chain.end - 1].linked();
        parts.push(home, chain, open, spans_cells);
    }
    parts.finish()
}

/// Splits `accounts` by the owner of each account's shard; a linked chain
/// must stay in one cell.
pub fn split_accounts(table: &RoutingTable, accounts: &[Account]) -> Result<Vec<Part>, SplitError> {
    let mut parts = Parts::default();
    for chain in chains(accounts.len(), |index| accounts[index].linked()) {
        let home = table.cell_of_account(accounts[chain.start].id);
        for index in chain.clone() {
            let cell = table.cell_of_account(accounts[index].id);
            if cell != home {
                return Err(SplitError::CrossCell { first_index: chain.start, first_cell: home, index, cell });
            }
        }
        let open = accounts[chain.end - 1].linked();
        parts.push(home, chain, open, false);
    }
    Ok(parts.finish())
}

/// Splits the ids of a lookup of accounts by the owner of each.
pub fn split_ids(table: &RoutingTable, ids: &[u128]) -> Vec<Part> {
    let mut parts = Parts::default();
    for (index, &id) in ids.iter().enumerate() {
        parts.push(table.cell_of_account(id), index..index + 1, false, false);
    }
    parts.finish()
}

/// Parts being built, one per cell, in the order cells first appear.
#[derive(Default)]
struct Parts {
    parts: Vec<Part>,
}

impl Parts {
    fn push(&mut self, cell: CellId, events: std::ops::Range<usize>, chain_open: bool, spans_cells: bool) {
        let position = match self.parts.iter().position(|part| part.cell == cell) {
            Some(position) => position,
            None => {
                self.parts.push(Part { cell, indices: Vec::new(), chain_open: false, spans_cells: false });
                self.parts.len() - 1
            }
        };
        let part = &mut self.parts[position];
        part.indices.extend(events);
        // Only the request's last chain can be open, so it ends its part.
        part.chain_open = chain_open;
        part.spans_cells |= spans_cells;
    }

    fn finish(self) -> Vec<Part> {
        self.parts
    }
}

/// What to do after parts were refused `misrouted`, once the gateway has
/// refreshed its table (`fresh`) from the one it split them by (`used`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MisrouteVerdict {
    /// The table moved on: split the refused parts again by it and resend.
    SplitAgain,
    /// No newer table, but it names the refusing cell as the owner of every
    /// refused account: a shard move between its steps (released, or not
    /// yet acquired). Resend after a pause.
    Pause,
    /// Refusal `n` names an account the table places in another cell (an
    /// event no table can route to one cell): answer the client with it.
    Answer(usize),
}

/// The verdict for `refusals`, each `(refusing cell, refused account)`.
pub fn misroute_verdict(used: &RoutingTable, fresh: &RoutingTable, refusals: &[(CellId, u128)]) -> MisrouteVerdict {
    if fresh.version() > used.version() {
        return MisrouteVerdict::SplitAgain;
    }
    match refusals.iter().position(|&(cell, account)| fresh.cell_of_account(account) != cell) {
        Some(refusal) => MisrouteVerdict::Answer(refusal),
        None => MisrouteVerdict::Pause,
    }
}

/// `parts` with every part for a cell that `known` does not know (a
/// clearing account's id naming no cell) merged into the `fallback` cell's
/// part, which answers for it (`account_reserved`, not found).
pub fn into_known_cells(parts: Vec<Part>, known: impl Fn(CellId) -> bool, fallback: CellId) -> Vec<Part> {
    if parts.iter().all(|part| known(part.cell)) {
        return parts;
    }
    let mut merged: Vec<Part> = Vec::with_capacity(parts.len());
    for mut part in parts {
        if !known(part.cell) {
            part.cell = fallback;
        }
        match merged.iter_mut().find(|other| other.cell == part.cell) {
            None => merged.push(part),
            Some(other) => {
                other.indices.extend(part.indices);
                other.indices.sort_unstable();
                // An open chain ends the request: it stays last after the sort.
                other.chain_open |= part.chain_open;
                other.spans_cells |= part.spans_cells;
            }
        }
    }
    merged
}

/// The events of `part`, in order.
pub fn part_events<E: Copy>(events: &[E], part: &Part) -> Vec<E> {
    part.indices.iter().map(|&index| events[index]).collect()
}

/// The results of a request of `count` events, each part's results put at
/// its events' positions. `parts` must cover every position exactly once,
/// each with one result per event (the caller checks a cell's reply has
/// one result per event before it gets here).
pub fn merge_results<R: Copy>(count: usize, answered: &[(Part, Vec<R>)]) -> Vec<R> {
    let mut merged: Vec<Option<R>> = vec![None; count];
    for (part, results) in answered {
        assert_eq!(part.indices.len(), results.len(), "one result per event of a part");
        for (&index, &result) in part.indices.iter().zip(results) {
            assert!(merged[index].replace(result).is_none(), "event {index} answered twice");
        }
    }
    merged
        .into_iter()
        .enumerate()
        .map(|(index, result)| result.unwrap_or_else(|| panic!("event {index} unanswered")))
        .collect()
}

/// What lookups found, in the order of `ids` (as the ledger answers: ids
/// not found are left out, an id asked twice is answered twice). When
/// several cells answer the same id, the first found is kept unless
/// `prefer(kept, other)` says otherwise.
pub fn merge_found<T: Clone>(
    ids: &[u128],
    found: impl IntoIterator<Item = T>,
    id_of: impl Fn(&T) -> u128,
    prefer: impl Fn(&T, &T) -> bool,
) -> Vec<T> {
    let combine = |kept: &T, other: &T| if prefer(kept, other) { other.clone() } else { kept.clone() };
    merge_found_with(ids, found, id_of, combine)
}

/// As [`merge_found`], the items found under one id combined into one by `combine(kept, other)`.
pub fn merge_found_with<T: Clone>(
    ids: &[u128],
    found: impl IntoIterator<Item = T>,
    id_of: impl Fn(&T) -> u128,
    combine: impl Fn(&T, &T) -> T,
) -> Vec<T> {
    let mut by_id: BTreeMap<u128, T> = BTreeMap::new();
    for item in found {
        match by_id.entry(id_of(&item)) {
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert(item);
            }
            std::collections::btree_map::Entry::Occupied(mut entry) => {
                let combined = combine(entry.get(), &item);
                entry.insert(combined);
            }
        }
    }
    ids.iter().filter_map(|id| by_id.get(id).cloned()).collect()
}

/// Of two transfers found under one id (the legs of a cross-cell transfer,
/// one in each of its cells), whether `other` is the better answer than
/// `kept`: the leg in the transfer's home cell, the one that names the
/// client's debit account rather than a clearing account.
pub fn prefer_home_leg(kept: &Transfer, other: &Transfer) -> bool {
    is_clearing_account(kept.debit_account_id) && !is_clearing_account(other.debit_account_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellpay_cluster::routing::RoutingChange;
    use cellpay_cluster::topology::Topology;
    use cellpay_ledger::id::account_id;

    /// Four cells; shard s (user s) belongs to `table.owner(s)`.
    fn table() -> (Topology, RoutingTable) {
        let topology = Topology::local(20_000, 4);
        let table = RoutingTable::initial(&topology);
        (topology, table)
    }

    /// The account of user `user` and its cell.
    fn account(table: &RoutingTable, user: u64) -> (u128, CellId) {
        let id = account_id(user, 1).unwrap();
        (id, table.cell_of_account(id))
    }

    /// Users of two different cells.
    fn users_of_two_cells(table: &RoutingTable) -> (u64, u64) {
        let first = 1;
        let second = (2..100).find(|&user| account(table, user).1 != account(table, first).1).unwrap();
        (first, second)
    }

    fn transfer(id: u128, debit: u128, credit: u128) -> Transfer {
        Transfer {
            id,
            debit_account_id: debit,
            credit_account_id: credit,
            amount: 1,
            ledger: 1,
            code: 1,
            ..Transfer::default()
        }
    }

    fn linked(mut transfer: Transfer) -> Transfer {
        transfer.flags.insert(TransferFlags::LINKED);
        transfer
    }

    fn post(id: u128, pending_id: u128) -> Transfer {
        Transfer { id, pending_id, flags: TransferFlags::POST_PENDING_TRANSFER, ..Transfer::default() }
    }

    /// `(cell, indices, chain_open, spans_cells)` of each part.
    fn shape(parts: &[Part]) -> Vec<(CellId, Vec<usize>, bool, bool)> {
        parts.iter().map(|p| (p.cell, p.indices.clone(), p.chain_open, p.spans_cells)).collect()
    }

    #[test]
    fn chains_end_at_the_first_event_without_the_linked_flag() {
        let flags = [false, true, true, false, true, false, true];
        let ranges = chains(flags.len(), |index| flags[index]);
        assert_eq!(ranges, vec![0..1, 1..4, 4..6, 6..7]);
        assert_eq!(chains(0, |_| false), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(chains(2, |_| true), vec![0..2], "a chain left open at the end");
    }

    #[test]
    fn a_transfer_goes_to_its_debit_accounts_cell_else_its_credit_accounts() {
        let (_, table) = table();
        let (user_a, user_b) = users_of_two_cells(&table);
        let ((a, cell_a), (b, cell_b)) = (account(&table, user_a), account(&table, user_b));
        assert_eq!(transfer_home(&table, &transfer(1, a, b)), Some(cell_a), "by the debit account");
        assert_eq!(transfer_home(&table, &transfer(1, b, a)), Some(cell_b));
        assert_eq!(transfer_home(&table, &transfer(1, 0, b)), Some(cell_b), "no debit account: by the credit account");
        assert_eq!(transfer_home(&table, &transfer(1, 0, 0)), None, "by the pending transfer");
        let parts = split_transfers(
            &table,
            &[transfer(1, a, b), transfer(2, b, b), transfer(3, a, a)],
            &PendingFound::new(),
            1,
        );
        assert_eq!(shape(&parts), vec![(cell_a, vec![0, 2], false, true), (cell_b, vec![1], false, false)]);
        assert!(parts[0].combinable() && parts[1].combinable());
    }

    #[test]
    fn a_post_or_void_naming_no_account_follows_its_pending_transfer() {
        let (_, table) = table();
        let (user_a, user_b) = users_of_two_cells(&table);
        let ((a, cell_a), (b, cell_b)) = (account(&table, user_a), account(&table, user_b));
        let mut pending = transfer(10, b, b);
        pending.flags.insert(TransferFlags::PENDING);
        // Created earlier in the request: no lookup; the post follows it.
        let batch = [transfer(1, a, a), pending, post(11, 10)];
        assert_eq!(pending_to_find(&batch), Vec::<u128>::new());
        let parts = split_transfers(&table, &batch, &PendingFound::new(), cell_a);
        assert_eq!(shape(&parts), vec![(cell_a, vec![0], false, false), (cell_b, vec![1, 2], false, false)]);
        // Created before: looked up, then routed by the accounts found.
        let batch = [post(12, 20), transfer(2, a, a), post(13, 20), post(14, 21)];
        assert_eq!(pending_to_find(&batch), vec![20, 21], "each pending id once");
        let found = PendingFound::from([(20, (b, b))]);
        let parts = split_transfers(&table, &batch, &found, cell_a);
        assert_eq!(shape(&parts), vec![(cell_b, vec![0, 2], false, false), (cell_a, vec![1, 3], false, false)]);
        // Found nowhere: to the fallback cell, which answers pending_transfer_not_found.
        let parts = split_transfers(&table, &[post(15, 99)], &PendingFound::new(), 3);
        assert_eq!(shape(&parts), vec![(3, vec![0], false, false)]);
        // A post that names its accounts needs no lookup.
        let named = Transfer { debit_account_id: b, credit_account_id: b, ..post(16, 20) };
        assert_eq!(pending_to_find(&[named]), Vec::<u128>::new());
    }

    #[test]
    fn a_linked_chain_goes_whole_to_the_home_of_its_first_event() {
        let (_, table) = table();
        let (user_a, user_b) = users_of_two_cells(&table);
        let ((a, cell_a), (b, cell_b)) = (account(&table, user_a), account(&table, user_b));
        let batch = [
            transfer(1, b, b),
            linked(transfer(2, a, a)),
            linked(transfer(3, b, b)),
            transfer(4, b, b),
            transfer(5, b, b),
        ];
        let parts = split_transfers(&table, &batch, &PendingFound::new(), 1);
        assert_eq!(shape(&parts), vec![(cell_b, vec![0, 4], false, false), (cell_a, vec![1, 2, 3], false, true)]);
        // A chain headed by a post naming no account follows the pending transfer.
        let batch = [linked(post(6, 20)), transfer(7, a, a)];
        assert_eq!(pending_to_find(&batch), vec![20]);
        let parts = split_transfers(&table, &batch, &PendingFound::from([(20, (b, a))]), cell_a);
        assert_eq!(shape(&parts), vec![(cell_b, vec![0, 1], false, true)]);
        // Only a chain's first event decides: a post inside a chain needs no lookup.
        assert_eq!(pending_to_find(&[linked(transfer(8, a, a)), post(9, 30)]), Vec::<u128>::new());
    }

    #[test]
    fn an_open_chain_ends_its_part_and_is_never_combined() {
        let (_, table) = table();
        let (user_a, user_b) = users_of_two_cells(&table);
        let ((a, cell_a), (b, cell_b)) = (account(&table, user_a), account(&table, user_b));
        let batch = [transfer(1, a, a), transfer(2, b, b), linked(transfer(3, a, a)), linked(transfer(4, a, a))];
        let parts = split_transfers(&table, &batch, &PendingFound::new(), 1);
        assert_eq!(shape(&parts), vec![(cell_a, vec![0, 2, 3], true, false), (cell_b, vec![1], false, false)]);
        assert!(!parts[0].combinable());
        let accounts = [
            Account { id: b, ..Account::default() },
            Account { id: a, flags: AccountFlags::LINKED, ..Account::default() },
        ];
        let parts = split_accounts(&table, &accounts).unwrap();
        assert_eq!(shape(&parts), vec![(cell_b, vec![0], false, false), (cell_a, vec![1], true, false)]);
    }

    #[test]
    fn accounts_go_to_their_shards_owner_and_a_chain_of_accounts_stays_in_one_cell() {
        let (topology, table) = table();
        let (user_a, user_b) = users_of_two_cells(&table);
        let ((a, cell_a), (b, cell_b)) = (account(&table, user_a), account(&table, user_b));
        let a2 = account_id(user_a, 2).unwrap();
        let plain = |id| Account { id, ledger: 1, code: 1, ..Account::default() };
        let link = |id| Account { flags: AccountFlags::LINKED, ..plain(id) };
        let parts = split_accounts(&table, &[plain(a), plain(b), link(a2), plain(a)]).unwrap();
        assert_eq!(shape(&parts), vec![(cell_a, vec![0, 2, 3], false, false), (cell_b, vec![1], false, false)]);
        assert_eq!(
            split_accounts(&table, &[plain(a), link(a2), plain(b)]),
            Err(SplitError::CrossCell { first_index: 1, first_cell: cell_a, index: 2, cell: cell_b })
        );
        // By the table, not the topology: a moved shard's accounts follow it.
        let to = topology.cells.iter().map(|cell| cell.id).find(|&cell| cell != cell_a).unwrap();
        let shard = (user_a % 100) as u32;
        let moved = table.apply(1, RoutingChange::MoveShard { shard, to }, &topology).unwrap();
        let parts = split_accounts(&moved, &[plain(a)]).unwrap();
        assert_eq!(parts[0].cell, to);
    }

    #[test]
    fn a_part_for_no_known_cell_goes_to_the_fallback_cell() {
        let (_, table) = table();
        let (a, cell_a) = account(&table, 1);
        let clearing = cellpay_ledger::id::clearing_account_id(1, 77, cell_a as u16);
        let ids = [a, clearing, a];
        let parts = split_ids(&table, &ids);
        assert_eq!(shape(&parts), vec![(cell_a, vec![0, 2], false, false), (77, vec![1], false, false)]);
        let known = |cell: CellId| (1..=4).contains(&cell);
        let parts = into_known_cells(parts, known, cell_a);
        assert_eq!(shape(&parts), vec![(cell_a, vec![0, 1, 2], false, false)]);
        let parts = into_known_cells(split_ids(&table, &ids), known, 2);
        assert_eq!(shape(&parts), vec![(cell_a, vec![0, 2], false, false), (2, vec![1], false, false)]);
    }

    #[test]
    fn a_misroute_is_split_again_by_a_newer_table_else_waited_out_or_answered() {
        let (topology, table) = table();
        let (a, cell_a) = account(&table, 1);
        let other = topology.cells.iter().map(|cell| cell.id).find(|&cell| cell != cell_a).unwrap();
        let moved = table.apply(1, RoutingChange::MoveShard { shard: 1, to: other }, &topology).unwrap();
        assert_eq!(misroute_verdict(&table, &moved, &[(cell_a, a)]), MisrouteVerdict::SplitAgain);
        // Same table, and it names the refusing cell: a move between its steps.
        assert_eq!(misroute_verdict(&moved, &moved, &[(other, a)]), MisrouteVerdict::Pause);
        // Same table, naming another cell: nothing to wait for.
        assert_eq!(misroute_verdict(&table, &table, &[(cell_a, a), (other, a)]), MisrouteVerdict::Answer(1));
    }

    #[test]
    fn results_are_put_back_at_their_events_positions() {
        let parts = [
            (Part { cell: 2, indices: vec![1, 3], chain_open: false, spans_cells: false }, vec!["b1", "b3"]),
            (Part { cell: 1, indices: vec![0, 2, 4], chain_open: false, spans_cells: false }, vec!["a0", "a2", "a4"]),
        ];
        assert_eq!(merge_results(5, &parts), vec!["a0", "b1", "a2", "b3", "a4"]);
    }

    #[test]
    fn split_then_merge_answers_every_event_in_request_order() {
        let (_, table) = table();
        // Users 1..=60: every cell, with chains and a trailing open chain.
        let mut batch: Vec<Transfer> = (1..=60u64)
            .map(|user| {
                let id = account_id(user, 1).unwrap();
                let t = transfer(u128::from(user), id, id);
                if user % 7 == 0 {
                    linked(t)
                } else {
                    t
                }
            })
            .collect();
        batch.push(linked(transfer(61, account_id(3, 1).unwrap(), account_id(3, 1).unwrap())));
        let parts = split_transfers(&table, &batch, &PendingFound::new(), 1);
        let mut covered: Vec<usize> = parts.iter().flat_map(|p| p.indices.clone()).collect();
        covered.sort_unstable();
        assert_eq!(covered, (0..batch.len()).collect::<Vec<_>>(), "every event in exactly one part");
        for part in &parts {
            assert!(part.indices.windows(2).all(|w| w[0] < w[1]), "request order inside a part");
        }
        assert_eq!(parts.iter().filter(|p| p.chain_open).count(), 1);
        // Each cell answers its events' ids: merged, they are the request's ids in order.
        let answered: Vec<(Part, Vec<u128>)> =
            parts.iter().map(|p| (p.clone(), part_events(&batch, p).iter().map(|t| t.id).collect())).collect();
        assert_eq!(merge_results(batch.len(), &answered), batch.iter().map(|t| t.id).collect::<Vec<_>>());
    }

    #[test]
    fn lookups_answer_in_request_order_leaving_out_what_is_not_found() {
        let (_, table) = table();
        let (user_a, user_b) = users_of_two_cells(&table);
        let ((a, cell_a), (b, cell_b)) = (account(&table, user_a), account(&table, user_b));
        let missing = account_id(user_a, 9).unwrap();
        let ids = [b, missing, a, b];
        let parts = split_ids(&table, &ids);
        assert_eq!(shape(&parts), vec![(cell_b, vec![0, 3], false, false), (cell_a, vec![1, 2], false, false)]);
        // Cell a answers first (any order), and not the missing id.
        let found = [Account { id: a, ..Account::default() }, Account { id: b, ..Account::default() }];
        let merged: Vec<u128> = merge_found(&ids, found, |x| x.id, |_, _| false).iter().map(|x| x.id).collect();
        assert_eq!(merged, vec![b, a, b], "an id asked twice is answered twice, as the ledger does");
        // A cross-cell transfer's two legs: answered once per id asked, by its home cell's leg.
        let (_, cell_b) = account(&table, user_b);
        let home_leg = transfer(5, a, cellpay_ledger::id::clearing_account_id(1, cell_a as u16, cell_b as u16));
        let other_leg = transfer(5, cellpay_ledger::id::clearing_account_id(1, cell_b as u16, cell_a as u16), b);
        assert_eq!(merge_found(&[5, 6], [other_leg, home_leg], |t| t.id, prefer_home_leg), vec![home_leg]);
        assert_eq!(merge_found(&[5], [home_leg, other_leg], |t| t.id, prefer_home_leg), vec![home_leg]);
    }
}
