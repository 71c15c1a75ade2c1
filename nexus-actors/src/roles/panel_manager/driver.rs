//! The runtime driver: how the panel manager makes panel code run somewhere.
//!
//! The [`PodLifecycle`](super::lifecycle) actor decides *when* (start,
//! restart with backoff, stop, scale to zero); a driver knows *how*, on one
//! runtime. The trait is shaped after Kubernetes so the `kubernetes` driver
//! fits it unchanged:
//!
//! | trait | `local` driver | Kubernetes |
//! |---|---|---|
//! | [`Volume`] | a persistent work dir | a PVC mounted at `/home` |
//! | [`Snapshot`] | a read-only copy of the code | a container image / Knative revision |
//! | [`RuntimeDriver::start`] | a network namespace with the user process, its sidecar (and watchdog) | a Pod (Studio) or a Knative revision's Pod (App) |
//! | [`InstanceEvent::Exited`] | the user process ended | the container terminated |
//! | [`RuntimeDriver::restart`] | start the user process again | nothing: the kubelet restarts it |
//!
//! A driver never decides policy: no backoff, no idle timers, no routes.

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::instance::{Endpoint, InstanceMode, Isolation};

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("unknown panel source {0:?}; a panel's source is template:<name> (templates: {1})")]
    UnknownSource(String, String),
    #[error("the panel's code has no command: add nexus-panel.json with {{\"command\": [...]}} or a server.py")]
    NoCommand,
    #[error("no instance {0}")]
    NoInstance(String),
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// A panel's persistent Studio storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub panel: String,
    /// Where the driver keeps it (a directory; a PVC name in Kubernetes).
    pub location: PathBuf,
}

/// An immutable copy of a panel's code, what an App runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub panel: String,
    /// Grows by one with every deploy.
    pub version: u64,
    pub location: PathBuf,
}

/// What a new instance runs.
#[derive(Debug, Clone)]
pub enum Code {
    Studio(Volume),
    App(Snapshot),
}

/// Everything a driver needs to start one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Unique among all instances ever started (`<panel>-<random>`).
    pub instance: String,
    pub panel: String,
    pub owner: String,
    pub mode: InstanceMode,
    pub code: Code,
    /// Studio only: the watchdog deletes the instance after this long
    /// without a heartbeat.
    pub watchdog_timeout: Option<Duration>,
}

/// What happens to a running instance, reported by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceEvent {
    /// The user process ended on its own (`code` None: killed by a signal).
    Exited { code: Option<i32> },
}

/// A started instance.
pub struct Started {
    /// Where its panel (and watchdog) can be reached from the host.
    pub endpoint: Endpoint,
    pub isolation: Isolation,
    /// Set when isolation is weaker than it should be: shown to the user.
    pub warning: Option<String>,
    pub events: mpsc::UnboundedReceiver<InstanceEvent>,
}

/// Runs panel instances on one runtime. Methods take `&self` and may be
/// called concurrently for different instances.
pub trait RuntimeDriver: Send + Sync + 'static {
    /// `local` or `kubernetes`, for logs and the UI.
    fn name(&self) -> &'static str;

    /// The panel's Studio volume, created from its `source` (a template)
    /// the first time and kept from then on.
    fn volume(&self, panel: &str, source: &str) -> BoxFuture<'_, Result<Volume, DriverError>>;

    /// An immutable snapshot of the Studio volume (or of `source` when the
    /// panel has none yet), with the next version number.
    fn snapshot(&self, panel: &str, source: &str) -> BoxFuture<'_, Result<Snapshot, DriverError>>;

    /// Starts one instance and returns once its processes run (not once it
    /// answers: the lifecycle probes readiness through the endpoint).
    fn start(&self, spec: InstanceSpec) -> BoxFuture<'_, Result<Started, DriverError>>;

    /// Starts the user process of `instance` again after it exited.
    fn restart(&self, instance: &str) -> BoxFuture<'_, Result<(), DriverError>>;

    /// Stops everything of `instance` (SIGTERM, then SIGKILL after `grace`)
    /// and frees what it held, but keeps its logs. Studio volumes survive.
    fn stop(&self, instance: &str, grace: Duration) -> BoxFuture<'_, Result<(), DriverError>>;

    /// The last `lines` lines of the user process's log (stdout and stderr).
    fn logs(&self, instance: &str, lines: usize) -> BoxFuture<'_, Result<Vec<String>, DriverError>>;

    /// Deletes the panel's volume and snapshots (the panel is gone).
    fn forget(&self, panel: &str) -> BoxFuture<'_, Result<(), DriverError>>;
}
