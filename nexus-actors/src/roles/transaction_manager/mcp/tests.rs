//! `/mcp` through actix-web's test service, on a Redis of the test's own.

use actix_web::{test as web_test, App};
use serde_json::json;

use actix_web::http::header::HeaderValue;
use actix_web::http::StatusCode;
use bytes::Bytes;
use tower_service::Service as _;

use super::bridge::{cancelled_request, to_actix_response, to_http_request};
use super::*;
use crate::infra::RedisServer;
use crate::kernel::{Behaviour, Ctx, Handler, Kernel, Reply};
use crate::platform::auth::keys::{KeyRing, KeySet};
use crate::platform::auth::{Audience, Auth};
use crate::platform::store::Redis;
use crate::platform::{Accounts, UserRole};
use crate::tools::prompts::Prompt;
use crate::tools::protocol::ToolProgress;
use crate::tools::registry::{
    CallTool, CallToolWatched, CancelCall, GetPrompt, GetPromptError, ListPanelResources, ListPrompts, ListTools,
    ReadPanelResource, ReadResourceError, RenderedPrompt,
};
use crate::tools::resources::PanelResource;
use crate::tools::ToolOwner;

/// A registry with one system tool, `echo`, that returns its arguments
/// (or fails with `tool_error` when they contain `fail`).
struct FakeRegistry;

impl Behaviour for FakeRegistry {
    const KIND: &'static str = "fake_registry";
}

impl Handler<ListTools> for FakeRegistry {
    fn handle(&mut self, msg: ListTools, _: &mut Ctx<Self>) -> Reply<Result<Vec<ToolSpec>, ToolError>> {
        let echo = ToolSpec {
            name: "echo".into(),
            description: format!("echoes, for {}", msg.user),
            input_schema: json!({"properties": {"text": {"type": "string"}}}),
            owner: ToolOwner::System,
        };
        Reply::Now(Ok(vec![echo]))
    }
}

fn answer(call: &ToolCall) -> Result<Value, ToolError> {
    match call.tool.as_str() {
        "echo" if call.arguments.get("fail").is_some() => Err(ToolError::failed("asked to fail")),
        "echo" => Ok(json!({"caller": call.caller, "arguments": call.arguments})),
        tool => Err(ToolError::NotFound { tool: tool.to_owned() }),
    }
}

impl Handler<CallTool> for FakeRegistry {
    fn handle(&mut self, CallTool(call): CallTool, _: &mut Ctx<Self>) -> Reply<Result<Value, ToolError>> {
        Reply::Now(answer(&call))
    }
}

/// `echo` as [`CallTool`] has it; `steps` reports progress 1, 2, 2 (not
/// news), 3 of 3 before it answers.
impl Handler<CallToolWatched> for FakeRegistry {
    fn handle(&mut self, watched: CallToolWatched, _: &mut Ctx<Self>) -> Reply<Result<Value, ToolError>> {
        if watched.call.tool != "steps" {
            return Reply::Now(answer(&watched.call));
        }
        Reply::later(async move {
            let call_id = watched.call.call_id.clone();
            for (progress, message) in [(1.0, None), (2.0, Some("halfway")), (2.0, None), (3.0, None)] {
                let report = ToolProgress {
                    call_id: call_id.clone(),
                    progress,
                    total: Some(3.0),
                    message: message.map(Into::into),
                };
                if let Some(to) = &watched.progress {
                    let _ = to.send(report).await;
                }
            }
            Ok(json!({"steps": 3}))
        })
    }
}

/// One prompt, `p1.greet`, of every user's one panel.
fn greet() -> Prompt {
    serde_json::from_value(json!({"name": "greet", "description": "Greets",
        "arguments": [{"name": "who", "required": true}],
        "messages": [{"role": "user", "text": "Greet {{ who }}."}]}))
    .expect("a prompt")
}

impl Handler<ListPrompts> for FakeRegistry {
    fn handle(&mut self, _: ListPrompts, _: &mut Ctx<Self>) -> Reply<Result<Vec<(String, Prompt)>, ToolError>> {
        Reply::Now(Ok(vec![("p1.greet".into(), greet())]))
    }
}

impl Handler<GetPrompt> for FakeRegistry {
    fn handle(&mut self, msg: GetPrompt, _: &mut Ctx<Self>) -> Reply<Result<RenderedPrompt, GetPromptError>> {
        Reply::Now(match msg.name.as_str() {
            "p1.greet" => greet().render(&msg.arguments).map(|m| (Some("Greets".into()), m)).map_err(Into::into),
            name => Err(GetPromptError::NotFound(name.into())),
        })
    }
}

/// The panel whose resources the fake registry knows.
const P1: &str = "0191f3c2-7d1e-7a2b-9c1d-5e6f7a8b9c0d";

