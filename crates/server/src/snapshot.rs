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
//! 2. the follower's **receiver** thread loads the chunks into a fresh store
//!    generation (`cell{C}.g{N}.`, N never used before: the registry keeps
//!    the next number), checking every chunk, record and checksum; at the
//!    Raft message it makes the image durable and hands it, with the
//!    message, to the engine;
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellpay_cluster::topology::{CellId, NodeId};
use cellpay_cluster::transport::{SendError, Transport};
use cellpay_storage::store::{SnapshotImage, Store, StoreDatabase, StoreError};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use protobuf::Message as _;
use raft::prelude::Message;

use crate::raft_log::{self, LogBase, LogRecord};

/// Snapshots a node sends at once (all cells and peers together).
pub const SNAPSHOT_SENDS_MAX: usize = 2;
/// How long the sender waits for room in a peer's queue before giving up.
pub const SNAPSHOT_SEND_STALL_MAX: Duration = Duration::from_secs(30);
/// How long the receiver waits for the next chunk before abandoning a transfer.
pub const SNAPSHOT_CHUNK_WAIT_MAX: Duration = Duration::from_secs(30);
/// How long a leader waits for a follower to install a snapshot it sent.
pub const SNAPSHOT_REPLY_WAIT: Duration = Duration::from_secs(10);
/// Chunks and messages queued for the receiver thread.
pub const SNAPSHOT_RECEIVE_QUEUE_MAX: usize = 64;

const KIND_RAFT: u8 = 1;
const KIND_CHUNK: u8 = 2;
const KIND_SNAPSHOT_MESSAGE: u8 = 3;

/// A message between peers.
pub enum PeerMessage {
    /// A Raft message of a cell.
    Raft { cell: CellId, message: Message },
    /// A chunk of a store image (`first`: it starts a new image).
    Chunk { cell: CellId, first: bool, bytes: Vec<u8> },
    /// The Raft snapshot message that ends an image's chunks.
    SnapshotMessage { cell: CellId, message: Message },
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
        _ => None,
    }
}

/// The consensus metadata stored with a checkpoint: a log base record.
pub fn encode_consensus(cell: CellId, base: &LogBase) -> Vec<u8> {
    let mut out = Vec::new();
    raft_log::encode_base(&mut out, cell, base);
    out
}

pub fn decode_consensus(bytes: &[u8]) -> Option<LogBase> {
    match raft_log::decode(bytes).ok()? {
        LogRecord::Base { base, .. } => Some(base),
        _ => None,
    }
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

/// The leader side: one thread that exports and sends snapshots, one at a time.
pub struct SnapshotSender {
    jobs: Option<Sender<SendJob>>,
    done: Receiver<SendDone>,
    in_flight: Vec<(CellId, NodeId)>,
    thread: Option<std::thread::JoinHandle<()>>,
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
                    let ok = match send(&transport, job) {
                        Ok(image) => {
                            tracing::info!(cell, to, index = image.checkpoint.op, bytes = image.bytes, "snapshot sent");
                            true
                        }
                        Err(error) => {
                            tracing::warn!(cell, to, %error, "snapshot not sent");
                            false
                        }
                    };
                    if done_sender.send(SendDone { cell, to, ok }).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the snapshot sender");
        SnapshotSender { jobs: Some(jobs), done, in_flight: Vec::new(), thread: Some(thread) }
    }

    /// Queues a snapshot for `to`; `false` (Raft should be told it failed) if
    /// one is already going there or too many are in flight.
    pub fn offer(&mut self, cell: CellId, to: NodeId, message: Message, store: Arc<Store>) -> bool {
        if self.in_flight.len() >= SNAPSHOT_SENDS_MAX || self.in_flight.contains(&(cell, to)) {
            return false;
        }
        let jobs = self.jobs.as_ref().expect("sender running");
        if jobs.try_send(SendJob { cell, to, message, store }).is_err() {
            return false;
        }
        self.in_flight.push((cell, to));
        true
    }

    /// Sends that finished since the last call.
    pub fn finished(&mut self) -> Vec<SendDone> {
        let mut finished = Vec::new();
        loop {
            match self.done.try_recv() {
                Ok(done) => {
                    self.in_flight.retain(|&pair| pair != (done.cell, done.to));
                    finished.push(done);
                }
                Err(TryRecvError::Empty) => return finished,
                Err(TryRecvError::Disconnected) => panic!("the snapshot sender stopped: see its panic"),
            }
        }
    }
}

