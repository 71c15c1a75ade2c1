//! `RedisBridge`: the transactional bus (Redis pub/sub) as an actor.
//!
//! Actors subscribe to a channel or a pattern by message and receive
//! [`BusEvent`]s in their mailbox; publishing is a message too. The bridge
//! owns one pub/sub connection and one publishing connection. When the
//! pub/sub connection drops it tells every subscriber [`BusDown`],
//! reconnects with backoff, re-subscribes everything and tells them
//! [`BusUp`] so they can resync from state. Delivery is at-most-once and uses
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

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use actix::{ActorFutureExt, AsyncContext};
use futures::future::LocalBoxFuture;
use futures::{FutureExt, StreamExt};
use redis::aio::{ConnectionManager, PubSubSink};

use super::{Backoff, Bus, BusDown, BusErrorKind, BusEvent, BusMessage, BusUp};
use crate::envelope::Envelope;
use crate::kernel::{lock, ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Message, Reply, SendError, Supervised};
use crate::telemetry::Metrics;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Channels (or patterns) per `SUBSCRIBE` (`PSUBSCRIBE`, `UNSUBSCRIBE`)
/// command when the bridge changes many at once: one round trip each.
pub const RESUBSCRIBE_CHUNK: usize = 1000;

/// How often the table is swept for links to actors that stopped without
/// unsubscribing (a crashed actor, a task that outlived its session).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Publishes waiting for Redis at once. Past this a publish is refused at
/// once (handed back, counted) rather than queued without bound until the
/// connection's response timeout fails them all.
pub const MAX_PUBLISHES_IN_FLIGHT: usize = 1024;

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// One channel, as Redis `SUBSCRIBE` takes it.
    Channel(String),
    /// A glob pattern, as Redis `PSUBSCRIBE` takes it.
    Pattern(String),
}

/// Why a publish did not happen. The envelope is handed back.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The bridge is not connected to Redis.
    #[error("redis is unavailable")]
    Unavailable(Envelope),
    /// [`MAX_PUBLISHES_IN_FLIGHT`] publishes are already waiting for Redis.
    #[error("too many publishes in flight")]
    Busy(Envelope),
    /// Redis refused the publish, or the connection failed during it.
    #[error("redis publish failed: {source}")]
    Redis {
        /// What was not published.
        envelope: Envelope,
        /// Why.
        source: redis::RedisError,
    },
}

