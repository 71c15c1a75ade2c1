//! The harness's clients: the direct streaming call to a model (the
//! baseline of every LLM row: reqwest and the same SSE parser the node's
//! model client uses), a WebSocket that follows one context as a browser
//! does, and [`Turns`], which learns when turns complete from the node's
//! live fan-out on Redis. They observe; they judge nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::{SinkExt, StreamExt};
use nexus_actors::platform::channels;
use nexus_actors::semantic::records::{Journaled, ThoughtDelta, TurnCompleted, UserMessage};
use nexus_actors::{Envelope, Payload};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// One finished direct call.
pub(crate) struct Direct {
    /// From sending the request to the first streamed text or tool-call delta.
    pub(crate) ttft: Duration,
    /// From sending the request to `[DONE]`.
    pub(crate) total: Duration,
    /// The text streamed.
    pub(crate) text: String,
    /// Tool calls `(id, name, arguments)`, by index.
    pub(crate) calls: Vec<(String, String, String)>,
    /// Completion tokens, as the usage chunk said.
    pub(crate) output_tokens: u64,
}

/// The body the node's model client sends for `messages` (and `tools`).
pub(crate) fn body(model: &str, messages: &[Value], tools: &[Value]) -> Value {
    let mut body =
        json!({"model": model, "stream": true, "stream_options": {"include_usage": true}, "messages": messages});
    if !tools.is_empty() {
        body["tools"] = Value::from(tools.to_vec());
    }
    body
}

/// One streamed chat completion, read to `[DONE]`, each chunk parsed as JSON.
pub(crate) async fn direct(http: &reqwest::Client, base_url: &str, body: &Value) -> Result<Direct, String> {
    let started = Instant::now();
    let response = http
        .post(format!("{base_url}/chat/completions"))
        .json(body)
        .send()
        .await
        .map_err(|e| format!("direct call: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("direct call answered {}", response.status()));
    }
    let mut events = response.bytes_stream().eventsource();
    let mut out = Direct {
        ttft: Duration::ZERO,
        total: Duration::ZERO,
        text: String::new(),
        calls: Vec::new(),
        output_tokens: 0,
    };
    let mut first = None;
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| format!("direct stream: {e}"))?;
        let data = event.data.trim();
        if data == "[DONE]" {
            break;
        }
        if data.is_empty() {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| format!("direct chunk: {e}"))?;
        if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
            out.output_tokens = tokens;
        }
        let delta = &chunk["choices"][0]["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            out.text.push_str(text);
            first.get_or_insert_with(|| started.elapsed());
        }
        for call in delta["tool_calls"].as_array().map_or(&[][..], Vec::as_slice) {
            let index = call["index"].as_u64().unwrap_or(0) as usize;
            if out.calls.len() <= index {
                out.calls.resize(index + 1, Default::default());
            }
            let slot = &mut out.calls[index];
            slot.0.push_str(call["id"].as_str().unwrap_or_default());
            slot.1.push_str(call["function"]["name"].as_str().unwrap_or_default());
            slot.2.push_str(call["function"]["arguments"].as_str().unwrap_or_default());
            first.get_or_insert_with(|| started.elapsed());
        }
    }
    out.total = started.elapsed();
    out.ttft = first.unwrap_or(out.total);
    Ok(out)
}

/// A record a followed context's WebSocket brought.
pub(crate) struct Frame {
    /// Its type, e.g. `nexus.thought.delta`.
    pub(crate) kind: String,
    /// The command whose turn it belongs to, if it says.
    pub(crate) command_offset: Option<i64>,
    /// When the node made it (its envelope's `time`), on this clock.
    pub(crate) made: Option<Instant>,
    /// When it arrived.
    pub(crate) at: Instant,
}

/// What a followed turn's records say of its timing.
pub(crate) struct TurnTimes {
    /// When the node made the journal copy of the turn's message: the
    /// context had taken the command.
    pub(crate) taken: Option<Instant>,
    /// When the first streamed text arrived, if any.
    pub(crate) first: Option<Instant>,
    /// When the node made that text's record.
    pub(crate) first_made: Option<Instant>,
    /// When the `turn_completed` arrived.
    pub(crate) done: Instant,
}

/// Wall-clock times of records made by another process on this machine, on this process's `Instant` clock.
fn on_this_clock(time: &Value) -> Option<Instant> {
    let time = chrono::DateTime::parse_from_rfc3339(time.as_str()?).ok()?;
    let (now, wall) = (Instant::now(), chrono::Utc::now());
    let ago = (wall - time.to_utc()).to_std().unwrap_or_default();
    now.checked_sub(ago)
}

