//! The Model Context Protocol surface of a node: `/mcp`, an MCP server over
//! Streamable HTTP (rmcp), offering each caller the tools the registry lets
//! them use (system tools and their own panels' tools) and their documents
//! as resources ([`resources`]), followed through `resources/subscribe` in a
//! session ([`sessions`]) or `subscriptions/listen` ([`subscriptions`]),
//! the platform's system prompts and the prompts their panels declare, with completion
//! of document ids and `logging/setLevel`. A tool call reports the tool's progress to a caller
//! that asked for it (`progressToken`), and stops when its caller goes away
//! or sends `notifications/cancelled` (which any node may take, outside a
//! session).
//!
//! This module owns the protocol: authentication of the request, the bridge
//! from actix-web to rmcp's tower service, and the mapping between
//! [`ToolSpec`]/[`ToolError`] and MCP tools and tool results. It does not run
//! tools itself: `tools/call` goes through [`ToolsApi`] to the node's
//! registry, which validates, routes, counts and records the call.
//!
//! A request without `Mcp-Session-Id` is stateless: one JSON-RPC exchange
//! answered with a JSON body, except a listen, whose answer is the SSE
//! stream of its notifications, and a tool call that reports progress,
//! whose answer turns into one at the first report, so any
//! transaction-manager node behind a load balancer can serve it. An
//! `initialize` begins a session instead, which lives on its node and
//! answers in SSE streams ([`sessions`]).

use std::sync::Arc;

use actix_web::web;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CompleteRequestParams, CompleteResult, ContentBlock,
    GetPromptRequestParams, GetPromptResponse, GetPromptResult, Implementation, InitializeRequestParams,
    InitializeResult, JsonObject, ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult, ListToolsResult,
    PaginatedRequestParams, ProgressNotificationParam, ProgressToken, PromptArgument, PromptMessage,
    ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, RequestId, Resource, ResourceContents, Role,
    ServerCapabilities, ServerConfig, SubscribeRequestParams, SubscriptionFilter, Tool, UnsubscribeRequestParams,
};
// Deprecated by a later revision than 2025-11-25 (SEP-2577), which clients still speak.
#[allow(deprecated)]
use rmcp::model::SetLevelRequestParams;
use rmcp::service::{RequestContext, SubscriptionContext};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::Value;

use super::system_prompts;
use super::tools_api::ToolsApi;
use super::Documents;
use crate::platform::origin::OriginPolicy;
use crate::tools::prompts::{Prompt, PromptRole};
use crate::tools::protocol::ToolProgress;
use crate::tools::registry::{GetPromptError, ReadResourceError, MAX_LABEL};
use crate::tools::resources::{mcp_uri, parse_mcp_uri, PanelResource};
use crate::tools::{ToolCall, ToolError, ToolSpec};

/// The path of the endpoint.
pub const PATH: &str = "/mcp";
/// Largest request body `/mcp` accepts.
pub const MAX_BODY: usize = 1024 * 1024;
/// Progress reports of one call waiting to be sent; more are dropped (the
/// next one says as much).
const PROGRESS_QUEUE: usize = 32;
/// How long a progress notification may wait for room on the answer's stream.
const PROGRESS_SEND_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

mod bridge;
mod follow;
mod relay;
mod resources;
mod sessions;
mod subscriptions;

use resources::DocumentResources;
use sessions::InSession;
pub use sessions::Sessions;
use subscriptions::Credentials;
pub use subscriptions::Listens;

/// What clients are told about this server when they connect.
const INSTRUCTIONS: &str = "Tools of a Nexus deployment: system tools (e.g. `list_documents`) and the tools of \
                            your own panels, named `<panel-id>.<tool>`. Your documents are resources, \
                            `nexus://documents/{id}` (JSON).";

/// The authenticated user of an MCP request, carried from the bridge to the
/// handler in the `http::Request` extensions.
#[derive(Debug, Clone)]
struct McpUser(String);

/// Where requests without a session go.
type Endpoint = StreamableHttpService<NexusMcp, NeverSessionManager>;
/// Where `initialize` and requests of a session go.
type SessionEndpoint = StreamableHttpService<NexusMcp, Sessions>;

