//! The node the LLM tables measure and how the harness talks to it.
//! `nexus-bench serve-llm-node` runs a transaction manager and an
//! llm-manager in a process of its own (so that its resident memory is the
//! node's alone, not the harness's or the scripted model's), and [`Api`]
//! drives it over HTTP as a client would. Nothing here measures.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus_actors::bus::kafka::KafkaConfig;
use nexus_actors::infra::free_port;
use nexus_actors::node::{self, NodeConfig, PanelsConfig, Role};
use nexus_actors::platform::quotas::Quotas;
use nexus_actors::roles::llm_manager::model::{EndpointConfig, ModelConfig};
use nexus_actors::roles::llm_manager::LlmManagerConfig;
use reqwest::Method;
use serde_json::{json, Value};

/// The node's first user, an admin: it owns every bench context.
pub(crate) const USER: &str = "bench";
const PASSWORD: &str = "bench-password";

/// `nexus-bench serve-llm-node REDIS_URL BROKERS PORT KEY_FILE ENDPOINT...`:
/// a node with the transaction manager and the llm-manager, each ENDPOINT
/// in `--llm-endpoint`'s form (`url=…,model=…,concurrency=N`).
pub(crate) fn serve(args: &[String]) {
    let [redis_url, brokers, port, key_file, endpoints @ ..] = args else {
        panic!("serve-llm-node REDIS_URL BROKERS PORT KEY_FILE ENDPOINT...")
    };
    let endpoints = endpoints.iter().map(|spec| EndpointConfig::parse(spec).expect("an endpoint spec")).collect();
    // No context goes idle within a run: the memory row counts the contexts
    // alive, and the rows before it (the LangGraph side's among them) take
    // longer than the default 5 minutes.
    let idle = std::time::Duration::from_secs(3600);
    let llm = LlmManagerConfig { model: ModelConfig::new(endpoints), idle, ..LlmManagerConfig::default() };
    let config = NodeConfig {
        name: format!("bench-llm-{port}"),
        http: format!("127.0.0.1:{port}").parse().expect("port"),
        redis_url: redis_url.clone(),
        redis_cluster: Vec::new(),
        kafka: KafkaConfig::new(brokers.clone()),
        roles: vec![Role::TransactionManager, Role::LlmManager],
        first_user: Some((USER.to_owned(), PASSWORD.to_owned())),
        gateway: "127.0.0.1:0".parse().expect("address"),
        public_gateway_url: None,
        panels: PanelsConfig::new(std::env::temp_dir()),
        key_file: Some(key_file.into()),
        // The memory row gives one user tens of thousands of contexts.
        quotas: Quotas { contexts: 1_000_000, ..Quotas::default() },
        allowed_origins: Vec::new(),
        login_limits: Default::default(),
        llm,
        drain_timeout: nexus_actors::node::DEFAULT_DRAIN_TIMEOUT,
    };
    actix_rt::System::new().block_on(node::run(config)).expect("node runs");
}

/// The node process; killed when dropped.
pub(crate) struct NodeProcess {
    child: Child,
    /// Its HTTP port.
    pub(crate) port: u16,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NodeProcess {
    /// Starts the node on a free port; its stderr goes to `llm-node.log` in `dir`.
    pub(crate) fn start(
        dir: &Path,
        redis_url: &str,
        brokers: &str,
        key_file: &Path,
        endpoints: &[String],
    ) -> Result<NodeProcess, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("llm-node.log")).map_err(|e| e.to_string())?;
        let child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .args(["serve-llm-node", redis_url, brokers, &port.to_string()])
            .arg(key_file)
            .args(endpoints)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let node = NodeProcess { child, port };
        crate::wait_listening(port, "the llm node", Duration::from_secs(60))
            .map_err(|e| format!("{e} (see llm-node.log)"))?;
        Ok(node)
    }

    /// Its resident memory in bytes (`VmRSS` of /proc/PID/status).
    pub(crate) fn rss_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

