//! WebSocket sessions over real sockets: transaction-manager nodes on one
//! real redis-server of the test's own (and, in `cluster`, a Redis Cluster
//! for the documents), a real WebSocket client (tokio-tungstenite).

#[path = "sessions/cluster.rs"]
mod cluster;
#[path = "sessions/frames.rs"]
mod frames;
#[path = "sessions/harness.rs"]
mod harness;

use harness::*;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use nexus_actors::envelope::Envelope;
use nexus_actors::instance::{InstanceChanged, InstanceMode, InstanceState, InstanceStatus, Isolation};
use nexus_actors::roles::transaction_manager::api::documents::DocumentChanged;
use nexus_actors::roles::transaction_manager::documents::{merge_patch, Created, Write};
use nexus_actors::roles::transaction_manager::session::{CLOSE_TOKEN_ENDED, MAX_FOLLOWED, MAX_PRESENT};
use nexus_actors::roles::transaction_manager::{self as tm, UiConfig};
use nexus_testkit::{eventually, ApiClient};
use redis::aio::MultiplexedConnection;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

#[actix_rt::test]
async fn the_websocket_handshake_needs_a_valid_token() {
    let world = World::new("ws-auth").await;
    let node = world.node().await;
    for url in [format!("ws://{}/ws", node.addr), format!("ws://{}/ws?token=forged", node.addr)] {
        match tokio_tungstenite::connect_async(url).await {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
            other => panic!("expected 401, got {:?}", other.map(|(_, r)| r.status())),
        }
    }
    let ada = node.login("ada").await;
    let mut ws = connect(&node, &ada).await;
    send(&mut ws, json!({"type": "subscribe", "doc": random_doc()})).await;
    assert_eq!(next(&mut ws).await["code"], "not_found");
}

#[actix_rt::test]
async fn a_change_made_through_node_b_reaches_a_client_on_node_a() {
    let world = World::new("ws-two-nodes").await;
    let (a, b) = (world.node().await, world.node().await);
    let ada_a = a.login("ada").await;
    let ada_b = b.login("ada").await;
    let id = new_doc(&ada_a, json!({"text": "hello"})).await;

    let mut ws = connect(&a, &ada_a).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    let snapshot = next(&mut ws).await;
    assert_eq!((snapshot["type"].as_str(), snapshot["version"].as_u64()), (Some("snapshot"), Some(1)));
    assert_eq!(snapshot["state"], json!({"text": "hello"}));

    patch(&ada_b, &id, 1, json!({"text": "hello world"})).await;
    let change = next(&mut ws).await;
    assert_eq!(change, json!({"type": "change", "doc": id, "version": 2, "patch": {"text": "hello world"}}));

    // Another user cannot follow it, and trying subscribes nothing.
    let bob = a.login("bob").await;
    let mut bob_ws = connect(&b, &bob).await;
    send(&mut bob_ws, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut bob_ws).await["code"], "forbidden");
    assert_eq!(b.topics(), 0, "node b subscribed nothing for bob");
}

#[actix_rt::test]
async fn a_reconnecting_client_catches_up_to_exactly_the_server_state() {
    let world = World::new("ws-recover").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    let id = new_doc(&ada, json!({"n": 0, "log": []})).await;

    let mut ws = connect(&node, &ada).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    let snapshot = next(&mut ws).await;
    let (mut state, mut version) = (snapshot["state"].clone(), snapshot["version"].as_u64().unwrap());
    ws.close(None).await.unwrap();

    for n in 1..=3 {
        patch(&ada, &id, n, json!({"n": n, "log": [n]})).await;
    }

    let mut ws = connect(&node, &ada).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id, "version": version})).await;
    for expected in 2..=4 {
        let change = next(&mut ws).await;
        assert_eq!((change["type"].as_str(), change["version"].as_u64()), (Some("change"), Some(expected)));
        merge_patch(&mut state, &change["patch"]);
        version = expected;
    }
    let server = rest(&ada, Method::GET, &format!("/api/documents/{id}"), None).await;
    assert_eq!((state, version), (server["state"].clone(), server["version"].as_u64().unwrap()));
}

