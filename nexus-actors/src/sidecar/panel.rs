//! The sidecar's HTTP client to its panel: `GET /manifest`,
//! `POST /mcp/execute` and `GET /mcp/resources/<uri>`, with a deadline, size limits and every way a panel
//! can misbehave turned into a [`ToolError`] the caller understands. It
//! never touches the bus.

use std::time::Duration;

use serde_json::{json, Value};

use crate::instance::SIDECAR_TOKEN_HEADER;
use crate::tools::manifest::{Manifest, ManifestError, MAX_MANIFEST_BYTES};
use crate::tools::protocol::{encoded_len, remaining_until, ToolError, ToolRequest, ToolResult, MAX_PAYLOAD_BYTES};
use crate::tools::resources::is_valid_uri;

/// How much of a non-2xx body goes back to the caller.
const STATUS_BODY_EXCERPT: usize = 512;
/// Longest tool error message passed on (a panel's error is for reading,
/// not a second result channel).
const MAX_ERROR_MESSAGE: usize = 4096;
/// How long a manifest read may take.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestFetchError {
    /// Nothing answered (or the answer broke off).
    #[error("the panel is not answering at {url}: {message}")]
    Unreachable {
        /// What was asked.
        url: String,
        /// Why it failed.
        message: String,
    },
    /// The panel answered with an error status (401: it refused the secret).
    #[error("GET /manifest answered HTTP {0}")]
    Status(u16),
    /// The manifest breaks the contract.
    #[error(transparent)]
    Invalid(#[from] ManifestError),
}

/// Talks to one panel over loopback HTTP.
#[derive(Clone)]
pub struct PanelClient {
    http: reqwest::Client,
    base: String,
    panel: String,
    /// Sent in [`SIDECAR_TOKEN_HEADER`] with every request.
    token: Option<String>,
}

impl PanelClient {
    /// A client for the panel `panel` served at `base` (`http://127.0.0.1:8080`),
    /// proving itself with `token` when given.
    pub fn new(base: &str, panel: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            // The sidecar is on the host network: a redirect from the panel
            // must not send it (and the panel's secret) anywhere else.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(64)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        PanelClient { http, base: base.trim_end_matches('/').to_owned(), panel: panel.to_owned(), token }
    }

    /// Adds the instance's secret, when there is one.
    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.header(SIDECAR_TOKEN_HEADER, token),
            None => request,
        }
    }

    /// Reads and validates `GET /manifest`.
    pub async fn manifest(&self) -> Result<Manifest, ManifestFetchError> {
        let url = format!("{}/manifest", self.base);
        let unreachable =
            |e: &dyn std::fmt::Display| ManifestFetchError::Unreachable { url: url.clone(), message: e.to_string() };
        let request = self.authorized(self.http.get(&url)).timeout(MANIFEST_TIMEOUT);
        let response = request.send().await.map_err(|e| unreachable(&e))?;
        if !response.status().is_success() {
            return Err(ManifestFetchError::Status(response.status().as_u16()));
        }
        match read_limited(response, MAX_MANIFEST_BYTES).await {
            Ok(body) => Ok(Manifest::parse(&body)?),
            Err(Limited::TooLarge(size)) => Err(ManifestError::TooLarge { size }.into()),
            Err(Limited::Failed(e)) => Err(unreachable(&e)),
        }
    }

    /// Runs a tool: `POST /mcp/execute`, answered before the request's deadline.
    pub async fn execute(&self, request: &ToolRequest) -> ToolResult {
        let remaining = remaining_until(request.deadline);
        let timeout = || ToolError::Timeout { timeout_ms: remaining.as_millis() as u64 };
        if remaining.is_zero() {
            return Err(timeout());
        }
        let deadline_ms = remaining.as_millis() as u64;
        let body = json!({
            "call_id": request.call_id,
            "tool": request.tool,
            "arguments": request.arguments,
            "deadline_ms": deadline_ms,
        });
        let sent = self
            .authorized(self.http.post(format!("{}/mcp/execute", self.base)))
            .header("x-nexus-call-id", &request.call_id)
            .header("x-nexus-deadline-ms", deadline_ms)
            .json(&body)
            .timeout(remaining)
            .send();
        let work = async {
            let response = sent.await.map_err(|e| self.send_error(e, &timeout))?;
            let status = response.status();
            let body = read_limited(response, MAX_PAYLOAD_BYTES).await.map_err(|e| match e {
                Limited::TooLarge(size) => {
                    ToolError::TooLarge { what: "result".into(), size, limit: MAX_PAYLOAD_BYTES }
                }
                Limited::Failed(e) => self.send_error(e, &timeout),
            })?;
            if !status.is_success() {
                let excerpt = String::from_utf8_lossy(&body[..body.len().min(STATUS_BODY_EXCERPT)]).into_owned();
                return Err(ToolError::PanelStatus { status: status.as_u16(), body: excerpt });
            }
            interpret(&body)
        };
        // The per-request timeout covers sending and headers; this covers the body too.
        tokio::time::timeout(remaining, work).await.unwrap_or_else(|_| Err(timeout()))
    }

    /// Reads the declared resource at `uri` (a path [`is_valid_uri`]
    /// allows): `GET /mcp/resources/<uri>`, answered before the request's
    /// deadline with UTF-8 text, as `{"text": ..}`.
    pub async fn read_resource(&self, request: &ToolRequest, uri: &str) -> ToolResult {
        let remaining = remaining_until(request.deadline);
        let timeout = || ToolError::Timeout { timeout_ms: remaining.as_millis() as u64 };
        if !is_valid_uri(uri) {
            return Err(ToolError::InvalidArguments { message: "not a resource path".into() });
        }
        if remaining.is_zero() {
            return Err(timeout());
        }
        let sent = self
            .authorized(self.http.get(format!("{}/mcp/resources/{uri}", self.base)))
            .header("x-nexus-call-id", &request.call_id)
            .timeout(remaining)
            .send();
        let work = async {
            let response = sent.await.map_err(|e| self.send_error(e, &timeout))?;
            let status = response.status();
            let body = read_limited(response, MAX_PAYLOAD_BYTES / 2).await.map_err(|e| match e {
                Limited::TooLarge(size) => {
                    ToolError::TooLarge { what: "resource".into(), size, limit: MAX_PAYLOAD_BYTES / 2 }
                }
                Limited::Failed(e) => self.send_error(e, &timeout),
            })?;
            if !status.is_success() {
                let excerpt = String::from_utf8_lossy(&body[..body.len().min(STATUS_BODY_EXCERPT)]).into_owned();
                return Err(ToolError::PanelStatus { status: status.as_u16(), body: excerpt });
            }
            let Ok(text) = String::from_utf8(body) else {
                return Err(ToolError::InvalidResponse { message: "a resource must be UTF-8 text".into() });
            };
            // Escaping can grow text on the bus past what was read.
            let answer = json!({ "text": text });
            let size = encoded_len(&answer);
            if size > MAX_PAYLOAD_BYTES {
                return Err(ToolError::TooLarge { what: "resource".into(), size, limit: MAX_PAYLOAD_BYTES });
            }
            Ok(answer)
        };
        tokio::time::timeout(remaining, work).await.unwrap_or_else(|_| Err(timeout()))
    }

    fn send_error(&self, error: reqwest::Error, timeout: &dyn Fn() -> ToolError) -> ToolError {
        // A refused connection, or one the panel dropped mid-call (it crashed
        // or restarted), both mean nothing is serving the call now.
        if error.is_timeout() {
            timeout()
        } else if error.is_connect() || error.is_request() || error.is_body() {
            let message = match std::error::Error::source(&error) {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            };
            ToolError::PanelUnavailable { owner: format!("panel {}", self.panel), message }
        } else {
            ToolError::InvalidResponse { message: error.to_string() }
        }
    }
}

