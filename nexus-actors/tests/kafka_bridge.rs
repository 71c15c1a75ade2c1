//! KafkaBridge against a real tansu broker started by the test.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Arbiter;
use common::{eventually, tempdir, Recorder, Seen};
use nexus_actors::bus::kafka::{
    ensure_topics, locate, Consume, ConsumerId, Delivered, KafkaBridge, KafkaConfig, KafkaRecord, Nack, Produce,
    Replay, ReplayFrom, Sought, StopConsumer, SEMANTIC_COMMANDS, SEMANTIC_EVENTS,
};
use nexus_actors::infra::{Tansu, TansuStorage};

use nexus_actors::telemetry::Metrics;
use nexus_actors::{ActorRef, Behaviour, Ctx, Envelope, Handler, Kernel, Reply};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

fn event(seq: u64) -> Envelope {
    Envelope::with_type("nexus.test.event", "test", json!({ "seq": seq }))
}

async fn produce(bridge: &ActorRef<KafkaBridge>, topic: &str, seqs: std::ops::Range<u64>) -> Vec<Delivered> {
    let link = bridge.link::<Produce>("test");
    let mut out = Vec::new();
    for seq in seqs {
        let produce = Produce { topic: topic.into(), key: format!("ctx-{}", seq % 5), envelope: event(seq) };
        out.push(link.ask(produce).await.unwrap().unwrap());
    }
    out
}

/// Starts a consumer in `group` on `topic` that delivers to `subscriber`.
async fn consume(
    bridge: &ActorRef<KafkaBridge>,
    group: &str,
    topic: &str,
    subscriber: &ActorRef<Recorder>,
) -> ConsumerId {
    let consume =
        Consume { group: group.into(), topics: vec![topic.into()], subscriber: subscriber.link("kafka-bridge") };
    bridge.link::<Consume>("test").ask(consume).await.unwrap().unwrap()
}

fn recorder(kernel: &Kernel, id: &str) -> (ActorRef<Recorder>, Arc<Mutex<Seen>>) {
    faulty_recorder(kernel, id, None, None)
}

/// A recorder that refuses `nack` once and panics on `panic` once (the
/// "once" survives the restart that the panic causes).
fn faulty_recorder(
    kernel: &Kernel,
    id: &str,
    nack: Option<u64>,
    panic: Option<u64>,
) -> (ActorRef<Recorder>, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (nack, panic) = (Arc::new(Mutex::new(nack)), Arc::new(Mutex::new(panic)));
    let s = seen.clone();
    let actor =
        kernel.spawn(id, move || Recorder { seen: s.clone(), nack_once: nack.clone(), panic_once: panic.clone() });
    (actor, seen)
}

fn acked_seqs(seen: &Mutex<Seen>) -> BTreeSet<u64> {
    acked_seqs_of(&seen.lock().unwrap())
}

/// Offsets the group has committed, per partition (absent: none yet).
fn committed(brokers: &str, group: &str, topic: &str) -> HashMap<i32, i64> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(topic, p);
    }
    let got = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    got.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

