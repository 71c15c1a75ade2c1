//! `nexus watchdog`: beside a Studio instance, it deletes the instance
//! nobody works in any more. The Studio frontend's heartbeat (every few
//! minutes, through the gateway) reaches `POST /heartbeat`; once `timeout`
//! passes without one (startup counts as one), it asks for its own instance
//! to be deleted through an [`Expiry`] — [`RedisExpiry`] publishes
//! [`ExpireInstance`] on the instance's control channel for the panel
//! manager — and asks again every few seconds until it is stopped with the
//! instance. An expiry is final: a late heartbeat gets `410 Gone`.
//!
//! The panel's own code shares the loopback the watchdog listens on, so a
//! heartbeat only counts when it carries the instance's secret in
//! [`TOKEN_HEADER`] (which the gateway adds); without a configured token
//! every heartbeat counts (development only).
//!
//! Like the sidecar it stays on the host network (its Redis connection stays
//! outside) while its listener may be bound inside the instance's network
//! namespace. It never stops anything itself and serves nothing but
//! `POST /heartbeat`, `GET /healthz` and `GET /metrics`.
//!
//! In a Kubernetes Pod ([`KubeExpiry`]) it deletes its own Pod through the
//! API, as the only thing its ServiceAccount may do (a Role naming that
//! one Pod, and an admission policy on its instance label: see
//! `deploy/k8s/03-security.yaml`); it listens on the Pod's address there,
//! which only a token-carrying heartbeat may use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures::future::BoxFuture;
use serde_json::json;
use tokio::time::Instant;

use crate::envelope::Envelope;
use crate::instance::ExpireInstance;
use crate::kernel::lock;
use crate::netns::{NetnsError, NetnsThread};
use crate::platform::channels;
use crate::telemetry::Metrics;

/// How often an expired watchdog asks again, in case nobody heard it.
pub const DEFAULT_REPEAT: Duration = Duration::from_secs(3);

/// The longest timeout accepted: far beyond any Studio session, and far
/// below what would overflow the clock's `Instant` arithmetic.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// The header a heartbeat carries the instance's secret in.
pub const TOKEN_HEADER: &str = "x-nexus-watchdog-token";

/// Everything a watchdog needs to start.
#[derive(Debug, Clone)]
pub struct WatchdogConfig {
    /// The instance it watches (and asks to delete).
    pub instance: String,
    /// The panel the instance serves, for logs.
    pub panel: String,
    /// Where `/heartbeat` listens (loopback only; inside `netns` when set).
    pub listen: SocketAddr,
    /// The instance's network namespace (`/run/netns/<name>`).
    pub netns: Option<PathBuf>,
    /// A listener on `listen` handed over as this descriptor, bound by the
    /// process that started this one; `None` binds `listen` here.
    pub listen_fd: Option<i32>,
    /// How long without a heartbeat before the instance is deleted.
    pub timeout: Duration,
    /// How often an expired watchdog asks again.
    pub repeat: Duration,
    /// The secret a heartbeat must carry in [`TOKEN_HEADER`]; `None` accepts
    /// every heartbeat.
    pub token: Option<String>,
    /// Where the expiry is published.
    pub redis_url: String,
    /// In a Kubernetes Pod: `listen` may be the Pod's address (the gateway
    /// comes from outside the Pod), when a `token` guards it.
    pub pod_network: bool,
}

impl WatchdogConfig {
    /// Listens on `127.0.0.1:9999`, expires after 30 minutes.
    pub fn new(instance: impl Into<String>, panel: impl Into<String>, redis_url: impl Into<String>) -> Self {
        WatchdogConfig {
            instance: instance.into(),
            panel: panel.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 9999)),
            netns: None,
            listen_fd: None,
            timeout: Duration::from_secs(30 * 60),
            repeat: DEFAULT_REPEAT,
            token: None,
            redis_url: redis_url.into(),
            pod_network: false,
        }
    }
}

