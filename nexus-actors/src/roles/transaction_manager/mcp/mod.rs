//! The Model Context Protocol surface of the tool registry: `/mcp`, an MCP
//! server over Streamable HTTP (rmcp), offering each caller the tools the
//! registry lets them use (system tools and their own panels' tools).
//!
//! This module owns the protocol: authentication of the request, the bridge
//! from actix-web to rmcp's tower service, and the mapping between
//! [`ToolSpec`]/[`ToolError`] and MCP tools and tool results. It does not run
//! tools itself: `tools/call` goes through [`ToolsApi`] to the node's
//! registry, which validates, routes, counts and records the call.
//!
//! The server is stateless (no `Mcp-Session-Id`, no server-initiated
//! messages): every POST is one JSON-RPC exchange answered with a JSON body,
//! so any transaction-manager node behind a load balancer can serve it.

use std::convert::Infallible;
use std::sync::Arc;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, JsonObject, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::Value;
use tower_service::Service as _;

use super::tools_api::ToolsApi;
use crate::platform::auth::extract::authenticate;
use crate::platform::http::{read_body, BodyError};
use crate::platform::origin::OriginPolicy;
use crate::platform::ApiError;
use crate::tools::{ToolCall, ToolError, ToolSpec};

/// The path of the endpoint.
pub const PATH: &str = "/mcp";
/// Largest request body `/mcp` accepts.
pub const MAX_BODY: usize = 1024 * 1024;

/// What clients are told about this server when they connect.
const INSTRUCTIONS: &str = "Tools of a Nexus deployment: system tools (e.g. `list_documents`) and the tools of \
                            your own panels, named `<panel-id>.<tool>`.";

/// The authenticated user of an MCP request, carried from the bridge to the
/// handler in the `http::Request` extensions.
#[derive(Debug, Clone)]
struct McpUser(String);

type Endpoint = StreamableHttpService<NexusMcp, NeverSessionManager>;

/// Registers `/mcp` (POST, GET and DELETE all reach the transport, which
/// decides: in stateless mode GET and DELETE are answered 405). Requests
/// whose `Host` or `Origin` `policy` refuses get 403 before anything else.
pub fn configure(tools: ToolsApi, policy: OriginPolicy) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.service(
            web::resource(PATH)
                .app_data(web::Data::new(endpoint(tools)))
                .app_data(web::Data::new(policy))
                .route(web::post().to(serve))
                .route(web::get().to(serve))
                .route(web::delete().to(serve)),
        );
    }
}

/// The rmcp service: stateless, JSON responses, requests of any `Host`.
fn endpoint(tools: ToolsApi) -> Endpoint {
    let config = StreamableHttpServerConfig::default()
        // No sessions: nothing to share between nodes, nothing to expire.
        .with_legacy_session_mode(false)
        // A plain JSON body for each answer (SSE only if a handler emitted
        // something before its result, which ours never do).
        .with_json_response(true)
        // Host and Origin are checked by the node's OriginPolicy before a
        // request gets here, under the node's own rules (loopback names on
        // a loopback listener, any name elsewhere).
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_BODY);
    let handler = NexusMcp { tools };
    StreamableHttpService::new(move || Ok(handler.clone()), Arc::new(NeverSessionManager::default()), config)
}

/// The actix-web handler: checks `Host` and `Origin`, authenticates, hands
/// the request to rmcp, and streams its answer back.
async fn serve(
    req: HttpRequest,
    payload: web::Payload,
    endpoint: web::Data<Endpoint>,
    policy: web::Data<OriginPolicy>,
) -> Result<HttpResponse, ApiError> {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    policy.check(header(actix_web::http::header::HOST), header(actix_web::http::header::ORIGIN))?;
    let caller = authenticate(&req).await?;
    let body = read_body(&req, payload, MAX_BODY).await.map_err(|e| match e {
        BodyError::TooLarge { limit } => ApiError::BodyTooLarge { limit },
        BodyError::Unreadable(e) => ApiError::BadRequest(format!("reading the body: {e}")),
    })?;
    let request = to_http_request(&req, body, McpUser(caller.user))?;
    let response = match endpoint.get_ref().clone().call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    Ok(to_actix_response(response).await)
}

