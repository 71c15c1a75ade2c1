//! Tools end to end over real sockets: the registry against a real
//! redis-server, system tools registered from Rust and called across nodes,
//! and panel tools through a real sidecar in front of a panel that
//! misbehaves on purpose. Calls are recorded on a real tansu broker.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Arbiter;
use actix_web::{web, App, HttpResponse, HttpServer};
use common::{eventually, tempdir};
use futures::StreamExt;
use nexus_actors::bus::kafka::{Consume, KafkaBridge, KafkaConfig, KafkaRecord, Nack, SEMANTIC_EVENTS};
use nexus_actors::bus::redis::RedisBridge;
use nexus_actors::envelope::Envelope;
use nexus_actors::infra::{free_port, RedisServer, Tansu, TansuStorage};
use nexus_actors::platform::{Panel, PanelMode, PanelRecords};
use nexus_actors::sidecar::{self, SidecarConfig, SidecarError};
use nexus_actors::telemetry::Metrics;
use nexus_actors::tools::prompts::PromptRole;
use nexus_actors::tools::protocol::Outcome;
use nexus_actors::tools::protocol::{ToolCall, ToolError, ToolRequest, ToolResponse};
use nexus_actors::tools::registry::{
    CallTool, CallToolWatched, CancelCall, GetPrompt, GetPromptError, ListPanelResources, ListPrompts, ListTools,
    ReadPanelResource, ReadResourceError, RegisterTool, RegistryDeps,
};
use nexus_actors::tools::store::{Claim, PanelExtras, ToolStore};
use nexus_actors::tools::system::SystemTool;
use nexus_actors::tools::ToolRegistry;
use nexus_actors::{ActorRef, Behaviour, Ctx, Handler, Kernel, Reply};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

/// One node's registry on `redis`, optionally recording on Kafka.
async fn registry(
    name: &str,
    redis: &RedisServer,
    kafka: Option<&ActorRef<KafkaBridge>>,
) -> (Kernel, ActorRef<ToolRegistry>) {
    let kernel = Kernel::new(name);
    let bridge = RedisBridge::spawn(&kernel, &Arbiter::new().handle(), &redis.url()).unwrap();
    let store = ToolStore::connect(&redis.url()).await.unwrap();
    let kafka = kafka.map(|k| k.link(ToolRegistry::KIND));
    let registry = ToolRegistry::spawn(RegistryDeps { kernel: kernel.clone(), store, redis: bridge, kafka });
    (kernel, registry)
}

async fn call(registry: &ActorRef<ToolRegistry>, call: ToolCall) -> Result<Value, ToolError> {
    registry.link::<CallTool>("test").ask(CallTool(call)).await.unwrap()
}

async fn names(registry: &ActorRef<ToolRegistry>, user: &str) -> Vec<String> {
    let list = registry.link::<ListTools>("test").ask(ListTools { user: user.into() }).await.unwrap().unwrap();
    list.into_iter().map(|t| t.name).collect()
}

fn exec_count(kernel: &Kernel, tool: &str, outcome: &str) -> u64 {
    Metrics::counter_value(&kernel.metrics().mcp_exec, &[tool, outcome])
}

#[derive(Debug, Deserialize, JsonSchema)]
struct Resize {
    width: u32,
    height: u32,
}

#[derive(Debug, Deserialize, JsonSchema)]
struct Nothing {}

#[actix_rt::test]
async fn system_tools_registered_in_rust_are_listed_checked_and_called_from_another_node() {
    let redis = RedisServer::start(&tempdir("tools-system"), false).unwrap();
    let (kernel_a, a) = registry("node-a", &redis, None).await;
    let (kernel_b, b) = registry("node-b", &redis, None).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let tools = vec![
        SystemTool::new("resize_image", "Resizes an image to WxH", |args: Resize, cx| async move {
            Ok(json!({ "w": args.width, "h": args.height, "by": cx.caller }))
        }),
        SystemTool::new("count", "Counts its runs", move |_: Nothing, _| {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok(json!(n)) }
        }),
        SystemTool::new("slow", "Never answers in time", |_: Nothing, _| async {
            actix::clock::sleep(Duration::from_secs(60)).await;
            Ok(json!(null))
        }),
        SystemTool::new("refuse", "Always fails", |_: Nothing, _| async {
            Err::<Value, _>(ToolError::failed("no, thank you"))
        }),
    ];
    for tool in tools {
        a.link::<RegisterTool>("test").ask(RegisterTool(tool)).await.unwrap().unwrap();
    }
    let bad = SystemTool::new("bad name", "x", |_: Nothing, _| async { Ok(json!(1)) });
    assert!(a.link::<RegisterTool>("test").ask(RegisterTool(bad)).await.unwrap().is_err());

    assert_eq!(names(&b, "ada").await, ["count", "refuse", "resize_image", "slow"]);
    let listed = b.link::<ListTools>("test").ask(ListTools { user: "ada".into() }).await.unwrap().unwrap();
    let schema = &listed.iter().find(|t| t.name == "resize_image").unwrap().input_schema;
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["properties"]["width"]["type"], "integer", "schema derived from the Rust type: {schema}");

    // Node b serves none of them: the call crosses the bus to node a.
    let result = call(&b, ToolCall::new("resize_image", json!({"width": 640, "height": 480}), "ada")).await;
    assert_eq!(result, Ok(json!({"w": 640, "h": 480, "by": "ada"})));
    let local = call(&a, ToolCall::new("resize_image", json!({"width": 1, "height": 2}), "bob")).await;
    assert_eq!(local, Ok(json!({"w": 1, "h": 2, "by": "bob"})));

    let wrong_type = call(&b, ToolCall::new("resize_image", json!({"width": "wide", "height": 480}), "ada")).await;
    assert!(
        matches!(&wrong_type, Err(ToolError::InvalidArguments { message }) if message.contains("/width")),
        "{wrong_type:?}"
    );
    let missing = call(&b, ToolCall::new("resize_image", json!({"width": 1}), "ada")).await;
    assert!(matches!(&missing, Err(ToolError::InvalidArguments { message }) if message.contains("height")));
    let not_object = call(&b, ToolCall::new("resize_image", json!([1, 2]), "ada")).await;
    assert!(matches!(not_object, Err(ToolError::InvalidArguments { .. })));
    assert!(matches!(call(&b, ToolCall::new("nope", json!({}), "ada")).await, Err(ToolError::NotFound { .. })));
    assert!(matches!(call(&b, ToolCall::new("p:x.y", json!({}), "ada")).await, Err(ToolError::NotFound { .. })));
    let huge = json!({ "width": 1, "height": 1, "pad": "x".repeat(1_100_000) });
    assert!(matches!(call(&b, ToolCall::new("resize_image", huge, "ada")).await, Err(ToolError::TooLarge { .. })));
    assert_eq!(
        call(&b, ToolCall::new("refuse", json!({}), "ada")).await,
        Err(ToolError::ToolError { message: "no, thank you".into() })
    );
    let slow = ToolCall::new("slow", json!({}), "ada").with_timeout(Duration::from_millis(300));
    assert!(matches!(call(&b, slow).await, Err(ToolError::Timeout { .. })));

    // One idempotency key, one run: the retry gets the first result.
    let first = ToolCall::new("count", json!({}), "ada").with_idempotency_key("k1");
    let retry = ToolCall::new("count", json!({}), "ada").with_idempotency_key("k1");
    assert_eq!(call(&b, first).await, Ok(json!(1)));
    assert_eq!(call(&b, retry).await, Ok(json!(1)));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Keys are per caller: bob's "k1" is his own.
    assert_eq!(call(&b, ToolCall::new("count", json!({}), "bob").with_idempotency_key("k1")).await, Ok(json!(2)));

    assert_eq!(exec_count(&kernel_b, "resize_image", "ok"), 1);
    assert_eq!(exec_count(&kernel_b, "resize_image", "invalid_arguments"), 3);
    assert_eq!(exec_count(&kernel_b, "unknown", "not_found"), 2);
    assert_eq!(exec_count(&kernel_b, "slow", "timeout"), 1);
    assert_eq!(exec_count(&kernel_a, "resize_image", "ok"), 1);
    assert!(kernel_b.render_metrics().contains("nexus_tool_call_duration_seconds_bucket"));
}