#[actix_rt::test]
async fn a_client_far_behind_or_behind_the_trimmed_history_gets_a_snapshot() {
    let world = World::new("ws-snapshot").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    let documents = &node.state.documents;
    // Written straight into the store: 1,100 changes over HTTP would only
    // make the test slow.
    let id = random_doc();
    let Created::Document(mut doc) = documents.create(&id, "ada", &json!({"n": 0}), 10).await.unwrap() else {
        panic!("created")
    };
    for n in 1..=1100u64 {
        let version = doc.version;
        doc = match documents.patch(doc, version, &json!({"n": n})).await.unwrap() {
            Write::Applied(doc) => doc,
            other => panic!("{other:?}"),
        };
    }
    assert_eq!(doc.version, 1101);

    // Further behind than the catch-up bound: one snapshot, not a replay.
    let mut ws = connect(&node, &ada).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id, "version": 1})).await;
    let frame = next(&mut ws).await;
    assert_eq!((frame["type"].as_str(), frame["version"].as_u64()), (Some("snapshot"), Some(1101)));
    assert_eq!(frame["state"], json!({"n": 1100}));
    // Within it: the changes.
    send(&mut ws, json!({"type": "subscribe", "doc": id, "version": 1098})).await;
    for version in 1099..=1101 {
        let change = next(&mut ws).await;
        assert_eq!((change["type"].as_str(), change["version"].as_u64()), (Some("change"), Some(version)));
    }

    // A history trimmed past the client's version: a snapshot.
    let mut conn = world.redis().await;
    let _: u64 = redis::cmd("XTRIM")
        .arg(format!("nexus:doc:{{{id}}}:log"))
        .arg("MINID")
        .arg("1090")
        .query_async(&mut conn)
        .await
        .unwrap();
    send(&mut ws, json!({"type": "subscribe", "doc": id, "version": 1085})).await;
    let frame = next(&mut ws).await;
    assert_eq!((frame["type"].as_str(), frame["version"].as_u64()), (Some("snapshot"), Some(1101)));
    send(&mut ws, json!({"type": "subscribe", "doc": id, "version": 1089})).await;
    let change = next(&mut ws).await;
    assert_eq!((change["type"].as_str(), change["version"].as_u64()), (Some("change"), Some(1090)));
}

