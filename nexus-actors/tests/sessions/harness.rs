//! What the session tests share: a redis-server of the test's own (and a
//! Redis Cluster when asked), transaction-manager nodes over it, and a
//! WebSocket client's helpers.

use std::time::Duration;

use actix::Arbiter;
use actix_web::{web, App};
use futures::{SinkExt, StreamExt};
use nexus_actors::bus::redis::RedisBridge;
use nexus_actors::infra::RedisCluster;
use nexus_actors::platform::server::{self, Bound, ServerOptions};
use nexus_actors::platform::{Redis, UserRole};
use nexus_actors::roles::transaction_manager::documents::merge_patch;
use nexus_actors::roles::transaction_manager::session::SessionDeps;
use nexus_actors::roles::transaction_manager::{self as tm, TmState, UiConfig};
use nexus_actors::Kernel;
use nexus_testkit::{add_user, ApiClient, Brokers, TestKeys};
use redis::aio::MultiplexedConnection;
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

pub(crate) type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One transaction-manager node: its HTTP server, bridge and state.
pub(crate) struct Node {
    pub(crate) addr: String,
    pub(crate) kernel: Kernel,
    pub(crate) state: web::Data<TmState>,
    pub(crate) _arbiter: Arbiter,
    pub(crate) _server: actix_web::dev::ServerHandle,
}

impl Node {
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Topics its Redis bridge holds.
    pub(crate) fn topics(&self) -> i64 {
        self.kernel.metrics().redis_subscriptions.get()
    }

    pub(crate) async fn login(&self, user: &str) -> ApiClient {
        ApiClient::login(&self.url(), user, &format!("{user}-password")).await
    }
}

/// A redis-server, the node's keys, and the users `ada` and `bob`; with a
/// Redis Cluster for the documents when asked.
pub(crate) struct World {
    pub(crate) brokers: Brokers,
    pub(crate) keys: TestKeys,
    pub(crate) cluster: Option<RedisCluster>,
}

impl World {
    pub(crate) async fn new(name: &str) -> World {
        World::over(Brokers::redis(name)).await
    }

    /// Over a redis-server that keeps its data across a restart.
    pub(crate) async fn persistent(name: &str) -> World {
        World::over(Brokers::redis_persistent(name)).await
    }

    pub(crate) async fn over(brokers: Brokers) -> World {
        let keys = TestKeys::new(&brokers.dir);
        let platform = keys.platform(&brokers.redis_url()).await;
        for user in ["ada", "bob"] {
            add_user(&platform, user, &format!("{user}-password"), UserRole::User).await;
        }
        World { brokers, keys, cluster: None }
    }

    /// With a Redis Cluster of three masters, one replica each, that holds
    /// the documents and carries their changes.
    pub(crate) async fn clustered(name: &str) -> World {
        let mut world = World::new(name).await;
        let dir = world.brokers.dir.join("cluster");
        // Started on this thread, not a blocking pool's: the servers die
        // with the thread that started them (PR_SET_PDEATHSIG), and an
        // idle pool thread exits after a while.
        let cluster = RedisCluster::start(&dir, 3, 1);
        world.cluster = Some(cluster.expect("a redis cluster starts (scripts/test installs redis-server)"));
        world
    }

    /// The cluster's node URLs, or none.
    pub(crate) fn cluster_urls(&self) -> Vec<String> {
        self.cluster.as_ref().map(RedisCluster::urls).unwrap_or_default()
    }

    pub(crate) async fn node(&self) -> Node {
        self.node_with(UiConfig::default()).await
    }

    pub(crate) async fn node_with(&self, ui: UiConfig) -> Node {
        self.node_built(ui, tm::session::MAX_SESSIONS).await
    }

    /// A node that holds at most `max` sessions at once.
    pub(crate) async fn node_with_max_sessions(&self, max: usize) -> Node {
        self.node_built(UiConfig::default(), max).await
    }

    async fn node_built(&self, ui: UiConfig, max_sessions: usize) -> Node {
        let url = self.brokers.redis_url();
        let kernel = Kernel::new("tm");
        let arbiter = Arbiter::new();
        let cluster = self.cluster_urls();
        let bridge = RedisBridge::spawn_with_cluster(&kernel, &arbiter.handle(), &url, &cluster).unwrap();
        let platform = self.keys.platform(&url).await;
        let mut state =
            tm::state(platform, Default::default(), Some(bridge.publisher.clone()), "tm", kernel.metrics().registry());
        state.ui = ui;
        if !cluster.is_empty() {
            state.documents = tm::Documents::new(Redis::connect_cluster(&cluster).await.unwrap());
        }
        let state = web::Data::new(state);
        let deps = SessionDeps::new(kernel.clone(), bridge, Default::default()).with_max_sessions(max_sessions);
        let s = state.clone();
        let options =
            ServerOptions { workers: 1, keep_alive: Duration::from_secs(5), shutdown_timeout: Duration::from_secs(1) };
        let app =
            move || App::new().configure(tm::configure(s.clone(), tm::openapi())).configure(tm::configure_fallback);
        let upgrades = tm::session::upgrades(state.clone(), deps);
        let Bound { server, addr } = server::bind(([127, 0, 0, 1], 0).into(), &options, app, Some(upgrades)).unwrap();
        let addr = addr.to_string();
        let handle = server.handle();
        actix_rt::spawn(server);
        Node { addr, kernel, state, _arbiter: arbiter, _server: handle }
    }

