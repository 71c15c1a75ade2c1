//! `PanelManager`: the instances of one node, per panel, and the policy
//! over them: exactly one Studio instance, App deploys and scaling, scale
//! to zero, activation for the gateway, watchdog expiry, the cleanup of
//! deleted panels and the owner's running-instance quota.
//!
//! It spawns one [`PodLifecycle`] per instance and hears each transition;
//! from those it keeps the panel's route (`endpoints` = instances that
//! serve) and the `nexus_panel_instances` gauge, and hands every write to
//! the [`Reporter`] in order. Running processes is the driver's job and
//! the HTTP API is `api.rs`'s; neither lives here. By concern:
//! `studio` (one Studio instance), `app` (deploy, scale, undeploy),
//! `activation` (the gateway's cold starts), `idle` (idle marks, scale to
//! zero, drains), `sweep` (deleted panels), `table` (the state).
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
//!
//! The quota counts the owner's instances that are not on their way out:
//! this node's from its table (exact: checked in the actor, before the
//! start), other nodes' from their statuses in Redis (read just before, so
//! two nodes starting at the same moment may pass it together).

mod activation;
mod app;
mod idle;
mod resync;
mod studio;
mod sweep;
mod table;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::AsyncContext;
use futures::future::join_all;
use rand::Rng;

use super::driver::{Code, InstanceSpec, RuntimeDriver};
use super::lifecycle::{LifecycleDeps, PodLifecycle, Stop, Transition};
use super::metrics::{mode_label, state_label, PmMetrics, QuotaAction};
use super::reporter::{Report, Reporter};
use super::store::PmStore;
use super::{PanelManagerConfig, PanelManagerError};
use crate::bus::redis::{RedisBus, Subscribe, Topic, Unsubscribe};
use crate::bus::{Bus, BusErrorKind, BusEvent};
use crate::envelope::Envelope;
use crate::instance::{Activate, ExpireInstance, InstanceMode, InstanceState, InstanceStatus};
use crate::kernel::{lock, ActorRef, Behaviour, Ctx, Handler, Kernel, Message, Reply};
use crate::platform::channels::{self, PANELS_PATTERN};
use crate::platform::{PanelChanged, PanelRecords};
pub use app::{Deploy, Scale, Undeploy};
pub use studio::{StartStudio, StopStudio};
use table::{Leaving, Live, Table};

/// Stops every instance of this node (shutdown); replies when all ended.
pub struct StopAll {
    /// SIGTERM to SIGKILL.
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

/// Wiring of a panel manager.
#[derive(Clone)]
pub struct ManagerDeps {
    /// The node's kernel: lifecycles are spawned on it.
    pub kernel: Kernel,
    /// The node's Redis bridge, for subscriptions.
    pub redis: RedisBus,
    /// Runs the instances.
    pub driver: Arc<dyn RuntimeDriver>,
    /// Statuses, routes, App records, claims.
    pub store: PmStore,
    /// The transaction manager's panel records: a panel without one is deleted.
    pub panels: PanelRecords,
    /// Writes and announces, in order.
    pub reporter: Reporter,
    /// Timers, limits and the quota.
    pub config: PanelManagerConfig,
    /// The readiness probe's client.
    pub http: reqwest::Client,
    /// The panel manager's own counters.
    pub metrics: PmMetrics,
}

/// The actor; see the module documentation.
pub struct PanelManager {
    deps: ManagerDeps,
    table: Arc<Mutex<Table>>,
    me: Option<ActorRef<PanelManager>>,
}

impl PanelManager {
    /// The actor kind in the mailbox graph.
    pub const KIND: &'static str = "panel_manager";

    /// Spawns the manager on the kernel; its table survives restarts.
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

