//! Keeps the panel's tools listed: reads `GET /manifest` until the panel
//! answers, registers its tools, and re-reads it every poll interval (so a
//! changed manifest or a restarted panel is registered again) and on
//! `POST /reload`. The listing expires unless refreshed, so the tools of a
//! panel that stays down, or whose sidecar died, leave it. An invalid
//! manifest is refused whole and logged; the last valid one stays listed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::panel::{ManifestFetchError, PanelClient};
use crate::telemetry::Metrics;
use crate::tools::manifest::Manifest;
use crate::tools::store::ToolStore;

/// How often the manifest is read while the panel does not answer yet.
const STARTUP_POLL: Duration = Duration::from_millis(250);

/// The panel's state as the sidecar last saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum PanelState {
    #[default]
    Starting,
    /// Answering, with these tools (local names) listed.
    Up { tools: Vec<String> },
    /// Not answering /manifest.
    Down { reason: String },
    /// Answering with a manifest that breaks the contract.
    Invalid { reason: String },
}

struct Inner {
    registered: Option<Manifest>,
    state: PanelState,
}

/// Registers one panel's tools. Cheap to clone.
#[derive(Clone)]
pub struct Registrar {
    panel_id: String,
    user: String,
    panel: PanelClient,
    store: ToolStore,
    metrics: Metrics,
    ttl: Duration,
    inner: Arc<Mutex<Inner>>,
}

impl Registrar {
    pub fn new(
        panel_id: &str,
        user: &str,
        panel: PanelClient,
        store: ToolStore,
        metrics: Metrics,
        ttl: Duration,
    ) -> Self {
        Registrar {
            panel_id: panel_id.to_owned(),
            user: user.to_owned(),
            panel,
            store,
            metrics,
            ttl,
            inner: Arc::new(Mutex::new(Inner { registered: None, state: PanelState::Starting })),
        }
    }

    pub async fn state(&self) -> PanelState {
        self.inner.lock().await.state.clone()
    }

    /// Reads the manifest once and brings the listing up to date.
    pub async fn sync(&self) -> PanelState {
        let mut inner = self.inner.lock().await;
        let state = match self.panel.manifest().await {
            Ok(manifest) => match self.list(&mut inner, manifest).await {
                Ok(state) => state,
                Err(error) => {
                    tracing::warn!(%error, "could not list the panel's tools; retrying at the next poll");
                    inner.state.clone()
                }
            },
            Err(ManifestFetchError::Unreachable { message, .. }) => {
                self.metrics.sidecar_manifest.with_label_values(&["unreachable"]).inc();
                PanelState::Down { reason: message }
            }
            Err(error) => {
                self.metrics.sidecar_manifest.with_label_values(&["invalid"]).inc();
                self.refresh(&inner).await;
                PanelState::Invalid { reason: error.to_string() }
            }
        };
        if state != inner.state {
            match &state {
                PanelState::Up { tools } => {
                    tracing::info!(panel = %self.panel_id, ?tools, "panel is up; tools registered")
                }
                PanelState::Down { reason } => {
                    tracing::warn!(panel = %self.panel_id, %reason, "panel is not answering")
                }
                PanelState::Invalid { reason } => {
                    tracing::error!(panel = %self.panel_id, %reason, "manifest refused; the last valid one stays listed")
                }
                PanelState::Starting => {}
            }
        }
        inner.state = state.clone();
        state
    }

    async fn list(
        &self,
        inner: &mut Inner,
        manifest: Manifest,
    ) -> Result<PanelState, crate::tools::store::ToolStoreError> {
        let unchanged = inner.registered.as_ref() == Some(&manifest);
        if unchanged && self.store.refresh_panel(&self.panel_id, self.ttl).await? {
            self.metrics.sidecar_manifest.with_label_values(&["unchanged"]).inc();
        } else {
            self.store
                .put_panel(&self.panel_id, &self.user, &manifest.specs(&self.panel_id, &self.user), self.ttl)
                .await?;
            self.metrics.sidecar_manifest.with_label_values(&["registered"]).inc();
        }
        let tools = manifest.tools.iter().map(|t| t.name.clone()).collect();
        inner.registered = Some(manifest);
        Ok(PanelState::Up { tools })
    }

    /// Keeps the last valid listing alive while the panel serves a bad manifest.
    async fn refresh(&self, inner: &Inner) {
        if let Some(manifest) = &inner.registered {
            let specs = manifest.specs(&self.panel_id, &self.user);
            if !self.store.refresh_panel(&self.panel_id, self.ttl).await.unwrap_or(false) {
                let _ = self.store.put_panel(&self.panel_id, &self.user, &specs, self.ttl).await;
            }
        }
    }

    /// Syncs forever: quickly until the panel first answers, then every `interval`.
    pub async fn run(self, interval: Duration) {
        loop {
            let state = self.sync().await;
            let next = match state {
                PanelState::Up { .. } | PanelState::Invalid { .. } => interval,
                PanelState::Down { .. } | PanelState::Starting if self.inner.lock().await.registered.is_none() => {
                    STARTUP_POLL
                }
                _ => interval.min(Duration::from_secs(1)),
            };
            tokio::time::sleep(next).await;
        }
    }

    /// Takes the panel's tools out of the listing (the sidecar is stopping).
    pub async fn unlist(&self) {
        if let Err(error) = self.store.remove_panel(&self.panel_id, &self.user).await {
            tracing::warn!(%error, "could not unlist the panel's tools");
        }
    }
}
