//! Cross-cell transfers: try / confirm / cancel between cells, decided by
//! the coordinator's log.
//!
//! A transfer whose accounts are in two cells (or a linked chain touching
//! several) is split into **legs**, one pending transfer per event per cell
//! involved, each under the event's own id:
//!
//! - in the debit account's cell: debit the account, credit the cell's
//!   clearing account for the credit account's cell (`id::clearing_account_id`);
//! - in the credit account's cell: debit the clearing account for the debit
//!   account's cell, credit the account;
//! - an event of a chain whose accounts are both in one cell: one leg there.
//!
//! The **coordinator** is the cell of the first event's debit account (the
//! cell a router sends the request to). Its log drives everything:
//!
//! 1. **try**: the request's entry applies the coordinator's legs (a linked
//!    chain of pending transfers: all or nothing) and records the operation
//!    (`Op`), with a deadline `TRY_WINDOW_NS` after its timestamp; the
//!    coordinator's leader sends `Try` to every other cell involved;
//! 2. each participant's log applies its legs (all or nothing) and records
//!    them as prepared, or refuses (a result code, and which event); its
//!    leader answers `Prepared` or `Refused`;
//! 3. the coordinator's log records the answers; the **decision** is the
//!    entry that sees every participant prepared (confirm) or one refusal
//!    (cancel), or a `Timeout` entry after the deadline (cancel). Its own legs
//!    are posted or voided in that same entry; the client's results are
//!    answered once it is applied (durable);
//! 4. the leader sends `Decide`; each participant posts or voids its legs
//!    and answers `Done`; the coordinator forgets the operation once every
//!    participant is done.
//!
//! A leg is posted or voided by the system transfer `id::resolution_id(leg)`
//! (a void records the refusal: the failing event's index in `user_data_64`
//! and its result code in `user_data_32`), so every balance change is a
//! transfer, and a retry of the client's request is answered from them
//! (`exists`, or the original refusal).
//!
//! A client's **pending transfer** across cells is an operation whose
//! confirm leaves its legs pending: the coordinator (its debit account's
//! cell) **holds** it. The client's post or void applies to the held leg
//! there, decided by the coordinator alone (the other leg can always
//! follow), and is **released** to the participant (`Release`, the same
//! post or void under the same id), as is an expiry of the coordinator's
//! leg, which alone carries the timeout.
//!
//! **Every message is idempotent and may be lost, repeated or reordered.**
//! Leaders resend from the replicated state (`resend`): tries and decisions
//! until answered, and a prepared participant asks its coordinator (`Ask`).
//! A `Decide(cancel)` for an operation a participant has not tried leaves a
//! **tombstone**, so a late `Try` is refused rather than reserving money
//! nobody will release; a participant also refuses a `Try` past its
//! deadline (by its own log's time), so tombstones are dropped after it.
//! Both tests use the participant's own log timestamps, so no clock needs to
//! agree with another.
//!
//! Architecture invariant: this module is deterministic: a function of the
//! log (entries and their timestamps) and the ledger; no clock, no I/O.

use std::collections::{BTreeMap, BTreeSet};

use cellpay_cluster::topology::CellId;
use cellpay_ledger::id::{
    clearing_account_id, clearing_holder, clearing_peer as clearing_peer_cell, is_clearing_account, resolution_id,
    TRANSFER_ID_SYSTEM_MIN,
};
use cellpay_ledger::{CreateTransferResult as R, History, Ledger, PendingStatus, Transfer, TransferFlags, RECORD_SIZE};

/// How long (by the coordinator's log time) a cross-cell transfer may wait
/// for its participants before it is cancelled, and how long after it a
/// participant still accepts its try.
pub const TRY_WINDOW_NS: u64 = 10_000_000_000;
/// How long a request's answer may wait for its cross-cell operations'
/// decisions after its own entry's commit deadline (then: `timeout`, outcome
/// unknown; the decision is still made and a retry answers it).
pub const DECISION_WAIT: std::time::Duration = std::time::Duration::from_secs(15);
/// How often a leader resends the cross-cell messages not yet answered.
pub const RESEND_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Messages received by a leader and waiting to be logged, per cell (more are dropped: senders resend).
pub const INBOX_ITEMS_MAX: usize = 16_384;

/// Undecided or unacknowledged cross-cell operations a cell coordinates at once.
pub const OPS_MAX: usize = 65_536;
/// Prepared operations and tombstones a cell holds as a participant.
pub const PARTS_MAX: usize = 262_144;
/// The most the cross-cell state may take encoded (`encode_into`): it is
/// stored with every checkpoint, in the consensus metadata, and must fit
/// there with the rest of the cell's state (see `cell_state`). New
/// operations, tries and holds that would pass it are refused
/// `cross_cell_transfers_max_reached`; what is admitted reserves what it
/// may grow to (an operation the holds it may leave, a hold its release).
pub const STATE_BYTES_MAX: usize = 768 * 1024;

/// Encoded bytes of a hold, and of a release (see `encode_into`).
const HOLD_BYTES: usize = 16 + 8 + 16 + 8;
const RELEASE_BYTES: usize = 16 + 8 + 1 + RECORD_SIZE + 8;
/// A hold is accounted with the release it becomes.
const HOLD_ACCOUNTED: usize = HOLD_BYTES + RELEASE_BYTES;
/// The four counts that head the encoding's sections.
const STATE_FIXED_BYTES: usize = 4 * 4;

/// An operation's accounted bytes: its encoding (with a cancel's code), and
/// the holds its client pending transfers may leave.
fn op_bytes(events: &[Transfer], participants: usize) -> usize {
    let encoded = 16 + 8 + 4 + events.len() * (RECORD_SIZE + 16) + 4 + participants * 9 + 1 + 8;
    encoded + events.iter().filter(|event| held(event)).count() * HOLD_ACCOUNTED
}

/// A participant's record's encoded bytes.
fn part_bytes(part: &Part) -> usize {
    8 + 16
        + 8
        + 1
        + match part {
            Part::Tombstone => 0,
            Part::Prepared { legs, held } => 4 + 16 * legs.len() + 4 + 16 * held.len(),
        }
}

/// What a participant has answered, as the coordinator's log records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartStatus {
    Trying,
    Prepared,
    /// The participant applied the decision (or needs none).
    Done,
}

/// The coordinator's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Confirm,
    /// Cancelled because `event` (an index into the operation's events) was refused `code`.
    Cancel {
        event: u32,
        code: R,
    },
}

/// An operation this cell coordinates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// The client's events, in request order (one, or a linked chain).
    pub events: Vec<Transfer>,
    /// Each event's (debit account's cell, credit account's cell).
    pub cells: Vec<(CellId, CellId)>,
    /// Log time after which the coordinator cancels and participants refuse the try.
    pub deadline: u64,
    pub participants: BTreeMap<CellId, PartStatus>,
    pub decision: Option<Decision>,
}

/// What a participant holds for an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    /// Its legs are pending, waiting for the decision; `held` are the legs
    /// of client pending transfers, which a confirm leaves pending (their
    /// coordinator releases them later).
    Prepared { legs: Vec<u128>, held: Vec<u128> },
    /// Cancelled before its try arrived: a late try is refused.
    Tombstone,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct PartRecord {
    part: Part,
    deadline: u64,
}

/// A client's cross-cell pending transfer, confirmed and still open, as its
/// coordinator (the debit account's cell, which holds the leg the client
/// posts or voids) keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hold {
    /// The credit account's cell, if not this one.
    peer: Option<CellId>,
    /// The client's credit account (the leg here credits a clearing account).
    credit_account: u128,
    /// When the pending transfer expires (log time), 0 for never.
    expires_at: u64,
}

