//! The panel manager's HTTP API: a panel's instances, its Studio instance,
//! App deploys and scaling, and logs. Every route needs a token
//! ([`Caller`]) and the panel must be the caller's (404 unknown, 403
//! another user's), checked against the transaction manager's panel
//! records. Errors are the transaction manager's [`ApiError`] JSON.
//! Policy (what may run when) is the [`PanelManager`]'s, not this module's.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::driver::DriverError;
use super::manager::{Deploy, PanelManager, Scale, StartStudio, StopStudio, Undeploy};
use super::store::AppRecord;
use super::{PanelManagerError, PanelManagerHandle};
use crate::instance::InstanceStatus;
use crate::kernel::{AskError, Handler, Message};
use crate::platform::{ApiError, Caller, ErrorBody, Panel, PanelRecords};

/// Log lines returned when the request does not say.
const DEFAULT_LOG_LINES: usize = 100;
const MAX_LOG_LINES: usize = 1000;

/// Shared by the handlers of one node.
pub struct PmApi {
    /// The node's panel manager.
    pub handle: PanelManagerHandle,
    /// The panel records: who owns which panel.
    pub panels: PanelRecords,
    /// Bytes of file and archive bodies held in memory at once, node-wide.
    pub file_bodies: tokio::sync::Semaphore,
}

/// A deployed App, as the API reports it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    /// The panel id.
    pub panel: String,
    /// The snapshot version that runs.
    pub version: u64,
    /// How many instances should run.
    pub replicas: u32,
}

impl From<AppRecord> for Deployment {
    fn from(app: AppRecord) -> Self {
        Deployment { panel: app.panel, version: app.version, replicas: app.replicas }
    }
}

/// `PUT /api/panels/{id}/scale`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScaleRequest {
    /// How many instances should run.
    pub replicas: u32,
}

/// `GET /api/panels/{id}/logs?lines=N&instance=I`.
#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    /// How many of the last lines (default 100, at most 1000).
    pub lines: Option<usize>,
    /// Which instance; the latest by default.
    pub instance: Option<String>,
}

/// An instance's last log lines.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Logs {
    /// The instance.
    pub instance: String,
    /// Its last lines, oldest first.
    pub lines: Vec<String>,
}

impl From<PanelManagerError> for ApiError {
    fn from(e: PanelManagerError) -> Self {
        match e {
            PanelManagerError::Conflict(m) => ApiError::Conflict(m),
            e @ PanelManagerError::NotDeployed => ApiError::Conflict(e.to_string()),
            e @ PanelManagerError::BadReplicas { .. } => ApiError::BadRequest(e.to_string()),
            PanelManagerError::Quota { limit } => ApiError::Quota { what: "running instances", limit },
            PanelManagerError::Driver(
                e @ (DriverError::UnknownSource(..)
                | DriverError::NoCommand
                | DriverError::PanelFile(_)
                | DriverError::ForeignLink(_)),
            ) => ApiError::BadRequest(e.to_string()),
            e => {
                tracing::error!(error = %e, "panel manager error");
                ApiError::Internal(e.to_string())
            }
        }
    }
}

pub(super) async fn own_panel(api: &PmApi, caller: &Caller, id: &str) -> Result<Panel, ApiError> {
    let panel = api.panels.get(id).await?.ok_or(ApiError::NotFound("panel"))?;
    if panel.owner != caller.user {
        return Err(ApiError::NotOwner);
    }
    Ok(panel)
}

async fn ask<M>(api: &PmApi, msg: M) -> Result<M::Reply, ApiError>
where
    M: Message,
    PanelManager: Handler<M>,
{
    api.handle.actor.link::<M>("panel-manager-api").ask(msg).await.map_err(|e: AskError<M>| {
        tracing::error!(error = %e, "panel manager did not answer");
        ApiError::Internal(format!("panel manager: {e}"))
    })
}

/// The panel's instance statuses (live and the last final ones).
#[utoipa::path(get, path = "/api/panels/{id}/instances", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = [InstanceStatus]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_instances(
    caller: Caller,
    api: web::Data<PmApi>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, &id).await?;
    let statuses = api.handle.store.statuses(&panel.id).await.map_err(PanelManagerError::from)?;
    Ok(HttpResponse::Ok().json(statuses))
}

/// Starts the panel's Studio instance.
#[utoipa::path(post, path = "/api/panels/{id}/studio", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 201, body = InstanceStatus), (status = 401, body = ErrorBody), (status = 403, description = "not the owner, or quota_exceeded: the owner runs as many instances as allowed", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "running, or deployed as an App", body = ErrorBody)))]
pub async fn start_studio(
    caller: Caller,
    api: web::Data<PmApi>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, &id).await?;
    let status = ask(&api, StartStudio { panel }).await??;
    Ok(HttpResponse::Created().json(status))
}