    /// Refuses a start of `adding` instances of `owner` that would take
    /// them past the quota, counting `elsewhere` (other nodes') and this
    /// node's instances (those of the panel `except` aside). Access checks
    /// come first: callers ask before anything changes.
    fn within_quota(
        &self,
        table: &Table,
        owner: &str,
        except: Option<&str>,
        elsewhere: usize,
        adding: usize,
        action: QuotaAction,
    ) -> Result<(), PanelManagerError> {
        let limit = self.deps.config.instances_per_user;
        let running = table.running_of(owner, except) + elsewhere;
        if running + adding <= limit {
            return Ok(());
        }
        self.deps.metrics.quota_refused(action);
        tracing::info!(
            %owner, running, adding, limit, action = action.label(),
            "nexus_panel_quota_refusals_total: over the running-instance quota"
        );
        Err(PanelManagerError::Quota { limit })
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
        let gauge = &self.deps.kernel.metrics().panel_instances;
        gauge.with_label_values(&[mode_label(mode), state_label(InstanceState::Pending)]).inc();
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

    fn send_stop(&self, live: &Live, reason: String) {
        let stop = live.lifecycle.link::<Stop>(&format!("panel-manager-{}", self.deps.config.node));
        let msg = Stop { reason, grace: self.deps.config.stop_grace };
        actix::spawn(async move {
            let _ = stop.ask(msg).await;
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

    fn on_bus(&self, event: BusEvent) {
        let msg = match event {
            BusEvent::Message(msg) => std::sync::Arc::unwrap_or_clone(msg),
            // Writes may have been lost while it was down.
            BusEvent::Up(_) => return self.resync(),
            BusEvent::Down(_) => return,
        };
        if msg.channel == channels::ACTIVATE {
            match msg.envelope.typed::<Activate>() {
                Ok(activate) => self.activate(activate.data.panel),
                Err(error) => self.deps.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::Activate, &error),
            }
        } else if msg.pattern.as_deref() == Some(PANELS_PATTERN) {
            if msg.envelope.kind != <PanelChanged as crate::envelope::Payload>::TYPE {
                return;
            }
            match msg.envelope.typed::<PanelChanged>() {
                Ok(Envelope { data: PanelChanged { id, panel: None }, .. }) => self.panel_deleted(&id),
                Ok(_) => {}
                Err(error) => self.deps.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::PanelChanged, &error),
            }
        } else {
            match msg.envelope.typed::<ExpireInstance>() {
                Ok(expire) if msg.channel == channels::instance_control(&expire.data.instance) => {
                    self.expire(expire.data)
                }
                Ok(expire) => tracing::warn!(channel = %msg.channel, instance = %expire.data.instance,
                    "ExpireInstance for another instance's channel; ignored"),
                Err(error) => self.deps.kernel.metrics().bus_error(Bus::Redis, BusErrorKind::InstanceControl, &error),
            }
        }
    }

    /// The instance's watchdog asked for its deletion.
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

/// How many instances of `owner`'s panels other nodes run (not stopping,
/// not ended), as their statuses in Redis say.
async fn running_elsewhere(
    store: &PmStore,
    panels: &PanelRecords,
    owner: &str,
    node: &str,
) -> Result<usize, PanelManagerError> {
    let ids: Vec<String> = panels.of(owner).await?.into_iter().map(|p| p.id).collect();
    Ok(store.running_elsewhere(&ids, node).await?)
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
        let tick = me.link::<idle::Tick>("timer");
        ctx.run_interval(self.deps.config.tick, move |_, _| {
            let _ = tick.try_tell(idle::Tick);
        });
        let sweep = me.link::<sweep::Sweep>("timer");
        ctx.run_interval(self.deps.config.sweep, move |_, _| {
            let _ = sweep.try_tell(sweep::Sweep);
        });
        let resync = me.link::<resync::Resync>("timer");
        ctx.run_interval(self.deps.config.resync, move |_, _| {
            let _ = resync.try_tell(resync::Resync);
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
        if msg.again {
            self.deps.reporter.send(Report::StatusAgain(msg.status));
            return Reply::Now(());
        }
        let status = msg.status;
        let (panel, instance) = (status.panel.clone(), status.instance.clone());
        let mut table = lock(&self.table);
        let gauge = &self.deps.kernel.metrics().panel_instances;
        let mode = mode_label(status.mode);
        let mut ended = false;
        // An App instance that crashed while no other instance of the panel
        // serves (with one, it may restart in place: held requests have
        // somewhere to go).
        let sole_crashed = status.mode == InstanceMode::App
            && status.restarts > 0
            && !status.state.is_final()
            && !table
                .panels
                .get(&panel)
                .is_some_and(|e| e.running(InstanceMode::App).any(|(id, l)| *id != instance && l.state.serves()));
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
            // The only App instance is replaced, not nursed: when it crashed
            // it leaves the running set at once, so the next activation (the
            // gateway repeats it while it holds requests) starts a new one
            // instead of waiting on this one's restart backoff.
            if sole_crashed && live.leaving.is_none() {
                let why = status.reason.clone().unwrap_or_default();
                tracing::info!(%panel, %instance, %why, "a crashed App instance is stopped; the next request starts another");
                live.leaving = Some(Leaving::Stopping);
                self.send_stop(live, format!("crashed, replaced on the next request ({why})"));
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
