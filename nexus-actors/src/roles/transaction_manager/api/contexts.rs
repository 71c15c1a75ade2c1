//! LLM contexts over HTTP: create, list, post messages, cancel, read the
//! journal, rebuild the transcript at any offset and fork. Only a
//! context's owner or an admin reaches it; anyone else gets 404, as for a
//! context that does not exist, and that check comes before anything is
//! produced. Routes that need a model answer 503 `llm_unavailable` when
//! none is configured; reading works regardless. Messages are answered by
//! the LLM manager, asynchronously: a client follows them on the WebSocket
//! (`follow_context`) or reads `…/events`.

use std::fmt;

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::TmState;
use crate::platform::error::ErrorBody;
use crate::platform::{ApiError, Caller};
use crate::roles::transaction_manager::contexts::{
    check_message, Accepted, ContextsApi, NewContext, MAX_LISTED, NO_CONTEXTS,
};
use crate::semantic::directory::ContextInfo;
use crate::semantic::fold::{Entry, Transcript};
use crate::semantic::records::{Cancel, UserMessage};

/// Records `GET …/events` returns when the request does not say.
const DEFAULT_EVENTS: usize = 500;
/// Most records one events request returns.
const MAX_EVENTS: usize = 5000;

/// The body of `POST /api/contexts/{id}/messages`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMessage {
    /// What the caller says (1 byte to 64 KiB).
    pub content: String,
}

/// The body of `POST /api/contexts/{id}/fork`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// The parent's journal offset the fork branches at: its records up to and including it are the fork's history.
    pub at: i64,
}

/// The query of `GET /api/contexts/{id}/events`.
#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// The first offset to return (default: the context's first).
    #[serde(default)]
    pub from: i64,
    /// At most this many (default 500, at most 5000).
    pub limit: Option<usize>,
}

/// The query of `GET /api/contexts/{id}/transcript`.
#[derive(Debug, Deserialize)]
pub struct TranscriptQuery {
    /// The journal offset to rebuild the conversation at (default: the end).
    pub at: Option<i64>,
}

/// One record of a context's journal, as `…/events` lists it and
/// `nexus context tail` prints it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ContextEvent {
    /// Its offset in the context's partition of `semantic.events`.
    pub offset: i64,
    /// Its CloudEvents type, e.g. `nexus.llm.response`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When it was made.
    #[schema(value_type = String, format = DateTime)]
    pub time: DateTime<Utc>,
    /// Who wrote it: the context's writer, an LLM manager process
    /// (`<node>/<process>`), or the node whose tool registry recorded a call.
    pub source: String,
    /// Its payload.
    #[schema(value_type = Object)]
    pub data: Value,
    /// Its envelope id.
    pub id: String,
    /// The id of the envelope that caused it: the command, for the journal
    /// copy of a message (how a client whose message was accepted with
    /// `"offset": null` finds its turn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causationid: Option<String>,
}

impl From<Entry> for ContextEvent {
    fn from(entry: Entry) -> Self {
        let Entry { offset, envelope } = entry;
        ContextEvent {
            offset,
            kind: envelope.kind,
            time: envelope.time,
            source: envelope.source,
            data: envelope.data,
            id: envelope.id,
            causationid: envelope.causationid,
        }
    }
}

/// The answer of `GET /api/contexts/{id}/events`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct EventsPage {
    /// The context.
    pub context: String,
    /// Its records, in offset order.
    pub records: Vec<ContextEvent>,
    /// Where to read on from: after the last record returned, else `from`.
    pub next: i64,
}

/// A value shown as its JSON text (for the operator's `nexus context`
/// commands, which print what the API answers).
pub struct Json<'a, T>(pub &'a T);

impl<T: Serialize> fmt::Display for Json<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self.0).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

fn api(state: &TmState) -> Result<&ContextsApi, ApiError> {
    state.contexts.as_ref().ok_or(ApiError::LlmUnavailable(NO_CONTEXTS))
}

/// The context `id` if the caller may see it (404 otherwise, whoever's it is).
async fn visible(contexts: &ContextsApi, caller: &Caller, id: &str) -> Result<ContextInfo, ApiError> {
    Ok(contexts.visible(id, &caller.user, caller.is_admin()).await?)
}

#[utoipa::path(post, path = "/api/contexts", request_body = NewContext, security(("bearer" = [])),
    responses((status = 201, body = ContextInfo), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "the caller's context quota is used up", body = ErrorBody),
        (status = 503, description = "llm_unavailable: no model endpoint is configured; unavailable: Kafka did not take the command", body = ErrorBody)))]
/// Creates a context owned by the caller.
pub async fn create_context(
    caller: Caller,
    state: web::Data<TmState>,
    body: web::Json<NewContext>,
) -> Result<HttpResponse, ApiError> {
    let contexts = api(&state)?;
    contexts.need_model()?;
    let info = contexts.create(&caller.user, body.into_inner(), None).await?;
    Ok(HttpResponse::Created().json(info))
}

