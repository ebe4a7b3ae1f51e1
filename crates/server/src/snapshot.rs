//! Snapshots: shipping a cell's whole state to a replica that lags past the
//! leader's compacted log (or that starts on an empty disk).
//!
//! A snapshot is the image of the leader's history store for the cell at its
//! last checkpoint, with the checkpoint's Raft metadata (index, term,
//! membership) stored beside it (`Store::apply_checkpoint_with`). When Raft
//! asks to send a snapshot to a follower:
//!
//! 1. the leader's **sender** thread exports the store (one consistent fjall
//!    snapshot, streamed in chunks of at most 1 MiB: memory stays bounded
//!    whatever the store's size) and sends the chunks over the transport,
//!    waiting when the peer's queue is full; then it sends the Raft message,
//!    its metadata set to the exported checkpoint's, and tells the engine
//!    (which reports the snapshot to Raft as finished or failed);
//! 2. the follower's **receiver** thread routes the chunks by cell to a
//!    worker per transfer (transfers of different cells, from different
//!    leaders, load side by side; a new transfer for a cell replaces the
//!    one under way), which loads them into a fresh store generation
//!    (`cell{C}.g{N}.`, N never used before: the registry keeps the next
//!    number), checking every chunk, record and checksum; at the Raft
//!    message, which must name the image loaded, it makes the image durable
//!    and hands it, with the message, to the engine;
//! 3. the engine steps the message; if Raft accepts the snapshot, the engine
//!    switches the cell to the new generation (recorded durably in the store
//!    database's registry), rebuilds the ledger from it, resets the cell's log
//!    to start after the snapshot, and drops the old generation.
//!
//! A lost or damaged chunk abandons the transfer; Raft sends the snapshot
//! again later. A crash mid-import leaves a generation the registry does not
//! name as current, which the next start drops. The leader does not report a
//! sent snapshot as finished: the follower's answer after installing it moves
//! Raft on; if none comes within [`SNAPSHOT_REPLY_WAIT`], the leader reports
//! a failure and Raft sends a new one.
//!
//! The simulator's stepped engine has no threads: its sender exports and
//! sends within the engine's step, and its [`InlineReceiver`] holds a
//! transfer's chunks until the Raft message, then loads them with the same
//! code as the worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellpay_cluster::topology::{CellId, NodeId};
use cellpay_cluster::transport::{SendError, Transport};
use cellpay_storage::store::{SnapshotImage, Store, StoreDatabase, StoreError};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use protobuf::Message as _;
use raft::prelude::Message;

use crate::raft_log::LogBase;
use crate::world::World;

/// Snapshots a node sends at once (all cells and peers together).
pub const SNAPSHOT_SENDS_MAX: usize = 2;
/// How long the sender waits for room in a peer's queue before giving up.
pub const SNAPSHOT_SEND_STALL_MAX: Duration = Duration::from_secs(30);
/// How long the receiver waits for the next chunk before abandoning a transfer.
pub const SNAPSHOT_CHUNK_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long a leader waits for a follower to install a snapshot it sent.
pub const SNAPSHOT_REPLY_WAIT: Duration = Duration::from_secs(10);
/// Chunks and messages queued for the receiver thread, and for each transfer's worker.
pub const SNAPSHOT_RECEIVE_QUEUE_MAX: usize = 64;
/// Snapshots a node receives at once (one per cell at most).
pub const SNAPSHOT_RECEIVES_MAX: usize = 4;

const KIND_RAFT: u8 = 1;
const KIND_CHUNK: u8 = 2;
const KIND_SNAPSHOT_MESSAGE: u8 = 3;
const KIND_CROSS_CELL: u8 = 4;

