//! The `local` runtime driver: a panel instance as a Pod without
//! Kubernetes, on this machine.
//!
//! One instance is a private network namespace with an address of its own
//! ([`network`]: a veth pair, NAT out, the egress policy), the user's
//! server in it on 8080 (under gVisor when `runsc` works, else in
//! bubblewrap's namespaces, see [`isolation`]), its `nexus sidecar` and, for
//! Studio, its `nexus watchdog`. Those two stay on the host network (their
//! Redis connections stay outside); their listeners, on the loopback the
//! panel sees, are bound here before the panel runs and handed over. The gateway reaches the instance's 8080 and
//! 9999 at its address, like a Pod IP; no host port is opened for it.
//!
//! An App under gVisor starts in a sandbox made ahead when one is ready
//! ([`warm`]); how an instance starts is [`start`]'s.
//!
//! It owns the files under `data_dir` and the processes it starts. The
//! layout keeps every panel uid to its own code:
//!
//! | path | mode | holds |
//! |---|---|---|
//! | `data_dir/` | `0711` root | passable, not listable |
//! | `volumes/` | `0711` root | Studio volumes |
//! | `volumes/.disks/` | `0700` root | their file systems' images (as root) |
//! | `volumes/<panel>/` | `0711` root | one volume (its own file system, as root) |
//! | `volumes/<panel>/home/` | `0700` the panel's uid | its persistent code |
//! | `scratch/` | `0711` root | App instances' code |
//! | `scratch/<instance>/` | `0700` the panel's uid | a fresh copy of a snapshot |
//! | `snapshots/` | `0700` root | read-only App snapshots |
//! | `instances/` | `0700` root | logs, runsc bundles and state |
//!
//! It decides no policy: a user process that exits is reported
//! ([`InstanceEvent::Exited`]) and restarted only when asked; the sidecar
//! and watchdog are ours, so a dead one is restarted here with backoff
//! (logged and counted), never reported as the panel's exit.
//!
//! Each instance gets two secrets, both handed over in environments, never
//! on a command line, never written to Redis: the watchdog's (Studio: the
//! watchdog and, through the endpoint, the gateway) and the sidecar's
//! ([`SIDECAR_TOKEN_ENV`]: the panel, its sidecar and, through
//! [`Started::sidecar_token`], the readiness probe).

mod acl;
mod archive;
mod bubblewrap;
mod cgroups;
mod disks;
mod files;
#[cfg(test)]
mod files_tests;
mod isolation;
mod logs;
mod metrics;
mod network;
mod objects;
mod procs;
mod runsc;
mod scratch;
mod stale;
mod start;
mod storage;
mod swap;
mod tree;
mod uids;
mod warm;
mod workspace;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, OnceCell};

use super::driver::{DriverError, InstanceEvent, InstanceSpec, RuntimeDriver, SandboxError, Snapshot, Started, Volume};
use super::volume_files::{FileList, FilePath, VolumeLimits};
use crate::instance::{InstanceMode, Isolation};
use crate::netns::Netns;
use files::{blocking, check_id, fresh_copy, remove_tree};
use isolation::{resolve, Sandbox};
use procs::Supervised;
use start::{new_secret, spawn_user};

pub use super::templates::names as template_names;
pub use cgroups::Limits;
pub use files::netns_name;
pub use isolation::SandboxChoice;
pub use metrics::LocalMetrics;
pub use network::{is_pool, Egress, NetworkConfig, NetworkError};

/// Where the panel listens inside its namespace, and its sidecar's proxy.
const PANEL_PORT: u16 = 8080;
const SIDECAR_PORT: u16 = 3500;
const WATCHDOG_PORT: u16 = 9999;
/// The watchdog's timeout when the spec names none (the 30 min).
const DEFAULT_WATCHDOG_TIMEOUT: Duration = Duration::from_secs(1800);
/// How often the running sidecars' Redis users are set again.
const SIDECAR_USERS_EVERY: Duration = Duration::from_secs(5);
/// How long `restart` lets a still-running user process end on SIGTERM.
const RESTART_GRACE: Duration = Duration::from_secs(5);

