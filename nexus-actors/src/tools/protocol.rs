//! The typed tool call, its reply, and the errors callers see, as they
//! travel on the transactional bus: a [`ToolRequest`] is published on the
//! owner's call channel and a [`ToolResponse`] comes back on the caller
//! node's reply channel, matched by call id. [`ToolCalled`] and
//! [`ToolFinished`] are what the semantic bus records of each call.
//!
//! This module defines shapes and error codes; it sends nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::Payload;

/// Largest encoded arguments or result of one call: what fits in a bus
/// envelope (1 MiB) with room for the envelope itself.
pub const MAX_PAYLOAD_BYTES: usize = 1_000_000;
/// The size of `value` encoded as JSON, counted without building the bytes.
pub fn encoded_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a JSON value into a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The `outcome` label of a call's metrics: `ok` or the error's code.
pub fn outcome_label(result: &ToolResult) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(error) => error.code(),
    }
}

/// Deadline of a call whose caller did not choose one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest deadline a caller may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// A call to a tool: who calls what, with which arguments, until when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Unique id of this call (a UUIDv7), set by [`ToolCall::new`].
    pub call_id: String,
    /// The callable (namespaced) tool name.
    pub tool: String,
    /// The arguments, checked against the tool's `input_schema` before it runs.
    pub arguments: Value,
    /// The user on whose behalf the call is made.
    pub caller: String,
    /// When the caller stops waiting; the tool's server stops there too.
    pub deadline: DateTime<Utc>,
    /// Calls with one caller-supplied key run at most once, and a retry
    /// gets the first result (kept a while for that). Without one the call
    /// id stands in, and nothing is kept once the call is done.
    pub idempotency_key: Option<String>,
    /// The conversation or chain the call belongs to (the Kafka key of its
    /// record); the call id when there is none.
    pub context: Option<String>,
    /// The caller journals the call itself (the LLM manager, in call
    /// order, before it relies on the outcome); the registry then does not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub journaled_by_caller: bool,
}

impl ToolCall {
    /// A call with a fresh id, its own idempotency key and the default deadline.
    pub fn new(tool: impl Into<String>, arguments: Value, caller: impl Into<String>) -> Self {
        let call_id = uuid::Uuid::now_v7().to_string();
        ToolCall {
            idempotency_key: None,
            call_id,
            tool: tool.into(),
            arguments,
            caller: caller.into(),
            deadline: Utc::now() + DEFAULT_TIMEOUT,
            context: None,
            journaled_by_caller: false,
        }
    }

    /// Sets the deadline `timeout` from now, capped at [`MAX_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.deadline = Utc::now() + timeout.min(MAX_TIMEOUT);
        self
    }

    /// Makes retries with `key` run the tool once and get its first outcome.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the conversation or chain the call belongs to.
    pub fn with_context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// Time left until the deadline (zero when past).
    pub fn remaining(&self) -> Duration {
        remaining_until(self.deadline)
    }
}

/// Time left until `deadline` (zero when past).
pub fn remaining_until(deadline: DateTime<Utc>) -> Duration {
    (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO)
}