#[actix_rt::test]
async fn a_change_announced_without_its_patch_brings_followers_to_the_new_version() {
    let world = World::new("ws-large-patch").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    let id = new_doc(&ada, json!({"title": "t"})).await;
    let mut ws = connect(&node, &ada).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    let mut state = next(&mut ws).await["state"].clone();

    // What the bridge hears: the announcement carries no patch.
    let mut pubsub = redis::Client::open(world.brokers.redis_url()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(format!("nexus:doc:{{{id}}}")).await.unwrap();

    // A patch too large for an announcement, within the document's bound.
    let big = "x".repeat(1_045_000);
    patch(&ada, &id, 1, json!({"body": big})).await;
    // Presence announcements share the channel: skip to the change.
    let announced = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let message = pubsub.on_message().next().await.unwrap();
            if let Ok(change) = Envelope::decode(message.get_payload_bytes()).unwrap().typed::<DocumentChanged>() {
                break change.data;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!((announced.version, &announced.patch), (2, &Value::Null));

    follow_to(&mut ws, &mut state, 1, 2).await;
    let server = rest(&ada, Method::GET, &format!("/api/documents/{id}"), None).await;
    assert_eq!(state, server["state"], "the follower has the server's state, not null");
    // And it follows on live.
    patch(&ada, &id, 2, json!({"title": "u"})).await;
    assert_eq!(next(&mut ws).await, json!({"type": "change", "doc": id, "version": 3, "patch": {"title": "u"}}));
}

#[actix_rt::test]
async fn a_client_stays_in_sync_across_a_redis_restart() {
    let mut world = World::persistent("ws-redis-restart").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    // A session following as many documents as it may; the last one changes.
    let mut ids = Vec::new();
    for _ in 0..MAX_FOLLOWED {
        let id = random_doc();
        node.state.documents.create(&id, "ada", &json!({"v": 1}), 1000).await.unwrap();
        ids.push(id);
    }
    let mut ws = connect(&node, &ada).await;
    for id in &ids {
        send(&mut ws, json!({"type": "subscribe", "doc": id, "presence": false})).await;
    }
    for _ in &ids {
        assert_eq!(next(&mut ws).await["version"], 1);
    }

    world.brokers.redis.kill();
    world.brokers.redis.restart().unwrap();
    let mut conn = world.redis().await;
    let channels: Vec<String> = ids.iter().map(|id| format!("nexus:doc:{{{id}}}")).collect();
    let mut back = 0;
    for _ in 0..1000 {
        back = numsub_all(&mut conn, &channels).await;
        if back == ids.len() as u64 {
            break;
        }
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(back, ids.len() as u64, "every channel is subscribed again");

    let last = ids.last().unwrap();
    patch(&ada, last, 1, json!({"v": 2})).await;
    // Live if the session's catch-up had finished, else from history.
    let change = loop {
        let frame = next(&mut ws).await;
        if frame["doc"] == json!(last) && frame["version"] == 2 {
            break frame;
        }
        assert_eq!(frame["version"], 1, "only catch-ups of unchanged documents: {frame}");
    };
    assert_eq!(change, json!({"type": "change", "doc": last, "version": 2, "patch": {"v": 2}}));
}

#[actix_rt::test]
async fn bad_frames_get_error_frames_and_oversized_ones_close_the_socket() {
    let world = World::new("ws-bad").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    let id = new_doc(&ada, json!({"ok": true})).await;
    let mut ws = connect(&node, &ada).await;

    ws.send(Message::text("{oops")).await.unwrap();
    assert_eq!(next(&mut ws).await["code"], "bad_json");
    send(&mut ws, json!({"type": "dance"})).await;
    assert_eq!(next(&mut ws).await["code"], "unknown_type");
    send(&mut ws, json!({"type": "subscribe", "doc": 42})).await;
    assert_eq!(next(&mut ws).await["code"], "bad_frame");
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let refused = next(&mut ws).await;
    assert_eq!(refused["code"], "unknown_type", "{refused}");
    assert!(refused["message"].as_str().is_some_and(|m| m.contains("binary frames are not supported")), "{refused}");
    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    let pong = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("no pong within 10s") {
            Some(Ok(Message::Pong(bytes))) => break bytes,
            Some(Ok(Message::Text(_))) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    };
    assert_eq!(&pong[..], b"are you there");
    // The session still works.
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut ws).await["state"], json!({"ok": true}));

    let huge = "x".repeat(tm::protocol::MAX_FRAME + 1);
    let _ = ws.send(Message::text(huge)).await;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("no close within 10s") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1009));

    // The node keeps serving.
    let mut again = connect(&node, &ada).await;
    send(&mut again, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut again).await["type"], "snapshot");
}

