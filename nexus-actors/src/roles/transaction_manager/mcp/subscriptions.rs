//! `subscriptions/listen` (MCP 2026-07-28) on document resources: a caller
//! names up to [`MAX_URIS`] of their documents and gets
//! `notifications/resources/updated`, with the new version in `_meta`, each
//! time one changes through any node, until the request ends.
//!
//! Changes arrive the way WebSocket sessions get them: a [`Listener`] actor
//! per listen subscribes each document's channel through the node's Redis
//! bridge, whose table is a node's one fan-out. Every URI's owner is checked
//! before anything is subscribed; someone else's document is refused like
//! a missing one. A client that stops reading its stream is dropped and
//! counted (`nexus_mcp_listens_too_slow_total`), never holding the bridge;
//! listens are capped per user and per node.
//!
//! This module owns listens. It reads no document's state: a notification
//! says only which document changed and to which version. The legacy
//! `resources/subscribe` needs MCP sessions, which the stateless `/mcp`
//! does not keep, and is not offered.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actix::ArbiterHandle;
use rmcp::model::{
    MetaObject, NotificationMetaObject, ResourceUpdatedNotification, ResourceUpdatedNotificationParam,
    ServerNotification, SubscriptionFilter,
};
use rmcp::service::SubscriptionContext;
use rmcp::ErrorData as McpError;
use serde::Deserialize as _;
use serde_json::json;
use tokio::sync::mpsc;

use super::resources::{owned, PREFIX};
use crate::bus::redis::{RedisBus, Subscribe, Topic, Unsubscribe};
use crate::bus::BusEvent;
use crate::envelope::Payload;
use crate::kernel::{Behaviour, Ctx, Handler, Kernel, Link, Reply};
use crate::platform::channels;
use crate::roles::transaction_manager::api::documents::DocumentChanged;
use crate::roles::transaction_manager::documents::{is_document_id, Documents};

/// Documents one listen may follow.
pub(super) const MAX_URIS: usize = 256;
/// Listens one user may hold open on a node.
pub(super) const MAX_PER_USER: usize = 16;
/// Listens a node holds open.
pub(super) const MAX_PER_NODE: usize = 10_000;
/// Changes waiting for a listen's client; more means it does not read.
const QUEUE: usize = 64;
/// How often a listen's stream carries a ping, by which a client gone away
/// is noticed.
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// How long a notification may wait for the client to take it.
pub(super) const SEND_WITHIN: Duration = Duration::from_secs(10);

/// The node's listens. Cheap to clone.
#[derive(Clone)]
pub struct Listens {
    kernel: Kernel,
    /// Where listeners run: a listen itself runs on rmcp's task, outside
    /// any actix arbiter.
    arbiter: ArbiterHandle,
    subscribe: Link<Subscribe>,
    unsubscribe: Link<Unsubscribe>,
    open: Arc<Mutex<HashMap<String, usize>>>,
    too_slow: prometheus::IntCounter,
}

impl Listens {
    /// Listens of `kernel`'s node, through `bridge`, their listeners on
    /// `arbiter`.
    pub fn new(kernel: Kernel, bridge: &RedisBus, arbiter: ArbiterHandle) -> Self {
        let too_slow = kernel.metrics().mcp_listens_too_slow.clone();
        Listens {
            arbiter,
            subscribe: bridge.link("mcp"),
            unsubscribe: bridge.link("mcp"),
            kernel,
            open: Arc::default(),
            too_slow,
        }
    }

    /// The document URIs of `requested` this server follows: deduplicated,
    /// at most [`MAX_URIS`]; nothing else (no list changes).
    pub(super) fn accepted(requested: &SubscriptionFilter) -> SubscriptionFilter {
        let mut uris: Vec<String> = requested
            .resource_subscriptions
            .iter()
            .flatten()
            .filter(|uri| uri.strip_prefix(PREFIX).is_some_and(is_document_id))
            .cloned()
            .collect();
        uris.sort_unstable();
        uris.dedup();
        uris.truncate(MAX_URIS);
        let mut filter = SubscriptionFilter::new();
        filter.resource_subscriptions = Some(uris);
        filter
    }

