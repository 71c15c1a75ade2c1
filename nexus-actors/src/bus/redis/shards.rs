//! The bridge's sharded side: [`Topic::Shard`] channels on a Redis Cluster,
//! with sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`, Redis 7), so that a
//! message is written to and read from the one master that owns its
//! channel's hash slot instead of crossing every node of the cluster.
//!
//! One cluster connection (RESP3) carries the subscriptions and the
//! publishes; redis-rs routes each command to the master of its slot,
//! follows a failover to the promoted replica and subscribes again by
//! itself. Delivery runs in the connection's push handler, through the same
//! [`Table`](super::table::Table) as the plain side. What this module adds
//! is the subscribers' view: when a node's connection drops, every
//! subscriber of a shard topic is told [`BusDown`]; the bridge then
//! subscribes every shard topic again until all succeed and tells them
//! [`BusUp`], so they resync from state. This module does not touch plain
//! channels or patterns.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix::{ActorFutureExt, AsyncContext};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{ProtocolVersion, PushInfo, PushKind, Value};

use super::{deliver, Emptied, RedisBridge, Subscriptions, Topic};
use crate::bus::{Backoff, Bus, BusDown, BusErrorKind, BusEvent, BusUp};
use crate::kernel::{lock, Ctx, Handler, Link, Message, Reply, Supervised};
use crate::telemetry::Metrics;

/// How long one round of (re)subscribing may take before it is retried.
const ROUND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a command waits for a master's answer: a hung master must not
/// hold publishes (and the in-flight budget they share) for ever.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The cluster side of a bridge.
pub(super) struct Shards {
    nodes: Vec<String>,
    conn: Option<ClusterConnection>,
    /// Whether every shard topic of the table is subscribed on the cluster
    /// as far as the bridge knows (no connection dropped since).
    up: bool,
    /// A round of subscribing every shard topic is under way.
    subscribing: bool,
    /// A connection dropped during that round: it cannot bring the side up.
    lost_during_round: bool,
    backoff: Backoff,
}

impl Shards {
    pub(super) fn new(nodes: Vec<String>) -> Self {
        Shards { nodes, conn: None, up: false, subscribing: false, lost_during_round: false, backoff: Backoff::new() }
    }

    /// The connection publishes go out on, once made.
    pub(super) fn connection(&self) -> Option<ClusterConnection> {
        self.conn.clone()
    }
}

/// A connection to a node of the cluster dropped, or a followed channel
/// was unsubscribed by the cluster: every shard topic is subscribed again.
pub(super) struct ShardsLost {
    reason: String,
}

impl Message for ShardsLost {
    type Reply = ();
}

/// The push handler: sharded messages go to their subscribers; a dropped
/// node connection, or a followed channel whose slot moved, goes to the
/// bridge. Runs in the cluster connection's task, so it never blocks:
/// `try_tell` and `tell` only queue.
fn on_push(
    subscriptions: &Subscriptions,
    metrics: &Metrics,
    bridge: &Link<ShardsLost>,
    emptied: &Link<Emptied>,
    push: PushInfo,
) {
    match push.kind {
        PushKind::SMessage => {
            let [Value::BulkString(channel), Value::BulkString(payload)] = push.data.as_slice() else {
                metrics.bus_error(
                    Bus::RedisCluster,
                    BusErrorKind::Decode,
                    &"a sharded message without channel and payload",
                );
                return;
            };
            let channel = String::from_utf8_lossy(channel).into_owned();
            let topic = Topic::Shard(channel.clone());
            // A channel nobody here follows (its unsubscribe failed, or
            // redis-rs subscribed it again after a reconnect): dropped.
            if !lock(subscriptions).topics.contains_key(&topic) {
                let _ = emptied.tell(Emptied(vec![topic]));
                return;
            }
            if let Some(topic) = deliver(subscriptions, metrics, Bus::RedisCluster, channel, topic, payload) {
                let _ = emptied.tell(Emptied(vec![topic]));
            }
        }
        PushKind::Disconnection => {
            let _ = bridge.tell(ShardsLost { reason: "a cluster node's connection dropped".into() });
        }
        // A master unsubscribes a shard channel by itself when the
        // channel's slot moves to another master (resharding). One the
        // table still holds (not one the bridge let go) must be subscribed
        // again where its slot lives now, and what was published meanwhile
        // is lost to its followers. So is the bridge's own unsubscribe of a
        // topic followed again since, if its subscribe went out first; when
        // the subscribe went out after it, it undoes it.
        PushKind::SUnsubscribe => {
            let Some(Value::BulkString(channel)) = push.data.first() else { return };
            let topic = Topic::Shard(String::from_utf8_lossy(channel).into_owned());
            if lock(subscriptions).dropped_while_followed(&topic) {
                let _ = bridge.tell(ShardsLost { reason: "a followed channel's slot moved to another master".into() });
            }
        }
        PushKind::SSubscribe => {
            let Some(Value::BulkString(channel)) = push.data.first() else { return };
            lock(subscriptions).subscribed(&Topic::Shard(String::from_utf8_lossy(channel).into_owned()));
        }
        _ => {}
    }
}

