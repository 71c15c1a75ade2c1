//! A node: the kernel, both bus bridges, the roles it was asked to run and
//! its HTTP endpoints, wired from a [`NodeConfig`]; each role's parts are
//! started by [`roles`]. Finding or starting the brokers is not this
//! module's job (see [`crate::infra`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use actix::Arbiter;
use actix_web::{web, App};
use utoipa::OpenApi;

use crate::bus::kafka::KafkaProbe;
use crate::bus::kafka::{KafkaBridge, KafkaConfig};
use crate::bus::redis::{RedisBridge, RedisBus};
use crate::kernel::{ActorRef, Kernel};
use crate::platform::auth::keys::{KeyError, KeyRing, KeySet};
use crate::platform::auth::limiter::LoginLimits;
use crate::platform::auth::password::PasswordError;
use crate::platform::drain::Drain;
use crate::platform::http::Readiness;
use crate::platform::node_lease::{LeaseError, NodeLease};
use crate::platform::origin::OriginPolicy;
use crate::platform::server::{self, Bound, ServerOptions};
use crate::platform::{Platform, Quotas, StoreError};
use crate::roles::llm_manager::{LlmManagerConfig, LlmManagerError, LlmManagerHandle};
use crate::roles::panel_manager::kubernetes::{KubeConfig, KubeError};
use crate::roles::panel_manager::local::{Limits, NetworkConfig, SandboxChoice};
use crate::roles::panel_manager::{self as pm_role, PanelManagerError, PanelManagerHandle};
use crate::roles::traffic_gateway::{Gateway, GatewayError};
use crate::roles::transaction_manager as tm_role;
use crate::tools::registry::RegisterError;
use crate::tools::store::ToolStoreError;

mod roles;

pub use roles::start_registry;
use roles::{agent_messages, lease_name, llm_manager, panel_manager, traffic_gateway, transaction_manager};

/// The roles of the design. A node runs any subset of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `transaction-manager`: the HTTP API, accounts, WebSocket sync and
    /// document state; serves the Studio UI.
    TransactionManager,
    /// `llm-manager`: LLM contexts sharded over the partitions of `semantic.commands`.
    LlmManager,
    /// `panel-manager`: runs panel instances (the `local` driver) with their sidecars and watchdogs.
    PanelManager,
    /// `traffic-gateway`: the reverse proxy from `/p/<panel id>/` to the panel's instance,
    /// the only ingress to panels.
    TrafficGateway,
}

impl Role {
    /// Every role of the design, whether this build runs it or not.
    pub const ALL: [Role; 4] = [Role::TransactionManager, Role::LlmManager, Role::PanelManager, Role::TrafficGateway];

    /// The role's name on the command line and in logs, e.g. `panel-manager`.
    pub fn name(self) -> &'static str {
        match self {
            Role::TransactionManager => "transaction-manager",
            Role::LlmManager => "llm-manager",
            Role::PanelManager => "panel-manager",
            Role::TrafficGateway => "traffic-gateway",
        }
    }

    /// Every role: what `nexus dev` starts.
    pub fn available() -> Vec<Role> {
        Role::ALL.to_vec()
    }
}

/// Why a role name was refused.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// No role has this name (the name given).
    #[error("unknown role {0:?}; roles are transaction-manager, llm-manager, panel-manager, traffic-gateway")]
    Unknown(String),
}

