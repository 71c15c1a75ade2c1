//! `Recorder`: a node's tool call records (`nexus.tool.called`,
//! `nexus.tool.finished`) on `semantic.events`, produced off the caller's
//! path.
//!
//! A call hands its records to one bounded queue and goes on; it never
//! waits for Kafka. One task takes them in order and keeps up to
//! [`IN_FLIGHT`] produces going at once through the Kafka bridge, whose
//! idempotent producer keeps their order per partition. A produce that
//! fails (the broker is away for longer than the produce timeout) is tried
//! again, with backoff, until the broker takes it: a broker restart delays
//! records, it does not lose them. A record the broker can never take (too
//! large, refused as invalid or unauthorised) is dropped at once, so it
//! cannot hold up the records behind it; so are new records when the queue
//! is full. Both are counted in `nexus_tool_records_dropped_total` (none is
//! expected: the queue holds minutes of calls). Order per context holds
//! unless a produce fails: its retry may land after later records. This
//! module does not build the records.

use std::time::Duration;

use futures::future::LocalBoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::mpsc;

use crate::bus::kafka::{Produce, SEMANTIC_EVENTS};
use crate::bus::{Backoff, Bus, BusErrorKind};
use crate::envelope::Envelope;
use crate::kernel::{AskError, Link};
use crate::telemetry::Metrics;

/// Records waiting for the Kafka bridge; past this new ones are dropped.
pub const QUEUE: usize = 16 * 1024;
/// Produces the recorder keeps going at once.
pub const IN_FLIGHT: usize = 256;

/// The handle calls record through. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    queue: mpsc::Sender<(String, Envelope)>,
    metrics: Metrics,
}

impl Recorder {
    /// Starts the recorder's task on the current arbiter; it produces
    /// through `kafka` and ends when every handle is gone and the queue is
    /// empty, or when the bridge stops.
    pub fn spawn(kafka: Link<Produce>, metrics: &Metrics) -> Self {
        let (queue, records) = mpsc::channel(QUEUE);
        actix::spawn(run(records, kafka, metrics.clone()));
        Recorder { queue, metrics: metrics.clone() }
    }

    /// Queues `envelope` for `semantic.events` under `key` (the context id,
    /// or the call id for a call outside a context).
    pub fn record(&self, key: String, envelope: Envelope) {
        if let Err(error) = self.queue.try_send((key, envelope)) {
            self.metrics.tool_records_dropped.inc();
            let reason = match error {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "recorder stopped",
            };
            tracing::warn!(reason, "nexus_tool_records_dropped_total");
        }
    }
}

async fn run(mut records: mpsc::Receiver<(String, Envelope)>, kafka: Link<Produce>, metrics: Metrics) {
    let mut in_flight: FuturesOrdered<LocalBoxFuture<'static, bool>> = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some(produced) = in_flight.next(), if !in_flight.is_empty() => {
                if !produced {
                    tracing::warn!("the kafka bridge stopped; tool records are no longer produced");
                    return;
                }
            }
            next = records.recv(), if in_flight.len() < IN_FLIGHT => match next {
                Some((key, envelope)) => in_flight.push_back(Box::pin(produce_until_taken(&kafka, key, envelope, &metrics))),
                None => break,
            },
        }
    }
    while in_flight.next().await.is_some() {}
}

/// Produces until the broker takes the record; false when the bridge is gone.
fn produce_until_taken(
    kafka: &Link<Produce>,
    key: String,
    envelope: Envelope,
    metrics: &Metrics,
) -> impl std::future::Future<Output = bool> + 'static {
    let (kafka, metrics) = (kafka.clone(), metrics.clone());
    async move {
        let mut backoff = Backoff::new();
        loop {
            // A copy per attempt: the bridge keeps what it is sent, also when
            // it panics on it.
            let produce = Produce { topic: SEMANTIC_EVENTS.to_owned(), key: key.clone(), envelope: envelope.clone() };
            match kafka.ask(produce).await {
                Ok(Ok(_)) => return true,
                Ok(Err(error)) if never_taken(&error.source) => {
                    metrics.bus_error(Bus::Kafka, BusErrorKind::ToolRecord, &error);
                    metrics.tool_records_dropped.inc();
                    tracing::warn!(reason = %error.source, "nexus_tool_records_dropped_total");
                    return true;
                }
                Ok(Err(error)) => metrics.bus_error(Bus::Kafka, BusErrorKind::ToolRecord, &error),
                Err(AskError::Panicked(panicked)) => metrics.bus_error(Bus::Kafka, BusErrorKind::ToolRecord, &panicked),
                Err(AskError::Closed(_) | AskError::Dropped) => return false,
            }
            actix::clock::sleep(backoff.next_delay().max(Duration::from_millis(100))).await;
        }
    }
}

/// Whether the broker (or the producer) will refuse the record however
/// often it is sent.
fn never_taken(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | InvalidMessage
                | InvalidRecord
                | InvalidTopic
                | TopicAuthorizationFailed
                | ClusterAuthorizationFailed
        )
    )
}
