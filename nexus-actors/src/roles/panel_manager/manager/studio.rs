//! A panel's one Studio instance: started on its persistent volume when
//! no App is deployed and no other Studio instance (on any node) runs or
//! is still stopping, within the owner's quota; stopped on request.

use super::super::driver::Code;
use super::super::metrics::QuotaAction;
use super::super::PanelManagerError;
use super::table::PanelEntry;
use super::{running_elsewhere, PanelManager};
use crate::instance::{InstanceMode, InstanceState, InstanceStatus};
use crate::kernel::{lock, Ctx, Handler, Message, Reply};
use crate::platform::Panel;

/// Starts the panel's Studio instance (409 when one runs or it is an App).
pub struct StartStudio {
    /// The panel, as its record says (the API checked the caller owns it).
    pub panel: Panel,
}

impl Message for StartStudio {
    type Reply = Result<InstanceStatus, PanelManagerError>;
}

/// Stops the panel's Studio instance.
pub struct StopStudio {
    /// The panel id.
    pub panel: String,
}

impl Message for StopStudio {
    type Reply = Result<(), PanelManagerError>;
}

/// Spawns a Studio instance once its volume is ready.
pub(super) struct SpawnStudio {
    panel: Panel,
    code: Code,
    /// The owner's instances on other nodes, read just before.
    elsewhere: usize,
}

impl Message for SpawnStudio {
    type Reply = Result<InstanceStatus, PanelManagerError>;
}

fn deployed() -> PanelManagerError {
    PanelManagerError::Conflict("the panel is deployed as an App; undeploy it first".into())
}

fn studio_conflict(entry: Option<&PanelEntry>) -> Option<PanelManagerError> {
    let entry = entry?;
    if entry.app.is_some() {
        return Some(deployed());
    }
    // One Studio instance per volume: one that is still stopping holds it too.
    let (id, live) = entry.instances.iter().find(|(_, l)| l.mode == InstanceMode::Studio)?;
    Some(PanelManagerError::Conflict(match live.leaving {
        Some(_) => format!("the Studio instance of this panel is still stopping ({id}); try again"),
        None => format!("a Studio instance of this panel is running ({id})"),
    }))
}

impl Handler<StartStudio> for PanelManager {
    fn handle(&mut self, msg: StartStudio, _: &mut Ctx<Self>) -> Reply<Result<InstanceStatus, PanelManagerError>> {
        {
            let table = lock(&self.table);
            if let Some(conflict) = studio_conflict(table.panels.get(&msg.panel.id)) {
                return Reply::Now(Err(conflict));
            }
            // Refused here already when this node alone fills the quota:
            // nothing is read or created for a start that cannot happen.
            let owner = &msg.panel.owner;
            if let Err(quota) = self.within_quota(&table, owner, None, 0, 1, QuotaAction::Studio) {
                return Reply::Now(Err(quota));
            }
        }
        let (store, driver, panels) = (self.deps.store.clone(), self.deps.driver.clone(), self.deps.panels.clone());
        let node = self.deps.config.node.clone();
        let Some(me) = self.me.clone() else { return Reply::Now(Err(PanelManagerError::Stopped)) };
        let spawn = me.link::<SpawnStudio>("panel-manager-api");
        Reply::later(async move {
            let panel = msg.panel;
            if store.app(&panel.id).await?.is_some() {
                return Err(deployed());
            }
            // Another node's Studio instance of this panel.
            if let Some(other) = store
                .statuses(&panel.id)
                .await?
                .into_iter()
                .find(|s| s.mode == InstanceMode::Studio && !s.state.is_final())
            {
                return Err(PanelManagerError::Conflict(if other.state == InstanceState::Stopping {
                    format!("the Studio instance of this panel is still stopping ({}); try again", other.instance)
                } else {
                    format!("a Studio instance of this panel is running ({})", other.instance)
                }));
            }
            let elsewhere = running_elsewhere(&store, &panels, &panel.owner, &node).await?;
            let volume = driver.volume(&panel.id, &panel.source).await?;
            spawn
                .ask(SpawnStudio { panel, code: Code::Studio(volume), elsewhere })
                .await
                .map_err(|_| PanelManagerError::Stopped)?
        })
    }
}

impl Handler<SpawnStudio> for PanelManager {
    fn handle(&mut self, msg: SpawnStudio, _: &mut Ctx<Self>) -> Reply<Result<InstanceStatus, PanelManagerError>> {
        let mut table = lock(&self.table);
        if let Some(conflict) = studio_conflict(table.panels.get(&msg.panel.id)) {
            return Reply::Now(Err(conflict));
        }
        let owner = &msg.panel.owner;
        if let Err(quota) = self.within_quota(&table, owner, None, msg.elsewhere, 1, QuotaAction::Studio) {
            return Reply::Now(Err(quota));
        }
        let status = self.spawn_instance(&mut table, &msg.panel.id, owner, msg.code);
        self.sync_route(&mut table, &msg.panel.id);
        Reply::Now(status.ok_or(PanelManagerError::Stopped))
    }
}

impl Handler<StopStudio> for PanelManager {
    fn handle(&mut self, msg: StopStudio, _: &mut Ctx<Self>) -> Reply<Result<(), PanelManagerError>> {
        let mut table = lock(&self.table);
        let stopped =
            self.stop_where(&mut table, &msg.panel, "stopped by its owner", |_, l| l.mode == InstanceMode::Studio);
        Reply::Now(if stopped == 0 {
            Err(PanelManagerError::Conflict("no Studio instance of this panel is running here".into()))
        } else {
            Ok(())
        })
    }
}
