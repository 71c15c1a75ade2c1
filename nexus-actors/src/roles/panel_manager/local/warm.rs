//! Warm sandboxes: sandboxes made ahead for App instances, so that a cold
//! start skips `runsc`'s create and start and, for a Python panel, the
//! interpreter's boot (together about 500 ms of a 600 ms cold start on the
//! ptrace platform; benches/RESULTS.md "App cold start"). Under `--sandbox
//! process` the same zygote runs as the host's root in the slot's namespace
//! and cgroup, without gVisor; bubblewrap fixes the uid as it starts, so it
//! has none.
//!
//! A [`Slot`] is what an App instance needs that does not depend on its
//! panel: a network namespace with its link and egress rules, a cgroup with
//! the limits, a scratch space with an empty code directory, and a running
//! sandbox. The sandbox's first process is `zygote.py`: a Python
//! interpreter, the sandbox's root with only the capabilities it needs to
//! change uid, that has loaded the standard library's web modules and waits
//! on its stdin for one job. The instance that takes a slot copies its code
//! into the directory the sandbox already mounts, then sends the job: the
//! zygote drops its capabilities, becomes the panel's uid for good and runs
//! the panel's command (a `python3 script.py` in itself, anything else by
//! exec).
//!
//! A slot serves one instance and goes with it: nothing of one panel is ever
//! seen by another. The pool owns its slots until they are taken and then
//! owns nothing of them; it decides nothing about instances.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};
use tokio::task::JoinHandle;

use super::super::driver::DriverError;
use super::cgroups::{self, Cgroup, Hierarchy, Limits};
use super::files::{blocking, netns_name, open_log, remove_tree};
use super::metrics::LocalMetrics;
use super::network::{self, Link, Network};
use super::{procs, runsc, scratch};
use crate::netns::Netns;
use crate::platform::files::private_dir;

/// The zygote, run as `python3 -c`.
const ZYGOTE: &str = include_str!("zygote.py");
/// What the zygote may do as the sandbox's root: become another uid, and
/// first empty its bounding set (zygote.py).
const ZYGOTE_CAPS: [&str; 3] = ["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"];
/// The line the zygote writes once it waits for its job.
const READY_LINE: &[u8] = b"nexus-warm: ready\n";
/// Every instance id is `<panel>-<8 hex digits>`: no slot's id is one.
const SLOT_PREFIX: &str = "_warm_";
/// How long a new sandbox may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// After a take the refill waits this long: the instance that took the slot
/// has the CPU to itself while it boots.
pub(super) const REFILL_AFTER: Duration = Duration::from_secs(1);

/// Whether `id` (an instance directory's or a namespace's) is a slot's:
/// its prefix and no `-`, which every instance id has.
pub(super) fn is_slot(id: &str) -> bool {
    id.starts_with(SLOT_PREFIX) && !id.contains('-')
}

/// What slots are made with: the driver's parts.
#[derive(Clone)]
pub(super) struct Maker {
    /// gVisor's `runsc`; `None`: the zygote runs as a plain process in the
    /// slot's namespace (`--sandbox process`).
    pub(super) runsc: Option<PathBuf>,
    pub(super) data_dir: PathBuf,
    pub(super) network: Arc<Network>,
    pub(super) hierarchy: Option<Hierarchy>,
    pub(super) limits: Limits,
    pub(super) metrics: LocalMetrics,
    /// The environment the panel will have, less its per-instance values:
    /// the interpreter reads some of it (locale, buffering) as it starts.
    pub(super) env: Vec<(String, String)>,
}

/// One sandbox made ahead: its parts, and its zygote waiting.
pub(super) struct Slot {
    pub(super) parts: Parts,
    pub(super) zygote: Zygote,
}

/// What a slot stands in for an instance.
pub(super) struct Parts {
    pub(super) id: String,
    /// `instances/<id>/`: its bundle, runsc's state, its log.
    pub(super) dir: PathBuf,
    pub(super) netns: Netns,
    pub(super) link: Link,
    pub(super) cgroup: Option<Arc<Cgroup>>,
    /// `scratch/<id>/`, capped, and in it the code directory the sandbox mounts.
    pub(super) scratch: PathBuf,
    pub(super) code: PathBuf,
    /// Under gVisor: `runsc` and the bundle (the zygote's until a restart).
    pub(super) gvisor: Option<(PathBuf, runsc::Bundle)>,
}

/// The zygote waiting for its job: under gVisor, the `runsc run` whose
/// sandbox's first process it is; else the zygote's own process.
pub(super) struct Zygote {
    child: Child,
    stdin: ChildStdin,
}

/// What the zygote runs.
pub(super) struct Job<'a> {
    pub(super) uid: u32,
    /// The code, where the zygote sees it.
    pub(super) cwd: &'a str,
    pub(super) env: &'a [(String, String)],
    pub(super) argv: &'a [String],
}

impl Zygote {
    /// Sends `job`; returns `runsc run`, whose exit is now the panel's.
    pub(super) async fn run(mut self, job: &Job<'_>) -> io::Result<Child> {
        let job = serde_json::json!({"uid": job.uid, "cwd": job.cwd, "env": job.env, "argv": job.argv});
        let mut line = serde_json::to_vec(&job)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.shutdown().await?;
        Ok(self.child)
    }

