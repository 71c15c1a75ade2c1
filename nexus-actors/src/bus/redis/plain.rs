//! The bridge's plain side: the one pub/sub connection to `--redis-url`
//! that carries every channel and pattern (and shard topics when there is
//! no cluster). It connects beside the bridge's mailbox, reads in a task of
//! its own ([`Reader`]), and on its end tells subscribers [`BusDown`] and
//! connects again. Publishing is not here ([`super::publisher`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::{ActorFutureExt, AsyncContext};
use futures::StreamExt;
use redis::aio::PubSubSink;

use super::{deliver, send_command, Command, Emptied, RedisBridge, Subscriptions, Topic, CONNECT_TIMEOUT};
use crate::bus::{Bus, BusDown, BusErrorKind, BusEvent, BusUp};
use crate::kernel::{Ctx, Handler, Link, Message, Reply, Supervised};
use crate::telemetry::Metrics;

/// The pub/sub connection of `generation` ended.
pub(super) struct ConnectionLost {
    generation: u64,
    reason: String,
}

impl Message for ConnectionLost {
    type Reply = ();
}

impl RedisBridge {
    /// Connects the plain side and subscribes what the table holds. Runs
    /// beside the mailbox (not in `ctx.wait`): a plain Redis that hangs must
    /// not hold the cluster side's subscriptions and resyncs. What changed
    /// in the table meanwhile is subscribed or unsubscribed once connected,
    /// and followers are told `BusUp` only when that is confirmed.
    pub(super) fn connect(&mut self, ctx: &mut Ctx<Self>) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let client = self.client.clone();
        let topics = self.plain_topics();
        let asked = topics.clone();
        let fut = async move {
            let (sink, stream) = client.get_async_pubsub().await?.split();
            send_command(&sink, Command::Subscribe, topics).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        let fut = tokio::time::timeout(CONNECT_TIMEOUT, fut);
        ctx.spawn(actix::fut::wrap_future::<_, Supervised<Self>>(fut).map(move |result, s, ctx| {
            let this = s.behaviour_mut();
            if this.generation.load(Ordering::SeqCst) != generation {
                return;
            }
            match result {
                Ok(Ok((sink, stream))) => this.connected(sink, stream, generation, asked, ctx),
                Ok(Err(error)) => this.connect_failed(&error, ctx),
                Err(elapsed) => this.connect_failed(&elapsed, ctx),
            }
        }));
    }

    fn connected(
        &mut self,
        sink: PubSubSink,
        stream: redis::aio::PubSubStream,
        generation: u64,
        asked: Vec<Topic>,
        ctx: &mut Ctx<Self>,
    ) {
        let now: HashSet<Topic> = self.plain_topics().into_iter().collect();
        let asked: HashSet<Topic> = asked.into_iter().collect();
        let added: Vec<Topic> = now.difference(&asked).cloned().collect();
        let dropped: Vec<Topic> = asked.difference(&now).cloned().collect();
        let caught_up = (!added.is_empty()).then(|| send_command(&sink, Command::Subscribe, added));
        self.sink = Some(sink);
        self.unsubscribe_on_redis(dropped);
        self.publisher.set_up(true);
        self.backoff.reset();
        if let Some(me) = &self.me {
            let reader = Reader {
                subscriptions: self.subscriptions.clone(),
                metrics: self.kernel.metrics().clone(),
                current: self.generation.clone(),
                generation,
                emptied: me.link("redis"),
            };
            reader.spawn(stream, me.link("redis"));
        }
        let Some(caught_up) = caught_up else {
            self.up();
            return;
        };
        ctx.spawn(actix::fut::wrap_future::<_, Supervised<Self>>(caught_up).map(move |result, s, ctx| {
            let this = s.behaviour_mut();
            // Lost meanwhile: the reconnection brings the BusUp.
            if this.generation.load(Ordering::SeqCst) != generation || this.sink.is_none() {
                return;
            }
            match result {
                Ok(()) => this.up(),
                // Like the connection's end: what it carries is incomplete.
                Err(error) => {
                    this.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::Subscribe, &error);
                    this.lost(format!("subscribing failed: {error}"), ctx);
                }
            }
        }));
    }

    /// The plain connection is no longer whole: subscribers are told and
    /// a new one is made.
    fn lost(&mut self, reason: String, ctx: &mut Ctx<Self>) {
        self.sink = None;
        self.publisher.set_up(false);
        self.broadcast_on(self.on_plain(), || BusEvent::Down(BusDown { bus: Bus::Redis, reason: reason.clone() }));
        self.schedule_reconnect(ctx);
    }

    fn up(&self) {
        tracing::info!(bus = "redis", "bus up");
        self.broadcast_on(self.on_plain(), || BusEvent::Up(BusUp { bus: Bus::Redis }));
    }

    fn connect_failed(&mut self, error: &dyn std::fmt::Display, ctx: &mut Ctx<Self>) {
        self.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::Connect, error);
        self.schedule_reconnect(ctx);
    }

    fn schedule_reconnect(&mut self, ctx: &mut Ctx<Self>) {
        let delay = self.backoff.next_delay();
        ctx.run_later(delay, |s, ctx| s.behaviour_mut().connect(ctx));
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
                let channel = msg.get_channel_name().to_owned();
                let topic = match msg.from_pattern().then(|| msg.get_pattern::<String>().ok()).flatten() {
                    Some(pattern) => Topic::Pattern(pattern),
                    None => Topic::Channel(channel.clone()),
                };
                let delivered =
                    deliver(&self.subscriptions, &self.metrics, Bus::Redis, channel, topic, msg.get_payload_bytes());
                if let Some(topic) = delivered {
                    let _ = self.emptied.tell(Emptied(vec![topic]));
                }
            }
            let reason = "pub/sub connection closed".into();
            let _ = lost.tell(ConnectionLost { generation: self.generation, reason });
        });
    }
}

impl Handler<ConnectionLost> for RedisBridge {
    fn handle(&mut self, msg: ConnectionLost, ctx: &mut Ctx<Self>) -> Reply<()> {
        if msg.generation != self.generation.load(Ordering::SeqCst) {
            return Reply::Now(());
        }
        self.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::Disconnected, &msg.reason);
        self.lost(msg.reason, ctx);
        Reply::Now(())
    }
}
