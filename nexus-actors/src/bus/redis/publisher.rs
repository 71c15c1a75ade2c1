//! `Publisher`: publishing on the transactional bus from the caller's own
//! task.
//!
//! A publish goes straight onto a publishing connection of the caller's own
//! thread: a multiplexed connection, made on that thread on its first
//! publish, that writes the commands of every caller waiting at that moment
//! in one batch and matches the replies in order (pipelining). Neither the
//! command nor its reply crosses to another thread (a thread wakeup costs
//! more than the publish), and nothing goes through the bridge's mailbox.
//! A node thus holds one publishing connection per thread that publishes
//! (its arbiters and HTTP workers). The bridge only says whether the bus is
//! up: while its pub/sub connection is down a publish is refused at once.
//! This module does not subscribe or deliver.
//!
//! A [`Topic::Shard`](super::Topic::Shard) channel is published with
//! [`Publisher::publish_shard`]: on the bridge's Redis Cluster connection
//! (`SPUBLISH`, to the master of the channel's slot) when it has one, else
//! as any other channel.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;

use super::topic_label;
use crate::bus::{Bus, BusErrorKind};
use crate::envelope::Envelope;
use crate::telemetry::Metrics;

/// Publishes waiting for Redis at once, across every clone of a
/// [`Publisher`]. Past this a publish is refused at once (handed back,
/// counted) rather than queued without bound until the connection's
/// response timeout fails them all.
pub const MAX_PUBLISHES_IN_FLIGHT: usize = 1024;

/// Why a publish did not happen. The envelope is handed back.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The bridge is not connected to Redis.
    #[error("redis is unavailable")]
    Unavailable(Envelope),
    /// [`MAX_PUBLISHES_IN_FLIGHT`] publishes are already waiting for Redis.
    #[error("too many publishes in flight")]
    Busy(Envelope),
    /// Redis refused the publish, or the connection failed during it.
    #[error("redis publish failed: {source}")]
    Redis {
        /// What was not published.
        envelope: Envelope,
        /// Why.
        source: redis::RedisError,
    },
}

impl PublishError {
    /// The envelope that was not published.
    pub fn into_envelope(self) -> Envelope {
        match self {
            PublishError::Unavailable(e) | PublishError::Busy(e) | PublishError::Redis { envelope: e, .. } => e,
        }
    }
}

/// The handle every publisher on a node shares with its Redis bridge.
/// Cheap to clone; all clones share the bridge's word on the bus, one
/// in-flight bound, and one connection per thread.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    /// Whether the bridge's pub/sub connection is up.
    up: AtomicBool,
    in_flight: AtomicUsize,
    metrics: Metrics,
    /// The bridge's Redis Cluster connection, once it has made one; for
    /// shard channels.
    cluster: Mutex<Option<ClusterConnection>>,
    /// Whether the bridge has a cluster at all.
    clustered: bool,
}

thread_local! {
    /// This thread's publishing connection of each publisher it used. A
    /// publisher that is gone leaves its entry until the next one is added.
    static CONNECTIONS: RefCell<Vec<(Weak<Shared>, ConnectionManager)>> = const { RefCell::new(Vec::new()) };
}