/// A panel's 2xx body: `{"result": ..}` or `{"error": ..}`.
fn interpret(body: &[u8]) -> ToolResult {
    let invalid = |message: String| Err(ToolError::InvalidResponse { message });
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => return invalid(format!("not JSON: {e}")),
    };
    let Value::Object(mut object) = value else { return invalid("the body is not a JSON object".into()) };
    match object.remove("error") {
        None | Some(Value::Null) => {}
        Some(error) => {
            let message = match error {
                Value::String(s) => s,
                Value::Object(mut o) => match o.remove("message") {
                    Some(Value::String(s)) => s,
                    _ => Value::Object(o).to_string(),
                },
                other => other.to_string(),
            };
            return Err(ToolError::failed(truncate(message, MAX_ERROR_MESSAGE)));
        }
    }
    match object.remove("result") {
        Some(result) => {
            let size = encoded_len(&result);
            if size > MAX_PAYLOAD_BYTES {
                return Err(ToolError::TooLarge { what: "result".into(), size, limit: MAX_PAYLOAD_BYTES });
            }
            Ok(result)
        }
        None => invalid("the body has neither \"result\" nor \"error\"".into()),
    }
}

/// `message` cut to at most `max` bytes, on a character boundary.
fn truncate(mut message: String, max: usize) -> String {
    if message.len() > max {
        let mut end = max;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

enum Limited {
    TooLarge(usize),
    Failed(reqwest::Error),
}

/// Reads a body, giving up as soon as it passes `limit` bytes.
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, Limited> {
    if let Some(length) = response.content_length().filter(|l| *l as usize > limit) {
        return Err(Limited::TooLarge(length as usize));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Limited::Failed)? {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            return Err(Limited::TooLarge(body.len()));
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_become_results_or_clear_errors() {
        assert_eq!(interpret(br#"{"result": {"n": 1}}"#), Ok(json!({"n": 1})));
        assert_eq!(interpret(br#"{"result": null}"#), Ok(Value::Null));
        assert_eq!(interpret(br#"{"error": "no"}"#), Err(ToolError::failed("no")));
        assert_eq!(interpret(br#"{"error": {"message": "no"}, "result": 1}"#), Err(ToolError::failed("no")));
        assert_eq!(interpret(br#"{"result": 2, "error": null}"#), Ok(json!(2)));
        let long = format!(r#"{{"error": {{"a": "{}"}}}}"#, "é".repeat(10_000));
        let Err(ToolError::ToolError { message }) = interpret(long.as_bytes()) else { panic!("a tool error") };
        assert!(message.len() <= MAX_ERROR_MESSAGE + '…'.len_utf8());
        for garbage in [&b"<html>"[..], b"[1]", b"{}", b""] {
            assert!(matches!(interpret(garbage), Err(ToolError::InvalidResponse { .. })), "{garbage:?}");
        }
    }
}
