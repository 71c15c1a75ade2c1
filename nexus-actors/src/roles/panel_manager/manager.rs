//! `PanelManager`: the instances of one node, per panel, and the policy
//! over them: exactly one Studio instance, App deploys and scaling, scale
//! to zero, activation for the gateway, watchdog expiry and the cleanup of
//! deleted panels.
//!
//! It spawns one [`PodLifecycle`] per instance and hears each transition;
//! from those it keeps the panel's route (`endpoints` = instances that
//! serve) and the `nexus_panel_instances` gauge, and hands every write to
//! the [`Reporter`] in order. Running processes is the driver's job and
//! the HTTP API is `api.rs`'s; neither lives here.
//!
//! Routes are written by the node that runs a panel's instances; two panel
//! managers running instances of the same panel at once would overwrite
//! each other's endpoints. The activation claim keeps an App on one node.
//!
//! Races it closes: a serving App instance leaves the route and is stopped
//! only after a drain (a scale to zero is cancelled when a request comes
//! meanwhile); Deploy, Undeploy and deletion bump a per-panel generation so
//! an activation or deploy decided before them is dropped; App records are
//! written through the reporter in decision order; a panel whose record is
//! gone (deletion announcement lost) is cleaned up on activation and by a
//! slow sweep.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::AsyncContext;
use futures::future::join_all;
use rand::Rng;
use tokio::sync::oneshot;

use super::driver::{Code, InstanceSpec, RuntimeDriver};
use super::lifecycle::{mode_label, now_ms, LifecycleDeps, PodLifecycle, Stop, Traffic, Transition};
use super::reporter::{Report, Reporter};
use super::store::{AppRecord, PmStore, StoreError};
use super::{PanelManagerConfig, PanelManagerError};
use crate::bus::redis::{RedisBridge, Subscribe, Topic, Unsubscribe};
use crate::bus::BusEvent;
use crate::envelope::Envelope;
use crate::instance::{Activate, Endpoint, ExpireInstance, InstanceMode, InstanceState, InstanceStatus, PanelRoute};
use crate::kernel::{lock, ActorRef, Behaviour, Ctx, Handler, Kernel, Message, Reply};
use crate::platform::channels::{self, PANELS_PATTERN};
use crate::platform::{Panel, PanelChanged, PanelRecords};

/// Every panel record change of every user (the transaction manager's
/// `nexus:panels:{owner}` channels): deleted panels are cleaned up.

/// Starts the panel's Studio instance (409 when one runs or it is an App).
pub struct StartStudio {
    pub panel: Panel,
}

impl Message for StartStudio {
    type Reply = Result<InstanceStatus, PanelManagerError>;
}

/// Stops the panel's Studio instance.
pub struct StopStudio {
    pub panel: String,
}

impl Message for StopStudio {
    type Reply = Result<(), PanelManagerError>;
}

/// Snapshots the panel's code as a new App version and runs one instance
/// of it (a running Studio instance is stopped first).
pub struct Deploy {
    pub panel: Panel,
}

impl Message for Deploy {
    type Reply = Result<AppRecord, PanelManagerError>;
}

/// Runs `replicas` instances of the deployed App.
pub struct Scale {
    pub panel: String,
    pub replicas: u32,
}

impl Message for Scale {
    type Reply = Result<AppRecord, PanelManagerError>;
}

/// Stops every instance of the panel and removes its App deployment.
pub struct Undeploy {
    pub panel: String,
}

impl Message for Undeploy {
    type Reply = Result<(), PanelManagerError>;
}

/// Stops every instance of this node (shutdown); replies when all ended.
pub struct StopAll {
    pub grace: Duration,
}

impl Message for StopAll {
    type Reply = ();
}

/// Answers once every transition told to the manager before it is written.
struct FlushReports;

impl Message for FlushReports {
    type Reply = ();
}

/// Spawns a Studio instance once its volume is ready.
struct SpawnStudio {
    panel: Panel,
    code: Code,
}

