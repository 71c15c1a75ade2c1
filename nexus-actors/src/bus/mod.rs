//! The two buses, bridged into the mailbox graph by actors.
//!
//! [`redis::RedisBridge`] carries the transactional bus (live pub/sub,
//! at-most-once, subscribers resync on [`BusUp`]); [`kafka::KafkaBridge`]
//! carries the semantic bus (at-least-once, acknowledged, replayable).
//! This module holds what both share: the events subscribers receive.

pub mod kafka;
pub mod redis;

use std::time::Duration;

use serde_json::Value;

use crate::envelope::Envelope;
use crate::kernel::Message;
use crate::telemetry::TraceContext;

/// Which bus something came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    Redis,
    Kafka,
}

impl Bus {
    pub fn as_str(self) -> &'static str {
        match self {
            Bus::Redis => "redis",
            Bus::Kafka => "kafka",
        }
    }
}

/// The bus connection was lost. Live messages published meanwhile are gone;
/// subscribers should resync from state when [`BusUp`] follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusDown {
    pub bus: Bus,
    pub reason: String,
}

/// The bus connection is back and every subscription is active again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusUp {
    pub bus: Bus,
}

/// A message from a Redis channel or pattern subscription.
#[derive(Debug, Clone)]
pub struct BusMessage {
    pub channel: String,
    /// The pattern that matched, for pattern subscriptions.
    pub pattern: Option<String>,
    pub envelope: Envelope<Value>,
}

/// What a Redis subscriber receives.
// Messages are the common case; boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum BusEvent {
    Message(BusMessage),
    Down(BusDown),
    Up(BusUp),
}

impl Message for BusEvent {
    type Reply = ();

    fn trace_context(&self) -> Option<TraceContext> {
        match self {
            BusEvent::Message(m) => Some(m.envelope.trace_context()),
            _ => None,
        }
    }
}

/// Exponential reconnect backoff shared by the bridges.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff { attempt: 0 }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = Duration::from_millis(50).saturating_mul(1 << self.attempt.min(6));
        self.attempt += 1;
        delay.min(Duration::from_secs(3))
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}
