//! A scripted OpenAI-compatible model server: deterministic streamed
//! answers, errors, hangs and broken streams, on a free loopback port, for
//! tests and benchmarks that need exact model output and a count of the
//! calls made. It serves on a thread and runtime of its own, so any caller
//! (actix, tokio, plain threads) can start it; dropping it stops it.
//!
//! Routes: `POST /v1/chat/completions` (the script), `GET /v1/models` (one
//! model, `scripted`) and `GET /_requests` (`{"requests": N}`, for peers
//! that are not Rust). It answers; it judges nothing.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::loopback::{full, Body, Loopback};

/// The model name the server reports.
pub const MODEL: &str = "scripted";
/// The prompt tokens [`Reply::text`] and [`Reply::tool_calls`] report.
pub const PROMPT_TOKENS: u64 = 10;

/// One request to `chat/completions`, as the responder sees it.
#[derive(Debug, Clone)]
pub struct ModelCall {
    /// The request body (`Value::Null` when it was not JSON).
    pub body: Value,
    /// Its number among the server's requests, from 0.
    pub index: usize,
    /// Its headers, names in lower case.
    pub headers: HashMap<String, String>,
}

impl ModelCall {
    /// The messages sent.
    pub fn messages(&self) -> &[Value] {
        self.body["messages"].as_array().map_or(&[], Vec::as_slice)
    }

    /// The role of the last message.
    pub fn last_role(&self) -> Option<&str> {
        self.messages().last()?["role"].as_str()
    }

    /// The text of the last message.
    pub fn last_content(&self) -> Option<&str> {
        self.messages().last()?["content"].as_str()
    }

    /// How many tool results (`role: tool`) the conversation holds.
    pub fn tool_results(&self) -> usize {
        self.messages().iter().filter(|m| m["role"] == "tool").count()
    }

    /// The names of the tools offered.
    pub fn tool_names(&self) -> Vec<&str> {
        let tools = self.body["tools"].as_array().map_or(&[][..], Vec::as_slice);
        tools.iter().filter_map(|t| t["function"]["name"].as_str()).collect()
    }