/// Where and how the driver runs instances.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Everything the driver keeps (see the module documentation).
    pub data_dir: PathBuf,
    /// The `nexus` binary, run as `nexus sidecar` and `nexus watchdog`.
    pub nexus_bin: PathBuf,
    /// Given to the sidecar and watchdog only, never to user code.
    pub redis_url: String,
    /// The isolation asked for.
    pub sandbox: SandboxChoice,
    /// How long a choice weaker than gVisor, made because `runsc` did not
    /// work, stands before the next instance start probes again.
    pub reprobe_after: Duration,
    /// The instances' addresses and egress policy.
    pub network: NetworkConfig,
    /// What each instance may use (root only: cgroups).
    pub limits: Limits,
    /// How many gVisor sandboxes are kept ready for App starts (see
    /// [`warm`]); none when 0 or when instances do not run under gVisor.
    pub warm_sandboxes: usize,
}

/// An isolation decided, and when.
type Decision = (Result<Sandbox, SandboxError>, Instant);

/// More than a probe's tries can take, with their timeouts.
const PROBE_BUDGET: Duration = Duration::from_secs(180);

impl LocalConfig {
    /// The default of [`LocalConfig::reprobe_after`].
    pub const REPROBE_AFTER: Duration = Duration::from_secs(60);

    /// A driver's configuration with the default re-probe time and network.
    pub fn new(data_dir: PathBuf, nexus_bin: PathBuf, redis_url: String, sandbox: SandboxChoice) -> LocalConfig {
        LocalConfig {
            data_dir,
            nexus_bin,
            redis_url,
            sandbox,
            reprobe_after: LocalConfig::REPROBE_AFTER,
            network: NetworkConfig::default(),
            limits: Limits::default(),
            warm_sandboxes: 0,
        }
    }
}

/// Runs panel instances on this machine; see the module documentation.
pub struct LocalDriver {
    config: LocalConfig,
    metrics: LocalMetrics,
    /// The isolation decided, and when.
    sandbox: Arc<tokio::sync::Mutex<Option<Decision>>>,
    /// Set once the data directories have their modes.
    layout: OnceCell<()>,
    /// The instances' addresses; its rules are installed once, before the
    /// first instance with a network starts.
    network: Arc<network::Network>,
    rules: OnceCell<()>,
    /// The host's cgroups, found at the first start (`None`: no limits).
    cgroups: OnceCell<Option<cgroups::Hierarchy>>,
    /// Set once the namespaces a crashed run left behind are swept.
    swept: OnceCell<usize>,
    instances: Arc<Mutex<HashMap<String, Arc<Instance>>>>,
    /// Serialises snapshot numbering per driver.
    snapshots: tokio::sync::Mutex<()>,
    /// What a volume may hold through the API.
    file_limits: VolumeLimits,
    /// The panels whose volumes this driver has opened (mounted, swept).
    opened: Mutex<HashSet<String>>,
    /// Per panel, held while its volume is opened or let go of.
    opening: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The panels whose files an API request is changing right now.
    editing: Arc<Mutex<HashSet<String>>>,
    /// Turns to unpack an upload, node-wide.
    unpacking: tokio::sync::Semaphore,
    /// The uids panel code runs as.
    uids: uids::Uids,
    /// The sidecars' own Redis users.
    sidecar_users: Arc<acl::SidecarUsers>,
    /// Set once the task that keeps sidecar users in Redis runs.
    keeping_users: std::sync::Once,
    /// gVisor sandboxes made ahead for App starts.
    warm: warm::Pool,
}

