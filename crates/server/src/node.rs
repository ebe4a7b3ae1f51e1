//! The node engine: one thread owns the ledger, the write-ahead log and the
//! history store, and group-commits the requests that reach it.
//!
//! A commit round:
//! 1. wait for a request, then take every request already queued, up to
//!    `group_requests_max` requests or `group_events_max` events;
//! 2. append one log record per write request (and a pulse record if a pending
//!    transfer's timeout has passed), each with the timestamp it will be
//!    applied with, then `sync` once: one fsync for the whole group;
//! 3. apply the requests to the ledger in order and answer each; reads are
//!    answered in their place in the same order, so they see every write
//!    acknowledged before them;
//! 4. checkpoint when enough transfers are held in memory: the ledger's delta
//!    goes to the history store (durable), then the log is truncated.
//!
//! Nothing is acknowledged before the fsync that covers it. An fsync or log
//! write that fails is fatal: after a failed fsync the kernel may have dropped
//! the dirty pages, so the only safe continuation is a restart and recovery.
//!
//! Recovery: restore the ledger from the store's checkpoint (accounts, open
//! pending transfers), then replay every log record after the checkpoint's op
//! with its recorded timestamp. The ledger is deterministic, so the replayed
//! state equals the state before the crash, for every acknowledged request.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cellpay_ledger::{
    Account, AccountBalance, AccountFilter, CheckpointDelta, CreateAccountResult, CreateTransferResult, FilterError,
    Ledger, LedgerConfig, Transfer, BATCH_EVENTS_MAX,
};
use cellpay_storage::store::{Store, StoreError};
use cellpay_storage::wal::{ReplayError, Wal, WalError};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::record::{self, Record, RecordError};

/// A node's limits and tuning.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub ledger: LedgerConfig,
    /// Requests waiting for the engine; past this, requests are refused as overloaded.
    pub queue_requests_max: usize,
    /// Requests in one group commit.
    pub group_requests_max: usize,
    /// Events in one group commit (a request is never split).
    pub group_events_max: usize,
    /// Checkpoint once this many transfers are held in memory.
    pub checkpoint_transfers_max: usize,
    /// Checkpoint an idle node that holds any new transfer after this long.
    pub checkpoint_idle_interval: Duration,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> NodeConfig {
        NodeConfig {
            data_dir: data_dir.into(),
            ledger: LedgerConfig::default(),
            queue_requests_max: 1024,
            group_requests_max: 256,
            group_events_max: 64 * BATCH_EVENTS_MAX,
            checkpoint_transfers_max: 1 << 18,
            checkpoint_idle_interval: Duration::from_secs(10),
        }
    }
}

/// A request to the node.
#[derive(Clone, Debug)]
pub enum Request {
    CreateAccounts(Vec<Account>),
    CreateTransfers(Vec<Transfer>),
    LookupAccounts(Vec<u128>),
    LookupTransfers(Vec<u128>),
    GetAccountTransfers(AccountFilter),
    GetAccountBalances(AccountFilter),
}

impl Request {
    pub fn operation(&self) -> &'static str {
        match self {
            Request::CreateAccounts(_) => "create_accounts",
            Request::CreateTransfers(_) => "create_transfers",
            Request::LookupAccounts(_) => "lookup_accounts",
            Request::LookupTransfers(_) => "lookup_transfers",
            Request::GetAccountTransfers(_) => "get_account_transfers",
            Request::GetAccountBalances(_) => "get_account_balances",
        }
    }

    fn events(&self) -> usize {
        match self {
            Request::CreateAccounts(events) => events.len(),
            Request::CreateTransfers(events) => events.len(),
            Request::LookupAccounts(ids) | Request::LookupTransfers(ids) => ids.len(),
            Request::GetAccountTransfers(_) | Request::GetAccountBalances(_) => 1,
        }
    }
}

