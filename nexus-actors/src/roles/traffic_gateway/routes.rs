//! `RouteTable`: which instances serve which panel, as this gateway sees it.
//!
//! The truth is the Redis hash `nexus:routes`, written by panel managers.
//! The actor loads it whole at start and every [`RELOAD_EVERY`], and
//! re-reads one panel's field on each [`RouteChanged`] from
//! `nexus:routes:changed` (pub/sub is at-most-once; the periodic reload
//! repairs what was missed). Reads from Redis run one at a time in the
//! actor, so an older read never overwrites a newer one.
//!
//! The request path never goes through the mailbox: the actor publishes an
//! immutable snapshot in [`Routes`], which readers clone under a short read
//! lock, and a version watch on which the activator waits for endpoints.
//! This module neither proxies nor decides what a missing route means.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::{ActorFutureExt, AsyncContext};
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use tokio::sync::{oneshot, watch};

use crate::bus::{Backoff, Bus, BusErrorKind};
use crate::envelope::Envelope;
use crate::instance::{PanelRoute, RouteChanged, ROUTES_KEY};
use crate::kernel::{ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Message, Reply, Supervised};
use crate::platform::channels;
use crate::telemetry::Metrics;

/// How often the whole table is read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// Panel id → its route. Immutable once published.
pub type Snapshot = Arc<HashMap<String, Arc<PanelRoute>>>;

/// The read side of the table, shared with the proxy. Cheap to clone.
#[derive(Clone)]
pub struct Routes {
    inner: Arc<RoutesInner>,
}

struct RoutesInner {
    snapshot: RwLock<Snapshot>,
    /// Bumped on every change of the snapshot.
    version: watch::Sender<u64>,
}

impl Default for Routes {
    fn default() -> Self {
        Self::new()
    }
}

impl Routes {
    /// An empty table.
    pub fn new() -> Self {
        let (version, _) = watch::channel(0);
        Routes { inner: Arc::new(RoutesInner { snapshot: RwLock::new(Arc::default()), version }) }
    }

    /// The current snapshot of every route.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `panel`'s route now, if it has one.
    pub fn get(&self, panel: &str) -> Option<Arc<PanelRoute>> {
        self.inner.snapshot.read().unwrap_or_else(|e| e.into_inner()).get(panel).cloned()
    }

    /// Waits until `until` holds for `panel`'s route (`None` when unknown)
    /// or `deadline` passes, and returns the route as it is then.
    pub async fn await_route(
        &self,
        panel: &str,
        deadline: tokio::time::Instant,
        until: impl Fn(Option<&PanelRoute>) -> bool,
    ) -> Option<Arc<PanelRoute>> {
        // Subscribed before looking, so a change between the look and the
        // wait still wakes us.
        let mut changes = self.inner.version.subscribe();
        loop {
            let route = self.get(panel);
            if until(route.as_deref()) {
                return route;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return self.get(panel),
            }
        }
    }

    fn replace_all(&self, routes: HashMap<String, Arc<PanelRoute>>) {
        let mut snapshot = self.inner.snapshot.write().unwrap_or_else(|e| e.into_inner());
        if **snapshot == routes {
            return;
        }
        *snapshot = Arc::new(routes);
        drop(snapshot);
        self.inner.version.send_modify(|v| *v += 1);
    }

    fn set(&self, panel: &str, route: Option<PanelRoute>) {
        let mut snapshot = self.inner.snapshot.write().unwrap_or_else(|e| e.into_inner());
        if snapshot.get(panel).map(|r| &**r) == route.as_ref() {
            return;
        }
        let mut next = HashMap::clone(&snapshot);
        match route {
            Some(route) => next.insert(panel.to_owned(), Arc::new(route)),
            None => next.remove(panel),
        };
        *snapshot = Arc::new(next);
        drop(snapshot);
        self.inner.version.send_modify(|v| *v += 1);
    }
}

/// Read `panel`'s field again. Replies once the snapshot reflects it.
pub struct RouteUpdated {
    /// The panel whose route changed.
    pub panel: String,
}

impl Message for RouteUpdated {
    type Reply = ();
}

/// Read the whole hash again. Replies once the snapshot reflects it.
pub struct Reload;

impl Message for Reload {
    type Reply = ();
}

/// The actor that keeps [`Routes`] in step with Redis.
pub struct RouteTable {
    routes: Routes,
    redis: ConnectionManager,
    metrics: Metrics,
}

impl RouteTable {
    /// The actor kind in the mailbox graph and metrics.
    pub const KIND: &'static str = "route_table";

    /// Spawns the table on the current arbiter and its channel listener;
    /// the listener ends when `stop` turns true.
    pub fn spawn(
        kernel: &Kernel,
        routes: Routes,
        client: redis::Client,
        redis: ConnectionManager,
        stop: watch::Receiver<bool>,
    ) -> ActorRef<RouteTable> {
        let metrics = kernel.metrics().clone();
        let listener_metrics = metrics.clone();
        let table = kernel.spawn("route-table", move || RouteTable {
            routes: routes.clone(),
            redis: redis.clone(),
            metrics: metrics.clone(),
        });
        let listener = Listener {
            client,
            updated: table.link("route-table-listener"),
            reload: table.link("route-table-listener"),
            metrics: listener_metrics,
        };
        actix::spawn(reload_every(table.link("route-table-timer"), stop.clone()));
        actix::spawn(listener.run(stop));
        table
    }

