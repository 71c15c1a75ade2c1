//! The `panel-manager` role: one [`lifecycle::PodLifecycle`] actor per
//! panel instance over a [`driver::RuntimeDriver`], supervised by the
//! node's [`manager::PanelManager`], and the owner-only HTTP API to start,
//! stop, deploy, scale and read panel instances.
//!
//! A node wires it with [`start`] (actors, stale-state cleanup),
//! [`configure`] (routes) and [`PanelManagerHandle::stop_all`] (shutdown);
//! [`local::LocalDriver`] is the driver for one machine.

pub mod api;
pub mod driver;
pub mod files_api;
pub mod kubernetes;
pub mod lifecycle;
pub mod local;
pub mod manager;
pub mod metrics;
pub mod reporter;
pub mod store;
pub mod templates;
pub mod volume_files;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;

use self::driver::{DriverError, RuntimeDriver};
use self::lifecycle::{now_ms, LifecyclePolicy};
use self::manager::{ManagerDeps, PanelManager, StopAll};
use self::metrics::PmMetrics;
use self::reporter::{Report, Reporter};
use self::store::{PmStore, StoreError};
use crate::bus::redis::RedisBus;
use crate::instance::InstanceState;
use crate::kernel::{ActorRef, Kernel};
use crate::platform::{PanelRecords, Quotas};

/// How long an activation claim holds when its holder never releases it.
pub const ACTIVATION_CLAIM_TTL: Duration = Duration::from_secs(30);

/// Settings of a node's panel manager. [`PanelManagerConfig::new`] gives
/// the production defaults; tests shorten the timers.
#[derive(Debug, Clone)]
pub struct PanelManagerConfig {
    /// This node's name: it marks the instances it runs.
    pub node: String,
    /// Where statuses, routes and panel records live.
    pub redis_url: String,
    /// An App instance without a request for this long is stopped.
    pub idle_timeout: Duration,
    /// A serving instance without a request for this long shows as `idle`.
    pub idle_mark: Duration,
    /// Studio: the watchdog deletes the instance after this long without a heartbeat.
    pub watchdog_timeout: Duration,
    /// The most instances an App may be scaled to.
    pub max_replicas: u32,
    /// From started to `/manifest` answering; past it the instance fails.
    pub ready_timeout: Duration,
    /// How often `/manifest` is asked while an instance starts.
    pub probe_interval: Duration,
    /// The first restart of a crashed user process waits this long.
    pub restart_backoff: Duration,
    /// Restart waits double up to this.
    pub max_restart_backoff: Duration,
    /// More crashes than this within `crash_window` end in `failed`.
    pub max_crashes: usize,
    /// See `max_crashes`.
    pub crash_window: Duration,
    /// SIGTERM to SIGKILL when an instance is stopped.
    pub stop_grace: Duration,
    /// A serving App instance leaves the route this long before it is
    /// stopped, so gateways that still hold the old route finish with it.
    pub drain: Duration,
    /// How often the panels this node knows are checked against their
    /// records: a deletion whose announcement was lost is cleaned up then.
    pub sweep: Duration,
    /// How often the traffic signal is read (idle marks, scale to zero).
    pub tick: Duration,
    /// How often this node's routes and instance statuses are written to
    /// Redis again (and whenever the bus comes back), repairing writes lost
    /// to a Redis blip.
    pub resync: Duration,
    /// Final statuses kept per panel.
    pub keep_final: usize,
    /// Instances one user may run at once, across their panels and the
    /// nodes (Studio instances and App replicas; those stopping aside).
    pub instances_per_user: usize,
}

impl PanelManagerConfig {
    /// The production defaults for the node `node`.
    pub fn new(node: impl Into<String>, redis_url: impl Into<String>) -> Self {
        PanelManagerConfig {
            node: node.into(),
            redis_url: redis_url.into(),
            idle_timeout: Duration::from_secs(60),
            idle_mark: Duration::from_secs(30),
            watchdog_timeout: Duration::from_secs(30 * 60),
            max_replicas: 4,
            ready_timeout: Duration::from_secs(30),
            probe_interval: Duration::from_millis(100),
            restart_backoff: Duration::from_millis(500),
            max_restart_backoff: Duration::from_secs(10),
            max_crashes: 5,
            crash_window: Duration::from_secs(60),
            stop_grace: Duration::from_secs(5),
            drain: Duration::from_secs(1),
            sweep: Duration::from_secs(30),
            resync: Duration::from_secs(10),
            tick: Duration::from_secs(1),
            keep_final: 5,
            instances_per_user: Quotas::default().instances,
        }
    }

    /// The timing and crash policy of this manager's lifecycles.
    pub fn policy(&self) -> LifecyclePolicy {
        LifecyclePolicy {
            ready_timeout: self.ready_timeout,
            probe_interval: self.probe_interval,
            restart_backoff: self.restart_backoff,
            max_restart_backoff: self.max_restart_backoff,
            max_crashes: self.max_crashes,
            crash_window: self.crash_window,
            idle_mark: self.idle_mark,
            log_tail_lines: 20,
        }
    }
}

