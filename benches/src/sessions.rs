//! WebSocket fan-out: N sessions follow one document; each change reaches
//! all of them. Measures delivery latency (p50/p99/max) and server memory
//! per idle session, on one transaction-manager node and on two nodes
//! sharing Redis. The nodes run as separate processes (this binary in
//! `serve-node` mode) so their memory can be read from /proc.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use nexus_actors::bus::kafka::KafkaConfig;
use nexus_actors::infra::{free_port, RedisServer, Tansu, TansuStorage};
use nexus_actors::node::{self, NodeConfig, PanelsConfig, Role};
use nexus_actors::platform::auth::keys::KeySet;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const USER: &str = "bench";
const PASSWORD: &str = "bench-password";
/// Changes fanned out per setup.
const CHANGES: u64 = 5;

/// `nexus-bench serve-node REDIS_URL BROKERS PORT KEY_FILE`: a transaction-manager node.
pub(crate) fn serve_node(args: &[String]) {
    let [redis_url, brokers, port, key_file] = args else { panic!("serve-node REDIS_URL BROKERS PORT KEY_FILE") };
    let config = NodeConfig {
        name: format!("bench-{port}"),
        http: format!("127.0.0.1:{port}").parse().expect("port"),
        redis_url: redis_url.clone(),
        kafka: KafkaConfig::new(brokers.clone()),
        roles: vec![Role::TransactionManager],
        first_user: Some((USER.to_owned(), PASSWORD.to_owned())),
        gateway: "127.0.0.1:0".parse().expect("address"),
        public_gateway_url: None,
        panels: PanelsConfig::new(std::env::temp_dir()),
        key_file: Some(key_file.into()),
        quotas: Default::default(),
        allowed_origins: Vec::new(),
        login_limits: Default::default(),
        llm: Default::default(),
    };
    actix_rt::System::new().block_on(node::run(config)).expect("node runs");
}

struct NodeProcess {
    child: Child,
    port: u16,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(redis_url: &str, brokers: &str, key_file: &Path) -> NodeProcess {
    let port = free_port().expect("port");
    let child = Command::new(std::env::current_exe().expect("own path"))
        .args(["serve-node", redis_url, brokers, &port.to_string()])
        .arg(key_file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("node process");
    crate::wait_listening(port, "the bench node", Duration::from_secs(60)).expect("bench node");
    NodeProcess { child, port }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

pub(crate) struct Outcome {
    pub setup: &'static str,
    pub sessions: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub kib_per_session: f64,
    pub delivered: usize,
}

/// Runs both setups with `n` sessions; returns a markdown table.
pub(crate) fn table(dir: &Path, n: usize) -> String {
    let redis = RedisServer::start(&dir.join("sessions-redis"), false).expect("redis-server");
    let tansu = Tansu::start(&dir.join("sessions-tansu"), TansuStorage::Memory).expect("tansu");
    let key_file = dir.join("sessions-keys.json");
    KeySet::generate().save(&key_file).expect("a key file");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut outcomes = Vec::new();
    for (setup, nodes) in [("1 node", 1), ("2 nodes", 2)] {
        let procs: Vec<NodeProcess> =
            (0..nodes).map(|_| start_node(&redis.url(), &tansu.brokers(), &key_file)).collect();
        outcomes.push(runtime.block_on(measure(setup, &procs, n)));
    }
    let mut out = String::from(
        "| setup | sessions | p50 ms | p99 ms | max ms | server memory per idle session | delivered |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in outcomes {
        out += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} KiB | {}/{} |\n",
            o.setup,
            o.sessions,
            o.p50_ms,
            o.p99_ms,
            o.max_ms,
            o.kib_per_session,
            o.delivered,
            o.sessions * CHANGES as usize
        );
    }
    out
}

async fn measure(setup: &'static str, nodes: &[NodeProcess], n: usize) -> Outcome {
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", nodes[0].port);
    let login: Value = http
        .post(format!("{base}/api/login"))
        .json(&json!({"username": USER, "password": PASSWORD}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("token");
    let token = login["token"].as_str().expect("token").to_owned();
    let doc: Value = http
        .post(format!("{base}/api/documents"))
        .bearer_auth(&token)
        .json(&json!({"state": {"n": 0}}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("doc");
    let id = doc["id"].as_str().expect("id").to_owned();

    let rss_before: u64 = nodes.iter().map(|p| rss_kib(p.child.id())).sum();
    let received: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let ports: Vec<u16> = nodes.iter().map(|p| p.port).collect();
    let clients = futures::stream::iter(0..n)
        .map(|i| {
            let url = format!("ws://127.0.0.1:{}/ws?token={token}", ports[i % ports.len()]);
            let subscribe = json!({"type": "subscribe", "doc": id, "presence": false}).to_string();
            async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
                ws.send(Message::text(subscribe)).await.expect("subscribe");
                loop {
                    let frame = ws.next().await.expect("open").expect("frame");
                    if let Message::Text(t) = frame {
                        if t.as_str().contains("\"snapshot\"") {
                            return ws;
                        }
                    }
                }
            }
        })
        .buffer_unordered(128)
        .collect::<Vec<_>>()
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after: u64 = nodes.iter().map(|p| rss_kib(p.child.id())).sum();

    let mut readers = Vec::new();
    for ws in clients {
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let (_sink, mut stream) = ws.split();
            while let Some(Ok(frame)) = stream.next().await {
                if let Message::Text(t) = frame {
                    if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                        if v["type"] == "change" {
                            let version = v["version"].as_u64().unwrap_or(0);
                            received.lock().unwrap().push((version, Instant::now()));
                        }
                    }
                }
            }
        }));
    }

    let mut latencies = Vec::new();
    for version in 1..=CHANGES {
        let sent = Instant::now();
        http.patch(format!("{base}/api/documents/{id}"))
            .bearer_auth(&token)
            .json(&json!({"version": version, "patch": {"n": version}}))
            .send()
            .await
            .expect("patch")
            .error_for_status()
            .expect("patch accepted");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = received.lock().unwrap().iter().filter(|(v, _)| *v == version + 1).count();
            if got >= n || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut all = received.lock().unwrap();
        latencies.extend(all.iter().filter(|(v, _)| *v == version + 1).map(|(_, at)| (*at - sent).as_secs_f64() * 1e3));
        all.retain(|(v, _)| *v != version + 1);
    }
    for reader in readers {
        reader.abort();
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pick =
        |p: f64| latencies.get(((latencies.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN);
    Outcome {
        setup,
        sessions: n,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        kib_per_session: rss_after.saturating_sub(rss_before) as f64 / n as f64,
        delivered: latencies.len(),
    }
}
