//! The bridge's group consumer ([`Consume`](super::Consume)).
//!
//! Records reach the subscriber with [`Link::ask`]. Records of one key in
//! one partition (one context) go one at a time, in the order of their
//! offsets, each only after the one before it was acknowledged; records of
//! other keys, in the same partition too, are in flight beside them, so a
//! slow context holds up only itself. Acknowledgements are folded into one
//! stored offset per partition: the offset below the partition's lowest
//! record not yet acknowledged, which auto-commit sends to the broker
//! (at-least-once: a restart delivers again what was acknowledged above
//! it, never skips what was not). When the group takes a partition away,
//! what the consumer holds of it is forgotten (records not yet started are
//! not delivered, late acknowledgements store nothing): its next owner
//! starts from the committed offset. This module does not interpret
//! payloads.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientContext, Message as _};
use tokio::sync::oneshot;

use super::KafkaRecord;
use crate::bus::{Backoff, Bus, BusErrorKind};
use crate::envelope::Envelope;
use crate::kernel::{lock, AskError, Link};
use crate::telemetry::Metrics;

/// Records read and not yet stored, across all partitions and keys: those
/// waiting or in flight, and those acknowledged above a partition's lowest
/// open record. Past it the consumer stops reading until that record is
/// done, so one stuck record cannot make the window grow without bound.
pub(super) const MAX_HELD: usize = 1024;
/// How long a stopping consumer waits for the records already in flight.
const STOP_DRAIN: Duration = Duration::from_secs(10);

/// A topic partition.
type PartitionKey = (String, i32);

/// The consumer's client context: notes the partitions a rebalance takes
/// away, for the consumer's task to forget (librdkafka calls it from the
/// task's own poll).
#[derive(Default)]
pub(super) struct Revocations {
    revoked: Mutex<Vec<PartitionKey>>,
}

impl Revocations {
    fn take(&self) -> Vec<PartitionKey> {
        std::mem::take(&mut *lock(&self.revoked))
    }
}

impl ClientContext for Revocations {}

impl ConsumerContext for Revocations {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let revoked =
                partitions.elements().iter().map(|p| (p.topic().to_owned(), p.partition())).collect::<Vec<_>>();
            lock(&self.revoked).extend(revoked);
        }
    }
}

/// The bridge's group consumer.
pub(super) type GroupConsumer = StreamConsumer<Revocations>;

/// The records that must keep their order: one key in one partition. The
/// unkeyed records of a partition share one lane.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Lane {
    topic: String,
    partition: i32,
    key: Option<String>,
}

impl Lane {
    fn of(record: &KafkaRecord) -> Self {
        Lane { topic: record.topic.clone(), partition: record.partition, key: record.key.clone() }
    }
}

/// The consumer's bookkeeping, without I/O: which records wait for their
/// lane, and how far each partition is done.
#[derive(Default)]
pub(super) struct Lanes {
    /// Per partition: the offsets read and not yet stored, ascending, each
    /// with whether it is done (acknowledged, or skipped as undecodable).
    windows: HashMap<PartitionKey, VecDeque<(i64, bool)>>,
    /// Per partition: the highest offset read. A fetch that starts lower
    /// again while the partition's window holds records (a rebalance that
    /// gave the partition back) brings records this consumer holds or
    /// handed over; they are not taken twice. With nothing held, a lower
    /// offset is taken as a rewind (a topic made anew).
    read: HashMap<PartitionKey, i64>,
    /// Per lane with a record in flight: the records waiting behind it.
    lanes: HashMap<Lane, VecDeque<KafkaRecord>>,
    /// Records in the windows: read and not yet stored.
    held: usize,
}

/// What to do with a record read from the broker.
// Delivering is the common case; boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Taken {
    /// Its lane was free: deliver it now.
    Deliver(KafkaRecord),
    /// It waits behind its lane's record in flight.
    Queued,
    /// This consumer already read it.
    Repeated,
}

impl Lanes {
    /// Records read and not yet stored.
    pub(super) fn held(&self) -> usize {
        self.held
    }

    /// Takes a decoded record read from the broker.
    pub(super) fn push(&mut self, record: KafkaRecord) -> Taken {
        if !self.read_next(&record.topic, record.partition, record.offset, false) {
            return Taken::Repeated;
        }
        match self.lanes.entry(Lane::of(&record)) {
            Entry::Occupied(mut waiting) => {
                waiting.get_mut().push_back(record);
                Taken::Queued
            }
            Entry::Vacant(free) => {
                free.insert(VecDeque::new());
                Taken::Deliver(record)
            }
        }
    }

