//! What the panel manager tests share: [`ProcDriver`], a small honest
//! runtime driver (each instance a real `python3` process on a host port,
//! its output in a log file, its sidecar secret in its environment), and
//! [`Node`], a transaction manager and a panel manager over it on a
//! redis-server of the test's own.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Arbiter;
use actix_web::{web, App, HttpServer};
use futures::future::BoxFuture;
use futures::StreamExt;
use nexus_actors::bus::redis::RedisBridge;
use nexus_actors::infra::free_port;
use nexus_actors::instance::{
    instances_key, last_request_key, Endpoint, InstanceMode, InstanceState, InstanceStatus, Isolation, PanelRoute,
    ROUTES_KEY, SIDECAR_TOKEN_ENV,
};
use nexus_actors::platform::{channels, UserRole};
use nexus_actors::roles::panel_manager::driver::{
    Code, DriverError, InstanceEvent, InstanceSpec, RuntimeDriver, SandboxError, Snapshot, Started, Volume,
};
use nexus_actors::roles::panel_manager::{self as pm, PanelManagerConfig, PanelManagerHandle};
use nexus_actors::roles::transaction_manager as tm;
use nexus_actors::{Envelope, Kernel};
use nexus_testkit::{add_user, tempdir, ApiClient, Brokers, TestKeys};
use redis::AsyncCommands;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Answers `GET` only with the instance's sidecar secret (401 otherwise),
/// as the panel contract asks of `/manifest`.
pub(crate) const SERVER: &str = r#"
import hmac, http.server, os, sys
port = int(sys.argv[1])
token = os.environ.get("NEXUS_SIDECAR_TOKEN", "").encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if token and not hmac.compare_digest(self.headers.get("X-Nexus-Sidecar-Token", "").encode(), token):
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
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
import http.server, os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
port = int(sys.argv[1])
token = os.environ.get("NEXUS_SIDECAR_TOKEN", "")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("X-Nexus-Sidecar-Token", "") == token
        body = b'{"tools": []}' if ok else b''
        self.send_response(200 if ok else 401)
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
    token: String,
    pid: Arc<AtomicU32>,
    exited: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    events: mpsc::UnboundedSender<InstanceEvent>,
}

/// Runs each instance as one python3 process on a free host port.
pub(crate) struct ProcDriver {
    dir: PathBuf,
    sources: Mutex<HashMap<String, String>>,
    versions: Mutex<HashMap<String, u64>>,
    procs: Mutex<HashMap<String, Proc>>,
    /// Panels the driver was told to forget.
    pub forgotten: Mutex<Vec<String>>,
    /// Per snapshot taken: the panel, and whether a process of it still ran.
    pub snapshots: Mutex<Vec<(String, bool)>>,
    /// When set, the panel still gets its secret but `Started` does not
    /// hand it back (a driver that forgot to).
    pub keep_token: AtomicBool,
    /// How long a snapshot takes.
    pub snapshot_takes: Mutex<Duration>,
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
            keep_token: AtomicBool::new(false),
            snapshot_takes: Mutex::default(),
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
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&p.log)?;
        let mut command = std::process::Command::new("python3");
        command.args(["-u", "-c", p.script, &p.port.to_string()]).env(SIDECAR_TOKEN_ENV, &p.token);
        // Gone with the test's process (its runtime's threads spawn these),
        // even when a test fails before stopping what it started.
        // SAFETY: only a raw syscall between fork and exec.
        unsafe {
            command.pre_exec(|| match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
        let mut child = command.stdout(log.try_clone()?).stderr(log).spawn()?;
        p.pid.store(child.id(), Ordering::SeqCst);
        p.exited.store(false, Ordering::SeqCst);
        let (exited, stopping, events) = (p.exited.clone(), p.stopping.clone(), p.events.clone());
        std::thread::spawn(move || {
            let code = child.wait().ok().and_then(|s| s.code());
            exited.store(true, Ordering::SeqCst);
            if !stopping.load(Ordering::SeqCst) {
                let _ = events.send(InstanceEvent::Exited { code, limit: None, restarted: false });
            }
        });
        Ok(())
    }

    /// Whether the process of `instance` runs.
    pub(crate) fn is_running(&self, instance: &str) -> bool {
        self.procs.lock().unwrap().get(instance).is_some_and(|p| !p.exited.load(Ordering::SeqCst))
    }

    fn any_running(&self, panel: &str) -> bool {
        self.procs.lock().unwrap().values().any(|p| p.panel == panel && !p.exited.load(Ordering::SeqCst))
    }

    /// How many instances of `panel` were ever started.
    pub(crate) fn started(&self, panel: &str) -> usize {
        self.procs.lock().unwrap().values().filter(|p| p.panel == panel).count()
    }

    /// The sidecar secret `instance` was given.
    pub(crate) fn token(&self, instance: &str) -> Option<String> {
        self.procs.lock().unwrap().get(instance).map(|p| p.token.clone())
    }
}

