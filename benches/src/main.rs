//! `nexus-bench`: measures Nexus against the raw clients it is built on, in
//! one run on one machine, and prints (and with `--write`, records) a table.
//!
//! Rows: (a) kernel request/reply and one-way vs raw actix; (b) Redis bridge
//! publish → subscriber actor vs raw redis-rs publish → subscribe; (c) Kafka
//! bridge produce → acknowledging actor vs raw rdkafka producer → consumer on
//! the same tansu broker. A second table times tool calls through a
//! sidecar against direct HTTP calls to the same panel ([`tools`]), a third
//! WebSocket fan-out ([`sessions`]), and two about panels ([`panels`]): the
//! traffic gateway against direct requests and nginx, and an App's cold
//! start, and two about the LLM manager ([`llm`]): against direct model
//! calls, and beside LangGraph. Timings are reported, never asserted.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::{Actor, Arbiter};
use futures::{StreamExt, TryStreamExt};
use nexus_actors::bus::kafka::{ensure_topics, Consume, KafkaBridge, KafkaConfig, KafkaRecord, Nack, Produce};
use nexus_actors::bus::redis::{RedisBridge, Subscribe, Topic};
use nexus_actors::bus::BusEvent;
use nexus_actors::infra::{RedisServer, Tansu, TansuStorage};
use nexus_actors::{Behaviour, Ctx, Envelope, Handler, Kernel, Message, Reply};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message as _};
use serde_json::json;

/// What `--only` can run by itself.
const PARTS: [&str; 8] = ["panels", "login", "llm", "deploy", "bus", "tools", "sessions", "cold"];

const USAGE: &str = "\
usage: nexus-bench [--quick] [--write FILE]     every table (--write records them)
       nexus-bench [--quick] --only PART        one part, printed
         PART: panels, login, llm, deploy, bus, tools, sessions, cold
       nexus-bench chaos [--short]              the chaos harness (scripts/chaos)
";

