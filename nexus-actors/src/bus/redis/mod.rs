//! `RedisBridge`: the transactional bus (Redis pub/sub) as an actor.
//!
//! Actors subscribe to a channel or a pattern by message and receive
//! [`BusEvent`]s in their mailbox. Publishing goes through the
//! [`Publisher`] handed out at spawn, from the caller's own task (see
//! [`publisher`]). The bridge owns the pub/sub connection; publishers hold
//! connections of their own, one per thread. When the
//! pub/sub connection drops it tells every subscriber [`BusDown`],
//! reconnects with backoff, re-subscribes everything and tells them
//! [`BusUp`] so they can resync from state. A subscriber that comes while
//! the bridge is connecting is told [`BusDown`] at once and [`BusUp`] once
//! its topic is subscribed too: connecting never holds the mailbox.
//! Delivery is at-most-once and uses
//! `try_tell`: a subscriber with a full mailbox loses the message (counted
//! in `nexus_mailbox_dropped_total`) and must resync, never stalling others.
//! The subscription table outlives restarts of the bridge itself.
//!
//! The table holds a topic only while some live actor wants it: the last
//! link going (by [`Unsubscribe`], or found closed on delivery, on a
//! broadcast or by the periodic sweep) drops the topic and unsubscribes it
//! on Redis, so neither the node nor Redis keeps what nobody follows
//! (`nexus_redis_subscriptions` counts the topics held). After a reconnect
//! every topic comes back in chunks of [`RESUBSCRIBE_CHUNK`] per command,
//! all sent at once: ten thousand topics cost ten commands, not ten
//! thousand round trips.
//!
//! Subscription commands are handed to the connection in the order the
//! bridge handles the messages, so a `SUBSCRIBE` and the `UNSUBSCRIBE` that
//! follows it cannot swap places on the wire.
//!
//! A bridge given a Redis Cluster ([`RedisBridge::spawn_with_cluster`])
//! carries [`Topic::Shard`] channels there with sharded pub/sub
//! ([`shards`]); everything else stays on the one Redis of `url`, whose
//! connection is [`plain`]'s.

mod plain;
mod publisher;
mod shards;
mod table;

pub use publisher::{PublishError, Publisher, MAX_PUBLISHES_IN_FLIGHT};
pub(crate) use shards::RESPONSE_TIMEOUT as CLUSTER_RESPONSE_TIMEOUT;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use actix::AsyncContext;
use futures::future::LocalBoxFuture;
use futures::FutureExt;
use redis::aio::PubSubSink;

use super::{Backoff, Bus, BusDown, BusErrorKind, BusEvent, BusMessage, BusUp};
use crate::envelope::Envelope;
use crate::kernel::{lock, ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Message, Reply};
use crate::telemetry::Metrics;
use table::Table;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Channels (or patterns) per `SUBSCRIBE` (`PSUBSCRIBE`, `UNSUBSCRIBE`)
/// command when the bridge changes many at once: one round trip each.
pub const RESUBSCRIBE_CHUNK: usize = 1000;

/// How often the table is swept for links to actors that stopped without
/// unsubscribing (a crashed actor, a task that outlived its session).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// One channel, as Redis `SUBSCRIBE` takes it.
    Channel(String),
    /// A glob pattern, as Redis `PSUBSCRIBE` takes it.
    Pattern(String),
    /// A channel whose traffic should stay on one shard (a document's):
    /// with a Redis Cluster it is subscribed with `SSUBSCRIBE` on the
    /// master of its hash slot and published with
    /// [`Publisher::publish_shard`] (`SPUBLISH`); on one Redis it is a
    /// plain [`Topic::Channel`].
    Shard(String),
}

impl Topic {
    /// Whether this is a [`Topic::Shard`].
    pub fn is_shard(&self) -> bool {
        matches!(self, Topic::Shard(_))
    }

    fn shard_channel(&self) -> Option<&str> {
        match self {
            Topic::Shard(c) => Some(c),
            _ => None,
        }
    }
}

/// Why Redis did not confirm a subscription. The topic stays in the
/// table: the reconnection that follows subscribes it.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The command failed.
    #[error("redis subscribe failed: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Subscribes `subscriber` to `topic`. The subscriber receives [`BusUp`]
/// once the subscription is live: at once when Redis is connected, else on
/// (re)connection, after a [`BusDown`] that tells it the bus is down now.
/// Replies after Redis confirmed it (also when others already follow the
/// topic), or at once while the bus is down.
pub struct Subscribe {
    /// The channel or pattern.
    pub topic: Topic,
    /// Who receives its messages.
    pub subscriber: Link<BusEvent>,
}

