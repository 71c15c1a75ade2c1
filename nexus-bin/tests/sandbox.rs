//! The `local` driver's sandbox with real parts only: a real redis-server,
//! the real `nexus sidecar` and `nexus watchdog`, real network namespaces,
//! and runsc when it is installed. A probe panel (written into the Studio
//! volume by the test) tries TCP connections from INSIDE the sandbox and
//! reports what happened; the test decides what must fail.
//!
//! Needs root (CI runs as root); without it every test prints SKIPPED, and
//! fails when `CI` is set: a skip there would mean isolation went unchecked.

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_actors::infra::{find_program, RedisServer};
use nexus_actors::instance::{InstanceMode, Isolation};
use nexus_actors::roles::panel_manager::driver::{
    Code, DriverError, InstanceEvent, InstanceSpec, RuntimeDriver, Started,
};
use nexus_actors::roles::panel_manager::local::{netns_name, LocalConfig, LocalDriver, SandboxChoice};
use nexus_actors::roles::transaction_manager::store::{Panel, PanelMode, Store};
use serde_json::Value;

mod common;

/// A panel that reports, from where it runs, what it can reach.
const PROBE_PANEL: &str = r#"
import ctypes, json, os, socket, subprocess, sys, urllib.request
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
        elif url.path == "/escape":
            subprocess.Popen(["sleep", q["seconds"]], start_new_session=True)
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

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

fn skipped(test: &str) -> bool {
    if is_root() {
        return false;
    }
    assert!(std::env::var_os("CI").is_none(), "{test}: CI is set but the sandbox tests are not running as root");
    eprintln!("\n\n*** SKIPPED {test}: the sandbox tests need root (network namespaces, runsc) ***\n\n");
    true
}