/// Every user's one panel [`P1`] declares `notes/today` (markdown).
fn today() -> PanelResource {
    serde_json::from_value(json!({"uri": "notes/today", "name": "Today", "mimeType": "text/markdown"}))
        .expect("a resource")
}

impl Handler<ListPanelResources> for FakeRegistry {
    fn handle(
        &mut self,
        _: ListPanelResources,
        _: &mut Ctx<Self>,
    ) -> Reply<Result<Vec<(String, PanelResource)>, ToolError>> {
        Reply::Now(Ok(vec![(P1.into(), today())]))
    }
}

impl Handler<ReadPanelResource> for FakeRegistry {
    fn handle(
        &mut self,
        msg: ReadPanelResource,
        _: &mut Ctx<Self>,
    ) -> Reply<Result<(PanelResource, String), ReadResourceError>> {
        Reply::Now(match (msg.panel.as_str(), msg.uri.as_str()) {
            (P1, "notes/today") => Ok((today(), format!("# Today, for {}", msg.user))),
            (P1, "down") => {
                Err(ToolError::PanelUnavailable { owner: "panel p1".into(), message: "gone".into() }.into())
            }
            _ => Err(ReadResourceError::NotFound),
        })
    }
}

impl Handler<CancelCall> for FakeRegistry {
    fn handle(&mut self, _: CancelCall, _: &mut Ctx<Self>) -> Reply<Result<usize, ToolError>> {
        Reply::Now(Ok(0))
    }
}

fn tools_api() -> ToolsApi {
    let kernel = Kernel::new("test");
    let registry = kernel.spawn("registry", || FakeRegistry);
    ToolsApi {
        call: registry.link("mcp"),
        watched: registry.link("mcp"),
        cancel: registry.link("mcp"),
        list: registry.link("mcp"),
        prompts: registry.link("mcp"),
        prompt: registry.link("mcp"),
        panel_resources: registry.link("mcp"),
        read_resource: registry.link("mcp"),
    }
}

/// The `/mcp` endpoint over the fake registry and `documents`, under the
/// node rules `policy`, with `auth` checking tokens.
macro_rules! mcp_app {
    ($auth:expr, $documents:expr, $policy:expr) => {
        web_test::init_service(App::new().app_data(web::Data::new($auth)).configure(configure(
            tools_api(),
            $documents,
            None,
            Sessions::new(&Kernel::new("test"), None, &crate::platform::drain::Drain::default()),
            $policy,
        )))
        .await
    };
}

/// A Redis of the test's own with the users `ada` and `bob`, tokens over
/// it, and `ada`'s token.
async fn auth(name: &str) -> (RedisServer, Auth, String) {
    let dir = std::env::temp_dir().join(format!("nexus-mcp-{name}-{}", std::process::id()));
    let redis = RedisServer::start(&dir, false).expect("redis-server starts");
    let accounts = Accounts::connect(&redis.url()).await.expect("redis answers");
    accounts.set("ada", "no-login", UserRole::User).await.expect("stored");
    accounts.set("bob", "no-login", UserRole::User).await.expect("stored");
    let auth = Auth::new(KeyRing::new(KeySet::generate()), accounts);
    let (token, _) = auth.issue("ada", &Audience::Api).await.expect("a token");
    (redis, auth, token)
}

/// The documents in `redis`.
async fn documents(redis: &RedisServer) -> Documents {
    Documents::new(Redis::connect(&redis.url()).await.expect("redis answers"))
}

/// The rules of a node listening on every address.
fn anywhere() -> OriginPolicy {
    OriginPolicy::for_listener("0.0.0.0:7070".parse().expect("an address"), Vec::new())
}

#[actix_rt::test]
async fn a_rebound_name_or_a_foreign_page_is_refused_before_authentication() {
    let (redis, auth, token) = auth("rebinding").await;
    let loopback = OriginPolicy::for_listener("127.0.0.1:7070".parse().expect("an address"), Vec::new());
    let app = mcp_app!(auth, documents(&redis).await, loopback);
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    for (host, origin) in [("evil.example.com", None), ("localhost:7070", Some("http://evil.example.com"))] {
        let mut req = rpc(Some(&token), init.clone()).insert_header(("Host", host));
        if let Some(origin) = origin {
            req = req.insert_header(("Origin", origin));
        }
        let resp = web_test::call_service(&app, req.to_request()).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{host} {origin:?}");
        let body: Value = web_test::read_body_json(resp).await;
        assert_eq!(body["error"], "forbidden_origin");
    }
    let anonymous = rpc(None, init.clone()).insert_header(("Host", "evil.example.com")).to_request();
    assert_eq!(web_test::call_service(&app, anonymous).await.status(), StatusCode::FORBIDDEN, "before the token");
    let own = rpc(Some(&token), init)
        .insert_header(("Host", "localhost:7070"))
        .insert_header(("Origin", "http://localhost:7070"))
        .to_request();
    assert_eq!(web_test::call_service(&app, own).await.status(), StatusCode::OK);
}

