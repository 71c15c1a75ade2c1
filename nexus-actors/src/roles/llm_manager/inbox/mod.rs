//! The LLM manager's inbox: a consumer of the partitions of
//! `semantic.commands` this node owns (see [`super::lease`]). Each owned
//! partition's commands go to the manager as they arrive, so one context's
//! long turn never holds up another's; a partition's next offset is stored
//! only up to its first command not yet acknowledged (its turn journaled
//! to the end). Garbage (bytes
//! that are not an envelope, unknown types, oversized records, records
//! without a context key) is dead-lettered and skipped: it never blocks
//! its partition.
//!
//! Commands this node produced (its API's, its panel agents') come sooner: the Kafka bridge
//! hands them over as the broker acknowledges them ([`crate::bus::tap`]),
//! and the inbox takes one at once when it is its partition's next offset
//! (every earlier one already read), so the order is the broker's; the
//! consumer is moved past it, and a fetch that brings it back all the same
//! is skipped. Any other is left to the fetch. Refused records go to
//! [`super::dead_letter`]. A partition read to its end is not fetched
//! until a command may be waiting in it ([`wake`]).
//!
//! When a partition moves away the manager is told to stop its contexts;
//! acknowledgements that arrive after it are ignored, and the partition's
//! next owner starts from the stored offset and finishes any turn left
//! open (the journal says how far it got).

mod pending;
pub mod wake;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde::Deserialize as _;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::dead_letter::{dead_letter, DeadLetter, DeadLettered};
use super::lease::{self, Lease};
use super::manager::{Command, PartitionsRevoked};
use super::metrics::LlmMetrics;
use crate::bus::kafka::{KafkaConfig, Nack, Produce, FETCH_WAIT_MS, SEMANTIC_COMMANDS};
use crate::bus::tap::Produced;
use crate::bus::Backoff;
use crate::envelope::{DecodeError, Envelope, Payload};
use crate::kernel::{lock, AskError, Link};
use crate::semantic::commands::CommandProduced;
use crate::semantic::records::{is_context_id, AgentMessage, Cancel, ContextCreated, UserMessage};
use pending::Pending;
use wake::Cause;

/// The group id the inbox's consumer names itself by (it commits nothing to Kafka).
pub const GROUP: &str = "nexus-llm-manager";
/// Commands read but not yet acknowledged, across partitions; past it the inbox stops reading.
const MAX_IN_FLIGHT: usize = 4096;
/// How often partitions read to their end are paused.
const SETTLE_EVERY: Duration = Duration::from_millis(100);
/// Renewals in a row a node's share must hold before it takes new partitions.
const STEADY: u32 = 3;
/// Largest command taken: a message of the largest size, escaped, with room
/// for its envelope. Larger records are refused before they are parsed.
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;

/// What the inbox needs.
pub struct InboxDeps {
    /// The brokers.
    pub kafka: KafkaConfig,
    /// Where commands go.
    pub manager: Link<Command>,
    /// Where revokes go.
    pub revoked: Link<PartitionsRevoked>,
    /// For the dead-letter topic.
    pub produce: Link<Produce>,
    /// Counters.
    pub metrics: LlmMetrics,
    /// The node's name.
    pub source: String,
    /// Which partitions are this node's, and how far they are done.
    pub lease: Lease,
    /// Commands this node produced, as the broker acknowledged them.
    pub tap: Option<mpsc::Receiver<Produced>>,
    /// Commands produced on any node, announced ([`wake::HintRelay`]).
    pub hints: Option<mpsc::Receiver<CommandProduced>>,
}

/// A running inbox; stops (committing what is done) when told.
pub struct Inbox {
    /// Carries how long the commands in flight may take to finish.
    stop: Option<oneshot::Sender<Duration>>,
    done: Option<oneshot::Receiver<()>>,
}