impl FromStr for Role {
    type Err = RoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.name() == s).ok_or_else(|| RoleError::Unknown(s.to_owned()))
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's name: its kernel's, and the `source` of the envelopes it makes.
    pub name: String,
    /// Where its HTTP endpoints listen; port 0 takes a free one (see [`RunningNode::http`]).
    pub http: SocketAddr,
    /// The deployment's Redis (`redis://host:port/`): the transactional bus and the platform's state.
    pub redis_url: String,
    /// URLs of some nodes of a Redis Cluster that holds the documents and
    /// carries their live changes (sharded pub/sub); empty: both stay on
    /// `redis_url`.
    pub redis_cluster: Vec<String>,
    /// The deployment's Kafka brokers: the semantic bus.
    pub kafka: KafkaConfig,
    /// The roles this node runs.
    pub roles: Vec<Role>,
    /// A user the transaction manager makes sure exists with this password
    /// at start (`nexus dev`'s first user; the password file wins).
    pub first_user: Option<(String, String)>,
    /// Where the traffic gateway listens.
    pub gateway: SocketAddr,
    /// The gateway's URL as browsers reach it, for the Studio UI (default:
    /// the address this node's gateway listens on).
    pub public_gateway_url: Option<String>,
    /// How panel instances run; used when the node runs [`Role::PanelManager`].
    pub panels: PanelsConfig,
    /// The deployment's token-signing key file (watched for rotation).
    /// Required by the roles that check tokens.
    pub key_file: Option<PathBuf>,
    /// What one user may hold at once.
    pub quotas: Quotas,
    /// Origins (`scheme://host[:port]`) besides the node's own whose pages
    /// may call its MCP endpoint.
    pub allowed_origins: Vec<String>,
    /// How many failed logins are taken per address and per username.
    pub login_limits: LoginLimits,
    /// The LLM manager's model endpoints and limits; with no endpoint the
    /// role does not start and the LLM routes answer 503.
    pub llm: LlmManagerConfig,
    /// How long a draining node (SIGTERM) lets requests in flight finish,
    /// tool calls included, before it stops them ([`DEFAULT_DRAIN_TIMEOUT`]).
    pub drain_timeout: Duration,
}

/// How long a draining node waits for requests in flight unless told otherwise.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a draining node keeps accepting connections while `/readyz`
/// says it is not ready (a load balancer's next probe takes it out first).
pub const DRAIN_NOTICE: Duration = Duration::from_secs(2);

/// How long the node keeps an idle keep-alive connection open. It must
/// outlast the idle time of the pools in front of it (a load balancer's 60 s,
/// reqwest's 90 s, Node's 5 s): a server that closes first races the
/// client's next request on that socket, and the request fails with a reset.
pub const HTTP_KEEP_ALIVE: Duration = Duration::from_secs(120);

/// How the panel manager runs panel instances on this machine.
#[derive(Debug, Clone)]
pub struct PanelsConfig {
    /// Studio volumes, App snapshots, instance logs.
    pub data_dir: PathBuf,
    /// The `nexus` binary, run as each instance's sidecar and watchdog.
    pub nexus_bin: PathBuf,
    /// How user code is isolated (default [`SandboxChoice::Auto`]).
    pub sandbox: SandboxChoice,
    /// The instances' addresses and egress policy.
    pub network: NetworkConfig,
    /// What each instance may use.
    pub limits: Limits,
    /// gVisor sandboxes kept ready for App starts (local driver, under
    /// gVisor); none by default here, `nexus node` keeps 2.
    pub warm_sandboxes: usize,
    /// An App instance without requests for this long is stopped.
    pub app_idle: Duration,
    /// A Studio instance without a heartbeat for this long is deleted.
    pub watchdog_timeout: Duration,
    /// Run instances on Kubernetes (`--driver kubernetes`) rather than on
    /// this machine; `limits` and `watchdog_timeout` still apply.
    pub kubernetes: Option<KubernetesPanels>,
}

/// The `kubernetes` driver's settings.
#[derive(Debug, Clone)]
pub struct KubernetesPanels {
    /// Namespace, images, timeouts (its `limits` are replaced by the
    /// panels' own).
    pub config: KubeConfig,
    /// The operator's `dev_pod.yaml` and `prod_service.yaml`; the ones
    /// built in when `None`.
    pub templates: Option<PathBuf>,
}

impl PanelsConfig {
    /// Defaults under `data_dir`, with this very binary as sidecar.
    pub fn new(data_dir: PathBuf) -> Self {
        PanelsConfig {
            data_dir,
            nexus_bin: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("nexus")),
            sandbox: SandboxChoice::Auto,
            network: NetworkConfig::default(),
            limits: Limits::default(),
            warm_sandboxes: 0,
            app_idle: Duration::from_secs(60),
            watchdog_timeout: Duration::from_secs(30 * 60),
            kubernetes: None,
        }
    }
}

