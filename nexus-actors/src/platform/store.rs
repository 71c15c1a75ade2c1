//! The Redis connection the platform's records live behind, and the one
//! error type of reading or writing them. Which keys hold what is the
//! business of the modules that own the records ([`super::accounts`],
//! [`super::panels`]); this module only connects and retries.

use std::future::Future;

use redis::aio::ConnectionManager;

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

/// A shared, reconnecting Redis connection. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    conn: ConnectionManager,
}

impl Redis {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        Ok(Redis { conn: client.get_connection_manager().await? })
    }

    /// A handle for one command or pipeline.
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs a read, once more if the connection had dropped: the connection
    /// manager reports a dead connection once, then reconnects. Writes are
    /// not retried this way: a write that reached Redis must not run twice.
    pub async fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        match f(self.conn.clone()).await {
            Err(e) if e.is_io_error() || e.is_connection_dropped() => Ok(f(self.conn.clone()).await?),
            result => Ok(result?),
        }
    }
}
