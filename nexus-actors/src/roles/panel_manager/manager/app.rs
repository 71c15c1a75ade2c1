//! A panel as an App: Deploy (a snapshot of the code, one instance of it;
//! the Studio instance stops first), Scale (how many instances of the
//! current version run) and Undeploy (everything stops, the App record
//! goes). Deploy and Undeploy bump the panel's generation, so whatever was
//! decided before them is dropped; starts stay within the owner's quota.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::oneshot;

use super::super::driver::Code;
use super::super::lifecycle::Stop;
use super::super::metrics::QuotaAction;
use super::super::reporter::Report;
use super::super::store::{AppRecord, StoreError};
use super::super::PanelManagerError;
use super::table::Table;
use super::{running_elsewhere, PanelManager};
use crate::instance::InstanceMode;
use crate::kernel::{lock, Ctx, Handler, Link, Message, Reply};
use crate::platform::Panel;

/// How long past its grace a Deploy waits for the Studio instance to stop.
const STUDIO_STOP_MARGIN: Duration = Duration::from_secs(10);

/// Snapshots the panel's code as a new App version and runs one instance
/// of it (a running Studio instance is stopped first).
pub struct Deploy {
    /// The panel, as its record says (the API checked the caller owns it).
    pub panel: Panel,
}

impl Message for Deploy {
    type Reply = Result<AppRecord, PanelManagerError>;
}

/// Runs `replicas` instances of the deployed App.
pub struct Scale {
    /// The panel id.
    pub panel: String,
    /// How many instances should run (at most the configured maximum).
    pub replicas: u32,
}

impl Message for Scale {
    type Reply = Result<AppRecord, PanelManagerError>;
}

/// Stops every instance of the panel and removes its App deployment.
pub struct Undeploy {
    /// The panel id.
    pub panel: String,
}

impl Message for Undeploy {
    type Reply = Result<(), PanelManagerError>;
}

/// A Deploy knows how many instances its owner runs elsewhere: check the
/// quota, then take the generation and stop the Studio instance. Replies
/// with the generation and the stops to wait for.
pub(super) struct BeginDeploy {
    panel: Panel,
    elsewhere: usize,
}

impl Message for BeginDeploy {
    type Reply = Result<(u64, Vec<Link<Stop>>), PanelManagerError>;
}

/// A Deploy's snapshot is ready: write it as the panel's App record, unless
/// a newer Deploy or an Undeploy came meanwhile. Replies once the record is
/// queued; [`ApplyDeployed`] follows once it is written.
pub(super) struct Deployed {
    app: AppRecord,
    generation: u64,
    elsewhere: usize,
}

impl Message for Deployed {
    type Reply = Result<oneshot::Receiver<Result<(), StoreError>>, PanelManagerError>;
}

/// A Deploy's record is written: run the new version, unless a newer Deploy
/// or an Undeploy came meanwhile (whose own writes come after this one's).
pub(super) struct ApplyDeployed {
    app: AppRecord,
    generation: u64,
}

impl Message for ApplyDeployed {
    type Reply = Result<(), PanelManagerError>;
}

/// A Scale read the App record: write it with `replicas` (the quota
/// allowing), unless a Deploy or Undeploy came meanwhile. Replies once the
/// record is queued; [`ApplyRescaled`] follows once it is written.
pub(super) struct Rescale {
    stored: AppRecord,
    replicas: u32,
    generation: u64,
    elsewhere: usize,
}

impl Message for Rescale {
    /// The record, the Scale's number, and when its write is done.
    type Reply = Result<(AppRecord, u64, oneshot::Receiver<Result<(), StoreError>>), PanelManagerError>;
}

/// A Scale's record write is done: when `written`, run its replicas,
/// unless a Deploy or Undeploy came meanwhile. Either way its hold on the
/// quota ends.
pub(super) struct ApplyRescaled {
    app: AppRecord,
    generation: u64,
    scale: u64,
    written: bool,
}

impl Message for ApplyRescaled {
    type Reply = Result<(), PanelManagerError>;
}

/// An Undeploy's deletion of the App record is written: undeploy once
/// more, so an activation that read the record before it went is undone.
pub(super) struct Undeployed {
    panel: String,
}

impl Message for Undeployed {
    type Reply = ();
}

fn superseded() -> PanelManagerError {
    PanelManagerError::Conflict("the panel was deployed or undeployed meanwhile; try again".into())
}

