//! How the `local` driver isolates panel code on this machine.
//!
//! `auto` (the default) takes gVisor when root and a probe container runs
//! under `runsc`; else bubblewrap's namespaces when a probe runs under
//! `bwrap`; else (and without root, which every sandbox here needs) it
//! refuses to start instances: it never falls back to a plain host
//! process, which shares the host's files and processes with every other
//! panel. A plain `process`, or `none` (one user's local tool, not root),
//! runs only when asked for, and is shown as unisolated.
//!
//! A failed runsc probe is tried again at once, a few times, and a choice
//! weaker than gVisor for want of a working `runsc` is only for a while
//! ([`Sandbox::reprobe`]): one failure (seen: "cannot read client sync
//! file … EOF" on a fresh machine) never downgrades a node for good.
//!
//! It decides and says why; it runs no panel and owns no file beyond the
//! probes' scratch directories.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::super::driver::SandboxError;
use super::metrics::LocalMetrics;
use super::{bubblewrap, runsc};
use crate::infra::find_program;
use crate::instance::Isolation;

/// How user code is isolated; `Auto` takes the strongest that works here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxChoice {
    /// gVisor if root and `runsc run` works, else bubblewrap's namespaces,
    /// else (or without root) refuse.
    Auto,
    /// gVisor or refuse to start instances.
    Gvisor,
    /// Bubblewrap's namespaces or refuse to start instances.
    Namespaces,
    /// A plain process in the instance's network namespace, as its own
    /// uid, sharing the host's filesystem and processes: unisolated.
    Process,
    /// A plain process on the host network: no isolation.
    None,
}

/// The isolation this driver gives.
#[derive(Debug, Clone)]
pub(super) struct Sandbox {
    pub(super) isolation: Isolation,
    /// `runsc` (gVisor) or `bwrap` (namespaces).
    pub(super) tool: Option<PathBuf>,
    /// Set when weaker than gVisor: shown to the user.
    pub(super) warning: Option<String>,
    /// Whether gVisor was wanted and its probe failed: the driver probes
    /// again before it starts an instance after a while.
    pub(super) reprobe: bool,
}

/// Probes of one decision before `runsc` counts as not working.
const PROBE_ATTEMPTS: u32 = 3;
/// The pause after the first failed probe, doubled after each further one.
const PROBE_PAUSE: Duration = Duration::from_millis(250);

/// Decides the isolation for `choice` on this machine; the runsc probe
/// works under `scratch` (root's), bubblewrap's under `bwrap_scratch`
/// (which an unprivileged uid can reach).
pub(super) async fn resolve(
    choice: SandboxChoice,
    scratch: &Path,
    bwrap_scratch: &Path,
    metrics: &LocalMetrics,
) -> Result<Sandbox, SandboxError> {
    let bwrap_scratch = bwrap_scratch.to_owned();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let namespaces = crate::netns::supported();
    let none = |why: &str| Sandbox {
        isolation: Isolation::None,
        tool: None,
        reprobe: false,
        warning: Some(format!(
            "NO ISOLATION: {why}; panel code runs as a plain process on the host network and can reach \
             everything this machine can (Redis, the system plane, other panels)"
        )),
    };
    let gvisor = || async {
        let runsc = find_program("runsc").ok_or(SandboxError::NoRunsc)?;
        let mut pause = PROBE_PAUSE;
        for attempt in 1..=PROBE_ATTEMPTS {
            match runsc::probe(&runsc, &scratch.join(".runsc-probe")).await {
                Ok(()) => {
                    metrics.sandbox_probes.with_label_values(&["ok"]).inc();
                    break;
                }
                Err(error) => {
                    metrics.sandbox_probes.with_label_values(&["failed"]).inc();
                    tracing::warn!(attempt, %error, "nexus_local_sandbox_probes_total: runsc probe failed");
                    if attempt == PROBE_ATTEMPTS {
                        return Err(error);
                    }
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
        Ok::<_, SandboxError>(Sandbox {
            isolation: Isolation::Gvisor,
            tool: Some(runsc),
            warning: None,
            reprobe: false,
        })
    };
    let bwrap = |why: Option<String>| async move {
        let bwrap = find_program("bwrap").ok_or(SandboxError::NoBubblewrap)?;
        bubblewrap::probe(&bwrap, &bwrap_scratch).await?;
        let reprobe = why.is_some();
        let warning = why.map(|why| {
            format!(
                "weaker isolation: {why}; panel code runs in its own user, mount, PID and network namespaces \
                 (bubblewrap), on the host's kernel"
            )
        });
        Ok::<_, SandboxError>(Sandbox { isolation: Isolation::Namespaces, tool: Some(bwrap), warning, reprobe })
    };
    let sandbox = match choice {
        SandboxChoice::None => none("the sandbox is turned off"),
        SandboxChoice::Auto if !root || !namespaces => {
            let why = if root { "iproute2's `ip` is missing" } else { "nexus is not running as root" };
            return Err(SandboxError::NoIsolation(why.into()));
        }
        SandboxChoice::Auto => match gvisor().await {
            Ok(sandbox) => sandbox,
            Err(no_gvisor) => {
                bwrap(Some(format!("gVisor is unavailable ({no_gvisor})"))).await.map_err(|no_bwrap| {
                    SandboxError::NoIsolation(format!("gVisor: {no_gvisor}; bubblewrap: {no_bwrap}"))
                })?
            }
        },
        _ if !namespaces => return Err(SandboxError::NoNamespaces),
        SandboxChoice::Process => Sandbox {
            isolation: Isolation::Process,
            tool: None,
            reprobe: false,
            warning: Some(
                "UNISOLATED (--sandbox process): panel code runs as a plain process with its own uid and network, \
                 sharing this machine's filesystem, processes and kernel"
                    .into(),
            ),
        },
        SandboxChoice::Gvisor => gvisor().await?,
        SandboxChoice::Namespaces => bwrap(None).await?,
    };
    match &sandbox.warning {
        Some(warning) => tracing::warn!(isolation = ?sandbox.isolation, "{warning}"),
        None => tracing::info!(isolation = ?sandbox.isolation, "panels run sandboxed"),
    }
    Ok(sandbox)
}