impl Message for SpawnStudio {
    type Reply = Result<InstanceStatus, PanelManagerError>;
}

/// A Deploy's snapshot is ready: make it the panel's App, unless a newer
/// Deploy or an Undeploy came meanwhile. Replies once the record is queued.
struct Deployed {
    app: AppRecord,
    generation: u64,
}

impl Message for Deployed {
    type Reply = Result<oneshot::Receiver<Result<(), StoreError>>, PanelManagerError>;
}

/// A Scale read the App record: run `replicas` of it, unless a Deploy or
/// Undeploy came meanwhile.
struct Rescale {
    stored: AppRecord,
    replicas: u32,
    generation: u64,
}

impl Message for Rescale {
    type Reply = Result<(AppRecord, oneshot::Receiver<Result<(), StoreError>>), PanelManagerError>;
}

/// An Undeploy's deletion of the App record is written: undeploy once
/// more, so an activation that read the record before it went is undone.
struct Undeployed {
    panel: String,
}

impl Message for Undeployed {
    type Reply = ();
}

/// How an activation claim was decided.
enum ClaimOutcome {
    /// This node holds the claim for this App record.
    Won(AppRecord),
    /// Not deployed, another node holds the claim, or Redis failed.
    Lost,
    /// The panel's record is gone: clean up as for a deleted panel.
    PanelGone,
}

/// The activation claim was decided for the panel as it was at `generation`.
struct Claimed {
    panel: String,
    generation: u64,
    outcome: ClaimOutcome,
}

impl Message for Claimed {
    type Reply = ();
}

/// The drain of an instance that left the route is over: stop it, unless
/// it was a scale to zero and a request came meanwhile.
struct Drained {
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

/// Check the records of every panel this node knows.
struct Sweep;

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

/// Read the gateway's traffic signal of every serving panel.
struct Tick;

impl Message for Tick {
    type Reply = ();
}

struct TrafficSeen {
    panel: String,
    last_request_ms: Option<u64>,
}

impl Message for TrafficSeen {
    type Reply = ();
}

/// An instance on its way out.
enum Leaving {
    /// Out of the route, stopped once the drain is over. `idle`: a scale to
    /// zero decided on the gateway's last request `decided_on`, which a
    /// newer request cancels.
    Draining { seq: u64, reason: String, idle: bool, decided_on: Option<u64> },
    /// Asked to stop.
    Stopping,
}

/// One instance this node runs.
struct Live {
    lifecycle: ActorRef<PodLifecycle>,
    mode: InstanceMode,
    /// The App version it runs (0 for Studio).
    version: u64,
    state: InstanceState,
    endpoint: Option<Endpoint>,
    /// When it first served (unix ms), for scale to zero.
    serving_since_ms: Option<u64>,
    /// Set once it is leaving: it no longer counts as running.
    leaving: Option<Leaving>,
}

impl Live {
    /// Not yet leaving for good: a scale to zero still gives way to a stop.
    fn may_stop(&self) -> bool {
        matches!(self.leaving, None | Some(Leaving::Draining { idle: true, .. }))
    }
}

#[derive(Default)]
struct PanelEntry {
    owner: String,
    app: Option<AppRecord>,
    instances: BTreeMap<String, Live>,
    /// The route last handed to the reporter; `None` until the panel has one.
    route: Option<PanelRoute>,
}

impl PanelEntry {
    fn running(&self, mode: InstanceMode) -> impl Iterator<Item = (&String, &Live)> {
        self.instances.iter().filter(move |(_, l)| l.mode == mode && l.leaving.is_none())
    }

