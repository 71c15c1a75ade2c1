//! The traffic gateway over real sockets: a real redis-server per test,
//! real upstream HTTP and WebSocket servers, real clients. The test plays
//! the panel manager where one is needed: it writes routes into Redis,
//! announces them, and answers activations by starting an upstream. The
//! heartbeat is forwarded to a real `nexus watchdog` that checks its token.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use common::{eventually, tempdir};
use futures::{SinkExt, StreamExt};
use nexus_actors::infra::{free_port, RedisServer};
use nexus_actors::instance::{
    last_request_key, Activate, Endpoint, InstanceMode, PanelRoute, RouteChanged, ACTIVATE_CHANNEL, ROUTES_CHANNEL,
    ROUTES_KEY,
};
use nexus_actors::roles::traffic_gateway::routes::Reload;
use nexus_actors::roles::traffic_gateway::{self as gateway, Gateway, GatewayConfig};
use nexus_actors::roles::transaction_manager::{Auth, Store};
use nexus_actors::watchdog::{self, RedisExpiry, WatchdogConfig, TOKEN_HEADER};
use nexus_actors::{Envelope, Kernel};
use redis::aio::ConnectionManager;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A real HTTP server standing in for a panel instance: it echoes what it
/// received and counts requests and connections.
#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Vec<Value>>>,
    connections: Arc<AtomicUsize>,
    heartbeats: Arc<AtomicUsize>,
}

impl Upstream {
    fn serve(&self) -> (String, actix_web::dev::ServerHandle) {
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

    fn seen(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }
}

async fn echo(req: HttpRequest, body: web::Bytes, state: web::Data<Upstream>) -> HttpResponse {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let record = json!({
        "method": req.method().as_str(),
        "path": req.path(),
        "query": req.query_string(),
        "body": String::from_utf8_lossy(&body),
        "id": header("x-request-id"),
        "x-forwarded-for": header("x-forwarded-for"),
        "x-forwarded-host": header("x-forwarded-host"),
        "x-forwarded-proto": header("x-forwarded-proto"),
        "x-forwarded-prefix": header("x-forwarded-prefix"),
        "x-drop-me": header("x-drop-me"),
        "x-kept": header("x-kept"),
    });
    state.seen.lock().unwrap().push(record.clone());
    HttpResponse::Ok().json(record)
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
async fn ws_echo_server() -> String {
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

struct Env {
    redis: RedisServer,
    conn: ConnectionManager,
    kernel: Kernel,
    gateway: Gateway,
    http: reqwest::Client,
}

impl Env {
    async fn start(name: &str, tweak: impl FnOnce(&mut GatewayConfig)) -> Env {
        let redis = RedisServer::start(&tempdir(&format!("gateway-{name}")), false).unwrap();
        let conn = redis::Client::open(redis.url()).unwrap().get_connection_manager().await.unwrap();
        let (kernel, gateway) = start_gateway(&redis, name, tweak).await;
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Env { redis, conn, kernel, gateway, http }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.local_addr())
    }

    /// Writes `route` as a panel manager does, and waits until this
    /// gateway follows it.
    async fn put_route(&self, route: &PanelRoute) {
        put_route(&self.conn, route).await;
        let (routes, panel, want) = (self.gateway.routes().clone(), route.panel.clone(), route.clone());
        eventually(5, "the gateway follows the route", move || routes.get(&panel).as_deref() == Some(&want)).await;
    }

    fn metric(&self, line_prefix: &str) -> f64 {
        metric(&self.kernel, line_prefix)
    }
}

async fn start_gateway(redis: &RedisServer, node: &str, tweak: impl FnOnce(&mut GatewayConfig)) -> (Kernel, Gateway) {
    let kernel = Kernel::new(node);
    let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), redis.url());
    config.threads = 2;
    tweak(&mut config);
    let gateway = gateway::start(&kernel, config).await.unwrap();
    (kernel, gateway)
}

