//! The transaction manager's HTTP API: login, users, panel records and
//! versioned documents. Every route but login needs a valid token
//! ([`Caller`]); a user reaches only their own panels and documents (403
//! otherwise); a write against a stale document version gets 409.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::auth::{hash_password, password_matches, Auth, Caller};
use super::store::{Change, Document, Panel, PanelMode, Store, StoreError, Write};
use crate::bus::redis::Publish;
use crate::envelope::Envelope;
use crate::kernel::Link;

/// Largest JSON body the API accepts.
pub const MAX_BODY: usize = 1 << 20;

/// What a failed request gets: a status and a JSON body saying why.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("wrong username or password")]
    BadCredentials,
    #[error("this belongs to another user")]
    Forbidden,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("request body is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("{0}")]
    Conflict(String, Option<u64>),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `stale_version`.
    pub error: String,
    pub message: String,
    /// For `stale_version`: the version the document is at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadCredentials => "bad_credentials",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::TooLarge => "too_large",
            ApiError::Conflict(_, Some(_)) => "stale_version",
            ApiError::Conflict(_, None) => "conflict",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::BadCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(..) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let current_version = match self {
            ApiError::Conflict(_, v) => *v,
            _ => None,
        };
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        response.json(ErrorBody { error: self.code().to_owned(), message: self.to_string(), current_version })
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        ApiError::Internal(e.to_string())
    }
}

/// Shared by every handler of one node.
pub struct TmState {
    pub store: Store,
    pub auth: Auth,
    /// Where document changes are announced (`nexus:doc:{id}`), if wired.
    pub publish: Option<Link<Publish>>,
    pub node: String,
    /// What the Studio UI is told at `GET /api/config`.
    pub ui: UiConfig,
}

/// Settings of the node that the Studio UI needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiConfig {
    /// Where browsers reach the traffic gateway (`http://host:port`), if
    /// this node has one; panels open at `<gateway>/p/<panel-id>/`.
    pub gateway_url: Option<String>,
    /// How often the UI sends a heartbeat for an open Studio instance.
    pub heartbeat_secs: u64,
}

impl Default for UiConfig {
    fn default() -> Self {
        // The watchdog's default is 30 minutes without one: 5 minutes
        // leaves room for a few lost heartbeats.
        UiConfig { gateway_url: None, heartbeat_secs: 300 }
    }
}

/// The answer of `GET /api/config`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct ClientConfig {
    /// Base URL of the traffic gateway; null when this node runs none.
    pub gateway: Option<String>,
    pub heartbeat_secs: u64,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct Login {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct Token {
    pub token: String,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct NewUser {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct NewPanel {
    pub name: String,
    pub mode: PanelMode,
    pub source: String,
}

/// Fields to change; absent fields stay as they are.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct PanelUpdate {
    pub name: Option<String>,
    pub mode: Option<PanelMode>,
    pub source: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct NewDocument {
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

#[derive(Debug, Deserialize)]
pub struct Since {
    #[serde(default)]
    pub since: u64,
}

fn check_name(what: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() || value.len() > max {
        return Err(ApiError::BadRequest(format!("{what} must be 1 to {max} characters")));
    }
    Ok(())
}

fn check_username(name: &str) -> Result<(), ApiError> {
    check_name("username", name, 64)?;
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err(ApiError::BadRequest("username may hold letters, digits, '.', '_' and '-'".into()));
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/login", request_body = Login,
    responses((status = 200, body = Token), (status = 401, body = ErrorBody)))]
pub async fn login(state: web::Data<TmState>, body: web::Json<Login>) -> Result<HttpResponse, ApiError> {
    let hash = state.store.password_hash(&body.username).await?;
    if !hash.is_some_and(|h| password_matches(&body.password, &h)) {
        tracing::info!(user = %body.username, "login refused");
        return Err(ApiError::BadCredentials);
    }
    let (token, expires_at) = state.auth.issue(&body.username);
    Ok(HttpResponse::Ok().json(Token { token, expires_at }))
}

/// Open (no token): the UI reads it before logging in, and it holds
/// nothing secret.
#[utoipa::path(get, path = "/api/config", responses((status = 200, body = ClientConfig)))]
pub async fn config(state: web::Data<TmState>) -> HttpResponse {
    let ui = &state.ui;
    HttpResponse::Ok().json(ClientConfig { gateway: ui.gateway_url.clone(), heartbeat_secs: ui.heartbeat_secs })
}

#[utoipa::path(post, path = "/api/users", request_body = NewUser, security(("bearer" = [])),
    responses((status = 201), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_user(
    _caller: Caller,
    state: web::Data<TmState>,
    body: web::Json<NewUser>,
) -> Result<HttpResponse, ApiError> {
    check_username(&body.username)?;
    if body.password.len() < 8 {
        return Err(ApiError::BadRequest("password must be at least 8 characters".into()));
    }
    if !state.store.create_user(&body.username, &hash_password(&body.password)).await? {
        return Err(ApiError::Conflict(format!("user {} exists", body.username), None));
    }
    Ok(HttpResponse::Created().json(json!({ "username": body.username })))
}

#[utoipa::path(get, path = "/api/panels", security(("bearer" = [])),
    responses((status = 200, body = [Panel]), (status = 401, body = ErrorBody)))]
pub async fn list_panels(caller: Caller, state: web::Data<TmState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.store.panels_of(&caller.0).await?))
}

