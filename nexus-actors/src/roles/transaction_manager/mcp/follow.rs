//! Following documents through the node's Redis bridge, for MCP: a
//! [`Following`] is one [`Listener`] actor whose documents the bridge
//! fans out to it, the way it does to WebSocket sessions (the bridge's table
//! is a node's one fan-out), and a bounded queue of [`Update`]s for whoever
//! tells the client. Listens and sessions both follow documents this way.
//!
//! This module owns the subscriptions and their release. It checks no
//! owner and reads no document: callers subscribe only documents they have
//! checked are their caller's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::ArbiterHandle;
use rmcp::model::{MetaObject, NotificationMetaObject, ResourceUpdatedNotification, ResourceUpdatedNotificationParam};
use rmcp::ErrorData as McpError;
use serde::Deserialize as _;
use serde_json::json;
use tokio::sync::mpsc;

use super::resources::PREFIX;
use crate::bus::redis::{RedisBus, Subscribe, Topic, Unsubscribe};
use crate::bus::BusEvent;
use crate::envelope::Payload;
use crate::kernel::{ActorRef, Behaviour, Ctx, Handler, Kernel, Link, Reply};
use crate::platform::channels;
use crate::roles::transaction_manager::api::documents::DocumentChanged;

/// Changes waiting for a follower's client; more means it does not read.
/// As large as the listener's mailbox: a reading client is never judged
/// by a burst, only by how long a notification waits.
pub(super) const QUEUE: usize = 1024;

/// What starts followers on a node. Cheap to clone.
#[derive(Clone)]
pub(super) struct Follow {
    kernel: Kernel,
    /// Where listeners run: MCP requests run on rmcp's tasks, outside any
    /// actix arbiter.
    arbiter: ArbiterHandle,
    subscribe: Link<Subscribe>,
    unsubscribe: Link<Unsubscribe>,
}

impl Follow {
    pub(super) fn new(kernel: Kernel, bridge: &RedisBus, arbiter: ArbiterHandle) -> Self {
        Follow { kernel, arbiter, subscribe: bridge.link("mcp"), unsubscribe: bridge.link("mcp") }
    }

    /// A follower of nothing yet, named `name`, and where its updates arrive.
    pub(super) fn start(&self, name: &str) -> (Following, mpsc::Receiver<Update>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let id = format!("{name}-{}", uuid::Uuid::now_v7());
        let listener = {
            let overflowed = overflowed.clone();
            let listener = move || Listener { updates: tx.clone(), overflowed: overflowed.clone(), down: false };
            self.kernel.spawn_on(&self.arbiter, id.clone(), listener)
        };
        let following = Following { follow: self.clone(), id, docs: Vec::new(), listener, overflowed };
        (following, rx)
    }
}

/// The documents one follower follows, given up however it ends.
pub(super) struct Following {
    follow: Follow,
    id: String,
    docs: Vec<String>,
    listener: ActorRef<Listener>,
    overflowed: Arc<AtomicBool>,
}

impl Following {
    /// Follows `doc` too. Redis being away is no failure: the bridge
    /// subscribes again when it is back, and the `Up` that follows its
    /// `Down` announces every document.
    pub(super) async fn add(&mut self, doc: &str) -> Result<(), McpError> {
        if self.docs.iter().any(|d| d == doc) {
            return Ok(());
        }
        // Noted first: a subscription the bridge took is given up however this ends.
        self.docs.push(doc.to_owned());
        let request = Subscribe { topic: topic(doc), subscriber: self.listener.link("redis-bridge") };
        match self.follow.subscribe.ask(request).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                tracing::debug!(%doc, %error, "an MCP subscription not confirmed yet");
                Ok(())
            }
            Err(_) => {
                self.docs.pop();
                Err(McpError::internal_error("the node is stopping", None))
            }
        }
    }

    /// Stops following `doc`.
    pub(super) fn remove(&mut self, doc: &str) {
        if let Some(at) = self.docs.iter().position(|d| d == doc) {
            self.docs.swap_remove(at);
            let _ = self.follow.unsubscribe.tell(Unsubscribe { topic: topic(doc), subscriber: self.id.clone() });
        }
    }

    /// The documents followed.
    pub(super) fn docs(&self) -> &[String] {
        &self.docs
    }

    /// Whether updates came faster than they were taken from the queue.
    pub(super) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        for doc in &self.docs {
            let _ = self.follow.unsubscribe.tell(Unsubscribe { topic: topic(doc), subscriber: self.id.clone() });
        }
        self.listener.stop();
    }
}

/// What a follower's client is told about.
#[derive(Debug)]
pub(super) enum Update {
    Changed {
        doc: String,
        version: u64,
    },
    /// The bus was down: anything may have changed.
    Resync,
}

/// Adds `update` to what is to be announced: one notification per
/// document, at its latest version.
pub(super) fn merge(changed: &mut BTreeMap<String, u64>, update: Update, followed: &[String]) {
    match update {
        // A document given up since is not announced.
        Update::Changed { doc, version } if followed.contains(&doc) => {
            let at = changed.entry(doc).or_insert(version);
            *at = (*at).max(version);
        }
        Update::Changed { .. } => {}
        // Changes may have been missed while the bus was down: each document
        // is announced, at the version known if one came since, else without.
        Update::Resync => {
            for doc in followed {
                changed.entry(doc.clone()).or_insert(0);
            }
        }
    }
}

/// `notifications/resources/updated` for `doc`, with `version` in `_meta`
/// when it is known (not zero).
pub(super) fn updated(doc: &str, version: u64) -> ResourceUpdatedNotification {
    let mut notification =
        ResourceUpdatedNotification::new(ResourceUpdatedNotificationParam::new(format!("{PREFIX}{doc}")));
    if version > 0 {
        let mut meta = MetaObject::default();
        meta.0.insert("version".into(), json!(version));
        notification.extensions.insert(NotificationMetaObject(meta));
    }
    notification
}

fn topic(doc: &str) -> Topic {
    Topic::Shard(channels::document(doc))
}

/// Receives a follower's document changes from the Redis bridge.
pub(super) struct Listener {
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
    use std::time::Duration;

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

        // Nobody reads: past the queue, the follower is marked for dropping.
        for version in 0..QUEUE as u64 {
            bus.tell(change("d", version)).expect("told");
            if version % 100 == 0 {
                // The mailbox is bounded too: let the listener keep up.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!overflowed.load(Ordering::Relaxed), "a full queue is not yet an overflow");
        bus.tell(change("d", 99)).expect("told");
        raised(&overflowed).await;
    }

    #[test]
    fn merging_keeps_the_latest_version_of_followed_documents_only() {
        let followed = vec!["a".to_owned(), "b".to_owned()];
        let mut changed = BTreeMap::new();
        merge(&mut changed, Update::Changed { doc: "a".into(), version: 3 }, &followed);
        merge(&mut changed, Update::Changed { doc: "a".into(), version: 2 }, &followed);
        merge(&mut changed, Update::Changed { doc: "gone".into(), version: 9 }, &followed);
        merge(&mut changed, Update::Resync, &followed);
        assert_eq!(changed, BTreeMap::from([("a".to_owned(), 3), ("b".to_owned(), 0)]));
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
