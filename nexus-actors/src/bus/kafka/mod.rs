//! `KafkaBridge`: the semantic bus (Kafka) as an actor.
//!
//! Producing is a message ([`Produce`]); the producer is idempotent,
//! waits for all in-sync replicas, and puts each record in a batch of its
//! own (see [`KafkaBridge::spawn`]). Consuming is a subscription
//! ([`Consume`]): records reach the subscriber with [`Link::ask`], one
//! record in flight per key (so per context, in order) while different keys
//! proceed side by side, and a partition's offset is stored for commit only
//! below its lowest record not yet acknowledged (at-least-once; see
//! [`consumer`]). A record that is not acknowledged (a [`Nack`] or a
//! panicking handler) is delivered again, before anything after it of its
//! key, until it is. [`Replay`]
//! reads a topic again from an offset or a timestamp without touching the
//! group's offsets. The trace context rides in the `traceparent` header.
//! What the bridge produces is also offered to this node's own reader of
//! the topic, if it asked ([`super::tap`]). This module does not interpret
//! payloads.

mod consumer;
mod locate;
mod replay;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde_json::Value;
use tokio::sync::oneshot;

pub use locate::{locate, Sought};

use super::tap::{Produced, Tap, Taps};
use super::{Bus, BusErrorKind};
use crate::envelope::Envelope;
use crate::kernel::{ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Message, Reply};
use crate::telemetry::TraceContext;

/// Commands for the LLM manager (keyed by context id). Every node expects
/// it; [`KafkaBridge::spawn`] creates it when missing.
pub const SEMANTIC_COMMANDS: &str = "semantic.commands";
/// What happened, tool calls included (keyed by context id). Every node
/// expects it; [`KafkaBridge::spawn`] creates it when missing.
pub const SEMANTIC_EVENTS: &str = "semantic.events";

/// How the bridge reaches the brokers.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`
    pub brokers: String,
    /// Partitions of topics the bridge creates.
    pub partitions: i32,
    /// How long a produce may wait for the broker before failing.
    pub produce_timeout: Duration,
}

impl KafkaConfig {
    /// `brokers` with 3 partitions per created topic and a 30 s produce timeout.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig { brokers: brokers.into(), partitions: 3, produce_timeout: Duration::from_secs(30) }
    }

    /// A client configuration for these brokers.
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers).set("broker.address.family", "v4").set("log_level", "4");
        // librdkafka waits up to 10 s between tries to reach a broker that
        // went away; records and commands would wait that long after it is
        // back. A second at most.
        c.set("reconnect.backoff.max.ms", "1000");
        c
    }

    /// A consumer of assigned partitions that commits nothing, under
    /// `group` (journal reads, offset lookups): short fetch waits, since
    /// its reads end at the partition's end.
    pub fn reader(&self, group: &str) -> ClientConfig {
        let mut c = self.client();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", "5");
        c
    }

    /// The producer settings of the Kafka bridge (and of the benchmarks'
    /// raw baselines, so that they compare like with like).
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.client();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            // One record per batch: tansu 0.6 answers a fetch that starts inside
            // a batch with nothing (the consumer then stalls at that offset) and
            // reports a partition's end as its last batch's base offset. With
            // single-record batches every offset is a batch start and the
            // watermark is exact; in-flight requests still pipeline.
            .set("batch.num.messages", "1");
        c
    }
}

/// Asks the brokers for their metadata, to tell whether Kafka can be
/// reached (the node's `/readyz`). One client, reused: it keeps its
/// connections between probes.
#[derive(Clone)]
pub struct KafkaProbe {
    client: Arc<rdkafka::consumer::BaseConsumer>,
}

impl KafkaProbe {
    /// A probe of `config`'s brokers; connects lazily.
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        Ok(KafkaProbe { client: Arc::new(config.client().create()?) })
    }

    /// Whether the brokers answered within `timeout`; why not otherwise.
    pub async fn probe(&self, timeout: Duration) -> Result<(), ProbeError> {
        let client = self.client.clone();
        let asked =
            tokio::task::spawn_blocking(move || client.fetch_metadata(None, Timeout::After(timeout)).map(|_| ()));
        asked.await.map_err(|e| ProbeError::Stopped(e.to_string()))?.map_err(ProbeError::Kafka)
    }
}

