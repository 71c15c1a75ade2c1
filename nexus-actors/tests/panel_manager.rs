//! The panel manager against a real redis-server, a real Redis bridge and
//! real panel processes: states announced on the owner's channel, routes,
//! crash restarts and failure, Studio/App rules, scale to zero, activation,
//! watchdog expiry, deleted panels, stale state after a restart, and the
//! owner-only API.
//!
//! The `local` driver lands elsewhere; [`ProcDriver`] here is a small
//! honest driver: each instance is a real `python3` process on a host port
//! (a panel that serves `/manifest`, or one that crashes at once), with
//! its output in a log file.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Arbiter;
use actix_web::{web, App, HttpServer};
use common::tempdir;
use futures::future::BoxFuture;
use futures::StreamExt;
use nexus_actors::bus::redis::RedisBridge;
use nexus_actors::infra::{free_port, RedisServer};
use nexus_actors::instance::{
    control_channel, instances_key, last_request_key, Activate, Endpoint, ExpireInstance, InstanceMode, InstanceState,
    InstanceStatus, Isolation, PanelRoute, ACTIVATE_CHANNEL, ROUTES_KEY,
};
use nexus_actors::roles::panel_manager::driver::{
    Code, DriverError, InstanceEvent, InstanceSpec, RuntimeDriver, Snapshot, Started, Volume,
};
use nexus_actors::roles::panel_manager::{self as pm, PanelManagerConfig, PanelManagerHandle};
use nexus_actors::roles::transaction_manager::{self as tm, auth::hash_password};
use nexus_actors::{Envelope, Kernel};
use redis::AsyncCommands;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const SERVER: &str = r#"
import http.server, sys
port = int(sys.argv[1])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"tools": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("panel serving on", port, flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;

const CRASH: &str = r#"
import sys
print("boom: the panel cannot start", flush=True)
sys.exit(3)
"#;

/// Serves like [`SERVER`] but ignores SIGTERM: it takes the whole stop
/// grace (then SIGKILL) to stop.
const SLOW_STOP: &str = r#"
import http.server, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
port = int(sys.argv[1])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"tools": []}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("panel serving on", port, "and ignoring SIGTERM", flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#;

const DEAF: &str = r#"
import time
print("running, but never listening", flush=True)
time.sleep(600)
"#;

/// One instance's processes as the test driver keeps them.
struct Proc {
    panel: String,
    script: &'static str,
    port: u16,
    log: PathBuf,
    pid: Arc<AtomicU32>,
    exited: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    events: mpsc::UnboundedSender<InstanceEvent>,
}

/// Runs each instance as one python3 process on a free host port.
struct ProcDriver {
    dir: PathBuf,
    sources: Mutex<HashMap<String, String>>,
    versions: Mutex<HashMap<String, u64>>,
    procs: Mutex<HashMap<String, Proc>>,
    forgotten: Mutex<Vec<String>>,
    /// Per snapshot taken: the panel, and whether a process of it still ran.
    snapshots: Mutex<Vec<(String, bool)>>,
}

impl ProcDriver {
    fn new(dir: PathBuf) -> Self {
        ProcDriver {
            dir,
            sources: Mutex::default(),
            versions: Mutex::default(),
            procs: Mutex::default(),
            forgotten: Mutex::default(),
            snapshots: Mutex::default(),
        }
    }

    fn remember(&self, panel: &str, source: &str) -> Result<(), DriverError> {
        if !["template:ok", "template:crash", "template:deaf", "template:slowstop"].contains(&source) {
            return Err(DriverError::UnknownSource(source.to_owned(), "ok, crash, deaf, slowstop".to_owned()));
        }
        self.sources.lock().unwrap().insert(panel.to_owned(), source.to_owned());
        Ok(())
    }

    /// Starts the process of `p`; a thread reports its exit unless stopped.
    fn run(p: &Proc) -> Result<(), DriverError> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&p.log)?;
        let mut child = std::process::Command::new("python3")
            .args(["-u", "-c", p.script, &p.port.to_string()])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        p.pid.store(child.id(), Ordering::SeqCst);
        p.exited.store(false, Ordering::SeqCst);
        let (exited, stopping, events) = (p.exited.clone(), p.stopping.clone(), p.events.clone());
        std::thread::spawn(move || {
            let code = child.wait().ok().and_then(|s| s.code());
            exited.store(true, Ordering::SeqCst);
            if !stopping.load(Ordering::SeqCst) {
                let _ = events.send(InstanceEvent::Exited { code });
            }
        });
        Ok(())
    }

    fn is_running(&self, instance: &str) -> bool {
        self.procs.lock().unwrap().get(instance).is_some_and(|p| !p.exited.load(Ordering::SeqCst))
    }

    fn any_running(&self, panel: &str) -> bool {
        self.procs.lock().unwrap().values().any(|p| p.panel == panel && !p.exited.load(Ordering::SeqCst))
    }

    /// How many instances of `panel` were ever started.
    fn started(&self, panel: &str) -> usize {
        self.procs.lock().unwrap().values().filter(|p| p.panel == panel).count()
    }
}