/// Why a watchdog could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    /// `listen` is not a loopback address (and not a Pod's with a token).
    #[error(
        "the watchdog listens on loopback only, or in a Kubernetes Pod with a heartbeat token; {0} is not a \
         loopback address"
    )]
    NotLoopback(SocketAddr),
    /// A timeout under a second.
    #[error("the timeout must be at least a second")]
    TimeoutTooShort,
    /// A timeout over [`MAX_TIMEOUT`].
    #[error("the timeout must be at most {} s (30 days), not {} s", MAX_TIMEOUT.as_secs(), .0.as_secs())]
    TimeoutTooLong(Duration),
    /// An empty token would let everything through.
    #[error("the heartbeat token must not be empty")]
    EmptyToken,
    /// The watchdog's own counters.
    #[error("registering the watchdog's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The instance's namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The expiry channel could not be reached at start.
    #[error(transparent)]
    Expiry(#[from] ExpiryError),
    /// The HTTP endpoints failed.
    #[error("http on {addr}: {source}")]
    Http {
        /// Where they listen.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
}

/// Why an expiry could not be asked for.
#[derive(Debug, thiserror::Error)]
pub enum ExpiryError {
    /// Redis refused or was unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The Kubernetes API refused, or no cluster configuration was found.
    #[error("kubernetes: {0}")]
    Kube(String),
}

/// How a watchdog asks for its instance to be deleted: the local panel
/// manager over Redis now, the Kubernetes API later. Asking twice must be
/// harmless.
pub trait Expiry: Send + Sync + 'static {
    /// Asks for `instance` to be deleted, saying why.
    fn expire<'a>(&'a self, instance: &'a str, reason: &'a str) -> BoxFuture<'a, Result<(), ExpiryError>>;
}

/// Publishes [`ExpireInstance`] on the instance's control channel.
pub struct RedisExpiry {
    conn: redis::aio::ConnectionManager,
}

impl RedisExpiry {
    /// Connects once now, so a wrong URL fails the start instead of the
    /// expiry half an hour later; after that it reconnects as needed.
    pub async fn connect(redis_url: &str) -> Result<RedisExpiry, ExpiryError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_connection_timeout(Some(Duration::from_secs(2)));
        let conn = redis::Client::open(redis_url)?.get_connection_manager_with_config(config).await?;
        Ok(RedisExpiry { conn })
    }
}

impl Expiry for RedisExpiry {
    fn expire<'a>(&'a self, instance: &'a str, reason: &'a str) -> BoxFuture<'a, Result<(), ExpiryError>> {
        Box::pin(async move {
            let payload = ExpireInstance { instance: instance.to_owned(), reason: reason.to_owned() };
            let envelope = Envelope::new(format!("watchdog/{instance}"), payload);
            let mut conn = self.conn.clone();
            redis::cmd("PUBLISH")
                .arg(channels::instance_control(instance))
                .arg(envelope.encode())
                .query_async::<u64>(&mut conn)
                .await?;
            Ok(())
        })
    }
}

/// Deletes the watchdog's own Pod through the Kubernetes API (in-cluster
/// config, or `KUBECONFIG`), in the config's namespace. A Pod already gone
/// counts as deleted.
pub struct KubeExpiry {
    pods: kube::Api<k8s_openapi::api::core::v1::Pod>,
    pod: String,
}

impl KubeExpiry {
    /// Finds the cluster now, so a missing configuration fails the start.
    pub async fn infer(pod: impl Into<String>) -> Result<KubeExpiry, ExpiryError> {
        let client = kube::Client::try_default().await.map_err(|e| ExpiryError::Kube(e.to_string()))?;
        Ok(KubeExpiry { pods: kube::Api::default_namespaced(client), pod: pod.into() })
    }
}