/// A panel that misbehaves on request, one tool per way.
#[derive(Clone)]
struct FakePanel {
    name: String,
    manifest: Arc<Mutex<Value>>,
    executed: Arc<AtomicUsize>,
    /// Where `report` posts its progress.
    sidecar: Arc<Mutex<String>>,
}

impl FakePanel {
    fn new(name: &str) -> Self {
        let tool = |name: &str| json!({"name": name, "desc": format!("the {name} tool")});
        let manifest = json!({"name": name, "tools": [
            {"name": "echo", "desc": "Echoes text", "input_schema":
                {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
            tool("garbage"), tool("crash"), tool("sleep"), tool("huge"), tool("refuse"), tool("no_result"), tool("nap"),
            tool("report"),
        ], "resources": [{"uri": "notes/today", "name": "Today", "mimeType": "text/markdown"},
                         {"uri": "binary", "name": "Bytes"}, {"uri": "elsewhere", "name": "Moved"}],
        "prompts": [{"name": "greet", "description": "Greets someone",
            "arguments": [{"name": "who", "required": true}],
            "messages": [{"role": "user", "text": "Greet {{ who }}."}]}]});
        let manifest = Arc::new(Mutex::new(manifest));
        FakePanel { name: name.into(), manifest, executed: Arc::default(), sidecar: Arc::default() }
    }

    fn set_manifest(&self, manifest: Value) {
        *self.manifest.lock().unwrap() = manifest;
    }

    /// Serves on a free loopback port; returns the base URL and the server.
    fn serve(&self) -> (String, actix_web::dev::ServerHandle) {
        let panel = self.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(panel.clone()))
                .route("/manifest", web::get().to(manifest))
                .route("/mcp/execute", web::post().to(execute))
                .route("/mcp/resources/{uri:.*}", web::get().to(resource))
        })
        .workers(1)
        .bind(("127.0.0.1", 0))
        .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        actix::spawn(server);
        (format!("http://{addr}"), handle)
    }
}

async fn manifest(panel: web::Data<FakePanel>) -> HttpResponse {
    let manifest = panel.manifest.lock().unwrap().clone();
    match manifest {
        Value::String(raw) => HttpResponse::Ok().content_type("application/json").body(raw),
        other => HttpResponse::Ok().json(other),
    }
}

async fn resource(panel: web::Data<FakePanel>, uri: web::Path<String>) -> HttpResponse {
    match uri.as_str() {
        "notes/today" => HttpResponse::Ok().content_type("text/markdown").body(format!("# Today at {}", panel.name)),
        "binary" => HttpResponse::Ok().body(vec![0xff, 0xfe, 0x00]),
        // Followed, this would answer: the sidecar must not follow it.
        "elsewhere" => HttpResponse::Found().insert_header(("Location", "/mcp/resources/notes/today")).finish(),
        _ => HttpResponse::NotFound().finish(),
    }
}

async fn execute(panel: web::Data<FakePanel>, body: web::Json<Value>) -> HttpResponse {
    panel.executed.fetch_add(1, Ordering::SeqCst);
    match body["tool"].as_str().unwrap_or("") {
        "echo" => HttpResponse::Ok().json(json!({"result": {"panel": panel.name, "text": body["arguments"]["text"]}})),
        "garbage" => HttpResponse::Ok().body("<html>surprise</html>"),
        "crash" => HttpResponse::InternalServerError().body("Traceback: boom"),
        "sleep" => {
            actix::clock::sleep(Duration::from_secs(30)).await;
            HttpResponse::Ok().json(json!({"result": "late"}))
        }
        "huge" => HttpResponse::Ok().json(json!({"result": "x".repeat(1_200_000)})),
        "nap" => {
            actix::clock::sleep(Duration::from_millis(500)).await;
            HttpResponse::Ok().json(json!({"result": "rested"}))
        }
        "refuse" => HttpResponse::Ok().json(json!({"error": "nope"})),
        "report" => {
            let sidecar = panel.sidecar.lock().unwrap().clone();
            for n in 1..=3 {
                let report =
                    json!({"call_id": body["call_id"], "progress": n, "total": 3, "message": format!("step {n}")});
                let _ = reqwest::Client::new().post(format!("{sidecar}/progress")).json(&report).send().await;
            }
            actix::clock::sleep(Duration::from_secs(30)).await;
            HttpResponse::Ok().json(json!({"result": "late"}))
        }
        _ => HttpResponse::Ok().json(json!({"status": "done"})),
    }
}

struct Harness {
    redis: RedisServer,
    store: PanelRecords,
}

impl Harness {
    async fn new(name: &str) -> Self {
        let redis = RedisServer::start(&tempdir(name), false).unwrap();
        let store = PanelRecords::connect(&redis.url()).await.unwrap();
        Harness { redis, store }
    }

    async fn panel(&self, owner: &str) -> String {
        let id = uuid::Uuid::now_v7().to_string();
        let panel = Panel {
            id: id.clone(),
            name: "p".into(),
            owner: owner.into(),
            mode: PanelMode::Studio,
            source: "t".into(),
            public: false,
        };
        self.store.put(&panel).await.unwrap();
        id
    }

    /// Starts a sidecar for `panel` in front of `panel_url`; returns its base URL.
    async fn sidecar(
        &self,
        panel: &str,
        panel_url: &str,
        tune: impl FnOnce(&mut SidecarConfig),
    ) -> (String, actix_web::dev::ServerHandle) {
        let mut config = SidecarConfig::new(panel, self.redis.url());
        config.panel_url = panel_url.into();
        config.listen = format!("127.0.0.1:{}", free_port().unwrap()).parse().unwrap();
        config.poll_interval = Duration::from_millis(200);
        tune(&mut config);
        let listen = config.listen;
        let sidecar = sidecar::start(config).await.unwrap();
        let handle = sidecar.handle();
        actix::spawn(sidecar.run());
        (format!("http://{listen}"), handle)
    }
}

async fn wait_listed(registry: &ActorRef<ToolRegistry>, user: &str, tool: &str) {
    for _ in 0..200 {
        if names(registry, user).await.iter().any(|n| n == tool) {
            return;
        }
        actix::clock::sleep(Duration::from_millis(25)).await;
    }
    panic!("{tool} was never listed for {user}");
}

