//! The `traffic-gateway` role: the only way in to panels.
//!
//! [`start`] wires the parts: the [`routes::RouteTable`] actor (on the
//! caller's arbiter) keeps the route snapshot in step with Redis; the
//! proxy serves HTTP on threads of its own, one runtime and one listener
//! per core (`workers`), so that proxying uses every core, never hands a
//! request between threads and never waits behind actor mailboxes.
//! [`handle`] sends each request to its part: `/p/<id>/…` to
//! the proxy (`proxy`), which asks `access` who may open the panel and
//! `paths` whether the path is the panel's own, `/heartbeat/<id>` to
//! `heartbeat`. The `activator` holds requests for Apps scaled to zero;
//! `traffic` records that a panel is used; `body`, `cookies` and `pages`
//! shape what goes through. Starting instances is the panel manager's
//! job, not the gateway's.

mod access;
mod activator;
mod body;
mod cookies;
mod heartbeat;
mod metrics;
mod pages;
mod paths;
mod proxy;
pub mod routes;
mod traffic;
mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{oneshot, watch};

use crate::kernel::{ActorRef, Kernel};
use crate::platform::auth::keys::KeyRing;
use crate::platform::{Accounts, Auth, PanelRecords, Redis, StoreError};
use access::{strip_platform_secrets, Gatekeeper};
use activator::Activator;
use body::{full, Body};
use metrics::{GatewayMetrics, RequestOutcome};
use proxy::Shared;
use routes::{Reload, RouteTable, Routes};
use traffic::Traffic;

/// Where `nexus dev` serves the gateway unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7071";

/// How the gateway runs. [`GatewayConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where the proxy listens (port 0: any free port).
    pub listen: SocketAddr,
    /// Where routes, panel records and accounts live.
    pub redis_url: String,
    /// The token-signing keys: panel cookies, bearer tokens and heartbeats
    /// are checked against them.
    pub keys: KeyRing,
    /// Requests held per App while it cold-starts; more get 503 at once.
    pub queue_per_panel: usize,
    /// How long a held request waits for an instance before its 503.
    pub activation_deadline: Duration,
    /// Request line and headers larger than this get 431.
    pub max_header_bytes: usize,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: usize,
    /// How long an instance may take to start answering (504 after).
    pub upstream_timeout: Duration,
    /// The `Retry-After` of 503 answers.
    pub retry_after: Duration,
    /// Threads of the proxy, each with its own runtime and listener.
    pub threads: usize,
    /// How long a stopping gateway lets the requests in flight finish.
    pub drain_timeout: Duration,
}

