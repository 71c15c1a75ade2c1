//! The system under fault: a persistent `redis-server` (append-only file,
//! every write synced), a `tansu` broker with durable (SQLite) storage, two
//! `nexus node` processes (transaction and LLM manager) over both, a
//! scripted model for their turns, and one panel
//! behind a `nexus sidecar` process. It owns the processes and the faults
//! done to them; it never looks at what the load saw.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus_actors::infra::{free_port, RedisServer, Tansu, TansuStorage};
use nexus_actors::platform::{Panel, PanelMode, PanelRecords, UserRole};
use nexus_testkit::scripted_model::{Reply, ScriptedModel};
use nexus_testkit::TestKeys;

use super::panel::CountingPanel;

/// The user every load acts as.
pub(super) const USER: &str = "chaos";
pub(super) const PASSWORD: &str = "chaos-password";
/// The panel record the counting panel serves.
pub(super) const PANEL_ID: &str = "0190a5a4-0000-7000-8000-0000000c4a05";
/// How long a node may take to drain on SIGTERM.
const DRAIN_TIMEOUT_SECS: u64 = 10;

/// One `nexus` child process (a node or the sidecar), restartable with the
/// same arguments.
pub(super) struct Proc {
    what: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// The port it answers on, for readiness.
    pub(super) port: u16,
}

impl Proc {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("a log file");
        let mut command = Command::new(&self.program);
        // The child dies with the harness, even one stopped with Ctrl-C
        // while it pauses a node.
        // SAFETY: prctl is async-signal-safe and touches no parent state.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .args(&self.args)
            .env("RUST_LOG", "warn,nexus_actors::roles::llm_manager=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts ({}): {e}", self.what, self.program.display()));
        self.child = Some(child);
    }

    fn pid(&self) -> String {
        self.child.as_ref().map(|c| c.id().to_string()).expect("the process runs")
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.pid()]).status().expect("kill runs");
        assert!(status.success(), "kill {signal} {}", self.what);
    }

    /// Waits until the process has exited, for at most `within`.
    fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let Some(child) = self.child.as_mut() else { return true };
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Everything the chaos run starts, stopped when dropped.
pub(super) struct Cluster {
    pub(super) redis: RedisServer,
    pub(super) kafka: Tansu,
    pub(super) nodes: Vec<Proc>,
    sidecar: Proc,
    pub(super) panel: CountingPanel,
    /// The model the LLM managers ask.
    _model: ScriptedModel,
    /// Faults done so far (numbers the node logs' markers).
    faults: u32,
    /// Node base URLs, in the order of `nodes`.
    pub(super) urls: Vec<String>,
}

impl Cluster {
    /// Starts brokers, two nodes, the panel and its sidecar; makes the user
    /// and the panel record; returns once every part answers.
    pub(super) async fn start(dir: &Path, nexus: &Path) -> Cluster {
        let redis = RedisServer::start(&dir.join("redis"), true).expect("redis-server starts");
        sync_every_write(&redis);
        assert!(Tansu::supports_sqlite(), "tansu with SQLite storage (scripts/lib.sh ensure_tansu installs it)");
        let kafka = Tansu::start(&dir.join("tansu"), TansuStorage::Sqlite).expect("tansu starts");
        let keys = TestKeys::new(dir);
        let platform = keys.platform(&redis.url()).await;
        nexus_testkit::add_user(&platform, USER, PASSWORD, UserRole::User).await;
        let record = Panel {
            id: PANEL_ID.into(),
            name: "chaos counter".into(),
            owner: USER.into(),
            mode: PanelMode::Studio,
            source: "nexus-bench chaos".into(),
            public: false,
        };
        PanelRecords::connect(&redis.url()).await.expect("panel records").put(&record).await.expect("panel record");

        // Each answer streams for a while, so that faults land mid-turn.
        let model =
            ScriptedModel::start(|_| Reply::text("an answer in a few words").with_delay(Duration::from_millis(5)));
        let mut nodes = Vec::new();
        for name in ["chaos-a", "chaos-b"] {
            let port = free_port().expect("a port");
            let args = vec![
                "node".into(),
                "--roles".into(),
                "transaction-manager,llm-manager".into(),
                "--llm-endpoint".into(),
                format!("url={},model=scripted", model.url()),
                "--name".into(),
                name.into(),
                "--http".into(),
                format!("127.0.0.1:{port}"),
                "--redis-url".into(),
                redis.url(),
                "--kafka-brokers".into(),
                kafka.brokers(),
                "--jwt-key-file".into(),
                keys.file.display().to_string(),
                "--drain-timeout".into(),
                DRAIN_TIMEOUT_SECS.to_string(),
            ];
            let log = dir.join(format!("{name}.log"));
            nodes.push(Proc { what: name.into(), program: nexus.into(), args, log, child: None, port });
        }
        let panel = CountingPanel::start();
        let sidecar_port = free_port().expect("a port");
        let sidecar = Proc {
            what: "sidecar".into(),
            program: nexus.into(),
            args: vec![
                "sidecar".into(),
                "--panel".into(),
                PANEL_ID.into(),
                "--redis-url".into(),
                redis.url(),
                "--panel-url".into(),
                panel.url(),
                "--listen".into(),
                format!("127.0.0.1:{sidecar_port}"),
                "--poll-interval-ms".into(),
                "1000".into(),
                "--drain-timeout".into(),
                "5".into(),
            ],
            log: dir.join("sidecar.log"),
            child: None,
            port: sidecar_port,
        };
        let urls = nodes.iter().map(|n| format!("http://127.0.0.1:{}", n.port)).collect();
        let mut cluster = Cluster { redis, kafka, nodes, sidecar, panel, _model: model, faults: 0, urls };
        for i in 0..cluster.nodes.len() {
            cluster.nodes[i].start();
        }
        cluster.sidecar.start();
        for i in 0..cluster.nodes.len() {
            cluster.wait_ready(i).await.expect("the nodes start");
        }
        crate::wait_listening(sidecar_port, "the sidecar", Duration::from_secs(60)).expect("the sidecar listens");
        cluster
    }

