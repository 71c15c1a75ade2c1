//! The two buses, bridged into the mailbox graph by actors.
//!
//! [`redis::RedisBridge`] carries the transactional bus (live pub/sub,
//! at-most-once, subscribers resync on [`BusUp`]); [`kafka::KafkaBridge`]
//! carries the semantic bus (at-least-once, acknowledged, replayable).
//! This module holds what both share: the events subscribers receive, and
//! the `bus` and `kind` labels of the bus metrics ([`Bus`], [`BusErrorKind`]).

pub mod kafka;
pub mod redis;
pub mod tap;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::envelope::Envelope;
use crate::kernel::Message;
use crate::telemetry::TraceContext;

/// Which bus something came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// The transactional bus: Redis pub/sub.
    Redis,
    /// The transactional bus's sharded channels on a Redis Cluster
    /// (sharded pub/sub), when the node has one.
    RedisCluster,
    /// The semantic bus: Kafka.
    Kafka,
}

impl Bus {
    /// The bus's `bus` label in metrics and `tracing` events (`redis`, `kafka`).
    pub fn as_str(self) -> &'static str {
        match self {
            Bus::Redis => "redis",
            Bus::RedisCluster => "redis_cluster",
            Bus::Kafka => "kafka",
        }
    }
}

/// What went wrong, as the `kind` label of `nexus_bus_errors_total{bus,kind}`
/// (see [`crate::telemetry::Metrics::bus_error`]). The label strings are
/// stable: dashboards and alerts select on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BusErrorKind {
    /// `connect`: the Redis bridge could not connect (or gave up after 5 s); it retries with backoff.
    Connect,
    /// `disconnected`: the Redis bridge's pub/sub connection closed; subscribers got [`BusDown`].
    Disconnected,
    /// `decode`: a message or record read from the bus is not a valid envelope; it is not delivered.
    Decode,
    /// `subscribe`: Redis did not confirm a subscription; the next reconnection subscribes it.
    Subscribe,
    /// `unsubscribe`: Redis did not confirm dropping topics nobody follows any more.
    Unsubscribe,
    /// `publish`: Redis refused a publish, or the connection failed during it (after one retry).
    Publish,
    /// `publish_busy`: a publish refused because too many were already waiting for Redis.
    PublishBusy,
    /// `publish_unavailable`: a publish refused because the bridge is not connected to Redis.
    PublishUnavailable,
    /// `produce`: Kafka refused a record or did not acknowledge it within the produce timeout.
    Produce,
    /// `consume`: a Kafka consumer's poll failed; it tries again after a pause.
    Consume,
    /// `store_offset`: a consumer could not store an acknowledged record's offset for commit.
    StoreOffset,
    /// `commit`: a stopping consumer could not commit its stored offsets.
    Commit,
    /// `activate`: a message on the panel manager's activate channel did not decode.
    Activate,
    /// `panel_changed`: a panel change on a user's panels channel did not decode (panel manager).
    PanelChanged,
    /// `instance_control`: a message on an instance's control channel did not decode (panel manager).
    InstanceControl,
    /// `routes_read`: the traffic gateway could not read routes from Redis; the last snapshot keeps serving.
    RoutesRead,
    /// `route_decode`: a panel's route as stored in Redis did not parse; the gateway skips it.
    RouteDecode,
    /// `routes_disconnected`: the traffic gateway's route channel closed; it resubscribes and reloads.
    RoutesDisconnected,
    /// `routes_subscribe`: the traffic gateway could not subscribe to route changes; it retries.
    RoutesSubscribe,
    /// `route_changed_decode`: a message on the route-change channel did not decode.
    RouteChangedDecode,
    /// `tool_request`: a tool request from the bus did not decode.
    ToolRequest,
    /// `tool_response`: a tool response did not decode (caller side) or could not be published (sidecar side).
    ToolResponse,
    /// `tool_record`: recording a tool call's event on `semantic.events` failed.
    ToolRecord,
    /// `offset_unknown`: Kafka acknowledged a record without its offset (a
    /// retry of one the broker had written already) and it was not found on
    /// the partition's tail; the producer is told offset -1.
    OffsetUnknown,
}

impl BusErrorKind {
    /// The `kind` label.
    pub fn as_str(self) -> &'static str {
        match self {
            BusErrorKind::Connect => "connect",
            BusErrorKind::Disconnected => "disconnected",
            BusErrorKind::Decode => "decode",
            BusErrorKind::Subscribe => "subscribe",
            BusErrorKind::Unsubscribe => "unsubscribe",
            BusErrorKind::Publish => "publish",
            BusErrorKind::PublishBusy => "publish_busy",
            BusErrorKind::PublishUnavailable => "publish_unavailable",
            BusErrorKind::Produce => "produce",
            BusErrorKind::Consume => "consume",
            BusErrorKind::StoreOffset => "store_offset",
            BusErrorKind::Commit => "commit",
            BusErrorKind::Activate => "activate",
            BusErrorKind::PanelChanged => "panel_changed",
            BusErrorKind::InstanceControl => "instance_control",
            BusErrorKind::RoutesRead => "routes_read",
            BusErrorKind::RouteDecode => "route_decode",
            BusErrorKind::RoutesDisconnected => "routes_disconnected",
            BusErrorKind::RoutesSubscribe => "routes_subscribe",
            BusErrorKind::RouteChangedDecode => "route_changed_decode",
            BusErrorKind::ToolRequest => "tool_request",
            BusErrorKind::ToolResponse => "tool_response",
            BusErrorKind::ToolRecord => "tool_record",
            BusErrorKind::OffsetUnknown => "offset_unknown",
        }
    }
}

/// The bus connection was lost. Live messages published meanwhile are gone;
/// subscribers should resync from state when [`BusUp`] follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusDown {
    /// The bus that went down.
    pub bus: Bus,
    /// Why, for logs (e.g. `pub/sub connection closed`, `not connected`).
    pub reason: String,
}

/// The bus connection is back and every subscription is active again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusUp {
    /// The bus that is up.
    pub bus: Bus,
}

/// A message from a Redis channel or pattern subscription.
#[derive(Debug, Clone)]
pub struct BusMessage {
    /// The channel it was published on.
    pub channel: String,
    /// The pattern that matched, for pattern subscriptions.
    pub pattern: Option<String>,
    /// The decoded message; undecodable ones are counted and never delivered.
    pub envelope: Envelope<Value>,
}

/// What a Redis subscriber receives.
#[derive(Debug, Clone)]
pub enum BusEvent {
    /// A message on a subscribed channel or pattern, decoded once and
    /// shared by every local subscriber of it (`Arc::unwrap_or_clone`
    /// takes it without a copy when there is only one).
    Message(Arc<BusMessage>),
    /// The bus went down: resync once [`BusEvent::Up`] follows.
    Down(BusDown),
    /// The subscriptions are live (again).
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