    fn wanted_route(&self, panel: &str) -> PanelRoute {
        let mode = if self.app.is_some() { InstanceMode::App } else { InstanceMode::Studio };
        let endpoints =
            self.running(mode).filter(|(_, l)| l.state.serves()).filter_map(|(_, l)| l.endpoint.clone()).collect();
        PanelRoute {
            panel: panel.to_owned(),
            owner: self.owner.clone(),
            mode,
            endpoints,
            activatable: self.app.is_some(),
        }
    }
}

/// What outlives restarts of the manager actor.
#[derive(Default)]
struct Table {
    panels: HashMap<String, PanelEntry>,
    /// Panels whose activation claim is being decided.
    claiming: HashSet<String>,
    /// Panels whose activation claim this node holds until an instance serves.
    claimed: HashSet<String>,
    /// Deleted panels waiting for their last instance to end.
    forgetting: HashSet<String>,
    /// Per panel, bumped by every Deploy, Undeploy and deletion: a claim
    /// or deploy decided at an older generation is dropped. Kept after a
    /// panel is forgotten, so a late result still finds it newer.
    generations: HashMap<String, u64>,
    /// Numbers the drains, so a late drain timer cannot end a newer drain.
    drains: u64,
}

impl Table {
    fn generation(&self, panel: &str) -> u64 {
        self.generations.get(panel).copied().unwrap_or(0)
    }

    fn bump(&mut self, panel: &str) -> u64 {
        let generation = self.generations.entry(panel.to_owned()).or_default();
        *generation += 1;
        *generation
    }
}

/// Wiring of a panel manager.
#[derive(Clone)]
pub struct ManagerDeps {
    pub kernel: Kernel,
    pub redis: ActorRef<RedisBridge>,
    pub driver: Arc<dyn RuntimeDriver>,
    pub store: PmStore,
    /// The transaction manager's panel records: a panel without one is deleted.
    pub panels: PanelRecords,
    pub reporter: Reporter,
    pub config: PanelManagerConfig,
    pub http: reqwest::Client,
}

pub struct PanelManager {
    deps: ManagerDeps,
    table: Arc<Mutex<Table>>,
    me: Option<ActorRef<PanelManager>>,
}

impl PanelManager {
    pub const KIND: &'static str = "panel_manager";

    pub fn spawn(deps: ManagerDeps) -> ActorRef<PanelManager> {
        let table: Arc<Mutex<Table>> = Arc::default();
        let id = format!("panel-manager-{}", deps.config.node);
        deps.kernel.clone().spawn(id, move || PanelManager { deps: deps.clone(), table: table.clone(), me: None })
    }

    fn subscribe(&self, topic: Topic) {
        let Some(me) = &self.me else { return };
        let subscriber = me.link::<BusEvent>("redis-bridge");
        let link = self.deps.redis.link::<Subscribe>(me.id());
        actix::spawn(async move {
            let what = format!("{topic:?}");
            match link.ask(Subscribe { topic, subscriber }).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(topic = %what, %error, "panel manager could not subscribe"),
                Err(error) => tracing::error!(topic = %what, ?error, "panel manager could not reach the redis bridge"),
            }
        });
    }

    fn unsubscribe(&self, topic: Topic) {
        let Some(me) = &self.me else { return };
        let link = self.deps.redis.link::<Unsubscribe>(me.id());
        let subscriber = me.id().to_owned();
        actix::spawn(async move {
            let _ = link.ask(Unsubscribe { topic, subscriber }).await;
        });
    }

    /// Starts one instance of `panel` running `code`.
    fn spawn_instance(&self, table: &mut Table, panel: &str, owner: &str, code: Code) -> Option<InstanceStatus> {
        let me = self.me.as_ref()?;
        let (mode, version) = match &code {
            Code::Studio(_) => (InstanceMode::Studio, 0),
            Code::App(snapshot) => (InstanceMode::App, snapshot.version),
        };
        let instance = format!("{panel}-{:08x}", rand::thread_rng().gen::<u32>());
        let config = &self.deps.config;
        let spec = InstanceSpec {
            instance: instance.clone(),
            panel: panel.to_owned(),
            owner: owner.to_owned(),
            mode,
            code,
            watchdog_timeout: (mode == InstanceMode::Studio).then_some(config.watchdog_timeout),
        };
        let status = PodLifecycle::pending_status(&spec);
        let deps = LifecycleDeps {
            driver: self.deps.driver.clone(),
            policy: config.policy(),
            manager: me.link::<Transition>(&format!("pod-{instance}")),
            metrics: self.deps.kernel.metrics().clone(),
            http: self.deps.http.clone(),
        };
        if mode == InstanceMode::Studio {
            self.subscribe(Topic::Channel(channels::instance_control(&instance)));
        }
        let lifecycle = PodLifecycle::spawn(&self.deps.kernel, spec, deps);
        self.deps.kernel.metrics().panel_instances.with_label_values(&[mode_label(mode), "pending"]).inc();
        let entry = table.panels.entry(panel.to_owned()).or_default();
        entry.owner = owner.to_owned();
        let live = Live {
            lifecycle,
            mode,
            version,
            state: InstanceState::Pending,
            endpoint: None,
            serving_since_ms: None,
            leaving: None,
        };
        entry.instances.insert(instance.clone(), live);
        tracing::info!(%instance, %panel, ?mode, "panel instance created");
        Some(status)
    }

