//! WebSocket followers: each follows one document, resubscribing with the
//! last version it has, on the other node when its connection closes or
//! falls silent, and notes any change that does not follow the one before.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::load::{Shared, BACKOFF, REQUEST_TIMEOUT};

/// A follower that has heard nothing (not even a pong) for this long
/// reconnects elsewhere.
const SILENCE: Duration = Duration::from_secs(3);

/// A WebSocket client following one document.
#[derive(Default)]
pub(super) struct Follower {
    /// The latest version it has.
    pub(super) version: AtomicU64,
    /// Changes that did not follow the version before them, and snapshots
    /// older than what it had.
    pub(super) gaps: AtomicU64,
    /// Which keys it has seen (from snapshots and changes), to tell a
    /// follower whose state differs from the document's.
    pub(super) keys: Mutex<HashSet<String>>,
}

/// Follows `doc` on the nodes in turn: subscribes with the last version it
/// has, checks each change follows the one before, pings, and moves to the
/// next node when its connection closes or falls silent.
pub(super) async fn follow(shared: Arc<Shared>, follower: Arc<Follower>, doc: String, first: usize) {
    let mut turn = first;
    while !shared.stopped_following() {
        let url = shared.urls[turn % shared.urls.len()].replacen("http://", "ws://", 1);
        turn += 1;
        let connect = tokio_tungstenite::connect_async(format!("{url}/ws?token={}", shared.token));
        if let Ok(Ok((ws, _))) = tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
            session(&shared, &follower, &doc, ws).await;
        }
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
    while !shared.stopped_following() {
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
            if version < follower.version.load(Ordering::Relaxed) {
                // Older than what the follower has: the document went back.
                follower.gaps.fetch_add(1, Ordering::Relaxed);
            }
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