impl Inbox {
    /// Starts taking this node's share of the partitions, on the current arbiter.
    pub fn start(deps: InboxDeps) -> Result<Inbox, KafkaError> {
        let consumer: StreamConsumer = deps
            .kafka
            .client()
            .set("group.id", GROUP)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Commands produced on this node come through the tap, so only
            // another node's commands, and a partition's first command after
            // this node takes it, wait for a fetch (tansu holds one for the
            // whole wait, records found or not). A 1 ms wait made them
            // quicker but kept tansu listing its partitions a thousand times
            // a second: with 10,000 contexts journaled, that took most of its
            // CPU and put ~9 ms on every journal append (benches/RESULTS.md,
            // "LLM manager"). Partitions read to their end are not fetched
            // at all until a command may wait in them (`wake`).
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            .create()?;
        let metadata = consumer.fetch_metadata(Some(SEMANTIC_COMMANDS), Duration::from_secs(10))?;
        let partitions = metadata.topics().iter().map(|t| t.partitions().len()).sum::<usize>() as i32;
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        actix::spawn(async move {
            run(Arc::new(consumer), deps, partitions, stop_rx).await;
            let _ = done_tx.send(());
        });
        Ok(Inbox { stop: Some(stop_tx), done: Some(done_rx) })
    }

