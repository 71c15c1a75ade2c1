//! WebSocket sessions over real sockets: two transaction-manager nodes on
//! one real redis-server, a real WebSocket client (tokio-tungstenite).

mod common;

use std::time::Duration;

use actix::Arbiter;
use actix_web::{web, App, HttpServer};
use common::tempdir;
use futures::{SinkExt, StreamExt};
use nexus_actors::bus::redis::RedisBridge;
use nexus_actors::envelope::Envelope;
use nexus_actors::infra::RedisServer;
use nexus_actors::instance::{InstanceChanged, InstanceMode, InstanceState, InstanceStatus, Isolation};
use nexus_actors::roles::transaction_manager::{
    self as tm, auth::hash_password, session::SessionDeps, store::merge_patch, UiConfig,
};
use nexus_actors::Kernel;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Node {
    addr: String,
    kernel: Kernel,
    _arbiter: Arbiter,
    _server: actix_web::dev::ServerHandle,
}

async fn start_node(redis_url: &str) -> Node {
    start_node_with(redis_url, UiConfig::default()).await
}

async fn start_node_with(redis_url: &str, ui: UiConfig) -> Node {
    let kernel = Kernel::new("tm");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), redis_url).unwrap();
    let mut state = tm::state(redis_url, Some(bridge.link("transaction-manager")), "tm").await.unwrap();
    state.ui = ui;
    let state = web::Data::new(state);
    let deps = SessionDeps { kernel: kernel.clone(), bridge };
    let server = HttpServer::new(move || {
        App::new()
            .configure(tm::configure(state.clone()))
            .configure(tm::configure_sessions(deps.clone()))
            .configure(tm::configure_fallback)
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = server.addrs()[0].to_string();
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Node { addr, kernel, _arbiter: arbiter, _server: handle }
}

async fn login(node: &Node, user: &str, password: &str) -> String {
    let resp: Value = reqwest::Client::new()
        .post(format!("http://{}/api/login", node.addr))
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    resp["token"].as_str().unwrap().to_owned()
}

/// A REST call with a token; retries while the node answers 5xx (Redis restarting).
async fn rest(node: &Node, token: &str, method: reqwest::Method, path: &str, body: Value) -> Value {
    for _ in 0..100 {
        let resp = reqwest::Client::new()
            .request(method.clone(), format!("http://{}{path}", node.addr))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        if !resp.status().is_server_error() {
            assert!(resp.status().is_success(), "{method} {path}: {}", resp.status());
            return resp.json().await.unwrap();
        }
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
    panic!("{method} {path} kept failing");
}

async fn connect(node: &Node, token: &str) -> Ws {
    tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", node.addr)).await.unwrap().0
}

/// Connects with a tiny receive buffer, so that a client that stops reading
/// backs up into the server quickly.
async fn connect_small_buffer(node: &Node, token: &str) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr.parse().unwrap()).await.unwrap();
    let url = format!("ws://{}/ws?token={token}", node.addr);
    tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream)).await.unwrap().0
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// The next text frame as JSON, skipping welcome, presence and cursor frames.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let frame = next_any(ws).await;
        if !matches!(frame["type"].as_str(), Some("welcome" | "presence" | "cursor")) {
            return frame;
        }
    }
}

/// The next frame of type `kind`, skipping others.
async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let frame = next_any(ws).await;
        if frame["type"] == kind {
            return frame;
        }
    }
}

async fn next_any(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), ws.next()).await.expect("no frame within 15s");
        match msg.expect("socket closed").expect("socket error") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

async fn users(redis_url: &str) {
    let store = tm::Store::connect(redis_url).await.unwrap();
    store.create_user("ada", &hash_password("ada-password")).await.unwrap();
    store.create_user("bob", &hash_password("bob-password")).await.unwrap();
}

#[actix_rt::test]
async fn the_websocket_handshake_needs_a_valid_token() {
    let redis = RedisServer::start(&tempdir("ws-auth"), false).unwrap();
    users(&redis.url()).await;
    let node = start_node(&redis.url()).await;
    for url in [format!("ws://{}/ws", node.addr), format!("ws://{}/ws?token=forged", node.addr)] {
        match tokio_tungstenite::connect_async(url).await {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
            other => panic!("expected 401, got {:?}", other.map(|(_, r)| r.status())),
        }
    }
    let token = login(&node, "ada", "ada-password").await;
    let mut ws = connect(&node, &token).await;
    send(&mut ws, json!({"type": "subscribe", "doc": "nope"})).await;
    assert_eq!(next(&mut ws).await["code"], "not_found");
}