/// The actix request (actix-web 4 speaks `http` 0.2) as an `http` 1 request
/// with `body`, and `user` in its extensions.
fn to_http_request(req: &HttpRequest, body: Bytes, user: McpUser) -> Result<http::Request<Full<Bytes>>, ApiError> {
    let bad = |what: &str| ApiError::BadRequest(format!("invalid {what}"));
    let method = http::Method::from_bytes(req.method().as_str().as_bytes()).map_err(|_| bad("method"))?;
    let uri: http::Uri = req.uri().to_string().parse().map_err(|_| bad("URI"))?;
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    for (name, value) in req.headers() {
        let name = http::HeaderName::from_bytes(name.as_str().as_bytes()).map_err(|_| bad("header name"))?;
        let value = http::HeaderValue::from_bytes(value.as_bytes()).map_err(|_| bad("header value"))?;
        headers.append(name, value);
    }
    // HTTP/1.0 may come without `Host`; rmcp needs one.
    if !headers.contains_key(http::header::HOST) {
        let host = req.connection_info().host().to_owned();
        headers.insert(http::header::HOST, http::HeaderValue::from_str(&host).map_err(|_| bad("host"))?);
    }
    request.extensions_mut().insert(user);
    Ok(request)
}

/// Headers that describe one hop's framing; actix sets its own.
fn is_hop_by_hop(name: &http::HeaderName) -> bool {
    matches!(name.as_str(), "content-length" | "transfer-encoding" | "connection" | "keep-alive")
}

/// rmcp's response as an actix response: an SSE stream is streamed as rmcp
/// produces it, any other body is sent whole.
async fn to_actix_response(response: http::Response<BoxBody<Bytes, Infallible>>) -> HttpResponse {
    let (parts, body) = response.into_parts();
    let status = StatusCode::from_u16(parts.status.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = HttpResponse::build(status);
    for (name, value) in &parts.headers {
        if is_hop_by_hop(name) {
            continue;
        }
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name.as_str().as_bytes()), HeaderValue::from_bytes(value.as_bytes()))
        {
            out.append_header((name, value));
        }
    }
    let is_sse = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    if is_sse {
        return out.streaming(body.into_data_stream());
    }
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    out.body(bytes)
}

/// The MCP server handler: one per request (rmcp's factory clones it).
#[derive(Clone)]
struct NexusMcp {
    tools: ToolsApi,
}

impl ServerHandler for NexusMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("nexus", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let user = user_of(&context)?;
        let specs =
            self.tools.list(&user).await.map_err(|e| McpError::internal_error(format!("{}: {e}", e.code()), None))?;
        Ok(ListToolsResult::with_all_items(specs.into_iter().map(to_mcp_tool).collect()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let user = user_of(&context)?;
        let arguments = Value::Object(request.arguments.unwrap_or_default());
        let outcome = self.tools.call(ToolCall::new(request.name.into_owned(), arguments, user)).await;
        Ok(tool_result(outcome).into())
    }
}

/// The user the bridge authenticated, from the request's HTTP parts.
fn user_of(context: &RequestContext<RoleServer>) -> Result<String, McpError> {
    context
        .extensions
        .get::<http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<McpUser>())
        .map(|user| user.0.clone())
        .ok_or_else(|| McpError::internal_error("the request carries no authenticated user", None))
}

/// A registry tool as an MCP tool.
fn to_mcp_tool(spec: ToolSpec) -> Tool {
    let mut schema = match spec.input_schema {
        Value::Object(schema) => schema,
        _ => JsonObject::new(),
    };
    // MCP requires an object schema; the registry's always are.
    schema.entry("type").or_insert_with(|| Value::from("object"));
    let description = (!spec.description.is_empty()).then(|| spec.description.into());
    Tool::new_with_raw(spec.name, description, Arc::new(schema))
}

/// A call's outcome as an MCP tool result. Every [`ToolError`] is a tool
/// error (`isError: true`, text `<code>: <message>`), never a JSON-RPC error.
fn tool_result(outcome: Result<Value, ToolError>) -> CallToolResult {
    match outcome {
        Ok(value) => {
            let text = match &value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
            if value.is_object() {
                result.structured_content = Some(value);
            }
            result
        }
        Err(error) => CallToolResult::error(vec![ContentBlock::text(format!("{}: {error}", error.code()))]),
    }
}

#[cfg(test)]
mod tests {
    use actix_web::{test as web_test, App};
    use serde_json::json;