#[actix_rt::test]
async fn refused_subscribes_leave_nothing_subscribed_and_the_session_usable() {
    let world = World::new("ws-refused").await;
    let node = world.node().await;
    let (ada, bob) = (node.login("ada").await, node.login("bob").await);
    let mut bobs = Vec::new();
    for _ in 0..20 {
        bobs.push(new_doc(&bob, json!({"secret": 1})).await);
    }
    let adas = new_doc(&ada, json!({"mine": 1})).await;
    let mut conn = world.redis().await;
    let mut ws = connect(&node, &ada).await;
    round_trip(&mut ws).await;
    let (topics, channels) = (node.topics(), doc_channels(&mut conn).await);
    assert_eq!((topics, channels.len()), (0, 0));

    // 1,000 refused subscribes, in batches the session can hold at once.
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for batch in 0..10 {
        let mut frames = Vec::new();
        for i in 0..100 {
            let doc = match (batch * 100 + i) % 5 {
                0 | 1 => json!(random_doc()),
                2 => json!(bobs[i / 5]),
                3 => json!(format!("{}:log", random_doc())),
                _ => json!(["garbage", i]),
            };
            frames.push(json!({"type": "subscribe", "doc": doc, "version": i}));
        }
        for frame in frames {
            send(&mut ws, frame).await;
        }
        for _ in 0..100 {
            let frame = next(&mut ws).await;
            assert_eq!(frame["type"], "error", "{frame}");
            *codes.entry(frame["code"].as_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    let expected: std::collections::BTreeMap<String, usize> =
        [("bad_frame", 400), ("forbidden", 200), ("not_found", 400)].map(|(c, n)| (c.to_owned(), n)).into();
    assert_eq!(codes, expected);

    // Back to the baseline, in the node and in Redis.
    round_trip(&mut ws).await;
    assert_eq!(node.topics(), topics, "the bridge holds no topic for a refused subscribe");
    assert_eq!(doc_channels(&mut conn).await, channels);
    let bob_channels: Vec<String> = bobs.iter().map(|id| format!("nexus:doc:{{{id}}}")).collect();
    assert_eq!(numsub_all(&mut conn, &bob_channels).await, 0);

    // The session is still usable.
    send(&mut ws, json!({"type": "subscribe", "doc": adas})).await;
    assert_eq!(next(&mut ws).await["state"], json!({"mine": 1}));
    assert_eq!(node.topics(), topics + 1);
    assert_eq!(doc_channels(&mut conn).await, vec![format!("nexus:doc:{{{adas}}}")]);
    // Unsubscribing drops the topic in the node and in Redis.
    send(&mut ws, json!({"type": "unsubscribe", "doc": adas})).await;
    round_trip(&mut ws).await;
    eventually(10, "the topic dropped", || node.topics() == topics).await;
    for _ in 0..500 {
        if doc_channels(&mut conn).await.is_empty() {
            break;
        }
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(doc_channels(&mut conn).await, channels, "unsubscribed on Redis");
}

#[actix_rt::test]
async fn an_id_that_reaches_another_key_is_refused_once_and_a_refused_read_is_never_retried() {
    let world = World::new("ws-wrongtype").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    let id = new_doc(&ada, json!({"n": 0})).await;
    for version in 1..=3 {
        patch(&ada, &id, version, json!({"n": version})).await;
    }
    let mut conn = world.redis().await;
    let mut ws = connect(&node, &ada).await;
    round_trip(&mut ws).await;
    let reads = |conn: &mut MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let mut total = 0;
            // Owner and history reads (the token checks read with HMGET).
            for command in ["hget", "xrange"] {
                total += command_calls(&mut conn, command).await;
            }
            total
        }
    };

    // `<id>:log` names the history stream: refused before any Redis read.
    let before = reads(&mut conn).await;
    send(&mut ws, json!({"type": "subscribe", "doc": format!("{id}:log"), "version": 1})).await;
    assert_eq!(next(&mut ws).await["code"], "bad_frame");
    round_trip(&mut ws).await;
    assert_eq!(reads(&mut conn).await, before, "nothing was read for it");

    // A history Redis refuses to read (WRONGTYPE): one error, no retries.
    let _: () = redis::cmd("SET")
        .arg(format!("nexus:doc:{{{id}}}:log"))
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let xranges = command_calls(&mut conn, "xrange").await;
    send(&mut ws, json!({"type": "subscribe", "doc": id, "version": 1})).await;
    let error = next(&mut ws).await;
    assert_eq!(error["code"], "internal", "{error}");
    assert_eq!(command_calls(&mut conn, "xrange").await, xranges + 1);
    // Long enough for several retries of the old 250 ms loop.
    actix::clock::sleep(Duration::from_secs(2)).await;
    round_trip(&mut ws).await;
    assert_eq!(command_calls(&mut conn, "xrange").await, xranges + 1, "the refused read was not retried");
    eventually(10, "the document no longer followed", || node.topics() == 0).await;
}

#[actix_rt::test]
async fn a_session_follows_at_most_256_documents() {
    let world = World::new("ws-bound").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    let mut ids = Vec::new();
    for _ in 0..=MAX_FOLLOWED {
        let id = random_doc();
        node.state.documents.create(&id, "ada", &json!({}), 1000).await.unwrap();
        ids.push(id);
    }
    let mut ws = connect(&node, &ada).await;
    for id in &ids {
        send(&mut ws, json!({"type": "subscribe", "doc": id, "presence": false})).await;
    }
    let mut snapshots = 0;
    let mut refused = Vec::new();
    for _ in &ids {
        let frame = next(&mut ws).await;
        match frame["type"].as_str() {
            Some("snapshot") => snapshots += 1,
            _ => refused.push(frame),
        }
    }
    assert_eq!(snapshots, MAX_FOLLOWED);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["code"], "too_many_documents");
    let last = ids.last().unwrap();
    let mut conn = world.redis().await;
    assert_eq!(numsub(&mut conn, &format!("nexus:doc:{{{last}}}")).await, 0, "the 257th is not subscribed");
    assert_eq!(node.topics(), MAX_FOLLOWED as i64);

    // Room again after an unsubscribe.
    send(&mut ws, json!({"type": "unsubscribe", "doc": ids[0]})).await;
    send(&mut ws, json!({"type": "subscribe", "doc": last})).await;
    let frame = next(&mut ws).await;
    assert_eq!((frame["type"].as_str(), &frame["doc"]), (Some("snapshot"), &json!(last)));
}

#[actix_rt::test]
async fn a_session_whose_user_logs_out_is_closed_with_4001() {
    let world = World::new("ws-logout").await;
    let node = world.node().await;
    let (ada, bob) = (node.login("ada").await, node.login("bob").await);
    let id = new_doc(&ada, json!({})).await;
    let bobs = new_doc(&bob, json!({})).await;
    let mut ws = connect(&node, &ada).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut ws).await["type"], "snapshot");
    let mut bob_ws = connect(&node, &bob).await;

    let (status, _) = ada.post("/api/logout", json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let close = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(msg) = ws.next().await {
            if let Ok(Message::Close(frame)) = msg {
                return frame;
            }
        }
        None
    })
    .await
    .expect("the session was not closed after the logout");
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), CLOSE_TOKEN_ENDED);
    assert!(close.reason.contains("revoked"), "{:?}", close.reason);
    eventually(10, "ada's subscription dropped", || node.topics() == 0).await;

    // Bob's session carries on.
    send(&mut bob_ws, json!({"type": "subscribe", "doc": bobs})).await;
    assert_eq!(next(&mut bob_ws).await["type"], "snapshot");
}

