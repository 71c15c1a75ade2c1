//! Per-instance resource limits: memory, CPU and process count, through
//! cgroups v1 or v2, whichever the host mounts, for the panel's processes
//! only (under gVisor the whole sandbox), never the node's own helpers.
//!
//! An instance's cgroup (`nexus-<instance>`) is made below the node's own,
//! so whatever bounds the node bounds its panels too. The user process (a
//! plain or bubblewrap'd panel, or `runsc run`, told to leave cgroups
//! alone so its sandbox stays there) joins it between fork and exec. When the user
//! process ends, the cgroup's counters say whether a limit was hit, which
//! the instance's status shows ("killed: memory limit"). It removes the
//! cgroups it made; it never touches another.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use super::super::driver::LimitHit;
use super::files::blocking;
use super::metrics::LocalMetrics;

/// What one instance may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory (and swap), bytes.
    pub memory: u64,
    /// CPU time, thousandths of a core.
    pub cpu_millis: u32,
    /// Processes and threads at once.
    pub pids: u32,
    /// What an App may write to its scratch space, bytes.
    pub disk: u64,
    /// The size of a Studio volume's file system (its code, what it
    /// installs and writes), bytes; applies to volumes made from then on.
    pub volume: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { memory: 512 << 20, cpu_millis: 1000, pids: 256, disk: 256 << 20, volume: 1 << 30 }
    }
}

/// The CPU period the quota is a share of, microseconds.
const CPU_PERIOD: u64 = 100_000;

/// The cgroup mounts, and the node's place in them.
#[derive(Debug, Clone)]
pub(super) enum Hierarchy {
    /// One directory per controller: `(controller, mount/own-path)`.
    V1(Vec<(&'static str, PathBuf)>),
    /// The unified hierarchy: the directory instances are made in.
    V2(PathBuf),
}

impl Hierarchy {
    /// The host's cgroups as this process sees them; `None` when neither
    /// version is usable (the driver warns, and runs without limits).
    pub(super) fn detect() -> Option<Hierarchy> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
            return v2_prepare(&root.join(path.trim_start_matches('/'))).ok();
        }
        let mut dirs = Vec::new();
        for controller in ["memory", "pids", "cpu"] {
            let path = own.lines().find_map(|line| {
                let mut fields = line.splitn(3, ':');
                let (_, names, path) = (fields.next()?, fields.next()?, fields.next()?);
                names.split(',').any(|n| n == controller).then(|| path.trim_start_matches('/').to_owned())
            })?;
            let dir = root.join(controller).join(path);
            dir.is_dir().then_some(())?;
            dirs.push((controller, dir));
        }
        Some(Hierarchy::V1(dirs))
    }

    /// The instances whose cgroups are here, by the names this module gives.
    pub(super) fn instances(&self) -> Vec<String> {
        let bases: Vec<&PathBuf> = match self {
            Hierarchy::V1(dirs) => dirs.iter().map(|(_, d)| d).collect(),
            Hierarchy::V2(base) => vec![base],
        };
        let mut found: Vec<String> = bases
            .iter()
            .filter_map(|base| std::fs::read_dir(base).ok())
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_prefix("nexus-").map(str::to_owned))
            .filter(|id| id != "node")
            .collect();
        found.sort();
        found.dedup();
        found
    }

    /// The existing cgroup of `instance` (left by a crash), to remove.
    pub(super) fn existing(&self, instance: &str) -> Cgroup {
        let dirs = match self {
            Hierarchy::V1(dirs) => dirs.iter().map(|(_, d)| d.join(name(instance))).filter(|d| d.is_dir()).collect(),
            Hierarchy::V2(base) => vec![base.join(name(instance))],
        };
        self.cgroup(dirs)
    }

    /// Makes the instance's cgroup with `limits`.
    pub(super) fn create(&self, instance: &str, limits: Limits) -> io::Result<Cgroup> {
        let quota = u64::from(limits.cpu_millis) * CPU_PERIOD / 1000;
        let settings: Vec<(PathBuf, Vec<(&str, String)>)> = match self {
            Hierarchy::V1(dirs) => dirs
                .iter()
                .map(|(controller, dir)| {
                    let values = match *controller {
                        "memory" => vec![
                            ("memory.limit_in_bytes", limits.memory.to_string()),
                            ("memory.memsw.limit_in_bytes", limits.memory.to_string()),
                        ],
                        "pids" => vec![("pids.max", limits.pids.to_string())],
                        _ => {
                            vec![("cpu.cfs_period_us", CPU_PERIOD.to_string()), ("cpu.cfs_quota_us", quota.to_string())]
                        }
                    };
                    (dir.join(name(instance)), values)
                })
                .collect(),
            Hierarchy::V2(base) => vec![(
                base.join(name(instance)),
                vec![
                    ("memory.max", limits.memory.to_string()),
                    ("memory.swap.max", "0".to_owned()),
                    ("pids.max", limits.pids.to_string()),
                    ("cpu.max", format!("{quota} {CPU_PERIOD}")),
                ],
            )],
        };
        let mut made = Vec::new();
        let set = |dir: &Path, values: Vec<(&str, String)>| -> io::Result<()> {
            // A crashed run's cgroup of the same instance is taken over.
            if let Err(error) = std::fs::create_dir(dir) {
                if error.kind() != io::ErrorKind::AlreadyExists {
                    return Err(error);
                }
            }
            for (file, value) in values {
                match std::fs::write(dir.join(file), &value) {
                    Ok(()) => {}
                    // memsw exists only with swap accounting; swap.max only with swap.
                    Err(_) if file == "memory.memsw.limit_in_bytes" || file == "memory.swap.max" => {}
                    Err(error) => return Err(io::Error::new(error.kind(), format!("{file}: {error}"))),
                }
            }
            Ok(())
        };
        for (dir, values) in settings {
            let result = set(&dir, values);
            made.push(dir);
            if let Err(error) = result {
                made.iter().for_each(|dir| drop(std::fs::remove_dir(dir)));
                return Err(error);
            }
        }
        Ok(self.cgroup(made))
    }

    /// A cgroup over `dirs`, its counters read as they stand.
    fn cgroup(&self, dirs: Vec<PathBuf>) -> Cgroup {
        let mut cgroup = Cgroup { dirs, version2: matches!(self, Hierarchy::V2(_)), seen: [0, 0].map(AtomicU64::new) };
        cgroup.seen = [AtomicU64::new(cgroup.count(Counter::OomKills)), AtomicU64::new(cgroup.count(Counter::PidsMax))];
        cgroup
    }
}