impl Message for Subscribe {
    type Reply = Result<(), SubscribeError>;
}

/// Removes the subscription of the actor with id `subscriber` to `topic`;
/// the last one unsubscribes the topic on Redis.
pub struct Unsubscribe {
    /// The channel or pattern.
    pub topic: Topic,
    /// The subscriber's actor id.
    pub subscriber: String,
}

impl Message for Unsubscribe {
    type Reply = ();
}

/// Delivery found every link of these topics closed and dropped them from
/// the table; the bridge unsubscribes those still absent.
struct Emptied(Vec<Topic>);

impl Message for Emptied {
    type Reply = ();
}

type Subscriptions = Arc<Mutex<Table>>;

/// A spawned bridge: the actor to subscribe with, and the handle to
/// publish with.
#[derive(Clone)]
pub struct RedisBus {
    /// The bridge: send it [`Subscribe`] and [`Unsubscribe`].
    pub bridge: ActorRef<RedisBridge>,
    /// Publishes while the bridge says the bus is up; clone it for every publisher.
    pub publisher: Publisher,
}

impl RedisBus {
    /// A sender of `M` ([`Subscribe`], [`Unsubscribe`]) to the bridge,
    /// counted on the edge `from → bridge`.
    pub fn link<M: Message>(&self, from: &str) -> Link<M>
    where
        RedisBridge: Handler<M>,
    {
        self.bridge.link(from)
    }
}

/// The bridge between Redis pub/sub and the mailbox graph.
pub struct RedisBridge {
    kernel: Kernel,
    client: redis::Client,
    subscriptions: Subscriptions,
    sink: Option<PubSubSink>,
    /// Told whether the bus is up.
    publisher: Publisher,
    /// Increases with every pub/sub connection, so that an old connection's
    /// reader stops and news about it is ignored. Shared with the readers and
    /// kept across restarts of the bridge.
    generation: Arc<AtomicU64>,
    /// Whether the sweep timer runs; kept across restarts so that a
    /// restarted bridge does not start a second one.
    sweeping: Arc<AtomicBool>,
    backoff: Backoff,
    me: Option<ActorRef<RedisBridge>>,
    /// The Redis Cluster of [`Topic::Shard`] channels, when there is one.
    shards: Option<shards::Shards>,
}

/// Which subscription command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Subscribe,
    Unsubscribe,
}

/// Hands `command` for `topics` to the connection now (see [`start`]):
/// one command per [`RESUBSCRIBE_CHUNK`] channels and one per chunk of
/// patterns, all sent before any confirmation comes back. The returned
/// future waits for Redis to confirm every one.
fn send_command(
    sink: &PubSubSink,
    command: Command,
    topics: Vec<Topic>,
) -> LocalBoxFuture<'static, redis::RedisResult<()>> {
    let (mut channels, mut patterns) = (Vec::new(), Vec::new());
    for topic in topics {
        match topic {
            // Shard topics reach this connection only as plain channels.
            Topic::Channel(c) | Topic::Shard(c) => channels.push(c),
            Topic::Pattern(p) => patterns.push(p),
        }
    }
    let mut sent = Vec::new();
    for (names, pattern) in [(channels, false), (patterns, true)] {
        for chunk in names.chunks(RESUBSCRIBE_CHUNK) {
            let (mut sink, chunk) = (sink.clone(), chunk.to_vec());
            sent.push(start(async move {
                match (command, pattern) {
                    (Command::Subscribe, false) => sink.subscribe(chunk).await,
                    (Command::Subscribe, true) => sink.psubscribe(chunk).await,
                    (Command::Unsubscribe, false) => sink.unsubscribe(chunk).await,
                    (Command::Unsubscribe, true) => sink.punsubscribe(chunk).await,
                }
            }));
        }
    }
    FutureExt::boxed_local(async move {
        for confirmed in futures::future::join_all(sent).await {
            confirmed?;
        }
        Ok(())
    })
}

/// Starts `fut` now: its first poll hands its command to the connection,
/// so commands go out in the order the bridge handled its messages. The
/// rest (waiting for Redis' confirmation) is returned.
fn start<T: 'static>(fut: impl Future<Output = T> + 'static) -> LocalBoxFuture<'static, T> {
    let mut fut = FutureExt::boxed_local(fut);
    match (&mut fut).now_or_never() {
        Some(done) => FutureExt::boxed_local(futures::future::ready(done)),
        None => fut,
    }
}

impl RedisBridge {
    /// The actor kind of the bridge in the mailbox graph.
    pub const KIND: &'static str = "redis_bridge";