/// What a coordinator tells a participant about a held leg: posted or voided
/// by `transfer`, or expired; kept until the participant answers `Released`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Release {
    peer: CellId,
    expire: bool,
    transfer: Transfer,
    /// Log time of the release (resends wait a little after it).
    at: u64,
}

/// A cell's cross-cell state: what it coordinates and what it has prepared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrossCellState {
    /// Deliberate bug for the simulator (never stored): confirm operations
    /// without waiting for the participants' tries.
    pub bug_confirm_without_try: bool,
    ops: BTreeMap<u128, Op>,
    /// By (coordinator, operation id).
    parts: BTreeMap<(CellId, u128), PartRecord>,
    /// Tombstones by deadline, for dropping them once no try can be accepted.
    tombstones: BTreeSet<(u64, CellId, u128)>,
    /// Open cross-cell pending transfers this cell coordinates, by id.
    holds: BTreeMap<u128, Hold>,
    /// (expires at, id) of the holds that expire.
    hold_expiries: BTreeSet<(u64, u128)>,
    /// Held legs released here and not yet released by the participant, by pending id.
    releases: BTreeMap<u128, Release>,
    /// What the state accounts for against `STATE_BYTES_MAX` (derived, not encoded).
    bytes: usize,
}

/// A message between cells (and, `Timeout`, from a cell's leader to its own log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// Coordinator → participant: apply your legs of this operation.
    Try { op: u128, deadline: u64, events: Vec<Transfer>, cells: Vec<(CellId, CellId)> },
    /// Coordinator → participant: the decision.
    Decide { op: u128, confirm: bool, deadline: u64 },
    /// Participant → coordinator: my legs are pending.
    Prepared { op: u128 },
    /// Participant → coordinator: event `event` was refused `code` (nothing applied).
    Refused { op: u128, event: u32, code: u32 },
    /// Participant → coordinator: the decision is applied.
    Done { op: u128 },
    /// Participant → coordinator: what was decided? (Answered by the leader, never logged.)
    Ask { op: u128 },
    /// A coordinator's leader to its own log: the deadline passed.
    Timeout { op: u128 },
    /// Coordinator → participant: the client posted or voided (`transfer`)
    /// pending transfer `leg`, or it expired: do the same to your leg.
    Release { leg: u128, expire: bool, transfer: Transfer },
    /// Participant → coordinator: the release of `leg` is applied.
    Released { leg: u128 },
}

/// A step of the protocol a cell's log applied (see the module's
/// documentation), reported to the engine's world so that the simulator can
/// crash a node between any two steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Coordinator: the request's own legs are tried and the operation recorded.
    Tried,
    /// Participant: its legs are pending.
    Prepared,
    /// Participant: it refused its legs.
    Refused,
    /// Coordinator: the decision is made and its own legs resolved.
    Decided,
    /// Participant: its legs are resolved by the decision.
    Resolved,
    /// Participant: a cancel arrived before the try.
    Tombstoned,
    /// Coordinator: every participant is done; the operation is forgotten.
    Forgotten,
    /// Coordinator: a held pending transfer was posted, voided or expired here; its release is recorded.
    Released,
    /// Participant: it applied a release to its held leg.
    ReleaseApplied,
}

impl Step {
    pub const ALL: [Step; 9] = [
        Step::Tried,
        Step::Prepared,
        Step::Refused,
        Step::Decided,
        Step::Resolved,
        Step::Tombstoned,
        Step::Forgotten,
        Step::Released,
        Step::ReleaseApplied,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Tried => "tried",
            Step::Prepared => "prepared",
            Step::Refused => "refused",
            Step::Decided => "decided",
            Step::Resolved => "resolved",
            Step::Tombstoned => "tombstoned",
            Step::Forgotten => "forgotten",
            Step::Released => "released",
            Step::ReleaseApplied => "release-applied",
        }
    }
}

/// The sizes of a cell's cross-cell state (see `CrossCellState::counts`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub operations: usize,
    pub parts: usize,
    pub holds: usize,
    pub releases: usize,
}

/// What a leader does with a cross-cell message (`CrossCellState::triage`).
#[derive(Debug, PartialEq, Eq)]
pub enum Triage {
    /// Log it: applying it changes the state.
    Log,
    /// Answer it from the applied state, without logging it.
    Answer(Item),
    /// Drop it: it changes nothing and needs no answer.
    Drop,
}

/// What applying cross-cell entries produced, besides the state change.
#[derive(Debug, Default)]
pub struct Effects {
    /// Messages for the leader to send: (to cell, item).
    pub outbox: Vec<(CellId, Item)>,
    /// Operations decided here (coordinator), with one result per event.
    pub decided: Vec<(u128, Vec<R>)>,
    /// The protocol steps applied, in order.
    pub steps: Vec<Step>,
}

/// The result of a client's request applied at its coordinator.
#[derive(Debug, PartialEq, Eq)]
pub struct Coordinated {
    /// One per event; the events of an operation not yet decided hold `Ok`
    /// until `waiting` says otherwise.
    pub results: Vec<R>,
    /// Operations not yet decided: (operation id, index of its first event in the request).
    pub waiting: Vec<(u128, usize)>,
}

/// The results of an operation's events for a decision.
pub fn decision_results(events: usize, decision: Decision) -> Vec<R> {
    match decision {
        Decision::Confirm => vec![R::Ok; events],
        Decision::Cancel { event, code } => {
            let mut results = vec![R::LinkedEventFailed; events];
            results[(event as usize).min(events - 1)] = code;
            results
        }
    }
}

/// One transfer from the two found under one id in two cells (the legs of a
/// cross-cell transfer, or the post or void of a cross-cell pending
/// transfer in each cell): as the client sent it. The home leg (the one
/// debiting the client's account, in its coordinator: it carries the
/// timeout) with the client's credit account from the other leg, where the
/// home leg credits a clearing account.
pub fn merge_legs(kept: &Transfer, other: &Transfer) -> Transfer {
    let (home, other) = if is_clearing_account(kept.debit_account_id) && !is_clearing_account(other.debit_account_id) {
        (other, kept)
    } else {
        (kept, other)
    };
    let mut merged = *home;
    if is_clearing_account(home.credit_account_id) && !is_clearing_account(other.credit_account_id) {
        merged.credit_account_id = other.credit_account_id;
    }
    merged
}

/// Applying one log entry: the cell's ledger and its history, the cell,
/// the entry's log time, and what applying it produces besides the state.
pub struct Apply<'a, H: History> {
    ledger: &'a mut Ledger,
    history: &'a H,
    cell: CellId,
    /// The entry's log time (see `log_time`), fixed when the entry begins.
    timestamp: u64,
    effects: &'a mut Effects,
}

impl<'a, H: History> Apply<'a, H> {
    /// An entry of `cell`'s log with timestamp `timestamp` (its leader's clock).
    pub fn new(
        ledger: &'a mut Ledger,
        history: &'a H,
        cell: CellId,
        timestamp: u64,
        effects: &'a mut Effects,
    ) -> Apply<'a, H> {
        let timestamp = log_time(ledger, timestamp);
        Apply { ledger, history, cell, timestamp, effects }
    }
}

/// The cell's log time for deadlines: an entry's timestamp is its leader's
/// clock, which a new leader's may be behind; the ledger's last timestamp
/// only goes forward. Deadlines and tombstones need time that never goes
/// back, or a try refused (or whose tombstone was dropped) at one time could
/// be accepted later.
fn log_time(ledger: &Ledger, timestamp: u64) -> u64 {
    timestamp.max(ledger.timestamp_last())
}

