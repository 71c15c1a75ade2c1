//! Network namespaces: a panel instance's private network, like a Pod's.
//!
//! [`Netns`] creates and deletes a named namespace (`/run/netns/<name>`,
//! through iproute2, as `ip netns add` would) with only loopback up, so
//! whatever runs inside sees nothing but its own `127.0.0.1`.
//!
//! [`NetnsThread`] lets trusted processes (the sidecar, the watchdog) keep
//! their bus connections outside while they open listeners and connections
//! inside: one thread enters the namespace with `setns(2)` and creates
//! sockets there; a socket stays in the namespace it was created in,
//! whichever thread uses it afterwards. This module never runs user code.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;

/// Why a namespace could not be made, entered or used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Not root, or iproute2's `ip` is missing.
    #[error("network namespaces need root and iproute2's `ip`")]
    Unsupported,
    /// `ip` could not be run.
    #[error("running `ip {args}`: {source}")]
    Spawn {
        /// Its arguments.
        args: String,
        /// Why it did not run.
        source: io::Error,
    },
    /// `ip` ran and failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// Its arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
    /// `setns(2)` into the namespace failed.
    #[error("entering the network namespace {path}: {source}")]
    Enter {
        /// The namespace.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The thread inside the namespace is gone.
    #[error("the namespace thread of {0} has stopped")]
    Stopped(PathBuf),
}

/// Whether this process can create network namespaces (root and `ip`).
pub fn supported() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && crate::infra::find_program("ip").is_some()
}

/// A named network namespace with only loopback up.
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` (replacing a stale one left by a crash) and brings its
    /// loopback up.
    pub fn create(name: &str) -> Result<Netns, NetnsError> {
        if !supported() {
            return Err(NetnsError::Unsupported);
        }
        let netns = Netns { name: name.to_owned() };
        if netns.path().exists() {
            let _ = ip(&["netns", "delete", name]);
        }
        ip(&["netns", "add", name])?;
        if let Err(error) = ip(&["-n", name, "link", "set", "lo", "up"]) {
            let _ = ip(&["netns", "delete", name]);
            return Err(error);
        }
        Ok(netns)
    }

    /// The namespace `name` if it exists (after a restart of its owner).
    pub fn existing(name: &str) -> Option<Netns> {
        let netns = Netns { name: name.to_owned() };
        netns.path().exists().then_some(netns)
    }

    /// The namespace's name (`/run/netns/<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what `nsenter --net=` and `--netns` take.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Deletes the namespace; processes still inside keep it alive until
    /// they exit.
    pub fn delete(&self) -> Result<(), NetnsError> {
        ip(&["netns", "delete", &self.name])
    }
}

fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let output =
        Command::new("ip").args(args).output().map_err(|source| NetnsError::Spawn { args: args.join(" "), source })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Ip { args: args.join(" "), stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned() })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread inside a network namespace that creates sockets there.
///
/// Cheap to clone; the thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct NetnsThread {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