#[utoipa::path(post, path = "/api/panels", request_body = NewPanel, security(("bearer" = [])),
    responses((status = 201, body = Panel), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn create_panel(
    caller: Caller,
    state: web::Data<TmState>,
    body: web::Json<NewPanel>,
) -> Result<HttpResponse, ApiError> {
    check_name("name", &body.name, 200)?;
    check_name("source", &body.source, 2048)?;
    let body = body.into_inner();
    let panel = Panel {
        id: uuid::Uuid::now_v7().to_string(),
        name: body.name,
        owner: caller.0,
        mode: body.mode,
        source: body.source,
    };
    state.store.put_panel(&panel).await?;
    announce_panel(&state, PanelChanged { id: panel.id.clone(), panel: Some(panel.clone()) }, &panel.owner).await;
    Ok(HttpResponse::Created().json(panel))
}

async fn own_panel(state: &TmState, caller: &Caller, id: &str) -> Result<Panel, ApiError> {
    let panel = state.store.panel(id).await?.ok_or(ApiError::NotFound("panel"))?;
    if panel.owner != caller.0 {
        return Err(ApiError::Forbidden);
    }
    Ok(panel)
}

#[utoipa::path(get, path = "/api/panels/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Panel), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_panel(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(own_panel(&state, &caller, &id).await?))
}

#[utoipa::path(put, path = "/api/panels/{id}", request_body = PanelUpdate, security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Panel), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn update_panel(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
    body: web::Json<PanelUpdate>,
) -> Result<HttpResponse, ApiError> {
    let mut panel = own_panel(&state, &caller, &id).await?;
    let body = body.into_inner();
    if let Some(name) = body.name {
        check_name("name", &name, 200)?;
        panel.name = name;
    }
    if let Some(source) = body.source {
        check_name("source", &source, 2048)?;
        panel.source = source;
    }
    if let Some(mode) = body.mode {
        panel.mode = mode;
    }
    state.store.put_panel(&panel).await?;
    announce_panel(&state, PanelChanged { id: panel.id.clone(), panel: Some(panel.clone()) }, &panel.owner).await;
    Ok(HttpResponse::Ok().json(panel))
}

#[utoipa::path(delete, path = "/api/panels/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_panel(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&state, &caller, &id).await?;
    state.store.delete_panel(&panel).await?;
    announce_panel(&state, PanelChanged { id: panel.id.clone(), panel: None }, &panel.owner).await;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(get, path = "/api/documents", security(("bearer" = [])),
    responses((status = 200, body = [Document]), (status = 401, body = ErrorBody)))]
pub async fn list_documents(caller: Caller, state: web::Data<TmState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.store.documents_of(&caller.0).await?))
}

