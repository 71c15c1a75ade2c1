//! The model client of the LLM manager: one streamed chat completion from
//! an OpenAI-compatible endpoint (llama.cpp's server, vLLM, Ollama,
//! OpenAI), with retries, fail-over, a deadline and per-endpoint
//! concurrency limits. It knows nothing of contexts, journals or tools
//! beyond the names and schemas it is handed, and records nothing: its
//! caller turns a [`Completion`] or a [`ModelError`] into records.
//!
//! * [`config`]: endpoints and the retry policy;
//! * [`client`]: [`ModelClient`], the HTTP calls and the retry loop;
//! * [`stream`]: the streamed chunks and their assembly, [`AssembledCall`];
//! * [`alias`]: tool names as models accept them, and back.

pub mod alias;
pub mod client;
pub mod config;
pub mod stream;
mod wire;

use std::time::Duration;

use tokio::time::Instant;

use crate::semantic::chat::{ChatMessage, ToolOffer};
use crate::semantic::records::Usage;

pub use alias::Aliases;
pub use client::ModelClient;
pub use config::{ConfigError, EndpointConfig, ModelConfig};
pub use stream::AssembledCall;

/// One model call to make. Its span is a child of the current span: to
/// continue a remote trace, enter a span parented with
/// [`TraceContext::set_as_parent_of`](crate::telemetry::TraceContext::set_as_parent_of) first.
#[derive(Debug, Clone, Copy)]
pub struct ModelRequest<'a> {
    /// The model wanted. `None`: every endpoint, in order, each asked for
    /// its own model. `Some(m)`: only the endpoints configured with model
    /// `m`, in order (a call never silently falls over to another model);
    /// none: [`ModelError::NoEndpoint`].
    pub model: Option<&'a str>,
    /// The conversation.
    pub messages: &'a [ChatMessage],
    /// The tools offered (none: no `tools` field is sent).
    pub tools: &'a [ToolOffer],
    /// When to give up, waits for a free slot and between retries included.
    pub deadline: Instant,
}

/// A finished model call.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The assistant's text, if it wrote any.
    pub content: Option<String>,
    /// The tools it asked to call, in index order.
    pub tool_calls: Vec<AssembledCall>,
    /// Why it stopped (`stop`, `tool_calls`, `length`), if it said.
    pub finish_reason: Option<String>,
    /// Tokens, as the endpoint reported them (zero when it did not).
    pub usage: Usage,
    /// The model that answered (as the endpoint named it, else as asked).
    pub model: String,
    /// The endpoint that answered (its configured name).
    pub endpoint: String,
    /// From the call to the first text or tool-call delta, waits and retries included.
    pub ttft: Duration,
    /// From the call to the whole answer, waits and retries included.
    pub latency: Duration,
    /// The attempts that failed before this answer, in order, for the journal.
    pub failed_attempts: Vec<ModelError>,
}

/// Why a model call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The endpoint answered with an error status.
    #[error("endpoint {endpoint} answered HTTP {status}: {body}")]
    Http {
        /// The endpoint's name.
        endpoint: String,
        /// The status.
        status: u16,
        /// The start of the body (at most 512 bytes).
        body: String,
    },
    /// The endpoint sent nothing for the idle timeout.
    #[error("endpoint {endpoint} sent nothing for too long (idle timeout)")]
    Timeout {
        /// The endpoint's name.
        endpoint: String,
    },
    /// The stream broke, ended early (no `[DONE]` and no finish reason) or
    /// held something that is not a chunk.
    #[error("endpoint {endpoint} sent a bad stream: {reason}")]
    Stream {
        /// The endpoint's name.
        endpoint: String,
        /// What was wrong.
        reason: String,
    },
    /// The endpoint could not be reached, or dropped the request before answering.
    #[error("endpoint {endpoint} could not be reached: {reason}")]
    Connect {
        /// The endpoint's name.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The call's deadline passed.
    #[error("the deadline passed before the model answered")]
    Deadline,
    /// No endpoint is configured (for the model asked for).
    #[error("no model endpoint is configured for the model asked for")]
    NoEndpoint,
}

impl ModelError {
    /// Every code [`ModelError::code`] returns.
    pub const CODES: [&'static str; 6] =
        ["model_http", "model_timeout", "model_stream", "model_connect", "deadline", "no_endpoint"];

    /// A stable code for records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ModelError::Http { .. } => "model_http",
            ModelError::Timeout { .. } => "model_timeout",
            ModelError::Stream { .. } => "model_stream",
            ModelError::Connect { .. } => "model_connect",
            ModelError::Deadline => "deadline",
            ModelError::NoEndpoint => "no_endpoint",
        }
    }

    /// The endpoint involved, if one was.
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            ModelError::Http { endpoint, .. }
            | ModelError::Timeout { endpoint }
            | ModelError::Stream { endpoint, .. }
            | ModelError::Connect { endpoint, .. } => Some(endpoint),
            ModelError::Deadline | ModelError::NoEndpoint => None,
        }
    }

    /// Whether trying again may help: 408, 429 and 5xx statuses, timeouts,
    /// broken streams and unreachable endpoints.
    pub fn is_retryable(&self) -> bool {
        match self {
            ModelError::Http { status, .. } => matches!(status, 408 | 429 | 500..=599),
            ModelError::Timeout { .. } | ModelError::Stream { .. } | ModelError::Connect { .. } => true,
            ModelError::Deadline | ModelError::NoEndpoint => false,
        }
    }
}
