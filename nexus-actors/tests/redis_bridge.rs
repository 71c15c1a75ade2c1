//! RedisBridge against a real redis-server started by the test.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Arbiter;
use common::Collector;
use nexus_actors::bus::redis::{
    PublishError, RedisBridge, Subscribe, Topic, Unsubscribe, MAX_PUBLISHES_IN_FLIGHT, RESUBSCRIBE_CHUNK,
};
use nexus_actors::bus::BusEvent;
use nexus_actors::telemetry::Metrics;
use nexus_actors::{ActorRef, Envelope, Kernel, Link};
use nexus_testkit::{eventually, Brokers};
use redis::aio::MultiplexedConnection;
use serde_json::json;

fn messages(events: &Mutex<Vec<BusEvent>>) -> Vec<(String, Option<String>, u64)> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            BusEvent::Message(m) => Some((m.channel.clone(), m.pattern.clone(), m.envelope.data["n"].as_u64()?)),
            _ => None,
        })
        .collect()
}

fn count_up(events: &Mutex<Vec<BusEvent>>) -> usize {
    events.lock().unwrap().iter().filter(|e| matches!(e, BusEvent::Up(_))).count()
}

fn count_down(events: &Mutex<Vec<BusEvent>>) -> usize {
    events.lock().unwrap().iter().filter(|e| matches!(e, BusEvent::Down(_))).count()
}

fn ping(n: u64) -> Envelope {
    Envelope::with_type("nexus.test.ping", "test", json!({ "n": n }))
}

#[actix_rt::test]
async fn subscribers_receive_typed_messages_and_bad_bytes_are_counted() {
    let brokers = Brokers::redis("redis-pubsub");
    let server = &brokers.redis;
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), &server.url()).unwrap();
    let exact_events = Arc::new(Mutex::new(Vec::new()));
    let pattern_events = Arc::new(Mutex::new(Vec::new()));
    let (e1, e2) = (exact_events.clone(), pattern_events.clone());
    let exact = kernel.spawn("exact", move || Collector { events: e1.clone() });
    let pattern = kernel.spawn("pattern", move || Collector { events: e2.clone() });

    let subscribe = bridge.link::<Subscribe>("test");
    subscribe
        .ask(Subscribe { topic: Topic::Channel("nexus:doc:1".into()), subscriber: exact.link("redis-bridge") })
        .await
        .unwrap()
        .unwrap();
    subscribe
        .ask(Subscribe { topic: Topic::Pattern("nexus:doc:*".into()), subscriber: pattern.link("redis-bridge") })
        .await
        .unwrap()
        .unwrap();
    eventually(10, "both subscribers told the bus is up", || count_up(&exact_events) + count_up(&pattern_events) >= 2)
        .await;

    let publish = bridge.publisher.clone();
    for n in 0..10 {
        let receivers = publish.publish("nexus:doc:1", ping(n)).await.unwrap();
        assert_eq!(receivers, 2, "one connection subscribed twice (channel and pattern)");
    }
    eventually(10, "ten messages each", || {
        messages(&exact_events).len() == 10 && messages(&pattern_events).len() == 10
    })
    .await;
    let exact_seen = messages(&exact_events);
    assert_eq!(exact_seen, (0..10).map(|n| ("nexus:doc:1".to_owned(), None, n)).collect::<Vec<_>>());
    assert!(messages(&pattern_events).iter().all(|(_, p, _)| p.as_deref() == Some("nexus:doc:*")));

    // Garbage on the channel is counted and dropped; delivery goes on.
    let raw = redis::Client::open(server.url()).unwrap();
    let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH").arg("nexus:doc:1").arg(b"{not json").query_async(&mut conn).await.unwrap();
    publish.publish("nexus:doc:1", ping(10)).await.unwrap();
    eventually(10, "message after garbage", || messages(&exact_events).len() == 11).await;
    // Redis delivers the garbage once per matching subscription: channel and pattern.
    assert_eq!(Metrics::counter_value(&kernel.metrics().bus_errors, &["redis", "decode"]), 2);

    // After unsubscribing, only the pattern subscriber hears the channel.
    bridge
        .link::<Unsubscribe>("test")
        .ask(Unsubscribe { topic: Topic::Channel("nexus:doc:1".into()), subscriber: "exact".into() })
        .await
        .unwrap();
    // Publishes travel on connections of their own, not behind the
    // bridge's UNSUBSCRIBE: wait for Redis to have dropped the channel.
    let mut conn = redis_conn(&brokers).await;
    until_numsub(&mut conn, &["nexus:doc:1".to_owned()], 0, "exact channel unsubscribed").await;
    publish.publish("nexus:doc:1", ping(11)).await.unwrap();
    eventually(10, "pattern subscriber got 12", || messages(&pattern_events).len() == 12).await;
    assert_eq!(messages(&exact_events).len(), 11);

    assert_eq!(Metrics::counter_value(&kernel.metrics().bus_published, &["redis", "nexus:doc"]), 12);
    assert_eq!(Metrics::counter_value(&kernel.metrics().bus_received, &["redis", "nexus:doc"]), 2 * 10 + 2 + 2 + 1);
    let graph = kernel.graph().snapshot();
    assert!(graph.edges.iter().any(|e| e.from == "redis-bridge" && e.to == "pattern" && e.count >= 12));
}