#[utoipa::path(post, path = "/api/documents", request_body = NewDocument, security(("bearer" = [])),
    responses((status = 201, body = Document), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn create_document(
    caller: Caller,
    state: web::Data<TmState>,
    body: web::Json<NewDocument>,
) -> Result<HttpResponse, ApiError> {
    let id = uuid::Uuid::now_v7().to_string();
    let doc = state.store.create_document(&id, &caller.0, &body.state).await?;
    Ok(HttpResponse::Created().json(doc))
}

async fn own_document(state: &TmState, caller: &Caller, id: &str) -> Result<Document, ApiError> {
    let doc = state.store.document(id).await?.ok_or(ApiError::NotFound("document"))?;
    if doc.owner != caller.0 {
        return Err(ApiError::Forbidden);
    }
    Ok(doc)
}

#[utoipa::path(get, path = "/api/documents/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Document), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_document(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(own_document(&state, &caller, &id).await?))
}

/// Announced on `nexus:panels:{owner}` when a panel record is created,
/// changed (`panel` is its new state) or deleted (`panel` is null).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PanelChanged {
    pub id: String,
    pub panel: Option<Panel>,
}

impl crate::envelope::Payload for PanelChanged {
    const TYPE: &'static str = "nexus.panel.changed";
}

/// The channel where a user's panel changes are announced.
/// (A pub/sub channel; Redis keeps channels apart from the key of the same name.)
pub fn panels_channel(owner: &str) -> String {
    format!("nexus:panels:{owner}")
}

async fn announce_panel(state: &TmState, change: PanelChanged, owner: &str) {
    if let Some(publish) = &state.publish {
        let envelope = Envelope::new(state.node.clone(), change).into_untyped();
        // Best effort, like document announcements: the record is saved.
        let _ = publish.ask(Publish { channel: panels_channel(owner), envelope }).await;
    }
}

/// The CloudEvents payload announcing a document change on `nexus:doc:{id}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DocumentChanged {
    pub id: String,
    pub version: u64,
    pub patch: Value,
}

impl crate::envelope::Payload for DocumentChanged {
    const TYPE: &'static str = "nexus.document.changed";
}

#[utoipa::path(patch, path = "/api/documents/{id}", request_body = DocumentPatch, security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Document), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "stale version", body = ErrorBody)))]
pub async fn patch_document(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
    body: web::Json<DocumentPatch>,
) -> Result<HttpResponse, ApiError> {
    let current = own_document(&state, &caller, &id).await?;
    let doc = match state.store.patch_document(current, body.version, &body.patch).await? {
        Write::Applied(doc) => doc,
        Write::Stale { current } => {
            return Err(ApiError::Conflict(
                format!("document is at version {current}, the patch was made against {}", body.version),
                Some(current),
            ))
        }
        Write::Missing => return Err(ApiError::NotFound("document")),
    };
    if let Some(publish) = &state.publish {
        let change = DocumentChanged { id: doc.id.clone(), version: doc.version, patch: body.into_inner().patch };
        let envelope = Envelope::new(state.node.clone(), change).into_untyped();
        // Announcing is best effort: the change is saved, and subscribers
        // resync from the versioned state when they miss one.
        let _ = publish.ask(Publish { channel: format!("nexus:doc:{}", doc.id), envelope }).await;
    }
    Ok(HttpResponse::Ok().json(doc))
}

#[utoipa::path(get, path = "/api/documents/{id}/history", security(("bearer" = [])),
    params(("id" = String, Path), ("since" = Option<u64>, Query, description = "only changes after this version")),
    responses((status = 200, body = [Change]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn document_history(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
    since: web::Query<Since>,
) -> Result<HttpResponse, ApiError> {
    own_document(&state, &caller, &id).await?;
    Ok(HttpResponse::Ok().json(state.store.history(&id, since.since).await?))
}

#[utoipa::path(delete, path = "/api/documents/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_document(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let doc = own_document(&state, &caller, &id).await?;
    state.store.delete_document(&doc).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Any other `/api/*` path: 401 without a token, 404 with one.
pub async fn unknown(_caller: Caller) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("route"))
}
