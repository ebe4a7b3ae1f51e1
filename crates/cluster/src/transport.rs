//! Node-to-node transport: opaque messages over TCP, with bounded queues,
//! coalesced writes, automatic reconnect and emulated one-way latency.
//!
//! The transport carries byte strings between the nodes of a cluster and
//! knows nothing about what they mean (the caller encodes consensus messages
//! for many cells). Its guarantees are those of one TCP connection per
//! direction: messages from one node to one peer arrive **at most once and
//! in order**; a message may be lost when a connection breaks, when a link is
//! cut with [`Transport::set_blocked`], or when the receiver's inbox is full.
//! The consensus protocol above tolerates loss and retries.
//!
//! # Shape
//!
//! - One **outbound** connection per peer, written by one writer task. It
//!   connects eagerly at start, reconnects with exponential backoff
//!   (`reconnect_delay_min` doubling up to `reconnect_delay_max`) and keeps
//!   sending from the queue.
//! - A listener task accepts **inbound** connections (at most
//!   `2 × peers + INBOUND_CONNECTIONS_SLACK` at once; more are closed at
//!   once), each read by one reader task that hands every message to the
//!   [`Deliver`] callback. A newer inbound connection from a peer closes its
//!   older ones (at a message boundary), so messages of two connections never
//!   interleave and order holds across reconnects.
//! - Every connection starts with a handshake: [`HANDSHAKE_MAGIC`],
//!   [`PROTOCOL_VERSION`], the sender's [`NodeId`] and the receiver's
//!   [`NodeId`] (24 bytes, little-endian). The receiver closes connections
//!   with a wrong magic or version, an unknown sender or the wrong receiver.
//! - Then frames: `u32 LE payload length`, `u32 LE CRC32C of the payload`,
//!   payload. A frame longer than `message_bytes_max` or with a bad checksum
//!   closes the connection with a warning.
//!
//! # Queues and backpressure
//!
//! [`Transport::send`] appends to the peer's queue and returns at once; it
//! never blocks and needs no async context. A queue is bounded by bytes
//! (`queue_bytes_max`) and by messages ([`QUEUE_MESSAGES_MAX`]); past either
//! bound `send` refuses. A message leaves the queue's byte count only once
//! written, so a slow or absent peer fills the queue and pushes back on the
//! sender.
//!
//! # Emulated latency and coalescing
//!
//! Each queued message records when it was queued; the writer does not write
//! it before `queued_at + one_way_delay` of its peer. When several messages
//! are due, the writer writes them all (up to [`BURST_BYTES_MAX`] /
//! [`BURST_MESSAGES_MAX`]) and flushes once. The delay uses tokio's timer,
//! whose granularity is about 1 ms: a message is never written early, but
//! may be written up to about a millisecond late, so emulated delays below
//! 1 ms are coarse.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// A node's identity in the cluster (the same alias as in the topology).
pub type NodeId = u64;

/// Default bound on the bytes queued toward one peer.
pub const QUEUE_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;
/// Default bound on one message's size.
pub const MESSAGE_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;
/// Default first reconnect delay.
pub const RECONNECT_DELAY_MIN_DEFAULT: Duration = Duration::from_millis(20);
/// Default longest reconnect delay.
pub const RECONNECT_DELAY_MAX_DEFAULT: Duration = Duration::from_secs(1);
/// Upper bound accepted for `reconnect_delay_max`.
pub const RECONNECT_DELAY_LIMIT: Duration = Duration::from_secs(60);
/// Messages queued toward one peer, at most (whatever their size).
pub const QUEUE_MESSAGES_MAX: usize = 65_536;
/// Peers of one node, at most.
pub const PEERS_MAX: usize = 1024;
/// Inbound connections allowed beyond two per peer (reconnects overlapping
/// with stale connections, probes).
pub const INBOUND_CONNECTIONS_SLACK: usize = 8;
/// Bytes written between two flushes, at most (a single larger message is
/// still written, alone).
pub const BURST_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Messages written between two flushes, at most.
pub const BURST_MESSAGES_MAX: usize = 4096;
/// Longest emulated one-way delay; longer settings are clamped to it.
pub const ONE_WAY_DELAY_MAX: Duration = Duration::from_secs(10);
/// How long an outbound connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an inbound connection may take to send its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first bytes of every connection.
pub const HANDSHAKE_MAGIC: [u8; 4] = *b"CPTX";
/// The wire format's version, sent in the handshake; must match exactly.
pub const PROTOCOL_VERSION: u32 = 1;
/// Handshake size: magic, version, sender id, receiver id.
pub const HANDSHAKE_BYTES: usize = 24;
/// Frame header size: payload length, payload CRC32C.
pub const FRAME_HEADER_BYTES: usize = 8;

/// Capacity of the buffer in front of each outbound connection.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;
/// Capacity of the buffer behind each inbound connection.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// A received payload's buffer starts at most this large and grows as bytes
/// arrive, so a lying length cannot make us allocate `message_bytes_max`.
const RECEIVE_CAPACITY_INITIAL_BYTES: usize = 64 * 1024;
/// Repeated warnings (connect failures, refused connections) are logged at
/// most once per interval, with the count of those suppressed.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors), so the
/// listener does not spin.
const ACCEPT_ERROR_DELAY: Duration = Duration::from_millis(50);

/// The transport's configuration for one node.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// This node.
    pub node: NodeId,
    /// Where to listen for peers' connections (used by [`Transport::start`]).
    pub listen: SocketAddr,
    /// The other nodes this node talks to. Only these may connect to it.
    pub peers: Vec<PeerConfig>,
    /// Bytes queued toward one peer; past this `send` refuses with
    /// [`SendError::QueueFull`]. Default 64 MiB.
    pub queue_bytes_max: usize,
    /// Largest message; larger sends are refused, larger received frames
    /// close the connection. At most `u32::MAX` and `queue_bytes_max`.
    /// Default 16 MiB.
    pub message_bytes_max: usize,
    /// First delay before reconnecting after a failure. Default 20 ms.
    pub reconnect_delay_min: Duration,
    /// The delay doubles after each failure up to this. Default 1 s.
    pub reconnect_delay_max: Duration,
}

/// One peer of a node.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The peer's identity, checked in the handshake.
    pub id: NodeId,
    /// Where the peer listens.
    pub address: SocketAddr,
    /// Emulated one-way latency of the link toward this peer (0 for none).
    pub one_way_delay: Duration,
}