    /// Stops the instances `which` picks, without waiting for them. A
    /// serving App instance first leaves the route and is stopped after the
    /// drain; anything else is stopped at once. Writes the route.
    fn stop_where(&self, table: &mut Table, panel: &str, reason: &str, which: impl Fn(&str, &Live) -> bool) -> usize {
        let Table { panels, drains, .. } = table;
        let Some(entry) = panels.get_mut(panel) else { return 0 };
        let mut stopped = 0;
        let mut drain = Vec::new();
        for (id, live) in entry.instances.iter_mut().filter(|(id, l)| l.may_stop() && which(id, l)) {
            stopped += 1;
            let reason = reason.to_owned();
            match live.leaving.take() {
                // Already out of the route; its drain timer stops it.
                Some(Leaving::Draining { seq, .. }) => {
                    live.leaving = Some(Leaving::Draining { seq, reason, idle: false, decided_on: None });
                }
                _ if live.mode == InstanceMode::App && live.state.serves() => {
                    *drains += 1;
                    live.leaving = Some(Leaving::Draining { seq: *drains, reason, idle: false, decided_on: None });
                    drain.push((id.clone(), *drains));
                }
                _ => {
                    live.leaving = Some(Leaving::Stopping);
                    self.send_stop(live, reason);
                }
            }
        }
        self.sync_route(table, panel);
        for (instance, seq) in drain {
            self.drain_then_stop(panel, instance, seq, false);
        }
        stopped
    }

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

    fn send_stop(&self, live: &Live, reason: String) {
        let stop = live.lifecycle.link::<Stop>(&format!("panel-manager-{}", self.deps.config.node));
        let msg = Stop { reason, grace: self.deps.config.stop_grace };
        actix::spawn(async move {
            let _ = stop.ask(msg).await;
        });
    }

