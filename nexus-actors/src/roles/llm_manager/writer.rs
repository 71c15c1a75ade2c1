//! Appending to a context's journal: a record is produced to
//! `semantic.events` (keyed by the context id) and acknowledged before the
//! next step relies on it; then the sessions following the context get it
//! on Redis and the directory learns its offset (except for streamed text,
//! see [`JournalWriter::append_delta`]). Only the journal write can fail a
//! step: the live fan-out and the directory are best effort, and only a
//! context's creation waits for its directory note (it tells readers the
//! partition); later notes go out beside the next step, a bounded number
//! at a time, in any order (the directory keeps the lowest first and the
//! highest last offset).
//!
//! A write needs the node's lease held and the context's [`Halt`] down,
//! both before it starts and once it is acknowledged: a context stopped
//! when its partition moved writes nothing more, even where the turn
//! running in it has not noticed yet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tokio::sync::Semaphore;

use crate::bus::kafka::{Produce, ProduceError, SEMANTIC_EVENTS};
use crate::bus::redis::Publisher;
use crate::envelope::{Envelope, Payload};
use crate::kernel::{AskError, Link};
use crate::platform::channels;
use crate::platform::store::StoreError;
use crate::semantic::directory::ContextDirectory;
use crate::semantic::fold::Entry;
use crate::semantic::records::{ContextCreated, ContextFenced, Journaled, ThoughtDelta};

use super::lease::{Lease, MEMBERS};
use super::metrics::LlmMetrics;

/// Why a record is not on the journal.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Kafka refused it or did not acknowledge it in time.
    #[error(transparent)]
    Produce(#[from] Box<ProduceError>),
    /// The Kafka bridge is gone (the node is stopping).
    #[error("the kafka bridge is not reachable: {0}")]
    Bridge(String),
    /// The context's actor stopped (its partition moved, or the node is
    /// stopping) before the turn ended: nothing more is written, and the
    /// command's next owner resumes the turn.
    #[error("the context stopped before its turn ended")]
    Stopped,
    /// The broker took the record but its offset is unknown (a produce
    /// retried across a broker restart, confirmed as a duplicate).
    #[error("the record was journaled at an unknown offset")]
    OffsetUnknown,
    /// A fence is on the journal but the directory does not list it, so
    /// readers would not know it: the writer does not rely on it.
    #[error("the fence could not be noted in the directory: {0}")]
    FenceNotNoted(StoreError),
    /// Redis says this writer's lease has run out (its own clock stood
    /// still): its fence does not count, and it writes no more.
    #[error("the fence was refused: this writer's lease has run out")]
    FenceRefused,
}

/// Writes journals. Cheap to clone.
#[derive(Clone)]
pub struct JournalWriter {
    /// The writer: the `source` of the records and the writer its fences
    /// name (the lease member, `<node>/<process>`: one per process).
    pub source: String,
    /// The Kafka bridge.
    pub kafka: Link<Produce>,
    /// The Redis bridge, for the live fan-out.
    pub redis: Publisher,
    /// The context directory.
    pub directory: ContextDirectory,
    /// Where journal append latency is observed.
    pub metrics: LlmMetrics,
    /// Directory notes that may be under way without a step waiting for them.
    notes: Arc<Semaphore>,
    /// The node's lease: nothing is written while it is not held.
    lease: Lease,
    /// The context's halt, for a context's own writer: nothing is written once it is raised.
    halt: Option<Halt>,
}

/// Raised when a context's actor is stopped: its writer writes nothing
/// more. Cheap to clone; every clone is the same halt.
#[derive(Debug, Clone, Default)]
pub struct Halt(Arc<AtomicBool>);

impl Halt {
    /// Stops every write through writers halted by this.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether it was raised.
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Directory notes under way at once before appends wait for theirs.
const NOTES_IN_FLIGHT: usize = 256;

impl JournalWriter {
    /// A writer producing through `kafka`, fanning out through `redis`,
    /// noting offsets in `directory`, while `lease` is held; `source` names
    /// the records' maker.
    pub fn new(
        source: String,
        kafka: Link<Produce>,
        redis: Publisher,
        directory: ContextDirectory,
        metrics: LlmMetrics,
        lease: Lease,
    ) -> Self {
        let notes = Arc::new(Semaphore::new(NOTES_IN_FLIGHT));
        JournalWriter { source, kafka, redis, directory, metrics, notes, lease, halt: None }
    }

    /// This writer, writing only until `halt` is raised.
    pub fn halted_by(&self, halt: Halt) -> Self {
        JournalWriter { halt: Some(halt), ..self.clone() }
    }

