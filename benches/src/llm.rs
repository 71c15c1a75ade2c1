//! The LLM manager's tables: a node with the transaction manager and the
//! llm-manager (a process of its own, `serve-llm-node`) over a private
//! redis-server and tansu, answered by the scripted OpenAI-compatible
//! server of `nexus-testkit`, against direct streaming calls to that same
//! server in the same run; LangGraph (`benches/langgraph/agent.py`) side
//! by side on the same scripted server and tool; and the local model.
//!
//! * [`node`]: the node process and its HTTP API;
//! * [`client`]: the direct call, a WebSocket follower, turn completions;
//! * [`latency`]: time to first token and to the answer, the journal append, turns per second;
//! * [`rebuild`]: folding a 10,000-record journal against reading it raw;
//! * [`memory`]: resident memory per idle context;
//! * [`langgraph`]: the same agent loop through Nexus and through LangGraph;
//! * [`real`]: the local model, through Nexus and direct.
//!
//! Timings are reported, never asserted; a part that cannot run here is a
//! row that says why.

mod client;
mod langgraph;
mod latency;
mod memory;
mod node;
mod real;
mod rebuild;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::Arbiter;
use actix_web::{web, App, HttpResponse, HttpServer};
use nexus_actors::bus::redis::RedisBridge;
use nexus_actors::infra::{ModelServer, RedisServer, Tansu, TansuStorage};
use nexus_actors::platform::auth::keys::KeySet;
use nexus_actors::tools::registry::{RegisterTool, RegistryDeps};
use nexus_actors::tools::store::ToolStore;
use nexus_actors::tools::system::SystemTool;
use nexus_actors::tools::ToolRegistry;
use nexus_actors::Kernel;
use nexus_testkit::scripted_model::{ModelCall, Reply, ScriptedModel, MODEL as SCRIPTED};
use serde_json::{json, Value};

pub(crate) use node::serve as serve_node;

/// What a user says when the answer should be [`TWENTY_WORDS`].
const HELLO: &str = "Say something.";
/// What a user says when the answer should be one word (the memory row).
const TINY: &str = "tiny";
/// What a user says in the agent loop of the LangGraph rows.
const GO: &str = "go";
/// The text answer of the latency rows: 20 words, so 23 chunks with the
/// role, finish and usage chunks.
const TWENTY_WORDS: &str = "one two three four five six seven eight nine ten \
    eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty";
/// The tool of the agent loop, as LangGraph's script names it.
const TOOL: &str = "http_get";

/// How much each part measures.
struct Sizes {
    /// Turns timed one at a time (time to first token).
    turns: usize,
    /// Contexts of each throughput row, and how long each runs.
    concurrent: [usize; 2],
    window: Duration,
    /// Appends timed through the bridge and raw.
    appends: usize,
    /// Contexts of the memory row.
    contexts: usize,
    /// Timed runs of each rebuild.
    rebuilds: usize,
    /// Turns of the agent-loop latency rows (per side), and the thread lengths (model steps) whose storage is measured.
    agent_turns: usize,
    thread_steps: Vec<usize>,
    /// Turns of the local model, per side.
    real_turns: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                turns: 50,
                concurrent: [32, 256],
                window: Duration::from_secs(2),
                appends: 500,
                contexts: 1_000,
                rebuilds: 5,
                agent_turns: 20,
                thread_steps: vec![100],
                real_turns: 1,
            }
        } else {
            Sizes {
                turns: 200,
                concurrent: [32, 256],
                window: Duration::from_secs(5),
                appends: 2_000,
                contexts: 10_000,
                rebuilds: 9,
                agent_turns: 200,
                thread_steps: vec![100, 1_000],
                real_turns: 2,
            }
        }
    }
}

/// One row: what, the Nexus value, the baseline's, the ratio (higher is
/// better for Nexus, as in the other tables) and a note.
struct Line {
    what: String,
    nexus: String,
    baseline: String,
    ratio: Option<f64>,
    note: String,
}

