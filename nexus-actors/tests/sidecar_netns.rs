//! The sidecar beside a panel in its own network namespace, with a real
//! redis-server: its endpoints exist only inside, where the panel can
//! publish, while it reaches the panel at its URL and lists its tools. Bad
//! namespaces and listen addresses are refused at start. The sidecar sends
//! the instance's secret with every request to its panel.

mod raw_http;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures::StreamExt;
use nexus_actors::infra::free_port;
use nexus_actors::instance::SIDECAR_TOKEN_HEADER;
use nexus_actors::netns::{self, Netns, NetnsThread};
use nexus_actors::platform::{channels, Panel, PanelMode, PanelRecords};
use nexus_actors::sidecar::{self, Sidecar, SidecarConfig, SidecarError};
use nexus_actors::tools::protocol::{Outcome, ToolRequest, ToolResponse};
use nexus_actors::tools::store::ToolStore;
use nexus_actors::tools::ToolCall;
use nexus_actors::Envelope;
use nexus_testkit::{prerequisite, Brokers};
use serde_json::{json, Value};

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

/// The panel: a manifest with one tool.
fn serve_panel(listener: std::net::TcpListener) -> actix_web::dev::ServerHandle {
    let server = HttpServer::new(|| {
        App::new().route(
            "/manifest",
            web::get().to(|| async {
                HttpResponse::Ok().json(json!({"name": "inner", "tools": [{"name": "echo", "desc": "Echoes"}]}))
            }),
        )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    let handle = server.handle();
    actix::spawn(server);
    handle
}

async fn start(config: SidecarConfig) -> actix_web::dev::ServerHandle {
    let sidecar: Sidecar = sidecar::start(config).await.unwrap();
    let handle = sidecar.handle();
    actix::spawn(sidecar.run());
    handle
}

/// Deletes the namespace when the test ends, passed or not.
struct NetnsGuard(Netns);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = self.0.delete();
    }
}

#[actix_rt::test]
async fn in_a_namespace_the_endpoints_are_inside_only() {
    if !prerequisite(netns::supported(), "the sidecar-in-a-namespace test needs root and iproute2") {
        return;
    }
    let guard = NetnsGuard(Netns::create(&format!("nexus-sc-{}", std::process::id())).unwrap());
    let inside = NetnsThread::enter(&guard.0.path()).unwrap();
    // The panel as the sidecar reaches it: at its address (here the host's loopback).
    let panel = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let panel_url = format!("http://{}", panel.local_addr().unwrap());
    let _panel = serve_panel(panel);
    let h = Harness::new("sidecar-netns").await;

    let mut config = h.config();
    config.netns = Some(guard.0.path());
    config.panel_url = panel_url;
    let listen = config.listen;
    let _sidecar = start(config).await;

    // /proxy and the other endpoints: not on the host, but on the panel's loopback.
    let from_host = reqwest::get(format!("http://{listen}/healthz")).await;
    assert!(from_host.is_err(), "the sidecar's endpoints answered on the host: {from_host:?}");
    let health = wait_until_up(&inside, listen).await;
    assert_eq!(health["panel"]["tools"], json!(["echo"]), "{health}");
    let mut stream = raw_http::connect_inside(&inside, listen).unwrap();
    let published =
        raw_http::request(&mut stream, "POST", "/proxy", r#"{"channel": "notes", "data": 1}"#).await.unwrap();
    assert_eq!(published.status, 202, "{}", published.body);

    let tools = ToolStore::connect(&h.brokers.redis_url()).await.unwrap().list_for("alice").await.unwrap();
    assert!(tools.iter().any(|t| t.name.ends_with("echo")), "{:?}", tools.iter().map(|t| &t.name).collect::<Vec<_>>());
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
    panic!("the panel never came up: {last}");
}

#[actix_rt::test]
async fn bad_namespaces_and_addresses_are_refused_at_start() {
    let h = Harness::new("sidecar-bad-config").await;
    let refused = |config: SidecarConfig| async move {
        match sidecar::start(config).await {
            Ok(_) => panic!("a bad configuration started"),
            Err(error) => error,
        }
    };

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
    let sidecar = start(config).await;
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
        resource: None,
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
    let _sidecar = start(config).await;
    let health = health_when(listen, "down").await;
    assert!(health["panel"]["reason"].as_str().unwrap().contains("401"), "{health}");
    assert!(seen.lock().unwrap().iter().any(|(path, token)| path == "/manifest" && token.is_none()));
}
