//! Tool calls: the round trip of one call through Nexus — the caller's
//! `ToolRegistry` (`CallTool`) → Redis → the panel's sidecar → the panel's
//! `POST /mcp/execute` → back — against a direct keep-alive HTTP call to the
//! same panel with the body the sidecar sends, in the same run. Two panels:
//! a minimal actix-web panel in this process, and the Python template panel
//! (`panel-sdk-docs/python_minimal/server.py`) as a child process.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix::Arbiter;
use actix_web::{web, App, HttpResponse, HttpServer};
use futures::StreamExt;
use nexus_actors::bus::kafka::{KafkaBridge, KafkaConfig, SEMANTIC_EVENTS};
use nexus_actors::bus::redis::RedisBridge;
use nexus_actors::infra::{find_program, free_port, RedisServer, Tansu, TansuStorage};
use nexus_actors::platform::{Panel, PanelMode, PanelRecords};
use nexus_actors::sidecar::{self, SidecarConfig};
use nexus_actors::telemetry::Metrics;
use nexus_actors::tools::protocol::ToolCall;
use nexus_actors::tools::registry::{CallTool, ListTools, RegistryDeps};
use nexus_actors::tools::store::ToolStore;
use nexus_actors::tools::ToolRegistry;
use nexus_actors::{ActorRef, Kernel, Link};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::{per_sec, percentile, Row};

/// The user who owns the bench panels and makes every call.
const OWNER: &str = "bench";
/// Calls in flight in the throughput rows.
const IN_FLIGHT: usize = 32;
/// The sidecar's limit of calls running in the panel (at least `IN_FLIGHT`).
const MAX_CALLS: usize = 64;

pub(crate) const NOTES: &str = "\
Ratio as above: Nexus ÷ raw for throughput and raw ÷ Nexus for latency
(higher is better). One tool call, end to end. Nexus side: `CallTool` to the
caller node's `ToolRegistry` → `PUBLISH` on the panel's call channel → the
panel's sidecar (`nexus_actors::sidecar`, started in the harness process on
its own arbiter, with its own Redis bridge) → `POST /mcp/execute` on the
panel → the result published back on the registry's reply channel. Raw
baseline: the same `POST /mcp/execute` sent directly with reqwest
(keep-alive pool), with the body the sidecar sends (`call_id`, `tool`,
`arguments`, `deadline_ms`) and the same headers, to the same panel in the
same run. Besides the two publishes and their pub/sub deliveries, each call
through Nexus makes one Redis round trip for its idempotency claim (a fresh
key per call: the call id) and one to store its result, and resolves the
tool through the shared listing, which the registry caches for 2 s (so about
one call in every 2 s reads it from Redis again) and checks the arguments
against the tool's schema. Kafka recording is on: every call's
`nexus.tool.called` and `nexus.tool.finished` go to `semantic.events` on a
private `tansu` (memory storage) through the caller node's Kafka bridge,
off the call's path (a bounded queue, `nexus_actors::tools::recorder`); the
last row's note counts what was produced, dropped and failed. On this
machine tansu takes about 4,600 records a second (one record per batch, see
the first table), fewer than the 16,000 a second the Rust panel's
throughput row makes: the recorder's queue (16,384) absorbs about a second
of that and then drops, counted in the note. The call never waits for
Kafka, by design; a deployment's Kafka takes far more, and the queue is
for outages and bursts, not for a sustained rate above the broker's.
Where the time goes (`benches/profiles/tools.txt`): tansu and librdkafka
take over a third of the machine during the run (two records per call,
one record per produce request), and the rest of the gap is thread
wakeups: a call through Nexus crosses threads about six times, the
direct one twice; no function of Nexus's own is above 0.3% of samples.
Sequential
rows make one call at a time (p50/p99 per call); throughput rows keep 32
calls in flight (the sidecar's `max_calls` is 64, so none is refused as
busy). Rust panel: a minimal actix-web app in the harness process (one
worker thread) serving `echo`. Python panel: the template
`panel-sdk-docs/python_minimal/server.py` (`ThreadingHTTPServer`, HTTP/1.0:
one new connection per call on both sides) serving `word_count`, with fewer
calls. The template listens with a backlog of 128; with Python's default
of 5, 32 connections opening at once overflowed the queue and waited for the
kernel's 1 s retry, so the throughput row's note counts the machine's
listen-queue overflows during the run (none is expected).
The caller and its registry run on the harness's thread, each Redis bridge
and the sidecar on threads of their own, all on two cores shared with
redis-server (and the Python process).
";

/// One panel to measure: where it is, which tool, which arguments, what answer.
struct Target {
    labels: &'static [&'static str; 3],
    record: &'static str,
    url: String,
    tool: &'static str,
    arguments: Value,
    expect: Value,
    n: u64,
    warmup: u64,
}

