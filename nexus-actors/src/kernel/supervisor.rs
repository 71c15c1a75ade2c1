//! Supervision: runs a [`Behaviour`] inside an actix actor so that a
//! panicking handler restarts the behaviour instead of killing the node.
//!
//! On a panic the state is rebuilt from its factory, the restart is counted
//! in `nexus_actor_restarts_total{actor}`, the caller gets
//! [`Panicked`], and the mailbox pauses for an exponential backoff before
//! the next message. Messages already queued are kept.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, AsyncContext, Context};
use futures::future::{FutureExt, LocalBoxFuture};
use prometheus::IntCounter;
use tracing::Instrument;

use super::{ActorCell, ActorRef, Kernel, Message};

/// The actix context a behaviour runs in.
pub type Ctx<A> = Context<Supervised<A>>;

/// The state and lifecycle of one kind of actor.
pub trait Behaviour: Sized + Unpin + 'static {
    /// Actor kind: the `actor` label of its metrics and its kind in the graph.
    const KIND: &'static str;
    /// Mailbox capacity. `try_tell` and `ask` respect it; see [`super::Link`].
    const MAILBOX: usize = 1024;

    /// Called when the actor starts and again after every restart, with a
    /// handle to itself (for links it hands to tasks it spawns).
    fn started(&mut self, _me: &ActorRef<Self>, _ctx: &mut Ctx<Self>) {}
}

/// How a behaviour handles message `M`.
pub trait Handler<M: Message>: Behaviour {
    /// Handles one message; a panic here restarts the actor (the caller gets `Panicked`).
    fn handle(&mut self, msg: M, ctx: &mut Ctx<Self>) -> Reply<M::Reply>;
}

/// A reply now, or a future that produces it without holding the actor.
pub enum Reply<R> {
    /// The answer, ready now.
    Now(R),
    /// A future that produces the answer while the actor takes its next messages.
    Later(LocalBoxFuture<'static, R>),
}

impl<R> From<R> for Reply<R> {
    fn from(value: R) -> Self {
        Reply::Now(value)
    }
}

impl<R> Reply<R> {
    /// An answer that `fut` produces later.
    pub fn later(fut: impl std::future::Future<Output = R> + 'static) -> Self {
        Reply::Later(Box::pin(fut))
    }
}

/// The handler panicked; the actor was restarted (or, for a reply future,
/// the future was abandoned) and the message was not processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the actor's handler panicked; the actor was restarted")]
pub struct Panicked;

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A panic after this much quiet starts the backoff from the beginning.
const BACKOFF_RESET: Duration = Duration::from_secs(30);

/// The actix actor that hosts a behaviour and restarts it when it panics.
pub struct Supervised<A: Behaviour> {
    state: A,
    factory: Box<dyn Fn() -> A + Send>,
    kernel: Kernel,
    cell: Arc<ActorCell>,
    restarts_metric: IntCounter,
    panics_metric: IntCounter,
    panics_in_row: u32,
    last_panic: Option<Instant>,
}

impl<A: Behaviour> Supervised<A> {
    pub(super) fn new(kernel: Kernel, cell: Arc<ActorCell>, factory: Box<dyn Fn() -> A + Send>) -> Self {
        let metrics = kernel.metrics();
        Supervised {
            state: factory(),
            restarts_metric: metrics.actor_restarts.with_label_values(&[A::KIND]),
            panics_metric: metrics.actor_panics.with_label_values(&[A::KIND]),
            factory,
            kernel,
            cell,
            panics_in_row: 0,
            last_panic: None,
        }
    }

    /// The hosted behaviour, for actor futures and timers that the
    /// behaviour schedules on its context (`ctx.run_later`, `ctx.wait`).
    pub fn behaviour_mut(&mut self) -> &mut A {
        &mut self.state
    }

    fn me(&self, ctx: &Ctx<A>) -> ActorRef<A> {
        ActorRef::new(ctx.address(), self.cell.clone(), self.kernel.clone())
    }

    fn restart(&mut self, ctx: &mut Ctx<A>, payload: Box<dyn std::any::Any + Send>) {
        let now = Instant::now();
        if self.last_panic.is_some_and(|t| now.duration_since(t) > BACKOFF_RESET) {
            self.panics_in_row = 0;
        }
        self.last_panic = Some(now);
        let backoff = FIRST_BACKOFF.saturating_mul(1 << self.panics_in_row.min(16)).min(MAX_BACKOFF);
        self.panics_in_row += 1;
        self.panics_metric.inc();
        self.restarts_metric.inc();
        self.cell.restarted();
        tracing::error!(
            actor = A::KIND,
            id = %self.cell.id,
            panic = panic_message(&payload),
            backoff_ms = backoff.as_millis() as u64,
            "nexus_actor_restarts_total"
        );
        match catch_unwind(AssertUnwindSafe(|| (self.factory)())) {
            Ok(state) => self.state = state,
            Err(_) => {
                tracing::error!(actor = A::KIND, id = %self.cell.id, "factory panicked; stopping actor");
                ctx.stop();
                return;
            }
        }
        ctx.wait(actix::fut::wrap_future(actix::clock::sleep(backoff)));
        let me = self.me(ctx);
        if catch_unwind(AssertUnwindSafe(|| self.state.started(&me, ctx))).is_err() {
            tracing::error!(actor = A::KIND, id = %self.cell.id, "started hook panicked after restart; stopping actor");
            ctx.stop();
        }
    }
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

impl<A: Behaviour> Actor for Supervised<A> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::debug!(actor = A::KIND, id = %self.cell.id, "actor started");
        let me = self.me(ctx);
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.state.started(&me, ctx))) {
            self.restart(ctx, payload);
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        tracing::debug!(actor = A::KIND, id = %self.cell.id, "actor stopped");
        self.kernel.graph().remove(&self.cell.id);
    }
}

/// The actix-level message that carries a Nexus message into its actor.
pub struct Deliver<M: Message>(pub(crate) M);

impl<M: Message> actix::Message for Deliver<M> {
    type Result = Result<M::Reply, Panicked>;
}

impl<A, M> actix::Handler<Deliver<M>> for Supervised<A>
where
    A: Handler<M>,
    M: Message,
{
    type Result = actix::Response<Result<M::Reply, Panicked>>;

    fn handle(&mut self, Deliver(msg): Deliver<M>, ctx: &mut Self::Context) -> Self::Result {
        self.cell.handled();
        let span = msg.trace_context().filter(|t| !t.is_empty()).map(|trace| {
            let span = tracing::info_span!("nexus.actor.handle", actor = A::KIND, id = %self.cell.id);
            trace.set_as_parent_of(&span);
            span
        });
        let entered = span.as_ref().map(|s| s.enter());
        let outcome = catch_unwind(AssertUnwindSafe(|| self.state.handle(msg, ctx)));
        drop(entered);
        match outcome {
            Ok(Reply::Now(reply)) => actix::Response::reply(Ok(reply)),
            Ok(Reply::Later(fut)) => {
                let panics = self.panics_metric.clone();
                let fut = AssertUnwindSafe(fut).catch_unwind().map(move |r| {
                    r.map_err(|_| {
                        panics.inc();
                        tracing::error!(actor = A::KIND, "reply future panicked");
                        Panicked
                    })
                });
                match span {
                    Some(span) => actix::Response::fut(fut.instrument(span)),
                    None => actix::Response::fut(fut),
                }
            }
            Err(payload) => {
                self.restart(ctx, payload);
                actix::Response::reply(Err(Panicked))
            }
        }
    }
}
