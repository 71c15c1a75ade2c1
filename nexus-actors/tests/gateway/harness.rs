//! The gateway tests' world: a redis-server of the test's own, a key file,
//! users `ada` (who owns the panels), `bob` and a revoked `carol` made with
//! `nexus_testkit::add_user`, panel records, routes written as a panel
//! manager writes them, and real upstream servers that record what reaches
//! them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures::{SinkExt, StreamExt};
use nexus_actors::infra::free_port;
use nexus_actors::instance::{Activate, Endpoint, InstanceMode, PanelRoute, RouteChanged, ROUTES_KEY};
use nexus_actors::platform::auth::Audience;
use nexus_actors::platform::{channels, Panel, PanelMode, Platform, UserRole};
use nexus_actors::roles::traffic_gateway::{self as gateway, Gateway, GatewayConfig};
use nexus_actors::{Envelope, Kernel};
use nexus_testkit::{add_user, eventually, Brokers, TestKeys};
use redis::aio::ConnectionManager;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Headers the upstream records, to see what reaches a panel.
const RECORDED: [&str; 12] = [
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-prefix",
    "x-drop-me",
    "x-kept",
    "cookie",
    "authorization",
    "x-nexus-sidecar-token",
    "x-nexus-watchdog-token",
    "content-security-policy",
];

/// A real HTTP server standing in for a panel instance: it echoes what it
/// received, records it, and counts requests and connections.
#[derive(Clone, Default)]
pub(crate) struct Upstream {
    pub seen: Arc<Mutex<Vec<Value>>>,
    pub connections: Arc<AtomicUsize>,
    pub heartbeats: Arc<AtomicUsize>,
}

impl Upstream {
    pub(crate) fn serve(&self) -> (String, actix_web::dev::ServerHandle) {
        let state = self.clone();
        let connections = self.connections.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(state.clone()))
                .route("/slow", web::get().to(slow))
                .route("/heartbeat", web::post().to(heartbeat))
                .default_service(web::to(echo))
        })
        .on_connect(move |_, _| {
            connections.fetch_add(1, Ordering::SeqCst);
        })
        .workers(1)
        .bind(("127.0.0.1", 0))
        .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        actix::spawn(server);
        (addr.to_string(), handle)
    }

    pub(crate) fn seen(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
}

/// Echoes the request as JSON. `/set-cookie` also sets cookies, among them
/// one that tries to plant the gateway's own.
async fn echo(req: HttpRequest, body: web::Bytes, state: web::Data<Upstream>) -> HttpResponse {
    let mut record = json!({
        "method": req.method().as_str(),
        "path": req.path(),
        "query": req.query_string(),
        "body": String::from_utf8_lossy(&body),
    });
    for name in RECORDED {
        let values: Vec<&str> = req.headers().get_all(name).filter_map(|v| v.to_str().ok()).collect();
        record[name] = if values.is_empty() { Value::Null } else { json!(values.join(" | ")) };
    }
    record["id"] = record["x-request-id"].clone();
    state.seen.lock().unwrap().push(record.clone());
    let mut response = HttpResponse::Ok();
    if req.path() == "/set-cookie" {
        response.append_header(("set-cookie", "own=1; Path=/; HttpOnly"));
        response.append_header(("set-cookie", "nexus_panel=planted; Path=/"));
    }
    response.json(record)
}

async fn slow() -> HttpResponse {
    actix::clock::sleep(Duration::from_secs(5)).await;
    HttpResponse::Ok().body("finally")
}

async fn heartbeat(state: web::Data<Upstream>) -> HttpResponse {
    state.heartbeats.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Ok().json(json!({ "alive": true }))
}

/// A WebSocket server that echoes every text and binary message.
pub(crate) async fn ws_echo_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    actix::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            actix::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        let _ = ws.send(msg).await;
                    }
                }
            });
        }
    });
    addr
}

/// One test's gateway and everything around it.
pub(crate) struct Env {
    pub brokers: Brokers,
    pub keys: TestKeys,
    pub platform: Platform,
    pub conn: ConnectionManager,
    pub kernel: Kernel,
    pub gateway: Gateway,
    /// A client with no credentials.
    pub http: reqwest::Client,
    /// A client that sends `ada`'s API token.
    pub owner: reqwest::Client,
    /// `ada`'s API token.
    pub ada: String,
}