/// Why an event cannot take part in a cross-cell transfer (checked before any leg is tried).
fn refuse_event(event: &Transfer) -> Option<R> {
    if event.flags.contains(TransferFlags::CROSS_CELL_LEG) || event.flags.has_reserved_bits() {
        return Some(R::ReservedFlag);
    }
    if event.id >= TRANSFER_ID_SYSTEM_MIN {
        return Some(R::IdReserved);
    }
    if is_clearing_account(event.debit_account_id) || is_clearing_account(event.credit_account_id) {
        return Some(R::AccountReserved);
    }
    let unsupported = [
        TransferFlags::POST_PENDING_TRANSFER,
        TransferFlags::VOID_PENDING_TRANSFER,
        TransferFlags::BALANCING_DEBIT,
        TransferFlags::BALANCING_CREDIT,
        TransferFlags::CLOSING_DEBIT,
        TransferFlags::CLOSING_CREDIT,
    ];
    if unsupported.iter().any(|&flag| event.flags.contains(flag)) {
        return Some(R::CrossCellFlagsUnsupported);
    }
    // Clearing accounts are made per ledger: a ledger must be named first.
    if event.ledger == 0 {
        return Some(R::LedgerMustNotBeZero);
    }
    None
}

/// `cell`'s legs of an operation, each with the index of its event: pending
/// transfers under the events' ids, linked so that they apply all or nothing.
///
/// The leg of a client's pending transfer in its coordinator carries the
/// transfer's timeout (that cell expires it and releases the other leg);
/// every other leg has none.
fn legs_for(cell: CellId, events: &[Transfer], cells: &[(CellId, CellId)]) -> Vec<(usize, Transfer)> {
    let coordinator = cells.first().map(|&(debit, _)| debit);
    let mut legs: Vec<(usize, Transfer)> = Vec::new();
    for (index, (event, &(debit_cell, credit_cell))) in events.iter().zip(cells).enumerate() {
        let clearing = |peer: CellId| clearing_account_id(event.ledger, cell_u16(cell), cell_u16(peer));
        let (debit, credit) = match (debit_cell == cell, credit_cell == cell) {
            (true, true) => (event.debit_account_id, event.credit_account_id),
            (true, false) => (event.debit_account_id, clearing(credit_cell)),
            (false, true) => (clearing(debit_cell), event.credit_account_id),
            (false, false) => continue,
        };
        let leg = Transfer {
            id: event.id,
            debit_account_id: debit,
            credit_account_id: credit,
            amount: event.amount,
            pending_id: 0,
            user_data_128: event.user_data_128,
            user_data_64: event.user_data_64,
            user_data_32: event.user_data_32,
            timeout_s: if held(event) && coordinator == Some(cell) { event.timeout_s } else { 0 },
            ledger: event.ledger,
            code: event.code,
            flags: TransferFlags::PENDING | TransferFlags::LINKED | TransferFlags::CROSS_CELL_LEG,
            timestamp: 0,
        };
        legs.push((index, leg));
    }
    if let Some((_, last)) = legs.last_mut() {
        last.flags.remove(TransferFlags::LINKED);
    }
    legs
}

/// Whether a confirm leaves `event`'s legs pending: a client's pending transfer.
fn held(event: &Transfer) -> bool {
    event.flags.contains(TransferFlags::PENDING)
}

/// Whether `event` posts or voids a pending transfer.
fn resolves_pending(event: &Transfer) -> bool {
    event.flags.contains(TransferFlags::POST_PENDING_TRANSFER)
        || event.flags.contains(TransferFlags::VOID_PENDING_TRANSFER)
}

/// A participant applies its coordinator's release of held leg `leg`: the
/// same post or void (under the client's transfer id), or the expiry. It
/// must apply: the coordinator decided it. A repeated release finds it done.
fn apply_release(entry: &mut Apply<'_, impl History>, leg: u128, expire: bool, transfer: &Transfer) {
    if expire {
        let status = entry.ledger.expire_pending(entry.timestamp, leg, entry.history);
        assert_eq!(status, Some(PendingStatus::Expired), "the expiry of held cross-cell leg {leg} did not apply");
    } else {
        let result = entry.ledger.create_legs(entry.timestamp, std::slice::from_ref(transfer), entry.history)[0];
        assert!(
            matches!(result, R::Ok | R::Exists),
            "the release of held cross-cell leg {leg} by transfer {} was refused: {result}",
            transfer.id
        );
    }
}

/// The peer cell of `account` if it is `cell`'s clearing account for it.
fn clearing_peer(account: u128, cell: CellId) -> Option<CellId> {
    if !is_clearing_account(account) || u64::from(clearing_holder(account)) != cell {
        return None;
    }
    Some(CellId::from(clearing_peer_cell(account)))
}

/// Whether a transfer that resolved a pending transfer posted it.
fn resolves_pending_post(transfer: &Transfer) -> bool {
    transfer.flags.contains(TransferFlags::POST_PENDING_TRANSFER)
}

fn cell_u16(cell: CellId) -> u16 {
    u16::try_from(cell).expect("cell ids fit in 16 bits (checked by the topology)")
}

/// Creates the clearing accounts `legs` name, before the legs (outside their chain).
fn ensure_clearing_accounts(entry: &mut Apply<'_, impl History>, legs: &[(usize, Transfer)]) {
    for (_, leg) in legs {
        for account in [leg.debit_account_id, leg.credit_account_id] {
            if is_clearing_account(account) {
                entry.ledger.clearing_account(entry.timestamp, leg.ledger, account);
            }
        }
    }
}

/// The first failing leg's event and code, if the legs were refused.
fn refusal(legs: &[(usize, Transfer)], results: &[R]) -> Option<(usize, R)> {
    let failed = results.iter().position(|&result| result != R::Ok && result != R::LinkedEventFailed);
    let failed = failed.or_else(|| results.iter().position(|&result| result != R::Ok))?;
    Some((legs[failed].0, results[failed]))
}

/// Posts (confirm) or voids (cancel) legs with their resolution transfers.
/// They must apply: a leg's resolution is a decision already made.
fn resolve(entry: &mut Apply<'_, impl History>, legs: &[u128], decision: Decision) {
    if legs.is_empty() {
        return;
    }
    let (flags, user_data_64, user_data_32) = match decision {
        Decision::Confirm => (TransferFlags::POST_PENDING_TRANSFER, 0, 0),
        Decision::Cancel { event, code } => (TransferFlags::VOID_PENDING_TRANSFER, u64::from(event), code as u32),
    };
    let resolutions: Vec<Transfer> = legs
        .iter()
        .map(|&leg| Transfer {
            id: resolution_id(leg),
            pending_id: leg,
            flags,
            user_data_64,
            user_data_32,
            ..Transfer::default()
        })
        .collect();
    let results = entry.ledger.create_legs(entry.timestamp, &resolutions, entry.history);
    for (leg, result) in legs.iter().zip(&results) {
        // A held leg (a client's pending transfer) may have expired here
        // while its operation waited for the decision: a cancel finds it so.
        let expired = *result == R::PendingTransferExpired && decision != Decision::Confirm;
        assert!(
            matches!(result, R::Ok | R::Exists) || expired,
            "the resolution of cross-cell leg {leg} ({decision:?}) was refused: {result}"
        );
    }
}

impl CrossCellState {
    pub fn ops(&self) -> &BTreeMap<u128, Op> {
        &self.ops
    }

