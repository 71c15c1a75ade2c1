//! [`ModelClient`]: one streamed chat completion, over HTTP, with the
//! retry policy. It owns the connections and the per-endpoint slots; the
//! chunks' meaning is [`super::stream`]'s, the body's shape
//! [`super::wire`]'s.
//!
//! The policy, per call:
//! * endpoints are tried in their configured order (see
//!   [`ModelRequest::model`] for which ones);
//! * on one endpoint, a retryable failure ([`ModelError::is_retryable`]) is
//!   retried up to `retries` times after a backoff (200 ms doubled, capped
//!   at 5 s) or the `Retry-After` of a 429 or 503; any other failure, or
//!   the last retry, fails over to the next endpoint at once;
//! * once text has been handed to `on_text`, a failure ends the call: the
//!   caller has shown that text and decides what happens next;
//! * no wait runs past the deadline: a wait that would fails over to the
//!   next endpoint, or ends the call with [`ModelError::Deadline`];
//! * a slot of the endpoint's concurrency is held for each attempt (not
//!   between attempts); waiting for one counts against the deadline;
//! * the idle timeout bounds the wait for the response head and every gap
//!   between bytes; once the model gave its finish reason, a silence, a
//!   break or the deadline ends the stream without failing the answer.

use std::collections::HashSet;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};
use tracing::field::Empty;
use tracing::Instrument;

use super::config::{check_url, ConfigError, EndpointConfig, ModelConfig, MAX_BACKOFF};
use super::stream::{Assembler, ChatChunk};
use super::{wire, Completion, ModelError, ModelRequest};
use crate::roles::llm_manager::metrics::{LlmMetrics, OUTCOME_OK};
use crate::telemetry::TraceContext;

/// How much of an error body is kept.
const ERROR_BODY_BYTES: usize = 512;
/// The largest non-streamed answer read.
const MAX_JSON_BODY: usize = 16 * 1024 * 1024;

/// A client of the configured endpoints. Cloning shares connections and slots.
#[derive(Clone)]
pub struct ModelClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: ModelConfig,
    endpoints: Vec<Endpoint>,
    metrics: LlmMetrics,
}

/// What the client keeps of one endpoint.
struct Endpoint {
    url: String,
    key: Option<String>,
    slots: Semaphore,
    host: String,
    port: Option<u16>,
}

/// A failed attempt, with what the retry loop needs to know of it.
struct Failure {
    error: ModelError,
    /// Whether text reached `on_text` before it failed.
    streamed: bool,
    /// The `Retry-After` of a 429 or 503.
    retry_after: Option<Duration>,
}

impl From<ModelError> for Failure {
    fn from(error: ModelError) -> Self {
        Failure { error, streamed: false, retry_after: None }
    }
}

/// Why reading a body stopped early.
enum ReadError {
    Idle,
    Body(reqwest::Error),
}

impl ModelClient {
    /// A client of `config`'s endpoints; reads their key files now. No
    /// endpoint is allowed: every call then fails with `no_endpoint`.
    pub fn new(config: ModelConfig, metrics: LlmMetrics) -> Result<Self, ConfigError> {
        let mut names = HashSet::new();
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for endpoint in &config.endpoints {
            let bad = |reason: String| ConfigError::Endpoint { endpoint: endpoint.name.clone(), reason };
            if !names.insert(endpoint.name.as_str()) {
                return Err(bad("another endpoint has this name; give each a name=".to_owned()));
            }
            if endpoint.concurrency == 0 || endpoint.model.is_empty() {
                return Err(bad("it needs a model and a concurrency of at least 1".to_owned()));
            }
            let url = check_url(&endpoint.base_url).map_err(bad)?;
            let key = endpoint.key_file.as_ref().map(|path| read_key(endpoint, path)).transpose()?;
            let mut outcomes = vec![OUTCOME_OK];
            outcomes.extend(ModelError::CODES.iter().filter(|code| **code != "no_endpoint"));
            metrics.endpoint(&endpoint.name, &outcomes);
            endpoints.push(Endpoint {
                url: endpoint.completions_url(),
                key,
                slots: Semaphore::new(endpoint.concurrency.min(Semaphore::MAX_PERMITS)),
                host: url.host_str().unwrap_or_default().to_owned(),
                port: url.port_or_known_default(),
            });
        }
        // Endpoints are local servers or reached directly; a proxy from the
        // environment would also catch the loopback ones.
        let http = reqwest::Client::builder().no_proxy().tcp_nodelay(true).build()?;
        Ok(ModelClient { inner: Arc::new(Inner { http, config, endpoints, metrics }) })
    }

