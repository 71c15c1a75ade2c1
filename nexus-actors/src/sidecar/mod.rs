//! `nexus sidecar`: the trusted process beside one panel instance. It holds
//! the bus credentials (the panel holds none), lists the panel's tools from
//! its manifest ([`registration`]), forwards tool calls from the bus to
//! `POST /mcp/execute` and aborts the ones their callers cancel
//! ([`inbound`]), publishes what the panel posts to `/proxy` inside the
//! panel's own namespace and sends what it posts to `/progress` to the
//! caller of a running call ([`proxy`]). Its HTTP endpoints
//! listen on loopback only. It runs no role and serves no user.
//!
//! Its requests to the panel (`GET /manifest`, `POST /mcp/execute`) carry
//! the instance's secret in [`SIDECAR_TOKEN_HEADER`] when it has one, so a
//! panel can answer its own sidecar only.
//!
//! Beside a panel instance in its own network namespace (`netns`), the
//! sidecar stays on the host network, so its Redis connections stay outside,
//! while its endpoints listen inside, on the loopback the panel sees. It
//! reaches the panel at the instance's address (`--panel-url`).

pub mod inbound;
pub mod panel;
pub mod proxy;
pub mod registration;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Arbiter;
use actix_web::{web, App, HttpServer};

use crate::bus::redis::{RedisBridge, RedisBus, Subscribe, Topic, Unsubscribe};
use crate::instance::{SIDECAR_TOKEN_ENV, SIDECAR_TOKEN_HEADER};
use crate::kernel::Kernel;
use crate::netns::{NetnsError, NetnsThread};
use crate::platform::channels;
use crate::platform::{PanelRecords, StoreError};
use crate::tools::store::{ToolStore, ToolStoreError};
use inbound::{CallForwarder, Running};
use panel::PanelClient;
use proxy::{ProxyState, RateLimit};
use registration::Registrar;

/// Everything a sidecar needs to start.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The id of the panel record this instance serves.
    pub panel: String,
    /// The bus (and the panel records and tool listing).
    pub redis_url: String,
    /// Where the panel listens (`http://127.0.0.1:8080`).
    pub panel_url: String,
    /// Where `/proxy`, `/reload`, `/healthz` and `/metrics` listen (loopback
    /// only; inside `netns` when set).
    pub listen: SocketAddr,
    /// The panel instance's network namespace (`/run/netns/<name>`).
    pub netns: Option<PathBuf>,
    /// A listener on `listen` handed over as this descriptor, bound by the
    /// process that started this one; `None` binds `listen` here.
    pub listen_fd: Option<i32>,
    /// Most calls running in the panel at once.
    pub max_calls: usize,
    /// Messages a second the panel may publish.
    pub publish_rate: u32,
    /// The burst of messages it may save up.
    pub publish_burst: u32,
    /// How often the manifest is read again.
    pub poll_interval: Duration,
    /// The instance's secret, sent in [`SIDECAR_TOKEN_HEADER`] with every
    /// request to the panel; `None` sends none (a panel run by hand).
    pub token: Option<String>,
    /// How long a stopping sidecar (SIGTERM) lets running calls answer:
    /// by default the longest deadline a call may have, so a rolling
    /// restart cuts none short.
    pub drain_timeout: Duration,
}

impl SidecarConfig {
    /// The defaults for `panel` over `redis_url`: the panel on
    /// `127.0.0.1:8080`, the endpoints on `127.0.0.1:3500`, no secret.
    pub fn new(panel: impl Into<String>, redis_url: impl Into<String>) -> Self {
        SidecarConfig {
            panel: panel.into(),
            redis_url: redis_url.into(),
            panel_url: "http://127.0.0.1:8080".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 3500)),
            netns: None,
            listen_fd: None,
            max_calls: 64,
            publish_rate: 50,
            publish_burst: 100,
            poll_interval: Duration::from_secs(5),
            token: None,
            drain_timeout: crate::tools::protocol::MAX_TIMEOUT,
        }
    }

    /// This configuration with the secret from [`SIDECAR_TOKEN_ENV`] when it
    /// has none: the local driver hands it over in the environment, never
    /// on a command line.
    pub fn token_from_env(mut self) -> Self {
        if self.token.is_none() {
            self.token = std::env::var(SIDECAR_TOKEN_ENV).ok().filter(|t| !t.is_empty());
        }
        self
    }
}