    /// The sizes of the state's parts (for metrics; each O(1)).
    pub fn counts(&self) -> Counts {
        Counts {
            operations: self.ops.len(),
            parts: self.parts.len(),
            holds: self.holds.len(),
            releases: self.releases.len(),
        }
    }

    /// Operations this cell has prepared as a participant and not yet resolved.
    pub fn prepared(&self) -> usize {
        self.parts.values().filter(|record| matches!(record.part, Part::Prepared { .. })).count()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.parts.is_empty()
    }

    /// Applies a client's transfers at the cell they were routed to: events
    /// whose accounts are all here go to the ledger as usual; each cross-cell
    /// operation (a transfer, or a linked chain, touching another cell) tries
    /// this cell's legs and is recorded for the decision.
    pub fn create_transfers(
        &mut self,
        entry: &mut Apply<'_, impl History>,
        events: &[Transfer],
        cells: &[(CellId, CellId)],
    ) -> Coordinated {
        assert_eq!(events.len(), cells.len());
        let mut coordinated = Coordinated { results: Vec::with_capacity(events.len()), waiting: Vec::new() };
        // A post or void of a cross-cell pending transfer applies here alone
        // (its other leg follows the release), whichever accounts it names.
        let mut adjusted: Option<Vec<Transfer>> = None;
        let mut local = Vec::with_capacity(events.len());
        for (index, (event, &(debit, credit))) in events.iter().zip(cells).enumerate() {
            let leg_credit = if (debit, credit) == (entry.cell, entry.cell) || !resolves_pending(event) {
                None
            } else {
                self.leg_credit(entry, event, credit)
            };
            if let Some(credit_account_id) = leg_credit {
                adjusted.get_or_insert_with(|| events.to_vec())[index].credit_account_id = credit_account_id;
            }
            local.push((debit, credit) == (entry.cell, entry.cell) || leg_credit.is_some());
        }
        let events = adjusted.as_deref().unwrap_or(events);
        let mut start = 0;
        while start < events.len() {
            // A segment: one event, or a linked chain (to its first unlinked event, or the end).
            let mut end = start;
            while end + 1 < events.len() && events[end].flags.contains(TransferFlags::LINKED) {
                end += 1;
            }
            let end = end + 1;
            // Consecutive local segments go to the entry.ledger together.
            let mut local_end = end;
            if local[start..end].iter().all(|&here| here) {
                while local_end < events.len() {
                    let mut next = local_end;
                    while next + 1 < events.len() && events[next].flags.contains(TransferFlags::LINKED) {
                        next += 1;
                    }
                    if !local[local_end..=next].iter().all(|&here| here) {
                        break;
                    }
                    local_end = next + 1;
                }
                let results = self.create_local(entry, &events[start..local_end]);
                coordinated.results.extend(results);
                start = local_end;
                continue;
            }
            let segment = &events[start..end];
            let open_chain = segment.last().is_some_and(|event| event.flags.contains(TransferFlags::LINKED));
            let results = if open_chain {
                let mut results = vec![R::LinkedEventFailed; segment.len()];
                *results.last_mut().expect("a segment is not empty") = R::LinkedEventChainOpen;
                Some(results)
            } else {
                self.coordinate(entry, segment, &cells[start..end])
            };
            match results {
                Some(results) => coordinated.results.extend(results),
                None => {
                    coordinated.waiting.push((segment[0].id, start));
                    coordinated.results.extend(std::iter::repeat_n(R::Ok, segment.len()));
                }
            }
            start = end;
        }
        coordinated
    }

    /// Whether `event` posts or voids a cross-cell pending transfer this cell holds.
    fn holds_leg(&self, event: &Transfer) -> bool {
        resolves_pending(event) && self.holds.contains_key(&event.pending_id)
    }

    /// Whether any of `events` posts or voids a held pending transfer (see
    /// `create_transfers`; the node asks before applying a cell-local request).
    pub fn holds_any(&self, events: &[Transfer]) -> bool {
        !self.holds.is_empty() && events.iter().any(|event| self.holds_leg(event))
    }

    /// If `event` posts or voids a cross-cell pending transfer whose leg is
    /// here (its debit account's cell), the credit account to check the leg
    /// against: the leg's is the clearing account, where the client names
    /// its account in the other cell (`credit_cell`). For a transfer still
    /// held, that must be its credit account (else the ledger refuses the
    /// difference); once released, this cell no longer knows it, and any
    /// account of that cell is taken (a retry answers `exists`).
    fn leg_credit(&self, entry: &Apply<'_, impl History>, event: &Transfer, credit_cell: CellId) -> Option<u128> {
        if let Some(hold) = self.holds.get(&event.pending_id) {
            return Some(if event.credit_account_id == hold.credit_account { 0 } else { event.credit_account_id });
        }
        let leg = entry.ledger.transfer(event.pending_id, entry.history)?;
        let peer = clearing_peer(leg.credit_account_id, entry.cell)?;
        let here = leg.flags.contains(TransferFlags::CROSS_CELL_LEG);
        here.then_some(if credit_cell == peer { 0 } else { event.credit_account_id })
    }

    /// Applies cell-local events. A post or void of a held pending transfer
    /// applies to its leg here, and is released to the other cell.
    fn create_local(&mut self, entry: &mut Apply<'_, impl History>, events: &[Transfer]) -> Vec<R> {
        if !self.holds_any(events) {
            return entry.ledger.create_transfers(entry.timestamp, events, entry.history);
        }
        let holds = &self.holds;
        let results = entry
            .ledger
            .create_transfers_holding(entry.timestamp, events, entry.history, &|id| holds.contains_key(&id));
        for (event, result) in events.iter().zip(&results) {
            if *result != R::Ok || !resolves_pending(event) {
                continue;
            }
            let Some(hold) = self.holds.remove(&event.pending_id) else { continue };
            self.bytes -= HOLD_ACCOUNTED;
            self.hold_expiries.remove(&(hold.expires_at, event.pending_id));
            entry.effects.steps.push(Step::Released);
            if let Some(peer) = hold.peer {
                let applied = entry.ledger.transfer(event.id, entry.history).expect("a transfer just created is found");
                let mut flags = TransferFlags::default();
                flags.insert(if resolves_pending_post(&applied) {
                    TransferFlags::POST_PENDING_TRANSFER
                } else {
                    TransferFlags::VOID_PENDING_TRANSFER
                });
                let transfer = Transfer {
                    id: applied.id,
                    pending_id: event.pending_id,
                    amount: applied.amount,
                    user_data_128: applied.user_data_128,
                    user_data_64: applied.user_data_64,
                    user_data_32: applied.user_data_32,
                    ledger: applied.ledger,
                    code: applied.code,
                    flags,
                    ..Transfer::default()
                };
                self.release(peer, event.pending_id, false, transfer, entry.timestamp, entry.effects);
            }
        }
        results
    }

    /// Records and sends the release of held leg `leg` to `peer`.
    fn release(&mut self, peer: CellId, leg: u128, expire: bool, transfer: Transfer, at: u64, effects: &mut Effects) {
        let replaced = self.releases.insert(leg, Release { peer, expire, transfer, at });
        assert!(replaced.is_none(), "held cross-cell leg {leg} released twice");
        self.bytes += RELEASE_BYTES;
        effects.outbox.push((peer, Item::Release { leg, expire, transfer }));
    }