#[actix_rt::test]
async fn panel_tools_go_through_a_real_sidecar_and_every_panel_failure_is_a_clear_error() {
    let h = Harness::new("tools-panel").await;
    let (kernel, registry) = registry("caller", &h.redis, None).await;
    let panel = FakePanel::new("fake");
    let (panel_url, panel_server) = panel.serve();
    let id = h.panel("ada").await;
    let (sidecar_url, sidecar) = h.sidecar(&id, &panel_url, |c| c.max_calls = 2).await;
    let echo = format!("{id}.echo");
    wait_listed(&registry, "ada", &echo).await;
    assert!(!names(&registry, "bob").await.contains(&echo), "another user's panel tools are not listed");
    assert!(matches!(
        call(&registry, ToolCall::new(&echo, json!({"text": "hi"}), "bob")).await,
        Err(ToolError::NotFound { .. })
    ));

    let tool = |name: &str| format!("{id}.{name}");
    let ada = |name: &str, args: Value| ToolCall::new(tool(name), args, "ada");
    assert_eq!(call(&registry, ada("echo", json!({"text": "hi"}))).await, Ok(json!({"panel": "fake", "text": "hi"})));

    let executed = panel.executed.load(Ordering::SeqCst);
    let bad = call(&registry, ada("echo", json!({"text": 7}))).await;
    assert!(matches!(bad, Err(ToolError::InvalidArguments { .. })), "{bad:?}");
    assert_eq!(panel.executed.load(Ordering::SeqCst), executed, "invalid arguments never reach the panel");

    let garbage = call(&registry, ada("garbage", json!({}))).await;
    assert!(
        matches!(&garbage, Err(ToolError::InvalidResponse { message }) if message.contains("not JSON")),
        "{garbage:?}"
    );
    let crash = call(&registry, ada("crash", json!({}))).await;
    assert_eq!(crash, Err(ToolError::PanelStatus { status: 500, body: "Traceback: boom".into() }));
    let huge = call(&registry, ada("huge", json!({}))).await;
    assert!(matches!(huge, Err(ToolError::TooLarge { ref what, .. }) if what == "result"), "{huge:?}");
    assert_eq!(call(&registry, ada("refuse", json!({}))).await, Err(ToolError::failed("nope")));
    let shapeless = call(&registry, ada("no_result", json!({}))).await;
    assert!(matches!(shapeless, Err(ToolError::InvalidResponse { .. })), "{shapeless:?}");
    let sleepy = ada("sleep", json!({})).with_timeout(Duration::from_millis(400));
    assert!(matches!(call(&registry, sleepy).await, Err(ToolError::Timeout { .. })));

    // Two calls hang in the panel; the sidecar's limit is two: a third is
    // refused at once rather than queued.
    let hang = |_| {
        let registry = registry.clone();
        let call_ = ada("sleep", json!({})).with_timeout(Duration::from_secs(3));
        async move { call(&registry, call_).await }
    };
    let hanging: Vec<_> = (0..2).map(|i| actix::spawn(hang(i))).collect();
    eventually(10, "two calls in the panel", || panel.executed.load(Ordering::SeqCst) >= executed + 8).await;
    let third = call(&registry, ada("echo", json!({"text": "x"}))).await;
    assert_eq!(third, Err(ToolError::Busy { limit: 2 }));
    for h in hanging {
        assert!(matches!(h.await.unwrap(), Err(ToolError::Timeout { .. })));
    }
    // Nothing else broke.
    assert_eq!(
        call(&registry, ada("echo", json!({"text": "still"}))).await,
        Ok(json!({"panel": "fake", "text": "still"}))
    );

    let metrics = reqwest::get(format!("{sidecar_url}/metrics")).await.unwrap().text().await.unwrap();
    for outcome in ["ok", "timeout", "busy", "panel_status", "invalid_response", "too_large", "tool_error"] {
        assert!(
            metrics.contains(&format!("nexus_sidecar_calls_total{{outcome=\"{outcome}\"}}")),
            "{outcome}: {metrics}"
        );
    }
    assert!(exec_count(&kernel, "panel", "ok") >= 2);
    assert_eq!(exec_count(&kernel, "panel", "busy"), 1);

    // The panel dies: calls fail fast and clearly.
    panel_server.stop(false).await;
    let down = call(&registry, ada("echo", json!({"text": "x"}))).await;
    assert!(matches!(down, Err(ToolError::PanelUnavailable { .. })), "{down:?}");
    let health: Value = reqwest::get(format!("{sidecar_url}/healthz")).await.unwrap().json().await.unwrap();
    assert_eq!(health["panel_id"], id.as_str());

    // Its sidecar stops: the tools leave the listing.
    sidecar.stop(true).await;
    for _ in 0..200 {
        if !names(&registry, "ada").await.contains(&echo) {
            break;
        }
        actix::clock::sleep(Duration::from_millis(25)).await;
    }
    assert!(!names(&registry, "ada").await.contains(&echo));
    // Within the registry's 2 s resolve cache a call finds no one listening.
    let gone = call(&registry, ada("echo", json!({"text": "x"}))).await;
    assert!(matches!(gone, Err(ToolError::NotFound { .. } | ToolError::PanelUnavailable { .. })), "{gone:?}");
}

#[actix_rt::test]
async fn two_panels_may_both_have_a_tool_of_one_name() {
    let h = Harness::new("tools-namespace").await;
    let (_kernel, registry) = registry("caller", &h.redis, None).await;
    let (one, two) = (FakePanel::new("one"), FakePanel::new("two"));
    let ((url_one, _s1), (url_two, _s2)) = (one.serve(), two.serve());
    let (id_one, id_two) = (h.panel("ada").await, h.panel("ada").await);
    let _c1 = h.sidecar(&id_one, &url_one, |_| {}).await;
    let _c2 = h.sidecar(&id_two, &url_two, |_| {}).await;
    wait_listed(&registry, "ada", &format!("{id_one}.echo")).await;
    wait_listed(&registry, "ada", &format!("{id_two}.echo")).await;
    for (id, name) in [(&id_one, "one"), (&id_two, "two")] {
        let result = call(&registry, ToolCall::new(format!("{id}.echo"), json!({"text": "t"}), "ada")).await;
        assert_eq!(result, Ok(json!({"panel": name, "text": "t"})));
    }
}

