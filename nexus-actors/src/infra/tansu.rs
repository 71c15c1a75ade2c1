//! A `tansu` Kafka-protocol broker child on a free loopback port.

use std::path::Path;
use std::time::Duration;

use super::process::{accepts, find_program, free_port, ChildProcess, InfraError};

/// Where the broker keeps its data.
#[derive(Debug, Clone)]
pub enum TansuStorage {
    /// `memory://tansu/`: nothing survives the process.
    Memory,
    /// A SQLite file `tansu.db` in the broker's directory: topics, records,
    /// producer state and committed offsets survive a restart. Needs tansu
    /// built with the `libsql` feature (see [`Tansu::supports_sqlite`]).
    Sqlite,
    /// Any storage URL tansu accepts (`postgres://…`, `s3://…`).
    Url(String),
}

impl TansuStorage {
    fn url(&self) -> String {
        match self {
            TansuStorage::Memory => "memory://tansu/".to_owned(),
            TansuStorage::Sqlite => "sqlite://tansu.db".to_owned(),
            TansuStorage::Url(u) => u.clone(),
        }
    }
}

/// A `tansu` broker child bound to 127.0.0.1; killed when dropped.
pub struct Tansu {
    process: ChildProcess,
}

impl Tansu {
    /// Starts `tansu broker` with its log in `dir`.
    pub fn start(dir: &Path, storage: TansuStorage) -> Result<Self, InfraError> {
        let program = find_program("tansu").ok_or(InfraError::NotInstalled {
            program: "tansu",
            hint: "install it with `cargo install tansu --locked --features dynostore,postgres,libsql`, or set KAFKA_BROKERS",
        })?;
        crate::platform::files::private_dir(dir)?;
        let port = free_port()?;
        let listener = format!("tcp://127.0.0.1:{port}");
        let args = vec![
            "broker".into(),
            "--listener-url".into(),
            listener.clone(),
            "--advertised-listener-url".into(),
            listener,
            "--storage-engine".into(),
            storage.url(),
        ];
        // tansu reads its settings from the environment too; keep a
        // caller's OTLP endpoint but nothing that would move its listener.
        let envs = vec![("RUST_LOG".to_owned(), "warn".to_owned())];
        let dir = std::fs::canonicalize(dir)?;
        let mut process = ChildProcess::new(program, args, envs, dir.join("tansu.log"), port).in_dir(dir);
        process.start(Duration::from_secs(20), accepts)?;
        Ok(Tansu { process })
    }

    /// Whether the installed tansu has the SQLite storage engine.
    pub fn supports_sqlite() -> bool {
        let Some(program) = find_program("tansu") else { return false };
        std::process::Command::new(program)
            .arg("--help")
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|l| l.starts_with("Storage engines:") && l.contains("libsql"))
            })
            .unwrap_or(false)
    }

    /// Its loopback port (the same across restarts).
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// The `bootstrap.servers` value for this broker.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.process.port)
    }

    /// Kills the broker, as a crash would.
    pub fn kill(&mut self) {
        self.process.stop();
    }

    /// Starts it again on the same port with the same storage.
    pub fn restart(&mut self) -> Result<(), InfraError> {
        self.process.stop();
        self.process.start(Duration::from_secs(20), accepts)
    }
}