/// Why a call produced no result. `code()` is stable; callers match on it.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum ToolError {
    /// No such tool, or one the caller may not use (the two look alike).
    #[error("no tool named {tool:?} is available to you")]
    NotFound {
        /// The name as the caller gave it.
        tool: String,
    },
    /// The arguments are not a JSON object or break the tool's schema.
    #[error("the arguments do not match the tool's schema: {message}")]
    InvalidArguments {
        /// What is wrong with them, for people.
        message: String,
    },
    /// The arguments or the result are over [`MAX_PAYLOAD_BYTES`].
    #[error("the {what} is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// Which payload: `arguments` or `result`.
        what: String,
        /// Its encoded size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// No outcome before the deadline.
    #[error("no answer within the deadline of {timeout_ms} ms")]
    Timeout {
        /// The time the call was allowed, in milliseconds.
        timeout_ms: u64,
    },
    /// The panel answered `POST /mcp/execute` with a non-success status.
    #[error("the panel answered HTTP {status}: {body}")]
    PanelStatus {
        /// The HTTP status code.
        status: u16,
        /// The start of the response body (lossy UTF-8, cut short by the sidecar).
        body: String,
    },
    /// The panel's answer is not a valid tool response.
    #[error("the panel's answer is not valid: {message}")]
    InvalidResponse {
        /// Why it was refused.
        message: String,
    },
    /// Nothing serves the tool now: nobody listens on its channel, the bus failed,
    /// or the panel refused or dropped the connection.
    #[error("nothing is serving {owner} now: {message}")]
    PanelUnavailable {
        /// Who should serve it: `panel <id>` or `system tool <name>`.
        owner: String,
        /// What failed.
        message: String,
    },
    /// The tool's server is at its limit of concurrent calls; retry shortly.
    #[error("the tool's server already has {limit} calls in flight")]
    Busy {
        /// Its limit of calls in flight.
        limit: usize,
    },
    /// Another call with the same idempotency key has not finished yet.
    #[error("a call with idempotency key {key:?} is still running")]
    InProgress {
        /// The idempotency key.
        key: String,
    },
    /// The tool ran and reported a failure of its own.
    #[error("{message}")]
    ToolError {
        /// The tool's own message.
        message: String,
    },
    /// A fault of Nexus itself (store, bus, registry); logged where it happened.
    #[error("internal error: {message}")]
    Internal {
        /// What failed.
        message: String,
    },
    /// The caller cancelled the call (or went away) before it ended. A
    /// panel's sidecar drops the panel's request; a system tool may run on.
    #[error("the call was cancelled by its caller")]
    Cancelled,
}

impl ToolError {
    /// The stable code, as in the serialized `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            ToolError::NotFound { .. } => "not_found",
            ToolError::InvalidArguments { .. } => "invalid_arguments",
            ToolError::TooLarge { .. } => "too_large",
            ToolError::Timeout { .. } => "timeout",
            ToolError::PanelStatus { .. } => "panel_status",
            ToolError::InvalidResponse { .. } => "invalid_response",
            ToolError::PanelUnavailable { .. } => "panel_unavailable",
            ToolError::Busy { .. } => "busy",
            ToolError::InProgress { .. } => "in_progress",
            ToolError::ToolError { .. } => "tool_error",
            ToolError::Internal { .. } => "internal",
            ToolError::Cancelled => "cancelled",
        }
    }

    /// A failure the tool itself reports.
    pub fn failed(message: impl Into<String>) -> Self {
        ToolError::ToolError { message: message.into() }
    }

    /// A [`ToolError::Internal`] with `message`.
    pub fn internal(message: impl std::fmt::Display) -> Self {
        ToolError::Internal { message: message.to_string() }
    }
}

/// What a call produced.
pub type ToolResult = Result<Value, ToolError>;

/// A call as delivered to the tool's server (`nexus.tool.request`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolRequest {
    /// The [`ToolCall::call_id`]; the response carries it back.
    pub call_id: String,
    /// The tool's name inside its owner.
    pub tool: String,
    /// The arguments, already checked against the tool's schema by the caller's registry.
    pub arguments: Value,
    /// The user on whose behalf the call is made.
    pub caller: String,
    /// When the caller stops waiting; the server gives up then and answers `timeout`.
    pub deadline: DateTime<Utc>,
    /// The caller's idempotency key, or the call id.
    pub idempotency_key: String,
    /// Whether the key came from the caller: only then is the outcome kept
    /// to answer retries; otherwise nothing outlives the call.
    #[serde(default)]
    pub keep_result: bool,
    /// Where the [`ToolResponse`] goes.
    pub reply_to: String,
    /// Set when this is a read of the panel's declared resource at this
    /// path, not a tool call: the sidecar fetches it from the panel and
    /// answers `{"text": ..}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

impl Payload for ToolRequest {
    const TYPE: &'static str = "nexus.tool.request";
}

/// The reply to a [`ToolRequest`] (`nexus.tool.response`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolResponse {
    /// The [`ToolRequest::call_id`] answered.
    pub call_id: String,
    /// What the call produced.
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Payload for ToolResponse {
    const TYPE: &'static str = "nexus.tool.response";
}

/// A result or an error, serialized as `{"result": ..}` or `{"error": {"code": ..}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The tool's result.
    Result(Value),
    /// Why there is no result.
    Error(ToolError),
}

