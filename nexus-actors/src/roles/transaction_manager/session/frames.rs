//! `ChangeFrames`: document changes as the frame clients receive, shared
//! by the sessions of a node. A change that a thousand local sessions follow
//! arrives once from the bus (one shared message); it is decoded and
//! serialised once here, and every session that sends it queues the same
//! bytes. It keeps the last [`KEEP`] changes by envelope id; it does not
//! decide who gets a change (each session does, from its versions).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytestring::ByteString;
use serde_json::Value;

use super::super::api::documents::DocumentChanged;
use super::super::protocol::ServerFrame;
use crate::envelope::Envelope;
use crate::kernel::lock;

/// Changes kept: enough for a burst of changes to reach every session,
/// which all handle a message within moments of each other.
pub(super) const KEEP: usize = 256;

/// A change, decoded, with its frame.
#[derive(Debug)]
pub(super) struct EncodedChange {
    /// The document.
    pub(super) doc: String,
    /// The version the change made.
    pub(super) version: u64,
    /// Whether the patch came with it (else followers fetch the version).
    pub(super) has_patch: bool,
    /// The `change` frame, ready to send.
    pub(super) frame: ByteString,
}

/// The node's recent changes; cheap to clone.
#[derive(Clone, Default)]
pub(super) struct ChangeFrames {
    recent: Arc<Mutex<Recent>>,
}

#[derive(Default)]
struct Recent {
    by_id: HashMap<String, Arc<EncodedChange>>,
    order: VecDeque<String>,
}

impl ChangeFrames {
    /// The change `envelope` announces, decoded and serialised the first
    /// time any session asks; `None` when it is not a valid change. Keyed
    /// by the envelope's id: only nodes publish on document channels.
    pub(super) fn change(&self, envelope: &Envelope<Value>) -> Option<Arc<EncodedChange>> {
        if let Some(known) = lock(&self.recent).by_id.get(&envelope.id) {
            return Some(known.clone());
        }
        let change: DocumentChanged = envelope.payload().ok()?;
        let has_patch = !change.patch.is_null();
        let (doc, version) = (change.id.clone(), change.version);
        let frame = ServerFrame::Change { doc: change.id, version, patch: change.patch }.encode();
        let encoded = Arc::new(EncodedChange { doc, version, has_patch, frame: ByteString::from(frame) });
        let mut recent = lock(&self.recent);
        if recent.by_id.insert(envelope.id.clone(), encoded.clone()).is_none() {
            recent.order.push_back(envelope.id.clone());
        }
        while recent.order.len() > KEEP {
            if let Some(oldest) = recent.order.pop_front() {
                recent.by_id.remove(&oldest);
            }
        }
        Some(encoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Payload;

    fn change(version: u64) -> Envelope<Value> {
        let patch = serde_json::json!({ "n": version });
        Envelope::new("node", DocumentChanged { id: "d".into(), version, patch }).into_untyped()
    }

    #[test]
    fn a_change_is_encoded_once_and_only_the_last_ones_are_kept() {
        let frames = ChangeFrames::default();
        let first = change(1);
        let a = frames.change(&first).unwrap();
        let b = frames.change(&first).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the second session gets the same frame");
        assert_eq!((a.doc.as_str(), a.version, a.has_patch), ("d", 1, true));
        let sent: Value = serde_json::from_str(&a.frame).unwrap();
        assert_eq!(sent, serde_json::json!({ "type": "change", "doc": "d", "version": 1, "patch": { "n": 1 } }));

        for v in 2..=(KEEP as u64 + 1) {
            frames.change(&change(v)).unwrap();
        }
        assert_eq!(lock(&frames.recent).by_id.len(), KEEP);
        let again = frames.change(&first).unwrap();
        assert!(!Arc::ptr_eq(&a, &again), "the oldest was let go and is encoded anew");

        let mut wrong = change(9);
        wrong.kind = "nexus.document.deleted".into();
        assert!(frames.change(&wrong).is_none(), "only changes");
        assert_eq!(DocumentChanged::TYPE, "nexus.document.changed");
    }
}