    /// Stops taking commands, lets those in flight finish for up to
    /// `grace` (a drain; zero: none), then gives the partitions and the
    /// lease up.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(grace);
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

type Delivery = futures::future::LocalBoxFuture<'static, (i32, u64, i64)>;

/// Moves the consumer past a command taken from the tap, every earlier
/// offset of its partition read already, so the broker is not asked for it
/// again: a fetch that finds records costs a broker (tansu's memory engine
/// lists the partition's every batch for it), a fetch at the end nothing.
/// Records of the partition fetched ahead are dropped by the seek and
/// fetched again. Should the seek fail, a fetch brings the command back
/// and it is skipped.
fn skip_fetch(consumer: &StreamConsumer, partition: i32, offset: i64) {
    // Without a wait librdkafka reports only an unknown partition or a bad
    // argument; anything later goes unreported, hence the skip in `fetched`.
    if let Err(error) = consumer.seek(SEMANTIC_COMMANDS, partition, Offset::Offset(offset + 1), Duration::ZERO) {
        tracing::debug!(partition, offset, %error, "llm manager inbox: the fetch will bring a tapped command back");
    }
}

/// The partitions a node consumes and the generation of each one's ownership.
struct Owned {
    partitions: HashMap<i32, Pending>,
    generations: Arc<Mutex<HashMap<i32, u64>>>,
}

impl Owned {
    fn generation(&self, partition: i32) -> u64 {
        lock(&self.generations).get(&partition).copied().unwrap_or(0)
    }
}

async fn run(
    consumer: Arc<StreamConsumer>,
    mut deps: InboxDeps,
    partitions: i32,
    mut stop: oneshot::Receiver<Duration>,
) {
    let mut owned = Owned { partitions: HashMap::new(), generations: Arc::default() };
    let mut tap = deps.tap.take();
    let mut hints = deps.hints.take();
    let mut settle = tokio::time::interval(SETTLE_EVERY);
    settle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut settled = Instant::now();
    let mut check_ends = tokio::time::interval(wake::CHECK_EVERY);
    check_ends.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One check at a time: the ends learnt come back here.
    let (ends_tx, mut ends_rx) = mpsc::channel(1);
    let mut checking = false;
    let mut in_flight: FuturesUnordered<Delivery> = FuturesUnordered::new();
    if let Err(error) = deps.lease.evict_predecessors().await {
        tracing::warn!(%error, "llm manager: an earlier process's lease is left to lapse");
    }
    let mut renew = tokio::time::interval(lease::RENEW);
    // After a pause, one renewal and then the usual pace: a burst of the
    // ticks missed would count as STEADY renewals in a few milliseconds.
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The share last computed and for how many renewals in a row.
    let mut steady: (Vec<i32>, u32) = (Vec::new(), 0);
    loop {
        tokio::select! {
            grace = &mut stop => {
                let grace = grace.unwrap_or_default();
                if !grace.is_zero() {
                    finish_in_flight(&consumer, &deps, &mut owned, &mut in_flight, partitions, &mut renew, grace).await;
                }
                break;
            }
            _ = renew.tick() => {
                let want = match deps.lease.renew().await {
                    Ok((members, lapsed)) => {
                        if lapsed {
                            // Paused or cut off past the lease: others may own
                            // these partitions now. Give them up and take a
                            // share again only as a newcomer would.
                            if !owned.partitions.is_empty() {
                                tracing::warn!("llm manager: lease had lapsed; partitions given up");
                                reconcile(&consumer, &deps, &mut owned, &[], false).await;
                            }
                            steady = (Vec::new(), 0);
                            // Their contexts are halted now (PartitionsRevoked):
                            // nothing begun under the old lease writes on.
                            deps.lease.rearm();
                        }
                        lease::owned(&members, deps.lease.member(), partitions)
                    }
                    // Without a lease for longer than others wait, this node
                    // owns nothing: they may be taking its partitions over.
                    Err(_) if !deps.lease.held() => Vec::new(),
                    Err(error) => {
                        tracing::warn!(%error, "llm manager: lease not renewed");
                        continue;
                    }
                };
                steady = if steady.0 == want { (want, steady.1 + 1) } else { (want, 1) };
                // Partitions are given up at once but taken only once the share has
                // held for STEADY renewals: by then their previous owner has renewed
                // too, seen the same members and let them go.
                let take = steady.1 >= STEADY;
                reconcile(&consumer, &deps, &mut owned, &steady.0, take).await;
            }
            Some((partition, gen, offset)) = in_flight.next(), if !in_flight.is_empty() => {
                delivered(&deps, &mut owned, partition, gen, offset).await;
            }
            produced = recv(&mut tap), if in_flight.len() < MAX_IN_FLIGHT => match produced {
                Some(produced) => {
                    if !deps.lease.held() {
                        // Not this node's to take now; the next owner fetches it.
                        continue;
                    }
                    let Some(p) = owned.partitions.get_mut(&produced.partition) else { continue };
                    let (partition, offset) = (produced.partition, produced.offset);
                    // The envelope is the one this node encoded, so only the
                    // command checks apply; one that fails them (or is too
                    // large) is left to the fetch, which dead-letters it.
                    let command = (produced.bytes <= MAX_COMMAND_BYTES)
                        .then(|| check(Some(produced.key), produced.envelope, (partition, offset)).ok())
                        .flatten();
                    match command {
                        Some(command) if p.tap(offset) => {
                            deps.metrics.commands_tapped.inc();
                            skip_fetch(&consumer, partition, offset);
                            dispatch(&deps, &mut owned, &mut in_flight, Ok(command)).await;
                        }
                        // Left to the fetch, which brings every record before it too.
                        _ if p.behind(offset) => {
                            p.expect(offset + 1);
                            wake::wake(&consumer, &deps.metrics, partition, p, Cause::Tap);
                        }
                        _ => {}
                    }
                }
                None => tap = None,
            },
            hint = recv(&mut hints) => match hint {
                Some(hint) => {
                    if let Some(p) = owned.partitions.get_mut(&hint.partition).filter(|p| p.behind(hint.offset)) {
                        wake::wake(&consumer, &deps.metrics, hint.partition, p, Cause::Hint);
                    }
                }
                None => hints = None,
            },
            // Not while the consumer goes unread (too much in flight, or a
            // branch that took long): records it holds would look like none.
            _ = settle.tick(), if in_flight.len() < MAX_IN_FLIGHT => {
                let now = Instant::now();
                let stalled = now.duration_since(settled) > SETTLE_EVERY * 2;
                settled = now;
                wake::settle(&consumer, &deps.metrics, &mut owned.partitions, stalled);
            }
            _ = check_ends.tick(), if !checking => {
                let paused = wake::paused(&owned.partitions);
                if !paused.is_empty() {
                    checking = true;
                    wake::check_ends(consumer.clone(), paused, ends_tx.clone());
                }
            }
            Some(ends) = ends_rx.recv() => {
                checking = false;
                for (partition, end) in ends {
                    if let Some(p) = owned.partitions.get_mut(&partition).filter(|p| p.paused() && p.behind_end(end)) {
                        p.expect(end);
                        wake::wake(&consumer, &deps.metrics, partition, p, Cause::Check);
                    }
                }
            }
            received = consumer.recv(), if in_flight.len() < MAX_IN_FLIGHT => match received {
                Ok(message) => {
                    if !deps.lease.held() && !owned.partitions.is_empty() {
                        // Woken after a lapse, before the renewal that says
                        // so: nothing is taken, and the partitions go now.
                        steady = (Vec::new(), 0);
                        reconcile(&consumer, &deps, &mut owned, &[], false).await;
                        continue;
                    }
                    let Some(p) = owned.partitions.get_mut(&message.partition()) else { continue };
                    if p.fetched(message.offset(), Instant::now()) {
                        dispatch(&deps, &mut owned, &mut in_flight, parse(&message)).await;
                    } else {
                        deps.metrics.commands_refetched.inc();
                    }
                }
                Err(error) => {
                    deps.metrics.consume_errors.inc();
                    tracing::warn!(%error, "llm manager inbox: poll failed");
                    actix::clock::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    reconcile(&consumer, &deps, &mut owned, &[], false).await;
    deps.lease.leave().await;
}

/// Notes that the command at `offset` of `partition` is done, if the
/// partition is still this node's as it was when the command was taken;
/// whether it was.
async fn delivered(deps: &InboxDeps, owned: &mut Owned, partition: i32, generation: u64, offset: i64) -> bool {
    if owned.generation(partition) != generation {
        return false;
    }
    let Some(p) = owned.partitions.get_mut(&partition) else { return false };
    p.offsets.insert(offset, true);
    store_done(deps, partition, p).await;
    true
}

/// A drain: takes nothing new and lets the commands in flight (their turns)
/// finish on this node for up to `grace`, renewing the lease meanwhile so
/// that no other node takes its partitions over. A partition the share
/// moves to another member meanwhile (a node joined) is given up at once,
/// as at any renewal, and its contexts stop: the new owner resumes them.
/// What still runs after the grace, or once the lease lapsed, is left to
/// the partitions' next owner, which resumes it from the journal.
async fn finish_in_flight(
    consumer: &StreamConsumer,
    deps: &InboxDeps,
    owned: &mut Owned,
    in_flight: &mut FuturesUnordered<Delivery>,
    partitions: i32,
    renew: &mut tokio::time::Interval,
    grace: Duration,
) {
    let deadline = tokio::time::Instant::now() + grace;
    let (mut finished, mut moved) = (0u64, 0u64);
    while !in_flight.is_empty() {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break,
            _ = renew.tick() => match deps.lease.renew().await {
                // Gives up what the share moved away; takes nothing (`false`).
                Ok((members, false)) => {
                    let mine = lease::owned(&members, deps.lease.member(), partitions);
                    reconcile(consumer, deps, owned, &mine, false).await;
                }
                Ok((_, true)) => break,
                Err(_) if !deps.lease.held() => break,
                Err(error) => tracing::warn!(%error, "llm manager: lease not renewed while draining"),
            },
            Some((partition, gen, offset)) = in_flight.next() => {
                match delivered(deps, owned, partition, gen, offset).await {
                    true => finished += 1,
                    false => moved += 1,
                }
            }
        }
    }
    let left = in_flight.len() as u64 + moved;
    deps.metrics.drain_commands.with_label_values(&["finished"]).inc_by(finished);
    deps.metrics.drain_commands.with_label_values(&["left"]).inc_by(left);
    tracing::info!(finished, left, "nexus_llm_drain_commands_total");
}

/// The next item of `from`; never, without a receiver.
async fn recv<T>(from: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match from {
        Some(from) => from.recv().await,
        None => std::future::pending().await,
    }
}

/// Sends a command read from an owned partition on to the manager, or
/// dead-letters what cannot be one.
async fn dispatch(
    deps: &InboxDeps,
    owned: &mut Owned,
    in_flight: &mut FuturesUnordered<Delivery>,
    parsed: Result<Command, Box<DeadLettered>>,
) {
    let (partition, offset) = match &parsed {
        Ok(command) => (command.partition, command.offset),
        Err(letter) => (letter.partition, letter.offset),
    };
    let gen = owned.generation(partition);
    let Some(p) = owned.partitions.get_mut(&partition) else { return };
    p.offsets.insert(offset, false);
    match parsed {
        Ok(command) => {
            let delay = (chrono::Utc::now() - command.envelope.time).to_std().unwrap_or_default();
            deps.metrics.command_delay_seconds.observe(delay.as_secs_f64());
            let generations = owned.generations.clone();
            in_flight.push(Box::pin(deliver(deps.manager.clone(), command, gen, generations)));
        }
        Err(letter) => {
            dead_letter(&deps.produce, &deps.metrics, &deps.source, *letter).await;
            p.offsets.insert(offset, true);
            store_done(deps, partition, p).await;
        }
    }
}

/// Makes `want` the partitions this node consumes: the ones it loses stop
/// (their contexts too); the ones it gains, if `take`, start from their
/// stored offsets.
async fn reconcile(consumer: &StreamConsumer, deps: &InboxDeps, owned: &mut Owned, want: &[i32], take: bool) {
    let lost: Vec<i32> = owned.partitions.keys().filter(|p| !want.contains(p)).copied().collect();
    let gained: Vec<i32> = want.iter().filter(|p| !owned.partitions.contains_key(p)).copied().collect();
    if !lost.is_empty() {
        for p in &lost {
            if owned.partitions.remove(p).is_some_and(|p| p.paused()) {
                deps.metrics.inbox_paused.dec();
            }
            *lock(&owned.generations).entry(*p).or_default() += 1;
        }
        if let Err(error) = consumer.incremental_unassign(&partition_list(&lost)) {
            tracing::warn!(%error, "llm manager inbox: unassign failed");
        }
        tracing::info!(partitions = ?lost, "llm manager: partitions moved away; their contexts stop");
        let _ = deps.revoked.ask(PartitionsRevoked(lost)).await;
    }
    if gained.is_empty() || !take {
        return;
    }
    let offsets = match deps.lease.offsets(&gained).await {
        Ok(offsets) => offsets,
        Err(error) => {
            // Tried again at the next renewal.
            tracing::warn!(%error, "llm manager inbox: stored offsets unreadable");
            return;
        }
    };
    let mut list = TopicPartitionList::new();
    for p in &gained {
        let from = offsets.get(p).map_or(Offset::Beginning, |o| Offset::Offset(*o));
        if list.add_partition_offset(SEMANTIC_COMMANDS, *p, from).is_err() {
            return;
        }
    }
    match consumer.incremental_assign(&list) {
        Ok(()) => {
            wake::fetch_taken(consumer, &gained);
            for p in &gained {
                // Where the consumer starts is learnt from its first record, not
                // from the stored offset: the broker may start it elsewhere.
                owned.partitions.insert(*p, Pending::new(Instant::now()));
            }
            tracing::info!(partitions = ?gained, "llm manager: partitions taken");
        }
        Err(error) => tracing::warn!(%error, "llm manager inbox: assign failed; tried again at the next renewal"),
    }
}

/// `partitions` of `semantic.commands`, for the consumer's calls.
fn partition_list(partitions: &[i32]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for p in partitions {
        list.add_partition(SEMANTIC_COMMANDS, *p);
    }
    list
}

/// Stores the offset after the acknowledged prefix of `p`.
async fn store_done(deps: &InboxDeps, partition: i32, p: &mut Pending) {
    let mut last = None;
    while let Some((&offset, &done)) = p.offsets.first_key_value() {
        if !done {
            break;
        }
        p.offsets.pop_first();
        last = Some(offset);
    }
    if let Some(offset) = last {
        if let Err(error) = deps.lease.done(partition, offset + 1).await {
            deps.metrics.consume_errors.inc();
            tracing::warn!(%error, partition, offset, "llm manager inbox: offset not stored; the command may be seen again");
        }
    }
}

/// Delivers a command until the manager acknowledges it (its turn is on
/// the journal), the manager is gone, or the partition moved (its next
/// owner takes the command; nothing is stored here).
async fn deliver(
    manager: Link<Command>,
    command: Command,
    generation: u64,
    generations: Arc<Mutex<HashMap<i32, u64>>>,
) -> (i32, u64, i64) {
    let (partition, offset) = (command.partition, command.offset);
    let mut backoff = Backoff::new();
    // Asked again only while the partition is still this node's: a context
    // started for a partition that moved would fence its new owner out.
    while lock(&generations).get(&partition).copied().unwrap_or(0) == generation {
        let reason = match manager.ask(command.clone()).await {
            Ok(Ok(())) => break,
            Ok(Err(Nack(reason))) => reason,
            Err(AskError::Panicked(p)) => p.to_string(),
            Err(AskError::Closed(_) | AskError::Dropped) => break,
        };
        tracing::warn!(partition, offset, %reason, "llm manager: command not done; retrying");
        actix::clock::sleep(backoff.next_delay()).await;
    }
    (partition, generation, offset)
}

/// The command a record holds, or why it is refused.
fn parse(message: &BorrowedMessage<'_>) -> Result<Command, Box<DeadLettered>> {
    let payload = message.payload().unwrap_or_default();
    let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned());
    let at = (message.partition(), message.offset());
    let letter = |reason, detail| Box::new(DeadLettered::new(reason, detail, at, key.clone(), payload));
    if payload.len() > MAX_COMMAND_BYTES {
        let detail = format!("{} bytes; commands are at most {MAX_COMMAND_BYTES}", payload.len());
        return Err(letter(DeadLetter::Oversized, detail));
    }
    let envelope = match Envelope::decode(payload) {
        Ok(envelope) => envelope,
        Err(e @ DecodeError::TooLarge { .. }) => return Err(letter(DeadLetter::Oversized, e.to_string())),
        Err(e) => return Err(letter(DeadLetter::NotAnEnvelope, e.to_string())),
    };
    check(key.clone(), envelope, at).map_err(|(reason, detail)| letter(reason, detail))
}

/// The command of a decoded record at `at` (partition, offset), or why it is refused.
fn check(key: Option<String>, envelope: Envelope<Value>, at: (i32, i64)) -> Result<Command, (DeadLetter, String)> {
    let letter = |reason, detail| Err((reason, detail));
    let Some(context) = key.filter(|k| is_context_id(k)) else {
        return letter(DeadLetter::BadKey, "the record key must be the context id".into());
    };
    let named = match envelope.kind.as_str() {
        ContextCreated::TYPE => ContextCreated::deserialize(&envelope.data).map(|c| c.context),
        UserMessage::TYPE => UserMessage::deserialize(&envelope.data).map(|c| c.context),
        AgentMessage::TYPE => AgentMessage::deserialize(&envelope.data).map(|c| c.context),
        Cancel::TYPE => Cancel::deserialize(&envelope.data).map(|c| c.context),
        other => return letter(DeadLetter::UnknownType, format!("commands do not include {other:?}")),
    };
    match named {
        Ok(named) if named == context => {}
        Ok(named) => return letter(DeadLetter::BadCommand, format!("names context {named} under key {context}")),
        Err(e) => return letter(DeadLetter::BadCommand, e.to_string()),
    }
    Ok(Command { context, partition: at.0, offset: at.1, envelope })
}
