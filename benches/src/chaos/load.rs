//! The steady load of a chaos run, as clients would make it: writers that
//! patch their documents and know which writes were acknowledged; tool
//! callers that retry with the same idempotency key until answered;
//! WebSocket followers that reconnect to the other node when theirs goes
//! away. Each keeps what the verdict needs; none judges.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::cluster::PANEL_ID;
use super::panel::TOOL;

/// A request to a node that has not answered in this long is given up
/// (and retried elsewhere).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The deadline a tool call asks for.
const CALL_TIMEOUT_MS: u64 = 3000;
/// Pause between one client's operations.
const PACE: Duration = Duration::from_millis(40);
/// Pause before retrying a failed operation.
const BACKOFF: Duration = Duration::from_millis(100);
/// A follower that has heard nothing (not even a pong) for this long
/// reconnects elsewhere.
const SILENCE: Duration = Duration::from_secs(3);

/// What all clients share: the nodes, the token, the clock, the stop flag.
pub(super) struct Shared {
    pub(super) urls: Vec<String>,
    pub(super) token: String,
    pub(super) http: reqwest::Client,
    pub(super) origin: Instant,
    pub(super) stop: AtomicBool,
}

impl Shared {
    /// Milliseconds since the run began.
    pub(super) fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// When a client's last successful operation started (ms since the run
/// began): a client has recovered from a fault once an operation it began
/// after the fault ended has succeeded.
#[derive(Default)]
pub(super) struct Progress {
    last_ok_started: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) failed: AtomicU64,
}

