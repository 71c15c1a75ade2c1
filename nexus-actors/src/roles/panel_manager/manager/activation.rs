//! Activation: a gateway holds requests for an App with no instance and
//! asks the panel managers (`nexus.panel.activate`, repeated while it
//! waits) to start one. One node claims it in Redis (`SET NX`) and starts
//! one instance, if the panel still has its record, is still deployed and
//! its owner is within the quota; a claim is released once an instance
//! serves or ends. A request that comes while an instance drains for
//! idleness takes it back instead of a cold start. An activation that is
//! refused starts nothing: the gateway's held requests time out as for any
//! failed start.

use super::super::driver::Code;
use super::super::metrics::QuotaAction;
use super::super::store::{AppRecord, PmStore};
use super::app::newest;
use super::running_elsewhere;
use super::table::{Leaving, Table};
use super::PanelManager;
use crate::instance::InstanceMode;
use crate::kernel::{lock, Ctx, Handler, Message, Reply};
use crate::platform::PanelRecords;

/// How an activation claim was decided.
pub(super) enum ClaimOutcome {
    /// This node holds the claim for this App record; its owner runs
    /// `elsewhere` instances on other nodes.
    Won { app: AppRecord, elsewhere: usize },
    /// Not deployed, another node holds the claim, or Redis failed.
    Lost,
    /// The panel's record is gone: clean up as for a deleted panel.
    PanelGone,
}

/// The activation claim was decided for the panel as it was at `generation`.
pub(super) struct Claimed {
    panel: String,
    generation: u64,
    outcome: ClaimOutcome,
}

impl Message for Claimed {
    type Reply = ();
}

impl PanelManager {
    /// A gateway asked for an instance of `panel`.
    pub(super) fn activate(&self, panel: String) {
        let mut table = lock(&self.table);
        if table.forgetting.contains(&panel) {
            return;
        }
        // A request came for an App whose instance drains for idleness: it
        // still runs, so it takes the request back instead of a cold start.
        let mut kept = 0;
        if let Some(entry) = table.panels.get_mut(&panel) {
            for live in entry.instances.values_mut() {
                if matches!(live.leaving, Some(Leaving::Draining { idle: true, .. })) {
                    live.leaving = None;
                    kept += 1;
                }
            }
        }
        if kept > 0 {
            tracing::info!(%panel, instances = kept, "scale to zero cancelled: an activation came during the drain");
            self.sync_route(&mut table, &panel);
            return;
        }
        let busy = table.panels.get(&panel).is_some_and(|e| e.running(InstanceMode::App).next().is_some());
        if busy || table.claiming.contains(&panel) || table.claimed.contains(&panel) {
            return;
        }
        table.claiming.insert(panel.clone());
        // Taken before anything is read: a Deploy or Undeploy after this
        // point makes whatever the reads below find too old.
        let generation = table.generation(&panel);
        drop(table);
        let (store, panels, node) = (self.deps.store.clone(), self.deps.panels.clone(), self.deps.config.node.clone());
        let Some(me) = self.me.clone() else { return };
        let claimed = me.link::<Claimed>("activation");
        actix::spawn(async move {
            let outcome = claim(&store, &panels, &panel, &node).await;
            let _ = claimed.tell(Claimed { panel, generation, outcome });
        });
    }

    /// Gives up the panel's activation claim if this node holds it.
    pub(super) fn release_claim(&self, table: &mut Table, panel: &str) {
        if table.claimed.remove(panel) {
            let (store, node, panel) = (self.deps.store.clone(), self.deps.config.node.clone(), panel.to_owned());
            actix::spawn(async move {
                if let Err(error) = store.release_activation(&panel, &node).await {
                    tracing::warn!(%panel, %error, "could not release the activation claim");
                }
            });
        }
    }
}

impl Handler<Claimed> for PanelManager {
    fn handle(&mut self, msg: Claimed, _: &mut Ctx<Self>) -> Reply<()> {
        let mut table = lock(&self.table);
        let panel = msg.panel;
        table.claiming.remove(&panel);
        let (app, elsewhere) = match msg.outcome {
            ClaimOutcome::Won { app, elsewhere } => (app, elsewhere),
            ClaimOutcome::Lost => return Reply::Now(()),
            ClaimOutcome::PanelGone => {
                drop(table);
                self.panel_deleted(&panel);
                return Reply::Now(());
            }
        };
        table.claimed.insert(panel.clone());
        if table.forgetting.contains(&panel) {
            self.release_claim(&mut table, &panel);
            return Reply::Now(());
        }
        if table.generation(&panel) != msg.generation {
            tracing::info!(%panel, "activation dropped: the panel was deployed or undeployed meanwhile");
            self.release_claim(&mut table, &panel);
            return Reply::Now(());
        }
        let running = table.panels.get(&panel).is_some_and(|e| e.running(InstanceMode::App).next().is_some());
        if !running && self.within_quota(&table, &app.owner, None, elsewhere, 1, QuotaAction::Activation).is_err() {
            tracing::warn!(%panel, owner = %app.owner, "activation refused: the owner runs as many instances as allowed");
            self.release_claim(&mut table, &panel);
            return Reply::Now(());
        }
        let entry = table.panels.entry(panel.clone()).or_default();
        // The record was read before the claim: one this node wrote since
        // (same generation) may be newer.
        let app = newest(entry.app.take(), app);
        entry.owner = app.owner.clone();
        entry.app = Some(app.clone());
        if running {
            self.release_claim(&mut table, &panel);
        } else {
            tracing::info!(%panel, version = app.version, "activating a scaled-to-zero App");
            self.spawn_instance(&mut table, &panel, &app.owner, Code::App(app.snapshot()));
        }
        self.sync_route(&mut table, &panel);
        Reply::Now(())
    }
}

/// Decides an activation: the panel must still have its record and a
/// deployed App, and this node must win the claim.
async fn claim(store: &PmStore, panels: &PanelRecords, panel: &str, node: &str) -> ClaimOutcome {
    match panels.get(panel).await {
        Ok(None) => {
            tracing::info!(%panel, "activation for a panel whose record is gone: cleaning it up");
            return ClaimOutcome::PanelGone;
        }
        Ok(Some(_)) => {}
        // Unknown is not gone: the App record decides below.
        Err(error) => tracing::warn!(%panel, %error, "could not read the panel record to activate"),
    }
    let app = match store.app(panel).await {
        Ok(Some(app)) => app,
        Ok(None) => {
            tracing::info!(%panel, "activation for a panel that is not deployed; ignored");
            return ClaimOutcome::Lost;
        }
        Err(error) => {
            tracing::warn!(%panel, %error, "could not read the App record to activate");
            return ClaimOutcome::Lost;
        }
    };
    let elsewhere = match running_elsewhere(store, panels, &app.owner, node).await {
        Ok(elsewhere) => elsewhere,
        Err(error) => {
            tracing::warn!(%panel, %error, "could not count the owner's instances to activate");
            return ClaimOutcome::Lost;
        }
    };
    match store.claim_activation(panel, node, super::super::ACTIVATION_CLAIM_TTL).await {
        Ok(true) => ClaimOutcome::Won { app, elsewhere },
        Ok(false) => ClaimOutcome::Lost,
        Err(error) => {
            tracing::warn!(%panel, %error, "activation claim failed");
            // A timed-out SET may still have landed: a claim nobody
            // knows it holds would block activations until it expires.
            if let Err(error) = store.release_activation(panel, node).await {
                tracing::warn!(%panel, %error, "could not release an activation claim that failed");
            }
            ClaimOutcome::Lost
        }
    }
}
