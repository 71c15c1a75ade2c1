//! An instance's start in the `local` driver: its code in place, its
//! namespace, the helpers' listeners bound, then the sidecar, the watchdog
//! and the user process; in a warm sandbox ([`super::warm`]) when an App
//! runs under gVisor and one is ready. Stopping and restarting are the
//! driver's (local.rs); this owns only the way in.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::super::driver::{Code, DriverError, InstanceEvent, InstanceSpec, Started};
use super::files::{
    blocking, check_id, chown_tree, copy_into_mounted, fresh_copy, netns_name, open_log, path_string, read_command,
    remove_tree,
};
use super::isolation::Sandbox;
use super::metrics::{Helper, LocalMetrics, StartPhase};
use super::procs::{self, OnExit, Supervised};
use super::{
    acl, bubblewrap, logs, runsc, scratch, warm, Instance, LocalDriver, DEFAULT_WATCHDOG_TIMEOUT, PANEL_PORT,
    SIDECAR_PORT, WATCHDOG_PORT,
};
use crate::infra::free_port;
use crate::instance::{Endpoint, InstanceMode, Isolation, SIDECAR_TOKEN_ENV};
use crate::netns::{Netns, NetnsThread};
use crate::platform::files::private_dir;
use crate::roles::panel_manager::metrics::{isolation_label, mode_label};

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