    /// Expires the held pending transfers due by log time `timestamp` and
    /// releases their other legs. The ledger may have expired the leg here
    /// already (it carries the timeout); if not, it is expired now. Called
    /// after every entry that can advance the ledger's time.
    pub fn expire_due(&mut self, entry: &mut Apply<'_, impl History>) {
        while let Some(&(expires_at, leg)) = self.hold_expiries.first() {
            if expires_at > entry.timestamp {
                break;
            }
            self.hold_expiries.pop_first();
            let hold = self.holds.remove(&leg).expect("an expiring hold is held");
            self.bytes -= HOLD_ACCOUNTED;
            let status = entry.ledger.expire_pending(entry.timestamp, leg, entry.history);
            assert_eq!(status, Some(PendingStatus::Expired), "held cross-cell pending transfer {leg} did not expire");
            entry.effects.steps.push(Step::Released);
            if let Some(peer) = hold.peer {
                self.release(peer, leg, true, Transfer::default(), entry.timestamp, entry.effects);
            }
        }
    }

    /// Starts one cross-cell operation here; `None` if it waits for its
    /// decision (new, or a retry of one in flight), else its results.
    fn coordinate(
        &mut self,
        entry: &mut Apply<'_, impl History>,
        events: &[Transfer],
        cells: &[(CellId, CellId)],
    ) -> Option<Vec<R>> {
        let refused = |event: usize, code: R| {
            Some(decision_results(events.len(), Decision::Cancel { event: event as u32, code }))
        };
        for (index, event) in events.iter().enumerate() {
            if let Some(code) = refuse_event(event) {
                return refused(index, code);
            }
        }
        // The coordinator is the entry.cell of the first event's debit account: it holds that leg.
        if cells[0].0 != entry.cell {
            return refused(0, R::CrossCellMisrouted);
        }
        // A client's pending transfer is held by the coordinator, where its
        // post or void is routed (its debit account's entry.cell): it must be that entry.cell's.
        if let Some(index) =
            events.iter().zip(cells).position(|(event, &(debit, _))| held(event) && debit != entry.cell)
        {
            return refused(index, R::CrossCellFlagsUnsupported);
        }
        let op = events[0].id;
        if let Some(open) = self.ops.get(&op) {
            if open.events == events && open.decision.is_none() {
                return None;
            }
            // A retry of an operation decided but not forgotten yet answers as after it is.
            match open.decision.filter(|_| open.events == events) {
                Some(Decision::Confirm) => return Some(vec![R::Exists; events.len()]),
                Some(cancel) => return Some(decision_results(events.len(), cancel)),
                None => {}
            }
            let (index, code) = differs(&open.events, events);
            return refused(index, code);
        }
        let legs = legs_for(entry.cell, events, cells);
        if let Some(existing) = entry.ledger.transfer(op, entry.history) {
            return Some(self.retried(entry, events, &legs, &existing));
        }
        let participants: BTreeMap<CellId, PartStatus> = cells
            .iter()
            .flat_map(|&(debit, credit)| [debit, credit])
            .filter(|&other| other != entry.cell)
            .map(|other| (other, PartStatus::Trying))
            .collect();
        let size = op_bytes(events, participants.len());
        if self.ops.len() >= OPS_MAX || !self.fits(size) {
            return refused(0, R::CrossCellTransfersMaxReached);
        }
        ensure_clearing_accounts(entry, &legs);
        let transfers: Vec<Transfer> = legs.iter().map(|(_, leg)| *leg).collect();
        let results = entry.ledger.create_legs(entry.timestamp, &transfers, entry.history);
        if let Some((index, code)) = refusal(&legs, &results) {
            return refused(index, code);
        }
        let deadline = entry.timestamp.saturating_add(TRY_WINDOW_NS);
        for &participant in participants.keys() {
            let item = Item::Try { op, deadline, events: events.to_vec(), cells: cells.to_vec() };
            entry.effects.outbox.push((participant, item));
        }
        let record = Op { events: events.to_vec(), cells: cells.to_vec(), deadline, participants, decision: None };
        self.ops.insert(op, record);
        self.bytes += size;
        entry.effects.steps.push(Step::Tried);
        if self.bug_confirm_without_try {
            entry.effects.outbox.retain(|(_, item)| !matches!(item, Item::Try { op: tried, .. } if *tried == op));
            self.decide(entry, op, Decision::Confirm);
            return Some(vec![R::Ok; events.len()]);
        }
        None
    }

    /// The answer to a retry of an operation decided and forgotten: from
    /// its first leg and that leg's resolution.
    fn retried(
        &self,
        entry: &Apply<'_, impl History>,
        events: &[Transfer],
        legs: &[(usize, Transfer)],
        existing: &Transfer,
    ) -> Vec<R> {
        let refused =
            |event: usize, code: R| decision_results(events.len(), Decision::Cancel { event: event as u32, code });
        let (_, expected) = legs.first().expect("the coordinator holds the first event's debit leg");
        let compared = Ledger::compare_retry(expected, existing);
        if compared != R::Exists {
            return refused(0, compared);
        }
        match entry.ledger.transfer(resolution_id(existing.id), entry.history) {
            Some(resolution) if resolution.flags.contains(TransferFlags::POST_PENDING_TRANSFER) => {
                vec![R::Exists; events.len()]
            }
            Some(resolution) => {
                let code = cellpay_ledger::CreateTransferResult::from_u32(resolution.user_data_32)
                    .unwrap_or(R::CrossCellTimedOut);
                let event = u32::try_from(resolution.user_data_64).unwrap_or(0);
                decision_results(events.len(), Decision::Cancel { event, code })
            }
            // A client's pending transfer, confirmed: its legs stay for the client to post or void.
            None if held(&events[0]) => vec![R::Exists; events.len()],
            None => panic!("cross-cell leg {} is open but its operation is not recorded", existing.id),
        }
    }