/// A WebSocket session following one context; closed when dropped.
pub(crate) struct Follower {
    /// The context's records as they arrive.
    pub(crate) frames: mpsc::UnboundedReceiver<Frame>,
    reader: actix_rt::task::JoinHandle<()>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Opens `/ws` on `port` with `token`, follows `context` and returns once
/// the node confirmed (`context_followed`).
pub(crate) async fn follow(port: u16, token: &str, context: &str) -> Result<Follower, String> {
    let url = format!("ws://127.0.0.1:{port}/ws?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| format!("websocket: {e}"))?;
    let frame = json!({"type": "follow_context", "context": context}).to_string();
    ws.send(Message::text(frame)).await.map_err(|e| format!("websocket: {e}"))?;
    loop {
        let Some(frame) = ws.next().await else { return Err("the websocket closed".into()) };
        if let Message::Text(text) = frame.map_err(|e| format!("websocket: {e}"))? {
            let value: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
            match value["type"].as_str() {
                Some("context_followed") => break,
                Some("error") => return Err(format!("follow_context: {value}")),
                _ => {}
            }
        }
    }
    let (tx, frames) = mpsc::unbounded_channel();
    let reader = actix_rt::spawn(async move {
        let (_sink, mut stream) = ws.split();
        while let Some(Ok(frame)) = stream.next().await {
            let at = Instant::now();
            let Message::Text(text) = frame else { continue };
            let value: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
            if value["type"] != "context_record" {
                continue;
            }
            let record = &value["record"];
            let kind = record["type"].as_str().unwrap_or_default().to_owned();
            let command_offset = record["data"]["command_offset"].as_i64();
            let made = on_this_clock(&record["time"]);
            if tx.send(Frame { kind, command_offset, made, at }).is_err() {
                break;
            }
        }
    });
    Ok(Follower { frames, reader })
}

impl Follower {
    /// Waits for the turn of `command_offset` to complete.
    pub(crate) async fn turn(&mut self, command_offset: i64, limit: Duration) -> Result<TurnTimes, String> {
        let (mut first, mut first_made, mut taken) = (None, None, None);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.frames.recv()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Err("the websocket closed".into()),
                Err(_) => return Err(format!("no turn_completed for command {command_offset} within {limit:?}")),
            };
            if frame.command_offset != Some(command_offset) {
                continue;
            }
            match frame.kind.as_str() {
                ThoughtDelta::TYPE if first.is_none() => (first, first_made) = (Some(frame.at), frame.made),
                UserMessage::TYPE => taken = frame.made,
                TurnCompleted::TYPE => return Ok(TurnTimes { taken, first, first_made, done: frame.at }),
                _ => {}
            }
        }
    }
}

#[derive(Default)]
struct Seen {
    /// Completions nobody waits for yet, by (context, command offset).
    done: HashMap<(String, i64), Instant>,
    waiting: HashMap<(String, i64), oneshot::Sender<Instant>>,
    completed: u64,
}

/// Turn completions as the node publishes them on `nexus:context:*` (the
/// fan-out the WebSocket sessions forward), for rows with more contexts
/// than one session may follow.
pub(crate) struct Turns {
    seen: Arc<Mutex<Seen>>,
    reader: actix_rt::task::JoinHandle<()>,
}

impl Drop for Turns {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Turns {
    /// Subscribes to every context's channel on `redis_url`.
    pub(crate) async fn start(redis_url: &str) -> Result<Turns, String> {
        let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
        let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
        pubsub.psubscribe(channels::context("*")).await.map_err(|e| e.to_string())?;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let s = seen.clone();
        let reader = actix_rt::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let at = Instant::now();
                let Ok(envelope) = Envelope::decode(message.get_payload_bytes()) else { continue };
                let Ok(journaled) = envelope.typed::<Journaled>() else { continue };
                let Journaled { context, record, .. } = journaled.data;
                if record.kind != TurnCompleted::TYPE {
                    continue;
                }
                let Some(offset) = record.data["command_offset"].as_i64() else { continue };
                let mut seen = s.lock().unwrap();
                seen.completed += 1;
                let key = (context, offset);
                match seen.waiting.remove(&key) {
                    Some(waiter) => {
                        let _ = waiter.send(at);
                    }
                    None => {
                        seen.done.insert(key, at);
                    }
                }
            }
        });
        Ok(Turns { seen, reader })
    }

    /// When the turn of `command_offset` in `context` completed.
    pub(crate) async fn wait(&self, context: &str, command_offset: i64, limit: Duration) -> Result<Instant, String> {
        let key = (context.to_owned(), command_offset);
        let rx = {
            let mut seen = self.seen.lock().unwrap();
            if let Some(at) = seen.done.remove(&key) {
                return Ok(at);
            }
            let (tx, rx) = oneshot::channel();
            seen.waiting.insert(key, tx);
            rx
        };
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(at)) => Ok(at),
            _ => Err(format!("no turn_completed for command {command_offset} of {context} within {limit:?}")),
        }
    }

    /// Turns completed since the start, on every context.
    pub(crate) fn completed(&self) -> u64 {
        self.seen.lock().unwrap().completed
    }

    /// Forgets completions nobody waited for (the memory row only counts them).
    pub(crate) fn forget(&self) {
        self.seen.lock().unwrap().done.clear();
    }
}

/// Percentile `p` of `xs` by nearest rank (the `⌈p·n⌉`-th smallest, as
/// LangGraph's script computes it), in ms.
pub(crate) fn pct_ms(xs: &[Duration], p: f64) -> f64 {
    let mut sorted: Vec<Duration> = xs.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

/// The mean of `xs`, in ms.
pub(crate) fn mean_ms(xs: &[Duration]) -> f64 {
    xs.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / xs.len() as f64
}
