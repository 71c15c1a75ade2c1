//! When the inbox's consumer fetches a partition.
//!
//! A partition read to its end is paused: tansu 0.6 answers every fetch
//! that finds records by listing the partition's every batch, and a
//! consumer that keeps fetching at the end meets most commands this node
//! produced, which the tap hands over anyway (with 10,000 contexts
//! journaled that put most of the model hop's tail on the broker;
//! benches/RESULTS.md, "LLM manager"). A paused partition is woken, and
//! fetched until [`AWAKE`] passes without a record, when a command may be
//! waiting in it:
//!
//! * a hint ([`crate::semantic::commands`]) names an offset at or past the
//!   one it takes next: a command produced on any node;
//! * the tap hands over a command that cannot be taken before others are
//!   read;
//! * the check every [`CHECK_EVERY`] finds its end past that offset: hints
//!   lost while Redis was away, commands from producers that send none.
//!
//! Hints are relayed from the Redis bridge by [`HintRelay`]. This module
//! decides only when partitions are fetched, never what is taken: that is
//! the inbox's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Offset;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::partition_list as list;
use super::pending::Pending;
use crate::bus::kafka::SEMANTIC_COMMANDS;
use crate::bus::redis::{Subscribe, Topic};
use crate::bus::BusEvent;
use crate::kernel::{ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Reply};
use crate::roles::llm_manager::metrics::LlmMetrics;
use crate::semantic::commands::{CommandProduced, HINTS};

pub use super::pending::AWAKE;

/// How often the ends of paused partitions are checked with the broker.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// How long one check waits for the broker, all partitions together.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Hints held for the inbox; past it they are dropped (and counted): the
/// checks find what they announced.
pub const HINTS_QUEUED: usize = 1024;

/// Why a paused partition was woken: the `cause` of `nexus_llm_inbox_wakes_total`.
#[derive(Debug, Clone, Copy)]
pub enum Cause {
    /// A hint named an offset not taken yet.
    Hint,
    /// The tap handed over a command that could not be taken yet.
    Tap,
    /// The broker reported the partition's end past what was taken.
    Check,
}

impl Cause {
    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Hint => "hint",
            Cause::Tap => "tap",
            Cause::Check => "check",
        }
    }
}

/// Wakes `partition` for `cause`, resuming its fetch if it was paused.
pub(super) fn wake(consumer: &StreamConsumer, metrics: &LlmMetrics, partition: i32, p: &mut Pending, cause: Cause) {
    if !p.wake(Instant::now()) {
        return;
    }
    metrics.inbox_wakes.with_label_values(&[cause.as_str()]).inc();
    metrics.inbox_paused.dec();
    if let Err(error) = consumer.resume(&list(&[partition])) {
        // Still paused: the next check or hint wakes it again.
        p.not_resumed();
        metrics.inbox_paused.inc();
        tracing::warn!(partition, %error, "llm manager inbox: fetch not resumed");
        return;
    }
    // librdkafka's broker thread, with no partition to fetch, sleeps for up
    // to a second, and a resume does not wake it; a seek (to where the
    // fetch stands anyway) starts the fetch at once. A partition is paused
    // only once its next offset is known.
    if let Some(next) = p.next() {
        if let Err(error) = consumer.seek(SEMANTIC_COMMANDS, partition, Offset::Offset(next), Duration::ZERO) {
            tracing::debug!(partition, next, %error, "llm manager inbox: the fetch starts with the broker's next round");
        }
    }
}

/// Pauses the fetch of every partition read to its end for [`AWAKE`];
/// after the consumer went unread for a while (`stalled`), gives the awake
/// ones [`AWAKE`] more instead, as records it holds would look like none.
pub(super) fn settle(
    consumer: &StreamConsumer,
    metrics: &LlmMetrics,
    partitions: &mut HashMap<i32, Pending>,
    stalled: bool,
) {
    let now = Instant::now();
    if stalled {
        partitions.values_mut().for_each(|p| p.stay_awake(now));
        return;
    }
    let settled: Vec<i32> = partitions.iter_mut().filter_map(|(id, p)| p.settle(now).then_some(*id)).collect();
    if settled.is_empty() {
        return;
    }
    metrics.inbox_paused.add(settled.len() as i64);
    if let Err(error) = consumer.pause(&list(&settled)) {
        // They are fetched on, as they were: slower for the broker, never wrong.
        tracing::debug!(?settled, %error, "llm manager inbox: fetch not paused");
    }
}