    /// Whether the sandbox still runs and its zygote can read the job:
    /// `runsc run` outlives a killed sandbox for a moment, but its stdin
    /// then has no reader left (which poll reports as an error).
    fn alive(&mut self) -> bool {
        let mut stdin = libc::pollfd { fd: self.stdin.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd, for the length given; no wait.
        let polled = unsafe { libc::poll(&mut stdin, 1, 0) };
        let readers = polled >= 0 && stdin.revents & libc::POLLERR == 0;
        readers && matches!(self.child.try_wait(), Ok(None))
    }
}

impl Slot {
    /// Makes a slot and waits until its zygote is ready; on failure leaves
    /// nothing behind.
    async fn make(maker: &Maker, id: String) -> Result<Slot, DriverError> {
        let dir = maker.data_dir.join("instances").join(&id);
        let scratch_dir = maker.data_dir.join("scratch").join(&id);
        let undo = |dir: &Path, scratch_dir: &Path| {
            let _ = scratch::release(scratch_dir);
            let _ = remove_tree(dir);
        };
        let (at, cap, private) = (scratch_dir.clone(), maker.limits.disk, dir.clone());
        let made = blocking(move || {
            private_dir(&private)?;
            let code = scratch::prepare(&at, Some(cap))?;
            private_dir(&code)?;
            Ok(code)
        });
        let code = made.await.inspect_err(|_| undo(&dir, &scratch_dir))?;
        let args = ["python3".to_owned(), "-c".to_owned(), ZYGOTE.to_owned()];
        let gvisor = maker.runsc.as_ref().map(|runsc| {
            let process = runsc::Process { args: &args, env: &maker.env, uid: 0, caps: &ZYGOTE_CAPS };
            runsc::Bundle::write(&dir, &netns_name(&id), &code, &process).map(|bundle| (runsc.clone(), bundle))
        });
        let gvisor = gvisor.transpose().inspect_err(|_| undo(&dir, &scratch_dir))?;
        let (netns, link) =
            network::new_namespace(maker.network.clone(), &id).await.inspect_err(|_| undo(&dir, &scratch_dir))?;
        let cgroup = cgroups::new_cgroup(maker.hierarchy.as_ref(), &id, maker.limits, &maker.metrics).await;
        let parts = Parts { id, dir, netns, link, cgroup, scratch: scratch_dir, code, gvisor };
        match parts.start(&args, &maker.env).await {
            Ok(zygote) => Ok(Slot { parts, zygote }),
            Err(error) => {
                parts.discard().await;
                Err(error)
            }
        }
    }

    /// Ends the sandbox and frees what the slot held.
    pub(super) async fn discard(self) {
        drop(self.zygote);
        self.parts.discard().await;
    }

    /// Empties the log of the zygote's ready line and moves it to `to`,
    /// where the instance's log goes (its writers go on writing to it).
    pub(super) fn hand_log(&self, to: &Path) -> io::Result<()> {
        let log = self.parts.dir.join("panel.log");
        std::fs::OpenOptions::new().write(true).open(&log)?.set_len(0)?;
        std::fs::rename(log, to)
    }
}

impl Parts {
    /// Starts the sandbox (or, without gVisor, the zygote as root in the
    /// namespace: it drops to the panel's uid as it would in gVisor) and
    /// waits for its zygote's ready line.
    async fn start(&self, zygote: &[String], env: &[(String, String)]) -> Result<Zygote, DriverError> {
        let log_path = self.dir.join("panel.log");
        let log = open_log(&log_path)?;
        let mut command = match &self.gvisor {
            Some((runsc, bundle)) => bundle.run_command(runsc),
            None => {
                let mut command = tokio::process::Command::new(&zygote[0]);
                command.args(&zygote[1..]).current_dir(&self.code).env_clear();
                command.envs(env.iter().map(|(k, v)| (k, v))).env("HOME", &self.code);
                command
            }
        };
        let cgroup = self.cgroup.as_ref().map(|c| c.procs_files()).transpose()?.unwrap_or_default();
        procs::prepare(&mut command, Some(&self.netns.path()), None, cgroup)?;
        command.stdin(Stdio::piped()).stdout(log.try_clone()?).stderr(log);
        let mut child = command.spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| io::Error::other("the zygote's stdin was not piped"))?;
        let mut zygote = Zygote { child, stdin };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // runsc may have its say first.
            let said = read_start(&log_path, 4096);
            if said.windows(READY_LINE.len()).any(|line| line == READY_LINE) {
                return Ok(zygote);
            }
            if !zygote.alive() || Instant::now() > deadline {
                let said = String::from_utf8_lossy(&said).trim().to_owned();
                return Err(DriverError::Io(io::Error::other(format!("a warm sandbox did not start: {said}"))));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Ends whatever runs in the slot and frees what it holds.
    pub(super) async fn discard(self) {
        procs::kill_namespace_members(&self.netns.path()).await;
        network::drop_namespace(&self.id, &self.netns).await;
        if let Some((runsc, bundle)) = &self.gvisor {
            bundle.forget_container(runsc).await;
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.remove().await;
        }
        if let Err(error) = scratch::release(&self.scratch) {
            tracing::warn!(slot = %self.id, %error, "could not delete a warm sandbox's scratch space");
        }
        let _ = remove_tree(&self.dir);
    }
}

/// Up to `max` bytes from the start of the file at `path`.
fn read_start(path: &Path, max: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.take(max as u64).read_to_end(&mut bytes);
    }
    bytes
}

/// Slots ready to be taken, and the task that makes them.
#[derive(Default)]
pub(super) struct Pool {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Slot>,
    /// The slot being made, so that a sweep leaves it alone.
    making: Option<String>,
    filler: Option<JoinHandle<()>>,
    /// Set at the driver's release: no slot is made or kept from then on.
    closed: bool,
}

impl Pool {
    /// Whether `id` is a slot of this pool (ready or being made).
    pub(super) fn holds(&self, id: &str) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.making.as_deref() == Some(id) || state.ready.iter().any(|s| s.parts.id == id)
    }