async fn put_route(conn: &ConnectionManager, route: &PanelRoute) {
    let mut conn = conn.clone();
    let json = serde_json::to_string(route).unwrap();
    let _: () = redis::cmd("HSET").arg(ROUTES_KEY).arg(&route.panel).arg(json).query_async(&mut conn).await.unwrap();
    announce(&conn, &route.panel).await;
}

async fn announce(conn: &ConnectionManager, panel: &str) {
    let mut conn = conn.clone();
    let envelope = Envelope::new("test-panel-manager", RouteChanged { panel: panel.into() });
    let _: u64 = redis::cmd("PUBLISH").arg(ROUTES_CHANNEL).arg(envelope.encode()).query_async(&mut conn).await.unwrap();
}

fn route(panel: &str, mode: InstanceMode, addrs: &[&str], activatable: bool) -> PanelRoute {
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
fn metric(kernel: &Kernel, line_prefix: &str) -> f64 {
    kernel
        .render_metrics()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn dead_addr() -> String {
    format!("127.0.0.1:{}", free_port().unwrap())
}

/// Sends raw bytes on a fresh connection and returns the status code.
async fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await.unwrap();
    let text = String::from_utf8_lossy(&head[..n]).to_string();
    text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {text:?}"))
}

#[actix_rt::test]
async fn unknown_panels_and_paths_get_404_pages_in_html_or_json() {
    let env = Env::start("404", |_| {}).await;
    let r = env.http.get(env.url("/p/nope/x")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
    assert!(body["message"].as_str().unwrap().contains("nope"));

    let r = env.http.get(env.url("/p/nope/x")).header("accept", "text/html").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(r.text().await.unwrap().contains("404 Not Found"));

    assert_eq!(env.http.get(env.url("/elsewhere")).send().await.unwrap().status(), 404);
    assert_eq!(env.http.get(env.url("/p//x")).send().await.unwrap().status(), 404);
    let health: Value = env.http.get(env.url("/healthz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert!(env.metric("nexus_gateway_requests_total{outcome=\"not_found\"}") >= 3.0);
}

#[actix_rt::test]
async fn proxies_with_the_prefix_stripped_query_body_and_forwarding_headers() {
    let env = Env::start("proxy", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    env.put_route(&route("p1", InstanceMode::Studio, &[&addr], false)).await;

    let r = env
        .http
        .post(env.url("/p/p1/some/path?x=1&y=two"))
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "secret")
        .header("x-kept", "yes")
        .body("hello body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/some/path");
    assert_eq!(seen["query"], "x=1&y=two");
    assert_eq!(seen["body"], "hello body");
    assert_eq!(seen["x-forwarded-prefix"], "/p/p1");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], env.gateway.local_addr().to_string());
    assert_eq!(seen["x-drop-me"], Value::Null, "headers named in Connection are hop-by-hop");
    assert_eq!(seen["x-kept"], "yes");

    // The root of a panel without its slash is redirected, query kept.
    let r = env.http.get(env.url("/p/p1?a=b")).send().await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "/p/p1/?a=b");
    let r = env.http.get(env.url("/p/p1/")).send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["path"], "/");

    // The traffic signal for scale to zero.
    let kernel = env.kernel.clone();
    eventually(5, "traffic signal written", move || {
        metric(&kernel, "nexus_gateway_last_request_writes_total{outcome=\"ok\"}") >= 1.0
    })
    .await;
    let mut conn = env.conn.clone();
    let ms: u64 = redis::cmd("GET").arg(last_request_key("p1")).query_async(&mut conn).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis() as u64;
    assert!(ms <= now && now - ms < 60_000, "last-request {ms} is a recent unix ms (now {now})");
    assert_eq!(env.metric("nexus_gateway_requests_total{outcome=\"proxied\"}"), 2.0);
}

