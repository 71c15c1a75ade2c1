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

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use actix::{ActorFutureExt, AsyncContext};
use futures::StreamExt;
use redis::aio::{ConnectionManager, PubSubSink};

use super::{Backoff, Bus, BusDown, BusEvent, BusMessage, BusUp};
use crate::envelope::Envelope;
use crate::kernel::{lock, ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Message, Reply, SendError, Supervised};
use crate::telemetry::Metrics;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes waiting for Redis at once. Past this a publish is refused at
/// once (handed back, counted) rather than queued without bound until the
/// connection's response timeout fails them all.
pub const MAX_PUBLISHES_IN_FLIGHT: usize = 1024;

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Channel(String),
    /// A glob pattern, as Redis `PSUBSCRIBE` takes it.
    Pattern(String),
}

/// Why a publish did not happen. The envelope is handed back.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("redis is unavailable")]
    Unavailable(Envelope),
    /// [`MAX_PUBLISHES_IN_FLIGHT`] publishes are already waiting for Redis.
    #[error("too many publishes in flight")]
    Busy(Envelope),
    #[error("redis publish failed: {source}")]
    Redis { envelope: Envelope, source: redis::RedisError },
}

impl PublishError {
    pub fn into_envelope(self) -> Envelope {
        match self {
            PublishError::Unavailable(e) | PublishError::Busy(e) | PublishError::Redis { envelope: e, .. } => e,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("redis subscribe failed: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Subscribes `subscriber` to `topic`. The subscriber receives [`BusUp`]
/// once the subscription is live: at once when Redis is connected, else on
/// (re)connection. Replies after Redis confirmed it, or at once while the
/// bus is down.
pub struct Subscribe {
    pub topic: Topic,
    pub subscriber: Link<BusEvent>,
}

impl Message for Subscribe {
    type Reply = Result<(), SubscribeError>;
}

/// Removes the subscription of the actor with id `subscriber` to `topic`.
pub struct Unsubscribe {
    pub topic: Topic,
    pub subscriber: String,
}

impl Message for Unsubscribe {
    type Reply = ();
}

/// Publishes an envelope on a channel; replies with the number of Redis
/// clients that received it.
pub struct Publish {
    pub channel: String,
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

type Subscriptions = Arc<Mutex<HashMap<Topic, Vec<Link<BusEvent>>>>>;

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

impl RedisBridge {
    pub const KIND: &'static str = "redis_bridge";

    /// Spawns the bridge on `arbiter`; it connects to `url` by itself.
    pub fn spawn(
        kernel: &Kernel,
        arbiter: &actix::ArbiterHandle,
        url: &str,
    ) -> Result<ActorRef<RedisBridge>, redis::RedisError> {
        let client = redis::Client::open(url)?;
        // Present from the start, so dashboards see zeros, not gaps.
        kernel.metrics().bus_errors.with_label_values(&["redis", "disconnected"]);
        let subscriptions: Subscriptions = Arc::default();
        let generation = Arc::new(AtomicU64::new(0));
        let k = kernel.clone();
        Ok(kernel.spawn_on(arbiter, "redis-bridge", move || RedisBridge {
            kernel: k.clone(),
            client: client.clone(),
            subscriptions: subscriptions.clone(),
            sink: None,
            publisher: None,
            generation: generation.clone(),
            backoff: Backoff::new(),
            me: None,
            publishing: Rc::default(),
        }))
    }

    fn connect(&mut self, ctx: &mut Ctx<Self>) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let client = self.client.clone();
        let topics: Vec<Topic> = lock(&self.subscriptions).keys().cloned().collect();
        let publisher = self.publisher.clone();
        let fut = async move {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            for topic in &topics {
                subscribe_on(&mut sink, topic).await?;
            }
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
        self.kernel.metrics().bus_error("redis", "connect", error);
        self.schedule_reconnect(ctx);
    }

    fn schedule_reconnect(&mut self, ctx: &mut Ctx<Self>) {
        let delay = self.backoff.next_delay();
        ctx.run_later(delay, |s, ctx| s.behaviour_mut().connect(ctx));
    }

    /// Sends a control event to every subscriber. Control events ignore
    /// mailbox capacity: a subscriber must learn it has to resync.
    fn broadcast(&self, event: impl Fn() -> BusEvent) {
        let mut subs = lock(&self.subscriptions);
        for links in subs.values_mut() {
            links.retain(|link| link.tell(event()).is_ok());
        }
    }
}

/// Decodes one pub/sub message and offers it to every subscriber of its
/// channel or pattern. Runs in the reader task, on the bridge's thread: a
/// hop through the bridge's own mailbox would add latency and nothing else.
fn deliver(subscriptions: &Subscriptions, metrics: &Metrics, msg: &redis::Msg) {
    let channel = msg.get_channel_name();
    let pattern: Option<String> = if msg.from_pattern() { msg.get_pattern().ok() } else { None };
    metrics.bus_received.with_label_values(&["redis", topic_label(channel)]).inc();
    let envelope = match Envelope::decode(msg.get_payload_bytes()) {
        Ok(envelope) => envelope,
        Err(error) => {
            metrics.bus_error("redis", "decode", &format_args!("channel {channel}: {error}"));
            return;
        }
    };
    let topic = match &pattern {
        Some(p) => Topic::Pattern(p.clone()),
        None => Topic::Channel(channel.to_owned()),
    };
    let mut subs = lock(subscriptions);
    let Some(links) = subs.get_mut(&topic) else { return };
    let event = BusMessage { channel: channel.to_owned(), pattern, envelope };
    links.retain(|link| match link.try_tell(BusEvent::Message(event.clone())) {
        Ok(()) | Err(SendError::Full(_)) => true,
        Err(SendError::Closed(_)) => false,
    });
}

/// Bounds the cardinality of the `topic` label: `nexus:doc:42` → `nexus:doc`.
fn topic_label(channel: &str) -> &str {
    match channel.match_indices(':').nth(1) {
        Some((i, _)) => &channel[..i],
        None => channel,
    }
}

async fn subscribe_on(sink: &mut PubSubSink, topic: &Topic) -> redis::RedisResult<()> {
    match topic {
        Topic::Channel(c) => sink.subscribe(c).await,
        Topic::Pattern(p) => sink.psubscribe(p).await,
    }
}

/// Reads one pub/sub connection until it closes or a newer one replaces it.
struct Reader {
    subscriptions: Subscriptions,
    metrics: Metrics,
    current: Arc<AtomicU64>,
    generation: u64,
}

impl Reader {
    fn spawn(self, mut stream: redis::aio::PubSubStream, lost: Link<ConnectionLost>) {
        actix::spawn(async move {
            while let Some(msg) = stream.next().await {
                if self.current.load(Ordering::SeqCst) != self.generation {
                    return;
                }
                deliver(&self.subscriptions, &self.metrics, &msg);
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
        self.connect(ctx);
    }
}

impl Handler<ConnectionLost> for RedisBridge {
    fn handle(&mut self, msg: ConnectionLost, ctx: &mut Ctx<Self>) -> Reply<()> {
        if msg.generation != self.generation.load(Ordering::SeqCst) {
            return Reply::Now(());
        }
        self.sink = None;
        self.kernel.metrics().bus_error("redis", "disconnected", &msg.reason);
        let reason = msg.reason;
        self.broadcast(|| BusEvent::Down(BusDown { bus: Bus::Redis, reason: reason.clone() }));
        self.schedule_reconnect(ctx);
        Reply::Now(())
    }
}

impl Handler<Subscribe> for RedisBridge {
    fn handle(&mut self, msg: Subscribe, _ctx: &mut Ctx<Self>) -> Reply<Result<(), SubscribeError>> {
        let subscriber = msg.subscriber.clone();
        let first = {
            let mut subs = lock(&self.subscriptions);
            let links = subs.entry(msg.topic.clone()).or_default();
            links.retain(|l| l.to() != msg.subscriber.to());
            links.push(msg.subscriber);
            links.len() == 1
        };
        let up = BusEvent::Up(BusUp { bus: Bus::Redis });
        match (&self.sink, first) {
            (Some(sink), true) => {
                let mut sink = sink.clone();
                let metrics = self.kernel.metrics().clone();
                Reply::later(async move {
                    subscribe_on(&mut sink, &msg.topic).await.map_err(|e| {
                        metrics.bus_error("redis", "subscribe", &e);
                        SubscribeError::from(e)
                    })?;
                    let _ = subscriber.tell(up);
                    Ok(())
                })
            }
            (Some(_), false) => {
                let _ = subscriber.tell(up);
                Reply::Now(Ok(()))
            }
            (None, _) => Reply::Now(Ok(())),
        }
    }
}

impl Handler<Unsubscribe> for RedisBridge {
    fn handle(&mut self, msg: Unsubscribe, _ctx: &mut Ctx<Self>) -> Reply<()> {
        let now_empty = {
            let mut subs = lock(&self.subscriptions);
            let links = subs.entry(msg.topic.clone()).or_default();
            links.retain(|l| l.to() != msg.subscriber);
            let empty = links.is_empty();
            if empty {
                subs.remove(&msg.topic);
            }
            empty
        };
        if let (true, Some(sink)) = (now_empty, &self.sink) {
            let mut sink = sink.clone();
            return Reply::later(async move {
                let _ = match &msg.topic {
                    Topic::Channel(c) => sink.unsubscribe(c).await,
                    Topic::Pattern(p) => sink.punsubscribe(p).await,
                };
            });
        }
        Reply::Now(())
    }
}

impl Handler<Publish> for RedisBridge {
    fn handle(&mut self, msg: Publish, _ctx: &mut Ctx<Self>) -> Reply<Result<u64, PublishError>> {
        let metrics = self.kernel.metrics().clone();
        let (Some(mut conn), true) = (self.publisher.clone(), self.sink.is_some()) else {
            metrics.bus_error("redis", "publish_unavailable", &msg.channel);
            return Reply::Now(Err(PublishError::Unavailable(msg.envelope)));
        };
        if self.publishing.get() >= MAX_PUBLISHES_IN_FLIGHT {
            metrics.bus_error("redis", "publish_busy", &msg.channel);
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
                    metrics.bus_published.with_label_values(&["redis", topic_label(&msg.channel)]).inc();
                    Ok(receivers)
                }
                Err(source) => {
                    metrics.bus_error("redis", "publish", &source);
                    Err(PublishError::Redis { envelope: msg.envelope, source })
                }
            }
        })
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