/// Why a node did not start, or stopped serving with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// `redis_url` is not a URL the Redis client accepts.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The Kafka bridge did not start: the semantic topics could not be
    /// made, or the producer could not be created.
    #[error("kafka at {brokers}: {source}")]
    Kafka {
        /// The brokers it tried.
        brokers: String,
        /// What Kafka said.
        source: rdkafka::error::KafkaError,
    },
    /// The HTTP server could not bind, or ended with an error.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        /// Where it was to listen.
        addr: SocketAddr,
        /// What the OS (or the server task) said.
        source: std::io::Error,
    },
    /// Reaching or writing the platform's state in Redis failed.
    #[error("platform state: {0}")]
    State(#[from] StoreError),
    /// The signing key file could not be read.
    #[error("token-signing keys: {0}")]
    Keys(#[from] KeyError),
    /// Roles that check tokens were asked for without a `key_file` (their names, comma-separated).
    #[error(
        "roles {0} check tokens and need the deployment's signing keys: give --jwt-key-file FILE \
         (NEXUS_JWT_KEY_FILE); make one with `nexus keys generate FILE`"
    )]
    NoKeys(String),
    /// Hashing the first user's password failed.
    #[error("hashing the first user's password: {0}")]
    Password(#[from] PasswordError),
    /// The tool registry could not reach its listing in Redis.
    #[error("tool listing: {0}")]
    Tools(#[from] ToolStoreError),
    /// A transaction manager's system tool could not be registered.
    #[error("registering a system tool: {0}")]
    Register(#[from] RegisterError),
    /// The traffic gateway did not start.
    #[error("traffic gateway: {0}")]
    Gateway(#[from] GatewayError),
    /// The panel manager did not start.
    #[error("panel manager: {0}")]
    PanelManager(#[from] PanelManagerError),
    /// The `kubernetes` driver could not start (no cluster configuration,
    /// an invalid setting, a broken template).
    #[error("kubernetes driver: {0}")]
    Kubernetes(#[from] KubeError),
    /// A metric could not be registered (its name taken twice).
    #[error("metrics: {0}")]
    Metrics(String),
    /// The LLM manager did not start.
    #[error("llm manager: {0}")]
    LlmManager(#[from] LlmManagerError),
    /// The node's name is another live node's, or could not be leased.
    #[error(transparent)]
    Name(#[from] LeaseError),
}

/// A started node's bridges, for wiring roles and for tests.
pub struct Bridges {
    /// The transactional bus.
    pub redis: RedisBus,
    /// The semantic bus.
    pub kafka: ActorRef<KafkaBridge>,
    _arbiters: Vec<Arbiter>,
}

/// Starts both bridges, each on its own arbiter (thread).
pub async fn start_bridges(kernel: &Kernel, config: &NodeConfig) -> Result<Bridges, NodeError> {
    let redis_arbiter = Arbiter::new();
    let redis =
        RedisBridge::spawn_with_cluster(kernel, &redis_arbiter.handle(), &config.redis_url, &config.redis_cluster)?;
    let kafka_arbiter = Arbiter::new();
    let kafka = KafkaBridge::spawn(kernel, &kafka_arbiter.handle(), config.kafka.clone())
        .await
        .map_err(|source| NodeError::Kafka { brokers: config.kafka.brokers.clone(), source })?;
    Ok(Bridges { redis, kafka, _arbiters: vec![redis_arbiter, kafka_arbiter] })
}

/// A node that is serving. [`RunningNode::wait`] serves until a signal
/// (Ctrl-C, SIGTERM), then drains ([`RunningNode::drain`]);
/// [`RunningNode::stop`] stops at once. All then stop the panel instances
/// this node runs and the gateway.
pub struct RunningNode {
    /// Where its HTTP endpoints listen.
    pub http: SocketAddr,
    /// Where its traffic gateway listens, if it runs one.
    pub gateway: Option<SocketAddr>,
    /// The node's kernel (metrics, mailbox graph).
    pub kernel: Kernel,
    server: actix_web::dev::ServerHandle,
    served: actix_rt::task::JoinHandle<std::io::Result<()>>,
    drain: Drain,
    /// WebSocket sessions open, waited for (their close frames) on a stop.
    sessions: tm_role::session::OpenSessions,
    drain_timeout: Duration,
    panels: Option<PanelManagerHandle>,
    gateway_role: Option<Gateway>,
    llm: Option<LlmManagerHandle>,
    lease: NodeLease,
    _bridges: Bridges,
}

impl RunningNode {
    /// Serves until Ctrl-C or SIGTERM, then drains; or until the HTTP
    /// server stops by itself, then cleans up.
    pub async fn wait(mut self) -> Result<(), NodeError> {
        tokio::select! {
            served = &mut self.served => self.finish(served, INSTANCE_STOP_GRACE).await,
            () = shutdown_signal() => self.drain().await,
        }
    }

    /// Drains, for a rolling restart: takes no new work (`/readyz` answers
    /// 503, `/ws` refuses new sessions, the LLM manager takes no new
    /// commands) and tells WebSocket clients to reconnect elsewhere (close
    /// code 1012); keeps answering for [`DRAIN_NOTICE`] so that load
    /// balancers see it is not ready; then stops accepting HTTP connections,
    /// and the gateway its own, and lets the requests in flight, tool calls
    /// and proxied requests included, finish within the drain timeout; then
    /// gives panel instances what is left of it and stops. Meanwhile
    /// the LLM turns in flight finish on this node within the same timeout,
    /// and the LLM manager leaves its partitions with what is done committed.
    pub async fn drain(mut self) -> Result<(), NodeError> {
        tracing::info!(node = %self.kernel.node(), "draining: no new work; requests in flight may finish");
        self.drain.start();
        let within = self.drain_timeout;
        let until = tokio::time::Instant::now() + DRAIN_NOTICE.min(within) + within;
        let llm = self.llm.take();
        let gateway = self.gateway_role.take();
        let turns = async move {
            if let Some(llm) = llm {
                llm.drain(within).await;
            }
        };
        let requests = async {
            tokio::time::sleep(DRAIN_NOTICE.min(within)).await;
            let gateway = async {
                if let Some(gateway) = gateway {
                    gateway.stop().await;
                }
            };
            tokio::join!(self.stop_http(), gateway).0
        };
        let ((), served) = tokio::join!(turns, requests);
        // Calls that other nodes sent to this node's sidecars may still be
        // running: each sidecar drains as on its own SIGTERM, within what is
        // left of the drain.
        let grace = instances_grace(until, tokio::time::Instant::now());
        // The name is given back only once the turns are done or left.
        self.finish(served, grace).await
    }

    /// Stops serving (letting requests in flight finish, closing
    /// WebSocket sessions with 1012 at once) and cleans up.
    pub async fn stop(self) -> Result<(), NodeError> {
        self.drain.start();
        self.stop_serving().await
    }

    /// Stops the HTTP server, letting the requests in flight finish, then
    /// what runs beside it.
    async fn stop_serving(mut self) -> Result<(), NodeError> {
        let served = self.stop_http().await;
        self.finish(served, INSTANCE_STOP_GRACE).await
    }

    /// Stops the HTTP server, letting the requests in flight finish; how it ended.
    async fn stop_http(&mut self) -> Served {
        // No new connections from here. Sessions run beside the server's
        // connections: their close frames (sent when the drain began) go
        // out before its workers stop.
        self.server.pause().await;
        // A second past the sessions' own close deadline, which ends them.
        let wait = tm_role::session::CLOSE_GRACE + Duration::from_secs(1);
        let closed = tokio::time::timeout(wait, self.sessions.closed()).await;
        if closed.is_err() {
            tracing::warn!(open = self.sessions.count(), "sessions still closing when the HTTP server stops");
        }
        self.server.stop(true).await;
        (&mut self.served).await
    }

    /// Stops what runs beside the HTTP server, once it has stopped with
    /// `served`; panel instances get `grace` before SIGKILL.
    async fn finish(self, served: Served, grace: Duration) -> Result<(), NodeError> {
        let addr = self.http;
        let served = match served {
            Ok(result) => result.map_err(|source| NodeError::Http { addr, source }),
            Err(join) => Err(NodeError::Http { addr, source: std::io::Error::other(join.to_string()) }),
        };
        // Together: the gateway must not take new traffic while the
        // instances finish what they hold, nor add its own drain after theirs.
        let instances = async {
            if let Some(handle) = self.panels {
                handle.stop_all(grace).await;
            }
        };
        let gateway = async {
            if let Some(gateway) = self.gateway_role {
                gateway.stop().await;
            }
        };
        tokio::join!(instances, gateway);
        if let Some(llm) = self.llm {
            llm.stop().await;
        }
        self.lease.release().await;
        served
    }
}

/// How long panel instances have from SIGTERM to SIGKILL on a stop that
/// is not a drain.
const INSTANCE_STOP_GRACE: Duration = Duration::from_secs(5);

/// What a drain due to end `until` leaves its panel instances at `now`:
/// the rest of the drain, and at least a second for SIGTERM to be seen.
fn instances_grace(until: tokio::time::Instant, now: tokio::time::Instant) -> Duration {
    until.saturating_duration_since(now).max(Duration::from_secs(1))
}

/// How the HTTP server's task ended.
type Served = Result<std::io::Result<()>, actix_rt::task::JoinError>;

/// Resolves on Ctrl-C or SIGTERM; never when neither can be watched.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Runs a node until its HTTP server stops (Ctrl-C or SIGTERM); then a
/// panel manager stops the instances it runs.
pub async fn run(config: NodeConfig) -> Result<(), NodeError> {
    start(config).await?.wait().await
}

/// The roles of `config` that check tokens.
fn needs_keys(roles: &[Role]) -> Vec<&'static str> {
    let checks = [Role::TransactionManager, Role::PanelManager, Role::TrafficGateway];
    roles.iter().filter(|r| checks.contains(r)).map(|r| r.name()).collect()
}

/// The node's signing keys, watched for rotation, if it was given a file.
fn keys(config: &NodeConfig) -> Result<KeyRing, NodeError> {
    let Some(path) = &config.key_file else {
        let roles = needs_keys(&config.roles);
        if roles.is_empty() {
            // Nothing here issues or checks a token; an empty ring refuses all.
            return Ok(KeyRing::new(KeySet { keys: Vec::new() }));
        }
        return Err(NodeError::NoKeys(roles.join(", ")));
    };
    let ring = KeyRing::new(KeySet::load(path)?);
    ring.watch(path.clone());
    Ok(ring)
}

/// Starts a node: bridges, roles and HTTP endpoints, all listening when
/// it returns.
pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
    match crate::platform::open_files::raise_to_hard() {
        Ok((before, after)) => tracing::info!(before, after, "open-file limit (soft) raised to the hard limit"),
        Err(error) => tracing::warn!(%error, "open-file limit left as it is"),
    }
    let keys = keys(&config)?;
    let kernel = Kernel::new(config.name.clone());
    let bridges = start_bridges(&kernel, &config).await?;
    let platform = Platform::connect(&config.redis_url, keys.clone(), config.quotas).await?;
    let lease = lease_name(&kernel, &config, &platform).await?;
    let registry = start_registry(&kernel, &config, &bridges).await?;
    let gateway = match config.roles.contains(&Role::TrafficGateway) {
        true => Some(traffic_gateway(&kernel, &config, keys.clone()).await?),
        false => None,
    };
    let gateway_addr = gateway.as_ref().map(Gateway::local_addr);
    let gateway_url = config.public_gateway_url.clone().or(gateway_addr.map(|a| format!("http://{a}")));
    let tm = match config.roles.contains(&Role::TransactionManager) {
        true => Some(web::Data::new(
            transaction_manager(&kernel, &config, &platform, &bridges, &registry, gateway_url).await?,
        )),
        false => None,
    };
    let panels = match config.roles.contains(&Role::PanelManager) {
        true => Some(panel_manager(&kernel, &config, &bridges).await?),
        false => None,
    };
    if tm.is_some() {
        agent_messages(&kernel, &config, &platform, &bridges)?;
    }
    let llm = match config.roles.contains(&Role::LlmManager) {
        true => llm_manager(&kernel, &config, &platform, &bridges, &registry).await?,
        false => None,
    };
    let drain = Drain::default();
    let readiness = Readiness {
        redis: Some(platform.redis.clone()),
        kafka: KafkaProbe::new(&config.kafka).ok(),
        drain: drain.clone(),
    };
    let tools = tm_role::tools_api::ToolsApi::new(&registry, "http");
    let sessions = tm_role::session::SessionDeps::new(kernel.clone(), bridges.redis.clone(), drain.clone());
    let roles: Vec<&str> = config.roles.iter().map(|r| r.name()).collect();
    let mut openapi = tm_role::openapi();
    openapi.merge(pm_role::api::PanelManagerApiDoc::openapi());
    openapi.merge(pm_role::files_api::FilesApiDoc::openapi());
    let k = kernel.clone();
    let pm_api = panels.clone().map(|handle| (handle, platform.panels.clone()));
    let auth = platform.auth.clone();
    let origins = OriginPolicy::for_listener(config.http, config.allowed_origins.clone());
    let open_sessions = sessions.open();
    let listens = tm
        .as_ref()
        .map(|_| tm_role::mcp::Listens::new(kernel.clone(), &bridges.redis, actix::Arbiter::current(), drain.clone()));
    let mcp_sessions = tm.as_ref().map(|_| tm_role::mcp::Sessions::new(&kernel, listens.as_ref(), &drain));
    let upgrades = tm.clone().map(|state| tm_role::session::upgrades(state, sessions));
    let options = ServerOptions { workers: 2, keep_alive: HTTP_KEEP_ALIVE, shutdown_timeout: config.drain_timeout };
    let app = move || {
        let mut app = App::new().wrap_fn(crate::platform::http::traced).app_data(web::Data::new(auth.clone()));
        if let (Some(tm), Some(mcp_sessions)) = (&tm, &mcp_sessions) {
            app = app
                .configure(tm_role::configure(tm.clone(), openapi.clone()))
                .configure(tm_role::tools_api::configure(tools.clone()))
                .configure(tm_role::mcp::configure(
                    tools.clone(),
                    tm.documents.clone(),
                    listens.clone(),
                    mcp_sessions.clone(),
                    origins.clone(),
                ));
        }
        if let Some((handle, panels)) = &pm_api {
            app = app.configure(pm_role::configure(handle.clone(), panels.clone()));
        }
        app.configure(crate::platform::http::configure(k.clone(), readiness.clone()))
            .configure(tm_role::configure_fallback)
    };
    // The node handles the signals itself: it drains before it stops.
    let Bound { server, addr: http } = server::bind(config.http, &options, app, upgrades)
        .map_err(|source| NodeError::Http { addr: config.http, source })?;
    let handle = server.handle();
    let served = actix_rt::spawn(server);
    tracing::info!(node = %config.name, %http, ?roles, "node listening: /healthz /readyz /metrics /api/graph");
    Ok(RunningNode {
        http,
        gateway: gateway_addr,
        kernel,
        server: handle,
        served,
        drain,
        sessions: open_sessions,
        drain_timeout: config.drain_timeout,
        panels,
        gateway_role: gateway,
        llm,
        lease,
        _bridges: bridges,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::instances_grace;

    #[test]
    fn instances_get_what_is_left_of_the_drain_and_never_nothing() {
        let now = Instant::now();
        assert_eq!(instances_grace(now + Duration::from_secs(20), now), Duration::from_secs(20));
        assert_eq!(instances_grace(now, now + Duration::from_secs(3)), Duration::from_secs(1));
    }
}