/// Whether a change decided at `generation` may still be made: the panel
/// is not being deleted, and no Deploy or Undeploy came meanwhile.
fn still_current(table: &Table, panel: &str, generation: u64) -> Result<(), PanelManagerError> {
    if table.forgetting.contains(panel) {
        return Err(PanelManagerError::Conflict("the panel was deleted".into()));
    }
    match table.generation(panel) == generation {
        true => Ok(()),
        false => Err(superseded()),
    }
}

/// The newer of two records of the same panel's App (the table's when equal).
pub(super) fn newest(known: Option<AppRecord>, read: AppRecord) -> AppRecord {
    match known {
        Some(known) if known.version >= read.version => known,
        _ => read,
    }
}

impl PanelManager {
    /// Runs as many instances of the current App version as it asks for.
    fn reconcile(&self, table: &mut Table, panel: &str) {
        let Some(entry) = table.panels.get(panel) else { return };
        let Some(app) = entry.app.clone() else { return };
        let running: Vec<(String, bool)> = entry
            .running(InstanceMode::App)
            .filter(|(_, l)| l.version == app.version)
            .map(|(id, l)| (id.clone(), l.state.serves()))
            .collect();
        let wanted = app.replicas as usize;
        if running.len() < wanted {
            for _ in running.len()..wanted {
                self.spawn_instance(table, panel, &app.owner, Code::App(app.snapshot()));
            }
        } else if running.len() > wanted {
            // Those not serving yet go first, then the newest.
            let mut order = running;
            order.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
            let excess: HashSet<String> = order.iter().take(order.len() - wanted).map(|x| x.0.clone()).collect();
            self.stop_where(table, panel, "scaled down", |id, _| excess.contains(id));
        }
        self.sync_route(table, panel);
    }

    /// Takes the panel out of App mode here: every instance stops.
    fn undeploy_now(&self, table: &mut Table, panel: &str) {
        table.bump(panel);
        let entry = table.panels.entry(panel.to_owned()).or_default();
        entry.app = None;
        self.stop_where(table, panel, "undeployed by its owner", |_, _| true);
    }
}

impl Handler<Deploy> for PanelManager {
    fn handle(&mut self, msg: Deploy, _: &mut Ctx<Self>) -> Reply<Result<AppRecord, PanelManagerError>> {
        let panel = msg.panel;
        let grace = self.deps.config.stop_grace;
        let (store, panels, driver) = (self.deps.store.clone(), self.deps.panels.clone(), self.deps.driver.clone());
        let (node, reporter) = (self.deps.config.node.clone(), self.deps.reporter.clone());
        let Some(me) = self.me.clone() else { return Reply::Now(Err(PanelManagerError::Stopped)) };
        let (begin, deployed) = (me.link::<BeginDeploy>("panel-manager-api"), me.link::<Deployed>("panel-manager-api"));
        let apply = me.link::<ApplyDeployed>("panel-manager-api");
        Reply::later(async move {
            let elsewhere = running_elsewhere(&store, &panels, &panel.owner, &node).await?;
            let (generation, studios) = begin
                .ask(BeginDeploy { panel: panel.clone(), elsewhere })
                .await
                .map_err(|_| PanelManagerError::Stopped)??;
            // The snapshot copies the Studio volume: nothing may write to it
            // any more. A stop answers once the instance has ended (at once
            // when it already has, or an error when its lifecycle is gone).
            let stopped = join_all(studios.into_iter().map(|stop| async move {
                let _ = stop.ask(Stop { reason: "deployed as an App".to_owned(), grace }).await;
            }));
            if tokio::time::timeout(grace + STUDIO_STOP_MARGIN, stopped).await.is_err() {
                return Err(PanelManagerError::Conflict(
                    "the panel's Studio instance did not stop in time; try again".into(),
                ));
            }
            let snapshot = driver.snapshot(&panel.id, &panel.source).await?;
            let app = AppRecord {
                panel: panel.id.clone(),
                owner: panel.owner.clone(),
                version: snapshot.version,
                location: snapshot.location,
                replicas: 1,
            };
            let written = deployed
                .ask(Deployed { app: app.clone(), generation, elsewhere })
                .await
                .map_err(|_| PanelManagerError::Stopped)??;
            written.await.map_err(|_| PanelManagerError::Stopped)??;
            // Written before it is applied: an App never runs that its record
            // does not name, and activation finds what runs.
            apply
                .ask(ApplyDeployed { app: app.clone(), generation })
                .await
                .map_err(|_| PanelManagerError::Stopped)??;
            // The App's route (activatable) is in Redis and announced before
            // the answer: a request sent on it is held for the App, never
            // answered as a stopped Studio's.
            reporter.flush().await;
            tracing::info!(panel = %app.panel, version = app.version, "panel deployed as an App");
            Ok(app)
        })
    }
}

