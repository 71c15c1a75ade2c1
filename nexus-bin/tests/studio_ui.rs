//! The Studio web UI end to end: a real `nexus dev`, real redis-server and
//! tansu, and two real headless Chromium contexts driven by playwright-core
//! (`ui-tests/studio.test.mjs`). `scripts/test` installs Chromium and the
//! npm packages; without them this test fails and says what is missing.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nexus_actors::infra::{free_port, RedisServer};

#[test]
fn two_browsers_edit_one_document_live_and_the_graph_renders() {
    let ui_tests = common::ui_tests();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-studio-ui-{}", std::process::id()));
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let port = free_port().unwrap();
    let mut child = common::nexus_dev(port, 0, &dir.join("data"))
        .arg("--no-local-model")
        .env("REDIS_URL", redis.url())
        .env_remove("KAFKA_BROKERS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nexus dev did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let password = std::fs::read_to_string(dir.join("data/admin-password")).unwrap();
    let output = Command::new("node")
        .args(["--test", "studio.test.mjs"])
        .current_dir(&ui_tests)
        .env("NEXUS_URL", format!("http://127.0.0.1:{port}"))
        .env("NEXUS_PASSWORD", password.trim())
        .env("NEXUS_SCREENSHOT", dir.join("studio.png"))
        .output()
        .expect("node is installed");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        output.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
