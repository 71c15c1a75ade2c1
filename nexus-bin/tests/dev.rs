//! `nexus dev` end to end: the real binary, a real redis-server and tansu.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{get, nexus_dev, request, wait_for_health, KillOnDrop};
use nexus_actors::infra::{free_port, RedisServer};

#[test]
fn nexus_dev_serves_health_metrics_and_a_graph_with_both_bridges() {
    check_dev_node("tansu", |_| {});
}

#[test]
fn nexus_dev_falls_back_to_the_mock_cluster_without_tansu() {
    let home = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("nexus-dev-no-tansu-home-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    // Neither PATH nor ~/.cargo/bin has tansu; redis-server stays reachable.
    check_dev_node("mock", |cmd| {
        cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin").env("HOME", &home);
    });
}

fn check_dev_node(name: &str, setup: impl FnOnce(&mut Command)) {
    let dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-dev-test-{name}-{}", std::process::id()));
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let port = free_port().unwrap();
    let mut command = nexus_dev(port, 0, &dir.join("data"));
    command
        .arg("--no-local-model")
        .env("REDIS_URL", redis.url())
        .env_remove("KAFKA_BROKERS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    setup(&mut command);
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let _child = KillOnDrop(child);
    let banner = std::thread::spawn(move || {
        let mut lines = String::new();
        let _ = stdout.take(16 * 1024).read_to_string(&mut lines);
        lines
    });

    let health = wait_for_health(port);
    assert_eq!(health.0, 200);
    assert!(health.1.contains("\"status\":\"ok\""), "{}", health.1);

    // Secrets: the data directory only lets others pass through (to a
    // panel's own volume); the password and the signing keys are the
    // owner's alone, and the password was never printed.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("data"), 0o711);
    assert_eq!(mode("data/admin-password"), 0o600);
    assert_eq!(mode("data/jwt-keys.json"), 0o600);
    if name == "tansu" {
        assert_eq!(mode("data/tansu"), 0o700);
    }

    // /api/* needs a token; log in as the first user `nexus dev` created.
    assert_eq!(get(port, "/api/graph").unwrap().0, 401);
    assert_eq!(get(port, "/api/openapi.json").unwrap().0, 200);
    let password = std::fs::read_to_string(dir.join("data/admin-password")).unwrap();
    let login = format!(r#"{{"username":"admin","password":"{password}"}}"#);
    let (status, token) = request(port, "POST", "/api/login", None, Some(&login)).unwrap();
    assert_eq!(status, 200, "{token}");
    let token: serde_json::Value = serde_json::from_str(&token).unwrap();
    let token = token["token"].as_str().unwrap();
    let (status, graph) = request(port, "GET", "/api/graph", Some(token), None).unwrap();
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
        "nexus_bus_published_total{bus=\"kafka\",topic=\"semantic.events\"} 0",
        "nexus_bus_received_total{bus=\"kafka\",topic=\"semantic.commands\"} 0",
        "nexus_bus_errors_total{bus=\"redis\",kind=\"disconnected\"} 0",
    ] {
        assert!(metrics.contains(family), "/metrics lacks {family}");
    }
    assert_eq!(get(port, "/no-such-path").unwrap().0, 404);
    drop(_child);
    let banner = banner.join().unwrap();
    let expected = if name == "mock" { "MOCK cluster" } else { "tansu child" };
    assert!(banner.contains(expected), "banner: {banner}");
    assert!(banner.contains("admin-password"), "the banner names the password file: {banner}");
    assert!(!banner.contains(password.trim()), "the banner never prints the password: {banner}");
}

#[test]
fn nexus_node_refuses_unknown_roles_and_an_llm_manager_without_a_model_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_nexus")).args(["node", "--roles", "teapot"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role \"teapot\""));
    let out = Command::new(env!("CARGO_BIN_EXE_nexus")).args(["node", "--roles", "llm-manager"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("role llm-manager needs a model endpoint"));
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
    let out = Command::new(env!("CARGO_BIN_EXE_nexus")).args(["sidecar", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("[default: 127.0.0.1:3500]") && help.contains("[env: NEXUS_PANEL_ID="), "{help}");
}

/// A minimal OTLP/HTTP receiver: records the path and content type of
/// every POST and answers 200.
fn otlp_receiver() -> (u16, std::sync::mpsc::Receiver<(String, String, Vec<u8>)>) {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = request_line.split(' ').nth(1).unwrap_or("").to_owned();
                    let (mut length, mut content_type) = (0usize, String::new());
                    loop {
                        let mut header = String::new();
                        reader.read_line(&mut header).unwrap();
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        let (name, value) = header.split_once(':').unwrap_or((header, ""));
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            "content-type" => content_type = value.trim().to_owned(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let _ = tx.send((path, content_type, body));
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                    );
                }
            });
        }
    });
    (port, rx)
}

#[test]
fn spans_are_exported_over_otlp_when_the_endpoint_is_set() {
    let (otlp_port, exports) = otlp_receiver();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-otlp-test-{}", std::process::id()));
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let port = free_port().unwrap();
    let child = nexus_dev(port, 0, &dir.join("data"))
        .arg("--no-local-model")
        .env("REDIS_URL", redis.url())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp_port}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    wait_for_health(port);
    let (path, content_type, body) = exports.recv_timeout(Duration::from_secs(20)).expect("no OTLP export arrived");
    assert_eq!(path, "/v1/traces");
    assert_eq!(content_type, "application/x-protobuf");
    let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"http.request") && contains(b"/healthz"), "export lacks the request span");
}