/// Makes sure `partitions`, just taken, are fetched: a partition this
/// consumer paused before it lost it may come back paused.
pub(super) fn fetch_taken(consumer: &StreamConsumer, partitions: &[i32]) {
    if let Err(error) = consumer.resume(&list(partitions)) {
        tracing::warn!(?partitions, %error, "llm manager inbox: fetch of taken partitions not resumed");
    }
}

/// The paused partitions among `partitions`.
pub(super) fn paused(partitions: &HashMap<i32, Pending>) -> Vec<i32> {
    partitions.iter().filter(|(_, p)| p.paused()).map(|(id, _)| *id).collect()
}

/// Asks the broker for the ends of `partitions` (the offset after each
/// one's last record) off the inbox's thread, within [`CHECK_TIMEOUT`] in
/// all, and sends what it learnt to `ends`. A partition it could not learn
/// in time is left to the next check.
pub(super) fn check_ends(consumer: Arc<StreamConsumer>, partitions: Vec<i32>, ends: mpsc::Sender<Vec<(i32, i64)>>) {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + CHECK_TIMEOUT;
        let mut found = Vec::with_capacity(partitions.len());
        for p in partitions {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match consumer.fetch_watermarks(SEMANTIC_COMMANDS, p, left) {
                Ok((_, end)) => found.push((p, end)),
                Err(error) => tracing::debug!(partition = p, %error, "llm manager inbox: partition end not learnt"),
            }
        }
        let _ = ends.blocking_send(found);
    });
}

/// Relays command hints from the Redis bridge to the inbox.
pub struct HintRelay {
    hints: mpsc::Sender<CommandProduced>,
    subscribe: Link<Subscribe>,
    metrics: LlmMetrics,
}

impl HintRelay {
    /// Actor kind in the mailbox graph.
    pub const KIND: &'static str = "llm_hint_relay";

    /// Follows [`HINTS`] through `subscribe`; the hints come out of the receiver.
    pub fn spawn(
        kernel: &Kernel,
        subscribe: Link<Subscribe>,
        metrics: LlmMetrics,
    ) -> (ActorRef<HintRelay>, mpsc::Receiver<CommandProduced>) {
        let (tx, rx) = mpsc::channel(HINTS_QUEUED);
        let relay = kernel.spawn("llm-hint-relay", move || HintRelay {
            hints: tx.clone(),
            subscribe: subscribe.clone(),
            metrics: metrics.clone(),
        });
        (relay, rx)
    }
}

impl Behaviour for HintRelay {
    const KIND: &'static str = HintRelay::KIND;

    fn started(&mut self, me: &ActorRef<Self>, _ctx: &mut Ctx<Self>) {
        let subscriber = me.link::<BusEvent>("redis-bridge");
        let subscribe = self.subscribe.clone();
        actix::spawn(async move {
            if let Err(error) = subscribe.ask(Subscribe { topic: Topic::Channel(HINTS.to_owned()), subscriber }).await {
                tracing::error!(?error, "llm manager: no command hints; commands from other nodes wait for the checks");
            }
        });
    }
}

impl Handler<BusEvent> for HintRelay {
    fn handle(&mut self, event: BusEvent, _ctx: &mut Ctx<Self>) -> Reply<()> {
        // Hints missed while the bus was down are the checks' to make up for.
        let BusEvent::Message(message) = event else { return Reply::Now(()) };
        let outcome = match CommandProduced::from_envelope(&message.envelope) {
            None => "malformed",
            Some(hint) => match self.hints.try_send(hint) {
                Ok(()) => "relayed",
                Err(_) => "dropped",
            },
        };
        self.metrics.command_hints.with_label_values(&[outcome]).inc();
        if outcome != "relayed" {
            tracing::debug!(outcome, channel = %message.channel, "nexus_llm_command_hints_total");
        }
        Reply::Now(())
    }
}