/// Deletes the namespaces of the instances a test started, and the
/// processes in them, even when the test fails half-way.
struct Cleanup {
    instances: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for instance in &self.instances {
            let name = netns_name(instance);
            let path = Path::new("/run/netns").join(&name);
            if !path.exists() {
                continue;
            }
            for pid in namespace_members(&path) {
                let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            let _ = std::process::Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}

fn namespace_members(netns: &Path) -> Vec<i32> {
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
fn processes_mentioning(needle: &str) -> Vec<String> {
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

struct Env {
    dir: PathBuf,
    _redis: RedisServer,
    redis_port: u16,
    redis_url: String,
    driver: Arc<LocalDriver>,
}

fn env(test: &str, sandbox: SandboxChoice) -> Env {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-sandbox-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let redis = RedisServer::start(&dir.join("redis"), false).expect("redis-server starts");
    let driver = LocalDriver::new(LocalConfig {
        data_dir: dir.join("data"),
        nexus_bin: PathBuf::from(env!("CARGO_BIN_EXE_nexus")),
        redis_url: redis.url(),
        sandbox,
    });
    Env { dir, redis_port: redis.port(), redis_url: redis.url(), _redis: redis, driver: Arc::new(driver) }
}

fn spec(instance: &str, panel: &str, code: Code) -> InstanceSpec {
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
fn get_json(addr: &str, path: &str) -> Value {
    let port: u16 = addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("host:port");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, body)) = common::get(port, path) {
            return serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        }
        assert!(Instant::now() < deadline, "the panel at {addr} did not answer {path} within 60s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn probe(addr: &str, host: &str, port: u16) -> Value {
    get_json(addr, &format!("/probe?host={host}&port={port}"))
}

/// This machine's first non-loopback IPv4 address (routing only, no packet sent).
fn host_ip() -> Option<String> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then(|| ip.to_string())
}

fn write_probe_panel(code: &Path) {
    std::fs::write(code.join("server.py"), PROBE_PANEL).unwrap();
}

/// The panel record its sidecar reads at start (the transaction manager
/// writes it when a user creates a panel).
async fn register(redis_url: &str, panel: &str) {
    let record = Panel {
        id: panel.to_owned(),
        name: panel.to_owned(),
        owner: "owner".into(),
        mode: PanelMode::Studio,
        source: "template:python_minimal".into(),
    };
    Store::connect(redis_url).await.unwrap().put_panel(&record).await.expect("panel record written");
}

async fn volume_with_probe(driver: &LocalDriver, redis_url: &str, panel: &str) -> Code {
    register(redis_url, panel).await;
    let volume = driver.volume(panel, "template:python_minimal").await.expect("volume");
    write_probe_panel(&volume.location);
    Code::Studio(volume)
}

#[test]
fn a_studio_instance_reaches_its_sidecar_and_nothing_else() {
    if skipped("a_studio_instance_reaches_its_sidecar_and_nothing_else") {
        return;
    }
    let env = env("isolated", SandboxChoice::Auto);
    let id = std::process::id();
    let (a, b) = (format!("probe-{id}"), format!("other-{id}"));
    let mut cleanup = Cleanup { instances: vec![a.clone(), b.clone()] };
    // The "system plane": a listener on every host address.
    let system_plane = TcpListener::bind("0.0.0.0:0").unwrap();
    let system_port = system_plane.local_addr().unwrap().port();
    let host_ip = host_ip();
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, "probepanel").await;
        let started: Started = driver.start(spec(&a, "probepanel", code)).await.expect("start the probe panel");
        register(&env.redis_url, "otherpanel").await;
        let other_volume = driver.volume("otherpanel", "template:python_minimal").await.unwrap();
        let other = driver.start(spec(&b, "otherpanel", Code::Studio(other_volume))).await.expect("start another");
        let addr = started.endpoint.addr.clone();
        assert!(started.endpoint.watchdog.is_some(), "a Studio instance has a watchdog endpoint");

        // What the probe must not reach, each first shown reachable from the host.
        let other_port: u16 = other.endpoint.addr.rsplit(':').next().unwrap().parse().unwrap();
        get_json(&other.endpoint.addr, "/manifest");
        let mut forbidden = vec![
            ("127.0.0.1".to_owned(), env.redis_port, "the test's redis"),
            ("127.0.0.1".to_owned(), system_port, "the system plane on loopback"),
            ("127.0.0.1".to_owned(), other_port, "another panel's endpoint"),
        ];
        if TcpStream::connect(("127.0.0.1", 6379)).is_ok() {
            forbidden.push(("127.0.0.1".to_owned(), 6379, "the shared redis"));
        }
        if let Some(ip) = &host_ip {
            assert!(TcpStream::connect((ip.as_str(), system_port)).is_ok(), "the host reaches {ip}:{system_port}");
            forbidden.push((ip.clone(), system_port, "the system plane on the host's address"));
        } else {
            eprintln!("no non-loopback host address: that probe is left out");
        }
        for (host, port, what) in &forbidden {
            assert!(TcpStream::connect((host.as_str(), *port)).is_ok(), "{what} is reachable from the host");
        }
        forbidden.push(("169.254.169.254".to_owned(), 80, "the metadata address"));
        forbidden.push(("10.0.0.1".to_owned(), 80, "a private range"));
        forbidden.push(("192.168.0.1".to_owned(), 80, "a private range"));
        for (host, port, what) in &forbidden {
            let answer = probe(&addr, host, *port);
            assert_eq!(answer["connected"], false, "the panel reached {what} ({host}:{port}): {answer}");
        }

        // Its own sidecar works, from inside, where the panel expects it.
        let sidecar = get_json(&addr, "/sidecar");
        assert_eq!(sidecar["status"], 200, "the panel's own sidecar answers /healthz: {sidecar}");
        assert_eq!(probe(&addr, "127.0.0.1", 3500)["connected"], true);
        let watchdog = get_json(started.endpoint.watchdog.as_deref().unwrap(), "/healthz");
        assert_eq!(watchdog["instance"], a.as_str(), "the watchdog answers through its forward: {watchdog}");
        let whoami = get_json(&addr, "/whoami");
        assert_ne!(whoami["uid"], 0, "panel code never runs as root: {whoami}");

        let kernel = get_json(&addr, "/kernel");
        if find_program("runsc").is_some() {
            assert_eq!(started.isolation, Isolation::Gvisor, "runsc is installed: Auto must pick gVisor");
            assert!(started.warning.is_none(), "{:?}", started.warning);
            let dmesg = kernel["dmesg"].as_str().unwrap_or_default();
            assert!(dmesg.contains("Starting gVisor"), "the panel runs under gVisor: {kernel}");
        } else {
            eprintln!("runsc is not installed: the gVisor assertions are left out");
            assert_eq!(started.isolation, Isolation::Process);
            assert!(started.warning.is_some(), "a fallback to a plain process is announced");
        }

        for instance in [&a, &b] {
            driver.stop(instance, Duration::from_secs(5)).await.expect("stop");
            assert!(!Path::new("/run/netns").join(netns_name(instance)).exists(), "the namespace is deleted");
            assert_eq!(processes_mentioning(instance), Vec::<String>::new(), "nothing of {instance} runs");
        }
        let logs = driver.logs(&a, 50).await.expect("logs outlive the instance");
        assert!(logs.iter().any(|l| l.contains("probe panel up")), "{logs:?}");
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

#[test]
fn a_plain_process_sandbox_isolates_too_and_stop_kills_what_escaped_its_group() {
    if skipped("a_plain_process_sandbox_isolates_too_and_stop_kills_what_escaped_its_group") {
        return;
    }
    let env = env("process", SandboxChoice::Process);
    let instance = format!("process-{}", std::process::id());
    let mut cleanup = Cleanup { instances: vec![instance.clone()] };
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, "processpanel").await;
        let started = driver.start(spec(&instance, "processpanel", code)).await.expect("start");
        assert_eq!(started.isolation, Isolation::Process);
        assert!(started.warning.as_deref().is_some_and(|w| w.contains("weaker")), "{:?}", started.warning);
        let addr = started.endpoint.addr.clone();
        assert_eq!(probe(&addr, "127.0.0.1", env.redis_port)["connected"], false, "redis from a process sandbox");
        assert_eq!(get_json(&addr, "/sidecar")["status"], 200);
        let whoami = get_json(&addr, "/whoami");
        assert_ne!(whoami["uid"], 0);
        // Set after setuid (which clears it): the panel dies with nexus.
        assert_eq!(get_json(&addr, "/pdeathsig")["signal"], 9, "PR_SET_PDEATHSIG survives the uid change");

        // Secrets: the watchdog's token and the Redis URL are on no command
        // line (any local uid reads those) and not in the panel's environment.
        let token = started.endpoint.watchdog_token.clone().expect("a Studio instance has a watchdog token");
        assert!(token.len() >= 32 && token.chars().all(|c| c.is_ascii_alphanumeric()), "{token}");
        for secret in [token.as_str(), env.redis_url.as_str()] {
            assert_eq!(processes_mentioning(secret), Vec::<String>::new(), "a command line holds a secret");
            assert!(!whoami["env"].to_string().contains(secret), "the panel's environment holds a secret: {whoami}");
        }
        let helper_env = |name: &str| {
            let helper = processes_mentioning(&instance).into_iter().find(|p| p.contains(&format!(" {name} ")));
            let pid = helper.unwrap_or_else(|| panic!("no {name}")).split(':').next().unwrap().to_owned();
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap()).replace('\0', "\n")
        };
        let watchdog_env = helper_env("watchdog");
        assert!(watchdog_env.lines().any(|l| l == format!("NEXUS_WATCHDOG_TOKEN={token}")), "the watchdog has it");
        assert!(watchdog_env.lines().any(|l| l == format!("REDIS_URL={}", env.redis_url)));
        assert!(helper_env("sidecar").lines().any(|l| l == format!("REDIS_URL={}", env.redis_url)));

        // The sidecar is ours: when it dies the driver starts it again.
        let sidecars: Vec<String> =
            processes_mentioning(&instance).into_iter().filter(|p| p.contains(" sidecar ")).collect();
        assert_eq!(sidecars.len(), 1, "{sidecars:?}");
        let pid = sidecars[0].split(':').next().unwrap().to_owned();
        assert!(std::process::Command::new("kill").args(["-9", &pid]).status().unwrap().success());
        // Waits without blocking: the driver's supervisors run on this thread.
        let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let restarted = processes_mentioning(&instance)
                .iter()
                .any(|p| p.contains(" sidecar ") && !p.starts_with(&format!("{pid}:")));
            let answer = common::get(port, "/sidecar").and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok());
            if restarted && answer.is_some_and(|a| a["status"] == 200) {
                break;
            }
            assert!(Instant::now() < deadline, "the sidecar was not restarted");
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }

        // A child in a new session leaves the process group; stop finds it
        // through the namespace.
        let marker = format!("4242.{}", std::process::id());
        get_json(&addr, &format!("/escape?seconds={marker}"));
        assert_eq!(processes_mentioning(&marker).len(), 1, "the escaped sleep runs");
        driver.stop(&instance, Duration::from_secs(5)).await.expect("stop");
        assert_eq!(processes_mentioning(&marker), Vec::<String>::new(), "the escaped process is gone");
        assert_eq!(processes_mentioning(&instance), Vec::<String>::new());
        assert!(!Path::new("/run/netns").join(netns_name(&instance)).exists());
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

