//! `nexus-bench chaos` (run by `scripts/chaos`): zero loss under faults.
//!
//! Under steady load — documents patched over HTTP, tool calls to a panel
//! behind its sidecar (recorded on Kafka), messages to LLM contexts
//! (commands on Kafka, turns answered by the nodes' LLM managers through a
//! scripted model, [`turns`]), WebSocket clients following the documents —
//! it does each fault in turn to a system of two `nexus node`
//! processes over one Redis and one Kafka broker ([`cluster`]): restarts
//! redis-server, restarts the Kafka broker (durable storage), `kill -9`s a
//! node and starts it again, pauses a node (SIGSTOP) past its clients'
//! timeouts, and restarts both nodes in turn with SIGTERM (a rolling
//! restart). After each fault it times the recovery: until every client
//! has succeeded with an operation begun after the fault ended and every
//! follower has what was acknowledged by then, against [`RECOVERY_GOAL`]
//! (a timing: reported, never a verdict). At the end it counts what was
//! lost or done twice ([`verify`]); any count above zero, or a fault the
//! system did not recover from within a minute, fails the run.
//!
//! `--short` (CI): each fault once. The default: three rounds with longer
//! steady stretches. `--write FILE`: records the tables in FILE's chaos
//! section (`benches/RESULTS.md`).

mod calls;
mod cluster;
mod followers;
mod load;
mod panel;
mod turns;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use calls::{Answered, Caller};
use cluster::Cluster;
use followers::Follower;
use load::{Progress, Shared, Writer};
use turns::Asker;
use verify::{Kill, Verdict};

/// Where `benches/RESULTS.md` keeps the chaos tables; a full benchmark
/// run keeps this section as it was.
pub(crate) const HEADING: &str = "## Chaos: zero loss under faults";
/// The longest a recovery may take after a fault ends.
const RECOVERY_GOAL: Duration = Duration::from_secs(5);
/// How long a node stays paused: past every client timeout (requests 2 s,
/// tool calls 3 s, followers' silence 3 s).
const PAUSE: Duration = Duration::from_secs(8);
/// How long a killed broker or node stays down.
const DOWN: Duration = Duration::from_secs(1);
/// How long, before a `kill -9`, the harness waits for the calls answered
/// so far to have their records on Kafka.
const SETTLE: Duration = Duration::from_secs(15);

const WRITERS: usize = 4;
const FOLLOWERS_PER_DOC: usize = 4;
const CALLERS: usize = 4;
const ASKERS: usize = 2;

#[derive(Clone, Copy)]
enum Fault {
    RestartRedis,
    RestartKafka,
    KillNode(usize),
    PauseNode(usize),
    RollingRestart,
}

impl Fault {
    fn name(self) -> String {
        match self {
            Fault::RestartRedis => "redis-server killed, restarted".into(),
            Fault::RestartKafka => "Kafka broker killed, restarted (durable storage)".into(),
            Fault::KillNode(i) => format!("node {} `kill -9`, started again", node_name(i)),
            Fault::PauseNode(i) => format!("node {} SIGSTOP for {} s, SIGCONT", node_name(i), PAUSE.as_secs()),
            Fault::RollingRestart => "rolling restart: SIGTERM each node in turn".into(),
        }
    }

    /// Does the fault and waits until it is over; for a `kill -9`, returns
    /// when the node died. An error: the system did not come back (a node
    /// never became ready again).
    async fn inflict(self, cluster: &mut Cluster) -> Result<Option<Instant>, String> {
        match self {
            Fault::RestartRedis => cluster.restart_redis(DOWN).await,
            Fault::RestartKafka => cluster.restart_kafka(DOWN).await,
            Fault::KillNode(i) => {
                cluster.kill_node(i);
                let killed = Instant::now();
                tokio::time::sleep(DOWN).await;
                cluster.start_node(i).await?;
                return Ok(Some(killed));
            }
            Fault::PauseNode(i) => cluster.pause_node(i, PAUSE).await,
            Fault::RollingRestart => {
                for i in 0..cluster.nodes.len() {
                    cluster.roll_node(i).await?;
                }
            }
        }
        Ok(None)
    }
}