    /// Takes a record that cannot be decoded: it is done as soon as it is
    /// read (it would block its lane forever). Returns the offset to store,
    /// when its partition's done prefix grew.
    pub(super) fn skip(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        if !self.read_next(topic, partition, offset, true) {
            return None;
        }
        self.advance(&(topic.to_owned(), partition))
    }

    /// The record at `offset` in `lane` was acknowledged. Returns the
    /// offset to store, when its partition's done prefix grew, and the
    /// lane's next record to deliver, if one waits.
    pub(super) fn acked(&mut self, lane: &Lane, offset: i64) -> (Option<i64>, Option<KafkaRecord>) {
        let partition = (lane.topic.clone(), lane.partition);
        if let Some(window) = self.windows.get_mut(&partition) {
            if let Ok(i) = window.binary_search_by_key(&offset, |(o, _)| *o) {
                window[i].1 = true;
            }
        }
        let store = self.advance(&partition);
        let next = self.lanes.get_mut(lane).and_then(VecDeque::pop_front);
        if next.is_none() {
            self.lanes.remove(lane);
        }
        (store, next)
    }

    /// Notes `offset` as read in its partition's window; false when it was
    /// read before.
    fn read_next(&mut self, topic: &str, partition: i32, offset: i64, done: bool) -> bool {
        let key = (topic.to_owned(), partition);
        let holding = self.windows.get(&key).is_some_and(|w| !w.is_empty());
        let read = self.read.entry(key.clone()).or_insert(i64::MIN);
        if offset <= *read && holding {
            return false;
        }
        *read = offset;
        self.windows.entry(key).or_default().push_back((offset, done));
        self.held += 1;
        true
    }

    /// Forgets what is held of a partition the group took away: its window,
    /// its highest offset read and its records not yet started. Records in
    /// flight finish, but their acknowledgements store nothing.
    pub(super) fn forget(&mut self, partition: &PartitionKey) {
        if let Some(window) = self.windows.remove(partition) {
            self.held -= window.len();
        }
        self.read.remove(partition);
        self.lanes.retain(|lane, _| (lane.topic.as_str(), lane.partition) != (partition.0.as_str(), partition.1));
    }

    /// Drops the done prefix of a partition's window; the last offset in
    /// it is the one to store.
    fn advance(&mut self, partition: &PartitionKey) -> Option<i64> {
        let window = self.windows.get_mut(partition)?;
        let mut last = None;
        while let Some(&(offset, true)) = window.front() {
            window.pop_front();
            self.held -= 1;
            last = Some(offset);
        }
        if window.is_empty() {
            self.windows.remove(partition);
        }
        last
    }
}

/// A delivery in flight: its lane, offset, and whether it was acknowledged.
type Delivery = LocalBoxFuture<'static, (Lane, i64, bool)>;

struct Deliveries<'c> {
    consumer: &'c GroupConsumer,
    subscriber: Link<KafkaRecord>,
    metrics: Metrics,
    lanes: Lanes,
    in_flight: FuturesUnordered<Delivery>,
}

