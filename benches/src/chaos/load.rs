//! What the clients of a chaos run share (the nodes, the token, the clock,
//! the stop flags, [`Progress`]), and the writers: each patches its own
//! document and knows which writes were acknowledged. Clients keep what
//! the verdict needs; none judges.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A request to a node that has not answered in this long is given up
/// (and retried elsewhere).
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between one client's operations.
pub(super) const PACE: Duration = Duration::from_millis(40);
/// Pause before retrying a failed operation.
pub(super) const BACKOFF: Duration = Duration::from_millis(100);

/// What all clients share: the nodes, the token, the clock, the stop flags.
pub(super) struct Shared {
    pub(super) urls: Vec<String>,
    pub(super) token: String,
    pub(super) http: reqwest::Client,
    pub(super) origin: Instant,
    /// Writers, callers and askers stop.
    pub(super) stop: AtomicBool,
    /// Followers stop (after the verdict has seen them converge).
    pub(super) stop_following: AtomicBool,
}

impl Shared {
    /// Milliseconds since the run began.
    pub(super) fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub(super) fn stopped_following(&self) -> bool {
        self.stop_following.load(Ordering::Relaxed)
    }

    /// `GET url` as the user; its JSON when it answers with success in time.
    pub(super) async fn get(&self, url: &str) -> Option<Value> {
        self.json(self.http.get(url)).await
    }

    /// `POST url` with `body` as the user; its JSON when it answers with success in time.
    pub(super) async fn post(&self, url: &str, body: &Value) -> Option<Value> {
        self.json(self.http.post(url).json(body)).await
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> Option<Value> {
        let answer = request.bearer_auth(&self.token).timeout(REQUEST_TIMEOUT).send().await.ok()?;
        answer.error_for_status().ok()?.json().await.ok()
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
    pub(super) fn ok(&self, started_ms: u64) {
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
    let doc = shared.get(&format!("{url}/api/documents/{doc}")).await?;
    Some((doc["version"].as_u64()?, doc["state"].clone()))
}