#[test]
fn studio_files_persist_across_restarts_and_app_files_do_not() {
    if skipped("studio_files_persist_across_restarts_and_app_files_do_not") {
        return;
    }
    let env = env("storage", SandboxChoice::Auto);
    let id = std::process::id();
    let (s1, s2, a1, a2) = (format!("s1-{id}"), format!("s2-{id}"), format!("a1-{id}"), format!("a2-{id}"));
    let mut cleanup = Cleanup { instances: vec![s1.clone(), s2.clone(), a1.clone(), a2.clone()] };
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, "storagepanel").await;
        let studio = driver.start(spec(&s1, "storagepanel", code.clone())).await.expect("start Studio");
        get_json(&studio.endpoint.addr, "/write?name=kept.txt");
        driver.stop(&s1, Duration::from_secs(5)).await.unwrap();
        let studio = driver.start(spec(&s2, "storagepanel", code)).await.expect("start Studio again");
        assert_eq!(get_json(&studio.endpoint.addr, "/exists?name=kept.txt")["exists"], true, "the volume persists");
        driver.stop(&s2, Duration::from_secs(5)).await.unwrap();

        // The snapshot is taken from the volume (the probe panel, kept.txt)
        // and is read-only.
        let snapshot = driver.snapshot("storagepanel", "template:python_minimal").await.expect("snapshot");
        assert_eq!(snapshot.version, 1);
        assert!(snapshot.location.join("kept.txt").exists());
        for path in [snapshot.location.clone(), snapshot.location.join("server.py")] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o222, 0, "{} is writable: {mode:o}", path.display());
        }
        let second = driver.snapshot("storagepanel", "template:python_minimal").await.unwrap();
        assert_eq!(second.version, 2, "every snapshot gets the next version");

        let app = driver.start(spec(&a1, "storagepanel", Code::App(snapshot.clone()))).await.expect("start App");
        assert!(app.endpoint.watchdog.is_none(), "an App has no watchdog");
        assert!(app.endpoint.watchdog_token.is_none(), "an App has no watchdog token");
        get_json(&app.endpoint.addr, "/write?name=scratch.txt");
        assert_eq!(get_json(&app.endpoint.addr, "/exists?name=scratch.txt")["exists"], true);
        driver.restart(&a1).await.expect("restart the App's process");
        assert_eq!(
            get_json(&app.endpoint.addr, "/exists?name=scratch.txt")["exists"],
            false,
            "a restarted App starts from its snapshot"
        );
        get_json(&app.endpoint.addr, "/write?name=scratch.txt");
        driver.stop(&a1, Duration::from_secs(5)).await.unwrap();
        let app = driver.start(spec(&a2, "storagepanel", Code::App(snapshot.clone()))).await.unwrap();
        assert_eq!(get_json(&app.endpoint.addr, "/exists?name=scratch.txt")["exists"], false);
        assert!(!snapshot.location.join("scratch.txt").exists(), "nothing reached the snapshot");
        driver.stop(&a2, Duration::from_secs(5)).await.unwrap();

        driver.forget("storagepanel").await.expect("forget");
        assert!(!snapshot.location.exists(), "forget deletes the snapshots");
        let fresh = driver.volume("storagepanel", "template:python_minimal").await.unwrap();
        assert!(!fresh.location.join("kept.txt").exists(), "forget deleted the volume");
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

