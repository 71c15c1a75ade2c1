//! Tool callers: each calls the panel's tool with a fresh `n` and
//! idempotency key, retrying with the same key until answered, and keeps
//! every answer (which node gave it, and when) for the verdict.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::cluster::PANEL_ID;
use super::load::{Progress, Shared, BACKOFF, PACE, REQUEST_TIMEOUT};
use super::panel::TOOL;

/// The deadline a tool call asks for.
const CALL_TIMEOUT_MS: u64 = 3000;

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