/// The answer to a [`Request`], variant for variant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    CreateAccounts(Vec<CreateAccountResult>),
    CreateTransfers(Vec<CreateTransferResult>),
    Accounts(Vec<Account>),
    Transfers(Vec<Transfer>),
    Balances(Vec<AccountBalance>),
}

/// Why a request was refused as a whole. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("the node's queue is full ({queue_requests_max} requests): retry later")]
    Overloaded { queue_requests_max: usize },
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("a request must carry at least one event")]
    BatchEmpty,
    #[error("a request carries {events} events; the limit is {BATCH_EVENTS_MAX}")]
    BatchTooLarge { events: usize },
    #[error("invalid filter: {0}")]
    InvalidFilter(FilterError),
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("history store: {0}")]
    Store(#[from] StoreError),
    #[error("write-ahead log: {0}")]
    Wal(#[from] WalError),
    #[error("write-ahead log record at op {op}: {source}")]
    Record { op: u64, source: RecordError },
    #[error(
        "write-ahead log starts at op {wal_op_first} but the checkpoint covers only up to op {checkpoint_op}: \
         records {checkpoint_op}+1.. are missing"
    )]
    WalGap { checkpoint_op: u64, wal_op_first: u64 },
    #[error(
        "write-ahead log ends at op {wal_op_last} but the checkpoint covers op {checkpoint_op}: \
         the log is older than the checkpoint"
    )]
    WalBehind { checkpoint_op: u64, wal_op_last: u64 },
}

/// What recovery found, for the start-up log line.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub checkpoint_op: u64,
    pub records_replayed: u64,
    pub torn_tail_bytes_cut: u64,
    pub accounts: usize,
    pub pending_open: usize,
    pub wal_op_last: u64,
}

struct Envelope {
    request: Request,
    reply: oneshot::Sender<Result<Reply, NodeError>>,
    queued_at: Instant,
}

/// A cheap, cloneable handle for submitting requests to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    sender: SyncSender<Envelope>,
    metrics: Arc<Metrics>,
    queue_requests_max: usize,
    stop: Arc<AtomicU8>,
}

/// The engine's run state, shared with handles.
const RUNNING: u8 = 0;
/// Finish the queued requests, write a final checkpoint, stop.
const STOP: u8 = 1;
/// Stop at once, skipping the final checkpoint (the next start replays the log).
const HALT: u8 = 2;

impl NodeHandle {
    /// Validates the request's shape, queues it, and waits for its answer.
    /// Refuses at once (never blocks) when the queue is full.
    pub async fn submit(&self, request: Request) -> Result<Reply, NodeError> {
        let operation = request.operation();
        let result = self.submit_inner(request).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(NodeError::Overloaded { .. }) => "overloaded",
            Err(NodeError::ShuttingDown) => "shutting_down",
            Err(_) => "invalid",
        };
        self.metrics.request(operation, outcome);
        result
    }

    async fn submit_inner(&self, request: Request) -> Result<Reply, NodeError> {
        validate(&request)?;
        if self.stop.load(Ordering::Acquire) != RUNNING {
            return Err(NodeError::ShuttingDown);
        }
        let (reply, answer) = oneshot::channel();
        let envelope = Envelope { request, reply, queued_at: Instant::now() };
        match self.sender.try_send(envelope) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(NodeError::Overloaded { queue_requests_max: self.queue_requests_max })
            }
            Err(TrySendError::Disconnected(_)) => return Err(NodeError::ShuttingDown),
        }
        self.metrics.queue_requests.inc();
        answer.await.unwrap_or(Err(NodeError::ShuttingDown))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

fn validate(request: &Request) -> Result<(), NodeError> {
    match request {
        Request::GetAccountTransfers(filter) | Request::GetAccountBalances(filter) => {
            filter.validate().map_err(NodeError::InvalidFilter)
        }
        _ => {
            let events = request.events();
            if events == 0 {
                Err(NodeError::BatchEmpty)
            } else if events > BATCH_EVENTS_MAX {
                Err(NodeError::BatchTooLarge { events })
            } else {
                Ok(())
            }
        }
    }
}