#[actix_rt::test]
async fn reconnects_and_resubscribes_after_redis_restarts() {
    let mut brokers = Brokers::redis("redis-restart");
    let server = &mut brokers.redis;
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), &server.url()).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let collector = kernel.spawn("collector", move || Collector { events: e.clone() });
    bridge
        .link::<Subscribe>("test")
        .ask(Subscribe { topic: Topic::Channel("nexus:panel:p1".into()), subscriber: collector.link("redis-bridge") })
        .await
        .unwrap()
        .unwrap();
    eventually(10, "bus up", || count_up(&events) >= 1).await;
    let publish = bridge.publisher.clone();
    publish.publish("nexus:panel:p1", ping(1)).await.unwrap();
    eventually(10, "first message", || messages(&events).len() == 1).await;

    let downs = count_down(&events);
    server.kill();
    eventually(10, "subscriber told the bus is down", || count_down(&events) == downs + 1).await;
    let failed = publish.publish("nexus:panel:p1", ping(2)).await;
    let handed_back = match failed {
        Err(err @ PublishError::Unavailable(_)) | Err(err @ PublishError::Redis { .. }) => err.into_envelope(),
        Err(PublishError::Busy(_)) => panic!("one publish cannot be too many"),
        Ok(_) => panic!("publish to a dead redis succeeded"),
    };
    assert_eq!(handed_back.data["n"], 2, "the unsent envelope is handed back");

    server.restart().unwrap();
    let ups_before = count_up(&events);
    eventually(15, "subscriber told the bus is up again", || count_up(&events) > ups_before).await;
    publish.publish("nexus:panel:p1", handed_back).await.unwrap();
    eventually(10, "message after restart", || messages(&events).len() == 2).await;
    assert_eq!(messages(&events).last().unwrap().2, 2);
    assert!(Metrics::counter_value(&kernel.metrics().bus_errors, &["redis", "disconnected"]) >= 1);
}

/// Blocks its thread on the first message until released; tiny mailbox.
struct Stuck {
    gate: Arc<Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
    events: Arc<Mutex<Vec<BusEvent>>>,
}

impl nexus_actors::Behaviour for Stuck {
    const KIND: &'static str = "stuck";
    const MAILBOX: usize = 4;
}

impl nexus_actors::Handler<BusEvent> for Stuck {
    fn handle(&mut self, event: BusEvent, _: &mut nexus_actors::Ctx<Self>) -> nexus_actors::Reply<()> {
        if matches!(event, BusEvent::Message(_)) {
            let gate = self.gate.lock().unwrap().take();
            if let Some(rx) = gate {
                let _ = rx.recv();
            }
        }
        self.events.lock().unwrap().push(event);
        nexus_actors::Reply::Now(())
    }
}