    pub(crate) async fn redis(&self) -> MultiplexedConnection {
        redis::Client::open(self.brokers.redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }
}

/// A REST call; retried while the node answers 5xx (Redis restarting).
pub(crate) async fn rest(client: &ApiClient, method: Method, path: &str, body: Option<Value>) -> Value {
    for _ in 0..100 {
        let (status, value) = client.send(method.clone(), path, body.clone()).await;
        if !status.is_server_error() {
            assert!(status.is_success(), "{method} {path}: {status} {value}");
            return value;
        }
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
    panic!("{method} {path} kept failing");
}

pub(crate) async fn new_doc(client: &ApiClient, state: Value) -> String {
    let doc = rest(client, Method::POST, "/api/documents", Some(json!({ "state": state }))).await;
    doc["id"].as_str().unwrap().to_owned()
}

pub(crate) async fn patch(client: &ApiClient, id: &str, version: u64, patch: Value) -> Value {
    rest(client, Method::PATCH, &format!("/api/documents/{id}"), Some(json!({"version": version, "patch": patch})))
        .await
}

pub(crate) async fn connect(node: &Node, client: &ApiClient) -> Ws {
    let url = format!("ws://{}/ws?token={}", node.addr, client.token());
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// Connects with a tiny receive buffer, so that a client that stops reading
/// backs up into the server quickly.
pub(crate) async fn connect_small_buffer(node: &Node, client: &ApiClient) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr.parse().unwrap()).await.unwrap();
    let url = format!("ws://{}/ws?token={}", node.addr, client.token());
    tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream)).await.unwrap().0
}

pub(crate) async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// The next text frame as JSON, skipping welcome, presence and cursor frames.
pub(crate) async fn next(ws: &mut Ws) -> Value {
    loop {
        let frame = next_any(ws).await;
        if !matches!(frame["type"].as_str(), Some("welcome" | "presence" | "cursor")) {
            return frame;
        }
    }
}

/// The next frame of type `kind`, skipping others.
pub(crate) async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let frame = next_any(ws).await;
        if frame["type"] == kind {
            return frame;
        }
    }
}

pub(crate) async fn next_any(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), ws.next()).await.expect("no frame within 15s");
        match msg.expect("socket closed").expect("socket error") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// A round trip through the session that touches no document: everything
/// sent before it has been handled when its answer comes.
pub(crate) async fn round_trip(ws: &mut Ws) {
    send(ws, json!({"type": "dance"})).await;
    assert_eq!(next(ws).await["code"], "unknown_type");
}

pub(crate) fn random_doc() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Redis `PUBSUB CHANNELS nexus:doc:*`, sorted.
pub(crate) async fn doc_channels(conn: &mut MultiplexedConnection) -> Vec<String> {
    let mut channels: Vec<String> =
        redis::cmd("PUBSUB").arg("CHANNELS").arg("nexus:doc:*").query_async(conn).await.unwrap();
    channels.sort();
    channels
}

/// Redis `PUBSUB NUMSUB channel`.
pub(crate) async fn numsub(conn: &mut MultiplexedConnection, channel: &str) -> u64 {
    numsub_all(conn, &[channel.to_owned()]).await
}

/// Subscribers of all `channels` together (`PUBSUB NUMSUB`).
pub(crate) async fn numsub_all(conn: &mut MultiplexedConnection, channels: &[String]) -> u64 {
    let counts: Vec<(String, u64)> = redis::cmd("PUBSUB").arg("NUMSUB").arg(channels).query_async(conn).await.unwrap();
    counts.iter().map(|(_, n)| n).sum()
}

/// Calls of `command` Redis counted since it started (`INFO commandstats`),
/// failed (counted in `calls` too) and rejected ones included.
pub(crate) async fn command_calls(conn: &mut MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    let prefix = format!("cmdstat_{command}:");
    let Some(line) = info.lines().find(|l| l.starts_with(&prefix)) else { return 0 };
    line[prefix.len()..]
        .split(',')
        .filter_map(|field| field.split_once('='))
        .filter(|(name, _)| ["calls", "rejected_calls"].contains(name))
        .map(|(_, n)| n.parse::<u64>().unwrap())
        .sum()
}

/// Applies frames to `state` (at version `from`) until it is at `to`.
pub(crate) async fn follow_to(ws: &mut Ws, state: &mut Value, from: u64, to: u64) {
    let mut at = from;
    while at < to {
        let frame = next(ws).await;
        match frame["type"].as_str() {
            Some("snapshot") => *state = frame["state"].clone(),
            Some("change") => {
                assert_eq!(frame["version"].as_u64(), Some(at + 1), "changes arrive without gaps");
                merge_patch(state, &frame["patch"]);
            }
            _ => panic!("unexpected frame {frame}"),
        }
        at = frame["version"].as_u64().unwrap();
    }
}