/// One running instance and everything needed to stop or restart it.
struct Instance {
    panel: String,
    mode: InstanceMode,
    dir: PathBuf,
    /// The directory the user process runs in.
    code: PathBuf,
    /// App: the snapshot `code` is copied from again on every (re)start.
    snapshot: Option<PathBuf>,
    /// App: the capped space `code` is in (see scratch.rs).
    scratch: Option<PathBuf>,
    /// Where a full file system is the panel's disk limit: an App's
    /// scratch space, a Studio volume's disk.
    disk: Option<PathBuf>,
    netns: Option<Netns>,
    /// The uid user code runs as (root only; none without root).
    uid: Option<u32>,
    command: Vec<String>,
    env: Vec<(String, String)>,
    gvisor: Option<(PathBuf, runsc::Bundle)>,
    /// Started in a warm sandbox: the slot's directory (its bundle, which
    /// runs the zygote until a restart rewrites it), gone with the instance.
    warm_dir: Option<PathBuf>,
    /// Namespaces: `bwrap`.
    bwrap: Option<PathBuf>,
    /// Its limits (root only).
    cgroup: Option<Arc<cgroups::Cgroup>>,
    /// Who its sidecar logs in to Redis as.
    sidecar_login: acl::SidecarLogin,
    events: mpsc::UnboundedSender<InstanceEvent>,
    user: tokio::sync::Mutex<Option<Supervised>>,
    helpers: Mutex<Vec<Supervised>>,
}

impl LocalDriver {
    /// A driver over `config`; it touches nothing until first used.
    pub fn new(config: LocalConfig) -> LocalDriver {
        LocalDriver {
            uids: uids::Uids::new(&config.redis_url),
            sidecar_users: Arc::new(acl::SidecarUsers::new(&config.redis_url)),
            keeping_users: std::sync::Once::new(),
            network: Arc::new(network::Network::new(config.network.clone())),
            rules: OnceCell::new(),
            cgroups: OnceCell::new(),
            config,
            metrics: LocalMetrics::new(),
            sandbox: Arc::default(),
            layout: OnceCell::new(),
            swept: OnceCell::new(),
            instances: Arc::default(),
            snapshots: tokio::sync::Mutex::new(()),
            file_limits: VolumeLimits::default(),
            opened: Mutex::default(),
            opening: Mutex::default(),
            editing: Arc::default(),
            unpacking: tokio::sync::Semaphore::new(2),
            warm: warm::Pool::default(),
        }
    }

    /// Holds volumes edited through the API to `limits`.
    pub fn with_file_limits(mut self, limits: VolumeLimits) -> LocalDriver {
        self.file_limits = limits;
        self
    }

    /// The driver's counters.
    pub fn metrics(&self) -> &LocalMetrics {
        &self.metrics
    }

    /// The isolation instances get, probing runsc the first time.
    pub async fn isolation(&self) -> Result<(Isolation, Option<String>), DriverError> {
        let sandbox = self.sandbox().await?;
        Ok((sandbox.isolation, sandbox.warning))
    }

    /// Once per driver (the first start does it; the node may call it
    /// earlier): deletes the network namespaces that a previous run of this
    /// driver left behind when it crashed, and kills whatever still runs in
    /// them. A namespace is ours when its instance has a directory under
    /// this driver's `data_dir/instances/`; other nodes' are left alone.
    /// Returns how many it swept.
    pub async fn sweep_stale(&self) -> usize {
        *self.swept.get_or_init(|| self.sweep()).await
    }

    async fn sweep(&self) -> usize {
        // A warm sandbox's parts are named for its slot, taken or not. The
        // sweep runs before the first start makes any, so this guards only
        // against a sweep that some day runs later.
        let running = |id: &str| {
            let instances = self.instances.lock().unwrap_or_else(|p| p.into_inner());
            instances.contains_key(id)
                || instances.values().any(|i| i.warm_dir.as_ref().is_some_and(|d| d.ends_with(id)))
                || self.warm.holds(id)
        };
        let swept = stale::sweep(&self.config.data_dir, running, &self.metrics).await;
        let instances = self.instances_dir();
        let ours_and_gone =
            |id: &str| files::check_id("instance", id).is_ok() && instances.join(id).is_dir() && !running(id);
        self.sidecar_users.sweep(&ours_and_gone).await;
        if crate::netns::supported() {
            if let Some(hierarchy) = self.hierarchy().await {
                for id in hierarchy.instances().into_iter().filter(|id| ours_and_gone(id)) {
                    hierarchy.existing(&id).remove().await;
                    tracing::warn!(instance = %id, "a cgroup left by a crash removed");
                }
            }
        }
        // A warm sandbox never served an instance: nothing of it is kept.
        let names =
            std::fs::read_dir(&instances).into_iter().flatten().filter_map(|e| e.ok()?.file_name().into_string().ok());
        for slot in names.filter(|name| warm::is_slot(name) && ours_and_gone(name)) {
            let _ = scratch::release(&self.config.data_dir.join("scratch").join(&slot));
            let _ = remove_tree(&instances.join(slot));
        }
        swept
    }

