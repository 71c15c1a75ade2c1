//! Reading a context's journal back from `semantic.events`, and folding it
//! into a [`Transcript`] at any offset: from the latest snapshot at or
//! before it, or from the parent's history for a fork. Reading never calls
//! a model and never moves a consumer group's offsets.
//!
//! Where the journal ends: a partition's high watermark is not enough,
//! since tansu 0.6 reports the base offset of the last batch there (the
//! Kafka bridge writes one record per batch, which makes it exact, but
//! other writers may not). A read goes on past it until no record has
//! arrived for [`END_GRACE`], and never stops before the last offset the
//! directory knows of.
//!
//! What a read returns is the context's: records of a writer that another
//! writer fenced off before they landed ([`Fences::stale`]) are left out,
//! for the fold and for every reader of `/events` alike.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde::Deserialize as _;

use super::directory::{ContextDirectory, ContextInfo, Fences};
use super::fold::{Entry, Transcript};
use super::records::Snapshot;
use crate::bus::kafka::{KafkaConfig, SEMANTIC_EVENTS};
use crate::envelope::{Envelope, Payload};
use crate::kernel::lock;
use crate::platform::store::StoreError;

/// How long a read waits for more records once past the high watermark.
pub const END_GRACE: Duration = Duration::from_millis(20);
/// How long a read waits for a record it knows exists before giving up.
const STALL: Duration = Duration::from_secs(10);
/// Deepest chain of forks folded.
pub const MAX_FORK_DEPTH: usize = 16;

/// Why a journal could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// No such context.
    #[error("no context {0}")]
    NotFound(String),
    /// The context has no journal yet (the LLM manager has not taken its creation).
    #[error("context {0} has no journal yet")]
    NotJournaled(String),
    /// Kafka refused or did not answer.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The directory could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record the directory promises did not arrive.
    #[error("the journal of {context} stalled at offset {offset}")]
    Stalled {
        /// The context.
        context: String,
        /// The next offset expected.
        offset: i64,
    },
    /// The reading thread ended without an answer (the node is stopping).
    #[error("the journal read stopped: {0}")]
    Stopped(String),
    /// Forks nest deeper than [`MAX_FORK_DEPTH`].
    #[error("forks nest deeper than {MAX_FORK_DEPTH}")]
    TooDeep,
}

/// What to read of one context's journal.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// The first offset to read.
    pub from: i64,
    /// The last offset to read; `None`: to the end.
    pub until: Option<i64>,
    /// Most records of the context to return.
    pub limit: usize,
}

/// Idle consumers kept for the next reads.
const IDLE_READERS: usize = 4;

/// Reads journals. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    config: KafkaConfig,
    directory: ContextDirectory,
    /// Consumers between reads: making one costs a connection and closing
    /// one about 100 ms, so reads reuse them.
    idle: Arc<Mutex<Vec<BaseConsumer>>>,
}

impl Journal {
    /// A reader of the journals on `config`'s brokers, indexed by `directory`.
    pub fn new(config: KafkaConfig, directory: ContextDirectory) -> Self {
        Journal { config, directory, idle: Arc::default() }
    }

    /// The directory it reads through.
    pub fn directory(&self) -> &ContextDirectory {
        &self.directory
    }

    /// The records of `info` in `range`, in offset order. The read runs on
    /// a blocking thread: a Kafka consumer's metadata calls and its close
    /// block, and must not hold up the actors and requests of this thread.
    pub async fn read(&self, info: &ContextInfo, range: Range) -> Result<Vec<Entry>, JournalError> {
        let (Some(partition), Some(first)) = (info.partition, info.first_offset) else {
            return Err(JournalError::NotJournaled(info.id.clone()));
        };
        // Never below 0: a directory may hold an unknown offset (-1) noted
        // before such notes were refused; the read then scans from the start.
        let from = range.from.max(first).max(0);
        if range.until.is_some_and(|u| u < from) || range.limit == 0 {
            return Ok(Vec::new());
        }
        let fences = self.directory.fences(&info.id).await?;
        let (config, info, idle) = (self.config.clone(), info.clone(), self.idle.clone());
        let read = tokio::task::spawn_blocking(move || {
            let reused = lock(&idle).pop();
            let consumer = match reused {
                Some(consumer) => {
                    // What it heard while idle (a broker's restart, say) is not this read's error.
                    while consumer.poll(Duration::ZERO).is_some() {}
                    consumer
                }
                None => reader(&config)?,
            };
            let read = read_blocking(&consumer, &info, &fences, partition, from, range);
            // A consumer whose read failed may be in any state: it is not reused.
            if read.is_ok() && consumer.unassign().is_ok() {
                let mut idle = lock(&idle);
                if idle.len() < IDLE_READERS {
                    idle.push(consumer);
                    return read;
                }
            }
            // Closing one takes about 100 ms; the reader need not wait for it.
            std::thread::spawn(move || drop(consumer));
            read
        });
        read.await.map_err(|e| JournalError::Stopped(e.to_string()))?
    }