impl Handler<BeginDeploy> for PanelManager {
    fn handle(&mut self, msg: BeginDeploy, _: &mut Ctx<Self>) -> Reply<<BeginDeploy as Message>::Reply> {
        let panel = msg.panel;
        let mut table = lock(&self.table);
        // After the deploy the panel runs one instance, whatever it ran before.
        let quota = self.within_quota(&table, &panel.owner, Some(&panel.id), msg.elsewhere, 1, QuotaAction::Deploy);
        if let Err(quota) = quota {
            return Reply::Now(Err(quota));
        }
        let generation = table.bump(&panel.id);
        // One panel, one route: the Studio instance gives way to the App.
        self.stop_where(&mut table, &panel.id, "deployed as an App", |_, l| l.mode == InstanceMode::Studio);
        let from = format!("panel-manager-{}", self.deps.config.node);
        let studios = table
            .panels
            .get(&panel.id)
            .map(|e| e.instances.values().filter(|l| l.mode == InstanceMode::Studio).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|l| l.lifecycle.link::<Stop>(&from))
            .collect();
        Reply::Now(Ok((generation, studios)))
    }
}

impl Handler<Deployed> for PanelManager {
    fn handle(&mut self, msg: Deployed, _: &mut Ctx<Self>) -> Reply<<Deployed as Message>::Reply> {
        let table = lock(&self.table);
        let panel = msg.app.panel.clone();
        if let Err(error) = still_current(&table, &panel, msg.generation) {
            tracing::info!(%panel, version = msg.app.version, %error, "a deploy dropped before its record was written");
            return Reply::Now(Err(error));
        }
        // Checked again: the owner may have started instances during the snapshot.
        let owner = &msg.app.owner;
        if let Err(quota) = self.within_quota(&table, owner, Some(&panel), msg.elsewhere, 1, QuotaAction::Deploy) {
            return Reply::Now(Err(quota));
        }
        let (tx, rx) = oneshot::channel();
        self.deps.reporter.send(Report::App(msg.app, tx));
        Reply::Now(Ok(rx))
    }
}

impl Handler<ApplyDeployed> for PanelManager {
    fn handle(&mut self, msg: ApplyDeployed, _: &mut Ctx<Self>) -> Reply<Result<(), PanelManagerError>> {
        let mut table = lock(&self.table);
        let panel = msg.app.panel.clone();
        if let Err(error) = still_current(&table, &panel, msg.generation) {
            tracing::info!(%panel, version = msg.app.version, %error, "a deploy dropped while its record was written");
            return Reply::Now(Err(error));
        }
        let version = msg.app.version;
        let entry = table.panels.entry(panel.clone()).or_default();
        entry.owner = msg.app.owner.clone();
        entry.app = Some(msg.app);
        // A Studio instance started while the snapshot was taken goes too.
        self.stop_where(&mut table, &panel, "deployed as an App", |_, l| l.mode == InstanceMode::Studio);
        self.stop_where(&mut table, &panel, "replaced by a new version", |_, l| {
            l.mode == InstanceMode::App && l.version != version
        });
        self.reconcile(&mut table, &panel);
        Reply::Now(Ok(()))
    }
}

impl Handler<Scale> for PanelManager {
    fn handle(&mut self, msg: Scale, _: &mut Ctx<Self>) -> Reply<Result<AppRecord, PanelManagerError>> {
        let max = self.deps.config.max_replicas;
        if msg.replicas > max {
            return Reply::Now(Err(PanelManagerError::BadReplicas { replicas: msg.replicas, max }));
        }
        let generation = lock(&self.table).generation(&msg.panel);
        let (store, panels, node) = (self.deps.store.clone(), self.deps.panels.clone(), self.deps.config.node.clone());
        let Some(me) = self.me.clone() else { return Reply::Now(Err(PanelManagerError::Stopped)) };
        let rescale = me.link::<Rescale>("panel-manager-api");
        let apply = me.link::<ApplyRescaled>("panel-manager-api");
        Reply::later(async move {
            let stored = store.app(&msg.panel).await?.ok_or(PanelManagerError::NotDeployed)?;
            let elsewhere = running_elsewhere(&store, &panels, &stored.owner, &node).await?;
            let (app, scale, written) = rescale
                .ask(Rescale { stored, replicas: msg.replicas, generation, elsewhere })
                .await
                .map_err(|_| PanelManagerError::Stopped)??;
            // Written first: a record that failed to be written is never
            // what runs here.
            let written = written.await.map_err(|_| PanelManagerError::Stopped);
            let ok = matches!(written, Ok(Ok(())));
            apply
                .ask(ApplyRescaled { app: app.clone(), generation, scale, written: ok })
                .await
                .map_err(|_| PanelManagerError::Stopped)??;
            written??;
            tracing::info!(panel = %app.panel, replicas = app.replicas, "App scaled");
            Ok(app)
        })
    }
}

