//! The sidecar's and the watchdog's ports are bound (by the driver, then
//! handed over) before user code runs: a panel that tries to take them as
//! its first act finds them taken, and its watchdog still answers, even
//! when the helpers are slow to start; a panel that tries again while its
//! sidecar restarts finds the port taken too.

use nexus_actors::roles::panel_manager::driver::{Code, InstanceEvent, RuntimeDriver};
use nexus_actors::roles::panel_manager::local::{LocalConfig, LocalDriver, SandboxChoice};

use super::harness::{env, get_json, panel_id, processes_mentioning, register, skipped, spec, Cleanup};

/// Binds the watchdog's port and its sidecar's as its first act (perl:
/// it starts in milliseconds, sooner than the helpers would without the
/// driver waiting for them), notes how that went, and becomes a server
/// that reports it.
const GRAB: &str = r#"
use Socket;
my ($sidecar) = $ENV{NEXUS_PROXY_URL} =~ /:(\d+)\//;
my (%grabs, @held);
for my $p (["watchdog", 9999], ["sidecar", $sidecar]) {
    socket(my $s, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
    $grabs{$p->[0]} = (bind($s, sockaddr_in($p->[1], inet_aton("127.0.0.1"))) && listen($s, 1)) ? "bound" : "$!";
    push @held, $s;
}
open(my $f, ">", "grabs.json") or die "grabs.json: $!";
print $f "{" . join(",", map { "\"$_\": \"$grabs{$_}\"" } sort keys %grabs) . "}";
close $f;
exec("python3", "server.py") or die "exec: $!";
"#;

const SERVE: &str = r#"
import json, os, re, socket, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = open("grabs.json", "rb").read()
        if self.path == "/sidecar":
            health = os.environ["NEXUS_PROXY_URL"].rsplit("/", 1)[0] + "/healthz"
            try:
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(health, timeout=2) as r:
                    body = json.dumps({"status": r.status}).encode()
            except OSError as e:
                body = json.dumps({"status": 0, "error": str(e)}).encode()
        if self.path == "/grab-sidecar":
            port = int(re.search(r":(\d+)/", os.environ["NEXUS_PROXY_URL"]).group(1))
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
                s.listen(1)
                body = json.dumps({"sidecar": "bound"}).encode()
            except OSError as e:
                body = json.dumps({"sidecar": str(e)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
"#;

#[test]
fn a_panel_cannot_take_its_helpers_ports_before_they_listen() {
    if skipped("a_panel_cannot_take_its_helpers_ports_before_they_listen") {
        return;
    }
    for (name, sandbox) in [("order-process", SandboxChoice::Process), ("order-auto", SandboxChoice::Auto)] {
        let env = env(name, sandbox);
        let panel = panel_id();
        let instance = format!("{name}-{}", std::process::id());
        let cleanup = Cleanup { instances: vec![instance.clone()] };
        // Helpers slow to start, as on a loaded machine: without the driver
        // waiting for them, the panel would be first.
        let slow = env.dir.join("slow-nexus");
        let script = format!("#!/bin/sh\nsleep 0.5\nexec '{}' \"$@\"\n", env!("CARGO_BIN_EXE_nexus"));
        std::fs::write(&slow, script).unwrap();
        std::process::Command::new("chmod").arg("755").arg(&slow).status().unwrap();
        let driver =
            LocalDriver::new(LocalConfig::new(env.dir.join("slow-data"), slow, env.redis_url.clone(), sandbox));
        actix_rt::System::new().block_on(async {
            register(&env.redis_url, &panel).await;
            let volume = driver.volume(&panel, "template:python_minimal").await.expect("volume");
            std::fs::write(volume.location.path().join("grab.pl"), GRAB).unwrap();
            std::fs::write(volume.location.path().join("server.py"), SERVE).unwrap();
            std::fs::write(volume.location.path().join("nexus-panel.json"), r#"{"command": ["perl", "grab.pl"]}"#)
                .unwrap();
            let started = driver.start(spec(&instance, &panel, Code::Studio(volume))).await.expect("start");
            let grabs = get_json(&started.endpoint.addr, "/");
            assert_ne!(grabs["watchdog"], "bound", "{name}: the panel took the watchdog's port: {grabs}");
            assert_ne!(grabs["sidecar"], "bound", "{name}: the panel took its sidecar's port: {grabs}");
            let watchdog = get_json(started.endpoint.watchdog.as_deref().expect("a watchdog"), "/healthz");
            assert_eq!(watchdog["instance"], instance.as_str(), "{name}: the watchdog answers: {watchdog}");
            // The sidecar dies; while it restarts (slowly), its port stays taken.
            let sidecars: Vec<String> = processes_mentioning(&format!("sidecar --panel {panel}"));
            assert_eq!(sidecars.len(), 1, "{name}: one sidecar runs: {sidecars:?}");
            let pid = sidecars[0].split(':').next().unwrap().to_owned();
            assert!(std::process::Command::new("kill").args(["-9", &pid]).status().unwrap().success());
            let regrab = get_json(&started.endpoint.addr, "/grab-sidecar");
            assert_ne!(regrab["sidecar"], "bound", "{name}: the panel took its restarting sidecar's port: {regrab}");
            // The restarted sidecar serves on the same handed-over listener.
            // (Off this thread, which the driver's supervisor shares.)
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let addr = started.endpoint.addr.clone();
                let health = actix_rt::task::spawn_blocking(move || get_json(&addr, "/sidecar")).await.unwrap();
                if health["status"] == 200 {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    let log = env.dir.join("slow-data/instances").join(&instance).join("sidecar.log");
                    let log = std::fs::read_to_string(log).unwrap_or_default();
                    panic!("{name}: the sidecar never served again: {health}\nsidecar.log:\n{log}");
                }
                actix_rt::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            driver.stop(&instance, std::time::Duration::from_secs(5)).await.expect("stop");
        });
        drop(cleanup);
    }
}

/// A sidecar that never serves (here: one that hangs) ends its instance
/// as a crash would, with the reason in the panel's log.
#[test]
fn an_instance_whose_sidecar_never_serves_ends_with_the_reason_in_its_log() {
    if skipped("an_instance_whose_sidecar_never_serves_ends_with_the_reason_in_its_log") {
        return;
    }
    let env = env("order-hung", SandboxChoice::Process);
    let panel = panel_id();
    let instance = format!("order-hung-{}", std::process::id());
    let cleanup = Cleanup { instances: vec![instance.clone()] };
    let hung = env.dir.join("hung-nexus");
    std::fs::write(&hung, "#!/bin/sh\nexec sleep 600\n").unwrap();
    std::process::Command::new("chmod").arg("755").arg(&hung).status().unwrap();
    let driver = LocalDriver::new(LocalConfig::new(
        env.dir.join("hung-data"),
        hung,
        env.redis_url.clone(),
        SandboxChoice::Process,
    ));
    actix_rt::System::new().block_on(async {
        register(&env.redis_url, &panel).await;
        let volume = driver.volume(&panel, "template:python_minimal").await.expect("volume");
        let mut started = driver.start(spec(&instance, &panel, Code::Studio(volume))).await.expect("start");
        let event = actix_rt::time::timeout(std::time::Duration::from_secs(40), started.events.recv()).await;
        let logs = driver.logs(&instance, 20).await.unwrap_or_default();
        assert_eq!(event, Ok(Some(InstanceEvent::Exited { code: None, limit: None, restarted: false })), "{logs:?}");
        assert!(logs.iter().any(|l| l.contains("did not serve")), "the reason is in the log: {logs:?}");
        driver.stop(&instance, std::time::Duration::from_secs(5)).await.expect("stop");
    });
    drop(cleanup);
}
