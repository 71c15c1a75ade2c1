//! The transaction manager's HTTP API: accounts and login
//! ([`accounts`]), panel records ([`panels`]), versioned documents
//! ([`documents`]) and LLM contexts ([`contexts`]). Every route but login and the UI's config needs a
//! valid token ([`Caller`]); a user reaches only their own panels and
//! documents (403 otherwise); admins manage users.

pub mod accounts;
pub mod contexts;
pub mod documents;
pub mod panels;

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::contexts::ContextsApi;
use super::documents::{Document, Documents};
use super::metrics::TmMetrics;
use crate::bus::redis::Publisher;
use crate::envelope::{Envelope, Payload};
use crate::platform::auth::limiter::LoginLimiter;
use crate::platform::auth::password::Passwords;
use crate::platform::{ApiError, Caller, Panel, Platform};

/// Shared by every handler of one node.
pub struct TmState {
    /// Accounts, panel records, tokens and quotas.
    pub platform: Platform,
    /// The role's documents.
    pub documents: Documents,
    /// Password hashing, off the HTTP workers.
    pub passwords: Passwords,
    /// Failed-login limits.
    pub limiter: LoginLimiter,
    /// Where changes are announced, if wired.
    pub publish: Option<Publisher>,
    /// This node's name, the source of its announcements.
    pub node: String,
    /// What the Studio UI is told at `GET /api/config`.
    pub ui: UiConfig,
    /// The role's metric families.
    pub metrics: TmMetrics,
    /// LLM contexts; `None` on a node without the semantic bus (only in
    /// tests: every node has Kafka), where the context routes answer 503.
    pub contexts: Option<ContextsApi>,
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
    /// How often the UI sends a Studio heartbeat.
    pub heartbeat_secs: u64,
}

/// Open (no token): the UI reads it before logging in, and it holds
/// nothing secret.
#[utoipa::path(get, path = "/api/config", responses((status = 200, body = ClientConfig)))]
pub async fn config(state: web::Data<TmState>) -> HttpResponse {
    let ui = &state.ui;
    HttpResponse::Ok().json(ClientConfig { gateway: ui.gateway_url.clone(), heartbeat_secs: ui.heartbeat_secs })
}

/// Any other `/api/*` path: 401 without a token, 404 with one.
pub async fn unknown(_caller: Caller) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("route"))
}

/// The panel `id` if it is the caller's: 404 unknown, 403 another user's.
pub async fn own_panel(platform: &Platform, caller: &Caller, id: &str) -> Result<Panel, ApiError> {
    let panel = platform.panels.get(id).await?.ok_or(ApiError::NotFound("panel"))?;
    if panel.owner != caller.user {
        return Err(ApiError::NotOwner);
    }
    Ok(panel)
}

/// The document `id` if it is the caller's: 404 unknown, 403 another user's.
pub async fn own_document(state: &TmState, caller: &Caller, id: &str) -> Result<Document, ApiError> {
    let doc = state.documents.get(id).await?.ok_or(ApiError::NotFound("document"))?;
    if doc.owner != caller.user {
        return Err(ApiError::NotOwner);
    }
    Ok(doc)
}

impl TmState {
    /// Announces `payload` on `channel`. Best effort: what it announces is
    /// saved already, and subscribers resync from the versioned state
    /// when they miss an announcement.
    pub async fn announce<P: Payload>(&self, channel: String, payload: P) {
        if let Some(publish) = &self.publish {
            let envelope = Envelope::new(self.node.clone(), payload).into_untyped();
            if let Err(error) = publish.publish(channel, envelope).await {
                tracing::warn!(%error, "announcement not published");
            }
        }
    }

    /// Announces `payload` on document `id`'s (shard) channel, as
    /// [`TmState::announce`].
    pub async fn announce_document<P: Payload>(&self, id: &str, payload: P) {
        if let Some(publish) = &self.publish {
            let envelope = Envelope::new(self.node.clone(), payload).into_untyped();
            if let Err(error) = publish.publish_shard(crate::platform::channels::document(id), envelope).await {
                tracing::warn!(%error, "announcement not published");
            }
        }
    }
}