/// Why the brokers did not answer a [`KafkaProbe`].
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The brokers refused or did not answer in time.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The probe's thread ended before it had an answer (the node is stopping).
    #[error("the probe stopped: {0}")]
    Stopped(String),
}

/// A record delivered to a subscriber. Reply `Ok(())` to acknowledge it.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    /// The topic it was read from.
    pub topic: String,
    /// Its partition in the topic.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// The record key (the context id), UTF-8 lossily; `None` for an unkeyed record.
    pub key: Option<String>,
    /// The decoded payload; records that do not decode are counted and skipped.
    pub envelope: Envelope<Value>,
    /// From the `traceparent`/`tracestate` headers.
    pub trace: TraceContext,
}

/// The subscriber did not process a record; it will be delivered again.
#[derive(Debug, Clone, thiserror::Error)]
#[error("record not acknowledged: {0}")]
pub struct Nack(pub String);

impl Message for KafkaRecord {
    type Reply = Result<(), Nack>;

    fn trace_context(&self) -> Option<TraceContext> {
        Some(self.trace.clone())
    }
}

/// Where a produced record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The partition the broker put it in.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
}

/// A produce that failed; the envelope is handed back.
#[derive(Debug, thiserror::Error)]
#[error("kafka produce to {topic} failed: {source}")]
pub struct ProduceError {
    /// Where it was to go.
    pub topic: String,
    /// What was not produced.
    pub envelope: Envelope,
    /// Why: refused by the broker, or not acknowledged within the produce timeout.
    pub source: KafkaError,
}

/// Produces `envelope` to `topic`, keyed by `key` (the context id: records
/// with one key keep their order).
pub struct Produce {
    /// Where.
    pub topic: String,
    /// The record key: the context id.
    pub key: String,
    /// What; its trace context also goes into the record's headers.
    pub envelope: Envelope,
}

impl Message for Produce {
    type Reply = Result<Delivered, ProduceError>;
}

/// Starts a consumer in group `group` on `topics`, delivering to `subscriber`.
pub struct Consume {
    /// The consumer group: its committed offsets say where consuming resumes.
    pub group: String,
    /// The topics to consume.
    pub topics: Vec<String>,
    /// Who receives the records and acknowledges each.
    pub subscriber: Link<KafkaRecord>,
}

/// Identifies a running consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsumerId(u64);

impl Message for Consume {
    type Reply = Result<ConsumerId, KafkaError>;
}

/// Stops a consumer after the record in hand; stored offsets are committed.
pub struct StopConsumer(pub ConsumerId);

impl Message for StopConsumer {
    type Reply = ();
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy)]
pub enum ReplayFrom {
    /// This offset in every partition (clamped to what the broker holds).
    Offset(i64),
    /// The first record at or after this time (milliseconds since the epoch).
    Timestamp(i64),
}

/// Delivers the records of `topic` from `from` up to the end the topic had
/// when the replay started; replies with how many were delivered. Group
/// offsets are untouched.
pub struct Replay {
    /// The topic to read again, every partition of it.
    pub topic: String,
    /// Where to start.
    pub from: ReplayFrom,
    /// Who receives the records; each is delivered until acknowledged.
    pub subscriber: Link<KafkaRecord>,
}

impl Message for Replay {
    type Reply = Result<u64, KafkaError>;
}

type Consumers = Arc<Mutex<HashMap<ConsumerId, (oneshot::Sender<()>, oneshot::Receiver<()>)>>>;

/// The bridge between Kafka and the mailbox graph.
pub struct KafkaBridge {
    kernel: Kernel,
    /// Shared with each produce, which needs it only to look a record up.
    config: Arc<KafkaConfig>,
    producer: FutureProducer,
    consumers: Consumers,
    next_consumer: u64,
    taps: Taps,
}