fn rpc(token: Option<&str>, body: Value) -> web_test::TestRequest {
    rpc_as("2025-06-18", token, body)
}

/// [`rpc`] for protocol revision `version` (named in the body only, by
/// `initialize`, as clients do before they know the server's).
fn rpc_as(version: &str, token: Option<&str>, body: Value) -> web_test::TestRequest {
    let mut req = web_test::TestRequest::post()
        .uri(PATH)
        .insert_header(("Host", "nexus.example.com"))
        .insert_header(("Accept", "application/json, text/event-stream"))
        .insert_header(("Content-Type", "application/json"))
        .set_payload(body.to_string());
    if body["method"] != "initialize" {
        req = req.insert_header(("MCP-Protocol-Version", version));
    }
    // 2026-07-28 names the method, and what it acts on, in headers too.
    if let Some(method) = body["method"].as_str().filter(|_| version >= "2026") {
        req = req.insert_header(("Mcp-Method", method.to_owned()));
        if let Some(name) = body["params"]["uri"].as_str().or(body["params"]["name"].as_str()) {
            req = req.insert_header(("Mcp-Name", name.to_owned()));
        }
    }
    if let Some(token) = token {
        req = req.insert_header(("Authorization", format!("Bearer {token}")));
    }
    req
}

#[actix_rt::test]
async fn serves_tools_to_the_authenticated_user() {
    let (redis, auth, token) = auth("serves").await;
    let app_auth = auth.clone();
    let docs = documents(&redis).await;
    let own = uuid::Uuid::now_v7().to_string();
    docs.create(&own, "ada", &json!({"n": 0}), 1000).await.expect("created");
    let app = mcp_app!(auth, docs, anywhere());

    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let resp = web_test::call_service(&app, rpc(None, init.clone()).to_request()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers().get("www-authenticate").unwrap(), "Bearer");
    let body: Value = web_test::read_body_json(resp).await;
    assert_eq!(body["error"], "unauthorized");

    let resp = web_test::call_service(&app, rpc(Some("not.a.token"), init.clone()).to_request()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    let resp = web_test::call_service(&app, rpc(Some(&token), init).to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let session = resp.headers().get("mcp-session-id").expect("initialize begins a session").clone();
    let body = answer_of(resp).await;
    assert_eq!(body["result"]["serverInfo"]["name"], "nexus");
    assert_eq!(body["result"]["protocolVersion"], "2025-06-18");
    assert!(body["result"]["capabilities"]["tools"].is_object());

    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let body: Value = web_test::call_and_read_body_json(&app, rpc(Some(&token), list).to_request()).await;
    let tools = body["result"]["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0]["name"], "echo");
    assert_eq!(tools[0]["description"], "echoes, for ada");
    assert_eq!(tools[0]["inputSchema"]["type"], "object");

    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hi"}}});
    let body: Value = web_test::call_and_read_body_json(&app, rpc(Some(&token), call).to_request()).await;
    let result = &body["result"];
    assert_eq!(result["isError"], false);
    assert_eq!(result["structuredContent"], json!({"caller": "ada", "arguments": {"text": "hi"}}));
    let text: Value = serde_json::from_str(result["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(text, result["structuredContent"]);

    for (id, params, expected) in [
        (4, json!({"name": "echo", "arguments": {"fail": true}}), "tool_error: asked to fail"),
        (5, json!({"name": "nope"}), "not_found: no tool named \"nope\" is available to you"),
    ] {
        let call = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params});
        let body: Value = web_test::call_and_read_body_json(&app, rpc(Some(&token), call).to_request()).await;
        assert_eq!(body["result"]["isError"], true, "{body}");
        assert_eq!(body["result"]["content"][0]["text"], expected);
    }

    let get = web_test::TestRequest::get()
        .uri(PATH)
        .insert_header(("Host", "nexus.example.com"))
        .insert_header(("Accept", "text/event-stream"))
        .insert_header(("Authorization", format!("Bearer {token}")))
        .to_request();
    let resp = web_test::call_service(&app, get).await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "a stream needs a session");

    // The session is ada's: bob's token does not reach it, nor an unknown id.
    let (bobs, _) = app_auth.issue("bob", &Audience::Api).await.expect("a token");
    let in_session = |token: &str, id: &HeaderValue, body: Value| {
        rpc(Some(token), body).insert_header(("Mcp-Session-Id", id.clone())).to_request()
    };
    let list = json!({"jsonrpc": "2.0", "id": 6, "method": "tools/list"});
    let resp = web_test::call_service(&app, in_session(&bobs, &session, list.clone())).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "bob cannot use ada's session");
    let unknown = HeaderValue::from_static("00000000-0000-7000-8000-000000000000");
    let resp = web_test::call_service(&app, in_session(&token, &unknown, list.clone())).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let resp = web_test::call_service(&app, in_session(&token, &session, list.clone())).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(answer_of(resp).await["result"]["tools"][0]["name"], "echo");
    // Subscribing needs a session, and a node that follows documents
    // (this one has no Redis bridge); a missing document is not found first.
    let subscribe =
        |uri: String| json!({"jsonrpc": "2.0", "id": 7, "method": "resources/subscribe", "params": {"uri": uri}});
    let missing = subscribe(format!("nexus://documents/{}", uuid::Uuid::now_v7()));
    let resp = web_test::call_service(&app, in_session(&token, &session, missing)).await;
    assert_eq!(answer_of(resp).await["error"]["code"], -32002);
    let mine = subscribe(format!("nexus://documents/{own}"));
    let resp = web_test::call_service(&app, in_session(&token, &session, mine.clone())).await;
    let body = answer_of(resp).await;
    assert_eq!(body["error"]["message"], "this node follows no documents", "{body}");
    let body: Value = web_test::call_and_read_body_json(&app, rpc(Some(&token), mine).to_request()).await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("needs a session"), "{body}");

    // Ended by DELETE, by its owner only.
    let delete = |token: &str| {
        web_test::TestRequest::delete()
            .uri(PATH)
            .insert_header(("Host", "nexus.example.com"))
            .insert_header(("Authorization", format!("Bearer {token}")))
            .insert_header(("Mcp-Session-Id", session.clone()))
            .to_request()
    };
    assert_eq!(web_test::call_service(&app, delete(&bobs)).await.status(), StatusCode::NOT_FOUND);
    assert!(web_test::call_service(&app, delete(&token)).await.status().is_success());
    let resp = web_test::call_service(&app, in_session(&token, &session, list)).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "an ended session is unknown");
}