    /// Applies a batch of cross-cell items `from` another cell (or, for
    /// `Timeout`, from this cell's leader), at log time `timestamp`.
    /// `owns` says whether this cell owns an account's shard.
    pub fn apply_items(
        &mut self,
        entry: &mut Apply<'_, impl History>,
        owns: &dyn Fn(u128) -> bool,
        from: CellId,
        items: &[Item],
    ) {
        while let Some(&(deadline, coordinator, op)) = self.tombstones.first() {
            if deadline >= entry.timestamp {
                break;
            }
            self.tombstones.pop_first();
            if let Some(record) = self.parts.remove(&(coordinator, op)) {
                self.bytes -= part_bytes(&record.part);
            }
        }
        for item in items {
            match item {
                Item::Try { op, deadline, events, cells } => {
                    let tried = Tried { op: *op, deadline: *deadline, events, cells };
                    let prepared_before = self.parts.contains_key(&(from, *op));
                    if let Some(answer) = self.participant_try(entry, owns, from, &tried) {
                        match answer {
                            Item::Prepared { .. } if !prepared_before => entry.effects.steps.push(Step::Prepared),
                            Item::Refused { .. } => entry.effects.steps.push(Step::Refused),
                            _ => {}
                        }
                        entry.effects.outbox.push((from, answer));
                    }
                }
                &Item::Decide { op, confirm, deadline } => {
                    let key = (from, op);
                    let tombstone = PartRecord { part: Part::Tombstone, deadline };
                    let tombstoned = matches!(self.parts.get(&key), Some(PartRecord { part: Part::Tombstone, .. }));
                    let removed = if tombstoned { None } else { self.parts.remove(&key) };
                    if let Some(record) = &removed {
                        self.bytes -= part_bytes(&record.part);
                    }
                    match removed {
                        _ if tombstoned => {}
                        Some(PartRecord { part: Part::Prepared { legs, held }, .. }) => {
                            // The failing event and code are the coordinator's to record.
                            let decision =
                                if confirm { Decision::Confirm } else { Decision::Cancel { event: 0, code: R::Ok } };
                            // A confirm leaves held legs pending, for their coordinator to release.
                            let legs: Vec<u128> = if confirm {
                                legs.into_iter().filter(|leg| !held.contains(leg)).collect()
                            } else {
                                legs
                            };
                            resolve(entry, &legs, decision);
                            entry.effects.steps.push(Step::Resolved);
                        }
                        Some(PartRecord { part: Part::Tombstone, .. }) => unreachable!("tombstones stay"),
                        None if !confirm && entry.timestamp <= deadline => {
                            let size = part_bytes(&tombstone.part);
                            if self.parts.len() >= PARTS_MAX || !self.fits(size) {
                                // No room to refuse the late try: no `Done`
                                // either, so the coordinator asks again later.
                                continue;
                            }
                            self.parts.insert(key, tombstone);
                            self.bytes += size;
                            self.tombstones.insert((deadline, from, op));
                            entry.effects.steps.push(Step::Tombstoned);
                        }
                        // A repeated decision, or a cancel whose try can no longer be accepted.
                        None => {}
                    }
                    entry.effects.outbox.push((from, Item::Done { op }));
                }
                &Item::Prepared { op } => {
                    let Some(record) = self.ops.get_mut(&op) else { continue };
                    if record.decision.is_some() {
                        continue;
                    }
                    if let Some(status @ PartStatus::Trying) = record.participants.get_mut(&from) {
                        *status = PartStatus::Prepared;
                    }
                    if record.participants.values().all(|&status| status == PartStatus::Prepared) {
                        self.decide(entry, op, Decision::Confirm);
                    }
                }
                &Item::Refused { op, event, code } => {
                    let undecided = self.ops.get(&op).is_some_and(|record| record.decision.is_none());
                    if undecided {
                        let code = R::from_u32(code).unwrap_or(R::CrossCellMisrouted);
                        self.decide(entry, op, Decision::Cancel { event, code });
                    }
                }
                &Item::Done { op } => {
                    let Some(record) = self.ops.get_mut(&op) else { continue };
                    if record.decision.is_none() {
                        continue;
                    }
                    if let Some(status) = record.participants.get_mut(&from) {
                        *status = PartStatus::Done;
                    }
                    if record.participants.values().all(|&status| status == PartStatus::Done) {
                        let size = op_bytes(&record.events, record.participants.len());
                        self.ops.remove(&op);
                        self.bytes -= size;
                        entry.effects.steps.push(Step::Forgotten);
                    }
                }
                &Item::Ask { op } => {
                    if let Some(answer) = self.answer_ask(op) {
                        entry.effects.outbox.push((from, answer));
                    }
                }
                &Item::Timeout { op } => {
                    let due = self.ops.get(&op).is_some_and(|r| r.decision.is_none() && entry.timestamp > r.deadline);
                    if due {
                        let cancel = Decision::Cancel { event: 0, code: R::CrossCellTimedOut };
                        self.decide(entry, op, cancel);
                    }
                }
                &Item::Release { leg, expire, transfer } => {
                    apply_release(entry, leg, expire, &transfer);
                    entry.effects.steps.push(Step::ReleaseApplied);
                    entry.effects.outbox.push((from, Item::Released { leg }));
                }
                &Item::Released { leg } => {
                    if self.releases.get(&leg).is_some_and(|release| release.peer == from) {
                        self.releases.remove(&leg);
                        self.bytes -= RELEASE_BYTES;
                    }
                }
            }
        }
    }

    /// A participant applies its legs of an operation (or finds it tried
    /// already, or refuses it); returns the answer for the coordinator.
    fn participant_try(
        &mut self,
        entry: &mut Apply<'_, impl History>,
        owns: &dyn Fn(u128) -> bool,
        coordinator: CellId,
        tried: &Tried,
    ) -> Option<Item> {
        let op = tried.op;
        let refused = |event: usize, code: R| Some(Item::Refused { op, event: event as u32, code: code as u32 });
        match self.parts.get(&(coordinator, op)) {
            Some(PartRecord { part: Part::Prepared { .. }, .. }) => return Some(Item::Prepared { op }),
            Some(PartRecord { part: Part::Tombstone, .. }) => return None,
            None => {}
        }
        if entry.timestamp > tried.deadline {
            return refused(0, R::CrossCellTimedOut);
        }
        if tried.events.is_empty() || tried.events.len() != tried.cells.len() {
            return refused(0, R::CrossCellMisrouted);
        }
        for (index, event) in tried.events.iter().enumerate() {
            if let Some(code) = refuse_event(event) {
                return refused(index, code);
            }
        }
        let legs = legs_for(entry.cell, tried.events, tried.cells);
        for (index, leg) in &legs {
            let foreign = [leg.debit_account_id, leg.credit_account_id]
                .into_iter()
                .any(|account| !is_clearing_account(account) && !owns(account));
            if foreign {
                return refused(*index, R::CrossCellMisrouted);
            }
        }
        if legs.is_empty() {
            return refused(0, R::CrossCellMisrouted);
        }
        let ids: Vec<u128> = legs.iter().map(|(_, leg)| leg.id).collect();
        let held = legs.iter().filter(|&&(index, _)| held(&tried.events[index])).map(|(_, leg)| leg.id).collect();
        let part = Part::Prepared { legs: ids, held };
        let size = part_bytes(&part);
        if self.parts.len() >= PARTS_MAX || !self.fits(size) {
            return refused(legs[0].0, R::CrossCellTransfersMaxReached);
        }
        ensure_clearing_accounts(entry, &legs);
        let transfers: Vec<Transfer> = legs.iter().map(|(_, leg)| *leg).collect();
        let results = entry.ledger.create_legs(entry.timestamp, &transfers, entry.history);
        match refusal(&legs, &results) {
            None => {
                self.parts.insert((coordinator, op), PartRecord { part, deadline: tried.deadline });
                self.bytes += size;
                Some(Item::Prepared { op })
            }
            // A try repeated after its decision was applied here: the coordinator needs no answer.
            Some((_, R::Exists)) => None,
            Some((index, code)) => refused(index, code),
        }
    }

    /// Decides an operation: its own legs are posted or voided now, the
    /// participants are told, the waiting client answered.
    fn decide(&mut self, entry: &mut Apply<'_, impl History>, op: u128, decision: Decision) {
        let record = self.ops.get_mut(&op).expect("decided operations are recorded");
        assert!(record.decision.is_none(), "cross-cell operation {op} decided twice");
        record.decision = Some(decision);
        let mine = legs_for(entry.cell, &record.events, &record.cells);
        let confirm = decision == Decision::Confirm;
        // A confirm leaves the legs of client pending transfers pending: held here until posted, voided or expired.
        let legs: Vec<u128> =
            mine.iter().filter(|(index, _)| !confirm || !held(&record.events[*index])).map(|(_, leg)| leg.id).collect();
        resolve(entry, &legs, decision);
        if confirm {
            for (index, leg) in mine.iter().filter(|(index, _)| held(&record.events[*index])) {
                let (debit, credit) = record.cells[*index];
                debug_assert_eq!(debit, entry.cell);
                let expires_at =
                    entry.ledger.transfer(leg.id, entry.history).and_then(|leg| leg.expires_at()).unwrap_or(0);
                let event = &record.events[*index];
                let hold = Hold {
                    peer: (credit != entry.cell).then_some(credit),
                    credit_account: event.credit_account_id,
                    expires_at,
                };
                self.holds.insert(leg.id, hold);
                self.bytes += HOLD_ACCOUNTED;
                if expires_at != 0 {
                    self.hold_expiries.insert((expires_at, leg.id));
                }
            }
        }
        entry.effects.steps.push(Step::Decided);
        entry.effects.decided.push((op, decision_results(record.events.len(), decision)));
        for &participant in record.participants.keys() {
            entry.effects.outbox.push((participant, Item::Decide { op, confirm, deadline: record.deadline }));
        }
    }

