//! `LlmContext`: one context's mailbox. Commands queue for its worker,
//! which folds the journal once (from the latest snapshot) and then takes
//! them in order: a creation is journaled once; a message starts a turn,
//! or resumes the one the journal shows open, or is acknowledged at once
//! when the journal already holds its `turn_completed`. A cancel stops the
//! turn under way without waiting in the queue. Turns themselves are
//! [`super::turn`]'s.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize as _;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use super::dead_letter::{dead_letter, DeadLetter, DeadLettered};
use super::manager::Command;
use super::metrics::LlmMetrics;
use super::model::ModelClient;
use super::turn::{self, Start, TurnLimits};
use super::writer::{Halt, JournalWriter};
use crate::bus::kafka::{Nack, Produce};
use crate::envelope::{Envelope, Payload};
use crate::kernel::{ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Reply};
use crate::semantic::chat::{ChatMessage, Role};
use crate::semantic::fold::Transcript;
use crate::semantic::journal::{Journal, JournalError};
use crate::semantic::records::{AgentMessage, Cancel, ContextCreated, JournaledCommand, Snapshot, UserMessage};
use crate::tools::registry::{CallTool, ListTools};

/// Everything a context needs. Cheap to clone.
#[derive(Clone)]
pub struct ContextDeps {
    /// The node's kernel.
    pub kernel: Kernel,
    /// Reads journals back.
    pub journal: Journal,
    /// Appends to them.
    pub writer: JournalWriter,
    /// Calls models.
    pub model: ModelClient,
    /// Calls tools as the context's owner.
    pub tools: Link<CallTool>,
    /// Lists the owner's tools.
    pub list_tools: Link<ListTools>,
    /// For the dead-letter topic.
    pub produce: Link<Produce>,
    /// Step limit, deadline and the like.
    pub limits: TurnLimits,
    /// The role's metrics.
    pub metrics: LlmMetrics,
}

/// When a context last had work, and whether it has some now.
#[derive(Debug)]
pub struct Activity {
    since: Instant,
    last: AtomicU64,
    busy: AtomicBool,
    /// Raised by the manager when it stops the context.
    pub halt: Halt,
}

impl Default for Activity {
    fn default() -> Self {
        Activity { since: Instant::now(), last: AtomicU64::new(0), busy: AtomicBool::new(false), halt: Halt::default() }
    }
}