/// A message between peers.
pub enum PeerMessage {
    /// A Raft message of a cell.
    Raft { cell: CellId, message: Message },
    /// A chunk of a store image (`first`: it starts a new image).
    Chunk { cell: CellId, first: bool, bytes: Vec<u8> },
    /// The Raft snapshot message that ends an image's chunks.
    SnapshotMessage { cell: CellId, message: Message },
    /// Cross-cell messages from cell `from` to the leader of cell `cell` (see `cross_cell`).
    CrossCell { cell: CellId, from: CellId, items: Vec<crate::cross_cell::Item> },
}

/// Frame: kind (u8), cell (u64 LE), then the Raft message (protobuf) or, for
/// a chunk, a `first` flag (u8) and the chunk.
fn encode(kind: u8, cell: CellId, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(kind);
    out.extend_from_slice(&cell.to_le_bytes());
    body(&mut out);
    out
}

pub fn encode_raft(cell: CellId, message: &Message) -> Vec<u8> {
    encode(KIND_RAFT, cell, |out| message.write_to_vec(out).expect("a raft message encodes"))
}

/// Frame of cross-cell messages: after the cell, the sending cell (u64 LE) and the items.
pub fn encode_cross_cell(cell: CellId, from: CellId, items: &[crate::cross_cell::Item]) -> Vec<u8> {
    encode(KIND_CROSS_CELL, cell, |out| {
        out.extend_from_slice(&from.to_le_bytes());
        crate::cross_cell::encode_items(out, items);
    })
}

fn encode_snapshot_message(cell: CellId, message: &Message) -> Vec<u8> {
    encode(KIND_SNAPSHOT_MESSAGE, cell, |out| message.write_to_vec(out).expect("a raft message encodes"))
}

fn encode_chunk(cell: CellId, first: bool, chunk: &[u8]) -> Vec<u8> {
    encode(KIND_CHUNK, cell, |out| {
        out.push(u8::from(first));
        out.extend_from_slice(chunk);
    })
}

/// Decodes a peer's message; `None` if it is malformed.
pub fn decode(payload: &[u8]) -> Option<PeerMessage> {
    let (&kind, rest) = payload.split_first()?;
    let cell = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let body = &rest[8..];
    match kind {
        KIND_RAFT => Some(PeerMessage::Raft { cell, message: Message::parse_from_bytes(body).ok()? }),
        KIND_SNAPSHOT_MESSAGE => {
            Some(PeerMessage::SnapshotMessage { cell, message: Message::parse_from_bytes(body).ok()? })
        }
        KIND_CHUNK => {
            let (&first, bytes) = body.split_first()?;
            Some(PeerMessage::Chunk { cell, first: first != 0, bytes: bytes.to_vec() })
        }
        KIND_CROSS_CELL => {
            let from = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
            Some(PeerMessage::CrossCell { cell, from, items: crate::cross_cell::decode_items(&body[8..])? })
        }
        _ => None,
    }
}

/// The log base in a checkpoint's consensus metadata (see `cell_state`).
fn decode_base(consensus: &[u8]) -> Option<LogBase> {
    crate::cell_state::decode_consensus_base(consensus)
}

/// The name of a cell's store generation.
pub fn store_name(cell: CellId, generation: u64) -> String {
    format!("cell{cell}.g{generation}.")
}

/// The registry key of a cell's current store generation.
pub fn generation_key(cell: CellId) -> String {
    format!("cell{cell}.generation")
}

/// The registry key of the next generation number the receiver may use.
/// Generation numbers are never reused: a snapshot being received can never
/// be written into the generation in use, whatever the engine does meanwhile.
pub fn generation_next_key(cell: CellId) -> String {
    format!("cell{cell}.generation_next")
}

/// The first generation number no store of `cell` has used.
pub fn generation_next(database: &StoreDatabase, cell: CellId) -> Result<u64, StoreError> {
    let current = database.registry_get(&generation_key(cell))?.unwrap_or(0);
    Ok(database.registry_get(&generation_next_key(cell))?.unwrap_or(0).max(current + 1))
}

// ------------------------------------------------------------------------------------------------
// Sending.

struct SendJob {
    cell: CellId,
    to: NodeId,
    message: Message,
    store: Arc<Store>,
}