impl RuntimeDriver for ProcDriver {
    fn name(&self) -> &'static str {
        "test-processes"
    }

    fn volume(&self, panel: &str, source: &str) -> BoxFuture<'_, Result<Volume, DriverError>> {
        let result = self
            .remember(panel, source)
            .map(|()| Volume { panel: panel.to_owned(), location: self.dir.join(format!("volume-{panel}")) });
        Box::pin(async move { result })
    }

    fn snapshot(&self, panel: &str, source: &str) -> BoxFuture<'_, Result<Snapshot, DriverError>> {
        self.snapshots.lock().unwrap().push((panel.to_owned(), self.any_running(panel)));
        let result = self.remember(panel, source).map(|()| {
            let mut versions = self.versions.lock().unwrap();
            let version = versions.entry(panel.to_owned()).or_default();
            *version += 1;
            Snapshot {
                panel: panel.to_owned(),
                version: *version,
                location: self.dir.join(format!("snapshot-{panel}-{version}")),
            }
        });
        Box::pin(async move { result })
    }

    fn start(&self, spec: InstanceSpec) -> BoxFuture<'_, Result<Started, DriverError>> {
        Box::pin(async move {
            let source = self.sources.lock().unwrap().get(&spec.panel).cloned();
            let script = match source.as_deref() {
                Some("template:crash") => CRASH,
                Some("template:deaf") => DEAF,
                Some("template:slowstop") => SLOW_STOP,
                Some(_) => SERVER,
                None => return Err(DriverError::NoCommand),
            };
            if let (InstanceMode::App, Code::Studio(_)) | (InstanceMode::Studio, Code::App(_)) = (spec.mode, &spec.code)
            {
                return Err(DriverError::Sandbox("mode and code disagree".into()));
            }
            let port = free_port()?;
            let (events, rx) = mpsc::unbounded_channel();
            let p = Proc {
                panel: spec.panel.clone(),
                script,
                port,
                log: self.dir.join(format!("{}.log", spec.instance)),
                pid: Arc::default(),
                exited: Arc::default(),
                stopping: Arc::default(),
                events,
            };
            Self::run(&p)?;
            self.procs.lock().unwrap().insert(spec.instance.clone(), p);
            let endpoint = Endpoint {
                instance: spec.instance,
                addr: format!("127.0.0.1:{port}"),
                watchdog: None,
                watchdog_token: None,
            };
            Ok(Started {
                endpoint,
                isolation: Isolation::None,
                warning: Some("test driver: no isolation".into()),
                events: rx,
            })
        })
    }

    fn restart(&self, instance: &str) -> BoxFuture<'_, Result<(), DriverError>> {
        let result = match self.procs.lock().unwrap().get(instance) {
            Some(p) => Self::run(p),
            None => Err(DriverError::NoInstance(instance.to_owned())),
        };
        Box::pin(async move { result })
    }

    fn stop(&self, instance: &str, grace: Duration) -> BoxFuture<'_, Result<(), DriverError>> {
        let found = self.procs.lock().unwrap().get(instance).map(|p| {
            p.stopping.store(true, Ordering::SeqCst);
            (p.pid.load(Ordering::SeqCst) as i32, p.exited.clone())
        });
        let instance = instance.to_owned();
        Box::pin(async move {
            let (pid, exited) = found.ok_or(DriverError::NoInstance(instance))?;
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = tokio::time::Instant::now() + grace;
            while !exited.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !exited.load(Ordering::SeqCst) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            while !exited.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        })
    }

    fn logs(&self, instance: &str, lines: usize) -> BoxFuture<'_, Result<Vec<String>, DriverError>> {
        let log = self.procs.lock().unwrap().get(instance).map(|p| p.log.clone());
        let instance = instance.to_owned();
        Box::pin(async move {
            let text = std::fs::read_to_string(log.ok_or(DriverError::NoInstance(instance))?)?;
            let all: Vec<String> = text.lines().map(str::to_owned).collect();
            Ok(all[all.len().saturating_sub(lines)..].to_vec())
        })
    }

    fn forget(&self, panel: &str) -> BoxFuture<'_, Result<(), DriverError>> {
        self.forgotten.lock().unwrap().push(panel.to_owned());
        Box::pin(async { Ok(()) })
    }
}

/// A node with a transaction manager and a panel manager over [`ProcDriver`].
struct Node {
    redis: RedisServer,
    base: String,
    kernel: Kernel,
    handle: PanelManagerHandle,
    driver: Arc<ProcDriver>,
    conn: redis::aio::MultiplexedConnection,
    _arbiter: Arbiter,
    _server: actix_web::dev::ServerHandle,
}

fn fast(config: &mut PanelManagerConfig) {
    config.ready_timeout = Duration::from_secs(10);
    config.probe_interval = Duration::from_millis(50);
    config.restart_backoff = Duration::from_millis(50);
    config.max_restart_backoff = Duration::from_millis(200);
    config.stop_grace = Duration::from_secs(2);
    config.drain = Duration::from_millis(200);
    config.tick = Duration::from_millis(200);
}

async fn node(name: &str, tweak: impl FnOnce(&mut PanelManagerConfig)) -> Node {
    let redis = RedisServer::start(&tempdir(name), false).unwrap();
    node_on(redis, name, tweak).await
}