impl Deliveries<'_> {
    fn start(&mut self, lane: Lane, record: KafkaRecord) {
        let (subscriber, metrics) = (self.subscriber.clone(), self.metrics.clone());
        self.in_flight.push(Box::pin(async move {
            let offset = record.offset;
            let acked = deliver_until_acked(&subscriber, record, &metrics).await;
            (lane, offset, acked)
        }));
    }

    fn read(&mut self, msg: &BorrowedMessage<'_>) {
        self.metrics.bus_received.with_label_values(&[Bus::Kafka.as_str(), msg.topic()]).inc();
        match to_record(msg) {
            Ok(record) => match self.lanes.push(record) {
                Taken::Deliver(record) => self.start(Lane::of(&record), record),
                Taken::Queued => {}
                Taken::Repeated => {
                    tracing::debug!(
                        topic = msg.topic(),
                        partition = msg.partition(),
                        offset = msg.offset(),
                        "kafka record read again; skipped"
                    );
                }
            },
            Err(error) => {
                let at = format!("{}/{}@{}", msg.topic(), msg.partition(), msg.offset());
                self.metrics.bus_error(Bus::Kafka, BusErrorKind::Decode, &format_args!("{at}: {error}"));
                let stored = self.lanes.skip(msg.topic(), msg.partition(), msg.offset());
                self.store(msg.topic(), msg.partition(), stored);
            }
        }
    }

    /// Handles a finished delivery; starts the lane's next record unless
    /// the consumer is draining.
    fn finished(&mut self, lane: Lane, offset: i64, draining: bool) {
        let (stored, next) = self.lanes.acked(&lane, offset);
        self.store(&lane.topic, lane.partition, stored);
        if let (Some(next), false) = (next, draining) {
            self.start(lane, next);
        }
    }

    fn store(&self, topic: &str, partition: i32, offset: Option<i64>) {
        let Some(offset) = offset else { return };
        // librdkafka commits `offset + 1`, the next one to read.
        if let Err(error) = self.consumer.store_offset(topic, partition, offset) {
            self.metrics.bus_error(Bus::Kafka, BusErrorKind::StoreOffset, &error);
        }
    }
}

pub(super) async fn run_consumer(
    consumer: GroupConsumer,
    subscriber: Link<KafkaRecord>,
    mut stop: oneshot::Receiver<()>,
    metrics: Metrics,
) {
    let mut d = Deliveries {
        consumer: &consumer,
        subscriber,
        metrics: metrics.clone(),
        lanes: Lanes::default(),
        in_flight: FuturesUnordered::new(),
    };
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some((lane, offset, acked)) = d.in_flight.next(), if !d.in_flight.is_empty() => {
                if !acked {
                    tracing::warn!(subscriber = d.subscriber.to(), "kafka subscriber stopped; consumer stops");
                    break;
                }
                d.finished(lane, offset, false);
            }
            received = consumer.recv(), if d.lanes.held() < MAX_HELD => match received {
                Ok(msg) => {
                    for partition in consumer.context().take() {
                        d.lanes.forget(&partition);
                    }
                    d.read(&msg);
                }
                Err(error) => {
                    metrics.bus_error(Bus::Kafka, BusErrorKind::Consume, &error);
                    actix::clock::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    // Let the records in flight finish so their offsets are committed too.
    let drain = async {
        while let Some((lane, offset, acked)) = d.in_flight.next().await {
            if acked {
                d.finished(lane, offset, true);
            }
        }
    };
    let _ = tokio::time::timeout(STOP_DRAIN, drain).await;
    drop(d);
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing stored since the last commit is not an error worth counting.
        if !matches!(error, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
            metrics.bus_error(Bus::Kafka, BusErrorKind::Commit, &error);
        }
    }
}

/// Delivers until the subscriber acknowledges; false when it is gone.
pub(super) async fn deliver_until_acked(
    subscriber: &Link<KafkaRecord>,
    record: KafkaRecord,
    metrics: &Metrics,
) -> bool {
    let mut backoff = Backoff::new();
    loop {
        let reason = match subscriber.ask(record.clone()).await {
            Ok(Ok(())) => return true,
            Ok(Err(nack)) => nack.0,
            Err(AskError::Panicked(p)) => p.to_string(),
            Err(AskError::Closed(_) | AskError::Dropped) => return false,
        };
        metrics.bus_redelivered.with_label_values(&[Bus::Kafka.as_str(), &record.topic]).inc();
        tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset, %reason, "nexus_bus_redelivered_total");
        actix::clock::sleep(backoff.next_delay()).await;
    }
}