    /// The configured endpoints, in the order they are tried.
    pub fn endpoints(&self) -> &[EndpointConfig] {
        &self.inner.config.endpoints
    }

    /// Whether any endpoint is configured.
    pub fn is_configured(&self) -> bool {
        !self.inner.config.endpoints.is_empty()
    }

    /// Makes one model call, handing each piece of streamed text to
    /// `on_text` as it comes. Traced as one `gen_ai.chat` span, a child of
    /// the current span; the endpoint gets its `traceparent`.
    pub async fn complete(
        &self,
        req: ModelRequest<'_>,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Completion, ModelError> {
        // OpenTelemetry takes the span's name when it starts: the model first tried.
        let first = self.inner.config.endpoints.first().map(|e| e.model.as_str());
        let span = tracing::info_span!(
            "gen_ai.chat",
            otel.name = %format_args!("chat {}", req.model.or(first).unwrap_or_default()),
            otel.kind = "client",
            otel.status_code = Empty,
            gen_ai.operation.name = "chat",
            gen_ai.system = "openai",
            gen_ai.request.model = Empty,
            gen_ai.response.model = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            server.address = Empty,
            server.port = Empty,
            error.type = Empty,
        );
        let result = self.call(req, on_text, &span).instrument(span.clone()).await;
        match &result {
            Ok(answer) => {
                span.record("gen_ai.response.model", answer.model.as_str());
                span.record("gen_ai.usage.input_tokens", answer.usage.input_tokens);
                span.record("gen_ai.usage.output_tokens", answer.usage.output_tokens);
                if let Some(reason) = &answer.finish_reason {
                    span.record("gen_ai.response.finish_reasons", reason.as_str());
                }
            }
            Err(error) => {
                span.record("error.type", error.code());
                span.record("otel.status_code", "error");
            }
        }
        result
    }