impl TransportConfig {
    /// A configuration with default limits.
    pub fn new(node: NodeId, listen: SocketAddr, peers: Vec<PeerConfig>) -> Self {
        TransportConfig {
            node,
            listen,
            peers,
            queue_bytes_max: QUEUE_BYTES_MAX_DEFAULT,
            message_bytes_max: MESSAGE_BYTES_MAX_DEFAULT,
            reconnect_delay_min: RECONNECT_DELAY_MIN_DEFAULT,
            reconnect_delay_max: RECONNECT_DELAY_MAX_DEFAULT,
        }
    }

    /// Checks the configuration: distinct peers other than this node, sane
    /// limits and delays.
    pub fn validate(&self) -> Result<(), TransportError> {
        if self.peers.len() > PEERS_MAX {
            return Err(TransportError::TooManyPeers { peers: self.peers.len(), max: PEERS_MAX });
        }
        let mut seen = HashSet::with_capacity(self.peers.len());
        for peer in &self.peers {
            if peer.id == self.node {
                return Err(TransportError::SelfAsPeer { node: self.node });
            }
            if !seen.insert(peer.id) {
                return Err(TransportError::DuplicatePeer { peer: peer.id });
            }
            if peer.one_way_delay > ONE_WAY_DELAY_MAX {
                return Err(invalid(
                    "one_way_delay",
                    format!("{:?} for peer {} exceeds the limit {ONE_WAY_DELAY_MAX:?}", peer.one_way_delay, peer.id),
                ));
            }
        }
        if self.queue_bytes_max == 0 {
            return Err(invalid("queue_bytes_max", "must be positive".to_string()));
        }
        if self.message_bytes_max == 0 || u32::try_from(self.message_bytes_max).is_err() {
            return Err(invalid("message_bytes_max", format!("{} is not in 1..=u32::MAX", self.message_bytes_max)));
        }
        if self.message_bytes_max > self.queue_bytes_max {
            return Err(invalid(
                "message_bytes_max",
                format!("{} exceeds queue_bytes_max {}", self.message_bytes_max, self.queue_bytes_max),
            ));
        }
        if self.reconnect_delay_min.is_zero() {
            return Err(invalid("reconnect_delay_min", "must be positive".to_string()));
        }
        if self.reconnect_delay_min > self.reconnect_delay_max {
            return Err(invalid(
                "reconnect_delay_min",
                format!("{:?} exceeds reconnect_delay_max {:?}", self.reconnect_delay_min, self.reconnect_delay_max),
            ));
        }
        if self.reconnect_delay_max > RECONNECT_DELAY_LIMIT {
            return Err(invalid(
                "reconnect_delay_max",
                format!("{:?} exceeds the limit {RECONNECT_DELAY_LIMIT:?}", self.reconnect_delay_max),
            ));
        }
        Ok(())
    }

    /// Inbound connections accepted at once: two per peer plus a slack.
    pub fn inbound_connections_max(&self) -> usize {
        2 * self.peers.len() + INBOUND_CONNECTIONS_SLACK
    }
}

fn invalid(field: &'static str, reason: String) -> TransportError {
    TransportError::InvalidConfig { field, reason }
}

/// Called for every message received: (from, payload). Returns false if the
/// receiver's inbox is full: the message is then dropped and counted (the
/// consensus protocol tolerates loss and retries).
///
/// It runs on the transport's runtime, inside a reader task, so it must not
/// block: push into a bounded queue and return.
pub type Deliver = Arc<dyn Fn(NodeId, Vec<u8>) -> bool + Send + Sync>;

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// A pre-bound listener could not be used.
    #[error("cannot use the given listener: {source}")]
    Listener {
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// The node appears in its own peer list.
    #[error("node {node} lists itself among its peers")]
    SelfAsPeer {
        /// This node.
        node: NodeId,
    },
    /// A peer appears twice in the peer list.
    #[error("peer {peer} is listed twice")]
    DuplicatePeer {
        /// The repeated peer.
        peer: NodeId,
    },
    /// More peers than [`PEERS_MAX`].
    #[error("{peers} peers configured, at most {max} supported")]
    TooManyPeers {
        /// Peers configured.
        peers: usize,
        /// The limit.
        max: usize,
    },
    /// A limit or delay is out of range.
    #[error("invalid transport setting {field}: {reason}")]
    InvalidConfig {
        /// The offending field of [`TransportConfig`] or [`PeerConfig`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why [`Transport::send`] refused a message. The message is not sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The destination is not a configured peer.
    #[error("destination is not a configured peer")]
    UnknownPeer,
    /// The peer's queue holds too many bytes (the peer is slow or down).
    #[error("queue toward peer is full: {queued_bytes} bytes queued, at most {max}")]
    QueueFull {
        /// Bytes queued (including those being written).
        queued_bytes: usize,
        /// `queue_bytes_max`.
        max: usize,
    },
    /// The peer's queue holds [`QUEUE_MESSAGES_MAX`] messages.
    #[error("queue toward peer is full: {queued_messages} messages queued, at most {max}")]
    QueueFullMessages {
        /// Messages waiting.
        queued_messages: usize,
        /// [`QUEUE_MESSAGES_MAX`].
        max: usize,
    },
    /// The message is larger than `message_bytes_max`.
    #[error("message of {bytes} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The message's size.
        bytes: usize,
        /// `message_bytes_max`.
        max: usize,
    },
    /// The link to the peer is cut ([`Transport::set_blocked`]).
    #[error("link to peer is blocked")]
    Blocked,
    /// The transport was shut down.
    #[error("transport is shut down")]
    ShutDown,
}

/// Counters for one peer, since start. Message and byte counts are of
/// payloads (frame headers and handshakes are not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Messages written to the peer's connection and flushed.
    pub messages_sent: u64,
    /// Payload bytes of `messages_sent`.
    pub bytes_sent: u64,
    /// Messages received from the peer and accepted by [`Deliver`].
    pub messages_received: u64,
    /// Payload bytes of `messages_received`.
    pub bytes_received: u64,
    /// Sends refused because the queue was full (bytes or messages).
    pub messages_dropped_queue_full: u64,
    /// Messages dropped because the link was blocked: sends refused, queued
    /// messages discarded when blocking, and messages received while blocked.
    pub messages_dropped_blocked: u64,
    /// Messages received that [`Deliver`] refused (inbox full).
    pub messages_dropped_inbox_full: u64,
    /// Messages taken for writing when the connection broke (maybe lost).
    pub messages_dropped_connection_lost: u64,
    /// Outbound connections established.
    pub connects: u64,
    /// Flushes of the outbound connection (bursts of coalesced messages).
    pub flushes: u64,
    /// Messages queued now (waiting, not being written).
    pub queued_messages: u64,
    /// Bytes queued now (waiting or being written).
    pub queued_bytes: u64,
}