#[actix_rt::test]
async fn invalid_manifests_are_refused_whole_and_a_reload_registers_the_fixed_one() {
    let h = Harness::new("tools-manifest").await;
    let (_kernel, registry) = registry("caller", &h.redis, None).await;
    let panel = FakePanel::new("m");
    let dup = json!({"tools": [{"name": "a", "desc": "x"}, {"name": "a", "desc": "y"}]});
    panel.set_manifest(dup);
    let (panel_url, _server) = panel.serve();
    let id = h.panel("ada").await;
    let (sidecar_url, _sidecar) = h.sidecar(&id, &panel_url, |c| c.poll_interval = Duration::from_secs(60)).await;
    let client = reqwest::Client::new();
    let reload = || async {
        let response = client.post(format!("{sidecar_url}/reload")).send().await.unwrap();
        (response.status().as_u16(), response.json::<Value>().await.unwrap())
    };
    let cases = [
        (json!({"tools": [{"name": "a", "desc": "x"}, {"name": "a", "desc": "y"}]}), "listed twice"),
        (json!({"tools": [{"name": "a"}]}), "description"),
        (json!({"tool": []}), "expected shape"),
        (json!({"tools": [{"name": "has space", "desc": "x"}]}), "not valid"),
        (json!({"tools": [{"name": "a", "desc": "x", "input_schema": {"type": "string"}}]}), "\"type\": \"object\""),
        (Value::String("not json at all".into()), "not valid JSON"),
        (Value::String(format!("{{\"tools\": [], \"pad\": \"{}\"}}", "x".repeat(300_000))), "limit"),
    ];
    for (manifest, says) in cases {
        panel.set_manifest(manifest.clone());
        let (status, body) = reload().await;
        assert_eq!(status, 422, "{manifest}");
        assert!(body["message"].as_str().unwrap().contains(says), "{says}: {body}");
        assert!(names(&registry, "ada").await.iter().all(|n| !n.starts_with(&id)), "nothing listed");
    }
    let health: Value = reqwest::get(format!("{sidecar_url}/healthz")).await.unwrap().json().await.unwrap();
    assert_eq!(health["panel"]["state"], "invalid_manifest");

    panel.set_manifest(json!({"tools": [{"name": "fixed", "description": "works now"}]}));
    let (status, body) = reload().await;
    assert_eq!((status, body), (200, json!({"tools": ["fixed"]})));
    assert_eq!(names(&registry, "ada").await, [format!("{id}.fixed")]);
    // A bad manifest later leaves the last valid one listed.
    panel.set_manifest(json!({"tools": "nope"}));
    assert_eq!(reload().await.0, 422);
    assert_eq!(names(&registry, "ada").await, [format!("{id}.fixed")]);
}

#[actix_rt::test]
async fn the_proxy_publishes_only_inside_the_panels_namespace_within_limits() {
    let h = Harness::new("tools-proxy").await;
    let panel = FakePanel::new("p");
    let (panel_url, _server) = panel.serve();
    let id = h.panel("ada").await;
    let (sidecar_url, _sidecar) = h
        .sidecar(&id, &panel_url, |c| {
            c.publish_rate = 1;
            c.publish_burst = 3;
        })
        .await;
    let mut pubsub = redis::Client::open(h.redis.url()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.psubscribe("*").await.unwrap();
    let seen: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let sink = seen.clone();
    actix::spawn(async move {
        let mut messages = pubsub.on_message();
        while let Some(m) = messages.next().await {
            let payload: Value = serde_json::from_slice(m.get_payload_bytes()).unwrap_or(Value::Null);
            sink.lock().unwrap().push((m.get_channel_name().to_owned(), payload));
        }
    });
    let client = reqwest::Client::new();
    let post = |body: String| {
        let request = client.post(format!("{sidecar_url}/proxy")).header("content-type", "application/json").body(body);
        async move {
            let response = request.send().await.unwrap();
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            (response.status().as_u16(), retry_after, response.json::<Value>().await.unwrap())
        }
    };
    let (status, _, body) = post(json!({"channel": "notes", "type": "test.note", "data": {"n": 1}}).to_string()).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["channel"], format!("nexus:panel:{id}:out:notes"));

    for channel in ["a:b", "*", "nexus:doc:1", "../x", "", "notes\n", "ü"] {
        let (status, _, body) = post(json!({"channel": channel, "data": 1}).to_string()).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_channel")), "{channel:?}");
    }
    assert_eq!(post("{not json".into()).await.2["error"], "bad_json");
    assert_eq!(post(json!({"channel": "notes"}).to_string()).await.2["error"], "bad_json", "data is required");
    assert_eq!(post(json!({"channel": "n", "type": "a b", "data": 1}).to_string()).await.2["error"], "bad_type");
    let forged = json!({"channel": "n", "type": "nexus.tool.response", "data": 1}).to_string();
    assert_eq!(post(forged).await.2["error"], "bad_type", "the platform's own types are reserved");
    let big = json!({"channel": "notes", "data": "x".repeat(70_000)}).to_string();
    assert_eq!(post(big).await.0, 413);

    // Burst of three: one used above, two more, then the fourth waits.
    for _ in 0..2 {
        assert_eq!(post(json!({"channel": "notes", "data": 2}).to_string()).await.0, 202);
    }
    let (status, retry_after, body) = post(json!({"channel": "notes", "data": 3}).to_string()).await;
    assert_eq!((status, body["error"].as_str()), (429, Some("rate_limited")));
    assert_eq!(retry_after.as_deref(), Some("1"));

    eventually(5, "three messages published", || seen.lock().unwrap().len() >= 3).await;
    actix::clock::sleep(Duration::from_millis(200)).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "only accepted messages were published: {seen:?}");
    for (channel, envelope) in seen.iter() {
        assert_eq!(channel, &format!("nexus:panel:{id}:out:notes"));
        assert_eq!(envelope["source"], format!("panel/{id}"));
    }
    assert_eq!(seen[0].1["type"], "test.note");
    assert_eq!(seen[1].1["type"], "nexus.panel.message");
}

#[actix_rt::test]
async fn a_sidecar_refuses_an_unknown_panel_and_a_non_loopback_address() {
    let h = Harness::new("tools-unknown").await;
    let config = SidecarConfig::new("no-such-panel", h.redis.url());
    assert!(matches!(sidecar::start(config).await, Err(SidecarError::UnknownPanel(_))));
    let id = h.panel("ada").await;
    let mut config = SidecarConfig::new(id, h.redis.url());
    config.listen = "0.0.0.0:3500".parse().unwrap();
    assert!(matches!(sidecar::start(config).await, Err(SidecarError::NotLoopback(_))));
}

/// Keeps every record it is given.
struct Records(Arc<Mutex<Vec<KafkaRecord>>>);

impl Behaviour for Records {
    const KIND: &'static str = "records";
}

impl Handler<KafkaRecord> for Records {
    fn handle(&mut self, record: KafkaRecord, _: &mut Ctx<Self>) -> Reply<Result<(), Nack>> {
        self.0.lock().unwrap().push(record);
        Reply::Now(Ok(()))
    }
}