impl RedisBridge {
    /// The table's shard topics.
    fn shard_topics(&self) -> Vec<Topic> {
        lock(&self.subscriptions).topics.keys().filter(|t| t.is_shard()).cloned().collect()
    }

    /// Connects to the cluster (first time) and subscribes every shard
    /// topic of the table; tells their subscribers [`BusUp`] when all are,
    /// else tries again after a backoff.
    pub(super) fn subscribe_shards(&mut self, ctx: &mut Ctx<Self>) {
        let topics = self.shard_topics();
        let (subscriptions, metrics) = (self.subscriptions.clone(), self.kernel.metrics().clone());
        let (Some(shards), Some(me)) = (self.shards.as_mut(), self.me.as_ref()) else { return };
        if shards.subscribing {
            return;
        }
        shards.subscribing = true;
        shards.lost_during_round = false;
        // A round subscribes every topic: counts left from before (a reply
        // redis-rs matched to the wrong command) go, so none sticks for longer
        // than until the next round. Too low a count costs a needless resync.
        let mut pending = lock(&subscriptions);
        pending.forget_subscribing();
        for topic in &topics {
            pending.subscribing(topic.clone());
        }
        drop(pending);
        let connect = match shards.conn.clone() {
            Some(conn) => Ok(conn),
            None => {
                let (lost, emptied) = (me.link::<ShardsLost>("redis_cluster"), me.link::<Emptied>("redis_cluster"));
                Err(ClusterClientBuilder::new(shards.nodes.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .push_sender(move |push: PushInfo| {
                        on_push(&subscriptions, &metrics, &lost, &emptied, push);
                        Ok::<(), std::convert::Infallible>(())
                    })
                    .build())
            }
        };
        let round = async move {
            // A failed round forgets the counts of its subscribes (see
            // `round_done`), so a failure here takes nothing back.
            let conn = match connect {
                Ok(conn) => conn,
                Err(client) => client?.get_async_connection().await?,
            };
            let subscribed = futures::future::join_all(topics.iter().filter_map(Topic::shard_channel).map(|channel| {
                let mut conn = conn.clone();
                async move { conn.ssubscribe(channel).await }
            }))
            .await;
            subscribed.into_iter().collect::<redis::RedisResult<Vec<()>>>()?;
            Ok::<_, redis::RedisError>((conn, topics))
        };
        let round = tokio::time::timeout(ROUND_TIMEOUT, round);
        ctx.spawn(actix::fut::wrap_future::<_, Supervised<Self>>(round).map(|result, s, ctx| {
            s.behaviour_mut().round_done(result, ctx);
        }));
    }

    fn round_done(
        &mut self,
        result: Result<redis::RedisResult<(ClusterConnection, Vec<Topic>)>, tokio::time::error::Elapsed>,
        ctx: &mut Ctx<Self>,
    ) {
        let error: Box<dyn std::fmt::Display> = match result {
            Ok(Ok((conn, subscribed))) => {
                self.publisher.set_cluster(Some(conn.clone()));
                // A topic added during the round is not among those it
                // subscribed, and a connection lost during it may have
                // taken some: one more round.
                let subscribed: HashSet<Topic> = subscribed.into_iter().collect();
                let missed = self.shard_topics().iter().any(|t| !subscribed.contains(t));
                let Some(shards) = self.shards.as_mut() else { return };
                shards.subscribing = false;
                shards.conn = Some(conn);
                if missed || shards.lost_during_round {
                    return self.subscribe_shards(ctx);
                }
                shards.backoff.reset();
                if !shards.up {
                    shards.up = true;
                    tracing::info!(bus = Bus::RedisCluster.as_str(), "bus up");
                    self.broadcast_on(Topic::is_shard, || BusEvent::Up(BusUp { bus: Bus::RedisCluster }));
                }
                return;
            }
            Ok(Err(error)) => Box::new(error),
            Err(elapsed) => Box::new(elapsed),
        };
        self.kernel.metrics().bus_error(Bus::RedisCluster, BusErrorKind::Connect, &error);
        // A round that timed out dropped its subscribes unconfirmed. (At
        // worst a subscribe of another caller is forgotten too, and a
        // confirmed unsubscribe of its topic brings a needless resync.)
        lock(&self.subscriptions).forget_subscribing();
        let Some(shards) = self.shards.as_mut() else { return };
        shards.subscribing = false;
        let delay = shards.backoff.next_delay();
        ctx.run_later(delay, |s, ctx| s.behaviour_mut().subscribe_shards(ctx));
    }

    /// Subscribes one shard topic (the table holds it already) and replies
    /// once the cluster confirmed it; while the cluster side is down the
    /// subscriber is told so and the round that brings it up subscribes it.
    ///
    /// The command goes out whenever there is a connection, also while a
    /// round runs: a round's `SSUBSCRIBE` of the topic may be undone by an
    /// `SUNSUBSCRIBE` sent after it. A failed one starts a round, whose
    /// `BusDown`/`BusUp` tell the subscriber to resync. No `BusUp` comes
    /// from here: one confirmed late could clear a `BusDown` of the round.
    pub(super) fn subscribe_shard(
        &mut self,
        topic: Topic,
        subscriber: Link<BusEvent>,
    ) -> Reply<Result<(), super::SubscribeError>> {
        let up = self.shards.as_ref().is_some_and(|s| s.up);
        if !up {
            let _ = subscriber.tell(BusEvent::Down(BusDown { bus: Bus::RedisCluster, reason: "not connected".into() }));
        }
        let conn = self.shards.as_ref().and_then(Shards::connection);
        let (Some(mut conn), Some(channel), Some(me)) = (conn, topic.shard_channel().map(str::to_owned), &self.me)
        else {
            return Reply::Now(Ok(()));
        };
        let (metrics, lost) = (self.kernel.metrics().clone(), me.link::<ShardsLost>("redis_cluster"));
        lock(&self.subscriptions).subscribing(topic.clone());
        let table = self.subscriptions.clone();
        Reply::later(async move {
            conn.ssubscribe(&channel).await.map_err(|e| {
                lock(&table).subscribed(&topic);
                metrics.bus_error(Bus::RedisCluster, BusErrorKind::Subscribe, &e);
                let _ = lost.tell(ShardsLost { reason: format!("subscribing {channel} failed: {e}") });
                super::SubscribeError::from(e)
            })
        })
    }

    /// Unsubscribes shard `topics` on the cluster, when connected; a round
    /// that subscribes again takes only what the table holds.
    pub(super) fn unsubscribe_shards(&self, topics: &[Topic]) {
        let Some(conn) = self.shards.as_ref().and_then(Shards::connection) else { return };
        let channels: Vec<String> = topics.iter().filter_map(|t| t.shard_channel().map(str::to_owned)).collect();
        if channels.is_empty() {
            return;
        }
        let metrics = self.kernel.metrics().clone();
        actix::spawn(async move {
            let unsubscribed = futures::future::join_all(channels.iter().map(|channel| {
                let mut conn = conn.clone();
                async move { conn.sunsubscribe(channel).await }
            }));
            for error in unsubscribed.await.into_iter().filter_map(Result::err) {
                metrics.bus_error(Bus::RedisCluster, BusErrorKind::Unsubscribe, &error);
            }
        });
    }
}

impl Handler<ShardsLost> for RedisBridge {
    fn handle(&mut self, msg: ShardsLost, ctx: &mut Ctx<Self>) -> Reply<()> {
        let Some(shards) = self.shards.as_mut() else { return Reply::Now(()) };
        self.kernel.metrics().bus_error(Bus::RedisCluster, BusErrorKind::Disconnected, &msg.reason);
        shards.lost_during_round = shards.subscribing;
        if shards.up {
            shards.up = false;
            let reason = Arc::new(msg.reason);
            self.broadcast_on(Topic::is_shard, || {
                BusEvent::Down(BusDown { bus: Bus::RedisCluster, reason: reason.to_string() })
            });
        }
        self.subscribe_shards(ctx);
        Reply::Now(())
    }
}
