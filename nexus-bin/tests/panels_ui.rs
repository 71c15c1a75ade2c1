//! Panels in the Studio UI end to end (issue 5 §5): a real `nexus dev` with
//! its panel manager, local driver and traffic gateway, real redis-server,
//! and headless Chromium driven by playwright-core
//! (`ui-tests/panels.test.mjs`). Apps scale to zero after 3 s here so the
//! test sees it happen. `scripts/test` installs Chromium and the npm
//! packages; without them this test fails and says what is missing. It
//! fails too when the browser test is skipped or runs no test at all.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nexus_actors::infra::{free_port, RedisServer};

/// Stops `nexus dev` (and with it every panel instance it started) however
/// the test ends.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        // SIGTERM first: the node stops its instances (and their network
        // namespaces) on a graceful shutdown.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits until `port` accepts connections, or fails with the node's log.
fn wait_for(node: &mut Node, port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = node.0.try_wait() {
            panic!("nexus dev exited ({status}) before its {what} listened:\n{}", log_tail(log));
        }
        assert!(Instant::now() < deadline, "the {what} of nexus dev did not listen:\n{}", log_tail(log));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of a `# name N` summary line of node's TAP output.
fn tap_count(tap: &str, name: &str) -> Option<u64> {
    tap.lines().find_map(|line| line.strip_prefix(&format!("# {name} "))?.trim().parse().ok())
}

#[test]
fn a_panel_runs_in_studio_deploys_as_an_app_scales_to_zero_and_comes_back() {
    let ui_tests = common::ui_tests();
    let dir: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-panels-ui-{}", std::process::id()));
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let (port, gateway_port) = (free_port().unwrap(), free_port().unwrap());
    let log = dir.join("nexus-dev.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(["dev", "--http", &format!("127.0.0.1:{port}"), "--gateway", &format!("127.0.0.1:{gateway_port}")])
        .env("NEXUS_DATA_DIR", dir.join("data"))
        .env("NEXUS_APP_IDLE_SECS", "3")
        .env("REDIS_URL", redis.url())
        .env_remove("KAFKA_BROKERS")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut node = Node(child);
    wait_for(&mut node, port, "HTTP API", &log);
    wait_for(&mut node, gateway_port, "traffic gateway", &log);
    let password = std::fs::read_to_string(dir.join("data/admin-password")).unwrap();

    let output = Command::new("node")
        .args(["--test", "--test-reporter=tap", "panels.test.mjs"])
        .current_dir(&ui_tests)
        .env("NEXUS_URL", format!("http://127.0.0.1:{port}"))
        .env("NEXUS_GATEWAY", format!("http://127.0.0.1:{gateway_port}"))
        .env("NEXUS_PASSWORD", password.trim())
        .env("NEXUS_SCREENSHOT", dir.join("panels.png"))
        .output()
        .expect("node is installed");
    drop(node);
    let tap = String::from_utf8_lossy(&output.stdout);
    let report = format!("{tap}\n{}\nnexus dev:\n{}", String::from_utf8_lossy(&output.stderr), log_tail(&log));
    assert!(output.status.success(), "browser test failed:\n{report}");
    // A skipped or vanished test must not pass as a success: node exits 0
    // for skipped tests, but does not count them as passed.
    let (tests, pass) = (tap_count(&tap, "tests"), tap_count(&tap, "pass"));
    assert!(tests.is_some_and(|n| n > 0) && pass == tests, "not every browser test ran and passed:\n{report}");
    for name in ["skipped", "skip", "todo", "cancelled"] {
        assert!(tap_count(&tap, name).unwrap_or(0) == 0, "a browser test is {name}:\n{report}");
    }
}