/// The node-to-node transport. Cheap to share behind an `Arc`: all methods
/// take `&self`. Dropping it shuts it down.
pub struct Transport {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// State shared by the handle and the tasks.
struct Shared {
    node: NodeId,
    local_address: SocketAddr,
    queue_bytes_max: usize,
    message_bytes_max: usize,
    reconnect_delay_min: Duration,
    reconnect_delay_max: Duration,
    inbound_connections_max: usize,
    inbound_connections: AtomicUsize,
    peers: HashMap<NodeId, Arc<Peer>>,
    deliver: Deliver,
    shut_down: AtomicBool,
    shutdown_sender: watch::Sender<bool>,
    /// Rate-limits warnings about inbound connections refused at handshake
    /// (anything on the network can open them).
    refusal_warnings: Mutex<WarningLimiter>,
}

/// One peer: its queue, link state and counters.
struct Peer {
    id: NodeId,
    address: SocketAddr,
    one_way_delay_nanos: AtomicU64,
    blocked: AtomicBool,
    connected: AtomicBool,
    queue: Mutex<Queue>,
    /// Wakes the writer when a message is queued (it listens only while the
    /// queue is empty: otherwise the first message is due first anyway).
    message_queued: Notify,
    /// Wakes the writer when the delay or the block changes.
    control_changed: Notify,
    /// Generation of the newest inbound connection from this peer. A newer
    /// connection supersedes older ones, which close without delivering
    /// more, so two connections never interleave their messages.
    inbound_generation: watch::Sender<u64>,
    counters: Counters,
}

#[derive(Default)]
struct Queue {
    messages: VecDeque<Queued>,
    /// Bytes of `messages` plus bytes taken by the writer and not yet written.
    bytes: usize,
}

struct Queued {
    queued_at: Instant,
    payload: Vec<u8>,
}

#[derive(Default)]
struct Counters {
    messages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
    messages_dropped_queue_full: AtomicU64,
    messages_dropped_blocked: AtomicU64,
    messages_dropped_inbox_full: AtomicU64,
    messages_dropped_connection_lost: AtomicU64,
    connects: AtomicU64,
    flushes: AtomicU64,
}

fn increment(counter: &AtomicU64, amount: usize) {
    counter.fetch_add(u64::try_from(amount).unwrap_or(u64::MAX), Ordering::Relaxed);
}

fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl Transport {
    /// Binds the listener on `config.listen` now (so a bad address fails here
    /// with a clear error), then runs on `runtime`.
    pub fn start(
        config: TransportConfig,
        deliver: Deliver,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Transport, TransportError> {
        config.validate()?;
        let listener = std::net::TcpListener::bind(config.listen)
            .map_err(|source| TransportError::Bind { address: config.listen, source })?;
        Transport::start_with_listener(config, listener, deliver, runtime)
    }

    /// Like [`Transport::start`], with a listener bound by the caller
    /// (`config.listen` is then ignored). Lets a caller bind every node's
    /// port before any node starts, e.g. with port 0 in tests.
    pub fn start_with_listener(
        config: TransportConfig,
        listener: std::net::TcpListener,
        deliver: Deliver,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Transport, TransportError> {
        config.validate()?;
        let listener_error = |source| TransportError::Listener { source };
        listener.set_nonblocking(true).map_err(listener_error)?;
        let local_address = listener.local_addr().map_err(listener_error)?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener).map_err(listener_error)?
        };
        let peers = config
            .peers
            .iter()
            .map(|peer| {
                let state = Peer {
                    id: peer.id,
                    address: peer.address,
                    one_way_delay_nanos: AtomicU64::new(duration_nanos(peer.one_way_delay)),
                    blocked: AtomicBool::new(false),
                    connected: AtomicBool::new(false),
                    queue: Mutex::new(Queue::default()),
                    message_queued: Notify::new(),
                    control_changed: Notify::new(),
                    inbound_generation: watch::Sender::new(0),
                    counters: Counters::default(),
                };
                (peer.id, Arc::new(state))
            })
            .collect::<HashMap<_, _>>();
        let (shutdown_sender, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            node: config.node,
            local_address,
            queue_bytes_max: config.queue_bytes_max,
            message_bytes_max: config.message_bytes_max,
            reconnect_delay_min: config.reconnect_delay_min,
            reconnect_delay_max: config.reconnect_delay_max,
            inbound_connections_max: config.inbound_connections_max(),
            inbound_connections: AtomicUsize::new(0),
            peers,
            deliver,
            shut_down: AtomicBool::new(false),
            shutdown_sender,
            refusal_warnings: Mutex::new(WarningLimiter::new(WARNING_INTERVAL)),
        });
        let mut tasks = Vec::with_capacity(shared.peers.len() + 1);
        tasks.push(runtime.spawn(run_listener(shared.clone(), listener)));
        for peer in shared.peers.values() {
            tasks.push(runtime.spawn(run_writer(shared.clone(), peer.clone())));
        }
        tracing::info!(node = shared.node, address = %local_address, peers = shared.peers.len(), "transport started");
        Ok(Transport { shared, tasks: Mutex::new(tasks) })
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.shared.node
    }