impl NetnsThread {
    /// Starts a thread that enters the namespace at `path`.
    pub fn enter(path: &Path) -> Result<NetnsThread, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Enter { path: path.to_owned(), source })?;
        let (jobs, receive) = mpsc::channel::<Job>();
        let (entered, entered_rx) = mpsc::channel();
        let name = format!("netns-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("?"));
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                // SAFETY: setns on an open namespace fd affects only this
                // thread, which from here on only creates sockets.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                let ok = rc == 0;
                let _ = entered.send(if ok { Ok(()) } else { Err(io::Error::last_os_error()) });
                if ok {
                    while let Ok(job) = receive.recv() {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Enter { path: path.to_owned(), source })?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(NetnsThread { path: path.to_owned(), jobs }),
            Ok(Err(source)) => Err(NetnsError::Enter { path: path.to_owned(), source }),
            Err(_) => Err(NetnsError::Stopped(path.to_owned())),
        }
    }

    /// Runs `f` on the thread inside the namespace and returns its result.
    /// Blocks the caller only for as long as `f` runs.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        let (done, result) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        self.jobs.send(job).map_err(|_| NetnsError::Stopped(self.path.clone()))?;
        result.recv().map_err(|_| NetnsError::Stopped(self.path.clone()))
    }

    /// A listener bound inside the namespace.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.run(move || TcpListener::bind(addr)).map_err(io::Error::other)?
    }

    /// A listener bound inside the namespace when there is one, else on the
    /// host: how the sidecar and the watchdog open their endpoints.
    pub fn bind_in(inside: Option<&NetnsThread>, addr: SocketAddr) -> io::Result<TcpListener> {
        match inside {
            Some(inside) => inside.bind(addr),
            None => TcpListener::bind(addr),
        }
    }

    /// The listener the process was handed as descriptor `fd` (bound, where
    /// it was bound, by whoever started it), checked to listen on `addr`.
    /// How the sidecar and the watchdog take the endpoints the local driver
    /// bound for them before any panel code ran.
    pub fn handed_over(fd: i32, addr: SocketAddr) -> io::Result<TcpListener> {
        use std::os::fd::FromRawFd;
        // SAFETY: fstat only reads into a plain struct; a bad fd is EBADF.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if fd < 3 || unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(io::Error::other(format!("descriptor {fd} is not a handed-over socket")));
        }
        // SAFETY: the descriptor is open, a socket, and taken once: the
        // listener owns it from here on.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        let bound = listener.local_addr()?;
        if bound != addr {
            return Err(io::Error::other(format!("the handed-over socket listens on {bound}, not {addr}")));
        }
        Ok(listener)
    }

    /// A connection opened inside the namespace, ready for tokio
    /// (non-blocking). Loopback connects finish at once, so the blocking
    /// connect never holds the thread for long.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = self.run(move || TcpStream::connect(addr)).map_err(io::Error::other)??;
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_inside_is_unreachable_from_outside_and_reachable_inside() {
        if !supported() {
            // The lib's tests cannot use nexus-testkit: the same rule inline.
            // Under CI a missing prerequisite is a broken machine, not a pass.
            assert!(std::env::var_os("CI").is_none(), "prerequisite missing under CI: root and iproute2's `ip`");
            eprintln!("SKIPPED (not under CI): network namespaces need root and iproute2");
            return;
        }
        let name = format!("nexus-test-{}", std::process::id());
        let netns = Netns::create(&name).expect("create");
        let inside = NetnsThread::enter(&netns.path()).expect("enter");
        let listener = inside.bind("127.0.0.1:0".parse().unwrap()).expect("bind inside");
        let addr = listener.local_addr().unwrap();
        // Another process may listen on the same port outside and take the
        // connection: what matters is whether this listener ever sees it.
        let _outside = TcpStream::connect(addr);
        std::thread::sleep(std::time::Duration::from_millis(100));
        listener.set_nonblocking(true).unwrap();
        let reached_from_outside = listener.accept().is_ok();
        let from_inside = inside.connect(addr);
        netns.delete().expect("delete");
        assert!(!reached_from_outside, "a listener inside the namespace answered from outside");
        assert!(from_inside.is_ok(), "connecting inside failed: {from_inside:?}");
    }

    #[test]
    fn only_a_listener_on_the_named_address_is_taken_as_handed_over() {
        use std::os::fd::IntoRawFd;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let fd = listener.into_raw_fd();
        let refused = NetnsThread::handed_over(fd, other);
        assert!(refused.is_err_and(|e| e.to_string().contains("not 127.0.0.1:1")), "another address is refused");
        let file = File::open("/dev/null").expect("a file");
        let refused = NetnsThread::handed_over(file.as_raw_fd(), addr);
        assert!(refused.is_err_and(|e| e.to_string().contains("not a handed-over socket")), "a file is refused");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let taken = NetnsThread::handed_over(listener.into_raw_fd(), addr).expect("its own address");
        assert_eq!(taken.local_addr().unwrap(), addr);
    }
}
