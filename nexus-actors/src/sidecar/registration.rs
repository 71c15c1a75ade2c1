//! Keeps the panel's tools listed: reads `GET /manifest` until the panel
//! answers, registers its tools, and re-reads it every poll interval (so a
//! changed manifest or a restarted panel is registered again) and on
//! `POST /reload`. The listing expires unless refreshed, so the tools of a
//! panel that stays down, or whose sidecar died, leave it. An invalid
//! manifest is refused whole and logged; the last valid one stays listed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::panel::{ManifestFetchError, PanelClient};
use crate::kernel::lock;
use crate::telemetry::Metrics;
use crate::tools::manifest::Manifest;
use crate::tools::store::{PanelExtras, ToolStore, ToolStoreError};

/// How often the manifest is read while the panel does not answer yet.
const STARTUP_POLL: Duration = Duration::from_millis(250);

/// How a manifest read went, the `outcome` of `nexus_sidecar_manifest_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ManifestOutcome {
    /// A new or changed manifest was listed.
    Registered,
    /// The listed manifest was still served; its listing was extended.
    Unchanged,
    /// Nothing answered, or an error status (401: a refused secret).
    Unreachable,
    /// A manifest that breaks the contract.
    Invalid,
}

impl ManifestOutcome {
    fn label(self) -> &'static str {
        match self {
            ManifestOutcome::Registered => "registered",
            ManifestOutcome::Unchanged => "unchanged",
            ManifestOutcome::Unreachable => "unreachable",
            ManifestOutcome::Invalid => "invalid",
        }
    }
}

/// The panel's state as the sidecar last saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum PanelState {
    /// Not read yet.
    #[default]
    Starting,
    /// Answering, with these tools (local names) listed.
    Up {
        /// The listed tools' local names.
        tools: Vec<String>,
    },
    /// Not answering `/manifest` (or answering it with an error status).
    Down {
        /// Why.
        reason: String,
    },
    /// Answering with a manifest that breaks the contract.
    Invalid {
        /// The broken rule.
        reason: String,
    },
    /// Answering, but the listing could not be written (Redis is down).
    Unlisted {
        /// Why.
        reason: String,
    },
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
    /// This replica's name among the panel's listers (one per sidecar run).
    lister: String,
    /// The last manifest listed; held across a whole sync, so syncs run one
    /// at a time.
    registered: Arc<tokio::sync::Mutex<Option<Manifest>>>,
    /// Kept apart so that reading it never waits for a slow sync.
    state: Arc<Mutex<PanelState>>,
}

impl Registrar {
    /// Lists `panel_id`'s tools (owned by `user`) for `ttl` at a time.
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
            lister: uuid::Uuid::now_v7().to_string(),
            registered: Arc::default(),
            state: Arc::default(),
        }
    }

    /// The panel's state as last seen.
    pub fn state(&self) -> PanelState {
        lock(&self.state).clone()
    }

    /// Reads the manifest once and brings the listing up to date.
    pub async fn sync(&self) -> PanelState {
        let mut registered = self.registered.lock().await;
        let state = match self.panel.manifest().await {
            Ok(manifest) => match self.list(&mut registered, manifest).await {
                Ok(state) => state,
                Err(error) => PanelState::Unlisted { reason: error.to_string() },
            },
            Err(error @ (ManifestFetchError::Unreachable { .. } | ManifestFetchError::Status(_))) => {
                self.count(ManifestOutcome::Unreachable);
                PanelState::Down { reason: error.to_string() }
            }
            Err(error) => {
                self.count(ManifestOutcome::Invalid);
                if let Some(manifest) = registered.as_ref() {
                    if let Err(e) = self.keep(manifest).await {
                        tracing::warn!(error = %e, "could not refresh the panel's listing");
                    }
                }
                PanelState::Invalid { reason: error.to_string() }
            }
        };
        let previous = std::mem::replace(&mut *lock(&self.state), state.clone());
        if state != previous {
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
                PanelState::Unlisted { reason } => {
                    tracing::warn!(panel = %self.panel_id, %reason, "could not list the panel's tools; retrying")
                }
                PanelState::Starting => {}
            }
        }
        state
    }

    async fn list(&self, registered: &mut Option<Manifest>, manifest: Manifest) -> Result<PanelState, ToolStoreError> {
        let refreshed = if registered.as_ref() == Some(&manifest) {
            self.keep(&manifest).await?
        } else {
            self.put(&manifest).await?;
            false
        };
        self.count(if refreshed { ManifestOutcome::Unchanged } else { ManifestOutcome::Registered });
        let tools = manifest.tools.iter().map(|t| t.name.clone()).collect();
        *registered = Some(manifest);
        Ok(PanelState::Up { tools })
    }

    fn count(&self, outcome: ManifestOutcome) {
        self.metrics.sidecar_manifest.with_label_values(&[outcome.label()]).inc();
    }

    /// Keeps `manifest`'s listing alive (also while the panel serves a bad
    /// manifest), writing it again if it expired; `true` when extending it
    /// was enough.
    async fn keep(&self, manifest: &Manifest) -> Result<bool, ToolStoreError> {
        if self.store.refresh_panel(&self.panel_id, &self.user, &self.lister, self.ttl).await? {
            return Ok(true);
        }
        self.put(manifest).await?;
        Ok(false)
    }

    async fn put(&self, manifest: &Manifest) -> Result<(), ToolStoreError> {
        let specs = manifest.specs(&self.panel_id, &self.user);
        let extras = PanelExtras { prompts: &manifest.prompts, resources: &manifest.resources };
        self.store.put_panel(&self.panel_id, &self.user, &self.lister, &specs, extras, self.ttl).await
    }

    /// Syncs forever: quickly until the panel first answers, then every
    /// `interval` (at most a second apart while it is down or unlisted).
    pub async fn run(self, interval: Duration) {
        loop {
            let next = match self.sync().await {
                PanelState::Up { .. } | PanelState::Invalid { .. } => interval,
                _ if self.registered.lock().await.is_none() => STARTUP_POLL,
                _ => interval.min(Duration::from_secs(1)),
            };
            tokio::time::sleep(next).await;
        }
    }

    /// Stops keeping the panel's tools listed (the sidecar is stopping):
    /// they leave the listing unless another replica of the panel keeps them.
    pub async fn unlist(&self) {
        match self.store.remove_panel(&self.panel_id, &self.user, &self.lister).await {
            Ok(true) => tracing::info!(panel = %self.panel_id, "the panel's tools left the listing"),
            Ok(false) => tracing::info!(panel = %self.panel_id, "other replicas keep the panel's tools listed"),
            Err(error) => tracing::warn!(%error, "could not unlist the panel's tools"),
        }
    }
}