/// The body of an answer that may be JSON or an SSE stream: its JSON-RPC message.
async fn answer_of(resp: actix_web::dev::ServiceResponse) -> Value {
    let body = web_test::read_body(resp).await;
    if let Ok(message) = serde_json::from_slice(&body) {
        return message;
    }
    let text = std::str::from_utf8(&body).expect("UTF-8");
    let mut data = text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).filter(|d| !d.is_empty());
    serde_json::from_str(data.next_back().unwrap_or_else(|| panic!("an event in {text:?}")))
        .expect("a JSON-RPC message")
}

#[actix_rt::test]
async fn refuses_bodies_over_the_limit() {
    let (redis, auth, token) = auth("limit").await;
    let app = mcp_app!(auth, documents(&redis).await, anywhere());
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "x".repeat(MAX_BODY)}}});
    let resp = web_test::call_service(&app, rpc(Some(&token), big).to_request()).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = web_test::read_body_json(resp).await;
    assert_eq!(body["error"], "too_large");
}

#[actix_rt::test]
async fn streams_sse_answers() {
    // The endpoint answers JSON; make rmcp choose SSE to exercise streaming.
    let config = StreamableHttpServerConfig::default().with_legacy_session_mode(false).disable_allowed_hosts();
    let (redis, _, _) = auth("sse").await;
    let handler = NexusMcp {
        tools: tools_api(),
        resources: DocumentResources::new(documents(&redis).await),
        listens: None,
        sessions: Sessions::new(&Kernel::new("test"), None, &crate::platform::drain::Drain::default()),
    };
    let mut service =
        StreamableHttpService::new(move || Ok(handler.clone()), Arc::new(NeverSessionManager::default()), config);
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hi"}}});
    let req = rpc(None, call.clone()).to_http_request();
    let request = to_http_request(&req, Bytes::from(call.to_string()), McpUser("ada".into())).unwrap();
    let response = match service.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let response = to_actix_response(response, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("content-type").unwrap().to_str().unwrap().starts_with("text/event-stream"));
    let body = actix_web::body::to_bytes(response.into_body()).await.unwrap();
    let text = std::str::from_utf8(&body).unwrap();
    let data = text.lines().find_map(|l| l.strip_prefix("data:").filter(|d| !d.trim().is_empty())).unwrap();
    let message: Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(message["id"], 7);
    assert_eq!(message["result"]["structuredContent"]["caller"], "ada");
}