    /// Runs one listen for `user` until its request ends, its client stops
    /// reading, or the subscription fails.
    pub(super) async fn listen(
        &self,
        user: &str,
        documents: &Documents,
        context: SubscriptionContext,
    ) -> Result<(), McpError> {
        let uris = context.accepted().resource_subscriptions.clone().unwrap_or_default();
        // Before any side effect: every URI is the caller's.
        for uri in &uris {
            owned(documents, user, uri).await?;
        }
        let _slot = self.admit(user)?;
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let id = format!("mcp-listen-{}", uuid::Uuid::now_v7());
        let listener = {
            let (tx, overflowed) = (tx.clone(), overflowed.clone());
            let listener = move || Listener { updates: tx.clone(), overflowed: overflowed.clone(), down: false };
            self.kernel.spawn_on(&self.arbiter, id.clone(), listener)
        };
        drop(tx);
        let mut following = Following { listens: self, listener: id, docs: Vec::new(), stop: listener.clone() };
        for uri in &uris {
            let doc = &uri[PREFIX.len()..];
            let request = Subscribe { topic: topic(doc), subscriber: listener.link("redis-bridge") };
            match self.subscribe.ask(request).await {
                Ok(Ok(())) => following.docs.push(doc.to_owned()),
                _ => return Err(McpError::internal_error("unavailable: the documents could not be followed", None)),
            }
        }
        let sink = context.sink().clone();
        loop {
            let first = tokio::select! {
                update = rx.recv() => update,
                () = context.cancelled() => return Ok(()),
            };
            let Some(first) = first else { return Ok(()) };
            // What waits is merged: one notification per document, at its latest version.
            let mut changed = BTreeMap::new();
            let mut update = Some(first);
            while let Some(next) = update {
                match next {
                    Update::Changed { doc, version } => {
                        let at = changed.entry(doc).or_insert(version);
                        *at = (*at).max(version);
                    }
                    // Changes may have been missed while the bus was down.
                    Update::Resync => changed.extend(following.docs.iter().map(|doc| (doc.clone(), 0))),
                }
                update = rx.try_recv().ok();
            }
            if overflowed.load(Ordering::Relaxed) {
                return Err(self.dropped(user));
            }
            for (doc, version) in changed {
                let mut notification =
                    ResourceUpdatedNotification::new(ResourceUpdatedNotificationParam::new(format!("{PREFIX}{doc}")));
                if version > 0 {
                    let mut meta = MetaObject::default();
                    meta.0.insert("version".into(), json!(version));
                    // In the extensions: the sink adds the subscription id there.
                    notification.extensions.insert(NotificationMetaObject(meta));
                }
                let sent = sink.send(ServerNotification::ResourceUpdatedNotification(notification));
                match tokio::time::timeout(SEND_WITHIN, sent).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => return Err(self.dropped(user)),
                }
            }
        }
    }

    /// A place for one more listen of `user`, given back when dropped.
    fn admit(&self, user: &str) -> Result<Slot<'_>, McpError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let total: usize = open.values().sum();
        let mine = open.get(user).copied().unwrap_or(0);
        if mine >= MAX_PER_USER || total >= MAX_PER_NODE {
            let message = format!("too many listens open (at most {MAX_PER_USER} a user, {MAX_PER_NODE} a node)");
            return Err(McpError::invalid_request(message, None));
        }
        open.insert(user.to_owned(), mine + 1);
        Ok(Slot { open: &self.open, user: user.to_owned() })
    }

    fn dropped(&self, user: &str) -> McpError {
        self.too_slow.inc();
        tracing::warn!(user, "nexus_mcp_listens_too_slow_total: a listen's client stopped reading; dropped");
        McpError::internal_error("the client did not read its notifications in time", None)
    }
}

fn topic(doc: &str) -> Topic {
    Topic::Shard(channels::document(doc))
}