/// Measures both panels on a private redis-server; `n` calls per side to
/// the Rust panel, `python_n` to the Python one.
pub(crate) async fn rows(dir: &Path, n: u64, python_n: u64) -> Vec<Row> {
    let redis = RedisServer::start(&dir.join("tools-redis"), false).expect("redis-server");
    let kernel = Kernel::new("bench-tools");
    let bridge_arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &bridge_arbiter.handle(), &redis.url()).expect("bridge");
    let store = ToolStore::connect(&redis.url()).await.expect("tool store");
    let tansu = Tansu::start(&dir.join("tools-tansu"), TansuStorage::Memory).expect("tansu");
    let kafka_arbiter = Arbiter::new();
    let kafka =
        KafkaBridge::spawn(&kernel, &kafka_arbiter.handle(), KafkaConfig::new(tansu.brokers())).await.expect("kafka");
    let kafka = Some(kafka.link(ToolRegistry::KIND));
    let registry = ToolRegistry::spawn(RegistryDeps { kernel: kernel.clone(), store, redis: bridge, kafka });
    let panels = PanelRecords::connect(&redis.url()).await.expect("panel records");
    let mut rows = Vec::new();

    let (url, panel_server) = serve_echo_panel();
    let target = Target {
        labels: &[
            "tool call, Rust panel: sequential p50",
            "tool call, Rust panel: sequential p99",
            "tool call, Rust panel: 32 in flight",
        ],
        record: "0190a5a4-0000-7000-8000-00000000be04",
        url,
        tool: "echo",
        arguments: json!({"text": "hello"}),
        expect: json!({"text": "hello"}),
        n,
        warmup: 200,
    };
    rows.extend(measure(&target, &redis, &panels, &registry).await);
    panel_server.stop(true).await;

    match PythonPanel::start(dir) {
        Ok(python) => {
            let target = Target {
                labels: &[
                    "tool call, Python panel: sequential p50",
                    "tool call, Python panel: sequential p99",
                    "tool call, Python panel: 32 in flight",
                ],
                record: "0190a5a4-0000-7000-8000-00000000be05",
                url: format!("http://127.0.0.1:{}", python.port),
                tool: "word_count",
                arguments: json!({"text": "one two three"}),
                expect: json!({"words": 3, "characters": 13, "lines": 1}),
                n: python_n,
                warmup: 50,
            };
            rows.extend(measure(&target, &redis, &panels, &registry).await);
            drop(python);
        }
        Err(error) => eprintln!("tool calls: skipping the Python panel: {error}"),
    }
    if let Some(last) = rows.last_mut() {
        last.note += &recorded(&kernel).await;
    }
    bridge_arbiter.stop();
    kafka_arbiter.stop();
    rows
}