impl Outcome {
    /// Whether a retry would get the same answer: a result, or an error of
    /// the call itself (not of the moment, like a timeout or a busy panel).
    pub fn is_final(&self) -> bool {
        match self {
            Outcome::Result(_) => true,
            Outcome::Error(e) => {
                matches!(
                    e,
                    ToolError::ToolError { .. } | ToolError::InvalidArguments { .. } | ToolError::TooLarge { .. }
                )
            }
        }
    }
}

impl From<ToolResult> for Outcome {
    fn from(result: ToolResult) -> Self {
        match result {
            Ok(value) => Outcome::Result(value),
            Err(error) => Outcome::Error(error),
        }
    }
}

impl From<Outcome> for ToolResult {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Result(value) => Ok(value),
            Outcome::Error(error) => Err(error),
        }
    }
}

/// How far a running call has come (`nexus.tool.progress`): posted by the
/// panel to its sidecar, which sends it to the caller node's reply channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolProgress {
    /// The [`ToolRequest::call_id`] it reports on.
    pub call_id: String,
    /// Work done so far, in the panel's own unit.
    pub progress: f64,
    /// The whole work in that unit, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<f64>,
    /// A short line for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Payload for ToolProgress {
    const TYPE: &'static str = "nexus.tool.progress";
}

/// Stop a running call (`nexus.tool.cancel`). Sent to the caller node's
/// reply channel (by a node that took the caller's cancellation) and from
/// there to the channel the call went out on, where the tool's server
/// aborts it. It names the caller, and only that caller's call stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCancel {
    /// The call to stop.
    pub call_id: String,
    /// Who asked: the call's own caller.
    pub caller: String,
}

impl Payload for ToolCancel {
    const TYPE: &'static str = "nexus.tool.cancel";
}

/// Recorded on `semantic.events` when a call starts (`nexus.tool.called`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolCalled {
    /// The call as the caller made it.
    pub call: ToolCall,
}

impl Payload for ToolCalled {
    const TYPE: &'static str = "nexus.tool.called";
}

/// Recorded on `semantic.events` when a call ends (`nexus.tool.finished`);
/// its causation id is the id of the [`ToolCalled`] record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolFinished {
    /// The [`ToolCall::call_id`] of the call.
    pub call_id: String,
    /// The callable (namespaced) tool name, as the caller gave it.
    pub tool: String,
    /// What the call produced.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Time from the call's start in the registry to its outcome, in milliseconds.
    pub duration_ms: u64,
}

impl Payload for ToolFinished {
    const TYPE: &'static str = "nexus.tool.finished";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_have_stable_wire_shapes() {
        let ok = ToolResponse { call_id: "c".into(), outcome: Outcome::Result(serde_json::json!({"n": 1})) };
        assert_eq!(serde_json::to_value(&ok).unwrap(), serde_json::json!({"call_id": "c", "result": {"n": 1}}));
        let err = ToolResponse { call_id: "c".into(), outcome: Outcome::Error(ToolError::Timeout { timeout_ms: 5 }) };
        let json = serde_json::to_value(&err).unwrap();
        assert_eq!(json, serde_json::json!({"call_id": "c", "error": {"code": "timeout", "timeout_ms": 5}}));
        let back: ToolResponse = serde_json::from_value(json).unwrap();
        assert_eq!(back.outcome, Outcome::Error(ToolError::Timeout { timeout_ms: 5 }));
        for error in [
            ToolError::NotFound { tool: "x".into() },
            ToolError::Busy { limit: 1 },
            ToolError::failed("no"),
            ToolError::PanelStatus { status: 500, body: String::new() },
        ] {
            assert_eq!(serde_json::to_value(&error).unwrap()["code"], error.code());
        }
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        let value = serde_json::json!({"text": "é\"x", "n": [1, 2.5, null]});
        assert_eq!(encoded_len(&value), serde_json::to_vec(&value).unwrap().len());
    }

    #[test]
    fn deadlines_are_capped() {
        let call = ToolCall::new("t", Value::Null, "ada").with_timeout(Duration::from_secs(10_000));
        assert!(call.remaining() <= MAX_TIMEOUT);
        assert_eq!(call.idempotency_key, None);
    }
}