#[actix_rt::test]
async fn a_change_made_through_node_b_reaches_a_client_on_node_a() {
    let redis = RedisServer::start(&tempdir("ws-two-nodes"), false).unwrap();
    users(&redis.url()).await;
    let (a, b) = (start_node(&redis.url()).await, start_node(&redis.url()).await);
    let ada_a = login(&a, "ada", "ada-password").await;
    let ada_b = login(&b, "ada", "ada-password").await;
    let doc = rest(&a, &ada_a, reqwest::Method::POST, "/api/documents", json!({"state": {"text": "hello"}})).await;
    let id = doc["id"].as_str().unwrap().to_owned();

    let mut ws = connect(&a, &ada_a).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    let snapshot = next(&mut ws).await;
    assert_eq!((snapshot["type"].as_str(), snapshot["version"].as_u64()), (Some("snapshot"), Some(1)));
    assert_eq!(snapshot["state"], json!({"text": "hello"}));

    rest(
        &b,
        &ada_b,
        reqwest::Method::PATCH,
        &format!("/api/documents/{id}"),
        json!({"version": 1, "patch": {"text": "hello world"}}),
    )
    .await;
    let change = next(&mut ws).await;
    assert_eq!(change, json!({"type": "change", "doc": id, "version": 2, "patch": {"text": "hello world"}}));

    // Another user cannot follow it.
    let bob = login(&a, "bob", "bob-password").await;
    let mut bob_ws = connect(&b, &bob).await;
    send(&mut bob_ws, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut bob_ws).await["code"], "forbidden");
}

#[actix_rt::test]
async fn a_reconnecting_client_catches_up_to_exactly_the_server_state() {
    let redis = RedisServer::start(&tempdir("ws-recover"), false).unwrap();
    users(&redis.url()).await;
    let node = start_node(&redis.url()).await;
    let token = login(&node, "ada", "ada-password").await;
    let doc = rest(&node, &token, reqwest::Method::POST, "/api/documents", json!({"state": {"n": 0, "log": []}})).await;
    let id = doc["id"].as_str().unwrap().to_owned();

    let mut ws = connect(&node, &token).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    let snapshot = next(&mut ws).await;
    let (mut state, mut version) = (snapshot["state"].clone(), snapshot["version"].as_u64().unwrap());
    ws.close(None).await.unwrap();

    for n in 1..=3 {
        let body = json!({"version": n, "patch": {"n": n, "log": [n]}});
        rest(&node, &token, reqwest::Method::PATCH, &format!("/api/documents/{id}"), body).await;
    }

    let mut ws = connect(&node, &token).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id, "version": version})).await;
    for expected in 2..=4 {
        let change = next(&mut ws).await;
        assert_eq!((change["type"].as_str(), change["version"].as_u64()), (Some("change"), Some(expected)));
        merge_patch(&mut state, &change["patch"]);
        version = expected;
    }
    let server = rest(&node, &token, reqwest::Method::GET, &format!("/api/documents/{id}"), Value::Null).await;
    assert_eq!((state, version), (server["state"].clone(), server["version"].as_u64().unwrap()));
}

#[actix_rt::test]
async fn a_client_stays_in_sync_across_a_redis_restart() {
    let mut redis = RedisServer::start(&tempdir("ws-redis-restart"), true).unwrap();
    users(&redis.url()).await;
    let node = start_node(&redis.url()).await;
    let token = login(&node, "ada", "ada-password").await;
    let doc = rest(&node, &token, reqwest::Method::POST, "/api/documents", json!({"state": {"v": 1}})).await;
    let id = doc["id"].as_str().unwrap().to_owned();
    let mut ws = connect(&node, &token).await;
    send(&mut ws, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut ws).await["version"], 1);

    redis.kill();
    redis.restart().unwrap();
    rest(
        &node,
        &token,
        reqwest::Method::PATCH,
        &format!("/api/documents/{id}"),
        json!({"version": 1, "patch": {"v": 2}}),
    )
    .await;
    // Live if the bridge was back in time, else from history on BusUp.
    let change = next(&mut ws).await;
    assert_eq!(change, json!({"type": "change", "doc": id, "version": 2, "patch": {"v": 2}}));
}