/// One open listen of a user, counted while it lives.
struct Slot<'a> {
    open: &'a Mutex<HashMap<String, usize>>,
    user: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// The subscriptions of one listen, given up however it ends.
struct Following<'a> {
    listens: &'a Listens,
    listener: String,
    docs: Vec<String>,
    stop: crate::kernel::ActorRef<Listener>,
}

impl Drop for Following<'_> {
    fn drop(&mut self) {
        for doc in &self.docs {
            let unsubscribe = Unsubscribe { topic: topic(doc), subscriber: self.listener.clone() };
            let _ = self.listens.unsubscribe.tell(unsubscribe);
        }
        self.stop.stop();
    }
}

/// What a listen's client is told about.
#[derive(Debug)]
enum Update {
    Changed { doc: String, version: u64 },
    Resync,
}

/// Receives a listen's document changes from the Redis bridge.
struct Listener {
    updates: mpsc::Sender<Update>,
    overflowed: Arc<AtomicBool>,
    /// The bus went down since the last `Up`.
    down: bool,
}

impl Behaviour for Listener {
    const KIND: &'static str = "mcp_listener";
}

impl Handler<BusEvent> for Listener {
    fn handle(&mut self, event: BusEvent, _ctx: &mut Ctx<Self>) -> Reply<()> {
        let update = match event {
            BusEvent::Message(message) if message.envelope.kind == DocumentChanged::TYPE => {
                let Ok(change) = DocumentChanged::deserialize(&message.envelope.data) else { return Reply::Now(()) };
                Update::Changed { doc: change.id, version: change.version }
            }
            BusEvent::Down(_) => {
                self.down = true;
                return Reply::Now(());
            }
            // Only an `Up` after a `Down` may have missed changes (the bridge
            // also confirms a new subscription with one).
            BusEvent::Up(_) if std::mem::take(&mut self.down) => Update::Resync,
            _ => return Reply::Now(()),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = self.updates.try_send(update) {
            self.overflowed.store(true, Ordering::Relaxed);
        }
        Reply::Now(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusDown, BusMessage, BusUp};
    use crate::envelope::Envelope;

    fn change(doc: &str, version: u64) -> BusEvent {
        let changed = DocumentChanged { id: doc.into(), version, patch: json!({"n": version}) };
        let envelope = Envelope::new("test", changed).into_untyped();
        BusEvent::Message(Arc::new(BusMessage { channel: channels::document(doc), pattern: None, envelope }))
    }

    async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("an update in time").expect("open")
    }

    #[actix_rt::test]
    async fn a_listener_passes_changes_resyncs_after_an_outage_and_notes_a_client_that_does_not_read() {
        let kernel = Kernel::new("test");
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = overflowed.clone();
        let listener =
            kernel.spawn("listener", move || Listener { updates: tx.clone(), overflowed: flag.clone(), down: false });
        let bus = listener.link::<BusEvent>("test");

        // The bridge confirms a subscription with an `Up`: nothing to resync.
        bus.tell(BusEvent::Up(BusUp { bus: Bus::Redis })).expect("told");
        bus.tell(change("d", 2)).expect("told");
        assert!(matches!(next(&mut rx).await, Update::Changed { doc, version: 2 } if doc == "d"));
        let down = BusDown { bus: Bus::Redis, reason: "test".into() };
        bus.tell(BusEvent::Down(down)).expect("told");
        bus.tell(BusEvent::Up(BusUp { bus: Bus::Redis })).expect("told");
        assert!(matches!(next(&mut rx).await, Update::Resync));
        assert!(rx.try_recv().is_err(), "one resync");

        // Nobody reads: past the queue, the listen is marked for dropping.
        for version in 0..QUEUE as u64 {
            bus.tell(change("d", version)).expect("told");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!overflowed.load(Ordering::Relaxed), "a full queue is not yet an overflow");
        bus.tell(change("d", 99)).expect("told");
        raised(&overflowed).await;
    }

    /// Waits (up to 5 s) until `flag` is raised.
    async fn raised(flag: &AtomicBool) {
        for _ in 0..100 {
            if flag.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the overflow was not noted");
    }
}
