//! `nexus node` on SIGTERM: it drains (not ready, then no new connections)
//! and exits cleanly; what it was told to keep is kept.

use std::process::Command;
use std::time::{Duration, Instant};

use nexus_testkit::{Brokers, TestKeys};

#[actix_rt::test]
async fn sigterm_drains_the_node_and_it_exits_cleanly() {
    let brokers = Brokers::with_kafka("bin-drain");
    let keys = TestKeys::new(&brokers.dir);
    let port = nexus_actors::infra::free_port().unwrap();
    let log = std::fs::File::create(brokers.dir.join("node.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(["node", "--roles", "transaction-manager", "--name", "bin-drain", "--http", &format!("127.0.0.1:{port}")])
        .args(["--redis-url", &brokers.redis_url(), "--kafka-brokers", &brokers.kafka_brokers()])
        .arg("--jwt-key-file")
        .arg(&keys.file)
        .args(["--drain-timeout", "5"])
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let ready = async {
        for _ in 0..300 {
            if let Ok(answer) = http.get(&readyz).send().await {
                return answer.status().as_u16();
            }
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
        0
    };
    assert_eq!(ready.await, 200, "the node became ready");

    let signalled = Instant::now();
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut not_ready = false;
    while signalled.elapsed() < Duration::from_secs(1) {
        if let Ok(answer) = http.get(&readyz).send().await {
            not_ready |= answer.status().as_u16() == 503;
        }
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(not_ready, "a draining node says it is not ready while it still answers");

    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(20), "the node did not exit after SIGTERM");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exited.success(), "a drained node exits cleanly: {exited}");
    let log = std::fs::read_to_string(brokers.dir.join("node.log")).unwrap();
    assert!(log.contains("draining"), "the drain is logged:\n{log}");
}
