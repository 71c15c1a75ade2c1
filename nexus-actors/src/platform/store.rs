//! The Redis connection the platform's records live behind, and the one
//! error type of reading or writing them. Which keys hold what is the
//! business of the modules that own the records ([`super::accounts`],
//! [`super::panels`]); this module only connects and retries.
//!
//! A connection is to one Redis or to a Redis Cluster ([`Conn`]); a record
//! module that may live on a cluster keeps each command's keys in one hash
//! slot (a `{tag}` in the key names), which this module does not check.

use std::future::Future;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused the command or could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// What Redis holds does not decode as the record it should be.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the error is Redis being unreachable or still loading its
    /// data after a restart (worth retrying), as opposed to a refused
    /// command or corrupt data (final).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Redis(e) => {
                e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.code() == Some("LOADING")
            }
            StoreError::Corrupt(_) => false,
        }
    }
}

/// A connection to one Redis or to a Redis Cluster, for one command or
/// pipeline. Both reconnect by themselves; the cluster's routes each
/// command to the master of its keys' slot (and follows a failover).
#[derive(Clone)]
pub enum Conn {
    /// One Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A shared, reconnecting Redis connection. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    conn: Conn,
}

impl Redis {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        Ok(Redis { conn: Conn::Single(client.get_connection_manager().await?) })
    }

    /// Connects to the Redis Cluster that `nodes` (URLs of some of its
    /// nodes) belong to.
    pub async fn connect_cluster(nodes: &[String]) -> Result<Self, StoreError> {
        let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .response_timeout(crate::bus::redis::CLUSTER_RESPONSE_TIMEOUT)
            .build()?;
        Ok(Redis { conn: Conn::Cluster(client.get_async_connection().await?) })
    }

    /// A handle for one command or pipeline.
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Runs a read, once more if the connection had dropped: the connection
    /// manager reports a dead connection once, then reconnects. Writes are
    /// not retried this way: a write that reached Redis must not run twice.
    pub async fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        match f(self.conn.clone()).await {
            Err(e) if e.is_io_error() || e.is_connection_dropped() => Ok(f(self.conn.clone()).await?),
            result => Ok(result?),
        }
    }
}
