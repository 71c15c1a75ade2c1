//! The sidecar beside a panel in its own network namespace, with a real
//! redis-server: its endpoints exist only inside, its forwards carry host
//! connections in byte for byte (keep-alive included), the panel's tools are
//! registered through the forward, and a forward to a port nothing listens
//! on just closes the client's connection. Without a namespace the forwards
//! reach the host's loopback, and bad forwards are refused at start. The
//! sidecar sends the instance's secret with every request to its panel.

mod raw_http;

use std::any::Any;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Extensions;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures::StreamExt;
use nexus_actors::infra::free_port;
use nexus_actors::instance::SIDECAR_TOKEN_HEADER;
use nexus_actors::netns::{self, Netns, NetnsThread};
use nexus_actors::platform::{channels, Panel, PanelMode, PanelRecords};
use nexus_actors::sidecar::{self, Forward, ForwardError, Sidecar, SidecarConfig, SidecarError};
use nexus_actors::tools::protocol::{Outcome, ToolRequest, ToolResponse};
use nexus_actors::tools::store::ToolStore;
use nexus_actors::tools::ToolCall;
use nexus_actors::Envelope;
use nexus_testkit::{prerequisite, Brokers};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A redis-server with one panel record owned by `alice`.
struct Harness {
    brokers: Brokers,
    panel: String,
}

impl Harness {
    async fn new(name: &str) -> Harness {
        let brokers = Brokers::redis(name);
        let panel = uuid::Uuid::now_v7().to_string();
        let record = Panel {
            id: panel.clone(),
            name: "p".into(),
            owner: "alice".into(),
            mode: PanelMode::Studio,
            source: "template:python_minimal".into(),
            public: false,
        };
        PanelRecords::connect(&brokers.redis_url()).await.unwrap().put(&record).await.unwrap();
        Harness { brokers, panel }
    }

    fn config(&self) -> SidecarConfig {
        SidecarConfig {
            listen: format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap(),
            poll_interval: Duration::from_millis(200),
            ..SidecarConfig::new(&self.panel, self.brokers.redis_url())
        }
    }
}

fn forward(port: u16) -> Forward {
    Forward { host: "127.0.0.1:0".parse().unwrap(), port }
}

/// Which accepted connection a request came on.
#[derive(Clone, Copy)]
struct ConnId(usize);