#[actix_rt::test]
async fn a_documents_presence_lists_at_most_64_sessions() {
    let world = World::new("ws-presence-bound").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    let id = new_doc(&ada, json!({})).await;
    let conn = world.redis().await;
    let listed = |conn: &MultiplexedConnection| {
        let (mut conn, key) = (conn.clone(), format!("nexus:presence:{{{id}}}"));
        async move { redis::cmd("HLEN").arg(key).query_async::<usize>(&mut conn).await.unwrap() }
    };
    let mut sessions = Vec::new();
    for n in 1..=MAX_PRESENT {
        let mut ws = connect(&node, &ada).await;
        send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
        assert_eq!(next(&mut ws).await["type"], "snapshot");
        for _ in 0..500 {
            if listed(&conn).await == n {
                break;
            }
            actix::clock::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(listed(&conn).await, n);
        sessions.push(ws);
    }

    // One more follows the document, without presence.
    let mut extra = connect(&node, &ada).await;
    send(&mut extra, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut extra).await["type"], "snapshot");
    assert_eq!(next(&mut extra).await["code"], "presence_full");
    send(&mut extra, json!({"type": "cursor", "doc": id, "position": 1})).await;
    assert_eq!(next(&mut extra).await["code"], "not_following");
    assert_eq!(listed(&conn).await, MAX_PRESENT);
    // It still follows the document's changes.
    patch(&ada, &id, 1, json!({"a": 1})).await;
    assert_eq!(next(&mut extra).await["version"], 2);
}