#[actix_rt::test]
async fn progress_reaches_a_caller_that_asked_for_it_and_only_when_it_grows() {
    let (redis, auth, token) = auth("progress").await;
    let app = mcp_app!(auth, documents(&redis).await, anywhere());
    let call = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "steps", "_meta": {"progressToken": "p-1"}}});
    let resp = web_test::call_service(&app, rpc(Some(&token), call).to_request()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("content-type").unwrap().to_str().unwrap().starts_with("text/event-stream"));
    let body = web_test::read_body(resp).await;
    let messages: Vec<Value> = std::str::from_utf8(&body)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data:").filter(|d| !d.trim().is_empty()))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    let reports: Vec<(f64, Value)> = messages
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .map(|m| {
            assert_eq!(m["params"]["progressToken"], "p-1");
            assert_eq!(m["params"]["total"], 3.0);
            (m["params"]["progress"].as_f64().unwrap(), m["params"]["message"].clone())
        })
        .collect();
    assert_eq!(reports, [(1.0, Value::Null), (2.0, json!("halfway")), (3.0, Value::Null)], "{messages:?}");
    let last = messages.last().unwrap();
    assert_eq!((&last["id"], &last["result"]["structuredContent"]), (&json!(9), &json!({"steps": 3})));

    // Without a token the same call answers plain JSON, with no reports.
    let call = json!({"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {"name": "steps"}});
    let body: Value = web_test::call_and_read_body_json(&app, rpc(Some(&token), call).to_request()).await;
    assert_eq!(body["result"]["structuredContent"], json!({"steps": 3}));
}

#[actix_rt::test]
async fn prompts_are_listed_and_rendered_and_bad_arguments_are_invalid_params() {
    let (redis, auth, token) = auth("prompts").await;
    let app = mcp_app!(auth, documents(&redis).await, anywhere());
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "prompts/list"});
    let body: Value = web_test::call_and_read_body_json(&app, rpc(Some(&token), list).to_request()).await;
    let prompts = body["result"]["prompts"].as_array().expect("prompts");
    // The platform's system prompts first, then the panels'.
    let system = crate::roles::transaction_manager::system_prompts::ALL;
    for (listed, prompt) in prompts.iter().zip(system) {
        assert_eq!(listed["name"], prompt.name);
        assert_eq!(listed["description"], prompt.description);
        assert!(listed.get("arguments").is_none(), "{listed}");
    }
    let greet = &prompts[system.len()];
    assert_eq!(greet["name"], "p1.greet", "{body}");
    assert_eq!(greet["description"], "Greets");
    assert_eq!(greet["arguments"], json!([{"name": "who", "required": true}]));
    assert_eq!(prompts.len(), system.len() + 1);

    let get = |id: u32, params: Value| json!({"jsonrpc": "2.0", "id": id, "method": "prompts/get", "params": params});
    let ada = get(2, json!({"name": "p1.greet", "arguments": {"who": "Ada"}}));
    let body: Value = web_test::call_and_read_body_json(&app, rpc(Some(&token), ada).to_request()).await;
    assert_eq!(body["result"]["description"], "Greets");
    assert_eq!(
        body["result"]["messages"],
        json!([{"role": "user", "content": {"type": "text", "text": "Greet Ada."}}])
    );
    let assistant = get(6, json!({"name": "assistant"}));
    let body: Value = web_test::call_and_read_body_json(&app, rpc(Some(&token), assistant).to_request()).await;
    let text = body["result"]["messages"][0]["content"]["text"].as_str().unwrap_or_default();
    assert!(text.starts_with("You are the assistant of a Nexus Graph Studio workspace"), "{body}");
    for (id, params) in [
        (3, json!({"name": "p1.greet"})),
        (4, json!({"name": "p1.greet", "arguments": {"who": 7}})),
        (5, json!({"name": "p1.nope", "arguments": {"who": "Ada"}})),
    ] {
        let body: Value =
            web_test::call_and_read_body_json(&app, rpc(Some(&token), get(id, params)).to_request()).await;
        assert_eq!(body["error"]["code"], -32602, "{body}");
    }
}