impl Line {
    fn new(what: impl Into<String>, nexus: impl Into<String>, baseline: impl Into<String>) -> Line {
        Line { what: what.into(), nexus: nexus.into(), baseline: baseline.into(), ratio: None, note: String::new() }
    }

    fn ratio(mut self, ratio: f64) -> Line {
        self.ratio = ratio.is_finite().then_some(ratio);
        self
    }

    fn note(mut self, note: impl Into<String>) -> Line {
        self.note = note.into();
        self
    }

    /// A row for a part that could not be measured.
    fn missing(what: &str, why: &str) -> Line {
        Line::new(what, "—", "—").note(format!("not measured: {why}"))
    }
}

fn render(header: &str, lines: &[Line]) -> String {
    let mut out = format!("| measurement | Nexus | {header} | ratio | note |\n|---|---:|---:|---:|---|\n");
    for l in lines {
        let ratio = l.ratio.map_or("—".to_owned(), |r| format!("{r:.2}"));
        out += &format!("| {} | {} | {} | {ratio} | {} |\n", l.what, l.nexus, l.baseline, l.note.replace('|', "/"));
    }
    out
}

fn ms(x: f64) -> String {
    if x.abs() < 10.0 {
        format!("{x:.2} ms")
    } else {
        format!("{x:.1} ms")
    }
}

/// When the agent loop's tool started, and when the model was asked for
/// the answer after it: the step boundaries of the LangGraph rows.
#[derive(Default)]
struct Marks {
    tool_started: Mutex<Option<Instant>>,
    answer_asked: Mutex<Option<Instant>>,
}

/// Everything the parts share: brokers, the node, the scripted model, the tool.
struct Harness {
    dir: PathBuf,
    redis: RedisServer,
    tansu: Tansu,
    node: node::NodeProcess,
    api: node::Api,
    model: ScriptedModel,
    tool_url: String,
    /// The direct calls' client (keep-alive, like the node's).
    http: reqwest::Client,
    turns: client::Turns,
    marks: Arc<Marks>,
    /// The local model, when it is installed, and why not otherwise.
    real: Result<ModelServer, String>,
    _tool_server: actix_web::dev::ServerHandle,
    _registry: Arbiter,
}

/// The LLM manager table and the LangGraph table (markdown), each row
/// saying why when its part could not run.
pub(crate) fn tables(dir: &Path, quick: bool) -> (String, String) {
    let sizes = Sizes::new(quick);
    actix_rt::System::new().block_on(async move {
        let harness = match Harness::start(dir).await {
            Ok(harness) => harness,
            Err(error) => {
                let line = [Line::missing("every LLM row", &error)];
                return (render("direct", &line), render("LangGraph", &line));
            }
        };
        let mut manager = Vec::new();
        // The model hop twice: on a journal holding nothing else, and after
        // the memory row has journaled its contexts (tansu's memory engine
        // lists a partition's records for each fetch that finds some, so
        // every append waits longer as the journal grows).
        let fresh = latency::first_token(&harness, sizes.turns, "fresh journal", false);
        manager.extend(timed("model hop on a fresh journal", fresh).await);
        // LangGraph starts on a database of its own, created for the run, so
        // Nexus's side runs before the rows below fill the journal with
        // 10,000 contexts and thousands of turns: each store holds only its
        // own side's records.
        let peer = timed("LangGraph", langgraph::rows(&harness, sizes.agent_turns, &sizes.thread_steps, quick)).await;
        manager.extend(timed("memory per idle context", memory::rows(&harness, sizes.contexts)).await);
        let appends = latency::append_buckets(&harness).await.unwrap_or_default();
        let journaled = format!("{} contexts journaled", sizes.contexts);
        let after = latency::first_token(&harness, sizes.turns, &journaled, true);
        manager.extend(timed("time to first token", after).await);
        manager.extend(timed("journal append", latency::append(&harness, sizes.appends, &appends)).await);
        for contexts in sizes.concurrent {
            manager.extend(timed("turns per second", latency::throughput(&harness, contexts, sizes.window)).await);
        }
        manager.extend(timed("rebuild", rebuild::rows(&harness, sizes.rebuilds)).await);
        manager.extend(timed("local model", real::rows(&harness, sizes.real_turns)).await);
        (render("direct", &manager), render("LangGraph", &peer))
    })
}