#[actix_rt::test]
async fn connections_to_instances_are_kept_alive_and_reused() {
    let env = Env::start("keepalive", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    env.put_route(&route("ka", InstanceMode::Studio, &[&addr], false)).await;
    for i in 0..10 {
        let r = env.http.get(env.url(&format!("/p/ka/n/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(upstream.seen().len(), 10);
    let connections = upstream.connections.load(Ordering::SeqCst);
    assert!(connections < 10, "10 requests used {connections} upstream connections; the pool should reuse them");
}

#[actix_rt::test]
async fn websockets_pass_through_both_ways() {
    let env = Env::start("ws", |_| {}).await;
    let addr = ws_echo_server().await;
    env.put_route(&route("w", InstanceMode::Studio, &[&addr], false)).await;
    let url = format!("ws://{}/p/w/socket", env.gateway.local_addr());
    let (mut ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), 101);
    for text in ["hello", "through", "the gateway"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().as_ref(), &[0u8, 1, 2, 255]);
    ws.close(None).await.unwrap();
}

#[actix_rt::test]
async fn oversized_bodies_and_headers_are_refused_before_the_instance() {
    let env = Env::start("limits", |c| {
        c.max_body_bytes = 1024;
        c.max_header_bytes = 4096;
    })
    .await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    env.put_route(&route("lim", InstanceMode::Studio, &[&addr], false)).await;

    let r = env.http.post(env.url("/p/lim/up")).body(vec![b'x'; 2048]).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "payload_too_large");
    // Chunked, so no Content-Length tells in advance.
    let mut chunked = b"POST /p/lim/up HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n800\r\n".to_vec();
    chunked.extend_from_slice(&[b'y'; 2048]);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    assert_eq!(raw_status(env.gateway.local_addr(), &chunked).await, 413);

    let r = env.http.get(env.url("/p/lim/h")).header("x-big", "a".repeat(5000)).send().await.unwrap();
    assert_eq!(r.status(), 431);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "request_header_fields_too_large");
    // Past the read buffer hyper itself answers 431.
    let huge = format!("GET /p/lim/h HTTP/1.1\r\nhost: gw\r\nx-huge: {}\r\n\r\n", "b".repeat(40_000));
    assert_eq!(raw_status(env.gateway.local_addr(), huge.as_bytes()).await, 431);

    assert!(upstream.seen().is_empty(), "nothing oversized reached the instance: {:?}", upstream.seen());
    let ok = env.http.post(env.url("/p/lim/up")).body(vec![b'x'; 1000]).send().await.unwrap();
    assert_eq!(ok.status(), 200, "a body within the limit passes");
}

#[actix_rt::test]
async fn dead_endpoints_give_502_and_a_live_one_is_tried_next() {
    let env = Env::start("502", |_| {}).await;
    env.put_route(&route("dead", InstanceMode::Studio, &[&dead_addr()], false)).await;
    let r = env.http.get(env.url("/p/dead/")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "bad_gateway");
    let r = env.http.get(env.url("/p/dead/")).header("accept", "text/html").send().await.unwrap();
    assert!(r.text().await.unwrap().contains("502 Bad Gateway"));

    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    env.put_route(&route("half", InstanceMode::App, &[&dead_addr(), &addr], true)).await;
    for i in 0..4 {
        let r = env.http.post(env.url("/p/half/")).body(format!("b{i}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "a refused connection moves on to the next endpoint");
    }
    let bodies: Vec<String> = upstream.seen().iter().map(|s| s["body"].as_str().unwrap().to_owned()).collect();
    assert_eq!(bodies, ["b0", "b1", "b2", "b3"], "each request reached the live instance exactly once");
}

#[actix_rt::test]
async fn a_slow_instance_gives_504() {
    let env = Env::start("504", |c| c.upstream_timeout = Duration::from_millis(300)).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    env.put_route(&route("slow", InstanceMode::Studio, &[&addr], false)).await;
    let r = env.http.get(env.url("/p/slow/slow")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "gateway_timeout");
    assert_eq!(env.metric("nexus_gateway_requests_total{outcome=\"timeout\"}"), 1.0);
}

#[actix_rt::test]
async fn a_studio_panel_without_an_instance_gives_503_with_retry_after() {
    let env = Env::start("studio503", |_| {}).await;
    env.put_route(&route("st", InstanceMode::Studio, &[], false)).await;
    let r = env.http.get(env.url("/p/st/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    let body: Value = r.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("start it in Studio"));
    // An App that is not activatable does not start either.
    env.put_route(&route("app", InstanceMode::App, &[], false)).await;
    let r = env.http.get(env.url("/p/app/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(env.metric("nexus_gateway_activations_total{outcome=\"ready\"}"), 0.0);
}

#[actix_rt::test]
async fn route_changes_in_redis_reach_every_gateway() {
    let env = Env::start("replicated-a", |_| {}).await;
    let (_kernel_b, gateway_b) = start_gateway(&env.redis, "replicated-b", |_| {}).await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let url_b = format!("http://{}/p/shared/", gateway_b.local_addr());
    assert_eq!(env.http.get(&url_b).send().await.unwrap().status(), 404);

    put_route(&env.conn, &route("shared", InstanceMode::Studio, &[&addr], false)).await;
    for gateway in [&env.gateway, &gateway_b] {
        let routes = gateway.routes().clone();
        eventually(5, "route announced", move || routes.get("shared").is_some()).await;
        let r = env.http.get(format!("http://{}/p/shared/", gateway.local_addr())).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    // Removed and announced: both answer 404 again.
    let mut conn = env.conn.clone();
    let _: () = redis::cmd("HDEL").arg(ROUTES_KEY).arg("shared").query_async(&mut conn).await.unwrap();
    announce(&env.conn, "shared").await;
    for gateway in [&env.gateway, &gateway_b] {
        let routes = gateway.routes().clone();
        eventually(5, "route removal announced", move || routes.get("shared").is_none()).await;
        let r = env.http.get(format!("http://{}/p/shared/", gateway.local_addr())).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }

    // Written without an announcement (a lost pub/sub message): a reload
    // repairs it.
    let json = serde_json::to_string(&route("quiet", InstanceMode::Studio, &[&addr], false)).unwrap();
    let _: () = redis::cmd("HSET").arg(ROUTES_KEY).arg("quiet").arg(json).query_async(&mut conn).await.unwrap();
    assert!(gateway_b.routes().get("quiet").is_none());
    gateway_b.route_table().link::<Reload>("test").ask(Reload).await.unwrap();
    assert!(gateway_b.routes().get("quiet").is_some());

    // A corrupt field is skipped, the rest stays.
    let _: () = redis::cmd("HSET").arg(ROUTES_KEY).arg("bad").arg("{not json").query_async(&mut conn).await.unwrap();
    gateway_b.route_table().link::<Reload>("test").ask(Reload).await.unwrap();
    assert!(gateway_b.routes().get("bad").is_none());
    assert!(gateway_b.routes().get("quiet").is_some());
    gateway_b.stop().await;
}

/// Listens on the activate channel like a panel manager; returns the
/// panels it was asked to start, as they arrive.
async fn activations(redis: &RedisServer) -> Arc<Mutex<Vec<String>>> {
    let mut pubsub = redis::Client::open(redis.url()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(ACTIVATE_CHANNEL).await.unwrap();
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

#[actix_rt::test]
async fn concurrent_requests_during_a_cold_start_are_each_answered_once() {
    let env = Env::start("activator", |_| {}).await;
    let asked = activations(&env.redis).await;
    env.put_route(&route("cold", InstanceMode::App, &[], true)).await;

    let mut requests = Vec::new();
    for i in 0..20 {
        let (http, url) = (env.http.clone(), env.url(&format!("/p/cold/req?i={i}")));
        requests.push(actix::spawn(async move {
            let r = http.post(url).header("x-request-id", format!("r{i}")).body(format!("body {i}")).send().await;
            let r = r.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    let kernel = env.kernel.clone();
    eventually(10, "20 requests held", move || metric(&kernel, "nexus_gateway_queued_requests") == 20.0).await;
    let a = asked.clone();
    eventually(10, "an activation was announced", move || a.lock().unwrap().iter().any(|p| p == "cold")).await;

    // The panel manager's part: start an instance and publish its route.
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    put_route(&env.conn, &route("cold", InstanceMode::App, &[&addr], true)).await;

    let mut ids = HashSet::new();
    for request in requests {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["body"].as_str().unwrap(), format!("body {}", &body["id"].as_str().unwrap()[1..]));
        ids.insert(body["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 20, "every client got its own answer");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 20, "the instance got exactly 20 requests");
    let upstream_ids: HashSet<String> = seen.iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(upstream_ids.len(), 20, "no request was sent twice");

    assert_eq!(env.metric("nexus_gateway_cold_start_seconds_count"), 1.0);
    assert_eq!(env.metric("nexus_gateway_activations_total{outcome=\"ready\"}"), 1.0);
    assert_eq!(env.metric("nexus_gateway_queued_requests"), 0.0);
    let mut conn = env.conn.clone();
    let key = last_request_key("cold");
    let kernel = env.kernel.clone();
    eventually(5, "traffic signal written", move || {
        metric(&kernel, "nexus_gateway_last_request_writes_total{outcome=\"ok\"}") >= 1.0
    })
    .await;
    let ms: Option<u64> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
    assert!(ms.is_some(), "last-request written for the activated App");
}

#[actix_rt::test]
async fn a_full_queue_refuses_at_once_and_held_requests_get_503_at_the_deadline() {
    let env = Env::start("activator-full", |c| {
        c.queue_per_panel = 2;
        c.activation_deadline = Duration::from_secs(2);
    })
    .await;
    let asked = activations(&env.redis).await;
    env.put_route(&route("never", InstanceMode::App, &[], true)).await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (http, url) = (env.http.clone(), env.url("/p/never/"));
            actix::spawn(async move {
                let r = http.get(url).send().await.unwrap();
                (r.status().as_u16(), r.headers().get("retry-after").cloned(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let kernel = env.kernel.clone();
    eventually(10, "2 requests held", move || metric(&kernel, "nexus_gateway_queued_requests") == 2.0).await;

    let r = env.http.get(env.url("/p/never/")).send().await.unwrap();
    assert_eq!(r.status(), 503, "the third request finds the queue full");
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.json::<Value>().await.unwrap()["message"].as_str().unwrap().contains("too many"));

    for request in held {
        let (status, retry_after, body) = request.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(retry_after.is_some(), "a held request that times out says when to retry");
        assert!(body["message"].as_str().unwrap().contains("did not start in time"));
    }
    assert!(asked.lock().unwrap().iter().any(|p| p == "never"));
    let kernel = env.kernel.clone();
    eventually(10, "the activation was abandoned", move || {
        metric(&kernel, "nexus_gateway_activations_total{outcome=\"abandoned\"}") == 1.0
    })
    .await;
    assert_eq!(env.metric("nexus_gateway_cold_start_seconds_count"), 0.0);
    assert_eq!(env.metric("nexus_gateway_requests_total{outcome=\"queue_full\"}"), 1.0);
    assert_eq!(env.metric("nexus_gateway_requests_total{outcome=\"activation_timeout\"}"), 2.0);
}

#[actix_rt::test]
async fn heartbeats_are_checked_against_the_owner_and_forwarded_to_the_watchdog() {
    let env = Env::start("heartbeat", |_| {}).await;
    let store = Store::connect(&env.redis.url()).await.unwrap();
    let auth = Auth::new(&store.signing_secret().await.unwrap());
    let (ada, _) = auth.issue("ada");
    let (bob, _) = auth.issue("bob");
    let watchdog = Upstream::default();
    let (watchdog_addr, _server) = watchdog.serve();
    let mut studio = route("studio", InstanceMode::Studio, &[&watchdog_addr], false);
    studio.endpoints[0].watchdog = Some(watchdog_addr.clone());
    env.put_route(&studio).await;
    env.put_route(&route("nowatch", InstanceMode::App, &[&watchdog_addr], false)).await;

    let beat = |panel: &str, token: Option<&str>| {
        let mut req = env.http.post(env.url(&format!("/heartbeat/{panel}")));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req.send()
    };
    let r = beat("studio", None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(beat("studio", Some("not-a-token")).await.unwrap().status(), 401);
    let forged = Auth::new(b"another secret").issue("ada").0;
    assert_eq!(beat("studio", Some(&forged)).await.unwrap().status(), 401);
    assert_eq!(beat("studio", Some(&bob)).await.unwrap().status(), 403);
    assert_eq!(beat("ghost", Some(&ada)).await.unwrap().status(), 404);
    assert_eq!(beat("nowatch", Some(&ada)).await.unwrap().status(), 404);
    assert_eq!(watchdog.heartbeats.load(Ordering::SeqCst), 0);

    let r = beat("studio", Some(&ada)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(r.json::<Value>().await.unwrap()["alive"], true);
    assert_eq!(watchdog.heartbeats.load(Ordering::SeqCst), 1);

    let preflight = env
        .http
        .request(reqwest::Method::OPTIONS, env.url("/heartbeat/studio"))
        .header("origin", "http://127.0.0.1:7070")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    assert!(preflight.headers()["access-control-allow-headers"].to_str().unwrap().contains("authorization"));
    assert_eq!(env.http.get(env.url("/heartbeat/studio")).send().await.unwrap().status(), 405);
    // CORS is for the heartbeat only.
    let r = env.http.get(env.url("/p/studio/")).send().await.unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[actix_rt::test]
async fn heartbeats_carry_the_instances_watchdog_token_to_a_real_watchdog() {
    let env = Env::start("heartbeat-token", |_| {}).await;
    let store = Store::connect(&env.redis.url()).await.unwrap();
    let (ada, _) = Auth::new(&store.signing_secret().await.unwrap()).issue("ada");
    let config = WatchdogConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: Some("the-instance-secret".into()),
        ..WatchdogConfig::new("studio-0", "studio", env.redis.url())
    };
    let expiry = RedisExpiry::connect(&env.redis.url()).await.unwrap();
    let watchdog = watchdog::start(config, Arc::new(expiry)).await.unwrap();
    let (watchdog_addr, _handle) = (watchdog.local_addr().to_string(), watchdog.handle());
    actix::spawn(watchdog.run());
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    let beat = |panel: &'static str| env.http.post(env.url(&format!("/heartbeat/{panel}"))).bearer_auth(&ada).send();

    // The panel's own code reaching the watchdog directly has no token.
    let direct = env.http.post(format!("http://{watchdog_addr}/heartbeat")).send().await.unwrap();
    assert_eq!(direct.status(), 401);

    // Through the gateway, the route's token goes along.
    let mut studio = route("studio", InstanceMode::Studio, &[&addr], false);
    studio.endpoints[0].watchdog = Some(watchdog_addr.clone());
    studio.endpoints[0].watchdog_token = Some("the-instance-secret".into());
    env.put_route(&studio).await;
    let r = beat("studio").await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!((body["instance"].as_str(), body["expired"].as_bool()), (Some("studio-0"), Some(false)));

    // A route with another token, or none, is refused by the watchdog.
    studio.endpoints[0].watchdog_token = Some("a-stale-secret".into());
    env.put_route(&studio).await;
    assert_eq!(beat("studio").await.unwrap().status(), 401);
    studio.endpoints[0].watchdog_token = None;
    env.put_route(&studio).await;
    assert_eq!(beat("studio").await.unwrap().status(), 401);

    let metrics = env.http.get(format!("http://{watchdog_addr}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("nexus_watchdog_heartbeats_total 1"), "{metrics}");
    assert!(metrics.contains("nexus_watchdog_refused_heartbeats_total 3"), "{metrics}");
    // The secret is for the watchdog only, never for the panel.
    assert!(upstream.seen().is_empty());
    let r = env.http.get(env.url("/p/studio/x")).header(TOKEN_HEADER, "x").send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Plays the panel manager for `panel`: once the gateway asks for it to be
/// activated, writes `endpoints` as its route (an instance started).
async fn on_activation(env: &Env, asked: Arc<Mutex<Vec<String>>>, panel: &'static str, endpoints: &[&str]) {
    let a = asked.clone();
    eventually(10, "an activation was announced", move || a.lock().unwrap().iter().any(|p| p == panel)).await;
    put_route(&env.conn, &route(panel, InstanceMode::App, endpoints, true)).await;
}

#[actix_rt::test]
async fn a_request_refused_by_an_app_scaled_to_zero_under_a_stale_route_is_held_and_sent_once() {
    let env = Env::start("stale-route", |_| {}).await;
    let asked = activations(&env.redis).await;
    // The gateway still routes to an instance the panel manager has stopped.
    env.put_route(&route("app", InstanceMode::App, &[&dead_addr()], true)).await;

    let (http, url) = (env.http.clone(), env.url("/p/app/orders?n=1"));
    let request = actix::spawn(async move {
        let r = http.post(url).header("x-request-id", "only").body("the order").send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    let kernel = env.kernel.clone();
    eventually(10, "the refused request is held", move || metric(&kernel, "nexus_gateway_queued_requests") == 1.0)
        .await;
    let upstream = Upstream::default();
    let (addr, _server) = upstream.serve();
    on_activation(&env, asked.clone(), "app", &[&addr]).await;

    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["path"].as_str(), body["query"].as_str()), (Some("/orders"), Some("n=1")));
    assert_eq!(body["body"], "the order", "the body was kept while the request was held");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "sent exactly once: {seen:?}");
    assert_eq!(seen[0]["id"], "only");
    assert_eq!(env.metric("nexus_gateway_reactivations_total"), 1.0);
    assert_eq!(env.metric("nexus_gateway_requests_total{outcome=\"proxied\"}"), 1.0);
    assert_eq!(env.metric("nexus_gateway_requests_total{outcome=\"bad_gateway\"}"), 0.0);
    let kernel = env.kernel.clone();
    eventually(10, "the activation ended ready", move || {
        metric(&kernel, "nexus_gateway_activations_total{outcome=\"ready\"}") == 1.0
    })
    .await;
    assert_eq!(env.metric("nexus_gateway_queued_requests"), 0.0);
}

#[actix_rt::test]
async fn refused_connections_give_502_when_nothing_can_start_or_the_new_instance_refuses_too() {
    let env = Env::start("stale-route-502", |_| {}).await;
    let asked = activations(&env.redis).await;
    // Not activatable (a Studio instance, an App without a snapshot): 502 at once.
    env.put_route(&route("studio", InstanceMode::Studio, &[&dead_addr()], true)).await;
    env.put_route(&route("fixed", InstanceMode::App, &[&dead_addr()], false)).await;
    for panel in ["studio", "fixed"] {
        let r = env.http.get(env.url(&format!("/p/{panel}/"))).send().await.unwrap();
        assert_eq!(r.status(), 502, "{panel}");
    }
    assert_eq!(env.metric("nexus_gateway_reactivations_total"), 0.0);
    assert!(asked.lock().unwrap().is_empty(), "nothing to activate: {:?}", asked.lock().unwrap());

    // Held once; the new instance refuses as well: 502, not another round.
    env.put_route(&route("flaky", InstanceMode::App, &[&dead_addr()], true)).await;
    let (http, url) = (env.http.clone(), env.url("/p/flaky/"));
    let request = actix::spawn(async move { http.get(url).send().await.unwrap().status().as_u16() });
    on_activation(&env, asked.clone(), "flaky", &[&dead_addr()]).await;
    assert_eq!(request.await.unwrap(), 502);
    assert_eq!(env.metric("nexus_gateway_reactivations_total"), 1.0);
    assert_eq!(env.metric("nexus_gateway_requests_total{outcome=\"bad_gateway\"}"), 3.0);
}