#[actix_rt::test]
async fn panels_resources_are_listed_first_and_read_through_the_registry() {
    let (redis, auth, token) = auth("panel-resources").await;
    let app = mcp_app!(auth, documents(&redis).await, anywhere());
    let rpc_call = |id: u32, method: &str, params: Value| {
        rpc(Some(&token), json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})).to_request()
    };
    let body: Value = web_test::call_and_read_body_json(&app, rpc_call(1, "resources/list", json!({}))).await;
    let first = &body["result"]["resources"][0];
    assert_eq!(first["uri"], format!("nexus://panels/{P1}/notes/today"), "{body}");
    assert_eq!((&first["name"], &first["mimeType"]), (&json!("Today"), &json!("text/markdown")));

    let read = |id: u32, uri: &str| rpc_call(id, "resources/read", json!({"uri": uri}));
    let body: Value =
        web_test::call_and_read_body_json(&app, read(2, &format!("nexus://panels/{P1}/notes/today"))).await;
    let contents = &body["result"]["contents"][0];
    assert_eq!(contents["text"], "# Today, for ada", "{body}");
    assert_eq!(contents["mimeType"], "text/markdown");
    for (id, path, code) in [
        (3, format!("{P1}/secret"), -32002),
        (4, format!("{}/notes/today", uuid::Uuid::now_v7()), -32002),
        (5, format!("{P1}/../notes/today"), -32002),
        (6, format!("{P1}:x/notes/today"), -32002),
        (7, format!("{P1}/down"), -32603),
    ] {
        let uri = format!("nexus://panels/{path}");
        let body: Value = web_test::call_and_read_body_json(&app, read(id, &uri)).await;
        assert_eq!(body["error"]["code"], code, "{uri}: {body}");
    }
}

#[test]
fn a_cancellation_names_its_request_as_the_call_was_named() {
    let cancel = |params: Value| {
        let note = json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params});
        cancelled_request(note.to_string().as_bytes())
    };
    assert_eq!(cancel(json!({"requestId": 7, "reason": "user"})), call_label(&RequestId::Number(7)));
    assert_eq!(cancel(json!({"requestId": "a\"b"})), call_label(&RequestId::String("a\"b".into())));
    assert_eq!(cancel(json!({"requestId": 7})).as_deref(), Some("7"));
    assert_eq!(cancel(json!({"requestId": "x".repeat(MAX_LABEL)})), None, "too long to be a label");
    assert_eq!(cancel(json!({"requestId": {"nested": 1}})), None);
    assert_eq!(cancel(json!({})), None);
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "notifications/cancelled", "params": {"requestId": 7}});
    assert_eq!(cancelled_request(request.to_string().as_bytes()), None, "a request is not the notification");
    let mention = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "notifications/cancelled"}}});
    assert_eq!(cancelled_request(mention.to_string().as_bytes()), None);
    assert_eq!(cancelled_request(b"notifications/cancelled {garbage"), None);
    let escaped = br#"{"jsonrpc":"2.0","method":"notifications\/cancelled","params":{"requestId":3}}"#;
    assert_eq!(cancelled_request(escaped).as_deref(), Some("3"), "a slash JSON-escaped");
}

#[test]
fn results_map_to_mcp() {
    let text = tool_result(Ok(json!("plain")));
    assert_eq!(text.content[0].as_text().unwrap().text, "plain");
    assert_eq!(text.structured_content, None);
    let list = tool_result(Ok(json!([1, 2])));
    assert_eq!(list.content[0].as_text().unwrap().text, "[1,2]");
    assert_eq!(list.structured_content, None);
    let error = tool_result(Err(ToolError::Timeout { timeout_ms: 5 }));
    assert_eq!(error.is_error, Some(true));
    assert_eq!(error.content[0].as_text().unwrap().text, "timeout: no answer within the deadline of 5 ms");
}

/// The documents of a `resources/list` answer, without the panels' resources.
fn documents_in(answer: &Value) -> Vec<Value> {
    let listed = answer["result"]["resources"].as_array().expect("resources");
    listed.iter().filter(|r| r["uri"].as_str().is_some_and(|u| u.starts_with(resources::PREFIX))).cloned().collect()
}

