//! Traffic and scale to zero: every tick the gateway's last request of
//! each serving panel is read; lifecycles hear it (ready ⇄ idle) and App
//! instances quiet for the idle timeout leave the route, drain, and are
//! stopped unless a request comes during the drain. Every stop of a
//! serving App instance goes through the same drain.

use std::time::Duration;

use super::super::lifecycle::{now_ms, Traffic};
use super::table::{Leaving, Table};
use super::PanelManager;
use crate::instance::InstanceMode;
use crate::kernel::{lock, Ctx, Handler, Message, Reply};

/// Read the gateway's traffic signal of every serving panel.
pub(super) struct Tick;

impl Message for Tick {
    type Reply = ();
}

/// The gateway's last request of one panel, as just read.
pub(super) struct TrafficSeen {
    panel: String,
    last_request_ms: Option<u64>,
}

impl Message for TrafficSeen {
    type Reply = ();
}

/// The drain of an instance that left the route is over: stop it, unless
/// it was a scale to zero and a request came meanwhile.
pub(super) struct Drained {
    panel: String,
    instance: String,
    /// Which drain of the instance this is; an older one is ignored.
    seq: u64,
    /// The gateway's last request, read after the drain (scale to zero only).
    last_request_ms: Option<u64>,
}

impl Message for Drained {
    type Reply = ();
}

/// Whether an instance that first served at `serving_since_ms` has had no
/// request for `idle_timeout` now.
fn quiet_for(last_request_ms: Option<u64>, serving_since_ms: Option<u64>, idle_timeout: Duration) -> bool {
    let now = now_ms();
    let reference = last_request_ms.unwrap_or(0).max(serving_since_ms.unwrap_or(now));
    Duration::from_millis(now.saturating_sub(reference)) >= idle_timeout
}

impl PanelManager {
    /// Scale to zero, decided on the gateway's last request `decided_on`:
    /// the quiet App instances leave the route and are stopped after the
    /// drain unless a newer request comes meanwhile.
    fn drain_idle(&self, table: &mut Table, panel: &str, reason: &str, quiet: &[String], decided_on: Option<u64>) {
        let Table { panels, drains, .. } = table;
        let Some(entry) = panels.get_mut(panel) else { return };
        let mut drain = Vec::new();
        for (id, live) in entry.instances.iter_mut().filter(|(id, l)| l.leaving.is_none() && quiet.contains(id)) {
            *drains += 1;
            live.leaving = Some(Leaving::Draining { seq: *drains, reason: reason.to_owned(), idle: true, decided_on });
            drain.push((id.clone(), *drains));
        }
        self.sync_route(table, panel);
        for (instance, seq) in drain {
            self.drain_then_stop(panel, instance, seq, true);
        }
    }

    /// Once the route without the instance is written and announced, waits
    /// the drain, then tells the manager (with the gateway's last request
    /// read afresh when it is a scale to zero).
    pub(super) fn drain_then_stop(&self, panel: &str, instance: String, seq: u64, idle: bool) {
        let Some(me) = &self.me else { return };
        let done = me.link::<Drained>("timer");
        let (reporter, store, drain) = (self.deps.reporter.clone(), self.deps.store.clone(), self.deps.config.drain);
        let panel = panel.to_owned();
        tracing::info!(%panel, %instance, drain_ms = drain.as_millis() as u64, "instance left the route; draining");
        actix::spawn(async move {
            reporter.flush().await;
            tokio::time::sleep(drain).await;
            let last_request_ms = if idle {
                store.last_request_ms(&panel).await.unwrap_or_else(|error| {
                    tracing::warn!(%panel, %error, "could not read the panel's last request after the drain");
                    None
                })
            } else {
                None
            };
            let _ = done.tell(Drained { panel, instance, seq, last_request_ms });
        });
    }
}

impl Handler<Tick> for PanelManager {
    fn handle(&mut self, _: Tick, _: &mut Ctx<Self>) -> Reply<()> {
        let serving: Vec<String> = lock(&self.table)
            .panels
            .iter()
            .filter(|(_, e)| e.instances.values().any(|l| l.state.serves() && l.leaving.is_none()))
            .map(|(panel, _)| panel.clone())
            .collect();
        let (Some(me), false) = (self.me.clone(), serving.is_empty()) else { return Reply::Now(()) };
        let store = self.deps.store.clone();
        let seen = me.link::<TrafficSeen>("timer");
        Reply::later(async move {
            for panel in serving {
                match store.last_request_ms(&panel).await {
                    Ok(last_request_ms) => {
                        let _ = seen.tell(TrafficSeen { panel, last_request_ms });
                    }
                    Err(error) => tracing::warn!(%panel, %error, "could not read the panel's last request"),
                }
            }
        })
    }
}

impl Handler<TrafficSeen> for PanelManager {
    fn handle(&mut self, msg: TrafficSeen, _: &mut Ctx<Self>) -> Reply<()> {
        let mut table = lock(&self.table);
        let Some(entry) = table.panels.get(&msg.panel) else { return Reply::Now(()) };
        let idle_timeout = self.deps.config.idle_timeout;
        let mut quiet_apps = Vec::new();
        for (id, live) in entry.instances.iter().filter(|(_, l)| l.leaving.is_none() && l.state.serves()) {
            let _ =
                live.lifecycle.link::<Traffic>("panel-manager").tell(Traffic { last_request_ms: msg.last_request_ms });
            if live.mode == InstanceMode::App && quiet_for(msg.last_request_ms, live.serving_since_ms, idle_timeout) {
                quiet_apps.push(id.clone());
            }
        }
        if !quiet_apps.is_empty() {
            let reason = format!("scaled to zero after {}s without requests", idle_timeout.as_secs_f64());
            tracing::info!(panel = %msg.panel, instances = quiet_apps.len(), "{reason}");
            self.drain_idle(&mut table, &msg.panel, &reason, &quiet_apps, msg.last_request_ms);
        }
        Reply::Now(())
    }
}

impl Handler<Drained> for PanelManager {
    fn handle(&mut self, msg: Drained, _: &mut Ctx<Self>) -> Reply<()> {
        let mut table = lock(&self.table);
        let Some(live) = table.panels.get_mut(&msg.panel).and_then(|e| e.instances.get_mut(&msg.instance)) else {
            return Reply::Now(());
        };
        let Some(Leaving::Draining { seq, reason, idle, decided_on }) = live.leaving.take() else {
            return Reply::Now(());
        };
        if seq != msg.seq {
            live.leaving = Some(Leaving::Draining { seq, reason, idle, decided_on });
            return Reply::Now(());
        }
        // Gateways that still held the old route may have sent it requests
        // (`None` is older than any request).
        if idle && msg.last_request_ms > decided_on {
            tracing::info!(panel = %msg.panel, instance = %msg.instance,
                "scale to zero cancelled: a request came during the drain");
            self.sync_route(&mut table, &msg.panel);
            return Reply::Now(());
        }
        live.leaving = Some(Leaving::Stopping);
        self.send_stop(live, reason);
        Reply::Now(())
    }
}