    /// Once the route without the instance is written and announced, waits
    /// the drain, then tells the manager (with the gateway's last request
    /// read afresh when it is a scale to zero).
    fn drain_then_stop(&self, panel: &str, instance: String, seq: u64, idle: bool) {
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

    /// Hands the panel's route to the reporter when it changed.
    fn sync_route(&self, table: &mut Table, panel: &str) {
        if table.forgetting.contains(panel) {
            return;
        }
        let Some(entry) = table.panels.get_mut(panel) else { return };
        let wanted = entry.wanted_route(panel);
        if entry.route.as_ref() != Some(&wanted) {
            entry.route = Some(wanted.clone());
            self.deps.reporter.send(Report::Route(wanted));
        }
    }

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

    fn forget_now(&self, table: &mut Table, panel: &str) {
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

    fn panel_deleted(&self, panel: &str) {
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

    fn activate(&self, panel: String) {
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

    fn release_claim(&self, table: &mut Table, panel: &str) {
        if table.claimed.remove(panel) {
            let (store, node, panel) = (self.deps.store.clone(), self.deps.config.node.clone(), panel.to_owned());
            actix::spawn(async move {
                if let Err(error) = store.release_activation(&panel, &node).await {
                    tracing::warn!(%panel, %error, "could not release the activation claim");
                }
            });
        }
    }

    fn on_bus(&self, event: BusEvent) {
        let BusEvent::Message(msg) = event else { return };
        if msg.channel == channels::ACTIVATE {
            match msg.envelope.typed::<Activate>() {
                Ok(activate) => self.activate(activate.data.panel),
                Err(error) => self.deps.kernel.metrics().bus_error("redis", "activate", &error),
            }
        } else if msg.pattern.as_deref() == Some(PANELS_PATTERN) {
            if msg.envelope.kind != <PanelChanged as crate::envelope::Payload>::TYPE {
                return;
            }
            match msg.envelope.typed::<PanelChanged>() {
                Ok(Envelope { data: PanelChanged { id, panel: None }, .. }) => self.panel_deleted(&id),
                Ok(_) => {}
                Err(error) => self.deps.kernel.metrics().bus_error("redis", "panel_changed", &error),
            }
        } else {
            match msg.envelope.typed::<ExpireInstance>() {
                Ok(expire) if msg.channel == channels::instance_control(&expire.data.instance) => {
                    self.expire(expire.data)
                }
                Ok(expire) => tracing::warn!(channel = %msg.channel, instance = %expire.data.instance,
                    "ExpireInstance for another instance's channel; ignored"),
                Err(error) => self.deps.kernel.metrics().bus_error("redis", "instance_control", &error),
            }
        }
    }

    fn expire(&self, expire: ExpireInstance) {
        let mut table = lock(&self.table);
        let panel = table
            .panels
            .iter()
            .find(|(_, e)| e.instances.contains_key(&expire.instance))
            .map(|(panel, _)| panel.clone());
        let Some(panel) = panel else { return };
        let reason = format!("watchdog: {}", expire.reason);
        tracing::info!(instance = %expire.instance, %reason, "watchdog expired an instance");
        let instance = expire.instance;
        self.stop_where(&mut table, &panel, &reason, |id, _| id == instance);
        self.sync_route(&mut table, &panel);
    }
}

impl Behaviour for PanelManager {
    const KIND: &'static str = PanelManager::KIND;

    fn started(&mut self, me: &ActorRef<Self>, ctx: &mut Ctx<Self>) {
        self.me = Some(me.clone());
        self.subscribe(Topic::Channel(channels::ACTIVATE.to_owned()));
        self.subscribe(Topic::Pattern(PANELS_PATTERN.to_owned()));
        let studios: Vec<String> = lock(&self.table)
            .panels
            .values()
            .flat_map(|e| e.instances.iter().filter(|(_, l)| l.mode == InstanceMode::Studio).map(|(id, _)| id.clone()))
            .collect();
        for instance in studios {
            self.subscribe(Topic::Channel(channels::instance_control(&instance)));
        }
        let tick = me.link::<Tick>("timer");
        ctx.run_interval(self.deps.config.tick, move |_, _| {
            let _ = tick.try_tell(Tick);
        });
        let sweep = me.link::<Sweep>("timer");
        ctx.run_interval(self.deps.config.sweep, move |_, _| {
            let _ = sweep.try_tell(Sweep);
        });
    }
}

impl Handler<BusEvent> for PanelManager {
    fn handle(&mut self, event: BusEvent, _: &mut Ctx<Self>) -> Reply<()> {
        self.on_bus(event);
        Reply::Now(())
    }
}

impl Handler<Transition> for PanelManager {
    fn handle(&mut self, msg: Transition, _: &mut Ctx<Self>) -> Reply<()> {
        let status = msg.status;
        let (panel, instance) = (status.panel.clone(), status.instance.clone());
        let mut table = lock(&self.table);
        let gauge = &self.deps.kernel.metrics().panel_instances;
        let mode = mode_label(status.mode);
        let mut ended = false;
        if let Some(live) = table.panels.get_mut(&panel).and_then(|e| e.instances.get_mut(&instance)) {
            gauge.with_label_values(&[mode, state_label(live.state)]).dec();
            live.state = status.state;
            live.endpoint = msg.endpoint;
            if status.state.serves() && live.serving_since_ms.is_none() {
                live.serving_since_ms = Some(status.since_ms);
            }
            if status.state.is_final() {
                ended = true;
            } else {
                gauge.with_label_values(&[mode, state_label(status.state)]).inc();
            }
        }
        self.deps.reporter.send(Report::Status(status.clone()));
        if status.state.serves() || status.state.is_final() {
            self.release_claim(&mut table, &panel);
        }
        if ended {
            if let Some(entry) = table.panels.get_mut(&panel) {
                entry.instances.remove(&instance);
            }
            if status.mode == InstanceMode::Studio {
                self.unsubscribe(Topic::Channel(channels::instance_control(&instance)));
            }
            let empty = table.panels.get(&panel).is_none_or(|e| e.instances.is_empty());
            if empty && table.forgetting.contains(&panel) {
                self.forget_now(&mut table, &panel);
                return Reply::Now(());
            }
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
    match store.app(panel).await {
        Ok(Some(app)) => match store.claim_activation(panel, node, super::ACTIVATION_CLAIM_TTL).await {
            Ok(true) => ClaimOutcome::Won(app),
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
        },
        Ok(None) => {
            tracing::info!(%panel, "activation for a panel that is not deployed; ignored");
            ClaimOutcome::Lost
        }
        Err(error) => {
            tracing::warn!(%panel, %error, "could not read the App record to activate");
            ClaimOutcome::Lost
        }
    }
}

/// The newer of two records of the same panel's App (the table's when equal).
fn newest(known: Option<AppRecord>, read: AppRecord) -> AppRecord {
    match known {
        Some(known) if known.version >= read.version => known,
        _ => read,
    }
}

fn state_label(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Pending => "pending",
        InstanceState::Starting => "starting",
        InstanceState::Ready => "ready",
        InstanceState::Idle => "idle",
        InstanceState::Stopping => "stopping",
        InstanceState::Stopped => "stopped",
        InstanceState::Failed => "failed",
    }
}

fn studio_conflict(entry: Option<&PanelEntry>) -> Option<PanelManagerError> {
    let entry = entry?;
    if entry.app.is_some() {
        return Some(PanelManagerError::Conflict("the panel is deployed as an App; undeploy it first".into()));
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
        if let Some(conflict) = studio_conflict(lock(&self.table).panels.get(&msg.panel.id)) {
            return Reply::Now(Err(conflict));
        }
        let (store, driver) = (self.deps.store.clone(), self.deps.driver.clone());
        let Some(me) = self.me.clone() else { return Reply::Now(Err(PanelManagerError::Stopped)) };
        let spawn = me.link::<SpawnStudio>("panel-manager-api");
        Reply::later(async move {
            let panel = msg.panel;
            if store.app(&panel.id).await?.is_some() {
                return Err(PanelManagerError::Conflict("the panel is deployed as an App; undeploy it first".into()));
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
            let volume = driver.volume(&panel.id, &panel.source).await?;
            spawn
                .ask(SpawnStudio { panel, code: Code::Studio(volume) })
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
        let status = self.spawn_instance(&mut table, &msg.panel.id, &msg.panel.owner, msg.code);
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

/// How long past its grace a Deploy waits for the Studio instance to stop.
const STUDIO_STOP_MARGIN: Duration = Duration::from_secs(10);

impl Handler<Deploy> for PanelManager {
    fn handle(&mut self, msg: Deploy, _: &mut Ctx<Self>) -> Reply<Result<AppRecord, PanelManagerError>> {
        let panel = msg.panel;
        let reason = "deployed as an App";
        let grace = self.deps.config.stop_grace;
        let (generation, studios) = {
            let mut table = lock(&self.table);
            let generation = table.bump(&panel.id);
            // One panel, one route: the Studio instance gives way to the App.
            self.stop_where(&mut table, &panel.id, reason, |_, l| l.mode == InstanceMode::Studio);
            let from = format!("panel-manager-{}", self.deps.config.node);
            let studios: Vec<_> = table
                .panels
                .get(&panel.id)
                .map(|e| e.instances.values().filter(|l| l.mode == InstanceMode::Studio).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(|l| l.lifecycle.link::<Stop>(&from))
                .collect();
            (generation, studios)
        };
        let driver = self.deps.driver.clone();
        let Some(me) = self.me.clone() else { return Reply::Now(Err(PanelManagerError::Stopped)) };
        let deployed = me.link::<Deployed>("panel-manager-api");
        Reply::later(async move {
            // The snapshot copies the Studio volume: nothing may write to it
            // any more. A stop answers once the instance has ended (at once
            // when it already has, or an error when its lifecycle is gone).
            let stopped = join_all(studios.into_iter().map(|stop| async move {
                let _ = stop.ask(Stop { reason: reason.to_owned(), grace }).await;
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
                .ask(Deployed { app: app.clone(), generation })
                .await
                .map_err(|_| PanelManagerError::Stopped)??;
            written.await.map_err(|_| PanelManagerError::Stopped)??;
            tracing::info!(panel = %app.panel, version = app.version, "panel deployed as an App");
            Ok(app)
        })
    }
}

impl Handler<Scale> for PanelManager {
    fn handle(&mut self, msg: Scale, _: &mut Ctx<Self>) -> Reply<Result<AppRecord, PanelManagerError>> {
        let max = self.deps.config.max_replicas;
        if msg.replicas > max {
            return Reply::Now(Err(PanelManagerError::BadReplicas { replicas: msg.replicas, max }));
        }
        let generation = lock(&self.table).generation(&msg.panel);
        let store = self.deps.store.clone();
        let Some(me) = self.me.clone() else { return Reply::Now(Err(PanelManagerError::Stopped)) };
        let rescale = me.link::<Rescale>("panel-manager-api");
        Reply::later(async move {
            let stored = store.app(&msg.panel).await?.ok_or(PanelManagerError::NotDeployed)?;
            let (app, written) = rescale
                .ask(Rescale { stored, replicas: msg.replicas, generation })
                .await
                .map_err(|_| PanelManagerError::Stopped)??;
            written.await.map_err(|_| PanelManagerError::Stopped)??;
            tracing::info!(panel = %app.panel, replicas = app.replicas, "App scaled");
            Ok(app)
        })
    }
}

fn superseded() -> PanelManagerError {
    PanelManagerError::Conflict("the panel was deployed or undeployed meanwhile; try again".into())
}

impl Handler<Deployed> for PanelManager {
    fn handle(&mut self, msg: Deployed, _: &mut Ctx<Self>) -> Reply<<Deployed as Message>::Reply> {
        let mut table = lock(&self.table);
        let panel = msg.app.panel.clone();
        if table.forgetting.contains(&panel) {
            return Reply::Now(Err(PanelManagerError::Conflict("the panel was deleted".into())));
        }
        if table.generation(&panel) != msg.generation {
            tracing::info!(%panel, version = msg.app.version, "a deploy superseded by a newer deploy or undeploy");
            return Reply::Now(Err(superseded()));
        }
        let version = msg.app.version;
        let (tx, rx) = oneshot::channel();
        self.deps.reporter.send(Report::App(msg.app.clone(), tx));
        let entry = table.panels.entry(panel.clone()).or_default();
        entry.owner = msg.app.owner.clone();
        entry.app = Some(msg.app);
        // A Studio instance started while the snapshot was taken goes too.
        self.stop_where(&mut table, &panel, "deployed as an App", |_, l| l.mode == InstanceMode::Studio);
        self.stop_where(&mut table, &panel, "replaced by a new version", |_, l| {
            l.mode == InstanceMode::App && l.version != version
        });
        self.reconcile(&mut table, &panel);
        Reply::Now(Ok(rx))
    }
}

impl Handler<Rescale> for PanelManager {
    fn handle(&mut self, msg: Rescale, _: &mut Ctx<Self>) -> Reply<<Rescale as Message>::Reply> {
        let mut table = lock(&self.table);
        let panel = msg.stored.panel.clone();
        if table.forgetting.contains(&panel) {
            return Reply::Now(Err(PanelManagerError::Conflict("the panel was deleted".into())));
        }
        if table.generation(&panel) != msg.generation {
            return Reply::Now(Err(superseded()));
        }
        let entry = table.panels.entry(panel.clone()).or_default();
        let mut app = newest(entry.app.take(), msg.stored);
        app.replicas = msg.replicas;
        entry.owner = app.owner.clone();
        entry.app = Some(app.clone());
        let (tx, rx) = oneshot::channel();
        self.deps.reporter.send(Report::App(app.clone(), tx));
        self.reconcile(&mut table, &panel);
        Reply::Now(Ok((app, rx)))
    }
}

impl PanelManager {
    /// Takes the panel out of App mode here: every instance stops.
    fn undeploy_now(&self, table: &mut Table, panel: &str) {
        table.bump(panel);
        let entry = table.panels.entry(panel.to_owned()).or_default();
        entry.app = None;
        self.stop_where(table, panel, "undeployed by its owner", |_, _| true);
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

impl Handler<Claimed> for PanelManager {
    fn handle(&mut self, msg: Claimed, _: &mut Ctx<Self>) -> Reply<()> {
        let mut table = lock(&self.table);
        let panel = msg.panel;
        table.claiming.remove(&panel);
        let app = match msg.outcome {
            ClaimOutcome::Won(app) => app,
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
        let entry = table.panels.entry(panel.clone()).or_default();
        // The record was read before the claim: one this node wrote since
        // (same generation) may be newer.
        let app = newest(entry.app.take(), app);
        entry.owner = app.owner.clone();
        entry.app = Some(app.clone());
        if entry.running(InstanceMode::App).next().is_none() {
            tracing::info!(%panel, version = app.version, "activating a scaled-to-zero App");
            self.spawn_instance(&mut table, &panel, &app.owner, Code::App(app.snapshot()));
        } else {
            self.release_claim(&mut table, &panel);
        }
        self.sync_route(&mut table, &panel);
        Reply::Now(())
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

/// Whether an instance that first served at `serving_since_ms` has had no
/// request for `idle_timeout` now.
fn quiet_for(last_request_ms: Option<u64>, serving_since_ms: Option<u64>, idle_timeout: Duration) -> bool {
    let now = now_ms();
    let reference = last_request_ms.unwrap_or(0).max(serving_since_ms.unwrap_or(now));
    Duration::from_millis(now.saturating_sub(reference)) >= idle_timeout
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

impl Handler<StopAll> for PanelManager {
    fn handle(&mut self, msg: StopAll, _: &mut Ctx<Self>) -> Reply<()> {
        let table = lock(&self.table);
        let from = format!("panel-manager-{}", self.deps.config.node);
        let stops: Vec<_> = table
            .panels
            .values()
            .flat_map(|e| e.instances.values())
            .map(|l| {
                let link = l.lifecycle.link::<Stop>(&from);
                let stop = Stop { reason: "its node shut down".to_owned(), grace: msg.grace };
                async move {
                    let _ = link.ask(stop).await;
                }
            })
            .collect();
        // Final transitions reach this mailbox before the lifecycles answer
        // the stops, so a message sent after the answers comes after them.
        let flush = self.me.as_ref().map(|me| me.link::<FlushReports>("node"));
        // A lifecycle that does not answer must not hold the shutdown forever.
        let bound = msg.grace + Duration::from_secs(2);
        Reply::later(async move {
            let _ = tokio::time::timeout(bound, join_all(stops)).await;
            if let Some(flush) = flush {
                let _ = flush.ask(FlushReports).await;
            }
        })
    }
}

impl Handler<FlushReports> for PanelManager {
    fn handle(&mut self, _: FlushReports, _: &mut Ctx<Self>) -> Reply<()> {
        let reporter = self.deps.reporter.clone();
        Reply::later(async move { reporter.flush().await })
    }
}