impl Progress {
    fn ok(&self, started_ms: u64) {
        self.last_ok_started.fetch_max(started_ms, Ordering::Relaxed);
        self.acked.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn recovered_since(&self, ms: u64) -> bool {
        self.last_ok_started.load(Ordering::Relaxed) >= ms
    }
}

/// One document and what its writer knows of it.
pub(super) struct Writer {
    pub(super) doc: String,
    pub(super) initial_version: u64,
    /// Keys whose patch was acknowledged (`200`).
    pub(super) acked: Mutex<Vec<u64>>,
    /// The highest version an acknowledgement reported.
    pub(super) acked_version: AtomicU64,
    pub(super) progress: Progress,
}

/// The key a writer's `i`-th patch adds.
pub(super) fn key(i: u64) -> String {
    format!("k{i}")
}

/// Creates a document for a writer.
pub(super) async fn new_writer(shared: &Shared) -> Writer {
    let doc: Value = shared
        .http
        .post(format!("{}/api/documents", shared.urls[0]))
        .bearer_auth(&shared.token)
        .json(&json!({"state": {}}))
        .send()
        .await
        .expect("create a document")
        .error_for_status()
        .expect("the document is created")
        .json()
        .await
        .expect("the document");
    let version = doc["version"].as_u64().expect("a version");
    Writer {
        doc: doc["id"].as_str().expect("an id").to_owned(),
        initial_version: version,
        acked: Mutex::default(),
        acked_version: AtomicU64::new(version),
        progress: Progress::default(),
    }
}

enum Patched {
    Acked(u64),
    /// Refused as stale, or no answer: whether it was applied is unknown.
    Unknown,
}

/// Patches the writer's document, one new key at a time, each at the
/// version it last knew. A patch without an answer is resolved by reading
/// the document: the key is there (it was applied) or the patch is made
/// again at the version read. Versions make a patch apply at most once.
pub(super) async fn write(shared: Arc<Shared>, writer: Arc<Writer>) {
    let mut version = writer.initial_version;
    let mut turn = 0usize;
    let mut i = 0u64;
    while !shared.stopped() {
        i += 1;
        loop {
            let started = shared.now_ms();
            let url = &shared.urls[turn % shared.urls.len()];
            turn += 1;
            match patch(&shared, url, &writer.doc, version, i).await {
                Patched::Acked(new) => {
                    version = new;
                    writer.acked.lock().expect("acked").push(i);
                    writer.acked_version.fetch_max(new, Ordering::Relaxed);
                    writer.progress.ok(started);
                    break;
                }
                Patched::Unknown => {
                    writer.progress.failed.fetch_add(1, Ordering::Relaxed);
                    match read(&shared, &shared.urls[turn % shared.urls.len()], &writer.doc).await {
                        Some((read_version, state)) => {
                            version = read_version;
                            if state.get(key(i)).is_some() {
                                break;
                            }
                        }
                        None => tokio::time::sleep(BACKOFF).await,
                    }
                    if shared.stopped() {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(PACE).await;
    }
}

async fn patch(shared: &Shared, url: &str, doc: &str, version: u64, i: u64) -> Patched {
    let answer = shared
        .http
        .patch(format!("{url}/api/documents/{doc}"))
        .bearer_auth(&shared.token)
        .timeout(REQUEST_TIMEOUT)
        .json(&json!({"version": version, "patch": {key(i): i}}))
        .send()
        .await;
    let Ok(answer) = answer else { return Patched::Unknown };
    if !answer.status().is_success() {
        return Patched::Unknown;
    }
    match answer.json::<Value>().await.ok().and_then(|d| d["version"].as_u64()) {
        Some(new) => Patched::Acked(new),
        None => Patched::Unknown,
    }
}

/// A document's version and state, read from `url`.
pub(super) async fn read(shared: &Shared, url: &str, doc: &str) -> Option<(u64, Value)> {
    let answer = shared
        .http
        .get(format!("{url}/api/documents/{doc}"))
        .bearer_auth(&shared.token)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?;
    let doc: Value = answer.json().await.ok()?;
    Some((doc["version"].as_u64()?, doc["state"].clone()))
}

/// A tool caller: what it was answered, by call.
#[derive(Default)]
pub(super) struct Caller {
    /// Every call answered `200`.
    pub(super) answered: Mutex<Vec<Answered>>,
    /// Answers whose result was not the call's own `n`.
    pub(super) wrong: AtomicU64,
    pub(super) progress: Progress,
}

/// One answered tool call.
#[derive(Clone)]
pub(super) struct Answered {
    pub(super) n: u64,
    pub(super) call_id: String,
    /// The node that answered (its index).
    pub(super) node: usize,
    /// When the answer came (ms since the run began).
    pub(super) at_ms: u64,
}

/// Calls the panel's tool with a fresh `n` and idempotency key each time,
/// retrying (on any node) with the same key until a call is answered.
pub(super) async fn call(shared: Arc<Shared>, caller: Arc<Caller>, first_n: u64) {
    let tool = format!("{PANEL_ID}.{TOOL}");
    let mut turn = 0usize;
    let mut n = first_n;
    while !shared.stopped() {
        n += 1;
        let body =
            json!({"arguments": {"n": n}, "idempotency_key": format!("chaos-{n}"), "timeout_ms": CALL_TIMEOUT_MS});
        loop {
            let started = shared.now_ms();
            let node = turn % shared.urls.len();
            let url = &shared.urls[node];
            turn += 1;
            let answer = shared
                .http
                .post(format!("{url}/api/tools/{tool}/call"))
                .bearer_auth(&shared.token)
                .timeout(Duration::from_millis(CALL_TIMEOUT_MS) + REQUEST_TIMEOUT)
                .json(&body)
                .send()
                .await;
            let answered = match answer {
                Ok(answer) if answer.status().is_success() => answer.json::<Value>().await.ok(),
                _ => None,
            };
            if let Some(answer) = answered {
                if answer["result"]["n"].as_u64() != Some(n) {
                    caller.wrong.fetch_add(1, Ordering::Relaxed);
                }
                let call_id = answer["call_id"].as_str().unwrap_or_default().to_owned();
                let at_ms = shared.now_ms();
                caller.answered.lock().expect("answered").push(Answered { n, call_id, node, at_ms });
                caller.progress.ok(started);
                break;
            }
            caller.progress.failed.fetch_add(1, Ordering::Relaxed);
            if shared.stopped() {
                return;
            }
            tokio::time::sleep(BACKOFF).await;
        }
        tokio::time::sleep(PACE).await;
    }
}

/// A WebSocket client following one document.
#[derive(Default)]
pub(super) struct Follower {
    /// The latest version it has.
    pub(super) version: AtomicU64,
    /// Changes that did not follow the version before them.
    pub(super) gaps: AtomicU64,
    pub(super) reconnects: AtomicU64,
    /// Which keys it has seen (from snapshots and changes), to tell a
    /// follower whose state differs from the document's.
    pub(super) keys: Mutex<HashSet<String>>,
}

/// Follows `doc` on the nodes in turn: subscribes with the last version it
/// has, checks each change follows the one before, pings, and moves to the
/// next node when its connection closes or falls silent.
pub(super) async fn follow(shared: Arc<Shared>, follower: Arc<Follower>, doc: String, first: usize) {
    let mut turn = first;
    while !shared.stopped() {
        let url = shared.urls[turn % shared.urls.len()].replacen("http://", "ws://", 1);
        turn += 1;
        let connect = tokio_tungstenite::connect_async(format!("{url}/ws?token={}", shared.token));
        if let Ok(Ok((ws, _))) = tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
            session(&shared, &follower, &doc, ws).await;
        }
        follower.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(BACKOFF).await;
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn session(shared: &Shared, follower: &Follower, doc: &str, ws: Ws) {
    let (mut sink, mut stream) = ws.split();
    let have = follower.version.load(Ordering::Relaxed);
    let mut subscribe = json!({"type": "subscribe", "doc": doc, "presence": false});
    if have > 0 {
        subscribe["version"] = json!(have);
    }
    if sink.send(Message::text(subscribe.to_string())).await.is_err() {
        return;
    }
    let mut ping = tokio::time::interval(Duration::from_secs(1));
    let mut heard = Instant::now();
    while !shared.stopped() {
        tokio::select! {
            frame = stream.next() => {
                let Some(Ok(frame)) = frame else { return };
                heard = Instant::now();
                if let Message::Text(text) = frame {
                    if let Ok(frame) = serde_json::from_str::<Value>(text.as_str()) {
                        take(follower, &frame);
                    }
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > SILENCE || sink.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn take(follower: &Follower, frame: &Value) {
    let Some(version) = frame["version"].as_u64() else { return };
    let fields = match frame["type"].as_str() {
        Some("snapshot") => {
            follower.keys.lock().expect("keys").clear();
            &frame["state"]
        }
        Some("change") => {
            let have = follower.version.load(Ordering::Relaxed);
            if have != 0 && version != have + 1 {
                follower.gaps.fetch_add(1, Ordering::Relaxed);
            }
            &frame["patch"]
        }
        _ => return,
    };
    if let Some(fields) = fields.as_object() {
        follower.keys.lock().expect("keys").extend(fields.keys().cloned());
    }
    follower.version.store(version, Ordering::Relaxed);
}
