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
//! | [`Snapshot`] | a read-only copy of the code | a read-only clone of the volume's claim |
//! | [`RuntimeDriver::start`] | a network namespace with the user process, its sidecar (and watchdog) | a Pod (Studio) or a Knative revision's Pod (App) |
//! | [`InstanceEvent::Exited`] | the user process ended | the container terminated (`restarted`: the kubelet started it again) |
//! | [`InstanceEvent::Gone`] | — | the Pod or Knative Service was deleted or evicted |
//! | [`RuntimeDriver::restart`] | start the user process again | nothing: the kubelet restarts it |
//!
//! Locations are opaque to everyone but their driver: a path for `local`,
//! a PersistentVolumeClaim's name for `kubernetes`.
//!
//! A driver never decides policy: no backoff, no idle timers, no routes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::volume_files::{FileError, FileList, FilePath, VolumeLimits};
use crate::instance::{Endpoint, InstanceMode, Isolation};

/// Why a driver could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The panel's `source` names no template (the user's mistake: 400).
    #[error("unknown panel source {0:?}; a panel's source is template:<name> (templates: {1})")]
    UnknownSource(String, String),
    /// The panel's code says nothing to run (400).
    #[error("the panel's code has no command: add nexus-panel.json with {{\"command\": [...]}} or a server.py")]
    NoCommand,
    /// The panel's `nexus-panel.json` is unusable (400).
    #[error("nexus-panel.json: {0}")]
    PanelFile(#[from] PanelFileError),
    /// A panel or instance id that cannot name a file or namespace.
    #[error("invalid {what} id {id:?}: only letters, digits, '-' and '_', 1 to 100 of them")]
    InvalidId {
        /// `panel` or `instance`.
        what: &'static str,
        /// The id as given.
        id: String,
    },
    /// The panel's files hold a hard link to a file from elsewhere (400).
    #[error("{0}")]
    ForeignLink(String),
    /// A file operation on a volume was refused (the user's request: 4xx).
    #[error(transparent)]
    File(#[from] FileError),
    /// The driver cannot reach its volumes' files from this node.
    #[error("the {0} driver does not edit panel files")]
    NoFileAccess(&'static str),
    /// The driver runs no such instance.
    #[error("no instance {0}")]
    NoInstance(String),
    /// The instance is already running.
    #[error("instance {0} is already running")]
    AlreadyRunning(String),
    /// The isolation the driver needs is not there.
    #[error("sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    /// The Kubernetes driver's cluster refused or failed.
    #[error("kubernetes: {0}")]
    Kubernetes(#[from] super::kubernetes::KubeError),
    /// A file or process operation failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Refuses a panel or instance id that could not name a file, a namespace
/// or a Kubernetes object's source: letters, digits, `-` and `_`, 1 to 100.
pub fn check_id(what: &'static str, id: &str) -> Result<(), DriverError> {
    let valid =
        !id.is_empty() && id.len() <= 100 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(DriverError::InvalidId { what, id: id.to_owned() })
    }
}

/// What is wrong with a panel's `nexus-panel.json`.
#[derive(Debug, thiserror::Error)]
pub enum PanelFileError {
    /// A symlink (never followed) or a special file, or too large.
    #[error("must be a regular file of at most {max} bytes")]
    NotARegularFile {
        /// The size limit.
        max: u64,
    },
    /// Not the JSON the contract asks for.
    #[error("{0}; expected {{\"command\": [\"program\", \"arg\", ...]}}")]
    Json(#[from] serde_json::Error),
    /// `command` is empty or names an empty program.
    #[error("\"command\" must name a program")]
    NoProgram,
}

/// Why a driver cannot isolate panel code as it was told to. Cheap to
/// clone: a driver decides its isolation once and reports the same
/// failure to every start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SandboxError {
    /// Network namespaces need root and iproute2's `ip`.
    #[error("network namespaces need root and iproute2's `ip`")]
    NoNamespaces,
    /// `runsc` is not on the `PATH`.
    #[error("runsc is not installed")]
    NoRunsc,
    /// `runsc run` of a probe container failed.
    #[error("`runsc run` failed ({status}): {stderr}")]
    RunscFailed {
        /// How it exited.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// `runsc run` of a probe container did not end in time.
    #[error("`runsc run` of a probe did not finish within {0:?}")]
    RunscTimeout(Duration),
    /// Preparing or running the probe failed.
    #[error("probing runsc: {0}")]
    Probe(Arc<std::io::Error>),
    /// The instance's network namespace could not be made.
    #[error("the instance's network namespace: {0}")]
    Netns(Arc<crate::netns::NetnsError>),
    /// The instance's link, address or rules could not be set up.
    #[error("the instance's network: {0}")]
    Network(Arc<super::local::NetworkError>),
    /// `bwrap` (Debian's bubblewrap) is not on the `PATH`.
    #[error("bubblewrap (bwrap) is not installed")]
    NoBubblewrap,
    /// `bwrap` of a probe failed.
    #[error("`bwrap` failed ({status}): {stderr}")]
    BubblewrapFailed {
        /// How it exited.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// `auto` found no sandbox that works here, and runs no panel
    /// unisolated unless asked to.
    #[error(
        "no sandbox works here: {0}; run as root with runsc or bubblewrap installed, or choose \
         --sandbox process (root) or none to run panels unisolated"
    )]
    NoIsolation(String),
}

/// Where a driver keeps a volume or snapshot, in its own terms; stored
/// with the App record, so it is plain text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Location(String);

impl Location {
    /// The location as the driver wrote it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The location as a path (the `local` driver's).
    pub fn path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Self {
        Location(path.to_string_lossy().into_owned())
    }
}

impl From<String> for Location {
    fn from(name: String) -> Self {
        Location(name)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A panel's persistent Studio storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The panel it belongs to.
    pub panel: String,
    /// Where the driver keeps it (a directory; a PVC name in Kubernetes).
    pub location: Location,
}

/// An immutable copy of a panel's code, what an App runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The panel it was taken of.
    pub panel: String,
    /// Grows by one with every deploy.
    pub version: u64,
    /// Where the driver keeps it (a directory; a PVC name in Kubernetes).
    pub location: Location,
}

/// What a new instance runs.
#[derive(Debug, Clone)]
pub enum Code {
    /// The panel's volume, read-write (a Studio instance).
    Studio(Volume),
    /// A fresh copy of a snapshot (an App instance).
    App(Snapshot),
}

/// Everything a driver needs to start one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Unique among all instances ever started (`<panel>-<random>`).
    pub instance: String,
    /// The panel it serves.
    pub panel: String,
    /// The panel's owner.
    pub owner: String,
    /// Studio or App.
    pub mode: InstanceMode,
    /// What it runs.
    pub code: Code,
    /// Studio only: the watchdog deletes the instance after this long
    /// without a heartbeat.
    pub watchdog_timeout: Option<Duration>,
}

/// What happens to a running instance, reported by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceEvent {
    /// The user process ended on its own (`code` None: killed by a signal).
    Exited {
        /// The exit code; `None` when a signal killed it.
        code: Option<i32>,
        /// The resource limit it ran into, when it did.
        limit: Option<LimitHit>,
        /// The runtime already started it again (Kubernetes' kubelet): the
        /// lifecycle counts the crash and probes, it does not ask for a
        /// restart.
        restarted: bool,
    },
    /// The instance is gone from under the driver (deleted or evicted by
    /// someone else): final, nothing is left to stop.
    Gone {
        /// What the runtime said.
        reason: String,
        /// Ended by a failure (evicted) rather than deleted.
        failed: bool,
    },
}

/// A resource limit an instance ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// Killed for using more memory than it may.
    Memory,
    /// A fork or thread refused: as many processes as it may have.
    Pids,
    /// Its scratch space (an App's) was full.
    Disk,
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitHit::Memory => "memory limit",
            LimitHit::Pids => "process limit",
            LimitHit::Disk => "disk limit",
        })
    }
}