    /// The context `id` folded up to `at` (every record when `None`).
    pub async fn transcript(&self, id: &str, at: Option<i64>) -> Result<Transcript, JournalError> {
        let info = self.directory.get(id).await?.ok_or_else(|| JournalError::NotFound(id.to_owned()))?;
        self.fold(&info, at, 0).await
    }

    /// Folds `info` up to `at`, starting from its latest usable snapshot.
    pub async fn fold(&self, info: &ContextInfo, at: Option<i64>, depth: usize) -> Result<Transcript, JournalError> {
        if depth > MAX_FORK_DEPTH {
            return Err(JournalError::TooDeep);
        }
        let (Some(_), Some(first)) = (info.partition, info.first_offset) else {
            return Err(JournalError::NotJournaled(info.id.clone()));
        };
        let (mut transcript, from) = match self.snapshot(info, at).await? {
            Some((state, snapshot_at)) => (state, snapshot_at + 1),
            None => (self.inherited(info, depth).await?, first),
        };
        for entry in self.read(info, Range { from, until: at, limit: usize::MAX }).await? {
            transcript.apply(&entry);
        }
        Ok(transcript)
    }

    /// A fork's parent history, closed; an empty transcript for a root context.
    async fn inherited(&self, info: &ContextInfo, depth: usize) -> Result<Transcript, JournalError> {
        let Some(parent) = &info.parent else { return Ok(Transcript::default()) };
        let parent_info =
            self.directory.get(&parent.context).await?.ok_or_else(|| JournalError::NotFound(parent.context.clone()))?;
        let history = Box::pin(self.fold(&parent_info, Some(parent.offset), depth + 1)).await?;
        Ok(history.inherit())
    }

    /// The latest snapshot at or before `at` and the offset it folds up to.
    async fn snapshot(&self, info: &ContextInfo, at: Option<i64>) -> Result<Option<(Transcript, i64)>, JournalError> {
        let Some((snapshot_at, record)) = self.directory.snapshot_before(&info.id, at).await? else { return Ok(None) };
        let found = self.read(info, Range { from: record, until: Some(record), limit: 1 }).await?;
        let state = found
            .into_iter()
            .filter(|e| e.envelope.kind == Snapshot::TYPE)
            .find_map(|e| Snapshot::deserialize(&e.envelope.data).ok())
            .and_then(|s| serde_json::from_value::<Transcript>(s.state).ok());
        Ok(state.map(|s| (s, snapshot_at)))
    }
}

/// A consumer for reads, in no group's offsets.
fn reader(config: &KafkaConfig) -> Result<BaseConsumer, KafkaError> {
    config.reader("nexus-journal-reader").create()
}

/// [`Journal::read`] on the calling thread, with `consumer`.
fn read_blocking(
    consumer: &BaseConsumer,
    info: &ContextInfo,
    fences: &Fences,
    partition: i32,
    from: i64,
    range: Range,
) -> Result<Vec<Entry>, JournalError> {
    let (_, high) = consumer.fetch_watermarks(SEMANTIC_EVENTS, partition, Duration::from_secs(10))?;
    // Past the watermark only while records keep coming (see the module doc),
    // but never short of what the directory knows is there.
    let known_end = info.last_offset.map_or(high, |last| high.max(last + 1));
    if from > known_end {
        // Nothing is there yet; asking the broker would be an out-of-range error.
        return Ok(Vec::new());
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(SEMANTIC_EVENTS, partition, Offset::Offset(from))?;
    consumer.assign(&assignment)?;
    let mut entries = Vec::new();
    let mut next = from;
    loop {
        let wait = if next >= known_end { END_GRACE } else { STALL };
        let message = match consumer.poll(wait) {
            None if next >= known_end => break,
            None => return Err(JournalError::Stalled { context: info.id.clone(), offset: next }),
            Some(received) => received?,
        };
        if message.offset() < next {
            // A record seen already (a broker that answers a fetch with a
            // whole batch again): each record is returned once.
            continue;
        }
        next = message.offset() + 1;
        if range.until.is_some_and(|u| message.offset() > u) {
            break;
        }
        if message.key() != Some(info.id.as_bytes()) {
            continue;
        }
        // A record that does not decode is not the context's to fold (it was
        // counted where it was written); nor is one of a fenced-off writer.
        let decoded = Envelope::decode(message.payload().unwrap_or_default()).ok();
        if let Some(envelope) = decoded.filter(|e| !fences.stale(message.offset(), &e.source)) {
            entries.push(Entry { offset: message.offset(), envelope });
            if entries.len() >= range.limit {
                break;
            }
        }
        if range.until.is_some_and(|u| next > u) {
            break;
        }
    }
    Ok(entries)
}