    async fn call(
        &self,
        req: ModelRequest<'_>,
        on_text: &mut (dyn FnMut(&str) + Send),
        span: &tracing::Span,
    ) -> Result<Completion, ModelError> {
        let started = Instant::now();
        let inner = &*self.inner;
        let candidates: Vec<usize> = (0..inner.endpoints.len())
            .filter(|&i| req.model.is_none_or(|model| inner.config.endpoints[i].model == model))
            .collect();
        if candidates.is_empty() {
            inner.metrics.request("none", ModelError::NoEndpoint.code());
            return Err(ModelError::NoEndpoint);
        }
        let mut failed = Vec::new();
        for (rank, &i) in candidates.iter().enumerate() {
            let (config, endpoint) = (&inner.config.endpoints[i], &inner.endpoints[i]);
            let body = Bytes::from(wire::body(&config.model, config.max_tokens, req.messages, req.tools));
            span.record("gen_ai.request.model", config.model.as_str());
            span.record("server.address", endpoint.host.as_str());
            if let Some(port) = endpoint.port {
                span.record("server.port", port);
            }
            let mut backoff = inner.config.backoff;
            for attempt in 0..=inner.config.retries {
                match self.attempt(config, endpoint, body.clone(), started, req.deadline, &mut *on_text).await {
                    Ok(mut answer) => {
                        inner.metrics.request(&config.name, OUTCOME_OK);
                        inner.metrics.answered(answer.usage, answer.ttft, answer.latency);
                        answer.failed_attempts = failed;
                        return Ok(answer);
                    }
                    Err(Failure { error, streamed, retry_after }) => {
                        inner.metrics.request(&config.name, error.code());
                        tracing::warn!(endpoint = %config.name, attempt, %error, "model attempt failed");
                        if streamed || error == ModelError::Deadline {
                            return Err(error);
                        }
                        let retryable = error.is_retryable();
                        failed.push(error);
                        if !retryable || attempt == inner.config.retries {
                            break;
                        }
                        let wait = retry_after.unwrap_or(backoff);
                        backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
                        if Instant::now().checked_add(wait).is_none_or(|until| until >= req.deadline) {
                            if rank + 1 < candidates.len() {
                                break;
                            }
                            return Err(ModelError::Deadline);
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        Err(failed.pop().unwrap_or(ModelError::NoEndpoint))
    }

    /// One request to one endpoint.
    async fn attempt(
        &self,
        config: &EndpointConfig,
        endpoint: &Endpoint,
        body: Bytes,
        started: Instant,
        deadline: Instant,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Completion, Failure> {
        let name = &config.name;
        let idle = self.inner.config.idle_timeout;
        let _slot = match timeout_at(deadline, endpoint.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) | Err(_) => return Err(ModelError::Deadline.into()),
        };
        let mut request = self
            .inner
            .http
            .post(&endpoint.url)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(body);
        if let Some(key) = &endpoint.key {
            request = request.bearer_auth(key);
        }
        let trace = TraceContext::current();
        if let Some(traceparent) = &trace.traceparent {
            request = request.header("traceparent", traceparent);
        }
        if let Some(tracestate) = &trace.tracestate {
            request = request.header("tracestate", tracestate);
        }
        let head_by = Instant::now().checked_add(idle).map_or(deadline, |t| t.min(deadline));
        let response = match timeout_at(head_by, request.send()).await {
            Err(_) => return Err(silent(name, deadline).into()),
            Ok(Err(error)) if error.is_timeout() => return Err(ModelError::Timeout { endpoint: name.clone() }.into()),
            Ok(Err(error)) => {
                return Err(ModelError::Connect { endpoint: name.clone(), reason: describe(&error) }.into());
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = matches!(status.as_u16(), 429 | 503).then(|| retry_after(response.headers())).flatten();
            let body = error_body(response, idle, deadline).await;
            let error = ModelError::Http { endpoint: name.clone(), status: status.as_u16(), body };
            return Err(Failure { error, streamed: false, retry_after });
        }
        let json = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        let mut answer = Assembler::default();
        let mut ttft = None;
        if json {
            read_whole(response, idle, deadline, name, &mut answer).await?;
            if let Some(text) = Some(answer.content()).filter(|t| !t.is_empty()) {
                on_text(text);
            }
        } else {
            ttft = read_stream(response, idle, deadline, name, &mut answer, started, on_text).await?;
        }
        let latency = started.elapsed();
        let whole = answer.finish();
        Ok(Completion {
            content: whole.content,
            tool_calls: whole.tool_calls,
            finish_reason: whole.finish_reason,
            usage: whole.usage,
            model: whole.model.unwrap_or_else(|| config.model.clone()),
            endpoint: name.clone(),
            ttft: ttft.unwrap_or(latency),
            latency,
            failed_attempts: Vec::new(),
        })
    }
}

/// Reads an SSE stream of chunks into `answer` until `[DONE]`; the time to
/// its first token, if one came.
async fn read_stream(
    response: reqwest::Response,
    idle: Duration,
    deadline: Instant,
    name: &str,
    answer: &mut Assembler,
    started: Instant,
    on_text: &mut (dyn FnMut(&str) + Send),
) -> Result<Option<Duration>, Failure> {
    let mut events = pin!(idle_bytes(response, idle).eventsource());
    let mut streamed = false;
    let mut ttft = None;
    let fail = |reason: String, streamed: bool| Failure {
        error: ModelError::Stream { endpoint: name.to_owned(), reason },
        streamed,
        retry_after: None,
    };
    loop {
        let next = match timeout_at(deadline, events.next()).await {
            Err(_) if answer.finished() => break,
            Err(_) => return Err(Failure { error: ModelError::Deadline, streamed, retry_after: None }),
            Ok(next) => next,
        };
        let event = match next {
            None => break,
            Some(Ok(event)) => event,
            // The answer is whole; what follows its finish reason does not matter.
            Some(Err(_)) if answer.finished() => break,
            Some(Err(EventStreamError::Transport(ReadError::Idle))) => {
                let error = ModelError::Timeout { endpoint: name.to_owned() };
                return Err(Failure { error, streamed, retry_after: None });
            }
            Some(Err(EventStreamError::Transport(ReadError::Body(error)))) => {
                return Err(fail(format!("the stream broke: {}", describe(&error)), streamed));
            }
            Some(Err(EventStreamError::Utf8(error))) => return Err(fail(format!("not UTF-8: {error}"), streamed)),
            Some(Err(EventStreamError::Parser(error))) => return Err(fail(format!("not SSE: {error}"), streamed)),
        };
        let data = event.data.trim();
        if data.is_empty() {
            continue;
        }
        if data == "[DONE]" {
            return Ok(ttft);
        }
        let chunk: ChatChunk = serde_json::from_str(data)
            .map_err(|error| fail(format!("a chunk is not JSON ({error}): {}", cut(data, 200)), streamed))?;
        let before = answer.content().len();
        answer.push(chunk).map_err(|fault| fail(fault.to_string(), streamed))?;
        if ttft.is_none() && answer.has_token() {
            ttft = Some(started.elapsed());
        }
        if answer.content().len() > before {
            on_text(&answer.content()[before..]);
            // The caller journals the first text while this task reads on;
            // a stream that arrived whole would otherwise be parsed to its
            // end before the caller's side of the task ran.
            if !std::mem::replace(&mut streamed, true) {
                tokio::task::yield_now().await;
            }
        }
    }
    if answer.finished() {
        Ok(ttft)
    } else {
        Err(fail("the stream ended before [DONE] and without a finish reason".to_owned(), streamed))
    }
}

/// Reads a non-streamed answer (a server that ignored `stream: true`) into `answer`.
async fn read_whole(
    response: reqwest::Response,
    idle: Duration,
    deadline: Instant,
    name: &str,
    answer: &mut Assembler,
) -> Result<(), Failure> {
    let fail = |reason: String| ModelError::Stream { endpoint: name.to_owned(), reason };
    let mut body = Vec::new();
    let mut bytes = pin!(idle_bytes(response, idle));
    loop {
        match timeout_at(deadline, bytes.next()).await {
            Err(_) => return Err(ModelError::Deadline.into()),
            Ok(None) => break,
            Ok(Some(Ok(piece))) if body.len() + piece.len() <= MAX_JSON_BODY => body.extend_from_slice(&piece),
            Ok(Some(Ok(_))) => return Err(fail(format!("an answer of more than {MAX_JSON_BODY} bytes")).into()),
            Ok(Some(Err(ReadError::Idle))) => return Err(ModelError::Timeout { endpoint: name.to_owned() }.into()),
            Ok(Some(Err(ReadError::Body(error)))) => {
                return Err(fail(format!("the body broke: {}", describe(&error))).into())
            }
        }
    }
    let chunk: ChatChunk =
        serde_json::from_slice(&body).map_err(|error| fail(format!("the answer is not JSON: {error}")))?;
    answer.push(chunk).map_err(|fault| fail(fault.to_string()).into())
}

/// The response body as a stream that fails when it goes silent for `idle`.
fn idle_bytes(response: reqwest::Response, idle: Duration) -> impl Stream<Item = Result<Bytes, ReadError>> + Send {
    let body = Box::pin(response.bytes_stream());
    futures::stream::unfold(Some(body), move |body| async move {
        let mut body = body?;
        match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(body))),
            Ok(Some(Err(error))) => Some((Err(ReadError::Body(error)), None)),
            Ok(None) => None,
            Err(_) => Some((Err(ReadError::Idle), None)),
        }
    })
}

/// The start of an error response's body, as text.
async fn error_body(response: reqwest::Response, idle: Duration, deadline: Instant) -> String {
    let mut body = Vec::new();
    let mut bytes = pin!(idle_bytes(response, idle));
    while body.len() < ERROR_BODY_BYTES {
        match timeout_at(deadline, bytes.next()).await {
            Ok(Some(Ok(piece))) => body.extend_from_slice(&piece),
            _ => break,
        }
    }
    body.truncate(ERROR_BODY_BYTES);
    String::from_utf8_lossy(&body).into_owned()
}

/// The wait a `Retry-After` header asks for: seconds, or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds.max(0.0)).ok();
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some((at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO))
}

/// A wait that ended without an answer: the deadline's, or the idle timeout's.
fn silent(name: &str, deadline: Instant) -> ModelError {
    if Instant::now() >= deadline {
        ModelError::Deadline
    } else {
        ModelError::Timeout { endpoint: name.to_owned() }
    }
}

/// A reqwest error with its causes, which its own message leaves out.
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn read_key(endpoint: &EndpointConfig, path: &std::path::Path) -> Result<String, ConfigError> {
    let bad = |reason: String| ConfigError::KeyFile { endpoint: endpoint.name.clone(), path: path.to_owned(), reason };
    let key = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?.trim().to_owned();
    if key.is_empty() {
        return Err(bad("it is empty".to_owned()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after(&headers("3")), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&headers(" 0.5 ")), Some(Duration::from_millis(500)));
        assert_eq!(retry_after(&headers("-4")), Some(Duration::ZERO));
        assert_eq!(retry_after(&headers("1e300")), None);
        assert_eq!(retry_after(&headers("Sun, 06 Nov 1994 08:49:37 GMT")), Some(Duration::ZERO));
        let later = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
        let wait = retry_after(&headers(&later)).unwrap();
        assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120), "{wait:?}");
        assert_eq!(retry_after(&headers("soon")), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("abc", 10), "abc");
    }
}
