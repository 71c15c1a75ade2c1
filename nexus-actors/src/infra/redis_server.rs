//! A `redis-server` child on a free loopback port.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use super::process::{find_program, free_port, ChildProcess, InfraError};

/// A `redis-server` child bound to 127.0.0.1; killed when dropped.
pub struct RedisServer {
    process: ChildProcess,
}

impl RedisServer {
    /// Starts `redis-server` with its data and log in `dir`. With `persist`,
    /// it keeps an append-only file there so data survives a restart.
    pub fn start(dir: &Path, persist: bool) -> Result<Self, InfraError> {
        Self::start_on(dir, persist, free_port()?, Vec::new())
    }

    /// Starts `redis-server` on `port` with `extra` arguments after the
    /// usual ones.
    pub(crate) fn start_on(dir: &Path, persist: bool, port: u16, extra: Vec<String>) -> Result<Self, InfraError> {
        let program = find_program("redis-server").ok_or(InfraError::NotInstalled {
            program: "redis-server",
            hint: "install it with `apt-get install redis-server`, or set REDIS_URL",
        })?;
        // The append-only file holds every account and secret in Redis.
        crate::platform::files::private_dir(dir)?;
        let mut args = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            if persist { "yes" } else { "no" }.into(),
        ];
        args.extend(extra);
        let mut process = ChildProcess::new(program, args, vec![], dir.join("redis.log"), port);
        process.start(Duration::from_secs(10), pings)?;
        Ok(RedisServer { process })
    }

    /// Its loopback port (the same across restarts).
    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.process.port)
    }

    /// Kills the server, as a crash would.
    pub fn kill(&mut self) {
        self.process.stop();
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) -> Result<(), InfraError> {
        self.process.stop();
        self.process.start(Duration::from_secs(10), pings)
    }
}

/// True when a Redis server on `port` answers PING.
pub fn pings(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