#[test]
fn a_user_process_that_exits_is_reported_and_its_output_is_in_the_logs() {
    if skipped("a_user_process_that_exits_is_reported_and_its_output_is_in_the_logs") {
        return;
    }
    let env = env("exits", SandboxChoice::Auto);
    let instance = format!("exits-{}", std::process::id());
    let mut cleanup = Cleanup { instances: vec![instance.clone()] };
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        register(&env.redis_url, "exitpanel").await;
        let volume = driver.volume("exitpanel", "template:python_minimal").await.unwrap();
        let command = r#"{"command": ["python3", "-c", "print('hello from the panel'); raise SystemExit(7)"]}"#;
        std::fs::write(volume.location.join("nexus-panel.json"), command).unwrap();
        let mut started = driver.start(spec(&instance, "exitpanel", Code::Studio(volume))).await.expect("start");
        let event = actix_rt::time::timeout(Duration::from_secs(60), started.events.recv()).await.expect("an event");
        assert_eq!(event, Some(InstanceEvent::Exited { code: Some(7) }));
        let logs = driver.logs(&instance, 10).await.unwrap();
        assert!(logs.iter().any(|l| l == "hello from the panel"), "{logs:?}");

        driver.restart(&instance).await.expect("restart");
        let event = actix_rt::time::timeout(Duration::from_secs(60), started.events.recv()).await.expect("an event");
        assert_eq!(event, Some(InstanceEvent::Exited { code: Some(7) }), "a restarted process is watched too");
        let logs = driver.logs(&instance, 10).await.unwrap();
        assert_eq!(logs.iter().filter(|l| *l == "hello from the panel").count(), 2, "{logs:?}");
        assert_eq!(driver.logs(&instance, 1).await.unwrap().len(), 1, "at most the lines asked for");

        driver.stop(&instance, Duration::from_secs(5)).await.expect("stop");
        assert!(matches!(driver.stop(&instance, Duration::ZERO).await, Err(DriverError::NoInstance(_))));
        assert!(matches!(driver.restart(&instance).await, Err(DriverError::NoInstance(_))));
        assert_eq!(processes_mentioning(&instance), Vec::<String>::new());
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

#[test]
fn unknown_sources_bad_ids_and_panels_without_a_command_are_refused() {
    // Runs without root too: every refusal comes before a namespace.
    let env = env("refused", SandboxChoice::Auto);
    let driver = env.driver.clone();
    let data = env.dir.join("data");
    actix_rt::System::new().block_on(async move {
        for source in ["/etc", "../../etc", "template:../python_minimal", "template:nope", "python_minimal", ""] {
            let volume = driver.volume("p1", source).await;
            assert!(matches!(volume, Err(DriverError::UnknownSource(..))), "{source:?}: {volume:?}");
            let snapshot = driver.snapshot("p1", source).await;
            assert!(matches!(snapshot, Err(DriverError::UnknownSource(..))), "{source:?}: {snapshot:?}");
        }
        assert!(!data.join("volumes/p1").exists(), "a refused source leaves no volume");
        for panel in ["../escape", "a/b", "", ".", "x y"] {
            let volume = driver.volume(panel, "template:python_minimal").await;
            assert!(matches!(volume, Err(DriverError::Io(_))), "panel {panel:?}: {volume:?}");
        }
        assert!(!data.join("escape").exists());

        let volume = driver.volume("nocommand", "template:python_minimal").await.unwrap();
        std::fs::remove_file(volume.location.join("nexus-panel.json")).unwrap();
        std::fs::remove_file(volume.location.join("server.py")).unwrap();
        let started = driver.start(spec("nocommand-1", "nocommand", Code::Studio(volume.clone()))).await;
        assert!(matches!(started, Err(DriverError::NoCommand)), "{:?}", started.err());
        std::fs::write(volume.location.join("nexus-panel.json"), r#"{"command": []}"#).unwrap();
        let started = driver.start(spec("nocommand-2", "nocommand", Code::Studio(volume.clone()))).await;
        assert!(matches!(started, Err(DriverError::Io(_))), "{:?}", started.err());
        std::fs::write(volume.location.join("nexus-panel.json"), "not json").unwrap();
        let started = driver.start(spec("nocommand-3", "nocommand", Code::Studio(volume))).await;
        assert!(matches!(started, Err(DriverError::Io(_))), "{:?}", started.err());
        assert!(matches!(driver.logs("nothing-here", 5).await, Err(DriverError::NoInstance(_))));
        assert!(matches!(driver.logs("../../etc", 5).await, Err(DriverError::Io(_))));
    });
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// A symlink in a volume stays a symlink in a snapshot: the driver never
/// reads the host file it points to.
#[test]
fn snapshots_copy_symlinks_without_following_them() {
    let env = env("symlinks", SandboxChoice::None);
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let volume = driver.volume("linkpanel", "template:python_minimal").await.unwrap();
        std::os::unix::fs::symlink("/etc/hostname", volume.location.join("host-file")).unwrap();
        let snapshot = driver.snapshot("linkpanel", "template:python_minimal").await.unwrap();
        let copied = std::fs::symlink_metadata(snapshot.location.join("host-file")).unwrap();
        assert!(copied.file_type().is_symlink(), "the symlink was followed and its target copied");
    });
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// Regular files under `root` (symlinks not followed) whose text holds `marker`.
fn files_containing(root: &Path, marker: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.is_file() && std::fs::read_to_string(&path).is_ok_and(|t| t.contains(marker)) {
                found.push(path);
            }
        }
    }
    found
}

