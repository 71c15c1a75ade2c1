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
mod storage;
mod swap;
mod tree;
mod uids;
mod workspace;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, OnceCell};

use super::driver::{
    Code, DriverError, InstanceEvent, InstanceSpec, RuntimeDriver, SandboxError, Snapshot, Started, Volume,
};
use super::metrics::{isolation_label, mode_label};
use super::volume_files::{FileList, FilePath, VolumeLimits};
use crate::infra::free_port;
use crate::instance::{Endpoint, InstanceMode, Isolation, SIDECAR_TOKEN_ENV};
use crate::netns::{Netns, NetnsThread};
use crate::platform::files::private_dir;
use files::{blocking, check_id, chown_tree, fresh_copy, open_log, path_string, read_command, remove_tree};
use isolation::{resolve, Sandbox};
use metrics::{Helper, StartPhase};
use procs::{OnExit, Supervised};

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
}

/// Where an instance's processes listen and meet, decided before they start.
struct Wiring<'a> {
    /// Where the panel listens, as the sidecar reaches it.
    panel_url: &'a str,
    /// The sidecar's listener and the watchdog's, as the panel sees them,
    /// bound by the driver, to hand over.
    proxy_addr: &'a str,
    sidecar_listener: Arc<std::net::TcpListener>,
    watchdog_inside: &'a str,
    watchdog_listener: Option<Arc<std::net::TcpListener>>,
    /// Studio only: the watchdog runs only when it has its secret.
    watchdog_token: Option<&'a str>,
    /// The secret the panel expects from its sidecar.
    sidecar_token: &'a str,
    /// How the sidecar logs in to Redis: as its own user.
    sidecar_redis_url: &'a str,
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
        let running = |id: &str| self.instances.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id);
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

    async fn start_instance(&self, spec: InstanceSpec) -> Result<Started, DriverError> {
        check_id("instance", &spec.instance)?;
        check_id("panel", &spec.panel)?;
        if self.instance(&spec.instance).is_ok() {
            return Err(DriverError::AlreadyRunning(spec.instance.clone()));
        }
        let mut clock = self.metrics.start_clock();
        let sandbox = self.sandbox().await?;
        self.sweep_stale().await;
        let root = sandbox.isolation != Isolation::None;
        let uid = match root {
            true => Some(self.uids.of(&spec.panel).await?),
            false => None,
        };
        // Logs and runsc's files: root's only.
        let dir = self.instances_dir().join(&spec.instance);
        remove_tree(&dir)?;
        private_dir(&dir)?;
        clock.lap(StartPhase::Prepare);

        let (code, snapshot, scratch_dir) = match &spec.code {
            Code::Studio(volume) => (volume.location.path().to_owned(), None, None),
            Code::App(snapshot) => {
                let dir = self.config.data_dir.join("scratch").join(&spec.instance);
                let (at, cap) = (dir.clone(), root.then_some(self.config.limits.disk));
                let code = blocking(move || Ok(scratch::prepare(&at, cap)?)).await?;
                (code, Some(snapshot.location.path().to_owned()), Some(dir))
            }
        };
        // An App's copy is this start's; a Studio volume stays.
        let discard = || {
            if let Some(dir) = &scratch_dir {
                let _ = scratch::release(dir);
            }
        };
        match &snapshot {
            Some(snapshot) => fresh_copy(snapshot, &code, uid).await.inspect_err(|_| discard())?,
            None => {
                if let Some(uid) = uid {
                    let code = code.clone();
                    blocking(move || chown_tree(&code, uid)).await?;
                }
            }
        }
        let command = read_command(&code).inspect_err(|_| discard())?;
        clock.lap(StartPhase::Copy);

        let studio = spec.mode == InstanceMode::Studio;
        // Last before the processes: from here on a failure tears it down.
        let (netns, link) = match root {
            true => {
                let (netns, link) = self.instance_network(&spec.instance).await.inspect_err(|_| discard())?;
                (Some(netns), Some(link))
            }
            false => (None, None),
        };
        clock.lap(StartPhase::Network);
        // The helpers' endpoints, bound here before any panel code runs and
        // handed over to them, so no panel can take their ports, not even
        // while a helper restarts; and the panel need not wait for them.
        let helper_ports = match link {
            Some(_) => (SIDECAR_PORT, WATCHDOG_PORT),
            None => (0, 0),
        };
        let bound = helper_listeners(netns.as_ref().map(Netns::path), helper_ports, studio).await;
        let (sidecar_listener, proxy_addr, watchdog_listener, watchdog_inside) = match bound {
            Ok(bound) => bound,
            Err(error) => {
                self.undo_start(&spec.instance, netns.as_ref(), scratch_dir.as_ref()).await;
                return Err(error);
            }
        };
        // Unisolated, without root: the panel shares the host's loopback,
        // on a port picked here (it binds it itself).
        let (panel_inside, panel_addr, watchdog_addr) = match link {
            Some(link) => (PANEL_PORT, format!("{}:{PANEL_PORT}", link.addr), format!("{}:{WATCHDOG_PORT}", link.addr)),
            None => {
                let panel = free_port()?;
                (panel, format!("127.0.0.1:{panel}"), watchdog_inside.clone())
            }
        };
        // What the panel checks its sidecar's requests against.
        let sidecar_token = new_secret();
        let sandboxed = matches!(sandbox.isolation, Isolation::Gvisor | Isolation::Namespaces);
        let env = vec![
            ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
            ("HOME".to_owned(), if sandboxed { runsc::CODE_MOUNT.into() } else { path_string(&code) }),
            ("LANG".to_owned(), "C.UTF-8".to_owned()),
            ("PYTHONUNBUFFERED".to_owned(), "1".to_owned()),
            ("PORT".to_owned(), panel_inside.to_string()),
            ("NEXUS_PROXY_URL".to_owned(), format!("http://{proxy_addr}/proxy")),
            (SIDECAR_TOKEN_ENV.to_owned(), sidecar_token.clone()),
        ];
        let gvisor = match (&sandbox.tool, sandbox.isolation) {
            (Some(runsc), Isolation::Gvisor) => {
                let process = runsc::Process { args: &command, env: &env, uid: uid.unwrap_or(0) };
                let bundle = runsc::Bundle::write(&dir, &netns_name(&spec.instance), &code, &process);
                match bundle {
                    Ok(bundle) => Some((runsc.clone(), bundle)),
                    Err(error) => {
                        self.undo_start(&spec.instance, netns.as_ref(), scratch_dir.as_ref()).await;
                        return Err(error.into());
                    }
                }
            }
            _ => None,
        };
        let bwrap = match sandbox.isolation {
            Isolation::Namespaces => sandbox.tool.clone(),
            _ => None,
        };
        // runsc leaves cgroups alone: the bundle does not name this one.
        let cgroup = match root {
            true => self.instance_cgroup(&spec.instance).await,
            false => None,
        };
        // Only as root is either a file system of its own.
        let disk = match studio {
            true => root.then(|| code.clone()),
            false => scratch_dir.clone().filter(|_| root),
        };
        let (events, events_rx) = mpsc::unbounded_channel();
        let instance = Arc::new(Instance {
            panel: spec.panel.clone(),
            mode: spec.mode,
            dir: dir.clone(),
            code,
            snapshot,
            scratch: scratch_dir.clone(),
            disk,
            netns,
            uid,
            command,
            env,
            gvisor,
            bwrap,
            cgroup,
            sidecar_login: acl::SidecarLogin::new(&spec.instance, &spec.panel, &spec.owner),
            events,
            user: tokio::sync::Mutex::new(None),
            helpers: Mutex::new(Vec::new()),
        });

        // The heartbeat secret: only the watchdog (environment) and the
        // gateway (the endpoint) know it, never the panel, never a log.
        let watchdog_token = studio.then(new_secret);
        let panel_url = format!("http://{panel_addr}");
        clock.lap(StartPhase::Sandbox);
        let started = async {
            let login = self.sidecar_users.set(&instance.sidecar_login).await?;
            self.keep_sidecar_users();
            clock.lap(StartPhase::Credentials);
            let wiring = Wiring {
                panel_url: &panel_url,
                proxy_addr: &proxy_addr,
                sidecar_listener,
                watchdog_inside: &watchdog_inside,
                watchdog_listener,
                watchdog_token: watchdog_token.as_deref(),
                sidecar_token: &sidecar_token,
                sidecar_redis_url: &login,
            };
            self.start_processes(&spec, &instance, wiring).await?;
            clock.lap(StartPhase::Spawn);
            Ok(())
        };
        if let Err(error) = started.await {
            self.tear_down(&spec.instance, &instance, Duration::ZERO).await;
            return Err(error);
        }
        logs::keep_capped(dir.join("panel.log"), Arc::downgrade(&instance), self.metrics.log_rotations.clone());
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).insert(spec.instance.clone(), instance);
        self.metrics.started.with_label_values(&[isolation_label(sandbox.isolation)]).inc();
        tracing::info!(
            instance = %spec.instance, panel = %spec.panel, mode = ?spec.mode, isolation = ?sandbox.isolation,
            %panel_addr, "nexus_local_instances_started_total"
        );
        if let Some(warning) = &sandbox.warning {
            tracing::warn!(instance = %spec.instance, panel = %spec.panel, "{warning}");
        }
        Ok(Started {
            endpoint: Endpoint {
                instance: spec.instance.clone(),
                addr: panel_addr,
                watchdog: studio.then_some(watchdog_addr),
                watchdog_token,
            },
            sidecar_token: Some(sidecar_token),
            isolation: sandbox.isolation,
            warning: sandbox.warning.clone(),
            events: events_rx,
        })
    }

    /// Starts the sidecar, the watchdog (Studio: when given its token) and
    /// the user process.
    async fn start_processes(
        &self,
        spec: &InstanceSpec,
        instance: &Arc<Instance>,
        wiring: Wiring<'_>,
    ) -> Result<(), DriverError> {
        let Wiring {
            panel_url,
            proxy_addr,
            sidecar_listener,
            watchdog_inside,
            watchdog_listener,
            watchdog_token,
            sidecar_token,
            sidecar_redis_url,
        } = wiring;
        let netns_path = instance.netns.as_ref().map(Netns::path);
        // Secrets go by environment, never argv: a process-mode panel can
        // read every process's /proc/<pid>/cmdline, not a root process's environ.
        let redis = ("REDIS_URL".to_owned(), self.config.redis_url.clone());
        let mut sidecar: Vec<String> = vec!["sidecar".into(), "--panel".into(), spec.panel.clone()];
        sidecar.extend(["--listen".into(), proxy_addr.into()]);
        sidecar.extend(["--panel-url".into(), panel_url.into()]);
        if let Some(path) = &netns_path {
            sidecar.extend(["--netns".into(), path_string(path)]);
        }
        let token = (SIDECAR_TOKEN_ENV.to_owned(), sidecar_token.to_owned());
        let sidecar_redis = ("REDIS_URL".to_owned(), sidecar_redis_url.to_owned());
        let sidecar_env = vec![sidecar_redis, token];
        let mut helpers = vec![sidecar_listener.local_addr()?];
        self.spawn_helper(Helper::Sidecar, &spec.instance, instance, sidecar, sidecar_env, sidecar_listener)?;
        if let (Some(token), Some(listener)) = (watchdog_token, watchdog_listener) {
            helpers.push(listener.local_addr()?);
            let timeout = spec.watchdog_timeout.unwrap_or(DEFAULT_WATCHDOG_TIMEOUT).as_secs().max(1);
            let mut watchdog: Vec<String> = vec!["watchdog".into(), "--instance".into(), spec.instance.clone()];
            watchdog.extend(["--panel".into(), spec.panel.clone(), "--listen".into(), watchdog_inside.into()]);
            watchdog.extend(["--timeout-secs".into(), timeout.to_string()]);
            if let Some(path) = &netns_path {
                watchdog.extend(["--netns".into(), path_string(path)]);
            }
            let env = vec![redis, ("NEXUS_WATCHDOG_TOKEN".to_owned(), token.to_owned())];
            self.spawn_helper(Helper::Watchdog, &spec.instance, instance, watchdog, env, listener)?;
        }
        // The helpers' ports were bound before: the panel starts beside them.
        let user = spawn_user(&spec.instance, instance, &self.metrics)?;
        *instance.user.lock().await = Some(user);
        // Their port answers before they run, so whether they came up is
        // checked apart from the start (which it would only slow down): a
        // helper that never serves ends the instance as a crash would, its
        // reason in the panel's log.
        let (id, events, log) = (spec.instance.clone(), instance.events.clone(), instance.dir.join("panel.log"));
        tokio::spawn(async move {
            if let Err(error) = procs::helpers_serving(netns_path, helpers).await {
                tracing::error!(instance = %id, %error, "a helper of the instance never served; it ends");
                let said = format!("nexus: {error}; the instance ends\n");
                let _ =
                    std::fs::OpenOptions::new().append(true).open(&log).and_then(|mut f| f.write_all(said.as_bytes()));
                let _ = events.send(InstanceEvent::Exited { code: None, limit: None, restarted: false });
            }
        });
        Ok(())
    }

    fn spawn_helper(
        &self,
        helper: Helper,
        id: &str,
        instance: &Instance,
        mut args: Vec<String>,
        env: Vec<(String, String)>,
        listener: Arc<std::net::TcpListener>,
    ) -> Result<(), DriverError> {
        let name = helper.name();
        let log = instance.dir.join(format!("{name}.log"));
        let program = self.config.nexus_bin.clone();
        args.extend(["--listen-fd".into(), procs::HANDED_FD.to_string()]);
        // Every (re)start gets the same listener, which this closure keeps open.
        let respawn = move || {
            let log = open_log(&log)?;
            let mut command = tokio::process::Command::new(&program);
            command.args(&args).envs(env.iter().map(|(k, v)| (k, v)));
            command.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
            procs::prepare(&mut command, None, None, Vec::new())?;
            procs::hand_over(&mut command, listener.as_raw_fd());
            Ok(command)
        };
        let first = respawn()?;
        let restarts = self.metrics.helper_restarts.with_label_values(&[name]);
        let on_exit = OnExit::Restart { respawn: Box::new(respawn), restarts };
        let helper = Supervised::spawn(name, id, first, on_exit, false)?;
        instance.helpers.lock().unwrap_or_else(|p| p.into_inner()).push(helper);
        Ok(())
    }

    /// The instance's namespace with its link: the node's rules first, once.
    async fn instance_network(&self, id: &str) -> Result<(Netns, network::Link), DriverError> {
        let network_error = |e| DriverError::Sandbox(SandboxError::Network(Arc::new(e)));
        let network = self.network.clone();
        self.rules.get_or_try_init(|| blocking(move || network.install().map_err(network_error))).await?;
        let netns = Netns::create(&netns_name(id)).map_err(|e| SandboxError::Netns(Arc::new(e)))?;
        let (network, inside) = (self.network.clone(), netns.clone());
        match blocking(move || network.attach(&inside).map_err(network_error)).await {
            Ok(link) => Ok((netns, link)),
            Err(error) => {
                self.undo_start(id, Some(&netns), None).await;
                Err(error)
            }
        }
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
        let Some(hierarchy) = self.hierarchy().await else {
            self.metrics.unlimited.inc();
            tracing::warn!(instance = id, "nexus_local_unlimited_instances_total: no usable cgroups; the instance runs without memory, CPU or process limits");
            return None;
        };
        let (hierarchy, id_owned, limits) = (hierarchy.clone(), id.to_owned(), self.config.limits);
        match blocking(move || Ok(hierarchy.create(&id_owned, limits)?)).await {
            Ok(cgroup) => Some(Arc::new(cgroup)),
            Err(error) => {
                self.metrics.unlimited.inc();
                tracing::warn!(instance = id, %error, "nexus_local_unlimited_instances_total: the instance's cgroup could not be made; it runs without limits");
                None
            }
        }
    }

    /// Undoes [`Self::instance_network`] and an App's scratch space when a
    /// start fails before its instance exists.
    async fn undo_start(&self, id: &str, netns: Option<&Netns>, scratch_dir: Option<&PathBuf>) {
        if let Some(netns) = netns {
            if let Err(error) = netns.delete() {
                tracing::warn!(instance = id, %error, "could not delete the network namespace");
            }
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
        self.release_volumes().boxed()
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

/// Starts the user process of `instance` (under runsc or plain).
fn spawn_user(id: &str, instance: &Instance, metrics: &LocalMetrics) -> Result<Supervised, DriverError> {
    let log = open_log(&instance.dir.join("panel.log"))?;
    let netns = instance.netns.as_ref().map(Netns::path);
    let mut command = match &instance.gvisor {
        // runsc itself needs root: the panel's uid is set in the bundle.
        Some((runsc, bundle)) => {
            let mut command = bundle.run_command(runsc);
            procs::prepare(&mut command, netns.as_deref(), None, join_cgroup(instance)?)?;
            command
        }
        None => {
            let mut command = match &instance.bwrap {
                Some(bwrap) => bubblewrap::command(bwrap, &instance.code, &instance.command),
                None => {
                    let mut command = tokio::process::Command::new(&instance.command[0]);
                    command.args(&instance.command[1..]).current_dir(&instance.code);
                    command
                }
            };
            command.env_clear().envs(instance.env.iter().map(|(k, v)| (k, v)));
            procs::prepare(&mut command, netns.as_deref(), instance.uid, join_cgroup(instance)?)?;
            command
        }
    };
    command.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let on_exit = OnExit::Report {
        events: instance.events.clone(),
        exits: metrics.panel_exits.with_label_values(&[mode_label(instance.mode)]),
        cgroup: instance.cgroup.clone(),
        disk: instance.disk.clone(),
    };
    Ok(Supervised::spawn("panel", id, command, on_exit, instance.gvisor.is_some())?)
}

/// The sidecar's listener and the watchdog's, with their addresses.
type HelperListeners = (Arc<std::net::TcpListener>, String, Option<Arc<std::net::TcpListener>>, String);

/// Binds the sidecar's listener and (Studio) the watchdog's on loopback
/// ports `(sidecar, watchdog)`, inside the namespace at `netns` when there
/// is one.
async fn helper_listeners(
    netns: Option<PathBuf>,
    (sidecar, watchdog): (u16, u16),
    studio: bool,
) -> Result<HelperListeners, DriverError> {
    blocking(move || {
        let inside = netns.as_deref().map(NetnsThread::enter).transpose().map_err(std::io::Error::other)?;
        let bind = |port: u16| NetnsThread::bind_in(inside.as_ref(), (std::net::Ipv4Addr::LOCALHOST, port).into());
        let sidecar = bind(sidecar)?;
        let sidecar_addr = sidecar.local_addr()?.to_string();
        let watchdog = studio.then(|| bind(watchdog)).transpose()?;
        let watchdog_addr = watchdog.as_ref().map(|w| w.local_addr()).transpose()?.map(|a| a.to_string());
        Ok((Arc::new(sidecar), sidecar_addr, watchdog.map(Arc::new), watchdog_addr.unwrap_or_default()))
    })
    .await
}

/// What the user process writes to, to join the instance's cgroup.
fn join_cgroup(instance: &Instance) -> std::io::Result<Vec<std::fs::File>> {
    Ok(instance.cgroup.as_ref().map(|c| c.procs_files()).transpose()?.unwrap_or_default())
}

/// A fresh instance secret: 48 alphanumerics (~285 bits).
fn new_secret() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 48)
}