#[actix_rt::test]
async fn bad_frames_get_error_frames_and_oversized_ones_close_the_socket() {
    let redis = RedisServer::start(&tempdir("ws-bad"), false).unwrap();
    users(&redis.url()).await;
    let node = start_node(&redis.url()).await;
    let token = login(&node, "ada", "ada-password").await;
    let doc = rest(&node, &token, reqwest::Method::POST, "/api/documents", json!({"state": {"ok": true}})).await;
    let mut ws = connect(&node, &token).await;

    ws.send(Message::text("{oops")).await.unwrap();
    assert_eq!(next(&mut ws).await["code"], "bad_json");
    send(&mut ws, json!({"type": "dance"})).await;
    assert_eq!(next(&mut ws).await["code"], "unknown_type");
    send(&mut ws, json!({"type": "subscribe", "doc": 42})).await;
    assert_eq!(next(&mut ws).await["code"], "bad_frame");
    // The session still works.
    send(&mut ws, json!({"type": "subscribe", "doc": doc["id"]})).await;
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
    let mut again = connect(&node, &token).await;
    send(&mut again, json!({"type": "subscribe", "doc": doc["id"]})).await;
    assert_eq!(next(&mut again).await["type"], "snapshot");
}

#[actix_rt::test]
async fn participants_see_each_other_and_each_others_cursors_across_nodes() {
    let redis = RedisServer::start(&tempdir("ws-presence"), false).unwrap();
    users(&redis.url()).await;
    let (a, b) = (start_node(&redis.url()).await, start_node(&redis.url()).await);
    let token = login(&a, "ada", "ada-password").await;
    let doc = rest(&a, &token, reqwest::Method::POST, "/api/documents", json!({"state": {"text": ""}})).await;
    let id = doc["id"].as_str().unwrap().to_owned();

    // A participant whose node died: listed, but no longer kept alive.
    let raw = redis::Client::open(redis.url()).unwrap();
    let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("nexus:presence:{id}"))
        .arg("session/ghost")
        .arg("ada")
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut first = connect(&a, &token).await;
    let first_session = next_of(&mut first, "welcome").await["session"].as_str().unwrap().to_owned();
    send(&mut first, json!({"type": "subscribe", "doc": id})).await;
    let mut second = connect(&b, &token).await;
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
    send(&mut second, json!({"type": "cursor", "doc": "other", "position": 1})).await;
    assert_eq!(next(&mut second).await["code"], "not_following");
    // A follower without presence is not listed and gets no cursors.
    let mut viewer = connect(&a, &token).await;
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
    let redis = RedisServer::start(&tempdir("ws-slow"), false).unwrap();
    users(&redis.url()).await;
    let node = start_node(&redis.url()).await;
    let token = login(&node, "ada", "ada-password").await;
    let doc = rest(&node, &token, reqwest::Method::POST, "/api/documents", json!({"state": {}})).await;
    let id = doc["id"].as_str().unwrap().to_owned();
    let mut stuck = connect_small_buffer(&node, &token).await;
    send(&mut stuck, json!({"type": "subscribe", "doc": id})).await;
    assert_eq!(next(&mut stuck).await["type"], "snapshot");
    let mut busy = connect(&node, &token).await;
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
    common::eventually(30, "the stuck client disconnected", || too_slow() == 1).await;

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
        let path = format!("/api/documents/{id}");
        rest(&node, &token, reqwest::Method::PATCH, &path, json!({"version": version, "patch": {"a": version}})).await;
        version += 1;
        if let Ok(frame) = tokio::time::timeout(Duration::from_secs(3), next(&mut busy)).await {
            break frame;
        }
    };
    assert_eq!((change["type"].as_str(), change["version"].as_u64()), (Some("change"), Some(2)));
}

