//! `nexus dev` end to end: the real binary, a real redis-server and tansu.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus_actors::infra::{free_port, RedisServer};

/// A bare HTTP/1.0 GET; returns (status, body).
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nexus_dev_serves_health_metrics_and_a_graph_with_both_bridges() {
    let dir = std::env::temp_dir().join(format!("nexus-dev-test-{}", std::process::id()));
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let port = free_port().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(["dev", "--http", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("data"))
        .env("REDIS_URL", redis.url())
        .env_remove("KAFKA_BROKERS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);

    let deadline = Instant::now() + Duration::from_secs(60);
    let health = loop {
        if let Some(r) = get(port, "/healthz") {
            break r;
        }
        assert!(Instant::now() < deadline, "nexus dev did not answer /healthz within 60s");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(health.0, 200);
    assert!(health.1.contains("\"status\":\"ok\""), "{}", health.1);

    let (status, graph) = get(port, "/api/graph").unwrap();
    assert_eq!(status, 200);
    let graph: serde_json::Value = serde_json::from_str(&graph).unwrap();
    let kinds: Vec<&str> = graph["actors"].as_array().unwrap().iter().filter_map(|a| a["kind"].as_str()).collect();
    assert!(kinds.contains(&"redis_bridge") && kinds.contains(&"kafka_bridge"), "graph: {graph}");

    let (status, metrics) = get(port, "/metrics").unwrap();
    assert_eq!(status, 200);
    for family in [
        "nexus_actor_messages_total",
        "nexus_actor_restarts_total",
        "nexus_mailbox_depth",
        "nexus_mailbox_dropped_total",
    ] {
        assert!(metrics.contains(family), "/metrics lacks {family}");
    }
    assert_eq!(get(port, "/no-such-path").unwrap().0, 404);
}

#[test]
fn nexus_node_refuses_unknown_and_unavailable_roles_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_nexus")).args(["node", "--roles", "teapot"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role \"teapot\""));
    let out = Command::new(env!("CARGO_BIN_EXE_nexus")).args(["node", "--roles", "llm-manager"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not part of this build yet"));
}

#[test]
fn every_subcommand_has_help_with_defaults_and_environment() {
    for sub in ["dev", "node"] {
        let out = Command::new(env!("CARGO_BIN_EXE_nexus")).args([sub, "--help"]).output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("[default: 127.0.0.1:7070]"), "{sub} --help: {help}");
        assert!(help.contains("[env: NEXUS_HTTP="), "{sub} --help: {help}");
    }
}
