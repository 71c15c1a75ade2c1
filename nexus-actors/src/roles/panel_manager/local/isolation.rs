//! How the `local` driver isolates panel code on this machine, decided once
//! per driver: gVisor when root and a probe container runs under `runsc`,
//! else a plain process in its own namespace (root), else nothing at all
//! (not root), each weaker choice with a warning the user sees.
//!
//! It decides and says why; it runs no panel and owns no file beyond the
//! probe's scratch directory.

use std::path::{Path, PathBuf};

use super::super::driver::SandboxError;
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
}

/// Decides the isolation for `choice` on this machine; the runsc probe
/// works under `scratch`.
pub(super) async fn resolve(choice: SandboxChoice, scratch: &Path) -> Result<Sandbox, SandboxError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let namespaces = crate::netns::supported();
    let none = |why: &str| Sandbox {
        isolation: Isolation::None,
        runsc: None,
        warning: Some(format!(
            "NO ISOLATION: {why}; panel code runs as a plain process on the host network and can reach \
             everything this machine can (Redis, the system plane, other panels)"
        )),
    };
    let process = |why: String| Sandbox {
        isolation: Isolation::Process,
        runsc: None,
        warning: Some(format!(
            "weaker isolation: {why}; panel code runs as a plain process (its own uid and network namespace, \
             the host's kernel and filesystem)"
        )),
    };
    let gvisor = || async {
        let runsc = find_program("runsc").ok_or(SandboxError::NoRunsc)?;
        runsc::probe(&runsc, scratch).await?;
        Ok::<_, SandboxError>(Sandbox { isolation: Isolation::Gvisor, runsc: Some(runsc), warning: None })
    };
    let sandbox = match choice {
        SandboxChoice::None => none("the sandbox is turned off"),
        SandboxChoice::Auto if !root || !namespaces => {
            none(if root { "iproute2's `ip` is missing" } else { "nexus is not running as root" })
        }
        SandboxChoice::Auto => gvisor().await.unwrap_or_else(|why| process(format!("gVisor is unavailable ({why})"))),
        SandboxChoice::Process | SandboxChoice::Gvisor if !namespaces => return Err(SandboxError::NoNamespaces),
        SandboxChoice::Process => process("the sandbox is set to `process`, not gVisor".into()),
        SandboxChoice::Gvisor => gvisor().await?,
    };
    match &sandbox.warning {
        Some(warning) => tracing::warn!(isolation = ?sandbox.isolation, "{warning}"),
        None => tracing::info!(isolation = ?sandbox.isolation, "panels run under gVisor"),
    }
    Ok(sandbox)
}