impl Activity {
    /// Notes work now.
    pub fn touch(&self) {
        self.last.store(self.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long it has been without work (zero while busy).
    pub fn idle_for(&self) -> Duration {
        if self.busy.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let now = self.since.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

type Queued = (Command, oneshot::Sender<Result<(), Nack>>);

/// The actor of one context. See the module documentation.
pub struct LlmContext {
    id: String,
    deps: ContextDeps,
    activity: Arc<Activity>,
    queue: Option<mpsc::UnboundedSender<Queued>>,
    cancel: watch::Sender<u64>,
}

impl LlmContext {
    /// Actor kind in the mailbox graph.
    pub const KIND: &'static str = "llm_context";

    /// The actor of context `id`.
    pub fn new(id: String, deps: ContextDeps, activity: Arc<Activity>) -> Self {
        LlmContext { id, deps, activity, queue: None, cancel: watch::channel(0).0 }
    }
}

impl Behaviour for LlmContext {
    const KIND: &'static str = LlmContext::KIND;

    fn started(&mut self, _me: &ActorRef<Self>, _ctx: &mut Ctx<Self>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.queue = Some(tx);
        let mut deps = self.deps.clone();
        deps.writer = deps.writer.halted_by(self.activity.halt.clone());
        let worker = Worker {
            id: self.id.clone(),
            deps,
            activity: self.activity.clone(),
            cancel: self.cancel.subscribe(),
            transcript: None,
            failed: None,
            fenced: false,
        };
        actix::spawn(worker.run(rx));
    }
}

impl Handler<Command> for LlmContext {
    fn handle(&mut self, command: Command, _ctx: &mut Ctx<Self>) -> Reply<Result<(), Nack>> {
        if command.envelope.kind == Cancel::TYPE {
            self.cancel.send_modify(|generation| *generation += 1);
            tracing::info!(context = %self.id, "turn cancel asked");
            return Reply::Now(Ok(()));
        }
        let (tx, rx) = oneshot::channel();
        let Some(queue) = &self.queue else { return Reply::Now(Err(Nack("context not started".into()))) };
        if queue.send((command, tx)).is_err() {
            return Reply::Now(Err(Nack("context stopped".into())));
        }
        Reply::later(async move { rx.await.unwrap_or_else(|_| Err(Nack("context stopped".into()))) })
    }
}

/// Runs one context's commands in order; ends when its actor stops.
struct Worker {
    id: String,
    deps: ContextDeps,
    activity: Arc<Activity>,
    cancel: watch::Receiver<u64>,
    transcript: Option<Transcript>,
    /// The command whose handling failed last, if the last one did.
    failed: Option<i64>,
    /// Whether this worker has fenced the context (see [`Worker::rebuild`]).
    fenced: bool,
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Queued>) {
        while let Some((command, reply)) = queue.recv().await {
            if self.activity.halt.is_raised() {
                // Stopped with commands still queued: their next owner takes them.
                let _ = reply.send(Err(Nack("context stopped".into())));
                continue;
            }
            self.activity.busy.store(true, Ordering::Relaxed);
            let span = tracing::info_span!("nexus.llm.command", context = %self.id, kind = %command.envelope.kind, offset = command.offset);
            command.envelope.trace_context().set_as_parent_of(&span);
            let result = self.handle(&command).instrument(span).await;
            self.activity.touch();
            self.activity.busy.store(false, Ordering::Relaxed);
            let _ = reply.send(result);
        }
    }

    async fn handle(&mut self, command: &Command) -> Result<(), Nack> {
        if let Some(failed) = self.failed.filter(|failed| *failed < command.offset) {
            // A context's commands are taken in order: a message must not be
            // judged (and refused) before its context's creation, say, which
            // failed on a broker's restart and is being delivered again.
            return Err(Nack(format!("the context's command {failed} is not done yet")));
        }
        let result = self.fold_and_take(command).await;
        // Whatever failed, this command is retried before any later one.
        self.failed = result.as_ref().err().map(|_| command.offset);
        result
    }

    /// Takes `command` on the context as folded so far (folded again from
    /// the journal first when there is nothing folded).
    async fn fold_and_take(&mut self, command: &Command) -> Result<(), Nack> {
        let mut transcript = match self.transcript.take() {
            Some(t) => t,
            None => match self.rebuild().await? {
                Some(t) => t,
                None => return self.refuse(command, "no such context").await,
            },
        };
        let result = self.take(command, &mut transcript).await;
        // After a failure the journal may hold more than was folded (an
        // append the broker took but did not acknowledge in time): the next
        // command starts from the journal again.
        self.transcript = result.is_ok().then_some(transcript);
        result
    }

    /// The context folded from its journal; `None` when it was never created.
    ///
    /// The worker's first rebuild fences the context and folds up to the
    /// fence: what an earlier writer (a node paused past its lease, or an
    /// earlier, halted worker of this one) got onto the journal before the
    /// fence is folded in and resumed, and what another writer's lands
    /// after it is dropped by every reader. The fence record goes out even
    /// where this writer fenced last: it is also the point the fold reads
    /// up to, after anything this process still had under way.
    async fn rebuild(&mut self) -> Result<Option<Transcript>, Nack> {
        self.deps.metrics.replays.inc();
        let directory = self.deps.journal.directory();
        let at = match self.fenced {
            true => None,
            false => {
                let known = directory.get(&self.id).await;
                if known.map_err(|e| Nack(format!("reading the directory: {e}")))?.is_none() {
                    return Ok(None);
                }
                let fence = self.deps.writer.fence(&self.id).await;
                let fence = fence.map_err(|e| Nack(format!("fencing the context: {e}")))?;
                self.fenced = true;
                Some(fence.offset)
            }
        };
        self.fold(at).await
    }

    /// The context folded up to `at` (to its end when `None`).
    async fn fold(&self, at: Option<i64>) -> Result<Option<Transcript>, Nack> {
        match self.deps.journal.transcript(&self.id, at).await {
            Ok(t) => Ok(Some(t)),
            Err(JournalError::NotJournaled(_)) => Ok(Some(Transcript::default())),
            Err(JournalError::NotFound(_)) => Ok(None),
            Err(error) => Err(Nack(format!("rebuilding the context: {error}"))),
        }
    }

    async fn take(&mut self, command: &Command, t: &mut Transcript) -> Result<(), Nack> {
        let data = &command.envelope.data;
        match command.envelope.kind.as_str() {
            // A fork's transcript names its parent until its own creation is
            // folded in (the history it inherits comes first).
            ContextCreated::TYPE => {
                if t.context == self.id {
                    return Ok(());
                }
                let Ok(created) = ContextCreated::deserialize(data) else {
                    return self.refuse(command, "not a creation").await;
                };
                let known = self.deps.journal.directory().get(&self.id).await.map_err(|e| Nack(e.to_string()))?;
                if known.is_none_or(|info| info.owner != created.owner) {
                    return self.refuse(command, "the directory has no such context for this owner").await;
                }
                self.journal(self.copy_of(command, created), t).await
            }
            UserMessage::TYPE | AgentMessage::TYPE => {
                if t.context != self.id {
                    return self.refuse(command, "message for a context that was never created").await;
                }
                if t.is_answered(command.offset) {
                    return Ok(());
                }
                if let Some(open) = t.open.clone().filter(|o| o.command_offset != command.offset) {
                    // An earlier turn left open (its command was redelivered out of
                    // order of its journal): it ends before this one starts.
                    self.run_turn(t, open.command_offset, None).await?;
                }
                let start = if t.has_started(command.offset) {
                    None
                } else if command.envelope.kind == UserMessage::TYPE {
                    let Ok(m) = UserMessage::deserialize(data) else {
                        return self.refuse(command, "not a user message").await;
                    };
                    Some(self.start(command, m.content.clone(), m))
                } else {
                    let Ok(m) = AgentMessage::deserialize(data) else {
                        return self.refuse(command, "not an agent message").await;
                    };
                    Some(self.start(command, m.content.clone(), m))
                };
                let start = match start {
                    // Again after a failure (the journal down, most likely): the
                    // message first, so that no model call is paid for while it
                    // cannot be recorded.
                    Some(start) if self.failed == Some(command.offset) => {
                        self.journal(start.copy, t).await?;
                        None
                    }
                    start => start,
                };
                self.run_turn(t, command.offset, start).await?;
                self.snapshot(t).await;
                Ok(())
            }
            _ => self.refuse(command, "not a command").await,
        }
    }

    /// The journal copy of the accepted command `record`.
    fn copy_of<T: JournaledCommand>(&self, command: &Command, record: T) -> Envelope<Value> {
        let source = self.deps.writer.source.clone();
        Envelope::new(source, record.at_offset(command.offset)).caused_by(&command.envelope).into_untyped()
    }

    /// The turn a message `record` with `content` starts, its journal copy not written yet.
    fn start<T: JournaledCommand>(&self, command: &Command, content: String, record: T) -> Start {
        Start { copy: self.copy_of(command, record), message: ChatMessage::text(Role::User, content) }
    }

    /// Journals `copy` and folds it in.
    async fn journal(&self, copy: Envelope<Value>, t: &mut Transcript) -> Result<(), Nack> {
        let entry = self.deps.writer.append_envelope(&self.id, copy).await;
        t.apply(&entry.map_err(|e| Nack(e.to_string()))?);
        Ok(())
    }

    async fn run_turn(&mut self, t: &mut Transcript, command_offset: i64, start: Option<Start>) -> Result<(), Nack> {
        self.cancel.mark_unchanged();
        turn::run(&self.deps, t, command_offset, self.cancel.clone(), start).await.map_err(|e| Nack(e.to_string()))
    }

    /// Journals a snapshot when the context has doubled since the last one.
    async fn snapshot(&self, t: &mut Transcript) {
        const FIRST: u64 = 256;
        const MAX_BYTES: usize = 900 * 1024;
        if t.records < FIRST || t.records < 2 * t.snapshot_records.max(FIRST / 2) {
            return;
        }
        let Ok(state) = serde_json::to_value(&*t) else { return };
        if crate::tools::protocol::encoded_len(&state) > MAX_BYTES {
            return;
        }
        let snapshot = Snapshot { context: self.id.clone(), at: t.last_offset, records: t.records, state };
        match self.deps.writer.append(&self.id, snapshot).await {
            Ok(entry) => {
                let directory = self.deps.journal.directory();
                if let Err(error) = directory.snapshot(&self.id, t.last_offset, entry.offset).await {
                    tracing::warn!(context = %self.id, %error, "snapshot not indexed");
                }
                t.apply(&entry);
            }
            Err(error) => tracing::warn!(context = %self.id, %error, "snapshot not journaled"),
        }
    }

    /// Counts and dead-letters a command that cannot be taken, and acknowledges it.
    async fn refuse(&self, command: &Command, detail: &str) -> Result<(), Nack> {
        let letter = DeadLettered::new(
            DeadLetter::UnknownContext,
            format!("{}: {detail}", command.envelope.kind),
            (command.partition, command.offset),
            Some(command.context.clone()),
            command.envelope.data.to_string().as_bytes(),
        );
        dead_letter(&self.deps.produce, &self.deps.metrics, self.deps.kernel.node(), letter).await;
        Ok(())
    }
}