    /// The host's cgroups, found once.
    async fn hierarchy(&self) -> Option<&cgroups::Hierarchy> {
        let detect = || async { blocking(|| Ok(cgroups::Hierarchy::detect())).await.ok().flatten() };
        self.cgroups.get_or_init(detect).await.as_ref()
    }

    /// The isolation for the next instance: decided at first use, and again
    /// after [`LocalConfig::reprobe_after`] when gVisor was wanted and did
    /// not work. A second probe runs beside the starts, which go on with
    /// what was decided until it is done (instances already running keep
    /// theirs).
    async fn sandbox(&self) -> Result<Sandbox, DriverError> {
        self.layout().await?;
        let probe = self.instances_dir();
        let bwrap_probe = self.config.data_dir.join("scratch").join(".bwrap-probe");
        let mut decided = self.sandbox.lock().await;
        let Some((current, at)) = decided.as_mut() else {
            let resolved = resolve(self.config.sandbox, &probe, &bwrap_probe, &self.metrics).await;
            let serve = resolved.clone();
            *decided = Some((resolved, Instant::now()));
            return Ok(serve?);
        };
        let serve = current.clone();
        if current.as_ref().map_or(true, |s| s.reprobe) && at.elapsed() >= self.config.reprobe_after {
            // Not due again while this probe runs (it overwrites the time when done).
            *at = Instant::now() + PROBE_BUDGET;
            let (slot, choice, metrics) = (self.sandbox.clone(), self.config.sandbox, self.metrics.clone());
            let before = serve.as_ref().ok().map(|s| s.isolation);
            tokio::spawn(async move {
                let resolved = resolve(choice, &probe, &bwrap_probe, &metrics).await;
                if let Ok(now) = &resolved {
                    if Some(now.isolation) != before {
                        tracing::info!(?before, now = ?now.isolation, "isolation re-probed");
                    }
                }
                *slot.lock().await = Some((resolved, Instant::now()));
            });
        }
        Ok(serve?)
    }

    fn instances_dir(&self) -> PathBuf {
        self.config.data_dir.join("instances")
    }

    fn instance(&self, id: &str) -> Result<Arc<Instance>, DriverError> {
        let instances = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        instances.get(id).cloned().ok_or_else(|| DriverError::NoInstance(id.to_owned()))
    }

    /// The instance's namespace with its link: the node's rules first, once.
    async fn instance_network(&self, id: &str) -> Result<(Netns, network::Link), DriverError> {
        self.install_rules().await?;
        network::new_namespace(self.network.clone(), id).await
    }

    /// The node's network rules, installed once.
    async fn install_rules(&self) -> Result<(), DriverError> {
        let network = self.network.clone();
        let install = || blocking(move || network.install().map_err(network::network_error));
        self.rules.get_or_try_init(install).await.map(|_| ())
    }