impl Handler<Rescale> for PanelManager {
    fn handle(&mut self, msg: Rescale, _: &mut Ctx<Self>) -> Reply<<Rescale as Message>::Reply> {
        let mut table = lock(&self.table);
        let panel = msg.stored.panel.clone();
        if let Err(error) = still_current(&table, &panel, msg.generation) {
            return Reply::Now(Err(error));
        }
        let entry = table.panels.get(&panel);
        let mut app = newest(entry.and_then(|e| e.app.clone()), msg.stored);
        app.replicas = msg.replicas;
        let running =
            entry.map_or(0, |e| e.running(InstanceMode::App).filter(|(_, l)| l.version == app.version).count());
        let adding = (app.replicas as usize).saturating_sub(running);
        // An earlier Scale of this panel not yet applied is replaced by this one.
        table.scaling.remove(&panel);
        if adding > 0 {
            if let Err(quota) = self.within_quota(&table, &app.owner, None, msg.elsewhere, adding, QuotaAction::Scale) {
                return Reply::Now(Err(quota));
            }
        }
        // Held against the quota until applied: a second Scale meanwhile
        // (of another panel) must not count on the same room.
        table.scales += 1;
        let scale = table.scales;
        table.scaling.insert(panel, (scale, app.owner.clone(), adding));
        let (tx, rx) = oneshot::channel();
        self.deps.reporter.send(Report::App(app.clone(), tx));
        Reply::Now(Ok((app, scale, rx)))
    }
}

impl Handler<ApplyRescaled> for PanelManager {
    fn handle(&mut self, msg: ApplyRescaled, _: &mut Ctx<Self>) -> Reply<Result<(), PanelManagerError>> {
        let mut table = lock(&self.table);
        let panel = msg.app.panel.clone();
        if table.scaling.get(&panel).is_some_and(|(scale, _, _)| *scale == msg.scale) {
            table.scaling.remove(&panel);
        }
        if !msg.written {
            return Reply::Now(Ok(()));
        }
        if let Err(error) = still_current(&table, &panel, msg.generation) {
            tracing::info!(%panel, replicas = msg.app.replicas, %error, "a scale dropped while its record was written");
            return Reply::Now(Err(error));
        }
        let entry = table.panels.entry(panel.clone()).or_default();
        entry.owner = msg.app.owner.clone();
        entry.app = Some(msg.app);
        self.reconcile(&mut table, &panel);
        Reply::Now(Ok(()))
    }
}

impl Handler<Undeploy> for PanelManager {
    fn handle(&mut self, msg: Undeploy, _: &mut Ctx<Self>) -> Reply<Result<(), PanelManagerError>> {
        let mut table = lock(&self.table);
        self.undeploy_now(&mut table, &msg.panel);
        let (tx, rx) = oneshot::channel();
        self.deps.reporter.send(Report::DeleteApp(msg.panel.clone(), tx));
        let Some(me) = self.me.clone() else { return Reply::Now(Err(PanelManagerError::Stopped)) };
        let undeployed = me.link::<Undeployed>("panel-manager-api");
        Reply::later(async move {
            rx.await.map_err(|_| PanelManagerError::Stopped)??;
            undeployed.ask(Undeployed { panel: msg.panel }).await.map_err(|_| PanelManagerError::Stopped)?;
            Ok(())
        })
    }
}

impl Handler<Undeployed> for PanelManager {
    fn handle(&mut self, msg: Undeployed, _: &mut Ctx<Self>) -> Reply<()> {
        let mut table = lock(&self.table);
        if !table.forgetting.contains(&msg.panel) {
            self.undeploy_now(&mut table, &msg.panel);
        }
        Reply::Now(())
    }
}