#[actix_rt::test]
async fn every_call_and_its_outcome_are_recorded_on_the_semantic_bus() {
    let redis = RedisServer::start(&tempdir("tools-kafka-redis"), false).unwrap();
    let tansu = Tansu::start(&tempdir("tools-kafka"), TansuStorage::Memory).unwrap();
    let kernel = Kernel::new("recorder");
    let kafka = KafkaBridge::spawn(&kernel, &Arbiter::new().handle(), KafkaConfig::new(tansu.brokers())).await.unwrap();
    let (_k, registry) = registry("node", &redis, Some(&kafka)).await;
    let tool = SystemTool::new("resize_image", "Resizes", |a: Resize, _| async move { Ok(json!(a.width * a.height)) });
    registry.link::<RegisterTool>("test").ask(RegisterTool(tool)).await.unwrap().unwrap();
    let ok = ToolCall::new("resize_image", json!({"width": 2, "height": 3}), "ada").with_context("conversation-1");
    let failed = ToolCall::new("resize_image", json!({"width": -1, "height": 3}), "ada").with_context("conversation-1");
    let (ok_id, failed_id) = (ok.call_id.clone(), failed.call_id.clone());
    assert_eq!(call(&registry, ok).await, Ok(json!(6)));
    assert!(call(&registry, failed).await.is_err());

    let records: Arc<Mutex<Vec<KafkaRecord>>> = Arc::default();
    let sink = records.clone();
    // A consumer group rather than a Replay: tansu 0.6 reports the high
    // watermark of a partition as the base offset of its last batch, so a
    // replay bounded by it stops early when records were batched.
    let reader = kernel.spawn("reader", move || Records(sink.clone()));
    let consume =
        Consume { group: "tools-test".into(), topics: vec![SEMANTIC_EVENTS.into()], subscriber: reader.link("kafka") };
    kafka.link::<Consume>("test").ask(consume).await.unwrap().unwrap();
    let failed_finished =
        |r: &KafkaRecord| r.envelope.kind == "nexus.tool.finished" && r.envelope.data["call_id"] == failed_id.as_str();
    eventually(30, "both calls and their outcomes on semantic.events", || {
        records.lock().unwrap().iter().any(failed_finished)
    })
    .await;
    let records = records.lock().unwrap();
    let called = records
        .iter()
        .find(|r| r.envelope.kind == "nexus.tool.called" && r.envelope.data["call"]["call_id"] == ok_id.as_str())
        .expect("the call is recorded");
    assert_eq!(called.key.as_deref(), Some("conversation-1"));
    assert_eq!(called.envelope.data["call"]["arguments"], json!({"width": 2, "height": 3}));
    let finished = records
        .iter()
        .find(|r| r.envelope.kind == "nexus.tool.finished" && r.envelope.data["call_id"] == ok_id.as_str())
        .unwrap();
    assert_eq!(finished.envelope.causationid.as_deref(), Some(called.envelope.id.as_str()));
    assert_eq!(finished.envelope.data["result"], 6);
    assert!(called.offset < finished.offset && called.partition == finished.partition, "in order, one context");
    // A call refused before it ran (bad arguments) is part of the chain too.
    let refused = records
        .iter()
        .find(|r| r.envelope.kind == "nexus.tool.finished" && r.envelope.data["call_id"] == failed_id.as_str())
        .expect("the refused call is recorded");
    assert_eq!(refused.envelope.data["error"]["code"], "invalid_arguments");
}

#[actix_rt::test]
async fn an_idempotency_key_runs_once_and_is_released_after_a_passing_failure() {
    let redis = RedisServer::start(&tempdir("tools-claims"), false).unwrap();
    let store = ToolStore::connect(&redis.url()).await.unwrap();
    let hold = Duration::from_secs(30);
    let claim = |call: &'static str| {
        let store = store.clone();
        async move { store.claim("p.t", "ada", "k", call, hold).await.unwrap() }
    };
    assert_eq!(claim("c1").await, Claim::Won);
    assert_eq!(claim("c1").await, Claim::SameCall, "the same call delivered to a second server stays silent");
    assert_eq!(claim("c2").await, Claim::Running, "a retry while it runs");
    assert_eq!(store.claim("p.t", "bob", "k", "c9", hold).await.unwrap(), Claim::Won, "keys are per caller");

    // c1 timed out: a retry may run the tool again, c1 itself may not.
    let timeout = Outcome::Error(ToolError::Timeout { timeout_ms: 1 });
    store.finish("p.t", "ada", "k", "c1", &timeout, true).await.unwrap();
    assert_eq!(claim("c1").await, Claim::SameCall);
    assert_eq!(claim("c2").await, Claim::Won);
    // A late finish of c1 does not touch c2's claim.
    store.finish("p.t", "ada", "k", "c1", &Outcome::Result(json!("stale")), true).await.unwrap();
    assert_eq!(claim("c3").await, Claim::Running);
    store.finish("p.t", "ada", "k", "c2", &Outcome::Result(json!(42)), true).await.unwrap();
    assert_eq!(claim("c3").await, Claim::Done(Outcome::Result(json!(42))));
    assert_eq!(claim("c2").await, Claim::SameCall);
}

/// Redis goes away while a call runs and comes back after it ended: the
/// outcome is kept once Redis is back, so a retry with the same key gets it
/// instead of finding the key taken until its claim runs out and then
/// running the tool a second time.
#[actix_rt::test]
async fn an_outcome_reached_while_redis_is_away_is_kept_when_it_is_back() {
    let brokers = nexus_testkit::Brokers::redis_persistent("tools-keep");
    let url = brokers.redis_url();
    let redis = Arc::new(Mutex::new(brokers.redis));
    let store = ToolStore::connect(&url).await.unwrap();
    let request = |call_id: &str| ToolRequest {
        call_id: call_id.into(),
        tool: "t".into(),
        arguments: json!({}),
        caller: "ada".into(),
        deadline: chrono::Utc::now() + chrono::Duration::seconds(10),
        idempotency_key: "k".into(),
        keep_result: true,
        reply_to: "nowhere".into(),
        resource: None,
    };
    let runs = AtomicUsize::new(0);
    let work = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        let redis = redis.clone();
        redis.lock().unwrap().kill();
        // Restarted from this thread: a child started by a thread that
        // ends is killed with it (PR_SET_PDEATHSIG).
        actix::spawn(async move {
            actix::clock::sleep(Duration::from_millis(500)).await;
            redis.lock().unwrap().restart().unwrap();
        });
        Ok(json!(7))
    };
    let first = Arc::new(Mutex::new(None));
    let answered = first.clone();
    store
        .run_once("p.t", &request("c1"), work(), |result| async move {
            *answered.lock().unwrap() = Some(result);
        })
        .await;
    assert_eq!(first.lock().unwrap().take().unwrap().unwrap(), json!(7));

    let second = Arc::new(Mutex::new(None));
    let answered = second.clone();
    store
        .run_once("p.t", &request("c2"), work(), |result| async move {
            *answered.lock().unwrap() = Some(result);
        })
        .await;
    let retry = second.lock().unwrap().take().unwrap();
    assert_eq!(retry.unwrap(), json!(7), "the retry gets the first outcome");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the tool ran once");
}

#[actix_rt::test]
async fn a_call_without_an_idempotency_key_keeps_no_result() {
    let redis = RedisServer::start(&tempdir("tools-nokey"), false).unwrap();
    let (_kernel, registry) = registry("node", &redis, None).await;
    let tool =
        SystemTool::new("answer", "Answers", |_: Nothing, _| async move { Ok(json!({"big": "x".repeat(10_000)})) });
    registry.link::<RegisterTool>("test").ask(RegisterTool(tool)).await.unwrap().unwrap();
    for _ in 0..20 {
        call(&registry, ToolCall::new("answer", json!({}), "ada")).await.unwrap();
    }
    call(&registry, ToolCall::new("answer", json!({}), "ada").with_idempotency_key("mine")).await.unwrap();
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("nexus:tool-call:*").query_async(&mut conn).await.unwrap();
    let mut kept = Vec::new();
    for key in &keys {
        let result: Option<String> = redis::cmd("HGET").arg(key).arg("result").query_async(&mut conn).await.unwrap();
        let ttl: i64 = redis::cmd("PTTL").arg(key).query_async(&mut conn).await.unwrap();
        if result.is_some() {
            kept.push(key.clone());
        } else {
            assert!(ttl <= 5_000, "a keyless call's claim outlives it only briefly: {key} {ttl} ms");
        }
    }
    assert_eq!(kept, vec!["nexus:tool-call:answer:ada:mine".to_owned()], "only the caller's key keeps a result");
}

