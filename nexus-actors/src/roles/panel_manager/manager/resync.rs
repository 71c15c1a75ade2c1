//! Resync: the routes of the panels this node runs instances of, and the
//! statuses of those instances, are
//! written to Redis again, every `resync` interval and whenever the bus
//! comes back, so a write lost to a Redis blip (or given up after its
//! retries) is repaired without waiting for the next state change. Each
//! status goes the way its transitions go, so none is written over a newer
//! one. App records are not rewritten here: a deploy writes its record
//! before it applies it.

use super::super::lifecycle::TellAgain;
use super::super::reporter::Report;
use super::PanelManager;
use crate::kernel::{lock, Ctx, Handler, Message, Reply};

/// Write this node's state to Redis again.
pub(super) struct Resync;

impl Message for Resync {
    type Reply = ();
}

impl PanelManager {
    pub(super) fn resync(&self) {
        let table = lock(&self.table);
        let mut told = 0;
        for (panel, entry) in &table.panels {
            // Only what runs here: a panel that moved to another node has
            // its route written there, never over from here.
            let runs_here = entry.instances.values().any(|l| !l.state.is_final());
            if table.forgetting.contains(panel) || !runs_here {
                continue;
            }
            if let Some(route) = &entry.route {
                self.deps.reporter.send(Report::Route(route.clone()));
            }
            for live in entry.instances.values() {
                told += usize::from(live.lifecycle.link::<TellAgain>("panel-manager").try_tell(TellAgain).is_ok());
            }
        }
        self.deps.kernel.metrics().panel_resyncs.inc();
        tracing::debug!(panels = table.panels.len(), instances = told, "nexus_panel_resyncs_total");
    }
}

impl Handler<Resync> for PanelManager {
    fn handle(&mut self, _: Resync, _: &mut Ctx<Self>) -> Reply<()> {
        self.resync();
        Reply::Now(())
    }
}
