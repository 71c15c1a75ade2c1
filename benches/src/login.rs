//! API latency during a login flood: p50/p99 of an authenticated
//! `GET /api/panels` against a real `nexus node` (the release binary beside
//! this one), alone and while 200 bad logins a second arrive. Two floods:
//! with the login limits as shipped (the flood's address is soon answered
//! 429 without hashing) and with the limits lifted, so that every bad login
//! asks for an Argon2 hash (run off the HTTP workers behind a semaphore;
//! past its waiting room, 503 at once). The baseline is the same GET with
//! no flood, measured in the same run.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_actors::infra::{free_port, RedisServer, Tansu, TansuStorage};
use nexus_actors::platform::auth::keys::KeySet;
use serde_json::{json, Value};

/// Bad logins a second during a flood.
const FLOOD_RATE: u64 = 200;

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `nexus node --roles transaction-manager` on a free port.
fn start(dir: &Path, redis: &RedisServer, tansu: &Tansu, per_address: u32) -> Result<(Node, u16), String> {
    let nexus = std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("nexus");
    if !nexus.exists() {
        return Err(format!("{} is missing: cargo build --release -p nexus-bin", nexus.display()));
    }
    let keys = dir.join("login-keys.json");
    if !keys.exists() {
        KeySet::generate().save(&keys).map_err(|e| e.to_string())?;
    }
    std::fs::write(dir.join("login-admin"), "bench-admin-password").map_err(|e| e.to_string())?;
    let port = free_port().map_err(|e| e.to_string())?;
    let child = Command::new(nexus)
        .args(["node", "--roles", "transaction-manager", "--http", &format!("127.0.0.1:{port}")])
        .args(["--redis-url", &redis.url(), "--kafka-brokers", &tansu.brokers()])
        .arg("--jwt-key-file")
        .arg(&keys)
        .arg("--admin-password-file")
        .arg(dir.join("login-admin"))
        .args(["--login-failures-per-address", &per_address.to_string(), "--login-failures-per-user", "1000000000"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let node = Node(child);
    crate::wait_listening(port, "the node", Duration::from_secs(60))?;
    Ok((node, port))
}

/// Latencies of authenticated GETs, one at a time, for `window`.
async fn gets(client: &reqwest::Client, base: &str, token: &str, window: Duration) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let end = Instant::now() + window;
    while Instant::now() < end {
        let started = Instant::now();
        let ok = client
            .get(format!("{base}/api/panels"))
            .bearer_auth(token)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            latencies.push(started.elapsed());
        }
    }
    latencies
}

/// Bad logins at [`FLOOD_RATE`] a second until `stop`; counts answers by status.
fn flood(client: reqwest::Client, base: String, stop: Arc<AtomicU64>, seen: Arc<[AtomicU64; 4]>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / FLOOD_RATE));
        let mut n = 0u64;
        while stop.load(Ordering::Relaxed) == 0 {
            tick.tick().await;
            n += 1;
            let (client, base, seen) = (client.clone(), base.clone(), seen.clone());
            tokio::spawn(async move {
                let body = json!({"username": format!("guess{}", n % 1000), "password": "wrong"});
                let status =
                    client.post(format!("{base}/api/login")).json(&body).send().await.map(|r| r.status().as_u16());
                let slot = match status {
                    Ok(401) => 0,
                    Ok(429) => 1,
                    Ok(503) => 2,
                    _ => 3,
                };
                seen[slot].fetch_add(1, Ordering::Relaxed);
            });
        }
    });
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

struct Measured {
    p50: f64,
    p99: f64,
    samples: usize,
    answers: [u64; 4],
}

async fn measure(port: u16, flooding: bool, window: Duration) -> Result<Measured, String> {
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().no_proxy().build().map_err(|e| e.to_string())?;
    let login: Value = client
        .post(format!("{base}/api/login"))
        .json(&json!({"username": "admin", "password": "bench-admin-password"}))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let token = login["token"].as_str().ok_or(format!("login: {login}"))?.to_owned();
    gets(&client, &base, &token, Duration::from_secs(1)).await;
    let stop = Arc::new(AtomicU64::new(0));
    let seen: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    if flooding {
        flood(client.clone(), base.clone(), stop.clone(), seen.clone());
    }
    let mut latencies = gets(&client, &base, &token, window).await;
    stop.store(1, Ordering::Relaxed);
    latencies.sort();
    let answers = [0, 1, 2, 3].map(|i| seen[i].load(Ordering::Relaxed));
    Ok(Measured {
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        samples: latencies.len(),
        answers,
    })
}

/// The login flood table (markdown), or why it could not be measured.
pub(crate) fn table(dir: &Path, quick: bool) -> String {
    let window = Duration::from_secs(if quick { 3 } else { 10 });
    match run(dir, window) {
        Ok(table) => table,
        Err(error) => format!("login flood: not measured: {error}\n"),
    }
}

fn run(dir: &Path, window: Duration) -> Result<String, String> {
    let redis = RedisServer::start(&dir.join("login-redis"), false).map_err(|e| e.to_string())?;
    let tansu = Tansu::start(&dir.join("login-tansu"), TansuStorage::Memory).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = String::from(
        "| load | GET p50 | GET p99 | p99 ÷ quiet p99 | GETs | bad logins answered 401 / 429 / 503 / other |\n|---|---:|---:|---:|---:|---|\n",
    );
    let mut quiet_p99 = f64::NAN;
    for (label, per_address, flooding) in [
        ("quiet (baseline)", 20, false),
        ("200 bad logins/s, limits as shipped", 20, true),
        ("200 bad logins/s, limits lifted (every one hashed)", 1_000_000_000, true),
    ] {
        // A fresh node and Redis state for each load: counters start at zero.
        let _: () = runtime
            .block_on(async {
                let client = redis::Client::open(redis.url()).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("FLUSHALL").query_async::<()>(&mut conn).await.ok()
            })
            .unwrap_or(());
        let (node, port) = start(dir, &redis, &tansu, per_address)?;
        let measured = runtime.block_on(measure(port, flooding, window))?;
        drop(node);
        if !flooding {
            quiet_p99 = measured.p99;
        }
        let [unauthorized, limited, busy, other] = measured.answers;
        let answers = if flooding { format!("{unauthorized} / {limited} / {busy} / {other}") } else { "—".into() };
        out += &format!(
            "| {label} | {:.0} µs | {:.0} µs | {:.2} | {} | {answers} |\n",
            measured.p50,
            measured.p99,
            measured.p99 / quiet_p99,
            measured.samples
        );
    }
    Ok(out)
}

/// What the login table measures.
pub(crate) const NOTES: &str = "\
One `nexus node --roles transaction-manager` (the release binary, its own
redis-server and tansu); the harness sends authenticated `GET /api/panels`
one at a time for the window and records each latency, while a second task
sends 200 `POST /api/login` with wrong passwords a second (each on its own
connection task, so slow answers do not slow the flood). The ratio compares
each p99 with the quiet run's p99 from the same harness run (lower is
better; 1.00 = no effect). All from 127.0.0.1: with the limits as shipped
(20 failures a minute per address) the flood is answered 429 after its
first 20 attempts, without hashing; with the limits lifted every attempt
asks for an Argon2 hash, run on the blocking pool behind a semaphore of one
hash per two cores with a waiting room of 64, past which the answer is 503
at once. Client, node, Redis and the broker share the machine's two cores.
";
