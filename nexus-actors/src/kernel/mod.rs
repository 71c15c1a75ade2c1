//! The actor kernel: typed messages, supervised actors on actix, handles
//! that count what they send, and the node-wide registry of all of it.
//!
//! Every Nexus actor is a [`Behaviour`] run inside a [`Supervised`] actix
//! actor. The kernel owns spawning, supervision and bookkeeping; it knows
//! nothing of buses or roles.

mod graph;
mod link;
mod supervisor;

use std::sync::Arc;

use actix::{Actor, ArbiterHandle};

pub use graph::{ActorCell, ActorView, EdgeView, Graph, GraphSnapshot};
pub use link::{ActorRef, AskError, Link, SendError};
pub use supervisor::{Behaviour, Ctx, Handler, Panicked, Reply, Supervised};

use crate::telemetry::{Metrics, TraceContext};

/// Locks `m`, recovering it if a holder panicked: a panicking handler is
/// restarted, not fatal, so state it shares must stay usable after it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A typed message. One type per intent; `Reply` is what the receiver answers.
pub trait Message: Send + 'static {
    /// What the receiver answers (`()` for a one-way message).
    type Reply: Send + 'static;

    /// Remote trace context this message carries, if any. The receiving
    /// actor's span becomes its child.
    fn trace_context(&self) -> Option<TraceContext> {
        None
    }
}

/// Node-wide kernel state: the mailbox graph and the metrics. Cheap to clone.
#[derive(Clone)]
pub struct Kernel {
    inner: Arc<KernelInner>,
}

struct KernelInner {
    node: String,
    graph: Graph,
    metrics: Metrics,
}

impl Kernel {
    /// A kernel for the node named `node`, with its own metrics and graph.
    pub fn new(node: impl Into<String>) -> Self {
        Kernel { inner: Arc::new(KernelInner { node: node.into(), graph: Graph::default(), metrics: Metrics::new() }) }
    }

    /// This node's name, used as the `source` of what it publishes.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The node's metric families.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The node's live mailbox graph.
    pub fn graph(&self) -> &Graph {
        &self.inner.graph
    }

    /// Prometheus text of every metric, with mailbox depths read fresh.
    pub fn render_metrics(&self) -> String {
        let depth = &self.inner.metrics.mailbox_depth;
        depth.reset();
        for cell in self.inner.graph.cells() {
            depth.with_label_values(&[cell.kind]).add(cell.depth() as i64);
        }
        self.inner.metrics.render()
    }

    /// Starts a supervised actor on the current arbiter. `factory` builds
    /// its state, at start and again after every restart.
    pub fn spawn<A, F>(&self, id: impl Into<String>, factory: F) -> ActorRef<A>
    where
        A: Behaviour,
        F: Fn() -> A + Send + 'static,
    {
        let cell = self.register::<A>(id.into());
        let supervised = Supervised::new(self.clone(), cell.clone(), Box::new(factory));
        let addr = Supervised::create(move |ctx| {
            ctx.set_mailbox_capacity(A::MAILBOX);
            supervised
        });
        ActorRef::new(addr, cell, self.clone())
    }

    /// Starts a supervised actor on another arbiter (its own thread).
    pub fn spawn_on<A, F>(&self, arbiter: &ArbiterHandle, id: impl Into<String>, factory: F) -> ActorRef<A>
    where
        A: Behaviour,
        F: Fn() -> A + Send + 'static,
    {
        let cell = self.register::<A>(id.into());
        let (kernel, cell2) = (self.clone(), cell.clone());
        let addr = Supervised::start_in_arbiter(arbiter, move |ctx| {
            ctx.set_mailbox_capacity(A::MAILBOX);
            Supervised::new(kernel, cell2, Box::new(factory))
        });
        ActorRef::new(addr, cell, self.clone())
    }

    fn register<A: Behaviour>(&self, id: String) -> Arc<ActorCell> {
        let handled = self.inner.metrics.actor_messages.with_label_values(&[A::KIND]);
        let cell = Arc::new(ActorCell::new(id, A::KIND, handled));
        self.inner.graph.insert(&cell);
        cell
    }
}