/// Counts one publish in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Publisher {
    pub(super) fn new(client: redis::Client, metrics: Metrics, clustered: bool) -> Self {
        let shared = Shared {
            client,
            up: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            metrics,
            cluster: Mutex::new(None),
            clustered,
        };
        Publisher { shared: Arc::new(shared) }
    }

    /// The bridge's cluster connection, for shard channels.
    pub(super) fn set_cluster(&self, conn: Option<ClusterConnection>) {
        *crate::kernel::lock(&self.shared.cluster) = conn;
    }

    /// The bridge's word on the bus: publish while it is up, refuse while
    /// it is down.
    pub(super) fn set_up(&self, up: bool) {
        self.shared.up.store(up, Ordering::SeqCst);
    }

    /// This thread's connection for this publisher, made on first use
    /// without waiting (it connects with its first command, and its driver
    /// task runs on this thread's runtime): publishes that start together
    /// share it instead of each opening one, and keep their order.
    fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        CONNECTIONS.with(|c| {
            let mut c = c.borrow_mut();
            let mine = c.iter().find(|(owner, _)| std::ptr::eq(owner.as_ptr(), Arc::as_ptr(&self.shared)));
            if let Some((_, conn)) = mine {
                return Ok(conn.clone());
            }
            let config = redis::aio::ConnectionManagerConfig::new();
            let conn = ConnectionManager::new_lazy_with_config(self.shared.client.clone(), config)?;
            c.retain(|(owner, _)| owner.strong_count() > 0);
            c.push((Arc::downgrade(&self.shared), conn.clone()));
            Ok(conn)
        })
    }

    /// Publishes `envelope` on `channel`; the number of Redis clients that
    /// received it.
    pub async fn publish(&self, channel: impl Into<String>, envelope: Envelope) -> Result<u64, PublishError> {
        let channel = channel.into();
        let shared = &*self.shared;
        if !shared.up.load(Ordering::SeqCst) {
            shared.metrics.bus_error(Bus::Redis, BusErrorKind::PublishUnavailable, &channel);
            return Err(PublishError::Unavailable(envelope));
        }
        let conn = self.connection();
        self.send(Bus::Redis, "PUBLISH", channel, envelope, conn).await
    }

    /// Publishes `envelope` on the shard channel `channel` (a
    /// [`Topic::Shard`](super::Topic::Shard)'s): with `SPUBLISH` on the
    /// bridge's Redis Cluster, or as [`Publisher::publish`] when it has
    /// none. The number of clients that received it.
    pub async fn publish_shard(&self, channel: impl Into<String>, envelope: Envelope) -> Result<u64, PublishError> {
        if !self.shared.clustered {
            return self.publish(channel, envelope).await;
        }
        let channel = channel.into();
        let Some(conn) = crate::kernel::lock(&self.shared.cluster).clone() else {
            self.shared.metrics.bus_error(Bus::RedisCluster, BusErrorKind::PublishUnavailable, &channel);
            return Err(PublishError::Unavailable(envelope));
        };
        self.send(Bus::RedisCluster, "SPUBLISH", channel, envelope, Ok(conn)).await
    }

    /// Sends `command` (a publish) of `envelope` on `channel` over `conn`,
    /// within the in-flight bound.
    async fn send<C: ConnectionLike>(
        &self,
        bus: Bus,
        command: &str,
        channel: String,
        envelope: Envelope,
        conn: redis::RedisResult<C>,
    ) -> Result<u64, PublishError> {
        let shared = &*self.shared;
        if shared.in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_PUBLISHES_IN_FLIGHT {
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            shared.metrics.bus_error(bus, BusErrorKind::PublishBusy, &channel);
            return Err(PublishError::Busy(envelope));
        }
        let _in_flight = InFlight(&shared.in_flight);
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(source) => {
                shared.metrics.bus_error(bus, BusErrorKind::Publish, &source);
                return Err(PublishError::Redis { envelope, source });
            }
        };
        let mut cmd = redis::cmd(command);
        cmd.arg(&channel).arg(envelope.encode());
        let mut result: redis::RedisResult<u64> = cmd.query_async(&mut conn).await;
        // A connection that died since the last command is reported once,
        // then replaced: one retry covers it. Not after a timeout: that
        // publish may have gone out, and would go twice.
        if result.as_ref().is_err_and(|e| (e.is_io_error() || e.is_connection_dropped()) && !e.is_timeout()) {
            result = cmd.query_async(&mut conn).await;
        }
        match result {
            Ok(receivers) => {
                shared.metrics.bus_published.with_label_values(&[bus.as_str(), topic_label(&channel)]).inc();
                Ok(receivers)
            }
            Err(source) => {
                shared.metrics.bus_error(bus, BusErrorKind::Publish, &source);
                Err(PublishError::Redis { envelope, source })
            }
        }
    }

    /// Publishes without waiting for the outcome, for announcements nobody
    /// retries (presence): a failure is counted in
    /// `nexus_bus_errors_total` and logged, nothing else. Needs an actix
    /// arbiter's thread (the caller's).
    pub fn publish_detached(&self, channel: impl Into<String>, envelope: Envelope) {
        let (publisher, channel) = (self.clone(), channel.into());
        actix::spawn(async move {
            let _ = publisher.publish(channel, envelope).await;
        });
    }

    /// [`Publisher::publish_shard`] without waiting for the outcome, as
    /// [`Publisher::publish_detached`].
    pub fn publish_shard_detached(&self, channel: impl Into<String>, envelope: Envelope) {
        let (publisher, channel) = (self.clone(), channel.into());
        actix::spawn(async move {
            let _ = publisher.publish_shard(channel, envelope).await;
        });
    }
}
