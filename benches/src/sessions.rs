//! WebSocket fan-out: N sessions follow one document; each change reaches
//! all of them. Measures delivery latency (p50/p99/max) and server memory
//! per idle session, on one transaction-manager node, on two nodes
//! sharing Redis, on a raw baseline: a minimal tokio-tungstenite
//! broadcast server that sends each change to every connection, and on a
//! peer, Sockudo ([`sockudo`]). Servers run as separate processes (this
//! binary in `serve-node` or `serve-raw-ws` mode, and `sockudo`) so their
//! memory can be read from /proc.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Future, SinkExt, StreamExt};
use nexus_actors::bus::kafka::KafkaConfig;
use nexus_actors::infra::{free_port, RedisServer, Tansu, TansuStorage};
use nexus_actors::node::{self, NodeConfig, PanelsConfig, Role};
use nexus_actors::platform::auth::keys::KeySet;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

mod sockudo;
mod split;
pub(crate) use split::serve_clients;

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
        redis_cluster: Vec::new(),
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
        drain_timeout: nexus_actors::node::DEFAULT_DRAIN_TIMEOUT,
    };
    actix_rt::System::new().block_on(node::run(config)).expect("node runs");
}

/// `nexus-bench serve-raw-ws PORT TRIGGER_PORT`: the raw baseline. Each
/// WebSocket client sends one frame (its subscription) and gets a snapshot
/// frame back; then every line `VERSION` written to the trigger port sends
/// one change frame, serialised once, to every connection. Two worker
/// threads, as the nodes' HTTP servers have on this machine.
pub(crate) fn serve_raw(args: &[String]) {
    let [port, trigger] = args else { panic!("serve-raw-ws PORT TRIGGER_PORT") };
    let (port, trigger): (u16, u16) = (port.parse().expect("port"), trigger.parse().expect("trigger port"));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let (changes, _) = tokio::sync::broadcast::channel::<tokio_tungstenite::tungstenite::Utf8Bytes>(64);
        let triggers = tokio::net::TcpListener::bind(("127.0.0.1", trigger)).await.expect("bind the trigger port");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the raw port");
        let send = changes.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = triggers.accept().await {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let version: u64 = line.trim().parse().unwrap_or(0);
                    let frame = json!({"type": "change", "doc": "raw", "version": version, "patch": {"n": version}});
                    let _ = send.send(frame.to_string().into());
                }
            }
        });
        while let Ok((stream, _)) = listener.accept().await {
            let mut changes = changes.subscribe();
            tokio::spawn(async move {
                // Buffers sized for many small frames, not tungstenite's 128 KiB defaults.
                let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
                let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
                    return;
                };
                if !matches!(ws.next().await, Some(Ok(Message::Text(_)))) {
                    return;
                }
                let snapshot = json!({"type": "snapshot", "doc": "raw", "version": 1, "state": {"n": 0}});
                if ws.send(Message::text(snapshot.to_string())).await.is_err() {
                    return;
                }
                loop {
                    tokio::select! {
                        change = changes.recv() => match change {
                            Ok(frame) => if ws.send(Message::Text(frame)).await.is_err() { return },
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(_) => return,
                        },
                        incoming = ws.next() => if !matches!(incoming, Some(Ok(_))) { return },
                    }
                }
            });
        }
    });
}

/// A child process of the harness, killed when dropped.
struct Killed(Child);