    /// The model asked for.
    pub fn model(&self) -> Option<&str> {
        self.body["model"].as_str()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// What the server answers one request with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A `200` event stream.
    Stream {
        /// The raw `data:` payloads, in order; `[DONE]` follows unless truncated.
        chunks: Vec<String>,
        /// A pause before each chunk.
        delay: Duration,
        /// Whether the stream ends without `[DONE]`.
        truncate: bool,
    },
    /// An error status with a JSON body.
    Status {
        /// The status code.
        status: u16,
        /// A `Retry-After` header, if any.
        retry_after: Option<String>,
        /// The body.
        body: String,
    },
    /// Reads the request and never answers.
    Hang,
}

/// Ids of tool calls, unique in the process, as real models make them.
static CALL_IDS: AtomicU64 = AtomicU64::new(0);

fn chunk(delta: Value, finish_reason: Option<&str>) -> String {
    json!({
        "id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    })
    .to_string()
}

fn usage_chunk(output_tokens: usize) -> String {
    json!({
        "id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": output_tokens, "total_tokens": PROMPT_TOKENS + output_tokens as u64},
    })
    .to_string()
}

/// `text` in pieces of a word each (its following spaces included).
fn words(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut in_space = false;
    for (at, c) in text.char_indices() {
        if !c.is_whitespace() && in_space {
            pieces.push(&text[start..at]);
            start = at;
        }
        in_space = c.is_whitespace();
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

/// `text` cut in three at character boundaries (pieces may be empty).
fn thirds(text: &str) -> [&str; 3] {
    let bounds: Vec<usize> = text.char_indices().map(|(at, _)| at).chain([text.len()]).collect();
    let n = bounds.len() - 1;
    let (a, b) = (bounds[n / 3], bounds[2 * n / 3]);
    [&text[..a], &text[a..b], &text[b..]]
}

impl Reply {
    /// A stream of these raw chunks, then `[DONE]`.
    pub fn stream(chunks: Vec<Value>) -> Reply {
        Reply::Stream { chunks: chunks.iter().map(Value::to_string).collect(), delay: Duration::ZERO, truncate: false }
    }

    /// `text` streamed a word per chunk after an empty first delta, then
    /// finish reason `stop` and a usage chunk (prompt [`PROMPT_TOKENS`],
    /// completion one per word).
    pub fn text(text: &str) -> Reply {
        let pieces = words(text);
        let mut chunks = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
        chunks.extend(pieces.iter().map(|piece| chunk(json!({"content": piece}), None)));
        chunks.push(chunk(json!({}), Some("stop")));
        chunks.push(usage_chunk(pieces.len()));
        Reply::Stream { chunks, delay: Duration::ZERO, truncate: false }
    }

    /// Tool calls `(name, arguments)` streamed as OpenAI does: the first
    /// chunk of each has its `index`, a fresh `id`, the name and empty
    /// arguments; its arguments follow in three more chunks (index only);
    /// then finish reason `tool_calls` and a usage chunk.
    pub fn tool_calls(calls: &[(&str, &str)]) -> Reply {
        let mut chunks = vec![chunk(json!({"role": "assistant", "content": null}), None)];
        for (index, (name, arguments)) in calls.iter().enumerate() {
            let id = format!("call_{}", CALL_IDS.fetch_add(1, Ordering::Relaxed));
            let head =
                json!({"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}});
            chunks.push(chunk(json!({"tool_calls": [head]}), None));
            for piece in thirds(arguments) {
                chunks.push(chunk(json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}), None));
            }
        }
        chunks.push(chunk(json!({}), Some("tool_calls")));
        chunks.push(usage_chunk(calls.len() * 4));
        Reply::Stream { chunks, delay: Duration::ZERO, truncate: false }
    }

    /// The first half of [`Reply::text`]'s words, and the stream ends:
    /// no finish reason, no `[DONE]`.
    pub fn truncated_text(text: &str) -> Reply {
        let pieces = words(text);
        let kept = pieces.len().div_ceil(2);
        let chunks = pieces[..kept].iter().map(|piece| chunk(json!({"content": piece}), None)).collect();
        Reply::Stream { chunks, delay: Duration::ZERO, truncate: true }
    }

    /// A chunk that is not JSON, before any text.
    pub fn malformed() -> Reply {
        let chunks = vec!["{\"choices\": [{\"delta\": {\"content\": \"Hel".to_owned()];
        Reply::Stream { chunks, delay: Duration::ZERO, truncate: false }
    }

    /// A pause of `delay` before each chunk (no effect on other replies).
    pub fn with_delay(self, delay: Duration) -> Reply {
        match self {
            Reply::Stream { chunks, truncate, .. } => Reply::Stream { chunks, delay, truncate },
            other => other,
        }
    }

    /// An error status with an OpenAI-style error body.
    pub fn status(status: u16) -> Reply {
        Reply::Status { status, retry_after: None, body: error_body(status) }
    }

    /// `429 Too Many Requests` with `Retry-After: <seconds>`.
    pub fn rate_limited(retry_after_secs: u64) -> Reply {
        Reply::Status { status: 429, retry_after: Some(retry_after_secs.to_string()), body: error_body(429) }
    }
}

fn error_body(status: u16) -> String {
    json!({"error": {"message": format!("scripted status {status}"), "type": "scripted", "code": status}}).to_string()
}

type Responder = Box<dyn Fn(&ModelCall) -> Reply + Send + Sync>;

struct State {
    responder: Responder,
    received: Mutex<Vec<Value>>,
    count: AtomicUsize,
}

/// A running scripted server; stops when dropped.
pub struct ScriptedModel {
    server: Loopback,
    state: Arc<State>,
}

impl ScriptedModel {
    /// A server answering each request with what `responder` makes of it.
    pub fn start(responder: impl Fn(&ModelCall) -> Reply + Send + Sync + 'static) -> ScriptedModel {
        let state = Arc::new(State {
            responder: Box::new(responder),
            received: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
        });
        let served = state.clone();
        let server = Loopback::start("scripted-model", move |request| handle(served.clone(), request));
        ScriptedModel { server, state }
    }

    /// A server answering with `replies` in order, then
    /// `Reply::text("(script exhausted)")`.
    pub fn scripted(replies: Vec<Reply>) -> ScriptedModel {
        let replies = Mutex::new(VecDeque::from(replies));
        ScriptedModel::start(move |_| {
            replies.lock().expect("the script").pop_front().unwrap_or_else(|| Reply::text("(script exhausted)"))
        })
    }

    /// The base URL, `http://127.0.0.1:<port>/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.server.addr)
    }

    /// The `chat/completions` requests received so far, failed ones included.
    pub fn requests(&self) -> usize {
        self.state.count.load(Ordering::SeqCst)
    }

    /// Their bodies, in the order they came.
    pub fn received(&self) -> Vec<Value> {
        self.state.received.lock().expect("the requests").clone()
    }
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    match (request.method().clone(), path.as_str()) {
        (Method::GET, "/v1/models" | "/models") => {
            let models =
                json!({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "nexus-testkit"}]});
            full(StatusCode::OK, "application/json", models.to_string())
        }
        (Method::GET, "/_requests") => {
            let count = json!({"requests": state.count.load(Ordering::SeqCst)});
            full(StatusCode::OK, "application/json", count.to_string())
        }
        (Method::POST, path) if path.ends_with("/chat/completions") => complete(state, request).await,
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found"),
    }
}

async fn complete(state: Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let headers = request
        .headers()
        .iter()
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect();
    let bytes = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return full(StatusCode::BAD_REQUEST, "text/plain", "unreadable body"),
    };
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let index = {
        let mut received = state.received.lock().expect("the requests");
        received.push(body.clone());
        state.count.fetch_add(1, Ordering::SeqCst)
    };
    let call = ModelCall { body, index, headers };
    match (state.responder)(&call) {
        Reply::Status { status, retry_after, body } => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = full(code, "application/json", body);
            if let Some(value) = retry_after.and_then(|v| v.parse().ok()) {
                response.headers_mut().insert(hyper::header::RETRY_AFTER, value);
            }
            response
        }
        Reply::Hang => std::future::pending().await,
        Reply::Stream { mut chunks, delay, truncate } => {
            if !truncate {
                chunks.push("[DONE]".to_owned());
            }
            let frames = futures::stream::unfold(chunks.into_iter(), move |mut chunks| async move {
                let chunk = chunks.next()?;
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let frame = Frame::data(Bytes::from(format!("data: {chunk}\n\n")));
                Some((Ok::<_, Infallible>(frame), chunks))
            });
            let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
            let headers = response.headers_mut();
            headers.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/event-stream"));
            headers.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-cache"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_thirds_keep_every_character() {
        assert_eq!(words("Hello big  world"), vec!["Hello ", "big  ", "world"]);
        assert_eq!(words(""), Vec::<&str>::new());
        assert_eq!(thirds("{\"a\":1}").concat(), "{\"a\":1}");
        assert_eq!(thirds("é"), ["", "", "é"]);
        assert_eq!(thirds(""), ["", "", ""]);
    }

    #[test]
    fn text_and_tool_call_replies_have_the_openai_shape() {
        let Reply::Stream { chunks, truncate, .. } = Reply::text("a b") else { panic!() };
        assert!(!truncate);
        let chunks: Vec<Value> = chunks.iter().map(|c| serde_json::from_str(c).unwrap()).collect();
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "a ");
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[4]["usage"]["completion_tokens"], 2);

        let Reply::Stream { chunks, .. } = Reply::tool_calls(&[("f", "{}"), ("g", "{\"x\":1}")]) else { panic!() };
        assert_eq!(chunks.len(), 1 + 2 * 4 + 2);
        let second: Value = serde_json::from_str(&chunks[5]).unwrap();
        assert_eq!(second["choices"][0]["delta"]["tool_calls"][0]["index"], 1);
        assert_eq!(second["choices"][0]["delta"]["tool_calls"][0]["function"]["name"], "g");
    }
}