    /// From the first start on, every few seconds: the running sidecars'
    /// Redis users set again, so that a restarted Redis (which keeps no ACL
    /// users) lets them back in. Ends with the driver.
    fn keep_sidecar_users(&self) {
        self.keeping_users.call_once(|| {
            let (instances, users) = (Arc::downgrade(&self.instances), Arc::downgrade(&self.sidecar_users));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SIDECAR_USERS_EVERY).await;
                    let (Some(instances), Some(users)) = (instances.upgrade(), users.upgrade()) else { return };
                    let logins: Vec<acl::SidecarLogin> = instances
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .values()
                        .map(|i| i.sidecar_login.clone())
                        .collect();
                    for login in logins {
                        if let Err(error) = users.set(&login).await {
                            tracing::debug!(instance = %login.instance, %error, "a sidecar's redis user not set again yet");
                            break;
                        }
                    }
                }
            });
        });
    }

    /// The instance's cgroup with the configured limits; `None` (warned,
    /// counted) when the host has no usable cgroups or making it failed.
    async fn instance_cgroup(&self, id: &str) -> Option<Arc<cgroups::Cgroup>> {
        cgroups::new_cgroup(self.hierarchy().await, id, self.config.limits, &self.metrics).await
    }

    /// Undoes [`Self::instance_network`] and an App's scratch space when a
    /// start fails before its instance exists.
    async fn undo_start(&self, id: &str, netns: Option<&Netns>, scratch_dir: Option<&PathBuf>) {
        if let Some(netns) = netns {
            network::drop_namespace(id, netns).await;
        }
        if let Some(dir) = scratch_dir {
            let _ = scratch::release(dir);
        }
    }

    async fn restart_instance(&self, id: &str) -> Result<(), DriverError> {
        let instance = self.instance(id)?;
        let mut user = instance.user.lock().await;
        if let Some(running) = user.take() {
            running.stop(RESTART_GRACE).await;
        }
        if let Some((runsc, bundle)) = &instance.gvisor {
            bundle.forget_container(runsc).await;
            // The zygote's bundle becomes the panel's own (the cold start's).
            if let Some(dir) = &instance.warm_dir {
                let process = runsc::Process {
                    args: &instance.command,
                    env: &instance.env,
                    uid: instance.uid.unwrap_or(0),
                    caps: &[],
                };
                runsc::Bundle::write(dir, &bundle.container, &instance.code, &process)?;
            }
        }
        // An App starts from its snapshot again: nothing written survives.
        if let Some(snapshot) = &instance.snapshot {
            fresh_copy(snapshot, &instance.code, instance.uid).await?;
        }
        *user = Some(spawn_user(id, &instance, &self.metrics)?);
        tracing::info!(instance = id, panel = %instance.panel, "user process restarted");
        Ok(())
    }

    async fn stop_instance(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        let instance = self.instances.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        let instance = instance.ok_or_else(|| DriverError::NoInstance(id.to_owned()))?;
        self.tear_down(id, &instance, grace).await;
        tracing::info!(instance = id, panel = %instance.panel, "instance stopped");
        Ok(())
    }

    /// Ends every process of the instance and frees what it held; keeps
    /// the logs. Never fails: whatever cannot be freed is logged.
    async fn tear_down(&self, id: &str, instance: &Instance, grace: Duration) {
        if let Some(user) = instance.user.lock().await.take() {
            user.stop(grace).await;
        }
        let helpers = std::mem::take(&mut *instance.helpers.lock().unwrap_or_else(|p| p.into_inner()));
        futures::future::join_all(helpers.into_iter().map(|h| h.stop(grace))).await;
        self.sidecar_users.delete(&acl::user_name(id)).await;
        if let Some(netns) = &instance.netns {
            // What escaped the process groups (setsid) is still in the namespace.
            procs::kill_namespace_members(&netns.path()).await;
            if let Err(error) = netns.delete() {
                tracing::warn!(instance = id, %error, "could not delete the network namespace");
            }
        }
        if let Some((runsc, bundle)) = &instance.gvisor {
            bundle.forget_container(runsc).await;
            let _ = remove_tree(&bundle.dir);
            let _ = remove_tree(&bundle.state);
        }
        if let Some(dir) = &instance.warm_dir {
            let _ = remove_tree(dir);
        }
        if let Some(cgroup) = &instance.cgroup {
            cgroup.remove().await;
        }
        if let Some(dir) = &instance.scratch {
            if let Err(error) = scratch::release(dir) {
                tracing::warn!(instance = id, %error, "could not delete the App's scratch space");
            }
        }
    }

    async fn read_logs(&self, id: &str, lines: usize) -> Result<Vec<String>, DriverError> {
        check_id("instance", id)?;
        let path = self.config.data_dir.join("instances").join(id).join("panel.log");
        if !path.exists() {
            return Err(DriverError::NoInstance(id.to_owned()));
        }
        blocking(move || Ok(logs::tail(&path, lines)?)).await
    }
}