impl Killed {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct NodeProcess {
    child: Killed,
    port: u16,
}

/// This binary, or, with `NEXUS_BENCH_NODE_WRAPPER` set (e.g. `heaptrack -o
/// /tmp/node`), this binary run by that command: how the profiles in
/// `benches/profiles/` look inside a node.
fn node_command() -> Command {
    let own = std::env::current_exe().expect("own path");
    let wrapper = std::env::var("NEXUS_BENCH_NODE_WRAPPER").unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let Some(program) = words.next() else { return Command::new(own) };
    let mut command = Command::new(program);
    command.args(words).arg(own);
    command
}

fn start_node(redis_url: &str, brokers: &str, key_file: &Path) -> NodeProcess {
    let port = free_port().expect("port");
    let child = node_command()
        .args(["serve-node", redis_url, brokers, &port.to_string()])
        .arg(key_file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("node process");
    crate::wait_listening(port, "the bench node", Duration::from_secs(60)).expect("bench node");
    NodeProcess { child: Killed(child), port }
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

fn start_raw() -> (NodeProcess, u16) {
    let (port, trigger) = (free_port().expect("port"), free_port().expect("port"));
    let child = Command::new(std::env::current_exe().expect("own path"))
        .args(["serve-raw-ws", &port.to_string(), &trigger.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("raw server process");
    crate::wait_listening(port, "the raw WebSocket server", Duration::from_secs(30)).expect("raw server");
    crate::wait_listening(trigger, "the raw server's trigger", Duration::from_secs(30)).expect("raw server");
    (NodeProcess { child: Killed(child), port }, trigger)
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

/// Sessions of the large rows: more sockets than a process may open here,
/// so they are split over two nodes, two raw servers and two client processes.
pub(crate) const LARGE: usize = 20_000;
/// Descriptors a process needs beyond its sockets (files, Redis, Kafka).
const SPARE_FDS: u64 = 1_024;

/// Runs the setups with each of `sizes` sessions (one node, two nodes and
/// the raw server; from [`LARGE`] on, two nodes and two raw servers with
/// the clients in two processes); returns a markdown table.
pub(crate) fn table(dir: &Path, sizes: &[usize]) -> String {
    let redis = RedisServer::start(&dir.join("sessions-redis"), false).expect("redis-server");
    let tansu = Tansu::start(&dir.join("sessions-tansu"), TansuStorage::Memory).expect("tansu");
    let key_file = dir.join("sessions-keys.json");
    KeySet::generate().save(&key_file).expect("a key file");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut out = String::from(
        "| setup | sessions | p50 ms | p99 ms | max ms | server memory per idle session | delivered | raw ÷ this: p50 / p99 / memory | Sockudo ÷ this: p50 / p99 / memory |\n|---|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for &n in sizes {
        // From LARGE on, clients and sessions are split over two processes each.
        let per_process = if n >= LARGE { n / 2 } else { n } as u64 + SPARE_FDS;
        // Servers are started after this, so they inherit it.
        let fds = raise_open_files(per_process);
        if fds < per_process {
            out += &format!(
                "| every setup | {n} | — | — | — | — | — | not run: {fds} open files allowed, {per_process} needed | — |\n"
            );
            continue;
        }
        let mut outcomes = Vec::new();
        let servers = if n >= LARGE { 2 } else { 1 };
        let raw = if n >= LARGE {
            let procs: Vec<NodeProcess> =
                (0..2).map(|_| start_node(&redis.url(), &tansu.brokers(), &key_file)).collect();
            outcomes.push(runtime.block_on(measure("2 nodes, clients in 2 processes", &procs, n, true)));
            drop(procs);
            runtime.block_on(measure_raw(&[start_raw(), start_raw()], n))
        } else {
            for (setup, nodes) in [("1 node", 1), ("2 nodes", 2)] {
                let procs: Vec<NodeProcess> =
                    (0..nodes).map(|_| start_node(&redis.url(), &tansu.brokers(), &key_file)).collect();
                outcomes.push(runtime.block_on(measure(setup, &procs, n, false)));
            }
            runtime.block_on(measure_raw(&[start_raw()], n))
        };
        let peer = sockudo::program().map(|program| runtime.block_on(measure_sockudo(&program, dir, servers, n)));
        outcomes.push(raw);
        let raw = outcomes.last().expect("the raw row");
        let ratios = |to: &Outcome, o: &Outcome| {
            format!(
                "{:.2} / {:.2} / {:.2}",
                to.p50_ms / o.p50_ms,
                to.p99_ms / o.p99_ms,
                to.kib_per_session / o.kib_per_session
            )
        };
        for o in outcomes.iter().chain(&peer) {
            out += &format!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} KiB | {}/{} | {} | {} |\n",
                o.setup,
                o.sessions,
                o.p50_ms,
                o.p99_ms,
                o.max_ms,
                o.kib_per_session,
                o.delivered,
                o.sessions * CHANGES as usize,
                ratios(raw, o),
                peer.as_ref().map_or("—".to_owned(), |peer| ratios(peer, o)),
            );
        }
        if peer.is_none() {
            out += &format!("| Sockudo | {n} | — | — | — | — | — | not run: sockudo is not installed (`scripts/bench` installs it) | — |\n");
        }
    }
    out
}

/// Raises this process's open-file limit to at least `want` where it may
/// (root with `CAP_SYS_RESOURCE` raises the hard limit too, anyone else up
/// to the hard limit, as a node does); returns the soft limit it ends with.
fn raise_open_files(want: u64) -> u64 {
    let raised = libc::rlimit { rlim_cur: want, rlim_max: want };
    let mut now = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) };
    if now.rlim_cur >= want {
        return now.rlim_cur;
    }
    // SAFETY: as above.
    if now.rlim_max >= want || unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return nexus_actors::platform::open_files::raise_to_hard().map_or(now.rlim_cur, |(_, hard)| hard);
    }
    want
}

/// The raw baseline: the same clients and changes against `serve-raw-ws`;
/// with two servers, half the clients each, in a process of their own.
async fn measure_raw(servers: &[(NodeProcess, u16)], n: usize) -> Outcome {
    let mut triggers = Vec::new();
    for (_, trigger) in servers {
        triggers.push(tokio::net::TcpStream::connect(("127.0.0.1", *trigger)).await.expect("trigger"));
    }
    let triggers = Arc::new(tokio::sync::Mutex::new(triggers));
    let urls: Vec<String> = servers.iter().map(|(s, _)| format!("ws://127.0.0.1:{}/", s.port)).collect();
    let pids: Vec<u32> = servers.iter().map(|(s, _)| s.child.id()).collect();
    let subscribe = json!({"type": "subscribe", "doc": "raw", "presence": false}).to_string();
    let change = |version: u64| {
        let triggers = triggers.clone();
        async move {
            let line = format!("{}\n", version + 1);
            for trigger in triggers.lock().await.iter_mut() {
                trigger.write_all(line.as_bytes()).await.expect("trigger a change");
            }
        }
    };
    if servers.len() > 1 {
        split::fan_out("2 raw broadcast servers, clients in 2 processes", &pids, &urls, &subscribe, n, change).await
    } else {
        fan_out("raw broadcast server", &pids, urls, subscribe, n, change).await
    }
}

/// The peer: `servers` Sockudo processes, the clients split over them (in
/// a process of their own per server when there are two), every change
/// triggered on each.
async fn measure_sockudo(program: &Path, dir: &Path, servers: usize, n: usize) -> Outcome {
    let mut procs = Vec::new();
    for i in 0..servers {
        procs.push(sockudo::start(program, &dir.join(format!("sockudo-{i}"))).await);
    }
    let pids: Vec<u32> = procs.iter().map(|p| p.child.id()).collect();
    let urls: Vec<String> = procs.iter().map(|p| sockudo::url(p.port)).collect();
    let (http, ports) = (reqwest::Client::new(), procs.iter().map(|p| p.port).collect::<Vec<_>>());
    let change = |version: u64| {
        let (http, ports) = (http.clone(), ports.clone());
        async move {
            for port in ports {
                sockudo::trigger(&http, port, version).await;
            }
        }
    };
    if servers > 1 {
        split::fan_out("2 Sockudo servers, clients in 2 processes", &pids, &urls, sockudo::SUBSCRIBE, n, change).await
    } else {
        fan_out("Sockudo", &pids, urls, sockudo::SUBSCRIBE.to_owned(), n, change).await
    }
}

/// One or more nodes, the clients split over them; with `split`, each
/// node's clients in a process of their own.
async fn measure(setup: &'static str, nodes: &[NodeProcess], n: usize, split: bool) -> Outcome {
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
    let pids: Vec<u32> = nodes.iter().map(|p| p.child.id()).collect();
    let urls: Vec<String> = nodes.iter().map(|p| format!("ws://127.0.0.1:{}/ws?token={token}", p.port)).collect();
    let subscribe = json!({"type": "subscribe", "doc": id, "presence": false}).to_string();
    let change = |version: u64| {
        let patch = http
            .patch(format!("{base}/api/documents/{id}"))
            .bearer_auth(&token)
            .json(&json!({"version": version, "patch": {"n": version}}))
            .send();
        async move {
            patch.await.expect("patch").error_for_status().expect("patch accepted");
        }
    };
    if split {
        split::fan_out(setup, &pids, &urls, &subscribe, n, change).await
    } else {
        fan_out(setup, &pids, urls, subscribe, n, change).await
    }
}

/// Opens `n` clients (round robin over `urls`), each subscribing with
/// `subscribe` until its snapshot comes; then makes [`CHANGES`] changes
/// with `change(version)` (the change that makes `version + 1`) and times
/// each from the call to its arrival at every client. Memory per session
/// is the growth of the servers' (`pids`) resident memory over the clients.
async fn fan_out<F, Fut>(
    setup: &'static str,
    pids: &[u32],
    urls: Vec<String>,
    subscribe: String,
    n: usize,
    mut change: F,
) -> Outcome
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let rss_before: u64 = pids.iter().map(|&pid| rss_kib(pid)).sum();
    let received: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let clients = connect(&urls, &subscribe, n).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after: u64 = pids.iter().map(|&pid| rss_kib(pid)).sum();

