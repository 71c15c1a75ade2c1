//! The tools over HTTP: `GET /api/tools` lists what the caller may use,
//! `POST /api/tools/{name}/call` calls one. Both need a token. Calls go
//! through the node's [`ToolRegistry`]; this module only translates HTTP,
//! and checks that a call naming a context names one of the caller's: its
//! records go to that context's journal.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::kernel::{ActorRef, AskError, Link, Message};
use crate::platform::{ApiError, Caller, ErrorBody};
use crate::semantic::directory::ContextDirectory;
use crate::semantic::records::is_context_id;
use crate::tools::prompts::Prompt;
use crate::tools::protocol::{ToolCall, ToolProgress};
use crate::tools::registry::{
    CallTool, CallToolWatched, CancelCall, GetPrompt, GetPromptError, ListPanelResources, ListPrompts, ListTools,
    ReadPanelResource, ReadResourceError, RenderedPrompt,
};
use crate::tools::resources::PanelResource;
use crate::tools::{ToolError, ToolRegistry, ToolSpec};

use super::TmState;

/// Longest idempotency key or context id a caller may give.
const MAX_KEY: usize = 200;

/// How the HTTP layers reach the node's tool registry.
#[derive(Clone)]
pub struct ToolsApi {
    /// Sends [`CallTool`] to the registry.
    pub call: Link<CallTool>,
    /// Sends [`CallToolWatched`] to the registry.
    pub watched: Link<CallToolWatched>,
    /// Sends [`CancelCall`] to the registry.
    pub cancel: Link<CancelCall>,
    /// Sends [`ListTools`] to the registry.
    pub list: Link<ListTools>,
    /// Sends [`ListPrompts`] to the registry.
    pub prompts: Link<ListPrompts>,
    /// Sends [`GetPrompt`] to the registry.
    pub prompt: Link<GetPrompt>,
    /// Sends [`ListPanelResources`] to the registry.
    pub panel_resources: Link<ListPanelResources>,
    /// Sends [`ReadPanelResource`] to the registry.
    pub read_resource: Link<ReadPanelResource>,
}

impl ToolsApi {
    /// Links to `registry`, counted in the graph as coming from the actor named `from`.
    pub fn new(registry: &ActorRef<ToolRegistry>, from: &str) -> Self {
        ToolsApi {
            call: registry.link(from),
            watched: registry.link(from),
            cancel: registry.link(from),
            list: registry.link(from),
            prompts: registry.link(from),
            prompt: registry.link(from),
            panel_resources: registry.link(from),
            read_resource: registry.link(from),
        }
    }

    /// The tools `user` may call.
    pub async fn list(&self, user: &str) -> Result<Vec<ToolSpec>, ToolError> {
        self.list.ask(ListTools { user: user.to_owned() }).await.unwrap_or_else(|e| Err(unreachable(e)))
    }

    /// Runs `call` and waits for its outcome.
    pub async fn call(&self, call: ToolCall) -> Result<Value, ToolError> {
        self.call.ask(CallTool(call)).await.unwrap_or_else(|e| Err(unreachable(e)))
    }

    /// Runs `call` as [`ToolsApi::call`] does, handing its progress to
    /// `progress`; dropping the future before the outcome cancels the call.
    /// `label` is the caller's name for it, for [`ToolsApi::cancel`].
    pub async fn call_watched(
        &self,
        call: ToolCall,
        progress: Option<tokio::sync::mpsc::Sender<ToolProgress>>,
        label: Option<String>,
    ) -> Result<Value, ToolError> {
        let watched = |cancel| CallToolWatched { call, progress, cancel, label };
        ask_cancelling(&self.watched, watched).await.unwrap_or_else(|e| Err(unreachable(e)))
    }

    /// The prompts of `user`'s panels, by callable name.
    pub async fn prompts(&self, user: &str) -> Result<Vec<(String, Prompt)>, ToolError> {
        self.prompts.ask(ListPrompts { user: user.to_owned() }).await.unwrap_or_else(|e| Err(unreachable(e)))
    }

    /// `user`'s prompt `name`, rendered with `arguments`.
    pub async fn prompt(
        &self,
        user: &str,
        name: &str,
        arguments: serde_json::Map<String, Value>,
    ) -> Result<RenderedPrompt, GetPromptError> {
        let get = GetPrompt { user: user.to_owned(), name: name.to_owned(), arguments };
        match self.prompt.ask(get).await {
            Ok(result) => result,
            Err(error) => Err(GetPromptError::Store(format!("tool registry: {error:?}"))),
        }
    }

    /// The resources `user`'s panels declare, as `(panel, resource)`.
    pub async fn panel_resources(&self, user: &str) -> Result<Vec<(String, PanelResource)>, ToolError> {
        let list = ListPanelResources { user: user.to_owned() };
        self.panel_resources.ask(list).await.unwrap_or_else(|e| Err(unreachable(e)))
    }

    /// `user`'s panel `panel`'s resource `uri`, read from the panel;
    /// dropping the future before the answer stops the read.
    pub async fn read_resource(
        &self,
        user: &str,
        panel: &str,
        uri: &str,
    ) -> Result<(PanelResource, String), ReadResourceError> {
        let (user, panel, uri) = (user.to_owned(), panel.to_owned(), uri.to_owned());
        let read = |cancel| ReadPanelResource { user, panel, uri, cancel };
        ask_cancelling(&self.read_resource, read).await.unwrap_or_else(|e| Err(unreachable(e).into()))
    }

    /// Cancels `caller`'s running call named `label`, wherever it runs;
    /// how many calls were told to stop (0 or 1).
    pub async fn cancel(&self, caller: &str, label: &str) -> Result<usize, ToolError> {
        let cancel = CancelCall { caller: caller.to_owned(), label: label.to_owned() };
        self.cancel.ask(cancel).await.unwrap_or_else(|e| Err(unreachable(e)))
    }
}