/// Refuses what a run would not understand, before anything starts: an
/// unknown flag must not start the whole hour-long run.
fn check_args(args: &[String]) -> Result<(), String> {
    let mut rest = args.iter();
    let mut seen = Vec::new();
    while let Some(arg) = rest.next() {
        if seen.contains(&arg.as_str()) {
            return Err(format!("{arg} given twice"));
        }
        seen.push(arg.as_str());
        match arg.as_str() {
            "--quick" => {}
            "--write" => match rest.next() {
                Some(file) if !file.starts_with("--") => {}
                _ => return Err("--write needs a file".into()),
            },
            "--only" => {
                let part = rest.next().ok_or("--only needs a part")?;
                if !PARTS.contains(&part.as_str()) {
                    return Err(format!("--only {part}: no such part"));
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(())
}

struct Sizes {
    kernel: u64,
    redis: u64,
    kafka: u64,
    /// Tool calls to the Rust panel, and to the Python panel.
    tools: u64,
    python_tools: u64,
}

mod chaos;
mod deploy;
mod llm;
mod login;
mod panels;
mod sessions;
mod shards;
mod tools;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("chaos") {
        if !chaos::run(&args[1..]) {
            std::process::exit(1);
        }
        return;
    }
    if args.first().map(String::as_str) == Some("serve-node") {
        return sessions::serve_node(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("serve-llm-node") {
        return llm::serve_node(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("serve-raw-ws") {
        return sessions::serve_raw(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("serve-clients") {
        return sessions::serve_clients(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("serve-hello") {
        return panels::serve_hello(&args[1..]);
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return;
    }
    if let Err(error) = check_args(&args) {
        eprint!("nexus-bench: {error}\n{USAGE}");
        std::process::exit(2);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let write = args.iter().position(|a| a == "--write").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    // `--only panels`: just the panel tables, printed (a partial run never
    // overwrites RESULTS.md).
    let only_panels = args.windows(2).any(|w| w[0] == "--only" && w[1] == "panels");
    let only_login = args.windows(2).any(|w| w[0] == "--only" && w[1] == "login");
    let only_llm = args.windows(2).any(|w| w[0] == "--only" && w[1] == "llm");
    let only_deploy = args.windows(2).any(|w| w[0] == "--only" && w[1] == "deploy");
    let only_bus = args.windows(2).any(|w| w[0] == "--only" && w[1] == "bus");
    let only_tools = args.windows(2).any(|w| w[0] == "--only" && w[1] == "tools");
    let only_sessions = args.windows(2).any(|w| w[0] == "--only" && w[1] == "sessions");
    let only_cold = args.windows(2).any(|w| w[0] == "--only" && w[1] == "cold");
    let partial =
        only_panels || only_login || only_llm || only_deploy || only_bus || only_tools || only_sessions || only_cold;
    if partial && write.is_some() {
        eprintln!("--only prints its tables; --write needs the full run");
        std::process::exit(2);
    }
    let sizes = if quick {
        Sizes { kernel: 20_000, redis: 5_000, kafka: 2_000, tools: 2_000, python_tools: 500 }
    } else {
        Sizes { kernel: 200_000, redis: 50_000, kafka: 20_000, tools: 20_000, python_tools: 2_000 }
    };
    let dir = std::env::temp_dir().join(format!("nexus-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    if only_login {
        println!("{}", login::table(&dir, quick));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if only_llm {
        let (manager, peer) = llm::tables(&dir, quick);
        println!("{manager}\n{peer}");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if only_deploy {
        println!("{}", actix_rt::System::new().block_on(deploy::table(&dir)));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if only_tools {
        let rows = actix_rt::System::new().block_on(tools::rows(&dir, sizes.tools, sizes.python_tools));
        println!("{}", render(&rows));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if only_sessions {
        println!("{}", sessions::table(&dir, if quick { &[500] } else { &[5_000, sessions::LARGE] }));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if only_cold {
        let sizes = panels::Sizes::new(quick);
        println!("{}", actix_rt::System::new().block_on(panels::cold_start(&dir, &sizes)));
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    if only_panels {
        let (overhead, cold) = panel_tables(&dir, quick);
        println!("{overhead}\n{cold}");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let rows = actix_rt::System::new().block_on(async {
        let mut rows = Vec::new();
        rows.extend(kernel_rows(sizes.kernel).await);
        rows.extend(redis_rows(&dir, sizes.redis).await);
        rows.extend(shards::rows(&dir, sizes.redis).await);
        rows.extend(kafka_rows(&dir, sizes.kafka).await);
        rows
    });
    let table = render(&rows);
    println!("{table}");
    if only_bus {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    // A system of its own: the raw consumers of the rows above are gone.
    let tool_rows = actix_rt::System::new().block_on(tools::rows(&dir, sizes.tools, sizes.python_tools));
    let tools_table = render(&tool_rows);
    println!("{tools_table}");
    let sessions_table = sessions::table(&dir, if quick { &[500] } else { &[5_000, sessions::LARGE] });
    println!("{sessions_table}");
    let (overhead_table, cold_table) = panel_tables(&dir, quick);
    println!("{overhead_table}\n{cold_table}");
    let deploy_table = actix_rt::System::new().block_on(deploy::table(&dir));
    println!("{deploy_table}");
    let login_table = login::table(&dir, quick);
    println!("{login_table}");
    let (llm_table, peer_table) = llm::tables(&dir, quick);
    println!("{llm_table}\n{peer_table}");
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(path) = write {
        // scripts/bench says how it was called; run directly, the cargo command.
        let command = std::env::var("NEXUS_BENCH_COMMAND").map(|c| c.trim().to_owned()).unwrap_or_else(|_| {
            let quick = if quick { " --quick" } else { "" };
            format!("cargo run --release -p nexus-benches --{quick} --write {}", path.display())
        });
        let doc = format!(
            "# Benchmark results\n\nLatest run of `{command}`.\n\n{}\n{table}\n{}\n## Tool calls\n\n{tools_table}\n{}\n## WebSocket sessions\n\n{sessions_table}\n{}\n## Gateway overhead\n\n{overhead_table}\n{}\n## App cold start\n\n{cold_table}\n{}\n## Deploy\n\n{deploy_table}\n{}\n## API latency during a login flood\n\n{login_table}\n{}\n## LLM manager\n\n{llm_table}\n{}\n## LLM manager and LangGraph, side by side\n\n{peer_table}\n{}",
            machine(),
            NOTES,
            tools::NOTES,
            SESSION_NOTES,
            panels::OVERHEAD_NOTES,
            panels::COLD_NOTES,
            deploy::NOTES,
            login::NOTES,
            llm::NOTES,
            llm::PEER_NOTES
        );
        // The chaos section is written by `scripts/chaos`; a bench run keeps it.
        let kept =
            std::fs::read_to_string(&path).ok().and_then(|old| Some(old[old.find(chaos::HEADING)?..].to_owned()));
        let doc = match kept {
            Some(chaos) => format!("{}\n{chaos}", doc.trim_end()),
            None => doc,
        };
        std::fs::write(&path, doc).expect("write results");
        eprintln!("wrote {}", path.display());
    }
}

/// The gateway overhead and cold-start tables, each in an actix system of
/// its own (the gateway's route table and the panel manager are actors).
fn panel_tables(dir: &std::path::Path, quick: bool) -> (String, String) {
    let sizes = panels::Sizes::new(quick);
    let overhead = actix_rt::System::new().block_on(panels::overhead(dir, &sizes));
    let cold = actix_rt::System::new().block_on(panels::cold_start(dir, &sizes));
    (overhead, cold)
}

const NOTES: &str = "\
Ratio is Nexus ÷ raw for throughput (higher is better, 1.00 = parity) and
raw ÷ Nexus for latency (higher is better). Each kernel figure is the median
of three runs. Redis and Kafka run against a private `redis-server` and a
private `tansu` (memory storage) started by the harness on loopback; the
Nexus and raw sides use the same broker, payload (a CloudEvents envelope of
about 250 bytes) and concurrency (64 publishes / 256 produces in flight);
both Kafka consumers use the bridge's `fetch.wait.max.ms`.
Latency is from creating a message to the receiving actor (or raw consumer
loop) handling it. Kafka latencies come from the burst: all N records are
sent at once, so they include queueing behind it (p50 is roughly half the
run). Redis latencies come from a paced run of N/5 messages at 10,000 a
second, below what either side can carry, so they show the path, not a
queue. Bus rows are one run per side, one after the other: expect noise of
tens of percent between runs. Threads: the raw Redis and Kafka sides run
entirely on the harness's thread; the Nexus sides also use a bridge thread
(the Redis bridge reads pub/sub there) and a subscriber thread, on two
cores shared with the broker. Goals: kernel within 10% of raw actix,
bridges at 0.8 of the raw clients or better.

Where the time goes (structure; profiles in `benches/profiles/`): on this
machine a thread wakeup costs more than a publish (the kernel request/reply
row is one cross-thread round trip per message), so the paths are measured
by the hops they make. A Redis publish runs in the caller's task on a
connection of the caller's thread, with no hop; the remaining cost against
raw is delivery, read on the bridge's thread and handed to the subscriber's
(one `try_tell` per subscriber, of one shared decoded message). A Kafka
record reaches its subscriber with an `ask` (one cross-thread round trip);
records of different keys are in flight together, so the round trips
overlap, and acknowledgements fold into one stored offset per partition.

**Kafka throughput, one record per batch.** Both Kafka sides produce with
`batch.num.messages=1` (`KafkaConfig::producer`): tansu 0.6 answers a
fetch that starts inside a batch with nothing, and reports a partition's
end as its last batch's base offset, so every record is a batch of its
own. That is why both columns carry about 3,000 records a second here,
where earlier runs with batching carried 30,000–60,000: each record is a
produce request that tansu decodes and stores alone, on the same two
cores. The ratio is what the goal is about; the absolute rate is the broker's.
What would bring it back: batching again once the broker serves fetches
inside batches (a Kafka or a later tansu; the setting is one line), with
the bridge's consumer unchanged.

The **document fan-out** rows ([`shards`]) compare Nexus with Nexus: the
Nexus column is a bridge whose document channels are on a Redis Cluster of
three masters (no replicas; `SPUBLISH`/`SSUBSCRIBE` on the master of each
channel's slot, through one cluster connection), the baseline column the
same bridge on one Redis (`PUBLISH`/`SUBSCRIBE` on the per-thread
publishing connections and the pub/sub connection). Both carry N changes
spread over 256 document channels, 64 publishes in flight, to one
subscriber of every channel, and N/5 paced. All three masters share the
machine's two cores with the harness, so this row shows what sharding
costs a node, not what it buys: a cluster's gain is more cores and
machines, each master carrying only its slots' writes and changes.
";

const SESSION_NOTES: &str = "\
N WebSocket clients (tokio-tungstenite, in the harness process) follow one
document without presence; the harness patches it five times through the
first node's HTTP API and times each change from the PATCH request to its
arrival at every client. With two nodes the clients are split between them
and every change crosses Redis pub/sub to the second node. Nodes run as
separate processes (`nexus-bench serve-node`); memory per idle session is the
growth of their resident memory, after every client subscribed, divided by N.
The **raw broadcast server** is the baseline, measured in the same run with
the same clients: `nexus-bench serve-raw-ws`, a tokio-tungstenite server on
two worker threads (4 KiB read buffers, unbuffered writes) that answers a
client's first frame with a snapshot and sends every change, serialised
once, to every connection; a change is triggered by a line on a local TCP
port instead of a PATCH (no authentication, no storage, no Redis). The last
column is raw ÷ this row for p50, p99 and memory per session (1.00 = as
good as the raw server, lower = costlier). A Nexus node serialises a change
once per node and every session queues the same bytes; its sessions cost
more memory than the raw server's connections: each has an actor, a
bounded outbound queue and the connection's task, which the node's server
hands the upgraded socket (actix-http's upgrade handler): it reads the
client's frames and writes the queued ones, with buffers sized to need.
Clients, servers, Redis and the broker share the machine's two cores, so much of every row's latency is the clients' own
work of reading N sockets.
The 20,000-session rows split the sockets: a process may open at most
20,000 files on this machine (the hard limit, which root lacks
`CAP_SYS_RESOURCE` to raise), so two nodes hold 10,000 sessions each, the
clients run in two child processes of 10,000 (`nexus-bench serve-clients`,
one per server, reporting arrival times as readings of the machine's
monotonic clock), and the baselines are two raw servers and two Sockudo
servers with the same two client processes. The client processes run one
worker thread each, the harness two, so these rows compare with each
other, not with the 5,000 rows.
The **peer** is Sockudo 5.2 (crates.io `sockudo`, a Rust server of the
Pusher protocol; `scripts/bench` installs it without its OpenTelemetry
exporter), run with the local adapter (no Redis), memory app manager and
cache, no queue, no rate or connection limits: the same clients subscribe
to one public channel with Pusher's `pusher:subscribe`, and each change is
an event triggered through its signed HTTP API (`POST /apps/<id>/events`),
timed like a PATCH from the request to its arrival at every client. Its
last column is Sockudo ÷ this row for p50, p99 and memory per connection
(1.00 = as good as Sockudo). Sockudo does less per change than a node
(no authentication of the trigger's user, no storage, no version), as the
raw server does; at 20,000 there are two Sockudo servers (their channels
are not shared: each trigger goes to both), like the two raw servers.
";

struct Row {
    name: &'static str,
    unit: &'static str,
    nexus: f64,
    raw: f64,
    higher_is_better: bool,
    note: String,
}

fn render(rows: &[Row]) -> String {
    let mut out =
        String::from("| measurement | unit | Nexus | raw baseline | ratio | note |\n|---|---|---:|---:|---:|---|\n");
    for r in rows {
        let ratio = if r.higher_is_better { r.nexus / r.raw } else { r.raw / r.nexus };
        out += &format!("| {} | {} | {:.0} | {:.0} | {:.2} | {} |\n", r.name, r.unit, r.nexus, r.raw, ratio, r.note);
    }
    out
}

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1048576.0))
        .unwrap_or_default();
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    // Recorded because the machine may be shared: other work running during
    // the run shows up as noise in every row.
    let load = read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    format!(
        "- date: {}\n- machine: {cores} cores, {cpu}, {mem} RAM, Linux {kernel}\n- load average (1/5/15 min) \
         at the end of the run: {load}\n- commit: {commit}\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    )
}

/// Waits until something listens on 127.0.0.1:`port`, for at most `within`.
fn wait_listening(port: u16, what: &str, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{what} did not start listening on {port}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn per_sec(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64
}

// ---- (a) kernel vs raw actix ---------------------------------------------

struct Counter(u64);
impl Behaviour for Counter {
    const KIND: &'static str = "bench_counter";
    const MAILBOX: usize = 1 << 20;
}
struct Inc;
impl Message for Inc {
    type Reply = u64;
}
impl Handler<Inc> for Counter {
    fn handle(&mut self, _: Inc, _: &mut Ctx<Self>) -> Reply<u64> {
        self.0 += 1;
        Reply::Now(self.0)
    }
}

struct RawCounter(u64);
impl Actor for RawCounter {
    type Context = actix::Context<Self>;
}
struct RawInc;
impl actix::Message for RawInc {
    type Result = u64;
}
impl actix::Handler<RawInc> for RawCounter {
    type Result = u64;
    fn handle(&mut self, _: RawInc, _: &mut Self::Context) -> u64 {
        self.0 += 1;
        self.0
    }
}

async fn kernel_rows(n: u64) -> Vec<Row> {
    let kernel = Kernel::new("bench");
    let arbiter = Arbiter::new();
    let nexus = kernel.spawn_on(&arbiter.handle(), "counter", || Counter(0)).link::<Inc>("bench");
    let raw = RawCounter::start_in_arbiter(&arbiter.handle(), |ctx| {
        // The kernel's capacity for the counter, so that try_send compares like with like.
        ctx.set_mailbox_capacity(Counter::MAILBOX);
        RawCounter(0)
    });
    let (mut n_ask, mut r_ask, mut n_tell, mut r_tell) = (vec![], vec![], vec![], vec![]);
    let (mut n_try, mut r_try) = (vec![], vec![]);
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..n {
            nexus.ask(Inc).await.expect("ask");
        }
        n_ask.push(per_sec(n, t.elapsed()));
        let t = Instant::now();
        for _ in 0..n {
            raw.send(RawInc).await.expect("send");
        }
        r_ask.push(per_sec(n, t.elapsed()));
        let t = Instant::now();
        for _ in 0..n {
            let _ = nexus.tell(Inc);
        }
        nexus.ask(Inc).await.expect("drain");
        n_tell.push(per_sec(n + 1, t.elapsed()));
        let t = Instant::now();
        for _ in 0..n {
            raw.do_send(RawInc);
        }
        raw.send(RawInc).await.expect("drain");
        r_tell.push(per_sec(n + 1, t.elapsed()));
        // The bridges' path: refused, never queued, when the mailbox is full
        // (it holds every message of the burst here, so none is refused).
        let t = Instant::now();
        for _ in 0..n {
            nexus.try_tell(Inc).expect("room in the mailbox");
        }
        nexus.ask(Inc).await.expect("drain");
        n_try.push(per_sec(n + 1, t.elapsed()));
        let t = Instant::now();
        for _ in 0..n {
            raw.try_send(RawInc).expect("room in the mailbox");
        }
        raw.send(RawInc).await.expect("drain");
        r_try.push(per_sec(n + 1, t.elapsed()));
    }
    arbiter.stop();
    vec![
        Row {
            name: "kernel request/reply (ask vs send)",
            unit: "msg/s",
            nexus: median(n_ask),
            raw: median(r_ask),
            higher_is_better: true,
            note: "median of 3".into(),
        },
        Row {
            name: "kernel one-way (tell vs do_send)",
            unit: "msg/s",
            nexus: median(n_tell),
            raw: median(r_tell),
            higher_is_better: true,
            note: "median of 3".into(),
        },
        Row {
            name: "kernel bounded one-way (try_tell vs try_send)",
            unit: "msg/s",
            nexus: median(n_try),
            raw: median(r_try),
            higher_is_better: true,
            note: "median of 3; the bridges' delivery path".into(),
        },
    ]
}

// ---- (b) Redis bridge vs raw redis-rs -------------------------------------

fn ping(seq: u64) -> Envelope {
    Envelope::with_type("nexus.bench.ping", "bench", json!({ "seq": seq, "sent_us": now_us() }))
}

/// Records delivery latency of every envelope it receives.
struct Sink {
    latencies: Arc<Mutex<Vec<u64>>>,
}
impl Behaviour for Sink {
    const KIND: &'static str = "bench_sink";
    const MAILBOX: usize = 1 << 16;
}
impl Handler<BusEvent> for Sink {
    fn handle(&mut self, event: BusEvent, _: &mut Ctx<Self>) -> Reply<()> {
        if let BusEvent::Message(m) = event {
            record(&self.latencies, &m.envelope);
        }
        Reply::Now(())
    }
}
impl Handler<KafkaRecord> for Sink {
    fn handle(&mut self, kafka: KafkaRecord, _: &mut Ctx<Self>) -> Reply<Result<(), Nack>> {
        record(&self.latencies, &kafka.envelope);
        Reply::Now(Ok(()))
    }
}

fn record(latencies: &Mutex<Vec<u64>>, envelope: &Envelope) {
    let sent = envelope.data["sent_us"].as_u64().unwrap_or(0);
    latencies.lock().unwrap().push(now_us().saturating_sub(sent));
}

async fn wait_for(latencies: &Mutex<Vec<u64>>, n: u64, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    while (latencies.lock().unwrap().len() as u64) < n && Instant::now() < deadline {
        actix::clock::sleep(Duration::from_micros(200)).await;
    }
    Instant::now()
}

struct Run {
    throughput: f64,
    p50: f64,
    p99: f64,
    delivered: u64,
}

fn run_of(n: u64, elapsed: Duration, latencies: &Mutex<Vec<u64>>) -> Run {
    let mut l = latencies.lock().unwrap().clone();
    l.sort_unstable();
    let delivered = l.len() as u64;
    Run {
        throughput: per_sec(delivered.min(n), elapsed),
        p50: percentile(&l, 0.5),
        p99: percentile(&l, 0.99),
        delivered,
    }
}

fn latency_rows(prefix: &[&'static str; 3], n: u64, nexus: &Run, raw: &Run) -> Vec<Row> {
    let delivered = format!("delivered {}/{n}, raw {}/{n}", nexus.delivered, raw.delivered);
    vec![
        Row {
            name: prefix[0],
            unit: "msg/s",
            nexus: nexus.throughput,
            raw: raw.throughput,
            higher_is_better: true,
            note: delivered,
        },
        Row {
            name: prefix[1],
            unit: "µs",
            nexus: nexus.p50,
            raw: raw.p50,
            higher_is_better: false,
            note: String::new(),
        },
        Row {
            name: prefix[2],
            unit: "µs",
            nexus: nexus.p99,
            raw: raw.p99,
            higher_is_better: false,
            note: String::new(),
        },
    ]
}

async fn redis_rows(dir: &std::path::Path, n: u64) -> Vec<Row> {
    let server = RedisServer::start(&dir.join("redis"), false).expect("redis-server");
    let kernel = Kernel::new("bench");
    let (bridge_arbiter, sink_arbiter) = (Arbiter::new(), Arbiter::new());
    let bus = RedisBridge::spawn(&kernel, &bridge_arbiter.handle(), &server.url()).expect("bridge");
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let l = latencies.clone();
    let sink = kernel.spawn_on(&sink_arbiter.handle(), "sink", move || Sink { latencies: l.clone() });
    let subscribe =
        Subscribe { topic: Topic::Channel("nexus:bench:nexus".into()), subscriber: sink.link("redis-bridge") };
    bus.link::<Subscribe>("bench").ask(subscribe).await.expect("ask").expect("subscribe");
    // Wait for the connection (publishes fail fast until it is up).
    let publish = bus.publisher.clone();
    while publish.publish("nexus:bench:warmup", ping(0)).await.is_err() {
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|seq| publish.publish("nexus:bench:nexus", ping(seq)))
        .buffer_unordered(64)
        .for_each(|r| async move {
            r.expect("publish");
        })
        .await;
    let end = wait_for(&latencies, n, Duration::from_secs(30)).await;
    let mut nexus = run_of(n, end - t, &latencies);
    let p = publish.clone();
    let (p50, p99) = paced(&latencies, n / 5, move |seq| {
        let p = p.clone();
        async move {
            p.publish("nexus:bench:nexus", ping(seq)).await.expect("publish");
        }
    })
    .await;
    (nexus.p50, nexus.p99) = (p50, p99);

    let client = redis::Client::open(server.url()).expect("client");
    let conn = client.get_multiplexed_async_connection().await.expect("connection");
    let (mut sink, mut stream) = client.get_async_pubsub().await.expect("pubsub").split();
    sink.subscribe("nexus:bench:raw").await.expect("subscribe");
    let raw_latencies = Arc::new(Mutex::new(Vec::new()));
    let rl = raw_latencies.clone();
    actix::spawn(async move {
        while let Some(msg) = stream.next().await {
            if let Ok(envelope) = Envelope::decode(msg.get_payload_bytes()) {
                record(&rl, &envelope);
            }
        }
    });
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|seq| {
            let mut conn = conn.clone();
            async move {
                let bytes = ping(seq).encode();
                redis::cmd("PUBLISH").arg("nexus:bench:raw").arg(bytes).query_async::<u64>(&mut conn).await
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await
        .expect("raw publish");
    let end = wait_for(&raw_latencies, n, Duration::from_secs(30)).await;
    let mut raw = run_of(n, end - t, &raw_latencies);
    let (p50, p99) = paced(&raw_latencies, n / 5, move |seq| {
        let mut conn = conn.clone();
        async move {
            let bytes = ping(seq).encode();
            redis::cmd("PUBLISH")
                .arg("nexus:bench:raw")
                .arg(bytes)
                .query_async::<u64>(&mut conn)
                .await
                .expect("publish");
        }
    })
    .await;
    (raw.p50, raw.p99) = (p50, p99);
    let names = ["redis publish → subscriber", "redis latency p50 (paced)", "redis latency p99 (paced)"];
    latency_rows(&names, n, &nexus, &raw)
}

/// Messages per millisecond of a paced run: 10,000 per second.
const PACED_PER_MS: u64 = 10;

/// Sends `n` messages at [`PACED_PER_MS`] per millisecond, each by its own
/// task (`send(seq)`), waits for all to arrive and returns the p50 and p99
/// of their latencies: latency without a burst's queueing.
async fn paced<F, Fut>(latencies: &Mutex<Vec<u64>>, n: u64, send: F) -> (f64, f64)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    latencies.lock().unwrap().clear();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut seq = 0;
    while seq < n {
        tick.tick().await;
        for _ in 0..PACED_PER_MS.min(n - seq) {
            actix::spawn(send(seq));
            seq += 1;
        }
    }
    wait_for(latencies, n, Duration::from_secs(30)).await;
    let mut l = latencies.lock().unwrap().clone();
    l.sort_unstable();
    (percentile(&l, 0.5), percentile(&l, 0.99))
}

// ---- (c) Kafka bridge vs raw rdkafka ----------------------------------------

async fn kafka_rows(dir: &std::path::Path, n: u64) -> Vec<Row> {
    let tansu = Tansu::start(&dir.join("tansu"), TansuStorage::Memory).expect("tansu");
    let config = KafkaConfig::new(tansu.brokers());
    let kernel = Kernel::new("bench");
    let (bridge_arbiter, sink_arbiter) = (Arbiter::new(), Arbiter::new());
    let bridge = KafkaBridge::spawn(&kernel, &bridge_arbiter.handle(), config.clone()).await.expect("bridge");
    ensure_topics(&config, &["bench.nexus", "bench.raw"]).await.expect("topics");

    let latencies = Arc::new(Mutex::new(Vec::new()));
    let l = latencies.clone();
    let sink = kernel.spawn_on(&sink_arbiter.handle(), "sink", move || Sink { latencies: l.clone() });
    let consume = Consume {
        group: "bench-nexus".into(),
        topics: vec!["bench.nexus".into()],
        subscriber: sink.link("kafka-bridge"),
    };
    bridge.link::<Consume>("bench").ask(consume).await.expect("ask").expect("consume");
    let produce = bridge.link::<Produce>("bench");
    // Warm-up: the clock starts once the consumer has joined its group.
    produce
        .ask(Produce { topic: "bench.nexus".into(), key: "warmup".into(), envelope: ping(0) })
        .await
        .expect("ask")
        .expect("produce");
    wait_for(&latencies, 1, Duration::from_secs(60)).await;
    latencies.lock().unwrap().clear();
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|seq| {
            produce.ask(Produce { topic: "bench.nexus".into(), key: format!("ctx-{}", seq % 16), envelope: ping(seq) })
        })
        .buffer_unordered(256)
        .for_each(|r| async move {
            r.expect("ask").expect("produce");
        })
        .await;
    let end = wait_for(&latencies, n, Duration::from_secs(120)).await;
    let nexus = run_of(n, end - t, &latencies);

    let producer: FutureProducer = config.producer().create().expect("producer");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .set("broker.address.family", "v4")
        .set("group.id", "bench-raw")
        .set("fetch.wait.max.ms", nexus_actors::bus::kafka::FETCH_WAIT_MS)
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&["bench.raw"]).expect("subscribe");
    let raw_latencies = Arc::new(Mutex::new(Vec::new()));
    let rl = raw_latencies.clone();
    let raw_consumer = actix::spawn(async move {
        loop {
            match consumer.recv().await {
                Ok(m) => {
                    if let Ok(envelope) = Envelope::decode(m.payload().unwrap_or_default()) {
                        record(&rl, &envelope);
                    }
                }
                Err(e) => eprintln!("raw consumer: {e}"),
            }
        }
    });
    let warmup = ping(0).encode();
    producer
        .send(FutureRecord::to("bench.raw").key("warmup").payload(&warmup), Timeout::After(Duration::from_secs(30)))
        .await
        .expect("raw produce");
    wait_for(&raw_latencies, 1, Duration::from_secs(60)).await;
    raw_latencies.lock().unwrap().clear();
    let t = Instant::now();
    futures::stream::iter(0..n)
        .map(|seq| {
            let producer = producer.clone();
            async move {
                let bytes = ping(seq).encode();
                let key = format!("ctx-{}", seq % 16);
                producer
                    .send(
                        FutureRecord::to("bench.raw").key(&key).payload(&bytes),
                        Timeout::After(Duration::from_secs(30)),
                    )
                    .await
            }
        })
        .buffer_unordered(256)
        .for_each(|r| async move {
            r.expect("raw produce");
        })
        .await;
    let end = wait_for(&raw_latencies, n, Duration::from_secs(120)).await;
    let raw = run_of(n, end - t, &raw_latencies);
    // Close the raw consumer while its broker still runs: closing one whose
    // broker is gone blocks the thread that drops it.
    raw_consumer.abort();
    let _ = raw_consumer.await;
    latency_rows(&["kafka produce → acknowledging actor", "kafka latency p50", "kafka latency p99"], n, &nexus, &raw)
}

#[cfg(test)]
mod tests {
    use super::check_args;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn only_known_arguments_start_a_run() {
        for ok in ["", "--quick", "--write benches/RESULTS.md", "--only llm", "--quick --only cold"] {
            assert_eq!(check_args(&args(ok)), Ok(()), "{ok:?}");
        }
        for bad in
            ["--halp", "--only", "--only everything", "--write", "--write --quick", "--only llm --only bus", "llm"]
        {
            assert!(check_args(&args(bad)).is_err(), "{bad:?} was taken");
        }
    }
}