fn node_name(i: usize) -> char {
    (b'a' + i as u8) as char
}

/// One fault's line in the table.
struct FaultRow {
    fault: String,
    lasted: Duration,
    acked: u64,
    failed: u64,
    recovery: Recovery,
}

/// Runs the harness; returns whether every count was zero.
pub(crate) fn run(args: &[String]) -> bool {
    let short = args.iter().any(|a| a == "--short");
    let write = args.iter().position(|a| a == "--write").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let nexus = args
        .iter()
        .position(|a| a == "--nexus")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::current_exe().expect("own path").with_file_name("nexus"));
    assert!(nexus.is_file(), "no nexus binary at {} (build it, or pass --nexus PATH)", nexus.display());
    let dir = std::env::temp_dir().join(format!("nexus-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory for the run");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (rows, verdict, stopped) = runtime.block_on(chaos(&dir, &nexus, short));
    let mut report = report(&rows, &verdict, short);
    if let Some(stopped) = &stopped {
        report += &format!("\n{stopped}\n");
    }
    for panic in broker_panics(&dir) {
        report += &format!("\nThe Kafka broker itself failed during this run (tansu's log): `{panic}`\n");
    }
    println!("{report}");
    // Timings are reported against the goal, never a verdict; a system
    // that did not recover at all within a minute is one.
    let recovered = rows.iter().all(|r| r.recovery.all().is_some());
    for row in rows.iter().filter(|r| r.recovery.all().is_some_and(|d| d > RECOVERY_GOAL)) {
        eprintln!("chaos: over the {} s goal: recovery from \"{}\"", RECOVERY_GOAL.as_secs(), row.fault);
    }
    let failures = verdict.failures();
    for (what, n) in &failures {
        eprintln!("chaos: FAILED: {n} {what}");
    }
    if !recovered {
        eprintln!("chaos: FAILED: the system did not recover from a fault within a minute");
    }
    let passed = failures.is_empty() && recovered && stopped.is_none();
    if passed {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("chaos: the run's logs are in {}", dir.display());
    }
    if let Some(path) = write {
        record(&path, &report);
    }
    passed
}