    use super::*;
    use crate::infra::RedisServer;
    use crate::kernel::{Behaviour, Ctx, Handler, Kernel, Reply};
    use crate::platform::auth::keys::{KeyRing, KeySet};
    use crate::platform::auth::{Audience, Auth};
    use crate::platform::{Accounts, UserRole};
    use crate::tools::registry::{CallTool, ListTools};
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

    impl Handler<CallTool> for FakeRegistry {
        fn handle(&mut self, CallTool(call): CallTool, _: &mut Ctx<Self>) -> Reply<Result<Value, ToolError>> {
            Reply::Now(match call.tool.as_str() {
                "echo" if call.arguments.get("fail").is_some() => Err(ToolError::failed("asked to fail")),
                "echo" => Ok(json!({"caller": call.caller, "arguments": call.arguments})),
                tool => Err(ToolError::NotFound { tool: tool.to_owned() }),
            })
        }
    }

    fn tools_api() -> ToolsApi {
        let kernel = Kernel::new("test");
        let registry = kernel.spawn("registry", || FakeRegistry);
        ToolsApi { call: registry.link("mcp"), list: registry.link("mcp") }
    }

    /// A Redis of the test's own with the user `ada`, and tokens over it.
    async fn auth(name: &str) -> (RedisServer, Auth, String) {
        let dir = std::env::temp_dir().join(format!("nexus-mcp-{name}-{}", std::process::id()));
        let redis = RedisServer::start(&dir, false).expect("redis-server starts");
        let accounts = Accounts::connect(&redis.url()).await.expect("redis answers");
        accounts.set("ada", "no-login", UserRole::User).await.expect("stored");
        let auth = Auth::new(KeyRing::new(KeySet::generate()), accounts);
        let (token, _) = auth.issue("ada", &Audience::Api).await.expect("a token");
        (redis, auth, token)
    }

    /// The rules of a node listening on every address.
    fn anywhere() -> OriginPolicy {
        OriginPolicy::for_listener("0.0.0.0:7070".parse().expect("an address"), Vec::new())
    }

    #[actix_rt::test]
    async fn a_rebound_name_or_a_foreign_page_is_refused_before_authentication() {
        let (_redis, auth, token) = auth("rebinding").await;
        let loopback = OriginPolicy::for_listener("127.0.0.1:7070".parse().expect("an address"), Vec::new());
        let app = web_test::init_service(
            App::new().app_data(web::Data::new(auth)).configure(configure(tools_api(), loopback)),
        )
        .await;
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
        let mut req = web_test::TestRequest::post()
            .uri(PATH)
            .insert_header(("Host", "nexus.example.com"))
            .insert_header(("Accept", "application/json, text/event-stream"))
            .insert_header(("Content-Type", "application/json"))
            .insert_header(("MCP-Protocol-Version", "2025-06-18"))
            .set_payload(body.to_string());
        if let Some(token) = token {
            req = req.insert_header(("Authorization", format!("Bearer {token}")));
        }
        req
    }

    #[actix_rt::test]
    async fn serves_tools_to_the_authenticated_user() {
        let (_redis, auth, token) = auth("serves").await;
        let app = web_test::init_service(
            App::new().app_data(web::Data::new(auth)).configure(configure(tools_api(), anywhere())),
        )
        .await;

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
        assert!(resp.headers().get("mcp-session-id").is_none(), "stateless");
        let body: Value = web_test::read_body_json(resp).await;
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
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[actix_rt::test]
    async fn refuses_bodies_over_the_limit() {
        let (_redis, auth, token) = auth("limit").await;
        let app = web_test::init_service(
            App::new().app_data(web::Data::new(auth)).configure(configure(tools_api(), anywhere())),
        )
        .await;
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
        let handler = NexusMcp { tools: tools_api() };
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
        let response = to_actix_response(response).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().get("content-type").unwrap().to_str().unwrap().starts_with("text/event-stream"));
        let body = actix_web::body::to_bytes(response.into_body()).await.unwrap();
        let text = std::str::from_utf8(&body).unwrap();
        let data = text.lines().find_map(|l| l.strip_prefix("data:").filter(|d| !d.trim().is_empty())).unwrap();
        let message: Value = serde_json::from_str(data.trim()).unwrap();
        assert_eq!(message["id"], 7);
        assert_eq!(message["result"]["structuredContent"]["caller"], "ada");
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
}