impl Expiry for KubeExpiry {
    fn expire<'a>(&'a self, instance: &'a str, reason: &'a str) -> BoxFuture<'a, Result<(), ExpiryError>> {
        Box::pin(async move {
            tracing::info!(%instance, pod = %self.pod, %reason, "deleting this instance's pod");
            match self.pods.delete(&self.pod, &kube::api::DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                Err(error) => Err(ExpiryError::Kube(error.to_string())),
            }
        })
    }
}

/// The heartbeat clock.
struct Clock {
    last: Instant,
    expired: bool,
}

struct Shared {
    instance: String,
    timeout: Duration,
    token: Option<String>,
    clock: Mutex<Clock>,
    metrics: Metrics,
    /// `nexus_watchdog_refused_heartbeats_total`: heartbeats without the
    /// right token (the panel's own code, most likely).
    refused: prometheus::IntCounter,
}

impl Shared {
    /// Seconds left, or `None` once expired (marking it so when due).
    fn remaining(&self) -> Option<Duration> {
        let mut clock = lock(&self.clock);
        let left = (clock.last + self.timeout).saturating_duration_since(Instant::now());
        if left.is_zero() {
            clock.expired = true;
        }
        (!clock.expired).then_some(left)
    }

    /// Resets the clock unless it already ran out.
    fn heartbeat(&self) -> Option<Duration> {
        let mut clock = lock(&self.clock);
        let now = Instant::now();
        if clock.expired || now >= clock.last + self.timeout {
            clock.expired = true;
            return None;
        }
        clock.last = now;
        Some(self.timeout)
    }

    /// Whether `presented` is the configured token, compared in constant
    /// time so the panel's code cannot guess it byte by byte.
    fn authorized(&self, presented: Option<&[u8]>) -> bool {
        let Some(token) = &self.token else { return true };
        let Some(presented) = presented else { return false };
        let token = token.as_bytes();
        presented.len() == token.len() && presented.iter().zip(token).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
    }

    fn answer(&self, left: Option<Duration>) -> serde_json::Value {
        let expires_in_s = left.map_or(0, |left| left.as_secs());
        json!({ "instance": self.instance, "expires_in_s": expires_in_s, "expired": left.is_none() })
    }
}

/// A started watchdog: listening and counting down.
pub struct Watchdog {
    server: actix_web::dev::Server,
    timer: tokio::task::JoinHandle<()>,
    listen: SocketAddr,
}

impl Watchdog {
    /// Stops the watchdog (as SIGTERM does) when called.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Where `/heartbeat` listens (inside the namespace when there is one).
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Serves until stopped (Ctrl-C, SIGTERM or [`handle`](Self::handle)).
    pub async fn run(self) -> Result<(), WatchdogError> {
        let served = self.server.await;
        self.timer.abort();
        served.map_err(|source| WatchdogError::Http { addr: self.listen, source })
    }
}

/// Runs a watchdog that expires through Redis until it is stopped.
pub async fn run(config: WatchdogConfig) -> Result<(), WatchdogError> {
    let expiry = RedisExpiry::connect(&config.redis_url).await?;
    start(config, Arc::new(expiry)).await?.run().await
}