/// The faults' rows, the verdict, and why the run stopped early, if it did.
async fn chaos(dir: &Path, nexus: &Path, short: bool) -> (Vec<FaultRow>, Verdict, Option<String>) {
    let mut cluster = Cluster::start(dir, nexus).await;
    let urls = cluster.urls.clone();
    let http = reqwest::Client::builder().no_proxy().build().expect("an HTTP client");
    let token = login(&http, &urls[0]).await;
    let shared = Arc::new(Shared {
        urls,
        token,
        http,
        origin: Instant::now(),
        stop: Default::default(),
        stop_following: Default::default(),
    });

    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        writers.push(Arc::new(load::new_writer(&shared).await));
    }
    let callers: Vec<Arc<Caller>> = (0..CALLERS).map(|_| Arc::default()).collect();
    let followers: Vec<(usize, Arc<Follower>)> =
        (0..WRITERS * FOLLOWERS_PER_DOC).map(|i| (i % WRITERS, Arc::default())).collect();
    let mut tasks = Vec::new();
    for writer in &writers {
        tasks.push(tokio::spawn(load::write(shared.clone(), writer.clone())));
    }
    for (i, caller) in callers.iter().enumerate() {
        tasks.push(tokio::spawn(calls::call(shared.clone(), caller.clone(), i as u64 * 1_000_000_000)));
    }
    let askers: Vec<Arc<Asker>> = (0..ASKERS).map(|_| Arc::default()).collect();
    for asker in &askers {
        tasks.push(tokio::spawn(turns::ask(shared.clone(), asker.clone())));
    }
    let clients = Load { writers: &writers, callers: &callers, askers: &askers, followers: &followers };
    let mut following = Vec::new();
    for (i, (doc, follower)) in followers.iter().enumerate() {
        following.push(tokio::spawn(followers::follow(shared.clone(), follower.clone(), writers[*doc].doc.clone(), i)));
    }
    let steady = if short { Duration::from_secs(2) } else { Duration::from_secs(10) };
    let warm = recovery(&shared, &clients, shared.now_ms()).await;
    assert!(warm.all().is_some(), "the load never got going (logs in {})", dir.display());
    tokio::time::sleep(steady).await;

    let rounds = if short { 1 } else { 3 };
    let mut rows = Vec::new();
    let mut kills: Vec<Kill> = Vec::new();
    let mut stopped = None;
    'rounds: for round in 0..rounds {
        let faults = [
            Fault::RestartRedis,
            Fault::RestartKafka,
            Fault::KillNode(round % 2),
            Fault::PauseNode((round + 1) % 2),
            Fault::RollingRestart,
        ];
        for fault in faults {
            let name = fault.name();
            eprintln!("chaos: at {:.2} s: {name}", shared.now_ms() as f64 / 1e3);
            cluster.mark(&name);
            let acked_before = clients.acked();
            let failed_before = clients.failed();
            let settled_ms = shared.now_ms();
            if let Fault::KillNode(_) = fault {
                settle(&callers, &cluster).await;
            }
            let began = Instant::now();
            match (fault.inflict(&mut cluster).await, fault) {
                (Ok(Some(killed)), Fault::KillNode(node)) => {
                    let killed_ms = killed.duration_since(shared.origin).as_millis() as u64;
                    kills.push(Kill { node, settled_ms, killed_ms });
                }
                (Ok(_), _) => {}
                (Err(why), _) => {
                    eprintln!("chaos: the run stops: {why}");
                    stopped = Some(format!("The run stopped during \"{name}\": {why}."));
                    break 'rounds;
                }
            }
            let lasted = began.elapsed();
            eprintln!("chaos: at {:.2} s: the fault ended", shared.now_ms() as f64 / 1e3);
            let recovery = recovery(&shared, &clients, shared.now_ms()).await;
            rows.push(FaultRow {
                fault: name,
                lasted,
                acked: clients.acked() - acked_before,
                failed: clients.failed() - failed_before,
                recovery,
            });
            tokio::time::sleep(steady).await;
        }
    }

    shared.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
    }
    // Followers run on while the verdict waits for them to converge.
    let mut verdict = Verdict::default();
    verify::documents(&shared, &writers, &followers, &mut verdict).await;
    shared.stop_following.store(true, Ordering::Relaxed);
    for task in following {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    turns::verify(&shared, &askers, &mut verdict).await;
    let brokers = cluster.kafka.brokers();
    let runs = cluster.panel.runs.clone();
    let verdict = tokio::task::spawn_blocking(move || {
        verify::tool_calls(&callers, &runs, &brokers, &kills, &mut verdict);
        if let Err(why) = turns::fenced_off(&brokers, &mut verdict) {
            verdict.unreadable.push(format!("the raw journal: {why}"));
        }
        verdict
    })
    .await
    .expect("the verdict");
    (rows, verdict, stopped)
}

/// Waits (up to [`SETTLE`]) until every call answered so far has its
/// records on Kafka, so that a record lost to the coming `kill -9` is one
/// the node held, not one an earlier fault lost.
async fn settle(callers: &[Arc<Caller>], cluster: &Cluster) {
    let answered: Vec<Answered> = callers.iter().flat_map(|c| c.answered.lock().expect("answered").clone()).collect();
    let brokers = cluster.kafka.brokers();
    let missing = tokio::task::spawn_blocking(move || verify::unrecorded(&answered, &brokers, SETTLE)).await;
    match missing {
        Ok(Ok(missing @ 1..)) => eprintln!("chaos: {missing} answered calls still lack their records before the kill"),
        Ok(Err(why)) => eprintln!("chaos: the records could not be read before the kill: {why}"),
        _ => {}
    }
}