/// The node's HTTP API, logged in as [`USER`]. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Api {
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>`.
    pub(crate) base: String,
    /// The bearer token.
    pub(crate) token: String,
}

impl Api {
    /// Logs in to the node on `port`.
    pub(crate) async fn login(port: u16) -> Result<Api, String> {
        let http = reqwest::Client::builder().no_proxy().build().map_err(|e| e.to_string())?;
        let base = format!("http://127.0.0.1:{port}");
        let mut api = Api { http, base, token: String::new() };
        let (status, body) =
            api.send(Method::POST, "/api/login", Some(json!({"username": USER, "password": PASSWORD}))).await?;
        api.token = body["token"].as_str().ok_or(format!("login answered {status}: {body}"))?.to_owned();
        Ok(api)
    }

    /// One request; the status and the body as JSON (a string when it is not JSON).
    pub(crate) async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| format!("{path}: {e}"))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| format!("{path}: {e}"))?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// `GET path`, which must answer 200.
    pub(crate) async fn get(&self, path: &str) -> Result<Value, String> {
        match self.send(Method::GET, path, None).await? {
            (200, body) => Ok(body),
            (status, body) => Err(format!("GET {path}: {status} {body}")),
        }
    }

    /// Creates a context asking for `model` and offering `tools`; its id.
    pub(crate) async fn create(&self, model: &str, tools: &[&str]) -> Result<String, String> {
        let body = json!({"model": model, "tools": tools});
        match self.send(Method::POST, "/api/contexts", Some(body)).await? {
            (201, body) => body["id"].as_str().map(str::to_owned).ok_or(format!("no id in {body}")),
            (status, body) => Err(format!("POST /api/contexts: {status} {body}")),
        }
    }

    /// Waits until the llm-manager has journaled `id`'s creation; its directory entry then.
    pub(crate) async fn journaled(&self, id: &str) -> Result<Value, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // The journal may begin with its writer's fence: the creation follows it.
            let page = self.get(&format!("/api/contexts/{id}/events?limit=16")).await?;
            let records = page["records"].as_array().map(Vec::as_slice).unwrap_or_default();
            if records.iter().any(|r| r["type"] == "nexus.context.created") {
                return self.get(&format!("/api/contexts/{id}")).await;
            }
            if Instant::now() > deadline {
                return Err(format!("context {id} was not journaled within 60 s"));
            }
            actix::clock::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Says `content` in `id`; the command's offset (its turn's `command_offset`).
    pub(crate) async fn say(&self, id: &str, content: &str) -> Result<i64, String> {
        let path = format!("/api/contexts/{id}/messages");
        match self.send(Method::POST, &path, Some(json!({"content": content}))).await? {
            (202, body) => body["offset"].as_i64().ok_or(format!("no offset in {body}")),
            (status, body) => Err(format!("POST {path}: {status} {body}")),
        }
    }

    /// Every record of `id`'s journal, in offset order.
    pub(crate) async fn events(&self, id: &str) -> Result<Vec<Value>, String> {
        let mut records = Vec::new();
        let mut from = 0;
        loop {
            let page = self.get(&format!("/api/contexts/{id}/events?from={from}&limit=5000")).await?;
            let batch = page["records"].as_array().cloned().unwrap_or_default();
            if batch.is_empty() {
                return Ok(records);
            }
            from = page["next"].as_i64().ok_or("no next offset")?;
            records.extend(batch);
        }
    }

    /// The node's `/metrics` text.
    pub(crate) async fn metrics(&self) -> Result<String, String> {
        let response = self.http.get(format!("{}/metrics", self.base)).send().await.map_err(|e| e.to_string())?;
        response.text().await.map_err(|e| e.to_string())
    }
}

/// A histogram's buckets in a `/metrics` text: `(upper bound, cumulative count)`.
pub(crate) fn buckets(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The upper bound of the bucket holding quantile `q` (a histogram tells no more).
pub(crate) fn bucket_quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    buckets.iter().find(|(_, count)| *count >= rank).map(|(le, _)| *le)
}
