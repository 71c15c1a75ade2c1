//! What the sandbox tests share: the probe panel, the driver over a
//! redis-server of the test's own, panel records, and the cleanup of
//! namespaces a failed test leaves.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_actors::instance::InstanceMode;
use nexus_actors::platform::{Panel, PanelMode, PanelRecords};
use nexus_actors::roles::panel_manager::driver::{Code, InstanceSpec, RuntimeDriver};
use nexus_actors::roles::panel_manager::local::{netns_name, LocalConfig, LocalDriver, SandboxChoice};
use nexus_testkit::{prerequisite, Brokers};
use serde_json::Value;

use super::common;

/// A panel that reports, from where it runs, what it can reach.
pub(crate) const PROBE_PANEL: &str = r#"
import ctypes, json, os, socket, subprocess, sys, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/probe":
            try:
                socket.create_connection((q["host"], int(q["port"])), timeout=3).close()
                out = {"connected": True}
            except OSError as e:
                out = {"connected": False, "error": str(e)}
        elif url.path == "/sidecar":
            health = os.environ["NEXUS_PROXY_URL"].rsplit("/", 1)[0] + "/healthz"
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(health, timeout=3) as r:
                    out = {"status": r.status}
            except OSError as e:
                out = {"status": 0, "error": str(e)}
        elif url.path == "/kernel":
            buf = ctypes.create_string_buffer(1 << 16)
            n = ctypes.CDLL(None).klogctl(3, buf, len(buf))
            out = {"version": open("/proc/version").read(), "dmesg": buf.raw[:max(n, 0)].decode(errors="replace")}
        elif url.path == "/whoami":
            out = {"uid": os.getuid(), "cwd": os.getcwd(), "env": dict(os.environ)}
        elif url.path == "/pdeathsig":
            out = {"signal": PDEATHSIG}
        elif url.path == "/read":
            try:
                with open(q["name"]) as f:
                    out = {"text": f.read()}
            except OSError as e:
                out = {"error": str(e)}
        elif url.path == "/write":
            with open(q["name"], "w") as f:
                f.write("written by the panel")
            out = {"written": q["name"]}
        elif url.path == "/exists":
            out = {"exists": os.path.exists(q["name"])}
        elif url.path == "/list":
            try:
                out = {"entries": os.listdir(q["name"])}
            except OSError as e:
                out = {"error": str(e)}
        elif url.path == "/escape":
            child = subprocess.Popen(["sleep", q["seconds"]], start_new_session=True)
            # Popen returns once exec has begun, before the kernel has set
            # the new command line; answer only once others can see it.
            for _ in range(500):
                with open(f"/proc/{child.pid}/cmdline", "rb") as f:
                    if q["seconds"].encode() in f.read():
                        break
                time.sleep(0.01)
            out = {"spawned": True}
        else:
            out = {"error": "not found"}
        body = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

# Per thread: read in the main thread, the one the driver started.
_sig = ctypes.c_int(0)
ctypes.CDLL(None).prctl(2, ctypes.byref(_sig))  # PR_GET_PDEATHSIG
PDEATHSIG = _sig.value

print("probe panel up", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
"#;

pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Whether `test` cannot run here: the sandbox tests need root (under
/// `CI` its absence fails the test).
pub(crate) fn skipped(test: &str) -> bool {
    !prerequisite(is_root(), &format!("{test}: the sandbox tests need root (network namespaces, runsc)"))
}

/// A fresh panel id: panel records (which the sidecar reads) are UUIDs.
pub(crate) use nexus_testkit::panel_id;

/// Deletes the namespaces of the instances a test started, and the
/// processes in them, even when the test fails half-way.
pub(crate) struct Cleanup {
    pub(crate) instances: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for instance in &self.instances {
            delete_namespace(&netns_name(instance));
        }
    }
}

/// Kills whatever runs in the namespace `name` and deletes it, if it exists.
pub(crate) fn delete_namespace(name: &str) {
    let path = Path::new("/run/netns").join(name);
    if !path.exists() {
        return;
    }
    for pid in namespace_members(&path) {
        let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let _ = std::process::Command::new("ip").args(["netns", "delete", name]).status();
}

pub(crate) fn namespace_members(netns: &Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(inode) = std::fs::metadata(netns).map(|m| m.ino()) else { return Vec::new() };
    let wanted = format!("net:[{inode}]");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l.as_os_str() == wanted.as_str()))
        .collect()
}