/// The panel owns its volume and may swap any directory in it for a
/// symlink to a host path at any moment. Root copies the volume (snapshots)
/// and chowns it (every start) meanwhile: it must never read or chown
/// through such a symlink. A thread keeps swapping 40 directories with
/// symlinks to a root-only directory while the driver works; nothing of
/// that directory may reach a snapshot or change owner. (A path-based walk
/// loses this race within a few rounds.)
#[test]
fn root_never_copies_or_chowns_through_a_symlink_the_panel_swaps_in() {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    if skipped("root_never_copies_or_chowns_through_a_symlink_the_panel_swaps_in") {
        return;
    }
    let env = env("swap", SandboxChoice::Process);
    let (studio, app) = (format!("swap-s-{}", std::process::id()), format!("swap-a-{}", std::process::id()));
    let mut cleanup = Cleanup { instances: vec![studio.clone(), app.clone()] };
    let marker = format!("ROOT-ONLY-{}", std::process::id());
    let secret = env.dir.join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("secret.txt"), &marker).unwrap();
    std::fs::set_permissions(secret.join("secret.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let driver = env.driver.clone();
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &env.redis_url, "swappanel").await;
        let Code::Studio(volume) = &code else { unreachable!() };
        // A plain symlink to the root-only file: it stays a symlink the panel cannot read.
        std::os::unix::fs::symlink(secret.join("secret.txt"), volume.location.join("leak")).unwrap();
        let pairs = 40;
        for i in 0..pairs {
            let sub = volume.location.join(format!("sub{i}"));
            std::fs::create_dir(&sub).unwrap();
            std::fs::write(sub.join("plain.txt"), "the panel's own file").unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (stop, location, secret) = (stop.clone(), volume.location.clone(), secret.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for i in 0..pairs {
                        let (sub, real) = (location.join(format!("sub{i}")), location.join(format!(".real{i}")));
                        if std::fs::rename(&sub, &real).is_ok() {
                            let _ = std::os::unix::fs::symlink(&secret, &sub);
                            std::thread::yield_now();
                            let _ = std::fs::remove_file(&sub);
                            let _ = std::fs::rename(&real, &sub);
                        }
                    }
                }
            })
        };

        for _ in 0..3 {
            let started = driver.start(spec(&studio, "swappanel", code.clone())).await.expect("start Studio");
            let read = get_json(&started.endpoint.addr, "/read?name=leak");
            assert!(!read.to_string().contains(&marker), "the Studio panel read a root-only file: {read}");
            driver.stop(&studio, Duration::from_secs(5)).await.unwrap();
            for _ in 0..10 {
                let snapshot = driver.snapshot("swappanel", "template:python_minimal").await.expect("snapshot");
                let leaked = files_containing(&snapshot.location, &marker);
                assert_eq!(leaked, Vec::<PathBuf>::new(), "root copied a file through a swapped symlink");
            }
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        for path in [secret.clone(), secret.join("secret.txt")] {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (0, 0), "root chowned {} through a symlink", path.display());
        }
        assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o7777, 0o700);

        // The App's copy of a snapshot keeps the symlink, which its uid cannot follow.
        let snapshot = driver.snapshot("swappanel", "template:python_minimal").await.expect("snapshot");
        assert!(std::fs::symlink_metadata(snapshot.location.join("leak")).unwrap().file_type().is_symlink());
        let started = driver.start(spec(&app, "swappanel", Code::App(snapshot))).await.expect("start App");
        let read = get_json(&started.endpoint.addr, "/read?name=leak");
        assert!(read["error"].as_str().is_some_and(|e| e.contains("Permission denied")), "{read}");
        assert_eq!(get_json(&started.endpoint.addr, "/read?name=sub0/plain.txt")["text"], "the panel's own file");
        driver.stop(&app, Duration::from_secs(5)).await.unwrap();
    });
    cleanup.instances.clear();
    let _ = std::fs::remove_dir_all(&env.dir);
}