#[test]
fn nexus_node_runs_the_transaction_manager_with_an_operator_given_admin_and_key_file() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-node-tm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let tansu =
        nexus_actors::infra::Tansu::start(&dir.join("tansu"), nexus_actors::infra::TansuStorage::Memory).unwrap();
    std::fs::write(dir.join("admin-password"), "operator-secret\n").unwrap();
    let keys = dir.join("jwt-keys.json");
    let generated = Command::new(env!("CARGO_BIN_EXE_nexus")).args(["keys", "generate"]).arg(&keys).output().unwrap();
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777, 0o600);
    let again = Command::new(env!("CARGO_BIN_EXE_nexus")).args(["keys", "generate"]).arg(&keys).output().unwrap();
    assert!(!again.status.success(), "an existing key file is never overwritten");
    let port = free_port().unwrap();
    let node = |with_keys: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nexus"));
        command
            .args(["node", "--roles", "transaction-manager", "--http", &format!("127.0.0.1:{port}")])
            .args(["--redis-url", &redis.url(), "--kafka-brokers", &tansu.brokers(), "--admin-password-file"])
            .arg(dir.join("admin-password"))
            .env_remove("NEXUS_JWT_KEY_FILE");
        if with_keys {
            command.arg("--jwt-key-file").arg(&keys);
        }
        command
    };
    let refused = node(false).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--jwt-key-file"), "{stderr}");
    let child = node(true).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let _child = KillOnDrop(child);
    wait_for_health(port);
    let login = r#"{"username":"admin","password":"operator-secret"}"#;
    let (status, token) = request(port, "POST", "/api/login", None, Some(login)).unwrap();
    assert_eq!(status, 200);
    let token: serde_json::Value = serde_json::from_str(&token).unwrap();
    let (status, me) = request(port, "GET", "/api/me", token["token"].as_str(), None).unwrap();
    assert_eq!(status, 200);
    assert!(me.contains("\"role\":\"admin\""), "the operator's first user is an admin: {me}");
    let rotated = Command::new(env!("CARGO_BIN_EXE_nexus")).args(["keys", "rotate"]).arg(&keys).output().unwrap();
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    let set: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&keys).unwrap()).unwrap();
    assert_eq!(set["keys"].as_array().unwrap().len(), 2, "{set}");
    let wrong = r#"{"username":"admin","password":"nope"}"#;
    assert_eq!(request(port, "POST", "/api/login", None, Some(wrong)).unwrap().0, 401);
    assert_eq!(get(port, "/").unwrap().0, 200, "the Studio is served");
}

#[test]
fn ordinary_start_up_errors_are_one_clear_line() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-startup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let tansu =
        nexus_actors::infra::Tansu::start(&dir.join("tansu"), nexus_actors::infra::TansuStorage::Memory).unwrap();
    let keys = dir.join("keys.json");
    Command::new(env!("CARGO_BIN_EXE_nexus")).args(["keys", "generate"]).arg(&keys).output().unwrap();
    let node = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nexus"));
        command
            .args(["node", "--roles", "transaction-manager", "--redis-url", &redis.url()])
            .args(["--kafka-brokers", &tansu.brokers()])
            .env("RUST_LOG", "off")
            .env("RUST_BACKTRACE", "1");
        command
    };
    let cases: Vec<(&str, std::process::Output)> = vec![
        (
            "Address already in use",
            node().arg("--http").arg(format!("127.0.0.1:{port}")).arg("--jwt-key-file").arg(&keys).output().unwrap(),
        ),
        ("missing.json", node().arg("--jwt-key-file").arg(dir.join("missing.json")).output().unwrap()),
        (
            "no-such-password",
            node()
                .arg("--jwt-key-file")
                .arg(&keys)
                .arg("--admin-password-file")
                .arg(dir.join("no-such-password"))
                .output()
                .unwrap(),
        ),
    ];
    for (expected, output) in cases {
        assert!(!output.status.success(), "{expected}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line, not a backtrace: {stderr}");
        assert!(lines[0].starts_with("nexus: ") && lines[0].contains(expected), "{stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    }
    drop(busy);
}

/// Two nodes of one name on one Redis would each take the other's instances
/// for a previous life's: the second refuses to start and says why, and
/// the name is free again once the first stops.
#[test]
fn a_second_node_of_the_same_name_refuses_to_start() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("nexus-same-name-{}", std::process::id()));
    let redis = RedisServer::start(&dir.join("redis"), false).unwrap();
    let data = dir.join("data");
    let start = |port: u16| {
        nexus_dev(port, 0, &data)
            .arg("--no-local-model")
            .env("REDIS_URL", redis.url())
            .env_remove("KAFKA_BROKERS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first_port = free_port().unwrap();
    let first = KillOnDrop(start(first_port));
    wait_for_health(first_port);
    let name = std::fs::read_to_string(data.join("node-name")).unwrap();
    let name = name.trim();
    assert!(name.starts_with("nexus-"), "a default name with the host: {name}");

    let second = start(free_port().unwrap()).wait_with_output().unwrap();
    assert!(!second.status.success(), "the second node started");
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains(&format!("node name \"{name}\" is held by a live node")), "{said}");

    // SIGTERM: a graceful stop gives the name back at once.
    let pid = first.0.id().to_string();
    assert!(Command::new("kill").arg(&pid).status().unwrap().success());
    let mut first = first;
    let _ = first.0.wait();
    let again_port = free_port().unwrap();
    let _again = KillOnDrop(start(again_port));
    wait_for_health(again_port);
}