    /// Queues a message for a peer and returns at once. Never blocks and
    /// needs no async context (callable from a plain thread). Messages to one
    /// peer are delivered in order, at most once; they may be lost with a
    /// connection.
    pub fn send(&self, to: NodeId, payload: Vec<u8>) -> Result<(), SendError> {
        let shared = &self.shared;
        let peer = shared.peers.get(&to).ok_or(SendError::UnknownPeer)?;
        let bytes = payload.len();
        if bytes > shared.message_bytes_max {
            return Err(SendError::TooLarge { bytes, max: shared.message_bytes_max });
        }
        {
            let mut queue = peer.lock_queue();
            // Checked under the queue lock: `shutdown` and `set_blocked` purge
            // the queue under it, so no message slips in after a purge.
            if shared.shut_down.load(Ordering::Acquire) {
                return Err(SendError::ShutDown);
            }
            if peer.blocked.load(Ordering::Acquire) {
                increment(&peer.counters.messages_dropped_blocked, 1);
                return Err(SendError::Blocked);
            }
            if queue.messages.len() >= QUEUE_MESSAGES_MAX {
                increment(&peer.counters.messages_dropped_queue_full, 1);
                return Err(SendError::QueueFullMessages {
                    queued_messages: queue.messages.len(),
                    max: QUEUE_MESSAGES_MAX,
                });
            }
            if queue.bytes.saturating_add(bytes) > shared.queue_bytes_max {
                increment(&peer.counters.messages_dropped_queue_full, 1);
                return Err(SendError::QueueFull { queued_bytes: queue.bytes, max: shared.queue_bytes_max });
            }
            // Taken under the lock, so `queued_at` never decreases along the
            // queue and the first message is always the first due.
            queue.messages.push_back(Queued { queued_at: Instant::now(), payload });
            queue.bytes += bytes;
        }
        peer.message_queued.notify_one();
        Ok(())
    }

    /// Emulated link cut. While blocked, messages to `peer` are dropped
    /// (`send` returns [`SendError::Blocked`], queued messages are discarded,
    /// the outbound connection is closed) and messages received from `peer`
    /// are dropped too. Unblocking reconnects at once. Unknown peers are
    /// ignored.
    pub fn set_blocked(&self, peer: NodeId, blocked: bool) {
        let Some(state) = self.shared.peers.get(&peer) else {
            tracing::warn!(node = self.shared.node, peer, "set_blocked: not a configured peer, ignored");
            return;
        };
        let was_blocked = state.blocked.swap(blocked, Ordering::AcqRel);
        if blocked {
            let discarded = state.purge();
            increment(&state.counters.messages_dropped_blocked, discarded);
        }
        if was_blocked != blocked {
            tracing::info!(node = self.shared.node, peer, blocked, "link block changed");
        }
        state.control_changed.notify_one();
    }

    /// Sets the emulated one-way latency toward `peer` (clamped to
    /// [`ONE_WAY_DELAY_MAX`]); applies to queued messages too. Unknown peers
    /// are ignored.
    pub fn set_one_way_delay(&self, peer: NodeId, delay: Duration) {
        let Some(state) = self.shared.peers.get(&peer) else {
            tracing::warn!(node = self.shared.node, peer, "set_one_way_delay: not a configured peer, ignored");
            return;
        };
        if delay > ONE_WAY_DELAY_MAX {
            tracing::warn!(node = self.shared.node, peer, ?delay, max = ?ONE_WAY_DELAY_MAX, "one-way delay clamped");
        }
        state.one_way_delay_nanos.store(duration_nanos(delay.min(ONE_WAY_DELAY_MAX)), Ordering::Release);
        state.control_changed.notify_one();
    }

    /// The emulated one-way latency toward `peer`, if it is a peer.
    pub fn one_way_delay(&self, peer: NodeId) -> Option<Duration> {
        self.shared.peers.get(&peer).map(|state| state.one_way_delay())
    }

    /// Whether the link toward `peer` is blocked.
    pub fn is_blocked(&self, peer: NodeId) -> bool {
        self.shared.peers.get(&peer).is_some_and(|state| state.blocked.load(Ordering::Acquire))
    }

    /// Whether an outbound connection to `peer` is up right now (for health
    /// displays).
    pub fn peer_connected(&self, peer: NodeId) -> bool {
        !self.shared.shut_down.load(Ordering::Acquire)
            && self.shared.peers.get(&peer).is_some_and(|state| state.connected.load(Ordering::Acquire))
    }

    /// The counters of `peer`, if it is a peer.
    pub fn stats(&self, peer: NodeId) -> Option<PeerStats> {
        self.shared.peers.get(&peer).map(|state| state.stats())
    }

    /// The configured peers, in no particular order.
    pub fn peers(&self) -> Vec<NodeId> {
        self.shared.peers.keys().copied().collect()
    }

    /// Inbound connections open now (including those still in handshake).
    pub fn inbound_connections(&self) -> usize {
        self.shared.inbound_connections.load(Ordering::Acquire)
    }

    /// The address the listener is bound to (with the real port if 0 was asked).
    pub fn local_address(&self) -> SocketAddr {
        self.shared.local_address
    }

    /// Stops every task and closes every connection; pending messages are
    /// dropped. Later sends return [`SendError::ShutDown`]. Idempotent.
    pub fn shutdown(&self) {
        let shared = &self.shared;
        if shared.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        shared.shutdown_sender.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in tasks {
            task.abort();
        }
        for peer in shared.peers.values() {
            peer.purge();
            peer.connected.store(false, Ordering::Release);
        }
        tracing::info!(node = shared.node, "transport shut down");
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Transport")
            .field("node", &self.shared.node)
            .field("local_address", &self.shared.local_address)
            .field("peers", &self.shared.peers.len())
            .field("shut_down", &self.shared.shut_down.load(Ordering::Relaxed))
            .finish()
    }
}