impl RuntimeDriver for ProcDriver {
    fn name(&self) -> &'static str {
        "test-processes"
    }

    fn volume(&self, panel: &str, source: &str) -> BoxFuture<'_, Result<Volume, DriverError>> {
        let result = self
            .remember(panel, source)
            .map(|()| Volume { panel: panel.to_owned(), location: self.dir.join(format!("volume-{panel}")).into() });
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
                location: self.dir.join(format!("snapshot-{panel}-{version}")).into(),
            }
        });
        let takes = *self.snapshot_takes.lock().unwrap();
        Box::pin(async move {
            tokio::time::sleep(takes).await;
            result
        })
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
                return Err(DriverError::Sandbox(SandboxError::NoNamespaces));
            }
            let port = free_port()?;
            let (events, rx) = mpsc::unbounded_channel();
            let token = uuid::Uuid::new_v4().simple().to_string();
            let p = Proc {
                panel: spec.panel.clone(),
                script,
                port,
                log: self.dir.join(format!("{}.log", spec.instance)),
                token: token.clone(),
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
                sidecar_token: (!self.keep_token.load(Ordering::SeqCst)).then_some(token),
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
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = tokio::time::Instant::now() + grace;
            while !exited.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !exited.load(Ordering::SeqCst) {
                // SAFETY: as above.
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

/// A node with a transaction manager and a panel manager over [`ProcDriver`]
/// (or another driver).
pub(crate) struct Node<D = ProcDriver> {
    pub brokers: Brokers,
    pub base: String,
    pub kernel: Kernel,
    pub handle: PanelManagerHandle,
    pub driver: Arc<D>,
    pub conn: redis::aio::MultiplexedConnection,
    _keys: TestKeys,
    _arbiter: Arbiter,
    _server: actix_web::dev::ServerHandle,
}

/// Short timers, so that the tests wait little.
fn fast(config: &mut PanelManagerConfig) {
    config.ready_timeout = Duration::from_secs(10);
    config.probe_interval = Duration::from_millis(50);
    config.restart_backoff = Duration::from_millis(50);
    config.max_restart_backoff = Duration::from_millis(200);
    config.stop_grace = Duration::from_secs(2);
    config.drain = Duration::from_millis(200);
    config.tick = Duration::from_millis(200);
}

/// A node over new brokers of its own, with the users `ada` and `bob`.
pub(crate) async fn node(name: &str, tweak: impl FnOnce(&mut PanelManagerConfig)) -> Node {
    node_on(Brokers::redis(name), name, tweak).await
}

/// A node over `brokers` (which may hold state already).
pub(crate) async fn node_on(brokers: Brokers, name: &str, tweak: impl FnOnce(&mut PanelManagerConfig)) -> Node {
    let driver = Arc::new(ProcDriver::new(tempdir(&format!("{name}-driver"))));
    node_over(brokers, driver, tweak).await
}

/// A node over `brokers` and `driver`.
pub(crate) async fn node_over<D: RuntimeDriver>(
    brokers: Brokers,
    driver: Arc<D>,
    tweak: impl FnOnce(&mut PanelManagerConfig),
) -> Node<D> {
    let url = brokers.redis_url();
    let keys = TestKeys::new(&brokers.dir);
    let platform = keys.platform(&url).await;
    add_user(&platform, "ada", "ada-password", UserRole::User).await;
    add_user(&platform, "bob", "bob-password", UserRole::User).await;
    let kernel = Kernel::new("pm-test");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), &url).unwrap();
    let mut config = PanelManagerConfig::new("node-a", url.clone());
    fast(&mut config);
    tweak(&mut config);
    let handle = pm::start(&kernel, bridge.clone(), driver.clone(), config).await.unwrap();
    let publish = Some(bridge.publisher.clone());
    let tm_state = web::Data::new(tm::state(
        platform.clone(),
        Default::default(),
        publish,
        "pm-test",
        kernel.metrics().registry(),
    ));
    let (h, panels, openapi) = (handle.clone(), platform.panels.clone(), tm::openapi());
    let server = HttpServer::new(move || {
        App::new()
            .configure(tm::configure(tm_state.clone(), openapi.clone()))
            .configure(pm::configure(h.clone(), panels.clone()))
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
    let node =
        Node { brokers, base, kernel, handle, driver, conn, _keys: keys, _arbiter: arbiter, _server: server_handle };
    // The manager subscribes asynchronously; messages before that are lost.
    node.wait_subscribed(channels::ACTIVATE).await;
    node
}

impl<D> Node<D> {
    pub(crate) async fn wait_subscribed(&self, channel: &str) {
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

    /// `user` logged in (`<user>-password`).
    pub(crate) async fn login(&self, user: &str) -> ApiClient {
        ApiClient::login(&self.base, user, &format!("{user}-password")).await
    }

    pub(crate) async fn statuses(&self, panel: &str) -> Vec<InstanceStatus> {
        let raw: HashMap<String, String> = self.conn.clone().hgetall(instances_key(panel)).await.unwrap();
        let mut all: Vec<InstanceStatus> = raw.values().map(|v| serde_json::from_str(v).unwrap()).collect();
        all.sort_by_key(|s| s.since_ms);
        all
    }

    pub(crate) async fn status(&self, panel: &str, instance: &str) -> Option<InstanceStatus> {
        let raw: Option<String> = self.conn.clone().hget(instances_key(panel), instance).await.unwrap();
        raw.map(|r| serde_json::from_str(&r).unwrap())
    }

    pub(crate) async fn route(&self, panel: &str) -> Option<PanelRoute> {
        let raw: Option<String> = self.conn.clone().hget(ROUTES_KEY, panel).await.unwrap();
        raw.map(|r| serde_json::from_str(&r).unwrap())
    }

    pub(crate) async fn publish<T: nexus_actors::Payload>(&self, channel: &str, payload: T) {
        let envelope = Envelope::new("test", payload);
        let _: u64 = self.conn.clone().publish(channel, envelope.encode()).await.unwrap();
    }

    /// Polls `what` until it returns `Some`; panics after `secs`.
    pub(crate) async fn until<T, F, Fut>(&self, secs: u64, what: &str, mut f: F) -> T
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

    pub(crate) async fn state_of(&self, panel: &str, instance: &str, state: InstanceState) -> InstanceStatus {
        self.until(15, &format!("{instance} {state:?}"), || async {
            self.status(panel, instance).await.filter(|s| s.state == state)
        })
        .await
    }

    pub(crate) async fn last_request(&self, panel: &str) -> Option<String> {
        self.conn.clone().get(last_request_key(panel)).await.unwrap()
    }

    /// The panel's App instances that have not ended.
    pub(crate) async fn live_apps(&self, panel: &str) -> Vec<InstanceStatus> {
        let all = self.statuses(panel).await;
        all.into_iter().filter(|s| s.mode == InstanceMode::App && !s.state.is_final()).collect()
    }

    pub(crate) async fn endpoints(&self, panel: &str, n: usize) -> PanelRoute {
        self.until(15, &format!("{n} endpoints for {panel}"), || async {
            self.route(panel).await.filter(|r| r.endpoints.len() == n)
        })
        .await
    }

    /// The value of the first metric line starting with `line_start`.
    pub(crate) fn metric(&self, line_start: &str) -> Option<f64> {
        self.kernel
            .render_metrics()
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Every key and value in the test's Redis, as text.
    pub(crate) async fn everything_in_redis(&self) -> Vec<String> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = conn.keys("*").await.unwrap();
        let mut all = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.unwrap();
            let values: Vec<String> = match kind.as_str() {
                "string" => vec![conn.get(&key).await.unwrap()],
                "hash" => conn
                    .hgetall::<_, HashMap<String, String>>(&key)
                    .await
                    .unwrap()
                    .into_iter()
                    .flat_map(|(k, v)| [k, v])
                    .collect(),
                "set" => conn.smembers(&key).await.unwrap(),
                "list" => conn.lrange(&key, 0, -1).await.unwrap(),
                "zset" => conn.zrange(&key, 0, -1).await.unwrap(),
                other => vec![format!("({other})")],
            };
            all.push(key);
            all.extend(values);
        }
        all
    }
}

/// A new panel of `client`'s (a UUID id) with `source`.
pub(crate) async fn new_panel(client: &ApiClient, source: &str) -> String {
    let (status, panel) = client.post("/api/panels", json!({"name": "p", "mode": "studio", "source": source})).await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{panel}");
    panel["id"].as_str().unwrap().to_owned()
}

/// A request with a raw body (or none), for bodies that are not JSON.
pub(crate) async fn send_raw(
    client: &ApiClient,
    method: reqwest::Method,
    path: &str,
    body: &str,
) -> (reqwest::StatusCode, Value) {
    let mut request = client.http.request(method, format!("{}{path}", client.base));
    if let Some(token) = &client.token {
        request = request.bearer_auth(token);
    }
    let response = request.header("content-type", "application/json").body(body.to_owned()).send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Collects the `data` of every envelope on `channel`, from a raw connection.
pub(crate) async fn listen(url: &str, channel: &str) -> Arc<Mutex<Vec<Value>>> {
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

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