/// The panel: a manifest with one tool, and `/conn` naming the connection.
fn serve_panel(listener: std::net::TcpListener) -> actix_web::dev::ServerHandle {
    let accepted = Arc::new(AtomicUsize::new(0));
    let server = HttpServer::new(|| {
        App::new()
            .route(
                "/manifest",
                web::get().to(|| async {
                    HttpResponse::Ok().json(json!({"name": "inner", "tools": [{"name": "echo", "desc": "Echoes"}]}))
                }),
            )
            .route(
                "/conn",
                web::post().to(|req: HttpRequest, body: String| async move {
                    let conn = req.conn_data::<ConnId>().map(|c| c.0);
                    HttpResponse::Ok().json(json!({"conn": conn, "body": body}))
                }),
            )
    })
    .on_connect(move |_: &dyn Any, ext: &mut Extensions| {
        ext.insert(ConnId(accepted.fetch_add(1, Ordering::SeqCst)));
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    let handle = server.handle();
    actix::spawn(server);
    handle
}

/// Echoes every byte back until the client half-closes.
fn serve_echo(listener: std::net::TcpListener) {
    listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
}

/// Sends every byte value (not HTTP at all), half-closes and reads the echo.
async fn round_trip(addr: SocketAddr) -> Vec<u8> {
    let sent: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.split();
    let writing = async {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut echoed = Vec::new();
    let reading = read.read_to_end(&mut echoed);
    let (_, read) = tokio::join!(writing, reading);
    read.unwrap();
    assert_eq!(echoed.len(), sent.len());
    assert!(echoed == sent, "the forward changed the bytes");
    echoed
}

/// What a client of a forward to a closed port sees: its connection closed.
async fn closed_at_once(addr: SocketAddr) -> bool {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
    matches!(read, Ok(Ok(0)) | Ok(Err(_)))
}

async fn start(config: SidecarConfig) -> (Vec<SocketAddr>, actix_web::dev::ServerHandle) {
    let sidecar: Sidecar = sidecar::start(config).await.unwrap();
    let (addrs, handle) = (sidecar.forward_addrs().to_vec(), sidecar.handle());
    actix::spawn(sidecar.run());
    (addrs, handle)
}

/// Deletes the namespace when the test ends, passed or not.
struct NetnsGuard(Netns);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = self.0.delete();
    }
}

#[actix_rt::test]
async fn in_a_namespace_endpoints_are_inside_and_forwards_carry_connections_in() {
    if !prerequisite(netns::supported(), "the sidecar-in-a-namespace test needs root and iproute2") {
        return;
    }
    let guard = NetnsGuard(Netns::create(&format!("nexus-sc-{}", std::process::id())).unwrap());
    let inside = NetnsThread::enter(&guard.0.path()).unwrap();
    let _panel = serve_panel(inside.bind("127.0.0.1:8080".parse().unwrap()).unwrap());
    serve_echo(inside.bind("127.0.0.1:7000".parse().unwrap()).unwrap());
    let h = Harness::new("sidecar-netns").await;

    // The forward to 8080 is also how the sidecar itself reaches the panel.
    let panel_host: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap();
    let mut config = h.config();
    config.netns = Some(guard.0.path());
    config.panel_url = format!("http://{panel_host}");
    config.forwards = vec![Forward { host: panel_host, port: 8080 }, forward(7000), forward(8081)];
    let listen = config.listen;
    let (addrs, _sidecar) = start(config).await;
    assert_eq!(addrs[0], panel_host);
    let (echo, closed) = (addrs[1], addrs[2]);

    // Two requests on one host connection reach the panel on one connection.
    let mut stream = TcpStream::connect(panel_host).await.unwrap();
    let first = raw_http::request(&mut stream, "POST", "/conn", "one").await.unwrap();
    let second = raw_http::request(&mut stream, "POST", "/conn", "two").await.unwrap();
    let (first, second): (Value, Value) =
        (serde_json::from_str(&first.body).unwrap(), serde_json::from_str(&second.body).unwrap());
    assert_eq!((first["body"].as_str(), second["body"].as_str()), (Some("one"), Some("two")));
    assert!(first["conn"].is_u64() && first["conn"] == second["conn"], "keep-alive was broken: {first} {second}");

    // Any bytes, both ways, untouched (what a WebSocket sends after its upgrade).
    round_trip(echo).await;
    // Nothing listens on 8081 inside: the client's connection just closes.
    assert!(closed_at_once(closed).await, "a forward to a closed port kept the connection open");

    // /proxy and the other endpoints: not on the host, but on the panel's loopback.
    let from_host = reqwest::get(format!("http://{listen}/healthz")).await;
    assert!(from_host.is_err(), "the sidecar's endpoints answered on the host: {from_host:?}");
    let health = wait_until_up(&inside, listen).await;
    assert_eq!(health["panel"]["tools"], json!(["echo"]), "{health}");
    let mut stream = raw_http::connect_inside(&inside, listen).unwrap();
    let published =
        raw_http::request(&mut stream, "POST", "/proxy", r#"{"channel": "notes", "data": 1}"#).await.unwrap();
    assert_eq!(published.status, 202, "{}", published.body);

    // The tools were registered through the forward.
    let tools = ToolStore::connect(&h.brokers.redis_url()).await.unwrap().list_for("alice").await.unwrap();
    assert!(tools.iter().any(|t| t.name.ends_with("echo")), "{:?}", tools.iter().map(|t| &t.name).collect::<Vec<_>>());

    let metrics = raw_http::request(&mut stream, "GET", "/metrics", "").await.unwrap().body;
    assert!(metrics.contains(r#"nexus_sidecar_forward_connections_total{port="7000"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"nexus_sidecar_forward_failures_total{port="8081",stage="connect"} 1"#), "{metrics}");
}

/// `/healthz` from inside the namespace, once the panel's tools are listed.
async fn wait_until_up(inside: &NetnsThread, listen: SocketAddr) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        let mut stream = raw_http::connect_inside(inside, listen).unwrap();
        let answer = raw_http::request(&mut stream, "GET", "/healthz", "").await.unwrap();
        last = serde_json::from_str(&answer.body).unwrap();
        if last["panel"]["state"] == "up" {
            return last;
        }
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
    panic!("the panel never came up through the forward: {last}");
}

#[actix_rt::test]
async fn without_a_namespace_forwards_reach_the_host() {
    let h = Harness::new("sidecar-forward-host").await;
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    serve_echo(echo);
    let closed_port = free_port().unwrap();
    let mut config = h.config();
    config.forwards = vec![forward(echo_port), forward(closed_port)];
    let listen = config.listen;
    let (addrs, _sidecar) = start(config).await;

    round_trip(addrs[0]).await;
    round_trip(addrs[0]).await;
    assert!(closed_at_once(addrs[1]).await, "a forward to a closed port kept the connection open");
    let metrics = reqwest::get(format!("http://{listen}/metrics")).await.unwrap().text().await.unwrap();
    let connections = format!(r#"nexus_sidecar_forward_connections_total{{port="{echo_port}"}} 2"#);
    assert!(metrics.contains(&connections), "{metrics}");
    let failures = format!(r#"nexus_sidecar_forward_failures_total{{port="{closed_port}",stage="connect"}} 1"#);
    assert!(metrics.contains(&failures), "{metrics}");
}

#[actix_rt::test]
async fn bad_forwards_and_namespaces_are_refused_at_start() {
    let h = Harness::new("sidecar-forward-bad").await;
    let refused = |config: SidecarConfig| async move {
        match sidecar::start(config).await {
            Ok(_) => panic!("a bad configuration started"),
            Err(error) => error,
        }
    };

    let mut outside = h.config();
    outside.forwards = vec![Forward { host: "0.0.0.0:0".parse().unwrap(), port: 8080 }];
    assert!(matches!(refused(outside).await, SidecarError::Forward(ForwardError::NotLoopback(_))));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut busy = h.config();
    busy.forwards = vec![Forward { host: taken.local_addr().unwrap(), port: 8080 }];
    assert!(matches!(refused(busy).await, SidecarError::Forward(ForwardError::Bind { port: 8080, .. })));

    let mut nowhere = h.config();
    nowhere.netns = Some("/run/netns/nexus-no-such-namespace".into());
    assert!(matches!(refused(nowhere).await, SidecarError::Netns(_)));

    let mut public = h.config();
    public.netns = Some("/run/netns/nexus-no-such-namespace".into());
    public.listen = "0.0.0.0:3500".parse().unwrap();
    assert!(matches!(refused(public).await, SidecarError::NotLoopback(_)), "the loopback check comes first");
}

/// What a guarded panel saw: each request's path and secret header.
type Seen = Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

/// A panel that answers `/manifest` and `/mcp/execute` only with `secret`
/// in the sidecar header (401 otherwise), recording every request.
fn serve_guarded_panel(
    listener: std::net::TcpListener,
    secret: &'static str,
    seen: Seen,
) -> actix_web::dev::ServerHandle {
    let server = HttpServer::new(move || {
        let seen = seen.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let seen = seen.clone();
            async move {
                let presented =
                    req.headers().get(SIDECAR_TOKEN_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
                seen.lock().unwrap().push((req.path().to_owned(), presented.clone()));
                if presented.as_deref() != Some(secret) {
                    return HttpResponse::Unauthorized().json(json!({"error": "only my sidecar"}));
                }
                match req.path() {
                    "/manifest" => HttpResponse::Ok().json(json!({"tools": [{"name": "echo", "desc": "Echoes"}]})),
                    "/mcp/execute" => {
                        let call: Value = serde_json::from_slice(&body).unwrap_or_default();
                        HttpResponse::Ok().json(json!({"result": {"echoed": call["arguments"]}}))
                    }
                    _ => HttpResponse::NotFound().finish(),
                }
            }
        }))
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    let handle = server.handle();
    actix::spawn(server);
    handle
}

/// The sidecar's `/healthz` once its panel is in `state`.
async fn health_when(listen: SocketAddr, state: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        if let Ok(answer) = reqwest::get(format!("http://{listen}/healthz")).await {
            last = answer.json().await.unwrap_or_default();
            if last["panel"]["state"] == state {
                return last;
            }
        }
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
    panic!("the panel never became {state}: {last}");
}

#[actix_rt::test]
async fn the_sidecar_proves_itself_to_its_panel_with_the_instances_secret() {
    let h = Harness::new("sidecar-secret").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let panel_url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Seen::default();
    let _panel = serve_guarded_panel(listener, "s3cret", seen.clone());

    let mut config = h.config();
    config.panel_url = panel_url.clone();
    config.token = Some("s3cret".into());
    let listen = config.listen;
    let (_, sidecar) = start(config).await;
    let health = health_when(listen, "up").await;
    assert_eq!(health["panel"]["tools"], json!(["echo"]), "{health}");

    // A call from the bus reaches the panel with the secret too.
    let url = h.brokers.redis_url();
    let reply_to = format!("test:replies:{}", uuid::Uuid::new_v4());
    let mut replies = redis::Client::open(url.as_str()).unwrap().get_async_pubsub().await.unwrap();
    replies.subscribe(&reply_to).await.unwrap();
    let call = ToolCall::new("echo", json!({"n": 7}), "alice");
    let request = ToolRequest {
        call_id: call.call_id.clone(),
        tool: "echo".into(),
        arguments: call.arguments.clone(),
        caller: call.caller.clone(),
        deadline: call.deadline,
        idempotency_key: call.call_id.clone(),
        keep_result: false,
        reply_to: reply_to.clone(),
    };
    let mut conn = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let envelope = Envelope::new("test", request).encode();
    let _: u64 = redis::AsyncCommands::publish(&mut conn, channels::panel_calls(&h.panel), envelope).await.unwrap();
    let mut messages = replies.on_message();
    let message = tokio::time::timeout(Duration::from_secs(30), messages.next()).await.unwrap().unwrap();
    let response = Envelope::<Value>::decode(message.get_payload_bytes()).unwrap().typed::<ToolResponse>().unwrap();
    assert_eq!(response.data.outcome, Outcome::Result(json!({"echoed": {"n": 7}})));
    let paths: Vec<String> = seen.lock().unwrap().iter().map(|(path, _)| path.clone()).collect();
    assert!(paths.contains(&"/manifest".to_owned()) && paths.contains(&"/mcp/execute".to_owned()), "{paths:?}");
    assert!(
        seen.lock().unwrap().iter().all(|(_, token)| token.as_deref() == Some("s3cret")),
        "{:?}",
        seen.lock().unwrap()
    );
    sidecar.stop(true).await;

    // A sidecar without the secret is refused: the panel stays down, unlisted.
    let mut config = h.config();
    config.panel_url = panel_url;
    let listen = config.listen;
    let (_, _sidecar) = start(config).await;
    let health = health_when(listen, "down").await;
    assert!(health["panel"]["reason"].as_str().unwrap().contains("401"), "{health}");
    assert!(seen.lock().unwrap().iter().any(|(path, token)| path == "/manifest" && token.is_none()));
}