/// Why a sidecar could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// `listen` is not a loopback address.
    #[error("the sidecar listens on loopback only; {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    /// No panel record has this id.
    #[error("no panel record has id {0:?}: create the panel first (POST /api/panels)")]
    UnknownPanel(String),
    /// The secret is not a valid header value.
    #[error("the sidecar secret must be visible ASCII")]
    BadToken,
    /// The bus could not be reached.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The panel records could not be read.
    #[error("panel records: {0}")]
    Store(#[from] StoreError),
    /// The tool listing could not be reached.
    #[error("tool listing: {0}")]
    Tools(#[from] ToolStoreError),
    /// The panel's call channel could not be subscribed to.
    #[error("subscribing to the panel's call channel failed: {0}")]
    Subscribe(String),
    /// The instance's namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The HTTP endpoints failed.
    #[error("http on {addr}: {source}")]
    Http {
        /// Where they listen.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
}

/// Runs the sidecar until it is stopped (Ctrl-C or SIGTERM); then the
/// panel's tools leave the listing. The secret, unless the configuration
/// has one, comes from [`SIDECAR_TOKEN_ENV`].
pub async fn run(config: SidecarConfig) -> Result<(), SidecarError> {
    start(config.token_from_env()).await?.run().await
}

/// A started sidecar: connected, subscribed, listening.
pub struct Sidecar {
    server: actix_web::dev::Server,
    registrar: Registrar,
    polling_task: tokio::task::JoinHandle<()>,
    listen: SocketAddr,
    bridge: RedisBus,
    bridge_arbiter: Arbiter,
    calls: Topic,
    forwarder: String,
    in_flight: Arc<AtomicUsize>,
    drain_timeout: Duration,
}

impl Sidecar {
    /// Stops the sidecar (as SIGTERM does) when called.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Where `/proxy` and the other endpoints listen (inside the namespace
    /// when there is one).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Serves until stopped; then takes no more calls, lets the running
    /// ones answer (for up to the drain timeout) and takes the tools out of
    /// the listing.
    pub async fn run(self) -> Result<(), SidecarError> {
        let served = self.server.await;
        self.polling_task.abort();
        let unsubscribe = Unsubscribe { topic: self.calls, subscriber: self.forwarder };
        let _ = self.bridge.link::<Unsubscribe>("sidecar").ask(unsubscribe).await;
        let drained = tokio::time::timeout(self.drain_timeout, async {
            while self.in_flight.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        if drained.await.is_err() {
            let left = self.in_flight.load(Ordering::SeqCst);
            tracing::warn!(left, "stopping with calls still running; their callers will time out");
        }
        self.registrar.unlist().await;
        self.bridge_arbiter.stop();
        served.map_err(|source| SidecarError::Http { addr: self.listen, source })
    }
}

/// Connects, subscribes to the panel's call channel and binds the
/// endpoints; [`Sidecar::run`] serves.
pub async fn start(config: SidecarConfig) -> Result<Sidecar, SidecarError> {
    if !config.listen.ip().is_loopback() {
        return Err(SidecarError::NotLoopback(config.listen));
    }
    let inside = match &config.netns {
        Some(path) => Some(NetnsThread::enter(path)?),
        None => None,
    };
    let panel_record = PanelRecords::connect(&config.redis_url)
        .await?
        .get(&config.panel)
        .await?
        .ok_or_else(|| SidecarError::UnknownPanel(config.panel.clone()))?;
    let kernel = Kernel::new(format!("sidecar-{}", config.panel));
    let tools = ToolStore::connect(&config.redis_url).await?;
    let bridge_arbiter = Arbiter::new();
    let bridge = RedisBridge::spawn(&kernel, &bridge_arbiter.handle(), &config.redis_url)?;
    if let Some(token) = &config.token {
        if http::HeaderValue::from_str(token).is_err() || token.is_empty() {
            return Err(SidecarError::BadToken);
        }
    }
    let client = PanelClient::new(&config.panel_url, &config.panel, config.token.clone());

    let in_flight: Arc<AtomicUsize> = Arc::default();
    let running = Running::default();
    let forwarder = {
        let (kernel, client, tools) = (kernel.clone(), client.clone(), tools.clone());
        let (panel_id, publish) = (config.panel.clone(), bridge.publisher.clone());
        let (in_flight, running) = (in_flight.clone(), running.clone());
        let max_calls = config.max_calls.max(1);
        kernel.clone().spawn(CallForwarder::KIND, move || CallForwarder {
            kernel: kernel.clone(),
            panel_id: panel_id.clone(),
            panel: client.clone(),
            store: tools.clone(),
            publish: publish.clone(),
            in_flight: Arc::clone(&in_flight),
            max_calls,
            running: running.clone(),
        })
    };
    let subscriber = forwarder.link("redis-bridge");
    let calls = Topic::Channel(channels::panel_calls(&config.panel));
    match bridge.link::<Subscribe>("sidecar").ask(Subscribe { topic: calls.clone(), subscriber }).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(SidecarError::Subscribe(e.to_string())),
        Err(e) => return Err(SidecarError::Subscribe(e.to_string())),
    }

    let ttl = (config.poll_interval * 3).max(Duration::from_secs(15));
    let registrar = Registrar::new(&config.panel, &panel_record.owner, client, tools, kernel.metrics().clone(), ttl);
    let polling_task = actix::spawn(registrar.clone().run(config.poll_interval));

    let state = web::Data::new(ProxyState {
        kernel: kernel.clone(),
        panel_id: config.panel.clone(),
        publish: bridge.publisher.clone(),
        limit: RateLimit::new(config.publish_rate, config.publish_burst),
        registrar: registrar.clone(),
        running,
    });
    let http_error = |source| SidecarError::Http { addr: config.listen, source };
    let server =
        HttpServer::new(move || App::new().configure(proxy::configure(state.clone()))).workers(1).shutdown_timeout(2);
    // Bound by the namespace's thread (or by the driver, before the panel
    // ran), so the panel finds it on its own loopback.
    let listener = match config.listen_fd {
        Some(fd) => NetnsThread::handed_over(fd, config.listen),
        None => NetnsThread::bind_in(inside.as_ref(), config.listen),
    }
    .map_err(http_error)?;
    let listen = listener.local_addr().map_err(http_error)?;
    let server = server.listen(listener).map_err(http_error)?;

    tracing::info!(
        panel = %config.panel,
        %listen,
        netns = ?config.netns,
        panel_url = %config.panel_url,
        secret = config.token.is_some(),
        header = SIDECAR_TOKEN_HEADER,
        "sidecar running"
    );
    Ok(Sidecar {
        server: server.run(),
        registrar,
        polling_task,
        listen,
        bridge,
        bridge_arbiter,
        calls,
        forwarder: forwarder.id().to_owned(),
        in_flight,
        drain_timeout: config.drain_timeout,
    })
}
