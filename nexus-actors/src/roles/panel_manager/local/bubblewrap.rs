//! The namespace sandbox, for when gVisor does not work: bubblewrap runs
//! the panel as its own uid in new user, mount, PID, IPC and UTS
//! namespaces, inside the instance's network namespace, with no way to
//! make further user namespaces (so no `unshare -Urn` out of the
//! instance's network).
//!
//! The panel sees what it would under gVisor: the host's `/usr` read-only
//! (and the usual symlinks to it), its code at `/home/panel`, a private
//! `/tmp`, its own `/proc` and `/dev`, and from `/etc` only what name
//! resolution and TLS need. No other process, no data directory, no
//! `/run/netns`. The host's kernel is shared: that is what gVisor adds.
//! It builds command lines and probes; it supervises nothing.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use super::super::driver::SandboxError;
use super::runsc::{CODE_MOUNT, SHARED_ETC};

/// How long the probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Who the probe runs as: `nobody`, as a panel would run unprivileged.
const PROBE_UID: u32 = 65534;

/// The `bwrap` command that runs `args` with `code` as its home; the
/// caller sets the uid, the network namespace and the environment (which
/// bwrap hands on: secrets never go on its command line).
pub(super) fn command(bwrap: &Path, code: &Path, args: &[String]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(bwrap);
    command.args(sandbox_args()).arg("--bind").arg(code).arg(CODE_MOUNT);
    command.args(["--chdir", CODE_MOUNT, "--"]).args(args);
    command
}

fn sandbox_args() -> Vec<&'static str> {
    let mut args = vec![
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--die-with-parent",
        "--hostname",
        "panel",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/sbin",
        "/sbin",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ];
    for path in SHARED_ETC {
        args.extend(["--ro-bind-try", path, path]);
    }
    args
}

/// Whether bubblewrap works here, unprivileged: runs `true` as `nobody`.
pub(super) async fn probe(bwrap: &Path, scratch: &Path) -> Result<(), SandboxError> {
    let io = |error: std::io::Error| SandboxError::Probe(std::sync::Arc::new(error));
    std::fs::create_dir_all(scratch).map_err(io)?;
    let mut command = command(bwrap, scratch, &["/usr/bin/true".to_owned()]);
    command.env_clear().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    super::procs::prepare(&mut command, None, Some(PROBE_UID), Vec::new()).map_err(io)?;
    let output = tokio::time::timeout(PROBE_TIMEOUT, command.output()).await;
    let _ = std::fs::remove_dir_all(scratch);
    match output {
        Ok(Ok(output)) if output.status.success() => Ok(()),
        Ok(Ok(output)) => Err(SandboxError::BubblewrapFailed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        }),
        Ok(Err(error)) => Err(io(error)),
        Err(_) => Err(SandboxError::Probe(std::sync::Arc::new(std::io::Error::other(format!(
            "bwrap did not finish within {PROBE_TIMEOUT:?}"
        ))))),
    }
}