impl GatewayConfig {
    /// The defaults: listen on `listen`, read Redis at `redis_url`, check
    /// tokens under `keys`.
    pub fn new(listen: SocketAddr, redis_url: impl Into<String>, keys: KeyRing) -> Self {
        GatewayConfig {
            listen,
            redis_url: redis_url.into(),
            keys,
            queue_per_panel: 100,
            activation_deadline: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(60),
            retry_after: Duration::from_secs(5),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Redis could not be reached for the routes.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis could not be reached for the accounts and panel records.
    #[error("connecting to the accounts and panel records: {0}")]
    Records(#[from] StoreError),
    /// The metric families are registered already.
    #[error("registering the gateway's metrics (one gateway per node): {0}")]
    Metrics(#[from] prometheus::Error),
    /// The proxy's runtime or thread could not start.
    #[error("starting the proxy's runtime: {0}")]
    Runtime(std::io::Error),
    /// The proxy's thread ended before it listened.
    #[error("the proxy thread ended before it was ready")]
    ProxyGone,
}

/// A running gateway. Dropping it stops it too, without waiting.
pub struct Gateway {
    local_addr: SocketAddr,
    routes: Routes,
    table: ActorRef<RouteTable>,
    stop: watch::Sender<bool>,
    stopped: Option<oneshot::Receiver<()>>,
}

impl Gateway {
    /// The address the proxy listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The routes as this gateway sees them.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The actor that keeps [`Gateway::routes`] in step with Redis.
    pub fn route_table(&self) -> &ActorRef<RouteTable> {
        &self.table
    }

    /// Stops accepting, lets the requests in flight finish (for up to the
    /// drain timeout; idle connections close at once), drops the route
    /// table, and waits until the proxy's threads are gone.
    pub async fn stop(mut self) {
        self.signal_stop();
        if let Some(stopped) = self.stopped.take() {
            let _ = stopped.await;
        }
    }

    fn signal_stop(&self) {
        let _ = self.stop.send(true);
        self.table.stop();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// Starts the gateway: loads the routes, then listens on `config.listen`.
/// Call it inside the actix system; the route table runs on the current
/// arbiter.
pub async fn start(kernel: &Kernel, config: GatewayConfig) -> Result<Gateway, GatewayError> {
    let metrics = GatewayMetrics::register(kernel.metrics().registry())?;
    let client = redis::Client::open(config.redis_url.as_str())?;
    let (stop, stop_rx) = watch::channel(false);
    let routes = Routes::new();
    let table_conn = client.get_connection_manager().await?;
    let table = RouteTable::spawn(kernel, routes.clone(), client.clone(), table_conn, stop_rx.clone());
    // Serve only once the table was read, so known panels never see a 404.
    let _ = table.link::<Reload>("traffic-gateway").ask(Reload).await;

    let listeners = workers::bind(config.listen, config.threads)
        .map_err(|source| GatewayError::Listen { addr: config.listen, source })?;
    let local_addr =
        listeners[0].local_addr().map_err(|source| GatewayError::Listen { addr: config.listen, source })?;
    let (ready, ready_rx) = oneshot::channel();
    let (stopped_tx, stopped) = oneshot::channel();
    let node = kernel.node().to_owned();
    let (shared_routes, shared_config) = (routes.clone(), config.clone());
    let make_shared = move |handle| async move {
        let (redis, auth, records) = prepare(&client, &shared_config).await?;
        let activator =
            Activator::new(shared_config.queue_per_panel, shared_routes.clone(), redis.clone(), node, metrics.clone());
        let traffic = Traffic::new(redis, handle, metrics.clone());
        let gatekeeper = Gatekeeper::new(auth.clone(), records);
        Ok(Arc::new(Shared::new(shared_routes, activator, traffic, gatekeeper, auth, metrics, shared_config)))
    };
    let serve = move |listener, shared| serve(listener, shared, stop_rx.clone());
    workers::spawn(listeners, make_shared, serve, ready, stopped_tx)?;
    match ready_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(error),
        Err(_) => return Err(GatewayError::ProxyGone),
    }
    tracing::info!(listen = %local_addr, "traffic gateway listening: /p/<panel-id>/ /heartbeat/<panel-id> /healthz");
    Ok(Gateway { local_addr, routes, table, stop, stopped: Some(stopped) })
}

/// What the proxy needs from inside its own runtime: Redis connections
/// whose drivers run there (for traffic signals and activations, and for
/// the accounts and panel records access is checked against).
async fn prepare(
    client: &redis::Client,
    config: &GatewayConfig,
) -> Result<(redis::aio::ConnectionManager, Auth, PanelRecords), GatewayError> {
    let redis = client.get_connection_manager().await?;
    let records = Redis::connect(&config.redis_url).await?;
    let auth = Auth::new(config.keys.clone(), Accounts::new(records.clone()));
    Ok((redis, auth, PanelRecords::new(records)))
}

/// Accepts connections until `stop` turns true; then asks each open
/// connection to close after its request in flight and waits for them, for
/// up to the drain timeout. (Upgraded connections, WebSockets, are tunnels
/// of their own and end with the runtime.)
async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    // The buffer holds a request head; past it hyper answers a bare 431.
    // Heads between the configured limit and the buffer get our own page.
    http.max_buf_size(shared.config.max_header_bytes.saturating_mul(2).max(8192))
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Reap the connections that ended, so the set holds only open ones.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause, not spin.
                    tracing::warn!(%error, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let service = hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(shared, req, peer).await) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let mut stopping = stop.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => Some(ended),
                _ = stopping.wait_for(|stopped| *stopped) => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%peer, %error, "gateway connection ended with an error");
            }
        });
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(shared.config.drain_timeout, drained).await.is_err() {
        tracing::warn!(left = connections.len(), "gateway stopping with requests still in flight");
    }
}

/// Handles one request from `peer`: the gateway's own paths, or a panel's.
/// Never fails: every error is a page.
async fn handle(shared: Arc<Shared>, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let html = pages::wants_html(req.headers());
    if header_bytes(&req) > shared.config.max_header_bytes {
        shared.metrics.request(RequestOutcome::HeadersTooLarge, "");
        let message = format!("the request's headers are larger than {} bytes", shared.config.max_header_bytes);
        return pages::error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, &message, html, None);
    }
    // Only the platform may send these, never a client, whatever the path.
    strip_platform_secrets(req.headers_mut());
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        let body = serde_json::json!({ "status": "ok", "routes": shared.routes.snapshot().len() }).to_string();
        let mut response = Response::new(full(body));
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return response;
    }
    if let Some(panel) = path.strip_prefix("/heartbeat/").filter(|p| !p.is_empty() && !p.contains('/')) {
        return heartbeat::heartbeat(&shared, req, panel).await;
    }
    match path.strip_prefix("/p/") {
        Some(rest) => proxy::panel_request(&shared, req, rest, peer).await,
        None => {
            shared.metrics.request(RequestOutcome::NotFound, "");
            pages::error(StatusCode::NOT_FOUND, "nothing here; panels are under /p/<panel-id>/", html, None)
        }
    }
}

/// Bytes of the request line and headers, roughly as sent.
fn header_bytes<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    line + req.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>()
}