/// A driver that dies without stopping its instances leaves their
/// namespaces and whatever escaped into them; the next driver on the same
/// data dir deletes them, and leaves other nodes' namespaces alone.
#[test]
fn a_new_driver_sweeps_the_namespaces_a_crashed_one_left() {
    if skipped("a_new_driver_sweeps_the_namespaces_a_crashed_one_left") {
        return;
    }
    let env = env("sweep", SandboxChoice::Process);
    let (instance, foreign) = (format!("sweep-{}", std::process::id()), format!("foreign-{}", std::process::id()));
    // Also deletes the foreign namespace at the end.
    let cleanup = Cleanup { instances: vec![instance.clone(), foreign.clone()] };
    let Env { dir, _redis, redis_url, driver, .. } = env;
    let data_dir = dir.join("data");
    actix_rt::System::new().block_on(async move {
        let code = volume_with_probe(&driver, &redis_url, "sweeppanel").await;
        let started = driver.start(spec(&instance, "sweeppanel", code)).await.expect("start");
        let marker = format!("4343.{}", std::process::id());
        get_json(&started.endpoint.addr, &format!("/escape?seconds={marker}"));
        assert_eq!(processes_mentioning(&marker).len(), 1, "the escaped sleep runs");
        // Another node's instance: a namespace with no directory of ours.
        let added = std::process::Command::new("ip").args(["netns", "add", &netns_name(&foreign)]).status();
        assert!(added.unwrap().success());

        // The "crash": the driver is gone without a stop; its process
        // groups die with it, the namespace and the escaped sleep do not.
        drop(driver);
        actix_rt::time::sleep(Duration::from_secs(1)).await;
        let stale = Path::new("/run/netns").join(netns_name(&instance));
        assert!(stale.exists(), "the namespace outlived the driver");
        assert_eq!(processes_mentioning(&marker).len(), 1, "the escaped sleep outlived the driver");

        let next = LocalDriver::new(LocalConfig {
            data_dir,
            nexus_bin: PathBuf::from(env!("CARGO_BIN_EXE_nexus")),
            redis_url: redis_url.clone(),
            sandbox: SandboxChoice::Process,
        });
        assert_eq!(next.sweep_stale().await, 1, "exactly our stale namespace is swept");
        assert!(!stale.exists(), "the stale namespace is deleted");
        assert_eq!(processes_mentioning(&marker), Vec::<String>::new(), "what ran in it is killed");
        assert!(Path::new("/run/netns").join(netns_name(&foreign)).exists(), "another node's namespace stays");
        assert_eq!(next.metrics().stale_swept.get(), 1);
        assert_eq!(next.sweep_stale().await, 1, "swept once per driver");
    });
    drop(cleanup);
    drop(_redis);
    let _ = std::fs::remove_dir_all(&dir);
}