impl Peer {
    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        // The queue is left consistent at every step, so a poisoned lock
        // (a panic elsewhere while holding it) is safe to keep using.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn one_way_delay(&self) -> Duration {
        Duration::from_nanos(self.one_way_delay_nanos.load(Ordering::Acquire))
    }

    /// When the first queued message may be written, if any is queued.
    fn first_due(&self) -> Option<Instant> {
        let delay = self.one_way_delay();
        let queue = self.lock_queue();
        // The delay is clamped, so the addition cannot overflow in practice;
        // if it did, the message would simply never be due.
        queue.messages.front().and_then(|message| message.queued_at.checked_add(delay))
    }

    /// Takes the messages due at `now`, oldest first, up to one burst. Their
    /// bytes stay counted in the queue until [`Peer::release`].
    fn take_due(&self, now: Instant) -> Vec<Vec<u8>> {
        let delay = self.one_way_delay();
        let mut queue = self.lock_queue();
        let mut burst = Vec::new();
        let mut burst_bytes = 0usize;
        while let Some(message) = queue.messages.front() {
            let due = message.queued_at.checked_add(delay).is_some_and(|due| due <= now);
            let burst_full = !burst.is_empty()
                && (burst.len() >= BURST_MESSAGES_MAX || burst_bytes + message.payload.len() > BURST_BYTES_MAX);
            if !due || burst_full {
                break;
            }
            let Some(message) = queue.messages.pop_front() else { break };
            burst_bytes += message.payload.len();
            burst.push(message.payload);
        }
        burst
    }

    /// Uncounts bytes taken by [`Peer::take_due`] once written (or lost).
    fn release(&self, bytes: usize) {
        let mut queue = self.lock_queue();
        queue.bytes = queue.bytes.saturating_sub(bytes);
    }

    /// Discards every waiting message; returns how many.
    fn purge(&self) -> usize {
        let mut queue = self.lock_queue();
        let discarded = std::mem::take(&mut queue.messages);
        let discarded_bytes: usize = discarded.iter().map(|message| message.payload.len()).sum();
        queue.bytes = queue.bytes.saturating_sub(discarded_bytes);
        discarded.len()
    }

    fn stats(&self) -> PeerStats {
        let (queued_messages, queued_bytes) = {
            let queue = self.lock_queue();
            (queue.messages.len(), queue.bytes)
        };
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let counters = &self.counters;
        PeerStats {
            messages_sent: load(&counters.messages_sent),
            bytes_sent: load(&counters.bytes_sent),
            messages_received: load(&counters.messages_received),
            bytes_received: load(&counters.bytes_received),
            messages_dropped_queue_full: load(&counters.messages_dropped_queue_full),
            messages_dropped_blocked: load(&counters.messages_dropped_blocked),
            messages_dropped_inbox_full: load(&counters.messages_dropped_inbox_full),
            messages_dropped_connection_lost: load(&counters.messages_dropped_connection_lost),
            connects: load(&counters.connects),
            flushes: load(&counters.flushes),
            queued_messages: u64::try_from(queued_messages).unwrap_or(u64::MAX),
            queued_bytes: u64::try_from(queued_bytes).unwrap_or(u64::MAX),
        }
    }
}

impl Shared {
    /// Hands a received message to [`Deliver`], or drops and counts it.
    fn receive(&self, peer: &Peer, payload: Vec<u8>) {
        if self.shut_down.load(Ordering::Acquire) {
            return;
        }
        if peer.blocked.load(Ordering::Acquire) {
            increment(&peer.counters.messages_dropped_blocked, 1);
            return;
        }
        let bytes = payload.len();
        if (self.deliver)(peer.id, payload) {
            increment(&peer.counters.messages_received, 1);
            increment(&peer.counters.bytes_received, bytes);
        } else {
            increment(&peer.counters.messages_dropped_inbox_full, 1);
        }
    }

    /// Checks an inbound handshake; returns the sending peer.
    fn check_handshake(&self, bytes: &[u8; HANDSHAKE_BYTES]) -> Result<&Arc<Peer>, ConnectionError> {
        let handshake = Handshake::decode(bytes);
        if handshake.magic != HANDSHAKE_MAGIC {
            return Err(ConnectionError::BadMagic { magic: handshake.magic });
        }
        if handshake.version != PROTOCOL_VERSION {
            return Err(ConnectionError::UnsupportedVersion {
                version: handshake.version,
                supported: PROTOCOL_VERSION,
            });
        }
        if handshake.to != self.node {
            return Err(ConnectionError::WrongReceiver { to: handshake.to, node: self.node });
        }
        self.peers.get(&handshake.from).ok_or(ConnectionError::UnknownSender { from: handshake.from })
    }
}

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("connect timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    #[error("no handshake within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("bad handshake magic {magic:02x?} (not a cellpay transport connection)")]
    BadMagic { magic: [u8; 4] },
    #[error("unsupported protocol version {version} (this node speaks {supported})")]
    UnsupportedVersion { version: u32, supported: u32 },
    #[error("handshake from node {from}, which is not a configured peer")]
    UnknownSender { from: NodeId },
    #[error("handshake addressed to node {to}, but this is node {node}")]
    WrongReceiver { to: NodeId, node: NodeId },
    #[error("frame of {bytes} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { bytes: u64, max: usize },
    #[error("frame checksum mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    BadChecksum { expected: u32, actual: u32 },
    #[error("connection closed mid-frame")]
    TruncatedFrame,
    #[error("connection closed by peer")]
    ClosedByPeer,
    #[error("peer sent data on an outbound connection")]
    UnexpectedData,
    #[error("superseded by a newer connection from the same peer")]
    Superseded,
}

/// The first bytes of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Handshake {
    magic: [u8; 4],
    version: u32,
    from: NodeId,
    to: NodeId,
}

impl Handshake {
    fn encode(from: NodeId, to: NodeId) -> [u8; HANDSHAKE_BYTES] {
        let mut bytes = [0u8; HANDSHAKE_BYTES];
        let fields = HANDSHAKE_MAGIC
            .into_iter()
            .chain(PROTOCOL_VERSION.to_le_bytes())
            .chain(from.to_le_bytes())
            .chain(to.to_le_bytes());
        for (byte, field_byte) in bytes.iter_mut().zip(fields) {
            *byte = field_byte;
        }
        bytes
    }

    fn decode(bytes: &[u8; HANDSHAKE_BYTES]) -> Handshake {
        let [m0, m1, m2, m3, v0, v1, v2, v3, f0, f1, f2, f3, f4, f5, f6, f7, t0, t1, t2, t3, t4, t5, t6, t7] = *bytes;
        Handshake {
            magic: [m0, m1, m2, m3],
            version: u32::from_le_bytes([v0, v1, v2, v3]),
            from: u64::from_le_bytes([f0, f1, f2, f3, f4, f5, f6, f7]),
            to: u64::from_le_bytes([t0, t1, t2, t3, t4, t5, t6, t7]),
        }
    }
}

/// A frame's header: payload length and checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHeader {
    payload_bytes: u32,
    checksum: u32,
}

impl FrameHeader {
    /// The header for `payload`, or `None` if it is longer than `u32::MAX`
    /// (impossible for a queued message: `message_bytes_max` fits a u32).
    fn for_payload(payload: &[u8]) -> Option<FrameHeader> {
        let payload_bytes = u32::try_from(payload.len()).ok()?;
        Some(FrameHeader { payload_bytes, checksum: crc32c::crc32c(payload) })
    }

