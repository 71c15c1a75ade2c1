//! What the Nexus tests share, so that no test file grows its own copy:
//!
//! * [`Brokers`]: a `redis-server` (and a `tansu` broker when asked) of the
//!   test's own on free loopback ports, stopped when dropped;
//! * [`TestKeys`]: a token-signing key file, as an operator gives one;
//! * [`TestNode`]: a whole node ([`nexus_actors::node::start`]) over its
//!   own brokers, with an admin;
//! * [`ApiClient`]: an HTTP client that logs in and speaks JSON;
//! * [`prerequisite`]: how a test says it cannot run here: under `CI` it
//!   fails, elsewhere it says so and passes over the test;
//! * [`eventually`] and [`tempdir`];
//! * [`metric`]: one series' value in a `/metrics` text;
//! * [`kube_api::MockKube`], a mock Kubernetes API server, and
//!   [`scripted_model::ScriptedModel`], a scripted OpenAI-compatible server.

pub mod kube_api;
mod loopback;
pub mod scripted_model;
pub mod sse;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nexus_actors::bus::kafka::KafkaConfig;
use nexus_actors::infra::{RedisServer, Tansu, TansuStorage};
use nexus_actors::node::{self, NodeConfig, PanelsConfig, Role, RunningNode};
use nexus_actors::platform::auth::keys::{KeyRing, KeySet};
use nexus_actors::platform::auth::password::hash_blocking;
use nexus_actors::platform::{Platform, Quotas, UserRole};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// The password [`TestNode`] gives its `admin`.
pub const ADMIN_PASSWORD: &str = "admin-password";

/// A fresh directory for one test's files, under the system's temporary
/// directory.
pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("nexus-tests").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

/// A fresh panel (or document) id: a UUID, as the platform makes them.
pub fn panel_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Polls `cond` until it holds or `secs` pass; panics with `what` otherwise.
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

/// Polls the async `cond` until it holds or `secs` pass; panics with
/// `what` otherwise.
pub async fn until<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        actix::clock::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

/// Whether a test's prerequisite (`what`) holds. When it does not, the
/// test fails under `CI` (a missing prerequisite there is a broken
/// machine, never a pass); elsewhere it prints why and the caller returns.
pub fn prerequisite(holds: bool, what: &str) -> bool {
    if holds {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "prerequisite missing under CI: {what}");
    eprintln!("SKIPPED (not under CI): {what}");
    false
}

/// Brokers of one test, on free loopback ports, stopped when dropped.
pub struct Brokers {
    /// The test's `redis-server`.
    pub redis: RedisServer,
    /// The test's `tansu` broker, when the test asked for one.
    pub kafka: Option<Tansu>,
    /// The test's directory.
    pub dir: PathBuf,
}

impl Brokers {
    /// A `redis-server` only.
    pub fn redis(name: &str) -> Brokers {
        let dir = tempdir(name);
        let redis =
            RedisServer::start(&dir.join("redis"), false).expect("redis-server starts (scripts/test installs it)");
        Brokers { redis, kafka: None, dir }
    }

    /// A `redis-server` that keeps its data across a restart (append-only
    /// file, every write synced, so nothing written before a kill is lost).
    pub fn redis_persistent(name: &str) -> Brokers {
        let dir = tempdir(name);
        let redis =
            RedisServer::start(&dir.join("redis"), true).expect("redis-server starts (scripts/test installs it)");
        let client = redis::Client::open(redis.url()).expect("a redis url");
        let mut conn = client.get_connection().expect("redis answers");
        let () = redis::cmd("CONFIG").arg("SET").arg("appendfsync").arg("always").query(&mut conn).expect("config");
        Brokers { redis, kafka: None, dir }
    }

    /// A `redis-server` and a `tansu` broker.
    pub fn with_kafka(name: &str) -> Brokers {
        let mut brokers = Brokers::redis(name);
        let tansu = Tansu::start(&brokers.dir.join("tansu"), TansuStorage::Memory)
            .expect("tansu starts (scripts/test installs it)");
        brokers.kafka = Some(tansu);
        brokers
    }

    /// The Redis URL.
    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    /// The Kafka bootstrap servers.
    pub fn kafka_brokers(&self) -> String {
        self.kafka.as_ref().expect("these brokers have Kafka (Brokers::with_kafka)").brokers()
    }
}

/// A token-signing key file, written `0600` as an operator would.
pub struct TestKeys {
    /// The key file.
    pub file: PathBuf,
    /// Its keys, as a node holds them.
    pub ring: KeyRing,
}

impl TestKeys {
    /// A new key file in `dir`.
    pub fn new(dir: &Path) -> TestKeys {
        let file = dir.join("jwt-keys.json");
        let set = KeySet::generate();
        set.save(&file).expect("the key file is written");
        TestKeys { file, ring: KeyRing::new(set) }
    }

    /// The platform of a node over `redis_url` with these keys.
    pub async fn platform(&self, redis_url: &str) -> Platform {
        Platform::connect(redis_url, self.ring.clone(), Quotas::default()).await.expect("redis answers")
    }
}

/// Creates (or resets) `name` with `password` and `role` directly in the
/// accounts, as an operator's first user is made.
pub async fn add_user(platform: &Platform, name: &str, password: &str, role: UserRole) {
    let hash = hash_blocking(password).expect("hashing works");
    platform.accounts.set(name, &hash, role).await.expect("the user is stored");
}