/// A running node: its handle and its engine thread.
pub struct Node {
    handle: NodeHandle,
    stop: Arc<AtomicU8>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub recovery: RecoveryReport,
}

impl Node {
    /// Opens (or creates) the node's data, recovers, and starts the engine thread.
    pub fn start(config: NodeConfig) -> Result<Node, StartError> {
        let metrics = Arc::new(Metrics::new());
        let (engine, recovery) = Engine::open(config.clone(), metrics.clone())?;
        let (sender, receiver) = sync_channel(config.queue_requests_max);
        let stop = Arc::new(AtomicU8::new(RUNNING));
        let engine_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cellpay-engine".to_string())
            .spawn(move || engine.run(receiver, &engine_stop))
            .map_err(|source| StartError::DataDir { path: config.data_dir.clone(), source })?;
        let handle = NodeHandle { sender, metrics, queue_requests_max: config.queue_requests_max, stop: stop.clone() };
        Ok(Node { handle, stop, thread: Some(thread), recovery })
    }

    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Stops accepting requests, answers the queued ones, writes a final
    /// checkpoint, and joins the engine thread.
    pub fn shutdown(self) {
        self.stop_with(STOP);
    }

    /// Stops at once without the final checkpoint, as a crash would leave the
    /// data (everything acknowledged is in the log): the next start replays it.
    /// Queued requests are answered `shutting_down`.
    pub fn halt(self) {
        self.stop_with(HALT);
    }

    fn stop_with(mut self, mode: u8) {
        self.stop.store(mode, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("engine thread panicked");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(STOP, Ordering::Release);
            let _ = thread.join();
        }
    }
}

struct Engine {
    config: NodeConfig,
    ledger: Ledger,
    store: Arc<Store>,
    wal: Wal,
    writer: CheckpointWriter,
    metrics: Arc<Metrics>,
    payload: Vec<u8>,
    checkpoint_last: Instant,
}