    /// Takes a ready slot of the kind asked for (`gvisor` or not) whose
    /// zygote still runs (counted in `nexus_local_warm_sandbox_takes_total{outcome}`).
    pub(super) fn take(&self, metrics: &LocalMetrics, gvisor: bool) -> Option<Slot> {
        let mut dead = Vec::new();
        let taken = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut taken = None;
            while let Some(mut slot) = state.ready.pop_front() {
                // Made before the isolation changed (a re-probe): of no use.
                match slot.parts.gvisor.is_some() == gvisor && slot.zygote.alive() {
                    true => {
                        taken = Some(slot);
                        break;
                    }
                    false => dead.push(slot),
                }
            }
            metrics.warm_ready.set(state.ready.len() as i64);
            taken
        };
        for slot in dead {
            metrics.warm_takes.with_label_values(&["dead"]).inc();
            tracing::warn!(slot = %slot.parts.id, "nexus_local_warm_sandbox_takes_total: a warm sandbox had died; discarded");
            tokio::spawn(slot.discard());
        }
        let outcome = if taken.is_some() { "taken" } else { "empty" };
        metrics.warm_takes.with_label_values(&[outcome]).inc();
        taken
    }

    /// Makes slots until `size` are ready, one at a time, in a task of its
    /// own that starts after `after` (unless one already runs). A slot that
    /// cannot be made ends the task: the next call tries again.
    pub(super) fn fill(&self, maker: Maker, size: usize, after: Duration) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let running = state.filler.as_ref().is_some_and(|task| !task.is_finished());
        if running || state.closed || state.ready.len() >= size {
            return;
        }
        let shared = Arc::downgrade(&self.state);
        state.filler = Some(tokio::spawn(async move {
            tokio::time::sleep(after).await;
            while let Some(id) = next_slot(&shared, size) {
                let made = Slot::make(&maker, id).await;
                let Some(state) = shared.upgrade() else {
                    if let Ok(slot) = made {
                        slot.discard().await;
                    }
                    return;
                };
                let slot = match made {
                    Ok(slot) => slot,
                    Err(error) => {
                        state.lock().unwrap_or_else(|p| p.into_inner()).making = None;
                        maker.metrics.warm_made.with_label_values(&["failed"]).inc();
                        tracing::warn!(%error, "nexus_local_warm_sandboxes_made_total: a warm sandbox could not be made");
                        return;
                    }
                };
                maker.metrics.warm_made.with_label_values(&["ready"]).inc();
                let refused = {
                    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                    state.making = None;
                    match state.closed {
                        true => Some(slot),
                        false => {
                            tracing::debug!(slot = %slot.parts.id, "warm sandbox ready");
                            state.ready.push_back(slot);
                            maker.metrics.warm_ready.set(state.ready.len() as i64);
                            None
                        }
                    }
                };
                if let Some(slot) = refused {
                    slot.discard().await;
                }
            }
        }));
    }

    /// Closes the pool and discards its slots, the one being made included
    /// (the driver's release).
    pub(super) async fn drain(&self, metrics: &LocalMetrics) {
        let (slots, filler) = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.closed = true;
            (state.ready.drain(..).collect::<Vec<Slot>>(), state.filler.take())
        };
        metrics.warm_ready.set(0);
        futures::future::join_all(slots.into_iter().map(Slot::discard)).await;
        // It finds the pool closed and discards what it was making.
        if let Some(filler) = filler {
            let _ = filler.await;
        }
    }
}

/// The id of the next slot to make, marked as being made; `None` when the
/// pool is full, closed or gone.
fn next_slot(shared: &Weak<Mutex<State>>, size: usize) -> Option<String> {
    let state = shared.upgrade()?;
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    if state.closed || state.ready.len() >= size {
        return None;
    }
    let id = format!("{SLOT_PREFIX}{:012x}", rand::random::<u64>() >> 16);
    state.making = Some(id.clone());
    Some(id)
}