#[actix_rt::test]
async fn panel_changes_reach_the_owners_sessions_on_every_node() {
    let redis = RedisServer::start(&tempdir("ws-panels"), false).unwrap();
    users(&redis.url()).await;
    let (a, b) = (start_node(&redis.url()).await, start_node(&redis.url()).await);
    let ada = login(&a, "ada", "ada-password").await;
    let bob = login(&a, "bob", "bob-password").await;
    let mut ada_ws = connect(&a, &ada).await;
    let mut bob_ws = connect(&a, &bob).await;
    for ws in [&mut ada_ws, &mut bob_ws] {
        send(ws, json!({"type": "subscribe_panels"})).await;
    }
    // Subscribing is asynchronous; a round trip through the session orders it.
    for ws in [&mut ada_ws, &mut bob_ws] {
        send(ws, json!({"type": "subscribe", "doc": "none"})).await;
        assert_eq!(next(ws).await["code"], "not_found");
    }

    let panel =
        rest(&b, &ada, reqwest::Method::POST, "/api/panels", json!({"name": "P", "mode": "app", "source": "s"})).await;
    let frame = next(&mut ada_ws).await;
    assert_eq!((frame["type"].as_str(), &frame["panel"]), (Some("panel"), &panel));
    let path = format!("/api/panels/{}", panel["id"].as_str().unwrap());
    let deleted =
        reqwest::Client::new().delete(format!("http://{}{path}", b.addr)).bearer_auth(&ada).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(next(&mut ada_ws).await, json!({"type": "panel", "id": panel["id"], "panel": null}));

    // Bob hears nothing of Ada's panels.
    send(&mut bob_ws, json!({"type": "subscribe", "doc": "none"})).await;
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
    let redis = RedisServer::start(&tempdir("ws-instances"), false).unwrap();
    users(&redis.url()).await;
    let node = start_node(&redis.url()).await;
    let ada = login(&node, "ada", "ada-password").await;
    let bob = login(&node, "bob", "bob-password").await;
    let mut ada_ws = connect(&node, &ada).await;
    let mut bob_ws = connect(&node, &bob).await;
    for ws in [&mut ada_ws, &mut bob_ws] {
        send(ws, json!({"type": "subscribe_panels"})).await;
    }
    // Subscribing is asynchronous; a round trip through the session orders it.
    for ws in [&mut ada_ws, &mut bob_ws] {
        send(ws, json!({"type": "subscribe", "doc": "none"})).await;
        assert_eq!(next(ws).await["code"], "not_found");
    }

    // What a panel manager would publish, straight into Redis: first what
    // must not reach Ada (bytes that are no envelope, an instance change
    // of the wrong shape, one about Bob's instance on Ada's channel), then
    // the real one.
    let raw = redis::Client::open(redis.url()).unwrap();
    let mut conn = raw.get_multiplexed_async_connection().await.unwrap();
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
    send(&mut bob_ws, json!({"type": "subscribe", "doc": "none"})).await;
    assert_eq!(next(&mut bob_ws).await["code"], "not_found");
    let mut quiet = connect(&node, &ada).await;
    send(&mut quiet, json!({"type": "subscribe", "doc": "none"})).await;
    assert_eq!(next(&mut quiet).await["code"], "not_found");
    let _: i64 = redis::cmd("PUBLISH").arg(channel).arg(envelope.encode()).query_async(&mut conn).await.unwrap();
    assert_eq!(next(&mut ada_ws).await["type"], "instance");
    send(&mut quiet, json!({"type": "subscribe", "doc": "none"})).await;
    assert_eq!(next(&mut quiet).await["code"], "not_found");
}

#[actix_rt::test]
async fn the_ui_and_its_config_are_served_without_a_token() {
    let redis = RedisServer::start(&tempdir("ui-config"), false).unwrap();
    let plain = start_node(&redis.url()).await;
    let ui = UiConfig { gateway_url: Some("http://127.0.0.1:7071".into()), heartbeat_secs: 7 };
    let wired = start_node_with(&redis.url(), ui).await;
    let client = reqwest::Client::new();

    let get = |node: &Node, path: &str| client.get(format!("http://{}{path}", node.addr)).send();
    let config: Value = get(&plain, "/api/config").await.unwrap().json().await.unwrap();
    assert_eq!(config, json!({"gateway": null, "heartbeat_secs": 300}));
    let config: Value = get(&wired, "/api/config").await.unwrap().json().await.unwrap();
    assert_eq!(config, json!({"gateway": "http://127.0.0.1:7071", "heartbeat_secs": 7}));
    // Only GET: the config is not writable through the API.
    let post = client.post(format!("http://{}/api/config", wired.addr)).json(&json!({})).send().await.unwrap();
    assert!(post.status().is_client_error(), "POST /api/config: {}", post.status());

    let page = get(&wired, "/").await.unwrap().text().await.unwrap();
    assert!(page.contains(r#"id="panel-list""#) && page.contains(r#"id="panel-template""#), "{page}");
    let script = get(&wired, "/static/app.js").await.unwrap().text().await.unwrap();
    assert!(script.contains("/api/config") && script.contains("/heartbeat/"), "the UI asks for its config");
}
