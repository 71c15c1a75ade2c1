//! How the `local` driver isolates panel code on this machine: gVisor when
//! root and a probe container runs under `runsc`, else a plain process in
//! its own namespace (root), else nothing at all (not root), each weaker
//! choice with a warning the user sees. A failed probe is tried again at
//! once, a few times, and a choice weaker than gVisor for want of a
//! working `runsc` is only for a while ([`Sandbox::reprobe`]): one failure
//! (seen: "cannot read client sync file … EOF" on a fresh machine) never
//! downgrades a node for good.
//!
//! It decides and says why; it runs no panel and owns no file beyond the
//! probe's scratch directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::super::driver::SandboxError;
use super::metrics::LocalMetrics;
use super::runsc;
use crate::infra::find_program;
use crate::instance::Isolation;

/// How user code is isolated; `Auto` takes the strongest that works here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxChoice {
    /// gVisor if root and `runsc run` works, else a process in its own
    /// namespace if root, else none (with a loud warning).
    Auto,
    /// gVisor or refuse to start instances.
    Gvisor,
    /// A plain process in the instance's namespace, as its own uid.
    Process,
    /// A plain process on the host network: no isolation.
    None,
}

/// The isolation this driver gives.
#[derive(Debug, Clone)]
pub(super) struct Sandbox {
    pub(super) isolation: Isolation,
    pub(super) runsc: Option<PathBuf>,
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
/// works under `scratch`.
pub(super) async fn resolve(
    choice: SandboxChoice,
    scratch: &Path,
    metrics: &LocalMetrics,
) -> Result<Sandbox, SandboxError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let namespaces = crate::netns::supported();
    let none = |why: &str| Sandbox {
        isolation: Isolation::None,
        runsc: None,
        reprobe: false,
        warning: Some(format!(
            "NO ISOLATION: {why}; panel code runs as a plain process on the host network and can reach \
             everything this machine can (Redis, the system plane, other panels)"
        )),
    };
    let process = |why: String, reprobe: bool| Sandbox {
        isolation: Isolation::Process,
        runsc: None,
        reprobe,
        warning: Some(format!(
            "weaker isolation: {why}; panel code runs as a plain process (its own uid and network namespace, \
             the host's kernel and filesystem)"
        )),
    };
    let gvisor = || async {
        let runsc = find_program("runsc").ok_or(SandboxError::NoRunsc)?;
        let mut pause = PROBE_PAUSE;
        for attempt in 1..=PROBE_ATTEMPTS {
            match runsc::probe(&runsc, scratch).await {
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
            runsc: Some(runsc),
            warning: None,
            reprobe: false,
        })
    };
    let sandbox = match choice {
        SandboxChoice::None => none("the sandbox is turned off"),
        SandboxChoice::Auto if !root || !namespaces => {
            none(if root { "iproute2's `ip` is missing" } else { "nexus is not running as root" })
        }
        SandboxChoice::Auto => {
            gvisor().await.unwrap_or_else(|why| process(format!("gVisor is unavailable ({why})"), true))
        }
        SandboxChoice::Process | SandboxChoice::Gvisor if !namespaces => return Err(SandboxError::NoNamespaces),
        SandboxChoice::Process => process("the sandbox is set to `process`, not gVisor".into(), false),
        SandboxChoice::Gvisor => gvisor().await?,
    };
    match &sandbox.warning {
        Some(warning) => tracing::warn!(isolation = ?sandbox.isolation, "{warning}"),
        None => tracing::info!(isolation = ?sandbox.isolation, "panels run under gVisor"),
    }
    Ok(sandbox)
}