/// v2: a cgroup that holds processes cannot hand controllers down, except
/// the root. At the root, instances' cgroups go right below it; elsewhere
/// this process moves to a leaf of its own (`nexus-node`) first, and only
/// this one: when the cgroup holds anyone else's processes, the write
/// fails and instances run without limits (warned), rather than moving
/// processes that are not ours.
fn v2_prepare(own: &Path) -> io::Result<Hierarchy> {
    if own != Path::new("/sys/fs/cgroup") {
        let leaf = own.join("nexus-node");
        if !leaf.is_dir() {
            std::fs::create_dir(&leaf)?;
        }
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())?;
    }
    std::fs::write(own.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
    Ok(Hierarchy::V2(own.to_owned()))
}

fn name(instance: &str) -> String {
    format!("nexus-{instance}")
}

enum Counter {
    OomKills,
    PidsMax,
}

/// One instance's cgroup (a directory per v1 controller).
#[derive(Debug)]
pub(super) struct Cgroup {
    dirs: Vec<PathBuf>,
    version2: bool,
    /// The counters as last read: a hit is a rise.
    seen: [AtomicU64; 2],
}

impl Cgroup {
    /// Its `cgroup.procs` files, opened by root before a fork; the child
    /// writes `0` to each to join (see `procs::prepare`).
    pub(super) fn procs_files(&self) -> io::Result<Vec<File>> {
        self.dirs.iter().map(|d| std::fs::OpenOptions::new().write(true).open(d.join("cgroup.procs"))).collect()
    }

    /// The limit hit since the last call, if any: a kill by the memory
    /// limit first, else a refused fork.
    pub(super) fn limit_hit(&self) -> Option<LimitHit> {
        let rose = |index: usize, counter: Counter| {
            let now = self.count(counter);
            self.seen[index].swap(now, Ordering::SeqCst) < now
        };
        let (oom, pids) = (rose(0, Counter::OomKills), rose(1, Counter::PidsMax));
        match (oom, pids) {
            (true, _) => Some(LimitHit::Memory),
            (false, true) => Some(LimitHit::Pids),
            _ => None,
        }
    }

    fn count(&self, counter: Counter) -> u64 {
        let (file, key) = match (counter, self.version2) {
            (Counter::OomKills, false) => ("memory.oom_control", "oom_kill"),
            (Counter::OomKills, true) => ("memory.events", "oom_kill"),
            (Counter::PidsMax, _) => ("pids.events", "max"),
        };
        self.dirs
            .iter()
            .filter_map(|dir| std::fs::read_to_string(dir.join(file)).ok())
            .flat_map(|text| {
                text.lines().filter_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok()).collect::<Vec<_>>()
            })
            .sum()
    }

    /// Kills whatever still runs in the cgroup (what escaped the instance's
    /// process group and namespace), then removes it; a busy one is tried
    /// again for a moment, then left, logged.
    pub(super) async fn remove(&self) {
        for dir in &self.dirs {
            if self.version2 && std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                continue;
            }
            for pid in std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: kill has no memory-safety preconditions; the
                    // process is in the instance's cgroup, so the panel's.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for dir in &self.dirs {
            for attempt in 0..20 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => break,
                    Err(error) if attempt == 19 => {
                        tracing::warn!(cgroup = %dir.display(), %error, "could not remove an instance's cgroup");
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
        }
    }
}

/// A cgroup named for `id` with `limits`; `None` (warned, counted) when
/// the host has no usable cgroups or making it failed.
pub(super) async fn new_cgroup(
    hierarchy: Option<&Hierarchy>,
    id: &str,
    limits: Limits,
    metrics: &LocalMetrics,
) -> Option<Arc<Cgroup>> {
    let Some(hierarchy) = hierarchy else {
        metrics.unlimited.inc();
        tracing::warn!(instance = id, "nexus_local_unlimited_instances_total: no usable cgroups; the instance runs without memory, CPU or process limits");
        return None;
    };
    let (hierarchy, id_owned) = (hierarchy.clone(), id.to_owned());
    match blocking(move || Ok(hierarchy.create(&id_owned, limits)?)).await {
        Ok(cgroup) => Some(Arc::new(cgroup)),
        Err(error) => {
            metrics.unlimited.inc();
            tracing::warn!(instance = id, %error, "nexus_local_unlimited_instances_total: the instance's cgroup could not be made; it runs without limits");
            None
        }
    }
}
