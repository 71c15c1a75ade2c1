//! How `nexus dev` finds or starts its brokers, most explicit first.

use std::path::Path;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use super::process::{find_program, InfraError};
use super::redis_server::pings;
use super::{RedisServer, Tansu, TansuStorage};
use crate::bus::kafka::{SEMANTIC_COMMANDS, SEMANTIC_EVENTS};

/// The Redis `nexus dev` uses, and the child serving it if it started one.
pub struct DevRedis {
    /// The URL to connect to.
    pub url: String,
    /// Where it came from, for the start-up banner.
    pub origin: String,
    _server: Option<RedisServer>,
}

/// `REDIS_URL`; else a server answering on 127.0.0.1:6379; else a
/// `redis-server` child with an append-only file under `data_dir/redis`.
pub fn redis(data_dir: &Path) -> Result<DevRedis, InfraError> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Ok(DevRedis { url, origin: "from REDIS_URL".into(), _server: None });
    }
    if pings(6379) {
        return Ok(DevRedis {
            url: "redis://127.0.0.1:6379/".into(),
            origin: "the server already on 127.0.0.1:6379".into(),
            _server: None,
        });
    }
    let dir = data_dir.join("redis");
    let server = RedisServer::start(&dir, true)?;
    Ok(DevRedis {
        url: server.url(),
        origin: format!("redis-server child, data in {}", dir.display()),
        _server: Some(server),
    })
}

/// The Kafka brokers `nexus dev` uses, and what serves them.
pub struct DevKafka {
    /// The `bootstrap.servers` value.
    pub brokers: String,
    /// Where they came from, for the start-up banner.
    pub origin: String,
    _tansu: Option<Tansu>,
    _mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

/// `KAFKA_BROKERS`; else a `tansu` child with its data and log under
/// `data_dir/tansu` (SQLite storage when tansu has it, else memory); else
/// librdkafka's in-process mock cluster.
pub fn kafka(data_dir: &Path) -> Result<DevKafka, InfraError> {
    if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
        return Ok(DevKafka { brokers, origin: "from KAFKA_BROKERS".into(), _tansu: None, _mock: None });
    }
    if find_program("tansu").is_some() {
        let dir = data_dir.join("tansu");
        let (storage, origin) = if Tansu::supports_sqlite() {
            (TansuStorage::Sqlite, format!("tansu child, data in {}/tansu.db", dir.display()))
        } else {
            (TansuStorage::Memory, "tansu child, memory storage: kept only while nexus dev runs".to_owned())
        };
        let tansu = Tansu::start(&dir, storage)?;
        return Ok(DevKafka { brokers: tansu.brokers(), origin, _tansu: Some(tansu), _mock: None });
    }
    let mock = MockCluster::new(1).map_err(|e| InfraError::Io(std::io::Error::other(e)))?;
    for topic in [SEMANTIC_COMMANDS, SEMANTIC_EVENTS] {
        mock.create_topic(topic, 3, 1).map_err(|e| InfraError::Io(std::io::Error::other(e)))?;
    }
    tracing::warn!(
        "tansu is not installed: using librdkafka's in-process MOCK cluster. It keeps nothing, is slow \
         (a few thousand messages/s) and may stall. Install tansu: \
         cargo install tansu --locked --features dynostore,postgres,libsql"
    );
    Ok(DevKafka {
        brokers: mock.bootstrap_servers(),
        origin: "librdkafka MOCK cluster: keeps nothing; install tansu for a real broker".into(),
        _tansu: None,
        _mock: Some(mock),
    })
}

/// Prepares `nexus dev`'s data directory: others may pass through it to
/// a panel's own volume below, but not list or read it (`0711`).
pub fn data_dir(data_dir: &Path) -> Result<(), InfraError> {
    Ok(crate::platform::files::passable_dir(data_dir)?)
}

/// The first user's password: read from `data_dir/admin-password`, or
/// generated and written there on first start, `0600` from its first byte.
pub fn admin_password(data_dir: &Path) -> Result<String, InfraError> {
    let path = data_dir.join("admin-password");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if !existing.trim().is_empty() {
            return Ok(existing.trim().to_owned());
        }
    }
    let password: String = {
        use rand::Rng;
        rand::thread_rng().sample_iter(&rand::distributions::Alphanumeric).take(20).map(char::from).collect()
    };
    crate::platform::files::write_secret(&path, password.as_bytes())?;
    Ok(password)
}