    let mut readers = Vec::new();
    for ws in clients {
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            let (_sink, mut stream) = ws.split();
            while let Some(Ok(frame)) = stream.next().await {
                if let Some(version) = change_version(&frame) {
                    received.lock().unwrap().push((version, Instant::now()));
                }
            }
        }));
    }

    let mut latencies = Vec::new();
    for version in 1..=CHANGES {
        let sent = Instant::now();
        change(version).await;
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
    outcome(setup, n, latencies, rss_after.saturating_sub(rss_before))
}

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `n` clients, round robin over `urls`, each subscribed with `subscribe`
/// and past its snapshot; 128 connecting at once.
async fn connect(urls: &[String], subscribe: &str, n: usize) -> Vec<Client> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(urls[i % urls.len()].as_str()).await.expect("connect");
            ws.send(Message::text(subscribe)).await.expect("subscribe");
            loop {
                if let Message::Text(t) = ws.next().await.expect("open").expect("frame") {
                    // A snapshot (Nexus, the raw server), or Pusher's confirmation.
                    let t = t.as_str();
                    if t.contains("\"snapshot\"") || t.contains("pusher_internal:subscription_succeeded") {
                        return ws;
                    }
                }
            }
        })
        .buffer_unordered(128)
        .collect()
        .await
}

/// The version a `change` frame brings (Nexus's and the raw server's, or
/// a Pusher `change` event, whose data is a string of JSON); `None` for any
/// other frame.
fn change_version(frame: &Message) -> Option<u64> {
    let Message::Text(t) = frame else { return None };
    let v = serde_json::from_str::<Value>(t.as_str()).ok()?;
    if v["event"] == "change" {
        let data: Value = serde_json::from_str(v["data"].as_str()?).ok()?;
        return data["version"].as_u64();
    }
    (v["type"] == "change").then(|| v["version"].as_u64().unwrap_or(0))
}

/// The row of `n` sessions whose changes arrived after `latencies` (ms),
/// the servers having grown by `grown_kib` with them.
fn outcome(setup: &'static str, n: usize, mut latencies: Vec<f64>, grown_kib: u64) -> Outcome {
    latencies.sort_by(|a, b| a.total_cmp(b));
    let pick =
        |p: f64| latencies.get(((latencies.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN);
    Outcome {
        setup,
        sessions: n,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        kib_per_session: grown_kib as f64 / n as f64,
        delivered: latencies.len(),
    }
}