impl KafkaBridge {
    /// The actor kind of the bridge in the mailbox graph.
    pub const KIND: &'static str = "kafka_bridge";

    /// Creates the semantic topics if missing, then spawns the bridge.
    pub async fn spawn(
        kernel: &Kernel,
        arbiter: &actix::ArbiterHandle,
        config: KafkaConfig,
    ) -> Result<ActorRef<KafkaBridge>, KafkaError> {
        ensure_topics(&config, &[SEMANTIC_COMMANDS, SEMANTIC_EVENTS]).await?;
        let producer: FutureProducer =
            config.producer().set("message.timeout.ms", config.produce_timeout.as_millis().to_string()).create()?;
        let metrics = kernel.metrics();
        for topic in [SEMANTIC_COMMANDS, SEMANTIC_EVENTS] {
            // Present from the start, so dashboards see zeros, not gaps.
            metrics.bus_published.with_label_values(&[Bus::Kafka.as_str(), topic]);
            metrics.bus_received.with_label_values(&[Bus::Kafka.as_str(), topic]);
        }
        for kind in [BusErrorKind::Produce, BusErrorKind::OffsetUnknown] {
            metrics.bus_errors.with_label_values(&[Bus::Kafka.as_str(), kind.as_str()]);
        }
        let consumers: Consumers = Arc::default();
        let taps = Taps::default();
        let config = Arc::new(config);
        let k = kernel.clone();
        Ok(kernel.spawn_on(arbiter, "kafka-bridge", move || KafkaBridge {
            kernel: k.clone(),
            config: config.clone(),
            producer: producer.clone(),
            consumers: consumers.clone(),
            next_consumer: 0,
            taps: taps.clone(),
        }))
    }
}

/// Creates `topics` with the configured partition count unless they exist.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = config.client().create()?;
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(15))?;
    let existing: Vec<&str> = metadata.topics().iter().filter(|t| t.error().is_none()).map(|t| t.name()).collect();
    let new: Vec<NewTopic> = topics
        .iter()
        .filter(|t| !existing.contains(t))
        .map(|t| NewTopic::new(t, config.partitions, TopicReplication::Fixed(1)))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(15)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(topic) => tracing::info!(topic, "created kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                tracing::error!(topic, ?code, "could not create kafka topic");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(())
}

impl Behaviour for KafkaBridge {
    const KIND: &'static str = KafkaBridge::KIND;
}

impl Handler<Produce> for KafkaBridge {
    fn handle(&mut self, msg: Produce, _ctx: &mut Ctx<Self>) -> Reply<Result<Delivered, ProduceError>> {
        let producer = self.producer.clone();
        let metrics = self.kernel.metrics().clone();
        let timeout = self.config.produce_timeout;
        let taps = self.taps.clone();
        let config = self.config.clone();
        Reply::later(async move {
            let payload = msg.envelope.encode();
            let mut headers =
                OwnedHeaders::new().insert(Header { key: "content-type", value: Some("application/cloudevents+json") });
            if let Some(tp) = &msg.envelope.traceparent {
                headers = headers.insert(Header { key: "traceparent", value: Some(tp.as_str()) });
            }
            if let Some(ts) = &msg.envelope.tracestate {
                headers = headers.insert(Header { key: "tracestate", value: Some(ts.as_str()) });
            }
            let record = FutureRecord::to(&msg.topic).key(&msg.key).payload(&payload).headers(headers);
            match producer.send(record, Timeout::After(timeout)).await {
                Ok(delivery) => {
                    metrics.bus_published.with_label_values(&[Bus::Kafka.as_str(), &msg.topic]).inc();
                    let offset = match delivery.offset {
                        unknown if unknown < 0 => {
                            let sought = Sought {
                                topic: msg.topic.clone(),
                                partition: delivery.partition,
                                key: msg.key.clone(),
                                id: msg.envelope.id.clone(),
                            };
                            located(&config, sought, &metrics).await
                        }
                        offset => offset,
                    };
                    taps.offer(Produced {
                        topic: msg.topic,
                        partition: delivery.partition,
                        offset,
                        key: msg.key,
                        bytes: payload.len(),
                        envelope: msg.envelope,
                    });
                    Ok(Delivered { partition: delivery.partition, offset })
                }
                Err((source, _)) => {
                    metrics.bus_error(Bus::Kafka, BusErrorKind::Produce, &source);
                    Err(ProduceError { topic: msg.topic, envelope: msg.envelope, source })
                }
            }
        })
    }
}