#[actix_rt::test]
async fn participants_see_each_other_and_each_others_cursors_across_nodes() {
    let world = World::new("ws-presence").await;
    let (a, b) = (world.node().await, world.node().await);
    let ada = a.login("ada").await;
    let id = new_doc(&ada, json!({"text": ""})).await;

    // A participant whose node died: listed, but no longer kept alive.
    let mut conn = world.redis().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("nexus:presence:{{{id}}}"))
        .arg("session/ghost")
        .arg("ada")
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut first = connect(&a, &ada).await;
    let first_session = next_of(&mut first, "welcome").await["session"].as_str().unwrap().to_owned();
    send(&mut first, json!({"type": "subscribe", "doc": id})).await;
    let mut second = connect(&b, &ada).await;
    let second_session = next_of(&mut second, "welcome").await["session"].as_str().unwrap().to_owned();
    send(&mut second, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut second).await["type"], "snapshot");

    let sessions = |frame: &Value| -> Vec<String> {
        let mut s: Vec<String> =
            frame["present"].as_array().unwrap().iter().map(|p| p["session"].as_str().unwrap().to_owned()).collect();
        s.sort();
        s
    };
    let mut both = vec![first_session.clone(), second_session.clone()];
    both.sort();
    loop {
        let presence = next_of(&mut first, "presence").await;
        if sessions(&presence) == both {
            break;
        }
    }

    send(&mut second, json!({"type": "cursor", "doc": id, "position": {"offset": 7}})).await;
    let cursor = next_of(&mut first, "cursor").await;
    assert_eq!(
        cursor,
        json!({"type": "cursor", "doc": id, "session": second_session, "user": "ada", "position": {"offset": 7}})
    );

    // A cursor in a document not followed, or too large, is refused.
    send(&mut second, json!({"type": "cursor", "doc": random_doc(), "position": 1})).await;
    assert_eq!(next(&mut second).await["code"], "not_following");
    // A follower without presence is not listed and gets no cursors.
    let mut viewer = connect(&a, &ada).await;
    send(&mut viewer, json!({"type": "subscribe", "doc": id, "presence": false})).await;
    assert_eq!(next(&mut viewer).await["type"], "snapshot");
    send(&mut viewer, json!({"type": "cursor", "doc": id, "position": 1})).await;
    assert_eq!(next(&mut viewer).await["code"], "not_following");
    send(&mut second, json!({"type": "cursor", "doc": id, "position": "x".repeat(2000)})).await;
    assert_eq!(next(&mut second).await["code"], "bad_frame");

    second.close(None).await.unwrap();
    loop {
        let presence = next_of(&mut first, "presence").await;
        if sessions(&presence) == vec![first_session.clone()] {
            break;
        }
    }
}