/// Host processes whose command line mentions `needle`.
pub(crate) fn processes_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then(|| format!("{pid}: {cmdline}"))
        })
        .collect()
}

pub(crate) struct Env {
    pub(crate) _unmount: Unmount,
    pub(crate) dir: PathBuf,
    pub(crate) _brokers: Brokers,
    pub(crate) redis_port: u16,
    pub(crate) redis_url: String,
    pub(crate) driver: Arc<LocalDriver>,
}

/// A driver mounts volumes under its data directory: dropped, this
/// unmounts them and deletes the directory, even when the test fails
/// half-way.
pub(crate) struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        unmount_under(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Detaches every mount below `dir`.
pub(crate) fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for point in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
        if Path::new(point).starts_with(dir) {
            let _ = std::process::Command::new("umount").args(["-l", point]).status();
        }
    }
}

pub(crate) fn env(test: &str, sandbox: SandboxChoice) -> Env {
    env_with(test, sandbox, |_| {})
}

/// [`env`] with the driver's configuration changed by `change`.
pub(crate) fn env_with(test: &str, sandbox: SandboxChoice, change: impl FnOnce(&mut LocalConfig)) -> Env {
    let brokers = Brokers::redis(&format!("sandbox-{test}"));
    let dir = brokers.dir.clone();
    let nexus = PathBuf::from(env!("CARGO_BIN_EXE_nexus"));
    let mut config = LocalConfig::new(dir.join("data"), nexus, brokers.redis_url(), sandbox);
    change(&mut config);
    let (redis_port, redis_url) = (brokers.redis.port(), brokers.redis_url());
    Env {
        _unmount: Unmount(dir.clone()),
        dir,
        redis_port,
        redis_url,
        _brokers: brokers,
        driver: Arc::new(LocalDriver::new(config)),
    }
}

/// Whether what `choice` needs is installed (under `CI` its absence fails
/// the test): runsc for gVisor, bwrap for namespaces, nft for the rules.
pub(crate) fn sandbox_available(choice: SandboxChoice) -> bool {
    let tool = match choice {
        SandboxChoice::Gvisor => Some("runsc"),
        SandboxChoice::Namespaces => Some("bwrap"),
        _ => None,
    };
    tool.into_iter().chain(["nft"]).all(|tool| {
        let what = format!("{tool} for the sandbox tests (scripts/test installs it)");
        prerequisite(nexus_actors::infra::find_program(tool).is_some(), &what)
    })
}

pub(crate) fn spec(instance: &str, panel: &str, code: Code) -> InstanceSpec {
    let mode = match code {
        Code::Studio(_) => InstanceMode::Studio,
        Code::App(_) => InstanceMode::App,
    };
    InstanceSpec {
        instance: instance.to_owned(),
        panel: panel.to_owned(),
        owner: "owner".into(),
        mode,
        code,
        watchdog_timeout: Some(Duration::from_secs(600)),
    }
}

/// A GET to the panel through its host endpoint, retried while it starts.
pub(crate) fn get_json(addr: &str, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, body)) = common::get_at(addr, path) {
            return serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        }
        assert!(Instant::now() < deadline, "the panel at {addr} did not answer {path} within 60s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn probe(addr: &str, host: &str, port: u16) -> Value {
    get_json(addr, &format!("/probe?host={host}&port={port}"))
}

/// This machine's first non-loopback IPv4 address (routing only, no packet sent).
pub(crate) fn host_ip() -> Option<String> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then(|| ip.to_string())
}

pub(crate) fn write_probe_panel(code: &Path) {
    std::fs::write(code.join("server.py"), PROBE_PANEL).unwrap();
}

/// The panel record its sidecar reads at start (the transaction manager
/// writes it when a user creates a panel).
pub(crate) async fn register(redis_url: &str, panel: &str) {
    let record = Panel {
        id: panel.to_owned(),
        name: "sandboxed".into(),
        owner: "owner".into(),
        mode: PanelMode::Studio,
        source: "template:python_minimal".into(),
        public: false,
    };
    PanelRecords::connect(redis_url).await.unwrap().put(&record).await.expect("panel record written");
}

pub(crate) async fn volume_with_probe(driver: &LocalDriver, redis_url: &str, panel: &str) -> Code {
    register(redis_url, panel).await;
    let volume = driver.volume(panel, "template:python_minimal").await.expect("volume");
    write_probe_panel(volume.location.path());
    Code::Studio(volume)
}