#[actix_rt::test]
async fn a_stuck_subscriber_loses_messages_but_never_stalls_the_others() {
    let brokers = Brokers::redis("redis-stuck");
    let server = &brokers.redis;
    let kernel = Kernel::new("test");
    let (bridge_arbiter, stuck_arbiter) = (Arbiter::new(), Arbiter::new());
    let bridge = RedisBridge::spawn(&kernel, &bridge_arbiter.handle(), &server.url()).unwrap();
    let (release, gate) = std::sync::mpsc::channel();
    let gate = Arc::new(Mutex::new(Some(gate)));
    let (stuck_events, healthy_events) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let (g, se, he) = (gate.clone(), stuck_events.clone(), healthy_events.clone());
    let stuck =
        kernel.spawn_on(&stuck_arbiter.handle(), "stuck", move || Stuck { gate: g.clone(), events: se.clone() });
    let healthy = kernel.spawn("healthy", move || Collector { events: he.clone() });
    let subscribe = bridge.link::<Subscribe>("test");
    for link in [stuck.link("redis-bridge"), healthy.link("redis-bridge")] {
        subscribe
            .ask(Subscribe { topic: Topic::Channel("nexus:doc:slow".into()), subscriber: link })
            .await
            .unwrap()
            .unwrap();
    }
    eventually(10, "healthy subscriber live", || count_up(&healthy_events) >= 1).await;
    eventually(10, "stuck subscriber live", || count_up(&stuck_events) >= 1).await;

    let publish = bridge.publisher.clone();
    for n in 0..200 {
        publish.publish("nexus:doc:slow", ping(n)).await.unwrap();
    }
    eventually(10, "healthy subscriber got all 200 while the other is stuck", || {
        messages(&healthy_events).len() == 200
    })
    .await;
    let dropped = Metrics::counter_value(&kernel.metrics().mailbox_dropped, &["stuck"]);
    assert!(dropped >= 190, "stuck subscriber should have refused most messages, dropped {dropped}");

    release.send(()).unwrap();
    eventually(10, "stuck subscriber drains what it accepted", || {
        messages(&stuck_events).len() as u64 == 200 - dropped
    })
    .await;
    let got: Vec<u64> = messages(&stuck_events).iter().map(|m| m.2).collect();
    assert!(got.windows(2).all(|w| w[0] < w[1]), "what it kept stays in order: {got:?}");
}

