//! Deleted panels: a deletion heard on the owner's channel, found by
//! activation, or found by the slow sweep (the announcement was lost)
//! stops the panel's instances, removes its route, App record and
//! statuses, and has the driver forget its files once the last instance
//! has ended.

use super::super::reporter::Report;
use super::table::Table;
use super::PanelManager;
use crate::kernel::{lock, Ctx, Handler, Message, Reply};

/// Check the records of every panel this node knows.
pub(super) struct Sweep;

impl Message for Sweep {
    type Reply = ();
}

/// The panel's record is gone although no deletion was heard.
struct PanelGone {
    panel: String,
}

impl Message for PanelGone {
    type Reply = ();
}

impl PanelManager {
    /// Drops everything of the panel here and has the driver delete its files.
    pub(super) fn forget_now(&self, table: &mut Table, panel: &str) {
        table.bump(panel);
        table.forgetting.remove(panel);
        table.panels.remove(panel);
        table.claimed.remove(panel);
        self.deps.reporter.send(Report::ForgetPanel(panel.to_owned()));
        let driver = self.deps.driver.clone();
        let panel = panel.to_owned();
        actix::spawn(async move {
            match driver.forget(&panel).await {
                Ok(()) => tracing::info!(%panel, "deleted panel forgotten"),
                Err(error) => tracing::warn!(%panel, %error, "driver could not forget a deleted panel"),
            }
        });
    }

    /// The panel was deleted: its instances stop, then it is forgotten.
    pub(super) fn panel_deleted(&self, panel: &str) {
        let mut table = lock(&self.table);
        if table.forgetting.contains(panel) {
            return;
        }
        table.bump(panel);
        let has_instances = table.panels.get(panel).is_some_and(|e| !e.instances.is_empty());
        tracing::info!(%panel, "panel deleted: stopping its instances");
        if has_instances {
            table.forgetting.insert(panel.to_owned());
            if let Some(entry) = table.panels.get_mut(panel) {
                entry.app = None;
            }
            self.stop_where(&mut table, panel, "panel deleted", |_, _| true);
            // The route goes at once; statuses follow when the instances end.
            self.deps.reporter.send(Report::ForgetPanel(panel.to_owned()));
        } else {
            self.forget_now(&mut table, panel);
        }
    }
}

impl Handler<Sweep> for PanelManager {
    fn handle(&mut self, _: Sweep, _: &mut Ctx<Self>) -> Reply<()> {
        let known: Vec<String> = {
            let table = lock(&self.table);
            table.panels.keys().filter(|p| !table.forgetting.contains(*p)).cloned().collect()
        };
        let (Some(me), false) = (self.me.clone(), known.is_empty()) else { return Reply::Now(()) };
        let panels = self.deps.panels.clone();
        let gone = me.link::<PanelGone>("timer");
        Reply::later(async move {
            for panel in known {
                match panels.get(&panel).await {
                    Ok(None) => {
                        let _ = gone.tell(PanelGone { panel });
                    }
                    Ok(Some(_)) => {}
                    Err(error) => tracing::warn!(%panel, %error, "could not check the panel record"),
                }
            }
        })
    }
}

impl Handler<PanelGone> for PanelManager {
    fn handle(&mut self, msg: PanelGone, _: &mut Ctx<Self>) -> Reply<()> {
        tracing::warn!(panel = %msg.panel, "the panel's record is gone but its deletion was not heard; cleaning up");
        self.panel_deleted(&msg.panel);
        Reply::Now(())
    }
}
