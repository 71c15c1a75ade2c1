//! A supervised child process bound to one loopback port.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a broker child could not be had.
#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    /// The program is neither on `PATH` nor in `~/.cargo/bin`.
    #[error("{program} not found on PATH; {hint}")]
    NotInstalled {
        /// The program looked for.
        program: &'static str,
        /// How to install it, or what to set instead.
        hint: &'static str,
    },
    /// The program was found but could not be run.
    #[error("could not start {program}: {source}")]
    Spawn {
        /// Its path.
        program: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The child did not answer in time, or exited first; it was killed.
    #[error("{program} did not become ready on port {port} within {secs}s; see {log}, which ends:\n{tail}")]
    NotReady {
        /// Its path.
        program: String,
        /// The loopback port it was to serve on.
        port: u16,
        /// How long it was given, in seconds.
        secs: u64,
        /// Its log file, which says why.
        log: String,
        /// The log's last lines, so a failure far from the machine says why too.
        tail: String,
    },
    /// Any other I/O failure: a directory, a log or secret file, a free port, the mock cluster.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// A free TCP port on 127.0.0.1 (free when asked; the child binds it next).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Finds `program` on `PATH` or in `~/.cargo/bin`.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(program)).find(|p| p.is_file())
}

/// A child process serving on `port`, restartable with the same arguments.
pub(crate) struct ChildProcess {
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    cwd: Option<PathBuf>,
    pub(crate) port: u16,
    child: Option<Child>,
}

impl ChildProcess {
    pub(crate) fn new(
        program: PathBuf,
        args: Vec<String>,
        envs: Vec<(String, String)>,
        log: PathBuf,
        port: u16,
    ) -> Self {
        ChildProcess { program, args, envs, log, cwd: None, port, child: None }
    }

    /// Runs the child in `dir` (for programs that resolve paths against it).
    pub(crate) fn in_dir(mut self, dir: PathBuf) -> Self {
        self.cwd = Some(dir);
        self
    }

    /// Starts the child and waits until `ready` says yes.
    pub(crate) fn start(&mut self, timeout: Duration, ready: impl Fn(u16) -> bool) -> Result<(), InfraError> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut command = Command::new(&self.program);
        // The child dies with us even when we are killed without unwinding.
        // SAFETY: prctl is async-signal-safe and touches no parent state.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        if let Some(dir) = &self.cwd {
            command.current_dir(dir);
        }
        // Brokers export their own telemetry if they see our OTLP endpoint;
        // what arrives there should be Nexus's spans only.
        command.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        let child = command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|source| InfraError::Spawn { program: self.program.display().to_string(), source })?;
        self.child = Some(child);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if ready(self.port) {
                return Ok(());
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        Err(InfraError::NotReady {
            program: self.program.display().to_string(),
            port: self.port,
            secs: timeout.as_secs(),
            log: self.log.display().to_string(),
            tail: log_tail(&self.log),
        })
    }

    /// Kills the child (as a crash would) and waits for it to exit.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub(crate) fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// How much of a child's log an error carries.
const TAIL_BYTES: u64 = 2048;

/// The last [`TAIL_BYTES`] of `log` (from a line start where one falls inside
/// them), or a note saying why there are none.
fn log_tail(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(log)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes);
        // Drop the cut-off first line, unless it is the only one.
        let body = text.strip_suffix('\n').unwrap_or(&text);
        let start = if len > TAIL_BYTES { body.find('\n').map_or(0, |i| i + 1) } else { 0 };
        Ok(text[start..].to_string())
    };
    match read() {
        Ok(tail) if tail.trim().is_empty() => "(the log is empty)".into(),
        Ok(tail) => tail,
        Err(e) => format!("(the log could not be read: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nexus-process-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_child_that_exits_before_it_is_ready_is_reported_with_its_log_tail() {
        let dir = scratch("tail");
        let log = dir.join("child.log");
        let noise = "x".repeat(TAIL_BYTES as usize);
        let script = format!("echo {noise}; echo 'cannot bind: address in use'; exit 3");
        let mut child =
            ChildProcess::new("/bin/sh".into(), vec!["-c".into(), script], Vec::new(), log, free_port().unwrap());
        let error = child.start(Duration::from_secs(10), |_| false).unwrap_err().to_string();
        assert!(error.ends_with("which ends:\ncannot bind: address in use\n"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_log_whose_last_line_is_longer_than_the_tail_still_shows_it() {
        let dir = scratch("long");
        let log = dir.join("child.log");
        std::fs::write(&log, format!("first\n{}\n", "y".repeat(2 * TAIL_BYTES as usize))).unwrap();
        let tail = log_tail(&log);
        assert_eq!(tail.len(), TAIL_BYTES as usize, "{tail}");
        assert!(tail.trim_end().chars().all(|c| c == 'y'), "{tail}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