impl PublishError {
    /// The envelope that was not published.
    pub fn into_envelope(self) -> Envelope {
        match self {
            PublishError::Unavailable(e) | PublishError::Busy(e) | PublishError::Redis { envelope: e, .. } => e,
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

/// Publishes an envelope on a channel; replies with the number of Redis
/// clients that received it.
pub struct Publish {
    /// Where.
    pub channel: String,
    /// What.
    pub envelope: Envelope,
}

impl Message for Publish {
    type Reply = Result<u64, PublishError>;
}

/// The pub/sub connection of `generation` ended.
struct ConnectionLost {
    generation: u64,
    reason: String,
}

impl Message for ConnectionLost {
    type Reply = ();
}

/// Delivery found every link of these topics closed and dropped them from
/// the table; the bridge unsubscribes those still absent.
struct Emptied(Vec<Topic>);

impl Message for Emptied {
    type Reply = ();
}

/// Who follows what, and the gauge that counts the topics.
struct Table {
    topics: HashMap<Topic, Vec<Link<BusEvent>>>,
    gauge: prometheus::IntGauge,
}

impl Table {
    fn count(&self) {
        self.gauge.set(self.topics.len() as i64);
    }

    /// Adds (or replaces) `link` on `topic`.
    fn add(&mut self, topic: Topic, link: Link<BusEvent>) {
        let links = self.topics.entry(topic).or_default();
        links.retain(|l| l.to() != link.to());
        links.push(link);
        self.count();
    }

    /// Removes `subscriber` from `topic`; whether that dropped the topic.
    fn remove(&mut self, topic: &Topic, subscriber: &str) -> bool {
        let Some(links) = self.topics.get_mut(topic) else { return false };
        links.retain(|l| l.to() != subscriber);
        let emptied = links.is_empty();
        if emptied {
            self.topics.remove(topic);
            self.count();
        }
        emptied
    }

    /// Keeps, on every topic, the links for which `keep` holds; the
    /// topics left without any are dropped and returned.
    fn retain(&mut self, mut keep: impl FnMut(&Link<BusEvent>) -> bool) -> Vec<Topic> {
        let mut emptied = Vec::new();
        self.topics.retain(|topic, links| {
            links.retain(&mut keep);
            if links.is_empty() {
                emptied.push(topic.clone());
            }
            !links.is_empty()
        });
        if !emptied.is_empty() {
            self.count();
        }
        emptied
    }

    /// Offers `event` to every live link of `topic`; true when the topic
    /// was dropped because all of them were closed.
    fn offer(&mut self, topic: &Topic, event: &BusMessage) -> bool {
        let Some(links) = self.topics.get_mut(topic) else { return false };
        links.retain(|link| match link.try_tell(BusEvent::Message(event.clone())) {
            Ok(()) | Err(SendError::Full(_)) => true,
            Err(SendError::Closed(_)) => false,
        });
        let emptied = links.is_empty();
        if emptied {
            self.topics.remove(topic);
            self.count();
        }
        emptied
    }
}

type Subscriptions = Arc<Mutex<Table>>;

/// The bridge between Redis pub/sub and the mailbox graph.
pub struct RedisBridge {
    kernel: Kernel,
    client: redis::Client,
    subscriptions: Subscriptions,
    sink: Option<PubSubSink>,
    publisher: Option<ConnectionManager>,
    /// Increases with every pub/sub connection, so that an old connection's
    /// reader stops and news about it is ignored. Shared with the readers and
    /// kept across restarts of the bridge.
    generation: Arc<AtomicU64>,
    /// Whether the sweep timer runs; kept across restarts so that a
    /// restarted bridge does not start a second one.
    sweeping: Arc<AtomicBool>,
    backoff: Backoff,
    me: Option<ActorRef<RedisBridge>>,
    /// Publishes waiting for Redis; replies run on this actor's thread.
    publishing: Rc<Cell<usize>>,
}

/// Counts one publish in flight for as long as it lives.
struct InFlight(Rc<Cell<usize>>);

impl InFlight {
    fn enter(counter: &Rc<Cell<usize>>) -> Self {
        counter.set(counter.get() + 1);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
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
            Topic::Channel(c) => channels.push(c),
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
    pub fn spawn(
        kernel: &Kernel,
        arbiter: &actix::ArbiterHandle,
        url: &str,
    ) -> Result<ActorRef<RedisBridge>, redis::RedisError> {
        let client = redis::Client::open(url)?;
        // Present from the start, so dashboards see zeros, not gaps.
        kernel.metrics().bus_errors.with_label_values(&[Bus::Redis.as_str(), BusErrorKind::Disconnected.as_str()]);
        let gauge = kernel.metrics().redis_subscriptions.clone();
        let subscriptions: Subscriptions = Arc::new(Mutex::new(Table { topics: HashMap::new(), gauge }));
        let generation = Arc::new(AtomicU64::new(0));
        let sweeping = Arc::new(AtomicBool::new(false));
        let k = kernel.clone();
        Ok(kernel.spawn_on(arbiter, "redis-bridge", move || RedisBridge {
            kernel: k.clone(),
            client: client.clone(),
            subscriptions: subscriptions.clone(),
            sink: None,
            publisher: None,
            generation: generation.clone(),
            sweeping: sweeping.clone(),
            backoff: Backoff::new(),
            me: None,
            publishing: Rc::default(),
        }))
    }

    fn connect(&mut self, ctx: &mut Ctx<Self>) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let client = self.client.clone();
        let topics: Vec<Topic> = lock(&self.subscriptions).topics.keys().cloned().collect();
        let publisher = self.publisher.clone();
        let fut = async move {
            let (sink, stream) = client.get_async_pubsub().await?.split();
            send_command(&sink, Command::Subscribe, topics).await?;
            let publisher = match publisher {
                Some(p) => p,
                None => client.get_connection_manager().await?,
            };
            Ok::<_, redis::RedisError>((sink, stream, publisher))
        };
        let fut = tokio::time::timeout(CONNECT_TIMEOUT, fut);
        ctx.wait(actix::fut::wrap_future::<_, Supervised<Self>>(fut).map(move |result, s, ctx| match result {
            Ok(Ok((sink, stream, publisher))) => {
                let this = s.behaviour_mut();
                this.sink = Some(sink);
                this.publisher = Some(publisher);
                this.backoff.reset();
                if let Some(me) = &this.me {
                    let reader = Reader {
                        subscriptions: this.subscriptions.clone(),
                        metrics: this.kernel.metrics().clone(),
                        current: this.generation.clone(),
                        generation,
                        emptied: me.link("redis"),
                    };
                    reader.spawn(stream, me.link("redis"));
                }
                tracing::info!(bus = "redis", "bus up");
                this.broadcast(|| BusEvent::Up(BusUp { bus: Bus::Redis }));
            }
            Ok(Err(error)) => s.behaviour_mut().connect_failed(&error, ctx),
            Err(elapsed) => s.behaviour_mut().connect_failed(&elapsed, ctx),
        }));
    }

    fn connect_failed(&mut self, error: &dyn std::fmt::Display, ctx: &mut Ctx<Self>) {
        self.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::Connect, error);
        self.schedule_reconnect(ctx);
    }

    fn schedule_reconnect(&mut self, ctx: &mut Ctx<Self>) {
        let delay = self.backoff.next_delay();
        ctx.run_later(delay, |s, ctx| s.behaviour_mut().connect(ctx));
    }

    /// Sends a control event to every subscriber, once however many
    /// topics it follows. Control events ignore mailbox capacity: a
    /// subscriber must learn it has to resync. Topics whose subscribers
    /// all stopped are dropped.
    fn broadcast(&self, event: impl Fn() -> BusEvent) {
        let mut told: HashMap<String, bool> = HashMap::new();
        let emptied = lock(&self.subscriptions)
            .retain(|link| *told.entry(link.to().to_owned()).or_insert_with(|| link.tell(event()).is_ok()));
        self.unsubscribe_on_redis(emptied);
    }

    /// Unsubscribes `topics` on Redis (when connected), in as few commands
    /// as possible. Nothing to do while disconnected: the next connection
    /// subscribes only what the table holds.
    fn unsubscribe_on_redis(&self, topics: Vec<Topic>) {
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
        let emptied = lock(&self.subscriptions).retain(Link::is_alive);
        if !emptied.is_empty() {
            tracing::debug!(topics = emptied.len(), "dropping topics of stopped subscribers");
        }
        self.unsubscribe_on_redis(emptied);
    }
}

/// Decodes one pub/sub message and offers it to every subscriber of its
/// channel or pattern. Runs in the reader task, on the bridge's thread: a
/// hop through the bridge's own mailbox would add latency and nothing else.
/// Returns the topic when every subscriber had stopped and it was dropped.
fn deliver(subscriptions: &Subscriptions, metrics: &Metrics, msg: &redis::Msg) -> Option<Topic> {
    let channel = msg.get_channel_name();
    let pattern: Option<String> = if msg.from_pattern() { msg.get_pattern().ok() } else { None };
    metrics.bus_received.with_label_values(&[Bus::Redis.as_str(), topic_label(channel)]).inc();
    let envelope = match Envelope::decode(msg.get_payload_bytes()) {
        Ok(envelope) => envelope,
        Err(error) => {
            metrics.bus_error(Bus::Redis, BusErrorKind::Decode, &format_args!("channel {channel}: {error}"));
            return None;
        }
    };
    let topic = match &pattern {
        Some(p) => Topic::Pattern(p.clone()),
        None => Topic::Channel(channel.to_owned()),
    };
    let event = BusMessage { channel: channel.to_owned(), pattern, envelope };
    lock(subscriptions).offer(&topic, &event).then_some(topic)
}

/// Bounds the cardinality of the `topic` label: `nexus:doc:42` → `nexus:doc`.
fn topic_label(channel: &str) -> &str {
    match channel.match_indices(':').nth(1) {
        Some((i, _)) => &channel[..i],
        None => channel,
    }
}

/// Reads one pub/sub connection until it closes or a newer one replaces it.
struct Reader {
    subscriptions: Subscriptions,
    metrics: Metrics,
    current: Arc<AtomicU64>,
    generation: u64,
    emptied: Link<Emptied>,
}

impl Reader {
    fn spawn(self, mut stream: redis::aio::PubSubStream, lost: Link<ConnectionLost>) {
        actix::spawn(async move {
            while let Some(msg) = stream.next().await {
                if self.current.load(Ordering::SeqCst) != self.generation {
                    return;
                }
                if let Some(topic) = deliver(&self.subscriptions, &self.metrics, &msg) {
                    let _ = self.emptied.tell(Emptied(vec![topic]));
                }
            }
            let reason = "pub/sub connection closed".into();
            let _ = lost.tell(ConnectionLost { generation: self.generation, reason });
        });
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
    }
}

impl Handler<ConnectionLost> for RedisBridge {
    fn handle(&mut self, msg: ConnectionLost, ctx: &mut Ctx<Self>) -> Reply<()> {
        if msg.generation != self.generation.load(Ordering::SeqCst) {
            return Reply::Now(());
        }
        self.sink = None;
        self.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::Disconnected, &msg.reason);
        let reason = msg.reason;
        self.broadcast(|| BusEvent::Down(BusDown { bus: Bus::Redis, reason: reason.clone() }));
        self.schedule_reconnect(ctx);
        Reply::Now(())
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
    fn handle(&mut self, msg: Subscribe, _ctx: &mut Ctx<Self>) -> Reply<Result<(), SubscribeError>> {
        let subscriber = msg.subscriber.clone();
        lock(&self.subscriptions).add(msg.topic.clone(), msg.subscriber);
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
        if lock(&self.subscriptions).remove(&msg.topic, &msg.subscriber) {
            self.unsubscribe_on_redis(vec![msg.topic]);
        }
        Reply::Now(())
    }
}

impl Handler<Publish> for RedisBridge {
    fn handle(&mut self, msg: Publish, _ctx: &mut Ctx<Self>) -> Reply<Result<u64, PublishError>> {
        let metrics = self.kernel.metrics().clone();
        let (Some(mut conn), true) = (self.publisher.clone(), self.sink.is_some()) else {
            metrics.bus_error(Bus::Redis, BusErrorKind::PublishUnavailable, &msg.channel);
            return Reply::Now(Err(PublishError::Unavailable(msg.envelope)));
        };
        if self.publishing.get() >= MAX_PUBLISHES_IN_FLIGHT {
            metrics.bus_error(Bus::Redis, BusErrorKind::PublishBusy, &msg.channel);
            return Reply::Now(Err(PublishError::Busy(msg.envelope)));
        }
        let in_flight = InFlight::enter(&self.publishing);
        Reply::later(async move {
            let _in_flight = in_flight;
            let cmd = redis::cmd("PUBLISH").arg(&msg.channel).arg(msg.envelope.encode()).clone();
            let mut result: redis::RedisResult<u64> = cmd.query_async(&mut conn).await;
            // The connection manager reports a connection that died since
            // the last command once, then reconnects: one retry covers it.
            if result.as_ref().is_err_and(|e| e.is_io_error() || e.is_connection_dropped()) {
                result = cmd.query_async(&mut conn).await;
            }
            match result {
                Ok(receivers) => {
                    metrics.bus_published.with_label_values(&[Bus::Redis.as_str(), topic_label(&msg.channel)]).inc();
                    Ok(receivers)
                }
                Err(source) => {
                    metrics.bus_error(Bus::Redis, BusErrorKind::Publish, &source);
                    Err(PublishError::Redis { envelope: msg.envelope, source })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{Behaviour, Handler};

    #[test]
    fn topic_label_keeps_two_segments() {
        assert_eq!(super::topic_label("nexus:doc:42"), "nexus:doc");
        assert_eq!(super::topic_label("nexus:doc"), "nexus:doc");
        assert_eq!(super::topic_label("plain"), "plain");
    }

    struct Sink;
    impl Behaviour for Sink {
        const KIND: &'static str = "sink";
    }
    impl Handler<BusEvent> for Sink {
        fn handle(&mut self, _: BusEvent, _: &mut Ctx<Self>) -> Reply<()> {
            Reply::Now(())
        }
    }

    #[actix_rt::test]
    async fn the_table_drops_a_topic_with_its_last_link_and_counts_what_it_holds() {
        let kernel = Kernel::new("test");
        let gauge = kernel.metrics().redis_subscriptions.clone();
        let mut table = Table { topics: HashMap::new(), gauge: gauge.clone() };
        let (a, b) = (kernel.spawn("a", || Sink), kernel.spawn("b", || Sink));
        let doc = Topic::Channel("nexus:doc:1".into());
        let all = Topic::Pattern("nexus:doc:*".into());
        table.add(doc.clone(), a.link("redis-bridge"));
        table.add(doc.clone(), a.link("redis-bridge"));
        table.add(doc.clone(), b.link("redis-bridge"));
        table.add(all.clone(), b.link("redis-bridge"));
        assert_eq!((table.topics[&doc].len(), gauge.get()), (2, 2), "a subscriber counts once per topic");

        assert!(!table.remove(&doc, "a"), "b still follows it");
        assert!(!table.remove(&Topic::Channel("nexus:doc:2".into()), "a"), "nothing to drop");
        assert!(table.remove(&doc, "b"));
        assert_eq!(gauge.get(), 1);

        // A subscriber that stopped without unsubscribing goes with the
        // next delivery, and its topic with it.
        b.stop();
        for _ in 0..500 {
            if !b.is_alive() {
                break;
            }
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
        let event = BusMessage { channel: "nexus:doc:1".into(), pattern: Some("nexus:doc:*".into()), envelope: ping() };
        assert!(table.offer(&all, &event));
        assert_eq!((table.topics.len(), gauge.get()), (0, 0));
    }

    fn ping() -> Envelope {
        Envelope::with_type("nexus.test.ping", "test", serde_json::json!({}))
    }
}
