//! The `transaction-manager` role: the HTTP API where users log in and
//! keep their panels and documents (state in Redis, changes announced on
//! the transactional bus). WebSocket sessions, the MCP endpoint and the
//! Studio UI build on it. Accounts, tokens and panel records belong to the
//! [platform](crate::platform); this role serves them over HTTP.

pub mod agent_messages;
pub mod api;
pub mod contexts;
pub mod documents;
pub mod mcp;
pub mod metrics;
pub mod protocol;
pub mod session;
pub mod system_prompts;
pub mod system_tools;
pub mod tools_api;
pub mod ui;

use actix_web::{web, HttpResponse};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;

pub use api::{TmState, UiConfig};
pub use documents::Documents;

use crate::bus::redis::Publisher;
use crate::platform::auth::limiter::{LoginLimiter, LoginLimits};
use crate::platform::auth::password::Passwords;
use crate::platform::error::{json_config, path_config, query_config};
use crate::platform::Platform;
use metrics::TmMetrics;

#[derive(OpenApi)]
#[openapi(
    info(title = "Nexus transaction manager", description = "Login, panels, versioned documents, tools and LLM contexts."),
    paths(
        api::accounts::login,
        api::accounts::logout,
        api::accounts::me,
        api::accounts::create_user,
        api::accounts::revoke,
        api::config,
        api::panels::list_panels,
        api::panels::create_panel,
        api::panels::get_panel,
        api::panels::update_panel,
        api::panels::delete_panel,
        api::panels::panel_access,
        api::documents::list_documents,
        api::documents::create_document,
        api::documents::get_document,
        api::documents::patch_document,
        api::documents::document_history,
        api::documents::delete_document,
        api::contexts::create_context,
        api::contexts::list_contexts,
        api::contexts::get_context,
        api::contexts::post_message,
        api::contexts::cancel_context,
        api::contexts::context_events,
        api::contexts::context_transcript,
        api::contexts::fork_context,
        tools_api::list_tools,
        tools_api::call_tool,
    ),
    components(schemas(
        api::accounts::Login,
        api::accounts::Token,
        api::accounts::NewUser,
        api::accounts::Me,
        api::ClientConfig,
        api::panels::NewPanel,
        api::panels::PanelUpdate,
        api::panels::PanelAccess,
        api::documents::NewDocument,
        api::documents::DocumentPatch,
        api::contexts::NewMessage,
        api::contexts::ForkRequest,
        api::contexts::ContextEvent,
        api::contexts::EventsPage,
        contexts::NewContext,
        contexts::Accepted,
        crate::semantic::directory::ContextInfo,
        crate::semantic::records::ForkPoint,
        crate::semantic::records::RequestedCall,
        crate::semantic::records::Usage,
        crate::semantic::records::TurnOutcome,
        crate::semantic::chat::ChatMessage,
        crate::semantic::chat::Role,
        crate::semantic::chat::MessageToolCall,
        crate::semantic::fold::Transcript,
        crate::semantic::fold::TranscriptMessage,
        crate::semantic::fold::StepTiming,
        crate::semantic::fold::OpenTurn,
        crate::platform::ErrorBody,
        crate::platform::UserRole,
        crate::platform::Panel,
        crate::platform::PanelMode,
        documents::Document,
        documents::Change,
        tools_api::CallRequest,
        tools_api::CallResponse,
        crate::tools::ToolSpec,
        crate::tools::ToolOwner,
    )),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// This role's API description; the node merges the other roles' into it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The role's state over the node's platform, failed logins limited by
/// `login_limits`. The UI settings are the defaults (no gateway) and it
/// serves no contexts; set `ui` and `contexts` on the result to change them.
pub fn state(
    platform: Platform,
    login_limits: LoginLimits,
    publish: Option<Publisher>,
    node: &str,
    registry: &prometheus::Registry,
) -> TmState {
    TmState {
        documents: Documents::new(platform.redis.clone()),
        passwords: Passwords::for_this_machine(),
        limiter: LoginLimiter::new(platform.redis.clone(), login_limits),
        platform,
        publish,
        node: node.to_owned(),
        ui: UiConfig::default(),
        metrics: TmMetrics::register(registry),
        contexts: None,
    }
}

/// Registers the role's routes. `/api/openapi.json` (given whole, as
/// `openapi`), `/api/config` and `/api/login` are open; everything else
/// under `/api` needs a token.
pub fn configure(state: web::Data<TmState>, openapi: utoipa::openapi::OpenApi) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let openapi = web::Data::new(openapi);
        cfg.app_data(web::Data::new(state.platform.auth.clone()))
            .app_data(state)
            .app_data(json_config())
            .app_data(path_config())
            .app_data(query_config())
            .configure(ui::configure)
            .app_data(openapi)
            .route(
                "/api/openapi.json",
                web::get().to(|doc: web::Data<utoipa::openapi::OpenApi>| async move {
                    HttpResponse::Ok().json(doc.get_ref())
                }),
            )
            // The upgrade itself goes to `session::upgrades`, on the server's side.
            .route("/ws", web::get().to(session::not_upgraded))
            .route("/api/config", web::get().to(api::config))
            .route("/api/login", web::post().to(api::accounts::login))
            .route("/api/logout", web::post().to(api::accounts::logout))
            .route("/api/me", web::get().to(api::accounts::me))
            .route("/api/users", web::post().to(api::accounts::create_user))
            .route("/api/users/{name}/revoke", web::post().to(api::accounts::revoke))
            .route("/api/panels", web::get().to(api::panels::list_panels))
            .route("/api/panels", web::post().to(api::panels::create_panel))
            .route("/api/panels/{id}", web::get().to(api::panels::get_panel))
            .route("/api/panels/{id}", web::put().to(api::panels::update_panel))
            .route("/api/panels/{id}", web::delete().to(api::panels::delete_panel))
            .route("/api/panels/{id}/access", web::post().to(api::panels::panel_access))
            .route("/api/documents", web::get().to(api::documents::list_documents))
            .route("/api/documents", web::post().to(api::documents::create_document))
            .route("/api/documents/{id}", web::get().to(api::documents::get_document))
            .route("/api/documents/{id}", web::patch().to(api::documents::patch_document))
            .route("/api/documents/{id}", web::delete().to(api::documents::delete_document))
            .route("/api/documents/{id}/history", web::get().to(api::documents::document_history))
            .route("/api/contexts", web::get().to(api::contexts::list_contexts))
            .route("/api/contexts", web::post().to(api::contexts::create_context))
            .route("/api/contexts/{id}", web::get().to(api::contexts::get_context))
            .route("/api/contexts/{id}/messages", web::post().to(api::contexts::post_message))
            .route("/api/contexts/{id}/cancel", web::post().to(api::contexts::cancel_context))
            .route("/api/contexts/{id}/events", web::get().to(api::contexts::context_events))
            .route("/api/contexts/{id}/transcript", web::get().to(api::contexts::context_transcript))
            .route("/api/contexts/{id}/fork", web::post().to(api::contexts::fork_context));
    }
}

/// The catch-all for `/api/*`; register it after every other route.
pub fn configure_fallback(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/{tail:.*}", web::route().to(api::unknown));
}