    /// A leader's answer to a participant's `Ask`: the decision, if made.
    pub fn answer_ask(&self, op: u128) -> Option<Item> {
        let record = self.ops.get(&op)?;
        let decision = record.decision?;
        Some(Item::Decide { op, confirm: decision == Decision::Confirm, deadline: record.deadline })
    }

    /// Whether a leader must log `item` from `from`, or can answer (or drop)
    /// it from the state it has applied.
    pub fn triage(&self, from: CellId, item: &Item) -> Triage {
        match item {
            Item::Try { op, .. } => match self.parts.get(&(from, *op)) {
                Some(PartRecord { part: Part::Prepared { .. }, .. }) => Triage::Answer(Item::Prepared { op: *op }),
                Some(PartRecord { part: Part::Tombstone, .. }) => Triage::Drop,
                None => Triage::Log,
            },
            // Logged even when nothing is prepared: a new leader may not have
            // applied the try yet, which its log orders before the decision.
            &Item::Decide { op, .. } => match self.parts.get(&(from, op)) {
                Some(PartRecord { part: Part::Tombstone, .. }) => Triage::Answer(Item::Done { op }),
                _ => Triage::Log,
            },
            &Item::Prepared { op } | &Item::Refused { op, .. } => match self.ops.get(&op) {
                Some(record) if record.decision.is_none() => Triage::Log,
                _ => Triage::Drop,
            },
            &Item::Done { op } => match self.ops.get(&op) {
                Some(record) if record.decision.is_some() => Triage::Log,
                _ => Triage::Drop,
            },
            &Item::Ask { op } => self.answer_ask(op).map_or(Triage::Drop, Triage::Answer),
            Item::Timeout { .. } | Item::Release { .. } => Triage::Log,
            &Item::Released { leg } => match self.releases.get(&leg) {
                Some(release) if release.peer == from => Triage::Log,
                _ => Triage::Drop,
            },
        }
    }

    /// Everything a leader must (re)send from this state, operations started
    /// at least `settle_ns` of log time before `now` only: tries and
    /// decisions not yet answered, a `Timeout` to itself past a deadline, and
    /// an `Ask` for each operation it has prepared as a participant.
    pub fn resend(&self, cell: CellId, now: u64, settle_ns: u64) -> Vec<(CellId, Item)> {
        let mut items = Vec::new();
        for (&op, record) in &self.ops {
            let started = record.deadline.saturating_sub(TRY_WINDOW_NS);
            if now < started.saturating_add(settle_ns) {
                continue;
            }
            match record.decision {
                None => {
                    for (&participant, &status) in &record.participants {
                        if status == PartStatus::Trying {
                            let item = Item::Try {
                                op,
                                deadline: record.deadline,
                                events: record.events.clone(),
                                cells: record.cells.clone(),
                            };
                            items.push((participant, item));
                        }
                    }
                    if now > record.deadline {
                        items.push((cell, Item::Timeout { op }));
                    }
                }
                Some(decision) => {
                    for (&participant, &status) in &record.participants {
                        if status != PartStatus::Done {
                            let confirm = decision == Decision::Confirm;
                            items.push((participant, Item::Decide { op, confirm, deadline: record.deadline }));
                        }
                    }
                }
            }
        }
        for (&(coordinator, op), record) in &self.parts {
            if matches!(record.part, Part::Prepared { .. }) {
                items.push((coordinator, Item::Ask { op }));
            }
        }
        for (&leg, release) in &self.releases {
            if now >= release.at.saturating_add(settle_ns) {
                items.push((release.peer, Item::Release { leg, expire: release.expire, transfer: release.transfer }));
            }
        }
        items
    }

    /// Whether `size` more accounted bytes fit `STATE_BYTES_MAX`.
    fn fits(&self, size: usize) -> bool {
        STATE_FIXED_BYTES + self.bytes + size <= STATE_BYTES_MAX
    }

    /// What the state accounts for, computed from scratch (see `bytes`).
    fn accounted(&self) -> usize {
        let ops: usize = self.ops.values().map(|op| op_bytes(&op.events, op.participants.len())).sum();
        let parts: usize = self.parts.values().map(|record| part_bytes(&record.part)).sum();
        ops + parts + self.holds.len() * HOLD_ACCOUNTED + self.releases.len() * RELEASE_BYTES
    }

    /// Encodes the state (at most `STATE_BYTES_MAX` bytes: checked).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        assert_eq!(self.bytes, self.accounted(), "the cross-cell state's accounting drifted");
        put_u32(out, self.ops.len() as u32);
        for (&op, record) in &self.ops {
            put_u128(out, op);
            put_u64(out, record.deadline);
            put_events(out, &record.events, &record.cells);
            put_u32(out, record.participants.len() as u32);
            for (&participant, &status) in &record.participants {
                put_u64(out, participant);
                out.push(match status {
                    PartStatus::Trying => 0,
                    PartStatus::Prepared => 1,
                    PartStatus::Done => 2,
                });
            }
            match record.decision {
                None => out.push(0),
                Some(Decision::Confirm) => out.push(1),
                Some(Decision::Cancel { event, code }) => {
                    out.push(2);
                    put_u32(out, event);
                    put_u32(out, code as u32);
                }
            }
        }
        put_u32(out, self.parts.len() as u32);
        for (&(coordinator, op), record) in &self.parts {
            put_u64(out, coordinator);
            put_u128(out, op);
            put_u64(out, record.deadline);
            match &record.part {
                Part::Tombstone => out.push(0),
                Part::Prepared { legs, held } => {
                    out.push(1);
                    for ids in [legs, held] {
                        put_u32(out, ids.len() as u32);
                        for &id in ids {
                            put_u128(out, id);
                        }
                    }
                }
            }
        }
        put_u32(out, self.holds.len() as u32);
        for (&leg, hold) in &self.holds {
            put_u128(out, leg);
            put_u64(out, hold.peer.unwrap_or(0));
            put_u128(out, hold.credit_account);
            put_u64(out, hold.expires_at);
        }
        put_u32(out, self.releases.len() as u32);
        let mut bytes = [0u8; RECORD_SIZE];
        for (&leg, release) in &self.releases {
            put_u128(out, leg);
            put_u64(out, release.peer);
            out.push(u8::from(release.expire));
            release.transfer.encode(&mut bytes);
            out.extend_from_slice(&bytes);
            put_u64(out, release.at);
        }
        let encoded = out.len() - start;
        let accounted = STATE_FIXED_BYTES + self.bytes;
        assert!(
            encoded <= accounted,
            "the cross-cell state encodes to {encoded} bytes, over its accounted {accounted}"
        );
    }

    /// Decodes what `encode_into` wrote, returning the state and the bytes
    /// after it; `with_holds: false` reads the format before cross-cell
    /// pending transfers (no held legs, holds or releases).
    pub fn decode(bytes: &[u8], with_holds: bool) -> Option<(CrossCellState, &[u8])> {
        let mut reader = Reader { bytes };
        let mut state = CrossCellState::default();
        for _ in 0..reader.u32()? {
            let op = reader.u128()?;
            let deadline = reader.u64()?;
            let (events, cells) = reader.events()?;
            let mut participants = BTreeMap::new();
            for _ in 0..reader.u32()? {
                let participant = reader.u64()?;
                let status = match reader.u8()? {
                    0 => PartStatus::Trying,
                    1 => PartStatus::Prepared,
                    2 => PartStatus::Done,
                    _ => return None,
                };
                participants.insert(participant, status);
            }
            let decision = match reader.u8()? {
                0 => None,
                1 => Some(Decision::Confirm),
                2 => {
                    let event = reader.u32()?;
                    Some(Decision::Cancel { event, code: R::from_u32(reader.u32()?)? })
                }
                _ => return None,
            };
            state.ops.insert(op, Op { events, cells, deadline, participants, decision });
        }
        for _ in 0..reader.u32()? {
            let coordinator = reader.u64()?;
            let op = reader.u128()?;
            let deadline = reader.u64()?;
            let part = match reader.u8()? {
                0 => {
                    state.tombstones.insert((deadline, coordinator, op));
                    Part::Tombstone
                }
                1 => {
                    let legs = reader.ids()?;
                    let held = if with_holds { reader.ids()? } else { Vec::new() };
                    Part::Prepared { legs, held }
                }
                _ => return None,
            };
            state.parts.insert((coordinator, op), PartRecord { part, deadline });
        }
        if !with_holds {
            state.bytes = state.accounted();
            return Some((state, reader.bytes));
        }
        for _ in 0..reader.u32()? {
            let leg = reader.u128()?;
            let peer = Some(reader.u64()?).filter(|&peer| peer != 0);
            let hold = Hold { peer, credit_account: reader.u128()?, expires_at: reader.u64()? };
            if hold.expires_at != 0 {
                state.hold_expiries.insert((hold.expires_at, leg));
            }
            state.holds.insert(leg, hold);
        }
        for _ in 0..reader.u32()? {
            let leg = reader.u128()?;
            let peer = reader.u64()?;
            let expire = reader.u8()? != 0;
            let transfer = Transfer::decode(reader.take(RECORD_SIZE)?.try_into().ok()?);
            state.releases.insert(leg, Release { peer, expire, transfer, at: reader.u64()? });
        }
        state.bytes = state.accounted();
        Some((state, reader.bytes))
    }
}

