//! Records this node produced, handed to this node's own reader of the
//! same topic as soon as the broker acknowledges them: the reader need not
//! wait for its next fetch to bring back what was written here. A tap is
//! a shortcut, never the only path: the reader still consumes every record
//! from the broker and skips the ones it was handed, and a record that
//! finds the tap full or absent simply comes by the broker. What a reader
//! may take from a tap (only a partition's next offset, so that the order
//! is the broker's) is the reader's business, not this module's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::envelope::Envelope;
use crate::kernel::{lock, Message};

/// Records a tap holds before the next ones go by the broker only.
pub const TAP_CAPACITY: usize = 1024;

/// A record the broker acknowledged to this node's producer.
#[derive(Debug, Clone)]
pub struct Produced {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: String,
    /// Its size as produced, in bytes.
    pub bytes: usize,
    /// What was produced.
    pub envelope: Envelope<Value>,
}

/// Asks the Kafka bridge for the records it produces to `topic` from now
/// on; a later tap of the same topic replaces this one.
pub struct Tap {
    /// The topic.
    pub topic: String,
}

impl Message for Tap {
    type Reply = mpsc::Receiver<Produced>;
}

/// The taps of one producer, by topic. Cheap to clone.
#[derive(Clone, Default)]
pub struct Taps {
    by_topic: Arc<Mutex<HashMap<String, mpsc::Sender<Produced>>>>,
}

impl Taps {
    /// A new tap of `topic`, replacing any earlier one.
    pub fn open(&self, topic: String) -> mpsc::Receiver<Produced> {
        let (tx, rx) = mpsc::channel(TAP_CAPACITY);
        lock(&self.by_topic).insert(topic, tx);
        rx
    }

    /// Hands `produced` to its topic's tap, if there is room; it comes by the broker all the same.
    pub fn offer(&self, produced: Produced) {
        let mut taps = lock(&self.by_topic);
        let Some(tx) = taps.get(&produced.topic) else { return };
        if let Err(mpsc::error::TrySendError::Closed(produced)) = tx.try_send(produced) {
            taps.remove(&produced.topic);
        }
    }
}