impl RuntimeDriver for LocalDriver {
    fn name(&self) -> &'static str {
        "local"
    }

    fn volume(&self, panel: &str, source: &str) -> BoxFuture<'_, Result<Volume, DriverError>> {
        let (panel, source) = (panel.to_owned(), source.to_owned());
        async move { self.create_volume(&panel, &source).await }.boxed()
    }

    fn snapshot(&self, panel: &str, source: &str) -> BoxFuture<'_, Result<Snapshot, DriverError>> {
        let (panel, source) = (panel.to_owned(), source.to_owned());
        async move { self.create_snapshot(&panel, &source).await }.boxed()
    }

    fn start(&self, spec: InstanceSpec) -> BoxFuture<'_, Result<Started, DriverError>> {
        self.start_instance(spec).boxed()
    }

    fn restart(&self, instance: &str) -> BoxFuture<'_, Result<(), DriverError>> {
        let instance = instance.to_owned();
        async move { self.restart_instance(&instance).await }.boxed()
    }

    fn stop(&self, instance: &str, grace: Duration) -> BoxFuture<'_, Result<(), DriverError>> {
        let instance = instance.to_owned();
        async move { self.stop_instance(&instance, grace).await }.boxed()
    }

    fn logs(&self, instance: &str, lines: usize) -> BoxFuture<'_, Result<Vec<String>, DriverError>> {
        let instance = instance.to_owned();
        async move { self.read_logs(&instance, lines).await }.boxed()
    }

    fn forget(&self, panel: &str) -> BoxFuture<'_, Result<(), DriverError>> {
        let panel = panel.to_owned();
        async move { self.forget_panel(&panel).await }.boxed()
    }

    fn release(&self) -> BoxFuture<'_, ()> {
        async move {
            self.warm.drain(&self.metrics).await;
            self.release_volumes().await
        }
        .boxed()
    }

    fn file_limits(&self) -> VolumeLimits {
        self.file_limits
    }

    fn list_files(&self, panel: &str, source: &str) -> BoxFuture<'_, Result<FileList, DriverError>> {
        let (panel, source) = (panel.to_owned(), source.to_owned());
        async move { self.list_volume(&panel, &source).await }.boxed()
    }

    fn read_file(&self, panel: &str, source: &str, path: FilePath) -> BoxFuture<'_, Result<Vec<u8>, DriverError>> {
        let (panel, source) = (panel.to_owned(), source.to_owned());
        async move { self.read_volume_file(&panel, &source, path).await }.boxed()
    }

    fn write_file(
        &self,
        panel: &str,
        source: &str,
        path: FilePath,
        bytes: bytes::Bytes,
    ) -> BoxFuture<'_, Result<bool, DriverError>> {
        let (panel, source) = (panel.to_owned(), source.to_owned());
        async move { self.write_volume_file(&panel, &source, path, bytes).await }.boxed()
    }

    fn delete_file(&self, panel: &str, source: &str, path: FilePath) -> BoxFuture<'_, Result<(), DriverError>> {
        let (panel, source) = (panel.to_owned(), source.to_owned());
        async move { self.delete_volume_file(&panel, &source, path).await }.boxed()
    }

    fn replace_files(
        &self,
        panel: &str,
        source: &str,
        archive: bytes::Bytes,
    ) -> BoxFuture<'_, Result<FileList, DriverError>> {
        let (panel, source) = (panel.to_owned(), source.to_owned());
        async move { self.replace_volume(&panel, &source, archive).await }.boxed()
    }
}