    /// Waits (up to two minutes) until node `i` says it is ready; says why not.
    pub(super) async fn wait_ready(&self, i: usize) -> Result<(), String> {
        let url = format!("http://127.0.0.1:{}/readyz", self.nodes[i].port);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(answer) = http.get(&url).timeout(Duration::from_secs(1)).send().await {
                if answer.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("{} never became ready again (log: {})", self.nodes[i].what, self.log(i)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self, i: usize) -> String {
        self.nodes[i].log.display().to_string()
    }

    /// Writes a marker into every node's log, so a log reads fault by fault.
    pub(super) fn mark(&mut self, fault: &str) {
        self.faults += 1;
        let n = self.faults;
        for node in &self.nodes {
            if let Ok(mut log) = std::fs::OpenOptions::new().append(true).open(&node.log) {
                use std::io::Write;
                let _ = writeln!(log, "==== chaos fault {n}: {fault} ====");
            }
        }
    }

    /// Kills redis-server (SIGKILL), waits `down`, starts it again on the
    /// same port and data.
    pub(super) async fn restart_redis(&mut self, down: Duration) {
        self.redis.kill();
        tokio::time::sleep(down).await;
        self.redis.restart().expect("redis-server restarts");
        sync_every_write(&self.redis);
    }

    /// Kills the Kafka broker (SIGKILL), waits `down`, starts it again on
    /// the same port and storage.
    pub(super) async fn restart_kafka(&mut self, down: Duration) {
        self.kafka.kill();
        tokio::time::sleep(down).await;
        self.kafka.restart().expect("tansu restarts");
    }

    /// `kill -9` node `i`; returns once it is gone.
    pub(super) fn kill_node(&mut self, i: usize) {
        self.nodes[i].signal("-KILL");
        assert!(self.nodes[i].wait_exit(Duration::from_secs(5)), "a killed node exits");
    }

    /// Starts node `i` again (after [`Cluster::kill_node`]) and waits until it is ready.
    pub(super) async fn start_node(&mut self, i: usize) -> Result<(), String> {
        self.nodes[i].start();
        self.wait_ready(i).await
    }

    /// SIGSTOP node `i` for `paused`, then SIGCONT.
    pub(super) async fn pause_node(&mut self, i: usize, paused: Duration) {
        self.nodes[i].signal("-STOP");
        tokio::time::sleep(paused).await;
        self.nodes[i].signal("-CONT");
    }

    /// SIGTERM node `i`, waits for its drain and exit, starts it again and
    /// waits until it is ready; says why not.
    pub(super) async fn roll_node(&mut self, i: usize) -> Result<(), String> {
        self.nodes[i].signal("-TERM");
        let within = Duration::from_secs(DRAIN_TIMEOUT_SECS + 10);
        if !self.nodes[i].wait_exit(within) {
            return Err(format!("{} did not exit after SIGTERM (log: {})", self.nodes[i].what, self.log(i)));
        }
        self.nodes[i].start();
        self.wait_ready(i).await
    }
}

/// `appendfsync always`: an acknowledged write is on disk before Redis
/// answers, so killing it loses nothing that was acknowledged. Set again
/// after each restart (`CONFIG SET` does not outlive the process).
fn sync_every_write(redis: &RedisServer) {
    let client = redis::Client::open(redis.url()).expect("a redis url");
    let mut conn = client.get_connection().expect("redis answers");
    let () = redis::cmd("CONFIG").arg("SET").arg("appendfsync").arg("always").query(&mut conn).expect("config set");
}