    /// Spawns the bridge on `arbiter`; it connects to `url` by itself.
    pub fn spawn(kernel: &Kernel, arbiter: &actix::ArbiterHandle, url: &str) -> Result<RedisBus, redis::RedisError> {
        Self::spawn_with_cluster(kernel, arbiter, url, &[])
    }

    /// Spawns the bridge on `arbiter` with [`Topic::Shard`] channels on the
    /// Redis Cluster that `cluster` (URLs of some of its nodes) belong to,
    /// or on `url` when `cluster` is empty.
    pub fn spawn_with_cluster(
        kernel: &Kernel,
        arbiter: &actix::ArbiterHandle,
        url: &str,
        cluster: &[String],
    ) -> Result<RedisBus, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let cluster = cluster.to_vec();
        // Present from the start, so dashboards see zeros, not gaps.
        kernel.metrics().bus_errors.with_label_values(&[Bus::Redis.as_str(), BusErrorKind::Disconnected.as_str()]);
        if !cluster.is_empty() {
            kernel
                .metrics()
                .bus_errors
                .with_label_values(&[Bus::RedisCluster.as_str(), BusErrorKind::Disconnected.as_str()]);
        }
        let gauge = kernel.metrics().redis_subscriptions.clone();
        let subscriptions: Subscriptions = Arc::new(Mutex::new(Table::new(gauge)));
        let generation = Arc::new(AtomicU64::new(0));
        let sweeping = Arc::new(AtomicBool::new(false));
        let publisher = Publisher::new(client.clone(), kernel.metrics().clone(), !cluster.is_empty());
        let (k, p) = (kernel.clone(), publisher.clone());
        let bridge = kernel.spawn_on(arbiter, "redis-bridge", move || RedisBridge {
            kernel: k.clone(),
            client: client.clone(),
            subscriptions: subscriptions.clone(),
            sink: None,
            publisher: p.clone(),
            generation: generation.clone(),
            sweeping: sweeping.clone(),
            backoff: Backoff::new(),
            me: None,
            shards: (!cluster.is_empty()).then(|| shards::Shards::new(cluster.clone())),
        });
        Ok(RedisBus { bridge, publisher })
    }

    /// `topic` as this bridge holds it: a shard topic is a plain channel
    /// when there is no cluster.
    fn placed(&self, topic: Topic) -> Topic {
        match topic {
            Topic::Shard(c) if self.shards.is_none() => Topic::Channel(c),
            topic => topic,
        }
    }

    /// Which topics the plain connection carries: all of them, or all
    /// but the shard topics when those are on a cluster.
    fn on_plain(&self) -> fn(&Topic) -> bool {
        if self.shards.is_some() {
            |t| !t.is_shard()
        } else {
            |_| true
        }
    }

    /// The table's topics that the plain connection carries.
    fn plain_topics(&self) -> Vec<Topic> {
        let on_plain = self.on_plain();
        lock(&self.subscriptions).topics.keys().filter(|t| on_plain(t)).cloned().collect()
    }

    /// Sends a control event to every subscriber of a topic that `on`
    /// picks, once however many topics it follows. Control events ignore
    /// mailbox capacity: a subscriber must learn it has to resync. Topics
    /// whose subscribers all stopped are dropped.
    fn broadcast_on(&self, on: impl Fn(&Topic) -> bool, event: impl Fn() -> BusEvent) {
        let mut told: HashMap<String, bool> = HashMap::new();
        let emptied = lock(&self.subscriptions)
            .retain_on(on, |link| *told.entry(link.to().to_owned()).or_insert_with(|| link.tell(event()).is_ok()));
        self.unsubscribe_on_redis(emptied);
    }

    /// Unsubscribes `topics` on Redis (when connected), in as few commands
    /// as possible. Nothing to do while disconnected: the next connection
    /// subscribes only what the table holds.
    fn unsubscribe_on_redis(&self, topics: Vec<Topic>) {
        let (shard, topics): (Vec<Topic>, Vec<Topic>) =
            topics.into_iter().partition(|t| t.is_shard() && self.shards.is_some());
        self.unsubscribe_shards(&shard);
        let Some(sink) = &self.sink else { return };
        if topics.is_empty() {
            return;
        }
        let metrics = self.kernel.metrics().clone();
        let done = send_command(sink, Command::Unsubscribe, topics);
        actix::spawn(async move {
            if let Err(error) = done.await {
                metrics.bus_error(Bus::Redis, BusErrorKind::Unsubscribe, &error);
            }
        });
    }

    /// Drops links to actors that stopped without unsubscribing.
    fn sweep(&self) {
        let emptied = lock(&self.subscriptions).retain_on(|_| true, Link::is_alive);
        if !emptied.is_empty() {
            tracing::debug!(topics = emptied.len(), "dropping topics of stopped subscribers");
        }
        self.unsubscribe_on_redis(emptied);
    }
}

