//! Batching across clients: the create parts of concurrent client requests
//! bound for one cell are combined into one call (one Raft entry in the
//! cell), so many small requests cost one commit.
//!
//! Per cell and kind (accounts, transfers) a bounded queue holds parts
//! waiting (`queue_parts_max`; a part past it is refused `overloaded`) and
//! one sender task takes them out: it waits for one of its
//! `cell_calls_max` call slots, then takes every part waiting, up to
//! `BATCH_EVENTS_MAX` events, and sends them as one request. While the
//! slots are busy, parts pile up and the next call carries them all: the
//! batch grows with the load, and a lone request waits for nothing.
//!
//! Only combinable parts are queued (see `split::Part::combinable`): a part
//! ending with an open linked chain, or naming another cell's account, is
//! sent alone. Each part's chains are closed, so concatenating parts keeps
//! every chain's meaning; results are split back by position.
//!
//! A `misrouted` refusal of a combined call names one account: the parts
//! naming it get the refusal (their request refreshes its table and splits
//! them again); the others, not applied, are sent again at once.
//! Any other refusal or failure is every part's.
//!
//! A full batch (8,190 events of the widest kind) encodes to 1.3 MiB, under
//! the 4 MiB gRPC message limit (`api::proto` tests it), so the event limit
//! is the only one needed.

use std::sync::Arc;
use std::time::Duration;

use cellpay_cluster::topology::CellId;
use cellpay_ledger::BATCH_EVENTS_MAX;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::cells::Cells;
use super::metrics::{CellLabels, GatewayMetrics};
use super::split::CreateEvent;
use crate::node::{NodeError, Reply};

/// A part's answer: one result per event, or why the part failed.
pub(super) type PartAnswer<E> = Result<Vec<<E as CreateEvent>::Result>, NodeError>;

/// A part waiting for its call.
struct Queued<E: CreateEvent> {
    events: Vec<E>,
    reply: oneshot::Sender<PartAnswer<E>>,
}

/// Why a part could not be queued.
#[derive(Debug)]
pub(super) enum QueueError {
    Full,
    Closed,
}

/// The queue of one cell and kind.
pub(super) struct Batcher<E: CreateEvent> {
    cell: CellId,
    sender: mpsc::Sender<Queued<E>>,
    metrics: Arc<GatewayMetrics>,
}

impl<E: CreateEvent> Batcher<E> {
    /// Starts the sender task of `cell`'s queue.
    pub(super) fn start(
        cell: CellId,
        cells: Arc<Cells>,
        queue_parts_max: usize,
        cell_calls_max: usize,
        retry_duration: Duration,
        metrics: Arc<GatewayMetrics>,
    ) -> (Batcher<E>, JoinHandle<()>) {
        assert!(queue_parts_max > 0 && cell_calls_max > 0, "a queue and calls in flight");
        let (sender, receiver) = mpsc::channel(queue_parts_max);
        let slots = Arc::new(Semaphore::new(cell_calls_max));
        let sending = Sending { cell, cells, retry_duration, metrics: metrics.clone() };
        let task = tokio::spawn(sending.run(receiver, slots));
        (Batcher { cell, sender, metrics }, task)
    }

    /// Queues a part and waits for its answer.
    pub(super) async fn submit(&self, events: Vec<E>) -> Result<PartAnswer<E>, QueueError> {
        let (reply, answer) = oneshot::channel();
        match self.sender.try_send(Queued { events, reply }) {
            Ok(()) => self.metrics.queue_parts.get_or_create(&CellLabels { cell: self.cell }).inc(),
            Err(mpsc::error::TrySendError::Full(_)) => return Err(QueueError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(QueueError::Closed),
        };
        // The sender dropped the part: the gateway stopped, maybe with its call in flight.
        Ok(answer.await.unwrap_or_else(|_| {
            let reason = "the gateway stopped with the part queued or in flight".to_string();
            Err(NodeError::OutcomeUnknown { cell: self.cell, reason })
        }))
    }
}

/// The sender of one queue.
#[derive(Clone)]
struct Sending {
    cell: CellId,
    cells: Arc<Cells>,
    retry_duration: Duration,
    metrics: Arc<GatewayMetrics>,
}

impl Sending {
    async fn run<E: CreateEvent>(self, mut receiver: mpsc::Receiver<Queued<E>>, slots: Arc<Semaphore>) {
        let queued = self.metrics.queue_parts.get_or_create(&CellLabels { cell: self.cell }).clone();
        // A part taken out that did not fit the last call: it starts the next.
        let mut left: Option<Queued<E>> = None;
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let first = match left.take() {
                Some(first) => first,
                None => match receiver.recv().await {
                    Some(first) => {
                        queued.dec();
                        first
                    }
                    None => return,
                },
            };
            let mut events = first.events.len();
            let mut batch = vec![first];
            while events < BATCH_EVENTS_MAX {
                let Ok(next) = receiver.try_recv() else { break };
                queued.dec();
                if events + next.events.len() > BATCH_EVENTS_MAX {
                    left = Some(next);
                    break;
                }
                events += next.events.len();
                batch.push(next);
            }
            let sending = self.clone();
            tokio::spawn(async move {
                sending.send(batch).await;
                drop(slot);
            });
        }
    }

    /// Sends the parts as one request and answers each.
    async fn send<E: CreateEvent>(&self, mut parts: Vec<Queued<E>>) {
        let deadline = Instant::now() + self.retry_duration;
        // Each round answers at least one part: at most `parts.len()` rounds.
        while !parts.is_empty() {
            let events: Vec<E> = parts.iter().flat_map(|part| part.events.iter().copied()).collect();
            self.metrics.batch_events.observe(events.len() as f64);
            self.metrics.batch_parts.observe(parts.len() as f64);
            let count = events.len();
            let answer = self.cells.call(self.cell, &E::request(events), deadline).await;
            match answer.and_then(|reply| results_of::<E>(self.cell, reply, count)) {
                Ok(results) => {
                    let mut results = results.into_iter();
                    for part in parts {
                        let mine: Vec<E::Result> = results.by_ref().take(part.events.len()).collect();
                        let _ = part.reply.send(Ok(mine));
                    }
                    return;
                }
                Err(error @ NodeError::Misrouted { account, .. }) if parts.len() > 1 => {
                    let (refused, others): (Vec<Queued<E>>, Vec<Queued<E>>) =
                        parts.into_iter().partition(|part| part.events.iter().any(|event| event.names(account)));
                    if refused.is_empty() {
                        // The cell named an account no part names: answer everyone with it.
                        others.into_iter().for_each(|part| drop(part.reply.send(Err(error.clone()))));
                        return;
                    }
                    refused.into_iter().for_each(|part| drop(part.reply.send(Err(error.clone()))));
                    parts = others;
                }
                Err(error) => {
                    parts.into_iter().for_each(|part| drop(part.reply.send(Err(error.clone()))));
                    return;
                }
            }
        }
    }
}

/// The results of a create request of `count` events in `reply`: one per
/// event, or the reply is unusable and the request's outcome unknown.
pub(super) fn results_of<E: CreateEvent>(
    cell: CellId,
    reply: Reply,
    count: usize,
) -> Result<Vec<E::Result>, NodeError> {
    match E::results(reply) {
        Some(results) if results.len() == count => Ok(results),
        other => Err(NodeError::OutcomeUnknown {
            cell,
            reason: format!(
                "the leader answered {} results to {count} {}",
                other.map_or_else(|| "no".to_string(), |results| results.len().to_string()),
                E::OPERATION
            ),
        }),
    }
}