#[actix_rt::test]
async fn documents_are_resources_of_their_owner_only() {
    let (redis, auth, ada) = auth("resources").await;
    let (bob, _) = auth.issue("bob", &Audience::Api).await.expect("a token");
    let docs = documents(&redis).await;
    let mut own = Vec::new();
    for n in 0..resources::PAGE + 5 {
        let id = uuid::Uuid::now_v7().to_string();
        docs.create(&id, "ada", &json!({"n": n}), 1000).await.expect("created");
        own.push(id);
    }
    let foreign = uuid::Uuid::now_v7().to_string();
    docs.create(&foreign, "bob", &json!({"secret": true}), 1000).await.expect("created");
    let app = mcp_app!(auth, docs, anywhere());
    let call = |token: &str, method: &str, params: Value| {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        web_test::call_and_read_body_json::<_, _, Value>(&app, rpc(Some(token), body).to_request())
    };

    let hello = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
        "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let init = answer_of(web_test::call_service(&app, rpc(Some(&ada), hello).to_request()).await).await;
    for capability in ["resources", "completions", "logging", "tools"] {
        assert!(init["result"]["capabilities"][capability].is_object(), "{capability}: {init}");
    }

    // Two pages, in id order, exactly the caller's documents.
    let first = call(&ada, "resources/list", json!({})).await;
    let page = documents_in(&first);
    assert_eq!(page.len(), resources::PAGE);
    let cursor = first["result"]["nextCursor"].as_str().expect("a next page");
    let second = call(&ada, "resources/list", json!({"cursor": cursor})).await;
    assert!(second["result"].get("nextCursor").is_none(), "{second}");
    let listed: Vec<String> = page
        .iter()
        .chain(second["result"]["resources"].as_array().expect("resources"))
        .map(|r| r["uri"].as_str().expect("a uri").to_owned())
        .collect();
    let mut expected: Vec<String> = own.iter().map(|id| format!("nexus://documents/{id}")).collect();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(page[0]["mimeType"], "application/json");
    let bobs = call(&bob, "resources/list", json!({})).await;
    assert_eq!(
        Value::Array(documents_in(&bobs)),
        json!([{"uri": format!("nexus://documents/{foreign}"),
        "name": foreign, "mimeType": "application/json"}])
    );
    let bad = call(&ada, "resources/list", json!({"cursor": "../../etc"})).await;
    assert_eq!(bad["error"]["code"], -32602, "{bad}");

    let templates = call(&ada, "resources/templates/list", json!({})).await;
    assert_eq!(templates["result"]["resourceTemplates"][0]["uriTemplate"], resources::TEMPLATE);

    let uri = format!("nexus://documents/{}", own[3]);
    let read = call(&ada, "resources/read", json!({"uri": uri})).await;
    let contents = &read["result"]["contents"][0];
    assert_eq!(contents["uri"], uri);
    assert_eq!(contents["mimeType"], "application/json");
    assert_eq!(contents["_meta"]["version"], 1);
    assert_eq!(serde_json::from_str::<Value>(contents["text"].as_str().expect("text")).expect("json"), json!({"n": 3}));

    // Someone else's document reads like one that does not exist.
    let missing = uuid::Uuid::now_v7().to_string();
    for uri in
        [format!("nexus://documents/{foreign}"), format!("nexus://documents/{missing}"), "file:///etc/passwd".into()]
    {
        let refused = call(&ada, "resources/read", json!({"uri": uri})).await;
        assert_eq!(refused["error"]["code"], -32002, "{uri}: {refused}");
        assert_eq!(refused["error"]["message"], format!("no resource {uri:?} is available to you"));
    }

    let template = json!({"type": "ref/resource", "uri": resources::TEMPLATE});
    let typed = &own[7][..own[7].len() - 1];
    let completed =
        call(&ada, "completion/complete", json!({"ref": template, "argument": {"name": "id", "value": typed}})).await;
    assert_eq!(completed["result"]["completion"]["values"], json!([own[7]]), "{completed}");
    assert_eq!(completed["result"]["completion"]["total"], 1);
    let everything =
        call(&ada, "completion/complete", json!({"ref": template, "argument": {"name": "id", "value": ""}})).await;
    assert_eq!(everything["result"]["completion"]["values"].as_array().map(Vec::len), Some(100));
    assert_eq!(everything["result"]["completion"]["total"], resources::PAGE + 5);
    assert_eq!(everything["result"]["completion"]["hasMore"], true);
    let probe =
        call(&ada, "completion/complete", json!({"ref": template, "argument": {"name": "id", "value": foreign}})).await;
    assert_eq!(probe["result"]["completion"]["values"], json!([]), "{probe}");
    let other = json!({"type": "ref/resource", "uri": "nexus://panels/{id}"});
    let none = call(&ada, "completion/complete", json!({"ref": other, "argument": {"name": "id", "value": ""}})).await;
    assert_eq!(none["result"]["completion"]["values"], json!([]), "{none}");

    let level = call(&ada, "logging/setLevel", json!({"level": "debug"})).await;
    assert_eq!(level["result"], json!({}), "{level}");
}

