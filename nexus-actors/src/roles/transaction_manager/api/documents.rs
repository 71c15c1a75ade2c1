//! Versioned documents over HTTP, owner only. A patch applies only at the
//! version its writer saw (409 `stale_version` otherwise) and only while
//! the document stays within [`MAX_DOCUMENT`] (413 otherwise); each applied
//! change is announced on the document's channel.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::{own_document, TmState};
use crate::envelope::{Payload, MAX_ENVELOPE_BYTES};
use crate::platform::error::ErrorBody;
use crate::platform::{ApiError, Caller};
use crate::roles::transaction_manager::documents::{Change, Created, Document, Write, MAX_DOCUMENT};

/// Changes `GET …/history` returns when the request does not say.
const DEFAULT_HISTORY: usize = 1000;
/// Most changes one history request returns.
const MAX_HISTORY: usize = 10_000;
/// Room an announcement keeps for everything but the patch.
const ENVELOPE_OVERHEAD: usize = 4096;

/// The body of `POST /api/documents`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct NewDocument {
    /// The document's first state.
    pub state: Value,
}

/// A change to a document, valid only at `version`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct DocumentPatch {
    /// The version the writer last saw.
    pub version: u64,
    /// A JSON merge patch (RFC 7396).
    pub patch: Value,
}

/// The query of `GET /api/documents/{id}/history`.
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    /// Only changes after this version.
    #[serde(default)]
    pub since: u64,
    /// At most this many (default 1000, at most 10000).
    pub limit: Option<usize>,
}

/// The CloudEvents payload announcing a document change on `nexus:doc:{id}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DocumentChanged {
    /// The document.
    pub id: String,
    /// The version the change made.
    pub version: u64,
    /// The merge patch; `null` when it was too large to announce, and
    /// followers fetch the version instead.
    pub patch: Value,
}

impl Payload for DocumentChanged {
    const TYPE: &'static str = "nexus.document.changed";
}

#[utoipa::path(get, path = "/api/documents", security(("bearer" = [])),
    responses((status = 200, body = [Document]), (status = 401, body = ErrorBody)))]
/// The caller's documents.
pub async fn list_documents(caller: Caller, state: web::Data<TmState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.documents.of(&caller.user).await?))
}

#[utoipa::path(post, path = "/api/documents", request_body = NewDocument, security(("bearer" = [])),
    responses((status = 201, body = Document), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "the caller's document quota is used up", body = ErrorBody), (status = 413, body = ErrorBody)))]
/// Creates a document at version 1.
pub async fn create_document(
    caller: Caller,
    state: web::Data<TmState>,
    body: web::Json<NewDocument>,
) -> Result<HttpResponse, ApiError> {
    let id = uuid::Uuid::now_v7().to_string();
    let limit = state.platform.quotas.documents;
    match state.documents.create(&id, &caller.user, &body.state, limit).await? {
        Created::Document(doc) => Ok(HttpResponse::Created().json(doc)),
        Created::OverQuota => Err(ApiError::Quota { what: "documents", limit }),
        Created::TooLarge { bytes } => Err(ApiError::DocumentTooLarge { bytes, limit: MAX_DOCUMENT }),
    }
}

#[utoipa::path(get, path = "/api/documents/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Document), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
/// One of the caller's documents.
pub async fn get_document(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(own_document(&state, &caller, &id).await?))
}

#[utoipa::path(patch, path = "/api/documents/{id}", request_body = DocumentPatch, security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Document), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "stale version", body = ErrorBody),
        (status = 413, description = "the document would grow past 1 MiB", body = ErrorBody)))]
/// Applies a merge patch at the version the writer saw.
pub async fn patch_document(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
    body: web::Json<DocumentPatch>,
) -> Result<HttpResponse, ApiError> {
    let current = own_document(&state, &caller, &id).await?;
    let DocumentPatch { version: seen, patch } = body.into_inner();
    let doc = match state.documents.patch(current, seen, &patch).await? {
        Write::Applied(doc) => doc,
        Write::Stale { current } => return Err(ApiError::StaleVersion { current, seen }),
        Write::Missing => return Err(ApiError::NotFound("document")),
        Write::TooLarge { bytes } => return Err(ApiError::DocumentTooLarge { bytes, limit: MAX_DOCUMENT }),
    };
    // A patch too large for an envelope is announced without it: followers
    // see the new version and fetch it, instead of missing the change.
    let patch = if patch.to_string().len() + ENVELOPE_OVERHEAD > MAX_ENVELOPE_BYTES { Value::Null } else { patch };
    let change = DocumentChanged { id: doc.id.clone(), version: doc.version, patch };
    state.announce_document(&doc.id, change).await;
    Ok(HttpResponse::Ok().json(doc))
}

#[utoipa::path(get, path = "/api/documents/{id}/history", security(("bearer" = [])),
    params(("id" = String, Path), ("since" = Option<u64>, Query, description = "only changes after this version"),
        ("limit" = Option<usize>, Query, description = "at most this many (default 1000, at most 10000)")),
    responses((status = 200, body = [Change], description = "oldest first; it starts later than since + 1 when the history was trimmed"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
/// Changes after a version, oldest first.
pub async fn document_history(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
    query: web::Query<HistoryQuery>,
) -> Result<HttpResponse, ApiError> {
    own_document(&state, &caller, &id).await?;
    let limit = query.limit.unwrap_or(DEFAULT_HISTORY);
    if limit == 0 || limit > MAX_HISTORY {
        return Err(ApiError::BadRequest(format!("limit must be 1 to {MAX_HISTORY}")));
    }
    Ok(HttpResponse::Ok().json(state.documents.history(&id, query.since, limit).await?))
}

#[utoipa::path(delete, path = "/api/documents/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
/// Deletes one of the caller's documents.
pub async fn delete_document(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let doc = own_document(&state, &caller, &id).await?;
    state.documents.delete(&doc).await?;
    Ok(HttpResponse::NoContent().finish())
}