/// What the run recorded on Kafka, once the recorder's queue has drained:
/// two records per call made (warm-up calls too).
async fn recorded(kernel: &Kernel) -> String {
    let m = kernel.metrics();
    // Every call of the run answers `ok` (the rows' notes count the answers).
    let calls = || Metrics::counter_value(&m.mcp_exec, &["panel", "ok"]);
    let produced = || Metrics::counter_value(&m.bus_published, &["kafka", SEMANTIC_EVENTS]);
    let dropped = || m.tool_records_dropped.get();
    let failed = || Metrics::counter_value(&m.bus_errors, &["kafka", "tool_record"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while produced() + dropped() < 2 * calls() && Instant::now() < deadline {
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
    format!(
        "; Kafka recording on: {} records produced for {} calls, {} dropped, {} produce failures",
        produced(),
        calls(),
        dropped(),
        failed()
    )
}

// ---- the panels -------------------------------------------------------------

/// The Rust panel: `echo` answers `{"result": {"text": <arguments.text>}}`.
fn serve_echo_panel() -> (String, actix_web::dev::ServerHandle) {
    let server = HttpServer::new(|| {
        App::new().route("/manifest", web::get().to(echo_manifest)).route("/mcp/execute", web::post().to(echo_execute))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .expect("bind the bench panel");
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix::spawn(server);
    (format!("http://{addr}"), handle)
}

async fn echo_manifest() -> HttpResponse {
    HttpResponse::Ok().json(json!({"name": "bench", "tools": [{
        "name": "echo",
        "desc": "Echoes its text",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
    }]}))
}

async fn echo_execute(body: web::Json<Value>) -> HttpResponse {
    match body["tool"].as_str() {
        Some("echo") => HttpResponse::Ok().json(json!({"result": {"text": body["arguments"]["text"]}})),
        _ => HttpResponse::Ok().json(json!({"error": "unknown tool"})),
    }
}

/// The Python template panel as a child process; killed on drop.
pub(crate) struct PythonPanel {
    child: Child,
    pub(crate) port: u16,
}

impl PythonPanel {
    pub(crate) fn start(dir: &Path) -> Result<Self, String> {
        let python = find_program("python3").ok_or("python3 is not installed")?;
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../panel-sdk-docs/python_minimal/server.py");
        if !script.exists() {
            return Err(format!("{} is missing", script.display()));
        }
        let port = free_port().map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("python-panel.log")).map_err(|e| e.to_string())?;
        let child = Command::new(python)
            .arg(&script)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let panel = PythonPanel { child, port };
        crate::wait_listening(port, "the Python panel", Duration::from_secs(15))?;
        Ok(panel)
    }
}

impl Drop for PythonPanel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the sidecar -------------------------------------------------------------

/// A sidecar running on an arbiter of its own, as it would in its own process.
struct RunningSidecar {
    arbiter: Arbiter,
    handle: actix_web::dev::ServerHandle,
    done: oneshot::Receiver<()>,
}

impl RunningSidecar {
    async fn start(config: SidecarConfig) -> Self {
        let arbiter = Arbiter::new();
        let (started_tx, started) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        arbiter.spawn_fn(move || {
            actix::spawn(async move {
                match sidecar::start(config).await {
                    Ok(sidecar) => {
                        let _ = started_tx.send(Ok(sidecar.handle()));
                        if let Err(error) = sidecar.run().await {
                            eprintln!("sidecar: {error}");
                        }
                    }
                    Err(error) => {
                        let _ = started_tx.send(Err(error.to_string()));
                    }
                }
                let _ = done_tx.send(());
            });
        });
        let handle = started.await.expect("sidecar arbiter").expect("sidecar starts");
        RunningSidecar { arbiter, handle, done }
    }

    /// Stops it as SIGTERM does (its tools leave the listing) and waits.
    async fn stop(self) {
        self.handle.stop(true).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.done).await;
        self.arbiter.stop();
    }
}

// ---- measuring ----------------------------------------------------------------

async fn measure(
    target: &Target,
    redis: &RedisServer,
    panels: &PanelRecords,
    registry: &ActorRef<ToolRegistry>,
) -> Vec<Row> {
    let record = Panel {
        id: target.record.into(),
        name: target.record.into(),
        owner: OWNER.into(),
        mode: PanelMode::Studio,
        source: "nexus-bench".into(),
        public: false,
    };
    panels.put(&record).await.expect("panel record");
    let mut config = SidecarConfig::new(target.record, redis.url());
    config.panel_url = target.url.clone();
    config.listen = format!("127.0.0.1:{}", free_port().expect("port")).parse().expect("address");
    config.max_calls = MAX_CALLS;
    assert!(config.max_calls >= IN_FLIGHT);
    let sidecar = RunningSidecar::start(config).await;

    let name = format!("{}.{}", target.record, target.tool);
    wait_listed(registry, &name).await;
    let link = registry.link::<CallTool>("bench");
    // The first calls also wait for both sides' subscriptions: retry until one answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let call = ToolCall::new(&name, target.arguments.clone(), OWNER).with_timeout(Duration::from_secs(2));
        match link.ask(CallTool(call)).await.expect("registry") {
            Ok(_) => break,
            Err(error) if Instant::now() < deadline => {
                eprintln!("tool calls: warm-up call failed ({error}); retrying");
                actix::clock::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("{name} never answered through the sidecar: {error}"),
        }
    }

    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(MAX_CALLS)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let execute = format!("{}/mcp/execute", target.url);
    let raw = || direct(&http, &execute, target.tool, &target.arguments);
    let nexus = || through_nexus(&link, &name, &target.arguments);
    for _ in 0..target.warmup {
        let _ = raw().await;
        let _ = nexus().await;
    }

    let (n, expect) = (target.n, &target.expect);
    let raw_seq = sequential(n, expect, raw).await;
    let nexus_seq = sequential(n, expect, nexus).await;
    let raw_par = concurrent(n, expect, raw).await;
    let nexus_par = concurrent(n, expect, nexus).await;
    sidecar.stop().await;

    let [p50, p99, par] = target.labels;
    vec![
        Row {
            name: p50,
            unit: "µs",
            nexus: percentile(&nexus_seq.latencies, 0.5),
            raw: percentile(&raw_seq.latencies, 0.5),
            higher_is_better: false,
            note: format!("{n} calls one at a time; {}", ok_note(&nexus_seq.tally, &raw_seq.tally, n)),
        },
        Row {
            name: p99,
            unit: "µs",
            nexus: percentile(&nexus_seq.latencies, 0.99),
            raw: percentile(&raw_seq.latencies, 0.99),
            higher_is_better: false,
            note: String::new(),
        },
        Row {
            name: par,
            unit: "calls/s",
            nexus: nexus_par.throughput,
            raw: raw_par.throughput,
            higher_is_better: true,
            note: format!(
                "{n} calls; {}; p99 under load {:.1} ms, raw {:.1} ms{}",
                ok_note(&nexus_par.tally, &raw_par.tally, n),
                percentile(&nexus_par.latencies, 0.99) / 1e3,
                percentile(&raw_par.latencies, 0.99) / 1e3,
                overflow_note(nexus_par.listen_overflows + raw_par.listen_overflows),
            ),
        },
    ]
}

async fn wait_listed(registry: &ActorRef<ToolRegistry>, name: &str) {
    let list = registry.link::<ListTools>("bench");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let listed = list.ask(ListTools { user: OWNER.into() }).await.expect("registry");
        if listed.map(|tools| tools.iter().any(|t| t.name == name)).unwrap_or(false) {
            return;
        }
        actix::clock::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name} was never listed");
}

/// What the sidecar would send, sent directly.
async fn direct(http: &reqwest::Client, url: &str, tool: &str, arguments: &Value) -> Result<Value, String> {
    let call = ToolCall::new(tool, arguments.clone(), OWNER);
    let deadline_ms = call.remaining().as_millis() as u64;
    let body = json!({
        "call_id": call.call_id,
        "tool": tool,
        "arguments": call.arguments,
        "deadline_ms": deadline_ms,
    });
    let response = http
        .post(url)
        .header("x-nexus-call-id", &call.call_id)
        .header("x-nexus-deadline-ms", deadline_ms)
        .json(&body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let mut answer: Value = response.json().await.map_err(|e| e.to_string())?;
    match answer.get_mut("result") {
        Some(result) => Ok(result.take()),
        None => Err(format!("no result: {answer}")),
    }
}

async fn through_nexus(link: &Link<CallTool>, name: &str, arguments: &Value) -> Result<Value, String> {
    let call = ToolCall::new(name, arguments.clone(), OWNER);
    link.ask(CallTool(call)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

#[derive(Default)]
struct Tally {
    ok: u64,
    first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, result: Result<Value, String>, expect: &Value) {
        match result {
            Ok(value) if &value == expect => self.ok += 1,
            Ok(value) => {
                self.first_error.get_or_insert_with(|| format!("unexpected result {value}"));
            }
            Err(error) => {
                self.first_error.get_or_insert(error);
            }
        }
    }
}

fn ok_note(nexus: &Tally, raw: &Tally, n: u64) -> String {
    let mut note = format!("answered {}/{n}, raw {}/{n}", nexus.ok, raw.ok);
    for (side, tally) in [("Nexus", nexus), ("raw", raw)] {
        if let Some(error) = &tally.first_error {
            note += &format!("; first {side} error: {}", error.replace('|', "/"));
        }
    }
    note
}

fn overflow_note(overflows: u64) -> String {
    match overflows {
        0 => String::new(),
        n => format!("; {n} TCP listen-queue overflows (connections retried after 1 s)"),
    }
}

/// The machine's count of connections dropped because a listen queue was
/// full (`TcpExt: ListenOverflows` in /proc/net/netstat).
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenOverflows")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

struct Run {
    /// Calls a second (concurrent runs only).
    throughput: f64,
    /// Per call in µs, sorted.
    latencies: Vec<u64>,
    tally: Tally,
    /// Connections the machine dropped for a full listen queue during the run.
    listen_overflows: u64,
}

/// `n` calls, one at a time.
async fn sequential<F, Fut>(n: u64, expect: &Value, call: F) -> Run
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Value, String>>,
{
    let mut latencies = Vec::with_capacity(n as usize);
    let mut tally = Tally::default();
    for _ in 0..n {
        let t = Instant::now();
        let result = call().await;
        latencies.push(t.elapsed().as_micros() as u64);
        tally.add(result, expect);
    }
    latencies.sort_unstable();
    Run { throughput: f64::NAN, latencies, tally, listen_overflows: 0 }
}

/// `n` calls, `IN_FLIGHT` at a time.
async fn concurrent<F, Fut>(n: u64, expect: &Value, call: F) -> Run
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Value, String>>,
{
    let overflows = listen_overflows();
    let started = Instant::now();
    let timed = |_| {
        let call = call();
        async move {
            let t = Instant::now();
            let result = call.await;
            (t.elapsed().as_micros() as u64, result)
        }
    };
    let (mut latencies, tally) = futures::stream::iter(0..n)
        .map(timed)
        .buffer_unordered(IN_FLIGHT)
        .fold(
            (Vec::with_capacity(n as usize), Tally::default()),
            |(mut latencies, mut tally), (us, result)| async move {
                latencies.push(us);
                tally.add(result, expect);
                (latencies, tally)
            },
        )
        .await;
    let throughput = per_sec(n, started.elapsed());
    latencies.sort_unstable();
    Run { throughput, latencies, tally, listen_overflows: listen_overflows().saturating_sub(overflows) }
}