/// Registers `/mcp` (POST, GET and DELETE all reach the transport, which
/// decides: without a session GET and DELETE are answered 405). Requests
/// whose `Host` or `Origin` `policy` refuses get 403 before anything else.
/// `sessions` are the node's, shared by all its HTTP workers.
pub fn configure(
    tools: ToolsApi,
    documents: Documents,
    listens: Option<Listens>,
    sessions: Sessions,
    policy: OriginPolicy,
) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let handler = NexusMcp {
            tools: tools.clone(),
            resources: DocumentResources::new(documents),
            listens,
            sessions: sessions.clone(),
        };
        let endpoints = Endpoints { stateless: endpoint(handler.clone()), sessions: session_endpoint(handler) };
        cfg.service(
            web::resource(PATH)
                .app_data(web::Data::new(endpoints))
                .app_data(web::Data::new(sessions))
                .app_data(web::Data::new(tools))
                .app_data(web::Data::new(policy))
                .route(web::post().to(bridge::serve))
                .route(web::get().to(bridge::serve))
                .route(web::delete().to(bridge::serve)),
        );
    }
}

/// The two rmcp services of `/mcp`.
struct Endpoints {
    stateless: Endpoint,
    sessions: SessionEndpoint,
}

/// The rmcp service of requests without a session: stateless, JSON
/// responses, requests of any `Host`.
fn endpoint(handler: NexusMcp) -> Endpoint {
    let config = config()
        // No sessions here: nothing to share between nodes, nothing to expire.
        .with_legacy_session_mode(false);
    StreamableHttpService::new(move || Ok(handler.clone()), Arc::new(NeverSessionManager::default()), config)
}

/// The rmcp service of sessions, the node's `handler.sessions`.
fn session_endpoint(handler: NexusMcp) -> SessionEndpoint {
    let sessions = Arc::new(handler.sessions.clone());
    let config = config().with_legacy_session_mode(true).with_cancellation_token(sessions.stop_token());
    StreamableHttpService::new(move || Ok(handler.clone()), sessions, config)
}

/// What both services share.
fn config() -> StreamableHttpServerConfig {
    StreamableHttpServerConfig::default()
        // A plain JSON body for each answer (SSE only where something goes
        // out before the result: a listen's acknowledgement and updates).
        .with_json_response(true)
        // Host and Origin are checked by the node's OriginPolicy before a
        // request gets here, under the node's own rules (loopback names on
        // a loopback listener, any name elsewhere).
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_BODY)
        // A listen's stream carries a ping this often: writing it is how a
        // client gone away is noticed, and its subscriptions given up.
        .with_sse_keep_alive(Some(subscriptions::KEEP_ALIVE))
}

/// How a request id names its tool call to the registry (its JSON).
fn call_label(id: &RequestId) -> Option<String> {
    serde_json::to_string(id).ok().filter(|label| label.len() <= MAX_LABEL)
}

/// The MCP server handler: one per request (rmcp's factory clones it).
#[derive(Clone)]
struct NexusMcp {
    tools: ToolsApi,
    resources: DocumentResources,
    /// `subscriptions/listen`, where the node has a Redis bridge to follow documents through.
    listens: Option<Listens>,
    /// The node's sessions, which `resources/subscribe` needs.
    sessions: Sessions,
}

