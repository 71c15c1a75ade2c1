//! Handles to actors. Every send goes through one of these so that the
//! mailbox graph counts it; a failed send hands the message back.
//!
//! Mailbox policy: every mailbox has a capacity ([`super::Behaviour::MAILBOX`]).
//! * [`Link::try_tell`] never waits: when the mailbox is full the message is
//!   refused, handed back in [`SendError::Full`] and counted in
//!   `nexus_mailbox_dropped_total{actor}`. Bridges use it for at-most-once
//!   traffic (Redis pub/sub), whose subscribers resync from versioned state.
//! * [`Link::ask`] waits for room (backpressure) and then for the reply.
//!   Bridges use it for at-least-once traffic (Kafka): a slow actor slows
//!   consumption instead of losing messages.
//! * [`Link::tell`] ignores the capacity. It is for trusted in-process
//!   senders and control messages that must not be dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::{Addr, MailboxError, Recipient};
use prometheus::IntCounter;

use super::supervisor::Deliver;
use super::{ActorCell, Behaviour, Handler, Kernel, Message, Panicked, Supervised};

/// A send that did not happen; the message is handed back.
#[derive(thiserror::Error)]
pub enum SendError<M> {
    /// The mailbox holds as many messages as it may (`try_tell` only).
    #[error("mailbox is full")]
    Full(M),
    /// The actor has stopped.
    #[error("actor has stopped")]
    Closed(M),
}

impl<M> SendError<M> {
    /// The message that was not sent.
    pub fn into_inner(self) -> M {
        match self {
            SendError::Full(m) | SendError::Closed(m) => m,
        }
    }
}

impl<M> std::fmt::Debug for SendError<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Full(_) => f.write_str("SendError::Full(..)"),
            SendError::Closed(_) => f.write_str("SendError::Closed(..)"),
        }
    }
}

/// An `ask` that produced no reply.
#[derive(thiserror::Error)]
pub enum AskError<M> {
    /// The actor had stopped; the message was not delivered and is handed back.
    #[error("actor has stopped")]
    Closed(M),
    /// The actor stopped after taking the message, before replying.
    #[error("actor stopped before replying")]
    Dropped,
    /// The handler panicked on this message; the actor was restarted.
    #[error(transparent)]
    Panicked(#[from] Panicked),
}

impl<M> std::fmt::Debug for AskError<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AskError::Closed(_) => f.write_str("AskError::Closed(..)"),
            AskError::Dropped => f.write_str("AskError::Dropped"),
            AskError::Panicked(_) => f.write_str("AskError::Panicked"),
        }
    }
}

/// A sender of `M` to one actor, bound to the sender's id for the graph.
pub struct Link<M: Message> {
    recipient: Recipient<Deliver<M>>,
    cell: Arc<ActorCell>,
    edge: Arc<AtomicU64>,
    dropped: IntCounter,
}

impl<M: Message> Clone for Link<M> {
    fn clone(&self) -> Self {
        Link {
            recipient: self.recipient.clone(),
            cell: self.cell.clone(),
            edge: self.edge.clone(),
            dropped: self.dropped.clone(),
        }
    }
}

impl<M: Message> Link<M> {
    /// Id of the receiving actor.
    pub fn to(&self) -> &str {
        &self.cell.id
    }

    /// Whether the actor still takes messages.
    pub fn is_alive(&self) -> bool {
        self.recipient.connected()
    }

    /// Sends without waiting and regardless of mailbox capacity.
    pub fn tell(&self, msg: M) -> Result<(), SendError<M>> {
        if !self.recipient.connected() {
            return Err(SendError::Closed(msg));
        }
        self.cell.enqueued();
        self.edge.fetch_add(1, Ordering::Relaxed);
        self.recipient.do_send(Deliver(msg));
        Ok(())
    }

    /// Sends without waiting; a full mailbox refuses the message.
    pub fn try_tell(&self, msg: M) -> Result<(), SendError<M>> {
        self.cell.enqueued();
        match self.recipient.try_send(Deliver(msg)) {
            Ok(()) => {
                self.edge.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(actix::prelude::SendError::Full(Deliver(msg))) => {
                self.cell.refused();
                self.dropped.inc();
                tracing::debug!(actor = self.cell.kind, id = %self.cell.id, "nexus_mailbox_dropped_total");
                Err(SendError::Full(msg))
            }
            Err(actix::prelude::SendError::Closed(Deliver(msg))) => {
                self.cell.refused();
                Err(SendError::Closed(msg))
            }
        }
    }

    /// Sends, waiting for mailbox room, and waits for the reply.
    pub async fn ask(&self, msg: M) -> Result<M::Reply, AskError<M>> {
        if !self.recipient.connected() {
            return Err(AskError::Closed(msg));
        }
        self.cell.enqueued();
        self.edge.fetch_add(1, Ordering::Relaxed);
        match self.recipient.send(Deliver(msg)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(panicked)) => Err(AskError::Panicked(panicked)),
            Err(MailboxError::Closed | MailboxError::Timeout) => Err(AskError::Dropped),
        }
    }
}

/// The handle returned by spawning: the actor's address and its counters.
pub struct ActorRef<A: Behaviour> {
    addr: Addr<Supervised<A>>,
    cell: Arc<ActorCell>,
    kernel: Kernel,
}

impl<A: Behaviour> Clone for ActorRef<A> {
    fn clone(&self) -> Self {
        ActorRef { addr: self.addr.clone(), cell: self.cell.clone(), kernel: self.kernel.clone() }
    }
}

impl<A: Behaviour> ActorRef<A> {
    pub(super) fn new(addr: Addr<Supervised<A>>, cell: Arc<ActorCell>, kernel: Kernel) -> Self {
        ActorRef { addr, cell, kernel }
    }

    /// The actor's id in the mailbox graph.
    pub fn id(&self) -> &str {
        &self.cell.id
    }

    /// The actor's counters (mailbox depth, messages handled, restarts).
    pub fn cell(&self) -> &ActorCell {
        &self.cell
    }

    /// Whether the actor is still running.
    pub fn is_alive(&self) -> bool {
        self.addr.connected()
    }

    /// A sender of `M` to this actor, counted on the edge `from → self`.
    pub fn link<M>(&self, from: &str) -> Link<M>
    where
        A: Handler<M>,
        M: Message,
    {
        Link {
            recipient: self.addr.clone().recipient(),
            edge: self.kernel.graph().edge(from, &self.cell.id),
            dropped: self.kernel.metrics().mailbox_dropped.with_label_values(&[A::KIND]),
            cell: self.cell.clone(),
        }
    }

    /// Stops the actor after the messages already in its mailbox.
    pub fn stop(&self) {
        self.addr.do_send(Stop);
    }
}

struct Stop;

impl actix::Message for Stop {
    type Result = ();
}

impl<A: Behaviour> actix::Handler<Stop> for Supervised<A> {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        use actix::ActorContext;
        ctx.stop();
    }
}