impl Env {
    pub(crate) async fn start(name: &str, tweak: impl FnOnce(&mut GatewayConfig)) -> Env {
        let brokers = Brokers::redis(&format!("gateway-{name}"));
        let keys = TestKeys::new(&brokers.dir);
        let platform = keys.platform(&brokers.redis_url()).await;
        for user in ["ada", "bob", "carol"] {
            add_user(&platform, user, &format!("{user}-password"), UserRole::User).await;
        }
        let conn = redis::Client::open(brokers.redis_url()).unwrap().get_connection_manager().await.unwrap();
        let (kernel, gateway) = start_gateway(&brokers, &keys, name, tweak).await;
        let ada = platform.auth.issue("ada", &Audience::Api).await.unwrap().0;
        let http = client(None);
        let owner = client(Some(&ada));
        Env { brokers, keys, platform, conn, kernel, gateway, http, owner, ada }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.local_addr())
    }

    /// A new panel record owned by `ada`; its id.
    pub(crate) async fn panel(&self, mode: PanelMode, public: bool) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        let panel = Panel {
            id: id.clone(),
            name: format!("panel {id}"),
            owner: "ada".into(),
            mode,
            source: "template:python_minimal".into(),
            public,
        };
        self.platform.panels.put(&panel).await.unwrap();
        id
    }

    /// A token of `user` for `audience`.
    pub(crate) async fn token(&self, user: &str, audience: Audience) -> String {
        self.platform.auth.issue(user, &audience).await.unwrap().0
    }

    /// `ada`'s `nexus_panel` cookie for `panel`, as a `Cookie` header value.
    pub(crate) async fn cookie(&self, panel: &str) -> String {
        format!("nexus_panel={}", self.token("ada", Audience::Panel(panel.into())).await)
    }

    /// Writes `route` as a panel manager does, and waits until this
    /// gateway follows it.
    pub(crate) async fn put_route(&self, route: &PanelRoute) {
        put_route(&self.conn, route).await;
        let (routes, panel, want) = (self.gateway.routes().clone(), route.panel.clone(), route.clone());
        eventually(5, "the gateway follows the route", move || routes.get(&panel).as_deref() == Some(&want)).await;
    }

    pub(crate) fn metric(&self, line_prefix: &str) -> f64 {
        metric(&self.kernel, line_prefix)
    }
}

/// A client without redirects or proxies, sending `token` if given.
pub(crate) fn client(token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .default_headers(headers)
        .build()
        .unwrap()
}

pub(crate) async fn start_gateway(
    brokers: &Brokers,
    keys: &TestKeys,
    node: &str,
    tweak: impl FnOnce(&mut GatewayConfig),
) -> (Kernel, Gateway) {
    let kernel = Kernel::new(node);
    let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), brokers.redis_url(), keys.ring.clone());
    config.threads = 2;
    tweak(&mut config);
    let gateway = gateway::start(&kernel, config).await.unwrap();
    (kernel, gateway)
}

pub(crate) async fn put_route(conn: &ConnectionManager, route: &PanelRoute) {
    let mut conn = conn.clone();
    let json = serde_json::to_string(route).unwrap();
    let _: () = redis::cmd("HSET").arg(ROUTES_KEY).arg(&route.panel).arg(json).query_async(&mut conn).await.unwrap();
    announce(&conn, &route.panel).await;
}

pub(crate) async fn announce(conn: &ConnectionManager, panel: &str) {
    let mut conn = conn.clone();
    let envelope = Envelope::new("test-panel-manager", RouteChanged { panel: panel.into() });
    let _: u64 = redis::cmd("PUBLISH")
        .arg(channels::ROUTES_CHANGED)
        .arg(envelope.encode())
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// `panel`'s route, owned by `ada`, with an instance at each of `addrs`.
pub(crate) fn route(panel: &str, mode: InstanceMode, addrs: &[&str], activatable: bool) -> PanelRoute {
    let endpoints = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| Endpoint {
            instance: format!("{panel}-{i}"),
            addr: (*addr).into(),
            watchdog: None,
            watchdog_token: None,
        })
        .collect();
    PanelRoute { panel: panel.into(), owner: "ada".into(), mode, endpoints, activatable }
}

/// The value of the first metric line starting with `line_prefix`.
pub(crate) fn metric(kernel: &Kernel, line_prefix: &str) -> f64 {
    kernel
        .render_metrics()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub(crate) fn outcome(outcome: &str) -> String {
    format!("nexus_gateway_requests_total{{outcome=\"{outcome}\"}}")
}

pub(crate) fn dead_addr() -> String {
    format!("127.0.0.1:{}", free_port().unwrap())
}

/// Sends raw bytes on a fresh connection; the status code and the whole
/// answer. Exactly these bytes go out: no client normalises the path.
pub(crate) async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = stream.read(&mut buf).await.unwrap_or(0);
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        // One answer is enough: a head, and a body of its declared length.
        if n == 0 || complete(&text) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text)
}

fn complete(text: &str) -> bool {
    let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
        .and_then(|v| v.parse::<usize>().ok());
    length.is_some_and(|n| body.len() >= n)
}

/// Listens on the activate channel like a panel manager; returns the
/// panels it was asked to start, as they arrive.
pub(crate) async fn activations(brokers: &Brokers) -> Arc<Mutex<Vec<String>>> {
    let mut pubsub = redis::Client::open(brokers.redis_url()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(channels::ACTIVATE).await.unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let record = asked.clone();
    actix::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            let envelope = Envelope::decode(msg.get_payload_bytes()).unwrap();
            record.lock().unwrap().push(envelope.typed::<Activate>().unwrap().data.panel);
        }
    });
    asked
}