/// A `Try` as a participant applies it.
struct Tried<'a> {
    op: u128,
    deadline: u64,
    events: &'a [Transfer],
    cells: &'a [(CellId, CellId)],
}

/// The first event where a retry differs from the operation recorded under its id.
fn differs(recorded: &[Transfer], retry: &[Transfer]) -> (usize, R) {
    for (index, (recorded, retry)) in recorded.iter().zip(retry).enumerate() {
        let compared = Ledger::compare_retry(retry, recorded);
        if compared != R::Exists {
            return (index, compared);
        }
    }
    // Same events but a different count: the chain differs in length.
    (recorded.len().min(retry.len()).saturating_sub(1), R::ExistsWithDifferentFlags)
}

/// Items in one message or log record, at most this many bytes encoded.
pub const ITEMS_BYTES_MAX: usize = 1 << 20;

/// Encodes items; `encode_items(..).len()` is what `ITEMS_BYTES_MAX` bounds.
pub fn encode_items(out: &mut Vec<u8>, items: &[Item]) {
    put_u32(out, items.len() as u32);
    for item in items {
        match item {
            Item::Try { op, deadline, events, cells } => {
                out.push(1);
                put_u128(out, *op);
                put_u64(out, *deadline);
                put_events(out, events, cells);
            }
            &Item::Decide { op, confirm, deadline } => {
                out.push(2);
                put_u128(out, op);
                out.push(u8::from(confirm));
                put_u64(out, deadline);
            }
            &Item::Prepared { op } => {
                out.push(3);
                put_u128(out, op);
            }
            &Item::Refused { op, event, code } => {
                out.push(4);
                put_u128(out, op);
                put_u32(out, event);
                put_u32(out, code);
            }
            &Item::Done { op } => {
                out.push(5);
                put_u128(out, op);
            }
            &Item::Ask { op } => {
                out.push(6);
                put_u128(out, op);
            }
            &Item::Timeout { op } => {
                out.push(7);
                put_u128(out, op);
            }
            &Item::Release { leg, expire, transfer } => {
                out.push(8);
                put_u128(out, leg);
                out.push(u8::from(expire));
                let mut bytes = [0u8; RECORD_SIZE];
                transfer.encode(&mut bytes);
                out.extend_from_slice(&bytes);
            }
            &Item::Released { leg } => {
                out.push(9);
                put_u128(out, leg);
            }
        }
    }
}

/// The encoded size of one item (for splitting batches under `ITEMS_BYTES_MAX`).
pub fn item_bytes(item: &Item) -> usize {
    match item {
        Item::Try { events, .. } => 1 + 16 + 8 + 4 + events.len() * (RECORD_SIZE + 16),
        Item::Release { .. } => 1 + 16 + 1 + RECORD_SIZE,
        _ => 1 + 16 + 9 + 8,
    }
}

/// Decodes what `encode_items` wrote (and nothing more); `None` if malformed.
pub fn decode_items(bytes: &[u8]) -> Option<Vec<Item>> {
    let mut reader = Reader { bytes };
    let count = reader.u32()? as usize;
    let mut items = Vec::with_capacity(count.min(bytes.len() / 17));
    for _ in 0..count {
        let kind = reader.u8()?;
        let op = reader.u128()?;
        items.push(match kind {
            1 => {
                let deadline = reader.u64()?;
                let (events, cells) = reader.events()?;
                Item::Try { op, deadline, events, cells }
            }
            2 => {
                let confirm = match reader.u8()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                Item::Decide { op, confirm, deadline: reader.u64()? }
            }
            3 => Item::Prepared { op },
            4 => Item::Refused { op, event: reader.u32()?, code: reader.u32()? },
            5 => Item::Done { op },
            6 => Item::Ask { op },
            7 => Item::Timeout { op },
            8 => {
                let expire = match reader.u8()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                let transfer = Transfer::decode(reader.take(RECORD_SIZE)?.try_into().ok()?);
                Item::Release { leg: op, expire, transfer }
            }
            9 => Item::Released { leg: op },
            _ => return None,
        });
    }
    reader.bytes.is_empty().then_some(items)
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u128(out: &mut Vec<u8>, value: u128) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_events(out: &mut Vec<u8>, events: &[Transfer], cells: &[(CellId, CellId)]) {
    put_u32(out, events.len() as u32);
    let mut bytes = [0u8; RECORD_SIZE];
    for (event, &(debit, credit)) in events.iter().zip(cells) {
        event.encode(&mut bytes);
        out.extend_from_slice(&bytes);
        put_u64(out, debit);
        put_u64(out, credit);
    }
}

/// An operation's events and each event's (debit cell, credit cell).
type OpEvents = (Vec<Transfer>, Vec<(CellId, CellId)>);

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < count {
            return None;
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_le_bytes(self.take(16)?.try_into().ok()?))
    }

    /// A count and that many ids.
    fn ids(&mut self) -> Option<Vec<u128>> {
        let count = self.u32()? as usize;
        if count > self.bytes.len() / 16 {
            return None;
        }
        (0..count).map(|_| self.u128()).collect()
    }

    fn events(&mut self) -> Option<OpEvents> {
        let count = self.u32()? as usize;
        if count == 0 || count > cellpay_ledger::BATCH_EVENTS_MAX {
            return None;
        }
        let mut events = Vec::with_capacity(count);
        let mut cells = Vec::with_capacity(count);
        for _ in 0..count {
            events.push(Transfer::decode(self.take(RECORD_SIZE)?.try_into().ok()?));
            cells.push((self.u64()?, self.u64()?));
        }
        Some((events, cells))
    }
}