/// A started instance.
pub struct Started {
    /// Where its panel (and watchdog) can be reached from the host; the
    /// route the gateway follows.
    pub endpoint: Endpoint,
    /// The instance's sidecar secret ([`crate::instance::SIDECAR_TOKEN_HEADER`]),
    /// for the readiness probe's `GET /manifest`. Kept in memory only: it is
    /// not part of the endpoint, so it never reaches the route or Redis.
    /// `None` when the driver gives the panel none.
    pub sidecar_token: Option<String>,
    /// How the user process is isolated.
    pub isolation: Isolation,
    /// Set when isolation is weaker than it should be: shown to the user.
    pub warning: Option<String>,
    /// What happens to the instance from now on.
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

    /// Lets go of what the driver holds on this machine beside its
    /// instances (the local driver's mounted volumes), once they are
    /// stopped, as the node stops. Used again, the driver takes it back.
    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// What a volume may hold through the file methods below.
    fn file_limits(&self) -> VolumeLimits {
        VolumeLimits::default()
    }

    /// Every entry of the panel's volume (made from `source` the first time,
    /// as [`RuntimeDriver::volume`]).
    fn list_files(&self, _panel: &str, _source: &str) -> BoxFuture<'_, Result<FileList, DriverError>> {
        let name = self.name();
        Box::pin(async move { Err(DriverError::NoFileAccess(name)) })
    }

    /// One file of the panel's volume.
    fn read_file(&self, _panel: &str, _source: &str, _path: FilePath) -> BoxFuture<'_, Result<Vec<u8>, DriverError>> {
        let name = self.name();
        Box::pin(async move { Err(DriverError::NoFileAccess(name)) })
    }

    /// Saves one file of the panel's volume; true when it is new.
    fn write_file(
        &self,
        _panel: &str,
        _source: &str,
        _path: FilePath,
        _bytes: bytes::Bytes,
    ) -> BoxFuture<'_, Result<bool, DriverError>> {
        let name = self.name();
        Box::pin(async move { Err(DriverError::NoFileAccess(name)) })
    }

    /// Deletes a file, symlink or directory of the panel's volume.
    fn delete_file(&self, _panel: &str, _source: &str, _path: FilePath) -> BoxFuture<'_, Result<(), DriverError>> {
        let name = self.name();
        Box::pin(async move { Err(DriverError::NoFileAccess(name)) })
    }

    /// Replaces the panel's volume's tree with the one in a tar.gz or zip
    /// `archive`; a refused archive changes nothing.
    fn replace_files(
        &self,
        _panel: &str,
        _source: &str,
        _archive: bytes::Bytes,
    ) -> BoxFuture<'_, Result<FileList, DriverError>> {
        let name = self.name();
        Box::pin(async move { Err(DriverError::NoFileAccess(name)) })
    }
}