/// Runs one part, saying on stderr how long it took; its rows, or one saying why there are none.
async fn timed(what: &str, rows: impl std::future::Future<Output = Result<Vec<Line>, String>>) -> Vec<Line> {
    let started = Instant::now();
    let rows = rows.await;
    eprintln!("llm bench: {what}: {:.1} s", started.elapsed().as_secs_f64());
    rows.unwrap_or_else(|error| {
        eprintln!("llm bench: {what}: {error}");
        vec![Line::missing(what, &error)]
    })
}

impl Harness {
    async fn start(dir: &Path) -> Result<Harness, String> {
        let dir = dir.join("llm");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let redis = RedisServer::start(&dir.join("redis"), false).map_err(|e| format!("redis-server: {e}"))?;
        let tansu = Tansu::start(&dir.join("tansu"), storage()?).map_err(|e| format!("tansu: {e}"))?;
        let (tool_url, tool_server) = serve_tool()?;
        let marks = Arc::new(Marks::default());
        let model = scripted(tool_url.clone(), marks.clone());
        // Started first so that the node can be given its endpoint; it idles until its row.
        let real = if ModelServer::installed() {
            ModelServer::start(&dir.join("model-server"))
                .map_err(|e| format!("the local model server did not start: {e}"))
        } else {
            Err("the local model is not installed (scripts/dev installs it)".to_owned())
        };
        let key_file = dir.join("keys.json");
        KeySet::generate().save(&key_file).map_err(|e| e.to_string())?;
        // Enough concurrency for the largest throughput row: no model call waits for a slot.
        let mut endpoints = vec![format!("url={},model={SCRIPTED},name=scripted,concurrency=256", model.url())];
        if let Ok(server) = &real {
            endpoints.push(format!(
                "url={},model={},name=local,concurrency={}",
                server.base_url(),
                server.model(),
                server.concurrency()
            ));
        }
        let node = node::NodeProcess::start(&dir, &redis.url(), &tansu.brokers(), &key_file, &endpoints)?;
        let api = node::Api::login(node.port).await?;
        let turns = client::Turns::start(&redis.url()).await?;
        let registry = serve_registry(&redis.url(), marks.clone()).await?;
        let http = reqwest::Client::builder().no_proxy().build().map_err(|e| e.to_string())?;
        let harness = Harness {
            dir,
            redis,
            tansu,
            node,
            api,
            model,
            tool_url,
            http,
            turns,
            marks,
            real,
            _tool_server: tool_server,
            _registry: registry,
        };
        harness.warm_up().await?;
        Ok(harness)
    }

    /// One turn answered end to end: the llm-manager joined its group.
    async fn warm_up(&self) -> Result<(), String> {
        let id = self.api.create(SCRIPTED, &[]).await?;
        let offset = self.api.say(&id, HELLO).await?;
        self.turns.wait(&id, offset, Duration::from_secs(90)).await.map(|_| ())
    }

    /// The node's `/metrics` value of `name`.
    async fn metric(&self, name: &str) -> Option<f64> {
        nexus_testkit::metric(&self.api.metrics().await.ok()?, name)
    }
}

/// The broker's storage: `NEXUS_BENCH_TANSU_STORAGE` (`memory`, the
/// default, or `sqlite`, what `nexus dev` uses when tansu has it). Tansu
/// 0.6's SQLite engine reads about a record per millisecond and acknowledges
/// a produce in milliseconds, for Nexus and its baselines alike; its memory
/// engine is the fastest it has, though it lists a partition's every record
/// on each fetch that returns some, so fetches slow as a partition grows.
pub(crate) fn storage() -> Result<TansuStorage, String> {
    match std::env::var("NEXUS_BENCH_TANSU_STORAGE").as_deref() {
        Ok("memory") | Err(_) => Ok(TansuStorage::Memory),
        Ok("sqlite") => Ok(TansuStorage::Sqlite),
        Ok(other) => Err(format!("NEXUS_BENCH_TANSU_STORAGE={other:?}: memory or sqlite")),
    }
}