/// The wall clock in nanoseconds since the Unix epoch. The ledger makes its
/// timestamps strictly increasing whatever this returns.
fn clock_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Engine {
    fn open(config: NodeConfig, metrics: Arc<Metrics>) -> Result<(Engine, RecoveryReport), StartError> {
        let data_dir = &config.data_dir;
        let dir_error = |source| StartError::DataDir { path: data_dir.clone(), source };
        std::fs::create_dir_all(data_dir).map_err(dir_error)?;
        let store = Arc::new(Store::open(&data_dir.join("store"))?);
        let checkpoint = store.checkpoint()?;
        let accounts = store.accounts()?;
        let pending_open = store.open_pending()?;
        let ledger = Ledger::restore(config.ledger, accounts, pending_open, checkpoint.timestamp_last);
        let (wal, wal_recovery) = Wal::open(&data_dir.join("wal"))?;
        let mut engine = Engine {
            config,
            ledger,
            writer: CheckpointWriter::start(store.clone()),
            store,
            wal,
            metrics,
            payload: Vec::with_capacity(record::PAYLOAD_SIZE_MAX),
            checkpoint_last: Instant::now(),
        };
        let records_replayed = engine.replay(checkpoint.op)?;
        let report = RecoveryReport {
            checkpoint_op: checkpoint.op,
            records_replayed,
            torn_tail_bytes_cut: wal_recovery.torn_tail_bytes_cut,
            accounts: engine.ledger.accounts_count(),
            pending_open: engine.ledger.pending_open_count(),
            wal_op_last: engine.wal.last_op(),
        };
        if let Err(error) = engine.ledger.audit() {
            panic!("ledger fails its audit after recovery: {error}");
        }
        engine.update_gauges();
        tracing::info!(?report, "recovered");
        Ok((engine, report))
    }

    /// Re-applies every log record after `checkpoint_op`. Returns how many.
    fn replay(&mut self, checkpoint_op: u64) -> Result<u64, StartError> {
        if self.wal.last_op() == 0 {
            // A new, empty log: continue numbering after the checkpoint.
            if checkpoint_op > 0 {
                self.wal.set_next_op(checkpoint_op + 1)?;
            }
            return Ok(0);
        }
        if self.wal.last_op() < checkpoint_op {
            return Err(StartError::WalBehind { checkpoint_op, wal_op_last: self.wal.last_op() });
        }
        let wal_op_first = self.wal.first_op();
        if wal_op_first > checkpoint_op + 1 {
            return Err(StartError::WalGap { checkpoint_op, wal_op_first });
        }
        let mut replayed = 0u64;
        let ledger = &mut self.ledger;
        let store = self.store.as_ref();
        let result = self.wal.replay(checkpoint_op + 1, |op, payload| {
            let record = record::decode(payload).map_err(|source| StartError::Record { op, source })?;
            apply_record(ledger, store, &record);
            replayed += 1;
            Ok::<(), StartError>(())
        });
        match result {
            Ok(()) => Ok(replayed),
            Err(ReplayError::Wal(error)) => Err(StartError::Wal(error)),
            Err(ReplayError::Callback { error, .. }) => Err(error),
        }
    }

    fn run(mut self, receiver: Receiver<Envelope>, stop: &AtomicU8) {
        let mut group: Vec<Envelope> = Vec::with_capacity(self.config.group_requests_max);
        loop {
            match stop.load(Ordering::Acquire) {
                RUNNING => {}
                HALT => {
                    while let Ok(envelope) = receiver.try_recv() {
                        let _ = envelope.reply.send(Err(NodeError::ShuttingDown));
                    }
                    // A checkpoint already handed to the writer completes (it is
                    // consistent either way); no new one starts.
                    self.checkpoint_finish(true);
                    tracing::info!(wal_op_last = self.wal.last_op(), "engine halted");
                    return;
                }
                _ => {
                    // Handles refuse new requests now; answer what is queued, then stop.
                    match receiver.try_recv() {
                        Ok(envelope) => group.push(envelope),
                        Err(_) => break,
                    }
                }
            }
            if group.is_empty() {
                match receiver.recv_timeout(Duration::from_millis(20)) {
                    Ok(envelope) => group.push(envelope),
                    Err(RecvTimeoutError::Timeout) => {
                        self.idle();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            let mut events = group[0].request.events();
            while group.len() < self.config.group_requests_max && events < self.config.group_events_max {
                match receiver.try_recv() {
                    Ok(envelope) => {
                        events += envelope.request.events();
                        group.push(envelope);
                    }
                    Err(_) => break,
                }
            }
            self.metrics.queue_requests.dec_by(group.len() as i64);
            self.commit(&mut group);
            self.checkpoint_finish(false);
            if self.ledger.transfers_new_count() >= self.config.checkpoint_transfers_max {
                self.checkpoint_start();
            }
        }
        self.checkpoint_all();
        tracing::info!(wal_op_last = self.wal.last_op(), "engine stopped");
    }

    /// One group commit: log, fsync once, apply, answer.
    fn commit(&mut self, group: &mut Vec<Envelope>) {
        let span = tracing::debug_span!("commit", requests = group.len());
        let _entered = span.enter();
        // Every record of the group is logged with this timestamp and applied
        // with exactly it; the ledger turns it into strictly increasing event
        // timestamps deterministically, so replay reproduces them.
        let timestamp = clock_ns();
        let pulse = self.ledger.expiry_next().is_some_and(|at| at <= timestamp);
        if pulse {
            record::encode_pulse(&mut self.payload, timestamp);
            self.wal_append();
        }
        for envelope in group.iter() {
            match &envelope.request {
                Request::CreateAccounts(accounts) => {
                    record::encode_create_accounts(&mut self.payload, timestamp, accounts);
                    self.wal_append();
                }
                Request::CreateTransfers(transfers) => {
                    record::encode_create_transfers(&mut self.payload, timestamp, transfers);
                    self.wal_append();
                }
                _ => {}
            }
        }
        if self.wal.last_op() > self.wal.durable_op() {
            let started = Instant::now();
            if let Err(error) = self.wal.sync() {
                panic!("write-ahead log sync failed, stopping to recover on restart: {error}");
            }
            self.metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
        }
        self.metrics.group_requests.observe(group.len() as f64);

        // Durable: apply in log order and answer.
        if pulse {
            self.ledger.pulse(timestamp);
        }
        for envelope in group.drain(..) {
            let reply = self.apply(&envelope.request, timestamp);
            self.metrics.commit_seconds.observe(envelope.queued_at.elapsed().as_secs_f64());
            // A client that gave up waiting is not an error: its request was applied.
            let _ = envelope.reply.send(reply);
        }
        self.update_gauges();
    }

    fn wal_append(&mut self) {
        if let Err(error) = self.wal.append(&self.payload) {
            panic!("write-ahead log append failed, stopping to recover on restart: {error}");
        }
    }

    /// Applies one request exactly as `apply_record` replays it.
    fn apply(&mut self, request: &Request, timestamp: u64) -> Result<Reply, NodeError> {
        let reply = match request {
            Request::CreateAccounts(accounts) => {
                let results = self.ledger.create_accounts(timestamp, accounts);
                self.metrics.results("create_accounts", &results, CreateAccountResult::as_str);
                Reply::CreateAccounts(results)
            }
            Request::CreateTransfers(transfers) => {
                let results = self.ledger.create_transfers(timestamp, transfers, self.store.as_ref());
                self.metrics.results("create_transfers", &results, CreateTransferResult::as_str);
                Reply::CreateTransfers(results)
            }
            Request::LookupAccounts(ids) => Reply::Accounts(self.ledger.lookup_accounts(ids)),
            Request::LookupTransfers(ids) => Reply::Transfers(self.ledger.lookup_transfers(ids, self.store.as_ref())),
            Request::GetAccountTransfers(filter) => Reply::Transfers(
                self.ledger.get_account_transfers(filter, self.store.as_ref()).map_err(NodeError::InvalidFilter)?,
            ),
            Request::GetAccountBalances(filter) => Reply::Balances(
                self.ledger.get_account_balances(filter, self.store.as_ref()).map_err(NodeError::InvalidFilter)?,
            ),
        };
        Ok(reply)
    }

    fn idle(&mut self) {
        let due = self.ledger.expiry_next().is_some_and(|at| at <= clock_ns());
        if due {
            let mut group = Vec::new();
            self.commit(&mut group);
        }
        self.checkpoint_finish(false);
        let stale = self.checkpoint_last.elapsed() >= self.config.checkpoint_idle_interval;
        if stale && self.ledger.transfers_new_count() > 0 && !self.ledger.checkpoint_in_flight() {
            self.checkpoint_start();
        }
    }

    /// Starts a checkpoint: the ledger hands over what changed (and keeps
    /// answering it from memory), and the writer thread puts it in the store
    /// while the engine goes on committing. Waits for the previous one first:
    /// at most one is in flight, so memory stays bounded at two windows.
    fn checkpoint_start(&mut self) {
        self.checkpoint_finish(true);
        let op = self.wal.durable_op();
        assert_eq!(op, self.wal.last_op(), "checkpoint covers only durable, applied records");
        if let Err(error) = self.ledger.audit() {
            panic!("ledger fails its audit at checkpoint: {error}");
        }
        let delta = self.ledger.checkpoint_begin();
        self.writer.send(op, delta);
        self.checkpoint_last = Instant::now();
    }

    /// Confirms a checkpoint the writer has finished (waiting for it if
    /// `wait`), then truncates the log it covers.
    fn checkpoint_finish(&mut self, wait: bool) {
        let Some(done) = self.writer.poll(wait) else { return };
        self.ledger.checkpoint_end();
        if let Err(error) = self.wal.truncate_before(done.op + 1) {
            tracing::warn!(%error, "could not truncate the write-ahead log after a checkpoint");
        }
        self.metrics.checkpoint_seconds.observe(done.seconds);
        tracing::info!(op = done.op, transfers = done.transfers, seconds = done.seconds, "checkpoint");
        self.update_gauges();
    }

    /// A final checkpoint of everything, waited for (clean shutdown).
    fn checkpoint_all(&mut self) {
        self.checkpoint_finish(true);
        if self.ledger.transfers_new_count() > 0 {
            self.checkpoint_start();
            self.checkpoint_finish(true);
        }
    }

    fn update_gauges(&self) {
        self.metrics.accounts.set(self.ledger.accounts_count() as i64);
        self.metrics.pending_open.set(self.ledger.pending_open_count() as i64);
        self.metrics.transfers_uncheckpointed.set(self.ledger.transfers_new_count() as i64);
        self.metrics.wal_op_last.set(self.wal.last_op() as i64);
    }
}

/// A finished checkpoint write.
struct CheckpointDone {
    op: u64,
    transfers: usize,
    seconds: f64,
}

/// The thread that writes checkpoints to the store, one at a time.
struct CheckpointWriter {
    sender: Option<SyncSender<(u64, Arc<CheckpointDelta>)>>,
    done: Receiver<CheckpointDone>,
    in_flight: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CheckpointWriter {
    fn start(store: Arc<Store>) -> CheckpointWriter {
        let (sender, requests) = sync_channel::<(u64, Arc<CheckpointDelta>)>(1);
        let (done_sender, done) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("cellpay-checkpoint".to_string())
            .spawn(move || {
                for (op, delta) in requests {
                    let started = Instant::now();
                    if let Err(error) = store.apply_checkpoint(op, &delta) {
                        panic!("checkpoint write failed, stopping to recover on restart: {error}");
                    }
                    let transfers = delta.transfers.len();
                    let seconds = started.elapsed().as_secs_f64();
                    if done_sender.send(CheckpointDone { op, transfers, seconds }).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the checkpoint writer");
        CheckpointWriter { sender: Some(sender), done, in_flight: false, thread: Some(thread) }
    }

    fn send(&mut self, op: u64, delta: Arc<CheckpointDelta>) {
        assert!(!self.in_flight);
        self.in_flight = true;
        let sender = self.sender.as_ref().expect("writer running");
        sender.send((op, delta)).expect("the checkpoint writer stopped: see its panic");
    }

    /// The finished checkpoint, if one was in flight and is done (waiting for it if `wait`).
    fn poll(&mut self, wait: bool) -> Option<CheckpointDone> {
        if !self.in_flight {
            return None;
        }
        let done = if wait {
            Some(self.done.recv().expect("the checkpoint writer stopped: see its panic"))
        } else {
            match self.done.try_recv() {
                Ok(done) => Some(done),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => panic!("the checkpoint writer stopped: see its panic"),
            }
        };
        if done.is_some() {
            self.in_flight = false;
        }
        done
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Applies a logged record to the ledger (recovery and the pulse).
fn apply_record(ledger: &mut Ledger, store: &Store, record: &Record) {
    match record {
        Record::CreateAccounts { timestamp, accounts } => {
            ledger.create_accounts(*timestamp, accounts);
        }
        Record::CreateTransfers { timestamp, transfers } => {
            ledger.create_transfers(*timestamp, transfers, store);
        }
        Record::Pulse { timestamp } => {
            ledger.pulse(*timestamp);
        }
    }
}