    /// Runs `read` against Redis with the mailbox paused, then `apply`;
    /// the returned reply resolves once it was applied.
    fn read_then<T: 'static>(
        &mut self,
        ctx: &mut Ctx<Self>,
        read: impl std::future::Future<Output = redis::RedisResult<T>> + 'static,
        apply: impl FnOnce(&mut RouteTable, T) + 'static,
    ) -> Reply<()> {
        let (done, applied) = oneshot::channel();
        let fut = actix::fut::wrap_future::<_, Supervised<Self>>(read).map(move |result, s, _| {
            let this = s.behaviour_mut();
            match result {
                Ok(value) => apply(this, value),
                // The last snapshot keeps serving; the next reload repairs it.
                Err(error) => this.metrics.bus_error(Bus::Redis, BusErrorKind::RoutesRead, &error),
            }
            let _ = done.send(());
        });
        ctx.wait(fut);
        Reply::later(async move {
            let _ = applied.await;
        })
    }

    fn parse(&self, panel: &str, json: &str) -> Option<PanelRoute> {
        match serde_json::from_str::<PanelRoute>(json) {
            Ok(route) => Some(route),
            Err(error) => {
                self.metrics.bus_error(Bus::Redis, BusErrorKind::RouteDecode, &format_args!("panel {panel}: {error}"));
                None
            }
        }
    }
}

impl Behaviour for RouteTable {
    const KIND: &'static str = RouteTable::KIND;
}

impl Handler<Reload> for RouteTable {
    fn handle(&mut self, _: Reload, ctx: &mut Ctx<Self>) -> Reply<()> {
        let mut conn = self.redis.clone();
        let read = async move { conn.hgetall::<_, HashMap<String, String>>(ROUTES_KEY).await };
        self.read_then(ctx, read, |this, all| {
            let routes = all
                .iter()
                .filter_map(|(panel, json)| this.parse(panel, json).map(|r| (panel.clone(), Arc::new(r))))
                .collect();
            this.routes.replace_all(routes);
        })
    }
}

impl Handler<RouteUpdated> for RouteTable {
    fn handle(&mut self, msg: RouteUpdated, ctx: &mut Ctx<Self>) -> Reply<()> {
        let mut conn = self.redis.clone();
        let panel = msg.panel;
        let field = panel.clone();
        let read = async move { conn.hget::<_, _, Option<String>>(ROUTES_KEY, field).await };
        self.read_then(ctx, read, move |this, json| {
            let route = json.and_then(|json| this.parse(&panel, &json));
            this.routes.set(&panel, route);
        })
    }
}

/// Asks for a full reload every [`RELOAD_EVERY`] until `stop`. A timer
/// outside the actor, so a restarted actor does not gain a second one.
async fn reload_every(reload: Link<Reload>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RELOAD_EVERY) => {
                // A full mailbox already has work queued; skipping one tick is fine.
                let _ = reload.try_tell(Reload);
            }
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// Follows `nexus:routes:changed` on a pub/sub connection of its own: the
/// gateway is started from a Redis URL, and a dedicated connection means
/// route news never queue behind other subscribers of the node's bridge.
struct Listener {
    client: redis::Client,
    updated: Link<RouteUpdated>,
    reload: Link<Reload>,
    metrics: Metrics,
}

impl Listener {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::new();
        loop {
            match self.subscribe().await {
                Ok(pubsub) => {
                    backoff.reset();
                    // Whatever was announced while we were not listening.
                    let _ = self.reload.tell(Reload);
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            msg = messages.next() => match msg {
                                Some(msg) => self.deliver(&msg),
                                None => break,
                            },
                            _ = stop.wait_for(|stopped| *stopped) => return,
                        }
                    }
                    self.metrics.bus_error(Bus::Redis, BusErrorKind::RoutesDisconnected, &"route channel closed");
                }
                Err(error) => self.metrics.bus_error(Bus::Redis, BusErrorKind::RoutesSubscribe, &error),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
    }

    async fn subscribe(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(channels::ROUTES_CHANGED).await?;
        Ok(pubsub)
    }

    fn deliver(&self, msg: &redis::Msg) {
        self.metrics.bus_received.with_label_values(&[Bus::Redis.as_str(), "nexus:routes"]).inc();
        let changed = Envelope::decode(msg.get_payload_bytes())
            .and_then(|envelope| envelope.typed::<RouteChanged>())
            .map(|changed| changed.data.panel);
        match changed {
            Ok(panel) => {
                let _ = self.updated.tell(RouteUpdated { panel });
            }
            Err(error) => self.metrics.bus_error(Bus::Redis, BusErrorKind::RouteChangedDecode, &error),
        }
    }
}
