//! The live mailbox graph: which actors exist, how deep their mailboxes
//! are, how many messages they handled, and who sends to whom.
//!
//! Counters are plain atomics updated on the message path; the graph only
//! reads them when someone asks for a snapshot. It does not send messages.

use std::collections::{BTreeMap, HashMap, HashSet};
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
    edges: Mutex<Edges>,
}

/// The message counters, reachable from both ends: an actor that stops
/// takes its own edges away, at a cost that does not grow with the other
/// actors' (thousands of sessions come and go on one node).
#[derive(Default)]
struct Edges {
    /// Receiver → sender → counter.
    into: HashMap<String, HashMap<String, Arc<AtomicU64>>>,
    /// Sender → the receivers it has an edge to.
    out_of: HashMap<String, HashSet<String>>,
}

impl Edges {
    fn counter(&mut self, from: &str, to: &str) -> Arc<AtomicU64> {
        let senders = self.into.entry(to.to_owned()).or_default();
        if let Some(counter) = senders.get(from) {
            return counter.clone();
        }
        self.out_of.entry(from.to_owned()).or_default().insert(to.to_owned());
        senders.entry(from.to_owned()).or_default().clone()
    }

    fn remove(&mut self, id: &str) {
        for from in self.into.remove(id).into_iter().flat_map(HashMap::into_keys) {
            self.forget_out(&from, id);
        }
        for to in self.out_of.remove(id).into_iter().flatten() {
            if let Some(senders) = self.into.get_mut(&to) {
                senders.remove(id);
                if senders.is_empty() {
                    self.into.remove(&to);
                }
            }
        }
    }

    fn forget_out(&mut self, from: &str, to: &str) {
        if let Some(receivers) = self.out_of.get_mut(from) {
            receivers.remove(to);
            if receivers.is_empty() {
                self.out_of.remove(from);
            }
        }
    }
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
        self.edges.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// The counter of messages from `from` to `to`, created on first use.
    pub(crate) fn edge(&self, from: &str, to: &str) -> Arc<AtomicU64> {
        self.edges.lock().unwrap_or_else(|e| e.into_inner()).counter(from, to)
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
            .into
            .iter()
            .filter(|(to, _)| live.contains(to.as_str()))
            .flat_map(|(to, senders)| {
                senders.iter().map(move |(from, count)| EdgeView {
                    from: from.clone(),
                    to: to.clone(),
                    count: count.load(Ordering::Relaxed),
                })
            })
            .collect();
        edges.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
        GraphSnapshot { actors, edges }
    }
}

#[cfg(test)]
mod tests {
    use super::Edges;

    fn pairs(edges: &Edges) -> Vec<(String, String)> {
        let mut pairs: Vec<_> = edges
            .into
            .iter()
            .flat_map(|(to, senders)| senders.keys().map(move |from| (from.clone(), to.clone())))
            .collect();
        pairs.sort();
        pairs
    }

    #[test]
    fn a_removed_actor_takes_its_edges_both_ways_and_no_others() {
        let mut edges = Edges::default();
        let counter = edges.counter("client", "session/1");
        counter.fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(edges.counter("client", "session/1").load(std::sync::atomic::Ordering::Relaxed), 3, "one counter");
        edges.counter("client", "session/2");
        edges.counter("session/1", "bridge");
        edges.counter("session/2", "bridge");
        edges.counter("session/1", "session/1");
        edges.remove("session/1");
        let expected = [("client", "session/2"), ("session/2", "bridge")];
        assert_eq!(pairs(&edges), expected.map(|(f, t)| (f.to_owned(), t.to_owned())));
        assert_eq!(edges.out_of.get("client").map(|to| to.len()), Some(1));
        assert!(!edges.out_of.contains_key("session/1"));
        edges.remove("session/2");
        assert!(edges.into.is_empty() && edges.out_of.is_empty(), "nothing is left behind");
    }
}