#[actix_rt::test]
async fn a_stopping_sidecar_lets_running_calls_answer() {
    let h = Harness::new("tools-drain").await;
    let (_kernel, registry) = registry("caller", &h.redis, None).await;
    let panel = FakePanel::new("drain");
    let (panel_url, _server) = panel.serve();
    let id = h.panel("ada").await;
    let (_url, sidecar) = h.sidecar(&id, &panel_url, |_| {}).await;
    let nap = format!("{id}.nap");
    wait_listed(&registry, "ada", &nap).await;
    let running = {
        let registry = registry.clone();
        actix::spawn(async move { call(&registry, ToolCall::new(nap, json!({}), "ada")).await })
    };
    eventually(5, "the call reached the panel", || panel.executed.load(Ordering::SeqCst) == 1).await;
    sidecar.stop(true).await;
    assert_eq!(running.await.unwrap(), Ok(json!("rested")));
}

/// Two replicas of a panel keep its tools listed: one stopping leaves them
/// listed for the other, the last live one stopping takes them down, and a
/// replica whose share expired (it died without a word) keeps nothing.
#[actix_rt::test]
async fn a_replica_that_stops_unlists_only_itself() {
    use nexus_actors::tools::{ToolAddress, ToolOwner, ToolSpec};
    let redis = RedisServer::start(&tempdir("tools-replicas"), false).unwrap();
    let store = ToolStore::connect(&redis.url()).await.unwrap();
    let panel = "replicated";
    let spec = ToolSpec {
        name: format!("{panel}.echo"),
        description: "Echoes".into(),
        input_schema: json!({"type": "object"}),
        owner: ToolOwner::Panel { panel: panel.into(), user: "ada".into() },
    };
    record_panel(&redis.url(), panel, "ada").await;
    let listed = |store: ToolStore| async move {
        store.find(&ToolAddress::Panel { panel, tool: "echo" }).await.unwrap().is_some()
            && store.list_for("ada").await.unwrap().iter().any(|s| s.name == "replicated.echo")
    };
    let long = Duration::from_secs(30);
    store
        .put_panel(panel, "ada", "replica-a", std::slice::from_ref(&spec), PanelExtras::default(), long)
        .await
        .unwrap();
    store
        .put_panel(panel, "ada", "replica-b", std::slice::from_ref(&spec), PanelExtras::default(), long)
        .await
        .unwrap();
    assert!(!store.remove_panel(panel, "ada", "replica-a").await.unwrap(), "b still keeps the listing");
    assert!(listed(store.clone()).await, "one replica stopping leaves the tools listed for the other");
    assert!(store.remove_panel(panel, "ada", "replica-b").await.unwrap());
    assert!(!listed(store.clone()).await, "the last replica stopping unlists them");

    // d's longer share lists first: c's shorter one must not cut the set's life short.
    store
        .put_panel(panel, "ada", "replica-d", std::slice::from_ref(&spec), PanelExtras::default(), long)
        .await
        .unwrap();
    store
        .put_panel(
            panel,
            "ada",
            "replica-c",
            std::slice::from_ref(&spec),
            PanelExtras::default(),
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    actix_rt::time::sleep(Duration::from_millis(400)).await;
    assert!(store.remove_panel(panel, "ada", "replica-d").await.unwrap(), "c's share expired: d was the last");
    assert!(!listed(store.clone()).await);
}

/// Writes the record of `panel`, owned by `owner`, as the API would.
async fn record_panel(url: &str, panel: &str, owner: &str) {
    use nexus_actors::platform::{Panel, PanelMode};
    let record = Panel {
        id: panel.into(),
        name: panel.into(),
        owner: owner.into(),
        mode: PanelMode::Studio,
        source: "template:empty".into(),
        public: false,
    };
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let () =
        redis::AsyncCommands::set(&mut conn, format!("nexus:panel:{panel}"), serde_json::to_string(&record).unwrap())
            .await
            .unwrap();
}

/// A panel's listing is written by its sidecar: one that claims another
/// owner, another panel or another name lists nothing, to anyone.
#[actix_rt::test]
async fn a_panel_listing_counts_only_as_its_own_panels_tools() {
    use nexus_actors::tools::{ToolAddress, ToolOwner, ToolSpec};
    let redis = RedisServer::start(&tempdir("tools-forged"), false).unwrap();
    let store = ToolStore::connect(&redis.url()).await.unwrap();
    record_panel(&redis.url(), "mallorys", "mallory").await;
    record_panel(&redis.url(), "adas", "ada").await;
    let spec = |name: &str, panel: &str, user: &str| ToolSpec {
        name: name.into(),
        description: "Looks harmless".into(),
        input_schema: json!({"type": "object"}),
        owner: ToolOwner::Panel { panel: panel.into(), user: user.into() },
    };
    let long = Duration::from_secs(30);
    let forged = [
        spec("mallorys.for_ada", "mallorys", "ada"),
        spec("mallorys.as_adas", "adas", "ada"),
        spec("adas.renamed", "mallorys", "mallory"),
    ];
    store.put_panel("mallorys", "mallory", "replica", &forged, PanelExtras::default(), long).await.unwrap();
    for tool in ["for_ada", "as_adas", "renamed"] {
        let found = store.find(&ToolAddress::Panel { panel: "mallorys", tool }).await.unwrap();
        assert_eq!(found, None, "{tool}: a forged listing is found");
    }
    for user in ["ada", "mallory"] {
        let listed = store.list_for(user).await.unwrap();
        assert!(
            !listed.iter().any(|s| s.name.starts_with("mallorys.") || s.name == "adas.renamed"),
            "{user}: {listed:?}"
        );
    }
    // A spec put in by hand under a name it does not carry is not found either.
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let misnamed = serde_json::to_string(&spec("mallorys.other", "mallorys", "mallory")).unwrap();
    let () = redis::AsyncCommands::hset(&mut conn, "nexus:tools:panel:mallorys", "misnamed", misnamed).await.unwrap();
    let found = store.find(&ToolAddress::Panel { panel: "mallorys", tool: "misnamed" }).await.unwrap();
    assert_eq!(found, None, "a spec under another name is found");
    // Its own tool, honestly listed, is found.
    let honest = spec("mallorys.ok", "mallorys", "mallory");
    store
        .put_panel("mallorys", "mallory", "replica", std::slice::from_ref(&honest), PanelExtras::default(), long)
        .await
        .unwrap();
    assert_eq!(store.find(&ToolAddress::Panel { panel: "mallorys", tool: "ok" }).await.unwrap(), Some(honest));
}

#[actix_rt::test]
async fn records_of_calls_made_while_the_broker_is_down_reach_it_once_it_is_back() {
    assert!(Tansu::supports_sqlite(), "this test needs tansu with the libsql feature (scripts/test installs it)");
    let redis = RedisServer::start(&tempdir("tools-outage-redis"), false).unwrap();
    let mut tansu = Tansu::start(&tempdir("tools-outage"), TansuStorage::Sqlite).unwrap();
    let kernel = Kernel::new("recorder");
    // A short produce timeout, so that produces fail during the outage and
    // the recorder has to try them again.
    let config = KafkaConfig { produce_timeout: Duration::from_secs(2), ..KafkaConfig::new(tansu.brokers()) };
    let kafka = KafkaBridge::spawn(&kernel, &Arbiter::new().handle(), config).await.unwrap();
    let (k, registry) = registry("node", &redis, Some(&kafka)).await;
    let tool = SystemTool::new("resize_image", "Resizes", |a: Resize, _| async move { Ok(json!(a.width * a.height)) });
    registry.link::<RegisterTool>("test").ask(RegisterTool(tool)).await.unwrap().unwrap();

    tansu.kill();
    let mut ids = Vec::new();
    for n in 1..=5 {
        let c = ToolCall::new("resize_image", json!({"width": n, "height": 1}), "ada").with_context("outage");
        ids.push(c.call_id.clone());
        // The call does not wait for Kafka.
        let answered = tokio::time::timeout(Duration::from_secs(2), call(&registry, c)).await;
        assert_eq!(answered.expect("answered while the broker is down"), Ok(json!(n)));
    }
    eventually(30, "a produce failed and is being tried again", || {
        Metrics::counter_value(&k.metrics().bus_errors, &["kafka", "tool_record"]) >= 1
    })
    .await;
    tansu.restart().unwrap();

    let records: Arc<Mutex<Vec<KafkaRecord>>> = Arc::default();
    let sink = records.clone();
    let reader = kernel.spawn("reader", move || Records(sink.clone()));
    let consume = Consume {
        group: "tools-outage".into(),
        topics: vec![SEMANTIC_EVENTS.into()],
        subscriber: reader.link("kafka"),
    };
    kafka.link::<Consume>("test").ask(consume).await.unwrap().unwrap();
    let finished = |records: &[KafkaRecord]| -> Vec<String> {
        let mut ids: Vec<String> = records
            .iter()
            .filter(|r| r.envelope.kind == "nexus.tool.finished")
            .filter_map(|r| r.envelope.data["call_id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    let mut expected = ids.clone();
    expected.sort();
    eventually(90, "every call's outcome recorded after the outage", || finished(&records.lock().unwrap()) == expected)
        .await;
    let records = records.lock().unwrap();
    let called = records.iter().filter(|r| r.envelope.kind == "nexus.tool.called").count();
    assert!(called >= 5, "every call recorded too, {called} seen");
    // One context, one partition: in the order the calls were made.
    let mut order: Vec<String> = Vec::new();
    for id in records.iter().filter(|r| r.envelope.kind == "nexus.tool.finished") {
        let id = id.envelope.data["call_id"].as_str().unwrap_or_default().to_owned();
        if !order.contains(&id) {
            order.push(id);
        }
    }
    assert_eq!(order, ids, "in call order");
    assert_eq!(k.metrics().tool_records_dropped.get(), 0, "nothing dropped");
}

#[actix_rt::test]
async fn a_panels_progress_reaches_its_caller_and_its_caller_may_cancel_it_from_any_node() {
    let h = Harness::new("tools-progress").await;
    let (kernel_a, a) = registry("node-a", &h.redis, None).await;
    let (_, b) = registry("node-b", &h.redis, None).await;
    let panel = FakePanel::new("fake");
    let (panel_url, _panel) = panel.serve();
    let id = h.panel("ada").await;
    let (sidecar_url, _sidecar) = h.sidecar(&id, &panel_url, |_| {}).await;
    *panel.sidecar.lock().unwrap() = sidecar_url.clone();
    let report = format!("{id}.report");
    wait_listed(&a, "ada", &report).await;
    let mut pubsub = redis::Client::open(h.redis.url()).unwrap().get_async_pubsub().await.unwrap();
    pubsub.psubscribe("nexus:tools:replies:*").await.unwrap();
    let mut replies = pubsub.into_on_message();

    let (progress, mut reports) = tokio::sync::mpsc::channel(8);
    let call = ToolCall::new(&report, json!({}), "ada").with_timeout(Duration::from_secs(60));
    let call_id = call.call_id.clone();
    let cancel = tokio_util::sync::CancellationToken::new();
    let watched = CallToolWatched { call, progress: Some(progress), cancel, label: Some("7".into()) };
    let link = a.link::<CallToolWatched>("test");
    let running = actix::spawn(async move { link.ask(watched).await.unwrap() });
    let mut seen = Vec::new();
    for _ in 0..3 {
        let report = tokio::time::timeout(Duration::from_secs(10), reports.recv()).await.unwrap().unwrap();
        assert_eq!(report.call_id, call_id);
        seen.push((report.progress, report.total, report.message.unwrap()));
    }
    let step = |n: f64| (n, Some(3.0), format!("step {n}"));
    assert_eq!(seen, [step(1.0), step(2.0), step(3.0)]);
    let reply_channel = replies.next().await.unwrap().get_channel_name().to_owned();

    // Reports must name a call the sidecar runs, and be sane.
    let client = reqwest::Client::new();
    let post = |body: String| {
        let request =
            client.post(format!("{sidecar_url}/progress")).header("content-type", "application/json").body(body);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap()["error"].clone())
        }
    };
    let unknown = json!({"call_id": "not-running", "progress": 1}).to_string();
    assert_eq!(post(unknown).await, (404, json!("unknown_call")));
    let long = json!({"call_id": call_id, "progress": 1, "message": "x".repeat(1025)}).to_string();
    assert_eq!(post(long).await, (400, json!("bad_progress")));
    assert_eq!(post(json!({"call_id": call_id, "progress": "1"}).to_string()).await, (400, json!("bad_json")));
    assert_eq!(post(format!(r#"{{"call_id": "{call_id}", "progress": 1e400}}"#)).await.0, 400, "not a finite number");
    let huge = json!({"call_id": call_id, "progress": 1, "pad": "x".repeat(5000)}).to_string();
    assert_eq!(post(huge).await.0, 413);

    // Nobody but ada cancels ada's call, and only by its name.
    let cancel_on = |registry: &ActorRef<ToolRegistry>, caller: &str, label: &str| {
        let cancel = CancelCall { caller: caller.into(), label: label.into() };
        let link = registry.link::<CancelCall>("test");
        async move { link.ask(cancel).await.unwrap() }
    };
    assert_eq!(cancel_on(&b, "bob", "7").await, Ok(0));
    assert_eq!(cancel_on(&b, "ada", "8").await, Ok(0));
    actix::clock::sleep(Duration::from_millis(200)).await;
    assert!(!running.is_finished(), "the call still runs");

    // Ada cancels it through node b: node a's caller gets `cancelled` at
    // once, and the sidecar drops the panel's request.
    assert_eq!(cancel_on(&b, "ada", "7").await, Ok(1));
    let outcome = tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap();
    assert_eq!(outcome, Err(ToolError::Cancelled));
    assert_eq!(exec_count(&kernel_a, "panel", "cancelled"), 1);
    let aborted = |n: u32| {
        let (url, line) =
            (format!("{sidecar_url}/metrics"), format!("nexus_sidecar_calls_total{{outcome=\"cancelled\"}} {n}"));
        async move {
            for _ in 0..100 {
                let metrics = reqwest::get(&url).await.unwrap().text().await.unwrap();
                if metrics.contains(&line) {
                    return;
                }
                actix::clock::sleep(Duration::from_millis(50)).await;
            }
            panic!("the sidecar never counted {line}");
        }
    };
    aborted(1).await;
    let after = json!({"call_id": call_id, "progress": 4}).to_string();
    assert_eq!(post(after).await, (404, json!("unknown_call")), "the panel learns its call is over");
    for _ in 0..100 {
        if cancel_on(&b, "ada", "7").await == Ok(0) {
            break;
        }
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cancel_on(&b, "ada", "7").await, Ok(0), "an ended call's name is forgotten");

    // A caller that stops waiting cancels too.
    let cancel = tokio_util::sync::CancellationToken::new();
    let call = ToolCall::new(&report, json!({}), "ada");
    let watched = CallToolWatched { call, progress: None, cancel: cancel.clone(), label: None };
    let link = a.link::<CallToolWatched>("test");
    let running = actix::spawn(async move { link.ask(watched).await.unwrap() });
    actix::clock::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(5), running).await.unwrap().unwrap();
    assert_eq!(outcome, Err(ToolError::Cancelled));
    aborted(2).await;

    // An answer nobody waits for any more is dropped, and counted.
    let late = |kernel: &Kernel| Metrics::counter_value(&kernel.metrics().tool_late_answers, &["caller"]);
    let before = late(&kernel_a);
    let answer = ToolResponse { call_id: "long-gone".into(), outcome: Outcome::Result(json!("late")) };
    let envelope = Envelope::new("test", answer).into_untyped();
    let mut conn = redis::Client::open(h.redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::AsyncCommands::publish(&mut conn, &reply_channel, serde_json::to_string(&envelope).unwrap())
        .await
        .unwrap();
    eventually(5, "the late answer is counted", || late(&kernel_a) == before + 1).await;
}

#[actix_rt::test]
async fn a_panels_prompts_are_its_owners_and_go_with_its_manifest() {
    let h = Harness::new("tools-prompts").await;
    let (_, registry) = registry("node", &h.redis, None).await;
    let panel = FakePanel::new("fake");
    let (panel_url, _panel) = panel.serve();
    let id = h.panel("ada").await;
    let (sidecar_url, _sidecar) = h.sidecar(&id, &panel_url, |_| {}).await;
    wait_listed(&registry, "ada", &format!("{id}.echo")).await;
    let list = |user: &str| {
        let link = registry.link::<ListPrompts>("test");
        let user = user.to_owned();
        async move { link.ask(ListPrompts { user }).await.unwrap().unwrap().into_iter().map(|(n, _)| n).collect::<Vec<_>>() }
    };
    let get = |user: &str, name: &str, arguments: Value| {
        let link = registry.link::<GetPrompt>("test");
        let get = GetPrompt { user: user.into(), name: name.into(), arguments: arguments.as_object().unwrap().clone() };
        async move { link.ask(get).await.unwrap() }
    };
    let greet = format!("{id}.greet");
    assert_eq!(list("ada").await, std::slice::from_ref(&greet));
    assert!(list("bob").await.is_empty(), "another user's panel offers bob no prompts");

    let (description, messages) = get("ada", &greet, json!({"who": "Ada"})).await.unwrap();
    assert_eq!(description.as_deref(), Some("Greets someone"));
    assert_eq!(messages, [(PromptRole::User, "Greet Ada.".to_owned())]);
    assert!(matches!(get("bob", &greet, json!({"who": "Bob"})).await, Err(GetPromptError::NotFound(_))));
    assert!(matches!(get("ada", &greet, json!({})).await, Err(GetPromptError::Render(_))));
    assert!(matches!(get("ada", &format!("{id}.nope"), json!({})).await, Err(GetPromptError::NotFound(_))));
    assert!(matches!(get("ada", "greet", json!({})).await, Err(GetPromptError::NotFound(_))));

    // A prompt that does not compile refuses the manifest; the last good one stays.
    let tools = json!([{"name": "echo", "desc": "Echoes"}]);
    let broken = json!([{"name": "greet", "messages": [{"role": "user", "text": "Hi {{ nobody }}"}]}]);
    panel.set_manifest(json!({"tools": tools, "prompts": broken}));
    let reload = || async { reqwest::Client::new().post(format!("{sidecar_url}/reload")).send().await.unwrap() };
    let refused = reload().await;
    assert_eq!(refused.status().as_u16(), 422);
    assert!(refused.text().await.unwrap().contains("prompt \\\"greet\\\" is not valid"));
    assert_eq!(list("ada").await, std::slice::from_ref(&greet));

    // A panel of prompts and no tools stays listed while its sidecar keeps it.
    let only = json!([{"name": "greet", "arguments": [{"name": "who"}], "messages": [{"role": "user", "text": "Hi {{who}}"}]}]);
    panel.set_manifest(json!({"tools": [], "prompts": only}));
    assert_eq!(reload().await.status().as_u16(), 200);
    names(&registry, "ada").await;
    assert_eq!(list("ada").await, std::slice::from_ref(&greet), "not pruned for want of tools");

    // A manifest without prompts takes them away.
    panel.set_manifest(json!({"tools": tools}));
    assert_eq!(reload().await.status().as_u16(), 200);
    assert!(list("ada").await.is_empty());
}

#[actix_rt::test]
async fn a_panels_declared_resources_are_its_owners_and_read_through_its_sidecar() {
    let h = Harness::new("tools-resources").await;
    let (_, registry) = registry("node", &h.redis, None).await;
    let panel = FakePanel::new("fake");
    let (panel_url, _panel) = panel.serve();
    let id = h.panel("ada").await;
    let (_sidecar_url, _sidecar) = h.sidecar(&id, &panel_url, |_| {}).await;
    wait_listed(&registry, "ada", &format!("{id}.echo")).await;
    let list = |user: &str| {
        let link = registry.link::<ListPanelResources>("test");
        let user = user.to_owned();
        async move {
            let listed = link.ask(ListPanelResources { user }).await.unwrap().unwrap();
            listed.into_iter().map(|(panel, r)| format!("{panel}/{}", r.uri)).collect::<Vec<_>>()
        }
    };
    let read = |user: &str, panel: &str, uri: &str| {
        let link = registry.link::<ReadPanelResource>("test");
        let cancel = tokio_util::sync::CancellationToken::new();
        let read = ReadPanelResource { user: user.into(), panel: panel.into(), uri: uri.into(), cancel };
        async move { link.ask(read).await.unwrap() }
    };
    assert_eq!(list("ada").await, [format!("{id}/binary"), format!("{id}/elsewhere"), format!("{id}/notes/today")]);
    assert!(list("bob").await.is_empty(), "another user's panel offers bob no resources");

    let (resource, text) = read("ada", &id, "notes/today").await.unwrap();
    assert_eq!((resource.mime_type.as_str(), text.as_str()), ("text/markdown", "# Today at fake"));
    assert!(matches!(read("bob", &id, "notes/today").await, Err(ReadResourceError::NotFound)));
    assert!(matches!(read("ada", &id, "undeclared").await, Err(ReadResourceError::NotFound)));
    assert!(matches!(read("ada", "no-such-panel", "notes/today").await, Err(ReadResourceError::NotFound)));
    let binary = read("ada", &id, "binary").await;
    assert!(matches!(binary, Err(ReadResourceError::Panel(ToolError::InvalidResponse { .. }))), "{binary:?}");
    let moved = read("ada", &id, "elsewhere").await;
    assert!(matches!(moved, Err(ReadResourceError::Panel(ToolError::PanelStatus { status: 302, .. }))), "{moved:?}");
}