async fn login(http: &reqwest::Client, url: &str) -> String {
    let answer: Value = http
        .post(format!("{url}/api/login"))
        .json(&json!({"username": cluster::USER, "password": cluster::PASSWORD}))
        .send()
        .await
        .expect("login")
        .error_for_status()
        .expect("logged in")
        .json()
        .await
        .expect("a token");
    answer["token"].as_str().expect("a token").to_owned()
}

/// The clients of a run, as the recovery and the table see them.
struct Load<'a> {
    writers: &'a [Arc<Writer>],
    callers: &'a [Arc<Caller>],
    askers: &'a [Arc<Asker>],
    followers: &'a [(usize, Arc<Follower>)],
}

impl Load<'_> {
    fn progress(&self) -> impl Iterator<Item = &Progress> {
        let writes = self.writers.iter().map(|w| &w.progress);
        writes.chain(self.callers.iter().map(|c| &c.progress)).chain(self.askers.iter().map(|a| &a.progress))
    }

    fn acked(&self) -> u64 {
        self.progress().map(|p| p.acked.load(Ordering::Relaxed)).sum()
    }

    fn failed(&self) -> u64 {
        self.progress().map(|p| p.failed.load(Ordering::Relaxed)).sum()
    }
}

/// How long each kind of client took to recover from a fault; none when
/// it did not within a minute.
struct Recovery {
    writes: Option<Duration>,
    calls: Option<Duration>,
    turns: Option<Duration>,
    followers: Option<Duration>,
}

impl Recovery {
    fn all(&self) -> Option<Duration> {
        Some(self.writes?.max(self.calls?).max(self.turns?).max(self.followers?))
    }
}

