//! Panel records over HTTP, owner only, and the cookie that opens a
//! panel at the traffic gateway.
//!
//! `POST /api/panels/{id}/access` gives the owner a cookie for
//! `/p/<id>/`: a token for that one panel ([`Audience::Panel`]), path-scoped,
//! `HttpOnly` (the panel's scripts cannot read it) and `SameSite=Strict`
//! (no other site can send it). Cookies are scoped by host, not port, so
//! the gateway on another port of the same host receives it; the UI asks
//! for it before it opens the panel's iframe.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{own_panel, TmState};
use crate::platform::auth::{panel_path, panel_set_cookie, Audience};
use crate::platform::channels;
use crate::platform::error::ErrorBody;
use crate::platform::{ApiError, Caller, Panel, PanelChanged, PanelMode};

/// The body of `POST /api/panels`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct NewPanel {
    /// What the owner calls it.
    pub name: String,
    /// How it runs.
    pub mode: PanelMode,
    /// Where its code comes from (`template:<name>`).
    pub source: String,
    /// Whether its App is served to anyone (default: owner only).
    #[serde(default)]
    pub public: bool,
}

/// Fields to change; absent fields stay as they are.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct PanelUpdate {
    /// A new name.
    pub name: Option<String>,
    /// A new mode.
    pub mode: Option<PanelMode>,
    /// A new source.
    pub source: Option<String>,
    /// Serve its App to anyone (true) or its owner only (false).
    pub public: Option<bool>,
}

/// The answer of `POST /api/panels/{id}/access`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct PanelAccess {
    /// The path the cookie opens.
    pub path: String,
    /// When it expires, seconds since the Unix epoch.
    pub expires_at: u64,
}

fn check_text(what: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() || value.len() > max {
        return Err(ApiError::BadRequest(format!("{what} must be 1 to {max} characters")));
    }
    Ok(())
}

async fn announce(state: &TmState, id: &str, owner: &str, panel: Option<Panel>) {
    state.announce(channels::panels(owner), PanelChanged { id: id.to_owned(), panel }).await;
}

#[utoipa::path(get, path = "/api/panels", security(("bearer" = [])),
    responses((status = 200, body = [Panel]), (status = 401, body = ErrorBody)))]
/// The caller's panels.
pub async fn list_panels(caller: Caller, state: web::Data<TmState>) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.platform.panels.of(&caller.user).await?))
}

#[utoipa::path(post, path = "/api/panels", request_body = NewPanel, security(("bearer" = [])),
    responses((status = 201, body = Panel), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "the caller's panel quota is used up", body = ErrorBody)))]
/// Creates a panel record.
pub async fn create_panel(
    caller: Caller,
    state: web::Data<TmState>,
    body: web::Json<NewPanel>,
) -> Result<HttpResponse, ApiError> {
    check_text("name", &body.name, 200)?;
    check_text("source", &body.source, 2048)?;
    let body = body.into_inner();
    let panel = Panel {
        id: uuid::Uuid::now_v7().to_string(),
        name: body.name,
        owner: caller.user,
        mode: body.mode,
        source: body.source,
        public: body.public,
    };
    let limit = state.platform.quotas.panels;
    if !state.platform.panels.create(&panel, limit).await? {
        return Err(ApiError::Quota { what: "panels", limit });
    }
    announce(&state, &panel.id, &panel.owner, Some(panel.clone())).await;
    Ok(HttpResponse::Created().json(panel))
}

#[utoipa::path(get, path = "/api/panels/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Panel), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
/// One of the caller's panels.
pub async fn get_panel(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(own_panel(&state.platform, &caller, &id).await?))
}

#[utoipa::path(put, path = "/api/panels/{id}", request_body = PanelUpdate, security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Panel), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
/// Changes one of the caller's panels.
pub async fn update_panel(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
    body: web::Json<PanelUpdate>,
) -> Result<HttpResponse, ApiError> {
    let mut panel = own_panel(&state.platform, &caller, &id).await?;
    let body = body.into_inner();
    if let Some(name) = body.name {
        check_text("name", &name, 200)?;
        panel.name = name;
    }
    if let Some(source) = body.source {
        check_text("source", &source, 2048)?;
        panel.source = source;
    }
    if let Some(mode) = body.mode {
        panel.mode = mode;
    }
    if let Some(public) = body.public {
        panel.public = public;
    }
    state.platform.panels.put(&panel).await?;
    announce(&state, &panel.id, &panel.owner, Some(panel.clone())).await;
    Ok(HttpResponse::Ok().json(panel))
}

#[utoipa::path(delete, path = "/api/panels/{id}", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
/// Deletes one of the caller's panels (its instances stop).
pub async fn delete_panel(
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&state.platform, &caller, &id).await?;
    state.platform.panels.delete(&panel).await?;
    announce(&state, &panel.id, &panel.owner, None).await;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(post, path = "/api/panels/{id}/access", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = PanelAccess, description = "with Set-Cookie: nexus_panel=…; Path=/p/<id>/; HttpOnly; SameSite=Strict"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
/// A cookie that opens one of the caller's panels at the traffic gateway.
pub async fn panel_access(
    req: HttpRequest,
    caller: Caller,
    state: web::Data<TmState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&state.platform, &caller, &id).await?;
    let (token, expires_at) = state.platform.auth.issue(&caller.user, &Audience::Panel(panel.id.clone())).await?;
    let secure = req.connection_info().scheme() == "https";
    Ok(HttpResponse::Ok()
        .insert_header(("Set-Cookie", panel_set_cookie(&panel.id, &token, secure)))
        .insert_header(("Cache-Control", "no-store"))
        .json(PanelAccess { path: panel_path(&panel.id), expires_at }))
}