/// Why a panel manager request failed.
#[derive(Debug, thiserror::Error)]
pub enum PanelManagerError {
    /// The request conflicts with what runs; the message says how (409).
    #[error("{0}")]
    Conflict(String),
    /// Scale of a panel that is not deployed (409).
    #[error("the panel is not deployed as an App")]
    NotDeployed,
    /// Scale out of range (400).
    #[error("replicas must be 0 to {max}, not {replicas}")]
    BadReplicas {
        /// Asked for.
        replicas: u32,
        /// The configured maximum.
        max: u32,
    },
    /// The owner runs as many instances as they may (403 `quota_exceeded`).
    #[error("you run {limit} panel instances already, the most allowed")]
    Quota {
        /// The owner's running-instance quota.
        limit: usize,
    },
    /// The runtime driver failed.
    #[error("runtime driver: {0}")]
    Driver(#[from] DriverError),
    /// Redis failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The manager actor is gone (the node is shutting down).
    #[error("the panel manager has stopped")]
    Stopped,
    /// The role could not start.
    #[error("panel manager setup: {0}")]
    Setup(#[from] SetupError),
}

/// Why the panel manager could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The readiness probe's HTTP client.
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
}

impl From<redis::RedisError> for PanelManagerError {
    fn from(e: redis::RedisError) -> Self {
        PanelManagerError::Store(StoreError::Redis(e))
    }
}

/// A running panel manager. Cheap to clone.
#[derive(Clone)]
pub struct PanelManagerHandle {
    /// The manager actor.
    pub actor: ActorRef<PanelManager>,
    /// Its state in Redis.
    pub store: PmStore,
    /// Its runtime driver.
    pub driver: Arc<dyn RuntimeDriver>,
    /// How it was configured.
    pub config: PanelManagerConfig,
    /// Its counters.
    pub metrics: PmMetrics,
}

impl PanelManagerHandle {
    /// Stops every instance of this node (SIGKILL after `grace`) and waits
    /// until they ended and their statuses are written.
    pub async fn stop_all(&self, grace: Duration) {
        let _ = self.actor.link::<StopAll>("node").ask(StopAll { grace }).await;
        self.driver.release().await;
    }
}

/// Starts the node's panel manager on the current arbiter: marks instances
/// a previous life of this node left behind as stopped (their endpoints
/// leave the routes; an App's route stays activatable), then spawns the
/// [`PanelManager`] actor, which subscribes through `redis`.
pub async fn start(
    kernel: &Kernel,
    redis: RedisBus,
    driver: Arc<dyn RuntimeDriver>,
    config: PanelManagerConfig,
) -> Result<PanelManagerHandle, PanelManagerError> {
    let store = PmStore::connect(&config.redis_url).await?;
    let panels = PanelRecords::connect(&config.redis_url).await?;
    let reporter = Reporter::spawn(store.clone(), redis.publisher.clone(), config.node.clone(), config.keep_final);
    clear_stale(&store, &reporter, &config.node).await?;
    let http = reqwest::Client::builder().no_proxy().build().map_err(SetupError::Http)?;
    let metrics = PmMetrics::register(kernel.metrics().registry());
    let deps = ManagerDeps {
        kernel: kernel.clone(),
        redis,
        driver: driver.clone(),
        store: store.clone(),
        panels,
        reporter,
        config: config.clone(),
        http,
        metrics: metrics.clone(),
    };
    let actor = PanelManager::spawn(deps);
    tracing::info!(node = %config.node, driver = driver.name(), "panel manager started");
    Ok(PanelManagerHandle { actor, store, driver, config, metrics })
}

/// Instances recorded as live by this node are gone after a restart.
async fn clear_stale(store: &PmStore, reporter: &Reporter, node: &str) -> Result<(), StoreError> {
    let stale = store.node_instances(node).await?;
    let mut panels = HashSet::new();
    for (instance, panel) in &stale {
        let Some(mut status) = store.status(panel, instance).await? else { continue };
        if !status.state.is_final() {
            status.state = InstanceState::Stopped;
            status.reason = Some("its panel manager restarted".to_owned());
            status.since_ms = now_ms();
            tracing::info!(%instance, %panel, "stale instance marked stopped");
            reporter.send(Report::Status(status));
        }
        panels.insert(panel.clone());
    }
    for panel in panels {
        if let Some(mut route) = store.route(&panel).await? {
            let before = route.endpoints.len();
            route.endpoints.retain(|e| !stale.contains_key(&e.instance));
            if route.endpoints.len() != before {
                reporter.send(Report::Route(route));
            }
        }
    }
    reporter.flush().await;
    store.clear_node_instances(node).await
}

/// Registers the panel manager's routes under `/api/panels/{id}/...`.
/// Register them before the `/api` fallback; the app must hold the node's
/// [`crate::platform::Auth`] as data.
pub fn configure(handle: PanelManagerHandle, panels: PanelRecords) -> impl FnOnce(&mut web::ServiceConfig) {
    let file_bodies = tokio::sync::Semaphore::new(files_api::MAX_BUFFERED);
    move |cfg| api::routes(cfg, api::PmApi { handle, panels, file_bodies })
}