#[actix_rt::test]
async fn a_full_page_is_the_last_and_no_spelling_of_an_id_reads_it() {
    let (redis, auth, ada) = auth("resource-edges").await;
    let docs = documents(&redis).await;
    let mut own = Vec::new();
    for n in 0..resources::PAGE {
        let id = uuid::Uuid::now_v7().to_string();
        docs.create(&id, "ada", &json!({"n": n}), 1000).await.expect("created");
        own.push(id);
    }
    own.sort();
    let deleted = docs.get(&own[49]).await.expect("read").expect("there");
    let app = mcp_app!(auth, docs.clone(), anywhere());
    let call = |method: &str, params: Value| {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        web_test::call_and_read_body_json::<_, _, Value>(&app, rpc(Some(&ada), body).to_request())
    };

    let all = call("resources/list", json!({})).await;
    assert_eq!(documents_in(&all).len(), resources::PAGE);
    assert!(all["result"].get("nextCursor").is_none(), "a full page is the last: {all}");
    let template = json!({"type": "ref/resource", "uri": resources::TEMPLATE});
    let every = call("completion/complete", json!({"ref": template, "argument": {"name": "id", "value": ""}})).await;
    assert_eq!(every["result"]["completion"]["total"], resources::PAGE);
    assert_eq!(every["result"]["completion"]["hasMore"], false);

    // A page goes on after its cursor's id, even once that document is gone.
    docs.delete(&deleted).await.expect("deleted");
    let rest = call("resources/list", json!({"cursor": own[49]})).await;
    let uris: Vec<&str> =
        rest["result"]["resources"].as_array().expect("a page").iter().filter_map(|r| r["uri"].as_str()).collect();
    let expected: Vec<String> = own[50..].iter().map(|id| format!("nexus://documents/{id}")).collect();
    assert_eq!(uris, expected);

    // The caller's own document, spelled any other way, is not a resource.
    let id = &own[7];
    for uri in [
        format!("nexus://documents/{}", id.to_uppercase()),
        format!("NEXUS://documents/{id}"),
        format!("nexus://documents/{id}/"),
        format!("nexus://documents//{id}"),
        format!("nexus://documents/{id}?x=1"),
        format!("nexus://documents/{}", id.replacen('-', "%2D", 1)),
        format!("nexus://documents/../documents/{id}"),
    ] {
        let read = call("resources/read", json!({"uri": uri})).await;
        assert_eq!(read["error"]["code"], -32002, "{uri}: {read}");
    }
    let long = format!("nexus://documents/{}", "x".repeat(5000));
    let read = call("resources/read", json!({"uri": long})).await;
    let message = read["error"]["message"].as_str().expect("a message");
    assert!(message.len() < 300, "the error does not echo the whole URI: {} bytes", message.len());
    let read = call("resources/read", json!({"uri": format!("nexus://documents/{id}")})).await;
    assert_eq!(read["result"]["contents"][0]["uri"], format!("nexus://documents/{id}"), "{read}");
}

#[actix_rt::test]
async fn protocol_revisions_are_negotiated() {
    let (redis, auth, token) = auth("revisions").await;
    let app = mcp_app!(auth, documents(&redis).await, anywhere());
    let call = |version: &str, method: &str, params: Value| {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let request = rpc_as(version, Some(&token), body).to_request();
        async { answer_of(web_test::call_service(&app, request).await).await }
    };
    let hello = |version: &str| json!({"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}});
    // Revisions with `initialize` get the one they asked for, an unknown
    // one (or 2026-07-28, which has no `initialize`) the latest of them.
    for (asked, answered) in [
        ("2024-11-05", "2024-11-05"),
        ("2025-03-26", "2025-03-26"),
        ("2025-06-18", "2025-06-18"),
        ("2025-11-25", "2025-11-25"),
        ("2099-01-01", "2025-11-25"),
        ("2026-07-28", "2025-11-25"),
    ] {
        let init = call(asked, "initialize", hello(asked)).await;
        assert_eq!(init["result"]["protocolVersion"], answered, "{asked}: {init}");
    }
    // A client may name its revision in the header too, if it is the body's.
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello("2025-06-18")});
    let named = rpc(Some(&token), body).insert_header(("MCP-Protocol-Version", "2025-06-18")).to_request();
    let init = answer_of(web_test::call_service(&app, named).await).await;
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18", "{init}");
    // 2026-07-28: discovery instead of a handshake, and each request says
    // its revision and the client's capabilities in `_meta`.
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}});
    let discover = call("2026-07-28", "server/discover", json!({"_meta": meta})).await;
    let versions = discover["result"]["supportedVersions"].as_array().expect("versions").clone();
    assert!(versions.contains(&json!("2025-11-25")) && versions.contains(&json!("2026-07-28")), "{discover}");
    assert!(discover["result"]["capabilities"]["resources"].is_object(), "{discover}");
    let tools = call("2026-07-28", "tools/list", json!({"_meta": meta})).await;
    assert_eq!(tools["result"]["tools"][0]["name"], "echo", "{tools}");
    assert_eq!(tools["result"]["cacheScope"], "private", "a caller's listing is theirs: {tools}");
    let uri = format!("nexus://documents/{}", uuid::Uuid::now_v7());
    let read = call("2026-07-28", "resources/read", json!({"_meta": meta, "uri": uri})).await;
    // That revision reports a missing resource as invalid params.
    assert_eq!(read["error"]["code"], -32602, "{read}");
    assert_eq!(read["error"]["message"], format!("no resource {uri:?} is available to you"));
}
