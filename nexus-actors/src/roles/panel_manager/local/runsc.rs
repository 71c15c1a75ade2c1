//! gVisor for the `local` driver: the OCI bundle a panel runs in and the
//! `runsc` command lines that run, probe and clean it up.
//!
//! What works here (runsc 2022-12): `runsc --network=host run` started
//! inside the instance's network namespace (`setns(2)` before exec, like
//! `nsenter --net=`; never `ip netns exec`, which remounts /sys and breaks
//! runsc's cgroup setup). gVisor's netstack then passes sockets through to
//! that namespace, so the panel's 127.0.0.1 is the instance's loopback that
//! its sidecar's listeners share. The sandbox sees a read-only root with
//! the host's `/usr` (and the usual symlinks to it), the panel's code at
//! `/home/panel` (read-write), a private `/tmp`, from `/etc` only what name
//! resolution and TLS need, and nothing else of the host. It owns no process supervision: the caller spawns what it builds.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::super::driver::SandboxError;
use crate::platform::files::{private_dir, write_secret};

/// How long the probe container may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the panel's code appears inside the sandbox (its cwd and `HOME`).
pub(super) const CODE_MOUNT: &str = "/home/panel";

/// What of the host's `/etc` a sandboxed panel sees, read-only, when present.
pub(super) const SHARED_ETC: [&str; 4] = ["/etc/resolv.conf", "/etc/hosts", "/etc/ssl", "/etc/ca-certificates"];

/// An OCI bundle for one instance: `config.json` and an empty rootfs.
#[derive(Clone)]
pub(super) struct Bundle {
    pub(super) dir: PathBuf,
    /// runsc's state directory, private to the instance.
    pub(super) state: PathBuf,
    pub(super) container: String,
}

/// Who the panel runs as and what it runs.
pub(super) struct Process<'a> {
    pub(super) args: &'a [String],
    pub(super) env: &'a [(String, String)],
    pub(super) uid: u32,
    /// Capabilities it starts with: none for panel code (a warm sandbox's
    /// zygote gets the few it needs to become the panel's uid, then drops them).
    pub(super) caps: &'a [&'a str],
}

impl Bundle {
    /// Writes the bundle under `instance_dir` for the code at `code`.
    /// `config.json` holds the panel's environment, its sidecar secret
    /// among it: it is written `0600`, for runsc (root) only.
    pub(super) fn write(
        instance_dir: &Path,
        container: &str,
        code: &Path,
        process: &Process,
    ) -> std::io::Result<Bundle> {
        let dir = instance_dir.join("bundle");
        let rootfs = dir.join("rootfs");
        for sub in ["usr", "home/panel", "tmp", "proc", "dev", "sys", "etc"] {
            std::fs::create_dir_all(rootfs.join(sub))?;
        }
        // Debian's merged /usr: these are symlinks into the read-only /usr.
        for (link, target) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
            let path = rootfs.join(link);
            if std::fs::symlink_metadata(&path).is_err() {
                std::os::unix::fs::symlink(target, path)?;
            }
        }
        let env: Vec<String> = process.env.iter().map(|(k, v)| format!("{k}={v}")).collect();

        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                   "options": ["nosuid", "noexec", "nodev", "ro"]}),
            json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}),
            json!({"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]}),
            json!({"destination": CODE_MOUNT, "type": "bind", "source": code, "options": ["rbind", "rw"]}),
        ];
        for shared in SHARED_ETC.iter().filter(|path| Path::new(path).exists()) {
            // A file is mounted on a file: runsc wants the target to exist.
            let target = rootfs.join(shared.trim_start_matches('/'));
            match Path::new(shared).is_dir() {
                true => std::fs::create_dir_all(&target)?,
                false => drop(std::fs::File::create(&target)?),
            }
            mounts.push(json!({"destination": shared, "type": "bind", "source": shared, "options": ["rbind", "ro"]}));
        }
        let config = json!({
            "ociVersion": "1.0.0",
            "process": {
                "terminal": false,
                "user": {"uid": process.uid, "gid": process.uid},
                "args": process.args,
                "env": env,
                "cwd": CODE_MOUNT,
                "capabilities": {"bounding": process.caps, "effective": process.caps, "inheritable": [],
                                 "permitted": process.caps},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
                "noNewPrivileges": true
            },
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "panel",
            "mounts": mounts,
            // No network namespace here: runsc joins the one it is started
            // in (the instance's), see the module doc.
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}
        });
        write_secret(&dir.join("config.json"), &serde_json::to_vec_pretty(&config)?)?;
        let state = instance_dir.join("runsc");
        private_dir(&state)?;
        Ok(Bundle { dir, state, container: container.to_owned() })
    }

    /// `runsc ... run`: the caller runs it inside the instance's namespace.
    /// SIGTERM to this process reaches the panel; its exit status is the
    /// panel's; the sandbox dies with it.
    pub(super) fn run_command(&self, runsc: &Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(runsc);
        command
            .arg("--root")
            .arg(&self.state)
            .arg("--network=host")
            // The sandbox stays in the cgroup runsc is started in: the
            // instance's, with its limits (see cgroups.rs).
            .arg("--ignore-cgroups")
            .arg("run")
            .arg("--bundle")
            .arg(&self.dir)
            .arg(&self.container);
        command
    }

    /// Removes what runsc keeps of the container after `run` ended, so
    /// the same container can run again.
    pub(super) async fn forget_container(&self, runsc: &Path) {
        delete(runsc, &self.state, &self.container).await;
        let _ = std::fs::remove_dir_all(&self.state);
        if let Err(error) = private_dir(&self.state) {
            tracing::warn!(container = %self.container, %error, "could not recreate runsc's state dir");
        }
    }
}

/// `runsc --root <state> delete -force <container>`: ends the sandbox if
/// it still runs and forgets the container (failures are logged).
pub(super) async fn delete(runsc: &Path, state: &Path, container: &str) {
    let deleted = tokio::process::Command::new(runsc)
        .arg("--root")
        .arg(state)
        .args(["delete", "-force", container])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(error) = deleted {
        tracing::warn!(container, %error, "runsc delete failed");
    }
}

/// Whether `runsc run` works here: runs `true` in a throwaway bundle under
/// `scratch`. Err says why not (shown in the fallback warning).
pub(super) async fn probe(runsc: &Path, scratch: &Path) -> Result<(), SandboxError> {
    let io = |error: std::io::Error| SandboxError::Probe(Arc::new(error));
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch.join("code")).map_err(io)?;
    let args = ["true".to_owned()];
    let env = [("PATH".to_owned(), "/usr/bin:/bin".to_owned())];
    let container = format!("nexus-probe-{}", std::process::id());
    let process = Process { args: &args, env: &env, uid: 0, caps: &[] };
    let bundle = Bundle::write(scratch, &container, &scratch.join("code"), &process).map_err(io)?;
    let output = bundle.run_command(runsc).stdin(Stdio::null()).kill_on_drop(true).output();
    let result = match tokio::time::timeout(PROBE_TIMEOUT, output).await {
        Ok(Ok(output)) if output.status.success() => Ok(()),
        Ok(Ok(output)) => Err(SandboxError::RunscFailed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        }),
        Ok(Err(error)) => Err(io(error)),
        Err(_) => Err(SandboxError::RunscTimeout(PROBE_TIMEOUT)),
    };
    bundle.forget_container(runsc).await;
    let _ = std::fs::remove_dir_all(scratch);
    result
}