    fn encode(self) -> [u8; FRAME_HEADER_BYTES] {
        let [l0, l1, l2, l3] = self.payload_bytes.to_le_bytes();
        let [c0, c1, c2, c3] = self.checksum.to_le_bytes();
        [l0, l1, l2, l3, c0, c1, c2, c3]
    }

    fn decode(bytes: [u8; FRAME_HEADER_BYTES]) -> FrameHeader {
        let [l0, l1, l2, l3, c0, c1, c2, c3] = bytes;
        FrameHeader {
            payload_bytes: u32::from_le_bytes([l0, l1, l2, l3]),
            checksum: u32::from_le_bytes([c0, c1, c2, c3]),
        }
    }
}

/// Resolves once shutdown is requested (or the transport is gone).
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|requested| *requested).await;
}

/// Sleeps for `delay`; returns true if shutdown was requested meanwhile.
async fn sleep_or_shutdown(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = shutdown_requested(shutdown) => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff between reconnect attempts.
#[derive(Debug)]
struct Backoff {
    delay_min: Duration,
    delay_max: Duration,
    delay_next: Duration,
}

impl Backoff {
    fn new(delay_min: Duration, delay_max: Duration) -> Backoff {
        Backoff { delay_min, delay_max, delay_next: delay_min }
    }

    fn reset(&mut self) {
        self.delay_next = self.delay_min;
    }

    /// The delay to wait now; doubles the following one, up to the maximum.
    fn next_delay(&mut self) -> Duration {
        let delay = self.delay_next;
        self.delay_next = delay.saturating_mul(2).min(self.delay_max);
        delay
    }
}

/// Lets a repeated warning through at most once per interval.
#[derive(Debug)]
struct WarningLimiter {
    interval: Duration,
    logged_last: Option<Instant>,
    suppressed: u64,
}

impl WarningLimiter {
    fn new(interval: Duration) -> WarningLimiter {
        WarningLimiter { interval, logged_last: None, suppressed: 0 }
    }

    /// `Some(suppressed since the last one)` if this occurrence should be
    /// logged, `None` if it should be suppressed.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let due = self.logged_last.is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            self.logged_last = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// How an outbound connection ended.
enum LinkEnd {
    Shutdown,
    Blocked,
    Failed(ConnectionError),
}

/// The writer of one peer: connects, writes due messages, reconnects.
async fn run_writer(shared: Arc<Shared>, peer: Arc<Peer>) {
    let mut shutdown = shared.shutdown_sender.subscribe();
    let mut backoff = Backoff::new(shared.reconnect_delay_min, shared.reconnect_delay_max);
    // Failures (connect refused, connection lost) and connects are logged
    // through separate limiters, so a recovery is logged even right after a
    // failure, while a flapping link logs at most one of each per interval.
    let mut failure_warnings = WarningLimiter::new(WARNING_INTERVAL);
    let mut connect_notices = WarningLimiter::new(WARNING_INTERVAL);
    loop {
        if peer.blocked.load(Ordering::Acquire) {
            if !wait_unblocked(&peer, &mut shutdown).await {
                return;
            }
            backoff.reset();
        }
        let connected = tokio::select! {
            () = shutdown_requested(&mut shutdown) => return,
            connected = connect(peer.address) => connected,
        };
        let stream = match connected {
            Ok(stream) => stream,
            Err(error) => {
                if let Some(suppressed) = failure_warnings.admit(Instant::now()) {
                    tracing::warn!(
                        node = shared.node, peer = peer.id, address = %peer.address, %error, suppressed,
                        "cannot connect to peer; retrying with backoff",
                    );
                } else {
                    tracing::debug!(node = shared.node, peer = peer.id, %error, "cannot connect to peer");
                }
                if sleep_or_shutdown(backoff.next_delay(), &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        let connected_at = Instant::now();
        peer.connected.store(true, Ordering::Release);
        increment(&peer.counters.connects, 1);
        if let Some(suppressed) = connect_notices.admit(connected_at) {
            tracing::info!(node = shared.node, peer = peer.id, address = %peer.address, suppressed, "connected to peer");
        } else {
            tracing::debug!(node = shared.node, peer = peer.id, "connected to peer");
        }
        let end = pump(&shared, &peer, stream, &mut shutdown).await;
        peer.connected.store(false, Ordering::Release);
        match end {
            LinkEnd::Shutdown => return,
            LinkEnd::Blocked => {
                tracing::info!(node = shared.node, peer = peer.id, "link to peer blocked; connection closed");
            }
            LinkEnd::Failed(error) => {
                if let Some(suppressed) = failure_warnings.admit(Instant::now()) {
                    tracing::warn!(node = shared.node, peer = peer.id, %error, suppressed, "connection to peer lost");
                } else {
                    tracing::debug!(node = shared.node, peer = peer.id, %error, "connection to peer lost");
                }
                // A connection that stayed up resets the backoff; one that
                // flaps keeps doubling it, so flapping does not spin or spam.
                if connected_at.elapsed() >= shared.reconnect_delay_max {
                    backoff.reset();
                }
                if sleep_or_shutdown(backoff.next_delay(), &mut shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Waits until the peer is unblocked; false if shutdown came first.
async fn wait_unblocked(peer: &Peer, shutdown: &mut watch::Receiver<bool>) -> bool {
    while peer.blocked.load(Ordering::Acquire) {
        tokio::select! {
            () = shutdown_requested(shutdown) => return false,
            () = peer.control_changed.notified() => {}
        }
    }
    true
}

/// Resolves once the peer is blocked.
async fn blocked(peer: &Peer) {
    while !peer.blocked.load(Ordering::Acquire) {
        peer.control_changed.notified().await;
    }
}

async fn connect(address: SocketAddr) -> Result<TcpStream, ConnectionError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| ConnectionError::ConnectTimeout)??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends the handshake, then writes due messages in bursts until the
/// connection fails, the link is blocked or shutdown is requested.
async fn pump(shared: &Shared, peer: &Peer, stream: TcpStream, shutdown: &mut watch::Receiver<bool>) -> LinkEnd {
    let (mut read_half, write_half) = stream.into_split();
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, write_half);
    let handshake = Handshake::encode(shared.node, peer.id);
    let handshake_written = tokio::select! {
        () = shutdown_requested(shutdown) => return LinkEnd::Shutdown,
        written = async { writer.write_all(&handshake).await?; writer.flush().await } => written,
    };
    if let Err(error) = handshake_written {
        return LinkEnd::Failed(error.into());
    }
    // The peer never writes on this connection; reading it tells when the
    // peer closes it, so `peer_connected` turns false without waiting for a
    // write to fail.
    let mut probe = [0u8; 1];
    loop {
        if peer.blocked.load(Ordering::Acquire) {
            return LinkEnd::Blocked;
        }
        let due = peer.first_due();
        let due_later = due.is_none_or(|due| due > Instant::now());
        if due_later {
            tokio::select! {
                () = shutdown_requested(shutdown) => return LinkEnd::Shutdown,
                () = peer.control_changed.notified() => {}
                () = peer.message_queued.notified(), if due.is_none() => {}
                () = sleep_until_or_forever(due) => {}
                read = read_half.read(&mut probe) => {
                    return LinkEnd::Failed(match read {
                        Ok(0) => ConnectionError::ClosedByPeer,
                        Ok(_) => ConnectionError::UnexpectedData,
                        Err(error) => ConnectionError::Io(error),
                    });
                }
            }
            continue;
        }
        let burst = peer.take_due(Instant::now());
        if burst.is_empty() {
            continue;
        }
        let burst_bytes: usize = burst.iter().map(Vec::len).sum();
        // A peer that stops reading stalls the write (and, through the
        // queue bound, the sender); blocking the link or shutting down still
        // ends it.
        let written = tokio::select! {
            () = shutdown_requested(shutdown) => Err(LinkEnd::Shutdown),
            () = blocked(peer) => Err(LinkEnd::Blocked),
            written = write_burst(&mut writer, &burst) => written.map_err(|error| LinkEnd::Failed(error.into())),
        };
        peer.release(burst_bytes);
        match written {
            Ok(()) => {
                increment(&peer.counters.messages_sent, burst.len());
                increment(&peer.counters.bytes_sent, burst_bytes);
                increment(&peer.counters.flushes, 1);
            }
            Err(end) => {
                let dropped = match end {
                    LinkEnd::Blocked => &peer.counters.messages_dropped_blocked,
                    LinkEnd::Shutdown | LinkEnd::Failed(_) => &peer.counters.messages_dropped_connection_lost,
                };
                increment(dropped, burst.len());
                return end;
            }
        }
    }
}

/// Writes a burst of frames and flushes once.
async fn write_burst(writer: &mut BufWriter<OwnedWriteHalf>, burst: &[Vec<u8>]) -> io::Result<()> {
    for payload in burst {
        let header = FrameHeader::for_payload(payload)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "message longer than u32::MAX bytes"))?;
        writer.write_all(&header.encode()).await?;
        writer.write_all(payload).await?;
    }
    writer.flush().await
}

/// Holds one of the bounded inbound connection slots; frees it on drop.
struct InboundSlot {
    shared: Arc<Shared>,
}

impl InboundSlot {
    fn acquire(shared: &Arc<Shared>) -> Option<InboundSlot> {
        let max = shared.inbound_connections_max;
        shared
            .inbound_connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < max).then_some(open + 1))
            .ok()
            .map(|_| InboundSlot { shared: shared.clone() })
    }
}

impl Drop for InboundSlot {
    fn drop(&mut self) {
        self.shared.inbound_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts inbound connections, up to the bound, and spawns their readers.
async fn run_listener(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown_sender.subscribe();
    let mut refusal_warnings = WarningLimiter::new(WARNING_INTERVAL);
    let mut accept_warnings = WarningLimiter::new(WARNING_INTERVAL);
    loop {
        let accepted = tokio::select! {
            () = shutdown_requested(&mut shutdown) => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                if let Some(suppressed) = accept_warnings.admit(Instant::now()) {
                    tracing::warn!(node = shared.node, %error, suppressed, "accept failed");
                }
                if sleep_or_shutdown(ACCEPT_ERROR_DELAY, &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        let Some(slot) = InboundSlot::acquire(&shared) else {
            if let Some(suppressed) = refusal_warnings.admit(Instant::now()) {
                tracing::warn!(
                    node = shared.node, %remote, max = shared.inbound_connections_max, suppressed,
                    "too many inbound connections; refused",
                );
            }
            drop(stream);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(node = shared.node, %remote, %error, "cannot set TCP_NODELAY");
        }
        tokio::spawn(run_inbound(slot, stream, remote));
    }
}

/// Reads one inbound connection until it ends, then logs why.
async fn run_inbound(slot: InboundSlot, stream: TcpStream, remote: SocketAddr) {
    let shared = slot.shared.clone();
    let mut shutdown = shared.shutdown_sender.subscribe();
    let mut sender = None;
    let ended = tokio::select! {
        () = shutdown_requested(&mut shutdown) => return,
        ended = read_inbound(&shared, stream, remote, &mut sender) => ended,
    };
    match (ended, sender) {
        (Ok(()), Some(peer)) => {
            tracing::info!(node = shared.node, peer, %remote, "inbound connection closed by peer");
        }
        (Ok(()), None) => {}
        (Err(ConnectionError::Superseded), Some(peer)) => {
            tracing::info!(node = shared.node, peer, %remote, "inbound connection superseded by a newer one");
        }
        (Err(error), Some(peer)) => {
            tracing::warn!(node = shared.node, peer, %remote, %error, "inbound connection closed");
        }
        (Err(error), None) => {
            let admitted = shared.refusal_warnings.lock().unwrap_or_else(PoisonError::into_inner).admit(Instant::now());
            if let Some(suppressed) = admitted {
                tracing::warn!(node = shared.node, %remote, %error, suppressed, "inbound connection refused");
            } else {
                tracing::debug!(node = shared.node, %remote, %error, "inbound connection refused");
            }
        }
    }
    drop(slot);
}

/// Checks the handshake, then delivers frames until the connection ends
/// (`Ok` on a clean close at a frame boundary). Sets `sender` once known.
async fn read_inbound(
    shared: &Shared,
    stream: TcpStream,
    remote: SocketAddr,
    sender: &mut Option<NodeId>,
) -> Result<(), ConnectionError> {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    let mut handshake = [0u8; HANDSHAKE_BYTES];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.read_exact(&mut handshake))
        .await
        .map_err(|_| ConnectionError::HandshakeTimeout)??;
    let peer = shared.check_handshake(&handshake)?;
    *sender = Some(peer.id);
    let mut generation_receiver = peer.inbound_generation.subscribe();
    let mut generation = 0;
    peer.inbound_generation.send_modify(|newest| {
        *newest += 1;
        generation = *newest;
    });
    generation_receiver.borrow_and_update();
    tracing::info!(node = shared.node, peer = peer.id, %remote, generation, "accepted connection from peer");
    loop {
        let payload = tokio::select! {
            // Only a newer connection changes the generation.
            _ = generation_receiver.changed() => return Err(ConnectionError::Superseded),
            payload = read_frame(&mut reader, shared.message_bytes_max) => payload?,
        };
        let Some(payload) = payload else { return Ok(()) };
        // Delivered while holding the generation: a newer connection cannot
        // take over (and deliver) in the middle, so order holds across them.
        let newest = generation_receiver.borrow();
        if *newest != generation {
            return Err(ConnectionError::Superseded);
        }
        shared.receive(peer, payload);
    }
}

/// Reads one frame and checks it; `None` on a clean close between frames.
async fn read_frame(
    reader: &mut BufReader<TcpStream>,
    message_bytes_max: usize,
) -> Result<Option<Vec<u8>>, ConnectionError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let header = FrameHeader::decode(header);
    let payload_bytes = usize::try_from(header.payload_bytes).unwrap_or(usize::MAX);
    if payload_bytes > message_bytes_max {
        return Err(ConnectionError::FrameTooLarge { bytes: u64::from(header.payload_bytes), max: message_bytes_max });
    }
    let mut payload = Vec::with_capacity(payload_bytes.min(RECEIVE_CAPACITY_INITIAL_BYTES));
    reader.take(u64::from(header.payload_bytes)).read_to_end(&mut payload).await?;
    if payload.len() != payload_bytes {
        return Err(ConnectionError::TruncatedFrame);
    }
    let checksum = crc32c::crc32c(&payload);
    if checksum != header.checksum {
        return Err(ConnectionError::BadChecksum { expected: header.checksum, actual: checksum });
    }
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7000))
    }

    fn peer(id: NodeId) -> PeerConfig {
        PeerConfig { id, address: address(), one_way_delay: Duration::ZERO }
    }

    #[test]
    fn handshake_round_trips() {
        let bytes = Handshake::encode(3, 0x0102_0304_0506_0708);
        assert_eq!(&bytes[..4], &HANDSHAKE_MAGIC);
        assert_eq!(
            Handshake::decode(&bytes),
            Handshake { magic: HANDSHAKE_MAGIC, version: PROTOCOL_VERSION, from: 3, to: 0x0102_0304_0506_0708 }
        );
    }

    #[test]
    fn frame_header_round_trips_and_checks_payload() {
        let header = FrameHeader::for_payload(b"hello").unwrap();
        assert_eq!(header.payload_bytes, 5);
        assert_eq!(header.checksum, crc32c::crc32c(b"hello"));
        let bytes = header.encode();
        assert_eq!(&bytes[..4], &5u32.to_le_bytes());
        assert_eq!(FrameHeader::decode(bytes), header);
    }

    #[test]
    fn config_validation_names_the_problem() {
        let valid = TransportConfig::new(1, address(), vec![peer(2), peer(3)]);
        valid.validate().unwrap();
        assert_eq!(valid.inbound_connections_max(), 2 * 2 + INBOUND_CONNECTIONS_SLACK);

        let mut config = valid.clone();
        config.peers.push(peer(1));
        assert!(matches!(config.validate(), Err(TransportError::SelfAsPeer { node: 1 })));

        let mut config = valid.clone();
        config.peers.push(peer(2));
        assert!(matches!(config.validate(), Err(TransportError::DuplicatePeer { peer: 2 })));

        let mut config = valid.clone();
        config.message_bytes_max = config.queue_bytes_max + 1;
        assert!(matches!(config.validate(), Err(TransportError::InvalidConfig { field: "message_bytes_max", .. })));

        let mut config = valid.clone();
        config.reconnect_delay_min = Duration::ZERO;
        assert!(matches!(config.validate(), Err(TransportError::InvalidConfig { field: "reconnect_delay_min", .. })));

        let mut config = valid.clone();
        config.peers[0].one_way_delay = ONE_WAY_DELAY_MAX + Duration::from_millis(1);
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("one_way_delay"), "{error}");
    }

    #[test]
    fn backoff_doubles_up_to_max_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(100));
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![20, 40, 80, 100, 100]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(20));
    }

    #[test]
    fn warning_limiter_admits_once_per_interval() {
        let mut limiter = WarningLimiter::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(limiter.admit(start), Some(0));
        assert_eq!(limiter.admit(start + Duration::from_secs(1)), None);
        assert_eq!(limiter.admit(start + Duration::from_secs(2)), None);
        assert_eq!(limiter.admit(start + Duration::from_secs(10)), Some(2));
    }

    #[test]
    fn take_due_respects_delay_order_and_burst_limits() {
        let peer = Peer {
            id: 2,
            address: address(),
            one_way_delay_nanos: AtomicU64::new(duration_nanos(Duration::from_millis(5))),
            blocked: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            queue: Mutex::new(Queue::default()),
            message_queued: Notify::new(),
            control_changed: Notify::new(),
            inbound_generation: watch::Sender::new(0),
            counters: Counters::default(),
        };
        let start = Instant::now();
        {
            let mut queue = peer.lock_queue();
            for index in 0..(BURST_MESSAGES_MAX + 10) {
                let queued_at = start + Duration::from_millis(if index < BURST_MESSAGES_MAX + 5 { 0 } else { 10 });
                queue.messages.push_back(Queued { queued_at, payload: vec![1, 2] });
                queue.bytes += 2;
            }
        }
        assert_eq!(peer.first_due(), Some(start + Duration::from_millis(5)));
        assert!(peer.take_due(start + Duration::from_millis(4)).is_empty());
        let burst = peer.take_due(start + Duration::from_millis(5));
        assert_eq!(burst.len(), BURST_MESSAGES_MAX);
        peer.release(2 * burst.len());
        assert_eq!(peer.take_due(start + Duration::from_millis(5)).len(), 5);
        peer.release(2 * 5);
        assert_eq!(peer.stats().queued_messages, 5);
        assert_eq!(peer.stats().queued_bytes, 10);
        assert_eq!(peer.purge(), 5);
        assert_eq!(peer.stats().queued_bytes, 0);
    }
}