/// The scripted model: the agent loop's shape when `http_get` is offered
/// (one call to it, then "done" once its result is in), otherwise text.
fn scripted(tool_url: String, marks: Arc<Marks>) -> ScriptedModel {
    let arguments = json!({ "url": tool_url }).to_string();
    ScriptedModel::start(move |call: &ModelCall| {
        if call.last_role() == Some("tool") {
            *marks.answer_asked.lock().unwrap() = Some(Instant::now());
            Reply::text("done")
        } else if call.tool_names().contains(&TOOL) {
            Reply::tool_calls(&[(TOOL, &arguments)])
        } else if call.last_content() == Some(TINY) {
            Reply::text("ok")
        } else {
            Reply::text(TWENTY_WORDS)
        }
    })
}

/// The agent loop's tool target: `GET /weather` answers a short text.
fn serve_tool() -> Result<(String, actix_web::dev::ServerHandle), String> {
    let server = HttpServer::new(|| {
        App::new().route("/weather", web::get().to(|| async { HttpResponse::Ok().body("sunny, 21 C") }))
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .map_err(|e| e.to_string())?;
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix::spawn(server);
    Ok((format!("http://{addr}/weather"), handle))
}

/// A tool registry of the harness's own on the node's Redis, serving the
/// system tool `http_get` (an HTTP GET of the URL it is given) to every
/// node there; the node's contexts call it over the bus like any system tool.
async fn serve_registry(redis_url: &str, marks: Arc<Marks>) -> Result<Arbiter, String> {
    let kernel = Kernel::new("bench-llm-tools");
    let arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &arbiter.handle(), redis_url).map_err(|e| e.to_string())?;
    let store = ToolStore::connect(redis_url).await.map_err(|e| e.to_string())?;
    let registry = ToolRegistry::spawn(RegistryDeps { kernel, store, redis: bridge, kafka: None });
    let http = reqwest::Client::builder().no_proxy().build().map_err(|e| e.to_string())?;
    let tool =
        SystemTool::new(TOOL, "Fetch a URL with HTTP GET and return the response body.", move |args: Value, _cx| {
            let http = http.clone();
            *marks.tool_started.lock().unwrap() = Some(Instant::now());
            async move {
                let url = args["url"].as_str().unwrap_or_default().to_owned();
                let failed = |e: reqwest::Error| nexus_actors::tools::protocol::ToolError::failed(e.to_string());
                let body = http.get(url).send().await.map_err(failed)?.text().await.map_err(failed)?;
                Ok(Value::String(body))
            }
        });
    let register = registry.link::<RegisterTool>("bench");
    // The bridge connects in the background; registering subscribes through it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match register.ask(RegisterTool(tool.clone())).await {
            Ok(Ok(())) => return Ok(arbiter),
            other if Instant::now() > deadline => return Err(format!("registering {TOOL}: {other:?}")),
            _ => actix::clock::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// What the LLM tables measure, for RESULTS.md.
pub(crate) const NOTES: &str = "\
One node with the transaction manager and the llm-manager runs as a process
of its own (`nexus-bench serve-llm-node`) over a private redis-server and
tansu (memory storage; `NEXUS_BENCH_TANSU_STORAGE=sqlite` for SQLite); its model endpoint is the scripted OpenAI-compatible
server of `nexus-testkit` (deterministic, zero think time) in the harness
process. Every baseline is a direct streaming call from the harness to the
same scripted server (reqwest, keep-alive, `eventsource-stream`, each chunk
parsed as JSON, as the node's model client does), in the same run. The
harness drives the node over its HTTP API and learns of records from the
node's live fan-out: a WebSocket that sent `follow_context` for the latency
rows, Redis `PSUBSCRIBE nexus:context:*` (what that WebSocket forwards)
where one session could not follow every context. Client, node, Redis,
tansu and the scripted server share the machine's two cores.

Time to first token: from `POST /api/contexts/{id}/messages` to the first
`context_record` frame holding a `nexus.thought.delta`; to the answer: to the
`nexus.context.turn_completed` frame. Between them the command goes through
`semantic.commands` (a produce and the inbox's fetch), the context journals
the user message, calls the model, journals the first text at once (later
text gathers for 50 ms or to the end of the stream), the response and the
turn's end, each append acknowledged by the broker before the next step,
each record published on Redis to the session. The direct side is one
completion with the same conversation (both sides keep one conversation
going, so each call sends the whole history, as the node does). Ratios are
direct ÷ Nexus for times (higher is better); \"added\" is Nexus − direct.
The journal append is timed two ways: the node's own
`nexus_llm_journal_append_seconds` (a histogram: the bound of the bucket
holding the quantile), and one `Produce` at a time through a `KafkaBridge`
in the harness (an envelope the size of a `nexus.llm.response`) against
rdkafka's `FutureProducer` with the bridge's settings (idempotent,
`acks=all`, one record per batch).

Turns per second: 32 and then 256 contexts, each sending its next message
when its turn completed, for a fixed window (5 s; 2 s with `--quick`),
against as many direct callers each keeping a conversation of its own; the
scripted endpoint allows 256 calls at once.
Rebuild: a context of 10,001 records (its creation and 2,500 turns of user
message, delta, response and end) written straight to `semantic.events`
one record per batch as the node's bridge writes them, with its directory
entry, and no snapshot (the worst case: the manager writes snapshots as a
context doubles); `GET …/transcript` folds all of it,
`?at=` the first half; the baseline reads the same records with an
rdkafka consumer assigned to the partition, without decoding them, created
and closed per run as the journal reader's is (closing an rdkafka consumer
takes about 100 ms here; the note says how much; the journal reader closes
its consumer on a thread of its own and does not wait for it). A whole-journal read also waits 20 ms past the
last record (tansu's high watermark is the base offset of the last batch,
so the reader does not trust it alone to end).
Memory per idle context: the node's resident memory before and after that
many contexts were created through the API and each had one turn answered
(one word), all still alive (`nexus_llm_contexts`), divided by their number.
The local model: the `xllamacpp` server of `scripts/dev` with its model,
one request at a time; tokens per second are completion tokens (as the
server reported them) over the time from the request to the whole answer.
";

/// What the LangGraph table measures, for RESULTS.md.
pub(crate) const PEER_NOTES: &str = "\
The same agent loop on both sides, against the same scripted server and the
same tool: the user says `go`, the model asks for one `http_get` call (an
HTTP GET of a local URL served by the harness), then answers `done` once the
tool's result is in. So a turn is two model steps and one tool call. Nexus
runs the tool as a system tool registered by the harness's own tool
registry on the node's Redis (the node calls it over the bus); LangGraph
(`benches/langgraph/agent.py`: a `StateGraph` over `MessagesState` with
`ToolNode` and `tools_condition`, `ChatOpenAI` streaming, the
`PostgresSaver` checkpointer on the machine's PostgreSQL) runs it in
process. Added time per step is each side's model-step time minus its own
direct call (Rust reqwest for Nexus, the openai SDK in the same Python for
LangGraph), over both model steps of every latency turn (mean, and p50/p99
by nearest rank as the script computes them; each side's percentile minus
its direct call's), each turn on a fresh context or thread. Nexus's two
steps differ: the first carries the message through `semantic.commands`
(the inbox's fetch), so the note gives each apart. Step boundaries: LangGraph's script marks node entries; for Nexus,
step 1 runs from the POST to the tool's start, step 2 from the model's
request for the answer to the `turn_completed` record. Turns per second:
one client, turns one after another. Bytes per step: one thread grown turn
by turn; Nexus counts the payload bytes of every record of the context on
`semantic.events` (snapshots included); LangGraph the payload bytes of its
checkpoint tables (`checkpoints`, `checkpoint_blobs`, `checkpoint_writes`,
before PostgreSQL's compression; the note gives the bytes as stored).
Replay from step 50: on a thread of 100 steps, Nexus rebuilds the transcript
at the offset of the 50th `nexus.llm.response` and forks a context there;
LangGraph resumes from the checkpoint before model step 50. Model calls are
counted by the scripted server.
";
