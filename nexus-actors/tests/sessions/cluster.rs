//! Documents on a Redis Cluster (three masters, a replica each, started by
//! the test on loopback): each document's keys and its live changes stay
//! on the master of its hash slot, followers on two nodes get every change,
//! and a follower stays in sync when that master dies and its replica
//! takes over, or when the slot moves to another master. A node given the
//! cluster moves documents kept on its plain Redis there.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;

use nexus_actors::infra::RedisCluster;
use nexus_actors::node::Role;
use nexus_testkit::TestNode;
use redis::aio::MultiplexedConnection;
use serde_json::json;

use super::harness::*;

/// A plain connection to one node of the cluster (no redirects followed).
async fn node_conn(port: u16) -> MultiplexedConnection {
    let url = format!("redis://127.0.0.1:{port}/");
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// `PUBSUB SHARDCHANNELS nexus:doc:*` on one node: its own shard channels.
async fn shard_channels(conn: &mut MultiplexedConnection) -> Vec<String> {
    redis::cmd("PUBSUB").arg("SHARDCHANNELS").arg("nexus:doc:*").query_async(conn).await.unwrap()
}

/// Polls `conn`'s shard channels for up to 10 s until `channel` is there
/// (or, with `present` false, gone); whether it is at the end.
async fn until_shard_channel(conn: &mut MultiplexedConnection, channel: &str, present: bool) -> bool {
    for _ in 0..100 {
        if shard_channels(conn).await.iter().any(|c| c == channel) == present {
            break;
        }
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
    shard_channels(conn).await.iter().any(|c| c == channel)
}

#[actix_rt::test]
async fn documents_and_their_changes_stay_on_the_shard_of_their_slot() {
    let world = World::clustered("cluster-shards").await;
    let (a, b) = (world.node().await, world.node().await);
    let (ada_a, ada_b) = (a.login("ada").await, b.login("ada").await);
    let (mut ws_a, mut ws_b) = (connect(&a, &ada_a).await, connect(&b, &ada_b).await);
    let mut docs = Vec::new();
    for n in 0..12 {
        let id = new_doc(&ada_a, json!({ "n": n })).await;
        for ws in [&mut ws_a, &mut ws_b] {
            send(ws, json!({"type": "subscribe", "doc": id})).await;
            let snapshot = next(ws).await;
            assert_eq!((snapshot["type"].as_str(), snapshot["state"].clone()), (Some("snapshot"), json!({ "n": n })));
        }
        patch(&ada_b, &id, 1, json!({ "n": n + 100 })).await;
        for ws in [&mut ws_a, &mut ws_b] {
            let change = next(ws).await;
            assert_eq!(change, json!({"type": "change", "doc": id, "version": 2, "patch": { "n": n + 100 }}));
        }
        docs.push(id);
    }

    let cluster = world.cluster.as_ref().unwrap();
    let masters = cluster.masters().unwrap();
    assert_eq!(masters.len(), 3);
    let mut homes = HashSet::new();
    let mut published = std::collections::HashMap::<u16, u64>::new();
    for id in &docs {
        // The document's hash, its history and its channel share one name
        // tag, so one master holds and carries all of it.
        let (key, log, channel) = (format!("nexus:doc:{{{id}}}"), format!("nexus:doc:{{{id}}}:log"), key_channel(id));
        let home = cluster.master_of(&key).unwrap();
        assert_eq!(cluster.master_of(&log).unwrap(), home);
        homes.insert(home);
        // Two presence joins (one per follower) and the change.
        *published.entry(home).or_default() += 3;
        let mut conn = node_conn(home).await;
        let version: u64 = redis::cmd("HGET").arg(&key).arg("version").query_async(&mut conn).await.unwrap();
        assert_eq!(version, 2, "{key} lives on master {home}");
        for port in &masters {
            let here = shard_channels(&mut node_conn(*port).await).await.contains(&channel);
            assert_eq!(here, *port == home, "{channel} is subscribed on master {port}: {here}; its home is {home}");
        }
    }
    assert!(homes.len() >= 2, "twelve documents spread over more than one master: {homes:?}");
    // Each change was published once, on its document's master only.
    for port in &masters {
        let spublish = command_calls(&mut node_conn(*port).await, "spublish").await;
        assert_eq!(spublish, published.get(port).copied().unwrap_or(0), "SPUBLISH calls on master {port}");
    }
    // The plain Redis holds no document and carried none of their changes.
    let mut plain = world.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg("nexus:doc*").query_async(&mut plain).await.unwrap();
    assert!(keys.is_empty(), "documents on the plain redis: {keys:?}");
    assert_eq!(command_calls(&mut plain, "publish").await, 0);
    assert!(doc_channels(&mut plain).await.is_empty());

    // Unfollowed and followed again at once, twenty times: node a's bridge
    // unsubscribes and subscribes the channel in turn, and the late
    // confirmations of its own unsubscribes are not taken for the cluster
    // dropping a followed channel (which would resync every follower).
    let id = &docs[1];
    for _ in 0..20 {
        send(&mut ws_a, json!({"type": "unsubscribe", "doc": id})).await;
        send(&mut ws_a, json!({"type": "subscribe", "doc": id})).await;
    }
    // A follow whose snapshot was still being fetched when the next
    // unfollow came sends none: take what came until the frames stop.
    let mut snapshots = 0;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_millis(500), ws_a.next()).await {
        snapshots += frame.to_text().unwrap().contains(r#""type":"snapshot""#) as usize;
    }
    assert!(snapshots >= 1, "the last follow was answered");
    patch(&ada_b, id, 2, json!({"n": 0})).await;
    for ws in [&mut ws_a, &mut ws_b] {
        assert_eq!(next(ws).await, json!({"type": "change", "doc": id, "version": 3, "patch": {"n": 0}}));
    }
    round_trip(&mut ws_a).await;
    let resyncs = a.kernel.metrics().bus_errors.with_label_values(&["redis_cluster", "disconnected"]).get();
    assert_eq!(resyncs, 0, "node a resubscribed its shard channels");

    // Unfollowing everywhere unsubscribes the channel on its master.
    let (id, channel) = (&docs[0], key_channel(&docs[0]));
    let mut home = node_conn(cluster.master_of(&channel).unwrap()).await;
    for ws in [&mut ws_a, &mut ws_b] {
        send(ws, json!({"type": "unsubscribe", "doc": id})).await;
        round_trip(ws).await;
    }
    let left = !until_shard_channel(&mut home, &channel, false).await;
    assert!(left, "{channel} is still subscribed after every follower left");
}

#[actix_rt::test]
async fn a_follower_stays_in_sync_when_its_documents_master_dies_and_its_replica_takes_over() {
    let mut world = World::clustered("cluster-failover").await;
    let (a, b) = (world.node().await, world.node().await);
    let (ada_a, ada_b) = (a.login("ada").await, b.login("ada").await);
    let id = new_doc(&ada_a, json!({"log": []})).await;
    let mut ws = connect(&a, &ada_a).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    let snapshot = next(&mut ws).await;
    let mut state = snapshot["state"].clone();
    patch(&ada_b, &id, 1, json!({"log": ["before"]})).await;
    follow_to(&mut ws, &mut state, 1, 2).await;

    let mut cluster = world.cluster.take().unwrap();
    let home = cluster.master_of(&key_channel(&id)).unwrap();
    cluster.wait_replicated(home, Duration::from_secs(10)).unwrap();
    let cluster =
        tokio::task::spawn_blocking(move || cluster.fail_over(home, Duration::from_secs(30)).map(|()| cluster))
            .await
            .unwrap()
            .expect("the replica takes over");
    assert_ne!(cluster.master_of(&key_channel(&id)).unwrap(), home, "another master serves the document now");

    // What was saved before survives, and a change made through the other
    // node after the failover reaches the follower.
    let saved = rest(&ada_b, reqwest::Method::GET, &format!("/api/documents/{id}"), None).await;
    assert_eq!((saved["version"].as_u64(), saved["state"].clone()), (Some(2), json!({"log": ["before"]})));
    patch(&ada_b, &id, 2, json!({"log": ["before", "after"]})).await;
    follow_to(&mut ws, &mut state, 2, 3).await;
    assert_eq!(state, json!({"log": ["before", "after"]}));
    let dropped = a.kernel.metrics().bus_errors.with_label_values(&["redis_cluster", "disconnected"]).get();
    assert!(dropped > 0, "node a saw its connection to the dead master drop");
    drop(cluster);
}

#[actix_rt::test]
async fn a_follower_stays_in_sync_when_its_documents_slot_moves_to_another_master() {
    let world = World::clustered("cluster-reshard").await;
    let (a, b) = (world.node().await, world.node().await);
    let (ada_a, ada_b) = (a.login("ada").await, b.login("ada").await);
    let id = new_doc(&ada_a, json!({"log": []})).await;
    let mut ws = connect(&a, &ada_a).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    let mut state = next(&mut ws).await["state"].clone();
    patch(&ada_b, &id, 1, json!({"log": ["before"]})).await;
    follow_to(&mut ws, &mut state, 1, 2).await;

    // The master unsubscribes the channel when its slot leaves: node a
    // must follow it to the new master.
    let cluster = world.cluster.as_ref().unwrap();
    let (channel, from) = (key_channel(&id), cluster.master_of(&key_channel(&id)).unwrap());
    let to = cluster.masters().unwrap().into_iter().find(|port| *port != from).unwrap();
    cluster.move_slot_of(&channel, to).unwrap();
    assert_eq!(cluster.master_of(&channel).unwrap(), to);
    let moved = until_shard_channel(&mut node_conn(to).await, &channel, true).await;
    assert!(moved, "{channel} is subscribed on its new master");
    assert!(!shard_channels(&mut node_conn(from).await).await.contains(&channel));

    patch(&ada_b, &id, 2, json!({"log": ["before", "after"]})).await;
    follow_to(&mut ws, &mut state, 2, 3).await;
    assert_eq!(state, json!({"log": ["before", "after"]}));
}

#[actix_rt::test]
async fn a_node_given_a_cluster_keeps_its_documents_and_their_changes_there() {
    let dir = nexus_testkit::tempdir("cluster-node");
    let cluster = RedisCluster::start(&dir, 3, 0).expect("a redis cluster starts");
    let urls = cluster.urls();
    let node = TestNode::start_with("cluster-node", &[Role::TransactionManager], |c| c.redis_cluster = urls).await;
    let ada = node.user("ada").await;
    let id = new_doc(&ada, json!({"n": 1})).await;
    let url = format!("ws://{}/ws?token={}", node.node.http, ada.token());
    let mut ws = tokio_tungstenite::connect_async(url).await.unwrap().0;
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut ws).await["type"], "snapshot");
    patch(&ada, &id, 1, json!({"n": 2})).await;
    assert_eq!(next(&mut ws).await, json!({"type": "change", "doc": id, "version": 2, "patch": {"n": 2}}));

    let key = format!("nexus:doc:{{{id}}}");
    let mut home = node_conn(cluster.master_of(&key).unwrap()).await;
    let version: u64 = redis::cmd("HGET").arg(&key).arg("version").query_async(&mut home).await.unwrap();
    assert_eq!(version, 2);
    assert!(shard_channels(&mut home).await.contains(&key_channel(&id)));
    let client = redis::Client::open(node.brokers.redis_url()).unwrap();
    let mut plain = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("nexus:doc*").query_async(&mut plain).await.unwrap();
    assert!(keys.is_empty(), "documents on the node's plain redis: {keys:?}");

    // Documents kept on the plain Redis before the cluster, as this version
    // (tagged) and an older one (untagged) wrote them, move to the cluster
    // when a node starts.
    // A third was copied at version 5 by a node that died before deleting
    // it, then edited on both sides: the copy stands and the source, newer
    // than what was copied, is kept.
    let (tagged, untagged, edited) =
        (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
    let edited_key = format!("nexus:doc:{{{edited}}}");
    let fields = [("owner", "ada"), ("version", "9"), ("state", r#"{"n":9}"#), ("copied_version", "5")];
    let mut edited_home = node_conn(cluster.master_of(&edited_key).unwrap()).await;
    let () = redis::AsyncCommands::hset_multiple(&mut edited_home, &edited_key, &fields).await.unwrap();
    let sources =
        [(format!("nexus:doc:{{{tagged}}}"), 5), (format!("nexus:doc:{untagged}"), 7), (edited_key.clone(), 6)];
    for (key, n) in sources {
        let state = format!(r#"{{"n":{n}}}"#);
        let fields = [("owner", "ada".to_owned()), ("version", n.to_string()), ("state", state.clone())];
        let () = redis::AsyncCommands::hset_multiple(&mut plain, &key, &fields).await.unwrap();
        let entry: String = redis::cmd("XADD")
            .arg(format!("{key}:log"))
            .arg(format!("{n}-1"))
            .arg("version")
            .arg(n)
            .arg("patch")
            .arg(&state)
            .query_async(&mut plain)
            .await
            .unwrap();
        assert_eq!(entry, format!("{n}-1"));
    }
    let cluster_urls = cluster.urls();
    let _sibling =
        node.sibling("cluster-node-2", &[Role::TransactionManager], |c| c.redis_cluster = cluster_urls).await;
    let ids: HashSet<String> = ada
        .get("/api/documents")
        .await
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().into())
        .collect();
    assert_eq!(ids, HashSet::from([id.clone(), tagged.clone(), untagged.clone(), edited.clone()]));
    for (doc, n) in [(&tagged, 5), (&untagged, 7)] {
        let (_, history) = ada.get(&format!("/api/documents/{doc}/history?since={}", n - 1)).await;
        assert_eq!(history, json!([{"version": n, "patch": {"n": n}}]));
        let key = format!("nexus:doc:{{{doc}}}");
        let mut home = node_conn(cluster.master_of(&key).unwrap()).await;
        let version: u64 = redis::cmd("HGET").arg(&key).arg("version").query_async(&mut home).await.unwrap();
        assert_eq!(version, n);
    }
    let version: u64 = redis::cmd("HGET").arg(&edited_key).arg("version").query_async(&mut edited_home).await.unwrap();
    assert_eq!(version, 9, "the copy on the cluster stands");
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("nexus:doc*").query_async(&mut plain).await.unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [edited_key.clone(), format!("{edited_key}:log")],
        "only the source edited after its copy is left"
    );
}

/// Document `id`'s channel; the same name as its hash key.
fn key_channel(id: &str) -> String {
    nexus_actors::platform::channels::document(id)
}