#[utoipa::path(get, path = "/api/contexts", security(("bearer" = [])),
    responses((status = 200, body = [ContextInfo], description = "newest first, at most 200"), (status = 401, body = ErrorBody)))]
/// The caller's contexts.
pub async fn list_contexts(caller: Caller, state: web::Data<TmState>) -> Result<HttpResponse, ApiError> {
    let contexts = api(&state)?;
    Ok(HttpResponse::Ok().json(contexts.directory.list(&caller.user, MAX_LISTED).await?))
}

#[utoipa::path(get, path = "/api/contexts/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = ContextInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
/// One context.
pub async fn get_context(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let contexts = api(&state)?;
    Ok(HttpResponse::Ok().json(visible(contexts, &caller, &id).await?))
}

#[utoipa::path(post, path = "/api/contexts/{id}/messages", request_body = NewMessage, security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 202, body = Accepted, description = "the command is on semantic.commands; its turn's records carry its offset (null in the rare case the broker acknowledged it without one and it could not be found: the journal copy of the message names the command's id as its causationid)"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, description = "the message is over 64 KiB", body = ErrorBody), (status = 503, body = ErrorBody)))]
/// Says something in a context; the model answers in a turn.
pub async fn post_message(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
    body: web::Json<NewMessage>,
) -> Result<HttpResponse, ApiError> {
    let contexts = api(&state)?;
    let info = visible(contexts, &caller, &id).await?;
    contexts.need_model()?;
    let content = body.into_inner().content;
    check_message(&content)?;
    let message = UserMessage { context: info.id.clone(), user: caller.user, content, command_offset: None };
    Ok(HttpResponse::Accepted().json(contexts.command(&info.id, message).await?))
}

#[utoipa::path(post, path = "/api/contexts/{id}/cancel", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
/// Stops the turn under way, if any.
pub async fn cancel_context(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let contexts = api(&state)?;
    let info = visible(contexts, &caller, &id).await?;
    let cancel = Cancel { context: info.id.clone(), user: caller.user };
    Ok(HttpResponse::Accepted().json(contexts.command(&info.id, cancel).await?))
}

#[utoipa::path(get, path = "/api/contexts/{id}/events", security(("bearer" = [])),
    params(("id" = String, Path), ("from" = Option<i64>, Query, description = "the first offset to return"),
        ("limit" = Option<usize>, Query, description = "at most this many (default 500, at most 5000)")),
    responses((status = 200, body = EventsPage, description = "empty until the LLM manager has journaled the context"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
/// The context's journal from an offset: how a client catches up on what it missed live.
pub async fn context_events(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
    query: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let contexts = api(&state)?;
    let info = visible(contexts, &caller, &id).await?;
    let limit = query.limit.unwrap_or(DEFAULT_EVENTS);
    if limit == 0 || limit > MAX_EVENTS {
        return Err(ApiError::BadRequest(format!("limit must be 1 to {MAX_EVENTS}")));
    }
    let records: Vec<ContextEvent> =
        contexts.events(&info, query.from, limit).await?.into_iter().map(ContextEvent::from).collect();
    let next = records.last().map_or(query.from, |r| r.offset + 1);
    Ok(HttpResponse::Ok().json(EventsPage { context: info.id, records, next }))
}

#[utoipa::path(get, path = "/api/contexts/{id}/transcript", security(("bearer" = [])),
    params(("id" = String, Path), ("at" = Option<i64>, Query, description = "a journal offset of the context (default: its end)")),
    responses((status = 200, body = Transcript, description = "rebuilt from the records alone, with every step's timing; no model is called"),
        (status = 400, description = "the offset is outside the context", body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "not journaled yet", body = ErrorBody), (status = 503, body = ErrorBody)))]
/// The conversation as it stood at an offset, mid-turn included.
pub async fn context_transcript(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
    query: web::Query<TranscriptQuery>,
) -> Result<HttpResponse, ApiError> {
    let contexts = api(&state)?;
    let info = visible(contexts, &caller, &id).await?;
    Ok(HttpResponse::Ok().json(contexts.transcript(&info, query.at).await?))
}

#[utoipa::path(post, path = "/api/contexts/{id}/fork", request_body = ForkRequest, security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 201, body = ContextInfo, description = "a new context of the caller's whose history is the parent's up to `at`"),
        (status = 400, description = "the offset is outside the context", body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "the caller's context quota is used up", body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "not journaled yet", body = ErrorBody), (status = 503, body = ErrorBody)))]
/// Branches a context at an offset; the parent's records are referenced, not copied.
pub async fn fork_context(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
    body: web::Json<ForkRequest>,
) -> Result<HttpResponse, ApiError> {
    let contexts = api(&state)?;
    let parent = visible(contexts, &caller, &id).await?;
    contexts.need_model()?;
    let info = contexts.fork(&parent, body.at, &caller.user).await?;
    Ok(HttpResponse::Created().json(info))
}
