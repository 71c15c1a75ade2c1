//! Commands the LLM manager refuses: each is counted
//! (`nexus_semantic_dead_letters_total{reason}`), logged, and copied with
//! its reason to [`DLQ`], so that it is skipped without being lost. The
//! inbox refuses what it cannot parse; a context refuses commands for a
//! context that was never created. Nothing here reads the topic back.

use super::metrics::LlmMetrics;
use crate::bus::kafka::{Produce, SEMANTIC_COMMANDS};
use crate::envelope::{Envelope, Payload};
use crate::kernel::Link;

/// Where refused commands go, with the reason.
pub const DLQ: &str = "semantic.dlq";
/// The start of a refused record that is copied to the dead-letter topic.
const DLQ_PAYLOAD_BYTES: usize = 64 * 1024;

/// Why a command was refused: the `reason` label of `nexus_semantic_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetter {
    /// `not_an_envelope`: the bytes are not a CloudEvents envelope.
    NotAnEnvelope,
    /// `oversized`: the record is over the envelope limit.
    Oversized,
    /// `unknown_type`: an envelope of a type the manager does not take.
    UnknownType,
    /// `bad_key`: no record key, or one that is not a context id.
    BadKey,
    /// `unknown_context`: a command for a context that was never created.
    UnknownContext,
    /// `bad_command`: the payload does not fit its type, or names another context than its key.
    BadCommand,
}

impl DeadLetter {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetter::NotAnEnvelope => "not_an_envelope",
            DeadLetter::Oversized => "oversized",
            DeadLetter::UnknownType => "unknown_type",
            DeadLetter::BadKey => "bad_key",
            DeadLetter::UnknownContext => "unknown_context",
            DeadLetter::BadCommand => "bad_command",
        }
    }
}

/// A refused command as it is copied to [`DLQ`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeadLettered {
    /// Why (a [`DeadLetter`] label value).
    pub reason: String,
    /// More detail, for people.
    pub detail: String,
    /// Where it was read.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, lossily UTF-8.
    pub key: Option<String>,
    /// The start of its payload, lossily UTF-8.
    pub payload: String,
}

impl DeadLettered {
    /// The letter for the `semantic.commands` record at `partition`/`offset`.
    pub fn new(reason: DeadLetter, detail: String, at: (i32, i64), key: Option<String>, payload: &[u8]) -> Self {
        DeadLettered {
            reason: reason.as_str().to_owned(),
            detail,
            topic: SEMANTIC_COMMANDS.to_owned(),
            partition: at.0,
            offset: at.1,
            key,
            payload: String::from_utf8_lossy(&payload[..payload.len().min(DLQ_PAYLOAD_BYTES)]).into_owned(),
        }
    }
}

impl Payload for DeadLettered {
    const TYPE: &'static str = "nexus.semantic.dead_letter";
}

/// Counts and copies a refused record to [`DLQ`]; never fails the caller.
pub async fn dead_letter(kafka: &Link<Produce>, metrics: &LlmMetrics, source: &str, letter: DeadLettered) {
    metrics.dead_letters.with_label_values(&[&letter.reason]).inc();
    tracing::warn!(reason = %letter.reason, detail = %letter.detail, partition = letter.partition, offset = letter.offset, "nexus_semantic_dead_letters_total");
    let key = letter.key.clone().unwrap_or_default();
    let envelope = Envelope::new(source.to_owned(), letter).into_untyped();
    match kafka.ask(Produce { topic: DLQ.to_owned(), key, envelope }).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::error!(%error, "could not copy a refused command to the dead-letter topic"),
        Err(error) => tracing::error!(?error, "could not copy a refused command to the dead-letter topic"),
    }
}