/// A finished send: Raft is told whether the follower got everything.
pub struct SendDone {
    pub cell: CellId,
    pub to: NodeId,
    pub ok: bool,
}

/// The leader side: exports and sends snapshots, one at a time per thread.
pub struct SnapshotSender {
    mode: SendMode,
    in_flight: Vec<(CellId, NodeId)>,
}

enum SendMode {
    /// A node's own thread: exports and sends while the engine goes on.
    Thread { jobs: Option<Sender<SendJob>>, done: Receiver<SendDone>, thread: Option<std::thread::JoinHandle<()>> },
    /// Within `offer`, through the engine's `World` (the simulator: one
    /// thread, and a network that never makes a sender wait).
    Inline { done: Vec<SendDone> },
}

impl SnapshotSender {
    pub fn start(transport: Arc<Transport>) -> SnapshotSender {
        let (jobs, receiver) = bounded::<SendJob>(SNAPSHOT_SENDS_MAX);
        let (done_sender, done) = bounded(SNAPSHOT_SENDS_MAX);
        let thread = std::thread::Builder::new()
            .name("cellpay-snapshot-send".to_string())
            .spawn(move || {
                for job in receiver {
                    let (cell, to) = (job.cell, job.to);
                    let result = send(job, |payload| send_waiting(&transport, to, payload));
                    if done_sender.send(sent(cell, to, result)).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the snapshot sender");
        let mode = SendMode::Thread { jobs: Some(jobs), done, thread: Some(thread) };
        SnapshotSender { mode, in_flight: Vec::new() }
    }

    /// A sender that does its work inside [`SnapshotSender::offer`].
    pub fn inline() -> SnapshotSender {
        SnapshotSender { mode: SendMode::Inline { done: Vec::new() }, in_flight: Vec::new() }
    }

    /// Queues a snapshot for `to` (an inline sender sends it now, through
    /// `world`); `false` (Raft should be told it failed) if one is already
    /// going there or too many are in flight.
    pub fn offer(&mut self, world: &dyn World, cell: CellId, to: NodeId, message: Message, store: Arc<Store>) -> bool {
        if self.in_flight.len() >= SNAPSHOT_SENDS_MAX || self.in_flight.contains(&(cell, to)) {
            return false;
        }
        let job = SendJob { cell, to, message, store };
        match &mut self.mode {
            SendMode::Thread { jobs, .. } => {
                if jobs.as_ref().expect("sender running").try_send(job).is_err() {
                    return false;
                }
            }
            SendMode::Inline { done } => {
                let result =
                    send(job, |payload| if world.send(to, payload) { Ok(()) } else { Err(SendFailure::Refused) });
                done.push(sent(cell, to, result));
            }
        }
        self.in_flight.push((cell, to));
        true
    }

    /// Sends that finished since the last call.
    pub fn finished(&mut self) -> Vec<SendDone> {
        let finished = match &mut self.mode {
            SendMode::Inline { done } => std::mem::take(done),
            SendMode::Thread { done, .. } => {
                let mut finished = Vec::new();
                loop {
                    match done.try_recv() {
                        Ok(one) => finished.push(one),
                        Err(TryRecvError::Empty) => break finished,
                        Err(TryRecvError::Disconnected) => panic!("the snapshot sender stopped: see its panic"),
                    }
                }
            }
        };
        for done in &finished {
            self.in_flight.retain(|&pair| pair != (done.cell, done.to));
        }
        finished
    }
}

impl Drop for SnapshotSender {
    fn drop(&mut self) {
        if let SendMode::Thread { jobs, thread, .. } = &mut self.mode {
            jobs.take();
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Logs a send's outcome.
fn sent(cell: CellId, to: NodeId, result: Result<SnapshotImage, SendFailure>) -> SendDone {
    match result {
        Ok(image) => {
            tracing::info!(cell, to, index = image.checkpoint.op, bytes = image.bytes, "snapshot sent");
            SendDone { cell, to, ok: true }
        }
        Err(error) => {
            tracing::warn!(cell, to, %error, "snapshot not sent");
            SendDone { cell, to, ok: false }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SendFailure {
    #[error("export: {0}")]
    Store(StoreError),
    #[error("transport: {0}")]
    Transport(SendError),
    #[error("the peer's queue stayed full for {} s", SNAPSHOT_SEND_STALL_MAX.as_secs())]
    Stalled,
    #[error("the peer's link refused the message")]
    Refused,
    #[error("the store's checkpoint carries no consensus metadata")]
    NoMetadata,
    #[error("the last checkpoint (index {index}) predates the replica's membership; a newer one is coming")]
    NotMember { index: u64 },
}

/// Sends one message, waiting while the peer's queue is full.
fn send_waiting(transport: &Transport, to: NodeId, payload: Vec<u8>) -> Result<(), SendFailure> {
    let started = Instant::now();
    loop {
        match transport.send(to, payload.clone()) {
            Ok(()) => return Ok(()),
            Err(SendError::QueueFull { .. } | SendError::QueueFullMessages { .. }) => {
                if started.elapsed() > SNAPSHOT_SEND_STALL_MAX {
                    return Err(SendFailure::Stalled);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => return Err(SendFailure::Transport(error)),
        }
    }
}

/// Exports `job`'s store and hands every chunk, then the Raft message, to `deliver`.
fn send(
    job: SendJob,
    mut deliver: impl FnMut(Vec<u8>) -> Result<(), SendFailure>,
) -> Result<SnapshotImage, SendFailure> {
    let SendJob { cell, to, mut message, store } = job;
    let mut first = true;
    let image = store
        .export(|chunk| {
            let payload = encode_chunk(cell, first, &chunk);
            first = false;
            deliver(payload)
        })
        .map_err(|error| match error {
            cellpay_storage::store::ExportError::Store(error) => SendFailure::Store(error),
            cellpay_storage::store::ExportError::Sink(error) => error,
        })?;
    // The image is of the store's latest checkpoint, which may be newer than
    // the one Raft named when it asked: describe what is sent.
    let base = decode_base(&image.consensus).ok_or(SendFailure::NoMetadata)?;
    assert_eq!(base.index, image.checkpoint.op, "cell {cell}: consensus metadata of another checkpoint");
    // A replica added after the checkpoint would refuse it (it is not in its
    // membership); the engine checkpoints after every membership change, so
    // a retry soon finds a newer image.
    let conf = &base.conf_state;
    if !conf.voters.contains(&to) && !conf.learners.contains(&to) {
        return Err(SendFailure::NotMember { index: base.index });
    }
    let metadata = message.mut_snapshot().mut_metadata();
    metadata.index = base.index;
    metadata.term = base.term;
    metadata.set_conf_state(base.conf_state);
    deliver(encode_snapshot_message(cell, &message))?;
    Ok(image)
}

// ------------------------------------------------------------------------------------------------
// Receiving.

/// A snapshot loaded into a staging store generation, with the Raft message
/// that ends it.
pub struct Staged {
    pub cell: CellId,
    pub from: NodeId,
    pub generation: u64,
    pub store: Arc<Store>,
    pub image: SnapshotImage,
    pub message: Message,
}

/// The follower side: a thread that routes incoming chunks by cell, and a
/// worker thread per transfer under way that loads its image. Transfers of
/// different cells (usually from different leaders) proceed side by side; a
/// new transfer for a cell replaces the one under way.
pub struct SnapshotReceiver {
    incoming: Option<Sender<(NodeId, PeerMessage)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotReceiver {
    /// `staged` gets every complete snapshot.
    pub fn start(database: StoreDatabase, staged: Sender<Staged>) -> SnapshotReceiver {
        let (incoming, receiver) = bounded(SNAPSHOT_RECEIVE_QUEUE_MAX);
        let thread = std::thread::Builder::new()
            .name("cellpay-snapshot-receive".to_string())
            .spawn(move || receive_loop(&database, &receiver, &staged))
            .expect("spawn the snapshot receiver");
        SnapshotReceiver { incoming: Some(incoming), thread: Some(thread) }
    }

    /// A sender for the transport's delivery callback (never blocks: a full
    /// queue drops the message, and the transfer is abandoned and redone).
    pub fn sender(&self) -> Sender<(NodeId, PeerMessage)> {
        self.incoming.as_ref().expect("receiver running").clone()
    }
}

impl Drop for SnapshotReceiver {
    fn drop(&mut self) {
        self.incoming.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A transfer under way on a worker thread.
struct Transfer {
    from: NodeId,
    messages: Sender<Incoming>,
    worker: std::thread::JoinHandle<()>,
}

impl Transfer {
    /// Abandons the transfer (its worker drops what it loaded) and waits for the worker.
    fn close(self) {
        drop(self.messages);
        let _ = self.worker.join();
    }
}

fn receive_loop(database: &StoreDatabase, incoming: &Receiver<(NodeId, PeerMessage)>, staged: &Sender<Staged>) {
    let mut transfers: BTreeMap<CellId, Transfer> = BTreeMap::new();
    for (from, message) in incoming {
        let finished: Vec<CellId> =
            transfers.iter().filter(|(_, transfer)| transfer.worker.is_finished()).map(|(&cell, _)| cell).collect();
        for cell in finished {
            transfers.remove(&cell).expect("listed").close();
        }
        let (cell, next) = match message {
            PeerMessage::Chunk { cell, first: true, bytes } => {
                if let Some(replaced) = transfers.remove(&cell) {
                    replaced.close();
                }
                if transfers.len() >= SNAPSHOT_RECEIVES_MAX {
                    tracing::warn!(cell, from, "snapshot refused: {SNAPSHOT_RECEIVES_MAX} others are being received");
                    continue;
                }
                let (messages, queue) = bounded(SNAPSHOT_RECEIVE_QUEUE_MAX);
                let (database, staged) = (database.clone(), staged.clone());
                let worker = std::thread::Builder::new()
                    .name(format!("cellpay-snapshot-receive-{cell}"))
                    .spawn(move || {
                        let mut next = || {
                            queue.recv_timeout(SNAPSHOT_CHUNK_WAIT_MAX).unwrap_or_else(|error| match error {
                                RecvTimeoutError::Timeout => Incoming::Stalled,
                                RecvTimeoutError::Disconnected => Incoming::Closed,
                            })
                        };
                        if let Some(snapshot) = receive(&database, from, cell, bytes, &mut next) {
                            let _ = staged.send(snapshot);
                        }
                    })
                    .expect("spawn a snapshot receiver");
                transfers.insert(cell, Transfer { from, messages, worker });
                continue;
            }
            PeerMessage::Chunk { cell, first: false, bytes } => (cell, Incoming::Chunk(bytes)),
            PeerMessage::SnapshotMessage { cell, message } => (cell, Incoming::End(message)),
            PeerMessage::Raft { .. } | PeerMessage::CrossCell { .. } => continue,
        };
        // The rest of a transfer goes to its worker; anything else is a leftover.
        if let Some(transfer) = transfers.get(&cell).filter(|transfer| transfer.from == from) {
            let _ = transfer.messages.send(next);
        }
    }
    for transfer in std::mem::take(&mut transfers).into_values() {
        transfer.close();
    }
}

/// What a transfer's receiver gets after the first chunk.
enum Incoming {
    Chunk(Vec<u8>),
    /// The Raft snapshot message that ends the image.
    End(Message),
    /// Nothing for [`SNAPSHOT_CHUNK_WAIT_MAX`].
    Stalled,
    /// The transfer was replaced, or the node is stopping.
    Closed,
}

#[derive(Debug, thiserror::Error)]
enum ReceiveFailure {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("no chunk for {} s", SNAPSHOT_CHUNK_WAIT_MAX.as_secs())]
    Stalled,
    #[error("the image (index {image}) is not the one the snapshot message names (index {message})")]
    Mismatch { image: u64, message: u64 },
}

/// Receives one image of `cell` from `from`, taking what follows its first
/// chunk from `next`; `None` if it was abandoned (what it loaded is dropped).
fn receive(
    database: &StoreDatabase,
    from: NodeId,
    cell: CellId,
    first_chunk: Vec<u8>,
    next: &mut dyn FnMut() -> Incoming,
) -> Option<Staged> {
    match receive_one(database, from, cell, first_chunk, next) {
        Ok(staged) => staged,
        Err((error, generation)) => {
            tracing::warn!(cell, from, %error, "snapshot abandoned; the leader will send it again");
            if let Some(generation) = generation {
                if let Err(error) = database.drop_store(&store_name(cell, generation)) {
                    tracing::warn!(cell, generation, %error, "could not drop an abandoned snapshot");
                }
            }
            None
        }
    }
}

/// On failure, the error and the generation to drop (if one was started).
fn receive_one(
    database: &StoreDatabase,
    from: NodeId,
    cell: CellId,
    first_chunk: Vec<u8>,
    next: &mut dyn FnMut() -> Incoming,
) -> Result<Option<Staged>, (ReceiveFailure, Option<u64>)> {
    let generation = generation_next(database, cell).map_err(|error| (error.into(), None))?;
    database.registry_set(&generation_next_key(cell), generation + 1).map_err(|error| (error.into(), None))?;
    let fail = |error: ReceiveFailure| (error, Some(generation));
    let name = store_name(cell, generation);
    let store = Arc::new(Store::open_in(database, &name).map_err(|error| fail(error.into()))?);
    tracing::info!(cell, from, generation, "receiving a snapshot");
    let outcome = {
        let mut importer = store.import().map_err(|error| fail(error.into()))?;
        importer.chunk(&first_chunk).map_err(|error| fail(error.into()))?;
        loop {
            match next() {
                Incoming::Chunk(bytes) => importer.chunk(&bytes).map_err(|error| fail(error.into()))?,
                Incoming::End(message) => {
                    let image = importer.finish().map_err(|error| fail(error.into()))?;
                    // The message must describe this image: after a lost
                    // message, chunks of an older transfer can end with a
                    // newer transfer's message.
                    let metadata = message.get_snapshot().get_metadata();
                    let term = decode_base(&image.consensus).map(|base| base.term);
                    if (metadata.index, Some(metadata.term)) != (image.checkpoint.op, term) {
                        return Err(fail(ReceiveFailure::Mismatch {
                            image: image.checkpoint.op,
                            message: metadata.index,
                        }));
                    }
                    break Some(Staged { cell, from, generation, store: store.clone(), image, message });
                }
                Incoming::Stalled => return Err(fail(ReceiveFailure::Stalled)),
                Incoming::Closed => break None,
            }
        }
    };
    if outcome.is_none() {
        drop(store);
        database.drop_store(&name).map_err(|error| (error.into(), None))?;
    }
    Ok(outcome)
}

/// Bytes of chunks an [`InlineReceiver`] holds, all transfers together.
pub const INLINE_RECEIVE_BYTES_MAX: usize = 256 << 20;

/// The follower side without threads (the simulator's stepped engine): the
/// same rules as [`SnapshotReceiver`] (one transfer per cell, a new one
/// replaces it), but a transfer's chunks are held until the Raft message
/// that ends it, then loaded in one go by the same code.
pub struct InlineReceiver {
    database: StoreDatabase,
    /// The transfers under way, by cell: the sender and the chunks so far.
    transfers: BTreeMap<CellId, (NodeId, Vec<Vec<u8>>)>,
    bytes: usize,
}

impl InlineReceiver {
    pub fn new(database: StoreDatabase) -> InlineReceiver {
        InlineReceiver { database, transfers: BTreeMap::new(), bytes: 0 }
    }

    /// Takes a chunk or a snapshot's Raft message; returns a complete, loaded snapshot.
    pub fn receive(&mut self, from: NodeId, message: PeerMessage) -> Option<Staged> {
        let (cell, next) = match message {
            PeerMessage::Chunk { cell, first: true, bytes } => {
                self.remove(cell);
                if self.transfers.len() >= SNAPSHOT_RECEIVES_MAX {
                    return None;
                }
                self.bytes += bytes.len();
                self.transfers.insert(cell, (from, vec![bytes]));
                return None;
            }
            PeerMessage::Chunk { cell, first: false, bytes } => (cell, Incoming::Chunk(bytes)),
            PeerMessage::SnapshotMessage { cell, message } => (cell, Incoming::End(message)),
            PeerMessage::Raft { .. } | PeerMessage::CrossCell { .. } => return None,
        };
        if self.transfers.get(&cell).is_none_or(|(sender, _)| *sender != from) {
            return None;
        }
        match next {
            Incoming::Chunk(bytes) => {
                self.bytes += bytes.len();
                self.transfers.get_mut(&cell).expect("checked").1.push(bytes);
                if self.bytes > INLINE_RECEIVE_BYTES_MAX {
                    tracing::warn!(cell, from, bytes = self.bytes, "snapshot abandoned: too much to hold");
                    self.remove(cell);
                }
                None
            }
            end => {
                let mut chunks = self.remove(cell).into_iter();
                let first = chunks.next()?;
                let mut rest = chunks.map(Incoming::Chunk).chain(std::iter::once(end));
                receive(&self.database, from, cell, first, &mut || rest.next().unwrap_or(Incoming::Closed))
            }
        }
    }

    fn remove(&mut self, cell: CellId) -> Vec<Vec<u8>> {
        let chunks = self.transfers.remove(&cell).map(|(_, chunks)| chunks).unwrap_or_default();
        self.bytes -= chunks.iter().map(Vec::len).sum::<usize>();
        chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft_log;

    #[test]
    fn peer_messages_round_trip_and_garbage_is_refused() {
        let message = Message { to: 3, from: 1, term: 7, index: 42, ..Default::default() };
        let Some(PeerMessage::Raft { cell, message: decoded }) = decode(&encode_raft(9, &message)) else { panic!() };
        assert_eq!((cell, decoded.to, decoded.from, decoded.term, decoded.index), (9, 3, 1, 7, 42));
        let Some(PeerMessage::Chunk { cell, first, bytes }) = decode(&encode_chunk(4, true, b"abc")) else { panic!() };
        assert_eq!((cell, first, bytes.as_slice()), (4, true, &b"abc"[..]));
        assert!(decode(&[]).is_none());
        assert!(decode(&[KIND_RAFT, 1, 0, 0]).is_none());
        assert!(decode(&[KIND_RAFT, 1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff]).is_none());
        assert!(decode(&[9, 1, 0, 0, 0, 0, 0, 0, 0]).is_none());
    }

    /// Exports a store holding one checkpoint at `index` (term 3) into chunks.
    fn image_chunks(dir: &std::path::Path, index: u64) -> Vec<Vec<u8>> {
        let store = Store::open(&dir.join("leader")).unwrap();
        let base = LogBase {
            index,
            term: 3,
            conf_state: raft::prelude::ConfState { voters: vec![1, 2], ..Default::default() },
        };
        let delta = cellpay_ledger::CheckpointDelta { timestamp_last: 1, ..Default::default() };
        let mut consensus = Vec::new();
        raft_log::encode_base(&mut consensus, 1, &base);
        store.apply_checkpoint_with(index, &delta, &consensus).unwrap();
        let mut chunks = Vec::new();
        store
            .export(|chunk| {
                chunks.push(chunk);
                Ok::<_, std::convert::Infallible>(())
            })
            .unwrap();
        chunks
    }

    fn snapshot_message(index: u64, term: u64) -> Message {
        let mut message = Message { to: 2, from: 1, term, ..Default::default() };
        message.mut_snapshot().mut_metadata().index = index;
        message.mut_snapshot().mut_metadata().term = term;
        message
    }

    fn deliver(receiver: &mut InlineReceiver, chunks: &[Vec<u8>], message: Message) -> Option<Staged> {
        for (i, bytes) in chunks.iter().enumerate() {
            assert!(receiver.receive(1, PeerMessage::Chunk { cell: 1, first: i == 0, bytes: bytes.clone() }).is_none());
        }
        receiver.receive(1, PeerMessage::SnapshotMessage { cell: 1, message })
    }

    /// Two transfers of different cells, from different leaders, interleaved chunk by chunk.
    fn interleaved(chunks: &[Vec<u8>]) -> Vec<(NodeId, PeerMessage)> {
        let mut messages = Vec::new();
        for (i, bytes) in chunks.iter().enumerate() {
            for (from, cell) in [(1, 1), (2, 2)] {
                messages.push((from, PeerMessage::Chunk { cell, first: i == 0, bytes: bytes.clone() }));
            }
        }
        for (from, cell) in [(2, 2), (1, 1)] {
            messages.push((from, PeerMessage::SnapshotMessage { cell, message: snapshot_message(7, 3) }));
        }
        messages
    }

    /// Found by the simulator: a follower behind in several cells is sent
    /// snapshots by several leaders at once; with one transfer at a time,
    /// each new transfer abandoned the others, again and again.
    #[test]
    fn transfers_of_different_cells_proceed_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = image_chunks(dir.path(), 7);
        let inline_database = StoreDatabase::open(&dir.path().join("inline")).unwrap();
        let mut inline = InlineReceiver::new(inline_database);
        let staged: Vec<(CellId, NodeId)> = interleaved(&chunks)
            .into_iter()
            .filter_map(|(from, message)| inline.receive(from, message))
            .map(|staged| (staged.cell, staged.from))
            .collect();
        assert_eq!(staged, vec![(2, 2), (1, 1)]);

        let (staged_sender, staged) = bounded(1);
        let receiver = SnapshotReceiver::start(StoreDatabase::open(&dir.path().join("thread")).unwrap(), staged_sender);
        for message in interleaved(&chunks) {
            receiver.sender().send(message).unwrap();
        }
        let mut cells: Vec<CellId> =
            (0..2).map(|_| staged.recv_timeout(Duration::from_secs(30)).unwrap().cell).collect();
        cells.sort_unstable();
        assert_eq!(cells, vec![1, 2]);
    }

    /// Found by the simulator: after a lost message, the chunks of an older
    /// transfer could end with a newer transfer's Raft message, and the
    /// engine was handed an image other than the one Raft accepted.
    #[test]
    fn an_image_is_staged_only_with_the_message_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = image_chunks(dir.path(), 7);
        let database = StoreDatabase::open(&dir.path().join("follower")).unwrap();
        let mut receiver = InlineReceiver::new(database.clone());
        assert!(deliver(&mut receiver, &chunks, snapshot_message(9, 3)).is_none(), "another index");
        assert!(deliver(&mut receiver, &chunks, snapshot_message(7, 4)).is_none(), "another term");
        // A message with no chunks before it stages nothing.
        assert!(receiver
            .receive(1, PeerMessage::SnapshotMessage { cell: 1, message: snapshot_message(7, 3) })
            .is_none());
        let staged = deliver(&mut receiver, &chunks, snapshot_message(7, 3)).expect("the matching message stages it");
        assert_eq!((staged.cell, staged.from, staged.image.checkpoint.op), (1, 1, 7));
        // The refused transfers' generations were dropped: reopened, they are empty.
        assert_eq!(staged.generation, 3);
        for refused in [1, 2] {
            let store = Store::open_in(&database, &store_name(1, refused)).unwrap();
            assert_eq!(store.checkpoint().unwrap().op, 0, "generation {refused}");
        }
    }
}
