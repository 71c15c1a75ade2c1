//! The live mailbox graph: which actors exist, how deep their mailboxes
//! are, how many messages they handled, and who sends to whom.
//!
//! Counters are plain atomics updated on the message path; the graph only
//! reads them when someone asks for a snapshot. It does not send messages.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use prometheus::IntCounter;
use serde::Serialize;

/// Per-actor counters shared by the actor and every handle to it.
pub struct ActorCell {
    pub(crate) id: String,
    pub(crate) kind: &'static str,
    enqueued: AtomicU64,
    handled: AtomicU64,
    restarts: AtomicU64,
    pub(crate) handled_metric: IntCounter,
}

impl ActorCell {
    pub(crate) fn new(id: String, kind: &'static str, handled_metric: IntCounter) -> Self {
        ActorCell {
            id,
            kind,
            enqueued: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            handled_metric,
        }
    }

    /// The actor's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn enqueued(&self) {
        self.enqueued.fetch_add(1, Ordering::Relaxed);
    }

    /// Undoes [`Self::enqueued`] for a message the mailbox refused.
    pub(crate) fn refused(&self) {
        self.enqueued.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn handled(&self) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        self.handled_metric.inc();
    }

    pub(crate) fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages sent and not yet handled.
    pub fn depth(&self) -> u64 {
        let handled = self.handled.load(Ordering::Relaxed);
        self.enqueued.load(Ordering::Relaxed).saturating_sub(handled)
    }

    /// Messages handled since the actor was spawned.
    pub fn handled_count(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }

    /// Times the actor was restarted after a panic.
    pub fn restart_count(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }
}

/// Registry of live actors and message edges of one node.
#[derive(Default)]
pub struct Graph {
    actors: Mutex<BTreeMap<String, Weak<ActorCell>>>,
    edges: Mutex<HashMap<(String, String), Arc<AtomicU64>>>,
}

/// One actor as `GET /api/graph` shows it.
#[derive(Debug, Serialize)]
pub struct ActorView {
    /// Its id (unique in the node).
    pub id: String,
    /// Its behaviour's `KIND`.
    pub kind: &'static str,
    /// Messages sent to it and not yet handled.
    pub mailbox_depth: u64,
    /// Messages it handled.
    pub handled: u64,
    /// Restarts after a panic.
    pub restarts: u64,
}

/// Messages from one sender to one actor, as `GET /api/graph` shows them.
#[derive(Debug, Serialize)]
pub struct EdgeView {
    /// The sender: an actor's id or the name a link was made with.
    pub from: String,
    /// The receiving actor's id.
    pub to: String,
    /// Messages sent along this edge.
    pub count: u64,
}

/// What `GET /api/graph` returns.
#[derive(Debug, Serialize)]
pub struct GraphSnapshot {
    /// Live actors.
    pub actors: Vec<ActorView>,
    /// Edges into live actors, sorted.
    pub edges: Vec<EdgeView>,
}

impl Graph {
    pub(crate) fn insert(&self, cell: &Arc<ActorCell>) {
        self.actors.lock().unwrap_or_else(|e| e.into_inner()).insert(cell.id.clone(), Arc::downgrade(cell));
    }

    /// Forgets a stopped actor and the edges into and out of it. Links
    /// that still point at it keep their counter alive but it is no longer
    /// reported.
    pub(crate) fn remove(&self, id: &str) {
        self.actors.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        self.edges.lock().unwrap_or_else(|e| e.into_inner()).retain(|(from, to), _| from != id && to != id);
    }

    /// The counter of messages from `from` to `to`, created on first use.
    pub(crate) fn edge(&self, from: &str, to: &str) -> Arc<AtomicU64> {
        let mut edges = self.edges.lock().unwrap_or_else(|e| e.into_inner());
        edges.entry((from.to_owned(), to.to_owned())).or_default().clone()
    }

    /// Live actors, for metrics that are read rather than counted.
    pub(crate) fn cells(&self) -> Vec<Arc<ActorCell>> {
        let actors = self.actors.lock().unwrap_or_else(|e| e.into_inner());
        actors.values().filter_map(Weak::upgrade).collect()
    }

    /// The graph now: live actors and the edges between them.
    pub fn snapshot(&self) -> GraphSnapshot {
        let cells = self.cells();
        let live: std::collections::HashSet<&str> = cells.iter().map(|c| c.id.as_str()).collect();
        let actors = cells
            .iter()
            .map(|c| ActorView {
                id: c.id.clone(),
                kind: c.kind,
                mailbox_depth: c.depth(),
                handled: c.handled_count(),
                restarts: c.restart_count(),
            })
            .collect();
        let edges = self.edges.lock().unwrap_or_else(|e| e.into_inner());
        // An actor spawned under the id of a stopped one may race with the
        // stop's removal; report only edges into live actors.
        let mut edges: Vec<EdgeView> = edges
            .iter()
            .filter(|((_, to), _)| live.contains(to.as_str()))
            .map(|((from, to), count)| EdgeView {
                from: from.clone(),
                to: to.clone(),
                count: count.load(Ordering::Relaxed),
            })
            .collect();
        edges.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
        GraphSnapshot { actors, edges }
    }
}
