//! The `transaction-manager` role: the HTTP API where users log in and
//! keep their panels and documents (state in Redis, changes announced on
//! the transactional bus). WebSocket sessions and the Studio UI build on it.

pub mod api;
pub mod auth;
pub mod mcp;
pub mod protocol;
pub mod session;
pub mod store;
pub mod system_tools;
pub mod tools_api;
pub mod ui;

use actix_web::error::JsonPayloadError;
use actix_web::{web, HttpResponse};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;

pub use api::{TmState, UiConfig};
pub use auth::Auth;
pub use store::Store;

use crate::bus::redis::Publish;
use crate::kernel::Link;

#[derive(OpenApi)]
#[openapi(
    info(title = "Nexus transaction manager", description = "Login, panels, versioned documents and tools."),
    paths(
        api::login,
        api::config,
        api::create_user,
        api::list_panels,
        api::create_panel,
        api::get_panel,
        api::update_panel,
        api::delete_panel,
        api::list_documents,
        api::create_document,
        api::get_document,
        api::patch_document,
        api::document_history,
        api::delete_document,
        tools_api::list_tools,
        tools_api::call_tool,
    ),
    components(schemas(
        api::Login,
        api::Token,
        api::ClientConfig,
        api::NewUser,
        api::NewPanel,
        api::PanelUpdate,
        api::NewDocument,
        api::DocumentPatch,
        api::ErrorBody,
        store::Panel,
        store::PanelMode,
        store::Document,
        store::Change,
        tools_api::CallRequest,
        tools_api::CallResponse,
        crate::tools::ToolSpec,
        crate::tools::ToolOwner,
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The API description: this role's routes and the panel manager's.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::roles::panel_manager::api::PanelManagerApiDoc::openapi());
    doc
}

/// Connects to Redis and loads the shared token secret. The UI settings are
/// the defaults (no gateway); set `ui` on the result to change them.
pub async fn state(redis_url: &str, publish: Option<Link<Publish>>, node: &str) -> Result<TmState, store::StoreError> {
    let store = Store::connect(redis_url).await?;
    let auth = Auth::new(&store.signing_secret().await?);
    Ok(TmState { store, auth, publish, node: node.to_owned(), ui: UiConfig::default() })
}

/// Registers the role's routes. `/api/openapi.json`, `/api/config` and
/// `/api/login` are open; everything else under `/api` needs a token.
pub fn configure(state: web::Data<TmState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let json = web::JsonConfig::default().limit(api::MAX_BODY).error_handler(|err, _| {
            match err {
                JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
                    api::ApiError::TooLarge
                }
                err => api::ApiError::BadRequest(format!("invalid JSON body: {err}")),
            }
            .into()
        });
        let path = web::PathConfig::default().error_handler(|err, _| api::ApiError::BadRequest(err.to_string()).into());
        cfg.app_data(web::Data::new(state.auth.clone()))
            .app_data(state)
            .app_data(json)
            .app_data(path)
            .configure(ui::configure)
            .route("/api/openapi.json", web::get().to(|| async { HttpResponse::Ok().json(openapi()) }))
            .route("/api/config", web::get().to(api::config))
            .route("/api/login", web::post().to(api::login))
            .route("/api/users", web::post().to(api::create_user))
            .route("/api/panels", web::get().to(api::list_panels))
            .route("/api/panels", web::post().to(api::create_panel))
            .route("/api/panels/{id}", web::get().to(api::get_panel))
            .route("/api/panels/{id}", web::put().to(api::update_panel))
            .route("/api/panels/{id}", web::delete().to(api::delete_panel))
            .route("/api/documents", web::get().to(api::list_documents))
            .route("/api/documents", web::post().to(api::create_document))
            .route("/api/documents/{id}", web::get().to(api::get_document))
            .route("/api/documents/{id}", web::patch().to(api::patch_document))
            .route("/api/documents/{id}", web::delete().to(api::delete_document))
            .route("/api/documents/{id}/history", web::get().to(api::document_history));
    }
}

/// Registers `GET /ws`, the WebSocket endpoint of [`session::Session`]s.
pub fn configure_sessions(deps: session::SessionDeps) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(deps)).route("/ws", web::get().to(session::upgrade));
    }
}

/// The catch-all for `/api/*`; register it after every other route.
pub fn configure_fallback(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/{tail:.*}", web::route().to(api::unknown));
}