impl Drop for SnapshotSender {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
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

fn send(transport: &Transport, job: SendJob) -> Result<SnapshotImage, SendFailure> {
    let SendJob { cell, to, mut message, store } = job;
    let mut first = true;
    let image = store
        .export(|chunk| {
            let payload = encode_chunk(cell, first, &chunk);
            first = false;
            send_waiting(transport, to, payload)
        })
        .map_err(|error| match error {
            cellpay_storage::store::ExportError::Store(error) => SendFailure::Store(error),
            cellpay_storage::store::ExportError::Sink(error) => error,
        })?;
    // The image is of the store's latest checkpoint, which may be newer than
    // the one Raft named when it asked: describe what is sent.
    let base = decode_consensus(&image.consensus).ok_or(SendFailure::NoMetadata)?;
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
    send_waiting(transport, to, encode_snapshot_message(cell, &message))?;
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

/// The follower side: one thread that loads incoming snapshots, one at a time.
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

fn receive_loop(database: &StoreDatabase, incoming: &Receiver<(NodeId, PeerMessage)>, staged: &Sender<Staged>) {
    let mut next: Option<(NodeId, PeerMessage)> = None;
    loop {
        let message = match next.take() {
            Some(message) => message,
            None => match incoming.recv() {
                Ok(message) => message,
                Err(_) => return,
            },
        };
        // Wait for the first chunk of an image; anything else is a leftover.
        let (from, PeerMessage::Chunk { cell, first: true, bytes }) = message else { continue };
        match receive_one(database, incoming, from, cell, bytes) {
            Ok(Received::Staged(snapshot)) => {
                if staged.send(snapshot).is_err() {
                    return;
                }
            }
            Ok(Received::Interrupted(message)) => next = message,
            Err((error, generation)) => {
                tracing::warn!(cell, from, %error, "snapshot abandoned; the leader will send it again");
                if let Some(generation) = generation {
                    if let Err(error) = database.drop_store(&store_name(cell, generation)) {
                        tracing::warn!(cell, generation, %error, "could not drop an abandoned snapshot");
                    }
                }
            }
        }
    }
}

enum Received {
    Staged(Staged),
    /// Another transfer started (or the channel closed): the current one is abandoned.
    Interrupted(Option<(NodeId, PeerMessage)>),
}

#[derive(Debug, thiserror::Error)]
enum ReceiveFailure {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("no chunk for {} s", SNAPSHOT_CHUNK_WAIT_MAX.as_secs())]
    Stalled,
}

/// Receives one image; on failure, the error and the generation to drop (if one was started).
fn receive_one(
    database: &StoreDatabase,
    incoming: &Receiver<(NodeId, PeerMessage)>,
    from: NodeId,
    cell: CellId,
    first_chunk: Vec<u8>,
) -> Result<Received, (ReceiveFailure, Option<u64>)> {
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
            let message = match incoming.recv_timeout(SNAPSHOT_CHUNK_WAIT_MAX) {
                Ok(message) => message,
                Err(RecvTimeoutError::Timeout) => return Err(fail(ReceiveFailure::Stalled)),
                Err(RecvTimeoutError::Disconnected) => break Received::Interrupted(None),
            };
            match message {
                (sender, PeerMessage::Chunk { cell: chunk_cell, first: false, bytes })
                    if sender == from && chunk_cell == cell =>
                {
                    importer.chunk(&bytes).map_err(|error| fail(error.into()))?;
                }
                (sender, PeerMessage::SnapshotMessage { cell: message_cell, message })
                    if sender == from && message_cell == cell =>
                {
                    let image = importer.finish().map_err(|error| fail(error.into()))?;
                    break Received::Staged(Staged { cell, from, generation, store: store.clone(), image, message });
                }
                other => break Received::Interrupted(Some(other)),
            }
        }
    };
    if let Received::Interrupted(_) = &outcome {
        drop(store);
        database.drop_store(&name).map_err(|error| (error.into(), None))?;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn consensus_metadata_round_trips() {
        let base = LogBase {
            index: 12,
            term: 3,
            conf_state: raft::prelude::ConfState { voters: vec![1, 2, 3], ..Default::default() },
        };
        assert_eq!(decode_consensus(&encode_consensus(5, &base)), Some(base));
        assert_eq!(decode_consensus(b"junk"), None);
    }
}