impl LocalDriver {
    pub(super) async fn start_instance(&self, spec: InstanceSpec) -> Result<Started, DriverError> {
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
        // An App under gVisor or as a process starts in a warm sandbox
        // when one of its kind is ready.
        let mut warm = match (&spec.code, sandbox.isolation, uid) {
            (Code::App(_), Isolation::Gvisor | Isolation::Process, Some(_)) => {
                let gvisor = sandbox.isolation == Isolation::Gvisor;
                let slot = self.warm.take(&self.metrics, gvisor);
                self.keep_warm(&sandbox, warm::REFILL_AFTER).await;
                slot
            }
            _ => None,
        };
        clock.lap(StartPhase::Prepare);

        let (code, snapshot, scratch_dir) = match (&spec.code, &warm) {
            (Code::Studio(volume), _) => (volume.location.path().to_owned(), None, None),
            (Code::App(snapshot), Some(slot)) => {
                (slot.parts.code.clone(), Some(snapshot.location.path().to_owned()), Some(slot.parts.scratch.clone()))
            }
            (Code::App(snapshot), None) => {
                let dir = self.config.data_dir.join("scratch").join(&spec.instance);
                let (at, cap) = (dir.clone(), root.then_some(self.config.limits.disk));
                let code = blocking(move || Ok(scratch::prepare(&at, cap)?)).await?;
                (code, Some(snapshot.location.path().to_owned()), Some(dir))
            }
        };
        let copied = match (&snapshot, &warm, uid) {
            (Some(snapshot), Some(_), Some(uid)) => copy_into_mounted(snapshot, &code, uid).await,
            (Some(snapshot), _, _) => fresh_copy(snapshot, &code, uid).await,
            (None, _, Some(uid)) => {
                let code = code.clone();
                blocking(move || chown_tree(&code, uid)).await
            }
            (None, _, None) => Ok(()),
        };
        let command = copied.and_then(|()| read_command(&code));
        let command = match command {
            Ok(command) => command,
            Err(error) => {
                self.abandon(&spec.instance, warm, None, scratch_dir.as_ref()).await;
                return Err(error);
            }
        };
        clock.lap(StartPhase::Copy);

        let studio = spec.mode == InstanceMode::Studio;
        // Last before the processes: from here on a failure tears it down.
        let (netns, link) = match (&warm, root) {
            (Some(slot), _) => (Some(slot.parts.netns.clone()), Some(slot.parts.link)),
            (None, true) => match self.instance_network(&spec.instance).await {
                Ok((netns, link)) => (Some(netns), Some(link)),
                Err(error) => {
                    self.undo_start(&spec.instance, None, scratch_dir.as_ref()).await;
                    return Err(error);
                }
            },
            (None, false) => (None, None),
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
                self.abandon(&spec.instance, warm, netns.as_ref(), scratch_dir.as_ref()).await;
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
        let mut env = base_env();
        env.extend([
            ("HOME".to_owned(), if sandboxed { runsc::CODE_MOUNT.into() } else { path_string(&code) }),
            ("PORT".to_owned(), panel_inside.to_string()),
            ("NEXUS_PROXY_URL".to_owned(), format!("http://{proxy_addr}/proxy")),
            (SIDECAR_TOKEN_ENV.to_owned(), sidecar_token.clone()),
        ]);
        // A warm sandbox's bundle stays the zygote's until a restart.
        let gvisor = match (&sandbox.tool, sandbox.isolation, &warm) {
            (Some(_), Isolation::Gvisor, Some(slot)) => slot.parts.gvisor.clone(),
            (Some(runsc), Isolation::Gvisor, None) => {
                let process = runsc::Process { args: &command, env: &env, uid: uid.unwrap_or(0), caps: &[] };
                match runsc::Bundle::write(&dir, &netns_name(&spec.instance), &code, &process) {
                    Ok(bundle) => Some((runsc.clone(), bundle)),
                    Err(error) => {
                        self.abandon(&spec.instance, warm, netns.as_ref(), scratch_dir.as_ref()).await;
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
        let cgroup = match (&warm, root) {
            (Some(slot), _) => slot.parts.cgroup.clone(),
            (None, true) => self.instance_cgroup(&spec.instance).await,
            (None, false) => None,
        };
        // Only as root is either a file system of its own.
        let disk = match studio {
            true => root.then(|| code.clone()),
            false => scratch_dir.clone().filter(|_| root),
        };
        // From here the slot's parts are the instance's: its log joins the
        // instance's, and its zygote waits to run the panel.
        let zygote = match warm.take() {
            Some(slot) => match slot.hand_log(&dir.join("panel.log")) {
                Ok(()) => Some((slot.zygote, slot.parts.dir)),
                Err(error) => {
                    slot.discard().await;
                    return Err(error.into());
                }
            },
            None => None,
        };
        let (zygote, warm_dir) = zygote.unzip();
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
            warm_dir,
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
            self.start_processes(&spec, &instance, wiring, zygote).await?;
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

    /// Undoes a start that failed before its instance existed: a warm
    /// slot goes whole; else the namespace and the App's scratch space.
    async fn abandon(&self, id: &str, warm: Option<warm::Slot>, netns: Option<&Netns>, scratch: Option<&PathBuf>) {
        match warm {
            Some(slot) => slot.discard().await,
            None => self.undo_start(id, netns, scratch).await,
        }
    }

    /// Starts the sidecar, the watchdog (Studio: when given its token) and
    /// the user process.
    async fn start_processes(
        &self,
        spec: &InstanceSpec,
        instance: &Arc<Instance>,
        wiring: Wiring<'_>,
        zygote: Option<warm::Zygote>,
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
        let user = match zygote {
            Some(zygote) => {
                let cwd = match instance.gvisor {
                    Some(_) => runsc::CODE_MOUNT.to_owned(),
                    None => path_string(&instance.code),
                };
                let uid = instance.uid.unwrap_or(0);
                let job = warm::Job { uid, cwd: &cwd, env: &instance.env, argv: &instance.command };
                let child = zygote.run(&job).await?;
                let on_exit = user_on_exit(instance, &self.metrics);
                Supervised::adopt("panel", &spec.instance, child, on_exit, instance.gvisor.is_some())
            }
            None => spawn_user(&spec.instance, instance, &self.metrics)?,
        };
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
}

impl LocalDriver {
    /// Keeps [`LocalConfig::warm_sandboxes`] sandboxes ready, from `after`
    /// on, when instances run under gVisor or as plain processes in their
    /// namespaces here (bubblewrap fixes the uid as it starts: no zygote).
    async fn keep_warm(&self, sandbox: &Sandbox, after: Duration) {
        let size = self.config.warm_sandboxes;
        let runsc = match sandbox.isolation {
            Isolation::Gvisor => sandbox.tool.clone(),
            Isolation::Process => None,
            Isolation::Namespaces | Isolation::None => return,
        };
        if size == 0 || (sandbox.isolation == Isolation::Gvisor && runsc.is_none()) {
            return;
        }
        let home = runsc.as_ref().map(|_| ("HOME".to_owned(), runsc::CODE_MOUNT.to_owned()));
        if let Err(error) = self.install_rules().await {
            tracing::warn!(%error, "no warm sandboxes: the instance network's rules could not be installed");
            return;
        }
        let maker = warm::Maker {
            runsc,
            data_dir: self.config.data_dir.clone(),
            network: self.network.clone(),
            hierarchy: self.hierarchy().await.cloned(),
            limits: self.config.limits,
            metrics: self.metrics.clone(),
            env: base_env().into_iter().chain(home).collect(),
        };
        self.warm.fill(maker, size, after);
    }

    /// Decides the isolation now and, under gVisor, starts making the warm
    /// sandboxes, so that the first App start after the node's finds one.
    pub async fn warm_up(&self) {
        match self.sandbox().await {
            Ok(sandbox) => {
                self.sweep_stale().await;
                self.keep_warm(&sandbox, Duration::ZERO).await;
            }
            Err(error) => {
                tracing::warn!(%error, "no warm sandboxes: no sandbox works here (yet); each start tries again")
            }
        }
    }
}

/// Starts the user process of `instance` (under runsc or plain).
pub(super) fn spawn_user(id: &str, instance: &Instance, metrics: &LocalMetrics) -> Result<Supervised, DriverError> {
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
    Ok(Supervised::spawn("panel", id, command, user_on_exit(instance, metrics), instance.gvisor.is_some())?)
}

/// What the driver does when the user process ends: reports it.
fn user_on_exit(instance: &Instance, metrics: &LocalMetrics) -> OnExit {
    OnExit::Report {
        events: instance.events.clone(),
        exits: metrics.panel_exits.with_label_values(&[mode_label(instance.mode)]),
        cgroup: instance.cgroup.clone(),
        disk: instance.disk.clone(),
    }
}

/// What every panel's environment holds, whatever its instance.
pub(super) fn base_env() -> Vec<(String, String)> {
    [("PATH", "/usr/local/bin:/usr/bin:/bin"), ("LANG", "C.UTF-8"), ("PYTHONUNBUFFERED", "1")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
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
pub(super) fn new_secret() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 48)
}