async fn redis_conn(brokers: &Brokers) -> MultiplexedConnection {
    redis::Client::open(brokers.redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Subscribers of all `channels` together, as Redis counts them.
async fn numsub(conn: &mut MultiplexedConnection, channels: &[String]) -> u64 {
    let mut total = 0;
    for chunk in channels.chunks(1000) {
        let counts: Vec<(String, u64)> = redis::cmd("PUBSUB").arg("NUMSUB").arg(chunk).query_async(conn).await.unwrap();
        total += counts.iter().map(|(_, n)| n).sum::<u64>();
    }
    total
}

/// Polls Redis until `channels` have `expected` subscribers together.
async fn until_numsub(conn: &mut MultiplexedConnection, channels: &[String], expected: u64, what: &str) {
    let mut seen = 0;
    for _ in 0..1000 {
        seen = numsub(conn, channels).await;
        if seen == expected {
            return;
        }
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: {seen} subscribers, not {expected}");
}

/// `SUBSCRIBE` commands the server ran since it started.
async fn subscribe_commands(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    let Some(line) = info.lines().find(|l| l.starts_with("cmdstat_subscribe:")) else { return 0 };
    let calls = line.split(['=', ',']).nth(1).unwrap();
    calls.parse().unwrap()
}

fn collector(kernel: &Kernel, id: &str) -> (ActorRef<Collector>, Arc<Mutex<Vec<BusEvent>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    (kernel.spawn(id, move || Collector { events: e.clone() }), events)
}

async fn subscribe(link: &Link<Subscribe>, topic: Topic, subscriber: &ActorRef<Collector>) {
    link.ask(Subscribe { topic, subscriber: subscriber.link("redis-bridge") }).await.unwrap().unwrap();
}

#[actix_rt::test]
async fn a_topic_goes_with_its_last_subscriber_in_the_node_and_in_redis() {
    let brokers = Brokers::redis("redis-topic-lifetime");
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), &brokers.redis_url()).unwrap();
    let topics = || kernel.metrics().redis_subscriptions.get();
    let mut conn = redis_conn(&brokers).await;
    let (link, unsubscribe) = (bridge.link::<Subscribe>("test"), bridge.link::<Unsubscribe>("test"));
    let (a, _) = collector(&kernel, "a");
    let (b, _) = collector(&kernel, "b");
    let channel = "nexus:doc:lifetime".to_owned();

    subscribe(&link, Topic::Channel(channel.clone()), &a).await;
    subscribe(&link, Topic::Channel(channel.clone()), &b).await;
    subscribe(&link, Topic::Channel(channel.clone()), &b).await;
    assert_eq!(topics(), 1);
    assert_eq!(numsub(&mut conn, std::slice::from_ref(&channel)).await, 1, "one Redis subscription for the node");

    unsubscribe.ask(Unsubscribe { topic: Topic::Channel(channel.clone()), subscriber: "a".into() }).await.unwrap();
    assert_eq!((topics(), numsub(&mut conn, std::slice::from_ref(&channel)).await), (1, 1), "b still follows it");
    unsubscribe.ask(Unsubscribe { topic: Topic::Channel(channel.clone()), subscriber: "b".into() }).await.unwrap();
    assert_eq!(topics(), 0);
    until_numsub(&mut conn, std::slice::from_ref(&channel), 0, "unsubscribed on Redis").await;
    // Unsubscribing what nobody follows changes nothing.
    unsubscribe.ask(Unsubscribe { topic: Topic::Channel(channel.clone()), subscriber: "b".into() }).await.unwrap();
    assert_eq!(topics(), 0);

    // Subscribers that stop without unsubscribing: the next delivery finds
    // their links closed and the topic goes, channel and pattern alike.
    let pattern = "nexus:gone:*".to_owned();
    subscribe(&link, Topic::Channel(channel.clone()), &a).await;
    subscribe(&link, Topic::Pattern(pattern.clone()), &b).await;
    assert_eq!(topics(), 2);
    a.stop();
    b.stop();
    eventually(10, "both stopped", || !a.is_alive() && !b.is_alive()).await;
    let publish = bridge.publisher.clone();
    for target in [channel.clone(), "nexus:gone:1".to_owned()] {
        publish.publish(target, ping(0)).await.unwrap();
    }
    eventually(10, "both topics dropped", || topics() == 0).await;
    until_numsub(&mut conn, &[channel], 0, "channel unsubscribed on Redis").await;
    let patterns: u64 = redis::cmd("PUBSUB").arg("NUMPAT").query_async(&mut conn).await.unwrap();
    let mut patterns = patterns;
    for _ in 0..500 {
        if patterns == 0 {
            break;
        }
        actix::clock::sleep(Duration::from_millis(20)).await;
        patterns = redis::cmd("PUBSUB").arg("NUMPAT").query_async(&mut conn).await.unwrap();
    }
    assert_eq!(patterns, 0, "pattern unsubscribed on Redis");
}

#[actix_rt::test]
async fn ten_thousand_topics_come_back_after_a_restart_in_a_few_commands() {
    let mut brokers = Brokers::redis("redis-many");
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), &brokers.redis_url()).unwrap();
    let (collector, events) = collector(&kernel, "collector");
    let link = bridge.link::<Subscribe>("test");
    let channels: Vec<String> = (0..10_000).map(|i| format!("nexus:many:{i}")).collect();
    for channel in &channels {
        subscribe(&link, Topic::Channel(channel.clone()), &collector).await;
    }
    subscribe(&link, Topic::Pattern("nexus:many:*".into()), &collector).await;
    assert_eq!(kernel.metrics().redis_subscriptions.get(), 10_001);

    // Those that came while the bridge was still connecting were told
    // the bus is down (and up again once they were subscribed).
    let downs = count_down(&events);
    brokers.redis.kill();
    // Once, however many topics it follows.
    eventually(10, "told the bus is down", || count_down(&events) == downs + 1).await;
    brokers.redis.restart().unwrap();
    let ups = count_up(&events);
    eventually(30, "told the bus is up again", || count_up(&events) > ups).await;
    actix::clock::sleep(Duration::from_millis(200)).await;
    assert_eq!(count_up(&events), ups + 1, "told once");
    let mut conn = redis_conn(&brokers).await;
    assert_eq!(numsub(&mut conn, &channels).await, 10_000, "every channel is back");
    let patterns: u64 = redis::cmd("PUBSUB").arg("NUMPAT").query_async(&mut conn).await.unwrap();
    assert_eq!(patterns, 1, "the pattern is back");
    // The restarted server counted every command since it started.
    let commands = subscribe_commands(&mut conn).await;
    assert_eq!(commands, channels.len().div_ceil(RESUBSCRIBE_CHUNK) as u64, "one SUBSCRIBE per chunk");

    let last = channels.last().unwrap().clone();
    bridge.publisher.clone().publish(last.clone(), ping(7)).await.unwrap();
    eventually(10, "the message after the restart, by channel and by pattern", || {
        let seen = messages(&events);
        seen.contains(&(last.clone(), None, 7)) && seen.contains(&(last.clone(), Some("nexus:many:*".into()), 7))
    })
    .await;
}