impl ServerHandler for NexusMcp {
    fn get_info(&self) -> ServerConfig {
        // Logging is deprecated by a later revision (SEP-2577) but part of
        // 2025-11-25, which clients still speak.
        #[allow(deprecated)]
        let mut capabilities = ServerCapabilities::builder()
            .enable_logging()
            .enable_completions()
            .enable_prompts()
            .enable_resources()
            .enable_tools()
            .build();
        if let Some(resources) = capabilities.resources.as_mut().filter(|_| self.sessions.can_follow()) {
            resources.subscribe = Some(true);
        }
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new("nexus", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let user = user_of(&context)?;
        let specs = self.tools.list(&user).await.map_err(failed)?;
        Ok(ListToolsResult::with_all_items(specs.into_iter().map(to_mcp_tool).collect()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let user = user_of(&context)?;
        let arguments = Value::Object(request.arguments.unwrap_or_default());
        let call = ToolCall::new(request.name.into_owned(), arguments, user);
        let token = context.meta.get_progress_token();
        let (progress, mut reports) = match token {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::channel::<ToolProgress>(PROGRESS_QUEUE);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        // Dropped when the caller goes away, which cancels the call. A
        // session's calls are cancelled through the session, not by name.
        let label = match context.extensions.get::<InSession>() {
            Some(_) => None,
            None => call_label(&context.id),
        };
        let outcome = self.tools.call_watched(call, progress, label);
        tokio::pin!(outcome);
        let mut reported = f64::NEG_INFINITY;
        let outcome = loop {
            tokio::select! {
                outcome = &mut outcome => break outcome,
                () = context.ct.cancelled() => break Err(ToolError::Cancelled),
                report = next_report(&mut reports) => match (report, &token) {
                    (Some(report), Some(token)) => notify_progress(&context, token, &mut reported, report).await,
                    _ => reports = None,
                },
            }
        };
        // Reports sent before the answer are queued by now: the bus keeps their order.
        if let (Some(queued), Some(token)) = (reports.as_mut(), &token) {
            while let Ok(report) = queued.try_recv() {
                notify_progress(&context, token, &mut reported, report).await;
            }
        }
        Ok(tool_result(outcome).into())
    }

    /// Subscribes the caller's session to one of their documents.
    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let user = user_of(&context)?;
        let session = session_of(&context)?;
        let doc = resources::owned(self.resources.documents(), &user, &request.uri).await?;
        self.sessions.subscribe(&session, &user, doc, &context.peer).await
    }

    /// Ends the caller's session's subscription, if it has one: a URI it
    /// does not follow (anyone's) changes nothing.
    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let user = user_of(&context)?;
        let session = session_of(&context)?;
        let doc = resources::document_id(&request.uri).ok_or_else(|| resources::not_found(&request.uri))?;
        self.sessions.unsubscribe(&session, &user, doc)
    }

    /// Only a session can `resources/subscribe`: whoever initializes
    /// without one (a full or draining node) is not told `subscribe`.
    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, McpError> {
        context.peer.set_peer_info(request.clone());
        let mut result = self.negotiate_initialize(&request)?;
        if let Some(resources) =
            result.capabilities.resources.as_mut().filter(|_| context.extensions.get::<InSession>().is_none())
        {
            resources.subscribe = None;
        }
        Ok(result)
    }

    fn accepted_subscription_filter(&self, requested: &SubscriptionFilter) -> Option<SubscriptionFilter> {
        self.listens.as_ref().map(|_| Listens::accepted(requested))
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let credentials = carried::<Credentials>(context.request_context())
            .ok_or_else(|| McpError::internal_error("the request carries no credentials", None))?;
        match &self.listens {
            Some(listens) => listens.listen(&credentials, self.resources.documents(), context).await,
            None => Err(McpError::internal_error("this node follows no documents", None)),
        }
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        let user = user_of(&context)?;
        let prompts = self.tools.prompts(&user).await.map_err(failed)?;
        // The platform's system prompts first, as system tools come first.
        let system = system_prompts::ALL.iter().map(|p| rmcp::model::Prompt::new(p.name, Some(p.description), None));
        let panels = prompts.into_iter().map(|(name, p)| to_mcp_prompt(name, p));
        Ok(ListPromptsResult::with_all_items(system.chain(panels).collect()))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        let user = user_of(&context)?;
        // A system prompt is the text a context's `system` would be; MCP
        // prompts have no system role, so it comes as the user's message.
        if let Some(prompt) = system_prompts::find(&request.name) {
            let mut result = GetPromptResult::new(vec![PromptMessage::new_text(Role::User, prompt.text)]);
            result.description = Some(prompt.description.to_owned());
            return Ok(result.into());
        }
        let arguments = request.arguments.unwrap_or_default();
        let (description, messages) =
            self.tools.prompt(&user, &request.name, arguments).await.map_err(|e| match e {
                GetPromptError::NotFound(_) | GetPromptError::Render(_) => {
                    McpError::invalid_params(e.to_string(), None)
                }
                GetPromptError::Store(_) => McpError::internal_error(e.to_string(), None),
            })?;
        let messages = messages
            .into_iter()
            .map(|(role, text)| {
                let role = match role {
                    PromptRole::User => Role::User,
                    PromptRole::Assistant => Role::Assistant,
                };
                PromptMessage::new_text(role, text)
            })
            .collect();
        let mut result = GetPromptResult::new(messages);
        result.description = description;
        Ok(result.into())
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let user = user_of(&context)?;
        let cursor = request.as_ref().and_then(|r| r.cursor.as_deref());
        let mut result = self.resources.list(&user, cursor).await?;
        // The panels' few resources come first, on the first page only.
        if cursor.is_none() {
            let declared = self.tools.panel_resources(&user).await.map_err(failed)?;
            let mut page: Vec<_> = declared.into_iter().map(|(panel, r)| to_mcp_resource(&panel, r)).collect();
            page.append(&mut result.resources);
            result.resources = page;
        }
        Ok(result)
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        user_of(&context)?;
        Ok(DocumentResources::templates())
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let user = user_of(&context)?;
        let Some((panel, uri)) = parse_mcp_uri(&request.uri) else {
            return Ok(self.resources.read(&user, &request.uri).await?.into());
        };
        let (resource, text) = self.tools.read_resource(&user, panel, uri).await.map_err(|e| match e {
            ReadResourceError::NotFound => resources::not_found(&request.uri),
            ReadResourceError::Panel(e) => failed(e),
        })?;
        let contents = ResourceContents::text(text, request.uri.clone()).with_mime_type(resource.mime_type);
        Ok(ReadResourceResult::new(vec![contents]).into())
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, McpError> {
        let user = user_of(&context)?;
        self.resources.complete(&user, &request).await
    }

    /// Accepted at any level. Over this stateless transport there is no
    /// stream to send log messages on outside a request, and none are sent.
    #[allow(deprecated)]
    async fn set_level(
        &self,
        _request: SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        user_of(&context)?;
        Ok(())
    }
}

/// Sends `report` as `notifications/progress` if it says more than the last
/// one did: MCP wants progress to grow.
async fn notify_progress(
    context: &RequestContext<RoleServer>,
    token: &ProgressToken,
    reported: &mut f64,
    report: ToolProgress,
) {
    if report.progress <= *reported {
        return;
    }
    *reported = report.progress;
    let mut note = ProgressNotificationParam::new(token.clone(), report.progress);
    note.total = report.total;
    note.message = report.message;
    // A client that does not read must not hold up the call's answer.
    let _ = tokio::time::timeout(PROGRESS_SEND_WAIT, context.peer.notify_progress(note)).await;
}

/// The next progress report, if reports are wanted; never, if not.
async fn next_report(reports: &mut Option<tokio::sync::mpsc::Receiver<ToolProgress>>) -> Option<ToolProgress> {
    match reports {
        Some(reports) => reports.recv().await,
        None => std::future::pending().await,
    }
}

/// The user the bridge authenticated, from the request's HTTP parts.
fn user_of(context: &RequestContext<RoleServer>) -> Result<String, McpError> {
    carried::<McpUser>(context)
        .map(|user| user.0)
        .ok_or_else(|| McpError::internal_error("the request carries no authenticated user", None))
}

/// The session rmcp routed a request through, which a subscription needs.
fn session_of(context: &RequestContext<RoleServer>) -> Result<String, McpError> {
    context.extensions.get::<InSession>().map(|session| session.0.clone()).ok_or_else(|| {
        let message =
            "resources/subscribe needs a session (initialize first); 2026-07-28 clients use subscriptions/listen";
        McpError::invalid_request(message, None)
    })
}

/// A registry's failure outside a tool call, as a JSON-RPC error naming its code.
fn failed(error: ToolError) -> McpError {
    McpError::internal_error(format!("{}: {error}", error.code()), None)
}

/// What the bridge put in the request's HTTP extensions, of type `T`.
fn carried<T: Clone + Send + Sync + 'static>(context: &RequestContext<RoleServer>) -> Option<T> {
    context.extensions.get::<http::request::Parts>()?.extensions.get::<T>().cloned()
}

/// A panel's declared resource as an MCP resource.
fn to_mcp_resource(panel: &str, resource: PanelResource) -> Resource {
    let mut out = Resource::new(mcp_uri(panel, &resource.uri), resource.name).with_mime_type(resource.mime_type);
    if let Some(description) = resource.description {
        out = out.with_description(description);
    }
    out
}

/// A panel's prompt as an MCP prompt, under its callable name.
fn to_mcp_prompt(name: String, prompt: Prompt) -> rmcp::model::Prompt {
    let arguments = prompt
        .arguments
        .into_iter()
        .map(|a| {
            let mut argument = PromptArgument::new(a.name);
            argument.description = a.description;
            argument.required = Some(a.required);
            argument
        })
        .collect::<Vec<_>>();
    let mut out = rmcp::model::Prompt::new(name, prompt.description, None);
    out.arguments = (!arguments.is_empty()).then_some(arguments);
    out
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
mod tests;