/// A whole node over brokers of its own, with the user `admin`
/// ([`ADMIN_PASSWORD`]).
pub struct TestNode {
    /// The node.
    pub node: RunningNode,
    /// Its key file.
    pub keys: TestKeys,
    /// Its brokers (dropped after the node).
    pub brokers: Brokers,
}

impl TestNode {
    /// A node running `roles` over new brokers, each its own.
    pub async fn start(name: &str, roles: &[Role]) -> TestNode {
        TestNode::start_with(name, roles, |_| {}).await
    }

    /// A node running `roles`, its configuration changed by `change`
    /// before it starts.
    pub async fn start_with(name: &str, roles: &[Role], change: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let brokers = Brokers::with_kafka(name);
        let keys = TestKeys::new(&brokers.dir);
        let mut config = node_config(name, roles, &brokers, &keys);
        change(&mut config);
        let node = node::start(config).await.expect("the node starts");
        TestNode { node, keys, brokers }
    }

    /// Another node over the same brokers and key file (a second replica
    /// of a deployment), its configuration changed by `change`.
    pub async fn sibling(&self, name: &str, roles: &[Role], change: impl FnOnce(&mut NodeConfig)) -> RunningNode {
        let mut config = node_config(name, roles, &self.brokers, &self.keys);
        config.panels = PanelsConfig::new(self.brokers.dir.join(format!("panels-{name}")));
        change(&mut config);
        node::start(config).await.expect("the sibling node starts")
    }

    /// The node's base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.node.http)
    }

    /// The gateway's base URL, if the node runs one.
    pub fn gateway_url(&self) -> Option<String> {
        self.node.gateway.map(|addr| format!("http://{addr}"))
    }

    /// A client logged in as `admin`.
    pub async fn admin(&self) -> ApiClient {
        ApiClient::login(&self.url(), "admin", ADMIN_PASSWORD).await
    }

    /// A new user `name` (password `<name>-password`), created by the
    /// admin through the API, logged in.
    pub async fn user(&self, name: &str) -> ApiClient {
        let password = format!("{name}-password");
        let (status, body) =
            self.admin().await.post("/api/users", json!({"username": name, "password": password})).await;
        assert_eq!(status, StatusCode::CREATED, "creating {name}: {body}");
        ApiClient::login(&self.url(), name, &password).await
    }

    /// Stops the node (its panel instances and gateway too).
    pub async fn stop(self) {
        let TestNode { node, brokers, .. } = self;
        node.stop().await.expect("the node stops cleanly");
        drop(brokers);
    }
}

/// The configuration [`TestNode`] starts a node with: every port free, the
/// admin's password [`ADMIN_PASSWORD`], the test's brokers and keys.
pub fn node_config(name: &str, roles: &[Role], brokers: &Brokers, keys: &TestKeys) -> NodeConfig {
    NodeConfig {
        name: name.to_owned(),
        http: "127.0.0.1:0".parse().expect("an address"),
        redis_url: brokers.redis_url(),
        redis_cluster: Vec::new(),
        kafka: KafkaConfig::new(brokers.kafka_brokers()),
        roles: roles.to_vec(),
        first_user: Some(("admin".to_owned(), ADMIN_PASSWORD.to_owned())),
        gateway: "127.0.0.1:0".parse().expect("an address"),
        public_gateway_url: None,
        panels: PanelsConfig::new(brokers.dir.join("panels")),
        key_file: Some(keys.file.clone()),
        quotas: Quotas::default(),
        allowed_origins: Vec::new(),
        login_limits: Default::default(),
        llm: Default::default(),
        drain_timeout: nexus_actors::node::DEFAULT_DRAIN_TIMEOUT,
    }
}

/// An HTTP client for the API that sends its token and reads JSON.
#[derive(Clone)]
pub struct ApiClient {
    /// The underlying client (no proxy).
    pub http: reqwest::Client,
    /// Base URL of the node.
    pub base: String,
    /// The bearer token, once logged in.
    pub token: Option<String>,
}

impl ApiClient {
    /// A client without a token.
    pub fn new(base: &str) -> ApiClient {
        let http = reqwest::Client::builder().no_proxy().build().expect("a client");
        ApiClient { http, base: base.trim_end_matches('/').to_owned(), token: None }
    }

    /// A client logged in as `user`; panics when the login fails.
    pub async fn login(base: &str, user: &str, password: &str) -> ApiClient {
        let mut client = ApiClient::new(base);
        let (status, body) = client.post("/api/login", json!({"username": user, "password": password})).await;
        assert_eq!(status, StatusCode::OK, "login of {user}: {body}");
        client.token = Some(body["token"].as_str().expect("a token").to_owned());
        client
    }

    /// The token; panics when not logged in.
    pub fn token(&self) -> &str {
        self.token.as_deref().expect("logged in")
    }

    /// Sends a request with the token (if any) and a JSON body (if any);
    /// the status and the body as JSON (a string when it is not JSON).
    pub async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the node answers");
        let status = response.status();
        let text = response.text().await.expect("a body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::POST, path, Some(body)).await
    }

    /// `PUT path` with a JSON body.
    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::PUT, path, Some(body)).await
    }

    /// `PATCH path` with a JSON body.
    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::PATCH, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::DELETE, path, None).await
    }
}

/// The value of the unlabelled series `name` (a counter or gauge) in a
/// `/metrics` text; `None` when the text has no such series.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
