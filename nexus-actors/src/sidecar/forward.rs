//! TCP forwards from the host into a panel instance's network namespace:
//! how the gateway reaches the panel (8080) and the watchdog (9999) inside,
//! as it would reach a Pod IP. Each forward listens on a host loopback
//! address and copies every connection's bytes, both ways and untouched, to
//! `127.0.0.1:PORT` inside the namespace (on the host without one), so HTTP
//! keep-alive and WebSocket upgrades pass through. It parses nothing and
//! never decides who may connect: the gateway in front of it does.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};

use crate::netns::NetnsThread;
use crate::telemetry::Metrics;

/// One `--forward HOST_ADDR=PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// Where it listens on the host (loopback only).
    pub host: SocketAddr,
    /// The port on `127.0.0.1` inside the namespace it forwards to.
    pub port: u16,
}

/// Why a forward could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Not `HOST_ADDR=PORT`.
    #[error("expected HOST_ADDR=PORT (e.g. 127.0.0.1:18080=8080), got {0:?}")]
    Syntax(String),
    /// The host side is not a loopback address.
    #[error("a forward listens on loopback only; {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    /// The host side could not listen.
    #[error("listening on {addr} for the forward to port {port}: {source}")]
    Bind {
        /// The host address.
        addr: SocketAddr,
        /// The port inside.
        port: u16,
        /// What failed.
        source: io::Error,
    },
}

/// Where a forwarded connection failed, the `stage` of
/// `nexus_sidecar_forward_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Accept,
    Connect,
    Copy,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::Accept => "accept",
            Stage::Connect => "connect",
            Stage::Copy => "copy",
        }
    }
}

impl std::str::FromStr for Forward {
    type Err = ForwardError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || ForwardError::Syntax(text.to_owned());
        let (host, port) = text.split_once('=').ok_or_else(syntax)?;
        let host: SocketAddr = host.trim().parse().map_err(|_| syntax())?;
        let port: u16 = port.trim().parse().map_err(|_| syntax())?;
        if port == 0 {
            return Err(syntax());
        }
        Ok(Forward { host, port })
    }
}

/// Where the forwarded connections are opened.
#[derive(Clone)]
pub enum Inside {
    /// In the panel instance's namespace.
    Netns(NetnsThread),
    /// On the host's own loopback (no namespace: tests, no root).
    Host,
}

impl Inside {
    async fn connect(&self, port: u16) -> io::Result<TcpStream> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match self {
            Inside::Host => TcpStream::connect(addr).await,
            Inside::Netns(thread) => {
                let thread = thread.clone();
                // The connect runs on the namespace's thread; waiting for it
                // must not hold up this runtime's other connections.
                let stream =
                    tokio::task::spawn_blocking(move || thread.connect(addr)).await.map_err(io::Error::other)??;
                TcpStream::from_std(stream)
            }
        }
    }
}

/// A bound forward, ready to [`serve`](BoundForward::serve).
pub struct BoundForward {
    listener: TcpListener,
    forward: Forward,
}

impl BoundForward {
    /// Binds the host side of `forward`.
    pub async fn bind(forward: Forward) -> Result<BoundForward, ForwardError> {
        if !forward.host.ip().is_loopback() {
            return Err(ForwardError::NotLoopback(forward.host));
        }
        let listener = TcpListener::bind(forward.host).await.map_err(|source| ForwardError::Bind {
            addr: forward.host,
            port: forward.port,
            source,
        })?;
        Ok(BoundForward { listener, forward })
    }

    /// The host address it listens on (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.forward.host)
    }

    /// The port inside the namespace it forwards to.
    pub fn port(&self) -> u16 {
        self.forward.port
    }

    /// Accepts and forwards connections until the task is dropped.
    pub async fn serve(self, inside: Inside, metrics: Metrics) {
        let port = self.forward.port;
        let label = port.to_string();
        loop {
            let client = match self.listener.accept().await {
                Ok((client, _)) => client,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    fail(&metrics, &label, Stage::Accept, &error);
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            metrics.sidecar_forward_connections.with_label_values(&[&label]).inc();
            tracing::debug!(port, "nexus_sidecar_forward_connections_total");
            let (inside, metrics, label) = (inside.clone(), metrics.clone(), label.clone());
            tokio::spawn(async move {
                let mut client = client;
                let _ = client.set_nodelay(true);
                let mut upstream = match inside.connect(port).await {
                    Ok(upstream) => upstream,
                    Err(error) => {
                        // Usually the panel is still starting: the client's
                        // connection closes and it may try again.
                        fail(&metrics, &label, Stage::Connect, &error);
                        return;
                    }
                };
                if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    // A peer resetting mid-stream is how connections often end.
                    if !matches!(error.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) {
                        fail(&metrics, &label, Stage::Copy, &error);
                    }
                }
            });
        }
    }
}

fn fail(metrics: &Metrics, port: &str, stage: Stage, error: &io::Error) {
    metrics.sidecar_forward_failures.with_label_values(&[port, stage.label()]).inc();
    tracing::debug!(port, stage = stage.label(), %error, "nexus_sidecar_forward_failures_total");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_strictly() {
        let forward: Forward = "127.0.0.1:18080=8080".parse().unwrap();
        assert_eq!(forward, Forward { host: "127.0.0.1:18080".parse().unwrap(), port: 8080 });
        for bad in ["127.0.0.1:18080", "127.0.0.1=8080", "127.0.0.1:1=0", "127.0.0.1:1=x", "=8080", ""] {
            assert!(matches!(bad.parse::<Forward>(), Err(ForwardError::Syntax(_))), "{bad:?}");
        }
    }
}