/// The offset of a record the broker acknowledged without one, looked
/// for on its partition's tail; -1 (and counted) when it is not found.
async fn located(config: &KafkaConfig, sought: Sought, metrics: &crate::telemetry::Metrics) -> i64 {
    let (topic, partition, id) = (sought.topic.clone(), sought.partition, sought.id.clone());
    match locate(config, sought).await {
        Ok(Some(offset)) => {
            tracing::info!(topic, partition, offset, id, "kafka: a record acknowledged without its offset was found");
            offset
        }
        Ok(None) => {
            let error = format!("{topic}/{partition}: record {id} acknowledged without an offset and not found");
            metrics.bus_error(Bus::Kafka, BusErrorKind::OffsetUnknown, &error);
            -1
        }
        Err(error) => {
            metrics.bus_error(Bus::Kafka, BusErrorKind::OffsetUnknown, &error);
            -1
        }
    }
}

impl Handler<Tap> for KafkaBridge {
    fn handle(&mut self, msg: Tap, _ctx: &mut Ctx<Self>) -> Reply<tokio::sync::mpsc::Receiver<Produced>> {
        Reply::Now(self.taps.open(msg.topic))
    }
}

impl Handler<Consume> for KafkaBridge {
    fn handle(&mut self, msg: Consume, _ctx: &mut Ctx<Self>) -> Reply<Result<ConsumerId, KafkaError>> {
        let consumer: consumer::GroupConsumer = match self
            .config
            .client()
            .set("group.id", &msg.group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "500")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            // A broker may hold a fetch for the whole wait even when records
            // are there (tansu does): a short wait keeps delivery latency low.
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            .create_with_context(consumer::Revocations::default())
        {
            Ok(c) => c,
            Err(e) => return Reply::Now(Err(e)),
        };
        let topics: Vec<&str> = msg.topics.iter().map(String::as_str).collect();
        if let Err(e) = consumer.subscribe(&topics) {
            return Reply::Now(Err(e));
        }
        self.next_consumer += 1;
        let id = ConsumerId(self.next_consumer);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        self.consumers.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (stop_tx, done_rx));
        let metrics = self.kernel.metrics().clone();
        let consumers = self.consumers.clone();
        actix::spawn(async move {
            consumer::run_consumer(consumer, msg.subscriber, stop_rx, metrics).await;
            consumers.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            let _ = done_tx.send(());
        });
        Reply::Now(Ok(id))
    }
}

impl Handler<StopConsumer> for KafkaBridge {
    fn handle(&mut self, msg: StopConsumer, _ctx: &mut Ctx<Self>) -> Reply<()> {
        let entry = self.consumers.lock().unwrap_or_else(|e| e.into_inner()).remove(&msg.0);
        match entry {
            Some((stop, done)) => {
                let _ = stop.send(());
                Reply::later(async move {
                    let _ = done.await;
                })
            }
            None => Reply::Now(()),
        }
    }
}

impl Handler<Replay> for KafkaBridge {
    fn handle(&mut self, msg: Replay, _ctx: &mut Ctx<Self>) -> Reply<Result<u64, KafkaError>> {
        let config = KafkaConfig::clone(&self.config);
        let metrics = self.kernel.metrics().clone();
        Reply::later(replay::replay(config, msg, metrics))
    }
}

/// Longest time a fetch waits at the broker for records.
pub const FETCH_WAIT_MS: &str = "100";