#[actix_rt::test]
async fn acknowledged_delivery_redelivery_bad_records_and_replay() {
    let tansu = Tansu::start(&tempdir("kafka-ack"), TansuStorage::Memory).unwrap();
    let config = KafkaConfig::new(tansu.brokers());
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = KafkaBridge::spawn(&kernel, &arbiter.handle(), config.clone()).await.unwrap();
    // Spawning created the semantic topics; asking again is not an error.
    let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", tansu.brokers()).create().unwrap();
    let metadata = probe.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    for topic in [SEMANTIC_COMMANDS, SEMANTIC_EVENTS] {
        let found = metadata.topics().iter().find(|t| t.name() == topic).expect("semantic topic created");
        assert_eq!(found.partitions().len(), 3);
    }
    ensure_topics(&config, &[SEMANTIC_COMMANDS, SEMANTIC_EVENTS]).await.unwrap();
    ensure_topics(&config, &["test.ack"]).await.unwrap();

    let first = produce(&bridge, "test.ack", 0..25).await;
    actix::clock::sleep(Duration::from_millis(300)).await;
    let middle = chrono::Utc::now().timestamp_millis();
    actix::clock::sleep(Duration::from_millis(300)).await;
    produce(&bridge, "test.ack", 25..50).await;
    assert_eq!(first.len(), 25);

    // A record that is not an envelope at all.
    let raw: FutureProducer = ClientConfig::new().set("bootstrap.servers", tansu.brokers()).create().unwrap();
    raw.send(FutureRecord::to("test.ack").key("ctx-0").payload("{garbage"), Timeout::After(Duration::from_secs(10)))
        .await
        .unwrap();
    produce(&bridge, "test.ack", 50..51).await;

    let (rec, seen) = faulty_recorder(&kernel, "recorder", Some(7), Some(13));
    let consumer = consume(&bridge, "g-ack", "test.ack", &rec).await;
    eventually(60, "all 51 records acknowledged", || acked_seqs(&seen).len() == 51).await;

    {
        let seen_now = seen.lock().unwrap();
        let attempts_of = |seq| seen_now.attempts.iter().filter(|a| a.2 == seq).count();
        assert_eq!(attempts_of(7), 2, "a nacked record is delivered again");
        assert_eq!(attempts_of(13), 2, "a record whose handler panicked is delivered again");
        assert_eq!(seen_now.acked.len(), 51, "each record acknowledged exactly once");
        // Per key (context id) the order of production is kept.
        for key in 0..5 {
            let order: Vec<u64> = seen_now
                .keys
                .iter()
                .filter(|(k, _)| k.as_deref() == Some(&format!("ctx-{key}")))
                .map(|(_, s)| *s)
                .collect();
            assert!(order.windows(2).all(|w| w[0] < w[1]), "key ctx-{key} out of order: {order:?}");
        }
    }
    assert_eq!(Metrics::counter_value(&kernel.metrics().bus_redelivered, &["kafka", "test.ack"]), 2);
    assert_eq!(Metrics::counter_value(&kernel.metrics().bus_errors, &["kafka", "decode"]), 1);
    bridge.link::<StopConsumer>("test").ask(StopConsumer(consumer)).await.unwrap();

    // Replay from the beginning, and from a point in time.
    let (replayer, replayed) = recorder(&kernel, "replayer");
    let replay = bridge.link::<Replay>("test");
    let n = replay
        .ask(Replay {
            topic: "test.ack".into(),
            from: ReplayFrom::Offset(0),
            subscriber: replayer.link("kafka-bridge"),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 51);
    assert_eq!(acked_seqs(&replayed), (0..51).collect());
    let (late, late_seen) = recorder(&kernel, "late-replayer");
    let n = replay
        .ask(Replay {
            topic: "test.ack".into(),
            from: ReplayFrom::Timestamp(middle),
            subscriber: late.link("kafka-bridge"),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(acked_seqs(&late_seen), (25..51).collect(), "replay from a timestamp starts there");
    assert_eq!(n, 26);
}

#[actix_rt::test]
async fn consumer_restart_mid_stream_loses_nothing_and_repeats_nothing_committed() {
    let tansu = Tansu::start(&tempdir("kafka-restart"), TansuStorage::Memory).unwrap();
    let config = KafkaConfig::new(tansu.brokers());
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = KafkaBridge::spawn(&kernel, &arbiter.handle(), config.clone()).await.unwrap();
    ensure_topics(&config, &["test.restart"]).await.unwrap();
    produce(&bridge, "test.restart", 0..100).await;

    let (first, first_seen) = recorder(&kernel, "first");
    let id = consume(&bridge, "g-restart", "test.restart", &first).await;
    eventually(60, "first consumer acknowledged some", || acked_seqs(&first_seen).len() >= 30).await;
    bridge.link::<StopConsumer>("test").ask(StopConsumer(id)).await.unwrap();
    let committed_at_stop = committed(&tansu.brokers(), "g-restart", "test.restart");
    assert!(!committed_at_stop.is_empty(), "stopping commits what was acknowledged");
    let acked_by_first = acked_seqs(&first_seen);

    let (second, second_seen) = recorder(&kernel, "second");
    consume(&bridge, "g-restart", "test.restart", &second).await;
    eventually(60, "every record acknowledged by one of the two", || {
        acked_by_first.union(&acked_seqs(&second_seen)).count() == 100
    })
    .await;
    for (partition, offset, seq) in &second_seen.lock().unwrap().attempts {
        let committed = committed_at_stop.get(partition).copied().unwrap_or(0);
        assert!(
            *offset >= committed,
            "seq {seq} at {partition}@{offset} redelivered below committed offset {committed}"
        );
    }
}

#[actix_rt::test]
async fn broker_restart_mid_stream_loses_nothing_and_repeats_nothing_committed() {
    assert!(Tansu::supports_sqlite(), "this test needs tansu with the libsql feature (scripts/test installs it)");
    let mut tansu = Tansu::start(&tempdir("kafka-broker-restart"), TansuStorage::Sqlite).unwrap();
    let config = KafkaConfig::new(tansu.brokers());
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = KafkaBridge::spawn(&kernel, &arbiter.handle(), config.clone()).await.unwrap();
    ensure_topics(&config, &["test.broker"]).await.unwrap();
    let (rec, seen) = recorder(&kernel, "recorder");
    consume(&bridge, "g-broker", "test.broker", &rec).await;
    produce(&bridge, "test.broker", 0..40).await;
    eventually(60, "records before the restart acknowledged", || acked_seqs(&seen).len() == 40).await;
    // Let the periodic commit land, then note what the broker holds.
    actix::clock::sleep(Duration::from_millis(1500)).await;
    let committed_before = committed(&tansu.brokers(), "g-broker", "test.broker");
    assert!(!committed_before.is_empty(), "acknowledged offsets were committed");
    let attempts_before = seen.lock().unwrap().attempts.len();

    tansu.kill();
    // Produced while the broker is down: held by the producer and retried.
    let pending = {
        let link = bridge.link::<Produce>("test");
        actix::spawn(async move {
            let mut results = Vec::new();
            for seq in 40..60 {
                let produce =
                    Produce { topic: "test.broker".into(), key: format!("ctx-{}", seq % 5), envelope: event(seq) };
                results.push(link.ask(produce).await);
            }
            results
        })
    };
    actix::clock::sleep(Duration::from_secs(2)).await;
    tansu.restart().unwrap();
    for r in pending.await.unwrap() {
        assert!(matches!(r, Ok(Ok(_))), "produce across the restart failed: {r:?}");
    }
    eventually(90, "every record acknowledged", || acked_seqs(&seen).len() == 60).await;

    let seen = seen.lock().unwrap();
    for (partition, offset, seq) in &seen.attempts[attempts_before..] {
        let committed = committed_before.get(partition).copied().unwrap_or(0);
        assert!(
            *offset >= committed,
            "seq {seq} at {partition}@{offset} delivered again below committed offset {committed}"
        );
    }
    assert_eq!(acked_seqs_of(&seen), (0..60).collect(), "no acknowledged record lost");
}

fn acked_seqs_of(seen: &Seen) -> BTreeSet<u64> {
    seen.acked.iter().map(|a| a.2).collect()
}

/// Acknowledges every record at once, except the first of key `slow`,
/// which it holds until the test adds a permit to `gate`.
struct Gated {
    seen: Arc<Mutex<Seen>>,
    gate: Arc<tokio::sync::Semaphore>,
    held: bool,
}

impl Behaviour for Gated {
    const KIND: &'static str = "gated";
}

impl Handler<KafkaRecord> for Gated {
    fn handle(&mut self, record: KafkaRecord, _: &mut Ctx<Self>) -> Reply<Result<(), Nack>> {
        let seq = common::seq_of(&record);
        self.seen.lock().unwrap().attempts.push((record.partition, record.offset, seq));
        let slow = record.key.as_deref() == Some("slow");
        let ack = {
            let seen = self.seen.clone();
            move || {
                let mut seen = seen.lock().unwrap();
                seen.acked.push((record.partition, record.offset, seq));
                seen.keys.push((record.key, seq));
            }
        };
        if self.held || !slow {
            ack();
            return Reply::Now(Ok(()));
        }
        self.held = true;
        let gate = self.gate.clone();
        Reply::later(async move {
            gate.acquire().await.expect("gate open").forget();
            ack();
            Ok(())
        })
    }
}

#[actix_rt::test]
async fn a_slow_key_holds_up_only_itself_and_the_commit_stays_below_it() {
    let tansu = Tansu::start(&tempdir("kafka-lanes"), TansuStorage::Memory).unwrap();
    let config = KafkaConfig::new(tansu.brokers());
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = KafkaBridge::spawn(&kernel, &arbiter.handle(), config.clone()).await.unwrap();
    // One partition, so that every key shares it.
    ensure_topics(&KafkaConfig { partitions: 1, ..config.clone() }, &["test.lanes"]).await.unwrap();
    let link = bridge.link::<Produce>("test");
    for seq in 0..22u64 {
        let key = if seq == 0 || seq == 21 { "slow".to_owned() } else { format!("ctx-{}", seq % 4) };
        link.ask(Produce { topic: "test.lanes".into(), key, envelope: event(seq) }).await.unwrap().unwrap();
    }

    let seen = Arc::new(Mutex::new(Seen::default()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (s, g) = (seen.clone(), gate.clone());
    let gated = kernel.spawn("gated", move || Gated { seen: s.clone(), gate: g.clone(), held: false });
    let consume =
        Consume { group: "g-lanes".into(), topics: vec!["test.lanes".into()], subscriber: gated.link("kafka-bridge") };
    let id = bridge.link::<Consume>("test").ask(consume).await.unwrap().unwrap();

    eventually(60, "every other key's records acknowledged past the held one", || {
        acked_seqs(&seen) == (1..21).collect()
    })
    .await;
    // Two auto-commit intervals: whatever is stored has been committed.
    actix::clock::sleep(Duration::from_millis(1200)).await;
    let attempted: BTreeSet<u64> = seen.lock().unwrap().attempts.iter().map(|a| a.2).collect();
    assert!(!attempted.contains(&21), "the held key's next record waits for the held one");
    let committed_while_held = committed(&tansu.brokers(), "g-lanes", "test.lanes");
    assert_eq!(
        committed_while_held.get(&0).copied().unwrap_or(0),
        0,
        "nothing at or above the unacknowledged offset 0 is committed"
    );

    gate.add_permits(1);
    eventually(30, "the held key finishes, in order", || acked_seqs(&seen).len() == 22).await;
    let slow: Vec<u64> =
        seen.lock().unwrap().keys.iter().filter(|(k, _)| k.as_deref() == Some("slow")).map(|(_, s)| *s).collect();
    assert_eq!(slow, vec![0, 21]);
    bridge.link::<StopConsumer>("test").ask(StopConsumer(id)).await.unwrap();
    assert_eq!(committed(&tansu.brokers(), "g-lanes", "test.lanes").get(&0), Some(&22), "all 22 committed");
}

#[actix_rt::test]
async fn a_record_acknowledged_without_its_offset_is_found_by_its_envelope_id() {
    let tansu = Tansu::start(&tempdir("kafka-locate"), TansuStorage::Memory).unwrap();
    let config = KafkaConfig::new(tansu.brokers());
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = KafkaBridge::spawn(&kernel, &arbiter.handle(), config.clone()).await.unwrap();
    ensure_topics(&config, &["test.locate"]).await.unwrap();
    let link = bridge.link::<Produce>("test");
    let mut sent = Vec::new();
    for seq in 0..40 {
        let envelope = event(seq);
        let id = envelope.id.clone();
        // Two keys, so a key alone does not find a record.
        let key = format!("ctx-{}", seq % 2);
        let produce = Produce { topic: "test.locate".into(), key: key.clone(), envelope };
        let delivered = link.ask(produce).await.unwrap().unwrap();
        sent.push((Sought { topic: "test.locate".into(), partition: delivered.partition, key, id }, delivered.offset));
    }
    for (sought, offset) in [&sent[0], &sent[17], &sent[39]] {
        assert_eq!(locate(&config, sought.clone()).await.unwrap(), Some(*offset), "{sought:?}");
    }
    // An id that is not there, and a real id under another key, are not found.
    let (sought, _) = &sent[17];
    let missing = Sought { id: uuid::Uuid::now_v7().to_string(), ..sought.clone() };
    assert_eq!(locate(&config, missing).await.unwrap(), None);
    let other_key = Sought { key: "ctx-9".into(), ..sought.clone() };
    assert_eq!(locate(&config, other_key).await.unwrap(), None);
    arbiter.stop();
}

#[actix_rt::test]
async fn a_second_member_joining_the_group_takes_partitions_loses_nothing_and_repeats_only_what_was_in_flight() {
    let tansu = Tansu::start(&tempdir("kafka-rebalance"), TansuStorage::Memory).unwrap();
    let config = KafkaConfig::new(tansu.brokers());
    let kernel = Kernel::new("test");
    let arbiter = Arbiter::new();
    let bridge = KafkaBridge::spawn(&kernel, &arbiter.handle(), config.clone()).await.unwrap();
    ensure_topics(&config, &["test.rebalance"]).await.unwrap();
    produce(&bridge, "test.rebalance", 0..100).await;

    let (first, first_seen) = recorder(&kernel, "first");
    consume(&bridge, "g-rebalance", "test.rebalance", &first).await;
    eventually(60, "the first member acknowledged the first hundred", || acked_seqs(&first_seen).len() == 100).await;

    // A second member of the same group: the group rebalances under load.
    let (second, second_seen) = recorder(&kernel, "second");
    consume(&bridge, "g-rebalance", "test.rebalance", &second).await;
    let mut next = 100;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked_seqs(&second_seen).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the second member never got a partition");
        produce(&bridge, "test.rebalance", next..next + 10).await;
        next += 10;
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
    produce(&bridge, "test.rebalance", next..next + 100).await;
    next += 100;
    eventually(60, "every record acknowledged by one of the two", || {
        acked_seqs(&first_seen).union(&acked_seqs(&second_seen)).count() == next as usize
    })
    .await;
    let (by_first, by_second) = (acked_seqs(&first_seen), acked_seqs(&second_seen));
    // Offsets are stored once acknowledged and committed as the partitions
    // are revoked, so the second member starts where the first stopped: only
    // a record in flight at the revoke (at most one per key, the lanes'
    // order) may be handled by both. Without the commit at the revoke, every
    // record acknowledged since the last timed commit would be.
    let twice: Vec<&u64> = by_first.intersection(&by_second).collect();
    assert!(twice.len() <= 5, "handled by both members ({} and {}): {twice:?}", by_first.len(), by_second.len());
    arbiter.stop();
}
