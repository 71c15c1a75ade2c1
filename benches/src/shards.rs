//! Document fan-out on one Redis against a three-shard Redis Cluster: the
//! same bridge, publisher and subscriber, the same document channels and
//! load, measured one after the other in the same run. On one Redis a
//! document channel is a plain channel (`PUBLISH`/`SUBSCRIBE`); on the
//! cluster it is a sharded one (`SPUBLISH`/`SSUBSCRIBE` on the master of
//! its slot).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::Arbiter;
use futures::StreamExt;
use nexus_actors::bus::redis::{RedisBridge, Subscribe, Topic};
use nexus_actors::infra::{RedisCluster, RedisServer};
use nexus_actors::platform::channels;
use nexus_actors::Kernel;

use crate::{latency_rows, paced, ping, run_of, wait_for, Row, Run, Sink};

/// Documents the load is spread over, all followed.
const DOCUMENTS: usize = 256;

/// The rows: throughput, and paced p50 and p99, of the cluster (the Nexus
/// column) against one Redis (the baseline column).
pub(crate) async fn rows(dir: &Path, n: u64) -> Vec<Row> {
    let one = RedisServer::start(&dir.join("shards-one"), false).expect("redis-server");
    let single = fan_out(&one.url(), &[], n).await;
    drop(one);
    let plain = RedisServer::start(&dir.join("shards-plain"), false).expect("redis-server");
    let cluster = RedisCluster::start(&dir.join("shards-cluster"), 3, 0).expect("a redis cluster");
    let sharded = fan_out(&plain.url(), &cluster.urls(), n).await;
    let names = [
        "document fan-out, 3-shard cluster vs one redis",
        "document fan-out latency p50 (paced)",
        "document fan-out latency p99 (paced)",
    ];
    latency_rows(&names, n, &sharded, &single)
}

/// `n` changes spread over [`DOCUMENTS`] document channels, 64 publishes
/// in flight, through a bridge on `url` (and `cluster`), to one subscriber
/// of every channel; then `n / 5` of them paced.
async fn fan_out(url: &str, cluster: &[String], n: u64) -> Run {
    let kernel = Kernel::new("bench");
    let (bridge_arbiter, sink_arbiter) = (Arbiter::new(), Arbiter::new());
    let bus = RedisBridge::spawn_with_cluster(&kernel, &bridge_arbiter.handle(), url, cluster).expect("bridge");
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let l = latencies.clone();
    let sink = kernel.spawn_on(&sink_arbiter.handle(), "sink", move || Sink { latencies: l.clone() });
    let publish = bus.publisher.clone();
    // Publishes fail fast until the bridge's connections are up.
    while publish.publish_shard(channels::document("warmup"), ping(0)).await.is_err() {
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    let docs: Vec<String> = (0..DOCUMENTS).map(|_| channels::document(&uuid::Uuid::new_v4().to_string())).collect();
    for doc in &docs {
        let subscribe = Subscribe { topic: Topic::Shard(doc.clone()), subscriber: sink.link("redis-bridge") };
        bus.link::<Subscribe>("bench").ask(subscribe).await.expect("ask").expect("subscribe");
    }
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|seq| publish.publish_shard(docs[seq as usize % DOCUMENTS].clone(), ping(seq)))
        .buffer_unordered(64)
        .for_each(|r| async move {
            r.expect("publish");
        })
        .await;
    let end = wait_for(&latencies, n, Duration::from_secs(30)).await;
    let mut run = run_of(n, end - t, &latencies);
    let (p, docs) = (publish.clone(), Arc::new(docs));
    let (p50, p99) = paced(&latencies, n / 5, move |seq| {
        let (p, doc) = (p.clone(), docs[seq as usize % DOCUMENTS].clone());
        async move {
            p.publish_shard(doc, ping(seq)).await.expect("publish");
        }
    })
    .await;
    (run.p50, run.p99) = (p50, p99);
    bridge_arbiter.stop();
    sink_arbiter.stop();
    run
}