pub(super) fn to_record(msg: &BorrowedMessage<'_>) -> Result<KafkaRecord, crate::envelope::DecodeError> {
    let envelope = Envelope::decode(msg.payload().unwrap_or_default())?;
    let mut trace = envelope.trace_context();
    if let Some(headers) = msg.headers() {
        for header in headers.iter() {
            let value = header.value.and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned);
            match header.key {
                "traceparent" => trace.traceparent = value,
                "tracestate" => trace.tracestate = value,
                _ => {}
            }
        }
    }
    Ok(KafkaRecord {
        topic: msg.topic().to_owned(),
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        envelope,
        trace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::TraceContext;

    fn record(partition: i32, offset: i64, key: &str) -> KafkaRecord {
        KafkaRecord {
            topic: "t".into(),
            partition,
            offset,
            key: Some(key.into()),
            envelope: Envelope::with_type("nexus.test", "test", serde_json::json!({})),
            trace: TraceContext::default(),
        }
    }

    fn delivered(taken: Taken) -> i64 {
        match taken {
            Taken::Deliver(r) => r.offset,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    #[test]
    fn keys_of_one_partition_run_side_by_side_and_each_key_keeps_its_order() {
        let mut lanes = Lanes::default();
        assert_eq!(delivered(lanes.push(record(0, 10, "a"))), 10);
        assert_eq!(delivered(lanes.push(record(0, 11, "b"))), 11, "another key does not wait for a");
        assert!(matches!(lanes.push(record(0, 12, "a")), Taken::Queued), "a's next waits for a's first");
        assert_eq!(delivered(lanes.push(record(1, 10, "a"))), 10, "the same key in another partition is another lane");
        assert_eq!(lanes.held(), 4);

        let a = Lane::of(&record(0, 0, "a"));
        let b = Lane::of(&record(0, 0, "b"));
        // b's record is acknowledged first: 10 is still open, nothing to store.
        assert_eq!(lanes.acked(&b, 11).0, None);
        let (stored, next) = lanes.acked(&a, 10);
        assert_eq!(stored, Some(11), "the done prefix now ends at 11");
        assert_eq!(next.map(|r| r.offset), Some(12), "a's queued record comes next");
        let (stored, next) = lanes.acked(&a, 12);
        assert_eq!((stored, next.is_none()), (Some(12), true));
        assert_eq!(lanes.held(), 1);
    }

    #[test]
    fn the_stored_offset_stays_below_the_lowest_unacknowledged_record() {
        let mut lanes = Lanes::default();
        for (offset, key) in [(0, "a"), (1, "b"), (2, "c"), (3, "d")] {
            delivered(lanes.push(record(0, offset, key)));
        }
        let lane = |k: &str| Lane::of(&record(0, 0, k));
        assert_eq!(lanes.acked(&lane("d"), 3).0, None);
        assert_eq!(lanes.acked(&lane("b"), 1).0, None);
        assert_eq!(lanes.held(), 4, "acknowledged above an open record still counts against the bound");
        assert_eq!(lanes.acked(&lane("a"), 0).0, Some(1), "2 is still open");
        assert_eq!(lanes.acked(&lane("c"), 2).0, Some(3));
        assert_eq!(lanes.held(), 0);
        assert!(lanes.windows.is_empty() && lanes.lanes.is_empty(), "nothing is kept once done");
    }

    #[test]
    fn a_partition_taken_away_is_forgotten_and_its_late_acknowledgements_store_nothing() {
        let mut lanes = Lanes::default();
        delivered(lanes.push(record(0, 10, "a")));
        assert!(matches!(lanes.push(record(0, 11, "a")), Taken::Queued));
        delivered(lanes.push(record(1, 3, "a")));
        lanes.forget(&("t".to_owned(), 0));
        assert_eq!(lanes.held(), 1, "only partition 1's record is held");
        let (stored, next) = lanes.acked(&Lane::of(&record(0, 0, "a")), 10);
        assert_eq!((stored, next.map(|r| r.offset)), (None, None), "nothing stored, the queued record is not started");
        assert_eq!(
            delivered(lanes.push(record(0, 10, "a"))),
            10,
            "given back, it is read from the committed offset again"
        );
    }

    #[test]
    fn undecodable_and_repeated_records_neither_block_nor_run_twice() {
        let mut lanes = Lanes::default();
        delivered(lanes.push(record(0, 5, "a")));
        assert_eq!(lanes.skip("t", 0, 6), None, "5 is still open");
        assert!(matches!(lanes.push(record(0, 5, "a")), Taken::Repeated));
        assert_eq!(lanes.skip("t", 0, 6), None, "a repeated garbage record is not counted again");
        assert_eq!(lanes.held(), 2);
        assert_eq!(lanes.acked(&Lane::of(&record(0, 0, "a")), 5).0, Some(6), "the skipped record is done too");
        assert_eq!(lanes.skip("t", 0, 7), Some(7));
        assert_eq!(lanes.held(), 0);
        // Nothing held: a lower offset is a rewind (the topic was made anew), not a repeat.
        assert_eq!(delivered(lanes.push(record(0, 0, "a"))), 0);
    }
}