/// Binds the listener and starts the clock; [`Watchdog::run`] serves.
pub async fn start(config: WatchdogConfig, expiry: Arc<dyn Expiry>) -> Result<Watchdog, WatchdogError> {
    let guarded_pod = config.pod_network && config.token.is_some();
    if !config.listen.ip().is_loopback() && !guarded_pod {
        return Err(WatchdogError::NotLoopback(config.listen));
    }
    if config.timeout < Duration::from_secs(1) {
        return Err(WatchdogError::TimeoutTooShort);
    }
    if config.timeout > MAX_TIMEOUT {
        return Err(WatchdogError::TimeoutTooLong(config.timeout));
    }
    if config.token.as_deref().is_some_and(str::is_empty) {
        return Err(WatchdogError::EmptyToken);
    }
    let registry = Metrics::new();
    let refused = prometheus::IntCounter::new(
        "nexus_watchdog_refused_heartbeats_total",
        "Heartbeats refused because they lacked the instance's watchdog token",
    )?;
    registry.registry().register(Box::new(refused.clone()))?;
    let shared = Arc::new(Shared {
        instance: config.instance.clone(),
        timeout: config.timeout,
        token: config.token.clone(),
        clock: Mutex::new(Clock { last: Instant::now(), expired: false }),
        metrics: registry,
        refused,
    });
    let data = web::Data::from(shared.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .service(web::resource("/heartbeat").route(web::post().to(heartbeat)))
            .service(web::resource("/healthz").route(web::get().to(healthz)))
            .service(web::resource("/metrics").route(web::get().to(metrics)))
    })
    .workers(1)
    .shutdown_timeout(1);
    let http_error = |source| WatchdogError::Http { addr: config.listen, source };
    // Bound by a thread inside the namespace, so it is reachable only there
    // (and at the instance's address, which the namespace leads to it).
    let inside = config.netns.as_deref().map(NetnsThread::enter).transpose()?;
    let listener = match config.listen_fd {
        Some(fd) => NetnsThread::handed_over(fd, config.listen),
        None => NetnsThread::bind_in(inside.as_ref(), config.listen),
    }
    .map_err(http_error)?;
    let listen = listener.local_addr().map_err(http_error)?;
    let server = server.listen(listener).map_err(http_error)?;
    let timer = tokio::spawn(watch(shared, expiry, config.repeat.max(Duration::from_millis(100))));
    tracing::info!(
        instance = %config.instance,
        panel = %config.panel,
        %listen,
        netns = ?config.netns,
        timeout_s = config.timeout.as_secs(),
        token = config.token.is_some(),
        "watchdog running"
    );
    Ok(Watchdog { server: server.run(), timer, listen })
}

/// Sleeps until the deadline; past it asks for the deletion every `repeat`.
async fn watch(shared: Arc<Shared>, expiry: Arc<dyn Expiry>, repeat: Duration) {
    while let Some(left) = shared.remaining() {
        // A heartbeat meanwhile moves the deadline: look again when this one passes.
        tokio::time::sleep(left.max(Duration::from_millis(10))).await;
    }
    let reason = format!("no heartbeat for {} s", shared.timeout.as_secs());
    shared.metrics.watchdog_expiries.inc();
    tracing::warn!(instance = %shared.instance, %reason, "nexus_watchdog_expiries_total");
    loop {
        match expiry.expire(&shared.instance, &reason).await {
            Ok(()) => tracing::debug!(instance = %shared.instance, "asked for the instance to be deleted"),
            Err(error) => {
                tracing::warn!(instance = %shared.instance, %error, "could not ask for the deletion; retrying")
            }
        }
        tokio::time::sleep(repeat).await;
    }
}

async fn heartbeat(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    if !shared.authorized(req.headers().get(TOKEN_HEADER).map(|v| v.as_bytes())) {
        shared.refused.inc();
        tracing::warn!(instance = %shared.instance, "nexus_watchdog_refused_heartbeats_total");
        return HttpResponse::Unauthorized().json(json!({
            "error": "unauthorized",
            "message": "a heartbeat must carry the instance's watchdog token",
            "instance": shared.instance,
        }));
    }
    match shared.heartbeat() {
        Some(left) => {
            shared.metrics.watchdog_heartbeats.inc();
            tracing::debug!(instance = %shared.instance, "nexus_watchdog_heartbeats_total");
            HttpResponse::Ok().json(shared.answer(Some(left)))
        }
        None => HttpResponse::Gone().json(json!({
            "error": "expired",
            "message": "the instance went too long without a heartbeat and is being deleted; start it again",
            "instance": shared.instance,
        })),
    }
}

async fn healthz(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(shared.answer(shared.remaining()))
}

async fn metrics(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(shared.metrics.render())
}