async fn node_on(redis: RedisServer, name: &str, tweak: impl FnOnce(&mut PanelManagerConfig)) -> Node {
    let url = redis.url();
    let store = tm::Store::connect(&url).await.unwrap();
    let _ = store.create_user("ada", &hash_password("ada-password")).await.unwrap();
    let _ = store.create_user("bob", &hash_password("bob-password")).await.unwrap();
    let kernel = Kernel::new("pm-test");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), &url).unwrap();
    let driver = Arc::new(ProcDriver::new(tempdir(&format!("{name}-driver"))));
    let mut config = PanelManagerConfig::new("node-a", url.clone());
    fast(&mut config);
    tweak(&mut config);
    let handle = pm::start(&kernel, bridge.clone(), driver.clone(), config).await.unwrap();
    let publish = Some(bridge.link::<nexus_actors::bus::redis::Publish>("tm"));
    let tm_state = web::Data::new(tm::state(&url, publish, "pm-test").await.unwrap());
    let auth = tm_state.auth.clone();
    let (h, s) = (handle.clone(), store.clone());
    let server = HttpServer::new(move || {
        App::new()
            .configure(pm::configure(h.clone(), s.clone(), auth.clone()))
            .configure(tm::configure(tm_state.clone()))
            .configure(tm::configure_fallback)
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let base = format!("http://{}", server.addrs()[0]);
    let server = server.run();
    let server_handle = server.handle();
    actix_rt::spawn(server);
    let conn = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let node = Node { redis, base, kernel, handle, driver, conn, _arbiter: arbiter, _server: server_handle };
    // The manager subscribes asynchronously; messages before that are lost.
    node.wait_subscribed(ACTIVATE_CHANNEL).await;
    node
}

impl Node {
    async fn wait_subscribed(&self, channel: &str) {
        let mut conn = self.conn.clone();
        for _ in 0..250 {
            let (_, n): (String, u64) =
                redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async(&mut conn).await.unwrap();
            if n > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("nobody subscribed to {channel}");
    }

    async fn login(&self, user: &str) -> Client {
        let password = format!("{user}-password");
        let resp = reqwest::Client::new()
            .post(format!("{}/api/login", self.base))
            .json(&json!({"username": user, "password": password}))
            .send()
            .await
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        Client { base: self.base.clone(), token: body["token"].as_str().map(str::to_owned) }
    }

    async fn statuses(&self, panel: &str) -> Vec<InstanceStatus> {
        let raw: HashMap<String, String> = self.conn.clone().hgetall(instances_key(panel)).await.unwrap();
        let mut all: Vec<InstanceStatus> = raw.values().map(|v| serde_json::from_str(v).unwrap()).collect();
        all.sort_by_key(|s| s.since_ms);
        all
    }

    async fn status(&self, panel: &str, instance: &str) -> Option<InstanceStatus> {
        let raw: Option<String> = self.conn.clone().hget(instances_key(panel), instance).await.unwrap();
        raw.map(|r| serde_json::from_str(&r).unwrap())
    }

    async fn route(&self, panel: &str) -> Option<PanelRoute> {
        let raw: Option<String> = self.conn.clone().hget(ROUTES_KEY, panel).await.unwrap();
        raw.map(|r| serde_json::from_str(&r).unwrap())
    }

    async fn publish<T: nexus_actors::Payload>(&self, channel: &str, payload: T) {
        let envelope = Envelope::new("test", payload);
        let _: u64 = self.conn.clone().publish(channel, envelope.encode()).await.unwrap();
    }

    /// Polls `what` until it returns `Some`; panics after `secs`.
    async fn until<T, F, Fut>(&self, secs: u64, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while tokio::time::Instant::now() < deadline {
            if let Some(v) = f().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("timed out after {secs}s waiting for: {what}");
    }

    async fn state_of(&self, panel: &str, instance: &str, state: InstanceState) -> InstanceStatus {
        self.until(15, &format!("{instance} {state:?}"), || async {
            self.status(panel, instance).await.filter(|s| s.state == state)
        })
        .await
    }

    async fn last_request(&self, panel: &str) -> Option<String> {
        self.conn.clone().get(last_request_key(panel)).await.unwrap()
    }

    /// The panel's App instances that have not ended.
    async fn live_apps(&self, panel: &str) -> Vec<InstanceStatus> {
        let all = self.statuses(panel).await;
        all.into_iter().filter(|s| s.mode == InstanceMode::App && !s.state.is_final()).collect()
    }

    async fn endpoints(&self, panel: &str, n: usize) -> PanelRoute {
        self.until(15, &format!("{n} endpoints for {panel}"), || async {
            self.route(panel).await.filter(|r| r.endpoints.len() == n)
        })
        .await
    }
}

struct Client {
    base: String,
    token: Option<String>,
}

impl Client {
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        let mut req = reqwest::Client::new().request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body.to_owned());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn post(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, None).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    async fn put(&self, path: &str, body: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn new_panel(&self, source: &str) -> String {
        let body = json!({"name": "p", "mode": "studio", "source": source}).to_string();
        let (status, panel) = self.send(reqwest::Method::POST, "/api/panels", Some(&body)).await;
        assert_eq!(status, StatusCode::CREATED, "{panel}");
        panel["id"].as_str().unwrap().to_owned()
    }
}

/// Collects the `data` of every envelope on `channel`, from a raw connection.
async fn listen(url: &str, channel: &str) -> Arc<Mutex<Vec<Value>>> {
    let mut pubsub = redis::Client::open(url).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(channel).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    actix_rt::spawn(async move {
        let mut stream = pubsub.into_on_message();
        while let Some(msg) = stream.next().await {
            let envelope: Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
            s.lock().unwrap().push(envelope);
        }
    });
    seen
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn metric(node: &Node, line_start: &str) -> Option<f64> {
    node.kernel
        .render_metrics()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[actix_rt::test]
async fn studio_instance_goes_pending_starting_ready_is_routed_and_stops() {
    let node = node("pm-studio", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = ada.new_panel("template:ok").await;
    let announced = listen(&node.redis.url(), "nexus:panels:ada").await;

    let (status, created) = ada.post(&format!("/api/panels/{panel}/studio")).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["state"], "pending");
    assert_eq!(created["mode"], "studio");
    let instance = created["instance"].as_str().unwrap().to_owned();
    assert!(instance.starts_with(&panel), "{instance}");

    let ready = node.state_of(&panel, &instance, InstanceState::Ready).await;
    assert_eq!(ready.isolation, Isolation::None);
    assert!(ready.reason.as_deref().unwrap_or("").contains("no isolation"), "the warning is shown: {ready:?}");
    let route = node.endpoints(&panel, 1).await;
    assert_eq!((route.mode, route.activatable, route.owner.as_str()), (InstanceMode::Studio, false, "ada"));
    assert_eq!(route.endpoints[0].instance, instance);
    let manifest = reqwest::get(format!("http://{}/manifest", route.endpoints[0].addr)).await.unwrap();
    assert_eq!(manifest.status(), StatusCode::OK, "the route leads to the panel");

    let (status, body) = ada.post(&format!("/api/panels/{panel}/studio")).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{body}");

    let (status, logs) = ada.get(&format!("/api/panels/{panel}/logs?lines=5")).await;
    assert_eq!(status, StatusCode::OK, "{logs}");
    assert_eq!(logs["instance"], instance.as_str());
    assert!(logs["lines"][0].as_str().unwrap().contains("panel serving on"), "{logs}");

    let (status, _) = ada.delete(&format!("/api/panels/{panel}/studio")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let stopped = node.state_of(&panel, &instance, InstanceState::Stopped).await;
    assert!(stopped.reason.unwrap().contains("stopped by its owner"));
    let route = node.endpoints(&panel, 0).await;
    assert!(!route.activatable);
    assert!(!node.driver.is_running(&instance), "the process is gone");
    let (status, _) = ada.delete(&format!("/api/panels/{panel}/studio")).await;
    assert_eq!(status, StatusCode::CONFLICT, "nothing left to stop");

    let (status, list) = ada.get(&format!("/api/panels/{panel}/instances")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["state"], "stopped");

    // Every transition was announced to the owner, in order.
    let states = node
        .until(5, "stopped announced", || async {
            let seen = announced.lock().unwrap().clone();
            let states: Vec<String> = seen
                .iter()
                .filter(|e| e["type"] == "nexus.instance.changed")
                .map(|e| e["data"]["status"]["state"].as_str().unwrap().to_owned())
                .collect();
            states.last().is_some_and(|s| s == "stopped").then_some(states)
        })
        .await;
    assert_eq!(states, ["pending", "starting", "ready", "stopping", "stopped"]);
    assert_eq!(metric(&node, "nexus_panel_instance_start_seconds_count{mode=\"studio\"}"), Some(1.0));
    assert_eq!(metric(&node, "nexus_panel_instances{mode=\"studio\",state=\"ready\"}"), Some(0.0));
}

#[actix_rt::test]
async fn a_crashing_panel_is_restarted_with_backoff_then_fails_with_its_log_tail() {
    let node = node("pm-crash", |c| c.max_crashes = 2).await;
    let ada = node.login("ada").await;
    let panel = ada.new_panel("template:crash").await;
    let (status, created) = ada.post(&format!("/api/panels/{panel}/studio")).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let instance = created["instance"].as_str().unwrap();

    let failed = node.state_of(&panel, instance, InstanceState::Failed).await;
    assert_eq!(failed.restarts, 2);
    let reason = failed.reason.unwrap();
    assert!(reason.starts_with("crashed 3 times; last exit code 3"), "{reason}");
    assert!(failed.log_tail.iter().any(|l| l.contains("boom: the panel cannot start")), "{:?}", failed.log_tail);
    assert!(failed.log_tail.len() <= 20);
    assert_eq!(metric(&node, "nexus_panel_instance_restarts_total"), Some(2.0));
    assert_eq!(metric(&node, "nexus_panel_instance_failures_total"), Some(1.0));
    let route = node.route(&panel).await.unwrap();
    assert!(route.endpoints.is_empty());
    // A failed instance is final: a new Studio start is allowed.
    let (status, _) = ada.post(&format!("/api/panels/{panel}/studio")).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[actix_rt::test]
async fn a_panel_that_never_answers_fails_after_the_ready_timeout() {
    let node = node("pm-deaf", |c| c.ready_timeout = Duration::from_secs(1)).await;
    let ada = node.login("ada").await;
    let panel = ada.new_panel("template:deaf").await;
    let (_, created) = ada.post(&format!("/api/panels/{panel}/studio")).await;
    let instance = created["instance"].as_str().unwrap();
    let failed = node.state_of(&panel, instance, InstanceState::Failed).await;
    let reason = failed.reason.unwrap();
    assert!(reason.starts_with("not ready within 1s (GET /manifest failed"), "{reason}");
    assert_eq!(failed.log_tail, ["running, but never listening"]);
    assert_eq!(failed.restarts, 0);
    assert!(!node.driver.is_running(instance), "what never got ready is stopped");
    assert!(node.route(&panel).await.unwrap().endpoints.is_empty());
}

#[actix_rt::test]
async fn a_deployed_app_scales_to_zero_and_one_activation_starts_one_instance() {
    let node = node("pm-app", |c| c.idle_timeout = Duration::from_secs(2)).await;
    let ada = node.login("ada").await;
    let panel = ada.new_panel("template:ok").await;
    let (_, studio) = ada.post(&format!("/api/panels/{panel}/studio")).await;
    let studio = studio["instance"].as_str().unwrap().to_owned();
    node.state_of(&panel, &studio, InstanceState::Ready).await;

    let (status, deployed) = ada.post(&format!("/api/panels/{panel}/deploy")).await;
    assert_eq!(status, StatusCode::CREATED, "{deployed}");
    assert_eq!(deployed, json!({"panel": panel, "version": 1, "replicas": 1}));
    let stopped = node.state_of(&panel, &studio, InstanceState::Stopped).await;
    assert!(stopped.reason.unwrap().contains("deployed as an App"));
    let route = node.endpoints(&panel, 1).await;
    assert_eq!((route.mode, route.activatable), (InstanceMode::App, true));
    let first = route.endpoints[0].instance.clone();
    assert_ne!(first, studio);
    let (status, _) = ada.post(&format!("/api/panels/{panel}/studio")).await;
    assert_eq!(status, StatusCode::CONFLICT, "one panel, one route: no Studio while it is an App");

    // No request comes: scaled to zero, the route stays activatable.
    let gone = node.state_of(&panel, &first, InstanceState::Stopped).await;
    assert!(gone.reason.unwrap().contains("scaled to zero"));
    let route = node.endpoints(&panel, 0).await;
    assert!(route.activatable);

    for _ in 0..5 {
        node.publish(ACTIVATE_CHANNEL, Activate { panel: panel.clone() }).await;
    }
    let route = node.endpoints(&panel, 1).await;
    let second = route.endpoints[0].instance.clone();
    assert_ne!(second, first);
    // Repeats while it starts (and once it serves) start nothing more.
    for _ in 0..3 {
        node.publish(ACTIVATE_CHANNEL, Activate { panel: panel.clone() }).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let apps: Vec<InstanceStatus> =
        node.statuses(&panel).await.into_iter().filter(|s| s.mode == InstanceMode::App).collect();
    assert_eq!(apps.len(), 2, "one instance before scale to zero, exactly one after: {apps:?}");
    let claim: Option<String> = node.conn.clone().get(format!("nexus:panel:{panel}:activating")).await.unwrap();
    assert_eq!(claim, None, "the claim is released once the instance serves");

    // Activation of a panel that is not deployed starts nothing.
    let other = ada.new_panel("template:ok").await;
    node.publish(ACTIVATE_CHANNEL, Activate { panel: other.clone() }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(node.statuses(&other).await.is_empty());
    assert_eq!(node.route(&other).await, None);
}

#[actix_rt::test]
async fn scale_runs_that_many_instances_and_refuses_bad_requests() {
    let node = node("pm-scale", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = ada.new_panel("template:ok").await;
    let scale = format!("/api/panels/{panel}/scale");

    let (status, body) = ada.put(&scale, r#"{"replicas": 2}"#).await;
    assert_eq!(status, StatusCode::CONFLICT, "not deployed: {body}");
    let (status, _) = ada.post(&format!("/api/panels/{panel}/deploy")).await;
    assert_eq!(status, StatusCode::CREATED);
    node.endpoints(&panel, 1).await;

    let (status, body) = ada.put(&scale, r#"{"replicas": 2}"#).await;
    assert_eq!((status, body["replicas"].as_u64()), (StatusCode::OK, Some(2)), "{body}");
    let route = node.endpoints(&panel, 2).await;
    assert_ne!(route.endpoints[0].addr, route.endpoints[1].addr);

    let (status, body) = ada.put(&scale, r#"{"replicas": 5}"#).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("0 to 4"), "{body}");
    for bad in [r#"{"replicas": -1}"#, r#"{"replicas": "two"}"#, "{not json", ""] {
        let (status, body) = ada.put(&scale, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body["message"].as_str().unwrap().contains("invalid JSON body"), "{body}");
    }
    node.endpoints(&panel, 2).await;

    let (status, _) = ada.put(&scale, r#"{"replicas": 0}"#).await;
    assert_eq!(status, StatusCode::OK);
    let route = node.endpoints(&panel, 0).await;
    assert!(route.activatable, "scaled to zero by hand, still activatable");

    let (status, _) = ada.delete(&format!("/api/panels/{panel}/instances")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let route =
        node.until(5, "undeployed route", || async { node.route(&panel).await.filter(|r| !r.activatable) }).await;
    assert_eq!(route.mode, InstanceMode::Studio);
    let (status, _) = ada.put(&scale, r#"{"replicas": 1}"#).await;
    assert_eq!(status, StatusCode::CONFLICT, "undeployed");
    let (status, _) = ada.post(&format!("/api/panels/{panel}/studio")).await;
    assert_eq!(status, StatusCode::CREATED, "a Studio instance may run again");
}

#[actix_rt::test]
async fn the_watchdog_expires_a_studio_instance_and_shutdown_stops_the_rest() {
    let node = node("pm-watchdog", |c| c.idle_mark = Duration::from_secs(1)).await;
    let ada = node.login("ada").await;
    let (one, two) = (ada.new_panel("template:ok").await, ada.new_panel("template:ok").await);
    let (_, a) = ada.post(&format!("/api/panels/{one}/studio")).await;
    let (_, b) = ada.post(&format!("/api/panels/{two}/studio")).await;
    let (a, b) = (a["instance"].as_str().unwrap().to_owned(), b["instance"].as_str().unwrap().to_owned());
    node.state_of(&one, &a, InstanceState::Ready).await;
    node.state_of(&two, &b, InstanceState::Ready).await;
    node.wait_subscribed(&control_channel(&a)).await;

    // Without requests a serving instance shows as idle; a request makes it ready again.
    let idle = node.state_of(&two, &b, InstanceState::Idle).await;
    assert!(idle.reason.unwrap().starts_with("no request for"));
    node.until(10, "ready again after a request", || async {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let _: () = node.conn.clone().set(format!("nexus:panel:{two}:last-request"), now).await.unwrap();
        node.status(&two, &b).await.filter(|s| s.state == InstanceState::Ready)
    })
    .await;
    assert_eq!(node.endpoints(&two, 1).await.endpoints[0].instance, b, "idle instances keep serving");

    // A message naming another instance on a's channel is not obeyed.
    let forged = ExpireInstance { instance: b.clone(), reason: "forged".into() };
    node.publish(&control_channel(&a), forged).await;
    let expire = ExpireInstance { instance: a.clone(), reason: "no heartbeat for 30 min".into() };
    node.publish(&control_channel(&a), expire).await;
    let stopped = node.state_of(&one, &a, InstanceState::Stopped).await;
    assert!(stopped.reason.unwrap().starts_with("watchdog: no heartbeat for 30 min"));
    node.endpoints(&one, 0).await;
    assert_eq!(node.status(&two, &b).await.unwrap().state, InstanceState::Ready);

    node.handle.stop_all(Duration::from_secs(1)).await;
    let status = node.status(&two, &b).await.unwrap();
    assert_eq!(status.state, InstanceState::Stopped, "written before stop_all returns");
    assert!(status.reason.unwrap().contains("its node shut down"));
    assert!(!node.driver.is_running(&b));
}

#[actix_rt::test]
async fn the_api_is_for_the_panels_owner_only_and_checks_its_input() {
    let node = node("pm-api", |_| {}).await;
    let (ada, bob) = (node.login("ada").await, node.login("bob").await);
    let anonymous = Client { base: node.base.clone(), token: None };
    let panel = ada.new_panel("template:ok").await;
    let routes = [
        (reqwest::Method::GET, "instances"),
        (reqwest::Method::DELETE, "instances"),
        (reqwest::Method::POST, "studio"),
        (reqwest::Method::DELETE, "studio"),
        (reqwest::Method::POST, "deploy"),
        (reqwest::Method::PUT, "scale"),
        (reqwest::Method::GET, "logs"),
    ];
    for (method, tail) in &routes {
        let path = format!("/api/panels/{panel}/{tail}");
        let body = Some(r#"{"replicas": 1}"#);
        let (status, err) = anonymous.send(method.clone(), &path, body).await;
        assert_eq!(
            (status, err["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("unauthorized")),
            "{method} {path}"
        );
        let (status, err) = bob.send(method.clone(), &path, body).await;
        assert_eq!((status, err["error"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{method} {path}");
        let path = format!("/api/panels/no-such-panel/{tail}");
        let (status, err) = ada.send(method.clone(), &path, body).await;
        assert_eq!((status, err["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{method} {path}");
    }
    assert!(node.statuses(&panel).await.is_empty(), "nothing ran for a refused request");

    let (status, body) = ada.get(&format!("/api/panels/{panel}/logs")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no instance yet: {body}");
    let broken = ada.new_panel("template:unknown").await;
    let (status, body) = ada.post(&format!("/api/panels/{broken}/studio")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap().contains("unknown panel source"), "{body}");
    let (status, _) = ada.post(&format!("/api/panels/{broken}/deploy")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (_, created) = ada.post(&format!("/api/panels/{panel}/studio")).await;
    let instance = created["instance"].as_str().unwrap().to_owned();
    node.state_of(&panel, &instance, InstanceState::Ready).await;
    for bad in ["lines=0", "lines=1001", "lines=abc"] {
        let (status, body) = ada.get(&format!("/api/panels/{panel}/logs?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, _) = ada.get(&format!("/api/panels/{panel}/logs?instance=someone-else")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "only this panel's instances");
    let (status, logs) = ada.get(&format!("/api/panels/{panel}/logs?instance={instance}&lines=1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(logs["lines"].as_array().unwrap().len(), 1);
    let (status, list) = bob.get(&format!("/api/panels/{panel}/instances")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{list}");
}

#[actix_rt::test]
async fn deleting_a_panel_stops_its_instances_and_removes_its_state() {
    let node = node("pm-delete", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = ada.new_panel("template:ok").await;
    let (_, created) = ada.post(&format!("/api/panels/{panel}/studio")).await;
    let instance = created["instance"].as_str().unwrap().to_owned();
    node.state_of(&panel, &instance, InstanceState::Ready).await;
    node.until(5, "a pattern subscription", || async {
        let n: u64 = redis::cmd("PUBSUB").arg("NUMPAT").query_async(&mut node.conn.clone()).await.unwrap();
        (n > 0).then_some(())
    })
    .await;

    let _: () = node.conn.clone().set(last_request_key(&panel), now_ms()).await.unwrap();

    let (status, _) = ada.delete(&format!("/api/panels/{panel}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    node.until(10, "panel forgotten by the driver", || async {
        node.driver.forgotten.lock().unwrap().contains(&panel).then_some(())
    })
    .await;
    assert!(!node.driver.is_running(&instance));
    node.until(5, "route and statuses removed", || async {
        let gone = node.route(&panel).await.is_none() && node.statuses(&panel).await.is_empty();
        gone.then_some(())
    })
    .await;
    node.until(5, "traffic signal removed", || async { node.last_request(&panel).await.is_none().then_some(()) }).await;
}

#[actix_rt::test]
async fn a_restarted_panel_manager_marks_what_it_left_behind_stopped() {
    let redis = RedisServer::start(&tempdir("pm-stale"), false).unwrap();
    let url = redis.url();
    let mut conn = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let status = InstanceStatus {
        instance: "p1-dead".into(),
        panel: "p1".into(),
        owner: "ada".into(),
        mode: InstanceMode::App,
        state: InstanceState::Ready,
        isolation: Isolation::Gvisor,
        reason: None,
        log_tail: vec![],
        restarts: 0,
        since_ms: 1,
    };
    let live_elsewhere =
        Endpoint { instance: "p1-other-node".into(), addr: "127.0.0.1:9".into(), watchdog: None, watchdog_token: None };
    let dead =
        Endpoint { instance: "p1-dead".into(), addr: "127.0.0.1:8".into(), watchdog: None, watchdog_token: None };
    let route = PanelRoute {
        panel: "p1".into(),
        owner: "ada".into(),
        mode: InstanceMode::App,
        endpoints: vec![dead, live_elsewhere.clone()],
        activatable: true,
    };
    let _: () = conn.hset(instances_key("p1"), "p1-dead", serde_json::to_string(&status).unwrap()).await.unwrap();
    let _: () = conn.hset("nexus:panel-manager:node-a:instances", "p1-dead", "p1").await.unwrap();
    let _: () = conn.hset(ROUTES_KEY, "p1", serde_json::to_string(&route).unwrap()).await.unwrap();

    let node = node_on(redis, "pm-stale", |_| {}).await;
    let cleared = node.status("p1", "p1-dead").await.unwrap();
    assert_eq!(cleared.state, InstanceState::Stopped);
    assert_eq!(cleared.reason.as_deref(), Some("its panel manager restarted"));
    let route = node.route("p1").await.unwrap();
    assert_eq!(route.endpoints, vec![live_elsewhere], "only this node's endpoints go");
    assert!(route.activatable);
    let left: HashMap<String, String> =
        node.conn.clone().hgetall("nexus:panel-manager:node-a:instances").await.unwrap();
    assert!(left.is_empty());
}

/// Waits until the route has no endpoint, then checks that `instance` still
/// runs, serves and is not stopping: it left the route before its stop.
async fn out_of_route_but_still_serving(node: &Node, panel: &str, instance: &str, addr: &str) {
    node.endpoints(panel, 0).await;
    let status = node.status(panel, instance).await.unwrap();
    assert!(status.state.serves(), "not stopped before the drain: {status:?}");
    assert!(node.driver.is_running(instance));
    let manifest = reqwest::get(format!("http://{addr}/manifest")).await.unwrap();
    assert_eq!(manifest.status(), StatusCode::OK, "a gateway holding the old route still gets answers");
}

#[actix_rt::test]
async fn scale_to_zero_drains_before_stopping_and_a_request_meanwhile_keeps_the_instance() {
    let node = node("pm-drain", |c| {
        c.idle_timeout = Duration::from_secs(1);
        c.drain = Duration::from_secs(3);
    })
    .await;
    let ada = node.login("ada").await;
    let panel = ada.new_panel("template:ok").await;
    let (status, _) = ada.post(&format!("/api/panels/{panel}/deploy")).await;
    assert_eq!(status, StatusCode::CREATED);

    // Out of the route first, stopped only after the drain.
    let first = node.endpoints(&panel, 1).await.endpoints[0].clone();
    out_of_route_but_still_serving(&node, &panel, &first.instance, &first.addr).await;
    let stopped = node.state_of(&panel, &first.instance, InstanceState::Stopped).await;
    assert!(stopped.reason.unwrap().contains("scaled to zero"));
    assert!(node.route(&panel).await.unwrap().activatable);

    // A request during the drain (the gateway's signal, read again before
    // the stop) keeps the instance, back in the route.
    node.publish(ACTIVATE_CHANNEL, Activate { panel: panel.clone() }).await;
    let second = node.endpoints(&panel, 1).await.endpoints[0].clone();
    assert_ne!(second.instance, first.instance);
    out_of_route_but_still_serving(&node, &panel, &second.instance, &second.addr).await;
    let _: () = node.conn.clone().set(last_request_key(&panel), now_ms()).await.unwrap();
    let back = node.endpoints(&panel, 1).await;
    assert_eq!(back.endpoints[0].instance, second.instance, "the same instance serves again");
    assert!(node.status(&panel, &second.instance).await.unwrap().state.serves());

    // An activation during the drain keeps it too, without a cold start.
    out_of_route_but_still_serving(&node, &panel, &second.instance, &second.addr).await;
    node.publish(ACTIVATE_CHANNEL, Activate { panel: panel.clone() }).await;
    let back = node.endpoints(&panel, 1).await;
    assert_eq!(back.endpoints[0].instance, second.instance);
    assert_eq!(node.driver.started(&panel), 2, "no new instance was started");

    // Left alone, it is scaled to zero in the end.
    let stopped = node.state_of(&panel, &second.instance, InstanceState::Stopped).await;
    assert!(stopped.reason.unwrap().contains("scaled to zero"));
    assert!(!node.driver.is_running(&second.instance));
}

#[actix_rt::test]
async fn an_undeploy_racing_an_activation_leaves_no_instance_and_no_activatable_route() {
    let node = node("pm-race", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = ada.new_panel("template:ok").await;
    let (status, _) = ada.post(&format!("/api/panels/{panel}/deploy")).await;
    assert_eq!(status, StatusCode::CREATED);
    node.endpoints(&panel, 1).await;
    let (status, _) = ada.put(&format!("/api/panels/{panel}/scale"), r#"{"replicas": 0}"#).await;
    assert_eq!(status, StatusCode::OK);
    node.until(10, "scaled to zero", || async { node.live_apps(&panel).await.is_empty().then_some(()) }).await;
    let started = node.driver.started(&panel);

    // Writes wait while reads pass: the activation reads the App record and
    // then waits on its claim, while the Undeploy is handled. (Shorter than
    // the Redis client's 500 ms response timeout, so the claim succeeds.)
    let mut conn = node.conn.clone();
    redis::cmd("CLIENT").arg("PAUSE").arg(200).arg("WRITE").query_async::<()>(&mut conn).await.unwrap();
    let activate = nexus_actors::bus::BusEvent::Message(nexus_actors::bus::BusMessage {
        channel: ACTIVATE_CHANNEL.to_owned(),
        pattern: None,
        envelope: Envelope::new("test", Activate { panel: panel.clone() }).into_untyped(),
    });
    node.handle.actor.link::<nexus_actors::bus::BusEvent>("test").tell(activate).unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let undeploy = pm::manager::Undeploy { panel: panel.clone() };
    node.handle.actor.link::<pm::manager::Undeploy>("test").ask(undeploy).await.unwrap().unwrap();

    let claim = format!("nexus:panel:{panel}:activating");
    node.until(5, "the claim released", || async {
        let held: Option<String> = node.conn.clone().get(&claim).await.unwrap();
        held.is_none().then_some(())
    })
    .await;
    // Whatever the claim started would be pending or serving by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node.live_apps(&panel).await, vec![], "no instance remains");
    assert_eq!(node.driver.started(&panel), started, "nothing was started");
    let route = node.route(&panel).await.unwrap();
    assert!(!route.activatable && route.endpoints.is_empty(), "{route:?}");
    let app: Option<String> = node.conn.clone().get(format!("nexus:app:{panel}")).await.unwrap();
    assert_eq!(app, None);
}

#[actix_rt::test]
async fn an_activation_for_a_panel_whose_record_vanished_cleans_it_up_and_starts_nothing() {
    let node = node("pm-vanished", |_| {}).await;
    let ada = node.login("ada").await;
    let panel = ada.new_panel("template:ok").await;
    let (status, _) = ada.post(&format!("/api/panels/{panel}/deploy")).await;
    assert_eq!(status, StatusCode::CREATED);
    node.endpoints(&panel, 1).await;
    let (status, _) = ada.put(&format!("/api/panels/{panel}/scale"), r#"{"replicas": 0}"#).await;
    assert_eq!(status, StatusCode::OK);
    node.until(10, "scaled to zero", || async { node.live_apps(&panel).await.is_empty().then_some(()) }).await;
    assert!(node.route(&panel).await.unwrap().activatable);
    let _: () = node.conn.clone().set(last_request_key(&panel), now_ms()).await.unwrap();

    // Deleted behind the panel manager's back: no message.
    let _: () = node.conn.clone().del(format!("nexus:panel:{panel}")).await.unwrap();
    node.publish(ACTIVATE_CHANNEL, Activate { panel: panel.clone() }).await;
    node.until(5, "route, statuses and App record removed", || async {
        let app: Option<String> = node.conn.clone().get(format!("nexus:app:{panel}")).await.unwrap();
        let gone = node.route(&panel).await.is_none() && node.statuses(&panel).await.is_empty() && app.is_none();
        gone.then_some(())
    })
    .await;
    assert!(node.driver.forgotten.lock().unwrap().contains(&panel));
    assert_eq!(node.driver.started(&panel), 1, "the activation started nothing");
    assert_eq!(node.last_request(&panel).await, None);
}

#[actix_rt::test]
async fn the_sweep_stops_the_instances_of_a_panel_whose_record_vanished() {
    let node = node("pm-sweep", |c| c.sweep = Duration::from_millis(300)).await;
    let ada = node.login("ada").await;
    let (kept, vanished) = (ada.new_panel("template:ok").await, ada.new_panel("template:ok").await);
    let (_, a) = ada.post(&format!("/api/panels/{kept}/studio")).await;
    let (_, b) = ada.post(&format!("/api/panels/{vanished}/studio")).await;
    let (a, b) = (a["instance"].as_str().unwrap().to_owned(), b["instance"].as_str().unwrap().to_owned());
    node.state_of(&kept, &a, InstanceState::Ready).await;
    node.state_of(&vanished, &b, InstanceState::Ready).await;

    let _: () = node.conn.clone().del(format!("nexus:panel:{vanished}")).await.unwrap();
    node.until(10, "panel forgotten by the driver", || async {
        node.driver.forgotten.lock().unwrap().contains(&vanished).then_some(())
    })
    .await;
    assert!(!node.driver.is_running(&b));
    node.until(5, "route and statuses removed", || async {
        let gone = node.route(&vanished).await.is_none() && node.statuses(&vanished).await.is_empty();
        gone.then_some(())
    })
    .await;
    assert!(node.driver.is_running(&a), "a panel with its record is left alone");
    assert_eq!(node.endpoints(&kept, 1).await.endpoints[0].instance, a);
}

#[actix_rt::test]
async fn a_stopping_studio_instance_blocks_a_new_one_and_deploy_snapshots_after_it_stopped() {
    let node = node("pm-slowstop", |c| c.stop_grace = Duration::from_secs(3)).await;
    let ada = node.login("ada").await;
    let panel = ada.new_panel("template:slowstop").await;
    let studio = format!("/api/panels/{panel}/studio");
    let (_, created) = ada.post(&studio).await;
    let first = created["instance"].as_str().unwrap().to_owned();
    node.state_of(&panel, &first, InstanceState::Ready).await;

    // It ignores SIGTERM, so it stops only at the SIGKILL after the grace.
    let (status, _) = ada.delete(&studio).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = ada.post(&studio).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["message"].as_str().unwrap().contains("still stopping"), "{body}");
    assert!(node.driver.is_running(&first));
    node.state_of(&panel, &first, InstanceState::Stopped).await;
    let (status, created) = ada.post(&studio).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let second = created["instance"].as_str().unwrap().to_owned();
    node.state_of(&panel, &second, InstanceState::Ready).await;

    // Deploy stops it and snapshots the volume only once it has stopped.
    let deployer = Client { base: ada.base.clone(), token: ada.token.clone() };
    let deploy_path = format!("/api/panels/{panel}/deploy");
    let deploy = actix_rt::spawn(async move { deployer.post(&deploy_path).await });
    node.state_of(&panel, &second, InstanceState::Stopping).await;
    let (status, body) = ada.post(&studio).await;
    assert_eq!(status, StatusCode::CONFLICT, "no Studio start while the old one stops: {body}");
    let (status, deployed) = deploy.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{deployed}");
    assert_eq!(node.status(&panel, &second).await.unwrap().state, InstanceState::Stopped);
    let snapshots = node.driver.snapshots.lock().unwrap().clone();
    assert_eq!(snapshots, vec![(panel.clone(), false)], "nothing of the panel ran during the snapshot");
    node.endpoints(&panel, 1).await;
}