#[actix_rt::test]
async fn publishes_from_many_callers_share_one_bound_and_local_fan_out_shares_one_message() {
    let brokers = Brokers::redis("redis-bound");
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bus = RedisBridge::spawn(&kernel, &arbiter.handle(), &brokers.redis_url()).unwrap();
    let (a, a_events) = collector(&kernel, "a");
    let (b, b_events) = collector(&kernel, "b");
    let link = bus.link::<Subscribe>("test");
    subscribe(&link, Topic::Channel("nexus:bound".into()), &a).await;
    subscribe(&link, Topic::Channel("nexus:bound".into()), &b).await;
    eventually(10, "both subscribers live", || count_up(&a_events) >= 1 && count_up(&b_events) >= 1).await;

    // Every publish takes its place in the bound on its first poll, before
    // any answer can free one: the ones past it are refused at once.
    let over = 50;
    let publishes = (0..(MAX_PUBLISHES_IN_FLIGHT + over) as u64).map(|n| {
        let publisher = bus.publisher.clone();
        async move { publisher.publish("nexus:bound", ping(n)).await }
    });
    let results = futures::future::join_all(publishes).await;
    let busy: Vec<u64> = results
        .into_iter()
        .filter_map(|r| match r {
            Ok(receivers) => {
                assert_eq!(receivers, 1, "one Redis client (the bridge's) receives each");
                None
            }
            Err(PublishError::Busy(envelope)) => Some(envelope.data["n"].as_u64().unwrap()),
            Err(other) => panic!("publish failed: {other}"),
        })
        .collect();
    let expected: Vec<u64> = (MAX_PUBLISHES_IN_FLIGHT as u64..(MAX_PUBLISHES_IN_FLIGHT + over) as u64).collect();
    assert_eq!(busy, expected, "the publishes past the bound are handed back, nothing else");
    assert_eq!(Metrics::counter_value(&kernel.metrics().bus_errors, &["redis", "publish_busy"]), over as u64);
    eventually(10, "every accepted publish delivered to both", || {
        messages(&a_events).len() == MAX_PUBLISHES_IN_FLIGHT && messages(&b_events).len() == MAX_PUBLISHES_IN_FLIGHT
    })
    .await;

    // With the bound free again, publishing works as before.
    bus.publisher.publish("nexus:bound", ping(9999)).await.unwrap();
    eventually(10, "the last one delivered", || messages(&b_events).len() == MAX_PUBLISHES_IN_FLIGHT + 1).await;
    let last = |events: &Mutex<Vec<BusEvent>>| match events.lock().unwrap().last() {
        Some(BusEvent::Message(m)) => m.clone(),
        other => panic!("expected a message, got {other:?}"),
    };
    assert!(Arc::ptr_eq(&last(&a_events), &last(&b_events)), "both subscribers hold the one decoded message");
}

/// A bridge whose plain Redis takes connections and never answers still
/// subscribes and delivers the shard topics it has on a cluster: the plain
/// side connects beside the bridge's mailbox, not in front of it.
#[actix_rt::test]
async fn a_plain_redis_that_hangs_does_not_hold_the_cluster_side() {
    let dir = nexus_testkit::tempdir("redis-hung-plain");
    let cluster = nexus_actors::infra::RedisCluster::start(&dir, 3, 0).expect("a redis cluster starts");
    // The kernel completes the handshakes; nobody reads or answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/", hung.local_addr().unwrap());
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn_with_cluster(&kernel, &arbiter.handle(), &url, &cluster.urls()).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    let collector = kernel.spawn("collector", move || Collector { events: e.clone() });
    let (plain, shard) = (Topic::Channel("nexus:panel:p1".into()), Topic::Shard("nexus:doc:{d1}".into()));
    for topic in [plain, shard] {
        let subscribe = Subscribe { topic, subscriber: collector.link("redis-bridge") };
        // Within the 5 s that one plain connection attempt may take.
        let asked = tokio::time::timeout(Duration::from_secs(3), bridge.link::<Subscribe>("test").ask(subscribe)).await;
        assert!(matches!(asked, Ok(Ok(Ok(())))), "{asked:?}");
    }
    eventually(10, "the cluster side is up", || count_up(&events) >= 1).await;
    bridge.publisher.publish_shard("nexus:doc:{d1}", ping(7)).await.unwrap();
    eventually(10, "the shard message arrives", || messages(&events) == [("nexus:doc:{d1}".into(), None, 7)]).await;
    let downs =
        events.lock().unwrap().iter().filter(|e| matches!(e, BusEvent::Down(d) if d.bus.as_str() == "redis")).count();
    assert!(downs >= 1, "the plain topic's subscriber is told its bus is down");
    drop(hung);
}