/// Stops the panel's Studio instance.
#[utoipa::path(delete, path = "/api/panels/{id}/studio", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 202), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "no Studio instance runs", body = ErrorBody)))]
pub async fn stop_studio(
    caller: Caller,
    api: web::Data<PmApi>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, &id).await?;
    ask(&api, StopStudio { panel: panel.id.clone() }).await??;
    Ok(HttpResponse::Accepted().json(serde_json::json!({ "panel": panel.id })))
}

/// Snapshots the panel's code and runs it as an App.
#[utoipa::path(post, path = "/api/panels/{id}/deploy", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 201, body = Deployment), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "not the owner, or quota_exceeded: the owner runs as many instances as allowed", body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn deploy(caller: Caller, api: web::Data<PmApi>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, &id).await?;
    let app = ask(&api, Deploy { panel }).await??;
    Ok(HttpResponse::Created().json(Deployment::from(app)))
}

/// Runs that many instances of the deployed App.
#[utoipa::path(put, path = "/api/panels/{id}/scale", request_body = ScaleRequest, security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 200, body = Deployment), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "not the owner, or quota_exceeded: the owner runs as many instances as allowed", body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "not deployed", body = ErrorBody)))]
pub async fn scale(
    caller: Caller,
    api: web::Data<PmApi>,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, &id).await?;
    let request: ScaleRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}; expected {{\"replicas\": n}}")))?;
    let app = ask(&api, Scale { panel: panel.id, replicas: request.replicas }).await??;
    Ok(HttpResponse::Ok().json(Deployment::from(app)))
}

/// Stops every instance of the panel and undeploys it.
#[utoipa::path(delete, path = "/api/panels/{id}/instances", security(("bearer" = [])), params(("id" = String, Path)),
    responses((status = 202), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn stop_everything(
    caller: Caller,
    api: web::Data<PmApi>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, &id).await?;
    ask(&api, Undeploy { panel: panel.id.clone() }).await??;
    Ok(HttpResponse::Accepted().json(serde_json::json!({ "panel": panel.id })))
}

/// The last lines of an instance's log.
#[utoipa::path(get, path = "/api/panels/{id}/logs", security(("bearer" = [])),
    params(("id" = String, Path), ("lines" = Option<usize>, Query, description = "how many of the last lines (default 100, at most 1000)"),
        ("instance" = Option<String>, Query, description = "which instance; the latest by default")),
    responses((status = 200, body = Logs), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn logs(
    caller: Caller,
    api: web::Data<PmApi>,
    id: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let panel = own_panel(&api, &caller, &id).await?;
    let query = web::Query::<LogsQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?
        .into_inner();
    let lines = query.lines.unwrap_or(DEFAULT_LOG_LINES);
    if lines == 0 || lines > MAX_LOG_LINES {
        return Err(ApiError::BadRequest(format!("lines must be 1 to {MAX_LOG_LINES}")));
    }
    let statuses = api.handle.store.statuses(&panel.id).await.map_err(PanelManagerError::from)?;
    // Only this panel's instances: an instance id names nothing else's log.
    let instance = match query.instance {
        Some(wanted) => statuses.into_iter().find(|s| s.instance == wanted),
        None => {
            let latest_live = statuses.iter().filter(|s| !s.state.is_final()).max_by_key(|s| s.since_ms).cloned();
            latest_live.or_else(|| statuses.into_iter().max_by_key(|s| s.since_ms))
        }
    }
    .ok_or(ApiError::NotFound("instance"))?
    .instance;
    let lines = match api.handle.driver.logs(&instance, lines).await {
        Ok(lines) => lines,
        Err(DriverError::NoInstance(_)) => return Err(ApiError::NotFound("instance log")),
        Err(e) => return Err(PanelManagerError::from(e).into()),
    };
    Ok(HttpResponse::Ok().json(Logs { instance, lines }))
}

/// The OpenAPI description of these routes, to merge into the node's.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list_instances, start_studio, stop_studio, deploy, scale, stop_everything, logs),
    components(schemas(
        Deployment,
        ScaleRequest,
        Logs,
        InstanceStatus,
        crate::instance::InstanceMode,
        crate::instance::InstanceState,
        crate::instance::Isolation,
    ))
)]
pub struct PanelManagerApiDoc;

pub(super) fn routes(cfg: &mut web::ServiceConfig, api: PmApi) {
    cfg.app_data(web::Data::new(api))
        .route("/api/panels/{id}/instances", web::get().to(list_instances))
        .route("/api/panels/{id}/instances", web::delete().to(stop_everything))
        .route("/api/panels/{id}/studio", web::post().to(start_studio))
        .route("/api/panels/{id}/studio", web::delete().to(stop_studio))
        .route("/api/panels/{id}/deploy", web::post().to(deploy))
        .route("/api/panels/{id}/scale", web::put().to(scale))
        .route("/api/panels/{id}/logs", web::get().to(logs));
    super::files_api::routes(cfg);
}