/// What a caller gets when the registry could not be asked.
fn unreachable(error: impl std::fmt::Debug) -> ToolError {
    ToolError::internal(format_args!("tool registry: {error:?}"))
}

/// Asks `link` for the message `make` builds around a cancellation token,
/// which is cancelled if this future is dropped before the answer.
async fn ask_cancelling<M: Message>(
    link: &Link<M>,
    make: impl FnOnce(CancellationToken) -> M,
) -> Result<M::Reply, AskError<M>> {
    let cancel = CancellationToken::new();
    let cancel_unless_answered = cancel.clone().drop_guard();
    let answer = link.ask(make(cancel)).await;
    cancel_unless_answered.disarm();
    answer
}

/// The body of `POST /api/tools/{name}/call`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct CallRequest {
    /// The tool's arguments (a JSON object matching its `input_schema`).
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub arguments: Value,
    /// Calls with one key run once; a retry gets the first outcome.
    pub idempotency_key: Option<String>,
    /// Deadline in milliseconds (default 30000, at most 300000).
    pub timeout_ms: Option<u64>,
    /// The conversation or chain the call belongs to: one of the caller's
    /// contexts (a context id), or a label of the caller's own for a chain
    /// outside Nexus's contexts (anything that is not a UUID).
    pub context: Option<String>,
}

fn empty_object() -> Value {
    json!({})
}

/// A call's result.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct CallResponse {
    /// The id the call was given (a UUIDv7; also in its `semantic.events` records).
    pub call_id: String,
    /// What the tool returned.
    #[schema(value_type = Object)]
    pub result: Value,
}

/// The HTTP status of a failed call.
pub fn status_of(error: &ToolError) -> StatusCode {
    match error {
        ToolError::NotFound { .. } => StatusCode::NOT_FOUND,
        ToolError::InvalidArguments { .. } | ToolError::ToolError { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        ToolError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        ToolError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        ToolError::PanelStatus { .. } | ToolError::InvalidResponse { .. } => StatusCode::BAD_GATEWAY,
        ToolError::PanelUnavailable { .. } | ToolError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        ToolError::InProgress { .. } | ToolError::Cancelled => StatusCode::CONFLICT,
        ToolError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Registers `/api/tools` and `/api/tools/{name}/call`.
pub fn configure(tools: ToolsApi) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(tools))
            .route("/api/tools", web::get().to(list_tools))
            .route("/api/tools/{name}/call", web::post().to(call_tool));
    }
}

#[utoipa::path(get, path = "/api/tools", security(("bearer" = [])),
    responses((status = 200, body = [ToolSpec]), (status = 401, body = ErrorBody)))]
/// The tools the caller may call: every system tool and the tools of the caller's panels.
pub async fn list_tools(caller: Caller, tools: web::Data<ToolsApi>) -> Result<HttpResponse, ApiError> {
    let list = tools.list(&caller.user).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().json(list))
}

#[utoipa::path(post, path = "/api/tools/{name}/call", request_body = CallRequest, security(("bearer" = [])),
    params(("name" = String, Path, description = "the tool's name, e.g. `list_documents` or `<panel-id>.word_count`")),
    responses((status = 200, body = CallResponse),
        (status = 401, body = ErrorBody),
        (status = 404, description = "not_found: no such tool for this user, or `context` is a context id that is not one of the caller's", body = ErrorBody),
        (status = 422, description = "invalid_arguments, or tool_error: the tool reported a failure", body = ErrorBody),
        (status = 413, description = "too_large", body = ErrorBody),
        (status = 502, description = "panel_status or invalid_response", body = ErrorBody),
        (status = 503, description = "panel_unavailable or busy", body = ErrorBody),
        (status = 504, description = "timeout", body = ErrorBody)))]
/// Calls a tool on the caller's behalf. A failed call answers
/// `{error, message, call_id, detail}`: the error's code, its text, the
/// call's id and the typed error.
pub async fn call_tool(
    caller: Caller,
    state: web::Data<TmState>,
    tools: web::Data<ToolsApi>,
    name: web::Path<String>,
    body: web::Json<CallRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let mut call = ToolCall::new(name.into_inner(), body.arguments, caller.user.clone());
    if let Some(ms) = body.timeout_ms {
        call = call.with_timeout(Duration::from_millis(ms));
    }
    for (what, value) in [("idempotency_key", &body.idempotency_key), ("context", &body.context)] {
        if value.as_ref().is_some_and(|v| v.is_empty() || v.len() > MAX_KEY) {
            return Err(ApiError::BadRequest(format!("{what} must be 1 to {MAX_KEY} characters")));
        }
    }
    if let Some(key) = body.idempotency_key {
        call = call.with_idempotency_key(key);
    }
    if let Some(context) = body.context {
        // Its records are keyed by it: a context id of someone else's would
        // put this caller's records into their journal.
        if is_context_id(&context) {
            let directory = ContextDirectory::new(state.platform.redis.clone());
            if directory.visible(&context, &caller.user, caller.is_admin()).await?.is_none() {
                return Err(ApiError::NotFound("context"));
            }
        }
        call = call.with_context(context);
    }
    let call_id = call.call_id.clone();
    match tools.call(call).await {
        Ok(result) => Ok(HttpResponse::Ok().json(CallResponse { call_id, result })),
        Err(error) => {
            let mut response = HttpResponse::build(status_of(&error));
            if matches!(error, ToolError::Busy { .. }) {
                response.insert_header(("Retry-After", "1"));
            }
            Ok(response.json(
                json!({ "error": error.code(), "message": error.to_string(), "call_id": call_id, "detail": error }),
            ))
        }
    }
}
