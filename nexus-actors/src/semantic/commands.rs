//! Producing commands to `semantic.commands`, and the hint that follows
//! each one.
//!
//! A partition's owner (an LLM manager, maybe on another node) stops
//! fetching the partition once it has read it to the end (see the inbox),
//! so every command produced here is announced on [`HINTS`] as soon as the
//! broker acknowledged it: the owner wakes and fetches it. A hint names a
//! partition and an offset, never the command itself. Kafka stays the only
//! source of commands, so a lost, late or forged hint costs a fetch or a
//! delay (the owner also checks its partitions' ends on its own), never a
//! command lost, changed or taken twice.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bus::kafka::{Delivered, Produce, ProduceError, SEMANTIC_COMMANDS};
use crate::bus::redis::Publisher;
use crate::envelope::{Envelope, Payload};
use crate::kernel::{AskError, Link};

/// The Redis channel of command hints.
pub const HINTS: &str = "nexus:semantic:commands";

/// A hint: the broker acknowledged a command at `offset` of `partition`.
/// Fields a later version adds are ignored, so nodes of two versions
/// understand each other's hints during a rolling upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandProduced {
    /// Its partition of `semantic.commands`.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
}

impl Payload for CommandProduced {
    const TYPE: &'static str = "nexus.semantic.command_produced";
}

impl CommandProduced {
    /// The hint a bus message holds, if it is one.
    pub fn from_envelope(envelope: &Envelope<Value>) -> Option<CommandProduced> {
        // Serde would read a struct from an array too; a hint is an object.
        if !envelope.data.is_object() {
            return None;
        }
        let hint: CommandProduced = envelope.payload().ok()?;
        (hint.partition >= 0 && hint.offset >= 0).then_some(hint)
    }
}

/// Why a command was not produced.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The broker refused it or did not answer in time; the envelope is in it.
    #[error(transparent)]
    Produce(Box<ProduceError>),
    /// The node's Kafka bridge is gone; the envelope, when it came back.
    #[error("the kafka bridge stopped")]
    Stopped(Option<Box<Envelope<Value>>>),
    /// The Kafka bridge failed while handling it.
    #[error("the kafka bridge failed: {0}")]
    Failed(String),
}

/// Produces commands and announces them. Cheap to clone.
#[derive(Clone)]
pub struct CommandSender {
    source: String,
    produce: Link<Produce>,
    hints: Publisher,
}

impl CommandSender {
    /// Commands through `produce`, hinted through `hints`, as from node `source`.
    pub fn new(source: impl Into<String>, produce: Link<Produce>, hints: Publisher) -> Self {
        CommandSender { source: source.into(), produce, hints }
    }

    /// Produces `envelope` under key `context`, then announces it; where the broker put it.
    pub async fn send(&self, context: &str, envelope: Envelope<Value>) -> Result<Delivered, CommandError> {
        let produce = Produce { topic: SEMANTIC_COMMANDS.to_owned(), key: context.to_owned(), envelope };
        let delivered = match self.produce.ask(produce).await {
            Ok(delivered) => delivered.map_err(|e| CommandError::Produce(Box::new(e)))?,
            Err(AskError::Closed(unsent)) => return Err(CommandError::Stopped(Some(Box::new(unsent.envelope)))),
            Err(AskError::Dropped) => return Err(CommandError::Stopped(None)),
            Err(AskError::Panicked(p)) => return Err(CommandError::Failed(p.to_string())),
        };
        // A broker that acknowledged without an offset (a retry across its
        // restart) leaves the owner to find the command by its own checks.
        if delivered.offset >= 0 {
            let hint = CommandProduced { partition: delivered.partition, offset: delivered.offset };
            self.hints.publish_detached(HINTS, Envelope::new(self.source.clone(), hint).into_untyped());
        }
        Ok(delivered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(kind: &str, data: Value) -> Envelope<Value> {
        let mut envelope = Envelope::new("n".to_owned(), CommandProduced { partition: 0, offset: 0 }).into_untyped();
        envelope.kind = kind.to_owned();
        envelope.data = data;
        envelope
    }

    #[test]
    fn only_well_formed_hints_are_read() {
        let ok = envelope(CommandProduced::TYPE, serde_json::json!({"partition": 2, "offset": 41}));
        assert_eq!(CommandProduced::from_envelope(&ok), Some(CommandProduced { partition: 2, offset: 41 }));
        let newer = envelope(CommandProduced::TYPE, serde_json::json!({"partition": 2, "offset": 41, "epoch": 3}));
        assert_eq!(CommandProduced::from_envelope(&newer), Some(CommandProduced { partition: 2, offset: 41 }));
        for (kind, data) in [
            ("nexus.other", serde_json::json!({"partition": 2, "offset": 41})),
            (CommandProduced::TYPE, serde_json::json!({"partition": -1, "offset": 41})),
            (CommandProduced::TYPE, serde_json::json!({"partition": 1, "offset": -5})),
            (CommandProduced::TYPE, serde_json::json!({"partition": "1", "offset": 5})),
            (CommandProduced::TYPE, serde_json::json!({"partition": 1})),
            (CommandProduced::TYPE, serde_json::json!([1, 5])),
        ] {
            assert_eq!(CommandProduced::from_envelope(&envelope(kind, data.clone())), None, "{kind} {data}");
        }
    }
}