/// Times from `since_ms` until every writer, every caller and every asker
/// has succeeded with an operation begun at or after it, and until every
/// follower has its document's version as acknowledged at `since_ms`.
async fn recovery(shared: &Shared, load: &Load<'_>, since_ms: u64) -> Recovery {
    let targets: Vec<u64> = load.writers.iter().map(|w| w.acked_version.load(Ordering::Relaxed)).collect();
    let deadline = Duration::from_millis(since_ms) + Duration::from_secs(60);
    let mut recovery = Recovery { writes: None, calls: None, turns: None, followers: None };
    let since = |p: &Progress| p.recovered_since(since_ms);
    loop {
        let after = Some(Duration::from_millis(shared.now_ms().saturating_sub(since_ms)));
        if recovery.writes.is_none() && load.writers.iter().all(|w| since(&w.progress)) {
            recovery.writes = after;
        }
        if recovery.calls.is_none() && load.callers.iter().all(|c| since(&c.progress)) {
            recovery.calls = after;
        }
        if recovery.turns.is_none() && load.askers.iter().all(|a| since(&a.progress)) {
            recovery.turns = after;
        }
        if recovery.followers.is_none()
            && load.followers.iter().all(|(doc, f)| f.version.load(Ordering::Relaxed) >= targets[*doc].max(1))
        {
            recovery.followers = after;
        }
        if recovery.all().is_some() || shared.origin.elapsed() > deadline {
            return recovery;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn report(rows: &[FaultRow], v: &Verdict, short: bool) -> String {
    let mut out = format!(
        "{} run (`scripts/chaos{}`): {WRITERS} writers, {} WebSocket followers, {CALLERS} tool callers, {ASKERS} LLM askers over two nodes.\n\n\
         | fault | fault lasted | operations acknowledged meanwhile | attempts that failed meanwhile | recovered after | writes / tool calls / turns / followers |\n\
         |---|---:|---:|---:|---:|---|\n",
        if short { "Short" } else { "Long" },
        if short { " --short" } else { "" },
        WRITERS * FOLLOWERS_PER_DOC,
    );
    for r in rows {
        let secs = |d: Option<Duration>| d.map_or("not within 60 s".into(), |d| format!("{:.2} s", d.as_secs_f64()));
        let over = if r.recovery.all().is_some_and(|d| d > RECOVERY_GOAL) { " (over the 5 s goal)" } else { "" };
        let (all, each) =
            (r.recovery.all(), [r.recovery.writes, r.recovery.calls, r.recovery.turns, r.recovery.followers]);
        let each = each.map(secs).join(" / ");
        out += &format!(
            "| {} | {:.1} s | {} | {} | {}{over} | {each} |\n",
            r.fault,
            r.lasted.as_secs_f64(),
            r.acked,
            r.failed,
            secs(all)
        );
    }
    out += &format!(
        "\n| count | value |\n|---|---:|\n\
         | document writes acknowledged | {} |\n| acknowledged writes lost | {} |\n| writes applied twice | {} |\n\
         | tool calls answered | {} |\n| tool calls that ran twice | {} |\n| tool calls answered wrongly | {} |\n\
         | tool call records lost (`semantic.events`) | {} |\n\
         | of which a node held in memory when it was killed with -9 | {} |\n| tool call records written twice | {} |\n\
         | calls whose record was produced again after a failed produce (the same record) | {} |\n\
         | WebSocket followers | {} |\n| followers that never converged (within {} s of the end) | {} |\n\
         | changes out of order at a follower | {} |\n\
         | messages posted to contexts and acknowledged | {} |\n| acknowledged messages never answered | {} |\n\
         | messages answered twice | {} |\n\
         | messages answered twice on the raw journal only (a fenced-off writer's late answer, which every reader leaves out) | {} |\n\
         | model steps answered twice | {} |\n| turns that ended in a failure (answered) | {} |\n",
        v.writes_acked,
        v.writes_lost,
        v.writes_applied_twice,
        v.calls_answered,
        v.calls_ran_twice,
        v.calls_wrong,
        v.records_lost,
        v.records_lost_with_killed_node,
        v.records_twice,
        v.records_produced_again,
        v.followers,
        verify::CONVERGE_WITHIN.as_secs(),
        v.followers_not_converged,
        v.follower_gaps,
        v.turns_acked,
        v.turns_lost,
        v.turns_twice,
        v.turns_twice_fenced_off,
        v.model_steps_twice,
        v.turns_failed,
    );
    if !v.unreadable.is_empty() {
        out += &format!("\nCould not be read back after the run (not judged): {}.\n", v.unreadable.join("; "));
    }
    out
}

/// Panics in the Kafka broker's log (with the message after each): a
/// fault of the broker itself, which every count after it reflects.
fn broker_panics(dir: &Path) -> Vec<String> {
    let log = std::fs::read_to_string(dir.join("tansu").join("tansu.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("panicked at"))
        .map(|(i, l)| format!("{} {}", l.trim(), lines.get(i + 1).map_or("", |next| next.trim())))
        .collect()
}

/// Replaces the chaos section of `path` (from [`HEADING`] to the end).
fn record(path: &Path, report: &str) {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let kept = existing.find(HEADING).map_or(existing.as_str(), |at| &existing[..at]);
    let command = std::env::var("NEXUS_BENCH_COMMAND").unwrap_or_else(|_| "nexus-bench chaos".into());
    let doc = format!(
        "{}{HEADING}\n\nLatest run of `{}`.\n\n{}\n{report}",
        kept.trim_end().to_owned() + "\n\n",
        command.trim(),
        crate::machine()
    );
    std::fs::write(path, doc).expect("write the results");
    eprintln!("wrote {}", path.display());
}