    /// Whether this writer may write now: the lease held, its halt down.
    fn may_write(&self) -> bool {
        self.lease.held() && !self.halt.as_ref().is_some_and(Halt::is_raised)
    }

    /// Fences `context`: from the record this appends on, the context is
    /// this writer's, and readers drop what an earlier writer's records
    /// land after it. Returns once the directory lists the fence.
    pub async fn fence(&self, context: &str) -> Result<Entry, WriteError> {
        let envelope = Envelope::new(self.source.clone(), ContextFenced { writer: self.source.clone() });
        self.produce(context, envelope.into_untyped(), true).await
    }

    /// Appends `data` to `context`'s journal; returns the record as journaled.
    pub async fn append<T: Payload>(&self, context: &str, data: T) -> Result<Entry, WriteError> {
        self.append_envelope(context, Envelope::new(self.source.clone(), data).into_untyped()).await
    }

    /// Appends streamed text without noting it in the directory: a step's
    /// deltas are followed by its response or failure, which moves the
    /// directory's last offset past them, and a reader reads on past that
    /// offset until the journal goes quiet. One Redis round trip fewer per
    /// delta, on the path of every token.
    pub async fn append_delta(&self, context: &str, delta: ThoughtDelta) -> Result<Entry, WriteError> {
        let envelope = Envelope::new(self.source.clone(), delta).into_untyped();
        self.produce(context, envelope, false).await
    }

    /// Appends a ready envelope.
    pub async fn append_envelope(&self, context: &str, envelope: Envelope<Value>) -> Result<Entry, WriteError> {
        self.produce(context, envelope, true).await
    }

    async fn produce(&self, context: &str, envelope: Envelope<Value>, index: bool) -> Result<Entry, WriteError> {
        if !self.may_write() {
            // Paused past the lease, or the context moved: another node may
            // be resuming this turn.
            return Err(WriteError::Stopped);
        }
        let started = Instant::now();
        let produce =
            Produce { topic: SEMANTIC_EVENTS.to_owned(), key: context.to_owned(), envelope: envelope.clone() };
        let delivered = match self.kafka.ask(produce).await {
            Ok(result) => result.map_err(Box::new)?,
            Err(AskError::Closed(_) | AskError::Dropped) => return Err(WriteError::Bridge("closed".into())),
            Err(AskError::Panicked(p)) => return Err(WriteError::Bridge(p.to_string())),
        };
        self.metrics.journal_append_seconds.observe(started.elapsed().as_secs_f64());
        if !self.may_write() {
            // Paused or stopped while it was under way: it is on the journal,
            // but the turn may have moved to another node; this one goes no further.
            return Err(WriteError::Stopped);
        }
        if delivered.offset < 0 {
            // A retry the broker recognised as a duplicate: the record is on
            // the journal, but librdkafka does not say where. The step fails
            // and the turn goes on from the journal, which has it.
            return Err(WriteError::OffsetUnknown);
        }
        let entry = Entry { offset: delivered.offset, envelope };
        // Followers first: the directory is for readers, who read past it anyway.
        self.fan_out(context, &entry);
        if index && entry.envelope.kind == ContextFenced::TYPE {
            let (partition, offset) = (delivered.partition, delivered.offset);
            let fenced = self.directory.fenced(context, partition, offset, &self.source, MEMBERS).await;
            if !fenced.map_err(WriteError::FenceNotNoted)? {
                return Err(WriteError::FenceRefused);
            }
        } else if index {
            let first = entry.envelope.kind == ContextCreated::TYPE;
            match self.notes.clone().try_acquire_owned() {
                Ok(permit) if !first => {
                    let (directory, context) = (self.directory.clone(), context.to_owned());
                    actix::spawn(async move {
                        note(&directory, &context, delivered.partition, delivered.offset).await;
                        drop(permit);
                    });
                }
                _ => note(&self.directory, context, delivered.partition, delivered.offset).await,
            }
        }
        Ok(entry)
    }

    /// Publishes a journaled record to the sessions following the context, without waiting.
    fn fan_out(&self, context: &str, entry: &Entry) {
        let journaled = Journaled { context: context.to_owned(), offset: entry.offset, record: entry.envelope.clone() };
        let envelope = Envelope::new(self.source.clone(), journaled).into_untyped();
        // A fan-out that fails is counted by the publisher; followers
        // catch up from /events.
        self.redis.publish_detached(channels::context(context), envelope);
    }
}

/// Tells the directory of a journaled record.
async fn note(directory: &ContextDirectory, context: &str, partition: i32, offset: i64) {
    if let Err(error) = directory.journaled(context, partition, offset).await {
        tracing::warn!(context, %error, "context directory not updated; readers fall back to the journal's end");
    }
}
