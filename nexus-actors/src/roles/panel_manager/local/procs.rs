//! The processes of a `local` instance: how they are spawned (own process
//! group, dying with us, optionally inside a network namespace as their own
//! uid), supervised (an exit is reported or, for our helpers, restarted
//! with backoff) and ended (SIGTERM, grace, SIGKILL to the whole group).
//!
//! It also hands a helper the listener the driver bound for it, and waits
//! until an instance's helpers serve on theirs (inside its namespace). It
//! knows nothing about panels, sandboxes or files beyond logs.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::super::driver::{DriverError, InstanceEvent, LimitHit};
use super::cgroups::Cgroup;
use super::files::blocking;
use crate::netns::NetnsThread;

/// How long the sidecar and the watchdog may take to serve.
const HELPERS_SERVE_WITHIN: Duration = Duration::from_secs(15);

/// Waits until each helper answers `GET /healthz` on its address (inside
/// the namespace at `netns` when there is one). Its port was bound before
/// it ran, so a connection alone says nothing.
pub(super) async fn helpers_serving(netns: Option<PathBuf>, addrs: Vec<SocketAddr>) -> Result<(), DriverError> {
    blocking(move || {
        let inside = netns.as_deref().map(NetnsThread::enter).transpose().map_err(io::Error::other)?;
        let deadline = Instant::now() + HELPERS_SERVE_WITHIN;
        for addr in addrs {
            loop {
                let error = match ask_healthz(inside.as_ref(), addr) {
                    Ok(true) => break,
                    Ok(false) => "it answered, not 200".to_owned(),
                    Err(error) => error.to_string(),
                };
                if Instant::now() >= deadline {
                    let why = format!("the helper on {addr} did not serve within {HELPERS_SERVE_WITHIN:?}: {error}");
                    return Err(DriverError::Io(io::Error::other(why)));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    })
    .await
}

/// Whether `GET /healthz` at `addr` answers 200.
fn ask_healthz(inside: Option<&NetnsThread>, addr: SocketAddr) -> io::Result<bool> {
    let connect = move || TcpStream::connect_timeout(&addr, Duration::from_millis(500));
    let mut stream = match inside {
        Some(inside) => inside.run(connect).map_err(io::Error::other)??,
        None => connect()?,
    };
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(format!("GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    Ok(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
}

/// How long a helper that died waits before its first restart; doubles up
/// to [`MAX_BACKOFF`] while it keeps dying.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a process killed with SIGKILL may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes a helper's command again for a restart.
pub(super) type Respawn = Box<dyn FnMut() -> io::Result<Command> + Send>;

/// What happens when the process ends on its own.
pub(super) enum OnExit {
    /// The user's process: report it once, never restart here.
    Report {
        events: mpsc::UnboundedSender<InstanceEvent>,
        exits: IntCounter,
        cgroup: Option<Arc<Cgroup>>,
        /// The space the panel writes to: full when it ended is a limit hit.
        disk: Option<PathBuf>,
    },
    /// Our helper (sidecar, watchdog): log, count and start it again.
    Restart { respawn: Respawn, restarts: IntCounter },
}

/// The descriptor a helper finds its handed-over listener on.
pub(super) const HANDED_FD: i32 = 3;

/// Gives the child `fd` as its descriptor [`HANDED_FD`], open across exec;
/// the caller's own stays as it was.
pub(super) fn hand_over(command: &mut Command, fd: RawFd) {
    // SAFETY: between fork and exec the closure only makes raw syscalls.
    unsafe {
        command.pre_exec(move || {
            let handed = match fd == HANDED_FD {
                // dup2 onto itself would keep close-on-exec.
                true => libc::fcntl(fd, libc::F_SETFD, 0),
                false => libc::dup2(fd, HANDED_FD),
            };
            match handed < 0 {
                true => Err(io::Error::last_os_error()),
                false => Ok(()),
            }
        });
    }
}

/// Prepares `command` to run in its own session and process group, without
/// a controlling terminal, killed when this
/// process dies; in the cgroup whose `cgroup.procs` files are `cgroup`
/// (opened by root); with `netns`, inside that network namespace; with
/// `uid`, as that uid and gid without supplementary groups or new
/// privileges.
pub(super) fn prepare(
    command: &mut Command,
    netns: Option<&Path>,
    uid: Option<u32>,
    cgroup: Vec<File>,
) -> io::Result<()> {
    let netns = netns.map(File::open).transpose()?;
    // Read before the fork: in the child, a different parent means ours died.
    // SAFETY: getpid has no preconditions and cannot fail.
    let parent = unsafe { libc::getpid() };
    command.kill_on_drop(true);
    // SAFETY: between fork and exec the closure only makes raw syscalls
    // (no allocation, no locks), which is what pre_exec requires. PDEATHSIG
    // fires when the spawning thread ends: spawns happen on runtime threads,
    // which live as long as the node.
    unsafe {
        command.pre_exec(move || {
            // A session of its own is a group of its own (killed as one) and
            // no controlling terminal: a panel must not reach the tty the
            // node was started from (TIOCSTI would type into it).
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" moves the writer: the child joins before it runs anything.
            for procs in &cgroup {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(netns) = &netns {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(uid) = uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                    || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // After setuid: the kernel clears PDEATHSIG on a credential change.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If we died before it was set, nothing will signal the child.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    Ok(())
}

/// A process under supervision; [`Supervised::stop`] ends it.
pub(super) struct Supervised {
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

impl Supervised {
    /// Spawns `command` now (its error is the caller's) and supervises it.
    /// `signal_leader`: SIGTERM goes to the leader only (runsc forwards it
    /// into the sandbox), else to the whole group.
    pub(super) fn spawn(
        name: &'static str,
        instance: &str,
        mut command: Command,
        on_exit: OnExit,
        signal_leader: bool,
    ) -> io::Result<Supervised> {
        Ok(Supervised::adopt(name, instance, command.spawn()?, on_exit, signal_leader))
    }

    /// Supervises `child`, spawned earlier (a warm sandbox), as [`Supervised::spawn`] would.
    pub(super) fn adopt(
        name: &'static str,
        instance: &str,
        child: Child,
        on_exit: OnExit,
        signal_leader: bool,
    ) -> Supervised {
        let (stop, stop_rx) = watch::channel(None);
        let watch = Watch { name, instance: instance.to_owned(), signal_leader };
        let task = tokio::spawn(watch.run(child, stop_rx, on_exit));
        Supervised { stop, task }
    }

    /// Ends the process: SIGTERM, up to `grace` to exit, then SIGKILL to
    /// its group. Returns once it is reaped.
    pub(super) async fn stop(self, grace: Duration) {
        let _ = self.stop.send(Some(grace));
        let _ = self.task.await;
    }
}

struct Watch {
    name: &'static str,
    instance: String,
    signal_leader: bool,
}

impl Watch {
    async fn run(self, child: Child, mut stop: watch::Receiver<Option<Duration>>, mut on_exit: OnExit) {
        let mut child = Some(child);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let Some(running) = child.as_mut() else {
                // A helper that could not be spawned again: wait, then retry.
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                child = self.respawn(&mut on_exit);
                continue;
            };
            let pid = running.id().and_then(|p| i32::try_from(p).ok());
            tokio::select! {
                biased;
                _ = stop.changed() => {
                    let grace = stop.borrow().unwrap_or_default();
                    self.terminate(running, pid, grace).await;
                    return;
                }
                status = running.wait() => {
                    // Whatever the leader left behind in its group goes too.
                    if let Some(pid) = pid {
                        kill_group(pid, libc::SIGKILL);
                    }
                    if stop.borrow().is_some() {
                        return;
                    }
                    match &mut on_exit {
                        OnExit::Report { events, exits, cgroup, disk } => {
                            let code = status.as_ref().ok().and_then(ExitStatus::code);
                            let full = disk.as_deref().is_some_and(super::disks::is_full);
                            let limit = cgroup.as_ref().and_then(|c| c.limit_hit()).or(full.then_some(LimitHit::Disk));
                            exits.inc();
                            tracing::warn!(instance = %self.instance, ?code, ?limit, "nexus_local_panel_exits_total");
                            let _ = events.send(InstanceEvent::Exited { code, limit, restarted: false });
                            return;
                        }
                        OnExit::Restart { restarts, .. } => {
                            restarts.inc();
                            tracing::warn!(
                                instance = %self.instance, process = self.name, status = ?status, ?backoff,
                                "nexus_local_helper_restarts_total: our helper died; restarting it"
                            );
                        }
                    }
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    child = self.respawn(&mut on_exit);
                }
            }
        }
    }

    fn respawn(&self, on_exit: &mut OnExit) -> Option<Child> {
        let OnExit::Restart { respawn, .. } = on_exit else { return None };
        match respawn().and_then(|mut command| command.spawn()) {
            Ok(child) => Some(child),
            Err(error) => {
                tracing::error!(instance = %self.instance, process = self.name, %error, "could not restart");
                None
            }
        }
    }

    async fn terminate(&self, child: &mut Child, pid: Option<i32>, grace: Duration) {
        let Some(pid) = pid else { return };
        if self.signal_leader {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        } else {
            kill_group(pid, libc::SIGTERM);
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            tracing::info!(instance = %self.instance, process = self.name, ?grace, "did not end on SIGTERM; SIGKILL");
        }
        kill_group(pid, libc::SIGKILL);
        if tokio::time::timeout(REAP_TIMEOUT, child.wait()).await.is_err() {
            tracing::error!(instance = %self.instance, process = self.name, pid, "still running after SIGKILL");
        }
    }
}

fn kill_group(pgid: i32, signal: i32) {
    // SAFETY: killpg has no memory-safety preconditions; the group is ours
    // (the leader was spawned in a session, so a group, of its own).
    unsafe { libc::killpg(pgid, signal) };
}

/// SIGKILLs every process whose network namespace is the one at `netns`
/// (user code that left its process group), until none is left.
pub(super) async fn kill_namespace_members(netns: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(inode) = std::fs::metadata(netns).map(|m| m.ino()) else { return };
    let wanted = format!("net:[{inode}]");
    for _ in 0..100 {
        let members = namespace_members(&wanted);
        if members.is_empty() {
            return;
        }
        for pid in members {
            tracing::warn!(pid, "a process escaped its instance's process group; SIGKILL");
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::error!(netns = %netns.display(), "processes are left in the namespace after SIGKILL");
}

fn namespace_members(wanted: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|link| link.as_os_str() == wanted))
        .collect()
}