/// Decodes one pub/sub message of `channel`, which came for `topic`
/// (the channel itself, or the pattern it matched), and offers it to every
/// subscriber of the topic. Runs where the message is read (the reader
/// task, the cluster's push handler): a hop through the bridge's own
/// mailbox would add latency and nothing else. Returns the topic when every
/// subscriber had stopped and it was dropped.
fn deliver(
    subscriptions: &Subscriptions,
    metrics: &Metrics,
    bus: Bus,
    channel: String,
    topic: Topic,
    payload: &[u8],
) -> Option<Topic> {
    metrics.bus_received.with_label_values(&[bus.as_str(), topic_label(&channel)]).inc();
    let envelope = match Envelope::decode(payload) {
        Ok(envelope) => envelope,
        Err(error) => {
            metrics.bus_error(bus, BusErrorKind::Decode, &format_args!("channel {channel}: {error}"));
            return None;
        }
    };
    let pattern = match &topic {
        Topic::Pattern(p) => Some(p.clone()),
        Topic::Channel(_) | Topic::Shard(_) => None,
    };
    let event = Arc::new(BusMessage { channel, pattern, envelope });
    lock(subscriptions).offer(&topic, &event).then_some(topic)
}

/// Bounds the cardinality of the `topic` label: `nexus:doc:42` → `nexus:doc`.
fn topic_label(channel: &str) -> &str {
    match channel.match_indices(':').nth(1) {
        Some((i, _)) => &channel[..i],
        None => channel,
    }
}

impl Behaviour for RedisBridge {
    const KIND: &'static str = RedisBridge::KIND;
    const MAILBOX: usize = 4096;

    fn started(&mut self, me: &ActorRef<Self>, ctx: &mut Ctx<Self>) {
        self.me = Some(me.clone());
        if !self.sweeping.swap(true, Ordering::SeqCst) {
            ctx.run_interval(SWEEP_EVERY, |s, _| s.behaviour_mut().sweep());
        }
        self.connect(ctx);
        self.subscribe_shards(ctx);
    }
}

impl Handler<Emptied> for RedisBridge {
    fn handle(&mut self, Emptied(topics): Emptied, _ctx: &mut Ctx<Self>) -> Reply<()> {
        // A subscriber may have come back for a topic since it was dropped.
        let gone: Vec<Topic> = {
            let table = lock(&self.subscriptions);
            topics.into_iter().filter(|t| !table.topics.contains_key(t)).collect()
        };
        self.unsubscribe_on_redis(gone);
        Reply::Now(())
    }
}

impl Handler<Subscribe> for RedisBridge {
    fn handle(&mut self, mut msg: Subscribe, _ctx: &mut Ctx<Self>) -> Reply<Result<(), SubscribeError>> {
        let subscriber = msg.subscriber.clone();
        msg.topic = self.placed(msg.topic);
        lock(&self.subscriptions).add(msg.topic.clone(), msg.subscriber);
        if msg.topic.is_shard() {
            return self.subscribe_shard(msg.topic, subscriber);
        }
        let Some(sink) = &self.sink else {
            // Told so that it resyncs on the BusUp of the reconnection.
            let _ = subscriber.tell(BusEvent::Down(BusDown { bus: Bus::Redis, reason: "not connected".into() }));
            return Reply::Now(Ok(()));
        };
        // Also when others follow the topic already: their SUBSCRIBE may
        // still be on its way, and this one's confirmation comes after it.
        let confirmed = send_command(sink, Command::Subscribe, vec![msg.topic]);
        let metrics = self.kernel.metrics().clone();
        Reply::later(async move {
            confirmed.await.map_err(|e| {
                metrics.bus_error(Bus::Redis, BusErrorKind::Subscribe, &e);
                SubscribeError::from(e)
            })?;
            let _ = subscriber.tell(BusEvent::Up(BusUp { bus: Bus::Redis }));
            Ok(())
        })
    }
}

impl Handler<Unsubscribe> for RedisBridge {
    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Ctx<Self>) -> Reply<()> {
        let topic = self.placed(msg.topic);
        if lock(&self.subscriptions).remove(&topic, &msg.subscriber) {
            self.unsubscribe_on_redis(vec![topic]);
        }
        Reply::Now(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn topic_label_keeps_two_segments() {
        assert_eq!(super::topic_label("nexus:doc:42"), "nexus:doc");
        assert_eq!(super::topic_label("nexus:doc"), "nexus:doc");
        assert_eq!(super::topic_label("plain"), "plain");
    }
}