#[actix_rt::test]
async fn a_client_that_stops_reading_is_disconnected_and_others_carry_on() {
    let world = World::new("ws-slow").await;
    let node = world.node().await;
    let ada = node.login("ada").await;
    let id = new_doc(&ada, json!({})).await;
    let mut stuck = connect_small_buffer(&node, &ada).await;
    send(&mut stuck, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut stuck).await["type"], "snapshot");
    let mut busy = connect(&node, &ada).await;
    send(&mut busy, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut busy).await["type"], "snapshot");

    // `stuck` reads nothing from here on while `busy` moves its cursor a lot.
    let position = "x".repeat(1000);
    let too_slow = || node.kernel.metrics().sessions_too_slow.get();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while too_slow() == 0 {
        if std::time::Instant::now() > deadline {
            let metrics = node.kernel.render_metrics();
            let lines: Vec<&str> = metrics.lines().filter(|l| l.starts_with("nexus_") && !l.ends_with(" 0")).collect();
            panic!("the stuck client was never disconnected; metrics:\n{}", lines.join("\n"));
        }
        send(&mut busy, json!({"type": "cursor", "doc": id, "position": position})).await;
    }
    eventually(30, "the stuck client disconnected", || too_slow() == 1).await;

    // Its socket ends (after whatever was already on the wire).
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(msg)) = stuck.next().await {
            if let Message::Close(frame) = msg {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("the stuck client's socket did not end");
    assert!(matches!(ended, None | Some(4008)), "closed with {ended:?}");

    // The other client is still connected and served. Its cursor flood may
    // still saturate the bridge (a change announcement can be refused then),
    // so write until a change arrives; gaps are caught up from history.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut version = 1;
    let change = loop {
        assert!(std::time::Instant::now() < deadline, "the busy client received no change");
        patch(&ada, &id, version, json!({"a": version})).await;
        version += 1;
        if let Ok(frame) = tokio::time::timeout(Duration::from_secs(3), next(&mut busy)).await {
            break frame;
        }
    };
    assert_eq!((change["type"].as_str(), change["version"].as_u64()), (Some("change"), Some(2)));
}

#[actix_rt::test]
async fn panel_changes_reach_the_owners_sessions_on_every_node() {
    let world = World::new("ws-panels").await;
    let (a, b) = (world.node().await, world.node().await);
    let ada = a.login("ada").await;
    let bob = a.login("bob").await;
    let ada_b = ApiClient { base: b.url(), ..ada.clone() };
    let mut ada_ws = connect(&a, &ada).await;
    let mut bob_ws = connect(&a, &bob).await;
    for ws in [&mut ada_ws, &mut bob_ws] {
        send(ws, json!({"type": "subscribe_panels"})).await;
    }
    // Subscribing is asynchronous; the session says when it is done.
    for ws in [&mut ada_ws, &mut bob_ws] {
        assert_eq!(next(ws).await, json!({"type": "panels_followed"}));
    }

    let panel =
        rest(&ada_b, Method::POST, "/api/panels", Some(json!({"name": "P", "mode": "app", "source": "s"}))).await;
    let frame = next(&mut ada_ws).await;
    assert_eq!((frame["type"].as_str(), &frame["panel"]), (Some("panel"), &panel));
    let (status, _) = ada_b.delete(&format!("/api/panels/{}", panel["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(next(&mut ada_ws).await, json!({"type": "panel", "id": panel["id"], "panel": null}));

    // Asked again, the session says so again (a client reads its list again).
    send(&mut ada_ws, json!({"type": "subscribe_panels"})).await;
    assert_eq!(next(&mut ada_ws).await, json!({"type": "panels_followed"}));

    // Bob hears nothing of Ada's panels.
    send(&mut bob_ws, json!({"type": "subscribe", "doc": random_doc()})).await;
    assert_eq!(next(&mut bob_ws).await["code"], "not_found");
}

fn instance_status(owner: &str, state: InstanceState) -> InstanceStatus {
    InstanceStatus {
        instance: format!("instance-of-{owner}"),
        panel: "panel-1".into(),
        owner: owner.into(),
        mode: InstanceMode::Studio,
        state,
        isolation: Isolation::Process,
        reason: None,
        log_tail: vec![],
        restarts: 0,
        since_ms: 1_700_000_000_000,
    }
}

#[actix_rt::test]
async fn instance_states_reach_their_owners_session_and_bad_announcements_are_ignored() {
    let world = World::new("ws-instances").await;
    let node = world.node().await;
    let (ada, bob) = (node.login("ada").await, node.login("bob").await);
    let mut ada_ws = connect(&node, &ada).await;
    let mut bob_ws = connect(&node, &bob).await;
    for ws in [&mut ada_ws, &mut bob_ws] {
        send(ws, json!({"type": "subscribe_panels"})).await;
    }
    // Subscribing is asynchronous; the session says when it is done.
    for ws in [&mut ada_ws, &mut bob_ws] {
        assert_eq!(next(ws).await, json!({"type": "panels_followed"}));
    }

    // What a panel manager would publish, straight into Redis: first what
    // must not reach Ada (bytes that are no envelope, an instance change
    // of the wrong shape, one about Bob's instance on Ada's channel), then
    // the real one.
    let mut conn = world.redis().await;
    let channel = "nexus:panels:ada";
    let malformed = Envelope::with_type("nexus.instance.changed", "pm", json!({"status": {"state": "dancing"}}));
    let bobs = Envelope::new("pm", InstanceChanged { status: instance_status("bob", InstanceState::Ready) });
    let status = instance_status("ada", InstanceState::Ready);
    let adas = Envelope::new("pm", InstanceChanged { status: status.clone() });
    for payload in [b"{not json".to_vec(), malformed.encode(), bobs.encode(), adas.encode()] {
        let _: i64 = redis::cmd("PUBLISH").arg(channel).arg(payload).query_async(&mut conn).await.unwrap();
    }
    assert_eq!(next(&mut ada_ws).await, json!({"type": "instance", "status": status}));

    // Ada's session is alive and forwards the next state too.
    let stopped = instance_status("ada", InstanceState::Stopped);
    let envelope = Envelope::new("pm", InstanceChanged { status: stopped.clone() });
    let _: i64 = redis::cmd("PUBLISH").arg(channel).arg(envelope.encode()).query_async(&mut conn).await.unwrap();
    assert_eq!(next(&mut ada_ws).await, json!({"type": "instance", "status": stopped}));

    // Bob heard nothing of Ada's channel; a session that did not ask for
    // panels hears nothing either.
    send(&mut bob_ws, json!({"type": "subscribe", "doc": random_doc()})).await;
    assert_eq!(next(&mut bob_ws).await["code"], "not_found");
    let mut quiet = connect(&node, &ada).await;
    round_trip(&mut quiet).await;
    let _: i64 = redis::cmd("PUBLISH").arg(channel).arg(envelope.encode()).query_async(&mut conn).await.unwrap();
    assert_eq!(next(&mut ada_ws).await["type"], "instance");
    round_trip(&mut quiet).await;
}

#[actix_rt::test]
async fn the_ui_and_its_config_are_served_without_a_token() {
    let world = World::new("ui-config").await;
    let plain = world.node().await;
    let ui = UiConfig { gateway_url: Some("http://127.0.0.1:7071".into()), heartbeat_secs: 7 };
    let wired = world.node_with(ui).await;

    let (status, config) = ApiClient::new(&plain.url()).get("/api/config").await;
    assert_eq!((status, config), (StatusCode::OK, json!({"gateway": null, "heartbeat_secs": 300})));
    let wired_client = ApiClient::new(&wired.url());
    let (_, config) = wired_client.get("/api/config").await;
    assert_eq!(config, json!({"gateway": "http://127.0.0.1:7071", "heartbeat_secs": 7}));
    // Only GET: the config is not writable through the API.
    let (status, _) = wired_client.post("/api/config", json!({})).await;
    assert!(status.is_client_error(), "POST /api/config: {status}");

    let (_, page) = wired_client.get("/").await;
    let page = page.as_str().unwrap_or_default().to_owned();
    assert!(page.contains(r#"id="panel-list""#) && page.contains(r#"id="panel-template""#), "{page}");
    let (_, script) = wired_client.get("/static/app.js").await;
    let script = script.as_str().unwrap_or_default().to_owned();
    assert!(script.contains("/api/config") && script.contains("/heartbeat/"), "the UI asks for its config");
}
